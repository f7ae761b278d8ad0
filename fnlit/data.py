"""A small in-memory loader whose order is a pure function of ``(seed, epoch)``.

:class:`ArrayLoader` slices tensors that are already in memory (one ``index_select`` per tensor and
batch), so it costs almost nothing per step, and it can start anywhere: ``batches(epoch, seed,
start=b)`` yields batch ``b`` of epoch ``epoch`` first without producing the ones before it, which is
what an exact mid-epoch resume needs. Under ``torch.distributed`` each rank gets its own shard
(:func:`fnlit.distributed.shard_indices`).

Example:
    >>> import torch
    >>> from fnlit.data import ArrayLoader
    >>> loader = ArrayLoader(torch.arange(10), torch.arange(10) * 2, batch_size=4)
    >>> len(loader)
    3
    >>> [x.tolist() for x, _ in loader.batches(epoch=0, seed=0, shuffle=False)]
    [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import warnings
from collections import UserDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

from . import distributed as _dist
from . import tree as _tree
from ._types import Batch

__all__ = ["ArrayLoader", "epoch_batches", "epoch_seed", "device_mover", "batch_size_of", "check_sharding"]


class ArrayLoader:
    """Batches of in-memory tensors, reshuffled per epoch from ``(seed, epoch)``, sharded across ranks.

    Args:
        *tensors: tensors with the same first dimension (the examples); a batch is the tuple of their
            slices (a single tensor gives a single tensor, not a 1-tuple), each on its tensor's device (they
            may differ, as a TensorDataset's may). Numpy arrays are taken as tensors (``torch.as_tensor``,
            without a copy).
        batch_size: examples per batch.
        shuffle: draw a new order every epoch (a pure function of ``(seed, epoch)``; plain iteration uses the
            epoch given to :meth:`set_epoch`, so a hand-written loop calls it each epoch).
        drop_last: drop the last, smaller batch of each epoch.

    Raises:
        TypeError: if an argument is neither a tensor nor a numpy array (a dict, a Dataset, a list).
        ValueError: if no tensor is given, their first dimensions differ, or ``batch_size < 1``.

    Example:
        >>> import torch
        >>> loader = ArrayLoader(torch.arange(6), batch_size=2)
        >>> a = [b.tolist() for b in loader.batches(epoch=1, seed=7)]
        >>> b = [b.tolist() for b in loader.batches(epoch=1, seed=7, start=1)]
        >>> a[1:] == b, sorted(sum(a, []))
        (True, [0, 1, 2, 3, 4, 5])
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int, shuffle: bool = True, drop_last: bool = False) -> None:
        if not tensors:
            raise ValueError("ArrayLoader expected at least one tensor, got none. Pass ArrayLoader(x, y, batch_size=...).")
        tensors = tuple(_as_tensor(t, i) for i, t in enumerate(tensors))
        sizes = [t.shape[0] if t.dim() else None for t in tensors]
        if None in sizes or len(set(sizes)) != 1:
            raise ValueError(
                f"ArrayLoader expected tensors with the same first dimension (the examples), got shapes "
                f"{[tuple(t.shape) for t in tensors]} instead."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"ArrayLoader expected batch_size to be an int >= 1, got {batch_size!r} instead.")
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = 0
        self.epoch = 0

    @property
    def num_examples(self) -> int:
        """Examples this rank visits per epoch (the dataset size split across ranks)."""
        return self.tensors[0].shape[0] // _dist.world_size()

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        n, b = self.num_examples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def indices(self, epoch: int, seed: int, shuffle: bool | None = None) -> torch.Tensor:
        """The example indices this rank visits in ``epoch``, in order (an int64 tensor)."""
        return self._order(epoch, seed, shuffle).to(self.tensors[0].device)

    def _order(self, epoch: int, seed: int, shuffle: bool | None) -> torch.Tensor:
        """:meth:`indices` on the CPU, where they are drawn."""
        return _dist._shard_order(
            self.tensors[0].shape[0],
            rank=_dist.rank(),
            world_size=_dist.world_size(),
            shuffle=self.shuffle if shuffle is None else shuffle,
            seed=seed,
            epoch=epoch,
        )  # a tensor throughout: a list of Python ints would take ~45 bytes an example

    def batches(
        self, epoch: int, seed: int, start: int = 0, *, shuffle: bool | None = None
    ) -> Iterator[torch.Tensor | tuple[torch.Tensor, ...]]:
        """Yields the batches of ``epoch`` from batch index ``start`` on; the earlier ones are never built.

        Args:
            epoch: the epoch (0-based); with ``shuffle``, each epoch has its own order.
            seed: the order's seed (:func:`fnlit.fit` takes it from the state's key).
            start: the index of the first batch to yield.
            shuffle: overrides the loader's ``shuffle`` (``fit(overfit_batches=...)`` turns it off).

        Raises:
            ValueError: if ``start < 0`` (raised by the call, before any batch).
        """
        if start < 0:  # range(-1, n) would yield an empty batch, then the whole epoch
            raise ValueError(f"ArrayLoader.batches expected start >= 0 (a batch index), got {start!r} instead.")
        return self._batches(epoch, seed, start, shuffle)

    def _batches(self, epoch: int, seed: int, start: int, shuffle: bool | None) -> Iterator[Any]:
        idx = self._order(epoch, seed, shuffle)
        # the order on each tensor's device, moved once an epoch (index_select does not check that an index is on
        # its tensor's device: a CPU tensor indexed by another device's order read rows at addresses there)
        on = {t.device: idx.to(t.device) for t in self.tensors}
        b, n = self.batch_size, len(self)
        single = len(self.tensors) == 1
        for i in range(start, n):
            sel = {d: order[i * b : (i + 1) * b] for d, order in on.items()}
            out = tuple(t.index_select(0, sel[t.device]) for t in self.tensors)
            yield out[0] if single else out

    def eval_batches(self) -> Iterator[tuple[torch.Tensor | tuple[torch.Tensor, ...], bool]]:
        """This rank's batches for evaluation, each with whether it counts: every example once across ranks.

        Training shards drop the remainder (``n % world_size`` examples) so that every rank runs as many
        steps; evaluation instead splits the batches one process would run (unshuffled: batch ``j`` holds
        examples ``j * batch_size`` up to ``(j + 1) * batch_size``; with ``drop_last`` the last, smaller one is
        left out) by whole batches: rank ``r`` takes batches ``r, r + W, r + 2W, ...``. So ``W`` ranks evaluate
        the examples one process does, whatever ``drop_last``. Every rank still runs :meth:`eval_len` batches,
        as a sharded model's forward is a collective: a rank with fewer repeats the first batch, not counted.
        Batches are built one at a time.

        Example:
            >>> [(b.tolist(), counts) for b, counts in ArrayLoader(torch.arange(5), batch_size=2).eval_batches()]
            [([0, 1], True), ([2, 3], True), ([4], True)]
        """
        n, b, w = self.tensors[0].shape[0], self.batch_size, _dist.world_size()
        mine = range(_dist.rank(), self._eval_total(), w)  # the one-process batches this rank evaluates
        single = len(self.tensors) == 1
        devices = {t.device for t in self.tensors}  # (each tensor is indexed on its own device)
        for i in range(self.eval_len()):
            j = mine[i] if i < len(mine) else 0  # a filler: the first batch, not counted
            sel = {d: torch.arange(j * b, min((j + 1) * b, n), device=d) for d in devices}
            batch = tuple(t.index_select(0, sel[t.device]) for t in self.tensors)
            yield (batch[0] if single else batch), i < len(mine)

    def _eval_total(self) -> int:
        """Batches one process evaluates: the whole dataset, unsharded."""
        n, b = self.tensors[0].shape[0], self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def eval_len(self) -> int:
        """Batches every rank runs in :meth:`eval_batches`: one process's batches split across the ranks, rounded up."""
        return -(-self._eval_total() // _dist.world_size())

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        """Sets the epoch (and seed) that plain iteration (``for batch in loader``) uses."""
        self.epoch = epoch
        if seed is not None:
            self.seed = seed

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, ...]]:
        """The batches of the epoch last set with :meth:`set_epoch` (0 until then): every plain iteration
        gives the same order until the epoch changes, as with ``DistributedSampler``. A hand-written loop
        calls ``loader.set_epoch(epoch)`` at the start of each epoch (:func:`fnlit.fit` asks for each
        epoch's batches itself, and evaluation sees one fixed order)."""
        return self.batches(self.epoch, self.seed)

    def __repr__(self) -> str:
        return (
            f"ArrayLoader({len(self.tensors)} tensors, {self.tensors[0].shape[0]} examples, "
            f"batch_size={self.batch_size}, shuffle={self.shuffle}, drop_last={self.drop_last})"
        )


