"""Callbacks: small objects that :func:`fnlit.fit` calls with ``(state, metrics)``.

A callback is any object with some of these methods (all optional; subclassing :class:`Callback` is
optional too). None of them gets a reference to the loop; to stop training, raise :class:`StopTraining`.

* ``on_fit_start(state, plan)``: once; ``plan`` is a plain dict (``max_epochs``, ``max_steps``,
  ``batches_per_epoch``, ``log_every_n_steps``, and ``fast_dev_run``: True in a ``fit(fast_dev_run=...)`` smoke
  run, whose ``max_epochs`` is 1 whatever fit was given).
* ``on_step(state, metrics)``: after every training step; ``metrics`` are the step's tensors, still on
  the device. Runs every step, so it must not read tensors back to the host (no ``.item()``).
* ``on_log(state) -> dict | None``: at each log interval, before the interval's single host sync;
  returns extra metrics to log (tensors are fine: they are read back in the same sync).
* ``on_validation_start(state)``, then ``on_validation(state, metrics)`` after each validation run
  (``metrics``: host floats, named ``"val/<name>"``).
* ``on_epoch_end(state, metrics)`` and ``on_fit_end(state, metrics)``: ``metrics`` are the latest host
  values (last logged training metrics, last validation, ``"epoch"``; a fit that stops before its first step
  has none). ``on_epoch_end`` runs for each epoch that reaches its end (its last batch, or
  ``limit_train_batches``); an epoch cut short by ``max_steps``, :class:`StopTraining` or an interruption gets
  none (Lightning calls ``on_train_epoch_end`` for it too): a resumed run goes on inside that epoch and calls it
  at its end.

Writing one's own takes a few lines:

Example:
    >>> import torch, fnlit
    >>> class StopAtLoss:
    ...     def on_validation(self, state, metrics):
    ...         if metrics["val/loss"] < 0.1:
    ...             raise StopTraining("val/loss < 0.1")
    >>> cb = StopAtLoss()
    >>> try:
    ...     cb.on_validation(None, {"val/loss": 0.05})
    ... except StopTraining as e:
    ...     print(e)
    val/loss < 0.1
"""

from __future__ import annotations

import datetime
import math
import numbers
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from .optim._alias import _learning_rate_holder
from . import data as _data
from . import distributed as _dist
from ._checkpoint_io import is_sharded  # (without importing DTensor: ~0.7 s)
from ._types import Batch, Metrics, Params
from .functional import apply as _apply
from .state import TrainState
from .summary import wide_dtype

__all__ = ["StopTraining", "Callback", "EarlyStopping", "LearningRateMonitor", "EMA", "SWA", "Timer", "update_bn"]


class StopTraining(Exception):
    """Raised by a callback to end :func:`fnlit.fit` after the current step (once ``min_epochs`` are done).

    Under several processes, raised in ``on_step`` it takes effect at the next log interval, validation or
    epoch end, where the ranks decide together (see :func:`fnlit.fit`); raised in ``on_log``, at that log interval.

    Example:
        >>> import types
        >>> class StopAtStep:
        ...     def on_step(self, state, metrics):
        ...         if int(state.step) >= 100:  # the step counter lives on the CPU: no device sync
        ...             raise StopTraining(f"reached step {int(state.step)}")
        >>> StopAtStep().on_step(types.SimpleNamespace(step=torch.tensor(100)), {})
        Traceback (most recent call last):
        fnlit.callbacks.StopTraining: reached step 100
    """


class Callback:
    """Optional base class: every hook, doing nothing. Override the ones you need.

    Example:
        >>> class PrintLoss(Callback):
        ...     def on_validation(self, state, metrics):
        ...         print(f"val/loss = {metrics['val/loss']:.2f}")
        >>> cb = PrintLoss()
        >>> cb.on_step(None, {})  # the hooks not overridden do nothing
        >>> cb.on_validation(None, {"val/loss": 0.25})
        val/loss = 0.25
    """

    def on_fit_start(self, state: TrainState, plan: Mapping[str, Any]) -> None: ...
    def on_step(self, state: TrainState, metrics: Metrics) -> None: ...
    def on_log(self, state: TrainState) -> Mapping[str, torch.Tensor | float] | None: ...
    def on_validation_start(self, state: TrainState) -> None: ...
    def on_validation(self, state: TrainState, metrics: Mapping[str, float]) -> None: ...
    def on_epoch_end(self, state: TrainState, metrics: Mapping[str, float]) -> None: ...
    def on_fit_end(self, state: TrainState, metrics: Mapping[str, float]) -> None: ...

    # A callback whose decisions depend on what it has seen (EarlyStopping's best and patience count, EMA's
    # average) defines both: fit saves ``state_dict()`` (JSON values and tensors, in dicts and lists) in every
    # checkpoint and hands it to ``load_state_dict`` when it resumes, so a resumed run goes on as the
    # uninterrupted one. The tensors come back on the CPU. Callbacks are matched by ``state_key`` and by their
    # order among callbacks of the same ``state_key``; fit warns, naming the keys, about saved states that no
    # callback of the resumed run takes (a callback left out, or given other settings).
    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    @property
    def state_key(self) -> str:
        """The name of this callback's state in a checkpoint (Lightning's ``Callback.state_key``): the class name;
        override it to add the settings that tell two callbacks of one class apart, as EarlyStopping's monitor and
        mode (``EarlyStopping{'monitor': 'val/loss', 'mode': 'min'}``), so that removing or reordering one on a
        resume does not hand another its state. Callbacks with equal keys are matched by their order. (It can be
        assigned too: ``self.state_key = "..."``.)"""
        return self.__dict__.get("_state_key") or self._default_state_key()

    @state_key.setter
    def state_key(self, key: str) -> None:
        self.__dict__["_state_key"] = key

    def _default_state_key(self) -> str:
        """The key when none is assigned: the class name (fnlit's callbacks add the settings that identify them)."""
        return type(self).__qualname__

    def _generate_state_key(self, **settings: Any) -> str:
        """A ``state_key`` of the class name and ``settings``, in Lightning's form (numbers as Python's, whatever their
        type: a NumPy float's repr depends on NumPy's version)."""
        plain = {
            k: v if isinstance(v, bool) or not isinstance(v, numbers.Real)
            else int(v) if isinstance(v, numbers.Integral) else float(v)
            for k, v in settings.items()
        }
        return f"{type(self).__qualname__}{plain!r}"


