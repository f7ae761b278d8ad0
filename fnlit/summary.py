"""Where metrics go: TensorBoard event files, CSV or JSONL files, and a progress bar.

A writer is any object with ``log_metrics(metrics, step)``, ``log_hparams(hparams)``, ``flush()`` and
``close()``; :class:`Logger` fans out to several. fnlit's writers write on rank 0 only: on other ranks they never
create a file (a writer of your own is called on every rank, and checks ``fnlit.distributed.is_main()`` itself). :func:`fnlit.fit` calls the writers once per ``log_every_n_steps`` with host floats.
fnlit's writers take as ``step`` an int, a numpy integer or an integer 0-d tensor, and refuse a float step (and a
metric named ``step``, the name of a CSV or JSONL row's step column).

Named ``summary`` (as in ``tf.summary``) rather than ``logging``, which would shadow the standard library.

Example:
    >>> import tempfile, pathlib
    >>> from fnlit.summary import CSVWriter
    >>> with tempfile.TemporaryDirectory() as d:
    ...     w = CSVWriter(d)
    ...     w.log_metrics({"train/loss": 0.5}, step=10)
    ...     w.log_metrics({"val/acc": 0.9}, step=10)
    ...     print(pathlib.Path(d, "metrics.csv").read_text().strip())
    step,train/loss,val/acc
    10,0.5,
    10,,0.9
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import itertools
import json
import math
import operator
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, TextIO

import numpy as np
import torch
from tqdm.std import tqdm

from . import distributed as _dist
from ._types import Metrics

if TYPE_CHECKING:
    from .state import TrainState

__all__ = ["Writer", "TensorBoardWriter", "CSVWriter", "JSONLWriter", "Logger", "ProgressBar", "MetricBuffer", "scalar_metric"]


class Writer(Protocol):
    """What :class:`Logger` and :func:`fnlit.fit` call on a writer.

    A writer may also have ``purge(step)``: a fit that resumes from a checkpoint calls it before logging,
    with the checkpoint's step plus one, so the writer drops what was logged past the checkpoint (the
    writers here all have it).

    Example:
        >>> class PrintWriter:  # any class with these four methods is a Writer; no subclassing needed
        ...     def log_metrics(self, metrics, step): print(step, metrics)
        ...     def log_hparams(self, hparams): print(hparams)
        ...     def flush(self): pass
        ...     def close(self): pass
        >>> Logger([PrintWriter()]).log_metrics({"train/loss": 0.5}, step=3)
        3 {'train/loss': 0.5}
    """

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_hparams(self, hparams: Mapping[str, Any]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def _hparam_value(v: Any) -> bool | int | float | str:
    if isinstance(v, (np.number, np.bool_)) or (isinstance(v, torch.Tensor) and v.dim() == 0):
        v = v.item()  # a numpy scalar or a 0-d tensor stays a number (filterable in TensorBoard's HPARAMS)
    if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**63:
        return str(v)  # (a 128-bit seed): TensorBoard's number is a float64, and tensorboardX refuses such an int
    if isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _hparams_mapping(hparams: Any) -> Mapping[Any, Any]:
    """``hparams`` as a mapping: a mapping as it is, an ``argparse.Namespace`` as its ``vars`` (as Lightning's
    loggers take it); anything else is refused with a TypeError."""
    if isinstance(hparams, argparse.Namespace):
        return vars(hparams)
    if not isinstance(hparams, Mapping):
        hint = ": pass dataclasses.asdict(...)" if dataclasses.is_dataclass(hparams) else ""
        raise TypeError(f"hparams must be a mapping (a dict) or an argparse.Namespace, got {type(hparams).__name__}{hint}.")
    return hparams


def _step(step: Any, writer: object, metrics: Mapping[str, Any]) -> int:
    """``step`` as a Python int: an int, a numpy integer or an integer 0-d tensor (``operator.index``); a float
    step (``5.0``, ``torch.tensor(5.0)``) is refused rather than written as ``5.0`` by one writer and ``5`` by another.
    A metric named ``step`` is refused too: it would replace the step of a CSV or JSONL row."""
    if "step" in metrics:
        raise ValueError(
            f"{type(writer).__name__}.log_metrics: got a metric named 'step' (value {metrics['step']!r}), the name of "
            f"the row's step, which it would replace in CSV and JSONL rows: rename the metric."
        )
    try:
        return operator.index(step)
    except TypeError:
        raise TypeError(
            f"{type(writer).__name__}.log_metrics: step must be an integer (an int, a numpy integer or an integer "
            f"0-d tensor), got {step!r}."
        ) from None


def flat_hparams(hparams: Mapping[Any, Any] | argparse.Namespace) -> dict[str, bool | int | float | str]:
    """``hparams`` as loggers take them: an ``argparse.Namespace`` as its ``vars``, nested mappings flattened to
    ``outer/inner`` keys (as fit names nested metrics, and Lightning's loggers hyperparameters), keys as their
    ``str``, numpy scalars and 0-d tensors as numbers, anything else (and an int beyond 64 bits) as its ``str``.

    Raises:
        TypeError: if ``hparams`` is neither a mapping nor an ``argparse.Namespace``.
        ValueError: if two hyperparameters get one name.

    Example:
        >>> flat_hparams({"lr": np.float32(0.5), "optim": {"name": "adam", "b1": 0.9}})
        {'lr': 0.5, 'optim/name': 'adam', 'optim/b1': 0.9}
    """
    out: dict[str, bool | int | float | str] = {}
    for k, v in flat_metrics(_hparams_mapping(hparams), "hyperparameters").items():
        if str(k) in out:  # ({1: 2, "1": 3})
            raise ValueError(f"Two hyperparameters are both named {str(k)!r} once their keys are strings: rename one of them.")
        out[str(k)] = _hparam_value(v)
    return out


def _event_file_stamps(log_dir: str) -> list[int]:
    """The time stamps in the names of the TensorBoard event files in ``log_dir``."""
    stamps = []
    for name in os.listdir(log_dir):
        parts = name.split(".")
        if name.startswith("events.out.tfevents.") and len(parts) > 3 and parts[3].isdigit():
            stamps.append(int(parts[3]))
    return stamps


class TensorBoardWriter:
    """Scalars and hyperparameters in a TensorBoard event file (tensorboardX's protocol buffers).

    ``tensorboard --logdir <log_dir>`` shows the scalars; hyperparameters appear under HPARAMS. Each
    ``log_metrics`` call becomes one event holding all its scalars. With ``flush_secs > 0`` events are
    written in batches: the first call writes at once, a later one writes what is pending when
    ``flush_secs`` have passed since the last write, and ``flush``/``close`` write the rest
    (:func:`fnlit.fit` flushes after each validation, right before each checkpoint its Checkpointer writes,
    and when it ends, also on an error). Values logged since the last write live only in memory: a killed
    process loses them (under fit with a Checkpointer, only values logged after its last checkpoint, which a
    run resumed from it logs again). A value that is no number is refused by the ``log_metrics`` call that logs it,
    also when it is batched (on rank 0, which writes: other ranks ignore the values). ``close`` also fsyncs; a closed writer refuses more values. ``fit``'s ``log_dir`` writers use 2 s: one event written between
    training steps costs ~10x what it costs in a tight loop (cold caches), and a batch pays that once.
    It writes in the calling thread: tensorboardX's ``SummaryWriter``
    sends every scalar through a multiprocessing queue to a writer thread (~60 us of this process's CPU
    per scalar, and a thread contending with the training step for the interpreter).

    Args:
        log_dir: directory of the event file (created on rank 0).
        flush_secs: how long after a write logged values are held before the next log call writes them
            (0, the default: every call writes).
        purge_step: a run (re)starting at this step: TensorBoard drops the events of earlier files in the
            folder from this step on (a resumed run replaces what the interrupted one logged after its
            checkpoint; CSVWriter's ``purge_step`` does the same to the CSV).

    Example:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as d:
        ...     w = TensorBoardWriter(d)
        ...     w.log_metrics({"train/loss": 1.5}, step=1); w.close()
        ...     print(any(f.startswith("events.out.tfevents") for f in os.listdir(d)))
        True
    """

    _opened = itertools.count(1)  # numbers the event files this process opens, so two writers never share one

    def __init__(self, log_dir: str | os.PathLike[str], *, flush_secs: float = 0.0, purge_step: int | None = None) -> None:
        self.log_dir = os.fspath(log_dir)
        self.flush_secs = flush_secs
        self._file: BinaryIO | None = None
        self._pending: list[tuple[float, int, Any]] = []  # (wall time, step, Summary)
        self._flushed = -math.inf  # the first values logged are written at once
        self._closed = False
        self.path: str | None = None
        if _dist.is_main():
            os.makedirs(self.log_dir, exist_ok=True)
            number = next(TensorBoardWriter._opened)  # atomic: writers made in two threads get two numbers
            # TensorBoard reads a folder's files in name order: a resumed run's file (and its purge marker) must
            # come after the interrupted run's, also within one second, from another process (pid 10000 sorts
            # before 9999) or host: its time stamp is past every one in the folder.
            stamp = max([int(time.time())] + [t + 1 for t in _event_file_stamps(self.log_dir)])
            name = f"events.out.tfevents.{stamp}.{socket.gethostname()}.{os.getpid()}.{number:06d}"
            self.path = os.path.join(self.log_dir, name)
            self._file = open(self.path, "wb")
            self._write(time.time(), file_version="brain.Event:2")
            self._file.flush()
        if purge_step is not None:
            self.purge(purge_step)

    def purge(self, step: int) -> None:
        """Drops what was logged into this folder at ``step`` or later, by earlier runs or by this writer:
        a run resumed from a checkpoint logs those steps again.

        Writes TensorBoard's marker for it (a ``SessionLog.START`` event at ``step``, as tensorboardX's
        ``purge_step`` does): TensorBoard then hides the events it read before it at that step and later.
        :func:`fnlit.fit` calls it when it resumes, with the checkpoint's step plus one.
        """
        if self._file is None:
            return
        from tensorboardX.proto.event_pb2 import SessionLog

        if self._pending:  # (what was logged before it comes first)
            self.flush()
        # The marker is no logged value: it leaves the batching as it was (a new writer's first values are
        # still written at once).
        self._write(time.time(), step=int(step), session_log=SessionLog(status=SessionLog.START))
        self._file.flush()

    def _write(self, wall_time: float, summary: Any = None, step: int | None = None, **fields: Any) -> None:
        """Appends one Event as a TFRecord: length, its masked CRC-32C, the bytes, their masked CRC-32C."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.record_writer import masked_crc32c

        assert self._file is not None
        event = Event(wall_time=wall_time, summary=summary, **fields)
        if step is not None:
            event.step = step
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data)))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self._closed:
            raise ValueError(f"TensorBoardWriter({self.log_dir!r}) is closed: make a new writer to log more.")
        step = _step(step, self, metrics)
        if self._file is None or not metrics:
            return
        self._pending.append((time.time(), step, _scalars_summary(metrics, step)))
        if time.monotonic() - self._flushed >= self.flush_secs:
            self.flush()

    def log_hparams(self, hparams: Mapping[str, Any], metrics: Sequence[str] = ()) -> None:
        """Writes the hyperparameters into this run.

        Without ``metrics``, TensorBoard's HPARAMS shows a column for each scalar the runs log (``val/acc``,
        ``train/loss``, ...). ``metrics`` names the only scalars to show there instead: they are written as the
        experiment's metric list, which TensorBoard then takes as it is (an empty list would show none).
        """
        if self._closed:
            raise ValueError(f"TensorBoardWriter({self.log_dir!r}) is closed: make a new writer to log more.")
        if self._file is None:
            return
        from tensorboardX.summary import hparams as _hparams

        # Written into this run's own event file (not a sub-run, as SummaryWriter.add_hparams does),
        # so TensorBoard shows the hyperparameters next to the run's scalars.
        self.flush()
        experiment, start, end = _hparams(flat_hparams(hparams), {m: 0.0 for m in metrics})
        # An experiment summary is used as it is: one without metrics would hide every metric column, whereas
        # without one TensorBoard derives the columns from the runs' scalar tags.
        for summary in ([experiment] if metrics else []) + [start, end]:
            self._write(time.time(), summary)
        self._file.flush()

    def flush(self) -> None:
        """Writes the pending events and hands the file's buffer to the operating system."""
        if self._file is None:
            return
        pending, self._pending = self._pending, []
        for wall_time, step, summary in pending:
            self._write(wall_time, summary, step)
        self._file.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        self._closed = True
        if self._file is not None:
            try:
                self.flush()
                os.fsync(self._file.fileno())
            finally:  # closed also when the disk refused the last events
                self._file.close()
                self._file = None

    def __del__(self) -> None:  # a writer dropped without close() still writes what it holds
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):  # at interpreter exit, or with its folder gone
                self.close()


