import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import batch, mlp, run_threads
from torch import nn

import fnlit


def test_apply_matches_module_and_mutates_nothing():
    model = mlp(bn=True)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    x, _ = batch()
    ref = copy.deepcopy(model).train()
    expected = ref(x)  # the module's own forward updates *its* running stats in place
    before = {k: v.clone() for k, v in state.buffers.items()}
    out, new_buffers = fnlit.apply(model, state.params, state.buffers, x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for k, v in ref.named_buffers():
        assert torch.equal(new_buffers[k], v), k  # new stats equal the module's own update
        assert torch.equal(state.buffers[k], before[k]), k  # ... and the inputs are untouched
    assert int(new_buffers["1.num_batches_tracked"]) == 1


def test_eval_mode_uses_running_stats_and_no_dropout():
    model = mlp(bn=True, dropout=0.5)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    x, _ = batch()
    for _ in range(2):  # the first eval forward runs on copies (to see what it updates), later ones on the buffers
        out, new_buffers = fnlit.apply(model, state.params, state.buffers, x, train=False, rng=state.rng)
    torch.testing.assert_close(out, copy.deepcopy(model).eval()(x), rtol=0, atol=0)
    assert new_buffers["1.running_mean"] is state.buffers["1.running_mean"]  # BatchNorm: not copied in eval mode
    assert model.training  # the module's own mode is restored


class _Observer(torch.nn.Module):
    """Counts the examples it sees in a buffer, in place, in every mode (as quantization observers do)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen.add_(x.shape[0])
        return self.lin(x)


def test_an_eval_forward_never_changes_the_buffers_it_is_given():
    model = _Observer()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    x = torch.randn(3, 4)
    reference = copy.deepcopy(model).eval()
    reference(x)  # what the module's own eval forward computes: seen = 3
    for _ in range(2):  # the first eval call probes on copies, the second copies what it learned
        out, new = fnlit.apply(model, state.params, state.buffers, x, train=False)
        assert float(state.buffers["seen"]) == 0 and torch.equal(new["seen"], reference.seen)
        _, dropped = fnlit.apply(model, state.params, state.buffers, x, train=False, mutable=False)
        assert float(state.buffers["seen"]) == 0 and dropped["seen"] is state.buffers["seen"]
    fnlit.evaluate(fnlit.eval_step(model, lambda f, b: f(b).sum()), state, [x, x])
    assert float(state.buffers["seen"]) == 0


def test_an_eval_forward_under_inference_mode_never_changes_the_buffers_either():
    model, x = _Observer(), torch.randn(3, 4)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    for _ in range(2):
        with torch.inference_mode():
            _, new = fnlit.apply(model, state.params, state.buffers, x, train=False)
        assert float(state.buffers["seen"]) == 0 and float(new["seen"]) == 3 and not new["seen"].is_inference()


def test_an_eval_forward_writing_through_data_returns_its_update_on_the_first_call():
    class DataWriter(_Observer):
        def forward(self, x):
            self.seen.data += x.shape[0]  # moves no version counter
            return self.lin(x)

    model, x = DataWriter(), torch.randn(3, 4)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    _, new = fnlit.apply(model, state.params, state.buffers, x, train=False)
    assert float(state.buffers["seen"]) == 0 and float(new["seen"]) == 3  # the module's own forward: 3


def test_an_eval_mode_forward_in_a_training_step_must_hand_its_updated_buffers_on():
    # An eval-mode forward that updates a buffer (an observer) inside a training step: dropping new_buffers warns,
    # passing them on counts as the module's own eval forwards do (3 examples a step).
    model, x = _Observer(), torch.randn(3, 4)

    def step(state, keep):
        def loss_fn(params):
            out, buffers = fnlit.apply(model, params, state.buffers, x, train=False)
            return out.sum(), buffers

        (_, buffers), grads = fnlit.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads, buffers=buffers) if keep else state.apply_gradients(grads)

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    for _ in range(3):
        state = step(state, keep=True)
    assert float(state.buffers["seen"]) == 9
    with pytest.warns(UserWarning, match=r"apply_gradients got no buffers=.*\['seen'\]"):
        step(state, keep=False)
    fnlit.evaluate(fnlit.eval_step(model, lambda f, b: f(b).sum()), state, [x])  # a validation sets no note:
    state.apply_gradients({k: torch.zeros_like(v) for k, v in state.params.items()})  # no warning here


def test_dropout_is_a_pure_function_of_the_key():
    model = mlp(dropout=0.5)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    x, _ = batch()
    outside = torch.get_rng_state()
    a, _ = fnlit.apply(model, state.params, state.buffers, x, rng=state.rng)
    b, _ = fnlit.apply(model, state.params, state.buffers, x, rng=state.rng)
    c, _ = fnlit.apply(model, state.params, state.buffers, x, rng=fnlit.random.next_key(state.rng))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), outside)  # the global generator is left as it was



def test_a_key_seeds_dropout_under_the_users_own_torch_func_transform():
    # torch.func.grad / vjp of a loss that calls apply: nobody seeds outside, so apply seeds from the key, as it does
    # eagerly. The reference: autograd on a forward inside `with fnlit.random.seeded(key):`.
    model = mlp(dropout=0.5)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    x, _ = batch()

    def loss(params, k):
        return fnlit.apply(model, params, state.buffers, x, rng=k)[0].pow(2).mean()

    k, other = state.rng, fnlit.random.next_key(state.rng)
    params = {n: p.detach().requires_grad_() for n, p in state.params.items()}
    with fnlit.random.seeded(k):
        ref = torch.autograd.grad(torch.func.functional_call(model, params, (x,)).pow(2).mean(), list(params.values()))
    outside = torch.get_rng_state()
    first = torch.func.grad(loss)(state.params, k)
    second = torch.func.grad(loss)(state.params, k)
    (pulled,) = torch.func.vjp(lambda p: loss(p, k), state.params)[1](torch.tensor(1.0))
    eager = fnlit.value_and_grad(loss)(state.params, k)[1]
    assert torch.equal(torch.get_rng_state(), outside)  # the global generator is left as it was
    for n, want in zip(params, ref):
        for got in (first, second, pulled, eager):
            torch.testing.assert_close(got[n], want, rtol=1e-6, atol=1e-7)
        assert torch.equal(first[n], second[n]), n  # the same key: bitwise the same gradients
    different = torch.func.grad(loss)(state.params, other)
    assert not torch.equal(different["0.weight"], first["0.weight"])  # another key, another mask

class _NoisyMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return out + torch.randn_like(out) if func is F.linear else out


@pytest.mark.parametrize(
    "how",
    ["forward_hook", "pre_hook", "global_hook", "global_pre_hook", "instance_forward", "subclass", "appended_dropout",
     "function_mode"],
)
def test_randomness_entering_a_plain_model_any_way_is_a_function_of_the_key(how):
    # A model of torch.nn's random-free layers can still draw: through a hook, a forward set on an instance (after the
    # first call too), a subclass, a Dropout appended after the first call, a torch function mode. Every draw then
    # comes from the key: the same key gives the same output whatever the global generator holds.
    linear = type("Noisy", (nn.Linear,), {"forward": lambda self, x: nn.Linear.forward(self, x) + torch.rand(())})
    model = nn.Sequential((linear if how == "subclass" else nn.Linear)(4, 4), nn.ReLU(), nn.Linear(4, 2))
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    x = torch.randn(3, 4)
    fnlit.apply(model, state.params, state.buffers, x, rng=state.rng)  # the first call, before the change below
    handle, mode = None, contextlib.nullcontext()
    if how == "forward_hook":
        handle = model[1].register_forward_hook(lambda m, args, out: out + torch.randn_like(out))
    elif how == "pre_hook":
        handle = model[2].register_forward_pre_hook(lambda m, args: (args[0] + torch.randn_like(args[0]),))
    elif how == "global_hook":
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: out + torch.rand(()))
    elif how == "global_pre_hook":
        handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, args: (args[0] + torch.rand(()),))
    elif how == "instance_forward":
        model[2].forward = lambda x: nn.Linear.forward(model[2], x) + torch.randn(())
    elif how == "appended_dropout":
        model.append(nn.Dropout(0.5))
    elif how == "function_mode":
        mode = _NoisyMode()
    try:
        with mode:
            torch.manual_seed(1)
            a, _ = fnlit.apply(model, state.params, state.buffers, x, rng=state.rng)
            torch.manual_seed(2)
            b, _ = fnlit.apply(model, state.params, state.buffers, x, rng=state.rng)
            c, _ = fnlit.apply(model, state.params, state.buffers, x, rng=fnlit.random.next_key(state.rng))
    finally:
        if handle is not None:
            handle.remove()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # (it does draw: another key, another output)


@pytest.mark.parametrize("make", [
    lambda: (nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(3, 4)),
    lambda: (mlp(dropout=0.5), torch.randn(3, 8)),
    lambda: (nn.Embedding(5, 3, max_norm=1.0), torch.tensor([1, 2])),  # (the slots note max_norm embeddings)
])
def test_apply_keeps_no_module_alive(make):
    import gc
    import weakref

    model, x = make()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (max_norm's warning)
        fnlit.apply(model, state.params, state.buffers, x, rng=state.rng)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None  # fnlit's per-module cache holds it weakly


def test_consecutive_steps_draw_different_masks():
    model = nn.Sequential(nn.Linear(8, 64), nn.Dropout(0.5))
    seen = []

    def step(state, x):
        def loss_fn(params):
            out, _ = fnlit.apply(model, params, state.buffers, x, rng=state.rng)
            seen.append((out == 0).clone())
            return out.sum()

        loss, grads = fnlit.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.0), seed=0)
    x = torch.randn(4, 8)
    for _ in range(2):
        state, _ = step(state, x)
    assert not torch.equal(seen[0], seen[1])


def test_tied_weights_share_one_parameter():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, idx):
            return self.out(self.emb(idx))

    model = Tied()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    assert list(state.params) == ["emb.weight"]
    idx = torch.tensor([1, 2, 3])
    w = torch.randn(10, 4)
    out, _ = fnlit.apply(model, {"emb.weight": w}, {}, idx)
    torch.testing.assert_close(out, w[idx] @ w.T)


def test_slots_walk_the_module_tree_as_named_modules_does():
    # apply finds every tensor's slots in one walk (a traced step builds them in the trace, where each
    # named_modules walk cost dynamo ~0.1 s): the walk must give named_modules' names, order and duplicates
    from fnlit.functional import _walk

    shared = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
    inner = nn.ModuleDict({"a": shared, "b": nn.Linear(2, 2), "none": None})
    root = nn.Sequential(shared, inner, nn.ModuleList([shared, nn.Sequential(inner)]), nn.Identity())
    every, firsts = [], []
    _walk(root, "", every, firsts, set())
    assert [(n, id(m)) for n, m in every] == [(n, id(m)) for n, m in root.named_modules(remove_duplicate=False)]
    assert [(n, id(m)) for n, m in firsts] == [(n, id(m)) for n, m in root.named_modules()]
    assert len(every) > len(firsts)  # (the tree does share modules)


def test_apply_follows_a_module_changed_after_a_call():
    # fnlit.apply caches where each tensor lives; a new head (fine-tuning), a new tie or a new buffer
    # after a first call must not leave it swapping tensors into dicts the module no longer uses.
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    x = torch.randn(3, 4)
    state = fnlit.TrainState.create(m, fnlit.optim.sgd(0.1), seed=0)
    fnlit.apply(m, state.params, state.buffers, x)
    for change in (lambda: m.__setitem__(2, nn.Linear(4, 4)), lambda: setattr(m[2], "weight", m[0].weight),
                   lambda: m[0].register_buffer("scale", torch.ones(1))):  # fmt: skip
        change()
        state = fnlit.TrainState.create(m, fnlit.optim.sgd(0.1), seed=0)
        params = {k: torch.randn_like(v) for k, v in state.params.items()}  # not the module's own values
        out, _ = fnlit.apply(m, params, state.buffers, x)
        torch.testing.assert_close(out, torch.func.functional_call(m, {**params, **state.buffers}, (x,)))
        _, g = fnlit.value_and_grad(lambda p: fnlit.apply(m, p, state.buffers, x)[0].sum())(params)
        assert g["2.bias"].abs().sum() > 0


def test_apply_mutable_false_changes_no_buffer_even_in_training_mode():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    state = fnlit.TrainState.create(m, fnlit.optim.sgd(0.1), seed=0)
    before = {k: v.clone() for k, v in state.buffers.items()}
    x = torch.randn(8, 4)
    out, new = fnlit.apply(m, state.params, state.buffers, x, mutable=False)
    reference = copy.deepcopy(m).train()(x)  # batch statistics, as in training
    torch.testing.assert_close(out, reference)
    assert all(new[k] is state.buffers[k] and torch.equal(state.buffers[k], before[k]) for k in before)


def test_apply_copies_spectral_norm_vectors_and_learns_other_updated_buffers():
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    m = spectral_norm(nn.Linear(4, 6))
    state = fnlit.TrainState.create(m, fnlit.optim.sgd(0.1), seed=0)
    before = {k: v.clone() for k, v in state.buffers.items()}
    x = torch.randn(3, 4)
    ref = copy.deepcopy(m).train()
    out, new = fnlit.apply(m, state.params, state.buffers, x)
    torch.testing.assert_close(out, ref(x))  # one power iteration, as the module does it
    assert all(torch.equal(state.buffers[k], before[k]) for k in before)  # the caller's vectors unchanged
    torch.testing.assert_close(new["parametrizations.weight.0._u"], ref.parametrizations.weight[0]._u)

    class Counting(nn.Module):  # updates a buffer of its own in place: unknown to fnlit until seen
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            if x.sum() > 0:  # only on some calls (a counter updated every N steps)
                self.calls.add_(1)
            return self.lin(x)

    c = Counting()
    state = fnlit.TrainState.create(c, fnlit.optim.sgd(0.1), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first training forward runs on copies: learned silently, nothing changed
        _, new = fnlit.apply(c, state.params, state.buffers, torch.ones(1, 2))
    assert float(state.buffers["calls"]) == 0 and float(new["calls"]) == 1
    c2 = Counting()  # updates only from its second call on: that one changes the caller's buffer, and warns
    state = fnlit.TrainState.create(c2, fnlit.optim.sgd(0.1), seed=0)
    fnlit.apply(c2, state.params, state.buffers, -torch.ones(1, 2))
    with pytest.warns(UserWarning, match=r"updated the buffer\(s\) \['calls'\] in place"):
        fnlit.apply(c2, state.params, state.buffers, torch.ones(1, 2))
    given = state.buffers["calls"].clone()
    _, new = fnlit.apply(c2, state.params, state.buffers, torch.ones(1, 2))  # copied now: pure from here on
    assert torch.equal(state.buffers["calls"], given) and torch.equal(new["calls"], given + 1)
    # A new submodule rebuilds the slots (fine-tuning's new head): what was learned about 'calls' stays.
    c2.lin = nn.Linear(2, 2)
    state = fnlit.TrainState.create(c2, fnlit.optim.sgd(0.1), seed=0)
    fnlit.apply(c2, state.params, state.buffers, -torch.ones(1, 2))  # the rebuilt slots' first forward: no update
    given = state.buffers["calls"].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: still copied
        _, new = fnlit.apply(c2, state.params, state.buffers, torch.ones(1, 2))
    assert torch.equal(state.buffers["calls"], given) and torch.equal(new["calls"], given + 1)


def test_a_buffer_the_forward_reassigns_comes_back_updated_as_in_plain_pytorch():
    class RunningNorm(nn.Module):  # self.mean = ... (not in place): a common running normaliser
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(3))
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            if self.training:
                self.mean = 0.9 * self.mean + 0.1 * x.mean(0)
            return self.fc(x - self.mean)

    torch.manual_seed(0)
    m = RunningNorm()
    ref = copy.deepcopy(m)
    state = fnlit.TrainState.create(m, fnlit.optim.sgd(0.1), seed=0)
    buffers = state.buffers
    for i in range(3):
        x = torch.randn(4, 3) + i
        out, buffers = fnlit.apply(m, state.params, buffers, x)
        torch.testing.assert_close(out, ref(x), rtol=0, atol=0)
        torch.testing.assert_close(buffers["mean"], ref.mean, rtol=0, atol=0)
    assert float(state.buffers["mean"].abs().sum()) == 0 and not buffers["mean"].requires_grad
    # The same through torch.func (the functional_call path taken under vmap, grad and compile).
    x = torch.randn(4, 3)
    grads, new = torch.func.grad(lambda p: (lambda o: (o[0].sum(), o[1]))(fnlit.apply(m, p, state.buffers, x)), has_aux=True)(state.params)
    torch.testing.assert_close(new["mean"], 0.1 * x.mean(0), rtol=0, atol=0)


def test_a_forward_setting_a_buffer_to_none_is_told_the_state_holds_tensors():
    # A stream's cache reset with `self.cache = None` (plain PyTorch runs it) failed with "'NoneType' object has no
    # attribute 'detach'"; now an error naming the buffer, eagerly and through torch.func, the module left as it was.
    class Stream(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(2, 2)
            self.register_buffer("cache", torch.zeros(2))

        def forward(self, x):
            out = self.l(x) + self.cache
            self.cache = None
            return out

    m = Stream()
    own = m.cache
    state = fnlit.TrainState.create(m, fnlit.optim.sgd(0.1), seed=0)
    m(torch.ones(3, 2))  # the reference: plain PyTorch runs it
    m.cache = own
    for run in (lambda p: fnlit.apply(m, p, state.buffers, torch.ones(3, 2)),
                lambda p: torch.func.grad(lambda q: fnlit.apply(m, q, state.buffers, torch.ones(3, 2))[0].sum())(p)):
        with pytest.raises(TypeError, match=r"Stream's forward set its buffer 'cache' to None \(self.cache = None\)"):
            run(state.params)
        assert m.cache is own


def test_apply_leaves_each_submodule_in_its_own_mode():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    m.train()
    m[1].eval()  # a frozen BatchNorm, as when fine-tuning
    state = fnlit.TrainState.create(m, fnlit.optim.sgd(0.1), seed=0)
    fnlit.apply(m, state.params, state.buffers, torch.randn(8, 4), train=False)
    assert [mod.training for mod in m] == [True, False, True] and m.training


def test_value_and_grad_nests_like_jax_for_a_gradient_penalty():
    torch.manual_seed(0)
    p, x = {"w": torch.randn(3)}, torch.randn(3)

    def f(p):
        return torch.sin(p["w"] * x).sum()

    def penalised(grad):
        return lambda p: f(p) + (grad(f)(p)["w"] ** 2).sum()

    value, g = fnlit.value_and_grad(penalised(lambda fn: lambda p: fnlit.value_and_grad(fn)(p)[1]))(p)
    ref_g, ref_value = torch.func.grad_and_value(penalised(torch.func.grad))(p)
    torch.testing.assert_close(value, ref_value)
    torch.testing.assert_close(g["w"], ref_g["w"])  # not f's gradient alone: the penalty is differentiated too


def test_a_gradient_with_respect_to_an_input_inside_value_and_grad_is_differentiated_too():
    # WGAN-GP's penalty (and a physics-informed loss): the inner gradient is taken with respect to an input that
    # does not require grad, and reads the outer params. It was taken first-order on detached leaves, cut off
    # from the params ("the loss does not depend on the arguments"). Reference: plain autograd, create_graph.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(6, 8)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.0), seed=0)

    def penalty(p):
        _, gx = fnlit.value_and_grad(lambda xx: fnlit.apply(model, p, state.buffers, xx)[0].sum())(x)
        return ((gx.norm(dim=1) - 1) ** 2).mean()

    value, grads = fnlit.value_and_grad(penalty)(state.params)
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(model(xr).sum(), xr, create_graph=True)
    want = ((gx.norm(dim=1) - 1) ** 2).mean()
    want.backward()
    torch.testing.assert_close(value, want.detach())
    for name, param in model.named_parameters():
        want_g = torch.zeros_like(param) if param.grad is None else param.grad  # the last bias: no effect on gx
        torch.testing.assert_close(grads[name], want_g, rtol=1e-5, atol=1e-7)


class _ForceField(nn.Module):
    """Energies and forces (-dE/dx, taken inside the forward), with a BatchNorm that updates in place."""

    def __init__(self, use_fnlit):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))
        self.use_fnlit = use_fnlit

    def forward(self, x):
        if self.use_fnlit:
            _, gx = fnlit.value_and_grad(lambda xx: self.net(xx).sum())(x)
        else:
            xr = x.detach().requires_grad_()
            (gx,) = torch.autograd.grad(self.net(xr).sum(), xr, create_graph=True)
        return self.net(x), -gx


def test_a_gradient_taken_inside_the_forward_trains_as_plain_autograd_does():
    # The nested call ran under torch.func, which refuses a forward that updates a buffer in place (BatchNorm);
    # it is plain autograd with create_graph now. Reference: the same model in plain PyTorch, one SGD step.
    torch.manual_seed(0)
    ref = _ForceField(use_fnlit=False)
    model = copy.deepcopy(ref)
    model.use_fnlit = True
    x, e, f = torch.randn(8, 3), torch.randn(8, 1), torch.randn(8, 3)

    def loss(m, b):
        energy, force = m(b[0])
        return F.mse_loss(energy, b[1]) + F.mse_loss(force, b[2])

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    new, metrics = fnlit.train_step(model, loss)(state, (x, e, f))
    want = loss(ref, (x, e, f))
    want.backward()
    torch.testing.assert_close(metrics["loss"], want.detach())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(new.params[name], p.detach() - 0.1 * p.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(new.buffers["net.1.running_mean"], ref.net[1].running_mean)


def test_a_nested_gradient_treats_what_its_function_captures_as_a_constant_as_torch_func_does():
    # The nested call differentiated its argument as the outer leaf itself, so a function that also captures
    # that tensor (or gets it at two positions) counted those paths too (2x the gradient). Reference: torch.func.
    torch.manual_seed(0)
    w = torch.randn(4)

    def outer(grad_of):
        return lambda w: (grad_of(lambda q: (q * w).sum(), w) ** 2).sum()

    got = fnlit.value_and_grad(outer(lambda f, w: fnlit.value_and_grad(f)(w)[1]))(w)[1]
    want = torch.func.grad(outer(lambda f, w: torch.func.grad(f)(w)))(w)
    torch.testing.assert_close(got, want)

    def twice(grad_of):
        return lambda w: sum((g**2).sum() for g in grad_of(lambda a, b: (a * b * b).sum(), w))

    got = fnlit.value_and_grad(twice(lambda f, w: fnlit.value_and_grad(f, argnums=(0, 1))(w, w)[1]))(w)[1]
    want = torch.func.grad(twice(lambda f, w: torch.func.grad(f, argnums=(0, 1))(w, w)))(w)
    torch.testing.assert_close(got, want)


def test_value_and_grad_argnums_tuple_gives_a_tuple_under_vmap_too():
    p, xs = {"w": torch.randn(3)}, torch.randn(4, 3)
    vg = fnlit.value_and_grad(lambda p, x: (p["w"] * x).sum(), argnums=(0,))
    _, eager = vg(p, xs[0])
    _, batched = torch.func.vmap(lambda x: vg(p, x))(xs)
    assert type(eager) is tuple and type(batched) is tuple and len(batched) == 1
    torch.testing.assert_close(batched[0]["w"], xs)


def test_apply_rejects_wrong_names():
    model = mlp()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    params = dict(state.params)
    params.pop("0.bias")
    with pytest.raises(KeyError, match=r"missing \['0\.bias'\]"):
        fnlit.apply(model, params, state.buffers, batch()[0])
    with pytest.raises(KeyError, match=r"not in the module \['extra'\]"):
        fnlit.apply(model, {**state.params, "extra": torch.ones(1)}, state.buffers, batch()[0])
    # The same count of names, one given twice (as a param and as a buffer) and one missing:
    with pytest.raises(KeyError, match=r"missing \['0\.bias'\]"):
        fnlit.apply(model, params, {"0.weight": state.params["0.weight"]}, batch()[0])
    # Every name present, one of them also given as a buffer: the message names it.
    with pytest.raises(KeyError, match=r"given in both params and buffers \['0\.weight'\]"):
        fnlit.apply(model, state.params, {"0.weight": state.params["0.weight"]}, batch()[0])


def test_value_and_grad_matches_autograd_and_never_touches_dot_grad():
    model = mlp()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    x, y = batch()
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()

    def loss_fn(params):
        return F.cross_entropy(fnlit.apply(model, params, state.buffers, x)[0], y)

    loss, grads = fnlit.value_and_grad(loss_fn)(state.params)
    assert loss.dim() == 0 and not loss.requires_grad
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in state.params.values())


def test_value_and_grad_argnums_aux_and_unused_inputs():
    def fn(a, b, c):
        return (a["w"] * b).sum(), {"twice": 2 * b}

    a, b = {"w": torch.tensor([1.0, 2.0]), "unused": torch.ones(3)}, torch.tensor([3.0, 4.0])
    (value, aux), (ga, gb) = fnlit.value_and_grad(fn, argnums=(0, 1), has_aux=True)(a, b, None)
    assert value.item() == 11.0 and torch.equal(aux["twice"], 2 * b)
    assert torch.equal(ga["w"], b) and torch.equal(ga["unused"], torch.zeros(3)) and torch.equal(gb, a["w"])


def test_value_and_grad_of_a_loss_that_ignores_its_arguments_says_so():
    params = {"w": torch.ones(2)}
    with pytest.raises(RuntimeError, match=r"does not depend on the arguments it differentiates"):
        fnlit.value_and_grad(lambda p: (params["w"] * 2).sum())(params)  # the closure's tensor, not p's
    # The module's own parameters (model(x) instead of fnlit.apply): a graph, but not to p. Zero gradients
    # would train nothing, silently; alone and under accumulate.
    model = nn.Linear(2, 1)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)

    def step(state, batch):
        _, grads = fnlit.value_and_grad(lambda p: model(batch).sum())(state.params)
        return state.apply_gradients(grads), {}

    for wrapped in (step, fnlit.accumulate(step, 2)):
        with pytest.raises(RuntimeError, match=r"does not depend on the arguments .*graph reaches none of them"):
            wrapped(state, torch.ones(4, 2))
    # No tensor to differentiate at all (an empty dict), the loss reading the module's own parameters: autograd's
    # engine failed an internal assert ("please report a bug to PyTorch"). As under torch.func (vmap), an error that
    # says so; the module's own parameters get no .grad (autograd.backward without inputs would fill them).
    with pytest.raises(RuntimeError, match=r"does not depend on the arguments it differentiates"):
        torch.func.vmap(lambda x: fnlit.value_and_grad(lambda p: model(x).sum())({}))(torch.ones(3, 4, 2))
    for wrapped in (step, fnlit.accumulate(step, 2)):
        with pytest.raises(RuntimeError, match=r"does not depend on the arguments .*hold no tensor"):
            wrapped(state.replace(params={}), torch.ones(4, 2))
    assert model.weight.grad is None


def test_value_and_grad_seeds_and_accumulates_as_autograd_does():
    # The engine path (plain tensors) and the public functions (what tensor subclasses take) agree
    # bitwise with torch.autograd.grad, also for a seed other than one and into existing .grad.
    from fnlit.functional import _backward

    torch.manual_seed(0)
    w, x = torch.randn(5, 3, requires_grad=True), torch.randn(4, 5)
    u = torch.randn(2, requires_grad=True)  # unused: zeros
    want = torch.autograd.grad((x @ w).tanh().sum(), [w])[0]
    got = _backward((x @ w).tanh().sum(), None, [w, u], accumulate=False)
    assert torch.equal(got[0], want) and torch.equal(got[1], torch.zeros(2))
    w.grad = torch.ones(5, 3)
    _backward((x @ w).tanh().sum(), torch.tensor(0.25), [w], accumulate=True)
    assert torch.equal(w.grad, torch.ones(5, 3) + want * 0.25)


def test_non_scalar_loss_names_its_shape():
    with pytest.raises(ValueError, match=r"shape \(16, 4\).*loss\.mean\(\)"):
        fnlit.value_and_grad(lambda p: p["w"] * 2)({"w": torch.ones(16, 4)})


def test_value_and_grad_under_vmap_gives_per_example_gradients():
    w = torch.randn(3)
    xs = torch.randn(5, 3)

    def loss(w, x):
        return (w * x).sum() ** 2

    grads = torch.func.vmap(lambda x: fnlit.value_and_grad(loss)(w, x)[1])(xs)
    for i in range(5):
        torch.testing.assert_close(grads[i], 2 * (w * xs[i]).sum() * xs[i])


def test_train_step_and_eval_step():
    model = mlp(bn=True)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)

    def loss_fn(m, b):
        logits = m(b[0])
        return F.cross_entropy(logits, b[1]), {"acc": (logits.argmax(-1) == b[1]).float().mean()}

    step = fnlit.train_step(model, loss_fn)
    new, metrics = step(state, batch())
    assert sorted(metrics) == ["acc", "loss"] and all(isinstance(v, torch.Tensor) for v in metrics.values())
    assert int(new.buffers["1.num_batches_tracked"]) == 1
    ev = fnlit.eval_step(model, lambda m, b: {"acc": (m(b[0]).argmax(-1) == b[1]).float().mean()})
    assert 0.0 <= float(ev(new, batch())["acc"]) <= 1.0


def test_the_first_training_forward_does_not_copy_frozen_params():
    # Frozen params live in state.buffers (a fine-tuned model's backbone can be most of it): never copied.
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    m[0].requires_grad_(False)
    m.register_buffer("scale", torch.ones(()))  # read, never written
    state = fnlit.TrainState.create(m, fnlit.optim.sgd(0.1), seed=0)
    assert {"0.weight", "0.bias", "scale"} <= state.buffers.keys()
    _, new = fnlit.apply(m, state.params, state.buffers, torch.randn(8, 4))
    assert all(new[k] is state.buffers[k] for k in ("0.weight", "0.bias"))
    assert torch.equal(new["scale"], state.buffers["scale"])  # a registered buffer: probed on a copy, unchanged
    assert new["1.running_mean"] is not state.buffers["1.running_mean"]  # the statistics: updated, on copies
    assert not torch.equal(new["1.running_mean"], state.buffers["1.running_mean"])


def test_first_forward_keeps_a_buffer_written_through_data_and_runs_under_inference_mode():
    class Codebook(nn.Module):  # a VQ-VAE style EMA written through .data (no version counter moves)
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("avg", torch.zeros(2))

        def forward(self, x):
            if self.training:
                self.avg.data.mul_(0.5).add_(0.5 * x.mean(0))
            return self.lin(x)

    m = Codebook()
    ref = copy.deepcopy(m)
    state = fnlit.TrainState.create(m, fnlit.optim.sgd(0.1), seed=0)
    x = torch.ones(4, 2)
    _, new = fnlit.apply(m, state.params, state.buffers, x)
    ref(x)
    torch.testing.assert_close(new["avg"], ref.avg, rtol=0, atol=0)  # the first step's update is kept
    bn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ref_bn = copy.deepcopy(bn).train()
    state = fnlit.TrainState.create(bn, fnlit.optim.sgd(0.1), seed=0)
    x = torch.randn(8, 3)
    with torch.inference_mode():  # a statistics calibration pass
        _, new = fnlit.apply(bn, state.params, state.buffers, x)
        ref_bn(x)
    torch.testing.assert_close(new["1.running_mean"], ref_bn[1].running_mean, rtol=0, atol=0)


def test_an_embedding_with_max_norm_warns_that_it_renorms_the_params_in_place():
    m = nn.Sequential(nn.Embedding(5, 3, max_norm=1.0), nn.Linear(3, 1))
    with torch.no_grad():
        m[0].weight.mul_(10)
    state = fnlit.TrainState.create(m, fnlit.optim.sgd(0.1), seed=0)
    before = state.params["0.weight"].clone()
    with pytest.warns(UserWarning, match=r"\['0'\] is an Embedding with max_norm: PyTorch renorms"):
        fnlit.apply(m, state.params, state.buffers, torch.tensor([1, 2]))
    assert not torch.equal(state.params["0.weight"], before)  # what the warning says: the input moved
    # One attached after the module's first call (a new input layer for fine-tuning) is told of too (it was not: the
    # slots rebuilt for the module were not new to the cache); one told of once is not told of again.
    m[0] = nn.Embedding(5, 3, max_norm=1.0)
    state = fnlit.TrainState.create(m, fnlit.optim.sgd(0.1), seed=0)
    with pytest.warns(UserWarning, match=r"\['0'\] is an Embedding with max_norm"):
        fnlit.apply(m, state.params, state.buffers, torch.tensor([1, 2]))
    m.append(nn.Identity())  # (the slots are rebuilt again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fnlit.apply(m, state.params, state.buffers, torch.tensor([1, 2]))


def test_data_parallel_does_not_average_a_buffer_the_first_forward_left_alone():
    from fnlit.transforms._frame import _updated_float_buffers

    m = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    m.register_buffer("table", torch.randn(5))  # read-only: averaging it over 3 ranks would move its bits
    state = fnlit.TrainState.create(m, fnlit.optim.sgd(0.1), seed=0)
    _, new = fnlit.apply(m, state.params, state.buffers, torch.randn(4, 3))
    updated = {n for n, _ in _updated_float_buffers(state, {"buffers": new})}
    assert updated == {"1.running_mean", "1.running_var"}  # the statistics only


def test_argnums_must_name_different_positional_arguments():
    f = lambda a, b: (a * b).sum()  # noqa: E731
    a, b = torch.ones(2), torch.full((2,), 3.0)
    with pytest.raises(ValueError, match="argnums elements to be unique"):
        fnlit.value_and_grad(f, argnums=(0, 0))
    with pytest.raises(TypeError, match="an int or a non-empty tuple of ints"):
        fnlit.value_and_grad(f, argnums=(0.0,))
    for bad in [(0, -2), 2, (-3,)]:  # -2 is 0 again; 2 and -3 name no argument
        with pytest.raises(ValueError, match=r"got 2 positional argument\(s\): each argnum must name a different one"):
            fnlit.value_and_grad(f, argnums=bad)(a, b)
    _, (ga, gb) = fnlit.value_and_grad(f, argnums=(0, -1))(a, b)  # autograd's reference: d/da = b, d/db = a
    assert torch.equal(ga, b) and torch.equal(gb, a)
    import numpy as np

    for spelled in [[0, 1], (np.int64(0), 1), range(2)]:  # any sequence of ints: as a tuple, eagerly and under vmap
        _, (ga, gb) = fnlit.value_and_grad(f, argnums=spelled)(a, b)
        assert torch.equal(ga, b) and torch.equal(gb, a)
        _, (va, vb) = torch.func.vmap(fnlit.value_and_grad(f, argnums=spelled))(a[None], b[None])
        assert torch.equal(va[0], b) and torch.equal(vb[0], a)
    _, g = fnlit.value_and_grad(f, argnums=np.int64(1))(a, b)
    assert torch.equal(g, a)


def test_a_frozen_batchnorms_first_eval_forward_hands_back_nothing_to_average_across_ranks():
    # The first eval-mode forward runs on copies; a copy nothing wrote is not an update (data_parallel would
    # average it across ranks, which is inexact for 3: frozen statistics must stay bitwise as they are).
    from fnlit.transforms._frame import _updated_float_buffers

    model = mlp(bn=True)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    _, new = fnlit.apply(model, state.params, state.buffers, batch()[0], train=False)
    assert new["1.running_mean"] is not state.buffers["1.running_mean"]  # a probe copy
    assert _updated_float_buffers(state, {"buffers": new}) == []


def test_apply_leaves_a_submodule_used_twice_holding_its_own_parameters():
    # nn.Sequential(l, act, l): the slot was swapped twice and restored in forward order, so the module kept the
    # state's tensor (after value_and_grad, the autograd leaf). Reference: the module's own forward (the state
    # holds copies of its values).
    l = nn.Linear(2, 2)
    model = nn.Sequential(l, nn.Tanh(), l)
    own_weight, own_bias = l.weight, l.bias
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    x = torch.randn(3, 2)
    out, _ = fnlit.apply(model, state.params, state.buffers, x)
    assert l.weight is own_weight and l.bias is own_bias
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    fnlit.value_and_grad(lambda p: fnlit.apply(model, p, {}, x)[0].sum())(state.params)
    assert l.weight is own_weight and isinstance(l.weight, nn.Parameter)


def test_value_and_grad_names_a_leaf_that_is_not_a_tensor():
    # It failed with "AttributeError: 'int' object has no attribute 'requires_grad'".
    with pytest.raises(TypeError, match=r"differentiates every leaf of argument 0, but its leaf n is int 3"):
        fnlit.value_and_grad(lambda p: p["w"].sum() * p["n"])({"w": torch.ones(2), "n": 3})
    with pytest.raises(TypeError, match=r"its leaf c is float 3\.0"):  # nested in another value_and_grad too
        fnlit.value_and_grad(lambda w: fnlit.value_and_grad(lambda q: q["w"].sum())({"w": w, "c": 3.0})[0])(torch.ones(2))


def test_value_and_grad_names_an_integer_tensor_among_the_differentiated_leaves():
    # {**state.params, **state.buffers} holds BatchNorm's int64 num_batches_tracked: torch's bare "only Tensors of
    # floating point dtype can require gradients" named no leaf, eagerly, under accumulate and per_example_grads.
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    both = {**state.params, **state.buffers}
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))

    def loss_fn(p, x, y):
        params, buffers = {k: p[k] for k in state.params}, {k: p[k] for k in state.buffers}
        return F.cross_entropy(fnlit.apply(model, params, buffers, x, train=False)[0], y)

    def step(state, batch):
        loss, _ = fnlit.value_and_grad(loss_fn)(both, *batch)
        return state, {"loss": loss}

    said = r"its leaf 1\.num_batches_tracked is a torch\.int64 tensor: only floating-point and complex .*state\.params"
    for run in (
        lambda: fnlit.value_and_grad(loss_fn)(both, x, y),
        lambda: fnlit.accumulate(step, 2)(state, (x, y)),
        lambda: fnlit.per_example_grads(lambda p, ex: loss_fn(p, ex[0][None], ex[1][None]), both, (x, y)),
    ):
        with pytest.raises(TypeError, match=said):
            run()
    with pytest.raises(TypeError, match=r"its leaf m is a torch\.bool tensor"):  # nested in another value_and_grad too
        fnlit.value_and_grad(lambda w: fnlit.value_and_grad(lambda q: q["w"].sum())({"w": w, "m": w > 0})[0])(torch.ones(2))
    with pytest.raises(TypeError, match=r"its leaf n is int 3"):  # under vmap: torch.func's "must be Tensor, got int"
        torch.func.vmap(fnlit.value_and_grad(lambda p, x: p["w"] @ x), in_dims=(None, 0))({"w": torch.ones(3), "n": 3}, x)


def test_value_and_grad_keeps_gradients_that_do_not_overlap_as_grad_holds_them():
    # Reference: .grad after a plain backward. A sparse embedding gradient stays sparse (copying it failed),
    # a channels_last conv weight's gradient stays channels_last, disjoint slices of one storage stay views.
    emb = nn.Embedding(10, 3, sparse=True)
    idx = torch.tensor([1, 2, 2])
    emb(idx).sum().backward()
    _, g = fnlit.value_and_grad(lambda p: fnlit.apply(emb, p, {}, idx)[0].sum())({"weight": emb.weight.detach()})
    assert g["weight"].layout == emb.weight.grad.layout == torch.sparse_coo
    torch.testing.assert_close(g["weight"].to_dense(), emb.weight.grad.to_dense())

    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    conv(x).sum().backward()
    params = {k: v.detach() for k, v in conv.named_parameters()}
    _, g = fnlit.value_and_grad(lambda p: fnlit.apply(conv, p, {}, x)[0].sum())(params)
    assert g["weight"].is_contiguous(memory_format=torch.channels_last) == conv.weight.grad.is_contiguous(
        memory_format=torch.channels_last) == True  # noqa: E712

    a, b = torch.randn(2, 3), torch.randn(4, 3)
    _, g = fnlit.value_and_grad(lambda p: (torch.cat([p["a"], p["b"]]) * torch.arange(6.0)[:, None]).sum())({"a": a, "b": b})
    assert g["a"].untyped_storage().data_ptr() == g["b"].untyped_storage().data_ptr()  # kept as torch.cat's backward made them
    torch.testing.assert_close(torch.cat([g["a"], g["b"]]), torch.arange(6.0)[:, None].expand(6, 3))


@pytest.mark.cuda
def test_a_module_without_params_seeds_the_cuda_generator_of_its_inputs():
    # nn.Dropout has no params or buffers: only the CPU generator was seeded, so its CUDA dropout drew from the
    # global CUDA generator (two calls with one key differed).
    x, k = torch.ones(1000, device="cuda"), fnlit.random.key(0)
    first = fnlit.apply(torch.nn.Dropout(0.5), {}, {}, x, rng=k)[0]
    torch.cuda.manual_seed(123)  # moves the global CUDA generator
    assert torch.equal(fnlit.apply(torch.nn.Dropout(0.5), {}, {}, x, rng=k)[0], first)


class _FunctionalBatchNorm(torch.nn.Module):
    """A norm layer of one's own on F.batch_norm, whose kernel updates the running statistics moving no version."""

    def __init__(self, n):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(torch.ones(n)), torch.nn.Parameter(torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=self.training)


def test_statistics_a_kernel_updates_without_a_version_are_copied_and_returned_as_torch_updates_them():
    # Unseen by the version check, such buffers were written into the caller's state from the second forward on
    # (the previous state changed in place) and were not averaged by data_parallel (ranks drifted apart).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), _FunctionalBatchNorm(3))
    reference = copy.deepcopy(model)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    for i in range(3):
        x = torch.randn(8, 3)
        before = {k: v.clone() for k, v in state.buffers.items()}
        out, buffers = fnlit.apply(model, state.params, state.buffers, x)
        assert all(torch.equal(before[k], state.buffers[k]) for k in before)  # the caller's buffers untouched
        reference(x)  # the reference: the module called as it is
        for k, v in reference.named_buffers():
            assert torch.equal(buffers[k], v), k
        state = state.replace(buffers=buffers)


def test_a_first_training_forward_under_inference_mode_leaves_the_callers_buffers_as_they_were():
    # A statistics calibration pass run under inference_mode skipped the first forward's probe: buffers that a norm
    # layer of one's own (F.batch_norm) or a .data write updates, moving no version, were written into the caller's
    # state.buffers. Reference: the caller's buffers before the call, and the module called as it is.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), _FunctionalBatchNorm(3))
    reference = copy.deepcopy(model)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    before = {k: v.clone() for k, v in state.buffers.items()}
    x = torch.randn(8, 3)
    with torch.inference_mode():
        _, buffers = fnlit.apply(model, state.params, state.buffers, x)
        reference(x)
    for k in before:
        assert torch.equal(state.buffers[k], before[k]), k
    for k, v in reference.named_buffers():
        assert torch.equal(buffers[k], v), k
    assert not buffers["1.running_mean"].is_inference()  # usable in a training step afterwards


def test_value_and_grad_under_inference_mode_says_so_instead_of_blaming_the_loss():
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"ran under torch.inference_mode\(\), where autograd records nothing"):
        fnlit.value_and_grad(lambda a: (a**2).sum())(torch.ones(2))
    with torch.no_grad():  # the reference: no_grad is undone inside, as torch.func.grad does
        loss, g = fnlit.value_and_grad(lambda a: (a**2).sum())(torch.ones(2))
    assert torch.equal(g, torch.func.grad(lambda a: (a**2).sum())(torch.ones(2)))


