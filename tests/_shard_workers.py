"""Functions run in several processes by tests/test_shard.py (module level: spawn pickles them).

Each launch does several checks, because starting a process costs seconds on a small machine.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import batch, hand_step, mlp

import fnlit
from fnlit.sharded_checkpoint import restore_sharded, save_sharded
from fnlit.transforms.shard import local_nbytes, shard, shard_state, unshard_state

GLOBAL_BATCH = 16
STEPS = 10
SAVE_AT = 5
D_IN, HIDDEN, D_OUT = 13, 37, 5  # uneven: 37 rows and 5 outputs do not split evenly over 2 or 4 ranks


def make_state(fp16: bool = False, optimizer: str = "adamw"):
    torch.manual_seed(0)
    model = mlp(D_IN, HIDDEN, D_OUT)
    if optimizer == "sgd":  # momentum, Nesterov and L2 decay: the fused SGD kernel's options
        tx = fnlit.optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
    else:
        # A small clipping threshold so that clipping is active: it needs the global norm over all shards.
        tx = fnlit.optim.chain(fnlit.optim.clip_by_global_norm(0.5), fnlit.optim.adamw(1e-2, weight_decay=0.1))
    return model, fnlit.TrainState.create(model, tx, seed=0, loss_scale="dynamic" if fp16 else None)


def global_batch(i: int):
    return batch(GLOBAL_BATCH, D_IN, D_OUT, seed=i)


def local(data, rank, world):
    n = GLOBAL_BATCH // world
    return tuple(t[rank * n : (rank + 1) * n] for t in data)


def compose(step, kind: str):
    """The transforms under test, inside fnlit.shard; the same without shard gives the reference."""
    if kind == "accumulate":
        return fnlit.accumulate(step, 2)
    if kind == "amp_bf16":
        return fnlit.amp(step, dtype=torch.bfloat16)
    if kind == "accumulate_amp_fp16":
        return fnlit.accumulate(fnlit.amp(step, dtype=torch.float16), 2)
    return step


def full(tree):
    return fnlit.tree.tree_map(lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t.clone(), tree)


def run(kind: str, steps: int = STEPS, save_dir: str | None = None, data_parallel: bool = False, optimizer: str = "adamw"):
    """``steps`` sharded steps; returns the unsharded params, losses, step and key (and saves at SAVE_AT).

    With ``data_parallel=True`` the same run under fnlit.data_parallel instead of shard: the reference
    for amp, whose low-precision matmuls round sums over each rank's part of the batch.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    model, state = make_state(fp16="fp16" in kind, optimizer=optimizer)
    step = (fnlit.data_parallel if data_parallel else shard)(compose(hand_step(model), kind))
    losses = []
    for i in range(steps):
        if save_dir is not None and i == SAVE_AT:
            save_sharded(save_dir, state, epoch=0, batch=i)
        state, metrics = step(state, local(global_batch(i), rank, world))
        losses.append(float(metrics["loss"]))
    plain = unshard_state(state)
    return {"params": plain.params, "losses": losses, "step": int(state.step), "rng": int(state.rng)}