def _scalars_summary(metrics: Mapping[str, Any], step: int) -> Any:
    """``metrics`` as a TensorBoard Summary, made when they are logged: a value that is no number is refused at that
    call (naming it), not at a later flush, where it would cost the valid values batched after it."""
    from tensorboardX.proto.summary_pb2 import Summary

    values = []
    for k, v in metrics.items():
        try:
            x = float(v)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"TensorBoardWriter.log_metrics: metric {k!r} at step {step} is {type(v).__name__} {v!r}, not a number: "
                f"log numbers (or one-element tensors)."
            ) from None
        values.append(Summary.Value(tag=k, simple_value=x))
    return Summary(value=values)


class CSVWriter:
    """One row per ``log_metrics`` call: ``step`` and a column per metric name (blank where not logged).

    When a new metric name appears, the file is rewritten with the wider header (as Lightning's
    CSVLogger does); otherwise rows are appended. Rows are written in batches as
    :class:`TensorBoardWriter` writes events (the first at once, then when ``flush_secs`` have passed,
    and at ``flush``/``close``, which fit calls right before each checkpoint its Checkpointer writes); the file appears
    with the first row. A closed writer refuses more rows and hyperparameters.
    ``log_hparams`` writes the hyperparameters as JSON beside it (non-finite floats as the strings ``"NaN"``,
    ``"Infinity"``, ``"-Infinity"``, as :class:`JSONLWriter` writes them, so strict JSON readers read the file):
    ``hparams.json`` beside ``metrics.csv``, ``<name>.hparams.json`` beside another ``<name>.csv`` (runs logging
    to several CSV files in one folder keep their own); ``hparams_path`` names it.

    An existing file is continued, not replaced, as :class:`TensorBoardWriter` leaves the event files
    already in its folder: a run resumed from a checkpoint (``fit(..., ckpt_path=...)`` with the same
    ``log_dir``) keeps the rows the earlier run wrote. A row this writer logs replaces the file's rows
    at later steps, and at its own step those holding any of its metrics: the earlier run may have
    logged past the checkpoint this one restarts from, and this one logs those steps again. The earlier
    rows come first, in their order, and their columns stay in the header while they hold values. A
    fresh run logged into a folder that holds an earlier run's file follows the same rule, so the
    earlier rows before its first step stay. With ``purge_step`` (fit passes the step it starts from plus
    one, and gives TensorBoardWriter the same), the earlier rows from that step on are dropped at once, as
    TensorBoard drops those events: a fresh run (step 0) replaces an earlier run's rows, a resumed run
    those after its checkpoint. To keep an earlier run, log to another folder. A file that has no ``step`` column, or a row without a numeric
    step, is not continued: the writer raises a ValueError rather than overwrite it. Rewrites go to a
    temporary file renamed over this one, so a process killed while rewriting never loses the earlier
    rows. Only the rows not yet written are held in memory: a rewrite reads the others back from the file,
    one at a time.

    Args:
        path: a ``.csv`` file, or a directory (the file is then ``<dir>/metrics.csv``).
        flush_secs: how long after a write logged rows are held before the next log call writes them
            (0, the default: every call writes).
        purge_step: drop the earlier rows from this step on (see above).

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as d:
        ...     w = CSVWriter(pathlib.Path(d, "run.csv"))
        ...     w.log_metrics({"loss": 0.5}, step=1); w.log_metrics({"loss": 0.25}, step=2); w.close()
        ...     print(pathlib.Path(w.path).read_text().strip())
        step,loss
        1,0.5
        2,0.25

        A run resumed from step 10, after an earlier run logged steps 5 to 15 before it stopped:

        >>> with tempfile.TemporaryDirectory() as d:
        ...     w = CSVWriter(d)
        ...     for step, loss in [(5, 0.5), (10, 0.4), (15, 0.3)]: w.log_metrics({"loss": loss}, step)
        ...     w.close()
        ...     w = CSVWriter(d)  # the resumed run: its first row replaces the earlier run's step 15
        ...     w.log_metrics({"loss": 0.35, "acc": 0.9}, step=15); w.close()
        ...     print(pathlib.Path(w.path).read_text().strip())
        step,loss,acc
        5,0.5,
        10,0.4,
        15,0.35,0.9
    """

    def __init__(self, path: str | os.PathLike[str], *, flush_secs: float = 0.0, purge_step: int | None = None) -> None:
        path = os.fspath(path)
        self.path = path if path.endswith(".csv") else os.path.join(path, "metrics.csv")
        folder, name = os.path.split(self.path)
        self.hparams_path = os.path.join(folder, "hparams.json" if name == "metrics.csv" else name[:-4] + ".hparams.json")
        self.flush_secs = flush_secs
        self.enabled = _dist.is_main()
        self.columns: list[str] = ["step"]
        # Only the rows not yet in the file are held: a rewrite reads the written ones back from the file,
        # so a long run's memory stays flat (as Lightning's CSVLogger).
        self._pending: list[dict[str, Any]] = []
        self._own: dict[str, None] = {}  # the names in this writer's rows in the file, in the order they first came
        self._own_rows = 0  # this writer's rows in the file (after the earlier run's)
        self._own_last = -math.inf  # the last step among them
        self._file: TextIO | None = None  # kept open for appending between rewrites
        self._flushed = -math.inf  # the first row is written at once
        self._closed = False
        self._header: list[str] = []  # the earlier file's columns, in its order
        self._earlier_rows = 0  # its rows still kept: the file's first rows
        self._earlier_cols: list[str] = []  # the columns holding values in them, in the header's order
        self._earlier_last = -math.inf  # the last step among them: a row after it replaces none
        self._at_last: list[frozenset[str]] = []  # the names in those at that step
        if self.enabled:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._read_earlier()
        if purge_step is not None:
            self.purge(purge_step)

    def purge(self, step: int) -> None:
        """Drops the rows logged at ``step`` or later, by an earlier run or by this writer, at once (a run may
        log nothing). :func:`fnlit.fit` calls it when it resumes, with the checkpoint's step plus one."""
        if not self.enabled or self._closed:
            return
        pending = [r for r in self._pending if float(r["step"]) < step]
        earlier = self._earlier_rows and self._earlier_last >= step
        if earlier or self._own_last >= step or len(pending) < len(self._pending):
            self._pending = pending
            self._rewrite(lambda s, cells: s < step, lambda s: s < step)  # this writer's pending rows too

    def _read(self) -> Iterator[tuple[int, float, dict[str, str]]]:
        """The file's rows as (index, step, non-blank cells), read one at a time."""
        if self._file is not None:
            self._file.flush()
        try:
            f = open(self.path, newline="", encoding="utf-8")
        except FileNotFoundError:  # no file yet (or it was deleted: its rows are gone)
            return
        with f:
            for i, row in enumerate(csv.DictReader(f)):
                cells = {k: v for k, v in row.items() if v}  # blank cells: not logged
                yield i, float(cells["step"]), cells

    def _read_earlier(self) -> None:
        """Checks the rows an earlier run left in the file (see the class docstring), and notes where they are."""
        try:
            f = open(self.path, newline="", encoding="utf-8")
        except FileNotFoundError:
            return
        with f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:  # an empty file
                return
            if "step" not in reader.fieldnames:
                raise ValueError(
                    f"CSVWriter: {self.path} exists and has no 'step' column, so it was not written by a CSVWriter "
                    f"and cannot be continued. Move it away, or log to another path."
                )
            self._header = list(reader.fieldnames)
            used: set[str] = set()
            for row in reader:
                cells = {k: v for k, v in row.items() if v}  # blank cells: not logged
                try:
                    if None in cells:  # more values than columns
                        raise ValueError
                    self._note_earlier(float(cells["step"]), cells, used)
                except (KeyError, ValueError):
                    raise ValueError(
                        f"CSVWriter: line {reader.line_num} of {self.path} is not a row a CSVWriter writes (a numeric "
                        f"step and at most one value per column): {row}. Fix or delete that line, or log to another "
                        f"path."
                    ) from None
        self._earlier_cols = [k for k in self._header if k in used]

    def _note_earlier(self, step: float, cells: Mapping[str, str], used: set[str]) -> None:
        """Counts one kept earlier row."""
        self._earlier_rows += 1
        used.update(cells)
        if step > self._earlier_last:
            self._earlier_last, self._at_last = step, []
        if step == self._earlier_last:
            self._at_last.append(frozenset(cells.keys() - {"step"}))

    def _replaced(self, rows: Sequence[Mapping[str, Any]]) -> Callable[[float, Mapping[str, str]], bool] | None:
        """Which earlier rows ``rows`` keep (those before all of them, or at the first step without one of its
        names), or None if they replace none."""
        first = min(float(row["step"]) for row in rows)
        if not self._earlier_rows or first > self._earlier_last:  # the cheap path once past the earlier run
            return None
        names = {k for row in rows if float(row["step"]) == first for k in row if k != "step"}
        if first == self._earlier_last and all(names.isdisjoint(at) for at in self._at_last):
            return None
        return lambda s, cells: s < first or (s == first and names.isdisjoint(cells))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self._closed:
            raise ValueError(f"CSVWriter({self.path!r}) is closed: make a new writer to log more.")
        step = _step(step, self, metrics)
        if not self.enabled:
            return
        self._pending.append({"step": step, **_numbers(metrics)})
        if time.monotonic() - self._flushed >= self.flush_secs:
            self.flush()

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        if self._closed:
            raise ValueError(f"CSVWriter({self.path!r}) is closed: make a new writer to log more.")
        if self.enabled:
            with open(self.hparams_path, "w") as f:
                json.dump(_finite_json(flat_hparams(hparams)), f, indent=1, allow_nan=False)

    def flush(self) -> None:
        """Writes the pending rows (the whole file again if they bring new columns or replace earlier rows)."""
        if not self.enabled or self._closed or not (self._pending or self._own_rows):  # no rows yet: no file yet
            return
        if self._pending:
            keep = self._replaced(self._pending)
            new = [k for row in self._pending for k in row if k not in self.columns]
            if new or keep is not None or self._file is None:
                self._rewrite(keep)
            else:
                csv.DictWriter(self._file, self.columns).writerows(self._pending)
                self._wrote()
        assert self._file is not None
        self._file.flush()
        self._flushed = time.monotonic()

    def _wrote(self) -> None:
        """Notes the pending rows as written, and drops them."""
        for row in self._pending:
            self._own.update(dict.fromkeys(k for k in row if k != "step"))
            self._own_last = max(self._own_last, float(row["step"]))
        self._own_rows += len(self._pending)
        self._pending = []

    def _rewrite(
        self,
        keep_earlier: Callable[[float, Mapping[str, str]], bool] | None = None,
        keep_own: Callable[[float], bool] | None = None,
    ) -> None:
        """Writes the whole file again: the earlier rows kept, then this writer's, then the pending ones
        (columns as they need). The rows already written are read back from the file, one at a time."""
        dropping = keep_earlier is not None or keep_own is not None
        keep_earlier = keep_earlier or (lambda s, cells: True)
        keep_own = keep_own or (lambda s: True)
        n_earlier = self._earlier_rows
        kept = lambda i, s, cells: keep_earlier(s, cells) if i < n_earlier else keep_own(s)  # noqa: E731
        if dropping:  # count again what is kept
            order = {k: i for i, k in enumerate(self._own)}
            used: set[str] = set()
            self._earlier_rows, self._earlier_last, self._at_last = 0, -math.inf, []
            self._own, self._own_rows, self._own_last = {}, 0, -math.inf
            for i, s, cells in self._read():
                if not kept(i, s, cells):
                    continue
                if i < n_earlier:
                    self._note_earlier(s, cells, used)
                else:
                    # A row's own key order is not in the file: its new names go in the order they first came.
                    new = sorted((k for k in cells if k != "step" and k not in self._own), key=lambda k: order.get(k, -1))
                    self._own.update(dict.fromkeys(new))
                    self._own_rows += 1
                    self._own_last = max(self._own_last, s)
            self._earlier_cols = [k for k in self._header if k in used]
        pending_keys = (k for row in self._pending for k in row)
        self.columns = list(dict.fromkeys(["step", *self._earlier_cols, *self._own, *pending_keys]))
        tmp = self.path + ".tmp"  # written aside, then renamed over the file: never half a file
        with open(tmp, "w", newline="", encoding="utf-8") as out:
            w = csv.DictWriter(out, self.columns)
            w.writeheader()
            w.writerows(cells for i, s, cells in self._read() if kept(i, s, cells))
            w.writerows(self._pending)
        if self._file is not None:
            self._file.close()
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", newline="", encoding="utf-8")  # appends go on into it
        self._wrote()

    def close(self) -> None:
        if self._closed:  # a second close (or __del__ after close) must not rewrite the file
            return
        self.flush()
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self) -> None:  # a writer dropped without close() still writes what it holds
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):  # at interpreter exit, or with its folder gone
                self.close()


