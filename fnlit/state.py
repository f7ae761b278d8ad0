"""TrainState: everything that changes during training, in one frozen pytree."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from . import random as _random
from . import tree as _tree
from .functional import _UPDATED_FROM, _byte_range
from .functional import check_buffers_kept as _check_buffers_kept
from .functional import own_tensors as _own_tensors
from .functional import LAZY as _LAZY, _LAZY_TENSOR
from ._types import Buffers, Grads, OptState, Params
from .optim._base import GradientTransformation
from .optim._base import step as _opt_step
from .transforms._frame import current as _current_frame
from .transforms.amp import LossScaleState
from .transforms.donate import consume as _consume
from .transforms.donate import donated_by as _donated_by
from .transforms.donate import is_donated as _is_donated

__all__ = ["TrainState"]

_DATA_FIELDS = ("step", "params", "buffers", "opt_state", "scaler", "rng")
_UPDATE_FIELDS = frozenset(("step", "params", "opt_state", "rng"))  # what apply_gradients computes


_SHARED_MEMORY = (
    "TrainState.create got parameters {a!r} and {b!r} of {module} whose memory overlaps (one a view of the other, "
    "or both views of one tensor): torch.optim updates that memory through both, while the state holds a copy of "
    "each and would train them as separate tensors. Make them separate (nn.Parameter(w.detach().clone())), tie "
    "them as one Parameter (layer_b.weight = layer_a.weight), or register one and compute the other from it in "
    "forward (w[:2])."
)


def _overlapping(named: list[tuple[str, torch.Tensor]]) -> tuple[str, str] | None:
    """The names of the first two parameters whose memory overlaps, one of them trainable (two frozen ones are
    never written); None if there are none. Disjoint views of one buffer (a flat parameter store) pass."""
    spans: dict[tuple[torch.device, int], list[tuple[int, int, str, torch.Tensor]]] = {}
    for n, t in named:
        if t.numel() == 0 or t.is_meta:
            continue
        try:
            base = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # no plain storage (a DTensor's is its shard)
            continue
        spans.setdefault((t.device, base), []).append((*_byte_range(t), n, t))
    for group in spans.values():
        group.sort(key=lambda g: g[0])
        for i, (_, hi, a, ta) in enumerate(group):
            j = i + 1  # (by index: a slice of the rest per parameter made many views of one buffer quadratic)
            while j < len(group) and group[j][0] < hi:  # sorted by start: no later one reaches back into a
                b, tb = group[j][2], group[j][3]
                if (ta.requires_grad or tb.requires_grad) and _elements_overlap(ta, tb):
                    return a, b
                j += 1
    return None


def _elements_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one storage whose spans overlap share an element (strided views may interleave:
    ``w[:, ::2]`` and ``w[:, 1::2]`` do not)."""
    if a.is_contiguous() and b.is_contiguous() or a.element_size() != b.element_size():
        return True  # (spans of contiguous tensors are their elements; other dtypes: as their spans say)

    def offsets(t: torch.Tensor) -> torch.Tensor:
        index = torch.full((), t.storage_offset(), dtype=torch.int64)
        for k, st in zip(t.shape, t.stride()):
            index = index.unsqueeze(-1) + torch.arange(k, dtype=torch.int64) * st
        return index.reshape(-1)

    return bool(torch.isin(offsets(b), offsets(a)).any())


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class TrainState:
    """The whole training state: params, buffers, optimizer state, loss scale, step and RNG key.

    Frozen: a step returns a new TrainState and never changes the one it was given. It is a pytree
    (for optree and ``torch.utils._pytree``), so ``torch.func.vmap``, ``torch.compile`` and
    :mod:`fnlit.tree` traverse it; the optimizer ``tx`` is static data, not a leaf.

    A state cannot be pickled (``pickle.dumps(state)``, or returning it from a
    :func:`fnlit.distributed.launch` function, fails with "Can't pickle local object"): ``tx`` is made of
    closures. Save it with :func:`fnlit.checkpoint.save` and :func:`fnlit.checkpoint.restore`, or pickle
    ``state.params`` or ``state.replace(tx=None)`` (everything but the optimizer) and put the optimizer
    back with ``.replace(tx=tx)``.

    Attributes:
        step: 0-d int64 CPU tensor, the number of steps taken (float16 steps skipped for overflow included).
        params: name -> tensor, the trainable parameters in module order.
        buffers: name -> tensor, buffers (BatchNorm statistics, ...) and frozen parameters.
        opt_state: the optimizer's state (``tx.init(params)``).
        scaler: dynamic loss-scale state for float16 :func:`fnlit.amp`, else None.
        rng: the explicit random key (:mod:`fnlit.random`); advanced by every applied update.
        tx: the optimizer (static).

    Example:
        >>> import torch, fnlit
        >>> model = torch.nn.Linear(3, 1)
        >>> state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
        >>> grads = {k: torch.ones_like(v) for k, v in state.params.items()}
        >>> new = state.apply_gradients(grads)
        >>> int(new.step), torch.allclose(new.params["bias"], state.params["bias"] - 0.1)
        (1, True)
    """

    step: torch.Tensor
    params: Params
    buffers: Buffers
    opt_state: OptState
    scaler: LossScaleState | None
    rng: torch.Tensor
    tx: GradientTransformation

    @classmethod
    def create(
        cls,
        module: nn.Module,
        tx: GradientTransformation,
        *,
        seed: int,
        loss_scale: str | float | None = None,
    ) -> TrainState:
        """Builds the initial state from a module's current tensors (copied; the module is untouched).

        Parameters with ``requires_grad=False`` are frozen: they go to ``buffers`` and get no update.

        Args:
            module: the model; its parameters and buffers are copied.
            tx: a :class:`fnlit.optim.GradientTransformation`.
            seed: seed of the state's random key (dropout masks, data order).
            loss_scale: ``"dynamic"`` (or an initial scale, a real number) creates the loss-scale state that
                ``fnlit.amp(step, dtype=torch.float16)`` needs, with torch.amp.GradScaler's defaults.

        Raises:
            TypeError: if ``module`` is not an nn.Module, or ``tx`` not an fnlit.optim GradientTransformation
                (a torch.optim optimizer, say).
            ValueError: if the module has no trainable parameters, has tensors on the meta device (not yet
                materialised), two parameters whose memory overlaps (``nn.Parameter(w.data[:2])`` beside ``w``:
                torch.optim updates it through both, a state holds separate copies), or ``loss_scale`` is not
                understood.

        Example:
            >>> import torch, fnlit
            >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
            >>> _ = model[0].bias.requires_grad_(False)  # frozen: kept in buffers, never updated
            >>> state = TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
            >>> list(state.params), list(state.buffers)[:2], int(state.step)
            (['0.weight', '1.weight', '1.bias'], ['0.bias', '1.running_mean'], 0)
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"TrainState.create expected an nn.Module, got {type(module).__name__} instead.")
        if not _is_tx(tx):
            raise TypeError(_NOT_A_TX.format(who="TrainState.create", got=_describe_tx(tx)))
        # Under the lock: not while another thread's fnlit.apply has its tensors swapped into the module; and an
        # eager backward in flight, which holds its step's tensors there throughout, has the module's own saved.
        with _random._LOCK:
            named_params, named_buffers = _own_tensors(module)
            lazy = next((n for n, t in [*named_params, *named_buffers] if isinstance(t, _LAZY_TENSOR)), None)
            if lazy is not None:
                owner = module.get_submodule(lazy.rpartition(".")[0])
                raise ValueError(_LAZY.format(who="TrainState.create", name=lazy, kind=type(owner).__name__))
            shared = _overlapping(named_params)
            if shared is not None:
                raise ValueError(_SHARED_MEMORY.format(a=shared[0], b=shared[1], module=type(module).__name__))
            params = {n: p.detach().clone() for n, p in named_params if p.requires_grad}
            buffers = {n: p.detach().clone() for n, p in named_params if not p.requires_grad}
            buffers.update((n, b.detach().clone()) for n, b in named_buffers)
        meta = next((n for n, t in {**params, **buffers}.items() if t.is_meta), None)
        if meta is not None:
            raise ValueError(
                f"TrainState.create got a module whose tensors are on the meta device (at {meta!r}; built under "
                "torch.device('meta')?): they hold no values to train. Materialise it first: "
                "module.to_empty(device=...) and initialise it (module.reset_parameters(), or "
                "load_state_dict(..., assign=True))."
            )
        if not params:
            raise ValueError(
                f"TrainState.create got a module without trainable parameters ({type(module).__name__}): "
                "there is nothing to train. Check that the layers are registered as submodules "
                "(nn.ModuleList, not a Python list) and that requires_grad is True."
            )
        device = next(iter(params.values())).device
        scaler = None
        if loss_scale is not None:
            from .transforms.amp import init_loss_scale

            if isinstance(loss_scale, str) and loss_scale == "dynamic":
                scaler = init_loss_scale(device=device)
            elif _tree.is_real(loss_scale):  # a numpy float too
                scaler = init_loss_scale(float(loss_scale), device=device)
            else:
                raise ValueError(
                    f"TrainState.create expected loss_scale='dynamic', a number (the initial scale) or None, "
                    f"got {loss_scale!r} instead."
                )
        return cls(
            step=torch.zeros((), dtype=torch.int64, device="cpu"),  # not the default device (torch.set_default_device)
            params=params,
            buffers=buffers,
            opt_state=tx.init(params),
            scaler=scaler,
            rng=_random.key(seed),
            tx=tx,
        )

    def replace(self, **changes: Any) -> TrainState:
        """A copy with some fields replaced (the original is unchanged).

        A new ``tx`` with the old ``opt_state`` (a second training phase) keeps the learning rate and weight decay
        the old optimizer put in ``opt_state.hyperparams``: they are read from there, not from the new optimizer's
        arguments (as ``torch.optim``'s ``load_state_dict`` brings back each group's ``lr``), except a learning
        rate schedule's, written in at every update, and the decay of an optimizer built with the Python number
        ``weight_decay=0``, which reads none (the saved value stays in ``opt_state`` unused). Its betas, momentum
        and eps are the new optimizer's. To use the new numbers, replace them in ``opt_state`` too (shown below;
        under :func:`fnlit.optim.chain`, ``opt_state`` is a tuple holding one state per transformation).

        Raises:
            TypeError: on a name that is not a field, a ``tx`` that is not an fnlit.optim GradientTransformation
                (a torch.optim optimizer, or the factory uncalled) or None, or a ``scaler`` that is not a
                :class:`fnlit.transforms.LossScaleState` (of tensors) or None.

        Example:
            >>> import torch, fnlit
            >>> state = TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(0.1), seed=0)
            >>> later = state.replace(step=torch.tensor(5))
            >>> int(later.step), int(state.step)
            (5, 0)
            >>> state = TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.adamw(1e-3, weight_decay=0.01), seed=0)
            >>> new_tx = fnlit.optim.adamw(1e-5, weight_decay=0.1)
            >>> state.replace(tx=new_tx).opt_state.hyperparams["learning_rate"]  # still the old rate
            tensor(0.0010)
            >>> hyper = {**state.opt_state.hyperparams, "learning_rate": 1e-5, "weight_decay": 0.1}
            >>> tuned = state.replace(tx=new_tx, opt_state=state.opt_state._replace(hyperparams=hyper))
        """
        if not changes.keys() <= _FIELD_SET:
            unknown = changes.keys() - _FIELD_SET
            raise TypeError(
                f"TrainState.replace got unknown field(s) {sorted(unknown)}; the fields are {list(_DATA_FIELDS) + ['tx']}."
            )
        if "tx" in changes or "scaler" in changes:  # (two lookups: the update replaces neither)
            _check_tx_and_scaler(changes)
        return self._replace_built(changes)

    def _replace_built(self, changes: dict[str, Any]) -> TrainState:
        """:meth:`replace` without its checks, for fnlit's own update of fields it built (amp's next loss scale, of
        tensors: checking it cost each float16 step a few microseconds)."""
        new = object.__new__(TrainState)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new

    def apply_gradients(self, grads: Grads, **changes: Any) -> TrainState:
        """Runs the optimizer on ``grads``, increments ``step`` and advances ``rng``.

        ``changes`` (typically ``buffers=new_buffers``) are applied too. Inside :func:`fnlit.accumulate`,
        :func:`fnlit.amp` or :func:`fnlit.data_parallel` this is where gradients are accumulated,
        averaged across ranks and unscaled, in that order, whatever the order of the transforms.

        Raises:
            ValueError: if ``grads`` does not have the structure and shapes of ``params``, or ``changes``
                names a field the update itself sets (``step``, ``params``, ``opt_state``, ``rng``).
            TypeError: if the state has no optimizer (``tx=None``, as ``state.replace(tx=None)`` makes for pickling).

        Example:
            >>> import torch, fnlit
            >>> state = TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(0.5), seed=0)
            >>> new = state.apply_gradients({k: torch.ones_like(v) for k, v in state.params.items()})
            >>> int(new.step), torch.equal(new.params["bias"], state.params["bias"] - 0.5)
            (1, True)
        """
        if changes and any(k in _UPDATE_FIELDS for k in changes):  # (dynamo traces this form)
            raise ValueError(
                f"apply_gradients sets {sorted(k for k in changes if k in _UPDATE_FIELDS)} itself (the update); got them "
                "in its changes too. Pass buffers= (or scaler=) here, and replace the others on the state it returns: "
                "state.apply_gradients(grads).replace(rng=...)."
            )
        if self.tx is None:  # (it failed in the optimizer step, as "'NoneType' object has no attribute 'update'")
            raise TypeError(_NO_TX)
        # (compiling first: torch < 2.14 cannot trace a ContextVar's get)
        if not torch.compiler.is_compiling() and _UPDATED_FROM.get() is not None:  # a forward updated buffers: kept?
            _check_buffers_kept(self.buffers, changes)
        frame = _current_frame()
        if frame is not None:
            return frame.apply_gradients(self, grads, changes)
        return self.apply_update(self.check_grads(grads), **changes)

    def check_grads(self, grads: Grads) -> Grads:
        """Returns ``grads`` if their structure matches ``params``, else raises a ValueError naming the path.

        Example:
            >>> import torch, fnlit
            >>> state = TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(0.1), seed=0)
            >>> state.check_grads({"bias": torch.ones(1)})
            Traceback (most recent call last):
            ValueError: apply_gradients expected grads in the structure of state.params, ... missing weight ...
        """
        params = self.params
        if type(grads) is dict and type(params) is dict and grads.keys() == params.keys():
            # The common case, checked in a microsecond. Shapes are the optimizer's to check (every fnlit.optim
            # path does, naming the path): dp_sgd_aggregate takes per-example gradients, with a batch dimension.
            return grads
        if _tree.tree_structure(grads) != _tree.tree_structure(params):
            where = _tree.first_mismatch(self.params, grads, none_hint=_tree.NONE_GRAD_HINT)
            raise ValueError(
                f"apply_gradients expected grads in the structure of state.params, but they differ: {where}. "
                "Differentiate with respect to state.params (fnlit.value_and_grad(loss_fn)(state.params))."
            )
        return grads

    def apply_update(self, grads: Grads, **changes: Any) -> TrainState:
        """The optimizer update itself, with no transform in the way (used by the transforms).

        Example:
            >>> import torch, fnlit
            >>> state = TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(0.1), seed=0)
            >>> grads = {k: torch.ones_like(v) for k, v in state.params.items()}
            >>> a, b = state.apply_update(grads), state.apply_gradients(grads)  # the same outside any transform
            >>> int(a.step), torch.equal(a.params["weight"], b.params["weight"])
            (1, True)
        """
        params, opt_state = _opt_step(self.tx, grads, self.opt_state, self.params)
        new = self.replace(
            step=self.step + 1, params=params, opt_state=opt_state, rng=_random.next_key(self.rng), **changes
        )
        _consume(self, params)  # under fnlit.donating an in-place update: reading self now would give the new values
        return new

    @property
    def device(self) -> torch.device:
        """The device of the parameters."""
        return next(iter(self.params.values())).device

    def __repr__(self) -> str:
        if _is_donated(self):  # its fields raise when read; a debugger, a log or pytest's locals still show it
            return f"TrainState(<donated to a step ({_donated_by(self)})>)"
        params, buffers = _tree.tree_leaves(self.params), _tree.tree_leaves(self.buffers)  # (nested trees too)
        n = sum(p.numel() for p in params if isinstance(p, torch.Tensor))
        step = self.step  # a 0-d tensor; (members,) under fnlit.ensemble; whatever replace(step=...) was given
        return (
            f"TrainState(step={tuple(step.shape) if isinstance(step, torch.Tensor) and step.dim() else int(step)}, "
            f"params={len(params)} tensors / {n} values, buffers={len(buffers)} tensors, "
            f"scaler={'dynamic' if self.scaler is not None else None})"
        )


_FIELD_SET = frozenset(_DATA_FIELDS + ("tx",))

_NOT_A_TX = (
    "{who} expected tx to be an fnlit.optim GradientTransformation (e.g. fnlit.optim.adamw(1e-3)), "
    "got {got} instead. fnlit's optimizers are pure functions of the state, not torch.optim optimizers: "
    "torch.optim.AdamW(model.parameters(), lr=1e-3) becomes fnlit.optim.adamw(1e-3), and "
    "torch.optim.SGD(..., lr=0.1, momentum=0.9) becomes fnlit.optim.sgd(0.1, momentum=0.9)."
)

_NO_TX = (
    "apply_gradients got a state without an optimizer (tx=None, as state.replace(tx=None) makes for pickling): "
    "put one back first, state.replace(tx=tx), built as the state's was (e.g. fnlit.optim.adamw(1e-3)): its "
    "opt_state is that optimizer's."
)


def _is_tx(tx: Any) -> bool:
    return isinstance(tx, GradientTransformation) or (
        callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))
    )


def _check_tx_and_scaler(changes: dict[str, Any]) -> None:
    """replace's check of a new ``tx`` (None allowed: a picklable state) and ``scaler``: a torch.optim optimizer, or a
    string for a scaler, would otherwise fail only in apply_gradients, in words that do not say why."""
    tx = changes.get("tx")
    if tx is not None and not _is_tx(tx):
        raise TypeError(_NOT_A_TX.format(who="TrainState.replace", got=_describe_tx(tx)))
    scaler = changes.get("scaler")
    if scaler is not None and not isinstance(scaler, LossScaleState):
        raise TypeError(
            f"TrainState.replace expected scaler to be a fnlit.transforms.LossScaleState or None, got {scaler!r} "
            f"({type(scaler).__name__}) instead. Make one with fnlit.transforms.init_loss_scale() (the dynamic loss "
            "scaling of TrainState.create(..., loss_scale=\"dynamic\"), torch.amp.GradScaler's defaults)."
        )
    if scaler is not None:
        bad = next((name for name, v in zip(scaler._fields, scaler) if not isinstance(v, torch.Tensor)), None)
        if bad is not None:  # (a float scale failed in the next step, an int one in fnlit.restore, as a missing scaler)
            value = getattr(scaler, bad)
            dtype = "int32" if bad in ("growth_tracker", "growth_interval") else "float32"
            raise TypeError(_SCALER_FIELD.format(name=bad, value=value, kind=type(value).__name__, dtype=dtype))


_SCALER_FIELD = (
    "TrainState.replace expected the scaler's fields to be tensors, got {name}={value!r} ({kind}) instead "
    "(a number fails in the next float16 step, or in fnlit.restore). Give a tensor, "
    "state.scaler._replace({name}=torch.tensor({value!r}, dtype=torch.{dtype})), or make the scaler with "
    "fnlit.transforms.init_loss_scale(...)."
)


def _describe_tx(tx: Any) -> str:
    if isinstance(tx, type):
        return f"the class {tx.__module__}.{tx.__qualname__}"
    if isinstance(tx, torch.optim.Optimizer):
        return f"a {type(tx).__module__}.{type(tx).__qualname__} optimizer"
    if callable(tx):
        return f"the function {getattr(tx, '__qualname__', tx)!s} (a factory? call it: fnlit.optim.adamw(1e-3))"
    return f"{tx!r} ({type(tx).__name__})"


_tree.register_dataclass(TrainState, _DATA_FIELDS, ("tx",))
