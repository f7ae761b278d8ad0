"""fnlit.optim against torch.optim on the same gradient sequences.

Tolerances: float32 params, 100 steps. The fused path and torch.optim's foreach path round
differently (fused kernels vs op-by-op), so parity is checked with rtol=1e-6 relative to the norm of
each parameter (``_close``); elementwise checks use rtol=1e-5, atol=1e-7.
"""

from __future__ import annotations

import contextlib
import math
import re
import weakref

import pytest
import torch

import fnlit.optim as fo
from fnlit.tree import tree_map

STEPS = 100


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fc1.weight": torch.randn(8, 5, generator=g),
        "fc1.bias": torch.randn(8, generator=g),
        "fc2.weight": torch.randn(3, 8, generator=g),
        "fc2.bias": torch.randn(3, generator=g),
    }


def _grads(params: dict[str, torch.Tensor], steps: int = STEPS, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(v.shape, generator=g) for k, v in params.items()} for _ in range(steps)]


def _run_torch(make_opt, params, grad_seq, lr_fn=None):
    ps = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = make_opt(ps)
    for i, grads in enumerate(grad_seq):
        if lr_fn is not None:
            for group in opt.param_groups:
                group["lr"] = lr_fn(i)
        for k, p in ps.items():
            p.grad = grads[k].clone()
        opt.step()
    return {k: p.detach() for k, p in ps.items()}


def _run_fnlit(tx, params, grad_seq):
    state = tx.init(params)
    for grads in grad_seq:
        params, state = fo.step(tx, grads, state, params)
    return params, state


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        err = (a[k] - b[k]).norm() / b[k].norm()
        assert err <= rtol, f"{k}: relative error {err:.2e} > {rtol}"


SGD_CASES = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.9, weight_decay=0.1),
    dict(weight_decay=0.1),
    dict(momentum=0.9, dampening=0.5),
]


@pytest.mark.parametrize("kw", SGD_CASES)
def test_sgd_matches_torch(kw):
    params, seq = _params(), _grads(_params())
    ref = _run_torch(lambda ps: torch.optim.SGD(ps.values(), lr=0.01, foreach=True, **kw), params, seq)
    _close(_run_fnlit(fo.sgd(0.01, **kw), params, seq)[0], ref)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adam_matches_torch(wd):
    params, seq = _params(), _grads(_params())
    ref = _run_torch(lambda ps: torch.optim.Adam(ps.values(), lr=1e-2, weight_decay=wd, foreach=True), params, seq)
    _close(_run_fnlit(fo.adam(1e-2, weight_decay=wd), params, seq)[0], ref)


def test_adamw_matches_torch():
    params, seq = _params(), _grads(_params())
    ref = _run_torch(lambda ps: torch.optim.AdamW(ps.values(), lr=1e-2, weight_decay=0.1, foreach=True), params, seq)
    new, state = _run_fnlit(fo.adamw(1e-2, weight_decay=0.1), params, seq)
    _close(new, ref)
    assert state.count.dtype == torch.int64 and int(state.count) == STEPS


@pytest.mark.parametrize(
    "make",
    [
        lambda: fo.adamw(1e-2, weight_decay=0.1),
        lambda: fo.adam(1e-2, weight_decay=0.1),
        lambda: fo.sgd(1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
        lambda: fo.sgd(1e-2),
    ],
)
def test_functional_path_matches_fused(make):
    params, seq = _params(), _grads(_params())
    fused, s1 = _run_fnlit(make(), params, seq)
    with fo.functional_path():
        functional, s2 = _run_fnlit(make(), params, seq)
    for a, b in zip(fused.values(), functional.values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    tree_map(lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6), s1, s2)


def test_masked_weight_decay_matches_torch_param_groups():
    params, seq = _params(), _grads(_params())

    def make_opt(ps):
        decay = [p for k, p in ps.items() if not k.endswith("bias")]
        no_decay = [p for k, p in ps.items() if k.endswith("bias")]
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, foreach=True)

    ref = _run_torch(make_opt, params, seq)
    for mask in (fo.decay_mask, lambda name: not name.endswith("bias"), {k: k.endswith("weight") for k in params}):
        _close(_run_fnlit(fo.adamw(1e-2, weight_decay=0.1, mask=mask), params, seq)[0], ref)


def test_adamw_is_bitwise_torch_fused_adamw_on_cpu():
    # lr and weight decay exactly representable in float32, so fnlit's float32 hyperparameters equal
    # torch's Python floats: the eager path (decay inside the fused kernel) must then give the same bits.
    params, seq = _params(), _grads(_params(), steps=30)

    def make_opt(ps):
        decay = [p for k, p in ps.items() if not k.endswith("bias")]
        no_decay = [p for k, p in ps.items() if k.endswith("bias")]
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=2**-7, weight_decay=0.125, fused=True)

    ref = _run_torch(make_opt, params, seq)
    new, _ = _run_fnlit(fo.adamw(2**-7, weight_decay=0.125, mask=fo.decay_mask), params, seq)
    for k in ref:
        assert torch.equal(new[k], ref[k]), k
    unmasked = _run_torch(lambda ps: torch.optim.AdamW(ps.values(), lr=2**-7, weight_decay=0.125, fused=True), params, seq)
    new, _ = _run_fnlit(fo.adamw(2**-7, weight_decay=0.125), params, seq)
    for k in unmasked:
        assert torch.equal(new[k], unmasked[k]), k


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: fo.adam(2**-7, weight_decay=0.125), lambda ps: torch.optim.Adam(ps, lr=2**-7, weight_decay=0.125, fused=True)),
        (lambda: fo.sgd(2**-7, momentum=0.875, weight_decay=0.125),
         lambda ps: torch.optim.SGD(ps, lr=2**-7, momentum=0.875, weight_decay=0.125, fused=True)),
        (lambda: fo.sgd(2**-7, momentum=0.875, nesterov=True, weight_decay=0.125),
         lambda ps: torch.optim.SGD(ps, lr=2**-7, momentum=0.875, nesterov=True, weight_decay=0.125, fused=True)),
        (lambda: fo.sgd(2**-7, weight_decay=0.125), lambda ps: torch.optim.SGD(ps, lr=2**-7, weight_decay=0.125, fused=True)),
    ],
)
def test_l2_decay_is_bitwise_torch_fused_on_cpu_and_leaves_the_gradients_alone(ours, theirs):
    params, seq = _params(), _grads(_params(), steps=30)
    before = [tree_map(torch.clone, g) for g in seq]
    ref = _run_torch(lambda ps: theirs(ps.values()), params, seq)
    new, _ = _run_fnlit(ours(), params, seq)
    for k in ref:
        assert torch.equal(new[k], ref[k]), k
    for g, g0 in zip(seq, before):  # the kernel adds wd * p to the gradient without writing it
        assert all(torch.equal(g[k], g0[k]) for k in g)


def test_schedule_lr_matches_torch_lambdalr():
    params, seq = _params(), _grads(_params())
    sched = fo.warmup_cosine(1e-2, warmup_steps=10, decay_steps=80, end_value=1e-4)
    lr_at = lambda i: float(sched(i))  # noqa: E731
    ref = _run_torch(lambda ps: torch.optim.AdamW(ps.values(), lr=1e-2, foreach=True), params, seq, lr_at)
    new, state = _run_fnlit(fo.adamw(sched), params, seq)
    _close(new, ref)
    torch.testing.assert_close(fo.learning_rate(state), sched(STEPS - 1))


def test_changing_lr_in_state_matches_torch():
    params, seq = _params(), _grads(_params(), steps=20)
    ref = _run_torch(lambda ps: torch.optim.SGD(ps.values(), lr=0.1, momentum=0.9), params, seq, lambda i: 0.1 if i < 10 else 0.01)
    tx = fo.sgd(0.1, momentum=0.9)
    state, p = tx.init(params), params
    for i, grads in enumerate(seq):
        if i == 10:
            state = state._replace(hyperparams={**state.hyperparams, "learning_rate": torch.tensor(0.01)})
        p, state = fo.step(tx, grads, state, p)
    _close(p, ref)


def test_clip_by_global_norm_matches_torch():
    grads = _grads(_params(), steps=1)[0]
    for max_norm in (0.5, 1e3):
        ref = {k: g.clone().requires_grad_() for k, g in grads.items()}
        for k, g in grads.items():
            ref[k].grad = g.clone()
        torch.nn.utils.clip_grad_norm_(ref.values(), max_norm, foreach=True)
        tx = fo.clip_by_global_norm(max_norm)
        out, _ = tx.update(grads, tx.init(grads))
        with fo.functional_path():
            out2, _ = tx.update(grads, tx.init(grads))
        for k in grads:
            torch.testing.assert_close(out[k], ref[k].grad, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(out2[k], ref[k].grad, rtol=1e-6, atol=1e-7)


def test_chain_clip_adamw_is_fused_and_matches_torch():
    params, seq = _params(), [tree_map(lambda g: 10 * g, g) for g in _grads(_params(), steps=20)]

    def make_opt(ps):
        opt = torch.optim.AdamW(ps.values(), lr=1e-2, foreach=True)
        step = opt.step
        opt.step = lambda: (torch.nn.utils.clip_grad_norm_(ps.values(), 1.0), step())
        return opt

    tx = fo.chain(fo.clip_by_global_norm(1.0), fo.adamw(1e-2))
    assert tx.step is not None
    _close(_run_fnlit(tx, params, seq)[0], _run_torch(make_opt, params, seq))


def test_update_then_apply_equals_step():
    params, seq = _params(), _grads(_params(), steps=5)
    for tx in (fo.adamw(1e-2), fo.sgd(0.1, momentum=0.9), fo.chain(fo.trace(0.9), fo.scale_by_learning_rate(0.1))):
        s1 = s2 = tx.init(params)
        p1 = p2 = params
        for grads in seq:
            p1, s1 = fo.step(tx, grads, s1, p1)
            updates, s2 = tx.update(grads, s2, p2)
            p2 = fo.apply_updates(p2, updates)
        for k in params:
            torch.testing.assert_close(p1[k], p2[k], rtol=1e-6, atol=1e-7)


def test_building_blocks_sgd_momentum_matches_torch():
    params, seq = _params(), _grads(_params())
    ref = _run_torch(lambda ps: torch.optim.SGD(ps.values(), lr=0.01, momentum=0.9), params, seq)
    tx = fo.chain(fo.trace(0.9), fo.scale_by_learning_rate(0.01))
    _close(_run_fnlit(tx, params, seq)[0], ref)


def test_building_blocks_adam_matches_torch():
    params, seq = _params(), _grads(_params())
    ref = _run_torch(lambda ps: torch.optim.Adam(ps.values(), lr=1e-2, weight_decay=0.1), params, seq)
    tx = fo.chain(fo.add_decayed_weights(0.1), fo.scale_by_adam(), fo.scale_by_learning_rate(1e-2))
    _close(_run_fnlit(tx, params, seq)[0], ref, rtol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: fo.adamw(1e-2, mask=fo.decay_mask),
        lambda: fo.adam(1e-2, weight_decay=0.1),
        lambda: fo.sgd(0.1, momentum=0.9, weight_decay=0.1),
        lambda: fo.sgd(0.1, momentum=0.9, dampening=0.1),
        lambda: fo.chain(fo.clip_by_global_norm(0.1), fo.adamw(fo.cosine_decay(1e-2, 10))),
        lambda: fo.chain(fo.masked(fo.add_decayed_weights(0.1), fo.decay_mask), fo.scale_by_adam(), fo.scale(-0.1)),
    ],
)
@pytest.mark.parametrize("functional", [False, True])
def test_step_and_update_are_pure(make, functional):
    tx, params = make(), _params()
    state = tx.init(params)
    grads = _grads(params, steps=1)[0]
    for _ in range(2):  # the second step runs on a state with nonzero moments
        before = tree_map(torch.clone, (params, grads, state))
        with fo.functional_path() if functional else _nullcontext():
            new_params, new_state = fo.step(tx, grads, state, params)
            tx.update(grads, state, params)
        tree_map(lambda a, b: _assert_equal(a, b), before, (params, grads, state))
        params, state = new_params, new_state


