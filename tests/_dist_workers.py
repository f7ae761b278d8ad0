"""Functions run in several processes by tests/test_data_parallel.py (module level: spawn pickles them)."""

import itertools
import os
from decimal import Decimal
from typing import NamedTuple

import torch
import torch.distributed as dist
from helpers import batch, hand_step, mlp

import fnlit

GLOBAL_BATCH = 16


def make_state(fp16: bool = False):
    torch.manual_seed(0)
    model = mlp()
    tx = fnlit.optim.chain(fnlit.optim.clip_by_global_norm(1.0), fnlit.optim.adamw(1e-2))
    return model, fnlit.TrainState.create(model, tx, seed=0, loss_scale="dynamic" if fp16 else None)


def local(data, rank, world):
    n = GLOBAL_BATCH // world
    return tuple(t[rank * n : (rank + 1) * n] for t in data)


class CountingAllReduce:
    """Wraps dist.all_reduce to count calls and the number of values each one carries."""

    def __init__(self):
        self.sizes = []  # the floating-point ones: gradients, metrics
        self.integer = []  # (index among all calls, numel): data_parallel's check that the ranks' states agree
        self._orig = dist.all_reduce

    def __call__(self, tensor, *args, **kwargs):
        if tensor.is_floating_point():
            self.sizes.append(tensor.numel())
        else:
            self.integer.append((len(self.sizes) + len(self.integer), tensor.numel()))
        return self._orig(tensor, *args, **kwargs)


def equivalence(steps: int, ks: tuple[int, ...]):
    """One launch, several runs: k=1 (plain data_parallel) and accumulate(data_parallel(step), k)."""
    return {k: _equivalence(steps, k) for k in ks}


def _equivalence(steps: int, k: int):
    rank, world = dist.get_rank(), dist.get_world_size()
    model, state = make_state()
    fnlit.distributed.check_same_state(state)  # a loop of one's own: once, before the first step
    counter = CountingAllReduce()
    dist.all_reduce = counter
    try:
        inner = hand_step(model)
        step = fnlit.accumulate(fnlit.data_parallel(inner), k) if k > 1 else fnlit.data_parallel(inner)
        history, losses = [], []
        for i in range(steps):
            state, metrics = step(state, local(batch(GLOBAL_BATCH, seed=i), rank, world))
            history.append({n: p.clone() for n, p in state.params.items()})
            losses.append(float(metrics["loss"]))
    finally:
        dist.all_reduce = fnlit.distributed.dist.all_reduce = counter._orig
    return {"history": history, "losses": losses, "sizes": counter.sizes, "integer": counter.integer, "step": int(state.step)}


ORDERS = list(itertools.permutations(["accumulate", "amp", "data_parallel"]))


def wrap(step, order):
    for name in reversed(order):  # order[0] is the outermost transform
        if name == "accumulate":
            step = fnlit.accumulate(step, 2)
        elif name == "amp":
            step = fnlit.amp(step, dtype=torch.float16)
        else:
            step = fnlit.data_parallel(step)
    return step


def all_orders(steps: int):
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for order in ORDERS:
        model, state = make_state(fp16=True)
        fnlit.distributed.check_same_state(state)
        step = wrap(hand_step(model), order)
        for i in range(steps):
            state, _ = step(state, local(batch(GLOBAL_BATCH, seed=i), rank, world))
        out["/".join(order)] = {n: p.clone() for n, p in state.params.items()}
    return out


def dies_early():
    if dist.get_rank() == 1:
        os._exit(3)
    t = torch.ones(4)
    dist.all_reduce(t)  # rank 1 never joins: this must fail, not hang
    return t.sum().item()


def reused_buffers():
    """all_reduce_mean_(reuse=True) against hand means; a result still held is never overwritten."""
    from fnlit.transforms.data_parallel import all_reduce_mean_

    r = dist.get_rank()
    first = all_reduce_mean_([torch.full((3,), r + 1.0), torch.full((2, 2), 10.0 * r)], reuse=True)
    second = all_reduce_mean_([torch.full((3,), 2.0 * r), torch.full((2, 2), 4.0)], reuse=True)
    ptr = second[0].data_ptr()
    del second
    third = all_reduce_mean_([torch.full((3,), 7.0), torch.full((2, 2), 1.0 * r)], reuse=True)
    return {
        "first": first, "third": third,  # first is read after the later calls: still its own values
        "distinct": first[0].data_ptr() != ptr, "reused": third[0].data_ptr() == ptr,
    }


