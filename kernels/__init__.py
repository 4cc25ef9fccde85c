"""divgen kernels: Triton ops, each with a pure-torch twin of the same signature in ``reference``.

Dispatch rule (one place, no hidden switches): a call runs the Triton kernel when its tensors are
on a CUDA device and triton imports; otherwise the torch reference. ``DIVGEN_KERNELS=reference``
forces the reference everywhere (for A/B comparisons in benchmarks); it is read on every call.
Under ``TRITON_INTERPRET=1`` the Triton kernels also run on CPU tensors; tests call the kernel
modules directly for that.
"""
from __future__ import annotations

import os

import torch

from divgen.kernels import reference
from divgen.kernels.reference import uniform_noise

# Import the Triton modules *before* defining the dispatch functions: loading a submodule binds
# it as an attribute of this package, which would otherwise replace the function of the same
# name (divgen.kernels.guided_sample) on first use.
try:
    from divgen.kernels import guided_sample as _guided_sample_triton
    from divgen.kernels import lora as _lora_triton
except ImportError:  # no triton: the references serve every device
    _guided_sample_triton = _lora_triton = None

__all__ = ["guided_sample", "add_lora", "uses_triton", "uniform_noise", "reference"]


def uses_triton(device: torch.device | str) -> bool:
    """True when ops on tensors of this device run as Triton kernels."""
    if os.environ.get("DIVGEN_KERNELS", "") == "reference":
        return False
    return torch.device(device).type == "cuda" and _guided_sample_triton is not None


def guided_sample(logits, mix, *, seeds, step, temperature=1.0, alpha=0.0, top_k=0, top_p=1.0,
                  noise=None, return_logprobs=False):
    """Guided sampling; see ``divgen.kernels.reference.guided_sample`` for the semantics."""
    if uses_triton(logits.device):
        impl = _guided_sample_triton.guided_sample
    else:
        impl = reference.guided_sample
    return impl(logits, mix, seeds=seeds, step=step, temperature=temperature, alpha=alpha,
                top_k=top_k, top_p=top_p, noise=noise, return_logprobs=return_logprobs)


def add_lora(y, x, lora_a, lora_b, indices, scales):
    """Multi-LoRA ``y += scale · (x @ A[idx]ᵀ) @ B[idx]ᵀ`` per row; see ``reference.add_lora``."""
    if uses_triton(x.device):
        impl = _lora_triton.add_lora
    else:
        impl = reference.add_lora
    return impl(y, x, lora_a, lora_b, indices, scales)
