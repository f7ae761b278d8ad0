"""ArrayLoader: deterministic per-epoch order from (seed, epoch), starts mid-epoch, shards across ranks."""

import collections.abc
import warnings

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, TensorDataset

import fnlit
from fnlit.callbacks import StopTraining
from fnlit.data import (
    ArrayLoader,
    batch_size_of,
    check_sharding,
    device_mover,
    epoch_batches,
)


def flat(batches):
    return [x.tolist() for x in batches]


def test_batches_cover_the_data_once_per_epoch():
    loader = ArrayLoader(torch.arange(10), batch_size=3)
    assert len(loader) == 4
    epoch0 = flat(loader.batches(0, seed=5))
    assert [len(b) for b in epoch0] == [3, 3, 3, 1] and sorted(sum(epoch0, [])) == list(range(10))
    assert len(ArrayLoader(torch.arange(10), batch_size=3, drop_last=True)) == 3


def test_order_is_a_pure_function_of_seed_and_epoch():
    a, b = ArrayLoader(torch.arange(20), batch_size=4), ArrayLoader(torch.arange(20), batch_size=4)
    assert flat(a.batches(3, seed=1)) == flat(b.batches(3, seed=1))
    assert flat(a.batches(3, seed=1)) != flat(a.batches(4, seed=1))
    assert flat(a.batches(3, seed=1)) != flat(a.batches(3, seed=2))
    expected = torch.tensor(fnlit.distributed.shard_indices(20, rank=0, world_size=1, shuffle=True, seed=1, epoch=3))
    assert torch.equal(torch.cat(list(a.batches(3, seed=1))), expected)


def test_start_skips_earlier_batches_without_building_them():
    x = torch.arange(12)
    loader = ArrayLoader(x, x * 10, batch_size=2)
    full = list(loader.batches(2, seed=0))
    calls = []
    orig = torch.Tensor.index_select
    loader.tensors = tuple(_Spy(t, calls, orig) for t in loader.tensors)
    tail = list(loader.batches(2, seed=0, start=4))
    assert len(calls) == 2 * 2  # two batches, two tensors: nothing built for batches 0..3
    assert [(a.tolist(), b.tolist()) for a, b in tail] == [(a.tolist(), b.tolist()) for a, b in full[4:]]


class _Spy:
    """Wraps a tensor and records index_select calls."""

    def __init__(self, t, calls, orig):
        self.t, self.calls, self.orig = t, calls, orig
        self.shape, self.device = t.shape, t.device

    def index_select(self, dim, idx):
        self.calls.append(idx.tolist())
        return self.orig(self.t, dim, idx)


def test_shuffle_off_and_plain_iteration():
    loader = ArrayLoader(torch.arange(5), batch_size=2, shuffle=False)
    assert flat(loader) == [[0, 1], [2, 3], [4]]
    loader = ArrayLoader(torch.arange(5), batch_size=2)
    loader.set_epoch(1, seed=3)
    assert flat(loader) == flat(loader.batches(1, 3))
    assert flat(loader.batches(1, 3, shuffle=False)) == [[0, 1], [2, 3], [4]]


def test_bad_arguments():
    with pytest.raises(ValueError, match="same first dimension"):
        ArrayLoader(torch.zeros(3), torch.zeros(4), batch_size=1)
    with pytest.raises(ValueError, match="batch_size to be an int >= 1, got 0"):
        ArrayLoader(torch.zeros(3), batch_size=0)
    with pytest.raises(ValueError, match="at least one tensor"):
        ArrayLoader(batch_size=2)


def test_epoch_batches_for_other_iterables():
    assert list(epoch_batches([1, 2, 3, 4], 0, 0, start=1, stop=3, sequential=False)) == [2, 3]
    dl = DataLoader(TensorDataset(torch.arange(8)), batch_size=2, shuffle=True)
    a = [b[0].tolist() for b in epoch_batches(dl, 1, 7, 0, None, False)]
    assert a == [b[0].tolist() for b in epoch_batches(dl, 1, 7, 0, None, False)]
    assert a != [b[0].tolist() for b in epoch_batches(dl, 2, 7, 0, None, False)]


class _Stop:
    def __init__(self, at):
        self.at = at

    def on_step(self, state, metrics):
        if int(state.step) == self.at:
            raise StopTraining


def _fit_batches(data, **kw):
    """The batches (example indices) a fit of 3 epochs trains on."""
    from fnlit.loop import fit

    seen = []

    def step(state, batch):
        seen.append(batch[0].tolist())
        return state.replace(step=state.step + 1), {"loss": batch[0].float().mean()}

    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    fit(step, state, data, max_epochs=3, progress=False, **kw)
    return seen


def test_a_random_sampler_inside_a_batch_sampler_is_reseeded_and_resumes(tmp_path):
    from fnlit.checkpoint import Checkpointer

    ds = TensorDataset(torch.arange(12))
    with_batch_sampler = lambda: DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 4, False))  # noqa: E731
    reference = _fit_batches(DataLoader(ds, batch_size=4, shuffle=True))  # the order of the sampler path
    assert reference[:3] != reference[3:6] and sorted(sum(reference[:3], [])) == list(range(12))
    torch.manual_seed(1)
    assert _fit_batches(with_batch_sampler()) == reference
    torch.manual_seed(2)
    first = _fit_batches(with_batch_sampler(), checkpoint=Checkpointer(tmp_path), callbacks=[_Stop(4)])
    torch.manual_seed(3)  # a new process: the global generator is elsewhere
    resumed = _fit_batches(with_batch_sampler(), checkpoint=Checkpointer(tmp_path), ckpt_path="last")
    assert first == reference[:4] and resumed == reference[4:]