def memory():
    """Bytes this rank holds: params and optimizer state after a step, and the gradients of one step."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model, state = make_state()
    grads_seen = []

    def step(state, data):
        x, y = data

        def loss_fn(params):
            logits, buffers = fnlit.apply(model, params, state.buffers, x, rng=state.rng)
            return torch.nn.functional.cross_entropy(logits, y), buffers

        (loss, buffers), grads = fnlit.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads_seen.append(grads)
        grad_norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))  # a DTensor under shard: already global
        metrics = {"loss": loss, "grad_norm": grad_norm, "norm_per_loss": grad_norm / loss}  # the last: per rank
        return state.apply_gradients(grads, buffers=buffers), metrics

    state, metrics = shard(step)(state, local(global_batch(0), rank, world))

    def dp_step(state, data):  # DP-SGD's per-example gradients: refused under shard, with the reason
        loss_fn = lambda p, ex: F.cross_entropy(fnlit.apply(model, p, {}, ex[0][None], train=False)[0], ex[1][None])  # noqa: E731
        losses, grads = fnlit.per_example_grads(loss_fn, state.params, data)
        return state.apply_gradients(grads), {"loss": losses.mean()}

    try:
        shard(dp_step)(make_state()[1], local(global_batch(0), rank, world))
        refused = ""
    except ValueError as e:
        refused = str(e)
    return {
        "per_example_refused": refused,
        "params": local_nbytes(state.params),
        "opt_state": local_nbytes(state.opt_state),
        "grads": local_nbytes(grads_seen[0]),
        "grad_types": sorted({type(g).__name__ for g in grads_seen[0].values()}),
        "grad_norm": float(metrics["grad_norm"]),
        "norm_per_loss": float(metrics["norm_per_loss"]),
    }


def resume(save_dir: str):
    """Restores the checkpoint (written on another number of ranks) and trains to STEPS."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model, fresh = make_state()
    state = restore_sharded(save_dir, like=shard_state(fresh))
    restored_step = int(state.step)
    step = shard(hand_step(model))
    for i in range(restored_step, STEPS):
        state, _ = step(state, local(global_batch(i), rank, world))
    plain = unshard_state(state)
    return {"restored_step": restored_step, "params": plain.params, "step": int(state.step), "rng": int(state.rng)}


class Scaled(torch.nn.Module):
    """Layers that split evenly over 2 ranks, a 0-d parameter (replicated; its gradient all-reduced), and a layer
    of no inputs (a (D_OUT, 0) weight: shard crashed gathering it; its bias trains)."""

    def __init__(self):
        super().__init__()
        # (16, 13) and (5, 16) split evenly over 2 ranks, the second along dim 1
        self.lin = torch.nn.Sequential(torch.nn.Linear(D_IN, 16), torch.nn.ReLU(), torch.nn.Linear(16, D_OUT))
        self.scale = torch.nn.Parameter(torch.tensor(1.5))
        self.empty = torch.nn.Parameter(torch.zeros(D_OUT, 0))  # nn.Linear(0, D_OUT)'s, without its init warning
        self.offset = torch.nn.Parameter(torch.zeros(D_OUT))

    def forward(self, x):
        return self.lin(x) * self.scale + torch.nn.functional.linear(x[:, :0], self.empty, self.offset)


def scalar_param(steps: int = 3, sharded: bool = True):
    torch.manual_seed(0)
    model = Scaled()
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0)
    step = shard(hand_step(model)) if sharded else hand_step(model)
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    for i in range(steps):
        state, _ = step(state, local(global_batch(i), rank, world))
    return unshard_state(state).params if sharded else state.params


def errors():
    """Unsupported combinations raise clear errors on every rank."""
    model, state = make_state()
    out = {}
    def penalised(state, batch):  # a gradient penalty: value_and_grad inside value_and_grad
        def loss_fn(params):
            inner = lambda p: F.cross_entropy(fnlit.apply(model, p, state.buffers, batch[0])[0], batch[1])  # noqa: E731
            loss, g = fnlit.value_and_grad(inner)(params)
            return loss + sum((v**2).sum() for v in g.values())

        loss, grads = fnlit.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    for name, step in [
        ("shard(data_parallel)", shard(fnlit.data_parallel(hand_step(model)))),
        ("data_parallel(shard)", fnlit.data_parallel(shard(hand_step(model)))),
        ("shard(gradient penalty)", shard(penalised)),
    ]:
        try:
            step(state, global_batch(0))
            out[name] = "no error"
        except (ValueError, NotImplementedError) as e:
            out[name] = str(e)
    return out


def ensemble_of_sharded_states():
    """fnlit.ensemble and stack_states given sharded states: each case's error message (or "no error")."""
    model, state = make_state()
    torch.manual_seed(1)
    other = fnlit.TrainState.create(mlp(D_IN, HIDDEN, D_OUT), state.tx, seed=1)
    step, out = hand_step(model), {}
    cases = {
        "stack sharded": lambda: fnlit.stack_states([shard_state(state), shard_state(other)]),
        "stack sharded, plain": lambda: fnlit.stack_states([shard_state(state), other]),
        "stack plain, sharded": lambda: fnlit.stack_states([state, shard_state(other)]),
        "ensemble of sharded": lambda: fnlit.ensemble(step, 2)(shard_state(fnlit.stack_states([state, other])), global_batch(0)),
    }
    for name, run in cases.items():
        try:
            run()
            out[name] = "no error"
        except Exception as e:  # (torch's own errors too: a test names them)
            out[name] = f"{type(e).__name__}: {e}"
    return out


