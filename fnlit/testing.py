"""Assertions for users' own tests of a training step: a step is a function, so test it like one.

* :func:`assert_trees_close` -- two pytrees (states, params, metrics) agree; names the first path that does not.
* :func:`assert_pure` -- the step mutates none of its inputs, leaves the global RNG alone, and gives
  bitwise the same outputs twice.
* :func:`assert_overfits` -- the step can fit a single batch (it learns at all).
* :func:`no_host_sync` / :func:`assert_no_host_sync` -- the step never reads a tensor's value on the host
  (``.item()``, ``float(t)``, ``if loss > 0:``, ``.tolist()``, ``print(t)``, a device-to-host copy).

Which host reads are flagged: every read of a tensor's value, with one exception -- fnlit's own reads
of host memory that it does by design: random keys (0-d int64 CPU tensors turned into seeds), in
the eager CPU fast path, learning rate and weight decay held on the CPU, and the device mesh's CPU tensor
that :func:`fnlit.shard`'s first call builds. Those happen in a few fnlit
functions listed in ``_ALLOWED`` and are allowed only for CPU tensors; a read from anywhere else --
the user's step included -- fails, even on the CPU where it costs nothing, because on an accelerator
the same line would stall every step and break graph capture. The integer that
:func:`fnlit.random.fold_in` folds in is the user's: its read is allowed for CPU counters
(``fold_in(state.rng, state.step)``, ``state.step + 1``: ``state.step`` is a CPU tensor by design) and flagged for
the batch's tensors, their views and every tensor computed from them in the block (``batch["i"][0].long()``,
``batch["i"].sum()``: all on the device in training), which :func:`assert_no_host_sync` and
``no_host_sync(batch=...)`` know.

Example:
    >>> import torch, torch.nn.functional as F, fnlit
    >>> model = torch.nn.Linear(3, 1)
    >>> step = fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]))
    >>> state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    >>> new, metrics = fnlit.testing.assert_pure(step, state, (torch.ones(4, 3), torch.zeros(4, 1)))
    >>> int(new.step), sorted(metrics)
    (1, ['loss'])
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
import random
import sys
import types
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as torch_pytree
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

from . import _storage
from ._checkpoint_io import _dtensor_class
from .ensemble import EnsembleStep, _fold_keys  # (not `from . import ensemble`: fnlit.ensemble is also the function)
from .transforms.data_parallel import _names_agree
from . import functional as _functional
from . import random as _random
from . import tree as _tree
from ._types import Batch, Metrics, StepFn
from .optim import _alias, _privacy
from .state import TrainState
from .transforms.donate import check_not_donated, is_donated

__all__ = ["HostSyncError", "assert_no_host_sync", "assert_overfits", "assert_pure", "assert_trees_close", "no_host_sync"]


# ------------------------------------------------------------------------------ trees
def _labelled(tree: Any, name: str, state: bool = False) -> tuple[list[str], list[Any], Any]:
    paths, leaves, treedef = _tree.tree_flatten_with_path(tree)
    out = []
    for p in paths:
        if p == "<root>":
            out.append(name)
        elif p.startswith("["):
            out.append(name + p)
        elif isinstance(tree, dict) and not state:  # keystr writes a root dict's key bare: "w['x']" -> tree['w']['x']
            key, _, rest = p.partition("[")
            out.append(f"{name}[{key!r}]" + ("[" + rest if rest else ""))
        else:
            out.append(f"{name}.{p}")
    return out, leaves, treedef


def assert_trees_close(actual: Any, expected: Any, *, rtol: float = 1e-5, atol: float = 1e-6, name: str = "tree") -> None:
    """Asserts two pytrees have the same structure and leaves equal within ``atol + rtol * |expected|``.

    Tensor leaves must also agree in shape and dtype; integer and bool tensors (steps, keys, counters)
    must be equal exactly, complex ones are compared as complex numbers. Python and numpy floats (such as
    :func:`fnlit.evaluate`'s metrics) are compared within the same tolerances, NaN equal to NaN; other leaves
    (ints, strings) must be ``==``. A sharded state's tensors (:func:`fnlit.shard_state`) are compared whole, with
    each other or with a plain state's: each is gathered (a collective), so call it on every rank.

    Args:
        actual: the tree under test.
        expected: the reference tree.
        rtol: relative tolerance.
        atol: absolute tolerance.
        name: what to call the trees in the message (``"state"`` gives paths like ``state.params['w']``).

    Raises:
        AssertionError: naming the first differing path, the largest difference there, and how many
            leaves differ.

    Example:
        >>> import torch
        >>> assert_trees_close({"w": torch.ones(2)}, {"w": torch.ones(2) + 1e-7})
        >>> assert_trees_close({"w": torch.ones(2)}, {"w": torch.zeros(2)})
        Traceback (most recent call last):
        AssertionError: tree['w'] differs: max abs difference 1 (at index (0,)), rtol=1e-05, atol=1e-06; 1 of 1 leaves differ.
    """
    is_state = isinstance(actual, TrainState) and isinstance(expected, TrainState)
    if is_state:
        check_not_donated(actual)  # its fields are sentinels: say so, not "structure differs"
        check_not_donated(expected)
        # Field by field: the optimizer object is static (not compared); its state is.
        actual = {f: getattr(actual, f) for f in _STATE_FIELDS}
        expected = {f: getattr(expected, f) for f in _STATE_FIELDS}
    where = _tree.first_mismatch(expected, actual)
    if where is not None:
        raise AssertionError(f"{name}: structure differs from the expected tree: {where}.")
    paths, a_leaves, _ = _labelled(actual, name, state=is_state)
    bad: list[str] = []
    for path, a, e in zip(paths, a_leaves, _tree.tree_leaves(expected)):
        msg = _leaf_difference(a, e, rtol, atol)
        if msg is not None:
            bad.append(f"{path} differs: {msg}")
    if bad:
        raise AssertionError(f"{bad[0]}, rtol={rtol:g}, atol={atol:g}; {len(bad)} of {len(paths)} leaves differ.")


_STATE_FIELDS = ("step", "params", "buffers", "opt_state", "scaler", "rng")


def _inexact(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _leaf_difference(a: Any, e: Any, rtol: float, atol: float) -> str | None:
    if isinstance(e, np.ndarray) and isinstance(a, np.ndarray):
        if a.shape != e.shape:
            return f"shape {a.shape}, expected {e.shape}"
        if e.dtype.kind not in "biufc" or a.dtype.kind not in "biufc":  # strings, objects: element by element
            diffs = (_leaf_difference(x, y, rtol, atol) for x, y in zip(a.ravel().tolist(), e.ravel().tolist()))
            return next((d for d in diffs if d is not None), None)
        # as tensors, with the same tolerances: copies in native byte order (any stride, read-only too)
        a, e = (torch.from_numpy(np.array(x, dtype=x.dtype.newbyteorder("="))) for x in (a, e))
    if _inexact(a) and _inexact(e) and (isinstance(a, (float, np.floating)) or isinstance(e, (float, np.floating))):
        # a Python or numpy float (fnlit.evaluate's metrics): within the tolerances, NaN equal to NaN, as tensors
        if a == e or math.isnan(a) and math.isnan(e):
            return None
        if math.isfinite(a) and math.isfinite(e) and abs(a - e) <= atol + rtol * abs(e):
            return None
        return f"got {a!r}, expected {e!r} (difference {abs(a - e):.3g})"
    if not isinstance(e, torch.Tensor):
        return None if a == e else f"got {a!r}, expected {e!r}"
    if a.dtype != e.dtype:
        return f"dtype {a.dtype}, expected {e.dtype}"
    if a.numel() == 0:
        return None
    dtensor = _dtensor_class()  # a sharded state's (fnlit.shard): compared whole, gathered on every rank
    a, e = ((x.full_tensor() if dtensor is not None and isinstance(x, dtensor) else x).detach().cpu() for x in (a, e))
    if not (e.is_floating_point() or e.is_complex()):  # steps, keys, counters, masks: exactly
        if torch.equal(a, e):
            return None
        idx = tuple(int(i) for i in (a != e).nonzero()[0])
        return f"got {a[idx].item()}, expected {e[idx].item()} (at index {idx}; integer and bool leaves compare exactly)"
    wide = torch.complex128 if e.is_complex() else torch.float64
    a64, e64 = a.to(wide), e.to(wide)
    if torch.allclose(a64, e64, rtol=rtol, atol=atol, equal_nan=True):
        return None
    # Equal values (equal infinities included) and NaN against NaN differ by 0; inf against -inf or a number,
    # and NaN against a number, by inf (not nan_to_num's 1.8e308).
    same = (a64 == e64) | (torch.isnan(a64) & torch.isnan(e64))
    diff = torch.where(same, 0.0, (a64 - e64).abs()).nan_to_num(nan=float("inf"), posinf=float("inf"))
    idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return f"max abs difference {diff.max().item():.3g} (at index {idx})"


def _bitwise_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):  # a tensor replaced by a number (batch["w"] = 1.0)
        return False
    if not isinstance(a, torch.Tensor):
        if isinstance(a, (np.ndarray, np.generic)) or isinstance(b, (np.ndarray, np.generic)):  # numpy: as tensors
            try:
                return _bitwise_equal(torch.as_tensor(np.ascontiguousarray(a)), torch.as_tensor(np.ascontiguousarray(b)))
            except (TypeError, RuntimeError, ValueError):  # object arrays, strings
                return bool(np.array_equal(a, b))
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True  # a NaN metric is the same NaN twice
        return bool(a == b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():  # equal values, NaN where NaN, and the same sign (-0.0 is not 0.0 bitwise)
        return bool((((a == b) & (torch.signbit(a) == torch.signbit(b))) | (torch.isnan(a) & torch.isnan(b))).all())
    if a.is_complex():
        return _bitwise_equal(torch.view_as_real(a), torch.view_as_real(b))
    return torch.equal(a, b)


def _first_unequal(paths: list[str], xs: list[Any], ys: list[Any]) -> str | None:
    return next((p for p, x, y in zip(paths, xs, ys) if not _bitwise_equal(x, y)), None)


# ------------------------------------------------------------------------------ purity
def _snapshot(state: Any, batch: Any) -> tuple[list[str], list[Any]]:
    paths, leaves, _ = _labelled(state, "state")
    b_paths, b_leaves, _ = _labelled(batch, "batch")
    # numpy arrays too (a batch straight from a numpy pipeline): `batch -= batch.mean()` writes into them
    return paths + b_paths, [_copy_leaf(t) for t in leaves + b_leaves]


def _copy_leaf(t: Any) -> Any:
    """A tensor or numpy array copied (what later writes into it leaves the copy alone); any other leaf as it is."""
    return t.detach().clone() if isinstance(t, torch.Tensor) else t.copy() if isinstance(t, np.ndarray) else t


def _check_unchanged(paths: list[str], before: list[Any], state: Any, batch: Any, run: str) -> None:
    s_paths, s_leaves, _ = _labelled(state, "state")
    b_paths, b_leaves, _ = _labelled(batch, "batch")
    now_paths, now = s_paths + b_paths, s_leaves + b_leaves
    if now_paths != paths:  # a key added to or removed from an input dict (or list)
        changed = sorted(set(now_paths) ^ set(paths)) or now_paths
        raise AssertionError(
            f"the step changed the structure of its inputs ({run} call): {changed[0]} was "
            f"{'added' if changed[0] in now_paths and changed[0] not in paths else 'removed'}. A step must build "
            "new containers (dict(batch, key=value)), not add to or delete from the ones it is given."
        )
    where = _first_unequal(paths, now, before)
    if where is not None:
        raise AssertionError(
            f"the step mutated its input {where} ({run} call). A step must return new tensors, not write into the "
            "ones it is given: replace in-place ops (add_, mul_, x[...] = ..., out=) by their out-of-place forms."
        )


def _global_rng_states() -> tuple[torch.Tensor, Any, Any]:
    """The states of the CPU-side global generators: PyTorch's, Python's ``random``, NumPy's ``np.random``."""
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


class _GlobalGenerators:
    """Saves the global generators (PyTorch's CPU one, CUDA's once initialised, Python's ``random`` and NumPy's
    legacy ``np.random``) and moves them to another state."""

    def __init__(self) -> None:
        self.cpu, self.python, self.numpy = _global_rng_states()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        torch.default_generator.set_state(torch.Generator().manual_seed(0x5EED_0F_F00D).get_state())
        random.seed(0x5EED_0F_F00D)
        np.random.seed(0x5EED_F00D)
        if self.cuda is not None:
            for i in range(len(self.cuda)):
                torch.cuda.default_generators[i].manual_seed(0x5EED_0F_F00D + i)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _drawn_from(before: tuple[torch.Tensor, Any, Any]) -> list[str]:
    """The global generators whose state changed since ``before`` (:func:`_global_rng_states`)."""
    cpu, python, numpy = _global_rng_states()
    drawn = []
    if not torch.equal(cpu, before[0]):
        drawn.append("PyTorch's global random generator")
    if python != before[1]:
        drawn.append("Python's global random generator (the random module)")
    if not all(np.array_equal(a, b) for a, b in zip(numpy, before[2])):
        drawn.append("NumPy's global random generator (np.random)")
    return drawn


def _copied(tree: Any) -> Any:
    """``tree`` with its tensors (and numpy arrays) copied, so that what later writes into them leaves it alone."""
    leaves, treedef = _tree.tree_flatten(tree)
    return _tree.tree_unflatten(treedef, [_copy_leaf(t) for t in leaves])


def assert_pure(step: StepFn, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    """Asserts ``step`` is a pure function: no input mutated, no global RNG used, bitwise deterministic.

    Runs ``step(state, batch)`` twice. After each call every tensor of ``state`` and ``batch`` must be
    bitwise what it was; the global generators -- PyTorch's CPU one, Python's ``random``, NumPy's
    ``np.random`` -- must be untouched (random numbers come from ``state.rng`` through :func:`fnlit.apply`);
    and the two calls must return bitwise equal states and metrics (dropout included), the second one run
    with the global generators in another state (so a step that reads them, even without advancing them,
    is caught). The first call's outputs are copied before the second call, so a step returning a tensor it
    keeps and updates in place (a running average or a counter held in a closure) is caught too.

    Returns:
        The outputs of the first call (its tensors copied right after it, detached).

    Raises:
        AssertionError: naming the mutated input, the global generator drawn from, or the first output that
            differs between the calls.

    Example:
        >>> import torch, torch.nn.functional as F, fnlit
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
        >>> step = fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]))
        >>> state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-3), seed=0)
        >>> new_state, metrics = assert_pure(step, state, (torch.randn(8, 4), torch.randn(8, 4)))
    """
    paths, before = _snapshot(state, batch)
    rng_before = _global_rng_states()
    first = step(state, batch)
    if is_donated(state):
        raise AssertionError(
            "assert_pure got a donating step (fnlit.donating): it updates its input state in place by design, "
            "so it cannot be pure. Check the step without donating (assert_pure(step, ...) on the inner step)."
        )
    # The first call's outputs as they are now: a step may return a tensor it owns and updates in place (hidden
    # state in a closure, an EMA or a counter), which the second call would overwrite, so the two compare equal.
    first = _copied(first)
    _check_unchanged(paths, before, state, batch, "first")
    drawn = _drawn_from(rng_before)
    if drawn:
        raise AssertionError(
            f"the step changed {' and '.join(drawn)}: it draws random numbers that do not come from state.rng. "
            "Draw them with torch's random functions (not random or np.random) under fnlit.apply(..., "
            "rng=state.rng) or `with fnlit.random.seeded(key):`, so the same state gives the same step."
        )
    # The second call runs with the global generators in another state (restored afterwards): a step that
    # reads them without advancing them (under torch.random.fork_rng, or setstate after a draw) then comes out
    # different.
    saved = _GlobalGenerators()
    try:
        second = step(state, batch)
    finally:
        saved.restore()
    _check_unchanged(paths, before, state, batch, "second")
    out_paths, a, _ = _labelled(first, "output")
    if _tree.tree_structure(first) != _tree.tree_structure(second):
        raise AssertionError("the step returned differently structured outputs for the same inputs.")
    where = _first_unequal(out_paths, a, _tree.tree_leaves(second))
    if where is not None:
        raise AssertionError(
            f"the step is not deterministic: {where} differs between two calls on the same state and batch (the "
            "second ran with the global generators -- PyTorch's, Python's random, NumPy's -- in another state). "
            "Draw random numbers from state.rng (fnlit.apply(..., rng=state.rng)), not from a global generator "
            "(even under torch.random.fork_rng), keep no state between calls outside the TrainState (a tensor the "
            "step keeps in a closure and updates in place), and avoid nondeterministic kernels "
            "(torch.use_deterministic_algorithms(True) finds them)."
        )
    return first


def _values(metric: Any) -> list[float]:
    if isinstance(metric, torch.Tensor):
        return metric.detach().double().reshape(-1).tolist()
    return [float(metric)]


def _fmt(values: list[float]) -> str:
    return f"{values[0]:.4g}" if len(values) == 1 else "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def assert_overfits(
    step: StepFn, state: TrainState, batch: Batch, *, steps: int = 100, below: float, metric: str = "loss"
) -> TrainState:
    """Asserts that ``steps`` steps on one batch bring ``metrics[metric]`` below ``below``, and down.

    The metric must end below ``below`` and below its first value (each member's, for an ensemble): a step
    that learns nothing fails even where ``below`` is met from the start (a 3-class cross-entropy starts near
    1.1). A model that cannot fit a single batch has a bug (gradients not applied, a detached loss, a zero
    learning rate, labels misaligned with inputs); this is the cheapest test that catches them.

    Returns:
        The final state.

    Raises:
        AssertionError: with the first and last value of the metric.
        KeyError: if the step returns no metric called ``metric``.
        ValueError: if ``steps`` is below 2.

    Example:
        >>> import torch, torch.nn.functional as F, fnlit
        >>> _ = torch.manual_seed(0)  # the model's init and the batch
        >>> model = torch.nn.Linear(4, 1)
        >>> step = fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]))
        >>> state = fnlit.TrainState.create(model, fnlit.optim.adam(0.1), seed=0)
        >>> x = torch.randn(4, 4)
        >>> state = assert_overfits(step, state, (x, x.sum(1, keepdim=True)), steps=100, below=1e-2)
    """
    if steps < 2:
        raise ValueError(
            f"assert_overfits expected steps >= 2 (the metric must come down from the first step's value), got {steps} "
            "instead."
        )
    start = None
    for _ in range(steps):
        state, metrics = step(state, batch)
        if metric not in metrics:
            raise KeyError(f"assert_overfits: the step returned no metric {metric!r}; it returned {sorted(metrics)}. Pass metric=...")
        if start is None:  # read now: a step may write every step's metric into one buffer it keeps
            start = _values(metrics[metric])
    end = _values(metrics[metric])  # an ensemble's metric has one value per member: all must fit
    if not all(e < below for e in end):
        raise AssertionError(
            f"the step did not fit a single batch: {metric} went from {_fmt(start)} to {_fmt(end)} in {steps} steps, "
            f"expected below {below:g}. Check that the step applies its gradients (state.apply_gradients(grads)), "
            "that the loss depends on the params, and the learning rate; or allow more steps."
        )
    if not all(e < s for s, e in zip(start, end)):
        raise AssertionError(
            f"the step did not fit a single batch: {metric} did not decrease ({_fmt(start)} -> {_fmt(end)}) in {steps} "
            f"steps; it was below {below:g} from the start. Check that the step applies its gradients "
            "(state.apply_gradients(grads)), that the loss depends on the params, and the learning rate."
        )
    return state


# ------------------------------------------------------------------------------ host syncs
class HostSyncError(AssertionError):
    """A tensor's value was read on the host inside :func:`no_host_sync`.

    Example:
        >>> import torch
        >>> try:
        ...     with no_host_sync():
        ...         torch.ones(2).sum().item()
        ... except HostSyncError as e:
        ...     print(type(e).__name__, isinstance(e, AssertionError))  # an assertion: tests fail, not error
        HostSyncError True
    """


# fnlit's own reads of host memory, by design (see the module docstring): allowed on CPU tensors only. By file and
# function name, so that a module `import fnlit` leaves unloaded is not loaded to name its function: fnlit.shard's
# first call builds the mesh (default_mesh), and torch's DeviceMesh reads its CPU mesh tensor.
_ALLOWED = frozenset(
    (f.__code__.co_filename, f.__code__.co_name)
    for f in (
        _random._seed_eager,
        _random.split,
        _random.fold_in,
        _random._index,  # fold_in(key, state.step): the step counter lives on the CPU (not a batch's: _BATCH)
        _random._fold_in_range,
        _random.next_key,
        _alias._decay_factor,
        _alias._kernel_decay,
        _alias._kernel_lr,
        _privacy._noise,
        _fold_keys,
        _names_agree,  # data_parallel's metric-names check: a CPU collective's result
    )
) | {(os.path.join(os.path.dirname(__file__), "transforms", "shard.py"), "default_mesh")}
_SKIP = (os.path.dirname(torch.__file__) + os.sep, __file__)
# fold_in's read of its data (_random._index) is the user's tensor: flagged when it is (a view of) a tensor of the
# batch given to assert_no_host_sync / no_host_sync(batch=...), by storage address, or a tensor an op in the block
# computed from one (_DERIVED): those are on the device in training. Allowed for other CPU tensors (state.step and
# what is computed from it).
_INDEX = _random._index.__code__
_BATCH: ContextVar[frozenset[int]] = ContextVar("fnlit_batch_storages", default=frozenset())
# The tensors ops computed from the batch's tensors or from such tensors (_DispatchMode marks every output of an op
# with one among its inputs), while a batch is registered. Weak and keyed by the tensor object, not by storage
# address: a freed batch-derived tensor's address is reused by the next allocation (a state-derived counter).
_DERIVED: ContextVar[WeakTensorKeyDictionary | None] = ContextVar("fnlit_batch_derived", default=None)
_READS = frozenset(
    ["item", "tolist", "numpy", "__array__", "__bool__", "__int__", "__float__", "__index__", "__complex__",
     "__repr__", "__str__", "__format__"]
)
_SCALAR = torch.ops.aten._local_scalar_dense.default
_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
_aten = torch.ops.aten
# Ops whose result is a Python value computed from tensor values (a read, whatever the Python route).
_VALUE_OPS = {
    _aten.equal.default: "torch.equal",
    _aten.allclose.default: "torch.allclose",
    _aten.is_nonzero.default: "bool(tensor)",
    _aten._linalg_check_errors.default: (
        "torch.linalg's error check (inv, solve, cholesky, ...: the *_ex variants return the error code as a tensor)"
    ),
}
# Composite ops that read a 0-d tensor endpoint with .item() in C++ (ATen's linspace/logspace with a Tensor start or
# end): the mode sees only the op itself, not the read. The Scalar-only overloads (.default) read nothing. As for
# masked_fill's value, a CPU endpoint for an accelerator's output is a read of host memory, no sync.
_RANGE_TENSOR = {
    getattr(getattr(_aten, op), overload): (
        f"torch.{op} with a tensor endpoint (ATen reads it with .item(), a sync unless it is a CPU value for an "
        "accelerator's output); pass Python numbers, or build it from torch.arange(steps) scaled by the tensor"
    )
    for op in ("linspace", "logspace")
    for overload in ("Tensor_Tensor", "Tensor_Scalar", "Scalar_Tensor")
}
# Decompositions torch documents as "When inputs are on a CUDA device, this function synchronizes that device with
# the CPU" that do not reach _linalg_check_errors on the CPU, by the aten op every route reaches (torch.svd,
# matrix_norm(A, 2), cond and matrix_rank run _linalg_svd; pinverse runs linalg_pinv).
_LINALG_SYNCS = {
    name: f"{what} (torch documents that it synchronizes a CUDA device with the CPU)"
    for name, what in (
        ("_linalg_svd", "a singular value decomposition (torch.linalg.svd, svdvals, matrix_norm(A, 2), cond, matrix_rank)"),
        ("_linalg_eigh", "torch.linalg.eigh/eigvalsh"),
        ("linalg_eig", "torch.linalg.eig/eigvals"),
        ("linalg_pinv", "torch.linalg.pinv"),
    )
}
# Tensor constructors read the value of every tensor inside a (nested) list or tuple given as data.
_CONSTRUCTORS = {"tensor": 0, "as_tensor": 0, "asarray": 0, "new_tensor": 1, "new": 1}  # name -> the data argument
# Ops whose output shape depends on tensor values: the host waits for the device to learn the size.
_SHAPE_OPS = {
    _aten.nonzero.default: "nonzero (also torch.where(cond) with one argument)",
    _aten.masked_select.default: "masked_select",
    _aten._unique2.default: "torch.unique",
    _aten.unique_dim.default: "torch.unique",
    _aten.unique_consecutive.default: "torch.unique_consecutive",
    _aten.bincount.default: "torch.bincount (its length is the largest value + 1)",
}
# torch.histc with min == max (its default: the data's range) reads the data's min and max back to the host on CUDA
# (SummaryOps.cu, _histc_cuda_template: self.min().cpu()); with a range given there is no read.
_HISTC = (_aten.histc.default, _aten.histc.out)
_MASK_INDEXING = (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default)
# masked_fill with a 0-d tensor value: CUDA's masked_fill_ runs masked_fill__cuda(self, mask, value.item()), a sync
# when the value is on the device (a CPU value for a CUDA self is a host read: no sync; PyTorch PR #190512, open,
# would remove it).
_MASKED_FILL_TENSOR = (_aten.masked_fill.Tensor, _aten.masked_fill_.Tensor)
# index_fill with a 0-d tensor value: ATen's index_fill_(self, dim, index, source) runs index_fill_(..., source.item())
# on every device, a sync when the value is on the device (not for a CPU value and an accelerator's self, as above).
_INDEX_FILL_TENSOR = (_aten.index_fill.int_Tensor, _aten.index_fill_.int_Tensor)


# ctc_loss with tensor lengths (and CUDA's cuDNN check and kernel): ATen copies the lengths to the host
_CTC_TENSOR = (_aten._ctc_loss.Tensor, _aten._use_cudnn_ctc_loss.Tensor, _aten._cudnn_ctc_loss.Tensor)


def _device_lengths(t: Any, log_probs: torch.Tensor) -> bool:
    """ctc_loss's lengths ``t`` are on an accelerator, or (a test on the CPU) are the batch's or computed from it."""
    return isinstance(t, torch.Tensor) and (t.device.type != "cpu" or (log_probs.device.type == "cpu" and _of_batch(t)))


def _number_arg(args: tuple, kwargs: dict, i: int, name: str) -> Any:
    """An op's ``i``-th argument, called ``name``, defaulting to 0: the dispatcher leaves out defaulted ones."""
    return args[i] if len(args) > i else kwargs.get(name, 0)


def _is_mask(i: Any) -> bool:
    return isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)


