"""The checkpoint file format and the atomic file operations behind :mod:`fnlit.checkpoint`.

A checkpoint is one file written by ``torch.save``: a dict with the format name, a JSON header and
the tensors keyed by their tree path. It is read back with ``torch.load(weights_only=True)``, which
builds tensors and plain containers only: a file whose pickle asks for anything else is refused, so
loading a checkpoint never runs code from it. PyTorch's zip reader does not check its CRCs, so the
header carries a CRC-32 of every tensor's bytes and of itself: a flipped bit is an error, not a
silently different model.

Files are written atomically: into a temporary file in the same folder, fsynced, renamed over the
target, and the folder fsynced. A crash at any moment leaves either the old file or the new one.
"""

from __future__ import annotations

import errno
import inspect
import sys
import json
import math
import os
import pickle
import re
import secrets
import shutil
import stat
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from . import distributed as _dist

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; stale files are told by their pid alone
    fcntl = None  # type: ignore[assignment]
from . import tree as _tree
from .tree import _describe, is_real

__all__ = ["CheckpointError", "UnsafeCheckpointError", "encode", "decode", "atomic_write", "link_or_copy",
           "remove_stale_temps", "fill_like", "load_into", "json_checked", "write_state", "read_header", "newest_first",
           "is_sharded", "full_tensors", "common_step"]

S = TypeVar("S")
M = TypeVar("M", bound=nn.Module)
Position = dict[str, Any]  # epoch, batch, seed, steps (ints); callbacks (their states)
"""The driver's place in the data: ``{"epoch": e, "batch": b, "seed": s, "steps": n}``: ``b`` batches of epoch ``e``
done, ``n`` calls of the step in all (a checkpoint saved before fit counted them has no ``"steps"``)."""
FORMAT = "fnlit.checkpoint"
LAST = "last.ckpt"
STEP_FILE = re.compile(r"^step=(\d+)\.ckpt$")
VERSION = 1
_WRITE_CHUNK = 1 << 20  # writes smaller than this are gathered, so a header costs one syscall, not forty
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+$")


class CheckpointError(RuntimeError):
    """A checkpoint file could not be written or read: missing permissions, a full disk, a truncated or
    corrupt file, a file that is not an fnlit checkpoint. The message names the file.

    Example:
        >>> import pathlib, tempfile, fnlit
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = pathlib.Path(d, "bad.ckpt").write_bytes(b"not a checkpoint")
        ...     fnlit.restore(pathlib.Path(d, "bad.ckpt"), like=None)
        Traceback (most recent call last):
        fnlit._checkpoint_io.CheckpointError: cannot read checkpoint .../bad.ckpt: it is not a checkpoint file ...
    """


class UnsafeCheckpointError(CheckpointError):
    """The file's pickle asks to build objects other than tensors and plain containers (it could run
    code); fnlit refuses to load it.

    Example:
        >>> import pathlib, tempfile, torch, fnlit
        >>> with tempfile.TemporaryDirectory() as d:
        ...     torch.save(torch.nn.Linear(1, 1), pathlib.Path(d, "model.pt"))  # a pickled module, not a state
        ...     fnlit.restore(pathlib.Path(d, "model.pt"), like=None)
        Traceback (most recent call last):
        fnlit._checkpoint_io.UnsafeCheckpointError: refusing to load .../model.pt: ... non-tensor objects ...
    """


