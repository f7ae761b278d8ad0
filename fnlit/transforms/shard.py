"""``fnlit.shard``: fully sharded training (ZeRO-3 / FSDP style) on torch's DTensor.

:func:`shard_state` turns every parameter, and every optimizer-state tensor shaped like one (Adam's
``mu``/``nu``, SGD's momentum), into a ``torch.distributed.tensor.DTensor`` sharded across the ranks of a
1-d ``DeviceMesh``: each rank holds about 1/N of them. Scalars (step, optimizer count and hyperparameters,
loss scale) and buffers (frozen params too) stay plain tensors, rank 0's on every rank; the RNG key as it is.

Inside :func:`shard`, a training step works as FSDP2 does, with DTensor's own collectives:

* forward: :func:`fnlit.apply` all-gathers each sharded parameter into a full tensor with
  ``redistribute(Replicate()).to_local(grad_placements=[Partial("avg")])``, a *differentiable* gather;
* backward: the gradient of that gather is a reduce-scatter, so ``fnlit.value_and_grad`` returns
  gradients that are already averaged across ranks and sharded like the parameters;
* update: the optimizer runs on the DTensors, so each rank updates only its own shard (element-wise
  ops stay local; ``clip_by_global_norm`` gets the global norm from one all-reduce inside DTensor).

Each rank steps on its own part of the global batch, as with :func:`fnlit.data_parallel`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Placement,
    Replicate,
    Shard,
    distribute_tensor,
)

from .. import tree as _tree
from .._types import Batch, Metrics, Params, StepFn
from ._frame import WITH_ENSEMBLE, _level, frame, require_state, require_step, run_on_rank

if TYPE_CHECKING:
    from ..state import TrainState

__all__ = ["shard", "shard_state", "unshard_state", "is_sharded", "local_nbytes", "gather_params", "placement_for"]

_NOT_INITIALISED = (
    "fnlit.{fn} needs an initialised torch.distributed process group, and there is none. Launch the "
    "script with `torchrun --nproc-per-node N script.py` and call fnlit.distributed.init() first, or run "
    "a function in N local processes with fnlit.distributed.launch(fn, nprocs=N). To use a sharded state "
    "in a single process, convert it with fnlit.unshard_state(state) (before the process group ends)."
)


def _require_group(fn: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(_NOT_INITIALISED.format(fn=fn))


def _check_mesh(mesh: Any, who: str) -> None:
    """Raises unless ``mesh`` is None or a 1-d ``DeviceMesh`` (a string or a 2-d mesh failed deep inside)."""
    if mesh is None:
        return
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(
            f"{who} expected mesh to be a 1-d torch.distributed.device_mesh.DeviceMesh or None, got "
            f"{type(mesh).__name__} {mesh!r} instead. Pass init_device_mesh(device, (world_size,)) or leave mesh=None."
        )
    if mesh.ndim != 1:
        raise ValueError(
            f"{who} expected a 1-d DeviceMesh, got one of shape {tuple(mesh.shape)} instead. "
            "Pass init_device_mesh(device, (world_size,)) or leave mesh=None."
        )


_DEFAULT_MESH: dict[Any, DeviceMesh] = {}


def default_mesh() -> DeviceMesh:
    """A 1-d mesh over the whole world, on the CUDA devices with NCCL, else on the CPU (made once per
    process group: building a mesh is a collective)."""
    _require_group("shard_state")
    group = dist.group.WORLD
    if group not in _DEFAULT_MESH:
        _DEFAULT_MESH.clear()  # a new process group: the old mesh is dead
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        _DEFAULT_MESH[group] = init_device_mesh(device, (dist.get_world_size(),))
    return _DEFAULT_MESH[group]


def placement_for(shape: Sequence[int], world: int) -> Placement:
    """How a tensor of ``shape`` is split over ``world`` ranks: ``Shard(d)`` on its most even dimension.

    Shards follow ``torch.chunk`` (the last ranks may hold fewer rows, or none). The dimension whose
    largest chunk is the smallest fraction of the tensor is chosen, the first such one on ties, so a
    ``(10, 2048)`` output layer on 4 ranks is split along its 2048 columns rather than its 10 rows.
    0-d tensors and tensors with no elements are replicated.

    Example:
        >>> placement_for((2048, 784), 2), placement_for((10, 2048), 4), placement_for((), 4)
        (Shard(dim=0), Shard(dim=1), Replicate())
    """
    best, best_fraction = None, math.inf
    if math.prod(shape) == 0:  # no elements (a (3, 0) weight): nothing to split
        return Replicate()
    for d, n in enumerate(shape):
        if n > 0:
            fraction = math.ceil(n / world) / n
            if fraction < best_fraction - 1e-12:
                best, best_fraction = d, fraction
    return Replicate() if best is None else Shard(best)


def is_sharded(state: TrainState) -> bool:
    """Whether ``state.params`` are DTensors (made by :func:`shard_state`)."""
    return any(isinstance(p, DTensor) for p in _tree.tree_leaves(state.params))


def _distribute(t: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    # Rank 0's values are scattered to every rank (src_data_rank=0), as DDP broadcasts its parameters.
    return distribute_tensor(t.detach(), mesh, [placement_for(t.shape, mesh.size())])


def shard_state(state: TrainState, mesh: DeviceMesh | None = None) -> TrainState:
    """Shards a state's parameters and parameter-shaped optimizer state across the ranks of ``mesh``.

    Parameters become DTensors split by :func:`placement_for` (rank 0's values are distributed). The
    optimizer-state tensors that ``tx.init`` creates in the parameters' shape (Adam's moments, SGD's
    momentum) get the placement of their parameter; every other leaf (step, optimizer count and
    hyperparameters, loss scale, buffers and frozen params) stays a plain tensor, and takes rank 0's
    values, as DDP broadcasts its parameters and buffers, so every rank holds the same ones (ranks
    seeded apart trained through different frozen weights). ``state.rng`` is left as it is (each rank
    may hold its own). A state already sharded is returned as it is.

    Args:
        state: a plain :class:`fnlit.TrainState` (rank 0's is taken).
        mesh: a 1-d ``DeviceMesh`` (default: all ranks of the default process group).

    Raises:
        TypeError: for a ``state`` that is not a :class:`fnlit.TrainState` (its params, a tuple of states) or a
            ``mesh`` that is not a ``DeviceMesh``.
        RuntimeError: without an initialised process group (the message says how to launch).
        ValueError: for a mesh that is not 1-d.

    Example:
        >>> # under `torchrun --nproc-per-node 4`:
        >>> state = fnlit.shard_state(fnlit.TrainState.create(model, tx, seed=0))  # doctest: +SKIP
        >>> state.params["0.weight"].to_local().shape  # a quarter of the rows  # doctest: +SKIP
    """
    require_state(state, "fnlit.shard_state")  # (its params or a tuple of states failed with an AttributeError)
    _check_mesh(mesh, "fnlit.shard_state")
    _require_group("shard_state")
    if is_sharded(state):
        return state
    mesh = default_mesh() if mesh is None else mesh
    params = _tree.tree_map(lambda t: _distribute(t, mesh), state.params)
    template = state.tx.init(params)  # which opt-state leaves the optimizer makes in the params' shape
    t_leaves, t_def = _tree.tree_flatten(template)
    o_leaves, o_def = _tree.tree_flatten(state.opt_state)
    if t_def != o_def:
        raise ValueError(
            "fnlit.shard_state: state.opt_state does not have the structure state.tx.init(params) gives: "
            f"{_tree.first_mismatch(template, state.opt_state, check_shapes=False)}. Build the state with "
            "TrainState.create(module, tx, ...) and keep its tx."
        )
    opt = [
        distribute_tensor(o.detach(), mesh, list(t.placements)) if isinstance(t, DTensor) else o
        for t, o in zip(t_leaves, o_leaves)
    ]
    plain = {"buffers": state.buffers, "opt_state": _tree.tree_unflatten(o_def, opt), "step": state.step,
             "scaler": state.scaler}  # fmt: skip  (not rng: each rank may hold its own, as check_same_state allows)
    leaves, treedef = _tree.tree_flatten(plain)
    plain = _tree.tree_unflatten(treedef, _broadcast_plain(leaves, mesh))
    return state.replace(params=params, **plain)


def _broadcast_plain(leaves: list[Any], mesh: DeviceMesh) -> list[Any]:
    """Rank 0's values of the plain tensors among ``leaves`` (new tensors; DTensors and numbers as they are), as DDP
    broadcasts its buffers: their bytes in one broadcast per device, on the mesh's device type."""
    group = mesh.get_group()
    src = dist.get_global_rank(group, 0)
    out = list(leaves)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(leaves):
        if type(t) is torch.Tensor and t.layout is torch.strided:
            by_device.setdefault(t.device, []).append(i)
    for device, idx in sorted(by_device.items(), key=lambda kv: str(kv[0])):  # the same order on every rank
        parts = [leaves[i].detach().contiguous().reshape(-1).view(torch.uint8) for i in idx]
        buf = torch.cat(parts).to(mesh.device_type)
        dist.broadcast(buf, src=src, group=group)
        buf = buf.to(device)
        offset = 0
        for i, part in zip(idx, parts):
            t = leaves[i]
            out[i] = buf[offset : offset + part.numel()].clone().view(t.dtype).view(t.shape)
            offset += part.numel()
    return out


def unshard_state(state: TrainState) -> TrainState:
    """The same state with every DTensor gathered into a plain full tensor (for export or evaluation).

    A collective: every rank must call it. Each rank gets the whole state.

    Example:
        >>> # full = fnlit.unshard_state(state); fnlit.save("model.ckpt", full)
    """
    return _tree.tree_map(lambda t: t.full_tensor() if isinstance(t, DTensor) else t, state)


def local_nbytes(tree: Any) -> int:
    """Bytes of the tensors of ``tree`` held by this rank (a DTensor counts its local shard only).

    Example:
        >>> local_nbytes({"w": torch.zeros(4, 4), "step": torch.zeros((), dtype=torch.int64)})
        72
    """
    total = 0
    for t in _tree.tree_leaves(tree):
        if isinstance(t, DTensor):
            t = t.to_local()
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


# torch 2.14 renamed the single-tensor collectives (the old names warn); torch >= 2.4 has the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _Layout:
    """Where each DTensor's shard sits in one flat buffer per rank, padded to torch.chunk's chunk size.

    DTensor's ``Shard(d)`` follows ``torch.chunk``: rank r holds indices ``[r*c, min((r+1)*c, n))`` of
    dimension d, with ``c = ceil(n / world)``. Padding every shard to c makes the all-gathered buffer,
    seen as (world, *padded shard), the full tensor plus trailing padding along d: FSDP2's copy-in /
    all-gather / copy-out, for all parameters in one collective.
    """

    def __init__(self, tensors: Sequence[DTensor], names: Sequence[str]) -> None:
        self.names = list(names)  # (for the error refusing a sparse gradient)
        self.world = tensors[0].device_mesh.size()
        self.dims = [t.placements[0].dim for t in tensors]  # type: ignore[attr-defined]
        self.shapes = [t.shape for t in tensors]
        self.local_sizes = [t.to_local().shape[d] for t, d in zip(tensors, self.dims)]
        self.padded = [
            s[:d] + (math.ceil(s[d] / self.world),) + s[d + 1 :] for s, d in zip(self.shapes, self.dims)
        ]
        self.numels = [math.prod(p) for p in self.padded]
        self.offsets = [sum(self.numels[:i]) for i in range(len(tensors))]
        self.total = sum(self.numels)

    def slot(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        return flat[self.offsets[i] : self.offsets[i] + self.numels[i]].view(self.padded[i])


class _GatherAll(torch.autograd.Function):
    """All-gathers the local shards of many DTensors in one collective; backward: one reduce-scatter (mean)."""

    @staticmethod
    def forward(ctx: Any, layout: _Layout, group: Any, *shards: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.layout, ctx.group = layout, group
        send = shards[0].new_empty(layout.total)
        for i, t in enumerate(shards):
            slot, d, k = layout.slot(send, i), layout.dims[i], t.shape[layout.dims[i]]
            slot.narrow(d, 0, k).copy_(t)
            slot.narrow(d, k, slot.shape[d] - k).zero_()  # padding of the short last shards
        recv = send.new_empty(layout.world * layout.total)
        _all_gather_single(recv, send, group=group)
        recv = recv.view(layout.world, layout.total)
        out = []
        for i, d in enumerate(layout.dims):
            chunk = recv[:, layout.offsets[i] : layout.offsets[i] + layout.numels[i]]
            parts = chunk.reshape(layout.world, *layout.padded[i])
            full = parts.movedim(0, d).reshape(layout.padded[i][:d] + (-1,) + layout.padded[i][d + 1 :])
            out.append(full.narrow(d, 0, layout.shapes[i][d]).contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        layout: _Layout = ctx.layout
        from ..optim._base import refuse_sparse  # nn.Embedding(sparse=True)'s: refused, as data_parallel refuses it

        refuse_sparse("fnlit.shard", list(grads), dict(zip(layout.names, grads)),
                      " (it reduce-scatters them as dense shards)", ": the reduce-scatter sends the same values")
        send = grads[0].new_empty(layout.world, layout.total)
        for i, (g, d) in enumerate(zip(grads, layout.dims)):
            shape, c = layout.padded[i], layout.padded[i][d]
            padded = g
            if g.shape[d] != layout.world * c:  # uneven: pad the last chunks (copy) to c
                padded = g.new_zeros(shape[:d] + (layout.world * c,) + shape[d + 1 :])
                padded.narrow(d, 0, g.shape[d]).copy_(g)
            by_rank = padded.reshape(shape[:d] + (layout.world, c) + shape[d + 1 :]).movedim(d, 0)
            chunk = send[:, layout.offsets[i] : layout.offsets[i] + layout.numels[i]]
            chunk.view((layout.world, *shape)).copy_(by_rank)
        out = send.new_empty(layout.total)
        _reduce_scatter_single(out, send.view(-1), group=ctx.group)
        out.div_(layout.world)  # the mean over ranks: each rank's loss is the mean over its part of the batch
        # contiguous: the fused optimizer kernels expect gradients laid out like their parameters
        local = [
            layout.slot(out, i).narrow(d, 0, k).contiguous()
            for i, (d, k) in enumerate(zip(layout.dims, layout.local_sizes))
        ]
        return (None, None, *local)


def gather_params(params: Params) -> Params:
    """Full tensors for the DTensors of ``params``, by a differentiable all-gather.

    The sharded (``Shard(d)``) parameters of one dtype travel in a single all-gather, whose gradient
    is a single reduce-scatter averaging across ranks; the gradients of the DTensors come back sharded
    like them. Other DTensors use DTensor's own ``redistribute(Replicate())``, whose gradient is
    ``Partial("avg")``. :func:`fnlit.apply` calls this for DTensor parameters.
    """
    out = dict(params)
    groups: dict[tuple[Any, torch.dtype], list[str]] = {}
    for name, p in params.items():
        if not isinstance(p, DTensor):
            continue
        if len(p.placements) == 1 and isinstance(p.placements[0], Shard):
            groups.setdefault((p.device_mesh, p.dtype), []).append(name)
        else:
            out[name] = p.redistribute(p.device_mesh, [Replicate()]).to_local(grad_placements=[Partial("avg")])
    for (mesh, _), names in groups.items():
        tensors = [params[n] for n in names]
        full = _GatherAll.apply(_Layout(tensors, names), mesh.get_group(), *[t.to_local() for t in tensors])
        out.update(zip(names, full))
    return out


def match_placements(grads: list[Any], inputs: Sequence[Any]) -> list[Any]:
    """Gradients laid out like the DTensors they belong to (a replicated 0-d parameter's gradient comes
    back ``Partial``: it is all-reduced here)."""
    out = list(grads)
    for i, (g, p) in enumerate(zip(grads, inputs)):
        if isinstance(g, DTensor) and isinstance(p, DTensor) and g.placements != p.placements:
            out[i] = g.redistribute(p.device_mesh, p.placements)
    return out


def local_views(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each rank's local shard of the DTensors (views: writing them writes the DTensor), others as they are."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def _mesh_of(state: TrainState) -> DeviceMesh | None:
    for p in _tree.tree_leaves(state.params):
        if isinstance(p, DTensor):
            return p.device_mesh
    return None


def shard(step: StepFn, mesh: DeviceMesh | None = None) -> StepFn:
    """Fully sharded training: params, gradients and optimizer state split across the ranks.

    Each rank runs ``step`` on its own part of the global batch. The state lives sharded (see
    :func:`shard_state`; a state that is not sharded yet is sharded on the first call, so
    ``fnlit.fit(fnlit.shard(step), state, ...)`` works); :func:`fnlit.apply` gathers the parameters for
    the forward, the backward reduce-scatters the gradients (their mean over ranks), and the optimizer
    updates each rank's shard. The result equals a single process stepping on the global batch when the ranks'
    batches are of one size; otherwise each rank's mean loss counts alike (the mean of the ranks' gradients, as
    with DDP and :func:`fnlit.data_parallel`): an example weighs more on a rank that holds fewer.
    Metrics are averaged across ranks (one small all-reduce), and so are the buffers a step updates
    (BatchNorm's running statistics, which each rank computes on its own part of the batch), so every
    rank keeps the same buffers. Each rank draws its own dropout masks (its key is folded with its
    rank); ``state.rng`` stays the same on all ranks.

    Composes with :func:`fnlit.accumulate` (the gradients accumulate sharded; every micro-batch gathers
    the parameters and reduce-scatters its gradients, as FSDP does without ``no_sync``) and
    :func:`fnlit.amp` (autocast runs over the gathered parameters; with float16, an overflow on any rank
    skips the step on every rank). It does not combine with :func:`fnlit.data_parallel` (use one mesh
    over all ranks), :func:`fnlit.ensemble` or :func:`fnlit.compile`. A loss that reads the params outside
    :func:`fnlit.apply` (an L2 penalty) sees each rank's shards: read them as ``p.full_tensor()`` there.
    A sparse gradient (``nn.Embedding(..., sparse=True)``) is refused, as :func:`fnlit.data_parallel` refuses it:
    the reduce-scatter sends dense shards, so build the module with dense gradients.

    Args:
        step: a step function using :func:`fnlit.value_and_grad` and ``state.apply_gradients``.
        mesh: a 1-d ``DeviceMesh`` (default: every rank of the default process group).

    Raises:
        TypeError: for a ``mesh`` that is not a ``DeviceMesh`` (at once), or a state that is not a
            :class:`fnlit.TrainState`.
        RuntimeError: when called without an initialised process group (it says how to launch).
        ValueError: for a mesh that is not 1-d (at once), when the state is sharded on another mesh, inside
            fnlit.data_parallel or fnlit.ensemble, or when the loss reads the sharded params directly (it says how
            to read them whole), or for a sparse gradient (naming its parameter).

    Example:
        >>> # in a script started by `torchrun --nproc-per-node 4 train.py`:
        >>> fnlit.distributed.init()  # doctest: +SKIP
        >>> state = fnlit.shard_state(fnlit.TrainState.create(model, fnlit.optim.adamw(1e-3), seed=0))  # doctest: +SKIP
        >>> step = fnlit.shard(fnlit.amp(fnlit.train_step(model, loss_fn)))  # doctest: +SKIP
        >>> state, metrics = step(state, local_batch)  # doctest: +SKIP
    """
    require_step(step, "fnlit.shard")
    _check_mesh(mesh, "fnlit.shard")
    meshes: list[DeviceMesh] = [] if mesh is None else [mesh]

    def shard_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        require_state(state, "fnlit.shard")
        if torch.compiler.is_compiling():
            raise NotImplementedError(
                "fnlit.shard does not run under fnlit.compile / torch.compile yet (its collectives and DTensors "
                "are not traced). Run fnlit.shard(step) uncompiled."
            )
        _require_group("shard")
        if _level() is not None:  # under vmap: fnlit.ensemble(shard(step))
            raise ValueError(WITH_ENSEMBLE.format(who="fnlit.shard"))
        if not meshes:
            meshes.append(_mesh_of(state) or default_mesh())
        m = meshes[0]
        if not is_sharded(state):
            state = shard_state(state, m)
        elif _mesh_of(state) != m:
            raise ValueError(
                f"fnlit.shard got a state sharded on {_mesh_of(state)}, but shard(step, mesh={m}) was asked for. "
                "Shard the state on the same mesh: fnlit.shard_state(state, mesh)."
            )
        with frame() as (f, outermost):
            if f.dp_group is not None:
                raise ValueError(_WITH_DATA_PARALLEL)
            f.shard_group, f.level = m.get_group(), _level()
            return run_on_rank(step, state, batch, m.get_local_rank(), f, outermost)

    shard_step.__wrapped__ = step  # type: ignore[attr-defined]
    shard_step.collective = "fnlit.shard"  # type: ignore[attr-defined]  # (fnlit.ensemble refuses it)
    return shard_step


_WITH_DATA_PARALLEL = (
    "fnlit.shard and fnlit.data_parallel cannot be combined: shard already averages the gradients "
    "across its ranks. Use fnlit.shard(step) alone over all ranks (or fnlit.data_parallel alone)."
)
