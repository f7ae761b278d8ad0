import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_trees_close, assert_trees_equal, batch, hand_step, mlp
from torch import nn

import fnlit


@pytest.mark.parametrize("k", [2, 4])
def test_accumulate_matches_the_full_batch_step(k):
    model = mlp()
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0)
    step = hand_step(model)
    full, acc = state, state
    for i in range(3):
        data = batch(16, seed=i)
        full, m_full = step(full, data)
        acc, m_acc = fnlit.accumulate(step, k)(acc, data)
    assert int(acc.step) == 3
    assert_trees_close(acc.params, full.params)
    assert_trees_close(acc.opt_state, full.opt_state)
    torch.testing.assert_close(m_acc["loss"], m_full["loss"])


def test_accumulated_gradient_is_what_clipping_sees():
    model = mlp()
    tx = fnlit.optim.chain(fnlit.optim.clip_by_global_norm(0.05), fnlit.optim.sgd(0.5))
    state = fnlit.TrainState.create(model, tx, seed=0)
    full, _ = hand_step(model)(state, batch())
    acc, _ = fnlit.accumulate(hand_step(model), 4)(state, batch())
    assert_trees_close(acc.params, full.params)


def test_accumulate_threads_batchnorm_buffers_in_order():
    model = mlp(bn=True)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.0), seed=0)
    x, y = batch(16)
    new, _ = fnlit.accumulate(hand_step(model), 4)(state, (x, y))
    ref = copy.deepcopy(model).train()
    for chunk in x.chunk(4):  # the reference: the module itself sees the micro-batches in order
        ref(chunk)
    for name, b in ref.named_buffers():
        torch.testing.assert_close(new.buffers[name], b, rtol=1e-6, atol=1e-7)


def test_accumulate_gives_each_micro_batch_its_own_key():
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5))
    masks = []

    def step(state, x):
        def loss_fn(params):
            out, _ = fnlit.apply(model, params, state.buffers, x, rng=state.rng)
            masks.append(out == 0)
            return out.sum()

        loss, grads = fnlit.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.0), seed=0)
    x = torch.randn(2, 8).repeat(2, 1)  # both micro-batches hold the same examples
    new, _ = fnlit.accumulate(step, 2)(state, x)
    assert not torch.equal(masks[0], masks[1])
    assert torch.equal(new.rng, fnlit.random.next_key(state.rng))


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.unused = mlp(), nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.body(x)


def test_accumulate_with_a_parameter_the_loss_ignores():
    model = _WithUnused()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1, momentum=0.9), seed=0)
    full, acc = state, state
    for i in range(2):
        full, _ = hand_step(model)(full, batch(seed=i))
        acc, _ = fnlit.accumulate(hand_step(model), 2)(acc, batch(seed=i))
    assert_trees_close(acc.params, full.params)
    assert torch.equal(acc.params["unused"], torch.ones(3))


def _loss_of(model, state, x, y):
    return lambda p: F.cross_entropy(fnlit.apply(model, p, state.buffers, x)[0], y)


def _doubling(model, state, b):
    x, y = b
    loss, grads = fnlit.value_and_grad(_loss_of(model, state, x, y))(state.params)
    return state.apply_gradients({k: 2 * g for k, g in grads.items()}), {"loss": loss}


def _sam(model, state, b):  # the gradient at params + rho * g / |g| is applied
    x, y = b
    _, g1 = fnlit.value_and_grad(_loss_of(model, state, x, y))(state.params)
    norm = torch.sqrt(sum((g**2).sum() for g in g1.values()))
    perturbed = {k: p + 0.05 * g1[k] / norm for k, p in state.params.items()}
    loss, g2 = fnlit.value_and_grad(_loss_of(model, state, x, y))(perturbed)
    return state.apply_gradients(g2), {"loss": loss}


def _two_losses(model, state, b):
    x, y = b
    loss, g1 = fnlit.value_and_grad(_loss_of(model, state, x, y))(state.params)
    _, g2 = fnlit.value_and_grad(lambda p: 1e-2 * sum((v**2).sum() for v in p.values()))(state.params)
    return state.apply_gradients({k: g1[k] + g2[k] for k in g1}), {"loss": loss}


def _saliency_first(model, state, b):  # an input gradient for a metric, then the param gradients
    x, y = b
    _, gx = fnlit.value_and_grad(lambda xx: _loss_of(model, state, xx, y)(state.params))(x)
    loss, g = fnlit.value_and_grad(_loss_of(model, state, x, y))(state.params)
    return state.apply_gradients(g), {"loss": loss, "saliency": gx.abs().sum()}


def _saliency_after(model, state, b):
    x, y = b
    loss, g = fnlit.value_and_grad(_loss_of(model, state, x, y))(state.params)
    _, gx = fnlit.value_and_grad(lambda xx: _loss_of(model, state, xx, y)(state.params))(x)
    _, g_reg = fnlit.value_and_grad(lambda p: sum((v**2).sum() for v in p.values()))(state.params)
    reg_norm = torch.sqrt(sum((v**2).sum() for v in g_reg.values()))
    return state.apply_gradients(g), {"loss": loss, "saliency": gx.abs().sum(), "reg_norm": reg_norm}


def _clamped_in_place(model, state, b):  # hand clipping, elementwise, on value_and_grad's own tensors
    x, y = b
    loss, g = fnlit.value_and_grad(_loss_of(model, state, x, y))(state.params)
    for t in g.values():
        t.clamp_(-0.01, 0.01)
    return state.apply_gradients(g), {"loss": loss}


def _params_and_inputs(model, state, b):
    x, y = b
    loss, (g, gx) = fnlit.value_and_grad(lambda p, xx: _loss_of(model, state, xx, y)(p), argnums=(0, 1))(state.params, x)
    return state.apply_gradients(g), {"loss": loss, "saliency": gx.abs().sum()}


@pytest.mark.parametrize(
    "kind", [_doubling, _sam, _two_losses, _saliency_first, _saliency_after, _params_and_inputs, _clamped_in_place]
)
@pytest.mark.parametrize("k", [2, 3, 4])
def test_accumulate_applies_the_mean_of_what_each_micro_batch_applies(kind, k):
    """Reference: each micro-batch stepped alone from the same state; with sgd(lr=1) the mean of their
    params is params - (mean applied gradient), and their metrics average to the accumulated metrics."""
    from fnlit.transforms.accumulate import split_batch

    model = mlp()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(1.0), seed=0)
    step = lambda s, b: kind(model, s, b)  # noqa: E731
    data = batch(12)
    alone = [step(state, m) for m in split_batch(data, k)]
    want = {n: sum(s.params[n] for s, _ in alone) / k for n in state.params}
    for _ in range(2):  # the second step runs with the in-place path already planned in the first
        new, metrics = fnlit.accumulate(step, k)(state, data)
        assert_trees_close(new.params, want, rtol=1e-5, atol=1e-6)
        for name in alone[0][1]:
            torch.testing.assert_close(metrics[name], sum(m[name] for _, m in alone) / k)


