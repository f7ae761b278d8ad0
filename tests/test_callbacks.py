"""Callbacks inside fit: early stopping, LR monitor, EMA/SWA against hand computations, timer, update_bn."""

import copy
import datetime
import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import batch, hand_step, mlp

import fnlit
from fnlit.callbacks import (
    EMA,
    Callback,
    SWA,
    EarlyStopping,
    LearningRateMonitor,
    StopTraining,
    Timer,
    update_bn,
)
from fnlit.data import ArrayLoader
from fnlit.loop import evaluate, fit


def counting_state():
    return fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)


def count_step(state, batch):
    return state.replace(step=state.step + 1), {"loss": torch.tensor(0.0)}


def scripted_eval(values):
    """An eval step whose val/loss at the k-th validation run is values[k] (one val batch per run)."""
    runs = iter(values)
    return lambda state, batch: {"loss": torch.tensor(next(runs))}


@pytest.mark.parametrize(
    "mode, values, min_delta, epochs",
    [
        ("min", [5.0, 4.0, 4.5, 4.2, 1.0], 0.0, 4),  # best 4.0 at run 2, then 2 runs without improvement
        ("min", [5.0, 4.6, 4.4, 4.3, 4.0, 1.0], 0.5, 5),  # 4.6 > 5.0 - 0.5; 4.4 improves; 4.3, 4.0 > 4.4 - 0.5
        ("max", [1.0, 2.0, 3.0, 3.0, 2.5, 9.0], 0.0, 5),
    ],
)
def test_early_stopping_counts_validation_runs(mode, values, min_delta, epochs):
    es = EarlyStopping("val/loss", mode=mode, patience=2, min_delta=min_delta)
    state = fit(count_step, counting_state(), list(range(3)), max_epochs=20, val_data=[0], eval_step=scripted_eval(values),
                num_sanity_val_steps=0, callbacks=[es], progress=False)  # fmt: skip
    assert int(state.step) == 3 * epochs and es.stopped_step == 3 * epochs


def lightning_early_stopping(values, mode, patience, min_delta):
    """Lightning's EarlyStopping rule, transcribed: its (best, wait) after each value, and where it stops."""
    monitor_op = (lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b)
    min_delta *= 1 if mode == "max" else -1
    best, wait, seen = math.inf if mode == "min" else -math.inf, 0, []
    for i, current in enumerate(values):
        if monitor_op(current - min_delta, best):
            best, wait = current, 0
        else:
            wait += 1
        seen.append((best, wait))
        if wait >= patience:
            return seen, i
    return seen, None


@pytest.mark.parametrize("min_delta", [0.05, -0.05, 0.0])
@pytest.mark.parametrize("mode", ["min", "max"])
def test_early_stopping_min_delta_keeps_its_sign_as_lightning(mode, min_delta):
    # A negative min_delta tolerates a small worsening in Lightning (min_delta *= -1 in mode "min", then
    # monitor_op(current - min_delta, best)); fnlit took abs(min_delta) and stopped at the 4th run of the first one.
    values = [1.0, 0.9, 0.91, 0.92, 0.905, 0.93, 0.94, 0.99, 1.2]
    values = values if mode == "min" else [-v for v in values]
    seen, stop = lightning_early_stopping(values, mode, 2, min_delta)
    es = EarlyStopping("val/loss", mode=mode, patience=2, min_delta=min_delta)
    for i, current in enumerate(values):
        if i == stop:
            with pytest.raises(StopTraining, match="did not improve in 2"):
                es.on_validation(None, {"val/loss": current})
        else:
            es.on_validation(None, {"val/loss": current})
        assert (es.best, es.wait) == seen[i]
        if i == stop:
            break
    assert stop == (8 if min_delta < 0 else 3)  # (the values tell the signs apart: the worsenings by < 0.05 count)


def test_stop_training_in_on_fit_start_runs_no_step_and_patience_zero_stops_at_the_first_miss():
    class StopAtOnce:
        def on_fit_start(self, state, plan):
            raise StopTraining("not today")

    state = fit(count_step, counting_state(), [0, 1], max_epochs=3, callbacks=[StopAtOnce()], progress=False)
    assert int(state.step) == 0  # Lightning's should_stop before training: no step
    es = EarlyStopping("val/loss", patience=0)  # Lightning accepts 0: the first run without improvement stops
    state = fit(count_step, counting_state(), [0], max_epochs=10, val_data=[0], eval_step=scripted_eval([3.0, 2.0, 2.5, 1.0]),
                num_sanity_val_steps=0, callbacks=[es], progress=False)  # fmt: skip
    assert int(state.step) == 3


def test_a_monitor_without_validation_warns():
    with pytest.warns(UserWarning, match=r"runs no validation .* EarlyStopping\(monitor='train/loss'\) .* never act"):
        fit(count_step, counting_state(), [0], max_epochs=2, callbacks=[EarlyStopping("train/loss")], progress=False)


@pytest.mark.parametrize(
    "mode, kwargs, values, epochs",
    [
        ("min", {"stopping_threshold": 0.5}, [2.0, 1.0, 0.4, 0.1], 3),  # 0.4 < 0.5: good enough
        ("max", {"stopping_threshold": 0.9}, [0.5, 0.95, 0.99], 2),
        ("min", {"divergence_threshold": 10.0}, [2.0, 11.0, 1.0], 2),  # 11 > 10: diverged
        ("max", {"divergence_threshold": 0.1}, [0.5, 0.05, 0.9], 2),
    ],
)
def test_early_stopping_thresholds_as_lightning_defines_them(mode, kwargs, values, epochs):
    es = EarlyStopping("val/loss", mode=mode, patience=10, **kwargs)
    state = fit(count_step, counting_state(), [0], max_epochs=10, val_data=[0], eval_step=scripted_eval(values),
                num_sanity_val_steps=0, callbacks=[es], progress=False)  # fmt: skip
    assert int(state.step) == epochs and es.stopped_step == epochs


