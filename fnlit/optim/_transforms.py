"""Building blocks, one small GradientTransformation each, with optax's names and semantics.

They are written leaf by leaf in plain torch ops (no in-place writes, no host syncs), so they work
eagerly, under ``torch.compile`` and under ``torch.func.vmap``. Hyperparameters that users sweep or
schedule (learning rate, weight decay) are 0-d tensors in the state, on the params' device: float32, or float64
where a param is float64 or the value was given as a float64 tensor (see :func:`hyper_dtype`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from ..tree import is_real, tree_flatten, tree_leaves, tree_map, tree_paths, tree_unflatten
from ._base import (
    EmptyState, GradientTransformation, Mask, MaskCache, PyTree, _raise_mismatch, flatten_checked, grad_in_dtype, raise_wrong_state,
    resolve_mask, use_functional,
)

__all__ = [
    "ScaleByAdamState",
    "ScaleByLearningRateState",
    "ScaleByScheduleState",
    "TraceState",
    "AddDecayedWeightsState",
    "MaskedState",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "scale_by_adam",
    "trace",
    "add_decayed_weights",
    "clip_by_global_norm",
    "masked",
    "set_to_zero",
]

ScalarOrSchedule = float | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
_LEARNING_RATE, _WEIGHT_DECAY = frozenset({"learning_rate"}), frozenset({"weight_decay"})  # each state's hyperparams keys


class ScaleByAdamState(NamedTuple):
    """The state of :func:`scale_by_adam`: update count and the first and second moments.

    Example:
        >>> import torch
        >>> scale_by_adam().init({"w": torch.zeros(2)})
        ScaleByAdamState(count=tensor(0), mu={'w': tensor([0., 0.])}, nu={'w': tensor([0., 0.])})
    """

    count: torch.Tensor  # 0-d int64: updates taken so far
    mu: PyTree
    nu: PyTree


class ScaleByLearningRateState(NamedTuple):
    """The state of :func:`scale_by_learning_rate`: update count and the learning rate (a 0-d tensor).

    Example:
        >>> import torch
        >>> scale_by_learning_rate(0.1).init({"w": torch.zeros(2)})
        ScaleByLearningRateState(count=tensor(0), hyperparams={'learning_rate': tensor(0.1000)})
    """

    count: torch.Tensor
    hyperparams: dict[str, torch.Tensor]


class ScaleByScheduleState(NamedTuple):
    """The state of :func:`scale_by_schedule`: the update count the schedule is evaluated at.

    Example:
        >>> import torch
        >>> from fnlit.optim import constant
        >>> scale_by_schedule(constant(0.1)).init({"w": torch.zeros(2)})
        ScaleByScheduleState(count=tensor(0))
    """

    count: torch.Tensor


class TraceState(NamedTuple):
    """The state of :func:`trace`: the momentum buffer, one tensor per parameter.

    Example:
        >>> import torch
        >>> trace(0.9).init({"w": torch.zeros(2)})
        TraceState(trace={'w': tensor([0., 0.])})
    """

    trace: PyTree


class AddDecayedWeightsState(NamedTuple):
    """The state of :func:`add_decayed_weights`: the weight decay (a 0-d tensor).

    Example:
        >>> import torch
        >>> add_decayed_weights(1e-4).init({"w": torch.zeros(2)})
        AddDecayedWeightsState(hyperparams={'weight_decay': tensor(1.0000e-04)})
    """

    hyperparams: dict[str, torch.Tensor]


class MaskedState(NamedTuple):
    """The state of :func:`masked`: the inner transformation's state over the selected leaves (keyed by name).

    Example:
        >>> import torch
        >>> masked(trace(0.9), {"w": True, "b": False}).init({"w": torch.zeros(2), "b": torch.zeros(1)})
        MaskedState(inner_state=TraceState(trace={'w': tensor([0., 0.])}))
    """

    inner_state: Any


# ------------------------------------------------------------------------------ argument checks
def check_arg(name: str, arg: str, value: Any, ok: bool, expected: str, fix: str = "") -> None:
    """Raises ValueError("<name> expected <arg> <expected>, got <value> instead. <fix>")."""
    if not ok:
        raise ValueError(f"{name} expected {arg} {expected}, got {value!r} instead.{' ' + fix if fix else ''}")


def check_type(name: str, arg: str, value: Any, ok: bool, expected: str, fix: str = "") -> None:
    """Raises TypeError("<name> expected <arg> to be <expected>, got <value> (<type>) instead. <fix>")."""
    if not ok:
        raise TypeError(
            f"{name} expected {arg} to be {expected}, got {value!r} ({type(value).__name__}) instead."
            f"{' ' + fix if fix else ''}"
        )


def check_number(
    name: str, arg: str, value: Any, *, tensor: bool = True, positive: bool = False, finite: bool = True,
    expected: str = "", fix: str = "",
) -> None:
    """Checks a hyperparameter is a real number (with ``tensor``, the default, or a 0-d tensor) >= 0 (> 0 with
    ``positive``), and finite unless ``finite=False`` (clip_by_global_norm's inf: no clipping).

    One finite here may still overflow the float32 it is held in: :func:`scalar` checks that where the dtype is known
    (``init``). A tensor's value is read once, here, when the optimizer is built (never in a step: no host sync
    there); not while traced (torch.compile, vmap), where there is no value to read.
    """
    bound = "> 0" if positive else ">= 0"
    expected = expected or (f"a float {bound} or a 0-d tensor" if tensor else f"a float {bound}")
    if tensor and isinstance(value, torch.Tensor):
        real = value.dtype is not torch.bool and not value.dtype.is_complex
        check_type(name, arg, value, value.ndim == 0 and real, expected, fix or "One value for all parameters.")
        if use_functional() or value.is_meta:
            return
        number = float(value)
    else:
        check_type(name, arg, value, is_real(value), expected, fix)
        number = value
    check_arg(name, arg, value, number > 0 if positive else number >= 0, bound, fix)  # NaN fails both
    if finite:  # an infinite rate or decay stepped the params to inf or nan
        check_arg(name, arg, value, number != math.inf, "finite", fix)


def check_flag(name: str, arg: str, value: Any) -> bool:
    """Checks a switch is a bool (Python's or NumPy's) and returns it as Python's: the fused kernels take no other."""
    check_type(name, arg, value, isinstance(value, (bool, np.bool_)), "a bool", f"Pass {arg}=True or {arg}=False.")
    return bool(value)


