"""fnlit.donating: in-place updates confined to the donated state, and a donated state never silently reused.

References are the same step run without donation (which never writes its input) and plain torch.
"""

import copy
import io
import pickle
import sys
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_trees_equal, batch, clone_tree, grads_of, hand_step, mlp

import fnlit
from fnlit.data import ArrayLoader
from fnlit.optim._base import donated_update, functional_path, use_functional
from fnlit.transforms.donate import consume


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mlp()


def _inside_another_thread(context):
    """Runs ``context`` in a second thread and holds it open until the returned release() is called."""
    entered, leave = threading.Event(), threading.Event()

    def hold():
        with context():
            entered.set()
            leave.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    assert entered.wait(30)

    def release():
        leave.set()
        thread.join()

    return release


def test_a_donating_thread_leaves_pure_steps_in_other_threads_pure(model):
    release = _inside_another_thread(donated_update)  # as a donating step running in another thread
    try:
        state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0)
        before = clone_tree(state)
        hand_step(model)(state, batch())
        assert_trees_equal(state, before)  # a pure step never writes its input
    finally:
        release()


def test_functional_path_in_one_thread_does_not_switch_other_threads():
    release = _inside_another_thread(functional_path)
    try:
        assert not use_functional([torch.ones(2)])
        with functional_path():
            assert use_functional([torch.ones(2)])
    finally:
        release()


# -- a step that raises ------------------------------------------------------------------------------------
def _raising_after_update(model, exc=RuntimeError):
    inner = hand_step(model)

    def step(state, batch):
        new, metrics = inner(state, batch)
        raise exc("the metrics failed")  # after apply_gradients updated the donated tensors

    return step


def test_a_step_raising_after_the_update_poisons_the_donated_state(model):
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0)
    weight = state.params["0.weight"]
    before = weight.clone()
    with pytest.raises(RuntimeError, match="the metrics failed"):
        fnlit.donating(_raising_after_update(model))(state, batch())
    assert not torch.equal(weight, before)  # it was written in place: neither the old nor the new state
    with pytest.raises(RuntimeError, match=r"(?s)raised an exception after updating the state's tensors in place.*neither the old state nor the new one"):
        state.params["0.weight"]


def test_a_step_raising_before_the_update_leaves_the_donated_state_usable(model):
    def step(state, batch):
        raise RuntimeError("the data is broken")

    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0)
    before = clone_tree(state)
    with pytest.raises(RuntimeError, match="the data is broken"):
        fnlit.donating(step)(state, batch())
    assert_trees_equal(state, before)
    got, _ = fnlit.donating(hand_step(model))(state, batch())  # still usable
    want, _ = hand_step(model)(before, batch())
    assert_trees_equal(got, want)


def test_fit_interrupted_in_a_donated_step_saves_no_corrupt_state_and_reraises(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    inner = fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]))
    calls = [0]

    def step(state, batch):
        new, metrics = inner(state, batch)
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt  # a second Ctrl-C, arriving after the update
        return new, metrics

    g = torch.Generator().manual_seed(1)
    data = ArrayLoader(torch.randn(48, 8, generator=g), torch.randn(48, 1, generator=g), batch_size=8, shuffle=True)
    fresh = lambda: fnlit.TrainState.create(model, fnlit.optim.sgd(0.1, momentum=0.9), seed=0)  # noqa: E731
    with pytest.raises(KeyboardInterrupt) as info:
        fnlit.fit(fnlit.donating(step), fresh(), data, max_epochs=1, progress=False,
                  checkpoint=fnlit.Checkpointer(tmp_path, every_n_steps=2))
    assert [p.name for p in tmp_path.glob("step=*")] == ["step=00000002.ckpt"]  # nothing written on exit
    if sys.version_info >= (3, 11):
        assert "step=00000002.ckpt, is the latest good state" in "".join(info.value.__notes__)
    calls[0] = -100
    resumed = fnlit.fit(fnlit.donating(step), fresh(), data, max_epochs=1, progress=False,
                        checkpoint=fnlit.Checkpointer(tmp_path), ckpt_path="last")
    want = fnlit.fit(inner, fresh(), data, max_epochs=1, progress=False)  # uninterrupted, undonated
    fields = lambda s: (s.step, s.params, s.opt_state, s.rng)  # noqa: E731
    assert_trees_equal(fields(resumed), fields(want))


# -- donating is the outermost transform --------------------------------------------------------------------
@pytest.mark.parametrize("wrap", [lambda s: fnlit.accumulate(s, 2), lambda s: fnlit.amp(s, dtype=torch.bfloat16)],
                         ids=["accumulate", "amp"])
def test_donating_inside_another_transform_raises_and_leaves_the_state_intact(model, wrap):
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0)
    before = clone_tree(state)
    with pytest.raises(ValueError, match=r"outermost.*fnlit.donating\(fnlit.accumulate\(step, k\)\)"):
        wrap(fnlit.donating(hand_step(model)))(state, batch())
    assert_trees_equal(state, before)


