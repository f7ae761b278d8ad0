"""``fnlit.accumulate``: gradient accumulation over k micro-batches, one update per batch."""

from __future__ import annotations

from collections import UserDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import random as _random
from .. import tree as _tree
from ..tree import is_real
from .._types import Batch, Metrics, StepFn
from ..data import _with_data
from ._frame import Mispredicted, frame, require_state, require_step

if TYPE_CHECKING:
    from ..state import TrainState

__all__ = ["accumulate", "split_batch"]


class _Indivisible(ValueError):
    """``_Indivisible(k, path, n)``: a batch leaf (at ``path``) whose ``n`` examples do not split into ``k``
    micro-batches. (The message is made by ``__str__``: torch.compile cannot trace an exception's own
    ``__init__``, and would report that instead of this error.)"""

    @property
    def path(self) -> str:
        return self.args[1]

    @property
    def n(self) -> int:
        return self.args[2]

    def __str__(self) -> str:
        k, path, n = self.args
        return (
            f"accumulate(step, k={k}) cannot split batch leaf {path} of {n} examples into {k} equal "
            f"micro-batches. Use a batch size divisible by {k} (e.g. {max(k, n - n % k)}), or drop_last=True "
            "in the DataLoader."
        )


def _unequal(k: int, first: tuple[str, int], path: str, n: int) -> ValueError:
    return ValueError(
        f"accumulate(step, k={k}) splits every tensor of the batch along its first dimension, the examples, but "
        f"{first[0]} has {first[1]} rows and {path} has {n}: the micro-batches would pair rows of different examples "
        "(a class weight split in k parts, a graph's edges). Pass a tensor that is not per example through a closure "
        "or as a number, and keep per-example ones with the examples on their first dimension (per-token labels as "
        "(B, T), not flattened to (B*T,))."
    )


def _scalar(x: Any) -> bool:
    return x is None or isinstance(x, (int, float, bool)) or (isinstance(x, torch.Tensor) and x.dim() == 0)


def split_batch(batch: Batch, k: int) -> list[Batch]:
    """Splits every tensor (and numpy array) leaf of ``batch`` along dim 0 into ``k`` equal views (other leaves
    are shared).

    A ``collections.UserDict`` (Hugging Face's ``BatchEncoding``) is split as a dict; each part is a copy of it.

    Raises:
        ValueError: if a leading dimension is not divisible by ``k`` (the message names the leaf), or a batch
            with leaves other than scalars has nothing to split (an unregistered dataclass, only strings).

    Example:
        >>> [b.shape[0] for b in split_batch(torch.zeros(8, 3), 4)]
        [2, 2, 2, 2]
    """
    kind = type(batch)
    if kind is tuple or kind is list:  # the usual (x, y): no tree round trip
        if batch and all(type(t) is torch.Tensor and t.dim() > 0 and t.shape[0] % k == 0 for t in batch) and all(
            t.shape[0] == batch[0].shape[0] for t in batch
        ):
            parts = zip(*[t.tensor_split(k) for t in batch])
            return list(parts) if kind is tuple else [list(p) for p in parts]
    leaves, treedef = _tree.tree_flatten(batch)
    chunks: list[Any] = []
    split = False
    rows: tuple[str, int] | None = None  # the first split leaf's path and size: every one must have as many
    for j, leaf in enumerate(leaves):
        if isinstance(leaf, UserDict):  # a pytree leaf to optree (Hugging Face's BatchEncoding): split its values
            inner = [t.shape[0] for t in _tree.tree_leaves(dict(leaf.data)) if isinstance(t, (torch.Tensor, np.ndarray)) and t.ndim]
            if inner and rows is None:
                rows = (_tree.tree_paths(batch)[j], inner[0])
            elif inner and inner[0] != rows[1]:  # (split_batch checks its values agree among themselves)
                raise _unequal(k, rows, _tree.tree_paths(batch)[j], inner[0])
            try:
                chunks.append([_with_data(leaf, part) for part in split_batch(dict(leaf.data), k)])
            except _Indivisible as e:  # named from the batch's top: the path to the UserDict, then inside it
                outer = _tree.tree_paths(batch)[j]
                head, bracket, rest = e.path.partition("[")  # the UserDict's own key first: "x" or "[0]"
                inner = f"[{head!r}]{bracket}{rest}" if head else e.path
                raise _Indivisible(k, f"{outer}{inner}" if outer != "<root>" else e.path, e.n) from None
            split = True
        elif isinstance(leaf, (torch.Tensor, np.ndarray)) and leaf.ndim > 0:
            n = leaf.shape[0]
            if n % k:
                raise _Indivisible(k, _tree.tree_paths(batch)[j], n)
            if rows is None:
                rows = (_tree.tree_paths(batch)[j], n)
            elif n != rows[1]:
                raise _unequal(k, rows, _tree.tree_paths(batch)[j], n)
            chunks.append(torch.tensor_split(leaf, k) if isinstance(leaf, torch.Tensor) else np.split(leaf, k))
            split = True
        else:
            chunks.append([leaf] * k)
    if k > 1 and not split and not all(_scalar(x) for x in leaves):
        # every micro-batch would be the whole batch (an unregistered dataclass, a list of texts): k times the
        # work, and the memory of all. (No batch, or only scalars -- a temperature -- is shared, as meant.)
        raise ValueError(
            f"accumulate(step, k={k}) found nothing to split in a batch of type {type(batch).__name__}: its leaves "
            f"are {sorted({type(x).__name__ for x in leaves}) or 'none'}. It splits tensors (and numpy arrays) along "
            "their first dimension, found in tuples, lists, dicts and registered pytrees: register a dataclass "
            "batch with fnlit.tree.register_dataclass."
        )
    return [_tree.tree_unflatten(treedef, [c[i] for c in chunks]) for i in range(k)]