def check_rate(name: str, value: Any) -> None:
    """Checks a learning rate: a float or 0-d tensor >= 0, or a schedule (checked by :func:`check_schedule_value`)."""
    if not callable(value):
        check_number(name, "learning_rate", value, tensor=True,
                     expected="a float >= 0, a 0-d tensor or a schedule (a function of the step count)",
                     fix="The optimizer subtracts lr * direction; use a positive rate such as 1e-3.")


def check_schedule_value(name: str, value: Any) -> torch.Tensor:
    """Returns a schedule's value, checked once at ``init``: a 0-d tensor, which every step reads as one."""
    if not isinstance(value, torch.Tensor) or value.ndim != 0:
        if isinstance(value, torch.Tensor):
            got = f"a tensor of shape {tuple(value.shape)}"
        else:
            got = f"{value!r} ({type(value).__name__})"
        raise TypeError(
            f"{name} expected its learning_rate schedule to return a 0-d tensor, got {got} instead. Write it "
            "in torch ops of the count (a 0-d int64 tensor): lambda count: 0.1 * 0.5 ** (count // 1000), "
            "or use fnlit.optim.constant(0.1) for a constant."
        )
    return value


def check_beta(name: str, arg: str, value: Any) -> None:
    fix = "Betas are decay rates, e.g. 0.9 and 0.999."
    if isinstance(value, (tuple, list)):
        fix = "Pass each beta as its own argument: b1=0.9, b2=0.999 (torch.optim's betas=(b1, b2))."
    if isinstance(value, torch.Tensor):  # a 0-d tensor, read once here (not while traced: no value to read)
        real = value.dtype is not torch.bool and not value.dtype.is_complex
        check_type(name, arg, value, value.ndim == 0 and real, "a float in [0, 1) or a 0-d tensor", fix)
        if use_functional() or value.is_meta:
            return
        number = float(value)
    else:
        check_type(name, arg, value, is_real(value), "a float in [0, 1) or a 0-d tensor", fix)
        number = value
    check_arg(name, arg, value, 0.0 <= number < 1.0, "in [0, 1)", fix)


def check_mask(name: str, mask: Any) -> None:
    """Checks ``mask`` is None, a callable, or a pytree of bools (its structure is checked against the params later)."""
    if mask is None or callable(mask):
        return
    ok = all(
        isinstance(m, (bool, np.bool_))
        or (isinstance(m, numbers.Integral) and m in (0, 1))  # 0/1 (numpy) ints, as bool() reads them
        or (isinstance(m, torch.Tensor) and m.ndim == 0 and (m.dtype is torch.bool or (
            not m.dtype.is_floating_point and not m.dtype.is_complex and int(m) in (0, 1))))
        for m in tree_leaves(mask)
    )
    check_type(
        name, "mask", mask, ok,
        "a pytree of bools shaped like the params, a function params -> pytree of bools (e.g. "
        "fnlit.optim.decay_mask) or a function name -> bool",
        "E.g. mask=lambda name: not name.endswith('bias').",
    )


