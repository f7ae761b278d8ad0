"""Sharded checkpoints of a :func:`fnlit.shard_state` state, with ``torch.distributed.checkpoint`` (DCP).

* :func:`save_sharded`: every rank writes its own shards (DCP's ``FileSystemWriter``: one file per rank
  plus ``.metadata``), into a temporary directory that rank 0 renames into place once all ranks have
  finished, so a crash mid-save never leaves a half-written checkpoint under the target name.
* :func:`restore_sharded`: reads a checkpoint written on N ranks into a state sharded on M ranks (DCP
  reshards: each rank reads only the pieces of its own shards), or, without a process group, into a
  plain single-process state (consolidation).

The state dict is keyed by tree paths (``params['0.weight']``, ``opt_state[1].mu['0.weight']``...), and
a small ``fnlit.json`` beside the shards records every path's shape and dtype, the world size and your
metadata; restoring checks it against the state you restore into and names the first path that differs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from . import tree as _tree

__all__ = ["save_sharded", "restore_sharded", "read_sharded_meta"]

S = TypeVar("S")
META_FILE = "fnlit.json"
FORMAT = "fnlit-sharded-1"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """Silences DCP's warning that it runs in one process without a process group (when that is our intent)."""
    with warnings.catch_warnings():
        if not _distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _describe(tree: Any) -> tuple[list[str], list[Any], dict[str, list[Any]]]:
    paths, leaves, _ = _tree.tree_flatten_with_path(tree)
    for p, t in zip(paths, leaves):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"save_sharded expected a state whose leaves are all tensors, got {type(t).__name__} at {p}. "
                "Keep non-tensor values out of the state (pass them as metadata: save_sharded(dir, state, epoch=3))."
            )
    shapes = {p: [list(t.shape), str(t.dtype).removeprefix("torch.")] for p, t in zip(paths, leaves)}
    return paths, leaves, shapes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_sharded(directory: str | os.PathLike[str], state: Any, **meta: Any) -> Path:
    """Writes ``state`` to ``directory``, each rank its own shards, atomically; a collective call.

    Every rank writes into ``.<name>.tmp`` next to the target; after a barrier rank 0 writes
    ``fnlit.json``, fsyncs, and renames the directory into place (an existing checkpoint of that name is
    replaced only once the new one is complete), then fsyncs the parent. Plain tensors (step, RNG key,
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
        TypeError: for a non-tensor leaf in the state, or metadata that is not JSON-serialisable.

    Example:
        >>> import tempfile, torch, fnlit
        >>> from fnlit.sharded_checkpoint import read_sharded_meta, restore_sharded, save_sharded
        >>> state = fnlit.TrainState.create(torch.nn.Linear(3, 2), fnlit.optim.adamw(1e-3), seed=0)
        >>> d = save_sharded(tempfile.mkdtemp() + "/ckpt", state, epoch=1)
        >>> read_sharded_meta(d)["meta"], int(restore_sharded(d, like=state).step)
        ({'epoch': 1}, 0)
    """
    target = Path(directory)
    tmp = target.parent / f".{target.name}.tmp"
    old = target.parent / f".{target.name}.old"
    paths, leaves, shapes = _describe(state)
    try:
        meta_text = json.dumps(
            {"format": FORMAT, "world_size": dist.get_world_size() if _distributed() else 1,
             "tensors": shapes, "meta": meta},
            indent=1,
        )
    except TypeError as e:
        raise TypeError(f"save_sharded expected JSON-serialisable metadata, got {sorted(meta)}: {e}.") from None
    rank0 = not _distributed() or dist.get_rank() == 0
    if rank0:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save that crashed earlier
        tmp.mkdir()
    _barrier()
    with _quiet_single_process():
        writer = dcp.FileSystemWriter(tmp, sync_files=True)
        dcp.save(dict(zip(paths, leaves)), storage_writer=writer, no_dist=not _distributed())
    _barrier()  # every rank's shards are on disk (DCP fsyncs each file)
    if rank0:
        with open(tmp / META_FILE, "w") as f:
            f.write(meta_text)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return target


def read_sharded_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's ``fnlit.json``: ``world_size``, ``tensors`` (path -> [shape, dtype]) and ``meta``.

    Raises:
        FileNotFoundError: if ``directory`` is not a sharded checkpoint written by :func:`save_sharded`.

    Example:
        >>> import tempfile, torch, fnlit
        >>> state = fnlit.TrainState.create(torch.nn.Linear(3, 2), fnlit.optim.sgd(0.1), seed=0)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     info = read_sharded_meta(save_sharded(d + "/ckpt", state, run="demo"))
        >>> info["world_size"], info["meta"], info["tensors"]["params['weight']"]
        (1, {'run': 'demo'}, [[2, 3], 'float32'])
    """
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"read_sharded_meta: {directory} is not a checkpoint written by fnlit.save_sharded (no {META_FILE} "
            "in it). Pass the directory save_sharded returned; fnlit.save's single-file checkpoints are read "
            "with fnlit.restore."
        )
    return json.loads(path.read_text())


def _check_like(directory: Path, saved: dict[str, list[Any]], shapes: dict[str, list[Any]]) -> None:
    missing = [p for p in shapes if p not in saved]
    extra = [p for p in saved if p not in shapes]
    if missing or extra:
        raise ValueError(
            f"restore_sharded: the checkpoint {directory} does not have the structure of `like`: "
            + (f"it lacks {missing[:3]}; " if missing else "")
            + (f"it has {extra[:3]}, which `like` lacks; " if extra else "")
            + "restore into a state built the same way (same module, optimizer and loss_scale)."
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

    Raises:
        FileNotFoundError: if ``directory`` is not a sharded checkpoint.
        ValueError: naming the first tree path whose shape or dtype differs from ``like``, or that is missing.

    Example:
        >>> # on any number of ranks: state = fnlit.restore_sharded("ckpt", like=fnlit.shard_state(fresh))
    """
    directory = Path(directory)
    info = read_sharded_meta(directory)
    paths, leaves, shapes = _describe(like)
    _check_like(directory, info["tensors"], shapes)
    fresh = [t.detach().clone() for t in leaves]  # DCP loads in place: into copies, never into `like`
    state_dict = dict(zip(paths, fresh))
    if _distributed():
        dcp.load(state_dict, storage_reader=dcp.FileSystemReader(directory))
    else:
        if any(isinstance(t, DTensor) for t in fresh):
            raise ValueError(
                "restore_sharded got a `like` of DTensors but no process group: to consolidate a checkpoint "
                "in one process, pass a plain state (TrainState.create(module, tx, seed=...))."
            )
        with _quiet_single_process():
            dcp.load(state_dict, storage_reader=dcp.FileSystemReader(directory), no_dist=True)
    treedef = _tree.tree_structure(like)
    return _tree.tree_unflatten(treedef, [state_dict[p] for p in paths])