def test_a_constant_buffer_holding_nan_is_not_taken_for_one_the_forward_updates():
    # A first version compared the first forward's copies by value: NaN != NaN marked the buffer as updated (copied
    # every forward, and a step passing no buffers= warned every step).
    class Filled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)
            self.register_buffer("fill", torch.tensor([float("nan"), 1.0, 2.0]))

        def forward(self, x):
            return self.lin(x + torch.nan_to_num(self.fill))

    model = Filled()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            loss_fn = lambda p: fnlit.apply(model, p, state.buffers, torch.ones(4, 3))[0].pow(2).mean()  # noqa: E731
            _, grads = fnlit.value_and_grad(loss_fn)(state.params)
            state = state.apply_gradients(grads)  # no buffers=: nothing was updated


def test_a_buffer_written_through_data_is_copied_and_the_callers_state_stays_as_it_was():
    # A codebook EMA written with self.ema.data.mul_(...): another tensor object on the buffer's memory, and no
    # version moves. The first forward's watch went by object: from the second forward the caller's buffer changed.
    class Ema(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)
            self.register_buffer("ema", torch.ones(3))

        def forward(self, x):
            self.ema.data.mul_(0.5).add_(x.mean(0).detach() * 0.5)
            return self.lin(x) * self.ema

    model = Ema()
    reference = copy.deepcopy(model)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(4, 3, generator=g)
        before = state.buffers["ema"].clone()
        _, buffers = fnlit.apply(model, state.params, state.buffers, x)
        assert torch.equal(state.buffers["ema"], before)  # the caller's untouched
        reference(x)  # the reference: the module called as it is
        assert torch.equal(buffers["ema"], reference.ema)
        state = state.replace(buffers=buffers)