def _number(value: Any) -> Any:
    """``value`` as a Python float where it is a real number in a 0-d tensor or NumPy array, or a NumPy scalar
    (``torch.tensor(0.1)``, ``np.float32(0.1)``); anything else as it is, for the caller to check. For a callback's
    settings, when it is made (a tensor's value is read once there, not in a step)."""
    if isinstance(value, torch.Tensor):
        real = value.ndim == 0 and value.dtype != torch.bool and not value.is_complex()
    else:  # NumPy's, without importing it
        real = getattr(value, "ndim", None) == 0 and getattr(getattr(value, "dtype", None), "kind", None) in ("f", "i", "u")
    return float(value) if real else value


class EarlyStopping(Callback):
    """Stops training when a validation metric has stopped improving (Lightning's ``EarlyStopping``).

    After each validation run: an improvement is ``current + min_delta < best`` (mode ``"min"``) or
    ``current - min_delta > best`` (``"max"``), Lightning's rule, sign included (a negative ``min_delta`` counts a
    worsening of less than ``-min_delta`` as an improvement); otherwise a counter grows, and training stops when it
    reaches ``patience``. A non-finite value stops at once (``check_finite``), as does one better than
    ``stopping_threshold`` or worse than ``divergence_threshold`` (Lightning's checks, in its order). Its
    state (best, counter, and a decision to stop) is in fit's checkpoints: a run resumed after it decided to
    stop stops again at once, with a warning, while the reason holds with the resumed callback's settings (a
    larger patience trains on), as a run that ended at ``max_epochs`` does nothing when resumed. In a
    ``fit(fast_dev_run=...)`` it does nothing (no counting, no stop, its state untouched), as Lightning's.

    Args:
        monitor: the metric, as logged (``"val/loss"``).
        mode: ``"min"`` or ``"max"``.
        patience: validation runs without improvement before stopping (0 stops at the first, as 1 does).
        min_delta: the smallest change that counts as an improvement (a change of exactly ``min_delta`` does not);
            negative, the largest worsening that still counts as one, as in Lightning.
        check_finite: stop when the metric becomes NaN or infinite.
        stopping_threshold: stop once the metric is better than this (good enough).
        divergence_threshold: stop once the metric is worse than this (no hope left).

    Raises:
        ValueError: for a mode other than ``"min"`` or ``"max"``, a patience that is not an int >= 0, a monitor that
            is not a str, or a min_delta or threshold that is not a number (NaN included; a 0-d tensor or NumPy number
            is read as its float).

    Example:
        >>> es = EarlyStopping("val/loss", patience=1)
        >>> es.on_validation(None, {"val/loss": 1.0})
        >>> try:
        ...     es.on_validation(None, {"val/loss": 1.0})
        ... except StopTraining as e:
        ...     print(e)
        EarlyStopping: val/loss did not improve in 1 validation run(s); best 1.
    """

    def __init__(
        self, monitor: str = "val/loss", mode: str = "min", patience: int = 3, min_delta: float = 0.0,
        check_finite: bool = True, stopping_threshold: float | None = None, divergence_threshold: float | None = None,
    ) -> None:  # fmt: skip
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping expected mode='min' or 'max', got mode={mode!r} instead.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"EarlyStopping expected an int patience >= 0, got patience={patience!r} instead.")
        if not isinstance(monitor, str):
            raise ValueError(
                f"EarlyStopping expected monitor to be a metric's name (a str, e.g. 'val/loss'), got monitor={monitor!r} "
                "instead."
            )
        min_delta, stopping_threshold, divergence_threshold = map(_number, (min_delta, stopping_threshold, divergence_threshold))
        for name, value, can_be_none in [("min_delta", min_delta, False), ("stopping_threshold", stopping_threshold, True),
                                         ("divergence_threshold", divergence_threshold, True)]:  # fmt: skip
            if value is None and can_be_none:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
                raise ValueError(
                    f"EarlyStopping expected {name} to be a number{' or None' if can_be_none else ''}, got "
                    f"{name}={value!r} instead."
                )
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.min_delta, self.check_finite = min_delta, check_finite
        self.stopping_threshold, self.divergence_threshold = stopping_threshold, divergence_threshold
        self.best = math.inf if mode == "min" else -math.inf
        self.wait = 0
        self.stopped_step: int | None = None
        self._stopped_by: str | None = None  # why it stopped: "patience", "threshold", "divergence", "not finite"
        self._stopped_value: float | None = None  # the value that crossed a threshold; for patience, the count
        self._resumed: str | None = None
        self._off = False  # in a fast_dev_run fit (read at each fit start: the callback may serve several fits)

    def _default_state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)  # Lightning's

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "stopped_step": self.stopped_step, "stopped_by": self._stopped_by,
                "stopped_value": self._stopped_value}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.wait = float(state["best"]), int(state["wait"])
        self.stopped_step, self._stopped_by = state.get("stopped_step"), state.get("stopped_by")
        self._stopped_value = state.get("stopped_value")
        self._resumed = self._stopped_by  # a run resumed after it had decided to stop (see on_fit_start)

    def on_fit_start(self, state: TrainState, plan: Mapping[str, Any]) -> None:
        self._off = bool(plan.get("fast_dev_run"))
        if self._off:  # a smoke run: no decision, and nothing a later run would see (Lightning skips its checks too)
            return
        # A resume of a run that had decided to stop stops again, if the reason still holds with this callback's
        # settings (a larger patience, or a threshold taken out, trains on), as a run that ended at max_epochs
        # does nothing when resumed with the same max_epochs.
        why, self._resumed = self._resumed, None
        value = self._stopped_value
        holds = {  # the count when it decided: under min_epochs a later improvement resets wait, not the decision
            "patience": (self.wait if value is None else value) >= self.patience,
            "threshold": value is not None and self._reached(value),
            "divergence": value is not None and self._diverged(value),
            "not finite": self.check_finite,
        }.get(why or "", False)
        if holds:
            warnings.warn(
                f"EarlyStopping: the run being resumed had stopped at step {self.stopped_step} ({why}), so this one "
                "stops at once (once min_epochs are done). To train on, loosen the callback (e.g. a larger "
                "patience) or leave it out.",
                stacklevel=2,
            )
            raise StopTraining(f"EarlyStopping: the resumed run had stopped at step {self.stopped_step} ({why}).")
        self.stopped_step = self._stopped_by = self._stopped_value = None

    def on_validation(self, state: TrainState, metrics: Mapping[str, float]) -> None:
        if self._off:
            return
        if self.monitor not in metrics:
            raise KeyError(
                f"EarlyStopping(monitor={self.monitor!r}) found no such metric; the validation metrics are "
                f"{sorted(metrics)}. Pass one of them as monitor."
            )
        current = metrics[self.monitor]
        if self.check_finite and not math.isfinite(current):
            self._stop(state, "not finite")
            raise StopTraining(f"EarlyStopping: {self.monitor} = {current} is not finite.")
        if self._reached(current):
            self._stop(state, "threshold", current)
            raise StopTraining(f"EarlyStopping: {self.monitor} = {current:.4g} reached stopping_threshold={self.stopping_threshold}.")
        if self._diverged(current):
            self._stop(state, "divergence", current)
            raise StopTraining(f"EarlyStopping: {self.monitor} = {current:.4g} passed divergence_threshold={self.divergence_threshold}.")
        # Lightning's: monitor_op(current - min_delta, best), its min_delta negated in mode "min" (the sign kept)
        better = current + self.min_delta < self.best if self.mode == "min" else current - self.min_delta > self.best
        if better:
            self.best, self.wait = current, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self._stop(state, "patience", self.wait)
            raise StopTraining(
                f"EarlyStopping: {self.monitor} did not improve in {self.wait} validation run(s); best {self.best:.4g}."
            )

    def _reached(self, value: float) -> bool:
        """Better than ``stopping_threshold`` (smaller in mode "min")."""
        sign = 1.0 if self.mode == "min" else -1.0
        return self.stopping_threshold is not None and sign * value < sign * self.stopping_threshold

    def _diverged(self, value: float) -> bool:
        """Worse than ``divergence_threshold``."""
        sign = 1.0 if self.mode == "min" else -1.0
        return self.divergence_threshold is not None and sign * value > sign * self.divergence_threshold

    def _stop(self, state: TrainState | None, why: str, value: float | None = None) -> None:
        # (an ensemble's stacked step: member 0's, as fit counts; the members step in lockstep)
        step = None if state is None else int(state.step.reshape(-1)[0])
        self.stopped_step, self._stopped_by, self._stopped_value = step, why, value


