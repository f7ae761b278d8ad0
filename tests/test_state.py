import dataclasses
import pickle

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree
from helpers import assert_trees_equal, batch, clone_tree, hand_step, mlp
from torch import nn

import fnlit


def make(model=None, tx=None):
    model = model or mlp(dropout=0.2)
    return model, fnlit.TrainState.create(model, tx or fnlit.optim.adamw(1e-2), seed=0)


def test_fields_are_frozen():
    _, state = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.step = torch.tensor(3)


def test_create_copies_tensors_in_module_order_and_leaves_module_alone():
    model, state = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert list(state.params) == [n for n, _ in model.named_parameters()]
    assert state.step.dtype == torch.int64 and state.step.dim() == 0 and int(state.step) == 0
    for name, p in model.named_parameters():
        assert torch.equal(state.params[name], p) and state.params[name].data_ptr() != p.data_ptr()
    step = hand_step(model)
    s = state
    for _ in range(3):
        s, _ = step(s, batch())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_frozen_parameters_go_to_buffers():
    model = mlp()
    model[0].weight.requires_grad_(False)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    assert "0.weight" not in state.params and "0.weight" in state.buffers
    new, _ = hand_step(model)(state, batch())
    assert torch.equal(new.buffers["0.weight"], state.buffers["0.weight"])


def test_module_without_parameters_is_rejected():
    with pytest.raises(ValueError, match="without trainable parameters"):
        fnlit.TrainState.create(nn.ReLU(), fnlit.optim.sgd(0.1), seed=0)


def test_a_module_on_the_meta_device_is_refused_and_a_materialised_one_trains_as_torch_does():
    # It was accepted; the step then failed deep inside an optimizer kernel (or ran on shapes only).
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"meta device \(at 'weight'.*module\.to_empty\(device=\.\.\.\) and initialise"):
        fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    model = nn.Linear(3, 2)
    model.register_buffer("scale", torch.ones(2, device="meta"))  # a buffer is named too
    with pytest.raises(ValueError, match=r"meta device \(at 'scale'"):
        fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)

    model = nn.Linear(3, 2, device="meta").to_empty(device="cpu")
    model.reset_parameters()
    reference = nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    torch.nn.functional.mse_loss(reference(x), y).backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    state, _ = fnlit.train_step(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))(state, (x, y))
    torch.testing.assert_close(state.params["weight"], reference.weight.detach())


class _Views(nn.Module):  # parameters that are views of one flat tensor
    def __init__(self, overlap):
        super().__init__()
        torch.manual_seed(0)
        flat = torch.randn(4 * 3 + 4) * 0.3
        self.w = nn.Parameter(flat[:12].view(4, 3))
        self.b = nn.Parameter(flat[8:12] if overlap else flat[12:])  # overlap: the last row of w

    def forward(self, x):
        return torch.nn.functional.linear(x, self.w, self.b)


def test_parameters_whose_memory_overlaps_are_refused_and_disjoint_views_train_as_torch_does():
    # torch.optim updates the shared memory through both parameters; the state cloned them into separate tensors
    # and trained them differently, silently.
    with pytest.raises(ValueError, match=r"parameters 'w' and 'b' of _Views whose memory overlaps.*detach\(\)\.clone\(\)"):
        fnlit.TrainState.create(_Views(overlap=True), fnlit.optim.sgd(0.1), seed=0)
    w = nn.Parameter(torch.randn(4, 6))
    frozen = nn.Module()
    frozen.a, frozen.b = nn.Parameter(w.data[:, ::2]), nn.Parameter(w.data[:, 1::2])  # interleaved: disjoint
    u = torch.randn(4, 6)
    frozen.c = nn.Parameter(u[1:2], requires_grad=False)
    frozen.d = nn.Parameter(u[1:3], requires_grad=False)  # overlaps c, but neither is ever written
    frozen.lin = nn.Linear(2, 2)
    assert list(fnlit.TrainState.create(frozen, fnlit.optim.sgd(0.1), seed=0).params) == ["a", "b", "lin.weight", "lin.bias"]
    frozen.e = nn.Parameter(w.data[:, 3])  # shares w[0, 3] with b
    with pytest.raises(ValueError, match=r"parameters 'b' and 'e' of Module"):
        fnlit.TrainState.create(frozen, fnlit.optim.sgd(0.1), seed=0)

    model, reference = _Views(overlap=False), _Views(overlap=False)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1, momentum=0.9), seed=0)
    step = fnlit.train_step(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for i in range(3):
        x, y = torch.randn(8, 3), torch.randn(8, 4)
        state, _ = step(state, (x, y))
        opt.zero_grad()
        torch.nn.functional.mse_loss(reference(x), y).backward()
        opt.step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach())


