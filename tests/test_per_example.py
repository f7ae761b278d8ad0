import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_trees_close, batch, mlp
from torch.utils._python_dispatch import TorchDispatchMode

import fnlit
from fnlit.ensemble import per_example_grads
from fnlit.optim import chain, dp_sgd_aggregate, sgd


def loss_of(model):
    def loss_fn(params, example):
        x, y = example
        logits, _ = fnlit.apply(model, params, {}, x.unsqueeze(0))
        return F.cross_entropy(logits, y.unsqueeze(0))

    return loss_fn


def test_per_example_grads_equal_one_example_at_a_time():
    model = mlp()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = batch(n=8)
    losses, grads = per_example_grads(loss_of(model), params, (x, y))
    assert losses.shape == (8,) and grads["0.weight"].shape == (8, 16, 8)
    for i in range(8):  # the reference: plain autograd on the nn.Module, one example at a time
        model.zero_grad()
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        loss.backward()
        torch.testing.assert_close(losses[i], loss.detach(), rtol=1e-6, atol=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-6, atol=1e-6)


def test_per_example_grads_with_aux_and_chunks():
    params = {"w": torch.tensor([1.0, 2.0])}
    xs = torch.randn(6, 2)
    (losses, aux), grads = per_example_grads(lambda p, x: ((p["w"] @ x) ** 2, x.sum()), params, xs, has_aux=True, chunk_size=4)
    torch.testing.assert_close(losses, (xs @ params["w"]) ** 2)
    torch.testing.assert_close(aux, xs.sum(1))
    torch.testing.assert_close(grads["w"], 2 * (xs @ params["w"])[:, None] * xs)


def test_dp_clipping_and_averaging_match_a_hand_computation():
    tx = dp_sgd_aggregate(l2_norm_clip=1.0, noise_multiplier=0.0)
    g = {"a": torch.tensor([[3.0], [0.1], [0.0]]), "b": torch.tensor([[4.0, 0.0], [0.0, 0.0], [0.0, 2.0]])}
    out, state = tx.update(g, tx.init(g))
    # example norms: 5 -> scaled by 1/5; 0.1 -> kept; 2 -> scaled by 1/2
    torch.testing.assert_close(out["a"], torch.tensor([(0.6 + 0.1 + 0.0) / 3]))
    torch.testing.assert_close(out["b"], torch.tensor([0.8 / 3, 1.0 / 3]))
    assert not torch.equal(state.rng, tx.init(g).rng)  # the key advances


def test_dp_aggregate_keeps_each_leafs_dtype():
    # A bfloat16 leaf next to a float32 one: the same hand computation as above, each result in its own dtype.
    tx = dp_sgd_aggregate(l2_norm_clip=1.0, noise_multiplier=0.0)
    g = {"a": torch.tensor([[3.0], [0.1], [0.0]]), "b": torch.tensor([[4.0, 0.0], [0.0, 0.0], [0.0, 2.0]]).bfloat16()}
    out, _ = tx.update(g, tx.init(g))
    assert out["a"].dtype == torch.float32 and out["b"].dtype == torch.bfloat16
    torch.testing.assert_close(out["a"], torch.tensor([(0.6 + 0.1 + 0.0) / 3]))
    torch.testing.assert_close(out["b"], torch.tensor([0.8 / 3, 1.0 / 3]).bfloat16())
    params = {"a": torch.zeros(1), "b": torch.zeros(2).bfloat16()}
    full = chain(dp_sgd_aggregate(1.0, 0.0), sgd(1.0))  # the fused kernel takes one dtype per group
    new, _ = fnlit.optim.step(full, g, full.init(params), params)
    assert new["b"].dtype == torch.bfloat16
    torch.testing.assert_close(new["b"], -torch.tensor([0.8 / 3, 1.0 / 3]).bfloat16())


def test_dp_noise_has_the_calibrated_std_and_is_deterministic():
    tx = dp_sgd_aggregate(l2_norm_clip=2.0, noise_multiplier=1.5, seed=3)
    zeros = {"w": torch.zeros(4, 20_000)}  # batch of 4 zero gradients: the output is the noise / 4
    out, state = tx.update(zeros, tx.init(zeros))
    std = (out["w"] * 4).std().item()
    assert abs(std - 3.0) < 0.1, std
    assert abs((out["w"] * 4).mean().item()) < 0.1
    again, _ = tx.update(zeros, tx.init(zeros))
    assert torch.equal(out["w"], again["w"])  # same key, same noise
    nxt, _ = tx.update(zeros, state)
    assert not torch.equal(out["w"], nxt["w"])  # the next key, new noise


