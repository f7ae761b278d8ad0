"""Lightning's first tutorial, the autoencoder: train, checkpoint, load the checkpoint into a module, embed.

The Lightning version defines a `LitAutoEncoder(LightningModule)` with a `training_step`, trains it
with `Trainer(...).fit`, then calls `LitAutoEncoder.load_from_checkpoint(path)` and runs its encoder on
a few images. Here the model is a plain `nn.Module`, the training step is a function, `fnlit.fit` saves
checkpoints through a `fnlit.Checkpointer`, and `fnlit.load_module(path, AutoEncoder())` loads the
trained weights into a fresh module for inference: no optimizer, no TrainState needed.

Data: scikit-learn's 8x8 handwritten digits (no download). The reconstruction error is compared with
two references: predicting the mean image (what a model that learned nothing does) and PCA with as many
components as the code has dimensions (the best *linear* autoencoder).

    python examples/autoencoder.py                  # a few seconds; prints the errors and the embeddings
    python examples/autoencoder.py --latent 3       # the tutorial's 3-d code
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

import fnlit
from fnlit.data import ArrayLoader

from _data import digits  # the shared 70/15/15 split of scikit-learn's digits


class AutoEncoder(nn.Module):
    """An MLP encoder to a ``latent``-dimensional code and a decoder back to the 64 pixels."""

    def __init__(self, latent: int = 8, hidden: int = 128) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))




def pca_mse(train: torch.Tensor, test: torch.Tensor, k: int) -> float:
    """Test reconstruction error of a rank-``k`` PCA fitted on ``train``."""
    mean = train.mean(0)
    _, _, v = torch.linalg.svd(train - mean, full_matrices=False)
    basis = v[:k].T
    return F.mse_loss((test - mean) @ basis @ basis.T + mean, test).item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent", type=int, default=8, help="dimensions of the code")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-dir", default=None, help="where the checkpoints go (default: a temporary folder)")
    p.add_argument("--log-dir", default="runs/autoencoder", help="TensorBoard event files and metrics.csv ('' for none)")
    args = p.parse_args(argv)

    data = {k: x for k, (x, _) in digits(args.seed).items()}  # the pixels; labels are not needed
    torch.manual_seed(args.seed)
    model = AutoEncoder(args.latent)

    def train_step(state: fnlit.TrainState, x: torch.Tensor) -> tuple[fnlit.TrainState, dict[str, torch.Tensor]]:
        def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
            x_hat, _ = fnlit.apply(model, params, state.buffers, x)
            return F.mse_loss(x_hat, x)

        loss, grads = fnlit.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    def eval_step(state: fnlit.TrainState, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x_hat, _ = fnlit.apply(model, state.params, state.buffers, x, train=False)
        return {"loss": F.mse_loss(x_hat, x)}

    train = ArrayLoader(data["train"], batch_size=args.batch_size, shuffle=True)
    total = args.epochs * len(train)
    if total < 1:  # (the schedule needs steps to warm up and decay over)
        p.error(f"no training step to take: {len(train)} batches an epoch, --epochs {args.epochs}. Use a smaller "
                "--batch-size or more --epochs.")
    tx = fnlit.optim.adamw(fnlit.optim.warmup_cosine(args.lr, warmup_steps=min(len(train), total - 1), decay_steps=total), weight_decay=1e-4)
    state = fnlit.TrainState.create(model, tx, seed=args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        # Lightning's ModelCheckpoint: keep the best checkpoint by validation loss, and last.ckpt.
        ckpt = fnlit.Checkpointer(args.ckpt_dir or tmp, monitor="val/loss", mode="min", keep_best=1, latent=args.latent)
        start = time.perf_counter()
        state = fnlit.fit(
            train_step, state, train, val_data=ArrayLoader(data["val"], batch_size=512, shuffle=False),
            eval_step=eval_step, max_epochs=args.epochs, log_every_n_steps=10, checkpoint=ckpt,
            log_dir=args.log_dir or None, hparams=vars(args), progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        path = ckpt.best_path  # Lightning's checkpoint_callback.best_model_path (ckpt.last_path: the newest)
        assert path is not None  # there was a validation, so there is a best checkpoint
        # Lightning's `LitAutoEncoder.load_from_checkpoint(path)`: the weights into a fresh module, in eval
        # mode. The code size comes from the metadata stored with the checkpoint (Checkpointer(**meta)).
        trained = fnlit.load_module(path, AutoEncoder(fnlit.checkpoint.read_info(path).meta["latent"]))
        print(f"loaded {path.name} (val/loss {fnlit.checkpoint.read_info(path).metrics['val/loss']:.4f})")

    test = data["test"]
    with torch.no_grad():
        mse = F.mse_loss(trained(test), test).item()
        embeddings = trained.encoder(test[:4])  # embed a few images with the encoder alone
    result = {
        "test_mse": mse,
        "mean_image_mse": F.mse_loss(data["train"].mean(0).expand_as(test), test).item(),
        "pca_mse": pca_mse(data["train"], test, args.latent),
    }
    print(
        f"test reconstruction MSE {mse:.4f} (mean image: {result['mean_image_mse']:.4f}, "
        f"PCA with {args.latent} components: {result['pca_mse']:.4f})  ({int(state.step)} steps, {seconds:.1f} s)"
    )
    print(f"embeddings of 4 test images, shape {tuple(embeddings.shape)}:\n{embeddings}")
    return result


if __name__ == "__main__":
    main()