class JSONLWriter:
    """One JSON object per line: ``{"step": ..., "<metric>": value, ...}``; hyperparameters as ``{"hparams": ...}``.

    Each line is written and flushed as it is logged. An existing file is continued (a line a killed
    process left unfinished is ended first). A value that is not finite is written as the string
    ``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` (as protobuf's JSON mapping does), so strict JSON readers
    (``jq``, JavaScript) read every line; Python's ``float()`` turns them back into numbers. Several runs
    may append to one file; a :func:`fnlit.fit` that resumes from a checkpoint first drops the lines logged
    after the checkpoint (:meth:`purge`), whichever run logged them, so give a resumable job a file of its own.

    Args:
        path: a ``.jsonl`` file, or a directory (the file is then ``<dir>/metrics.jsonl``).
        purge_step: drop the lines an earlier run logged at this step or later (see :meth:`purge`).

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as d:
        ...     w = JSONLWriter(d)
        ...     w.log_hparams({"lr": 0.1}); w.log_metrics({"train/loss": 0.5}, step=1); w.close()
        ...     print(pathlib.Path(w.path).read_text().strip())
        {"hparams": {"lr": 0.1}}
        {"step": 1, "train/loss": 0.5}
    """

    def __init__(self, path: str | os.PathLike[str], *, purge_step: int | None = None) -> None:
        path = os.fspath(path)
        self.path = path if path.endswith(".jsonl") else os.path.join(path, "metrics.jsonl")
        self._file: TextIO | None = None
        self._closed = False
        if _dist.is_main():
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "ab+") as f:
                if f.seek(0, os.SEEK_END) and f.seek(-1, os.SEEK_END) is not None and f.read(1) != b"\n":
                    f.write(b"\n")  # a line cut off by a killed process: ended, not joined to ours
            self._file = open(self.path, "a", encoding="utf-8")
        if purge_step is not None:
            self.purge(purge_step)

    def purge(self, step: int) -> None:
        """Drops the lines whose ``step`` is ``step`` or later (an earlier run's, or this writer's), as
        TensorBoard and :class:`CSVWriter` drop them; other lines (hyperparameters, lines without a numeric
        step) stay. :func:`fnlit.fit` calls it when it resumes, with the checkpoint's step plus one, so the
        steps the resumed run logs again are not in the file twice. The file is rewritten aside and renamed
        over itself: a process killed meanwhile loses nothing."""
        if self._file is None:
            return
        self._file.flush()
        with open(self.path, "rb") as f:
            lines = f.read().splitlines(keepends=True)
        kept = [line for line in lines if not _logged_from(line, step)]
        if len(kept) == len(lines):
            return
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.writelines(kept)
        self._file.close()
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def _write(self, obj: Mapping[str, Any]) -> None:
        if self._closed:  # (as the other writers: a line logged after close must not vanish without a word)
            raise ValueError(f"JSONLWriter({self.path!r}) is closed: make a new writer to log more.")
        if self._file is not None:
            self._file.write(json.dumps(_finite_json(obj), allow_nan=False) + "\n")
            self._file.flush()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._write({"step": _step(step, self, metrics), **_numbers(metrics)})

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._write({"hparams": flat_hparams(hparams)})

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None


