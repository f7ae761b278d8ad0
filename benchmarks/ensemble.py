"""8 small MLPs trained in one vectorized step (fnlit.ensemble) vs. 8 sequential runs, same process.

Each model is 64-128-128-10 (sklearn digits-sized inputs), AdamW, a different seed and learning rate
per member. Timings are interleaved (sequential, ensemble eager, ensemble compiled, repeat) and the
median of the repeats is reported. On the CPU the run uses one thread (``torch.set_num_threads(1)``):
both arms then get the same compute, and other processes on a shared machine disturb them less.

    python benchmarks/ensemble.py                     # CPU (and CUDA too when available)
    python benchmarks/ensemble.py --batch 16 32 64 --steps 50 --no-compile
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import fnlit
from fnlit.ensemble import ensemble, ensemble_states, unstack_state


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def hand_step(model: nn.Module):
    def train_step(state, batch):
        x, y = batch

        def loss_fn(params):
            logits, buffers = fnlit.apply(model, params, state.buffers, x, rng=state.rng)
            return F.cross_entropy(logits, y), buffers

        (loss, buffers), grads = fnlit.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads, buffers=buffers), {"loss": loss}

    return train_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(step, state, data, steps: int, device: torch.device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        state, _ = step(state, data[i % len(data)])
    sync(device)
    return time.perf_counter() - t0, state


def bench(device: torch.device, batch: int, steps: int, reps: int, n: int, compile_: bool) -> dict[str, float]:
    seeds, lrs = list(range(n)), [10 ** (-2 - i / n) for i in range(n)]
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, 64, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device)) for _ in range(16)]
    step = hand_step(mlp().to(device))
    tx = fnlit.optim.adamw(1e-3)
    stacked = ensemble_states(lambda: mlp().to(device), tx, seeds=seeds, learning_rate=lrs)
    solos = [unstack_state(stacked, i) for i in range(n)]  # member i alone: same init, key and learning rate
    arms = {"sequential": None, "ensemble": ensemble(step, n)}
    if compile_:
        arms["ensemble+compile"] = ensemble(step, n, compile=True)
        t0 = time.perf_counter()
        run(arms["ensemble+compile"], stacked, data, 2, device)
        print(f"  (compile: {time.perf_counter() - t0:.1f} s, not timed)")
    for name, s in arms.items():  # warm up
        run(s, stacked, data, 3, device) if s is not None else run(step, solos[0], data, 3, device)
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(reps):
        for name, s in arms.items():
            if s is None:
                total, finals = 0.0, []
                for solo in solos:
                    t, final = run(step, solo, data, steps, device)
                    total, finals = total + t, finals + [final]
                times[name].append(total)
            else:
                t, out = run(s, stacked, data, steps, device)
                times[name].append(t)
                if name == "ensemble":
                    diff = max((unstack_state(out, i).params[k] - finals[i].params[k]).abs().max().item()
                               for i in range(n) for k in out.params)
    res = {k: statistics.median(v) for k, v in times.items()}
    line = "  ".join(f"{k} {v / steps * 1e3:7.2f} ms" for k, v in res.items())
    speed = "  ".join(f"{k} {res['sequential'] / v:4.2f}x" for k, v in res.items() if k != "sequential")
    print(f"{device.type} batch {batch:4d}: per step of all {n} models: {line}  | speedup {speed}  | max |member - solo| {diff:.1e}")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), "
          f"{args.n} MLPs 64-128-128-10, AdamW, {args.steps} steps, median of {args.reps}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for b in args.batch:
            bench(device, b, args.steps, args.reps, args.n, args.compile)


if __name__ == "__main__":
    main()