def test_a_distributed_sampler_inside_a_batch_sampler_gets_the_epoch():
    ds = TensorDataset(torch.arange(12))
    sampler = DistributedSampler(ds, num_replicas=2, rank=1, seed=5)
    dl = DataLoader(ds, batch_sampler=BatchSampler(sampler, 2, False))
    got = [b[0].tolist() for b in epoch_batches(dl, 3, 0, 0, None, False)]
    reference = DistributedSampler(ds, num_replicas=2, rank=1, seed=5)
    reference.set_epoch(3)
    assert sum(got, []) == list(reference) and sampler.epoch == 3


def test_device_mover_and_batch_size():
    assert device_mover(torch.device("cpu")) is None  # CPU training: no work per batch
    assert batch_size_of({"x": torch.zeros(5, 2), "y": torch.zeros(5)}) == 5 and batch_size_of(3) == 1



def test_evaluate_weights_a_batch_by_its_examples_not_by_a_scalar_beside_them():
    """A dict batch's leaves come in sorted-key order, so a 0-d "scale" came first and every batch counted
    as one example: the mean over 10 examples in batches of 4, 4, 2 came out 5.17 instead of 4.5."""
    x = torch.arange(10.0)
    batches = [{"x": x[i : i + 4], "scale": torch.tensor(1.0)} for i in range(0, 10, 4)]
    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    got = fnlit.evaluate(lambda s, b: {"m": b["x"].mean()}, state, batches)
    assert got["m"] == pytest.approx(sum(range(10)) / 10)
    assert batch_size_of({"a": torch.tensor(3), "b": (torch.zeros(()), torch.zeros(7, 2))}) == 7


def test_evaluate_weights_numpy_batches_by_their_examples_and_warns_for_batches_without_any():
    """Only torch tensors were counted: NumPy batches of 8 and 2 examples counted 1 each, so the smaller last batch
    weighed as a full one (6.0 instead of 4.5); batches of Python lists counted 1 each without a word."""
    import numpy as np

    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    mean = sum(range(10)) / 10  # by hand, over the 10 examples
    step = lambda s, b: {"m": torch.as_tensor(b["x"]).mean()}  # noqa: E731
    got = fnlit.evaluate(step, state, [{"x": np.arange(8.0)}, {"x": np.arange(8.0, 10.0)}])
    assert got["m"] == pytest.approx(mean)
    assert batch_size_of((np.float64(2.0), np.zeros((7, 3)))) == 7  # (a 0-d array is skipped, as a 0-d tensor)
    lists = [{"x": list(range(8))}, {"x": [8, 9]}]
    with pytest.warns(UserWarning, match=r"a batch \(dict\) holds none, its examples in Python lists: each such batch counts as one") as w:
        got = fnlit.evaluate(lambda s, b: {"m": torch.tensor(b["x"], dtype=torch.float64).mean()}, state, lists)
    assert len(w) == 1  # once per evaluate
    assert got["m"] == pytest.approx((3.5 + 8.5) / 2)  # each batch one example: as it says


def test_evaluate_counts_a_dict_batch_by_its_first_tensor_in_key_order_as_lightning():
    """A per-class weight vector whose key sorts first ("class_weight" < "x") weighted every batch by the
    number of classes: batches of 5, 5 and 3 examples counted 4 each. Lightning reads a dict in its own order."""
    x = torch.arange(13.0)
    batches = [{"x": x[i : i + 5], "y": x[i : i + 5], "class_weight": torch.ones(4)} for i in range(0, 13, 5)]
    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    with pytest.warns(UserWarning, match=r"different leading dimensions; counting [35] examples"):
        got = fnlit.evaluate(lambda s, b: {"m": b["x"].mean()}, state, batches)
    assert got["m"] == pytest.approx(x.mean().item())  # every example once (a hand mean)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when the sizes agree
        assert batch_size_of({"b": torch.zeros(3, 2), "a": [torch.zeros(3)], "s": torch.tensor(1.0)}) == 3