def _resolved(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its lazy conjugate and negative bits applied (``x.conj()`` is a view with a flag: its
    storage holds the unconjugated values, and it cannot be viewed as bytes)."""
    return t.detach().resolve_conj().resolve_neg()


def _bytes(t: torch.Tensor) -> Any:
    """The tensor's bytes as a buffer (no copy for contiguous CPU tensors)."""
    return _resolved(t).contiguous().reshape(-1).view(torch.uint8).numpy()


def crc32(t: torch.Tensor) -> int:
    """CRC-32 of a CPU tensor's bytes in row-major order (about 3 GB/s)."""
    return zlib.crc32(_bytes(t)) if t.numel() else 0


def text_crc32(text: str) -> int:
    """CRC-32 of a JSON text's UTF-8 bytes: the checksum of fnlit.save's header and of save_sharded's fnlit.json."""
    return zlib.crc32(text.encode())


def _compact(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor whose storage holds only its own bytes: torch.save writes whole storages, so a
    slice of a large buffer would otherwise save the whole buffer."""
    t = _resolved(t).cpu()
    if t.untyped_storage().nbytes() > t.numel() * t.element_size():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def plain_subclass(t: torch.Tensor) -> bool:
    """Whether ``t`` is of a tensor subclass whose data is its own storage (``x.as_subclass(Tagged)``): one with no
    ``__torch_dispatch__`` of its own. A wrapper subclass (DTensor, FakeTensor, a quantized or float8 tensor)
    defines one: its storage, if any, is not its values."""
    return type(t) is not torch.Tensor and type(t).__torch_dispatch__ is torch.Tensor.__torch_dispatch__


def _stored(path: str, leaf: torch.Tensor) -> torch.Tensor:
    """``leaf`` as the plain tensor the file holds: torch.load(weights_only=True) rebuilds torch.Tensor and
    nn.Parameter only, so a subclass pickled as itself made a file that fnlit then refused as tampered with."""
    if type(leaf) is torch.Tensor or type(leaf) is nn.Parameter:  # (detach() makes a Parameter a plain tensor)
        return leaf
    if plain_subclass(leaf):
        return leaf.as_subclass(torch.Tensor)  # (as_subclass runs no __torch_function__: the same data, plain)
    raise TypeError(
        f"fnlit.save stores plain tensors, got a {type(leaf).__name__} at {path}: a tensor subclass with its own "
        "__torch_dispatch__, whose storage is not its values. Convert it to a plain tensor (e.g. its full or "
        "dequantized values) or keep it out of the state."
    )


def check_unique_paths(paths: list[str], who: str = "fnlit.save") -> None:
    """Raises a ValueError if two leaves share a path text: a checkpoint keys its tensors by it, and a dict key
    that reads as a path (``"a['b']"`` beside ``{"a": {"b": ...}}``) gives another leaf's, so one would be lost."""
    if len(set(paths)) == len(paths):
        return
    seen: set[str] = set()
    twice = next(p for p in paths if p in seen or seen.add(p))  # type: ignore[func-returns-value]
    if twice.startswith(_POSITION):
        raise ValueError(
            f"{who} keys the position's tensors as {_POSITION}/N, and the state has a leaf with the path {twice}: the "
            "checkpoint could hold only one of them, so nothing was written: rename the state's key."
        )
    raise ValueError(
        f"{who} keys each leaf by its path, and two leaves of the state have the path {twice}: a dict key that "
        "reads as a path (\"a['b']\" beside {'a': {'b': ...}}) gives another leaf's. The checkpoint could hold only "
        "one of them, so nothing was written: rename the key."
    )


def encode(paths: list[str], leaves: list[Any], header: dict[str, Any]) -> dict[str, Any]:
    """The object ``torch.save`` writes: tensors by path plus the JSON header describing every leaf.

    A tensor subclass with no ``__torch_dispatch__`` of its own (``x.as_subclass(Tagged)``) is stored as the plain
    tensor of its data (:func:`fill_like` gives ``like``'s subclass back); nothing is written before every leaf
    is checked.

    Raises:
        TypeError: if a leaf is neither a tensor nor a JSON value (int, float, bool, str), or is a sparse,
            meta or nested tensor, or of a tensor subclass with its own ``__torch_dispatch__`` (naming the path).
    """
    tensors: dict[str, torch.Tensor] = {}
    entries: list[dict[str, Any]] = []
    for path, leaf in zip(paths, leaves):
        if isinstance(leaf, torch.Tensor):
            if leaf.layout is not torch.strided or leaf.is_meta or leaf.is_nested:
                kind = "meta" if leaf.is_meta else "nested" if leaf.is_nested else str(leaf.layout).removeprefix("torch.")
                raise TypeError(
                    f"fnlit.save stores dense tensors with data, got a {kind} tensor at {path}. Convert it "
                    "(t.to_dense(), or materialise it on a real device) or keep it out of the state."
                )
            t = tensors[path] = _compact(_stored(path, leaf))
            entries.append({"path": path, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "crc32": crc32(t)})
        elif isinstance(leaf, (bool, int, float, str)):
            entries.append({"path": path, "value": leaf})
        elif is_real(leaf):  # a NumPy number (np.float32(5e-4) assigned as a hyperparameter): as the Python number
            entries.append({"path": path, "value": leaf.item()})
        else:
            raise TypeError(
                f"fnlit.save can store tensors and plain numbers or strings, got {type(leaf).__name__} at {path}. "
                "Keep the state's leaves tensors (hold hyperparameters as 0-d tensors)."
            )
    head = json.dumps({"format": FORMAT, "version": VERSION, "torch": torch.__version__, **header, "leaves": entries})
    return {"format": FORMAT, "header": head, "header_crc32": text_crc32(head), "tensors": tensors}


def _load(path: Path, mmap: bool) -> Any:
    # torch maps only zip files: another file (torch's legacy format, a plain pickle, an empty or text file) is
    # read as restore reads it, so that it is told apart (a foreign checkpoint, a corrupt file) the same way
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files; we raise instead
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"no checkpoint file at {path}", str(path)) from None
    except IsADirectoryError:
        raise IsADirectoryError(
            errno.EISDIR,
            f"expected a checkpoint file, got the folder {path} (a fnlit.save_sharded checkpoint is read with "
            "fnlit.restore_sharded; a Checkpointer folder with Checkpointer.restore)",
            str(path),
        ) from None
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "unsupported" in ln.lower()), "")
        if "global" in detail.lower():
            raise UnsafeCheckpointError(
                f"refusing to load {path}: the file tried to load non-tensor objects ({detail}). fnlit reads "
                "checkpoints with torch.load(weights_only=True) and refuses to execute code from a checkpoint. "
                "An fnlit checkpoint never needs this; the file was made by something else, or tampered with."
            ) from None
        raise CheckpointError(f"cannot read checkpoint {path}: it is not a checkpoint file or it is corrupt ({detail or e}).") from None
    except PermissionError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}.") from e
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError, AssertionError) as e:
        # (a flipped bit in the pickle reaches torch's unpickler as any of these)
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated or corrupt ({str(e).splitlines()[0] if str(e) else type(e).__name__}).") from e


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")  # noqa: TRY004 (reported as a corrupt file)
    return dtype


