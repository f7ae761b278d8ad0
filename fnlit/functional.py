"""Running a module as a pure function of explicit params, buffers and RNG key."""

from __future__ import annotations

import contextlib
import importlib
import numbers
import operator
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import torch
import torch.utils._pytree as torch_pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from . import _storage
from . import random as _random
from . import tree as _tree
from ._checkpoint_io import _dtensor_class
from ._types import Batch, Buffers, Metrics, Params, StepFn
from .transforms._frame import current as _current_frame

__all__ = ["apply", "value_and_grad", "train_step", "eval_step"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase,)
# Spectral norm's power iteration updates its vectors in place on every training forward: the
# parametrization (torch.nn.utils.parametrizations.spectral_norm) and the older forward pre-hook.
_SPECTRAL_PARAMETRIZATION = torch.nn.utils.parametrizations._SpectralNorm
_SPECTRAL_HOOK = importlib.import_module("torch.nn.utils.spectral_norm").SpectralNorm  # the package attribute is the function
_WEIGHT_NORM_HOOK = importlib.import_module("torch.nn.utils.weight_norm").WeightNorm
# torch.nn.utils.prune's forward pre-hook sets `weight = weight_orig * weight_mask`, as the older weight_norm's does.
_PRUNING_HOOK = importlib.import_module("torch.nn.utils.prune").BasePruningMethod
_MISSING = object()


def _derived(m: nn.Module) -> tuple[str, ...]:
    """The plain attributes of ``m`` (its own) that a forward sets from the tensors swapped in: the weight that
    the older weight_norm / spectral_norm forward pre-hooks and torch.nn.utils.prune's compute, and an RNN's list of
    its weights."""
    names = tuple(
        h._tensor_name if isinstance(h, _PRUNING_HOOK) else h.name
        for h in m._forward_pre_hooks.values()
        if isinstance(h, (_WEIGHT_NORM_HOOK, _SPECTRAL_HOOK, _PRUNING_HOOK))
    )
    if isinstance(m, nn.RNNBase):
        names += ("_flat_weights", "_flat_weight_refs")
    return names


_LAZY_TENSOR = torch.nn.parameter.UninitializedTensorMixin  # (what torch.nn.parameter.is_lazy tests)
LAZY = (
    "{who} got a module with an uninitialised lazy tensor, {name!r} of a {kind} (nn.LazyLinear and friends, before their "
    "first forward): it has no shape or values yet, and its first forward would turn the module into a plain one "
    "holding it uninitialised. Materialise it first: run one forward of the module on an example batch (model(x))."
)


def _walk(
    m: nn.Module, prefix: str, every: list[tuple[str, nn.Module]], firsts: list[tuple[str, nn.Module]], memo: set[int]
) -> None:
    """Appends ``m``'s submodules (``m`` first, depth first) to ``every`` as ``m.named_modules(remove_duplicate=False)``
    yields them, and to ``firsts`` as ``m.named_modules()`` does (each module once, under its first name)."""
    every.append((prefix, m))
    if id(m) not in memo:  # (a module met again has its submodules met again too: none is new)
        memo.add(id(m))
        firsts.append((prefix, m))
    for name, child in m._modules.items():
        if child is not None:
            _walk(child, f"{prefix}.{name}" if prefix else name, every, firsts, memo)


class _Slots:
    """Where each named tensor of a module lives: (owning dict, attribute) for every alias.

    Swapping our tensors into those dicts and back is what ``torch.func.functional_call`` does, minus
    its per-call bookkeeping (~50 us on a small MLP; this costs ~1 us). Built once per module.
    """

    def __init__(self, module: nn.Module, traced: bool = False) -> None:
        # Every (name, submodule) as named_modules(remove_duplicate=False) yields them (a shared submodule under
        # each name), and the first occurrences only, as named_modules() does: one walk, not one per field (a
        # traced step builds its slots in the trace, where dynamo inlines each walk's generators: ~0.8 s of a
        # small MLP's ~2.7 s capture went to seven walks).
        every: list[tuple[str, nn.Module]] = []
        firsts: list[tuple[str, nn.Module]] = []
        _walk(module, "", every, firsts, set())
        self.where: dict[str, list[tuple[dict[str, Any], str]]] = {}
        buffers: set[str] = set()
        seen: dict[int, str] = {}
        # Tied weights and shared submodules: each further name of a tensor -> its first one (state_dict lists
        # them all; named_parameters, and so TrainState, the first).
        self.aliases: dict[str, str] = {}
        for kind in ("_parameters", "_buffers"):
            for owner_name, owner in every:
                for attr, t in getattr(owner, kind).items():
                    if t is None:
                        continue
                    name = f"{owner_name}.{attr}" if owner_name else attr
                    if isinstance(t, _LAZY_TENSOR):
                        raise ValueError(LAZY.format(who="fnlit.apply", name=name, kind=type(owner).__name__))
                    canonical = seen.setdefault(id(t), name)  # tied weights: aliases share one name
                    self.where.setdefault(canonical, []).append((getattr(owner, kind), attr))
                    if canonical != name:
                        self.aliases[name] = canonical
                    if kind == "_buffers" and canonical == name:
                        buffers.add(name)
        self.names = frozenset(self.where)
        # Every slot in one order, as three parallel tuples: a swap is then a C-level map over them (see _swap_in),
        # not a Python loop (0.10 us a tensor in and out instead of 0.15).
        flat = [(d, attr, name) for name, slots in self.where.items() for d, attr in slots]
        self.dicts, self.attrs, self.order = (tuple(c) for c in zip(*flat)) if flat else ((), (), ())
        self.buffers = frozenset(buffers)  # registered buffers (state.buffers also holds frozen parameters)
        # Attributes a forward sets from the tensors swapped in (see _derived): put back as they were after it,
        # so the module holds none of the given tensors (nor their graph) afterwards.
        self.derived = tuple((m.__dict__, a) for _, m in firsts for a in _derived(m))
        # Buffers a training forward updates in place: copied first, so the caller's never change.
        # Normalisation statistics and spectral norm's power-iteration vectors; any other buffer a forward
        # is seen updating is added on the way (apply's version check).
        self.copied = frozenset(
            f"{n}.{a}" if n else a for n, m in firsts for a in _updated_in_place(m) if getattr(m, a, None) is not None
        )
        self.probed = False  # whether a training forward has run on copies of the buffers (see apply)
        self.eval_copied: frozenset[str] = frozenset()  # the same for eval-mode forwards (a quantization observer)
        # Buffers the probe saw written by an op with no version moved (F.batch_norm's running statistics in a
        # norm layer of one's own); updated at every such forward.
        self.silent: frozenset[str] = frozenset()
        self.eval_probed = False
        if traced:  # built afresh in each trace (see apply): what follows serves eager calls only
            # What a traced forward registers (a buffer or parameter) or fills (a register_buffer("ema", None) set in
            # forward) is taken out again after it (_run_swapped), as functional_call did: the module never holds a
            # tensor of the trace.
            self.held = [(m._buffers, len(m._buffers)) for _, m in firsts] + [(m._parameters, len(m._parameters)) for _, m in firsts]
            self.nones = [(m._buffers, k) for _, m in firsts for k, v in m._buffers.items() if v is None]
            return
        # every slot, as (id of the owning dict, attribute): what a backward holding the module holds (_Backward)
        self.keys = frozenset((id(d), attr) for slots in self.where.values() for d, attr in slots)
        modules = [m for _, m in firsts]
        # Every parent -> child link of the module tree: a submodule replaced since (a new head for
        # fine-tuning) means the dicts above are not the module's any more (see current()).
        self.links = [(m._modules, k, c) for m in modules for k, c in m._modules.items()]
        # How many tensors (and submodules) each module holds, and its None slots (register_buffer("ema", None),
        # filled by a forward): a tensor or a submodule added since means these slots miss it (see current()).
        self.owned = [d for m in modules for d in (m._parameters, m._buffers, m._modules)]
        self.counts = list(map(len, self.owned))
        self.nones = [(d, k) for d in self.owned for k, v in d.items() if v is None]
        # Embeddings with max_norm renorm their weight in place (warned about by _slots, outside any trace)
        self.renormed = [  # (name, weak reference): the slots must not hold a module (the root would never be freed)
            (n, weakref.ref(m)) for n, m in firsts if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
        ]
        # Embeddings whose weight gets a sparse gradient, which torch.compile and torch.func.vmap cannot take (see
        # _note_sparse): their names, for the error
        self.sparse = [
            self.aliases.get(f"{n}.weight" if n else "weight", f"{n}.weight" if n else "weight")
            for n, m in firsts
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse
        ]

    def current(self) -> bool:
        """Whether the module tree is still the one these slots were built from, with as many tensors and
        submodules in each module and its None slots still None (a buffer a forward registers or fills lazily, a
        submodule or parametrization added since); ~0.1 us a submodule."""
        for modules, k, child in self.links:
            if modules.get(k) is not child:
                return False
        return list(map(len, self.owned)) == self.counts and all(d.get(k) is None for d, k in self.nones)


# The first forward's copies of buffers whose version counter did not move: data_parallel treats them as
# unchanged (as the caller's own tensors would be), so a constant buffer is not averaged across ranks
# (inexact for 3 ranks) at step 1.
_PROBE_COPIES = _storage.Marks()


# The buffers of the last eager training forward that updated some of them (BatchNorm statistics), and
# those names: TrainState.apply_gradients warns when it is given no buffers= for a state holding exactly
# that dict, i.e. when a step drops the updated statistics (they would never change).
_UPDATED_FROM: ContextVar[tuple[Mapping[str, Any], list[str]] | None] = ContextVar("fnlit_updated_from", default=None)


def untouched_probe_copy(t: torch.Tensor) -> bool:
    """Whether ``t`` is a first forward's copy of a buffer that nothing has written (by its version)."""
    return t in _PROBE_COPIES and t._version == 0


def _warn_renormed(renormed: list[str]) -> None:
    warnings.warn(
        f"fnlit.apply: {renormed[:3]} {'is an' if len(renormed) == 1 else 'are'} Embedding with max_norm: "
        "PyTorch renorms the looked-up rows of its weight in place in every forward, so the params passed "
        "in (state.params) change in place. Training equals PyTorch's, but an older state does not stay "
        "as it was (assert_pure fails, a kept state moves). For a pure step, drop max_norm and renorm in "
        "the loss or a constraint of your own.",
        stacklevel=4,
    )


# Set while a step runs where a sparse gradient may be what fails (torch.func's path of value_and_grad, and
# fnlit.compile's eager run after torch.compile refused a sparse tensor): the names of the sparse embeddings'
# weights differentiated, for an error that names them.
_SPARSE_SEEN: ContextVar[list[str] | None] = ContextVar("fnlit_sparse_seen", default=None)

# Set by fnlit.evaluate while its eval step runs: an apply there that leaves ``train`` at its default (training
# mode: dropout on, BatchNorm normalizing with the batch's statistics) on a module with such layers is told, once per
# evaluate (Lightning evaluates in eval mode). The modules already looked at, by id, and whether it was told.
_EVALUATING: ContextVar[dict[str, Any] | None] = ContextVar("fnlit_evaluating", default=None)
_MODE_SENSITIVE = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


@contextlib.contextmanager
def evaluating() -> Iterator[None]:
    """Inside: an :func:`apply` that leaves ``train`` at its default on a module with dropout or BatchNorm is told
    (once), as :func:`fnlit.evaluate` runs its eval step."""
    token = _EVALUATING.set({"told": False, "seen": set()})
    try:
        yield
    finally:
        _EVALUATING.reset(token)