def test_dataclass_and_dict_subclass_batches_are_counted_and_moved_as_lightning_does():
    """A plain @dataclass batch counted one example (evaluate weighted a 4-batch as a 1-batch: 2.75, not 2.0), and
    device_mover left its fields, and a dict subclass's values, where they were (Lightning moves and counts both)."""
    import dataclasses

    @dataclasses.dataclass
    class Batch:
        x: torch.Tensor

    @dataclasses.dataclass(frozen=True)
    class Frozen:
        x: torch.Tensor
        n: int = 3

    class MyDict(dict):
        pass

    x = torch.arange(5.0)
    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    as_tuples = [(x[:4],), (x[4:],)]  # the reference: the same examples as tuple batches, and the hand mean
    reference = fnlit.evaluate(lambda s, b: {"m": b[0].mean()}, state, as_tuples)["m"]
    assert reference == pytest.approx(x.mean().item())
    for make in (Batch, Frozen, lambda t: MyDict(x=t)):
        batches = [make(x[:4]), make(x[4:])]
        get = (lambda b: b["x"]) if isinstance(batches[0], dict) else (lambda b: b.x)
        assert fnlit.evaluate(lambda s, b: {"m": get(b).mean()}, state, batches)["m"] == pytest.approx(reference)
        assert batch_size_of(batches[0]) == 4

    move = device_mover(torch.device("meta"))  # observes moves on the CPU
    moved = move(Batch(x))
    assert type(moved) is Batch and moved.x.device.type == "meta"
    frozen = Frozen(x)
    moved = move({"b": frozen})["b"]
    assert type(moved) is Frozen and moved.x.device.type == "meta" and moved.n == 3
    assert frozen.x.device.type == "cpu"  # the original is left alone
    d = MyDict(x=x, y=[x])
    d.note = "kept"
    moved = move(d)
    assert type(moved) is MyDict and moved["x"].device.type == "meta" and moved["y"][0].device.type == "meta"
    assert moved.note == "kept" and list(moved) == ["x", "y"] and d["x"].device.type == "cpu"
    import types

    moved = move(types.MappingProxyType({"x": x}))  # another Mapping: rebuilt as its type from a dict
    assert type(moved) is types.MappingProxyType and moved["x"].device.type == "meta"

    class Pair(collections.abc.Mapping):  # a Mapping that cannot be built from a dict
        def __init__(self, a, b):
            self.a, self.b = a, b

        def __getitem__(self, k):
            return {"a": self.a, "b": self.b}[k]

        def __iter__(self):
            return iter("ab")

        def __len__(self):
            return 2

    with pytest.raises(TypeError, match="device_mover could not rebuild a Pair batch from a dict of its moved values"):
        move(Pair(x, x))


