"""Sharded checkpoints of a :func:`fnlit.shard_state` state, with ``torch.distributed.checkpoint`` (DCP).

* :func:`save_sharded`: every rank writes its own shards (DCP's ``FileSystemWriter``: one file per rank
  plus ``.metadata``), into a temporary directory that rank 0 renames into place once all ranks have
  finished, so a crash mid-save never leaves a half-written checkpoint under the target name.
* :func:`restore_sharded`: reads a checkpoint written on N ranks into a state sharded on M ranks (DCP
  reshards: each rank reads only the pieces of its own shards), or, without a process group, into a
  plain single-process state (consolidation).

The state dict is keyed by tree paths (``params['0.weight']``, ``opt_state[1].mu['0.weight']``...), and
a small ``fnlit.json`` beside the shards records every path's shape and dtype, the world size, your
metadata, and the size and CRC-32 of every file, and a CRC-32 of itself; restoring checks them (a flipped bit is an error, not
a silently different model) and names the first path that differs from the state you restore into.

DCP reads its ``.metadata`` with ``pickle.load``, which runs any code a crafted file asks for; fnlit
reads it with an unpickler that builds only the few classes of DCP's metadata and refuses anything else.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import shutil
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.tensor import DTensor

from . import tree as _tree
from ._checkpoint_io import json_checked
from ._checkpoint_io import CheckpointError, UnsafeCheckpointError, _as_like, _reason, check_unique_paths
from ._checkpoint_io import holds_number, text_crc32
from .transforms.donate import check_not_donated
from .tree import is_real

__all__ = ["save_sharded", "restore_sharded", "read_sharded_meta"]

S = TypeVar("S")
META_FILE = "fnlit.json"
DCP_META_FILE = ".metadata"
FORMAT = "fnlit-sharded-1"
# The keys of an fnlit.json written before it carried its own CRC-32 (one without "crc32" may hold no others: a
# flipped bit in that key's name is corruption, not an earlier checkpoint).
_UNCHECKED_KEYS = {"format", "world_size", "tensors", "numbers", "meta", "files"}
_CHUNK = 1 << 24


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """Silences DCP's warning that it runs in one process without a process group (when that is our intent)."""
    with warnings.catch_warnings():
        if not _distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


_FIX_LEAF = {
    "save_sharded": "Keep other values out of the state (pass them as metadata: save_sharded(dir, state, epoch=3)).",
    "restore_sharded": "Pass like= a state made as the saved one was: a checkpoint holds only tensors and numbers.",
}


def _describe(tree: Any, who: str) -> tuple[list[str], dict[str, Any], dict[str, Any], dict[str, list[Any]]]:
    """The tree's paths, its tensors and its numbers by path, and each tensor's [shape, dtype]; ``who`` (the
    caller, save_sharded or restore_sharded) names itself in the error for a leaf that is neither."""
    paths, leaves, _ = _tree.tree_flatten_with_path(tree)
    tensors: dict[str, Any] = {}
    numbers: dict[str, Any] = {}
    for p, t in zip(paths, leaves):
        if isinstance(t, torch.Tensor):
            tensors[p] = t
        elif isinstance(t, (int, float)):  # a hyperparameter assigned as a number (optax's idiom), a counter
            numbers[p] = t
        elif is_real(t):  # a NumPy number (np.float32(5e-4) assigned as a hyperparameter): as the Python number
            numbers[p] = t.item()
        else:
            raise TypeError(
                f"{who} expected {'a state' if who == 'save_sharded' else 'like to be a state'} whose leaves are "
                f"tensors (or numbers), got {type(t).__name__} at {p}. " + _FIX_LEAF[who]
            )
    shapes = {p: [list(t.shape), str(t.dtype).removeprefix("torch.")] for p, t in tensors.items()}
    return paths, tensors, numbers, shapes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_crc(path: Path) -> dict[str, int]:
    """Size and CRC-32 of a file (zlib.crc32 runs at about 3 GB/s: a fraction of the time DCP takes)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return {"bytes": size, "crc32": crc}


def _all_gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (a collective), or ``[value]`` without a process group."""
    if not _distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _checksums(tmp: Path) -> tuple[dict[str, dict[str, int]], str | None]:
    """The sizes and CRCs of every rank's shards, each rank reading only the files it wrote (DCP names
    them ``__<rank>_<n>.distcp``), and the ranks that could not read theirs (``rank 1: Input/output error
    (EIO)``; ``None`` if none), the same on every rank; rank 0 adds the other files with
    :func:`_unnamed_checksums`."""
    rank = dist.get_rank() if _distributed() else 0
    try:
        mine, failure = {p.name: _file_crc(p) for p in sorted(tmp.glob(f"__{rank}_*.distcp"))}, None
    except Exception as e:  # sent through the same exchange: a rank raising here would leave the others in it
        mine, failure = {}, f"rank {rank}: {_reason(e)}"
    files: dict[str, dict[str, int]] = {}
    failures = []
    for part, failed in _all_gather((mine, failure)):  # also the barrier: every rank's shards are on disk
        files.update(part)  # (DCP fsyncs each file)
        if failed is not None:
            failures.append(failed)
    return files, "; ".join(failures) or None


