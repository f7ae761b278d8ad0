"""Ensembles, sweeps and per-example gradients: one step, vectorized with ``torch.func.vmap``.

Because a step is a pure function of an explicit state, ``n`` independent models are one state whose
leaves have a leading dimension ``n`` (:func:`stack_states`, :func:`ensemble_states`), and
:func:`ensemble` turns a step for one model into a step for all of them. Members can differ in their
initialisation, their random key and their optimizer hyperparameters (learning rate and weight decay
are tensors in ``opt_state``), so a seed or hyperparameter sweep is one run.

Randomness: inside ``vmap`` PyTorch's generators cannot be seeded per member. The ensemble step folds
all members' keys into one seed *outside* vmap and runs the members with ``randomness="different"``:
each member gets its own dropout mask and the step stays a pure function of the stacked state. The
masks are not the ones the member would draw when trained alone, so only models without randomness
equal their solo runs to rounding (tests compare those); under amp, to the amp dtype's precision (see :func:`ensemble`).
(That is for the members' keys: ``state.rng`` and keys made from it. A constant key the step passes to
:func:`fnlit.apply`, which the vmap does not batch, seeds that forward from the same seed it would eagerly;
with the default ``randomness="different"`` member 0 draws the eager masks and the others their own, with
``randomness="same"`` every member draws the eager masks.)

Example:
    >>> import torch, torch.nn.functional as F, fnlit
    >>> from fnlit.ensemble import ensemble, ensemble_states, unstack_state
    >>> model = torch.nn.Linear(4, 1)
    >>> step = fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]))
    >>> states = ensemble_states(model, fnlit.optim.sgd(0.1), seeds=[0, 1, 2], learning_rate=[0.1, 0.01, 0.001])
    >>> states, metrics = ensemble(step, 3)(states, (torch.randn(8, 4), torch.randn(8, 1)))
    >>> metrics["loss"].shape, int(unstack_state(states, 2).step)
    (torch.Size([3]), 1)
"""

from __future__ import annotations

import copy
import itertools
import math
import operator
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, Generic, TypeVar

import torch
import torch.utils._pytree as torch_pytree
from torch import nn

from . import random as _random
from . import tree as _tree
from ._checkpoint_io import _dtensor_class, is_sharded
from .tree import is_real
from ._types import Batch, Metrics, Params
from .data import batch_size_of
from .functional import _NumbersAside, value_and_grad
from .optim import GradientTransformation
from .transforms._frame import _PER_EXAMPLE_FP16, _PER_EXAMPLE_SHARD, WITH_ENSEMBLE, collective_of
from .transforms._frame import current as _current_frame
from .transforms._frame import require_state, require_step
from .optim import step as _opt_step
from .optim._transforms import hyper_value
from .state import TrainState

_Out = TypeVar("_Out", bound="tuple[TrainState, Metrics] | Metrics")
# What the wrapped step returns, and so the ensemble step: (state, metrics) for a training step, metrics for an
# evaluation step (fnlit.evaluate's and fit's eval_step take an ensemble of one).

__all__ = ["EnsembleStep", "ensemble", "ensemble_states", "per_example_grads", "stack_states", "unstack_state"]

_HYPER = ("learning_rate", "weight_decay")


# ---------------------------------------------------------------------------------- stacking
def stack_states(states: Sequence[TrainState]) -> TrainState:
    """Stacks ``n`` states of the same model and optimizer into one ensemble state (leaves ``(n, ...)``).

    Args:
        states: TrainStates with the same structure, shapes, dtypes and the same ``tx`` object.

    Returns:
        A TrainState whose every tensor has a leading dimension ``len(states)``.

    Raises:
        ValueError: on an empty list, different optimizers, the first path where two states differ (a sharded
            tensor where another state holds a plain one included), or sharded states (:func:`fnlit.shard_state`:
            an ensemble cannot be sharded; stack the full states, ``fnlit.unshard_state(s)`` of each).

    Example:
        >>> import torch, fnlit
        >>> tx = fnlit.optim.sgd(0.1)
        >>> states = [fnlit.TrainState.create(torch.nn.Linear(2, 1), tx, seed=i) for i in range(3)]
        >>> stack_states(states).params["weight"].shape
        torch.Size([3, 1, 2])
    """
    states = list(states)
    if not states:
        raise ValueError("stack_states expected at least one TrainState, got an empty sequence.")
    first = states[0]
    for i, s in enumerate(states):
        if not isinstance(s, TrainState):
            raise TypeError(f"stack_states expected TrainStates, got {type(s).__name__} at position {i} instead.")
        if s.tx is not first.tx:
            raise ValueError(
                f"stack_states expected every state to share one optimizer object, but states[{i}].tx is not "
                "states[0].tx. Create all members with the same tx; per-member learning rates and weight decay "
                "live in opt_state (fnlit.ensemble_states(..., learning_rate=[...]) sets them)."
            )
    states = [_numbers_as_tensors(s) for s in states]
    first = states[0]
    for i, s in enumerate(states):
        where = _tree.first_mismatch(first, s)
        if where is None:
            where = next((f"at {p}: dtype {a.dtype} vs {b.dtype}" for p, a, b in _pairs(first, s) if a.dtype != b.dtype), None)
        if where is None and (dtensor := _dtensor_class()) is not None:  # (the same shape: a DTensor's is the global one)
            kind = lambda t: "a sharded tensor (DTensor)" if isinstance(t, dtensor) else "a plain tensor"  # noqa: E731
            where = next((f"at {p}: {kind(a)} vs {kind(b)}" for p, a, b in _pairs(first, s) if kind(a) != kind(b)), None)
        if where is not None:
            raise ValueError(f"stack_states: states[{i}] differs from states[0] {where}. Members must be the same model.")
    if is_sharded(first):
        raise ValueError(
            "stack_states got sharded states (fnlit.shard_state): " + WITH_ENSEMBLE.format(who="fnlit.shard")
            + " Stack the full states: fnlit.unshard_state(s) of each."
        )
    return _tree.tree_map(lambda *xs: torch.stack(xs), *states)