def test_thousands_of_disjoint_views_of_one_buffer_are_accepted_and_an_overlap_among_them_is_found():
    # The check compared each view with a copy of the rest of its storage's list: quadratic in the views of one
    # buffer (50k: seconds). Reference: the views' offsets by hand (disjoint pairs; one more overlapping the last).
    n = 3000
    flat = torch.randn(2 * n + 1)
    model = nn.Module()
    model.p = nn.ParameterList([nn.Parameter(flat[2 * i : 2 * i + 2]) for i in range(n)])
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    assert len(state.params) == n
    model.q = nn.Parameter(flat[2 * n - 1 :])  # its first element is p[2999]'s last
    with pytest.raises(ValueError, match=r"parameters 'p\.2999' and 'q' of Module whose memory overlaps"):
        fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)


def test_loss_scale_takes_any_real_number_and_refuses_the_rest():
    import numpy as np

    model = torch.nn.Linear(2, 2)
    for scale in (np.float32(2.0), np.int64(2), 2, 2.0):
        state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0, loss_scale=scale)
        assert state.scaler.scale.dtype == torch.float32 and state.scaler.scale.tolist() == 2.0, scale
    for bad in (True, "static", [2.0]):
        with pytest.raises(ValueError, match=r"expected loss_scale='dynamic', a number \(the initial scale\) or None"):
            fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0, loss_scale=bad)

def test_replace_rejects_unknown_fields():
    _, state = make()
    with pytest.raises(TypeError, match="unknown field.*'parms'"):
        state.replace(parms={})


def test_grads_with_other_structure_name_the_key():
    _, state = make()
    grads = {k: torch.zeros_like(v) for k, v in state.params.items()}
    grads["0.wieght"] = grads.pop("0.weight")
    with pytest.raises(ValueError, match=r"0\.weight"):
        state.apply_gradients(grads)


@pytest.mark.parametrize("kind", [dict, __import__("collections").OrderedDict])
def test_a_none_gradient_is_named_as_none_not_missing(kind):
    # {n: p.grad for n, p in ...} holds None for a parameter the loss did not use (torch's autograd leaves it so):
    # the key is there, so "missing 0.bias" sent users looking for a typo.
    model = torch.nn.Linear(2, 1)
    model.zero_grad(set_to_none=True)
    model(torch.ones(1, 2)).sum().backward(inputs=[model.weight])
    assert model.bias.grad is None  # the reference: what torch gives for an unused parameter
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(0.1), seed=0)
    grads = kind((n, p.grad) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match=r"at bias: expected tensor of shape \(1,\).*got None \(torch leaves .*pass zeros"):
        state.apply_gradients(grads)


def test_grads_as_a_list_are_named_as_a_list_not_a_missing_key():
    # A list of gradients (one per parameter, in order) said "missing 1.bias", as if one key were left out.
    _, state = make()
    with pytest.raises(ValueError, match=r"expected a dict keyed like it \(\d+ leaves\), got a list of \d+ items"):
        state.apply_gradients([torch.zeros_like(p) for p in state.params.values()])


def test_create_refuses_a_torch_optim_optimizer():
    model = torch.nn.Linear(2, 1)
    expected = r"TrainState.create expected tx to be an fnlit.optim GradientTransformation \(e.g. fnlit.optim.adamw\(1e-3\)\)"
    with pytest.raises(TypeError, match=expected + r", got a torch.optim.adamw.AdamW optimizer instead.*fnlit.optim.adamw"):
        fnlit.TrainState.create(model, torch.optim.AdamW(model.parameters()), seed=0)
    with pytest.raises(TypeError, match=expected + r", got the class torch.optim.adamw.AdamW instead"):
        fnlit.TrainState.create(model, torch.optim.AdamW, seed=0)
    with pytest.raises(TypeError, match=expected + r", got the function adamw \(a factory\? call it"):
        fnlit.TrainState.create(model, fnlit.optim.adamw, seed=0)


