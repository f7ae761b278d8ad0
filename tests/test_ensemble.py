import re
import warnings

import numpy as np
import pytest
import torch
from helpers import batch, hand_step, mlp
from torch import nn

import fnlit
from fnlit.ensemble import ensemble, ensemble_states, stack_states, unstack_state
from fnlit.testing import assert_no_host_sync, assert_pure, assert_trees_close

SEEDS, LRS, WDS = [3, 1, 4, 1_000_003], [1e-2, 3e-3, 1e-3, 3e-2], [1e-2, 0.0, 1e-1, 5e-2]


def solo(seed, tx, model_fn=mlp):
    """The reference: one model built and trained the ordinary way."""
    torch.manual_seed(seed)
    return fnlit.TrainState.create(model_fn(), tx, seed=seed)


def run(step, state, data, n):
    for _ in range(n):
        state, metrics = step(state, data)
    return state, metrics


def test_each_member_equals_its_solo_run_after_20_steps():
    step, data = hand_step(mlp()), batch()
    states = ensemble_states(mlp, fnlit.optim.adamw(1e-3), seeds=SEEDS, learning_rate=LRS, weight_decay=WDS)
    states, metrics = run(ensemble(step, 4), states, data, 20)
    assert metrics["loss"].shape == (4,)
    for i, (seed, lr, wd) in enumerate(zip(SEEDS, LRS, WDS)):
        alone, alone_metrics = run(step, solo(seed, fnlit.optim.adamw(lr, weight_decay=wd)), data, 20)
        assert_trees_close(unstack_state(states, i), alone, rtol=1e-5, atol=1e-5, name=f"member{i}")
        torch.testing.assert_close(metrics["loss"][i], alone_metrics["loss"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["ensemble(accumulate)", "accumulate(ensemble)"])
def test_ensemble_and_accumulate_compose(order):
    step, data = hand_step(mlp()), batch()
    states = ensemble_states(mlp, fnlit.optim.sgd(0.5, momentum=0.9), seeds=SEEDS[:2])
    both = ensemble(fnlit.accumulate(step, 2), 2) if order == "ensemble(accumulate)" else fnlit.accumulate(ensemble(step, 2), 2)
    states, _ = run(both, states, data, 3)
    for i, seed in enumerate(SEEDS[:2]):  # reference: each member accumulated on its own, eagerly
        alone, _ = run(fnlit.accumulate(step, 2), solo(seed, fnlit.optim.sgd(0.5, momentum=0.9)), data, 3)
        assert_trees_close(unstack_state(states, i), alone, rtol=1e-5, atol=1e-6, name=f"member{i}")


def test_per_member_batches_with_in_dims_0():
    step = hand_step(mlp())
    xs = torch.stack([batch(seed=i)[0] for i in range(3)])
    ys = torch.stack([batch(seed=i)[1] for i in range(3)])
    states = ensemble_states(mlp, fnlit.optim.sgd(0.1, momentum=0.9), seeds=[0, 1, 2])
    states, _ = run(ensemble(step, 3, in_dims=0), states, (xs, ys), 5)
    for i in range(3):
        alone, _ = run(step, solo(i, fnlit.optim.sgd(0.1, momentum=0.9)), (xs[i], ys[i]), 5)
        assert_trees_close(unstack_state(states, i), alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: fnlit.optim.sgd(0.1),
        lambda: fnlit.optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda: fnlit.optim.adam(1e-2, weight_decay=1e-3),
        lambda: fnlit.optim.adamw(1e-2, mask=fnlit.optim.decay_mask),
        lambda: fnlit.optim.chain(fnlit.optim.clip_by_global_norm(0.5), fnlit.optim.adamw(1e-2)),
        lambda: fnlit.optim.adamw(fnlit.optim.warmup_cosine(1e-2, 2, 10)),
    ],
    ids=["sgd", "sgd-nesterov-wd", "adam-l2", "adamw-masked", "clip+adamw", "adamw-schedule"],
)
def test_optimizers_under_vmap_match_eager(make_tx):
    tx, step, data = make_tx(), hand_step(mlp()), batch()
    states, _ = run(ensemble(step, 2), stack_states([solo(s, tx) for s in (0, 1)]), data, 5)
    for i, seed in enumerate((0, 1)):
        assert_trees_close(unstack_state(states, i), run(step, solo(seed, tx), data, 5)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # (vmap's fallback for weight_norm)
@pytest.mark.parametrize("norm", ["weight_norm", "prune"])
def test_an_ensemble_step_leaves_the_weight_an_older_norm_hook_computes_as_the_module_had_it(norm):
    # Their forward pre-hook sets module.weight (a plain attribute) from the params swapped in. Under vmap apply runs
    # torch.func.functional_call, which left it holding the vmapped step's tensor and graph; a plain apply puts the
    # module's own back. Reference: the module's attribute before the step, and each member's solo step.
    def build(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
        if norm == "prune":
            torch.nn.utils.prune.l1_unstructured(m[0], "weight", amount=0.5)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # weight_norm is deprecated for the parametrization
                torch.nn.utils.weight_norm(m[0])
        return m

    model, tx = build(0), fnlit.optim.sgd(0.1)
    own = model[0].weight
    step = fnlit.train_step(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    solo = [fnlit.TrainState.create(build(i), tx, seed=i) for i in range(2)]
    b = (torch.randn(8, 4), torch.randn(8, 2))
    states, _ = ensemble(step, 2)(stack_states(solo), b)
    assert model[0].weight is own
    for i, member in enumerate(solo):
        assert_trees_close(unstack_state(states, i).params, step(member, b)[0].params, rtol=1e-5, atol=1e-6)


def test_batchnorm_statistics_are_per_member():
    model_fn = lambda: mlp(bn=True)
    step, data, tx = hand_step(model_fn()), batch(), fnlit.optim.sgd(0.1)
    states, _ = run(ensemble(step, 2), ensemble_states(model_fn, tx, seeds=[0, 1]), data, 3)
    for i in range(2):
        alone, _ = run(step, solo(i, tx, model_fn), data, 3)
        assert_trees_close(unstack_state(states, i).buffers, alone.buffers, rtol=1e-5, atol=1e-6)
    assert int(states.buffers["1.num_batches_tracked"][1]) == 3


def test_dropout_differs_per_member_and_the_step_stays_pure():
    model_fn = lambda: mlp(dropout=0.5)
    step = ensemble(hand_step(model_fn()), 2)
    same_init = stack_states([solo(0, fnlit.optim.sgd(0.1), model_fn)] * 2)
    _, metrics = assert_pure(step, same_init, batch())  # deterministic, global generator untouched
    assert not torch.equal(metrics["loss"][0], metrics["loss"][1])  # same params, different masks


def test_ensemble_step_has_no_host_sync():
    step = ensemble(hand_step(mlp(dropout=0.1)), 2)
    assert_no_host_sync(step, ensemble_states(mlp, fnlit.optim.adamw(1e-3), seeds=[0, 1]), batch())


def test_module_reset_parameters_matches_factory_init():
    a = ensemble_states(mlp(), fnlit.optim.sgd(0.1), seeds=[5, 6])
    b = ensemble_states(mlp, fnlit.optim.sgd(0.1), seeds=[5, 6])
    assert_trees_close(a, b, rtol=0, atol=0)


class _Pair(nn.Module):
    """Resets its children itself (a common pattern): a module instance must not reset them twice."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def reset_parameters(self):
        self.a.reset_parameters()
        self.b.reset_parameters()


class _Outer(nn.Module):
    """A parameter of its own, and children it resets, one of them a _Pair (which owns no parameter)."""

    def __init__(self):
        super().__init__()
        self.pair, self.head = _Pair(), nn.Linear(2, 3)
        self.scale = nn.Parameter(nn.init.normal_(torch.empty(3)))

    def reset_parameters(self):
        self.pair.reset_parameters()
        self.head.reset_parameters()
        nn.init.normal_(self.scale)


@pytest.mark.parametrize("net", [_Pair, _Outer])
def test_a_parent_resetting_its_children_inits_like_the_model_built_after_the_seed(net):
    tx = fnlit.optim.sgd(0.1)
    instance = ensemble_states(net(), tx, seeds=[3, 7])
    assert_trees_close(instance, ensemble_states(net, tx, seeds=[3, 7]), rtol=0, atol=0)
    for i, seed in enumerate([3, 7]):
        assert_trees_close(unstack_state(instance, i), solo(seed, tx, net), rtol=0, atol=0)


def test_a_parent_reset_writing_through_data_counts_for_its_children():
    class Legacy(nn.Module):  # p.data writes: the parameters' version counters do not move
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def reset_parameters(self):
            for m in (self.a, self.b):
                m.weight.data.normal_(0, 0.02)
                m.bias.data.zero_()

    net = Legacy()
    state = unstack_state(ensemble_states(net, fnlit.optim.sgd(0.1), seeds=[5]), 0)
    torch.manual_seed(5)
    net.reset_parameters()  # the reference: the module's own reset, once, after the seed
    assert_trees_close(state.params, {k: v.detach() for k, v in net.named_parameters()}, rtol=0, atol=0)
    assert not state.params["b.bias"].any()


class _TiedLM(nn.Module):
    """An embedding tied to its output layer (the layer's own weight, drawn by its constructor, is discarded)."""

    def __init__(self, bias=True, after=False):
        super().__init__()
        self.emb, self.head = nn.Embedding(20, 4), nn.Linear(4, 20, bias=bias)
        self.head.weight = self.emb.weight
        self.after = nn.Linear(20, 2) if after else None


@pytest.mark.parametrize("bias, after", [(True, False), (False, True), (False, False)])
def test_a_module_instance_with_tied_weights_is_refused_and_a_factory_inits_like_the_built_model(bias, after):
    tx = fnlit.optim.sgd(0.1)
    # resetting the layers one by one gave the embedding the head's init (or, without a bias, skipped the head's
    # draws and moved every later layer's): not the model built after the seed. (False, False), the head last and
    # without a bias, happened to match; its layout cannot be told apart from the others', so it is refused too.
    with pytest.raises(ValueError, match=r"tied parameter 'emb.weight' \(also 'head.weight'\).*lambda: Net\(\)"):
        ensemble_states(_TiedLM(bias, after), tx, seeds=[3])
    member = unstack_state(ensemble_states(lambda: _TiedLM(bias, after), tx, seeds=[3]), 0)
    assert_trees_close(member, solo(3, tx, lambda: _TiedLM(bias, after)), rtol=0, atol=0)


def test_a_tie_that_the_models_own_reset_re_initialises_is_accepted():
    class Reset(_TiedLM):
        def reset_parameters(self):  # holds both layers: replays the tie as its constructor does
            self.emb.reset_parameters()
            nn.init.zeros_(self.head.bias)

    model = Reset()
    state = unstack_state(ensemble_states(model, fnlit.optim.sgd(0.1), seeds=[3]), 0)
    torch.manual_seed(3)
    model.reset_parameters()  # the reference: the module's own reset, once, after the seed
    assert_trees_close(state.params, {k: v.detach() for k, v in model.named_parameters()}, rtol=0, atol=0)


def test_a_tie_with_a_module_without_reset_is_re_initialised_by_the_layer_that_has_one():
    class OutW(nn.Module):  # the output projection is the parent's own parameter, used through F.linear
        def __init__(self):
            super().__init__()
            self.emb, self.mid = nn.Embedding(20, 4), nn.Linear(4, 4)
            self.out_w = self.emb.weight

    tx = fnlit.optim.sgd(0.1)
    member = unstack_state(ensemble_states(OutW(), tx, seeds=[3]), 0)
    assert_trees_close(member, solo(3, tx, OutW), rtol=0, atol=0)  # the reference: the model built after the seed


def test_stack_unstack_round_trip():
    tx = fnlit.optim.adam(1e-3)
    states = [solo(i, tx) for i in range(3)]
    stacked = stack_states(states)
    assert stacked.params["0.weight"].shape == (3, 16, 8)
    for i in (0, 1, -1):
        assert_trees_close(unstack_state(stacked, i), states[i], rtol=0, atol=0)


def test_stack_states_errors_name_the_mismatch():
    tx = fnlit.optim.sgd(0.1)
    with pytest.raises(ValueError, match="empty"):
        stack_states([])
    with pytest.raises(ValueError, match=r"states\[1\]\.tx is not states\[0\]\.tx"):
        stack_states([solo(0, tx), solo(1, fnlit.optim.sgd(0.1))])
    with pytest.raises(ValueError, match=r"states\[1\] differs from states\[0\] at params\['0\.bias'\]: expected tensor of shape \(16,\)"):
        stack_states([solo(0, tx), solo(1, tx, lambda: mlp(hidden=8))])


def test_unstack_and_ensemble_check_the_member_count():
    stacked = ensemble_states(mlp, fnlit.optim.sgd(0.1), seeds=[0, 1])
    with pytest.raises(IndexError, match="member index 2, but the ensemble has 2"):
        unstack_state(stacked, 2)
    with pytest.raises(ValueError, match=r"n=3\) expected a state stacked over 3 members .*shape \(2,\)"):
        ensemble(hand_step(mlp()), 3)(stacked, batch())
    with pytest.raises(ValueError, match="expected an ensemble state"):
        unstack_state(solo(0, fnlit.optim.sgd(0.1)), 0)
    with pytest.raises(ValueError, match="n, the number of members"):
        ensemble(hand_step(mlp()), 0)


def test_ensemble_states_rejects_sweeps_that_would_do_nothing():
    with pytest.raises(ValueError, match="weight decay off"):
        ensemble_states(mlp, fnlit.optim.sgd(0.1), seeds=[0, 1], weight_decay=[0.1, 0.2])
    with pytest.raises(ValueError, match="is a schedule"):
        ensemble_states(mlp, fnlit.optim.adamw(fnlit.optim.constant(0.1)), seeds=[0, 1], learning_rate=[0.1, 0.2])
    with pytest.raises(ValueError, match="no hyperparams\\['weight_decay'\\]"):
        ensemble_states(mlp, fnlit.optim.chain(fnlit.optim.scale(-0.1)), seeds=[0], weight_decay=[0.1])
    with pytest.raises(ValueError, match="one value per seed \\(2\\), got 3"):
        ensemble_states(mlp, fnlit.optim.sgd(0.1), seeds=[0, 1], learning_rate=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="finite and >= 0, got -0.1 for member 1"):
        ensemble_states(mlp, fnlit.optim.sgd(0.1), seeds=[0, 1], learning_rate=[0.1, -0.1])


def test_float16_amp_outside_an_ensemble_says_to_put_it_inside():
    stacked = ensemble_states(mlp, fnlit.optim.sgd(0.1), seeds=[0, 1], loss_scale="dynamic")
    for outer in (
        lambda: fnlit.amp(ensemble(hand_step(mlp()), 2), torch.float16),
        lambda: fnlit.accumulate(ensemble(fnlit.amp(hand_step(mlp()), torch.float16), 2), 2),  # amp joins accumulate's frame
    ):
        with pytest.raises(ValueError, match=r"put amp and any accumulate inside, fnlit.ensemble\(fnlit.accumulate\(fnlit.amp"):
            outer()(stacked, batch())
    # the order it says works, and equals each member trained alone with that step
    inner = fnlit.accumulate(fnlit.amp(hand_step(mlp()), torch.float16), 2)
    got, _ = ensemble(inner, 2)(stacked, batch())
    for i in range(2):
        alone, _ = inner(unstack_state(stacked, i), batch())
        assert_trees_close(unstack_state(got, i).params, alone.params, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("wd", [1e-2, torch.tensor(0.0)])
def test_adam_l2_weight_decay_sweep_is_accepted_and_each_member_follows_torch_adam(wd):
    # Adam's first step is ~lr * sign(g): an L2 term changes no update there, which the sweep check read as
    # "decay off". Reference: torch.optim.Adam(weight_decay=w), one model per member.
    decays = [0.0, 0.5]
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)) for _ in range(3)]
    model = nn.Linear(4, 2)
    stacked = ensemble_states(lambda: nn.Linear(4, 2), fnlit.optim.adam(1e-2, weight_decay=wd), seeds=[0, 1], weight_decay=decays)
    run = ensemble(fnlit.train_step(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])), 2)
    for b in data:
        stacked, _ = run(stacked, b)
    for i, w in enumerate(decays):
        torch.manual_seed(i)
        ref = nn.Linear(4, 2)
        opt = torch.optim.Adam(ref.parameters(), lr=1e-2, weight_decay=w)
        for x, y in data:
            opt.zero_grad()
            torch.nn.functional.mse_loss(ref(x), y).backward()
            opt.step()
        assert_trees_close(unstack_state(stacked, i).params, dict(ref.named_parameters()), rtol=1e-5, atol=1e-6)


