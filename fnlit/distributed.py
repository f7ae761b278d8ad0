"""The one place fnlit talks to torch.distributed: init, rank/world, local launch, data sharding.

Example:
    >>> import fnlit
    >>> fnlit.distributed.rank(), fnlit.distributed.world_size(), fnlit.distributed.is_main()
    (0, 1, True)
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue as _queue
import socket
import time
import traceback
import types
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["init", "rank", "world_size", "local_rank", "is_main", "barrier", "launch", "shard_indices", "shutdown",
           "check_same_state"]

DEFAULT_TIMEOUT = 1800.0
"""Seconds any collective of :func:`init`'s process group may wait before failing: 30 min, Lightning's default on
every backend (torch's for gloo; its NCCL default is 10 min). A dead rank still fails the others instead of hanging
them forever, and the ranks waiting while rank 0 writes a large checkpoint (or one to network storage) are not cut
off after a couple of minutes. :func:`launch` (tests, local experiments) keeps a short ``collective_timeout`` of
its own."""


def is_initialized() -> bool:
    """Whether a default process group exists (False in a plain single-process run).

    Example:
        >>> is_initialized()
        False
    """
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 when not distributed).

    Example:
        >>> rank()
        0
    """
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 when not distributed).

    Example:
        >>> world_size()
        1
    """
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 when not distributed).

    Example:
        >>> local_rank()  # 0 outside torchrun
        0
    """
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this is rank 0: the process that logs and writes checkpoints.

    Before the process group is initialised, torchrun's ``RANK`` decides (as Lightning's ``rank_zero_only``
    reads it): a logger built at the top of a script, before :func:`init`, stays silent on the other ranks.

    Example:
        >>> if is_main():
        ...     print("only rank 0 prints this")
        only rank 0 prints this
    """
    return rank() == 0 and (is_initialized() or os.environ.get("RANK", "0").strip() in ("", "0"))


def check_same_state(state: Any, group: Any = None) -> None:
    """Raises on every rank when the ranks' states differ (sizes, dtypes, shapes or values of params, buffers,
    optimizer state, step and loss scale). :func:`fnlit.data_parallel` needs every rank to start alike, as DDP
    does (it broadcasts rank 0's at construction); :func:`fnlit.fit` checks it itself. A loop of one's own
    calls this once before its first step (two small collectives; not inside a step). Values are compared
    by two integer checksums of each tensor's bits, one weighted by position: the same values in another order
    differ too.

    Raises:
        ValueError: naming the first tensor that differs, and how to start every rank alike.

    Example:
        >>> # in every rank, after building the state: fnlit.distributed.check_same_state(state)
    """
    from .transforms.data_parallel import check_same_state as check

    check(state, group)


def _extremes(
    values: Sequence[int], device: torch.device | str, group: Any = None
) -> tuple[list[int], list[int]]:
    """Under torch.distributed: the largest and the smallest of each of ``values`` (int64s) over the ranks of ``group``
    (default: all), the same on every rank, so a check on them raises on every rank or on none.

    Sends one collective: an all-reduce MAX of 2 x len(values) int64s on ``device`` (the state's: a NCCL group
    reduces CUDA tensors only), the values and their bitwise complements (the complement of the MAX of the
    complements is the MIN, exact for every int64, which negation is not for -2**63); then one host read.
    """
    sent = torch.tensor([*values, *(~v for v in values)], dtype=torch.int64, device=device)
    dist.all_reduce(sent, op=dist.ReduceOp.MAX, group=group)
    both = sent.tolist()
    return both[: len(values)], [~v for v in both[len(values) :]]


def _all_equal(value: bytes | str | int, device: torch.device | str, group: Any = None) -> bool:
    """Under torch.distributed: whether ``value`` is the same on every rank of ``group`` (default: all); every rank
    gets the same answer. An int (an int64) is compared as it is, bytes or a str (UTF-8) by its CRC-32 (not hash():
    salted per process).

    Sends one collective of two int64s on ``device`` (:func:`_extremes`), then one host read: not inside a step.
    """
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        value = zlib.crc32(value)
    most, least = _extremes([value], device, group)
    return most == least


def barrier() -> None:
    """Waits for every rank (no-op when not distributed).

    Example:
        >>> barrier()  # returns at once in a single process
    """
    if is_initialized():
        dist.barrier()


def init(backend: str | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Initialises the default process group from torchrun's environment variables.

    Outside torchrun (no ``WORLD_SIZE`` in the environment) it does nothing and returns False, so the same
    script runs on one process. The backend defaults to NCCL when CUDA is available, else gloo; with CUDA
    the process's device is set to ``LOCAL_RANK``.

    Args:
        backend: the torch.distributed backend (default: NCCL with CUDA, else gloo).
        timeout: seconds a collective may wait for the other ranks before failing (default
            :data:`DEFAULT_TIMEOUT`, Lightning's 30 minutes: rank 0 writing a checkpoint keeps the others waiting).

    Returns:
        Whether training is distributed.

    Raises:
        ValueError: when ``WORLD_SIZE`` is set but not an integer.

    Example:
        >>> init()  # outside torchrun: one process, nothing to set up
        False
    """
    if is_initialized():
        return True
    size = os.environ.get("WORLD_SIZE")
    if size is None:
        return False
    try:
        if int(size) < 1:
            return False
    except ValueError:
        raise ValueError(
            f"fnlit.distributed.init expected the environment variable WORLD_SIZE to be a number of processes "
            f"(torchrun sets it), got {size!r} instead: unset it to run one process, or start the script with torchrun."
        ) from None
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return True


def shutdown() -> None:
    """Destroys the process group if there is one.

    Example:
        >>> shutdown()  # a no-op without a process group
        >>> is_initialized()
        False
    """
    if is_initialized():
        dist.destroy_process_group()


def shard_indices(n: int, *, rank: int, world_size: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """The indices of an ``n``-example dataset that ``rank`` visits in ``epoch``.

    A permutation drawn from ``(seed, epoch)`` (the same on every rank) is cut so that every rank gets
    ``n // world_size`` examples (the remainder is dropped, so ranks never wait on each other).

    Example:
        >>> shard_indices(6, rank=1, world_size=2, shuffle=False, seed=0, epoch=0)
        [1, 3, 5]
    """
    return _shard_order(n, rank=rank, world_size=world_size, shuffle=shuffle, seed=seed, epoch=epoch).tolist()


def _shard_order(n: int, *, rank: int, world_size: int, shuffle: bool, seed: int, epoch: int) -> torch.Tensor:
    """:func:`shard_indices` as an int64 CPU tensor (8 bytes an example, where a list of Python ints takes ~45).

    Example:
        >>> _shard_order(6, rank=1, world_size=2, shuffle=False, seed=0, epoch=0)
        tensor([1, 3, 5])
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"shard_indices expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
    if shuffle:
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) & 0x7FFF_FFFF_FFFF_FFFF)
        order = torch.randperm(n, generator=g, device="cpu")  # (not torch.set_default_device's)
    else:
        order = torch.arange(n, device="cpu")
    per_rank = n // world_size
    # (contiguous: a copy of this rank's, not a view keeping every rank's indices alive)
    return order[rank : per_rank * world_size : world_size].contiguous()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_START_METHODS = ("spawn", "forkserver")
"""The start methods :func:`launch` accepts. Not "fork": a process that imported torch may have threads running
(OpenMP, autograd, gloo), and a forked copy of a process with threads can deadlock on a lock held by a thread
that does not exist in the child."""

_FORKSERVER_PRELOAD = ["__main__", "torch", "fnlit"]
"""What the forkserver imports once, so that a rank forked from it starts without importing torch again."""


_NOT_IMPORTABLE = (
    "\nfnlit.distributed.launch: this rank could not unpickle fn. fn must be importable by the "
    "child processes: a module-level function in a .py file, not one defined in a notebook cell, in `python -c`, "
    "or under `if __name__ == '__main__':` (the ranks import the module fn is in, and see none of these)."
)


def _worker(payload: Any, args: tuple, r: int, n: int, port: int, backend: str, pg_timeout: float, q: Any,
            env: dict[str, str] | None = None, cwd: str | None = None) -> None:
    if env is not None:  # forkserver: the parent's environment now, not the server's from when it started
        os.environ.clear()
        os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    os.environ.update(
        RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    try:
        try:  # here, not in multiprocessing's start-up: there a failure only reaches this rank's stderr
            fn = pickle.loads(payload) if isinstance(payload, bytes) else payload
        except Exception:
            q.put((r, False, traceback.format_exc() + _NOT_IMPORTABLE))
            return
        torch.set_num_threads(1)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=n,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        # Plain pickle bytes: tensors put on a torch.multiprocessing queue travel as file descriptors
        # that vanish when this process exits before the parent reads them.
        result = pickle.dumps(fn(*args))
        q.put((r, True, result))
    except BaseException:  # report everything, including KeyboardInterrupt, to the parent
        q.put((r, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    nprocs: int,
    *args: Any,
    backend: str = "gloo",
    timeout: float = 300.0,
    collective_timeout: float = 60.0,
    start_method: str = "spawn",
) -> list[Any]:
    """Runs ``fn(*args)`` in ``nprocs`` local processes joined in a process group; returns each rank's result.

    For tests and examples on one machine (use torchrun for real jobs). ``fn``, its arguments and its result
    must be picklable, and ``fn`` importable by the ranks: a module-level function in a .py file (not one defined
    in a notebook cell, in ``python -c``, or under ``if __name__ == "__main__":``). A :class:`fnlit.TrainState` is
    not picklable (its ``tx`` is made of closures): return ``state.params`` or ``state.replace(tx=None)``, or save
    it with :func:`fnlit.checkpoint.save`. Every wait is bounded: a rank that raises or dies makes ``launch`` stop
    the others and raise, and the whole run is cut off after ``timeout`` seconds. Ranks still running then are
    stopped as torchrun stops them: SIGTERM, and SIGKILL 5 s later (so ``launch`` returns at most ~10 s after the
    timeout, with no process of its own left).

    ``start_method="spawn"`` (the default) starts every rank as a fresh Python process, which imports torch
    again: seconds per launch. ``"forkserver"`` (POSIX only) pays that once: the first forkserver launch of the
    calling process starts a server process that imports ``__main__``, torch and fnlit (unless something
    started multiprocessing's forkserver earlier, without them), and every later launch forks its ranks from
    it (a trivial two-rank launch: ~0.1 s instead of ~3 s on a 2-core machine). Use it for many launches from
    one process, as a test suite makes. The ranks still see the caller's current environment variables and
    working directory, as spawned ones do; but what is read once at start-up comes from the server's start:
    what torch reads at import (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ...), the interpreter's own settings
    (``PYTHONHASHSEED``: every rank has the server's string hash seed, where spawned ones differ), and the
    stdout/stderr the ranks print to (the caller's when the server started: a later redirection, or pytest's
    ``capfd``, does not see them). Modules it imported are not reloaded when their files change.

    Args:
        fn: the module-level function each rank runs.
        nprocs: the number of ranks.
        *args: ``fn``'s arguments (picklable).
        backend: the torch.distributed backend (gloo by default).
        timeout: seconds the whole run may take before the ranks are stopped.
        collective_timeout: seconds a collective of the ranks' process group may wait.
        start_method: ``"spawn"`` or ``"forkserver"`` (above). ``"fork"`` is refused: torch may have threads
            running, and forking a process with threads can deadlock the child.

    Raises:
        ValueError: for ``nprocs < 1``, a ``timeout`` or ``collective_timeout`` not above 0, or a ``start_method``
            other than "spawn" or "forkserver".
        RuntimeError: naming the failing rank and its traceback (a rank that cannot import ``fn`` says so), or
            the timeout.
        pickle.PicklingError: (or AttributeError, as pickle raises them) for an ``fn`` or argument that cannot
            be pickled (a lambda, a local function), before any rank starts.

    Example:
        >>> # workers.py (a module-level function, so the spawned processes can import it):
        >>> #     def double_rank():
        >>> #         return 2 * fnlit.distributed.rank()
        >>> from workers import double_rank  # doctest: +SKIP
        >>> launch(double_rank, 2)  # doctest: +SKIP
        [0, 2]
    """
    if nprocs < 1:
        raise ValueError(f"launch expected nprocs >= 1, got {nprocs} instead.")
    for name, seconds in (("timeout", timeout), ("collective_timeout", collective_timeout)):
        if not seconds > 0:  # (NaN too)
            raise ValueError(f"launch expected {name} > 0 (seconds), got {seconds!r} instead.")
    if start_method not in _START_METHODS:
        hint = (" ('fork' is unsafe once torch is imported: its threads can leave a forked child deadlocked)"
                if start_method == "fork" else "")
        raise ValueError(
            f"launch expected start_method 'spawn' or 'forkserver', got {start_method!r} instead{hint}."
        )
    ctx = mp.get_context(start_method)
    env = cwd = None
    if start_method == "forkserver":
        ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)  # (read when the server starts: once per process)
        env, cwd = dict(os.environ), os.getcwd()
    # fn pickled here, so that one that cannot be pickled (a lambda) raises before any rank starts; each rank
    # unpickles it where a failure (fn not importable there) is reported with its traceback. The arguments travel
    # as multiprocessing passes them (tensors in shared memory, mp.Value/Lock/Queue by inheritance).
    try:
        payload: Any = pickle.dumps(fn)
    except Exception:  # (pickle's errors; RuntimeError for a Queue outside a process start)
        if isinstance(fn, types.FunctionType):  # a lambda, a local function: refused before any rank starts
            raise
        payload = fn  # a partial holding a Queue: pickled as the rank starts, as multiprocessing passes it
    q = ctx.Queue()
    port = _free_port()
    procs = [
        # not daemonic: a rank may start processes of its own (DataLoader workers); the finally below ends them
        ctx.Process(target=_worker, args=(payload, args, r, nprocs, port, backend, collective_timeout, q, env, cwd),
                    daemon=False)
        for r in range(nprocs)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout

    def silent_death() -> tuple[int, int] | None:
        """A rank that exited without a result or an error of its own (killed, os._exit): the first one."""
        time.sleep(0.2)  # a dying rank's peers notice first; give its own exit a moment to register
        while True:  # messages already sent: a rank that reported is not silent
            try:
                r2, ok2, value2 = q.get_nowait()
            except _queue.Empty:
                break
            if ok2:
                results[r2] = pickle.loads(value2)
            else:
                failures.setdefault(r2, value2)
        return next(((i, p.exitcode) for i, p in enumerate(procs)
                     if p.exitcode is not None and i not in results and i not in failures), None)

    try:
        while len(results) < nprocs:
            try:
                r, ok, value = q.get(timeout=0.5)
            except _queue.Empty:
                if any(p.exitcode is not None and i not in results for i, p in enumerate(procs)):
                    dead = silent_death()  # (also a clean exit 0 that never returned: a worker calling os._exit)
                    if dead is not None:
                        raise RuntimeError(
                            f"fnlit.distributed.launch: rank {dead[0]} died with exit code {dead[1]}, without "
                            "returning a result or raising."
                        ) from None
                    if failures:
                        r, value = next(iter(failures.items()))
                        raise RuntimeError(f"fnlit.distributed.launch: rank {r} failed:\n{value}") from None
                    continue
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"fnlit.distributed.launch: timed out after {timeout:.0f} s with ranks "
                        f"{sorted(set(range(nprocs)) - set(results))} unfinished."
                    ) from None
                continue
            if not ok:
                failures.setdefault(r, value)
                dead = silent_death()  # its error may only be the knock-on of another rank's death
                if dead is not None:
                    raise RuntimeError(
                        f"fnlit.distributed.launch: rank {dead[0]} died with exit code {dead[1]}, without returning "
                        f"a result or raising; rank {r} failed after it:\n{value}"
                    )
                raise RuntimeError(f"fnlit.distributed.launch: rank {r} failed:\n{value}")
            results[r] = pickle.loads(value)
    finally:
        _stop(procs, finished=len(results) == nprocs)
    return [results[r] for r in range(nprocs)]


def _join_all(procs: list[Any], seconds: float) -> None:
    """Waits for every process to exit, ``seconds`` in all (not each)."""
    end = time.monotonic() + seconds
    for p in procs:
        p.join(timeout=max(0.0, end - time.monotonic()))


def _stop(procs: list[Any], finished: bool, grace: float = 5.0) -> None:
    """Ends the ranks as torchrun's agent does: those that finished get ``grace`` seconds to exit on their own;
    the rest SIGTERM all at once, ``grace`` seconds together, then SIGKILL (fit's SIGTERM handler only asks the
    loop to stop, and a rank blocked in a collective never runs it)."""
    if finished:
        _join_all(procs, grace)
    for p in procs:
        if p.is_alive():
            p.terminate()
    _join_all(procs, grace)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=grace)