def test_replace_refuses_a_tx_or_scaler_apply_gradients_cannot_use():
    # replace took anything: the mistake showed only in apply_gradients, as "SGD.step() takes from 1 to 2 positional
    # arguments", "'function' object has no attribute 'update'" or "'str' object has no attribute 'scale'".
    model = torch.nn.Linear(2, 1)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0, loss_scale="dynamic")
    expected = r"TrainState.replace expected tx to be an fnlit.optim GradientTransformation"
    with pytest.raises(TypeError, match=expected + r".*got a torch.optim.sgd.SGD optimizer instead.*fnlit.optim.sgd\(0.1"):
        state.replace(tx=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match=expected + r".*got the function sgd \(a factory\? call it"):
        state.replace(tx=fnlit.optim.sgd)
    with pytest.raises(TypeError, match=r"expected scaler to be a fnlit.transforms.LossScaleState or None, got 'dynamic'"):
        state.replace(scaler="dynamic")
    with pytest.raises(TypeError, match=r"expected scaler .* \(GradScaler\) instead"):
        state.replace(tx=fnlit.optim.sgd(0.1), scaler=torch.amp.GradScaler("cpu"))
    # What stays allowed: tx=None (a picklable state, as the docs show), scaler=None, and the real things.
    assert state.replace(tx=None).tx is None and state.replace(scaler=None).scaler is None
    scaler = fnlit.transforms.init_loss_scale(2.0**10)
    tx = fnlit.optim.sgd(0.5)
    new = state.replace(tx=tx, scaler=scaler)
    assert new.tx is tx and new.scaler is scaler


def test_apply_gradients_on_a_state_without_its_optimizer_says_to_put_it_back():
    # A state pickled as the docs show (replace(tx=None)) and stepped before .replace(tx=tx) failed inside the
    # optimizer step with "'NoneType' object has no attribute 'update'".
    state = fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(0.1), seed=0)
    state = pickle.loads(pickle.dumps(state.replace(tx=None)))
    grads = {k: torch.ones_like(v) for k, v in state.params.items()}
    with pytest.raises(TypeError, match=r"got a state without an optimizer \(tx=None.*state.replace\(tx=tx\)"):
        state.apply_gradients(grads)
    with pytest.raises(TypeError, match=r"without an optimizer"):
        fnlit.accumulate(lambda s, b: (s.apply_gradients(grads), {}), 2)(state, torch.zeros(2, 1))
    new = state.replace(tx=fnlit.optim.sgd(0.1)).apply_gradients(grads)
    assert torch.equal(new.params["bias"], state.params["bias"] - 0.1)


def test_replace_refuses_a_scaler_holding_a_number_where_a_tensor_goes():
    # state.scaler._replace(scale=1024.0) was taken: the next float16 step failed with "'float' object has no attribute
    # 'double'", and growth_interval=100 trained but its checkpoint was refused as if it had no loss scaler.
    state = fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(0.1), seed=0, loss_scale="dynamic")
    with pytest.raises(TypeError, match=r"scaler's fields to be tensors, got scale=1024.0 \(float\).*"
                                        r"_replace\(scale=torch.tensor\(1024.0, dtype=torch.float32\)\)"):
        state.replace(scaler=state.scaler._replace(scale=1024.0))
    with pytest.raises(TypeError, match=r"got growth_interval=100 \(int\).*dtype=torch.int32"):
        state.replace(scaler=state.scaler._replace(growth_interval=100))
    interval = torch.tensor(100, dtype=torch.int32)  # the message's fix is taken
    assert state.replace(scaler=state.scaler._replace(growth_interval=interval)).scaler.growth_interval is interval


def test_an_optax_style_pair_of_init_and_update_trains():
    # create accepted any object with init and update; the first apply_gradients then failed reading its `step`.
    import collections

    pair = collections.namedtuple("Pair", ["init", "update"])(
        lambda params: (), lambda grads, state, params=None: ({k: -0.1 * g for k, g in grads.items()}, state)
    )
    model = torch.nn.Linear(2, 1)
    state = fnlit.TrainState.create(model, pair, seed=0)
    grads = {k: torch.ones_like(v) for k, v in state.params.items()}
    new = state.apply_gradients(grads)
    for k, p in model.named_parameters():  # a hand SGD step of 0.1
        assert torch.equal(new.params[k], p.detach() - 0.1)


