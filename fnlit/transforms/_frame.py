"""The per-step context that lets transforms compose over hand-written steps.

Every step goes through two functions: :func:`fnlit.value_and_grad` (forward + backward) and
:meth:`TrainState.apply_gradients` (the update). The outermost transform opens a :class:`Frame` for
the duration of one step; each transform records its setting in it (``amp``: dtype and loss scale;
``accumulate``: k and the micro-batch index; ``data_parallel`` and ``shard``: the process group), and the two
functions read the frame. ``apply_gradients`` always runs the same pipeline -- accumulate, all-reduce
(one collective for the gradients and the overflow flag), unscale check, optimizer, finite select,
loss-scale update -- so the nesting order of the transforms cannot change the result.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch

from .. import tree as _tree
from ..summary import wide_dtype

if TYPE_CHECKING:
    from ..state import TrainState
    from .amp import LossScaleState

_CURRENT: ContextVar[Frame | None] = ContextVar("fnlit_frame", default=None)
# torch.compile cannot trace ContextVar.set(); while tracing, frames live on this plain stack instead
# (dynamo replays list mutations). Tracing is single-threaded, so the ContextVar's isolation is not needed.
_TRACED: list[Frame] = []


_EDITED_GRADS = (
    "Under fnlit.accumulate, the step changed the gradients of its value_and_grad call #{call} in place "
    "in micro-batch {micro} (before apply_gradients), but not in micro-batch 0. Those tensors are the "
    "accumulator (autograd adds every micro-batch's gradient into them), so an in-place change there would "
    "also change the earlier micro-batches' share. Change them out of place (g = g.clamp(-c, c)) or in the "
    "optimizer, which sees the accumulated gradient once per update: e.g. "
    "fnlit.optim.chain(fnlit.optim.clip_by_global_norm(1.0), fnlit.optim.adamw(1e-3))."
)

_CHANGED_GRADS = (
    "Under fnlit.accumulate, apply_gradients expected the gradients of the step's value_and_grad call "
    "#{call} unchanged, as in micro-batch 0 (autograd adds that call's gradients into the accumulator "
    "in place), but micro-batch {micro} applied other tensors. Apply the same call's gradients in every "
    "micro-batch, unchanged; transform gradients in the optimizer, which sees the accumulated gradient "
    "once per update: e.g. fnlit.optim.chain(fnlit.optim.clip_by_global_norm(1.0), fnlit.optim.adamw(1e-3))."
)


_TWO_UPDATES = (
    "Under fnlit.accumulate, the step called apply_gradients twice in one micro-batch (two optimizers, as a "
    "GAN's generator and discriminator). accumulate adds up one update's gradients over the micro-batches; "
    "it cannot tell two apart. Accumulate inside the step instead (sum each model's gradients over your own "
    "micro-batches, then apply each once), or run the step without accumulate."
)


_SKIPPED = (
    "Under fnlit.accumulate, the step called apply_gradients in micro-batch {applied} but not in micro-batch "
    "{skipped} (a conditional skip, say of a loss spike?). accumulate applies one update per batch, the mean of "
    "the micro-batches' gradients: a micro-batch that skips would still count (its gradients are already in the "
    "accumulator), and a last one that skips would drop the whole update. Skip with tensors instead, in every "
    "micro-batch: apply zero gradients where the loss is bad (torch.where(ok, g, 0) for each g; no host sync), "
    "or decide outside accumulate, for the whole batch."
)


_PER_EXAMPLE = (
    "{who} averages the gradients given to apply_gradients across {what}, but these do not have the params' "
    "shapes (the first: {got} against {want}): per-example gradients, as DP-SGD passes them? Averaging "
    "those example by example across {what} is wrong (each example must be clipped on its own, before any "
    "sum), so this is refused. Use one larger batch instead{advice}."
)


_PER_EXAMPLE_FP16 = (
    "Per-example gradients (fnlit.value_and_grad under torch.func.vmap, as fnlit.per_example_grads computes them) "
    "cannot run under fnlit.amp(dtype=torch.float16): the loss scaler's overflow check would have to see every "
    "example's gradients, inside the vmap. Use fnlit.amp(step, dtype=torch.bfloat16), which needs no loss scaling."
)

_PER_EXAMPLE_SHARD = (
    "Per-example gradients (fnlit.value_and_grad under torch.func.vmap, as fnlit.per_example_grads computes them) "
    "cannot run under fnlit.shard: the vmap sees the sharded parameters' local pieces, not the gathered ones. Run "
    "a DP-SGD step in one process, eagerly."
)


WITH_ENSEMBLE = (
    "fnlit.ensemble cannot be combined with {who}, in either nesting: its collectives (the gradient "
    "all-reduce, the parameter all-gather) have no torch.func.vmap rule. Split the members across separate "
    "processes instead, without a process group (each with its own seeds, fnlit.fit, checkpoint folder and "
    "logs), or across ranks in a loop of one's own -- not fnlit.fit or fnlit.evaluate under torch.distributed, "
    "which train data-parallel and add the ranks' metrics -- or train each member with {who} on its own."
)


class Mispredicted(BaseException):
    """Micro-batch 0 guessed the wrong value_and_grad call to accumulate in place; accumulate reruns it.

    A BaseException, like GeneratorExit: it only travels through the user's step back to
    :func:`fnlit.accumulate`, and a step's ``except Exception`` must not swallow it.
    """


def _level() -> int | None:
    """The current torch.func transform level (None outside every transform, and while torch.compile traces)."""
    return None if torch.compiler.is_compiling() else torch._C._functorch.maybe_current_level()


def current() -> Frame | None:
    """The frame of the step being run, or None outside every transform."""
    if torch.compiler.is_compiling():
        return _TRACED[-1] if _TRACED else None
    return _CURRENT.get()


class Frame:
    """Settings of the transforms active in this step, and the gradients accumulated so far."""

    def __init__(self) -> None:
        self.amp_dtype: torch.dtype | None = None
        self.amp_device = "cpu"  # the state's device type: where fnlit.apply autocasts a forward outside value_and_grad
        # Why float16 amp cannot take gradients here (no loss scaler, float16 params), raised by the step's first
        # value_and_grad or apply_gradients: an evaluation step takes none and needs no scaler.
        self.amp_refusal: str | None = None
        self.forwarding = False  # value_and_grad's function runs (its autocast, or the user's own regions inside it)
        self.scaler: LossScaleState | None = None
        self.found_inf: torch.Tensor | None = None  # overflow in the gradients taken since the last update
        self.step_found: torch.Tensor | None = None  # ... in any update of this step so far (the scale's rule)
        self.accum_k = 1
        self.micro = 0
        self.accum_rng: torch.Tensor | None = None  # accumulate's incoming key (micro-batch i's is fold_in(it, i))
        # accumulate: the gradient summed over micro-batches so far, divided by k when k is a power of
        # two (then exact in every float dtype: a backward seeded with 1/k adds the mean directly),
        # else divided once at the end.
        self.acc: list[torch.Tensor] | None = None
        self.divided = True
        self.calls = 0  # value_and_grad calls in this micro-batch
        self.applies = 0  # apply_gradients calls in this micro-batch (accumulate allows one)
        self.skipped = -1  # the first micro-batch that did not call apply_gradients (-1: none so far)
        self.applied_any = False  # whether an earlier micro-batch of this step did
        # micro-batch 0: (sources, grads, the grads' version counters) per call
        self.seen: list[tuple[list[Any], list[torch.Tensor], list[int]]] = []
        self.hint = -1  # the call micro-batch 0 guesses is the applied one (set by accumulate), -1: none
        self.fast_call = -1  # the call whose gradients are applied; it adds into the accumulator in place
        self.fast_sources: list[torch.Tensor] = []  # the tensors it differentiates with respect to
        self.leaves: list[torch.Tensor] | None = None  # its leaves, whose .grad is the accumulator
        self.fast_grads: list[torch.Tensor] | None = None  # what it returned in this micro-batch
        self.fast_versions: list[int] = []  # their version counters then: an in-place change moves them
        self._seed: torch.Tensor | None = None
        self.dp_group: Any = None
        self.dp_bucket_bytes = 0
        self.device: torch.device | None = None  # a data-parallel or sharded step's state's (its metrics' collective)
        self.shard_group: Any = None  # fnlit.shard: gradients arrive reduce-scattered, as DTensors
        self.known: list[torch.Tensor] = []  # losses value_and_grad returned: reduced with the gradients
        self.known_aux: list[torch.Tensor] = []  # and its aux's scalars (note_scalars)
        # The torch.func level float16 amp or shard joined the frame at (fnlit.ensemble vmaps whole steps): gradients
        # batched deeper than this come from a vmap of the step's own (per-example gradients).
        self.level: int | None = None
        self.reduced: dict[int, torch.Tensor] = {}  # id(known scalar) -> its mean across ranks
        self.extra: dict[str, torch.Tensor] = {}

    # -- set by the transforms -------------------------------------------------------------
    def set_amp(self, dtype: torch.dtype, scaler: LossScaleState | None, device: torch.device, refusal: str | None = None) -> tuple:
        """Sets amp's dtype, loss scale and float16 refusal; returns the settings before, for :meth:`reset_amp`."""
        before = (self.amp_dtype, self.amp_device, self.amp_refusal, self.scaler, self.level, self.found_inf)
        self.amp_dtype, self.amp_device, self.amp_refusal = dtype, device.type, refusal
        if scaler is not None and self.scaler is None:
            self.scaler, self.level = scaler, _level()
            self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        return before

    def reset_amp(self, before: tuple) -> None:
        """Puts back the settings :meth:`set_amp` returned (an amp'd eval step called inside a training step: its
        dtype and loss scale end with it, as a torch.autocast region's)."""
        self.amp_dtype, self.amp_device, self.amp_refusal, self.scaler, self.level, self.found_inf = before

    # -- read by value_and_grad --------------------------------------------------------------
    def refuse_per_example(self, args: tuple[Any, ...]) -> None:
        """Under shard: raises if value_and_grad runs under a vmap over the step's batch (its arguments batched).
        (Under float16 amp :meth:`unscale_` refuses it, whichever way the examples arrive.)"""
        level = _level()
        if level is None or (self.level is not None and level <= self.level):
            return
        if any(isinstance(t, torch.Tensor) and self._batched_deeper(t) for t in _tree.tree_leaves(args)):
            raise ValueError(_PER_EXAMPLE_SHARD)
        # else a torch.func.grad of the step's own (a gradient penalty), or an input batched by fnlit.ensemble's vmap

    def _batched_deeper(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is batched by a vmap inside the level amp or shard joined at (fnlit.ensemble's is not)."""
        functorch = torch._C._functorch
        return functorch.is_batchedtensor(t) and functorch.maybe_get_level(t) > (-1 if self.level is None else self.level)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss backpropagated under float16 amp: ``loss * scale``, and under accumulate
        ``(loss / k) * scale`` -- GradScaler's accumulation recipe, so the float16 backward overflows at
        the same scales as it does there (unscale_ multiplies by k / scale to give the true gradient)."""
        if self.scaler is None:
            return loss
        if self.accum_k > 1:
            loss = loss / self.accum_k
        return loss * self.scaler.scale

    def unscale_(self, grads: list[torch.Tensor]) -> None:
        """Unscales fresh gradients in place (they are ours) and records any overflow in found_inf."""
        if self.scaler is None or not grads:
            return
        # GradScaler's exact arithmetic: inv_scale computed in float64, applied in float32 (times k under
        # accumulate, whose backward ran on loss / k: exact for a power of two).
        inv_scale = self.scaler.scale.double().reciprocal()
        if self.accum_k > 1:
            inv_scale = inv_scale * self.accum_k
        inv_scale = inv_scale.float()
        if self.shard_group is not None:
            from .shard import local_views

            torch._amp_foreach_non_finite_check_and_unscale_(local_views(grads), self.found_inf, inv_scale)  # each rank its shard
        elif (
            torch.compiler.is_compiling()  # (dynamo cannot trace the functorch query; traced, out of place serves alike)
            or torch._C._functorch.maybe_current_level() is not None or any(g.requires_grad for g in grads)
        ):
            # Gradients that are differentiated further (a gradient penalty) or batched (fnlit.ensemble's vmap):
            # the in-place kernel is invisible to autograd (the penalty's gradient came out `scale` times too
            # large) and has no batching rule. The same arithmetic out of place; under vmap each member gets
            # its own overflow flag.
            # A sparse gradient (nn.Embedding(sparse=True)) is checked by its values, as GradScaler checks it, and
            # multiplied whole: it stays sparse, and differentiable (its _values() are not).
            bad = torch.stack(
                [~torch.isfinite(g.detach() if g.layout is torch.strided else g.detach()._values()).all() for g in grads]
            ).any().float()
            if not torch.compiler.is_compiling() and self._batched_deeper(bad):  # per-example gradients (a vmap of the step's own, data in a closure)
                raise ValueError(_PER_EXAMPLE_FP16)
            self.found_inf = torch.maximum(self.found_inf, bad)
            grads[:] = [(g * inv_scale).to(g.dtype) for g in grads]  # a 0-d half gradient stays half, as in place
        else:  # a sparse gradient (nn.Embedding(sparse=True)): its values, as GradScaler unscales them
            torch._amp_foreach_non_finite_check_and_unscale_(
                [g if g.layout is torch.strided else g._values() for g in grads], self.found_inf, inv_scale
            )

    def note_scalars(self, value: Any, has_aux: bool) -> Any:
        """Under data_parallel, remembers the loss value_and_grad returns and the one-element leaves of its aux;
        returns ``value``, with the aux's numbers as 0-d tensors.

        They travel in the gradient all-reduce, so metrics made of them need no collective of their own (one would
        cost ~25 % of a small model's step on gloo). Every rank must send as many riders, so which aux leaves ride
        depends on each leaf's kind, which must agree across ranks: a tensor of one element and a real dtype (not
        complex) rides, and so does a Python or NumPy number, as a 0-d float64 tensor (float32 on MPS) that
        replaces it in the aux (``sum([])`` over an empty selection is the int 0 on one rank and a tensor on
        another: as a number it stayed home and the buffers differed in size, a hang). A None on one rank and a
        tensor on another, or a number beside a tensor of several elements, still mismatch. The aux's riders are
        averaged in float32 (float64 beside float64 gradients: the same collective as float32 or float64 gradients)
        and come back in that dtype on every rank: a float64 aux of a float32 model, or an integer count beyond
        2**24, is averaged to float32's precision. The loss rides in its own dtype; a float64 one only beside
        float64 gradients (all_reduce_metrics averages it in float64 otherwise). Not under accumulate: there the
        metrics are micro-batch averages, reduced once at the end.
        """
        if self.dp_group is None or self.accum_k != 1:
            return value
        if not has_aux:
            self.known.append(value)
            return value
        loss, aux = value
        self.known.append(loss)
        leaves, treedef = _tree.tree_flatten(aux)
        numbers = False
        for i, t in enumerate(leaves):
            if _tree.is_real(t):
                leaves[i] = t = torch.full((), float(t), dtype=wide_dtype(loss.device), device=loss.device)  # (a fill)
                numbers = True
            if isinstance(t, torch.Tensor) and t.numel() == 1 and not t.is_complex():
                self.known_aux.append(t)
        return (loss, _tree.tree_unflatten(treedef, leaves)) if numbers else value

    # -- accumulate: read by value_and_grad ----------------------------------------------------
    def start_micro(self, i: int) -> None:
        if i == 0:
            k = self.accum_k
            self.divided = k & (k - 1) == 0
            self.skipped, self.applied_any = -1, False
        elif self.applies:  # (the previous micro-batch's count)
            self.applied_any = True
        elif self.skipped < 0:
            self.skipped = self.micro
        self.micro, self.calls, self.applies, self.fast_grads = i, 0, 0, None

    def check_applied(self) -> None:
        """After the last micro-batch: every micro-batch applied gradients, or none did."""
        if not self.applies and self.applied_any:  # (one that applied after a skip has raised already: 0 applied)
            raise ValueError(_SKIPPED.format(skipped=self.skipped if self.skipped >= 0 else self.micro, applied=0))

    def begin_call(self, sources: list[Any]) -> list[torch.Tensor] | None:
        """For each value_and_grad call under accumulate: the leaves to differentiate with, or None.

        The call whose gradients the step applies (the same call of each micro-batch, with respect to
        the very same tensors) reuses one set of leaves whose ``.grad`` is the accumulator, so autograd
        adds into it in place, as ``.backward()`` does for nn.Parameters. Which call that is, micro-batch
        0 learns from the previous step (``hint``; call 0 before the first); a wrong guess is found when
        micro-batch 0 applies other tensors, and the accumulate transform runs that micro-batch again
        without guessing (:class:`Mispredicted`). Every other call returns its own gradient.
        """
        index = self.calls
        self.calls += 1
        if self.fast_grads is not None:  # this micro-batch's in-place call has run
            return None
        if self.micro == 0:
            if index != self.hint or not self._in_place_ok(sources):
                return None
            self.fast_call, self.fast_sources = index, sources
            self.leaves = [t.detach().requires_grad_() for t in sources]
            return self.leaves
        if index != self.fast_call:
            return None
        known = self.fast_sources
        if len(sources) != len(known):
            return None
        for a, b in zip(sources, known):
            if a is not b:
                return None
        if self.leaves is None:
            assert self.acc is not None
            self.leaves = [t.detach().requires_grad_() for t in sources]
            for leaf, a in zip(self.leaves, self.acc):
                leaf.grad = a
        return self.leaves

    def forget_guess(self) -> None:
        """After :class:`Mispredicted`: micro-batch 0 runs again, learning the applied call as it goes."""
        self.hint, self.fast_call, self.fast_sources = -1, -1, []
        self.acc = self.leaves = self.fast_grads = None
        self.seen = []

    def backward_seed(self, target: torch.Tensor) -> torch.Tensor | None:
        """What the in-place call backpropagates from the loss: 1/k (a plain loop's ``(loss / k).backward()``)."""
        if not self.divided:
            return None  # 1/k is not exact: the sum is divided at the end instead
        seed = self._seed
        if seed is None or seed.dtype != target.dtype or seed.device != target.device or seed.shape != target.shape:
            seed = self._seed = torch.full_like(target, 1.0 / self.accum_k)
        return seed

    def end_call(self) -> list[torch.Tensor]:
        """The in-place call's gradients: the accumulator (zeros where the loss does not reach)."""
        leaves = self.leaves
        assert leaves is not None
        grads, versions, reached = [], [], False
        for leaf in leaves:
            g = leaf.grad
            if g is None:
                g = leaf.grad = torch.zeros_like(leaf)
            else:
                reached = True
            grads.append(g)
            versions.append(g._version)
        if self.micro == 0 and leaves and not reached:  # later micro-batches' grads are the accumulator
            from ..functional import _UNREACHED

            raise RuntimeError(_UNREACHED.format(how="its graph reaches none of them"))
        self.fast_grads, self.fast_versions = grads, versions
        return grads

    def record(self, sources: list[Any], grads: list[torch.Tensor]) -> None:
        """Micro-batch 0: remembers each call's sources and gradients, to find the applied one."""
        if self.micro == 0 and self.accum_k > 1:
            self.seen.append((sources, grads, [g._version for g in grads]))

    def _in_place_ok(self, sources: list[Any]) -> bool:
        """Whether a call on ``sources`` may add into the accumulator in place: plain tensors, and no loss
        scaling (gradients are unscaled per micro-batch) or sharding (they arrive reduce-scattered)."""
        return self.scaler is None and self.shard_group is None and all(type(t) is torch.Tensor for t in sources)

    def _plan(self, applied: list[torch.Tensor]) -> bool:
        """Micro-batch 0's update: picks the call whose fresh gradients these are; True if one is."""
        seen, self.seen = self.seen, []
        for i, (sources, grads, versions) in enumerate(seen):
            if len(grads) == len(applied) and all(a is b for a, b in zip(grads, applied)):
                # Changed in place by the step since (hand clipping)? Then they cannot be the accumulator.
                edited = [g._version for g in grads] != versions
                if not edited and self._in_place_ok(sources) and all(
                    s.shape == g.shape and s.dtype == g.dtype and s.device == g.device for s, g in zip(sources, grads)
                ):
                    self.fast_call, self.fast_sources = i, sources
                return True
        return False

    def _accumulate(self, leaves: list[torch.Tensor]) -> None:
        """Adds gradients that autograd did not add in place into the accumulator."""
        k, traced = self.accum_k, torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None
        # value_and_grad's fresh gradients, scaled and summed into in place: only where they are the accumulator
        # the step sees anyway (the in-place path's); unscaled (float16 amp) or reduce-scattered (shard) per
        # micro-batch, they are the step's own.
        ours = (
            not traced and self.micro == 0 and self._plan(leaves) and self.scaler is None and self.shard_group is None
            and all(g.is_contiguous() for g in leaves)
        )
        if self.divided:
            if traced:
                leaves = [g * (1.0 / k) for g in leaves]
            elif ours:  # value_and_grad's fresh gradients, going nowhere else: scaled in place
                torch._foreach_mul_(leaves, 1.0 / k)
            else:
                leaves = torch._foreach_mul(leaves, 1.0 / k)
        if self.acc is None:
            self.acc = leaves if ours or self.divided or traced else [g.clone() for g in leaves]
        elif traced:
            self.acc = [a + g for a, g in zip(self.acc, leaves)]
        else:
            torch._foreach_add_(self.acc, leaves)

    # -- the update pipeline -----------------------------------------------------------------
    def apply_gradients(self, state: TrainState, grads: Any, changes: dict[str, Any]) -> TrainState:
        if self.amp_refusal is not None:
            raise ValueError(self.amp_refusal)
        grads = state.check_grads(grads)
        keys = _tree._same_flat_dicts(grads) if torch.compiler.is_compiling() else None
        if keys is not None:  # (dynamo runs optree's flatten and unflatten node by node)
            leaves = [grads[k] for k in keys]
            unflatten = functools.partial(_tree._flat_dict_of, keys, like=grads)
        else:
            leaves, treedef = _tree.tree_flatten(grads)
            unflatten = functools.partial(_tree.tree_unflatten, treedef)
        if self.accum_k == 1 and self.dp_group is not None and leaves:
            _refuse_per_example(self, state, grads, leaves)
        if self.accum_k > 1:
            self.applies += 1
            if self.applies > 1:
                raise ValueError(_TWO_UPDATES)
            if self.skipped >= 0:
                raise ValueError(_SKIPPED.format(skipped=self.skipped, applied=self.micro))
            fast, self.fast_grads = self.fast_grads, None
            if fast is not None:  # autograd already added them into the accumulator
                if len(fast) != len(leaves) or not all(map(operator.is_, fast, leaves)):
                    if self.micro == 0:
                        raise Mispredicted
                    raise ValueError(_CHANGED_GRADS.format(call=self.fast_call + 1, micro=self.micro))
                if [g._version for g in fast] != self.fast_versions:  # changed in place since end_call
                    if self.micro == 0:
                        raise Mispredicted  # rerun micro-batch 0 on fresh gradients, which it may change
                    raise ValueError(_EDITED_GRADS.format(call=self.fast_call + 1, micro=self.micro))
                if self.micro == 0 and leaves:  # once a step: per-example sources (an expand trick) come this way too
                    _refuse_per_example(self, state, grads, leaves)
                self.acc = fast
            else:  # (the in-place path above only takes gradients of the params' shapes)
                if leaves:
                    _refuse_per_example(self, state, grads, leaves)
                _refuse_misshapen(self, state, grads, leaves)  # added in, they would broadcast past the optimizer's check
                self._accumulate(leaves)
            if self.micro < self.accum_k - 1:
                return state.replace(**changes)  # no update, no communication
            leaves, self.acc = self.acc, None
            if not self.divided:
                if torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None:
                    leaves = [g * (1.0 / self.accum_k) for g in leaves]
                else:
                    torch._foreach_mul_(leaves, 1.0 / self.accum_k)
        if self.dp_group is not None and self.shard_group is not None:
            from .shard import _WITH_DATA_PARALLEL

            raise ValueError(_WITH_DATA_PARALLEL)
        # Buffers the step updated (BatchNorm statistics, each rank's from its own shard of the batch) are
        # averaged across ranks, so every rank keeps the same state: for a running mean, that is the
        # single process's value on the whole batch.
        stats = _updated_float_buffers(state, changes) if self.dp_group is not None or self.shard_group is not None else []
        if self.shard_group is not None and (self.found_inf is not None or stats):
            import torch.distributed as dist

            from .data_parallel import all_reduce_mean_

            if self.found_inf is not None:
                # The shards' overflow flags: an overflow on any rank must skip the step on all of them.
                dist.all_reduce(self.found_inf, group=self.shard_group)
            if stats:
                averaged = all_reduce_mean_([t for _, t in stats], self.shard_group)
                changes = _with_buffers(changes, stats, averaged)
        if self.dp_group is not None:
            from ..optim._base import refuse_sparse
            from .data_parallel import all_reduce_mean_

            # nn.Embedding(sparse=True): no flattening into the buckets
            refuse_sparse("fnlit.data_parallel", leaves, grads, " (it all-reduces them flattened into dense buffers)",
                          ": the all-reduce sends the same values")
            n, m = len(leaves), len(stats)
            # A float64 loss rides only where float64 gradients make a bucket it shares: all_reduce_metrics averages it
            # in float64 otherwise (in float32 it lost its digits). The aux's scalars ride in the gradients' dtype
            # whatever their own (note_scalars: the same riders on every rank).
            wide = any(t.dtype is torch.float64 for t in leaves)
            losses = [t for t in self.known if wide or t.dtype is not torch.float64]
            aux_dtype = torch.float64 if wide else torch.float32
            reduced = all_reduce_mean_(
                list(leaves) + [t for _, t in stats]
                + [_rider(t) for t in ([self.found_inf] if self.found_inf is not None else []) + losses]
                + [t.reshape(1).to(self.device or t.device, aux_dtype) for t in self.known_aux],  # (a CPU int beside CUDA)
                self.dp_group,
                self.dp_bucket_bytes,
                reuse=True,
            )
            if stats:
                changes = _with_buffers(changes, stats, reduced[n : n + m])
            # The riders leave the step (metrics, the overflow flag): copies, so the buffer can be reused.
            leaves, riders_out = reduced[:n], [t.reshape(()).clone() for t in reduced[n + m :]]
            if self.found_inf is not None:
                self.found_inf = riders_out.pop(0)  # divided by the world size: still > 0 iff any rank overflowed
            self.reduced = {id(t): r.to(t.dtype) for t, r in zip(losses, riders_out)}
            self.reduced.update((id(t), r.reshape(t.shape)) for t, r in zip(self.known_aux, riders_out[len(losses) :]))
        if self.scaler is not None:
            from ..optim._base import donated_update
            from .amp import finish_scaled_update

            with donated_update(False):  # overflowed steps keep the old params: they must stay intact
                new = state.apply_update(unflatten(leaves), **changes)
            # Each update is kept or skipped on its own gradients (a GAN's two updates: GradScaler's scaler.step per
            # optimizer); the scale moves once, on an overflow in any of them, from the step's incoming scale.
            found = self.found_inf
            step_found = found if self.step_found is None else torch.maximum(self.step_found, found)
            new, self.extra = finish_scaled_update(state, new, self.scaler, found, step_found)
            self.step_found, self.found_inf = step_found, torch.zeros_like(found)
            return new
        return state.apply_update(unflatten(leaves), **changes)

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Called once by the outermost transform: average metrics across ranks, add the frame's own."""
        group = self.dp_group if self.dp_group is not None else self.shard_group
        if group is not None:
            from .data_parallel import all_reduce_metrics

            metrics = all_reduce_metrics(metrics, group, self.reduced, self.device)
        if self.extra:
            metrics = {**metrics, **self.extra}
        return metrics


def _refuse_per_example(f: Frame, state: TrainState, grads: Any, leaves: list[Any]) -> None:
    """Raises when the gradients are per example (DP-SGD's): accumulate and data_parallel would mix examples."""
    params = state.params
    grad = first = None
    if type(params) is dict and type(grads) is dict:  # the usual case: one lookup, no flatten
        name = next(iter(grads))
        grad, first = grads[name], params.get(name)
    if not isinstance(grad, torch.Tensor) or not isinstance(first, torch.Tensor):  # nested params: leaf order
        grad, first = leaves[0], next(iter(_tree.tree_leaves(params)), None)
    if first is None or not isinstance(grad, torch.Tensor) or grad.shape == first.shape:
        return
    if f.accum_k > 1:
        who, what, advice = "fnlit.accumulate", "micro-batches", " of accumulating (as memory allows)"
    else:
        who, what, advice = "fnlit.data_parallel", "ranks", ", or one process"
    raise ValueError(_PER_EXAMPLE.format(who=who, what=what, got=tuple(grad.shape), want=tuple(first.shape), advice=advice))


def _refuse_misshapen(f: Frame, state: TrainState, grads: Any, leaves: list[Any]) -> None:
    """Under accumulate, raises a ValueError naming the path and the micro-batch for gradients not of the params'
    shapes, or with some missing (None): summed into the accumulator, a (1,) gradient would broadcast into a (2,) one, and a missing one
    misalign the lists, while the optimizer sees only the accumulated sum. Micro-batch 0's are compared with the
    params, later ones with the accumulator (micro-batch 0's, checked)."""
    ref = f.acc if f.acc is not None else _tree.tree_leaves(state.params)
    if len(leaves) == len(ref) and all(getattr(g, "shape", None) == r.shape for g, r in zip(leaves, ref)):
        return
    where = _tree.first_mismatch(state.params, grads, none_hint=_tree.NONE_GRAD_HINT)
    raise ValueError(_MISSHAPEN.format(where=where, micro=f.micro))


_MISSHAPEN = (
    "Under fnlit.accumulate, apply_gradients expected gradients of the params' shapes, but micro-batch {micro}'s "
    "differ {where}. Pass the gradients of state.params."
)


_NOT_A_STATE = (
    "{who} takes a single fnlit.TrainState as the step's state, got {got} instead. Several models (a GAN's "
    "generator and discriminator) train as one state: TrainState.create(nn.ModuleDict({{\"g\": generator, "
    "\"d\": discriminator}}), fnlit.optim.chain(fnlit.optim.masked(adam(2e-4), is_g), fnlit.optim.masked(adam(2e-4), "
    "is_d)), ...), masks over the param names, and one apply_gradients with both parts' gradients (see \"Two models "
    "(a GAN)\" in the README)."
)


def require_step(step: Any, who: str) -> None:
    """Raises a TypeError unless ``step`` is callable: a transform takes the step function itself (a slip such as
    ``accumulate(4, step)`` or ``amp(step(state, batch))`` otherwise failed only at the first call, far from it)."""
    if not callable(step):
        raise TypeError(
            f"{who} expected a step function (state, batch) -> (state, metrics) as its first argument, got "
            f"{type(step).__name__} {step!r:.60} instead: pass the function itself, not its result."
        )


def require_state(state: Any, who: str) -> None:
    """Raises a TypeError unless ``state`` is a :class:`fnlit.TrainState` (a subclass, a stacked, donated, sharded or
    traced one included): a step over a tuple of states (a GAN's two) runs unwrapped, but no transform can take it."""
    from ..state import TrainState

    if not isinstance(state, TrainState):
        got = type(state).__name__
        if isinstance(state, (tuple, list)):
            got = f"a {got} of {', '.join(type(s).__name__ for s in state[:4])}{', ...' if len(state) > 4 else ''}"
        else:
            got = f"a {got}"
        raise TypeError(_NOT_A_STATE.format(who=who, got=got))


def is_step_result(result: Any, state: Any) -> bool:
    """Whether ``result`` has the form of a training step's: a pair whose first item is a state of ``state``'s type
    (an evaluation step, as :func:`fnlit.eval_step` builds, returns a dict of metrics)."""
    return isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], type(state))


def describe_result(result: Any, state: Any) -> str:
    """What a step returned that is not a training step's result, for an error message."""
    if isinstance(result, dict):
        return f"a dict with keys {list(result)}"
    if isinstance(result, (tuple, list)):
        if len(result) != 2:
            return f"a {type(result).__name__} of {len(result)} items"
        return f"a pair whose first item is a {type(result[0]).__name__}, not a {type(state).__name__}"
    return f"a {type(result).__name__}"


def wrapped_steps(step: Any) -> Iterator[Any]:
    """``step`` and the steps it wraps, outermost first (``__wrapped__``: fnlit's transforms, ``fnlit.compile`` and
    ``fnlit.ensemble`` set it; a cycle ends the walk)."""
    for _ in range(64):
        if step is None:
            return
        yield step
        step = getattr(step, "__wrapped__", None)


def collective_of(step: Any) -> Any:
    """The step among ``step`` and the steps it wraps that runs collectives (``fnlit.data_parallel``,
    ``fnlit.shard``: its ``collective`` names it), or None."""
    return next((s for s in wrapped_steps(step) if getattr(s, "collective", None)), None)


def _rider(t: torch.Tensor) -> torch.Tensor:
    """A scalar riding with the gradients' all-reduce: float32, a float64 one as it is (it rides only where float64
    gradients make a bucket it shares: a float64 model's loss keeps its digits)."""
    return t.reshape(1) if t.dtype is torch.float64 else t.reshape(1).float()


def _updated_float_buffers(state: TrainState, changes: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """The floating-point buffers in ``changes`` that the step replaced (frozen params pass through as they are)."""
    new = changes.get("buffers")
    if not new or type(new) is not dict:
        return []
    from ..functional import untouched_probe_copy

    old = state.buffers
    return [
        (name, t)
        for name, t in new.items()
        if type(t) is torch.Tensor and t.is_floating_point() and t is not old.get(name)
        and not untouched_probe_copy(t)  # a first forward's copy that nothing wrote
    ]


def _with_buffers(changes: dict[str, Any], stats: list[tuple[str, torch.Tensor]], averaged: list[torch.Tensor]) -> dict[str, Any]:
    # Copies: the averages are views into the all-reduce's flat buffer, which the next step reuses.
    return {**changes, "buffers": {**changes["buffers"], **{n: t.clone() for (n, _), t in zip(stats, averaged)}}}


def run_on_rank(step: Any, state: TrainState, batch: Any, rank: int, f: Frame, outermost: bool) -> tuple[TrainState, Any]:
    """Runs one rank's part of a data-parallel or sharded step.

    The rank draws its own randomness (its key is folded with its rank) while every rank keeps the
    same next key, so states stay identical across ranks; the outermost transform finishes the frame.
    The rank is folded in before the micro-batch index whichever transform is outside, so
    ``accumulate(data_parallel(step), k)`` and ``data_parallel(accumulate(step, k))`` draw the same masks.
    """
    from .. import random as _random

    f.device = state.device
    if f.accum_k > 1:  # inside accumulate's micro-batch f.micro: the key accumulate-inside-us would give
        key = _random.fold_in(_random.fold_in(f.accum_rng, rank), f.micro)
    else:
        key = _random.fold_in(state.rng, rank)
    new, metrics = step(state.replace(rng=key), batch)
    new = new.replace(rng=_random.next_key(state.rng))
    if outermost:
        metrics = f.finish(dict(metrics))
    return new, metrics


@contextmanager
def frame() -> Iterator[tuple[Frame, bool]]:
    """Opens the step's frame if none is open; yields (frame, whether this call is the outermost)."""
    existing = current()
    if existing is not None:
        yield existing, False
        return
    f = Frame()
    if torch.compiler.is_compiling():
        _TRACED.append(f)
        try:
            yield f, True
        finally:
            _TRACED.pop()
        return
    token = _CURRENT.set(f)
    try:
        yield f, True
    finally:
        _CURRENT.reset(token)
