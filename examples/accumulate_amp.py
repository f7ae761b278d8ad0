"""Gradient accumulation, mixed precision and gradient clipping on one hand-written step.

Lightning's `Trainer(accumulate_grad_batches=4, precision="bf16-mixed", gradient_clip_val=1.0)` is three
independent pieces here, each visible where it acts:

* `fnlit.accumulate(step, 4)` splits every batch into 4 micro-batches, runs forward and backward on
  each (the activation memory of one micro-batch) and applies the mean gradient once. Unlike Lightning,
  which accumulates 4 consecutive loader batches, the loader yields the whole effective batch
  (`--batch-size 128` = 4 micro-batches of 32).
* `fnlit.amp(step, dtype=torch.bfloat16)` runs the forward in autocast; params and optimizer state stay
  float32. With `--amp fp16` the state carries a dynamic loss scale (`loss_scale="dynamic"`) and a step
  whose gradients overflow is skipped by a tensor select, without a host sync.
* Clipping is part of the optimizer: `chain(clip_by_global_norm(1.0), adamw(...))`. It sees the
  accumulated, unscaled gradient, whatever the order of the transforms.

Data: scikit-learn's handwritten digits (no download); the model is a small MLP.

    python examples/accumulate_amp.py                       # bf16, 4 micro-batches, clip at 1.0; a few seconds
    python examples/accumulate_amp.py --amp fp16 --accumulate 2 --clip 0.5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

import fnlit
from fnlit.data import ArrayLoader

from _data import digits  # the shared 70/15/15 split of scikit-learn's digits

Batch = tuple[torch.Tensor, torch.Tensor]




class SkippedSteps(fnlit.callbacks.Callback):
    """Counts the fp16 steps that amp skipped because the gradients overflowed.

    It runs after every step, so it adds tensors and never reads one back (no ``.item()``): the count
    stays on the device until the end.
    """

    def __init__(self) -> None:
        self.count = torch.zeros(())

    def on_step(self, state: fnlit.TrainState, metrics: Mapping[str, torch.Tensor]) -> None:
        if "grads_finite" in metrics:  # only float16 amp reports it
            self.count = self.count + (1 - metrics["grads_finite"])


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="bf16")
    p.add_argument("--accumulate", type=int, default=4, help="micro-batches per batch (per optimizer update)")
    p.add_argument("--clip", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    p.add_argument("--batch-size", type=int, default=128, help="examples per optimizer update")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default="runs/accumulate_amp", help="TensorBoard event files and metrics.csv ('' for none)")
    args = p.parse_args(argv)

    data = digits(args.seed)
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Dropout(0.2), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))

    def train_step(state: fnlit.TrainState, batch: Batch) -> tuple[fnlit.TrainState, dict[str, torch.Tensor]]:
        x, y = batch

        def loss_fn(params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            logits, _ = fnlit.apply(model, params, state.buffers, x, rng=state.rng)
            return F.cross_entropy(logits, y), (logits.argmax(-1) == y).float().mean()

        (loss, acc), grads = fnlit.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads), {"loss": loss, "acc": acc}

    def eval_step(state: fnlit.TrainState, batch: Batch) -> dict[str, torch.Tensor]:
        x, y = batch
        logits, _ = fnlit.apply(model, state.params, state.buffers, x, train=False)
        logits = logits.float()  # (bfloat16/float16 under fnlit.amp: the loss in float32, as autocast gives it)
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}

    train = ArrayLoader(*data["train"], batch_size=args.batch_size, shuffle=True, drop_last=True)
    total = args.epochs * len(train)
    if total < 1:  # (the schedule needs steps to warm up and decay over)
        p.error(f"no training step to take: {len(train)} batches an epoch, --epochs {args.epochs}. Use a smaller "
                "--batch-size or more --epochs.")
    adamw = fnlit.optim.adamw(
        fnlit.optim.warmup_cosine(args.lr, warmup_steps=min(max(1, total // 10), total - 1), decay_steps=total),
        weight_decay=1e-2, mask=fnlit.optim.decay_mask,
    )  # fmt: skip
    tx = fnlit.optim.chain(fnlit.optim.clip_by_global_norm(args.clip), adamw) if args.clip > 0 else adamw
    state = fnlit.TrainState.create(model, tx, seed=args.seed, loss_scale="dynamic" if args.amp == "fp16" else None)

    # The transforms wrap the hand-written step; any order gives the same result.
    step = train_step
    if args.accumulate > 1:
        step = fnlit.accumulate(step, args.accumulate)
    if args.amp != "off":  # validation and test under the same autocast, as Lightning runs them
        dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
        step, eval_step = fnlit.amp(step, dtype=dtype), fnlit.amp(eval_step, dtype=dtype)

    skipped = SkippedSteps()
    start = time.perf_counter()
    state = fnlit.fit(
        step, state, train, val_data=ArrayLoader(*data["val"], batch_size=512, shuffle=False), eval_step=eval_step,
        max_epochs=args.epochs, log_every_n_steps=10, callbacks=[skipped, fnlit.callbacks.LearningRateMonitor()],
        log_dir=args.log_dir or None, hparams=vars(args), progress=False,
    )  # fmt: skip
    test = fnlit.evaluate(eval_step, state, ArrayLoader(*data["test"], batch_size=512, shuffle=False))
    result = {"test_acc": test["acc"], "test_loss": test["loss"], "skipped_steps": float(skipped.count)}
    extra = f", final loss scale {float(state.scaler.scale):g}" if state.scaler is not None else ""
    print(
        f"test accuracy {test['acc']:.4f}  ({int(state.step)} updates of {args.batch_size} examples in "
        f"{args.accumulate} micro-batches, amp {args.amp}, {int(result['skipped_steps'])} skipped{extra}, "
        f"{time.perf_counter() - start:.1f} s)"
    )
    return result


if __name__ == "__main__":
    main()