def test_module_without_reset_parameters_asks_for_a_factory():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

    with pytest.raises(ValueError, match=r"'w'.*reset_parameters.*lambda: Net\(\)"):
        ensemble_states(Scale(), fnlit.optim.sgd(0.1), seeds=[0, 1])


def test_fit_drives_an_ensemble_and_logs_each_member(tmp_path):
    import csv

    import torch.nn.functional as F

    import fnlit
    from fnlit.data import ArrayLoader

    model = torch.nn.Linear(4, 1)
    step = fnlit.ensemble(fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1])), 3)
    states = fnlit.ensemble_states(model, fnlit.optim.sgd(0.1), seeds=[0, 1, 2], learning_rate=[0.1, 0.01, 0.0])
    data = ArrayLoader(torch.randn(32, 4), torch.randn(32, 1), batch_size=8)
    out = fnlit.fit(step, states, data, max_epochs=2, log_every_n_steps=4, log_dir=str(tmp_path), progress=False,
                    callbacks=[fnlit.callbacks.LearningRateMonitor()])
    assert out.step.tolist() == [8, 8, 8]
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"train/loss/0", "train/loss/1", "train/loss/2"} <= set(rows[0])
    # the learning-rate monitor logs each member's rate (a (3,) value crashed the first log)
    assert [float(rows[0][f"lr-SGD/{i}"]) for i in range(3)] == pytest.approx([0.1, 0.01, 0.0])
    # member 2 has lr 0: its params never move; the others do
    assert torch.equal(out.params["weight"][2], states.params["weight"][2])
    assert not torch.equal(out.params["weight"][0], states.params["weight"][0])