def _unnamed_checksums(tmp: Path, files: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """``files`` and the sizes and CRCs of the checkpoint's other files: ``.metadata`` and any file that
    DCP's naming missed (on rank 0, inside the step whose failure every rank raises)."""
    others = {p.name: _file_crc(p) for p in sorted(tmp.iterdir())
              if p.name not in files and p.name != META_FILE and p.is_file()}
    return {**files, **others}


def _failure(e: CheckpointException) -> str:
    """DCP's per-rank failures in one line: ``rank 0: FileNotFoundError: ...``."""
    parts = []
    for rank, (exc, _) in sorted(e.failures.items()):
        text = str(exc).strip().splitlines()
        parts.append(f"rank {rank}: {type(exc).__name__}: {text[0] if text else ''}")
        if "unexpected pos" in str(exc):  # torch's zip writer, when a write stopped short
            parts[-1] += " (a shard file was cut short: is the disk full, or a file-size limit, ulimit -f, reached?)"
    return "; ".join(parts) or "no detail"


def _complete(directory: Path) -> bool:
    return (directory / META_FILE).is_file()  # written last, once every shard is on disk


def _stashes(target: Path) -> tuple[Path, Path]:
    """Where save_sharded keeps the new checkpoint (``.name.tmp``) and the previous one (``.name.old``)."""
    return target.parent / f".{target.name}.tmp", target.parent / f".{target.name}.old"


def _resolve(directory: Path) -> Path:
    """``directory``, or, when a save_sharded was cut off between its two renames (the previous checkpoint
    moved aside, the new one not yet in place), the complete copy it left: the new one, else the previous."""
    if directory.exists():
        return directory
    for stash in _stashes(directory):
        if _complete(stash):
            warnings.warn(
                f"The sharded checkpoint {directory} is missing: a save_sharded was interrupted while replacing "
                f"it. Reading the complete copy it left, {stash}; the next save_sharded to {directory} puts it back.",
                stacklevel=3,
            )
            return stash
    return directory


def _put_back(target: Path) -> None:
    """Before a save: a complete checkpoint left aside by an interrupted save goes back under ``target``, so
    that it is neither deleted as a stale temporary nor the only copy while the new one is written."""
    if target.exists():
        return
    for stash in _stashes(target):
        if _complete(stash):
            os.replace(stash, target)
            _fsync_dir(target.parent)
            return


def save_sharded(directory: str | os.PathLike[str], state: Any, **meta: Any) -> Path:
    """Writes ``state`` to ``directory``, each rank its own shards, atomically; a collective call.

    Every rank writes into ``.<name>.tmp`` next to the target and computes the CRC-32 of its own files;
    rank 0 gathers them, writes ``fnlit.json``, fsyncs, and renames the directory into place (an existing
    checkpoint of that name is first moved to ``.<name>.old``, and removed once the new one is in place),
    then fsyncs the parent. A crash between those two renames leaves both complete copies: restoring
    reads the new one, and the next save puts it back under the name. Plain tensors (step, RNG key,
    scalars, buffers) are the same on every rank and are written once. Works without a process group
    too (a single process writes everything). With several machines, ``directory`` must be on a
    filesystem all of them see (as for DCP's ``FileSystemWriter``).

    Args:
        directory: the checkpoint directory to create (or replace).
        state: a :class:`fnlit.TrainState`, sharded or not (or any pytree of tensors).
        **meta: JSON-serialisable metadata (epoch, data position, ...): :func:`read_sharded_meta` returns it.

    Returns:
        The checkpoint's path.

    Raises:
        TypeError: for a leaf in the state that is neither a tensor nor a number (numbers, such as a
            hyperparameter assigned as one, are written to ``fnlit.json`` exactly), or metadata that is not
            JSON-serialisable (a dict key that is not a string included).
        ValueError: if two leaves of the state have the same path text (a dict key ``"a['b']"`` beside
            ``{"a": {"b": ...}}``), naming it.
        FileExistsError: if ``directory`` is a file, or a non-empty folder that is not a sharded checkpoint.
        CheckpointError: naming the directory, on every rank, if the checkpoint could not be written (full
            disk, no permission, a file-size limit, an I/O error reading a file back to checksum it): any
            previous checkpoint of that name is unchanged, and the partial one is removed.
        RuntimeError: if ``state`` was donated to a step (:func:`fnlit.donating`): save the state it returned.

    Example:
        >>> import tempfile, torch, fnlit
        >>> from fnlit.sharded_checkpoint import read_sharded_meta, restore_sharded, save_sharded
        >>> state = fnlit.TrainState.create(torch.nn.Linear(3, 2), fnlit.optim.adamw(1e-3), seed=0)
        >>> d = save_sharded(tempfile.mkdtemp() + "/ckpt", state, epoch=1)
        >>> read_sharded_meta(d)["meta"], int(restore_sharded(d, like=state).step)
        ({'epoch': 1}, 0)
    """
    check_not_donated(state)  # the donation error, not a leaf of the wrong type (its fields are sentinels)
    target = Path(directory)
    if target.is_file() or (target.is_dir() and not (target / META_FILE).exists() and any(target.iterdir())):
        # (checked on every rank alike: one rank raising alone would leave the others in a collective)
        raise FileExistsError(
            errno.EEXIST, f"save_sharded replaces only an earlier sharded checkpoint (a folder with {META_FILE}), "
            f"and {target} is {'a file' if target.is_file() else 'a folder holding other files'}: nothing was "
            "written. Save to a new path, or move that one away", str(target),
        )
    tmp, old = _stashes(target)
    paths, tensors, numbers, shapes = _describe(state, "save_sharded")
    check_unique_paths(paths, "save_sharded")  # (on every rank alike, before anything is written)
    world = dist.get_world_size() if _distributed() else 1
    # numbers (a hyperparameter assigned as one) go in fnlit.json as they are: exactly, in their own type
    info = {"format": FORMAT, "world_size": world, "tensors": shapes, "numbers": numbers, "meta": meta}
    try:
        json.dumps(info)
    except TypeError as e:
        raise TypeError(f"save_sharded expected JSON-serialisable metadata, got {sorted(meta)}: {e}.") from None
    json_checked("the metadata", meta, "save_sharded")  # (string keys only: JSON would turn {0: "cat"} into {"0": ...})
    rank0 = not _distributed() or dist.get_rank() == 0
    unchanged = "Any previous checkpoint there is unchanged."
    failure = None  # rank 0's, sent to every rank at the next exchange: all raise it, none waits for rank 0
    if rank0:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _put_back(target)
            shutil.rmtree(tmp, ignore_errors=True)  # a save that crashed earlier
            tmp.mkdir()
        except Exception as e:
            failure = f"could not write the sharded checkpoint {target}: {_reason(e)}. {unchanged}"
    _raise_if_failed(failure)
    with _quiet_single_process():
        writer = dcp.FileSystemWriter(tmp, sync_files=True)
        try:
            dcp.save(tensors, storage_writer=writer, no_dist=not _distributed())
        except CheckpointException as e:  # a BaseException: `except Exception` would not see it
            # (DCP raises it on every rank, once all have stopped writing)
            if rank0:
                shutil.rmtree(tmp, ignore_errors=True)  # the shards written before the failure
            raise CheckpointError(f"could not write the sharded checkpoint {target}: {_failure(e)}. {unchanged}") from None
    files, failed = _checksums(tmp)
    if failed is not None:  # (every rank knows it: rank 0 removes the copy, then all raise it at the exchange)
        failure = f"could not write the sharded checkpoint {target}: {failed}. {unchanged}"
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
    elif rank0:
        try:  # (reading .metadata back may fail too: every rank raises it, and the copy is removed)
            files = _unnamed_checksums(tmp, files)
            body = {**info, "files": files}  # its CRC-32: of the body as json.dumps writes it (_read_meta checks it)
            with open(tmp / META_FILE, "w") as f:
                f.write(json.dumps({**body, "crc32": text_crc32(json.dumps(body))}, indent=1))
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if target.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
            os.replace(tmp, target)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(OSError):
                _put_back(target)  # (when it failed between the two renames: the previous one back in place)
            failure = f"could not write the sharded checkpoint {target}: {_reason(e)}. {unchanged}"
        else:
            try:
                _fsync_dir(target.parent)
                shutil.rmtree(old, ignore_errors=True)
            except OSError as e:
                failure = (f"wrote the sharded checkpoint {target}, but could not fsync its folder ({_reason(e)}): a "
                           "power loss may lose it.")
    _raise_if_failed(failure)
    return target


def _raise_if_failed(failure: str | None) -> None:
    """Raises rank 0's ``failure`` on every rank (an exchange: also the barrier), or returns if it had none."""
    failure = _all_gather(failure)[0]
    if failure is not None:
        raise CheckpointError(failure)


def read_sharded_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's ``fnlit.json``: ``world_size``, ``tensors`` (path -> [shape, dtype]), ``meta`` and
    ``files`` (name -> size and CRC-32).

    Raises:
        FileNotFoundError: if ``directory`` is not a sharded checkpoint written by :func:`save_sharded`.
        CheckpointError: naming the file, if its ``fnlit.json`` is truncated or corrupt.

    Example:
        >>> import tempfile, torch, fnlit
        >>> state = fnlit.TrainState.create(torch.nn.Linear(3, 2), fnlit.optim.sgd(0.1), seed=0)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     info = read_sharded_meta(save_sharded(d + "/ckpt", state, run="demo"))
        >>> info["world_size"], info["meta"], info["tensors"]["params['weight']"]
        (1, {'run': 'demo'}, [[2, 3], 'float32'])
    """
    return _read_meta(_resolve(Path(directory)), directory)


def _read_meta(directory: Path, given: str | os.PathLike[str]) -> dict[str, Any]:
    path = directory / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"read_sharded_meta: {given} is not a checkpoint written by fnlit.save_sharded (no {META_FILE} "
            "in it). Pass the directory save_sharded returned; fnlit.save's single-file checkpoints are read "
            "with fnlit.restore."
        )
    try:
        info = json.loads(path.read_bytes())
        crc = info.pop("crc32", None) if isinstance(info, dict) else None
        if crc is not None and text_crc32(json.dumps(info)) != crc:  # (json.dumps gives back the text it read)
            raise ValueError("its checksum does not match")
        if crc is None and isinstance(info, dict) and not info.keys() <= _UNCHECKED_KEYS:  # (earlier versions': none)
            raise ValueError(f"it has no checksum, and keys {sorted(info.keys() - _UNCHECKED_KEYS)} no version wrote")
        if not (isinstance(info, dict) and info.get("format") == FORMAT and isinstance(info.get("tensors"), dict)):
            raise ValueError(f"it is not an fnlit sharded checkpoint's {META_FILE} (format {FORMAT!r})")
        if not isinstance(info.setdefault("files", {}), dict):  # checkpoints of earlier versions have none
            raise ValueError("its list of files is not a dict")
    except (OSError, UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(
            f"cannot read the sharded checkpoint {directory}: {path} is truncated or corrupt ({e})."
        ) from None
    return info


def _verify(directory: Path, files: dict[str, dict[str, int]]) -> None:
    """Checks every file's size and CRC-32 against fnlit.json; ranks share the reading (a collective)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    problems = []
    for name in sorted(files)[rank::world]:
        want, path = files[name], directory / name
        try:
            got = _file_crc(path)
        except FileNotFoundError:
            problems.append(f"{path} is missing")
            continue
        except OSError as e:
            problems.append(f"{path} cannot be read ({e.strerror})")
            continue
        if got["bytes"] != want.get("bytes"):
            problems.append(
                f"{path} has {got['bytes']} bytes, but {want.get('bytes')} were written (truncated or overwritten)"
            )
        elif got["crc32"] != want.get("crc32"):
            problems.append(f"{path} does not match its CRC-32 (corrupt)")
    problems = [p for part in _all_gather(problems) for p in part]
    if problems:
        raise CheckpointError(
            f"cannot restore the sharded checkpoint {directory}: {'; '.join(problems[:3])}"
            f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}. Restore an earlier checkpoint."
        )


