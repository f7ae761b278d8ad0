import functools
import importlib
import os
import pickle
import re
import subprocess
import sys
import time

import pytest
import torch
from _dist_workers import (
    GLOBAL_BATCH,
    ORDERS,
    all_equal_votes,
    negative_zero_state,
    all_orders,
    batchnorm_statistics_and_metrics,
    best_path_after_resuming_a_branch,
    best_path_read_during_fit,
    dies_early,
    early_stopping_fit,
    ensemble_members_per_rank,
    ensemble_with_collectives,
    evaluate_by_batches,
    evaluate_every_example,
    evaluate_metric_names_that_differ,
    evaluate_metrics_in_rank_order,
    evaluate_rank_dependent_metric_dtypes,
    evaluate_wide_metrics,
    exits_quietly,
    hangs_ignoring_sigterm,
    starts_apart,
    starts_permuted,
    stop_from_on_log,
    float64_metric,
    float64_aux_in_a_float32_model,
    aux_metrics_ride_the_gradients,
    no_host_sync_of_a_data_parallel_step,
    aux_number_beside_a_one_element_tensor,
    a_rank_outside_the_group,
    metric_names_that_differ,
    sparse_embedding,
    unchecked_warns,
    fit_one_rank_warns_nothing,
    fit_on_too_few_examples,
    fit_validation_every_example,
    equivalence,
    make_state,
    orders_with_dropout_and_batchnorm,
    reused_buffers,
    signal_after_the_last_vote,
    signal_in_the_last_step,
    stop_then_a_late_signal,
    uneven_batches,
    wrap,
    data_order_with_own_rngs,
    environment_and_cwd,
    number_or_tensor_metric,
    evaluate_with_empty_batches,
    uneven_validation_unsharded,
    val_batches,
)
from helpers import assert_limit_errors, batch, hand_step, mlp

import fnlit

pytestmark = pytest.mark.distributed


def _reference(steps, k=1, fp16=False):
    """A single process stepping on the whole global batch."""
    model, state = make_state(fp16=fp16)
    step = hand_step(model)
    if fp16:
        step = fnlit.amp(step, dtype=torch.float16)
    if k > 1:
        step = fnlit.accumulate(step, k)
    history, losses = [], []
    for i in range(steps):
        state, metrics = step(state, batch(GLOBAL_BATCH, seed=i))
        history.append(dict(state.params))
        losses.append(float(metrics["loss"]))
    return history, losses


@pytest.fixture(scope="module", params=["spawn", "forkserver"])
def two_rank_runs(request):
    launch = fnlit.distributed.launch
    if request.param == "spawn":  # launch's default (tests/conftest.py makes the suite's default forkserver)
        return getattr(launch, "__wrapped__", launch)(equivalence, 2, 4, (1, 2), timeout=120)
    return launch(equivalence, 2, 4, (1, 2), timeout=120, start_method="forkserver")


@pytest.mark.parametrize("k", [1, 2])
def test_two_ranks_match_one_process_and_each_other(two_rank_runs, k):
    steps = 4
    r0, r1 = two_rank_runs[0][k], two_rank_runs[1][k]
    ref_history, ref_losses = _reference(steps, k=2 * k if k > 1 else 1)
    for i in range(steps):
        for name in ref_history[i]:
            assert torch.equal(r0["history"][i][name], r1["history"][i][name])  # ranks bitwise identical
            torch.testing.assert_close(r0["history"][i][name], ref_history[i][name], rtol=1e-5, atol=1e-6)
    assert r0["losses"] == r1["losses"]  # metrics averaged across ranks
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    # One gradient all-reduce per applied update (all params flattened), none per micro-batch. Without
    # accumulation the loss rides along in it; with it, the micro-batch average takes one small collective (with
    # a checksum of the metrics' names).
    n_params = sum(p.numel() for p in ref_history[0].values())
    expected = [n_params + 1] * steps if k == 1 else [n_params, 2] * steps
    assert r0["sizes"] == expected and r0["step"] == steps
    assert r0["integer"] == []  # nothing else inside the steps (fit checks the ranks' states before the first)


