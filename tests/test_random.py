import pytest
import torch

import fnlit
from fnlit import random as R


def test_keys_are_pure_functions_of_the_seed():
    assert torch.equal(R.key(7), R.key(7)) and not torch.equal(R.key(7), R.key(8))
    assert R.key(7).dtype == torch.int64 and R.key(7).dim() == 0


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


def test_bad_seed_and_batched_key_errors():
    with pytest.raises(TypeError, match="expected an int seed, got float"):
        R.key(1.5)
    with pytest.raises(ValueError, match="single key"):
        with R.seeded(R.split(R.key(0), 2)):
            pass


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