def decode(path: str | os.PathLike[str], *, verify: bool = True, mmap: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a checkpoint: its header and a dict ``path -> tensor or value`` in the header's leaf order.

    Args:
        path: the file.
        verify: check every tensor's CRC-32 against the header (reads all tensor bytes).
        mmap: map the file instead of reading it (cheap header reads of large files).

    Raises:
        FileNotFoundError: if there is no such file.
        UnsafeCheckpointError: if its pickle asks for anything but tensors and plain containers.
        CheckpointError: if it is truncated, corrupt or not an fnlit checkpoint.
    """
    path = Path(path)
    payload = _load(path, mmap)
    if not (isinstance(payload, dict) and payload.get("format") == FORMAT):
        raise CheckpointError(
            f"{path} is not an fnlit checkpoint (no fnlit header). For a plain state_dict, use "
            "module.load_state_dict(torch.load(path, weights_only=True))."
        )
    try:
        head = payload["header"]
        if text_crc32(head) != payload["header_crc32"]:
            raise ValueError("the header's checksum does not match")
        header = json.loads(head)
        if header.get("version", 0) > VERSION:
            raise ValueError(f"format version {header['version']} is newer than this fnlit reads ({VERSION}); upgrade fnlit")
        tensors = payload["tensors"]
        values: dict[str, Any] = {}
        for entry in header["leaves"]:
            p = entry["path"]
            if "value" in entry:
                values[p] = entry["value"]
                continue
            t = tensors[p]
            if list(t.shape) != entry["shape"] or t.dtype != _dtype(entry["dtype"]):
                raise ValueError(f"{p} has shape {tuple(t.shape)} and {t.dtype}, the header says {entry['shape']} and {entry['dtype']}")
            if verify and crc32(t) != entry["crc32"]:
                raise ValueError(f"the bytes of {p} do not match their checksum")
            values[p] = t
        # The position's tensors: back in their place in the position, out of the state's values.
        found = {p: values.pop(p) for p in [p for p in values if _is_position_path(p)]}
        if found or header.get("position"):
            header["position"] = _push_tensors(header.get("position"), found)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, IndexError, AssertionError) as e:
        # (RuntimeError: a flipped bit in a tensor's stride, seen by the checksum's byte view)
        raise CheckpointError(f"cannot read checkpoint {path}: the file is corrupt ({type(e).__name__}: {e}).") from None
    return header, values


class _FdWriter:
    """The file object torch.save writes to: gathers small writes, loops over partial ``os.write``s."""

    def __init__(self, fd: int) -> None:
        self.fd, self.pending = fd, bytearray()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if len(view) < _WRITE_CHUNK:
            self.pending += view
            if len(self.pending) >= _WRITE_CHUNK:
                self.flush()
        else:
            self.flush()
            self._write_all(view)
        return len(view)

    def flush(self) -> None:
        if self.pending:
            self._write_all(memoryview(self.pending))
            self.pending = bytearray()

    def _write_all(self, view: memoryview) -> None:
        while len(view):
            view = view[os.write(self.fd, view):]


def fsync_dir(directory: Path) -> None:
    """Makes a rename in ``directory`` durable (some filesystems cannot fsync a folder: skipped there)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _reason(e: BaseException) -> str:
    """What went wrong, in a few words: ``No space left on device (ENOSPC)``, else ``Type: message``."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} ({errno.errorcode.get(e.errno or 0, e.errno)})"
    return f"{type(e).__name__}: {e}"


def _failed(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"could not write checkpoint {path}: {_reason(e)}. Any previous file at that path is unchanged.")


def _through_link(path: Path) -> Path:
    """Where a save to ``path`` writes: the file a symbolic link points to (as torch.save and Lightning write
    through the link), so the link stays and its target gets the new content; else ``path``."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _keep_mode(fd: int, path: Path) -> None:
    """Gives the new file ``fd`` the permission bits of the file it replaces at ``path``, if there is one (as
    torch.save, which writes into the existing file, keeps them: a 0o600 checkpoint stays private)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Any], None]) -> Path:
    """Writes a file so that a crash at any moment leaves either the old file or the complete new one.

    ``write(f)`` writes the content into ``f`` (a temporary file in the same folder; for a symbolic link, in its
    target's folder: the target is replaced, the link stays), which has the permission bits of the file it
    replaces (if any) from the start; the file is then fsynced, renamed over ``path``, and the folder fsynced. On
    any error the temporary file is removed.

    Raises:
        CheckpointError: naming ``path``, if the folder cannot be written, the disk is full, ...
    """
    given = Path(path)
    path = _through_link(given)
    tmp = _temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:
        raise _failed(given, e) from e
    try:
        try:
            _hold(fd)  # held until the rename: another process's cleanup sees a live write (remove_stale_temps)
            _keep_mode(fd, path)  # before the content: a private checkpoint is never readable by others, even mid-write
            writer = _FdWriter(fd)
            write(writer)
            writer.flush()
            os.fsync(fd)
            if fcntl is not None:  # (where there is no flock, Windows, an open file cannot be renamed: closed first)
                os.replace(tmp, path)
        finally:
            os.close(fd)
        if fcntl is None:
            os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception):
            raise _failed(given, e) from e
        raise
    try:
        fsync_dir(path.parent)
    except OSError as e:
        raise CheckpointError(f"wrote checkpoint {given}, but could not fsync its folder ({e}): a power loss may lose it.") from e
    return given


def link_or_copy(src: Path, dst: Path) -> None:
    """Atomically makes ``dst`` a hard link to ``src`` (a copy where links are not supported).

    A symbolic link at ``dst`` to a file in another folder stays, and that file is replaced (as a save writes
    through the link); one to a file of ``dst``'s own folder (maybe one of a Checkpointer's checkpoints, which
    must keep its content) is itself replaced, as Lightning replaces its ``last.ckpt`` link."""
    real = _through_link(dst)
    if real.parent != Path(os.path.realpath(dst.parent)):
        dst = real
    tmp = _temp_name(dst)
    try:
        try:
            os.link(src, tmp)  # (unlocked for the microseconds until the rename)
        except OSError:
            with open(src, "rb") as f_in, open(tmp, "xb") as f_out:
                _hold(f_out.fileno())
                shutil.copyfileobj(f_in, f_out, 1 << 24)
                f_out.flush()
                os.fsync(f_out.fileno())
                os.replace(tmp, dst)
        else:
            os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception):
            raise _failed(dst, e) from e
        raise


def _alive(pid: int) -> bool:
    try:  # signal 0 checks that the process exists without touching it
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _hold(fd: int) -> None:
    """Locks the temporary file ``fd`` writes (flock: released when it is closed, or its process dies)."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks: the pid rule alone (see remove_stale_temps)
            pass


_STALE_AFTER = 600.0  # seconds: an unlocked temporary file untouched that long is a leak whatever its pid says


def remove_stale_temps(directory: Path) -> list[Path]:
    """Removes temporary files left in ``directory`` by writers that died.

    A file a writer holds (its flock, see :func:`atomic_write`) is never removed, whatever process or host
    wrote it. An unlocked one is removed when its pid is gone, or when it is older than 10 minutes (its pid
    reused: a container restarted with the same pid, a writer on another machine).
    """
    removed = []
    for p in directory.iterdir() if directory.is_dir() else ():
        m = _TEMP.match(p.name)
        if not m:
            continue
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:  # gone meanwhile (renamed into place)
            continue
        try:
            if fcntl is not None:
                try:  # (shared: it conflicts with the writer's exclusive lock, and works on a read-only fd on NFS)
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live write
                except OSError:
                    pass  # no locks on this filesystem
            pid = int(m["pid"])
            dead = pid != os.getpid() and not _alive(pid)
            if dead or time.time() - os.fstat(fd).st_mtime > _STALE_AFTER:
                p.unlink(missing_ok=True)
                removed.append(p)
        finally:
            os.close(fd)
    return removed


def opt_state_kind(opt_state: Any) -> str:
    """The optimizer state's type, as the header records it: ``AdamState``; ``(ClipState, AdamState)`` for a chain."""
    if isinstance(opt_state, (tuple, list)) and not hasattr(opt_state, "_fields"):
        return "(" + ", ".join(opt_state_kind(s) for s in opt_state) + ")"
    return type(opt_state).__name__


_PARAM_OR_BUFFER = re.compile(r"(params|buffers)(\[.*\])")


def _mismatch(path: Path, where: str, at: str = "", like: Any = None, values: dict[str, Any] | None = None,
              header: dict[str, Any] | None = None) -> ValueError:
    from .state import TrainState

    frozen = _PARAM_OR_BUFFER.fullmatch(at) if isinstance(like, TrainState) and values is not None else None
    if frozen is not None and ("buffers" if frozen[1] == "params" else "params") + frozen[2] in values:
        ours, theirs = ("trainable", "frozen") if frozen[1] == "params" else ("frozen", "trainable")
        return ValueError(
            f"fnlit.restore: the checkpoint {path} does not fit the state you restore into: {frozen[2][2:-2]} is "
            f"{ours} in the state (in its {frozen[1]}) and {theirs} in the checkpoint (TrainState.create makes a "
            "parameter with requires_grad=False a buffer). Set the module's requires_grad as it was when the state "
            "was saved and create the state again; or, to start a new training from the saved weights, load them "
            "with fnlit.load_module(path, module), set requires_grad as you want, and TrainState.create(module, tx, ...)."
        )
    if at.startswith("opt_state") and isinstance(like, TrainState):
        mine, saved = opt_state_kind(like.opt_state), (header or {}).get("opt_state")
        if saved is not None and saved != mine:
            return ValueError(
                f"fnlit.restore: the checkpoint {path} does not fit the state you restore into (another optimizer): "
                f"{saved} in the checkpoint, {mine} in the state ({where}). Restore into a state created "
                "with the optimizer that was saved; to go on with another optimizer, restore into such a state, then "
                "state.replace(tx=new_tx, opt_state=new_tx.init(state.params)); or load the weights alone with "
                "fnlit.load_module(path, module)."
            )
        if saved is None:  # a file of an fnlit that did not record it
            where = f"{where}; the state's optimizer state is {mine}"
    if at.startswith("scaler[") and isinstance(like, TrainState):  # a loss scaler in one only (float16 <-> bfloat16)
        return ValueError(
            f"fnlit.restore: the checkpoint {path} does not fit the state you restore into (a loss scaler in one "
            f"and not the other): {where} (expected: the state; got: the checkpoint). Create the state with "
            "TrainState.create(..., loss_scale=...) as the saved one was: loss_scale='dynamic' for "
            "fnlit.amp(dtype=torch.float16), none for bfloat16 or float32."
        )
    return ValueError(
        f"fnlit.restore: the checkpoint {path} does not fit the state you restore into (another model or "
        f"optimizer?): {where} (expected: the state; got: the checkpoint). Restore into a state built the "
        "same way as the one that was saved."
    )


def _dtensor_class() -> type | None:
    """DTensor, if something has imported it (a sharded state has): importing it costs ~1 s, so fnlit does not."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def _distribute(v: torch.Tensor, like: Any) -> torch.Tensor:
    """``v`` sharded as the DTensor ``like``: each rank slices its shard out of its own copy, without
    communication (torch >= 2.6); older torch scatters rank 0's copy, a collective, which is fine as every
    rank restores the same file at the same point."""
    from torch.distributed.tensor import distribute_tensor

    local = {"src_data_rank": None} if "src_data_rank" in inspect.signature(distribute_tensor).parameters else {}
    return distribute_tensor(v.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements, **local)


def holds_number(t: Any) -> bool:
    """Whether the tensor ``t`` and a number saved in its place (or the other way round) stand for each other
    (:func:`_as_like`): a 0-d float tensor, or an ensemble's stacked ``(n,)`` one."""
    return isinstance(t, torch.Tensor) and t.dim() <= 1 and t.is_floating_point()


def _as_like(leaf: Any, v: Any) -> Any:
    """A hyperparameter saved as a number where ``leaf`` is a 0-d float tensor, or the other way round, in
    ``leaf``'s form: a number assigned to ``hyperparams`` (optax's idiom) is a tensor after the next update, so a
    checkpoint written in between holds the number. In an ensemble's stacked state the tensor is ``(n,)``: the number
    is every member's value (a tensor whose members differ stays a tensor, and the mismatch is reported)."""
    if is_real(v) and holds_number(leaf):
        return torch.full_like(leaf, v)
    if is_real(leaf) and holds_number(v) and v.numel():
        values = v.reshape(-1).tolist()
        if all(x == values[0] or (math.isnan(x) and math.isnan(values[0])) for x in values):
            try:  # the number like's type holds: 0.5 (or inf, NaN) saved where like has an int stays as saved
                cast = type(leaf)(values[0])
            except (OverflowError, ValueError):
                return values[0]
            return cast if float(cast) == values[0] or math.isnan(values[0]) else values[0]
    return v


def fill_like(like: S, values: dict[str, Any], path: Path, header: dict[str, Any] | None = None) -> S:
    """``like`` with its leaves replaced by the checkpoint's, on like's devices and dtypes (``header``, the
    checkpoint's, names the saved optimizer state's type in a mismatch)."""
    from .transforms.donate import check_not_donated

    check_not_donated(like)  # the donation error, not a mismatch with the checkpoint
    paths, leaves, treedef = _tree.tree_flatten_with_path(like)
    meta = next((p for p, leaf in zip(paths, leaves) if isinstance(leaf, torch.Tensor) and leaf.is_meta), None)
    if meta is not None:  # restored "on like's devices", the checkpoint's values would be dropped
        raise ValueError(
            f"fnlit.restore: the state you restore {path} into has a tensor on the meta device at {meta}, which "
            "cannot hold the checkpoint's values. Restore into a state on a real device: build the module, "
            "module.to_empty(device=...) (no initialisation needed, every value is replaced), and create the "
            "state from it."
        )
    if paths != list(values):
        missing = next((p for p in paths if p not in values), None)
        if missing is not None:
            leaf = leaves[paths.index(missing)]
            raise _mismatch(path, f"at {missing}: expected {_describe(leaf)}, got nothing (the checkpoint has no {missing})",
                            missing, like, values, header)
        extra = next((p for p in values if p not in paths), None)
        if extra is not None:
            raise _mismatch(path, f"at {extra}: expected nothing (the state has no {extra}), got {_describe(values[extra])}",
                            extra, like, values, header)
        raise _mismatch(path, f"the same paths in another order: expected {paths[:6]}, got {list(values)[:6]}")
    given = [_as_like(leaf, values[p]) for p, leaf in zip(paths, leaves)]
    where = _tree.first_mismatch(like, _tree.tree_unflatten(treedef, given))
    if where is not None:
        at = next((p for p in paths if where.startswith(f"at {p}:")), "")
        raise _mismatch(path, where, at, like, values, header)
    out = []
    dtensor = _dtensor_class()
    for leaf, v in zip(leaves, given):
        if dtensor is not None and isinstance(leaf, dtensor):
            v = _distribute(v, leaf)  # a sharded `like` (fnlit.shard_state): every rank keeps its own shard
        elif isinstance(leaf, torch.Tensor):
            v = v.to(device=leaf.device, dtype=leaf.dtype)
            if plain_subclass(leaf) and not isinstance(leaf, nn.Parameter):  # stored plain (encode): like's type back
                v = v.as_subclass(type(leaf))
        out.append(v)
    return _tree.tree_unflatten(treedef, out)


def load_into(module: M, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], source: str,
              noun: str = "the checkpoint") -> M:
    """Copies ``params`` and ``buffers`` into ``module``'s own tensors; ``source`` names where they come from in an
    error ("the checkpoint PATH"), ``noun`` in short ("the checkpoint", "the state")."""
    from . import random as _random

    # Under fnlit.random's lock, as apply's swaps: another thread's eager backward holds its step's tensors in the
    # module until it ends; the module's own, which it saved, are the ones read and written, its step's left alone.
    with _random._LOCK:
        return _load_into(module, params, buffers, source, noun)