def device_of(params: PyTree) -> torch.device:
    leaves = [t for t in tree_leaves(params) if isinstance(t, torch.Tensor)]
    return leaves[0].device if leaves else torch.device("cpu")


def hyper_dtype(params: Any, given: Any = None) -> torch.dtype:
    """The dtype a hyperparameter is held in: float64 where a param is float64 (or complex128, whose parts are) or
    the value ``given`` to the constructor is a float64 tensor, float32 otherwise.

    float64 training thus steps with the float64 rates torch.optim's Python floats are (a float32 rate moved the
    params ~5e-8 relative from torch.optim's); float32 and narrower params beside float64 ones compute with the
    rate rounded, as they did. One rule at ``init`` and for a number assigned mid-run, so a state keeps its dtypes.
    """
    if isinstance(given, torch.Tensor) and given.dtype is torch.float64:
        return torch.float64
    wide = any(
        isinstance(t, torch.Tensor) and (t.dtype is torch.float64 or t.dtype is torch.complex128) for t in tree_leaves(params)
    )
    return torch.float64 if wide else torch.float32


def held_dtype(held: Any, params: Any) -> torch.dtype:
    """The dtype of a scheduled hyperparameter: that of the tensor the state holds (init's :func:`hyper_dtype`, read
    without a pass over the params on every update), or ``hyper_dtype(params)`` for a number assigned there."""
    return held.dtype if isinstance(held, torch.Tensor) else hyper_dtype(params)


def scalar(
    value: float | torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32, what: str = "a hyperparameter",
) -> torch.Tensor:
    """A 0-d tensor of ``dtype`` (see :func:`hyper_dtype`) on ``device``: how swept hyperparameters are stored.

    A number beyond ``dtype``'s range is refused (``what`` names it): held, ``sgd(1e39)``'s float32 rate was inf,
    and the params inf or nan after a step (torch.optim raises: "value cannot be converted to type float without
    overflow"). A float64-held one (a float64 model's) has float64's range. A tensor is taken as it is, unread.
    """
    if not isinstance(value, torch.Tensor):
        if not abs(value) <= torch.finfo(dtype).max:  # (an int: compared exactly)
            raise ValueError(
                f"{what} {value!r}, which does not fit in {str(dtype).removeprefix('torch.')}, the dtype it is held "
                f"in (at most {torch.finfo(dtype).max:.4g}): it would be inf, and the params inf or nan after a step. "
                "Use a finite value in range (hyperparameters are float32; float64 for a float64 model or a float64 "
                "tensor value)."
            )
        value = float(value)  # (a NumPy number: np.float32(5e-4) as the float it is)
    return torch.as_tensor(value, dtype=dtype, device=device).detach().clone()


def hyper_value(name: str, key: str, value: Any, device: torch.device, params: Any = (), given: Any = None) -> torch.Tensor:
    """A hyperparameter as the kernels take it: a 0-d tensor as it is, a number assigned to ``state.hyperparams``
    (optax's idiom) as a 0-d tensor of ``hyper_dtype(params, given)`` (the dtype ``init`` gave it); a negative or
    NaN number, one beyond that dtype's range (:func:`scalar`), or anything else (a tensor of another shape would be broadcast into the params, changing their
    shapes) is refused. A tensor's value is not read (no sync)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:  # (a shape read: no sync, traceable)
            return value
        got = f"a tensor of shape {tuple(value.shape)}"
    elif is_real(value):  # a Python or NumPy number (np.float32(5e-4)), as the constructors take
        # checked as the constructors check it (a Python number: no tensor is read, no sync); NaN fails the comparison
        check_arg(f"{name}.update", f"state.hyperparams[{key!r}]", value, value >= 0, ">= 0",
                  "A negative learning rate or weight decay moves the params up the gradient.")
        return scalar(value, device, hyper_dtype(params, given), f"{name}.update got state.hyperparams[{key!r}] =")
    else:
        got = f"{type(value).__name__} {value!r}"
    raise TypeError(
        f"{name}.update expected state.hyperparams[{key!r}] to be a 0-d tensor (or a number), got {got} instead. "
        "Assign e.g. torch.tensor(1e-3)."
    )


def check_hyper_keys(name: str, hyper: dict[str, Any], keys: frozenset[str]) -> None:
    """Refuses a ``state.hyperparams`` whose keys are not ``keys``, the ones ``name``'s update reads.

    A key it does not read (torch.optim's ``"lr"``, or optax's ``"b1"``: its inject_hyperparams passes every key
    back to the constructor) was carried on to every later state and changed nothing. One comparison of the keys
    (no tensor read, no sync; a constant when traced).
    """
    if hyper.keys() == keys:
        return
    tunable = " and ".join(repr(k) for k in sorted(keys))
    unknown, missing = sorted(set(hyper) - keys), sorted(keys - set(hyper))
    got = (
        f"state.hyperparams[{unknown[0]!r}], which it does not read" if len(unknown) == 1
        else f"state.hyperparams keys {unknown}, which it does not read" if unknown
        else f"state.hyperparams without {' and '.join(repr(k) for k in missing)}"
    )
    hint = " (torch.optim's 'lr' is 'learning_rate' here)" if "lr" in unknown else ""
    raise ValueError(
        f"{name}.update got {got}{hint}: its tunable hyperparameter{'s are' if len(keys) > 1 else ' is'} {tunable}. The others (betas, momentum, "
        "eps, ...) are fixed when the optimizer is built: build a new one with the values wanted."
    )


def zero_count(device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=device)


def _rate(h: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A 0-d hyperparameter as ``q``'s leaves are multiplied by it: float64 for float64 (or complex128) leaves, rounded
    to float32 for the rest (:func:`hyper_dtype`'s rule).

    With ``q`` of more than 0 dims the multiply takes ``q``'s dtype whatever ``h``'s is; a 0-d ``q`` (a scalar
    parameter) is promoted by a 0-d ``h`` like any tensor (a float32 rate made a bfloat16 parameter float32, a float64
    one a float32 parameter float64), so each result there is also cast back to its leaf's dtype: computed in float32
    (bfloat16's op math) and rounded once, as torch.optim's ``add_(..., alpha=...)`` is.
    """
    wide = q.dtype is torch.float64 or q.dtype is torch.complex128
    return h.float() if h.dtype is torch.float64 and not wide else h