def orders_with_dropout_and_batchnorm(steps: int):
    """The six orders on a model with dropout and BatchNorm: params and buffers per order."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for order in ORDERS:
        torch.manual_seed(0)
        model = mlp(dropout=0.3, bn=True)
        state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0, loss_scale="dynamic")
        step = wrap(hand_step(model), order)
        for i in range(steps):
            state, _ = step(state, local(batch(GLOBAL_BATCH, seed=i), rank, world))
        out["/".join(order)] = ({n: p.clone() for n, p in state.params.items()}, dict(state.buffers))
    return out


def batchnorm_statistics_and_metrics():
    """One accumulate(data_parallel(step), 2) step on a BatchNorm model, with its reference statistics (a
    torch copy of the model run on this rank's two micro-batches, averaged across ranks by hand), and
    vector and nested tensor metrics under data_parallel with their hand-averaged reference."""
    import copy

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = mlp(bn=True)
    reference = copy.deepcopy(model).train()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    x, y = local(batch(GLOBAL_BATCH, seed=0), rank, world)
    new, _ = fnlit.accumulate(fnlit.data_parallel(hand_step(model)), 2)((state), (x, y))
    with torch.no_grad():
        for xm in x.chunk(2):
            reference(xm)
    want = {n: b.detach().clone() for n, b in reference.named_buffers() if b.is_floating_point()}
    for b in want.values():
        dist.all_reduce(b)
        b /= world

    def with_metrics(state, b):
        state, metrics = hand_step(model)(state, b)
        scores = torch.arange(3.0) * (rank + 1)
        return state, {**metrics, "per_class": scores, "parts": {"a": scores.sum(), "b": [scores[0]]}}

    _, metrics = fnlit.data_parallel(with_metrics)(state, (x, y))
    scores = torch.arange(3.0) * (rank + 1)
    hand = torch.cat([scores, scores.sum().reshape(1)])
    dist.all_reduce(hand)
    return {"buffers": dict(new.buffers), "want": want, "metrics": metrics, "hand": hand / world}


def early_stopping_fit(distributed: bool = True, directory: str | None = None):
    """fit under data_parallel with EarlyStopping on a validation loss that never improves: the step at
    which the run stops, the steps it validated at, and (with ``directory``, a Checkpointer's folder) the
    step of its best_path on this rank. With ``distributed=False``, one process on the global batch (the
    reference)."""
    from fnlit.callbacks import EarlyStopping
    from fnlit.data import ArrayLoader

    model, state = make_state()
    data = batch(64, seed=0)
    train = ArrayLoader(*data, batch_size=GLOBAL_BATCH)  # under torch.distributed each rank takes its shard
    seen = []

    def eval_step(state, b):
        seen.append(int(state.step))
        return {"loss": torch.tensor(1.0)}  # never improves: patience 1 stops at the second validation

    step = fnlit.data_parallel(hand_step(model)) if distributed else hand_step(model)
    ck = fnlit.checkpoint.Checkpointer(directory, monitor="val/loss") if directory else None
    out = fnlit.fit(step, state, train, val_data=[data], eval_step=eval_step, max_epochs=10, num_sanity_val_steps=0,
                    callbacks=[EarlyStopping("val/loss", patience=1)], checkpoint=ck, progress=False)  # fmt: skip
    best = fnlit.checkpoint.read_info(ck.best_path).step if ck is not None and ck.best_path is not None else None
    return {"step": int(out.step), "validated_at": seen, "best": best}


def best_path_read_during_fit(directory: str):
    """fit under data_parallel with a Checkpointer on a scripted validation loss, and a callback that reads its
    best_path at the start and at every validation (before that validation's save): (step, best file's name) at
    each validation, the (step, loss) validations and the best file's name after the run, on this rank."""
    from fnlit.data import ArrayLoader

    model, state = make_state()
    data = batch(64, seed=0)
    ck = fnlit.checkpoint.Checkpointer(directory, monitor="val/loss")
    name = lambda p: None if p is None else os.path.basename(p)  # noqa: E731

    class ReadsBest:
        def __init__(self):
            self.seen, self.validations = [], []

        def on_fit_start(self, state, plan):
            self.seen.append((int(state.step), name(ck.best_path)))

        def on_validation(self, state, metrics):
            self.seen.append((int(state.step), name(ck.best_path)))
            self.validations.append((int(state.step), float(metrics["val/loss"])))

    def eval_step(state, b):  # best at the second validation, worse after it
        return {"loss": (state.step.to(torch.float32) - 4).abs() + 0.5}

    reader = ReadsBest()
    fnlit.fit(fnlit.data_parallel(hand_step(model)), state, ArrayLoader(*data, batch_size=GLOBAL_BATCH), val_data=[data],
              eval_step=eval_step, max_epochs=5, num_sanity_val_steps=0, callbacks=[reader], checkpoint=ck, progress=False)  # fmt: skip
    dist.barrier()
    return {"seen": reader.seen, "validations": reader.validations, "best": name(ck.best_path)}


def best_path_after_resuming_a_branch(directory: str):
    """fit under data_parallel for 10 epochs (2 steps each) keeping every validation's checkpoint, then a fit resumed
    from the step-8 file to 8 epochs, with a scripted validation loss per fit and a callback that reads best_path
    during the resumed fit only at its second validation (after rank 0's first save of it): (step, best file's name)
    at that read, and the best file's name after the resumed fit, on this rank."""
    from fnlit.data import ArrayLoader

    data = batch(64, seed=0)
    name = lambda p: None if p is None else os.path.basename(p)  # noqa: E731
    seen = []
    resumed = False

    class ReadsBest:
        def on_validation(self, state, metrics):
            if resumed and int(state.step) == 16:
                seen.append((int(state.step), name(ck.best_path)))

    def eval_step(state, b):  # first fit: lower at every step (step 20 best); resumed fit: lowest at step 12
        step = state.step.to(torch.float32)
        return {"loss": 50 + (step - 12).abs() if resumed else 100 - step}

    for epochs, ckpt_path in ((10, None), (8, os.path.join(directory, "step=00000008.ckpt"))):
        model, state = make_state()
        ck = fnlit.checkpoint.Checkpointer(directory, monitor="val/loss", keep_best=None)
        fnlit.fit(fnlit.data_parallel(hand_step(model)), state, ArrayLoader(*data, batch_size=GLOBAL_BATCH),
                  val_data=[data], eval_step=eval_step, max_epochs=epochs, num_sanity_val_steps=0, callbacks=[ReadsBest()],
                  checkpoint=ck, ckpt_path=ckpt_path, progress=False)  # fmt: skip
        dist.barrier()
        resumed = True
    return {"seen": seen, "best": name(ck.best_path)}


def stop_from_on_log(distributed: bool = True):
    """fit (4 steps an epoch, a log row every 5 steps) whose callback raises StopTraining from on_log, on the last
    rank only: the step the run stops at and the steps it validated at. With ``distributed=False``, one process on
    the global batch (the reference)."""
    from fnlit.callbacks import StopTraining
    from fnlit.data import ArrayLoader

    world = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    model, state = make_state()
    data = batch(64, seed=0)
    validated = []

    class StopAtLog:
        def on_log(self, state):
            if rank == world - 1:
                raise StopTraining("stop at this log interval")
            return {}

        def on_validation(self, state, metrics):
            validated.append(int(state.step))

    step = fnlit.data_parallel(hand_step(model)) if distributed else hand_step(model)
    out = fnlit.fit(step, state, ArrayLoader(*data, batch_size=GLOBAL_BATCH // world), val_data=[data],
                    eval_step=lambda s, b: {"loss": torch.tensor(1.0)}, max_epochs=3, log_every_n_steps=5,
                    num_sanity_val_steps=0, callbacks=[StopAtLog()], progress=False)  # fmt: skip
    return {"step": int(out.step), "validated_at": validated}


def evaluate_every_example():
    """evaluate over an ArrayLoader of 33 examples (one more than the ranks share evenly)."""
    x = torch.arange(33, dtype=torch.float32)
    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    ev = lambda s, b: {"x": b.mean(), "sq": (b**2).mean()}  # noqa: E731
    loader = fnlit.ArrayLoader(x, batch_size=4, shuffle=True)
    counted = sum(counts for _, counts in loader.eval_batches())
    # A sharded model (each forward all-gathers its params): ranks must run as many batches, fillers included.
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    sharded = fnlit.shard_state(fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0))
    mse = fnlit.eval_step(model, lambda m, b: {"mse": (m(b.unsqueeze(1)) ** 2).mean()})
    return fnlit.evaluate(ev, state, loader), loader.eval_len(), counted, fnlit.evaluate(mse, sharded, loader)["mse"]


def evaluate_by_batches(cases):
    """evaluate (and fit's validation) of the mean of ArrayLoader(arange(n), batch_size=b, drop_last=...) per case."""
    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    ev = lambda s, b: {"x": b.mean()}  # noqa: E731
    out = []
    for n, b, drop_last in cases:
        loader = fnlit.ArrayLoader(torch.arange(float(n), dtype=torch.float64), batch_size=b, drop_last=drop_last)
        out.append(fnlit.evaluate(ev, state, loader))
    seen = {}

    class Keep:
        def on_validation(self, state, metrics):
            seen.update(metrics)

    train = fnlit.ArrayLoader(torch.zeros(4, 1), batch_size=2)
    val = fnlit.ArrayLoader(torch.arange(12.0, dtype=torch.float64), batch_size=4, drop_last=True)
    fnlit.fit(lambda s, b: (s.replace(step=s.step + 1), {}), state, train, max_epochs=1, val_data=val, eval_step=ev,
              num_sanity_val_steps=0, callbacks=[Keep()], progress=False)  # fmt: skip
    return out, seen


def fit_on_too_few_examples(n: int, drop_last: bool):
    """fit over an ArrayLoader of n examples in batches of 4: its error, if it raises."""
    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    data = fnlit.ArrayLoader(torch.zeros(n, 1), batch_size=4, drop_last=drop_last)
    try:
        fnlit.fit(lambda s, b: (s.replace(step=s.step + 1), {}), state, data, max_epochs=1, progress=False)
    except ValueError as e:
        return str(e)
    return None


def uneven_batches():
    """fit where rank 0 has 5 batches an epoch and rank 1 has 4 (plain lists: nothing shards them)."""
    model = torch.nn.Linear(4, 1)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    step = fnlit.data_parallel(fnlit.train_step(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])))
    data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(5 - dist.get_rank())]
    try:
        fnlit.fit(step, state, data, max_epochs=2, progress=False)
    except ValueError as e:
        return str(e)
    return "no error"