class _nullcontext:
    def __enter__(self) -> None: ...
    def __exit__(self, *exc: object) -> None: ...


def _assert_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a, b), "an input was modified in place"


def test_vmap_ensemble_with_per_member_lr():
    lrs = [1e-2, 3e-2, 1e-1]
    tx = fo.adamw(1e-2, weight_decay=0.1)
    members = [_params(seed) for seed in range(3)]
    grads = [_grads(p, steps=1, seed=10 + i)[0] for i, p in enumerate(members)]
    states = [tx.init(p) for p in members]
    states = [s._replace(hyperparams={**s.hyperparams, "learning_rate": torch.tensor(lr)}) for s, lr in zip(states, lrs)]
    stack = lambda trees: tree_map(lambda *xs: torch.stack(xs), *trees)  # noqa: E731
    batched = torch.func.vmap(lambda g, s, p: fo.step(tx, g, s, p))(stack(grads), stack(states), stack(members))
    for i in range(3):
        expected, _ = fo.step(tx, grads[i], states[i], members[i])
        for k in expected:
            torch.testing.assert_close(batched[0][k][i], expected[k], rtol=1e-6, atol=1e-7)
    assert torch.equal(fo.learning_rate(batched[1]), torch.tensor(lrs))


def test_learning_rate_found_in_nested_states():
    params = _params()
    assert fo.learning_rate(fo.chain(fo.clip_by_global_norm(1.0), fo.sgd(0.5)).init(params)) == 0.5
    assert fo.learning_rate(fo.masked(fo.adam(0.25), fo.decay_mask).init(params)) == 0.25
    assert fo.learning_rate(fo.clip_by_global_norm(1.0).init(params)) is None


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("make, ref", [
    (lambda: fo.sgd(0.05, momentum=0.9, weight_decay=0.01), lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01)),
    (lambda: fo.adam(1e-3, weight_decay=0.01), lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.01)),
    (lambda: fo.adamw(1e-3, weight_decay=0.1), lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1)),
])
def test_float64_params_step_with_float64_hyperparameters_as_torch_optim(make, ref, functional):
    # The rates were float32 tensors: float64 training was float32-accurate (Adam's params 5e-8 relative to its
    # update from torch.optim's, whose Python-float rates are float64). A float32 param beside them is unchanged.
    g = torch.Generator().manual_seed(0)
    p0 = {"w": torch.randn(40, generator=g, dtype=torch.float64), "b": torch.randn(6, generator=g)}
    seq = [{k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in p0.items()} for _ in range(25)]
    tx = make()
    state = tx.init(p0)
    assert {k: v.dtype for k, v in state.hyperparams.items()} == {"learning_rate": torch.float64, "weight_decay": torch.float64}
    params = p0
    for i, grads in enumerate(seq):
        if i == 10:  # a number assigned mid-run is held as float64 too
            state.hyperparams["learning_rate"] = fo.learning_rate(state).item()
        with fo.functional_path() if functional else contextlib.nullcontext():
            params, state = fo.step(tx, grads, state, params)
    assert state.hyperparams["learning_rate"].dtype == torch.float64
    want = _run_torch(lambda ps: ref(ps.values()), p0, seq)
    moved = (want["w"] - p0["w"]).abs().max()
    assert (params["w"] - want["w"]).abs().max() / moved <= (2e-14 if functional else 1e-15)
    _close({"b": params["b"]}, {"b": want["b"]})


def test_a_float64_tensor_hyperparameter_stays_float64_for_float32_params():
    # A rate given as a float64 tensor was rounded to float32; float32 params step with it as torch.optim's float.
    lr = torch.tensor(1 / 3, dtype=torch.float64)
    tx = fo.adamw(lr, weight_decay=torch.tensor(0.1, dtype=torch.float64))
    params, seq = _params(), _grads(_params(), steps=5)
    state = tx.init(params)
    assert torch.equal(state.hyperparams["learning_rate"], lr) and state.hyperparams["weight_decay"].dtype == torch.float64
    state.hyperparams["learning_rate"] = 1 / 3
    for functional in (False, True):
        with fo.functional_path() if functional else contextlib.nullcontext():
            new, after = fo.step(tx, seq[0], state, params)
        assert torch.equal(after.hyperparams["learning_rate"], lr)
        _close(new, _run_torch(lambda ps: torch.optim.AdamW(ps.values(), lr=1 / 3, weight_decay=0.1), params, seq[:1]))


def test_hyperparams_are_tensors_on_device():
    state = fo.adamw(1e-3, weight_decay=0.1).init(_params())
    for v in state.hyperparams.values():
        assert v.dtype == torch.float32 and v.ndim == 0
    assert state.count.dtype == torch.int64


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: fo.sgd(-0.1), "expected learning_rate >= 0, got -0.1 instead"),
        (lambda: fo.adam(1e-3, b1=1.0), "expected b1 in \\[0, 1\\), got 1.0 instead"),
        (lambda: fo.adamw(1e-3, b2=-0.1), "expected b2 in \\[0, 1\\)"),
        (lambda: fo.adamw(1e-3, eps=-1.0), "expected eps >= 0, got -1.0"),
        (lambda: fo.adamw(1e-3, weight_decay=-0.1), "expected weight_decay >= 0"),
        (lambda: fo.sgd(0.1, momentum=-0.9), "expected momentum >= 0"),
        (lambda: fo.sgd(0.1, nesterov=True), "momentum > 0 and dampening == 0 with nesterov=True"),
        (lambda: fo.clip_by_global_norm(0.0), "expected max_norm > 0, got 0.0 instead"),
        (lambda: fo.chain(fo.adamw), "expected GradientTransformation arguments"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_a_numpy_bool_nesterov_runs_the_eager_kernel_and_other_flags_are_refused():
    # sgd(..., nesterov=np.bool_(True)) or nesterov=1 crashed the fused kernel (_fused_sgd_ takes a Python bool only),
    # while the functional path ran; nesterov="yes" got torch's message about the kernel's arguments.
    np = pytest.importorskip("numpy")
    params, seq = _params(), _grads(_params(), steps=5)
    want = _run_torch(lambda ps: torch.optim.SGD(ps.values(), lr=0.1, momentum=0.9, nesterov=True), params, seq)
    _close(_run_fnlit(fo.sgd(0.1, momentum=0.9, nesterov=np.bool_(True)), params, seq)[0], want)
    for bad in (1, "yes", None, torch.tensor(True)):
        with pytest.raises(TypeError, match=r"sgd expected nesterov to be a bool, got .* instead. Pass nesterov=True"):
            fo.sgd(0.1, momentum=0.9, nesterov=bad)
        with pytest.raises(TypeError, match=r"trace expected nesterov to be a bool"):
            fo.trace(0.9, nesterov=bad)


def test_scale_by_learning_rate_flip_sign_must_be_a_bool():
    # flip_sign=None or 0 turned descent into ascent silently (and "no" was taken as True): a bool only, as
    # nesterov. The reference: a step of lr 0.1 on gradient 1 moves w from 1 down to 0.9, or up to 1.1 when flipped.
    p, g = {"w": torch.ones(2)}, {"w": torch.ones(2)}
    for flip, want in ((True, 0.9), (False, 1.1), (pytest.importorskip("numpy").bool_(False), 1.1)):
        tx = fo.scale_by_learning_rate(0.1, flip_sign=flip)
        assert torch.allclose(p["w"] + tx.update(g, tx.init(p), p)[0]["w"], torch.full((2,), want))
    for bad in (None, 0, 1, "no", torch.tensor(True)):
        with pytest.raises(TypeError, match=r"scale_by_learning_rate expected flip_sign to be a bool, got .* instead"):
            fo.scale_by_learning_rate(0.1, flip_sign=bad)


@pytest.mark.parametrize("make, key", [
    (lambda: fo.sgd(0.1, momentum=0.9, weight_decay=0.1), "learning_rate"),
    (lambda: fo.adamw(0.1), "learning_rate"),
    (lambda: fo.adamw(0.1), "weight_decay"),
    (lambda: fo.adam(0.1, weight_decay=0.1), "weight_decay"),
    (lambda: fo.scale_by_learning_rate(0.1), "learning_rate"),
    (lambda: fo.add_decayed_weights(0.1), "weight_decay"),
])
def test_a_negative_or_nan_number_assigned_as_a_hyperparameter_is_refused(make, key):
    # hyperparams["learning_rate"] = -0.1 mid-run was taken (the params moved up the gradient) where sgd(-0.1) is
    # refused; a NaN made every param NaN. 0 is a rate (and a weight decay) as at construction.
    params, grads = {"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([0.5, 0.25])}
    tx = make()
    state = tx.init(params)
    for bad in (-0.1, math.nan, -1):
        state.hyperparams[key] = bad
        with pytest.raises(ValueError, match=rf"\.update expected state\.hyperparams\['{key}'\] >= 0, got {bad} instead"):
            fo.step(tx, grads, state, params)
    state.hyperparams[key] = 0
    new = fo.step(tx, grads, state, params)[0]
    if key == "learning_rate":
        assert torch.equal(new["w"], params["w"])  # no step at rate 0


def test_scale_takes_a_number_or_a_0d_tensor_only():
    # scale("x") was built and failed in the update; scale(torch.tensor([1., 2.])) broadcast into the updates.
    for bad, got in (("x", r"'x' \(str\)"), (torch.tensor([1.0, 2.0]), r"tensor\(\[1., 2.\]\) \(Tensor\)"), (True, r"True \(bool\)")):
        with pytest.raises(TypeError, match=rf"scale expected step_size to be a number or a 0-d tensor, got {got} instead"):
            fo.scale(bad)
    u = {"w": torch.tensor([1.0, -2.0])}
    assert torch.equal(fo.scale(torch.tensor(-0.5)).update(u, fo.EmptyState())[0]["w"], torch.tensor([-0.5, 1.0]))


RATE = "a float >= 0, a 0-d tensor or a schedule"


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: fo.sgd(torch.tensor(-1.0)), ValueError, r"sgd expected learning_rate >= 0, got tensor\(-1.\)"),
        (lambda: fo.sgd(True), TypeError, rf"sgd expected learning_rate to be {RATE}.*got True \(bool\)"),
        (lambda: fo.sgd(torch.tensor([0.1, 0.2])), TypeError, rf"sgd expected learning_rate to be {RATE}.*got tensor\(\[0.1"),
        (lambda: fo.sgd(0.1, momentum="0.9"), TypeError, r"sgd expected momentum to be a float >= 0 or a 0-d tensor, got '0.9' \(str\)"),
        (lambda: fo.sgd(0.1, momentum=None), TypeError, r"sgd expected momentum to be a float >= 0 or a 0-d tensor, got None"),
        (lambda: fo.adam(0.1, eps="x"), TypeError, r"adam expected eps to be a float >= 0 or a 0-d tensor, got 'x'"),
        (lambda: fo.adamw(0.1, weight_decay=None), TypeError, r"adamw expected weight_decay to be a float >= 0 or a 0-d tensor, got None"),
        (lambda: fo.adamw(0.1, weight_decay="0.1"), TypeError, r"adamw expected weight_decay to be .*, got '0.1' \(str\)"),
        (lambda: fo.adam(0.1, b1="0.9"), TypeError, r"adam expected b1 to be a float in \[0, 1\) or a 0-d tensor, got '0.9'"),
        (lambda: fo.adam(0.1, b1=None), TypeError, r"adam expected b1 to be a float in \[0, 1\) or a 0-d tensor, got None"),
        (lambda: fo.adam(0.1, b1=(0.9, 0.99)), TypeError, r"adam expected b1 .*got \(0.9, 0.99\) \(tuple\).*b1=0.9, b2=0.999"),
        (lambda: fo.clip_by_global_norm(None), TypeError, r"clip_by_global_norm expected max_norm to be a float > 0.*got None"),
        (lambda: fo.trace("x"), TypeError, r"trace expected decay to be a float >= 0 or a 0-d tensor, got 'x'"),
        (lambda: fo.scale_by_learning_rate("x"), TypeError, rf"scale_by_learning_rate expected learning_rate to be {RATE}"),
        (lambda: fo.adamw(0.1, mask=3), TypeError, r"adamw expected mask to be a pytree of bools.*got 3 \(int\)"),
        (lambda: fo.masked(fo.sgd(0.1), mask="w"), TypeError, r"masked expected mask to be a pytree of bools.*got 'w'"),
    ],
)
def test_bad_argument_types_and_tensor_values_raise_when_built(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "name, make",
    [
        ("sgd", lambda lr: fo.sgd(lr, momentum=0.9)),
        ("adam", fo.adam),
        ("scale_by_learning_rate", lambda lr: fo.chain(fo.scale_by_adam(), fo.scale_by_learning_rate(lr))),
    ],
)
def test_schedule_returning_a_python_float_raises_at_init(name, make):
    tx = make(lambda count: 0.1)
    with pytest.raises(TypeError, match=rf"{name} expected its learning_rate schedule to return a 0-d tensor, got 0.1 \(float\)"):
        tx.init(_params())


