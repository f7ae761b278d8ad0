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


def test_lazy_names_are_typed_and_stay_lazy():
    # `import fnlit` leaves the sharding modules unloaded (module __getattr__), which typed the names as `object`
    # for type checkers; each needs an import under `if TYPE_CHECKING:`, the same name from the same module.
    import ast
    import inspect
    import subprocess

    tree = ast.parse(inspect.getsource(fnlit))
    typed = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                if isinstance(imp, ast.ImportFrom):
                    for alias in imp.names:
                        typed[alias.asname or alias.name] = ("fnlit." + imp.module if imp.level else imp.module, alias.name)
    assert fnlit._LAZY and {name: (mod, name) for name, mod in fnlit._LAZY.items()}.items() <= typed.items()
    code = "import sys, fnlit; print(sorted(set(fnlit._LAZY.values()) & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
    assert fnlit.shard_state is sys.modules["fnlit.transforms.shard"].shard_state  # and still loads on first use


def test_weight_decay_takes_a_tensor():
    # The docstrings: "pass torch.tensor(0.0) to keep it adjustable" (a 0.0 float decay is dropped at build time).
    for fn in (fnlit.optim.sgd, fnlit.optim.adam, fnlit.optim.adamw, fnlit.optim.add_decayed_weights):
        assert set(typing.get_args(_hints(fn)["weight_decay"])) == {float, torch.Tensor}, fn.__name__


def test_schedules_typed_as_learning_rate_describes():
    # LearningRate (adamw's) describes a schedule as Callable[[Tensor], Tensor]; join must take one.
    tensor_schedule = collections.abc.Callable[[torch.Tensor], torch.Tensor]
    assert _hints(fnlit.optim.join)["schedules"] == collections.abc.Sequence[tensor_schedule]
    seen = []

    def record(count):
        seen.append(type(count))
        return torch.tensor(0.1)

    s = fnlit.optim.join([record, record], [5])
    for count in (3, 7, torch.tensor(7)):
        s(count)
    assert seen and set(seen) == {torch.Tensor}  # join calls its schedules with tensors only, even for an int count
    # scale_by_learning_rate's docstring takes "a float, a 0-d tensor or a schedule"
    assert torch.Tensor in typing.get_args(_hints(fnlit.optim.scale_by_learning_rate)["learning_rate"])
