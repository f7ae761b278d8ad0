"""A PyTorch Lightning training script, converted to fnlit line by line (docs/lightning.md shows both).

The Lightning original: a `LightningModule` with `training_step`, `validation_step` and
`configure_optimizers` (AdamW + cosine annealing), and
`Trainer(max_epochs=20, precision="bf16-mixed", accumulate_grad_batches=2, gradient_clip_val=1.0,
callbacks=[EarlyStopping, ModelCheckpoint])`, `trainer.fit(..., ckpt_path="last")`, `trainer.test`, and
`LitClassifier.load_from_checkpoint(best_model_path)`. Run it twice: the second run resumes from
`last.ckpt`, finds the 20 epochs already done, and only tests.

Data: scikit-learn's handwritten digits (no download).

    python examples/from_lightning.py                 # a few seconds; checkpoints in checkpoints/from_lightning
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import fnlit
from fnlit.callbacks import EarlyStopping
from fnlit.data import ArrayLoader

Batch = tuple[torch.Tensor, torch.Tensor]


def digits() -> dict[str, Batch]:
    """The LightningDataModule's job: tensors for train/val/test (8x8 images in [0, 1], labels)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32).reshape(-1, 8, 8) / 16.0, torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    a, b = int(0.7 * len(y)), int(0.85 * len(y))
    return {name: (x[i], y[i]) for name, i in (("train", order[:a]), ("val", order[a:b]), ("test", order[b:]))}


def make_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--fast-dev-run", action="store_true", help="one training and one validation batch, no files")
    p.add_argument("--ckpt-dir", default="checkpoints/from_lightning")
    p.add_argument("--log-dir", default="runs/from_lightning")
    args = p.parse_args(argv)
    data = digits()
    train = ArrayLoader(*data["train"], batch_size=64, shuffle=True, drop_last=True)  # 2 x 32: accumulate_grad_batches=2
    val = ArrayLoader(*data["val"], batch_size=256, shuffle=False)
    test = ArrayLoader(*data["test"], batch_size=256, shuffle=False)

    torch.manual_seed(0)                                   # L.seed_everything(0): the initial weights...
    model = make_model()
    total = args.epochs * len(train)
    if total < 1:  # (the schedule needs steps to warm up and decay over)
        p.error(f"no training step to take: {len(train)} batches an epoch, --epochs {args.epochs}. Use --epochs >= 1.")
    tx = fnlit.optim.chain(                                # configure_optimizers + gradient_clip_val=1.0
        fnlit.optim.clip_by_global_norm(1.0),
        fnlit.optim.adamw(fnlit.optim.cosine_decay(3e-3, total), weight_decay=1e-2),
    )
    state = fnlit.TrainState.create(model, tx, seed=0)     # ...and the state's seed: dropout, data order

    def train_step(state, batch):                          # training_step
        x, y = batch

        def loss_fn(params):
            logits, _ = fnlit.apply(model, params, state.buffers, x, rng=state.rng)
            return F.cross_entropy(logits, y)

        loss, grads = fnlit.value_and_grad(loss_fn)(state.params)
        # (a model with BatchNorm: return apply's new buffers as aux and pass buffers=new_buffers; see the README)
        return state.apply_gradients(grads), {"loss": loss}  # self.log("train/loss", loss)

    def eval_metrics(model, batch):                        # validation_step and test_step
        x, y = batch
        logits = model(x)                                  # the model bound to the state's params, in eval mode
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}

    step = fnlit.amp(fnlit.accumulate(train_step, 2), dtype=torch.bfloat16)  # precision, accumulate_grad_batches
    eval_step = fnlit.amp(fnlit.eval_step(model, eval_metrics), dtype=torch.bfloat16)  # precision, for validation too
    ckpt = fnlit.Checkpointer(args.ckpt_dir, monitor="val/loss", mode="min")  # ModelCheckpoint
    state = fnlit.fit(                                     # Trainer(...).fit(model, datamodule, ckpt_path="last")
        step, state, train, val_data=val, eval_step=eval_step, max_epochs=args.epochs,
        callbacks=[EarlyStopping("val/loss", patience=3)], checkpoint=ckpt, ckpt_path="last",
        log_dir=args.log_dir or None, fast_dev_run=args.fast_dev_run, progress=False,
    )
    result = fnlit.evaluate(eval_step, state, test)        # trainer.test(lit, ...): the final state
    best = ckpt.best_path                                  # checkpoint_callback.best_model_path
    if best is not None:                                   # LitClassifier.load_from_checkpoint(best)
        trained = fnlit.load_module(best, make_model())
        with torch.no_grad():
            result["best_test_acc"] = (trained(data["test"][0]).argmax(-1) == data["test"][1]).float().mean().item()
    print(f"test accuracy {result['acc']:.4f}, best checkpoint {result.get('best_test_acc', float('nan')):.4f}"
          f"  ({int(state.step)} steps)")  # fmt: skip
    return {**result, "steps": int(state.step)}


if __name__ == "__main__":
    main()
