"""Step transforms: functions from a step function to a step function."""

from .accumulate import accumulate as accumulate
from .amp import LossScaleState as LossScaleState
from .amp import amp as amp
from .amp import init_loss_scale as init_loss_scale
from .data_parallel import data_parallel as data_parallel

__all__ = ["accumulate", "amp", "data_parallel", "LossScaleState", "init_loss_scale"]
