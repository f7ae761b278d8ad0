import errno
import math
import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from _resume_worker import assert_same_tensors
from helpers import assert_trees_equal, batch, hand_step, mlp
import torch.nn.functional as F
from torch import nn

import fnlit
from fnlit import checkpoint as ckpt
from fnlit.sharded_checkpoint import restore_sharded, save_sharded


def trained(model=None, steps=2, loss_scale=None):
    model = model or mlp(dropout=0.2, bn=True)
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0, loss_scale=loss_scale)
    step = hand_step(model)
    for i in range(steps):
        state, _ = step(state, batch(seed=i))
    return model, state


def nbytes(state):
    return sum(t.numel() * t.element_size() for t in fnlit.tree.tree_leaves(state))


def test_roundtrip_is_exact_and_keeps_position_and_meta(tmp_path):
    _, state = trained(loss_scale="dynamic")
    path = ckpt.save(tmp_path / "a.ckpt", state, position={"epoch": 1, "batch": 3, "seed": 7}, lr=0.01, layers=[8, 16])
    fresh = fnlit.TrainState.create(mlp(dropout=0.2, bn=True), fnlit.optim.adamw(1e-2), seed=1, loss_scale="dynamic")
    restored = ckpt.restore(path, like=fresh)
    assert_same_tensors(restored, state)
    assert restored.tx is fresh.tx and list(restored.params) == list(state.params)
    info = ckpt.read_info(path)
    assert (info.step, info.position, info.meta) == (2, {"epoch": 1, "batch": 3, "seed": 7}, {"lr": 0.01, "layers": [8, 16]})


def test_tensors_in_the_position_round_trip_beside_the_state(tmp_path):
    # Callbacks' states (EMA's average) travel in the position: tensors among JSON values, nested.
    _, state = trained()
    avg, counts = torch.randn(3, 4, dtype=torch.float64), torch.arange(5)
    position = {"epoch": 1, "batch": 0, "seed": 7, "callbacks": {"EMA": {"params": {"w": avg}}, "X": [counts, 2, None]}}
    path = ckpt.save(tmp_path / "a.ckpt", state, position=position)
    assert_same_tensors(ckpt.restore(path, like=state), state)  # the position's tensors are not the state's
    got = ckpt.read_info(path).position
    assert got["epoch"] == 1 and got["callbacks"]["X"][1:] == [2, None]
    assert torch.equal(got["callbacks"]["EMA"]["params"]["w"], avg) and got["callbacks"]["EMA"]["params"]["w"].dtype == avg.dtype
    assert torch.equal(got["callbacks"]["X"][0], counts)


def test_restore_follows_like_dtype_and_device(tmp_path):
    _, state = trained()
    path = ckpt.save(tmp_path / "a.ckpt", state)
    like64 = state.replace(params={k: v.double() for k, v in state.params.items()})
    assert all(v.dtype == torch.float64 for v in ckpt.restore(path, like64).params.values())
    if torch.cuda.is_available():  # (a meta `like` is refused: it could not hold the values)
        on_gpu = ckpt.restore(path, state.replace(params={k: v.cuda() for k, v in state.params.items()}))
        assert all(v.device.type == "cuda" for v in on_gpu.params.values())


def test_size_is_within_10_percent_of_tensor_bytes_even_for_views(tmp_path):
    _, state = trained(nn.Sequential(nn.Linear(8, 1024), nn.ReLU(), nn.Linear(1024, 1024)), steps=1)
    path = ckpt.save(tmp_path / "big.ckpt", state)
    assert nbytes(state) > 12e6 and os.path.getsize(path) <= 1.1 * nbytes(state)
    flat = torch.zeros(10_000_000)  # params that are small views of one 40 MB buffer
    viewed = state.replace(params={"a": flat[:10], "b": flat[100:110].view(2, 5)}, opt_state=None)
    path = ckpt.save(tmp_path / "views.ckpt", viewed)
    assert os.path.getsize(path) <= 1.1 * nbytes(viewed) + 4096  # a few KB of zip/header for tiny states
    assert_trees_equal(ckpt.restore(path, viewed), viewed)


def test_another_model_names_the_first_path_and_both_shapes(tmp_path):
    _, state = trained()
    path = ckpt.save(tmp_path / "a.ckpt", state)
    other = fnlit.TrainState.create(mlp(hidden=32, dropout=0.2, bn=True), fnlit.optim.adamw(1e-2), seed=0)
    with pytest.raises(ValueError, match=r"a\.ckpt.*at params\['0\.bias'\]: expected tensor of shape \(32,\).*got tensor of shape \(16,\)"):
        ckpt.restore(path, like=other)
    sgd = fnlit.TrainState.create(mlp(dropout=0.2, bn=True), fnlit.optim.sgd(0.1, momentum=0.9), seed=0)
    with pytest.raises(ValueError, match=r"does not fit the state.*at opt_state"):
        ckpt.restore(path, like=sgd)


def test_a_loss_scaler_in_one_state_only_names_loss_scale(tmp_path):
    # Resuming float16 training as bfloat16 (or the reverse) was blamed on "another model or optimizer".
    _, fp16 = trained(loss_scale="dynamic")
    _, bf16 = trained()
    for saved, like in ((fp16, bf16), (bf16, fp16)):
        path = ckpt.save(tmp_path / "a.ckpt", saved)
        with pytest.raises(ValueError, match=r"a loss scaler in one and not the other\): at scaler\[0\]: .*"
                                             r"TrainState\.create\(\.\.\., loss_scale=\.\.\.\)"):  # fmt: skip
            ckpt.restore(path, like=like)


def test_truncated_or_corrupt_files_raise_an_error_naming_the_file(tmp_path):
    _, state = trained()
    path = ckpt.save(tmp_path / "a.ckpt", state)
    data = path.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"cut\.ckpt: the file is truncated or corrupt"):
        ckpt.restore(tmp_path / "cut.ckpt", like=state)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match=r"empty\.ckpt"):
        ckpt.restore(tmp_path / "empty.ckpt", like=state)
    flipped = bytearray(data)
    flipped[data.index(state.params["0.weight"].numpy().tobytes()[:16]) + 5] ^= 0x40
    (tmp_path / "flip.ckpt").write_bytes(bytes(flipped))
    with pytest.raises(ckpt.CheckpointError, match=r"flip\.ckpt.*params\['0\.weight'\] do not match their checksum"):
        ckpt.restore(tmp_path / "flip.ckpt", like=state)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint file at .*missing\.ckpt"):
        ckpt.restore(tmp_path / "missing.ckpt", like=state)
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"plain\.pt is not an fnlit checkpoint"):
        ckpt.restore(tmp_path / "plain.pt", like=state)


def test_a_flipped_bit_in_the_pickle_is_a_corrupt_file_and_last_falls_back(tmp_path):
    # Bit 0 of byte 0: torch's unpickler raises IndexError on it (about 1 % of single-bit flips do).
    _, state = trained()
    ck = ckpt.Checkpointer(tmp_path, every_n_steps=1, keep_last=2)
    steps(state, 2, ck)
    newest = ck.last_path.resolve()
    data = bytearray(newest.read_bytes())
    data[0] ^= 1
    newest.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        ckpt.restore(newest, like=state)
    with pytest.warns(UserWarning, match="Skipping checkpoint"):
        restored, _ = ckpt.Checkpointer(tmp_path).restore("last", like=state)
    assert int(restored.step) == int(state.step) + 1  # the older of the two


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_file_that_runs_code_on_load_is_refused(tmp_path, writer):
    _, state = trained()
    path, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    if writer == "torch.save":
        torch.save({"format": "fnlit.checkpoint", "tensors": {}, "x": Evil(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Evil(marker), protocol=2))
    with pytest.raises(ckpt.UnsafeCheckpointError, match=r"refusing to load .*evil\.ckpt.*refuses to execute code"):
        ckpt.restore(path, like=state)
    with pytest.raises(ckpt.UnsafeCheckpointError, match="non-tensor objects"):
        ckpt.load_module(path, mlp())
    assert not marker.exists()


def failing_writes(monkeypatch, after_bytes):
    """os.write fails with ENOSPC once ``after_bytes`` were written: a disk that fills up."""
    written, real = [0], os.write

    def write(fd, data):
        if written[0] + len(data) > after_bytes:
            raise OSError(errno.ENOSPC, "No space left on device")
        written[0] += len(data)
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("after_bytes", [0, 100_000])
def test_full_disk_raises_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, after_bytes):
    _, old = trained(steps=1)
    _, new = trained(steps=3)
    path = ckpt.save(tmp_path / "a.ckpt", old)
    big = new.replace(buffers={**new.buffers, "pad": torch.zeros(100_000)})
    failing_writes(monkeypatch, after_bytes)
    with pytest.raises(ckpt.CheckpointError, match=r"could not write checkpoint .*a\.ckpt: No space left on device \(ENOSPC\)"):
        ckpt.save(path, big)
    monkeypatch.undo()
    assert_trees_equal(ckpt.restore(path, old), old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt"]  # no temporary file left


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX permission bits")
def test_saving_over_a_file_keeps_its_permission_bits_as_torch_save_does(tmp_path):
    _, state = trained()
    reference = tmp_path / "torch.ckpt"
    torch.save({"a": torch.ones(1)}, reference)
    os.chmod(reference, 0o600)
    torch.save({"a": torch.zeros(1)}, reference)
    assert oct(reference.stat().st_mode & 0o777) == oct(0o600)  # torch.save writes into the file: its mode stays
    path = ckpt.save(tmp_path / "a.ckpt", state)
    for mode in (0o600, 0o640):
        os.chmod(path, mode)
        ckpt.save(path, state)
        assert oct(path.stat().st_mode & 0o777) == oct(mode)
    assert_trees_equal(ckpt.restore(path, state), state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "torch.ckpt"]


def test_saving_to_a_symbolic_link_writes_through_it_as_torch_save_does(tmp_path):
    _, old = trained(steps=1)
    _, new = trained(steps=3)
    (tmp_path / "runs").mkdir()
    (tmp_path / "store").mkdir()
    for name, save in (("torch", lambda p, s: torch.save({"w": s.params["0.weight"]}, p)), ("fnlit", ckpt.save)):
        target, link = tmp_path / "store" / f"{name}.ckpt", tmp_path / "runs" / f"{name}.ckpt"
        save(target, old)
        link.symlink_to(target)
        save(link, new)
        assert link.is_symlink() and link.resolve() == target  # the link stays, and its target has the new content
    assert torch.equal(torch.load(tmp_path / "store" / "torch.ckpt", weights_only=True)["w"], new.params["0.weight"])
    assert_trees_equal(ckpt.restore(tmp_path / "store" / "fnlit.ckpt", new), new)
    assert_trees_equal(ckpt.restore(tmp_path / "runs" / "fnlit.ckpt", new), new)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["fnlit.ckpt", "torch.ckpt"]  # no temporary file
    # a Checkpointer's last.ckpt linked elsewhere: that file gets the newest checkpoint
    (tmp_path / "latest.ckpt").write_bytes(b"")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "last.ckpt").symlink_to(tmp_path / "latest.ckpt")
    ckpt.Checkpointer(tmp_path / "ck").save(new)
    assert (tmp_path / "ck" / "last.ckpt").is_symlink()
    assert_trees_equal(ckpt.restore(tmp_path / "latest.ckpt", new).params, new.params)
    # but a last.ckpt linked to one of the folder's own checkpoints is replaced, not written through: that
    # checkpoint keeps its content (as Lightning replaces its last.ckpt link)
    (tmp_path / "own").mkdir()
    first = ckpt.Checkpointer(tmp_path / "own", save_last=False).save(old)
    (tmp_path / "own" / "last.ckpt").symlink_to(first.name)
    ckpt.Checkpointer(tmp_path / "own", keep_last=None).save(new)
    assert_trees_equal(ckpt.restore(first, old).params, old.params)
    assert_trees_equal(ckpt.restore(tmp_path / "own" / "last.ckpt", new).params, new.params)


def test_unwritable_folder_raises_naming_the_path(tmp_path, monkeypatch):
    _, state = trained()
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ckpt.CheckpointError, match=r"could not write checkpoint .*file/a\.ckpt: Not a directory"):
        ckpt.save(tmp_path / "file" / "a.ckpt", state)
    path = ckpt.save(tmp_path / "b.ckpt", state)
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(ckpt.CheckpointError, match=r"b\.ckpt: Input/output error"):
        ckpt.save(path, state)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.ckpt", "file"]


def test_metadata_must_be_json():
    _, state = trained()
    with pytest.raises(TypeError, match=r"the metadata model= .*not JSON-serialisable"):
        ckpt.save("unused.ckpt", state, model=nn.Linear(1, 1))


def test_a_train_state_whose_params_or_buffers_is_not_a_dict_is_refused_naming_the_field(tmp_path):
    # they failed inside the header's JSON ("Object of type Tensor is not JSON serializable", "'NoneType' object is
    # not iterable"); another pytree with such fields is any pytree, stored without names
    _, state = trained(mlp())
    for field, bad in [("params", list(state.params.values())), ("buffers", None)]:
        wrong = state.replace(**{field: bad})
        with pytest.raises(TypeError, match=rf"fnlit.save expected state\.{field} to be a dict name -> tensor .* got "
                                            rf"{type(bad).__name__} instead"):
            ckpt.save(tmp_path / "a.ckpt", wrong)
        with pytest.raises(TypeError, match=rf"state\.{field} to be a dict"):
            ckpt.Checkpointer(tmp_path / "run").save(wrong)
        with pytest.raises(TypeError, match=rf"fnlit.export expected state\.{field} to be a dict"):
            ckpt.export(wrong, mlp())
    assert not any(tmp_path.iterdir())  # nothing written

    class Pair(NamedTuple):
        params: list
        buffers: Any

    pair = Pair([torch.ones(2), torch.zeros(3)], None)
    path = ckpt.save(tmp_path / "pair.ckpt", pair)
    back = ckpt.restore(path, like=Pair([torch.empty(2), torch.empty(3)], None))
    assert back.buffers is None and [t.tolist() for t in back.params] == [[1.0, 1.0], [0.0, 0.0, 0.0]]
    with pytest.raises(ckpt.CheckpointError, match="holds no TrainState params/buffers"):
        ckpt.load_module(path, nn.Linear(2, 1))