def _numbers_as_tensors(state: TrainState, n: int | None = None) -> TrainState:
    """``state`` with the Python numbers of its hyperparameters (assigned as numbers: optax's idiom) as the tensors
    the optimizer reads them as (:func:`fnlit.optim._transforms.hyper_value`: float32, float64 for float64 params):
    0-d, or ``(n,)`` in a stacked state (the one value of every member). A 0-d tensor in a stacked state (assigned
    as ``torch.tensor(0.05)``) is one value of every member too: ``(n,)``, its dtype kept as the optimizer keeps it."""

    def one_for_all(v: Any) -> bool:
        return is_real(v) or (n is not None and isinstance(v, torch.Tensor) and v.dim() == 0)

    def as_tensors(hyper: dict[str, Any]) -> dict[str, Any] | None:
        if not any(one_for_all(v) for v in hyper.values()):
            return None
        # the optimizer's own reading of a number (checked as it checks one in a single state), one per member
        held = {k: hyper_value("fnlit.ensemble", k, v, state.device, state.params) for k, v in hyper.items() if one_for_all(v)}
        return {**hyper, **{k: v if n is None else v.expand(n).clone() for k, v in held.items()}}

    opt_state, found = _map_hyper(state.opt_state, as_tensors)
    return state.replace(opt_state=opt_state) if found else state


def _pairs(a: Any, b: Any) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    paths, la, _ = _tree.tree_flatten_with_path(a)
    return list(zip(paths, la, _tree.tree_leaves(b)))


def _size(stacked: TrainState) -> int:
    if stacked.step.dim() != 1:
        raise ValueError(
            f"expected an ensemble state (state.step of shape (n,)), got state.step of shape {tuple(stacked.step.shape)} "
            "instead. Build one with fnlit.stack_states([...]) or fnlit.ensemble_states(...)."
        )
    return stacked.step.shape[0]


def unstack_state(stacked: TrainState, i: int) -> TrainState:
    """Member ``i`` of an ensemble state, as an ordinary TrainState (its tensors are copies).

    Raises:
        IndexError: if ``i`` is not a member index; TypeError if it is not an int.

    Example:
        >>> import torch, fnlit
        >>> tx = fnlit.optim.sgd(0.1)
        >>> states = [fnlit.TrainState.create(torch.nn.Linear(2, 1), tx, seed=i) for i in range(3)]
        >>> member = unstack_state(stack_states(states), 1)
        >>> torch.equal(member.params["weight"], states[1].params["weight"]), torch.equal(member.rng, states[1].rng)
        (True, True)
    """
    n = _size(stacked)
    bool_tensor = isinstance(i, torch.Tensor) and i.dtype is torch.bool
    try:  # an int, a numpy integer, a 0-d integer tensor (losses.argmin()); not a bool (t[True] adds a dimension)
        if isinstance(i, bool) or bool_tensor:
            raise TypeError
        i = operator.index(i)
    except TypeError:
        raise TypeError(f"unstack_state expected an int member index, got {type(i).__name__} {i!r} instead.") from None
    if not -n <= i < n:
        raise IndexError(f"unstack_state got member index {i}, but the ensemble has {n} members (0..{n - 1}).")
    return _tree.tree_map(lambda t: t[i].clone() if isinstance(t, torch.Tensor) else t, stacked)  # a number: every member's


# ------------------------------------------------------------------------------ building sweeps
def _reset(sub: nn.Module) -> list[nn.Parameter]:
    """Calls ``sub.reset_parameters()`` and returns the parameters it re-initialised (as they are after it).

    A parameter counts when it was replaced by a new one, written in place (its version counter moved)
    or changed value (``p.data`` writes, which the version counter does not see).
    """
    before = [(n, p, p._version, None if p.is_meta else p.detach().clone()) for n, p in sub.named_parameters()]
    sub.reset_parameters()
    after = dict(sub.named_parameters())
    return [
        after[n]
        for n, p, version, value in before
        if n in after
        and (after[n] is not p or p._version != version or (value is not None and not torch.equal(p.detach(), value)))
    ]


def _cuda_devices(model: nn.Module | Callable[[], nn.Module]) -> list[int]:
    """The CUDA devices whose generators building ``model`` may draw from: those holding a module's tensors (its
    ``reset_parameters()`` draw there); for a function, every device once CUDA is initialised (their states live in
    host memory: cheap to save and seed), none before (saving them would initialise CUDA)."""
    if isinstance(model, nn.Module):
        return sorted({t.device.index for t in itertools.chain(model.parameters(), model.buffers()) if t.is_cuda})
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


def _init_module(model: nn.Module | Callable[[], nn.Module], seed: int) -> nn.Module:
    """A fresh model initialised from ``seed`` as after ``torch.manual_seed(seed)``; the global generators are left
    as they were.

    Seeded (and restored): the CPU generator and the CUDA generators the model may draw from (:func:`_cuda_devices`),
    not the other devices' (``torch.manual_seed`` reseeds every device's generator, which a fork of the CPU
    generator does not restore). A function that initialises CUDA itself is called again once CUDA is up: its
    first draws there came from the generators' initial state, which they are put back to.
    """
    fresh = not isinstance(model, nn.Module) and not torch.cuda.is_initialized()
    module = _seeded_build(model, seed)
    if fresh and torch.cuda.is_initialized():
        for gen in torch.cuda.default_generators:  # as lazy init left them: its seed, no draw taken
            gen.manual_seed(gen.initial_seed())
        module = _seeded_build(model, seed)
    return module


