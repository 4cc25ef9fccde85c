"""Test configuration: hardware gating lives here and only here.

* Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET=1 must be set before
  triton is first imported, so it is set at conftest import time.
* Tests that need a GPU carry ``@pytest.mark.gpu`` and are skipped without CUDA.
* Nothing may reach a model hub.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: loads the embedded model or runs a long job")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def embedded_lm():
    """The embedded SmolLM2-135M-Instruct, loaded once for the whole session (CPU, fp32)."""
    from divgen.engine.model import load_model

    return load_model(None, device="cpu")


def single_thread():
    """One torch thread for a module: the SPA tests' matmuls are tiny, and on a busy 2-core CPU
    two OpenMP threads wait on each other far longer than they compute. Test modules opt in with
    ``one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