def fit_validation_every_example():
    """fit's validation over an ArrayLoader of 33 examples, for several limit_val_batches."""
    seen = {}

    class Keep:
        def on_validation(self, state, metrics):
            seen[limit] = metrics["val/x"]

    val = fnlit.ArrayLoader(torch.arange(33, dtype=torch.float32), batch_size=4)
    train = fnlit.ArrayLoader(torch.zeros(4, 1), batch_size=2)
    for limit in (None, 1.0, 100):
        state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
        fnlit.fit(lambda s, b: (s.replace(step=s.step + 1), {}), state, train, max_epochs=1, val_data=val,
                  eval_step=lambda s, b: {"x": b.mean()}, limit_val_batches=limit, num_sanity_val_steps=0,
                  callbacks=[Keep()], progress=False)  # fmt: skip
    return seen


def exits_quietly():
    """Rank 1 leaves without a result or an error (os._exit(0)); rank 0 returns."""
    if dist.get_rank() == 1:
        os._exit(0)
    return "rank 0 done"


def signal_after_the_last_vote(directory: str):
    """fit with a Checkpointer(save_last=False); rank 1 gets SIGTERM in on_fit_end, after the last vote."""
    import signal

    from fnlit.checkpoint import Checkpointer

    class TermOn1:
        def on_fit_end(self, state, metrics):
            if dist.get_rank() == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    torch.manual_seed(0)  # every rank the same initial params (data_parallel checks)
    model, state = torch.nn.Linear(4, 1), None
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    step = fnlit.data_parallel(fnlit.train_step(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])))
    data = fnlit.ArrayLoader(torch.randn(64, 4), torch.randn(64, 1), batch_size=8)
    ck = Checkpointer(directory, save_last=False)
    out = fnlit.fit(step, state, data, max_steps=4, callbacks=[TermOn1()], checkpoint=ck, progress=False)
    return int(out.step), sorted(os.listdir(directory))


def signal_in_the_last_step(directory: str):
    """fit with a Checkpointer and a log interval longer than the run; rank 1 alone gets SIGTERM in its last step's
    on_step (after the last vote): the ranks must agree before deciding to log the interval or save it for a resume."""
    import signal

    from fnlit.checkpoint import Checkpointer, read_info

    class TermOn1:
        def on_step(self, state, metrics):
            if dist.get_rank() == 1 and int(state.step) == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    torch.manual_seed(0)  # every rank the same initial params (data_parallel checks)
    model = torch.nn.Linear(4, 1)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    step = fnlit.data_parallel(fnlit.train_step(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])))
    data = fnlit.ArrayLoader(torch.randn(64, 4), torch.randn(64, 1), batch_size=8)
    ck = Checkpointer(directory, save_last=False)
    out = fnlit.fit(step, state, data, max_steps=3, log_every_n_steps=50, callbacks=[TermOn1()], checkpoint=ck, progress=False)
    files = sorted(os.listdir(directory))
    return int(out.step), files, len(read_info(os.path.join(directory, files[-1])).position.get("log_pending", []))


