"""Named optimizers with torch.optim semantics: ``sgd``, ``adam``, ``adamw``; and ``learning_rate``.

Each has two implementations of the same math, picked per call by :func:`use_functional`:

* eager (fused): clone params and moment buffers (the clones become the new state, so inputs are never
  written) and run torch's fused multi-tensor kernel in place on the clones. Allocating fresh tensors
  op by op was 1.2-5x slower than ``torch.optim.AdamW(foreach=True)``; clone + fused kernel is faster.
  Large CPU clones reuse the memory of the optimizer's own dead outputs (:class:`._base.Recycler`).
* functional: plain per-leaf torch ops, for ``torch.compile`` (inductor fuses them) and ``torch.func``
  transforms (``vmap`` over ensembles), where in-place fused kernels cannot run.

Learning rate and weight decay live in ``state.hyperparams`` as 0-d tensors, so changing them never
recompiles a compiled step, and a vmapped ensemble can give each member its own values. They are float32, or
float64 where a param is float64 (float64 training then matches torch.optim's Python-float rates to float64
precision, except a schedule's rate, computed in float32) or the value was given as a float64 tensor; the CUDA
fused kernels read a tensor rate as float32. A number assigned there (optax's ``hyperparams["learning_rate"] = 1e-3``)
works too, and the next state holds it as a tensor; under :func:`fnlit.compile` each new number is a constant of its
own graph (a recompile): assign tensors, of the dtype held there (``torch.tensor(1e-3, dtype=torch.float64)`` for a
float64 model: a float32 one is a new graph, and stays float32). Under a learning-rate schedule, the schedule wins:
each update writes its value to ``hyperparams["learning_rate"]``, so a rate assigned there is overwritten at the next
update, unused (as under optax's ``inject_hyperparams``). For a drop on a plateau, build the optimizer with a number
rate (not a schedule, :func:`constant` included) and assign the new rate, or :func:`join` schedules at known steps.
These two keys are the only ones read: an update refuses another (torch.optim's ``"lr"``, optax's ``"b1"``) with a
ValueError, as optax's ``inject_hyperparams`` does, since the betas, momentum and eps are fixed when the optimizer is
built. An optimizer built with the Python number ``weight_decay=0`` leaves the decay out of its step (no pass over the
params for it), so its ``hyperparams["weight_decay"]`` is then not read: build it with ``weight_decay=torch.tensor(0.0)``
to tune the decay from zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from ..tree import _flat_dict_of, _same_flat_dicts, is_real, tree_flatten, tree_map, tree_paths, tree_unflatten
from ._base import (
    _DONATED, GradientTransformation, Mask, MaskCache, PyTree, Recycler, _raise_mismatch, dense_grad, donated_update, grad_in_dtype,
    keys_in_order, own, own_scaled, raise_device_mismatch, raise_shape_mismatch, raise_wrong_state, resolve_mask,
    use_functional,
)
from ._transforms import (
    ScalarOrSchedule, _rate, check_arg, check_beta, check_flag, check_hyper_keys, check_mask, check_number, check_rate,
    check_schedule_value, device_of, held_dtype, hyper_dtype, hyper_value, scalar, zero_count,
)

__all__ = ["SGDState", "AdamState", "sgd", "adam", "adamw", "learning_rate"]

LearningRate = ScalarOrSchedule  # a number, a 0-d tensor, or a schedule of the step count
Leaves = list[torch.Tensor]
_HYPER_KEYS = frozenset({"learning_rate", "weight_decay"})  # the keys of every state's hyperparams, the only ones read


class SGDState(NamedTuple):
    """The state of :func:`sgd`: step count, momentum buffers (``()`` without momentum), hyperparameters.

    Example:
        >>> import torch
        >>> sgd(0.1, momentum=0.9).init({"w": torch.zeros(2)})
        SGDState(count=tensor(0), momentum_buffer={'w': tensor([0., 0.])},
                 hyperparams={'learning_rate': tensor(0.1000), 'weight_decay': tensor(0.)})
    """

    count: torch.Tensor  # 0-d int64: steps taken so far
    momentum_buffer: PyTree  # () without momentum: torch.func.vmap rejects None leaves
    hyperparams: dict[str, torch.Tensor]  # "learning_rate", "weight_decay": 0-d float32 (float64: see hyper_dtype)


class AdamState(NamedTuple):
    """The state of :func:`adam` / :func:`adamw`: step count, first and second moments, hyperparameters.

    Example:
        >>> import torch
        >>> state = adam(1e-3).init({"w": torch.zeros(2)})
        >>> int(state.count), state.mu, state.nu
        (0, {'w': tensor([0., 0.])}, {'w': tensor([0., 0.])})
    """

    count: torch.Tensor
    mu: PyTree
    nu: PyTree
    hyperparams: dict[str, torch.Tensor]


def _groups(leaves: Leaves, flags: Sequence[bool] | None = None) -> list[list[int]]:
    """Indices of leaves sharing a device and dtype (fused kernels take one of each), and ``flags[i]``."""
    first, dtype = leaves[0], leaves[0].dtype
    if first.is_cpu:  # is_cpu is a flag read; .device builds an object per call
        same = all(t.is_cpu and t.dtype is dtype for t in leaves)
    else:
        device = first.device
        same = all(t.device == device and t.dtype is dtype for t in leaves)
    if same and (flags is None or all(flags)):
        return [list(range(len(leaves)))]
    groups: dict[tuple[torch.device, torch.dtype, bool], list[int]] = {}
    for i, t in enumerate(leaves):
        groups.setdefault((t.device, t.dtype, flags is None or flags[i]), []).append(i)
    return list(groups.values())


def _without_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with autograd off, as under ``torch.no_grad()`` without its Python context manager (~1 us a call)."""

    def run(*args: Any) -> Any:
        mode = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return fn(*args)
        finally:
            torch._C._set_grad_enabled(mode)

    return run


