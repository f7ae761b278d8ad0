"""fnlit ships ``py.typed``: its public annotations must accept the documented usage.

mypy is no test dependency, so these read the annotations at runtime (``typing.get_type_hints``,
``typing.get_overloads``, the AST of ``fnlit/__init__.py``) and compare them with what the docs tell users
to write.
"""

from __future__ import annotations

import collections.abc
import sys
import typing

import torch

import fnlit
from fnlit._types import Batch, Metrics, StepFn
from fnlit.state import TrainState


def _hints(fn: typing.Callable[..., typing.Any]) -> dict[str, typing.Any]:
    """``fn``'s annotations, resolved in its module (plus the names kept under ``TYPE_CHECKING``)."""
    names = dict(vars(sys.modules[fn.__module__]))
    names.setdefault("TrainState", TrainState)
    return typing.get_type_hints(fn, globalns=names)


def test_amp_takes_and_returns_an_eval_step():
    # The docs wrap eval steps: fnlit.amp(fnlit.eval_step(model, metrics_fn)) goes to fit(eval_step=) / evaluate.
    eval_step = collections.abc.Callable[[TrainState, Batch], Metrics]
    signatures = [(h["step"], h["return"]) for h in map(_hints, typing.get_overloads(fnlit.amp))]
    assert (StepFn, StepFn) in signatures
    assert (eval_step, eval_step) in signatures


def test_ensemble_of_an_eval_step_returns_metrics():
    # fnlit.evaluate's error for a stacked state says: "Wrap it: fnlit.ensemble(eval_step, n)".
    from fnlit.ensemble import EnsembleStep

    hints = _hints(fnlit.ensemble)
    out = typing.get_args(hints["return"])  # EnsembleStep[<what step returns>]
    assert typing.get_origin(hints["return"]) is EnsembleStep and len(out) == 1
    assert hints["step"] == collections.abc.Callable[[TrainState, Batch], out[0]]
    assert _hints(EnsembleStep.__call__)["return"] is out[0]
    bound = out[0].__bound__  # a training step's pair or an eval step's metrics
    if isinstance(bound, typing.ForwardRef):
        bound = eval(bound.__forward_arg__, vars(sys.modules[fnlit.ensemble.__module__]))
    assert set(typing.get_args(bound)) == {tuple[TrainState, Metrics], Metrics}