def test_a_dict_key_that_is_not_a_string_is_refused_in_metadata_and_position(tmp_path):
    # json.dumps writes {0: "cat"} as {"0": "cat"} and {3: a, "3": b} as one entry: it came back changed, silently
    # (torch.save keeps int keys: the reference for what "stored" means).
    import io

    buffer = io.BytesIO()
    torch.save({0: "cat", 3: 0.5, "3": 0.7}, buffer)
    buffer.seek(0)
    assert torch.load(buffer) == {0: "cat", 3: 0.5, "3": 0.7}
    _, state = trained()
    with pytest.raises(TypeError, match=r"the metadata classes= has the key 0 \(int\): it would come back as '0'"):
        ckpt.save(tmp_path / "a.ckpt", state, classes={0: "cat", 1: "dog"})
    position = {"epoch": 0, "batch": 1, "seed": 0, "callbacks": {"C": {"hist": {3: 0.5, "3": 0.7}}}}
    with pytest.raises(TypeError, match=r"position\['callbacks'\]\['C'\]\['hist'\] has the key 3 \(int\)"):
        ckpt.save(tmp_path / "b.ckpt", state, position=position)
    with pytest.raises(TypeError, match=r"has the key 0 \(int\)"):
        ckpt.Checkpointer(tmp_path, classes={0: "cat"})
    from fnlit.sharded_checkpoint import save_sharded

    with pytest.raises(TypeError, match=r"save_sharded stores the metadata as JSON.* has the key 0 \(int\)"):
        save_sharded(tmp_path / "s", state, classes={0: "cat"})
    assert not list(tmp_path.iterdir())  # nothing written
    path = ckpt.save(tmp_path / "c.ckpt", state, classes={"0": "cat"})  # string keys: stored as given
    assert ckpt.read_info(path).meta["classes"] == {"0": "cat"}


def steps(state, n, ck, start=0):
    for i in range(n):
        state = state.replace(step=state.step + 1)
        ck.on_step(state, {"epoch": 0, "batch": start + i + 1, "seed": 0})
    return state


def names(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def test_checkpointer_keeps_the_last_k_and_resumes_from_last(tmp_path):
    _, state = trained()
    ck = ckpt.Checkpointer(tmp_path, every_n_steps=3, keep_last=2, lr=0.1)
    state = steps(state, 10, ck)
    assert names(tmp_path) == ["last.ckpt", "step=00000009.ckpt", "step=00000012.ckpt"]
    restored, position = ckpt.Checkpointer(tmp_path).restore("last", like=state)
    assert int(restored.step) == 12 and position == {"epoch": 0, "batch": 10, "seed": 0}
    assert ckpt.read_info(tmp_path / "last.ckpt").meta == {"lr": 0.1}


def test_checkpointer_keeps_the_best_k_by_the_monitored_metric(tmp_path):
    _, state = trained()
    ck = ckpt.Checkpointer(tmp_path, monitor="val_loss", mode="min", keep_best=2, keep_last=1)
    for loss in [5.0, 3.0, 4.0, 6.0, 1.0, 7.0]:
        state = state.replace(step=state.step + 1)
        ck.on_validation(state, {"epoch": 0, "batch": 0, "seed": 0}, {"val_loss": loss, "acc": 0.5})
    # steps 5 (1.0) and 4 (3.0) are the best; step 7 would be the last, but 7.0 is not among the best
    assert names(tmp_path) == ["last.ckpt", "step=00000004.ckpt", "step=00000007.ckpt"]
    assert ck.best_path.name == "step=00000007.ckpt"
    again = ckpt.Checkpointer(tmp_path, monitor="val_loss", mode="max", keep_best=1)  # reads the folder's metrics
    assert again.best_path.name == "step=00000004.ckpt"
    with pytest.raises(ValueError, match=r"monitor='val_loss'.*got \['acc'\] instead"):
        ck.on_validation(state, {"epoch": 0, "batch": 0, "seed": 0}, {"acc": 1.0})


def test_restore_last_skips_a_corrupt_newest_checkpoint(tmp_path):
    _, state = trained()
    ck = ckpt.Checkpointer(tmp_path, every_n_steps=1, keep_last=3, save_last=False)
    steps(state, 3, ck)
    newest = tmp_path / "step=00000005.ckpt"
    newest.write_bytes(newest.read_bytes()[:-100])
    with pytest.warns(UserWarning, match=r"Skipping checkpoint .*step=00000005\.ckpt.*truncated or corrupt"):
        restored, position = ck.restore("last", like=state)
    assert int(restored.step) == 4 and position["batch"] == 2


def test_restore_last_without_checkpoints_starts_fresh(tmp_path):
    _, state = trained()
    assert ckpt.Checkpointer(tmp_path / "new").restore("last", like=state) == (state, None)
    assert ckpt.Checkpointer(tmp_path / "unused", monitor="val/loss").best_path is None
    assert not (tmp_path / "unused").exists()  # asking makes no folder (fit(fast_dev_run=True) writes nothing)


def test_checkpointer_saves_on_exit_and_epochs_without_duplicates(tmp_path):
    _, state = trained()
    ck = ckpt.Checkpointer(tmp_path, every_n_epochs=2, keep_last=None, save_last=False)
    ck.on_epoch_end(state, {"epoch": 0, "batch": 4, "seed": 0})
    assert names(tmp_path) == []
    ck.on_epoch_end(state, {"epoch": 2, "batch": 0, "seed": 0})
    ck.on_exit(state, {"epoch": 2, "batch": 0, "seed": 0}, "finished")
    assert names(tmp_path) == ["step=00000002.ckpt"]
    ck.on_exit(state.replace(step=state.step + 1), {"epoch": 2, "batch": 1, "seed": 0}, "sigterm")
    assert names(tmp_path) == ["step=00000002.ckpt", "step=00000003.ckpt"]
    ck.on_exit(state.replace(step=state.step + 2), {"epoch": 2, "batch": 2, "seed": 0}, "sigint")
    assert names(tmp_path)[-1] == "step=00000004.ckpt"
    with pytest.raises(ValueError, match="reason 'sigterm', 'sigint' or 'finished', got 'crash'"):
        ck.on_exit(state, {"epoch": 0, "batch": 0, "seed": 0}, "crash")


def test_an_interrupted_periodic_save_is_made_again_on_exit(tmp_path, monkeypatch):
    # A second Ctrl-C while the step-6 file is written: fit's exit hook must still save step 6.
    _, state = trained()  # at step 2
    ck = ckpt.Checkpointer(tmp_path, every_n_steps=3)
    state = steps(state, 2, ck)  # step 3 saved; now at 4
    real = ckpt.Checkpointer.save

    def interrupted(self, state, position=None, **kw):
        if int(state.step) == 6:
            raise KeyboardInterrupt
        return real(self, state, position, **kw)

    monkeypatch.setattr(ckpt.Checkpointer, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        steps(state, 2, ck, start=2)  # steps 5 and 6
    monkeypatch.setattr(ckpt.Checkpointer, "save", real)
    ck.on_exit(state.replace(step=torch.tensor(6)), {"epoch": 0, "batch": 4, "seed": 0}, "sigint")
    assert ckpt.read_info(tmp_path / "last.ckpt").step == 6


def test_a_periodic_save_does_not_take_the_metrics_of_another_runs_file(tmp_path):
    # An earlier run saved step 3 as a best with val_loss 0.1; this run reaches step 3 by another path.
    _, state = trained()
    at3 = state.replace(step=torch.tensor(3))
    ckpt.Checkpointer(tmp_path, monitor="val_loss", keep_best=1).on_validation(at3, None, {"val_loss": 0.1})
    ck = ckpt.Checkpointer(tmp_path, every_n_steps=3, monitor="val_loss", keep_best=1)
    steps(state, 1, ck)
    assert ckpt.read_info(tmp_path / "step=00000003.ckpt").metrics is None and ck.best_path is None
    # Its own best at a step keeps its metrics through the periodic save of that step (as fit calls them: the
    # validation, then on_step, with one state), and a save of that state asked for afterwards keeps them too.
    ck.on_validation(at3, None, {"val_loss": 5.0})
    at6 = at3.replace(step=torch.tensor(6))
    ck.on_validation(at6, None, {"val_loss": 4.0})
    ck.on_step(at6, None)
    assert ckpt.read_info(tmp_path / "step=00000006.ckpt").metrics == {"val_loss": 4.0}
    ck.save(at6)
    assert ckpt.read_info(tmp_path / "step=00000006.ckpt").metrics == {"val_loss": 4.0}
    ck.save(at3.replace(step=torch.tensor(6)))  # another state at that step: not the validated one
    assert ckpt.read_info(tmp_path / "step=00000006.ckpt").metrics is None


def test_a_failed_save_deletes_nothing(tmp_path, monkeypatch):
    _, state = trained()
    ck = ckpt.Checkpointer(tmp_path, every_n_steps=1, keep_last=1)
    state = steps(state, 1, ck)
    failing_writes(monkeypatch, 1000)
    with pytest.raises(ckpt.CheckpointError, match=r"step=00000004\.ckpt: No space left"):
        steps(state, 1, ck)
    monkeypatch.undo()
    assert names(tmp_path) == ["last.ckpt", "step=00000003.ckpt"]
    assert int(ck.restore("last", like=state)[0].step) == 3


def test_only_rank_0_writes_and_every_rank_restores(tmp_path, monkeypatch):
    _, state = trained()
    path = ckpt.save(tmp_path / "a.ckpt", state)
    monkeypatch.setattr(fnlit.distributed, "rank", lambda: 1)
    ck = ckpt.Checkpointer(tmp_path / "ck", every_n_steps=1)
    ck.on_step(state, {"epoch": 0, "batch": 2, "seed": 0})
    ck.on_exit(state, {"epoch": 0, "batch": 2, "seed": 0}, "sigterm")
    ckpt.save(tmp_path / "b.ckpt", state)
    assert names(tmp_path) == ["a.ckpt"]
    assert_same_tensors(ckpt.restore(path, state), state)


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = tmp_path / f".step=00000001.ckpt.tmp-{int(dead.stdout)}-abcd1234"
    stale.write_bytes(b"partial")
    _, state = trained()
    ckpt.Checkpointer(tmp_path, every_n_steps=1).on_step(state, {"epoch": 0, "batch": 2, "seed": 0})
    assert not stale.exists()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"every_n_steps": 0}, r"every_n_steps to be an int >= 1 or None, got 0"),
    ({"keep_last": 0}, r"keep_last to be an int >= 1 or None, got 0"),
    ({"keep_best": -1}, r"keep_best to be an int >= 0 or None, got -1"),
    ({"mode": "best"}, r"mode='min' or mode='max', got 'best'"),
])
def test_checkpointer_rejects_bad_options(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ckpt.Checkpointer(tmp_path, **kwargs)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.out = nn.Linear(4, 5, bias=False)
        self.out.weight = self.emb.weight
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)

    def forward(self, x):
        return self.out(self.bn(self.emb(x)) * self.scale)


def test_export_and_load_module_give_the_trained_weights(tmp_path):
    model = Tied()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    state = state.replace(params={k: v + 1 for k, v in state.params.items()},
                          buffers={**state.buffers, "scale": torch.tensor(3.0), "bn.running_mean": torch.ones(4)})
    x = torch.tensor([0, 1, 2])
    expected, _ = fnlit.apply(model, state.params, state.buffers, x, train=False)
    path = ckpt.save(tmp_path / "a.ckpt", state)
    for loaded in (ckpt.export(state, Tied()), ckpt.load_module(path, Tied())):
        assert not loaded.training and torch.equal(loaded(x), expected)
        assert torch.equal(loaded.state_dict()["out.weight"], state.params["emb.weight"])
    with pytest.raises(ValueError, match=r"does not fit the Linear: missing \['weight', 'bias'\], unexpected \['emb.weight'"):
        ckpt.load_module(path, nn.Linear(4, 5))
    with pytest.raises(ValueError, match=r"at 0\.weight: the module has shape \(32, 8\), the state \(16, 8\)"):
        ckpt.export(trained(mlp())[1], mlp(hidden=32))


class _SavedTransposed(nn.Module):  # a checkpoint-format shim: state_dict holds the weight transposed
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self._register_state_dict_hook(_SavedTransposed._save)
        self._register_load_state_dict_pre_hook(_SavedTransposed._load)

    @staticmethod
    def _save(module, sd, prefix, local_metadata):
        sd[prefix + "lin.weight"] = sd[prefix + "lin.weight"].t()

    @staticmethod
    def _load(sd, prefix, *args):
        sd[prefix + "lin.weight"] = sd[prefix + "lin.weight"].t()

    def forward(self, x):
        return self.lin(x)


