"""A hyperparameter search over learning rate and weight decay, each trial a pure function of its config.

`trial(config) -> metrics` builds the model from the config's seed, a fresh TrainState, trains and
evaluates: nothing is shared between trials and nothing global is left behind, so trials can run in any
order, in parallel, or again later with the same result. The search around it is then ordinary code:

* `--search grid` (the default): every (learning rate, weight decay) pair of a small grid;
* `--search optuna`: Optuna's TPE sampler proposes the configs (needs `pip install optuna`);
* `--search ensemble`: the whole grid as **one** run: `fnlit.ensemble_states` stacks one member per
  config (learning rate and weight decay are tensors in the optimizer state, so each member has its
  own), and `fnlit.ensemble` trains them all in one vectorised step. The model has no dropout, so each
  member follows its grid trial up to float rounding, which training amplifies: over the default epochs
  the members' validation losses are within about 0.5 % of their trials' and their accuracies equal
  (tests/test_examples.py checks a short run to 1e-4).

The best config is chosen by validation accuracy; its test accuracy is reported.
Data: scikit-learn's handwritten digits (no download), a small MLP.

    python examples/hparam_search.py                      # 12 trials, a few seconds
    python examples/hparam_search.py --search ensemble    # the same 12 configs in one vectorised run
    python examples/hparam_search.py --search optuna --trials 20
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fnlit
from fnlit.data import ArrayLoader

from _data import digits  # the shared 70/15/15 split of scikit-learn's digits

Batch = tuple[torch.Tensor, torch.Tensor]
Metrics = dict[str, torch.Tensor]
TrainStep = Callable[[fnlit.TrainState, Batch], tuple[fnlit.TrainState, Metrics]]
EvalStep = Callable[[fnlit.TrainState, Batch], Metrics]


@dataclass(frozen=True)
class Config:
    """Everything a trial depends on."""

    lr: float
    weight_decay: float
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0




DATA: dict[str, Batch] = {}  # loaded once; read-only, so trials stay pure functions of their config


def make_model() -> nn.Module:
    """The model (no dropout: nothing random after the init, so ensemble members match solo runs)."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def make_steps(model: nn.Module) -> tuple[TrainStep, EvalStep]:
    def train_step(state: fnlit.TrainState, batch: Batch) -> tuple[fnlit.TrainState, Metrics]:
        x, y = batch

        def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
            logits, _ = fnlit.apply(model, params, state.buffers, x)
            return F.cross_entropy(logits, y)

        loss, grads = fnlit.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    def eval_step(state: fnlit.TrainState, batch: Batch) -> Metrics:
        x, y = batch
        logits, _ = fnlit.apply(model, state.params, state.buffers, x, train=False)
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}

    return train_step, eval_step


def optimizer(weight_decay: float = 1e-2, lr: float = 1e-3) -> fnlit.optim.GradientTransformation:
    """AdamW without decay on biases; a constant rate (an ensemble can sweep a rate, not a schedule)."""
    # weight_decay as a tensor keeps decay "on" even at 0.0, so every config (and every ensemble member)
    # runs the same update rule; a Python 0 would switch the decay step off entirely.
    return fnlit.optim.adamw(lr, weight_decay=torch.tensor(weight_decay), mask=fnlit.optim.decay_mask)


def evaluate(eval_step: EvalStep, state: fnlit.TrainState) -> dict[str, float]:
    """Validation and test metrics of a trained state."""
    val = fnlit.evaluate(eval_step, state, ArrayLoader(*DATA["val"], batch_size=512, shuffle=False))
    test = fnlit.evaluate(eval_step, state, ArrayLoader(*DATA["test"], batch_size=512, shuffle=False))
    return {"val_acc": val["acc"], "val_loss": val["loss"], "test_acc": test["acc"]}