class _Checkpointed(nn.Module):
    """A block under activation checkpointing (torch.utils.checkpoint runs its forward again in the backward)."""

    def __init__(self, bn=False):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16) if bn else nn.Identity(), nn.Tanh())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False))


def _sgd_reference(model, batches, loss_fn, lr=0.1):
    """Plain PyTorch: the module's own forward (checkpointed as well), backward, torch.optim.SGD."""
    ref = copy.deepcopy(model).train()
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    for b in batches:
        opt.zero_grad()
        loss_fn(ref, b).backward()
        opt.step()
    return ref


def _trained_both_ways(model, n, lr=0.1):
    """fnlit.train_step with sgd(lr) over n batches from a state of the module, and _sgd_reference's module."""
    batches = [batch(seed=i) for i in range(n)]
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(lr), seed=0)
    step = fnlit.train_step(model, loss_fn)
    for b in batches:
        state, _ = step(state, b)
    return state, _sgd_reference(model, batches, loss_fn, lr=lr)


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("module_mode", ["train", "eval"])
def test_a_checkpointed_block_trains_on_the_states_tensors_as_plain_pytorch(bn, module_mode):
    # The backward runs the block's forward again: it read the module's own weights (put back when apply returned),
    # so the gradients were those of the initial weights once the state had moved; a BatchNorm there updated the
    # module's own statistics. Reference: plain PyTorch with the same checkpointing (which updates a checkpointed
    # BatchNorm's statistics twice a step: forward and recompute; so do the buffers fnlit hands back).
    model = _Checkpointed(bn).train(module_mode == "train")  # apply(train=True) trains an eval-mode module too
    own = {k: v.clone() for k, v in model.state_dict().items()}
    state, ref = _trained_both_ways(model, 3)
    for k, v in ref.named_parameters():
        torch.testing.assert_close(state.params[k], v.detach(), rtol=1e-5, atol=1e-6)
    for k, v in ref.named_buffers():
        torch.testing.assert_close(state.buffers[k], v, rtol=1e-5, atol=1e-6)
    if bn:
        assert int(state.buffers["block.1.num_batches_tracked"]) == 6 == int(ref.block[1].num_batches_tracked)
    for k, v in model.state_dict().items():
        assert torch.equal(v, own[k]), k  # the module's own tensors: unchanged
    assert model.training == (module_mode == "train") and all(m.training == model.training for m in model.modules())


