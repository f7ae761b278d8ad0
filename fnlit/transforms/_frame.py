"""The per-step context that lets transforms compose over hand-written steps.

Every step goes through two functions: :func:`fnlit.value_and_grad` (forward + backward) and
:meth:`TrainState.apply_gradients` (the update). The outermost transform opens a :class:`Frame` for
the duration of one step; each transform records its setting in it (``amp``: dtype and loss scale;
``accumulate``: k and the micro-batch index; ``data_parallel`` and ``shard``: the process group), and the two
functions read the frame. ``apply_gradients`` always runs the same pipeline -- accumulate, all-reduce
(one collective for the gradients and the overflow flag), unscale check, optimizer, finite select,
loss-scale update -- so the nesting order of the transforms cannot change the result.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch

from .. import tree as _tree

if TYPE_CHECKING:
    from ..state import TrainState
    from .amp import LossScaleState

_CURRENT: ContextVar[Frame | None] = ContextVar("fnlit_frame", default=None)
# torch.compile cannot trace ContextVar.set(); while tracing, frames live on this plain stack instead
# (dynamo replays list mutations). Tracing is single-threaded, so the ContextVar's isolation is not needed.
_TRACED: list[Frame] = []


_CHANGED_GRADS = (
    "Under fnlit.accumulate, apply_gradients expected the gradients value_and_grad returned, unchanged (they "
    "hold the sum over the micro-batches so far), got other tensors instead. Transform gradients in the "
    "optimizer, which sees the accumulated gradient once per update: e.g. "
    "fnlit.optim.chain(fnlit.optim.clip_by_global_norm(1.0), fnlit.optim.adamw(1e-3))."
)


def current() -> Frame | None:
    """The frame of the step being run, or None outside every transform."""
    if torch.compiler.is_compiling():
        return _TRACED[-1] if _TRACED else None
    return _CURRENT.get()


class Frame:
    """Settings of the transforms active in this step, and the gradients accumulated so far."""

    def __init__(self) -> None:
        self.amp_dtype: torch.dtype | None = None
        self.scaler: LossScaleState | None = None
        self.found_inf: torch.Tensor | None = None
        self.accum_k = 1
        self.micro = 0
        self.acc: list[torch.Tensor] | None = None
        self.leaves: list[torch.Tensor] | None = None  # accumulate: the leaves every micro-batch reuses
        self.leaf_sources: list[torch.Tensor] = []  # the tensors those leaves alias
        self.leaf_micro = -1  # the micro-batch that used them last
        self.shared: list[torch.Tensor] | None = None  # their gradients, as value_and_grad returned them
        self.returned: list[torch.Tensor] | None = None  # other gradients value_and_grad returned, already / k
        self._seed: torch.Tensor | None = None
        self.dp_group: Any = None
        self.dp_bucket_bytes = 0
        self.shard_group: Any = None  # fnlit.shard: gradients arrive reduce-scattered, as DTensors
        self.known: list[torch.Tensor] = []  # scalars value_and_grad returned: reduced with the gradients
        self.reduced: dict[int, torch.Tensor] = {}  # id(known scalar) -> its mean across ranks
        self.extra: dict[str, torch.Tensor] = {}

    # -- set by the transforms -------------------------------------------------------------
    def set_amp(self, dtype: torch.dtype, scaler: LossScaleState | None, device: torch.device) -> None:
        self.amp_dtype = dtype
        if scaler is not None and self.scaler is None:
            self.scaler = scaler
            self.found_inf = torch.zeros((), dtype=torch.float32, device=device)

    # -- read by value_and_grad --------------------------------------------------------------
    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scaler.scale if self.scaler is not None else loss

    def finish_grads(self, grads: list[torch.Tensor], seeded: bool, traced: bool = False) -> list[torch.Tensor]:
        """Makes value_and_grad's fresh gradients ready for apply_gradients; returns them.

        Float16 amp: unscaled in place (they are ours), any overflow recorded in found_inf. Under
        accumulate: divided by k, unless backward already was (``seeded``); with a loss scale the
        division rides in the unscaling. ``traced`` (torch.compile, torch.func): out of place.
        """
        k = self.accum_k
        divide = k > 1 and not seeded
        if self.scaler is not None and grads:
            views = grads
            if self.shard_group is not None:
                from .shard import local_views

                views = local_views(grads)  # each rank checks and unscales its own shard
            # GradScaler's exact arithmetic: inv_scale computed in float64, applied in float32.
            inv_scale = self.scaler.scale.double().reciprocal().float()
            if divide:
                inv_scale = inv_scale * (1.0 / k)
            torch._amp_foreach_non_finite_check_and_unscale_(views, self.found_inf, inv_scale)
        elif divide and grads:
            if traced:
                grads = [g * (1.0 / k) for g in grads]
            else:
                torch._foreach_mul_(grads, 1.0 / k)
        if k > 1:
            self.returned = grads
        return grads

    def note_scalars(self, tree: Any) -> None:
        """Remembers the 0-d float tensors value_and_grad returns (loss, scalar aux) under data_parallel.

        They travel in the gradient all-reduce, so metrics made of them need no collective of their own.
        Not under accumulate: there the metrics are micro-batch averages, reduced once at the end.
        """
        if self.dp_group is None or self.accum_k > 1:
            return
        for t in _tree.tree_leaves(tree):
            if isinstance(t, torch.Tensor) and t.dim() == 0 and t.is_floating_point():
                self.known.append(t)

    def leaves_for(self, sources: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Leaves for differentiating with respect to ``sources`` that all micro-batches share, or None.

        Under accumulate (without loss scaling, whose micro-batches are unscaled one by one, or
        sharding): micro-batch 0 makes them; a later one gets the same leaves, their ``.grad`` holding
        the sum so far, if it differentiates with respect to the very same tensors, once.
        """
        if self.accum_k == 1 or self.scaler is not None or self.shard_group is not None:
            return None
        if self.micro == 0 and self.leaves is None:
            if any(type(t) is not torch.Tensor for t in sources):
                return None
            self.leaves = [t.detach().requires_grad_() for t in sources]
            self.leaf_sources, self.leaf_micro = sources, 0
            return self.leaves
        known = self.leaf_sources
        if self.leaves is None or self.leaf_micro != self.micro - 1 or len(sources) != len(known):
            return None
        for a, b in zip(sources, known):
            if a is not b:
                return None
        self.leaf_micro = self.micro
        return self.leaves

    def backward_seed(self, target: torch.Tensor) -> torch.Tensor | None:
        """The gradient backpropagated from the loss: ``1/k`` under accumulate (None: the usual 1).

        Each micro-batch's gradients then come out divided by k, as a plain loop's ``(loss / k).backward()``
        gives them, so the accumulated sum is already the mean: no pass over the gradients at the end.
        """
        if self.accum_k == 1 or self.scaler is not None:  # with a loss scale, finish_grads divides by k
            return None
        seed = self._seed
        if seed is None or seed.dtype != target.dtype or seed.device != target.device or seed.shape != target.shape:
            seed = self._seed = torch.full_like(target, 1.0 / self.accum_k)
        return seed

    def shared_grads(self) -> list[torch.Tensor]:
        """The shared leaves' gradients so far (zeros for a leaf the loss does not depend on)."""
        leaves = self.leaves
        assert leaves is not None
        for leaf in leaves:
            if leaf.grad is None:
                leaf.grad = torch.zeros_like(leaf)
        self.shared = [leaf.grad for leaf in leaves]
        return self.shared

    def accumulator_for(self, inputs: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The gradient accumulator autograd may add into for these inputs, or None.

        Only after the first micro-batch of accumulate, without loss scaling (each micro-batch's
        gradients are unscaled on their own) or sharding, and when the accumulator matches the inputs
        one to one (same shapes, dtypes, devices and strides).
        """
        acc = self.acc
        if acc is None or self.scaler is not None or self.shard_group is not None or len(acc) != len(inputs):
            return None
        for a, x in zip(acc, inputs):
            if type(a) is not torch.Tensor or a.shape != x.shape or a.dtype != x.dtype or a.stride() != x.stride() or a.device != x.device:
                return None
        return acc

    # -- the update pipeline -----------------------------------------------------------------
    def apply_gradients(self, state: TrainState, grads: Any, changes: dict[str, Any]) -> TrainState:
        leaves, treedef = _tree.tree_flatten(state.check_grads(grads))
        if self.accum_k > 1:
            # The accumulator holds the sum of the micro-batches' gradients divided by k (their mean at
            # the last one). value_and_grad returns gradients already divided (backward_seed); others,
            # computed some other way, are divided here.
            returned = self.shared if self.shared is not None else self.returned
            self.shared = self.returned = None
            if returned is not None:
                if len(returned) != len(leaves) or any(a is not b for a, b in zip(returned, leaves)):
                    raise ValueError(_CHANGED_GRADS)
            else:
                leaves = torch._foreach_mul(leaves, 1.0 / self.accum_k)
            if self.acc is None:
                self.acc = leaves  # fresh from value_and_grad (or the copies above): ours to add into
            elif leaves[0] is not self.acc[0]:  # else autograd already accumulated into it in place
                torch._foreach_add_(self.acc, leaves)
            if self.micro < self.accum_k - 1:
                return state.replace(**changes)  # no update, no communication
            leaves, self.acc = self.acc, None
        if self.dp_group is not None and self.shard_group is not None:
            from .shard import _WITH_DATA_PARALLEL

            raise ValueError(_WITH_DATA_PARALLEL)
        if self.shard_group is not None and self.found_inf is not None:
            import torch.distributed as dist

            # The shards' overflow flags: an overflow on any rank must skip the step on all of them.
            dist.all_reduce(self.found_inf, group=self.shard_group)
        if self.dp_group is not None:
            from .data_parallel import all_reduce_mean_

            n = len(leaves)
            riders = ([self.found_inf] if self.found_inf is not None else []) + self.known
            reduced = all_reduce_mean_(list(leaves) + [t.reshape(1).float() for t in riders], self.dp_group, self.dp_bucket_bytes)
            leaves, riders_out = reduced[:n], [t.reshape(()) for t in reduced[n:]]
            if self.found_inf is not None:
                self.found_inf = riders_out.pop(0)  # divided by the world size: still > 0 iff any rank overflowed
            self.reduced = {id(t): r.to(t.dtype) for t, r in zip(self.known, riders_out)}
        if self.scaler is not None:
            from ..optim._base import donated_update
            from .amp import finish_scaled_update

            with donated_update(False):  # overflowed steps keep the old params: they must stay intact
                new = state.apply_update(_tree.tree_unflatten(treedef, leaves), **changes)
            new, self.extra = finish_scaled_update(state, new, self.scaler, self.found_inf)
            return new
        return state.apply_update(_tree.tree_unflatten(treedef, leaves), **changes)

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Called once by the outermost transform: average metrics across ranks, add the frame's own."""
        group = self.dp_group if self.dp_group is not None else self.shard_group
        if group is not None:
            from .data_parallel import all_reduce_metrics

            metrics = all_reduce_metrics(metrics, group, self.reduced)
        if self.extra:
            metrics = {**metrics, **self.extra}
        return metrics


def run_on_rank(step: Any, state: TrainState, batch: Any, rank: int, f: Frame, outermost: bool) -> tuple[TrainState, Any]:
    """Runs one rank's part of a data-parallel or sharded step.

    The rank draws its own randomness (its key is folded with its rank) while every rank keeps the
    same next key, so states stay identical across ranks; the outermost transform finishes the frame.
    """
    from .. import random as _random

    new, metrics = step(state.replace(rng=_random.fold_in(state.rng, rank)), batch)
    new = new.replace(rng=_random.next_key(state.rng))
    if outermost:
        metrics = f.finish(dict(metrics))
    return new, metrics


@contextmanager
def frame() -> Iterator[tuple[Frame, bool]]:
    """Opens the step's frame if none is open; yields (frame, whether this call is the outermost)."""
    existing = current()
    if existing is not None:
        yield existing, False
        return
    f = Frame()
    if torch.compiler.is_compiling():
        _TRACED.append(f)
        try:
            yield f, True
        finally:
            _TRACED.pop()
        return
    token = _CURRENT.set(f)
    try:
        yield f, True
    finally:
        _CURRENT.reset(token)