def test_early_stopping_waits_for_min_epochs():
    es = EarlyStopping("val/loss", patience=1)
    state = fit(count_step, counting_state(), list(range(3)), max_epochs=20, min_epochs=5, val_data=[0],
                eval_step=scripted_eval([1.0] * 20), num_sanity_val_steps=0, callbacks=[es], progress=False)  # fmt: skip
    assert int(state.step) == 15


def test_early_stopping_names_the_missing_metric():
    with pytest.raises(KeyError, match=r"monitor='val/acc'.*\['val/loss'\]"):
        fit(count_step, counting_state(), [0], max_epochs=2, val_data=[0], eval_step=scripted_eval([1.0] * 3),
            num_sanity_val_steps=0, callbacks=[EarlyStopping("val/acc")], progress=False)  # fmt: skip


def test_lr_monitor_logs_the_schedule_value_of_each_logged_step(tmp_path):
    schedule = fnlit.optim.linear_warmup(1.0, 10)
    model = mlp()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(schedule), seed=0)
    x, y = batch(32)
    fit(hand_step(model), state, ArrayLoader(x, y, batch_size=4), max_epochs=1, log_every_n_steps=3,
        callbacks=[LearningRateMonitor()], log_dir=str(tmp_path), progress=False)  # fmt: skip
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    got = [(int(r.split(",")[0]), float(r.split(",")[header.index("lr-SGD")])) for r in rows[1:]]
    # The rate the step-k update used is the warm-up's value at count k - 1: (k - 1) / 10.
    assert got == [(3, pytest.approx(0.2)), (6, pytest.approx(0.5)), (8, pytest.approx(0.7))]


def test_lr_monitor_names_the_optimizer_whose_rate_it_logs():
    # The rate is the first one fnlit.optim.learning_rate finds (depth first, into masked chains); the
    # name must come from that optimizer, here SGD (0.1), not the Adam (1e-3) a flat search meets first.
    model = torch.nn.Linear(2, 1)
    weight, bias = (lambda p: {k: k == "weight" for k in p}), (lambda p: {k: k == "bias" for k in p})
    opt = fnlit.optim
    for tx in [
        opt.chain(opt.masked(opt.sgd(0.1), weight), opt.adam(1e-3)),
        opt.chain(opt.masked(opt.chain(opt.clip_by_global_norm(1.0), opt.sgd(0.1)), weight), opt.masked(opt.adam(1e-3), bias)),
    ]:
        logged = LearningRateMonitor().on_log(fnlit.TrainState.create(model, tx, seed=0))
        assert list(logged) == ["lr-SGD"] and float(logged["lr-SGD"]) == pytest.approx(0.1)


def test_a_reused_lr_monitor_names_each_fits_optimizer():
    monitor, model = LearningRateMonitor(), torch.nn.Linear(2, 1)
    names = [list(monitor.on_log(fnlit.TrainState.create(model, tx, seed=0))) for tx in [fnlit.optim.sgd(0.1), fnlit.optim.adam(1e-3)]]
    assert names == [["lr-SGD"], ["lr-Adam"]]
    assert list(LearningRateMonitor("lr").on_log(fnlit.TrainState.create(model, fnlit.optim.adam(1e-3), seed=0))) == ["lr"]


class Recorder:
    def __init__(self):
        self.steps, self.epochs = [], []

    def on_step(self, state, metrics):
        self.steps.append({k: v.clone() for k, v in state.params.items()})

    def on_epoch_end(self, state, metrics):
        self.epochs.append({k: v.clone() for k, v in state.params.items()})


def train(callbacks, epochs=4, **kw):
    model = mlp(dropout=0.1)
    state = fnlit.TrainState.create(model, fnlit.optim.adam(1e-2), seed=0)
    x, y = batch(40)
    rec = Recorder()
    end = fit(hand_step(model), state, ArrayLoader(x, y, batch_size=8), max_epochs=epochs, callbacks=[rec, *callbacks],
              progress=False, **kw)  # fmt: skip
    return model, state, end, rec


def test_ema_equals_the_hand_computed_average():
    ema = EMA(decay=0.9)
    model, start, end, rec = train([ema])
    expected = {k: v.clone() for k, v in start.params.items()}
    for params in rec.steps:
        expected = {k: 0.9 * expected[k] + 0.1 * params[k] for k in expected}
    for k in expected:
        torch.testing.assert_close(ema.params[k], expected[k], rtol=1e-5, atol=1e-6)
    averaged = ema.state(end)
    assert averaged.params.keys() == end.params.keys() and torch.equal(averaged.step, end.step)
    ev = fnlit.eval_step(model, lambda m, b: {"loss": F.cross_entropy(m(b[0]), b[1])})
    assert set(evaluate(ev, averaged, [batch(8)])) == {"loss"}