def _tell_training_in_evaluate(module: nn.Module, told: dict[str, Any]) -> None:
    if told["told"] or id(module) in told["seen"]:
        return
    told["seen"].add(id(module))
    kinds = sorted({type(m).__name__ for m in module.modules() if isinstance(m, _MODE_SENSITIVE)})
    if kinds:
        told["told"] = True
        warnings.warn(
            f"fnlit.apply ran {type(module).__name__} in training mode inside evaluate ({', '.join(kinds)}: dropout "
            "on, batch statistics), as train defaults to True. Pass train=False in the eval step (fnlit.eval_step "
            "does), or train=True to mean it (Monte Carlo dropout).",
            stacklevel=3,
        )


def _note_sparse(names: list[str], params: Mapping[str, Any]) -> None:
    """Records which of a module's sparse embeddings' weights (``names``) are differentiated, when asked."""
    seen = _SPARSE_SEEN.get()
    if seen is not None and torch.is_grad_enabled():
        seen += [n for n in names if n in params and params[n].requires_grad]


def sparse_refused(who: str, why: str, names: list[str], fix: str) -> str:
    """The message refusing the sparse gradients of ``names``, worded as the optimizers' and data_parallel's."""
    from .optim._base import sparse_message

    return sparse_message(who, why, ", ".join(dict.fromkeys(names)), fix)


def _updated_in_place(m: nn.Module) -> tuple[str, ...]:
    """The buffers of ``m`` (its own) that a training forward updates in place."""
    if isinstance(m, _NORM_TYPES):
        return ("running_mean", "running_var", "num_batches_tracked")
    if isinstance(m, _SPECTRAL_PARAMETRIZATION):
        return ("_u", "_v")
    return tuple(f"{h.name}_{x}" for h in m._forward_pre_hooks.values() if isinstance(h, _SPECTRAL_HOOK) for x in "uv")


# id(module) -> (weak reference to it, its slots). A plain dict: WeakKeyDictionary.get builds a weakref
# per lookup in Python, and apply looks up on every forward. The weak reference tells a module that
# reuses a dead one's id apart (its entry is then rebuilt), and a finalizer drops dead entries.
_SLOTS: dict[int, tuple[weakref.ref[nn.Module], _Slots]] = {}


def _slots(module: nn.Module, rebuild: bool = False) -> _Slots:
    entry = _SLOTS.get(id(module))
    if not rebuild and entry is not None and entry[0]() is module and entry[1].current():
        return entry[1]
    s = _Slots(module)
    rebuilt = entry is not None and entry[0]() is module
    if s.renormed:  # once per embedding: one attached since the slots were last built is told of too
        told = {id(r()) for _, r in entry[1].renormed if r() is not None} if rebuilt else set()  # type: ignore[union-attr]
        if new := [n for n, r in s.renormed if id(r()) not in told]:
            _warn_renormed(new)
    if rebuilt:  # rebuilt: keep what the forward was seen updating in place
        # (a new submodule's buffers are probed again: `probed` starts False)
        s.copied = s.copied | (entry[1].copied & s.names)
    key = id(module)
    _SLOTS[key] = (weakref.ref(module, lambda _, key=key, slots=_SLOTS: slots.pop(key, None)), s)  # (bound: at exit _SLOTS is None)
    return s


def _check_names(
    module: nn.Module, slots: _Slots, params: Mapping[str, Any], buffers: Mapping[str, Any]
) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """``params`` and ``buffers``, checked to name every tensor of the module once; a tied tensor given under
    another of its names (state_dict lists them all) comes back under its first one."""
    names = slots.names
    # Every name of the module exactly once across params and buffers, without building a set.
    if len(params) + len(buffers) == len(names) and params.keys() <= names and (
        not buffers or (buffers.keys() <= names and not any(k in params for k in buffers))
    ):
        return params, buffers
    aliases = slots.aliases  # (membership tests, which dynamo traces: not dict_keys.isdisjoint)
    if aliases and (any(k in aliases for k in params) or any(k in aliases for k in buffers)):
        params, buffers = _untie(module, slots, params, buffers)
        return _check_names(module, slots, params, buffers)
    given = params.keys() | buffers.keys()
    missing, extra = sorted(slots.names - given), sorted(given - slots.names)
    both = sorted(params.keys() & buffers.keys())
    raise KeyError(
        f"fnlit.apply: params and buffers do not match the tensors of {type(module).__name__}: "
        + (f"missing {missing[:5]}; " if missing else "")
        + (f"not in the module {extra[:5]}; " if extra else "")
        + (f"given in both params and buffers {both[:5]}; " if both else "")
        + "pass state.params and state.buffers of a TrainState created from this module"
        + (" (one it registered after the state was made, in a forward, is missing: create the state after a first "
           "forward)." if missing else ".")
    )


_TIED = (
    "fnlit.apply: {names} name one tensor of {module} (tied weights, or a submodule used twice), but were given "
    "different tensors. Pass it once, under {first} (as state.params has it), or give all its names the same tensor."
)


_TIED_TRACED = (
    "fnlit.apply: {names} name one tensor of {module} (tied weights, or a submodule used twice), given as separate "
    "tensor objects. Under torch.compile or a torch.func transform (vmap, grad) fnlit cannot tell whether they view one "
    "memory (two detach() of one parameter, as in state_dict()) or hold different values. Pass it once, under {first} "
    "(as state.params has it), or give all its names the same tensor object."
)


_TIED_GRAD = (
    "fnlit.apply: {names} name one tensor of {module} (tied weights, or a submodule used twice), given as separate "
    "tensors that require grad (fnlit.value_and_grad differentiates each entry of a params dict on a leaf of its "
    "own): every use's gradient would reach {first} only, the other names' would be zero. Pass it once, under "
    "{first} (as state.params has it): its gradient then sums every use, as PyTorch's .grad does."
)