def _load_into(module: M, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], source: str,
               noun: str) -> M:
    """:func:`load_into`, under the lock."""
    from .functional import own_tensors, set_own_mode

    given = {**params, **buffers}
    named_params, named_buffers = own_tensors(module)
    own = {n: t for n, t in [*named_params, *named_buffers]}  # tied weights: once, first name
    missing = [n for n in own if n not in given]
    extra = [n for n in given if n not in own]
    if missing or extra:
        raise ValueError(
            f"{source} does not fit the {type(module).__name__}: missing {missing[:5]}, unexpected {extra[:5]}. "
            "Pass a module built like the one that was trained."
        )
    for n, t in own.items():
        if given[n].shape != t.shape:
            raise ValueError(f"{source} does not fit the {type(module).__name__}: at {n}: the module has shape "
                             f"{tuple(t.shape)}, {noun} {tuple(given[n].shape)}.")
    meta = next((n for n, t in own.items() if t.is_meta), None)
    if meta is not None:  # copy_ into a meta tensor does nothing: the module would fail at its first forward
        raise ValueError(
            f"{source} cannot be loaded into the {type(module).__name__}: its tensor {meta} is on the meta device, "
            "which holds no values (the copy would do nothing). Call module.to_empty(device=...) first (no "
            "initialisation needed, every value is replaced), or pass a module built on a real device."
        )
    # Copied by name into the module's own tensors, not through load_state_dict: a module whose state_dict hooks
    # rewrite an entry (a weight saved transposed, transposed back on load) would get its own untrained value
    # back for it, and non-persistent buffers are not in the state dict at all.
    with torch.no_grad():
        for n, t in own.items():
            t.copy_(given[n])
    set_own_mode(module, False)  # module.eval(); a flag a backward in flight set: at its end
    return module


