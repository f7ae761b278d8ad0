"""Explicit random keys, the one place fnlit touches PyTorch's global generators.

A key is a 0-d ``int64`` tensor on the CPU. Keys are split and folded with a counter-based hash
(splitmix64), so they are pure functions of the seed: ``split(key(0), 3)`` is the same on every machine.
Modules that draw random numbers (dropout) use PyTorch's global generators, so :func:`seeded` seeds
those from a key for the duration of one forward pass and puts the previous generator state back
afterwards: the same key gives bitwise the same dropout mask, and code outside the step never sees
its random stream disturbed.

Keys stay on the CPU even when training on a GPU: turning a key into a seed then reads host memory
and never waits for the device. PyTorch's CPU generator (an mt19937) keeps 32 bits of a seed: on the CPU,
two keys whose low 32 bits agree draw the same masks (about once per 2**32 pairs of keys; CUDA's Philox
generator takes all 64 bits). Noise that must never repeat within a run (DP-SGD's) is drawn from all 64.

Example:
    >>> import fnlit
    >>> k = fnlit.random.key(0)
    >>> a, b = fnlit.random.split(k)
    >>> bool(a != b)
    True
"""

from __future__ import annotations

import numbers
import operator
import threading
from typing import SupportsIndex

import torch

__all__ = ["key", "split", "fold_in", "next_key", "seeded", "is_key"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_SALT = 0x632BE59BD9B4E019  # keeps combine(k, d) away from mix(k) for every k, d
_INT64 = torch.int64  # every call checks a key's dtype: ``is`` against a global is the cheapest way


def _to_signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _mix_int(x: int) -> int:
    """splitmix64's finaliser on Python ints (the eager path: about 1 us, no tensor ops)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _srl(x: torch.Tensor, n: int) -> torch.Tensor:
    # Logical right shift on int64: torch's >> is arithmetic, so mask off the copied sign bits.
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """The same finaliser on int64 tensors, for keys that are traced or batched (wraps modulo 2**64)."""
    x = x ^ _srl(x, 30)
    x = x * _to_signed(0xBF58476D1CE4E5B9)
    x = x ^ _srl(x, 27)
    x = x * _to_signed(0x94D049BB133111EB)
    return x ^ _srl(x, 31)


def _counter_mix(d: int) -> int:
    return _mix_int(d * _GOLDEN + _SALT)


# _counter_mix of the small counters (micro-batch indices, ranks, split positions), computed once: it
# is half of the work of every eager fold_in and split.
_COUNTERS = tuple(_counter_mix(d) for d in range(256))


def _combine_int(k: int, d: int) -> int:
    return _mix_int(k ^ (_COUNTERS[d] if 0 <= d < 256 else _counter_mix(d)))


def _combine(k: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return _mix(k ^ _mix(d * _to_signed(_GOLDEN) + _to_signed(_SALT)))


def _eager(k: torch.Tensor, fn: str) -> bool:
    """Whether ``k`` takes the Python-int path; raises unless it is a key (a dtype check: every call pays it)."""
    if getattr(k, "dtype", None) is not _INT64:  # also refuses non-tensors
        raise TypeError(_not_a_key(fn, k))
    return k.dim() == 0 and not _is_traced(k)


def _not_a_key(fn: str, k: object) -> str:
    got = f"a tensor of dtype {k.dtype}" if isinstance(k, torch.Tensor) else f"{type(k).__name__} {k!r}"
    return (
        f"fnlit.random.{fn} expected a key (an int64 tensor), got {got} instead. Make keys with "
        "fnlit.random.key(seed) and new ones from them with split, fold_in or next_key."
    )


def _index(data: object) -> int:
    """``data`` as a Python int: a numpy integer or a 0-d integer tensor folds in as the same int would."""
    if not isinstance(data, bool) and not (isinstance(data, torch.Tensor) and data.dtype == torch.bool):
        try:
            return operator.index(data)
        except TypeError:
            pass
    got = f"a tensor of dtype {data.dtype}" if isinstance(data, torch.Tensor) else f"{type(data).__name__} {data!r}"
    raise TypeError(
        f"fnlit.random.fold_in expected an integer as data (an int, a numpy integer or a 0-d integer tensor), "
        f"got {got} instead."
    )


def _new(value: int) -> torch.Tensor:
    return torch.scalar_tensor(_to_signed(value), dtype=torch.int64, device="cpu")  # 3 us; torch.tensor takes 9


def key(seed: int) -> torch.Tensor:
    """Makes a key from an integer seed.

    Args:
        seed: any Python integer (or numpy integer), taken modulo 2**64: seeds that differ by a multiple
            of 2**64 make the same key (negative seeds are fine).

    Returns:
        A 0-d int64 CPU tensor.

    Raises:
        TypeError: if ``seed`` is not an int.

    Example:
        >>> torch.equal(key(1), key(1)), torch.equal(key(1), key(2))
        (True, False)
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"fnlit.random.key expected an int seed, got {type(seed).__name__} {seed!r} instead.")
    if torch.compiler.is_compiling() and -(1 << 63) <= seed < (1 << 63):
        # a dynamic seed: int64 tensor math (Python's would bake 2**64 into the graph); one outside int64 is a
        # constant of the graph, wrapped below in Python
        return _mix(torch.scalar_tensor(seed, dtype=torch.int64, device="cpu") + _to_signed(_GOLDEN))
    return _new(_mix_int(int(seed) + _GOLDEN))  # a numpy integer (seeds=np.arange(n)) as the int it holds


