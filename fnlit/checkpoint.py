"""Checkpoints: save and restore a whole TrainState exactly, atomically, without running code from files.

* :func:`save` / :func:`restore`: every tensor of the state (params, buffers, optimizer and loss-scale
  state, step, RNG key) by tree path, plus the driver's position and your metadata, in one file.
  Restoring checks the file against the state you restore into and names the first path that differs.
* :class:`Checkpointer`: what :func:`fnlit.fit` uses: saves every N steps/epochs, keeps the last k and
  the best k by a metric, maintains ``last.ckpt``, saves on preemption, and resumes from ``"last"`` (or
  ``"best"``).
* :func:`export` / :func:`load_module`: trained weights into an ``nn.Module`` for inference.

Files are written atomically (temporary file, fsync, rename, fsync of the folder) and read with
``torch.load(weights_only=True)``; see :mod:`fnlit._checkpoint_io` for the format.

Example:
    >>> import os, tempfile, torch, fnlit
    >>> state = fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.adam(1e-3), seed=0)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     back = fnlit.restore(fnlit.save(os.path.join(d, "a.ckpt"), state), like=state)
    >>> fnlit.testing.assert_trees_close(back, state)  # every tensor, optimizer state and RNG key included
"""

from __future__ import annotations

import math
import os
import secrets
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as torch_dist
from torch import Tensor, nn

from . import distributed as _dist
from . import tree as _tree
from ._checkpoint_io import (
    LAST,
    STEP_FILE,
    CheckpointError,
    Position,
    UnsafeCheckpointError,
    check_fields,
    check_paths,
    common_step,
    decode,
    fill_like,
    full_tensors,
    is_foreign,
    is_sharded,
    json_checked,
    link_or_copy,
    load_into,
    newest_first,
    read_header,
    remove_stale_temps,
    write_state,
)

__all__ = ["save", "restore", "read_info", "export", "load_module", "Checkpointer", "CheckpointInfo",
           "CheckpointError", "UnsafeCheckpointError"]

S = TypeVar("S")
T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)


def _identity(path: Path) -> tuple[int, int, int]:
    """A file's inode, size and modification time: whether it is still the one that was written."""
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def save(path: str | os.PathLike[str], state: Any, *, position: Position | None = None,
         metrics: dict[str, float] | None = None, **meta: Any) -> Path:
    """Writes ``state`` (every tensor, by tree path), the driver ``position`` and ``meta`` to one file.

    The write is atomic: a crash at any moment leaves the previous file at ``path`` (if any) intact.
    Tensors are stored compactly (a slice of a larger buffer saves only its own bytes) and on the CPU.
    Under ``torch.distributed`` only rank 0 writes; the call is a no-op on the other ranks, except for a
    sharded state (:func:`fnlit.shard_state`): its shards are gathered into full tensors first, a
    collective, so call ``save`` on every rank (the others return once they have sent their shards: call
    ``fnlit.distributed.barrier()`` before reading the file there). The file holds the whole state, which
    :func:`restore` reads into a plain ``like`` or one sharded on any number of ranks (each rank reads the
    whole file: for a model too large for that, use :func:`fnlit.save_sharded`).

    Args:
        path: the file to write (its folder must exist).
        state: a :class:`fnlit.TrainState` (or any pytree of tensors).
        position: the driver's place in the data, ``{"epoch", "batch", "seed", "steps"}``, and the callbacks'
            states (``"callbacks"``): JSON values and tensors (stored with the state's, read back on the CPU).
        metrics: metric values to record with the checkpoint (the Checkpointer's best-k uses them).
        **meta: JSON-able metadata, e.g. hyperparameters; :func:`read_info` returns it.

    Returns:
        ``path`` as a Path.

    Raises:
        CheckpointError: naming ``path``, if it cannot be written (missing or unwritable folder, full disk).
        TypeError: if ``meta``, ``position`` (apart from its tensors) or ``metrics`` are not JSON-serialisable (a dict
            key that is not a string included: JSON would turn it into one), or a leaf is neither
            a tensor nor a JSON value (int, float, bool, str), or is a sparse, meta or nested tensor or of a tensor
            subclass with its own ``__torch_dispatch__``; before anything is written. (A subclass without one,
            ``x.as_subclass(Tagged)``, is stored as its plain data; :func:`restore` gives ``like``'s subclass back.)
            Also, naming the field, if a TrainState's ``params`` or ``buffers`` is not a dict (a list, None).
        ValueError: if two leaves of the state have the same path text (a dict key ``"a['b']"`` beside
            ``{"a": {"b": ...}}``), naming it; on every rank, before anything is written.

    Example:
        >>> import tempfile, os, torch, fnlit
        >>> state = fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.adamw(1e-3), seed=0)
        >>> path = os.path.join(tempfile.mkdtemp(), "model.ckpt")
        >>> _ = save(path, state, lr=1e-3)
        >>> restored = restore(path, like=state)
        >>> torch.equal(restored.params["weight"], state.params["weight"]), read_info(path).meta
        (True, {'lr': 0.001})
    """
    check_paths(state, position)  # on every rank: rank 0 alone writes
    write_state(Path(path), state, position, metrics, meta)
    return Path(path)