def json_checked(what: str, value: Any, who: str = "fnlit.save") -> Any:
    """Returns ``value`` if it can be stored in the JSON header, else raises a TypeError naming ``what``.

    A dict key that is not a string is refused too: ``json.dumps`` would write ``{0: "cat"}`` as ``{"0": "cat"}``
    and ``{3: a, "3": b}`` as one entry, so what came back would not be what was saved.
    """
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{who} stores {what} as JSON, but {value!r} is not JSON-serialisable ({e}). "
            "Pass numbers, strings, bools, None, lists and dicts of them."
        ) from None
    where = _non_string_key(value, "")
    if where is not None:
        path, key = where
        raise TypeError(
            f"{who} stores {what} as JSON, whose dict keys are strings, but {what}{path} has the key {key!r} "
            f"({type(key).__name__}): it would come back as {str(key) if not isinstance(key, bool) else str(key).lower()!r}"
            " (and two keys such as 3 and '3' as one). Use string keys (e.g. str(k)), and convert back when loading."
        )
    return value


def _non_string_key(value: Any, path: str) -> tuple[str, Any] | None:
    """The path and key of the first dict key in ``value`` that is not a string, or None."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return path, k
            found = _non_string_key(v, f"{path}[{k!r}]")
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _non_string_key(v, f"{path}[{i}]")
            if found is not None:
                return found
    return None


# The position's tensors (callbacks' states: EMA's average) are stored with the state's, under numbered paths
# starting with this and a "/" (a state's tree path never has one there); the header's position names each in
# its place.
_POSITION = "@position"
_TENSOR_REF = "__fnlit_tensor__"


def _pull_tensors(value: Any, found: dict[str, torch.Tensor]) -> Any:
    """``value`` (the position) with each tensor replaced by a numbered reference (``@position/3``: names built
    from its keys could collide, ``{"a.b": x}`` beside ``{"a": {"b": y}}``); the tensors go to ``found``."""
    if isinstance(value, torch.Tensor):
        ref = f"{_POSITION}/{len(found)}"
        found[ref] = value
        return {_TENSOR_REF: ref}
    if isinstance(value, dict):
        return {k: _pull_tensors(v, found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_pull_tensors(v, found) for v in value]
    return value


def _is_position_path(p: str) -> bool:
    """Whether a stored path is one of the position's tensors (``@position/3``; before: ``@position.cb.x[0]``),
    not a state's (whose keys may start with the same letters: ``@position_ids``)."""
    return p.startswith(_POSITION) and p[len(_POSITION) : len(_POSITION) + 1] in ("/", ".", "[")


