"""The optimizer interface: ``GradientTransformation``, ``chain``, ``apply_updates``, ``step``.

An optimizer is a pair of pure functions, as in optax: ``init(params) -> state`` and
``update(updates, state, params=None) -> (updates, new_state)``. fnlit adds an optional third one,
``step(grads, state, params) -> (new_params, new_state)``, a fused "update and apply" that the named
optimizers implement with torch's fused multi-tensor kernels. Every function here is pure: it returns
new tensors and never writes into its inputs.
"""

from __future__ import annotations

import contextlib
import operator
import threading
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, NamedTuple

import optree
import torch

from .. import _storage
from ..tree import NONE_GRAD_HINT, first_mismatch, tree_flatten, tree_leaves, tree_map, tree_paths, tree_structure, tree_unflatten

PyTree = Any
Mask = PyTree | Callable[[PyTree], PyTree] | Callable[[str], bool]

__all__ = [
    "GradientTransformation",
    "EmptyState",
    "apply_updates",
    "step",
    "chain",
    "decay_mask",
    "functional_path",
    "use_functional",
]


class GradientTransformation(NamedTuple):
    """An optimizer, as a pair (or triple) of pure functions.

    Attributes:
        init: ``init(params) -> state``.
        update: ``update(updates, state, params=None) -> (updates, new_state)``; ``updates`` are added
            to the params by :func:`apply_updates`.
        step: optional fused ``step(grads, state, params) -> (new_params, new_state)``; equal to
            ``update`` followed by ``apply_updates`` but faster. :func:`step` uses it when present.

    Example:
        >>> import torch
        >>> tx = GradientTransformation(lambda p: EmptyState(), lambda u, s, p=None: (u, s))
        >>> tx.update({"w": torch.ones(1)}, tx.init({}))[0]
        {'w': tensor([1.])}
    """

    init: Callable[[PyTree], Any]
    update: Callable[..., tuple[PyTree, Any]]
    step: Callable[[PyTree, Any, PyTree], tuple[PyTree, Any]] | None = None


class EmptyState(NamedTuple):
    """The state of a transformation that keeps none.

    Example:
        >>> import torch
        >>> from fnlit.optim import scale
        >>> scale(2.0).init({"w": torch.zeros(2)})
        EmptyState()
    """


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """Returns ``params + updates`` leaf by leaf, in the params' dtype.

    Raises:
        ValueError: if an update's shape differs from its parameter's (the sum would broadcast and
            change the parameter's shape), or an update is not a tensor, naming the path and both shapes.

    Example:
        >>> import torch
        >>> apply_updates({"w": torch.ones(2)}, {"w": torch.full((2,), -0.5)})
        {'w': tensor([0.5000, 0.5000])}
    """

    def add(p: torch.Tensor, u: Any) -> torch.Tensor:
        # a flag compare per leaf; broadcasting is silent (a float update too: added to every element)
        if not isinstance(u, torch.Tensor) or u.shape != p.shape:
            raise_shape_mismatch("apply_updates", params, updates, "updates")
        return (p + u).to(p.dtype)

    return tree_map(add, params, updates)


