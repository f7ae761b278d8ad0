"""fnlit.optim: optax-shaped, pure optimizers for PyTorch, fast in eager mode.

An optimizer is a :class:`GradientTransformation` of pure functions ``init``/``update`` (and a fused
``step``); :func:`step` applies one update: ``new_params, new_state = step(tx, grads, state, params)``.

Example:
    >>> import torch, fnlit
    >>> tx, params = fnlit.optim.sgd(0.1), {"w": torch.ones(2)}
    >>> params, opt_state = fnlit.optim.step(tx, {"w": torch.ones(2)}, tx.init(params), params)
    >>> params["w"]
    tensor([0.9000, 0.9000])
"""

from ._alias import AdamState as AdamState
from ._alias import SGDState as SGDState
from ._alias import adam as adam
from ._alias import adamw as adamw
from ._alias import learning_rate as learning_rate
from ._alias import sgd as sgd
from ._base import EmptyState as EmptyState
from ._base import GradientTransformation as GradientTransformation
from ._base import apply_updates as apply_updates
from ._base import chain as chain
from ._base import decay_mask as decay_mask
from ._base import functional_path as functional_path
from ._base import step as step
from ._base import use_functional as use_functional
from ._privacy import DPAggregateState as DPAggregateState
from ._privacy import dp_sgd_aggregate as dp_sgd_aggregate
from ._schedules import Schedule as Schedule
from ._schedules import constant as constant
from ._schedules import cosine_decay as cosine_decay
from ._schedules import join as join
from ._schedules import linear_warmup as linear_warmup
from ._schedules import step_decay as step_decay
from ._schedules import warmup_cosine as warmup_cosine
from ._transforms import AddDecayedWeightsState as AddDecayedWeightsState
from ._transforms import MaskedState as MaskedState
from ._transforms import ScaleByAdamState as ScaleByAdamState
from ._transforms import ScaleByLearningRateState as ScaleByLearningRateState
from ._transforms import ScaleByScheduleState as ScaleByScheduleState
from ._transforms import TraceState as TraceState
from ._transforms import add_decayed_weights as add_decayed_weights
from ._transforms import clip_by_global_norm as clip_by_global_norm
from ._transforms import masked as masked
from ._transforms import scale as scale
from ._transforms import scale_by_adam as scale_by_adam
from ._transforms import scale_by_learning_rate as scale_by_learning_rate
from ._transforms import scale_by_schedule as scale_by_schedule
from ._transforms import set_to_zero as set_to_zero
from ._transforms import trace as trace

__all__ = [
    "GradientTransformation",
    "EmptyState",
    "step",
    "apply_updates",
    "chain",
    "masked",
    "decay_mask",
    "functional_path",
    "use_functional",
    "sgd",
    "adam",
    "adamw",
    "learning_rate",
    "SGDState",
    "AdamState",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "scale_by_adam",
    "trace",
    "add_decayed_weights",
    "clip_by_global_norm",
    "set_to_zero",
    "ScaleByAdamState",
    "ScaleByLearningRateState",
    "ScaleByScheduleState",
    "TraceState",
    "AddDecayedWeightsState",
    "MaskedState",
    "dp_sgd_aggregate",
    "DPAggregateState",
    "Schedule",
    "constant",
    "linear_warmup",
    "cosine_decay",
    "warmup_cosine",
    "step_decay",
    "join",
]