def _scale_tree(updates: PyTree, h: float | torch.Tensor) -> PyTree:
    """Each update times ``h`` (a number or a 0-d tensor), in the update's dtype: a 0-d update times a 0-d tensor
    would take the wider dtype, so it gets ``h`` rounded as an update of more dims sees it (see :func:`_rate`)."""
    if not isinstance(h, torch.Tensor):
        return tree_map(lambda u: u * h, updates)
    return tree_map(lambda u: u * h if u.ndim else (u * _rate(h, u)).to(u.dtype), updates)


# ------------------------------------------------------------------------------ transforms
def scale(step_size: float) -> GradientTransformation:
    """Multiplies the updates by a constant ``step_size`` (a number, e.g. ``-lr``, or a 0-d tensor).

    Raises:
        TypeError: if ``step_size`` is neither a real number nor a 0-d real tensor (a tensor of another shape would
            be broadcast into the updates, changing their shapes).

    Example:
        >>> import torch
        >>> scale(-0.5).update({"w": torch.ones(2)}, EmptyState())[0]
        {'w': tensor([-0.5000, -0.5000])}
    """

    ok = is_real(step_size) or (
        isinstance(step_size, torch.Tensor) and step_size.ndim == 0 and step_size.dtype is not torch.bool
        and not step_size.dtype.is_complex
    )
    check_type("scale", "step_size", step_size, ok, "a number or a 0-d tensor", "E.g. scale(-1e-3).")

    def update(updates: PyTree, state: EmptyState, params: PyTree = None) -> tuple[PyTree, EmptyState]:
        return _scale_tree(updates, step_size), state

    return GradientTransformation(lambda params: EmptyState(), update)


