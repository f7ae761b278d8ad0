"""Buffer donation (``jax.jit``'s ``donate_argnums``): a step may reuse the storage of its input state.

A donated state is handed over to the step: the optimizer writes the new params and moments into the
old tensors instead of fresh ones (no clone per step, one copy of the state in memory), and the old
:class:`~fnlit.TrainState` object is *poisoned* afterwards: its fields are replaced by a sentinel
whose every use raises a RuntimeError saying what happened. Use the state the step returned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

import torch

from .. import _storage
from .. import tree as _tree
from .._types import Batch, Metrics, StepFn
from ..optim._base import _DONATED

if TYPE_CHECKING:
    from ..optim._base import Donation
    from ..state import TrainState

__all__ = ["donating", "poison", "consume", "check_not_donated", "is_donated", "donated_by", "Donated", "USED", "RAISED", "READ_AFTER"]

USED = (
    "This TrainState was donated to a step ({how}), which reused its storage for the state it returned: "
    "its {field!r} no longer holds valid values. Use the state the step returned "
    "(`state, metrics = step(state, batch)`), or {keep} to keep the input state intact."
)
_KEEP = {"fnlit.compile(step, donate=True)": "pass donate=False to fnlit.compile"}  # else: fnlit.donating's
RAISED = (
    "This TrainState was donated to a step ({how}) that raised an exception after updating the state's tensors "
    "in place: it holds neither the old state nor the new one (its {field!r} is not usable). Go on from the "
    "last checkpoint, or from a copy of the state taken before the step "
    "(`fnlit.tree.tree_map(torch.clone, state)`)."
)


READ_AFTER = (
    "This TrainState was donated to a step ({how}) and is read after its apply_gradients updated it in place: "
    "its {field!r} now holds the new values, not the ones from before the update. Inside a donated step, read "
    "the input state before apply_gradients (copy what you need: `old = state.params['w'].clone()`), or read "
    "the state apply_gradients returned."
)


class Donated:
    """Stands in for each field of a donated TrainState; any use of it raises a RuntimeError."""

    __slots__ = ("_field", "_how", "_text")

    def __init__(self, field: str, how: str, text: str = USED) -> None:
        # The message is formatted when raised, not here: every donated step poisons a state.
        object.__setattr__(self, "_field", field)
        object.__setattr__(self, "_how", how)
        object.__setattr__(self, "_text", text)

    def _raise(self, *args: Any, **kwargs: Any) -> NoReturn:
        get = object.__getattribute__
        how = get(self, "_how")
        keep = _KEEP.get(how, "call the step without fnlit.donating")
        raise RuntimeError(get(self, "_text").format(field=get(self, "_field"), how=how, keep=keep))

    def __getattr__(self, name: str) -> NoReturn:
        self._raise()

    __getitem__ = __setitem__ = __iter__ = __len__ = __bool__ = __call__ = __contains__ = _raise
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __index__ = __int__ = _raise
    __float__ = __eq__ = __lt__ = __le__ = __gt__ = __ge__ = __array__ = _raise  # type: ignore[assignment]
    # pickle (torch.save of a donated state's params, a multiprocessing queue) and copy.copy: no file without weights
    __reduce_ex__ = __reduce__ = _raise  # type: ignore[assignment]
    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> NoReturn:
        # A classmethod, as torch requires (a plain method is deprecated, and warns): the sentinel to name is
        # found among the op's arguments.
        for leaf in _tree.tree_leaves((args, kwargs)):
            if isinstance(leaf, Donated):
                leaf._raise()
        raise RuntimeError(f"{func.__name__} was called on a field of a donated TrainState")  # torch passes one

    def __repr__(self) -> str:
        return "<donated>"


def poison(state: TrainState, how: str, text: str = USED) -> None:
    """Replaces every data field of ``state`` by a :class:`Donated` sentinel (in place).

    ``text`` is the message its use raises (:data:`USED`, or :data:`RAISED` after a failed step).
    """
    from ..state import _DATA_FIELDS

    state.__dict__.update({f: Donated(f, how, text) for f in _DATA_FIELDS})


def consume(state: TrainState, new_params: Any) -> None:
    """Poisons ``state`` if the optimizer step that returned ``new_params`` updated its tensors in place.

    For ``TrainState.apply_update`` to call right after the update (under :func:`donating`): a step that
    reads its input state afterwards would otherwise silently get the new values.
    """
    if torch.compiler.is_compiling():  # traced steps never donate (and torch < 2.14 cannot trace a ContextVar's get)
        return
    record = _DONATED.get()
    if record is not None and new_params is not None and record.last_in_place is new_params:
        poison(state, "fnlit.donating", READ_AFTER)


def is_donated(state: Any) -> bool:
    """Whether ``state`` (a TrainState) was poisoned by donation: using it would raise."""
    return isinstance(getattr(state, "__dict__", {}).get("params"), Donated)


def donated_by(state: Any) -> str:
    """The step a donated ``state`` was donated to (``fnlit.donating``, ``fnlit.compile(step, donate=True)``)."""
    return object.__getattribute__(state.__dict__["params"], "_how")


def check_not_donated(state: Any) -> None:
    """Raises the donation error if ``state`` (a TrainState) was donated before."""
    if is_donated(state):
        state.params._raise()


_ALIASED = (
    "fnlit.donating: the returned {where} is a tensor that shares memory with a tensor the optimizer updated in "
    "place (a param or moment of the input state, which the returned state goes on using). Taken before the "
    "update, it now holds the updated values (without donation it would hold the ones from before the update); "
    "taken from the returned state (a metric logging a learnable temperature), the next donated step would change "
    "it in place. A donated step must not return tensors of its input state, or views of them, besides the "
    "updated state itself: e.g. `buffers={{..., 'prev_weight': state.params['weight']}}` keeps the weights from "
    "before the update only without donation. Return a copy instead: `.clone()` before apply_gradients for the "
    "old value, `new.params['weight'].clone()` for the new one; or run the step without fnlit.donating "
    "(fnlit.compile(step, donate=True) copies what it returns)."
)

_INSIDE = (
    "fnlit.donating must be the outermost transform, but it was called inside the step of another transform "
    "(fnlit.accumulate, fnlit.amp, fnlit.data_parallel or fnlit.shard). Those pass the inner step a copy of "
    "the state, so the caller's state would be updated in place and never marked as donated. Put donating "
    "outermost: fnlit.donating(fnlit.accumulate(step, k)) instead of fnlit.accumulate(fnlit.donating(step), k); "
    "for a compiled step, fnlit.compile(step, donate=True)."
)


def _tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors of ``tree``, in leaf order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    return [] if tree is None else [x for x in _tree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _any_order(tree: Any) -> list[Any]:
    """:func:`_tensors` in any order: a flat dict's values without a flatten (metrics, buffers)."""
    if type(tree) is dict:
        values = list(tree.values())
        if all(isinstance(v, torch.Tensor) for v in values):
            return values
    return _tensors(tree)