class LearningRateMonitor(Callback):
    """Logs the learning rate of the last step (``fnlit.optim.learning_rate(state.opt_state)``) at log intervals.

    For a schedule this is ``schedule(count - 1)`` of the optimizer's own update count: the rate the latest
    applied update used (under float16 :func:`fnlit.amp` a skipped step advances ``state.step`` but not that count).

    Args:
        name: the logged name; default ``"lr-<Optimizer>"`` from the optimizer state's class: ``"lr-SGD"``,
            and ``"lr-Adam"`` for both ``adam`` and ``adamw`` (one state class; Lightning would say
            ``"lr-AdamW"`` for the latter: pass ``name="lr-AdamW"`` to match it). With several learning rates
            (a chain of masked optimizers), the first one's.

    Example:
        >>> import torch, fnlit
        >>> state = fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.adam(1e-3), seed=0)
        >>> {k: round(float(v), 6) for k, v in LearningRateMonitor().on_log(state).items()}
        {'lr-Adam': 0.001}
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name

    def on_log(self, state: TrainState) -> dict[str, torch.Tensor]:
        # the rate and the default name from one state: the one fnlit.optim.learning_rate reads
        holder = _learning_rate_holder(state.opt_state)
        if holder is None:
            raise ValueError(
                "LearningRateMonitor found no learning rate in state.opt_state; it reads "
                "fnlit.optim.learning_rate(opt_state). Remove the callback or use an fnlit.optim optimizer."
            )
        name = self.name or "lr-" + type(holder).__name__.removesuffix("State")  # each time: a reused monitor
        return {name: holder.hyperparams["learning_rate"]}


def _float_params(params: Params) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in params.items() if v.is_floating_point()}


def _copies(params: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """A copy of a loaded average, so the average's in-place updates never touch what was loaded."""
    return None if params is None else {k: v.detach().clone() for k, v in params.items()}