def test_a_new_tx_with_the_old_optimizer_state_is_refused_and_its_own_state_trains():
    # sgd(0.5) on an AdamState read its learning_rate, 1e-3, and moved the weights 500x less, keeping the stale moments.
    model = torch.nn.Linear(2, 1)
    state = fnlit.TrainState.create(model, fnlit.optim.adam(1e-3), seed=0)
    grads = {k: torch.ones_like(v) for k, v in state.params.items()}
    with pytest.raises(ValueError, match=r"sgd.update expected the state sgd.init makes \(SGDState\), got AdamState "
                                         r"instead.*state.replace\(tx=tx, opt_state=tx.init\(state.params\)\)"):
        state.replace(tx=fnlit.optim.sgd(0.5)).apply_gradients(grads)
    tx = fnlit.optim.sgd(0.5)
    new = state.replace(tx=tx, opt_state=tx.init(state.params)).apply_gradients(grads)
    for k, p in model.named_parameters():  # a hand SGD step of 0.5
        assert torch.equal(new.params[k], p.detach() - 0.5)


SHAPE_TXS = {
    "sgd": fnlit.optim.sgd(0.1),
    "adam": fnlit.optim.adam(0.1),
    # No fused step: the grads went through update and apply_updates, which broadcast them into the params.
    "scale_by_adam": fnlit.optim.chain(fnlit.optim.scale_by_adam(), fnlit.optim.scale(-1e-3)),
    "trace": fnlit.optim.chain(fnlit.optim.trace(0.9), fnlit.optim.scale_by_learning_rate(0.1)),
    "clip": fnlit.optim.chain(fnlit.optim.clip_by_global_norm(1.0), fnlit.optim.scale_by_learning_rate(0.1)),
}