def step(tx: GradientTransformation, grads: PyTree, opt_state: Any, params: PyTree) -> tuple[PyTree, Any]:
    """Applies one optimizer step: ``(new_params, new_opt_state)``.

    Uses the fused ``tx.step`` when the transformation has one, else ``tx.update`` then
    :func:`apply_updates`. This is what ``TrainState.apply_gradients`` calls.

    Example:
        >>> import torch
        >>> from fnlit.optim import sgd
        >>> tx = sgd(0.1)
        >>> params = {"w": torch.ones(2)}
        >>> new_params, _ = step(tx, {"w": torch.ones(2)}, tx.init(params), params)
        >>> new_params
        {'w': tensor([0.9000, 0.9000])}
    """
    # (traced steps never donate; and torch < 2.14 cannot trace a ContextVar's get)
    compiling = torch.compiler.is_compiling()
    if compiling:
        grads = keys_in_order(grads, params)
    record = None if compiling else _DONATED.get()
    written = len(record.updated) if record is not None else 0
    fused = getattr(tx, "step", None)  # (an optax-style pair of init and update has none)
    if fused is not None:
        out = fused(grads, opt_state, params)
    else:
        updates, new_state = tx.update(grads, opt_state, params)
        out = apply_updates(params, updates), new_state
    if record is not None:  # fnlit.donating checks what else the step returns against what was updated
        record.outputs.append(out)
        record.last_in_place = out[0] if len(record.updated) > written else None
    return out


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies transformations one after another; the state is the tuple of their states.

    The chain has a fused ``step`` when its last member has one: the gradients flow through the
    earlier members' ``update`` and then into the last member's ``step``, so
    ``chain(clip_by_global_norm(1.0), adamw(1e-3))`` keeps adamw's fused kernel.

    Example:
        >>> import torch
        >>> from fnlit.optim import adamw, clip_by_global_norm
        >>> tx = chain(clip_by_global_norm(1.0), adamw(1e-3))
        >>> params = {"w": torch.ones(3)}
        >>> new_params, state = step(tx, {"w": torch.full((3,), 10.0)}, tx.init(params), params)
        >>> len(state)
        2
    """

    def init(params: PyTree) -> tuple[Any, ...]:
        return tuple(t.init(params) for t in transforms)

    def update(updates: PyTree, state: tuple[Any, ...], params: PyTree = None) -> tuple[PyTree, tuple[Any, ...]]:
        _check_chain_state(state, len(transforms))
        return _thread(transforms, updates, state, params)

    def fused_step(grads: PyTree, state: tuple[Any, ...], params: PyTree) -> tuple[PyTree, tuple[Any, ...]]:
        _check_chain_state(state, len(transforms))
        grads, head_state = _thread(transforms[:-1], grads, state[:-1], params)
        new_params, last_state = transforms[-1].step(grads, state[-1], params)  # type: ignore[misc]
        return new_params, (*head_state, last_state)

    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(
                f"chain expected GradientTransformation arguments, got {type(t).__name__} at position {i} "
                f"instead. Call the factories: chain(clip_by_global_norm(1.0), adamw(1e-3))."
            )
    has_step = bool(transforms) and transforms[-1].step is not None
    return GradientTransformation(init, update, fused_step if has_step else None)


def _thread(
    transforms: Sequence[GradientTransformation], updates: PyTree, states: Sequence[Any], params: PyTree
) -> tuple[PyTree, tuple[Any, ...]]:
    new_states = []
    for t, s in zip(transforms, states):
        updates, s = t.update(updates, s, params)
        new_states.append(s)
    return updates, tuple(new_states)


def _check_chain_state(state: Any, n: int) -> None:
    if not isinstance(state, tuple) or len(state) != n:
        raise ValueError(
            f"chain expected a tuple of {n} member states (from chain(...).init), got "
            f"{type(state).__name__} instead. Pass the state returned by this chain's init."
        )


# ----------------------------------------------------------------------------------------------
# Fused vs functional: the one dispatch.
# ----------------------------------------------------------------------------------------------
# Both switches are per thread (and per asyncio task): a donating step in one thread must not make a pure
# step in another update its input in place. ContextVar.get() costs ~17 ns against ~10 ns for the list
# index these were (threading.local: ~53 ns); they are read a few times a step. torch.compile cannot trace
# ContextVar.set(), and traced optimizers are functional anyway, so the switches do nothing while compiling.
_FUNCTIONAL: ContextVar[bool] = ContextVar("fnlit_functional", default=False)


class Donation:
    """The record of a donated update: the input tensors the optimizers were handed to update in place.

    :func:`fnlit.donating` reads it: an exception after an in-place update leaves the input state half
    updated (it is then poisoned), and a returned state or metric that shares memory with an updated
    tensor would hold the new values where the step meant the old ones. ``outputs`` are the
    ``(new_params, new_opt_state)`` pairs :func:`step` returned: those hold the updated tensors once each.
    ``last_in_place`` is the new params of the last :func:`step` that updated its inputs in place.
    """

    __slots__ = ("updated", "outputs", "last_in_place")

    def __init__(self) -> None:
        self.updated: list[torch.Tensor] = []
        self.outputs: list[tuple[PyTree, Any]] = []
        self.last_in_place: PyTree = None


_DONATED: ContextVar[Donation | None] = ContextVar("fnlit_donated", default=None)
_NBYTES = operator.attrgetter("nbytes")
_NOTHING_UPDATED = Donation()  # what donated_update yields while torch.compile traces (it stays empty)


@contextlib.contextmanager
def functional_path() -> Iterator[None]:
    """Forces the plain per-leaf (functional) implementation of every optimizer inside the block.

    The functional path is what runs under ``torch.compile`` and ``torch.func`` transforms; forcing
    it in eager mode is useful to check that both paths agree. It applies to the current thread only.

    Example:
        >>> import torch
        >>> from fnlit.optim import adamw
        >>> tx, params = adamw(1e-3), {"w": torch.ones(2)}
        >>> with functional_path():
        ...     new_params, _ = step(tx, {"w": torch.ones(2)}, tx.init(params), params)
    """
    if torch.compiler.is_compiling():
        yield
        return
    token = _FUNCTIONAL.set(True)
    try:
        yield
    finally:
        _FUNCTIONAL.reset(token)


@contextlib.contextmanager
def donated_update(enabled: bool = True) -> Iterator[Donation]:
    """Lets the eager (fused) optimizers write the new params and moments into the given ones.

    Used by :func:`fnlit.donating`: the caller promises never to read the old params and optimizer
    state again, so the fused kernels run on them directly instead of on clones. ``enabled=False``
    turns that off inside the block (float16 amp keeps the old values for overflowed steps). It applies
    to the current thread only: pure steps running in other threads meanwhile stay pure. Yields the
    :class:`Donation` record of the tensors updated in place (a nested block adds to the outer one's).

    Example:
        >>> import torch
        >>> from fnlit.optim import sgd
        >>> tx, params = sgd(0.5), {"w": torch.ones(2)}
        >>> with donated_update() as record:
        ...     new_params, _ = step(tx, {"w": torch.ones(2)}, tx.init(params), params)
        >>> new_params["w"] is params["w"], params["w"], record.updated[0] is params["w"]
        (True, tensor([0.5000, 0.5000]), True)
    """
    if torch.compiler.is_compiling():  # traced optimizers never update in place
        yield _NOTHING_UPDATED
        return
    outer = _DONATED.get()
    record = outer if enabled and outer is not None else Donation()
    token = _DONATED.set(record if enabled else None)
    try:
        yield record
    finally:
        _DONATED.reset(token)


def own(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors a fused kernel may update in place: clones, or the tensors themselves when donated."""
    # Contiguous, always: on the CPU, torch 2.14's fused Adam/SGD kernels silently compute wrong updates
    # for non-contiguous tensors (a [:, :6] slice came out 2*lr off). A donated non-contiguous tensor is
    # therefore copied too (correct results over in-place).
    record = _DONATED.get()
    if record is not None:
        out = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        record.updated += [t for t, o in zip(tensors, out) if o is t]
        return out
    # clone() keeps a contiguous tensor contiguous; the memory_format argument costs ~1 us a tensor.
    return [t.clone() if t.is_contiguous() else t.clone(memory_format=torch.contiguous_format) for t in tensors]


class Recycler:
    """Memory for an optimizer's new params and moments, taken from its own earlier outputs once they are dead.

    A pure update writes fresh tensors. On the CPU, glibc gives large freed blocks back to the OS, so a
    fresh block page-faults (and the kernel zeroes it) as the copy first writes it: copying the 22 MB of
    a 1.9M-parameter AdamW state took 3.7 ms into fresh memory and 1.6 ms into reused memory. The
    recycler keeps the storages it handed out in its last two calls -- the outputs of the last call
    (the state being updated now) and of the call before (usually dropped by the caller since) -- and
    reuses one for a new tensor of the same size only when nothing but the recycler holds it
    (:func:`fnlit._storage.unheld`: no tensor, view, numpy array, autograd graph or storage object of it,
    not in shared memory). A caller that keeps old states keeps their memory; they are never written.

    Only CPU tensors of at least ``MIN_BYTES`` (smaller blocks come back warm from malloc's free lists); one
    recycler per optimizer instance, so its memory goes when the optimizer does. While training it holds
    one dead state's large tensors between steps, as glibc would if it kept them.
    """

    MIN_BYTES = 1 << 20
    __slots__ = ("_kept", "_lock")

    def __init__(self) -> None:
        self._kept: tuple[list[torch.UntypedStorage], list[torch.UntypedStorage]] = ([], [])  # call before last, last
        self._lock = threading.Lock()

    def copies(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """:func:`own` for ``tensors``: contiguous copies (or, donated, the tensors themselves)."""
        if _DONATED.get() is not None or not _storage.AVAILABLE:
            return own(tensors)
        if max(map(_NBYTES, tensors), default=0) < self.MIN_BYTES:  # (in C: the usual answer for a small model)
            return own(tensors)
        # Plain CPU tensors only: the CUDA caching allocator already reuses memory, and a DTensor (fnlit.shard)
        # is copied as a DTensor.
        big = [t.nbytes >= self.MIN_BYTES and type(t) is torch.Tensor and t.is_cpu for t in tensors]
        if not any(big):
            return own(tensors)
        with self._lock:
            spare: dict[int, list[torch.UntypedStorage]] = {}  # by size
            for s in _storage.unheld(self._kept):
                spare.setdefault(s.nbytes(), []).append(s)
            out, handed = [], []
            for t, b in zip(tensors, big):
                if not b:
                    out.extend(own((t,)))
                    continue
                free = spare.get(t.nbytes)
                new = (
                    torch.empty(0, dtype=t.dtype, device="cpu").set_(free.pop(), 0, t.shape)
                    if free
                    else torch.empty(t.shape, dtype=t.dtype, device="cpu")  # (not torch.set_default_device's)
                )
                out.append(new.copy_(t))
                handed.append(new.untyped_storage())
            self._kept = (self._kept[1], handed)  # spares not taken are released
        return out


def own_scaled(tensors: Sequence[torch.Tensor], chosen: Sequence[bool], factor: float | torch.Tensor) -> list[torch.Tensor]:
    """:func:`own`, with the ``chosen`` tensors multiplied by ``factor`` (AdamW's decay).

    Undonated, the product is written straight into the new tensors: one pass over the parameters
    instead of a copy and then an in-place multiply (the same arithmetic, so the same bits).
    """
    picked = [t for t, c in zip(tensors, chosen) if c]
    if _DONATED.get() is not None or not all(t.is_contiguous() for t in picked):
        out = own(tensors)
        picked = [t for t, c in zip(out, chosen) if c]
        if picked:
            torch._foreach_mul_(picked, factor)
        return out
    scaled = iter(torch._foreach_mul(picked, factor) if picked else [])
    return [next(scaled) if c else t.clone(memory_format=torch.contiguous_format) for t, c in zip(tensors, chosen)]


def use_functional(*leaf_lists: Sequence[Any]) -> bool:
    """True when the optimizers must avoid in-place multi-tensor kernels.

    That is under ``torch.compile`` (inductor fuses the plain ops itself), inside ``torch.func``
    transforms (``vmap``/``grad`` wrap tensors; fused kernels have no batching rules), or inside
    :func:`functional_path`.

    Example:
        >>> import torch
        >>> use_functional([torch.ones(2)])
        False
    """
    if torch.compiler.is_compiling() or _FUNCTIONAL.get():  # the flag read is not for dynamo to trace
        return True
    # Inside vmap/grad: O(1). Outside every functorch transform no tensor can be wrapped (they are
    # unwrapped on the way out), so there is nothing to scan leaf by leaf.
    return torch._C._functorch.maybe_current_level() is not None


# ----------------------------------------------------------------------------------------------
# Shared helpers for the transforms and aliases.
# ----------------------------------------------------------------------------------------------
def keys_in_order(tree: PyTree, like: PyTree) -> PyTree:
    """``tree`` with each dict's keys in the order of ``like``'s dict at that place, where both hold the same keys.

    For a traced step only: optree's structures of two dicts with the same keys are equal whatever their order (eager
    fnlit takes gradients keyed in another order than the params), while torch.compile's stand-in for optree counts
    the order, so a compiled step refused them (with a "length mismatch" from printing the structures). Python
    only, on the dicts: nothing is added to the graph.
    """
    if type(tree) is dict and type(like) is dict and tree.keys() == like.keys():
        return {k: keys_in_order(tree[k], like[k]) for k in like}
    return tree


def check_same_structure(name: str, expected: PyTree, got: PyTree, what: str = "grads") -> None:
    """Raises ValueError naming the first differing key when ``got`` does not match ``expected``."""
    if tree_structure(expected) != tree_structure(got):
        _raise_mismatch(name, expected, got, what)


def _raise_mismatch(name: str, expected: PyTree, got: PyTree, what: str = "grads") -> None:
    hint = NONE_GRAD_HINT if what == "grads" else ""
    where = first_mismatch(expected, got, check_shapes=False, none_hint=hint) or "structure differs"
    raise ValueError(
        f"{name}.update expected {what} with the structure of the optimizer state (the params given to "
        f"init), got a different structure instead: {where}. Pass {what} for exactly the parameters "
        f"the optimizer was initialized with, or call init again with the new params."
    )


def raise_wrong_state(name: str, expected: type, state: Any, got: str | None = None) -> None:
    """Raises the ValueError for a state ``name``'s init does not make (one of another optimizer, usually).

    The transformations check ``isinstance(state, expected)`` on each update (no tensor is read): a state of
    another kind failed with an AttributeError on a field it lacks, or, where the fields it read were there
    (sgd on an AdamState), stepped with the other optimizer's learning rate. ``got`` describes the state (default:
    its type's name).
    """
    got = type(state).__name__ if got is None else got
    raise ValueError(
        f"{name}.update expected the state {name}.init makes ({expected.__name__}), got {got} instead: the state "
        "of another optimizer? Build the state with tx.init(params) after changing tx (or TrainState.create; for a "
        "TrainState, state.replace(tx=tx, opt_state=tx.init(state.params)))."
    )


def raise_shape_mismatch(name: str, expected: PyTree, got: PyTree, what: str = "gradients") -> None:
    """Raises the ValueError for ``got`` leaves whose shapes differ from ``expected``'s, naming the first."""
    raise ValueError(
        f"{name} expected {what} of the params' shapes, but they differ {first_mismatch(expected, got)}. "
        "Pass the gradients of state.params (an aggregating transform such as dp_sgd_aggregate goes before "
        "the optimizer in a chain)."
    )


def raise_device_mismatch(name: str, tree: PyTree, i: int, grad: torch.Tensor, param: torch.Tensor) -> None:
    """Raises the ValueError for gradient ``grad`` (leaf ``i`` of ``tree``) on another device than its ``param``
    (torch refuses such a ``.grad`` too)."""
    raise ValueError(
        f"{name}.update expected gradients on the params' devices, but {tree_paths(tree)[i]} has a gradient on "
        f"{grad.device} for a parameter on {param.device}. Differentiate state.params themselves, or move it: "
        "g.to(p.device)."
    )


def grad_in_dtype(name: str, x: torch.Tensor, dtype: torch.dtype, tree: PyTree, i: int) -> torch.Tensor:
    """Gradient ``x`` (leaf ``i`` of ``tree``) in its parameter's ``dtype``: a narrower one (bfloat16 for float32
    params) is cast up; a wider one (the per-leaf math would promote the params), or a real one for a complex
    parameter or the reverse (not that parameter's gradient), raises the ValueError naming it."""
    if x.dtype == dtype:
        return x
    if torch.promote_types(x.dtype, dtype) != dtype or x.dtype.is_complex != dtype.is_complex or not (
        x.is_floating_point() or x.is_complex()
    ):
        raise ValueError(
            f"{name}.update expected gradients of the params' dtypes, but {tree_paths(tree)[i]} has a {x.dtype} "
            f"gradient for a {dtype} parameter. Differentiate state.params themselves, or cast: g.to(p.dtype)."
        )
    return x.to(dtype)


_SPARSE_REFUSED = (
    "{name} does not support sparse gradients{why}, got a {layout} gradient for {path}. Build the module with "
    "dense gradients (e.g. nn.Embedding(..., sparse=False)){fix}."
)
SGD_TAKES_SPARSE = ", or use fnlit.optim.sgd, which takes sparse gradients as torch.optim.SGD does"


def dense_grad(
    name: str, grad: torch.Tensor, tree: PyTree, i: int, refuse: str | None = None, fix: str = SGD_TAKES_SPARSE
) -> torch.Tensor:
    """A sparse gradient (``nn.Embedding(sparse=True)``'s, ``grad.layout`` not strided) as a dense tensor.

    Its repeated indices (one per lookup: autograd hands it uncoalesced) are summed, as ``.grad.to_dense()``
    holds them, so elementwise math on it (momentum, decay) is that of the dense gradient: torch.optim.SGD's
    numbers. ``refuse`` (why, e.g. ``" (as torch.optim.Adam does not)"``) raises the ValueError naming leaf ``i``
    of ``tree`` instead, ending in ``fix``, for the transforms that cannot treat one right. Called only for a
    sparse leaf.
    """
    if refuse is not None:
        raise ValueError(sparse_message(name, refuse, tree_paths(tree)[i], fix, grad.layout))
    return grad.to_dense()


def sparse_message(name: str, why: str, path: str, fix: str, layout: torch.layout = torch.sparse_coo) -> str:
    """The message refusing a sparse gradient at ``path`` (one wording for optimizers, transforms, compile)."""
    return _SPARSE_REFUSED.format(name=name, why=why, layout=layout, path=path, fix=fix)


def refuse_sparse(name: str, leaves: list[torch.Tensor], tree: PyTree, why: str, fix: str = SGD_TAKES_SPARSE) -> None:
    """Raises :func:`sparse_message`'s ValueError for the first sparse leaf of ``tree`` (``leaves``), if any."""
    for i, g in enumerate(leaves):
        if g.layout is not torch.strided:
            raise ValueError(sparse_message(name, why, tree_paths(tree)[i], fix, g.layout))


def flatten_checked(
    name: str, grads: PyTree, reference: PyTree, sparse: str | None = None
) -> tuple[list[Any], Any, list[Any]]:
    """Flattens ``grads`` and ``reference`` (a state tree shaped like the params).

    Raises the structure error when they differ, and the shape error when a leaf's shape differs (or it is not a
    tensor): the per-leaf arithmetic would broadcast it silently (or fail with a message that names no parameter).
    A sparse gradient comes back dense, or is refused for the reason ``sparse`` gives (:func:`dense_grad`).
    """
    g_leaves, g_def = tree_flatten(grads)
    r_leaves, r_def = tree_flatten(reference)
    if g_def != r_def:
        _raise_mismatch(name, reference, grads)
    for i, (g, r) in enumerate(zip(g_leaves, r_leaves)):
        if getattr(g, "layout", None) is not torch.strided:  # sparse, or not a tensor (a float)
            if not isinstance(g, torch.Tensor):
                raise_shape_mismatch(f"{name}.update", reference, grads)
            g_leaves[i] = dense_grad(name, g, grads, i, sparse)
        if g.shape != r.shape:
            raise_shape_mismatch(f"{name}.update", reference, grads)
    return g_leaves, g_def, r_leaves


def decay_mask(params: PyTree) -> PyTree:
    """The usual weight-decay mask: False for biases and other 1-d tensors (norm weights), else True.

    A leaf is excluded when it has fewer than 2 dimensions or its name ends in ``"bias"``.

    Example:
        >>> import torch
        >>> decay_mask({"fc.weight": torch.ones(2, 2), "fc.bias": torch.ones(2), "ln.weight": torch.ones(2)})
        {'fc.weight': True, 'fc.bias': False, 'ln.weight': False}
    """
    if isinstance(params, torch.nn.Module):
        raise TypeError("decay_mask expected the params (a pytree of tensors, e.g. state.params), got a module; "
                        "pass it as the mask itself (adamw(..., mask=decay_mask)) or call decay_mask(state.params).")
    if _flat_tensors(params):  # (state.params) its keys are the names; a dict built so torch.compile traces it
        return {n: _decays(t, n) for n, t in params.items()}
    leaves, treedef = tree_flatten(params)
    return tree_unflatten(treedef, [_decays(t, n) for t, n in zip(leaves, tree_paths(params))])


def _decays(t: torch.Tensor, name: str) -> bool:
    """:func:`decay_mask`'s flag for one leaf."""
    return t.ndim >= 2 and not name.rstrip("]'\"").endswith("bias")


class MaskCache:
    """:func:`resolve_mask`'s memo, one per optimizer: by params structure, and by parameter names.

    Eager calls key by the optree structure, plus every leaf's shape and dtype when the mask is a
    function of the params tree: :func:`decay_mask` reads ``ndim``, so one optimizer used on two trees
    with the same names but other shapes needs two entries. A pytree of bools and a function of names
    depend on the structure only; once the mask is known to be one of those, the structure alone is
    the key (a shape read per leaf per step saved). ``torch.compile`` can neither hash that structure
    nor always run the mask (a function of names, first tried on the params tree, stops the trace where
    eager mode gets an AttributeError), so the traced step looks the flags up by the frozenset of a flat
    params dict's names, filled by eager calls (the optimizers' ``init`` resolves its mask), and uses
    them when the shapes and dtypes they were resolved for still match. Where none was filled (an optimizer
    whose ``init`` never ran, put in a state holding another's), the traced step resolves :func:`decay_mask`
    itself and refuses another function of a flat params dict, saying to call ``tx.init(params)`` first.

    ``name`` is the transformation named by the mask errors.
    """

    __slots__ = ("name", "by_key", "structural", "by_names")

    def __init__(self, name: str = "masked") -> None:
        self.name = name
        self.by_key: dict[Any, list[bool]] = {}
        self.structural = False  # True once the flags are known to depend on the structure only
        # names -> (name -> (shape, dtype) the flags were resolved for, or None when they depend on names only; flags)
        self.by_names: dict[frozenset[str], tuple[dict[str, tuple[Any, Any]] | None, list[bool]]] = {}


def resolve_mask(mask: Mask, params: PyTree, cache: MaskCache) -> list[bool]:
    """The mask as one bool per leaf of ``params`` (leaf order), cached per params structure (and shapes).

    ``mask`` is a pytree of bools matching ``params``, a callable ``params -> pytree of bools``, or a
    callable on leaf names ``name -> bool`` (names as :func:`fnlit.tree.tree_paths` gives them; for a
    flat params dict, the keys).
    """
    if torch.compiler.is_compiling():
        flat = _flat_tensors(params)
        hit = cache.by_names.get(frozenset(params)) if flat else None
        if hit is not None and (
            hit[0] is None or all(params[n].shape == s and params[n].dtype == d for n, (s, d) in hit[0].items())
        ):
            return hit[1]
        if flat and mask is decay_mask:  # (traced: dynamo cannot flatten the dict of bools it returns)
            return [_decays(params[n], n) for n in tree_paths(params)]  # (a flat dict's paths: its keys, in leaf order)
        if flat and callable(mask):
            # Eagerly, a function is first tried on the params tree and taken as a function of names where that fails;
            # traced, the failure stops the capture instead (dynamo's "length mismatch" or "does not know how to trace
            # method endswith of class dict"), so these flags must come from an eager call.
            raise ValueError(
                f"{cache.name} could not resolve its mask (a function) while compiled: it has not been applied to "
                "params of these names, shapes and dtypes outside torch.compile, where fnlit tells a function of "
                "names from a function of the params tree. Call tx.init(params) once (the optimizer's init resolves "
                "the mask), or run one step uncompiled, before the compiled step; e.g. after "
                "state.replace(tx=adamw(..., mask=...)) keeping the old opt_state."
            )
        return _mask_flags(mask, params, tree_structure(params), cache.name)[0]
    leaves, treedef = tree_flatten(params)
    structural = cache.structural or not callable(mask)
    key = treedef if structural else (treedef, *[t.shape for t in leaves], *[t.dtype for t in leaves])
    flags = cache.by_key.get(key)
    if flags is None:
        flags, by_names = _mask_flags(mask, params, treedef, cache.name)
        if by_names and not cache.structural:  # a function of names: from now on the structure is the key
            cache.structural, cache.by_key, key = True, {}, treedef
        cache.by_key[key] = flags
        if _flat_tensors(params):
            sig = None if cache.structural or structural else {n: (t.shape, t.dtype) for n, t in params.items()}
            cache.by_names[frozenset(params)] = (sig, flags)
    return flags


def _mask_flags(mask: Mask, params: PyTree, treedef: Any, name: str) -> tuple[list[bool], bool]:
    """The flags, and whether ``mask`` turned out to be a function of names.

    A pytree mask (given, or returned by a function of the params) has the params' structure or is a prefix of
    it, as in optax: ``{"encoder": False, "head": True}`` covers every leaf under each key. A function that fails
    on the params tree, or returns a single value for it, is a function of names.
    """
    names = tree_paths(params)
    tree = mask
    if callable(mask):
        try:
            tree = mask(params)
        except (TypeError, AttributeError, KeyError):
            tree = None  # not a function of the params tree: a function of names
        if tree is None or isinstance(tree, bool) or (tree_structure(tree) != treedef and _is_leaf(tree)):
            return [bool(mask(n)) for n in names], True
    if tree_structure(tree) == treedef:  # (the traceable case: torch.compile cannot trace broadcast_prefix)
        return [bool(m) for m in tree_flatten(tree)[0]], False
    try:
        flags = optree.broadcast_prefix(tree, params)  # a prefix: one per params leaf, in leaf order
    except ValueError:
        raise ValueError(
            f"{name} expected a mask with the structure of the params (or a prefix of it), got a different structure "
            f"instead: {first_mismatch(params, tree, check_shapes=False) or 'structure differs'}. Give one bool per "
            "parameter (or per subtree), a function params -> such a pytree, or a function name -> bool."
        ) from None
    return [bool(m) for m in flags], False


def _is_leaf(tree: PyTree) -> bool:
    leaves = tree_leaves(tree)
    return len(leaves) == 1 and leaves[0] is tree


def _flat_tensors(tree: PyTree) -> bool:
    return type(tree) is dict and all(type(k) is str and isinstance(v, torch.Tensor) for k, v in tree.items())
