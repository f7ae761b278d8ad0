"""Learning-rate schedules: functions of the step count, written in torch ops.

A schedule takes the number of optimizer steps already taken (a Python int or a 0-d integer tensor)
and returns a 0-d float32 tensor on the count's device. Nothing here reads a tensor back to the host,
so a schedule can run inside a compiled or CUDA-graph-captured step and under ``torch.func.vmap``. An argument
given as a 0-d tensor is read once, when the schedule is built, and the schedule computes with that number: changing
the tensor afterwards changes nothing (build a new schedule).
Semantics follow optax's schedules (``join`` = ``optax.join_schedules``).

Any callable ``count -> 0-d tensor`` is a :data:`Schedule`, so one's own is a plain function:

Example:
    >>> import torch, fnlit
    >>> def halve_every_10(count) -> torch.Tensor:
    ...     return 0.1 * 0.5 ** torch.div(torch.as_tensor(count), 10, rounding_mode="floor")
    >>> halve_every_10(25), halve_every_10(torch.tensor(0))
    (tensor(0.0250), tensor(0.1000))
    >>> tx = fnlit.optim.sgd(halve_every_10)  # wherever a learning rate is taken
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch

Schedule = Callable[[int | torch.Tensor], torch.Tensor]
"""A learning rate as a function of the step count: ``schedule(count) -> 0-d float tensor`` (see the module example)."""

__all__ = ["Schedule", "constant", "linear_warmup", "cosine_decay", "warmup_cosine", "step_decay", "join"]


def _exact_count(count: int | torch.Tensor) -> torch.Tensor:
    """The count as a tensor, a Python int as int64; a negative Python int is an error (a tensor is not checked).

    Comparisons and floor divisions of the count use it: float32 holds integers exactly only up to
    2**24, so a step count of 29_999_999 read as float32 is 30_000_000 (a decay one step early).
    """
    if isinstance(count, torch.Tensor):
        return count
    if count < 0:
        raise ValueError(f"schedule expected a step count >= 0, got {count} instead. Steps start at 0.")
    return torch.tensor(count)


def _count(count: int | torch.Tensor) -> torch.Tensor:
    """The count as a float32 tensor, for the smooth schedules (relative error 6e-8 above 2**24)."""
    return _exact_count(count).to(torch.float32)


def _check(name: str, arg: str, value: float, ok: Callable[[float], bool], expected: str, fix: str = "") -> float:
    """Checks an argument when the schedule is built and returns it as a Python number: a 0-d tensor's value is read
    here, never in a step (kept a tensor, ``warmup_steps == 0`` and ``float(decay_steps)`` read it back every step,
    and ``full_like(t, value)`` too: fnlit.compile's capture failed, and CUDA graphs could not hold the step)."""
    real = isinstance(value, numbers.Real) or (
        isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool
    )
    if isinstance(value, bool) or not real:  # before comparing: "10" < 0 is Python's TypeError
        raise TypeError(f"{name} expected {arg} as a number (or a 0-d tensor), got {type(value).__name__} {value!r} instead.")
    number = value.item() if isinstance(value, torch.Tensor) else value  # (an int32 tensor compared with 2**63 - 1 wraps)
    if not ok(number):
        raise ValueError(f"{name} expected {arg} {expected}, got {value!r} instead.{' ' + fix if fix else ''}")
    return number


_FLOAT32_MAX = torch.finfo(torch.float32).max
_FLOAT32_TINY = torch.finfo(torch.float32).tiny  # its smallest normal number, 1.2e-38
_MAX_STEPS = 2**63 - 1  # the largest step count (int64)


def _check_rate(name: str, arg: str, value: float) -> float:
    """Checks a value the schedule returns: a learning rate, finite in float32 (the schedules compute in it: 1e39 was
    inf, and the params inf or nan) and >= 0 (a negative one would move the params up the gradient; NaN fails the
    comparison)."""
    return _check(name, arg, value, lambda v: 0 <= v <= _FLOAT32_MAX, "finite and >= 0",
                  "The optimizer subtracts lr * direction; use a positive rate such as 1e-3 (at most 3.4e38: schedules "
                  "compute in float32).")


def _check_steps(name: str, arg: str, value: float, low: float = 0, strict: bool = False, low_name: str = "") -> float:
    """Checks a step count the schedule is built with (a length or a boundary): finite, ``>= low`` (``> low`` with
    ``strict``) and at most 2**63 - 1. ``v >= 0`` alone let inf through (cosine_decay's inf * 0 was nan)."""
    bound = f"{'>' if strict else '>='} {f'{low_name} ({low})' if low_name else low}"
    def ok(v: float) -> bool:
        return math.isfinite(v) and (v > low if strict else v >= low) and v <= _MAX_STEPS

    return _check(name, arg, value, ok, f"finite and {bound}",
                  "It counts optimizer steps: at most 2**63 - 1, the largest step count.")


def _divisor(steps: float) -> float:
    """A length > 0 that a float32 count is divided by (taken when the schedule is built), kept >= float32's smallest
    normal number: 1e-46 was 0 in float32 (0 / 0 was nan at step 0); every count >= 1 is past such a length
    either way."""
    return max(steps, _FLOAT32_TINY)


def constant(value: float) -> Schedule:
    """A schedule that always returns ``value``.

    Example:
        >>> constant(0.1)(5)
        tensor(0.1000)

    Raises:
        ValueError: if ``value`` is negative or not finite (in float32).
    """
    value = _check_rate("constant", "value", value)

    def schedule(count: int | torch.Tensor) -> torch.Tensor:
        return torch.full_like(_count(count), value)

    return schedule


def linear_warmup(peak_value: float, warmup_steps: int, init_value: float = 0.0) -> Schedule:
    """Goes linearly from ``init_value`` at step 0 to ``peak_value`` at ``warmup_steps``, then stays.

    Args:
        peak_value: value reached at ``warmup_steps`` and kept afterwards.
        warmup_steps: length of the ramp (0: ``peak_value`` from the start).
        init_value: value at step 0.

    Raises:
        ValueError: if ``warmup_steps`` is negative or not finite, or ``peak_value`` or ``init_value`` is negative or
            not finite (in float32).

    Example:
        >>> linear_warmup(1.0, 4)(1)
        tensor(0.2500)
    """
    peak_value = _check_rate("linear_warmup", "peak_value", peak_value)
    init_value = _check_rate("linear_warmup", "init_value", init_value)
    warmup_steps = _check_steps("linear_warmup", "warmup_steps", warmup_steps)
    ramp = _divisor(warmup_steps)

    def schedule(count: int | torch.Tensor) -> torch.Tensor:
        t = _count(count)
        if warmup_steps == 0:
            return torch.full_like(t, peak_value)
        frac = torch.clamp(t / ramp, 0.0, 1.0)
        return init_value + frac * (peak_value - init_value)

    return schedule


def _half_cosine(count: int | torch.Tensor, span: float) -> torch.Tensor:
    """``0.5 * (1 + cos(pi * t / span))`` for ``t = min(count, span)``, as ``sin((span - t) * pi / (2 * span)) ** 2``:
    the same value without float32's cancellation near ``t = span`` (1 + cos there lost 20 % of the last steps'
    rate). ``span`` is a :func:`_divisor`, so ``pi / (2 * span)`` stays finite in float32 (decay_steps=1e-40 made it
    inf, and the rate nan)."""
    t = torch.clamp(_count(count), max=float(span))
    return torch.sin((span - t) * (math.pi / (2 * span))) ** 2


def cosine_decay(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Half a cosine from ``init_value`` at step 0 down to ``alpha * init_value`` at ``decay_steps``.

    ``value = init_value * ((1 - alpha) * 0.5 * (1 + cos(pi * min(t, decay_steps) / decay_steps)) + alpha)``
    (optax's ``cosine_decay_schedule``; torch's ``CosineAnnealingLR`` with ``eta_min = alpha * init`` up to
    ``decay_steps``, after which torch's rises again and this one stays at its end value).

    Raises:
        ValueError: if ``decay_steps`` is not finite and > 0, ``alpha`` is outside [0, 1], or ``init_value`` is negative
            or not finite (in float32).

    Example:
        >>> cosine_decay(1.0, 10)(5)
        tensor(0.5000)
    """
    init_value = _check_rate("cosine_decay", "init_value", init_value)
    span = _divisor(_check_steps("cosine_decay", "decay_steps", decay_steps, strict=True))
    alpha = _check("cosine_decay", "alpha", alpha, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")

    def schedule(count: int | torch.Tensor) -> torch.Tensor:
        return init_value * ((1.0 - alpha) * _half_cosine(count, span) + alpha)

    return schedule


def warmup_cosine(
    peak_value: float, warmup_steps: int, decay_steps: int, init_value: float = 0.0, end_value: float = 0.0
) -> Schedule:
    """Linear warmup to ``peak_value``, then cosine decay to ``end_value`` at step ``decay_steps``.

    As optax's ``warmup_cosine_decay_schedule``: ``decay_steps`` counts the warmup too, so the cosine
    part lasts ``decay_steps - warmup_steps`` steps; the value stays ``end_value`` afterwards.

    Raises:
        ValueError: if ``warmup_steps`` is negative, ``decay_steps <= warmup_steps``, either is not finite, or
            ``peak_value``, ``init_value`` or ``end_value`` is negative or not finite (in float32).

    Example:
        >>> warmup_cosine(1.0, warmup_steps=10, decay_steps=110)(60)
        tensor(0.5000)
    """
    peak_value, init_value, end_value = (
        _check_rate("warmup_cosine", arg, value)
        for arg, value in (("peak_value", peak_value), ("init_value", init_value), ("end_value", end_value))
    )
    warmup_steps = _check_steps("warmup_cosine", "warmup_steps", warmup_steps)
    decay_steps = _check_steps("warmup_cosine", "decay_steps", decay_steps, low=warmup_steps, strict=True,
                               low_name="warmup_steps")
    span = _divisor(decay_steps - warmup_steps)

    def cosine(count: int | torch.Tensor) -> torch.Tensor:
        return end_value + (peak_value - end_value) * _half_cosine(count, span)

    return join([linear_warmup(peak_value, warmup_steps, init_value), cosine], [warmup_steps])


def step_decay(init_value: float, step_size: int, gamma: float) -> Schedule:
    """``init_value * gamma ** (t // step_size)``, torch's ``StepLR``.

    Raises:
        ValueError: if ``step_size`` is not finite and > 0, ``gamma`` is negative or not finite (in float32), or
            ``init_value`` is.

    Example:
        >>> step_decay(1.0, step_size=10, gamma=0.5)(25)
        tensor(0.2500)
    """
    init_value = _check_rate("step_decay", "init_value", init_value)
    size = _divisor(_check_steps("step_decay", "step_size", step_size, strict=True))  # an int stays one: exact floor
    gamma = _check("step_decay", "gamma", gamma, lambda v: 0 <= v <= _FLOAT32_MAX, "finite and >= 0",
                   "Schedules compute in float32: at most 3.4e38.")

    def schedule(count: int | torch.Tensor) -> torch.Tensor:
        # The number of decays from the exact count (in float32, t / step_size was off by one above 2**24)
        k = torch.div(_exact_count(count), size, rounding_mode="floor").to(torch.float32)
        return init_value * torch.pow(torch.full_like(k, gamma), k)

    return schedule


def join(schedules: Sequence[Callable[[torch.Tensor], torch.Tensor]], boundaries: Sequence[int]) -> Schedule:
    """Runs ``schedules[i]`` from ``boundaries[i - 1]`` on; each later schedule sees ``t - boundary``.

    As optax's ``join_schedules``.

    Raises:
        ValueError: unless ``len(boundaries) == len(schedules) - 1`` and boundaries are
            finite, non-decreasing and >= 0.
        TypeError: for a boundary that is not a number (or a 0-d tensor), or a schedule that is not callable (a
            number: :func:`constant` makes it one).

    Example:
        >>> s = join([constant(1.0), constant(0.1)], [5])
        >>> s(4), s(5)
        (tensor(1.), tensor(0.1000))
    """
    schedules, boundaries = list(schedules), list(boundaries)
    if not schedules or len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"join expected len(boundaries) == len(schedules) - 1, got {len(boundaries)} boundaries for "
            f"{len(schedules)} schedules instead. Give one boundary between each pair of schedules."
        )
    for i, fn in enumerate(schedules):  # (a number failed at the optimizer's init: "'float' object is not callable")
        if not callable(fn):
            raise TypeError(
                f"join expected schedules[{i}] to be a schedule (a function of the step count), got "
                f"{type(fn).__name__} {fn!r} instead. For a constant rate use fnlit.optim.constant({fn!r})."
            )
    # ("3" < 0 was Python's TypeError; nan ran schedules[1] from step 0)
    boundaries = [_check_steps("join", f"boundaries[{i}]", boundary) for i, boundary in enumerate(boundaries)]
    if boundaries != sorted(boundaries):
        raise ValueError(f"join expected non-decreasing boundaries >= 0, got {boundaries} instead.")

    def schedule(count: int | torch.Tensor) -> torch.Tensor:
        t = _exact_count(count)  # a Python int as int64, as an int tensor is: both compare exactly above 2**24
        out = schedules[0](t)
        for boundary, fn in zip(boundaries, schedules[1:]):
            out = torch.where(t < boundary, out, fn(t - boundary))
        return out

    return schedule
