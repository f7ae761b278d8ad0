import functools
import gc
import os

import pytest
import torch

import fnlit

# Full (generation 2) collections walk the whole heap, which dynamo's caches grow as the compile tests run: ~0.5 s
# each here; two workers running the compile, data-parallel and shard tests made 49 of them (27 s of their 4:26
# CPU time). Ten times rarer (the tests' own gc.collect() calls still run), all collections took 15 s instead of 33
# s, and the three files 3:32 instead of 3:53. Young objects are collected as usual.
gc.set_threshold(*gc.get_threshold()[:2], 100)

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # `pytest -n N`: the workers share the cores, not N thread pools each
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # (Linux only)
    torch.set_num_threads(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session", autouse=True)
def _launch_with_forkserver():
    """Every ``fnlit.distributed.launch(...)`` of the suite forks its ranks from one forkserver that imported torch
    and fnlit once (~0.1 s a launch instead of spawn's ~3 s of fresh imports; about 35 launches). Tests call it
    as ``fnlit.distributed.launch``, so patching the module attribute reaches them all; a test passes
    ``start_method="spawn"`` (or calls ``launch.__wrapped__``) to run the default path."""
    spawn_default = fnlit.distributed.launch

    @functools.wraps(spawn_default)
    def launch(fn, nprocs, *args, start_method="forkserver", **kwargs):
        return spawn_default(fn, nprocs, *args, start_method=start_method, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fnlit.distributed, "launch", launch)
        # The ranks' functions live in these modules, which import DTensor and FSDP (1-4 s a rank, each launch): the
        # server imports them once. It runs `python -c`, whose sys.path has this folder only through PYTHONPATH (Python
        # 3.11's forkserver ignores the sys.path multiprocessing hands it; a failed preload import is skipped silently).
        here = os.path.dirname(os.path.abspath(__file__))
        patch.setenv("PYTHONPATH", os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p))
        patch.setattr(fnlit.distributed, "_FORKSERVER_PRELOAD",
                      [*fnlit.distributed._FORKSERVER_PRELOAD, "_dist_workers", "_shard_workers", "_resume_worker"])
        yield


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def meta_default_device():
    """torch.set_default_device("meta"): the stand-in for the LLM-script idiom set_default_device("cuda"). Undone
    with set_default_device(None) when no default was set: setting "cpu" back leaves a device mode on the
    function-mode stack, which every later torch call in the session goes through."""
    before = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None if before.type == "cpu" else before)