# What the .metadata pickle of a checkpoint of tensors needs (found by listing the globals of real ones).
# BytesStorageMetadata is left out on purpose: DCP loads those entries with torch.load(weights_only=False).
_DCP_META_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
    # Python 3.13 moved the classes to pathlib._local (and pickles them under that name)
    ("pathlib._local", "Path"), ("pathlib._local", "PosixPath"), ("pathlib._local", "WindowsPath"),
    ("pathlib._local", "PurePosixPath"), ("pathlib._local", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _DCP_META_CLASSES or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the global {module}.{name}")


def _read_dcp_metadata(directory: Path) -> Metadata:
    """DCP's ``.metadata``, unpickled with only the classes DCP's metadata of tensors is made of."""
    path = directory / DCP_META_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(
            f"cannot restore the sharded checkpoint {directory}: it has no {DCP_META_FILE} (DCP's index of the "
            "shards); the checkpoint is incomplete. Restore an earlier checkpoint."
        ) from None
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        if str(e).startswith("the global "):
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it asks to build {str(e).removeprefix('the ')}, which DCP's metadata "
                "never needs (it could run code). The checkpoint was made by something else, or tampered with."
            ) from None
        raise CheckpointError(f"cannot restore the sharded checkpoint {directory}: {path} is corrupt ({e}).") from None
    except Exception as e:  # noqa: BLE001 (whatever a damaged pickle raises: EOFError, TypeError, ...)
        raise CheckpointError(
            f"cannot restore the sharded checkpoint {directory}: {path} is corrupt ({type(e).__name__}: {e})."
        ) from None
    entries = getattr(metadata, "state_dict_metadata", None)
    if not (isinstance(metadata, Metadata) and isinstance(entries, dict)
            and all(isinstance(m, TensorStorageMetadata) for m in entries.values())):
        raise CheckpointError(
            f"cannot restore the sharded checkpoint {directory}: {path} is not DCP's metadata of a state of tensors."
        )
    return metadata


