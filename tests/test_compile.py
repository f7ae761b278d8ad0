"""fnlit.compile and buffer donation: compiled == eager, no recompiles, capture errors that name the line.

Compiling costs ~10-30 s per graph on a small CPU, so the compiled steps are built once per module
and shared; capture-error tests use mode="eager" (dynamo's capture and our checks, no inductor).
"""

import collections
import contextlib
import functools
import inspect

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_trees_close, assert_trees_equal, batch, clone_tree, grads_of, hand_step, mlp, run_threads

import fnlit
from fnlit.transforms.compile import CaptureError, CompiledStep, _Entry
from fnlit.transforms.compile import compile as fnlit_compile
from fnlit.transforms.amp import init_loss_scale
from fnlit.transforms.donate import donating

STEPS = 50


def _run(step, state, n, seed0=0):
    for i in range(n):
        state, metrics = step(state, batch(seed=seed0 + i))
    return state, metrics


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mlp()


@pytest.mark.slow
def test_compiled_sgd_matches_eager(model):
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1, momentum=0.9, weight_decay=1e-3), seed=0)
    compiled = fnlit_compile(hand_step(model))
    got, m_got = _run(compiled, state, 5)
    want, m_want = _run(hand_step(model), state, 5)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m_got["loss"], m_want["loss"], rtol=1e-5, atol=1e-6)
    assert compiled.compiles == 1


@pytest.mark.slow
def test_donated_adamw_schedule_matches_eager_without_recompiling(model):
    tx = fnlit.optim.adamw(fnlit.optim.warmup_cosine(1e-2, 5, STEPS), weight_decay=1e-2)
    state = fnlit.TrainState.create(model, tx, seed=0)
    compiled = fnlit_compile(hand_step(model), donate=True)
    got, _ = _run(compiled, clone_tree(state), STEPS)
    want, _ = _run(hand_step(model), state, STEPS)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
    assert compiled.compiles == 1, "the learning rate changed every step; that must not recompile"
    lrs = fnlit.optim.learning_rate(got.opt_state), fnlit.optim.learning_rate(want.opt_state)
    torch.testing.assert_close(*lrs)


@pytest.mark.slow
def test_compiled_accumulate_amp_bf16_matches_eager(model):
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0)
    step = fnlit.amp(fnlit.accumulate(hand_step(model), 2), dtype=torch.bfloat16)
    compiled = fnlit_compile(step)
    got, m_got = _run(compiled, state, 3)
    want, m_want = _run(step, state, 3)
    # bf16 matmuls under inductor may round in another order than eager's: compare at bf16 precision.
    assert_trees_close(got.params, want.params, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(m_got["loss"], m_want["loss"], rtol=2e-2, atol=1e-2)
    assert int(got.step) == 3 and compiled.compiles == 1


@pytest.mark.parametrize("make_tx", [
    lambda: fnlit.optim.adamw(1e-2, weight_decay=0.5, mask=fnlit.optim.decay_mask),
    lambda: fnlit.optim.chain(
        fnlit.optim.masked(fnlit.optim.add_decayed_weights(0.5), lambda name: not name.endswith("bias")),
        fnlit.optim.sgd(0.1),
    ),
], ids=["adamw_decay_mask", "masked_by_name"])
def test_compiled_optimizer_with_a_weight_decay_mask_matches_eager(model, make_tx):
    state = fnlit.TrainState.create(model, make_tx(), seed=0)
    compiled = fnlit_compile(hand_step(model), mode="eager")  # the mask used to stop the capture
    got, _ = _run(compiled, state, 3)
    want, _ = _run(hand_step(model), state, 3)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)  # a mask ignored (biases decayed) would be off by ~1e-2
    assert compiled.compiles == 1


def _apply(state, grads):
    return state.apply_gradients(grads), {}


def _torch_steps(params, grad_seq, make_opt, rates=None):
    """torch.optim over ``grad_seq``; with ``rates``, its learning rate set to ``rates[i]`` before step ``i``."""
    ps = {k: torch.nn.Parameter(v.detach().clone()) for k, v in params.items()}
    opt = make_opt(ps)
    for i, g in enumerate(grad_seq):
        if rates is not None:
            opt.param_groups[0]["lr"] = rates[i]
        for k, p in ps.items():
            p.grad = g[k].clone()
        opt.step()
    return {k: p.detach() for k, p in ps.items()}


def test_compiled_step_takes_gradients_keyed_in_another_order_as_eager_does():
    # Eagerly the grads' key order does not matter (optree compares the keys); compiled, a grads dict in another order
    # than state.params failed with a CaptureError quoting dynamo's failure to print the two structures
    # ("length mismatch: [2, 3]", or "unhashable type: 'list'").
    torch.manual_seed(0)
    state = fnlit.TrainState.create(torch.nn.Linear(3, 2), fnlit.optim.sgd(0.1, momentum=0.9), seed=0)
    grad_seq = [{k: torch.randn_like(v) for k, v in reversed(list(state.params.items()))} for _ in range(2)]
    assert list(grad_seq[0]) != list(state.params)
    compiled = fnlit_compile(_apply, mode="eager")
    got = state
    for g in grad_seq:
        got, _ = compiled(got, g)
    want = _torch_steps(state.params, grad_seq, lambda ps: torch.optim.SGD(ps.values(), lr=0.1, momentum=0.9))
    assert list(got.params) == list(state.params)
    assert_trees_close(got.params, want, rtol=1e-6, atol=1e-7)


class _Pair:
    """A node registered with torch's pytree only (a user's class): rebuilt by its own unflatten function."""

    def __init__(self, a, b):
        self.a, self.b = a, b


torch.utils._pytree.register_pytree_node(_Pair, lambda p: ([p.a, p.b], "ctx"), lambda kids, ctx: _Pair(*kids))


def test_the_traced_unflatten_rebuilds_every_tree_as_torchs_pytree_does():
    # fnlit.compile rebuilds (state, batch) in the trace by straight-line code made from the structure (dynamo
    # walked torch's generic unflatten node by node): it must give torch's own tree_unflatten's result
    from fnlit.transforms.compile import _unflattener

    torch_pytree = torch.utils._pytree
    point = collections.namedtuple("point", "x y")
    state = fnlit.TrainState.create(torch.nn.Linear(2, 2), fnlit.optim.adamw(0.1), seed=0)
    batches = [
        (torch.ones(2), torch.zeros(2)),
        {"b": [1, None, (2.0,)], 3: point(torch.ones(1), "s"), (1, 2): {}},
        collections.OrderedDict(y=torch.ones(1), x=2),
        collections.defaultdict(list, {"q": [torch.ones(1)]}),
        _Pair(torch.ones(1), [2, 3]),
        None,
        [],
        functools.reduce(lambda inner, _: [inner], range(300), torch.ones(1)),  # too deep for one expression
    ]
    for b in batches:
        leaves, spec = torch_pytree.tree_flatten((state, b))
        got = _unflattener(spec)(tuple(leaves))
        want = torch_pytree.tree_unflatten(leaves, spec)
        assert torch_pytree.tree_structure(got) == spec
        assert all(x is y for x, y in zip(torch_pytree.tree_leaves(got), leaves))
        assert type(got[1]) is type(want[1]) and type(got[0].opt_state) is type(want[0].opt_state)
        if isinstance(b, dict):
            assert list(got[1]) == list(b)  # (torch's pytree keeps a dict's order)
        if isinstance(b, collections.defaultdict):
            assert got[1].default_factory is list


def test_the_traced_flatten_gives_torchs_leaves_and_refuses_every_other_structure():
    # The step's new state is flattened in the trace by straight-line code made from the given state's structure:
    # for a tree of that structure it must give torch's tree_flatten's leaves; for any tree whose torch structure
    # differs (torch's spec comparison is the reference) it must raise, and for none other.
    from fnlit.transforms.compile import _flattener

    torch_pytree = torch.utils._pytree
    point, other_point = collections.namedtuple("point", "x y"), collections.namedtuple("point", "x y")
    state = fnlit.TrainState.create(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)),
                                    fnlit.optim.adamw(0.1), seed=0)
    t = torch.ones(1)
    trees = [
        state,
        state.replace(buffers={}),
        state.replace(tx=fnlit.optim.sgd(0.1)),  # (the optimizer is the node's context)
        (t, t), [t, t], (t,), (t, t, t), (t, {"a": t}),
        {"b": [1, None, (2.0,)], 3: point(t, "s"), (1, 2): {}},
        {3: point(t, "s"), "b": [1, None, (2.0,)], (1, 2): {}},  # the same keys in another order
        {"b": [1, None, (2.0,)], 3: other_point(t, "s"), (1, 2): {}},
        {"b": [1, None, [2.0]], 3: point(t, "s"), (1, 2): {}},
        collections.OrderedDict(y=t, x=2), collections.OrderedDict(x=2, y=t), {"y": t, "x": 2}, {"x": 2, "y": t},
        collections.defaultdict(list, {"q": [t]}), collections.defaultdict(dict, {"q": [t]}),
        _Pair(t, [2, 3]), _Pair(t, [2]), _Pair([t], [2, 3]),
        collections.deque([t, 2]), collections.deque([t]),  # (one context, another number of children)
        None, [], (), {}, t, 2.0, "s",
        functools.reduce(lambda inner, _: [inner], range(300), t),  # too deep for straight-line code
        functools.reduce(lambda inner, _: [inner], range(299), t),
    ]
    for tree in trees:
        spec = torch_pytree.tree_structure(tree)
        flatten = _flattener(spec)
        assert all(x is y for x, y in zip(flatten(tree), torch_pytree.tree_leaves(tree), strict=True))
        for other in trees:
            if torch_pytree.tree_structure(other) != spec:
                with pytest.raises(ValueError, match="another structure"):
                    flatten(other)
            else:
                assert all(x is y for x, y in zip(flatten(other), torch_pytree.tree_leaves(other), strict=True))