def test_export_and_load_module_keep_a_weight_that_state_dict_hooks_rewrite(tmp_path):
    # The entry the save hook replaced was not one of the module's tensors, so export loaded the fresh module's
    # own (untrained) weight back into it.
    state = fnlit.TrainState.create(_SavedTransposed(), fnlit.optim.sgd(0.1), seed=0)
    state = state.replace(params={k: v + 1 for k, v in state.params.items()})
    trained_module = _SavedTransposed()
    with torch.no_grad():
        trained_module.lin.weight.copy_(state.params["lin.weight"])
        trained_module.lin.bias.copy_(state.params["lin.bias"])
    reference = _SavedTransposed()
    reference.load_state_dict(trained_module.state_dict())  # PyTorch's own round trip
    path = ckpt.save(tmp_path / "a.ckpt", state)
    for loaded in (ckpt.export(state, _SavedTransposed()), ckpt.load_module(path, _SavedTransposed())):
        assert torch.equal(loaded.lin.weight, reference.lin.weight) and torch.equal(loaded.lin.bias, reference.lin.bias)
        assert torch.equal(loaded.lin.weight, trained_module.lin.weight)


def test_restore_into_a_state_on_the_meta_device_is_refused_and_a_materialised_one_gets_the_values(tmp_path):
    # The restored state was on the meta device: every saved value silently dropped.
    _, state = trained()
    path = ckpt.save(tmp_path / "a.ckpt", state)
    like = fnlit.TrainState.create(mlp(dropout=0.2, bn=True), fnlit.optim.adamw(1e-2), seed=1)
    meta = like.replace(params={**like.params, "0.weight": like.params["0.weight"].to("meta")})
    with pytest.raises(ValueError, match=r"meta device at params\['0\.weight'\].*module\.to_empty\(device=\.\.\.\)"):
        ckpt.restore(path, like=meta)
    with pytest.raises(ValueError, match=r"meta device at w, which cannot hold the checkpoint's values"):
        ckpt.restore(ckpt.save(tmp_path / "t.ckpt", {"w": torch.ones(2)}), like={"w": torch.empty(2, device="meta")})

    with torch.device("meta"):
        model = mlp(dropout=0.2, bn=True)
    like = fnlit.TrainState.create(model.to_empty(device="cpu"), fnlit.optim.adamw(1e-2), seed=1)  # uninitialised
    restored = ckpt.restore(path, like=like)
    for name, saved in {**state.params, **state.buffers}.items():
        assert torch.equal({**restored.params, **restored.buffers}[name], saved)


def test_export_and_load_module_into_a_module_on_the_meta_device_are_refused(tmp_path):
    # Copying into a meta tensor does nothing: export and load_module returned the module unchanged, and it failed
    # at its first forward (torch's load_state_dict warns that it is a no-op).
    state = fnlit.TrainState.create(nn.Linear(3, 2), fnlit.optim.sgd(0.1), seed=0)
    path = ckpt.save(tmp_path / "a.ckpt", state)
    for load in (lambda m: ckpt.export(state, m), lambda m: ckpt.load_module(path, m)):
        with torch.device("meta"):
            model = nn.Linear(3, 2)
        with pytest.raises(ValueError, match=r"into the Linear: its tensor weight is on the meta device.*"
                                             r"module\.to_empty\(device=\.\.\.\) first"):
            load(model)
        reference = nn.Linear(3, 2)  # PyTorch's own load of the same values
        reference.load_state_dict({"weight": state.params["weight"], "bias": state.params["bias"]})
        loaded = load(model.to_empty(device="cpu"))
        x = torch.randn(4, 3)
        assert torch.equal(loaded(x), reference(x))


def test_a_mismatch_of_frozen_and_trainable_or_of_optimizers_says_which(tmp_path):
    # A tensor frozen in one and trainable in the other was "the checkpoint has no params['0.bias'] (another model
    # or optimizer?)"; an Adam checkpoint into an SGD state named opt_state[2]['learning_rate'].
    def create(tx=None, frozen=False):
        model = nn.Sequential(nn.Linear(2, 2))
        model[0].bias.requires_grad_(not frozen)
        return model, fnlit.TrainState.create(model, tx or fnlit.optim.adamw(1e-3), seed=0)

    model, adam = create()
    path = ckpt.save(tmp_path / "adam.ckpt", adam)
    frozen = create(frozen=True)[1]
    frozen_path = ckpt.save(tmp_path / "frozen.ckpt", frozen)
    with pytest.raises(ValueError, match=r"0\.bias is frozen in the state \(in its buffers\) and trainable in the "
                                         r"checkpoint.*requires_grad.*fnlit\.load_module\(path, module\)"):
        ckpt.restore(path, like=create(frozen=True)[1])
    with pytest.raises(ValueError, match=r"0\.bias is trainable in the state \(in its params\) and frozen in the "
                                         r"checkpoint.*TrainState\.create"):
        ckpt.restore(frozen_path, like=adam)
    # the route the message gives, against PyTorch's own load_state_dict of the saved tensors
    reference = nn.Sequential(nn.Linear(2, 2))
    reference.load_state_dict({"0.weight": frozen.params["0.weight"], "0.bias": frozen.buffers["0.bias"]})
    loaded = ckpt.load_module(frozen_path, create()[0])
    assert torch.equal(loaded[0].weight, reference[0].weight) and torch.equal(loaded[0].bias, reference[0].bias)
    for tx, kind in [(fnlit.optim.sgd(0.1), "SGDState"), (fnlit.optim.sgd(0.1, momentum=0.9), "SGDState"),
                     (fnlit.optim.chain(fnlit.optim.clip_by_global_norm(1.0), fnlit.optim.adamw(1e-3)),
                      r"\(EmptyState, AdamState\)")]:
        with pytest.raises(ValueError, match=rf"does not fit the state you restore into \(another optimizer\): "
                                             rf"AdamState in the checkpoint, {kind} in the state \(at opt_state"):
            ckpt.restore(path, like=create(tx)[1])
    sgd = create(fnlit.optim.sgd(0.1))[1]  # the route the message gives
    restored = ckpt.restore(path, like=adam)
    moved = restored.replace(tx=sgd.tx, opt_state=sgd.tx.init(restored.params))
    grads = {k: torch.ones_like(v) for k, v in moved.params.items()}
    assert torch.equal(moved.apply_gradients(grads).params["0.weight"], adam.params["0.weight"] - 0.1)
    # export names its source: a state, not "the checkpoint"
    with pytest.raises(ValueError, match=r"at 0\.weight: the module has shape \(3, 2\), the state \(2, 2\)\.$"):
        ckpt.export(adam, nn.Sequential(nn.Linear(2, 3)))


def test_a_conjugated_complex_tensor_round_trips_with_its_values(tmp_path):
    c = torch.randn(3, 3, dtype=torch.complex64)
    tree = {"conj": c.conj(), "neg": torch._neg_view(torch.randn(4))}  # views with a lazy conjugate/negative bit
    back = ckpt.restore(ckpt.save(tmp_path / "c.ckpt", tree), like=tree)
    assert torch.equal(back["conj"], torch.complex(c.real, -c.imag)) and not back["conj"].is_conj()
    assert torch.equal(back["neg"], tree["neg"].clone())


class _Tagged(torch.Tensor):  # a plain subclass: its storage holds its values
    pass


class _Dispatching(torch.Tensor):  # its own __torch_dispatch__ (as DTensor, FakeTensor, float8 tensors)
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise AssertionError("save must refuse it before any op on it")