def _masked_fill_put(args: tuple, kwargs: dict) -> bool:
    """Whether index_put_(self, indices, value, accumulate) is one ATen runs as self.masked_fill_(mask, value.item())
    (canDispatchToMaskedFill): accumulate=False, a one-element value, and one bool/uint8 index on self's device, the
    others None."""
    self, indices, value = args[:3]
    accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
    given = [i for i in indices if i is not None]
    return (not accumulate and value.numel() == 1 and len(given) == 1 and _is_mask(given[0])
            and given[0].device == self.device)


# fnlit's own dispatch mode (apply's first forward watching which buffers ops write) passes every op through:
# the read is its caller's.
_PASS_THROUGH = frozenset((inspect.unwrap(_functional._WriteRecorder.__torch_dispatch__).__code__,))  # (torch wraps it)


def _caller() -> types.FrameType | None:
    """The innermost frame outside torch and this module: where the read was written."""
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename.startswith(_SKIP) or f.f_code in _PASS_THROUGH):
        f = f.f_back
    return f


def _integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _of_batch(t: torch.Tensor) -> bool:
    """Whether ``t`` is (a view of) a tensor of the block's batch, or was computed from one in the block."""
    derived = _DERIVED.get()
    return derived is not None and (t in derived or _storage.address(t) in _BATCH.get())


