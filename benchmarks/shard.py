"""``fnlit.shard`` against PyTorch's FSDP2 (``fully_shard``) on the same model, on CPU with gloo.

Model: MLP 784-H-H-10 (H=2048 by default: 5.8 M parameters), batch 64 per rank, AdamW (lr 1e-3, weight
decay 1e-2) on both sides (``torch.optim.AdamW(foreach=True)`` for FSDP2, whose parameters are
DTensors; each Linear and the root are ``fully_shard``-ed, the usual FSDP2 wrapping; and, as
"FSDP2 (root)", the root alone: one all-gather and one reduce-scatter a step, like fnlit.shard).

Two processes (``fnlit.distributed.launch``), 1 thread each. Reported per rank:

* step time: median over rounds, the two interleaved in rounds inside the same processes (fair under
  a noisy machine); and each alone in its own launch;
* bytes of params + grads + optimizer state held by the rank (local shards), against the unsharded total;
* the process's max RSS (``ru_maxrss``), from the launch that ran that framework alone.

    python benchmarks/shard.py [--hidden 2048] [--batch 64] [--rounds 10] [--steps 5] [--nprocs 2]

GPUs: with several CUDA devices the same comparison runs with ``--backend nccl`` (not run here).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fnlit
from fnlit.transforms.shard import local_nbytes, shard, shard_state


def mlp(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def batches(n: int, size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 784, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def _nbytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


class FnlitRunner:
    def __init__(self, hidden: int) -> None:
        self.model = mlp(hidden)
        state = fnlit.TrainState.create(self.model, fnlit.optim.adamw(1e-3, weight_decay=1e-2), seed=0)
        self.state = shard_state(state)
        self.grad_bytes = 0
        model = self.model

        def step(state, batch):
            x, y = batch

            def loss_fn(params):
                logits, buffers = fnlit.apply(model, params, state.buffers, x)
                return F.cross_entropy(logits, y), buffers

            (loss, buffers), grads = fnlit.value_and_grad(loss_fn, has_aux=True)(state.params)
            self.grad_bytes = local_nbytes(grads)
            return state.apply_gradients(grads, buffers=buffers), {"loss": loss}

        self.step = shard(step)

    def __call__(self, batch) -> None:
        self.state, _ = self.step(self.state, batch)

    def state_bytes(self) -> dict[str, int]:
        return {"params": local_nbytes(self.state.params), "grads": self.grad_bytes,
                "opt_state": local_nbytes(self.state.opt_state)}


class FSDP2Runner:
    per_layer = True

    def __init__(self, hidden: int) -> None:
        from torch.distributed.fsdp import fully_shard

        self.model = mlp(hidden)
        if self.per_layer:
            for layer in self.model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer)
        fully_shard(self.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=1e-2, foreach=True)

    def __call__(self, batch) -> None:
        x, y = batch
        F.cross_entropy(self.model(x), y).backward()
        self.opt.step()
        self.grad_bytes = sum(_nbytes(p.grad) for p in self.model.parameters())
        self.opt.zero_grad(set_to_none=True)

    def state_bytes(self) -> dict[str, int]:
        opt = sum(_nbytes(v) for s in self.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
        return {"params": sum(_nbytes(p) for p in self.model.parameters()), "grads": self.grad_bytes, "opt_state": opt}


class FSDP2RootRunner(FSDP2Runner):
    """fully_shard on the root only: one all-gather and one reduce-scatter a step, as fnlit.shard does."""

    per_layer = False


RUNNERS = {"fnlit.shard": FnlitRunner, "FSDP2": FSDP2Runner, "FSDP2 (root)": FSDP2RootRunner}


def _time(runner, data, steps: int) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(steps):
        runner(data[i % len(data)])
    dist.barrier()
    return (time.perf_counter() - t0) / steps


def worker(names: list[str], hidden: int, batch: int, rounds: int, steps: int) -> dict:
    data = batches(4, batch, seed=dist.get_rank())
    runners = {n: RUNNERS[n](hidden) for n in names}
    for r in runners.values():  # warm-up: lazy init, allocator
        for b in data[:2]:
            r(b)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for n, r in runners.items():
            times[n].append(_time(r, data, steps))
    return {
        "median_s": {n: statistics.median(t) for n, t in times.items()},
        "bytes": {n: r.state_bytes() for n, r in runners.items()},
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64, help="examples per rank")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5, help="steps per round")
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--backend", default="gloo")
    a = ap.parse_args()
    args = (a.hidden, a.batch, a.rounds, a.steps)
    n = a.nprocs
    both = fnlit.distributed.launch(worker, n, list(RUNNERS), *args, backend=a.backend, timeout=1800)
    alone = {name: fnlit.distributed.launch(worker, n, [name], *args, backend=a.backend, timeout=1800)
             for name in RUNNERS}

    plain = fnlit.TrainState.create(mlp(a.hidden), fnlit.optim.adamw(1e-3), seed=0)
    unsharded = {"params": local_nbytes(plain.params), "grads": local_nbytes(plain.params),
                 "opt_state": local_nbytes(plain.opt_state)}
    total = sum(unsharded.values())
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {n} gloo processes x 1 thread, "
          f"MLP 784-{a.hidden}-{a.hidden}-10, batch {a.batch}/rank, {datetime.date.today()}")
    print(f"unsharded params+grads+opt_state: {total / 2**20:.1f} MiB (1/{n} = {total / n / 2**20:.1f} MiB)")
    print(f"{'':20}{'step ms (interleaved)':>16}{'step ms (alone)':>17}{'rank bytes MiB (max)':>22}"
          f"{'vs total':>10}{'max RSS MiB':>13}")
    rows = {}
    for name in RUNNERS:
        step_ms = statistics.median(r["median_s"][name] for r in both) * 1e3
        alone_ms = statistics.median(r["median_s"][name] for r in alone[name]) * 1e3
        rank_bytes = max(sum(r["bytes"][name].values()) for r in alone[name])
        rss = max(r["max_rss_mb"] for r in alone[name])
        rows[name] = (step_ms, alone_ms, rank_bytes, rss)
        print(f"{name:20}{step_ms:16.1f}{alone_ms:17.1f}{rank_bytes / 2**20:22.2f}"
              f"{rank_bytes / total:10.3f}{rss:13.0f}")
    f = rows["fnlit.shard"]
    for name in list(RUNNERS)[1:]:
        t = rows[name]
        print(f"{'fnlit/' + name:20}{f[0] / t[0]:16.2f}{f[1] / t[1]:17.2f}{f[2] / t[2]:22.2f}"
              f"{'':10}{f[3] / t[3]:13.2f}")
    print("per-rank parts (fnlit.shard, FSDP2):", {k: (both[0]["bytes"]["fnlit.shard"][k], both[0]["bytes"]["FSDP2"][k])
                                                 for k in unsharded})


if __name__ == "__main__":
    main()