def _seeded_build(model: nn.Module | Callable[[], nn.Module], seed: int) -> nn.Module:
    """:func:`_init_module`'s build, under the generators it seeds.

    A module instance is re-initialised by the ``reset_parameters()`` of its submodules, parents first.
    A submodule is skipped when an earlier reset (a parent's ``reset_parameters()`` that resets its
    children) already re-initialised every parameter it owns (or, owning none, every parameter below
    it): resetting it again would draw its parameters twice, unlike building the model after the seed.
    A tied parameter (one object in two layers: an embedding and its output layer) is refused unless a reset of
    a module holding all its layers re-initialises it: resetting each layer cannot tell which layer's init the
    constructor kept, nor where the draws of the discarded one fall.
    """
    devices = _cuda_devices(model)
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.default_generator.manual_seed(int(seed))
        for index in devices:  # as torch.cuda.manual_seed_all does, on these devices only
            torch.cuda.default_generators[index].manual_seed(int(seed))
        if not isinstance(model, nn.Module):
            return model()
        module = copy.deepcopy(model)
        tied = _tied(module)
        covered: dict[int, nn.Parameter] = {}  # id -> parameter (held, so that no id is reused)
        for sub in module.modules():
            if not hasattr(sub, "reset_parameters"):
                continue
            own = list(sub.parameters(recurse=False)) or list(sub.parameters())
            if not (own and all(id(p) in covered for p in own)):
                reset = _reset(sub)
                for names, owners in (tied[id(p)] for p in reset if id(p) in tied):
                    if not set(owners) <= set(sub.modules()):
                        raise ValueError(_TIED.format(a=names[0], b=names[1]))
                covered.update((id(p), p) for p in reset)
            covered.update((id(p), p) for p in sub.parameters(recurse=False))
        missed = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in covered]
        if missed:
            raise ValueError(
                f"ensemble_states cannot re-initialise parameter {missed[0]!r} from a seed: its module has no "
                "reset_parameters(). Pass a function that builds the model instead, e.g. "
                "ensemble_states(lambda: Net(), tx, seeds=[...])."
            )
        return module


def _tied(module: nn.Module) -> dict[int, tuple[list[str], list[nn.Module]]]:
    """The parameters that two or more modules with a ``reset_parameters()`` hold as their own (tied weights), by id:
    their names and modules. (A module used twice is one module: its parameters are not tied; a tie with a module
    that has no reset, ``self.out_w = self.emb.weight``, is re-initialised by the one that has.)"""
    found: dict[int, tuple[list[str], list[nn.Module]]] = {}
    for prefix, sub in module.named_modules():
        if not hasattr(sub, "reset_parameters"):
            continue
        for name, p in sub.named_parameters(prefix=prefix, recurse=False):
            names, owners = found.setdefault(id(p), ([], []))
            names.append(name)
            owners.append(sub)
    return {k: v for k, v in found.items() if len(v[1]) > 1}


_TIED = (
    "ensemble_states cannot re-initialise the tied parameter {a!r} (also {b!r}) from a seed: resetting each layer "
    "cannot tell which layer's init the constructor kept, nor replay the draws of the one it discarded (the members "
    "would start from other weights than the model built after the seed). Pass a function that builds the model "
    "instead, e.g. ensemble_states(lambda: Net(), tx, seeds=[...])."
)


def _map_hyper(opt_state: Any, fn: Callable[[dict[str, Any]], dict[str, Any] | None]) -> tuple[Any, int]:
    """``opt_state`` with each ``hyperparams`` dict replaced by ``fn(it)`` (None: kept); and how many were replaced.

    Walks the optimizer's state tuples only, not the trees of moments beside them (a few attribute reads: cheap on
    every step, and traceable by torch.compile, which cannot trace optree's flatten)."""
    if isinstance(opt_state, tuple) and hasattr(opt_state, "_fields"):
        found = 0
        fields = {}
        for f in opt_state._fields:
            child = getattr(opt_state, f)
            if f == "hyperparams" and isinstance(child, dict):
                new = fn(child)
                if new is not None:
                    fields[f], found = new, found + 1
            elif isinstance(child, (tuple, list)):
                fields[f], k = _map_hyper(child, fn)
                found += k
        return (opt_state._replace(**fields) if found else opt_state), found
    if isinstance(opt_state, (tuple, list)):
        out = [_map_hyper(s, fn) for s in opt_state]
        found = sum(k for _, k in out)
        return (type(opt_state)(s for s, _ in out) if found else opt_state), found
    return opt_state, 0


def _set_hyper(opt_state: Any, name: str, value: torch.Tensor, which: Any) -> tuple[Any, int]:
    """``opt_state`` with the ``hyperparams[name]`` numbered in ``which`` (counted in the order :func:`_map_hyper`
    walks them) replaced by ``value``; and how many were replaced."""
    seen = itertools.count()

    def put(hyper: dict[str, Any]) -> dict[str, Any] | None:
        if name not in hyper or next(seen) not in which:
            return None
        old = hyper[name]
        return {**hyper, name: value.to(old.device, old.dtype) if isinstance(old, torch.Tensor) else value}

    return _map_hyper(opt_state, put)


def _held(opt_state: Any, name: str) -> list[Any]:
    """Every ``hyperparams[name]`` in ``opt_state``, in the order :func:`_map_hyper` walks them."""
    values: list[Any] = []
    _map_hyper(opt_state, lambda hyper: values.append(hyper[name]) if name in hyper else None)
    return values


