"""Linear regression with a training, a validation and a test step, and MSE metrics.

Lightning's `training_step` / `validation_step` / `test_step` become three plain functions: a training
step `(state, batch) -> (state, metrics)` and one evaluation step `(state, batch) -> metrics` that
`fnlit.fit` runs on the validation data and `fnlit.evaluate` runs on the test data.

Data: a synthetic linear problem with known coefficients and Gaussian noise (std 0.1, so the best
possible MSE, the noise floor, is 0.01), or `--data diabetes`, scikit-learn's diabetes data set (442
patients, 10 features; shipped with the package, no download; features and target standardised). Either
way the result is compared with the closed-form least-squares fit (`torch.linalg.lstsq`) on the same
training split. On the synthetic data gradient descent lands on the same answer: the same test MSE and the
same coefficients. On diabetes it reaches least squares' test MSE, but not its coefficients at the default 30
epochs: the features are correlated (the blood serum measurements), so the loss is nearly flat along some
combinations of coefficients and gradient descent moves along them slowly (the largest coefficient difference is
~0.5 after 30 epochs, ~0.04 after `--epochs 300`), while the predictions they make barely differ.

    python examples/regression.py                    # a few seconds; prints test MSE vs noise floor and lstsq
    python examples/regression.py --data diabetes
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

Batch = tuple[torch.Tensor, torch.Tensor]
Split = dict[str, Batch]
Metrics = dict[str, torch.Tensor]
TrainStep = Callable[[fnlit.TrainState, Batch], tuple[fnlit.TrainState, Metrics]]
EvalStep = Callable[[fnlit.TrainState, Batch], Metrics]


def synthetic(n: int, features: int, noise: float, seed: int) -> tuple[Split, torch.Tensor, torch.Tensor]:
    """``y = x @ w + b + noise``; returns the 70/15/15 splits and the true ``w`` and ``b``."""
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(features, 1, generator=g), torch.randn(1, generator=g)
    x = torch.randn(n, features, generator=g)
    y = x @ w + b + noise * torch.randn(n, 1, generator=g)
    return split(x, y, seed), w, b


def diabetes(seed: int) -> Split:
    """scikit-learn's diabetes regression data, standardised with the training split's statistics."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    s = split(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32).unsqueeze(1), seed)
    (xt, yt) = s["train"]
    mx, sx, my, sy = xt.mean(0), xt.std(0), yt.mean(0), yt.std(0)  # training statistics only: no test leakage
    return {k: ((x - mx) / sx, (y - my) / sy) for k, (x, y) in s.items()}


def split(x: torch.Tensor, y: torch.Tensor, seed: int) -> Split:
    """A seeded 70/15/15 train/validation/test split."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 1))
    a, b = int(0.7 * len(x)), int(0.85 * len(x))
    return {name: (x[i], y[i]) for name, i in (("train", order[:a]), ("val", order[a:b]), ("test", order[b:]))}


def make_steps(model: nn.Module) -> tuple[TrainStep, EvalStep]:
    """The training step and the evaluation step (validation and test share it, as they usually do)."""

    def train_step(state: fnlit.TrainState, batch: Batch) -> tuple[fnlit.TrainState, Metrics]:
        x, y = batch

        def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
            pred, _ = fnlit.apply(model, params, state.buffers, x)
            return F.mse_loss(pred, y)

        mse, grads = fnlit.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"mse": mse}

    def eval_step(state: fnlit.TrainState, batch: Batch) -> Metrics:
        x, y = batch
        pred, _ = fnlit.apply(model, state.params, state.buffers, x, train=False)
        return {"mse": F.mse_loss(pred, y), "mae": F.l1_loss(pred, y)}

    return train_step, eval_step


def least_squares(train: Batch, test: Batch) -> tuple[torch.Tensor, float]:
    """The closed-form fit (with an intercept) on ``train``: its coefficients and its test MSE."""
    def with_ones(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.ones(len(x), 1)], 1)

    coef = torch.linalg.lstsq(with_ones(train[0]), train[1]).solution
    return coef, F.mse_loss(with_ones(test[0]) @ coef, test[1]).item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=["synthetic", "diabetes"], default="synthetic")
    p.add_argument("--samples", type=int, default=2000, help="synthetic examples")
    p.add_argument("--features", type=int, default=8, help="synthetic features")
    p.add_argument("--noise", type=float, default=0.1, help="std of the synthetic noise")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default="runs/regression", help="TensorBoard event files and metrics.csv ('' for none)")
    args = p.parse_args(argv)

    true_w = true_b = None
    if args.data == "synthetic":
        data, true_w, true_b = synthetic(args.samples, args.features, args.noise, args.seed)
    else:
        data = diabetes(args.seed)
    torch.manual_seed(args.seed)  # the initial weights
    model = nn.Linear(data["train"][0].shape[1], 1)

    train = ArrayLoader(*data["train"], batch_size=args.batch_size, shuffle=True)
    total = args.epochs * len(train)
    if total < 1:  # (the schedule needs steps to warm up and decay over)
        p.error(f"no training step to take: {len(train)} batches an epoch, --epochs {args.epochs}. Use a smaller "
                "--batch-size or more --epochs.")
    # Adam with a cosine decay to 0: the last steps are small, so SGD noise averages out and the fit
    # settles near the least-squares solution instead of jittering around it.
    tx = fnlit.optim.adam(fnlit.optim.warmup_cosine(args.lr, warmup_steps=min(len(train), total - 1), decay_steps=total))
    state = fnlit.TrainState.create(model, tx, seed=args.seed)
    train_step, eval_step = make_steps(model)

    start = time.perf_counter()
    state = fnlit.fit(
        train_step, state, train,
        val_data=ArrayLoader(*data["val"], batch_size=512, shuffle=False), eval_step=eval_step,
        max_epochs=args.epochs, log_every_n_steps=10, log_dir=args.log_dir or None, hparams=vars(args), progress=False,
    )  # fmt: skip
    test = fnlit.evaluate(eval_step, state, ArrayLoader(*data["test"], batch_size=512, shuffle=False))  # test_step
    coef, lstsq_mse = least_squares(data["train"], data["test"])
    fitted = torch.cat([state.params["weight"].T, state.params["bias"][:, None]])
    result = {
        "test_mse": test["mse"], "test_mae": test["mae"], "lstsq_test_mse": lstsq_mse,
        "coef_vs_lstsq": (fitted - coef).abs().max().item(),  # how far gradient descent is from the exact fit
    }  # fmt: skip
    line = f"test MSE {test['mse']:.4f} (least squares: {lstsq_mse:.4f}"
    if true_w is not None:
        truth = torch.cat([true_w, true_b[:, None]])
        result["noise_floor"] = args.noise**2
        result["coef_error"] = (fitted - truth).abs().max().item()
        line += f", noise floor: {args.noise**2:.4f}); largest coefficient error {result['coef_error']:.4f}"
    else:
        line += f"); largest coefficient difference from least squares {result['coef_vs_lstsq']:.4f}"
    print(f"{line}  ({int(state.step)} steps, {time.perf_counter() - start:.1f} s)")
    return result


if __name__ == "__main__":
    main()