def _as_tensor(t: Any, position: int) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t
    if isinstance(t, np.ndarray):
        return torch.as_tensor(t)
    raise TypeError(
        f"ArrayLoader expected tensors (or numpy arrays) as positional arguments, got {type(t).__name__} at position "
        f"{position} instead. Pass the arrays themselves: ArrayLoader(x, y, batch_size=...), or "
        "ArrayLoader(*d.values(), batch_size=...) for a dict d; for a Dataset use a torch DataLoader."
    )


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of a DataLoader's RandomSampler in ``epoch`` (the same mixing as :func:`shard_indices`).

    Example:
        >>> epoch_seed(0, 3), epoch_seed(1, 0)
        (3, 1000003)
    """
    return (seed * 1_000_003 + epoch) & 0x7FFF_FFFF_FFFF_FFFF


def direct_array_loader(data: Any) -> bool:
    """Whether ``fit`` and ``evaluate`` read ``data``'s batches from its tensors themselves: an ArrayLoader whose
    ``__iter__`` is ArrayLoader's (a subclass adding methods or attributes too). One that overrides ``__iter__``
    (an augmentation, say) is iterated as it is, as any other iterable: its batches are the ones plain iteration
    gives (as a training shard under several processes, not every example once in evaluation).

    Example:
        >>> class Doubled(ArrayLoader):
        ...     def __iter__(self):
        ...         return (b * 2 for b in super().__iter__())
        >>> x = torch.arange(4)
        >>> direct_array_loader(ArrayLoader(x, batch_size=2)), direct_array_loader(Doubled(x, batch_size=2))
        (True, False)
    """
    return isinstance(data, ArrayLoader) and type(data).__iter__ is ArrayLoader.__iter__


def epoch_batches(data: Iterable[Batch], epoch: int, seed: int, start: int, stop: int | None, sequential: bool) -> Iterator[Batch]:
    """Batches ``start..stop`` of ``epoch``: ArrayLoader starts there; other iterables skip by iterating.

    Other data is told the epoch first where it can be: a DataLoader's samplers (``set_epoch`` or, for the
    random ones, a generator seeded from ``(seed, epoch)``) and, with workers, its ``generator`` (which seeds
    the workers: a dataset's random transforms, replayed by a resumed run except in ``persistent_workers``, seeded
    once when they start; without workers one's own is replaced too, so iterating does not draw from it, and
    transforms draw from the global generator; :func:`fnlit.fit` puts back what :func:`generators` lists when it
    ends), or the data's own
    ``set_epoch(epoch)`` (a wrapper around an ArrayLoader that forwards it reshuffles each epoch, as the loader
    itself does).

    Example:
        >>> loader = ArrayLoader(torch.arange(6), batch_size=2, shuffle=False)
        >>> [b.tolist() for b in epoch_batches(loader, epoch=0, seed=0, start=1, stop=None, sequential=False)]
        [[2, 3], [4, 5]]
        >>> [b.tolist() for b in epoch_batches(DataLoader(torch.arange(6), batch_size=2), 0, 0, 1, 2, False)]
        [[2, 3]]
    """
    order_epoch = 0 if sequential else epoch
    if direct_array_loader(data):
        it = data.batches(epoch, seed, start, shuffle=False if sequential else None)
        return it if stop is None else itertools.islice(it, max(0, stop - start))
    if isinstance(data, ArrayLoader):  # a subclass with its own __iter__: the order of fit's seed, as above
        data.set_epoch(order_epoch, seed)
    elif not isinstance(data, DataLoader) and callable(getattr(data, "set_epoch", None)):
        data.set_epoch(order_epoch)  # a wrapper that forwards it (around an ArrayLoader), or a dataset's own
    elif isinstance(data, DataLoader):
        for sampler in _samplers(data):
            if _seeded_sampler(sampler):
                # RandomSampler, SubsetRandomSampler, WeightedRandomSampler: drawn from this epoch's seed, not the
                # global generator, so a run resumed mid-epoch skips the batches of the same order
                sampler.generator = torch.Generator().manual_seed(epoch_seed(seed, order_epoch))
            elif callable(getattr(sampler, "set_epoch", None)):  # DistributedSampler, or one's own (as Lightning does)
                sampler.set_epoch(order_epoch)
        if data.num_workers > 0 or data.generator is not None:
            # The workers' seeds (a dataset's random transforms) come from this epoch's seed and the rank, not the
            # global generator: a run resumed mid-epoch replays the same transforms while skipping, and each rank
            # transforms its examples with its own stream (as Lightning's worker seeds mix in the rank). Without
            # workers that seed goes unused, but every iter() draws it: one's own generator is not drawn from.
            # persistent_workers are seeded once, when they start (torch cannot reseed them): their transforms are
            # not replayed by a resume (the README says so).
            worker_seed = (epoch_seed(seed, epoch) ^ _WORKER_SEED_MIX) + _WORKER_RANK_STRIDE * _dist.rank()
            data.generator = torch.Generator().manual_seed(worker_seed & 0x7FFF_FFFF_FFFF_FFFF)
    return itertools.islice(iter(data), start, stop)


def _seeded_sampler(sampler: Any) -> bool:
    """Whether :func:`epoch_batches` sets ``sampler``'s ``generator``: one without ``set_epoch`` whose generator is a
    ``torch.Generator`` or None (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)."""
    return not callable(getattr(sampler, "set_epoch", None)) and isinstance(
        getattr(sampler, "generator", 0), (torch.Generator, type(None))
    )


def generators(data: Any) -> list[tuple[Any, torch.Generator | None]]:
    """The objects whose ``generator`` :func:`epoch_batches` sets in a DataLoader (its samplers seeded per epoch, and
    the DataLoader itself), each with the generator it holds now: :func:`fnlit.fit` puts them back when it ends.
    Other data: none.

    Example:
        >>> g = torch.Generator()
        >>> loader = DataLoader(torch.arange(4), shuffle=True, generator=g)
        >>> [(type(o).__name__, held is g) for o, held in generators(loader)]
        [('RandomSampler', True), ('DataLoader', True)]
    """
    if not isinstance(data, DataLoader):
        return []
    return [(s, s.generator) for s in _samplers(data) if _seeded_sampler(s)] + [(data, data.generator)]


def own_generators(data: Any) -> list[str]:
    """What of ``data``'s draws its order or its workers' seeds from a generator one set (not None) that
    :func:`epoch_batches` replaces with fit's seed: ``"its RandomSampler's generator"``, ``"its generator (the
    workers' seeds)"``. The DataLoader's own counts with workers only (without them, its seed is unused).

    Example:
        >>> loader = DataLoader(torch.arange(4), shuffle=True, generator=torch.Generator())
        >>> own_generators(loader), own_generators(DataLoader(torch.arange(4), shuffle=True))
        (["its RandomSampler's generator"], [])
    """
    named = []
    for obj, gen in generators(data):
        if gen is None:
            continue
        if obj is not data:
            named.append(f"its {type(obj).__name__}'s generator")
        elif data.num_workers > 0:
            named.append("its generator (the workers' seeds)")
    return named


_WORKER_SEED_MIX = 0x2545_F491_4F6C_DD1D  # apart from the samplers' seeds of the same (seed, epoch)
# Each rank's workers (base seed + worker id) far from the next rank's, in the low 32 bits: the CPU generator
# (mt19937) keeps only those of a seed. An odd multiplier: distinct for every rank below 2**32.
_WORKER_RANK_STRIDE = 0x9E37_79B9


def unshuffled(data: Iterable[Batch], name: str = "train_data") -> Iterable[Batch]:
    """``data`` in its unshuffled order (``fit(overfit_batches=...)``, as Lightning does): a DataLoader built
    the same way with its RandomSampler replaced by a SequentialSampler and a DistributedSampler by one with
    ``shuffle=False``; a DataLoader that does not shuffle, and other data, as it is (ArrayLoader is asked for its
    unshuffled order when iterated).

    Raises:
        ValueError: if ``data`` (named ``name`` in the message) is a shuffling instance of a DataLoader subclass:
            a plain DataLoader rebuilt from it would drop the subclass's ``__iter__`` and attributes (Lightning
            re-creates it from the arguments it captured at its construction, which fnlit does not have); or a
            shuffling ArrayLoader subclass that overrides ``__iter__`` (iterated as it is, it would shuffle).

    Example:
        >>> loader = DataLoader(torch.arange(6), batch_size=2, shuffle=True)
        >>> [b.tolist() for b in unshuffled(loader)]
        [[0, 1], [2, 3], [4, 5]]
    """
    if isinstance(data, ArrayLoader) and data.shuffle and not direct_array_loader(data):
        raise ValueError(
            f"fit(overfit_batches=...) got a shuffling {type(data).__name__} (an ArrayLoader subclass with its own "
            f"__iter__) as {name}: iterated as it is, it would shuffle. Build the {type(data).__name__} with "
            "shuffle=False for overfit_batches."
        )
    if not isinstance(data, DataLoader) or isinstance(data.dataset, IterableDataset):
        return data

    def plain(s: Any) -> Any:
        if isinstance(s, RandomSampler) and not s.replacement and s._num_samples is None:  # a permutation of all
            return SequentialSampler(s.data_source)
        if isinstance(s, DistributedSampler) and s.shuffle:
            return DistributedSampler(s.dataset, num_replicas=s.num_replicas, rank=s.rank, shuffle=False, seed=s.seed,
                                      drop_last=s.drop_last)  # fmt: skip
        return s

    def rebuilt(**how: Any) -> DataLoader:
        if type(data) is not DataLoader:
            raise ValueError(
                f"fit(overfit_batches=...) got a shuffling {type(data).__name__} (a DataLoader subclass) as {name}: "
                "fnlit cannot rebuild it with its examples in order without losing what the subclass adds (its "
                f"__iter__, its attributes). Build the {type(data).__name__} with shuffle=False (or a sampler in "
                "order) for overfit_batches, or pass a plain DataLoader."
            )
        return DataLoader(data.dataset, **how, **common)

    common: dict[str, Any] = dict(
        num_workers=data.num_workers, collate_fn=data.collate_fn, pin_memory=data.pin_memory, timeout=data.timeout,
        worker_init_fn=data.worker_init_fn, multiprocessing_context=data.multiprocessing_context,
        generator=data.generator, persistent_workers=data.persistent_workers, pin_memory_device=data.pin_memory_device,
    )  # fmt: skip
    if data.num_workers > 0:
        common["prefetch_factor"] = data.prefetch_factor
    if hasattr(data, "in_order"):  # (torch >= 2.6) in_order=False: workers' batches as they come
        common["in_order"] = data.in_order
    if data.batch_size is not None:  # batch_size=...: the sampler decides the order
        sampler = plain(data.sampler)
        if sampler is data.sampler:
            return data
        return rebuilt(batch_size=data.batch_size, sampler=sampler, drop_last=data.drop_last)
    bs = data.batch_sampler
    if bs is None:  # batch_size=None: examples one by one
        sampler = plain(data.sampler)
        return data if sampler is data.sampler else rebuilt(batch_size=None, sampler=sampler)
    sampler = plain(bs.sampler) if type(bs) is BatchSampler else None
    if sampler is None or sampler is bs.sampler:
        return data  # a batch sampler of its own keeps its own order
    return rebuilt(batch_sampler=BatchSampler(sampler, bs.batch_size, bs.drop_last))


def _samplers(data: DataLoader) -> list[Any]:
    """The samplers that may decide a DataLoader's order: ``data.sampler``, the one a batch sampler holds, and a
    batch sampler other than torch's ``BatchSampler`` itself.

    ``DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), ...))`` draws its order from
    ``data.batch_sampler.sampler`` (``data.sampler`` is then an unused SequentialSampler); with
    ``batch_size``, ``data.batch_sampler.sampler`` is ``data.sampler``, listed once.
    """
    bs = data.batch_sampler
    inner = getattr(bs, "sampler", None)
    out = [data.sampler] + ([inner] if inner is not None and inner is not data.sampler else [])
    # A batch sampler of one's own decides the order itself (a bucketing DistributedSampler subclass that yields
    # lists of indices, passed as batch_sampler=): it counts too, and is told the epoch.
    return out + ([bs] if bs is not None and type(bs) is not BatchSampler else [])


def check_sharding(data: Iterable[Any], name: str) -> None:
    """Raises if a DataLoader may give every rank the same batches under torch.distributed.

    A sampler shards if its ``num_replicas`` and ``rank`` are the world size and this process's rank: a
    DistributedSampler (as ``sampler`` or inside a batch sampler, ``BatchSampler(DistributedSampler(ds), ...)``)
    built as ``DistributedSampler(ds)`` (which reads them from the process group), not with other values
    (``num_replicas=1``, or ``rank=LOCAL_RANK`` on several nodes: ranks then share a shard), and a sampler of one's
    own that has those attributes, as DistributedSampler does.
    A DataLoader over an IterableDataset passes: such a dataset has no sampler and must shard itself by rank
    (``fnlit.distributed.rank()``), as torch's documentation asks of it. Any other iterable passes as well (a
    DataLoader wrapped in a plain iterable is the user's to shard).

    Example:
        >>> check_sharding(DataLoader(torch.arange(6)), "train_data")  # one process: nothing to shard, passes
    """
    world = _dist.world_size()
    if world <= 1 or not isinstance(data, DataLoader) or isinstance(data.dataset, IterableDataset):
        return
    rank = _dist.rank()
    samplers = _samplers(data)
    if any((getattr(s, "num_replicas", None), getattr(s, "rank", None)) == (world, rank) for s in samplers):
        return
    for s in samplers:
        if isinstance(s, DistributedSampler):
            raise ValueError(
                f"fit got a DataLoader as {name} whose {type(s).__name__} was built with num_replicas={s.num_replicas}, "
                f"rank={s.rank}, but this process is rank {rank} of {world}: ranks would see the same examples, or "
                "miss some. Build it as DistributedSampler(dataset) (it reads both from the process group), or pass "
                f"num_replicas=fnlit.distributed.world_size() and rank=fnlit.distributed.rank() (the global rank, "
                "not LOCAL_RANK)."
            )
    raise ValueError(
        f"fit got a DataLoader as {name} under torch.distributed (world size {world}) without a "
        "DistributedSampler, so every rank may see the same batches. Use fnlit.data.ArrayLoader (it shards "
        "itself) or DataLoader(..., sampler=DistributedSampler(dataset)). A sampler of your own that shards by "
        f"rank passes if it has num_replicas and rank attributes ({world} and this rank, {rank}), as "
        "DistributedSampler does; or wrap the DataLoader in a plain iterable (an object whose __iter__ returns "
        "iter(loader)) to skip this check."
    )


def device_mover(device: torch.device) -> Callable[[Batch], Batch] | None:
    """A function moving batches to ``device`` (pinned, non-blocking), or None on the CPU (nothing to do).

    As Lightning's ``move_data_to_device``: an object with a ``to`` method of its own (a PackedSequence, which keeps
    its ``batch_sizes`` on the CPU; a graph of PyG or DGL) is moved by it, ``obj.to(device)`` (with
    ``non_blocking=True`` where its signature takes it), not walked; tensors are reached in pytrees, in any Mapping
    (a dict subclass is copied, another Mapping rebuilt as its type from a dict), in list and tuple subclasses
    (copied, their attributes too) and in dataclasses' fields (frozen ones too). The batch itself is left alone
    (unless an object's own ``to`` changes it in place; a Mapping is rebuilt even when it has a ``to``, as Hugging
    Face's BatchEncoding, which would move itself in place).

    Example:
        >>> device_mover(torch.device("cpu")) is None
        True
        >>> device_mover(torch.device("meta"))((torch.ones(2), 3))  # non-tensor leaves are left alone
        (tensor(..., device='meta', size=(2,)), 3)
    """
    if device.type == "cpu":
        return None  # CPU training: batches stay where they are, at no cost
    pin = device.type == "cuda"
    takes_non_blocking: dict[type, bool] = {}  # by type: the signature is read once, not every batch

    def own_to(t: Any) -> Any:
        kind = type(t)
        if kind not in takes_non_blocking:
            takes_non_blocking[kind] = _takes_non_blocking(kind.to)
        out = t.to(device, non_blocking=True) if takes_non_blocking[kind] else t.to(device)
        return t if out is None else out  # (a to() that moves in place and forgets to return self, as Lightning)

    def move(batch: Batch) -> Batch:
        def one(t: Any) -> Any:
            if isinstance(t, torch.Tensor):
                if t.device == device:
                    return t
                if pin and t.device.type == "cpu" and not t.is_pinned():
                    t = t.pin_memory()
                return t.to(device, non_blocking=True)
            # pytree leaves to optree that hold tensors, as Lightning's move_data_to_device reads them. A Mapping is
            # rebuilt even with a to() of its own (Hugging Face's BatchEncoding moves itself in place: the user's
            # batch would change, and its tensors would not be pinned).
            if isinstance(t, UserDict):
                return _with_data(t, {k: move(v) for k, v in t.data.items()})
            if isinstance(t, Mapping):  # a dict subclass, another Mapping
                return _with_items(t, {k: move(v) for k, v in t.items()})
            if _has_own_to(t):
                return own_to(t)
            if isinstance(t, (list, tuple)):  # a subclass (optree walks list, tuple and namedtuples itself)
                return _with_elements(t, [move(v) for v in t])
            if dataclasses.is_dataclass(t) and not isinstance(t, type):  # a plain (maybe frozen) dataclass
                return _with_fields(t, move)
            return t

        return _tree.tree_map(one, batch, is_leaf=_has_own_to)

    return move


def _has_own_to(t: Any) -> bool:
    """Whether ``t`` is moved by its own ``to`` method (Lightning's test: a callable ``to`` on its type); tensors too."""
    return callable(getattr(type(t), "to", None))


def _takes_non_blocking(to: Callable[..., Any]) -> bool:
    """Whether a ``to`` method accepts ``non_blocking=`` (a parameter of that name, or ``**kwargs``)."""
    try:
        params = inspect.signature(to).parameters.values()
    except (TypeError, ValueError):  # (a builtin without a signature)
        return False
    return any(p.name == "non_blocking" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def batch_size_of(batch: Batch) -> int:
    """The leading dimension of the batch's first tensor (or NumPy array) that has one (1 if none has), as Lightning
    infers it.

    Dicts (any Mapping) are read in their own key order (Lightning's order; ``{"x": x, "y": y, "class_weight": w}``
    counts ``x``'s examples, not the weights'), dataclasses field by field, and 0-d tensors are skipped: a scalar beside the examples does not make the batch
    count as one example. Tensors whose leading dimensions disagree get a warning, as in Lightning (the first is used).

    Example:
        >>> batch_size_of((torch.zeros(8, 3), torch.zeros(8))), batch_size_of({"x": torch.zeros(())})
        (8, 1)
        >>> batch_size_of({"scale": torch.tensor(2.0), "x": torch.zeros(8, 3)})
        8
    """
    sizes = _leading_sizes(batch)
    size = next(sizes, None)
    if size is None:
        return 1
    if any(n != size for n in sizes):  # (the message names the size only, as Lightning's: shown once per size)
        warnings.warn(
            f"batch_size_of: the batch's tensors have different leading dimensions; counting {size} examples, from "
            "its first tensor (dicts in their key order), as Lightning does. If that is not the number of examples, "
            "put the examples' tensor first.",
            stacklevel=2,
        )
    return size


def _leading_sizes(tree: Any) -> Iterator[int]:
    """The leading dimensions of the tensors and NumPy arrays in ``tree`` (not 0-d ones), dicts in their own key
    order."""
    if isinstance(tree, torch.Tensor):
        if tree.dim() > 0:
            yield int(tree.shape[0])
    elif isinstance(tree, np.ndarray):  # (a DataLoader's collate makes tensors of them; a list of batches may hold them as they are)
        if tree.ndim > 0:
            yield int(tree.shape[0])
    elif isinstance(tree, Mapping):  # any: a dict subclass, a UserDict (Hugging Face's BatchEncoding is one)
        for v in tree.values():
            yield from _leading_sizes(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leading_sizes(v)
    elif dataclasses.is_dataclass(tree) and not isinstance(tree, type):  # its fields in order, as Lightning reads it
        for f in dataclasses.fields(tree):
            yield from _leading_sizes(getattr(tree, f.name, None))
    elif tree is not None:
        leaves = _tree.tree_leaves(tree)  # another pytree node (a registered dataclass): its leaves
        if not (len(leaves) == 1 and leaves[0] is tree):
            for v in leaves:
                yield from _leading_sizes(v)


def _holds_list(tree: Any) -> bool:
    """Whether ``tree`` (dicts, tuples, dataclasses) holds a Python list: a batch's examples as a list (texts)."""
    if isinstance(tree, list):
        return True
    if isinstance(tree, Mapping):
        return any(_holds_list(v) for v in tree.values())
    if isinstance(tree, tuple):
        return any(_holds_list(v) for v in tree)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return any(_holds_list(getattr(tree, f.name, None)) for f in dataclasses.fields(tree))
    return False


def _with_items(mapping: Mapping[Any, Any], items: dict[Any, Any]) -> Mapping[Any, Any]:
    """A copy of a Mapping holding ``items``: a dict subclass as a copy (its other attributes too), another Mapping
    rebuilt as its type from a dict (as Lightning does); the original is left alone."""
    if isinstance(mapping, dict):
        new = copy.copy(mapping)
        dict.update(new, items)  # (the same keys: the order stays)
        return new
    try:
        return type(mapping)(items)
    except Exception as e:
        raise TypeError(
            f"device_mover could not rebuild a {type(mapping).__name__} batch from a dict of its moved values "
            f"({type(e).__name__}: {e}). Make it a dict subclass or a dataclass, or move it in the step."
        ) from e


def _with_fields(obj: Any, move: Callable[[Any], Any]) -> Any:
    """A copy of a dataclass instance with ``move`` applied to its fields (frozen ones too, without calling
    ``__init__``/``__post_init__`` again); the original is left alone."""
    new = copy.copy(obj)
    for f in dataclasses.fields(obj):
        if hasattr(obj, f.name):  # (an init=False field without a default may be unset)
            object.__setattr__(new, f.name, move(getattr(obj, f.name)))
    return new


def _with_elements(seq: list[Any] | tuple[Any, ...], items: list[Any]) -> list[Any] | tuple[Any, ...]:
    """A copy of a list or tuple subclass holding ``items`` (its other attributes too), built without calling its
    ``__init__``/``__new__`` again; the original is left alone, and returned when nothing in it moved (a torch.Size)."""
    if all(a is b for a, b in zip(seq, items)):
        return seq
    if isinstance(seq, list):
        new: Any = list.__new__(type(seq))
        list.extend(new, items)
    else:
        try:
            new = tuple.__new__(type(seq), items)
        except TypeError:  # a tuple type with its own __new__ that refuses this (torch.Size): built as Lightning does
            return type(seq)(items)
    if hasattr(seq, "__dict__"):
        new.__dict__.update(seq.__dict__)
    return new


def _with_data(mapping: UserDict, data: dict[Any, Any]) -> UserDict:
    """A copy of a UserDict (its other attributes too) holding ``data``; the original is left alone."""
    new = copy.copy(mapping)
    new.data = data
    return new