def test_compiled_adamw_with_a_mask_its_init_never_resolved():
    # state.replace(tx=adamw(..., mask=decay_mask)) keeping the old opt_state: the mask was first resolved in the
    # traced step, where decay_mask failed with dynamo's "length mismatch" (flattening its dict of bools). It is
    # resolved there now; a function of names, which only an eager call can tell from a function of the params tree,
    # is refused with what to do.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(0.1, weight_decay=0.5), seed=0)  # (its state's decay)
    grad_seq = [{k: torch.randn_like(v) for k, v in state.params.items()} for _ in range(2)]
    got = state.replace(tx=fnlit.optim.adamw(0.1, weight_decay=0.5, mask=fnlit.optim.decay_mask))
    compiled = fnlit_compile(_apply, mode="eager")
    for g in grad_seq:
        got, _ = compiled(got, g)
    want = _torch_steps(state.params, grad_seq, lambda ps: torch.optim.AdamW([
        {"params": [ps["0.weight"]], "weight_decay": 0.5},
        {"params": [ps["0.bias"], ps["1.weight"], ps["1.bias"]], "weight_decay": 0.0},  # biases and the norm's weight
    ], lr=0.1))
    assert_trees_close(got.params, want, rtol=1e-5, atol=1e-6)
    by_name = state.replace(tx=fnlit.optim.adamw(0.1, weight_decay=0.5, mask=lambda name: not name.endswith("bias")))
    with pytest.raises(CaptureError, match=r"adamw could not resolve its mask.*Call tx.init\(params\) once"):
        fnlit_compile(_apply, mode="eager")(by_name, grad_seq[0])


def test_compiled_donated_state_raises_when_reused(model):
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    compiled = fnlit_compile(hand_step(model), donate=True, mode="eager")
    new, _ = compiled(state, batch())
    with pytest.raises(RuntimeError, match=r"(?s)donated to a step \(fnlit.compile\(step, donate=True\)\).*donate=False"):
        state.params["0.weight"]
    with pytest.raises(RuntimeError, match="donated"):
        compiled(state, batch())
    assert int(new.step) == 1