def test_accumulate_reruns_micro_batch_zero_when_the_step_changes_what_it_applies_between_steps():
    """One accumulate step object, a step that applies its gradients unchanged, then doubled: micro-batch 0
    guesses from the previous step, finds the guess wrong, reruns, and still equals the reference."""
    from fnlit.transforms.accumulate import split_batch

    model = mlp()
    calls, mode = [], ["plain"]

    def step(state, b):
        calls.append(mode[0])
        return (_doubling if mode[0] == "double" else lambda m, s, bb: hand_step(m)(s, bb))(model, state, b)

    acc = fnlit.accumulate(step, 4)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(1.0), seed=0)
    for i, m in enumerate(["plain", "plain", "double", "double", "plain", "double", "plain", "double"]):
        mode[0] = m
        data = batch(12 if m == "double" else 16, seed=i)
        alone = [step(state, mb) for mb in split_batch(data, 4)]
        want = {n: sum(s.params[n] for s, _ in alone) / 4 for n in state.params}
        calls.clear()
        state, metrics = acc(state, data)
        assert_trees_close(state.params, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(metrics["loss"], sum(m_["loss"] for _, m_ in alone) / 4)
        # A wrong guess (a doubled step after a plain one) reruns micro-batch 0; after two, no more guesses.
        assert len(calls) == (5 if i in (2, 5) else 4)


def test_accumulate_rejects_a_step_that_changes_what_it_applies_between_micro_batches():
    model = mlp()
    seen = []

    def fickle(state, b):  # applies its gradients unchanged in micro-batch 0 only
        x, y = b
        loss, grads = fnlit.value_and_grad(_loss_of(model, state, x, y))(state.params)
        seen.append(None)
        if len(seen) > 1:
            grads = {n: 2 * g for n, g in grads.items()}
        return state.apply_gradients(grads), {"loss": loss}

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    with pytest.raises(ValueError, match=r"value_and_grad call #1 unchanged.*micro-batch 1 applied other tensors.*optimizer"):
        fnlit.accumulate(fickle, 2)(state, batch())


def test_accumulate_rejects_gradients_changed_in_place_in_a_later_micro_batch_only():
    """Micro-batch 0 applies value_and_grad's tensors unchanged (so they become the accumulator); a later
    micro-batch scales them in place, which would scale the earlier micro-batches' share too."""
    model = mlp()
    seen = []

    def fickle(state, b):
        x, y = b
        loss, grads = fnlit.value_and_grad(_loss_of(model, state, x, y))(state.params)
        seen.append(None)
        if len(seen) > 1:
            torch._foreach_mul_(list(grads.values()), 0.5)
        return state.apply_gradients(grads), {"loss": loss}

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    with pytest.raises(ValueError, match=r"changed the gradients of its value_and_grad call #1 in place\s+in micro-batch 1.*out of place"):
        fnlit.accumulate(fickle, 2)(state, batch())


def test_accumulate_of_a_bfloat16_loss_with_k_not_a_power_of_two():
    from fnlit.transforms.accumulate import split_batch

    model = mlp()

    def step(state, b):
        x, y = b
        loss_fn = lambda p: (fnlit.apply(model, p, state.buffers, x)[0] - F.one_hot(y, 4)).abs().mean()  # noqa: E731
        loss, g = fnlit.value_and_grad(loss_fn)(state.params)
        dtypes.append(loss.dtype)
        return state.apply_gradients(g), {"loss": loss}

    dtypes = []
    step = fnlit.amp(step, torch.bfloat16)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(1.0), seed=0)
    data = batch(24)
    alone = [step(state, m)[0].params for m in split_batch(data, 3)]
    new, _ = fnlit.accumulate(step, 3)(state, data)
    assert set(dtypes) == {torch.bfloat16}  # the loss backpropagated is a bfloat16 tensor
    for n, p in state.params.items():  # the applied gradients: sgd(lr=1) moved params by exactly them
        torch.testing.assert_close(p - new.params[n], p - sum(a[n] for a in alone) / 3, rtol=1e-2, atol=1e-5)


def test_accumulate_averages_vector_and_nested_metrics_elementwise():
    from fnlit.transforms.accumulate import split_batch

    model = mlp()

    def step(state, b):
        state, metrics = hand_step(model)(state, b)
        counts = torch.bincount(b[1], minlength=4).float()
        return state, {**metrics, "per_class": counts, "parts": {"n": counts.sum(), "pair": (counts[0], 2.0)}, "tag": "x"}

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    data = batch(16)
    alone = [step(state, m)[1] for m in split_batch(data, 4)]
    _, metrics = fnlit.accumulate(step, 4)(state, data)
    torch.testing.assert_close(metrics["per_class"], sum(m["per_class"] for m in alone) / 4)
    torch.testing.assert_close(metrics["parts"]["n"], sum(m["parts"]["n"] for m in alone) / 4)
    torch.testing.assert_close(metrics["parts"]["pair"][0], sum(m["parts"]["pair"][0] for m in alone) / 4)
    assert metrics["parts"]["pair"][1] == 2.0 and metrics["tag"] == "x"
    assert metrics["per_class"].shape == (4,)

    def ragged(state, b):  # a metric whose shape follows the data
        state, metrics = hand_step(model)(state, b)
        return state, {**metrics, "seen": torch.unique(b[1])}

    with pytest.raises(ValueError, match=r"metric 'seen' has a different shape in each.*reduce them in the step"):
        fnlit.accumulate(ragged, 4)(state, (data[0], torch.tensor([0] * 4 + [0, 1, 2, 3] + [1] * 8)))


def test_accumulate_with_k_1_is_the_step_itself_dropout_included():
    model = mlp(dropout=0.5)
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0)
    a, ma = hand_step(model)(state, batch())
    b, mb = fnlit.accumulate(hand_step(model), 1)(state, batch())
    assert_trees_equal(a.params, b.params)
    assert torch.equal(ma["loss"], mb["loss"]) and torch.equal(a.rng, b.rng)


def test_split_batch_matches_chunk():
    from fnlit.transforms.accumulate import split_batch

    x, y = torch.randn(8, 3), torch.arange(8)
    ref = list(zip(x.chunk(4), y.chunk(4)))
    for kind in (tuple, list):
        parts = split_batch(kind((x, y)), 4)
        assert len(parts) == 4 and all(type(p) is kind for p in parts)
        assert all(torch.equal(p[0], r[0]) and torch.equal(p[1], r[1]) for p, r in zip(parts, ref))
    parts = split_batch({"x": x, "tag": "a"}, 4)  # non-tensor leaves are shared
    assert [p["tag"] for p in parts] == ["a"] * 4 and all(torch.equal(p["x"], r[0]) for p, r in zip(parts, ref))
    assert split_batch((), 3) == [(), (), ()]


def test_accumulate_errors():
    with pytest.raises(ValueError, match="positive int k, got 0"):
        fnlit.accumulate(lambda s, b: (s, {}), 0)
    model = mlp()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    with pytest.raises(ValueError, match=r"of 10 examples into 4 equal micro-batches.*divisible by 4"):
        fnlit.accumulate(hand_step(model), 4)(state, batch(10))


def _fp16_reference(model, data, steps, init_scale, growth_interval, lr, k=1):
    """torch.amp.GradScaler + autocast(float16) + torch.optim.SGD: the plain PyTorch loop (with k > 1,
    PyTorch's accumulation recipe: ``scaler.scale(loss / k).backward()`` per micro-batch)."""
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    scales = []
    for i in range(steps):
        x, y = data[i % len(data)]
        opt.zero_grad()
        for xm, ym in zip(x.chunk(k), y.chunk(k)):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(ref(xm), ym)
            scaler.scale(loss / k if k > 1 else loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return ref, scales


@pytest.mark.parametrize("k", [1, 4])
def test_fp16_scale_trajectory_and_params_match_grad_scaler(k):
    model = mlp()
    data = [batch(16, seed=i) for i in range(4)]
    init_scale, interval, lr, steps = 2.0**30, 3, 0.05, 50
    ref, ref_scales = _fp16_reference(model, data, steps, init_scale, interval, lr, k)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(lr), seed=0)
    state = state.replace(scaler=fnlit.transforms.init_loss_scale(init_scale, growth_interval=interval))
    step = fnlit.amp(hand_step(model), dtype=torch.float16)
    if k > 1:
        step = fnlit.accumulate(step, k)
    scales, finite = [], []
    for i in range(steps):
        state, metrics = step(state, data[i % len(data)])
        scales.append(float(state.scaler.scale))
        finite.append(float(metrics["grads_finite"]))
    assert scales == ref_scales
    assert 0.0 in finite and 1.0 in finite  # both skipped and applied steps happened
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state.params[name], p, rtol=1e-5, atol=1e-6)


def test_fp16_overflow_skips_the_step_bitwise():
    model = mlp()
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0, loss_scale=2.0**30)
    step = fnlit.amp(hand_step(model), dtype=torch.float16)
    new, metrics = step(state, batch())
    assert float(metrics["grads_finite"]) == 0.0
    assert_trees_equal(new.params, state.params)
    assert_trees_equal(new.opt_state, state.opt_state)
    assert float(new.scaler.scale) == 2.0**29
    for _ in range(30):  # the scale backs off until the gradients are finite, then steps proceed
        new, metrics = step(new, batch())
    assert float(metrics["grads_finite"]) == 1.0
    assert not torch.equal(new.params["0.weight"], state.params["0.weight"])
    assert new.params["0.weight"].dtype == torch.float32


def test_fp16_without_scaler_and_bad_dtype_are_errors():
    model = mlp()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    with pytest.raises(ValueError, match="loss_scale='dynamic'"):
        fnlit.amp(hand_step(model), dtype=torch.float16)(state, batch())
    with pytest.raises(ValueError, match="bfloat16 or torch.float16, got torch.float64"):
        fnlit.amp(hand_step(model), dtype=torch.float64)


def _metrics(model, b):  # Lightning's validation_step for a classifier
    logits = model(b[0])
    return {"loss": F.cross_entropy(logits, b[1]), "acc": (logits.argmax(-1) == b[1]).float().mean()}


