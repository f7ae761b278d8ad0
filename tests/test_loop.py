"""fit/evaluate against a counting step: exact numbers of steps, validations and epochs as Lightning defines them."""

import contextlib
import json
import math
import os
import signal
import warnings

import pytest
import torch
from helpers import assert_trees_equal, clone_tree
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, TensorDataset

import fnlit
from fnlit.callbacks import StopTraining
from fnlit.data import ArrayLoader
from fnlit.loop import evaluate, fit


def make_state(seed=0):
    return fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=seed)


class Counter:
    """A step and an eval step that record every batch they see (batches are example indices)."""

    def __init__(self):
        self.train, self.val, self.epoch_ends = [], [], []

    def step(self, state, batch):
        x = torch.as_tensor(batch[0] if isinstance(batch, (tuple, list)) else batch)
        self.train.append(x.flatten().tolist())
        return state.replace(step=state.step + 1), {"loss": x.float().mean()}

    def eval_step(self, state, batch):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        self.val.append(x.flatten().tolist())
        return {"loss": x.float().mean()}

    def on_epoch_end(self, state, metrics):
        self.epoch_ends.append(metrics["epoch"])


def run(n=10, val=4, **kw):
    c = Counter()
    kw.setdefault("progress", False)
    val_data = ArrayLoader(torch.arange(val), batch_size=1, shuffle=False) if val else None
    state = fit(c.step, make_state(), ArrayLoader(torch.arange(n), batch_size=1), val_data=val_data,
                eval_step=c.eval_step if val else None, callbacks=[c] + kw.pop("callbacks", []), **kw)  # fmt: skip
    return c, state


def test_max_epochs_counts_epochs_and_steps():
    c, state = run(max_epochs=3, num_sanity_val_steps=0)
    assert len(c.train) == 30 and int(state.step) == 30 and c.epoch_ends == [0, 1, 2]
    assert len(c.val) == 3 * 4  # one validation run per epoch (val_check_interval=1.0), all 4 val batches


def test_hooks_assigned_on_a_callback_instance_are_called():
    # The hooks were looked up on the class only: one assigned on a Callback() instance was silently never called.
    import types

    epochs, steps, plain = [], [], []
    cb = fnlit.callbacks.Callback()
    cb.on_epoch_end = lambda state, metrics: epochs.append(metrics["epoch"])
    cb.on_step = lambda state, metrics: steps.append(int(state.step))
    other = types.SimpleNamespace(on_epoch_end=lambda state, metrics: plain.append(metrics["epoch"]))
    run(n=4, val=0, max_epochs=3, callbacks=[cb, other])
    assert epochs == plain == [0, 1, 2] and steps == list(range(1, 13))  # 3 epochs of 4 batches

    class Flagged(fnlit.callbacks.Callback):  # an attribute named like a hook that is no function: not a hook
        def __init__(self):
            self.on_step = True

        def on_epoch_end(self, state, metrics):
            epochs.append(metrics["epoch"])

    epochs.clear()
    run(n=4, val=0, max_epochs=2, callbacks=[Flagged()])
    assert epochs == [0, 1]


def test_max_steps_stops_mid_epoch():
    c, state = run(max_steps=25, val=0)
    assert int(state.step) == 25 and c.epoch_ends == [0, 1]


def test_max_steps_counts_from_the_state_step():
    c = Counter()
    state = make_state().replace(step=torch.tensor(7))
    out = fit(c.step, state, list(range(5)), max_steps=12, progress=False)
    assert int(out.step) == 12 and len(c.train) == 5


@pytest.mark.parametrize("updates", [(2, 2), (0, 1)], ids=["two updates a call", "an update every other call"])
def test_a_resume_counts_calls_of_step_as_the_uninterrupted_run_when_a_call_is_not_one_update(tmp_path, updates):
    # The resumed run took its count of calls from state.step (two per call for alternating GAN updates, one per two
    # calls for an update every other call): max_steps=8 gave 5 or 10 calls in all (cut after 3), validations and log rows shifted.
    # Reference: the uninterrupted run's params, calls, validations and metrics.csv.
    from fnlit.checkpoint import Checkpointer

    def run(folder, interrupt=False, resume=False):
        calls, validated = [], []

        def step(state, batch):  # sgd on the gradient x: the params say which batches were applied, and how often
            calls.append(int(batch))
            for _ in range(updates[int(batch) % 2]):
                state = state.apply_gradients({k: torch.full_like(v, float(batch)) for k, v in state.params.items()})
            return state, {"loss": batch.float().mean()}

        class Interrupt(fnlit.callbacks.Callback):
            def on_step(self, state, metrics):
                if interrupt and len(calls) == 3:
                    raise KeyboardInterrupt

        torch.manual_seed(0)  # (the same initial params in every run)
        state = fit(step, make_state(), ArrayLoader(torch.arange(5), batch_size=1, shuffle=False), max_steps=8,
                    val_data=[torch.tensor(0.0)], eval_step=lambda s, b: validated.append(len(calls)) or {"m": b},
                    val_check_interval=4, check_val_every_n_epoch=None, num_sanity_val_steps=0, log_every_n_steps=2,
                    log_dir=str(folder), callbacks=[Interrupt()], checkpoint=Checkpointer(folder / "ck"),
                    ckpt_path="last" if resume else None, progress=False)  # fmt: skip
        return state, calls, validated

    ref, ref_calls, ref_validated = run(tmp_path / "ref")
    assert ref_calls == [0, 1, 2, 3, 4, 0, 1, 2] and ref_validated == [4, 8]  # max_steps=8: 8 calls
    _, first_calls, _ = run(tmp_path / "logs", interrupt=True)
    state, calls, validated = run(tmp_path / "logs", resume=True)
    assert first_calls + calls == ref_calls and [3 + v for v in validated] == ref_validated
    assert_trees_equal((state.params, state.opt_state, state.step), (ref.params, ref.opt_state, ref.step))
    assert (tmp_path / "logs" / "metrics.csv").read_text() == (tmp_path / "ref" / "metrics.csv").read_text()


def test_default_max_epochs_is_1000_like_lightning():
    c, state = run(n=1, val=0)
    assert int(state.step) == 1000 and len(c.epoch_ends) == 1000


def test_min_epochs_defers_a_stop_request():
    class StopAtOnce:
        def on_step(self, state, metrics):
            raise StopTraining

    c, state = run(max_epochs=10, min_epochs=3, val=0, callbacks=[StopAtOnce()])
    assert c.epoch_ends == [0, 1, 2] and int(state.step) == 30
    c, state = run(max_epochs=10, val=0, callbacks=[StopAtOnce()])
    assert int(state.step) == 1 and c.epoch_ends == []


def test_limit_train_batches_int_and_fraction():
    assert len(run(max_epochs=2, val=0, limit_train_batches=4)[0].train) == 8
    assert len(run(max_epochs=2, val=0, limit_train_batches=0.5)[0].train) == 10
    assert len(run(max_epochs=2, val=0, limit_train_batches=0)[0].train) == 0
    with pytest.raises(ValueError, match=r"limit_train_batches=0.05, but 0.05 \* 10 batches < 1"):
        run(max_epochs=1, val=0, limit_train_batches=0.05)


def test_limit_val_batches():
    assert len(run(max_epochs=2, limit_val_batches=2, num_sanity_val_steps=0)[0].val) == 4
    assert len(run(max_epochs=2, limit_val_batches=0.5, num_sanity_val_steps=0)[0].val) == 4
    assert len(run(max_epochs=2, limit_val_batches=0)[0].val) == 0


@pytest.mark.parametrize("n", [True, 3])
def test_fast_dev_run(n, tmp_path):
    plans = []

    class Plans:
        def on_fit_start(self, state, p):
            plans.append(dict(p))

    plan = Plans()
    c, state = run(max_epochs=5, fast_dev_run=n, log_dir=str(tmp_path / "logs"), callbacks=[plan])
    k = int(n)
    assert len(c.train) == k and len(c.val) == k and c.epoch_ends == [0]  # no sanity check either
    assert not (tmp_path / "logs").exists()  # no logging
    run(max_epochs=5, callbacks=[plan])
    # callbacks are told (Lightning's trainer.fast_dev_run), with the one epoch fast_dev_run forces
    assert [(p["fast_dev_run"], p["max_epochs"]) for p in plans] == [(True, 1), (False, 5)]


def test_fast_dev_run_runs_its_batches_from_a_restored_step():
    c = Counter()
    state = fit(c.step, make_state().replace(step=torch.tensor(100)), ArrayLoader(torch.arange(10), batch_size=1),
                val_data=[torch.tensor([1.0])], eval_step=c.eval_step, fast_dev_run=2, callbacks=[c], progress=False)  # fmt: skip
    assert int(state.step) == 102 and len(c.train) == 2 and len(c.val) == 1


def test_stop_training_from_on_log_stops_fit_and_saves_on_exit(tmp_path):
    from fnlit.checkpoint import Checkpointer

    class StopAtFour:
        def on_log(self, state):
            if int(state.step) >= 4:
                raise StopTraining("enough")
            return {}

    ck = Checkpointer(tmp_path / "ck")
    state = fit(Counter().step, make_state(), ArrayLoader(torch.arange(10), batch_size=1), max_epochs=3,
                log_every_n_steps=2, callbacks=[StopAtFour()], checkpoint=ck, progress=False)  # fmt: skip
    assert int(state.step) == 4 and ck.last_path is not None and ck.last_path.name == "step=00000004.ckpt"


def test_overfit_batches_uses_the_same_first_batches_unshuffled():
    c, _ = run(max_epochs=3, overfit_batches=2, num_sanity_val_steps=0)
    assert c.train == [[0], [1]] * 3 and c.val == [[0], [1]] * 3  # validation on 2 batches too


@pytest.mark.parametrize("kind", ["shuffle", "batch_sampler", "distributed"])
def test_overfit_batches_unshuffles_a_dataloader(kind):
    from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler

    ds = torch.arange(12)
    reference = [b.tolist() for b in DataLoader(ds, batch_size=2)][:2]  # the first 2 batches, unshuffled
    if kind == "shuffle":
        data = DataLoader(ds, batch_size=2, shuffle=True)
    elif kind == "batch_sampler":
        data = DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 2, drop_last=False))
    else:  # one process standing in for rank 0 of 2: its shard, unshuffled
        data = DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=3))
        reference = [b.tolist() for b in DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, 2, 0, shuffle=False))][:2]
    c = Counter()
    fit(c.step, make_state(), data, max_epochs=2, overfit_batches=2, callbacks=[c], progress=False)
    assert c.train == reference * 2


class _Scaled(DataLoader):
    """A DataLoader subclass that post-processes its batches in __iter__."""

    def __iter__(self):
        return (b * 100 for b in super().__iter__())


def test_overfit_batches_keeps_a_dataloader_subclass_and_refuses_to_rebuild_a_shuffling_one():
    """overfit_batches rebuilt a DataLoader subclass as a plain DataLoader: its __iter__ was dropped and the step
    trained on other data. Unshuffled, it is used as it is; shuffled, it cannot be rebuilt faithfully: refused."""
    ds = torch.arange(12)
    reference = [(b * 100).tolist() for b in DataLoader(ds, batch_size=2)][:2]  # the subclass's first 2 batches, by hand
    c = Counter()
    fit(c.step, make_state(), _Scaled(ds, batch_size=2), max_epochs=2, overfit_batches=2, callbacks=[c], progress=False)
    assert c.train == reference * 2
    with pytest.raises(ValueError, match=r"shuffling _Scaled \(a DataLoader subclass\) as train_data.*shuffle=False"):
        fit(c.step, make_state(), _Scaled(ds, batch_size=2, shuffle=True), max_epochs=1, overfit_batches=2, progress=False)
    with pytest.raises(ValueError, match=r"as val_data.*or pass a plain DataLoader"):
        fit(c.step, make_state(), DataLoader(ds, batch_size=2), val_data=_Scaled(ds, batch_size=2, shuffle=True),
            eval_step=c.eval_step, max_epochs=1, overfit_batches=2, progress=False)  # fmt: skip
    if "in_order" in DataLoader.__init__.__code__.co_varnames:  # (torch >= 2.6) kept when a plain one is rebuilt
        plain = DataLoader(ds, batch_size=2, shuffle=True, in_order=False)
        assert fnlit.data.unshuffled(plain).in_order is False


@pytest.mark.parametrize(
    "interval, every_n, epochs, expected",
    [(0.25, 1, 1, 5), (1.0, 1, 2, 2), (3, 1, 2, 6), (3, None, 2, 6), (4, None, 2, 5), (1, 1, 1, 10)],
)
def test_val_check_interval(interval, every_n, epochs, expected):
    # float: every max(1, int(10 * f)) batches; int: every N batches of the epoch (not at its end unless
    # it is a multiple); with check_val_every_n_epoch=None, N counts batches across epochs.
    c, _ = run(max_epochs=epochs, val=1, val_check_interval=interval, check_val_every_n_epoch=every_n, num_sanity_val_steps=0)
    assert len(c.val) == expected