def test_a_tensor_subclass_round_trips_as_its_data_and_a_dispatching_one_is_refused_before_writing(tmp_path):
    # A subclass was pickled as itself: the save succeeded, then restore/load_module/read_info refused the file as
    # "tampered with" (torch.load(weights_only=True) rebuilds torch.Tensor and nn.Parameter only).
    def model():
        m = nn.Linear(3, 2)
        m.register_buffer("mask", torch.tensor([1.0, 2.0]).as_subclass(_Tagged))
        return m

    state = fnlit.TrainState.create(model(), fnlit.optim.sgd(0.1), seed=0)
    assert type(state.buffers["mask"]) is _Tagged
    path = ckpt.save(tmp_path / "a.ckpt", state)
    raw = torch.load(path, weights_only=True)  # torch's own safe loader reads it
    assert [type(t) for t in raw["tensors"].values()] == [torch.Tensor] * len(raw["tensors"])
    back = ckpt.restore(path, like=state)
    assert type(back.buffers["mask"]) is _Tagged and torch.equal(back.buffers["mask"].as_subclass(torch.Tensor),
                                                                 torch.tensor([1.0, 2.0]))
    assert ckpt.read_info(path).step == 0
    fresh = nn.Linear(3, 2)
    fresh.register_buffer("mask", torch.zeros(2))
    assert torch.equal(ckpt.load_module(path, fresh).mask, torch.tensor([1.0, 2.0]))

    bad = state.replace(buffers={"mask": torch.Tensor._make_subclass(_Dispatching, torch.ones(2))})
    with pytest.raises(TypeError, match=r"got a _Dispatching at buffers.*mask.*own __torch_dispatch__"):
        ckpt.save(tmp_path / "b.ckpt", bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt"]  # no file, no temporary left


def ensemble_state():
    torch.manual_seed(0)
    return fnlit.ensemble_states(lambda: mlp(bn=True), fnlit.optim.adamw(1e-2), seeds=[0, 1, 2], learning_rate=[1e-3, 1e-2, 3e-2])


def test_checkpointer_saves_and_restores_an_ensemble_bitwise(tmp_path):
    state = ensemble_state()
    state = state.replace(step=torch.full((3,), 4), params={k: v + 1 for k, v in state.params.items()})
    ck = ckpt.Checkpointer(tmp_path, every_n_steps=2)
    ck.on_step(state, {"epoch": 0, "batch": 4, "seed": 0})
    assert names(tmp_path) == ["last.ckpt", "step=00000004.ckpt"] and ckpt.read_info(tmp_path / "last.ckpt").step == 4
    restored, position = ckpt.Checkpointer(tmp_path).restore("last", like=ensemble_state())
    assert_same_tensors(restored, state)
    assert restored.step.tolist() == [4, 4, 4] and position["batch"] == 4
    apart = state.replace(step=torch.tensor([4, 5, 4]))
    with pytest.raises(ValueError, match=r"expected one step, got \[4, 5, 4\] instead.*must step together"):
        ck.on_step(apart, {"epoch": 0, "batch": 4, "seed": 0})


def test_fit_with_a_checkpointer_trains_and_resumes_an_ensemble(tmp_path):
    model = mlp(bn=True)
    step = fnlit.ensemble(hand_step(model), 3)
    x, y = batch(n=32, seed=0)
    data = fnlit.ArrayLoader(x, y, batch_size=8)
    whole = fnlit.fit(step, ensemble_state(), data, max_steps=6, progress=False)
    first = fnlit.fit(step, ensemble_state(), data, max_steps=3, progress=False, checkpoint=ckpt.Checkpointer(tmp_path, every_n_steps=2))
    assert ckpt.read_info(tmp_path / "last.ckpt").step == 3
    resumed = fnlit.fit(step, ensemble_state(), data, max_steps=6, progress=False,
                        checkpoint=ckpt.Checkpointer(tmp_path, every_n_steps=2), ckpt_path="last")
    assert first.step.tolist() == [3, 3, 3] and resumed.step.tolist() == [6, 6, 6]
    assert_trees_equal(resumed.params, whole.params)  # the same as the uninterrupted run


def test_a_tie_of_the_monitored_metric_keeps_the_earlier_best(tmp_path):
    # As Lightning's ModelCheckpoint: only a strictly better value replaces a best.
    _, state = trained()  # at step 2
    ck = ckpt.Checkpointer(tmp_path, monitor="val_loss", mode="min", keep_best=2, keep_last=1, save_last=False)
    for loss in [1.0, 1.0]:  # steps 3 and 4
        state = state.replace(step=state.step + 1)
        ck.on_validation(state, {"epoch": 0, "batch": 0, "seed": 0}, {"val_loss": loss})
    assert ck.best_path.name == "step=00000003.ckpt"
    assert ckpt.Checkpointer(tmp_path, monitor="val_loss", keep_best=1).best_path.name == "step=00000003.ckpt"
    state = state.replace(step=state.step + 1)
    ck.on_validation(state, {"epoch": 0, "batch": 0, "seed": 0}, {"val_loss": 0.5})  # step 5: of the tie, 3 stays
    assert names(tmp_path) == ["step=00000003.ckpt", "step=00000005.ckpt"]


def test_keep_best_none_keeps_every_validated_checkpoint(tmp_path):
    ck = ckpt.Checkpointer(tmp_path, monitor="val/loss", keep_best=None, save_last=False)
    _, state = trained(steps=0)
    for i, loss in enumerate([3.0, 1.0, 2.0, 5.0]):
        ck.on_validation(state.replace(step=torch.tensor(i + 1)), {"epoch": 0, "batch": i + 1, "seed": 0}, {"val/loss": loss})
    assert sorted(p.name for p in tmp_path.glob("step=*.ckpt")) == [f"step={i:08d}.ckpt" for i in (1, 2, 3, 4)]
    assert ck.best_path.name == "step=00000002.ckpt"


def test_one_checkpointer_reused_for_a_second_run_saves_that_run(tmp_path):
    # A loop over learning rates with one Checkpointer: each run's last checkpoint holds that run's state.
    model, ck = mlp(), ckpt.Checkpointer(tmp_path)
    x, y = batch(32)
    for lr in (0.1, 0.01):
        state = fnlit.TrainState.create(model, fnlit.optim.sgd(lr), seed=0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Checkpointer folder .* already holds")  # the second run's
            out = fnlit.fit(hand_step(model), state, fnlit.data.ArrayLoader(x, y, batch_size=8), max_epochs=2,
                            checkpoint=ck, progress=False)  # fmt: skip
        assert_trees_equal(ckpt.restore(ck.last_path, like=state).params, out.params)


def test_a_checkpointer_whose_folder_is_a_file_raises_before_any_training(tmp_path):
    # A checkpoint file's path given as the directory: fit trained every_n_steps steps, then failed at the first save
    # ("cannot create its folder ...: File exists"), and a resume from "last" found nothing and trained from scratch.
    model = mlp()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    file = ckpt.save(tmp_path / "model.ckpt", state)
    steps = []

    class Count:
        def on_step(self, state, metrics):
            steps.append(int(state.step))

    for directory, ckpt_path in [(file, None), (file, "last"), (file, file), (file / "run", None)]:
        with pytest.raises(ckpt.CheckpointError, match=rf"Checkpointer cannot save into .*model\.ckpt.*: .*model\.ckpt "
                                                       "is a file, not a folder"):
            fnlit.fit(hand_step(model), state, fnlit.data.ArrayLoader(*batch(32), batch_size=8), max_epochs=2,
                      checkpoint=ckpt.Checkpointer(directory, every_n_steps=2), ckpt_path=ckpt_path, progress=False,
                      callbacks=[Count()])
        assert steps == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


def test_a_fresh_run_into_a_used_folder_ranks_only_its_own_checkpoints(tmp_path):
    # Lightning's best_model_path is the current run's; an earlier run's better checkpoint is kept, not taken.
    def run(lr, steps, **kw):
        model = mlp()
        state = fnlit.TrainState.create(model, fnlit.optim.sgd(lr), seed=0)
        x, y = batch(32)
        ck = ckpt.Checkpointer(tmp_path, monitor="val/loss", keep_last=1)
        eval_step = fnlit.eval_step(model, lambda f, b: torch.nn.functional.cross_entropy(f(b[0]), b[1]))
        data = fnlit.data.ArrayLoader(x, y, batch_size=8)
        out = fnlit.fit(hand_step(model), state, data, max_steps=steps, val_data=data, eval_step=eval_step,
                        val_check_interval=2, num_sanity_val_steps=0, checkpoint=ck, progress=False, **kw)  # fmt: skip
        return ck, out

    first, _ = run(0.1, 40)
    earlier = sorted(p.name for p in tmp_path.iterdir())
    with pytest.warns(UserWarning, match=r"already holds \d+ checkpoint\(s\) of another run"):
        second, out = run(0.0, 4)  # lr 0: a worse validation loss than the first run's best
    assert ckpt.read_info(second.best_path).step <= 4 and ckpt.read_info(first.best_path).step > 4
    assert set(earlier) - {"last.ckpt"} <= {p.name for p in tmp_path.iterdir()}  # none of its files removed
    resumed, _ = run(0.0, 6, ckpt_path="last")  # the second run, resumed: its own files are ranked again
    assert ckpt.read_info(resumed.best_path).step <= 6


def test_restoring_into_a_donated_state_says_it_was_donated(tmp_path):
    model = mlp()
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0)
    path = ckpt.save(tmp_path / "a.ckpt", state)
    fnlit.donating(hand_step(model))(state, batch())
    with pytest.raises(RuntimeError, match="This TrainState was donated"):
        ckpt.restore(path, like=state)


def test_a_reused_checkpointer_lends_no_metrics_of_one_run_to_the_next(tmp_path):
    # Run 1 validates at steps 4 and 8; run 2 (the next trial of a sweep, same object) only at step 8. Run 2's
    # periodic save at step 4 must not carry run 1's step-4 validation: its best is its own step 8.
    ck = ckpt.Checkpointer(tmp_path, every_n_steps=4, monitor="val/loss")
    step = lambda s, b: (s.replace(step=s.step + 1), {"loss": torch.tensor(0.0)})  # noqa: E731

    def run(values, **kw):
        state = fnlit.TrainState.create(nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
        fnlit.fit(step, state, [torch.zeros(1)] * 4, max_epochs=2, val_data=[torch.zeros(1)], num_sanity_val_steps=0,
                  eval_step=lambda s, b: {"loss": torch.tensor(values[int(s.step)])}, checkpoint=ck, progress=False, **kw)  # fmt: skip

    run({4: 0.1, 8: 0.2})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Checkpointer folder .* already holds")
        run({8: 9.0}, check_val_every_n_epoch=2)
    info = ckpt.read_info(ck.best_path)
    assert (info.step, info.metrics) == (8, {"val/loss": 9.0})


def test_training_continued_from_the_returned_state_is_the_same_run(tmp_path):
    # A second fit call on the state the first returned (more epochs): no warning, the first fit's best counts.
    ck = ckpt.Checkpointer(tmp_path, monitor="val/loss")
    step = lambda s, b: (s.replace(step=s.step + 1), {"loss": torch.tensor(0.0)})  # noqa: E731
    values = {2: 0.5, 4: 0.9}
    state = fnlit.TrainState.create(nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    kw = dict(val_data=[torch.zeros(1)], eval_step=lambda s, b: {"loss": torch.tensor(values[int(s.step)])},
              num_sanity_val_steps=0, checkpoint=ck, progress=False)  # fmt: skip
    state = fnlit.fit(step, state, [torch.zeros(1)] * 2, max_epochs=1, **kw)
    state = fnlit.fit(step, state, [torch.zeros(1)] * 2, max_epochs=1, **kw)  # one more epoch (warnings are errors here)
    assert int(state.step) == 4 and ckpt.read_info(ck.best_path).step == 2


@pytest.mark.parametrize("where, error", [
    ("torch.load", AssertionError("saved_id must be a tuple, got int")),  # torch's persistent_load on a flipped bit
    ("crc32", RuntimeError("self.stride(-1) must be 1 to view Float as Byte")),  # a flipped bit in a stride
])  # fmt: skip
def test_what_torch_raises_on_other_flipped_bits_is_a_corrupt_file_too(tmp_path, monkeypatch, where, error):
    # Found by flipping every bit of a checkpoint in turn: these two escaped as raw errors, so "last" crashed.
    from fnlit import _checkpoint_io

    _, state = trained()
    path = ckpt.save(tmp_path / "a.ckpt", state)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch if where == "torch.load" else _checkpoint_io, "load" if where == "torch.load" else "crc32", fail)
    with pytest.raises(ckpt.CheckpointError, match=r"a\.ckpt.*(truncated or corrupt|is corrupt)"):
        ckpt.restore(path, like=state)


def test_a_retry_after_a_crashed_continuation_saves_its_own_states(tmp_path):
    # fit to step 10; a second fit from there crashes at step 17 after saving step 15; the retry (same state,
    # same Checkpointer, another learning rate) must write its own step 15, not keep the crashed attempt's.
    model, ck = mlp(), ckpt.Checkpointer(tmp_path, every_n_steps=5, keep_last=None)
    x, y = batch(40)
    data = fnlit.data.ArrayLoader(x, y, batch_size=4)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    state = fnlit.fit(hand_step(model), state, data, max_steps=10, checkpoint=ck, progress=False)

    class At15:
        def __init__(self, crash):
            self.crash, self.params = crash, None

        def on_step(self, s, metrics):
            if int(s.step) == 15:
                self.params = {k: v.clone() for k, v in s.params.items()}
            if self.crash and int(s.step) == 17:
                raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        fnlit.fit(hand_step(model), state, data, max_steps=20, checkpoint=ck, callbacks=[At15(True)], progress=False)
    retry = state.replace(opt_state=fnlit.optim.sgd(0.05).init(state.params))
    seen = At15(False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Checkpointer folder .* already holds")  # a run of its own
        fnlit.fit(hand_step(model), retry, data, max_steps=20, checkpoint=ck, callbacks=[seen], progress=False)
    assert_trees_equal(ckpt.restore(tmp_path / "step=00000015.ckpt", like=retry).params, seen.params)


def _continued(tmp_path, crash, best, crash_at, first, then, **kw):
    """A run (best validation at step ``best``) continued by a second fit, which first crashes at ``crash_at``
    and is retried when ``crash``; the Checkpointer is returned."""
    ck = ckpt.Checkpointer(tmp_path, monitor="val/dist", keep_best=1, keep_last=1, every_n_steps=kw.pop("every", None))
    step = lambda s, b: (s.replace(step=s.step + 1), {"loss": b.mean()})  # noqa: E731
    kw.update(val_data=[torch.zeros(1)], eval_step=lambda s, b: {"dist": (s.step.float() - best).abs()}, checkpoint=ck,
              progress=False)  # fmt: skip
    data = [torch.tensor([float(i)]) for i in range(kw.pop("batches"))]
    state = fnlit.fit(step, fnlit.TrainState.create(nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0), data, **first, **kw)

    class Crash:
        def on_step(self, s, metrics):
            if int(s.step) == crash_at:
                raise RuntimeError("crash")

    if crash:
        with pytest.raises(RuntimeError, match="crash"):
            fnlit.fit(step, state, data, callbacks=[Crash()], **then, **kw)
    fnlit.fit(step, state, data, **then, **kw)  # (no "another run" warning: warnings are errors here)
    return ck


@pytest.mark.parametrize("crash", [False, True])
def test_a_continuation_retried_after_a_crash_keeps_the_runs_best_and_pruning(tmp_path, crash):
    # fit to step 10 (best at step 5), continue to 30 (crashing at 12 first, then retried): as without the crash.
    ck = _continued(tmp_path, crash, 5, 12, dict(max_epochs=2), dict(max_epochs=4), batches=5)
    assert ck.best_path.name == "step=00000005.ckpt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=00000005.ckpt", "step=00000030.ckpt"]


@pytest.mark.parametrize("crash", [False, True])
def test_a_retried_continuation_reaching_a_best_again_keeps_it(tmp_path, crash):
    # The best (step 12) is validated again by the retry with the same value: a tie, so no best save; the
    # step's periodic save of the validated state records its metrics, and the best stays step 12.
    ck = _continued(tmp_path, crash, 12, 13, dict(max_steps=6), dict(max_steps=18), batches=50, every=6,
                    val_check_interval=6, num_sanity_val_steps=0)  # fmt: skip
    assert ck.best_path.name == "step=00000012.ckpt" and ckpt.read_info(ck.best_path).metrics == {"val/dist": 0.0}


def test_a_continuation_that_takes_no_step_rewrites_nothing(tmp_path):
    # Resumed at its max_steps (a notebook cell run again): the restored state is not saved again without its metrics.
    step = lambda s, b: (s.replace(step=s.step + 1), {"loss": b.mean()})  # noqa: E731
    kw = dict(val_data=[torch.zeros(1)], eval_step=lambda s, b: {"dist": (s.step.float() - 12).abs()},
              progress=False, val_check_interval=6, num_sanity_val_steps=0, max_steps=12)  # fmt: skip
    data = [torch.tensor([float(i)]) for i in range(50)]
    fresh = lambda: fnlit.TrainState.create(nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)  # noqa: E731
    fnlit.fit(step, fresh(), data, checkpoint=ckpt.Checkpointer(tmp_path, monitor="val/dist"), **kw)
    ck = ckpt.Checkpointer(tmp_path, monitor="val/dist")
    state = fnlit.fit(step, fresh(), data, checkpoint=ck, ckpt_path="last", **kw)
    state = fnlit.fit(step, state, data, checkpoint=ck, **kw)
    assert int(state.step) == 12 and ckpt.read_info(ck.best_path).metrics == {"val/dist": 0.0}


def test_a_resume_that_takes_no_step_keeps_the_best_checkpoints_metrics_when_it_saves_where_it_ends(tmp_path, monkeypatch):
    # The first run died before its exit save (its step-6 file, the best, holds pending log metrics); the resume
    # took no step, logged them and saved step 6 again where it ended: without its metrics (best_path None).
    step = lambda s, b: (s.replace(step=s.step + 1), {"loss": b.mean()})  # noqa: E731
    kw = dict(val_data=[torch.zeros(1)], eval_step=lambda s, b: {"loss": b.mean()}, progress=False, max_steps=6,
              val_check_interval=6, num_sanity_val_steps=0, log_every_n_steps=4)  # fmt: skip
    data = [torch.tensor([float(i)]) for i in range(20)]
    fresh = lambda: fnlit.TrainState.create(nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)  # noqa: E731
    with monkeypatch.context() as m:
        m.setattr(ckpt.Checkpointer, "on_exit", lambda *a, **k: None)  # killed before the exit save
        fnlit.fit(step, fresh(), data, checkpoint=ckpt.Checkpointer(tmp_path, monitor="val/loss", every_n_steps=3), **kw)
    assert ckpt.read_info(tmp_path / "step=00000006.ckpt").metrics == {"val/loss": 0.0}
    ck = ckpt.Checkpointer(tmp_path, monitor="val/loss", every_n_steps=3)
    fnlit.fit(step, fresh(), data, checkpoint=ck, ckpt_path="last", **kw)
    assert ck.best_path == tmp_path / "step=00000006.ckpt"
    assert ckpt.read_info(ck.best_path).metrics == {"val/loss": 0.0}


def test_a_checkpointer_driven_by_hand_takes_a_state_that_has_no_weak_references(tmp_path):
    import collections

    State = collections.namedtuple("State", "step w")
    ck = ckpt.Checkpointer(tmp_path, every_n_steps=3)
    s3 = State(torch.tensor(3), torch.ones(2))
    ck.on_step(s3, {"epoch": 0, "batch": 3, "seed": 0})
    ck.on_exit(s3, {"epoch": 0, "batch": 3, "seed": 0}, "finished")  # the same state: not written again
    restored, position = ck.restore("last", like=State(torch.tensor(0), torch.zeros(2)))
    assert int(restored.step) == 3 and torch.equal(restored.w, s3.w) and position["batch"] == 3


def test_restoring_the_best_checkpoint_to_evaluate_it_does_not_split_the_run(tmp_path):
    step = lambda s, b: (s.replace(step=s.step + 1), {"loss": b.mean()})  # noqa: E731
    values = {1: 0.5, 2: 0.9, 3: 0.8, 4: 0.7}  # the best at step 1, before the first fit's end
    kw = dict(val_data=[torch.zeros(1)], eval_step=lambda s, b: {"loss": torch.tensor(values[int(s.step)])},
              num_sanity_val_steps=0, val_check_interval=1, progress=False)  # fmt: skip
    ck = ckpt.Checkpointer(tmp_path, monitor="val/loss")
    state = fnlit.fit(step, fnlit.TrainState.create(nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0), [torch.zeros(1)] * 2,
                      max_epochs=1, checkpoint=ck, **kw)  # fmt: skip
    ck.restore(ck.best_path, like=state)  # evaluate the best so far
    fnlit.fit(step, state, [torch.zeros(1)] * 2, max_epochs=1, checkpoint=ck, **kw)  # (warnings are errors here)
    assert ckpt.read_info(ck.best_path).step == 1


def test_a_resume_from_a_file_without_a_run_removes_no_other_runs_files(tmp_path):
    _, state = trained()
    other = ckpt.Checkpointer(tmp_path, every_n_steps=1)
    steps(state.replace(step=torch.tensor(9)), 1, other)  # another run's step=00000010.ckpt
    plain = ckpt.save(tmp_path / "plain.ckpt", state)  # fnlit.save: no run
    ck = ckpt.Checkpointer(tmp_path, every_n_steps=1, keep_last=1)
    restored, _ = ck.restore(plain, like=state)
    steps(restored, 2, ck)
    assert (tmp_path / "step=00000010.ckpt").exists()


@pytest.mark.parametrize("sharded", [False, True])
def test_a_checkpoint_saved_after_a_rate_was_assigned_as_a_number_restores_and_continues_the_run(tmp_path, sharded):
    # optax's idiom (hyperparams["learning_rate"] = 1e-4, as a plateau callback does) leaves a float in the state
    # until the next update: the file restored into a fresh state was refused as another model, and
    # save_sharded refused to write it.
    torch.manual_seed(0)
    model = mlp()

    def fresh():
        return fnlit.TrainState.create(model, fnlit.optim.adamw(1e-3), seed=0)

    step = hand_step(model)
    state = fresh()
    for _ in range(2):
        state, _ = step(state, batch())
    state.opt_state.hyperparams["learning_rate"] = 1e-4
    if sharded:
        restored = restore_sharded(save_sharded(tmp_path / "ckpt", state), like=fresh())
    else:
        restored = ckpt.restore(ckpt.save(tmp_path / "a.ckpt", state), like=fresh())
    assert torch.equal(restored.opt_state.hyperparams["learning_rate"], torch.tensor(1e-4))
    for _ in range(3):  # the reference: the run that was never saved
        state, _ = step(state, batch())
        restored, _ = step(restored, batch())
    assert_trees_equal(restored.params, state.params)


@pytest.mark.parametrize("sharded", [False, True])
def test_a_numpy_number_assigned_as_a_rate_saves_and_restores_as_a_python_number(tmp_path, sharded):
    # hyperparams["learning_rate"] = np.float32(...) is taken by the optimizer; fnlit.save and save_sharded refused
    # the state (a NumPy number is not a JSON value) where they take the Python number.
    np = pytest.importorskip("numpy")
    model = mlp()
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-3), seed=0)
    state.opt_state.hyperparams["learning_rate"] = np.float32(0.25)
    like = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-3), seed=0)
    if sharded:
        restored = restore_sharded(save_sharded(tmp_path / "ckpt", state), like=like)
    else:
        restored = ckpt.restore(ckpt.save(tmp_path / "a.ckpt", state), like=like)
    assert torch.equal(restored.opt_state.hyperparams["learning_rate"], torch.tensor(0.25))


