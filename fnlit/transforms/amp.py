"""``fnlit.amp``: mixed precision, with dynamic loss scaling held in ``state.scaler`` for float16."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, overload

import torch

from .. import tree as _tree
from .._types import Batch, Metrics, StepFn
from ._frame import describe_result, frame, is_step_result, require_state, require_step

if TYPE_CHECKING:
    from ..state import TrainState

__all__ = ["amp", "LossScaleState", "init_loss_scale"]


class LossScaleState(NamedTuple):
    """Dynamic loss-scale state (torch.amp.GradScaler's, as tensors so it checkpoints and compiles).

    Attributes:
        scale: float32, the current loss scale.
        growth_tracker: int32, finite steps since the last change of scale.
        growth_factor: float32, scale multiplier after ``growth_interval`` finite steps.
        backoff_factor: float32, scale multiplier after a step with non-finite gradients.
        growth_interval: int32.

    Example:
        >>> import torch, fnlit
        >>> state = fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(0.1), seed=0, loss_scale="dynamic")
        >>> state.scaler.scale, state.scaler.growth_interval
        (tensor(65536.), tensor(2000, dtype=torch.int32))
    """

    scale: torch.Tensor
    growth_tracker: torch.Tensor
    growth_factor: torch.Tensor
    backoff_factor: torch.Tensor
    growth_interval: torch.Tensor


_INT32_MAX = 2**31 - 1


def init_loss_scale(
    init_scale: float = 2.0**16,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
    *,
    device: torch.device | str | None = None,
) -> LossScaleState:
    """Initial loss-scale state; the defaults are torch.amp.GradScaler's.

    Raises:
        ValueError: on a non-positive or infinite scale (or one past float32's range), a non-positive interval or
            one past int32's range, growth_factor <= 1 or backoff_factor outside (0, 1).

    Example:
        >>> float(init_loss_scale().scale)
        65536.0
    """
    if not 0 < init_scale <= torch.finfo(torch.float32).max:  # (inf, or a float32 overflow: every step skipped)
        raise ValueError(f"init_loss_scale expected a finite float32 init_scale > 0, got {init_scale} instead.")
    if not growth_factor > 1.0:
        raise ValueError(f"init_loss_scale expected growth_factor > 1, got {growth_factor} instead.")
    if not 0.0 < backoff_factor < 1.0:
        raise ValueError(f"init_loss_scale expected backoff_factor in (0, 1), got {backoff_factor} instead.")
    if not (isinstance(growth_interval, int) and growth_interval > 0):
        raise ValueError(f"init_loss_scale expected a positive int growth_interval, got {growth_interval!r} instead.")
    if growth_interval > _INT32_MAX:  # (torch.tensor's own error, "cannot be converted to type int32", said neither)
        raise ValueError(
            f"init_loss_scale expected growth_interval <= 2**31 - 1 (it is held as an int32 tensor, as GradScaler's "
            f"growth tracker is), got {growth_interval} instead. For a scale that (in practice) never grows, pass "
            "2**31 - 1."
        )

    def f(v: float) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.float32, device=device)

    def i(v: int) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.int32, device=device)

    return LossScaleState(f(init_scale), i(0), f(growth_factor), f(backoff_factor), i(growth_interval))


def _next_scale(s: LossScaleState, found_inf: torch.Tensor) -> LossScaleState:
    """GradScaler's update rule (``_amp_update_scale_``) as tensor selects: no host sync."""
    found = found_inf > 0
    tracker = s.growth_tracker + 1
    grown = s.scale * s.growth_factor
    grow = (~found) & (tracker >= s.growth_interval) & torch.isfinite(grown)
    scale = torch.where(found, s.scale * s.backoff_factor, torch.where(grow, grown, s.scale))
    reset = found | (tracker >= s.growth_interval)
    return s._replace(scale=scale, growth_tracker=torch.where(reset, torch.zeros_like(tracker), tracker))


def finish_scaled_update(
    old: TrainState, new: TrainState, scaler: LossScaleState, found_inf: torch.Tensor, step_found: torch.Tensor
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Keeps ``old``'s params and opt_state where this update's gradients overflowed (``found_inf``), and advances
    the step's incoming scale on an overflow in any update of the step so far (``step_found``)."""
    finite = found_inf == 0

    def select(n: Any, o: Any) -> Any:
        return torch.where(finite, n, o) if isinstance(n, torch.Tensor) else n

    state = new._replace_built({  # (the fields are fnlit's own: no replace checks on the step path)
        "params": _tree.tree_map(select, new.params, old.params),
        "opt_state": _tree.tree_map(select, new.opt_state, old.opt_state),
        "scaler": _next_scale(scaler, step_found),
    })
    return state, {"grads_finite": (step_found == 0).float(), "loss_scale": scaler.scale}


_NEEDS_SCALER = (
    "amp(step, dtype=torch.float16) needs dynamic loss scaling, but state.scaler is None. Without it "
    "small gradients underflow to zero in float16. Create the state with "
    "fnlit.TrainState.create(module, tx, seed=..., loss_scale='dynamic'), or use dtype=torch.bfloat16, "
    "which needs no scaler."
)


_FP16_PARAMS = (
    "fnlit.amp(dtype=torch.float16) got float16 params ({path}; a model converted with .half()): loss scaling "
    "needs float32 master params, whose gradients it unscales in float32 (torch.amp.GradScaler refuses float16 "
    "ones too: 'Attempting to unscale FP16 gradients'). Keep the params in float32 -- amp runs the forward in "
    "float16 -- or train float16 params without amp (no loss scaling), or use bfloat16."
)


_NOT_A_STEP = (
    "fnlit.amp takes a training step `(state, batch) -> (state, metrics)` or an evaluation step "
    "`(state, batch) -> metrics dict` (fnlit.eval_step), but the step returned {got}. Return one of the two."
)


@overload
def amp(step: StepFn, dtype: torch.dtype = ...) -> StepFn: ...
@overload
def amp(
    step: Callable[[TrainState, Batch], Metrics], dtype: torch.dtype = ...
) -> Callable[[TrainState, Batch], Metrics]: ...
def amp(step: Any, dtype: torch.dtype = torch.bfloat16) -> Any:
    """Runs ``step``'s forward passes in autocast with ``dtype``; params and optimizer state stay float32.

    The step's forwards run under ``torch.autocast(device, dtype)``: the function :func:`fnlit.value_and_grad`
    differentiates, and every :func:`fnlit.apply` call of the step (a teacher's forward in distillation, a
    metric's). The rest of the step stays in full precision: the backward passes, what the step computes from the
    gradients before ``apply_gradients`` (a hand-written norm or projection: a float16 ``g @ g`` would overflow),
    and the optimizer. A module called directly, not through :func:`fnlit.apply`, outside ``value_and_grad`` runs
    as it is. Inside ``value_and_grad``'s function autocast is as the user sets it (a head kept in float32 with
    ``torch.autocast(enabled=False)``); outside it, such a region does not take an :func:`fnlit.apply` forward
    out of amp (run that forward in a step of its own instead).
    With ``torch.float16`` the loss is scaled by ``state.scaler`` before backward, gradients are unscaled
    in float32 before anything sees them (clipping included), and a step whose gradients are not
    finite leaves params and opt_state unchanged and backs the scale off; after ``growth_interval``
    finite steps the scale grows (torch.amp.GradScaler's rule). Under :func:`fnlit.accumulate` each
    micro-batch backpropagates ``(loss / k) * scale``, as PyTorch's accumulation recipe
    ``scaler.scale(loss / k).backward()`` does, so the scale follows GradScaler's there too. Every
    ``value_and_grad`` call of the step is checked, not only the one whose gradients are applied: an
    overflow in a gradient taken for a metric also skips the update that follows it. A step with two updates
    (a GAN's alternating step, two ``apply_gradients``) keeps or skips each on the gradients taken since the one
    before, as GradScaler's ``scaler.step`` per optimizer does, and backs the scale off once if any overflowed
    (``scaler.update()`` once an iteration). The metrics gain ``grads_finite`` (1.0, or 0.0 when an update was
    skipped) and ``loss_scale``. All of it is tensor arithmetic: no host sync. bfloat16 needs no
    scaler. ``state.step`` counts skipped steps too (as Lightning's ``global_step`` does); a learning-rate
    schedule does not: it reads the optimizer's own count, which a skipped step leaves unchanged (as
    optax does; a torch loop calling ``scheduler.step()`` every iteration advances it on skipped steps).

    An evaluation step ``(state, batch) -> metrics`` is wrapped the same way, as Lightning runs ``validation_step``
    and ``test_step`` under the precision's autocast: ``amp(fnlit.eval_step(model, metrics_fn), dtype)`` runs the
    whole metrics function under autocast (its losses in the dtype autocast gives them: cross_entropy float32); a
    hand-written one, its :func:`fnlit.apply` forwards. Its metrics come back as the step returns them, and as
    :func:`fnlit.evaluate` and :func:`fnlit.fit`'s ``eval_step`` take them. It takes no gradients, so float16 needs
    no ``state.scaler`` there. Which kind of step it is, amp tells from what it returns, as :func:`fnlit.compile`
    does: a pair ``(state of the input's type, metrics)`` or a mapping of metrics.

    Args:
        step: a step function using :func:`fnlit.value_and_grad` and ``state.apply_gradients``, or an evaluation
            step returning a dict of metrics.
        dtype: ``torch.bfloat16`` (default) or ``torch.float16``.

    Raises:
        ValueError: for another dtype, or float16 on a state without ``scaler`` or with float16 params once the
            step takes gradients (``value_and_grad`` or ``apply_gradients``; a training step taking them another
            way, when it returns).
        TypeError: when the step returns neither ``(state, metrics)`` nor a mapping of metrics.

    Example:
        >>> import torch, torch.nn.functional as F, fnlit
        >>> model = torch.nn.Linear(4, 2)
        >>> step = fnlit.amp(fnlit.train_step(model, lambda m, b: F.cross_entropy(m(b[0]), b[1])))
        >>> state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-3), seed=0)
        >>> state, metrics = step(state, (torch.randn(8, 4), torch.randint(0, 2, (8,))))
        >>> state.params["weight"].dtype
        torch.float32
        >>> ev = fnlit.amp(fnlit.eval_step(model, lambda m, b: {"loss": F.cross_entropy(m(b[0]), b[1])}))
        >>> ev(state, (torch.randn(8, 4), torch.randint(0, 2, (8,))))["loss"].dtype
        torch.float32
    """
    require_step(step, "fnlit.amp")
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"fnlit.amp expected dtype torch.bfloat16 or torch.float16, got {dtype} instead.")

    def amp_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics] | Metrics:
        require_state(state, "fnlit.amp")
        refusal = None
        if dtype == torch.float16:  # raised when the step takes gradients: an evaluation step needs no scaler
            if state.scaler is None:
                refusal = _NEEDS_SCALER
            else:
                for i, p in enumerate(_tree.tree_leaves(state.params)):
                    if p.dtype is torch.float16:  # torch.amp.GradScaler refuses them too ("Attempting to unscale FP16 gradients")
                        refusal = _FP16_PARAMS.format(path=_tree.tree_paths(state.params)[i])
                        break
        with frame() as (f, outermost):
            before = f.set_amp(dtype, state.scaler if dtype == torch.float16 else None, state.device, refusal)
            try:
                result = step(state, batch)
            except BaseException:  # (an outer frame goes on, as it was: the training step may catch this)
                f.reset_amp(before)
                raise
            if isinstance(result, Mapping):  # an evaluation step's metrics (fnlit.eval_step), as they are
                f.reset_amp(before)  # (called inside a training step's frame: the training goes on as it was)
                return result
            if not is_step_result(result, state):
                raise TypeError(_NOT_A_STEP.format(got=describe_result(result, state)))
            if refusal is not None:  # a training step that took its gradients some other way: never fp16 unscaled
                raise ValueError(refusal)
            state, metrics = result
            if outermost:
                metrics = f.finish(dict(metrics))
        return state, metrics

    amp_step.__wrapped__ = step  # type: ignore[attr-defined]
    return amp_step