def test_ema_pairs_params_by_name_when_the_step_returns_them_in_another_order():
    # The average was lerped by position: a step rebuilding its params dict in another order ({**updated,
    # **frozen}) mixed one layer's average into another's (or crashed on different shapes).
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 3))
    start = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)

    def step(state, batch):
        new = state.apply_gradients({k: torch.ones_like(v) for k, v in state.params.items()})
        return new.replace(params=dict(reversed(list(new.params.items())))), {"loss": torch.zeros(())}

    ema, rec = EMA(decay=0.5), Recorder()
    fit(step, start, [0, 1, 2], max_epochs=1, callbacks=[rec, ema], progress=False)
    expected = {k: v.clone() for k, v in start.params.items()}
    for params in rec.steps:  # the definition, by name
        expected = {k: 0.5 * expected[k] + 0.5 * params[k] for k in expected}
    for k in expected:
        torch.testing.assert_close(ema.params[k], expected[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "start, first", [(1, 0), (2, 1), (3, 2), (4, 3), (0.5, 1), (0.8, 2), (1.0, 3)]  # first: the 0-based first epoch
)
def test_swa_equals_the_mean_of_epoch_end_params(start, first):
    # Epochs count as Lightning's StochasticWeightAveraging counts them (swa_start = swa_epoch_start - 1): an int is
    # a 1-based epoch (2 first averages the second epoch, as 0.5 of 4 epochs does: it was 0-based, one epoch
    # later), and a fraction's int(f * max_epochs) is one too, so 0.8 of 4 epochs averages 2 epochs' ends
    # (Lightning: 2 snapshots), 1.0 the last (it averaged nothing).
    swa = SWA(swa_epoch_start=start)
    assert swa.start == (first if isinstance(start, int) else None)  # 0-based
    _, _, end, rec = train([swa], epochs=4)
    averaged = rec.epochs[first:]
    assert swa.n_averaged == len(averaged)
    for k, v in swa.params.items():
        torch.testing.assert_close(v, torch.stack([p[k] for p in averaged]).mean(0), rtol=1e-5, atol=1e-6)
    assert torch.equal(swa.state(end).params[k], swa.params[k])


def test_swa_refuses_a_start_past_the_last_epoch():
    with pytest.raises(ValueError, match=r"starts averaging at 0-based epoch 4 \(epoch 5 counted from 1\), but fit has "
                       r"max_epochs=4: nothing would"):  # fmt: skip
        train([SWA(swa_epoch_start=5)], epochs=4)


@pytest.mark.parametrize("start", [0, -1, True, 1.5, -0.1, "2"])
def test_swa_refuses_an_int_start_below_1_as_lightning(start):
    with pytest.raises(ValueError, match=r"SWA expected swa_epoch_start to be a 1-based epoch \(an int >= 1, as Lightning"):
        SWA(swa_epoch_start=start)


def test_ema_and_swa_resume_their_averages_bitwise(tmp_path):
    from fnlit.checkpoint import Checkpointer

    def run(epochs, folder, **kw):
        torch.manual_seed(0)  # the same initial model in every run
        model = mlp(dropout=0.1)
        state = fnlit.TrainState.create(model, fnlit.optim.adam(1e-2), seed=0)
        x, y = batch(40)
        ema, swa = EMA(decay=0.9), SWA(swa_epoch_start=2)  # from the second epoch (1-based)
        fit(hand_step(model), state, ArrayLoader(x, y, batch_size=8), max_epochs=epochs, callbacks=[ema, swa],
            checkpoint=Checkpointer(folder, every_n_epochs=1), progress=False, **kw)  # fmt: skip
        return ema, swa

    ema, swa = run(4, tmp_path / "whole")  # the reference: never interrupted
    run(2, tmp_path / "cut")  # stopped after epoch 2 (one epoch averaged by SWA), then resumed in new callbacks
    ema2, swa2 = run(4, tmp_path / "cut", ckpt_path="last")
    assert swa2.n_averaged == swa.n_averaged == 3
    for a, b in [(ema.params, ema2.params), (swa.params, swa2.params)]:
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_average_of_another_model_is_refused_and_an_old_count_only_checkpoint_warns():
    ema = EMA()
    ema.load_state_dict({"params": {"weight": torch.zeros(3, 3)}})
    with pytest.raises(ValueError, match=r"EMA: its average does not fit the state's params \(at \['bias'\]"):
        ema.on_fit_start(counting_state(), {})
    swa = SWA(swa_epoch_start=1)
    with pytest.warns(UserWarning, match="SWA: the checkpoint was saved after averaging began, but holds no average"):
        swa.load_state_dict({"n_averaged": 2})
    assert swa.n_averaged == 0 and swa.params is None


def test_swa_fraction_needs_max_epochs():
    with pytest.raises(ValueError, match="fraction of max_epochs"):
        fit(count_step, counting_state(), [0], max_steps=3, callbacks=[SWA(0.5)], progress=False)


def test_fast_dev_run_smoke_tests_an_swa_that_starts_after_its_one_epoch():
    # fast_dev_run forces max_epochs=1; SWA(75) of max_epochs=100 trains fine, so its smoke run must run (Lightning
    # has no such check). It averages nothing there.
    swa = SWA(swa_epoch_start=75)
    _, start, end, rec = train([swa], epochs=100, fast_dev_run=True)
    assert int(end.step) == 1 and len(rec.epochs) == 1 and swa.n_averaged == 0 and swa.params is None


def test_a_fast_dev_run_smoke_run_leaves_ema_and_swa_as_they_were():
    # A smoke run of the config, then the real run with the same callbacks (as EarlyStopping allows): the smoke run's
    # one epoch (max_epochs is 1 there) fixed a fractional SWA start at 0-based 0 for good, and its snapshot stayed in
    # both averages.
    ema, swa = EMA(decay=0.9), SWA(swa_epoch_start=0.75)

    class Probe:  # first in the list: its on_fit_end sees the averages before EMA's and SWA's put them back
        def on_fit_end(self, state, metrics):
            seen.append((copy.deepcopy(ema.params), copy.deepcopy(swa.params), swa.n_averaged, swa.start))

    seen = []
    _, start, _, rec = train([Probe(), ema, swa], epochs=4, fast_dev_run=True)
    # the smoke run averages as a real run (its one step for the EMA; its one epoch, 0-based 0, for the SWA)...
    smoke_ema, smoke_swa, smoke_n, smoke_start = seen[0]
    assert (smoke_n, smoke_start) == (1, 0) and len(rec.steps) == len(rec.epochs) == 1
    for k in start.params:
        torch.testing.assert_close(smoke_ema[k], 0.9 * start.params[k] + 0.1 * rec.steps[0][k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(smoke_swa[k], rec.epochs[0][k])
    # ...and leaves nothing behind
    assert ema.params is None and (swa.start, swa.params, swa.n_averaged) == (None, None, 0)
    _, start, _, rec = train([ema, swa], epochs=4)
    assert swa.start == 2 and swa.n_averaged == 2  # Lightning's int(0.75 * 4) = 3 (1-based): 0-based epochs 2 and 3
    expected = {k: v.clone() for k, v in start.params.items()}
    for params in rec.steps:
        expected = {k: 0.9 * expected[k] + 0.1 * params[k] for k in expected}
    for k in expected:
        torch.testing.assert_close(ema.params[k], expected[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(swa.params[k], torch.stack([p[k] for p in rec.epochs[2:]]).mean(0), rtol=1e-5, atol=1e-6)
    # A smoke run after it (whose one epoch is before the start: the SWA averages nothing) leaves the averages, count
    # and start as they were.
    before = copy.deepcopy((ema.params, swa.params, swa.n_averaged, swa.start))
    train([ema, swa], epochs=4, fast_dev_run=True)
    after = (ema.params, swa.params, swa.n_averaged, swa.start)
    assert after[2:] == before[2:] and all(torch.equal(a[k], b[k]) for a, b in zip(after[:2], before[:2]) for k in a)


def test_a_smoke_run_that_fails_leaves_a_resume_the_checkpoints_averages(tmp_path):
    # A fast_dev_run that raised midway never reached on_fit_end: the resume's next on_fit_start put the averages from
    # before the smoke run back over the ones just loaded from the checkpoint (the EMA's initial copy, no SWA at all).
    def run(callbacks, **kw):
        torch.manual_seed(0)
        state = fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(0.1), seed=0)
        fit(ones_step, state, ArrayLoader(torch.arange(4.0), batch_size=1, shuffle=False),
            callbacks=callbacks, progress=False, **kw)  # fmt: skip

    class Fails:
        def on_step(self, state, metrics):
            raise RuntimeError("the smoke run found a bug")

    ckpt = fnlit.checkpoint.Checkpointer(tmp_path)
    run([EMA(decay=0.5), SWA(swa_epoch_start=1)], max_epochs=3, checkpoint=ckpt)
    reference = [EMA(decay=0.5), SWA(swa_epoch_start=1)]  # resumed without a smoke run before
    run(reference, max_epochs=3, checkpoint=ckpt, ckpt_path="last")
    ema, swa = EMA(decay=0.5), SWA(swa_epoch_start=1)
    with pytest.raises(RuntimeError, match="the smoke run found a bug"):
        run([ema, swa, Fails()], fast_dev_run=2)
    run([ema, swa], max_epochs=3, checkpoint=ckpt, ckpt_path="last")
    assert swa.n_averaged == reference[1].n_averaged == 3 and swa.start == 0
    for a, b in [(ema.params, reference[0].params), (swa.params, reference[1].params)]:
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_fractional_swa_start_is_fixed_by_the_first_fit_as_lightning(tmp_path):
    # Lightning converts the fraction once, at the first fit: continued (ckpt_path) with a larger max_epochs, the same
    # callback averages on from where it started, as an int start there does. Guards the smoke-run put-back against
    # taking the start again from each fit's max_epochs (0.75 of 8: 0-based 5, skipping epochs 3 and 4).
    def run(swa, epochs, **kw):
        torch.manual_seed(0)
        state = fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(0.1), seed=0)
        fit(ones_step, state, ArrayLoader(torch.arange(2.0), batch_size=1, shuffle=False), max_epochs=epochs,
            callbacks=[swa], checkpoint=fnlit.checkpoint.Checkpointer(tmp_path / str(swa.swa_epoch_start)),
            progress=False, **kw)  # fmt: skip

    swa, reference = SWA(swa_epoch_start=0.75), SWA(swa_epoch_start=3)  # int(0.75 * 4) = 3, 1-based
    for s in (swa, reference):
        run(s, 4)
        run(s, 8, ckpt_path="last")
    assert swa.start == reference.start == 2 and swa.n_averaged == reference.n_averaged == 6
    assert all(torch.equal(swa.params[k], reference.params[k]) for k in reference.params)


def test_a_fractional_swa_start_is_kept_by_a_resume_with_new_callbacks(tmp_path):
    # A resume in a new process makes a new SWA: the checkpoint holds the start the first fit took from its max_epochs,
    # so a resume with a larger max_epochs averages on from it, as the same callback does. It took the start again from
    # the resumed fit's max_epochs (0.75 of 8: 0-based 5), so the average held epochs 2, 3, then 5 to 7: 4 was skipped.
    def first_state():
        torch.manual_seed(0)
        return fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(0.1), seed=0)

    def run(swa, epochs, **kw):
        fit(ones_step, first_state(), ArrayLoader(torch.arange(2.0), batch_size=1, shuffle=False), max_epochs=epochs,
            callbacks=[swa], checkpoint=fnlit.checkpoint.Checkpointer(tmp_path), progress=False, **kw)  # fmt: skip

    run(SWA(swa_epoch_start=0.75), 4)  # int(0.75 * 4) = 3, 1-based: 0-based epochs 2 and 3
    swa = SWA(swa_epoch_start=0.75)
    run(swa, 8, ckpt_path="last")
    # ones_step moves each param by -0.1 a step, two steps an epoch: 0-based epoch e ends at init - 0.2 * (e + 1)
    init = first_state().params
    assert swa.start == 2 and swa.n_averaged == 6
    for k, v in init.items():  # the mean of epochs 2 to 7's ends
        torch.testing.assert_close(swa.params[k], v - 0.2 * torch.tensor([3.0, 4, 5, 6, 7, 8]).mean())


def ones_step(state, batch):  # a gradient of ones: the params move by -lr every step
    return state.apply_gradients({k: torch.ones_like(v) for k, v in state.params.items()}), {"loss": batch.float().mean()}


def test_early_stopping_does_nothing_under_fast_dev_run_as_lightning():
    # Lightning's _run_early_stopping_check returns at once under fast_dev_run: no count, no stop, no state change.
    def smoke(es, values):
        return fit(count_step, counting_state(), [0, 1, 2], max_epochs=20, val_data=[0], eval_step=scripted_eval(values),
                   callbacks=[es], fast_dev_run=True, progress=False)  # fmt: skip

    es = EarlyStopping("val/loss", patience=2)
    before = copy.deepcopy(vars(es))
    assert int(smoke(es, [float("nan")]).step) == 1  # a NaN would stop (check_finite) and record why
    assert {k: v for k, v in vars(es).items() if k != "_off"} == {k: v for k, v in before.items() if k != "_off"}
    # The same callback in a real fit afterwards counts as test_early_stopping_counts_validation_runs's hand count:
    # best 4.0 at run 2, then 2 runs without improvement: 4 epochs of 3 steps.
    state = fit(count_step, counting_state(), [0, 1, 2], max_epochs=20, val_data=[0], num_sanity_val_steps=0,
                eval_step=scripted_eval([5.0, 4.0, 4.5, 4.2, 1.0]), callbacks=[es], progress=False)  # fmt: skip
    assert int(state.step) == 12 and es.stopped_step == 12 and es._stopped_by == "patience"
    # A state that had decided to stop (loaded) does not stop the smoke run (it would stop at once, with a warning),
    # and is still there for the run it belongs to.
    es = EarlyStopping("val/loss", patience=1)
    es.load_state_dict({"best": 1.0, "wait": 1, "stopped_step": 7, "stopped_by": "patience", "stopped_value": 1})
    before = copy.deepcopy(vars(es))
    assert int(smoke(es, [2.0]).step) == 1
    assert {k: v for k, v in vars(es).items() if k != "_off"} == {k: v for k, v in before.items() if k != "_off"}


@pytest.mark.parametrize(
    "duration, match",
    [
        (float("nan"), r"a finite time >= 0, got nan instead"),  # (with max_time the only limit, it never stopped)
        (-5.0, r"a finite time >= 0, got -5.0 instead"),  # (it trained no step, silently)
        (float("inf"), r"a finite time >= 0, got inf instead"),
        (10**400, r"a finite time >= 0, got 1000"),  # (math.isfinite's OverflowError)
        ({"hours": -1}, r"a finite time >= 0, got \{'hours': -1\} \(-3600.0 s\) instead"),
        ("00:00:00:-3", r"a duration 'DD:HH:MM:SS' \(e.g. '00:12:00:00'\), got '00:00:00:-3' instead"),
        ("xx:00:00:01", r"a duration 'DD:HH:MM:SS' \(e.g. '00:12:00:00'\), got 'xx:00:00:01' instead"),
        ({"hour": 1}, r"a dict of datetime.timedelta's arguments \(e.g. \{'hours': 2\}.*got \{'hour': 1\} instead"),
        (True, r"seconds, a datetime.timedelta, a dict .* got True instead"),
        ("00:00:00:\u00b2", r"a duration 'DD:HH:MM:SS' \(e.g. '00:12:00:00'\), got '00:00:00:\u00b2' instead"),  # (a digit)
        ("9999999999:00:00:00", r"a duration 'DD:HH:MM:SS' that a datetime.timedelta holds, got '9999999999:00:00:00'"),
    ],
)
def test_timer_and_max_time_refuse_a_bad_duration(duration, match):
    class Restores:  # fit checks max_time with its other arguments, before any work: no checkpoint is read
        def restore(self, path, like):
            raise AssertionError("fit restored a checkpoint before it checked max_time")

    with pytest.raises(ValueError, match=r"Timer expected duration \(fit's max_time\) to be " + match):
        Timer(duration)
    with pytest.raises(ValueError, match=r"Timer expected duration \(fit's max_time\) to be " + match):
        fit(count_step, counting_state(), [0], max_time=duration, checkpoint=Restores(), ckpt_path="last", progress=False)
    assert Timer(0).duration == 0 and Timer("0:0:0:0").duration == 0  # 0 is allowed: it stops before the first step


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: EMA("0.9"), r"EMA expected a float decay with 0 <= decay < 1, got decay='0.9' instead"),
        (lambda: EarlyStopping(monitor=None), r"EarlyStopping expected monitor to be a metric's name \(a str, e.g. "
                                              r"'val/loss'\), got monitor=None instead"),  # fmt: skip
        (lambda: EarlyStopping(stopping_threshold="1"),
         r"EarlyStopping expected stopping_threshold to be a number or None, got stopping_threshold='1' instead"),
        (lambda: EarlyStopping(divergence_threshold=float("nan")),
         r"EarlyStopping expected divergence_threshold to be a number or None, got divergence_threshold=nan instead"),
        (lambda: EarlyStopping(min_delta=None), r"EarlyStopping expected min_delta to be a number, got min_delta=None"),
        (lambda: EMA(torch.tensor([0.9])), r"EMA expected a float decay .* got decay=tensor\(\[0.9000\]\) instead"),
        (lambda: EarlyStopping(min_delta=torch.tensor(True)),
         r"EarlyStopping expected min_delta to be a number, got min_delta=tensor\(True\)"),
    ],
)
def test_callbacks_refuse_bad_arguments_when_made(make, match):
    # (they failed at the first validation or step, or with Python's own message: "'<=' not supported ...")
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("number", [torch.tensor, np.array, np.float32], ids=["tensor", "np.array", "np.float32"])
def test_callbacks_take_a_0d_tensor_or_numpy_number_as_the_number(number):
    # A real 0-d tensor or array is the number it holds, as before the checks above refused it (it is not a
    # numbers.Real): the callback behaves as one made with the Python float.
    state = fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(1.0), seed=0)
    later = state.apply_gradients({k: torch.ones_like(v) for k, v in state.params.items()})
    averages = []
    for ema in (EMA(decay=number(0.25)), EMA(decay=0.25)):
        ema.on_fit_start(state, {})
        ema.on_step(later, {})
        averages.append(ema.params)
    assert all(torch.equal(averages[0][k], averages[1][k]) for k in averages[1])

    def outcome(values, **kw):
        es = EarlyStopping(patience=1, **kw)
        try:
            for v in values:
                es.on_validation(None, {"val/loss": v})
        except StopTraining as e:
            return str(e)

    for values in ([2.0, 1.875], [2.0, 1.5, 0.25], [2.0, 16.0]):  # within min_delta; better than, worse than a threshold
        got = outcome(values, min_delta=number(0.25), stopping_threshold=number(0.5), divergence_threshold=number(8.0))
        assert got == outcome(values, min_delta=0.25, stopping_threshold=0.5, divergence_threshold=8.0) is not None
    assert Timer(number(2.0)).duration == 2.0