def test_a_new_tx_keeps_the_saved_learning_rate_and_the_documented_replacement_takes_the_new_one(tmp_path):
    # A phase-2 fine-tune (a new tx, the opt_state kept) or a restore into a `like` built with another lr: the rate
    # and decay come from opt_state.hyperparams, as torch.optim's load_state_dict restores each group's lr. The
    # docstrings say so and show the replacement; reference: torch.optim.AdamW with param_groups set by hand.
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = [{k: torch.randn(v.shape) for k, v in init.items()} for _ in range(6)]

    def torch_run(lr, weight_decay):  # 3 steps at lr 1e-2, decay 0.01, then 3 with the given ones
        reference = nn.Linear(3, 2)
        reference.load_state_dict(init)
        opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01)
        for i, g in enumerate(grads):
            if i == 3:
                for group in opt.param_groups:
                    group.update(lr=lr, weight_decay=weight_decay)
            for name, p in reference.named_parameters():
                p.grad = g[name].clone()
            opt.step()
        return dict(reference.named_parameters())

    def steps(state, gs):
        for g in gs:
            state = state.apply_gradients(g)
        return state

    state = steps(fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2, weight_decay=0.01), seed=0), grads[:3])
    path = fnlit.save(tmp_path / "phase1.ckpt", state)
    new_tx = fnlit.optim.adamw(1e-3, weight_decay=0.1)
    restored = fnlit.restore(path, like=fnlit.TrainState.create(nn.Linear(3, 2), new_tx, seed=0))
    kept = {"replace": steps(state.replace(tx=new_tx), grads[3:]), "restore": steps(restored, grads[3:])}
    new = {}
    for name, s in [("replace", state.replace(tx=new_tx)), ("restore", restored)]:
        hyper = {**s.opt_state.hyperparams, "learning_rate": 1e-3, "weight_decay": 0.1}  # as the docstrings show
        new[name] = steps(s.replace(opt_state=s.opt_state._replace(hyperparams=hyper)), grads[3:])
    old_rates, new_rates = torch_run(1e-2, 0.01), torch_run(1e-3, 0.1)
    for name in ("replace", "restore"):
        for k in init:
            torch.testing.assert_close(kept[name].params[k], old_rates[k].detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(new[name].params[k], new_rates[k].detach(), rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("tx", SHAPE_TXS.values(), ids=SHAPE_TXS.keys())
def test_grads_of_another_shape_name_the_key(tx):
    # The fused kernels do not check shapes: a 1-element gradient was read past its end, a transposed one applied.
    state = fnlit.TrainState.create(torch.nn.Linear(3, 2), tx, seed=0)
    with pytest.raises(ValueError, match=r"at bias: expected tensor of shape \(2,\).*got tensor of shape \(\)"):
        state.apply_gradients({"weight": torch.ones(2, 3), "bias": torch.ones(())})
    with pytest.raises(ValueError, match=r"at weight: expected tensor of shape \(2, 3\).*got tensor of shape \(3, 2\)"):
        state.apply_gradients({"weight": torch.ones(3, 2), "bias": torch.ones(2)})
    with pytest.raises(ValueError, match=r"at weight: expected tensor of shape \(2, 3\).*got tensor of shape \(4, 2, 3\)"):
        state.apply_gradients({"weight": torch.ones(4, 2, 3), "bias": torch.ones(2)})


def test_apply_gradients_counts_steps_and_advances_key():
    _, state = make(tx=fnlit.optim.sgd(0.5))
    grads = {k: torch.ones_like(v) for k, v in state.params.items()}
    new = state.apply_gradients(grads)
    assert int(new.step) == 1 and not torch.equal(new.rng, state.rng)
    for k in state.params:  # hand computation of one SGD step
        torch.testing.assert_close(new.params[k], state.params[k] - 0.5, rtol=0, atol=0)


def test_pytree_for_optree_and_torch():
    _, state = make()
    leaves = optree.tree_leaves(state)
    t_leaves = torch_pytree.tree_leaves(state)
    assert len(leaves) == len(t_leaves) == len(fnlit.tree.tree_leaves(state))
    rebuilt = optree.tree_unflatten(optree.tree_structure(state), leaves)
    assert isinstance(rebuilt, fnlit.TrainState) and rebuilt.tx is state.tx
    t_rebuilt = torch_pytree.tree_unflatten(t_leaves, torch_pytree.tree_structure(state))
    assert_trees_equal(t_rebuilt, state)


def test_step_is_pure_and_deterministic():
    model, state = make(model=mlp(dropout=0.3, bn=True))
    data = batch()
    state_copy, data_copy = clone_tree(state), clone_tree(data)
    step = hand_step(model)
    a, ma = step(state, data)
    b, mb = step(state, data)
    assert_trees_equal(state, state_copy)  # no input mutated
    assert_trees_equal(data, data_copy)
    assert_trees_equal(a, b)  # same inputs, bitwise same outputs
    assert torch.equal(ma["loss"], mb["loss"])


@pytest.mark.parametrize("tx", [fnlit.optim.sgd(0.1, momentum=0.9), fnlit.optim.sgd(0.1), fnlit.optim.adamw(1e-2)])
def test_vmap_over_stacked_states_runs_and_matches_members(tx):
    model = mlp()
    states = [fnlit.TrainState.create(mlp(), tx, seed=i) for i in range(3)]
    stacked = fnlit.tree.tree_map(lambda *xs: torch.stack(xs), *states)
    step = hand_step(model)
    data = batch()
    new, metrics = torch.func.vmap(step, in_dims=(0, None))(stacked, data)
    assert metrics["loss"].shape == (3,)
    for i, s in enumerate(states):
        alone, _ = step(s, data)
        torch.testing.assert_close(new.params["0.weight"][i], alone.params["0.weight"], rtol=1e-5, atol=1e-6)


# -- a step that drops the statistics its forward updated (BatchNorm) is warned about --------------------
def _bn_step(keep: str):
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))

    def step(state, batch):
        x, y = batch

        def loss_fn(params):
            out, new_buffers = fnlit.apply(model, params, state.buffers, x, rng=state.rng, mutable=False if keep == "immutable" else None)
            return torch.nn.functional.mse_loss(out, y), new_buffers

        (loss, new_buffers), grads = fnlit.value_and_grad(loss_fn, has_aux=True)(state.params)
        changes = {"buffers": new_buffers} if keep == "new" else {"buffers": state.buffers} if keep == "old" else {}
        return state.apply_gradients(grads, **changes), {"loss": loss}

    return model, step


@pytest.mark.parametrize("wrap", [lambda s: s, lambda s: fnlit.accumulate(s, 2)])
def test_dropping_the_updated_batchnorm_statistics_warns(wrap):
    model, step = _bn_step(keep="none")
    reference = nn.BatchNorm1d(8)  # plain PyTorch: the statistics move after a training forward
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    reference(model[0](x))
    with pytest.warns(UserWarning, match=r"apply_gradients got no buffers=.*\['1.num_batches_tracked', '1.running_mean'"):
        new, _ = wrap(step)(state, (x, y))
    # what the warning is about: the state kept the initial statistics, PyTorch's moved
    assert torch.equal(new.buffers["1.running_mean"], torch.zeros(8))
    assert not torch.equal(reference.running_mean, torch.zeros(8))