def stop_then_a_late_signal(directory: str | None):
    """StopTraining on every rank at step 2 (agreed at that log interval); rank 1 alone gets SIGTERM right after the
    vote (in on_log). Whether to validate before stopping must follow the vote, or one rank validates (a collective)
    while the other leaves."""
    import signal

    from fnlit.callbacks import StopTraining
    from fnlit.checkpoint import Checkpointer

    class StopAt2:
        def on_step(self, state, metrics):
            if int(state.step) == 2:
                raise StopTraining("stop")

        def on_log(self, state):
            if dist.get_rank() == 1 and int(state.step) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return {}

    torch.manual_seed(0)  # every rank the same initial params (data_parallel checks)
    model = torch.nn.Linear(4, 1)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    step = fnlit.data_parallel(fnlit.train_step(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])))
    ev = fnlit.eval_step(model, lambda m, b: {"loss": torch.nn.functional.mse_loss(m(b[0]), b[1])})
    data = fnlit.ArrayLoader(torch.randn(64, 4), torch.randn(64, 1), batch_size=8)
    val = fnlit.ArrayLoader(torch.randn(32, 4), torch.randn(32, 1), batch_size=8)
    ck = Checkpointer(directory, save_last=False) if directory else None
    out = fnlit.fit(step, state, data, val_data=val, eval_step=ev, max_epochs=1, log_every_n_steps=2, num_sanity_val_steps=0,
                    callbacks=[StopAt2()], checkpoint=ck, progress=False)  # fmt: skip
    return int(out.step)


def ensemble_with_collectives():
    """fnlit.ensemble with data_parallel or shard in either nesting: the refusals (their collectives have no vmap rule)."""
    torch.manual_seed(0)
    model = mlp()
    tx = fnlit.optim.sgd(0.1)
    states = fnlit.stack_states([fnlit.TrainState.create(model, tx, seed=i) for i in range(2)])
    step, out = hand_step(model), {}
    cases = {
        "dp(ens)": lambda: fnlit.data_parallel(fnlit.ensemble(step, 2))(states, batch()),
        "shard(ens)": lambda: fnlit.shard(fnlit.ensemble(step, 2))(states, batch()),
        "vmap(dp)": lambda: torch.func.vmap(fnlit.data_parallel(step), in_dims=(0, None), randomness="different")(states, batch()),
        "vmap(shard)": lambda: torch.func.vmap(fnlit.shard(step), in_dims=(0, None), randomness="different")(states, batch()),
    }
    for name, run in cases.items():
        try:
            run()
            out[name] = "ran"
        except ValueError as e:
            out[name] = str(e)
    return out


def ensemble_members_per_rank():
    """The split recipe under torch.distributed: each rank its own members (fit refuses, evaluate raises), and
    evaluate of one ensemble state that every rank holds alike."""
    rank = dist.get_rank()
    loss = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    tx, out = fnlit.optim.sgd(0.1), {}

    def states(seeds):
        models = []
        for s in seeds:
            torch.manual_seed(s)
            models.append(mlp(4, 8, 1))
        return models[0], fnlit.stack_states([fnlit.TrainState.create(m, tx, seed=s) for m, s in zip(models, seeds)])

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(13, 4, generator=g), torch.randn(13, 1, generator=g)
    data = fnlit.ArrayLoader(x, y, batch_size=4, shuffle=False)
    model, own = states([0, 1, 2, 3][rank::2])  # rank 0: seeds 0 and 2, rank 1: seeds 1 and 3
    step, ev = fnlit.train_step(model, loss), fnlit.eval_step(model, loss)
    for name, run in {
        "fit": lambda: fnlit.fit(fnlit.ensemble(step, 2), own, data, max_epochs=1, progress=False),
        "fit same": lambda: fnlit.fit(fnlit.ensemble(step, 2), states([0, 1])[1], data, max_epochs=1, progress=False),
        "evaluate": lambda: fnlit.evaluate(fnlit.ensemble(ev, 2), own, data),
    }.items():
        try:
            result = run()
            out[name] = result if isinstance(result, dict) else "ran"  # (a TrainState does not pickle back)
        except ValueError as e:
            out[name] = str(e)
    out["evaluate same"] = fnlit.evaluate(fnlit.ensemble(ev, 2), states([0, 1])[1], data)
    return out


def hangs_ignoring_sigterm():
    """Rank 1 hangs and ignores SIGTERM (as fit's handler does: it only asks the loop to stop); rank 0 waits on it."""
    import signal
    import time

    if dist.get_rank() == 1:
        signal.signal(signal.SIGTERM, lambda *_: None)
        time.sleep(120)
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item()


def starts_apart(kind: str):
    """Ranks whose states differ: fit refuses them before its first step, and so does check_same_state."""
    rank = dist.get_rank()
    torch.manual_seed(100 + rank if kind == "values" else 0)  # a per-rank seed set before the module is built
    model = torch.nn.Linear(4 + (rank if kind == "shapes" else 0), 1)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    step = fnlit.accumulate(fnlit.data_parallel(fnlit.train_step(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))), 2)
    data = [(torch.randn(8, 4 + (rank if kind == "shapes" else 0)), torch.randn(8, 1))] * 2
    messages = []
    for run in (lambda: fnlit.fit(step, state, data, max_epochs=1, progress=False),
                lambda: fnlit.distributed.check_same_state(state)):
        try:
            run()
            messages.append("no error")
        except ValueError as e:
            messages.append(str(e))
    return messages


def starts_permuted():
    """Ranks whose states hold the same values in another order on rank 1 (a square weight loaded transposed, a
    vector flipped): the same sizes, shapes and sum of bytes, yet fit and check_same_state refuse them; identical
    states pass."""
    out = {}
    for kind in ("transposed", "flipped", "same"):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 3)
        with torch.no_grad():
            if dist.get_rank() == 1 and kind == "transposed":
                model.weight.copy_(model.weight.t().clone())
            elif dist.get_rank() == 1 and kind == "flipped":
                model.bias.copy_(model.bias.flip(0))
        state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
        step = fnlit.data_parallel(fnlit.train_step(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])))
        data = [(torch.randn(4, 3), torch.randn(4, 3))]
        out[kind] = []
        for run in (lambda: fnlit.fit(step, state, data, max_epochs=1, progress=False),
                    lambda: fnlit.distributed.check_same_state(state)):
            try:
                run()
                out[kind].append("no error")
            except ValueError as e:
                out[kind].append(str(e))
    return out