def l2_step(model, full: bool):
    """A step whose loss reads the params directly (an L2 penalty), through p.full_tensor() or not."""

    def step(state, batch):
        def loss_fn(params):
            out, _ = fnlit.apply(model, params, state.buffers, batch[0])
            whole = [p.full_tensor() if full and hasattr(p, "full_tensor") else p for p in params.values()]
            return F.cross_entropy(out, batch[1]) + 0.01 * sum((p**2).sum() for p in whole)

        loss, grads = fnlit.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads), {"loss": loss}

    return step


def l2_penalty():
    """shard of an L2-penalised step: the clear error, and with full_tensor() the params after 2 steps."""
    model, state = make_state()
    try:
        shard(l2_step(model, full=False))(state, local(global_batch(0), dist.get_rank(), dist.get_world_size()))
        error = "no error"
    except Exception as e:  # (any: the test names what was raised instead)
        error = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
    step = shard(l2_step(model, full=True))
    for i in range(2):
        state, _ = step(state, local(global_batch(i), dist.get_rank(), dist.get_world_size()))
    return {"error": error, "params": by_path(state)}


def four_ranks(save_dir: str):
    return {
        "plain": run("plain", save_dir=save_dir),
        "accumulate": run("accumulate"),
        "amp_bf16": run("amp_bf16"),
        "amp_bf16_dp": run("amp_bf16", data_parallel=True),
        "memory": memory(),
    }


def batchnorm_buffers():
    """shard(accumulate(step, 2)) on a BatchNorm model: the buffers after one step, with the reference (a
    torch copy of the model run on this rank's two micro-batches, averaged across ranks by hand), and
    after three steps."""
    import copy

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = mlp(D_IN, HIDDEN, D_OUT, bn=True)
    reference = copy.deepcopy(model).train()
    state = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0)
    step = shard(fnlit.accumulate(hand_step(model), 2))
    out = []
    for i in range(3):
        x, y = local(global_batch(i), rank, world)
        if i == 0:
            with torch.no_grad():
                for xm in x.chunk(2):
                    reference(xm)
        state, _ = step(state, (x, y))
        out.append({k: v.clone() for k, v in state.buffers.items()})
    want = {n: b.detach().clone() for n, b in reference.named_buffers() if b.is_floating_point()}
    for b in want.values():
        dist.all_reduce(b)
        b /= world
    return {"after_1": out[0], "after_3": out[-1], "want_1": want}


def two_ranks(save_dir: str):
    return {
        "batchnorm": batchnorm_buffers(),
        "plain": run("plain"),
        "sgd": run("plain", optimizer="sgd"),
        "accumulate_amp_fp16": run("accumulate_amp_fp16"),
        "accumulate_amp_fp16_dp": run("accumulate_amp_fp16", data_parallel=True),
        "resume": resume(save_dir),
        "memory": memory(),
        "errors": errors(),
        "scalar_param": scalar_param(),
        "l2": l2_penalty(),
    }


def by_path(state):
    """The full tensors of a (sharded) state, by tree path: picklable, unlike the state's optimizer."""
    paths, leaves, _ = fnlit.tree.tree_flatten_with_path(full(unshard_state(state)))
    return dict(zip(paths, leaves))