def _list_order(n, rank, world, shuffle, seed, epoch):
    """The order ArrayLoader drew before it stayed a tensor: a Python list cut per rank (the reference that runs
    already started keep: a resume must see the same batches)."""
    if shuffle:
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) & 0x7FFF_FFFF_FFFF_FFFF)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    return order[rank : (n // world) * world : world]


@pytest.mark.parametrize("n, world, batch_size, drop_last", [(10, 1, 3, False), (10, 1, 3, True), (11, 2, 2, False),
                                                             (13, 3, 4, True), (7, 4, 5, False)])  # fmt: skip
def test_the_tensor_order_is_the_list_order_runs_already_started_keep(monkeypatch, n, world, batch_size, drop_last):
    """ArrayLoader drew each epoch's order as a list of Python ints (~45 bytes an example: +919 MB for 20M
    examples) and turned it back into a tensor; it stays a tensor now, in the same order bit for bit."""
    monkeypatch.setattr(fnlit.distributed, "world_size", lambda: world)
    loader = ArrayLoader(torch.arange(n) * 10, batch_size=batch_size, drop_last=drop_last)
    for rank in range(world):
        monkeypatch.setattr(fnlit.distributed, "rank", lambda r=rank: r)
        for seed, epoch, shuffle in ((0, 0, True), (7, 3, True), (-5, 1, True), (2**40, 2, True), (3, 1, False)):
            expected = _list_order(n, rank, world, shuffle, seed, epoch)
            got = loader.indices(epoch, seed, shuffle=shuffle)
            assert got.dtype == torch.int64 and got.tolist() == expected
            size = len(expected) // batch_size if drop_last else -(-len(expected) // batch_size)
            batches = [[i * 10 for i in expected[k * batch_size : (k + 1) * batch_size]] for k in range(size)]
            assert [b.tolist() for b in loader.batches(epoch, seed, shuffle=shuffle)] == batches
            assert fnlit.distributed.shard_indices(n, rank=rank, world_size=world, shuffle=shuffle, seed=seed,
                                                   epoch=epoch) == expected  # fmt: skip


def test_an_epoch_order_holds_no_python_int_per_example():
    """tracemalloc sees Python objects only (not tensors' storage): a list order of 200k examples peaked at ~9 MB
    (a pointer and an int object an example); a tensor order at a few hundred bytes."""
    import tracemalloc

    loader = ArrayLoader(torch.zeros(200_000, dtype=torch.uint8), batch_size=256)
    loader.indices(0, seed=0)  # (lazy initialisations out of the way)
    tracemalloc.start()
    try:
        loader.indices(1, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200_000  # bytes: one per example would be 200k; a list takes ~45 per example


def test_objects_with_their_own_to_and_sequence_subclasses_are_moved_as_lightning_does():
    """device_mover walked a PackedSequence field by field (a namedtuple to optree) and moved its batch_sizes off
    the CPU ("batch_sizes should always be on CPU"), and left a graph with its own .to() and a list or tuple
    subclass unmoved. Lightning's move_data_to_device calls the object's own .to() (non_blocking where it takes
    it) and rebuilds Sequence subclasses; the reference here is the object's own .to()."""
    from torch.nn.utils.rnn import pack_sequence

    meta = torch.device("meta")
    move = device_mover(meta)
    packed = pack_sequence([torch.ones(3), torch.ones(2)], enforce_sorted=False)
    expected = packed.to(meta)
    got = move({"seq": packed, "x": torch.ones(2)})["seq"]
    assert type(got) is type(expected)
    for name in ("data", "batch_sizes", "sorted_indices", "unsorted_indices"):
        assert getattr(got, name).device == getattr(expected, name).device, name  # batch_sizes stays on the CPU

    class Graph:  # a PyG/DGL-like graph: its .to() knows which tensors move (here, not the CPU-side counts)
        def __init__(self, x, counts, calls):
            self.x, self.counts, self.calls = x, counts, calls

        def to(self, device):  # no non_blocking: called without it
            self.calls.append(device)
            return Graph(self.x.to(device), self.counts, self.calls)

    class Blocking(Graph):
        def to(self, device, non_blocking=False):
            self.calls.append((device, non_blocking))
            return Blocking(self.x.to(device), self.counts, self.calls)

    calls = []
    g = move([Graph(torch.ones(2), torch.ones(2), calls)])[0]
    assert type(g) is Graph and g.x.device == meta and g.counts.device.type == "cpu" and calls == [meta]
    calls.clear()
    g = move((Blocking(torch.ones(2), torch.ones(2), calls),))[0]
    assert type(g) is Blocking and g.x.device == meta and g.counts.device.type == "cpu" and calls == [(meta, True)]

    class Items(list):
        pass

    class Pair(tuple):
        pass

    x = torch.ones(2)
    items = Items([x, {"y": x}])
    items.note = "kept"
    moved = move(items)
    assert type(moved) is Items and moved.note == "kept" and moved[0].device == meta and moved[1]["y"].device == meta
    assert items[0].device.type == "cpu"  # the original is left alone
    moved = move({"p": Pair((x, 3))})["p"]
    assert type(moved) is Pair and moved[0].device == meta and moved[1] == 3
    # a batch carrying a shape (torch.Size refuses tuple.__new__) is left as it is, as before
    moved = move({"s": torch.Size([2, 3]), "x": x})
    assert moved["s"] == torch.Size([2, 3]) and type(moved["s"]) is torch.Size and moved["x"].device == meta


def test_array_loader_takes_numpy_arrays_and_refuses_other_containers():
    np = pytest.importorskip("numpy")
    x, y = np.arange(10), np.arange(10) * 2
    got = list(ArrayLoader(x, y, batch_size=4, shuffle=False))
    expected = list(DataLoader(TensorDataset(torch.arange(10), torch.arange(10) * 2), batch_size=4))
    assert len(got) == len(expected) == 3
    for (gx, gy), (ex, ey) in zip(got, expected):
        assert torch.equal(gx, ex) and torch.equal(gy, ey)
    with pytest.raises(TypeError, match="expected tensors \\(or numpy arrays\\).*got dict at position 0"):
        ArrayLoader({"x": torch.arange(10)}, batch_size=4)
    with pytest.raises(TypeError, match="got list at position 1"):
        ArrayLoader(torch.arange(3), [0, 1, 2], batch_size=4)


def test_a_negative_start_is_refused():
    """start=-1 yielded an empty batch, then the whole epoch."""
    loader = ArrayLoader(torch.arange(10), batch_size=3, shuffle=False)
    with pytest.raises(ValueError, match="start >= 0 \\(a batch index\\), got -1"):
        loader.batches(0, seed=0, start=-1)
    with pytest.raises(ValueError, match="start >= 0"):
        list(epoch_batches(loader, epoch=0, seed=0, start=-1, stop=None, sequential=False))



def test_a_batch_keyed_by_a_str_subclass_keeps_its_keys():
    """fnlit.tree caches the structure of flat dicts by their keys; a dict keyed by str subclasses (a StrEnum)
    that equal an earlier dict's plain-str keys got the cached structure, so unflattening it gave plain str keys."""
    import enum

    import optree

    from fnlit import tree

    class Name(str):
        pass

    subclasses = [Name]
    if hasattr(enum, "StrEnum"):  # Python 3.11+
        subclasses.append(enum.StrEnum("Field", {"X": "x", "Y": "y"}))
    for cls in subclasses:
        tree.tree_flatten({"x": torch.zeros(2), "y": torch.ones(2)})  # caches the plain-str dict's structure
        x, y = torch.zeros(2), torch.ones(2)
        for batch in ({cls("x"): x, cls("y"): y}, {"x": x, cls("y"): y}):  # all keys, or one, of the subclass
            leaves, treedef = tree.tree_flatten(batch)
            expected_leaves, expected_def = optree.tree_flatten(batch)
            assert [id(t) for t in leaves] == [id(t) for t in expected_leaves]
            back = tree.tree_unflatten(treedef, leaves)
            assert [type(k) for k in back] == [type(k) for k in optree.tree_unflatten(expected_def, leaves)]
            assert [type(k) for k in back] == [type(k) for k in batch], cls


@pytest.mark.cuda
def test_batches_move_to_the_state_device():
    move = device_mover(torch.device("cuda"))
    x, y = move((torch.zeros(4, 2), torch.ones(4)))
    assert x.is_cuda and y.is_cuda


class _RankShards(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(fnlit.distributed.rank(), 8, fnlit.distributed.world_size()))


def _shards():
    """Runs in each of 2 processes (fnlit.distributed.launch)."""
    loader = ArrayLoader(torch.arange(11), batch_size=2)
    seen = [x.tolist() for x in loader.batches(0, seed=3)]
    try:
        check_sharding(DataLoader(TensorDataset(torch.arange(4))), "train_data")
        error = ""
    except ValueError as e:
        error = str(e)
    ds = TensorDataset(torch.arange(4))
    check_sharding(DataLoader(ds, batch_sampler=BatchSampler(DistributedSampler(ds), 2, False)), "train_data")  # passes
    check_sharding(DataLoader(_RankShards(), batch_size=2), "train_data")  # an IterableDataset shards itself: passes
    # a launched rank may start processes of its own (it is not daemonic): DataLoader workers. (Forked: a rank's own
    # default start method is its launch's, and a forkserver or spawn worker imports torch afresh, ~10 s here.)
    forked = DataLoader(TensorDataset(torch.arange(4)), batch_size=2, num_workers=1, multiprocessing_context="fork")
    workers = [b[0].tolist() for b in forked]
    return len(loader), seen, error, _stop_on_one_rank(), workers


class _StopOnRank1:
    def on_step(self, state, metrics):
        if fnlit.distributed.rank() == 1 and int(state.step) == 3:
            raise StopTraining


def _stop_on_one_rank():
    """A stop requested on rank 1 alone: both ranks stop together, at the next log interval (step 5)."""
    from fnlit.loop import fit

    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    step = lambda s, b: (s.replace(step=s.step + 1), {"loss": b.float().mean()})  # noqa: E731
    out = fit(step, state, ArrayLoader(torch.arange(40), batch_size=1), max_epochs=1, log_every_n_steps=5,
              callbacks=[_StopOnRank1()], progress=False)  # fmt: skip
    return int(out.step)


@pytest.mark.distributed
def test_each_rank_gets_its_own_shard():
    (n0, a, e0, s0, w0), (n1, b, _, s1, w1) = fnlit.distributed.launch(_shards, 2, timeout=120)
    assert n0 == n1 == 3 and s0 == s1 == 5
    assert w0 == w1 == [[0, 1], [2, 3]]  # as in this process
    a, b = sum(a, []), sum(b, [])
    assert len(a) == len(b) == 5 and not set(a) & set(b)
    assert "DistributedSampler" in e0 and "ArrayLoader" in e0


class _RankSampler(torch.utils.data.Sampler):
    """Shards by rank itself (not a DistributedSampler subclass); ``reports`` sets num_replicas and rank as
    DistributedSampler does."""

    def __init__(self, n, reports):
        self.n = n
        if reports:
            self.num_replicas, self.rank = fnlit.distributed.world_size(), fnlit.distributed.rank()

    def __iter__(self):
        return iter(range(fnlit.distributed.rank(), self.n, fnlit.distributed.world_size()))

    def __len__(self):
        return self.n // fnlit.distributed.world_size()


class _Plain:
    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)


def _own_sampler_fit():
    """fit over 8 examples in batches of 2 with samplers of one's own: what each accepted run saw, the refusals."""
    out = {}
    for kind in ("reports", "batch_sampler", "plain", "silent", "wrong_rank"):
        seen = []

        def step(s, b):
            seen.extend(b.tolist())
            return s.replace(step=s.step + 1), {}

        sampler = _RankSampler(8, kind != "silent")
        if kind == "wrong_rank":
            sampler.rank = 1 - sampler.rank  # says it is the other rank's shard: not this rank's
        data = DataLoader(torch.arange(8), batch_size=2, sampler=sampler)
        if kind == "batch_sampler":
            data = DataLoader(torch.arange(8), batch_sampler=BatchSampler(sampler, 2, False))
        state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
        try:
            fnlit.fit(step, state, _Plain(data) if kind == "plain" else data, max_epochs=1, progress=False)
            out[kind] = seen
        except ValueError as e:
            out[kind] = str(e)
    return out


@pytest.mark.distributed
def test_a_sampler_of_ones_own_that_reports_its_shard_is_accepted():
    # Only DistributedSampler subclasses passed, with a claim that every rank *would* see the same batches and no
    # way out. The reference: the sampler's own shards (rank r: r, r + 2, ...), every example once.
    r0, r1 = fnlit.distributed.launch(_own_sampler_fit, 2, timeout=120)
    for kind in ("reports", "batch_sampler", "plain"):
        assert (r0[kind], r1[kind]) == ([0, 2, 4, 6], [1, 3, 5, 7]), kind
    for out in (r0["silent"], r1["silent"], r0["wrong_rank"], r1["wrong_rank"]):  # refused: no shard reported
        assert "every rank may see the same batches" in out


def test_the_sharding_refusal_names_the_ways_out(monkeypatch):
    monkeypatch.setattr(fnlit.distributed, "world_size", lambda: 2)
    monkeypatch.setattr(fnlit.distributed, "rank", lambda: 1)
    with pytest.raises(ValueError, match=(
        r"without a DistributedSampler, so every rank may see the same batches\. Use fnlit\.data\.ArrayLoader .*"
        r"DistributedSampler\(dataset\)\)\. A sampler of your own that shards by rank passes if it has num_replicas "
        r"and rank attributes \(2 and this rank, 1\).*wrap the DataLoader in a plain iterable"
    )):  # fmt: skip
        check_sharding(DataLoader(torch.arange(8), batch_size=2), "train_data")
    sampler = torch.utils.data.SequentialSampler(range(8))
    sampler.num_replicas, sampler.rank = 2, 1
    check_sharding(DataLoader(torch.arange(8), batch_size=2, sampler=sampler), "train_data")  # passes


def test_a_distributed_sampler_built_for_another_rank_or_world_is_refused(monkeypatch):
    """DistributedSampler(ds, num_replicas=1, rank=0) (or rank=LOCAL_RANK on several nodes) passed the check on
    rank 1 of 2, though it gives that rank another rank's shard, while a sampler of one's own with the same values
    was refused. The reference: DistributedSampler's own shards, which repeat across ranks with those values."""
    monkeypatch.setattr(fnlit.distributed, "world_size", lambda: 2)
    monkeypatch.setattr(fnlit.distributed, "rank", lambda: 1)
    ds = torch.arange(8)
    assert list(DistributedSampler(ds, num_replicas=2, rank=0, shuffle=False)) == [0, 2, 4, 6]  # rank 0's, not 1's
    for replicas, rank in ((1, 0), (2, 0), (4, 1)):
        sampler = DistributedSampler(ds, num_replicas=replicas, rank=rank)
        for data in (DataLoader(ds, batch_size=2, sampler=sampler),
                     DataLoader(ds, batch_sampler=BatchSampler(sampler, 2, drop_last=False))):  # fmt: skip
            with pytest.raises(ValueError, match=(
                rf"DistributedSampler was built with num_replicas={replicas}, rank={rank}, but this process is rank 1 "
                r"of 2.*DistributedSampler\(dataset\).*not LOCAL_RANK"
            )):  # fmt: skip
                check_sharding(data, "train_data")
    check_sharding(DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, num_replicas=2, rank=1)), "train_data")