def all_equal_votes():
    """fnlit.distributed._all_equal and _extremes on values the same on both ranks and values that differ (rank 1's
    otherwise), int64's ends included; each rank's answers."""
    from fnlit.distributed import _all_equal, _extremes

    rank, lo, hi = dist.get_rank(), -(2**63), 2**63 - 1
    cases = {"int": (7, 7), "str": ("acc\0loss", "acc\0loss"), "bytes": (b"\x00\xff", b"\x00\xff"), "ends": (lo, lo)}
    others = {"int": (7, 8), "str": ("acc\0loss", "acc"), "bytes": (b"\x00\xff", b"\xff\x00"), "ends": (lo, hi)}
    out = {("same", k): _all_equal(v[rank], "cpu") for k, v in cases.items()}
    out.update({("differ", k): _all_equal(v[rank], "cpu") for k, v in others.items()})
    out["extremes"] = _extremes([rank, lo if rank == 0 else 5, hi], "cpu")
    return out


def negative_zero_state(differ: bool):
    """check_same_state on a float64 weight holding -0.0 (its bits -2**63 as an int64: its checksum), on both ranks
    or (``differ``) on rank 0 only."""
    model = torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.0 if differ and dist.get_rank() == 1 else -0.0)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    try:
        fnlit.distributed.check_same_state(state)
    except ValueError as e:
        return str(e)
    return "no error"


def float64_metric():
    """Float64 metrics averaged across ranks: 0.1 on rank 0, 1.1 on rank 1; and a float64 model's loss (which
    rides with the gradients' all-reduce)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).double()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)

    def step(state, batch):
        loss, grads = fnlit.value_and_grad(lambda p: fnlit.apply(model, p, {}, batch)[0].pow(2).mean())(state.params)
        return state.apply_gradients(grads), {"loss": loss, "x": torch.tensor(0.1 + dist.get_rank(), dtype=torch.float64)}

    x = torch.full((2, 4), 0.1 + dist.get_rank(), dtype=torch.float64)
    _, metrics = fnlit.data_parallel(step)(state, x)
    own_loss = fnlit.apply(model, state.params, {}, x)[0].pow(2).mean()  # this rank's, for the reference
    return metrics["x"].dtype, metrics["x"].item(), metrics["loss"].dtype, metrics["loss"].item(), own_loss.item()


def float64_aux_in_a_float32_model():
    """A float32 model whose loss function computes its loss in float64 and returns a float64 aux (0.1 on rank 0,
    1.1 on rank 1): the averaged aux and loss, and this rank's own loss."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)

    def loss_fn(p, x):
        loss = fnlit.apply(model, p, {}, x)[0].double().pow(2).mean()
        return loss, torch.tensor(0.1 + dist.get_rank(), dtype=torch.float64)

    def step(state, batch):
        (loss, aux), grads = fnlit.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        return state.apply_gradients(grads), {"loss": loss, "aux": aux}

    x = torch.full((2, 4), 0.1 + dist.get_rank())
    _, metrics = fnlit.data_parallel(step)(state, x)
    own_loss = loss_fn(state.params, x)[0]
    return metrics["aux"].dtype, metrics["aux"].item(), metrics["loss"].dtype, metrics["loss"].item(), own_loss.item()


def unchecked_warns():
    """A loop of one's own: the data-parallel step warns at its first call unless check_same_state ran."""
    import warnings

    model, state = make_state()
    out = []
    for check in (False, True):
        step = fnlit.data_parallel(hand_step(model))
        if check:
            fnlit.distributed.check_same_state(state)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(2):
                step(state, local(batch(GLOBAL_BATCH, seed=i), dist.get_rank(), dist.get_world_size()))
        out.append([str(w.message) for w in caught if "check_same_state" in str(w.message)])
    return out


def fit_one_rank_warns_nothing():
    """fit of a data-parallel step in a process group of one: nothing to check, nothing to warn of."""
    import warnings

    model, state = make_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fnlit.fit(fnlit.data_parallel(hand_step(model)), state, [batch(8, seed=i) for i in range(2)], max_epochs=1,
                  progress=False)  # fmt: skip
    return [str(w.message) for w in caught if "check_same_state" in str(w.message)]


def data_order_with_own_rngs():
    """The examples fit's ArrayLoader gives each rank per epoch (12 examples, batches of 2, 2 epochs): ranks whose
    states share rank 0's rng, then ranks that each hold their own (folded with the rank, as for per-rank dropout)."""
    out = []
    for own in (False, True):
        state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
        state = state.replace(rng=fnlit.random.fold_in(state.rng, dist.get_rank() if own else 0))
        seen = []

        def step(s, b):
            seen.extend(b.tolist())
            return s.replace(step=s.step + 1), {}

        fnlit.fit(step, state, fnlit.ArrayLoader(torch.arange(12), batch_size=2), max_epochs=2, progress=False)
        out.append([seen[:6], seen[6:]])
    return out


def evaluate_wide_metrics():
    """evaluate with float64, int64 and float32 metrics: rank 0 has 1 + 1e-9 (and 16777217 tokens), rank 1 has
    1 + 3e-9 (and 16777219), one example each; float32 0.1 and 0.2."""
    rank = dist.get_rank()
    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    ev = lambda s, b: {"m": b.mean(), "tokens": torch.tensor(16777217 + 2 * rank), "f32": torch.tensor(0.1 + 0.1 * rank)}  # noqa: E731
    return fnlit.evaluate(ev, state, [torch.tensor([1 + 1e-9 + 2e-9 * rank], dtype=torch.float64)])


def evaluate_rank_dependent_metric_dtypes():
    """evaluate where a metric is a float32 tensor on rank 0 and the Python number 0.0 (a float64) on rank 1 (a
    recall's fallback when a batch has no positives), two examples each."""
    rank = dist.get_rank()
    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    y = torch.tensor([1, 0]) if rank == 0 else torch.tensor([0, 0])

    def ev(s, batch):
        x, y = batch
        positives = int((y == 1).sum())
        return {"recall": ((x > 0) & (y == 1)).sum() / positives if positives else 0.0}

    return fnlit.evaluate(ev, state, [(torch.tensor([1.0, -1.0]), y)])


def evaluate_metrics_in_rank_order():
    """evaluate where rank 1's eval step builds its metrics in the other order (a dict merge): rank 0 runs
    arange(10)[:4] as one batch, rank 1 [4:7] and [7:]."""
    rank, x = dist.get_rank(), torch.arange(10.0)
    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    if rank == 0:
        return fnlit.evaluate(lambda s, b: {"mean": b.mean(), "max": b.max()}, state, [x[:4]])
    return fnlit.evaluate(lambda s, b: {"max": b.max(), "mean": b.mean()}, state, [x[4:7], x[7:]])