def _mean_metrics(all_metrics: list[Metrics]) -> dict[str, Any]:
    """The micro-batches' metrics averaged: tensors elementwise (in float32, float64 ones in float64), numbers as numbers,
    dicts, lists and tuples entry by entry; any other value (a string) is the last micro-batch's."""
    return {name: _mean([m[name] for m in all_metrics], name) for name in all_metrics[0]}


def _mean(values: list[Any], path: str) -> Any:
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if tensors and len(tensors) < len(values) and all(isinstance(v, torch.Tensor) or is_real(v) for v in values):
        # a number in some micro-batches, a tensor in others (sum([]) over an empty selection is 0): as tensors
        like = tensors[0]
        dtype = like.dtype if like.is_floating_point() else torch.float32
        values = [v if isinstance(v, torch.Tensor) else torch.full((), float(v), dtype=dtype, device=like.device) for v in values]
    first = values[0]
    if isinstance(first, torch.Tensor):
        try:
            stacked = torch.stack(values)  # fails on other shapes, or a value that is not a tensor
        except (RuntimeError, TypeError) as e:
            shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for v in values]
            raise ValueError(
                f"fnlit.accumulate averages each metric over the micro-batches, but metric {path!r} has a "
                f"different shape in each: {shapes}. Return metrics whose shape does not depend on the batch "
                "size (reduce them in the step), or use a batch size and k that split it evenly."
            ) from e
        # float32, or float64 as it is (a float64 loss would come back with float32's digits)
        return (stacked if stacked.dtype in (torch.float32, torch.float64) else stacked.float()).mean(0)
    if isinstance(first, (int, float)) and all(isinstance(v, (int, float)) for v in values):
        return sum(values) / len(values)
    if isinstance(first, Mapping):
        if any(not isinstance(v, Mapping) or v.keys() != first.keys() for v in values):
            raise ValueError(f"fnlit.accumulate: metric {path!r} has different keys in different micro-batches.")
        return type(first)({k: _mean([v[k] for v in values], f"{path}.{k}") for k in first})  # type: ignore[call-arg]
    if isinstance(first, (list, tuple)) and all(type(v) is type(first) and len(v) == len(first) for v in values):
        means = [_mean([v[i] for v in values], f"{path}[{i}]") for i in range(len(first))]
        return type(first)(means) if type(first) in (list, tuple) else type(first)(*means)
    return values[-1]