def _log(b: float) -> float:
    return math.log(b) if b > 0 else -math.inf  # b = 0: exp(t * -inf) = 0 = 0**t for every t >= 1


def _decay_factor(lr: torch.Tensor, wd: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor | float:
    """AdamW's ``1 - lr * wd`` for params of ``dtype``.

    In float64 then rounded once, as torch.optim's Python-float ``1 - lr * weight_decay`` is: to float32
    for float32 params and narrower (their multiply computes in float32), kept in float64 for float64
    params (rounded to float32, the factor moved them ~1e3x further from torch.optim.AdamW than the steps).
    """
    if lr.device.type == "cpu" and not use_functional([lr]):
        return 1.0 - float(lr) * float(wd)  # host memory: no device sync, and 5 tensor ops fewer
    factor = 1 - lr.double() * wd.double()
    return factor if dtype is torch.float64 else factor.float()


def _kernel_lr(lr: torch.Tensor, device: torch.device) -> torch.Tensor | float:
    """The fused kernels take a float or a tensor lr; on the CPU the float skips a tensor read per call (and keeps a
    float64 rate whole). Elsewhere a float32 tensor: the CUDA kernels read a tensor rate as float."""
    return float(lr) if device.type == "cpu" and lr.is_cpu else lr.to(device=device, dtype=torch.float32)


def _kernel_decay(lr: torch.Tensor, wd: torch.Tensor, param: torch.Tensor) -> float | None:
    """The weight decay as the fused kernel's float ``weight_decay``, where that reads host memory (CPU), else None.

    AdamW's CPU kernel multiplies by ``1 - lr * weight_decay`` computed in float64 from the same floats
    :func:`_decay_factor` uses: the same bits as a separate multiply, without its pass over the params.
    Adam's and SGD's add ``weight_decay * p`` to the gradient in float32, as the separate ``addcmul`` did.
    """
    if param.is_cpu and lr.is_cpu and wd.is_cpu:
        return float(wd)
    return None


def _as_real(flags: list[bool], xs: Leaves) -> Leaves:
    return [torch.view_as_real(x) if c else x for x, c in zip(xs, flags)]


def _as_complex(flags: list[bool], new_p: Leaves, new_bufs: list[Leaves]) -> tuple[Leaves, list[Leaves]]:
    back = lambda xs: [torch.view_as_complex(x.contiguous()) if c else x for x, c in zip(xs, flags)]  # noqa: E731
    return back(new_p), [back(b) for b in new_bufs]


def _optimizer(
    name: str,
    state_cls: type,
    buffers: Sequence[str],
    learning_rate: LearningRate,
    weight_decay: float | torch.Tensor,
    fused: Callable[..., tuple[Leaves, list[Leaves]]] | None,
    functional: Callable[..., tuple[Leaves, list[Leaves]]],
    sparse: str | None = None,
) -> GradientTransformation:
    """Wraps leaf-level implementations into init/update/step with the state bookkeeping.

    A sparse gradient is made dense (:func:`._base.dense_grad`), or refused with the reason ``sparse`` names.
    """
    schedule = learning_rate if callable(learning_rate) else None
    decays = not (is_real(weight_decay) and weight_decay == 0)
    eager_functional = _without_grad(functional)

    given = {"learning_rate": learning_rate, "weight_decay": weight_decay}  # a float64 tensor stays float64

    def init(params: PyTree) -> Any:
        count = zero_count(device_of(params))
        lr = check_schedule_value(name, schedule(count)) if schedule is not None else learning_rate
        hyper = {k: scalar(v, count.device, hyper_dtype(params, given[k]), f"{name}.init got {k}") for k, v in
                 (("learning_rate", lr), ("weight_decay", weight_decay))}
        bufs = {f: tree_map(torch.zeros_like, params) for f in buffers}
        return state_cls(count=count, hyperparams=hyper, **bufs) if buffers else state_cls(count, (), hyper)

    def step(grads: PyTree, state: Any, params: PyTree) -> tuple[PyTree, Any]:
        if not isinstance(state, state_cls):  # (another optimizer's: sgd read an AdamState's learning rate)
            raise_wrong_state(name, state_cls, state)
        ref = getattr(state, buffers[0]) if buffers else params
        keys = _same_flat_dicts(params, grads, *[getattr(state, f) for f in buffers]) if torch.compiler.is_compiling() else None
        if keys is not None:  # traced, the usual trees (see _same_flat_dicts): their leaves by key, no treedefs
            p, g = [params[k] for k in keys], [grads[k] for k in keys]
            bufs = [([b[k] for k in keys], None) for b in (getattr(state, f) for f in buffers)]

            def rebuild(leaves: list[Any]) -> PyTree:
                return _flat_dict_of(keys, leaves, params)

        else:
            if torch.compiler.is_compiling():  # gradients keyed in another order than the state, taken as eagerly
                grads = keys_in_order(grads, ref)
            p, treedef = tree_flatten(params)
            g, g_def = tree_flatten(grads)
            bufs = [tree_flatten(getattr(state, f)) for f in buffers]
            ref_def = bufs[0][1] if bufs else treedef
            if g_def != ref_def:
                if type(ref) is tuple and not ref and g:  # () where the buffers were: made without them (sgd, momentum 0)
                    raise_wrong_state(name, state_cls, state, f"one without state.{buffers[0]} (made by {name} without momentum)")
                _raise_mismatch(name, ref, grads)
            if treedef != ref_def:
                _raise_mismatch(name, ref, params, what="params")
            for f, (_, b_def) in zip(buffers[1:], bufs[1:]):  # (one loop below walks them all beside the params)
                if b_def != ref_def:
                    _raise_mismatch(name, params, getattr(state, f), what=f"state.{f}")

            def rebuild(leaves: list[Any]) -> PyTree:
                return tree_unflatten(treedef, leaves)

        # The fused kernels do not check: a smaller gradient (or moment: params replaced since init) would be read
        # past its end, one on another device skipped. One pass over the leaves, the moments beside their param.
        for i, (x, q, *moments) in enumerate(zip(g, p, *[b[0] for b in bufs])):
            if getattr(x, "layout", None) is not torch.strided:  # nn.Embedding(sparse=True)'s, or not a tensor
                if not isinstance(x, torch.Tensor):  # (a float where a gradient should be)
                    raise_shape_mismatch(f"{name}.update", params, grads)
                g[i] = x = dense_grad(name, x, grads, i, sparse)  # summed into a dense gradient, or refused
            shape, dtype = q.shape, q.dtype
            if x.shape != shape:
                raise_shape_mismatch(f"{name}.update", params, grads)
            if x.device != q.device:  # (the fused kernels would skip the update without a word: a meta gradient)
                raise_device_mismatch(name, params, i, x, q)
            if x.dtype != dtype:  # (the fused kernels take one dtype)
                g[i] = grad_in_dtype(name, x, dtype, params, i)
            for f, b in zip(buffers, moments):
                if b.shape != shape or b.dtype is not dtype:
                    raise ValueError(
                        f"{name}.update expected state.{f} of the params' shapes and dtypes, but {tree_paths(params)[i]} "
                        f"is a {dtype} parameter of shape {tuple(shape)} while state.{f} holds a {b.dtype} tensor "
                        f"of shape {tuple(b.shape)}: the params changed since {name}.init. Initialise the optimizer "
                        "state for these params (tx.init(params)), or cast the params back."
                    )
        # A new dict each update (a schedule's rate written in): an edit of a state's hyperparams changes that
        # state and its successors, never an earlier state (as optax's inject_hyperparams). A number assigned there
        # (optax's idiom) is held as the tensor made of it from now on.
        hyper = dict(state.hyperparams)
        check_hyper_keys(name, hyper, _HYPER_KEYS)  # a stray key ("lr", optax's "b1") would change nothing, silently
        if schedule is not None:
            hyper["learning_rate"] = schedule(state.count).to(held_dtype(hyper["learning_rate"], p))
        for key in ("learning_rate", "weight_decay") if decays else ("learning_rate",):
            hyper[key] = hyper_value(name, key, hyper[key], state.count.device, p, given[key])
        lr, wd = hyper["learning_rate"], hyper["weight_decay"] if decays else None
        count = state.count + 1
        traced = use_functional(g, p, [count, lr])
        # Eagerly, no autograd history through the update (torch.optim's steps record none; the fused kernels none
        # either); traced (vmap, grad, compile), the per-leaf math as it is.
        impl = (functional if traced else eager_functional) if fused is None or traced else fused
        if impl is fused:  # the fused CPU kernels get non-contiguous inputs wrong (see own()); free when contiguous
            g = [x.contiguous() for x in g]
        complex_ = [x.dtype.is_complex for x in p]
        if True in complex_:  # torch.optim's rule: a complex parameter is its real and imaginary parts (view_as_real)
            new_p, new_bufs = _as_complex(complex_, *impl(
                _as_real(complex_, g), _as_real(complex_, p), [_as_real(complex_, b[0]) for b in bufs], count, lr, wd, params
            ))
        else:
            new_p, new_bufs = impl(g, p, [b[0] for b in bufs], count, lr, wd, params) if p else ([], [[] for _ in bufs])
        fields = {f: rebuild(b) for f, b in zip(buffers, new_bufs)}
        return rebuild(new_p), state._replace(count=count, hyperparams=hyper, **fields)

    def update(grads: PyTree, state: Any, params: PyTree = None) -> tuple[PyTree, Any]:
        if params is None:
            if decays:
                raise ValueError(
                    f"{name}.update expected params (weight decay needs them), got None instead. "
                    f"Pass them: tx.update(grads, state, params), or use fnlit.optim.step."
                )
            # From 0, new params are exactly the updates; shaped as the moments (the params they were made for),
            # so that a gradient of another shape or dtype is checked as a gradient
            # (strided: zeros like a sparse gradient would be sparse params)
            like = getattr(state, buffers[0]) if buffers else grads
            params = tree_map(lambda t: torch.zeros_like(t, layout=torch.strided), like)
        if _DONATED.get() is None:
            new_params, new_state = step(grads, state, params)
        else:  # never in place (fnlit.donating): the update is the new params minus these, which must stay as they were
            with donated_update(False):
                new_params, new_state = step(grads, state, params)
        return tree_map(torch.sub, new_params, params), new_state

    return GradientTransformation(init, update, step)


# ------------------------------------------------------------------------------------------ SGD
def sgd(
    learning_rate: LearningRate,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float | torch.Tensor = 0.0,
    dampening: float = 0.0,
) -> GradientTransformation:
    """Stochastic gradient descent with ``torch.optim.SGD`` semantics.

    ``g += weight_decay * p``; with momentum ``buf = momentum * buf + (1 - dampening) * g`` (``buf = g``
    on the first step); the direction is ``buf`` (or ``g + momentum * buf`` with Nesterov);
    ``p -= lr * direction``.

    A sparse gradient (``nn.Embedding(..., sparse=True)``) is taken as torch.optim.SGD takes it: summed into the
    dense gradient (its repeated indices added up) and stepped with the same numbers. The momentum buffer is
    dense. With weight decay, where torch.optim.SGD fails on one, the step is that of the dense gradient.

    Args:
        learning_rate: a float, or a schedule ``count -> lr`` (see :mod:`fnlit.optim` schedules). A float can be
            changed later by assigning ``state.hyperparams["learning_rate"]``; with a schedule, the schedule wins: an
            assignment is overwritten at the next update (for a plateau-style drop use a float rate and assign it, or
            :func:`join`).
        momentum: momentum factor (0 disables it and the buffer).
        nesterov: Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0``.
        weight_decay: L2 penalty added to the gradient (a tensor in ``state.hyperparams``). The Python
            number 0 (the default) turns decay off entirely, and ``state.hyperparams["weight_decay"]``
            is then ignored; pass ``torch.tensor(0.0)`` to keep it adjustable.
        dampening: dampening for momentum.

    Raises:
        TypeError: for an argument of the wrong type (a rate that is not a float, 0-d tensor or schedule;
            a momentum, dampening or weight decay that is not a number, a ``nesterov`` that is not a bool); at
            ``init`` for a schedule that does not return a 0-d tensor.
        ValueError: for a negative or infinite learning rate, momentum or weight decay, or Nesterov without momentum;
            at ``init`` for a learning rate or weight decay beyond the range of float32 (float64 for a float64 model),
            which it is held in; at update time for a state its ``init`` did not make (another optimizer's, or with
            momentum one made without), or a ``state.hyperparams`` key other than those two.

    Example:
        >>> import torch
        >>> from fnlit.optim import step
        >>> tx = sgd(0.1, momentum=0.9)
        >>> params = {"w": torch.ones(2)}
        >>> state = tx.init(params)
        >>> params, state = step(tx, {"w": torch.ones(2)}, state, params)
        >>> params
        {'w': tensor([0.9000, 0.9000])}
    """
    check_rate("sgd", learning_rate)
    check_number("sgd", "momentum", momentum)
    check_number("sgd", "weight_decay", weight_decay, tensor=True)
    check_number("sgd", "dampening", dampening)
    nesterov = check_flag("sgd", "nesterov", nesterov)  # np.bool_(True) or 1 crashed the fused kernel
    if nesterov and (momentum <= 0 or dampening != 0):
        check_arg("sgd", "momentum > 0 and dampening == 0 with nesterov=True",
                  (momentum, dampening), False, "", "Pass e.g. sgd(lr, momentum=0.9, nesterov=True).")

    def functional(g: Leaves, p: Leaves, bufs: list[Leaves], count: torch.Tensor, lr: torch.Tensor,
                   wd: torch.Tensor | None, params: PyTree) -> tuple[Leaves, list[Leaves]]:
        if wd is not None:
            g = [torch.addcmul(x, q, _rate(wd, q)).to(x.dtype) for x, q in zip(g, p)]
        if momentum == 0:
            return [(q - _rate(lr, q) * x).to(q.dtype) for q, x in zip(p, g)], []
        first = count == 1  # torch starts the buffer at g itself, not (1 - dampening) * g
        buf = [torch.where(first, x, b * momentum + (1 - dampening) * x) for b, x in zip(bufs[0], g)]
        d = [x + momentum * b for x, b in zip(g, buf)] if nesterov else buf
        return [(q - _rate(lr, q) * x).to(q.dtype) for q, x in zip(p, d)], [buf]

    recycler = Recycler()

    @_without_grad
    def fused(g: Leaves, p: Leaves, bufs: list[Leaves], count: torch.Tensor, lr: torch.Tensor,
              wd: torch.Tensor | None, params: PyTree) -> tuple[Leaves, list[Leaves]]:
        if any(type(q) is not torch.Tensor for q in p):  # DTensor (fnlit.shard): torch has no sharding rule for _fused_sgd_
            return functional(g, p, bufs, count, lr, wd, params)
        with torch.no_grad():
            # L2 decay: on the CPU the kernel adds wd * p to the gradient itself (the same bits as the separate
            # addcmul; the gradients are not written), elsewhere a separate pass.
            in_kernel = _kernel_decay(lr, wd, p[0]) if wd is not None else None
            if wd is not None and in_kernel is None:
                g = [torch.addcmul(x, q, wd) for x, q in zip(g, p)]
            # Buffers start at zero: momentum * 0 + g == g, torch's first step, so no special case.
            out = recycler.copies([*p, *bufs[0]] if momentum else p)
            new_p, new_b = out[: len(p)], out[len(p) :]
            for idx in _groups(p):
                torch._fused_sgd_(
                    [new_p[i] for i in idx], [g[i] for i in idx], [new_b[i] for i in idx] if momentum else [],
                    weight_decay=in_kernel or 0.0, momentum=momentum, lr=_kernel_lr(lr, p[idx[0]].device),
                    dampening=0.0, nesterov=nesterov, maximize=False, is_first_step=False,
                )
        return new_p, [new_b] if momentum else []

    use_fused = dampening == 0  # with dampening, torch's first step differs from a zero buffer
    buffers = ("momentum_buffer",) if momentum else ()
    return _optimizer("sgd", SGDState, buffers, learning_rate, weight_decay, fused if use_fused else None, functional)


# ------------------------------------------------------------------------------------- Adam(W)
def _adam(name: str, learning_rate: LearningRate, b1: float, b2: float, eps: float,
          weight_decay: float | torch.Tensor, decoupled: bool, mask: Mask | None) -> GradientTransformation:
    check_rate(name, learning_rate)
    check_beta(name, "b1", b1)
    check_beta(name, "b2", b2)
    check_number(name, "eps", eps)
    check_number(name, "weight_decay", weight_decay, tensor=True)
    check_mask(name, mask)
    cache = MaskCache(name)
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    recycler = Recycler()

    def decay(p: Leaves, params: PyTree) -> list[bool]:
        return [True] * len(p) if mask is None else resolve_mask(mask, params, cache)

    def functional(g: Leaves, p: Leaves, bufs: list[Leaves], count: torch.Tensor, lr: torch.Tensor,
                   wd: torch.Tensor | None, params: PyTree) -> tuple[Leaves, list[Leaves]]:
        if wd is not None and decoupled:
            narrow = _decay_factor(lr, wd)
            wide = _decay_factor(lr, wd, torch.float64) if any(q.dtype is torch.float64 for q in p) else narrow
            p = [(q * (wide if q.dtype is torch.float64 else narrow)).to(q.dtype) if k else q
                 for q, k in zip(p, decay(p, params))]
        elif wd is not None:
            g = [torch.addcmul(x, q, _rate(wd, q)).to(x.dtype) for x, q in zip(g, p)]
        mu = [m.lerp(x, 1 - b1) for m, x in zip(bufs[0], g)]
        nu = [torch.addcmul(v * b2, x, x, value=1 - b2) for v, x in zip(bufs[1], g)]
        t = count.double()  # bias corrections in float64, as the fused kernel and torch.optim do
        # b**t written as exp(t * log b): inductor computes a reused value containing exp once per step,
        # while it inlines pow into every vector iteration of every parameter's update loop (3x slower
        # compiled AdamW on CPU). The two agree to ~1e-16 relative in float64.
        bias64 = (lr.double() / (1 - torch.exp(t * _log(b1))), torch.sqrt(1 - torch.exp(t * _log(b2))))
        # rounded to float32 for float32 params and narrower (their multiply computes in float32); float64 params
        # take the float64 values, as torch.optim's Python floats (rounded, they were ~1e8x further from it)
        bias32 = (bias64[0].float(), bias64[1].float())
        new_p = []
        for q, m, v in zip(p, mu, nu):
            step_size, bc2_sqrt = bias64 if q.dtype is torch.float64 else bias32
            new_p.append((q - step_size * (m / (torch.sqrt(v) / bc2_sqrt + eps))).to(q.dtype))  # (a 0-d q: see _rate)
        return new_p, [mu, nu]

    @_without_grad
    def fused(g: Leaves, p: Leaves, bufs: list[Leaves], count: torch.Tensor, lr: torch.Tensor,
              wd: torch.Tensor | None, params: PyTree) -> tuple[Leaves, list[Leaves]]:
        # On the CPU the kernel applies the weight decay itself: AdamW's decays the params (torch.optim.AdamW's
        # order, decay then the Adam step, in the same pass), Adam's L2 adds wd * p to the gradient (without
        # writing the gradients). Elsewhere AdamW's params are decayed while being copied, and L2 is a pass.
        in_kernel = _kernel_decay(lr, wd, p[0]) if wd is not None else None
        flags = decay(p, params) if in_kernel is not None and decoupled else None
        n = len(p)
        if wd is not None and decoupled and in_kernel is None:
            mu, nu = own(bufs[0]), own(bufs[1])
            # One factor for all (one multi-tensor multiply): float64 when every param is (rare mixes round it)
            dtype = torch.float64 if all(q.dtype is torch.float64 for q in p) else torch.float32
            new_p = own_scaled(p, decay(p, params), _decay_factor(lr, wd, dtype))
        else:
            out = recycler.copies([*p, *bufs[0], *bufs[1]])
            new_p, mu, nu = out[:n], out[n : 2 * n], out[2 * n :]
        if wd is not None and not decoupled and in_kernel is None:
            g = [torch.addcmul(x, q, wd) for x, q in zip(g, p)]
        steps = count.float()  # the kernel only reads it (.float(): half the cost of .to(torch.float32))
        for idx in _groups(p, flags):
            pick = (lambda xs: xs) if len(idx) == n else (lambda xs: [xs[i] for i in idx])  # noqa: E731
            dev = p[idx[0]].device
            kernel(pick(new_p), pick(g), pick(mu), pick(nu), [], [steps.to(dev)] * len(idx),
                   lr=_kernel_lr(lr, dev), beta1=b1, beta2=b2, eps=eps, amsgrad=False, maximize=False,
                   weight_decay=0.0 if in_kernel is None or (flags is not None and not flags[idx[0]]) else in_kernel)
        return new_p, [mu, nu]

    # torch.optim.Adam(W) refuses sparse gradients ("please consider SparseAdam"): its moments would be the dense ones
    tx = _optimizer(name, AdamState, ("mu", "nu"), learning_rate, weight_decay, fused, functional,
                    sparse=" (as torch.optim.Adam and AdamW do not)")
    if mask is None:
        return tx

    def init(params: PyTree) -> AdamState:
        resolve_mask(mask, params, cache)  # in eager mode, where a compiled step finds it (see MaskCache)
        return tx.init(params)

    return tx._replace(init=init)


def adam(
    learning_rate: LearningRate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float | torch.Tensor = 0.0,
) -> GradientTransformation:
    """Adam with ``torch.optim.Adam`` semantics (``weight_decay`` is L2: added to the gradient).

    Args:
        learning_rate: a float, or a schedule ``count -> lr``. With a schedule, the schedule wins: a rate assigned
            to ``state.hyperparams["learning_rate"]`` is overwritten at the next update (for a plateau-style drop use
            a float rate and assign it, or :func:`join`).
        b1: decay rate of the first moment.
        b2: decay rate of the second moment.
        eps: added to the denominator.
        weight_decay: L2 penalty coefficient (a tensor in ``state.hyperparams``). The Python number 0
            (the default) turns decay off entirely, and ``state.hyperparams["weight_decay"]`` is then
            ignored; pass ``torch.tensor(0.0)`` to keep it adjustable.

    Raises:
        TypeError: for an argument of the wrong type (e.g. a string eps, or the betas as a tuple); at
            ``init`` for a schedule that does not return a 0-d tensor.
        ValueError: for a negative or infinite learning rate/eps/weight decay or betas outside [0, 1); at ``init``
            for a learning rate or weight decay beyond float32's range (float64's for a float64 model); at update time
            for a ``state.hyperparams`` key other than those two, a sparse gradient
            (``nn.Embedding(..., sparse=True)``), which torch.optim.Adam refuses too, or a state
            its ``init`` did not make (another optimizer's).

    Example:
        >>> import torch
        >>> from fnlit.optim import step
        >>> tx = adam(0.1)
        >>> params = {"w": torch.zeros(2)}
        >>> params, state = step(tx, {"w": torch.tensor([1.0, -1.0])}, tx.init(params), params)
        >>> params
        {'w': tensor([-0.1000,  0.1000])}
    """
    return _adam("adam", learning_rate, b1, b2, eps, weight_decay, decoupled=False, mask=None)


def adamw(
    learning_rate: LearningRate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float | torch.Tensor = 1e-2,
    mask: Mask | None = None,
) -> GradientTransformation:
    """AdamW with ``torch.optim.AdamW`` semantics: decoupled decay ``p *= 1 - lr * wd``, then Adam.

    Args:
        learning_rate: a float, or a schedule ``count -> lr``. With a schedule, the schedule wins: a rate assigned
            to ``state.hyperparams["learning_rate"]`` is overwritten at the next update (for a plateau-style drop use
            a float rate and assign it, or :func:`join`).
        b1: decay rate of the first moment.
        b2: decay rate of the second moment.
        eps: added to the denominator.
        weight_decay: decoupled decay (a tensor in ``state.hyperparams``). The Python number 0 turns
            decay off entirely, and ``state.hyperparams["weight_decay"]`` is then ignored; pass
            ``torch.tensor(0.0)`` to keep it adjustable.
        mask: which params decay: a pytree of bools, ``params -> pytree of bools`` (e.g.
            :func:`fnlit.optim.decay_mask`, no decay on biases and norm weights), or ``name -> bool``.

    Raises:
        TypeError: for an argument of the wrong type (e.g. a string weight decay, a mask that is neither
            a pytree of bools nor a callable); at ``init`` for a schedule that does not return a 0-d tensor.
        ValueError: for a negative or infinite learning rate/eps/weight decay or betas outside [0, 1); at ``init``
            for a learning rate or weight decay beyond float32's range (float64's for a float64 model); at update time
            for a ``state.hyperparams`` key other than those two, a sparse gradient
            (``nn.Embedding(..., sparse=True)``), which torch.optim.AdamW refuses too, or a state
            its ``init`` did not make (another optimizer's).

    Example:
        >>> import torch
        >>> from fnlit.optim import decay_mask, step
        >>> tx = adamw(1e-3, weight_decay=0.1, mask=decay_mask)
        >>> params = {"fc.weight": torch.ones(2, 2), "fc.bias": torch.ones(2)}
        >>> grads = {"fc.weight": torch.ones(2, 2), "fc.bias": torch.ones(2)}
        >>> params, state = step(tx, grads, tx.init(params), params)
        >>> int(state.count)
        1
    """
    return _adam("adamw", learning_rate, b1, b2, eps, weight_decay, decoupled=True, mask=mask)


def learning_rate(opt_state: Any) -> torch.Tensor | None:
    """The current learning rate found anywhere in ``opt_state`` (chained, masked...), or None.

    It is ``hyperparams["learning_rate"]`` of the first state that has one: for a float rate, the
    rate in use; for a schedule, the rate of the most recent step (``schedule(0)`` before any).

    Example:
        >>> import torch
        >>> from fnlit.optim import chain, clip_by_global_norm
        >>> tx = chain(clip_by_global_norm(1.0), adamw(3e-4))
        >>> learning_rate(tx.init({"w": torch.ones(1)}))
        tensor(0.0003)
    """
    holder = _learning_rate_holder(opt_state)
    return None if holder is None else holder.hyperparams["learning_rate"]


def _learning_rate_holder(opt_state: Any) -> Any:
    """The first state in ``opt_state`` (depth first) with a ``hyperparams["learning_rate"]``, or None."""
    hyper = getattr(opt_state, "hyperparams", None)
    if isinstance(hyper, dict) and "learning_rate" in hyper:
        return opt_state
    if isinstance(opt_state, dict):
        opt_state = list(opt_state.values())
    if isinstance(opt_state, (tuple, list)):
        for s in opt_state:
            if not isinstance(s, torch.Tensor) and (holder := _learning_rate_holder(s)) is not None:
                return holder
    return None