def is_key(x: object) -> bool:
    """Whether ``x`` looks like a fnlit key (an int64 tensor).

    Example:
        >>> is_key(key(0)), is_key(split(key(0), 3)), is_key(torch.zeros(())), is_key(0)
        (True, True, False, False)
    """
    return isinstance(x, torch.Tensor) and x.dtype == torch.int64


def split(k: torch.Tensor, num: int = 2) -> torch.Tensor:
    """Splits a key into ``num`` new, independent keys (a tensor of shape ``(num, *k.shape)``).

    Raises:
        TypeError: if ``k`` is not a key (an int64 tensor), or ``num`` is not an integer (a bool is not).
        ValueError: if ``num < 1``.

    Example:
        >>> split(key(0), 4).shape
        torch.Size([4])
    """
    if isinstance(num, bool) or not isinstance(num, numbers.Integral):
        num = _count(num)
    if num < 1:
        raise ValueError(f"fnlit.random.split expected num >= 1, got {num!r} instead.")
    if _eager(k, "split"):
        base = int(k)
        return torch.tensor([_to_signed(_combine_int(base, i)) for i in range(num)], dtype=torch.int64, device="cpu")
    counters = torch.arange(num, dtype=torch.int64, device=k.device).reshape((num,) + (1,) * k.dim())
    return _combine(k.unsqueeze(0), counters)


def _count(num: object) -> int:
    """split's ``num`` that is not an int: what range() takes (an integer tensor, a SymInt); a bool or float refused."""
    if not isinstance(num, bool) and not (isinstance(num, torch.Tensor) and num.dtype == torch.bool):
        try:
            return operator.index(num)  # type: ignore[arg-type]
        except TypeError:
            pass
    got = f"a tensor of dtype {num.dtype}" if isinstance(num, torch.Tensor) else f"{type(num).__name__} {num!r}"
    raise TypeError(f"fnlit.random.split expected an int as num (how many keys), got {got} instead.")


def fold_in(k: torch.Tensor, data: SupportsIndex | torch.Tensor) -> torch.Tensor:
    """Derives a new key from ``k`` and an integer (a micro-batch index, a rank, an ensemble member).

    ``fold_in(k, i)`` equals ``split(k, n)[i]`` for every ``n > i``. ``data`` may be any integer: a Python
    int, a numpy integer or a 0-d integer tensor (``fold_in(state.rng, state.step)``) give the same key.

    Raises:
        TypeError: if ``k`` is not a key (an int64 tensor), or ``data`` is not an integer (a float, a bool).

    Example:
        >>> torch.equal(fold_in(key(0), 1), split(key(0), 3)[1])
        True
        >>> torch.equal(fold_in(key(0), torch.tensor(300)), fold_in(key(0), 300))
        True
    """
    if _eager(k, "fold_in"):
        return _new(_combine_int(int(k), data if type(data) is int else _index(data)))
    if isinstance(data, torch.Tensor):  # traced or batched data stays a tensor: checked by dtype only
        if data.is_floating_point() or data.is_complex() or data.dtype == torch.bool:
            _index(data)  # raises
        return _combine(k, data.to(device=k.device, dtype=torch.int64))
    if not isinstance(data, torch.SymInt):  # a SymInt (torch.compile's dynamic ints) is an int already
        data = data if type(data) is int else _index(data)
    # Only an int outside int64 is wrapped (as on the int path): under torch.compile a dynamic int passes as an
    # int, and wrapping it in Python would bake 2**64 into the graph (inductor refuses it). torch.scalar_tensor
    # keeps all 64 bits of a dynamic int, where torch.as_tensor keeps 32.
    if not -(1 << 63) <= data < (1 << 63):  # (under torch.compile such an int is a constant of the graph)
        data = _to_signed(data)
    return _combine(k, torch.scalar_tensor(data, dtype=torch.int64, device=k.device))