def test_compiled_donated_state_is_poisoned_when_interrupted_after_its_graph_ran(model, monkeypatch):
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    weight = state.params["0.weight"]
    before = weight.clone()
    compiled = fnlit_compile(hand_step(model), donate=True, mode="eager")

    def interrupted(self, new_leaves):
        raise KeyboardInterrupt  # a Ctrl-C arriving right after the graph wrote the state

    monkeypatch.setattr(_Entry, "unflatten_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compiled(state, batch())
    assert not torch.equal(weight, before)  # written in place, and the new state is lost
    with pytest.raises(RuntimeError, match=r"(?s)fnlit.compile\(step, donate=True\)\) that raised an exception after updating.*neither the old state nor the new one"):
        state.params["0.weight"]


def _torch_adamw_with_rates(params, grad_seq, rates):
    return _torch_steps(params, grad_seq, lambda ps: torch.optim.AdamW(ps.values(), lr=rates[0], weight_decay=0.01), rates)


def test_donated_step_takes_a_learning_rate_assigned_as_a_number():
    # optim/_alias.py: a number assigned to hyperparams works, and under compile costs one recompile. Donated, the next
    # call ran the step eagerly and raised a CaptureError blaming compile.py, which read the number's shape to write
    # the new rate into it.
    torch.manual_seed(0)
    state = fnlit.TrainState.create(torch.nn.Linear(3, 2), fnlit.optim.adamw(1e-2, weight_decay=0.01), seed=0)
    grad_seq = [{k: torch.randn_like(v) for k, v in state.params.items()} for _ in range(4)]
    compiled = fnlit_compile(_apply, donate=True, mode="eager")
    got = clone_tree(state)
    for i, g in enumerate(grad_seq):
        if i == 2:
            got.opt_state.hyperparams["learning_rate"] = 5e-3
        got, _ = compiled(got, g)
    want = _torch_adamw_with_rates(state.params, grad_seq, [1e-2, 1e-2, 5e-3, 5e-3])
    assert_trees_close(got.params, want, rtol=1e-5, atol=1e-6)
    assert compiled.compiles == 2  # the number is a constant of its graph; the next state holds it as a tensor
    torch.testing.assert_close(got.opt_state.hyperparams["learning_rate"], torch.tensor(5e-3))


def test_donated_ensemble_takes_one_learning_rate_tensor_for_every_member():
    # ensemble documents a 0-d tensor assigned to a stacked state's hyperparams as one value for every member; the
    # step returns it as (n,). Donated, that was refused as a step changing a state tensor's shape ("keep them in the
    # step, e.g. new.to(old.dtype)"): the user's assignment, not the step, changed it. Such a rate is not donated now.
    torch.manual_seed(0)
    tx = fnlit.optim.adamw(1e-2, weight_decay=0.01)
    members = [fnlit.TrainState.create(torch.nn.Linear(3, 2), tx, seed=i) for i in range(2)]
    state = fnlit.stack_states(members)
    grad_seq = [{k: torch.randn_like(v) for k, v in members[0].params.items()} for _ in range(4)]
    compiled = fnlit_compile(fnlit.ensemble(_apply, 2), donate=True, mode="eager")
    got = clone_tree(state)
    for i, g in enumerate(grad_seq):
        if i == 2:
            got.opt_state.hyperparams["learning_rate"] = torch.tensor(5e-3)
        got, _ = compiled(got, g)  # every member takes the same grads
    for i, member in enumerate(members):
        want = _torch_adamw_with_rates(member.params, grad_seq, [1e-2, 1e-2, 5e-3, 5e-3])
        assert_trees_close({k: v[i] for k, v in got.params.items()}, want, rtol=1e-5, atol=1e-6)
    assert compiled.compiles == 2  # the 0-d rate's graph; then the (n,) one it returns is the first graph's again
    torch.testing.assert_close(got.opt_state.hyperparams["learning_rate"], torch.full((2,), 5e-3))


def test_capture_error_leaves_a_donated_state_intact(model):
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    before = clone_tree(state)
    with pytest.raises(CaptureError, match="host sync"):
        fnlit_compile(_item_step(model), donate=True, mode="eager")(state, batch())
    assert_trees_equal(state, before)  # nothing ran: the state is intact and usable


def _keeping_prev(model):
    """A Lookahead-style step: keeps the first layer's weights from before the update in a buffer."""

    def step(state, batch):
        (loss, buffers), grads = grads_of(model, state, batch)
        return state.apply_gradients(grads, buffers={**buffers, "prev": state.params["0.weight"]}), {"loss": loss}

    return step


@pytest.mark.parametrize("mode", ["eager", pytest.param("default", marks=pytest.mark.slow)])
def test_donated_compile_keeps_values_that_alias_the_donated_state(mode):
    # The kept weights are an input leaf written over by the update, and float16 amp's loss_scale metric is
    # the input's scale tensor, written over by the next steps: both must hold what the step saw, as in eager.
    torch.manual_seed(0)
    model = mlp()
    model.register_buffer("prev", model[0].weight.detach().clone())
    step = fnlit.amp(_keeping_prev(model), dtype=torch.float16)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    state = state.replace(scaler=init_loss_scale(2.0**4, growth_interval=1))  # the scale doubles every step
    compiled = fnlit_compile(step, donate=True, mode=mode)  # inductor had its own bug here with clone()
    got, want, scales_got, scales_want = clone_tree(state), state, [], []
    for i in range(3):
        got, m_got = compiled(got, batch(seed=i))
        want, m_want = step(want, batch(seed=i))
        scales_got.append(m_got["loss_scale"])
        scales_want.append(m_want["loss_scale"])
    assert [float(s) for s in scales_got] == [float(s) for s in scales_want] == [16.0, 32.0, 64.0]  # read later
    torch.testing.assert_close(got.buffers["prev"], want.buffers["prev"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(want.buffers["prev"], want.params["0.weight"], rtol=1e-4, atol=1e-5)


_COPIES = {  # identity copies of views of a donated leaf, as a step may write them
    "row_clone": lambda w: w[1].clone(),
    "flat_clone": lambda w: w.view(-1).clone(),
    "t_clone": lambda w: w.t().clone(),
    "row_detach_clone": lambda w: w[1].detach().clone(),
    "row_times_1": lambda w: w[1] * 1,
    "row_plus_0": lambda w: w[1] + 0,
    "clone_T": lambda w: w.clone().T,  # (views and no-ops inductor removes, on a copy)
    "cat_row": lambda w: torch.cat([w[1]]),
    "split_row": lambda w: torch.split(w.clone(), 1)[1],
}
_FORMS = {  # more of them, as metrics
    "times_1_mT": lambda w: (w * 1).mT, "clone_H": lambda w: w.clone().H, "clone_data": lambda w: w.clone().data,
    "clone_real": lambda w: w.clone().real, "clone_diagonal": lambda w: w.clone().diagonal(),
    "row_pow_1": lambda w: w[1] ** 1, "row_repeat_1": lambda w: w[1].repeat(1), "stack_row": lambda w: torch.stack([w[1]]),
    "clone_unfold": lambda w: w.clone().unfold(0, 2, 1), "unbind_clone": lambda w: w.clone().unbind(0)[2],
    "pad_0": lambda w: torch.nn.functional.pad(w[1], (0, 0)), "row_tile_1": lambda w: torch.tile(w[1], (1,)),
}


def _keeping_views(model):
    """A step whose metrics and kept buffers are views of its input params and batch, taken before the update."""

    def step(state, x):
        loss, grads = fnlit.value_and_grad(lambda p: fnlit.apply(model, p, state.buffers, x)[0].pow(2).mean())(state.params)
        w, b = state.params["0.weight"], state.params["0.bias"]
        views = {"row": w[1], "t": w.t(), "scalar": b[:1].view(()), "detached": w[0].detach(), "x": x}
        kept = {"row": w[1], "t": w.t(), "scalar": b[:1].view(()), "x": x}
        copies = {name: copy(w) for name, copy in _COPIES.items()}  # copies of views: new memory, the same values
        kept.update({f"kept_{name}": value for name, value in copies.items()})
        forms = {name: form(w) for name, form in _FORMS.items()}
        metrics = {"loss": loss.detach(), **views, **copies, **forms}
        return state.apply_gradients(grads, buffers={**state.buffers, **kept}), metrics

    return step


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch._prims_common.check` is deprecated:FutureWarning")  # (inductor's diagonal)
def test_donated_compile_keeps_views_of_the_donated_state_as_the_step_saw_them():
    # Inductor folded the copy of a slice, .t() or .view(()) of a donated leaf (and a batch viewing a donated buffer)
    # and read it after writing the update: the metrics and kept buffers came back holding the new weights. So it
    # did with a copy of such a view (w[1].clone(), w.t().clone(), w[1] * 1), which has memory of its own, with
    # a view of a copy (w.clone().T, .H, .data, .diagonal(), an item of a split) and with the no-ops inductor removes
    # (w[1] ** 1, torch.cat([w[1]]), torch.stack([w[1]]), w[1].repeat(1), padding by zeros).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    for name, shape in {"row": (4,), "t": (4, 3), "scalar": (), "x": (4,)}.items():
        model.register_buffer(name, torch.zeros(shape))
    for name, copy in _COPIES.items():
        model.register_buffer(f"kept_{name}", torch.zeros(copy(torch.zeros(3, 4)).shape))
    model.register_buffer("data", torch.randn(2, 4))
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.5), seed=0)
    step = _keeping_views(model)
    want_state, want = step(clone_tree(state), state.buffers["data"][1])  # the reference: eager, undonated
    donated = clone_tree(state)
    got_state, got = fnlit_compile(step, donate=True, mode="default")(donated, donated.buffers["data"][1])
    w, b = state.params["0.weight"], state.params["0.bias"]
    seen = {"row": w[1], "t": w.t(), "scalar": b[0], "detached": w[0], "x": state.buffers["data"][1]}
    for name, value in seen.items():  # what the step saw, bitwise; not the updated weights
        assert torch.equal(got[name], value) and torch.equal(want[name], value), name
        if name != "detached":
            assert torch.equal(got_state.buffers[name], value), name
    for name, value in {"row_clone": w[1], "flat_clone": w.reshape(-1), "t_clone": w.t(), "row_detach_clone": w[1],
                        "row_times_1": w[1], "row_plus_0": w[1], "clone_T": w.T, "cat_row": w[1],
                        "split_row": w[1:2]}.items():  # (copies: the same, in fresh memory)
        assert torch.equal(want[name], value) and torch.equal(want_state.buffers[f"kept_{name}"], value), name
        assert torch.equal(got[name], value), name
        assert torch.equal(got_state.buffers[f"kept_{name}"], value), name
    w0 = w.clone()  # (each form of the weights the step saw, made here by torch)
    for name, form in _FORMS.items():
        assert torch.equal(want[name], form(w0)) and torch.equal(got[name], form(w0)), name
    assert not torch.equal(got_state.params["0.weight"], w)  # (the update did happen)
    assert_trees_close(got_state, want_state, rtol=1e-5, atol=1e-6)


def _reordered(state):
    """The same state with its params and moments in reversed dict order (optree sorts keys, torch does not)."""
    rev = lambda d: dict(reversed(list(d.items())))  # noqa: E731
    opt = state.opt_state._replace(mu=rev(state.opt_state.mu), nu=rev(state.opt_state.nu))
    return state.replace(params=rev(state.params), opt_state=opt)


def test_compiled_binds_leaves_by_key_whatever_the_dict_order(model):
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0)
    compiled = fnlit_compile(hand_step(model), mode="eager")
    got, _ = compiled(state, batch(seed=0))
    got, _ = compiled(_reordered(got), batch(seed=1))  # same optree structure, other insertion order
    got, _ = compiled(got, batch(seed=2))
    want, _ = _run(hand_step(model), state, 3)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)  # the traced optimizer rounds unlike the fused kernel
    assert compiled.compiles == 1


def test_compiled_step_of_a_model_with_batchnorm_buffers():
    bn_model = mlp(bn=True)
    state = fnlit.TrainState.create(bn_model, fnlit.optim.sgd(0.1), seed=0)
    compiled = fnlit_compile(hand_step(bn_model), mode="eager")  # dynamo's capture, no inductor
    got, _ = _run(compiled, state, 2)
    want, _ = _run(hand_step(bn_model), state, 2)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)  # running statistics included
    assert not torch.equal(got.buffers["1.running_mean"], state.buffers["1.running_mean"])


def test_compiled_batch_dict_order_is_the_steps_to_read():
    # A step may read the batch's values in order: another order must not reuse the first order's graph.
    state = fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(0.1), seed=0)
    step = lambda state, b: (state, {"first": torch.cat(list(b.values()))[:2].sum()})  # noqa: E731
    compiled = fnlit_compile(step, mode="eager")
    ones, zeros = torch.ones(2), torch.zeros(2)
    for b in ({"a": ones, "b": zeros}, {"b": zeros, "a": ones}, {"a": ones, "b": zeros}):
        assert torch.equal(compiled(state, b)[1]["first"], step(state, b)[1]["first"])
    assert compiled.compiles == 2


def test_compiled_python_number_in_the_batch_is_not_stale(model):
    # A Python number is a constant of the captured graph: a new value must recompile, never reuse the old.
    inner = hand_step(model)

    def step(state, b):
        x, y, scale = b
        return inner(state, (x * scale, y))

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    compiled = fnlit_compile(step, mode="eager")
    got, want = state, state
    for i, scale in enumerate([1.0, 3.0, 3.0, 0.5, 2]):
        x, y = batch(seed=i)
        got, m_got = compiled(got, (x, y, scale))
        want, m_want = step(want, (x, y, scale))
        torch.testing.assert_close(m_got["loss"], m_want["loss"], rtol=1e-5, atol=1e-6)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
    assert compiled.compiles == 4, "1.0, 3.0, 0.5 and the int 2: one graph each; 3.0 again reuses its graph"


def test_dynamic_python_int_in_the_batch_shares_one_graph(model):
    # dynamic=True: a Python int is a symbol of the graph (one graph for its values, each with eager's result);
    # a Python `if` on it compiles one graph per side, and a float stays a constant (one graph per value)
    inner = hand_step(model)

    def step(state, b):
        x, y, k, scale = b
        return inner(state, (x * k * (2 if k > 4 else 1) * scale, y))

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    compiled = fnlit_compile(step, mode="eager", dynamic=True)
    x, y = batch(seed=0)
    for i, (k, scale) in enumerate([(2, 1.0), (3, 1.0), (5, 1.0), (6, 1.0), (3, 1.0), (3, 0.5)]):
        got, m_got = compiled(state, (x, y, k, scale))
        want, m_want = step(state, (x, y, k, scale))
        torch.testing.assert_close(m_got["loss"], m_want["loss"], rtol=1e-5, atol=1e-6)
        assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
        assert compiled.compiles == [1, 1, 2, 2, 2, 3][i], (k, scale)


def test_recompile_limit_raises_a_capture_error_naming_the_fixes(model):
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    compiled = fnlit_compile(hand_step(model), mode="eager")
    with torch._dynamo.config.patch(recompile_limit=2):
        for n in (8, 12):
            state, _ = compiled(state, batch(n=n))
        with pytest.raises(CaptureError, match=r"(?s)recompile limit.*for 2 different batch shapes.*recompile_limit = 2"
                           r".*drop_last=True.*dynamic=True.*recompile_limit = N"):
            compiled(state, batch(n=4))
    assert compiled.compiles == 2


def test_compiled_batch_holding_one_tensor_twice(model):
    # The batch is flattened with torch's pytree, which keeps both occurrences.
    inner = hand_step(model)
    step = lambda state, b: inner(state, (b[0] + b[1], b[2]))  # noqa: E731
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    compiled = fnlit_compile(step, mode="eager")
    got = state
    for i in range(3):
        x, y = batch(seed=i)
        got, _ = compiled(got, (x, x, y))
    want = state
    for i in range(3):
        x, y = batch(seed=i)
        want, _ = inner(want, (x + x, y))
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)


def _item_step(model):
    def train_step(state, batch):
        (loss, buffers), grads = grads_of(model, state, batch)
        return state.apply_gradients(grads, buffers=buffers), {"loss": loss.item()}  # ITEM_LINE

    return train_step


def test_capture_error_names_the_item_line(model):
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    source, first = inspect.getsourcelines(_item_step)
    line = first + next(i for i, s in enumerate(source) if "# ITEM_LINE" in s)
    with pytest.raises(CaptureError, match=rf"(?s)test_compile.py:{line}: .*loss.item\(\).*host sync.*Fix: Return the tensor in the metrics"):
        fnlit_compile(_item_step(model), mode="eager")(state, batch())


def test_capture_error_for_print_and_data_dependent_shape(model):
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    inner = fnlit.train_step(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]))

    def printing(state, batch):
        new, metrics = inner(state, batch)
        print("loss", metrics["loss"])
        return new, metrics

    def masking(state, batch):
        new, metrics = inner(state, batch)
        return new, {"pos": batch[0][batch[0] > 0].sum()}

    with pytest.raises(CaptureError, match=r"(?s)print\(\"loss\".*side effect.*Fix: Return the value in the metrics"):
        fnlit_compile(printing, mode="eager")(state, batch())
    with pytest.raises(CaptureError, match=r"(?s)batch\[0\]\[batch\[0\] > 0\].*shape depends on tensor values"):
        fnlit_compile(masking, mode="eager")(state, batch())


def test_a_print_in_a_forward_called_from_a_line_naming_nonzero_is_a_side_effect():
    # The cause was read from all of torch's message, quoted source lines included: a mask named `nonzero` on
    # the loss's line made a print in the forward "a tensor's shape depends on tensor values".
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 4)

        def forward(self, x):
            h = self.lin(x)
            print("activations", h.abs().mean())
            return h

    def loss_fn(m, b):
        x, y = b
        nonzero = (y != 0).float()
        return (F.cross_entropy(m(x), y, reduction="none") * nonzero).sum() / nonzero.sum()

    net = Net()
    state = fnlit.TrainState.create(net, fnlit.optim.sgd(0.1), seed=0)
    with pytest.raises(CaptureError, match=r"(?s)print\(\"activations\".*side effect.*Fix: Return the value in the metrics"):
        fnlit_compile(fnlit.train_step(net, loss_fn), mode="eager")(state, batch())


def test_a_step_returning_another_structure_gets_fnlit_s_own_value_error(model):
    inner = hand_step(model)

    def step(state, b):
        new, metrics = inner(state, b)
        return new.replace(buffers={**new.buffers, "extra": torch.zeros(1)}), metrics

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    with pytest.raises(ValueError, match=r"(?s)another structure than it was given: unexpected buffers\['extra'\].*before TrainState.create"):
        fnlit_compile(step, mode="eager")(state, batch())


def test_a_transform_around_a_compiled_step_is_refused(model):
    # accumulate(compile(step)) applied every micro-batch's update, amp(compile(step)) ran in float32: the
    # transform's frame cannot reach inside the graph. Refused before anything is compiled.
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    for outer in (lambda s: fnlit.accumulate(s, 2), lambda s: fnlit.amp(s, torch.bfloat16)):
        with pytest.raises(ValueError, match=r"compile must be the outermost transform.*fnlit.compile\(fnlit.accumulate"):
            outer(fnlit_compile(hand_step(model), mode="eager"))(state, batch())
    # (it listed fnlit.data_parallel among the transforms to put inside, where compile refuses it too)
    with pytest.raises(ValueError, match=r"data_parallel and fnlit.shard do not compile.*run the step uncompiled under"):
        fnlit.accumulate(fnlit_compile(hand_step(model), mode="eager"), 2)(state, batch())
    # fnlit.ensemble's vmap: it failed with "torch.compile could not trace it (no source line recorded)"
    from fnlit.ensemble import ensemble, ensemble_states

    states = ensemble_states(lambda: model, fnlit.optim.sgd(0.1), seeds=[0, 1])
    with pytest.raises(ValueError, match=r"runs under torch.func.*fnlit.compile\(fnlit.ensemble\(step, n\)\)"):
        ensemble(fnlit_compile(hand_step(model), mode="eager"), 2)(states, batch())


def test_compiling_a_compiled_step_again_is_refused_before_capture(model):
    # compile(compile(step)) and compile(accumulate(compile(step), k)) failed inside the capture with optree's
    # "SourcelessBuilder.create does not know how to wrap DictMetaData", blamed on a line of optree.
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    before = clone_tree(state)
    inner = fnlit_compile(hand_step(model), mode="eager")
    for outer in (fnlit_compile(inner, mode="eager"), fnlit_compile(fnlit.accumulate(inner, 2), mode="eager")):
        with pytest.raises(ValueError, match=r"already compiled.*Compile once, outermost.*\.step"):
            outer(state, batch())
        assert outer.compiles == 0
    assert_trees_equal(state, before)


def test_donating_around_a_compiled_step_is_refused_and_leaves_the_state_usable(model):
    # donating(compile(step)) ran, updated nothing in place (the graph never does) and poisoned the input state.
    # Reference: the eager step, run on the state the refused call was given.
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    before = clone_tree(state)
    compiled = fnlit_compile(hand_step(model), mode="eager")
    for outer in (donating(compiled), donating(lambda s, b: compiled(s, b))):
        with pytest.raises(ValueError, match=r"called inside fnlit.donating.*fnlit.compile\(step, donate=True\)"):
            outer(state, batch())
    assert_trees_equal(state, before)
    hand_step(model)(state, batch())  # usable: not poisoned


@pytest.mark.parametrize("keys", [("loss",), ("loss", "acc")])
def test_an_eval_step_is_refused_saying_compile_takes_a_training_step(model, keys):
    # Its metrics dict was unpacked as (state, metrics): "not enough values to unpack" for one key, "returned a
    # state of another structure: got a str" for two. Reference: fnlit.eval_step's documented return, a dict.
    ev = fnlit.eval_step(model, lambda m, b: {k: F.cross_entropy(m(b[0]), b[1]) for k in keys})
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    assert isinstance(ev(state, batch()), dict)
    with pytest.raises(TypeError, match=r"takes a training step `\(state, batch\) -> \(state, metrics\)`.*returned a "
                       r"dict with keys.*torch.compile\(eval_step\)"):
        fnlit_compile(ev, mode="eager")(state, batch())


def test_capture_error_of_a_logging_call_names_the_steps_line_not_the_standard_librarys(model):
    import logging

    inner = fnlit.train_step(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]))

    def step(state, batch):
        new, metrics = inner(state, batch)
        logging.getLogger("fnlit.test").warning("loss %s", metrics["loss"])  # LOG_LINE
        return new, metrics

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    source, first = inspect.getsourcelines(step)
    line = first + next(i for i, s in enumerate(source) if "# LOG_LINE" in s)
    with pytest.raises(CaptureError, match=rf"(?s)test_compile.py:{line}: logging.getLogger.*side effect"):
        fnlit_compile(step, mode="eager")(state, batch())


def test_donated_compile_refuses_a_state_tensor_that_changes_dtype_or_shape():
    # copy_ into the donated tensor cast a float EMA into an int64 buffer (0 every step) or broadcast it.
    model = mlp()
    model.register_buffer("ema", torch.tensor(0))  # int64 by mistake
    inner = hand_step(model)

    def step(state, b):
        new, metrics = inner(state, b)
        ema = state.buffers["ema"] * 0.9 + metrics["loss"] * 0.1  # int64 * float: a float32 tensor
        return new.replace(buffers={**new.buffers, "ema": ema}), metrics

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    eager, _ = step(state, batch())
    assert eager.buffers["ema"].dtype == torch.float32 and eager.buffers["ema"] != 0
    with pytest.raises(ValueError, match=r"donate=True\): the step returned state buffers\['ema'\] as a torch.float32.*int64"):
        fnlit_compile(step, donate=True, mode="eager")(state, batch())
    assert state.buffers["ema"].dtype == torch.int64  # intact: the error came while capturing


@pytest.mark.parametrize("make_tx", [lambda: fnlit.optim.sgd(0.1, momentum=0.9), lambda: fnlit.optim.adamw(1e-2)])
def test_dynamic_shapes_compile_optimizers_with_python_float_hyperparameters(model, make_tx):
    # dynamic=True lifted the optimizers' Python floats (momentum, betas) to inputs read with .item(), which
    # fnlit reported as the step's host sync. Reference: the eager step, over batches of three sizes.
    state = fnlit.TrainState.create(model, make_tx(), seed=0)
    compiled, eager = fnlit_compile(hand_step(model), mode="eager", dynamic=True), hand_step(model)
    got = want = state
    for i, n in enumerate([16, 8, 12]):
        got, _ = compiled(got, batch(n=n, seed=i))
        want, _ = eager(want, batch(n=n, seed=i))
    assert_trees_close(got.params, want.params, rtol=1e-5, atol=1e-6)
    assert compiled.compiles <= 2  # one static graph, then one dynamic


def test_an_error_of_a_transform_inside_the_step_is_raised_as_eager_raises_it(model):
    # accumulate's refusal of an indivisible batch came out as a CaptureError about the line
    # `super().__init__(` of its exception class, "Move this line out of the step". Reference: the eager step's
    # error (accumulate's documented refusal). The state, not donated to the eager re-run, stays intact.
    step = fnlit.accumulate(hand_step(model), 2)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    before = clone_tree(state)
    with pytest.raises(ValueError, match=r"cannot split batch leaf \[0\] of 3 examples into 2 equal micro-batches"):
        step(state, batch(3))
    with pytest.raises(ValueError, match=r"cannot split batch leaf \[0\] of 3 examples into 2 equal micro-batches"):
        fnlit_compile(step, donate=True, mode="eager")(state, batch(3))
    assert_trees_equal(state, before)


def test_a_side_effect_that_fails_the_capture_is_not_carried_out_by_the_eager_run(model, tmp_path):
    # The eager run that tells a step's own errors from the capture's wrote the file the CaptureError is about:
    # the call raised and still wrote once. Reference: a step that never ran writes nothing (no file); the
    # cause is named as the side effect it is.
    log = tmp_path / "log.txt"
    inner = hand_step(model)

    def step(state, b):
        with open(log, "a") as f:
            f.write("x\n")
        return inner(state, b)

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    before = clone_tree(state)
    with pytest.raises(CaptureError, match=r"(?s)open\(log, .a.\).*because a Python side effect"):
        fnlit_compile(step, donate=True, mode="eager")(state, batch())
    assert not log.exists()
    assert_trees_equal(state, before)


def test_a_print_reading_out_float_and_a_torch_save_are_side_effects_and_are_not_carried_out(model, tmp_path, capsys):
    # A line with `.float(` was labelled a host sync although torch named `print`, and torch.save was "could not
    # trace it": either way the step then ran once eagerly, printing or writing although the call raised.
    # Reference: a step that never ran prints nothing and writes no file.
    inner, path = hand_step(model), tmp_path / "out.pt"

    def printing(state, b):
        print("shape", b[0].float().shape)
        return inner(state, b)

    def saving(state, b):
        torch.save(b[0], path)
        return inner(state, b)

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    for step, line in ((printing, r"print\(\"shape\""), (saving, r"torch.save\(b\[0\], path\)")):
        with pytest.raises(CaptureError, match=rf"(?s){line}.*because a Python side effect"):
            fnlit_compile(step, mode="eager")(state, batch())
    assert capsys.readouterr().out == "" and not path.exists()


def test_an_exception_class_of_the_users_own_is_raised_as_eager_raises_it(model):
    # torch.compile cannot trace an exception class's own __init__: the step's error came out as a CaptureError
    # about that line. Reference: the error the step raises uncompiled.
    class BadBatch(ValueError):
        def __init__(self, n):
            super().__init__(f"a batch of {n} examples is too small")

    def step(state, b):
        if b[0].shape[0] < 4:
            raise BadBatch(b[0].shape[0])
        return hand_step(model)(state, b)

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    with pytest.raises(BadBatch, match="a batch of 2 examples is too small"):
        fnlit_compile(step, mode="eager")(state, batch(2))


def test_a_failed_assert_of_the_step_is_raised_as_eager_raises_it(model):
    # torch reports a failing `assert` as "Data-dependent assertion failed": a CaptureError called it a host sync
    # ("reads a tensor's value on the host"). Reference: the AssertionError the step raises uncompiled, on a first
    # call and after a batch size that compiled a dynamic graph.
    # (compiled from text: pytest rewrites this module's asserts into an if and a raise, which torch reports as an
    # exception, not as an assert)
    space = {"inner": hand_step(model)}
    exec(compile(
        "def step(state, b):\n    assert b[0].shape[0] % 2 == 0, 'expected an even batch'\n    return inner(state, b)\n",
        "<a step with an assert>", "exec",
    ), space)  # fmt: skip
    step = space["step"]
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    with pytest.raises(AssertionError, match="expected an even batch"):
        step(state, batch(5))
    with pytest.raises(AssertionError, match="expected an even batch"):
        fnlit_compile(step, mode="eager")(state, batch(5))
    compiled = fnlit_compile(step, mode="eager")
    for n in (4, 6):
        compiled(state, batch(n))
    with pytest.raises(AssertionError, match="expected an even batch"):
        compiled(state, batch(5))


def test_a_sparse_gradient_is_refused_naming_the_parameter():
    # The CaptureError named fnlit's own line (value_and_grad's torch.func.grad_and_value), "Move this line out of
    # the step". Refused now as fnlit.data_parallel refuses it, naming the parameter and sparse=False; the state
    # stays as it was.
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 1))
    step = fnlit.amp(fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]).float(), b[1])), torch.float16)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1, momentum=0.9), seed=0, loss_scale="dynamic")
    before = clone_tree(state)
    with pytest.raises(CaptureError, match=r"fnlit\.compile does not support sparse gradients .*for 0\.weight\. .*sparse=False"):
        fnlit_compile(fnlit.accumulate(step, 2), mode="eager")(state, (torch.tensor([1, 2, 2, 7]), torch.randn(4, 1)))
    assert_trees_equal(state, before)


def test_capture_error_carries_the_message_of_an_error_raised_only_when_traced():
    # dp_sgd_aggregate refuses to be traced (its noise is drawn eagerly); the CaptureError dropped its words.
    model = torch.nn.Linear(4, 3)

    def step(state, b):
        def loss(p, ex):
            return F.cross_entropy(fnlit.apply(model, p, {}, ex[0].unsqueeze(0))[0], ex[1].unsqueeze(0))

        _, grads = fnlit.per_example_grads(loss, state.params, b)
        return state.apply_gradients(grads), {}

    tx = fnlit.optim.chain(fnlit.optim.dp_sgd_aggregate(1.0, 1.0, seed=0), fnlit.optim.sgd(0.1))
    state = fnlit.TrainState.create(model, tx, seed=0)
    with pytest.raises(CaptureError, match=r"(?s)when traced: RuntimeError\('dp_sgd_aggregate runs eagerly only"):
        fnlit_compile(step, mode="eager")(state, (torch.randn(8, 4), torch.randint(0, 3, (8,))))


@pytest.mark.parametrize("fp16", [False, True])
def test_a_compiled_ensemble_seeds_from_its_members_keys_and_matches_the_eager_ensemble(fp16):
    # compile(ensemble(step, n)) tried to seed from the stacked (n,) keys and failed on its first call. With float16
    # amp inside (the order ensemble's docs give), it failed to capture, blaming the step's value_and_grad line: the
    # unscale asked functorch for its level with no compile guard. Reference: the eager ensemble (whose members' loss
    # scales follow GradScaler's rule: tested in test_ensemble).
    from fnlit.ensemble import ensemble, ensemble_states

    inner = fnlit.amp(hand_step(mlp()), torch.float16) if fp16 else hand_step(mlp())
    step = ensemble(inner, 3)
    tx = fnlit.optim.sgd(0.1) if fp16 else fnlit.optim.adamw(1e-2)
    states = ensemble_states(mlp, tx, seeds=[0, 1, 2], loss_scale="dynamic" if fp16 else None)
    compiled = fnlit_compile(step, mode="eager")
    got = want = states
    for i in range(2):
        got, _ = compiled(got, batch(seed=i))
        want, _ = step(want, batch(seed=i))
    assert_trees_close(got.params, want.params, rtol=1e-5, atol=1e-6)
    assert_trees_close(got.scaler, want.scaler)


def test_an_eager_training_forward_before_compiling_does_not_break_the_capture():
    # An eager training-mode fnlit.apply (a shape check) left the dropped-statistics marker set, and the
    # compiled step's apply_gradients then read and reset it inside the trace: a CaptureError.
    torch.manual_seed(0)
    model = mlp(bn=True)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    fnlit.apply(model, state.params, state.buffers, batch()[0])
    step = fnlit.train_step(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    got, _ = fnlit_compile(step, mode="eager")(state, batch())
    want, _ = step(state, batch())
    assert_trees_close(got.params, want.params, rtol=1e-5, atol=1e-6)
    assert_trees_close(got.buffers, want.buffers, rtol=1e-5, atol=1e-6)


def test_compile_refuses_shard_before_running_it(model):
    # compile(shard(step)) ran one step eagerly, then raised a CaptureError quoting shard's own check, whose advice
    # ("or fnlit.data_parallel with compile") compile refuses too. Refused up front now, as data_parallel is.
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    with pytest.raises(NotImplementedError, match=r"contains fnlit.shard.*Run shard\(step\) uncompiled"):
        fnlit_compile(fnlit.shard(hand_step(model)), mode="eager")(state, batch())


def test_compile_rejects_data_parallel_and_bad_modes(model):
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    with pytest.raises(NotImplementedError, match="data_parallel.*uncompiled"):
        fnlit_compile(fnlit.data_parallel(hand_step(model)))(state, batch())
    with pytest.raises(ValueError, match=r"compile\(step, donate=True\) instead of fnlit.compile\(fnlit.donating"):
        fnlit_compile(donating(hand_step(model)))(state, batch())
    assert_trees_equal(state.params, fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0).params)  # intact
    with pytest.raises(ValueError, match="expected mode in .* got 'fast'"):
        fnlit_compile(hand_step(model), mode="fast")
    with pytest.raises(ValueError, match="reduce-overhead.*donate=True"):
        fnlit_compile(hand_step(model), mode="reduce-overhead")(state, batch())
    assert isinstance(fnlit_compile(hand_step(model)), CompiledStep)


@pytest.mark.parametrize("make_tx", [lambda: fnlit.optim.adamw(1e-2), lambda: fnlit.optim.sgd(0.1, momentum=0.9)])
def test_eager_donation_is_bitwise_and_poisons(model, make_tx):
    state = fnlit.TrainState.create(model, make_tx(), seed=0)
    want, _ = _run(hand_step(model), state, 3)
    donated = clone_tree(state)
    got, _ = _run(donating(hand_step(model)), donated, 3)
    assert_trees_equal(got, want)
    with pytest.raises(RuntimeError, match="donated to a step \\(fnlit.donating\\)"):
        fnlit.apply(model, donated.params, donated.buffers, batch()[0])


def test_eager_donation_with_float16_scaler_keeps_overflow_semantics(model):
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0, loss_scale=2.0**100)  # overflows
    step = fnlit.amp(hand_step(model), dtype=torch.float16)
    want, m = step(state, batch())
    got, _ = donating(step)(clone_tree(state), batch())
    assert float(m["grads_finite"]) == 0.0
    assert_trees_equal(got, want)


@pytest.mark.cuda
def test_cuda_graph_step_matches_eager():
    model = mlp().cuda()
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0)
    compiled = fnlit_compile(hand_step(model), donate=True)  # auto: CUDA graphs
    data = [tuple(t.cuda() for t in batch(seed=i)) for i in range(5)]
    got, want = clone_tree(state), state
    for b in data:
        got, _ = compiled(got, b)
        want, _ = hand_step(model)(want, b)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
    assert compiled.compiles == 1


@pytest.mark.cuda
def test_cuda_compiled_amp_bf16_schedule_no_recompile():
    model = mlp().cuda()
    tx = fnlit.optim.adamw(fnlit.optim.cosine_decay(1e-2, STEPS))
    state = fnlit.TrainState.create(model, tx, seed=0)
    compiled = fnlit_compile(fnlit.amp(hand_step(model)), donate=True)
    for i in range(STEPS):
        state, metrics = compiled(state, tuple(t.cuda() for t in batch(seed=i)))
    assert compiled.compiles == 1 and torch.isfinite(metrics["loss"])


def test_importing_fnlit_loads_neither_dynamo_nor_dtensor():
    # torch loads dynamo (~1 s on a small CPU) only when something compiles; `import fnlit` must not do it
    # for every process (each rank of fnlit.distributed.launch imports it). Reference: `import torch` alone.
    # Nor DTensor (~0.7 s, and apply then scans every call's params for DTensors): fit's evaluation imported it.
    import subprocess
    import sys

    # One process: what `import torch` loaded, then what `import fnlit` added to it.
    probe = (
        "import sys\n"
        "def heavy(): return sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'torch._inductor', "
        "'torch.distributed.tensor')))\n"
        "import torch\nprint(heavy())\nimport fnlit\nprint(heavy())\n"
    )
    torch_alone, with_fnlit = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert with_fnlit == torch_alone, f"import fnlit loaded {with_fnlit}, import torch {torch_alone}"


def test_a_graph_compiled_later_that_draws_random_numbers_is_seeded_from_the_key():
    # A Python flag in the batch compiles a second graph; the first drew no random numbers, and the second ran
    # unseeded on its first call (another result than its later calls, the global generator advanced).
    # Reference: the eager step, which seeds from state.rng.
    model = torch.nn.Linear(8, 4)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    x, y = batch(8, d_in=8)

    def step(state, data):
        x, y, noise = data
        if noise:  # input noise on some steps
            x = x + 0.1 * torch.randn_like(x)
        loss, grads = fnlit.value_and_grad(lambda p: F.cross_entropy(fnlit.apply(model, p, {}, x)[0], y))(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    compiled = fnlit_compile(step, mode="eager")
    compiled(state, (x, y, False))
    with fnlit.random.seeded(state.rng):
        _, want = step(state, (x, y, True))
    generator = torch.random.get_rng_state()
    for _ in range(2):
        _, got = compiled(state, (x, y, True))
        assert torch.equal(got["loss"], want["loss"])
    assert torch.equal(torch.random.get_rng_state(), generator)
    assert compiled.compiles == 2


@pytest.mark.parametrize("noise", ["rrelu", "cauchy", "gamma"])
def test_every_random_op_of_a_compiled_step_is_seeded_from_the_key(noise):
    # Only ops named like rand/dropout/normal/... were seeded: RReLU, Tensor.cauchy_ and torch._standard_gamma
    # (Gamma.rsample) drew from the global generator: another loss on each call with the same key, and the
    # caller's generator advanced. Reference: the eager step seeded from state.rng (as the test above).
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.RReLU()) if noise == "rrelu" else torch.nn.Linear(8, 8)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)

    def step(state, data):
        x, y = data
        if noise == "cauchy":
            x = x + 0.01 * torch.empty_like(x).cauchy_()
        elif noise == "gamma":
            x = x * torch.distributions.Gamma(torch.full_like(x, 2.0), 2.0).rsample()

        def loss_fn(p):
            return F.cross_entropy(fnlit.apply(model, p, {}, x)[0], y)

        loss, grads = fnlit.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    data = batch(8, d_in=8, classes=8)
    with fnlit.random.seeded(state.rng):
        _, want = step(state, data)
    compiled = fnlit_compile(step, mode="eager")
    generator = torch.random.get_rng_state()
    for _ in range(2):
        _, got = compiled(state, data)
        assert torch.equal(got["loss"], want["loss"])
    assert torch.equal(torch.random.get_rng_state(), generator)


_LOSSES: list = []


class _History(list):  # a list subclass
    pass


class _Window(collections.deque):  # a deque subclass (it failed with a NameError from dynamo's replay)
    pass


@pytest.mark.parametrize("kind", ["deque", "list subclass", "deque subclass"])
def test_a_step_changing_a_deque_or_list_subclass_outside_it_is_refused(model, kind):
    # Each was replayed from its capture: it kept one entry, dropping what other code appended.
    kept = {"deque": collections.deque(maxlen=10), "list subclass": _History(), "deque subclass": _Window()}[kind]

    def step(state, batch):
        new, metrics = hand_step(model)(state, batch)
        kept.append(metrics["loss"])
        return new, metrics

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    # (torch 2.13's dynamo cannot trace a deque subclass's append at all: refused as untraceable there)
    refused = r"changes a list that lives outside it" + (r"|could not trace it" if kind == "deque subclass" else "")
    with pytest.raises(CaptureError, match=refused):
        fnlit_compile(step, mode="eager")(state, batch())


def test_a_step_changing_a_list_outside_it_is_refused_not_replayed(model):
    # Dynamo replays such a change after each call from what it saw while capturing: eagerly the list below ends
    # with 6 entries (3 losses, 3 markers); compiled it kept 2, the latest loss and the last marker.
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)

    def step(state, batch):
        new, metrics = hand_step(model)(state, batch)
        _LOSSES.append(metrics["loss"])
        return new, metrics

    _LOSSES.clear()
    for _ in range(3):
        step(state, batch())
        _LOSSES.append("marker")
    assert len(_LOSSES) == 6  # the eager reference
    with pytest.raises(CaptureError, match=r"(?s)changes a list that lives outside it \(.*_LOSSES\).*return the value in the metrics"):
        fnlit_compile(step, mode="eager")(state, batch())


class _Cached(torch.nn.Module):  # keeps its last hidden activation on an attribute (as a rotary cache does)
    def __init__(self):
        super().__init__()
        self.lin, self.out = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
        self.last = None

    def forward(self, x):
        self.last = torch.relu(self.lin(x))
        self.rows = x.shape[0]  # a Python number set from the input, not counted up
        return self.out(self.last)


@pytest.mark.parametrize("variant", ["cache", "eval_forward", "parametrize_cached"])
def test_steps_whose_changes_outside_are_replayed_correctly_still_compile(variant):
    # Attribute stores (a cache, the training flags fnlit.apply sets and restores for a train=False forward) and
    # torch's module-level state set and restored are replayed with each call's values: earlier versions of the
    # list check refused them. Reference: the eager step.
    torch.manual_seed(0)
    model = _Cached() if variant == "cache" else mlp()
    if variant == "parametrize_cached":  # torch's documented use: it counts a module global up and back down
        torch.nn.utils.parametrizations.weight_norm(model[0])
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Dropout(0.5))  # a train=False forward flips its flags
    t_state = fnlit.TrainState.create(teacher, fnlit.optim.sgd(0.1), seed=0)

    def step(state, b):
        x, y = b
        soft = fnlit.apply(teacher, t_state.params, t_state.buffers, x, train=False)[0] if variant == "eval_forward" else None

        def loss_fn(p):
            with torch.nn.utils.parametrize.cached() if variant == "parametrize_cached" else contextlib.nullcontext():
                logits, _ = fnlit.apply(model, p, state.buffers, x)
            loss = F.cross_entropy(logits, y)
            if soft is not None:
                loss = loss + F.mse_loss(logits, soft)
            return loss

        loss, grads = fnlit.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    want, got = state, state
    compiled = fnlit_compile(step, mode="eager")
    for i in range(2):
        want, _ = step(want, batch(seed=i))
        got, _ = compiled(got, batch(seed=i))
    assert_trees_close(got.params, want.params)


def test_a_compiled_step_shared_by_two_threads_seeds_each_call_from_its_own_key():
    # The running call's key lived on the shared object: one thread's dropout was seeded from the other's key (or
    # from None: a TypeError). Reference: the same calls run one thread after the other. (A race: without the fix
    # this failed in one run of four here; with it, the calls cannot see each other's key.) torch 2.14's process-wide
    # fullgraph frame count made one thread's call fail with "found no compiled frames" (4 runs of 10 here) until
    # fnlit.compile ran one compiled call at a time.

    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    tx = fnlit.optim.sgd(0.1)
    starts = [fnlit.TrainState.create(model, tx, seed=s) for s in (1, 2)]
    compiled = fnlit_compile(hand_step(model), mode="eager")  # its dropout draws from state.rng

    def run(s, out):
        try:
            for _ in range(1000):
                s, m = compiled(s, (x, y))
                out.append(m["loss"])
        except Exception as e:  # noqa: BLE001 (reported below)
            out.append(e)

    refs = [[], []]
    for s, r in zip(starts, refs):
        run(s, r)
    got = [[], []]
    run_threads(run, list(zip(starts, got)))
    for r, g in zip(refs, got):
        assert len(g) == len(r) and all(isinstance(a, torch.Tensor) and torch.equal(a, b) for a, b in zip(g, r))


def test_a_compiled_step_called_inside_a_seeded_block_while_another_thread_calls_it_does_not_deadlock():
    # One compiled call at a time took a lock of its own, then (a graph drawing random numbers) fnlit.random's; a
    # call inside `with fnlit.random.seeded(k):` holds fnlit.random's first: two threads waited on each other for
    # good. Reference: the same calls one thread after the other finish (and the threads' results equal them).
    import threading
    import time

    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    compiled = fnlit_compile(hand_step(model), mode="eager")  # its dropout draws from state.rng
    want = compiled(state, (x, y))[1]["loss"]

    def plain(out):
        for _ in range(300):
            out.append(compiled(state, (x, y))[1]["loss"])

    def inside_seeded(out):
        for _ in range(300):
            with fnlit.random.seeded(fnlit.random.key(1)):
                out.append(compiled(state, (x, y))[1]["loss"])

    got = [[], []]
    threads = [threading.Thread(target=f, args=(o,), daemon=True) for f, o in zip((plain, inside_seeded), got)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "the two threads' compiled calls deadlocked"
    assert [len(g) for g in got] == [300, 300] and all(torch.equal(v, want) for g in got for v in g)


def test_a_donated_state_whose_tensors_share_storage_is_refused_and_a_copy_matches_eager():
    # An EMA buffer started from the params without .clone(): the graph wrote both new values into the one
    # storage, silently (params 0.0065 off after 3 steps, and linked for good). jax.jit refuses such a donation.
    model = mlp()
    base = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)

    def step(state, b):
        x, y = b
        loss, g = fnlit.value_and_grad(lambda p: F.cross_entropy(fnlit.apply(model, p, {}, x)[0], y))(state.params)
        new = state.apply_gradients(g)
        ema = {"ema." + k: 0.5 * state.buffers["ema." + k] + 0.5 * v for k, v in new.params.items()}
        return new.replace(buffers=ema), {"loss": loss}

    aliased = base.replace(buffers={"ema." + k: v for k, v in base.params.items()})
    compiled = fnlit_compile(step, donate=True, mode="eager")
    with pytest.raises(ValueError, match=r"donate=True\) got a state whose params\['0\.bias'\] and buffers\['ema\.0\.bias'\] share storage"):
        compiled(aliased, batch())
    assert torch.equal(aliased.params["0.weight"], base.params["0.weight"])  # refused before anything ran
    got = base.replace(buffers={"ema." + k: v.clone() for k, v in base.params.items()})
    got, want = clone_tree(got), got
    for i in range(3):  # the reference: the same step, eager and undonated
        got, _ = compiled(got, batch(seed=i))
        want, _ = step(want, batch(seed=i))
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)


def test_a_donated_state_of_disjoint_views_of_one_storage_is_accepted_and_matches_eager():
    # Only overlapping memory is refused: donation writes each leaf's own bytes.
    model = torch.nn.Linear(2, 1)
    flat = torch.zeros(3)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    state = state.replace(params={"weight": flat[:2].view(1, 2), "bias": flat[2:3]})
    step = fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]))
    b = (torch.ones(4, 2), torch.ones(4, 1))
    want, _ = step(clone_tree(state), b)  # the reference: eager, undonated
    got, _ = fnlit_compile(step, donate=True, mode="eager")(state, b)
    assert_trees_close(got.params, want.params, rtol=1e-6, atol=1e-7)


def test_a_donated_compiled_step_keeps_no_state_alive():
    # It kept the state it last returned (to skip re-checking it): the model and optimizer state stayed in memory.
    import gc
    import weakref

    model = mlp()
    compiled = fnlit_compile(hand_step(model), donate=True, mode="eager")
    state, _ = compiled(fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0), batch())
    alive = weakref.ref(state.params["0.weight"])
    del state
    gc.collect()
    assert alive() is None


def _models_left_after_compiling(compile_one, runs=2):
    """Compiles and runs a step for a fresh model ``runs`` times, dropping everything: how many models stay alive."""
    import gc
    import weakref

    refs = []
    for i in range(runs):
        model = mlp(dropout=0.5)  # (dropout: a graph that draws random numbers, seeded through the backend)
        refs.append(weakref.ref(model))
        compile_one(model, i)
        del model
    gc.collect()
    return sum(r() is not None for r in refs)


def _plain_torch_compile(mode):
    def compile_one(model, i):  # the reference: torch.compile of a loss closing over the model, a torch optimizer
        opt = torch.optim.SGD(model.parameters(), 0.1)

        def loss(x, y):
            return F.cross_entropy(model(x), y)

        compiled = torch.compile(loss, fullgraph=True, backend="eager" if mode == "eager" else "inductor")
        for k in range(2):
            compiled(*batch(seed=k)).backward()
            opt.step()
            opt.zero_grad()

    return compile_one


def _fnlit_compile(mode, donate):
    def compile_one(model, i):
        state = fnlit.TrainState.create(model, fnlit.optim.adam(1e-3), seed=i)
        compiled = fnlit_compile(hand_step(model), mode=mode, donate=donate)
        for k in range(2):
            state, _ = compiled(state, batch(seed=k))
        assert compiled.compiles == 1

    return compile_one


@pytest.fixture(scope="module")
def torch_compile_frees_models():
    """The reference, once for both parametrizations below: whether plain torch.compile frees its models."""
    return _models_left_after_compiling(_plain_torch_compile("eager")) == 0


@pytest.mark.parametrize("donate", [False, True])
def test_a_compiled_step_keeps_no_model_alive_once_dropped(donate, torch_compile_frees_models):
    # dynamo keeps every backend it was given for the whole process; fnlit's held the compiled step, so each
    # compiled step's model stayed in memory until exit (a sweep grew by one model per run). torch.compile's frees them.
    assert torch_compile_frees_models
    assert _models_left_after_compiling(_fnlit_compile("eager", donate)) == 0


@pytest.mark.slow
def test_an_inductor_compiled_step_keeps_no_model_alive_once_dropped():
    assert _models_left_after_compiling(_plain_torch_compile("default")) == 0
    assert _models_left_after_compiling(_fnlit_compile("default", False)) == 0


class _CheckpointedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh())
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False))  # the named line


@pytest.mark.parametrize("mode", ["eager", "default"])
def test_activation_checkpointing_under_compile_is_a_capture_error(mode):
    # torch.func (the compiled gradient) refuses the saved tensor hooks of non-reentrant checkpointing: a
    # CaptureError naming the checkpoint line and the way out, not torch's raw RuntimeError
    torch.manual_seed(0)
    model = _CheckpointedNet()
    step = fnlit.train_step(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    b = (torch.randn(4, 8), torch.randint(0, 5, (4,)))
    step(state, b)  # eagerly it trains
    with pytest.raises(CaptureError, match=r"(?s)# the named line.*activation checkpointing.*saved tensor hooks.*uncompiled"):
        fnlit_compile(step, mode=mode)(state, b)
    # and the failed call leaves saved tensor hooks on (torch.func's capture turned them off): eager steps with
    # checkpointing still train, as plain torch's checkpointed backward does
    new, metrics = step(state, b)
    ref = F.cross_entropy(model(b[0]), b[1])
    torch.testing.assert_close(metrics["loss"], ref.detach())
    ref.backward()
    torch.testing.assert_close(new.params["head.bias"], state.params["head.bias"] - 0.1 * model.head.bias.grad)
    # inside the caller's own switch-off the failed call leaves it as it was (the first version switched hooks back
    # on there); reference: torch.func.grad failing the same way inside such a block
    autograd = torch._C._autograd
    with torch.autograd.graph.disable_saved_tensors_hooks("the caller's"):
        with pytest.raises(RuntimeError, match="saved tensor hooks"):
            torch.func.grad(lambda x: model(x).sum())(b[0])
        want = (autograd._saved_tensors_hooks_is_enabled(), autograd._saved_tensors_hooks_get_disabled_error_message())
        with pytest.raises(CaptureError):
            fnlit_compile(step, mode="eager")(state, b)
        got = (autograd._saved_tensors_hooks_is_enabled(), autograd._saved_tensors_hooks_get_disabled_error_message())
    assert got == want == (False, "the caller's")


def test_dynamic_batch_size_equal_to_a_parameter_dimension_compiles_once():
    # a first batch of 8 into nn.Linear(8, 16): duck sizing tied the batch dimension to in_features, and the next
    # batch size compiled a second graph; each batch size's update still equals plain torch's
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 16)
    step = fnlit.train_step(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    compiled = fnlit_compile(step, dynamic=True, mode="eager")
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    for n in (8, 8, 5, 8, 3, 12):
        b = (torch.randn(n, 8), torch.randint(0, 16, (n,)))
        new, _ = compiled(state, b)
        params = {k: v.detach().requires_grad_() for k, v in state.params.items()}
        loss = F.cross_entropy(torch.func.functional_call(model, params, (b[0],)), b[1])
        for (k, p), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            torch.testing.assert_close(new.params[k], p.detach() - 0.1 * g)
        state = new
    assert compiled.compiles == 1


class _RunningMean(torch.nn.Module):
    """A forward that updates a running mean in training: by assignment (``self.mean = ...``) or in place."""

    def __init__(self, in_place):
        super().__init__()
        self.in_place = in_place
        self.register_buffer("mean", torch.zeros(16))

    def forward(self, x):
        if self.training:
            if self.in_place:
                self.mean.mul_(0.9).add_(0.1 * x.detach().mean(0))
            else:
                self.mean = 0.9 * self.mean + 0.1 * x.detach().mean(0)
        return x - self.mean


def _applied_twice(model):
    def step(state, batch):
        x, y = batch

        def loss(p):
            out, buffers = fnlit.apply(model, p, state.buffers, x)
            again, buffers = fnlit.apply(model, p, buffers, x + 0.1, train=False)
            return F.cross_entropy(out, y) + 0.5 * F.mse_loss(out, again), buffers

        (loss_value, buffers), grads = fnlit.value_and_grad(loss, has_aux=True)(state.params)
        return state.apply_gradients(grads, buffers=buffers), {"loss": loss_value}

    return step


@pytest.mark.parametrize("in_place", [False, True])
def test_a_module_updating_a_buffer_in_forward_applied_twice_compiles_and_matches_eager(in_place):
    # By assignment (self.mean = ...), torch broke the graph "on getattr() on a nn.Module with a pending mutation"
    # while fnlit.apply swapped the tensors in with torch.func.functional_call; with its own swap it is captured.
    # Reference: the same step run eagerly, twice (the second step reads the first one's statistics); the module
    # holds its own buffer afterwards.
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), _RunningMean(in_place=in_place), torch.nn.Linear(16, 3))
    own = model[1].mean
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    compiled, eager = fnlit_compile(_applied_twice(model), mode="eager"), _applied_twice(model)
    got = want = state
    for b in [(x, y), (x + 1, y)]:
        (got, m_got), (want, m_want) = compiled(got, b), eager(want, b)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m_got["loss"], m_want["loss"])
    assert not torch.equal(want.buffers["1.mean"], state.buffers["1.mean"])  # (the statistic moved)
    assert compiled.compiles == 1 and model[1].mean is own and not own.any()


def _distill_from_tied_teacher(student, teacher, teacher_params):
    def step(state, batch):
        x, y = batch
        with torch.no_grad():
            target, _ = fnlit.apply(teacher, teacher_params, {}, x)

        def loss(p):
            out, _ = fnlit.apply(student, p, state.buffers, x)
            return F.mse_loss(out, target) + F.mse_loss(out, y)

        value, grads = fnlit.value_and_grad(loss)(state.params)
        return state.apply_gradients(grads), {"loss": value}

    return step


def test_a_tied_weight_given_under_both_its_names_is_captured_and_views_of_it_are_told_plainly():
    # apply takes a tied weight under several names if they hold the same tensor (a teacher's parameters as
    # state_dict lists them); compiled, that failed to capture (dynamo cannot trace dict_keys.isdisjoint). Reference:
    # the same step run eagerly. Two views of the tensor (state_dict's detach()es) cannot be told from two tensors
    # in a trace: refused, saying so, not as "different tensors".
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))
    teacher[2].weight = teacher[0].weight
    student = torch.nn.Linear(4, 4)
    state = fnlit.TrainState.create(student, fnlit.optim.sgd(0.1), seed=0)
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    same = {**dict(teacher.named_parameters()), "2.weight": teacher[0].weight}  # both names, one tensor object
    compiled = fnlit_compile(_distill_from_tied_teacher(student, teacher, same), mode="eager")
    (got, m_got), (want, m_want) = compiled(state, (x, y)), _distill_from_tied_teacher(student, teacher, same)(state, (x, y))
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m_got["loss"], m_want["loss"])
    views = dict(teacher.state_dict())
    with pytest.raises(ValueError, match=r"\['0.weight', '2.weight'\] name one tensor .* separate tensor objects. Under "
                       r"torch.compile .* cannot tell whether they view one memory"):
        torch.compile(_distill_from_tied_teacher(student, teacher, views), backend="eager")(state, (x, y))


def test_donation_tells_a_hyperparameter_in_a_dict_opt_state_as_in_fnlits_own():
    # compile(donate=True) passes an assigned hyperparameter through when the step returns it in another shape; it knew
    # fnlit's optimizers' `.hyperparams` attribute but not a custom optimizer's {"hyperparams": ...} dict key.
    from fnlit.transforms.compile import _hyperparameters

    tx = fnlit.optim.GradientTransformation(
        lambda params: {"hyperparams": {"learning_rate": torch.tensor(0.1)}, "count": torch.zeros((), dtype=torch.int64)},
        lambda updates, state, params=None: (updates, state),
    )
    state = fnlit.TrainState.create(torch.nn.Linear(2, 1), tx, seed=0)
    leaves = torch.utils._pytree.tree_flatten_with_path(state)[0]
    marked = {torch.utils._pytree.keystr(p) for (p, _), hyper in zip(leaves, _hyperparameters(state)) if hyper}
    assert marked == {".opt_state['hyperparams']['learning_rate']"}
    ours = fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.adamw(0.1), seed=0)
    leaves = torch.utils._pytree.tree_flatten_with_path(ours)[0]
    assert {torch.utils._pytree.keystr(p) for (p, _), h in zip(leaves, _hyperparameters(ours)) if h} == {
        ".opt_state.hyperparams['learning_rate']", ".opt_state.hyperparams['weight_decay']"}


class _LazyStatistic(torch.nn.Module):
    """A buffer registered as None and filled by the forward, and one the forward registers itself."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)
        self.register_buffer("ema", None)

    def forward(self, x):
        out = self.lin(x)
        self.ema = out.detach().mean(0) if self.ema is None else 0.9 * self.ema + 0.1 * out.detach().mean(0)
        if not hasattr(self, "count"):
            self.register_buffer("count", torch.ones(()))
        return out * self.ema.sum() * self.count


def test_a_compiled_forward_filling_or_registering_a_buffer_leaves_the_module_as_it_was():
    # The state holds neither buffer (made before any forward), so each compiled call starts from the module's None
    # as the first eager call does (reference: that call, on a module of its own); the module must not keep the
    # trace's tensors (it kept a dead functorch wrapper).
    x, y = batch(seed=0)
    model, twin = _LazyStatistic(), _LazyStatistic()
    twin.load_state_dict(model.state_dict())
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    compiled = fnlit_compile(hand_step(model), mode="eager")
    got, m_got = compiled(state, (x, y))
    want, m_want = hand_step(twin)(state, (x, y))
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m_got["loss"], m_want["loss"])
    compiled(got, (x, y))
    assert model.ema is None and dict(model.named_buffers()) == {} and not hasattr(model, "count")
    assert compiled.compiles == 1