def _first_alias(trees: list[Any], updated: list[torch.Tensor], placed: bool) -> tuple[int, int] | None:
    """(tree, tensor) index of the first tensor in ``trees`` that aliases one of the ``updated`` tensors.

    With ``placed``, the updated tensors already appear once outside ``trees`` (in the optimizer's
    outputs), so any tensor sharing memory with one is an alias. Otherwise each may appear once, as
    itself; a second occurrence, or any other tensor sharing its storage (a view, ``detach()``), is an alias.
    """
    storages = {_storage.address(t) for t in updated}
    storages.discard(0)
    ids = {id(t) for t in updated}
    seen: set[int] = set()
    for i, tree in enumerate(trees):
        for j, x in enumerate(_tensors(tree)):
            if id(x) not in ids and _storage.address(x) not in storages:
                continue
            if not placed and id(x) in ids and id(x) not in seen:
                seen.add(id(x))
                continue
            return i, j
    return None


_NOT_CHECKED = frozenset({"params", "opt_state", "tx"})


def _check_aliases(new: Any, metrics: Any, record: Donation) -> None:
    """Raises ValueError if the returned state or metrics hold an alias of a tensor updated in place.

    In the usual case (the state's params and opt_state are the optimizer's outputs, and the other
    tensors -- step, rng, buffers, metrics -- use their storage alone) this costs ~1-2 us a step: an
    identity test and a storage use count per other tensor. Otherwise every storage address is compared.
    """
    fields = getattr(new, "__dict__", {})
    placed = any(fields.get("params") is p and fields.get("opt_state") is o for p, o in record.outputs)
    if placed:
        names = [f for f in fields if f not in _NOT_CHECKED]
        trees = [fields[f] for f in names] + [metrics]
        ids = {id(t) for t in record.updated}
        others = [x for tree in trees for x in _any_order(tree)]
        if all(id(x) not in ids and _storage.alone(x) for x in others):
            return  # none of them is an updated tensor, and none shares memory with anything
    else:
        names, trees = [], [new, metrics]
    found = _first_alias(trees, record.updated, placed)
    if found is None:
        return
    i, j = found
    if i == len(trees) - 1:
        paths = _tree.tree_flatten_with_path({"metrics": metrics})
    else:
        paths = _tree.tree_flatten_with_path({names[i]: trees[i]} if names else new)
    where = [p for p, x in zip(paths[0], paths[1]) if isinstance(x, torch.Tensor)][j]
    raise ValueError(_ALIASED.format(where=("state's " if i < len(trees) - 1 else "") + where))