class _DirectReads(nn.Module):
    """Checkpointed blocks that read parameters themselves before any submodule call."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8) * 0.3)
        self.pos_emb = nn.Parameter(torch.randn(16) * 0.1)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def block(self, x):
        h = torch.tanh(F.linear(x, self.w)) + self.pos_emb
        return torch.tanh(F.linear(h, self.fc.weight, self.fc.bias))

    def forward(self, x):
        return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False))


def test_a_checkpointed_block_reading_parameters_directly_trains_as_plain_pytorch():
    # The module got the state's tensors at its first submodule forward in the backward: a recompute that runs none
    # (F.linear(x, self.w), x + self.pos_emb) read the module's own. Reference: plain PyTorch, torch.optim.SGD.
    torch.manual_seed(0)
    model = _DirectReads()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    state, ref = _trained_both_ways(model, 5, lr=0.5)
    for k, v in ref.named_parameters():
        torch.testing.assert_close(state.params[k], v.detach(), rtol=1e-5, atol=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, own[k]), k


def test_a_checkpointed_block_under_accumulate_and_a_gradient_penalty_matches_plain_autograd():
    model = _Checkpointed()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    params = {k: v * 2 for k, v in state.params.items()}  # away from the module's own
    ref = copy.deepcopy(model)
    ref.load_state_dict(params)
    x, y = batch()

    def penalised(p):  # a gradient penalty: the inner gradient's backward recomputes the block too
        _, gx = fnlit.value_and_grad(lambda xx: fnlit.apply(model, p, {}, xx)[0].sum())(x)
        return F.cross_entropy(fnlit.apply(model, p, {}, x)[0], y) + (gx**2).mean()

    _, grads = fnlit.value_and_grad(penalised)(params)
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(ref(xr).sum(), xr, create_graph=True)
    (F.cross_entropy(ref(x), y) + (gx**2).mean()).backward()
    for k, v in ref.named_parameters():
        torch.testing.assert_close(grads[k], v.grad, rtol=1e-5, atol=1e-6)
    ref.zero_grad()

    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    step = fnlit.accumulate(fnlit.train_step(model, loss_fn), 2)  # the in-place accumulating backward
    new, _ = step(state.replace(params=params), (x, y))
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for half in (slice(0, 8), slice(8, 16)):
        (loss_fn(ref, (x[half], y[half])) / 2).backward()
    opt.step()
    for k, v in ref.named_parameters():
        torch.testing.assert_close(new.params[k], v.detach(), rtol=1e-5, atol=1e-6)


def test_one_module_applied_to_two_param_sets_refuses_a_checkpointed_backward():
    # Which of the two the recomputed block reads is unknown: an error, not one of them silently.
    model = _Checkpointed()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    teacher = {k: v * 2 for k, v in state.params.items()}
    x, _ = batch()

    def distill(p, under):
        with under():
            target = fnlit.apply(model, teacher, {}, x)[0]
        return F.mse_loss(fnlit.apply(model, p, {}, x)[0], target)

    with pytest.raises(RuntimeError, match="applied _Checkpointed to two different sets of params"):
        fnlit.value_and_grad(distill)(state.params, contextlib.nullcontext)
    _, grads = fnlit.value_and_grad(distill)(state.params, torch.no_grad)  # a teacher without gradient: fine
    ref, tref = copy.deepcopy(model), copy.deepcopy(model)
    tref.load_state_dict(teacher)
    with torch.no_grad():
        target = tref(x)
    F.mse_loss(ref(x), target).backward()
    for k, v in ref.named_parameters():
        torch.testing.assert_close(grads[k], v.grad, rtol=1e-5, atol=1e-6)


def test_a_model_and_one_of_its_blocks_applied_to_other_params_refuse_a_checkpointed_backward():
    # The block applied on its own (other params, gradients on) after the whole model: its tensors were the ones the
    # backward put in, so the model's recomputed block read them: silently wrong gradients for the model's block.
    # Now refused as one module applied to two param sets is (in either order); the block's params taken from the
    # model's (an auxiliary loss on its features) or its other params without gradient stay fine. Reference:
    # torch.func.functional_call and plain autograd.
    torch.manual_seed(0)
    model = _Checkpointed()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    other = {k: torch.randn_like(v) for k, v in model.block.named_parameters()}
    x, _ = batch()

    def block_params(p):
        return {k.removeprefix("block."): v for k, v in p.items() if k.startswith("block.")}

    def loss(p, q, under=contextlib.nullcontext, block_first=False):
        outs = []
        for call in (1, 0) if block_first else (0, 1):
            if call == 0:
                outs.append(fnlit.apply(model, p, {}, x)[0].pow(2).mean())
            else:
                with under():
                    block = q if q is not None else block_params(p)
                    outs.append(fnlit.apply(model.block, block, {}, x)[0].pow(2).mean())
        return sum(outs)

    for block_first in (False, True):
        with pytest.raises(RuntimeError, match="two different sets of params"):
            fnlit.value_and_grad(loss)(state.params, other, block_first=block_first)
    for q, under in ((other, torch.no_grad), (None, contextlib.nullcontext)):
        _, grads = fnlit.value_and_grad(loss)(state.params, q, under)
        p = {k: v.clone().requires_grad_() for k, v in state.params.items()}
        with under():
            extra = torch.func.functional_call(model.block, q if q is not None else block_params(p), (x,)).pow(2).mean()
        ref = torch.autograd.grad(torch.func.functional_call(model, p, (x,)).pow(2).mean() + extra, list(p.values()))
        for k, g in zip(p, ref):
            torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-6)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight  # tied: state_dict lists emb.weight and out.weight

    def forward(self, i):
        return self.out(self.emb(i))


def test_a_tied_weight_can_be_given_under_any_of_its_names_as_functional_call_takes_it():
    # apply refused out.weight as "not in the module". Reference: torch.func.functional_call (tie_weights=True).
    model, i = _Tied(), torch.tensor([1, 2, 3])
    w = model.emb.weight.detach() * 2
    for given in ({"emb.weight": w, "out.weight": w}, {"out.weight": w}, {"emb.weight": w}):
        out, _ = fnlit.apply(model, given, {}, i)
        torch.testing.assert_close(out, torch.func.functional_call(model, given, (i,)), rtol=0, atol=0)
    out, _ = fnlit.apply(model, dict(model.state_dict()), {}, i)  # two detached views of one weight
    torch.testing.assert_close(out, model(i), rtol=0, atol=0)  # (functional_call refuses these by identity)
    shared = nn.Linear(4, 4)
    seq = nn.Sequential(shared, nn.Tanh(), shared)  # a submodule used twice: 0.weight and 2.weight
    x = torch.randn(2, 4)
    torch.testing.assert_close(fnlit.apply(seq, dict(seq.state_dict()), {}, x)[0], seq(x), rtol=0, atol=0)


def test_tied_names_given_different_tensors_are_refused_as_one_tensor():
    model, i = _Tied(), torch.tensor([1, 2, 3])
    given = {"emb.weight": model.emb.weight.detach(), "out.weight": model.emb.weight.detach() * 2}
    with pytest.raises(ValueError, match="which are tied"):
        torch.func.functional_call(model, given, (i,))
    with pytest.raises(ValueError, match=r"\['emb.weight', 'out.weight'\] name one tensor of _Tied .* Pass it once"):
        fnlit.apply(model, given, {}, i)


def test_value_and_grad_over_both_names_of_a_tied_weight_is_refused_and_one_name_gets_the_whole_gradient():
    # Each name became a leaf of its own, and apply used the first: out.weight's gradient was zeros, silently.
    # torch.func.grad refuses the dict too. Reference: PyTorch's .grad of the tied parameter.
    model, i, t = _Tied(), torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    w = model.emb.weight.detach().clone()
    loss = lambda p: F.cross_entropy(fnlit.apply(model, p, {}, i)[0], t)  # noqa: E731
    with pytest.raises(ValueError, match="which are tied"):
        reference = lambda p: F.cross_entropy(torch.func.functional_call(model, p, (i,)), t)  # noqa: E731
        torch.func.grad(reference)({"emb.weight": w, "out.weight": w})
    with pytest.raises(ValueError, match=r"'out.weight'\] name one tensor of _Tied .* separate tensors that require grad"):
        fnlit.value_and_grad(loss)({"emb.weight": w, "out.weight": w})
    _, grads = fnlit.value_and_grad(loss)({"emb.weight": w})
    F.cross_entropy(model(i), t).backward()
    torch.testing.assert_close(grads["emb.weight"], model.emb.weight.grad, rtol=1e-6, atol=1e-7)


def test_threads_sharing_a_module_leave_its_own_tensors_in_place_and_train_as_plain_pytorch():
    # Every backward put the loss's tensors back into the module and restored what it had seen, so two threads'
    # interleaved steps left the module holding one step's detached tensors. Now the module's own are back once no
    # backward runs (while one does, the module holds its tensors: the states are made before the threads start).
    # Reference: plain PyTorch, each thread's steps on a copy of the module.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    own = dict(model.state_dict(keep_vars=True))
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    step = fnlit.train_step(model, loss_fn)
    batches = {s: [batch(seed=10 * s + i) for i in range(4)] for s in (0, 1)}
    results, errors = {}, []
    starts = {s: fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=s) for s in (0, 1)}

    def run(s):
        try:
            state = starts[s].replace(params={k: v * (2 + s) for k, v in starts[s].params.items()})
            for i in range(150):
                state, _ = step(state, batches[s][i % 4])
            results[s] = state.params
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    run_threads(run, [(0,), (1,)])
    assert not errors and len(results) == 2
    now = dict(model.state_dict(keep_vars=True))
    assert all(now[k] is v for k, v in own.items()), [k for k in own if now[k] is not own[k]]
    for s in (0, 1):
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for p in ref.parameters():
                p.mul_(2 + s)
        ref = _sgd_reference(ref, [batches[s][i % 4] for i in range(150)], loss_fn)
        for k, v in ref.named_parameters():
            torch.testing.assert_close(results[s][k], v.detach(), rtol=1e-4, atol=1e-5)


def test_a_teacher_and_student_sharing_a_module_with_the_student_checkpointed_around_apply():
    # What the two-param-sets error recommends: the recompute's forward runs inside apply (its own tensors), so it
    # is not refused (it was); another thread's apply of the module during that backward is not refused either.
    import threading

    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    teacher = {k: v * 2 for k, v in state.params.items()}
    x, _ = batch()
    in_backward, done, other = threading.Event(), threading.Event(), {}

    def evaluate():
        assert in_backward.wait(10)
        try:
            with torch.no_grad():
                other["out"] = fnlit.apply(model, teacher, {}, x, train=False)[0]
        finally:
            done.set()

    def distill(p, t):
        student = lambda q, xx: fnlit.apply(model, q, {}, xx)[0]  # noqa: E731
        out = torch.utils.checkpoint.checkpoint(student, p, x, use_reentrant=False)
        out.register_hook(lambda g: (in_backward.set(), done.wait(10), g)[-1])
        return F.mse_loss(out, fnlit.apply(model, t, {}, x)[0])

    thread = threading.Thread(target=evaluate)
    thread.start()
    _, (gs, gt) = fnlit.value_and_grad(distill, argnums=(0, 1))(state.params, teacher)
    thread.join(10)
    ref, tref = copy.deepcopy(model), copy.deepcopy(model)
    tref.load_state_dict(teacher)
    F.mse_loss(ref(x), tref(x)).backward()
    for k in state.params:
        torch.testing.assert_close(gs[k], ref.get_parameter(k).grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gt[k], tref.get_parameter(k).grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(other["out"], tref(x), rtol=1e-5, atol=1e-6)


def test_two_threads_recomputing_one_modules_blocks_at_once_are_refused():
    # The module holds one backward's tensors from its first recompute to its end: a second thread's recompute
    # meanwhile raises instead of reading the first's; the first's gradients and the module's own are untouched.
    import threading

    model = _Checkpointed()
    own = dict(model.state_dict(keep_vars=True))
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    params = {k: v * 2 for k, v in state.params.items()}
    x, y = batch()
    recomputed, second_done, got = threading.Event(), threading.Event(), {}

    def held(p):  # its block's gradient is ready after the recompute: the backward waits there
        q = {k: v * 1 for k, v in p.items()}
        q["block.0.weight"].register_hook(lambda g: (recomputed.set(), second_done.wait(10), g)[-1])
        return F.cross_entropy(fnlit.apply(model, q, {}, x)[0], y)

    def first():
        try:
            got["first"] = fnlit.value_and_grad(held)(params)[1]
        except Exception as e:  # pragma: no cover - reported below
            got["first"] = e

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert recomputed.wait(10)
        with pytest.raises(RuntimeError, match="another thread's backward through the same module object"):
            fnlit.value_and_grad(lambda p: F.cross_entropy(fnlit.apply(model, p, {}, x)[0], y))(state.params)
    finally:
        second_done.set()
        thread.join(10)
    ref = copy.deepcopy(model)
    ref.load_state_dict(params)
    F.cross_entropy(ref(x), y).backward()
    for k, v in ref.named_parameters():
        torch.testing.assert_close(got["first"][k], v.grad, rtol=1e-5, atol=1e-6)
    now = dict(model.state_dict(keep_vars=True))
    assert all(now[k] is v for k, v in own.items())


def _paused_in_backward(model, params, buffers, x, y, during, **apply_kwargs):
    """Runs value_and_grad of the model's loss, calling ``during()`` in another thread while the backward is held at
    its start (the step's tensors in the module); returns the gradients and what ``during`` returned."""
    import threading

    in_backward, done, got = threading.Event(), threading.Event(), {}

    def other():
        try:
            assert in_backward.wait(10)
            got["other"] = during()
        except Exception as e:  # pragma: no cover - raised below
            got["other"] = e
        finally:
            done.set()

    def loss_fn(p):
        out = fnlit.apply(model, p, buffers, x, **apply_kwargs)[0]
        out.register_hook(lambda g: (in_backward.set(), done.wait(10), g)[-1])
        return F.cross_entropy(out, y)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        grads = fnlit.value_and_grad(loss_fn)(params)[1]
    finally:
        in_backward.set()
        thread.join(10)
    assert not thread.is_alive() and in_backward.is_set()
    if isinstance(got["other"], Exception):  # pragma: no cover - the failure itself
        raise got["other"]
    return grads, got["other"]


def test_trainstate_create_during_another_threads_backward_copies_the_modules_own_tensors():
    # The backward holds its step's tensors in the module until it ends: create copied those (a second thread's
    # fit on the same module started from the first's weights). Reference: clones of the module's tensors taken before.
    model = mlp(bn=True)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    params = {k: v * 2 + 1 for k, v in state.params.items()}
    buffers = {k: v + 3 if v.is_floating_point() else v + 5 for k, v in state.buffers.items()}
    x, y = batch()
    _, created = _paused_in_backward(model, params, buffers, x, y,
                                     lambda: fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=1))
    got = {**created.params, **created.buffers}
    assert set(got) == set(init)
    assert [k for k, v in init.items() if not torch.equal(got[k], v)] == []
    assert all(not v.requires_grad for v in got.values())