def _with_average(state: TrainState, average: Mapping[str, torch.Tensor]) -> TrainState:
    """``state`` with the average's copies as params: the callback keeps updating its own tensors in place,
    and a step that donates the returned state (training on from it) writes into its params."""
    return state.replace(params={**state.params, **{k: v.detach().clone() for k, v in average.items()}})


def _placed(params: dict[str, torch.Tensor], state: TrainState, who: str) -> dict[str, torch.Tensor]:
    """An average (loaded from a checkpoint, or kept from an earlier fit) on ``state``'s devices and dtypes."""
    expected = {k: v for k, v in state.params.items() if v.is_floating_point()}
    if params.keys() != expected.keys() or any(params[k].shape != v.shape for k, v in expected.items()):
        diff = sorted(params.keys() ^ expected.keys()) or [k for k, v in expected.items() if params[k].shape != v.shape]
        raise ValueError(
            f"{who}: its average does not fit the state's params (at {diff[:5]}): it was taken over another "
            f"model. Use a new {who} callback for another model."
        )
    from ._checkpoint_io import _distribute, _dtensor_class

    dtensor = _dtensor_class()  # a sharded state (fnlit.shard): a checkpoint's average comes back whole, re-shard it
    return {
        k: _distribute(params[k], v) if dtensor is not None and isinstance(v, dtensor) and not isinstance(params[k], dtensor)
        else params[k].to(device=v.device, dtype=v.dtype)
        for k, v in expected.items()
    }


class EMA(Callback):
    """An exponential moving average of the parameters, updated after every step on the device.

    ``ema = decay * ema + (1 - decay) * params``, starting from the params at the start of its first
    :func:`fnlit.fit`; a later fit with the same EMA object continues that average (training continued in
    a second ``fit`` call), so give a new run (another model, a sweep's next trial) a new EMA.
    The average is not part of the TrainState: evaluate or export it with :meth:`state`. It is in fit's
    checkpoints (the callback's ``state_dict``), so a resumed run continues the same average. Buffers
    (BatchNorm statistics) are the trained state's; see :func:`update_bn`. A ``fit(fast_dev_run=...)`` smoke run
    averages on a copy, dropped at its end: the EMA is left as it was for the real run (as EarlyStopping).

    Args:
        decay: the weight of the past, in [0, 1) (a 0-d tensor or NumPy number is read as its float when made).

    Raises:
        ValueError: for a decay that is not a number in [0, 1).

    Example:
        >>> import torch, fnlit
        >>> state = fnlit.TrainState.create(torch.nn.Linear(1, 1, bias=False), fnlit.optim.sgd(1.0), seed=0)
        >>> ema = EMA(decay=0.5)
        >>> ema.on_fit_start(state, {})
        >>> w0 = state.params["weight"].clone()
        >>> state = state.apply_gradients({"weight": torch.ones(1, 1)})
        >>> ema.on_step(state, {})
        >>> torch.allclose(ema.params["weight"], 0.5 * w0 + 0.5 * (w0 - 1))
        True
    """

    def __init__(self, decay: float = 0.999) -> None:
        decay = _number(decay)
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA expected a float decay with 0 <= decay < 1, got decay={decay!r} instead.")
        self.decay = decay
        self.params: dict[str, torch.Tensor] | None = None
        self._fresh = False
        self._kept: tuple[Any, ...] | None = None  # in a fast_dev_run fit: the average from before it, put back at its end

    def on_fit_start(self, state: TrainState, plan: Mapping[str, Any]) -> None:
        self._put_back()  # (a smoke run that failed before its end)
        if plan.get("fast_dev_run"):  # a smoke run averages as a real one, on a copy (on_step lerps in place)
            self._kept, self.params = (self.params,), _copies(self.params)
        self.params = _float_params(state.params) if self.params is None else _placed(self.params, state, "EMA")
        self._fresh = True  # placed again at the first step: fnlit.shard(step) shards a plain state there

    def on_fit_end(self, state: TrainState, metrics: Mapping[str, float]) -> None:
        self._put_back()

    def _put_back(self) -> None:
        """After a ``fast_dev_run`` fit: the average as it was before it (a smoke run leaves nothing a later fit sees)."""
        if self._kept is not None:
            (self.params,), self._kept = self._kept, None

    def _default_state_key(self) -> str:
        return self._generate_state_key(decay=self.decay)

    def state_dict(self) -> dict[str, Any]:
        # The average itself, not a copy (as nn.Module.state_dict): fit asks at each save, which reads it at once.
        return {"params": self.params}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._kept = None  # the loaded average replaces what a smoke run that failed before its end held back
        self.params = _copies(state.get("params"))  # placed on the state's devices by on_fit_start

    def on_step(self, state: TrainState, metrics: Metrics) -> None:
        assert self.params is not None, "EMA.on_step before on_fit_start"
        if self._fresh:
            self.params, self._fresh = _placed(self.params, state, "EMA"), False
        # paired by name: a step may return its params in another order (a dict rebuilt as {**updated, **frozen})
        torch._foreach_lerp_(list(self.params.values()), [state.params[k] for k in self.params], 1.0 - self.decay)

    def state(self, state: TrainState) -> TrainState:
        """``state`` with its params replaced by a copy of the average (for :func:`fnlit.evaluate`, export or
        training on)."""
        if self.params is None:
            raise ValueError("EMA.state: no average yet; run fnlit.fit(..., callbacks=[ema]) first.")
        return _with_average(state, self.params)