def _untie(
    module: nn.Module, slots: _Slots, params: Mapping[str, Any], buffers: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``params`` and ``buffers`` with each tied tensor under its first name only (``torch.func.functional_call``'s
    ``tie_weights``): given under several names, they must be one tensor (or views of the same memory, as two
    entries of a ``state_dict()`` are), and not separate tensors that require grad (the gradient would reach one)."""
    aliases, original_params = slots.aliases, params
    tied: dict[str, list[tuple[str, Any]]] = {}  # first name -> the (alias, tensor) given
    for d in (params, buffers):
        for k, t in d.items():
            if k in aliases:
                tied.setdefault(aliases[k], []).append((k, t))
    params = {k: t for k, t in params.items() if k not in aliases}
    buffers = {k: t for k, t in buffers.items() if k not in aliases}
    for first, given in tied.items():
        if first in params or first in buffers:
            t = params[first] if first in params else buffers[first]
        else:  # given under an alias only: the tensor goes under its first name, with the params if given there
            t = given[0][1]
            (params if given[0][0] in original_params else buffers)[first] = t
        if not all(_same_tensor(other, t) for _, other in given):
            names = sorted([first, *(k for k, _ in given)])
            if _traced():  # two tensors that may be views of one: no storage to compare there
                raise ValueError(_TIED_TRACED.format(names=names, module=type(module).__name__, first=first))
            raise ValueError(_TIED.format(names=names, module=type(module).__name__, first=first))
        if torch.is_grad_enabled() and any(o is not t and (o.requires_grad or t.requires_grad) for _, o in given):
            names = sorted([first, *(k for k, _ in given)])
            raise ValueError(_TIED_GRAD.format(names=names, module=type(module).__name__, first=first))
    return params, buffers


def _same_tensor(a: Any, b: Any) -> bool:
    """One tensor, or two views of the same memory alike in everything (two ``detach()`` of one parameter)."""
    if a is b:
        return True
    if _traced():  # (no storage to read there)
        return False
    return (
        _storage.address(a) == _storage.address(b) != 0
        and a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        and a.storage_offset() == b.storage_offset()
    )


def _swap_in(slots: _Slots, tensors: Mapping[str, torch.Tensor]) -> list[Any]:
    """Puts ``tensors`` (one for every name of ``slots``, as :func:`_check_names` makes them) into the module's
    slots; returns what they held, for :func:`_swap_back`."""
    saved = list(map(operator.getitem, slots.dicts, slots.attrs))
    if slots.derived:  # last, after one value per slot (_swap_back's map stops at the slots)
        saved.append(_derived_values(slots))
    try:  # (any() drives the map in C: setitem returns None, so it runs to the end)
        any(map(operator.setitem, slots.dicts, slots.attrs, map(tensors.__getitem__, slots.order)))
    except BaseException:
        _swap_back(slots, saved)
        raise
    return saved


def _swap_back(slots: _Slots, saved: list[Any]) -> None:
    """Undoes :func:`_swap_in`. (A slot listed twice, a submodule used twice as in nn.Sequential(l, act, l), saved
    the module's own tensor both times: _swap_in reads every slot before writing any.)"""
    any(map(operator.setitem, slots.dicts, slots.attrs, saved))
    if slots.derived:
        _put_derived(slots, saved[-1])


def _derived_values(slots: _Slots) -> tuple[Any, ...]:
    """The module's attributes that a forward derives from the swapped-in tensors (``slots.derived``), as they are."""
    return tuple(d.get(a, _MISSING) for d, a in slots.derived)


def _put_derived(slots: _Slots, values: tuple[Any, ...]) -> None:
    """Puts back what :func:`_derived_values` read (an attribute that was absent is removed again)."""
    for (d, a), v in zip(slots.derived, values):
        if v is _MISSING:
            d.pop(a, None)
        else:
            d[a] = v


def _call_swapped(module: nn.Module, slots: _Slots, tensors: dict[str, torch.Tensor], buffers: Iterable[str],
                  args: tuple, kwargs: dict, traced: bool = False) -> Any:
    """Runs the module on ``tensors``; a buffer the forward reassigned (``self.mean = ...``) comes back in
    ``tensors`` in its place, as ``torch.func.functional_call`` does it. ``traced``: inside torch.compile's
    capture, where dynamo traces this instead of functional_call's own walks of the module (~18 % of a small
    step's capture). No lock there (dynamo cannot trace one): a fullgraph capture (fnlit.compile) holds the swaps in
    its graph; a graph break inside the forward under a torch.compile of one's own runs the rest eagerly, unlocked,
    as functional_call did."""
    if traced:
        return _run_swapped(module, slots, tensors, buffers, args, kwargs, traced=True)
    # The module holds the given tensors only for the call; threads sharing it take turns (the lock is
    # fnlit.random's, reentrant: a seeded call already holds it, and a forward may call apply again).
    with _random._LOCK:
        _IN_APPLY.depth += 1  # (a forward pre-hook of value_and_grad's backward leaves this forward alone)
        try:
            return _run_swapped(module, slots, tensors, buffers, args, kwargs)
        finally:
            _IN_APPLY.depth -= 1


def _run_swapped(module: nn.Module, slots: _Slots, tensors: dict[str, torch.Tensor], buffers: Iterable[str],
                 args: tuple, kwargs: dict, traced: bool = False) -> Any:
    saved = _swap_in(slots, tensors)
    try:
        out = module(*args, **kwargs)
        for name in buffers:
            d, attr = slots.where[name][0]
            if d[attr] is not tensors[name]:
                tensors[name] = d[attr]
        return out
    finally:
        _swap_back(slots, saved)
        if traced:
            for d, n in slots.held:
                if len(d) > n:  # registered in the forward (a dict keeps the order keys came in)
                    for k in list(d)[n:]:
                        del d[k]
            for d, k in slots.nones:
                if d.get(k) is not None:
                    d[k] = None


def _functional_call(module: nn.Module, slots: _Slots, tensors: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
    """``torch.func.functional_call`` (apply's path under torch.func's transforms), with the attributes a forward sets
    from the tensors (``slots.derived``: the older norm hooks' and prune's weight, an RNN's weight list) put back after
    it, as :func:`_swap_back` does: functional_call left the module holding the transform's tensor and its graph."""
    derived = _derived_values(slots)
    try:
        return torch.func.functional_call(module, tensors, args, kwargs, strict=False)
    finally:
        _put_derived(slots, derived)


def _forward(module: nn.Module, slots: _Slots, tensors: dict[str, torch.Tensor], reassignable: Iterable[str],
             args: tuple, kwargs: dict, rng: torch.Tensor | None) -> Any:
    """:func:`_call_swapped`, seeded from ``rng`` (eager mode; None: unseeded)."""
    if rng is None:
        return _call_swapped(module, slots, tensors, reassignable, args, kwargs)
    # What `with fnlit.random.seeded(rng, device):` does, without the object.
    saved = _random._seed_eager(rng, _seed_device(tensors, args, kwargs))
    try:
        return _call_swapped(module, slots, tensors, reassignable, args, kwargs)
    finally:
        _random._restore(saved)


def _seed_device(tensors: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> torch.device | None:
    """The CUDA device whose generator a seeded forward seeds besides the CPU's (None: the CPU's only). The first
    tensor's is_cuda is the cheap test: the params come first in ``tensors``."""
    first = next(iter(tensors.values()), None)
    if first is None:  # a module without params or buffers (a Dropout, an augmentation): its inputs' device
        first = next((a for a in _tree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)), None)
    return first.device if first is not None and first.is_cuda else None


def _has_dtensor(params: Params) -> bool:
    """Whether any parameter is a DTensor (fnlit.shard), without importing DTensor when nothing uses it."""
    if torch.compiler.is_compiling() and all(type(p) in _PLAIN_TENSORS for p in params.values()):
        return False  # (sys.modules, which _dtensor_class reads, is a dict of every module: dynamo takes ~0.2-0.6 s over it)
    dtensor = _dtensor_class()
    return dtensor is not None and any(isinstance(p, dtensor) for p in params.values())


_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


def _traced() -> bool:
    """Inside torch.compile or a torch.func transform (vmap, grad): take the functorch-safe paths."""
    return torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None


def apply(
    module: nn.Module,
    params: Params,
    buffers: Buffers,
    /,
    *args: Any,
    rng: torch.Tensor | None = None,
    train: bool | None = None,
    mutable: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, Buffers]:
    """Calls ``module(*args, **kwargs)`` with the given params and buffers; mutates nothing it is given.

    Buffers a module updates in place (BatchNorm running statistics) are copied first, and the copies
    come back in ``new_buffers``. The module's own and its submodules' training flags are as they were
    after the call. Randomness (dropout) is a pure function of ``rng``: the same key gives
    bitwise the same output. Activation checkpointing inside the module
    (``torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)``; ``use_reentrant=True`` cannot give
    gradients with respect to the params, and value_and_grad refuses it) works under
    :func:`value_and_grad`: its backward, which runs ``block`` again, sees these params and buffers too
    (a BatchNorm in ``block`` updates the copies in ``new_buffers`` a second time then, as PyTorch updates
    the module's own). The module holds them for the whole backward, so a block reading a parameter itself
    (``F.linear(x, self.w)``, ``x + self.pos_emb``) reads them too (every eager backward through apply does this,
    checkpointing or not: another thread's ``state_dict()`` of the module meanwhile reads them, while
    ``TrainState.create`` and ``fnlit.export`` read and write the module's own tensors); only when another
    thread's backward through the same module object is running at the same time does the module get them later,
    at the first module forward the recompute runs (a block reading a parameter before calling any submodule then
    reads the module's own), and two threads' recomputes through one module at once raise an error. A forward
    of the module (an ``apply`` of it) in another thread while a backward runs its block again changes what
    that recompute reads: threads sharing a module and checkpointing must not do that (give each its own
    module, ``copy.deepcopy(model)``). Eagerly only: under :func:`fnlit.compile` the gradient is taken by
    ``torch.func``, which has no support for the checkpoint's saved tensor hooks (a CaptureError says so).

    Args:
        module: the model (its own tensors are not used, and are left unchanged).
        params: name -> tensor, e.g. ``state.params``. A tied tensor (weights tied, or a submodule used twice)
            may come under any of its names, or several (as in ``state_dict()``) if they hold the same tensor
            (under torch.compile or a torch.func transform: the same tensor object, as views of one memory cannot be
            told apart there); to differentiate it, pass it under one name (``state.params`` does): its gradient sums
            every use.
        buffers: name -> tensor, e.g. ``state.buffers``.
        *args: positional inputs of the module.
        rng: a key from :mod:`fnlit.random` (``state.rng``); None leaves PyTorch's generators as they are.
        train: training mode (dropout on, BatchNorm uses and updates batch statistics) or eval mode. Left out:
            training mode; inside :func:`fnlit.evaluate` (fit's validation) that is told once, with a warning, on a
            module with dropout or BatchNorm: pass ``train=False`` there (or ``train=True`` to mean it).
        mutable: which buffers the forward may update, on copies that come back in ``new_buffers``:
            None (default) means, in training mode, normalisation statistics, spectral norm's vectors and
            any buffer a training forward of this module was seen updating before (fnlit warns the first
            time: that call changed the buffers it was given); True every buffer; False none (the
            updates are made on copies and dropped, and ``new_buffers`` are the ones given). In eval mode,
            None copies the buffers the module's first eval forward (run on copies of them all) updated in
            place (none for BatchNorm; a quantization observer's), so evaluating does not change
            ``state.buffers`` either; the updated copies come back in ``new_buffers``. (A write through
            ``.data`` moves no version counter: the first forward in each mode sees it, watching which memory
            ops write; a buffer first written that way by a later forward is not seen.)
        **kwargs: keyword inputs of the module. ``rng``, ``train`` and ``mutable`` are apply's own: a forward
            argument of one of those names is passed positionally (or through a small wrapper module).

    Returns:
        ``(output, new_buffers)``.

    Raises:
        KeyError: if params and buffers do not name exactly the module's tensors.
        ValueError: if two names of one tied tensor are given different tensors, or separate ones that require
            grad (as ``fnlit.value_and_grad`` of a dict holding both names makes them).

    Example:
        >>> import torch, fnlit
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        >>> state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
        >>> out, buffers = fnlit.apply(model, state.params, state.buffers, torch.randn(8, 4), rng=state.rng)
        >>> out.shape, int(buffers["1.num_batches_tracked"]), int(state.buffers["1.num_batches_tracked"])
        (torch.Size([8, 4]), 1, 0)
    """
    # While compiling, build the slots afresh: filling the cache during a trace would make the next
    # call fail dynamo's guard on the cache and recompile.
    compiling = torch.compiler.is_compiling()
    if train is None:  # training mode, the default; told inside evaluate, on a module whose modes differ
        train = True
        if (told := _EVALUATING.get()) is not None and not compiling:
            _tell_training_in_evaluate(module, told)
    frame = _current_frame()
    if frame is not None and frame.amp_dtype is not None and not frame.forwarding:
        # fnlit.amp: a forward outside value_and_grad's (a teacher's). Inside it, autocast is as that forward sets
        # it: a torch.autocast(enabled=False) region of the loss (a float32 head) stays float32.
        if not torch.is_autocast_enabled(frame.amp_device):
            with torch.autocast(frame.amp_device, dtype=frame.amp_dtype):
                return apply(module, params, buffers, *args, rng=rng, train=train, mutable=mutable, **kwargs)
    slots = _Slots(module, traced=True) if compiling else _slots(module)
    try:
        params, buffers = _check_names(module, slots, params, buffers)
    except (AttributeError, TypeError, RuntimeError):
        from .transforms.donate import Donated  # (a donated state's fields raised their own error: kept)

        for what, given in (("params", params), ("buffers", buffers)):
            if not isinstance(given, (Mapping, Donated)):
                raise TypeError(
                    f"fnlit.apply(module, params, buffers, *inputs) expected {what} to be a dict (state.{what}), got "
                    f"{type(given).__name__}. Pass the state's params and buffers before the inputs: "
                    "fnlit.apply(model, state.params, state.buffers, x)."
                ) from None
        raise
    except (KeyError, ValueError):
        if compiling:
            raise
        slots = _slots(module, rebuild=True)  # tensors tied, untied or registered since the slots were built
        params, buffers = _check_names(module, slots, params, buffers)
    traced = compiling or torch._C._functorch.maybe_current_level() is not None
    if not compiling and slots.sparse:
        _note_sparse(slots.sparse, params)
    if _has_dtensor(params):
        from .transforms.shard import gather_params

        params = gather_params(params)  # fnlit.shard: all-gather the shards (the backward reduce-scatters)
    # Eager: the mode check, the mode switch, the forward and the switch back are one turn of the module (the lock
    # _call_swapped takes for the forward, reentrant): another thread's apply of the same module with the other
    # mode must not switch it under this forward, nor record the switched mode as the one to restore.
    lock = None if traced else _random._LOCK
    if lock is not None:
        lock.acquire()
    try:
        if not buffers and not traced and module.training == train:
            # No buffers (an MLP, most transformers) and the modes as asked: nothing to copy, probe, watch or hand back.
            if (swaps := _SWAPS.get()) is None or not torch.is_grad_enabled():
                return _forward(module, slots, params, (), args, kwargs, rng), {}
            record = (module, slots, params, params, None, _IN_APPLY.depth)
            swaps.append(record)  # recorded as the call begins (see _SWAPS)
            try:
                return _forward(module, slots, params, (), args, kwargs, rng), {}
            except BaseException:
                _drop(swaps, record)
                raise
        # A module's first training forward runs on copies of its registered buffers (not of frozen parameters,
        # which may be most of a fine-tuned model): the ones it updates in place are learned without the
        # caller's changing (later forwards copy those only: the slots' `copied`).
        # An eval-mode forward is probed the same way, once, for buffers it updates in place (quantization
        # observers do in every mode; BatchNorm does not): those are copied before later eval forwards. Under
        # inference_mode (a statistics calibration pass) either probe's copies are made outside it, so they keep
        # version counters (see below).
        inference = not traced and torch.is_inference_mode_enabled()  # (not traceable)
        probing = bool(buffers) and not traced and not mutable
        probe = probing and train and not slots.probed
        eval_probe = probing and not train and not slots.eval_probed
        # mutable=False: the updates are made on copies, which are dropped. Traced (compile, vmap), what eager
        # calls learned is out of reach (compiling builds fresh slots): every registered buffer is copied (a boolean
        # one too: `self.seen |= ...` reached the caller's), so an in-place update never reaches the caller's.
        if traced and not mutable:
            copy = [n for n in slots.buffers if n in buffers]
        elif mutable:
            copy = buffers.keys()
        elif train:
            copy = slots.buffers if probe else slots.copied
        else:
            copy = slots.buffers if eval_probe else slots.eval_copied
        new_buffers = dict(buffers)
        if inference and not traced and copy:  # normal tensors: a version counter, and usable outside inference mode
            with torch.inference_mode(False):
                new_buffers.update({name: new_buffers[name].clone() for name in copy if name in new_buffers})
        else:
            for name in copy:
                if name in new_buffers:
                    new_buffers[name] = new_buffers[name].clone()
        tensors = {**params, **new_buffers} if new_buffers else params  # type: ignore[assignment]
        # Buffers of the caller's that the forward could write in place: seen afterwards by their versions.
        watched = [(n, t, t._version) for n, t in buffers.items() if new_buffers[n] is t] if buffers and not traced else ()
        probes = [(n, new_buffers[n]) for n in slots.buffers if n in new_buffers] if probe or eval_probe else ()
        # Registered buffers the forward could reassign (self.mean = ...; frozen params cannot be: nn.Module
        # refuses a plain tensor for a parameter), looked for after the call.
        reassignable = slots.buffers & new_buffers.keys() if new_buffers else frozenset()
        modes = [(m, m.training) for m in module.modules()] if module.training != train else None
        if modes is not None:
            module.train(train)
        record = None
        if not traced and (swaps := _SWAPS.get()) is not None and torch.is_grad_enabled():
            record = (module, slots, params, tensors, train if modes is not None else None, _IN_APPLY.depth)
            swaps.append(record)  # recorded as the call begins (see _SWAPS)
        try:
            # Under torch.compile, and under fnlit's own vmaps (ensemble: the key is batched), the caller seeds, once,
            # outside (see fnlit.random). A plain key under a torch.func transform nobody seeded for (the user's
            # torch.func.grad of a loss, jacrev, vmap) seeds the forward here, as eager: the same key, the same masks.
            if compiling:  # (no lock: see _call_swapped)
                out = _call_swapped(module, slots, tensors, reassignable, args, kwargs, traced=True)
            elif traced:  # functional_call also puts a buffer the forward reassigned in its place in `tensors`
                key = None if rng is None else _random._unbatched(rng)
                if key is None:
                    out = _functional_call(module, slots, tensors, args, kwargs)
                else:
                    saved = _random._seed_eager(key, _seed_device(tensors, args, kwargs))
                    try:
                        out = _functional_call(module, slots, tensors, args, kwargs)
                    finally:
                        _random._restore(saved)
            else:
                if probes:  # the first forward: which copies do ops write (by their schemas, not by comparing values)
                    with _WriteRecorder({_storage.address(c) for _, c in probes} - {0}) as recorder:
                        out = _forward(module, slots, tensors, reassignable, args, kwargs, rng)
                    written = recorder.written
                else:
                    out = _forward(module, slots, tensors, reassignable, args, kwargs, rng)
        except BaseException:
            if record is not None:
                _drop(swaps, record)
            raise
        finally:
            if modes is not None:  # each submodule as it was (a BatchNorm frozen with .eval() stays frozen)
                for m, was in modes:
                    m.training = was
        reassigned = []
        for name in reassignable:  # reassigned by the forward: the update
            if tensors[name] is not new_buffers[name]:
                if tensors[name] is None:
                    raise TypeError(_BUFFER_NONE.format(module=type(module).__name__, name=name, attr=name.rpartition('.')[2]))
                new_buffers[name] = tensors[name].detach()
                reassigned.append(name)
        if probe or eval_probe:  # the copies come back, changed or not: a write through .data moves no version counter
            # (fresh copies are at version 0). F.batch_norm writes its running statistics moving no version: an op
            # whose schema writes a copy (Tensor(a!)) counts too. Read from the ops, never from the values: the same
            # on every rank whatever its data, and NaN-safe.
            silent = frozenset(
                n for n, copied in probes
                if not copied._version and _storage.address(copied) in written and new_buffers[n] is copied and n not in slots.copied
            )
            slots.silent = slots.silent | silent
            if probe:
                slots.copied = slots.copied | frozenset(n for n, copied in probes if copied._version) | silent
                slots.probed, learned = True, slots.copied
            else:  # what an eval forward updates comes back in new_buffers, as a training forward's
                slots.eval_copied = frozenset(n for n, copied in probes if copied._version) | silent
                slots.eval_probed, learned = True, slots.eval_copied
            for n, copied in probes:  # no version moved: data_parallel need not average them (see _PROBE_COPIES)
                if not copied._version and new_buffers[n] is copied and n not in learned:  # (BN's kernel moves none)
                    _PROBE_COPIES.add(copied)
        changed = [n for n, t, version in watched if t._version != version]
        if changed:
            _learn_updated(module, slots, changed, train)
        if mutable is False:
            return out, dict(buffers)
        if copy and not traced and not inference and (train or torch.is_grad_enabled()):  # (inference tensors: no versions)
            # statistics the forward updated: apply_gradients must get them (an eval-mode forward's too, inside a
            # training step: where gradients are on, not in a validation).
            # Written in place (a fresh copy's version moved) or reassigned; not a frozen (eval-mode) BatchNorm's,
            # whose copies nothing wrote. BatchNorm's kernel moves no version for its running statistics, only
            # num_batches_tracked's (bumped by the same update): that one stands for all three.
            learned = slots.copied if train else slots.eval_copied
            updated = [n for n in copy if n in learned and (new_buffers[n]._version or n in reassigned or n in slots.silent)]
            if updated:
                names = set(updated)
                for n in updated:
                    if n.endswith("num_batches_tracked"):
                        stem = n[: -len("num_batches_tracked")]
                        names.update(k for k in (stem + "running_mean", stem + "running_var") if k in new_buffers)
                _UPDATED_FROM.set((buffers, sorted(names)))
            elif train and (seen := _UPDATED_FROM.get()) is not None and seen[0] is buffers:
                # An earlier forward's note on these buffers: what belongs to modules frozen since (eval mode) is void;
                # a module that merely did not run in this forward still had its update dropped.
                # (train=True on a module in eval mode ran every submodule in training mode: none was frozen)
                still = list(seen[1]) if modes is not None else [n for n in seen[1] if _owner(module, n).training]
                _UPDATED_FROM.set((buffers, still) if still else None)
        return out, new_buffers
    finally:
        if lock is not None:
            lock.release()


_BUFFER_NONE = (
    "fnlit.apply: {module}'s forward set its buffer {name!r} to None (self.{attr} = None). The buffers are part of the "
    "state (state.buffers), which holds tensors: keep a tensor there (an empty one, or zeros beside a flag buffer "
    "saying whether it is set), or keep the value outside the module."
)


def _owner(module: nn.Module, name: str) -> nn.Module:
    """The submodule that holds the buffer ``name``."""
    prefix = name.rpartition(".")[0]
    return module.get_submodule(prefix) if prefix else module


_DROPPED_BUFFERS = (
    "apply_gradients got no buffers=, but this step's forward (fnlit.apply on state.buffers) updated the "
    "buffers {names}: the new state keeps the old ones, so they never change (BatchNorm's "
    "running statistics stay at their initial values, and evaluation uses those). Pass what fnlit.apply "
    "returned: `out, new_buffers = fnlit.apply(...)` and `state.apply_gradients(grads, buffers=new_buffers)` "
    "(return them from the loss function as aux: fnlit.value_and_grad(loss_fn, has_aux=True)), rather than "
    "setting them afterwards with .replace(buffers=...). To keep the old buffers on purpose, pass "
    "buffers=state.buffers, or call fnlit.apply with mutable=False."
)


def check_buffers_kept(buffers: Mapping[str, Any], changes: Mapping[str, Any]) -> None:
    """Warns when a forward updated ``buffers`` (a state's) and the update is about to be dropped."""
    seen = _UPDATED_FROM.get()
    if seen is None:
        return
    _UPDATED_FROM.set(None)
    if "buffers" not in changes and seen[0] is buffers:
        names = seen[1]
        warnings.warn(_DROPPED_BUFFERS.format(names=names[:4] + (["..."] if len(names) > 4 else [])), stacklevel=3)


def _learn_updated(module: nn.Module, slots: _Slots, names: list[str], train: bool) -> None:
    """A forward updated the caller's buffers ``names`` in place: copy them before every later forward."""
    if train:
        slots.copied = slots.copied | frozenset(names)
    else:
        slots.eval_copied = slots.eval_copied | frozenset(names)
    mode = "training" if train else "eval-mode"
    warnings.warn(
        f"fnlit.apply: {type(module).__name__}'s forward updated the buffer(s) {names} in place, so the "
        f"buffers passed in (state.buffers) changed in this call. From now on they are copied before every "
        f"{mode} forward of this module, as BatchNorm statistics are, and the updated copies come back as new "
        f"buffers (its first {mode} forward did not update them); pass mutable=True to copy every buffer "
        "on every call.",
        stacklevel=3,
    )


_NOT_SCALAR = (
    "fnlit.value_and_grad expected the function to return a scalar loss (a 0-d tensor), got a tensor of "
    "shape {shape} instead. Reduce it first, e.g. loss.mean() or F.cross_entropy(..., reduction='mean')."
)


def _check_loss(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        hint = ""
        if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
            hint = (f" (a tuple of {len(value)}): a function returning (loss, aux) needs has_aux=True, as in "
                    "fnlit.value_and_grad(loss_fn, has_aux=True)")
        raise TypeError(f"fnlit.value_and_grad expected the function to return a tensor, got {type(value).__name__}{hint}.")
    if value.dim() != 0:
        raise ValueError(_NOT_SCALAR.format(shape=tuple(value.shape)))
    if not value.is_floating_point():
        raise TypeError(f"fnlit.value_and_grad expected a floating-point loss, got dtype {value.dtype}.")
    return value


def _split_out(out: Any, has_aux: bool) -> tuple[torch.Tensor, Any]:
    if not has_aux:
        return _check_loss(out), None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            "fnlit.value_and_grad(..., has_aux=True) expected the function to return (loss, aux), "
            f"got {type(out).__name__} instead."
        )
    return _check_loss(out[0]), out[1]


# While an eager value_and_grad runs its loss: the swaps fnlit.apply makes there, as (module, slots, params,
# tensors, the training mode apply set or None, how many apply forwards were running as it began), redone if the
# backward runs a forward again (see _Backward). In the order the calls begin: an apply inside another's forward (a
# hypernetwork's, on a submodule) comes after it and is redone after it, so the submodule gets the inner call's
# tensors, as it had in the forward.
_SWAPS: ContextVar[list[tuple[Any, ...]] | None] = ContextVar("fnlit_apply_swaps", default=None)


def _drop(swaps: list[tuple[Any, ...]], record: tuple[Any, ...]) -> None:
    """Removes a failed call's record (by identity: list.remove would compare the tensors of others)."""
    for i in range(len(swaps) - 1, -1, -1):
        if swaps[i] is record:
            del swaps[i]
            return


class _InApply(threading.local):
    """How many of this thread's fnlit.apply forwards are running (their modules hold the tensors they were given)."""

    depth = 0


_IN_APPLY = _InApply()

_TANGLED = (
    "fnlit.value_and_grad: a forward of {name} ran during the backward (activation checkpointing, "
    "torch.utils.checkpoint, runs a block's forward again there), but this loss applied {name} to two "
    "different sets of params (a teacher and a student sharing one module object), so which of them the "
    "recomputed block is to read is unknown. Compute the one that needs no gradient under torch.no_grad() "
    "(a teacher), give the other its own module (copy.deepcopy(model)), or checkpoint around the call "
    "instead: checkpoint(lambda p, x: fnlit.apply(model, p, buffers, x)[0], params, x, use_reentrant=False)."
)

_OVERLAP = (
    "fnlit.value_and_grad: a forward of {name} ran during a backward (activation checkpointing runs a block's "
    "forward again there) while another thread's backward through the same module object was running too, "
    "{how}. The module can hold only one of their tensors: give each thread its own module "
    "(copy.deepcopy(model)), or let the threads' steps take turns (a lock around the step)."
)

# The backwards in flight (any thread) whose loss applied modules, and the forward pre-hook installed while there
# are any. Both under fnlit.random's lock.
_ACTIVE: list[_Backward] = []
_HOOK: list[Any] = []


class _Backward:
    """One eager value_and_grad backward whose loss ran modules through fnlit.apply.

    ``torch.utils.checkpoint`` runs a checkpointed block's forward again during the backward, reading the
    module's attributes: by then apply had put the module's own tensors back (wrong gradients), and a BatchNorm
    there would update the module's own statistics. When no other backward in flight reaches the modules, the
    backward's start puts its tensors and training modes into them (a block reading a parameter directly reads
    them too) and its end puts the module's own back (fnlit's readers and writers of those, ``TrainState.create``
    and ``fnlit.export``, reach them meanwhile through :func:`own_tensors`). When another one (another thread's) does, a process-wide
    forward pre-hook watches for a forward of a module they applied that runs inside a backward (autograd's
    graph task) and not inside an apply: the first one puts that backward's tensors in, so a backward that
    recomputes nothing never touches the module the other holds. A module applied to different params in one
    loss (two calls that differ in more than their registered buffers, which calls thread through; or a model and,
    in a call of its own, not inside the model's forward, one of its blocks) is left as it is, and its forward
    during the backward raises (:data:`_TANGLED`, through the hook); so does a
    recompute while another thread's backward holds the module (:data:`_OVERLAP`). Either way this costs
    ~3 us a backward on a CPU.
    """

    def __init__(self, records: list[tuple[Any, ...]]) -> None:
        self.records = records
        self.thread = threading.get_ident()
        self.owners: dict[int, nn.Module] | None = None  # id of every module the records reach -> its root
        self.tangled: set[int] = set()
        self.pending = False  # modules sharing some, not told apart yet (see _dedup)
        self.saved: list[tuple[_Slots, list[Any]]] | None = None  # swapped in: the module's own, in order
        self.held: frozenset[tuple[int, str]] = frozenset()  # swapped in: the slots (see _Slots.keys)
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> _Backward:
        # (a value_and_grad inside a forward that apply runs: its backward's recomputes count)
        self.depth, _IN_APPLY.depth = _IN_APPLY.depth, 0
        with _random._LOCK:
            # Uncontended (no other backward in flight reaches these modules; another thread's apply forward
            # holds this lock throughout): the tensors go in now, so a block reading a parameter before any
            # submodule call (F.linear(x, self.w)) reads them too, and no hook is needed unless a module is tangled.
            self._dedup()
            self.lazy = bool(self.tangled) or self.pending or bool(_ACTIVE) and any(self._meets(b) for b in _ACTIVE)
            _ACTIVE.append(self)
            if not self.lazy:
                self.swap_in(None)
            elif not _HOOK:
                _HOOK.append(torch.nn.modules.module.register_module_forward_pre_hook(_recompute_hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        _IN_APPLY.depth = self.depth
        with _random._LOCK:
            _ACTIVE.remove(self)
            if _HOOK and not any(b.lazy for b in _ACTIVE):
                _HOOK.pop().remove()
            if self.saved is not None:
                for slots, old in reversed(self.saved):  # in reverse: a later record's saved the earlier's tensors
                    _swap_back(slots, old)
                for m, was in self.modes:
                    m.training = was

    def _dedup(self) -> None:
        """Keeps each module's last record (the buffers it returned); notes modules applied to two param sets."""
        records = self.applied = self.records  # (all of them: a tangled module's forward raises)
        if len(records) == 1:
            return
        latest = {}
        for rec in records:
            prev = latest.get(id(rec[0]))
            if prev is not None and prev[2] is not rec[2] and not _same_params(prev, rec):
                self.tangled.update(id(m) for m in rec[0].modules())
            latest[id(rec[0])] = rec
        self.latest = latest
        if len(latest) > 1:  # modules sharing some (a model and one of its blocks): told apart at the first recompute
            last = list(latest.values())  # (swap_in), so a backward that recomputes nothing never pays for it
            self.pending = any(not a[1].keys.isdisjoint(b[1].keys) for n, a in enumerate(last) for b in last[n + 1 :])
        self._keep_latest()

    def _keep_latest(self) -> None:
        self.records = [rec for rec in self.applied if self.latest[id(rec[0])] is rec and id(rec[0]) not in self.tangled]

    def _overlaps(self) -> None:
        """Notes the modules that two calls of one loss on different modules sharing some (a model, and one of its
        blocks on its own) gave different tensors: one call after the other, not one inside the other's forward (a
        hypernetwork applying a submodule to generated weights: the inner call's tensors are the ones to redo)."""
        records, last = self.applied, list(self.latest.values())
        shared = [(a[0], b[0]) for n, a in enumerate(last) for b in last[n + 1 :] if not a[1].keys.isdisjoint(b[1].keys)]
        for first, second in shared:
            for j, later in enumerate(records):
                if later[0] is not first and later[0] is not second:
                    continue
                for i in range(j):
                    earlier = records[i]
                    if earlier[0] is later[0] or (earlier[0] is not first and earlier[0] is not second):
                        continue
                    if all(r[5] > earlier[5] for r in records[i + 1 : j + 1]):
                        continue  # every call since began deeper: later ran inside earlier's forward
                    if not _same_slots(earlier, later):
                        self.tangled.update({id(m) for m in first.modules()} & {id(m) for m in second.modules()})

    def _meets(self, other: _Backward) -> bool:
        """Whether the two backwards' losses applied a module in common."""
        self.reaches(None)
        other.reaches(None)
        return any(k in self.owners for k in other.owners)  # type: ignore[operator, union-attr]

    def reaches(self, module: nn.Module | None) -> bool:
        """Whether the loss applied ``module`` or a module holding it (``owners`` built when first needed)."""
        if self.owners is None:
            self.owners = {id(m): rec[0] for rec in self.applied for m in rec[0].modules()}
        return id(module) in self.owners

    def swap_in(self, module: nn.Module | None) -> None:
        """Gives the modules this backward's tensors and training modes (once); raises for a tangled module."""
        if self.pending:
            self.pending = False
            self._overlaps()
            self._keep_latest()
        if module is not None and id(module) in self.tangled:
            raise RuntimeError(_TANGLED.format(name=type(self.owners[id(module)]).__name__))  # type: ignore[index]
        if self.saved is not None:
            return
        records = self.records
        held = records[0][1].keys if len(records) == 1 else frozenset().union(*(rec[1].keys for rec in records))
        if any(not held.isdisjoint(b.held) for b in _ACTIVE if b is not self):  # (held: set with saved)
            raise RuntimeError(_OVERLAP.format(name=type(module).__name__, how="recomputing a block of it"))
        self.saved = [(slots, _swap_in(slots, tensors)) for _, slots, _, tensors, _, _ in records]
        self.held = held
        for root, _, _, _, train, _ in self.records:
            if train is not None and root.training != train:
                self.modes += [(m, m.training) for m in root.modules()]
                root.train(train)


def own_tensors(module: nn.Module) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """``list(module.named_parameters())`` and ``list(module.named_buffers())``, with the module's own tensors.

    While an eager value_and_grad backward runs (any thread) its step's tensors sit in the module's attributes
    (:class:`_Backward`), and the module's own are the ones it saved: read from there. (Putting them back for the
    read is no option: that backward's recompute reads the attributes without the lock.) The caller holds
    fnlit.random's lock, under which backwards start and end and apply swaps; one writing into the tensors
    (``fnlit.export``) keeps it until done.
    """
    held: dict[tuple[int, str], Any] = {}  # (id of the owning dict, attribute) -> the module's own tensor
    for b in _ACTIVE:
        for slots, old in b.saved or ():  # (old: one per slot, then the derived attributes' tuple, left out by zip)
            for key, t in zip(zip(map(id, slots.dicts), slots.attrs), old):
                held.setdefault(key, t)  # the first record's: a later one's saved the earlier's step tensors
    if not held:
        return list(module.named_parameters()), list(module.named_buffers())
    # What named_parameters/named_buffers do (every module once, every tensor under its first name), on own tensors.
    out: tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]] = ([], [])
    for kind, found in zip(("_parameters", "_buffers"), out):
        seen: set[int] = set()
        for prefix, m in module.named_modules():
            d = getattr(m, kind)
            for attr, t in d.items():
                t = held.get((id(d), attr), t)
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    found.append((f"{prefix}.{attr}" if prefix else attr, t))
    return out


def set_own_mode(module: nn.Module, train: bool) -> None:
    """``module.train(train)``; a submodule whose training flag a backward in flight set (:class:`_Backward`) gets
    it at that backward's end, not under its recompute. The caller holds fnlit.random's lock."""
    held: dict[int, list[tuple[list[tuple[nn.Module, bool]], int]]] = {}  # id -> where backwards noted its flag
    for b in _ACTIVE:
        for i, (m, _) in enumerate(b.modes):
            held.setdefault(id(m), []).append((b.modes, i))
    if not any(id(m) in held for m in module.modules()):  # (a module's own train() override runs, as torch's)
        module.train(train)
        return
    for m in module.modules():
        if id(m) not in held:
            m.training = train
        for modes, i in held.get(id(m), ()):
            modes[i] = (m, train)


_NO_RECORDS = contextlib.nullcontext()  # (reusable: it holds nothing)


def _recompute_hook(module: nn.Module, args: Any) -> None:
    """The forward pre-hook installed while a :class:`_Backward` runs (see there)."""
    if _IN_APPLY.depth or torch._C._current_graph_task_id() == -1:
        return  # a forward inside an apply (it holds that call's tensors), or outside any backward
    with _random._LOCK:
        found = [b for b in _ACTIVE if b.reaches(module)]
        if not found:
            return
        if len(found) > 1:  # autograd runs a CPU graph on the thread that started it
            found = [b for b in found if b.thread == threading.get_ident()]
            if len(found) != 1:
                how = "and which of them this forward belongs to is unknown"
                raise RuntimeError(_OVERLAP.format(name=type(module).__name__, how=how))
        found[0].swap_in(module)


def _same_params(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether two applies of one module gave it the same tensors, registered buffers aside: one tensor, or whole
    views of one (a gradient penalty's inner value_and_grad differentiates views of the outer one's params)."""
    buffers, ta = a[1].buffers, a[3]
    return all(_same_source(ta.get(k), t) for k, t in b[3].items() if k not in buffers)


def _same_slots(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether two applies of modules sharing some gave the shared slots the same tensors, registered buffers aside
    (as :func:`_same_params`)."""
    given = [{(id(d), attr): t[name] for name, places in r[1].where.items() if name not in r[1].buffers for d, attr in places}
             for r in (a, b) for t in (r[3],)]
    return all(_same_source(t, given[1][k]) for k, t in given[0].items() if k in given[1])


def _same_source(a: Any, b: Any) -> bool:
    if a is b:
        return True
    base_a, base_b = getattr(a, "_base", None), getattr(b, "_base", None)
    if base_a is not b and base_b is not a and (base_a is None or base_a is not base_b):
        return False
    return a.shape == b.shape and a.stride() == b.stride() and a.storage_offset() == b.storage_offset()


try:  # what torch.autograd.backward/grad call once their arguments are checked
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # pragma: no cover - older torch: the public functions only
    _engine_run_backward = None


def _backward(
    target: torch.Tensor, seed: torch.Tensor | None, inputs: list[torch.Tensor], accumulate: bool, plain: bool = False
) -> list[torch.Tensor] | None:
    """Backpropagates ``seed`` (default ones) from ``target`` to ``inputs``.

    ``accumulate``: add into the inputs' ``.grad`` (``torch.autograd.backward``) and return None; else
    return the gradients, zeros where ``target`` does not depend on an input (``torch.autograd.grad``
    with ``allow_unused=True, materialize_grads=True``). For plain tensors this calls autograd's engine
    as those two functions do after checking their arguments, which here hold by construction (one
    scalar target, its own seed, fresh leaves): the checks cost ~25 us per call on a CPU, 10-15 % of a
    small model's micro-batch. Tensor subclasses (DTensor) take the public functions; ``plain`` says the
    inputs are known to be plain tensors (accumulate's leaves, checked once per step).
    """
    if not target.requires_grad:
        raise _no_grad_fn()
    if not inputs:  # (autograd's engine asserts, or accumulates into every leaf's .grad, given none)
        raise RuntimeError(_UNREACHED.format(how=_NO_INPUTS))
    if (
        _engine_run_backward is None
        or type(target) is not torch.Tensor
        or not (plain or all(type(t) is torch.Tensor for t in inputs))
    ):
        if accumulate:
            torch.autograd.backward(target, seed, inputs=inputs)
            return None
        grads = list(torch.autograd.grad(target, inputs, seed, allow_unused=True, materialize_grads=True))
        return _owned(grads) if all(type(g) is torch.Tensor for g in grads) else grads
    seeds = (torch.ones_like(target) if seed is None else seed,)
    grads = _engine_run_backward((target,), seeds, False, False, tuple(inputs), True, accumulate_grad=accumulate)
    if accumulate:
        return None
    if inputs and all(g is None for g in grads):
        raise RuntimeError(_UNREACHED.format(how="its graph reaches none of them"))
    return _owned([g if g is not None else torch.zeros_like(t) for g, t in zip(grads, inputs)])


def _owned(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """``grads`` as ``.grad`` would hold them: each in memory of its own (copies where not).

    Autograd may hand two inputs one tensor (both terms of ``w = base + delta``) or a stride-0 expand (a param
    reached only through ``.sum()``); AccumulateGrad copies such gradients into ``.grad``. In-place work on
    them -- a step's ``g.clamp_()``, accumulate's scaling and summing, amp's unscaling -- would otherwise change
    a shared one twice, or fail on the expanded one. Only overlapping ones are copied (disjoint slices of one
    storage and channels_last layouts are kept); checking costs ~0.2 us a tensor. A sparse gradient
    (``nn.Embedding(sparse=True)``'s) is checked by its values, which can be views of the same upstream gradient
    (two embeddings summed) or an expand (a bag of words summed over a batch of one): it stays sparse, with its
    values copied.
    """
    memory = [g if g.layout is torch.strided else g._values() if g.layout is torch.sparse_coo else None for g in grads]
    held = [m for m in memory if m is not None]
    storages = {m.untyped_storage().data_ptr() for m in held}
    if len(storages) == len(held) and not any(_self_overlapping(m) for m in held):
        return grads
    out, ranges = [], {}  # storage -> the byte ranges of the gradients kept on it
    for g, m in zip(grads, memory):
        if m is not None:
            ptr, span = m.untyped_storage().data_ptr(), _byte_range(m)
            if _self_overlapping(m) or any(a < span[1] and span[0] < b for a, b in ranges.get(ptr, ())):
                # (a dense one preserve_format: a channels_last gradient stays channels_last)
                g = g.clone() if m is g else _with_values(g, m.clone(memory_format=torch.contiguous_format))
            else:
                ranges.setdefault(ptr, []).append(span)
        out.append(g)
    return out


def _with_values(g: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Sparse COO ``g`` with ``values`` in place of its own (its indices and coalesced flag kept; no checks)."""
    return torch.sparse_coo_tensor(g._indices(), values, g.shape, is_coalesced=g.is_coalesced(), check_invariants=False)


def _self_overlapping(t: torch.Tensor) -> bool:
    """Whether elements of ``t`` share memory (an expand: stride 0 along a dimension of size > 1)."""
    return 0 in t.stride() and any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape))


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """The bytes of its storage that ``t`` spans (disjoint slices of one storage, as torch.cat's backward hands
    out, do not overlap)."""
    if t.numel() == 0:
        return (0, 0)
    start = t.storage_offset() * t.element_size()
    last = sum((sz - 1) * st for sz, st in zip(t.shape, t.stride()))
    return (start, start + (last + 1) * t.element_size())


# Batch-norm kernels that update running_mean and running_var (arguments 3 and 4) when training (argument 5),
# though their schemas do not mark them written: no version counter moves (F.batch_norm's path on CPU and CUDA).
_BATCH_NORMS = frozenset(("native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm"))


class _WriteRecorder(TorchDispatchMode):
    """Records which of the watched storages (the probe's fresh copies) ops write in place: by their schemas'
    ``Tensor(a!)``, and the running statistics of the batch-norm kernels whose schemas do not say so. By storage,
    so that a write through ``.data`` (another tensor object on the same memory) counts."""

    def __init__(self, watched: set[int]) -> None:
        super().__init__()
        self.watched, self.written = watched, set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        written = [
            args[i] if i < len(args) else kwargs.get(a.name)
            for i, a in enumerate(func._schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write
        ]
        if func._schema.name.removeprefix("aten::") in _BATCH_NORMS and len(args) > 5 and args[5] is True:
            written += [args[3], args[4]]
        for value in written:
            for t in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(t, torch.Tensor) and (ptr := _storage.address(t)) in self.watched:
                    self.written.add(ptr)
        return func(*args, **kwargs)


def _no_grad_fn() -> RuntimeError:
    if torch.is_inference_mode_enabled():  # (the loss function is not to blame)
        return RuntimeError(
            "fnlit.value_and_grad ran under torch.inference_mode(), where autograd records nothing (enable_grad "
            "does not undo it). Call it outside inference mode: under torch.no_grad() it works, or wrap the call "
            "in torch.inference_mode(False) (with inputs made outside inference mode)."
        )
    return RuntimeError(_UNREACHED.format(how="it has no grad_fn"))


_NO_INPUTS = "the differentiated arguments hold no tensor"
_UNREACHED = (
    "fnlit.value_and_grad: the loss does not depend on the arguments it differentiates ({how}). Compute it "
    "from those arguments (e.g. the params passed to the loss function through fnlit.apply, not state.params "
    "or the module's own parameters), and not under detach()."
)


def _detach(tree: Any) -> Any:
    """``tree`` with every tensor that requires grad detached (aux of value_and_grad: buffers, metrics)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach() if tree.requires_grad else tree
    kind = type(tree)
    if kind is dict:  # the usual aux containers, without a tree traversal per call
        return {k: _detach(v) for k, v in tree.items()} if tree else {}
    if kind is tuple:
        return tuple([_detach(v) for v in tree])  # a list comprehension: cheaper than a generator
    if kind is list:
        return [_detach(v) for v in tree]
    if tree is None or kind in (int, float, bool, str):
        return tree
    return _tree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) and t.requires_grad else t, tree)


def value_and_grad(
    fn: Callable[..., Any], argnums: int | tuple[int, ...] = 0, has_aux: bool = False
) -> Callable[..., tuple[Any, Any]]:
    """Returns a function computing ``fn``'s value and its gradient with respect to ``argnums``.

    Like ``jax.value_and_grad``: ``value_and_grad(fn)(params, ...) -> (loss, grads)`` with grads in the
    structure of ``params``; with ``has_aux=True``, ``fn`` returns ``(loss, aux)`` and the result is
    ``((loss, aux), grads)``. ``.grad`` attributes are never used. In eager mode it runs one
    ``torch.autograd.grad`` (no functorch overhead); inside torch.compile or torch.func transforms it
    uses ``torch.func.grad_and_value``. Under :func:`fnlit.data_parallel` (not under :func:`fnlit.accumulate`) a
    number in the aux comes back as a 0-d float64 tensor (float32 on MPS): it travels with the gradients'
    all-reduce. Under :func:`fnlit.amp` the forward runs in autocast and the loss
    is scaled before backward; the returned gradients are already unscaled. A tensor the loss does not
    reach gets a zero gradient (as in JAX), not None: an optimizer's momentum and weight decay still move
    it (``torch.optim`` skips a parameter without ``.grad``); freeze it, or zero its updates with
    ``fnlit.optim.masked(fnlit.optim.set_to_zero(), ...)``. A loss that reaches none of the differentiated
    tensors is an error (see Raises), not all-zero gradients. Where another argument of ``fn`` requires grad (a
    learnable loss weight that an outer ``torch.autograd.grad`` differentiates), or a differentiated one does, the
    value, gradients and aux stay connected to it (``create_graph``), as ``torch.func``'s do; a tensor ``fn``
    only captures (a closure) is a constant there, unless an outer :func:`value_and_grad` differentiates the
    call. Activation checkpointing inside ``fn``
    (``torch.utils.checkpoint``) needs ``use_reentrant=False``: the reentrant kind cannot give gradients with
    respect to chosen tensors; and runs uncompiled only (:func:`fnlit.compile` refuses it: ``torch.func``, which
    takes the gradient there, has no support for its saved tensor hooks).

    Raises:
        ValueError: if the loss is not a scalar (the message gives its shape); for repeated argnums, or
            one that names no positional argument.
        TypeError: if argnums is not an int or a tuple of ints; for a differentiated leaf that is not a
            floating-point or complex tensor (naming it: an int, BatchNorm's int64 ``num_batches_tracked``).
        RuntimeError: if the loss depends on none of the differentiated arguments (it reads the module's own
            parameters, ``state.params`` or only constants; on every path, under torch.func transforms and
            torch.compile too); if ``fn`` runs ``torch.utils.checkpoint`` with ``use_reentrant=True`` (eager mode).

    Example:
        >>> import torch
        >>> loss, g = value_and_grad(lambda p: (p["w"] ** 2).sum())({"w": torch.tensor([1.0, 2.0])})
        >>> loss.item(), g["w"].tolist()
        (5.0, [2.0, 4.0])
    """
    # Normalised once: an integer (numpy's too) stays one, any sequence becomes a tuple of ints (torch.func, on
    # the traced path, takes only those two).
    single = isinstance(argnums, numbers.Integral) and not isinstance(argnums, bool)
    if not single and not (isinstance(argnums, Sequence) and not isinstance(argnums, str) and argnums and all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in argnums
    )):
        raise TypeError(f"fnlit.value_and_grad expected argnums to be an int or a non-empty tuple of ints, got {argnums!r} instead.")
    argnums = int(argnums) if single else tuple(int(i) for i in argnums)  # type: ignore[union-attr]
    nums = (argnums,) if isinstance(argnums, int) else argnums
    if len(set(nums)) != len(nums):
        raise ValueError(f"fnlit.value_and_grad expected argnums elements to be unique (as torch.func.grad), got {argnums!r}.")

    lo, hi = min(nums), max(nums)

    def wrapped(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if hi >= len(args) or (lo < 0 and (lo < -len(args) or len({i % len(args) for i in nums}) != len(nums))):
            raise ValueError(
                f"fnlit.value_and_grad(argnums={argnums!r}) got {len(args)} positional argument(s): each argnum must "
                "name a different one (negative ones count from the end)."
            )
        frame = _current_frame()
        if frame is not None and frame.shard_group is not None:
            frame.refuse_per_example(args)
        if frame is None or frame.amp_dtype is None:
            return differentiate(frame, None, args, kwargs)
        if frame.amp_refusal is not None:  # float16 without a loss scaler (or with float16 params): before any forward
            raise ValueError(frame.amp_refusal)
        device = frame.amp_device
        if frame.forwarding and not torch.is_autocast_enabled(device):  # inside a region the user took out of autocast
            return differentiate(frame, None, args, kwargs)
        # fnlit.amp: the forward runs under autocast, the backward not -- also when this call runs inside another
        # forward (a gradient penalty's inner value_and_grad), as PyTorch's GradScaler recipe has it.
        with torch.autocast(device, enabled=False):
            return differentiate(frame, torch.autocast(device, dtype=frame.amp_dtype), args, kwargs)

    def differentiate(frame: Any, autocast: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        if _traced():
            return _functorch_path(fn, argnums, has_aux, frame, autocast, args, kwargs)
        flat = [_tree.tree_flatten(args[i]) for i in nums]
        sources = flat[0][0] if len(flat) == 1 else [t for leaves, _ in flat for t in leaves]
        try:  # (a leaf that is not a tensor fails here: named then, at no cost on the usual path)
            again = torch.is_grad_enabled() and (_NESTED.get() or _any_requires_grad(sources))
        except AttributeError:
            _refuse_non_tensors(nums, args)
            raise
        if not again and (kwargs or len(args) > len(nums)) and torch.is_grad_enabled():
            # another argument requires grad (a learnable loss weight, a hyperparameter differentiated by an outer
            # torch.autograd.grad): value, gradients and aux stay connected to it, as torch.func's do
            again = _others_require_grad(args, nums, kwargs)
        if again:
            # Differentiated again from outside (a gradient penalty: value_and_grad inside value_and_grad, with
            # respect to the params or to an input): a backward with create_graph keeps this gradient a function
            # of everything the loss reads; detached leaves and a first-order backward would not.
            if frame is not None and frame.shard_group is not None:
                raise NotImplementedError(_NESTED_SHARD)
            return _nested_path(fn, nums, argnums, has_aux, frame, autocast, args, kwargs, flat, sources)
        accumulating = frame is not None and frame.accum_k > 1
        try:  # (an integer tensor fails here, in requires_grad_: named then)
            # Under accumulate, the call whose gradients the step applies adds them into the accumulator in
            # place from micro-batch 1 on (Frame.begin_call): no fresh leaves, gradient buffers or add pass.
            shared = frame.begin_call(sources) if accumulating else None
            inputs = shared if shared is not None else [t.detach().requires_grad_() for t in sources]
        except (AttributeError, RuntimeError):
            _refuse_non_tensors(nums, args)
            raise
        new_args = list(args)
        for i, tree in zip(nums, _regroup(flat, inputs)):
            new_args[i] = tree
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(True)  # what torch.enable_grad() does, without its Python wrapper
        nesting = _NESTED.set(True)  # a value_and_grad inside fn is differentiated again (see above)
        swaps: list[tuple[Any, ...]] = []
        recording = _SWAPS.set(swaps)
        try:
            try:
                loss, aux, target = _run_loss(fn, new_args, kwargs, has_aux, frame, autocast)
            finally:
                _SWAPS.reset(recording)
            if frame is not None and frame.shard_group is not None and type(loss) is not torch.Tensor:
                _refuse_sharded_loss(loss)
            # a checkpointed block's forward, run again by the backward, reads what apply gave it
            try:
                with _Backward(swaps) if swaps else _NO_RECORDS:
                    if shared is not None:
                        _backward(target, frame.backward_seed(target), inputs, accumulate=True, plain=True)
                        grads = frame.end_call()
                    else:
                        grads = _backward(target, None, inputs, accumulate=False)
            except RuntimeError as e:
                if _REENTRANT_TORCH in str(e):  # torch's advice (call .backward() without inputs) does not apply
                    raise RuntimeError(_REENTRANT) from e
                raise
        finally:
            _NESTED.reset(nesting)
            torch._C._set_grad_enabled(grad_was_enabled)
        if shared is None and frame is not None:
            if frame.shard_group is not None:
                from .transforms.shard import match_placements

                grads = match_placements(grads, inputs)
            frame.unscale_(grads)
            if accumulating:
                frame.record(sources, grads)
        g = _as_argnums(argnums, _regroup(flat, grads))
        value = (loss.detach(), _detach(aux)) if has_aux else loss.detach()
        if frame is not None:
            value = frame.note_scalars(value, has_aux)
        return value, g

    return wrapped


_REENTRANT_TORCH = "When use_reentrant=True, torch.utils.checkpoint is incompatible"
_REENTRANT = (
    "fnlit.value_and_grad: the loss runs torch.utils.checkpoint with use_reentrant=True, whose backward cannot "
    "compute gradients with respect to given tensors (the params value_and_grad differentiates). Pass "
    "use_reentrant=False (PyTorch's recommended mode): checkpoint(block, x, use_reentrant=False) works inside "
    "fnlit.apply and train_step."
)

# True while an eager value_and_grad runs its function: a value_and_grad called inside it is differentiated again.
_NESTED: ContextVar[bool] = ContextVar("fnlit_nested_value_and_grad", default=False)

_NESTED_SHARD = (
    "fnlit.shard cannot be combined with a value_and_grad inside another (a gradient penalty): differentiating "
    "the inner gradient again would need a second-order backward through the parameter all-gather, which "
    "fnlit.shard does not have. Run such a step under fnlit.data_parallel (whole parameters on every rank)."
)


def _refuse_non_tensors(nums: Sequence[int], args: tuple[Any, ...]) -> None:
    """Raises a TypeError naming the first leaf of the differentiated arguments that cannot be differentiated: one
    that is not a tensor, or an integer or bool tensor (BatchNorm's ``num_batches_tracked`` among buffers)."""
    for i in nums:
        for path, leaf in zip(_tree.tree_paths(args[i]), _tree.tree_leaves(args[i])):
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(
                    f"fnlit.value_and_grad differentiates every leaf of argument {i}, but its leaf {path} is "
                    f"{type(leaf).__name__} {leaf!r}, not a tensor (as torch.func.grad, it takes tensors only). Pass "
                    "constants through another argument (or a closure), or make it a float tensor."
                )
            if not (leaf.is_floating_point() or leaf.is_complex()):
                raise TypeError(
                    f"fnlit.value_and_grad differentiates every leaf of argument {i}, but its leaf {path} is a "
                    f"{leaf.dtype} tensor: only floating-point and complex tensors can be differentiated. Pass "
                    "state.params and keep the buffers (BatchNorm's num_batches_tracked is an int64 one) out of the "
                    "differentiated argument: give them through another argument (or a closure)."
                )


def _refuse_on_transform(nums: Sequence[int], args: tuple[Any, ...]) -> bool:
    """The torch.func path's :func:`_refuse_non_tensors`, on the leaves torch.func.grad takes (torch's pytrees), before
    it fails with a message that names no leaf. Returns whether one of them is None (no leaf of fnlit's trees)."""
    holes = False
    for i in nums:
        for leaf in torch_pytree.tree_leaves(args[i]):
            if leaf is None:
                holes = True
            elif not (isinstance(leaf, torch.Tensor) and (leaf.is_floating_point() or leaf.is_complex())):
                _refuse_non_tensors(nums, args)
                return holes
    return holes


_SHARDED_LOSS = (
    "Under fnlit.shard the loss came back as a DTensor: the loss function reads the sharded params directly "
    "(outside fnlit.apply), as an L2 penalty `sum((p ** 2).sum() for p in params.values())` does, and each rank "
    "holds only its shard of them. Read the whole tensors there with `p.full_tensor()` (differentiable: an "
    "all-gather), or move the penalty into the optimizer (e.g. fnlit.optim.chain(fnlit.optim.add_decayed_weights(wd), "
    "...) adds wd * p to the gradient, as the L2 penalty (wd / 2) * sum(p ** 2) does)."
)


def _refuse_sharded_loss(loss: Any) -> None:
    from ._checkpoint_io import _dtensor_class

    dtensor = _dtensor_class()
    if dtensor is not None and isinstance(loss, dtensor):
        raise ValueError(_SHARDED_LOSS)


def _run_loss(fn, args, kwargs, has_aux, frame, autocast):  # type: ignore[no-untyped-def]
    """``fn``'s loss and aux, under ``autocast`` (None: none), and the loss the backward starts from (scaled
    under float16 amp): the forward every path of value_and_grad runs."""
    if autocast is None:
        loss, aux = _split_out(fn(*args, **kwargs), has_aux)
    else:
        was, frame.forwarding = frame.forwarding, True  # fnlit.apply leaves autocast as this forward sets it
        try:
            with autocast:
                loss, aux = _split_out(fn(*args, **kwargs), has_aux)
        finally:
            frame.forwarding = was
    return loss, aux, (frame.scale_loss(loss) if frame is not None else loss)


def _as_argnums(argnums: int | tuple[int, ...], grads: list[Any]) -> Any:
    """One gradient tree per argnum: the tree for an int argnums, a tuple of them for a tuple (even of one)."""
    return grads[0] if isinstance(argnums, int) else tuple(grads)


def _others_require_grad(args: tuple[Any, ...], nums: Sequence[int], kwargs: dict[str, Any]) -> bool:
    """Whether a tensor among the arguments value_and_grad does not differentiate requires grad. A TrainState is
    skipped (its tensors are the step's constants: train_step passes the state and the batch on every call), a
    tuple or list of tensors (the usual batch) read without a tree flatten."""
    state_type = _STATE_TYPE[0] if _STATE_TYPE else _state_type()
    skip = nums if len(nums) == 1 and nums[0] >= 0 else {i % len(args) for i in nums}
    for i, a in enumerate(args):
        if i in skip or type(a) is state_type:
            continue
        if type(a) in (tuple, list) and all(type(t) is torch.Tensor for t in a):
            if _any_requires_grad(list(a)):
                return True
        elif any(isinstance(t, torch.Tensor) and t.requires_grad for t in _tree.tree_leaves(a)):
            return True
    return bool(kwargs) and any(isinstance(t, torch.Tensor) and t.requires_grad for t in _tree.tree_leaves(kwargs))


_STATE_TYPE: list[type] = []  # fnlit.TrainState, looked up once (fnlit.state imports this module)


def _state_type() -> type:
    from .state import TrainState

    _STATE_TYPE.append(TrainState)
    return TrainState


def _any_requires_grad(tensors: list[Any]) -> bool:
    for t in tensors:  # a loop: a third of any() over a generator, on every value_and_grad call
        if t.requires_grad:
            return True
    return False


def _regroup(flat: list[tuple[list[Any], Any]], leaves: list[Any]) -> list[Any]:
    """``leaves`` (all arguments' leaves, in order) rebuilt into one tree per ``(leaves, treedef)`` of ``flat``."""
    if len(flat) == 1:  # the usual case, without slicing
        return [_tree.tree_unflatten(flat[0][1], leaves)]
    out, start = [], 0
    for own_leaves, treedef in flat:
        out.append(_tree.tree_unflatten(treedef, leaves[start : start + len(own_leaves)]))
        start += len(own_leaves)
    return out


def _device_type(tree: Any) -> str:
    leaves = _tree.tree_leaves(tree)
    return leaves[0].device.type if leaves else "cpu"


def _nested_path(fn, nums, argnums, has_aux, frame, autocast, args, kwargs, flat, sources):  # type: ignore[no-untyped-def]
    """value_and_grad whose result is differentiated again (eager): plain autograd with ``create_graph``.

    Sources that already require grad (the outer call's leaves) are differentiated as they are, the others on
    fresh leaves; the gradients and the value stay connected to everything the loss read, as with
    ``torch.autograd.grad(..., create_graph=True)`` (which, unlike a torch.func transform, also runs forwards
    that update buffers in place or read a tensor on the host).
    """
    # An alias of a source that requires grad: a graph node of its own, so the gradient is this argument's path
    # only (a tensor the function also captures, or the same tensor at two positions, stays a constant, as in
    # torch.func), while staying connected to the outer graph.
    try:
        inputs = [torch.ops.aten.alias(t) if t.requires_grad else t.detach().requires_grad_() for t in sources]
    except (AttributeError, RuntimeError):  # a leaf that is not a tensor, or an integer tensor
        _refuse_non_tensors(nums, args)
        raise
    new_args = list(args)
    for i, tree in zip(nums, _regroup(flat, inputs)):
        new_args[i] = tree
    outer = _SWAPS.get()  # an outer value_and_grad's backward runs this forward's blocks again too
    swaps: list[tuple[Any, ...]] = []
    recording = _SWAPS.set(swaps)
    try:
        loss, aux, target = _run_loss(fn, new_args, kwargs, has_aux, frame, autocast)
    finally:
        _SWAPS.reset(recording)
        if outer is not None:
            outer += swaps
    if not target.requires_grad:
        raise _no_grad_fn()
    if not inputs:
        raise RuntimeError(_UNREACHED.format(how=_NO_INPUTS))
    with _Backward(swaps) if swaps else _NO_RECORDS:
        grads = list(torch.autograd.grad(target, inputs, create_graph=True, allow_unused=True))
    if all(g is None for g in grads):  # (as the first-order paths: a captured tensor read instead of the argument)
        raise RuntimeError(_UNREACHED.format(how="its graph reaches none of them"))
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    if frame is not None:
        frame.unscale_(grads)  # out of place: they require grad
    return ((loss, aux) if has_aux else loss), _as_argnums(argnums, _regroup(flat, grads))


_AT_TENSOR = object()  # marks, among the leaves kept around a transform, where a tensor crossed it


class _NumbersAside:
    """``fn`` for a torch.func transform (vmap, grad's aux), which carries tensors only: its output's tensor leaves
    cross the transform, the other leaves (a Python number among the metrics or the aux, as a loss function may
    return; None) and the structure go around it, as ``fn`` alone returns them. ``rebuild`` puts the transform's
    output back in that structure."""

    def __init__(self, fn: Callable[..., Any] | None = None) -> None:
        self.fn, self.kept = fn, None

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return self.split(self.fn(*args, **kwargs))

    def split(self, tree: Any) -> tuple[torch.Tensor, ...]:
        leaves, spec = torch_pytree.tree_flatten(tree)
        self.kept = (spec, [_AT_TENSOR if isinstance(x, torch.Tensor) else x for x in leaves])
        return tuple(x for x in leaves if isinstance(x, torch.Tensor))

    def rebuild(self, out: tuple[torch.Tensor, ...]) -> Any:
        spec, others = self.kept
        tensors = iter(out)
        return torch_pytree.tree_unflatten([next(tensors) if x is _AT_TENSOR else x for x in others], spec)


def _functorch_path(fn, argnums, has_aux, frame, autocast, args, kwargs):  # type: ignore[no-untyped-def]
    nums = (argnums,) if isinstance(argnums, int) else argnums
    flat: dict[int, Any] = {}
    if _refuse_on_transform(nums, args):
        # A None leaf: torch.func takes tensors only, where the eager path keeps it, None in the gradients too (an
        # empty subtree of fnlit's trees). The differentiated arguments cross the transform as lists of their
        # tensors, rebuilt around it.
        flat = {i % len(args): _tree.tree_flatten(args[i]) for i in nums}  # (wrapped() checked the argnums)
        args = tuple(flat[i][0] if i in flat else a for i, a in enumerate(args))
    aside = _NumbersAside()

    def scaled(*a: Any, **k: Any) -> tuple[torch.Tensor, tuple[Any, ...]]:
        if flat:
            a = tuple(_tree.tree_unflatten(flat[i][1], x) if i in flat else x for i, x in enumerate(a))
        loss, aux, target = _run_loss(fn, a, k, has_aux, frame, autocast)
        # Inside the transform a loss requires grad only if it reads the arguments it differentiates (the module's
        # own parameters or a constant do not count): torch.func would give all-zero gradients, where the eager
        # path's backward refuses such a loss (a DP-SGD step would train on noise alone, a compiled one not move).
        if not target.requires_grad:
            raise RuntimeError(_UNREACHED.format(how="it reads none of them"))
        # functorch's aux must hold tensors only; and under torch.compile an empty dict in it comes back
        # as an empty tuple. So only the tensor leaves of aux cross the transform; the structure and the
        # other leaves (a Python number among the metrics, a string) go around it, as the eager path keeps them.
        return target, aside.split((loss, aux) if has_aux else (loss,))

    # argnums as the caller gave it: an int gives one tree of gradients, a tuple (even of one) a tuple of them.
    if torch.compiler.is_compiling():  # (a sparse gradient fails the capture: fnlit.compile names it, running eagerly)
        grads, out = torch.func.grad_and_value(scaled, argnums=argnums, has_aux=True)(*args, **kwargs)
    else:
        seen: list[str] = []
        token = _SPARSE_SEEN.set(seen)
        try:
            grads, out = torch.func.grad_and_value(scaled, argnums=argnums, has_aux=True)(*args, **kwargs)
        except RuntimeError as e:  # a sparse gradient under vmap: "Could not run 'aten::view' ... 'SparseCPU' backend"
            if seen and "Sparse" in str(e):
                raise ValueError(sparse_refused(
                    "torch.func.vmap (fnlit.ensemble, fnlit.per_example_grads)", " (vmap has no batching rule for them)",
                    seen, ": fnlit.optim steps the same on the dense gradient",
                )) from None
            raise
        finally:
            _SPARSE_SEEN.reset(token)
    # Copies, as the eager path's _owned makes where needed (the storage test does not reach through vmap's or
    # compile's tensors): a step that edits its gradients in place changes a shared one once. Compiled, the
    # copies fuse into their consumers.
    grads = _tree.tree_map(lambda g: g.clone() if isinstance(g, torch.Tensor) else g, grads)
    if flat:  # each argument's gradients, from the list of its tensors, in its structure (None where it holds None)
        each = (grads,) if isinstance(argnums, int) else grads
        trees = [_tree.tree_unflatten(flat[i % len(args)][1], g) for i, g in zip(nums, each)]
        grads = trees[0] if isinstance(argnums, int) else tuple(trees)
    out = aside.rebuild(out[1])  # out is (scaled loss, the tensor leaves of (loss, aux))
    if frame is not None and frame.scaler is not None:
        leaves, treedef = _tree.tree_flatten(grads)
        frame.unscale_(leaves)
        grads = _tree.tree_unflatten(treedef, leaves)
    return (out if has_aux else out[0]), grads


_RESERVED = frozenset({"rng", "train"})
_BOUND_RESERVED = (
    "model(..., {name}=...): the model a train_step/eval_step loss gets runs the {module} through fnlit.apply, which "
    "takes {name} as its own keyword (rng and train are set by the step: train_step/eval_step choose train, and rng "
    "comes from state.rng), so it would not reach the forward. Pass the forward's {name} positionally (model(x, value))."
)


class _BoundModel:
    """``module`` bound to a state's params, buffers and key; threads buffers through repeated calls."""

    def __init__(self, module: nn.Module, params: Params, buffers: Buffers, rng: torch.Tensor | None, train: bool):
        self.module, self.params, self.buffers, self.rng, self.train = module, params, buffers, rng, train
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs and not _RESERVED.isdisjoint(kwargs):  # (mutable= goes to apply: a forward whose statistics are not kept)
            name = "rng" if "rng" in kwargs else "train"
            raise TypeError(_BOUND_RESERVED.format(name=name, module=type(self.module).__name__))
        rng = self.rng if self.calls == 0 or self.rng is None else _random.fold_in(self.rng, self.calls)
        self.calls += 1
        out, self.buffers = apply(self.module, self.params, self.buffers, *args, rng=rng, train=self.train, **kwargs)
        return out

    # Only reached for what the bound model does not have (its own attributes are found first): no cost to a call.
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # (copy, pickle and friends probe for protocol methods)
            raise AttributeError(name)
        raise AttributeError(_BOUND_ONLY_CALLED.format(what=f"model.{name}", module=type(self.__dict__.get("module")).__name__))

    def __getitem__(self, key: Any) -> Any:
        raise TypeError(_BOUND_ONLY_CALLED.format(what=f"model[{key!r}]", module=type(self.module).__name__))


_BOUND_ONLY_CALLED = (
    "The model that train_step/eval_step pass to the loss function is the {module} bound to the state's params, "
    "buffers and key: it can only be called, model(*inputs), which runs the whole module; {what} is not "
    "supported. To run a submodule or read an attribute, write the step by hand: inside a loss given to "
    "fnlit.value_and_grad, fnlit.apply(module, params, buffers, x, rng=rng) runs the module on the state's "
    "tensors, and the module object itself holds the attributes (its sizes, config)."
)


def _loss_and_metrics(out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], Mapping):
            raise TypeError(
                f"the loss function of fnlit.train_step must return loss or (loss, metrics dict), got a tuple of {len(out)}."
            )
        return out[0], dict(out[1])
    return out, {}


def train_step(module: nn.Module, loss_fn: Callable[[Callable[..., Any], Batch], Any]) -> StepFn:
    """Builds ``step(state, batch) -> (state, metrics)`` from a loss function, for the common case.

    ``loss_fn(model, batch)`` calls ``model(...)`` like the module (it runs with the state's params,
    buffers and key) and returns ``loss`` or ``(loss, metrics)``. The step differentiates, applies the
    gradients and returns ``{"loss": loss, **metrics}``, all tensors. Hand-written steps are first-class
    too; this is a shortcut.

    Example:
        >>> import torch, torch.nn.functional as F, fnlit
        >>> model = torch.nn.Linear(2, 1)
        >>> def loss_fn(model, batch):
        ...     x, y = batch
        ...     return F.mse_loss(model(x), y)
        >>> step = fnlit.train_step(model, loss_fn)
        >>> state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
        >>> state, metrics = step(state, (torch.randn(4, 2), torch.randn(4, 1)))
        >>> int(state.step), sorted(metrics)
        (1, ['loss'])
    """

    def loss_of(params: Params, state: Any, batch: Batch) -> tuple[torch.Tensor, tuple[Buffers, dict[str, Any]]]:
        model = _BoundModel(module, params, state.buffers, state.rng, train=True)
        loss, metrics = _loss_and_metrics(loss_fn(model, batch))
        return loss, (model.buffers, metrics)

    grad_fn = value_and_grad(loss_of, has_aux=True)  # built once, not per step: state and batch are arguments

    def step(state: Any, batch: Batch) -> tuple[Any, Metrics]:
        (loss, (buffers, metrics)), grads = grad_fn(state.params, state, batch)
        return state.apply_gradients(grads, buffers=buffers), {"loss": loss, **metrics}

    return step


def eval_step(module: nn.Module, metrics_fn: Callable[[Callable[..., Any], Batch], Any]) -> Callable[[Any, Batch], Metrics]:
    """Builds ``eval_step(state, batch) -> metrics`` (eval mode, no gradients) for :func:`fnlit.evaluate`.

    ``metrics_fn(model, batch)`` returns a dict of scalar tensors (or a single loss tensor, reported as
    ``"loss"``). Under :func:`fnlit.amp` (``fnlit.amp(eval_step, dtype)``) the whole of ``metrics_fn`` runs under
    autocast, as Lightning runs ``validation_step`` at a mixed precision.

    Example:
        >>> import torch, torch.nn.functional as F, fnlit
        >>> model = torch.nn.Linear(2, 1)
        >>> state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
        >>> ev = fnlit.eval_step(model, lambda m, b: {"mse": F.mse_loss(m(b[0]), b[1])})
        >>> sorted(ev(state, (torch.randn(4, 2), torch.randn(4, 1))))
        ['mse']
    """

    def step(state: Any, batch: Batch) -> Metrics:
        with torch.no_grad():
            model = _BoundModel(module, state.params, state.buffers, None, train=False)
            frame = _current_frame()
            if frame is None or frame.amp_dtype is None or torch.is_autocast_enabled(frame.amp_device):
                out = metrics_fn(model, batch)
            else:  # fnlit.amp(eval_step): the whole metrics function under autocast, as value_and_grad's loss function
                was, frame.forwarding = frame.forwarding, True  # (its own autocast(enabled=False) regions stay float32)
                try:
                    with torch.autocast(frame.amp_device, dtype=frame.amp_dtype):
                        out = metrics_fn(model, batch)
                finally:
                    frame.forwarding = was
        return dict(out) if isinstance(out, Mapping) else {"loss": out}

    return step
