"""Whether the memory of a tensor storage may be written again: nothing but its keeper holds it.

Used where fnlit reuses CPU memory instead of allocating afresh (a fresh large block page-faults as it
is first written): the optimizers' recycled outputs (:func:`unheld`) and data_parallel's flat gradient
buffers (:func:`alone`); donation's alias check also asks :func:`alone`. Relies on the private ``torch._C._storage_Use_Count``; without it nothing is reused.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterable

import torch

_use_count = getattr(torch._C, "_storage_Use_Count", None)
AVAILABLE = _use_count is not None


def unheld(groups: Iterable[Iterable[torch.UntypedStorage]]) -> list[torch.UntypedStorage]:
    """The Python storage objects in ``groups`` whose memory nothing but their group holds.

    Each object must be held by its group alone (a list): no other name for it when this is called.
    Then nothing else holds the memory when no tensor or view uses it (the C++ use count is 1, the
    storage object's own), no other Python reference to the object exists (a caller's
    ``tensor.untyped_storage()`` returns this same object), and it is not in shared memory (another
    process could map it). Both counts are read: with torch 2.14 a live tensor also holds a Python
    reference to its storage object, so either alone would do, but that is an implementation detail.
    """
    if _use_count is None:
        return []
    free = []
    for group in groups:
        for s in group:  # the loop _calibrate mirrors: a reference count is only comparable within one shape
            if _use_count(s._cdata) == 1 and sys.getrefcount(s) == _REFS and not s.is_shared():
                free.append(s)
    return free


def _calibrate(groups: Iterable[Iterable[object]]) -> int:
    for group in groups:
        for s in group:
            return sys.getrefcount(s)
    raise AssertionError("unreachable")


# What sys.getrefcount reports in unheld's loop for an object its group alone holds (the interpreter's
# own references differ between Python versions). Not through a function argument: after some failed
# torch.compile captures (seen in this project's tests, torch 2.14), a call passes its arguments with one
# more reference than before.
_REFS = _calibrate([[object()]])


def address(t: torch.Tensor) -> int:
    """The address of ``t``'s storage: 0 for an empty one, or a tensor without a plain storage (a subclass such
    as DTensor, a sparse tensor). A view, ``detach()`` or ``.data`` of it has the same address."""
    if type(t) is not torch.Tensor:
        return 0
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


def alone(t: torch.Tensor) -> bool:
    """Whether nothing but ``t`` uses its storage: no view, ``detach()`` or ``.data`` of it, no other tensor.

    False when that cannot be told (no use count, or a tensor without a plain storage). ~0.2 us.
    """
    if _use_count is None or type(t) is not torch.Tensor:
        return False
    try:
        return _use_count(t.untyped_storage()._cdata) == _ALONE
    except (RuntimeError, NotImplementedError):
        return False


def _alone_count() -> int:
    if _use_count is None:
        return -1
    t = torch.empty(1)
    return _use_count(t.untyped_storage()._cdata)  # the tensor's, and its storage object's (cached by the tensor)


_ALONE = _alone_count()


class Marks:
    """Tensors marked by identity, weakly: a mark leaves with its tensor.

    By ``id``, not a ``WeakSet`` (which compares tensors with ``==``); a plain dict, not a
    ``WeakKeyDictionary`` (whose lookups build a weak reference in Python, on a per-step path).
    """

    __slots__ = ("_refs",)

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref[torch.Tensor]] = {}

    def add(self, t: torch.Tensor) -> None:
        key, refs = id(t), self._refs
        refs[key] = weakref.ref(t, lambda _, key=key: refs.pop(key, None))

    def __contains__(self, t: object) -> bool:
        ref = self._refs.get(id(t))
        return ref is not None and ref() is t
