import importlib.util
import os

import pytest
import torch

# Without CUDA, Triton kernels (the log-prob op's Triton backend) run in Triton's interpreter; the
# variable must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def pytest_collection_modifyitems(config, items):
    skips = {
        "gpu": (not torch.cuda.is_available(), "needs a CUDA device"),
        "sglang": (not _has("sglang"), "needs the sglang package (pip install '.[sglang]')"),
        "te": (not _has("transformer_engine"), "needs transformer-engine (pip install '.[te]')"),
    }
    for item in items:
        for mark, (cond, why) in skips.items():
            if cond and mark in item.keywords:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls on a shared 2-core box: intra-op threads only add contention (100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