def test_evaluate_reports_each_members_metric_as_its_own_evaluation_does():
    model = mlp()
    ev = fnlit.eval_step(model, lambda m, b: {"loss": nn.functional.cross_entropy(m(b[0]), b[1])})
    states = ensemble_states(mlp, fnlit.optim.sgd(0.1), seeds=[0, 1])
    data = [batch(seed=0), batch(seed=1)]
    got = fnlit.evaluate(ensemble(ev, 2), states, data)
    assert set(got) == {"loss/0", "loss/1"}
    for i in range(2):  # the reference: each member evaluated alone
        assert got[f"loss/{i}"] == pytest.approx(fnlit.evaluate(ev, unstack_state(states, i), data)["loss"], rel=1e-6)


@pytest.mark.parametrize("in_dims", [0, (0, 0), (0, None)])
def test_evaluate_weights_per_member_batches_by_their_examples(in_dims):
    # Batches stacked over the members (in_dims=0: leaves (n, B, ...)) were weighted by n, so a last batch of 2
    # examples counted as much as one of 16. Reference: the mean over all 18 examples of each member, by hand.
    model = mlp()
    ev = fnlit.eval_step(model, lambda m, b: {"loss": nn.functional.cross_entropy(m(b[0]), b[1])})
    states = ensemble_states(mlp, fnlit.optim.sgd(0.1), seeds=[0, 1])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 18, 8, generator=g), torch.randint(0, 4, (2, 18), generator=g)
    if in_dims == (0, None):  # labels shared by the members
        y = y[:1].expand(2, 18)
        data = [(x[:, :16], y[0, :16]), (x[:, 16:], y[0, 16:])]
    else:
        data = [(x[:, :16], y[:, :16]), (x[:, 16:], y[:, 16:])]
    got = fnlit.evaluate(ensemble(ev, 2, in_dims=in_dims), states, data)
    for i in range(2):
        logits, _ = fnlit.apply(model, unstack_state(states, i).params, {}, x[i], train=False)
        assert got[f"loss/{i}"] == pytest.approx(nn.functional.cross_entropy(logits, y[i]).item(), rel=1e-5)


