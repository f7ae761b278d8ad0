"""The per-step context that lets transforms compose over hand-written steps.

Every step goes through two functions: :func:`fnlit.value_and_grad` (forward + backward) and
:meth:`TrainState.apply_gradients` (the update). The outermost transform opens a :class:`Frame` for
the duration of one step; each transform records its setting in it (``amp``: dtype and loss scale;
``accumulate``: k and the micro-batch index; ``data_parallel``: the process group), and the two
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


def current() -> Frame | None:
    """The frame of the step being run, or None outside every transform."""
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
        self.dp_group: Any = None
        self.dp_bucket_bytes = 0
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

    def unscale_(self, grads: list[torch.Tensor]) -> None:
        """Unscales fresh gradients in place (they are ours) and records any overflow in found_inf."""
        if self.scaler is None or not grads:
            return
        # GradScaler's exact arithmetic: inv_scale computed in float64, applied in float32.
        inv_scale = self.scaler.scale.double().reciprocal().float()
        torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, inv_scale)

    # -- the update pipeline -----------------------------------------------------------------
    def apply_gradients(self, state: TrainState, grads: Any, changes: dict[str, Any]) -> TrainState:
        leaves, treedef = _tree.tree_flatten(state.check_grads(grads))
        if self.accum_k > 1:
            if self.micro < self.accum_k - 1:
                # Not the last micro-batch: only add into the accumulator; no update, no communication.
                if self.acc is None:
                    self.acc = leaves
                elif self.micro == 1:
                    self.acc = torch._foreach_add(self.acc, leaves)  # a fresh buffer, never the caller's grads
                else:
                    torch._foreach_add_(self.acc, leaves)
                return state.replace(**changes)
            leaves = torch._foreach_add(self.acc, leaves) if self.acc is not None else list(leaves)
            torch._foreach_mul_(leaves, 1.0 / self.accum_k)
            self.acc = None
        if self.dp_group is not None:
            from .data_parallel import all_reduce_mean_

            extra = [self.found_inf.reshape(1)] if self.found_inf is not None else []
            reduced = all_reduce_mean_(list(leaves) + extra, self.dp_group, self.dp_bucket_bytes)
            if extra:
                self.found_inf = reduced.pop().reshape(())
            leaves = reduced
        new = state.apply_update(_tree.tree_unflatten(treedef, leaves), **changes)
        if self.scaler is not None:
            from .amp import finish_scaled_update

            new, self.extra = finish_scaled_update(state, new, self.scaler, self.found_inf)
        return new

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Called once by the outermost transform: average metrics across ranks, add the frame's own."""
        if self.dp_group is not None:
            from .data_parallel import all_reduce_metrics

            metrics = all_reduce_metrics(metrics, self.dp_group)
        if self.extra:
            metrics = {**metrics, **self.extra}
        return metrics


@contextmanager
def frame() -> Iterator[tuple[Frame, bool]]:
    """Opens the step's frame if none is open; yields (frame, whether this call is the outermost)."""
    existing = _CURRENT.get()
    if existing is not None:
        yield existing, False
        return
    f = Frame()
    token = _CURRENT.set(f)
    try:
        yield f, True
    finally:
        _CURRENT.reset(token)