def _torch_autocast_metrics(model, b, dtype):
    """The reference: a plain eval loop under torch.autocast, as Lightning runs validation_step at a mixed precision."""
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        return _metrics(model, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_amp_of_an_eval_step_runs_it_under_autocast_and_returns_its_metrics(dtype):
    # It failed unpacking the metrics dict as (state, metrics) ("not enough values to unpack"; with float16 "needs
    # dynamic loss scaling"), so fnlit validated in float32 where Lightning autocasts validation_step.
    model = mlp()
    state = fnlit.TrainState.create(model, fnlit.optim.adam(1e-2), seed=0)  # no loss scaler: evaluation needs none
    ev = fnlit.amp(fnlit.eval_step(model, _metrics), dtype)
    b = batch(64)
    got, want = ev(state, b), _torch_autocast_metrics(copy.deepcopy(model), b, dtype)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k
    assert not torch.equal(fnlit.eval_step(model, _metrics)(state, b)["loss"], want["loss"])  # float32 differs
    b2 = batch(32, seed=1)
    second = _torch_autocast_metrics(copy.deepcopy(model), b2, dtype)
    means = fnlit.evaluate(ev, state, [b, b2])
    for k in want:
        assert means[k] == pytest.approx(float(want[k] * 64 + second[k] * 32) / 96, rel=1e-6, abs=1e-6)


def test_fit_validates_with_an_amp_eval_step():
    model = mlp()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.0), seed=0)  # lr 0: the params stay the module's
    seen = []

    class Record(fnlit.callbacks.Callback):
        def on_validation(self, state, metrics):
            seen.append(dict(metrics))

    b = batch(64)
    fnlit.fit(fnlit.amp(hand_step(model)), state, [b], val_data=[b], eval_step=fnlit.amp(fnlit.eval_step(model, _metrics)),
              max_epochs=1, callbacks=[Record()], progress=False)  # fmt: skip
    want = _torch_autocast_metrics(copy.deepcopy(model), b, torch.bfloat16)
    assert seen == [{"val/loss": pytest.approx(float(want["loss"]), abs=1e-6), "val/acc": pytest.approx(float(want["acc"]))}]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_amp_eval_step_called_inside_a_training_step_leaves_its_precision_alone(dtype):
    # Under accumulate (whose frame the eval step's amp shares) the eval step's dtype stayed set: the training
    # forward ran in bfloat16, or float16 amp's "needs dynamic loss scaling" refused a float32 step. Reference: the
    # same training step without the eval metric (torch.autocast regions end with their block).
    model = mlp()
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-3), seed=0)
    ev = fnlit.amp(fnlit.eval_step(model, lambda m, b: {"loss": F.cross_entropy(m(b[0]), b[1])}), dtype)
    dtypes = []

    def train(state, b, with_eval=True):
        before = ev(state, b) if with_eval else {}

        def loss_fn(p):
            out, _ = fnlit.apply(model, p, state.buffers, b[0])
            dtypes.append(out.dtype)
            return F.cross_entropy(out, b[1])

        loss, g = fnlit.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(g), {"loss": loss, **{f"before/{k}": v for k, v in before.items()}}

    got, _ = fnlit.accumulate(train, 2)(state, batch())
    want, _ = fnlit.accumulate(lambda s, b: train(s, b, with_eval=False), 2)(state, batch())
    assert dtypes == [torch.float32] * 4
    assert_trees_equal(got.params, want.params)


def test_an_amp_eval_step_that_raises_inside_a_training_step_leaves_its_precision_alone():
    # The eval step's settings were put back only when it returned: one that raised (and was caught by the training
    # step) left bfloat16 on for the training forward under accumulate. Reference: the same step without it.
    model = mlp()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)

    def failing(state, b):
        fnlit.apply(model, state.params, state.buffers, b[0])
        raise LookupError("no such metric")

    ev, dtypes = fnlit.amp(failing, torch.bfloat16), []

    def train(state, b):
        with contextlib.suppress(LookupError):
            ev(state, b)

        def loss_fn(p):
            out, _ = fnlit.apply(model, p, state.buffers, b[0])
            dtypes.append(out.dtype)
            return F.cross_entropy(out, b[1])

        loss, g = fnlit.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(g), {"loss": loss}

    fnlit.accumulate(train, 2)(state, batch())
    assert dtypes == [torch.float32] * 2


@pytest.mark.parametrize("result", [lambda s: (s,), lambda s: (s, {}, {}), lambda s: torch.tensor(0.0), lambda s: ({}, s)])
def test_amp_refuses_a_step_returning_neither_state_and_metrics_nor_metrics(result):
    state = fnlit.TrainState.create(mlp(), fnlit.optim.sgd(0.1), seed=0)
    with pytest.raises(TypeError, match=r"fnlit.amp takes a training step .* or an evaluation step .*but the step returned a"):
        fnlit.amp(lambda s, b: result(s))(state, batch())


def test_fp16_amp_refuses_a_training_step_before_its_forward_without_a_scaler():
    model = mlp()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)

    def step(state, b):  # a teacher's forward first: the refusal comes at value_and_grad, before its own forward
        fnlit.apply(model, state.params, state.buffers, b[0])
        return hand_step(model)(state, b)

    with pytest.raises(ValueError, match="loss_scale='dynamic'"):
        fnlit.amp(step, dtype=torch.float16)(state, batch())
    grads = {k: torch.zeros_like(p) for k, p in state.params.items()}
    with pytest.raises(ValueError, match="loss_scale='dynamic'"):  # gradients taken another way: at apply_gradients
        fnlit.amp(lambda s, b: (s.apply_gradients(grads), {}), dtype=torch.float16)(state, batch())

    def sgd_by_hand(s, b):  # neither value_and_grad nor apply_gradients: torch.autograd and replace
        params = {k: p.detach().requires_grad_() for k, p in s.params.items()}
        out, _ = fnlit.apply(model, params, s.buffers, b[0])
        g = torch.autograd.grad(F.cross_entropy(out.float(), b[1]), list(params.values()))
        return s.replace(params={k: p - 0.1 * d for (k, p), d in zip(params.items(), g)}, step=s.step + 1), {}

    with pytest.raises(ValueError, match="loss_scale='dynamic'"):  # never float16 run unscaled, even so
        fnlit.amp(sgd_by_hand, dtype=torch.float16)(state, batch())


def test_bf16_runs_forward_in_bf16_and_keeps_fp32_masters():
    model = mlp()
    seen = []

    def step(state, b):
        def loss_fn(params):
            logits, _ = fnlit.apply(model, params, state.buffers, b[0])
            seen.append(logits.dtype)
            return F.cross_entropy(logits, b[1])

        loss, grads = fnlit.value_and_grad(loss_fn)(state.params)
        assert all(g.dtype == torch.float32 for g in grads.values())
        return state.apply_gradients(grads), {"loss": loss}

    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0)
    new, _ = fnlit.amp(step)(state, batch())
    assert seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in new.params.values())
    assert new.scaler is None


def test_amp_and_accumulate_commute():
    model = mlp()
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0, loss_scale="dynamic")
    step = hand_step(model)
    a, b = state, state
    for i in range(3):
        a, ma = fnlit.amp(fnlit.accumulate(step, 2), dtype=torch.float16)(a, batch(seed=i))
        b, mb = fnlit.accumulate(fnlit.amp(step, dtype=torch.float16), 2)(b, batch(seed=i))
    assert_trees_equal(a, b)
    assert sorted(ma) == sorted(mb) == ["grads_finite", "loss", "loss_scale"]


def test_data_parallel_without_process_group_says_how_to_launch():
    model = mlp()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    with pytest.raises(RuntimeError, match="torchrun.*fnlit.distributed.launch"):
        fnlit.data_parallel(hand_step(model))(state, batch())


def test_accumulate_refuses_a_step_that_applies_two_updates():
    g_model, d_model = nn.Linear(2, 2), nn.Linear(2, 1)
    box = [fnlit.TrainState.create(d_model, fnlit.optim.sgd(0.1), seed=1)]

    def gan_step(state, batch):  # updates a second state (a discriminator) on the side
        d = box[0]
        _, gd = fnlit.value_and_grad(lambda p: fnlit.apply(d_model, p, {}, batch)[0].mean())(d.params)
        box[0] = d.apply_gradients(gd)
        loss, gg = fnlit.value_and_grad(lambda p: fnlit.apply(g_model, p, {}, batch)[0].pow(2).mean())(state.params)
        return state.apply_gradients(gg), {"loss": loss}

    state = fnlit.TrainState.create(g_model, fnlit.optim.sgd(0.1), seed=0)
    gan_step(state, torch.ones(4, 2))  # fine on its own
    with pytest.raises(ValueError, match="apply_gradients twice in one micro-batch"):
        fnlit.accumulate(gan_step, 2)(state, torch.ones(4, 2))