@pytest.mark.parametrize("keep", ["new", "old", "immutable"])
def test_statistics_kept_or_dropped_on_purpose_do_not_warn(keep):
    model, step = _bn_step(keep=keep)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    new, _ = fnlit.accumulate(step, 2)(state, (x, y))  # the suite turns warnings into errors
    if keep == "new":  # the mean of the two micro-batches' updates, as PyTorch's BatchNorm does them in turn
        reference = nn.BatchNorm1d(8)
        h = model[0](x)
        reference(h[:8]), reference(h[8:])
        torch.testing.assert_close(new.buffers["1.running_mean"], reference.running_mean)


def test_a_model_whose_buffers_no_forward_updates_does_not_warn():
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)
            self.register_buffer("shift", torch.ones(4))  # constant: read, never written

        def forward(self, x):
            return self.lin(x + self.shift)

    model = Shifted()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)

    def plain_step(state, batch):
        def loss_fn(params):
            out, _ = fnlit.apply(model, params, state.buffers, batch[0], rng=state.rng)
            return torch.nn.functional.mse_loss(out, batch[1])

        loss, grads = fnlit.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    for _ in range(2):  # the first forward probes copies of the buffers; nothing moved them
        state, _ = plain_step(state, (torch.randn(8, 4), torch.randn(8, 1)))  # the suite makes a warning an error


def test_a_frozen_batchnorm_whose_statistics_nothing_updates_does_not_warn():
    # BatchNorm in eval mode (frozen): the forward updates nothing, so a step without buffers= drops nothing;
    # also after a training-mode forward (a shape check) on the same buffers, whose note the frozen one replaces.
    model, step = _bn_step(keep="none")
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    fnlit.apply(model, state.params, state.buffers, torch.randn(16, 4))
    model[1].eval()
    for _ in range(2):  # the suite makes a warning an error
        state, _ = step(state, (torch.randn(16, 4), torch.randn(16, 1)))
    assert torch.equal(state.buffers["1.running_mean"], torch.zeros(8))  # as PyTorch's frozen BatchNorm: unchanged


@pytest.mark.parametrize("eval_mode", [False, True])
def test_a_later_forward_that_skips_the_batchnorm_keeps_the_dropped_statistics_warning(eval_mode):
    # Two forwards on state.buffers, the second on a path without the BatchNorm: the first one's dropped update
    # is still dropped (only a module frozen since, in eval mode, voids the note).
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn = nn.Linear(4, 8), nn.BatchNorm1d(8)

        def forward(self, x, raw=False):
            return self.lin(x) if raw else self.bn(self.lin(x))

    model = Net()
    if eval_mode:  # the model in eval mode: apply(train=True) runs it in training mode all the same
        model.eval()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    x = torch.randn(16, 4)

    def step(state, batch):
        def loss_fn(p):
            a, _ = fnlit.apply(model, p, state.buffers, batch)
            b, _ = fnlit.apply(model, p, state.buffers, batch, raw=True)
            return (a.sum() + b.sum()) ** 2

        _, grads = fnlit.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {}

    with pytest.warns(UserWarning, match=r"apply_gradients got no buffers=.*bn.running_mean"):
        step(state, x)


def test_register_dataclass_refuses_a_field_in_neither_list_and_registers_nothing_on_error():
    # A field listed nowhere came back as its class default after any tree_map; a non-dataclass was refused only
    # after it had been registered (optree then traversed it).
    import dataclasses

    import optree

    from fnlit.tree import register_dataclass, tree_map

    @dataclasses.dataclass
    class Cfg:
        w: torch.Tensor
        lr: float = 0.1

    with pytest.raises(ValueError, match=r"every field in data_fields or meta_fields.*missing \['lr'\]"):
        register_dataclass(Cfg, data_fields=["w"])
    register_dataclass(Cfg, data_fields=["w"], meta_fields=["lr"])
    assert tree_map(lambda t: t * 2, Cfg(torch.ones(1), lr=0.5)).lr == 0.5

    class NotDC:
        def __init__(self, t):
            self.t = t

    obj = NotDC(torch.ones(1))
    with pytest.raises(TypeError, match="expected a dataclass"):
        register_dataclass(NotDC, data_fields=["t"])
    assert optree.tree_leaves(obj) == [obj]  # still a leaf: nothing was registered


