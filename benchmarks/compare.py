"""Steps/s and peak memory of one training step: PyTorch eager vs fnlit eager vs fnlit compiled (+ Lightning, JAX).

Workloads (CUDA sizes / CPU sizes):
  mlp-small  784-128-128-10, batch 64 (CPU only; the step_overhead model)
  mlp        784-1024-1024-10, batch 256, fp32
  gpt        6 layers d512 8 heads T256 batch 32 vocab 8192, bf16 autocast  /  2 layers d128 T64 batch 8 vocab 512
  resnet     small ResNet on 32x32 images, batch 128  /  batch 16

Every runner does the same thing per step: forward, cross-entropy, backward, AdamW (fused/foreach kernels).
Rows are timed interleaved (round-robin repeats, median of each), in one process.

    python benchmarks/compare.py --device cpu --steps 50
    python benchmarks/compare.py --device cuda --steps 200
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

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
Runner = Callable[[], None]


def torch_eager(model: nn.Module, batch: tuple, amp: torch.dtype | None, device: str) -> Runner:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **({"fused": True} if device == "cuda" else {"foreach": True}))
    x, y = batch

    def run() -> None:
        with torch.autocast(device, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def fnlit_runner(model: nn.Module, batch: tuple, amp: torch.dtype | None, compiled: bool) -> Runner:
    step = fnlit.train_step(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    if amp is not None:
        step = fnlit.amp(step, dtype=amp)
    step = fnlit_compile(step, donate=True) if compiled else donating(step)
    box = [fnlit.TrainState.create(model, fnlit.optim.adamw(1e-3), seed=0)]

    def run() -> None:
        box[0], _ = step(box[0], batch)

    return run


def not_installed(name: str) -> str | None:
    return None if importlib.util.find_spec(name) else "not installed"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(runners: dict[str, Runner], steps: int, repeats: int, device: str) -> dict[str, tuple[float, float]]:
    """Warm up each runner, then time `steps` steps per runner round-robin `repeats` times; median steps/s."""
    peaks: dict[str, float] = {}
    for name, run in runners.items():
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(3):
            run()
        sync(device)
        peaks[name] = (torch.cuda.max_memory_allocated() if device == "cuda" else
                       (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024) / 2**20
    times: dict[str, list[float]] = {n: [] for n in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                run()
            sync(device)
            times[name].append(steps / (time.perf_counter() - t0))
    return {n: (statistics.median(times[n]), peaks[n]) for n in runners}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU")
    parser.add_argument("--workloads", default="mlp-small,mlp,gpt,resnet")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    print(f"# {datetime.date.today()}  torch {torch.__version__}  device {args.device}"
          f" ({torch.cuda.get_device_name() if args.device == 'cuda' else platform.processor() or platform.machine()},"
          f" threads {torch.get_num_threads()})  steps {args.steps} x {args.repeats}")
    print(f"| {'workload':<10} | {'runner':<15} | {'steps/s':>9} | {'vs torch':>8} | {'peak MiB':>9} |")
    print(f"|{'-' * 12}|{'-' * 17}|{'-' * 10}:|{'-' * 9}:|{'-' * 10}:|")
    for wl in args.workloads.split(","):
        torch.manual_seed(0)
        model, batch, amp = workload(wl, args.device)
        batch = tuple(t.to(args.device) for t in batch)
        runners = {
            "pytorch eager": torch_eager(model.to(args.device), batch, amp, args.device),
            "fnlit eager": fnlit_runner(model, batch, amp, compiled=False),
            "fnlit compiled": fnlit_runner(model, batch, amp, compiled=True),
        }
        results = measure(runners, args.steps, args.repeats, args.device)
        base = results["pytorch eager"][0]
        for name, (sps, peak) in results.items():
            print(f"| {wl:<10} | {name:<15} | {sps:9.1f} | {sps / base:7.2f}x | {peak:9.1f} |")
        for name, module in (("lightning", "lightning"), ("jax/flax/optax", "flax")):
            print(f"| {wl:<10} | {name:<15} | {not_installed(module) or 'not run':>9} | {'':>8} | {'':>9} |")
    print("peak MiB: CUDA max_memory_allocated; CPU ru_maxrss growth while warming up (first runner pays the allocator).")


if __name__ == "__main__":
    main()
