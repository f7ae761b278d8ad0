"""Training runs that tests/test_resume.py kills and resumes, and the fork server that runs them.

Importing torch costs seconds, so the tests start one server (``python _resume_worker.py serve``) that
imports torch and fnlit, trains nothing, and forks a fresh process per job: a run that SIGKILLs itself
after its step-17 checkpoint, a run that waits for SIGTERM, the ranks of a data_parallel run, a writer
that saves in a loop until killed. Every job is a new process that never held another job's state.
"""

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fnlit
from fnlit import checkpoint as ckpt
from fnlit.data import ArrayLoader
from fnlit.loop import fit

MAX_STEPS = 40
VARIANTS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def assert_same_tensors(a, b):
    """Every leaf equal (torch.equal) and of the same dtype, path by path; the static optimizer may differ."""
    pa, la, _ = fnlit.tree.tree_flatten_with_path(a)
    pb, lb, _ = fnlit.tree.tree_flatten_with_path(b)
    assert pa == pb
    for p, x, y in zip(pa, la, lb):
        assert x.dtype == y.dtype and torch.equal(x, y), p


def build(variant: str, dp: bool = False):
    """Model with dropout, shuffled data, AdamW on warmup-cosine, accumulate(2) [+ amp] [+ data_parallel]."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 4))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(320, 16, generator=g), torch.randint(0, 4, (320,), generator=g)
    schedule = fnlit.optim.warmup_cosine(1e-2, warmup_steps=5, decay_steps=MAX_STEPS)
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(schedule, weight_decay=1e-2), seed=0)
    if variant == "fp16":  # a short growth interval, so the scale changes (and its tracker matters) in 40 steps
        from fnlit.transforms.amp import init_loss_scale

        state = state.replace(scaler=init_loss_scale(2.0**16, growth_interval=4))
    step = fnlit.accumulate(fnlit.train_step(model, lambda m, b: F.cross_entropy(m(b[0]), b[1])), 2)
    if VARIANTS[variant] is not None:
        step = fnlit.amp(step, dtype=VARIANTS[variant])
    if dp:
        step = fnlit.data_parallel(step)
    evaluate = fnlit.eval_step(model, lambda m, b: {"loss": F.cross_entropy(m(b[0]), b[1])})
    train_data = ArrayLoader(x[:256], y[:256], batch_size=16, shuffle=True)  # 16 batches: step 17 is mid-epoch
    val = ArrayLoader(x[256:], y[256:], batch_size=32, shuffle=False)
    return step, state, train_data, val, evaluate


class KillingCheckpointer(ckpt.Checkpointer):
    """SIGKILLs its own process right after saving step ``kill_at`` (under data_parallel: on every rank,
    after the barrier that follows rank 0's write)."""

    def __init__(self, directory, kill_at, **kwargs):
        super().__init__(directory, **kwargs)
        self.kill_at = kill_at

    def on_step(self, state, position):
        super().on_step(state, position)
        if int(state.step) == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


class CountSteps:
    def __init__(self):
        self.count = 0

    def on_step(self, state, metrics):
        self.count += 1


class Announce:
    """Writes the step to ``path`` once ``after`` steps are done, then slows steps down (SIGTERM tests)."""

    def __init__(self, path, after):
        self.path, self.after = Path(path), after

    def on_step(self, state, metrics):
        if int(state.step) >= self.after:
            if not self.path.exists():
                self.path.write_text(str(int(state.step)))
            time.sleep(0.05)


def train(folder, variant: str, *, kill_at=None, resume=False, announce=None, every_n_steps=1, dp=False):
    """One fit to MAX_STEPS, with a Checkpointer in ``folder`` (None: no checkpoints, the reference run).

    Returns the final state and the number of steps this call ran; with a folder, the final state is
    also saved to ``folder/final.ckpt``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same thread count in every process: float sums are then reproducible
    try:
        step, state, train_data, val, evaluate = build(variant, dp)
        ck = None
        if folder is not None:
            kw = {"every_n_steps": every_n_steps, "keep_last": 2, "monitor": "val/loss", "keep_best": 1, "variant": variant}
            ck = KillingCheckpointer(folder, kill_at, **kw) if kill_at else ckpt.Checkpointer(folder, **kw)
        counter = CountSteps()
        callbacks = [counter] + ([Announce(announce, after=5)] if announce else [])
        state = fit(step, state, train_data, val_data=val, eval_step=evaluate, max_steps=MAX_STEPS, checkpoint=ck,
                    ckpt_path="last" if resume else None, callbacks=callbacks, progress=False, num_sanity_val_steps=0)
        if folder is not None:
            ckpt.save(Path(folder) / "final.ckpt", state)
        return state, counter.count
    finally:
        torch.set_num_threads(threads)


def big_state(version: int = 0):
    """A 21 MB state whose every parameter holds ``version`` (a torn or mixed file would show)."""
    model = nn.Linear(1280, 4096, device="meta").to_empty(device="cpu")  # no slow initialisation
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    return state.replace(step=torch.tensor(version), params={k: p.fill_(version) for k, p in state.params.items()})


def write_loop(folder, start, count=None):
    """Saves version after version (a plain file, and a Checkpointer keeping 2) until killed."""
    folder, state, v = Path(folder), big_state(), start
    while count is None or v < start + count:
        s = state.replace(step=torch.tensor(v), params={k: p.fill_(v) for k, p in state.params.items()})
        ckpt.save(folder / "plain.ckpt", s)
        ckpt.Checkpointer(folder / "managed", every_n_steps=1, keep_last=2).on_step(s, {"epoch": 0, "batch": v, "seed": 0})
        v += 1


def _run(job):
    if job["kind"] == "train":
        state, ran = train(**job["args"])
        return {"step": int(state.step), "ran": ran}
    if job["kind"] == "dp_rank":  # the way torchrun starts a rank: environment variables, then init
        os.environ.update({k: str(v) for k, v in job["env"].items()}, MASTER_ADDR="127.0.0.1")
        fnlit.distributed.init("gloo")
        try:
            state, ran = train(**job["args"], dp=True)
        finally:
            fnlit.distributed.shutdown()
        return {"step": int(state.step), "ran": ran}
    write_loop(**job["args"])
    return {}


def _child(job):
    os.dup2(2, 1)  # stdout carries the server's replies
    sys.stdout = sys.stderr
    code = 1
    try:
        result = _run(job)
        if job.get("result"):
            Path(job["result"]).write_text(json.dumps(result))
        code = 0
    except BaseException:  # noqa: BLE001 (a child reports everything, then exits with 1)
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def serve():
    """Reads JSON requests on stdin: ``{"fork": job}`` -> ``{"pid"}``; ``{"wait": pid, "timeout": s}`` ->
    ``{"code"}`` (negative: killed by that signal; the child is SIGKILLed at the timeout)."""
    torch.set_num_threads(1)  # children then never inherit a thread pool
    big_state()  # pays PyTorch's one-time lazy initialisation (0.5 s) here, not in every child
    print("ready", flush=True)
    while line := sys.stdin.readline():
        req = json.loads(line)
        if "fork" in req:
            pid = os.fork()
            if pid == 0:
                _child(req["fork"])
            reply = {"pid": pid}
        else:
            deadline = time.monotonic() + req.get("timeout", 120)
            while (done := os.waitpid(req["wait"], os.WNOHANG))[0] == 0:
                if time.monotonic() > deadline:
                    os.kill(req["wait"], signal.SIGKILL)
                    done = os.waitpid(req["wait"], 0)
                    break
                time.sleep(0.002)
            reply = {"code": os.waitstatus_to_exitcode(done[1])}
        print(json.dumps(reply), flush=True)
    os._exit(0)  # skips a slow interpreter teardown; nothing is left to flush


class Server:
    """The tests' side of ``serve``."""

    def __init__(self):
        cmd = [sys.executable, "-W", "error", __file__, "serve"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def _ask(self, request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def fork(self, kind, result=None, **job):
        """Starts a job in a new process; returns its pid."""
        return self._ask({"fork": {"kind": kind, "result": str(result) if result else None, **job}})["pid"]

    def wait(self, pid, timeout=120):
        """The job's exit code (negative: the signal that killed it)."""
        return self._ask({"wait": pid, "timeout": timeout})["code"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


if __name__ == "__main__":
    serve()