class SWA(Callback):
    """Stochastic weight averaging: the equal-weight mean of the params at the end of epochs >= start.

    Like Lightning's ``StochasticWeightAveraging`` (``torch.optim.swa_utils.AveragedModel`` updated once per
    epoch), with two differences made explicit: the average includes the last epoch, and the averaged
    params are handed out (:attr:`params`, :meth:`state`) rather than copied into the model. Lightning
    also switches the learning rate to ``swa_lrs``; in fnlit the rate is part of the optimizer: build it
    with a schedule that changes at the SWA start (``fnlit.optim.join``). With BatchNorm, recompute the
    statistics for the averaged params with :func:`update_bn` (under torch.distributed, on every rank with its own
    shard of the data: every rank gets the statistics of all of it). The average, its count and :attr:`start` are in
    fit's checkpoints (the callback's ``state_dict``), so a resumed run continues the same average.

    Args:
        swa_epoch_start: the first averaged epoch, counted as Lightning counts it: an int >= 1 is a 1-based epoch
            (``1`` averages from the first epoch, 0-based 0; ``2`` from the second, 0-based 1), a float a fraction of
            ``max_epochs`` whose ``int(fraction * max_epochs)`` is that 1-based epoch, so the first averaged one is
            0-based epoch ``max(int(fraction * max_epochs) - 1, 0)`` (0.8 of 4 epochs averages 0-based epochs 2 and 3,
            as ``3`` does; 1.0 the last). :attr:`start` is the 0-based first averaged epoch (for a fraction, set at
            the first fit's start from its ``max_epochs``, as Lightning: a later fit, such as a resume with a larger
            ``max_epochs``, keeps it; it is in fit's checkpoints, so a resume in a new process with new callbacks
            keeps it too).

    A ``fit(fast_dev_run=...)`` smoke run (one epoch) averages as a real run does, and its end puts back the
    average, its count and :attr:`start` as they were: the same callback then serves the real run (as EarlyStopping).

    Raises:
        ValueError: for an int below 1 (it is 1-based) or a float outside [0, 1]; at fit start, if the first
            averaged epoch is past the last one (nothing would be averaged; not in a ``fast_dev_run``, whose one
            epoch may end before it), or for a fraction without ``max_epochs``.

    Example:
        >>> import torch, fnlit
        >>> state = fnlit.TrainState.create(torch.nn.Linear(1, 1, bias=False), fnlit.optim.sgd(1.0), seed=0)
        >>> swa = SWA(swa_epoch_start=1)  # from the first epoch (1-based, as Lightning's)
        >>> swa.start  # 0-based
        0
        >>> swa.on_fit_start(state, {"max_epochs": 2})
        >>> swa.on_epoch_end(state, {"epoch": 0})
        >>> later = state.apply_gradients({"weight": torch.ones(1, 1)})
        >>> swa.on_epoch_end(later, {"epoch": 1})
        >>> torch.allclose(swa.params["weight"], state.params["weight"] - 0.5), swa.n_averaged
        (True, 2)
    """

    def __init__(self, swa_epoch_start: int | float = 0.8) -> None:
        is_int = isinstance(swa_epoch_start, numbers.Integral) and not isinstance(swa_epoch_start, bool)
        if not (is_int and swa_epoch_start >= 1) and not (isinstance(swa_epoch_start, float) and 0 <= swa_epoch_start <= 1):
            raise ValueError(
                "SWA expected swa_epoch_start to be a 1-based epoch (an int >= 1, as Lightning's: 1 averages from the "
                f"first epoch) or a fraction of max_epochs in [0, 1], got swa_epoch_start={swa_epoch_start!r} instead."
            )
        self.swa_epoch_start = swa_epoch_start
        self.start: int | None = int(swa_epoch_start) - 1 if is_int else None  # 0-based (Lightning: swa_epoch_start - 1)
        self.params: dict[str, torch.Tensor] | None = None
        self.n_averaged = 0
        self._kept: tuple[Any, ...] | None = None  # in a fast_dev_run fit: start, average and count from before it

    def on_fit_start(self, state: TrainState, plan: Mapping[str, Any]) -> None:
        self._put_back()  # (a smoke run that failed before its end)
        if plan.get("fast_dev_run"):  # (on_epoch_end makes a new average: the kept one is not written into)
            self._kept = (self.start, self.params, self.n_averaged)
        if self.start is None:  # a fraction, of the first fit's max_epochs, once (Lightning's); a smoke run's is put back
            max_epochs = plan.get("max_epochs")
            if max_epochs is None or max_epochs < 0:
                raise ValueError(
                    f"SWA(swa_epoch_start={self.swa_epoch_start}) is a fraction of max_epochs, but fit has "
                    f"max_epochs={max_epochs}. Pass an int epoch index instead, or set max_epochs."
                )
            self.start = max(int(self.swa_epoch_start * max_epochs) - 1, 0)  # Lightning's 1-based epoch, 0-based
        max_epochs = plan.get("max_epochs")
        # fast_dev_run's one epoch (a smoke run of a config that trains) averages nothing: no error, as Lightning
        if max_epochs is not None and 0 <= max_epochs <= self.start and not plan.get("fast_dev_run"):
            raise ValueError(
                f"SWA(swa_epoch_start={self.swa_epoch_start}) starts averaging at 0-based epoch {self.start} (epoch "
                f"{self.start + 1} counted from 1), but fit has max_epochs={max_epochs}: nothing would be averaged. "
                "Start at an earlier epoch."
            )
        if self.params is not None:
            self.params = _placed(self.params, state, "SWA")

    def on_fit_end(self, state: TrainState, metrics: Mapping[str, float]) -> None:
        self._put_back()

    def _put_back(self) -> None:
        """After a ``fast_dev_run`` fit: start, average and count as they were before it."""
        if self._kept is not None:
            (self.start, self.params, self.n_averaged), self._kept = self._kept, None

    def _default_state_key(self) -> str:
        return self._generate_state_key(swa_epoch_start=self.swa_epoch_start)

    def state_dict(self) -> dict[str, Any]:
        # the average itself, as EMA's; and the start, which a fraction took from the first fit's max_epochs
        return {"n_averaged": self.n_averaged, "params": self.params, "start": self.start}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self._kept is not None:  # a smoke run that failed before its end: its start back, the loaded average kept
            self.start, self._kept = self._kept[0], None
        if state.get("start") is not None:  # a fraction's, fixed by the saved run's first fit: not this fit's max_epochs
            self.start = int(state["start"])
        self.n_averaged = int(state.get("n_averaged", 0))
        self.params = _copies(state.get("params"))  # placed on the state's devices by on_fit_start
        if self.n_averaged and self.params is None:  # a checkpoint of fnlit 0.1.0 kept the count only
            self.n_averaged = 0
            warnings.warn(
                "SWA: the checkpoint was saved after averaging began, but holds no average (an older fnlit "
                "saved the count only); this resumed run averages only the epochs from here on.",
                stacklevel=2,
            )

    def on_epoch_end(self, state: TrainState, metrics: Mapping[str, float]) -> None:
        if self.start is None or metrics["epoch"] < self.start:
            return
        if self.params is None:
            self.params = _float_params(state.params)
        else:
            self.params = _placed(self.params, state, "SWA")  # fnlit.shard(step) shards a plain state after fit starts
            # A new average, not written into the last one: fit's copy of the states from before an epoch's end (a
            # second Ctrl-C in a later callback's hook: the resume ends the epoch again) holds the last one.
            keys, average = list(self.params), [v.clone() for v in self.params.values()]
            torch._foreach_lerp_(average, [state.params[k] for k in keys], 1.0 / (self.n_averaged + 1))
            self.params = dict(zip(keys, average))
        self.n_averaged += 1

    def state(self, state: TrainState) -> TrainState:
        """``state`` with its params replaced by a copy of the average (for :func:`fnlit.evaluate`, export or
        training on)."""
        if self.params is None:
            when = "no fit has run yet" if self.start is None else f"averaging starts at the end of 0-based epoch {self.start}"
            raise ValueError(f"SWA.state: nothing averaged yet ({when}).")
        return _with_average(state, self.params)