def _responds(tx: GradientTransformation, params: Params, opt_state: Any, name: str, which: Any) -> tuple[bool, bool]:
    """Whether the update reads ``hyperparams[name]`` (those numbered in ``which``; a schedule or ``weight_decay=0``
    ignores it, as does a group without parameters); and whether it overwrites it (a schedule's rate, written into
    the state every step).

    Probed with NaN: an update that reads the value comes out NaN somewhere, whatever the other values (a
    learning rate of 0, Adam's first step, where an L2 term changes no update, a partial decay mask); a schedule
    replaces the NaN in the state it returns.
    """
    grads = _tree.tree_map(torch.ones_like, params)
    out, new_state = _opt_step(tx, grads, _set_hyper(opt_state, name, torch.tensor(float("nan")), which)[0], params)
    held = [v for j, v in enumerate(_held(new_state, name)) if j in which]
    overwritten = any(not (isinstance(v, torch.Tensor) and bool(v.isnan().any())) for v in held)
    return any(t.is_floating_point() and bool(t.isnan().any()) for t in _tree.tree_leaves(out)), overwritten


def _distinct(values: list[Any]) -> list[str]:
    """The different values among ``values`` (0-d tensors or numbers), each once, as the shortest text that reads
    back as it in its dtype: equal up to the precision of the narrower dtype of two (a rate of 1e-3 held in float32
    for one group and float64 for another is one rate), so no two texts are the same number."""
    def dtype(v: Any) -> torch.dtype:
        return v.dtype if isinstance(v, torch.Tensor) and v.is_floating_point() else torch.float64

    def text(x: float, d: torch.dtype) -> str:
        return next(t for t in (f"{x:.{k}g}" for k in range(1, 18)) if torch.tensor(float(t), dtype=d).item() == x)

    out: list[tuple[float, torch.dtype]] = []
    for x, d in sorted(((float(v), dtype(v)) for v in values), key=lambda e: e[0]):
        last = out[-1] if out else None
        if last is None or x - last[0] > max(torch.finfo(d).eps, torch.finfo(last[1]).eps) * max(abs(x), abs(last[0])):
            out.append((x, d))
    return [text(x, d) for x, d in out]


def _swept(tx: GradientTransformation, state: TrainState, name: str) -> tuple[int, ...]:
    """The holders of ``hyperparams[name]`` that a sweep sets (numbered as :func:`_set_hyper` counts them): those the
    update reads. Raises where there are none, or where tx holds several different values (per-group rates, or a
    schedule beside a rate). A holder the update neither reads nor overwrites (a group without parameters, or one
    frozen by set_to_zero) is left out."""
    values = _held(state.opt_state, name)
    if not values:
        raise ValueError(
            f"ensemble_states got {name}=[...], but the optimizer state has no hyperparams[{name!r}] to set. "
            "Use an optimizer that holds it as a tensor (fnlit.optim.sgd/adam/adamw, add_decayed_weights)."
        )
    probes = [_responds(tx, state.params, state.opt_state, name, {j}) for j in range(len(values))]
    read = tuple(j for j, (reads, _) in enumerate(probes) if reads)
    # A rate the update does not read from the state but overwrites is a schedule's: a rate of its own.
    scheduled = sum(1 for reads, overwrites in probes if overwrites and not reads) if name == "learning_rate" else 0
    if not read:  # a sweep the optimizer ignores would silently train n identical runs
        why = _NO_EFFECT[name] if scheduled or name != "learning_rate" else (
            "no parameter's update reads the optimizer's learning rate (its groups hold no parameters, or are frozen)."
        )
        raise ValueError(f"ensemble_states got {name}=[...], but changing it has no effect: {why}")
    distinct = _distinct([values[j] for j in read])
    if len(distinct) + scheduled > 1:
        what = _SEPARATE[name]
        held = distinct + ["a schedule"] * scheduled
        raise ValueError(
            f"ensemble_states got {name}=[...], but tx holds {len(held)} separate {what}s ({', '.join(held)}), in "
            f"different parts of the optimizer (per-group optimizers, e.g. masked), and ensemble_states sweeps a single "
            f"{what}: one value per member cannot keep them apart. Sweep such a setup member by member: create each "
            f"with fnlit.TrainState.create(model, tx, seed=s), assign each of its {what}s in its opt_state "
            f"(...hyperparams[{name!r}] = value), and stack them with "
            "fnlit.stack_states([...])."
        )
    return read


_NO_EFFECT = {
    "learning_rate": "the optimizer's learning rate is a schedule, which overwrites hyperparams['learning_rate'] "
    "every step. Sweep a constant rate, or build one optimizer per schedule and train them separately.",
    "weight_decay": "the optimizer was built with weight decay off (the Python number 0). Build it with a "
    "non-zero weight_decay, or weight_decay=torch.tensor(0.0), to make the decay adjustable.",
}
_SEPARATE = {"learning_rate": "learning rate", "weight_decay": "weight decay"}


