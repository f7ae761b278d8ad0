"""fnlit.shard: sharded training on 4 and 2 gloo processes against a single process on the global batch."""

import errno
import json
import os
import re
import resource
import shutil
import signal
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _shard_workers import (
    STEPS,
    a_rank_fails_in_save_sharded,
    compose,
    ensemble_of_sharded_states,
    export_sharded,
    four_ranks,
    global_batch,
    l2_step,
    local,
    make_state,
    no_host_sync_of_a_first_shard_step,
    scalar_param,
    sharded_checkpoints,
    trees_close_of_sharded_states,
    two_ranks,
    uneven_validation,
    val_batches,
)
from helpers import assert_limit_errors, assert_trees_close, assert_trees_equal, hand_step, mlp
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
    assert {k: v.shape for k, v in params.items()} == {k: v.shape for k, v in ref_params.items()}
    return max((params[k] - ref_params[k]).abs().max().item() for k in ref_params if ref_params[k].numel())


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
    model, _ = make_state()
    grads = fnlit.value_and_grad(lambda p: F.cross_entropy(fnlit.apply(model, p, plain.buffers, global_batch(0)[0], rng=plain.rng)[0],
                                                           global_batch(0)[1]))(plain.params)[1]  # fmt: skip
    norm = float(torch.sqrt(sum((g**2).sum() for g in grads.values())))  # one process on the global batch
    # A metric that differs per rank (the global norm over each rank's own loss) is averaged, as data_parallel's
    losses = [F.cross_entropy(fnlit.apply(model, plain.params, plain.buffers, x, rng=plain.rng)[0], y)
              for x, y in (local(global_batch(0), r, world) for r in range(world))]  # fmt: skip
    per_loss = sum(norm / float(loss) for loss in losses) / world
    for r in runs[world]:
        mem = r["memory"]
        assert mem["grad_types"] == ["DTensor"]  # gradients arrive reduce-scattered
        assert mem["grad_norm"] == pytest.approx(norm, rel=1e-5)  # a metric of the sharded grads, logged whole
        assert mem["norm_per_loss"] == pytest.approx(per_loss, rel=1e-5)
        assert "Per-example gradients (fnlit.value_and_grad under torch.func.vmap" in mem["per_example_refused"]
        assert "cannot run under fnlit.shard" in mem["per_example_refused"]
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


def test_even_shards_a_replicated_0d_parameter_and_an_empty_weight_match_one_process(runs):
    ref = scalar_param(sharded=False)
    for r in runs[2]:
        assert _max_dev(r["scalar_param"], ref) <= 1e-5


def test_unsupported_combinations_raise(runs):
    for r in runs[2]:
        assert set(r["errors"]) == {"shard(data_parallel)", "data_parallel(shard)", "shard(gradient penalty)"}
        for name, message in r["errors"].items():
            assert "cannot be combined" in message, name
        assert "fnlit.data_parallel" in r["errors"]["shard(gradient penalty)"]  # (was DTensor's internal error)


def test_ensemble_and_stack_states_refuse_sharded_states_clearly():
    # stack_states accepted sharded states, and fnlit.ensemble then failed inside torch ("aten.bmm.default got mixed
    # torch.Tensor and DTensor"); a sharded state beside a plain one failed inside torch too, where the docstring
    # promised a ValueError naming the first path where two states differ.
    for out in fnlit.distributed.launch(ensemble_of_sharded_states, 2, timeout=120):
        refusal = r"fnlit.ensemble cannot be combined with fnlit.shard, in either nesting"
        assert re.search(r"stack_states got sharded states \(fnlit.shard_state\): " + refusal, out["stack sharded"])
        assert re.search(refusal, out["ensemble of sharded"]), out["ensemble of sharded"]
        for name, kinds in (("stack sharded, plain", "a sharded tensor \\(DTensor\\) vs a plain tensor"),
                            ("stack plain, sharded", "a plain tensor vs a sharded tensor \\(DTensor\\)")):
            assert re.search(r"stack_states: states\[1\] differs from states\[0\] at params\['0.bias'\]: " + kinds,
                             out[name]), out[name]


def test_shard_without_a_process_group_says_how_to_launch():
    model, state = make_state()
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node N"):
        shard(hand_step(model))(state, global_batch(0))
    with pytest.raises(RuntimeError, match="fnlit.distributed.launch"):
        shard_state(state)