def restore(path: str | os.PathLike[str], like: S) -> S:
    """Reads the state saved at ``path`` into the structure of ``like``, on like's devices and dtypes.

    ``like`` is a state built the same way as the saved one (typically the freshly created state); its
    static parts (the optimizer) are kept, every tensor is replaced; a DTensor of ``like`` (a state
    sharded by :func:`fnlit.shard_state`) gets its own shard of the saved tensor. The file is loaded
    with ``torch.load(weights_only=True)`` and every tensor's checksum is verified.

    The optimizer state's tensors are replaced too, its ``hyperparams`` among them: the learning rate and weight
    decay are the saved ones, not those ``like``'s optimizer was built with (as ``torch.optim``'s
    ``load_state_dict`` brings back each group's ``lr``), except a learning rate schedule's, written in at every
    update, and the decay of an optimizer built with the Python number ``weight_decay=0``, which reads none. To go
    on with other values, replace them in the restored ``opt_state``: see :meth:`fnlit.TrainState.replace`.

    Args:
        path: a file written by :func:`save` (or a :class:`Checkpointer`).
        like: the state to restore into.

    Returns:
        A new state of like's type.

    Raises:
        FileNotFoundError: if there is no file at ``path``.
        CheckpointError: naming the file, if it is truncated, corrupt or not an fnlit checkpoint.
        UnsafeCheckpointError: if its pickle asks for anything but tensors (it could run code).
        ValueError: naming the first tree path and both shapes, if the checkpoint holds another model (both
            optimizer state types, for another optimizer; the tensor, for one frozen in one and trainable in the
            other); naming the path, if ``like`` has a tensor on the meta device (it could not hold the saved values).

    Example:
        >>> import tempfile, os, torch, fnlit
        >>> state = fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(0.1), seed=0)
        >>> path = save(os.path.join(tempfile.mkdtemp(), "a.ckpt"), state)
        >>> other = fnlit.TrainState.create(torch.nn.Linear(3, 1), fnlit.optim.sgd(0.1), seed=0)
        >>> restore(path, like=other)
        Traceback (most recent call last):
        ...
        ValueError: fnlit.restore: the checkpoint ... at params['weight']: expected tensor of shape (1, 3) ...
    """
    header, values = decode(path)
    return fill_like(like, values, Path(path), header)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about itself (read without loading its tensors).

    Attributes:
        path: the file.
        step: ``state.step`` when saved.
        position: the driver's position ``{"epoch", "batch", "seed", "steps"}``, or None.
        metrics: metrics recorded with it (validation metrics for best-k checkpoints), or None.
        meta: the user metadata passed to :func:`save` / :class:`Checkpointer`.
        saved_at_ns: wall-clock time of the save (``time.time_ns()``).
        paths: the tree paths of the stored leaves.

    Example:
        >>> import os, tempfile, torch, fnlit
        >>> state = fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(0.1), seed=0)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     info = read_info(save(os.path.join(d, "a.ckpt"), state, metrics={"val/loss": 0.5}, run="demo"))
        >>> info.step, info.metrics, info.meta, info.paths[:2]
        (0, {'val/loss': 0.5}, {'run': 'demo'}, ['step', "params['bias']"])
    """

    path: Path
    step: int | None
    position: Position | None
    metrics: dict[str, float] | None
    meta: dict[str, Any]
    saved_at_ns: int
    paths: list[str] = field(repr=False)


def read_info(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Reads a checkpoint's header (step, position, metrics, metadata) without reading its tensors.

    Raises:
        FileNotFoundError, CheckpointError, UnsafeCheckpointError: as :func:`restore`.

    Example:
        >>> import tempfile, os, torch, fnlit
        >>> state = fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(0.1), seed=0)
        >>> path = save(os.path.join(tempfile.mkdtemp(), "a.ckpt"), state, position={"epoch": 1, "batch": 3, "seed": 0})
        >>> read_info(path).position
        {'epoch': 1, 'batch': 3, 'seed': 0}
    """
    header, values = decode(path, verify=False, mmap=True)
    return CheckpointInfo(Path(path), header.get("step"), header.get("position"), header.get("metrics"),
                          header.get("meta") or {}, header["saved_at_ns"], list(values))


def export(state: Any, module: M) -> M:
    """Copies the state's params and buffers into ``module`` (in place) and returns it in eval mode.

    The module keeps its own devices and dtypes; afterwards ``module.state_dict()`` is a plain PyTorch
    state dict of the trained weights. The inverse is ``TrainState.create(module, tx, seed=...)``.
    A sharded state (:func:`fnlit.shard_state`) has its params and buffers gathered into full tensors first,
    as :func:`save` does: a collective, so call ``export`` on every rank (each rank's module gets the whole model).

    Raises:
        ValueError: if the module's parameter/buffer names or shapes differ from the state's, or it has a tensor
            on the meta device (it could not hold the values: ``module.to_empty(device=...)`` it first).
        TypeError: naming the field, if the state's ``params`` or ``buffers`` is not a dict (a list, None).

    Example:
        >>> import torch, fnlit
        >>> state = fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(0.1), seed=0)
        >>> state = state.replace(params={k: v + 1 for k, v in state.params.items()})
        >>> model = export(state, torch.nn.Linear(2, 1))
        >>> torch.equal(model.weight, state.params["weight"]), model.training
        (True, False)
    """
    check_fields(state, "fnlit.export")  # (the same on every rank: before the gathers)
    # (a sharded state: the gathers are collectives every rank takes part in, before any check that could raise)
    return load_into(module, full_tensors(state.params), full_tensors(state.buffers), "the state", "the state")


def load_module(path: str | os.PathLike[str], module: M) -> M:
    """Loads the params and buffers of a checkpoint file into ``module`` for inference (eval mode).

    The one-liner for Lightning's ``Model.load_from_checkpoint``: no optimizer, no TrainState needed.

    Raises:
        FileNotFoundError, CheckpointError, UnsafeCheckpointError: as :func:`restore`.
        ValueError: if the module's names or shapes differ from the checkpoint's, or it has a tensor on the meta
            device (it could not hold the values: ``module.to_empty(device=...)`` it first).

    Example:
        >>> import tempfile, os, torch, fnlit
        >>> state = fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(0.1), seed=0)
        >>> path = save(os.path.join(tempfile.mkdtemp(), "a.ckpt"), state)
        >>> model = load_module(path, torch.nn.Linear(2, 1))
        >>> torch.equal(model.bias, state.params["bias"])
        True
    """
    header, values = decode(path)
    if header.get("params") is None or (not header["params"] and not any(p.startswith("params") for p in values)):
        # (None: a state without params, saved by this fnlit; []: by an older one, unless the state had no params)
        raise CheckpointError(
            f"{path} holds no TrainState params/buffers (its paths: {list(values)[:5]}); it was not saved from a "
            "TrainState. Restore it with fnlit.restore(path, like=...), or load a state dict into the module yourself."
        )
    try:
        params = {n: values[_tree.keystr(("params", n))] for n in header["params"]}
        buffers = {n: values[_tree.keystr(("buffers", n))] for n in header["buffers"]}
    except KeyError as e:
        raise CheckpointError(f"{path} holds no TrainState params/buffers ({e} is missing); it was not saved from a TrainState.") from None
    return load_into(module, params, buffers, f"the checkpoint {path}")