def _reads_batch(args: Any, derived: WeakTensorKeyDictionary, batch: frozenset[int]) -> bool:
    """Whether a tensor among ``args`` (nested in lists and tuples: torch.cat's) is the batch's or computed from it."""
    for a in args:
        if isinstance(a, torch.Tensor):
            if a in derived or _storage.address(a) in batch:
                return True
        elif isinstance(a, (list, tuple)) and _reads_batch(a, derived, batch):
            return True
    return False


def _mark(out: Any, derived: WeakTensorKeyDictionary) -> None:
    if isinstance(out, torch.Tensor):
        derived[out] = True
    elif isinstance(out, (list, tuple)):
        for o in out:
            _mark(o, derived)


def _flag(what: str, t: torch.Tensor | None) -> None:
    f = _caller()
    if t is not None and t.device.type == "cpu" and f is not None and (
        (f.f_code.co_filename, f.f_code.co_name) in _ALLOWED
    ):
        if f.f_code is not _INDEX or not _integer(t) or not _of_batch(t):
            return  # (fold_in refuses a float or bool tensor, with its TypeError: no value is read)
        while f.f_back is not None and f.f_code.co_filename == _random.__file__:  # the line calling fold_in
            f = f.f_back
        where = f"{f.f_code.co_filename}:{f.f_lineno} (in {f.f_code.co_name})"
        raise HostSyncError(
            f"host sync inside the step: fnlit.random.fold_in(key, data) read data, a tensor of the batch or computed "
            f"from one, at {where}. On the host it turns into an int: the batch, and what is computed from it, is on "
            "the device in training, and this stalls it every step. Fold in a Python int (kept out of the tensors "
            "moved to the device), or state.step (a CPU tensor)."
        )
    where = f"{f.f_code.co_filename}:{f.f_lineno} (in {f.f_code.co_name})" if f is not None else "an unknown place"
    raise HostSyncError(
        f"host sync inside the step: {what} at {where}. Reading a tensor's value on the host stalls the device "
        "every step and breaks graph capture. Return the tensor in the metrics instead (the driver reads them at "
        "log intervals), and replace Python branches on tensors by torch.where."
    )