def test_timer_and_max_time_stop_training():
    import time

    def slow(state, batch):
        time.sleep(0.01)
        return count_step(state, batch)

    timer = Timer(duration=0.1)
    state = fit(slow, counting_state(), list(range(1000)), max_epochs=1, callbacks=[timer], progress=False)
    assert 5 <= int(state.step) < 1000 and timer.time_elapsed("train") >= 0.1
    state = fit(slow, counting_state(), list(range(1000)), max_epochs=1, max_time={"seconds": 0.1}, progress=False)
    assert 5 <= int(state.step) < 1000
    assert Timer("00:01:00:05").duration == 3605 and Timer(datetime.timedelta(minutes=1)).duration == 60


class FakeClock:
    """``fnlit.callbacks``' clock, moved on by the steps: one second a step."""

    def __init__(self, monkeypatch):
        self.now = 0.0
        monkeypatch.setattr(fnlit.callbacks, "time", types.SimpleNamespace(monotonic=lambda: self.now))

    def step(self, state, batch):
        self.now += 1.0
        return count_step(state, batch)


def test_a_time_limit_lifts_the_1000_epoch_default(monkeypatch):
    # Lightning's rule: with a Timer (max_time) and no max_epochs, training runs until the time is up.
    clock = FakeClock(monkeypatch)
    assert int(fit(clock.step, counting_state(), [0], max_time=1003, progress=False).step) == 1003
    assert int(fit(clock.step, counting_state(), [0], callbacks=[Timer(1002)], progress=False).step) == 1002
    assert int(fit(clock.step, counting_state(), [0], callbacks=[Timer()], progress=False).step) == 1000  # measures only