@pytest.mark.parametrize("wrap", ["torch.compile", "functools.wraps"])
def test_evaluate_weights_per_member_batches_by_their_examples_through_a_wrapped_ensemble(wrap):
    # torch.compile(fnlit.ensemble(ev, 2, in_dims=0)) (what fnlit.compile's refusal of an eval step recommends) is
    # not an EnsembleStep, so each batch was weighted by n: the last batch of 2 examples as one of 16.
    # Reference: each member's mean over all 18 examples, by hand with plain cross_entropy.
    import functools

    model = nn.Linear(8, 4)
    ev = fnlit.eval_step(model, lambda m, b: {"loss": nn.functional.cross_entropy(m(b[0]), b[1])})
    states = ensemble_states(lambda: nn.Linear(8, 4), fnlit.optim.sgd(0.1), seeds=[0, 1])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 18, 8, generator=g), torch.randint(0, 4, (2, 18), generator=g)
    data = [(x[:, :16], y[:, :16]), (x[:, 16:], y[:, 16:])]
    inner = ensemble(ev, 2, in_dims=0)
    if wrap == "torch.compile":
        torch._dynamo.reset()
        wrapped = torch.compile(inner, backend="eager")
    else:
        wrapped = functools.wraps(inner)(lambda state, batch: inner(state, batch))
    got = fnlit.evaluate(wrapped, states, data)
    for i in range(2):
        params = unstack_state(states, i).params
        want = nn.functional.cross_entropy(nn.functional.linear(x[i], params["weight"], params["bias"]), y[i]).item()
        assert got[f"loss/{i}"] == pytest.approx(want, rel=1e-5)


