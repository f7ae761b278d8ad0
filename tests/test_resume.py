"""Resuming gives exactly the run that was never interrupted; processes are SIGKILLed and SIGTERMed for real.

The runs (tests/_resume_worker.py): an MLP with dropout on shuffled data, AdamW on a warmup-cosine
schedule, accumulate(2), 16 batches per epoch (step 17 is mid-epoch), validation with best-k
checkpoints. The reference is one uninterrupted 40-step run without checkpoints, in this process.
Each interrupted or resumed run is a new process forked from a server that only imported torch.
"""

import json
import random
import signal
import socket
import time

import _resume_worker as worker
import pytest
import torch

from fnlit import checkpoint as ckpt

VARIANTS = ["fp32", "fp16", "bf16"]


@pytest.fixture(scope="module")
def server():
    s = worker.Server()
    yield s
    s.close()


def assert_killed_after_step_17(folder, epoch):
    info = ckpt.read_info(folder / "last.ckpt")
    assert (info.step, info.position["epoch"], info.position["batch"]) == (17, epoch, 1)  # mid-epoch
    assert not (folder / "final.ckpt").exists()


def test_sigkill_after_a_checkpoint_then_resume_equals_the_uninterrupted_run(server, tmp_path):
    killed = {v: server.fork("train", args={"folder": str(tmp_path / v), "variant": v, "kill_at": 17}) for v in VARIANTS}
    reference = {v: worker.train(None, v)[0] for v in VARIANTS}  # meanwhile, here
    for v, pid in killed.items():
        assert server.wait(pid) == -signal.SIGKILL
        assert_killed_after_step_17(tmp_path / v, epoch=1)
    at_17 = ckpt.restore(tmp_path / "fp16" / "last.ckpt", like=reference["fp16"]).scaler
    assert float(at_17.scale) != 2.0**16 and int(at_17.growth_tracker) > 0  # mid growth interval: it must resume
    resumed = {v: server.fork("train", tmp_path / f"{v}.json", args={"folder": str(tmp_path / v), "variant": v, "resume": True})
               for v in VARIANTS}
    for v, pid in resumed.items():
        assert server.wait(pid) == 0
        assert json.loads((tmp_path / f"{v}.json").read_text()) == {"step": 40, "ran": 23}
        worker.assert_same_tensors(ckpt.restore(tmp_path / v / "final.ckpt", like=reference[v]), reference[v])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_parallel(server, folder, **args):
    """Forks the two ranks of a data_parallel run (gloo), started from torchrun's environment variables."""
    port = free_port()
    return [server.fork("dp_rank", folder / f"rank{r}.json", args={"folder": str(folder), "variant": "fp32", **args},
                        env={"RANK": r, "LOCAL_RANK": r, "WORLD_SIZE": 2, "MASTER_PORT": port})
            for r in range(2)]


@pytest.mark.distributed
def test_data_parallel_resume_equals_the_uninterrupted_run(server, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    killed = data_parallel(server, resumed, kill_at=17)
    ranks = data_parallel(server, straight)
    assert [server.wait(pid) for pid in killed] == [-signal.SIGKILL] * 2
    assert_killed_after_step_17(resumed, epoch=2)  # each rank sees half the data: 8 batches per epoch
    assert [server.wait(pid) for pid in ranks + data_parallel(server, resumed, resume=True)] == [0] * 4
    assert [json.loads((resumed / f"rank{r}.json").read_text())["ran"] for r in range(2)] == [23, 23]
    like = worker.build("fp32")[1]
    reference = ckpt.restore(straight / "final.ckpt", like)
    worker.assert_same_tensors(ckpt.restore(resumed / "final.ckpt", like), reference)
    assert not torch.equal(reference.params["0.weight"], like.params["0.weight"])


def test_sigterm_saves_and_the_resumed_run_equals_the_uninterrupted_run(server, tmp_path):
    ready, folder = tmp_path / "ready", tmp_path / "run"
    args = {"folder": str(folder), "variant": "fp32", "every_n_steps": None}  # only on_exit saves
    pid = server.fork("train", tmp_path / "out.json", args={**args, "announce": str(ready)})
    reference = worker.train(None, "fp32")[0]
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    worker.os.kill(pid, signal.SIGTERM)
    assert server.wait(pid) == 0  # finished its step, saved, returned: a clean exit
    stopped = json.loads((tmp_path / "out.json").read_text())["step"]
    assert 5 <= stopped < worker.MAX_STEPS
    assert ckpt.read_info(folder / "last.ckpt").step == stopped
    state, ran = worker.train(str(folder), "fp32", resume=True, every_n_steps=None)
    assert ran == worker.MAX_STEPS - stopped
    worker.assert_same_tensors(state, reference)


def test_resuming_from_last_with_no_checkpoint_yet_starts_fresh(tmp_path):
    state, ran = worker.train(str(tmp_path), "fp32", resume=True)  # the same command starts and resumes a job
    assert ran == worker.MAX_STEPS
    worker.assert_same_tensors(state, worker.train(None, "fp32")[0])


def test_kill_during_save_never_breaks_the_previous_checkpoint(server, tmp_path):
    """Writers saving a 21 MB state in a loop (a file, and a Checkpointer keeping 2) are SIGKILLed at
    20 random moments; after each kill both still restore, to a complete, never older version."""
    like, plain, managed = worker.big_state(), tmp_path / "plain.ckpt", tmp_path / "managed"
    start = time.perf_counter()
    assert server.wait(server.fork("write", args={"folder": str(tmp_path), "start": 0, "count": 1})) == 0
    cycle = time.perf_counter() - start
    rng, last, mid_write = random.Random(0), [0, 0], 0
    for _ in range(20):
        pid = server.fork("write", args={"folder": str(tmp_path), "start": max(last) + 1})
        time.sleep(rng.uniform(0.0, 1.5 * cycle))
        worker.os.kill(pid, signal.SIGKILL)
        assert server.wait(pid) == -signal.SIGKILL
        mid_write += any(".tmp-" in p.name for d in (tmp_path, managed) for p in d.iterdir())
        for i, state in enumerate([ckpt.restore(plain, like), ckpt.Checkpointer(managed).restore("last", like)[0]]):
            v = int(state.step)
            assert all(bool((p == v).all()) for p in state.params.values()) and v >= last[i]
            last[i] = v
        for p in tmp_path.glob(".plain.ckpt.tmp-*"):  # a Checkpointer removes its own stale ones
            p.unlink()
    assert mid_write >= 5, mid_write  # many kills landed inside a write, not between two
    print(f"20 kills, {mid_write} inside a write, versions {last} reached; one save cycle {cycle:.2f} s")