@pytest.mark.parametrize("bad", ["shape", "none"])
@pytest.mark.parametrize("where", [0, 1])
def test_accumulate_refuses_gradients_not_of_the_params_shapes(bad, where):
    # Summed into the accumulator, a (1,) gradient for a (2,) bias broadcast (the bias moved by 3.0 with sgd(1.0))
    # and the optimizer, seeing only the sum, never knew; a None in some micro-batches failed inside torch.
    model = nn.Linear(3, 2)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(1.0), seed=0)

    def step(state, batch):
        g = {k: torch.ones_like(v) for k, v in state.params.items()}
        if int(batch[0, 0]) == 2 * where or len(batch) == 4:  # micro-batch `where` of 2 (rows 0-1, then 2-3)
            g["bias"] = torch.full((1,), 5.0) if bad == "shape" else None
        return state.apply_gradients(g), {}

    data = torch.arange(4.0).reshape(4, 1)
    with pytest.raises(ValueError, match=r"sgd.update expected grad.*at bias"):  # as without accumulate
        step(state, data)
    got = r"tensor of shape \(1,\)" if bad == "shape" else r"None \(torch leaves a parameter's .grad None"
    with pytest.raises(ValueError, match=rf"micro-batch {where}'s differ at bias: expected tensor of shape \(2,\).*got {got}"):
        fnlit.accumulate(step, 2)(state, data)


def test_accumulate_refuses_per_example_gradients():
    # DP-SGD's per-example gradients must be clipped one by one before any sum: averaging them example by
    # example across micro-batches (what accumulate does with what apply_gradients gets) is wrong.
    model = nn.Linear(3, 2)
    tx = fnlit.optim.chain(fnlit.optim.dp_sgd_aggregate(1.0, 0.0), fnlit.optim.sgd(0.1))
    state = fnlit.TrainState.create(model, tx, seed=0)

    def dp_step(state, batch):
        x, y = batch
        per_example = {k: torch.stack([g] * x.shape[0]) for k, g in state.params.items()}  # shape (B, *param)
        return state.apply_gradients(per_example), {}

    data = (torch.randn(4, 3), torch.randn(4, 2))
    dp_step(state, data)  # fine on its own: the optimizer aggregates them
    with pytest.raises(ValueError, match=r"fnlit.accumulate averages .* per-example gradients"):
        fnlit.accumulate(dp_step, 2)(state, data)
    nested = state.replace(params={"lin": dict(state.params)}, opt_state=tx.init({"lin": dict(state.params)}))

    def nested_step(state, batch):
        per_example = fnlit.tree.tree_map(lambda g: torch.stack([g] * batch[0].shape[0]), state.params)
        return state.apply_gradients(per_example), {}

    with pytest.raises(ValueError, match=r"fnlit.accumulate averages .* per-example gradients"):
        fnlit.accumulate(nested_step, 2)(nested, data)
    # Per-example copies of the params made once and differentiated in every micro-batch (the expand trick)
    # take the in-place path, which checks too.
    model = nn.Linear(3, 1, bias=False)
    state = fnlit.TrainState.create(model, tx, seed=0)
    copies = {"weight": state.params["weight"].detach().unsqueeze(0).repeat(2, 1, 1)}  # (B=2, 1, 3)

    def expand_step(state, batch):
        x = batch[0]
        loss, g = fnlit.value_and_grad(lambda p: torch.einsum("bi,boi->bo", x, p["weight"]).pow(2).sum())(copies)
        return state.apply_gradients(g), {"loss": loss}

    with pytest.raises(ValueError, match=r"fnlit.accumulate averages .* per-example gradients"):
        fnlit.accumulate(expand_step, 2)(state, data)


@pytest.mark.parametrize("scale", [1.0, 2.0**10])
def test_float16_gradient_penalty_matches_torchs_gradscaler_recipe(scale):
    # value_and_grad inside value_and_grad under fp16 amp: the inner gradients are unscaled out of place, so
    # the outer backward sees the unscaling (the in-place kernel was invisible to autograd: the penalty's
    # gradient came out `scale` times too large). Reference: torch's AMP recipe for a gradient penalty.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = batch(24)
    got = {}

    def step(state, _):
        def inner(p):
            return F.cross_entropy(fnlit.apply(model, p, state.buffers, x)[0], y)

        def outer(p):
            loss, g = fnlit.value_and_grad(inner)(p)
            return loss + 0.1 * sum((v**2).sum() for v in g.values())

        _, grads = fnlit.value_and_grad(outer)(state.params)
        got.update(grads)
        return state.apply_gradients(grads), {}

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.0), seed=0).replace(scaler=fnlit.transforms.init_loss_scale(scale))
    fnlit.amp(step, torch.float16)(state, None)
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    with torch.autocast("cpu", torch.float16):
        loss = F.cross_entropy(ref(x), y)
    inner = [g * (1.0 / scale) for g in torch.autograd.grad(loss * scale, params, create_graph=True)]
    with torch.autocast("cpu", torch.float16):
        total = loss + 0.1 * sum((v**2).sum() for v in inner)
    want = [g / scale for g in torch.autograd.grad(total * scale, params)]
    for (name, _), w in zip(ref.named_parameters(), want):
        torch.testing.assert_close(got[name], w, rtol=1e-5, atol=1e-6)