class _Reader(dcp.FileSystemReader):
    """DCP's file reader, handed the metadata fnlit has already read safely (DCP's own reads it with pickle.load)."""

    def __init__(self, path: Path, metadata: Metadata) -> None:
        super().__init__(path)
        self.metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # DCP's fallback to per-rank metadata, which save_sharded never writes
            raise FileNotFoundError("save_sharded writes no per-rank metadata")
        return self.metadata


def _check_like(
    directory: Path, saved: dict[str, list[Any]], shapes: dict[str, list[Any]], numbers: dict[str, Any],
    saved_numbers: dict[str, Any],
) -> None:
    """``shapes``: what is loaded from the tensors ``saved``; ``numbers``: like's other leaves, each to take
    the number saved at its path (as a number, or a 0-d or an ensemble's (n,) float tensor, as fnlit.restore
    takes it; a bool where both are bools, never in a tensor's place)."""
    missing = [p for p in shapes if p not in saved] + [p for p in numbers if p not in saved_numbers and p not in saved]
    extra = [p for p in saved if p not in shapes and p not in numbers]
    extra += [p for p in saved_numbers if p not in numbers]
    if missing or extra:
        raise ValueError(
            f"restore_sharded: the checkpoint {directory} does not have the structure of `like`: "
            + (f"it lacks {missing[:3]}; " if missing else "")
            + (f"it has {extra[:3]}, which `like` lacks; " if extra else "")
            + "restore into a state built the same way (same module, optimizer and loss_scale)."
        )
    for p, leaf in numbers.items():
        if p not in saved_numbers:  # a tensor that no number stands for (not a 0-d or (n,) float one)
            raise ValueError(
                f"restore_sharded: at {p} the checkpoint {directory} holds a torch.{saved[p][1]} tensor of shape "
                f"{tuple(saved[p][0])}, but `like` has the number {leaf!r}. Restore into a state built the same way "
                "(same module, optimizer and loss_scale)."
            )
        number = is_real(leaf) or (isinstance(leaf, bool) and isinstance(saved_numbers[p], bool))  # (a flag)
        if not (number or (holds_number(leaf) and not isinstance(saved_numbers[p], bool))):  # (a flag is no rate)
            got = f"a {leaf.dtype} tensor of shape {tuple(leaf.shape)}" if isinstance(leaf, torch.Tensor) else repr(leaf)
            raise ValueError(
                f"restore_sharded: at {p} the checkpoint {directory} holds the number {saved_numbers[p]!r}, but `like` "
                f"has {got}. Restore into a state built the same way (same module, optimizer and loss_scale)."
            )
    for p, want in shapes.items():
        if saved[p] != want:
            raise ValueError(
                f"restore_sharded: at {p} the checkpoint {directory} holds shape {tuple(saved[p][0])} and dtype "
                f"{saved[p][1]}, but `like` has shape {tuple(want[0])} and dtype {want[1]}. Restore into a state "
                "built the same way (same module, optimizer and loss_scale)."
            )


