"""Small models, data and steps shared by the tests."""

import torch
import torch.nn.functional as F
from torch import nn

import fnlit


def mlp(d_in: int = 8, hidden: int = 16, d_out: int = 4, dropout: float = 0.0, bn: bool = False) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d_in, hidden)]
    if bn:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, d_out)]
    return nn.Sequential(*layers)


def batch(n: int = 16, d_in: int = 8, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g)


def hand_step(model: nn.Module):
    """DESIGN.md's hand-written step: the way users write their own."""

    def train_step(state, batch):
        x, y = batch

        def loss_fn(params):
            logits, buffers = fnlit.apply(model, params, state.buffers, x, rng=state.rng)
            return F.cross_entropy(logits, y), buffers

        (loss, buffers), grads = fnlit.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads, buffers=buffers), {"loss": loss}

    return train_step


def grads_of(model, state, batch):
    """``(loss, buffers), grads``: a hand-written step's first half (cross-entropy, no dropout key)."""
    x, y = batch

    def loss_fn(params):
        logits, buffers = fnlit.apply(model, params, state.buffers, x)
        return F.cross_entropy(logits, y), buffers

    return fnlit.value_and_grad(loss_fn, has_aux=True)(state.params)


def clone_tree(tree):
    return fnlit.tree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


def assert_trees_equal(a, b):
    la, lb = fnlit.tree.tree_leaves(a), fnlit.tree.tree_leaves(b)
    assert fnlit.tree.tree_structure(a) == fnlit.tree.tree_structure(b)
    for x, y in zip(la, lb):
        assert torch.equal(x, y)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    paths, la, _ = fnlit.tree.tree_flatten_with_path(a)
    lb = fnlit.tree.tree_leaves(b)
    assert len(la) == len(lb)
    for p, x, y in zip(paths, la, lb):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{p}: {m}")


def assert_limit_errors(results: dict, rank: int, train: bool = False) -> None:
    """The validation workers' cases of a float limit that fails on rank 1 only (0.5 of its 1 batch, or of data
    without a len()), of limit_val_batches or limit_train_batches, or of empty training data on rank 1: that rank
    says why, as one process would; rank 0 says which rank and why (it waited in a collective that rank 1 never
    reached, or, with limit_train_batches=0, returned). The training cases where ``train``."""
    for name, who, option, why in [
        ("limit 0.5, 3 and 1 batches", "evaluate", "limit_batches", "a fraction of that rank's batches that leaves less"),
        ("limit 0.5, no len() on rank 1", "evaluate", "limit_batches", "a fraction of the epoch, but that rank's data has no len()"),
        ("fit, limit_val_batches 0.5, 3 and 1 batches", "fit", "limit_val_batches", "a fraction of that rank's batches"),
    ] + [
        ("fit, limit_train_batches 0, limit_val_batches 0.5, 3 and 1 batches", "fit", "limit_val_batches",
         "a fraction of that rank's batches"),
        ("fit, limit_train_batches 0.5, 3 and 1 batches", "fit", "limit_train_batches", "a fraction of that rank's batches"),
        ("fit, limit_train_batches 0.5, no len() on rank 1", "fit", "limit_train_batches",
         "a fraction of the epoch, but that rank's data has no len()"),
    ] * train:
        if rank == 0:
            assert results[name].startswith(f"{who} got {option}=0.5, which rank 1 cannot apply: it is {why}"), results[name]
        else:
            assert results[name].startswith(f"{who} got {option}=0.5, ") and "cannot apply" not in results[name], name
            assert ("0.5 * 1 batches < 1" if "3 and 1" in name else "the data has no len()") in results[name], name
    if not train:
        return
    # empty training data on rank 1 (fit's own check): rank 0 names that rank
    empty = results["fit, empty training data on rank 1"]
    assert empty.startswith("fit: rank 1 got empty training data" if rank == 0 else "fit got empty training data"), empty


def run_threads(target, args_list, timeout: float = 120) -> None:
    """Runs ``target(*args)`` for each args in a thread of its own, the interpreter switching threads as often as
    it can (interleavings a normal run rarely shows), and waits for them (bounded)."""
    import sys
    import threading

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=target, args=args) for args in args_list]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
    finally:
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in threads), f"a thread still runs after {timeout} s (a deadlock?)"