def test_float16_accumulate_returns_each_micro_batchs_own_gradient_and_never_changes_it():
    # Under float16 amp the gradients are unscaled micro-batch by micro-batch: the step gets its micro-batch's
    # own gradient (as a GradScaler loop computing it per micro-batch), and apply_gradients no longer scales
    # micro-batch 0's tensors by 1/k and adds the later ones into them (a metric read after it changed).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = batch(24)

    def norm(gs):
        return torch.linalg.vector_norm(torch.stack([g.norm() for g in gs]))

    def step(state, b):
        loss, g = fnlit.value_and_grad(lambda p: F.cross_entropy(fnlit.apply(model, p, state.buffers, b[0])[0], b[1]))(state.params)
        before = norm(g.values())
        new = state.apply_gradients(g)
        return new, {"before": before, "after": norm(g.values())}

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.0), seed=0, loss_scale=1024.0)
    run = fnlit.accumulate(fnlit.amp(step, torch.float16), 2)
    for _ in range(2):  # the first step learns which call is applied
        _, m = run(state, (x, y))
    ref, norms = copy.deepcopy(model), []
    for xm, ym in zip(x.chunk(2), y.chunk(2)):
        with torch.autocast("cpu", torch.float16):
            loss = F.cross_entropy(ref(xm), ym)
        grads = torch.autograd.grad(loss * 1024.0, list(ref.parameters()))
        norms.append(norm([g / 1024.0 for g in grads]))
    torch.testing.assert_close(m["before"], torch.stack(norms).mean(), rtol=1e-4, atol=0)
    assert torch.equal(m["after"], m["before"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_out_of_place_unscale_is_bitwise_torchs_kernel(dtype):
    # The out-of-place unscale (gradients that require grad, or batched ones) against the in-place kernel
    # torch.amp.GradScaler uses, on the same gradients: values, dtype (a 0-d half gradient stayed half in
    # place but became float32 out of place) and the overflow flag.
    from fnlit.transforms._frame import Frame

    scale = torch.tensor(2.0**13)
    for values in ([3.0, -0.5], [float("inf"), 1.0], [7.0]):
        grads = [torch.tensor(values[0], dtype=dtype), torch.tensor(values, dtype=dtype)]
        f = Frame()
        f.set_amp(torch.float16, fnlit.transforms.init_loss_scale(2.0**13), torch.device("cpu"))
        out = [g.clone().requires_grad_() for g in grads]
        f.unscale_(out)
        want, found = [g.clone() for g in grads], torch.zeros(())
        torch._amp_foreach_non_finite_check_and_unscale_(want, found, scale.double().reciprocal().float())
        for o, w in zip(out, want):
            assert o.dtype == w.dtype and torch.equal(o.detach(), w)
        assert torch.equal(f.found_inf, found)


def test_out_of_place_unscale_takes_a_sparse_gradient():
    # A gradient that is differentiated again (a gradient penalty) is unscaled out of place; a sparse one failed
    # its overflow check ("Could not run 'aten::ne.Scalar' with arguments from the 'SparseCPU' backend").
    # References: the dense embedding's gradient at scale 1 and the penalty's gradient through it (autograd), and
    # torch's in-place kernel on the sparse values (GradScaler's) for the overflow flag.
    from fnlit.transforms._frame import Frame

    scale = 2.0**13
    w0, x = torch.randn(10, 3), torch.tensor([1, 2, 2, 7])
    w = w0.clone().requires_grad_()
    (g,) = torch.autograd.grad(scale * F.embedding(x, w, sparse=True).pow(2).sum(), w, create_graph=True)
    f = Frame()
    f.set_amp(torch.float16, fnlit.transforms.init_loss_scale(scale), torch.device("cpu"))
    out = [g]
    f.unscale_(out)
    w_ref = w0.clone().requires_grad_()
    (want,) = torch.autograd.grad(F.embedding(x, w_ref).pow(2).sum(), w_ref, create_graph=True)
    assert out[0].layout is torch.sparse_coo and torch.equal(f.found_inf, torch.zeros(()))
    torch.testing.assert_close(out[0].to_dense(), want, rtol=0, atol=0)
    (penalty,) = torch.autograd.grad(out[0].to_dense().pow(2).sum(), w)
    (penalty_ref,) = torch.autograd.grad(want.pow(2).sum(), w_ref)
    torch.testing.assert_close(penalty.to_dense(), penalty_ref, rtol=1e-6, atol=1e-6)

    bad = torch.sparse_coo_tensor(torch.tensor([[3]]), torch.tensor([[float("inf"), 1.0]]), (5, 2),
                                  check_invariants=True).requires_grad_()
    f = Frame()
    f.set_amp(torch.float16, fnlit.transforms.init_loss_scale(scale), torch.device("cpu"))
    f.unscale_([bad])
    found = torch.zeros(())
    torch._amp_foreach_non_finite_check_and_unscale_([bad.detach()._values().clone()], found, torch.tensor(1 / scale))
    assert torch.equal(f.found_inf, found) and float(found) == 1.0


def test_accumulate_splits_user_dict_batches():
    # Hugging Face's BatchEncoding subclasses collections.UserDict, which optree keeps whole as a leaf: each
    # micro-batch got the whole batch (k times the compute, no memory saved). Reference: a plain dict batch
    # of the same tensors, and the hand count of examples per micro-batch (16 / 4).
    from collections import UserDict

    class Encoding(UserDict):
        def __init__(self, data, note):
            super().__init__(data)
            self.note = note

    model = mlp()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    seen = []

    def step(state, b):
        seen.append((type(b).__name__, getattr(b, "note", None), b["x"].shape[0]))
        return hand_step(model)(state, (b["x"], b["y"]))

    x, y = batch(16)
    got, m_got = fnlit.accumulate(step, 4)(state, Encoding({"x": x, "y": y}, "n"))
    assert seen == [("Encoding", "n", 4)] * 4
    want, m_want = fnlit.accumulate(step, 4)(state, {"x": x, "y": y})
    assert_trees_equal(got.params, want.params)
    assert torch.equal(m_got["loss"], m_want["loss"])
    with pytest.raises(ValueError, match=r"leaf x of 16 examples into 3 equal"):
        fnlit.accumulate(step, 3)(state, Encoding({"x": x, "y": y}, "n"))
    with pytest.raises(ValueError, match=r"leaf enc\['x'\] of 16 examples into 3 equal"):  # the path from the top, as a dict's
        fnlit.accumulate(step, 3)(state, {"enc": Encoding({"x": x, "y": y}, "n")})
    from fnlit.transforms.accumulate import split_batch

    with pytest.raises(ValueError, match=r"leaf enc\[0\] of 16 examples"):  # a key that is not a string
        split_batch({"enc": Encoding({0: x}, "n")}, 3)


def test_amp_autocasts_every_forward_of_the_step_but_not_its_gradient_arithmetic_or_update():
    # Distillation: the teacher's forward runs outside value_and_grad. Reference: a plain PyTorch loop with the
    # step's forwards under torch.autocast, backward and SGD outside it. What the step computes from the
    # gradients stays float32 (a float16 `g @ g` overflowed and zeroed a hand-clipped update).
    torch.manual_seed(0)
    teacher, student = nn.Linear(6, 3), nn.Linear(6, 3)
    x = torch.randn(8, 6)
    ref = copy.deepcopy(student)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        target = teacher(x)
        loss = F.mse_loss(ref(x).float(), target.float())
    loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad

    seen = {}
    t_params = dict(teacher.named_parameters())

    def step(state, x):
        target, _ = fnlit.apply(teacher, t_params, {}, x)
        seen["teacher"] = target.dtype

        def loss_fn(p):
            return F.mse_loss(fnlit.apply(student, p, {}, x)[0].float(), target.float())

        loss, grads = fnlit.value_and_grad(loss_fn)(state.params)
        seen["grad"] = grads["weight"].dtype
        flat = grads["weight"].flatten()
        seen["between"] = (flat @ flat).dtype
        return state.apply_gradients(grads), {"loss": loss}

    def record(updates, state, params=None):  # an update that multiplies: float32 unless autocast reaches it
        seen["update"] = torch.mm(updates["weight"], updates["weight"].T).dtype
        return updates, state

    tx = fnlit.optim.chain(fnlit.optim.GradientTransformation(lambda p: (), record), fnlit.optim.sgd(0.1))
    state = fnlit.TrainState.create(student, tx, seed=0)
    new, _ = fnlit.amp(step, torch.bfloat16)(state, x)
    assert seen == {"teacher": torch.bfloat16, "grad": torch.float32, "between": torch.float32, "update": torch.float32}
    assert_trees_equal(new.params, dict(ref.named_parameters()))


def test_float16_amp_refuses_float16_params_as_grad_scaler_does():
    model = nn.Linear(4, 1).half()
    with pytest.raises(ValueError, match="unscale FP16 gradients"):  # the reference: GradScaler's own refusal
        ref = copy.deepcopy(model)
        scaler = torch.amp.GradScaler("cpu")
        opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        scaler.scale(ref(torch.randn(2, 4).half()).float().sum()).backward()
        scaler.unscale_(opt)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0, loss_scale="dynamic")
    step = fnlit.amp(fnlit.train_step(model, lambda m, b: m(b).float().sum()), torch.float16)
    with pytest.raises(ValueError, match=r"got float16 params \(bias; a model.*Keep the params in float32"):
        step(state, torch.randn(2, 4).half())


def test_float16_amp_takes_a_float16_input_gradient_for_a_metric():
    # Only float16 *params* are refused (GradScaler's rule): a saliency metric on a float16 batch is a gradient
    # taken for a metric. Reference: the params after a plain GradScaler step, and the input gradient unscaled.
    torch.manual_seed(0)
    head = nn.Linear(5, 3)
    xh, y = torch.randn(8, 5).half(), torch.randint(0, 3, (8,))

    def step(state, b):
        def loss_fn(p, xin):
            return F.cross_entropy(fnlit.apply(head, p, {}, xin)[0].float(), b[1])

        loss, (g, gx) = fnlit.value_and_grad(loss_fn, argnums=(0, 1))(state.params, b[0])
        return state.apply_gradients(g), {"loss": loss, "saliency": gx.float().abs().mean()}

    state = fnlit.TrainState.create(head, fnlit.optim.sgd(0.1), seed=0, loss_scale="dynamic")
    new, metrics = fnlit.amp(step, torch.float16)(state, (xh, y))
    ref = copy.deepcopy(head)
    scaler, opt = torch.amp.GradScaler("cpu"), torch.optim.SGD(ref.parameters(), lr=0.1)
    x_ref = xh.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(ref(x_ref).float(), y)
    gx = torch.autograd.grad(scaler.scale(loss), x_ref, retain_graph=True)[0]
    scaler.scale(loss).backward()
    scaler.step(opt)
    assert_trees_equal(new.params, dict(ref.named_parameters()))
    assert torch.equal(metrics["saliency"], (gx * (1 / 65536.0)).float().abs().mean())


def test_float16_amp_judges_each_of_two_updates_in_a_step_on_its_own_gradients_as_grad_scaler():
    # A GAN's alternating step: two apply_gradients, one per model. An overflow in the first update's gradients also
    # skipped the second (found_inf was never reset), one in the second's left the first applied. Reference:
    # torch.amp.GradScaler with an optimizer per model, scaler.step for each, scaler.update() once an iteration.
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(2, 1), "b": nn.Linear(2, 1)})
    x = torch.full((4, 2), 0.01)
    blowups = [(1.0, 1.0), (math.inf, 1.0), (1.0, math.inf), (1.0, 1.0), (math.inf, math.inf), (1.0, 1.0)]

    def loss(p, part, factor):
        return fnlit.apply(model[part], p, {}, x)[0].float().mean() * factor

    def step(state, factors):
        for part, factor in zip("ab", factors):
            sub = {k[2:]: v for k, v in state.params.items() if k.startswith(part + ".")}
            _, g = fnlit.value_and_grad(loss)(sub, part, factor)
            state = state.apply_gradients({k: g[k[2:]] if k.startswith(part + ".") else torch.zeros_like(v)
                                           for k, v in state.params.items()})
        return state, {}

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0, loss_scale=1024.0)
    ref = copy.deepcopy(model)
    opts = {part: torch.optim.SGD(ref[part].parameters(), lr=0.1) for part in "ab"}
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    state = state.replace(scaler=state.scaler._replace(growth_interval=torch.tensor(2, dtype=torch.int32)))
    amp_step = fnlit.amp(step, torch.float16)
    finite = []
    for factors in blowups:
        state, metrics = amp_step(state, factors)
        for part, factor in zip("ab", factors):
            with torch.autocast("cpu", dtype=torch.float16):
                ref_loss = ref[part](x).float().mean() * factor
            scaler.scale(ref_loss).backward()
            scaler.step(opts[part])
            opts[part].zero_grad()
        scaler.update()
        assert_trees_equal(state.params, {k: v.detach() for k, v in ref.named_parameters()})
        assert float(state.scaler.scale) == scaler.get_scale()
        finite.append(float(metrics["grads_finite"]))
    assert finite == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]  # 0.0 when any update of the step was skipped