def test_shard_state_and_shard_refuse_a_state_or_mesh_of_the_wrong_type():
    # shard_state(state.params), a tuple of states or mesh="cpu" failed with AttributeErrors from inside ("'dict'
    # object has no attribute 'params'", "'str' object has no attribute 'ndim'"); fnlit.shard took mesh="cpu" and
    # failed the same way at its first call. Checked before the process group, so no launch is needed.
    model, state = make_state()
    with pytest.raises(TypeError, match="fnlit.shard_state takes a single fnlit.TrainState .* got a dict instead"):
        shard_state(state.params)
    with pytest.raises(TypeError, match="got a tuple of TrainState, TrainState instead"):
        shard_state((state, state))
    with pytest.raises(TypeError, match="fnlit.shard_state expected mesh to be a 1-d .*DeviceMesh or None, got str 'cpu'"):
        shard_state(state, mesh="cpu")
    with pytest.raises(TypeError, match="fnlit.shard expected mesh to be a 1-d .*DeviceMesh or None, got str 'cpu'"):
        shard(hand_step(model), mesh="cpu")


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


def test_save_sharded_never_replaces_a_folder_that_is_not_a_sharded_checkpoint(tmp_path):
    _, state = make_state()
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="a folder holding other files: nothing was written"):
        save_sharded(run, state)
    (tmp_path / "file").write_text("keep me too")
    with pytest.raises(FileExistsError, match="is a file"):
        save_sharded(tmp_path / "file", state)
    assert (run / "notes.txt").read_text() == "keep me" and (run / "logs").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "run"]  # no temporaries either
    (tmp_path / "empty").mkdir()
    assert int(restore_sharded(save_sharded(tmp_path / "empty", state), like=state).step) == 0  # an empty folder is fine


def test_placement_splits_the_most_even_dimension():
    assert placement_for((37, 13), 4) == Shard(0)
    assert placement_for((5, 37), 4) == Shard(1)
    assert placement_for((), 2) == Replicate()
    assert placement_for((3, 0), 2) == Replicate()  # no elements: nothing to split


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """One 2-rank launch: fit(shard(step)) with a Checkpointer, and a damaged sharded checkpoint."""
    d = str(tmp_path_factory.mktemp("sharded_ckpt"))
    return fnlit.distributed.launch(sharded_checkpoints, 2, d, timeout=240, collective_timeout=60)


def test_checkpointer_saves_and_restores_a_sharded_run(checkpointed):
    # The reference is the run's own state gathered by unshard_state, not anything the checkpoint wrote.
    for r in checkpointed:
        out = r["fit"]
        assert_trees_equal(out["restored"], out["expected"])  # the final save, restored into a sharded state
        assert_trees_equal(out["direct"], out["expected"])  # fnlit.save / fnlit.restore of a sharded state
        assert all(kind != "DTensor" or same for kind, same in out["placed"]) and ("DTensor", True) in out["placed"]
        # periodic saves (steps 2, 4), best-by-validation saves (a collective decision) and the final one
        assert {"last.ckpt", "step=00000004.ckpt", "step=00000005.ckpt", out["best"]} <= set(out["files"])
        assert int(out["expected"]["step"]) == 5 and out["position"]["batch"] in (0, 1)


def test_an_ema_over_a_sharded_run_resumes_bitwise(checkpointed):
    for r in checkpointed:
        whole, resumed = r["ema"]
        assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_sharded_checkpoints_record_each_ranks_file_and_catch_a_flipped_bit_on_every_rank(checkpointed):
    files = checkpointed[0]["damaged"]["files"]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(files)
    for r in checkpointed:
        out = r["damaged"]
        assert out["error"] is not None and "__1_0.distcp does not match its CRC-32" in out["error"]
        assert_trees_equal(out["restored"], out["expected"])


