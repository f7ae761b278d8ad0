"""fnlit ships ``py.typed``: its public annotations must accept the documented usage.

mypy is no test dependency, so these read the annotations at runtime (``typing.get_type_hints``,
``typing.get_overloads``, the AST of ``fnlit/__init__.py``) and compare them with what the docs tell users
to write.
"""

from __future__ import annotations

import collections.abc
import typing

import torch

import fnlit
from fnlit._types import Batch, Metrics, StepFn
from fnlit.state import TrainState


def _hints(fn: typing.Callable[..., typing.Any]) -> dict[str, typing.Any]:
    """``fn``'s annotations, resolved in its module (plus the names kept under ``TYPE_CHECKING``)."""
    import sys

    names = dict(vars(sys.modules[fn.__module__]))
    names.setdefault("TrainState", TrainState)
    return typing.get_type_hints(fn, globalns=names)


def test_amp_takes_and_returns_an_eval_step():
    # The docs wrap eval steps: fnlit.amp(fnlit.eval_step(model, metrics_fn)) goes to fit(eval_step=) / evaluate.
    eval_step = collections.abc.Callable[[TrainState, Batch], Metrics]
    signatures = [(h["step"], h["return"]) for h in map(_hints, typing.get_overloads(fnlit.amp))]
    assert (StepFn, StepFn) in signatures
    assert (eval_step, eval_step) in signatures