def test_accumulate_averages_a_metric_that_is_a_number_in_some_micro_batches_and_a_tensor_in_others():
    # sum([]) over an empty selection is the int 0: the mean was the last micro-batch's value, or (tensor first) a
    # misleading shape error. Reference: the mean of the micro-batches' values, by hand.
    model = nn.Linear(2, 1)

    def step(state, batch):
        x, y = batch
        loss, grads = fnlit.value_and_grad(lambda p: F.mse_loss(fnlit.apply(model, p, {}, x)[0], y))(state.params)
        return state.apply_gradients(grads), {"outlier": sum([v for v in y.reshape(-1) if v.abs() > 1.0])}

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    x = torch.ones(4, 2)
    for y, mean in ((torch.tensor([[0.5], [0.5], [6.0], [7.0]]), (0 + 13.0) / 2), (torch.tensor([[6.0], [7.0], [0.5], [0.5]]), 6.5)):
        _, metrics = fnlit.accumulate(step, 2)(state, (x, y))
        assert torch.is_tensor(metrics["outlier"]) and float(metrics["outlier"]) == mean


@pytest.mark.parametrize("as_dict", [False, True])
def test_accumulate_refuses_batch_tensors_of_different_first_sizes(as_dict):
    # A (2,) class weight beside (8, ...) examples was split into [1.] and [9.]: a different loss, silently.
    model = nn.Linear(4, 2)

    def step(state, b):
        x, y, w = (b["x"], b["y"], b["pos_weight"]) if as_dict else b
        f = lambda p: F.binary_cross_entropy_with_logits(fnlit.apply(model, p, {}, x)[0], y, pos_weight=w)  # noqa: E731
        loss, grads = fnlit.value_and_grad(f)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    x, y, w = torch.randn(8, 4), torch.randint(0, 2, (8, 2)).float(), torch.tensor([1.0, 9.0])
    batch = {"x": x, "y": y, "pos_weight": w} if as_dict else (x, y, w)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    sizes = r"pos_weight has 2 rows and x has 8" if as_dict else r"\[0\] has 8 rows and \[2\] has 2"  # (keys sorted)
    with pytest.raises(ValueError, match=r"k=2\) splits every tensor of the batch along its first dimension.*" + sizes
                                         + r": .*through a closure"):
        fnlit.accumulate(step, 2)(state, batch)
    # inside a Hugging Face BatchEncoding (a UserDict) beside a class weight too
    from collections import UserDict

    with pytest.raises(ValueError, match=r"has 8 rows and \[1\] has 2"):
        fnlit.accumulate(step, 2)(state, (UserDict({"input_ids": torch.zeros(8, 5)}), w))


def _spike_step(model):
    vg = fnlit.value_and_grad(lambda p, x, y: F.mse_loss(fnlit.apply(model, p, {}, x)[0], y))

    def step(state, batch):  # skips a loss spike with a host-side branch
        loss, grads = vg(state.params, *batch)
        if loss > 50:
            return state, {"loss": loss}
        return state.apply_gradients(grads), {"loss": loss}

    return step


@pytest.mark.parametrize("where", [0, 1, 3])
def test_accumulate_refuses_a_micro_batch_that_skips_apply_gradients(where):
    # The skipped micro-batch's gradients were in the accumulator anyway (micro-batch 1: a wrong update), or, as
    # the last one, the whole update was lost (state.step stayed 0).
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    y[2 * where] = 100.0  # a spike in micro-batch `where` of 4
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    with pytest.raises(ValueError, match=rf"called apply_gradients in micro-batch \d but not in micro-batch {where} .*torch\.where"):
        fnlit.accumulate(_spike_step(model), 4)(state, (x, y))


def test_accumulate_allows_a_batch_whose_micro_batches_all_skip():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    new, _ = fnlit.accumulate(_spike_step(model), 4)(state, (torch.randn(8, 3), torch.full((8, 1), 100.0)))
    assert int(new.step) == 0
    assert_trees_equal(new.params, state.params)


class _Delta(nn.Module):
    """weight = base + delta: autograd hands both params one gradient tensor; `bias` is reached through .sum()
    only, so its gradient is a stride-0 expand."""

    def __init__(self):
        super().__init__()
        self.base, self.delta = nn.Parameter(torch.randn(2, 3)), nn.Parameter(torch.zeros(2, 3))
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return x @ (self.base + self.delta).T + self.bias.sum()


def _delta_reference(batches, k, scaler=None):
    torch.manual_seed(0)
    ref = _Delta()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for x, y in batches:
        opt.zero_grad()
        for xi, yi in zip(x.tensor_split(k), y.tensor_split(k)):
            with torch.autocast("cpu", dtype=torch.float16, enabled=scaler is not None):
                loss = ((ref(xi).float() - yi) ** 2).mean() / k
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    return dict(ref.named_parameters())


def _editing_step(edit):
    """A _Delta model and a step that edits each gradient in place (``edit``) before applying them."""
    torch.manual_seed(0)
    model = _Delta()
    vg = fnlit.value_and_grad(lambda p, x, y: ((fnlit.apply(model, p, {}, x)[0] - y) ** 2).mean())

    def step(state, batch):
        loss, grads = vg(state.params, *batch)
        for g in grads.values():
            edit(g)
        return state.apply_gradients(grads), {"loss": loss}

    return model, step


@pytest.mark.parametrize("k", [1, 2, 4])
def test_gradients_sharing_memory_are_accumulated_once(k):
    # The step clamps in place (a no-op here), which turns accumulate onto value_and_grad's own gradients: the
    # shared tensor was scaled and added into twice (0.28 off at k=4). Reference: a plain loop into .grad.
    model, step = _editing_step(lambda g: g.clamp_(-100, 100))

    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen)) for _ in range(3)]
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    acc = fnlit.accumulate(step, k)
    for b in batches:
        state, _ = acc(state, b)
    assert_trees_close(state.params, _delta_reference(batches, k), rtol=1e-6, atol=1e-6)


def test_float16_amp_unscales_gradients_sharing_memory_once():
    # The in-place kernel unscaled the shared tensor twice (the update 256x too small) and refused the expanded
    # one ("more than one element of the written-to tensor refers to a single memory location").
    torch.manual_seed(0)
    model = _Delta()
    vg = fnlit.value_and_grad(lambda p, x, y: ((fnlit.apply(model, p, {}, x)[0].float() - y) ** 2).mean())

    def step(state, batch):
        loss, grads = vg(state.params, *batch)
        return state.apply_gradients(grads), {"loss": loss}

    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen))]
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0, loss_scale=256.0)  # (65536 overflows here)
    new, metrics = fnlit.amp(step, torch.float16)(state, batches[0])
    assert float(metrics["grads_finite"]) == 1.0
    ref = _delta_reference(batches, 1, torch.amp.GradScaler("cpu", init_scale=256.0))
    assert_trees_close(new.params, ref, rtol=1e-3, atol=1e-3)


def test_an_ensemble_member_edits_gradients_sharing_memory_once():
    # The traced path (vmap) returned autograd's shared gradient for `base` and `delta`: `g.mul_(0.5)` halved it
    # twice. Reference: a plain loop that halves .grad, for each member.
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen)
    model, step = _editing_step(lambda g: g.mul_(0.5))

    tx = fnlit.optim.sgd(0.1)
    states = fnlit.stack_states([fnlit.TrainState.create(model, tx, seed=i) for i in range(2)])
    new, _ = fnlit.ensemble(step, 2)(states, (x, y))
    ref = copy.deepcopy(model)
    ((ref(x) - y) ** 2).mean().backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * 0.5 * p.grad
    for name, p in ref.named_parameters():
        torch.testing.assert_close(new.params[name][0], p.detach(), rtol=1e-6, atol=1e-7)


class _AutocastProbe(torch.autograd.Function):
    """Identity whose backward records whether autocast was on."""

    seen: list = []

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        _AutocastProbe.seen.append(torch.is_autocast_enabled("cpu"))
        return g