@pytest.mark.parametrize("sampler", ["subset", "weighted"])
def test_subset_and_weighted_random_samplers_are_reseeded_and_resume_mid_epoch(tmp_path, sampler):
    from torch.utils.data import SubsetRandomSampler, WeightedRandomSampler

    from fnlit.checkpoint import Checkpointer

    ds = TensorDataset(torch.arange(12))

    def loader():
        s = SubsetRandomSampler(range(8)) if sampler == "subset" else WeightedRandomSampler(torch.arange(1.0, 13.0), 8)
        return DataLoader(ds, batch_size=2, sampler=s)

    torch.manual_seed(0)
    reference = _fit_batches(loader())
    torch.manual_seed(1)  # another process: the global generator elsewhere, the same order
    assert _fit_batches(loader()) == reference and reference[:4] != reference[4:8]
    first = _fit_batches(loader(), checkpoint=Checkpointer(tmp_path), callbacks=[_Stop(6)])
    torch.manual_seed(3)
    resumed = _fit_batches(loader(), checkpoint=Checkpointer(tmp_path), ckpt_path="last")
    assert first == reference[:6] and resumed == reference[6:]  # mid-epoch 1: the rest of the same order


def test_any_sampler_with_set_epoch_gets_the_epoch_as_lightning_calls_it():
    class EpochShuffled(torch.utils.data.Sampler):
        def __init__(self, n):
            self.n, self.epoch = n, 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __iter__(self):
            return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(100 + self.epoch)).tolist())

        def __len__(self):
            return self.n

    ds = TensorDataset(torch.arange(6))
    got = _fit_batches(DataLoader(ds, batch_size=3, sampler=EpochShuffled(6)))
    reference = [torch.randperm(6, generator=torch.Generator().manual_seed(100 + e)).tolist() for e in range(3)]
    assert got == [r[i : i + 3] for r in reference for i in (0, 3)]