def evaluate_metric_names_that_differ(case):
    """evaluate where rank 1's eval step returns other metric names than rank 0's {"acc": ...}: the error's type
    and message, on every rank."""
    rank, x = dist.get_rank(), torch.arange(10.0)
    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    other = {"renamed": lambda b: {"loss": b.max()}, "extra": lambda b: {"acc": b.mean(), "loss": b.max()}, "none": lambda b: {}}
    step = (lambda s, b: {"acc": b.mean()}) if rank == 0 else (lambda s, b: other[case](b))
    try:
        fnlit.evaluate(step, state, [x[:4]] if rank == 0 else [x[4:]])
    except Exception as e:
        return type(e).__name__, str(e)
    return None


def evaluate_with_empty_batches():
    """evaluate where rank 0 has an empty batch among its examples and rank 1 has only empty batches."""
    data = [torch.zeros(0), torch.ones(3), torch.zeros(0), torch.full((1,), 5.0)] if dist.get_rank() == 0 else [torch.zeros(0)] * 2
    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.1), seed=0)
    return fnlit.evaluate(lambda s, b: {"x": b.mean()}, state, data)


def number_or_tensor_metric(steps: int = 4, dtype: torch.dtype = torch.float32, aux: bool = False):
    """A metric that is a number on one rank and a tensor (of ``dtype``) on the other (sum([]) over an empty
    selection), for ``steps`` steps, made in the step or (``aux``) returned by the loss function as has_aux; the
    weights and the metric's values."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1, bias=False).to(dtype)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    fnlit.distributed.check_same_state(state)
    rank = dist.get_rank()

    def loss_fn(p, x, y):
        loss = torch.nn.functional.mse_loss(fnlit.apply(model, p, {}, x)[0], y)
        return (loss, outlier(y)) if aux else loss

    def outlier(y):
        big = [v for v in y.reshape(-1) if v.abs() > 1.0]  # (a Python list of tensors, only to build the metric)
        return sum(big)

    def step(state, batch):
        x, y = batch
        if aux:
            (loss, big), grads = fnlit.value_and_grad(loss_fn, has_aux=True)(state.params, x, y)
        else:
            (loss, grads), big = fnlit.value_and_grad(loss_fn)(state.params, x, y), outlier(y)
        return state.apply_gradients(grads), {"loss": loss, "outlier": big}

    dp = fnlit.data_parallel(step)
    x, y = torch.ones(1, 1, dtype=dtype), torch.full((1, 1), 0.5 if rank == 0 else 100.0, dtype=dtype)
    weights, outliers = [], []
    for _ in range(steps):
        state, metrics = dp(state, (x, y))
        weights.append(state.params["weight"].item())
        outliers.append(float(metrics["outlier"]))
    return weights, outliers


def sparse_embedding(k: int = 1):
    """data_parallel (under accumulate with k > 1) of a step whose embedding gradient is sparse: it raises."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 1))
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    fnlit.distributed.check_same_state(state)
    step = fnlit.data_parallel(fnlit.train_step(model, lambda m, b: F.mse_loss(m(b[0]), b[1])))
    if k > 1:
        step = fnlit.accumulate(step, k)
    step(state, (torch.tensor([1, 2, 2, 7]), torch.ones(4, 1)))


VAL_SIZES = ([4, 4, 4], [3, 1])  # each rank's validation batch sizes: 3 batches against 2, plain lists


def val_batches(rank: int):
    return [batch(n, seed=100 + 10 * rank + i) for i, n in enumerate(VAL_SIZES[rank])]


class Reiterable:
    """Batches without a len() (as a DataLoader over an IterableDataset), read from the start each time."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


def uneven_validation_unsharded():
    """Validation where the ranks hold different numbers of batches, on a plain (data_parallel) state: its forwards
    are not collectives. Returns, for each case, the metric and this rank's number of forwards, or the error."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = mlp()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.0), seed=0)  # lr 0: fit's validation sees these params
    forwards, out = [0], {}

    def metrics(m, b):
        forwards[0] += 1
        return {"ce": torch.nn.functional.cross_entropy(m(b[0]), b[1])}

    ce = fnlit.eval_step(model, metrics)
    step = fnlit.data_parallel(fnlit.train_step(model, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])))

    class Record(fnlit.callbacks.Callback):
        def on_validation(self, state, metrics):
            out.setdefault("fit metrics", []).append(metrics["val/ce"])

    train = fnlit.ArrayLoader(*batch(8), batch_size=2, shuffle=False)
    fit = dict(eval_step=ce, max_steps=1, val_check_interval=1, num_sanity_val_steps=0, progress=False)
    mine = val_batches(rank)
    none = mine if rank == 0 else []
    four = torch.utils.data.TensorDataset(*batch(4))  # in batches of 3, drop_last: 1 in one process, 0 of 2 per rank

    def fitted(val_data, **options):
        fnlit.fit(step, state, train, val_data=val_data, **fit, **options)

    def trained(train_data, **options):  # (the validation batches are (x, y) batches too)
        fnlit.fit(step, state, train_data, max_steps=1, progress=False, **options)

    for name, run in [
        ("evaluate", lambda: fnlit.evaluate(ce, state, mine)["ce"]),
        ("no len()", lambda: fnlit.evaluate(ce, state, Reiterable(mine))["ce"]),
        ("no len() on rank 1", lambda: fnlit.evaluate(ce, state, mine if rank == 0 else Reiterable(mine))["ce"]),
        ("limit 2", lambda: fnlit.evaluate(ce, state, mine, limit_batches=2)["ce"]),
        ("fit", lambda: fitted(Reiterable(mine), callbacks=[Record()])),
        ("evaluate, rank 1 none", lambda: fnlit.evaluate(ce, state, none)),
        ("evaluate, rank 1 none, no len()", lambda: fnlit.evaluate(ce, state, Reiterable(none))),
        ("evaluate, rank 1 none, iterator", lambda: fnlit.evaluate(ce, state, iter(none))),
        ("fit, rank 1 none, no len()", lambda: fitted(Reiterable(none))),
        ("limit 0.5", lambda: fnlit.evaluate(ce, state, mine, limit_batches=0.5)["ce"]),  # int(1.5), int(1.0): one each
        ("limit 0.5, 3 and 1 batches", lambda: fnlit.evaluate(ce, state, mine[: 3 - 2 * rank], limit_batches=0.5)),
        ("limit 0.5, no len() on rank 1", lambda: fnlit.evaluate(ce, state, Reiterable(mine) if rank else mine, limit_batches=0.5)),
        ("fit, limit_val_batches 0.5, 3 and 1 batches", lambda: fitted(mine[: 3 - 2 * rank], limit_val_batches=0.5)),
        ("fit, limit_train_batches 0, limit_val_batches 0.5, 3 and 1 batches",
         lambda: trained(train, val_data=mine[: 3 - 2 * rank], eval_step=ce, limit_train_batches=0, limit_val_batches=0.5)),
        ("fit, limit_train_batches 0.5, 3 and 1 batches", lambda: trained(mine[: 3 - 2 * rank], limit_train_batches=0.5)),
        ("fit, limit_train_batches 0.5, no len() on rank 1",
         lambda: trained(Reiterable(mine) if rank else mine, limit_train_batches=0.5)),
        ("fit, empty training data on rank 1", lambda: trained(mine if rank == 0 else [])),
        ("fit, val_data empty on rank 1", lambda: fitted(none)),
        ("fit, val_data empty on rank 1, limit_val_batches 0", lambda: fitted(none, limit_val_batches=0)),
        ("fit, a DistributedSampler's shards without batches", lambda: fitted(torch.utils.data.DataLoader(
            four, batch_size=3, drop_last=True, sampler=torch.utils.data.DistributedSampler(four, shuffle=False)))),
    ]:
        forwards[0] = 0
        try:
            out[name] = (run(), forwards[0])
        except ValueError as e:
            out[name] = str(e)
    return out


