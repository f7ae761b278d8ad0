"""Data-parallel training on several processes, started by torchrun (CPU with gloo, or GPUs with NCCL).

Lightning's `Trainer(strategy="ddp", devices=2)` is three lines here:

* `fnlit.distributed.init()` joins the process group that torchrun describes in the environment (and
  does nothing, returning False, when the script runs without torchrun, so the same file runs alone);
* `fnlit.data_parallel(train_step)` averages the gradients across processes, one flattened
  all-reduce per update, so every rank applies the same update and the params stay bitwise identical;
* `fnlit.data.ArrayLoader` gives each rank its own shard of every epoch, and `fnlit.fit` writes logs
  and checkpoints on rank 0 only. Validation and test metrics are averaged over all ranks' shards.

Data: scikit-learn's handwritten digits (no download); every rank loads the same arrays and the loader
picks its shard. `--batch-size` is the global batch: each of N ranks steps on batch-size / N examples.

    torchrun --nproc-per-node 2 examples/data_parallel.py       # 2 processes (CPU: gloo; GPUs: NCCL)
    python examples/data_parallel.py                            # the same script, one process
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fnlit
from fnlit.data import ArrayLoader

from _data import digits  # the shared 70/15/15 split of scikit-learn's digits

Batch = tuple[torch.Tensor, torch.Tensor]




def ranks_agree(state: fnlit.TrainState) -> bool:
    """Whether every rank holds bitwise the same params (what data_parallel guarantees)."""
    flat = torch.cat([p.detach().reshape(-1) for p in state.params.values()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, flat) for g in gathered)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split across the processes")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default="runs/data_parallel", help="TensorBoard event files and metrics.csv ('' for none)")
    args = p.parse_args(argv)

    owns_group = not (dist.is_available() and dist.is_initialized())  # fnlit.distributed.launch made one already?
    distributed = fnlit.distributed.init()  # reads RANK, WORLD_SIZE, MASTER_ADDR... from torchrun
    world = fnlit.distributed.world_size()
    if args.batch_size % world:
        p.error(f"--batch-size {args.batch_size} must be divisible by the number of processes ({world})")
    device = torch.device("cuda", fnlit.distributed.local_rank()) if torch.cuda.is_available() else torch.device("cpu")

    data = digits(args.seed)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 10)).to(device)

    def train_step(state: fnlit.TrainState, batch: Batch) -> tuple[fnlit.TrainState, dict[str, torch.Tensor]]:
        x, y = batch

        def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
            logits, _ = fnlit.apply(model, params, state.buffers, x, rng=state.rng)  # each rank its own dropout
            return F.cross_entropy(logits, y)

        loss, grads = fnlit.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    def eval_step(state: fnlit.TrainState, batch: Batch) -> dict[str, torch.Tensor]:
        x, y = batch
        logits, _ = fnlit.apply(model, state.params, state.buffers, x, train=False)
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}

    # Each rank sees 1/world of the examples per epoch, in batches of batch_size / world.
    train = ArrayLoader(*data["train"], batch_size=args.batch_size // world, shuffle=True, drop_last=True)
    total = args.max_steps or args.epochs * len(train)
    if total < 1:  # (the schedule needs steps to warm up and decay over)
        p.error(f"no training step to take: {len(train)} batches an epoch, --epochs {args.epochs}. Use a smaller "
                "--batch-size or more --epochs.")
    schedule = fnlit.optim.warmup_cosine(args.lr, warmup_steps=min(max(1, total // 20), total - 1), decay_steps=total)
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(schedule, mask=fnlit.optim.decay_mask), seed=args.seed)
    step = fnlit.data_parallel(train_step) if distributed else train_step

    start = time.perf_counter()
    state = fnlit.fit(
        step, state, train, val_data=ArrayLoader(*data["val"], batch_size=256, shuffle=False), eval_step=eval_step,
        max_epochs=args.epochs, max_steps=args.max_steps, log_every_n_steps=10, log_dir=args.log_dir or None,
        hparams={**vars(args), "world_size": world}, progress=False,
    )  # fmt: skip
    test = fnlit.evaluate(eval_step, state, ArrayLoader(*data["test"], batch_size=256, shuffle=False))  # all shards
    agree = ranks_agree(state) if distributed else True
    result = {"test_acc": test["acc"], "test_loss": test["loss"], "world_size": world, "ranks_agree": agree}
    if fnlit.distributed.is_main():  # one line of output, not one per process
        print(
            f"test accuracy {test['acc']:.4f}  test loss {test['loss']:.4f}  ({world} process(es), "
            f"{int(state.step)} steps, params bitwise identical on every rank: {agree}, "
            f"{time.perf_counter() - start:.1f} s)"
        )
    if distributed and owns_group:
        fnlit.distributed.shutdown()
    return result


if __name__ == "__main__":
    main()