def trial(config: Config) -> dict[str, float]:
    """Trains one model with ``config`` from scratch and returns its validation and test metrics."""
    with torch.random.fork_rng(devices=[]):  # the init draws from the global generator: leave it as it was
        torch.manual_seed(config.seed)
        model = make_model()
    state = fnlit.TrainState.create(model, optimizer(config.weight_decay, config.lr), seed=config.seed)
    train_step, eval_step = make_steps(model)
    train = ArrayLoader(*DATA["train"], batch_size=config.batch_size, shuffle=True)
    state = fnlit.fit(train_step, state, train, max_epochs=config.epochs, seed=config.seed, progress=False)
    return evaluate(eval_step, state)


def ensemble_sweep(configs: list[Config]) -> list[dict[str, float]]:
    """All ``configs`` (same epochs, batch size and seed) trained at once as one vectorised ensemble."""
    base = configs[0]
    model = make_model()  # the architecture; every member is re-initialised from its seed
    states = fnlit.ensemble_states(
        make_model, optimizer(), seeds=[c.seed for c in configs],
        learning_rate=[c.lr for c in configs], weight_decay=[c.weight_decay for c in configs],
    )  # fmt: skip
    train_step, eval_step = make_steps(model)
    step = fnlit.ensemble(train_step, len(configs))
    train = ArrayLoader(*DATA["train"], batch_size=base.batch_size, shuffle=True)
    # fit drives an ensemble like one model (its metrics are logged per member, as "loss/3"); with the
    # same data-order seed, every member sees the batches its solo trial sees.
    states = fnlit.fit(step, states, train, max_epochs=base.epochs, seed=base.seed, progress=False)
    return [evaluate(eval_step, fnlit.unstack_state(states, i)) for i in range(len(configs))]


def optuna_search(n_trials: int, epochs: int, seed: int) -> list[tuple[Config, dict[str, float]]]:
    """Optuna's TPE sampler proposes the configs; each is run by the same pure ``trial``."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results: list[tuple[Config, dict[str, float]]] = []

    def objective(t: optuna.Trial) -> float:
        config = Config(lr=t.suggest_float("lr", 1e-4, 1e-1, log=True),
                        weight_decay=t.suggest_float("weight_decay", 1e-4, 1.0, log=True), epochs=epochs, seed=seed)  # fmt: skip
        metrics = trial(config)
        results.append((config, metrics))
        return metrics["val_acc"]

    optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed)).optimize(objective, n_trials)
    return results


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--search", choices=["grid", "ensemble", "optuna"], default="grid")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    p.add_argument("--weight-decays", type=float, nargs="+", default=[0.0, 0.1, 1.0])
    p.add_argument("--trials", type=int, default=20, help="Optuna trials")
    p.add_argument("--epochs", type=int, default=10, help="epochs per trial")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if args.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            p.error("--search optuna needs the optuna package (pip install optuna); --search grid needs nothing")
    if not DATA:
        DATA.update(digits())

    start = time.perf_counter()
    result: dict[str, float] = {}
    if args.search == "optuna":
        results = optuna_search(args.trials, args.epochs, args.seed)
    else:
        configs = [Config(lr, wd, args.epochs, seed=args.seed) for lr, wd in itertools.product(args.lrs, args.weight_decays)]
        if args.search == "grid":
            results = [(c, trial(c)) for c in configs]
        else:
            results = list(zip(configs, ensemble_sweep(configs)))
    seconds = time.perf_counter() - start

    for config, metrics in results:
        print(f"lr {config.lr:<8g} weight decay {config.weight_decay:<6g} val acc {metrics['val_acc']:.4f}  val loss {metrics['val_loss']:.4f}")
    best_config, best = max(results, key=lambda r: (r[1]["val_acc"], -r[1]["val_loss"]))
    result = {**asdict(best_config), **best, "trials": len(results), "seconds": seconds}
    print(f"best: lr {best_config.lr:g}, weight decay {best_config.weight_decay:g}: val acc {best['val_acc']:.4f}, "
          f"test acc {best['test_acc']:.4f}  ({len(results)} trials, {args.search}, {seconds:.1f} s)")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