def test_dp_sgd_step_through_apply_gradients():
    model = mlp()
    tx = chain(dp_sgd_aggregate(l2_norm_clip=0.5, noise_multiplier=0.0), sgd(0.1))
    state = fnlit.TrainState.create(model, tx, seed=0)
    data = batch(n=8)

    def dp_step(state, batch):
        losses, grads = per_example_grads(loss_of(model), state.params, batch)
        return state.apply_gradients(grads), {"loss": losses.mean()}  # the optimizer sees per-example grads

    new, _ = fnlit.testing.assert_no_host_sync(dp_step, state, data)
    _, grads = per_example_grads(loss_of(model), state.params, data)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], 1).norm(dim=1)
    expected = {k: state.params[k] - 0.1 * (g / torch.clamp(norms / 0.5, min=1).view(-1, *[1] * (g.dim() - 1))).mean(0) for k, g in grads.items()}
    fnlit.testing.assert_trees_close(new.params, expected, rtol=1e-6, atol=1e-7)


def test_dp_errors():
    with pytest.raises(ValueError, match="l2_norm_clip > 0"):
        dp_sgd_aggregate(0.0, 1.0)
    with pytest.raises(TypeError, match=r"needs its seed.*secrets\.randbits"):
        dp_sgd_aggregate(1.0, 1.0)  # a default seed would be a noise sequence anyone can subtract
    with pytest.raises(TypeError, match="expected an int seed"):
        dp_sgd_aggregate(1.0, 1.0, seed="0")
    tx = dp_sgd_aggregate(1.0, 1.0, seed=0)
    with pytest.raises(ValueError, match=r"per-example gradients.*fnlit\.per_example_grads"):
        tx.update({"a": torch.ones(3), "b": torch.ones(4)}, tx.init({}))
    with pytest.raises(RuntimeError, match="eagerly only"):
        torch.func.vmap(lambda g: tx.update({"a": g}, tx.init({}))[0]["a"])(torch.ones(2, 3, 1))


def test_dp_refuses_an_infinite_clip_or_noise():
    # dp_sgd_aggregate(1.0, inf, seed=0) and (inf, 1.0) were built, and every update was inf or NaN.
    with pytest.raises(ValueError, match=r"dp_sgd_aggregate expected noise_multiplier >= 0 and finite, got inf instead"):
        dp_sgd_aggregate(1.0, float("inf"), seed=0)
    with pytest.raises(ValueError, match=r"dp_sgd_aggregate expected l2_norm_clip > 0 and finite, got inf instead"):
        dp_sgd_aggregate(float("inf"), 1.0, seed=0)
    with pytest.raises(ValueError, match=r"expected noise_multiplier >= 0 and finite, got nan"):
        dp_sgd_aggregate(1.0, float("nan"), seed=0)


