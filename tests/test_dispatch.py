"""The kernel implementation is chosen once, per device, at construction; module names never
shadow the dispatch functions."""
import importlib

import pytest
import torch

import divgen.kernels as kernels
from divgen.kernels import reference


def test_kernel_modules_do_not_shadow_dispatch_functions():
    importlib.import_module("divgen.kernels.guided_sample_triton")
    importlib.import_module("divgen.kernels.lora_triton")
    assert callable(kernels.guided_sample) and callable(kernels.add_lora)
    assert kernels.guided_sample.__module__ == "divgen.kernels"
    assert kernels.add_lora.__module__ == "divgen.kernels"


def test_ops_are_chosen_once_per_device():
    ops = kernels.ops_for("cpu")
    assert ops is kernels.ops_for(torch.device("cpu")) and ops.name == "cpu"
    plan = kernels.build_sample_plan(None, "cpu", rows=3)
    assert plan.ops is ops                                 # the step calls the plan's ops: no lookup


def test_environment_forces_an_implementation_at_construction(monkeypatch):
    monkeypatch.setenv("DIVGEN_KERNELS", "reference")
    assert kernels._default_implementation("cuda") == "reference"
    monkeypatch.setenv("DIVGEN_KERNELS", "triton")
    assert kernels._default_implementation("cpu") == "triton"
    monkeypatch.setenv("DIVGEN_KERNELS", "fast")
    with pytest.raises(ValueError, match="DIVGEN_KERNELS='fast'"):
        kernels._default_implementation("cpu")
    monkeypatch.setenv("DIVGEN_KERNELS", "cpu")
    assert kernels._default_implementation("cuda") == "cpu"
    monkeypatch.delenv("DIVGEN_KERNELS")
    assert kernels._default_implementation("cpu") == "cpu"
    with pytest.raises(ValueError, match="unknown kernel implementation"):
        kernels.ops_for("cpu", "cuda")


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
    plan = kernels.build_lora_plan(idx, 2)
    assert torch.allclose(kernels.add_lora(torch.zeros(4, 6), x, a, b, idx, scales, plan=plan), expected)