def _sharded_checkpoints(directory: str):
    """fit(shard(step)) with a Checkpointer (periodic, best-by-validation and final saves), then restores
    into a sharded state; also fnlit.save of a sharded state."""
    import os

    import torch.nn.functional as F

    from fnlit.checkpoint import Checkpointer, restore, save

    model, state = make_state()
    x, y = global_batch(0)
    train = fnlit.ArrayLoader(x, y, batch_size=GLOBAL_BATCH // dist.get_world_size(), shuffle=False)

    def eval_step(state, data):
        logits, _ = fnlit.apply(model, state.params, state.buffers, data[0], train=False)
        return {"loss": F.cross_entropy(logits, data[1])}

    ck = Checkpointer(os.path.join(directory, "fit"), every_n_steps=2, keep_last=2, monitor="val/loss", keep_best=1)
    state = fnlit.fit(shard(hand_step(model)), state, train, val_data=[local(global_batch(1), dist.get_rank(), dist.get_world_size())],
                      eval_step=eval_step, max_steps=5, checkpoint=ck, progress=False, num_sanity_val_steps=0)
    fresh = shard_state(make_state()[1])
    restored, position = ck.restore("last", like=fresh)
    path = save(os.path.join(directory, "direct.ckpt"), state)
    dist.barrier()  # rank 0 writes; the others go on once they have sent their shards
    direct = restore(path, like=fresh)
    placed = [
        (type(r).__name__, list(getattr(r, "placements", ())) == list(getattr(f, "placements", ())))
        for r, f in zip(fnlit.tree.tree_leaves(direct), fnlit.tree.tree_leaves(fresh))
    ]
    return {
        "expected": by_path(state),
        "restored": by_path(restored),
        "direct": by_path(direct),
        "position": position,
        "placed": placed,
        "best": ck.best_path.name if ck.best_path else None,
        "files": sorted(os.listdir(os.path.join(directory, "fit"))),
    }


def _damaged_sharded_checkpoint(directory: str):
    """save_sharded on every rank, a bit flipped in rank 1's shard file, and a restore on every rank."""
    import os
    import shutil

    from fnlit.checkpoint import CheckpointError
    from fnlit.sharded_checkpoint import read_sharded_meta

    _, state = make_state()
    state = shard_state(state)
    path = save_sharded(os.path.join(directory, "sharded"), state)
    bad = os.path.join(directory, "damaged")
    if dist.get_rank() == 0:
        shutil.copytree(path, bad)
        with open(os.path.join(bad, "__1_0.distcp"), "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0x10]))
    dist.barrier()
    try:
        restore_sharded(bad, like=state)
        error = None
    except CheckpointError as e:
        error = str(e)
    back = restore_sharded(path, like=state)
    return {"error": error, "files": read_sharded_meta(path)["files"], "expected": by_path(state), "restored": by_path(back)}


def _ema_resumed(directory: str):
    """EMA over a sharded run: uninterrupted, and stopped after 2 steps then resumed from its checkpoint."""
    import os

    from fnlit.callbacks import EMA
    from fnlit.checkpoint import Checkpointer

    x, y = global_batch(0)
    averages = []
    for name, stops in (("whole", (4,)), ("cut", (2, 4))):
        for i, stop in enumerate(stops):
            model, state = make_state()
            train = fnlit.ArrayLoader(x, y, batch_size=GLOBAL_BATCH // dist.get_world_size(), shuffle=False)
            ema = EMA(0.9)
            ck = Checkpointer(os.path.join(directory, "ema_" + name), every_n_steps=1)
            fnlit.fit(shard(hand_step(model)), state, train, max_steps=stop, callbacks=[ema], checkpoint=ck,
                      ckpt_path="last" if i else None, progress=False)  # fmt: skip
        averages.append({k: full(v) for k, v in ema.params.items()})
    return averages


def sharded_checkpoints(directory: str):
    return {"fit": _sharded_checkpoints(directory), "damaged": _damaged_sharded_checkpoint(directory),
            "ema": _ema_resumed(directory)}  # fmt: skip


VAL_SIZES = ([4, 4, 4], [3, 1])  # each rank's validation batch sizes: 3 batches against 2, plain lists


def val_batches(rank: int):
    return [batch(n, D_IN, D_OUT, seed=100 + 10 * rank + i) for i, n in enumerate(VAL_SIZES[rank])]


def uneven_validation():
    """Validation where the ranks hold different numbers of batches, on a sharded state (each forward all-gathers
    the params: a collective). Returns the metrics (or the error) of each case."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = mlp(D_IN, HIDDEN, D_OUT)
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.0), seed=0)  # lr 0: fit's validations see these params
    ce = fnlit.eval_step(model, lambda m, b: {"ce": F.cross_entropy(m(b[0]), b[1])})
    mine, sharded, out = val_batches(rank), shard_state(state), {}

    class Record(fnlit.callbacks.Callback):
        def on_validation(self, state, metrics):
            out.setdefault("fit", []).append(metrics["val/ce"])

    train = fnlit.ArrayLoader(*batch(8, D_IN, D_OUT, seed=0), batch_size=2, shuffle=False)
    fit = dict(eval_step=ce, max_steps=2, val_check_interval=1, num_sanity_val_steps=-1, progress=False)
    fnlit.fit(shard(hand_step(model)), state, train, val_data=mine, callbacks=[Record()], **fit)
    out["evaluate"] = fnlit.evaluate(ce, sharded, mine)["ce"]
    out["limit 2"] = fnlit.evaluate(ce, sharded, mine, limit_batches=2)["ce"]
    out["limit 0.5"] = fnlit.evaluate(ce, sharded, mine, limit_batches=0.5)["ce"]  # int(1.5) and int(1.0): one each
    out["no len()"] = fnlit.evaluate(ce, sharded, iter(mine))["ce"]
    out["no len() on rank 1"] = fnlit.evaluate(ce, sharded, mine if rank == 0 else iter(mine))["ce"]
    out["no len(), limit 2"] = fnlit.evaluate(ce, sharded, iter(mine), limit_batches=2)["ce"]
    none = mine if rank == 0 else []
    for name, run in [
        ("evaluate, rank 1 none", lambda: fnlit.evaluate(ce, sharded, none)),
        ("evaluate, rank 1 none, no len()", lambda: fnlit.evaluate(ce, sharded, iter(none))),
        ("fit, rank 1 none", lambda: fnlit.fit(shard(hand_step(model)), state, train, val_data=none, **fit)),
        ("limit 0.5, 3 and 1 batches", lambda: fnlit.evaluate(ce, sharded, mine[: 3 - 2 * rank], limit_batches=0.5)),
        ("limit 0.5, no len() on rank 1", lambda: fnlit.evaluate(ce, sharded, iter(mine) if rank else mine, limit_batches=0.5)),
        ("fit, limit_val_batches 0.5, 3 and 1 batches",
         lambda: fnlit.fit(shard(hand_step(model)), state, train, val_data=mine[: 3 - 2 * rank], limit_val_batches=0.5, **fit)),
    ]:
        try:
            run()
            out[name] = "no error"
        except ValueError as e:
            out[name] = str(e)
    return out


def export_sharded():
    """fnlit.export of a sharded state on every rank: returns the exported module's state dict (and what
    load_state_dict of the unsharded params gives, torch's own route)."""
    model, state = make_state()
    step = shard(hand_step(model))
    sharded = shard_state(state)
    rank, world = dist.get_rank(), dist.get_world_size()
    for i in range(2):
        sharded, _ = step(sharded, local(global_batch(i), rank, world))
    exported = fnlit.export(sharded, mlp(D_IN, HIDDEN, D_OUT))
    return {"exported": {k: v.clone() for k, v in exported.state_dict().items()},
            "unsharded": dict(unshard_state(sharded).params)}


class _SparseEmbedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 6, sparse=True)
        self.lin = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.lin(self.emb(x).mean(1))


def sparse_embedding():
    """shard over a module with a sparse gradient: the error each rank raises (type, message)."""
    torch.manual_seed(0)
    model = _SparseEmbedding()
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.5), seed=0)
    step = shard(fnlit.train_step(model, lambda m, b: F.cross_entropy(m(b[0]), b[1])))
    g = torch.Generator().manual_seed(dist.get_rank())
    try:
        step(state, (torch.randint(0, 10, (4, 3), generator=g), torch.randint(0, 3, (4,), generator=g)))
    except Exception as e:  # noqa: BLE001 (returned to the test, which checks it)
        return type(e).__name__, str(e)
    return None


