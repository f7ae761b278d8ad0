"""fnlit.shard: sharded training on 4 and 2 gloo processes against a single process on the global batch."""

import pytest
import torch
from _shard_workers import (
    STEPS,
    compose,
    four_ranks,
    global_batch,
    make_state,
    scalar_param,
    two_ranks,
)
from helpers import assert_trees_close, hand_step, mlp
from torch.distributed.tensor import Replicate, Shard

import fnlit
from fnlit.sharded_checkpoint import read_sharded_meta, restore_sharded, save_sharded
from fnlit.transforms.shard import local_nbytes, placement_for, shard, shard_state

pytestmark = pytest.mark.distributed

TOL = {"rtol": 0, "atol": 1e-5}


def _reference(kind: str = "plain", steps: int = STEPS, state=None, optimizer: str = "adamw"):
    """A single process stepping on the whole global batch (with the same transforms, minus shard)."""
    model, fresh = make_state(fp16="fp16" in kind, optimizer=optimizer)
    state = fresh if state is None else state
    step = compose(hand_step(model), kind)
    losses = []
    for i in range(int(state.step), steps):
        state, metrics = step(state, global_batch(i))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 4-rank launch (which also saves a checkpoint at step 5), then one 2-rank launch resuming it."""
    ckpt = str(tmp_path_factory.mktemp("shard") / "ckpt")
    four = fnlit.distributed.launch(four_ranks, 4, ckpt, timeout=240)
    two = fnlit.distributed.launch(two_ranks, 2, ckpt, timeout=240)
    return {"ckpt": ckpt, 4: four, 2: two}


def _max_dev(params, ref_params):
    return max((params[k] - ref_params[k]).abs().max().item() for k in ref_params)


def test_sharded_sgd_with_momentum_matches_one_process(runs):
    # torch has no sharding rule for the fused SGD kernel: sharded params take the unfused update.
    ref, ref_losses = _reference(optimizer="sgd")
    for r in runs[2]:
        out = r["sgd"]
        assert out["step"] == STEPS
        for k in ref.params:
            torch.testing.assert_close(out["params"][k], ref.params[k], **TOL)
        torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(ref_losses), **TOL)


@pytest.mark.parametrize("world", [4, 2])
def test_sharded_run_matches_one_process_on_the_global_batch(runs, world):
    ref, ref_losses = _reference()
    for r in runs[world]:
        out = r["plain"]
        assert out["step"] == STEPS and out["rng"] == int(ref.rng)
        assert _max_dev(out["params"], ref.params) <= 1e-5
        for k in ref.params:
            torch.testing.assert_close(out["params"][k], ref.params[k], **TOL)
        torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(ref_losses), **TOL)
    for k in ref.params:  # every rank ends with the same full params
        assert all(torch.equal(r["plain"]["params"][k], runs[world][0]["plain"]["params"][k]) for r in runs[world])


def test_batchnorm_statistics_are_averaged_across_ranks(runs):
    r0, r1 = (r["batchnorm"] for r in runs[2])
    for name, want in r0["want_1"].items():
        torch.testing.assert_close(r0["after_1"][name], want, rtol=1e-5, atol=1e-6)
    for name, b in r0["after_3"].items():
        assert torch.equal(b, r1["after_3"][name]), name  # every rank keeps the same state


def test_shard_composes_with_accumulate(runs):
    ref, _ = _reference("accumulate")
    for r in runs[4]:
        assert r["accumulate"]["step"] == STEPS
        assert _max_dev(r["accumulate"]["params"], ref.params) <= 1e-5


@pytest.mark.parametrize(("world", "kind"), [(4, "amp_bf16"), (2, "accumulate_amp_fp16")])
def test_shard_composes_with_amp(runs, world, kind):
    # Under autocast a weight gradient is a half-precision sum over the examples of one rank, rounded
    # before the ranks' sums are averaged: any split of the batch (data_parallel included) moves the
    # result by half-precision rounding. So the exact reference is data_parallel on the same ranks, and
    # the single process agrees to the rounding of bfloat16/float16.
    ref, _ = _reference(kind)
    for r in runs[world]:
        out, dp = r[kind], r[f"{kind}_dp"]
        assert out["step"] == STEPS
        assert _max_dev(out["params"], dp["params"]) <= 1e-5
        assert _max_dev(out["params"], ref.params) <= 1e-3


@pytest.mark.parametrize("world", [4, 2])
def test_per_rank_bytes_are_one_nth_of_the_unsharded_state(runs, world):
    _, plain = make_state()
    total = {"params": local_nbytes(plain.params), "opt_state": local_nbytes(plain.opt_state)}
    total["grads"] = total["params"]
    for r in runs[world]:
        mem = r["memory"]
        assert mem["grad_types"] == ["DTensor"]  # gradients arrive reduce-scattered
        for part, unsharded in total.items():
            assert mem[part] <= unsharded * (1 / world) * 1.10, (part, mem[part], unsharded)
        assert sum(mem[p] for p in ("params", "opt_state", "grads")) <= sum(total.values()) / world * 1.10


def test_checkpoint_from_4_ranks_resumes_on_2_ranks(runs):
    ref, _ = _reference()
    assert read_sharded_meta(runs["ckpt"])["world_size"] == 4
    for r in runs[2]:
        out = r["resume"]
        assert out["restored_step"] == 5 and out["step"] == STEPS and out["rng"] == int(ref.rng)
        for k in ref.params:
            torch.testing.assert_close(out["params"][k], ref.params[k], **TOL)


def test_checkpoint_from_4_ranks_consolidates_in_one_process(runs):
    _, fresh = make_state()
    state = restore_sharded(runs["ckpt"], like=fresh)
    assert int(state.step) == 5 and read_sharded_meta(runs["ckpt"])["meta"] == {"epoch": 0, "batch": 5}
    assert isinstance(state.params["0.weight"], torch.Tensor) and state.params["0.weight"].shape == (37, 13)
    at5, _ = _reference(steps=5)
    assert_trees_close(state, at5, **TOL)
    resumed, _ = _reference(state=state)
    uninterrupted, _ = _reference()
    assert_trees_close(resumed, uninterrupted, **TOL)


def test_even_shards_and_a_replicated_0d_parameter_match_one_process(runs):
    ref = scalar_param(sharded=False)
    for r in runs[2]:
        assert _max_dev(r["scalar_param"], ref) <= 1e-5


def test_unsupported_combinations_raise(runs):
    for r in runs[2]:
        for name, message in r["errors"].items():
            assert "cannot be combined" in message, name


def test_shard_without_a_process_group_says_how_to_launch():
    model, state = make_state()
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node N"):
        shard(hand_step(model))(state, global_batch(0))
    with pytest.raises(RuntimeError, match="fnlit.distributed.launch"):
        shard_state(state)


def test_restore_sharded_names_the_mismatching_path(tmp_path):
    _, state = make_state()
    path = save_sharded(tmp_path / "ckpt", state)
    wider = fnlit.TrainState.create(mlp(13, 38, 5), state.tx, seed=0)
    with pytest.raises(ValueError, match=r"at params\['0.bias'\] the checkpoint .* holds shape \(37,\)"):
        restore_sharded(path, like=wider)
    with pytest.raises(ValueError, match=r"it lacks \[\"params\['bias'\]"):
        restore_sharded(path, like=fnlit.TrainState.create(torch.nn.Linear(13, 5), state.tx, seed=0))
    with pytest.raises(FileNotFoundError, match="not a checkpoint written by fnlit.save_sharded"):
        restore_sharded(tmp_path, like=state)


def test_save_sharded_replaces_atomically_and_leaves_no_temporaries(tmp_path):
    _, state = make_state()
    save_sharded(tmp_path / "ckpt", state, epoch=1)
    later = state.replace(step=state.step + 3)
    save_sharded(tmp_path / "ckpt", later, epoch=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert int(restore_sharded(tmp_path / "ckpt", like=state).step) == 3
    assert read_sharded_meta(tmp_path / "ckpt")["meta"] == {"epoch": 2}
    with pytest.raises(TypeError, match="JSON-serialisable metadata"):
        save_sharded(tmp_path / "other", state, when=object())


def test_placement_splits_the_most_even_dimension():
    assert placement_for((37, 13), 4) == Shard(0)
    assert placement_for((5, 37), 4) == Shard(1)
    assert placement_for((), 2) == Replicate()