def environment_and_cwd(names: tuple[str, ...]):
    """What a rank sees of the environment variables ``names`` (None: unset) and its working directory."""
    return {name: os.environ.get(name) for name in names}, os.getcwd()


def report_through(queue, value, tensor):
    """Hands each rank's rank to the parent through a multiprocessing queue, and writes it into a shared tensor."""
    tensor[dist.get_rank()] = 100 + dist.get_rank()
    queue.put(dist.get_rank())
    with value.get_lock():
        value.value += 1
    return True


def report_through_both(fn_queue, queue, value, tensor):
    """:func:`report_through`, and the rank handed through a second queue too: the one bound into the launched
    function (a ``functools.partial``), where the other comes as an argument."""
    fn_queue.put(dist.get_rank())
    return report_through(queue, value, tensor)


def data_parallel_metrics_in_rank_order():
    """A data_parallel step whose metrics dict is built in another order on rank 1 (as iterating a set of names
    does under torchrun, where each process has its own string hash seed): each rank's metrics after one step."""
    rank = dist.get_rank()
    state = fnlit.TrainState.create(torch.nn.Linear(1, 1), fnlit.optim.sgd(0.0), seed=0)

    def step(state, batch):
        loss, grads = fnlit.value_and_grad(lambda p: (p["weight"] * batch).sum())(state.params)
        metrics = {"a": batch.sum(), "b": batch.max()}
        return state.apply_gradients(grads), dict(reversed(metrics.items())) if rank == 1 else metrics

    _, metrics = fnlit.data_parallel(step)(state, torch.tensor([1.0, 2.0]) if rank == 0 else torch.tensor([10.0, 30.0]))
    return {k: float(v) for k, v in metrics.items()}


def resume_with_a_seed_per_rank(folder: str):
    """fit with seed=1 + rank (every rank takes rank 0's), then its resume with the same arguments: the warnings
    about seeds each rank saw in the two runs."""
    import warnings

    rank = dist.get_rank()
    seen = []
    for steps, path in ((2, None), (4, "last")):
        torch.manual_seed(0)
        model = torch.nn.Linear(1, 1)
        state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.0), seed=0)
        step = fnlit.data_parallel(fnlit.train_step(model, lambda m, b: m(b[:, None]).pow(2).mean()))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fnlit.fit(step, state, fnlit.ArrayLoader(torch.arange(16.0), batch_size=2), max_steps=steps, seed=1 + rank,
                      checkpoint=fnlit.checkpoint.Checkpointer(folder), ckpt_path=path, progress=False)
        seen.append([str(w.message) for w in caught if "seed" in str(w.message)])
    return seen


def bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2)
    )


def bn_batches(rank: int, n: int):
    """Rank ``rank``'s n batches of 4 examples (with labels), shifted and scaled by rank: its statistics differ."""
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(4, 3, generator=g) * (1 + rank) + 2 * rank, torch.zeros(4)) for _ in range(n)]


def update_bn_on_ranks(counts):
    """update_bn on each rank's own batches (``counts[rank]`` of them), on a plain and on a sharded state; returns
    the buffers (or the error) of each case."""
    rank = dist.get_rank()
    model = bn_model()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    sharded = fnlit.shard_state(state)
    mine = bn_batches(rank, counts[rank])
    none = mine if rank == 0 else []
    out = {}
    for name, run in [
        ("plain", lambda: fnlit.callbacks.update_bn(model, state, mine)),
        ("plain, no len()", lambda: fnlit.callbacks.update_bn(model, state, iter(mine))),
        ("own", lambda: fnlit.callbacks.update_bn(model, state, mine, all_ranks=False)),
        ("plain, rank 1 none", lambda: fnlit.callbacks.update_bn(model, state, none)),
        ("sharded", lambda: fnlit.callbacks.update_bn(model, sharded, mine)),
        ("sharded, no len()", lambda: fnlit.callbacks.update_bn(model, sharded, iter(mine))),
        ("sharded, rank 1 none", lambda: fnlit.callbacks.update_bn(model, sharded, none)),
    ]:
        try:
            out[name] = {k: v.clone() for k, v in run().buffers.items()}
        except ValueError as e:
            out[name] = str(e)
    return out