def frozen_per_rank_seed(steps: int = 3):
    """Each rank seeded by its rank, with a frozen first layer: the params and buffers after ``steps`` sharded steps
    on the global batch's shards (rank 0's state is the one trained)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    model = mlp(D_IN, HIDDEN, D_OUT)
    model[0].requires_grad_(False)  # frozen: in state.buffers
    state = fnlit.TrainState.create(model, fnlit.optim.sgd(0.1), seed=0)
    step = shard(hand_step(model))
    for i in range(steps):
        state, _ = step(state, local(global_batch(i), rank, world))
    plain = unshard_state(state)
    return {"params": plain.params, "buffers": plain.buffers}


def a_rank_fails_in_save_sharded(directory: str, where: str):
    """save_sharded over a checkpoint where one rank fails: rank 0 writing fnlit.json (``where="json"``: fsync
    fails, a full disk) or reading back the ``.metadata`` DCP wrote (``"metadata"``: EIO while checksumming it), or
    rank 1 reading back its own shard file (``"shard"``: EIO while checksumming it). What each rank raised, the
    checkpoint it then restores (by path, full tensors) and the folder's files."""
    import errno
    import os

    import fnlit.sharded_checkpoint as sc

    _, state = make_state()
    state = shard_state(state)
    path = save_sharded(f"{directory}/ckpt", state)
    if where == "json":
        owner, name, real = os, "fsync", os.fsync

        def failing(fd):
            if dist.get_rank() == 0 and os.readlink(f"/proc/self/fd/{fd}").endswith("fnlit.json"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd)
    else:
        owner, name, real = sc, "_file_crc", sc._file_crc
        rank, prefix = (0, ".metadata") if where == "metadata" else (1, "__1_")

        def failing(p):
            if dist.get_rank() == rank and p.name.startswith(prefix):
                raise OSError(errno.EIO, "Input/output error")
            return real(p)

    setattr(owner, name, failing)
    try:
        save_sharded(path, state.replace(step=state.step + 1))
        raised = None
    except fnlit.CheckpointError as e:
        raised = str(e)
    finally:
        setattr(owner, name, real)
    return raised, by_path(restore_sharded(path, like=state)), by_path(state), sorted(os.listdir(directory))