def _logged_from(line: bytes, step: int) -> bool:
    """Whether a JSONL line is a metrics line logged at ``step`` or later."""
    try:
        obj = json.loads(line)
    except ValueError:  # not ours to judge (UnicodeDecodeError included): kept
        return False
    value = obj.get("step") if isinstance(obj, dict) else None
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= step


def _numbers(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` with one-element tensors and numpy scalars as Python numbers (``.item()``, as Lightning's
    CSVLogger): their repr is no number (``tensor(0.1235)``), nor JSON. fit passes Python floats already."""
    out = dict(metrics)
    for k, v in out.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1 or isinstance(v, np.generic):
            out[k] = v.item()
    return out


def _finite_json(obj: Any) -> Any:
    """``obj`` with non-finite floats as the strings protobuf's JSON mapping uses."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if obj != obj else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, Mapping):
        return {k: _finite_json(v) for k, v in obj.items()}
    return obj


class Logger:
    """Sends each call to every writer, also when one of them raises (the first error is raised after the others ran).

    Args:
        writers: objects with the :class:`Writer` methods.
        log_dir: shorthand: add a :class:`TensorBoardWriter` and a :class:`CSVWriter` in this directory.
        flush_secs: how long those two may hold logged values before writing them (see TensorBoardWriter).
        purge_step: the step the run starts from plus one (see TensorBoardWriter); fit passes it.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     log = Logger(log_dir=d)
        ...     log.log_metrics({"train/loss": 0.1}, step=5); log.close()
        ...     print([type(w).__name__ for w in log.writers])
        ['TensorBoardWriter', 'CSVWriter']
    """

    def __init__(
        self, writers: Sequence[Writer] = (), *, log_dir: str | os.PathLike[str] | None = None, flush_secs: float = 2.0,
        purge_step: int | None = None,
    ) -> None:
        self.writers: list[Writer] = list(writers)
        if log_dir is not None:  # the files fit writes, in batches (see TensorBoardWriter)
            # The CSVWriter first: one that refuses the folder (a metrics.csv it cannot continue) leaves it as it
            # was, where a TensorBoardWriter made before it would have written its purge marker (hiding the earlier
            # run's scalars). Both purge only once both are made.
            csv_writer = CSVWriter(log_dir, flush_secs=flush_secs)
            tb = TensorBoardWriter(log_dir, flush_secs=flush_secs, purge_step=purge_step)
            if purge_step is not None:
                try:
                    csv_writer.purge(purge_step)
                except BaseException:  # (its rewrite failed): the event file is not left open
                    tb.close()
                    raise
            self.writers += [tb, csv_writer]

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Sends the row to every writer, also when one raises (the first error is raised after the others ran)."""
        _each(self.writers, "log_metrics", metrics, step)

    def log_hparams(self, hparams: Mapping[str, Any] | argparse.Namespace) -> None:
        """Sends ``hparams`` to every writer (an ``argparse.Namespace`` as its ``vars``: a writer takes a mapping),
        also when one raises (the first error is raised after the others ran)."""
        _each(self.writers, "log_hparams", _hparams_mapping(hparams))

    def purge(self, step: int) -> None:
        """Calls ``purge(step)`` on every writer that has one (see :meth:`TensorBoardWriter.purge`)."""
        for w in self.writers:
            purge = getattr(w, "purge", None)
            if purge is not None:
                purge(step)

    def flush(self) -> None:
        """Flushes every writer, also when one raises (the first error is raised after the others ran)."""
        _each(self.writers, "flush")

    def close(self) -> None:
        """Closes every writer, also when one raises (the first error is raised after the others ran)."""
        _each(self.writers, "close")


def _each(writers: Sequence[Writer], method: str, *args: Any) -> None:
    """Calls ``method(*args)`` on every writer, then raises the first error one of them raised."""
    error: BaseException | None = None
    for w in writers:
        try:
            getattr(w, method)(*args)
        except Exception as e:  # one full disk must not cost the other writers their data
            error = error or e
    if error is not None:
        raise error


def _is_loss(name: str) -> bool:
    """``train/loss``, or an ensemble member's ``train/loss/0``."""
    parts = name.split("/")
    return parts[-1] == "loss" or (len(parts) > 2 and parts[-2] == "loss" and parts[-1].isdigit())


class ProgressBar:
    """A tqdm bar: epoch, batch in the epoch, steps/s, and the step and loss at the last log interval.

    On by default only where it can be seen: rank 0 with stdout a terminal. ``enabled=True`` forces it on
    (rank 0 only), ``False`` off. tqdm redraws at most every ``mininterval`` seconds, and the loss shown is
    updated at log intervals, so the bar adds no host sync and almost no work per step.

    Args:
        enabled: None (auto), True or False.
        file: where to draw (default ``sys.stdout``).
        mininterval: seconds between redraws.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> bar = ProgressBar(enabled=True, file=out)
        >>> bar.start_epoch(0, total=10); bar.update(3); bar.set_metrics(3, {"train/loss": 0.25}); bar.close()
        >>> print(out.getvalue().splitlines()[-1])  # the final redraw
        epoch 0:  30%|...| 3/10 [...step=3, loss=0.25]
    """

    def __init__(self, enabled: bool | None = None, *, file: TextIO | None = None, mininterval: float = 0.25) -> None:
        self.file = file if file is not None else sys.stdout
        if enabled is None:
            isatty = getattr(self.file, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = bool(enabled) and _dist.is_main()
        try:  # a terminal that reports a size of 0 (some pseudo-terminals) would get an empty bar, or none at all:
            size = os.get_terminal_size(self.file.fileno())  # (tqdm hides a bar at a row past the screen's height)
            sized = size.columns > 0 and size.lines > 0
        except (OSError, AttributeError, ValueError):
            sized = False
        # A disabled bar is no tqdm at all: even disabled, tqdm starts its monitor thread, which outlives fit.
        self.bar = tqdm(
            total=None, file=self.file, unit="steps", mininterval=mininterval,
            dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 20, leave=True,
        ) if self.enabled else None  # fmt: skip
        self.update = self.bar.update if self.bar is not None else _nothing
        """``update(n=1)``: bound to tqdm's own method (the loop calls it every step)."""

    def start_epoch(self, epoch: int, total: int | None, initial: int = 0) -> None:
        """Resets the bar for a new epoch of ``total`` batches, starting at batch ``initial``."""
        if self.enabled:  # (reset draws at once: the new epoch's name first, its batch drawn right after)
            self.bar.set_description(f"epoch {epoch}", refresh=False)
            self.bar.reset(total=total)
            # (initial too: tqdm's rate is (n - initial) / elapsed, so the skipped batches do not count as run)
            self.bar.n = self.bar.last_print_n = self.bar.initial = initial
            if initial:
                self.bar.refresh()

    def set_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Shows the global step and the loss (or the first metric) of the last log interval."""
        if self.enabled:
            shown = {"step": step}
            loss = next((k for k in metrics if _is_loss(k)), next(iter(metrics), None))
            if loss is not None:  # named without its prefix: "loss", an ensemble member's "loss/0"
                shown[loss.split("/", 1)[-1]] = f"{metrics[loss]:.4g}"
            self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _nothing(n: int = 1) -> None:
    """A disabled bar's ``update``."""


def flat_metrics(metrics: Mapping[Any, Any], what: str = "metrics") -> dict[str, Any]:
    """Nested dicts of metrics flattened into ``"outer/inner"`` names, as fit logs them.

    Raises:
        ValueError: if two metrics get one name (``{"a/b": 1, "a": {"b": 2}}``); ``what`` names them in the message.

    Example:
        >>> flat_metrics({"loss": 1.0, "parts": {"ce": 0.75, "reg": 0.25}})
        {'loss': 1.0, 'parts/ce': 0.75, 'parts/reg': 0.25}
    """
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        items = [(f"{k}/{inner}", x) for inner, x in flat_metrics(v, what).items()] if isinstance(v, Mapping) else [(k, v)]
        for name, x in items:
            if name in out:
                raise ValueError(
                    f"Two {what} are both named {name!r} once nested dicts are flattened into 'outer/inner' names: "
                    "rename one of them."
                )
            out[name] = x
    return out


def check_metric_name(name: Any, who: str) -> None:
    """Raises a TypeError unless ``name`` (a metric's) is a string."""
    if not isinstance(name, str):
        raise TypeError(f"{who} returned a metric named {name!r}; metric names must be strings.")


def ensemble_members(state: Any) -> int | None:
    """The number of members of an ensemble's stacked state (its step has one entry each), else None."""
    step = getattr(state, "step", None)
    return step.shape[0] if isinstance(step, torch.Tensor) and step.dim() == 1 else None


def unique_names(names: Sequence[str], who: str) -> None:
    """Raises if two metrics of ``who`` got one name (an ensemble's ``loss/0`` beside a metric named so)."""
    if len(set(names)) != len(names):
        name = next(n for i, n in enumerate(names) if n in names[:i])
        raise ValueError(
            f"{who} gives two metrics the name {name!r} (an ensemble's per-member metrics are named "
            "'<name>/<member>'): rename one of them."
        )


def _per_member(name: str, values: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """An ensemble's metric (one value per member) as ``"<name>/<member>"`` entries."""
    return [(f"{name}/{i}", t) for i, t in enumerate(values.detach().unbind(0))]


def wide_dtype(device: torch.device) -> torch.dtype:
    """float64, where ``device`` has it (MPS has not: float32 there): the dtype of sums that must not lose digits."""
    return torch.float32 if device.type == "mps" else torch.float64


def reduction_dtype(*tensors: torch.Tensor, device: torch.device | None = None) -> torch.dtype:
    """The dtype metrics are averaged (and summed across ranks) in: float64 where one of them is float64 or an integer
    (exact to 2**53; a Python float is a float64, see :func:`scalar_metric`), float32 for float32, float16 and bfloat16
    ones (as before: no wider sums for them). A device without float64 (MPS: theirs, or ``device``, where they are
    going) reduces in float32.

    Example:
        >>> reduction_dtype(torch.tensor(1.0)), reduction_dtype(torch.tensor(1, dtype=torch.int64))
        (torch.float32, torch.float64)
    """
    wide = any(t.dtype == torch.float64 or not (t.is_floating_point() or t.is_complex()) for t in tensors)
    devices = [t.device for t in tensors] + ([torch.device(device)] if device is not None else [])
    return torch.float64 if wide and all(d.type != "mps" for d in devices) else torch.float32


def metric_float(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, in :func:`reduction_dtype` (a float32 tensor comes back as it is)."""
    return t.detach().to(reduction_dtype(t))


def scalar_metric(name: str, value: Any, who: str) -> torch.Tensor:
    """``value`` as a detached float 0-d tensor; a ValueError naming ``name``, its shape and ``who`` if not scalar.

    Example:
        >>> scalar_metric("loss", 2, "my_step")  # an integer (or float64) metric is reduced in float64
        tensor(2., dtype=torch.float64)
        >>> scalar_metric("loss", torch.ones(3), "my_step")
        Traceback (most recent call last):
        ValueError: my_step returned metric 'loss' of shape (3,); metrics must be scalars ...
    """
    if isinstance(value, torch.Tensor):
        t = value
    else:
        try:
            # a Python float is a float64 (torch.as_tensor would round it to the default dtype, float32)
            t = torch.as_tensor(value, dtype=torch.float64) if isinstance(value, float) else torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"{who} returned metric {name!r} as {type(value).__name__} {value!r}; metrics must be numbers or "
                "scalar tensors (log text elsewhere)."
            ) from None
    if t.dim() != 0:
        raise ValueError(
            f"{who} returned metric {name!r} of shape {tuple(t.shape)}; metrics must be scalars (0-d tensors). "
            f"Reduce it, e.g. {name}.mean()."
        )
    return metric_float(t)


class MetricBuffer:
    """Train metrics pending since the last log (device tensors), and the names they are logged under.

    Example:
        >>> import fnlit
        >>> state = fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(0.1), seed=0)
        >>> buf = MetricBuffer(("train/", "val/"), on_log=[])
        >>> buf.pending += [{"loss": torch.tensor(1.0)}, {"loss": torch.tensor(3.0)}]
        >>> buf.flush(state, epoch=0)  # the interval's mean, read back in one host sync
        {'train/loss': 2.0, 'epoch': 0}
    """

    def __init__(self, prefixes: tuple[str, str], on_log: list[Callable[..., Any]]) -> None:
        self.prefixes, self.on_log = prefixes, on_log
        self.pending: list[Metrics] = []
        self.owner: dict[str, str] = {"step": "fit", "epoch": "fit"}
        self.latest: dict[str, float] = {}

    def claim(self, names: Iterable[str], who: str) -> None:
        for name in names:
            check_metric_name(name, who)
            if self.owner.setdefault(name, who) != who:
                raise ValueError(
                    f"metric name collision: {name!r} comes from both {self.owner[name]} and {who}. Rename one of them "
                    f"(fit logs training metrics as '{self.prefixes[0]}<name>' and validation as '{self.prefixes[1]}<name>')."
                )

    def flush(self, state: TrainState, epoch: int) -> dict[str, float]:
        """Means over the interval, plus the callbacks' ``on_log`` values, read back in one host sync.

        The interval's metrics leave the buffer (:func:`fnlit.fit` puts them back when a second Ctrl-C cuts the
        read-back or the loggers' write off, so that the exit checkpoint keeps them).
        """
        names: list[str] = []
        tensors: list[torch.Tensor] = []
        if self.pending:
            pending, self.pending = self.pending, []
            if any(isinstance(v, Mapping) for m in pending for v in m.values()):  # {"parts": {"ce": ..}}: "parts/ce"
                pending = [flat_metrics(m) for m in pending]
            keys = pending[0].keys()
            if any(m.keys() != keys for m in pending):  # one set comparison per step: cheap on the usual path
                every = set(keys).intersection(*pending)
                k = next(k for m in pending for k in m if k not in every)  # the first one some step lacks
                raise KeyError(
                    f"the training step returned metric {k!r} at some steps but not others: return the same metric "
                    f"names at every step (the log shows each one's mean over the interval)."
                )
            members = ensemble_members(state)
            for k in keys:
                check_metric_name(k, "the training step")  # (before it is prefixed)
                vals = [m[k] for m in pending]
                if members and all(isinstance(v, torch.Tensor) and v.shape == (members,) for v in vals):
                    for name, t in _per_member(self.prefixes[0] + k, metric_float(torch.stack(vals)).mean(0)):
                        names.append(name)
                        tensors.append(t)
                    continue
                first = scalar_metric(k, vals[0], "the training step")  # names the metric if it is not a scalar
                if all(isinstance(v, torch.Tensor) and v.shape == first.shape for v in vals):
                    mean = metric_float(torch.stack(vals)).mean()  # one op for the interval, not one per step
                else:
                    # numbers among device tensors: all on the first tensor's device (stack needs one device), in
                    # one dtype (float64 if one is, where the device has it)
                    device = next((v.device for v in vals if isinstance(v, torch.Tensor)), first.device)
                    scalars = [scalar_metric(k, v, "the training step") for v in vals]
                    dtype = reduction_dtype(*scalars, device=device)
                    mean = torch.stack([t.to(device, dtype) for t in scalars]).mean()
                names.append(self.prefixes[0] + k)
                tensors.append(mean.detach())
            unique_names(names, "the training step")
            self.claim(names, "the training step")
        members = ensemble_members(state) if self.on_log else 0
        for hook in self.on_log:
            who = type(hook.__self__).__name__
            extra = dict(hook(state) or {})
            for k, v in list(extra.items()):
                if members and isinstance(v, torch.Tensor) and v.shape == (members,):
                    del extra[k]
                    per_member = dict(_per_member(k, v))
                    unique_names([*extra, *per_member], who)
                    extra.update(per_member)
            self.claim(extra, who)
            names += extra
            tensors += [scalar_metric(k, v, who) for k, v in extra.items()]
        if not names:
            return {}
        # Gathered on the accelerator where a value is there (a host number first, e.g. {"tokens": n, "loss": loss},
        # beside GPU means): a non_blocking copy from a GPU to the CPU lands after the CPU's stack reads it.
        device = next((t.device for t in tensors if t.device.type != "cpu"), tensors[0].device)
        dtype = reduction_dtype(*tensors, device=device)  # (float64 if one is: one stack, one dtype)
        values = torch.stack([t.to(device, dtype, non_blocking=True) for t in tensors]).tolist()  # the interval's host sync
        out = dict(zip(names, values), epoch=epoch)
        self.latest.update(out)
        return out