SHAPE_TXS = [
    lambda: fo.chain(fo.scale_by_adam(), fo.scale(-1e-3)),
    lambda: fo.chain(fo.trace(0.9), fo.scale_by_learning_rate(0.1)),
    lambda: fo.chain(fo.clip_by_global_norm(1.0), fo.scale_by_learning_rate(0.1)),
    lambda: fo.masked(fo.scale_by_learning_rate(0.1), fo.decay_mask),
    lambda: fo.adamw(1e-3),
]


@pytest.mark.parametrize("make", SHAPE_TXS)
@pytest.mark.parametrize("bad", [(4, 8, 5), (5, 8), (8,)])
def test_wrong_shaped_grads_raise_naming_the_path_and_shapes(make, bad):
    # A (4, 8, 5) gradient broadcast against an (8, 5) param and made it (4, 8, 5) where no fused kernel checked.
    tx, params = make(), _params()
    grads = {**_grads(params, steps=1)[0], "fc1.weight": torch.ones(bad)}
    with pytest.raises(ValueError, match=rf"at fc1.weight: expected tensor of shape \(8, 5\).*got tensor of shape {re.escape(str(bad))}"):
        fo.step(tx, grads, tx.init(params), params)


@pytest.mark.parametrize("make", [
    lambda: fo.sgd(0.1), lambda: fo.sgd(0.1, momentum=0.9), lambda: fo.adam(1e-3), lambda: fo.adamw(1e-3),
], ids=["sgd", "sgd_momentum", "adam", "adamw"])
def test_a_gradient_on_another_device_than_its_param_is_refused_naming_it(make):
    # adamw's fused kernel skipped a meta-device gradient without a word (params unchanged, moments zero, count
    # advanced); sgd's failed inside torch. torch refuses such a .grad outright: the reference.
    param = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(RuntimeError, match="device"):
        param.grad = torch.ones(2, device="meta")
    tx, params = make(), {"w": torch.ones(3, 2), "b": torch.zeros(2)}
    grads = {"w": torch.ones(3, 2), "b": torch.ones(2, device="meta")}
    with pytest.raises(ValueError, match=r"update expected gradients on the params' devices, but b has a gradient "
                                         r"on meta for a parameter on cpu"):
        fo.step(tx, grads, tx.init(params), params)


@pytest.mark.parametrize("make", [
    lambda: fo.sgd(0.1),
    lambda: fo.sgd(0.1, momentum=0.9),
    lambda: fo.adamw(1e-3),
    lambda: fo.chain(fo.scale_by_adam(), fo.scale(-1e-3)),
    lambda: fo.chain(fo.trace(0.9), fo.scale_by_learning_rate(0.1)),
], ids=["sgd", "sgd_momentum", "adamw", "scale_by_adam", "trace"])
@pytest.mark.parametrize("bad", [1.0, 2], ids=["float", "int"])
def test_a_gradient_that_is_not_a_tensor_raises_the_documented_value_error(make, bad):
    # apply_gradients documents a ValueError for grads not shaped as the params; a float leaf raised
    # AttributeError: 'float' object has no attribute 'layout'.
    import fnlit

    tx = make()
    state = fnlit.TrainState.create(torch.nn.Linear(3, 2), tx, seed=0)
    grads = {"weight": torch.ones(2, 3), "bias": bad}
    match = rf"at bias: expected tensor of shape \(2,\) and dtype torch.float32, got {type(bad).__name__} {bad}"
    with pytest.raises(ValueError, match=match):
        state.apply_gradients(grads)
    with pytest.raises(ValueError, match=match):
        fo.step(tx, grads, state.opt_state, state.params)


@pytest.mark.parametrize("make, match", [
    (lambda: fo.scale(-0.1), r"apply_updates expected updates of the params' shapes.*at bias: expected tensor of "
                             r"shape \(2,\).*got float -0\.[12]"),
    (lambda: fo.chain(fo.clip_by_global_norm(1.0), fo.sgd(0.1)),
     r"clip_by_global_norm expected gradients that are tensors, got (float|int) .* at bias"),
], ids=["scale", "clip"])
@pytest.mark.parametrize("bad", [1.0, 2], ids=["float", "int"])
def test_a_gradient_that_is_not_a_tensor_is_refused_by_scale_and_clip_too(make, match, bad):
    # scale's float update was added to every element of the param (broadcast, silently); clip raised torch's
    # unnamed TypeError. The reference: apply_gradients' documented ValueError for grads not shaped as the params.
    import fnlit

    state = fnlit.TrainState.create(torch.nn.Linear(3, 2), make(), seed=0)
    with pytest.raises(ValueError, match=match):
        state.apply_gradients({"weight": torch.ones(2, 3), "bias": bad})


def test_apply_updates_refuses_updates_that_would_broadcast():
    with pytest.raises(ValueError, match=r"apply_updates expected updates of the params' shapes.*at w: .*\(2,\).*got .*\(3, 2\)"):
        fo.apply_updates({"w": torch.ones(2)}, {"w": torch.ones(3, 2)})


def test_functional_adamw_in_float64_matches_torch_in_float64():
    # The decay factor 1 - lr * wd was rounded to float32: float64 params drifted ~1000x further from torch.optim.
    params = {k: v.double() for k, v in _params().items()}
    seq = [{k: v.double() for k, v in g.items()} for g in _grads(params)]
    ref = _run_torch(lambda ps: torch.optim.AdamW(ps.values(), lr=2**-7, weight_decay=0.1, foreach=False), params, seq)
    with fo.functional_path():
        new, _ = _run_fnlit(fo.adamw(2**-7, weight_decay=0.1), params, seq)
    _close(new, ref, rtol=1e-8)  # float32 rounding left 1e-6 (the eager path: 1.5e-9)


@pytest.mark.parametrize("make", [
    lambda: fo.adam(2**-2),
    lambda: fo.chain(fo.scale_by_adam(), fo.scale(-(2**-2))),
], ids=["adam", "scale_by_adam"])
def test_functional_adam_in_float64_matches_torch_in_float64(make):
    # The bias corrections were rounded to float32 on the functional path (compile, vmap): float64 params ended
    # ~5e-8 from torch.optim.Adam, 1e8x further than the eager path.
    params = {k: v.double() for k, v in _params().items()}
    seq = [{k: v.double() for k, v in g.items()} for g in _grads(params)]
    ref = _run_torch(lambda ps: torch.optim.Adam(ps.values(), lr=2**-2, foreach=False), params, seq)
    with fo.functional_path():
        new, _ = _run_fnlit(make(), params, seq)
    _close(new, ref, rtol=1e-12)


def test_one_adamw_with_a_shape_mask_on_two_trees_of_the_same_names():
    # decay_mask reads ndim: the flags cached for the 2-d tree were used for the 1-d one.
    tx = fo.adamw(0.1, weight_decay=0.5, mask=fo.decay_mask)
    square, flat = {"w": torch.ones(2, 2)}, {"w": torch.ones(4)}
    zeros = lambda p: {"w": torch.zeros_like(p["w"])}  # noqa: E731  zero gradients: only the decay moves them
    fo.step(tx, zeros(square), tx.init(square), square)
    new_flat, _ = fo.step(tx, zeros(flat), tx.init(flat), flat)
    new_square, _ = fo.step(tx, zeros(square), tx.init(square), square)
    assert torch.equal(new_flat["w"], torch.ones(4))  # a 1-d tensor: no decay
    assert torch.equal(new_square["w"], torch.full((2, 2), 1 - 0.1 * 0.5))
    m = fo.masked(fo.add_decayed_weights(1.0), fo.decay_mask)
    m.update(zeros(square), m.init(square), square)
    assert torch.equal(m.update(zeros(flat), m.init(flat), flat)[0]["w"], torch.zeros(4))