def no_host_sync_of_a_first_shard_step():
    """fnlit.testing.assert_no_host_sync over fnlit.shard's first call on a state not sharded yet (which builds the
    default mesh and shards the state), and over a step reading its loss: what each raises, or None."""
    model, state = make_state()
    data = local(global_batch(0), dist.get_rank(), dist.get_world_size())
    inner = hand_step(model)

    def reads(state, batch):
        new, metrics = inner(state, batch)
        metrics["loss"].item()
        return new, metrics

    out = {}
    for name, step in [("first call", shard(inner)), ("a read of the loss", shard(reads))]:
        try:
            fnlit.testing.assert_no_host_sync(step, state, data)
            out[name] = None
        except AssertionError as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out


def trees_close_of_sharded_states():
    """fnlit.testing.assert_trees_close on every rank: a sharded state after 2 steps against a plain one stepped alike
    on the global batch (the reference, given), and against itself with one parameter changed: what each raises, or
    None."""
    model, state = make_state()
    sharded, plain, step = shard_state(state), state, hand_step(model)
    rank, world = dist.get_rank(), dist.get_world_size()
    for i in range(2):
        sharded, _ = shard(step)(sharded, local(global_batch(i), rank, world))
        plain, _ = step(plain, global_batch(i))
    changed = sharded.replace(params={**sharded.params, "3.bias": sharded.params["3.bias"] + 1})
    out = {}
    for name, (a, e) in {"vs one process": (sharded, plain), "a changed bias": (changed, sharded)}.items():
        try:
            fnlit.testing.assert_trees_close(a, e, rtol=0, atol=1e-5, name="state")
            out[name] = None
        except Exception as e:  # noqa: BLE001 (returned to the test: torch's own errors too)
            out[name] = f"{type(e).__name__}: {e}"
    return out