def ensemble_states(
    model: nn.Module | Callable[[], nn.Module],
    tx: GradientTransformation,
    *,
    seeds: Sequence[int],
    learning_rate: Sequence[float] | None = None,
    weight_decay: Sequence[float] | None = None,
    loss_scale: str | float | None = None,
) -> TrainState:
    """Builds a stacked state for a sweep: one member per seed, each with its own init, key and hyperparameters.

    Member ``i`` equals ``TrainState.create(model_i, tx_i, seed=seeds[i])`` where ``model_i`` is initialised
    after ``torch.manual_seed(seeds[i])`` and ``tx_i`` is ``tx`` with ``learning_rate[i]`` and
    ``weight_decay[i]``: so, if its step draws no random numbers, it trains exactly like that model alone on the same
    batches (dropout masks come from all members' keys folded together: they differ from the solo run's and depend
    on the other members; see the module's "Randomness"; under :func:`fnlit.fit` the members share one data order,
    member 0's key's unless ``seed=`` is given: pass the same ``seed`` to the solo runs). For that, pass a function that builds
    the model: a module instance is re-initialised by its layers' ``reset_parameters()``, which replays
    PyTorch's default init but not the constructor (a custom init in ``__init__``, ``self.apply(init_fn)``, or a
    constructor whose draws differ from one reset of each layer gives other initial weights; a module with tied
    weights, an embedding shared with the output layer, is refused: its layers' resets cannot replay the tie,
    unless a ``reset_parameters()`` of a module holding both layers re-initialises it, or only one of the modules
    holding the parameter has a reset). The seed is set on
    the CPU generator and on the CUDA generators the build may draw from (a module's devices; every device for a
    function, once CUDA is initialised: a function that initialises CUDA itself is called twice), and all of them
    are left as they were; other accelerators' generators (MPS, XPU) are not seeded.

    ``tx`` may hold a hyperparameter in several places (a chain of masked optimizers, one per parameter group;
    ``adamw`` with a masked ``add_decayed_weights``): a sweep sets each place the update reads to the member's
    value, so they must hold one value (the same rate repeated, compared in the narrower dtype of two); different
    ones (a backbone's rate and a head's) raise a ValueError rather than being overwritten by the sweep. A place the
    update does not read is left as it is (weight decay off: the Python number 0; a group without parameters, or
    frozen by ``set_to_zero``); a learning rate from a schedule cannot be swept.

    Args:
        model: a module (its layers' ``reset_parameters()`` re-initialise each member; a module whose own
            ``reset_parameters()`` resets its children resets them once, the children are not reset again)
            or a function that builds the module (called after seeding; works for any model).
        tx: the optimizer, shared by all members.
        seeds: one seed per member: the init and the member's random key.
        learning_rate: per-member learning rates (``hyperparams["learning_rate"]``), or None to keep tx's.
        weight_decay: per-member weight decay (``hyperparams["weight_decay"]``), or None to keep tx's.
        loss_scale: as in :meth:`TrainState.create`.

    Returns:
        The stacked TrainState (leading dimension ``len(seeds)``), ready for :func:`ensemble`.

    Raises:
        ValueError: if a hyperparameter list has the wrong length, the optimizer has no such
            hyperparameter, ignores it (a schedule, weight decay off) or holds several different values of
            it (per-group rates, or a schedule beside a rate), or a parameter cannot be re-initialised from a seed
            (no ``reset_parameters()``, or tied between layers of a module instance: pass a function instead).

    Example:
        >>> import torch, fnlit
        >>> s = ensemble_states(torch.nn.Linear(2, 1), fnlit.optim.adamw(1e-3), seeds=[0, 1], learning_rate=[1e-3, 1e-2])
        >>> s.opt_state.hyperparams["learning_rate"]
        tensor([0.0010, 0.0100])
    """
    n = len(seeds)
    if n == 0:
        raise ValueError("ensemble_states expected at least one seed, got seeds=[].")
    sweeps = {k: v for k, v in zip(_HYPER, (learning_rate, weight_decay)) if v is not None}
    for name, values in sweeps.items():
        if len(values) != n:
            raise ValueError(f"ensemble_states expected {name} with one value per seed ({n}), got {len(values)} values instead.")
    states, which = [], {}
    for i, seed in enumerate(seeds):
        state = TrainState.create(_init_module(model, seed), tx, seed=seed, loss_scale=loss_scale)
        opt_state = state.opt_state
        for name, values in sweeps.items():
            value = float(values[i])
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"ensemble_states expected {name} values that are finite and >= 0, got {values[i]!r} for member {i}.")
            if i == 0:
                which[name] = _swept(tx, state, name)
            # float64, rounded once to the dtype the optimizer holds it in (float64 for a float64 model)
            opt_state = _set_hyper(opt_state, name, torch.tensor(value, dtype=torch.float64), which[name])[0]
        states.append(state.replace(opt_state=opt_state))
    return stack_states(states)


# ------------------------------------------------------------------------------ the transform
def _fold_keys(keys: torch.Tensor) -> torch.Tensor:
    """One key from all members' keys (a pure function of them), to seed the generators outside vmap."""
    acc = _random._mix_int(keys.numel())
    for k in keys.reshape(-1).tolist():  # CPU keys: a read of host memory, no device sync
        acc = _random._combine_int(acc, k)
    return _random._new(acc)


_CUMULATIVE_BATCHNORM = (
    "fnlit.ensemble: {norm} keeps a cumulative average of its running statistics (momentum=None), which divides by "
    "float(num_batches_tracked) in every training forward: a read of a tensor's value that torch.func.vmap cannot "
    "batch (vmap's .item() error above). Give the BatchNorm a numeric momentum (torch's default is 0.1) to train it "
    "in an ensemble."
)


def _cumulative_batchnorm(e: RuntimeError) -> nn.Module | None:
    """The BatchNorm with ``momentum=None`` whose forward raised ``e``, when ``e`` is vmap's error for a read of a
    tensor's value (``.item()``, ``float(t)``); else None."""
    if not str(e).startswith("vmap: It looks like you're either (1) calling .item()"):
        return None
    tb, found = e.__traceback__, None
    while tb is not None:  # the innermost BatchNorm forward on the way to the raise
        module = tb.tb_frame.f_locals.get("self") if tb.tb_frame.f_code.co_name == "forward" else None
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            found = module
        tb = tb.tb_next
    return found if found is not None and found.momentum is None else None