# Inside x[mask] = v with v a Python number: THPVariable_setitem makes v a CPU 0-d tensor for a CUDA x, and
# index_put_ (accumulate=False, the mask x's only tensor index, on x's device) lowers that to x.masked_fill_(mask,
# v.item()) on the host scalar (ATen's canDispatchToMaskedFill): no nonzero, no sync (PyTorch issue #57515).
_NUMBER_SETITEM: ContextVar[bool] = ContextVar("fnlit_number_setitem", default=False)

# Inside F.one_hot(cpu_tensor, num_classes=K): its bounds check reads a scalar on the CPU only (ATen skips it on
# CUDA, relying on the scatter's device assert), so it stalls no accelerator and is not flagged.
_CPU_ONE_HOT: ContextVar[bool] = ContextVar("fnlit_cpu_one_hot", default=False)


def _tensor_in(data: Any) -> torch.Tensor | None:
    """The first tensor inside ``data`` when it is a (nested) list or tuple, else None."""
    if isinstance(data, (list, tuple)):
        for x in data:
            found = x if isinstance(x, torch.Tensor) else _tensor_in(x)
            if found is not None:
                return found
    return None


class _FunctionMode(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        kwargs = kwargs or {}
        if name in _READS and args and isinstance(args[0], torch.Tensor):
            _flag(f"Tensor.{name}()" if not name.startswith("__") else f"{name.strip('_')}(tensor)", args[0])
        if name == "cpu" and args and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu" and _of_batch(args[0]):
            # (returns the tensor itself on the CPU, so no copy op to see; in training the batch is on the device)
            _flag("Tensor.cpu() of a tensor of the batch or computed from one (on the device in training: a copy to "
                  "the host every step)", None)
        if func is torch.linalg.cond:  # documented as syncing for every p; with 'fro' its ops reach no op above
            _flag("torch.linalg.cond (torch documents that it synchronizes a CUDA device with the CPU)", None)
        if name in _CONSTRUCTORS:
            i = _CONSTRUCTORS[name]
            inner = _tensor_in(args[i] if len(args) > i else kwargs.get("data", kwargs.get("obj")))
            if inner is not None:
                what = f"Tensor.{name}" if name in ("new_tensor", "new") else f"torch.{name}"
                _flag(f"{what} of a list holding tensors (use torch.stack)", inner)
        if name == "__setitem__" and len(args) == 3 and isinstance(args[2], numbers.Number):  # x[...] = 0.0
            token = _NUMBER_SETITEM.set(True)
            try:
                return func(*args, **kwargs)
            finally:
                _NUMBER_SETITEM.reset(token)
        if name == "one_hot" and args and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu":
            classes = args[1] if len(args) > 1 else kwargs.get("num_classes", -1)
            if classes > 0:  # (num_classes=-1 reads the maximum: a sync on any device, flagged)
                token = _CPU_ONE_HOT.set(True)
                try:
                    return func(*args, **kwargs)
                finally:
                    _CPU_ONE_HOT.reset(token)
        return func(*args, **kwargs)


class _DispatchMode(TorchDispatchMode):
    """Catches what reaches the dispatcher by other routes (C++ conversions, device-to-host copies)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _SCALAR:
            if not _CPU_ONE_HOT.get():
                _flag("a scalar read (aten._local_scalar_dense)", args[0])
        elif func in _VALUE_OPS:
            _flag(_VALUE_OPS[func], None)
        elif func in _RANGE_TENSOR:
            ends = [a for a in args[:2] if isinstance(a, torch.Tensor)]
            out = torch.device(kwargs.get("device") or "cpu")
            if out.type == "cpu" or any(t.device.type != "cpu" for t in ends):
                _flag(_RANGE_TENSOR[func], None)
        elif func.__name__.split(".")[0] in _LINALG_SYNCS:
            _flag(_LINALG_SYNCS[func.__name__.split(".")[0]], None)
        elif func in _SHAPE_OPS:  # (the input: fnlit's own of a CPU tensor is allowed, as fnlit.shard's mesh's nonzero)
            _flag(f"{_SHAPE_OPS[func]}, whose output shape depends on the values", args[0])
        elif func in _HISTC and args[0].numel() and (
            _number_arg(args, kwargs, 2, "min") == _number_arg(args, kwargs, 3, "max")
        ):
            _flag("torch.histc without a range (min == max: the data's minimum and maximum are read on the host to "
                  "find it); pass min= and max=", None)
        elif func in _CTC_TENSOR and any(_device_lengths(t, args[0]) for t in args[2:4]):
            _flag("ctc_loss with lengths of the batch or computed from it, or on the device (ATen copies the lengths "
                  "to the host: on the device in training, a sync every step); pass them as Python lists or CPU "
                  "tensors", None)
        elif func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            _flag("repeat_interleave with tensor repeats and no output_size", None)
        elif func in _MASK_INDEXING and any(_is_mask(i) for i in args[1]):
            if func is _MASK_INDEXING[0]:
                _flag("indexing with a boolean mask (x[mask]); use torch.where(mask, x, other), or "
                      "x.masked_fill(mask, v) with v a Python number", None)
            elif not (_NUMBER_SETITEM.get() and _masked_fill_put(args, kwargs)):
                _flag("assigning through a boolean mask (x[mask] = value) with a tensor value or with other tensor "
                      "indices; use torch.where(mask, value, x), or x[mask] = v with v a Python number and the mask "
                      "the only tensor index", None)
        elif func in _MASKED_FILL_TENSOR and (args[2].device == args[0].device or args[2].device.type != "cpu"):
            _flag("masked_fill with a tensor value (x.masked_fill(mask, x.max())): masked_fill_ reads it with "
                  ".item(), a sync unless it is a CPU value for an accelerator's tensor; use "
                  "torch.where(mask, value, x), or masked_fill with a Python number", None)
        elif func in _INDEX_FILL_TENSOR and (args[3].device == args[0].device or args[3].device.type != "cpu"):
            _flag("index_fill with a tensor value (x.index_fill(0, idx, x.max())): ATen reads it with .item(), a sync "
                  "unless it is a CPU value for an accelerator's tensor; use index_fill with a Python number, or "
                  "x.index_copy(dim, index, value expanded to the indexed slices' shape)", None)
        elif func in _COPIES:
            src, dst = (args[0], kwargs.get("device")) if func is _COPIES[0] else (args[1], args[0].device)
            if dst is not None and torch.device(dst).type == "cpu" and src.device.type != "cpu":
                _flag(f"a copy from {src.device} to the host", None)
        out = func(*args, **kwargs)
        derived = _DERIVED.get()
        if derived is not None:  # a batch is registered: what is computed from it is on the device in training too
            batch = _BATCH.get()
            if _reads_batch(args, derived, batch) or _reads_batch(kwargs.values(), derived, batch):
                _mark(out, derived)
        return out


class no_host_sync:
    """Inside the block, reading a tensor's value on the host raises :class:`HostSyncError`.

    Catches ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)`` (``if loss > 0:``), ``.tolist()``,
    ``.numpy()``, ``torch.equal``/``torch.allclose``, printing or formatting a tensor, copies from an
    accelerator to the host (``.cpu()``; with ``batch`` given, ``.cpu()`` of a tensor of the batch or computed from one
    even on the CPU), ops whose output shape depends on tensor values (boolean-mask
    indexing ``x[mask]``, ``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave`` without
    ``output_size``), ``torch.histc`` without a range (``min == max``: CUDA reads the data's extremes),
    ``F.ctc_loss`` with lengths of ``batch`` (or computed from it) or on an accelerator (ATen copies them to the
    host), assigning a tensor through a boolean mask (``x[mask] = t``; ``x[mask] = 0.0`` with a Python number and
    the mask the only tensor index is a ``masked_fill`` and passes; so would a one-element CPU ``t`` for a CUDA
    ``x``, which a test on the CPU cannot tell apart, and flags), ``masked_fill`` and
    ``index_fill`` with a tensor value on the tensor's own device (``x.masked_fill(mask, x.max())``: ATen reads
    the value with ``.item()``; in a test on the CPU, ``torch.tensor(-inf)`` is on it too), and
    ``torch.linspace``/``torch.logspace`` with a tensor endpoint (also read with ``.item()``; passes for CPU endpoints
    of an accelerator's output, as ``masked_fill``'s CPU value) -- so a test on the CPU catches what would stall a GPU. fnlit's own reads of CPU keys
    and CPU hyperparameters are allowed (see the module docstring), and :func:`fnlit.random.fold_in`'s read
    of a CPU counter (``state.step``, a CPU tensor by design, and what is computed from it); a tensor of ``batch``,
    a view of one, or a tensor computed from them inside the block (``batch["i"][0].long()``, ``batch["i"].sum()``,
    ``batch["i"][0] + 1``) folded in is flagged. Ops run a little slower inside (a little more with a ``batch``:
    each op's outputs computed from it are recorded).

    Not caught on the CPU: ``.to("cpu")`` (or ``torch.as_tensor(t, device="cpu")``, ``pack_padded_sequence`` with
    the batch's lengths): there, moving to ``"cpu"`` cannot be told apart from the common ``x.to(device)`` to the
    training device, so write a copy to the host as ``.cpu()``, which is.

    Args:
        batch: the batch the block's step is given (optional): its tensors, and what is computed from them,
            folded in are flagged, as on the device in training (:func:`assert_no_host_sync` passes it).

    Example:
        >>> import torch
        >>> with no_host_sync():
        ...     loss = torch.ones(3).sum() * 2  # fine: stays a tensor
        >>> with no_host_sync():
        ...     value = loss.item()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        fnlit.testing.HostSyncError: host sync inside the step: Tensor.item() at ...
    """

    def __init__(self, batch: Any = None) -> None:
        self._modes = (_FunctionMode(), _DispatchMode())
        leaves = torch_pytree.tree_leaves(batch)
        self._batch = frozenset(_storage.address(t) for t in leaves if isinstance(t, torch.Tensor)) - {0}
        self._tokens: list[Any] = []

    def __enter__(self) -> no_host_sync:  # noqa: PYI034
        batch = _BATCH.get() | self._batch
        # an outer block's record goes on (its batch is still registered); a fresh one lives as long as the block
        derived = _DERIVED.get()
        if derived is None and batch:
            derived = WeakTensorKeyDictionary()
        self._tokens.append((_BATCH.set(batch), _DERIVED.set(derived)))
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
        batch, derived = self._tokens.pop()
        _DERIVED.reset(derived)
        _BATCH.reset(batch)


def assert_no_host_sync(step: StepFn | Callable[..., Any], state: Any, batch: Batch) -> Any:
    """Runs ``step(state, batch)`` under ``no_host_sync(batch)`` and returns its outputs.

    A compiled step (:func:`fnlit.compile`, ``ensemble(..., compile=True)``) is run uncompiled here: its
    capture reports host syncs itself (:class:`fnlit.compile`'s ``CaptureError`` names the line).

    Raises:
        HostSyncError: (an AssertionError) naming the read and the line that did it.

    Example:
        >>> import torch, torch.nn.functional as F, fnlit
        >>> model = torch.nn.Linear(4, 1)
        >>> step = fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]))
        >>> state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-3), seed=0)
        >>> state, metrics = assert_no_host_sync(step, state, (torch.randn(8, 4), torch.randn(8, 1)))
    """
    step = _uncompiled(step)
    with no_host_sync(batch):
        return step(state, batch)


def _uncompiled(step: Any) -> Any:
    """A compiled step's uncompiled step: torch.compile refuses to trace under the checking dispatch mode, and
    fnlit.compile reports a host sync itself (CaptureError, naming the line)."""
    from .transforms.compile import CompiledStep

    if isinstance(step, CompiledStep):
        return step.step
    if isinstance(step, EnsembleStep) and step.compiled:
        return EnsembleStep(step.step, step.n, step.in_dims, step.randomness, compile=False)
    return step