def scale_by_learning_rate(learning_rate: ScalarOrSchedule, *, flip_sign: bool = True) -> GradientTransformation:
    """Multiplies the updates by ``-learning_rate`` (a float or a schedule of the update count).

    A float rate is stored as a tensor in ``state.hyperparams["learning_rate"]`` and can be changed
    there by assigning a new tensor or number (each update copies the dict, so that changes the state and the ones
    after it, never an earlier one; an in-place edit of the tensor itself would reach every state holding
    it); for a schedule, that field holds the rate of the most recent update, and the schedule wins: a rate
    assigned there is overwritten at the next update, unused (for a plateau-style drop use a float rate and assign
    it, or :func:`join` schedules).

    Raises:
        TypeError: if ``learning_rate`` is not a float, a 0-d tensor or a schedule, or ``flip_sign`` not a bool; at
            ``init`` if the schedule does not return a 0-d tensor.
        ValueError: if ``learning_rate`` is negative or infinite; at ``init`` if it is beyond float32's range
            (float64's for float64 params), which it is held in; at update time for a ``state.hyperparams`` key other
            than ``"learning_rate"``.

    Example:
        >>> import torch
        >>> tx = scale_by_learning_rate(0.1)
        >>> params = {"w": torch.ones(2)}
        >>> tx.update({"w": torch.ones(2)}, tx.init(params))[0]
        {'w': tensor([-0.1000, -0.1000])}
    """
    check_rate("scale_by_learning_rate", learning_rate)
    sign = -1.0 if check_flag("scale_by_learning_rate", "flip_sign", flip_sign) else 1.0

    def init(params: PyTree) -> ScaleByLearningRateState:
        count = zero_count(device_of(params))
        if callable(learning_rate):
            lr = check_schedule_value("scale_by_learning_rate", learning_rate(count))
        else:
            lr = learning_rate
        dtype = hyper_dtype(params, learning_rate)
        return ScaleByLearningRateState(
            count, {"learning_rate": scalar(lr, count.device, dtype, "scale_by_learning_rate.init got learning_rate")}
        )

    def update(
        updates: PyTree, state: ScaleByLearningRateState, params: PyTree = None
    ) -> tuple[PyTree, ScaleByLearningRateState]:
        if not isinstance(state, ScaleByLearningRateState):
            raise_wrong_state("scale_by_learning_rate", ScaleByLearningRateState, state)
        hyper = dict(state.hyperparams)  # a new dict each update: editing it never changes an earlier state
        check_hyper_keys("scale_by_learning_rate", hyper, _LEARNING_RATE)
        if callable(learning_rate):
            hyper["learning_rate"] = learning_rate(state.count).to(held_dtype(hyper["learning_rate"], updates))
        else:  # a number assigned there (optax's idiom) is held as the tensor made of it from now on
            lr = hyper_value("scale_by_learning_rate", "learning_rate", hyper["learning_rate"], state.count.device,
                             updates, learning_rate)
            hyper["learning_rate"] = lr
        factor = sign * hyper["learning_rate"]
        return _scale_tree(updates, factor), ScaleByLearningRateState(state.count + 1, hyper)

    return GradientTransformation(init, update)


