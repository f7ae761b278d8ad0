import subprocess
import sys

import pytest
import torch

import fnlit
from fnlit import random as R


def test_keys_are_pure_functions_of_the_seed():
    assert torch.equal(R.key(7), R.key(7)) and not torch.equal(R.key(7), R.key(8))
    assert R.key(7).dtype == torch.int64 and R.key(7).dim() == 0


def test_a_numpy_integer_seed_is_the_int_it_holds():
    import numpy as np

    seeds = np.arange(3)  # ensemble_states(seeds=np.arange(n)), TrainState.create(seed=np.int64(...))
    assert all(torch.equal(R.key(s), R.key(int(s))) for s in seeds)
    with pytest.raises(TypeError, match="expected an int seed, got bool"):
        R.key(np.bool_(True))


def test_split_fold_in_next_are_distinct_and_consistent():
    k = R.key(0)
    keys = R.split(k, 8)
    assert len(set(keys.tolist()) | {int(k), int(R.next_key(k))}) == 10
    for i in range(8):
        assert torch.equal(R.fold_in(k, i), keys[i])


def test_batched_keys_take_the_tensor_path_with_the_same_values():
    ks = torch.stack([R.key(0), R.key(5)])
    assert torch.equal(R.next_key(ks), torch.stack([R.next_key(R.key(0)), R.next_key(R.key(5))]))
    assert torch.equal(R.split(ks, 3).T, torch.stack([R.split(R.key(0), 3), R.split(R.key(5), 3)]))
    assert torch.equal(R.fold_in(ks, 4), torch.stack([R.fold_in(R.key(0), 4), R.fold_in(R.key(5), 4)]))


def test_seeded_restores_the_global_generator():
    before = torch.get_rng_state()
    with R.seeded(R.key(3)):
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    with R.seeded(R.key(3)):
        assert torch.equal(torch.rand(3), a)