def test_dp_refuses_a_clip_or_noise_that_is_not_a_number():
    # dp_sgd_aggregate("1", 0.0) failed with Python's "'<' not supported between 'int' and 'str'", and
    # noise_multiplier=True was taken as 1 (the other transforms refuse a bool where a number goes).
    with pytest.raises(TypeError, match=r"dp_sgd_aggregate expected l2_norm_clip to be a float or a 0-d tensor, got '1' \(str\)"):
        dp_sgd_aggregate("1", 0.0)
    with pytest.raises(TypeError, match=r"expected noise_multiplier to be a float or a 0-d tensor, got True \(bool\)"):
        dp_sgd_aggregate(1.0, True, seed=0)
    with pytest.raises(TypeError, match=r"expected l2_norm_clip to be a float or a 0-d tensor, got tensor\(\[1\., 1\.\]\)"):
        dp_sgd_aggregate(torch.ones(2), 0.0)
    # an int clip, as a float: (0.2 * [3, 4] + [0.3, 0.4]) / 2 by hand (norms 5, clipped to 1, and 0.5)
    tx = dp_sgd_aggregate(1, 0)
    out = tx.update({"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}, tx.init({}))[0]["w"]
    torch.testing.assert_close(out, torch.tensor([0.45, 0.6]))


def test_per_example_grads_under_float16_amp_is_refused_and_bfloat16_runs():
    model = mlp()
    tx = chain(dp_sgd_aggregate(l2_norm_clip=0.5, noise_multiplier=0.0), sgd(0.1))

    def dp_step(state, batch):
        losses, grads = per_example_grads(loss_of(model), state.params, batch)
        return state.apply_gradients(grads), {"loss": losses.mean()}

    state = fnlit.TrainState.create(model, tx, seed=0, loss_scale="dynamic")
    with pytest.raises(ValueError, match=r"cannot run under fnlit.amp\(dtype=torch.float16\).*bfloat16"):
        fnlit.amp(dp_step, dtype=torch.float16)(state, batch(n=8))
    new, _ = fnlit.amp(dp_step, dtype=torch.bfloat16)(fnlit.TrainState.create(model, tx, seed=0), batch(n=8))
    assert int(new.step) == 1

    def hand_dp_step(state, batch):  # what per_example_grads stands for, written out: refused alike (it failed
        # inside functorch with "your tensor may have escaped from inside a function being vmapped")
        fn = fnlit.value_and_grad(loss_of(model))
        losses, grads = torch.func.vmap(fn, in_dims=(None, 0))(state.params, batch)
        return state.apply_gradients(grads), {"loss": losses.mean()}

    with pytest.raises(ValueError, match=r"Per-example gradients .*cannot run under fnlit.amp\(dtype=torch.float16\)"):
        fnlit.amp(hand_dp_step, dtype=torch.float16)(state, batch(n=8))

    def closure_dp_step(state, batch):  # the examples reach value_and_grad through a closure, not as arguments
        def one(x, y):
            return fnlit.value_and_grad(lambda p: loss_of(model)(p, (x, y)))(state.params)

        losses, grads = torch.func.vmap(one)(*batch)
        return state.apply_gradients(grads), {"loss": losses.mean()}

    with pytest.raises(ValueError, match=r"Per-example gradients .*cannot run under fnlit.amp\(dtype=torch.float16\)"):
        fnlit.amp(closure_dp_step, dtype=torch.float16)(state, batch(n=8))
    # compiled, where value_and_grad cannot see the vmap's level: per_example_grads refuses it itself
    with pytest.raises(ValueError, match=r"Per-example gradients .*cannot run under fnlit.amp\(dtype=torch.float16\)"):
        fnlit.compile(fnlit.amp(dp_step, dtype=torch.float16), mode="eager")(state, batch(n=8))


def test_an_input_gradient_penalty_in_a_float16_ensemble_of_per_member_batches_is_not_refused():
    # An R1-style penalty differentiates the loss with respect to the batch input, which fnlit.ensemble's vmap
    # batches (in_dims=0): that is not a per-example vmap of the step's own. Reference: member 0 trained alone.
    from fnlit.ensemble import ensemble, ensemble_states, unstack_state

    model = mlp()

    def r1_step(state, b):
        x, y = b

        def loss_fn(params):
            data_loss = lambda xx: F.cross_entropy(fnlit.apply(model, params, {}, xx)[0], y)  # noqa: E731
            loss, gx = fnlit.value_and_grad(data_loss)(x)
            return loss + 0.1 * (gx**2).sum()

        loss, grads = fnlit.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    x, y = batch(n=8)
    states = ensemble_states(mlp, sgd(0.1), seeds=[0, 1], loss_scale="dynamic")
    got, _ = ensemble(fnlit.amp(r1_step, torch.float16), 2, in_dims=0)(states, (torch.stack([x, x]), torch.stack([y, y])))
    alone, _ = fnlit.amp(r1_step, torch.float16)(unstack_state(states, 0), (x, y))
    assert_trees_close(unstack_state(got, 0).params, alone.params, rtol=1e-3, atol=1e-4)


def test_dp_noise_uses_every_bit_of_its_key():
    # Two keys with the same low 32 bits: torch's CPU generator would seed them alike (its mt19937 keeps 32 bits),
    # so two steps of one run would cancel each other's noise once their keys met that way.
    from fnlit.optim._privacy import DPAggregateState

    lo, hi = 5, 5 + (1 << 32)
    seeded = [torch.randn(8, generator=torch.Generator().manual_seed(s)) for s in (lo, hi)]
    assert torch.equal(*seeded)  # the reference: what 32-bit seeding gives
    tx = dp_sgd_aggregate(l2_norm_clip=1.0, noise_multiplier=1.0, seed=0)
    zeros = {"w": torch.zeros(2, 1000)}
    a, b = (tx.update(zeros, DPAggregateState(torch.tensor(k)))[0]["w"] for k in (lo, hi))
    assert not torch.equal(a, b) and abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < 0.2


def test_dp_noise_of_a_complex_leaf_is_complex_with_the_calibrated_std():
    tx = dp_sgd_aggregate(l2_norm_clip=1.0, noise_multiplier=2.0, seed=0)
    zeros = {"w": torch.zeros(2, 20_000, dtype=torch.complex64)}
    out, _ = tx.update(zeros, tx.init(zeros))
    noise = out["w"] * 2  # batch of 2 zero gradients
    assert noise.dtype == torch.complex64
    # The clipping norm counts the real and imaginary parts as coordinates: each gets the full std (sigma * C).
    for part in (noise.real, noise.imag):
        assert abs(part.std().item() - 2.0) < 0.05



def _reference_noise(key, shapes):
    """The reference: the noise of one key as documented, numpy's PCG64 seeded with the key's 64 bits, one
    standard_normal call per leaf in leaf order (a complex leaf: a trailing pair of real and imaginary parts)."""
    rng = np.random.default_rng(int(key) & ((1 << 64) - 1))
    out = []
    for shape, dtype in shapes:
        real = dtype.to_real() if dtype.is_complex else dtype
        z = torch.from_numpy(rng.standard_normal(shape + ((2,) if dtype.is_complex else ()),
                                                 dtype=np.float64 if real == torch.float64 else np.float32))
        out.append(torch.view_as_complex(z) if dtype.is_complex else z)
    return out


# leaves of every kind of noise: float32 (bfloat16's too: its work dtype), float64, complex64, 0-d, empty
_DP_LEAVES = [((3, 5), torch.float32), ((7,), torch.float64), ((), torch.float32), ((2, 3), torch.complex64),
              ((0, 4), torch.float32), ((4,), torch.bfloat16), ((3,), torch.complex128)]


def _dp_noise_steps(device, steps=2):
    """The noise of ``steps`` updates (a batch of one zero gradient, clip 1, noise 1: the output is the noise)."""
    tx = dp_sgd_aggregate(l2_norm_clip=1.0, noise_multiplier=1.0, seed=3)
    grads = [torch.zeros((1, *shape), dtype=dtype, device=device) for shape, dtype in _DP_LEAVES]
    state, outs = tx.init(grads), []
    for _ in range(steps):
        out, state = tx.update(grads, state)
        outs.append(out)
    return outs


def test_dp_noise_is_one_draw_per_leaf_of_the_documented_generator():
    # The noise is drawn into one buffer now (one copy to a GPU): still the numbers one draw per leaf gave.
    key = fnlit.random.key(3)
    for out in _dp_noise_steps("cpu"):
        expected = _reference_noise(key, _DP_LEAVES)
        assert [z.shape for z in out] == [e.shape for e in expected]
        for (_, dtype), z, e in zip(_DP_LEAVES, out, expected):
            assert z.dtype == dtype and torch.equal(z, e.to(dtype)), dtype
        key = fnlit.random.next_key(key)


class _HostToDevice(TorchDispatchMode):
    """Counts the copies from a CPU tensor to another device, the blocking ones (the host waits) apart."""

    def __init__(self):
        super().__init__()
        self.copies, self.blocking = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func is torch.ops.aten._to_copy.default and args[0].is_cpu and device is not None \
                and torch.device(device).type != "cpu":
            self.copies += 1
            self.blocking += not kwargs.get("non_blocking", False)
        return func(*args, **kwargs)


def test_dp_noise_reaches_the_device_in_one_copy_per_step_without_blocking():
    # 'meta' stands in for 'cuda'. The noise was copied over leaf by leaf, each copy blocking (a pageable copy to a
    # GPU waits for it): 7 host syncs a step here.
    watch = _HostToDevice()
    with watch:
        outs = _dp_noise_steps("meta", steps=3)
    assert all(z.is_meta and z.dtype == dtype for out in outs for z, (_, dtype) in zip(out, _DP_LEAVES))
    assert watch.blocking == 0 and watch.copies == 3, (watch.blocking, watch.copies)


@pytest.mark.cuda
def test_dp_noise_on_a_gpu_is_the_cpu_noise_without_blocking_copies():
    watch = _HostToDevice()
    with watch:
        outs = _dp_noise_steps("cuda")
    assert watch.blocking == 0 and watch.copies == 2, (watch.blocking, watch.copies)
    for out, on_cpu in zip(outs, _dp_noise_steps("cpu")):
        for z, c in zip(out, on_cpu):
            assert z.is_cuda and torch.equal(z.cpu(), c)


def _forgot_apply_step(model, per_example):
    """A step whose loss runs the module itself (``model(x)``) instead of fnlit.apply on the params it is given."""

    def step(state, batch):
        x, y = batch
        if per_example:
            loss_fn = lambda p, ex: F.cross_entropy(model(ex[0].unsqueeze(0)), ex[1].unsqueeze(0))  # noqa: E731
            losses, grads = per_example_grads(loss_fn, state.params, batch)
            grads = {k: g.mean(0) for k, g in grads.items()}
            return state.apply_gradients(grads), {"loss": losses.mean()}
        loss, grads = fnlit.value_and_grad(lambda p: F.cross_entropy(model(x), y))(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    return step


@pytest.mark.parametrize("route", ["per_example_grads", "per_example_grads compiled", "compiled", "ensemble"])
def test_a_loss_that_never_reads_its_params_is_refused_on_the_torch_func_path_as_eagerly(route):
    # torch.func gave all-zero gradients for it (DP-SGD trained on its noise alone, a compiled step never moved the
    # params), where the eager value_and_grad refuses it. The reference: what the eager path says.
    model = mlp()
    state = fnlit.TrainState.create(model, sgd(0.1), seed=0)
    data = batch(n=4)
    eager = r"does not depend on the arguments it differentiates"
    with pytest.raises(RuntimeError, match=eager):  # the eager path, uncompiled
        _forgot_apply_step(model, per_example=False)(state, data)
    step = _forgot_apply_step(model, per_example=route.startswith("per_example"))
    if route.endswith("compiled"):
        step = fnlit.compile(step)
    elif route == "ensemble":
        step, state = fnlit.ensemble(step, 2), fnlit.ensemble_states(model, sgd(0.1), seeds=[0, 1])
    elif route == "per_example_grads":
        with pytest.raises(RuntimeError, match=eager):  # a constant loss, alone
            per_example_grads(lambda p, ex: ex[0].sum(), state.params, data)
    with pytest.raises(RuntimeError, match=eager):
        step(state, data)


def test_per_example_grads_of_a_loss_reaching_some_params_or_one_argnum_give_zeros_for_the_others():
    # Not refused: a tensor the loss does not reach gets a zero gradient, as eagerly. Reference: torch.func.
    params = {"w": torch.tensor([1.0, 2.0]), "unused": torch.ones(3)}
    xs = torch.randn(5, 2)
    losses, grads = per_example_grads(lambda p, x: (p["w"] @ x) ** 2, params, xs)
    want = torch.func.vmap(torch.func.grad(lambda w, x: (w @ x) ** 2), in_dims=(None, 0))(params["w"], xs)
    torch.testing.assert_close(grads["w"], want)
    assert torch.equal(grads["unused"], torch.zeros(5, 3))
    vg = fnlit.value_and_grad(lambda a, b: (b**2).sum(), argnums=(0, 1))  # reads only its second argument
    _, (ga, gb) = torch.func.vmap(vg, in_dims=(None, 0))(params, xs)
    assert torch.equal(ga["w"], torch.zeros(5, 2)) and torch.equal(gb, 2 * xs)


def test_dp_refuses_a_batch_gradient_whose_leaves_share_a_leading_size():
    # nn.Linear(3, 4)'s batch gradient (weight (4, 3), bias (4,)) passed the common-leading-size check, its 4 output
    # rows taken for 4 examples; sgd failed afterwards with advice that did not fit.
    model = torch.nn.Linear(3, 4)
    state = fnlit.TrainState.create(model, chain(dp_sgd_aggregate(1.0, 0.0), sgd(0.1)), seed=0)
    x, y = torch.randn(6, 3), torch.randint(0, 4, (6,))
    loss_fn = lambda p, ex: F.cross_entropy(fnlit.apply(model, p, {}, ex[0].unsqueeze(0))[0], ex[1].unsqueeze(0))  # noqa: E731
    _, batch_grads = fnlit.value_and_grad(lambda p: F.cross_entropy(fnlit.apply(model, p, {}, x)[0], y))(state.params)
    with pytest.raises(ValueError, match=r"look like one batch's gradients.*fnlit\.per_example_grads"):
        state.apply_gradients(batch_grads)
    tx = dp_sgd_aggregate(1.0, 0.0)
    with pytest.raises(ValueError, match=r"but w has shape \(4, 2\) for a param of shape \(3,\)"):
        tx.update({"w": torch.ones(4, 2)}, tx.init({}), {"w": torch.zeros(3)})
    # Per-example gradients still pass; the reference: each example's gradient by plain autograd, clipped to norm 1,
    # summed and divided by the batch size, by hand.
    _, grads = per_example_grads(loss_fn, state.params, (x, y))
    new = state.apply_gradients(grads)
    total = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    for i in range(6):
        gs = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters()))
        norm = torch.sqrt(sum((g**2).sum() for g in gs))
        for (k, _), g in zip(model.named_parameters(), gs):
            total[k] += g / max(1.0, norm.item())
    for k, p in model.named_parameters():
        torch.testing.assert_close(new.params[k], p.detach() - 0.1 * total[k] / 6, rtol=1e-6, atol=1e-7)


def test_a_none_among_the_differentiated_params_stays_none_under_vmap_as_eagerly():
    # value_and_grad keeps a None leaf eagerly (None in the gradients too); under per_example_grads and in an
    # ensemble step torch.func failed ("Thing passed to transform API must be Tensor, got NoneType").
    params = {"w": torch.tensor([1.0, 2.0]), "n": None}
    xs = torch.randn(5, 2)
    f = lambda p, x: (p["w"] @ x) ** 2  # noqa: E731
    assert fnlit.value_and_grad(f)(params, xs[0])[1]["n"] is None  # the eager path's result
    (losses, aux), grads = per_example_grads(lambda p, x: (f(p, x), x.sum()), params, xs, has_aux=True, chunk_size=2)
    want = torch.func.vmap(torch.func.grad_and_value(lambda w, x: (w @ x) ** 2), in_dims=(None, 0))(params["w"], xs)
    assert grads.keys() == {"w", "n"} and grads["n"] is None
    torch.testing.assert_close(grads["w"], want[0])
    torch.testing.assert_close(losses, want[1])
    torch.testing.assert_close(aux, xs.sum(1))

    model = torch.nn.Linear(2, 1)
    x, y = torch.randn(4, 2), torch.randn(4, 1)

    def step(state, batch):
        def loss_fn(p):
            return F.mse_loss(fnlit.apply(model, {k: p[k] for k in state.params}, {}, batch[0])[0], batch[1])

        loss, g = fnlit.value_and_grad(loss_fn)({**state.params, "none": None})
        assert g["none"] is None
        return state.apply_gradients({k: g[k] for k in state.params}), {"loss": loss}

    states = fnlit.ensemble_states(model, sgd(0.1), seeds=[0, 1])
    new, _ = fnlit.ensemble(step, 2)(states, (x, y))
    for i in range(2):  # the reference: plain autograd on each member's params, one SGD step
        w, b = (states.params[k][i].clone().requires_grad_() for k in ("weight", "bias"))
        gw, gb = torch.autograd.grad(F.mse_loss(F.linear(x, w, b), y), (w, b))
        torch.testing.assert_close(new.params["weight"][i], w.detach() - 0.1 * gw)
        torch.testing.assert_close(new.params["bias"][i], b.detach() - 0.1 * gb)


def test_per_example_grads_of_a_loss_with_dropout_says_what_to_do():
    # vmap's own error advised its randomness flags, which per_example_grads does not take; the docstring's
    # contract is that dropout cannot run per example and that the model is applied with train=False instead
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 4))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss_fn(params, example, train):
        x, y = example
        logits, _ = fnlit.apply(model, params, {}, x.unsqueeze(0), rng=fnlit.random.key(0), train=train)
        return F.cross_entropy(logits, y.unsqueeze(0))

    with pytest.raises(RuntimeError, match=r"per_example_grads .* refuses random operations .* train=False"):
        per_example_grads(lambda p, ex: loss_fn(p, ex, True), params, batch(n=4))
    _, grads = per_example_grads(lambda p, ex: loss_fn(p, ex, False), params, batch(n=4))  # the advice works
    assert grads["0.weight"].shape == (4, 16, 8)
