"""Test configuration: hardware gating lives here and only here.

* Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET=1 must be set before
  triton is first imported, so it is set at conftest import time.
* Tests that need a GPU carry ``@pytest.mark.gpu`` and are skipped without CUDA.
* Kernel tests take the ``kernel_device`` fixture (or ``on_kernel_device``): CUDA tensors when
  CUDA is present, CPU tensors under the interpreter otherwise. One fixture, both machines.
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


def import_vllm_dependency(name: str):
    """``pytest.importorskip(name)`` in the default suite; under ``make test-vllm``
    (DIVGEN_REQUIRE_VLLM=1) a missing module fails the file with one line naming the fix."""
    if not os.environ.get("DIVGEN_REQUIRE_VLLM"):
        return pytest.importorskip(name)
    import importlib
    import sys

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.fail(f"make test-vllm: {name} is not importable in {sys.executable} ({exc}); rebuild the vLLM "
                    "venv: rm -rf .venv-vllm && make test-vllm", pytrace=False)


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


KERNEL_DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    """Where the Triton kernels run in tests: the GPU when there is one, else the interpreter (CPU)."""
    return KERNEL_DEVICE


def _moved(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_moved(v, device) for v in value)
    if isinstance(value, list):
        return [_moved(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    return value


class OnDevice:
    """A kernel module whose functions take CPU tensors, run on ``device`` and return CPU tensors
    (so one test body serves the interpreter and a GPU). In-place outputs: use the module itself."""

    def __init__(self, module, device: torch.device):
        self.module, self.device = module, device

    def __getattr__(self, name):
        attr = getattr(self.module, name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        def call(*args, **kwargs):
            return _moved(attr(*_moved(args, self.device), **_moved(kwargs, self.device)), torch.device("cpu"))

        return call


@pytest.fixture(scope="session")
def on_kernel_device(kernel_device):
    """``on_kernel_device(module)``: the module's functions run on the kernel device (see OnDevice)."""
    return lambda module: OnDevice(module, kernel_device)


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


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random 2-layer Llama with the embedded model's tokenizer and chat template (SPA tests)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from divgen.engine.model import resolve_model_dir

    source, _ = resolve_model_dir(None)
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, d / name)
    return d


@pytest.fixture(scope="session", autouse=True)
def cpu_attention_built():
    """The CPU decode-attention, GEMM and sampler kernels are compiled (or found in torch's extensions folder)
    once, before any test: their one-line build notices never land inside a test that reads stderr."""
    from divgen.engine.models import cpu_attention

    if os.environ.get("DIVGEN_CPU_ATTENTION", "auto") != "torch":
        cpu_attention.native_op()
    if os.environ.get("DIVGEN_GEMM", "") in ("", "native"):
        from divgen.engine.models import cpu_gemm

        cpu_gemm.ops()
    if os.environ.get("DIVGEN_CPU_SAMPLER", "") in ("", "auto", "native"):
        from divgen.kernels import cpu_sample

        cpu_sample._NATIVE.get()