def test_masked_gives_the_inner_transform_the_parameter_names():
    # The inner adamw saw names [0], [1], ...: its mask by name decayed the biases too.
    params, seq = _params(), _grads(_params(), steps=10)

    def make_opt(ps):
        groups = [{"params": [p for k, p in ps.items() if not k.endswith("bias")]},
                  {"params": [p for k, p in ps.items() if k.endswith("bias")], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.5, foreach=True)

    ref = _run_torch(make_opt, params, seq)
    inner = fo.adamw(1e-2, weight_decay=0.5, mask=lambda name: not name.endswith("bias"))
    _close(_run_fnlit(fo.masked(inner, lambda name: True), params, seq)[0], ref)


def test_a_mask_that_is_a_prefix_of_the_params_covers_each_subtree_as_in_optax():
    # A mask function returning a pytree of another structure was taken for a function of names: bool() of the dict
    # it built from a name string was True, so the frozen encoder trained too.
    params = {"enc": {"w": torch.ones(3)}, "head": {"w": torch.ones(3), "b": torch.ones(3)}}
    grads = {"enc": {"w": torch.ones(3)}, "head": {"w": torch.ones(3), "b": torch.ones(3)}}
    frozen_enc = fo.chain(fo.masked(fo.sgd(0.5), {"enc": False, "head": True}), fo.masked(fo.set_to_zero(), {"enc": True, "head": False}))
    for tx in (frozen_enc, fo.chain(fo.masked(fo.sgd(0.5), lambda p: {k: k == "head" for k in p}),
                                    fo.masked(fo.set_to_zero(), lambda p: {k: k == "enc" for k in p}))):
        new, _ = fo.step(tx, grads, tx.init(params), params)
        assert new["enc"]["w"].tolist() == [1.0] * 3 and new["head"]["w"].tolist() == new["head"]["b"].tolist() == [0.5] * 3
    flat = {"w": torch.ones(2, 2), "bias": torch.ones(2)}  # a function whose tree misses a key: an error, not "all"
    tx = fo.adamw(0.1, weight_decay=0.5, mask=lambda p: {k: True for k in p if not k.endswith("bias")})
    with pytest.raises(ValueError, match=r"adamw expected a mask with the structure of the params \(or a prefix of it\).*missing bias"):
        tx.init(flat)


@pytest.mark.parametrize("make, ref", [
    (lambda: fo.sgd(0.1, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9)),
    (lambda: fo.adamw(0.1, weight_decay=0.5), lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.25)),
])
def test_a_hyperparameter_set_to_a_number_works_as_a_tensor(make, ref):
    # optax's idiom, hyperparams["learning_rate"] = 0.01, crashed the named optimizers: 'float' has no attribute 'is_cpu'.
    params = {"w": torch.tensor([1.0, -2.0, 3.0])}
    grads = {"w": torch.tensor([0.5, 0.25, -1.0])}
    tx = make()
    state = tx.init(params)
    state.hyperparams["learning_rate"] = 0.01
    state.hyperparams["weight_decay"] = 0.25
    new, after = fo.step(tx, grads, state, params)
    assert type(after.hyperparams["learning_rate"]) is torch.Tensor  # held as a tensor from now on
    p = torch.nn.Parameter(params["w"].clone())
    p.grad = grads["w"].clone()
    ref([p]).step()
    torch.testing.assert_close(new["w"], p.detach(), rtol=1e-6, atol=1e-7)
    state.hyperparams["learning_rate"] = "0.01"
    with pytest.raises(TypeError, match=r"hyperparams\['learning_rate'\] to be a 0-d tensor \(or a number\), got str"):
        fo.step(tx, grads, state, params)


@pytest.mark.parametrize("make, ref", [
    (lambda: fo.sgd(0.1, momentum=0.9, weight_decay=0.5), lambda ps: torch.optim.SGD(ps, lr=0.125, momentum=0.9, weight_decay=2)),
    (lambda: fo.adamw(0.1, weight_decay=0.5), lambda ps: torch.optim.AdamW(ps, lr=0.125, weight_decay=2)),
    (lambda: fo.chain(fo.add_decayed_weights(0.5), fo.scale_by_learning_rate(0.1)),
     lambda ps: torch.optim.SGD(ps, lr=0.125, weight_decay=2)),
])
def test_a_numpy_number_assigned_as_a_hyperparameter_works_as_a_python_number(make, ref):
    # Construction takes numpy numbers, but hyperparams["learning_rate"] = np.float32(...) mid-run raised TypeError.
    np = pytest.importorskip("numpy")
    params = {"w": torch.tensor([1.0, -2.0, 3.0])}
    grads = {"w": torch.tensor([0.5, 0.25, -1.0])}
    tx = make()
    state = tx.init(params)
    for s in state if type(state) is tuple else [state]:  # a chain's state is a plain tuple of states
        for key, value in (("learning_rate", np.float32(0.125)), ("weight_decay", np.int64(2))):
            if key in s.hyperparams:
                s.hyperparams[key] = value
    new = fo.step(tx, grads, state, params)[0]
    p = torch.nn.Parameter(params["w"].clone())
    p.grad = grads["w"].clone()
    ref([p]).step()
    torch.testing.assert_close(new["w"], p.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make", [
    lambda lr: fo.sgd(lr), lambda lr: fo.chain(fo.scale_by_learning_rate(lr)),
], ids=["sgd", "scale_by_learning_rate"])
def test_under_a_schedule_an_assigned_rate_is_overwritten_as_the_docs_say(make):
    # Documented (as under optax's inject_hyperparams): the schedule wins, so an assignment is never used; a float
    # rate takes it. Reference: torch.optim.SGD stepped with the rate that should apply.
    params = {"w": torch.tensor([1.0, -2.0, 3.0])}
    grads = {"w": torch.tensor([0.5, 0.25, -1.0])}
    for rate, used in ((fo.step_decay(0.5, step_size=1, gamma=0.5), 0.25), (0.5, 0.01)):
        tx = make(rate)
        state = tx.init(params)
        params_1, state = fo.step(tx, grads, state, params)  # step 0: the rate 0.5 either way
        holder = state[0] if type(state) is tuple else state  # a chain's state is a plain tuple
        holder.hyperparams["learning_rate"] = 0.01
        new = fo.step(tx, grads, state, params_1)[0]
        p = torch.nn.Parameter(params_1["w"].clone())
        p.grad = grads["w"].clone()
        torch.optim.SGD([p], lr=used).step()
        torch.testing.assert_close(new["w"], p.detach(), rtol=1e-6, atol=1e-7)


def test_a_number_assigned_to_the_transforms_hyperparams_is_held_as_a_tensor_and_matches_torch():
    # scale_by_learning_rate kept the float forever and add_decayed_weights copied it: every later checkpoint held
    # a number where a fresh state holds a tensor.
    params = {"w": torch.tensor([1.0, -2.0, 3.0])}
    grads = {"w": torch.tensor([0.5, 0.25, -1.0])}
    tx = fo.chain(fo.add_decayed_weights(0.5), fo.scale_by_learning_rate(0.1))
    state = tx.init(params)
    state[0].hyperparams["weight_decay"] = 0.25
    state[1].hyperparams["learning_rate"] = 0.01
    new, after = fo.step(tx, grads, state, params)
    assert [type(s.hyperparams[k]) for s, k in zip(after, ("weight_decay", "learning_rate"))] == [torch.Tensor] * 2
    p = torch.nn.Parameter(params["w"].clone())
    p.grad = grads["w"].clone()
    torch.optim.SGD([p], lr=0.01, weight_decay=0.25).step()
    torch.testing.assert_close(new["w"], p.detach(), rtol=1e-6, atol=1e-7)
    state[1].hyperparams["learning_rate"] = "0.01"
    with pytest.raises(TypeError, match=r"scale_by_learning_rate.update expected state.hyperparams\['learning_rate'\]"):
        fo.step(tx, grads, state, params)


@pytest.mark.parametrize("make", [
    lambda: fo.sgd(0.1, momentum=0.9), lambda: fo.adamw(0.1),
    lambda: fo.scale_by_learning_rate(0.1), lambda: fo.add_decayed_weights(0.1),
])
@pytest.mark.parametrize("key", ["lr", "b1"])
def test_a_hyperparameter_the_update_does_not_read_is_refused(make, key):
    # hyperparams["lr"] = 0.0 (torch.optim's name) or ["b1"] = 0.5 (optax's inject_hyperparams) changed nothing and
    # was carried into every later state. optax's inject_hyperparams passes each key to the constructor, which
    # raises on an unknown one; torch.optim has no "b1" to set. The reference: the step it should not have changed,
    # torch.optim.SGD's with the lr held.
    params = {"w": torch.tensor([1.0, -2.0, 3.0])}
    grads = {"w": torch.tensor([0.5, 0.25, -1.0])}
    tx = make()
    state = tx.init(params)
    state.hyperparams[key] = 0.0 if key == "lr" else 0.5
    with pytest.raises(ValueError, match=rf"update got state.hyperparams\['{key}'\], which it does not read.*tunable "
                       r"hyperparameters? (is|are) '(learning_rate|weight_decay)'.*fixed when the optimizer is built"):
        fo.step(tx, grads, state, params) if type(state) is not fo.ScaleByLearningRateState else tx.update(grads, state)
    # under vmap (an ensemble's members) as eagerly
    batched = tree_map(lambda t: torch.as_tensor(t).expand(2, *torch.as_tensor(t).shape), state)
    twice = {"w": grads["w"].expand(2, 3)}
    with pytest.raises(ValueError, match=rf"hyperparams\['{key}'\], which it does not read"):
        torch.func.vmap(lambda s, g, p: tx.update(g, s, p))(batched, twice, {"w": params["w"].expand(2, 3)})
    del state.hyperparams[key]  # without it, the step is torch's
    if type(state) is fo.SGDState:
        new = fo.step(tx, grads, state, params)[0]
        p = torch.nn.Parameter(params["w"].clone())
        p.grad = grads["w"].clone()
        torch.optim.SGD([p], lr=0.1, momentum=0.9).step()
        torch.testing.assert_close(new["w"], p.detach(), rtol=1e-6, atol=1e-7)