@dataclass
class _Record:
    path: Path
    saved_at_ns: int
    metrics: dict[str, float] | None
    run: str | None = None  # the run that wrote it (None: a file of an fnlit before runs were recorded)


def _step(state: Any) -> int:
    """The step a checkpoint is named by; an ensemble's members (stacked steps) must share it."""
    from .transforms.donate import check_not_donated

    check_not_donated(state)  # the donation error, not "this TrainState has step=<donated>"
    step = common_step(state)
    if step is None:
        if not isinstance(getattr(state, "step", None), Tensor):
            raise TypeError(
                f"Checkpointer names each checkpoint by state.step, but this {type(state).__name__} has "
                + (f"step={state.step!r}" if hasattr(state, "step") else "no step")
                + ": save a TrainState (or a state with an int or 0-d tensor step), or use fnlit.save(path, state)."
            )
        got = state.step.tolist()
        raise ValueError(
            f"Checkpointer names each checkpoint by state.step and expected one step, got {got!r} instead. An "
            "ensemble's members must step together (fnlit.ensemble does); to keep states with different steps, "
            "save them with fnlit.save(path, state)."
        )
    return step


def _ref(state: Any) -> Callable[[], Any]:
    """A weak reference to ``state`` (a strong one for a type that takes none: a namedtuple state)."""
    try:
        return weakref.ref(state)
    except TypeError:
        return lambda: state


def _from_rank_0(value: T) -> T:
    """Rank 0's ``value`` (a picklable object) on every rank (a collective)."""
    if not _dist.is_initialized():
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[no-any-return]


