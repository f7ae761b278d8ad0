"""``fnlit.data_parallel``: each rank steps on its shard; gradients averaged once per applied update."""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .. import _storage
from .. import tree as _tree
from ..distributed import _all_equal, _extremes
from .._checkpoint_io import _dtensor_class
from ..tree import is_real
from .._types import Batch, Metrics, StepFn
from ._frame import WITH_ENSEMBLE, _level, frame, require_state, require_step, run_on_rank

if TYPE_CHECKING:
    from ..state import TrainState

__all__ = ["data_parallel", "all_reduce_mean_"]

_NOT_A_MEMBER = (
    "{who}: this rank (global rank {rank}) is not in the process group it was given, so it would average its "
    "gradients with no one (torch's world size of such a group is -1). Call the step only on the group's ranks "
    "(`if dist.get_rank(group) >= 0: ...`), or pass a group that holds every rank that runs it."
)

_NOT_INITIALISED = (
    "fnlit.data_parallel needs an initialised torch.distributed process group, and there is none. Launch "
    "the script with `torchrun --nproc-per-node N script.py` and call fnlit.distributed.init() first, or "
    "run a function in N local processes with fnlit.distributed.launch(fn, nprocs=N)."
)


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Groups tensor indices by (dtype, device), then cuts each group into buckets of about bucket_bytes."""
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    out: list[list[int]] = []
    for idx in groups.values():
        bucket: list[int] = []
        size = 0
        for i in idx:
            bucket.append(i)
            size += tensors[i].numel() * tensors[i].element_size()
            if bucket_bytes and size >= bucket_bytes:
                out.append(bucket)
                bucket, size = [], 0
        if bucket:
            out.append(bucket)
    return out


# CPU: one flat buffer per bucket layout, reused from step to step while nothing else holds it (as DDP
# keeps its buckets). A fresh buffer page-faults as the all-reduce writes into it (glibc hands big blocks
# back to the OS): on 2 gloo ranks a 7.4 MB all-reduce took 6.8 ms into a fresh buffer, 4.9 ms into a
# reused one.
# The same tensor object is handed out each time, reused when fnlit._storage.alone says nothing else uses its
# storage. Handing out a new tensor on the kept storage instead (and checking it with fnlit._storage.unheld) left the storage looking held after some all-reduces -- the
# reuse test failed in 4 of 12 runs, likely gloo releasing its tensor reference late -- whereas a lingering
# reference to the same tensor does not count here.
# At most _MAX_BUFFERS layouts are kept, the least recently used dropped first: a process that trains many
# models in turn (a sweep) does not keep a buffer for each.
_BUFFERS: dict[tuple[int, torch.dtype, torch.device, int], torch.Tensor] = {}
_MAX_BUFFERS = 8


def _flat_buffer(slot: int, like: torch.Tensor, numel: int, reuse: bool) -> torch.Tensor:
    key = (slot, like.dtype, like.device, numel)
    buf = _BUFFERS.pop(key, None) if reuse and like.device.type == "cpu" and _storage.AVAILABLE else None
    if buf is None or not _storage.alone(buf):  # a live view of it (a result still held): not reusable
        buf = torch.empty(numel, dtype=like.dtype, device=like.device)
    if reuse and like.device.type == "cpu":
        _BUFFERS[key] = buf  # (re)inserted last: the dict's order is the order of use
        if len(_BUFFERS) > _MAX_BUFFERS:
            del _BUFFERS[next(iter(_BUFFERS))]
    return buf


def all_reduce_mean_(tensors: list[torch.Tensor], group: Any = None, bucket_bytes: int = 0, reuse: bool = False) -> list[torch.Tensor]:
    """Averages ``tensors`` across the ranks of ``group`` with one all-reduce per bucket.

    Tensors are flattened into one contiguous buffer per bucket (``bucket_bytes=0``: one per dtype),
    divided by the world size (as DDP does) and summed; the results are views into those buffers. The
    inputs are not modified. ``reuse``: on the CPU, write into the buffers of an earlier call with the
    same layout when no view of them is alive any more (never while a result is still referenced).
    """
    world = dist.get_world_size(group)
    if world < 1:  # (-1: this rank is not in the group; dividing by it turned descent into ascent)
        raise ValueError(_NOT_A_MEMBER.format(who="fnlit's all-reduce", rank=dist.get_rank()))
    out: list[torch.Tensor] = list(tensors)
    for slot, bucket in enumerate(_buckets(tensors, bucket_bytes)):
        parts = [tensors[i].reshape(-1) for i in bucket]
        flat = _flat_buffer(slot, parts[0], sum(p.numel() for p in parts), reuse)
        torch.cat(parts, out=flat)
        if world & (world - 1) == 0:
            flat.mul_(1.0 / world)  # exact for a power of two; on a CPU a fifth to a third of div_'s time
        else:
            flat.div_(world)
        dist.all_reduce(flat, group=group)
        offset = 0
        for i in bucket:
            n = tensors[i].numel()
            out[i] = flat[offset : offset + n].view_as(tensors[i])
            offset += n
    return out


def all_reduce_metrics(
    metrics: Metrics, group: Any = None, reduced: dict[int, torch.Tensor] | None = None, device: torch.device | None = None
) -> dict[str, Any]:
    """Averages tensor metrics across ranks (elementwise) with at most one all-reduce, in float64: each comes back in
    its own floating dtype (an integer tensor as float32, a number as float64).

    Tensors and numbers anywhere in the metrics (nested dicts, lists, tuples) are averaged, a number as a tensor on
    ``device``: a metric that is a number on one rank and a tensor on another (``sum([])``) must not change how
    many values, or of what dtype, a rank sends (the collectives would pair with the next step's). Other values
    (strings, bools) are left as each rank has them. Scalars found in ``reduced`` (scalars that already travelled
    with the gradients, by identity) are taken from there; the rest share a single collective.

    The collective carries a checksum of the metrics' names (their structure, when nested) too: where the ranks'
    names differ (as many of them: otherwise the collectives mismatch before anything can tell), the values of
    different names would be averaged together. On the CPU every rank whose names differ from the others' raises;
    on an accelerator, which this would make wait, the averaged metrics come back NaN instead.

    Raises:
        ValueError: on the CPU, when the ranks' metric names differ.
    """
    reduced = reduced or {}
    flat = type(metrics) is dict and all(not isinstance(v, (Mapping, list, tuple)) for v in metrics.values())
    if flat:  # the usual {name: scalar}: no tree round trip
        names, leaves = list(metrics), list(metrics.values())
    else:
        leaves, treedef = _tree.tree_flatten(metrics)
    out = list(leaves)
    rest = []
    dtensor = _dtensor_class()
    for i, v in enumerate(leaves):
        if is_real(v):
            leaves[i] = v = torch.full((), float(v), dtype=torch.float64, device=device)  # (a fill: no host copy, no sync)
        if isinstance(v, torch.Tensor):
            r = reduced.get(id(v))
            if r is not None:
                out[i] = r
            else:
                if dtensor is not None and isinstance(v, dtensor):  # (fnlit.shard: a value of the sharded grads or
                    leaves[i] = v.full_tensor()  # params, global or not) averaged as a plain one: a global one stays
                rest.append(i)
    if flat:  # by name, not by the dict's order: ranks may build it in another (a set's order differs per process)
        rest.sort(key=names.__getitem__)
    if rest:
        # float64 on every rank, whatever each rank's metrics are (one rank's float64 tensor beside another's number
        # made float64 and float32 collectives of different sizes); a float64 loss keeps its digits
        # on the collective's device: a metric kept on the CPU (state.step, beside CUDA ones) would fail the stack
        # (to a GPU without waiting for it; to the CPU waiting, as gloo then reads the values)
        dev = device if device is not None else leaves[rest[0]].device
        wait = dev.type != "cuda"
        # The names' CRC-32 times the world size, averaged: the sum of the ranks' CRCs, exact in float64 (integers
        # below 2**53), which equals this rank's sent value only where every rank's names are this rank's.
        world = dist.get_world_size(group)
        names_key = "\0".join(sorted(map(str, names))) if flat else str(treedef)
        check = float(zlib.crc32(names_key.encode()) * world)
        parts = [leaves[i].detach().to(dev, torch.float64, non_blocking=not wait) for i in rest]
        if all(leaves[i].dim() == 0 for i in rest):
            values = torch.stack([*parts, torch.full((), check, dtype=torch.float64, device=dev)])
        else:
            values = torch.cat([*(p.reshape(-1) for p in parts), torch.full((1,), check, dtype=torch.float64, device=dev)])
        (values,) = all_reduce_mean_([values], group)
        if dev.type == "cpu":  # (a read of the CPU result: no device to wait for)
            if not _names_agree(values, check):
                raise ValueError(_NAMES_DIFFER.format(rank=dist.get_rank(group), names=sorted(map(str, names)) if flat else treedef))
        else:  # no wait for the device: the metrics say it
            values = values.masked_fill(values[-1] != check, float("nan"))
        offset = 0
        for i in rest:
            t = leaves[i]
            n = t.numel()
            out[i] = values[offset : offset + n].view(t.shape).to(t.dtype if t.is_floating_point() else torch.float32)
            offset += n
    return dict(zip(names, out)) if flat else _tree.tree_unflatten(treedef, out)


def _names_agree(values: torch.Tensor, check: float) -> bool:
    """Whether the names' checksum that travelled last in ``values`` (a CPU tensor the all-reduce has filled) came
    back as this rank sent it. The one value all_reduce_metrics reads, on the CPU only: fnlit.testing's host-sync
    check allows it (there is no device to wait for), and flags every other read in a step."""
    return values[-1].item() == check


_NAMES_DIFFER = (
    "fnlit.data_parallel: the ranks' steps returned different metric names (this rank, {rank} in the group: {names}), "
    "so values of different names would be averaged together. Return the same names on every rank: per-class "
    "metrics for every class on every rank (a count of 0, not a missing name), and average them yourself where "
    "they need weights."
)


_DIFFERENT_STATES = (
    "fnlit.data_parallel: the ranks start from different states: {what} differ at {path}. Each rank averages its "
    "gradients into its own params, so they would drift apart (DDP broadcasts rank 0's at construction). Start "
    "every rank from the same state: call torch.manual_seed(s) before building the module on every rank (a "
    "per-rank seed for the data goes after TrainState.create), or restore the same checkpoint."
)


_UNCHECKED = (
    "fnlit.data_parallel: nothing checked that the ranks start from the same state (fit checks it for a step "
    "built with fnlit's transforms; it cannot see inside a function of one's own). Call "
    "fnlit.distributed.check_same_state(state) on every rank before the first step: ranks that start apart train "
    "apart, silently."
)


_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # an integer view of each element's bits
_CHUNK = 1 << 20  # elements per pass: the temporaries stay a few int64 chunks (~8 MiB each), whatever the tensor


def _checksums(t: torch.Tensor) -> torch.Tensor:
    """Two int64 checksums of a tensor's bits, on its device: the plain sum of its words (each element's bits as an
    integer of its size) and a sum weighted by a mix of each word's index, so a permutation of the same values (a
    square weight transposed, rows in another order) changes it. Integer arithmetic wraps modulo 2**64 alike in
    any order of additions, on any device: the same tensor gives the same two numbers on every rank."""
    data = t.detach().contiguous().reshape(-1)
    data = data.view(_WORDS[data.element_size()]) if data.element_size() in _WORDS else data.view(torch.uint8)
    plain = torch.zeros((), dtype=torch.int64, device=data.device)
    weighted = torch.zeros((), dtype=torch.int64, device=data.device)
    for start in range(0, data.numel(), _CHUNK):
        x = data[start : start + _CHUNK].to(torch.int64)  # (int64 data: the tensor itself, never written to)
        # each index's weight: the index times 0x9E3779B97F4A7C15, a shift-xor, times 0xBF58476D1CE4E5B9 (as
        # signed int64s), no affine function of the index, so no rearrangement of an arithmetic run goes unseen
        w = torch.arange(start + 1, start + 1 + x.numel(), dtype=torch.int64, device=data.device)
        w.mul_(-7046029254386353131)
        w.bitwise_xor_(w >> 29).mul_(-4658895280553007687)
        plain += x.sum()
        weighted += (x * w).sum()
    return torch.stack([plain, weighted])


def _fingerprints(state: TrainState) -> tuple[list[str], list[int]]:
    """Per leaf of the state's params, buffers, optimizer state, step and scaler: numel, dtype, shape and two
    checksums of its bits (:func:`_checksums`: a plain and a position-weighted sum) -- integers, the same on every
    rank for the same tensors (no float rounding)."""
    tree = {"params": state.params, "buffers": state.buffers, "opt_state": state.opt_state, "step": state.step,
            "scaler": state.scaler}  # fmt: skip  (not rng: it is the same by construction, or each rank's own)
    paths, leaves, _ = _tree.tree_flatten_with_path(tree)
    device = state.device
    out: list[int] = []
    sums: list[torch.Tensor] = []
    for t in leaves:
        if type(t) is not torch.Tensor:  # a number, a DTensor: structure only
            out += [0, 0, 0]
            sums.append(torch.zeros(2, dtype=torch.int64, device=device))
            continue
        shape = 0
        for d in t.shape:
            shape = (shape * 1_000_003 + d) % (1 << 61)
        out += [t.numel(), zlib.crc32(str(t.dtype).encode()), shape]  # (not hash(): salted per process)
        sums.append(_checksums(t).to(device))
    total = torch.stack(sums).cpu().tolist() if sums else []  # one read, outside any step
    values = [x for i in range(len(leaves)) for x in (*out[3 * i : 3 * i + 3], *total[i])]
    return paths, values


def first_difference(state: TrainState, group: Any = None) -> tuple[str, str] | None:
    """Under torch.distributed: what differs first between the ranks' states and where (``("their values",
    "params['bias']")``), the same answer on every rank, or None where they agree (:func:`check_same_state`'s
    two small collectives, each with a host read; not inside a step)."""
    paths, values = _fingerprints(state)
    if not _all_equal(len(values), state.device, group):
        return "their structures (numbers of tensors)", "the state"
    most, least = _extremes(values, state.device, group)
    differ = [i for i in range(len(values)) if most[i] != least[i]]
    if not differ:
        return None
    i = min(differ, key=lambda j: (j % 5 >= 3, j))  # sizes, dtypes and shapes first: they explain differing values
    return ("their sizes", "their dtypes", "their shapes", "their values", "their values")[i % 5], paths[i // 5]


def check_same_state(state: TrainState, group: Any = None) -> None:
    """Raises on every rank when the ranks' states differ: sizes, dtypes, shapes, or values (two integer checksums
    of each tensor's bits, exact, one weighted by position: the same values in another order differ too). Two
    small collectives on the state's device and a read of their result (~0.1 s per 100 MB on one CPU thread): call it
    before training, never inside a step (:func:`fnlit.fit` calls it when it starts a data-parallel run).

    Raises:
        ValueError: naming the first tensor that differs, and how to start every rank alike.
    """
    found = first_difference(state, group)
    if found is not None:
        raise ValueError(_DIFFERENT_STATES.format(what=found[0], path=found[1]))
    first = next(iter(_tree.tree_leaves(state.params)), None)
    if isinstance(first, torch.Tensor):  # a data-parallel step's first call finds it checked (see data_parallel)
        _CHECKED.add(first)


# The first param of each state check_same_state passed, by id, weakly: a data-parallel step whose first state
# was not checked (a loop of one's own, a step fit cannot see inside) warns once, with no collective.
_CHECKED = _storage.Marks()


def _was_checked(state: TrainState) -> bool:
    first = next(iter(_tree.tree_leaves(state.params)), None)
    if not isinstance(first, torch.Tensor):
        return True  # no params: nothing to train apart
    return first in _CHECKED


def data_parallel(step: StepFn, group: Any = None, *, bucket_mb: float = 0.0) -> StepFn:
    """Data-parallel training: each rank runs ``step`` on its own shard of the global batch.

    Gradients are averaged across the ranks of ``group`` once per applied update, flattened into one
    buffer per dtype (or per ``bucket_mb`` bucket) so there is one collective, not one per tensor; under
    :func:`fnlit.accumulate` the intermediate micro-batches do not communicate at all. Metrics are
    averaged across ranks (tensors anywhere in them, elementwise), so every rank must return the same metric
    names: per-class metrics for every class, not only those in its shard. Where the names differ but not their
    number, a CPU step raises and an accelerator's returns its averaged metrics as NaN; a different number of
    them makes the ranks' collectives mismatch (an error, or a hang until the collective timeout). The loss and the
    one-element leaves of :func:`fnlit.value_and_grad`'s aux travel in the gradients' all-reduce (no collective of
    their own), averaged in float32 (float64 beside float64 gradients) and returned as metrics in that dtype: a
    float64 aux of a float32 model, or an integer count beyond 2**24, is averaged to float32's precision (compute it
    outside the aux to have it averaged in float64). Each aux leaf must be of one kind on every rank (a number, a
    one-element tensor, anything else), and a number in the aux comes back from ``value_and_grad`` as a 0-d float64
    tensor (not under :func:`fnlit.accumulate`), so that a number on one rank beside a tensor on another
    (``sum([])``) still sends as many values. The ranks must
    start from the same state:
    :func:`fnlit.fit` checks it when it starts (as DDP checks at construction); a loop of one's own calls
    :func:`fnlit.distributed.check_same_state` once before its first step (the step warns at its first call
    when its state was not checked). Every rank then ends each step with
    bitwise-identical params, and floating-point buffers the step passes to ``apply_gradients(buffers=...)``
    (BatchNorm's running statistics, computed by each rank on its own shard) are averaged across ranks in
    the same collective -- for a running mean, the value one process would compute on the whole batch when the
    ranks' batches are of one size (the mean of the ranks' values otherwise, as the gradients are; DDP broadcasts
    rank 0's instead). Buffers the step changes otherwise -- an integer counter of its own data,
    or anything set with ``replace`` after ``apply_gradients`` -- are each rank's own: compute them from
    averaged values (the metrics, the params) or reduce them yourself, or the ranks drift apart. Each rank
    draws its own dropout masks (its key is folded with its rank, before the micro-batch index under
    :func:`fnlit.accumulate` in either nesting), and all ranks keep the same ``state.rng``.

    The gradients are averaged inside ``state.apply_gradients``: what the step computes from them before it (a
    gradient norm, clipping by hand) sees this rank's gradients only, unlike DDP's ``clip_grad_norm_`` after
    ``backward()``. Clip in the optimizer, ``fnlit.optim.chain(fnlit.optim.clip_by_global_norm(c), ...)``, which
    sees the averaged gradients.

    Args:
        step: a step function using :func:`fnlit.value_and_grad` and ``state.apply_gradients``.
        group: the process group (default: the whole world).
        bucket_mb: split the gradient all-reduce into buckets of this many MiB (0: one per dtype).

    Raises:
        RuntimeError: when called without an initialised process group (it says how to launch).
        ValueError: when called on a rank that is not in ``group``; on the CPU, when the ranks' metric names differ.

    Example:
        >>> # in a script started by `torchrun --nproc-per-node 2 train.py`:
        >>> # fnlit.distributed.init(); step = fnlit.data_parallel(fnlit.train_step(model, loss_fn))
    """
    require_step(step, "fnlit.data_parallel")
    bucket_bytes = int(bucket_mb * 2**20)
    first_call = [True]

    def data_parallel_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        require_state(state, "fnlit.data_parallel")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(_NOT_INITIALISED)
        if _level() is not None:  # under vmap: fnlit.ensemble(data_parallel(step))
            raise ValueError(WITH_ENSEMBLE.format(who="fnlit.data_parallel"))
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError(_NOT_A_MEMBER.format(who="fnlit.data_parallel", rank=dist.get_rank()))
        if first_call[0]:  # (every rank alike: no collective, no read; one rank cannot differ from itself)
            first_call[0] = False
            if dist.get_world_size(group) > 1 and not _was_checked(state):
                warnings.warn(_UNCHECKED, stacklevel=2)
        with frame() as (f, outermost):
            f.dp_group = group if group is not None else dist.group.WORLD
            f.dp_bucket_bytes = bucket_bytes
            return run_on_rank(step, state, batch, rank, f, outermost)

    data_parallel_step.__wrapped__ = step  # type: ignore[attr-defined]
    data_parallel_step.collective = "fnlit.data_parallel"  # type: ignore[attr-defined]  # (fnlit.ensemble refuses it)
    data_parallel_step.group = group  # type: ignore[attr-defined]  # (fit checks the ranks' states in it)
    return data_parallel_step