def scale_by_schedule(step_size_fn: Callable[[torch.Tensor], torch.Tensor]) -> GradientTransformation:
    """Multiplies the updates by ``step_size_fn(count)``, count = updates taken so far.

    Example:
        >>> import torch
        >>> from fnlit.optim import constant
        >>> tx = scale_by_schedule(constant(2.0))
        >>> tx.update({"w": torch.ones(1)}, tx.init({"w": torch.ones(1)}))[0]
        {'w': tensor([2.])}

    Raises:
        TypeError: if ``step_size_fn`` is not callable (a constant factor is :func:`scale`).
    """
    if not callable(step_size_fn):
        raise TypeError(
            f"scale_by_schedule expected a schedule (a function of the update count), got {type(step_size_fn).__name__} "
            f"{step_size_fn!r} instead. For a constant factor use fnlit.optim.scale({step_size_fn!r}), or "
            "fnlit.optim.constant(...) as the schedule."
        )

    def init(params: PyTree) -> ScaleByScheduleState:
        return ScaleByScheduleState(zero_count(device_of(params)))

    def update(updates: PyTree, state: ScaleByScheduleState, params: PyTree = None) -> tuple[PyTree, Any]:
        if not isinstance(state, ScaleByScheduleState):
            raise_wrong_state("scale_by_schedule", ScaleByScheduleState, state)
        return _scale_tree(updates, step_size_fn(state.count)), ScaleByScheduleState(state.count + 1)

    return GradientTransformation(init, update)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Rescales updates by Adam's bias-corrected moment estimates: ``m_hat / (sqrt(v_hat) + eps)``.

    The moments keep the params' dtypes: a narrower gradient (bfloat16 for float32 params) is cast to theirs first
    (the numbers of optax's promotion); a wider one, or a real one for complex params (or the reverse), is refused,
    as ``adam`` refuses it.

    Raises:
        TypeError: if a beta or ``eps`` is not a number.
        ValueError: if a beta is outside [0, 1) or ``eps`` is negative or infinite; at update time for a sparse gradient
            (``nn.Embedding(..., sparse=True)``), which torch.optim.Adam refuses too, or a gradient wider than its
            parameter (float64 for float32) or of another kind (real for complex).

    Example:
        >>> import torch
        >>> tx = scale_by_adam()
        >>> u, state = tx.update({"w": torch.full((2,), 3.0)}, tx.init({"w": torch.zeros(2)}))
        >>> u["w"].round(decimals=4)
        tensor([1., 1.])
    """
    check_beta("scale_by_adam", "b1", b1)
    check_beta("scale_by_adam", "b2", b2)
    check_number("scale_by_adam", "eps", eps)

    def init(params: PyTree) -> ScaleByAdamState:
        zeros = lambda: tree_map(torch.zeros_like, params)  # noqa: E731
        return ScaleByAdamState(zero_count(device_of(params)), zeros(), zeros())

    def update(updates: PyTree, state: ScaleByAdamState, params: PyTree = None) -> tuple[PyTree, ScaleByAdamState]:
        if not isinstance(state, ScaleByAdamState):
            raise_wrong_state("scale_by_adam", ScaleByAdamState, state)
        # (torch.optim.Adam refuses sparse gradients: its moments would be the dense gradient's)
        g, treedef, mu = flatten_checked("scale_by_adam", updates, state.mu, sparse=" (as torch.optim.Adam does not)")
        count = state.count + 1
        t = count.to(torch.float64)  # 1 - 0.999**t loses digits in float32
        bias64 = (1 - b1**t, 1 - b2**t)  # float64 for float64 updates, float32 for the rest (see _alias's adam)
        bias32 = (bias64[0].to(torch.float32), bias64[1].to(torch.float32))
        # A narrower gradient (bfloat16 for float32 params) in the moments' dtype: lerp takes one (optax promotes).
        # adam's rule: a wider one would be rounded down, a real one for a complex moment (or the reverse) is not
        # that parameter's gradient.
        for i, (x, m) in enumerate(zip(g, mu)):
            if x.dtype is not m.dtype:
                g[i] = grad_in_dtype("scale_by_adam", x, m.dtype, updates, i)
        mu = [m.lerp(x, 1 - b1) for m, x in zip(mu, g)]
        # optax's rule for a complex gradient: |g|^2 = g * conj(g) (g * g would be its square, a complex number)
        nu = [torch.addcmul(v * b2, x, x.conj() if x.is_complex() else x, value=1 - b2) for v, x in zip(tree_leaves(state.nu), g)]
        out = []
        for m, v in zip(mu, nu):
            bc1, bc2 = bias64 if m.dtype in (torch.float64, torch.complex128) else bias32
            u = (m / bc1) / (torch.sqrt(v / bc2) + eps)
            out.append(u if m.ndim else u.to(m.dtype))  # a 0-d bfloat16 m / bc1 was float32 (see _rate): rounded once
        unflat = lambda xs: tree_unflatten(treedef, xs)  # noqa: E731
        return unflat(out), ScaleByAdamState(count, unflat(mu), unflat(nu))

    return GradientTransformation(init, update)


def trace(decay: float, nesterov: bool = False) -> GradientTransformation:
    """Momentum: ``trace = g + decay * trace``; the update is ``trace`` (or ``g + decay * trace``).

    A sparse gradient (``nn.Embedding(..., sparse=True)``) is summed into the dense one (torch.optim.SGD's momentum).

    Raises:
        TypeError: if ``decay`` is not a number, or ``nesterov`` not a bool.
        ValueError: if ``decay`` is negative or infinite; at update time for a gradient wider than its buffer (float64 for a float32
            parameter; a narrower one, bfloat16, is cast up), as :func:`fnlit.optim.sgd` refuses it.

    Example:
        >>> import torch
        >>> tx = trace(0.9)
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> u, state = tx.update({"w": torch.ones(1)}, state)
        >>> tx.update({"w": torch.ones(1)}, state)[0]
        {'w': tensor([1.9000])}
    """
    check_number("trace", "decay", decay)
    nesterov = check_flag("trace", "nesterov", nesterov)

    def init(params: PyTree) -> TraceState:
        return TraceState(tree_map(torch.zeros_like, params))

    def update(updates: PyTree, state: TraceState, params: PyTree = None) -> tuple[PyTree, TraceState]:
        if not isinstance(state, TraceState):
            raise_wrong_state("trace", TraceState, state)
        g, treedef, old = flatten_checked("trace", updates, state.trace)
        for i, (x, t) in enumerate(zip(g, old)):  # sgd's rule: a narrower gradient cast up, a wider one refused
            if x.dtype is not t.dtype:  # (x + decay * t would turn the buffer float64 for good)
                g[i] = grad_in_dtype("trace", x, t.dtype, updates, i)
        new = [x + decay * t for x, t in zip(g, old)]
        out = [x + decay * t for x, t in zip(g, new)] if nesterov else new
        return tree_unflatten(treedef, out), TraceState(tree_unflatten(treedef, new))

    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay: float | torch.Tensor = 0.0, mask: Mask | None = None) -> GradientTransformation:
    """Adds ``weight_decay * params`` to the updates (L2 regularization as a gradient term).

    A sparse gradient (``nn.Embedding(..., sparse=True)``) is summed into the dense one first.

    The decay is a tensor in ``state.hyperparams["weight_decay"]``. ``mask`` (see :func:`masked`)
    selects the leaves that decay, e.g. :func:`fnlit.optim.decay_mask`.

    Raises:
        TypeError: if ``weight_decay`` is not a number or 0-d tensor, or ``mask`` not a mask.
        ValueError: if ``weight_decay`` is negative or infinite (at ``init``: beyond float32's range, float64's for
            float64 params); at update time for a ``state.hyperparams`` key other than ``"weight_decay"``, if
            ``params`` is not given, or if the updates differ from them in structure (a ``None`` gradient) or in a
            leaf's shape, naming the path.

    Example:
        >>> import torch
        >>> tx = add_decayed_weights(0.1)
        >>> params = {"w": torch.ones(2)}
        >>> tx.update({"w": torch.zeros(2)}, tx.init(params), params)[0]
        {'w': tensor([0.1000, 0.1000])}
    """
    check_number("add_decayed_weights", "weight_decay", weight_decay, tensor=True)
    check_mask("add_decayed_weights", mask)
    if mask is not None:
        return masked(add_decayed_weights(weight_decay), mask)

    def init(params: PyTree) -> AddDecayedWeightsState:
        dtype = hyper_dtype(params, weight_decay)
        return AddDecayedWeightsState(
            {"weight_decay": scalar(weight_decay, device_of(params), dtype, "add_decayed_weights.init got weight_decay")}
        )

    def update(updates: PyTree, state: AddDecayedWeightsState, params: PyTree = None) -> tuple[PyTree, Any]:
        if params is None:
            raise ValueError(
                "add_decayed_weights.update expected params, got None instead. Pass them: "
                "tx.update(grads, state, params) (fnlit.optim.step does)."
            )
        if not isinstance(state, AddDecayedWeightsState):
            raise_wrong_state("add_decayed_weights", AddDecayedWeightsState, state)
        hyper = dict(state.hyperparams)  # a number assigned there (optax's idiom) is held as a tensor from now on
        check_hyper_keys("add_decayed_weights", hyper, _WEIGHT_DECAY)
        wd = hyper["weight_decay"] = hyper_value(
            "add_decayed_weights", "weight_decay", hyper["weight_decay"], device_of(params), params, weight_decay
        )
        # Structure and shapes checked first: u + wd * p would broadcast a (1, 3) gradient up to a (2, 3) param, and
        # the next transform would see the right shape. A sparse gradient comes back dense (sparse + dense is no op).
        g, treedef, p = flatten_checked("add_decayed_weights", updates, params)
        # (a 0-d leaf in the dtype a leaf of more dims gets: the decay did not promote it, see _rate)
        out = [u + wd * x if x.ndim else (u + _rate(wd, x) * x).to(torch.promote_types(u.dtype, x.dtype))
               for u, x in zip(g, p)]
        return tree_unflatten(treedef, out), AddDecayedWeightsState(hyper)

    return GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scales all updates by ``min(1, max_norm / (global_norm + 1e-6))``, as ``clip_grad_norm_``.

    The global norm is the 2-norm of all leaves together. No value is read back to the host. A sparse gradient
    (``nn.Embedding(..., sparse=True)``) counts as its dense self (its repeated indices summed), as in
    ``clip_grad_norm_``, and stays sparse. Each gradient keeps its dtype (a 0-d float32 one beside float64 ones too).

    Raises:
        TypeError: if ``max_norm`` is not a number.
        ValueError: if ``max_norm <= 0``.

    Example:
        >>> import torch
        >>> tx = clip_by_global_norm(1.0)
        >>> tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init({}))[0]
        {'w': tensor([0.6000, 0.8000])}
    """
    check_number("clip_by_global_norm", "max_norm", max_norm, tensor=True, positive=True, finite=False, fix="Use e.g. 1.0.")

    def update(updates: PyTree, state: EmptyState, params: PyTree = None) -> tuple[PyTree, EmptyState]:
        leaves, treedef = tree_flatten(updates)
        if not leaves:
            return updates, state
        if not all(isinstance(g, torch.Tensor) for g in leaves):  # (a float gradient: torch's TypeError, unnamed)
            i = next(i for i, g in enumerate(leaves) if not isinstance(g, torch.Tensor))
            raise ValueError(
                f"clip_by_global_norm expected gradients that are tensors, got {type(leaves[i]).__name__} "
                f"{leaves[i]!r} at {tree_paths(updates)[i]}. Pass the gradients of state.params."
            )
        if use_functional(leaves):
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in leaves]))
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            return tree_unflatten(treedef, [(g * coef).to(g.dtype) for g in leaves]), state
        norm = torch.linalg.vector_norm(torch.stack(list(torch._foreach_norm(leaves))))
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        # A 0-d gradient times the 0-d coef takes the wider dtype (float64 where another gradient is): each keeps its
        # own, as clip_grad_norm_'s in-place multiply keeps it (the same bits: computed in the wider dtype, rounded)
        scaled = torch._foreach_mul(leaves, coef)
        return tree_unflatten(treedef, [u.to(g.dtype) for u, g in zip(scaled, leaves)]), state

    return GradientTransformation(lambda params: EmptyState(), update)