@pytest.mark.parametrize("interval", [0.5, 1.0])
def test_a_float_val_check_interval_without_check_val_every_n_epoch_is_refused_as_lightning_does(interval):
    # 0.5 validated every int(0.5 * 10) = 5 global steps, silently, not at fractions of epochs. Lightning:
    # "`val_check_interval` should be an integer when `check_val_every_n_epoch=None`". Left unset, it stays allowed
    # (every 10 steps: 2 validations in 2 epochs, by hand).
    match = rf"val_check_interval to be an int .* when check_val_every_n_epoch=None .* got val_check_interval={interval}"
    with pytest.raises(ValueError, match=match):
        run(max_epochs=2, val=1, val_check_interval=interval, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    c, _ = run(max_epochs=2, val=1, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    assert len(c.val) == 2


def test_check_val_every_n_epoch():
    c, _ = run(max_epochs=5, val=1, check_val_every_n_epoch=2, num_sanity_val_steps=0)
    assert len(c.val) == 2  # after epochs 1 and 3


@pytest.mark.parametrize("sanity, expected", [(2, 2), (0, 0), (-1, 4), (10, 4)])
def test_num_sanity_val_steps(sanity, expected):
    c, _ = run(max_epochs=1, limit_val_batches=0, val=4)  # validation off: no sanity check
    assert c.val == []
    c, _ = run(max_epochs=1, val=4, num_sanity_val_steps=sanity, val_check_interval=1.0, check_val_every_n_epoch=2)
    assert len(c.val) == expected  # check_val_every_n_epoch=2: epoch 0 does not validate, only the sanity check


class _Rows:
    """A writer keeping its rows in a list (purged as the built-in writers are on a resume)."""

    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def log_hparams(self, hparams):
        pass

    def flush(self):
        pass

    def close(self):
        pass

    def purge(self, step):
        self.rows = [r for r in self.rows if r[0] < step]


def test_log_every_n_steps_means_and_one_sync_per_interval(monkeypatch):
    rows = _Rows()
    c = Counter()
    data = [torch.tensor([float(i)]) for i in range(10)]
    calls = {"tolist": 0, "item": 0, "__float__": 0}
    for name in calls:
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real, _n=name: calls.__setitem__(_n, calls[_n] + 1) or _r(self, *a))
    fit(lambda s, b: (s.replace(step=s.step + 1), {"loss": b.mean()}), make_state(), data, max_epochs=1,
        log_every_n_steps=4, loggers=[rows], progress=False)  # fmt: skip
    monkeypatch.undo()
    assert [s for s, _ in rows.rows] == [4, 8, 10]  # and the partial interval at the end
    assert [m["train/loss"] for _, m in rows.rows] == [1.5, 5.5, 8.5]
    assert calls == {"tolist": 3, "item": 0, "__float__": 0}  # one host sync per interval, none per step
    assert c.train == []


class _GraphMetrics:
    """A step logging metrics that hold more than their values: one through the module's own parameters (it
    requires grad: its autograd graph keeps the hidden activation), and views of a large tensor (one detached)."""

    def __init__(self, by_hand=False):
        torch.manual_seed(0)
        self.lin1, self.lin2 = torch.nn.Linear(4, 256), torch.nn.Linear(256, 1)
        self.by_hand, self.held = by_hand, []  # each step's hidden activation's and large tensor's memory, weakly

    def step(self, state, batch):
        hidden = torch.relu(self.lin1(batch))  # saved by lin2 for the backward pass
        big = torch.outer(batch[:, 0], torch.linspace(0, 1, 4096))  # (4, 4096), no grad
        metrics = {"mse": self.lin2(hidden).pow(2).mean(), "parts": {"h2": hidden.square().mean()},
                   "big0": big[1, 7], "big1": big[2, 9].detach()}  # fmt: skip
        if self.by_hand:  # what Lightning's self.log keeps: detached values of their own
            metrics = {"mse": metrics["mse"].detach(), "parts": {"h2": metrics["parts"]["h2"].detach()},
                       "big0": big[1, 7].clone(), "big1": big[2, 9].clone()}  # fmt: skip
        self.held.append((StorageWeakRef(hidden.untyped_storage()), StorageWeakRef(big.untyped_storage())))
        return state.replace(step=state.step + 1), metrics

    def on_step(self, state, metrics):
        # The step's own metrics are alive (the hooks are given them); the earlier steps' are only in the log interval.
        self.alive = [(not h.expired(), not b.expired()) for h, b in self.held[:-1]]
        assert not any(any(a) for a in self.alive), self.alive


def test_the_log_interval_keeps_metrics_detached_not_their_graphs_or_viewed_tensors():
    # fit kept each step's metrics as returned until the row: a metric requiring grad held its step's graph and
    # activations, a view its whole tensor, for log_every_n_steps steps (1000 steps of an MLP: 3.3 GB instead of 0.6).
    data = [torch.randn(4, 4, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    logged = {}
    for by_hand in (False, True):
        rows, m = _Rows(), _GraphMetrics(by_hand)
        fit(m.step, make_state(), data, max_epochs=1, log_every_n_steps=4, loggers=[rows], callbacks=[m],
            progress=False)  # fmt: skip
        assert len(m.alive) == 5  # (checked after each step, before its row: every earlier step of the interval)
        logged[by_hand] = rows.rows
    assert [s for s, _ in logged[False]] == [4, 6]
    assert logged[False] == logged[True]  # bitwise the values of the metrics detached by hand


def test_data_order_is_reshuffled_per_epoch_from_the_state_seed():
    a, _ = run(max_epochs=2, val=0)
    b, _ = run(max_epochs=2, val=0)
    assert a.train == b.train and a.train[:10] != a.train[10:]
    loader = ArrayLoader(torch.arange(10), batch_size=1)
    seed = int(make_state().rng)
    assert a.train[10:] == [x.tolist() for x in loader.batches(1, seed)]
    c = Counter()
    fit(c.step, make_state(), loader, max_epochs=1, seed=123, progress=False)
    assert c.train == [x.tolist() for x in loader.batches(0, 123)]


def test_a_resume_keeps_the_checkpoints_seed_and_warns_about_another_one_passed(tmp_path):
    # seed= on resume was ignored silently; the docstring read as if only the default came from the checkpoint.
    from fnlit.checkpoint import Checkpointer

    loader = ArrayLoader(torch.arange(8), batch_size=2)  # shuffled per epoch from the seed
    c = Counter()
    fit(c.step, make_state(), loader, max_steps=2, seed=1, checkpoint=Checkpointer(tmp_path), progress=False)
    with pytest.warns(UserWarning, match=r"fit resumes with the checkpoint's data-order seed 1, not seed=2: the resumed "
                                         r"epoch must be replayed in the order it began in"):  # fmt: skip
        fit(c.step, make_state(), loader, max_steps=8, seed=2, checkpoint=Checkpointer(tmp_path), ckpt_path="last",
            progress=False)  # fmt: skip
    assert c.train == [x.tolist() for e in range(2) for x in loader.batches(e, 1)]  # the seed-1 run's, uncut
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same seed again, or none: untold
        for seed in (1, None):
            fit(c.step, make_state(), loader, max_steps=9, seed=seed, checkpoint=Checkpointer(tmp_path),
                ckpt_path="last", progress=False)  # fmt: skip


def test_the_resume_seed_warning_is_rank_0s_alone(tmp_path):
    # Every rank takes rank 0's seed, so a per-rank seed (seed=1 + rank, common) is never told in a fresh run; on
    # the resume rank 1 alone warned about its own (an error under warnings-as-errors, on one rank only).
    from _dist_workers import resume_with_a_seed_per_rank

    assert fnlit.distributed.launch(resume_with_a_seed_per_rank, 2, str(tmp_path), timeout=120,
                                    collective_timeout=30) == [[[], []], [[], []]]  # fmt: skip


def test_dataloader_random_sampler_is_seeded_per_epoch():
    dl = DataLoader(TensorDataset(torch.arange(12)), batch_size=3, shuffle=True)
    a, b = Counter(), Counter()
    fit(a.step, make_state(), dl, max_epochs=2, progress=False)
    fit(b.step, make_state(), dl, max_epochs=2, progress=False)
    assert a.train == b.train and a.train[:4] != a.train[4:]
    assert sorted(sum(a.train[:4], [])) == list(range(12))


def test_any_iterable_and_endless_data():
    c = Counter()
    fit(c.step, make_state(), [torch.tensor([i]) for i in range(3)], max_epochs=2, progress=False)
    assert c.train == [[0], [1], [2]] * 2

    def endless():
        i = 0
        while True:
            yield torch.tensor([i])
            i += 1

    c = Counter()
    state = fit(c.step, make_state(), endless(), max_steps=7, progress=False)
    assert int(state.step) == 7 and c.train[-1] == [6]
    with pytest.raises(ValueError, match="endless training data .* neither max_epochs nor max_steps"):
        fit(c.step, make_state(), endless(), progress=False)


def test_one_shot_iterator_ends_after_it_runs_out_and_says_so():
    c = Counter()
    with pytest.warns(UserWarning, match=r"yielded no batches in epoch 1 \(a one-shot iterator is used up by its first "
                      r"pass\): training stops at step 4, before max_epochs/max_steps"):
        state = fit(c.step, make_state(), iter([torch.tensor([i]) for i in range(4)]), max_epochs=3, progress=False)
    assert int(state.step) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a limit reached with the iterator: nothing to say
        fit(c.step, make_state(), iter([torch.tensor([i]) for i in range(4)]), max_epochs=1, progress=False)
        fit(c.step, make_state(), iter([torch.tensor([i]) for i in range(4)]), max_steps=4, progress=False)


def test_empty_training_data():
    with pytest.raises(ValueError, match="empty training data"):
        fit(Counter().step, make_state(), [], max_epochs=1, progress=False)
    with pytest.raises(ValueError, match="empty training data"):
        fit(Counter().step, make_state(), iter([]), max_epochs=1, progress=False)


@pytest.mark.parametrize("val_data", [
    [],
    ArrayLoader(torch.arange(3), batch_size=4, drop_last=True),
    DataLoader(torch.arange(3), batch_size=4, drop_last=True),
], ids=["list", "ArrayLoader", "DataLoader"])
def test_val_data_with_no_batches_is_refused_unless_limit_val_batches_turns_validation_off(val_data, tmp_path):
    # Validation was turned off silently (a Checkpointer(monitor="val/loss") was told "no val_data, or
    # limit_val_batches=0"), or a fraction limit divided by zero, while evaluate() on the same data raised.
    assert len(list(val_data)) == 0  # the reference: iterating it yields nothing (3 examples: no whole batch of 4)
    c = Counter()
    train = ArrayLoader(torch.arange(4), batch_size=2)
    for options in ({}, {"num_sanity_val_steps": 0}, {"limit_val_batches": 0.5}, {"limit_val_batches": 2},
                    {"fast_dev_run": True}, {"checkpoint": fnlit.Checkpointer(tmp_path, monitor="val/loss")}):
        with pytest.raises(ValueError, match=r"fit got val_data with no batches, so it would never validate\. .*"
                                             r"drop_last=True .* Pass limit_val_batches=0"):
            fit(c.step, make_state(), train, val_data=val_data, eval_step=c.eval_step, max_epochs=1, progress=False,
                **options)  # fmt: skip
    assert c.train == [] and c.val == []  # refused before any step
    for limit in (0, 0.0):  # Lightning's documented way to turn validation off: no validation, no error
        state = fit(c.step, make_state(), train, val_data=val_data, eval_step=c.eval_step, max_epochs=1, progress=False,
                    limit_val_batches=limit)  # fmt: skip
        assert int(state.step) == 2 and c.val == []


def test_val_data_without_a_len_and_no_batches_raises_at_its_first_validation():
    class NoLen:  # (as a DataLoader over an IterableDataset): fit cannot count it before reading it
        def __iter__(self):
            return iter(())

    for sanity, steps in ((2, 0), (0, 2)):  # the sanity check reads it before any step; without one, epoch 0's end
        c = Counter()
        with pytest.raises(ValueError, match=r"evaluate got no batches .* drop_last=True"):
            fit(c.step, make_state(), ArrayLoader(torch.arange(4), batch_size=2), val_data=NoLen(), eval_step=c.eval_step,
                max_epochs=1, num_sanity_val_steps=sanity, progress=False)  # fmt: skip
        assert len(c.train) == steps
    state = fit(c.step, make_state(), ArrayLoader(torch.arange(4), batch_size=2), val_data=NoLen(), eval_step=c.eval_step,
                max_epochs=1, limit_val_batches=0, progress=False)  # fmt: skip
    assert int(state.step) == 2


def test_val_check_interval_larger_than_the_epoch():
    with pytest.raises(ValueError, match=r"val_check_interval=20, more than the 10 training batches .* check_val_every_n_epoch=None"):
        run(max_epochs=1, val_check_interval=20)


def test_non_scalar_eval_metric():
    with pytest.raises(ValueError, match=r"eval step returned metric 'x' of shape \(2,\)"):
        fit(Counter().step, make_state(), [torch.zeros(1)], max_epochs=1, val_data=[torch.zeros(2)],
            eval_step=lambda s, b: {"x": b}, progress=False)  # fmt: skip


def test_non_scalar_train_metric():
    with pytest.raises(ValueError, match=r"training step returned metric 'y' of shape \(3,\)"):
        fit(lambda s, b: (s, {"y": torch.zeros(3)}), make_state(), [0, 1], max_epochs=1, progress=False)


def test_metric_name_collisions():
    with pytest.raises(ValueError, match="collision: 'loss' comes from both the training step and the eval step"):
        run(max_epochs=1, prefixes=("", ""), log_every_n_steps=1, num_sanity_val_steps=0)

    class Clash:
        def on_log(self, state):
            return {"train/loss": torch.tensor(0.0)}

    with pytest.raises(ValueError, match="'train/loss' comes from both the training step and Clash"):
        run(max_epochs=1, val=0, callbacks=[Clash()], log_every_n_steps=1)
    with pytest.raises(ValueError, match="'epoch' comes from both fit and the training step"):
        fit(lambda s, b: (s, {"epoch": torch.tensor(0.0)}), make_state(), [0], max_epochs=1, prefixes=("", "val/"), progress=False)


class FakeCheckpoint:
    def __init__(self, restored=None):
        self.calls, self.restored = [], restored

    def restore(self, path, like):
        self.calls.append(("restore", path))
        return self.restored

    # Positions as recorded: where the data stands ("log_pending", the log interval's metrics, and "log_tail", a
    # finished run's last rows, are tested on their own, in test_summary)
    def on_step(self, state, position):
        self.calls.append(("step", int(state.step), _where(position)))

    def on_validation(self, state, position, metrics):
        self.calls.append(("validation", int(state.step), _where(position), dict(metrics)))

    def on_epoch_end(self, state, position):
        self.calls.append(("epoch_end", int(state.step), _where(position)))

    def on_exit(self, state, position, reason):
        self.calls.append(("exit", int(state.step), _where(position), reason))


def _where(position):
    return {k: v for k, v in position.items() if k not in ("log_pending", "log_tail")}


def test_checkpoint_hook_calls_and_positions():
    ck = FakeCheckpoint()
    c = Counter()
    seed = int(make_state().rng)
    fit(c.step, make_state(), ArrayLoader(torch.arange(3), batch_size=1), max_epochs=2, checkpoint=ck,
        val_data=[torch.tensor([1.0]), torch.tensor([3.0])], eval_step=c.eval_step, progress=False)  # fmt: skip
    pos = lambda e, b: {"epoch": e, "batch": b, "seed": seed, "steps": 3 * e + b, "batches_per_epoch": 3}  # noqa: E731
    # A batch's validation comes before its step's checkpoint: a run killed while validating resumes
    # from the checkpoint before, and validates again.
    assert ck.calls == [
        ("step", 1, pos(0, 1)), ("step", 2, pos(0, 2)),
        ("validation", 3, pos(0, 3), {"val/loss": 2.0}), ("step", 3, pos(0, 3)), ("epoch_end", 3, pos(1, 0)),
        ("step", 4, pos(1, 1)), ("step", 5, pos(1, 2)),
        ("validation", 6, pos(1, 3), {"val/loss": 2.0}), ("step", 6, pos(1, 3)), ("epoch_end", 6, pos(2, 0)),
        ("exit", 6, pos(2, 0), "finished"),
    ]  # fmt: skip


class Unsized:
    """Re-iterable data without a length (an IterableDataset's DataLoader): its epochs end when it runs out."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter([torch.tensor([i]) for i in range(self.n)])


def test_a_mid_epoch_resume_on_another_number_of_processes_warns():
    restored = (make_state().replace(step=torch.tensor(3)), {"epoch": 0, "batch": 3, "seed": 42, "world_size": 2})
    with pytest.warns(UserWarning, match=r"resumes in the middle of epoch 0 \(batch 3 of each rank\) on 1 process\(es\), but the checkpoint was saved on 2"):
        fit(Counter().step, make_state(), ArrayLoader(torch.arange(10), batch_size=1), max_epochs=1,
            checkpoint=FakeCheckpoint(restored), ckpt_path="last", progress=False)  # fmt: skip


def test_a_mid_epoch_resume_with_another_batch_size_warns(tmp_path):
    """The position counts batches: stopped after 3 batches of 4 and resumed with batch_size=8, the run skipped 24
    of the epoch's 40 examples without a word (it saw 28). The reference: an uninterrupted epoch sees all 40."""
    from fnlit.checkpoint import Checkpointer

    class Stop:
        def on_step(self, state, metrics):
            if int(state.step) == 3:
                raise StopTraining

    x = torch.arange(40)
    first, resumed = Counter(), Counter()
    fit(first.step, make_state(), ArrayLoader(x, batch_size=4), max_epochs=1, checkpoint=Checkpointer(tmp_path),
        callbacks=[Stop()], progress=False)  # fmt: skip
    with pytest.warns(UserWarning, match=(
        r"resumes in the middle of epoch 0 \(batch 3 of each rank\) with 5 batches per epoch, but the checkpoint was "
        r"saved with 10 \(another batch size or dataset\).*seen twice or not at all.*same batch size"
    )):  # fmt: skip
        fit(resumed.step, make_state(), ArrayLoader(x, batch_size=8), max_epochs=1, checkpoint=Checkpointer(tmp_path),
            ckpt_path="last", progress=False)  # fmt: skip
    assert len(sum(first.train + resumed.train, [])) < len(x)  # what the warning is about
    # the same batch size: no warning (warnings are errors here), and the epoch whole
    again = Counter()
    fit(again.step, make_state(), ArrayLoader(x, batch_size=4), max_epochs=1, checkpoint=Checkpointer(tmp_path / "b"),
        callbacks=[Stop()], progress=False)  # fmt: skip
    fit(again.step, make_state(), ArrayLoader(x, batch_size=4), max_epochs=1, checkpoint=Checkpointer(tmp_path / "b"),
        ckpt_path="last", progress=False)  # fmt: skip
    assert sorted(sum(again.train, [])) == list(range(40))
    # a checkpoint saved before the count was recorded resumes as it did, untold
    restored = (make_state().replace(step=torch.tensor(3)), {"epoch": 0, "batch": 3, "seed": 42})
    fit(Counter().step, make_state(), ArrayLoader(x, batch_size=8), max_epochs=1,
        checkpoint=FakeCheckpoint(restored), ckpt_path="last", progress=False)  # fmt: skip


@pytest.mark.parametrize("batch_size", [2, 8])
def test_a_resume_from_an_epochs_end_with_another_batch_size_starts_the_next_epoch_untold(batch_size):
    """Saved at the last of 10 batches of epoch 0 (an epoch-end best's position): the epoch was whole, so with
    another batch size nothing is skipped or repeated. Reference by hand: epochs 1 and 2, 40 examples each, and the
    end of epoch 0 (its hooks had not run at that save) before them; no warning (warnings are errors here)."""
    x = torch.arange(40)
    restored = (make_state().replace(step=torch.tensor(10)),
                {"epoch": 0, "batch": 10, "seed": 42, "batches_per_epoch": 10})  # fmt: skip
    c = Counter()
    fit(c.step, make_state(), ArrayLoader(x, batch_size=batch_size), max_epochs=3, checkpoint=FakeCheckpoint(restored),
        ckpt_path="last", callbacks=[c], progress=False)  # fmt: skip
    seen = sum(c.train, [])
    assert len(seen) == 80 and sorted(seen) == sorted(list(range(40)) * 2)
    assert c.epoch_ends == [0, 1, 2]


@pytest.mark.parametrize("saved_length", [5, 10])
def test_a_resume_from_an_epochs_end_on_another_number_of_processes_starts_the_next_epoch_untold(saved_length):
    """Saved on 2 ranks at the last batch of epoch 0 (5 batches a rank; or 10, another batch size), resumed on 1
    process: fit resumed correctly but warned that examples of the epoch were seen twice or not at all and to
    resume "from a checkpoint saved at an epoch's end" -- which this is. Reference by hand: epochs 1 and 2 whole
    (10 examples each) after epoch 0's end; no warning (warnings are errors here)."""
    x = torch.arange(10)
    restored = (make_state().replace(step=torch.tensor(saved_length)),
                {"epoch": 0, "batch": saved_length, "seed": 42, "world_size": 2, "batches_per_epoch": saved_length})
    c = Counter()
    fit(c.step, make_state(), ArrayLoader(x, batch_size=1), max_epochs=3, checkpoint=FakeCheckpoint(restored),
        ckpt_path="last", callbacks=[c], progress=False)  # fmt: skip
    seen = sum(c.train, [])
    assert sorted(seen) == sorted(list(range(10)) * 2)
    assert c.epoch_ends == [0, 1, 2]


def test_a_resume_from_an_epochs_end_set_by_limit_train_batches_on_another_number_of_processes_is_untold():
    # Saved on 2 ranks at batch 3 of 5 with limit_train_batches=3: that epoch's end. Reference by hand: epoch 1's
    # first 3 batches after epoch 0's end, nothing of epoch 0 again; no warning (warnings are errors here).
    restored = (make_state().replace(step=torch.tensor(3)),
                {"epoch": 0, "batch": 3, "seed": 42, "world_size": 2, "batches_per_epoch": 5})
    c = Counter()
    fit(c.step, make_state(), ArrayLoader(torch.arange(10), batch_size=2, shuffle=False), max_epochs=2,
        checkpoint=FakeCheckpoint(restored), ckpt_path="last", callbacks=[c], progress=False, limit_train_batches=3)
    assert c.epoch_ends == [0, 1] and c.train == [[0, 1], [2, 3], [4, 5]]


def test_resume_at_the_last_batch_of_an_epoch_of_data_without_a_length():
    # A checkpoint saved at the epoch's last batch: the resumed run finds that epoch's data spent and goes on.
    restored = (make_state().replace(step=torch.tensor(3)), {"epoch": 0, "batch": 3, "seed": 42})
    c = Counter()
    state = fit(c.step, make_state(), Unsized(3), max_epochs=2, checkpoint=FakeCheckpoint(restored), ckpt_path="last",
                callbacks=[c], progress=False)  # fmt: skip
    assert int(state.step) == 6 and c.train == [[0], [1], [2]] and c.epoch_ends == [0, 1]


def test_data_without_a_length_shorter_than_limit_train_batches_ends_its_epochs():
    # Lightning's rule: the limit is an upper bound; an epoch ends when the data runs out, then the next starts.
    c = Counter()
    state = fit(c.step, make_state(), Unsized(3), max_epochs=3, limit_train_batches=5, val_data=[torch.tensor([1.0])],
                eval_step=c.eval_step, num_sanity_val_steps=0, callbacks=[c], progress=False)  # fmt: skip
    assert int(state.step) == 9 and c.train == [[0], [1], [2]] * 3 and c.epoch_ends == [0, 1, 2] and len(c.val) == 3
    c = Counter()  # a limit below the data's length still cuts each epoch
    fit(c.step, make_state(), Unsized(3), max_epochs=2, limit_train_batches=2, callbacks=[c], progress=False)
    assert c.train == [[0], [1]] * 2 and c.epoch_ends == [0, 1]


def test_a_run_killed_while_validating_validates_that_step_again_on_resume(tmp_path):
    from fnlit.checkpoint import Checkpointer

    def run(crash_at=None):
        c, seen = Counter(), []

        def eval_step(state, batch):
            if int(state.step) == crash_at:
                raise RuntimeError("killed")  # a crash in validation: nothing is saved on the way out
            seen.append(int(state.step))
            return c.eval_step(state, batch)

        kw = dict(max_epochs=1, val_data=[torch.tensor([1.0])], eval_step=eval_step, val_check_interval=5, num_sanity_val_steps=0,
                  checkpoint=Checkpointer(tmp_path / "ck", every_n_steps=5), progress=False)  # fmt: skip
        return kw, seen

    kw, uninterrupted = run()
    fit(Counter().step, make_state(), ArrayLoader(torch.arange(15), batch_size=1), **{**kw, "checkpoint": None})
    kw, first = run(crash_at=10)
    with pytest.raises(RuntimeError, match="killed"):
        fit(Counter().step, make_state(), ArrayLoader(torch.arange(15), batch_size=1), **kw)
    kw, resumed = run()
    fit(Counter().step, make_state(), ArrayLoader(torch.arange(15), batch_size=1), ckpt_path="last", **kw)
    assert uninterrupted == [5, 10, 15] and first == [5] and resumed == [10, 15]


@pytest.mark.parametrize(
    "cut, stops, resumed",
    [
        ("in the eval step", False, (15, [10, 15])),  # redone first, then training goes on
        ("in the eval step", True, (10, [10])),  # redone first, and its EarlyStopping decision stops there
        # after the callbacks counted it (in the best checkpoint's save): not counted twice (with patience 2 it
        # stopped a validation early), and EarlyStopping's decision is kept: the resume stops at once
        ("in the best save", True, (10, [])),
        ("in a callback", True, (10, [10])),  # EarlyStopping counted it, the next callback was cut: done again, once
    ],
)
def test_a_ctrl_c_during_a_validation_resumes_as_the_uninterrupted_run_validates(tmp_path, monkeypatch, cut, stops, resumed):
    # A second Ctrl-C (KeyboardInterrupt) during the validation after step 10: fit saves and returns. The exit
    # position said step 10 and its validation were done, so the resumed run skipped it. Reference: the
    # uninterrupted run's validations; EarlyStopping(patience=1) on a growing loss stops after step 10's.
    from fnlit.callbacks import EarlyStopping
    from fnlit.checkpoint import Checkpointer

    def run(interrupt=False, resume=False, ckpt=True):
        seen = []

        def eval_step(state, batch):
            if interrupt and cut == "in the eval step" and int(state.step) == 10:
                raise KeyboardInterrupt
            seen.append(int(state.step))
            return {"loss": state.step.float()}  # grows: no improvement after the first validation

        checkpointer = Checkpointer(tmp_path / "ck", every_n_steps=100, monitor="val/loss", keep_best=1) if ckpt else None
        if interrupt and cut == "in the best save":
            saves = checkpointer.on_validation

            def cut_off(state, position, metrics):
                if int(state.step) == 10:
                    raise KeyboardInterrupt
                saves(state, position, metrics)

            monkeypatch.setattr(checkpointer, "on_validation", cut_off)
        class Cut(fnlit.callbacks.Callback):
            def on_validation(self, state, metrics):
                if interrupt and cut == "in a callback" and int(state.step) == 10:
                    raise KeyboardInterrupt

        state = fit(Counter().step, make_state(), ArrayLoader(torch.arange(15), batch_size=1), max_epochs=1,
                    val_data=[torch.tensor([1.0])], eval_step=eval_step, val_check_interval=5, num_sanity_val_steps=0,
                    callbacks=[EarlyStopping("val/loss", patience=1)] * stops + [Cut()], checkpoint=checkpointer,
                    ckpt_path="last" if resume else None, progress=False)  # fmt: skip
        return int(state.step), seen

    assert run(ckpt=False) == ((10, [5, 10]) if stops else (15, [5, 10, 15]))
    assert run(interrupt=True) == (10, [5] if cut == "in the eval step" else [5, 10])  # saved, returned
    if cut == "in the best save":
        with pytest.warns(UserWarning, match=r"had stopped at step 10 \(patience\), so this one stops at once"):
            assert run(resume=True) == resumed
    else:
        assert run(resume=True) == resumed


class _History(fnlit.callbacks.Callback):
    """A callback whose state is a list its on_validation appends to (a live container, as state_dict allows)."""

    def __init__(self):
        self.steps = []

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = list(state["steps"])

    def on_validation(self, state, metrics):
        self.steps.append(int(state.step))


def test_a_ctrl_c_after_a_callback_changed_its_state_in_place_resumes_from_the_state_before(tmp_path):
    # The states saved for a cut-off validation are those from before it; a callback that appends to the list
    # its state_dict returned changed that snapshot too, and the resume recorded step 10 twice.
    from fnlit.checkpoint import Checkpointer

    def run(interrupt=False, resume=False):
        history = _History()

        class Cut(fnlit.callbacks.Callback):
            def on_validation(self, state, metrics):
                if interrupt and int(state.step) == 10:
                    raise KeyboardInterrupt

        fit(Counter().step, make_state(), ArrayLoader(torch.arange(15), batch_size=1), max_epochs=1,
            val_data=[torch.tensor([1.0])], eval_step=lambda s, b: {"loss": s.step.float()}, val_check_interval=5,
            num_sanity_val_steps=0, callbacks=[history, Cut()], progress=False,
            checkpoint=Checkpointer(tmp_path / ("ck" if interrupt or resume else "whole"), every_n_steps=100),
            ckpt_path="last" if resume else None)  # fmt: skip
        return history.steps

    uninterrupted = run()
    run(interrupt=True)
    assert uninterrupted == [5, 10, 15] and run(resume=True) == uninterrupted


@pytest.mark.parametrize("patience, why", [(1, "patience"), (10, None), (10, "not finite"), (10, "threshold"), (10, "looser threshold")])
def test_resuming_an_early_stopped_run_stops_again_only_if_the_reason_still_holds(tmp_path, patience, why):
    # As a run that ended at max_epochs: resumed with the same EarlyStopping it does nothing (and says so);
    # with a larger patience it trains on, to where an uninterrupted run with that patience goes.
    from fnlit.callbacks import EarlyStopping
    from fnlit.checkpoint import Checkpointer

    def loss(s, b):  # grows; NaN from step 10 on in the "not finite" case
        return {"loss": s.step.float() if why != "not finite" or int(s.step) < 10 else torch.tensor(float("nan"))}

    def run(es, resume):
        return fit(Counter().step, make_state(), ArrayLoader(torch.arange(15), batch_size=1), max_epochs=1,
                   val_data=[torch.tensor([1.0])], eval_step=loss, val_check_interval=5,
                   num_sanity_val_steps=0, callbacks=[es], checkpoint=Checkpointer(tmp_path / "ck", every_n_steps=100),
                   ckpt_path="last" if resume else None, progress=False)  # fmt: skip

    def stopper(patience, threshold=None):  # a threshold stop: mode "max", the growing loss passes it
        if threshold is None:
            return EarlyStopping("val/loss", patience=patience)
        return EarlyStopping("val/loss", mode="max", patience=patience, stopping_threshold=threshold)

    thresholded = why in ("threshold", "looser threshold")
    first = stopper(1 if why in ("patience", None) else 10, 9.0 if thresholded else None)
    assert int(run(first, resume=False).step) == 10
    resumed = stopper(patience, {"threshold": 9.0, "looser threshold": 100.0}.get(why))
    if why in ("patience", "not finite", "threshold"):
        with pytest.warns(UserWarning, match=rf"had stopped at step 10 \({why}\)"):
            assert int(run(resumed, resume=True).step) == 10
    else:  # a larger patience, a threshold the stopping value does not pass: trains on
        assert int(run(resumed, resume=True).step) == 15


def test_early_stopping_resumes_its_patience_from_the_checkpoint(tmp_path):
    from fnlit.callbacks import EarlyStopping, Timer
    from fnlit.checkpoint import Checkpointer

    losses = iter([3.0, 2.0, 2.5, 2.4, 2.6, 2.7, 2.8, 1.0, 0.5])  # best 2.0 after step 2; 3 runs without gain
    table = {}

    def eval_step(state, batch):  # the validation loss at each step, the same in every run
        if int(state.step) not in table:
            table[int(state.step)] = next(losses)
        return {"loss": torch.tensor(table[int(state.step)])}

    def run(callbacks, **kw):
        c = Counter()
        return fit(c.step, make_state(), ArrayLoader(torch.arange(9), batch_size=1), max_epochs=1, val_data=[0],
                   eval_step=eval_step, val_check_interval=1, num_sanity_val_steps=0, callbacks=callbacks,
                   checkpoint=Checkpointer(tmp_path / "ck", every_n_steps=1), progress=False, **kw)  # fmt: skip

    class StopAt3:
        def on_step(self, state, metrics):
            if int(state.step) == 3:
                raise StopTraining("preempted")

    whole = run([EarlyStopping("val/loss", patience=3)], ckpt_path=None)
    assert int(whole.step) == 5  # 2.5, 2.4, 2.6: three runs without beating 2.0
    for f in (tmp_path / "ck").iterdir():
        f.unlink()
    timer = Timer()
    run([EarlyStopping("val/loss", patience=3), StopAt3(), timer])
    elapsed = timer.time_elapsed()
    resumed_timer = Timer()
    resumed = run([EarlyStopping("val/loss", patience=3), resumed_timer], ckpt_path="last")
    assert int(resumed.step) == 5  # without its state it would start afresh at step 4 and stop at 7
    assert resumed_timer.time_elapsed() >= elapsed  # the time counts across the resume, as Lightning's Timer


def _two_monitors_run(tmp_path, callbacks, **kw):
    """8 steps validated after each: val/a = 10 - step improves at every one, val/b = step at none after the first
    (mode min), so EarlyStopping("val/b", patience=5) alone stops at step 6 (5 validations without beating 1) and
    EarlyStopping("val/a", ...) alone trains all 8."""
    from fnlit.checkpoint import Checkpointer

    def eval_step(state, batch):
        return {"a": torch.tensor(10.0 - int(state.step)), "b": torch.tensor(float(int(state.step)))}

    return fit(Counter().step, make_state(), ArrayLoader(torch.arange(8), batch_size=1), max_epochs=1, val_data=[0],
               eval_step=eval_step, val_check_interval=1, num_sanity_val_steps=0, callbacks=callbacks,
               checkpoint=Checkpointer(tmp_path / "ck", every_n_steps=1), progress=False, **kw)  # fmt: skip


def test_early_stoppings_of_one_class_resume_their_own_states_when_one_is_removed_or_they_are_reordered(tmp_path):
    # States were keyed by class and order: the one left (or the first after a swap) got another's best and
    # patience count. Lightning keys them by state_key (monitor, mode) and warns about the states left over.
    from fnlit.callbacks import EarlyStopping

    _two_monitors_run(tmp_path, [EarlyStopping("val/b", patience=5), EarlyStopping("val/a", patience=5)], max_steps=4)
    ea = EarlyStopping("val/a", patience=5)
    with pytest.warns(UserWarning, match=r"callbacks this run does not have: \[\"EarlyStopping\{'monitor': 'val/b', "
                                         r"'mode': 'min'\}\"\]"):  # fmt: skip
        state = _two_monitors_run(tmp_path, [ea], ckpt_path="last")
    assert int(state.step) == 8 and (ea.best, ea.wait) == (2.0, 0)  # as EarlyStopping("val/a") alone: it never stops

    for f in (tmp_path / "ck").iterdir():
        f.unlink()
    _two_monitors_run(tmp_path, [EarlyStopping("val/a", patience=5), EarlyStopping("val/b", patience=5)], max_steps=4)
    ea, eb = EarlyStopping("val/a", patience=5), EarlyStopping("val/b", patience=5)
    state = _two_monitors_run(tmp_path, [eb, ea], ckpt_path="last")  # swapped
    assert int(state.step) == 6  # val/b's patience, as uninterrupted
    assert (ea.best, ea.wait) == (4.0, 0) and (eb.best, eb.wait, eb.stopped_step) == (1.0, 5, 6)


def test_a_checkpoint_keyed_by_class_and_order_still_restores_each_callback(tmp_path):
    # Checkpoints saved before state_key keyed the states "EarlyStopping", "EarlyStopping#1": still read.
    from fnlit.callbacks import EarlyStopping

    _two_monitors_run(tmp_path, [EarlyStopping("val/b", patience=5), EarlyStopping("val/a", patience=5)], max_steps=4)
    last = max((tmp_path / "ck").glob("*.ckpt"), key=lambda f: fnlit.checkpoint.read_info(f).step)
    position = fnlit.checkpoint.read_info(last).position
    b, a = (position["callbacks"][f"EarlyStopping{{'monitor': 'val/{m}', 'mode': 'min'}}"] for m in "ba")
    assert (b["best"], b["wait"], a["best"]) == (1.0, 3, 6.0)
    position["callbacks"] = {"EarlyStopping": b, "EarlyStopping#1": a}
    old = fnlit.checkpoint.save(tmp_path / "old.ckpt", fnlit.checkpoint.restore(last, like=make_state()), position=position)
    eb, ea = EarlyStopping("val/b", patience=5), EarlyStopping("val/a", patience=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every saved state is taken
        state = _two_monitors_run(tmp_path, [eb, ea], ckpt_path=old)
    assert int(state.step) == 6 and (eb.best, eb.wait) == (1.0, 5) and (ea.best, ea.wait) == (4.0, 0)


class _LazyCount(fnlit.callbacks.Callback):
    """Counts steps; its state is made at the first step (state_dict() is None before, as at fit's start)."""

    def __init__(self):
        self.seen = None

    def on_step(self, state, metrics):
        self.seen = (self.seen or 0) + 1

    def state_dict(self):
        return None if self.seen is None else {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


class _PlainLazyCount:  # not a Callback subclass: any object defining both methods
    state_dict, load_state_dict, on_step = _LazyCount.state_dict, _LazyCount.load_state_dict, _LazyCount.on_step

    def __init__(self):
        self.seen = None


def test_a_callback_whose_state_is_made_during_training_is_saved_and_resumed(tmp_path):
    # Lightning asks each callback for its state at every save; fit asked once, before training, and a state
    # made later was never saved (the resumed count started from zero).
    from fnlit.checkpoint import Checkpointer

    def run(max_steps, resume):
        cbs = [_LazyCount(), _LazyCount(), _PlainLazyCount(), _NoState()]
        fit(Counter().step, make_state(), ArrayLoader(torch.arange(10), batch_size=1), max_steps=max_steps,
            callbacks=cbs, progress=False, checkpoint=Checkpointer(tmp_path / "ck", every_n_steps=2),
            ckpt_path="last" if resume else None)  # fmt: skip
        return [cb.seen for cb in cbs[:3]]

    assert run(6, resume=False) == [6, 6, 6]
    assert run(8, resume=True) == [8, 8, 8]  # the uninterrupted run's count: each of the 8 steps once


class _NoState(fnlit.callbacks.Callback):  # the base's state_dict: nothing saved, nothing loaded
    def load_state_dict(self, state):
        raise AssertionError("load_state_dict of a callback that saved nothing")


def test_a_resume_from_an_epoch_end_best_does_not_validate_that_epoch_again(tmp_path):
    # Data without a length validates after its epoch's last checkpoint; the best saved by that validation
    # is the newest file. Resumed from it, the validation is done: again, it would count twice (EarlyStopping).
    from fnlit.checkpoint import Checkpointer

    def run(crash_at=None, **kw):
        seen = []

        class Crash:
            def on_step(self, state, metrics):
                if int(state.step) == crash_at:
                    raise RuntimeError("killed")

        def eval_step(state, batch):
            seen.append(int(state.step))
            return {"loss": torch.tensor(10.0 - int(state.step))}  # improves: every validation is a best

        ck = Checkpointer(tmp_path / "ck", every_n_steps=4, monitor="val/loss", keep_best=1)
        fit(Counter().step, make_state(), Unsized(4), max_epochs=2, val_data=[0], eval_step=eval_step,
            num_sanity_val_steps=0, checkpoint=ck, callbacks=[Crash()], progress=False, **kw)  # fmt: skip
        return seen

    with pytest.raises(RuntimeError, match="killed"):
        run(crash_at=6)
    assert run(ckpt_path="last") == [8]  # the uninterrupted run validates at 4 and 8


def test_resume_from_a_position_mid_epoch():
    loader = ArrayLoader(torch.arange(6), batch_size=1)
    restored = (make_state().replace(step=torch.tensor(9)), {"epoch": 1, "batch": 3, "seed": 42})
    ck, c = FakeCheckpoint(restored), Counter()
    state = fit(c.step, make_state(), loader, max_epochs=2, checkpoint=ck, ckpt_path="last", progress=False)
    assert ck.calls[0] == ("restore", "last") and int(state.step) == 12
    assert c.train == [x.tolist() for x in loader.batches(1, 42)][3:]
    c = Counter()  # any other iterable: the first 3 batches are skipped by iterating
    fit(c.step, make_state(), [torch.tensor([i]) for i in range(6)], max_epochs=2, checkpoint=FakeCheckpoint(restored),
        ckpt_path="x", progress=False)  # fmt: skip
    assert c.train == [[3], [4], [5]]


def test_a_signal_during_the_sanity_check_stops_before_any_step():
    # The stop vote came before the sanity check: a Ctrl-C during a long one still ran a training step.
    c = Counter()

    def eval_step(state, batch):
        os.kill(os.getpid(), signal.SIGINT)  # arrives during the sanity check's batch
        return c.eval_step(state, batch)

    state = fit(c.step, make_state(), list(range(5)), val_data=[torch.tensor([1.0])], eval_step=eval_step, max_epochs=1,
                progress=False)  # fmt: skip
    assert int(state.step) == 0 and c.train == [] and len(c.val) == 1  # the sanity check's batch only


@pytest.mark.parametrize("sig, reason", [(signal.SIGINT, "sigint"), (signal.SIGTERM, "sigterm")])
def test_signal_ends_fit_cleanly_after_the_current_step(sig, reason):
    before = signal.getsignal(sig)

    def step(state, batch):
        if int(state.step) == 4:
            os.kill(os.getpid(), sig)  # arrives during the step: the step still finishes
        return state.replace(step=state.step + 1), {}

    ck = FakeCheckpoint()
    state = fit(step, make_state(), list(range(10)), max_epochs=3, checkpoint=ck, progress=False)
    assert int(state.step) == 5
    position = {"epoch": 0, "batch": 5, "seed": int(make_state().rng), "steps": 5, "batches_per_epoch": 10}
    assert ck.calls[-1] == ("exit", 5, position, reason)
    assert signal.getsignal(sig) is before


class _KillAt:
    """Sends this process a real SIGTERM in on_step after step ``at``."""

    def __init__(self, at):
        self.at = at

    def on_step(self, state, metrics):
        if int(state.step) == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def _sigterm_handler(handler):
    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigterm_still_calls_the_handler_installed_before_fit():
    # fit replaced the SIGTERM handler while it ran: a preemption hook (a requeue, a flag the script checks after fit
    # to tell a preempted run from a finished one) was never called. Reference: Lightning chains the previous handler.
    calls = []

    def handler(signum, frame):
        calls.append(signum)

    with _sigterm_handler(signal.SIG_DFL):  # no handler of the user's: fit stops after the step
        want = fit(Counter().step, make_state(), list(range(10)), max_epochs=1, callbacks=[_KillAt(3)], progress=False)
    assert int(want.step) == 3
    with _sigterm_handler(handler):
        for n in (1, 2):  # consecutive fits: each calls it once
            state = fit(Counter().step, make_state(), list(range(10)), max_epochs=1, callbacks=[_KillAt(3)],
                        progress=False)  # fmt: skip
            assert calls == [signal.SIGTERM] * n and int(state.step) == int(want.step)
            assert signal.getsignal(signal.SIGTERM) is handler


def test_sigterm_in_a_nested_fit_calls_the_handler_once_and_stops_both():
    # The inner fit's previous handler is the outer fit's: chained, the outer fit stops after its step too (the
    # process is being preempted), and calls the user's handler, once.
    calls = []

    class Inner:
        def on_step(self, state, metrics):
            if int(state.step) == 2:
                inner = fit(Counter().step, make_state(), list(range(10)), max_epochs=1, callbacks=[_KillAt(1)],
                            progress=False)  # fmt: skip
                assert int(inner.step) == 1

    with _sigterm_handler(lambda signum, frame: calls.append(signum)):
        state = fit(Counter().step, make_state(), list(range(10)), max_epochs=1, callbacks=[Inner()], progress=False)
    assert calls == [signal.SIGTERM] and int(state.step) == 2


def _torch_sgd(model, batches, steps):
    """Plain PyTorch: ``steps`` SGD steps (lr 0.1) of the MSE loss over ``batches``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches[:steps]:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.parametrize("where", ["on_step", "in_step"])
@pytest.mark.parametrize("error", [SystemExit(3), RuntimeError("requeue failed")], ids=["sys.exit", "error"])
def test_a_sigterm_handler_that_raises_is_raised_after_fits_exit_save(tmp_path, where, error):
    # Raised in the signal's context, anywhere in a step or a callback, it would end fit without its exit save: fit
    # raises it after the step is done and saved. Reference: plain PyTorch SGD over the same batches.
    import copy

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(8)]
    want = _torch_sgd(copy.deepcopy(model), batches, 3)
    train = fnlit.train_step(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))

    def step(state, batch):
        if where == "in_step" and int(state.step) == 2:  # arrives during step 3: the step still finishes
            os.kill(os.getpid(), signal.SIGTERM)
        return train(state, batch)

    def handler(signum, frame):
        raise error

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    with _sigterm_handler(handler):
        with pytest.raises(type(error)) as raised:
            fit(step, state, batches, max_epochs=1, callbacks=[_KillAt(3)] if where == "on_step" else [],
                checkpoint=fnlit.Checkpointer(tmp_path), progress=False)  # fmt: skip
        assert raised.value is error and signal.getsignal(signal.SIGTERM) is handler
    saved = fnlit.restore(tmp_path / "last.ckpt", like=state)
    assert int(saved.step) == 3
    for k, v in want.items():
        torch.testing.assert_close(saved.params[k], v)


def test_a_held_sigterm_handler_error_is_named_when_fit_fails_on_its_way_out(tmp_path):
    # The handler's SystemExit is held until the exit save; when on_fit_end then fails, that error is raised and
    # the held one was dropped without a trace (a requeue script's exit code lost): it is named in a note.
    model = torch.nn.Linear(4, 1)
    train = fnlit.train_step(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    batches = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(8)]

    class FailAtEnd:
        def on_fit_end(self, state, metrics):
            raise ValueError("on_fit_end failed")

    def handler(signum, frame):
        raise SystemExit(3)

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    with _sigterm_handler(handler):
        with pytest.raises(ValueError, match="on_fit_end failed") as raised:
            fit(train, state, batches, max_epochs=1, callbacks=[_KillAt(3), FailAtEnd()],
                checkpoint=fnlit.Checkpointer(tmp_path), progress=False)  # fmt: skip
    assert any("SystemExit(3)" in note and "held until fit's exit save" in note for note in raised.value.__notes__)
    assert int(fnlit.restore(tmp_path / "last.ckpt", like=state).step) == 3  # saved all the same


@pytest.mark.parametrize("stop_at, every_n, vci, expected", [
    (7, 1, 3, [3, 7]),  # mid-epoch: the steps since the last validation are validated before stopping, as Lightning does
    (10, 1, 3, [3, 8, 10]),  # at an epoch's last batch too, when its end does not validate (every 3 batches of 5)
    (10, 1, 1.0, [5, 10]),  # an epoch that validates at its end: that validation, once
    (7, 2, 3, [7]),  # check_val_every_n_epoch=2: epoch 1 validates ...
    (3, 2, 3, []),  # ... epoch 0 does not, nor does a stop in it
])
def test_a_callback_stop_validates_first_in_an_epoch_that_validates(stop_at, every_n, vci, expected):
    # Lightning's epoch loop validates when should_stop is set (a callback's stop, its Timer) and stopping is allowed.
    seen = []

    class Stop:
        def on_step(self, state, metrics):
            if int(state.step) == stop_at:
                raise StopTraining("enough")

        def on_validation(self, state, metrics):
            seen.append(int(state.step))

    c, state = run(n=5, val=2, max_epochs=4, callbacks=[Stop()], num_sanity_val_steps=0, val_check_interval=vci,
                   check_val_every_n_epoch=every_n)  # fmt: skip
    assert int(state.step) == stop_at and seen == expected
    assert len(c.val) == 2 * len(seen)  # every validation saw both validation batches


def test_a_callback_stop_at_the_last_batch_of_data_without_a_len_validates_once():
    # The stop validated, then looking one batch ahead found the epoch's end, whose validation ran again.
    class Unsized:
        def __iter__(self):
            return iter([torch.tensor([i]) for i in range(4)])

    c, seen = Counter(), []

    class Stop:
        def on_step(self, state, metrics):
            if int(state.step) == 4:
                raise StopTraining("enough")

        def on_validation(self, state, metrics):
            seen.append(int(state.step))

    fit(c.step, make_state(), Unsized(), val_data=[torch.tensor([1.0])], eval_step=c.eval_step, max_epochs=3,
        callbacks=[c, Stop()], num_sanity_val_steps=0, progress=False)  # fmt: skip
    assert seen == [4]  # the epoch's end, once (Lightning validates once there)


def test_a_run_interrupted_mid_log_interval_resumes_with_the_same_log(tmp_path):
    # The interval's first steps were not in the checkpoint, and the interrupted run wrote a row for its partial
    # interval: resumed, the log had an extra row at the interruption and the next row averaged the resumed steps only.
    losses = {}

    def step(state, batch):
        loss = torch.as_tensor(batch, dtype=torch.float32).mean() * (1 + state.step)
        losses[int(state.step) + 1] = float(loss)
        return state.replace(step=state.step + 1), {"loss": loss}

    def run(folder, interrupt_at=None, resume=False):
        class Interrupt:
            def on_step(self, state, metrics):
                if int(state.step) == interrupt_at:
                    raise KeyboardInterrupt  # (a Ctrl-C: fit saves and returns)

        writer = fnlit.summary.JSONLWriter(str(tmp_path / f"{folder}.jsonl"))
        ck = fnlit.Checkpointer(str(tmp_path / folder))
        fit(step, make_state(), list(range(1, 9)), max_epochs=1, log_every_n_steps=3, checkpoint=ck, loggers=[writer],
            callbacks=[Interrupt()], ckpt_path="last" if resume else None, progress=False)  # fmt: skip
        writer.close()
        rows = map(json.loads, (tmp_path / f"{folder}.jsonl").read_text().splitlines())
        return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]

    reference = run("a")
    hand = [(3, sum(losses[i] for i in (1, 2, 3)) / 3), (6, sum(losses[i] for i in (4, 5, 6)) / 3), (8, (losses[7] + losses[8]) / 2)]
    assert [s for s, _ in reference] == [s for s, _ in hand] and all(v == pytest.approx(h) for (_, v), (_, h) in zip(reference, hand))
    for cut in (1, 2, 4, 5, 7):
        run(f"cut{cut}", interrupt_at=cut)
        assert run(f"cut{cut}", resume=True) == reference, cut


def test_metrics_that_are_numpy_numbers_or_dotted_names_resume_with_the_same_log(tmp_path):
    # The interval's metrics in the checkpoint: a numpy number made every save fail (not JSON), and "a.b" beside
    # {"a": {"b"}} shared one tensor path, so the resumed log took one's values for the other.
    np = pytest.importorskip("numpy")

    def step(state, batch):
        x = float(batch) * (1 + int(state.step))
        metrics = {"acc": np.float32(x / 10), "a.b": torch.tensor(x), "a": {"b": torch.tensor(-x)}}
        return state.replace(step=state.step + 1), metrics

    def run(folder, interrupt_at=None, resume=False):
        class Interrupt:
            def on_step(self, state, metrics):
                if int(state.step) == interrupt_at:
                    raise KeyboardInterrupt

        writer = fnlit.summary.JSONLWriter(str(tmp_path / f"{folder}.jsonl"))
        fit(step, make_state(), list(range(1, 7)), max_epochs=1, log_every_n_steps=3, loggers=[writer], callbacks=[Interrupt()],
            checkpoint=fnlit.Checkpointer(str(tmp_path / folder), every_n_steps=1), ckpt_path="last" if resume else None,
            progress=False)  # fmt: skip
        writer.close()
        rows = map(json.loads, (tmp_path / f"{folder}.jsonl").read_text().splitlines())
        return [{k: v for k, v in r.items() if k.startswith("train/")} | {"step": r["step"]} for r in rows if "train/a.b" in r]

    reference = run("a")
    assert [r["step"] for r in reference] == [3, 6] and reference[0]["train/a.b"] == pytest.approx((1 + 4 + 9) / 3)
    assert reference[0]["train/a/b"] == -reference[0]["train/a.b"]
    run("b", interrupt_at=2)
    assert run("b", resume=True) == reference


def test_each_steps_metrics_are_stored_for_a_checkpoint_position_once(monkeypatch):
    # Every step's position converted the whole interval's metrics again: quadratic in log_every_n_steps.
    import fnlit.loop as loop

    calls = []
    real = loop._storable
    monkeypatch.setattr(loop, "_storable", lambda m: calls.append(1) or real(m))
    c = Counter()
    fit(c.step, make_state(), list(range(20)), max_epochs=1, log_every_n_steps=10, checkpoint=FakeCheckpoint(), progress=False)
    assert len(calls) == 18  # once per step; an interval's last step is logged before its checkpoint (none pending)


def test_evaluate_weights_by_batch_size_and_leaves_the_state_alone():
    model = torch.nn.Linear(3, 1)
    state = fnlit.TrainState.create(model, fnlit.optim.adam(0.1), seed=0)
    snapshot = clone_tree(state)
    step = fnlit.eval_step(model, lambda m, b: {"mse": torch.nn.functional.mse_loss(m(b[0]), b[1]), "n": b[0].new_tensor(1.0)})
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 3, generator=g), torch.randn(10, 1, generator=g)
    out = evaluate(step, state, [(x[:7], y[:7]), (x[7:], y[7:])])
    with torch.no_grad():
        ref = ((model(x) - y) ** 2).mean().item()  # the model's own tensors equal the state's
    assert math.isclose(out["mse"], ref, rel_tol=1e-5) and out["n"] == 1.0
    assert_trees_equal(state, snapshot)
    assert evaluate(step, state, [(x[:7], y[:7]), (x[7:], y[7:])], limit_batches=1)["mse"] == pytest.approx(
        ((model(x[:7]) - y[:7]) ** 2).mean().item(), rel=1e-5
    )


def test_nested_metrics_are_logged_and_evaluated_as_outer_slash_inner(tmp_path):
    def step(state, batch):
        x = batch.float()
        return state.replace(step=state.step + 1), {"loss": x.mean(), "parts": {"a": 2 * x.mean(), "b": {"c": x.max()}}}

    data = ArrayLoader(torch.arange(8), batch_size=2, shuffle=False)  # batches [0,1], [2,3], [4,5], [6,7]
    ev = lambda state, b: {"parts": {"a": b.float().mean()}}  # noqa: E731
    fit(step, make_state(), data, max_epochs=1, log_every_n_steps=4, val_data=data, eval_step=ev, num_sanity_val_steps=0,
        log_dir=str(tmp_path), progress=False)  # fmt: skip
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    train = dict(zip(header, rows[1].split(",")))
    assert float(train["train/parts/a"]) == 2 * 3.5 and float(train["train/parts/b/c"]) == (1 + 3 + 5 + 7) / 4
    assert float(dict(zip(header, rows[-1].split(",")))["val/parts/a"]) == 3.5  # the mean over all 8 examples


def test_evaluate_and_fit_log_float64_and_integer_metrics_without_rounding_them_to_float32():
    # Every metric was rounded to float32: (1 + 1e-9 + 1 + 3e-9) / 2 came back 1.0, a float64 0.1 as
    # 0.10000000149011612 and 16777217 tokens as 16777216.0.
    vals = [1 + 1e-9, 1 + 3e-9]
    mean = (vals[0] + vals[1]) / 2  # by hand, in Python's doubles: 1.000000002
    assert mean != 1.0
    data = [torch.tensor([v], dtype=torch.float64) for v in vals]
    assert evaluate(lambda s, b: {"m": b.mean()}, make_state(), data) == {"m": mean}
    assert evaluate(lambda s, b: {"m": float(b.mean())}, make_state(), data) == {"m": mean}  # a Python float is a float64
    one = [torch.zeros(1)]
    assert evaluate(lambda s, b: {"loss": torch.tensor(0.1, dtype=torch.float64)}, make_state(), one) == {"loss": 0.1}
    assert evaluate(lambda s, b: {"tokens": torch.tensor(16777217)}, make_state(), one) == {"tokens": 16777217.0}
    # mixed dtypes in one evaluate: each keeps its own (the float32 one is the float32 value, exactly)
    ev = lambda s, b: {"m": b.mean(), "n": torch.tensor(16777217), "f": b.float().mean()}  # noqa: E731
    assert evaluate(ev, make_state(), data) == {"m": mean, "n": 16777217.0, "f": float(torch.tensor(1.0))}

    rows = _Rows()
    def step(state, batch):
        i = int(batch.item() != vals[0])
        wide = {"m": batch.mean(), "tokens": torch.tensor(16777217 + 2 * i), "rate": 0.1, "mixed": batch.mean() if i else 0.1}
        return state.replace(step=state.step + 1), wide

    fit(step, make_state(), data, max_epochs=1, log_every_n_steps=2, loggers=[rows], progress=False)
    assert rows.rows == [(2, {"train/m": mean, "train/tokens": 16777218.0, "train/rate": 0.1,
                              "train/mixed": (0.1 + vals[1]) / 2, "epoch": 0})]  # fmt: skip


def test_float32_metrics_are_reduced_in_float32_as_before():
    # The old reductions, by hand in float32: evaluate's sums of value * batch size over the float32 count, and
    # fit's stacked mean. float16 and bfloat16 metrics went through float32 too.
    vals = [0.1, 0.7, 1 / 3]
    sizes = [3, 1, 2]
    data = [torch.full((n,), v) for v, n in zip(vals, sizes)]
    acc = torch.zeros((), dtype=torch.float32)
    for v, n in zip(vals, sizes):
        acc = acc + torch.tensor(v, dtype=torch.float32) * n
    ref = acc.tolist() / torch.tensor(float(sum(sizes)), dtype=torch.float32).tolist()
    ev = lambda s, b: {"f32": b.mean(), "f16": b.mean().half(), "bf16": b.mean().bfloat16()}  # noqa: E731
    out = evaluate(ev, make_state(), data)
    assert out["f32"] == ref
    for name, dtype in [("f16", torch.float16), ("bf16", torch.bfloat16)]:
        acc = torch.zeros((), dtype=torch.float32)
        for v, n in zip(vals, sizes):
            acc = acc + torch.tensor(v).to(dtype).to(torch.float32) * n
        assert out[name] == acc.tolist() / float(sum(sizes))

    rows = _Rows()
    fit(lambda s, b: (s.replace(step=s.step + 1), {"loss": b.mean()}), make_state(), data, max_epochs=1,
        log_every_n_steps=3, loggers=[rows], progress=False)  # fmt: skip
    mean32 = torch.stack([torch.tensor(v, dtype=torch.float32) for v in vals]).mean()  # float32 throughout
    assert rows.rows == [(3, {"train/loss": mean32.tolist(), "epoch": 0})]


def test_evaluate_skips_empty_batches():
    # An empty batch's mean is NaN and NaN * 0 is NaN: one made every metric NaN (also as the first batch).
    ev = lambda state, b: {"x": b.float().mean()}  # noqa: E731
    data = [torch.ones(3), torch.zeros(0), torch.full((1,), 5.0)]
    reference = float(torch.cat(data).mean())  # the mean over the examples: (3 + 5) / 4
    assert evaluate(ev, make_state(), data)["x"] == pytest.approx(reference)
    assert evaluate(ev, make_state(), [torch.zeros(0)] + data)["x"] == pytest.approx(reference)
    with pytest.raises(ValueError, match=r"evaluate got no examples \(batches of size 0\)"):
        evaluate(ev, make_state(), [torch.zeros(0), torch.zeros(0)])


def test_evaluate_names_a_metric_missing_from_some_batches():
    ev = lambda state, b: {"loss": b.float().mean()} if b[0] == 0 else {"other": b.float().mean()}  # noqa: E731
    with pytest.raises(KeyError, match="metric 'loss' for some batches but not others|metric 'other' for some batches"):
        evaluate(ev, make_state(), [torch.tensor([0]), torch.tensor([1])])


def test_evaluate_raises_when_the_first_batch_returns_no_metrics_and_a_later_one_some():
    # A first batch's {} read as "no batch yet": its 4 examples were counted without metrics and the next batch set
    # the names, so the mean came out diluted ((4*0 + 6*6.5) / 10 = 3.9) instead of the KeyError the reverse order raises.
    x = torch.arange(10.0)
    ev = lambda state, b: {} if b[0] < 3 else {"m": b.mean()}  # noqa: E731
    with pytest.raises(KeyError, match="metric 'm' for some batches but not others"):
        evaluate(ev, make_state(), [x[:4], x[4:]])
    reverse = lambda state, b: {"m": b.mean()} if b[0] < 3 else {}  # noqa: E731
    with pytest.raises(KeyError, match="metric 'm' for some batches but not others"):
        evaluate(reverse, make_state(), [x[:4], x[4:]])
    with pytest.raises(ValueError, match=r"evaluate got no batches \(or no metrics\)"):  # {} throughout: no metrics
        evaluate(lambda state, b: {}, make_state(), [x[:4], x[4:]])
    # an empty batch (no examples: it does not count) may return {} anywhere, first included; by hand (4*1.5 + 2*0.5) / 6
    guarded = lambda state, b: {} if len(b) == 0 else {"m": b.mean()}  # noqa: E731
    out = evaluate(guarded, make_state(), [x[:0], torch.arange(4.0), x[4:4], torch.arange(2.0)])
    assert out["m"] == pytest.approx(7 / 6)


def test_evaluate_raises_the_type_errors_its_docstring_lists():
    x = torch.arange(4.0)
    with pytest.raises(TypeError, match="evaluate expected eval_step to return a dict of metrics, got tuple"):
        evaluate(lambda state, b: (b.mean(),), make_state(), [x])
    with pytest.raises(TypeError, match=r"returned metric 'note' as str 'val'; metrics must be numbers or scalar"):
        evaluate(lambda state, b: {"m": b.mean(), "note": "val"}, make_state(), [x])


def test_evaluate_names_itself_for_a_bad_limit_batches():
    ev = lambda state, b: {"loss": b.float().mean()}  # noqa: E731
    with pytest.raises(ValueError, match=r"^evaluate expected limit_batches to be an int >= 0 .*got limit_batches=1.5"):
        evaluate(ev, make_state(), [torch.tensor([0]), torch.tensor([1])], limit_batches=1.5)
    with pytest.raises(ValueError, match=r"^evaluate got limit_batches=0.5, a fraction of the epoch, but the data has no len"):
        evaluate(ev, make_state(), iter([torch.tensor([0])]), limit_batches=0.5)


def test_validation_does_not_change_training():
    a, sa = run(max_epochs=2, val=0)
    b, sb = run(max_epochs=2, val=4)
    assert a.train == b.train and torch.equal(sa.rng, sb.rng)


def test_resume_with_nothing_saved_starts_from_the_beginning():
    state = make_state()
    c = Counter()
    out = fit(c.step, state, list(range(4)), max_epochs=1, checkpoint=FakeCheckpoint((state, None)), ckpt_path="last", progress=False)
    assert int(out.step) == 4 and c.train == [[0], [1], [2], [3]]


def test_ckpt_path_without_checkpoint():
    with pytest.raises(ValueError, match="ckpt_path='last' but no checkpoint"):
        fit(Counter().step, make_state(), [0], max_epochs=1, ckpt_path="last", progress=False)


def test_a_too_small_overfit_fraction_names_overfit_batches():
    with pytest.raises(ValueError, match=r"fit got overfit_batches=0.2, but 0.2 \* 4 batches < 1"):
        run(n=10, val=4, max_epochs=1, overfit_batches=0.2)


def test_an_epoch_of_unsized_data_cut_by_limit_train_batches_ends_also_when_max_steps_does():
    # max_steps lands on the epoch's last batch: that epoch's validation and end run, as with a length.
    def counted(data, **kw):
        c = Counter()
        fit(c.step, make_state(), data, val_data=[torch.tensor([1.0])], eval_step=c.eval_step, num_sanity_val_steps=0,
            callbacks=[c], progress=False, **kw)  # fmt: skip
        return len(c.train), len(c.val), c.epoch_ends

    sized = [torch.tensor([i]) for i in range(8)]
    assert counted(Unsized(8), max_steps=8, limit_train_batches=4) == counted(sized, max_steps=8, limit_train_batches=4) == (8, 2, [0, 1])
    assert counted(Unsized(8), fast_dev_run=True) == counted(sized, fast_dev_run=True) == (1, 1, [0])


def test_data_yielding_fewer_batches_than_its_len_ends_each_epoch_with_a_warning():
    class Short:  # len() says 5, each epoch yields 3 (a per-rank IterableDataset reporting the global size)
        def __len__(self):
            return 5

        def __iter__(self):
            return iter([torch.tensor([i]) for i in range(3)])

    c = Counter()
    with pytest.warns(UserWarning, match=r"yielded 3 batches in epoch 0, fewer than its len\(\) or limit_train_batches \(5\)"):
        state = fit(c.step, make_state(), Short(), max_epochs=3, callbacks=[c], val_data=[torch.tensor([1.0])],
                    eval_step=c.eval_step, num_sanity_val_steps=0, progress=False)  # fmt: skip
    assert int(state.step) == 9 and c.train == [[0], [1], [2]] * 3 and c.epoch_ends == [0, 1, 2]  # a plain loop's 3 x 3
    assert len(c.val) == 3  # the validation at each epoch's end
    # Resumed from a checkpoint saved at a short epoch's last batch: the next epoch follows (nothing is "empty").
    restored = (make_state().replace(step=torch.tensor(3)), {"epoch": 0, "batch": 3, "seed": 42})
    c = Counter()
    with pytest.warns(UserWarning, match="yielded 3 batches in epoch 0"):
        state = fit(c.step, make_state(), Short(), max_epochs=2, checkpoint=FakeCheckpoint(restored), ckpt_path="last",
                    callbacks=[c], progress=False)  # fmt: skip
    assert int(state.step) == 6 and c.train == [[0], [1], [2]] and c.epoch_ends == [0, 1]


def test_a_resume_past_the_end_of_a_now_shorter_epoch_starts_the_next_one():
    # Saved at batch 7 of 10; resumed with limit_train_batches=5: that epoch is over, 2 more epochs follow.
    restored = (make_state().replace(step=torch.tensor(7)), {"epoch": 0, "batch": 7, "seed": 42})
    c = Counter()
    with pytest.warns(UserWarning, match="resumes at batch 7 of epoch 0, past the 5 batches"):
        state = fit(c.step, make_state(), ArrayLoader(torch.arange(10), batch_size=1), max_epochs=3, limit_train_batches=5,
                    checkpoint=FakeCheckpoint(restored), ckpt_path="last", callbacks=[c], progress=False)  # fmt: skip
    assert int(state.step) == 17 and len(c.train) == 10 and c.epoch_ends == [0, 1, 2]


def test_fast_dev_run_and_limit_train_batches_0_restore_ckpt_path_as_lightning_does():
    restored = (make_state().replace(step=torch.tensor(7)), {"epoch": 0, "batch": 7, "seed": 42})
    data = ArrayLoader(torch.arange(10), batch_size=1)
    ck = FakeCheckpoint(restored)
    assert int(fit(Counter().step, make_state(), data, fast_dev_run=2, checkpoint=ck, ckpt_path="last", progress=False).step) == 9
    assert ck.calls == [("restore", "last")]  # restored, and nothing saved
    ck = FakeCheckpoint(restored)
    assert int(fit(Counter().step, make_state(), data, limit_train_batches=0, checkpoint=ck, ckpt_path="last", progress=False).step) == 7
    assert ck.calls == [("restore", "last")]


def test_unsized_data_with_an_int_limit_train_batches_defaults_to_1000_epochs():
    # Lightning: max_epochs=1000 when neither limit is given; each epoch here is bounded by the limit.
    c = Counter()
    state = fit(c.step, make_state(), Unsized(3), limit_train_batches=1, progress=False)
    assert int(state.step) == 1000 and c.train == [[0]] * 1000


def test_num_sanity_val_steps_minus_one_runs_all_of_unsized_validation_data():
    c, seen = Counter(), []
    eval_step = lambda s, b: (seen.append(int(s.step)), {"loss": b.float().mean()})[1]  # noqa: E731
    fit(c.step, make_state(), [torch.tensor([0])] * 3, max_epochs=1, val_data=Unsized(2), eval_step=eval_step,
        num_sanity_val_steps=-1, progress=False)  # fmt: skip
    assert seen == [0, 0, 3, 3]  # both batches before training (Lightning's -1: all), then the epoch's validation


def test_unsized_data_stopped_by_max_steps_at_its_last_batch_ends_its_epoch():
    # As the same batches in a list: the epoch's validation and on_epoch_end run (Lightning's fetcher looks ahead).
    def counted(data):
        c = Counter()
        fit(c.step, make_state(), data, max_steps=3, val_data=[torch.tensor([1.0])], eval_step=c.eval_step,
            num_sanity_val_steps=0, callbacks=[c], progress=False)  # fmt: skip
        return len(c.train), len(c.val), c.epoch_ends

    assert counted(Unsized(3)) == counted([torch.tensor([i]) for i in range(3)]) == (3, 1, [0])
    assert counted(Unsized(5)) == (3, 0, [])  # stopped mid-epoch: no epoch end


def test_a_resume_past_a_shorter_epochs_end_runs_that_epochs_validation():
    # Saved at batch 5 of a 6-batch epoch (not validated yet); resumed with 3-batch epochs: epoch 0 is over, and
    # its end-of-epoch validation runs before epoch 1 (which validates at its own end).
    restored = (make_state().replace(step=torch.tensor(5)), {"epoch": 0, "batch": 5, "seed": 42})
    c, val_steps = Counter(), []
    eval_step = lambda s, b: (val_steps.append(int(s.step)), {"loss": b.float().mean()})[1]  # noqa: E731
    with pytest.warns(UserWarning, match="resumes at batch 5 of epoch 0, past the 3 batches"):
        fit(c.step, make_state(), ArrayLoader(torch.arange(3), batch_size=1), max_epochs=2, val_data=[torch.tensor([1.0])],
            eval_step=eval_step, num_sanity_val_steps=0, checkpoint=FakeCheckpoint(restored), ckpt_path="last",
            callbacks=[c], progress=False)  # fmt: skip
    assert val_steps == [5, 8] and c.epoch_ends == [0, 1]


def test_a_stop_deferred_by_min_epochs_survives_a_resume(tmp_path):
    # A callback asks once (at step 2) to stop; min_epochs=3 defers it: the uninterrupted run stops after epoch 3
    # (step 9). Crashed at step 5 and resumed, the run must stop there too, not train max_epochs.
    from fnlit.checkpoint import Checkpointer

    class AskOnce:
        def on_step(self, state, metrics):
            if int(state.step) == 2:
                raise StopTraining

    class Crash:
        def on_step(self, state, metrics):
            if int(state.step) == 5:
                raise RuntimeError("crash")

    def run(folder, callbacks, resume=False):
        return fit(Counter().step, make_state(), ArrayLoader(torch.arange(3), batch_size=1), max_epochs=6, min_epochs=3,
                   callbacks=callbacks, checkpoint=Checkpointer(tmp_path / folder, every_n_steps=1),
                   ckpt_path="last" if resume else None, progress=False)  # fmt: skip

    assert int(run("whole", [AskOnce()]).step) == 9
    with pytest.raises(RuntimeError, match="crash"):
        run("cut", [AskOnce(), Crash()])
    assert int(run("cut", [AskOnce()], resume=True).step) == 9


def test_a_one_shot_iterator_continued_by_a_second_fit_loses_no_batch():
    data = iter([torch.tensor([i]) for i in range(10)])
    c = Counter()
    state = fit(c.step, make_state(), data, max_steps=3, progress=False)
    fit(c.step, state, data, max_steps=6, progress=False)
    assert c.train == [[0], [1], [2], [3], [4], [5]]


def test_a_one_shot_iterator_as_val_data_is_refused_unless_one_validation_runs():
    # The sanity check took its first batches, the first validation averaged the rest, the second found none.
    c = Counter()
    for kw in (dict(max_epochs=2), dict(max_epochs=2, num_sanity_val_steps=0), dict(max_epochs=1, val_check_interval=2)):
        val = (torch.tensor([i]) for i in range(4))
        with pytest.raises(TypeError, match=r"val_data as a one-shot iterator \(generator\).*list of batches.*validating once"):
            fit(c.step, make_state(), list(range(6)), val_data=val, eval_step=c.eval_step, progress=False, **kw)
    assert c.train == [] and c.val == []  # refused before any training (a failure at the second validation lost it)
    # One pass works (no sanity check, one epoch validating at its end): every batch once.
    state = fit(c.step, make_state(), list(range(3)), val_data=(torch.tensor([i]) for i in range(4)), eval_step=c.eval_step,
                max_epochs=1, num_sanity_val_steps=0, progress=False)  # fmt: skip
    assert int(state.step) == 3 and c.val == [[0], [1], [2], [3]]


def test_a_metric_name_that_is_not_a_string_gets_a_clear_error():
    # It failed concatenating the "train/" prefix: "can only concatenate str (not "int") to str".
    def step(state, batch):
        return state.replace(step=state.step + 1), {0: torch.as_tensor(batch).float().mean()}

    with pytest.raises(TypeError, match=r"the training step returned a metric named 0; metric names must be strings"):
        fit(step, make_state(), list(range(3)), max_steps=3, progress=False, log_every_n_steps=1)
    with pytest.raises(TypeError, match=r"the eval step returned a metric named \('loss', 'x'\); metric names must be strings"):
        evaluate(lambda s, b: {("loss", "x"): torch.tensor(1.0)}, make_state(), [torch.zeros(2)])


def test_evaluating_a_shuffled_array_loader_twice_sees_the_same_batches():
    # Validation must not move the loader to another order (each validation would score other examples, and a
    # resumed run's would differ from the uninterrupted run's). Reference: the first batch of the unshuffled order,
    # whatever epoch the loader was last set to.
    loader = ArrayLoader(torch.arange(10.0), batch_size=2)  # shuffle=True by default
    for epoch in (0, 0, 5):
        loader.set_epoch(epoch)
        assert evaluate(lambda s, b: {"m": b.mean()}, make_state(), loader, limit_batches=1)["m"] == 0.5


def test_evaluate_reads_a_shuffled_array_loader_in_order_on_one_process_as_on_several():
    # limit_batches picks the first batches of the unshuffled order, as eval_batches does on several ranks
    # (and Lightning's sequential validation loaders): reference, the mean of examples 0..3 by hand.
    loader = ArrayLoader(torch.arange(8.0), batch_size=2)  # shuffle=True, the default
    assert [b.tolist() for b in loader] != [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]  # training order is shuffled
    out = evaluate(lambda s, b: {"x": b.mean()}, make_state(), loader, limit_batches=2)
    assert out == {"x": 1.5}


def test_overfit_batches_validates_on_the_first_batches_of_a_shuffled_val_loader():
    c = Counter()
    data = ArrayLoader(torch.arange(8), batch_size=2)  # shuffled by default, used for both
    fit(c.step, make_state(), data, val_data=data, eval_step=c.eval_step, max_epochs=1, overfit_batches=2,
        num_sanity_val_steps=0, callbacks=[c], progress=False)  # fmt: skip
    assert c.train == [[0, 1], [2, 3]] and c.val == [[0, 1], [2, 3]]  # the docstring's "first N, unshuffled"


def test_init_waits_torchs_default_timeout_so_a_long_checkpoint_save_does_not_kill_the_other_ranks(monkeypatch):
    import torch.distributed as dist
    from torch.distributed.constants import default_pg_timeout

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(fnlit.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: seen.update(backend=backend, timeout=timeout))
    assert fnlit.distributed.init("gloo") is True
    assert seen == {"backend": "gloo", "timeout": default_pg_timeout}  # 30 min, as Lightning waits (torch too, on gloo)


def test_overfit_batches_validates_on_the_first_batches_of_a_shuffled_val_dataloader():
    # Lightning swaps a SequentialSampler into the val loader too under overfit_batches.
    c = Counter()
    dl = DataLoader(TensorDataset(torch.arange(8)), batch_size=2, shuffle=True)
    fit(c.step, make_state(), dl, val_data=dl, eval_step=c.eval_step, max_epochs=2, overfit_batches=2,
        num_sanity_val_steps=0, callbacks=[c], progress=False)  # fmt: skip
    assert c.train == [[0, 1], [2, 3]] * 2 and c.val == [[0, 1], [2, 3]] * 2


class _DoubleCtrlC:
    """A callback during whose ``hook`` the user presses Ctrl-C twice: ``on_log`` (the second lands while fit reads
    the interval's metrics back) or ``on_step`` at step ``at``, ``on_epoch_end`` of 0-based epoch ``at``."""

    def __init__(self, at, hook):
        self.at, self.hook = at, hook

    def _press(self, now):
        if now == self.at:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)

    def on_log(self, state):
        if self.hook == "on_log":
            self._press(int(state.step))
        return {}

    def on_step(self, state, metrics):
        if self.hook == "on_step":
            self._press(int(state.step))

    def on_epoch_end(self, state, metrics):
        if self.hook == "on_epoch_end":
            self._press(metrics["epoch"])


def _ctrl_c_setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 8, generator=g), torch.randint(0, 2, (96,), generator=g)
    step = fnlit.train_step(model, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
    ev = fnlit.eval_step(model, lambda m, b: {"loss": torch.nn.functional.cross_entropy(m(b[0]), b[1])})
    return step, fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0), ArrayLoader(x, y, batch_size=8), ev


def test_a_second_ctrl_c_during_the_metrics_read_back_keeps_the_interval_for_the_resumed_run(tmp_path):
    # The buffer was emptied before the read-back, so the step-10 row was lost. Reference: the uninterrupted run.
    def build():
        return _ctrl_c_setup()[:3]

    kw = dict(max_epochs=2, log_every_n_steps=5, progress=False)
    ref = _Rows()
    fit(*build(), loggers=[ref], **kw)
    rows = _Rows()
    fit(*build(), loggers=[rows], callbacks=[_DoubleCtrlC(10, "on_log")], checkpoint=fnlit.Checkpointer(tmp_path), **kw)
    fit(*build(), loggers=[rows], checkpoint=fnlit.Checkpointer(tmp_path), ckpt_path="last", **kw)
    assert [s for s, _ in rows.rows] == [s for s, _ in ref.rows] and rows.rows == ref.rows


class _Unsized:
    """8 batches a pass, without a len(): fit learns an epoch's end by looking one batch ahead."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        for i in range(0, len(self.x), 8):
            yield self.x[i : i + 8], self.y[i : i + 8]


class _SigtermAt:
    def __init__(self, at):
        self.at = at

    def on_step(self, state, metrics):
        if int(state.step) == self.at:
            signal.raise_signal(signal.SIGTERM)


class _CrashAt(_SigtermAt):
    def on_step(self, state, metrics):
        if int(state.step) == self.at:
            raise RuntimeError("boom")


@pytest.mark.parametrize("stop", [_SigtermAt(8), _CrashAt(9)], ids=["sigterm-at-the-epochs-end", "crash-after-it"])
def test_an_unsized_epochs_end_validation_is_not_run_again_by_a_resume(tmp_path, stop):
    # The step-8 checkpoint came before the epoch-end validation: the exit save was skipped (same state), or a crash
    # left that checkpoint the last one, so the resumed run validated step 8 again (its val row twice in the log).
    # Reference: the uninterrupted run's rows.
    from fnlit.summary import JSONLWriter

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    x, y = torch.randn(96, 8), torch.randint(0, 2, (96,))
    ev = fnlit.eval_step(model, lambda m, b: {"loss": torch.nn.functional.cross_entropy(m(b[0]), b[1])})
    step = fnlit.train_step(model, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
    runs = {"interrupted": [stop, None], "uninterrupted": [None]}
    rows = {}
    for name, parts in runs.items():
        d = tmp_path / name
        for cb in parts:
            w = JSONLWriter(d)
            with contextlib.suppress(RuntimeError) if cb else contextlib.nullcontext():
                fit(step, fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0), _Unsized(x[:64], y[:64]),
                    val_data=[(x[64:], y[64:])], eval_step=ev, max_epochs=2, num_sanity_val_steps=0, log_every_n_steps=4,
                    progress=False, loggers=[w], checkpoint=fnlit.Checkpointer(d / "ck", every_n_steps=4),
                    ckpt_path=None if cb else "last", callbacks=[cb] if cb else [])  # fmt: skip
            w.close()
        rows[name] = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows["interrupted"] == rows["uninterrupted"]


class _CtrlCInWrite(_Rows):
    """A logger during whose write (at step ``at``, before it has the row) the user presses Ctrl-C twice."""

    def __init__(self, at=10):
        super().__init__()
        self.at = at

    def log_metrics(self, metrics, step):
        if step == self.at and not getattr(self, "fired", False):
            self.fired = True
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        super().log_metrics(metrics, step)


@pytest.mark.parametrize("validating", [False, True])
def test_a_second_ctrl_c_during_the_loggers_write_keeps_the_interval_for_the_resumed_run(tmp_path, validating):
    # validating: a validation is due at step 10 too; it never ran, and the resumed run runs it after the row.
    step, state, data, ev = _ctrl_c_setup()
    kw = dict(max_epochs=2, log_every_n_steps=5, progress=False, num_sanity_val_steps=0)
    if validating:
        kw.update(val_data=ArrayLoader(*data.tensors, batch_size=32), eval_step=ev, val_check_interval=5)
    ref = _Rows()
    fit(step, state, data, loggers=[ref], **kw)
    first, cut = _Rows(), _CtrlCInWrite()  # the first writer has step 10's row, the second not
    fit(step, state, data, loggers=[first, cut], checkpoint=fnlit.Checkpointer(tmp_path), **kw)
    fit(step, state, data, loggers=[first, cut], checkpoint=fnlit.Checkpointer(tmp_path), ckpt_path="last", **kw)
    assert first.rows == cut.rows == ref.rows  # step 10's row once in each (the resume purges from it, then logs it)


@pytest.mark.parametrize("at", [5, 8, 20], ids=["row-due", "validation-due", "both-due"])
def test_a_second_ctrl_c_in_a_step_hook_leaves_that_steps_row_and_validation_to_the_resume(tmp_path, at):
    # Rows every 5 steps, validations every 4 batches (12 an epoch). The exit position said step `at` was done, its
    # row and validation too: the resumed run folded the row into the next interval's and skipped the validation.
    # Reference: the uninterrupted run's rows and params.
    step, state, data, ev = _ctrl_c_setup()
    kw = dict(max_epochs=2, log_every_n_steps=5, progress=False, num_sanity_val_steps=0, val_check_interval=4,
              val_data=ArrayLoader(*data.tensors, batch_size=32), eval_step=ev)  # fmt: skip
    ref = _Rows()
    want = fit(step, state, data, loggers=[ref], **kw)
    rows = _Rows()
    cut = fit(step, state, data, loggers=[rows], callbacks=[_DoubleCtrlC(at, "on_step")], checkpoint=fnlit.Checkpointer(tmp_path), **kw)
    assert int(cut.step) == at
    got = fit(step, state, data, loggers=[rows], checkpoint=fnlit.Checkpointer(tmp_path), ckpt_path="last", **kw)
    assert rows.rows == ref.rows
    assert_trees_equal(got.params, want.params)


def test_a_second_ctrl_c_in_a_step_hook_waits_for_the_later_callbacks_and_a_third_does_not(tmp_path):
    # The second Ctrl-C raised inside the first callback's on_step: the EMA after it never saw step 6, the exit
    # checkpoint kept its state without that update and the resume went on from step 7 (one update short for good).
    # Reference: the uninterrupted run's EMA.
    from fnlit.callbacks import EMA

    step, state, data, _ = _ctrl_c_setup()
    kw = dict(max_epochs=2, log_every_n_steps=5, progress=False)
    ref = EMA(0.5)
    fit(step, state, data, callbacks=[ref], **kw)
    first = EMA(0.5)
    cut = fit(step, state, data, callbacks=[_DoubleCtrlC(6, "on_step"), first], checkpoint=fnlit.Checkpointer(tmp_path), **kw)
    assert int(cut.step) == 6  # still interrupted there, once the hooks had returned
    resumed = EMA(0.5)
    fit(step, state, data, callbacks=[resumed], checkpoint=fnlit.Checkpointer(tmp_path), ckpt_path="last", **kw)
    assert_trees_equal(resumed.params, ref.params)

    class Thrice(_DoubleCtrlC):  # a hook that hangs: the third Ctrl-C interrupts inside it
        def on_step(self, state, metrics):
            super().on_step(state, metrics)
            if int(state.step) == self.at:
                signal.raise_signal(signal.SIGINT)
                raise AssertionError("not interrupted")

    class Seen:
        steps: list = []

        def on_step(self, state, metrics):
            self.steps.append(int(state.step))

    later = Seen()
    cut = fit(step, state, data, callbacks=[Thrice(3, "on_step"), later], checkpoint=fnlit.Checkpointer(tmp_path / "b"), **kw)
    assert int(cut.step) == 3 and later.steps == [1, 2]


@pytest.mark.parametrize("sized", [True, False], ids=["sized", "unsized"])
@pytest.mark.parametrize("cut_first", [True, False], ids=["cut-before-swa", "cut-after-swa"])
def test_a_second_ctrl_c_in_an_epoch_end_hook_ends_that_epoch_again_on_resume(tmp_path, cut_first, sized):
    # The exit position stood after epoch 1's end: SWA, after the cut callback, never averaged that epoch (2 epochs
    # averaged of 3). SWA before it had averaged it: the resume, from the states before that end, must not twice.
    # Data without a len() validates at the epoch's end, before its hooks: the resume must not validate again.
    # Reference: the uninterrupted run's SWA average and count, rows (epoch 1's validation once) and params.
    from fnlit.callbacks import SWA

    step, state, data, ev = _ctrl_c_setup()
    val = ArrayLoader(*data.tensors, batch_size=32)
    data = data if sized else _Unsized(*data.tensors)  # 12 batches an epoch
    kw = dict(max_epochs=3, log_every_n_steps=5, progress=False, num_sanity_val_steps=0, val_data=val, eval_step=ev)
    ref, swa = _Rows(), SWA(1)
    want = fit(step, state, data, loggers=[ref], callbacks=[swa], **kw)
    rows, first = _Rows(), SWA(1)
    callbacks = [_DoubleCtrlC(1, "on_epoch_end"), first] if cut_first else [first, _DoubleCtrlC(1, "on_epoch_end")]
    cut = fit(step, state, data, loggers=[rows], callbacks=callbacks, checkpoint=fnlit.Checkpointer(tmp_path), **kw)
    assert int(cut.step) == 24 and first.n_averaged == (1 if cut_first else 2)
    resumed = SWA(1)
    got = fit(step, state, data, loggers=[rows], callbacks=[resumed], checkpoint=fnlit.Checkpointer(tmp_path),
              ckpt_path="last", **kw)  # fmt: skip
    assert resumed.n_averaged == swa.n_averaged == 3
    assert_trees_equal(resumed.params, swa.params)
    assert rows.rows == ref.rows
    assert_trees_equal(got.params, want.params)


class _StopAtValidation:
    """Asks to stop in the validation after step ``at`` (no state: the request is the loop's to remember)."""

    def __init__(self, at):
        self.at = at

    def on_validation(self, state, metrics):
        if int(state.step) == self.at:
            raise StopTraining("enough")


@pytest.mark.parametrize("ends", ["max_steps", "early_stopping", "stop_request"])
@pytest.mark.parametrize("cut_first", [True, False], ids=["cut-before-swa", "cut-after-swa"])
def test_a_second_ctrl_c_in_the_last_epoch_end_ends_it_on_resume(tmp_path, cut_first, ends):
    # The cut epoch end (epoch 1, step 24) was also the run's last: max_steps reached there, or a stop decided in
    # its validation. The resume never entered the loop, so that epoch end never ran (SWA averaged 1 epoch of 2),
    # or it ran and trained on (a stop requested by a callback keeping no state was forgotten). Reference: the
    # uninterrupted run (SWA's count and average, rows, params), which ends at step 24.
    from fnlit.callbacks import SWA, EarlyStopping

    step, state, data, ev = _ctrl_c_setup()  # 12 batches an epoch
    val = ArrayLoader(*data.tensors, batch_size=32)
    kw = dict(max_epochs=4, log_every_n_steps=5, progress=False, num_sanity_val_steps=0, val_data=val, eval_step=ev)
    if ends == "max_steps":
        kw["max_steps"] = 24

    def stopper():  # EarlyStopping: epoch 1's val/loss is lower, not higher (mode "max"), than epoch 0's
        return {"max_steps": [], "early_stopping": [EarlyStopping("val/loss", mode="max", patience=1)],
                "stop_request": [_StopAtValidation(24)]}[ends]

    ref, swa = _Rows(), SWA(1)
    want = fit(step, state, data, loggers=[ref], callbacks=[swa, *stopper()], **kw)
    assert int(want.step) == 24 and swa.n_averaged == 2
    rows, first = _Rows(), SWA(1)
    callbacks = [_DoubleCtrlC(1, "on_epoch_end"), first] if cut_first else [first, _DoubleCtrlC(1, "on_epoch_end")]
    # (a best saved at that epoch's validation stands where the exit position does: saved again, its end pending)
    best = fnlit.Checkpointer(tmp_path, monitor="val/loss")
    cut = fit(step, state, data, loggers=[rows], callbacks=[*callbacks, *stopper()], checkpoint=best, **kw)
    assert int(cut.step) == 24 and first.n_averaged == (1 if cut_first else 2)
    resumed = SWA(1)
    # (EarlyStopping's saved state says it had decided to stop: it says so again, and the run stops after that end)
    told = pytest.warns(UserWarning, match="had stopped") if ends == "early_stopping" else contextlib.nullcontext()
    with told:
        got = fit(step, state, data, loggers=[rows], callbacks=[resumed, *stopper()],
                  checkpoint=fnlit.Checkpointer(tmp_path), ckpt_path="last", **kw)  # fmt: skip
    assert int(got.step) == 24
    assert resumed.n_averaged == 2
    assert_trees_equal(resumed.params, swa.params)
    assert rows.rows == ref.rows
    assert_trees_equal(got.params, want.params)


def test_a_resume_with_another_log_interval_keeps_the_rows_of_its_last_step(tmp_path):
    # A SIGTERM at step 12 (a partial interval, validation done) resumed with log_every_n_steps=4: the resume took
    # the interval for a cut-off whole one, purged step 12's val row and logged a train row there. Reference: the
    # first run's rows up to step 12.
    class Term:
        def on_step(self, state, metrics):
            if int(state.step) == 12:
                signal.raise_signal(signal.SIGTERM)

    step, state, data, ev = _ctrl_c_setup()
    kw = dict(max_epochs=2, progress=False, val_check_interval=4, val_data=data, eval_step=ev, num_sanity_val_steps=0)
    rows = _Rows()
    fit(step, state, data, loggers=[rows], checkpoint=fnlit.Checkpointer(tmp_path), callbacks=[Term()], log_every_n_steps=5, **kw)
    before = list(rows.rows)
    assert before[-1][0] == 12 and "val/loss" in before[-1][1]
    fit(step, state, data, loggers=[rows], checkpoint=fnlit.Checkpointer(tmp_path), ckpt_path="last", log_every_n_steps=4, **kw)
    assert rows.rows[: len(before)] == before and rows.rows[len(before)][0] > 12


def test_a_second_ctrl_c_during_the_last_rows_write_saves_and_the_resume_logs_it(tmp_path):
    # The final partial row (step 24) is written after the loop: an interrupt there escaped fit, and with the
    # default Checkpointer nothing at all was saved. Reference: the uninterrupted run's rows and params.
    step, state, data, _ = _ctrl_c_setup()
    kw = dict(max_epochs=2, log_every_n_steps=5, progress=False)
    ref = _Rows()
    want = fit(step, state, data, loggers=[ref], **kw)
    first, cut = _Rows(), _CtrlCInWrite(at=24)
    fit(step, state, data, loggers=[first, cut], checkpoint=fnlit.Checkpointer(tmp_path), **kw)
    assert (tmp_path / "last.ckpt").exists()
    got = fit(step, state, data, loggers=[first, cut], checkpoint=fnlit.Checkpointer(tmp_path), ckpt_path="last", **kw)
    assert first.rows == cut.rows == ref.rows
    assert_trees_equal(got.params, want.params)


def test_without_a_checkpoint_a_cut_row_is_not_written_again_to_the_writers_that_had_it():
    step, state, data, _ = _ctrl_c_setup()
    first, cut = _Rows(), _CtrlCInWrite()
    fit(step, state, data, loggers=[first, cut], max_epochs=2, log_every_n_steps=5, progress=False)
    assert [s for s, _ in first.rows] == [5, 10]  # the run stops at the interrupt; step 10 once


@pytest.mark.parametrize("option, value", [("max_epochs", -2), ("max_steps", -2), ("num_sanity_val_steps", -2),
                                           ("num_sanity_val_steps", 1.5), ("max_steps", 10.0), ("max_epochs", True)])
def test_fit_refuses_counts_below_minus_one_or_not_ints_as_lightning_does(option, value):
    # max_epochs=-2 trained forever, max_steps=-2 trained nothing, num_sanity_val_steps=-2 ran the whole validation
    # set and 1.5 was blamed on limit_batches. Lightning: "must be a non-negative integer or -1".
    with pytest.raises(ValueError, match=rf"fit expected {option} to be an int >= -1"):
        fit(Counter().step, make_state(), ArrayLoader(torch.arange(4), batch_size=1), val_data=[torch.zeros(1)],
            eval_step=Counter().eval_step, progress=False, **{"max_epochs": 1, option: value})  # fmt: skip


@pytest.mark.parametrize("option, value, error, match", [
    ("min_epochs", "2", ValueError, r"fit expected min_epochs to be an int >= 0 or None, got min_epochs='2'"),
    ("min_epochs", 1.5, ValueError, r"min_epochs to be an int >= 0"),
    ("min_epochs", -3, ValueError, r"min_epochs to be an int >= 0"),
    ("seed", "x", TypeError, r"fit expected seed to be an int or None \(the data-order seed\), got seed='x'"),
    ("seed", 1.5, TypeError, r"seed to be an int or None"),
    ("prefixes", ("train/",), TypeError, r"fit expected prefixes to be two strings \(training, validation\)"),
    ("prefixes", "tv", TypeError, r"prefixes to be two strings"),
    ("prefixes", ("train/", None), TypeError, r"prefixes to be two strings"),
    ("check_val_every_n_epoch", True, ValueError, r"check_val_every_n_epoch to be an int >= 1 or None"),
])
def test_fit_refuses_bad_options_at_the_start(option, value, error, match):
    # min_epochs="2" failed when the first stop was requested (hours in), 1.5 counted as 2; prefixes=("train/",)
    # failed at the first validation and "tv" logged 'tloss'; seed="x" failed inside the data code.
    c = Counter()
    with pytest.raises(error, match=match):
        fit(c.step, make_state(), ArrayLoader(torch.arange(4), batch_size=1, shuffle=True), val_data=[torch.zeros(1)],
            eval_step=c.eval_step, progress=False, **{"max_epochs": 1, option: value})  # fmt: skip
    assert c.train == []  # refused before the first step


@pytest.mark.parametrize("value", [0, -3])
def test_fit_refuses_an_int_val_check_interval_below_one(value):
    # It became "at the epoch's end" silently; the docstring says every N training batches (Lightning: a division by 0).
    with pytest.raises(ValueError, match=r"fit expected val_check_interval to be an int >= 1 or a float in \(0, 1\]"):
        run(max_epochs=1, val_check_interval=value)


@pytest.mark.parametrize("save_last", [True, False])
@pytest.mark.parametrize("every", [3, 5])
def test_a_continued_finished_run_logs_each_step_once_and_ends_an_epoch_again_only_from_an_earlier_file(tmp_path, every, save_last):
    # The last step's own checkpoint (step 6, every_n_steps=3) stood before the run's last log row and epoch end,
    # and the finish did not save again: a continued run logged steps 5-6 a second time (step 8's row the mean of
    # 5..8) and ran epoch 0's end again. every_n_steps=5 (no checkpoint at the last step) is the reference.
    from fnlit.checkpoint import Checkpointer

    def step(state, batch):
        return state.replace(step=state.step + 1), {"loss": batch.mean()}

    data = [torch.tensor([float(i)]) for i in range(20)]
    kw = dict(max_epochs=1, log_every_n_steps=4, progress=False, log_dir=str(tmp_path / "logs"))
    ck = lambda name: Checkpointer(tmp_path / name, every_n_steps=every, save_last=save_last)  # noqa: E731
    fit(step, make_state(), data, max_steps=6, **kw, checkpoint=ck("ck"))
    fit(step, make_state(), data, max_steps=12, **kw, checkpoint=ck("ck"), ckpt_path="last")
    rows = (tmp_path / "logs" / "metrics.csv").read_text().split()
    ended_saved = save_last or every == 3  # else the last file is step 5's: the continuation replays step 6
    # As one uninterrupted run, by hand: 4: mean(0..3); 8: mean(4..7); 12: mean(8..11). The first run's last row
    # (6: mean(4, 5)) is purged: from the exit's file, whose position keeps steps 5-6 for the interval, or from
    # step 5's file, whose continuation replays step 6.
    assert rows == ["step,train/loss,epoch", "4,1.5,0", "8,5.5,0", "12,9.5,0"]

    ends = []

    class Ends:
        def on_epoch_end(self, state, metrics):
            ends.append((int(state.step), metrics["epoch"]))

    short = [torch.tensor([float(i)]) for i in range(6)]
    kw = dict(progress=False, callbacks=[Ends()])
    fit(step, make_state(), short, max_epochs=1, **kw, checkpoint=ck("ck2"))
    fit(step, make_state(), short, max_epochs=2, **kw, checkpoint=ck("ck2"), ckpt_path="last")
    # each epoch ends once; a continuation from step 5's file replays step 6 and its epoch end (as after a crash)
    assert ends == ([(6, 0), (12, 1)] if ended_saved else [(6, 0), (6, 0), (12, 1)])


@pytest.mark.parametrize("metrics, match", [
    (torch.tensor(1.0), r"fit expected the step to return \(state, metrics\) with metrics a dict .*got Tensor as metrics"),
    (None, r"got NoneType as metrics"),
])
def test_a_step_returning_no_metrics_dict_is_refused_at_its_first_step(metrics, match):
    # (state, loss) failed at the first log row or the end of training with "values expected sparse tensor
    # layout" (Tensor.values), the trained state lost with it.
    seen = []

    def step(state, batch):
        seen.append(int(state.step))
        return state.replace(step=state.step + 1), metrics

    with pytest.raises(TypeError, match=match):
        fit(step, make_state(), [torch.zeros(1)] * 5, max_epochs=1, log_every_n_steps=50, progress=False)
    assert seen == [0]


def test_a_text_metric_is_refused_naming_it():
    step = lambda s, b: (s.replace(step=s.step + 1), {"loss": b.mean(), "note": "warmup"})  # noqa: E731
    with pytest.raises(TypeError, match=r"returned metric 'note' as str 'warmup'; metrics must be numbers or scalar tensors"):
        fit(step, make_state(), [torch.zeros(1)] * 2, max_epochs=1, progress=False)


@pytest.mark.parametrize("loader", ["array", "torch", "batch_sampler"])
def test_fit_refuses_before_training_a_last_batch_that_accumulate_cannot_split(loader):
    # 10 examples in batches of 4: the last holds 2, which accumulate(step, 4) cannot split. The run trained a whole
    # epoch, then failed there, saving nothing. (The reference for "cannot split": accumulate's own refusal.) A
    # DataLoader given torch's BatchSampler as batch_sampler= (no batch_size) was not checked.
    model = torch.nn.Linear(1, 1)
    step = fnlit.accumulate(fnlit.train_step(model, lambda m, b: m(b[0]).pow(2).mean()), 4)
    x = torch.arange(10.0).reshape(10, 1)
    with pytest.raises(ValueError, match="cannot split batch leaf"):
        step(make_state(), (x[:2],))
    def torch_loader(drop_last):
        ds = torch.utils.data.TensorDataset(x)
        if loader == "torch":
            return torch.utils.data.DataLoader(ds, batch_size=4, drop_last=drop_last)
        sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(ds), 4, drop_last)
        return torch.utils.data.DataLoader(ds, batch_sampler=sampler)

    data = fnlit.data.ArrayLoader(x, x, batch_size=4, shuffle=False) if loader == "array" else torch_loader(False)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    with pytest.raises(ValueError, match=r"last batch of each epoch holds 2 examples \(10 in batches of 4\).*k=4.*drop_last=True"):
        fit(step, state, data, max_epochs=1, progress=False)
    # fine: the short batch dropped, never reached (limit_train_batches), or split evenly (k=2)
    dropped = (fnlit.data.ArrayLoader(x, x, batch_size=4, shuffle=False, drop_last=True) if loader == "array"
               else torch_loader(True))
    assert int(fit(step, state, dropped, max_epochs=1, progress=False).step) == 2
    assert int(fit(step, state, data, max_epochs=1, limit_train_batches=2, progress=False).step) == 2
    two = fnlit.accumulate(fnlit.train_step(model, lambda m, b: m(b[0]).pow(2).mean()), 2)
    assert int(fit(two, state, data, max_epochs=1, progress=False).step) == 3
    assert int(fit(step, state, data, max_steps=2, progress=False).step) == 2  # stops before the last batch
    # behind compile or an ensemble (their .step splits the same batch): refused too, not at the epoch's end
    with pytest.raises(ValueError, match=r"last batch of each epoch holds 2 examples"):
        fit(fnlit.compile(step, mode="eager"), state, data, max_epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"last batch of each epoch holds 2 examples"):
        fit(fnlit.ensemble(step, 2), fnlit.stack_states([state, state]), data, max_epochs=1, progress=False)


@pytest.mark.parametrize("limit", [0.5, 1.0])
def test_a_fraction_limit_on_data_with_no_batches_gets_the_no_batches_error_not_a_division_by_zero(limit):
    c = Counter()
    with pytest.raises(ValueError, match=r"evaluate got no batches"):
        fnlit.evaluate(c.eval_step, make_state(), [], limit_batches=limit)  # (was ZeroDivisionError)
    with pytest.raises(ValueError, match=r"fit got empty training data"):
        fit(c.step, make_state(), [], limit_train_batches=limit, max_epochs=1, progress=False)


def test_overfit_batches_refuses_a_one_shot_iterator_over_several_epochs():
    """overfit_batches=N promises the first N batches every epoch (Lightning: the same N); a generator's second
    epoch took the next N (islice of the same iterator). Refused unless one epoch runs."""
    c = Counter()
    for kw in (dict(max_epochs=2), dict(max_epochs=-1, max_steps=3), dict(max_steps=3), dict(max_time=60)):
        with pytest.raises(TypeError, match=r"train_data as a one-shot iterator \(generator\) with overfit_batches.*"
                                            r"list of batches, a DataLoader, or an ArrayLoader.*max_epochs=1"):  # fmt: skip
            fit(c.step, make_state(), (torch.tensor([i]) for i in range(8)), overfit_batches=2, progress=False, **kw)
    assert c.train == []  # refused before any training
    # One epoch works: the first 2 batches, once (max_epochs=1, or max_steps within the epoch).
    for kw in (dict(max_epochs=1), dict(max_steps=2), dict(max_epochs=5, max_steps=1)):
        c = Counter()
        fit(c.step, make_state(), (torch.tensor([i]) for i in range(8)), overfit_batches=2, progress=False, **kw)
        assert c.train == [[0], [1]][: kw.get("max_steps", 2)]
    # A list (iterated from the start each time) gives the same first batches every epoch.
    c = Counter()
    fit(c.step, make_state(), [torch.tensor([i]) for i in range(8)], overfit_batches=2, max_epochs=3, progress=False)
    assert c.train == [[0], [1]] * 3


class _Augmented(ArrayLoader):
    """An ArrayLoader subclass that augments its batches in __iter__ (x -> 10 x + 1)."""

    def __iter__(self):
        return (x * 10 + 1 for x in super().__iter__())


class _Named(ArrayLoader):
    """An ArrayLoader subclass that only adds a method: its __iter__ is ArrayLoader's."""

    def name(self):
        return "named"


def test_an_array_loader_subclass_overriding_iter_is_iterated_as_it_is():
    """fit and evaluate read an ArrayLoader's tensors themselves (data.batches, data.eval_batches): a subclass's
    __iter__ (an augmentation) was bypassed, and the step trained on un-augmented batches. The reference is plain
    iteration over the same object."""
    c = Counter()
    fit(c.step, make_state(), _Augmented(torch.arange(10), batch_size=3), max_epochs=2, seed=5, progress=False)
    reference = _Augmented(torch.arange(10), batch_size=3)
    expected = []
    for epoch in range(2):
        reference.set_epoch(epoch, 5)  # (fit's seed: its order, then the subclass's augmentation)
        expected += [b.tolist() for b in reference]
    assert c.train == expected and all(x % 10 == 1 for b in c.train for x in b)
    # evaluate: the mean over examples of plain iteration
    loader = _Augmented(torch.arange(10.0), batch_size=4)
    plain = list(loader)
    mean = sum(b.sum().item() for b in plain) / sum(len(b) for b in plain)
    got = evaluate(lambda state, b: {"x": b.mean()}, make_state(), loader)
    assert got["x"] == pytest.approx(mean) and mean == pytest.approx(46.0)
    # fit's validation, a resume mid-epoch (skipping by iterating), overfit_batches (unshuffled: refused if it shuffles)
    c = Counter()
    fit(c.step, make_state(), list(range(2)), val_data=_Augmented(torch.arange(5), batch_size=2), eval_step=c.eval_step,
        max_epochs=1, num_sanity_val_steps=0, progress=False)  # fmt: skip
    assert c.val == [b.tolist() for b in _Augmented(torch.arange(5), batch_size=2)]  # (its own order, augmented)
    c = Counter()
    fit(c.step, make_state(), _Augmented(torch.arange(10), batch_size=3, shuffle=False), max_epochs=2, overfit_batches=2,
        progress=False)  # fmt: skip
    assert c.train == [[1, 11, 21], [31, 41, 51]] * 2
    with pytest.raises(ValueError, match=r"shuffling _Augmented \(an ArrayLoader subclass with its own __iter__\).*shuffle=False"):
        fit(c.step, make_state(), _Augmented(torch.arange(10), batch_size=3), max_epochs=2, overfit_batches=2, progress=False)


def test_an_array_loader_subclass_keeping_iter_keeps_the_direct_path_and_one_overriding_it_resumes(tmp_path):
    # evaluate reads it unshuffled (eval_batches), not in its shuffled training order: the first batch is [0, 1, 2]
    got = evaluate(lambda state, b: {"x": b.float().mean()}, make_state(), _Named(torch.arange(10), batch_size=3), 1)
    assert got["x"] == 1.0
    # a resume mid-epoch of an augmenting subclass sees the batches of a straight run (skipping by iterating)
    from fnlit.checkpoint import Checkpointer

    straight, part, rest = Counter(), Counter(), Counter()
    fit(straight.step, make_state(), _Augmented(torch.arange(10), batch_size=3), max_epochs=2, progress=False)
    fit(part.step, make_state(), _Augmented(torch.arange(10), batch_size=3), max_steps=6,
        checkpoint=Checkpointer(tmp_path, every_n_steps=1), progress=False)  # fmt: skip
    fit(rest.step, make_state(), _Augmented(torch.arange(10), batch_size=3), max_epochs=2,
        checkpoint=Checkpointer(tmp_path, every_n_steps=1), ckpt_path="last", progress=False)  # fmt: skip
    assert part.train + rest.train == straight.train and len(straight.train) == 8


def test_the_commonest_slips_with_fit_name_the_fix():
    # A module passed as the step, a step returning the state alone, and the dataset's (x, y) tensors passed as
    # train_data failed inside torch ("forward() takes 2 positional arguments"), at an unpack ("cannot unpack
    # non-iterable TrainState"), and in the user's own `x, y = batch` (fit iterated the tuple: x was a batch).
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    with pytest.raises(TypeError, match="expected step to be a step function.*got the module Sequential"):
        fit(model, state, [(x, y)], max_epochs=1, progress=False)
    with pytest.raises(TypeError, match=r"expected the step to return \(state, metrics\), got a TrainState"):
        fit(lambda s, b: s, state, [(x, y)], max_epochs=1, progress=False)
    step = fnlit.train_step(model, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
    with pytest.warns(UserWarning, match="train_data as a tuple of 2 tensors: it iterates it"):
        with pytest.raises(RuntimeError):  # what the user's step then does with a batch that is x (b[1] a row of x)
            fit(step, state, (x, y), max_epochs=1, progress=False)


def test_evaluate_tells_an_apply_left_in_training_mode_once():
    # apply's train defaults to True: an eval step that forgot train=False validated with dropout on (a noisy,
    # biased loss drawing from the global generator) and BatchNorm on batch statistics, silently. Lightning
    # evaluates in eval mode; the reference value is torch's eval-mode model.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(3)]

    def eval_step(**mode):
        def run(state, batch):
            out, _ = fnlit.apply(model, state.params, state.buffers, batch[0], **mode)
            return {"loss": torch.nn.functional.mse_loss(out, batch[1])}
        return run

    with pytest.warns(UserWarning, match=r"ran Sequential in training mode inside evaluate \(Dropout") as told:
        evaluate(eval_step(), state, data)
    assert len(told) == 1  # once, not once a batch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = evaluate(eval_step(train=False), state, data)
        evaluate(eval_step(train=True), state, data)  # meant (Monte Carlo dropout): untold
        plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
        plain_state = fnlit.TrainState.create(plain, fnlit.optim.sgd(0.1), seed=0)
        evaluate(lambda s, b: {"y": fnlit.apply(plain, s.params, s.buffers, b[0])[0].mean()}, plain_state, data)
    model.eval()
    with torch.no_grad():
        want = sum(torch.nn.functional.mse_loss(model(x), y) for x, y in data) / 3
    assert out["loss"] == pytest.approx(want.item(), rel=1e-6)