def test_user_dict_batches_are_weighted_and_moved_as_dicts():
    # Hugging Face's BatchEncoding subclasses collections.UserDict, which optree keeps whole as a leaf.
    from collections import UserDict

    from fnlit.loop import evaluate

    class Encoding(UserDict):
        def __init__(self, data, note):
            super().__init__(data)
            self.note = note

        def to(self, device, *, non_blocking=False):  # as BatchEncoding's: moves itself in place
            self.data = {k: v.to(device, non_blocking=non_blocking) for k, v in self.data.items()}
            return self

    x = torch.arange(5.0)
    batches = [Encoding({"x": x[:4]}, "a"), Encoding({"x": x[4:]}, "b")]
    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    assert [batch_size_of(b) for b in batches] == [4, 1]
    assert evaluate(lambda s, b: {"m": b["x"].mean()}, state, batches)["m"] == pytest.approx(x.mean().item())  # over examples
    moved = device_mover(torch.device("meta"))((batches[0], 1))
    assert type(moved[0]) is Encoding and moved[0].note == "a" and moved[0]["x"].device.type == "meta" and moved[1] == 1
    assert batches[0]["x"].device.type == "cpu"  # the original is left alone


def test_plain_iteration_over_a_shuffled_array_loader_follows_set_epoch():
    # The documented contract (a hand-written loop calls set_epoch each epoch, as with DistributedSampler; fit and
    # evaluate rely on plain iteration not moving on by itself: validation sees one order, resumes stay bitwise).
    # Reference: the documented order, randperm seeded with seed * 1_000_003 + epoch.
    loader = ArrayLoader(torch.arange(10), batch_size=10)
    want = [torch.randperm(10, generator=torch.Generator().manual_seed(e)).tolist() for e in range(3)]
    assert [next(iter(loader)).tolist() for _ in range(2)] == [want[0]] * 2
    for epoch in range(3):
        loader.set_epoch(epoch)
        assert next(iter(loader)).tolist() == want[epoch]


def test_fit_tells_a_wrapper_around_an_array_loader_the_epoch_through_its_set_epoch():
    # A class wrapping an ArrayLoader (to augment or move batches) was iterated plainly: the same order every epoch.
    # Reference: the documented order of each epoch, randperm seeded with 0 * 1_000_003 + epoch.
    class Wrapped:
        def __init__(self, loader):
            self.loader = loader

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            return (b * 1 for b in self.loader)

        def set_epoch(self, epoch):
            self.loader.set_epoch(epoch)

    seen = []

    def step(state, batch):
        seen.append(batch.tolist())
        return state.replace(step=state.step + 1), {"loss": batch.float().mean()}

    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    fnlit.fit(step, state, Wrapped(ArrayLoader(torch.arange(6), batch_size=6)), max_epochs=2, progress=False)
    assert seen == [torch.randperm(6, generator=torch.Generator().manual_seed(e)).tolist() for e in range(2)]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 5])