def set_to_zero() -> GradientTransformation:
    """Replaces every update by zeros (optax's ``set_to_zero``): the params it sees do not move.

    With :func:`masked` it freezes part of the params. Masked-out leaves of an optimizer pass through
    unchanged (raw gradients, see :func:`masked`), so chain a masked ``set_to_zero`` over the frozen part
    after it.

    Example:
        >>> import torch
        >>> from fnlit.optim import adamw, chain, step
        >>> frozen = lambda name: name.startswith("encoder.")
        >>> tx = chain(masked(adamw(0.1), lambda name: not frozen(name)), masked(set_to_zero(), frozen))
        >>> params = {"encoder.weight": torch.ones(2), "head.weight": torch.ones(2)}
        >>> grads = {"encoder.weight": torch.ones(2), "head.weight": torch.ones(2)}
        >>> new_params, _ = step(tx, grads, tx.init(params), params)
        >>> new_params["encoder.weight"], new_params["head.weight"]
        (tensor([1., 1.]), tensor([0.8990, 0.8990]))
    """

    def update(updates: PyTree, state: EmptyState, params: PyTree = None) -> tuple[PyTree, EmptyState]:
        return tree_map(torch.zeros_like, updates), state

    return GradientTransformation(lambda params: EmptyState(), update)