def test_a_resumed_run_whose_time_is_spent_takes_no_step(tmp_path, monkeypatch):
    clock = FakeClock(monkeypatch)
    ckpt = fnlit.checkpoint.Checkpointer(tmp_path)
    state = fit(clock.step, counting_state(), [0] * 10, max_epochs=100, max_time=5, checkpoint=ckpt, progress=False)
    assert int(state.step) == 5  # stopped by the time limit, saved on exit
    for _ in range(2):  # the same command again (a job scheduler's retry): as the run that stopped
        state = fit(clock.step, counting_state(), [0] * 10, max_epochs=100, max_time=5, checkpoint=ckpt,
                    ckpt_path="last", progress=False)  # fmt: skip
        assert int(state.step) == 5


def test_fits_max_time_timer_and_a_timer_callback_added_on_resume_keep_their_own_times(tmp_path, monkeypatch):
    # Keyed by class and order, the Timer callback took the max_time Timer's 5 s and fit's own started afresh:
    # 5 more steps. As the uninterrupted run, the resumed one has spent its time; the new Timer starts from 0.
    clock = FakeClock(monkeypatch)
    ckpt = fnlit.checkpoint.Checkpointer(tmp_path)
    fit(clock.step, counting_state(), [0] * 10, max_epochs=100, max_time=5, checkpoint=ckpt, progress=False)
    timer = Timer()
    state = fit(clock.step, counting_state(), [0] * 10, max_epochs=100, max_time=5, callbacks=[timer], checkpoint=ckpt,
                ckpt_path="last", progress=False)  # fmt: skip
    assert int(state.step) == 5 and timer.time_elapsed() == 0