def _push_tensors(value: Any, found: dict[str, Any]) -> Any:
    """The inverse of :func:`_pull_tensors`. Raises KeyError for a reference to a tensor not in the file."""
    if isinstance(value, dict):
        if len(value) == 1 and _TENSOR_REF in value:
            return found[value[_TENSOR_REF]]
        return {k: _push_tensors(v, found) for k, v in value.items()}
    if isinstance(value, list):
        return [_push_tensors(v, found) for v in value]
    return value


def is_sharded(tree: Any) -> bool:
    """Whether ``tree`` holds DTensors (a state made by :func:`fnlit.shard_state`)."""
    dtensor = _dtensor_class()
    return dtensor is not None and any(isinstance(t, dtensor) for t in _tree.tree_leaves(tree))


def full_tensors(tree: Any) -> Any:
    """``tree`` with every DTensor gathered into its full tensor: a collective when there are DTensors
    (every rank must call it, on the same tree structure); otherwise ``tree`` itself."""
    if not is_sharded(tree):
        return tree
    dtensor = _dtensor_class()
    return _tree.tree_map(lambda t: t.full_tensor() if isinstance(t, dtensor) else t, tree)


def common_step(state: Any) -> int | None:
    """``state.step`` as an int; for an ensemble (stacked states: steps of shape ``(n,)``) the step its
    members share. None without a step tensor, or when the members' steps differ."""
    step = getattr(state, "step", None)
    if isinstance(step, int) and not isinstance(step, bool):  # a state of one's own counting in Python
        return step
    if not isinstance(step, torch.Tensor) or step.numel() == 0:
        return None
    if step.dim() == 0:
        return int(step)  # a CPU tensor: no device sync
    flat = step.detach().reshape(-1)
    return int(flat[0]) if bool((flat == flat[0]).all()) else None


