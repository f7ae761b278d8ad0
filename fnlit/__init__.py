"""fnlit: functional, explicit-state training for PyTorch.

Training is a pure function ``step(state, batch) -> (state, metrics)`` over an immutable
:class:`TrainState`; transforms turn step functions into step functions; :func:`fit` threads the state
through the data.
"""

from . import callbacks as callbacks
from . import checkpoint as checkpoint
from . import data as data
from . import distributed as distributed
from . import optim as optim
from . import random as random
from . import summary as summary
from . import testing as testing
from . import tree as tree
from .data import ArrayLoader as ArrayLoader
from .checkpoint import CheckpointError as CheckpointError
from .checkpoint import Checkpointer as Checkpointer
from .checkpoint import export as export
from .checkpoint import load_module as load_module
from .checkpoint import restore as restore
from .checkpoint import save as save
from .ensemble import ensemble as ensemble
from .ensemble import ensemble_states as ensemble_states
from .ensemble import per_example_grads as per_example_grads
from .ensemble import stack_states as stack_states
from .ensemble import unstack_state as unstack_state
from .functional import apply as apply
from .functional import eval_step as eval_step
from .functional import train_step as train_step
from .functional import value_and_grad as value_and_grad
from .loop import evaluate as evaluate
from .loop import fit as fit
from .state import TrainState as TrainState
from .transforms import accumulate as accumulate
from .transforms.compile import CaptureError as CaptureError
from .transforms.compile import CompiledStep as CompiledStep
from .transforms.compile import compile as compile
from .transforms.donate import donating as donating
from .transforms import amp as amp
from .transforms import data_parallel as data_parallel

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the lazily loaded names of _LAZY below, for type checkers and IDEs (never run)
    from .sharded_checkpoint import read_sharded_meta as read_sharded_meta
    from .sharded_checkpoint import restore_sharded as restore_sharded
    from .sharded_checkpoint import save_sharded as save_sharded
    from .transforms.shard import shard as shard
    from .transforms.shard import shard_state as shard_state
    from .transforms.shard import unshard_state as unshard_state

__version__ = "0.1.0"

# Sharded training pulls in DTensor and torch.distributed.checkpoint (about 1.5 s of imports), so its
# names load on first use instead of with `import fnlit`.
_LAZY = {
    "shard": "fnlit.transforms.shard",
    "shard_state": "fnlit.transforms.shard",
    "unshard_state": "fnlit.transforms.shard",
    "save_sharded": "fnlit.sharded_checkpoint",
    "restore_sharded": "fnlit.sharded_checkpoint",
    "read_sharded_meta": "fnlit.sharded_checkpoint",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fnlit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "TrainState",
    "apply",
    "value_and_grad",
    "train_step",
    "eval_step",
    "accumulate",
    "amp",
    "data_parallel",
    "shard",
    "shard_state",
    "unshard_state",
    "save_sharded",
    "restore_sharded",
    "read_sharded_meta",
    "compile",
    "CompiledStep",
    "CaptureError",
    "donating",
    "fit",
    "evaluate",
    "callbacks",
    "checkpoint",
    "save",
    "restore",
    "export",
    "load_module",
    "Checkpointer",
    "CheckpointError",
    "data",
    "ArrayLoader",
    "summary",
    "ensemble",
    "ensemble_states",
    "stack_states",
    "unstack_state",
    "per_example_grads",
    "testing",
    "optim",
    "random",
    "tree",
    "distributed",
]