def test_a_float64_state_restores_its_float64_rates_exactly(tmp_path):
    # The rates of a float64 model were float32 tensors; a rate assigned as a number restored as float32 too.
    model = nn.Linear(3, 2).double()
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1 / 3), seed=0)
    restored = ckpt.restore(ckpt.save(tmp_path / "a.ckpt", state), like=state)
    assert torch.equal(restored.opt_state.hyperparams["learning_rate"], torch.tensor(1 / 3, dtype=torch.float64))
    state.opt_state.hyperparams["learning_rate"] = 0.1
    like = fnlit.TrainState.create(model, fnlit.optim.adamw(1 / 3), seed=0)
    restored = ckpt.restore(ckpt.save(tmp_path / "b.ckpt", state), like=like)
    assert torch.equal(restored.opt_state.hyperparams["learning_rate"], torch.tensor(0.1, dtype=torch.float64))


def test_a_sharded_checkpoint_keeps_number_leaves_exactly_in_their_own_type(tmp_path):
    # Numbers were refused, then written as float32 tensors (an int counter 2**24 + 1 came back 16777216.0):
    # they are written to fnlit.json as they are, and restored in the form `like` holds.
    tree = {"w": torch.ones(2), "count": 2**24 + 1, "lr": 1e-4}
    restored = restore_sharded(save_sharded(tmp_path / "a", tree), like={"w": torch.zeros(2), "count": 0, "lr": 0.5})
    assert restored["count"] == 2**24 + 1 and type(restored["count"]) is int and restored["lr"] == 1e-4
    state = fnlit.TrainState.create(nn.Linear(2, 1), fnlit.optim.adamw(1e-3, weight_decay=0.1), seed=0)
    state.opt_state.hyperparams["weight_decay"] = 0  # an int, as update() accepts it
    like = fnlit.TrainState.create(nn.Linear(2, 1), fnlit.optim.adamw(1e-3, weight_decay=0.1), seed=0)
    restored = restore_sharded(save_sharded(tmp_path / "b", state), like=like)
    assert torch.equal(restored.opt_state.hyperparams["weight_decay"], torch.tensor(0.0))  # like's form
    with pytest.raises(ValueError, match=r"at count the checkpoint .* holds the number 16777217, but `like` has a torch.float32 tensor of shape \(3, 2\)"):
        restore_sharded(tmp_path / "a", like={"w": torch.zeros(2), "count": torch.zeros(3, 2), "lr": 0.5})
    with pytest.raises(ValueError, match=r"holds the number 16777217, but `like` has a torch.int64 tensor of shape \(\)"):
        restore_sharded(tmp_path / "a", like={"w": torch.zeros(2), "count": torch.tensor(0), "lr": 0.5})
    with pytest.raises(ValueError, match=r"it has \['count'\], which `like` lacks"):  # (was dropped silently)
        restore_sharded(tmp_path / "a", like={"w": torch.zeros(2), "lr": 0.5})
    with pytest.raises(ValueError, match=r"it lacks \['x'\]"):  # (was a bare KeyError)
        restore_sharded(tmp_path / "a", like={"w": torch.zeros(2), "count": 0, "lr": 0.5, "x": 1.0})


@pytest.mark.parametrize("sharded", [False, True])
def test_two_leaves_with_the_same_path_text_are_refused_before_anything_is_written(tmp_path, sharded):
    # {"a": {"b": x}, "a['b']": y}: both leaves read a['b']; fnlit.save kept one tensor, and restore then called
    # the file corrupt.
    state = {"a": {"b": torch.ones(2)}, "a['b']": torch.full((2,), 5.0)}
    who = "save_sharded" if sharded else "fnlit.save"
    with pytest.raises(ValueError, match=rf"{who} keys each leaf by its path, and two leaves of the state have the "
                       r"path a\['b'\]: .* nothing was written: rename the key"):
        save_sharded(tmp_path / "s", state) if sharded else ckpt.save(tmp_path / "a.ckpt", state)
    assert list(tmp_path.iterdir()) == []


def test_every_rank_refuses_a_state_with_a_repeated_path_in_save_and_checkpointer_save(tmp_path):
    # Only rank 0 checked the paths (as it encoded the file): the other ranks went on into their next collective
    # and waited there. The reference: the error fnlit.save gives in one process.
    from _dist_workers import repeated_path_state, save_with_a_repeated_path

    with pytest.raises(ValueError, match=r"two leaves of the state have the path \[1\]\.1\.5") as want:
        ckpt.save(tmp_path / "one.ckpt", repeated_path_state())
    ranks = fnlit.distributed.launch(save_with_a_repeated_path, 2, str(tmp_path), timeout=120, collective_timeout=20)
    assert ranks == [[str(want.value)] * 2] * 2
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_sharded_checkpoint_restores_a_bool_leaf_as_fnlit_restore_does(tmp_path):
    # save_sharded wrote a bool leaf (a flag in the state), restore_sharded refused the same structure.
    tree, like = {"w": torch.ones(2), "flag": True}, {"w": torch.zeros(2), "flag": False}
    want = ckpt.restore(ckpt.save(tmp_path / "a.ckpt", tree), like=like)  # the reference
    restored = restore_sharded(save_sharded(tmp_path / "s", tree), like=like)
    assert restored["flag"] is True and want["flag"] is True and torch.equal(restored["w"], want["w"])
    save_sharded(tmp_path / "n", {"w": torch.ones(2), "flag": 1})
    # A number where `like` has a bool is refused here; fnlit.restore is laxer there (it returns the 1).
    with pytest.raises(ValueError, match=r"at flag the checkpoint .* holds the number 1, but `like` has False"):
        restore_sharded(tmp_path / "n", like=like)


@pytest.mark.parametrize("shape", [(), (3,), (0,)])
def test_a_sharded_checkpoint_refuses_a_bool_where_like_has_a_float_tensor_as_fnlit_restore_does(tmp_path, shape):
    # A saved flag took the place of a rate (a 0-d or an ensemble's (n,) float tensor): restore_sharded returned True.
    tree, like = {"w": torch.ones(2), "x": True}, {"w": torch.zeros(2), "x": torch.zeros(shape)}
    with pytest.raises(ValueError, match=r"at x: expected tensor .* got bool True"):  # the reference
        ckpt.restore(ckpt.save(tmp_path / "a.ckpt", tree), like=like)
    with pytest.raises(ValueError, match=rf"at x the checkpoint .* holds the number True, but `like` has a "
                       rf"torch.float32 tensor of shape {re.escape(str(shape))}"):
        restore_sharded(save_sharded(tmp_path / "s", tree), like=like)


def test_a_sharded_ensemble_checkpoint_restores_a_rate_saved_as_a_number_or_as_its_stacked_tensor(tmp_path):
    # An ensemble's rate is an (n,) tensor; assigned as a number (optax's idiom) it was refused by restore_sharded,
    # and a saved (n,) rate where `like` held the number was reported missing. fnlit.restore takes both.
    def fresh(lr=None):
        ens = fnlit.ensemble_states(lambda: nn.Linear(3, 2), fnlit.optim.adam(1e-3), seeds=[0, 1, 2])
        if lr is not None:
            ens.opt_state.hyperparams["learning_rate"] = lr
        return ens

    for i, (saved, like) in enumerate([(fresh(0.01), fresh()), (fresh(), fresh(0.5))]):
        want = ckpt.restore(ckpt.save(tmp_path / f"{i}.ckpt", saved), like=like)  # the reference
        got = restore_sharded(save_sharded(tmp_path / f"s{i}", saved), like=like)
        lr, want_lr = got.opt_state.hyperparams["learning_rate"], want.opt_state.hyperparams["learning_rate"]
        assert type(lr) is type(want_lr) and (torch.equal(lr, want_lr) if i == 0 else lr == want_lr)
        assert_trees_equal(got.params, want.params)
    saved = fresh(torch.tensor([1e-3, 1e-2, 1e-1]))  # members with their own rates: no one number holds them
    with pytest.raises(ValueError, match=r"at opt_state\[3\]\['learning_rate'\] the checkpoint .* holds a "
                       r"torch.float32 tensor of shape \(3,\) whose values differ, but `like` has the number 0.5"):
        restore_sharded(save_sharded(tmp_path / "s2", saved), like=fresh(0.5))


@pytest.mark.parametrize("x", [torch.ones(3, dtype=torch.long), torch.tensor(True), torch.ones(3, 2)],
                         ids=["int (3,)", "bool ()", "float (3, 2)"])
def test_a_sharded_checkpoint_refuses_a_tensor_no_number_stands_for_before_reading_it(tmp_path, x):
    # Where `like` has a number, an int or bool 0-d/(n,) tensor was refused only after every file was read, and a
    # float (3, 2) one was reported missing from the checkpoint.
    tree, like = {"w": torch.ones(2), "x": x}, {"w": torch.zeros(2), "x": 1.0}
    with pytest.raises(ValueError, match=r"at x: "):  # the reference
        ckpt.restore(ckpt.save(tmp_path / "a.ckpt", tree), like=like)
    path = save_sharded(tmp_path / "s", tree)
    (path / "__0_0.distcp").unlink()  # (read first, it would be a CheckpointError naming the missing file)
    with pytest.raises(ValueError, match=rf"at x the checkpoint .* holds a {re.escape(str(x.dtype))} tensor of shape "
                       rf"{re.escape(str(tuple(x.shape)))}, but `like` has the number 1.0"):
        restore_sharded(path, like=like)


def test_a_sharded_checkpoint_of_a_float64_model_with_float32_rates_restores_into_float64_rates(tmp_path):
    # Before float64 models held float64 rates, their checkpoints held float32 ones; restore_sharded refused them
    # ("holds ... dtype float32, but `like` has ... float64"), where fnlit.restore casts.
    model = nn.Linear(3, 2).double()
    like = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-3, weight_decay=0.1), seed=0)
    assert like.opt_state.hyperparams["learning_rate"].dtype is torch.float64
    old = like.replace(opt_state=like.opt_state._replace(hyperparams={
        "learning_rate": torch.tensor(1e-3), "weight_decay": torch.tensor(0.1)}))  # what an older fnlit saved
    restored = restore_sharded(save_sharded(tmp_path / "old", old), like=like)
    for k, v in {"learning_rate": 1e-3, "weight_decay": 0.1}.items():
        assert torch.equal(restored.opt_state.hyperparams[k], torch.tensor(v, dtype=torch.float32).double())
    assert torch.equal(restored.params["weight"], like.params["weight"])
    # a param's dtype is no rate: still refused
    with pytest.raises(ValueError, match=r"at params\['(weight|bias)'\] the checkpoint .* dtype float32, but `like` has .* float64"):
        restore_sharded(save_sharded(tmp_path / "f32", fnlit.TrainState.create(nn.Linear(3, 2), fnlit.optim.adamw(1e-3), seed=0)),
                        like=fnlit.TrainState.create(model, fnlit.optim.adamw(1e-3), seed=0))


