import pytest
import torch


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