def test_an_old_checkpoints_class_keyed_state_is_not_guessed_onto_a_changed_set_of_callbacks(tmp_path, monkeypatch):
    # A checkpoint from before state_key keyed fit's max_time Timer as "Timer". Resumed with a Timer callback added,
    # the order-based fallback handed the user's Timer those 5 s (and fit's own Timer started afresh): with more
    # callbacks of a class than the checkpoint has states, the old keys cannot say whose is whose -- so no state is
    # guessed, and the warning names it.
    clock = FakeClock(monkeypatch)
    ckpt = fnlit.checkpoint.Checkpointer(tmp_path / "run")
    fit(clock.step, counting_state(), [0] * 10, max_epochs=100, max_time=5, checkpoint=ckpt, progress=False)
    last = tmp_path / "run" / "last.ckpt"
    position = fnlit.checkpoint.read_info(last).position
    (old_state,) = position["callbacks"].values()
    position["callbacks"] = {"Timer": old_state}  # the key the code before state_key wrote
    old = fnlit.checkpoint.save(tmp_path / "old.ckpt", fnlit.checkpoint.restore(last, like=counting_state()),
                                position=position)
    timer = Timer()
    with pytest.warns(UserWarning, match=r"does not have: \['Timer'\]"):
        fit(clock.step, counting_state(), [0] * 10, max_epochs=100, max_time=5, callbacks=[timer],
            checkpoint=fnlit.checkpoint.Checkpointer(tmp_path / "resumed"), ckpt_path=old, progress=False)
    assert timer.time_elapsed() == 5  # this run's 5 s only, not the old run's too


def test_callback_state_keys_are_strings_settled_by_value(tmp_path):
    class Watch(Callback):  # a state_key of one's own, assigned
        def __init__(self, key):
            self.state_key = key

    assert Watch("loss").state_key == "loss" and Watch("").state_key == Watch.__qualname__
    stopper = EarlyStopping("val/loss")  # fnlit's own callbacks take an assigned key too
    stopper.state_key = "mine"
    assert stopper.state_key == "mine"
    # a NumPy float's repr changed between NumPy versions (np.float64(0.9) vs 0.9): the key must not
    assert EMA(np.float64(0.9)).state_key == EMA(0.9).state_key == "EMA{'decay': 0.9}"

    class Method(Callback):
        def state_key(self):  # not a property: a bound method's repr holds an address, new in every process
            return "x"

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    with pytest.raises(TypeError, match="state_key of callback Method to be a str"):
        fit(count_step, counting_state(), [0] * 2, max_epochs=1, callbacks=[Method()], progress=False,
            checkpoint=fnlit.checkpoint.Checkpointer(tmp_path))