def test_a_rate_or_decay_beyond_the_held_dtype_is_refused_as_torch_refuses_it():
    # sgd(1e39) held its float32 rate as inf: a step gave params -inf (nan with momentum). torch.optim.SGD(lr=1e39)
    # raises at its step; a float64 model holds the rate in float64, where it is a number, and steps as torch's.
    params = {"w": torch.tensor([1.0, -2.0, 3.0])}
    grads = {"w": torch.tensor([0.5, 0.25, -1.0])}
    p = torch.nn.Parameter(params["w"].clone())
    p.grad = grads["w"].clone()
    with pytest.raises(RuntimeError, match="cannot be converted to type float without overflow"):
        torch.optim.SGD([p], lr=1e39).step()
    for make, what in [
        (lambda: fo.sgd(1e39, momentum=0.9), "sgd.init got learning_rate"),
        (lambda: fo.adamw(1e-3, weight_decay=1e39), "adamw.init got weight_decay"),
        (lambda: fo.scale_by_learning_rate(-(-10**39)), "scale_by_learning_rate.init got learning_rate"),
        (lambda: fo.add_decayed_weights(3.5e38), "add_decayed_weights.init got weight_decay"),
    ]:
        with pytest.raises(ValueError, match=rf"{what} \S+, which does not fit in float32, the dtype it is held in"):
            make().init(params)
    tx = fo.sgd(0.1, weight_decay=0.5)
    state = tx.init(params)
    state.hyperparams["weight_decay"] = 1e39  # a number assigned mid-run (optax's idiom)
    with pytest.raises(ValueError, match=r"sgd.update got state.hyperparams\['weight_decay'\] = 1e\+39, which does not fit"):
        fo.step(tx, grads, state, params)
    for bad in (math.inf, torch.tensor(math.inf)):  # inf in every dtype: refused when built
        with pytest.raises(ValueError, match=r"sgd expected learning_rate finite, got (inf|tensor\(inf\))"):
            fo.sgd(bad)
    with pytest.raises(ValueError, match=r"adam expected eps finite, got inf"):
        fo.adam(1e-3, eps=math.inf)
    with pytest.raises(ValueError, match=r"constant expected value finite and >= 0, got 1e\+39.*float32"):
        fo.constant(1e39)  # a schedule computes in float32
    # float64 params hold it in float64, where torch.optim.SGD steps with it too
    wide = {"w": params["w"].double()}
    tiny = {"w": grads["w"].double() * 1e-39}
    new = fo.step(fo.sgd(1e39), tiny, fo.sgd(1e39).init(wide), wide)[0]
    p = torch.nn.Parameter(wide["w"].clone())
    p.grad = tiny["w"].clone()
    torch.optim.SGD([p], lr=1e39).step()
    torch.testing.assert_close(new["w"], p.detach(), rtol=1e-12, atol=0)
    # inf stays clip_by_global_norm's "no clipping", as clip_grad_norm_'s
    clipped = fo.clip_by_global_norm(math.inf).update({"w": torch.tensor([3e3, 4e3])}, fo.EmptyState())[0]
    q = torch.nn.Parameter(torch.zeros(2))
    q.grad = torch.tensor([3e3, 4e3])
    torch.nn.utils.clip_grad_norm_([q], math.inf)
    torch.testing.assert_close(clipped["w"], q.grad)


def test_set_to_zero_freezes_the_masked_part():
    params, seq = _params(), _grads(_params(), steps=10)
    frozen = lambda name: name.startswith("fc1.")  # noqa: E731
    ref = _run_torch(lambda ps: torch.optim.AdamW([p for k, p in ps.items() if not frozen(k)], lr=1e-2), params, seq)
    tx = fo.chain(fo.masked(fo.adamw(1e-2), lambda name: not frozen(name)), fo.masked(fo.set_to_zero(), frozen))
    new, _ = _run_fnlit(tx, params, seq)
    _close(new, ref)
    assert all(torch.equal(new[k], params[k]) for k in params if frozen(k))


@pytest.mark.parametrize("make, ref", [
    (lambda: fo.sgd(0.1, weight_decay=torch.tensor(0.0)), lambda ps: torch.optim.SGD(ps.values(), lr=0.1, weight_decay=0.5)),
    (lambda: fo.adam(0.1, weight_decay=torch.tensor(0.0)), lambda ps: torch.optim.Adam(ps.values(), lr=0.1, weight_decay=0.5)),
])
def test_weight_decay_built_as_a_tensor_can_be_tuned_in_the_state(make, ref):
    # The documented way to tune the decay from zero (a Python 0 leaves it out of the step).
    params, seq = _params(), _grads(_params(), steps=10)
    tx = make()
    state = tx.init(params)
    state = state._replace(hyperparams={**state.hyperparams, "weight_decay": torch.tensor(0.5)})
    new = params
    for grads in seq:
        new, state = fo.step(tx, grads, state, new)
    _close(new, _run_torch(ref, params, seq))


@pytest.mark.parametrize("make", [lambda: fo.adamw(1e-3), lambda: fo.sgd(0.1), lambda: fo.trace(0.9)])
def test_mismatched_grads_name_the_key(make):
    tx, params = make(), _params()
    grads = {k: v for k, v in _grads(params, steps=1)[0].items() if k != "fc2.bias"}
    with pytest.raises(ValueError, match="expected grads with the structure.*missing fc2.bias"):
        tx.update(grads, tx.init(params), params)


def test_masked_refuses_updates_of_another_structure_than_the_params():
    # The flags are the params' (a, b, c) and were zipped with the updates' leaves (a, c): c took b's flag and was
    # zeroed, a silently wrong update. optax maps the mask over the updates, so the mismatch raises there too.
    params = {"a": torch.ones(2), "b": torch.ones(2), "c": torch.ones(2)}
    grads = {"a": torch.ones(2), "c": torch.ones(2)}
    for tx in (fo.masked(fo.set_to_zero(), lambda n: n == "b"), fo.masked(fo.sgd(0.5), {"a": False, "b": True, "c": False})):
        with pytest.raises(ValueError, match=r"masked.update expected grads with the structure.*missing b"):
            tx.update(grads, tx.init(params), params)
    tx = fo.masked(fo.set_to_zero(), lambda n: n == "b")  # without params the mask is the updates' own: as before
    out, _ = tx.update(grads, tx.init(grads))
    assert out["a"].tolist() == out["c"].tolist() == [1.0, 1.0]


_WRONG_STATES = {  # name: (new tx, the old tx whose state it is given); what that did before in the comments
    "sgd": (lambda: fo.sgd(0.5), lambda: fo.adam(1e-3)),  # silent: stepped with adam's lr, 1e-3
    "sgd momentum": (lambda: fo.sgd(0.5, momentum=0.9), lambda: fo.adam(1e-3)),  # AttributeError momentum_buffer
    "adam": (lambda: fo.adam(1e-3), lambda: fo.sgd(0.5)),  # AttributeError mu
    "masked": (lambda: fo.masked(fo.sgd(0.1), lambda n: True), lambda: fo.adam(1e-3)),  # ... inner_state
    "scale_by_adam": (lambda: fo.scale_by_adam(), lambda: fo.trace(0.9)),
    "add_decayed_weights": (lambda: fo.add_decayed_weights(0.1), lambda: fo.scale_by_adam()),
    "scale_by_learning_rate": (lambda: fo.scale_by_learning_rate(0.1), lambda: fo.scale_by_schedule(fo.constant(0.1))),
    "scale_by_schedule": (lambda: fo.scale_by_schedule(fo.constant(0.1)), lambda: fo.scale(0.1)),
    "dp_sgd_aggregate": (lambda: fo.dp_sgd_aggregate(1.0, 0.0), lambda: fo.scale(0.1)),
}


@pytest.mark.parametrize("name, new, old", [(k, *v) for k, v in _WRONG_STATES.items()], ids=list(_WRONG_STATES))
def test_a_state_of_another_optimizer_is_refused(name, new, old):
    tx, params, name = new(), {"w": torch.ones(2)}, name.split()[0]
    kind = type(tx.init(params)).__name__
    with pytest.raises(ValueError, match=rf"{name}.update expected the state {name}.init makes \({kind}\), got "
                                         rf"{type(old().init(params)).__name__} instead.*tx.init\(params\)"):
        fo.step(tx, {"w": torch.ones(2)}, old().init(params), params)


def test_a_state_of_another_chain_or_of_sgd_without_momentum_is_refused():
    params, grads = {"w": torch.ones(2)}, {"w": torch.ones(2)}
    tx = fo.chain(fo.trace(0.9), fo.adam(1e-3))  # its trace read chain(clip, adam)'s EmptyState: AttributeError
    with pytest.raises(ValueError, match=r"trace.update expected the state trace.init makes \(TraceState\), got EmptyState"):
        fo.step(tx, grads, fo.chain(fo.clip_by_global_norm(1.0), fo.adam(1e-3)).init(params), params)
    with pytest.raises(ValueError, match=r"sgd.update expected the state sgd.init makes \(SGDState\), got one without "
                                         r"state.momentum_buffer \(made by sgd without momentum\)"):
        fo.step(fo.sgd(0.5, momentum=0.9), grads, fo.sgd(0.5).init(params), params)


def test_update_without_params_when_decay_needs_them():
    tx = fo.adamw(1e-3)
    params = _params()
    with pytest.raises(ValueError, match="expected params .weight decay needs them., got None"):
        tx.update(params, tx.init(params))


@pytest.mark.parametrize("make", [lambda: fo.adamw(0.01, weight_decay=0.0), lambda: fo.sgd(0.1, momentum=0.9)])
def test_non_contiguous_gradients_and_params_match_contiguous(make):
    # torch's fused CPU kernels compute wrong updates for non-contiguous tensors; fnlit must not.
    tx = make()
    g = torch.randn(5, 7)[:, :6]
    p = torch.randn(6, 5).T  # a transposed (non-contiguous) parameter
    ref_params = {"w": p.contiguous()}
    got, _ = fo.step(tx, {"w": g}, tx.init({"w": p}), {"w": p})
    want, _ = fo.step(tx, {"w": g.contiguous()}, tx.init(ref_params), ref_params)
    torch.testing.assert_close(got["w"], want["w"], rtol=0, atol=0)


# -- the recycler: a pure eager update reuses the memory of its own dead outputs (CPU, >= 1 MiB) ---------
def _big(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(512, 640, generator=g), "b": torch.randn(640, generator=g)}  # w: 1.25 MiB


def _repeats(refs) -> bool:
    alive = [r() for r in refs if r() is not None]
    return any(a is b for i, a in enumerate(alive) for b in alive[i + 1 :])


def _recycling_run(tx, steps, keep):
    params = _big()
    seq = _grads(params, steps=steps)
    state, kept, storages = tx.init(params), [], []
    for grads in seq:
        params, state = fo.step(tx, grads, state, params)
        # Weak references to the storage objects, not addresses (malloc may hand a freed block back); a
        # strong reference would keep the memory in use.
        storages.append(weakref.ref(params["w"].untyped_storage()))
        if keep:
            kept.append((params, state, tree_map(torch.clone, (params, state))))
    return params, state, kept, storages