def test_export_during_another_threads_backward_writes_the_modules_own_tensors_and_leaves_the_backward_alone():
    # export copied into the step's tensors the backward held in the module (its backward then raised "modified by an
    # inplace operation", or the module did not hold the exported weights once it ended), and its eval() was undone
    # by the backward's end putting back the training flags it had set (apply's train=False on a training module).
    model = _Checkpointed(bn=True).train()
    own = dict(model.state_dict(keep_vars=True))
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    params = {k: v * 2 for k, v in state.params.items()}
    exported = state.replace(params={k: v - 1 for k, v in state.params.items()},
                             buffers={k: v + 1 for k, v in state.buffers.items()})
    x, y = batch()
    ref = copy.deepcopy(model).eval()
    ref.load_state_dict({**params, **state.buffers})
    F.cross_entropy(ref(x), y).backward()
    grads, _ = _paused_in_backward(model, params, state.buffers, x, y, lambda: fnlit.export(exported, model),
                                   train=False)
    for k, v in ref.named_parameters():
        torch.testing.assert_close(grads[k], v.grad, rtol=1e-5, atol=1e-6)
    now = dict(model.state_dict(keep_vars=True))
    assert all(now[k] is v for k, v in own.items())
    want = {**exported.params, **exported.buffers}
    assert [k for k in want if not torch.equal(now[k].detach(), want[k])] == []
    assert not any(m.training for m in model.modules())


