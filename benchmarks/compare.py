"""Steps/s and peak memory of one training step: PyTorch eager vs fnlit eager vs fnlit compiled (+ Lightning, JAX).

Workloads (CUDA sizes / CPU sizes):
  mlp-small  784-128-128-10, batch 64 (CPU only; the step_overhead model)
  mlp        784-1024-1024-10, batch 256, fp32
  gpt        6 layers d512 8 heads T256 batch 32 vocab 8192, bf16 autocast  /  2 layers d128 T64 batch 8 vocab 512
  resnet     small ResNet on 32x32 images, batch 128  /  batch 16

Every runner does the same thing per step: forward, cross-entropy, backward, AdamW (fused/foreach kernels).
Rows are timed interleaved (round-robin repeats, median of each), in one process. The Lightning and JAX rows run
when `lightning` / `jax flax optax` are installed (optional; not project dependencies), else say "not installed".
--check prints each runner's loss at step 1 (same init, so it should match torch's) and after the last step.

    python benchmarks/compare.py --device cpu --steps 50
    python benchmarks/compare.py --device cuda --steps 200
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import itertools
import logging
import os
import platform
import resource
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fnlit  # noqa: E402
from fnlit.transforms.compile import compile as fnlit_compile  # noqa: E402
from fnlit.transforms.donate import donating  # noqa: E402


# ------------------------------------------------------------------------------------------ models
def mlp(sizes: list[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, layers: int, d: int, heads: int, t: int, vocab: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(t, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x))).flatten(0, 1)


def resnet(width: int = 32, classes: int = 10) -> nn.Module:
    class Res(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                      nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x + self.body(x))

    def stage(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), Res(cout)]

    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), Res(width),
                         *stage(width, 2 * width), *stage(2 * width, 4 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes))


def workload(name: str, device: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], torch.dtype | None]:
    cuda = device == "cuda"
    g = torch.Generator().manual_seed(0)
    if name in ("mlp-small", "mlp"):
        sizes, n = ([784, 128, 128, 10], 64) if name == "mlp-small" else ([784, 1024, 1024, 10], 256)
        return mlp(sizes), (torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)), None
    if name == "gpt":
        layers, d, heads, t, n, vocab = (6, 512, 8, 256, 32, 8192) if cuda else (2, 128, 4, 64, 8, 512)
        idx = torch.randint(0, vocab, (n, t + 1), generator=g)
        return GPT(layers, d, heads, t, vocab), (idx[:, :-1], idx[:, 1:].flatten()), torch.bfloat16
    if name == "resnet":
        n = 128 if cuda else 16
        return resnet(), (torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)), None
    raise ValueError(f"unknown workload {name!r}")


# ----------------------------------------------------------------------------------------- runners
@dataclass
class Runner:
    """`step()` runs one training step and returns its loss without syncing; the hooks are for measure()."""

    step: Callable[[], Any]
    sync: Callable[[], None] | None = None  # waits for work queued by the runner's own runtime (JAX's dispatch)
    peak: Callable[[], float] | None = None  # peak bytes where torch's CUDA allocator does not see them
    close: Callable[[], None] | None = None  # frees what the runner holds (a thread) once measured
    clock: Callable[[], float] = time.perf_counter  # seconds; Lightning's leaves out its thread handoffs


class Unavailable(Exception):
    """A runner that cannot run here (the reason is printed in its row)."""


def adamw_kernel(device: str) -> dict[str, bool]:
    return {"fused": True} if device == "cuda" else {"foreach": True}


def torch_eager(model: nn.Module, batch: tuple, amp: torch.dtype | None, device: str) -> Runner:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **adamw_kernel(device))
    x, y = batch

    def run() -> torch.Tensor:
        with torch.autocast(device, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return Runner(run)


def fnlit_runner(model: nn.Module, batch: tuple, amp: torch.dtype | None, compiled: bool) -> Runner:
    step = fnlit.train_step(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    if amp is not None:
        step = fnlit.amp(step, dtype=amp)
    step = fnlit_compile(step, donate=True) if compiled else donating(step)
    box = [fnlit.TrainState.create(model, fnlit.optim.adamw(1e-3), seed=0)]

    def run() -> torch.Tensor:
        box[0], metrics = step(box[0], batch)
        return metrics["loss"]

    return Runner(run)


def lightning_runner(model: nn.Module, batch: tuple, amp: torch.dtype | None, device: str) -> Runner:
    """Lightning's own fit loop (Trainer(barebones=True)), one iteration per `step()`.

    A fit per step would time Trainer setup, not the loop, so one `fit` runs for the whole benchmark, in a
    background thread, over an iterable that yields the fixed batch forever. The module's on_train_batch_start
    hands control back and waits for the next `step()`: so one `step()` is exactly one iteration of Lightning's
    loop (batch fetch and device transfer, hooks, training_step in the optimizer closure, zero_grad, backward,
    optimizer.step, the loop's bookkeeping), timed by measure() like every other row. The two thread hops per
    step (about 50 us on the CPU VM, which a Lightning user never pays) are timed and taken off: the runner's
    clock is wall time minus that latency, so CUDA's final sync still counts. Setup is outside the timing;
    `close()` ends the fit.
    """
    import lightning as L

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # setup banners and tips would split the table
    warnings.filterwarnings("ignore", module=r"lightning\.")
    ready, go = threading.Semaphore(0), threading.Semaphore(0)
    stop, error = threading.Event(), []
    hop = {"resumed": 0.0, "released": 0.0, "lag": 0.0}  # the loop thread's side of each handoff, and their sum

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.loss = copy.deepcopy(model), None  # same init as the other rows

        def training_step(self, b: tuple, i: int) -> torch.Tensor:
            loss = F.cross_entropy(self.model(b[0]), b[1])
            self.loss = loss.detach()
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3, **adamw_kernel(device))

        def on_train_batch_start(self, b: tuple, i: int) -> int | None:
            hop["released"] = time.perf_counter()
            ready.release()
            go.acquire()
            hop["resumed"] = time.perf_counter()
            return -1 if stop.is_set() else None  # -1 ends the epoch, and max_epochs=1 the fit

    module = Module()
    # barebones implies logger=False, enable_checkpointing=False, enable_progress_bar=False, no model summary.
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_epochs=1, barebones=True,
                        precision="bf16-mixed" if amp is torch.bfloat16 else "32-true")

    def fit() -> None:
        try:
            trainer.fit(module, train_dataloaders=itertools.repeat(batch))
        except BaseException as e:  # noqa: BLE001 -- re-raised in the main thread
            error.append(e)
            ready.release()

    thread = threading.Thread(target=fit, daemon=True, name="lightning-fit")
    thread.start()

    def run() -> torch.Tensor:
        t_go = time.perf_counter()
        go.release()
        ready.acquire()
        hop["lag"] += (hop["resumed"] - t_go) + (time.perf_counter() - hop["released"])
        if error:
            raise error[0]
        return module.loss

    def close() -> None:
        stop.set()
        go.release()
        thread.join()

    ready.acquire()  # setup done, waiting at the first batch
    if error:
        raise error[0]
    return Runner(run, close=close, clock=lambda: time.perf_counter() - hop["lag"])


def jax_runner(model: nn.Module, batch: tuple, amp: torch.dtype | None, device: str) -> Runner:
    """The same model in Flax (linen) with the torch weights copied in, optax.adamw with torch.optim.AdamW's
    defaults (lr 1e-3, betas 0.9/0.999, eps 1e-8, weight_decay 1e-2), the step jitted with the state donated,
    bf16 matmuls where the workload autocasts. The batch is converted once. measure() blocks on the state after
    each timed block (`sync`), so asynchronous dispatch is not counted as speed. CUDA peak memory is JAX's own
    allocator's process-wide peak (it is never reset, so a later workload shows at least an earlier one's)."""
    import jax
    import jax.numpy as jnp
    import optax

    import _jax_models as jm

    try:
        dev = jax.devices("gpu" if device == "cuda" else "cpu")[0]
    except RuntimeError as e:
        raise Unavailable("no jax GPU") from e
    dtype = jnp.bfloat16 if amp is torch.bfloat16 else jnp.float32
    x, y = (t.cpu().numpy().copy() for t in batch)  # copies: jax may alias host memory on the CPU
    if isinstance(model, GPT):
        net: Any = jm.GPT(len(model.blocks), model.tok.embedding_dim, model.blocks[0].heads,
                          model.pos.num_embeddings, model.tok.num_embeddings, dtype)
    elif isinstance(model[0], nn.Flatten):
        linears = [m for m in model if isinstance(m, nn.Linear)]
        net = jm.MLP([m.in_features for m in linears] + [linears[-1].out_features])
    else:
        net, x = jm.ResNet(model[0].out_channels, model[-1].out_features), x.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    x, y = jax.device_put((x, y), dev)
    variables = jm.load_torch(jax.eval_shape(net.init, jax.random.key(0), x), model.state_dict())
    tx = optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2)
    params, stats = jax.device_put((variables["params"], variables.get("batch_stats", {})), dev)
    box = [(params, stats, jax.device_put(tx.init(params), dev))]
    step = jm.make_step(net, tx)

    def run() -> Any:
        box[0], loss = step(box[0], x, y)
        return loss

    def peak() -> float:
        return float((dev.memory_stats() or {}).get("peak_bytes_in_use", float("nan")))

    return Runner(run, sync=lambda: jax.block_until_ready(box[0]), peak=peak if device == "cuda" else None)


def configure_jax(threads: int) -> None:
    """Environment XLA reads when jax first starts: no GPU preallocation (torch shares the GPU), and on the CPU
    one Eigen thread when torch gets one."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                                   " intra_op_parallelism_threads=1").strip()