def test_all_six_orders_agree_and_match_one_process():
    steps = 3
    r0, r1 = fnlit.distributed.launch(all_orders, 2, steps, timeout=180)
    assert len(r0) == len(ORDERS) == 6
    ref_history, _ = _reference(steps, k=4, fp16=True)
    first = r0["/".join(ORDERS[0])]
    for name_order, params in r0.items():
        for name, p in params.items():
            assert torch.equal(p, r1[name_order][name])
            torch.testing.assert_close(p, first[name], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(p, ref_history[-1][name], rtol=1e-5, atol=1e-6)


def test_all_six_orders_agree_with_dropout_and_batchnorm_and_ranks_keep_one_state():
    """Each rank's dropout key folds in its rank before the micro-batch index whatever the nesting, and the
    BatchNorm statistics each rank computes on its shard are averaged, so the ranks' states stay identical."""
    r0, r1 = fnlit.distributed.launch(orders_with_dropout_and_batchnorm, 2, 3, timeout=180)
    first_params, first_buffers = r0["/".join(ORDERS[0])]
    for name_order, (params, buffers) in r0.items():
        for name, p in params.items():
            assert torch.equal(p, r1[name_order][0][name]), (name_order, name)
            torch.testing.assert_close(p, first_params[name], rtol=1e-5, atol=1e-6)
        for name, b in buffers.items():
            assert torch.equal(b, r1[name_order][1][name]), (name_order, name)
            torch.testing.assert_close(b, first_buffers[name], rtol=1e-5, atol=1e-6)


def test_batchnorm_statistics_are_the_ranks_mean_and_any_tensor_metric_is_averaged():
    for r in fnlit.distributed.launch(batchnorm_statistics_and_metrics, 2, timeout=120):
        assert r["want"] and set(r["want"]) <= set(r["buffers"])
        for name, want in r["want"].items():
            torch.testing.assert_close(r["buffers"][name], want, rtol=1e-5, atol=1e-6)
        m, hand = r["metrics"], r["hand"]
        torch.testing.assert_close(m["per_class"], hand[:3])
        torch.testing.assert_close(m["parts"]["a"], hand[3])
        torch.testing.assert_close(m["parts"]["b"][0], hand[0])


def test_gradient_buffers_are_reused_only_when_no_result_is_alive():
    for out in fnlit.distributed.launch(reused_buffers, 2, timeout=120):
        # Means over ranks 0 and 1, by hand: (1 + 2) / 2, (0 + 10) / 2 -- read after two later calls, which
        # would have overwritten them had their buffer been reused -- then 7, (0 + 1) / 2.
        torch.testing.assert_close(out["first"][0], torch.full((3,), 1.5))
        torch.testing.assert_close(out["first"][1], torch.full((2, 2), 5.0))
        torch.testing.assert_close(out["third"][0], torch.full((3,), 7.0))
        torch.testing.assert_close(out["third"][1], torch.full((2, 2), 0.5))
        assert out["distinct"] and out["reused"]


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_a_dead_rank_fails_the_others_in_bounded_time(start_method):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 died with exit code 3"):  # the cause, not rank 0's knock-on error
        fnlit.distributed.launch(dies_early, 2, timeout=60, collective_timeout=10, start_method=start_method)
    assert time.monotonic() - start < 60


def test_forkserver_ranks_see_the_callers_environment_and_directory_now_as_spawned_ones_do(monkeypatch, tmp_path):
    # A forkserver's children inherit the server's environment and directory, from when it started; the ranks of
    # a spawn launch see the caller's at the launch. Reference: the caller's own os.environ and os.getcwd().
    launch = functools.partial(fnlit.distributed.launch, start_method="forkserver", timeout=120)
    launch(environment_and_cwd, 2, ())  # the server is running from here on
    monkeypatch.setenv("FNLIT_SET_AFTER_THE_SERVER_STARTED", "yes")
    monkeypatch.delenv("HOME", raising=False)  # (set when the server started, in any usual session)
    monkeypatch.chdir(tmp_path)
    names = ("FNLIT_SET_AFTER_THE_SERVER_STARTED", "HOME")
    expected = ({name: os.environ.get(name) for name in names}, os.getcwd())
    assert expected == ({"FNLIT_SET_AFTER_THE_SERVER_STARTED": "yes", "HOME": None}, str(tmp_path))
    assert launch(environment_and_cwd, 2, names) == [expected, expected]


@pytest.mark.parametrize("method, match", [
    ("fork", r"expected start_method 'spawn' or 'forkserver', got 'fork' instead \('fork' is unsafe once torch"),
    ("threads", r"expected start_method 'spawn' or 'forkserver', got 'threads' instead\.$"),
])
def test_launch_refuses_other_start_methods(method, match):
    with pytest.raises(ValueError, match=match):
        fnlit.distributed.launch(environment_and_cwd, 2, (), start_method=method)


@pytest.mark.parametrize("name, seconds", [("timeout", -1.0), ("collective_timeout", 0), ("timeout", float("nan"))])
def test_launch_refuses_a_timeout_not_above_zero(name, seconds):
    # A negative timeout was taken: the run was cut off at once with a timeout message.
    with pytest.raises(ValueError, match=rf"launch expected {name} > 0 \(seconds\), got {seconds!r} instead"):
        fnlit.distributed.launch(environment_and_cwd, 2, (), **{name: seconds})


@pytest.mark.parametrize("size", ["", "abc"])
def test_init_with_a_world_size_that_is_not_a_number_says_so(monkeypatch, size):
    # int("abc") raised a bare "invalid literal for int() with base 10".
    monkeypatch.setenv("WORLD_SIZE", size)
    with pytest.raises(ValueError, match=rf"WORLD_SIZE to be a number of processes \(torchrun sets it\), got {size!r}"):
        fnlit.distributed.init()


def test_launch_of_a_function_the_ranks_cannot_import_says_why():
    # fn defined in `python -c` (as in a notebook cell): the ranks cannot unpickle it. The caller was told only that
    # rank 0 "died with exit code 1, without returning a result or raising"; the AttributeError reached the rank's
    # stderr alone. Reference: pickle's own error for that lookup, and the hint, in the caller's exception.
    script = (
        "import fnlit\n"
        "def double_rank():\n"
        "    return 2 * fnlit.distributed.rank()\n"
        "try:\n"
        "    fnlit.distributed.launch(double_rank, 2, timeout=60)\n"
        "except RuntimeError as e:\n"
        "    print('CAUGHT', e)\n"
    )
    root = os.path.dirname(os.path.dirname(fnlit.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    caught = out.stdout[out.stdout.index("CAUGHT") :]
    assert "AttributeError: Can't get attribute 'double_rank' on <module '__main__'" in caught, caught
    assert "fn must be importable by the child processes: a module-level function in a .py file" in caught, caught
    assert "died with exit code" not in caught, caught


def test_launch_of_a_lambda_raises_before_any_rank_starts():
    # (pickle's own error: a local function is an AttributeError, a module-level lambda a PicklingError)
    with pytest.raises((pickle.PicklingError, AttributeError), match="Can't pickle"):
        fnlit.distributed.launch(lambda: 1, 2, timeout=30)


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_launch_passes_arguments_as_multiprocessing_does(start_method):
    # launch pickled its arguments itself for a while: a multiprocessing Queue or Value (which pickle only while a
    # process starts) was refused, and a tensor argument became a private copy in each rank. The reference is
    # multiprocessing's (and torch.multiprocessing's) own Process(args=...).
    import multiprocessing

    from _dist_workers import report_through_both

    ctx = multiprocessing.get_context(start_method)
    fn_queue, queue, value, tensor = ctx.Queue(), ctx.Queue(), ctx.Value("i", 0), torch.zeros(2)
    # fn itself may hold one too (a partial): pickled as the ranks start, as multiprocessing passes a target. (One
    # launch for both: a spawn launch starts two fresh interpreters, ~7 s here.)
    fn = functools.partial(report_through_both, fn_queue)
    launch = fnlit.distributed.launch
    assert launch(fn, 2, queue, value, tensor, timeout=120, start_method=start_method) == [True, True]
    assert sorted(queue.get(timeout=30) for _ in range(2)) == [0, 1] and value.value == 2
    assert sorted(fn_queue.get(timeout=30) for _ in range(2)) == [0, 1]
    assert tensor.tolist() == [100.0, 101.0]  # shared memory, as torch.multiprocessing passes a tensor


def test_wrap_builds_the_requested_nesting():
    model, state = make_state()
    step = wrap(hand_step(model), ("amp", "accumulate", "data_parallel"))
    assert step.__name__ == "amp_step" and step.__wrapped__.__name__ == "accumulate_step"


def test_kept_gradient_buffers_are_bounded_and_the_latest_layout_stays(monkeypatch):
    import importlib

    dp = importlib.import_module("fnlit.transforms.data_parallel")  # the module, not the function it exports

    monkeypatch.setattr(dp, "_BUFFERS", {})
    like = torch.zeros(1)
    first = dp._flat_buffer(0, like, 5, reuse=True)
    for n in range(10, 10 + 2 * dp._MAX_BUFFERS):  # a sweep: one layout after another
        dp._flat_buffer(0, like, n, reuse=True)
        assert dp._flat_buffer(0, like, 5, reuse=True) is first  # in use every other call: never dropped
    assert len(dp._BUFFERS) == dp._MAX_BUFFERS
    oldest = (0, like.dtype, like.device, 10)
    assert oldest not in dp._BUFFERS  # the least recently used layouts went first


def test_early_stopping_stops_both_ranks_where_one_process_stops(tmp_path):
    # The stop is agreed right after the validation, not at the next log interval (every 50 steps). Every rank's
    # Checkpointer names the best checkpoint rank 0 wrote (one run id on both ranks).
    ref = early_stopping_fit(False, str(tmp_path / "one"))
    assert len(ref["validated_at"]) == 2 and ref["step"] == ref["validated_at"][-1]  # at its second validation
    ranks = fnlit.distributed.launch(early_stopping_fit, 2, True, str(tmp_path / "two"), timeout=120)
    assert ranks[0] == ranks[1]
    assert len(ranks[0]["validated_at"]) == 2 and ranks[0]["step"] == ranks[0]["validated_at"][-1]
    assert ref["best"] == ref["validated_at"][0] and ranks[0]["best"] == ranks[0]["validated_at"][0]  # the first of equals


def test_best_path_agrees_across_ranks_when_read_during_fit(tmp_path):
    # Rank 1 (which writes nothing) kept the folder's listing from its first read (at fit's start: no file) for the
    # whole run, so its best_path stayed None. Expected, by hand from the validations' losses: on rank 0, the file of
    # the lowest loss so far (a callback's on_validation runs before that validation's save); on rank 1, which reads
    # while rank 0 may be saving that validation's file, that one or the best after the save -- never none once a
    # file exists (a listing taken while rank 0 replaced its best found none: taken again now).
    ranks = fnlit.distributed.launch(best_path_read_during_fit, 2, str(tmp_path), timeout=120, collective_timeout=30)
    validations = ranks[0]["validations"]
    assert len(validations) == 5 and ranks[1]["validations"] == validations
    file = lambda step: f"step={step:08d}.ckpt"  # noqa: E731
    before, after, best = [None], [None], None
    for step, loss in validations:
        before.append(best and file(best[0]))
        best = (step, loss) if best is None or loss < best[1] else best
        after.append(file(best[0]))
    assert best[0] == validations[1][0]  # (the scripted loss is lowest at the second validation)
    steps = [0] + [step for step, _ in validations]
    assert ranks[0]["seen"] == list(zip(steps, before))
    assert [s for s, _ in ranks[1]["seen"]] == steps
    assert all(name in (b, a) for (_, name), b, a in zip(ranks[1]["seen"], before, after)), ranks[1]["seen"]
    for r in ranks:
        assert r["best"] == file(best[0])
    assert (tmp_path / file(best[0])).is_file()


def test_best_path_agrees_across_ranks_after_a_resume_that_abandons_a_branch(tmp_path):
    # Rank 1 (which writes nothing) found the restored run's later files at its first read of the folder, after rank 0
    # had saved files of the resumed fit, and took those for the abandoned history too: its best_path named step 8,
    # then step 16, where rank 0's named step 12. By hand (2 steps an epoch, one validation each): the first fit keeps
    # steps 2..20 (losses 100 - step); the resume from step 8 saves steps 10..16 again (losses 52, 50, 52, 54) and
    # abandons the first fit's 18 and 20 (and its 16, until replaced); the best of the resumed run is step 12, read
    # before step 16's save and after the fit.
    ranks = fnlit.distributed.launch(best_path_after_resuming_a_branch, 2, str(tmp_path), timeout=120, collective_timeout=30)
    for r in ranks:
        assert r == {"seen": [(16, "step=00000012.ckpt")], "best": "step=00000012.ckpt"}
    assert (tmp_path / "step=00000020.ckpt").is_file()  # the abandoned branch's file is kept


def test_a_stop_from_on_log_takes_effect_at_that_log_interval_on_every_rank():
    # The ranks voted before the log row's on_log hooks ran, so a StopTraining from one counted only at the next
    # vote (step 8, not 5). By hand: 4 steps an epoch, the first log row at step 5, where one process stops; the
    # stop validates the step since the epoch end's validation (Lightning's should_stop mid-epoch).
    ref = stop_from_on_log(False)
    assert ref == {"step": 5, "validated_at": [4, 5]}
    assert fnlit.distributed.launch(stop_from_on_log, 2, timeout=120, collective_timeout=30) == [ref, ref]


def test_evaluate_over_two_ranks_sees_every_example_once():
    # Training shards drop the remainder (33 -> 16 + 16); evaluation must not: the single process is the reference.
    x = torch.arange(33, dtype=torch.float64)
    (m0, n0, c0, s0), (m1, n1, c1, s1) = fnlit.distributed.launch(evaluate_every_example, 2, timeout=120)
    assert m0 == m1 and (n0, n1) == (5, 5) and (c0, c1) == (5, 4)  # 9 batches (the last of 1): 5 and 4, one filler
    assert m0["x"] == pytest.approx(float(x.mean()), rel=1e-6) and m0["sq"] == pytest.approx(float((x**2).mean()), rel=1e-6)
    torch.manual_seed(0)  # the same init as the workers' model
    model = torch.nn.Linear(1, 1)
    with torch.no_grad():
        reference = float((model(x.float().unsqueeze(1)) ** 2).mean())
    assert s0 == s1 == pytest.approx(reference, rel=1e-5)


def test_evaluate_over_two_ranks_splits_the_batches_one_process_runs():
    # Each rank took every second example and dropped its own partial batch: 12 examples in batches of 4 with
    # drop_last gave 3.5 on two ranks (examples 8..11 never seen), 5.5 in one process. Reference: one process's
    # evaluate, and the mean of the examples its batches hold, by hand.
    cases = [(12, 4, True), (13, 4, True), (33, 4, False), (1, 4, False)]
    hand = [sum(range(n - n % b if drop_last else n)) / (n - n % b if drop_last else n) for n, b, drop_last in cases]
    ev = lambda s, b: {"x": b.mean()}  # noqa: E731
    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    loaders = [fnlit.ArrayLoader(torch.arange(float(n), dtype=torch.float64), batch_size=b, drop_last=drop_last)
               for n, b, drop_last in cases]  # fmt: skip
    one = [fnlit.evaluate(ev, state, loader)["x"] for loader in loaders]
    assert one == pytest.approx(hand)
    for out, val in fnlit.distributed.launch(evaluate_by_batches, 2, cases, timeout=120):
        assert [m["x"] for m in out] == pytest.approx(hand)
        assert val["val/x"] == pytest.approx(5.5)  # fit's validation: the same 12 examples, in batches of 4


@pytest.mark.parametrize("n, drop_last", [(1, False), (5, True)])
def test_fit_on_too_few_examples_for_every_rank_says_each_rank_gets_a_shard(n, drop_last):
    # One process trains on this data (a torch DataLoader has a batch); each of two ranks gets n // 2 examples and no
    # batch, and was told only to check the dataset and batch_size.
    assert len(torch.utils.data.DataLoader(torch.zeros(n), batch_size=4, drop_last=drop_last)) == 1
    for error in fnlit.distributed.launch(fit_on_too_few_examples, 2, n, drop_last, timeout=120):
        assert error.startswith("fit got empty training data (len(train_data) == 0)"), error
        assert "each rank trains on its own shard, about 1/2 of the examples" in error, error
        assert "a global batch of 2 * batch_size" in error, error


def test_evaluate_over_two_ranks_sums_float64_and_integer_metrics_in_float64():
    # The sums were cast to float32 before the all-reduce: the float64 mean came back 1.0, 16777218 as 16777216.
    for out in fnlit.distributed.launch(evaluate_wide_metrics, 2, timeout=120):
        assert out["m"] == ((1 + 1e-9) + (1 + 1e-9 + 2e-9)) / 2 != 1.0  # by hand, in Python's doubles
        assert out["tokens"] == 16777218.0
        # the float32 metric's sum, in float64 here (the exchange carries one dtype): the float32 values, added exactly
        assert out["f32"] == (float(torch.tensor(0.1)) + float(torch.tensor(0.2))) / 2


def test_evaluate_over_two_ranks_with_metric_dtypes_that_differ_between_ranks():
    # Each rank picked the exchange's dtype from its own metrics: float32 on rank 0, float64 (the number 0.0) on
    # rank 1, so the all-reduce's sizes differed and gloo aborted rank 0. By hand: recall 1 x 2 + 0 x 2 over 4.
    assert fnlit.distributed.launch(evaluate_rank_dependent_metric_dtypes, 2, timeout=120) == [{"recall": 0.5}] * 2


def test_evaluate_over_two_ranks_adds_each_metric_by_its_name_not_its_place():
    # The all-reduce added the ranks' sums by position: rank 1's {"max", "mean"} against rank 0's {"mean", "max"}
    # mixed the two (both came back 5.1). By hand, over arange(10): mean 4.5; max weighted by batch size
    # (3 x 4 + 6 x 3 + 9 x 3) / 10 = 5.7. Each rank keeps its own order.
    x = torch.arange(10.0)
    mean, most = x.mean().item(), (3 * 4 + 6 * 3 + 9 * 3) / 10
    out0, out1 = fnlit.distributed.launch(evaluate_metrics_in_rank_order, 2, timeout=120, collective_timeout=30)
    assert list(out0) == ["mean", "max"] and list(out1) == ["max", "mean"]
    for out in (out0, out1):
        assert out["mean"] == pytest.approx(mean) and out["max"] == pytest.approx(most)


def test_data_parallel_averages_each_metric_by_its_name_not_its_place():
    # The metrics' all-reduce paired the ranks' values by position: rank 1's {"b", "a"} against rank 0's {"a", "b"}
    # averaged a with b. By hand: a = (3 + 40) / 2, b = (2 + 30) / 2 on both ranks.
    from _dist_workers import data_parallel_metrics_in_rank_order

    out = fnlit.distributed.launch(data_parallel_metrics_in_rank_order, 2, timeout=120, collective_timeout=30)
    assert out == [{"a": 21.5, "b": 16.0}, {"b": 16.0, "a": 21.5}]


@pytest.mark.parametrize(("case", "name"), [("renamed", "acc"), ("extra", "loss"), ("none", "acc")])
def test_evaluate_over_two_ranks_raises_on_every_rank_when_their_metric_names_differ(case, name):
    # Other names of the same count were added under each rank's own names ({"acc"} on one rank, {"loss"} on the
    # other: both means of the two); another count failed in gloo; a rank without metrics raised alone.
    errors = fnlit.distributed.launch(evaluate_metric_names_that_differ, 2, case, timeout=120, collective_timeout=30)
    for kind, message in errors:
        assert kind == "KeyError", message
        assert f"the eval step returned metric {name!r} for some batches but not others" in message, message


def test_evaluate_over_two_ranks_skips_empty_batches():
    # A rank whose batches are all empty adds zeros (not NaN) to the sums: the mean is over rank 0's 4 examples.
    reference = float(torch.tensor([1.0, 1.0, 1.0, 5.0]).mean())
    assert fnlit.distributed.launch(evaluate_with_empty_batches, 2, timeout=120) == [{"x": reference}] * 2


def test_ranks_with_different_numbers_of_batches_are_told_so_at_the_start():
    # Each step's all-reduce pairs the ranks' steps: 5 against 4 batches would pair a stop vote with a gradient.
    for message in fnlit.distributed.launch(uneven_batches, 2, timeout=120, collective_timeout=30):
        assert "different numbers of training batches per epoch (from 4 to 5" in message


def test_ranks_with_their_own_rngs_still_see_every_example_once_per_epoch():
    # The data-order seed came from each rank's own rng: the ranks cut different permutations, so their shards
    # overlapped (examples twice or never in an epoch). DistributedSampler's rule: one seed on every rank (rank 0's).
    (shared0, own0), (shared1, own1) = fnlit.distributed.launch(data_order_with_own_rngs, 2, timeout=120)
    for epoch in range(2):
        for r0, r1 in ((shared0, shared1), (own0, own1)):
            assert sorted(r0[epoch] + r1[epoch]) == list(range(12))  # every example exactly once
    assert shared0[0] != shared0[1]  # reshuffled per epoch
    assert (own0, own1) == (shared0, shared1)  # rank 0's order, whatever the other ranks' rngs hold


def test_fit_validates_on_every_example_whatever_limit_val_batches_says():
    for seen in fnlit.distributed.launch(fit_validation_every_example, 2, timeout=120):
        assert seen == {None: 16.0, 1.0: 16.0, 100: 16.0}  # the mean of 0..32, as one process gets


def test_a_rank_that_exits_without_a_result_is_named_at_once():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 died with exit code 0, without returning a result or raising"):
        fnlit.distributed.launch(exits_quietly, 2, timeout=100)
    assert time.monotonic() - start < 30  # not the whole timeout


def test_ranks_agree_whether_to_log_or_save_the_unfinished_log_interval_when_one_rank_is_signalled(tmp_path):
    # Rank 0 logged the interval (a collective) while rank 1, signalled, skipped it to save it: the ranks' collectives
    # crossed and rank 0 hung. Both now save the three steps' metrics with the exit checkpoint.
    r0, r1 = fnlit.distributed.launch(signal_in_the_last_step, 2, str(tmp_path), timeout=120, collective_timeout=30)
    assert r0 == r1 == (3, ["step=00000003.ckpt"], 3)


@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_a_stop_and_a_signal_reaching_one_rank_after_the_vote_end_both_ranks_alike(tmp_path, with_checkpoint):
    # The stop's validation was decided on each rank's own signal flag: rank 0 validated (a collective) while the
    # signalled rank 1 left, so rank 0 failed (or gloo aborted on mismatched collectives, losing the exit checkpoint).
    folder = str(tmp_path) if with_checkpoint else None
    assert fnlit.distributed.launch(stop_then_a_late_signal, 2, folder, timeout=120, collective_timeout=30) == [2, 2]


def test_ranks_agree_on_the_exit_save_when_a_signal_comes_after_the_last_vote(tmp_path):
    # on_exit's save is a collective: rank 1 alone saving (sigterm) while rank 0 returned ("finished") broke it.
    r0, r1 = fnlit.distributed.launch(signal_after_the_last_vote, 2, str(tmp_path), timeout=120, collective_timeout=30)
    assert r0 == r1 and r0[0] == 4 and r0[1] == ["step=00000004.ckpt"]


def test_ensemble_refuses_data_parallel_and_shard_inside_it_when_built():
    step = hand_step(mlp())
    for wrap, who in ((fnlit.data_parallel, "fnlit.data_parallel"), (fnlit.shard, "fnlit.shard")):
        with pytest.raises(ValueError, match=rf"fnlit\.ensemble cannot be combined with {who}.*no torch\.func\.vmap rule"):
            fnlit.ensemble(fnlit.accumulate(wrap(step), 2), 2)  # found through the transforms' __wrapped__ chain


@pytest.mark.distributed
def test_ensemble_with_data_parallel_or_shard_around_it_is_refused_clearly():
    # It failed inside torch ("Batching rule not implemented for aten::cat.out"; under shard an error about DP-SGD).
    for out in fnlit.distributed.launch(ensemble_with_collectives, 2, timeout=120):
        for name, who in (("dp(ens)", "data_parallel"), ("shard(ens)", "shard"), ("vmap(dp)", "data_parallel"), ("vmap(shard)", "shard")):
            assert out[name].startswith(f"fnlit.ensemble cannot be combined with fnlit.{who}, in either nesting"), (name, out[name])


def test_ensemble_members_split_across_ranks_are_refused_by_fit_and_evaluate():
    # The refusal above recommended each rank training its own members; under fit and evaluate that went wrong
    # silently: evaluate added rank 0's member 0 to rank 1's member 0 as "loss/0", fit trained each rank on half
    # the data and checkpointed rank 0's members only. Now fit refuses an ensemble on every rank, and evaluate
    # raises where the ranks' members differ; one state held alike on every rank evaluates as one process does.
    import torch.nn.functional as F

    outs = fnlit.distributed.launch(ensemble_members_per_rank, 2, timeout=120)
    for out in outs:
        for name in ("fit", "fit same"):
            assert re.search(r"fnlit.fit got an ensemble step .* under torch.distributed \(2 processes\), but an "
                             r"ensemble cannot be data-parallel", out[name]), out[name]
        assert isinstance(out["evaluate"], str), out["evaluate"]  # (not the mixed metrics)
        assert re.search(r"fnlit.evaluate got an ensemble step under torch.distributed, but the ranks hold different "
                         r"ensemble states \(their values differ at params\['0.bias'\]\)", out["evaluate"]), out["evaluate"]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(13, 4, generator=g), torch.randn(13, 1, generator=g)
    for i in range(2):  # each member by hand: its init, the mean squared error over all 13 examples
        torch.manual_seed(i)
        model = mlp(4, 8, 1)
        with torch.no_grad():
            reference = float(F.mse_loss(model(x), y))
        for out in outs:
            assert out["evaluate same"][f"loss/{i}"] == pytest.approx(reference, rel=1e-5)


def test_launch_stops_a_hung_rank_that_ignores_sigterm_soon_after_its_timeout():
    # It waited 5 s per rank, then sent SIGTERM only: a rank whose handler ignores it (fit's only asks the loop to
    # stop) was left running after launch returned, and the script hung at exit until it finished.
    import multiprocessing
    import time

    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"timed out after 3 s with ranks \[0, 1\] unfinished"):
        fnlit.distributed.launch(hangs_ignoring_sigterm, 2, timeout=3, collective_timeout=60)
    assert time.monotonic() - start < 3 + 12  # SIGTERM, then SIGKILL 5 s later
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("kind, what", [("values", "their values differ at params['bias']"),
                                        ("shapes", "their sizes differ at params['weight']")])
def test_ranks_starting_from_different_states_are_refused_on_every_rank(kind, what):
    # Nothing checked: ranks seeded apart trained apart silently (0.4 after 3 steps; DDP broadcasts rank 0's at
    # construction), and mismatched shapes aborted gloo naming no parameter.
    for messages in fnlit.distributed.launch(starts_apart, 2, kind, timeout=120):  # fit's, check_same_state's
        for message in messages:
            assert "the ranks start from different states: " + what in message and "torch.manual_seed(s)" in message


def test_ranks_holding_the_same_values_in_another_order_are_refused_on_every_rank():
    # A plain sum of each tensor's bytes passed a square weight loaded transposed on one rank, or a vector in another
    # order, and the ranks trained apart silently.
    torch.manual_seed(0)
    w = torch.nn.Linear(3, 3).weight.detach()
    assert not torch.equal(w, w.t()) and w.view(torch.uint8).sum() == w.t().contiguous().view(torch.uint8).sum()
    for result in fnlit.distributed.launch(starts_permuted, 2, timeout=120):  # fit's, check_same_state's
        for kind, path in (("transposed", "params['weight']"), ("flipped", "params['bias']")):
            assert len(result[kind]) == 2
            for message in result[kind]:
                assert "the ranks start from different states: their values differ at " + path in message
        assert result["same"] == ["no error", "no error"]


def test_all_equal_answers_alike_on_every_rank():
    # The one exchange behind evaluate's metric-names check, the batch counts' and check_same_state: every rank gets
    # the same answer, the hand-known one (ints as they are, str and bytes by content; int64's ends too).
    kinds = ("int", "str", "bytes", "ends")
    expected = {**{("same", k): True for k in kinds}, **{("differ", k): False for k in kinds},
                "extremes": ([1, 5, 2**63 - 1], [0, -(2**63), 2**63 - 1])}  # (the max and min of rank, 5 or -2**63, 2**63-1)
    assert fnlit.distributed.launch(all_equal_votes, 2, timeout=120, collective_timeout=30) == [expected] * 2


def test_check_same_state_takes_a_float64_negative_zero():
    # A float64 tensor holding -0.0 (bits 0x8000000000000000) has the checksum -2**63, whose negation the exchange
    # sent overflowed int64: check_same_state (and fit) failed with "Overflow when unpacking long long".
    assert fnlit.distributed.launch(negative_zero_state, 2, False, timeout=120, collective_timeout=30) == ["no error"] * 2
    for message in fnlit.distributed.launch(negative_zero_state, 2, True, timeout=120, collective_timeout=30):
        assert "the ranks start from different states: their values differ at params['weight']" in message


def test_float64_metrics_and_a_float64_loss_are_averaged_in_float64():
    # Averaged in float32: (0.1 + 1.1) / 2 came back as 0.6000000238418579; a float64 model's loss too.
    results = fnlit.distributed.launch(float64_metric, 2, timeout=120)
    mean_loss = (results[0][4] + results[1][4]) / 2  # the reference: each rank's own loss, averaged by hand
    for dtype, value, loss_dtype, loss, _ in results:
        assert dtype == torch.float64 and value == (0.1 + 1.1) / 2
        assert loss_dtype == torch.float64 and loss == pytest.approx(mean_loss, rel=1e-15, abs=0)


def test_a_float64_loss_of_a_float32_model_is_averaged_in_float64_and_its_aux_rides_in_float32():
    # The loss rode the float32 gradients' all-reduce and lost its digits; the aux's scalars ride there by design (as
    # many riders on every rank whatever their dtypes, no collective of their own): float32's precision, as documented.
    results = fnlit.distributed.launch(float64_aux_in_a_float32_model, 2, timeout=120, collective_timeout=30)
    mean_loss = (results[0][4] + results[1][4]) / 2  # the reference: each rank's own loss, averaged by hand
    for dtype, value, loss_dtype, loss, _ in results:
        assert dtype == torch.float32 and value == float(torch.tensor([0.1, 1.1]).mean())  # (the float32 average)
        assert loss_dtype == torch.float64 and loss == pytest.approx(mean_loss, rel=1e-15, abs=0)


def test_aux_scalars_ride_the_gradient_all_reduce_and_are_averaged():
    # An accuracy, an integer count and a number-or-tensor count (sum([]) is the int 0 on rank 1) returned as
    # value_and_grad's aux: each step one all-reduce, the gradients with the loss and the three riders, and no
    # collective for the metrics (one cost ~25 % of a small model's step on gloo). Reference: each rank's own values,
    # averaged by hand (float32 riders).
    r0, r1 = fnlit.distributed.launch(aux_metrics_ride_the_gradients, 2, 3, timeout=120, collective_timeout=30)
    assert r0["sizes"] == [r0["n_params"] + 4] * 3 == r1["sizes"]
    for i, (own0, own1) in enumerate(zip(r0["own"], r1["own"])):
        assert r0["averaged"][i] == r1["averaged"][i]
        for name, (value, dtype) in r0["averaged"][i].items():
            expected = float(torch.tensor([own0[name], own1[name]], dtype=torch.float32).mean())
            assert value == pytest.approx(expected, rel=1e-6), name
            assert dtype == torch.float32, name
    assert any(own["big"] == 0 for own in r1["own"]) and any(own["big"] != 0 for own in r0["own"])  # (the mix happened)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_aux_number_beside_a_one_element_tensor_is_averaged_alike_on_every_rank(dtype):
    # A number on one rank, a (1,) tensor on the other: both ride (a 0-d-only rule left the (1,) tensor home: a hang),
    # and come back in the gradients' dtype on both ranks (a number became a float32 tensor: float32 on one rank,
    # float64 on the other, in a float64 model). Reference: the mean by hand in that dtype.
    r0, r1 = fnlit.distributed.launch(aux_number_beside_a_one_element_tensor, 2, dtype, timeout=120, collective_timeout=30)
    assert r0 == r1 == (float(torch.tensor([0.1, 0.3], dtype=dtype).mean()), dtype)


def test_a_data_parallel_step_with_a_metric_of_its_own_passes_assert_no_host_sync():
    # The metric names' check read its CPU result with .item() in the step: assert_no_host_sync flagged every CPU
    # data_parallel step with a metric besides the loss (the read is fnlit's, of a gloo result: allowed on the CPU).
    assert fnlit.distributed.launch(no_host_sync_of_a_data_parallel_step, 2, timeout=120, collective_timeout=30) == [None, None]


def test_a_data_parallel_step_whose_first_state_was_not_checked_warns_once():
    # fit checks a step built with fnlit's transforms; behind a function of one's own (fit(lambda s, b: dp(s, b)))
    # or in one's own loop nothing did, and ranks seeded apart trained apart silently.
    for unchecked, checked in fnlit.distributed.launch(unchecked_warns, 2, timeout=120):
        assert len(unchecked) == 1 and "Call fnlit.distributed.check_same_state(state)" in unchecked[0]
        assert checked == []


def test_fit_of_a_data_parallel_step_on_one_rank_warns_nothing():
    # fit checks the ranks' states only with several; the step warned "nothing checked" on one (torchrun with
    # --nproc-per-node 1, a single-GPU debug run).
    assert fnlit.distributed.launch(fit_one_rank_warns_nothing, 1, timeout=120) == [[]]


@pytest.mark.parametrize("aux", [False, True], ids=["metric", "aux"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_metric_that_is_a_number_on_one_rank_and_a_tensor_on_another_is_averaged(dtype, aux):
    # sum([]) is the int 0 on a rank whose selection is empty: numbers were left out of the metrics' all-reduce, so
    # the ranks ran different numbers of collectives and one rank's metrics were averaged into the other's gradients
    # at the next step (params apart, then a crash). Returned as has_aux, the tensor rode the gradients' all-reduce on
    # one rank only: buffers of different sizes, a hang. Reference: one weight, SGD on the mean of the ranks'
    # gradients, by hand: d/dw (w - y)^2 = 2 (w - y), with y = 0.5 on rank 0 and 100 on rank 1.
    results = fnlit.distributed.launch(number_or_tensor_metric, 2, 4, dtype, aux, timeout=120, collective_timeout=15)
    assert results[0] == results[1]
    torch.manual_seed(0)
    w = torch.nn.Linear(1, 1, bias=False).to(dtype).weight.item()
    expected = []
    for _ in range(4):
        w -= 0.1 * (2 * (w - 0.5) + 2 * (w - 100.0)) / 2
        expected.append(w)
    weights, outliers = results[0]
    assert weights == pytest.approx(expected, rel=1e-5)
    assert outliers == [50.0] * 4  # (0 + 100) / 2


@pytest.mark.parametrize("k", [1, 2])
def test_a_sparse_gradient_is_refused_naming_the_parameter(k):
    # It failed inside the flattened all-reduce: "reshape is not implemented for sparse tensors" (nn.Embedding(sparse=True)).
    with pytest.raises(RuntimeError, match=r"ValueError: fnlit\.data_parallel does not support sparse gradients .*for "
                                           r"0\.weight\. .*sparse=False"):
        fnlit.distributed.launch(sparse_embedding, 2, k, timeout=120)


def test_validation_with_different_numbers_of_batches_per_rank_on_a_plain_state():
    # A rank without a batch in data without a len() raised alone while the others waited in the metric all-reduce
    # (a raw gloo error); short ranks ran filler forwards that only a sharded model (a collective) needs.
    # Reference: one process over both ranks' batches.
    torch.manual_seed(0)  # the workers' init
    model = mlp()

    def mean_ce(k):  # over the first k batches of each rank, every example once
        x, y = (torch.cat(t) for t in zip(*(b for r in (0, 1) for b in val_batches(r)[:k])))
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(x), y))

    every, two = mean_ce(3), mean_ce(2)
    results = fnlit.distributed.launch(uneven_validation_unsharded, 2, timeout=120, collective_timeout=15)
    for rank, r in enumerate(results):
        own = (3, 2)[rank]  # this rank's batches: each runs its own forwards only
        for name in ("evaluate", "no len()", "no len() on rank 1"):
            assert r[name][0] == pytest.approx(every, rel=1e-5) and r[name][1] == own, name
        assert r["limit 2"][0] == pytest.approx(two, rel=1e-5) and r["limit 2"][1] == 2
        assert r["fit metrics"] == pytest.approx([every], rel=1e-5)
        assert "(from 0 to 3 batches, this rank" in r["evaluate, rank 1 none"]
        for name in ("evaluate, rank 1 none, no len()", "evaluate, rank 1 none, iterator", "fit, rank 1 none, no len()"):
            assert f"one rank with none, this rank {('some', 'none')[rank]})" in r[name], name
            assert "DistributedSampler" in r[name], name
            # (it pads its shards with repeated examples, which evaluate counts: it did not say so)
            assert "counts every example once; DistributedSampler evens the shards by repeating examples" in r[name], name
        assert r["limit 0.5"][0] == pytest.approx(mean_ce(1), rel=1e-5) and r["limit 0.5"][1] == 1
        assert_limit_errors(r, rank, train=True)
        # val_data without batches on rank 1 was skipped there, and refused only as "others have some"; on every
        # rank's shard (4 examples in batches of 3 with drop_last: one in one process, none of 2 a rank), validation
        # was turned off silently
        assert r["fit, val_data empty on rank 1"].startswith(("fit: rank 1", "fit")[rank] + " got val_data with no batches")
        assert r["fit, val_data empty on rank 1, limit_val_batches 0"] == (None, 0)  # turned off, as documented
        assert len(torch.utils.data.DataLoader(torch.zeros(4), batch_size=3, drop_last=True)) == 1
        shards = r["fit, a DistributedSampler's shards without batches"]
        assert shards.startswith("fit got val_data with no batches") and "about 1/2 of the examples" in shards, shards


def test_metrics_kept_on_the_cpu_join_the_collective_on_the_state_device(monkeypatch):
    # Under NCCL the metrics' collective runs on the params' device; a metric the step keeps on the CPU
    # ({"step": state.step}: fnlit keeps the step there) beside device ones failed torch.stack ("expected all
    # tensors to be on the same device"). The meta device stands in for CUDA: it refuses the same mix.
    dp = importlib.import_module("fnlit.transforms.data_parallel")  # (the package exports the function by that name)

    with pytest.raises(RuntimeError, match="device"):
        torch.stack([torch.zeros((), device="meta"), torch.zeros(())])  # the reference: torch refuses the mix
    monkeypatch.setattr(dp, "all_reduce_mean_", lambda tensors, group=None: list(tensors))  # one rank's view
    monkeypatch.setattr(dp.dist, "get_world_size", lambda group=None: 1)  # (of a world of one)
    metrics = {"loss": torch.zeros((), device="meta"), "step": torch.tensor(3), "acc": 0.5}
    out = dp.all_reduce_metrics(metrics, device=torch.device("meta"))
    assert {k: v.device.type for k, v in out.items()} == {"loss": "meta", "step": "meta", "acc": "meta"}
    cpu = dp.all_reduce_metrics({"loss": torch.tensor(2.0), "step": torch.tensor(3)}, device=torch.device("cpu"))
    assert cpu["loss"].item() == 2.0 and cpu["step"].item() == 3.0 and cpu["step"].dtype == torch.float32


@pytest.mark.parametrize("counts", [(3, 3), (3, 1)])
def test_update_bn_gives_every_rank_the_statistics_of_all_ranks_batches(counts):
    # update_bn kept each rank's own statistics (the ranks' buffers apart), and on a sharded state a rank with an
    # extra batch all-gathered the params alone (a mismatched collective). Reference: torch's update_bn in one
    # process over every rank's batches in turn (per-batch statistics of 4 examples, cumulative mean over all).
    from _dist_workers import bn_batches, bn_model, update_bn_on_ranks

    def reference(*ranks):
        model = bn_model()
        torch.optim.swa_utils.update_bn([b for r in ranks for b in bn_batches(r, counts[r])], model)
        return {k: v for k, v in model.state_dict().items() if "running" in k or "tracked" in k}

    every, first, second = reference(0, 1), reference(0), reference(1)
    results = fnlit.distributed.launch(update_bn_on_ranks, 2, counts, timeout=180, collective_timeout=30)
    for name, expected in [("plain", every), ("plain, no len()", every), ("sharded", every),
                           ("sharded, no len()", every), ("plain, rank 1 none", first)]:  # fmt: skip
        for k, v in expected.items():
            assert torch.equal(results[0][name][k], results[1][name][k]), (name, k)  # bitwise the same on both
            torch.testing.assert_close(results[0][name][k], v, rtol=0, atol=1e-6, msg=f"{name} {k}")
    for rank, own in enumerate((first, second)):  # all_ranks=False: each rank's own, no collective
        for k, v in own.items():
            torch.testing.assert_close(results[rank]["own"][k], v, rtol=0, atol=1e-6)
    for rank, r in enumerate(results):
        error = r["sharded, rank 1 none"]
        pattern = r"update_bn: the state is sharded.*some rank has no batch at all while others have some \(.*this rank " + (
            "3", "0")[rank]
        assert isinstance(error, str) and re.search(pattern, error), error


def test_a_rank_outside_the_group_is_refused_and_the_members_average():
    # torch gives a non-member -1 for the group's size and rank: the gradients were divided by -1 and not reduced,
    # so rank 2 silently did gradient ascent. Reference: the members' mean gradient of w * x, (1 + 3) / 2, by hand.
    moved0, moved1, error = fnlit.distributed.launch(a_rank_outside_the_group, 3, timeout=120, collective_timeout=30)
    assert moved0 == moved1 == pytest.approx(-2.0, rel=1e-6)
    assert isinstance(error, str) and re.match(r"fnlit\.data_parallel: this rank \(global rank 2\) is not in the process group", error)


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_data_parallel_raises_on_every_rank_when_their_metric_names_differ(nested):
    # Sorted by name and averaged with no check: rank 0's "cat" and rank 1's "dog" were averaged together, and each
    # rank returned its own name with the other's value mixed in. (evaluate raises a KeyError in this case.)
    errors = fnlit.distributed.launch(metric_names_that_differ, 2, nested, timeout=120, collective_timeout=30)
    for rank, error in enumerate(errors):
        assert re.match(rf"fnlit\.data_parallel: the ranks' steps returned different metric names \(this rank, {rank} ",
                        error), error
        assert "Return the same names on every rank" in error