@pytest.mark.parametrize("make", [lambda: fo.adamw(1e-2, weight_decay=0.1), lambda: fo.sgd(1e-2, momentum=0.9)])
def test_dropped_states_memory_is_reused_with_the_same_results(make, monkeypatch):
    reused, state, _, storages = _recycling_run(make(), 8, keep=False)
    assert _repeats(storages)  # an old state's memory came back
    monkeypatch.setattr(fo._base.Recycler, "MIN_BYTES", 1 << 60)  # the reference: every output fresh
    fresh, ref_state, _, fresh_storages = _recycling_run(make(), 8, keep=False)
    assert not _repeats(fresh_storages)
    for a, b in zip((reused, state), (fresh, ref_state)):
        tree_map(lambda x, y: torch.testing.assert_close(x, y, rtol=0, atol=0), a, b)


def test_recycling_never_writes_a_state_that_is_still_referenced():
    tx = fo.adamw(1e-2, weight_decay=0.1)
    _, _, kept, storages = _recycling_run(tx, 6, keep=True)
    assert not _repeats(storages)  # every state alive: nothing reused
    for params, state, snapshot in kept:
        tree_map(lambda x, y: torch.testing.assert_close(x, y, rtol=0, atol=0), (params, state), snapshot)


def test_a_view_numpy_array_or_storage_of_an_old_state_keeps_its_memory():
    tx = fo.adamw(1e-2)
    params = _big()
    seq = _grads(params, steps=8)
    state = tx.init(params)
    params, state = fo.step(tx, seq[0], state, params)
    row, expected_row = params["w"][3], params["w"][3].clone()  # a view: the rest of the state is dropped
    params, state = fo.step(tx, seq[1], state, params)
    arr, expected_arr = state.mu["w"].numpy(), state.mu["w"].clone()
    params, state = fo.step(tx, seq[2], state, params)
    storage, expected_storage = state.nu["w"].untyped_storage(), state.nu["w"].clone()
    for grads in seq[3:]:
        params, state = fo.step(tx, grads, state, params)
    assert torch.equal(row, expected_row)
    assert torch.equal(torch.from_numpy(arr), expected_arr)
    assert torch.equal(torch.tensor([], dtype=torch.float32).set_(storage).view(512, 640), expected_storage)


def test_hyperparameters_given_as_0d_tensors_and_masks_of_numpy_bools_work_as_python_values():
    import numpy as np

    params = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    grads = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    pairs = [
        (fo.sgd(0.1, momentum=0.9), fo.sgd(0.1, momentum=torch.tensor(0.9))),
        (fo.adam(1e-2, b1=0.8, eps=1e-6), fo.adam(1e-2, b1=torch.tensor(0.8), eps=torch.tensor(1e-6))),
        (fo.adamw(1e-2, weight_decay=0.1, mask={"w": True, "b": False}),
         fo.adamw(1e-2, weight_decay=0.1, mask={"w": np.bool_(True), "b": np.bool_(False)})),
        (fo.adamw(1e-2, weight_decay=0.1, mask={"w": True, "b": False}),
         fo.adamw(1e-2, weight_decay=0.1, mask={"w": np.int64(1), "b": torch.tensor(0)})),
    ]
    for plain, given in pairs:
        a = fo.step(plain, grads, plain.init(params), params)
        b = fo.step(given, grads, given.init(params), params)
        tree_map(lambda x, y: torch.testing.assert_close(x, y, rtol=0, atol=0), a[0], b[0])


