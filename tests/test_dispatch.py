"""The kernels' dispatch point survives imports of the kernel modules and picks the reference on CPU."""
import importlib

import torch

import divgen.kernels as kernels
from divgen.kernels import reference


def test_importing_kernel_modules_keeps_dispatch_functions():
    importlib.import_module("divgen.kernels.guided_sample")
    importlib.import_module("divgen.kernels.lora")
    assert callable(kernels.guided_sample) and callable(kernels.add_lora)
    assert kernels.guided_sample.__module__ == "divgen.kernels"


def test_cpu_dispatch_is_the_reference():
    assert not kernels.uses_triton("cpu")
    logits = torch.randn(3, 57)
    seeds = torch.tensor([1, 2, 3])
    got = kernels.guided_sample(logits, None, seeds=seeds, step=4, temperature=0.7)
    assert torch.equal(got, reference.guided_sample(logits, None, seeds=seeds, step=4, temperature=0.7))
    x, y = torch.randn(4, 8), torch.zeros(4, 6)
    a, b = torch.randn(2, 3, 8), torch.randn(2, 6, 3)
    idx, scales = torch.tensor([0, -1, 1, 0]), torch.tensor([0.5, 2.0])
    expected = reference.add_lora(y.clone(), x, a, b, idx, scales)
    assert torch.allclose(kernels.add_lora(y, x, a, b, idx, scales), expected)