def test_a_plain_eval_step_given_a_stacked_state_fails_with_a_note_to_wrap_it_in_an_ensemble(tmp_path):
    # evaluate(eval_step, stacked, data) (and fit's validation of an ensemble) failed deep inside the forward
    # ("t() expects a tensor with <= 2 dimensions") with nothing about the ensemble. The same error now carries a
    # note saying to wrap the eval step; a step that maps the members by hand is legitimate and still runs.
    model = nn.Linear(4, 2)
    ev = fnlit.eval_step(model, lambda m, b: {"loss": nn.functional.cross_entropy(m(b[0]), b[1])})
    states = ensemble_states(lambda: nn.Linear(4, 2), fnlit.optim.sgd(0.1), seeds=[0, 1])
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g))]
    note = r"ensemble's stacked state \(2 members.*fnlit\.ensemble\(eval_step, 2\)"
    with pytest.raises(RuntimeError, match=r"t\(\) expects a tensor with <= 2 dimensions") as info:
        fnlit.evaluate(ev, states, data)
    assert any(re.search(note, n) for n in getattr(info.value, "__notes__", []))
    train = fnlit.train_step(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    with pytest.raises(RuntimeError, match=r"t\(\) expects") as info:
        fnlit.fit(ensemble(train, 2), states, data, val_data=data, eval_step=ev, max_epochs=1, log_dir=str(tmp_path),
                  progress=False)
    assert any(re.search(note, n) for n in getattr(info.value, "__notes__", []))

    def by_hand(state, b):  # the members mapped by the step itself
        logits = torch.einsum("bi,noi->nbo", b[0], state.params["weight"]) + state.params["bias"][:, None]
        return {"loss": torch.stack([nn.functional.cross_entropy(z, b[1]) for z in logits])}

    got = fnlit.evaluate(by_hand, states, data)
    for i in range(2):
        params = unstack_state(states, i).params
        want = nn.functional.cross_entropy(nn.functional.linear(data[0][0], params["weight"], params["bias"]), data[0][1])
        assert got[f"loss/{i}"] == pytest.approx(want.item(), rel=1e-5)


def test_a_plain_training_step_given_a_stacked_state_fails_in_fit_with_a_note_to_wrap_it_in_an_ensemble():
    # fit(step, stacked, data) failed with fnlit.random.seeded's "expected a single key ...; index or split it
    # first", nothing about the ensemble (evaluate already added this note for its eval step)
    model = nn.Linear(4, 2)
    train = fnlit.train_step(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    states = ensemble_states(lambda: nn.Linear(4, 2), fnlit.optim.sgd(0.1), seeds=[0, 1])
    data = [batch(8, 4, 2)]
    with pytest.raises(ValueError, match=r"expected a single key") as info:
        fnlit.fit(train, states, data, max_epochs=1, progress=False)
    note = r"fnlit\.fit: the state is an ensemble's stacked state \(2 members.*fnlit\.ensemble\(step, 2\)"
    assert any(re.search(note, n) for n in getattr(info.value, "__notes__", []))
    fnlit.fit(ensemble(train, 2), states, data, max_epochs=1, progress=False)  # as the note says


def test_ensemble_counts_the_examples_of_a_batch_past_its_member_dimension():
    from fnlit.data import batch_size_of

    step = hand_step(mlp())
    assert ensemble(step, 2, in_dims=(-3, -2)).examples((torch.zeros(2, 16, 8), torch.zeros(2, 16))) == 16
    assert ensemble(step, 2, in_dims=0).examples((torch.zeros(2),)) == 1  # one value a member: one example each
    shared = {"y": torch.zeros(16), "meta": torch.zeros(7)}
    with pytest.warns(UserWarning, match="different leading dimensions"):  # (16 and 7: both warn)
        assert ensemble(step, 2).examples(shared) == batch_size_of(shared) == 16  # one batch for all: as any batch


def test_an_in_dims_beyond_a_batch_tensors_dimensions_is_refused_naming_the_leaf():
    # in_dims=1 for a 1-D leaf was taken modulo its dimensions (dimension 0): the stacking check passed and
    # evaluate counted examples along the wrong dimension, before vmap's error without the leaf's name.
    step = hand_step(mlp())
    states = ensemble_states(mlp, fnlit.optim.sgd(0.1), seeds=[0, 1])
    data = {"x": torch.randn(16, 2, 8), "y": torch.randint(0, 4, (2,))}
    refused = r"in_dims=1\) maps the members along dimension 1 of batch\['y'\], a tensor of shape \(2,\), which has no dimension 1"
    with pytest.raises(ValueError, match=refused):
        ensemble(step, 2, in_dims=1)(states, data)
    with pytest.raises(ValueError, match=refused):
        ensemble(step, 2, in_dims=1).examples(data)
    with pytest.raises(ValueError, match=r"dimension -2 of batch\[1\], a tensor of shape \(2,\)"):
        ensemble(step, 2, in_dims=(0, -2)).examples((torch.zeros(2, 16, 8), torch.zeros(2)))


def test_an_in_dims_off_the_batchs_structure_or_on_a_number_is_refused_by_fnlit_not_by_vmaps_wrapper():
    # vmap's own errors named fnlit's internal wrapper and in_dims=(0, ...) the user never wrote (the first one
    # dumping the whole TrainState's structure)
    inner = hand_step(mlp())

    def step(state, batch):
        new, metrics = inner(state, (batch["x"], batch["y"]))
        return new, {**metrics, "w": batch.get("w", 1.0)}

    states = ensemble_states(mlp, fnlit.optim.sgd(0.1), seeds=[0, 1])
    x, y = batch()
    data = {"x": torch.stack([x, x]), "y": torch.stack([y, y])}
    off = r"in_dims=\(0, 0\)\) expected in_dims with the batch's structure .*'x': \(2, 16, 8\)"
    with pytest.raises(ValueError, match=off):
        ensemble(step, 2, in_dims=(0, 0))(states, data)
    with pytest.raises(ValueError, match=r"in_dims=0\) maps the members along dimension 0 of batch\['w'\], of type float"):
        ensemble(step, 2, in_dims=0)(states, {**data, "w": 0.5})
    _, metrics = ensemble(step, 2, in_dims={"x": 0, "y": 0, "w": None})(states, {**data, "w": 0.5})  # as the fix says
    assert metrics["w"] == 0.5 and metrics["loss"].shape == (2,)


def test_accumulate_around_an_ensemble_of_per_member_batches_says_to_put_it_inside():
    # accumulate split dimension 0, the members: the error blamed the user's (4, 16, 8) batch as (2, 16, 8).
    states = ensemble_states(mlp, fnlit.optim.sgd(0.1), seeds=[0, 1, 2, 3])
    xs = torch.stack([batch(seed=i)[0] for i in range(4)])
    ys = torch.stack([batch(seed=i)[1] for i in range(4)])
    with pytest.raises(ValueError, match=r"splits the batch along dimension 0, which holds the members.*Put accumulate inside"):
        fnlit.accumulate(ensemble(hand_step(mlp()), 4, in_dims=0), 2)(states, (xs, ys))
    # the order it gives works: each member as its own accumulate run on its own batch (the reference)
    step = fnlit.accumulate(hand_step(mlp()), 2)
    got, _ = ensemble(step, 4, in_dims=0)(states, (xs, ys))
    for i in range(4):
        alone, _ = step(unstack_state(states, i), (xs[i], ys[i]))
        assert_trees_close(unstack_state(got, i).params, alone.params)


class _Ema(nn.Module):  # a buffer updated in place by the forward, unknown to fnlit beforehand
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("ema", torch.zeros(2))

    def forward(self, x):
        out = self.lin(x)
        if self.training:
            self.ema.mul_(0.9).add_(0.1 * out.detach().mean(0))
        return out


def test_a_vmapped_step_leaves_a_buffer_the_forward_updates_in_place_alone():
    model = _Ema()
    step = fnlit.train_step(model, lambda m, b: m(b).pow(2).mean())
    torch.manual_seed(0)
    tx = fnlit.optim.sgd(0.1)
    states = stack_states([fnlit.TrainState.create(_Ema(), tx, seed=i) for i in range(2)])
    new, _ = assert_pure(ensemble(step, 2), states, torch.randn(4, 3))  # the inputs' buffers unchanged
    assert not torch.equal(new.buffers["ema"], states.buffers["ema"])  # the update is in the new state


def test_float16_amp_members_follow_their_own_loss_scale_as_alone():
    # Member 0 starts at an overflowing scale (backs off, skips), member 1 at a small one (grows): each
    # follows the scale, skips and params it has trained alone (the unscale has a batching rule now, and
    # the overflow flag is per member).
    data = [batch(24, seed=i) for i in range(4)]
    model = mlp()
    step = fnlit.amp(hand_step(model), torch.float16)
    tx = fnlit.optim.sgd(0.05)
    members = [
        fnlit.TrainState.create(model, tx, seed=0).replace(scaler=fnlit.transforms.init_loss_scale(s, growth_interval=2))
        for s in (2.0**30, 2.0**4)
    ]
    alone = []
    for state in members:
        trail = []
        for i in range(6):
            state, m = step(state, data[i % 4])
            trail.append((state.scaler.scale.item(), m["grads_finite"].item()))
        alone.append((state, trail))
    stacked, trails = stack_states(members), []
    run = ensemble(step, 2)
    for i in range(6):
        stacked, m = run(stacked, data[i % 4])
        trails.append((stacked.scaler.scale.tolist(), m["grads_finite"].tolist()))
    for j, (state, trail) in enumerate(alone):
        assert [(s[j], f[j]) for s, f in trails] == trail
        assert_trees_close(unstack_state(stacked, j).params, state.params, rtol=1e-4, atol=1e-5)
    assert alone[0][1][0] == (2.0**29, 0.0) and alone[1][1][1] == (2.0**5, 1.0)  # the two paths differ


def test_a_batch_not_stacked_over_the_members_names_n():
    stacked = ensemble_states(mlp, fnlit.optim.sgd(0.1), seeds=[0, 1, 2])
    x, y = batch()
    with pytest.raises(ValueError, match=r"n=3, in_dims=0\) expected the batch's tensors stacked over the 3 members.*\(2, 16, 8\)"):
        ensemble(hand_step(mlp()), 3, in_dims=0)(stacked, (torch.stack([x, x]), torch.stack([y, y, y])))
    # Any in_dims prefix: the inputs stacked along dimension 1, one of them over 2 members (vmap named no members).
    with pytest.raises(ValueError, match=r"in_dims=\(1, None\)\) expected .* 3 members .*\(16, 2, 8\) \(member dimension 1\)"):
        ensemble(hand_step(mlp()), 3, in_dims=(1, None))(stacked, (torch.stack([x, x], 1), y))


def test_numbers_assigned_as_hyperparameters_stack_and_step_as_their_tensors():
    # optax's idiom, hyperparams["learning_rate"] = 0.05, on members before stacking and on a stacked state:
    # stack_states raised AttributeError ('float' has no dtype), the ensemble step vmap's in_dim error.
    tx = fnlit.optim.sgd(0.1, momentum=0.9)

    def with_lr(state, lr):
        return state.replace(opt_state=state.opt_state._replace(hyperparams={**state.opt_state.hyperparams, "learning_rate": lr}))

    members = [with_lr(fnlit.TrainState.create(mlp(), tx, seed=i), lr) for i, lr in enumerate((0.05, 0.07))]
    step, data = hand_step(mlp()), batch()
    stacked = stack_states(members)
    assert stacked.opt_state.hyperparams["learning_rate"].tolist() == pytest.approx([0.05, 0.07])
    stacked, _ = ensemble(step, 2)(stacked, data)
    for i, member in enumerate(members):  # the reference: each member alone, where the number works already
        alone, _ = step(member, data)
        assert_trees_close(unstack_state(stacked, i).params, alone.params, rtol=1e-5, atol=1e-6)
    # One number for every member of a stacked state: each steps with it, and the next state holds (n,) tensors.
    plain = [fnlit.TrainState.create(mlp(), tx, seed=i) for i in range(2)]
    same = with_lr(stack_states(plain), 0.01)
    assert unstack_state(same, 1).opt_state.hyperparams["learning_rate"] == 0.01
    after, _ = ensemble(step, 2)(same, data)
    assert after.opt_state.hyperparams["learning_rate"].tolist() == pytest.approx([0.01, 0.01])
    for i, member in enumerate(plain):
        alone, _ = step(with_lr(member, 0.01), data)
        assert_trees_close(unstack_state(after, i).params, alone.params, rtol=1e-5, atol=1e-6)


def test_a_0d_tensor_assigned_as_a_stacked_states_rate_steps_every_member_with_it():
    # hyperparams["learning_rate"] = torch.tensor(0.05) on a stacked state failed with vmap's in_dim error for a
    # 0-d tensor, while the number 0.05 worked. Reference: each member alone, stepped with that rate (where a
    # 0-d tensor is the form the optimizer holds it in), for 3 steps.
    tx = fnlit.optim.sgd(0.1, momentum=0.9)

    def with_lr(state, lr):
        return state.replace(opt_state=state.opt_state._replace(hyperparams={**state.opt_state.hyperparams, "learning_rate": lr}))

    plain = [fnlit.TrainState.create(mlp(), tx, seed=i) for i in range(2)]
    stacked = with_lr(stack_states(plain), torch.tensor(0.05))
    step, data = hand_step(mlp()), batch()
    stacked, _ = run(ensemble(step, 2), stacked, data, 3)
    assert stacked.opt_state.hyperparams["learning_rate"].tolist() == pytest.approx([0.05, 0.05])
    for i, member in enumerate(plain):
        alone, _ = run(step, with_lr(member, torch.tensor(0.05)), data, 3)
        assert_trees_close(unstack_state(stacked, i).params, alone.params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), np.float32(-0.1)])