def test_a_gradient_penalty_on_the_params_with_the_model_applied_outside_it_too_and_a_checkpointed_block():
    # The inner value_and_grad differentiates views of the outer call's params: taken for another param set, the
    # recompute was refused ("applied _Checkpointed to two different sets of params"). Reference: plain autograd.
    model = _Checkpointed()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    params = {k: v * 2 for k, v in state.params.items()}
    x, y = batch()

    def penalised(p):
        _, g = fnlit.value_and_grad(lambda q: F.cross_entropy(fnlit.apply(model, q, {}, x)[0], y))(p)
        return F.cross_entropy(fnlit.apply(model, p, {}, x)[0], y) + sum((v**2).sum() for v in g.values())

    _, grads = fnlit.value_and_grad(penalised)(params)
    ref = copy.deepcopy(model)
    ref.load_state_dict(params)
    g = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()), create_graph=True)
    (F.cross_entropy(ref(x), y) + sum((v**2).sum() for v in g)).backward()
    for k, v in ref.named_parameters():
        torch.testing.assert_close(grads[k], v.grad, rtol=1e-5, atol=1e-6)


class _Target(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, h):
        return torch.utils.checkpoint.checkpoint(lambda z: torch.tanh(self.lin(z)), h, use_reentrant=False)


class _Hyper(nn.Module):
    """A hypernetwork: its forward applies a submodule (checkpointed inside) to weights it generates."""

    def __init__(self):
        super().__init__()
        self.gen, self.target, self.head = nn.Linear(8, 72), _Target(), nn.Linear(8, 4)

    def forward(self, x):
        g = self.gen(x.mean(0))
        h = fnlit.apply(self.target, {"lin.weight": g[:64].view(8, 8), "lin.bias": g[64:]}, {}, x)[0]
        return self.head(h)