def _leaf_path(batch: Batch, i: int) -> str:
    """The path of the ``i``-th leaf of ``batch`` (torch's pytree order), as ``['x']``, for an error message."""
    return torch_pytree.keystr(torch_pytree.tree_flatten_with_path(batch)[0][i][0])


class EnsembleStep(Generic[_Out]):
    """``step`` vectorized over the members of a stacked state; made by :func:`ensemble`.

    It returns what ``step`` returns, stacked over the members: ``(state, metrics)`` for a training step, the
    metrics for an evaluation step.

    Example:
        >>> import torch, fnlit
        >>> def step(state, batch):
        ...     return state, {"out": (state.params["weight"] @ batch).sum()}
        >>> states = ensemble_states(lambda: torch.nn.Linear(3, 1), fnlit.optim.sgd(0.1), seeds=range(4))
        >>> estep = ensemble(step, 4)
        >>> estep, estep(states, torch.ones(3))[1]["out"].shape  # one metric value per member
        (ensemble(step, n=4, in_dims=None), torch.Size([4]))
    """

    def __init__(self, step: Callable[[TrainState, Batch], _Out], n: int, in_dims: Any, randomness: str, compile: bool) -> None:
        inner = collective_of(step)  # fnlit.ensemble(fnlit.data_parallel(...)): refused here, before any vmap or compile
        if inner is not None:
            raise ValueError(WITH_ENSEMBLE.format(who=inner.collective))
        self.step, self.n, self.in_dims, self.randomness, self.compiled = step, n, in_dims, randomness, compile
        self.__wrapped__ = step  # (walked as through any transform: _frame.wrapped_steps)
        self.aside = _NumbersAside(step)
        self.vmapped = torch.func.vmap(self.aside, in_dims=(0, in_dims), randomness=randomness)
        if compile:
            self.vmapped = torch.compile(self.vmapped)

    def __call__(self, state: TrainState, batch: Batch) -> _Out:
        require_state(state, "fnlit.ensemble")
        if not torch.compiler.is_compiling() and is_sharded(state.params):  # (before any collective: vmap has no rule)
            raise ValueError(WITH_ENSEMBLE.format(who="fnlit.shard"))
        if state.step.shape != (self.n,):
            raise ValueError(
                f"fnlit.ensemble(step, n={self.n}) expected a state stacked over {self.n} members (state.step of "
                f"shape ({self.n},)), got state.step of shape {tuple(state.step.shape)} instead. Build it with "
                "fnlit.stack_states([...]) or fnlit.ensemble_states(...)."
            )
        frame = _current_frame()
        if frame is not None and (frame.dp_group is not None or frame.shard_group is not None):
            raise ValueError(WITH_ENSEMBLE.format(who="fnlit.data_parallel" if frame.dp_group is not None else "fnlit.shard"))
        if frame is not None and frame.accum_k > 1 and 0 in self._member_dims(batch):
            raise ValueError(
                f"fnlit.accumulate around fnlit.ensemble(step, n={self.n}, in_dims={self.in_dims!r}) splits the batch along "
                "dimension 0, which holds the members here, not the examples. Put accumulate inside: "
                f"fnlit.ensemble(fnlit.accumulate(step, k), n, in_dims={self.in_dims!r}) (each member splits its own batch)."
            )
        if self.in_dims is not None:  # the batch's leaves stacked over the members, along their in_dims
            tensors = [t for t in torch_pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]
            for leaf, dim in zip(tensors, self._member_dims(batch)):
                if dim is not None and (leaf.dim() == 0 or leaf.shape[dim] != self.n):
                    raise ValueError(
                        f"fnlit.ensemble(step, n={self.n}, in_dims={self.in_dims!r}) expected the batch's tensors stacked "
                        f"over the {self.n} members (size {self.n} along their member dimension), got one of shape "
                        f"{tuple(leaf.shape)}" + (f" (member dimension {dim})." if leaf.dim() else ".")
                    )
        state = _numbers_as_tensors(state, self.n)  # vmap maps tensors only
        if frame is not None and frame.scaler is not None:
            raise ValueError(
                "float16 fnlit.amp with fnlit.ensemble needs each member's own loss scale, but a transform around the "
                "ensemble (amp, or an accumulate whose frame the members' amp shares) holds one for all: put amp and "
                "any accumulate inside, fnlit.ensemble(fnlit.accumulate(fnlit.amp(step, torch.float16), k), n), and "
                "each member follows its own scale (state.scaler is stacked too)."
            )
        traced = _random._is_traced(state.rng)  # under an outer transform, the outermost one seeds
        with nullcontext() if traced else _random.seeded(_fold_keys(state.rng), state.device):
            try:
                return self.aside.rebuild(self.vmapped(state, batch))
            except RuntimeError as e:
                norm = _cumulative_batchnorm(e)
                if norm is None:
                    raise
                raise ValueError(_CUMULATIVE_BATCHNORM.format(norm=norm)) from e

    def _member_dims(self, batch: Batch) -> list[int | None]:
        """For each tensor leaf of ``batch`` (torch's pytree order), the dimension holding the members (None: shared)."""
        leaves, spec = torch_pytree.tree_flatten(batch)
        dims = torch_pytree._broadcast_to_and_flatten(self.in_dims, spec)
        if dims is None:  # (vmap's own error names its wrapper and dumps the whole state's structure)
            shown = lambda x: tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__  # noqa: E731
            layout = torch_pytree.tree_map(shown, batch)
            raise ValueError(
                f"fnlit.ensemble(step, n={self.n}, in_dims={self.in_dims!r}) expected in_dims with the batch's "
                f"structure (or a prefix of it, as torch.func.vmap's in_dims), got a batch of structure {layout} "
                "(tensors by shape) instead. Give one entry per leaf or subtree, e.g. {'x': 0, 'y': 0} for a dict, "
                "or a single 0 or None for the whole batch."
            )
        found: list[int | None] = []
        for i, (t, d) in enumerate(zip(leaves, dims)):
            if not isinstance(t, torch.Tensor):
                if d is not None:  # (vmap refuses it, naming its wrapper)
                    raise ValueError(
                        f"fnlit.ensemble(step, n={self.n}, in_dims={self.in_dims!r}) maps the members along dimension "
                        f"{d} of batch{_leaf_path(batch, i)}, of type {type(t).__name__} (not a tensor): "
                        "torch.func.vmap maps tensors only. Give that leaf None in in_dims (every member shares it), e.g. "
                        "{'x': 0, 'w': None}, or make it a tensor stacked over the members."
                    )
                continue
            if d is not None and t.dim():
                if not -t.dim() <= d < t.dim():  # (d % t.dim() would take another dimension for the members)
                    raise ValueError(
                        f"fnlit.ensemble(step, n={self.n}, in_dims={self.in_dims!r}) maps the members along dimension "
                        f"{d} of batch{_leaf_path(batch, i)}, a tensor of shape {tuple(t.shape)}, which has no "
                        f"dimension {d}. Give that leaf its own member dimension (in_dims as the batch's structure, "
                        "e.g. (1, 0) for a pair), or None where every member shares it."
                    )
                d %= t.dim()
            found.append(d)
        return found

    def examples(self, batch: Batch) -> int:
        """How many examples ``batch`` holds for each member (what :func:`fnlit.evaluate` weights it by): along
        the first dimension of a tensor after its member dimension (``in_dims``) is taken out.

        Example:
            >>> estep = ensemble(lambda state, batch: (state, {}), 4, in_dims=0)
            >>> estep.examples((torch.zeros(4, 16, 3), torch.zeros(4, 16)))
            16
        """
        if self.in_dims is None:  # one batch for all members: counted as any batch is
            return batch_size_of(batch)
        tensors = [t for t in torch_pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]
        dims = self._member_dims(batch)
        for leaf, dim in zip(tensors, dims):
            shape = list(leaf.shape)
            if dim is not None and shape:
                del shape[dim]
            if shape:
                return int(shape[0])
        return 1 if any(d is not None for d in dims) else batch_size_of(batch)  # (n,) leaves: one example a member

    def __repr__(self) -> str:
        return f"ensemble({getattr(self.step, '__name__', self.step)!s}, n={self.n}, in_dims={self.in_dims!r})"