def test_a_negative_or_nan_number_assigned_to_an_ensembles_rate_is_refused_as_for_one_state(bad):
    # A single state's update refuses it; the ensemble turned it into a tensor first and trained up the gradient.
    tx = fnlit.optim.sgd(0.1)
    single = fnlit.TrainState.create(mlp(), tx, seed=0)
    single.opt_state.hyperparams["learning_rate"] = bad
    with pytest.raises(ValueError, match=r"learning_rate.*>= 0"):
        hand_step(mlp())(single, batch())
    stacked = ensemble_states(mlp, tx, seeds=[0, 1])
    stacked.opt_state.hyperparams["learning_rate"] = bad
    with pytest.raises(ValueError, match=r"hyperparams\['learning_rate'\] >= 0"):
        ensemble(hand_step(mlp()), 2)(stacked, batch())
    members = [fnlit.TrainState.create(mlp(), tx, seed=i) for i in range(2)]
    members[1].opt_state.hyperparams["learning_rate"] = bad
    with pytest.raises(ValueError, match=r"hyperparams\['learning_rate'\] >= 0"):
        stack_states(members)


def test_a_stacked_hyperparameter_saved_as_a_number_or_a_tensor_restores_into_either_form(tmp_path):
    # A script that assigns one number to a stacked state's rate restores the (n,) tensor its run saved (as a single
    # state's 0-d tensor and number restore into each other); restoring failed both ways ("expected float 0.01").
    tx = fnlit.optim.sgd(0.1)
    stacked = stack_states([fnlit.TrainState.create(mlp(), tx, seed=i) for i in range(2)])
    hyper = stacked.opt_state.hyperparams
    as_number = stacked.replace(opt_state=stacked.opt_state._replace(hyperparams={**hyper, "learning_rate": 0.01}))
    as_tensor = stacked.replace(opt_state=stacked.opt_state._replace(
        hyperparams={**hyper, "learning_rate": torch.tensor([0.01, 0.01])}))
    for saved, like in ((as_tensor, as_number), (as_number, as_tensor)):
        fnlit.save(tmp_path / "s.ckpt", saved)
        got = fnlit.restore(tmp_path / "s.ckpt", like).opt_state.hyperparams["learning_rate"]
        assert type(got) is type(like.opt_state.hyperparams["learning_rate"])
        assert (got.tolist() if isinstance(got, torch.Tensor) else got) == pytest.approx(
            [0.01, 0.01] if isinstance(got, torch.Tensor) else 0.01)
    # members that differ are not one number: named, not flattened into one
    fnlit.save(tmp_path / "d.ckpt", as_tensor.replace(opt_state=as_tensor.opt_state._replace(
        hyperparams={**hyper, "learning_rate": torch.tensor([0.01, 0.02])})))
    with pytest.raises(ValueError, match=r"learning_rate.*expected float"):
        fnlit.restore(tmp_path / "d.ckpt", as_number)


def test_a_numpy_number_assigned_as_a_hyperparameter_stacks_as_the_python_number():
    # stack_states turned Python numbers into tensors but left np.float32 as it was: torch.stack of a NumPy number.
    tx = fnlit.optim.sgd(0.1)
    members = [fnlit.TrainState.create(mlp(), tx, seed=i) for i in range(2)]
    members[1].opt_state.hyperparams["learning_rate"] = np.float32(0.25)
    members[0].opt_state.hyperparams["learning_rate"] = np.float64(0.5)
    stacked = stack_states(members)
    assert stacked.opt_state.hyperparams["learning_rate"].tolist() == [0.5, 0.25]


def test_a_float64_ensemble_holds_its_swept_hyperparameters_in_float64():
    # ensemble_states wrote torch.tensor(value) (float32) into the float64 rates of a float64 model, and a number
    # assigned to a stacked float64 state became float32 tensors: the members stepped with float32-rounded rates.
    tx = fnlit.optim.adamw(1e-3)
    states = ensemble_states(lambda: nn.Linear(3, 1).double(), tx, seeds=[0, 1], learning_rate=[0.1, 1 / 3],
                             weight_decay=[0.1, 0.2])
    hyper = states.opt_state.hyperparams
    assert torch.equal(hyper["learning_rate"], torch.tensor([0.1, 1 / 3], dtype=torch.float64))
    assert torch.equal(hyper["weight_decay"], torch.tensor([0.1, 0.2], dtype=torch.float64))
    member = unstack_state(states, 1)
    member.opt_state.hyperparams["learning_rate"] = 0.1
    stacked = stack_states([unstack_state(states, 0), member])
    assert torch.equal(stacked.opt_state.hyperparams["learning_rate"], torch.tensor([0.1, 0.1], dtype=torch.float64))


def test_unstack_state_refuses_an_index_that_is_not_an_int():
    # unstack_state(st, True) passed the bounds check (True == 1) and t[True] added a dimension: a malformed state.
    states = fnlit.ensemble_states(lambda: torch.nn.Linear(5, 1), fnlit.optim.sgd(0.1), seeds=[0, 1])
    for bad in (True, 1.0):
        with pytest.raises(TypeError, match=r"unstack_state expected an int member index, got (bool True|float 1.0)"):
            fnlit.unstack_state(states, bad)
    with pytest.raises(TypeError, match=r"got Tensor tensor\(True\)"):
        fnlit.unstack_state(states, torch.tensor(True))
    member = fnlit.unstack_state(states, np.int64(1))  # a numpy integer is an index
    assert torch.equal(fnlit.unstack_state(states, torch.tensor(1)).params["weight"], member.params["weight"])  # argmin()
    assert member.params["weight"].shape == (1, 5) and torch.equal(member.params["weight"], states.params["weight"][1])