def _positive(name: str, value: int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ValueError(
            f"Checkpointer expected {name} to be an int >= {0 if allow_zero else 1} or None, got {value!r} instead."
        )



def _where(position: Position | None) -> tuple[Any, ...] | None:
    """Where in the data a position stands: its epoch, batch, whether that batch's epoch-end validation ran, whether
    metrics wait to be logged, whether a finished run's last row logged them (a step saved before that row), and
    whether its epoch's end waits to be run (a second Ctrl-C cut it off)."""
    if not position:
        return None
    return (position.get("epoch"), position.get("batch"), bool(position.get("validated")), bool(position.get("log_pending")),
            position.get("log_tail") is not None, bool(position.get("epoch_end_pending")))

class Checkpointer:
    """Saves checkpoints during :func:`fnlit.fit` and finds the one to resume from.

    One file per checkpoint, ``<directory>/step=00000017.ckpt`` (written by :func:`save`, atomically),
    plus ``last.ckpt``, a hard link to the newest (a ``last.ckpt`` that fnlit did not write, Lightning's, is
    never replaced: a CheckpointError says so). Old files are removed only after the new one is
    safely on disk. Only rank 0 writes; every rank restores. A sharded state (``fnlit.shard``) is
    gathered into full tensors for each save, on every rank, and restored into each rank's shards. An
    ensemble's stacked state is named by the step its members share.

    Each file records the run that wrote it: a fresh run into a folder that holds another run's checkpoints
    ranks (``best_path``) and removes (``keep_last``/``keep_best``) only its own, with a warning; a resumed
    run goes on with the files of the run it restored, except those that run saved after the restored file
    (resumed from an earlier file: the history it abandons), which are kept but neither ranked nor removed, on
    every later resume of that branch too (its files record the histories it abandoned). One driven by hand,
    never started nor restored (as in the example below), ranks and removes every file of its folder; its
    files record a run of their own, so a resume from one of them goes on with them, as after ``start``.

    fit calls ``restore`` once (with its ``ckpt_path``; ``start`` instead for a run that restores
    nothing), then ``on_step`` after every step,
    ``on_validation`` after each validation, ``on_epoch_end`` and finally ``on_exit``. Each is cheap
    unless it saves: no host sync.

    ``before_save``, when not None, is called (on rank 0) right before each file is written. fit sets it,
    for as long as it runs, to flush its log writers (then to call a ``before_save`` set before, if any): the rows logged up to a checkpoint's step are in
    their files before the checkpoint is, so a process killed after the save (SIGKILL, the OOM killer)
    loses none of the rows its resumed run will not log again. If it raises, the file is still written,
    and the error raised after it.

    Args:
        directory: where the checkpoints go (created on the first save); ``~`` is expanded and a relative
            folder is made absolute here (``.directory``), so a later ``os.chdir`` does not move them.
        every_n_steps: save when ``state.step`` is a multiple of this.
        every_n_epochs: save after every this many completed epochs.
        keep_last: how many of the most recently written checkpoints to keep (None: all).
        monitor: a validation metric, named as fit logs it (``"val/loss"``); with it, the ``keep_best``
            best checkpoints are saved and kept.
        mode: ``"min"`` or ``"max"``: which values of ``monitor`` are better.
        keep_best: how many best-by-``monitor`` checkpoints to keep; None (with ``monitor`` only) keeps the
            checkpoint of every validation (Lightning's ``save_top_k=-1``) whose value is not NaN (a NaN value
            is never saved as a best), 0 none (``save_top_k=0``). Lightning's ``save_top_k=-1`` without
            ``monitor`` (every epoch's checkpoint, all kept) is ``every_n_epochs=1, keep_last=None``.
        save_last: save when fit finishes, and keep ``last.ckpt`` pointing at the newest checkpoint.
        **meta: JSON-able metadata (hyperparameters) stored in every checkpoint.

    Raises:
        ValueError: on a non-positive interval or ``keep_last`` (``keep_best`` may be 0), a negative
            ``keep_best`` (or, without ``monitor``, one above 1 or None), or a ``mode`` other than "min"/"max".
        TypeError: if ``meta`` is not JSON-serialisable (a dict key that is not a string included).

    Example:
        >>> import tempfile, torch, fnlit
        >>> state = fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(0.1), seed=0)
        >>> ckpt = Checkpointer(tempfile.mkdtemp(), every_n_steps=2, keep_last=2, lr=0.1)
        >>> for i in range(5):
        ...     state = state.replace(step=state.step + 1)
        ...     ckpt.on_step(state, {"epoch": 0, "batch": i + 1, "seed": 0})
        >>> sorted(p.name for p in ckpt.directory.iterdir())
        ['last.ckpt', 'step=00000002.ckpt', 'step=00000004.ckpt']
        >>> state, position = ckpt.restore("last", like=state)
        >>> int(state.step), position
        (4, {'epoch': 0, 'batch': 4, 'seed': 0})
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        keep_last: int | None = 1,
        monitor: str | None = None,
        mode: str = "min",
        keep_best: int | None = 1,
        save_last: bool = True,
        **meta: Any,
    ) -> None:
        _positive("every_n_steps", every_n_steps)
        _positive("every_n_epochs", every_n_epochs)
        _positive("keep_last", keep_last)
        _positive("keep_best", keep_best, allow_zero=True)
        if monitor is None and keep_best is None:  # accepted, it saved nothing per validation: only keep_last applied
            raise ValueError(
                "Checkpointer got keep_best=None (Lightning's save_top_k=-1) but no monitor: it keeps every "
                "validation's checkpoint by a monitored metric, and without one it would save none. Pass "
                "monitor='val/loss' (a validation metric), or, as Lightning's ModelCheckpoint(save_top_k=-1) without "
                "monitor (a checkpoint of every epoch, all kept): every_n_epochs=1, keep_last=None."
            )
        if monitor is None and keep_best not in (0, 1):  # (1, the default)
            raise ValueError(
                f"Checkpointer got keep_best={keep_best!r} but no monitor: there is no metric to rank checkpoints by "
                "(Lightning refuses save_top_k > 1 without monitor too). Pass monitor='val/loss' (a validation "
                "metric), or keep_last=N to keep the last N checkpoints."
            )
        if mode not in ("min", "max"):
            raise ValueError(f"Checkpointer expected mode='min' or mode='max', got {mode!r} instead.")
        for key, value in meta.items():
            json_checked(f"the metadata {key}=", value)
        # "~" expanded, a relative folder made absolute now: a later os.chdir does not move the checkpoints (as Lightning)
        self.directory = Path(os.path.abspath(Path(directory).expanduser()))
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.keep_last, self.keep_best = keep_last, keep_best
        self.monitor, self.mode, self.save_last, self.meta = monitor, mode, save_last, meta
        self._records: list[_Record] | None = None  # oldest first; read from the folder on the first save
        # Each step file's header by name, with the (inode, mtime, size) it was read at: a scan reads only new or
        # rewritten files (the ranks that write nothing scan at every best_path read).
        self._headers: dict[str, tuple[tuple[int, int, int], dict[str, Any] | None]] = {}
        # The state object last saved (or restored): not saved again. By identity, not by step: another attempt
        # at the same step (a retry after a crash) is another state, and is saved.
        self._saved: Callable[[], Any] | None = None
        self._saved_where: tuple[Any, ...] | None = None  # where in the data that save stands (see _where)
        # The state last validated, and its metrics: a save of that state (the step's periodic one) records them
        # in its file, so the file is ranked by them (another attempt at the step validates its own state).
        self._validated_of: tuple[Callable[[], Any], dict[str, float]] | None = None
        self._run: str | None = None  # this run's id (start, or the restored file's); None: every file is ours
        # The id a Checkpointer driven by hand (never started nor restored) writes into its files: it still ranks and
        # removes every file of the folder, and a resume from its files goes on with them.
        self._unstarted_run = secrets.token_hex(8)
        # After a restore: the saved_at_ns of the restored file, until rank 0's scan (still in restore) finds the files
        # of its run saved after it (a history the resumed run abandoned): kept, but neither ranked nor removed as this
        # run's. The windows (after, until] of saved_at_ns that hold such files, inherited from the restored file's
        # header plus this restore's, the same on every rank (rank 0's); written into every file the run saves, so a
        # later resume of the branch excludes them too.
        self._branch_at: int | None = None
        self._abandoned: list[tuple[int, int]] = []
        self.restored_from: Path | None = None  # the file the last restore read (None: it found none)
        self._last_written: tuple[int, int, int] | None = None  # last.ckpt as this object's last save left it
        self.before_save: Callable[[], None] | None = None  # see the class docstring; fit sets it while it runs
        # The step of the state this object's last fit ended with (on_exit), and that fit's run: a fit from that
        # state continues the run, whatever restore() read in between (a best checkpoint, to evaluate it).
        self._ended_at: int | None = None
        self._ended_run: str | None = None

    # ---- the calls fit makes ------------------------------------------------------------------------

    def start(self, state: Any = None) -> None:
        """A run that restores nothing begins (from ``state``); a collective under several processes.

        Training continued from the state this object's last run ended with (a second ``fit`` call on the
        state the first returned; again after that call crashed) is the same run: what was saved after that
        state (by a crashed attempt) is saved again. Otherwise checkpoints already in the
        folder (an earlier run's, or what this object saved for another run) are not this run's: they are
        not ranked for ``best_path`` nor removed by ``keep_last``/``keep_best`` (a warning says so, as
        Lightning warns of a folder that is not empty), and this run saves its own states, its last
        included. A resumed run (``restore``) goes on with the files of the run it restores.

        Raises:
            CheckpointError: with ``save_last``, if the folder's ``last.ckpt`` is not an fnlit checkpoint (another
                tool's, such as Lightning's): fnlit does not replace it. Move it away or use another folder. Also if
                ``directory``, or a folder above it, is a file: no checkpoint could be saved there.
        """
        self.restored_from = None
        if state is not None and self._ended_run is not None and _step(state) == self._ended_at:
            # (a crashed continuation's files after this step are replaced as this attempt saves its own states)
            self._run, self._records = self._ended_run, None
            self._saved_where = None  # its file stands where that run ended; this call's position starts afresh
            return
        self._saved, self._validated_of, self._ended_at, self._ended_run = None, None, None, None
        self._records, self._branch_at, self._abandoned = None, None, []  # read from the folder on the first save
        # One id on every rank (each ranks the files alike), and rank 0's finding of a file where the folder goes or
        # of a last.ckpt fnlit did not write: every rank raises, before any training, rather than rank 0 at the first save.
        main = _dist.is_main()
        self._run, blocked, foreign_last = _from_rank_0(
            (secrets.token_hex(8), main and self._file_in_the_way(), main and self.save_last and self._foreign_last())
        )
        if blocked:
            raise self._file_in_the_way_error(blocked)
        if foreign_last:
            raise self._foreign_last_error()
        if main and self.directory.is_dir():
            names = sorted(p.name for p in self.directory.glob("*.ckpt"))
            earlier = [n for n in names if STEP_FILE.match(n)]
            foreign = [n for n in names if not STEP_FILE.match(n) and n != LAST]  # (Lightning's epoch=0-step=5.ckpt)
            if earlier or foreign:
                warnings.warn(
                    f"Checkpointer folder {self.directory} already holds "
                    + (f"{len(earlier)} checkpoint(s) of another run (e.g. {earlier[-1]})" if earlier else "")
                    + (" and " if earlier and foreign else "")
                    + (f"{len(foreign)} .ckpt file(s) fnlit did not write (e.g. {foreign[0]})" if foreign else "")
                    + ": this fresh run keeps them but does not rank them for best_path or remove them; its own files "
                    "replace any at the same steps, and 'last' is the newest of all. Use a new folder per run to keep "
                    "runs apart, or pass ckpt_path='last' to resume.",
                    stacklevel=3,
                )

    def restore(self, ckpt_path: str | os.PathLike[str], like: S) -> tuple[S, Position | None]:
        """Restores ``like`` from ``ckpt_path``: a file, a folder, ``"last"`` (this Checkpointer's folder) or
        ``"best"`` (:attr:`best_path`, as the folder holds it now).

        For a folder or ``"last"``, the most recently written checkpoint that reads back intact is used;
        corrupt ones are skipped with a warning. If there is none at all, ``(like, None)`` comes back:
        the run starts from the beginning (the same command starts and resumes a job). ``"best"`` is
        the file :attr:`best_path` names: the run goes on from it, with that run's files.

        Returns:
            ``(state, position)``; ``position`` is the driver's ``{"epoch", "batch", "seed", "steps"}`` saved with
            the state, or None if the file has none.

        Raises:
            FileNotFoundError, CheckpointError, UnsafeCheckpointError, ValueError: as :func:`restore`,
                for a file path; CheckpointError if every checkpoint of the folder is corrupt, or the folder is
                a :func:`fnlit.save_sharded` checkpoint (read with :func:`fnlit.restore_sharded`);
                CheckpointError for ``"best"`` without ``monitor`` (or with ``keep_best=0``), or before any
                best checkpoint was saved; CheckpointError with ``save_last``, as :meth:`start`, if the folder's
                ``last.ckpt`` is not an fnlit checkpoint (another tool's), and if ``directory`` (or a folder above
                it) is a file: before any training, not at the first save.
        """
        self.restored_from = None
        if str(ckpt_path) == "best":
            ckpt_path = self._best_file()
        if str(ckpt_path) != "last" and not Path(ckpt_path).is_dir():
            return self._refuse_foreign_last(self._restore_file(Path(ckpt_path), like))
        folder = self.directory if str(ckpt_path) == "last" else Path(ckpt_path)
        if (folder / "fnlit.json").is_file():  # (sharded_checkpoint.META_FILE) not ours: training from step 0 loses it
            raise CheckpointError(
                f"{folder} is a sharded checkpoint (fnlit.save_sharded), which a Checkpointer does not read: restore "
                f"it with state = fnlit.restore_sharded({str(folder)!r}, like=state) and pass that state to fit "
                "(without ckpt_path)."
            )
        candidates = newest_first(folder)
        errors = []
        for path in candidates:
            try:
                restored = self._restore_file(path, like)
            except (CheckpointError, FileNotFoundError) as e:
                errors.append(str(e))
                warnings.warn(f"Skipping checkpoint {path}, which cannot be read: {e}", stacklevel=2)
            else:
                return self._refuse_foreign_last(restored)
        if errors:
            foreign = sum(is_foreign(p) for p in candidates)  # (another tool's last.ckpt): not called corrupt
            what = ", ".join(f"{n} {w}" for n, w in [(len(errors) - foreign, "corrupt"),
                                                     (foreign, "not an fnlit checkpoint")] if n)
            raise CheckpointError(f"no checkpoint in {folder} can be read ({what}): {errors}")
        foreign = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
        if foreign:  # (Lightning's epoch=0-step=5.ckpt): not silently a fresh run
            warnings.warn(
                f"{folder} holds no fnlit checkpoint (step=<N>.ckpt) but other .ckpt files ({foreign[:3]}): nothing "
                "to resume, the run starts from the beginning. A single file is restored by passing its path.",
                stacklevel=2,
            )
        self.start()  # nothing to resume: a run from the beginning
        return like, None

    def on_step(self, state: Any, position: Position) -> None:
        """Saves if ``state.step`` is a multiple of ``every_n_steps``."""
        if self._due(state):
            self._save_and_wait(state, position)

    def _due(self, state: Any) -> bool:
        """Whether :meth:`on_step` saves ``state``: fit builds the position (the callbacks' states, the log interval's
        metrics so far) only then, not at every step."""
        return (
            self.every_n_steps is not None and _step(state) % self.every_n_steps == 0 and not self._is_saved(state)
        )

    def on_validation(self, state: Any, position: Position, val_metrics: dict[str, float]) -> None:
        """Saves if ``val_metrics[monitor]`` is among the ``keep_best`` best so far (strictly better than
        the worst kept: on a tie, the earlier checkpoint is kept). Rank 0 decides; for a sharded state,
        every rank follows (a collective: gathering the shards for the save needs them all).

        An epoch-end validation of the step just saved (its batch's checkpoint comes first) saves that step
        again, validated: a resume from it would otherwise validate, and log, that step a second time.

        Raises:
            ValueError: if ``monitor`` is not among ``val_metrics``.
        """
        saved = self._save_if_best(state, position, val_metrics)
        if position and position.get("validated") and self._is_saved(state) and self._saved_where != _where(position):
            if not saved:  # (rank 0 writes; a sharded state's save is a collective, and every rank decides alike)
                self.save(state, position)
            self._saved_where = _where(position)

    def _save_if_best(self, state: Any, position: Position, val_metrics: dict[str, float]) -> bool:
        if self.monitor is None or self.keep_best == 0:
            return False
        if self.monitor not in val_metrics:
            raise ValueError(
                f"Checkpointer(monitor={self.monitor!r}) expected a validation metric named {self.monitor!r}, "
                f"got {sorted(val_metrics)} instead. Set monitor to one of them."
            )
        value = float(val_metrics[self.monitor])
        sharded = is_sharded(state)
        if not _dist.is_main() and not sharded:
            return False  # no barrier: ranks may disagree on metrics they did not reduce
        metrics = {k: float(v) for k, v in val_metrics.items()}
        self._validated_of = (_ref(state), metrics)
        improves = _dist.is_main() and not math.isnan(value) and self._improves(value)
        if sharded:  # saving gathers the shards, a collective: every rank follows rank 0's decision
            improves = bool(_from_rank_0(improves))
        if improves:
            self.save(state, position, metrics=metrics)
            if sharded or _dist.world_size() == 1:  # (every rank knows: on_exit saves this step's file again where
                self._saved, self._saved_where = _ref(state), _where(position)  # the run ends, as after on_step's)
        return improves

    def _improves(self, value: float) -> bool:
        # Strictly better than the worst kept best: on a tie the earlier checkpoint stays (as Lightning's).
        best = self._best(self._scan())
        return self.keep_best is None or len(best) < self.keep_best or self._better(value, self._value(best[-1]))

    def on_epoch_end(self, state: Any, position: Position) -> None:
        """Saves after every ``every_n_epochs`` completed epochs."""
        if self.every_n_epochs is not None:
            done = position["epoch"] + (1 if position["batch"] > 0 else 0)  # either way of counting an ended epoch
            # (saved already as a best at the epoch's last validation: again, standing after the epoch's end)
            if done % self.every_n_epochs == 0 and (not self._is_saved(state) or self._saved_where != _where(position)):
                self._save_and_wait(state, position)

    def on_exit(self, state: Any, position: Position, reason: str) -> None:
        """Saves on preemption (``"sigterm"``, ``"sigint"``), and at the end (``"finished"``) if ``save_last``.

        Raises:
            ValueError: on another ``reason``.
        """
        if reason not in ("sigterm", "sigint", "finished"):
            raise ValueError(f"Checkpointer.on_exit expected reason 'sigterm', 'sigint' or 'finished', got {reason!r} instead.")
        self._ended_at, self._ended_run = _step(state), self._run  # a later fit from this state continues this run
        # The last step's own checkpoint stands before the epoch end and the last log row that followed it: a
        # resume from it would run that epoch end again and log those metrics twice. Saved again where it ended.
        saved = self._is_saved(state)
        if not saved and (reason != "finished" or self.save_last):
            self._save_and_wait(state, position)
        elif saved and self._saved_where not in (None, _where(position)):  # (None: a continuation, as it was saved)
            self._save_and_wait(state, position)  # that step's file again (save_last=False too: no new file)

    # ---- saving and the files -----------------------------------------------------------------------

    def _save_and_wait(self, state: Any, position: Position) -> None:
        # Every rank takes this path at the same steps (it depends on the step and epoch only), so the
        # barrier matches; the other ranks go on once rank 0's file is durable.
        self.save(state, position)
        self._saved, self._saved_where = _ref(state), _where(position)  # only once written: on_exit saves again after an interrupted write
        _dist.barrier()

    def save(self, state: Any, position: Position | None = None, *, metrics: dict[str, float] | None = None) -> Path:
        """Saves now (rank 0 only), updates ``last.ckpt`` and removes the checkpoints no longer kept.

        For a sharded state, a collective: every rank gathers the shards, then rank 0 writes.

        Returns:
            The checkpoint's path (also on the other ranks, where nothing is written).

        Raises:
            CheckpointError: if the file cannot be written; the older checkpoints are then all kept. (A file written
                but not made durable, its folder's fsync failed, or written while ``last.ckpt`` could not be updated,
                stays: later saves rank and remove it as any other.) With
                ``save_last``, also if the folder's ``last.ckpt`` is not an fnlit checkpoint (another tool's): it
                is not replaced, and nothing is written.
            ValueError: for an ensemble whose members' steps differ (the file is named by the step), or for two
                leaves with the same path text (as :func:`save`: on every rank, before anything is written).
            TypeError: as :func:`save`, for a TrainState whose ``params`` or ``buffers`` is not a dict.
            RuntimeError: for a state donated to a step (the donation error :func:`save` gives); nothing is written.
        """
        path = self.directory / f"step={_step(state):08d}.ckpt"
        given = state
        # A sharded state is gathered on every rank (a collective) before rank 0 does anything that could fail.
        state, position = full_tensors(state), full_tensors(position)
        check_paths(state, position)  # on every rank: rank 0 alone raising would leave the others in a collective
        if not _dist.is_main():
            return path
        if self.save_last and self._foreign_last():  # (before anything is written)
            raise self._foreign_last_error()
        error: Exception | None = None
        if self.before_save is not None:
            try:
                self.before_save()
            except Exception as e:  # a log writer's failure (a full disk) must not cost the run its checkpoint
                error = e
        records = self._scan()
        # A save of the state this Checkpointer just validated (the step's periodic save, after its validation)
        # records its metrics; another state at the same step (another run's, a retry's) does not get them.
        if metrics is None:
            if self._validated_of is not None and self._validated_of[0]() is given:
                metrics = self._validated_of[1]
        else:
            self._validated_of = (_ref(given), metrics)
        run = self._run if self._run is not None else self._unstarted_run  # (driven by hand: see __init__)
        try:
            saved_at = write_state(path, state, position, metrics, self.meta, run, self._abandoned)
            records = [r for r in records if r.path != path] + [_Record(path, saved_at, metrics, run)]
            if self.save_last:
                link_or_copy(path, self.directory / LAST)
                self._last_written = _identity(self.directory / LAST)
        except BaseException:
            # The file may be in the folder even so (its folder's fsync failed after the rename, or last.ckpt's update
            # did): the next save reads the folder again, so that file is ranked and removed as any other.
            self._records = None
            raise
        ours = self._ours(records)
        keep = {r.path for r in records} - {r.path for r in ours}  # another run's files are not this run's to remove
        keep |= {r.path for r in (ours if self.keep_last is None else ours[-self.keep_last :])}
        keep |= {r.path for r in self._best(records)}
        for r in records:  # only now that the new file is durable
            if r.path not in keep:
                try:
                    r.path.unlink(missing_ok=True)
                except OSError as e:
                    warnings.warn(f"Checkpointer could not remove the old checkpoint {r.path}: {e}", stacklevel=2)
        self._records = [r for r in records if r.path in keep]
        if error is not None:
            raise error
        return path

    @property
    def last_path(self) -> Path | None:
        """The most recently written checkpoint of this folder (None if there is none)."""
        files = newest_first(self.directory)
        return files[0] if files else None

    @property
    def best_path(self) -> Path | None:
        """The best checkpoint by ``monitor`` (None without monitor or before the first validation).

        Under torch.distributed it is rank 0's (the one that writes): the other ranks list the folder again at
        every call (reading only the headers of files new since), so they name the best file rank 0 has saved so far."""
        if not _dist.is_main():  # (rank 0 keeps its listing up to date as it saves; these ranks save nothing)
            self._records = None
        if self._records is None and not self.directory.is_dir():
            return None  # nothing saved yet (and no folder made just to look: fast_dev_run writes nothing)
        best = self._best(self._scan())
        return best[0].path if best else None

    def _foreign_last(self) -> bool:
        """Whether the folder's ``last.ckpt`` is a checkpoint fnlit did not write (Lightning's, another tool's)."""
        last = self.directory / LAST
        try:
            if self._last_written is not None and _identity(last) == self._last_written:
                return False  # the file this object's last save left (no listing, no file read on every save)
            if last.stat().st_nlink > 1 and not last.is_symlink() and any(
                STEP_FILE.match(p.name) and os.path.samefile(p, last) for p in self.directory.iterdir()
            ):
                return False  # a link to one of the folder's checkpoints, as save makes it (no file read)
        except OSError:
            return False  # no last.ckpt (or no folder)
        return is_foreign(last)

    def _refuse_foreign_last(self, restored: T) -> T:
        """``restored``, unless the folder's ``last.ckpt`` is another tool's or the folder cannot be made (a file is in
        its place; rank 0 decides, a collective): a resume raises as a fresh run (``start``) does, before any
        training, not at its first save.

        Rank 0 also reads the folder now, before it can save anything, to find the history the restore abandons,
        and every rank takes its finding: a rank that writes nothing, reading the folder later (``best_path``),
        would take the files rank 0 saved in between for that history."""
        main = _dist.is_main()
        if main and self.directory.is_dir():  # (no folder: nothing abandoned, and none made just to look)
            self._scan()
        blocked, foreign_last, abandoned = _from_rank_0(
            (main and self._file_in_the_way(), main and self.save_last and self._foreign_last(), self._abandoned)
        )
        if blocked:
            raise self._file_in_the_way_error(blocked)
        if foreign_last:
            raise self._foreign_last_error()
        self._branch_at, self._abandoned = None, list(abandoned)
        return restored

    def _file_in_the_way(self) -> str | None:
        """The file that stands where the folder, or a folder above it, would be (None if there is none): the first
        save could not create the folder (a checkpoint file's path given as the directory)."""
        p = self.directory
        while not os.path.lexists(p) and p != p.parent:
            p = p.parent
        return None if p.is_dir() else str(p)

    def _file_in_the_way_error(self, blocked: str) -> CheckpointError:
        return CheckpointError(
            f"Checkpointer cannot save into {self.directory}: {blocked} is a file, not a folder. Give the "
            "Checkpointer a folder as its directory (to resume from a checkpoint file, pass that file's path as "
            "ckpt_path)."
        )

    def _foreign_last_error(self) -> CheckpointError:
        return CheckpointError(
            f"Checkpointer will not replace {self.directory / LAST}: it is not an fnlit checkpoint (another tool's, "
            "such as Lightning's), and fnlit keeps last.ckpt as a link to its own newest checkpoint. Move that file "
            "away, or give the Checkpointer another directory (or save_last=False)."
        )

    def _best_file(self) -> Path:
        """The file ``ckpt_path="best"`` restores: :attr:`best_path`, read from the folder as it is now."""
        if self.monitor is None or self.keep_best == 0:
            raise CheckpointError(
                "ckpt_path='best' restores the best checkpoint by a monitored metric, but this Checkpointer has "
                + ("no monitor" if self.monitor is None else "keep_best=0, which keeps none")
                + ": pass ckpt_path='last', or a checkpoint file's path."
            )
        self._records = None  # the folder's files now (another process may have written them)
        best = self.best_path
        if best is None:
            raise CheckpointError(
                f"ckpt_path='best': {self.directory} holds no checkpoint with a {self.monitor!r} value"
                + (" of this run" if self._run is not None else "")
                + " yet (best_path is None): pass ckpt_path='last', or a checkpoint file's path."
            )
        return best

    def _restore_file(self, path: Path, like: S) -> tuple[S, Position | None]:
        header, values = decode(path)
        state = fill_like(like, values, path, header)
        self._saved, self._saved_where = _ref(state), _where(header.get("position"))  # not saved again unchanged (a resume that takes no step)
        if header.get("metrics") is not None:  # saved again where the run ends: with the validation it records
            self._validated_of = (self._saved, header["metrics"])
        self.restored_from = path  # (fit: a resume, whether or not the file holds a driver position)
        # The resumed run goes on with its own files. A file without a run (fnlit.save's) starts a run of its own,
        # named after the file alike on every rank: the folder's other files are not its to rank or remove.
        self._run = header.get("run") or f"from-{header.get('saved_at_ns')}"
        # Its run's files saved after it (it went on to later steps) are another history: not this one's best
        # (Lightning restores best_k_models from the file). Rank 0 finds them now, before it saves (restore, on every
        # rank alike); the histories abandoned before the file was written are in its header (none in a file of an
        # fnlit before this was recorded).
        windows = header.get("abandoned") or []
        self._records, self._branch_at = None, header.get("saved_at_ns")
        self._abandoned = [(int(a), int(b)) for a, b in windows]
        return state, header.get("position")

    def _is_saved(self, state: Any) -> bool:
        return self._saved is not None and self._saved() is state

    def _ours(self, records: list[_Record]) -> list[_Record]:
        """The records of this run (all of them when this object follows no run), less those of the history a
        restore abandoned."""
        if self._run is None:
            return records
        return [r for r in records if r.run == self._run and not self._is_abandoned(r)]

    def _is_abandoned(self, r: _Record) -> bool:
        return any(after < r.saved_at_ns <= until for after, until in self._abandoned)

    def _scan(self) -> list[_Record]:
        if self._records is None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CheckpointError(f"Checkpointer cannot create its folder {self.directory}: {e}") from e
            if _dist.is_main():  # (another rank's scan must not take rank 0's write for a dead writer's: another host's pid)
                remove_stale_temps(self.directory)
            headers = self._read_headers()
            self._records = sorted(
                (_Record(p, h["saved_at_ns"], h.get("metrics"), h.get("run")) for p, h in headers if h is not None),
                key=lambda r: r.saved_at_ns,
            )
            if self._branch_at is not None:  # (the first scan after a restore, before this run saved anything)
                later = [r.saved_at_ns for r in self._records if r.run == self._run and r.saved_at_ns > self._branch_at]
                if later:  # (none for a resume from the run's newest file)
                    self._abandoned.append((self._branch_at, max(later)))
                self._branch_at = None
        return self._records

    def _read_headers(self) -> list[tuple[Path, dict[str, Any] | None]]:
        """The folder's step files and their headers, read again only where a file's identity or mtime changed.

        A file removed while it is read (rank 0 replacing its best while another rank lists the folder) makes the
        listing stale: it is taken again (a few times), so the ranks that write nothing see the folder before or
        after rank 0's save, not half-way (no best at all)."""
        for _ in range(3):
            seen: dict[str, tuple[tuple[int, int, int], dict[str, Any] | None]] = {}
            vanished = False
            for p in self.directory.iterdir():
                if not STEP_FILE.match(p.name):
                    continue
                try:
                    st = p.stat()
                except OSError:  # (removed since the listing)
                    vanished = True
                    continue
                key = (st.st_ino, st.st_mtime_ns, st.st_size)
                cached = self._headers.get(p.name)  # (a header that could not be read is read again next time)
                if cached is None or cached[0] != key or cached[1] is None:
                    cached = (key, read_header(p))
                    vanished = vanished or (cached[1] is None and not p.exists())
                seen[p.name] = cached
            self._headers = seen
            if not vanished:
                break
        return [(self.directory / name, header) for name, (_, header) in seen.items()]

    def _value(self, r: _Record) -> float:
        return float(r.metrics[self.monitor]) if r.metrics and self.monitor in r.metrics else math.nan

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b

    def _best(self, records: list[_Record]) -> list[_Record]:
        """This run's ``keep_best`` best records (another run's files are never its best)."""
        if self.monitor is None or self.keep_best == 0:
            return []
        scored = [r for r in self._ours(records) if not math.isnan(self._value(r))]
        sign = 1.0 if self.mode == "min" else -1.0
        # Ties go to the earlier checkpoint: a later one that only equals it is no improvement (as Lightning's).
        return sorted(scored, key=lambda r: (sign * self._value(r), r.saved_at_ns))[: self.keep_best]

    def __repr__(self) -> str:
        return (f"Checkpointer({str(self.directory)!r}, every_n_steps={self.every_n_steps}, every_n_epochs="
                f"{self.every_n_epochs}, keep_last={self.keep_last}, monitor={self.monitor!r}, mode={self.mode!r}, "
                f"keep_best={self.keep_best}, save_last={self.save_last})")