def test_ckpt_path_naming_a_sharded_checkpoint_or_a_folder_of_foreign_files_is_not_silently_a_fresh_run(tmp_path):
    # fit(ckpt_path=<a save_sharded folder>) found no step=N.ckpt there and trained from step 0, saying nothing.
    step = lambda s, b: (s.replace(step=s.step + 1), {"loss": b.mean()})  # noqa: E731
    data = [torch.zeros(1)] * 3
    fresh = lambda: fnlit.TrainState.create(nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)  # noqa: E731
    trained = fnlit.fit(step, fresh(), data, max_steps=2, progress=False)
    folder = save_sharded(tmp_path / "sharded", trained)
    with pytest.raises(ckpt.CheckpointError, match=r"is a sharded checkpoint \(fnlit.save_sharded\).*fnlit.restore_sharded"):
        fnlit.fit(step, fresh(), data, max_steps=3, progress=False, checkpoint=ckpt.Checkpointer(tmp_path / "ck"),
                  ckpt_path=folder)  # fmt: skip
    with pytest.raises(IsADirectoryError, match=r"got the folder .*fnlit.restore_sharded"):
        ckpt.restore(folder, like=fresh())
    lightning = tmp_path / "lightning"
    lightning.mkdir()
    (lightning / "epoch=0-step=5.ckpt").write_bytes(b"not ours")
    with pytest.warns(UserWarning, match=r"holds no fnlit checkpoint \(step=<N>.ckpt\) but other .ckpt files"):
        state = fnlit.fit(step, fresh(), data, max_steps=1, progress=False,
                          checkpoint=ckpt.Checkpointer(tmp_path / "ck2"), ckpt_path=lightning)  # fmt: skip
    assert int(state.step) == 1


def test_position_tensors_under_colliding_key_names_and_a_state_key_starting_with_at_position_round_trip(tmp_path):
    # The position's tensors were stored under paths built from their keys: {"a.b": x} beside {"a": {"b": y}}
    # shared one (x came back as y); and a state key starting with "@position" was taken for one of them.
    state = {"@position_ids": torch.arange(4), "w": torch.ones(2)}
    position = {"epoch": 0, "batch": 1, "seed": 0, "callbacks": {"X": {"a.b": torch.zeros(2), "a": {"b": torch.ones(2)}}}}
    path = ckpt.save(tmp_path / "p.ckpt", state, position=position)
    restored, back = ckpt.Checkpointer(tmp_path / "unused").restore(path, like={"@position_ids": torch.zeros(4, dtype=torch.int64), "w": torch.zeros(2)})
    assert torch.equal(restored["@position_ids"], torch.arange(4)) and torch.equal(restored["w"], torch.ones(2))
    x = back["callbacks"]["X"]
    assert torch.equal(x["a.b"], torch.zeros(2)) and torch.equal(x["a"]["b"], torch.ones(2))


@pytest.mark.parametrize("leaf, kind", [
    (lambda: torch.ones(3).to_sparse(), "sparse_coo"),
    (lambda: torch.ones(3, device="meta"), "meta"),
    (lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged), "nested"),
])
def test_save_refuses_a_tensor_without_dense_data_naming_its_path(tmp_path, leaf, kind):
    # torch's own errors ("Cannot access storage of SparseTensorImpl", "Cannot copy out of meta tensor") named nothing.
    with pytest.raises(TypeError, match=rf"fnlit.save stores dense tensors with data, got a {kind} tensor at a\b"):
        ckpt.save(tmp_path / "x.ckpt", {"a": leaf(), "w": torch.ones(2)})
    assert not list(tmp_path.iterdir())  # nothing written


def test_stale_temporaries_are_told_by_their_lock_and_age_not_only_their_pid(tmp_path):
    # By pid alone: a temp of a live write in another pid namespace (or host) looked dead and was removed (even by
    # best_path), and a temp whose pid was reused (a container restarted with the same pid) leaked forever.
    import fcntl
    import time as _time

    from fnlit._checkpoint_io import remove_stale_temps

    live = tmp_path / ".step=00000009.ckpt.tmp-999999-0badf00d"  # pid 999999: gone here
    live.write_bytes(b"partial")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as atomic_write holds its temporary file while writing
        assert remove_stale_temps(tmp_path) == [] and live.exists()
        ckpt.Checkpointer(tmp_path, monitor="val/loss").best_path  # reading a folder never removes a live write
        assert live.exists()
    finally:
        os.close(fd)
    assert remove_stale_temps(tmp_path) == [live]  # released, its writer gone: stale
    leaked = tmp_path / f".step=00000002.ckpt.tmp-{os.getpid()}-deadbeef"  # our own pid, reused
    leaked.write_bytes(b"x" * 10)
    assert remove_stale_temps(tmp_path) == []  # fresh: maybe a write of ours about to be locked
    old = _time.time() - 11 * 60
    os.utime(leaked, (old, old))
    assert remove_stale_temps(tmp_path) == [leaked]


def test_a_save_in_progress_survives_another_processs_cleanup_even_when_its_pid_looks_dead(tmp_path, monkeypatch):
    # The writer holds its temporary file locked until the rename: a scan from another process (another pid
    # namespace, where the writer's pid looks dead) must leave it, and the save must succeed.
    import fnlit._checkpoint_io as io

    monkeypatch.setattr(io, "_temp_name", lambda path: path.with_name(f".{path.name}.tmp-999999-0badf00d"))
    scan = "from pathlib import Path; from fnlit._checkpoint_io import remove_stale_temps; print(len(remove_stale_temps(Path(%r))))"
    scanned = []

    def write(f):
        f.write(b"first half ")
        done = subprocess.run([sys.executable, "-c", scan % str(tmp_path)], capture_output=True, text=True, timeout=120)
        scanned.append(done.stdout.strip() or done.stderr[-300:])
        f.write(b"second half")

    path = io.atomic_write(tmp_path / "x.ckpt", write)
    assert scanned == ["0"] and path.read_bytes() == b"first half second half"


def test_a_float_saved_where_like_holds_an_int_is_restored_whole(tmp_path):
    # A rate assigned as an int (hyperparams["learning_rate"] = 1) and later changed to 0.5: restoring into a like
    # that still held the int gave int(0.5) == 0, silently.
    path = fnlit.save(tmp_path / "a.ckpt", {"lr": torch.tensor(0.5), "n": torch.tensor([0.25, 0.25]), "k": torch.tensor(3.0)})
    assert fnlit.restore(path, like={"lr": 1, "n": 2, "k": 7}) == {"lr": 0.5, "n": 0.25, "k": 3}
    path = fnlit.save(tmp_path / "b.ckpt", {"best": torch.tensor(math.inf), "nan": torch.tensor([math.nan, math.nan])})
    got = fnlit.restore(path, like={"best": 0, "nan": 1.0})  # an int cannot hold inf (OverflowError before)
    assert got["best"] == math.inf and math.isnan(got["nan"])


def test_load_module_on_a_file_not_saved_from_a_train_state_says_so(tmp_path):
    # It said the module was missing ['weight', 'bias'], which the file holds.
    m = nn.Linear(2, 1)
    for i, tree in enumerate((dict(m.state_dict()), {"params": dict(m.named_parameters()), "buffers": {}})):
        path = fnlit.save(tmp_path / f"{i}.ckpt", {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in tree.items()})
        with pytest.raises(ckpt.CheckpointError, match=r"holds no TrainState params/buffers .*fnlit.restore"):
            fnlit.load_module(path, nn.Linear(2, 1))
    state = fnlit.TrainState.create(m, fnlit.optim.sgd(0.1), seed=0)  # the reference: a TrainState's file loads
    assert torch.equal(fnlit.load_module(fnlit.save(tmp_path / "s.ckpt", state), nn.Linear(2, 1)).weight, m.weight)


def test_checkpointer_refuses_keep_best_without_a_monitor_as_lightning(tmp_path):
    # Accepted, it kept no best at all (only the last); Lightning: "No quantity for top_k to track".
    with pytest.raises(ValueError, match=r"keep_best=3 but no monitor.*keep_last=N"):
        ckpt.Checkpointer(tmp_path, keep_best=3)
    for keep in (1, 0):  # the default and none need no monitor
        ckpt.Checkpointer(tmp_path, keep_best=keep)


def test_keep_best_none_without_a_monitor_is_refused_and_its_lightning_equivalent_keeps_every_epoch(tmp_path):
    # keep_best=None was documented as Lightning's save_top_k=-1, but without a monitor it saved nothing per
    # validation (3 epochs: only last.ckpt and the final step=6). Lightning's ModelCheckpoint(save_top_k=-1) without
    # monitor saves at every epoch's end and keeps them all: epoch=0-step=2, epoch=1-step=4, epoch=2-step=6.
    with pytest.raises(ValueError, match=r"keep_best=None .*but no monitor.*every_n_epochs=1, keep_last=None"):
        ckpt.Checkpointer(tmp_path, keep_best=None)
    ckpt.Checkpointer(tmp_path, monitor="val/loss", keep_best=None)  # with a monitor: every validation's

    def step(state, batch):
        return state.replace(step=state.step + 1), {"loss": torch.tensor(0.0)}

    state = fnlit.TrainState.create(nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    fnlit.fit(step, state, [0, 1], max_epochs=3, val_data=[0], eval_step=lambda s, b: {"loss": torch.tensor(1.0)},
              num_sanity_val_steps=0, progress=False,
              checkpoint=ckpt.Checkpointer(tmp_path, every_n_epochs=1, keep_last=None, save_last=False))  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=00000002.ckpt", "step=00000004.ckpt", "step=00000006.ckpt"]


def test_checkpointer_saves_a_state_counting_steps_in_python_and_names_a_missing_step(tmp_path):
    # An int step was blamed on ensembles ("expected one step, got 5"); a state without one too ("got None").
    from typing import NamedTuple

    class S(NamedTuple):
        step: int
        params: dict

    path = ckpt.Checkpointer(tmp_path).save(S(5, {"w": torch.ones(2)}))
    assert path.name == "step=00000005.ckpt"
    with pytest.raises(TypeError, match=r"by state.step, but this dict has no step"):
        ckpt.Checkpointer(tmp_path / "b").save({"w": torch.ones(2)})


@pytest.mark.parametrize("saving", [dict(monitor="val/loss"), dict(every_n_steps=4), dict(monitor="val/loss", every_n_steps=4)])
def test_a_best_saved_at_an_epochs_end_is_saved_again_after_it_for_every_n_epochs(tmp_path, saving):
    # Checkpointer(monitor=..., every_n_epochs=1), Lightning's usual setup: the epoch's last validation saved its best
    # and the epoch-end save was skipped as "already saved", so the file stood before the epoch's end, and a resume
    # after a crash in the next epoch ran that epoch's end again. Reference: each epoch end once, as one run.
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    model = nn.Linear(4, 1)
    step = fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]))
    ev = lambda state, b: {"loss": F.mse_loss(fnlit.apply(model, state.params, state.buffers, b[0])[0], b[1])}  # noqa: E731
    seen, crashed = [], []

    class Ends(fnlit.callbacks.Callback):
        def on_epoch_end(self, state, info):
            seen.append(info["epoch"])

        def on_step(self, state, metrics):
            if int(state.step) == 6 and not crashed:  # in epoch 1, after epoch 0's best at its end
                crashed.append(True)
                raise RuntimeError("crash")

    def run(**kw):
        return fnlit.fit(step, fnlit.TrainState.create(model, fnlit.optim.sgd(0.01), seed=0),
                         fnlit.data.ArrayLoader(x, y, batch_size=8), val_data=[(x, y)], eval_step=ev, max_epochs=3,
                         checkpoint=ckpt.Checkpointer(tmp_path, every_n_epochs=1, **saving), callbacks=[Ends()],
                         progress=False, **kw)  # fmt: skip

    with pytest.raises(RuntimeError, match="crash"):
        run()
    run(ckpt_path="last")
    assert seen == [0, 1, 2]


def test_checkpointer_save_of_a_donated_state_gives_the_donation_error_as_save_does(tmp_path):
    # It said "this TrainState has step=<donated>: ... or use fnlit.save(path, state)", which raises the real cause.
    model = nn.Linear(3, 2)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    fnlit.donating(fnlit.train_step(model, lambda m, b: m(b).sum()))(state, torch.randn(4, 3))
    donated = r"This TrainState was donated to a step \(fnlit.donating\)"
    with pytest.raises(RuntimeError, match=donated):
        ckpt.save(tmp_path / "a.ckpt", state)
    with pytest.raises(RuntimeError, match=donated):
        ckpt.Checkpointer(tmp_path / "ckpts").save(state)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_save_and_restore_sharded_of_a_donated_state_give_the_donation_error(tmp_path):
    # Both said "save_sharded expected a state whose leaves are tensors (or numbers), got Donated at step".
    model = nn.Linear(3, 2)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    d = save_sharded(tmp_path / "ckpt", state)
    fnlit.donating(fnlit.train_step(model, lambda m, b: m(b).sum()))(state, torch.randn(4, 3))
    with pytest.raises(RuntimeError, match=r"was donated to a step \(fnlit.donating\)"):
        save_sharded(tmp_path / "again", state)
    with pytest.raises(RuntimeError, match=r"was donated to a step \(fnlit.donating\)"):
        restore_sharded(d, like=state)
    assert not (tmp_path / "again").exists()