@pytest.mark.parametrize("functional", [False, True])
def test_complex_params_follow_torch_optim(functional):
    # torch.optim treats a complex parameter as its real and imaginary parts (view_as_real): so does fnlit
    # (the fused CPU kernels have no complex version; the functional path squared g itself, not its parts).
    torch.manual_seed(0)
    p0 = {"w": torch.randn(3, 2, dtype=torch.complex64), "b": torch.randn(2)}
    grads = [{"w": torch.randn(3, 2, dtype=torch.complex64), "b": torch.randn(2)} for _ in range(5)]
    cases = [
        (fo.sgd(0.1, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
        (fo.adam(0.1), lambda ps: torch.optim.Adam(ps, lr=0.1)),
        (fo.adamw(0.1, weight_decay=0.1), lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1)),
    ]
    for tx, make_ref in cases:
        params, state = dict(p0), tx.init(p0)
        ref_params = {k: v.clone().requires_grad_() for k, v in p0.items()}
        ref = make_ref(list(ref_params.values()))
        for g in grads:
            if functional:
                with fo._base.functional_path():
                    params, state = fo.step(tx, g, state, params)
            else:
                params, state = fo.step(tx, g, state, params)
            for k, t in ref_params.items():
                t.grad = g[k].clone()
            ref.step()
        for k in p0:
            torch.testing.assert_close(params[k], ref_params[k].detach(), rtol=1e-6, atol=1e-6)
            assert params[k].dtype == p0[k].dtype


def test_scale_by_adam_on_a_complex_gradient_uses_its_squared_modulus():
    # optax's rule: nu accumulates |g|^2, so the first bias-corrected update is g / (|g| + eps), a unit phase.
    g = {"w": torch.tensor([3 + 4j, -1j], dtype=torch.complex64)}
    tx = fo.scale_by_adam(eps=0.0)
    updates, _ = tx.update(g, tx.init(g))
    torch.testing.assert_close(updates["w"], g["w"] / g["w"].abs(), rtol=1e-6, atol=1e-6)


def test_scale_by_adam_takes_gradients_narrower_than_its_moments_as_optax_does():
    # bfloat16 gradients for float32 params crashed in lerp ("expected dtype float for end but got BFloat16").
    # Reference: optax's formulas by hand in float32 on the bfloat16 values (exact in float32).
    b1, b2, eps = 0.9, 0.999, 1e-8
    gen = torch.Generator().manual_seed(0)
    seq = [torch.randn(5, generator=gen).bfloat16() for _ in range(4)]
    tx = fo.scale_by_adam(b1, b2, eps)
    params = {"w": torch.ones(5)}
    state = tx.init(params)
    mu = nu = torch.zeros(5)
    for t, g in enumerate(seq, 1):
        updates, state = tx.update({"w": g}, state, params)
        x = g.float()
        mu, nu = (1 - b1) * x + b1 * mu, (1 - b2) * x * x + b2 * nu
        want = (mu / (1 - b1**t)) / (torch.sqrt(nu / (1 - b2**t)) + eps)
        torch.testing.assert_close(state.mu["w"], mu, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(state.nu["w"], nu, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(updates["w"], want, rtol=1e-5, atol=1e-7)
        assert state.mu["w"].dtype == state.nu["w"].dtype == updates["w"].dtype == torch.float32


@pytest.mark.parametrize("param,grad", [
    (torch.float32, torch.float64), (torch.complex64, torch.float32), (torch.float32, torch.complex64),
    (torch.bfloat16, torch.float16),
])
def test_scale_by_adam_refuses_a_gradient_wider_than_its_param_or_of_another_kind_as_adam_does(param, grad):
    # A float64 gradient for float32 params was silently rounded down (adam and sgd refuse it); a real one for
    # complex params stepped only the real part.
    params = {"w": torch.ones(3, dtype=param)}
    g = {"w": torch.ones(3, dtype=grad)}
    for tx in (fo.scale_by_adam(), fo.adam(1e-3)):
        with pytest.raises(ValueError, match=rf"update expected gradients of the params' dtypes, but w has a "
                                             rf"{grad} gradient for a {param} parameter\. .*g\.to\(p\.dtype\)"):
            fo.step(tx, g, tx.init(params), params)
    # narrower gradients of the same kind are still cast up
    for narrow in (torch.bfloat16, torch.float16):
        u, state = fo.scale_by_adam().update({"w": torch.full((3,), 0.5, dtype=narrow)}, fo.scale_by_adam().init({"w": torch.ones(3)}))
        assert u["w"].dtype == state.mu["w"].dtype == torch.float32
        torch.testing.assert_close(u["w"], torch.full((3,), 1.0))  # first Adam step: sign(g), eps aside


def test_decay_mask_given_a_module_says_what_to_pass():
    with pytest.raises(TypeError, match="decay_mask expected the params .* got a module"):
        fo.decay_mask(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "make",
    [lambda: fo.sgd(0.1), lambda: fo.adamw(0.1), lambda: fo.chain(fo.add_decayed_weights(0.1), fo.scale_by_learning_rate(0.1))],
    ids=["sgd", "adamw", "chain"],
)
def test_editing_a_states_hyperparams_never_changes_an_earlier_state(make):
    # The docstrings say the rate "can be changed there": successive states shared one dict, so an edit of the
    # new state's also changed the old one's. Reference: the old state's values as they were before the edit.
    tx = make()
    params = {"w": torch.ones(3)}
    s0 = tx.init(params)
    p1, s1 = fo.step(tx, {"w": torch.ones(3)}, s0, params)
    before = [dict(d) for d in _hyper_dicts(s0)]
    for d in _hyper_dicts(s1):
        for k in d:
            d[k] = torch.tensor(0.5)
    assert [dict(d) for d in _hyper_dicts(s0)] == before
    assert all(v.item() == 0.5 for d in _hyper_dicts(s1) for v in d.values())


def _hyper_dicts(state):
    states = state if isinstance(state, tuple) and not hasattr(state, "_fields") else (state,)
    return [s.hyperparams for s in states if hasattr(s, "hyperparams")]


@pytest.mark.parametrize("make", [lambda: fo.sgd(0.1, momentum=0.9), lambda: fo.adamw(0.1)], ids=["sgd", "adamw"])
def test_gradients_of_another_dtype_than_the_params_are_refused_naming_the_leaf(make):
    # The fused kernels refused them naming no parameter (and under fnlit.donating left the intact state poisoned);
    # the per-leaf path turned the float32 params into float64 ones.
    from fnlit.optim._base import functional_path

    tx = make()
    params = {"a": {"w": torch.ones(2)}, "b": torch.ones(3)}
    grads = {"a": {"w": torch.ones(2, dtype=torch.float64)}, "b": torch.ones(3)}
    for path in (lambda: __import__("contextlib").nullcontext(), functional_path):
        with path(), pytest.raises(ValueError, match=r"gradients of the params' dtypes, but a\['w'\] has a torch.float64 gradient"):
            fo.step(tx, grads, tx.init(params), params)
        # narrower gradients (bfloat16, compressed) are cast up: the same update as the float32 values of them
        narrow = {"a": {"w": torch.full((2,), 0.3).bfloat16()}, "b": torch.ones(3)}
        with path():
            got, _ = fo.step(tx, narrow, tx.init(params), params)
            want, _ = fo.step(tx, tree_map(lambda g: g.float(), narrow), tx.init(params), params)
        assert got["a"]["w"].dtype == torch.float32 and torch.equal(got["a"]["w"], want["a"]["w"])
    # not cast: a real gradient for a complex parameter (the imaginary part would be taken as 0), an integer one
    complex_params = {"a": {"w": torch.ones(2, dtype=torch.complex64)}, "b": torch.ones(3)}
    for bad in (torch.ones(2), torch.ones(2, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"gradients of the params' dtypes"):
            fo.step(tx, {"a": {"w": bad}, "b": torch.ones(3)}, tx.init(complex_params), complex_params)


@pytest.mark.parametrize("make", [lambda: fo.sgd(0.01, momentum=0.9, dampening=0.1),
                                  lambda: fo.sgd(0.01, momentum=0.9)], ids=["per-leaf", "fused"])
@pytest.mark.parametrize("leaf", [torch.zeros, lambda n: torch.nn.Parameter(torch.zeros(n))], ids=["tensor", "parameter"])
def test_an_eager_update_records_no_autograd_history(make, leaf):
    # The per-leaf path (dampening, or a Parameter leaf) chained a grad_fn through every step (memory growing with
    # the run). Reference: torch.optim.SGD's step, which records none.
    tx = make()
    w = leaf(5).requires_grad_()
    params = {"w": w}
    state = tx.init(params)
    for _ in range(3):
        params, state = fo.step(tx, {"w": torch.ones(5)}, state, params)
    assert params["w"].grad_fn is None and state.momentum_buffer["w"].grad_fn is None


@pytest.mark.parametrize("make", [lambda: fo.sgd(0.1, momentum=0.5, dampening=0.1), lambda: fo.adamw(0.1)])
def test_a_hyperparameter_that_is_not_0_d_is_refused(make):
    # torch.tensor([0.1]) turned a 0-d param into shape (1,) on the per-leaf path, and was read as a float on the fused one.
    tx = make()
    params = {"w": torch.ones(())}
    state = tx.init(params)
    state.hyperparams["learning_rate"] = torch.tensor([0.1])
    with pytest.raises(TypeError, match=r"hyperparams\['learning_rate'\] to be a 0-d tensor .* shape \(1,\)"):
        fo.step(tx, {"w": torch.ones(())}, state, params)


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("make", [lambda: fo.adamw(0.1), lambda: fo.sgd(0.1, momentum=0.9)], ids=["adamw", "sgd"])
def test_params_replaced_since_init_by_another_dtype_or_shape_are_refused(make, functional):
    # The fused kernels read the moments as the params' shape: a smaller param updated silently from the first
    # elements (a bigger one would read past the buffer's end); another dtype failed inside torch, naming nothing.
    tx = make()
    state = tx.init({"w": torch.ones(3)})
    for params in ({"w": torch.ones(2)}, {"w": torch.ones(3, dtype=torch.bfloat16)}):
        grads = {"w": torch.ones_like(params["w"])}
        with fo.functional_path() if functional else _nullcontext(), pytest.raises(
            ValueError, match=r"of the params' shapes and dtypes, but w is a .* parameter of shape .*changed since .*init"
        ):
            fo.step(tx, grads, state, params)


@pytest.mark.parametrize("make, ref", [
    (lambda: fo.adam(0.1), lambda ps: torch.optim.Adam(ps, lr=0.1)),
    (lambda: fo.sgd(0.1, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
], ids=["adam", "sgd"])
def test_update_without_params_takes_narrower_gradients_and_names_a_wrong_gradient(make, ref):
    # Without params, zeros shaped as the gradients stood in for them: bfloat16 gradients for float32 moments were
    # blamed as "bfloat16 params changed since init" (or failed inside torch), and a larger gradient as params.
    tx = make()
    state = tx.init({"w": torch.zeros(3)})
    g = torch.tensor([0.5, -1.0, 2.0], dtype=torch.bfloat16)
    update, _ = tx.update({"w": g}, state)
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = g.float()
    ref([p]).step()
    assert update["w"].dtype == torch.float32
    torch.testing.assert_close(update["w"], p.detach(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"expected gradients of the params' shapes, but they differ at w"):
        tx.update({"w": torch.ones(4)}, state)


@pytest.mark.parametrize("bad, where", [
    ({"weight": torch.ones(1, 3), "bias": torch.ones(2)}, r"shapes, but they differ at weight"),
    ({"weight": torch.ones(2, 3), "bias": torch.ones(())}, r"shapes, but they differ at bias"),
    ({"weight": torch.ones(2, 3), "bias": None}, r"structure of the optimizer state.*bias"),
], ids=["row", "scalar", "none"])
def test_add_decayed_weights_refuses_gradients_not_shaped_as_the_params(bad, where):
    # u + wd * p broadcast a (1, 3) gradient up to its (2, 3) weight (a 0-d one up to the bias), so the sgd after it
    # saw the right shapes and the step went through; a None gradient failed with optree's "Expected None, got
    # tensor(...)". torch refuses such a gradient outright (checked below), as sgd alone does.
    w = torch.nn.Parameter(torch.zeros(2, 3))
    if bad["weight"].shape != w.shape:
        with pytest.raises(RuntimeError, match="attempting to assign a gradient of size"):
            w.grad = bad["weight"]
    params = {"weight": torch.ones(2, 3), "bias": torch.ones(2)}
    for tx in (fo.chain(fo.add_decayed_weights(1e-4), fo.sgd(0.1)), fo.add_decayed_weights(1e-4)):
        state = tx.init(params)
        with pytest.raises(ValueError, match=r"add_decayed_weights\.update expected (gradients|grads).*" + where):
            fo.step(tx, bad, state, params)


def test_a_moment_tree_of_another_structure_is_named_before_anything_else():
    # state.nu's structure was never compared; with the merged leaf loop a short one also cut the gradients' checks
    # short (a kernel's "Expected exp_avg_sqs.size() == n_tensors").
    tx = fo.adam(0.1)
    params = {"a": torch.zeros(3), "b": torch.zeros(4)}
    state = tx.init(params)._replace(nu={"a": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"adam.update expected state.nu with the structure of the optimizer state.*b"):
        fo.step(tx, {"a": torch.ones(3), "b": torch.ones(2)}, state, params)


# ---------------------------------------------------------------------------- sparse gradients
def _embedding_steps(sparse: bool, make_opt, steps: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A plain torch loop over an nn.Embedding(sparse=...) model, on lookups that repeat indices."""
    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=sparse), torch.nn.Linear(4, 1))
    opt = make_opt(model.parameters())
    for x, y in _embedding_batches(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}


def _embedding_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.tensor([1, 2, 2, 7, 1, 1]), torch.randn(6, 1, generator=g)) for _ in range(steps)]


def _fnlit_embedding_steps(tx, steps: int = 3, seed: int = 0):
    import torch.nn.functional as F

    import fnlit

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 1))
    step = fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]))
    state = fnlit.TrainState.create(model, tx, seed=0)
    for batch in _embedding_batches(steps):
        state, _ = step(state, batch)
    return state.params


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("kw", SGD_CASES)
def test_sgd_takes_sparse_gradients_as_torch_sgd(kw, functional):
    # It failed with "unsupported memory format option Contiguous" (dampening: no sparse where). Reference:
    # torch.optim.SGD on the sparse module; with weight decay it fails there (add(sparse, dense)), so the dense one.
    ref = _embedding_steps("weight_decay" not in kw, lambda ps: torch.optim.SGD(ps, lr=0.1, **kw))
    with fo.functional_path() if functional else contextlib.nullcontext():
        got = _fnlit_embedding_steps(fo.sgd(0.1, **kw))
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-6)


def test_sgd_update_without_params_takes_a_sparse_gradient():
    g = torch.sparse_coo_tensor(torch.tensor([[1, 2, 2]]), torch.ones(3, 2), (4, 2), check_invariants=True)  # row 2: 2
    tx = fo.sgd(0.5)
    updates, _ = tx.update({"w": g}, tx.init({"w": torch.zeros(4, 2)}))
    torch.testing.assert_close(updates["w"], torch.tensor([[0.0, 0.0], [-0.5, -0.5], [-1.0, -1.0], [0.0, 0.0]]))


@pytest.mark.parametrize("make, name", [(fo.adam, "adam"), (fo.adamw, "adamw")])
def test_adam_refuses_sparse_gradients_as_torch_adam(make, name):
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):  # the reference
        _embedding_steps(True, lambda ps: torch.optim.Adam(ps, lr=0.1), steps=1)
    with pytest.raises(ValueError, match=rf"^{name} does not support sparse gradients .* for 0\.weight\. .*sparse=False"):
        _fnlit_embedding_steps(make(0.1), steps=1)


def test_clip_by_global_norm_of_a_sparse_gradient_is_clip_grad_norm():
    # Reference: clip_grad_norm_ on .grad of the same module (row 1 looked up 3 times, row 2 twice: uncoalesced).
    import torch.nn.functional as F

    import fnlit

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 1))
    x, y = _embedding_batches(1)[0]
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    F.mse_loss(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    _, grads = fnlit.value_and_grad(lambda p: F.mse_loss(fnlit.apply(model, p, {}, x)[0], y))(params)
    for functional in (False, True):
        with fo.functional_path() if functional else contextlib.nullcontext():
            clipped, _ = fo.clip_by_global_norm(0.01).update(grads, fo.EmptyState())
        for k, p in model.named_parameters():
            torch.testing.assert_close(clipped[k].to_dense(), p.grad.to_dense(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dense, clip, kw, make", [
    (False, True, dict(momentum=0.9), lambda: fo.chain(fo.clip_by_global_norm(0.01), fo.trace(0.9), fo.scale(-0.1))),
    (False, False, dict(momentum=0.9, nesterov=True),
     lambda: fo.chain(fo.trace(0.9, nesterov=True), fo.scale_by_learning_rate(0.1))),
    (True, False, dict(weight_decay=0.1), lambda: fo.chain(fo.add_decayed_weights(0.1), fo.scale(-0.1))),
    (True, False, dict(momentum=0.9, weight_decay=0.1),
     lambda: fo.masked(fo.chain(fo.add_decayed_weights(0.1), fo.sgd(0.1, momentum=0.9)), lambda name: True)),
])
def test_sgd_built_from_transforms_takes_sparse_gradients(dense, clip, kw, make):
    # trace and add_decayed_weights failed with "add(sparse, dense) is not supported". Reference: torch.optim.SGD
    # (clipped by clip_grad_norm_ where the chain clips) on the sparse module; with weight decay, where that fails,
    # on the dense one.
    def make_opt(ps):
        ps = list(ps)
        opt = torch.optim.SGD(ps, lr=0.1, **kw)
        if clip:
            step = opt.step
            opt.step = lambda: (torch.nn.utils.clip_grad_norm_(ps, 0.01), step())
        return opt

    ref = _embedding_steps(not dense, make_opt)
    got = _fnlit_embedding_steps(make())
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-6)


def test_scale_by_adam_and_dp_sgd_aggregate_refuse_a_sparse_gradient():
    # They failed naming no parameter: "Could not run 'aten::lerp.Scalar' with arguments from the 'SparseCPU' backend",
    # and "expected per-example gradients ... leading sizes ['1', '10']".
    with pytest.raises(ValueError, match=r"^scale_by_adam does not support sparse gradients .*for 0\.weight\. .*sparse=False"):
        _fnlit_embedding_steps(fo.chain(fo.scale_by_adam(), fo.scale(-0.1)), steps=1)
    with pytest.raises(ValueError, match=r"^dp_sgd_aggregate does not support sparse gradients .*for 0\.weight\. .*"
                                         r"sparse=False.*per_example_grads"):
        _fnlit_embedding_steps(fo.chain(fo.dp_sgd_aggregate(1.0, 0.0), fo.sgd(0.1)), steps=1)


def test_trace_casts_a_narrower_gradient_up_and_refuses_a_wider_one_as_sgd_does():
    # A float64 gradient turned the float32 momentum buffer float64 for good (twice the memory, another dtype in
    # checkpoints), where sgd's momentum refuses it. Reference: torch.optim.SGD's buffer update in float32 for the
    # narrower gradient, and sgd's refusal for the wider one.
    p = {"w": torch.zeros(3)}
    tx = fo.trace(0.9)
    state = tx.init(p)
    with pytest.raises(ValueError, match=r"trace\.update expected gradients of the params' dtypes, but w has a torch\.float64"):
        tx.update({"w": torch.ones(3, dtype=torch.float64)}, state)
    with pytest.raises(ValueError, match=r"sgd\.update expected gradients of the params' dtypes"):
        fo.sgd(0.1, momentum=0.9).update({"w": torch.ones(3, dtype=torch.float64)}, fo.sgd(0.1, momentum=0.9).init(p), p)
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    u, state = tx.update({"w": g}, state)
    u, state = tx.update({"w": g}, state)
    want = g.float() + 0.9 * g.float()  # buf = g; buf = 0.9 * buf + g (SGD's momentum, dampening 0)
    assert state.trace["w"].dtype == torch.float32 and torch.equal(u["w"], want)


def test_dp_sgd_aggregate_of_an_empty_batch_says_so():
    # A batch of 0 examples failed in a reshape ("cannot reshape tensor of 0 elements"). Reference: the mean over
    # no examples is undefined (optax's divides by 0).
    tx = fo.dp_sgd_aggregate(1.0, 0.0)
    with pytest.raises(ValueError, match="at least one example, got a batch of 0"):
        tx.update({"w": torch.zeros(0, 3)}, tx.init(None))


@pytest.mark.parametrize("make, ref", [
    (lambda: fo.sgd(0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, foreach=False)),
    (lambda: fo.sgd(0.05, momentum=0.9, weight_decay=0.01),
     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01, foreach=False)),
    (lambda: fo.adam(1e-2, weight_decay=0.01), lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.01, foreach=False)),
    (lambda: fo.adamw(1e-2, weight_decay=0.1), lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False)),
])
def test_a_0d_parameter_keeps_its_dtype_on_the_functional_path_as_torch_optim(make, ref):
    # q - lr * x with q and lr both 0-d took lr's dtype: a bfloat16 scalar parameter became float32 (and a float32 one
    # beside a float64 model float64) on the path compile, vmap, shard and sgd's dampening take; sgd with momentum then
    # refused the next step ("the params changed since sgd.init"). torch.optim keeps each param's dtype.
    g = torch.Generator().manual_seed(0)
    p0 = {"s": torch.randn((), generator=g).bfloat16(), "f": torch.randn((), generator=g),
          "d": torch.randn(4, generator=g, dtype=torch.float64)}
    seq = [{k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in p0.items()} for _ in range(5)]
    tx = make()
    params, state = p0, tx.init(p0)
    for grads in seq:
        with fo.functional_path():
            params, state = fo.step(tx, grads, state, params)
    assert {k: v.dtype for k, v in params.items()} == {k: v.dtype for k, v in p0.items()}
    want = _run_torch(lambda ps: ref(ps.values()), p0, seq)
    assert {k: v.dtype for k, v in want.items()} == {k: v.dtype for k, v in p0.items()}
    torch.testing.assert_close(params["f"], want["f"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(params["d"], want["d"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(params["s"], want["s"], rtol=1.6e-2, atol=1e-5)  # bfloat16: within its rounding


@pytest.mark.parametrize("functional", [False, True])
def test_clip_by_global_norm_keeps_a_0d_gradients_dtype_as_clip_grad_norm(functional):
    # A 0-d float32 gradient times the 0-d float64 coefficient (another gradient is float64) became float64, and the
    # optimizer after it refused it. clip_grad_norm_ multiplies in place: each gradient keeps its dtype.
    grads = {"s": torch.tensor(3.0), "h": torch.tensor(-2.0).bfloat16(), "d": torch.tensor([4.0, 5.0], dtype=torch.float64),
             "w": torch.tensor([1.0, 2.0])}
    ref = {k: g.clone().requires_grad_() for k, g in grads.items()}
    for k, g in grads.items():
        ref[k].grad = g.clone()
    torch.nn.utils.clip_grad_norm_(ref.values(), 0.5)
    tx = fo.clip_by_global_norm(0.5)
    with fo.functional_path() if functional else contextlib.nullcontext():
        out, _ = tx.update(grads, tx.init(grads))
    for k in grads:
        assert out[k].dtype == grads[k].dtype, k
        torch.testing.assert_close(out[k], ref[k].grad, rtol=1e-6, atol=1e-7)
    params = {k: torch.zeros_like(g) for k, g in grads.items()}
    new, _ = fo.step(fo.chain(fo.clip_by_global_norm(0.5), fo.sgd(1.0, momentum=0.9)), grads,
                     fo.chain(fo.clip_by_global_norm(0.5), fo.sgd(1.0, momentum=0.9)).init(params), params)
    assert {k: v.dtype for k, v in new.items()} == {k: v.dtype for k, v in params.items()}


_SCALAR_PARAMS = {  # a 0-d parameter beside a model of another dtype: a 0-d rate took the wider of the two
    "bfloat16": lambda g: {"s": torch.randn((), generator=g).bfloat16(), "w": torch.randn(3, generator=g)},
    "float32_by_float64": lambda g: {"s": torch.randn((), generator=g), "w": torch.randn(3, generator=g).double()},
}


@pytest.mark.parametrize("functional", [False, True], ids=["eager", "functional"])
@pytest.mark.parametrize("model", list(_SCALAR_PARAMS))
@pytest.mark.parametrize("make, want", [
    (lambda: fo.scale(torch.tensor(-0.1)), lambda u, p: -0.1 * u),
    (lambda: fo.scale(torch.tensor(-0.1, dtype=torch.float64)), lambda u, p: -0.1 * u),
    (lambda: fo.scale_by_learning_rate(0.1), lambda u, p: -0.1 * u),
    (lambda: fo.scale_by_schedule(fo.constant(0.1)), lambda u, p: 0.1 * u),
    (lambda: fo.add_decayed_weights(0.01), lambda u, p: u + 0.01 * p),
], ids=["scale", "scale_float64", "scale_by_learning_rate", "scale_by_schedule", "add_decayed_weights"])
def test_a_0d_update_keeps_its_dtype_in_the_building_blocks(make, want, model, functional):
    # u * lr with u and the rate both 0-d took the wider dtype: a bfloat16 scalar's update came back float32, a
    # float32 one's beside a float64 model float64. Against the product in float64, rounded to the update's dtype.
    g = torch.Generator().manual_seed(0)
    params = _SCALAR_PARAMS[model](g)
    grads = {k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in params.items()}
    tx = make()
    with fo.functional_path() if functional else contextlib.nullcontext():
        updates, _ = tx.update(grads, tx.init(params), params)
    for k, u in updates.items():  # (assert_close checks the dtype too)
        torch.testing.assert_close(u, want(grads[k].double(), params[k].double()).to(grads[k].dtype))


@pytest.mark.parametrize("functional", [False, True], ids=["eager", "functional"])
@pytest.mark.parametrize("model", list(_SCALAR_PARAMS))
def test_a_0d_parameter_keeps_its_dtype_through_scale_by_adam_as_torch_optim_adam(model, functional):
    # (m / bc1) with m and the float32 bias correction both 0-d was float32 for a bfloat16 m; the learning rate
    # then promoted the update again (float64 for a float32 scalar beside a float64 model).
    g = torch.Generator().manual_seed(0)
    p0 = _SCALAR_PARAMS[model](g)
    seq = [{k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in p0.items()} for _ in range(5)]
    tx = fo.chain(fo.scale_by_adam(), fo.scale_by_learning_rate(1e-2))
    params, state = p0, tx.init(p0)
    for grads in seq:
        with fo.functional_path() if functional else contextlib.nullcontext():
            updates, state = tx.update(grads, state, params)
        assert {k: u.dtype for k, u in updates.items()} == {k: v.dtype for k, v in p0.items()}
        params = fo.apply_updates(params, updates)
    want = _run_torch(lambda ps: torch.optim.Adam(ps.values(), lr=1e-2, foreach=False), p0, seq)
    assert {k: v.dtype for k, v in want.items()} == {k: v.dtype for k, v in p0.items()}
    rtol = {torch.bfloat16: 1.6e-2, torch.float32: 1e-6, torch.float64: 1e-12}
    for k, v in want.items():
        torch.testing.assert_close(params[k], v, rtol=rtol[v.dtype], atol=1e-5 if v.dtype is torch.bfloat16 else 1e-9)


@pytest.mark.parametrize("functional", [False, True], ids=["eager", "functional"])
def test_a_0d_complex128_update_is_scaled_by_the_float64_rate(functional):
    # A complex128 model's rate is held in float64 (a float32 one is 1.5e-9 off 0.1); the 0-d leaf's product was
    # computed with it rounded to float32, the vector's with it whole. Against the float64 product, each part.
    u = {"s": torch.tensor(0.3 - 0.7j, dtype=torch.complex128), "w": torch.tensor([0.3 - 0.7j], dtype=torch.complex128)}
    tx = fo.scale_by_learning_rate(0.1)
    with fo.functional_path() if functional else contextlib.nullcontext():
        out, _ = tx.update(u, tx.init(u))
    for k, x in u.items():
        torch.testing.assert_close(out[k], torch.complex(-0.1 * x.real, -0.1 * x.imag), rtol=1e-16, atol=0)