def test_a_hypernetwork_applying_a_checkpointed_submodule_to_generated_weights_matches_plain_autograd():
    # The outer call's tensors were redone after the inner call's, so the recompute read the submodule's params
    # from the state, not the generated ones: wrong gradients for the generator. Reference: the same computation
    # written out in plain PyTorch, without checkpointing.
    # Afterwards the module holds its own parameters again (the outer call's swap saved the module's, the inner
    # one's the outer's tensors: undone in the other order, the submodule kept the state's).
    model = _Hyper()
    own = dict(model.named_parameters())
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    params = {k: v * 2 for k, v in state.params.items()}
    x, y = batch()
    _, grads = fnlit.value_and_grad(lambda p: F.cross_entropy(fnlit.apply(model, p, {}, x)[0], y))(params)
    assert all(t is own[k] for k, t in model.named_parameters()) and len(own) == len(list(model.parameters()))
    ref = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    g = F.linear(x.mean(0), ref["gen.weight"], ref["gen.bias"])
    h = torch.tanh(F.linear(x, g[:64].view(8, 8), g[64:]))
    F.cross_entropy(F.linear(h, ref["head.weight"], ref["head.bias"]), y).backward()
    for k, v in ref.items():
        torch.testing.assert_close(grads[k], v.grad if v.grad is not None else torch.zeros_like(v), rtol=1e-5, atol=1e-6)


def test_an_apply_that_fails_inside_the_loss_leaves_no_record_for_the_recompute():
    # A call is recorded as it begins; a failed one (caught by the loss) is dropped, its error unchanged, so the
    # recompute is not refused as a second param set. Reference: plain autograd.
    model = _Checkpointed()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    x, y = batch()
    other = {k: v * 2 for k, v in state.params.items()}

    def loss(p):
        out = fnlit.apply(model, p, {}, x)[0]
        with pytest.raises(RuntimeError, match="mat1 and mat2"):
            fnlit.apply(model, other, {}, x[:, :5])
        return F.cross_entropy(out, y)

    _, grads = fnlit.value_and_grad(loss)(state.params)
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    for k, v in ref.named_parameters():
        torch.testing.assert_close(grads[k], v.grad, rtol=1e-5, atol=1e-6)


def test_a_gradient_penalty_through_a_sparse_embedding_matches_autograd():
    # The inner value_and_grad's view_as of a sparse embedding's weight failed in the backward ("reshape is not
    # implemented for sparse tensors"), in float32 too. Reference: autograd.grad(create_graph=True) on the module.
    import copy

    import torch.nn.functional as F

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 1))
    x, y = torch.tensor([1, 2, 2, 7, 1, 1]), torch.randn(6, 1)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def outer(p):
        loss, g = fnlit.value_and_grad(lambda q: F.mse_loss(fnlit.apply(model, q, {}, x)[0], y))(p)
        return loss + 0.1 * (g["1.weight"] ** 2).sum()

    value, grads = fnlit.value_and_grad(outer)(params)
    ref = copy.deepcopy(model)
    loss = F.mse_loss(ref(x), y)
    (g,) = torch.autograd.grad(loss, ref[1].weight, create_graph=True)
    total = loss + 0.1 * (g**2).sum()
    total.backward()
    torch.testing.assert_close(value, total.detach())
    for name, p in ref.named_parameters():
        want = p.grad.to_dense() if p.grad.is_sparse else p.grad
        got = grads[name].to_dense() if grads[name].is_sparse else grads[name]
        torch.testing.assert_close(got, want, msg=name)


def test_a_tensor_registered_after_the_first_apply_is_refused_as_on_a_fresh_module():
    # The slots of the first call were reused (their submodule links had not changed): a buffer the forward
    # registered lazily was then the module's own, updated in place and never in the state; a parameter added to a
    # submodule since was accepted untold. Reference: torch.func.functional_call(strict=True), and apply itself
    # on a module it has not run before: both name the missing tensor.
    class EMA(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x):
            if hasattr(self, "ema"):
                self.ema.mul_(0.9).add_(0.1 * x.mean(0))
            else:
                self.register_buffer("ema", x.mean(0).detach().clone())
            return self.l(x) - self.ema

    m = EMA()
    state = fnlit.TrainState.create(m, fnlit.optim.sgd(0.1), seed=0)
    x = torch.randn(4, 3)
    fnlit.apply(m, state.params, state.buffers, x)
    with pytest.raises(RuntimeError, match="Missing key"):
        torch.func.functional_call(m, {**state.params, **state.buffers}, (x,), strict=True)
    with pytest.raises(KeyError, match=r"missing \['ema'\]"):
        fnlit.apply(m, state.params, state.buffers, x)
    seq = nn.Sequential(nn.Linear(3, 3))
    s2 = fnlit.TrainState.create(seq, fnlit.optim.sgd(0.1), seed=0)
    fnlit.apply(seq, s2.params, s2.buffers, x)
    seq[0].register_parameter("extra", nn.Parameter(torch.ones(1)))
    with pytest.raises(KeyError, match=r"missing \['0\.extra'\].*create the state after a first forward"):
        fnlit.apply(seq, s2.params, s2.buffers, x)
    # A submodule attached since, and a buffer registered as None and filled by the forward (review).
    seq = nn.Sequential(nn.Linear(3, 3))
    s3 = fnlit.TrainState.create(seq, fnlit.optim.sgd(0.1), seed=0)
    fnlit.apply(seq, s3.params, s3.buffers, x)
    seq.append(nn.Linear(3, 3))
    with pytest.raises(KeyError, match=r"missing \['1\.bias', '1\.weight'\]"):
        fnlit.apply(seq, s3.params, s3.buffers, x)

    class NoneFilled(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)
            self.register_buffer("ema", None)

        def forward(self, x):
            if self.ema is None:
                self.ema = x.mean(0).detach().clone()
            return self.l(x) - self.ema

    m = NoneFilled()
    s4 = fnlit.TrainState.create(m, fnlit.optim.sgd(0.1), seed=0)
    fnlit.apply(m, s4.params, s4.buffers, x)
    with pytest.raises(KeyError, match=r"missing \['ema'\]"):
        fnlit.apply(m, s4.params, s4.buffers, x)


def test_a_compiled_step_leaves_a_boolean_buffer_updated_in_place_as_the_eager_one_does():
    # Traced forwards copied every registered buffer but boolean ones, so `self.seen |= ...` under fnlit.compile
    # wrote into the caller's state. Reference: the eager step, which leaves the given state as it was.
    class Seen(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)
            self.register_buffer("seen", torch.zeros(3, dtype=torch.bool))

        def forward(self, x):
            self.seen |= (x > 0).any(0)
            return self.l(x)

    m = Seen()
    step = fnlit.train_step(m, lambda model, x: model(x).sum())
    x = torch.tensor([[1.0, -1.0, -1.0]])
    for run in (step, fnlit.compile(step, mode="eager")):
        s0 = fnlit.TrainState.create(m, fnlit.optim.sgd(0.1), seed=0)
        s1, _ = run(s0, x)
        assert s0.buffers["seen"].tolist() == [False, False, False]
        assert s1.buffers["seen"].tolist() == [True, False, False]


@pytest.mark.parametrize("norm", ["spectral_norm", "weight_norm", "prune"])
def test_apply_leaves_the_weight_an_older_norm_hook_computes_as_the_module_had_it(norm):
    # Their forward pre-hook sets module.weight (a plain attribute) from the params swapped in: it stayed after the
    # call, holding the state's tensors and graph (copy.deepcopy(model) then failed). torch.nn.utils.prune's hook
    # sets weight = weight_orig * weight_mask the same way.
    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
        if norm == "prune":
            torch.nn.utils.prune.l1_unstructured(m[0], "weight", amount=0.5)
            return m
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # weight_norm is deprecated for the parametrization
            getattr(torch.nn.utils, norm)(m[0])
        return m

    model, reference = build(), build()
    own = model[0].weight
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    _, grads = fnlit.value_and_grad(lambda p: F.mse_loss(fnlit.apply(model, p, state.buffers, x)[0], y))(state.params)
    F.mse_loss(reference(x), y).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad)
    state, _ = fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]))(state, (x, y))
    assert model[0].weight is own
    if norm == "spectral_norm":  # (weight_norm's and prune's weight carries a graph from the start: deepcopy refuses it)
        copy.deepcopy(model)


def test_apply_leaves_an_rnn_holding_its_own_weights():
    # An RNN's forward refreshes its _flat_weights list from the tensors swapped in: the module kept holding the
    # state's tensors (and their gradients) after the call.
    torch.manual_seed(0)
    model = nn.LSTM(3, 4, batch_first=True)
    reference = copy.deepcopy(model)
    own = list(model._flat_weights)
    x, y = torch.randn(4, 5, 3), torch.randn(4, 5, 4)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    step = fnlit.accumulate(fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0])[0], b[1])), 2)
    state, _ = step(state, (x, y))
    assert len(model._flat_weights) == len(own) and all(a is b for a, b in zip(model._flat_weights, own))
    assert all(w.grad is None for w in model._flat_weights)
    for half in (slice(0, 2), slice(2, 4)):  # the reference: the same two micro-batches, then one SGD step
        (F.mse_loss(reference(x[half])[0], y[half]) / 2).backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach())


def test_reentrant_checkpointing_is_refused_with_the_fix():
    # PyTorch's own error advised calling .backward() without `inputs`, which a value_and_grad cannot do.
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.block, self.head = nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(checkpoint(self.block, self.pre(x), use_reentrant=True))

    model = Checkpointed()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    with pytest.raises(RuntimeError, match=r"checkpoint with use_reentrant=True.*Pass use_reentrant=False"):
        fnlit.value_and_grad(lambda p: F.mse_loss(fnlit.apply(model, p, state.buffers, x)[0], y))(state.params)
    step = fnlit.accumulate(fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1])), 2)
    with pytest.raises(RuntimeError, match=r"checkpoint with use_reentrant=True.*Pass use_reentrant=False"):
        step(state, (x, y))


