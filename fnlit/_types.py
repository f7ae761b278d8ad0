"""Type aliases shared across fnlit. Pure annotations: nothing here runs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from .state import TrainState

PyTree = Any
Params = dict[str, torch.Tensor]
"""Parameter name (as ``module.named_parameters()`` gives it) -> tensor."""
Buffers = dict[str, torch.Tensor]
"""Buffer name (as ``module.named_buffers()`` gives it) -> tensor."""
Grads = dict[str, torch.Tensor]
"""Gradients, in the structure of :data:`Params`."""
Updates = PyTree
OptState = PyTree
Batch = Any
"""Whatever the data yields: a tensor, a tuple/list/dict of tensors, ..."""
Metrics = Mapping[str, torch.Tensor]
"""Scalar tensors that leave a step; the driver reads them at log intervals."""


class StepFn(Protocol):
    """A training step: ``(state, batch) -> (new_state, metrics)``; pure, no host sync inside."""

    def __call__(self, state: TrainState, batch: Batch, /) -> tuple[TrainState, Metrics]: ...


class ScheduleFn(Protocol):
    """A schedule: step count (int or 0-d tensor) -> value (float tensor)."""

    def __call__(self, count: int | torch.Tensor, /) -> torch.Tensor: ...


__all__ = ["PyTree", "Params", "Buffers", "Grads", "Updates", "OptState", "Batch", "Metrics", "StepFn", "ScheduleFn"]