def test_amp_keeps_a_float32_region_of_the_loss_and_runs_no_backward_under_autocast():
    # A head kept in float32 with torch.autocast(enabled=False) inside the loss (PyTorch's recipe) was put back
    # under autocast by fnlit.apply; a gradient penalty's inner backward ran under the outer forward's autocast.
    # Reference: the same loss in a plain loop, and PyTorch's rule that backward passes run outside autocast.
    torch.manual_seed(0)
    body, head = nn.Linear(6, 5), nn.Linear(5, 3)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    dtypes = []

    def part(p, name):
        return {k[len(name) + 1 :]: v for k, v in p.items() if k.startswith(name + ".")}

    def loss_fn(p, penalty):
        h, _ = fnlit.apply(body, part(p, "body"), {}, x)
        h = _AutocastProbe.apply(h)
        with torch.autocast("cpu", enabled=False):
            out, _ = fnlit.apply(head, part(p, "head"), {}, h.float())
        dtypes.append(out.dtype)
        loss = F.cross_entropy(out, y)
        if penalty:
            _, g = fnlit.value_and_grad(lambda q: loss_fn(q, False))(p)
            loss = loss + 0.1 * sum((v**2).sum() for v in fnlit.tree.tree_leaves(g))
        return loss

    def step(state, batch):
        loss, grads = fnlit.value_and_grad(lambda p: loss_fn(p, True))(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    state = fnlit.TrainState.create(nn.ModuleDict({"body": body, "head": head}), fnlit.optim.sgd(0.1), seed=0)
    _AutocastProbe.seen.clear()
    fnlit.amp(step, torch.bfloat16)(state, None)
    assert dtypes == [torch.float32, torch.float32]
    assert _AutocastProbe.seen and not any(_AutocastProbe.seen)


def test_amp_leaves_a_value_and_grad_inside_a_float32_region_in_float32():
    # Inside the loss, a region taken out of autocast calls value_and_grad (an input-gradient penalty): its forward
    # ran under autocast again. Reference: torch.autocast(enabled=False) keeps everything in it float32.
    torch.manual_seed(0)
    head = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    seen = []

    def step(state, batch):
        def loss_fn(p):
            out, _ = fnlit.apply(head, p, {}, x)
            with torch.autocast("cpu", enabled=False):
                def inner(xin):
                    y, _ = fnlit.apply(head, p, {}, xin)
                    seen.append(y.dtype)
                    return y.sum()

                _, gx = fnlit.value_and_grad(inner)(x)
            return out.float().sum() + gx.pow(2).sum()

        loss, grads = fnlit.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    fnlit.amp(step, torch.bfloat16)(fnlit.TrainState.create(head, fnlit.optim.sgd(0.1), seed=0), None)
    assert seen == [torch.float32]


def test_accumulate_refuses_a_batch_with_nothing_to_split_and_splits_numpy_arrays():
    # An unregistered dataclass (or a list of texts) went whole into each of the k micro-batches: k times the
    # work and the memory, BatchNorm and dropout seeing the whole batch k times.
    import dataclasses

    import numpy as np

    from fnlit.transforms.accumulate import split_batch

    @dataclasses.dataclass
    class Pair:
        x: torch.Tensor
        y: torch.Tensor

    with pytest.raises(ValueError, match=r"k=4\) found nothing to split in a batch of type Pair.*register_dataclass"):
        split_batch(Pair(torch.randn(8, 2), torch.randn(8, 1)), 4)
    with pytest.raises(ValueError, match=r"found nothing to split in a batch of type list: its leaves are \['str'\]"):
        split_batch(["a text", "another"], 2)
    x = np.arange(8.0)
    assert [p[0].tolist() for p in split_batch((x,), 4)] == [a.tolist() for a in np.split(x, 4)]  # the reference
    assert split_batch((), 3) == [(), (), ()] and split_batch({"temperature": 0.5}, 2) == [{"temperature": 0.5}] * 2


def test_accumulate_averages_float64_metrics_in_float64():
    # In float32: (0.1 + 1.1) / 2 came back as 0.6000000238418579 (as data_parallel did).
    model = torch.nn.Linear(4, 1).double()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)

    def step(state, batch):
        loss, g = fnlit.value_and_grad(lambda p: fnlit.apply(model, p, {}, batch)[0].pow(2).mean())(state.params)
        return state.apply_gradients(g), {"loss": loss, "m": batch[0, 0]}

    _, metrics = fnlit.accumulate(step, 2)(state, torch.tensor([[0.1] * 4, [1.1] * 4], dtype=torch.float64))
    assert metrics["m"].dtype == torch.float64 and metrics["m"].item() == (0.1 + 1.1) / 2


def _sparse_embedding_batches():
    g = torch.Generator().manual_seed(5)
    return [(torch.tensor([1, 2, 2, 7, 1, 1]), torch.randn(6, 1, generator=g)) for _ in range(3)]  # repeated rows


@pytest.mark.parametrize("k, fp16", [(1, False), (2, False), (3, False), (1, True), (2, True)])
def test_accumulate_and_float16_amp_take_a_sparse_gradient(k, fp16):
    # float16 amp failed unscaling it ("Could not run 'aten::_amp_foreach_non_finite_check_and_unscale_' with
    # arguments from the 'SparseCPU' backend"). Reference: the plain loop (GradScaler's, for float16) over
    # nn.Embedding(sparse=True) with (loss / k).backward() per micro-batch and torch.optim.SGD.
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1))
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=fp16)
    for x, y in _sparse_embedding_batches():
        opt.zero_grad()
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                loss = F.mse_loss(ref(xs).float(), ys) / k
            scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    step = fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]).float(), b[1]))
    step = fnlit.accumulate(fnlit.amp(step, dtype=torch.float16) if fp16 else step, k)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1, momentum=0.9), seed=0,
                                    loss_scale="dynamic" if fp16 else None)
    for b in _sparse_embedding_batches():
        state, _ = step(state, b)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-6, atol=1e-6)
    if fp16:
        assert float(state.scaler.scale) == scaler.get_scale()


class _TwoEmbeddings(nn.Module):
    """Two sparse embeddings summed: autograd hands both the same upstream gradient, which both sparse
    gradients' values view."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Embedding(20, 8, sparse=True), nn.Embedding(20, 8, sparse=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.a(x) + self.b(x))


class _BagOfWords(nn.Module):
    """A sparse embedding summed over the words: for one example its gradient's values are an expand."""

    def __init__(self, dim):
        super().__init__()
        self.emb, self.fc, self.dim = nn.Embedding(50, 8, sparse=True), nn.Linear(8, 3), dim

    def forward(self, x):
        return self.fc(self.emb(x).sum(self.dim))


def _fp16_reference_steps(model, batches, k, lr=1.0):
    """A plain loop at loss scale 1: float16 autocast, (loss / k).backward() per micro-batch, torch.optim.SGD (no
    GradScaler, which unscales values shared by two sparse gradients twice too)."""
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    for x, y in batches:
        opt.zero_grad()
        for xs, ys in zip(x.chunk(k), y.chunk(k)) if k > 1 else [(x, y)]:
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(ref(xs).float().reshape(-1, 3), ys.reshape(-1)) / k
            loss.backward()
        opt.step()
    return dict(ref.named_parameters())


def _fp16_fnlit_steps(model, batches, k, lr=1.0, scale=2.0**16):
    """fnlit's float16 amp at loss scale ``scale`` (no overflow), under accumulate(k)."""
    step = fnlit.train_step(model, lambda m, b: F.cross_entropy(m(b[0]).float().reshape(-1, 3), b[1].reshape(-1)))
    step = fnlit.accumulate(fnlit.amp(step, dtype=torch.float16), k)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(lr), seed=0, loss_scale=scale)
    for b in batches:
        state, metrics = step(state, b)
        assert bool(metrics["grads_finite"])
    return state


@pytest.mark.parametrize("k", [1, 2, 3])
def test_float16_amp_unscales_sparse_gradients_sharing_their_values_once(k):
    # fnlit.amp unscaled the values in place once per gradient: the two embeddings' updates came out 65536x too
    # small (5.96e-7 instead of 0.036). Reference: the plain loop at scale 1.
    torch.manual_seed(0)
    model = _TwoEmbeddings()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 20, (6, 5), generator=g), torch.randint(0, 3, (6, 5), generator=g)) for _ in range(2)]
    want = _fp16_reference_steps(model, batches, k)
    state = _fp16_fnlit_steps(model, batches, k)
    assert (want["a.weight"] - model.a.weight).abs().max() > 1e-2  # the embeddings did move
    for name, p in want.items():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim, x", [(1, torch.tensor([[3, 7, 7, 1, 40, 2]])), (0, torch.tensor([3, 7, 7, 1, 40, 2]))])
