"""``fnlit.compile``: capture a whole step once and replay it, as ``jax.jit`` does.

A fnlit step is a pure function of explicit state, so forward, backward, the optimizer, loss scaling
and accumulation -- every transform inside the step -- trace into one graph. How it is captured:

* The state and batch are flattened to tensor leaves *outside* the compiled region (with
  ``torch.utils._pytree``, the tree library dynamo reads), and the compiled function rebuilds them. Its
  guards are therefore on tensor metadata only; hyperparameters are 0-d tensors in the optimizer state
  and schedules are torch ops on the step count, so changing the learning rate never recompiles.
* ``torch.compile(fullgraph=True)`` with inductor. On the CPU that is the whole story: one C++/OpenMP
  program per step, fused optimizer loops included. On CUDA, with ``donate=True``, the state's tensors
  are marked as static addresses and the step runs as a CUDA graph (``mode="reduce-overhead"``, i.e.
  inductor's CUDA-graph trees): the graph updates the state in place and the batch is copied into the
  graph's static input buffers. We use torch.compile's CUDA graphs rather than a hand-made
  ``torch.cuda.graph`` capture because inductor also fuses the step's hundreds of small optimizer and
  elementwise kernels, splits the CPU-side ops (the step counter and RNG key, which live on the host)
  out of the graph, re-records when shapes change, and checks aliasing for us.
* The RNG is seeded from ``state.rng`` outside the compiled region. Inductor draws its own random
  numbers: dropout masks under compile are deterministic given ``state.rng`` but need not equal eager's (on
  the CPU a single forward's were measured equal; inductor's own generator on CUDA draws others).

What cannot be captured raises :class:`CaptureError` naming the cause, the user's line and the fix:
host syncs (``.item()``, ``float(t)``, ``if t > 0:``), data-dependent shapes (``x[mask]``), Python side
effects (``print``). Collectives (:func:`fnlit.data_parallel`, :func:`fnlit.shard`) are not captured: that combination raises
NotImplementedError (see :func:`compile`).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import linecache
import operator
import os
import re
import sysconfig
import threading
import types
import weakref
from contextlib import nullcontext
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.utils._pytree as torch_pytree

from .. import _storage
from .. import random as _random
from .. import tree as _tree
from .._types import Batch, Metrics, StepFn
from ._frame import current as _current_frame
from ._frame import describe_result as _describe
from ._frame import is_step_result as _is_step_result
from ._frame import require_state, require_step
from ._frame import wrapped_steps
from ..optim._base import _DONATED
from .donate import RAISED, check_not_donated, poison

if TYPE_CHECKING:
    from ..state import TrainState

__all__ = ["compile", "CompiledStep", "CaptureError"]

Mode = Literal["auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "eager"]
_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "eager")
# The names of torch's Python functions that draw random numbers (F.dropout2d, F.gumbel_softmax,
# F.fractional_max_pool2d): a graph keeps them whole, and aten's registry cannot tell (see _draws_random).
_RANDOM = re.compile(r"rand|dropout|bernoulli|normal(?!ize)|uniform|multinomial|exponential|poisson|gumbel|fractional|seed")
_HOST_READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"}


class CaptureError(RuntimeError):
    """A step could not be captured whole; the message names the cause, the line and the fix.

    Example:
        >>> import torch, fnlit
        >>> def step(state, batch):
        ...     return state, {"pos": batch.sum() > 0 and batch.sum()}  # `and` reads the tensor on the host
        >>> state = fnlit.TrainState.create(torch.nn.Linear(2, 1), fnlit.optim.sgd(0.1), seed=0)
        >>> compile(step)(state, torch.ones(2))  # doctest: +SKIP
        Traceback (most recent call last):
        fnlit.transforms.compile.CaptureError: fnlit.compile could not capture the step at ... host sync ...
    """


_FIXES = {
    "host sync": (
        "it reads a tensor's value on the host (a host sync), which stalls every step and cannot be "
        "replayed by a captured graph",
        "Return the tensor in the metrics instead (`return state, {'name': tensor}`): the driver reads "
        "metrics at log intervals. For a choice that depends on a tensor's value, use torch.where.",
    ),
    "dynamic shape": (
        "a tensor's shape depends on tensor values (boolean-mask indexing, nonzero, unique), so the "
        "graph cannot be fixed",
        "Keep shapes fixed: multiply by the mask or use torch.where(mask, x, 0) instead of x[mask].",
    ),
    "side effect": (
        "a Python side effect (print, logging, a file written, changing a global or a list) runs once at capture "
        "time, not on every step",
        "Return the value in the metrics and print, log or save it outside the step.",
    ),
    "other": ("torch.compile could not trace it", "Move this line out of the step, or run the step uncompiled."),
    "checkpoint": (
        "activation checkpointing (torch.utils.checkpoint.checkpoint(..., use_reentrant=False)) inside "
        "fnlit.value_and_grad cannot be captured by fnlit.compile: compiled, the gradient is taken by torch.func, "
        "which has no support for the saved tensor hooks the checkpoint installs",
        "Run the step uncompiled (activation checkpointing works there), or compile it without the checkpoint.",
    ),
}


# torch.func's refusal of saved tensor hooks, which non-reentrant activation checkpointing installs
_SAVED_TENSOR_HOOKS = "don't yet support saved tensor hooks"


def _dynamic_config() -> Any:
    """The config patches a ``dynamic=True`` call compiles under (see CompiledStep._call)."""
    from torch.fx.experimental import _config as shapes_config

    stack = contextlib.ExitStack()
    if hasattr(torch._dynamo.config, "specialize_float"):  # (not at import: dynamo takes ~1 s to load)
        stack.enter_context(torch._dynamo.config.patch(specialize_float=True))
    if hasattr(shapes_config, "use_duck_shape"):
        stack.enter_context(shapes_config.patch(use_duck_shape=False))
    return stack


@contextlib.contextmanager
def _saved_tensor_hooks_kept() -> Iterator[None]:
    """Saved tensor hooks as they were before a call that fails: the captured torch.func.grad turns them off while it
    runs and, raised through (the checkpoint's own refusal among others), neither turns them on again nor puts back a
    caller's own switch-off message, so every later backward with activation checkpointing, eager ones too, would
    fail (and a caller's `disable_saved_tensors_hooks` block would find them on)."""
    autograd = torch._C._autograd
    before = autograd._saved_tensors_hooks_is_enabled(), autograd._saved_tensors_hooks_get_disabled_error_message()
    try:
        yield
    except BaseException:
        if before[0]:
            autograd._saved_tensors_hooks_enable()
        else:
            autograd._saved_tensors_hooks_disable(before[1] or "")
        raise


def _checkpoint_frames(err: BaseException) -> list[tuple[str, int]]:
    """The user's frames of the checkpoint call whose graph (mode="eager" runs dynamo's graph as Python) raised
    ``err``: the recorded stack of the graph's activation-checkpoint node; [] where none is found."""
    tb = err.__traceback__
    while tb is not None:
        graph = tb.tb_frame.f_locals.get("self")
        if isinstance(graph, torch.fx.GraphModule):
            for node in graph.graph.nodes:
                if "checkpoint" in str(node.target) and node.meta.get("stack_trace"):
                    return _frames_of(node.meta["stack_trace"])
        tb = tb.tb_next
    return []


_RECOMPILES = (
    "fnlit.compile hit torch.compile's recompile limit: the step was compiled for {limit} different batch "
    "shapes or Python numbers in the batch or the state (torch._dynamo.config.recompile_limit = {limit}), and this "
    "call needs one more. Each new batch shape (a smaller last batch, sequences of another length) and each new "
    "value of a Python number in the batch or the state (a learning rate assigned to state.opt_state's "
    "hyperparams as a float) compiles a graph of its own.\n"
    "Fix: give batches fixed shapes (ArrayLoader(..., drop_last=True) or DataLoader(..., drop_last=True), or pad "
    "to a few fixed lengths), pass numbers that change as 0-d tensors (assign hyperparameters as tensors: "
    "hyperparams['learning_rate'] = torch.tensor(1e-3), of the dtype held there: float64 for a float64 model), compile with "
    "fnlit.compile(step, dynamic=True) to let shapes vary in one graph, or raise the limit: "
    "torch._dynamo.config.recompile_limit = N."
)


_SIDE_EFFECTS = (
    "fnlit.compile could not capture the step: it changes a list that lives outside it ({sources}) (a deque or "
    "list subclass too). A captured graph cannot do that on every call; "
    "dynamo would replay the change from what the capture saw (the list would keep only the latest entry, "
    "dropping what else was appended to it since).\n"
    "Fix: return the value in the metrics (the training loop collects them), or keep that code out of the step "
    "(a module's auxiliary losses: return them from its forward)."
)


def _replayed_side_effects() -> list[str]:
    """The lists outside the step that the graph being compiled changes (any change: append, extend, pop,
    clear, item assignment; deques and list subclasses too), as dynamo names them; [] when that cannot be read
    (private API of torch.compile).

    Dynamo replays a change to a list that lives outside the step after each call as "the contents it saw
    while capturing, changed", and fnlit drops its guards on globals (for speed), so those contents go stale:
    a list appended to keeps only the latest entry, dropping what other code appended since. Other changes
    are left to dynamo: attributes set on objects and dict entries are replayed with each call's values (a
    cache, spectral norm's hook, the training flags fnlit.apply sets and restores, torch's own module-level
    state); a counter kept there (``self.n += 1``, a global) or a dict given a new key each call is replayed
    from its capture, which cannot be told apart from those here (see :func:`compile`). fnlit's own frame stack
    is left out.
    """
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        from torch._dynamo.variables.base import AttributeMutationExisting, ValueMutationExisting

        side_effects = InstructionTranslator.current_tx().output.side_effects
        names = []
        for var in side_effects._get_modified_vars():
            if type(var).__name__ not in _LISTS or not isinstance(
                getattr(var, "mutation_type", None), (AttributeMutationExisting, ValueMutationExisting)
            ):
                continue  # not a list, or one created inside the step
            name = var.source.name if var.source is not None else "<a list>"
            names.append(name() if callable(name) else name)
    except Exception:  # noqa: BLE001 - dynamo internals of another version: skip the check
        return []
    names = [n for n in names if not n.endswith("_frame']._TRACED")]
    # dynamo's names for readers: G['__import_a_dot_b'].x is a.b.x, G['x'] and L['x'] are x
    names = [re.sub(r"G\['__import_(\w+?)'\]", lambda m: m.group(1).replace("_dot_", "."), n) for n in names]
    return [re.sub(r"[GL]\['([^']+)'\]", r"\1", n) for n in names]


# dynamo's trackers of lists and deques (and of their subclasses)
_LISTS = ("ListVariable", "DequeVariable", "UserDefinedListVariable", "UserDefinedDequeVariable")


_PATHS = sysconfig.get_paths()
_STDLIB = tuple({_PATHS["stdlib"], _PATHS["platstdlib"]})
_INSTALLED = tuple({_PATHS["purelib"], _PATHS["platlib"]})


def _in_stdlib(filename: str) -> bool:
    """Whether ``filename`` is the standard library's (a logging call's frames), not an installed package's (a
    virtualenv's, or the base interpreter's site-packages seen from a venv with system site packages)."""
    return (
        filename.startswith(_STDLIB) and not filename.startswith(_INSTALLED)
        and f"{os.sep}site-packages{os.sep}" not in filename and f"{os.sep}dist-packages{os.sep}" not in filename
    )


def _user_frame(frames: list[tuple[str, int]]) -> tuple[str, int]:
    """The innermost frame outside torch and the standard library (and, when there is one, outside fnlit)."""
    torch_dir = torch.__file__.rsplit("/", 1)[0]
    fnlit_dir = __file__.rsplit("/", 2)[0]
    outside_torch = [f for f in frames if not f[0].startswith(torch_dir) and not _in_stdlib(f[0])]
    user = [f for f in outside_torch if not f[0].startswith(fnlit_dir)]
    pick = user or outside_torch or frames
    return pick[-1] if pick else ("<unknown>", 0)


def _capture_error(kind: str, frames: list[tuple[str, int]], detail: str = "") -> CaptureError:
    cause, fix = _FIXES[kind]
    filename, lineno = _user_frame(frames)
    code = linecache.getline(filename, lineno).strip() if lineno else ""
    where = f"{filename}:{lineno}: {code}" if lineno else "(no source line recorded)"
    extra = f"\n  (torch.compile said: {detail})" if detail else ""
    return CaptureError(f"fnlit.compile could not capture the step at\n  {where}\nbecause {cause}.{extra}\nFix: {fix}")


def _frames_of(stack_trace: str | None) -> list[tuple[str, int]]:
    return [(f, int(n)) for f, n in re.findall(r'File "([^"]+)", line (\d+)', stack_trace or "")]


@functools.lru_cache(maxsize=None)
def _seeded_aten(name: str) -> bool | None:
    """Whether the aten op ``name`` (any overload) draws from a generator (tagged ``nondeterministic_seeded``);
    None when aten has no op of that name."""
    packet = getattr(torch.ops.aten, name, None) if name.isidentifier() else None
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return None
    return any(torch.Tag.nondeterministic_seeded in getattr(packet, o).tags for o in packet.overloads())


def _draws_random(node: torch.fx.Node) -> bool:
    """Whether ``node`` of a captured graph may draw random numbers.

    Decided by aten's own registry: an op tagged ``torch.Tag.nondeterministic_seeded`` (RReLU, cauchy_,
    _standard_gamma, binomial, dropout, ...); dynamo's graphs name torch functions and tensor methods
    (``torch.binomial``, ``x.cauchy_()``), which are read as the aten op of the same name. A name aten does
    not know, or a Python function torch keeps whole in the graph (F.dropout2d, F.gumbel_softmax), draws random
    numbers when its name matches ``_RANDOM`` too; a module the graph calls whole (not traced into) is taken to.
    """
    target = node.target
    if node.op == "call_module":  # a module the graph calls whole: its own graph is walked, any other may draw
        return not isinstance(node.graph.owning_module.get_submodule(target), torch.fx.GraphModule)
    if node.op not in ("call_function", "call_method"):
        return False
    if isinstance(target, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded in target.tags
    if isinstance(target, torch._ops.OpOverloadPacket):
        target = target._qualified_op_name.rsplit("::", 1)[-1]
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    seeded = _seeded_aten(name)
    if isinstance(target, types.FunctionType):  # may draw where aten's op does not (F.fractional_max_pool2d's samples)
        return bool(seeded) or bool(_RANDOM.search(name))
    return bool(_RANDOM.search(name)) if seeded is None else seeded


def _check_graph(gm: torch.fx.GraphModule) -> bool:
    """Raises CaptureError for host reads and data-dependent shapes; returns whether the graph draws random
    numbers (:func:`_draws_random`: then each call is seeded from the state's key)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    uses_rng = False
    for module in gm.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            uses_rng = uses_rng or _draws_random(node)
            value = node.meta.get("example_value")
            kind = None
            if node.op in ("call_method", "call_function") and target in _HOST_READS:
                kind = "host sync"
            elif value is not None and free_unbacked_symbols(value):
                kind = "host sync" if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)) else "dynamic shape"
            if kind is not None:
                raise _capture_error(kind, _frames_of(node.meta.get("stack_trace")))
    return uses_rng


# torch's words for a call it would not trace that acts on the world: print, open, a file's write, a warning, a
# logger, a function it keeps out of graphs (torch.save: "should not be traced"), a C function or builtin
_SIDE_EFFECT_TEXT = re.compile(
    r"builtin operator `(print|open|input)`|warnings?\.warn\b|[Ll]ogging|method `(write|writelines|flush|close)` of "
    r"class|should not be traced|Python builtin|C/C\+\+ Python extension|side effect|[Mm]utation"
)
# a host read on the user's line: a method (.item(), .tolist(), .numpy()) or the builtin float/int/bool, not a
# method of that name (out.float(), x.int())
_HOST_READ_CODE = re.compile(r"\.(item|tolist|numpy)\(|(?<![\w.])(float|int|bool)\(")


def _torch_words(err: Exception) -> str:
    """torch's own explanation of ``err``: its hints (generic: "a logging function (e.g. `print`)" follows every
    builtin it cannot trace) and the user's source lines it quotes after "from user code:" left out (a mask named
    `nonzero` on the loss's line would otherwise decide the cause)."""
    text = str(err).split("from user code:", 1)[0]
    return "\n".join(x for x in text.splitlines() if not x.strip().startswith("Hint:"))


def _classify(err: Exception, code: str, frames: list[tuple[str, int]]) -> str:
    text = _torch_words(err)
    # side effects first, whatever the line reads besides (print("shape", out.float().shape))
    if _SIDE_EFFECT_TEXT.search(text) or any(
        _in_stdlib(f) and (f"{os.sep}logging{os.sep}" in f or f.endswith(f"{os.sep}warnings.py")) for f, _ in frames
    ):
        return "side effect"
    if _HOST_READ_CODE.search(code):
        return "host sync"
    if re.search(r"data-dependent|Data-dependent|item\(\)|tolist|__bool__|generic_jump|Tensor\.(item|tolist)", text):
        return "host sync"
    if re.search(r"dynamic shape|DynamicOutputShape|nonzero", text):
        return "dynamic shape"
    if re.search(r"\bprint\(|\blogging\.", code):
        return "side effect"
    return "other"


def _raised_in_step(err: Exception, frames: list[Any]) -> bool:
    """Whether torch reports an exception raised by the step (or by fnlit inside it: "Observed exception"), an
    ``assert`` of the step that failed ("Data-dependent assertion failed", "Assertion failed on symbolic shapes",
    "assert with non-string message", whatever the assert reads), one it could not trace the raising of (an
    exception class's own ``__init__``), or a sparse tensor: the cases the eager run tells apart."""
    text = _torch_words(err)
    innermost = getattr(frames[-1], "name", "") if frames else ""
    raised = re.search(r"[Ee]xception|[Aa]ssert|super\(\)\.__init__|sparse [Tt]ensor", text)
    return bool(raised) or innermost == "__init__"


def _one_key(rng: torch.Tensor) -> torch.Tensor:
    """The key the compiled step seeds from: the state's, or one from an ensemble's stacked keys (as fnlit.ensemble
    seeds its vmapped step eagerly)."""
    if rng.dim() == 0:
        return rng
    from ..ensemble import _fold_keys

    return _fold_keys(rng)


def _reshaped(old: Any, value: Any) -> bool:
    """Whether a donated tensor would be overwritten by a tensor of another shape or dtype."""
    return isinstance(old, torch.Tensor) and isinstance(value, torch.Tensor) and (value.shape != old.shape or value.dtype != old.dtype)


def _hyperparameters(state: Any) -> list[bool]:
    """For each leaf of ``state`` (torch's pytree order), whether it is an optimizer's hyperparameter (in a
    ``hyperparams`` of its opt_state): assigned by the user, it may come back from the step in another shape (a 0-d
    rate in an ensemble's state is one for every member: ``(n,)``), and is then not donated."""
    return [
        bool(path) and getattr(path[0], "name", None) == "opt_state"
        and any(getattr(k, "name", getattr(k, "key", None)) == "hyperparams" for k in path)  # (an attribute or a key)
        for path, _ in torch_pytree.tree_flatten_with_path(state)[0]
    ]


def _check_donatable(state: Any, new: Any) -> None:
    """Raises when a donated state's tensor would be overwritten by one of another shape or dtype (copy_ would
    broadcast or cast it silently). A hyperparameter is not donated then (see _hyperparameters)."""
    hyper = {id(t) for t, h in zip(torch_pytree.tree_leaves(state), _hyperparameters(state)) if h}
    paths, olds, _ = _tree.tree_flatten_with_path(state)
    for path, old, value in zip(paths, olds, _tree.tree_leaves(new)):
        if id(old) not in hyper and _reshaped(old, value):
            raise ValueError(
                f"fnlit.compile(step, donate=True): the step returned state {path} as a {value.dtype} tensor of shape "
                f"{tuple(value.shape)}, but the donated one is {old.dtype} of shape {tuple(old.shape)}. A donated state "
                f"is updated in place, so each tensor keeps its shape and dtype: keep them in the step (e.g. "
                f"new.to(old.dtype), or create the buffer with its final dtype and shape), or compile without donate=True."
            )


_NOT_A_TRAIN_STEP = (
    "fnlit.compile takes a training step `(state, batch) -> (state, metrics)`, but the step returned {got}. An "
    "evaluation step (fnlit.eval_step, returning a dict of metrics) has no state to capture: compile it with "
    "torch.compile(eval_step) (fnlit.evaluate takes the compiled function as it is), or return (state, metrics)."
)


def _check_structure(state: TrainState, new: Any) -> None:
    """Raises the ValueError of the captured function when ``new`` is not structured as ``state``."""
    if torch_pytree.tree_structure(new) == torch_pytree.tree_structure(state):
        return
    where = _tree.first_mismatch(state, new, check_shapes=False) if isinstance(new, type(state)) else None
    if where is None:
        where = (f"got a {type(new).__name__}" if not isinstance(new, type(state)) else
                 "the same keys in another dict order (keep the input's order, e.g. {**state.buffers, 'k': v})")
    raise ValueError(
        f"fnlit.compile: the step returned a state of another structure than it was given: {where}. A captured "
        f"step must return the fields, dict keys and leaves of its input state (the graph is specialized to "
        f"them): create every buffer before training (register it on the module before TrainState.create) "
        f"instead of adding it inside the step."
    )


_KEPT_GUARDS = frozenset({"GLOBAL_STATE", "SHAPE_ENV", "TORCH_FUNCTION_MODE_STACK", "DEFAULT_DEVICE", "TENSOR_MATCH"})


_LEAF_GUARD = re.compile(r"^(L\['leaves'\]|leaves)\[")


def _keep_input_guards(entries: Any) -> list[bool]:
    """Dynamo guards to keep: on the inputs' leaves and global torch state only.

    Without this filter dynamo guards on everything the trace read -- the tree specs, the optimizer's
    closures, the module -- about 1500 guards evaluated on every call. CompiledStep already matches
    each call's tree structure to its compiled function, and, as with jax.jit, Python values the step
    reads (closures, globals, the module's structure) are fixed at the first call. Every guard on a
    leaf stays: tensor metadata and aliasing, and the value and type of a Python number in the batch,
    which the graph holds as a constant (a new value recompiles instead of reusing a stale one).
    """
    return [
        (e.guard_type in _KEPT_GUARDS and not e.is_global) or e.guard_type in ("GLOBAL_STATE", "SHAPE_ENV")
        or bool(_LEAF_GUARD.match(e.name))
        for e in entries
    ]


@torch.library.custom_op("fnlit::snapshot", mutates_args=())
def _snapshot(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` that inductor cannot see through (an op of its own, run as a kernel of its own)."""
    return t.clone()


@_snapshot.register_fake
def _(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t)


# Ops whose result holds its tensor input's values unchanged in memory of its own -- copies, ``x * 1`` and the
# no-ops inductor removes (``remove_noop_ops``): inductor may fold a chain of them into a read of the input. (A view
# shares its input's storage, which is how :func:`_identity_source` follows it, whatever the op.) Dynamo records
# them as methods or as torch / operator functions.
_COPY_OPS = frozenset({"clone", "contiguous", "detach", "alias", "reshape", "flatten", "ravel", "unflatten"})
_CASTS = frozenset({"to", "to_copy", "float", "double", "half", "bfloat16", "type"})  # (if they keep dtype and device)
_LIKE = frozenset({"reshape_as", "type_as"})  # (a copy of the first tensor; the other gives a shape or dtype only)
_BY_ONE = frozenset({"mul", "rmul", "multiply", "div", "truediv", "divide", "true_divide", "pow"})  # x * 1, x ** 1
_BY_ZERO = frozenset({"add", "radd", "sub", "subtract"})  # x + 0, x - 0
_ROUNDING = frozenset({"floor", "ceil", "round", "trunc", "fix"})  # (no-ops on integer tensors)
_OPERATORS: dict[Any, str] = {
    operator.getitem: "getitem", operator.mul: "mul", operator.truediv: "div", operator.add: "add",
    operator.sub: "sub", operator.pos: "pos", operator.pow: "pow", torch.nn.functional.pad: "pad",
    torch._C._nn.pad: "pad",
}


def _op_name(node: torch.fx.Node) -> str | None:
    """The name of ``node``'s op as a tensor method (``torch.clone`` and ``x.clone()`` are both "clone").

    Dunder names lose their underscores (``__mul__`` is "mul"); an in-place op keeps its own (``mul_``).
    """
    if node.op == "call_method":
        name: str | None = str(node.target)
    elif node.op != "call_function":
        return None
    elif node.target in _OPERATORS:
        return _OPERATORS[node.target]
    else:
        name = getattr(node.target, "__name__", None)
        if name is None or node.target not in (getattr(torch, name, None), getattr(torch.Tensor, name, None)):
            return None
    assert name is not None
    return name[2:-2] if len(name) > 4 and name.startswith("__") and name.endswith("__") else name


def _node_storage(node: Any) -> int | None:
    """The storage of ``node``'s (fake) tensor value, if it has one."""
    from torch._inductor.fx_utils import get_storage

    value = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
    return get_storage(value) if isinstance(value, torch.Tensor) and torch._C._has_storage(value) else None


def _flat_ints(args: Any) -> list[Any]:
    """``repeat(1, 1)`` and ``repeat((1, 1))`` alike: the sizes given, flat."""
    return [x for a in args for x in (a if isinstance(a, (list, tuple, torch.Size)) else (a,))]


def _identity_source(node: torch.fx.Node) -> torch.fx.Node | None:
    """The tensor ``node``'s value is an unchanged view or copy of (``x[1]``, ``x.t().clone()``, ``x * 1``), if any.

    A view (or an in-place op's result) shares its input's storage, whatever the op; an item of a split, unbind or
    chunk shares the split tensor's. Copies are followed by name: clones, same-dtype casts, ``x * 1``, ``x + 0``,
    and the no-ops inductor removes (``x ** 1``, ``cat`` or ``stack`` of one tensor, ``repeat`` by ones, padding by
    zeros, rounding an integer tensor). A computed value (``step + 1``, ``p - lr * g``, ``x.exp()``) is no copy of
    its input, and inductor writes it out before the update.
    """
    inputs = node.all_input_nodes
    if node.op == "call_function" and node.target is operator.getitem and inputs:
        if isinstance(inputs[0].meta.get("example_value"), (tuple, list)):  # an item of a split: its input's storage
            inputs = inputs[0].all_input_nodes
    mine = _node_storage(node)
    if mine is not None:
        for source in inputs:
            if _node_storage(source) == mine:
                return source
    name = _op_name(node)
    tensors = [a for a in node.all_input_nodes if isinstance(a.meta.get("example_value"), torch.Tensor)]
    if name is None or (len(tensors) != 1 and name not in _LIKE) or not node.args:
        return None
    first = node.args[0]
    if name in ("cat", "concat", "concatenate", "stack") and isinstance(first, (list, tuple)) and len(first) == 1:
        first = first[0]
    source, value = tensors[0], node.meta.get("example_value")
    if name in _LIKE:
        source = first if isinstance(first, torch.fx.Node) else None
    before = source.meta.get("example_value") if source is not None else None
    if not isinstance(value, torch.Tensor) or not isinstance(before, torch.Tensor):
        return None
    if (value.dtype, value.device) != (before.dtype, before.device):  # a cast: no copy of the values
        return None
    if first is not source:
        return None if name not in ("mul", "rmul", "multiply", "add", "radd") else _by_constant(node, name, source)
    rest, kwargs = node.args[1:], dict(node.kwargs)
    if name in _COPY_OPS or name in _CASTS or name in _LIKE or name in ("getitem", "pos", "positive"):
        return source
    if name in ("cat", "concat", "concatenate", "stack"):
        return source  # (of one tensor: a copy, whatever the dim)
    if name in ("repeat", "tile"):
        sizes = _flat_ints(rest) + _flat_ints(kwargs.values())
        return source if sizes and all(type(s) is int and s == 1 for s in sizes) else None
    if name in ("pad", "constant_pad_nd"):
        pads = _flat_ints(rest[:1]) + _flat_ints([kwargs.get("pad", ())])
        return source if pads and all(type(p) is int and p == 0 for p in pads) else None
    if name in _ROUNDING:
        return source if not rest and not kwargs and not before.is_floating_point() and not before.is_complex() else None
    return _by_constant(node, name, source)


def _by_constant(node: torch.fx.Node, name: str, source: torch.fx.Node) -> torch.fx.Node | None:
    """``source`` if ``node`` is ``source * 1``, ``1 * source``, ``source / 1``, ``source ** 1``, ``source + 0``..."""
    constants = [a for a in node.args if a is not source]
    if len(constants) != 1 or type(constants[0]) not in (int, float, bool) or any(k != "alpha" for k in node.kwargs):
        return None  # (div's rounding_mode is no identity)
    (constant,) = constants
    if (name in _BY_ONE and constant == 1) or (name in _BY_ZERO and constant == 0):
        return source
    return None


def _snapshots(gm: torch.fx.GraphModule) -> None:
    """Keeps a real copy in ``gm`` only for the :func:`_snapshot` values that are, or copy, a view of a donated leaf.

    Inductor (torch 2.14) folds an identity copy -- ``t * 1``, ``t + 0``, ``t.clone()`` -- of a graph input
    that the graph also writes, and then reads the input *after* the write: a metric or kept state that is a
    donated leaf or a view of one (``state.params['w'][0]``, ``.t()``, ``.view(())``, a batch viewing a donated
    buffer), or an identity copy of one (``w[1].clone()``, ``w.clone().T``, ``w[1] * 1``, ``torch.cat([w[1]])``),
    came out as the updated values. Such a value keeps :func:`_snapshot`, an op inductor runs as it is, ordered before the writes; every
    other value (computed ones: most of them) becomes ``t * 1``, which inductor fuses away. Memory is told by the
    fake tensors' storages, which views and detached tensors share; copies are followed back to their source
    through the chain of views and identity ops (:func:`_identity_source`) that made them.
    """
    nodes = list(gm.graph.nodes)
    writes = [n.args[0] for n in nodes if n.op == "call_method" and n.target == "copy_"]  # captured's, into donated leaves
    donated = {_node_storage(n) for n in writes if isinstance(n, torch.fx.Node) and n.op == "placeholder"} - {None}

    def reaches_donated(node: Any) -> bool:
        while isinstance(node, torch.fx.Node):
            if _node_storage(node) in donated:
                return True
            node = _identity_source(node)
        return False

    changed = False
    for node in nodes:
        if node.op == "call_function" and node.target is torch.ops.fnlit.snapshot.default:
            (value,) = node.args
            if not reaches_donated(value):
                node.target = operator.and_ if node.meta["example_value"].dtype == torch.bool else operator.mul
                node.args = (value, True if node.target is operator.and_ else 1)
                changed = True
    if changed:
        gm.recompile()


def _unflattener(spec: Any) -> Callable[[tuple[Any, ...]], Any]:
    """``lambda leaves: torch_pytree.tree_unflatten(leaves, spec)`` as one expression, built once per compiled
    structure: dynamo traces the generic unflatten node by node through its recursion (~0.1-0.3 s of a small
    step's capture), and this in a few lines. Tuples, lists, dicts and named tuples are written out as torch's
    pytree rebuilds them (dicts in the spec's key order, a named tuple by its class); any other node calls its
    registered unflatten function, as torch's pytree does."""
    consts: list[Any] = []
    n = 0

    def const(value: Any) -> str:
        consts.append(value)
        return f"C[{len(consts) - 1}]"

    def build(node: Any) -> str:
        nonlocal n
        if node.is_leaf():
            n += 1
            return f"L[{n - 1}]"
        kids = [build(node.child(i)) for i in range(node.num_children)]
        kind = node.type
        if kind is tuple:
            return "(" + "".join(f"{k}, " for k in kids) + ")"
        if kind is list:
            return "[" + ", ".join(kids) + "]"
        if kind is dict:
            keys = const(list(node.context))
            return "{" + ", ".join(f"{keys}[{i}]: {k}" for i, k in enumerate(kids)) + "}"
        if kind is collections.namedtuple:  # torch's pytree marks every named tuple so; the class is the context
            return f"{const(node.context)}(" + ", ".join(kids) + ")"
        unflatten = const(torch_pytree.SUPPORTED_NODES[kind].unflatten_fn)
        return f"{unflatten}([" + ", ".join(kids) + f"], {const(node.context)})"

    try:
        return _made("unflatten", "L", f"    return {build(spec)}\n", consts)
    except (SyntaxError, RecursionError, MemoryError):  # a tree nested too deep for one expression (~200 levels)
        return lambda leaves: torch_pytree.tree_unflatten(leaves, spec)


def _made(name: str, arg: str, body: str, consts: list[Any]) -> Callable[[Any], Any]:
    """The function ``def name(arg): body`` (code made from a tree's structure), its constants in ``C``."""
    namespace: dict[str, Any] = {"C": consts}
    exec(f"def {name}({arg}):\n{body}", namespace)  # noqa: S102 (code made of a spec only, never of values)
    return namespace[name]


_RESTRUCTURED = "fnlit.compile: the step returned a state of another structure than it was given."


def _flattener(spec: Any) -> Callable[[Any], list[Any]]:
    """``torch_pytree.tree_flatten(tree)[0]`` for a tree of structure ``spec``, raising ValueError for a tree of
    another structure (``tree_flatten(tree)[1] != spec``), as straight-line code made once per compiled structure:
    dynamo traced the generic flatten and the specs' comparison node by node (~13 % of a small step's capture).
    Each node's type is checked as torch's pytree tells it (exactly; a named tuple by its class), a dict's keys in
    order, another registered node's context by its flatten function, and a leaf is a tensor or what
    ``tree_is_leaf`` calls one."""
    consts: list[Any] = []
    lines: list[str] = []
    leaves: list[str] = []
    n = 0
    # (a tensor subclass registered as a node is no leaf: then every leaf takes tree_is_leaf)
    tensor_leaf = not any(isinstance(t, type) and issubclass(t, torch.Tensor) for t in torch_pytree.SUPPORTED_NODES)
    consts += [_RESTRUCTURED, torch.Tensor, torch_pytree.tree_is_leaf]

    def const(value: Any) -> str:
        consts.append(value)
        return f"C[{len(consts) - 1}]"

    def unpack(var: str, count: int) -> list[str]:
        nonlocal n
        names = [f"x{n + i}" for i in range(count)]
        n += count
        if count:
            lines.append(f"{''.join(f'{x}, ' for x in names)}= {var}")
        return names

    def walk(node: Any, var: str) -> None:
        if node.is_leaf():
            check = f"isinstance({var}, C[1]) or C[2]({var})" if tensor_leaf else f"C[2]({var})"
            lines.append(f"if not ({check}): raise ValueError(C[0])")
            leaves.append(var)
            return
        kind, count = node.type, node.num_children
        if kind in (tuple, list):
            lines.append(f"if type({var}) is not {kind.__name__} or len({var}) != {count}: raise ValueError(C[0])")
            kids = unpack(var, count)
        elif kind is dict:
            lines.append(f"if type({var}) is not dict or list({var}) != {const(list(node.context))}: raise ValueError(C[0])")
            kids = unpack(f"{var}.values()", count)
        elif kind is collections.namedtuple:  # the class is the context
            lines.append(f"if type({var}) is not {const(node.context)}: raise ValueError(C[0])")
            kids = unpack(var, count)
        else:  # another registered node: its flatten function gives its children and context
            flatten = const(torch_pytree.SUPPORTED_NODES[kind].flatten_fn)
            lines.append(f"if type({var}) is not {const(kind)}: raise ValueError(C[0])")
            children, context = unpack(f"{flatten}({var})", 2)
            lines.append(f"if {context} != {const(node.context)} or len({children}) != {count}: raise ValueError(C[0])")
            kids = unpack(children, count)
        for i, kid in enumerate(kids):
            walk(node.child(i), kid)

    walk(spec, "tree")
    try:
        return _made("flatten", "tree", "".join(f"    {line}\n" for line in lines) + f"    return [{', '.join(leaves)}]\n", consts)
    except (SyntaxError, RecursionError, MemoryError):  # (as _unflattener)
        return lambda tree: _torch_flatten(tree, spec)


def _torch_flatten(tree: Any, spec: Any) -> list[Any]:
    leaves, got = torch_pytree.tree_flatten(tree)
    if got != spec:
        raise ValueError(_RESTRUCTURED)
    return leaves


class _Entry:
    """One compiled function and the input structure it was compiled for.

    dynamo reads trees with ``torch.utils._pytree`` (its Python flatten takes ~30 us for a TrainState, a
    sixth of a small compiled CPU step and more of a CUDA-graph replay); optree's C++ flatten takes ~9.
    On the first call the two leaf orders of the *state* are matched by identity, so later calls with
    the same optree structure use optree and a permutation. optree orders dict leaves by key whatever
    the insertion order, so the permutation binds every value by its key (fnlit builds the state; its
    dicts' order means nothing). The *batch* is the user's: a step may read ``batch.values()`` in order,
    so it is flattened with torch's pytree, whose structure records the order, and another order is
    another entry. States whose leaves cannot be matched one to one (``None`` leaves, a leaf object
    appearing twice, classes registered with torch's pytree only) keep the torch flatten.
    """

    def __init__(self, spec: Any, compiled: Callable[..., Any], mode: str) -> None:
        self.spec, self.compiled, self.mode = spec, compiled, mode
        self.state_spec, self.batch_spec = spec.child(0), spec.child(1)
        self.linked = False
        self.o_state_spec: Any = None
        self.perm: list[int] | None = None  # torch state leaf i is optree state leaf perm[i]
        self.state_perm: list[int] | None = None  # optree state leaf k is torch state leaf state_perm[k]

    def link(self, state_leaves: list[Any], o_leaves: list[Any], o_state_spec: Any) -> None:
        self.linked = True
        where = {id(x): i for i, x in enumerate(o_leaves)}
        if len(where) != len(o_leaves) or len(state_leaves) != len(o_leaves) or any(id(x) not in where for x in state_leaves):
            return  # no one-to-one match: this structure keeps the torch flatten
        perm = [where[id(x)] for x in state_leaves]
        state_perm = [0] * len(perm)
        for i, j in enumerate(perm):
            state_perm[j] = i
        self.perm, self.o_state_spec, self.state_perm = perm, o_state_spec, state_perm

    def unflatten_state(self, new_leaves: Any) -> TrainState:
        if self.state_perm is None:
            return torch_pytree.tree_unflatten(list(new_leaves), self.state_spec)
        return _tree.tree_unflatten(self.o_state_spec, [new_leaves[i] for i in self.state_perm])


class CompiledStep:
    """A step function captured with :func:`fnlit.compile`; call it like the step.

    Attributes:
        step: the original (eager) step function.
        donate: whether calls consume their input state.
        compiles: how many graphs have been compiled so far (one per distinct input structure, shape
            or dtype; a recompile would show here).

    Example:
        >>> import torch, torch.nn.functional as F, fnlit
        >>> model = torch.nn.Linear(4, 1)
        >>> step = compile(fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1])))
        >>> step.donate, step.compiles  # nothing is captured before the first call
        (False, 0)
        >>> state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
        >>> _ = step(state, (torch.ones(8, 4), torch.zeros(8, 1))); step.compiles  # doctest: +SKIP
        1
    """

    def __init__(self, step: StepFn, *, donate: bool, mode: Mode, dynamic: bool) -> None:
        self.step, self.donate, self.mode, self.dynamic = step, donate, mode, dynamic
        self.__wrapped__ = step  # (the steps inside are walked as through any transform: _frame.wrapped_steps)
        self.compiles = 0
        self._entries: list[_Entry] = []  # one per input structure (shapes are dynamo's to guard)
        # Per thread (threads may share a compiled step): the running call's (state.rng, state.device), and whether
        # its graph started running (set by the donating runner).
        self._calls = threading.local()

    # -- capture -----------------------------------------------------------------------------------
    def _backend(self, options: dict[str, Any], eager: bool) -> Callable[..., Any]:
        # dynamo keeps every backend it is given for the whole process (torch._dynamo.eval_frame.cached_backends,
        # never emptied, torch 2.14): the backend holds this step only weakly, or each compiled step -- and the
        # model its step closes over -- would stay alive until the process ends (a sweep grew by a model a run).
        calls, donate, owner = self._calls, self.donate, weakref.ref(self)

        def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
            uses_rng = _check_graph(gm)
            if donate:
                _snapshots(gm)
            changed = _replayed_side_effects()
            if changed:
                raise CaptureError(_SIDE_EFFECTS.format(sources=", ".join(changed[:4])))
            compiled_step = owner()
            if compiled_step is not None:  # (it compiles inside its own call: alive here)
                compiled_step.compiles += 1
            if eager:
                run = gm.forward
            else:
                from torch._inductor.compile_fx import compile_fx

                run = compile_fx(gm, example_inputs, config_patches=options)
            if uses_rng:  # seeded from the call's key as it runs (a graph compiled in this call too)
                graph = run

                def run(*args: Any) -> Any:
                    key, device = calls.key
                    with _random.seeded(_one_key(key), device):
                        return graph(*args)

            if not donate:
                return run

            def run_donated(*args: Any) -> Any:
                calls.ran = True  # from here on the graph may write the donated state
                return run(*args)

            return run_donated

        return backend

    def _build(self, spec: Any, state: TrainState) -> _Entry:
        device = state.device
        mode = self.mode
        if mode == "auto":  # CUDA graphs need fixed addresses, which donation provides
            mode = "reduce-overhead" if device.type == "cuda" and self.donate else "default"
        if mode == "reduce-overhead" and not (device.type == "cuda" and self.donate):
            raise ValueError(
                f"fnlit.compile(mode='reduce-overhead') replays a CUDA graph, which needs a CUDA state and "
                f"donate=True (the graph updates the state's buffers in place); got a state on {device} and "
                f"donate={self.donate}. Pass donate=True on a CUDA state, or use mode='default'."
            )
        state_spec = spec.child(0)
        n_state, step, donate = state_spec.num_leaves, self.step, self.donate
        hyper = _hyperparameters(state)
        unflatten, flatten = _unflattener(spec), _flattener(state_spec)

        def captured(*leaves: Any) -> tuple[tuple[Any, ...], Any]:
            state, batch = unflatten(leaves)
            result = step(state, batch)
            if not _is_step_result(result, state):  # (the message is _explain's, eager)
                raise TypeError("fnlit.compile: the step did not return (state, metrics).")
            new, metrics = result
            new_leaves = flatten(new)  # (a ValueError for another structure reaches the user through _explain)
            if donate:  # write the new state into the donated one: inductor does it in its kernels
                donated = leaves[:n_state]
                # Tensors only: a Python number (a learning rate assigned as one) has no storage to write, and a
                # hyperparameter the step returns in another shape or dtype (a 0-d rate assigned to an ensemble's
                # state, returned as one per member) does not fit its own; the new state takes the step's value for
                # them (a fresh tensor) as an undonated step would.
                kept = [isinstance(old, torch.Tensor) and not (h and _reshaped(old, v))
                        for old, v, h in zip(donated, new_leaves, hyper)]
                for old, value, k in zip(donated, new_leaves, kept):  # (the message is _explain's, eager)
                    if k and _reshaped(old, value):
                        raise ValueError("fnlit.compile: a donated state tensor changed shape or dtype")
                # Each value is copied before any is written: a value that is (or views, or copies a view of) a
                # donated leaf -- a state keeping last step's params or a row of them, a metric that is an input
                # tensor (amp's loss scale) -- must keep what the step saw, not what is written over it. The backend
                # keeps a real copy only for those (_snapshots); inductor fuses the copy of a computed value away.
                new_leaves = [_snapshot(v) if isinstance(v, torch.Tensor) and v is not old else v
                              for old, v in zip(donated, new_leaves)]
                metrics = torch_pytree.tree_map(lambda m: _snapshot(m) if isinstance(m, torch.Tensor) else m, metrics)
                for old, value, k in zip(donated, new_leaves, kept):
                    if k and old is not value:
                        old.copy_(value)
                new_leaves = [old if k else v for old, v, k in zip(donated, new_leaves, kept)]
            return tuple(new_leaves), metrics

        # A fresh code object per compiled step: dynamo caches (and counts recompiles) per code object.
        code = captured.__code__.replace(co_name=f"fnlit_compiled_{getattr(step, '__name__', 'step')}")
        fn = types.FunctionType(code, captured.__globals__, code.co_name, None, captured.__closure__)
        options = {} if mode in ("default", "eager") else dict(torch._inductor.list_mode_options(mode))
        compiled = torch.compile(fn, fullgraph=True, dynamic=self.dynamic, backend=self._backend(options, mode == "eager"),
                                 options={"guard_filter_fn": _keep_input_guards})
        entry = _Entry(spec, compiled, mode)
        self._entries.append(entry)
        return entry

    def _leaves(self, state: TrainState, batch: Batch) -> tuple[list[Any], _Entry]:
        """The leaves in the compiled function's order, and its entry (built on a first call)."""
        o_leaves, o_state_spec = _tree.tree_flatten(state)
        batch_leaves, batch_spec = torch_pytree.tree_flatten(batch)
        for entry in self._entries:  # the fast path: optree's C++ flatten, then a fixed permutation
            if entry.perm is not None and entry.o_state_spec == o_state_spec and entry.batch_spec == batch_spec:
                return [o_leaves[i] for i in entry.perm] + batch_leaves, entry
        state_leaves, state_spec = torch_pytree.tree_flatten(state)
        spec = torch_pytree.TreeSpec(tuple, None, [state_spec, batch_spec])
        entry = next((e for e in self._entries if e.spec == spec), None)
        if entry is None:
            _check_supported(self.step)
            entry = self._build(spec, state)
        if not entry.linked:
            entry.link(state_leaves, o_leaves, o_state_spec)
        return state_leaves + batch_leaves, entry

    # -- call --------------------------------------------------------------------------------------
    def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        require_state(state, "fnlit.compile")
        if _current_frame() is not None:
            raise ValueError(_OUTSIDE)
        if torch._C._functorch.maybe_current_level() is not None:  # fnlit.ensemble's (or another) vmap around it
            raise ValueError(_OUTSIDE_VMAP)
        if _DONATED.get() is not None:  # fnlit.donating around it (directly, or through a function calling it)
            raise ValueError(_INSIDE_DONATING)
        check_not_donated(state)
        returned = getattr(self._calls, "returned", None)  # a weak reference: never keeps a state alive
        if self.donate and (returned is None or returned() is not state):  # (our own output: checked already)
            _check_unaliased(state)
        self._calls.ran = False
        try:
            new, metrics = self._call(state, batch)
            if self.donate:
                self._calls.returned = _weak(new)
            return new, metrics
        except BaseException:
            # The graph writes the donated state as it runs: once it has started, a failure (or a Ctrl-C)
            # leaves that state partly written. An error while capturing or compiling leaves it intact.
            if self.donate and self._calls.ran:
                poison(state, "fnlit.compile(step, donate=True)", RAISED)
            raise

    def _call(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        leaves, entry = self._leaves(state, batch)
        state_spec, compiled, mode = entry.state_spec, entry.compiled, entry.mode
        cudagraphs = mode == "reduce-overhead"
        if cudagraphs:
            for t in leaves[: state_spec.num_leaves]:
                if t.is_cuda:
                    torch._dynamo.mark_static_address(t)
            torch.compiler.cudagraph_mark_step_begin()
        # dynamic=True: dynamo would lift the step's Python floats (an optimizer's betas, momentum) to graph
        # inputs read back with .item(); kept constants, as without dynamic, they compile and never change. And its
        # duck sizing would give a batch dimension equal to a parameter's (a batch of 8 into nn.Linear(8, 16)) that
        # dimension's symbol, guarded equal: the next batch size would compile again. Each dimension its own symbol.
        floats = _dynamic_config() if self.dynamic else nullcontext()
        try:
            self._calls.key = (state.rng, state.device)  # for the graphs that draw random numbers (see _backend)
            # torch.compile(fullgraph=True) checks after each call that a compiled frame ran, by a count that is one for
            # the whole process (torch 2.14): two threads' calls reset each other's count, and a call that ran is
            # reported as "found no compiled frames" (its result lost; with donation, its state written). One compiled
            # call at a time, under fnlit.random's lock: a graph that draws random numbers takes that one inside
            # (seeded), and a call inside `with fnlit.random.seeded(k):` holds it already, so a lock of our own taken
            # around the call would be taken in the other order there (two threads waited on each other for good).
            # Re-entrant, as a seeded block is.
            with floats, _random._LOCK, _saved_tensor_hooks_kept():
                new_leaves, metrics = compiled(*leaves)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            inner = getattr(e, "inner_exception", None)
            if _SAVED_TENSOR_HOOKS in str(e):  # inductor traces the forward and meets the checkpoint then
                raise _capture_error("checkpoint", _frames_of(str(e))) from None
            raise (inner if isinstance(inner, CaptureError) else e) from None
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as e:
            raise self._explain(e, state, batch) from None
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            raise CaptureError(_RECOMPILES.format(limit=torch._dynamo.config.recompile_limit)) from None
        except RuntimeError as e:
            if _SAVED_TENSOR_HOOKS not in str(e):
                raise
            raise _capture_error("checkpoint", _checkpoint_frames(e)) from None  # mode="eager": raised as the graph runs
        finally:
            self._calls.key = None
        if self.donate:
            poison(state, "fnlit.compile(step, donate=True)")
        if cudagraphs:  # metrics live in the graph's memory pool, which the next replay overwrites
            metrics = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        return entry.unflatten_state(new_leaves), metrics

    def _explain(self, err: Exception, state: TrainState, batch: Batch) -> Exception:
        """A CaptureError for ``err``; an error of the step itself is re-raised as eager mode raises it.

        Where torch reports an exception (one it saw the step raise, an ``assert`` of the step that failed, or one it
        could not trace the raising of: an exception class with its own ``__init__``, fnlit's or the user's) or a
        sparse tensor, the step runs once eagerly to tell them apart (seeded from the state's key, as the compiled
        call is; the step is pure and the state is not donated to it, so neither changes): an error it raises is the
        step's own and reaches the user as it is. Only when the step runs eagerly is ``err`` the capture's, explained
        here. Any other failure -- a Python side effect (a print, a log, a file written, torch.save), a host sync, a
        call torch cannot trace -- is explained without that run, which would carry the side effect out.
        """
        stack = list(getattr(err, "real_stack", None) or [])
        frames = [(f.filename, f.lineno or 0) for f in stack] or _frames_of(str(err))
        filename, lineno = _user_frame(frames)
        kind = _classify(err, linecache.getline(filename, lineno), frames)
        if kind != "side effect" and _raised_in_step(err, stack):
            from ..functional import _SPARSE_SEEN, sparse_refused

            # torch.compile refused a sparse tensor: the eager run notes which sparse embeddings' weights it differentiates
            sparse: list[str] = []
            token = _SPARSE_SEEN.set(sparse if re.search(r"sparse tensor", str(err), re.IGNORECASE) else None)
            try:
                with _random.seeded(_one_key(state.rng), state.device):  # (leaves the caller's generators as they were)
                    result = self.step(state, batch)  # the step itself raises: let the user see its own error
            finally:
                _SPARSE_SEEN.reset(token)
            if sparse:
                return CaptureError(sparse_refused(
                    "fnlit.compile", " (torch.compile cannot trace sparse tensors)", sparse,
                    ", or run the step uncompiled: fnlit.optim steps the same on the dense gradient",
                ))
            if not _is_step_result(result, state):
                return TypeError(_NOT_A_TRAIN_STEP.format(got=_describe(result, state)))
            new = result[0]
            _check_structure(state, new)  # or fnlit's own checks in the captured function do
            if self.donate:
                _check_donatable(state, new)
        lines = str(err).strip().splitlines()
        explanation = next((x.strip() for x in lines if x.strip().startswith("Explanation:")), lines[0] if lines else "")
        detail = explanation.removeprefix("Explanation: ")
        raised = re.search(r"raised exception (\w+\(.*\))\s*$", str(err), re.MULTILINE)
        if raised is not None:  # an error raised only when traced (dp_sgd_aggregate's): its own words
            detail = f"{detail} The step raised, when traced: {raised.group(1)}"
        return _capture_error(kind, frames, detail)

    def __repr__(self) -> str:
        return f"CompiledStep({getattr(self.step, '__name__', self.step)!r}, donate={self.donate}, mode={self.mode!r}, compiles={self.compiles})"


def _weak(state: Any) -> Callable[[], Any] | None:
    """A weak reference to ``state``, or None for a type that takes none (then every call checks it)."""
    try:
        return weakref.ref(state)
    except TypeError:
        return None


def _check_unaliased(state: TrainState) -> None:
    """Refuses a state whose tensors overlap in memory: a donated step writes each new value into its input's
    bytes, so two fields sharing some would both end up with the last value written. Disjoint views of one
    storage are fine; tensor subclasses (DTensor) and sparse tensors are not checked."""
    from ..functional import _byte_range

    paths, leaves, _ = _tree.tree_flatten_with_path(state)
    spans: dict[int, list[tuple[int, int, str]]] = {}  # storage -> the byte ranges seen on it, with their paths
    for path, t in zip(paths, leaves):
        ptr = _storage.address(t) if isinstance(t, torch.Tensor) and t.numel() else 0
        if not ptr:  # no plain storage (a DTensor, a sparse or empty tensor): nothing to overlap
            continue
        lo, hi = _byte_range(t)
        other = next((q for a, b, q in spans.get(ptr, ()) if a < hi and lo < b), None)
        if other is not None:
            raise ValueError(
                f"fnlit.compile(step, donate=True) got a state whose {other} and {path} share storage "
                "(one tensor, or overlapping views of one): the step writes each new value into its input's "
                "storage, so both would end up holding the same values. Give each its own copy (e.g. .clone() "
                "one of them), or compile without donate=True."
            )
        spans.setdefault(ptr, []).append((lo, hi, path))


_DATA_PARALLEL = (
    "fnlit.compile cannot capture a step that contains fnlit.data_parallel: its gradient all-reduce runs "
    "inside apply_gradients, and torch.compile does not capture collectives on gloo (CPU) process "
    "groups. Run data_parallel(step) uncompiled (it already does one bucketed all-reduce per update)."
)

_SHARD = (
    "fnlit.compile cannot capture a step that contains fnlit.shard: torch.compile does not trace its collectives "
    "and DTensors. Run shard(step) uncompiled."
)

_OUTSIDE = (
    "fnlit.compile must be the outermost transform: a transform around a compiled step (fnlit.accumulate, "
    "fnlit.amp, ...) cannot reach inside its graph, which would apply every micro-batch's update or run in float32. "
    "Put the transforms inside: fnlit.compile(fnlit.accumulate(fnlit.amp(step), k)). fnlit.data_parallel and "
    "fnlit.shard do not compile, around the compiled step or inside it: run the step uncompiled under them."
)


_OUTSIDE_VMAP = (
    "fnlit.compile must be the outermost transform, but this compiled step runs under torch.func (fnlit.ensemble's "
    "vmap, or another vmap or grad), which cannot trace into its graph. Compile the ensemble instead: "
    "fnlit.compile(fnlit.ensemble(step, n)), or fnlit.ensemble(step, n, compile=True)."
)


_INSIDE_DONATING = (
    "fnlit.compile must be the outermost transform, but this compiled step was called inside fnlit.donating: the "
    "compiled graph never updates its input in place, so donating(compile(step)) would donate nothing and still mark "
    "the input state as used up. Let the compiled step donate: fnlit.compile(step, donate=True)."
)


_DONATING = (
    "fnlit.compile got a step wrapped in fnlit.donating, whose in-place update does not survive capture "
    "(the compiled step would neither update in place nor mark the input state as donated). Use "
    "fnlit.compile(step, donate=True) instead of fnlit.compile(fnlit.donating(step))."
)


_TWICE = (
    "fnlit.compile got a step that is already compiled (a CompiledStep inside it): torch.compile cannot trace into "
    "another compiled step's graph. Compile once, outermost, around the uncompiled step (a CompiledStep keeps it "
    "as .step): fnlit.compile(fnlit.accumulate(step, k)), not fnlit.compile(fnlit.accumulate(fnlit.compile(step), k))."
)


def _check_supported(step: Any) -> None:
    """Raises when a transform that cannot be captured wraps (or is wrapped in) the step."""
    for inner in wrapped_steps(step):
        if isinstance(inner, CompiledStep):
            raise ValueError(_TWICE)
        collective = getattr(inner, "collective", None)  # (refused before it runs: traced, it ran one step eagerly)
        if collective == "fnlit.data_parallel":
            raise NotImplementedError(_DATA_PARALLEL)
        if collective == "fnlit.shard":
            raise NotImplementedError(_SHARD)
        if getattr(inner, "__name__", "") == "donating_step":
            raise ValueError(_DONATING)


def compile(
    step: StepFn, *, donate: bool = False, mode: Mode = "auto", dynamic: bool = False
) -> CompiledStep:
    """Captures a whole step -- forward, backward, optimizer and every transform inside -- and replays it.

    The first call traces and compiles (seconds to a minute); later calls with the same structure,
    shapes and dtypes replay the compiled program. Results equal the eager step's up to float
    rounding of fused kernels (within 1e-5 in float32; under ``amp`` with bfloat16, inductor rounds
    its fused bf16 kernels its own way: ~1e-4 after a few steps), except random draws (dropout's masks, RReLU's
    slopes), which come from inductor's own generator (seeded from ``state.rng`` on every call of a graph with an op
    aten tags ``nondeterministic_seeded``, so still deterministic) and need not equal eager's (on the CPU, one
    forward's masks were measured equal to eager's; not a promise, and not on CUDA). The step's random draws are one stream per
    call: the keys it passes to :func:`fnlit.apply` are not read, so two forwards given the same key draw
    different masks (eager, the same: a consistency loss or a recomputed forward must run uncompiled). Changing hyperparameters in
    ``state.opt_state`` or stepping through a learning-rate schedule never recompiles: they are tensors.
    A Python number in the batch is a constant of the graph: each new value compiles a graph (pass a
    0-d tensor for a value that changes); with ``dynamic=True`` a Python int is a symbol of the graph instead, and
    its values share one graph (a Python ``if`` on it compiles one per side; a float stays a constant). A batch
    dict in another key order is another structure.
    As with ``jax.jit``, the Python the step reads is fixed at the first call: the module's structure
    and its submodules' training flags (``model[2] = new_head`` or ``model[1].eval()`` afterwards is not
    seen by the compiled step; compile the changed step anew), closures and globals. A step that changes a
    list outside itself (appends to a list or deque) raises :class:`CaptureError`: the change would be
    replayed from the capture. Attributes it sets on objects and dict entries are replayed with each call's
    values but from the capture's keys and arithmetic, so a counter kept there (``self.n += 1``, a global,
    ``d["n"] += 1``) stays at its first value and a dict given a new key each call (``d[len(d)] = loss``) keeps
    only the first: return such values as metrics instead.

    Args:
        step: a step function ``(state, batch) -> (state, metrics)``, with any of
            :func:`fnlit.accumulate` and :func:`fnlit.amp` inside it (compile is the outermost transform:
            one around it raises ValueError, :func:`fnlit.donating` too: pass ``donate=True`` instead;
            so does a step that holds a compiled step: compile once).
        donate: let the step write the new state into the input state's storage (as ``jax.jit``'s
            ``donate_argnums``): no second copy of params and optimizer state. The input state is
            poisoned afterwards (any use raises). Its tensors must not share storage (an EMA buffer started
            from the params without ``.clone()``): that is refused. A Python number in it (a learning rate assigned
            as one), or a hyperparameter the step returns in another shape (a 0-d rate assigned to an ensemble's
            state), is not donated: the new state holds the step's value for it. On CUDA it enables CUDA-graph replay.
            If a call fails (or is interrupted) once its graph has started running, the input state may be
            partly written: it is poisoned too, and the exception propagates; an error while capturing
            leaves it intact.
        mode: ``"auto"`` (CUDA graphs on a donated CUDA state, else inductor), ``"default"``,
            ``"reduce-overhead"`` (CUDA graphs; needs ``donate=True``), ``"max-autotune"``,
            ``"max-autotune-no-cudagraphs"``, or ``"eager"`` (capture and check only, no inductor:
            quick to find what breaks capture).
        dynamic: let shapes vary without recompiling (off: a new batch shape compiles a new graph). Each
            dimension varies on its own, a batch size equal to a parameter's dimension included (torch's duck
            sizing, off here, would tie them and compile again at the next batch size); torch still compiles a
            graph of its own for a dimension of size 0 or 1.

    Returns:
        A :class:`CompiledStep`; ``.compiles`` counts the graphs compiled so far.

    Raises:
        ValueError: for an unknown ``mode``, or ``"reduce-overhead"`` without a donated CUDA state; (when
            called with ``donate=True``) for a state whose tensors share storage; (when called) for a step
            holding a compiled step.
        CaptureError: (when called) if the step cannot be captured; the message names the line (for a sparse
            gradient, ``nn.Embedding(sparse=True)``'s, which torch.compile cannot trace: the parameter). (Where torch
            reports an exception or a failed ``assert``, the step runs once eagerly -- never for a Python side
            effect (a print, a log, a file written, torch.save), which that run would carry out: an error it raises
            itself -- accumulate's indivisible batch, an ``assert`` -- is raised as uncompiled, not as a
            CaptureError.) Also for activation checkpointing (``torch.utils.checkpoint``) inside
            :func:`fnlit.value_and_grad`: compiled, torch.func takes the gradient, and it has no support for the
            checkpoint's saved tensor hooks (run such a step uncompiled). Also when new batch shapes or Python numbers would compile more graphs than
            ``torch._dynamo.config.recompile_limit`` (8) allows.
        NotImplementedError: (when called) for a step containing :func:`fnlit.data_parallel` or :func:`fnlit.shard`.
        TypeError: (when called) for a step that does not return ``(state, metrics)``: an evaluation step
            (:func:`fnlit.eval_step`) is compiled with ``torch.compile(eval_step)`` instead.

    Example:
        >>> import torch, torch.nn.functional as F, fnlit
        >>> from fnlit.transforms.compile import compile
        >>> model = torch.nn.Linear(4, 1)
        >>> step = compile(fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1])))
        >>> state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-3), seed=0)
        >>> state, metrics = step(state, (torch.randn(8, 4), torch.randn(8, 1)))  # doctest: +SKIP
    """
    if mode not in _MODES:
        raise ValueError(f"fnlit.compile expected mode in {_MODES}, got {mode!r} instead.")
    require_step(step, "fnlit.compile")
    return CompiledStep(step, donate=donate, mode=mode, dynamic=dynamic)