@pytest.mark.parametrize("wrap", [lambda s: fnlit.accumulate(s, 2), lambda s: fnlit.amp(s, dtype=torch.bfloat16)],
                         ids=["accumulate", "amp"])
def test_donating_outside_another_transform_is_bitwise_and_poisons(model, wrap):
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0)
    want, m_want = wrap(hand_step(model))(state, batch())
    donated = clone_tree(state)
    got, m_got = fnlit.donating(wrap(hand_step(model)))(donated, batch())
    assert_trees_equal(got, want)
    assert torch.equal(m_got["loss"], m_want["loss"])
    with pytest.raises(RuntimeError, match=r"(?s)donated to a step \(fnlit.donating\).*or call the step without fnlit.donating"):
        donated.params["0.weight"]


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_donating_a_chain_whose_optimizer_is_not_last_is_bitwise_the_pure_step(model, opt):
    # The optimizer's update() is its step's new params minus the old: run in place, both were the same tensors
    # and the update came out zero (with masked(set_to_zero()) after it, a "frozen" layer trained). References:
    # the undonated step, and by hand for SGD (a frozen layer does not move; the rest moves by -lr * g * 0.5).
    frozen = lambda name: name.startswith("0.")  # noqa: E731
    first = fnlit.optim.sgd(0.1) if opt == "sgd" else fnlit.optim.adamw(0.1)
    tx = fnlit.optim.chain(first, fnlit.optim.scale(0.5), fnlit.optim.masked(fnlit.optim.set_to_zero(), frozen))
    state = fnlit.TrainState.create(model, tx, seed=0)
    want, _ = hand_step(model)(state, batch())
    got, _ = fnlit.donating(hand_step(model))(clone_tree(state), batch())
    assert_trees_equal(got, want)
    assert torch.equal(got.params["0.weight"], state.params["0.weight"])
    if opt == "sgd":
        (_, _), grads = grads_of(model, state, batch())
        torch.testing.assert_close(got.params["3.weight"], state.params["3.weight"] - 0.05 * grads["3.weight"])


def test_a_donated_step_whose_gradients_the_optimizer_refuses_leaves_the_state_usable(model):
    # float64 gradients for float32 params: the fused kernel refused them after the params had been recorded as
    # updated in place, so the intact state was poisoned. Reference: a copy of the state taken before.
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0)
    before = clone_tree(state)

    def step(state, b):
        (loss, _), grads = grads_of(model, state, b)
        return state.apply_gradients({k: g.double() for k, g in grads.items()}), {"loss": loss}

    with pytest.raises(ValueError, match="gradients of the params' dtypes"):
        fnlit.donating(step)(state, batch())
    assert_trees_equal(state, before)  # readable: not poisoned, and unchanged


# -- the returned state must not alias what was updated in place --------------------------------------------
_KEEPS = {
    "the tensor": lambda w: w,
    "a detached alias": lambda w: w.detach(),
    "a view": lambda w: w[1:],
}


def _keeping_prev_weight(model, keep):
    """A Lookahead-style step: keeps the weights from before the update in a buffer."""

    def step(state, batch):
        (loss, _), grads = grads_of(model, state, batch)
        prev = keep(state.params["0.weight"])
        return state.apply_gradients(grads, buffers={**state.buffers, "prev": prev}), {"loss": loss}

    return step


@pytest.mark.parametrize("kind", list(_KEEPS))
def test_donated_step_keeping_an_updated_input_tensor_raises(model, kind):
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1, momentum=0.9), seed=0)
    want, _ = _keeping_prev_weight(model, _KEEPS[kind])(state, batch())  # undonated: the old weights
    assert torch.equal(want.buffers["prev"], _KEEPS[kind](model[0].weight.detach()))
    with pytest.raises(ValueError, match=r"(?s)returned state's buffers\['prev'\] is a tensor that shares memory.*updated in place.*clone\(\)"):
        fnlit.donating(_keeping_prev_weight(model, _KEEPS[kind]))(clone_tree(state), batch())


def test_donated_step_rebuilding_its_params_dict_is_checked_too(model):
    # The state's params are not the optimizer's own dict: each updated tensor may appear once, and only once.
    def rebuilding(keep):
        inner = _keeping_prev_weight(model, keep)

        def step(state, batch):
            new, metrics = inner(state, batch)
            return new.replace(params=dict(new.params)), metrics

        return step

    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1, momentum=0.9), seed=0)
    want, _ = rebuilding(torch.clone)(state, batch())
    got, _ = fnlit.donating(rebuilding(torch.clone))(clone_tree(state), batch())
    assert_trees_equal(got, want)
    with pytest.raises(ValueError, match=r"returned state's buffers\['prev'\] is a tensor that shares memory"):
        fnlit.donating(rebuilding(lambda w: w))(clone_tree(state), batch())