def restore_sharded(directory: str | os.PathLike[str], like: S) -> S:
    """Reads a :func:`save_sharded` checkpoint into a new state shaped and sharded like ``like``.

    ``like`` decides the layout: a state sharded on M ranks (:func:`fnlit.shard_state`) gets its shards
    resharded from a checkpoint written on any number of ranks (a collective: call it on every rank); a
    plain state in a process without a process group gets the whole consolidated state. ``like`` is not
    modified.

    Every file is checked against the size and CRC-32 recorded when it was written (the ranks share the
    reading), and ``fnlit.json`` against its own CRC-32, before anything is loaded.

    Raises:
        FileNotFoundError: if ``directory`` is not a sharded checkpoint.
        ValueError: naming the first tree path whose shape or dtype differs from ``like``, or that is missing.
        CheckpointError: naming the directory and the file, if a file is missing, truncated or corrupt.
        UnsafeCheckpointError: if its ``.metadata`` pickle asks for anything but DCP's metadata classes.
        TypeError: for a leaf of ``like`` that is neither a tensor nor a number.
        RuntimeError: if ``like`` was donated to a step (:func:`fnlit.donating`).

    Example:
        >>> # on any number of ranks: state = fnlit.restore_sharded("ckpt", like=fnlit.shard_state(fresh))
    """
    check_not_donated(like)  # the donation error, not a leaf of the wrong type (its fields are sentinels)
    given = directory
    directory = _resolve(Path(directory))
    info = _read_meta(directory, given)
    paths, tensors, numbers, _ = _describe(like, "restore_sharded")
    saved_numbers = info.get("numbers", {})
    # What DCP loads: like's tensors (copies: DCP loads in place, never into `like`), and for a number in `like`
    # saved as a 0-d or (n,) float tensor (an ensemble's), a tensor of the saved shape and dtype; a number saved
    # where `like` has a tensor is not loaded (nor another tensor where `like` has a number: _check_like refuses it).
    load: dict[str, Any] = {p: t.detach().clone() for p, t in tensors.items() if p not in saved_numbers}
    for p in numbers:
        kept = info["tensors"].get(p)
        dtype = getattr(torch, kept[1], None) if kept is not None else None
        if (p not in saved_numbers and not isinstance(numbers[p], bool) and isinstance(dtype, torch.dtype)
                and dtype.is_floating_point and len(kept[0]) <= 1):  # (no float tensor stands for a bool: refused unread)
            load[p] = torch.empty(kept[0], dtype=dtype)
    # A 0-d float (a rate) saved in another float dtype: a float64 model's rates were float32 before they were held
    # in float64. Loaded as saved, cast to like's below (as fnlit.restore does).
    recast = {}
    for p, t in tensors.items():
        kept = info["tensors"].get(p, [None, None])
        if p in load and type(t) is torch.Tensor and t.dim() == 0 and t.is_floating_point() and kept[0] == [] and (
            kept[1] != str(t.dtype).removeprefix("torch.") and getattr(torch, kept[1], None) in (torch.float32, torch.float64)
        ):
            load[p], recast[p] = torch.empty((), dtype=getattr(torch, kept[1]), device=t.device), t.dtype
    loaded = {p: [list(t.shape), str(t.dtype).removeprefix("torch.")] for p, t in load.items()}
    others = {p: v for p, v in {**tensors, **numbers}.items() if p not in load}
    _check_like(directory, info["tensors"], loaded, others, saved_numbers)
    if not _distributed() and any(isinstance(t, DTensor) for t in tensors.values()):
        raise ValueError(
            "restore_sharded got a `like` of DTensors but no process group: to consolidate a checkpoint "
            "in one process, pass a plain state (TrainState.create(module, tx, seed=...))."
        )
    _verify(directory, info["files"])
    reader = _Reader(directory, _read_dcp_metadata(directory))
    with _quiet_single_process():
        try:
            dcp.load(load, storage_reader=reader, no_dist=not _distributed())
        except CheckpointException as e:  # a BaseException: `except Exception` would not see it
            raise CheckpointError(f"cannot restore the sharded checkpoint {directory}: {_failure(e)}.") from None
    like_leaves = {**tensors, **numbers}
    values = [_as_like(like_leaves[p], saved_numbers[p] if p in saved_numbers else load[p]) for p in paths]
    for p, v in zip(paths, values):
        if p in numbers and isinstance(v, torch.Tensor):  # (an ensemble's members differ, or not a float tensor)
            raise ValueError(
                f"restore_sharded: at {p} the checkpoint {directory} holds a {v.dtype} tensor of shape {tuple(v.shape)}"
                f"{' whose values differ' if holds_number(v) and v.numel() else ''}, but `like` has the number "
                f"{numbers[p]!r}. Restore into a state built the same way (same module, optimizer and loss_scale)."
            )
    values = [v.to(recast[p]) if p in recast else v for p, v in zip(paths, values)]
    return _tree.tree_unflatten(_tree.tree_structure(like), values)