@pytest.mark.parametrize("drop_last", [False, True])
def test_eval_batches_on_more_ranks_than_examples_count_each_example_once(monkeypatch, world, n, drop_last):
    # A 1-example validation set on 3 ranks: ranks past the last example run uncounted fillers (as many
    # batches as the others) instead of raising in arange(rank, n). Reference: DistributedSampler's
    # promise, every example once across the ranks, and every rank the same number of forwards.
    loader = ArrayLoader(torch.arange(float(n)), batch_size=2, drop_last=drop_last)
    counted, lengths = [], set()
    monkeypatch.setattr(fnlit.distributed, "world_size", lambda: world)
    for r in range(world):
        monkeypatch.setattr(fnlit.distributed, "rank", lambda r=r: r)
        out = list(loader.eval_batches())
        lengths.add(len(out))
        counted += [int(v) for b, counts in out if counts for v in b.tolist()]
    assert len(lengths) == 1 and lengths.pop() == loader.eval_len()
    # the examples one process evaluates in batches of 2 (drop_last: its partial last batch left out), by hand
    expected = list(range(n - n % 2 if drop_last else n))
    assert sorted(counted) == expected


@pytest.mark.parametrize("shuffle", [False, True])
def test_tensors_on_different_devices_are_each_indexed_on_their_own(shuffle):
    # ArrayLoader(x_on_gpu, y_on_cpu): the order lived on x's device and indexed y there too; index_select does not
    # check that, and y's batches held values read at other addresses ("meta" stands in for the accelerator, which
    # can be first or not). Reference: DataLoader(TensorDataset(x, y)), which takes each tensor's rows on its device.
    x, y = torch.zeros(7, 2, device="meta"), torch.arange(7) * 10
    for tensors in ((x, y), (y, x)):
        loader = ArrayLoader(*tensors, batch_size=3, shuffle=shuffle)
        cpu = 0 if tensors[0] is y else 1
        order = fnlit.distributed.shard_indices(7, rank=0, world_size=1, shuffle=shuffle, seed=5, epoch=1)
        expected = [[i * 10 for i in order[k : k + 3]] for k in range(0, 7, 3)]
        got = list(loader.batches(1, seed=5))
        assert [b[cpu].tolist() for b in got] == expected
        assert all(b[1 - cpu].device.type == "meta" and b[1 - cpu].shape[0] == b[cpu].shape[0] for b in got)
        reference = [b[cpu].tolist() for b in DataLoader(TensorDataset(*tensors), batch_size=3)]
        assert [b[cpu].tolist() for b, counts in loader.eval_batches()] == reference


class _BucketSampler(DistributedSampler):
    """A DistributedSampler subclass used as ``batch_sampler=`` (as bucketing samplers are): yields index lists."""

    def __init__(self, ds, batch_size):
        super().__init__(ds, num_replicas=2, rank=1, shuffle=True, seed=0)
        self.batch_size, self.epochs = batch_size, []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)
        super().set_epoch(epoch)

    def __iter__(self):
        idx = list(super().__iter__())
        return iter([idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)])


def test_a_distributed_batch_sampler_counts_as_sharding_and_is_told_the_epoch(monkeypatch):
    ds = TensorDataset(torch.arange(8.0))
    bs = _BucketSampler(ds, 2)
    data = DataLoader(ds, batch_sampler=bs)
    monkeypatch.setattr(fnlit.distributed, "world_size", lambda: 2)
    monkeypatch.setattr(fnlit.distributed, "rank", lambda: 1)  # (the sampler's rank)
    check_sharding(data, "train_data")  # passes: the batch sampler shards
    with pytest.raises(ValueError, match="without a DistributedSampler"):  # the refusal itself still stands
        check_sharding(DataLoader(ds, batch_size=2), "train_data")
    monkeypatch.undo()
    from fnlit.data import epoch_batches

    first = [b[0].tolist() for b in epoch_batches(data, 3, 0, 0, None, False)]
    assert bs.epochs == [3]
    bs.set_epoch(3)  # the reference: DistributedSampler's own order for epoch 3, rank 1 of 2
    assert first == [[float(i) for i in idx] for idx in bs]