def masked(inner: GradientTransformation, mask: Mask) -> GradientTransformation:
    """Applies ``inner`` only to the leaves where ``mask`` is True; other updates pass through unchanged.

    ``mask`` is a pytree of bools shaped like the params, a callable ``params -> pytree of bools``
    (e.g. :func:`fnlit.optim.decay_mask`: no decay on biases and norm weights), or a callable on
    parameter names ``name -> bool``.

    As in optax, the masked-out updates are returned as they came: ``masked(sgd(0.1), mask)`` used as
    the optimizer adds the raw gradients to the masked-out params. To freeze them, zero their updates:
    ``chain(masked(adamw(1e-3), trainable), masked(set_to_zero(), frozen))`` (see :func:`set_to_zero`).

    ``inner`` sees the selected leaves as a flat dict keyed by their names (:func:`fnlit.tree.tree_paths`;
    for a flat params dict, its keys), so its own masks by name (``adamw(..., mask=...)``) see the
    real names.

    Raises:
        TypeError: if ``mask`` is neither a pytree of bools nor a callable.
        ValueError: at update time, if ``params`` are given and the updates have another structure (the mask
            selects among the params' leaves), or for a state its ``init`` did not make (another optimizer's).

    Example:
        >>> import torch
        >>> tx = masked(add_decayed_weights(1.0), lambda name: not name.endswith("bias"))
        >>> params = {"fc.weight": torch.ones(1), "fc.bias": torch.ones(1)}
        >>> grads = {"fc.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}
        >>> tx.update(grads, tx.init(params), params)[0]
        {'fc.weight': tensor([1.]), 'fc.bias': tensor([0.])}
    """
    check_type("masked", "inner", inner, isinstance(inner, GradientTransformation),
               "a GradientTransformation", "Call the factory: masked(adamw(1e-3), mask).")
    check_mask("masked", mask)
    cache = MaskCache("masked")
    names_of: dict[Any, list[str]] = {}  # structure -> leaf names: names depend on the structure only

    def select(
        tree: PyTree, keep: list[bool], flat: tuple[list[Any], Any] | None = None
    ) -> tuple[list[Any], Any, list[str], dict[str, Any]]:
        leaves, treedef = tree_flatten(tree) if flat is None else flat
        if torch.compiler.is_compiling():  # the structure is not hashable while traced
            names = tree_paths(tree)
        else:
            names = names_of.get(treedef)
            if names is None:
                names = names_of[treedef] = tree_paths(tree)
        return leaves, treedef, names, {n: x for n, x, k in zip(names, leaves, keep) if k}

    def init(params: PyTree) -> MaskedState:
        return MaskedState(inner.init(select(params, resolve_mask(mask, params, cache))[3]))

    def update(updates: PyTree, state: MaskedState, params: PyTree = None) -> tuple[PyTree, MaskedState]:
        if not isinstance(state, MaskedState):
            raise_wrong_state("masked", MaskedState, state)
        flat = tree_flatten(updates)
        flat_params = None if params is None else tree_flatten(params)
        if flat_params is not None and flat_params[1] != flat[1]:  # the flags are the params' leaves', in their order
            _raise_mismatch("masked", params, updates)
        keep = resolve_mask(mask, updates if params is None else params, cache)
        leaves, treedef, names, chosen = select(updates, keep, flat)
        chosen_params = None if params is None else select(params, keep, flat_params)[3]
        new, inner_state = inner.update(chosen, state.inner_state, chosen_params)
        out = [new[n] if k else u for n, u, k in zip(names, leaves, keep)]
        return tree_unflatten(treedef, out), MaskedState(inner_state)

    return GradientTransformation(init, update)