def test_entering_one_seeded_object_again_is_refused_and_the_outer_block_still_restores():
    import threading

    before = torch.get_rng_state()
    block = R.seeded(R.key(3))
    with block:
        a = torch.rand(3)
        with pytest.raises(RuntimeError, match=r"already entered; make a new seeded\(k\)"):
            with block:
                pass
        b = torch.rand(3)  # the outer block's stream goes on, unseeded by the refused entry
    assert torch.equal(torch.get_rng_state(), before)  # restored on the outer exit
    with R.seeded(R.key(3)):
        assert torch.equal(torch.rand(6), torch.cat([a, b]))
    drawn = []  # the lock is free: another thread's seeded block runs (it would wait forever on a held lock)

    def draw():
        with R.seeded(R.key(3)):
            drawn.append(torch.rand(3))

    thread = threading.Thread(target=draw, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive() and len(drawn) == 1

def test_split_refuses_a_num_that_is_not_an_integer_and_takes_integer_ones():
    import numpy as np

    k = R.key(0)
    with pytest.raises(TypeError, match=r"fnlit.random.split expected an int as num .*got bool True"):
        R.split(k, True)
    with pytest.raises(TypeError, match=r"fnlit.random.split expected an int as num .*got float 2.0"):
        R.split(k, 2.0)
    with pytest.raises(TypeError, match=r"split expected an int as num .*got a tensor of dtype torch.float32"):
        R.split(k, torch.tensor(2.0))
    three = [R.fold_in(k, i) for i in range(3)]  # split(k, n)[i] is fold_in(k, i) (the module's contract)
    for num in (3, np.int64(3), torch.tensor(3)):
        got = R.split(k, num)
        assert got.shape == (3,) and all(torch.equal(got[i], three[i]) for i in range(3)), num

def test_bad_seed_and_batched_key_errors():
    with pytest.raises(TypeError, match="expected an int seed, got float"):
        R.key(1.5)
    with pytest.raises(ValueError, match="single key"):
        with R.seeded(R.split(R.key(0), 2)):
            pass


def test_fold_in_accepts_any_integer_as_the_same_int():
    """fold_in(state.rng, state.step) overflowed from step 256 on (numpy and tensor integers were multiplied
    as fixed-width ints); every integer type must give the key the Python int gives, on both paths."""
    np = pytest.importorskip("numpy")
    k, ks = R.key(0), torch.stack([R.key(0), R.key(5)])
    for d in (0, 255, 256, 300, 12345, 2**40):
        expected = R.fold_in(k, d)
        for v in (np.int64(d), np.uint64(d), torch.tensor(d), torch.tensor(d).to(torch.int32) if d < 2**31 else d):
            assert torch.equal(R.fold_in(k, v), expected), (type(v), d)
            assert torch.equal(R.fold_in(ks, v)[0], expected), (type(v), d)
    assert torch.equal(R.fold_in(k, torch.tensor(300)), R.split(k, 301)[300])
    assert torch.equal(R.fold_in(ks, 2**64 - 1)[0], R.fold_in(k, 2**64 - 1))  # wraps alike on both paths


def test_fold_in_refuses_data_that_is_not_an_integer():
    k = R.key(0)
    for bad in (1.5, True, torch.tensor(2.0), torch.tensor(True), "1"):
        with pytest.raises(TypeError, match="fold_in expected an integer as data"):
            R.fold_in(k, bad)
        with pytest.raises(TypeError, match="fold_in expected an integer as data"):
            R.fold_in(k.reshape(1), bad)


def test_non_keys_are_refused_on_the_eager_and_batched_paths():
    """A float, bool or int32 tensor was taken for a key: split(tensor(1.5)) equalled split(tensor(1)), an int32
    key folded differently eagerly than batched, a batched float key failed inside bitwise_xor."""
    for bad in (torch.tensor(1.5), torch.tensor(True), torch.tensor(12345, dtype=torch.int32), 7):
        for name, fn in (("split", R.split), ("fold_in", lambda k: R.fold_in(k, 1)), ("next_key", R.next_key)):
            with pytest.raises(TypeError, match=f"fnlit.random.{name} expected a key \\(an int64 tensor\\)"):
                fn(bad)
            if isinstance(bad, torch.Tensor):
                with pytest.raises(TypeError, match=f"fnlit.random.{name} expected a key"):
                    fn(bad.reshape(1))
        with pytest.raises(TypeError, match="fnlit.random.seeded expected a key"):
            with R.seeded(bad):
                pass
    with pytest.raises(ValueError, match="split expected num >= 1, got -1"):
        R.split(R.key(0), -1)
    with pytest.raises(ValueError, match="split expected num >= 1, got 0"):
        R.split(R.key(0).reshape(1), 0)
    assert torch.equal(R.split(R.key(0), 1), R.fold_in(R.key(0), 0).reshape(1))


def test_state_key_comes_from_seed():
    model = torch.nn.Linear(2, 2)
    a = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=1)
    b = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=1)
    assert torch.equal(a.rng, b.rng) and torch.equal(a.rng, R.key(1))


def test_threads_sharing_a_module_get_their_own_masks_and_params():
    """Two threads train the same dropout model (one nn.Module) from two seeds at once; each must end
    exactly where the same run alone ends. The generators are global and fnlit.apply swaps the state's
    tensors into the shared module for a call, so without the lock the threads reseed each other's
    generator and read each other's params."""
    import sys
    import threading

    from helpers import batch, hand_step, mlp

    model = mlp(dropout=0.5)
    step = fnlit.accumulate(hand_step(model), 2)
    data = [batch(16, seed=i) for i in range(30)]

    def run(seed):
        state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=seed)
        for b in data:
            state, _ = step(state, b)
        return state.params

    alone = {seed: run(seed) for seed in (0, 1)}
    threaded = {}
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=lambda s=s: threaded.__setitem__(s, run(s))) for s in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        sys.setswitchinterval(interval)
    for seed in (0, 1):
        for name, p in alone[seed].items():
            assert torch.equal(threaded[seed][name], p), (seed, name)