def test_a_crafted_metadata_pickle_is_refused_and_does_not_run(tmp_path):
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    _, state = make_state()
    path = save_sharded(tmp_path / "ckpt", state)
    (path / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(fnlit.CheckpointError, match=r"\.metadata has \d+ bytes, but \d+ were written"):
        restore_sharded(path, like=state)
    # also when the attacker records the file's new checksum in fnlit.json: the unpickler refuses the global
    info = read_sharded_meta(path)
    data = (path / ".metadata").read_bytes()
    info["files"][".metadata"] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    (path / "fnlit.json").write_text(json.dumps(info))
    with pytest.raises(fnlit.checkpoint.UnsafeCheckpointError, match=r"refusing to load .*\.metadata: it asks to build global (posix|os)\.system"):
        restore_sharded(path, like=state)
    assert not marker.exists()
    good = save_sharded(tmp_path / "good", state)  # a normal checkpoint still restores, bitwise
    assert_trees_equal(restore_sharded(good, like=state).params, state.params)


def test_a_failed_sharded_save_raises_a_checkpoint_error_and_leaves_only_the_previous_checkpoint(tmp_path, monkeypatch):
    _, state = make_state()
    state = state.replace(buffers={**state.buffers, "pad": torch.arange(100_000.0)})  # big enough to be cut short
    path = save_sharded(tmp_path / "ckpt", state)
    newer = state.replace(step=state.step + 1)
    # the shards cut short (a file-size limit: torch's zip writer sees a short write, "unexpected pos")
    handler, limits = signal.signal(signal.SIGXFSZ, signal.SIG_IGN), resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limits[1]))
    try:
        with pytest.raises(fnlit.CheckpointError, match=r"could not write the sharded checkpoint .*ckpt: rank 0: .*"
                           r"a shard file was cut short: is the disk full.*Any previous checkpoint there is unchanged"):
            save_sharded(path, newer)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no partial .ckpt.tmp left
    assert_trees_equal(restore_sharded(path, like=state), state)
    # rank 0 cannot write fnlit.json (its fsync fails: a full disk)
    real = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("fnlit.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(fnlit.CheckpointError, match=r"could not write the sharded checkpoint .*ckpt: No space left on "
                       r"device \(ENOSPC\)\. Any previous checkpoint there is unchanged"):
        save_sharded(path, newer)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert_trees_equal(restore_sharded(path, like=state), state)
    # no permission to make the folder: a CheckpointError too, before anything is written
    monkeypatch.setattr(Path, "mkdir", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EACCES, "Permission denied")))
    with pytest.raises(fnlit.CheckpointError, match=r"could not write the sharded checkpoint .*new/ckpt: Permission denied \(EACCES\)"):
        save_sharded(tmp_path / "new" / "ckpt", state)