def _seconds(duration: str | float | datetime.timedelta | Mapping[str, int] | None) -> float | None:
    """``duration`` (a Timer's, or fit's ``max_time``) in seconds; None stays None.

    Raises:
        ValueError: for a duration that is not one of the accepted kinds, or not a finite number of seconds >= 0.
    """
    what = "Timer expected duration (fit's max_time) to be"
    if duration is None:
        return None
    duration = _number(duration)
    if isinstance(duration, numbers.Real) and not isinstance(duration, bool):
        seconds = duration
    elif isinstance(duration, datetime.timedelta):
        seconds = duration.total_seconds()
    elif isinstance(duration, Mapping):
        try:
            seconds = datetime.timedelta(**duration).total_seconds()
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(
                f"{what} a dict of datetime.timedelta's arguments (e.g. {{'hours': 2}}: days, hours, minutes, seconds, "
                f"...), got {dict(duration)!r} instead ({e})."
            ) from None
    elif isinstance(duration, str):
        parts = duration.split(":")
        if len(parts) != 4 or not all(p.strip().isdecimal() for p in parts):  # (isdigit() passes '²', which int() refuses)
            raise ValueError(f"{what} a duration 'DD:HH:MM:SS' (e.g. '00:12:00:00'), got {duration!r} instead.")
        d, h, m, s = (int(p) for p in parts)
        try:
            seconds = datetime.timedelta(days=d, hours=h, minutes=m, seconds=s).total_seconds()
        except OverflowError as e:  # more days than a timedelta holds
            raise ValueError(f"{what} a duration 'DD:HH:MM:SS' that a datetime.timedelta holds, got {duration!r} ({e}).") from None
    else:
        raise ValueError(
            f"{what} seconds, a datetime.timedelta, a dict ({{'hours': 2}}) or 'DD:HH:MM:SS', got {duration!r} instead."
        )
    try:
        finite = math.isfinite(seconds)
    except OverflowError:  # an int beyond a float (Timer(10**400))
        finite = False
    if not (finite and seconds >= 0):  # NaN or inf never stopped; a negative one ran no step, silently
        got = repr(duration) if seconds is duration else f"{duration!r} ({seconds} s)"
        raise ValueError(f"{what} a finite time >= 0, got {got} instead.")
    return seconds


