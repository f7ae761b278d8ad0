"""The one wrapper around optree.

Every pytree operation in fnlit goes through this module, so the conventions live in one place:

* dict leaves come out in *sorted key* order (optree's rule). Two dicts with the same keys therefore
  flatten to aligned leaf lists whatever their insertion order, which is what the optimizers rely on
  when they hand leaf lists to multi-tensor kernels. Never zip leaves against ``module.parameters()``.
* ``None`` is an empty subtree, not a leaf: ``tree_map`` leaves it in place and it carries no tensor.
* Classes are registered once, globally, with both optree and ``torch.utils._pytree`` (``torch.func``
  and ``torch.compile`` only see the latter), by :func:`register_dataclass`.

Example:
    >>> from fnlit.tree import tree_leaves, tree_map
    >>> tree_leaves({"b": 2, "a": 1, "c": None})  # sorted keys; None is not a leaf
    [1, 2]
    >>> tree_map(lambda x: x + 1, {"b": 2, "a": 1, "c": None})
    {'b': 3, 'a': 2, 'c': None}
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import repeat
from operator import countOf
from typing import Any, TypeVar

import optree
import torch
import torch.utils._pytree as torch_pytree

__all__ = [
    "tree_map",
    "tree_leaves",
    "tree_flatten",
    "tree_unflatten",
    "tree_structure",
    "tree_paths",
    "tree_flatten_with_path",
    "keystr",
    "register_dataclass",
    "first_mismatch",
]

T = TypeVar("T")
PyTree = Any


def tree_map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> PyTree:
    """Applies ``fn`` to each leaf of ``tree`` (and the matching leaves of ``rest``); a node for which ``is_leaf``
    says True is a leaf too (passed to ``fn`` whole, not walked).

    Example:
        >>> import torch
        >>> tree_map(lambda x: x * 2, {"w": torch.ones(2)})
        {'w': tensor([2., 2.])}
    """
    return optree.tree_map(fn, tree, *rest, is_leaf=is_leaf)


def tree_leaves(tree: PyTree) -> list[Any]:
    """The leaves of ``tree`` in fnlit's canonical order (dict keys sorted).

    Example:
        >>> tree_leaves({"b": 2, "a": (1, None)})  # None is an empty subtree, not a leaf
        [1, 2]
    """
    if type(tree) is dict:
        if not torch.compiler.is_compiling():  # dynamo traces optree, not the cache
            fast = _flat_dict(tree)
            if fast is not None:
                return fast[0]
        elif (keys := _same_flat_dicts(tree)) is not None:  # (dynamo runs optree's flatten node by node)
            return [tree[k] for k in keys]
    return optree.tree_leaves(tree)


# Flat dicts of tensors keyed by strings (params, grads, moments) are flattened several times a step.
# optree takes ~2.5 us for six tensors; reusing the leaf order and structure of the last dict with the
# same keys takes a fifth of that. Keyed by the keys in insertion order; bounded.
_FLAT_DICTS: dict[tuple[str, ...], tuple[list[str], optree.PyTreeSpec]] = {}
_TENSOR = repeat(torch.Tensor)  # isinstance's second argument for map(), never exhausted


def _flat_dict(tree: dict[Any, Any]) -> tuple[list[Any], optree.PyTreeSpec] | None:
    keys = tuple(tree)
    hit = _FLAT_DICTS.get(keys)
    if hit is None:
        if _same_flat_dicts(tree) is None:  # (keys not all plain strings, or a value that is not a tensor)
            return None
        leaves, treedef = optree.tree_flatten(tree)
        if len(_FLAT_DICTS) >= 1024:
            _FLAT_DICTS.clear()
        _FLAT_DICTS[keys] = (treedef.entries(), treedef)
        return leaves, treedef
    # The lookup matched *equal* keys, and a str subclass (a StrEnum member) equals its plain value: reusing
    # the entry would hand back plain-str keys. Only exact str keys may (both checks run in C, in map).
    if countOf(map(type, keys), str) != len(keys):
        return None
    order, treedef = hit
    leaves = list(map(tree.__getitem__, order))
    if not all(map(isinstance, leaves, _TENSOR)):  # a tensor is always a leaf; anything else may be a subtree
        return None
    return leaves, treedef


def tree_flatten(tree: PyTree) -> tuple[list[Any], optree.PyTreeSpec]:
    """Leaves and structure of ``tree``; :func:`tree_unflatten` inverts it.

    Example:
        >>> leaves, treedef = tree_flatten({"b": 2, "a": (1, None)})
        >>> leaves, treedef
        ([1, 2], PyTreeSpec({'a': (*, None), 'b': *}))
    """
    if type(tree) is dict and not torch.compiler.is_compiling():  # dynamo traces optree, not the cache
        fast = _flat_dict(tree)
        if fast is not None:
            return fast
    return optree.tree_flatten(tree)


def _same_flat_dicts(*trees: PyTree) -> list[str] | None:
    """The keys in the leaf order of :func:`tree_flatten` (sorted) when every tree is a dict of tensors under the
    same string keys (params, gradients and moments, as TrainState holds them); else None.

    For traced code (torch.compile): dynamo runs optree's flatten as Python, node by node, and compares
    structures the same way (~0.1-0.2 s of a small MLP's ~2 s capture for each flatten). On these trees the
    structures agree by construction, and ``[tree[k] for k in keys]`` are the leaves :func:`tree_flatten` gives.

    Example:
        >>> _same_flat_dicts({"w": torch.ones(1), "b": torch.ones(1)}, {"b": torch.ones(1), "w": torch.ones(1)})
        ['b', 'w']
    """
    first = trees[0]
    if type(first) is not dict or not all(type(k) is str for k in first):
        return None
    for tree in trees:
        if type(tree) is not dict or tree.keys() != first.keys() or not all(isinstance(v, torch.Tensor) for v in tree.values()):
            return None
    return sorted(first)


def _flat_dict_of(keys: list[str], leaves: list[Any], like: dict[str, Any]) -> dict[str, Any]:
    """The dict of ``leaves`` (in the order of ``keys``, as :func:`_same_flat_dicts` gives them) with ``like``'s keys in
    ``like``'s order: what ``tree_unflatten(tree_flatten(like)[1], leaves)`` gives, without optree (traced code)."""
    by_key = dict(zip(keys, leaves))
    return {k: by_key[k] for k in like}


def tree_unflatten(treedef: optree.PyTreeSpec, leaves: Iterable[Any]) -> PyTree:
    """Rebuilds a tree of structure ``treedef`` from ``leaves``.

    Example:
        >>> leaves, treedef = tree_flatten({"b": 2, "a": (1, None)})
        >>> tree_unflatten(treedef, [x * 10 for x in leaves])
        {'b': 20, 'a': (10, None)}
    """
    return optree.tree_unflatten(treedef, leaves)


def tree_structure(tree: PyTree) -> optree.PyTreeSpec:
    """The structure of ``tree`` without its leaves.

    Example:
        >>> tree_structure({"w": 1, "b": 2}) == tree_structure({"b": 3.0, "w": 4.0})  # key order does not matter
        True
    """
    return optree.tree_structure(tree)


def keystr(path: Sequence[Any]) -> str:
    """Formats a path from :func:`tree_flatten_with_path` as ``a.b['c'][0]``-style text.

    Example:
        >>> keystr(("params", "0.weight")), keystr(("mu", 0)), keystr(())
        ("params['0.weight']", 'mu[0]', '<root>')
    """
    out = ""
    for entry in path:
        if isinstance(entry, str):
            out += f"[{entry!r}]" if out else entry
        elif isinstance(entry, int):
            out += f"[{entry}]"
        else:
            out += f".{entry}"
    return out or "<root>"


def tree_flatten_with_path(tree: PyTree) -> tuple[list[str], list[Any], optree.PyTreeSpec]:
    """Like :func:`tree_flatten`, plus a readable path (``params['0.weight']``) for each leaf.

    Example:
        >>> paths, leaves, _ = tree_flatten_with_path({"params": {"0.weight": 1}, "mu": [2, 3]})
        >>> paths, leaves
        (['mu[0]', 'mu[1]', "params['0.weight']"], [2, 3, 1])
    """
    paths, leaves, treedef = optree.tree_flatten_with_path(tree)
    return [keystr(p) for p in paths], leaves, treedef


def tree_paths(tree: PyTree) -> list[str]:
    """Readable paths of the leaves of ``tree``, in leaf order.

    Example:
        >>> tree_paths({"params": {"0.weight": 1, "0.bias": 2}, "step": 3})
        ["params['0.bias']", "params['0.weight']", 'step']
    """
    return tree_flatten_with_path(tree)[0]


def is_real(x: Any) -> bool:
    """Whether ``x`` is a real number: a Python or NumPy int or float, not a bool (nor ``np.bool_``, which is no
    ``numbers.Real``); e.g. a hyperparameter assigned as a number (optax's idiom)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _describe(leaf: Any) -> str:
    if isinstance(leaf, torch.Tensor):
        return f"tensor of shape {tuple(leaf.shape)} and dtype {leaf.dtype}"
    return f"{type(leaf).__name__} {leaf!r}"


# What a comparison of gradients against params adds for a None leaf (first_mismatch's ``none_hint``).
NONE_GRAD_HINT = " (torch leaves a parameter's .grad None when the loss does not use it: pass zeros for it)"


def first_mismatch(expected: PyTree, got: PyTree, *, check_shapes: bool = True, none_hint: str = "") -> str | None:
    """Describes the first place where two trees differ in structure or leaf shape, or None.

    Used by every error that compares trees (gradients against params, a checkpoint against the state
    it restores into), so they all name the same path in the same words.

    Example:
        >>> import torch
        >>> first_mismatch({"w": torch.ones(2)}, {"w": torch.ones(3)})
        'at w: expected tensor of shape (2,) and dtype torch.float32, got tensor of shape (3,) ...'
    """
    e_paths, e_leaves, e_def = tree_flatten_with_path(expected)
    g_paths, g_leaves, g_def = tree_flatten_with_path(got)
    if e_def != g_def:
        if isinstance(expected, Mapping) and isinstance(got, (list, tuple)):  # the container, not a key, is off
            return (
                f"expected a dict keyed like it ({len(e_paths)} leaves), got a {type(got).__name__} of {len(got)} items "
                "(match them up by name: dict(zip(names, values)))"
            )
        missing = [p for p in e_paths if p not in set(g_paths)]
        extra = [p for p in g_paths if p not in set(e_paths)]
        if missing:
            paths, leaves, _ = optree.tree_flatten_with_path(got, none_is_leaf=True)
            if any(leaf is None and keystr(path) == missing[0] for path, leaf in zip(paths, leaves)):
                # (optree takes a None for an empty subtree: the key is there, its value is not)
                return f"at {missing[0]!s}: expected {_describe(e_leaves[e_paths.index(missing[0])])}, got None{none_hint}"
            return f"missing {missing[0]!s} (expected keys {e_paths[:6]}{'...' if len(e_paths) > 6 else ''})"
        if extra:
            return f"unexpected {extra[0]!s} (expected keys {e_paths[:6]}{'...' if len(e_paths) > 6 else ''})"
        if torch.compiler.is_compiling():  # torch.compile's stand-in for optree fails printing a dict's structure
            return "structure differs (run it uncompiled to see the two structures)"
        return f"structure differs: expected {e_def}, got {g_def}"
    if check_shapes:
        for path, e, g in zip(e_paths, e_leaves, g_leaves):
            if isinstance(e, torch.Tensor) != isinstance(g, torch.Tensor) or (
                isinstance(e, torch.Tensor) and e.shape != g.shape
            ):
                return f"at {path}: expected {_describe(e)}, got {_describe(g)}"
    return None


def register_dataclass(cls: type[T], data_fields: Sequence[str], meta_fields: Sequence[str] = ()) -> type[T]:
    """Registers a dataclass as a pytree node with optree *and* torch.utils._pytree.

    ``data_fields`` are children (traversed); ``meta_fields`` are static context (compared by identity
    or equality when trees are matched, never traversed).

    Example:
        >>> @dataclasses.dataclass
        ... class Point:
        ...     x: float
        ...     name: str = "p"
        >>> Point = register_dataclass(Point, data_fields=["x"], meta_fields=["name"])
        >>> tree_map(lambda v: v * 2, Point(1.5, "q")), tree_leaves(Point(1.5))
        (Point(x=3.0, name='q'), [1.5])
    """
    if not dataclasses.is_dataclass(cls):  # checked before registering anything
        raise TypeError(f"register_dataclass expected a dataclass, got {cls!r} instead.")
    data_fields, meta_fields = tuple(data_fields), tuple(meta_fields)
    fields = [f.name for f in dataclasses.fields(cls)]
    if sorted(data_fields + meta_fields) != sorted(fields):  # a field in neither would come back as its default
        missing = [f for f in fields if f not in data_fields + meta_fields]
        extra = [f for f in data_fields + meta_fields if f not in fields]
        twice = sorted({f for f in data_fields + meta_fields if (data_fields + meta_fields).count(f) > 1})
        raise ValueError(
            f"register_dataclass({cls.__qualname__}) expected every field in data_fields or meta_fields, once: "
            + "; ".join(x for x in (f"missing {missing}" if missing else "", f"not fields {extra}" if extra else "",
                                    f"listed twice {twice}" if twice else "") if x)
            + f" (the fields: {fields})."
        )

    def flatten(obj: T) -> tuple[tuple[Any, ...], tuple[Any, ...], tuple[str, ...]]:
        return tuple(getattr(obj, f) for f in data_fields), tuple(getattr(obj, f) for f in meta_fields), data_fields

    def unflatten(meta: tuple[Any, ...], children: Iterable[Any]) -> T:
        kwargs = dict(zip(data_fields, children))
        kwargs.update(zip(meta_fields, meta))
        obj = object.__new__(cls)
        for k, v in kwargs.items():
            object.__setattr__(obj, k, v)
        return obj

    optree.register_pytree_node(cls, flatten, unflatten, namespace=optree.registry.__GLOBAL_NAMESPACE)  # type: ignore[arg-type]

    # torch's pytree treats None as a leaf (optree as an empty node), and torch.func.vmap rejects None
    # leaves; so for torch, fields that are None are left out and their names kept in the context.
    def t_flatten(obj: T) -> tuple[list[Any], Any]:
        children, meta, _ = flatten(obj)
        present = tuple(f for f, c in zip(data_fields, children) if c is not None)
        return [c for c in children if c is not None], (meta, present)

    def t_unflatten(children: Iterable[Any], context: Any) -> T:
        meta, present = context
        given = dict(zip(present, children))
        return unflatten(meta, [given.get(f) for f in data_fields])

    def t_flatten_with_keys(obj: T) -> tuple[list[tuple[Any, Any]], Any]:
        children, context = t_flatten(obj)
        return [(torch_pytree.GetAttrKey(f), c) for f, c in zip(context[1], children)], context

    torch_pytree.register_pytree_node(
        cls,
        t_flatten,
        t_unflatten,
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        flatten_with_keys_fn=t_flatten_with_keys,
    )
    return cls