def check_fields(state: Any, who: str = "fnlit.save") -> None:
    """Raises a TypeError naming the field if ``state`` is a TrainState whose ``params`` or ``buffers`` is not a dict
    (a list of tensors, None): a checkpoint records their names, which :func:`fnlit.load_module` loads by."""
    from .state import TrainState
    from .transforms.donate import check_not_donated

    if not isinstance(state, TrainState):
        return
    check_not_donated(state)  # the donation error, not "got Donated" (a donated state's fields are markers)
    for name in ("params", "buffers"):
        value = getattr(state, name)
        if not isinstance(value, Mapping):
            raise TypeError(
                f"{who} expected state.{name} to be a dict name -> tensor (as TrainState.create makes it), got "
                f"{type(value).__name__} instead. Keep the module's names as its keys "
                f"(state.replace({name}=dict(zip(names, values))); {{}} for none)."
            )


def check_paths(state: Any, position: Position | None) -> None:
    """:func:`check_fields` of ``state``, and :func:`check_unique_paths` of the paths :func:`write_state` keys a file's
    tensors by (the state's leaves', the position's tensors' references). Its callers run it on every rank before rank
    0 alone writes: an error on rank 0 alone would leave the others waiting in their next collective."""
    check_fields(state)
    extra: dict[str, torch.Tensor] = {}
    _pull_tensors(position, extra)
    check_unique_paths(_tree.tree_flatten_with_path(state)[0] + list(extra))