def donating(step: StepFn) -> StepFn:
    """Eager buffer donation: ``step`` may update the input state's tensors in place.

    The fused optimizer kernels then run directly on the incoming params and moments instead of on
    clones of them (one copy of the optimizer state in memory, no copy per step). Results are bitwise
    those of ``step``. Afterwards the input state is poisoned: any use of its fields raises a
    RuntimeError that says it was donated. (float16 :func:`fnlit.amp` keeps the old params for steps
    whose gradients overflow, so its updates are not done in place.) For a compiled step, use
    ``fnlit.compile(step, donate=True)``.

    The contract, as with ``jax.jit``'s ``donate_argnums``: the input state belongs to the update.

    * The step must not read the input state after ``apply_gradients``: its params and moments then
      hold the *new* values, so the state is poisoned right after the update (reading it raises).
      Dicts and tensors taken from it before (``p = state.params``) are updated in place too and are
      not caught; copy what you need (an update's size, say) before ``apply_gradients``.
    * The returned state and metrics must not keep a tensor of the input state (or a view of one) that
      the optimizer updated, besides the updated state itself: e.g. ``buffers={..., "prev":
      state.params["w"]}`` would hold the new weights. That raises a ValueError; keep a ``.clone()``.
    * ``donating`` must be the outermost transform: ``donating(accumulate(step, k))``. Inside another
      transform's step it raises a ValueError (those pass a copy of the state, which would leave the
      caller's state updated but not poisoned). Around a compiled step it raises too: the graph never
      updates in place (``fnlit.compile(step, donate=True)`` is the compiled way to donate).
    * If the step raises after the optimizer updated the state in place, the input state is poisoned
      too (it holds neither the old nor the new state) and the exception propagates; if it raises
      before, the input state is intact and usable.

    Args:
        step: any step function.

    Returns:
        A step function with the same results that consumes its input state.

    Raises:
        ValueError: when called inside another transform's step or around a compiled one, or when the
            returned state or metrics alias a tensor that was updated in place.

    Example:
        >>> import torch, torch.nn.functional as F, fnlit
        >>> from fnlit.transforms.donate import donating
        >>> model = torch.nn.Linear(4, 1)
        >>> step = donating(fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1])))
        >>> state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-3), seed=0)
        >>> new, metrics = step(state, (torch.randn(8, 4), torch.randn(8, 1)))
        >>> state.params["weight"]  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        RuntimeError: This TrainState was donated to a step (fnlit.donating), ...
    """
    from ..optim._base import donated_update
    from ._frame import current, require_state, require_step

    require_step(step, "fnlit.donating")

    def donating_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        require_state(state, "fnlit.donating")
        check_not_donated(state)
        if current() is not None:
            raise ValueError(_INSIDE)
        with donated_update() as record:
            try:
                new, metrics = step(state, batch)
                if record.updated:
                    _check_aliases(new, metrics, record)
            except BaseException:
                if record.updated:  # the state was written: neither the old one nor the new one
                    poison(state, "fnlit.donating", RAISED)
                raise
        if new is not state:
            poison(state, "fnlit.donating")
        return new, metrics

    donating_step.__wrapped__ = step  # type: ignore[attr-defined]
    return donating_step