def ensemble(
    step: Callable[[TrainState, Batch], _Out], n: int, *, in_dims: Any = None, randomness: str = "different",
    compile: bool = False
) -> EnsembleStep[_Out]:
    """Turns a step for one model into a step for ``n`` independent models, vectorized with ``torch.func.vmap``.

    The returned step maps ``(stacked_state, batch) -> (stacked_state, stacked_metrics)`` (an evaluation step's:
    ``(stacked_state, batch) -> stacked_metrics``): each tensor metric has shape ``(n,)`` (a Python number among
    the metrics stays that number, the same for every member). Member ``i``, with its own params, optimizer state,
    hyperparameters and key, follows exactly the updates it would follow alone (to float rounding) if the step
    draws no random numbers (dropout masks come from all members' keys folded together, so they differ from the
    solo run's and depend on the other members); under :func:`fnlit.amp` only to the amp dtype's precision, since vmap changes which ops autocast lowers (``F.linear`` with a bias comes out in
    float32 under vmap, in the amp dtype alone): measured, float16 SGD with momentum drifts ~1e-4 from the solo
    run in 6 steps, bfloat16 AdamW ~1e-2. Optimizers run their per-leaf
    functional implementation under vmap (sgd, adam, adamw, clip_by_global_norm, schedules all do).
    BatchNorm statistics are per member (the buffers are stacked too). Float16 :func:`fnlit.amp` goes
    inside (``ensemble(amp(step, torch.float16), n)``: each member has its own loss scale). A BatchNorm
    model under bfloat16 amp fails inside vmap on the CPU ("expected scalar type BFloat16 but found
    Float"): a limitation of PyTorch's vmap with CPU autocast, seen without fnlit too. Nor can a BatchNorm
    with ``momentum=None`` (a cumulative average) train in an ensemble: its forward reads
    ``float(num_batches_tracked)``, which vmap cannot batch; a ValueError says so (give it a numeric momentum).

    Args:
        step: ``(state, batch) -> (state, metrics)`` for one model; pure, as every fnlit step. Or an evaluation
            step ``(state, batch) -> metrics``, for :func:`fnlit.evaluate` and :func:`fnlit.fit`'s ``eval_step``.
        n: the number of members (checked against the state).
        in_dims: how the batch maps to members: None (default) gives every member the same batch;
            0 gives member ``i`` the slice ``batch[i]`` of a batch stacked along dimension 0 (any
            ``torch.func.vmap`` in_dims prefix of the batch is accepted).
        randomness: vmap's randomness: ``"different"`` (each member its own dropout mask, seeded from
            all members' keys), ``"same"``, or ``"error"`` (the step may not draw random numbers).
        compile: wrap the vectorized step in ``torch.compile`` (the generators are still seeded outside,
            so it stays deterministic). On the CPU this removes most of vmap's per-op overhead.

    Returns:
        An :class:`EnsembleStep`, a callable ``(stacked_state, batch) -> (stacked_state, metrics)`` (for an
        evaluation step, ``(stacked_state, batch) -> metrics``).

    Raises:
        ValueError: if ``n < 1`` or ``randomness`` is unknown, or with :func:`fnlit.data_parallel` or
            :func:`fnlit.shard` in either nesting (their collectives have no vmap rule); at call time if the
            state is not stacked over ``n`` members, or for a sparse gradient (``nn.Embedding(sparse=True)``:
            vmap has no batching rule for it), naming the parameter, or for a training BatchNorm with
            ``momentum=None``, or where ``in_dims`` names a dimension a batch tensor does not have or maps a leaf
            that is not a tensor (naming it), or does not match the batch's structure (showing it).

    Example:
        >>> import torch, torch.nn.functional as F, fnlit
        >>> from fnlit.ensemble import ensemble, stack_states
        >>> model = torch.nn.Linear(3, 1)
        >>> step = fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1]))
        >>> tx = fnlit.optim.adam(1e-2)
        >>> states = stack_states([fnlit.TrainState.create(torch.nn.Linear(3, 1), tx, seed=i) for i in range(4)])
        >>> xs, ys = torch.randn(4, 8, 3), torch.randn(4, 8, 1)  # one batch per member
        >>> states, metrics = ensemble(step, 4, in_dims=0)(states, (xs, ys))
        >>> states.step
        tensor([1, 1, 1, 1])
    """
    require_step(step, "fnlit.ensemble")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"fnlit.ensemble expected n, the number of members, as an int >= 1, got {n!r} instead.")
    if randomness not in ("different", "same", "error"):
        raise ValueError(f"fnlit.ensemble expected randomness 'different', 'same' or 'error', got {randomness!r} instead.")
    return EnsembleStep(step, n, in_dims, randomness, compile)


