"""The driver: :func:`fit` threads a TrainState through the data; :func:`evaluate` averages metrics.

Everything the loop knows is in :func:`fit`'s arguments and local variables: no trainer object, no
back-references. Option names and counting rules follow Lightning's ``Trainer`` (each rule is written
where it is applied, in :func:`_plan`). The per-step work is the step itself, a list append (of its metrics,
detached), and the callbacks that ask to run every step; metrics stay on the device and are read back once per
``log_every_n_steps`` (one host sync per interval).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import itertools
import math
import signal
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as torch_dist

from . import data as _data
from . import distributed as _dist
from . import tree as _tree
from ._checkpoint_io import is_sharded  # (without importing DTensor: ~0.7 s)
from ._types import Batch, Metrics, StepFn
from .callbacks import Callback, EarlyStopping, StopTraining, Timer, _seconds
from .checkpoint import Checkpointer
from .ensemble import EnsembleStep
from .functional import evaluating
from .state import TrainState
from .summary import (
    Logger, MetricBuffer, ProgressBar, Writer, _hparams_mapping, check_metric_name, ensemble_members, flat_metrics, metric_float, reduction_dtype, wide_dtype,
    scalar_metric, unique_names,
)
from .transforms._frame import collective_of, describe_result, require_state, wrapped_steps
from .transforms.data_parallel import first_difference
from .transforms.donate import is_donated

__all__ = ["fit", "evaluate"]

EvalStepFn = Callable[[TrainState, Batch], Metrics]
Position = dict[str, Any]  # epoch, batch, seed, steps (ints); callbacks (their states)
_END = object()  # what next() gives for data that has run out
"""Where the driver is: ``{"epoch": e, "batch": b, "seed": s, "steps": n}``: ``b`` batches of epoch ``e`` are done,
``n`` calls of step in all (a position saved before it was kept has none);
``"batches_per_epoch"``: ``len(train_data)``, where it has one (the size of those batches); ``"world_size"``
under torch.distributed; and ``"callbacks"``: the states of the callbacks that have one (``state_dict()``), by class
and order."""


def _containers_copied(tree: Any) -> Any:
    """``tree`` with its dicts, lists and tuples copied, not its tensors: a callback's state as it is now, even if
    its hooks then change those containers in place (tensors are replaced, not written, by fnlit's callbacks'
    validation and epoch-end hooks; an EMA's average is model-sized)."""
    if isinstance(tree, dict):
        return {k: _containers_copied(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_containers_copied(v) for v in tree) if type(tree) in (list, tuple) else tree
    return tree


def _num_batches(data: Iterable[Any]) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:  # no __len__ (a generator), or a DataLoader over an IterableDataset
        return None


class _LimitError(ValueError):
    """:func:`_limit`'s error, with why (0 not a valid limit, 1 a fraction of data without a len(), 2 a fraction that
    leaves less than one batch; 3, fit's own, empty training or validation data): the reason another rank is told."""

    def __init__(self, message: str, why: int) -> None:
        super().__init__(message)
        self.why = why


def _limit(limit: int | float | None, n: int | None, name: str, who: str = "fit") -> int | None:
    """Lightning's rule: an int is a number of batches, a float in [0, 1] a fraction of the epoch."""
    if limit is None:
        return n
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit < 0 or (isinstance(limit, float) and limit > 1):
        raise _LimitError(f"{who} expected {name} to be an int >= 0 or a float in [0.0, 1.0], got {name}={limit!r} instead.", 0)
    if isinstance(limit, int):
        return limit if n is None else min(n, limit)
    if n is None:
        if limit == 1.0:
            return None
        raise _LimitError(
            f"{who} got {name}={limit}, a fraction of the epoch, but the data has no len(). Pass an int number of batches.", 1
        )
    k = int(n * limit)
    if k == 0 and limit > 0 and n:  # (no batches at all: the caller's own error says so)
        raise _LimitError(f"{who} got {name}={limit}, but {limit} * {n} batches < 1. Use at least {name}={1 / n:.4g}.", 2)
    return k


def _fail_code(why: int) -> int:
    """The code the ranks' MAX carries for a failure of this rank's (``why``: :class:`_LimitError`'s); 0 is none."""
    return 4 * _dist.rank() + why + 1


def _deferred_limit(
    limit: int | float | None, n: int | None, name: str, who: str
) -> tuple[int | None, ValueError | None, int]:
    """Under torch.distributed: :func:`_limit`, or its error and a code for the other ranks (0: none), so that every
    rank raises at the ranks' next exchange (:func:`_limit_failed`) rather than wait there for the one that raised.

    The code is :func:`_fail_code`'s: the ranks' MAX names one of the failed ranks, and its reason.
    """
    try:
        return _limit(limit, n, name, who), None, 0
    except _LimitError as e:
        return n, e, _fail_code(e.why)


def _limit_failed(code: int, error: ValueError | None, limit: Any, name: str, who: str, val: bool = False) -> None:
    """Raises this rank's error from :func:`_deferred_limit`, or where another rank's failed (``code``: the ranks'
    MAX), says which rank and why (``val``: the validation limit's, whose reason 3 is val_data without batches)."""
    if error is not None:
        raise error
    if code:
        rank, why = divmod(code - 1, 4)
        if why == 3 and val:
            raise ValueError(
                f"{who}: rank {rank} got val_data with no batches (its shard of the validation data holds none), so "
                "it cannot validate with the others. Give every rank at least one batch (that rank says more), or "
                "pass limit_val_batches=0 to train without validation."
            )
        if why == 3:
            raise ValueError(
                f"{who}: rank {rank} got empty training data (len(train_data) == 0), so it cannot run the steps the "
                "others' gradient all-reduces wait for. Give every rank batches: fnlit.data.ArrayLoader shards evenly."
            )
        reason = (
            "it is not an int >= 0 or a float in [0.0, 1.0]",
            "it is a fraction of the epoch, but that rank's data has no len(); pass an int number of batches",
            "it is a fraction of that rank's batches that leaves less than one; pass a larger one, or an int",
        )[why]
        raise ValueError(f"{who} got {name}={limit!r}, which rank {rank} cannot apply: {reason} (that rank says more).")


@dataclasses.dataclass(frozen=True)
class _Plan:
    max_epochs: int  # -1: no limit
    min_epochs: int
    max_steps: float  # math.inf: no limit
    batches: int | None  # per epoch, after limits; None: until the data runs out
    length: int | None  # len(train_data): this rank's batches per epoch before limits (None: no len())
    sequential: bool  # overfit_batches: same batches every epoch
    val_batches: int | None  # per validation run (None: all)
    val_check_batch: int | None  # validate when the batch count is a multiple; None: at the epoch's end
    val_every_n_epoch: int | None  # None: val_check_batch counts batches across epochs
    validate: bool
    sanity_steps: int  # -1: every batch of validation data without a len()
    log_every: int
    quiet: bool  # fast_dev_run: no logging, no checkpoints
    # under torch.distributed: the validation limit's failure code and error on this rank (_deferred_limit: raised at
    # the ranks' first exchange, _same_batches), the limit and its name; the same for the training limit (or empty
    # training data)
    val_limit: tuple[int, ValueError | None, Any, str] = (0, None, None, "limit_val_batches")
    train_limit: tuple[int, ValueError | None, Any, str] = (0, None, None, "limit_train_batches")

    def validates_in(self, epoch: int) -> bool:
        return self.validate and (self.val_every_n_epoch is None or (epoch + 1) % self.val_every_n_epoch == 0)


def _plan(o: dict[str, Any], train_data: Iterable[Any], val_data: Iterable[Any] | None) -> _Plan:
    """Resolves the options with Lightning's rules (lightning/pytorch/trainer/setup.py, loops/fit_loop.py)."""
    fdr = o["fast_dev_run"]
    if isinstance(fdr, bool) or fdr is None:
        fdr = int(bool(fdr))
    if not isinstance(fdr, int) or fdr < 0:
        raise ValueError(f"fit expected fast_dev_run to be a bool or an int >= 0, got fast_dev_run={fdr!r} instead.")
    _seconds(o["max_time"])  # refused here, before any work (a checkpoint's load, a collective), as Timer refuses it
    limit_train, limit_val, vci = o["limit_train_batches"], o["limit_val_batches"], o["val_check_interval"]
    max_epochs, max_steps, every_n, sanity = o["max_epochs"], o["max_steps"], o["check_val_every_n_epoch"], o["num_sanity_val_steps"]
    # Lightning's checks: -1 is "no limit" (all, for the sanity check); anything below it is refused
    for name, value in (("max_epochs", max_epochs), ("max_steps", max_steps), ("num_sanity_val_steps", sanity)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < -1):
            raise ValueError(f"fit expected {name} to be an int >= -1 (-1: {'all' if name[0] == 'n' else 'no limit'}), "
                             f"got {name}={value!r} instead.")
    min_epochs, seed, prefixes = o["min_epochs"], o["seed"], o["prefixes"]
    if min_epochs is not None and (isinstance(min_epochs, bool) or not isinstance(min_epochs, int) or min_epochs < 0):
        raise ValueError(f"fit expected min_epochs to be an int >= 0 or None, got min_epochs={min_epochs!r} instead.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"fit expected seed to be an int or None (the data-order seed), got seed={seed!r} instead.")
    if not (isinstance(prefixes, (tuple, list)) and len(prefixes) == 2 and all(isinstance(x, str) for x in prefixes)):
        raise TypeError(
            f"fit expected prefixes to be two strings (training, validation), e.g. ('train/', 'val/'), got "
            f"prefixes={prefixes!r} instead."
        )
    if every_n is None and isinstance(vci, float):  # (as given: left unset, it becomes 1.0 below, allowed)
        raise ValueError(
            "fit expected val_check_interval to be an int number of training batches when check_val_every_n_epoch=None "
            f"(it then counts batches across epochs, not a fraction of each), got val_check_interval={vci!r} instead. "
            "Pass an int, or check_val_every_n_epoch=1 to validate at fractions of every epoch (Lightning refuses it too)."
        )
    if fdr:  # fast_dev_run=N: N train and N val batches, one epoch, max_steps=N, no sanity check, logs, checkpoints
        limit_train = limit_val = fdr
        max_steps, max_epochs, sanity, vci, every_n = fdr, 1, 0, 1.0, 1
    overfit = o["overfit_batches"]
    if overfit:  # overfit_batches=N: the first N batches every epoch, unshuffled; validation on N batches too
        limit_train = limit_val = overfit
    n = _num_batches(train_data)
    train_name, train_error, train_failed = "overfit_batches" if overfit else "limit_train_batches", None, 0
    empty = ValueError(
        "fit got empty training data (len(train_data) == 0). Check the dataset and batch_size." + _per_rank("train")
    )
    if _dist.world_size() > 1:  # raised on every rank at the ranks' first exchange, as the validation limit
        if n == 0:
            batches, train_error, train_failed = 0, empty, _fail_code(3)
        else:
            batches, train_error, train_failed = _deferred_limit(limit_train, n, train_name, "fit")
    elif n == 0:
        raise empty
    else:
        batches = _limit(limit_train, n, train_name)
    if max_steps is None or max_steps == -1:
        max_steps = math.inf
    if max_epochs is None:
        # Lightning: max_epochs=1000 when neither is given; -1 (no limit) when max_steps is, or a time limit
        # (max_time, or a Timer callback: Lightning's rule; here one that has a duration, not one that measures)
        timed = o["max_time"] is not None or any(isinstance(cb, Timer) and cb.duration is not None for cb in o["callbacks"])
        if max_steps != math.inf or timed:
            max_epochs = -1
        elif n is None and batches is None and not train_failed:  # (an int limit_train_batches bounds its epochs)
            raise ValueError(
                "fit got endless training data (it has no len()) and neither max_epochs nor max_steps: it would "
                "never stop. Pass max_steps=... (or max_epochs=..., max_time=..., or limit_train_batches=N)."
            )
        else:
            max_epochs = 1000
    # A one-shot iterator gives its first batches once: a second epoch would train on the next ones (islice of the
    # same iterator), not the same first N. Refused unless one epoch runs (max_epochs=1, or max_steps within it).
    if overfit and isinstance(train_data, Iterator) and max_epochs != 0 and max_epochs != 1 and not (
        batches is not None and max_steps <= batches
    ):
        raise TypeError(
            _ONE_SHOT_TRAIN.format(kind=type(train_data).__name__)
            + " (one epoch works: max_epochs=1, or max_steps <= overfit_batches)."
        )
    validate = val_data is not None
    if validate and o["eval_step"] is None:
        raise ValueError("fit got val_data but no eval_step. Pass eval_step=fnlit.eval_step(model, metrics_fn).")
    # An ArrayLoader's evaluation shards (every example once across ranks) differ from its training shards.
    n_val_data = val_data.eval_len() if _data.direct_array_loader(val_data) else _num_batches(val_data)  # type: ignore[arg-type]
    val_name, val_error, val_failed = "overfit_batches" if overfit else "limit_val_batches", None, 0
    off = not isinstance(limit_val, bool) and isinstance(limit_val, (int, float)) and limit_val == 0
    if not validate:
        n_val = 0
    elif n_val_data == 0 and not off:  # (Lightning warns and skips validation; limit_val_batches=0 says so)
        n_val, val_error, val_failed = 0, ValueError(_NO_VAL_BATCHES + _per_rank("val")), _fail_code(3)
        if _dist.world_size() == 1:
            raise val_error
    elif _dist.world_size() > 1:  # a limit that fails on one rank fails on all, at the ranks' first exchange
        n_val, val_error, val_failed = _deferred_limit(limit_val, n_val_data, val_name, "fit")
    else:
        n_val = _limit(limit_val, n_val_data, val_name)
    validate = validate and n_val != 0
    if vci is None:
        vci = 1.0
    val_check: int | None = None
    if validate and isinstance(vci, int) and not isinstance(vci, bool):
        # An int is a number of training batches; within an epoch unless check_val_every_n_epoch=None.
        if vci < 1:
            raise ValueError(f"fit expected val_check_interval to be an int >= 1 or a float in (0, 1], got {vci!r} instead.")
        if every_n is not None and batches is not None and vci > batches and not train_failed:
            raise ValueError(
                f"fit got val_check_interval={vci}, more than the {batches} training batches of an epoch, so "
                "validation would never run. Use val_check_interval <= the epoch, a float fraction of it, or "
                "check_val_every_n_epoch=None to count batches across epochs (limit_val_batches=0 disables validation)."
            )
        val_check = vci
    elif validate:
        # A float is a fraction of the epoch: validate every max(1, int(batches * fraction)) batches.
        if not isinstance(vci, float) or not 0 < vci <= 1:
            raise ValueError(f"fit expected val_check_interval to be an int or a float in (0, 1], got {vci!r} instead.")
        if batches is None and vci != 1.0 and not train_failed:
            raise ValueError(
                f"fit got val_check_interval={vci}, a fraction of the epoch, but the training data has no len(). "
                "Pass an int number of batches, or 1.0."
            )
        # 1.0 without a len(): at the epoch's end, which may come before limit_train_batches.
        val_check = None if batches is None or (n is None and vci == 1.0) else max(1, int(batches * vci))
    if every_n is not None and (isinstance(every_n, bool) or not isinstance(every_n, int) or every_n < 1):
        raise ValueError(f"fit expected check_val_every_n_epoch to be an int >= 1 or None, got {every_n!r} instead.")
    # num_sanity_val_steps: validation batches run before training (-1: all), results discarded.
    # (-1 stays -1 for data without a len(): all of its batches)
    sanity = 0 if not validate else ((-1 if n_val is None else n_val) if sanity == -1 else sanity if n_val is None else min(sanity, n_val))
    # A generator has data for one pass: refused unless exactly one validation can run (no sanity check, one epoch that
    # validates at its end, or once, mid-epoch), before any training that a later failure would lose.
    if validate and isinstance(val_data, Iterator) and (
        sanity or max_epochs != 1 or (val_check is not None and batches is not None and 2 * val_check <= batches)
    ):
        raise TypeError(
            _ONE_SHOT_VAL.format(kind=type(val_data).__name__)
            + " (one validation works: num_sanity_val_steps=0, max_epochs=1, validating once)."
        )
    log_every = o["log_every_n_steps"]
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"fit expected log_every_n_steps to be an int >= 1, got {log_every!r} instead.")
    return _Plan(
        max_epochs=max_epochs, min_epochs=o["min_epochs"] or 0, max_steps=max_steps, batches=batches,
        length=n, sequential=bool(overfit), val_batches=n_val, val_check_batch=val_check, val_every_n_epoch=every_n,
        validate=validate, sanity_steps=sanity or 0, log_every=log_every, quiet=bool(fdr),
        val_limit=(val_failed, val_error, limit_val, val_name), train_limit=(train_failed, train_error, limit_train, train_name),
    )  # fmt: skip


_NO_VAL_BATCHES = (
    "fit got val_data with no batches, so it would never validate. Check the dataset and batch_size: a loader with "
    "drop_last=True yields no batch from fewer examples than batch_size. Pass limit_val_batches=0 (or no val_data) "
    "to train without validation."
)


# What the errors of data without batches add under torch.distributed: each rank has its own shard ({w}: ranks).
_PER_RANK = {
    "train": "trains on its own shard, about 1/{w} of the examples (an ArrayLoader's, a DistributedSampler's), in "
             "batches of batch_size (a global batch of {w} * batch_size): a rank can have no batch where one process "
             "has some.",
    "val": "counts the batches of its own shard, about 1/{w} of the examples (a DistributedSampler's): drop_last=True "
           "can leave a rank none where one process has some (an ArrayLoader's evaluation splits one process's "
           "batches instead).",
}


def _per_rank(kind: str) -> str:
    """Under torch.distributed, what the error of ``kind`` ("train" or "val") data without batches adds."""
    w = _dist.world_size()
    return "" if w == 1 else f" Under torch.distributed each rank {_PER_RANK[kind].format(w=w)}"


_ONE_SHOT_TRAIN = (
    "fit got train_data as a one-shot iterator ({kind}) with overfit_batches, but every epoch trains on the same "
    "first batches, and a one-shot iterator gives them once (a second epoch would take the next ones). Pass a list "
    "of batches, a DataLoader, or an ArrayLoader"
)

_ONE_SHOT_VAL = (
    "fit got val_data as a one-shot iterator ({kind}), but every validation (and the sanity check) iterates its "
    "data from the start. Pass a list of batches, a DataLoader, or an object whose __iter__ starts over"
)


def evaluate(eval_step: EvalStepFn, state: TrainState, data: Iterable[Batch], limit_batches: int | float | None = None) -> dict[str, float]:
    """Runs ``eval_step(state, batch) -> metrics`` over ``data``; returns each metric's mean over examples.

    Each batch's metrics are weighted by its size (the leading dimension of its first tensor or NumPy array that has
    one, else 1, with a warning where it holds Python lists; for an
    ensemble's per-member batches, the examples each member gets, :meth:`fnlit.ensemble.EnsembleStep.examples`, also
    through a wrapper such as ``torch.compile``), so a smaller last batch counts for what it holds, and an empty one
    (size 0) not at all. Sums stay on the device; there is one host sync, at the end
    (under torch.distributed, sums are added across ranks first, by metric name; the ranks check before, in one
    more small all-reduce and host sync, that their eval steps returned the same names). The state is never changed.

    Under torch.distributed the ranks may hold different numbers of batches; the result is the mean over all
    of them. Unless the data is an ArrayLoader (its shards are even), the ranks exchange their counts first (one
    more host sync; data without a len() reads its first batch ahead, to tell whether it has one), so a
    limit_batches that fails on one rank, or a rank without a batch while others have some, is a clear error on
    every rank. As a sharded model's forward is a collective, every rank of a sharded state runs as many: a rank
    with fewer repeats its first batch, not counted (where some rank's data has no len(), they agree before each
    batch whether one still has one). An unsharded state's ranks run their own batches only, but an ArrayLoader's
    ranks each run :meth:`~fnlit.data.ArrayLoader.eval_len` batches, a filler (not counted) included.
    Every example a rank's data holds counts: a DistributedSampler (drop_last=False, its default) pads the
    shards by repeating examples, and those repeats are counted (5 examples on 2 ranks: 6 counted, as with
    Lightning's validation); use an :class:`fnlit.data.ArrayLoader` for exact metrics.

    Args:
        eval_step: ``(state, batch) -> dict of scalar tensors`` (e.g. :func:`fnlit.eval_step`).
        state: the state to evaluate (e.g. ``ema.state(state)``).
        data: any iterable of batches. An :class:`fnlit.data.ArrayLoader` is read in its unshuffled order (as
            Lightning's validation loaders are sequential), on any number of ranks; a subclass that overrides
            ``__iter__`` (an augmentation) is iterated as it is, as any other iterable.
        limit_batches: an int number of batches, or a float fraction of ``len(data)``.

    Raises:
        ValueError: if a metric is not a scalar (naming it and its shape), there are no batches (or only
            empty ones), or under torch.distributed a rank has no batch while others have some,
            limit_batches fails on some rank, or the eval step is an ensemble's and the ranks' states differ
            (every rank raises; checked before any batch: a checksum of the state's tensors on the host, as
            :func:`fnlit.distributed.check_same_state`, and two more small collectives). What eval_step raises passes through; where the
            state is an ensemble's stacked state and eval_step no ensemble step, with a note to wrap it in
            :func:`fnlit.ensemble`.
        KeyError: if eval_step returns other metric names for some batches than for the first (``{}``
            included), or under torch.distributed other names on some ranks (every rank raises).
        TypeError: if eval_step returns something other than a dict, or a metric that is not a number or tensor.

    Example:
        >>> import torch, fnlit
        >>> from fnlit.loop import evaluate
        >>> model = torch.nn.Linear(1, 1)
        >>> state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
        >>> step = lambda state, batch: {"x": batch.mean()}
        >>> evaluate(step, state, [torch.zeros(3), torch.ones(1)])
        {'x': 0.25}
    """
    # per-member batches (fnlit.ensemble(..., in_dims=0)) count examples past their member dimension, also through a
    # wrapper around the ensemble (torch.compile(fnlit.ensemble(...)), a functools.wraps function: its __wrapped__)
    ensembled = _ensemble_step(eval_step)
    if ensembled is not None and _dist.world_size() > 1:  # the ranks add "<name>/<member>" sums: the same members
        found = first_difference(state)
        if found is not None:
            raise ValueError(_ENSEMBLE_APART.format(what=found[0], path=found[1]))
    if _data.direct_array_loader(data):
        # Unshuffled, every example once across ranks (training shards drop the remainder): the batches one process
        # runs, rank r taking batches r, r + W, ...; a rank with fewer runs a filler batch that does not count, so
        # every rank runs as many forwards (a sharded one is a collective). limit_batches=k counts per rank (as
        # Lightning's): the first k batches of that order in one process, the first k * W across W ranks.
        n = _limit(limit_batches, data.eval_len(), "limit_batches", "evaluate")
        batches: Iterable[tuple[Any, bool]] = data.eval_batches()
    elif _dist.world_size() > 1:  # (limit_batches too: a rank it fails on raises with the others, not alone)
        batches, n = _even_batches(data, limit_batches, state)
    else:
        n = _limit(limit_batches, _num_batches(data), "limit_batches", "evaluate")
        batches = ((b, True) for b in data)
    move = _data.device_mover(state.device)
    names: list[str] | None = None  # (None until the first batch: a first batch's {} sets no metrics, not "unset")
    names_set: set[str] = set()
    sums: list[torch.Tensor] = []
    count = 0
    members = ensemble_members(state)
    examples = ensembled.examples if ensembled is not None else _data.batch_size_of
    unsized = False  # (warned once: a batch without a tensor or array counts as one example)

    def value(k: str, v: Any) -> torch.Tensor:  # an ensemble's metric has one value per member: "<name>/<member>"
        if members and isinstance(v, torch.Tensor) and v.shape == (members,):
            return metric_float(v)
        return scalar_metric(k, v, "the eval step")

    with torch.no_grad(), evaluating():  # (an apply left in training mode is told, once)
        for batch, counts in itertools.islice(iter(batches), n):
            batch = move(batch) if move else batch
            try:
                metrics = eval_step(state, batch)
            except Exception as e:  # (a plain eval step given stacked params fails deep inside: say why)
                if members and ensembled is None:
                    _add_note(e, _NOT_ENSEMBLED.format(who="fnlit.evaluate", what="eval step", name="eval_step",
                                                       n=members))
                raise
            if not isinstance(metrics, Mapping):
                raise TypeError(f"evaluate expected eval_step to return a dict of metrics, got {type(metrics).__name__}.")
            if any(isinstance(v, Mapping) for v in metrics.values()):  # {"parts": {"ce": ..}} is logged as "parts/ce"
                metrics = flat_metrics(metrics)
            # an empty batch (size 0) holds no examples: it does not count (its means are NaN, and NaN * 0 is NaN)
            size = examples(batch) if counts else 0
            listed = size == 1 and not unsized and _data._holds_list(batch)
            if listed and next(_data._leading_sizes(batch), None) is None:
                unsized = True  # (examples in Python lists: Lightning cannot infer a size there either)
                warnings.warn(_UNSIZED_BATCH.format(kind=type(batch).__name__), stacklevel=2)
            if not size and not metrics:  # an empty batch's {} (a guard for no examples): nothing to count or check
                continue
            if names is None:
                names, names_set = list(metrics), set(metrics)
                for k in names:
                    check_metric_name(k, "the eval step")
                sums = [value(k, metrics[k]) * size if size else torch.zeros_like(value(k, metrics[k])) for k in names]
            else:
                if metrics.keys() != names_set:
                    k = next(iter(metrics.keys() ^ names_set))
                    raise KeyError(
                        f"the eval step returned metric {k!r} for some batches but not others: return the same metric "
                        "names for every batch (evaluate averages each over all of them)."
                    )
                if size:
                    sums = [s + value(k, metrics[k]) * size for s, k in zip(sums, names)]
            count += size
    # each metric's entries: its name, or "<name>/<member>" for an ensemble's
    flat = [k if s.dim() == 0 else f"{k}/{j}" for k, s in zip(names or [], sums) for j in range(s.numel())]
    if _dist.world_size() > 1:  # (before the no-metrics error: a rank alone without metrics raises with the others)
        _same_names_on_every_rank(flat, state.device)
    if not names:
        raise ValueError(
            "evaluate got no batches (or no metrics); check the data (a loader with drop_last=True yields no batch "
            "from fewer examples than batch_size) and limit_batches."
        )
    # one tensor, one dtype for the one all-reduce: float64 where a metric is float64 or an integer (float32 ones
    # alone stay float32), float32 on a device without float64 (MPS). Across ranks always float64 (but on MPS): the
    # dtype must not depend on a rank's own metrics (a fallback 0.0 on one rank beside a float32 tensor on another
    # made collectives of different sizes), as all_reduce_metrics does for the step's metrics.
    device = sums[0].device
    if _dist.world_size() > 1:
        dtype = wide_dtype(device)
    else:
        dtype = reduction_dtype(*sums, device=device)
    # in sorted name order: each rank built its dict in its own order (a dict merge), and the all-reduce adds by position
    order = sorted(range(len(names)), key=names.__getitem__)
    totals = torch.cat([sums[i].reshape(-1).to(device, dtype) for i in order] + [torch.tensor([float(count)], dtype=dtype, device=device)])
    if _dist.world_size() > 1:
        torch_dist.all_reduce(totals)
    values = totals.tolist()  # the one host sync
    if values[-1] == 0:
        raise ValueError("evaluate got no examples (batches of size 0); check the data and limit_batches.")
    unique_names(flat, "the eval step")
    starts = dict(zip(order, itertools.accumulate([0] + [sums[i].numel() for i in order])))  # each metric's place
    place = [starts[i] + j for i, s in enumerate(sums) for j in range(s.numel())]
    return {k: values[j] / values[-1] for k, j in zip(flat, place)}  # (in the eval step's own order)


def _same_names_on_every_rank(names: list[str], device: torch.device) -> None:
    """Under torch.distributed: raises evaluate's KeyError on every rank unless every rank's eval step returned
    the same metric names (one all-reduce of a CRC-32 of the sorted names and one host sync; on a mismatch, the
    ranks gather their names to say which differs)."""
    if _dist._all_equal("\0".join(sorted(names)), device):  # (once per evaluate)
        return
    gathered: list[Any] = [None] * _dist.world_size()
    torch_dist.all_gather_object(gathered, sorted(names))
    counts = [collections.Counter(g) for g in gathered]  # (a Counter: a name given twice differs too)
    k = min(n for n in set().union(*gathered) if len({c[n] for c in counts}) > 1)
    ranks = [r for r, c in enumerate(counts) if c[k]]
    raise KeyError(
        f"the eval step returned metric {k!r} for some batches but not others (under torch.distributed: on rank(s) "
        f"{ranks} of {len(gathered)}): return the same metric names for every batch on every rank (evaluate "
        "averages each over all of them)."
    )


_UNSIZED_BATCH = (
    "evaluate weights each batch's metrics by its size, the leading dimension of its first tensor or NumPy array, "
    "but a batch ({kind}) holds none, its examples in Python lists: each such batch counts as one example, so a smaller "
    "last batch weighs as much as a full one. Make the batch's examples a tensor or array (a DataLoader's collate "
    "does), or pass batches of equal size."
)


_ENSEMBLE_DISTRIBUTED = (
    "fnlit.fit got an ensemble step (fnlit.ensemble) under torch.distributed ({w} processes), but an ensemble cannot "
    "be data-parallel, and fit under torch.distributed trains data-parallel: each rank would train its members on "
    "its own shard of the data, and a checkpoint would hold rank 0's members only. Train the ensemble in one "
    "process, or split its members across separate processes without a process group (each with its own seeds, "
    "fit, checkpoint folder and logs)."
)


_ENSEMBLE_APART = (
    "fnlit.evaluate got an ensemble step under torch.distributed, but the ranks hold different ensemble states "
    "({what} differ at {path}): it adds the ranks' metrics by name, member by member, so the members of one rank "
    "would be mixed with another's. Evaluate each rank's own members in a process without a process group (or in "
    "a loop of one's own), or give every rank the same ensemble state."
)


def _ensemble_step(step: Any) -> EnsembleStep | None:
    """The :class:`EnsembleStep` among ``step``'s wrappers (``torch.compile(fnlit.ensemble(...))`` too), or None."""
    return next((s for s in wrapped_steps(step) if isinstance(s, EnsembleStep)), None)


_NOT_ENSEMBLED = (
    "{who}: the state is an ensemble's stacked state ({n} members: its tensors have a leading dimension {n}), "
    "and the {what} is not an ensemble step, as far as its wrappers show. If it is not one, wrap it: "
    "fnlit.ensemble({name}, {n}) (with in_dims=0 for batches stacked over the members)."
)


def _even_batches(
    data: Iterable[Batch], limit: int | float | None, state: TrainState, no_batch: str | None = None
) -> tuple[Iterable[tuple[Any, bool]], int | None]:
    """Under torch.distributed: this rank's batches (each with whether it counts) and how many to run of them.

    The ranks exchange, in one all-reduce, whether ``limit`` (limit_batches) failed on one, whether each has a
    batch (data without a len() reads its first one ahead) and their counts: a failed limit, or a rank with none
    while others have some, is an error on every rank (the rank alone would have skipped the collectives the
    others wait in).
    A sharded model's forward is a collective, so there every rank runs as many forwards: as in
    :meth:`fnlit.data.ArrayLoader.eval_batches`, a rank with fewer batches repeats its first one, not counted;
    where some rank's data has no len(), they agree before each batch whether any rank still has one (a host
    sync per batch). An unsharded state's forwards are not collectives: each rank runs its own batches only.
    ``no_batch``: the message (with ``{counts}`` and ``{even}``) for a rank with none while others have some
    (default evaluate's; update_bn passes its own).
    """
    known = _num_batches(data)
    n, error, failed = _deferred_limit(limit, known, "limit_batches", "evaluate")
    it, first = iter(data), _END
    if not failed and n != 0:
        first = next(it, _END)  # (data without a len() tells whether it holds a batch only when read)
    has = first is not _END
    own: Iterator[Any] = itertools.chain([first], it) if has else iter(())
    high, low = _dist._extremes([failed, int(known is None), int(has), n or 0], state.device)  # (once per evaluate)
    (code, unsized, some_have, most), (all_have, least) = high, low[2:]
    _limit_failed(code, error, limit, "limit_batches", "evaluate")
    if some_have and not all_have:
        counts = "some without a len(), and one rank with none" if unsized else f"from {least} to {most} batches"
        this = n if known is not None else "some" if has else "none"
        raise ValueError((no_batch or _NO_EVAL_BATCH).format(counts=f"{counts}, this rank {this}", even=_EVEN_SHARDS))
    if not is_sharded(state.params):  # each rank runs its own batches: the forwards are not collectives
        return ((b, True) for b in own), n
    if not unsized:

        def filled() -> Iterator[tuple[Any, bool]]:
            yield from ((b, True) for b in itertools.islice(own, n))
            for _ in range(most - (n or 0)):  # (n < most: this rank ran out first)
                yield first, False

        return filled(), most

    def voted() -> Iterator[tuple[Any, bool]]:
        mine = True
        for i in itertools.count():  # (a rank whose count is known votes on until every rank has run out)
            b = next(own, _END) if mine and (n is None or i < n) else _END
            mine = b is not _END
            vote = torch.tensor([int(mine)], dtype=torch.int64, device=state.device)
            torch_dist.all_reduce(vote, op=torch_dist.ReduceOp.MAX)
            if not vote.item():  # (once per batch: data without a len() gives no count to share)
                return
            yield (b, True) if mine else (first, False)

    return voted(), None


_NO_EVAL_BATCH = (
    "evaluate: the ranks have different numbers of evaluation batches ({counts}), and a rank without any has "
    "no metrics to add to the others' (nor a batch for a sharded model's filler forwards). Give every rank at "
    "least one batch: {even}"
)
# (a DistributedSampler pads its shards with repeated examples, or drops some with drop_last=True)
_EVEN_SHARDS = (
    "fnlit.data.ArrayLoader gives every rank a share and counts every example once; DistributedSampler evens the "
    "shards by repeating examples (or dropping them, drop_last=True), and evaluate counts the repeats."
)


class _Signals:
    """SIGINT/SIGTERM set ``reason`` (the current step finishes); a second Ctrl-C interrupts at once -- except while
    ``hold`` is set (the per-step hooks run: a callback cut off there, the ones after it would miss that step for
    good, an EMA one update), where it is ``held`` until they return; a third interrupts at once even there.

    SIGTERM then calls the handler that was there before, when it is a Python callable (a preemption hook: a
    requeue, a tracker's cleanup, a flag the script reads after fit), as Lightning's signal connector composes its
    handler with the previous one; an outer fit's handler too, so that fit stops as well (and calls what it
    replaced). What that handler raises (``sys.exit``, an exception) is ``raised`` later: a raise here, anywhere in
    a step, a callback or a write, would end fit without its exit save; fit raises it once that save is done.
    SIGINT keeps fit's Ctrl-C semantics (Python's own handler raises KeyboardInterrupt at once)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.previous: dict[int, Any] = {}
        self.hold = self.held = False
        self.raised: BaseException | None = None

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():  # Python only allows handlers there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.reason is not None:
            if self.hold and not self.held:
                self.held = True
                return
            raise KeyboardInterrupt
        self.reason = "sigint" if signum == signal.SIGINT else "sigterm"
        chained = self.previous.get(signal.SIGTERM)
        if signum == signal.SIGTERM and callable(chained):  # (not SIG_DFL, SIG_IGN, nor None: set outside Python)
            try:
                chained(signum, frame)
            except BaseException as e:  # noqa: BLE001 (fit raises it after its exit save)
                self.raised = self.raised or e

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        for sig, old in self.previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        if error is not None and self.raised is not None:  # fit failed on the way out (the held one is raised after)
            _add_note(error, f"(The SIGTERM handler fit called had raised {self.raised!r}, held until fit's exit save; "
                             "fit raises this error instead.)")


_REASONS = (None, "stopped", "sigint", "sigterm")


def _agree(halt: bool, reason: str | None, device: torch.device) -> tuple[bool, str | None]:
    """Under torch.distributed, whether any rank wants to stop (and why): all ranks then stop at the same step."""
    code = torch.tensor(_REASONS.index(reason) if reason else int(halt), device=device)
    torch_dist.all_reduce(code, op=torch_dist.ReduceOp.MAX)
    c = int(code)
    if not 0 <= c < len(_REASONS):  # the vote met another collective (a gradient all-reduce) on some rank
        raise RuntimeError(_OUT_OF_STEP)
    return c > 0, _REASONS[c] if c >= 2 else reason


_OUT_OF_STEP = (
    "fit: the ranks fell out of step (one rank's stop vote at an epoch end or log interval met another rank's "
    "gradient all-reduce). Did the ranks get different numbers of batches? Give every rank as many batches per "
    "epoch: fnlit.data.ArrayLoader and DistributedSampler(drop_last=True) do."
)


def _check_last_batch(step: StepFn, data: Any, batches: int | None, steps_left: float, batch: int) -> None:
    """Raises before training when an epoch's last, short batch cannot be split into the micro-batches of the
    ``accumulate`` in ``step`` and the run reaches it (``steps_left`` steps from batch ``batch`` of an epoch): the run
    would fail there (Lightning's accumulate_grad_batches takes a short batch; fnlit's micro-batches are equal parts
    of one batch)."""
    k = math.prod(getattr(s, "accumulate_k", 1) for s in wrapped_steps(step))  # accumulate(accumulate(s, 2), 2): 4
    if k == 1:
        return
    if _data.direct_array_loader(data):
        n, size, drop = data.num_examples, data.batch_size, data.drop_last
    elif isinstance(data, torch.utils.data.DataLoader) and type(data.batch_sampler) is torch.utils.data.BatchSampler and (
        hasattr(data.batch_sampler.sampler, "__len__")
    ):  # batch_size=, or torch's own BatchSampler as batch_sampler= (one of the user's class may batch otherwise)
        bs = data.batch_sampler
        n, size, drop = len(bs.sampler), bs.batch_size, bs.drop_last  # (a DistributedSampler's: this rank's)
    else:
        return
    last, count = n % size, -(-n // size)
    if drop or not last or last % k == 0 or (batches is not None and batches < count) or steps_left <= count - 1 - batch:
        return  # (limit_train_batches or max_steps stop before the last batch: it is never reached)
    raise ValueError(
        f"fit: the last batch of each epoch holds {last} examples ({n} in batches of {size}), which accumulate(step, "
        f"k={k}) cannot split into {k} equal micro-batches: the run would fail there. Pass drop_last=True to the "
        f"loader, or a batch size that leaves a multiple of {k}."
    )


def _same_batches(
    n: int | None, seed: int, device: torch.device, validates: bool, val_limit: tuple[int, ValueError | None, Any, str],
    train_limit: tuple[int, ValueError | None, Any, str] = (0, None, None, "limit_train_batches"),
) -> int:
    """Under torch.distributed: every rank must run as many batches per epoch (each step's collectives pair up),
    and validate or not alike (``evaluate`` runs the ranks' different numbers of validation batches together,
    but a rank without any would skip the validations). A validation limit that failed on some rank
    (``val_limit``: :func:`_deferred_limit`'s code and error, the limit and its name) is raised on every rank, as is
    a training limit that failed, or empty training data (``train_limit``), first.

    Returns rank 0's data-order seed, in the same all-reduce: the ranks cut one order into their shards (as
    DistributedSampler asks of its ``seed``), and a resume reads rank 0's. A rank may hold an rng of its own
    (``check_same_state`` leaves it out), so the seeds the ranks took from their states may differ.
    """
    none = -1 if n is None else n
    # The other ranks send int64's least, so the max is rank 0's seed; one outside int64 goes wrapped (the order
    # only depends on it modulo 2**63: epoch_seed's mask).
    sent = ((seed + 2**63) % 2**64) - 2**63 if _dist.rank() == 0 else -(2**63)
    failed, error, limit, name = val_limit
    # (once, at the start of fit)
    high, low = _dist._extremes([none, sent, int(validates), failed, train_limit[0]], device)
    (most, first, any_validate, code, train_code), (least, all_validate) = high, (low[0], low[2])
    _limit_failed(train_code, *train_limit[1:], "fit")
    _limit_failed(code, error, limit, name, "fit", val=True)
    if most != least:
        raise ValueError(
            f"fit: the ranks have different numbers of training batches per epoch (from {least} to {most}; -1: "
            f"no len()), this rank {n}. Each step's gradient all-reduce pairs the ranks' steps, so they must run as "
            "many: fnlit.data.ArrayLoader shards evenly, as does DistributedSampler(drop_last=True)."
        )
    if any_validate and not all_validate:
        raise ValueError(
            f"fit: some ranks have validation batches and others none (this rank {'some' if validates else 'none'}), "
            f"so only some would validate. Give every rank at least one: {_EVEN_SHARDS}"
        )
    return seed if _dist.rank() == 0 else first


def _epoch_end_cut(callbacks: dict[str, Any] | None, validated: bool, stop: bool) -> dict[str, Any]:
    """The exit position's marks for an epoch end a second Ctrl-C cut off: pending (the resume runs it first), with
    the callbacks' states from before it, whether its validation is done and whether a stop was requested."""
    return {"epoch_end_pending": True, **({} if callbacks is None else {"callbacks": callbacks}),
            **({"validated": True} if validated else {}), **({"stop_requested": True} if stop else {})}


_HOOKS = ("on_fit_start", "on_step", "on_log", "on_validation_start", "on_validation", "on_epoch_end", "on_fit_end")


def _defines(cb: Any, name: str) -> bool:
    """Whether callback ``cb`` has method ``name`` other than :class:`~fnlit.callbacks.Callback`'s no-op: overridden,
    set on the instance, or on an object of any class (not a flag of the same name: ``self.on_step = True``)."""
    method = getattr(cb, name, None)
    return callable(method) and getattr(method, "__func__", None) is not getattr(Callback, name)


def _stateful(callbacks: Sequence[Any], by_class: bool = False) -> list[tuple[str, Any]]:
    """The callbacks that may have a state to checkpoint (``state_dict`` and ``load_state_dict``, other than
    :class:`~fnlit.callbacks.Callback`'s no-ops), keyed by their ``state_key`` (default: the class name) and their
    order among those of that key (``by_class``: by class name and order among that class's, the keys of
    checkpoints saved before ``state_key``). Whether one has a state is asked at each save (:func:`_states`): a
    state made during training is kept too."""
    out, seen = [], {}
    for cb in callbacks:
        name = type(cb).__qualname__ if by_class else getattr(cb, "state_key", type(cb).__qualname__)
        if not isinstance(name, str):  # (a method named state_key: a bound method's repr differs in every process)
            raise TypeError(f"fit expected the state_key of callback {type(cb).__name__} to be a str, got {name!r}.")
        n = seen[name] = seen.get(name, -1) + 1
        if _defines(cb, "state_dict") and callable(getattr(cb, "load_state_dict", None)):
            out.append((name if n == 0 else f"{name}#{n}", cb))
    return out


def _load_states(callbacks: Sequence[Any], stateful: list[tuple[str, Any]], saved: dict[str, Any]) -> None:
    """Hands each callback its state saved in the checkpoint (``saved``, by key); a checkpoint saved before
    ``state_key`` keyed them by class and order, read for the callbacks its keys are not of. Warns, naming them,
    about saved states no callback takes (their callbacks left out, or given other settings), as Lightning."""
    todo = {key: cb for key, cb in stateful if key in saved}
    # An old key names a class and an order among that class's callbacks: read only where this run has as many
    # callbacks of that class as the checkpoint has states (a callback added or removed would shift the order).
    classes = [type(cb).__qualname__ for _, cb in stateful]
    for (key, cb), (old, _) in zip(stateful, _stateful(callbacks, by_class=True)):
        name = type(cb).__qualname__
        olds = sum(k == name or (k.startswith(name + "#") and k[len(name) + 1:].isdigit()) for k in saved)
        if key not in saved and old in saved and old not in todo and olds == classes.count(name):
            todo[old] = cb
    for key, cb in todo.items():  # what they had seen when the checkpoint was saved (EarlyStopping's patience)
        cb.load_state_dict(saved[key])
    left = [key for key in saved if key not in todo]
    if left:
        warnings.warn(
            f"fit resumes from a checkpoint that holds the states of callbacks this run does not have: {left} (the "
            "keys are their state_key, and their order among those of that key). They are left unused. Pass the "
            "callbacks the checkpoint was saved with, with the same settings, to go on with their states.",
            stacklevel=3,
        )


def _states(stateful: list[tuple[str, Any]], copied: bool = False) -> dict[str, Any]:
    """The callbacks' states now, by key; those whose ``state_dict()`` is None (none yet) are left out."""
    out = {}
    for key, cb in stateful:
        s = cb.state_dict()
        if s is not None:
            out[key] = _containers_copied(s) if copied else s
    return out


def _warn_unwatched(callbacks: Sequence[Any], checkpoint: Any) -> None:
    """Monitors read validation metrics only: without validation they would never act, silently."""
    watching = [f"EarlyStopping(monitor={cb.monitor!r})" for cb in callbacks if isinstance(cb, EarlyStopping)]
    if getattr(checkpoint, "monitor", None) is not None:
        watching.append(f"Checkpointer(monitor={checkpoint.monitor!r})")
    if watching:
        warnings.warn(
            f"fit runs no validation (no val_data, or limit_val_batches=0), but {' and '.join(watching)} "
            f"{'watches' if len(watching) == 1 else 'watch'} validation metrics: they never act in this run. Pass "
            "val_data and eval_step (monitors see the metrics of validation runs, not training's).",
            stacklevel=3,
        )


class _Hooks:
    """Calls the callbacks' hooks by name; a StopTraining from one is remembered and never skips the others."""

    def __init__(self, callbacks: Sequence[Any]) -> None:
        self.lists = {name: [_Remembering(getattr(cb, name), self, cb) for cb in callbacks if _defines(cb, name)] for name in _HOOKS}
        self.stop = False

    def __call__(self, name: str, *args: Any) -> None:
        for hook in self.lists[name]:
            hook(*args)

    def on_log(self) -> list[Any]:
        """The ``on_log`` hooks for the MetricBuffer (it calls them itself and logs what they return)."""
        return self.lists["on_log"]


class _Remembering:
    """A callback's hook whose StopTraining is remembered (fit stops at its next check), never raised."""

    def __init__(self, hook: Any, hooks: _Hooks, callback: Any) -> None:
        # __self__: the callback (also for a hook set on the instance), which MetricBuffer names an on_log value's source by
        self.hook, self.hooks, self.__self__ = hook, hooks, callback

    def __call__(self, *args: Any) -> Any:
        try:
            return self.hook(*args)
        except StopTraining:
            self.hooks.stop = True
            return None


@contextlib.contextmanager
def _outputs(progress: bool | None, logger: Logger | None, owned: Logger | None) -> Iterator[ProgressBar]:
    bar = None
    try:
        bar = ProgressBar(progress)
        yield bar
    finally:  # also on errors: no half-drawn bar, every file written and closed (even if one writer fails)
        if bar is not None:
            bar.close()
        try:
            if logger is not None:
                logger.flush()
        finally:
            if owned is not None:
                owned.close()  # the writers fit made for log_dir; the caller's own loggers stay open


@contextlib.contextmanager
def _generators_back(data: Iterable[Any]) -> Iterator[None]:
    """While fit runs, a DataLoader's samplers and its own ``generator`` hold fit's per-epoch ones
    (:func:`fnlit.data.epoch_batches`); the ones they held are put back when fit ends, an error's end too: a loop
    over the same loader after fit draws its order as before, from one's own generator, not left in fit's state."""
    held = _data.generators(data)
    try:
        yield
    finally:
        for obj, gen in held:
            obj.generator = gen


@contextlib.contextmanager
def _rows_first(checkpoint: Any, logger: Logger | None) -> Iterator[None]:
    """While fit runs, a Checkpointer flushes fit's writers right before it writes a file (``before_save``): the
    rows logged up to the saved step are on disk before the checkpoint is. A resumed run logs from the step after
    its checkpoint only, so rows a batching writer still held when the process was killed would be lost for good;
    a flush per save, not per step, keeps the writers' batching (a save costs far more than a flush)."""
    if checkpoint is None or logger is None or not hasattr(checkpoint, "before_save"):
        yield
        return
    before = checkpoint.before_save

    def flush_then_theirs() -> None:  # a hook of the caller's own still runs, after the flush (even if it failed)
        try:
            logger.flush()
        finally:
            before()

    checkpoint.before_save = logger.flush if before is None else flush_then_theirs
    try:
        yield
    finally:  # the caller's Checkpointer, as it was (a later fit may log elsewhere, or not at all)
        checkpoint.before_save = before


def _lost_state(checkpoint: Any) -> str:
    """What fit says when a donated step raised after updating the state in place (see fnlit.donating)."""
    last = getattr(checkpoint, "last_path", None) if checkpoint is not None else None
    where = (
        f"The newest checkpoint, {last}, is the latest good state: resume from it (ckpt_path='last')."
        if last is not None
        else "No checkpoint was saved before it, so the training state is lost; pass checkpoint=... to keep one."
    )
    return (
        "fnlit.fit: the donated step raised after updating the state in place, so the state holds neither the "
        f"old values nor the new ones; it was not saved on exit (it would be a corrupt checkpoint). {where}"
    )


def _add_note(e: BaseException, note: str) -> None:
    if hasattr(e, "add_note"):  # Python >= 3.11: shown with the traceback
        e.add_note(note)
    else:
        import sys

        print(note, file=sys.stderr)


def _first(t: torch.Tensor) -> int:
    """A CPU scalar as an int; for an ensemble's stacked state, member 0's (members step in lockstep)."""
    return int(t.reshape(-1)[0])


def fit(
    step: StepFn,
    state: TrainState,
    train_data: Iterable[Batch],
    *,
    val_data: Iterable[Batch] | None = None,
    eval_step: EvalStepFn | None = None,
    max_epochs: int | None = None,
    min_epochs: int | None = None,
    max_steps: int | None = None,
    max_time: str | float | Mapping[str, int] | Any | None = None,
    limit_train_batches: int | float | None = None,
    limit_val_batches: int | float | None = None,
    fast_dev_run: bool | int = False,
    overfit_batches: int | float = 0,
    val_check_interval: int | float | None = None,
    check_val_every_n_epoch: int | None = 1,
    num_sanity_val_steps: int = 2,
    log_every_n_steps: int = 50,
    callbacks: Sequence[Any] = (),
    log_dir: str | None = None,
    loggers: Sequence[Writer] | None = None,
    hparams: Mapping[str, Any] | argparse.Namespace | None = None,
    progress: bool | None = None,
    checkpoint: Any | None = None,
    ckpt_path: str | None = None,
    seed: int | None = None,
    prefixes: tuple[str, str] = ("train/", "val/"),
) -> TrainState:
    """Trains: ``state, metrics = step(state, batch)`` over the data until a limit is reached; returns the state.

    Counting follows Lightning: ``max_epochs`` defaults to 1000 when neither it nor ``max_steps`` is given
    (-1, no limit, when ``max_steps`` or a time limit is: ``max_time`` or a :class:`~fnlit.callbacks.Timer`
    with a duration). fit counts steps as calls of ``step`` (batches stepped): ``max_steps``, ``val_check_interval``
    across epochs (``check_val_every_n_epoch=None``), ``log_every_n_steps`` and the step of each log row. The count
    starts from ``state.step`` -- the same count for the usual step, one update a call -- and a resume
    (``ckpt_path``) continues the checkpoint's own count, so a step that applies two updates a call (alternating
    GAN updates) or one every other call resumes as one uninterrupted run; a fit given such a state without a
    checkpoint position starts from its ``state.step``. (A :class:`~fnlit.Checkpointer`'s ``every_n_steps`` and
    file names count ``state.step``.) Stop requests (:class:`~fnlit.callbacks.StopTraining`,
    ``max_time``) wait until ``min_epochs`` epochs are done; one that takes effect after a step of an epoch that
    validates runs a validation first (unless that step just had one), as Lightning's ``should_stop`` does.
    Ctrl-C or SIGTERM finish the current step and
    return the state (``checkpoint.on_exit`` can save it); a second Ctrl-C interrupts at once (one during the
    callbacks' ``on_step`` once they have all seen that step; a third even there). A SIGTERM handler installed
    before fit (a Python function: a requeue, a tracker's cleanup, a flag the script reads after fit to tell a
    preempted run from a finished one) is still called, at once, as Lightning chains it (each rank its own); what
    it raises (``sys.exit``) fit raises once the step is done and ``checkpoint.on_exit`` has saved. It is back in
    place when fit returns. Under several processes the ranks decide together,
    without a collective every step: a stop requested during a step (``on_step``, a signal, ``max_time``)
    takes effect at the next log interval, validation or epoch end; one from a validation
    (``EarlyStopping``) or from a log row's ``on_log`` at once, as in one process.

    Args:
        step: ``(state, batch) -> (state, metrics)``; metrics are scalar tensors, logged as ``"train/<name>"``
            (nested dicts as ``"train/<outer>/<inner>"``; an ensemble's, one per member, as ``"train/<name>/<i>"``).
        state: the initial :class:`~fnlit.TrainState`.
        train_data: any iterable of batches: an :class:`~fnlit.data.ArrayLoader` (reshuffled per epoch from
            ``seed``, sharded across ranks, resumed mid-epoch without replay; a subclass that overrides
            ``__iter__``, an augmentation, is iterated as it is after ``set_epoch(epoch, seed)``), a DataLoader
            (its sampler, or its batch sampler's: one with ``set_epoch``, as DistributedSampler, gets
            ``set_epoch(epoch)``; one with a ``generator`` (RandomSampler, SubsetRandomSampler, WeightedRandomSampler) is reseeded per
            epoch from ``seed``, and so are its workers; a generator of one's own there is not used, with a warning
            unless ``seed`` is given, and is put back when fit returns), or anything else (iterated as is, after
            ``set_epoch(epoch)`` where it has one: a wrapper around an ArrayLoader that forwards it reshuffles per
            epoch, from the loader's own seed; give validation a loader of its own then). A sampler drawing from the
            global generator otherwise does not repeat its order on a resume mid-epoch. Batches are moved to
            ``state.device`` (pinned, non-blocking).
        val_data, eval_step: validation data and ``(state, batch) -> metrics``, logged as ``"val/<name>"``.
            val_data with no batches (``len() == 0``: ``[]``, or a loader with ``drop_last=True`` and fewer examples
            than its batch size; under torch.distributed, on any rank's shard) is refused when fit starts (Lightning
            warns and skips validation); data without a ``len()`` raises at its first validation (the sanity
            check, by default). ``limit_val_batches=0`` turns validation off.
        max_epochs, min_epochs, max_steps, max_time: limits (``max_time``: seconds, timedelta, dict or
            ``"DD:HH:MM:SS"``).
        limit_train_batches, limit_val_batches: an int number of batches, or a float fraction, per epoch/run
            (0: no training, no validation).
        fast_dev_run: True/N: N train and N val batches, one epoch, no sanity check, logs or checkpoints.
        overfit_batches: train (and validate) on the first N (or fraction) batches, unshuffled, every epoch
            (a DataLoader's shuffling sampler is replaced by a sequential one, as Lightning does; a shuffling
            DataLoader subclass is refused, as it cannot be rebuilt: build it with ``shuffle=False``; so is a
            one-shot iterator, such as a generator, unless one epoch runs: it gives its first batches once).
        val_check_interval: float: validate every fraction of an epoch; int: every N training batches.
        check_val_every_n_epoch: validate in epochs ``e`` with ``(e + 1) % n == 0``; None: ``val_check_interval``
            counts batches across epochs (an int, or unset: every epoch's worth; a float is refused, as Lightning does).
        num_sanity_val_steps: validation batches run before training, to fail fast (-1: all).
        log_every_n_steps: log (and read metrics back from the device) every N steps, and at the end: the training
            metrics' means over the interval. A run interrupted (Ctrl-C, SIGTERM) with a checkpoint saves its unfinished
            interval's metrics with it instead of logging them: the resumed run logs the interval whole. A run that
            finishes between rows logs its last, partial interval and keeps it in its last checkpoint: continued to
            larger limits (``ckpt_path``), it drops that row and logs the interval whole, as one longer run does.
            The interval's metrics are kept detached (and copied, where one views a larger tensor), as Lightning's
            ``self.log`` keeps them: a metric that requires grad does not hold its step's autograd graph and
            activations until the row, nor a view its whole tensor. They stay tensors on the device.
        callbacks: objects with hooks (see :mod:`fnlit.callbacks`).
        log_dir: write TensorBoard event files and ``metrics.csv`` there (default: no files, unlike
            Lightning's implicit ``lightning_logs/``: where logs go is an explicit choice). Training rows
            are written in batches (when 2 s have passed since the last write), validation results as
            soon as a validation ends, everything held right before a Checkpointer writes a file (so a
            process killed after a save, even by SIGKILL, has the rows up to that checkpoint in the files),
            and everything when ``fit`` ends, also on an error.
        loggers: more writers (:mod:`fnlit.summary`); they are flushed after each validation, before each
            checkpoint a Checkpointer writes, and at the end, never closed. They are called on every rank:
            fnlit's own writers write on rank 0 only, a Writer of your own checks the rank itself (e.g.
            ``fnlit.distributed.is_main()``). A run resumed
            from a checkpoint first calls ``purge(step + 1)`` on those that have it (all fnlit's writers), with
            the checkpoint's step: their files keep the interrupted run's logs up to the checkpoint and hold
            the steps after it once. Such a file is that job's own (as ``log_dir``'s are); fresh runs may
            append to one file (a job killed before its first checkpoint leaves its lines there, and its
            relaunch logs those steps again).
        hparams: hyperparameters to record with the loggers: a mapping (nested ones flattened to ``outer/inner``
            names) or an ``argparse.Namespace`` (its ``vars``, as Lightning takes it).
        progress: the tqdm bar: None (on where stdout is a terminal, on rank 0), True or False.
        checkpoint: an object with ``restore/on_step/on_validation/on_epoch_end/on_exit`` (fnlit.checkpoint),
            and optionally ``start``, called instead of ``restore`` when there is no ``ckpt_path``, and
            ``before_save``, which fit sets to flush the writers while it runs, then to call the caller's own
            ``before_save`` if one was set (restored when it returns).
        ckpt_path: resume from this checkpoint (``"last"`` allowed, and with a :class:`fnlit.Checkpointer` that has a
            ``monitor``, ``"best"``: its ``best_path``): ``checkpoint.restore(ckpt_path, like=state)``.
        seed: the data-order seed; default ``int(state.rng)`` at the start (an ensemble's stacked state: member 0's key,
            so its members share member 0's data order: to compare a member with its solo run, pass ``seed`` to
            both). A resume uses the checkpoint's (the
            order it replays its epoch in: another would skip or repeat examples), and warns when ``seed`` differs.
            Under torch.distributed every rank takes rank 0's (one order, cut into the ranks' shards), also
            when the ranks' rngs differ.
        prefixes: the prefixes of training and validation metric names.

    Returns:
        The last state.

    Raises:
        ValueError: empty or endless data without a limit, val_data without batches, inconsistent options,
            non-scalar metrics, colliding metric names (each message names the option and the fix); an ensemble
            step (:func:`fnlit.ensemble`) under torch.distributed with several processes (every rank raises, before
            training: fit trains data-parallel there, which an ensemble cannot be).
        TypeError: a ``seed`` that is not an int, ``prefixes`` that are not two strings, a state that is not one
            :class:`fnlit.TrainState` (a tuple of a GAN's two: train them as one state, see the README).

    Example:
        >>> import torch, torch.nn.functional as F, fnlit
        >>> from fnlit.data import ArrayLoader
        >>> from fnlit.loop import fit
        >>> model = torch.nn.Linear(4, 1)
        >>> state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
        >>> step = fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]))
        >>> data = ArrayLoader(torch.randn(64, 4), torch.randn(64, 1), batch_size=16)
        >>> state = fit(step, state, data, max_epochs=2, progress=False)
        >>> int(state.step)
        8
    """
    require_state(state, "fnlit.fit")
    if _dist.world_size() > 1 and _ensemble_step(step) is not None:  # (every rank, at once)
        raise ValueError(_ENSEMBLE_DISTRIBUTED.format(w=_dist.world_size()))
    if isinstance(step, torch.nn.Module):
        raise TypeError(
            f"fnlit.fit expected step to be a step function, (state, batch) -> (state, metrics), got the module "
            f"{type(step).__name__}. Build one: fnlit.train_step(model, loss_fn), or write your own with "
            "fnlit.value_and_grad and state.apply_gradients."
        )
    if type(train_data) is tuple and train_data and all(isinstance(t, torch.Tensor) for t in train_data):
        warnings.warn(
            f"fit got train_data as a tuple of {len(train_data)} tensors: it iterates it, so each tensor is one batch. "
            "For a dataset (x, y), pass batches: fnlit.data.ArrayLoader(x, y, batch_size=...).",
            stacklevel=2,
        )
    plan = _plan(dict(locals()), train_data, val_data)  # every option, resolved by Lightning's rules
    _data.check_sharding(train_data, "train_data")
    if plan.sequential:  # overfit_batches: the first batches of the unshuffled order, every epoch
        train_data = _data.unshuffled(train_data, "train_data")
        if val_data is not None:  # validation too (Lightning swaps in a SequentialSampler for both)
            val_data = _data.unshuffled(val_data, "val_data")
    if hparams is not None:  # an argparse.Namespace as its vars; anything else not a mapping refused before any file
        hparams = _hparams_mapping(hparams)
    if ckpt_path is not None and checkpoint is None:
        raise ValueError(f"fit got ckpt_path={ckpt_path!r} but no checkpoint object to restore it with. Pass checkpoint=...")
    position = None
    if checkpoint is not None and ckpt_path is not None:  # (fast_dev_run and limit_train_batches=0 too, as Lightning)
        state, position = checkpoint.restore(ckpt_path, like=state)  # position None: nothing saved yet, start
    elif checkpoint is not None and hasattr(checkpoint, "start") and not plan.quiet and plan.batches != 0:
        checkpoint.start(state)  # a fresh run (the object may have saved another), or one continued from its end
    # restored from a checkpoint (not a start: another job may share the user's files); a file without a driver
    # position too (Checkpointer says which file it read)
    resumed = ckpt_path is not None and (position is not None or getattr(checkpoint, "restored_from", None) is not None)
    if plan.batches == 0:
        if _dist.world_size() > 1:  # every rank raises a limit (or empty data) that failed on any, or none does
            _same_batches(0, 0, state.device, False, plan.val_limit, plan.train_limit)  # (none validates)
        elif plan.val_limit[1] is not None:
            raise plan.val_limit[1]
        return state  # limit_train_batches=0: Lightning skips training
    if plan.quiet:  # fast_dev_run: its N batches of the restored state from an epoch's start; it saves nothing
        checkpoint, position = None, None
    if position is None:
        position = {"epoch": 0, "batch": 0, "seed": _first(state.rng) if seed is None else seed}
    elif seed is not None and seed != position["seed"] and _dist.rank() == 0:  # (every rank takes rank 0's)
        warnings.warn(
            f"fit resumes with the checkpoint's data-order seed {position['seed']}, not seed={seed}: the resumed "
            "epoch must be replayed in the order it began in (another would skip or repeat examples). Start a "
            "new run (no ckpt_path) for another order.",
            stacklevel=2,
        )
    own = _data.own_generators(train_data)
    if own and seed is None and _dist.rank() == 0:
        warnings.warn(
            "fit draws train_data's order from its data-order seed (fit's seed=, by default the state's key; on a "
            "resume, the checkpoint's) so that a resume replays the order exactly: the generator set on it "
            f"({', '.join(own)}) is not used, and is put back when fit returns. Pass fit(seed=...) to vary the order "
            "in a new run.",
            stacklevel=2,
        )
    epoch, b, seed = position["epoch"], position["batch"], position["seed"]
    # the driver's count: calls of step, saved with each checkpoint (one from before this was saved has none; nor has
    # a state without a checkpoint: its state.step, the same count for a step of one update)
    steps = position["steps"] if "steps" in position else _first(state.step)
    _check_last_batch(step, train_data, plan.batches, plan.max_steps - (0 if plan.quiet else steps), b)
    saved_world = position.get("world_size", 1)
    # batch counts batches of the saved run's size: another batch size (or dataset) starts elsewhere in the epoch
    # (a checkpoint from before this was saved has no count: not told)
    saved_length = position.get("batches_per_epoch", plan.length)
    other_length = None not in (saved_length, plan.length) and saved_length != plan.length
    if other_length and b >= saved_length and plan.batches is not None:
        b, other_length = plan.batches, False  # the saved epoch had all its batches: it ends here too, nothing skipped
    # saved at the epoch's last batch, or at or past the last this run gives it (limit_train_batches): nothing to skip
    ended = (not other_length and saved_length is not None and b >= saved_length) or (
        plan.batches is not None and b >= plan.batches
    )
    if b and not ended and (saved_world != _dist.world_size() or other_length):
        changed, same = (
            (f"on {_dist.world_size()} process(es), but the checkpoint was saved on {saved_world}: the ranks' shards "
             "differ", "on as many processes")
            if saved_world != _dist.world_size() else
            (f"with {plan.length} batches per epoch, but the checkpoint was saved with {saved_length} (another batch "
             "size or dataset): its batch count falls elsewhere in the epoch", "with the same batch size and data")
        )  # fmt: skip
        warnings.warn(
            f"fit resumes in the middle of epoch {epoch} (batch {b} of each rank) {changed}, so some examples of this "
            f"epoch are seen twice or not at all (later epochs are whole). Resume {same}, or from a checkpoint saved "
            "at an epoch's end.",
            stacklevel=2,
        )
    if plan.batches is not None and b > plan.batches:
        warnings.warn(
            f"fit resumes at batch {b} of epoch {epoch}, past the {plan.batches} batches of this run's epochs (a "
            "larger batch size, a smaller limit_train_batches, or more processes): that epoch counts as ended "
            "there, and the next one starts.",
            stacklevel=2,
        )
    validated = bool(position.get("validated"))  # saved by an epoch-end validation: that one is done
    # saved by a Ctrl-C during a validation after a batch: the resumed run does that validation first
    unfinished = bool(position.get("validation_unfinished"))
    all_callbacks = list(callbacks)
    if max_time is not None:
        all_callbacks.append(Timer(max_time))
        all_callbacks[-1].state_key = all_callbacks[-1]._generate_state_key(max_time=True)  # not a Timer callback's
    if not plan.validate:
        _warn_unwatched(all_callbacks, checkpoint)
    hooks = _Hooks(all_callbacks)
    # a stop that min_epochs deferred, before the checkpoint (or requested before an epoch end a Ctrl-C cut off)
    hooks.stop = bool(position.get("stop_requested"))
    stateful = _stateful(all_callbacks)
    if position.get("callbacks"):
        _load_states(all_callbacks, stateful, position["callbacks"])

    def where(epoch: int, batch: int, pending: list[Metrics] | None = None) -> Position:
        """The position saved with a checkpoint: where the data stands, the driver's step count, the callbacks' states,
        and the training metrics of the log interval so far (``pending``, default the buffer's): a resume logs the same
        means."""
        pos: Position = {"epoch": epoch, "batch": batch, "seed": seed, "steps": steps}
        stored = _stored(log.pending if pending is None else pending)
        if stored and stored[0]:  # (a step returning no metrics leaves nothing to log: no step does then)
            pos["log_pending"] = stored
        if _dist.world_size() > 1:  # batch counts each rank's batches: a resume on other ranks is told (one process: 1)
            pos["world_size"] = _dist.world_size()
        if plan.length is not None:  # and batches of this size: a resume with another batch size is told
            pos["batches_per_epoch"] = plan.length
        states = _states(stateful) if stateful else None
        if states:
            pos["callbacks"] = states
        if hooks.stop and epoch < plan.min_epochs:  # requested (by any callback), deferred by min_epochs: kept
            pos["stop_requested"] = True
        return pos

    cache: list[Any] = [None, []]  # the pending list last stored, and its entries as stored so far
    # A Checkpointer says which steps its on_step saves (a subclass that overrides on_step, or another object with
    # the hooks, is called every step)
    due = checkpoint._due if isinstance(checkpoint, Checkpointer) and type(checkpoint).on_step is Checkpointer.on_step else None

    def _stored(pending: list[Metrics]) -> list[Metrics]:
        """``pending``'s entries as a position holds them (:func:`_storable`): each step's once, not every step's at
        every step (a flush starts a new list)."""
        if cache[0] is not pending or len(cache[1]) > len(pending):
            cache[0], cache[1] = pending, []
        done = cache[1]
        if len(done) < len(pending):
            done = cache[1] = done + [_storable(m) for m in pending[len(done):]]  # a new list: a saved position keeps its own
        return done

    # The log interval the checkpoint was saved in: its steps' training metrics so far (the resumed run logs their
    # mean with the rest of the interval's, as the uninterrupted run did), on the state's device.
    pending = [_tree.tree_map(lambda t: t.to(state.device) if isinstance(t, torch.Tensor) else t, m)
               for m in position.get("log_pending", ())]
    # closed at the end; every writer drops what an earlier run logged after this run's starting step (a resume)
    # (from the step itself when a second Ctrl-C cut that step's logging off, maybe after some writer had its row:
    # the resumed run logs it again)
    log_cut = bool(position.get("log_cut")) and bool(pending)
    # A run that finished with a partial log interval logged it as its last row, and saved it as pending with the
    # rows it had logged at that step before it (a validation's): a continuation drops that step's rows, logs those
    # again, and the interval's mean whole at its end, as one run to the larger limits did.
    tail = position.get("log_tail") if pending else None
    purge_from = steps + (0 if log_cut or tail is not None else 1)
    # the validation rows logged at the last step so far: (step, rows); kept in a finished run's exit position
    logged_at: tuple[int, list[dict[str, float]]] = (steps, [{k: float(v) for k, v in row.items()} for row in tail or ()])
    log = MetricBuffer(prefixes, hooks.on_log())
    log.pending = pending
    move = _data.device_mover(state.device)
    n_batches = plan.batches
    first_step = steps
    max_steps, min_epochs, log_every = plan.max_steps, plan.min_epochs, plan.log_every
    if plan.quiet:  # fast_dev_run=N: N steps from wherever the state is (max_steps is otherwise a global step)
        max_steps += steps
    per_step_hooks = bool(hooks.lists["on_step"])
    distributed, halt = _dist.world_size() > 1, False
    voted_signal: str | None = None  # the signal the ranks last agreed on (one process: the live one is used)
    if distributed:
        # every rank draws rank 0's data order (and raises a validation limit that failed on any)
        seed = _same_batches(n_batches, seed, state.device, plan.validate, plan.val_limit, plan.train_limit)
        dp = collective_of(step)
        if dp is not None and dp.collective == "fnlit.data_parallel":  # every rank must start from the same state
            _dist.check_same_state(state, getattr(dp, "group", None))

    def halting() -> bool:  # a signal came, or a callback asked to stop and min_epochs are done
        return bool(signals.reason) or (hooks.stop and epoch >= min_epochs)

    def agree() -> None:
        """Ranks decide together whether to stop, at points all of them reach at the same step: log
        intervals, validations and epoch ends (alone, the loop checks after every step)."""
        nonlocal halt, voted_signal
        halt, signals.reason = _agree(halting(), signals.reason, state.device)
        voted_signal = signals.reason  # (a signal may reach one rank after the vote: decide on what was agreed)

    def log_now(label: int | None = None) -> None:
        nonlocal cut
        taken = log.pending
        try:
            metrics = log.flush(state, epoch if label is None else label)
            if metrics and logger is not None:
                logger.log_metrics(metrics, steps)
        except KeyboardInterrupt:  # a second Ctrl-C: the exit checkpoint keeps the interval, the resume logs it whole
            if checkpoint is not None and log.pending is not taken:  # (flush had taken them; no checkpoint: no resume,
                log.pending = taken + log.pending  # and the last row would go again to the writers that had it)
            cut = bool(log.pending)
            raise
        finally:  # after the flush: a StopTraining from an on_log hook counts at this interval, as in one process
            if distributed:  # (one vote an interval on every path out, an exception's too: the ranks stay in step)
                agree()
        bar.set_metrics(steps, metrics)

    # A validation a second Ctrl-C can cut off: whether it is an epoch end's, and the callbacks' states from
    # before it while their on_validation has not finished (then a resume does it again, from those states);
    # None when no validation runs.
    validating: tuple[bool, dict[str, Any] | None] | None = None
    cut = False  # a second Ctrl-C cut a log row off (its interval stays pending): the exit position says so
    # A second Ctrl-C cut an epoch's end off (its on_epoch_end hooks): the exit position is then its last batch's,
    # with the callbacks' states from before that end, whether its validation is done and a stop was requested, and
    # that end pending: the resume ends it first, before its loop (which a last step or a stop would not enter).
    epoch_cut: Position = {}
    if position.get("epoch_end_pending"):  # saved so: this run ends that epoch first (kept if it stops before)
        epoch_cut = _epoch_end_cut(None, validated, hooks.stop)

    passes = 0  # validations run: a one-shot iterator has data for one

    def validate(epoch_end: bool = False) -> None:
        nonlocal validating, passes, logged_at
        passes += 1
        if passes > 1 and isinstance(val_data, Iterator):  # (the first pass used it up: this one would see nothing)
            raise TypeError(_ONE_SHOT_VAL.format(kind=type(val_data).__name__) + ".")
        validating = (epoch_end, _states(stateful, copied=True))
        hooks("on_validation_start", state)
        metrics = {prefixes[1] + k: v for k, v in evaluate(eval_step, state, val_data, plan.val_batches).items()}  # type: ignore[arg-type]
        log.claim(metrics, "the eval step")
        log.latest.update(metrics)
        if logger is not None:  # validation is rare and its metrics are what people watch: write them now
            logger.log_metrics(metrics, steps)
            logger.flush()
        logged_at = (steps, [*(logged_at[1] if logged_at[0] == steps else ()), metrics])
        hooks("on_validation", state, metrics)
        validating = (epoch_end, None)  # the callbacks have counted it (EarlyStopping): a resume must not redo it
        if checkpoint is not None:
            # An epoch-end validation runs after its batch's checkpoint: a best saved here says it is done.
            checkpoint.on_validation(state, {**where(epoch, b), "validated": True} if epoch_end else where(epoch, b), metrics)
        if distributed:  # an EarlyStopping decision takes effect now, not at the next log interval
            agree()
        validating = None

    def end_epoch(validation_done: bool) -> None:
        """The epoch's end after its validation: the ``on_epoch_end`` hooks, the checkpointer's, then whether to stop.
        A second Ctrl-C during the hooks leaves the exit position at the epoch's last batch, its end pending."""
        nonlocal validated, epoch, b, epoch_cut, halt
        ended_at, before, stop_before = (epoch, b), None, hooks.stop
        try:
            before = _states(stateful, copied=True)
            validated, epoch, b = False, epoch + 1, 0
            hooks("on_epoch_end", state, {**log.latest, "epoch": epoch - 1})
        except KeyboardInterrupt:  # (a callback after the one it cut off has not seen this epoch end)
            epoch, b = ended_at
            # The resume ends this epoch first, from the callbacks' states before it, even where no step is left or
            # a stop was decided at it (a stop requested before these hooks is requested again: it takes effect
            # after them, as here).
            # (its validation is done, or was before a resume from its best, where validation_done)
            epoch_cut = _epoch_end_cut(before, validation_done, stop_before)
            raise
        epoch_cut = {}  # (a pending one, ended now)
        if checkpoint is not None:
            checkpoint.on_epoch_end(state, where(epoch, 0))
        if distributed:
            agree()
        else:
            halt = halting()

    # The writers are made right before the with that closes them: an error anywhere after (a writer refusing the
    # hparams, a row replayed) leaves no file open.
    owned = Logger(log_dir=log_dir, purge_step=purge_from) if log_dir is not None and not plan.quiet else None
    logger = None if plan.quiet else Logger([*(loggers or ()), *(owned.writers if owned else ())])
    with (
        _Signals() as signals,
        _outputs(progress, logger, owned) as bar,
        _rows_first(checkpoint, logger),
        _generators_back(train_data),
    ):
        if logger is not None and loggers and resumed:  # the steps after the checkpoint are logged again
            Logger(loggers).purge(purge_from)
        if logger is not None:
            for row in logged_at[1]:
                logger.log_metrics(row, logged_at[0])
        if logger is not None and hparams:
            logger.log_hparams(hparams)
        try:
            info = {"max_epochs": plan.max_epochs, "max_steps": max_steps, "batches_per_epoch": n_batches, "log_every_n_steps": log_every,
                    "fast_dev_run": plan.quiet}  # (max_epochs is then 1, whatever fit was given)
            hooks("on_fit_start", state, info)
            if plan.sanity_steps:  # fail fast on a broken eval step; the results are discarded
                evaluate(eval_step, state, val_data, None if plan.sanity_steps < 0 else plan.sanity_steps)  # type: ignore[arg-type]
            for cb in all_callbacks:  # training starts now: a Timer's clock leaves the sanity check out (Lightning's)
                if isinstance(cb, Timer):
                    cb._on_train_start()
            # A StopTraining from on_fit_start, or a signal before training (during the sanity check too): no step at
            # all (Lightning's should_stop)
            if distributed:
                agree()
            else:
                halt = halting()
            if log_cut and log.pending:
                # A second Ctrl-C cut this step's logging off: its row first, as the uninterrupted run logged it (then
                # the validation due at this step, which never ran: unfinished, below).
                log_now(epoch - 1 if b == 0 and epoch > 0 else epoch)
            if unfinished and plan.validate and not halt:  # the validation a Ctrl-C cut off, as the first run had it
                validate()
                if not distributed:  # (validate agrees across ranks itself) its EarlyStopping decision counts now
                    halt = halting()
            if epoch_cut and not (voted_signal if distributed else signals.reason):  # an epoch end a Ctrl-C cut off
                end_epoch(validated)
            short_warned = False
            # Data without a length stopped (max_steps, a stop) at what may be its last batch: look one ahead, as
            # Lightning's fetcher does, so that epoch ends (its validation, on_epoch_end). In one process only
            # (ranks could see different answers, and an epoch end is a collective), and not for a one-shot
            # iterator (the batch looked at would be lost to a later fit of it).
            look_ahead = n_batches is None and not distributed and not isinstance(train_data, Iterator)
            # a stacked state given to a step that is not an ensemble's: its error gets a note saying to wrap it
            unensembled = ensemble_members(state) if _ensemble_step(step) is None else None
            while (plan.max_epochs < 0 or epoch < plan.max_epochs) and steps < max_steps and not halt:
                val_every = (plan.val_check_batch or -1) if plan.validates_in(epoch) else 0  # -1: at the epoch's end
                count_across = plan.val_every_n_epoch is None
                bar.start_epoch(epoch, n_batches, b)
                broke, epoch_start = True, steps
                batch_iter = iter(_data.epoch_batches(train_data, epoch, seed, b, n_batches, plan.sequential))
                for batch in batch_iter:
                    batch = move(batch) if move else batch
                    try:
                        out = step(state, batch)
                    except Exception as e:  # (a plain step given stacked params fails deep inside: say why)
                        if unensembled:
                            _add_note(e, _NOT_ENSEMBLED.format(who="fnlit.fit", what="step", name="step",
                                                               n=unensembled))
                        raise
                    try:
                        state, metrics = out
                    except (TypeError, ValueError):
                        raise TypeError(
                            f"fit expected the step to return (state, metrics), got {describe_result(out, state)}. "
                            "Return e.g. (new_state, {'loss': loss})."
                        ) from None
                    steps, b = steps + 1, b + 1  # (no call in between: a Ctrl-C from here on finds this batch done)
                    if type(metrics) is not dict and not isinstance(metrics, Mapping):  # at once, not at the first log
                        raise TypeError(
                            "fit expected the step to return (state, metrics) with metrics a dict of scalar tensors, "
                            f"got {type(metrics).__name__} as metrics. Return e.g. (new_state, {{'loss': loss}})."
                        )
                    log.pending.append(_kept(metrics))  # stays on the device until the next log_now()
                    validated_here = val_every > 0 and (steps if count_across else b) % val_every == 0
                    try:
                        if per_step_hooks:
                            signals.hold = True
                            try:
                                hooks("on_step", state, metrics)
                            finally:
                                signals.hold = False
                            if signals.held:  # a second Ctrl-C while they ran: every callback has seen the step
                                signals.held = False
                                raise KeyboardInterrupt
                        bar.update()
                        if steps % log_every == 0:
                            log_now()
                    except KeyboardInterrupt:
                        # A second Ctrl-C after the step, before its row and validation: the exit position says the
                        # row was cut off (the resume logs it first) and the validation due here unfinished (run next).
                        if steps % log_every == 0:
                            cut = bool(log.pending)  # (empty: the row was written)
                        if validated_here:
                            validating = (False, _states(stateful, copied=True))
                        raise
                    if validated_here:
                        validate()
                    # after the batch's validation: a resume from here does not skip it (the position, which copies
                    # the log interval's metrics so far, built only for a save; another checkpoint object with the
                    # same hooks is given one every step)
                    if checkpoint is not None and (due is None or due(state)):
                        checkpoint.on_step(state, where(epoch, b))
                    if not distributed:
                        halt = halting()
                    if steps >= max_steps or halt:
                        if look_ahead and next(batch_iter, _END) is _END:  # that was the epoch's last batch
                            broke = False
                        last = not broke or b == n_batches
                        signalled = voted_signal if distributed else signals.reason
                        used_up = passes and isinstance(val_data, Iterator)  # a one-shot val_data: its one pass is done
                        if halt and not signalled and val_every and not validated_here and not (val_every < 0 and last) and not used_up:
                            # A callback stopped training (StopTraining, max_time) in an epoch that validates: validate
                            # the steps since the last validation first, as Lightning does when should_stop is set (its
                            # epoch loop validates then); an epoch's end that validates does it itself.
                            validate()
                        break
                else:
                    broke = False
                # The epoch ended when its batches ran (limit_train_batches included, with or without a length;
                # a resume from past a now shorter epoch's end too), or when the data ran out after a batch: one
                # this call ran, or one before the position it resumed from (a checkpoint saved at the epoch's
                # last batch). Data running out before its len() ends the epoch early, with its validation.
                ran_out = not broke and (steps > epoch_start or b > 0)
                short = plan.length is not None and ran_out and b < n_batches
                if short and not short_warned:
                    short_warned = True  # once a run
                    warnings.warn(
                        f"fit: train_data yielded {b} batches in epoch {epoch}, fewer than its len() or "
                        f"limit_train_batches ({n_batches}) promised: the epoch ended there (and validated, if it "
                        "validates at its end). Make len() match the batches it yields (a per-rank "
                        "IterableDataset reports its own rank's count).",
                        stacklevel=2,
                    )
                if not ((n_batches is not None and b >= n_batches) or ran_out):
                    if steps == first_step and not broke:
                        raise ValueError("fit got empty training data: the first epoch yielded no batches.")
                    if not broke:  # not a stop: the data yielded nothing this epoch
                        one_shot = " (a one-shot iterator is used up by its first pass)" if isinstance(train_data, Iterator) else ""
                        warnings.warn(
                            f"fit: train_data yielded no batches in epoch {epoch}{one_shot}: training stops at step "
                            f"{steps}, before max_epochs/max_steps. To train more epochs, pass data that can be iterated "
                            "again (a list, a DataLoader, an ArrayLoader).",
                            stacklevel=2,
                        )
                    break  # stopped mid-epoch, or a one-shot iterable ran out
                # An epoch that ended short, or that a resume entered past its (now shorter) end, misses the validation
                # scheduled at its last batch: done here instead.
                past = n_batches is not None and b > n_batches and steps == epoch_start
                at_end = val_every < 0 or (
                    (short or past) and val_every > 0 and not count_across and n_batches % val_every == 0 and b % val_every
                )
                if at_end and not (validated and steps == epoch_start):  # not again on a resume from its best
                    validate(epoch_end=True)
                end_epoch(at_end)
        except BaseException as e:
            if is_donated(state):  # a donated step failed after writing the state: nothing valid to save or return
                _add_note(e, _lost_state(checkpoint))
                raise
            if not isinstance(e, KeyboardInterrupt):
                raise
            signals.reason = "sigint"  # a second Ctrl-C, or a first one outside the main thread: save and return
        # The last steps' metrics, of the epoch that just ended when the loop stopped at its end. A run interrupted
        # (Ctrl-C, SIGTERM) with a checkpoint saves them in its position instead of logging a partial interval: the
        # resumed run logs them with the rest of their interval, as the uninterrupted run did.
        reason = signals.reason
        if distributed and checkpoint is not None:  # a signal after the last vote reached some ranks only: all decide alike
            _, reason = _agree(False, reason, state.device)
            signals.reason = signals.reason or reason
        carried = checkpoint is not None and reason in ("sigint", "sigterm")
        exit_pending = list(log.pending) if carried else []
        ended: Position = {}  # a last, partial interval logged: the exit position keeps it for a continuation
        if log.pending and not carried:
            if checkpoint is not None:
                exit_pending = list(log.pending)
                ended = {"log_tail": [{k: torch.tensor(v, dtype=torch.float64) for k, v in row.items()}  # (exact; NaN too)
                                      for row in (logged_at[1] if logged_at[0] == steps else ())]}
            try:
                log_now(epoch - 1 if b == 0 and epoch > 0 else epoch)
            except KeyboardInterrupt:  # a second Ctrl-C during the last row: saved as anywhere else, not lost
                if checkpoint is None:
                    raise
                signals.reason, exit_pending, ended = "sigint", list(log.pending), {}
        try:
            hooks("on_fit_end", state, dict(log.latest))
        finally:  # a callback failing at the end must not cost the run its last checkpoint (a preemption's save)
            if checkpoint is not None:
                exit_position = {**where(epoch, b, exit_pending), **({"log_cut": True} if cut else ended), **epoch_cut}
                _exit_save(checkpoint, state, exit_position, validating, stateful, distributed, signals)
    if signals.raised is not None:  # the previous SIGTERM handler's sys.exit or error, now that the state is saved
        raise signals.raised
    return state


_SMALL = 4096  # bytes a kept view may pin for free: data_parallel's metrics view their few-float reduction buffer


def _kept(metrics: Metrics) -> Metrics:
    """A step's metrics as the log interval keeps them: nothing that holds more than the values themselves.

    A metric computed through the module's own parameters still requires grad (its autograd graph and the
    activations it saved), and one that views a larger tensor (``hidden[0, 0]``, detached or not) keeps all of
    that tensor's memory: kept for ``log_every_n_steps`` steps, they held every step's graph or activation of the
    interval. Those are detached, and copied where they share a larger storage (asynchronously: no host sync);
    the usual step's metrics -- detached tensors of their own -- are kept as they are, at the cost of a few
    attribute reads each (~0.3 us a step for ``{"loss": loss}``). The values are bitwise the same.
    """
    try:
        for v in metrics.values():
            if type(v) is not torch.Tensor or v.requires_grad or v.untyped_storage().nbytes() > max(v.nbytes, _SMALL):
                break
        else:
            return metrics
    except (RuntimeError, NotImplementedError):  # a tensor without a storage (sparse): see below
        pass
    return {k: _kept_value(v) for k, v in metrics.items()}


def _kept_value(value: Any) -> Any:
    if isinstance(value, Mapping):  # {"parts": {"ce": ...}}
        return _kept(value)
    if not isinstance(value, torch.Tensor):  # a number
        return value
    try:
        shares = value.untyped_storage().nbytes() > max(value.nbytes, _SMALL)  # a view (or a detached one) of a larger tensor
    except (RuntimeError, NotImplementedError):  # a tensor subclass without a storage of its own
        shares = value._base is not None
    value = value.detach()  # (detach, not data: a tensor subclass stays one)
    return value.clone() if shares else value


def _storable(metrics: Metrics) -> Metrics:
    """A step's metrics as a checkpoint's position holds them: flat names (a path per name: ``"a.b"`` and
    ``{"a": {"b"}}`` stay apart) and tensors (a number becomes the tensor logging makes of it; JSON needs neither)."""
    if all(type(v) is torch.Tensor for v in metrics.values()):  # the usual step's metrics: as they are
        return metrics
    return {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for k, v in flat_metrics(metrics).items()}


def _exit_save(checkpoint: Any, state: TrainState, exit_position: Position, validating: tuple[bool, Any] | None,
               stateful: Any, distributed: bool, signals: Any) -> None:
    """``checkpoint.on_exit``: the last save, with the position a cut-off validation leaves."""
    if distributed:  # a signal after the last vote reached some ranks only: on_exit's save is a collective
        _, signals.reason = _agree(False, signals.reason, state.device)
    if validating is not None:  # cut off by a second Ctrl-C
        epoch_end, before = validating
        if before is not None:  # before its callbacks were done: done again on resume, from their states then
            if stateful:
                exit_position["callbacks"] = before
            if not epoch_end:  # (an epoch end's is done again anyway: the position is the epoch's end)
                exit_position["validation_unfinished"] = True
        elif epoch_end:  # the callbacks counted it: the resume must not do it again
            exit_position["validated"] = True
    checkpoint.on_exit(state, exit_position, signals.reason or "finished")