def test_a_reused_timer_times_each_fit_from_zero(monkeypatch):
    clock, timer = FakeClock(monkeypatch), Timer(3)
    steps = [int(fit(clock.step, counting_state(), [0] * 10, max_epochs=1, callbacks=[timer], progress=False).step) for _ in range(2)]
    assert steps == [3, 3] and timer.time_elapsed() == 3


def test_a_failing_on_fit_end_keeps_the_final_checkpoint(tmp_path):
    class FailingUpload:
        def on_fit_end(self, state, metrics):
            raise OSError("upload failed")

    ckpt = fnlit.checkpoint.Checkpointer(tmp_path)
    with pytest.raises(OSError, match="upload failed"):
        fit(count_step, counting_state(), [0] * 7, max_epochs=1, callbacks=[FailingUpload()], checkpoint=ckpt, progress=False)
    assert int(ckpt.restore("last", like=counting_state())[0].step) == 7  # the run's 7 steps, saved on exit


def test_early_stopping_deferred_by_min_epochs_stops_a_resumed_run_where_the_uninterrupted_one_stops(tmp_path):
    # patience=1: the worse epoch 1 decides to stop; min_epochs=4 defers it, and epoch 2's improvement resets the
    # count. The uninterrupted run stops after epoch 4; one crashed in epoch 3 and resumed must too.
    values = [1.0, 2.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]

    class Crash:
        def __init__(self, at):
            self.at = at

        def on_step(self, state, metrics):
            if int(state.step) == self.at:
                raise RuntimeError("crash")

    def run(crash=None, resume=False, folder="ck"):
        return fit(count_step, counting_state(), [0], val_data=[0], eval_step=lambda s, b: {"loss": torch.tensor(values[int(s.step) - 1])},
                   max_epochs=8, min_epochs=4, num_sanity_val_steps=0, progress=False,
                   callbacks=[EarlyStopping("val/loss", patience=1), Crash(crash)],
                   checkpoint=fnlit.checkpoint.Checkpointer(tmp_path / folder, every_n_epochs=1), ckpt_path="last" if resume else None)  # fmt: skip

    assert int(run(folder="whole").step) == 4
    with pytest.raises(RuntimeError, match="crash"):
        run(crash=4)
    with pytest.warns(UserWarning, match="had stopped at step 2 .patience."):
        assert int(run(resume=True).step) == 4


def test_the_sanity_check_is_no_training_time():
    # Lightning's Timer starts the training clock in on_train_start, after the sanity check: a slow sanity check
    # does not use up max_time. Here it takes 1 s (2 batches of 0.5 s) against max_time=0.8; the 10 steps take
    # far less, so all 10 run (by hand: 1 epoch of 10 batches).
    import time

    def slow_eval(state, batch):
        time.sleep(0.5)
        return {"loss": torch.tensor(0.0)}

    state = fit(count_step, counting_state(), list(range(10)), max_epochs=1, max_time=0.8, val_data=[0, 1],
                eval_step=slow_eval, num_sanity_val_steps=2, check_val_every_n_epoch=2, progress=False)  # fmt: skip
    assert int(state.step) == 10
    # A measuring Timer's training time leaves the 1 s sanity check out (10 counting steps: well under 0.5 s).
    timer = Timer()
    fit(count_step, counting_state(), list(range(10)), max_epochs=1, val_data=[0, 1], eval_step=slow_eval,
        num_sanity_val_steps=2, check_val_every_n_epoch=2, callbacks=[timer], progress=False)  # fmt: skip
    assert 0 < timer.time_elapsed("train") < 0.5


def test_timer_measures_validation():
    timer = Timer()
    fit(count_step, counting_state(), [0, 1], max_epochs=2, val_data=[0], eval_step=lambda s, b: {"a": torch.tensor(1.0)},
        callbacks=[timer], progress=False)  # fmt: skip
    assert 0 < timer.time_elapsed("validate") <= timer.time_elapsed("train")


def test_a_custom_callback_is_a_few_lines():
    class StopAfter:
        def __init__(self, n):
            self.n = n

        def on_step(self, state, metrics):
            self.n -= 1
            if self.n == 0:
                raise StopTraining

    state = fit(count_step, counting_state(), list(range(10)), max_epochs=5, callbacks=[StopAfter(13)], progress=False)
    assert int(state.step) == 13


def test_update_bn_matches_torch_swa_utils():
    model = mlp(bn=True)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    data = [batch(16, seed=i)[0] for i in range(4)]
    new = update_bn(model, state, [(x, None) for x in data])
    reference = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(data, reference)
    for name, buf in reference.named_buffers():
        torch.testing.assert_close(new.buffers[name], buf)
    assert int(state.buffers["1.num_batches_tracked"]) == 0 and model[1].momentum == 0.1  # nothing else changed


@pytest.mark.parametrize("root_training", [True, False])
def test_update_bn_recomputes_a_frozen_batchnorm_as_torch_does_and_restores_every_training_flag(root_training):
    # A BatchNorm frozen with .eval() under a training root was reset and never recomputed (running stats 0/1,
    # num_batches_tracked 0): apply leaves submodules' flags alone when the root already trains. Reference: torch's
    # update_bn (model.train(): every BatchNorm recomputed) on a deep copy.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4, momentum=0.3), torch.nn.Linear(4, 4),
                                torch.nn.BatchNorm1d(4))
    model.train(root_training)
    model[1].running_mean.fill_(5.0)
    model[1].running_var.fill_(9.0)
    model[1].eval()  # frozen, whatever the root's mode
    flags = [m.training for m in model.modules()]
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    data = [torch.randn(16, 4) * 3 + 2 for _ in range(4)]
    reference = copy.deepcopy(model)
    new = update_bn(model, state, data)
    torch.optim.swa_utils.update_bn(data, reference)
    for name, buf in reference.named_buffers():
        torch.testing.assert_close(new.buffers[name], buf)
    assert int(new.buffers["1.num_batches_tracked"]) == 4
    assert [m.training for m in model.modules()] == flags  # each flag as it was (torch's sets all to the root's)
    assert [model[1].momentum, model[3].momentum] == [0.3, 0.1]
    assert torch.equal(model[1].running_mean, torch.full((4,), 5.0))  # the module's own tensors untouched

    def failing():  # flags and momenta come back on an error too
        yield data[0]
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        update_bn(model, state, failing())
    assert [m.training for m in model.modules()] == flags
    assert [model[1].momentum, model[3].momentum] == [0.3, 0.1]