# ------------------------------------------------------------------------- per-example gradients
def per_example_grads(
    loss_fn: Callable[..., Any],
    params: Params,
    batch: Batch,
    *,
    has_aux: bool = False,
    in_dims: Any = 0,
    chunk_size: int | None = None,
) -> tuple[Any, Any]:
    """The loss and the gradient of every example of ``batch`` separately: ``vmap(value_and_grad(loss_fn))``.

    ``loss_fn(params, example)`` sees one example, without the batch dimension (add it back with
    ``x.unsqueeze(0)`` where a module expects one). Not under ``fnlit.shard`` or float16 ``fnlit.amp`` (a
    ValueError says why; bfloat16 amp works). The three lines it stands for::

        fn = fnlit.value_and_grad(loss_fn, has_aux=has_aux)
        losses, grads = torch.func.vmap(fn, in_dims=(None, 0))(params, batch)

    Each example is forwarded alone, so a module that needs a batch cannot run in training mode here:
    BatchNorm (use ``train=False`` in the loss's :func:`fnlit.apply`, or GroupNorm/LayerNorm, as DP-SGD
    models do) and dropout (vmap refuses random ops per example, a RuntimeError says so; apply with
    ``train=False``). Under ``accumulate`` or ``data_parallel`` the gradients must be aggregated first (see
    their errors).

    Args:
        loss_fn: ``(params, example) -> loss`` (or ``(loss, aux)`` with ``has_aux``), a scalar loss.
        params: the parameters (``state.params``), shared by all examples.
        batch: examples stacked along dimension 0 (or as ``in_dims`` says).
        has_aux: ``loss_fn`` returns ``(loss, aux)``.
        in_dims: the batch dimension of ``batch`` (a ``torch.func.vmap`` in_dims prefix).
        chunk_size: vectorize over this many examples at a time (less memory).

    Returns:
        ``(losses, grads)`` (``((losses, aux), grads)`` with ``has_aux``): ``losses`` has shape ``(B,)``,
        and each leaf of ``grads`` has shape ``(B, *param.shape)``. Feed the grads to
        :func:`fnlit.optim.dp_sgd_aggregate` through ``state.apply_gradients``.

    Example:
        >>> import torch
        >>> params = {"w": torch.tensor([1.0, 1.0])}
        >>> xs = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> losses, grads = per_example_grads(lambda p, x: (p["w"] * x).sum() ** 2, params, xs)
        >>> losses.tolist(), grads["w"].tolist()
        ([1.0, 4.0], [[2.0, 0.0], [0.0, 8.0]])
    """
    frame = _current_frame()  # (value_and_grad refuses these too, eagerly; this check also runs while compiling)
    if frame is not None and (frame.shard_group is not None or frame.scaler is not None):
        raise ValueError(_PER_EXAMPLE_SHARD if frame.shard_group is not None else _PER_EXAMPLE_FP16)
    # vmap returns tensors only: a number in aux, or a None among the params (None in the gradients too, as
    # value_and_grad keeps it), goes around it
    fn = _NumbersAside(value_and_grad(loss_fn, has_aux=has_aux))
    try:
        out = torch.func.vmap(fn, in_dims=(None, in_dims), chunk_size=chunk_size)(params, batch)
    except RuntimeError as e:  # vmap's own advice (its randomness flags) is out of reach here
        if "randomness error mode" in str(e):
            raise RuntimeError(_PER_EXAMPLE_RANDOM) from None
        raise
    return fn.rebuild(out)


_PER_EXAMPLE_RANDOM = (
    "fnlit.per_example_grads runs loss_fn on each example under torch.func.vmap, which refuses random operations "
    "(dropout in training mode, torch.rand/randn in the forward), with or without an rng key. Apply the model with "
    "train=False in loss_fn (fnlit.apply(model, params, buffers, x, train=False)), as DP-SGD models usually run "
    "without dropout, or draw the random values outside per_example_grads and pass them in with the batch."
)
