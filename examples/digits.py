"""The main job: a handwritten-digit classifier, trained with fnlit, from nothing but pip packages.

Data: scikit-learn's `load_digits` (1,797 real 8x8 handwritten digits, shipped inside the package: no
download), split 70/15/15 into train/validation/test, stratified and seeded. With `--data mnist
--data-dir DIR` it reads torchvision's MNIST from a local copy instead (`--download` fetches it).

    python examples/digits.py                      # ~10-20 s on 2 CPU cores, prints the test accuracy
    python examples/digits.py --amp bf16 --accumulate 2 --width 8
    tensorboard --logdir runs                      # the curves it logged (pip install tensorboard)

`main(argv)` returns the test metrics, so tests (tests/test_examples.py) run it in-process with short
settings and check the accuracy.

The training step is written by hand (the way fnlit is meant to be used), wrapped with transforms,
and driven by `fnlit.fit`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import fnlit
from fnlit.data import ArrayLoader


def digits(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's 8x8 digits as ``{"train"|"val"|"test": (images (N, 1, 8, 8) in [0, 1], labels)}``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    idx = torch.arange(len(y)).numpy()
    train, rest = train_test_split(idx, test_size=0.3, stratify=y.numpy(), random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=y.numpy()[rest], random_state=seed)
    return {name: (x[i], y[i]) for name, i in (("train", train), ("val", val), ("test", test))}


def mnist(data_dir: str, download: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """torchvision's MNIST from ``data_dir``: 55,000 training, 5,000 validation and 10,000 test images."""
    from torchvision.datasets import MNIST

    def load(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            ds = MNIST(data_dir, train=train, download=download)
        except RuntimeError as e:  # torchvision says "use download=True"; this script's flag is --download
            hint = "Check the network, or put MNIST there." if download else "Add --download to fetch it there."
            raise SystemExit(f"digits.py: no MNIST in {data_dir} ({e}). {hint}") from None
        return ds.data.unsqueeze(1).float() / 255.0, ds.targets

    (x, y), test = load(True), load(False)
    return {"train": (x[:55000], y[:55000]), "val": (x[55000:], y[55000:]), "test": test}


def cnn(side: int, width: int = 32) -> nn.Module:
    """Two 3x3 convolutions (``width`` and ``2 * width`` channels), a pooling layer and a classifier head."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.25),
        nn.Linear(2 * width * (side // 2) ** 2, 128), nn.ReLU(), nn.Dropout(0.25),
        nn.Linear(128, 10),
    )


Batch = tuple[torch.Tensor, torch.Tensor]


def make_steps(model: nn.Module) -> tuple[Callable[..., tuple[fnlit.TrainState, dict]], Callable[..., dict]]:
    """The training step (one AdamW update on a batch) and the evaluation step, both pure functions."""

    def train_step(state: fnlit.TrainState, batch: Batch) -> tuple[fnlit.TrainState, dict[str, torch.Tensor]]:
        x, y = batch

        def loss_fn(params):
            logits, buffers = fnlit.apply(model, params, state.buffers, x, rng=state.rng)
            loss = F.cross_entropy(logits, y, label_smoothing=0.05)
            return loss, (buffers, (logits.argmax(-1) == y).float().mean())

        (loss, (buffers, acc)), grads = fnlit.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads, buffers=buffers), {"loss": loss, "acc": acc}

    def eval_step(state: fnlit.TrainState, batch: Batch) -> dict[str, torch.Tensor]:
        x, y = batch
        with torch.no_grad():
            logits, _ = fnlit.apply(model, state.params, state.buffers, x, train=False)
        logits = logits.float()  # (bfloat16/float16 under fnlit.amp: the loss in float32, as autocast gives it)
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}

    return train_step, eval_step


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=["digits", "mnist"], default="digits")
    p.add_argument("--data-dir", default=None, help="MNIST folder (with --data mnist)")
    p.add_argument("--download", action="store_true", help="download MNIST into --data-dir if missing")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off",
                   help="fp16 is for GPUs: CPU float16 convolutions are slow (~2 min here instead of ~10 s)")
    p.add_argument("--accumulate", type=int, default=1, help="split each batch into this many micro-batches")
    p.add_argument("--width", type=int, default=32, help="channels of the first convolution (the second has twice as many)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 is fastest for this small model on a busy machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default="runs/digits", help="TensorBoard event files and metrics.csv ('' for none)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the module's initial weights; everything after lives in the state
    if args.data == "mnist":
        if args.data_dir is None:
            p.error("--data mnist needs --data-dir DIR (add --download to fetch MNIST into it)")
        splits, side = mnist(args.data_dir, args.download), 28
    else:
        splits, side = digits(args.seed), 8
    model = cnn(side, args.width)

    steps_per_epoch = len(splits["train"][0]) // args.batch_size
    total = args.max_steps or args.epochs * steps_per_epoch
    if total < 1:  # (the schedule needs steps to warm up and decay over)
        p.error(f"no training step to take: {steps_per_epoch} batches an epoch, --epochs {args.epochs}. Use a smaller "
                "--batch-size or more --epochs.")
    schedule = fnlit.optim.warmup_cosine(args.lr, warmup_steps=min(max(1, total // 20), total - 1), decay_steps=total)
    tx = fnlit.optim.adamw(schedule, weight_decay=args.weight_decay, mask=fnlit.optim.decay_mask)
    state = fnlit.TrainState.create(model, tx, seed=args.seed, loss_scale="dynamic" if args.amp == "fp16" else None)

    train_step, eval_step = make_steps(model)
    step = train_step
    if args.accumulate > 1:
        step = fnlit.accumulate(step, args.accumulate)
    if args.amp != "off":  # validation and test under the same autocast, as Lightning runs them
        dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
        step, eval_step = fnlit.amp(step, dtype=dtype), fnlit.amp(eval_step, dtype=dtype)

    train = ArrayLoader(*splits["train"], batch_size=args.batch_size, shuffle=True, drop_last=True)
    val = ArrayLoader(*splits["val"], batch_size=256, shuffle=False)
    test = ArrayLoader(*splits["test"], batch_size=256, shuffle=False)
    start = time.perf_counter()
    state = fnlit.fit(
        step, state, train, val_data=val, eval_step=eval_step,
        max_epochs=args.epochs, max_steps=args.max_steps, log_every_n_steps=10,
        log_dir=args.log_dir or None, hparams=vars(args), progress=False if args.no_progress else None,
    )
    result = fnlit.evaluate(eval_step, state, test)
    print(f"test accuracy {result['acc']:.4f}  test loss {result['loss']:.4f}  "
          f"({int(state.step)} steps, {time.perf_counter() - start:.1f} s)")
    return result


if __name__ == "__main__":
    main()