def test_repr_never_raises_and_counts_nested_trees():
    model = nn.Linear(2, 1)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    assert repr(state).startswith("TrainState(step=0, params=2 tensors / 3 values, buffers=0 tensors")
    assert "step=5," in repr(state.replace(step=5))  # an int step (it broke repr)
    assert "step=(3,)," in repr(state.replace(step=torch.zeros(3, dtype=torch.int64)))  # an ensemble's steps
    nested = state.replace(params={"layer": dict(state.params)}, buffers={"a": {"b": torch.zeros(4)}})
    assert "params=2 tensors / 3 values, buffers=1 tensors" in repr(nested)


def test_repr_of_a_donated_state_says_so_instead_of_raising():
    # It read int(step) and numel() of the donation sentinels: a debugger, a log line or pytest's locals raised.
    model = nn.Linear(2, 1)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    new, _ = fnlit.donating(fnlit.train_step(model, lambda m, b: m(b).sum()))(state, torch.ones(3, 2))
    assert repr(state) == str(state) == "TrainState(<donated to a step (fnlit.donating)>)"
    assert repr(new).startswith("TrainState(step=1, params=2 tensors / 3 values")
    with pytest.raises(RuntimeError, match=r"This TrainState was donated to a step \(fnlit.donating\)"):
        _ = state.params["weight"]  # still unusable


@pytest.mark.parametrize("field", ["rng", "step", "params", "opt_state"])
def test_apply_gradients_refuses_changes_to_the_fields_the_update_sets(field):
    # A Python TypeError ("got multiple values for keyword argument"), and under accumulate only at the last
    # micro-batch (the earlier ones took it through state.replace).
    state = fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(0.1), seed=0)
    grads = {k: torch.ones_like(v) for k, v in state.params.items()}
    with pytest.raises(ValueError, match=rf"apply_gradients sets \['{field}'\] itself .*\.replace\(rng=\.\.\.\)"):
        state.apply_gradients(grads, **{field: getattr(state, field)})
    new = state.apply_gradients(grads, buffers={})  # buffers= stays the way to pass what the forward updated
    assert int(new.step) == 1


def test_step_and_rng_stay_on_the_cpu_under_another_default_device(request):
    # torch.set_default_device("cuda") (an LLM-script idiom; "meta" stands in) made the step counter and the key on
    # that device, where the docs promise CPU tensors (int(state.rng) would sync the GPU every step). A CPU model's
    # update of a large parameter (>= 1 MiB: the recycled copies) moved it to the default device.
    model = nn.Linear(512, 512)  # built on the CPU first
    request.getfixturevalue("meta_default_device")
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    assert state.step.device.type == "cpu" and state.rng.device.type == "cpu"
    grads = {k: torch.ones_like(v, device="cpu") for k, v in state.params.items()}
    new = state.apply_gradients(grads)
    new = new.apply_gradients(grads)
    assert new.step.device.type == "cpu" and int(new.step) == 2 and new.rng.device.type == "cpu"
    for k, p in model.named_parameters():  # by hand: two SGD steps of gradient 1
        assert new.params[k].device.type == "cpu"
        torch.testing.assert_close(new.params[k], p.detach() - 0.2)


def _momentum_state_without_tx():
    """A launched rank's result: one SGD-with-momentum step, as TrainState's docstring says to return a state."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1, momentum=0.9), seed=0)
    state = state.apply_gradients({k: torch.full_like(v, 0.5) for k, v in state.params.items()})
    return state.replace(tx=None)


@pytest.mark.distributed
def test_a_state_without_its_tx_pickles_and_trains_on_with_the_tx_put_back():
    # The documented workaround for a state that cannot be pickled (tx is closures): state.replace(tx=None) crosses
    # pickle and launch, the optimizer's momentum with it. The reference: torch.optim.SGD taking the same two steps.
    import pickle

    (sent,) = fnlit.distributed.launch(_momentum_state_without_tx, 1, timeout=120)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    tx = fnlit.optim.sgd(0.1, momentum=0.9)
    back = pickle.loads(pickle.dumps(sent)).replace(tx=tx)
    assert int(back.step) == 1 and back.tx is tx
    state = back.apply_gradients({k: torch.full_like(v, 0.25) for k, v in back.params.items()})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for g in (0.5, 0.25):
        for p in model.parameters():
            p.grad = torch.full_like(p, g)
        opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=0, atol=1e-7)
