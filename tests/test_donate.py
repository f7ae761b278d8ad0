"""fnlit.donating: in-place updates confined to the donated state, and a donated state never silently reused.

References are the same step run without donation (which never writes its input) and plain torch.
"""

import threading

import pytest
import torch
from helpers import assert_trees_equal, batch, clone_tree, hand_step, mlp

import fnlit
from fnlit.optim._base import donated_update, functional_path, use_functional


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