def _groups(lr_w, lr_b):  # a backbone/head setup: one SGD per parameter group
    opt = fnlit.optim
    return opt.chain(opt.masked(opt.sgd(lr_w, momentum=0.9), lambda p: {k: k == "weight" for k in p}),
                     opt.masked(opt.sgd(lr_b, momentum=0.9), lambda p: {k: k == "bias" for k in p}))


def _torch_trained(seed, build, optimizer, data):
    """The reference: ``build()`` made after ``torch.manual_seed(seed)``, trained on ``data`` (MSE) with
    ``optimizer(module)``, a torch.optim optimizer; its parameters."""
    torch.manual_seed(seed)
    ref = build()
    opt = optimizer(ref)
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        opt.step()
    return dict(ref.named_parameters())


def _torch_groups(seed, lr_w, lr_b, data):
    return _torch_trained(seed, lambda: nn.Linear(4, 2), lambda ref: torch.optim.SGD(
        [{"params": [ref.weight], "lr": lr_w}, {"params": [ref.bias], "lr": lr_b}], lr=lr_w, momentum=0.9), data)


def test_a_sweep_over_an_optimizer_with_several_different_rates_is_refused():
    # Every holder was set to the swept value: the head's rate of 0.1 (or a masked decay) silently became the sweep's.
    opt, linear = fnlit.optim, lambda: nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"tx holds 2 separate learning rates \(0.001, 0.1\).*stack_states"):
        ensemble_states(linear, _groups(1e-3, 1e-1), seeds=[0, 1], learning_rate=[1e-3, 1e-2])
    decay = opt.chain(opt.add_decayed_weights(1e-2, mask=lambda p: {k: k == "weight" for k in p}),
                      opt.adamw(1e-3, weight_decay=0.1))
    with pytest.raises(ValueError, match=r"tx holds 2 separate weight decays \(0.01, 0.1\)"):
        ensemble_states(linear, decay, seeds=[0, 1], weight_decay=[1e-3, 1e-2])
    scheduled = opt.chain(opt.masked(opt.sgd(opt.constant(0.1)), lambda p: {k: k == "weight" for k in p}),
                          opt.masked(opt.sgd(0.1), lambda p: {k: k == "bias" for k in p}))
    with pytest.raises(ValueError, match=r"tx holds 2 separate learning rates \(0.1, a schedule\)"):
        ensemble_states(linear, scheduled, seeds=[0, 1], learning_rate=[1e-3, 1e-2])


def test_per_group_rates_sweep_as_one_when_equal_and_member_by_member_when_not():
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)) for _ in range(3)]
    step = fnlit.train_step(nn.Linear(4, 2), lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    lrs = [1e-2, 5e-2]
    # one rate repeated in both groups: each member trains like torch's SGD with lrs[i] in both groups
    stacked = ensemble_states(lambda: nn.Linear(4, 2), _groups(0.1, 0.1), seeds=[0, 1], learning_rate=lrs)
    # different rates: the error's way, members with their own rates, stacked
    tx = _groups(0.1, 0.1)
    members = []
    for i, lr in enumerate(lrs):
        torch.manual_seed(i)
        member = fnlit.TrainState.create(nn.Linear(4, 2), tx, seed=i)
        member.opt_state[0].inner_state.hyperparams["learning_rate"] = lr
        member.opt_state[1].inner_state.hyperparams["learning_rate"] = 10 * lr
        members.append(member)
    apart = stack_states(members)
    for b in data:
        stacked, _ = ensemble(step, 2)(stacked, b)
        apart, _ = ensemble(step, 2)(apart, b)
    for i, lr in enumerate(lrs):
        assert_trees_close(unstack_state(stacked, i).params, _torch_groups(i, lr, lr, data), rtol=1e-5, atol=1e-6)
        assert_trees_close(unstack_state(apart, i).params, _torch_groups(i, lr, 10 * lr, data), rtol=1e-5, atol=1e-6)


def _bias_free():
    return nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))


def _torch_adamw(seed, lr, data, frozen=()):
    return _torch_trained(seed, _bias_free, lambda ref: torch.optim.AdamW(
        [p for k, p in ref.named_parameters() if k not in frozen], lr=lr, weight_decay=0.01), data)


def test_a_group_whose_rate_no_update_reads_is_left_out_of_a_sweep():
    # An empty group (no-decay params of a bias-free model) or a frozen one: its rate was called "a schedule" and the
    # sweep refused ("2 separate learning rates (0.001, a schedule)").
    opt = fnlit.optim
    nodecay = lambda p: {k: not v for k, v in opt.decay_mask(p).items()}
    empty = opt.chain(opt.masked(opt.adamw(1e-3, weight_decay=0.01), opt.decay_mask),
                      opt.masked(opt.adamw(1e-3, weight_decay=0.0), nodecay))
    first = lambda p: {k: k == "0.weight" for k in p}
    rest = lambda p: {k: not v for k, v in first(p).items()}
    frozen = opt.chain(opt.masked(opt.adamw(1e-3, weight_decay=0.01), rest),
                       opt.masked(opt.adamw(0.5, weight_decay=0.01), first), opt.masked(opt.set_to_zero(), first))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)) for _ in range(3)]
    step = fnlit.train_step(_bias_free(), lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    lrs = [1e-2, 5e-2]
    for tx, off in ((empty, ()), (frozen, ("0.weight",))):
        stacked = ensemble_states(_bias_free, tx, seeds=[0, 1], learning_rate=lrs)
        for b in data:
            stacked, _ = ensemble(step, 2)(stacked, b)
        for i, lr in enumerate(lrs):
            assert_trees_close(unstack_state(stacked, i).params, _torch_adamw(i, lr, data, off), rtol=1e-5, atol=1e-6)


class _Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 2).double()

    def forward(self, x):
        return self.b(self.a(x).double())