def test_float16_amp_takes_a_sparse_gradient_whose_values_are_an_expand(dim, x):
    # A bag of words of one example: the sparse gradient's values are the upstream gradient expanded over the
    # words, and the in-place unscale failed ("more than one element of the written-to tensor refers to a single
    # memory location"). Reference: the plain loop at scale 1.
    torch.manual_seed(0)
    model = _BagOfWords(dim)
    batches = [(x, torch.tensor([1]) if x.dim() == 2 else torch.tensor(1))]
    want = _fp16_reference_steps(model, batches, 1)
    state = _fp16_fnlit_steps(model, batches, 1, scale=2.0**10)  # (65536 overflows the head's float16 gradient)
    for name, p in want.items():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [float("inf"), 1e40, 0.0, float("nan")])
def test_a_loss_scale_no_float32_step_can_use_is_refused(scale):
    # inf, and a finite float past float32's range (which becomes inf in the scaler's float32 tensor), were accepted:
    # every fp16 step then overflowed and was skipped, and backing off inf stays inf, so nothing ever trained.
    # Reference: float32's range (torch.finfo), and the 0 / NaN refusals that were there.
    assert scale != scale or not 0 < scale <= torch.finfo(torch.float32).max
    with pytest.raises(ValueError, match="expected a finite float32 init_scale > 0"):
        fnlit.TrainState.create(nn.Linear(3, 1), fnlit.optim.sgd(0.1), seed=0, loss_scale=scale)


def test_a_growth_interval_past_int32_is_refused_and_the_largest_keeps_the_scale_as_grad_scaler():
    # growth_interval=2**31 (GradScaler takes it: its scale never grows) failed in torch.tensor with "value cannot be
    # converted to type int32 without overflow", naming no argument. Reference: GradScaler's scale over the same steps.
    with pytest.raises(ValueError, match=r"expected growth_interval <= 2\*\*31 - 1 .*got 2147483648.*pass 2\*\*31 - 1"):
        fnlit.transforms.init_loss_scale(2.0**10, growth_interval=2**31)
    model = nn.Linear(3, 1)
    step = fnlit.amp(fnlit.train_step(model, lambda m, b: m(b).float().mean()), dtype=torch.float16)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    largest = fnlit.transforms.init_loss_scale(2.0**10, growth_interval=2**31 - 1)
    # two finite steps short of the interval: the scale grows once, at the largest tracker int32 holds, no overflow
    state = state.replace(scaler=largest._replace(growth_tracker=torch.tensor(2**31 - 3, dtype=torch.int32)))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2**31 - 1)
    scaler.load_state_dict({**scaler.state_dict(), "_growth_tracker": 2**31 - 3})
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    scales = []
    for _ in range(3):
        state, _ = step(state, torch.randn(4, 3))
        scaler.scale(p.sum()).backward()
        scaler.step(opt)
        scaler.update()
        scales.append((float(state.scaler.scale), int(state.scaler.growth_tracker)))
        assert scales[-1] == (scaler.get_scale(), scaler._get_growth_tracker())
    assert scales == [(2.0**10, 2**31 - 2), (2.0**11, 0), (2.0**11, 1)]


def _gan_step():
    """A GAN written over two states, ``step((g_state, d_state), batch)``: it runs unwrapped."""
    g, d = nn.Linear(4, 8), nn.Linear(8, 1)

    def step(states, batch):
        gs, ds = states

        def d_loss(dp):
            fake, _ = fnlit.apply(g, gs.params, gs.buffers, batch)
            out, _ = fnlit.apply(d, dp, ds.buffers, fake.detach())
            return out.mean()

        def g_loss(gp):
            fake, _ = fnlit.apply(g, gp, gs.buffers, batch)
            out, _ = fnlit.apply(d, ds.params, ds.buffers, fake)
            return -out.mean()

        ld, gd = fnlit.value_and_grad(d_loss)(ds.params)
        lg, gg = fnlit.value_and_grad(g_loss)(gs.params)
        return (gs.apply_gradients(gg), ds.apply_gradients(gd)), {"d": ld, "g": lg}

    states = tuple(fnlit.TrainState.create(m, fnlit.optim.sgd(0.1), seed=0) for m in (g, d))
    return step, states


_NOT_ONE_STATE = r"takes a single fnlit\.TrainState as the step's state, got a tuple of TrainState, TrainState.*nn\.ModuleDict"


@pytest.mark.parametrize(
    "who, wrap",
    [
        ("fnlit.accumulate", lambda s: fnlit.accumulate(s, 2)),
        ("fnlit.amp", lambda s: fnlit.amp(s)),
        ("fnlit.compile", lambda s: fnlit.compile(s)),
        ("fnlit.data_parallel", lambda s: fnlit.data_parallel(s)),  # refused before it looks for a process group
        ("fnlit.shard", lambda s: fnlit.shard(s)),
        ("fnlit.donating", lambda s: fnlit.donating(s)),
        ("fnlit.ensemble", lambda s: fnlit.ensemble(s, 2)),
    ],
)
def test_a_step_over_two_states_is_refused_naming_the_one_state_recipe(who, wrap):
    step, states = _gan_step()
    x = torch.randn(4, 4)
    step(states, x)  # unwrapped it runs
    with pytest.raises(TypeError, match=rf"^{who} {_NOT_ONE_STATE}"):
        wrap(step)(states, x)


def test_fit_refuses_a_step_over_two_states():
    step, states = _gan_step()
    with pytest.raises(TypeError, match=rf"^fnlit\.fit {_NOT_ONE_STATE}"):
        fnlit.fit(step, states, [torch.randn(4, 4)] * 2, max_epochs=1, progress=False)


def test_the_one_state_check_takes_a_subclass_and_a_donated_state():
    class MyState(fnlit.TrainState):
        pass

    from fnlit.transforms._frame import require_state

    model = mlp()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    require_state(MyState(**{f: getattr(state, f) for f in ("step", "params", "buffers", "opt_state", "scaler", "rng", "tx")}), "x")
    step = fnlit.donating(hand_step(model))
    step(state, batch())
    with pytest.raises(RuntimeError, match="donated"):  # the donation error still wins
        fnlit.accumulate(step, 2)(state, batch())


def _nt_xent(z1, z2, t=0.5):
    """A contrastive loss with in-batch negatives: it couples every example of the batch with every other."""
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    return F.cross_entropy(z1 @ z2.T / t, torch.arange(z1.shape[0]))


def test_accumulate_computes_a_batch_coupled_loss_per_micro_batch_as_a_torch_loop_does():
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 8, generator=g)
    views = (x, x + 0.3 * torch.randn(8, 8, generator=g))

    def step(state, batch):
        def loss_fn(params):
            z1, _ = fnlit.apply(model, params, state.buffers, batch[0])
            z2, _ = fnlit.apply(model, params, state.buffers, batch[1])
            return _nt_xent(z1, z2)

        loss, grads = fnlit.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.5), seed=0)
    acc, _ = fnlit.accumulate(step, 2)(state, views)

    def torch_update(chunks):  # torch's gradient accumulation: (loss / k).backward() per micro-batch, one SGD step
        ref = copy.deepcopy(model)
        for a, b in chunks:
            (_nt_xent(ref(a), ref(b)) / len(chunks)).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.5 * p.grad
        return dict(ref.named_parameters())

    micro = torch_update([(views[0][:4], views[1][:4]), (views[0][4:], views[1][4:])])
    full = torch_update([views])
    for name in acc.params:
        torch.testing.assert_close(acc.params[name], micro[name].detach())
        assert (acc.params[name] - full[name]).abs().max() > 1e-3  # not the full-batch step: 4 negatives, not 8
    assert "couples the examples of a batch" in fnlit.accumulate.__doc__  # and its docstring says so


@pytest.mark.parametrize("wrap, who", [
    (lambda s: fnlit.accumulate(s, 2), "fnlit.accumulate"),
    (lambda s: fnlit.amp(s), "fnlit.amp"),
    (lambda s: fnlit.data_parallel(s), "fnlit.data_parallel"),
    (lambda s: fnlit.donating(s), "fnlit.donating"),
    (lambda s: fnlit.shard(s), "fnlit.shard"),
    (lambda s: fnlit.ensemble(s, 2), "fnlit.ensemble"),
])
def test_a_transform_given_something_other_than_a_step_function_says_so_at_once(wrap, who):
    # accumulate(4, step), amp(step(state, batch)) or a None were taken, and failed only at the first call, inside the
    # transform ("'int' object is not callable").
    for bad in (None, 4, (torch.zeros(()), {})):
        with pytest.raises(TypeError, match=rf"{who} expected a step function \(state, batch\) -> \(state, metrics\) "
                                            rf"as its first argument, got {type(bad).__name__} .*pass the function itself"):
            wrap(bad)