def test_update_bn_leaves_non_tensor_leaves_of_the_inputs_alone_as_torch_does():
    # Every leaf was moved with .to(device): a float beside the tensor ('float' has no attribute 'to').
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(8)

        def forward(self, d):
            return self.bn(d["x"] * d["scale"])

    model = Scaled()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    data = [{"x": batch(16, seed=i)[0], "scale": 2.0} for i in range(3)]
    new = update_bn(model, state, data)
    reference = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(data, reference)
    for name, buf in reference.named_buffers():
        torch.testing.assert_close(new.buffers[name], buf)


@pytest.mark.parametrize("donate", [False, True])
def test_training_on_from_the_ema_state_leaves_the_average_and_the_input_alone(donate):
    # EMA.state() handed out the callback's own tensors: a donated step trained on from it wrote into the
    # average (which became the raw params), and undonated, the EMA's updates changed fit's input state.
    # Reference: the EMA computed by hand over the same steps.
    import torch.nn.functional as F

    from fnlit.callbacks import EMA
    from fnlit.data import ArrayLoader

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    g = torch.Generator().manual_seed(1)
    data = ArrayLoader(torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g), batch_size=8, shuffle=False)
    step = fnlit.train_step(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    ema = EMA(0.5)
    state = fnlit.fit(step, fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0), data, max_epochs=1,
                      callbacks=[ema], progress=False)
    start = ema.state(state)
    given = {k: v.clone() for k, v in start.params.items()}
    hand, s = {k: v.clone() for k, v in ema.params.items()}, start
    for b in data.batches(0, 0, 0, shuffle=False):
        s, _ = step(s, b)
        hand = {k: 0.5 * hand[k] + 0.5 * s.params[k] for k in hand}
    fnlit.fit(fnlit.donating(step) if donate else step, start, data, max_epochs=1, callbacks=[ema], progress=False)
    for k in hand:
        torch.testing.assert_close(ema.params[k], hand[k], rtol=0, atol=1e-7)
    if not donate:  # (a donated input is poisoned, by design)
        assert all(torch.equal(start.params[k], given[k]) for k in given)


def test_update_bn_refuses_an_ensembles_stacked_state_and_says_how_to_run_each_member():
    # It failed deep in the forward ("t() expects a tensor with <= 2 dimensions, but self is 3D").
    from fnlit.callbacks import update_bn

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    stacked = fnlit.ensemble_states(model, fnlit.optim.sgd(0.1), seeds=[0, 1])
    data = [torch.randn(8, 3), torch.randn(8, 3)]
    with pytest.raises(ValueError, match=r"ensemble's stacked state \(2 members\).*unstack_state\(state, i\)"):
        update_bn(model, stacked, data)
    members = fnlit.stack_states([update_bn(model, fnlit.unstack_state(stacked, i), data) for i in range(2)])
    # reference: torch's update_bn on member 1's module
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for k, v in ref.named_parameters():
            v.copy_(fnlit.unstack_state(stacked, 1).params[k])
    torch.optim.swa_utils.update_bn(data, ref)
    torch.testing.assert_close(members.buffers["1.running_mean"][1], ref[1].running_mean)


def test_early_stopping_on_one_members_metric_stops_an_ensemble():
    # It read int(state.step) of the stacked state (shape (n,)) when it stopped: the run crashed, its end unsaved.
    mk = lambda: torch.nn.Linear(4, 1)  # noqa: E731
    step = fnlit.train_step(mk(), lambda m, b: F.mse_loss(m(b[0]), b[1]))
    ev = fnlit.eval_step(mk(), lambda m, b: {"loss": F.mse_loss(m(b[0]), b[1])})
    states = fnlit.ensemble_states(mk, fnlit.optim.sgd(0.1), seeds=[0, 1])
    g = torch.Generator().manual_seed(0)
    data = ArrayLoader(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g), batch_size=8)
    stop = EarlyStopping("val/loss/1", stopping_threshold=10.0)  # met at the first validation
    end = fit(fnlit.ensemble(step, 2), states, data, val_data=data, eval_step=fnlit.ensemble(ev, 2), max_epochs=5,
              callbacks=[stop], progress=False)  # fmt: skip
    assert stop.stopped_step == 4 and end.step.tolist() == [4, 4]  # one epoch of 4 batches, then stopped


@pytest.mark.parametrize(
    "limits, stop_at, ends",
    [
        (dict(max_steps=6), None, [(4, 0)]),  # epoch 1 cut by max_steps: no end
        (dict(max_epochs=3), 6, [(4, 0)]),  # epoch 1 cut by StopTraining: no end
        (dict(max_epochs=2, limit_train_batches=2), None, [(2, 0), (4, 1)]),  # limited epochs do end
    ],
)
def test_on_epoch_end_runs_only_for_epochs_that_reach_their_end(limits, stop_at, ends):
    model = torch.nn.Linear(2, 1)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    step = fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]))
    data = ArrayLoader(torch.randn(8, 2), torch.randn(8, 1), batch_size=2)  # 4 batches an epoch
    seen = []

    class Watch(fnlit.callbacks.Callback):
        def on_step(self, s, m):
            if stop_at is not None and int(s.step) == stop_at:
                raise StopTraining("enough")

        def on_epoch_end(self, s, m):
            seen.append((int(s.step), m["epoch"]))

    fit(step, state, data, progress=False, callbacks=[Watch()], **limits)
    assert seen == ends