def test_one_rate_held_in_float32_and_float64_is_one_rate_and_different_ones_are_printed_apart():
    # hyper_dtype holds 1e-3 as float32 for the float32 group, float64 for the other: refused as "(0.001, 0.001)".
    opt = fnlit.optim
    in_a = lambda p: {k: k.startswith("a.") for k in p}
    in_b = lambda p: {k: not k.startswith("a.") for k in p}
    groups = lambda lr_a, lr_b: opt.chain(opt.masked(opt.adamw(lr_a), in_a), opt.masked(opt.adamw(lr_b), in_b))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g, dtype=torch.float64)) for _ in range(3)]
    step = fnlit.train_step(_Mixed(), lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    lrs = [1e-2, 5e-2]
    stacked = ensemble_states(_Mixed, groups(1e-3, 1e-3), seeds=[0, 1], learning_rate=lrs)
    for b in data:
        stacked, _ = ensemble(step, 2)(stacked, b)
    for i, lr in enumerate(lrs):
        torch.manual_seed(i)
        ref = _Mixed()
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=lr)
        for x, y in data:
            ref_opt.zero_grad()
            torch.nn.functional.mse_loss(ref(x), y).backward()
            ref_opt.step()
        assert_trees_close(unstack_state(stacked, i).params, dict(ref.named_parameters()), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"2 separate learning rates \(0.001, 0.002\)"):
        ensemble_states(_Mixed, groups(1e-3, 2e-3), seeds=[0, 1], learning_rate=lrs)
    # two float64 rates a few ulps of float32 apart are told apart, and shown so (":g" printed "0.001, 0.001")
    wide = opt.chain(opt.masked(opt.adamw(1e-3), in_a), opt.masked(opt.adamw(1.000001e-3), in_b))
    with pytest.raises(ValueError, match=r"2 separate learning rates \(0.001, 0.001000001\)"):
        ensemble_states(lambda: _Mixed().double(), wide, seeds=[0, 1], learning_rate=lrs)


def test_building_the_members_seeds_the_cpu_generator_only_and_leaves_every_generator_as_it_was(monkeypatch):
    # torch.manual_seed inside fork_rng(devices=[]) also reseeded every GPU's generator (queued when CUDA is not
    # initialised), which the fork does not restore: a CUDA run's later draws changed with the last member's seed.
    calls = []
    with monkeypatch.context() as m:
        for mod, fn in ((torch.cuda, "manual_seed_all"), (torch.mps, "manual_seed"), (torch.xpu, "manual_seed_all"),
                        (torch.mtia, "manual_seed_all")):
            m.setattr(mod, fn, lambda seed, _fn=fn: calls.append((_fn, seed)))
            m.setattr(mod, "_is_in_bad_fork", lambda: False)
        models = (mlp, mlp())
        before = torch.get_rng_state()
        built = [ensemble_states(model, fnlit.optim.sgd(0.1), seeds=[7, 8]) for model in models]
        assert calls == [] and torch.equal(torch.get_rng_state(), before)
    for stacked in built:  # each member as built after seeding the CPU generator by hand
        for i, seed in enumerate([7, 8]):
            assert_trees_close(unstack_state(stacked, i).params, solo(seed, fnlit.optim.sgd(0.1)).params, rtol=0, atol=0)


@pytest.mark.parametrize("initialised", [True, False])
def test_a_model_built_on_a_gpu_draws_from_its_generator_seeded_which_is_left_as_it_was(monkeypatch, initialised):
    # No GPU here: a CPU generator stands in for cuda:0's, and the model draws from it as one built on cuda:0 does.
    fake = torch.Generator().manual_seed(123)
    torch.randn(5, generator=fake)  # a state past its initial one: what "as it was" means
    up = [initialised]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: up[0])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "default_generators", (fake,))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=0: fake.get_state())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=0: fake.set_state(state))
    if not initialised:  # lazy init leaves the generator at its seed, no draw taken
        fake.manual_seed(fake.initial_seed())
    before = fake.get_state()

    def build():
        up[0] = True  # the first CUDA op initialises CUDA
        model = nn.Linear(3, 2)
        with torch.no_grad():
            model.bias.copy_(torch.randn(2, generator=torch.cuda.default_generators[0]))
        return model

    stacked = ensemble_states(build, fnlit.optim.sgd(0.1), seeds=[3, 4])
    assert torch.equal(fake.get_state(), before)
    for i, seed in enumerate([3, 4]):  # the reference: both generators seeded by hand
        torch.manual_seed(seed)
        weight = nn.Linear(3, 2).weight
        bias = torch.randn(2, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(stacked.params["weight"][i], weight) and torch.equal(stacked.params["bias"][i], bias)


def test_a_cumulative_batchnorm_in_an_ensemble_is_refused_naming_it_and_the_fix():
    # BatchNorm(momentum=None) divides by float(num_batches_tracked) in a training forward: under vmap this was
    # torch's raw ".item()" RuntimeError. It is a ValueError naming the module and a numeric momentum now, while
    # another read of a value in the step keeps vmap's own error, and evaluation (running statistics) still works.
    def make():
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, momentum=None), nn.Linear(8, 1))

    model = make()
    data = (torch.randn(8, 4), torch.randn(8, 1))
    states = ensemble_states(make, fnlit.optim.sgd(0.1), seeds=[0, 1])
    step = fnlit.train_step(model, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))
    with pytest.raises(ValueError, match=r"BatchNorm1d\(8.*momentum=None.*vmap.*numeric momentum") as info:
        ensemble(step, 2)(states, data)
    assert isinstance(info.value.__cause__, RuntimeError)

    def reads_a_value(state, b):
        return state, {"x": torch.tensor(float(state.params["0.weight"].sum()))}

    with pytest.raises(RuntimeError, match=r"vmap: .*\.item\(\)"):
        ensemble(reads_a_value, 2)(states, data)
    ev = fnlit.eval_step(model, lambda m, b: {"out": m(b[0]).sum()})
    got = ensemble(ev, 2)(states, data)["out"]
    for i in range(2):  # the reference: torch's own module, in eval mode, with member i's tensors
        member = unstack_state(states, i)
        want = torch.func.functional_call(model.eval(), {**member.params, **member.buffers}, (data[0],)).sum()
        torch.testing.assert_close(got[i], want.detach())


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # (torch's, before it fails)
def test_a_sparse_gradient_is_refused_naming_the_parameter():
    # vmap of a step differentiating nn.Embedding(sparse=True) failed inside torch's backward: "Could not run
    # 'aten::view' with arguments from the 'SparseCPU' backend". Refused now as fnlit.data_parallel refuses it,
    # naming the parameter and sparse=False; a forward alone (no gradient) still runs.
    def make():
        return nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1))

    model = make()
    data = (torch.tensor([1, 2, 2, 7]), torch.randn(4, 1))
    states = ensemble_states(make, fnlit.optim.sgd(0.1), seeds=[0, 1])
    refused = r"torch\.func\.vmap \(fnlit\.ensemble, .*does not support sparse gradients .*for 0\.weight\. .*sparse=False"
    with pytest.raises(ValueError, match=refused):
        ensemble(fnlit.train_step(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])), 2)(states, data)
    with pytest.raises(ValueError, match=refused):
        fnlit.per_example_grads(lambda p, b: fnlit.apply(model, p, {}, b[0][None])[0].sum(), fnlit.unstack_state(states, 0).params,
                                data)

    def forward(state, b):
        return state, {"out": fnlit.apply(model, state.params, state.buffers, b[0])[0].sum()}

    want = [model_out.sum() for model_out in (
        torch.func.functional_call(model, fnlit.unstack_state(states, i).params, (data[0],)) for i in (0, 1))]
    _, metrics = ensemble(forward, 2)(states, data)
    torch.testing.assert_close(metrics["out"], torch.stack(want).detach())