class Timer(Callback):
    """Measures time per stage (``"train"``, ``"validate"``) and stops training after ``duration``.

    As Lightning's ``Timer``, the time counts across a resumed run: the elapsed times travel in the
    checkpoints, so ``fit(max_time=...)`` bounds the training as a whole, not each resumed part; a run
    resumed with its time already spent stops before its first step. Each ``fit`` without a loaded state
    starts from zero (a Timer reused for a second run does not count the first one's time). As in Lightning,
    the training clock starts after fit's sanity check (``num_sanity_val_steps``): that check counts in neither
    stage.

    Args:
        duration: seconds, a ``timedelta``, a dict (``{"hours": 2}``) or Lightning's ``"DD:HH:MM:SS"``, finite and
            >= 0 (0 stops before the first step); None only measures.

    Raises:
        ValueError: for a ``duration`` of another kind, a string not of that form, a dict that is not
            ``timedelta``'s arguments, or a time that is negative or not finite (NaN would never stop).

    Example:
        >>> t = Timer("00:00:00:01")
        >>> t.duration
        1.0
    """

    def __init__(self, duration: str | float | datetime.timedelta | Mapping[str, int] | None = None) -> None:
        self.duration = _seconds(duration)
        self._start: dict[str, float] = {}
        self._elapsed: dict[str, float] = {"train": 0.0, "validate": 0.0}
        self._loaded = False  # a checkpoint's elapsed times, for the next fit to go on from

    def time_elapsed(self, stage: str = "train") -> float:
        """Seconds spent in ``stage`` so far (validation time included in ``"train"``)."""
        running = time.monotonic() - self._start[stage] if stage in self._start else 0.0
        return self._elapsed.get(stage, 0.0) + running


    def _default_state_key(self) -> str:
        return self._generate_state_key(max_time=False)  # (fit's own for max_time: max_time=True)

    def state_dict(self) -> dict[str, Any]:
        return {stage: self.time_elapsed(stage) for stage in self._elapsed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._elapsed.update({stage: float(state[stage]) for stage in self._elapsed if stage in state})
        self._loaded = True

    def _stop(self, stage: str) -> None:
        if stage in self._start:
            self._elapsed[stage] += time.monotonic() - self._start.pop(stage)

    def on_fit_start(self, state: TrainState, plan: Mapping[str, Any]) -> None:
        if not self._loaded:  # a fresh run (or this Timer's next one): its own time only
            self._elapsed = dict.fromkeys(self._elapsed, 0.0)
        self._loaded = False
        self._start = {"train": time.monotonic()}
        self.on_step(state, {})  # resumed with the time already spent: no step (Lightning checks here too)

    def _on_train_start(self) -> None:
        """Called by :func:`fnlit.fit` after the sanity check, when training starts: the train clock starts here,
        as Lightning's ``on_train_start`` (the sanity check is no training time, neither for ``duration`` nor on a
        resume, which runs its own)."""
        self._start["train"] = time.monotonic()

    def on_step(self, state: TrainState, metrics: Metrics) -> None:
        if self.duration is not None and self.time_elapsed("train") >= self.duration:
            raise StopTraining(f"Timer: {self.duration} s elapsed.")

    def on_validation_start(self, state: TrainState) -> None:
        self._start["validate"] = time.monotonic()

    def on_validation(self, state: TrainState, metrics: Mapping[str, float]) -> None:
        self._stop("validate")

    def on_fit_end(self, state: TrainState, metrics: Mapping[str, float]) -> None:
        self._stop("train")


def update_bn(module: nn.Module, state: TrainState, data: Iterable[Batch], *, all_ranks: bool = True) -> TrainState:
    """Recomputes BatchNorm statistics for ``state.params`` (after :class:`SWA` or :class:`EMA`).

    Like ``torch.optim.swa_utils.update_bn``: resets the running statistics, runs every batch forward with
    every module in training mode (a BatchNorm frozen with ``.eval()`` too) and a cumulative average (momentum
    None), and returns ``state`` with the new buffers. The module is left as it was: its tensors, momenta and
    every module's training flag (torch's sets each flag to the root's).
    A batch is the input itself, or a tuple/list whose first element is the input.

    Under torch.distributed (initialised, world size > 1), as :func:`fnlit.evaluate`, it is a collective: every
    rank calls it, each with its own shard of the data, and every rank gets the same statistics, those of all the
    ranks' batches -- what one process gets running every rank's batches in turn: each BatchNorm's running mean
    and variance are the means of its per-batch statistics over all of them (each rank's weighted by its number
    of batches, so ranks may hold different numbers, none included) and ``num_batches_tracked`` is their total.
    That keeps the buffers the same on every rank, as :func:`fnlit.data_parallel` and :func:`fnlit.shard` keep
    them (save and export write rank 0's; evaluate uses each rank's own). It costs one all-reduce of the
    statistics after the forwards. A sharded state's forward is itself a collective, so there every rank runs as
    many forwards, as :func:`fnlit.evaluate` runs them: the ranks exchange their numbers of batches once (data without
    a len(): they agree before each batch whether one still has one), and a rank that has run out repeats its first
    batch, not counted. ``all_ranks=False`` keeps this
    rank's own statistics, with no collective of its own: for a state that is this rank's alone (a sharded
    state's forwards still pair up across ranks). Called on one rank only (``if is_main(): update_bn(...)``, torch's
    habit for rank-0 work) without it, that rank waits for the others in the all-reduce until the collective
    timeout: call it on every rank, or pass ``all_ranks=False`` there.

    Args:
        module: the model.
        state: the state whose params the statistics are computed for.
        data: an iterable of batches (under torch.distributed, this rank's shard).
        all_ranks: under torch.distributed, average the statistics over every rank (default); False: this rank's
            batches only.

    Raises:
        ValueError: for an ensemble's stacked state (run each member: ``fnlit.unstack_state(state, i)``, then
            ``fnlit.stack_states`` of the results); for a sharded state under torch.distributed where some rank has
            no batch while others have some (every rank raises: it has no batch for the filler forwards).

    Example:
        >>> import torch, fnlit
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
        >>> state = update_bn(model, state, [torch.randn(8, 2) for _ in range(3)])
        >>> int(state.buffers["1.num_batches_tracked"])
        3
    """
    norms = {n: m for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if not norms:
        return state
    if state.step.dim() != 0:  # (it failed deep in the forward: "t() expects a tensor with <= 2 dimensions")
        raise ValueError(
            f"update_bn got an ensemble's stacked state ({state.step.shape[0]} members): recompute each member's "
            f"statistics on its own: fnlit.stack_states([update_bn(module, fnlit.unstack_state(state, i), data) for i in "
            f"range({state.step.shape[0]})])."
        )
    buffers = dict(state.buffers)
    tracked = [f"{n}." if n else "" for n, m in norms.items() if m.running_mean is not None]
    for p in tracked:
        buffers[p + "running_mean"] = torch.zeros_like(buffers[p + "running_mean"])
        buffers[p + "running_var"] = torch.ones_like(buffers[p + "running_var"])
        buffers[p + "num_batches_tracked"] = torch.zeros_like(buffers[p + "num_batches_tracked"])
    momenta = {n: m.momentum for n, m in norms.items()}
    # Every module in training mode, as torch's model.train(): apply leaves submodules' flags alone when the root
    # already trains, and a BatchNorm frozen with .eval() would keep its reset statistics.
    modes = [(m, m.training) for m in module.modules()]
    move = _data.device_mover(state.device)
    distributed = _dist.world_size() > 1
    if distributed and is_sharded(state.params):  # (each forward all-gathers the params: as many on every rank)
        from .loop import _even_batches  # (evaluate's; fnlit.loop imports this module)

        batches: Iterable[tuple[Batch, bool]] = _even_batches(data, None, state, _NO_BN_BATCH)[0]
    else:
        batches = ((b, True) for b in data)
    try:
        module.train(True)
        for m in norms.values():
            m.momentum = None
        with torch.no_grad():
            for batch, counts in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                x = move(x) if move is not None else x  # as fit moves batches: other leaves left alone
                _, new = _apply(module, state.params, buffers, x, train=True)
                if counts:  # (a filler forward, run only to pair a sharded forward's collectives: dropped)
                    buffers = new
    finally:
        for n, m in norms.items():
            m.momentum = momenta[n]
        for m, was in modes:  # each module's flag as it was (torch's sets every one to the root's)
            m.training = was
    if distributed and all_ranks and tracked:
        buffers.update(_bn_statistics_of_all_ranks(buffers, tracked))
    return state.replace(buffers=buffers)


_NO_BN_BATCH = (
    "update_bn: the state is sharded, so each forward is a collective and every rank runs as many (a rank with fewer "
    "batches repeats its first one, not counted), but some rank has no batch at all while others have some "
    "({counts}): it has no batch to repeat. Give every rank at least one batch of the data."
)


def _bn_statistics_of_all_ranks(buffers: dict[str, torch.Tensor], tracked: list[str]) -> dict[str, torch.Tensor]:
    """The BatchNorm statistics of every rank's batches, the same on every rank: each rank's cumulative means
    weighted by its ``num_batches_tracked``, added over the ranks in one all-reduce (float64), and the counts' total."""
    like = buffers[tracked[0] + "running_mean"]
    dtype = wide_dtype(like.device)
    parts = []
    for p in tracked:
        n = buffers[p + "num_batches_tracked"].to(like.device, dtype).reshape(1)
        parts += [buffers[p + "running_mean"].to(like.device, dtype).reshape(-1) * n,
                  buffers[p + "running_var"].to(like.device, dtype).reshape(-1) * n, n]  # fmt: skip
    flat = torch.cat(parts)
    torch_dist.all_reduce(flat)
    out, offset = {}, 0
    for p in tracked:
        mean, var, count = (buffers[p + k] for k in ("running_mean", "running_var", "num_batches_tracked"))
        sum_mean, sum_var = (flat[offset + j * mean.numel() : offset + (j + 1) * mean.numel()] for j in (0, 1))
        total = flat[offset + 2 * mean.numel()]
        offset += 2 * mean.numel() + 1
        # (no batch on any rank: the reset values, mean 0 and variance 1, as one process given no batch)
        sum_var = torch.where(total > 0, sum_var, 1.0)
        out[p + "running_mean"] = (sum_mean / total.clamp_min(1)).view_as(mean).to(mean.device, mean.dtype)
        out[p + "running_var"] = (sum_var / total.clamp_min(1)).view_as(var).to(var.device, var.dtype)
        out[p + "num_batches_tracked"] = total.round().to(count.device, count.dtype).reshape(count.shape)
    return out
