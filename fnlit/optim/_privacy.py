"""Differentially private aggregation (DP-SGD): clip each example's gradient, sum, add noise.

The optimizer receives *per-example* gradients (each leaf with a leading batch dimension, e.g. from
:func:`fnlit.per_example_grads`), something only a functional design hands it without hooks into
autograd. Semantics follow optax's ``differentially_private_aggregate``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from .. import random as _random
from ..tree import is_real, tree_flatten, tree_paths, tree_unflatten
from ._base import GradientTransformation, PyTree, raise_wrong_state, refuse_sparse
from ._transforms import check_arg, check_type

__all__ = ["DPAggregateState", "dp_sgd_aggregate"]


class DPAggregateState(NamedTuple):
    """The state of :func:`dp_sgd_aggregate`: the random key of the noise, advanced by every update.

    Example:
        >>> import torch, fnlit
        >>> state = dp_sgd_aggregate(1.0, 1.1, seed=0).init({"w": torch.zeros(2)})
        >>> torch.equal(state.rng, fnlit.random.key(0))  # the seed's key; each update moves it on
        True
    """

    rng: torch.Tensor  # 0-d int64 CPU key (fnlit.random), advanced by every update


def _noise(k: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Standard normal noise shaped as ``like`` (each on its device), drawn from all 64 bits of the key.

    numpy's PCG64, seeded through a SeedSequence with the whole key (a read of host memory: keys live on
    the CPU). torch's CPU generator keeps 32 bits of a seed, so two steps of one run would draw the same
    noise about once per 2**32 pairs of keys: likely over 100k steps, and noise that repeats cancels.

    Every leaf's noise is drawn, leaf after leaf (the numbers one ``standard_normal`` call per leaf gives), into
    one host buffer per device: one copy per device and step, not one per leaf. For a CUDA device that buffer is
    pinned and the copy asynchronous (the pinned allocator keeps the buffer until the copy has run), so the host
    does not wait for the GPU; CPU leaves are views of theirs, with no copy. (The host holds the whole model's
    noise at once: PyTorch's pinned-memory cache keeps such a block, rounded up to a power of two, for reuse.)
    """
    rng = np.random.default_rng(int(k) & ((1 << 64) - 1))
    # complex: real and imaginary parts of variance 1 each, as the clipping's norm counts both parts (the
    # Gaussian mechanism needs the full std on every real coordinate; torch.randn's complex draws 1/2 each)
    shapes = [tuple(s.shape) + ((2,) if s.is_complex() else ()) for s in like]
    dtypes = [torch.float64 if s.dtype.to_real() == torch.float64 else torch.float32 for s in like]
    nbytes = [math.prod(shape) * dtype.itemsize for shape, dtype in zip(shapes, dtypes)]
    size: dict[torch.device, int] = {}
    offsets = []
    for s, n in zip(like, nbytes):  # each leaf at a multiple of 16 bytes of its device's buffer (for .view(dtype))
        offsets.append(size.get(s.device, 0))
        size[s.device] = offsets[-1] + -(-n // 16) * 16
    bufs = {d: torch.empty(n, dtype=torch.uint8, pin_memory=d.type == "cuda") for d, n in size.items()}
    for s, at, n, dtype in zip(like, offsets, nbytes, dtypes):  # in leaf order: the stream of one call per leaf
        npdtype = np.float64 if dtype == torch.float64 else np.float32
        rng.standard_normal(dtype=npdtype, out=bufs[s.device].numpy()[at:at + n].view(npdtype))
    # pinned to CUDA: asynchronous, no host wait; meta: no data moves; another device: one blocking copy
    on = {d: b if d.type == "cpu" else b.to(d, non_blocking=d.type in ("cuda", "meta")) for d, b in bufs.items()}
    out = []
    for s, at, n, shape, dtype in zip(like, offsets, nbytes, shapes, dtypes):
        z = on[s.device][at:at + n].view(dtype).view(shape)
        out.append(torch.view_as_complex(z) if s.is_complex() else z)
    return out


def dp_sgd_aggregate(l2_norm_clip: float, noise_multiplier: float, *, seed: int | None = None) -> GradientTransformation:
    """Aggregates per-example gradients as DP-SGD does (optax's ``differentially_private_aggregate``).

    Each example's gradient (all its leaves together) is clipped to global L2 norm ``l2_norm_clip``,
    the clipped gradients are summed, Gaussian noise of standard deviation
    ``noise_multiplier * l2_norm_clip`` is added to every coordinate, and the result is divided by the
    batch size. Chain it before an optimizer: ``chain(dp_sgd_aggregate(1.0, 1.1, seed=seed), sgd(0.1))``.

    The noise is drawn on the CPU (numpy's PCG64 seeded with all 64 bits of a key in the state, advanced
    every update): deterministic given ``seed``, the same numbers on every device, no repeat within a run in
    practice (torch's CPU generator would keep 32 bits of the key). On a CUDA GPU all leaves' noise goes over in
    one asynchronous copy per step from pinned memory: no device sync (the key lives on the CPU too).
    It is not a cryptographically secure generator: for formal guarantees against an adversary who can
    search seeds, draw the noise from a secure source. It runs eagerly only: not under vmap or torch.compile.

    Args:
        l2_norm_clip: the maximal L2 norm of one example's gradient (> 0).
        noise_multiplier: the noise standard deviation in units of ``l2_norm_clip`` (>= 0; 0 disables noise).
        seed: seed of the noise key; required when ``noise_multiplier > 0`` (as optax requires it). There
            is no default: a default seed is a noise sequence anyone can regenerate and subtract, which
            leaves no privacy. Draw one per run and keep it secret, e.g. ``secrets.randbits(63)``.

    Raises:
        ValueError: for ``l2_norm_clip <= 0`` or ``noise_multiplier < 0``, or either not finite; at update time if the leaves
            have no common leading batch dimension, an empty one (0 examples), or one is sparse
            (``nn.Embedding(..., sparse=True)``'s gradient); when given the params, if a leaf is not
            ``(B, *param.shape)`` (a batch's gradient, of the params' shapes, is refused so).
        TypeError: for an ``l2_norm_clip`` or ``noise_multiplier`` that is not a number or 0-d tensor (a string, a
            bool), for noise without a ``seed``, or a seed that is not an int.
        RuntimeError: if run inside vmap or torch.compile.

    Example:
        >>> import torch, fnlit
        >>> from fnlit.optim import chain, sgd, step
        >>> tx = chain(dp_sgd_aggregate(l2_norm_clip=1.0, noise_multiplier=0.0), sgd(1.0))
        >>> params = {"w": torch.zeros(2)}
        >>> per_example = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}  # norms 5 (clipped to 1) and 0.5
        >>> new_params, _ = step(tx, per_example, tx.init(params), params)
        >>> new_params["w"]  # -(0.2 * [3, 4] + [0.3, 0.4]) / 2
        tensor([-0.4500, -0.6000])
    """
    # A number first ("1" < 0 was Python's TypeError; True passed as 1), as the other transforms take it: a Python or
    # NumPy int or float, or a 0-d real tensor (read here, once). Then finite: an infinite clip or noise made every
    # update inf or NaN.
    for arg, value in (("l2_norm_clip", l2_norm_clip), ("noise_multiplier", noise_multiplier)):
        real = is_real(value) or (isinstance(value, torch.Tensor) and value.ndim == 0 and value.dtype is not torch.bool
                                  and not value.dtype.is_complex)
        check_type("dp_sgd_aggregate", arg, value, real, "a float or a 0-d tensor",
                   "E.g. dp_sgd_aggregate(l2_norm_clip=1.0, noise_multiplier=1.1, seed=...).")
    check_arg("dp_sgd_aggregate", "l2_norm_clip", l2_norm_clip, 0 < l2_norm_clip < math.inf, "> 0 and finite", "Use e.g. 1.0.")
    check_arg("dp_sgd_aggregate", "noise_multiplier", noise_multiplier, 0 <= noise_multiplier < math.inf, ">= 0 and finite")
    std = float(noise_multiplier) * float(l2_norm_clip)
    if seed is None and std > 0:
        raise TypeError(
            f"dp_sgd_aggregate adds noise (noise_multiplier={noise_multiplier!r}) and needs its seed: pass "
            "seed=... . There is no default, because a default seed is a noise sequence anyone can regenerate and "
            "subtract (no privacy). Draw one per run and keep it secret, e.g. seed=secrets.randbits(63)."
        )
    first_key = _random.key(0 if seed is None else seed)  # (no noise: the key is never read)

    def init(params: PyTree) -> DPAggregateState:
        return DPAggregateState(first_key.clone())

    def update(updates: PyTree, state: DPAggregateState, params: PyTree = None) -> tuple[PyTree, DPAggregateState]:
        if not isinstance(state, DPAggregateState):
            raise_wrong_state("dp_sgd_aggregate", DPAggregateState, state)
        leaves, treedef = tree_flatten(updates)
        if not leaves:
            return updates, state
        if _random._is_traced(state.rng) or any(_random._is_traced(g) for g in leaves):
            raise RuntimeError(
                "dp_sgd_aggregate runs eagerly only (its noise comes from a CPU generator seeded from the key); "
                "do not use it inside torch.func.vmap, fnlit.ensemble or torch.compile."
            )
        # (per-example gradients come from vmap, dense: a sparse one is a batch's gradient)
        refuse_sparse("dp_sgd_aggregate", leaves, updates, " (they are a whole batch's gradient, not per example)",
                      " and compute per-example ones with fnlit.per_example_grads(loss_fn, state.params, batch)")
        if params is not None:
            _check_per_example(updates, leaves, treedef, params)
        sizes = {g.shape[0] if g.dim() else None for g in leaves}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                "dp_sgd_aggregate expected per-example gradients (every leaf with the same leading batch "
                f"dimension), got leading sizes {sorted(map(str, sizes))} instead. Compute them with "
                "fnlit.per_example_grads(loss_fn, state.params, batch)."
            )
        b = sizes.pop()
        if b == 0:
            raise ValueError(
                "dp_sgd_aggregate expected per-example gradients of at least one example, got a batch of 0 "
                "(its mean is undefined)."
            )
        # In float32 at least (a bfloat16 leaf's clipping and noise too); each result in its leaf's dtype.
        work = [torch.promote_types(g.dtype, torch.float32) for g in leaves]
        norms = torch.stack([torch.linalg.vector_norm(g.reshape(b, -1), dim=1, dtype=w) for g, w in zip(leaves, work)], 1)
        divisor = torch.clamp(torch.linalg.vector_norm(norms, dim=1) / l2_norm_clip, min=1.0)  # (B,)
        summed = [(g.to(w) / divisor.to(w).reshape((b,) + (1,) * (g.dim() - 1))).sum(0) for g, w in zip(leaves, work)]
        if std > 0:
            noise = _noise(state.rng, summed)
            summed = [s + std * z for s, z in zip(summed, noise)]
        out = [(s / b).to(g.dtype) for s, g in zip(summed, leaves)]
        return tree_unflatten(treedef, out), DPAggregateState(_random.next_key(state.rng))

    return GradientTransformation(init, update)


