"""Per-step cost of a fnlit step against the plain PyTorch loop it replaces, on CPU, one thread.

Plain: nn.Module forward, loss.backward(), torch.optim.AdamW(foreach=True).step(), zero_grad.
fnlit: fnlit.train_step(model, loss_fn) with fnlit.optim.adamw (same hyperparameters), the
hand-written step of DESIGN.md, train_step under fnlit.donating (in-place update, opt-in), and train_step
captured whole by fnlit.compile (inductor; without and with donation). All run in one process, interleaved
in rounds, on the same batches; we report the median step time of each and its ratio to plain.

    python benchmarks/step_overhead.py [--rounds 30] [--steps 20]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import fnlit

SIZES = [("MLP 784-128-128-10, batch 64", 128, 64), ("MLP 784-1024-1024-10, batch 256", 1024, 256)]


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def plain_runner(model: nn.Module):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2, foreach=True)

    def run(batch):
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def fnlit_runner(model: nn.Module, hand_written: bool, donate: bool = False, compiled: bool = False):
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-3, weight_decay=1e-2), seed=0)
    if hand_written:

        def step(state, batch):
            x, y = batch

            def loss_fn(params):
                logits, buffers = fnlit.apply(model, params, state.buffers, x, rng=state.rng)
                return F.cross_entropy(logits, y), buffers

            (loss, buffers), grads = fnlit.value_and_grad(loss_fn, has_aux=True)(state.params)
            return state.apply_gradients(grads, buffers=buffers), {"loss": loss}

    else:
        step = fnlit.train_step(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    if compiled:
        step = fnlit.compile(step, donate=donate)  # forward, backward and AdamW in one inductor program
    elif donate:
        step = fnlit.donating(step)  # the optimizer updates the incoming state's storage in place
    box = [state]

    def run(batch):
        box[0], _ = step(box[0], batch)

    return run


def timed(run, batches, clock) -> list[float]:
    out = []
    for b in batches:
        t0 = clock()
        run(b)
        out.append(clock() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=20, help="steps per round and runner")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: time.perf_counter; cpu: this thread's CPU time (immune to other processes)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    print(f"{args.clock} clock, torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread, "
          f"{args.rounds} rounds x {args.steps} steps, interleaved")
    names = {"plain": "plain", "fnlit": "fnlit", "hand": "hand", "donated": "donated", "compiled": "compiled",
             "compiled_donated": "compiled+donated"}
    print(f"{'workload':34s} {'plain ms':>9s}" + "".join(f" {n + ' ms':>{len(n) + 3}s} {'ratio':>6s}" for k, n in names.items() if k != "plain"))
    for label, hidden, bs in SIZES:
        torch.manual_seed(0)
        template = mlp(hidden)
        g = torch.Generator().manual_seed(0)
        batches = [(torch.randn(bs, 784, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(8)]
        runners = {
            "plain": plain_runner(copy.deepcopy(template)),  # trains its own copy
            "fnlit": fnlit_runner(template, hand_written=False),  # fnlit never changes the module
            "hand": fnlit_runner(template, hand_written=True),
            "donated": fnlit_runner(template, hand_written=False, donate=True),
            "compiled": fnlit_runner(template, hand_written=False, compiled=True),
            "compiled_donated": fnlit_runner(template, hand_written=False, donate=True, compiled=True),
        }
        times: dict[str, list[float]] = {k: [] for k in runners}
        for r in range(args.rounds + 2):
            for name, run in runners.items():
                t = timed(run, [batches[i % len(batches)] for i in range(args.steps)], clock)
                if r >= 2:  # the first two rounds warm up allocators and caches
                    times[name] += t
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{label:34s} {med['plain']:9.3f}" + "".join(f" {med[k]:{len(n) + 3}.3f} {med[k] / med['plain']:6.3f}" for k, n in names.items() if k != "plain"))


if __name__ == "__main__":
    main()