def test_keys_are_cpu_tensors_under_another_default_device(meta_default_device):
    # Keys were made on the default device: under set_default_device("cuda") int(key) synced the GPU every step
    # (the no-host-sync check exempts CPU keys only); under "meta" a key had no value at all.
    k = R.key(3)
    keys = [k, R.split(k, 3), R.fold_in(k, 2), R.next_key(k), R.split(k, 2)[1]]
    for x in keys:
        assert x.device == torch.device("cpu") and x.dtype == torch.int64
    with torch.device("cpu"):  # the same keys made with the CPU as the default device
        assert torch.equal(R.split(R.key(3), 3), keys[1]) and torch.equal(R.fold_in(R.key(3), 2), keys[2])


def test_seeded_on_a_cuda_device_before_cuda_is_initialised():
    # torch.cuda.default_generators is () until CUDA's lazy init: seeded(k, cuda:0) raised "tuple index out of
    # range" where torch.cuda.get_rng_state(0) (which inits first) works, or says that there is no CUDA.
    if torch.cuda.is_available():  # in a fresh process: the suite's other CUDA tests have initialised CUDA in this one
        code = (
            "import torch, fnlit.random as R\n"
            "assert not torch.cuda.is_initialized()\n"
            "cpu = torch.get_rng_state()\n"
            "with R.seeded(R.key(0), torch.device('cuda', 0)):\n    a = torch.rand(3, device='cuda')\n"
            "with R.seeded(R.key(0), torch.device('cuda', 0)):\n    assert torch.equal(torch.rand(3, device='cuda'), a)\n"
            "assert torch.equal(torch.get_rng_state(), cpu)\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
        return
    cpu = torch.get_rng_state()
    with pytest.raises((RuntimeError, AssertionError), match="CUDA|NVIDIA"):
        with R.seeded(R.key(0), torch.device("cuda", 0)):
            pass
    assert torch.equal(torch.get_rng_state(), cpu)
    with R.seeded(R.key(1)):  # the lock was released
        pass


# splitmix64 by hand (Steele, Lea & Flood's finaliser; fnlit's golden and salt constants), the reference for keys
# made where fnlit's Python-int path cannot run (under torch.compile).
_M64, _GOLDEN, _SALT = (1 << 64) - 1, 0x9E3779B97F4A7C15, 0x632BE59BD9B4E019


def _ref_mix(x):
    x &= _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _ref_key_tensor(x):
    x &= _M64
    return torch.tensor(x - (1 << 64) if x >= 1 << 63 else x, dtype=torch.int64)


def _ref_fold_in(k, d):
    return _ref_key_tensor(_ref_mix(int(k) ^ _ref_mix(d * _GOLDEN + _SALT)))


@pytest.mark.slow
def test_fold_in_under_torch_compile_keeps_all_64_bits_of_a_dynamic_int():
    """From the second int on torch.compile makes it dynamic, and fold_in kept its low 32 bits (fold_in(k, 2**32 + 5)
    was fold_in(k, 5)). (An int outside int64 is wrapped in Python, as eagerly: a dynamic one still fails in inductor.)"""
    torch._dynamo.reset()
    k = R.key(0)
    compiled = torch.compile(lambda k, i: R.fold_in(k, i))
    for i in (1, 2, 2**40 + 3, -(2**40), 2**32 + 5, 2**63 - 1, -(2**63)):
        expected = _ref_fold_in(k, i)
        assert torch.equal(R.fold_in(k, i), expected), i
        assert torch.equal(compiled(k, i), expected), i
    assert torch.equal(R.fold_in(k, 2**64 + 7), _ref_fold_in(k, 2**64 + 7))  # eagerly: wrapped modulo 2**64


def _ref_key(seed):
    return _ref_key_tensor(_ref_mix(seed + _GOLDEN))


@pytest.mark.slow
def test_key_under_torch_compile_takes_a_dynamic_seed():
    """key(seed) failed inside inductor once torch.compile took the seed as dynamic (its second value): the Python
    int math baked 2**64 into the graph ("too big to convert to int64_t")."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda seed: R.key(seed))
    for seed in (0, 1, 2**40, -5, 2**63 - 1, -(2**63)):
        expected = _ref_key(seed)
        assert torch.equal(R.key(seed), expected), seed
        assert torch.equal(compiled(seed), expected), seed
    assert torch.equal(R.key(2**64 + 3), _ref_key(2**64 + 3))  # eagerly: wrapped modulo 2**64