def test_indexing_or_reading_the_bound_model_says_what_it_supports():
    # It said "'_BoundModel' object is not subscriptable" (or has no attribute), naming a class the user never saw.
    model = nn.Sequential(nn.Linear(3, 2))
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    b = (torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(TypeError, match=r"bound to the state's params.*can only be called.*model\[0\] is not supported.*fnlit\.apply"):
        fnlit.train_step(model, lambda m, b: F.mse_loss(m[0](b[0]), b[1]))(state, b)
    with pytest.raises(AttributeError, match=r"model\.head is not supported.*fnlit\.apply"):
        fnlit.eval_step(model, lambda m, b: {"mse": F.mse_loss(m.head(b[0]), b[1])})(state, b)
    state, metrics = fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]))(state, b)  # calling it works
    assert int(state.step) == 1


def test_python_numbers_in_aux_cross_the_torch_func_transforms():
    # A loss function may return plain numbers among its metrics; torch.func's aux and vmap's outputs take tensors
    # only, so they go around the transforms: compiled, ensembled and per example they stay those numbers.
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    b = (torch.randn(8, 8), torch.randint(0, 3, (8,)))

    def loss_fn(m, b):
        loss = F.cross_entropy(m(b[0]), b[1])
        return loss, {"temperature": 0.5, "n": b[0].shape[0], "double": loss * 2}

    step = fnlit.train_step(model, loss_fn)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    ref = F.cross_entropy(model(b[0]), b[1]).detach()  # plain torch
    _, eager = step(state, b)
    _, compiled = fnlit.compile(step, mode="eager")(state, b)
    for metrics in (eager, compiled):
        assert metrics["temperature"] == 0.5 and type(metrics["temperature"]) is float
        assert metrics["n"] == 8 and type(metrics["n"]) is int
        torch.testing.assert_close(metrics["loss"], ref)
        torch.testing.assert_close(metrics["double"], ref * 2)

    states = fnlit.stack_states([state, state])
    _, ens = fnlit.ensemble(step, 2)(states, b)
    assert ens["temperature"] == 0.5 and type(ens["temperature"]) is float and ens["n"] == 8
    torch.testing.assert_close(ens["loss"], torch.stack([ref, ref]))
    torch.testing.assert_close(ens["double"], torch.stack([ref, ref]) * 2)

    params = {k: v.detach() for k, v in model.named_parameters()}

    def example_loss(p, ex):
        loss = F.cross_entropy(torch.func.functional_call(model, p, (ex[0][None],)), ex[1][None])
        return loss, {"t": 0.25, "l": loss}

    (losses, aux), _ = fnlit.per_example_grads(example_loss, params, b, has_aux=True)
    each = F.cross_entropy(model(b[0]), b[1], reduction="none").detach()
    assert aux["t"] == 0.25 and type(aux["t"]) is float
    torch.testing.assert_close(losses, each)
    torch.testing.assert_close(aux["l"], each)


def test_the_commonest_slips_with_apply_and_value_and_grad_name_the_fix():
    # A newcomer's (loss, aux) without has_aux=True, and apply without state.buffers, failed with "got tuple" and a
    # bare AttributeError deep inside apply ('Tensor' object has no attribute 'keys').
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))

    def loss_fn(params):
        logits, buffers = fnlit.apply(model, params, state.buffers, x)
        return torch.nn.functional.cross_entropy(logits, y), buffers

    with pytest.raises(TypeError, match=r"got tuple \(a tuple of 2\): a function returning \(loss, aux\) needs has_aux=True"):
        fnlit.value_and_grad(loss_fn)(state.params)
    with pytest.raises(TypeError, match=r"expected buffers to be a dict \(state.buffers\), got Tensor"):
        fnlit.apply(model, state.params, x)


def test_apply_in_two_threads_with_other_modes_keeps_each_forwards_mode():
    # apply switched the module's training mode outside the lock its forward takes: a thread's eval-mode apply
    # switched a training forward running in another thread (and the reverse), and a thread could restore the
    # other's temporary mode, leaving the module in eval mode for good. Reference: each call alone sees its mode.
    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            seen = self.training
            for _ in range(20):  # a forward long enough for the other thread to run meanwhile
                x = self.lin(x)
            return x, (seen, self.training)

    model = Probe()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    x, wrong = torch.randn(2, 4), {True: 0, False: 0}

    def run(train):
        for _ in range(500):
            (_, seen), _ = fnlit.apply(model, state.params, state.buffers, x, train=train)
            wrong[train] += seen != (train, train)

    run_threads(run, [(True,), (False,)])
    assert wrong == {True: 0, False: 0} and model.training and model.lin.training


def test_a_lazy_module_not_yet_materialised_is_refused_and_left_lazy():
    # apply on a fresh nn.LazyLinear (its twin materialised, the state built from that) swapped the state's tensors in:
    # the lazy forward pre-hook then saw nothing to materialise, removed itself and made the module a plain Linear
    # holding an UninitializedParameter -- broken for good. TrainState.create failed inside torch ("Can't access the
    # shape of an uninitialized parameter"). Reference: plain PyTorch leaves a lazy module lazy until its own forward.
    net = lambda: nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 2))  # noqa: E731
    twin = net()
    twin(torch.randn(1, 4))
    state = fnlit.TrainState.create(twin, fnlit.optim.sgd(0.1), seed=0)
    lazy = net()
    with pytest.raises(ValueError, match=r"fnlit.apply got a module with an uninitialised lazy tensor, '0.weight' of a "
                                         r"LazyLinear.*run one forward of the module on an example batch"):
        fnlit.apply(lazy, state.params, state.buffers, torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"TrainState.create got a module with an uninitialised lazy tensor, '0.weight'"):
        fnlit.TrainState.create(net(), fnlit.optim.sgd(0.1), seed=0)
    assert type(lazy[0]) is nn.LazyLinear and lazy(torch.randn(2, 4)).shape == (2, 2)  # still lazy, and materialises


def test_the_bound_model_passes_forward_keywords_named_like_applys_arguments_or_names_the_clash():
    # A loss calling model(x, params=p) got "apply() got multiple values for argument 'params'" (module, params and
    # buffers were apply's keywords too), and model(x, train=False) "got multiple values for keyword argument 'train'":
    # neither from a call the user wrote. Reference: the plain module takes them as the forward's own keywords.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def forward(self, x, module=1.0, params=1.0, buffers=1.0, train=1.0):
            return self.lin(x) * module * params * buffers * train

    model = Net()
    x = torch.randn(4, 2)
    want = model(x, module=2.0, params=3.0, buffers=5.0)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    got = fnlit.eval_step(model, lambda m, b: {"out": m(b, module=2.0, params=3.0, buffers=5.0).sum()})(state, x)["out"]
    torch.testing.assert_close(got, want.sum())
    with pytest.raises(TypeError, match=r"model\(\.\.\., train=\.\.\.\): .* runs the Net through fnlit.apply, which "
                                        r"takes train as its own keyword.*Pass the forward's train positionally"):
        fnlit.eval_step(model, lambda m, b: {"out": m(b, train=0.5).sum()})(state, x)

    # mutable= still reaches apply (a forward whose BatchNorm statistics are not kept: a consistency term on unlabelled
    # data). Reference: plain torch in train mode on the labelled batch alone gives the same running mean.
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    bn_state = fnlit.TrainState.create(bn, fnlit.optim.sgd(0.1), seed=0)
    xs, us = torch.randn(8, 4), 10 * torch.randn(8, 4)
    step = fnlit.train_step(bn, lambda m, b: m(b[0]).pow(2).mean() + m(b[1], mutable=False).pow(2).mean())
    new, _ = step(bn_state, (xs, us))
    ref = copy.deepcopy(bn).train()
    ref(xs)
    torch.testing.assert_close(new.buffers["1.running_mean"], ref[1].running_mean)


def test_export_during_a_backward_of_another_module_calls_the_modules_own_train():
    # export's eval mode went around a module's train() override (a detection model keeping its BatchNorms frozen)
    # whenever any backward in flight had set training flags, even one of an unrelated module. Reference: the export
    # of the same module with no backward in flight, which calls it (torch's module.eval()).
    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn, self.calls = nn.Linear(2, 2), nn.BatchNorm1d(2), 0

        def train(self, mode=True):
            self.calls += 1
            return super().train(mode)

        def forward(self, x):
            return self.bn(self.lin(x))

    other, frozen = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)), Frozen()
    s_other = fnlit.TrainState.create(other, fnlit.optim.sgd(0.1), seed=0)
    s_frozen = fnlit.TrainState.create(frozen, fnlit.optim.sgd(0.1), seed=0)
    fnlit.export(s_frozen, frozen)
    alone = frozen.calls
    x, y = torch.randn(3, 2), torch.tensor([0, 1, 0])
    _, during = _paused_in_backward(other, s_other.params, s_other.buffers, x, y,
                                    lambda: (fnlit.export(s_frozen, frozen), frozen.calls)[1], train=False)
    assert alone == 1 and during == 2 and not frozen.training


def test_value_and_grad_stays_connected_to_another_argument_that_requires_grad_as_torch_func():
    # A learnable loss weight passed as a non-differentiated argument (or keyword): the value, gradients and aux came
    # back detached from it, so an outer torch.autograd.grad got 1.0 for 72.6 (hypergradients, meta-learning).
    # Reference: torch.func.grad_and_value, which keeps them connected.
    p = torch.tensor([1.0, 2.0, 3.0])

    def want_and_got(call):
        lam = torch.tensor(0.3, requires_grad=True)
        (loss, aux), g = call(lam)
        return torch.autograd.grad(loss + (g**2).sum() + aux + lam, lam)[0]

    def f(p, lam):
        return lam * (p**2).sum() + p.sum(), lam * 2

    ref = want_and_got(lambda lam: tuple(reversed(torch.func.grad_and_value(f, has_aux=True)(p, lam))))
    torch.testing.assert_close(ref, torch.tensor(74.6))  # by hand: 14 + 57.6 + 2 + 1
    torch.testing.assert_close(want_and_got(lambda lam: fnlit.value_and_grad(f, has_aux=True)(p, lam)), ref)
    by_keyword = lambda lam: fnlit.value_and_grad(lambda p, lam: f(p, lam), has_aux=True)(p, lam=lam)  # noqa: E731
    torch.testing.assert_close(want_and_got(by_keyword), ref)


def test_a_nested_value_and_grad_whose_loss_reads_none_of_its_arguments_raises_as_at_top_level():
    # In a gradient penalty whose inner loss read a captured tensor instead of its argument, the inner call returned
    # zero gradients silently (the documented error holds at top level and under torch.func transforms).
    w, x_hat = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.5, 0.5])

    def critic(w, x):
        return torch.tanh(w * x).sum()

    def loss(w):
        _, gx = fnlit.value_and_grad(lambda x: critic(w, x_hat))(x_hat.clone())  # planted bug: reads x_hat
        return critic(w, x_hat) + (gx.norm() - 1) ** 2

    with pytest.raises(RuntimeError, match=r"the loss does not depend on the arguments it differentiates"):
        fnlit.value_and_grad(loss)(w)
    with pytest.raises(RuntimeError, match=r"the loss does not depend on the arguments it differentiates"):
        fnlit.value_and_grad(lambda x: critic(w, x_hat))(x_hat.clone())  # the same call at top level