def test_restore_sharded_names_itself_for_a_like_leaf_that_is_neither_tensor_nor_number(tmp_path):
    d = save_sharded(tmp_path / "ckpt", {"w": torch.zeros(2)})
    with pytest.raises(TypeError, match=r"^restore_sharded expected like to be a state whose leaves .* got str at"):
        restore_sharded(d, like={"w": torch.zeros(2), "name": "x"})
    with pytest.raises(TypeError, match=r"^save_sharded expected a state whose leaves .* got str at .*metadata"):
        save_sharded(tmp_path / "other", {"w": torch.zeros(2), "name": "x"})


def test_checkpointer_expands_home_and_keeps_a_relative_folder_where_it_was_made(tmp_path, monkeypatch):
    # Checkpointer("~/ckpts") wrote into a folder literally named "./~/ckpts"; a relative folder followed every later
    # os.chdir. Lightning's ModelCheckpoint takes os.path.realpath(os.path.expanduser(dirpath)) at construction.
    home, work, elsewhere = tmp_path / "home", tmp_path / "work", tmp_path / "elsewhere"
    for d in (home, work, elsewhere):
        d.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    state = fnlit.TrainState.create(nn.Linear(2, 1), fnlit.optim.sgd(0.1), seed=0)
    ck = ckpt.Checkpointer("~/ckpts")
    ck.save(state)
    assert (home / "ckpts" / "step=00000000.ckpt").is_file() and not (work / "~").exists()
    rel = ckpt.Checkpointer("runs/a")
    monkeypatch.chdir(elsewhere)
    rel.save(state)
    assert (work / "runs" / "a" / "step=00000000.ckpt").is_file() and not (elsewhere / "runs").exists()
    assert rel.directory == work / "runs" / "a"


def test_ckpt_path_best_resumes_from_the_best_checkpoint_and_says_when_there_is_none(tmp_path):
    # fit(ckpt_path="best") raised FileNotFoundError("no checkpoint file at best"); Lightning resolves "best" to the
    # best model path. Validation values 5, 1, 4 after epochs 1-3 (4 steps each): the best is epoch 2's, step 8.
    model = nn.Linear(4, 1)
    step = fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]))
    data = fnlit.data.ArrayLoader(torch.randn(16, 4), torch.randn(16, 1), batch_size=4)
    fresh = lambda: fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)  # noqa: E731

    def scripted(values):
        it = iter(values)
        return lambda state, b: {"loss": torch.tensor(float(next(it)))}

    kw = dict(val_data=[(torch.randn(2, 4), torch.randn(2, 1))], num_sanity_val_steps=0, progress=False)
    after_two = fnlit.fit(step, fresh(), data, max_epochs=2, eval_step=scripted([5, 1]), **kw)  # the best's weights
    fnlit.fit(step, fresh(), data, max_epochs=3, eval_step=scripted([5, 1, 4]), checkpoint=ckpt.Checkpointer(tmp_path, monitor="val/loss"), **kw)
    ck = ckpt.Checkpointer(tmp_path, monitor="val/loss")  # a new process: "best" read from the folder
    restored, position = ck.restore("best", like=fresh())
    assert ck.restored_from == tmp_path / "step=00000008.ckpt" and int(restored.step) == 8
    assert_trees_equal(restored.params, after_two.params)
    end = fnlit.fit(step, fresh(), data, max_epochs=3, eval_step=scripted([7]), checkpoint=ck, ckpt_path="best", **kw)
    assert int(end.step) == 12  # the third epoch again, from the best
    with pytest.raises(ckpt.CheckpointError, match=r"ckpt_path='best' .* this Checkpointer has no monitor"):
        ckpt.Checkpointer(tmp_path).restore("best", like=fresh())
    with pytest.raises(ckpt.CheckpointError, match=r"keep_best=0"):
        ckpt.Checkpointer(tmp_path, monitor="val/loss", keep_best=0).restore("best", like=fresh())
    with pytest.raises(ckpt.CheckpointError, match=r"ckpt_path='best': .*empty holds no checkpoint with a 'val/loss' value yet"):
        fnlit.fit(step, fresh(), data, max_epochs=1, eval_step=scripted([1]),
                  checkpoint=ckpt.Checkpointer(tmp_path / "empty", monitor="val/loss"), ckpt_path="best", **kw)  # fmt: skip


def test_a_last_ckpt_fnlit_did_not_write_is_never_replaced_and_other_ckpt_files_are_warned_of(tmp_path):
    # A fresh run replaced a Lightning last.ckpt silently, warned of nothing (it counted only step=N.ckpt files), and
    # restore called the foreign file "corrupt". Lightning never overwrites a last.ckpt it did not write (it writes
    # last-v1.ckpt) and warns of a folder that is not empty.
    lightning = {"epoch": 0, "global_step": 4, "state_dict": {"w": torch.ones(2)}, "pytorch-lightning_version": "2.4.0"}
    torch.save(lightning, tmp_path / "last.ckpt")
    torch.save(lightning, tmp_path / "epoch=0-step=4.ckpt")
    step = lambda s, b: (s.replace(step=s.step + 1), {"loss": b.mean()})  # noqa: E731
    state = fnlit.TrainState.create(nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    run = lambda ck, **kw: fnlit.fit(step, state, [torch.zeros(1)] * 2, max_epochs=1, checkpoint=ck, progress=False, **kw)  # noqa: E731
    with pytest.raises(ckpt.CheckpointError, match=r"will not replace .*last\.ckpt: it is not an fnlit checkpoint.*Move that file away, or give the Checkpointer another directory"):
        run(ckpt.Checkpointer(tmp_path, every_n_epochs=1))
    with pytest.raises(ckpt.CheckpointError, match=r"will not replace .*last\.ckpt"):
        ckpt.Checkpointer(tmp_path).save(state)
    with pytest.raises(ckpt.CheckpointError, match=r"can be read \(1 not an fnlit checkpoint\)"), pytest.warns(UserWarning, match="Skipping"):
        run(ckpt.Checkpointer(tmp_path), ckpt_path="last")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]  # nothing written
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 4  # still Lightning's
    (tmp_path / "last.ckpt").unlink()  # moved away: the run saves, and warns of the foreign file it keeps
    with pytest.warns(UserWarning, match=r"already holds 1 \.ckpt file\(s\) fnlit did not write \(e\.g\. epoch=0-step=4\.ckpt\)"):
        run(ckpt.Checkpointer(tmp_path, every_n_epochs=1))
    assert (tmp_path / "last.ckpt").samefile(tmp_path / "step=00000002.ckpt") and (tmp_path / "epoch=0-step=4.ckpt").is_file()
    run(ckpt.Checkpointer(tmp_path, every_n_epochs=1), ckpt_path="last")  # its own last.ckpt is replaced as before
    (tmp_path / "other").mkdir()
    torch.save(lightning, tmp_path / "other" / "last.ckpt")
    run(ckpt.Checkpointer(tmp_path / "other", every_n_epochs=1, save_last=False))  # last.ckpt untouched: no error
    assert torch.load(tmp_path / "other" / "last.ckpt", weights_only=True)["global_step"] == 4


def _scripted_validation_run(tmp_path):
    """``run(values, epochs, **fit_kw)``: a fit of 4-step epochs into tmp_path's Checkpointer(monitor="val/loss",
    keep_best=2, keep_last=1), its validation after each epoch giving the next of ``values``; returns the
    Checkpointer."""
    model = nn.Linear(4, 1)
    step = fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]))
    data = fnlit.data.ArrayLoader(torch.randn(16, 4), torch.randn(16, 1), batch_size=4)

    def run(values, epochs, **kw):
        it = iter(values)
        ck = ckpt.Checkpointer(tmp_path, monitor="val/loss", keep_best=2, keep_last=1)
        fnlit.fit(step, fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0), data,
                  val_data=[(torch.randn(2, 4), torch.randn(2, 1))], num_sanity_val_steps=0,
                  eval_step=lambda s, b: {"loss": torch.tensor(float(next(it)))}, max_epochs=epochs, checkpoint=ck,
                  progress=False, **kw)  # fmt: skip
        return ck

    return run


def test_a_resume_from_an_earlier_file_does_not_rank_the_abandoned_later_checkpoints_as_its_best(tmp_path):
    # After fit(ckpt_path=<step 4's file>) in a folder where the run went on to step 16, step 16 (from the history the
    # resume abandoned) stayed this run's best_path and held a keep_best slot forever. Lightning restores best_k_models
    # from the file it resumes. Validation values after epochs 1-4 (4 steps each): 1, 5, 5, 0.5; then, branched
    # from step 4: 3 (step 8), 3 (step 12). By hand: the branch's bests are step 4 (1) and step 8 (3).
    run = _scripted_validation_run(tmp_path)

    assert run([1, 5, 5, 0.5], 4).best_path.name == "step=00000016.ckpt"
    branch = run([3, 3], 3, ckpt_path=tmp_path / "step=00000004.ckpt")
    assert branch.best_path.name == "step=00000004.ckpt"
    files = {p.name: ckpt.read_info(p) for p in tmp_path.glob("step=*.ckpt")}
    assert {n: (i.step, i.metrics["val/loss"]) for n, i in files.items()} == {
        "step=00000004.ckpt": (4, 1.0), "step=00000008.ckpt": (8, 3.0),  # the branch's two bests
        "step=00000012.ckpt": (12, 3.0),  # its last (a tie with step 8 is no improvement)
        "step=00000016.ckpt": (16, 0.5),  # the abandoned history's: kept, not removed
    }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy format"])