def _fold_in_range(k: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``[fold_in(k, i) for i in range(n)]`` (accumulate's micro-batch keys), reading an eager key once."""
    if _eager(k, "fold_in"):
        base = int(k)
        return [_new(_combine_int(base, i)) for i in range(n)]
    return [fold_in(k, i) for i in range(n)]


def next_key(k: torch.Tensor) -> torch.Tensor:
    """The key that follows ``k`` (what ``TrainState.apply_gradients`` moves the state's key to).

    Example:
        >>> k = key(0)
        >>> torch.equal(next_key(k), next_key(k)), torch.equal(next_key(k), k)  # deterministic, and new
        (True, False)
    """
    if _eager(k, "next_key"):
        return _new(_mix_int(int(k) + _GOLDEN))
    return _mix(k + _to_signed(_GOLDEN))


def _is_traced(t: torch.Tensor) -> bool:
    return (
        torch.compiler.is_compiling()
        or torch._C._functorch.maybe_current_level() is not None
        or torch._C._functorch.is_functorch_wrapped_tensor(t)
    )


def _unbatched(k: object) -> object:
    """``k`` under torch.func: its value inside the transforms' wrappers (torch.func.grad wraps every tensor it
    sees), or None where a vmap batches it (fnlit.ensemble's keys: seeded once outside the vmap)."""
    functorch = torch._C._functorch
    while isinstance(k, torch.Tensor) and functorch.is_functorch_wrapped_tensor(k):
        if functorch.is_batchedtensor(k):
            return None
        k = functorch.get_unwrapped(k)
    return k


class seeded:
    """Seeds PyTorch's generators (CPU, and ``device``'s if it is CUDA) from ``k`` inside the block.

    The previous generator states are restored on exit. With ``k=None``, or inside torch.compile or a
    torch.func transform (where the caller seeds once outside), it does nothing. The generators are
    global to the process, so seeded blocks in different threads take turns (a lock): the same key
    gives the same masks whatever the other threads do. (A class, not a
    ``@contextmanager`` generator: it runs on every forward pass, and this costs half as much.)

    Raises:
        TypeError: on entering, if ``k`` is not a key (an int64 tensor).
        ValueError: on entering, if ``k`` is a batch of keys rather than one (outside torch.func).
        RuntimeError: on entering the same object again inside its own block (``with s: with s:``).

    Example:
        >>> with seeded(key(0)):
        ...     a = torch.rand(2)
        >>> with seeded(key(0)):
        ...     b = torch.rand(2)
        >>> torch.equal(a, b)
        True
    """

    __slots__ = ("key", "device", "saved")

    def __init__(self, k: torch.Tensor | None, device: torch.device | None = None) -> None:
        self.key, self.device, self.saved = k, device, None

    def __enter__(self) -> None:
        if self.saved is not None:  # its one slot holds the outer entry's states (and the lock that entry took)
            raise RuntimeError(
                "fnlit.random.seeded: this seeded block is already entered; make a new seeded(k) for the inner "
                "block (one object holds the generator states of one entry)."
            )
        self.saved = None if self.key is None else _seed(self.key, self.device)

    def __exit__(self, *exc: object) -> None:
        saved, self.saved = self.saved, None
        _restore(saved)


# seeded's two halves, also called directly by fnlit.apply on every forward pass (without the object).
def _seed(k: torch.Tensor, device: torch.device | None) -> list[tuple[torch.Generator, torch.Tensor]] | None:
    """Seeds the generators from ``k``; returns their previous states, or None when traced."""
    if getattr(k, "dtype", None) is not _INT64:
        raise TypeError(_not_a_key("seeded", k))
    if _is_traced(k):
        return None
    return _seed_eager(k, device)


def _seed_eager(k: torch.Tensor, device: torch.device | None) -> list[tuple[torch.Generator, torch.Tensor]]:
    """:func:`_seed` for a caller that has checked it runs outside torch.compile, with a key no vmap batches
    (fnlit.apply: eagerly, or under a torch.func transform of the user's, on the key :func:`_unbatched` gives)."""
    if getattr(k, "dtype", None) is not _INT64:  # also refuses non-tensors
        raise TypeError(_not_a_key("seeded", k))
    if k.dim() != 0:
        raise ValueError(
            f"fnlit.random.seeded expected a single key (a 0-d tensor), got shape {tuple(k.shape)} instead; "
            "index or split it first."
        )
    seed = int(k) & _MASK64  # a read of host memory: keys live on the CPU, so this never waits for a GPU
    _LOCK.acquire()  # released by _restore
    try:
        cpu = torch.default_generator
        saved = [(cpu, cpu.get_state())]
        if device is not None and device.type == "cuda":
            if not torch.cuda.is_initialized():  # default_generators is () until CUDA's lazy init (torch's own
                torch.cuda.init()  # get_rng_state inits first); without CUDA this says so, not "index out of range"
            index = device.index if device.index is not None else torch.cuda.current_device()
            gen = torch.cuda.default_generators[index]
            saved.append((gen, gen.get_state()))
        for gen, _ in saved:
            gen.manual_seed(seed)
    except BaseException:
        _LOCK.release()
        raise
    return saved


def _restore(saved: list[tuple[torch.Generator, torch.Tensor]] | None) -> None:
    if saved is not None:
        try:
            for gen, state in saved:
                gen.set_state(state)
        finally:
            _LOCK.release()


# PyTorch's generators are global to the process: while one thread's seeded block runs, another thread's
# would reseed them under it (its dropout masks would then depend on timing). Seeded blocks therefore
# take turns; reentrant, so a seeded forward may call fnlit.apply with a key again. fnlit.apply also
# holds it while the module holds a caller's tensors, and TrainState.create while it copies a module's.
_LOCK = threading.RLock()