def test_donated_step_keeping_a_copy_is_bitwise_the_undonated_step(model):
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1, momentum=0.9), seed=0)
    step = _keeping_prev_weight(model, lambda w: w.clone())
    want, _ = step(state, batch())
    got, _ = fnlit.donating(step)(clone_tree(state), batch())
    assert_trees_equal(got, want)


def test_donated_step_returning_a_view_of_an_updated_tensor_as_a_metric_raises(model):
    inner = hand_step(model)

    def step(state, batch):
        w00 = state.params["0.weight"][0, 0]  # a view: under donation it would show the updated value
        new, metrics = inner(state, batch)
        return new, {**metrics, "w00": w00}

    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0)
    with pytest.raises(ValueError, match=r"returned metrics\['w00'\] is a tensor that shares memory"):
        fnlit.donating(step)(state, batch())
    with pytest.raises(RuntimeError, match="raised an exception after updating"):
        state.params["0.weight"]


def test_a_metric_taken_from_the_returned_state_is_refused_with_how_to_copy_it_and_the_copy_matches(model):
    # A learnable temperature logged from the new state: the next donated step would change it in place. The
    # message says so (it claimed the undonated step would log the old value, wrong for this step), and the
    # copy it recommends logs what the undonated step logs (the reference).
    inner = hand_step(model)

    def step(state, batch, copy=False):
        new, metrics = inner(state, batch)
        b = new.params["0.bias"]
        return new, {**metrics, "b": b.clone() if copy else b}

    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0)
    with pytest.raises(ValueError, match=r"(?s)metrics\['b'\].*taken from the returned state.*next donated step would "
                       r"change it in place.*new\.params\['weight'\]\.clone\(\)"):
        fnlit.donating(step)(clone_tree(state), batch())
    want = step(state, batch())[1]["b"]
    got = fnlit.donating(lambda s, b: step(s, b, copy=True))(clone_tree(state), batch())[1]["b"]
    assert torch.equal(got, want)


# -- reading the input state after apply_gradients ----------------------------------------------------------
def _logging_update_size(model):
    def step(state, batch):
        (loss, _), grads = grads_of(model, state, batch)
        new = state.apply_gradients(grads)
        return new, {"loss": loss, "update": (new.params["0.weight"] - state.params["0.weight"]).norm()}

    return step


def test_consume_poisons_a_state_whose_update_was_in_place(model):
    # The hook TrainState.apply_update calls right after the optimizer step.
    tx = fnlit.optim.sgd(0.1, momentum=0.9)
    state = fnlit.TrainState.create(model, tx, seed=0)
    grads = {k: torch.ones_like(v) for k, v in state.params.items()}
    new_params, _ = fnlit.optim.step(tx, grads, state.opt_state, state.params)  # not donated: a pure update
    consume(state, new_params)
    assert torch.equal(state.params["0.weight"], model[0].weight)
    with donated_update():
        new_params, _ = fnlit.optim.step(tx, grads, state.opt_state, state.params)  # in place
        consume(state, new_params)
    with pytest.raises(RuntimeError, match="read after its apply_gradients updated it in place"):
        state.params["0.weight"]


def test_a_donated_step_reading_its_input_state_after_apply_gradients_raises(model):
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1, momentum=0.9), seed=0)
    _, metrics = _logging_update_size(model)(state, batch())
    assert metrics["update"] > 0  # undonated, the true size of the update
    with pytest.raises(RuntimeError, match="read after its apply_gradients updated it in place"):
        fnlit.donating(_logging_update_size(model))(clone_tree(state), batch())  # instead of a silent 0


@pytest.mark.parametrize("op", [
    lambda s: torch.add(s.step, 1),
    lambda s: F.relu(s.rng),
    lambda s: torch.cat([torch.zeros(1), s.step]),
    lambda s: torch.zeros(1) * s.step,
])
def test_a_torch_op_on_a_donated_field_raises_the_donation_error_without_a_deprecation_warning(model, op):
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    donated = clone_tree(state)
    fnlit.donating(hand_step(model))(donated, batch())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match=r"donated to a step \(fnlit.donating\)"):
            op(donated)
    # torch warns of (and will refuse) a __torch_function__ that is not a classmethod
    assert not [str(w.message) for w in caught if "__torch_function__" in str(w.message)]


@pytest.mark.parametrize("save", [
    lambda s: torch.save(s.params, io.BytesIO()),
    lambda s: torch.save({"model": s.params, "opt": s.opt_state}, io.BytesIO()),
    lambda s: pickle.dumps(s.opt_state),
    lambda s: copy.copy(s.buffers),
])
def test_saving_or_pickling_a_donated_field_raises_instead_of_writing_a_file_without_weights(model, save):
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-3), seed=0)
    donated = clone_tree(state)
    new, _ = fnlit.donating(hand_step(model))(donated, batch())
    with pytest.raises(RuntimeError, match=r"donated to a step \(fnlit.donating\)"):
        save(donated)
    buffer = io.BytesIO()
    torch.save(new.params, buffer)  # the returned state saves as usual
    buffer.seek(0)
    assert_trees_equal(torch.load(buffer), new.params)