def not_installed(name: str) -> str | None:
    return None if importlib.util.find_spec(name) else "not installed"


def sync(device: str, runner: Runner) -> None:
    if runner.sync is not None:
        runner.sync()
    if device == "cuda":
        torch.cuda.synchronize()


class Result(NamedTuple):
    steps_per_s: float
    peak_mib: float
    losses: list[float]  # at steps 1, 2, 3 (warm-up) and at the last step


def measure(runners: dict[str, Runner], steps: int, repeats: int, device: str) -> dict[str, Result]:
    """Warm up each runner, then time `steps` steps per runner round-robin `repeats` times; median steps/s."""
    peaks: dict[str, float] = {}
    losses: dict[str, list[float]] = {}
    for name, r in runners.items():
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        losses[name] = [float(r.step()) for _ in range(3)]  # float() syncs: fine while warming up
        sync(device, r)
        peaks[name] = (r.peak() if r.peak else torch.cuda.max_memory_allocated() if device == "cuda" else
                       (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024) / 2**20
    times: dict[str, list[float]] = {n: [] for n in runners}
    last: dict[str, Any] = {}
    for _ in range(repeats):
        for name, r in runners.items():
            sync(device, r)
            t0 = r.clock()
            for _ in range(steps):
                last[name] = r.step()  # kept unsynced; read once at the end
            sync(device, r)
            times[name].append(steps / (r.clock() - t0))
    return {n: Result(statistics.median(times[n]), peaks[n], losses[n] + [float(last[n])]) for n in runners}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU")
    parser.add_argument("--workloads", default="mlp-small,mlp,gpt,resnet")
    parser.add_argument("--check", action="store_true", help="print each runner's losses (steps 1, 3, last)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    configure_jax(args.threads)
    optional: dict[str, tuple[Callable[..., Runner], list[str]]] = {
        "lightning": (lightning_runner, ["lightning"]), "jax/flax/optax": (jax_runner, ["jax", "flax", "optax"])}
    print(f"# {datetime.date.today()}  torch {torch.__version__}  device {args.device}"
          f" ({torch.cuda.get_device_name() if args.device == 'cuda' else platform.processor() or platform.machine()},"
          f" threads {torch.get_num_threads()})  steps {args.steps} x {args.repeats}")
    print(f"| {'workload':<10} | {'runner':<15} | {'steps/s':>9} | {'vs torch':>8} | {'peak MiB':>9} |")
    print(f"|{'-' * 12}|{'-' * 17}|{'-' * 10}:|{'-' * 9}:|{'-' * 10}:|")
    checks: list[str] = []
    for wl in args.workloads.split(","):
        torch.manual_seed(0)
        model, batch, amp = workload(wl, args.device)
        batch = tuple(t.to(args.device) for t in batch)
        runners = {
            "pytorch eager": torch_eager(model.to(args.device), batch, amp, args.device),
            "fnlit eager": fnlit_runner(model, batch, amp, compiled=False),
            "fnlit compiled": fnlit_runner(model, batch, amp, compiled=True),
        }
        skipped: dict[str, str] = {}
        for name, (make, modules) in optional.items():  # built before any step runs: the same init as above
            try:
                if reason := next(filter(None, map(not_installed, modules)), None):
                    raise Unavailable(reason)
                runners[name] = make(model, batch, amp, args.device)
            except Unavailable as e:
                skipped[name] = str(e)
        try:
            results = measure(runners, args.steps, args.repeats, args.device)
        finally:
            for r in runners.values():
                if r.close:
                    r.close()
        base = results["pytorch eager"]
        for name, res in results.items():
            print(f"| {wl:<10} | {name:<15} | {res.steps_per_s:9.1f} | {res.steps_per_s / base.steps_per_s:7.2f}x"
                  f" | {res.peak_mib:9.1f} |")
            l1, l2, l3, last = res.losses
            checks.append(f"| {wl:<10} | {name:<15} | {l1:9.4f} | {l1 - base.losses[0]:+9.1e} | {l3:9.4f} |"
                          f" {last:9.4f} |")
        for name, reason in skipped.items():
            print(f"| {wl:<10} | {name:<15} | {reason:>9} | {'':>8} | {'':>9} |")
    print("peak MiB: CUDA max_memory_allocated (JAX: its allocator's process peak); CPU ru_maxrss growth while"
          " warming up (first runner pays the allocator).")
    if args.check:  # same init and batch: step 1 should match torch's, and the losses should fall alike
        print(f"\n| {'workload':<10} | {'runner':<15} | {'loss 1':>9} | {'- torch':>9} | {'loss 3':>9} |"
              f" {'loss ' + str(3 + args.steps * args.repeats):>9} |")
        print(f"|{'-' * 12}|{'-' * 17}|{'-' * 10}:|{'-' * 10}:|{'-' * 10}:|{'-' * 10}:|")
        print("\n".join(checks))


if __name__ == "__main__":
    main()