def test_a_sharded_save_failing_between_its_two_renames_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    import fnlit.sharded_checkpoint as sc

    _, state = make_state()
    path = save_sharded(tmp_path / "ckpt", state, v=1)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:  # the old checkpoint moved aside, the new one refused
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(sc.os, "replace", replace)
    with pytest.raises(fnlit.CheckpointError, match=r"ckpt: Input/output error \(EIO\)\. Any previous checkpoint there is unchanged"):
        save_sharded(path, state.replace(step=state.step + 1), v=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert read_sharded_meta(path)["meta"] == {"v": 1}
    assert_trees_equal(restore_sharded(path, like=state), state)


@pytest.mark.parametrize(("where", "cause"), [("json", r"No space left on device \(ENOSPC\)"),
                                             ("metadata", r"Input/output error \(EIO\)"),
                                             ("shard", r"rank 1: Input/output error \(EIO\)")])
def test_every_rank_raises_when_a_rank_fails_in_save_sharded(tmp_path, where, cause):
    # Rank 0 writes fnlit.json, and checksums .metadata after the ranks' exchange. Without sending its failure to
    # every rank, rank 1 waited at the barrier until the collective timeout (json), or got a closed connection while
    # rank 0 raised a bare OSError (metadata); the temporary copy stayed. Each rank checksums its own shards before
    # that exchange: rank 1 failing there raised a bare OSError and left rank 0 waiting in it (shard).
    for raised, restored, saved, files in fnlit.distributed.launch(
        a_rank_fails_in_save_sharded, 2, str(tmp_path), where, timeout=120, collective_timeout=30
    ):
        assert re.fullmatch(rf"could not write the sharded checkpoint .*ckpt: {cause}\. "
                            r"Any previous checkpoint there is unchanged\.", raised)
        assert_trees_equal(restored, saved)  # the previous checkpoint, bitwise
        assert files == ["ckpt"]


@pytest.mark.parametrize(("damage", "match"), [
    (lambda d: (d / "__0_0.distcp").unlink(), r"ckpt-missing: .*__0_0\.distcp is missing"),
    (lambda d: os.truncate(d / "__0_0.distcp", 100), r"__0_0\.distcp has 100 bytes, but \d+ were written \(truncated"),
    (lambda d: (d / ".metadata").unlink(), r"\.metadata is missing"),
    (lambda d: os.truncate(d / "fnlit.json", 5), r"fnlit\.json is truncated or corrupt"),
], ids=["missing shard", "truncated shard", "missing .metadata", "truncated fnlit.json"])
def test_a_damaged_sharded_checkpoint_raises_a_checkpoint_error_naming_it(tmp_path, damage, match):
    _, state = make_state()
    save_sharded(tmp_path / "ckpt", state)
    copy = tmp_path / "ckpt-missing"
    shutil.copytree(tmp_path / "ckpt", copy)
    damage(copy)
    with pytest.raises(fnlit.CheckpointError, match=match) as e:  # an Exception, not DCP's BaseException
        restore_sharded(copy, like=state)
    assert str(copy) in str(e.value)


def test_damaged_dcp_files_without_checksums_still_raise_a_checkpoint_error(tmp_path):
    # a checkpoint whose fnlit.json lists no files (as earlier versions wrote): DCP's own errors, wrapped
    _, state = make_state()
    path = save_sharded(tmp_path / "ckpt", state)
    info = read_sharded_meta(path)
    del info["files"]
    (path / "fnlit.json").write_text(json.dumps(info))
    assert_trees_equal(restore_sharded(path, like=state).params, state.params)
    (path / "__0_0.distcp").unlink()
    with pytest.raises(fnlit.CheckpointError, match=r"cannot restore the sharded checkpoint .*ckpt: rank 0: "):
        restore_sharded(path, like=state)
    (path / ".metadata").unlink()
    with pytest.raises(fnlit.CheckpointError, match=r"ckpt: it has no \.metadata"):
        restore_sharded(path, like=state)


def test_a_flipped_bit_in_a_sharded_checkpoint_is_an_error(tmp_path):
    _, state = make_state()
    path = save_sharded(tmp_path / "ckpt", state)
    data = bytearray((path / "__0_0.distcp").read_bytes())
    at = bytes(data).find(state.params["0.weight"].numpy().tobytes())  # the weight's bytes in the shard file
    assert at >= 0
    data[at + 4 * 5 + 3] ^= 0x40  # an exponent bit of element 5
    (path / "__0_0.distcp").write_bytes(bytes(data))
    with pytest.raises(fnlit.CheckpointError, match=r"__0_0\.distcp does not match its CRC-32"):
        restore_sharded(path, like=state)


def test_a_flipped_bit_in_fnlit_json_is_an_error_and_one_without_a_checksum_still_restores(tmp_path):
    # fnlit.json had no checksum: a flipped bit changed a saved number (a rate assigned as one) or the metadata
    # silently, or, in a dtype, was blamed on `like`.
    state = fnlit.TrainState.create(torch.nn.Linear(4, 2), fnlit.optim.adam(1e-3), seed=0)
    state.opt_state.hyperparams["learning_rate"] = 0.001
    path = save_sharded(tmp_path / "ckpt", state, epoch=1)
    text = (path / "fnlit.json").read_bytes()
    assert text.rstrip().endswith(b"}") and text.count(b'\n "crc32": ') == 1  # its own checksum, at the top level
    for old, new in [(b"0.001", b"0.003"), (b'"epoch": 1', b'"epoch": 3'), (b'"float32"', b'"bloat32"'),
                     (b'\n "crc32": ', b'\n "crc33": ')]:  # one bit each: 0x31/0x33, 0x66/0x62, 0x32/0x33
        assert sum(bin(a ^ b).count("1") for a, b in zip(old, new)) == 1
        (path / "fnlit.json").write_bytes(text.replace(old, new, 1))
        with pytest.raises(fnlit.CheckpointError, match=r"ckpt/fnlit\.json is truncated or corrupt \(its checksum "
                           r"does not match|ckpt/fnlit\.json is truncated or corrupt \(it has no checksum"):
            restore_sharded(path, like=state)
        with pytest.raises(fnlit.CheckpointError, match=r"fnlit\.json is truncated or corrupt"):
            read_sharded_meta(path)
    info = json.loads(text)  # as earlier versions wrote it, without its checksum: read as before
    del info["crc32"]
    (path / "fnlit.json").write_text(json.dumps(info, indent=1))
    assert read_sharded_meta(path)["meta"] == {"epoch": 1}
    assert restore_sharded(path, like=state).opt_state.hyperparams["learning_rate"] == 0.001


def test_a_save_cut_off_between_its_two_renames_leaves_a_checkpoint_that_restores(tmp_path, monkeypatch):
    import fnlit.sharded_checkpoint as sc

    _, state = make_state()
    save_sharded(tmp_path / "ckpt", state, v=1)
    real, calls = os.replace, []

    class Crash(BaseException):  # the process dies there (an OSError is an error save_sharded cleans up after)
        pass

    def replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:  # the old checkpoint moved aside, the new one not yet in place
            raise Crash("simulated crash")
        real(src, dst)

    monkeypatch.setattr(sc.os, "replace", replace)
    with pytest.raises(Crash, match="simulated crash"):
        save_sharded(tmp_path / "ckpt", state.replace(step=state.step + 1), v=2)
    monkeypatch.setattr(sc.os, "replace", real)
    assert not (tmp_path / "ckpt").exists()
    with pytest.warns(UserWarning, match=r"ckpt is missing: a save_sharded was interrupted"):
        assert int(restore_sharded(tmp_path / "ckpt", like=state).step) == 1  # the new, complete copy
    with pytest.warns(UserWarning, match="interrupted"):
        assert read_sharded_meta(tmp_path / "ckpt")["meta"] == {"v": 2}
    # The next save puts that copy back before anything is removed: a save failing midway leaves it.
    monkeypatch.setattr(sc.dcp, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        save_sharded(tmp_path / "ckpt", state.replace(step=state.step + 2), v=3)
    monkeypatch.undo()
    assert read_sharded_meta(tmp_path / "ckpt")["meta"] == {"v": 2}
    save_sharded(tmp_path / "ckpt", state.replace(step=state.step + 3), v=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert int(restore_sharded(tmp_path / "ckpt", like=state).step) == 3


def test_a_loss_reading_the_sharded_params_gets_a_clear_error_and_full_tensor_matches_one_process(runs):
    # An L2 penalty on params read in the loss failed inside DTensor ("aten.mse_loss_backward.default got mixed
    # torch.Tensor and DTensor"). Reference for the fix the message gives: one process on the global batch.
    model, state = make_state()
    step = l2_step(model, full=False)
    for i in range(2):
        state, _ = step(state, global_batch(i))
    paths, leaves, _ = fnlit.tree.tree_flatten_with_path(state)
    ref = {p: t for p, t in zip(paths, leaves) if isinstance(t, torch.Tensor) and "params" in p}
    for r in runs[2]:
        assert r["l2"]["error"].startswith("Under fnlit.shard the loss came back as a DTensor")
        assert "p.full_tensor()" in r["l2"]["error"]
        for p, t in ref.items():
            torch.testing.assert_close(r["l2"]["params"][p], t, **TOL)


def test_validation_with_different_numbers_of_batches_per_rank_averages_them_all_under_shard():
    # Each sharded forward all-gathers the params: rank 0's third batch waited for rank 1, which had gone on to
    # the metric all-reduce (a hang until the collective timeout). Reference: one process over both ranks' batches.
    torch.manual_seed(0)  # the workers' init
    model = mlp(13, 37, 5)

    def mean_ce(k):  # over the first k batches of each rank, every example once
        x, y = (torch.cat(t) for t in zip(*(b for r in (0, 1) for b in val_batches(r)[:k])))
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))

    every, two, one = mean_ce(3), mean_ce(2), mean_ce(1)
    results = fnlit.distributed.launch(uneven_validation, 2, timeout=180, collective_timeout=15)
    for rank, r in enumerate(results):
        assert r["fit"] == pytest.approx([every] * 2, rel=1e-5)  # after each of 2 steps (the sanity check's unreported)
        for name in ("evaluate", "no len()", "no len() on rank 1"):
            assert r[name] == pytest.approx(every, rel=1e-5), name
        assert r["limit 2"] == pytest.approx(two, rel=1e-5) and r["no len(), limit 2"] == pytest.approx(two, rel=1e-5)
        assert r["limit 0.5"] == pytest.approx(one, rel=1e-5)
        none = r["evaluate, rank 1 none"]
        assert "(from 0 to 3 batches, this rank" in none and "DistributedSampler" in none
        assert "one rank with none" in r["evaluate, rank 1 none, no len()"]
        # rank 1's val_data has no batches: it says so, rank 0 names it (the mixed case: no rank validates alone)
        assert r["fit, rank 1 none"].startswith(("fit: rank 1", "fit")[rank] + " got val_data with no batches")
        assert_limit_errors(r, rank)


def test_the_first_call_of_a_shard_step_passes_assert_no_host_sync_and_a_read_in_the_step_is_still_flagged():
    # The first call builds the default mesh, whose CPU mesh tensor torch reads (.tolist(), nonzero): the check
    # flagged fnlit.shard's own set-up as the step's host sync, at default_mesh. The step's own reads stay flagged.
    for r in fnlit.distributed.launch(no_host_sync_of_a_first_shard_step, 2, timeout=120, collective_timeout=30):
        assert r["first call"] is None
        assert r["a read of the loss"].startswith("HostSyncError: host sync inside the step: Tensor.item() at ")
        assert "_shard_workers.py" in r["a read of the loss"]


def test_assert_trees_close_compares_sharded_states_whole():
    # It crashed inside torch on a sharded state ("Sharding propagation failed for aten.allclose.default", or "got
    # mixed torch.Tensor and DTensor" against a plain state). Reference: one process stepping on the global batch.
    for r in fnlit.distributed.launch(trees_close_of_sharded_states, 2, timeout=120, collective_timeout=30):
        assert r["vs one process"] is None
        assert r["a changed bias"].startswith("AssertionError: state.params['3.bias'] differs: max abs difference 1 ")


def test_export_of_a_sharded_state_gathers_it_on_every_rank():
    # export copied the DTensors into the module's plain tensors: "aten.copy_.default: got mixed torch.Tensor and
    # DTensor", while save of the same state gathered them. Reference: one process stepping on the global batch.
    reference, _ = _reference(steps=2)
    results = fnlit.distributed.launch(export_sharded, 2, timeout=180, collective_timeout=30)
    for r in results:
        assert_trees_equal(r["exported"], r["unsharded"])
        assert_trees_close(r["exported"], dict(reference.params), **TOL)


def test_a_sparse_gradient_is_refused_naming_its_parameter_as_data_parallel_refuses_it():
    # nn.Embedding(sparse=True) under shard crashed in the gather's backward: "reshape is not implemented for sparse
    # tensors". It is refused, as fnlit.data_parallel refuses it, naming the parameter and the way out.
    from _shard_workers import sparse_embedding

    for kind, message in fnlit.distributed.launch(sparse_embedding, 2, timeout=120, collective_timeout=30):
        assert kind == "ValueError", message
        assert re.search(r"fnlit\.shard does not support sparse gradients .*sparse_coo gradient for emb\.weight.*"
                         r"nn\.Embedding\(\.\.\., sparse=False\)", message), message


def test_frozen_params_and_buffers_are_rank_0s_on_every_rank_as_ddp_broadcasts_them():
    # Ranks seeded apart (torch.manual_seed(rank)) with a frozen layer: shard distributed rank 0's params but each
    # rank kept its own frozen weight (a plain leaf of the state), so every rank trained through a different one and
    # the run matched no single process. They are rank 0's now, as DDP broadcasts its parameters and buffers.
    from _shard_workers import D_IN, D_OUT, HIDDEN, frozen_per_rank_seed

    results = fnlit.distributed.launch(frozen_per_rank_seed, 2, timeout=120, collective_timeout=30)
    torch.manual_seed(0)  # rank 0's model, trained by torch on the global batch
    model = mlp(D_IN, HIDDEN, D_OUT)
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for i in range(3):
        x, y = global_batch(i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    want = {n: p.detach() for n, p in model.named_parameters()}
    for r in results:
        got = {**r["params"], **r["buffers"]}
        assert got.keys() == want.keys()
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-5, msg=n)