def accumulate(step: StepFn, k: int) -> StepFn:
    """Runs ``step`` on k micro-batches of each batch and applies the mean gradient once.

    Each micro-batch is forwarded and backpropagated on its own (peak activation memory of one
    micro-batch); ``apply_gradients`` of micro-batches 1..k-1 only accumulates, the k-th applies the
    mean, so ``state.step`` advances by one and an optimizer's gradient clipping sees the accumulated
    gradient. Buffers (BatchNorm) thread through the micro-batches in order, each micro-batch gets its
    own random key (``fold_in(state.rng, i)``; with k=1 the step's own, so ``accumulate(step, 1)`` steps as
    ``step``), metrics are averaged elementwise (nested dicts, lists and tuples entry by entry; a number beside a
    tensor as a tensor; even with k=1 an integer or float16 metric comes back as a float32 mean). Under
    :func:`fnlit.data_parallel` the intermediate micro-batches do not communicate.

    Any step accumulates correctly: the update is the mean of what the step passes to ``apply_gradients``
    in each micro-batch (its gradients transformed, summed over several losses, or taken at perturbed
    params, as SAM does). The common step, which passes the gradients of one ``value_and_grad`` call on
    unchanged, gets a plain loop's ``(loss / k).backward()``: autograd adds into one buffer per
    parameter in place, so that call returns the accumulator (the gradients summed so far, times 1/k
    when k is a power of two) instead of the micro-batch's own gradient; a metric the step computes from
    them (a gradient norm) reads that running sum (under float16 :func:`fnlit.amp` or :func:`fnlit.shard`,
    whose gradients are unscaled or reduce-scattered micro-batch by micro-batch, every call returns its
    micro-batch's own gradient, and the step's tensors are never changed). Which call that is, micro-batch 0 guesses from the
    previous step (the first call, before the first step); when the step then applies something else,
    micro-batch 0 runs again without guessing -- the step is pure, so the rerun gives the same result;
    only its Python side effects run twice -- and after two wrong guesses accumulate stops guessing. A
    step that changes those gradients in place before applying them (hand clipping with ``clamp_``) is
    seen doing so (their version counters move): micro-batch 0 runs again and its fresh gradients become
    the accumulator instead. Every other ``value_and_grad`` call (e.g. an input gradient for a metric)
    returns its true gradient. A step must treat the applied call's gradients the same way in every
    micro-batch of a step; one that applies other tensors, or changes them in place, in a later
    micro-batch only raises ``ValueError``, and so does one that calls ``apply_gradients`` in some
    micro-batches but not in others (a conditional skip: apply zero gradients instead). The whole step runs
    once per micro-batch: what it does after ``apply_gradients`` (an EMA of the params written into the
    buffers) runs k times per update, on unchanged params in micro-batches 0..k-2. Guard it with the step
    counter, which only the update moves: ``torch.where(new.step != state.step, updated, old)``.

    A loss that couples the examples of a batch (a contrastive loss with in-batch negatives such as NT-Xent, a
    batch-level statistic) sees only its micro-batch's B/k examples, as in a plain loop that accumulates
    micro-batches (``(loss / k).backward()`` on each): ``accumulate(step, k)`` equals that loop, not the full-batch
    step. BatchNorm's batch statistics likewise come from each micro-batch.

    Args:
        step: a step function using :func:`fnlit.value_and_grad` and ``state.apply_gradients``.
        k: number of micro-batches; every batch's leading dimension must be divisible by it.

    Raises:
        ValueError: if k is not a positive int, or (when called) a batch does not divide into k.

    Example:
        >>> import torch, torch.nn.functional as F, fnlit
        >>> model = torch.nn.Linear(4, 1)
        >>> step = fnlit.accumulate(fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1])), 4)
        >>> state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
        >>> state, metrics = step(state, (torch.randn(16, 4), torch.randn(16, 1)))
        >>> int(state.step)
        1
    """
    require_step(step, "fnlit.accumulate")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"fnlit.accumulate expected a positive int k, got {k!r} instead.")

    # Which value_and_grad call of the step is applied, learned from the last step: micro-batch 0 then
    # backpropagates it straight into the accumulator too. Two wrong guesses turn guessing off.
    guess = {"hint": 0, "misses": 0}

    def accumulate_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        require_state(state, "fnlit.accumulate")
        micro_batches = split_batch(batch, k)
        with frame() as (f, outermost):
            if f.accum_k != 1:
                raise ValueError("fnlit.accumulate cannot be nested inside another accumulate; use one with k=k1*k2.")
            f.accum_k = k
            traced = torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None
            f.hint = -1 if traced else guess["hint"]  # traced steps take functorch's path: no in-place calls
            new, all_metrics = state, []
            # fold_in(state.rng, i) for each micro-batch (k=1: the step's own key, so accumulate(step, 1) is step).
            # A data_parallel inside folds its rank in first, from accum_rng: the same keys in either order.
            keys = [state.rng] if k == 1 else _random._fold_in_range(state.rng, k)
            f.accum_rng = state.rng
            for i, (micro, key) in enumerate(zip(micro_batches, keys)):
                f.start_micro(i)
                if i or f.hint < 0:
                    new, metrics = step(new.replace(rng=key), micro)
                else:
                    try:
                        new, metrics = step(state.replace(rng=key), micro)
                    except Mispredicted:  # rerun micro-batch 0 (the step is pure), learning as it goes
                        guess["misses"] += 1
                        f.forget_guess()
                        f.start_micro(0)
                        new, metrics = step(state.replace(rng=key), micro)
                all_metrics.append(metrics)
            f.check_applied()
            if not traced:
                guess["hint"] = f.fast_call if guess["misses"] < 2 else -1
            metrics = _mean_metrics(all_metrics)
            new = new.replace(rng=_random.next_key(state.rng))
            if outermost:
                metrics = f.finish(metrics)
        return new, metrics

    accumulate_step.__wrapped__ = step  # type: ignore[attr-defined]
    accumulate_step.accumulate_k = k  # type: ignore[attr-defined]  # (fit checks the data's last batch splits)
    return accumulate_step