class _Augmented(torch.utils.data.Dataset):
    """Example i plus a random draw: a random transform in the dataset, drawn from the worker's generator."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return (torch.tensor(float(i)) + torch.rand(()),)


def test_a_datasets_random_transforms_in_workers_resume_mid_epoch_as_the_uninterrupted_run(tmp_path):
    # The workers' seeds came from the global generator: a run resumed in epoch 1 transformed its examples
    # differently from the uninterrupted run (the docs promise a bitwise resume for a seeded DataLoader).
    from fnlit.checkpoint import Checkpointer

    loader = lambda: DataLoader(_Augmented(), batch_size=4, shuffle=True, num_workers=1)  # noqa: E731
    torch.manual_seed(0)
    reference = _fit_batches(loader())
    assert reference[:3] != reference[3:6]  # each epoch its own transforms
    torch.manual_seed(1)
    first = _fit_batches(loader(), checkpoint=Checkpointer(tmp_path), callbacks=[_Stop(4)])
    torch.manual_seed(2)  # a new process: the global generator elsewhere
    resumed = _fit_batches(loader(), checkpoint=Checkpointer(tmp_path), ckpt_path="last")
    assert first == reference[:4] and resumed == reference[4:]


def test_each_ranks_dataloader_workers_draw_their_own_random_transforms(monkeypatch):
    # The workers' seeds came from (seed, epoch) alone: worker k of every rank drew the same stream, so
    # different examples got the same crops at the same positions (Lightning mixes the rank into them).
    import fnlit.data as data_module

    def transforms(rank):
        monkeypatch.setattr(data_module._dist, "rank", lambda: rank)
        loader = DataLoader(_Augmented(), batch_size=4, num_workers=1)  # in order: the draws alone differ
        return [b[0] - torch.arange(i * 4, i * 4 + 4) for i, b in enumerate(epoch_batches(loader, 1, 0, 0, None, False))]

    rank0, rank1 = transforms(0), transforms(1)
    assert all(torch.equal(a, b) for a, b in zip(rank0, transforms(0)))  # a rank's own stream: reproducible
    assert not any(torch.equal(a, b) for a, b in zip(rank0, rank1))


@pytest.mark.parametrize("shuffle", [True, False])
def test_shard_indices_are_drawn_on_the_cpu_under_another_default_device(shuffle, request):
    # Under torch.set_default_device("cuda") ("meta" stands in) randperm with the CPU generator failed and arange
    # made the order on the default device. Reference: torch's own permutation of the same seed on the CPU.
    seed, epoch = 3, 1
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) & 0x7FFF_FFFF_FFFF_FFFF)
    order = (torch.randperm(10, generator=g) if shuffle else torch.arange(10)).tolist()
    request.getfixturevalue("meta_default_device")  # (after the reference, drawn on the CPU)
    got = fnlit.distributed.shard_indices(10, rank=1, world_size=2, shuffle=shuffle, seed=seed, epoch=epoch)
    assert got == order[1::2]


def _own(seed, workers=0):
    """A shuffling DataLoader with a generator of its own, seeded with ``seed``."""
    ds = TensorDataset(torch.arange(12))
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=3, shuffle=True, num_workers=workers, generator=g)


_OWN = r"order from its data-order seed .*set on it \(its RandomSampler's generator\) is not used.*fit\(seed=\.\.\.\)"
_OWN_WORKERS = r"\(its RandomSampler's generator, its generator \(the workers' seeds\)\) is not used"


@pytest.mark.parametrize("workers", [0, 1])
def test_fit_puts_a_dataloaders_own_generator_back_undrawn(workers):
    # fit left its per-epoch generators in the user's DataLoader (its sampler's, and the loader's with workers), and
    # without workers drew each epoch's base seed from the user's: a loop over the loader after fit drew another
    # order than before. Reference: a plain loop over a fresh loader with a generator of the same seed.
    loader, want = _own(7, workers), [b[0].tolist() for b in _own(7)]
    g = loader.generator
    with pytest.warns(UserWarning, match=_OWN_WORKERS if workers else _OWN):
        _fit_batches(loader)
    assert loader.sampler.generator is g and loader.generator is g
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(7).get_state())
    assert [b[0].tolist() for b in loader] == want


def test_fit_puts_a_dataloaders_own_generator_back_when_the_step_fails():
    loader = _own(7)
    g = loader.generator
    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    def step(state, batch):
        raise RuntimeError("a failing step")

    with pytest.raises(RuntimeError, match="a failing step"), pytest.warns(UserWarning, match=_OWN):
        fnlit.fit(step, state, loader, max_epochs=1, progress=False)
    assert loader.sampler.generator is g and torch.equal(g.get_state(), torch.Generator().manual_seed(7).get_state())


def test_fit_given_a_seed_does_not_warn_about_a_dataloaders_own_generator():
    loader = _own(7)
    assert _fit_batches(loader, seed=3) == _fit_batches(_own(8), seed=3)  # (warnings are errors) seed decides the order
    assert loader.sampler.generator is loader.generator


def test_a_resume_warns_about_a_dataloaders_own_generator_too(tmp_path):
    from fnlit.checkpoint import Checkpointer

    with pytest.warns(UserWarning, match=_OWN):
        _fit_batches(_own(7), checkpoint=Checkpointer(tmp_path), callbacks=[_Stop(4)])
    with pytest.warns(UserWarning, match=_OWN):  # the checkpoint's seed decides: the generator is still not used
        _fit_batches(_own(7), checkpoint=Checkpointer(tmp_path), ckpt_path="last")


def test_fit_puts_back_the_generator_of_a_sampler_inside_a_batch_sampler():
    from torch.utils.data import WeightedRandomSampler

    ds = TensorDataset(torch.arange(12))
    def make():
        g = torch.Generator().manual_seed(5)
        return BatchSampler(WeightedRandomSampler(torch.ones(12), 12, generator=g), 3, False)

    bs = make()
    g, loader = bs.sampler.generator, DataLoader(ds, batch_sampler=bs)
    with pytest.warns(UserWarning, match=r"set on it \(its WeightedRandomSampler's generator\) is not used"):
        _fit_batches(loader, overfit_batches=2)  # (overfit_batches keeps this sampler: drawn with replacement)
    assert bs.sampler.generator is g
    assert [b[0].tolist() for b in loader] == [b[0].tolist() for b in DataLoader(ds, batch_sampler=make())]