def _check_per_example(updates: PyTree, leaves: list[torch.Tensor], treedef: Any, params: PyTree) -> None:
    """Refuses gradients whose leaves are not ``(B, *param.shape)``: a batch's gradient (the params' shapes) whose
    leaves happen to share a leading size (``nn.Linear``'s weight and bias: its output rows) would pass the
    batch-size check, its rows taken for examples."""
    param_leaves, structure = tree_flatten(params)
    if structure != treedef:  # another structure: the optimizer after this one names it
        return
    for i, (g, p) in enumerate(zip(leaves, param_leaves)):
        if not isinstance(p, torch.Tensor) or g.shape[1:] == p.shape:
            continue
        path = tree_paths(updates)[i]
        if g.shape == p.shape:
            raise ValueError(
                f"dp_sgd_aggregate expected per-example gradients (each leaf the shape of its param with a leading "
                f"dimension of examples), but {path} has the shape of its param, {tuple(p.shape)}: these look like "
                "one batch's gradients (from fnlit.value_and_grad). Compute per-example ones with "
                "fnlit.per_example_grads(loss_fn, state.params, batch): leaf shapes (B, *param.shape)."
            )
        raise ValueError(
            f"dp_sgd_aggregate expected per-example gradients (each leaf the shape of its param with a leading "
            f"dimension of examples), but {path} has shape {tuple(g.shape)} for a param of shape {tuple(p.shape)}. "
            "Compute them with fnlit.per_example_grads(loss_fn, state.params, batch): leaf shapes (B, *param.shape)."
        )