def test_a_foreign_last_ckpt_in_torch_legacy_format_is_not_replaced_either(tmp_path, zip_format):
    # torch.load(mmap=True) refuses a file that is not a zip, and the legacy-format file was judged unreadable
    # (not foreign): the Checkpointer replaced it. torch.load without mmap reads it as a plain dict.
    lightning = {"epoch": 0, "global_step": 4, "state_dict": {"w": torch.ones(2)}}
    torch.save(lightning, tmp_path / "last.ckpt", _use_new_zipfile_serialization=zip_format)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 4  # the reference: torch reads it
    data = (tmp_path / "last.ckpt").read_bytes()
    state = fnlit.TrainState.create(nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    with pytest.raises(ckpt.CheckpointError, match=r"will not replace .*last\.ckpt: it is not an fnlit checkpoint"):
        ckpt.Checkpointer(tmp_path).save(state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert (tmp_path / "last.ckpt").read_bytes() == data
    with pytest.raises(ckpt.CheckpointError, match=r"last\.ckpt is not an fnlit checkpoint \(no fnlit header\)"):
        ckpt.read_info(tmp_path / "last.ckpt")


@pytest.mark.parametrize(("content", "match"), [
    (b"", r"empty\.ckpt: the file is truncated or corrupt \(EOFError\)"),
    (b"hello\n", r"empty\.ckpt: the file is truncated or corrupt"),
    (pickle.dumps({"a": 1}), r"empty\.ckpt: it is not a checkpoint file or it is corrupt"),
], ids=["empty", "text", "plain pickle"])
def test_read_info_of_a_file_that_is_not_a_zip_says_what_restore_says(tmp_path, content, match):
    path = tmp_path / "empty.ckpt"
    path.write_bytes(content)
    with pytest.raises(ckpt.CheckpointError, match=match) as info:
        ckpt.read_info(path)
    assert "mmap" not in str(info.value)  # (torch's advice to save with _use_new_zipfile_serialization=True)
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.restore(path, fnlit.TrainState.create(nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0))


def test_a_resume_into_a_folder_with_a_foreign_last_ckpt_raises_before_any_training(tmp_path):
    # start() refused another tool's last.ckpt before training, but a resume (restore, not start) ran until its first
    # save, then raised: the whole stretch trained before it was lost. Both resumes now raise before any step.
    lightning = {"epoch": 0, "global_step": 4, "state_dict": {"w": torch.ones(2)}, "pytorch-lightning_version": "2.4.0"}
    steps = [0]

    def step(s, b):
        steps[0] += 1
        return s.replace(step=s.step + 1), {"loss": b.mean()}

    state = fnlit.TrainState.create(nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    run = lambda ck, n, **kw: fnlit.fit(step, state, [torch.zeros(1)] * n, max_epochs=2, checkpoint=ck, progress=False, **kw)  # noqa: E731
    run(ckpt.Checkpointer(tmp_path / "src", every_n_epochs=1, keep_last=None), 2)  # fnlit's step=2 and step=4, last.ckpt -> step 4
    assert steps[0] == 4
    steps[0] = 0
    (tmp_path / "dst").mkdir()
    torch.save(lightning, tmp_path / "dst" / "last.ckpt")
    with pytest.raises(ckpt.CheckpointError, match=r"will not replace .*dst/last\.ckpt: it is not an fnlit checkpoint"):
        run(ckpt.Checkpointer(tmp_path / "dst", every_n_epochs=1), 50, ckpt_path=tmp_path / "src" / "step=00000002.ckpt")
    assert steps[0] == 0 and sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["last.ckpt"]
    (tmp_path / "src" / "last.ckpt").unlink()  # fnlit's link replaced by Lightning's (newer: 'last' skips it)
    torch.save(lightning, tmp_path / "src" / "last.ckpt")
    with pytest.raises(ckpt.CheckpointError, match=r"will not replace .*src/last\.ckpt"), pytest.warns(UserWarning, match="Skipping"):
        run(ckpt.Checkpointer(tmp_path / "src", every_n_epochs=1), 50, ckpt_path="last")
    assert steps[0] == 0 and sorted(p.name for p in (tmp_path / "src").iterdir()) == ["last.ckpt", "step=00000002.ckpt", "step=00000004.ckpt"]
    assert torch.load(tmp_path / "src" / "last.ckpt", weights_only=True)["global_step"] == 4  # still Lightning's
    with pytest.warns(UserWarning, match="Skipping"):  # save_last=False: Lightning's last.ckpt is not in the way
        out = run(ckpt.Checkpointer(tmp_path / "src", every_n_epochs=1, save_last=False), 2, ckpt_path="last")
    assert int(out.step) == 4  # (step 4's file stands after epoch 2 of max_epochs=2: nothing left to train)


def test_a_branch_resumed_again_from_last_still_does_not_rank_the_abandoned_history(tmp_path):
    # The abandoned history (after a resume from an earlier file) was set aside for that one resume only: resuming the
    # branch again from "last" (the restart after a preemption) ranked the abandoned step 16 as its best again and
    # removed the branch's real second best. Lightning restores best_k_models from the last.ckpt it resumes.
    # By hand (keep_best=2, keep_last=1, validation after each 4-step epoch): run A, steps 4/8/12/16 at 1, 5, 5, 0.5
    # keeps 4 and 16. Branch from step 4: step 8 at 3 -> bests 4, 8. Resumed from 'last' (its step 8): step 12 at 3
    # (a tie with step 8 is no improvement) -> bests 4 and 8, last 12; step 16 kept but not this run's.
    run = _scripted_validation_run(tmp_path)

    def files():
        return {p.name: (ckpt.read_info(p).step, ckpt.read_info(p).metrics["val/loss"]) for p in tmp_path.glob("step=*.ckpt")}

    assert run([1, 5, 5, 0.5], 4).best_path.name == "step=00000016.ckpt"
    assert files() == {"step=00000004.ckpt": (4, 1.0), "step=00000016.ckpt": (16, 0.5)}
    branch = run([3], 2, ckpt_path=tmp_path / "step=00000004.ckpt")
    assert branch.best_path.name == "step=00000004.ckpt"
    assert files() == {"step=00000004.ckpt": (4, 1.0), "step=00000008.ckpt": (8, 3.0), "step=00000016.ckpt": (16, 0.5)}
    again = run([3], 3, ckpt_path="last")
    assert again.restored_from.samefile(tmp_path / "step=00000008.ckpt")
    assert again.best_path.name == "step=00000004.ckpt"
    assert files() == {
        "step=00000004.ckpt": (4, 1.0), "step=00000008.ckpt": (8, 3.0),  # the branch's two bests
        "step=00000012.ckpt": (12, 3.0),  # its last
        "step=00000016.ckpt": (16, 0.5),  # the abandoned history's: kept, not ranked
    }
    assert (tmp_path / "last.ckpt").samefile(tmp_path / "step=00000012.ckpt")


def test_fit_builds_a_checkpoint_position_only_when_the_checkpointer_saves(tmp_path):
    # fit built the position for Checkpointer.on_step at every step -- every stateful callback's state_dict, and a
    # fresh copy of the log interval's metrics so far (a step's cost grew with the steps since the last log row) --
    # though on_step saves only every `every_n_steps`. Lightning's ModelCheckpoint asks callbacks for their state
    # only when it saves: so the count must not grow with the steps between saves.
    def state_dict_calls(n_steps, every, folder):
        calls = []

        class Counting(fnlit.callbacks.Callback):
            def state_dict(self):
                calls.append(None)
                return {"n": len(calls)}

            def load_state_dict(self, state):
                pass

        model = torch.nn.Linear(2, 1)
        state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
        step = fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]))
        data = fnlit.ArrayLoader(torch.randn(2 * n_steps, 2), torch.randn(2 * n_steps, 1), batch_size=2)
        saver = ckpt.Checkpointer(folder, every_n_steps=every, keep_last=None)
        fnlit.fit(step, state, data, max_epochs=1, progress=False, callbacks=[Counting()], checkpoint=saver,
                  log_every_n_steps=1000)
        assert len([p for p in folder.glob("step=*.ckpt")]) == 4
        return len(calls)

    assert state_dict_calls(20, 5, tmp_path / "a") == state_dict_calls(80, 20, tmp_path / "b")  # 4 saves each


def test_a_checkpointer_subclass_with_its_own_on_step_is_called_every_step(tmp_path):
    # fit asks a Checkpointer which steps its on_step saves (every_n_steps) to build positions only for those; a
    # subclass with a schedule of its own (here every 3rd step, with every_n_steps=None) was then never called.
    seen = []

    class Every3(ckpt.Checkpointer):
        def on_step(self, state, position):
            seen.append(int(state.step))
            if int(state.step) % 3 == 0:
                self.save(state, position)

    model = torch.nn.Linear(2, 1)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    step = fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]))
    data = fnlit.ArrayLoader(torch.randn(16, 2), torch.randn(16, 1), batch_size=2)
    fnlit.fit(step, state, data, max_epochs=1, progress=False,
              checkpoint=Every3(tmp_path, every_n_steps=None, keep_last=None))
    assert seen == list(range(1, 9))
    assert {"step=00000003.ckpt", "step=00000006.ckpt"} <= {p.name for p in tmp_path.glob("*.ckpt")}


@pytest.mark.parametrize("failing", ["last.ckpt", "fsync of the folder"])
def test_a_file_written_by_a_save_that_raised_is_ranked_and_removed_by_later_saves(tmp_path, monkeypatch, failing):
    # The step file is in the folder although save raised (last.ckpt's copy hit EIO, or the folder's fsync failed
    # after the rename): as Lightning's top-k counts every saved file, it is the best, and keep_last removes it.
    _, state = trained()
    ck = ckpt.Checkpointer(tmp_path, every_n_steps=4, keep_last=1, monitor="val", keep_best=1)
    ck.start(state)

    def validate(state, value):
        state = state.replace(step=state.step + 1)
        ck.on_validation(state, {"epoch": 0, "batch": int(state.step), "seed": 0}, {"val": value})
        ck.on_step(state, {"epoch": 0, "batch": int(state.step), "seed": 0})
        return state

    state = validate(state, 5.0)  # step 3: the best so far
    if failing == "last.ckpt":
        monkeypatch.setattr(ckpt, "link_or_copy", lambda src, dst: (_ for _ in ()).throw(
            ckpt.CheckpointError(f"could not write checkpoint {dst}: Input/output error (EIO)")))
        match = r"last\.ckpt: Input/output error"
    else:
        monkeypatch.setattr(fnlit._checkpoint_io, "fsync_dir", lambda d: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
        match = r"wrote checkpoint .*step=00000004\.ckpt, but could not fsync"
    with pytest.raises(ckpt.CheckpointError, match=match):
        validate(state, 1.0)  # step 4: the best; its file is written, then save raises
    monkeypatch.undo()
    state = state.replace(step=torch.tensor(4))  # the caller goes on
    state = validate(state, 3.0)  # step 5: worse than step 4's 1.0, not saved
    assert names(tmp_path) == ["last.ckpt", "step=00000003.ckpt", "step=00000004.ckpt"]
    assert ck.best_path == tmp_path / "step=00000004.ckpt"
    state = validate(validate(validate(state, 6.0), 7.0), 8.0)  # step 8: the periodic save; keep_last=1 drops step 3
    assert names(tmp_path) == ["last.ckpt", "step=00000004.ckpt", "step=00000008.ckpt"]
    assert ck.best_path == tmp_path / "step=00000004.ckpt"
    assert os.path.samefile(tmp_path / "last.ckpt", tmp_path / "step=00000008.ckpt")


def test_a_resume_from_the_files_of_a_checkpointer_driven_by_hand_ranks_and_removes_them(tmp_path):
    # As the class docstring's example: on_validation / on_step without start(). A resume goes on with that run's
    # files (Lightning restores best_k_models): step 2's 1.0 stays the best, keep_last=1 removes step 4.
    _, state = trained()
    state = state.replace(step=torch.tensor(0))

    def run(ck, state, values):
        for v in values:
            state = state.replace(step=state.step + 1)
            position = {"epoch": 0, "batch": int(state.step), "seed": 0}
            ck.on_validation(state, position, {"val": v})
            ck.on_step(state, position)
        return state

    def make():
        return ckpt.Checkpointer(tmp_path, every_n_steps=1, keep_last=1, monitor="val", keep_best=1)

    ck = make()
    state = run(ck, state, [5.0, 1.0, 4.0, 6.0])
    assert names(tmp_path) == ["last.ckpt", "step=00000002.ckpt", "step=00000004.ckpt"]
    ck = make()
    state, position = ck.restore("last", like=state)
    assert int(state.step) == 4 and position["batch"] == 4
    state = run(ck, state, [3.0, 7.0, 8.0])  # steps 5-7: none better than step 2's 1.0
    assert names(tmp_path) == ["last.ckpt", "step=00000002.ckpt", "step=00000007.ckpt"]
    assert ck.best_path == tmp_path / "step=00000002.ckpt"
    best, _ = ck.restore("best", like=state)  # (ckpt_path="best")
    assert int(best.step) == 2


def test_a_rank_that_writes_nothing_reads_only_new_headers_for_best_path(tmp_path):
    # The ranks that write nothing list the folder at every best_path read (rank 0 keeps its listing as it saves):
    # they read every file's header each time (~2 ms a file: 225 ms a call with 100 files). Only new or rewritten
    # files are read now. Reference for the answer: the writer's own best_path; for the reads, a hand count.
    import fnlit.checkpoint as C

    _, state = trained(steps=0)
    writer = ckpt.Checkpointer(tmp_path, monitor="val", keep_best=None, save_last=False)
    reader = ckpt.Checkpointer(tmp_path, monitor="val", keep_best=None, save_last=False)
    reads = []
    real = C.read_header

    def counted(p):
        reads.append(p.name)
        return real(p)

    def best_on_rank_1():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fnlit.distributed, "is_main", lambda: False)
            mp.setattr(C, "read_header", counted)
            return reader.best_path

    for i, val in enumerate([3.0, 1.0, 2.0]):
        writer.on_validation(state.replace(step=torch.tensor(i + 1)), {"epoch": 0, "batch": i, "seed": 0}, {"val": val})
    assert best_on_rank_1() == writer.best_path == tmp_path / "step=00000002.ckpt"
    assert sorted(reads) == [f"step={i:08d}.ckpt" for i in (1, 2, 3)]
    reads.clear()
    assert best_on_rank_1() == writer.best_path and reads == []  # nothing new: no header read
    writer.on_validation(state.replace(step=torch.tensor(4)), {"epoch": 0, "batch": 3, "seed": 0}, {"val": 0.5})
    assert best_on_rank_1() == writer.best_path == tmp_path / "step=00000004.ckpt"
    assert reads == ["step=00000004.ckpt"]


def test_a_listing_taken_while_rank_0_replaces_its_best_is_taken_again(tmp_path):
    # A rank that writes nothing listed the folder while rank 0 saved a better file and removed the old best: the old
    # one vanished before its header was read, the new one was not listed yet, and best_path said None. Reference: the
    # folder after rank 0's save (its writer's best_path), as a fresh listing gives it.
    import fnlit.checkpoint as C

    _, state = trained(steps=0)
    writer = ckpt.Checkpointer(tmp_path, monitor="val", save_last=False)
    reader = ckpt.Checkpointer(tmp_path, monitor="val", save_last=False)
    writer.on_validation(state.replace(step=torch.tensor(1)), {"epoch": 0, "batch": 0, "seed": 0}, {"val": 2.0})
    real, main = C.read_header, [False]

    def replaced_meanwhile(p):  # rank 0's next save lands between this rank's listing and its read of the header
        if not main[0] and p.name == "step=00000001.ckpt" and (tmp_path / p.name).exists():
            main[0] = True  # (the writer is rank 0)
            writer.on_validation(state.replace(step=torch.tensor(2)), {"epoch": 0, "batch": 1, "seed": 0}, {"val": 1.0})
            main[0] = False
        return real(p)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fnlit.distributed, "is_main", lambda: main[0])
        mp.setattr(C, "read_header", replaced_meanwhile)
        got = reader.best_path
    assert sorted(p.name for p in tmp_path.glob("step=*.ckpt")) == ["step=00000002.ckpt"]
    assert got == writer.best_path == tmp_path / "step=00000002.ckpt"


def test_a_sharded_checkpoint_refuses_a_float_tensor_where_like_has_a_bool_before_reading_it(tmp_path):
    # like's bool took the saved float tensor's load (any 0-d or (n,) float tensor could stand for a number), so
    # the refusal came after every file was read: with a shard file gone, a CheckpointError instead of the ValueError.
    # Reference: fnlit.restore refuses the same input.
    for i, saved in enumerate([torch.tensor(1.0), torch.ones(3)]):
        fnlit.save_sharded(tmp_path / f"s{i}", {"x": saved})
        with pytest.raises(ValueError):
            fnlit.save(tmp_path / f"f{i}.ckpt", {"x": saved})
            fnlit.restore(tmp_path / f"f{i}.ckpt", {"x": False})
        for shard in (tmp_path / f"s{i}").glob("*.distcp"):
            shard.unlink()
        with pytest.raises(ValueError, match=r"at x the checkpoint .* holds a torch.float32 tensor of shape .*, but `like` has the number False"):
            fnlit.restore_sharded(tmp_path / f"s{i}", {"x": False})


def test_a_state_key_that_reads_as_a_position_reference_is_refused_naming_the_position(tmp_path):
    from fnlit._checkpoint_io import check_paths

    with pytest.raises(ValueError, match=r"keys the position's tensors as @position/N, and the state has a leaf"):
        check_paths({"@position/0": torch.ones(1)}, {"t": torch.zeros(1)})