def a_rank_outside_the_group():
    """Three ranks, data_parallel over a group of ranks 0 and 1: the members' weights after one step (SGD, lr 1, on
    w * x with x = 1 on rank 0 and 3 on rank 1), and the error the step raises on rank 2 (it did gradient ascent)."""
    group = dist.new_group([0, 1])  # (every rank creates it)
    rank = dist.get_rank()
    torch.manual_seed(0)
    state = fnlit.TrainState.create(torch.nn.Linear(1, 1, bias=False), fnlit.optim.sgd(1.0), seed=0)
    w0 = state.params["weight"].item()

    def step(state, batch):
        loss, grads = fnlit.value_and_grad(lambda p: (p["weight"] * batch).sum())(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    try:
        state, _ = fnlit.data_parallel(step, group)(state, torch.tensor([1.0 + 2 * rank]))
    except ValueError as e:
        return str(e)
    return state.params["weight"].item() - w0


def metric_names_that_differ(nested: bool):
    """A data_parallel step whose metrics are per-class accuracies of the classes in each rank's shard: "cat" on
    rank 0, "dog" on rank 1 (as many names, different ones), flat or ``nested`` in a dict; the error each raises."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)

    def step(state, x):
        loss, grads = fnlit.value_and_grad(lambda p: fnlit.apply(model, p, {}, x)[0].pow(2).mean())(state.params)
        acc = {("cat", "dog")[rank]: torch.tensor(1.0 - rank)}
        return state.apply_gradients(grads), {"loss": loss, "acc": acc} if nested else {"loss": loss, **acc}

    try:
        _, metrics = fnlit.data_parallel(step)(state, torch.ones(2, 2))
    except ValueError as e:
        return str(e)
    return repr(metrics)


class Stepped(NamedTuple):
    step: torch.Tensor
    params: dict


def repeated_path_state():
    """A state with a step (as Checkpointer needs) whose two leaves both read [1].1.5 (keys that are no str)."""
    return Stepped(torch.tensor(1), {Decimal("1.5"): torch.ones(2), Decimal("1"): {Decimal("5"): torch.ones(2)}})


def save_with_a_repeated_path(directory: str):
    """What each rank's fnlit.save and Checkpointer.save raise for :func:`repeated_path_state`."""
    state = repeated_path_state()
    raised = []
    for save in (lambda: fnlit.save(os.path.join(directory, "a.ckpt"), state),
                 lambda: fnlit.Checkpointer(os.path.join(directory, "ckpts")).save(state)):
        try:
            save()
            raised.append(None)
        except ValueError as e:
            raised.append(str(e))
        dist.barrier()  # (the next collective: a rank that went on would be waiting here)
    return raised


def aux_metrics_ride_the_gradients(steps: int = 3):
    """A data-parallel step whose loss function returns an accuracy (float), a count of correct examples (int
    tensor) and a count of large targets that is a number on one rank (sum([])) as aux, all returned as metrics:
    the floating all-reduces' sizes, the averaged metrics and this rank's own values of each step."""
    import torch.nn.functional as F

    rank, world = dist.get_rank(), dist.get_world_size()
    model, state = make_state()
    fnlit.distributed.check_same_state(state)

    def loss_fn(params, x, y):
        logits, _ = fnlit.apply(model, params, state.buffers, x)
        big = [v for v in y.reshape(-1) if v > 2 + rank]  # none on rank 1 (targets are 0..3)
        correct = (logits.argmax(-1) == y).sum()
        return F.cross_entropy(logits, y), {"acc": correct.float() / len(y), "correct": correct, "big": sum(big)}

    def step(state, batch):
        (loss, aux), grads = fnlit.value_and_grad(loss_fn, has_aux=True)(state.params, *batch)
        return state.apply_gradients(grads), {"loss": loss, **aux}

    counter = CountingAllReduce()
    dist.all_reduce = counter
    own, averaged = [], []
    try:
        dp = fnlit.data_parallel(step)
        for i in range(steps):
            b = local(batch(GLOBAL_BATCH, seed=i), rank, world)
            loss, aux = loss_fn(state.params, *b)
            own.append({"loss": float(loss), **{k: float(v) for k, v in aux.items()}})
            state, metrics = dp(state, b)
            averaged.append({k: (float(v), v.dtype) for k, v in metrics.items()})
    finally:
        dist.all_reduce = fnlit.distributed.dist.all_reduce = counter._orig
    n_params = sum(p.numel() for p in state.params.values())
    return {"sizes": counter.sizes, "n_params": n_params, "own": own, "averaged": averaged}


def aux_number_beside_a_one_element_tensor(dtype: torch.dtype):
    """A model of ``dtype`` whose loss function returns as aux the number 0.1 on rank 0 and a tensor of shape (1,)
    holding 0.3 on rank 1 (a slice where the other rank's selection was empty): the averaged metric and its dtype."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1).to(dtype)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)

    def loss_fn(p, x):
        loss = fnlit.apply(model, p, {}, x)[0].pow(2).mean()
        return loss, 0.1 if rank == 0 else torch.full((1,), 0.3, dtype=dtype)

    def step(state, x):
        (loss, aux), grads = fnlit.value_and_grad(loss_fn, has_aux=True)(state.params, x)
        return state.apply_gradients(grads), {"loss": loss, "x": aux}

    _, metrics = fnlit.data_parallel(step)(state, torch.ones(2, 2, dtype=dtype))
    return metrics["x"].reshape(()).item(), metrics["x"].dtype


def no_host_sync_of_a_data_parallel_step():
    """fnlit.testing.assert_no_host_sync over a data-parallel step with a metric that is no rider (the batch's mean,
    averaged by the metrics' all-reduce, which also checks the ranks' names): what it raises, or None."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)

    def step(state, b):
        loss, grads = fnlit.value_and_grad(lambda p: fnlit.apply(model, p, {}, b)[0].pow(2).mean())(state.params)
        return state.apply_gradients(grads), {"loss": loss, "x_mean": b.mean()}

    fnlit.distributed.check_same_state(state)
    try:
        fnlit.testing.assert_no_host_sync(fnlit.data_parallel(step), state, torch.ones(4, 2))
    except Exception as e:  # noqa: BLE001 (returned to the test)
        return f"{type(e).__name__}: {e}"
    return None