def write_state(path: Path, state: Any, position: Position | None, metrics: dict[str, float] | None, meta: dict[str, Any],
                run: str | None = None, abandoned: list[tuple[int, int]] | None = None) -> int:
    """Writes the file (rank 0 only; a sharded state is gathered on every rank first); returns its ``saved_at_ns``.
    ``run`` names the training run (a Checkpointer's) the file belongs to; ``abandoned``, the ``(after, until)``
    windows of ``saved_at_ns`` in which that run's files belong to a history its resumes from earlier files left."""
    for key, value in meta.items():
        json_checked(f"the metadata {key}=", value)
    # Before anything that can differ between ranks: the gathers are collectives every rank takes part in.
    state, position = full_tensors(state), full_tensors(position)
    extra: dict[str, torch.Tensor] = {}
    position = _pull_tensors(position, extra)
    # (another pytree with such fields, a NamedTuple's list of params, is stored as any pytree: no names to load by)
    named = isinstance(getattr(state, "params", None), Mapping) and isinstance(getattr(state, "buffers", None), Mapping)
    header = {
        "saved_at_ns": time.time_ns(),
        "step": common_step(state),
        "position": json_checked("position", position),
        "metrics": json_checked("metrics", metrics),
        "meta": meta,
        "params": list(state.params) if named else None,  # None: not a TrainState's (load_module)
        "buffers": list(state.buffers) if named else None,
        "opt_state": opt_state_kind(state.opt_state) if hasattr(state, "opt_state") else None,  # (named in a mismatch)
    }
    if run is not None:
        header["run"] = run
    if abandoned:
        header["abandoned"] = [[int(a), int(b)] for a, b in abandoned]
    paths, leaves, _ = _tree.tree_flatten_with_path(state)
    if _dist.is_main():
        payload = encode(paths + list(extra), leaves + list(extra.values()), header)
        atomic_write(path, lambda f: torch.save(payload, f))
    return header["saved_at_ns"]


def read_header(path: Path) -> dict[str, Any] | None:
    """The header of a checkpoint file without reading its tensors; None if the file cannot be read."""
    try:
        return decode(path, verify=False, mmap=True)[0]
    except (CheckpointError, OSError):
        return None


def is_foreign(path: Path) -> bool:
    """Whether ``path`` holds a checkpoint that fnlit did not write: a torch file without fnlit's header
    (Lightning's, a plain state_dict) or one whose pickle holds more than tensors. False for no file, an fnlit
    file, and a file that cannot be read at all (truncated or corrupt)."""
    try:
        payload = _load(path, True)
    except UnsafeCheckpointError:
        return True
    except (CheckpointError, OSError):
        return False
    return not (isinstance(payload, dict) and payload.get("format") == FORMAT)


def newest_first(folder: Path) -> list[Path]:
    """The checkpoint files of ``folder``, most recently written first (one name per file: ``last.ckpt``
    and the step file it links to are the same inode)."""
    if not folder.is_dir():
        return []
    seen: dict[tuple[int, int], tuple[int, Path]] = {}
    for p in folder.iterdir():
        if not (STEP_FILE.match(p.name) or p.name == LAST):
            continue
        header = read_header(p)
        try:
            st = p.stat()
        except FileNotFoundError:  # removed meanwhile
            continue
        when = header["saved_at_ns"] if header else st.st_mtime_ns
        key = (st.st_dev, st.st_ino)
        if key not in seen or p.name != LAST:
            seen[key] = (when, p)
    return [p for _, p in sorted(seen.values(), key=lambda t: t[0], reverse=True)]
