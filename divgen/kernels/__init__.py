"""divgen kernels: Triton ops, each with a pure-torch twin of the same signature in ``reference``.

Implementation choice (one place, made once): ``ops_for(device)`` returns the ``KernelOps`` of a
device — the Triton kernels (``guided_sample_triton``, ``lora_triton``) on CUDA when triton
imports; on CPU ``"cpu"``: the sampling step of ``cpu_sample`` (the reference's tokens without
its full-vocabulary noise and sorts) and the torch reference for the rest; the reference
elsewhere — and caches it, so the choice is made at construction, never per call.
``DIVGEN_KERNELS=reference`` (read when a device's ops are first built, i.e. set it before the
first call) forces the reference everywhere, for A/B runs; ``=triton`` forces the Triton ops
(on CPU they then need ``TRITON_INTERPRET=1``, as the tests set); ``=cpu`` the CPU ops. A
``SamplePlan`` keeps the ops of its device, so the decode step calls them without a lookup.

The capturable sampling interface (DESIGN.md; the engine's decode step builds on it):

    plan = build_sample_plan(mix, device)        # host side, once per batch composition
    tokens = guided_sample_step(logits, plan, seeds, step, temperature, alpha, top_k, top_p,
                                min_p=None, any_top_k_top_p=True)   # device buffers only, no host sync

``guided_sample`` and ``add_lora`` are the checked entry points for direct callers.
"""
from __future__ import annotations

import os

import torch

from divgen.kernels import reference
from divgen.kernels.plan import MAX_GROUP_ROWS, SamplePlan, build_sample_plan
from divgen.kernels.reference import uniform_noise

__all__ = ["KernelOps", "ops_for", "build_sample_plan", "SamplePlan", "guided_sample_step", "guided_sample",
           "greedy_tokens", "add_lora", "build_lora_plan", "uses_triton", "uniform_noise", "reference", "MAX_GROUP_ROWS"]

IMPLEMENTATIONS = ("triton", "reference", "cpu")


class KernelOps:
    """One implementation of every kernel op. Build with ``ops_for``; ``name`` says which."""

    def __init__(self, name: str):
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"unknown kernel implementation {name!r}: use one of {', '.join(IMPLEMENTATIONS)}")
        self.name = name
        if name == "triton":
            from divgen.kernels import guided_sample_triton, lora_triton

            self._sample, self._lora = guided_sample_triton, lora_triton
        else:
            self._sample = self._lora = reference
        self._step = reference.guided_sample_step
        if name == "cpu":
            from divgen.kernels import cpu_sample

            self._step = cpu_sample.guided_sample_step

    @property
    def uses_triton(self) -> bool:
        return self.name == "triton"

    def __repr__(self) -> str:
        return f"KernelOps({self.name!r})"

    # ---- guided sampling ----
    def prepare_plan(self, plan: SamplePlan) -> SamplePlan:
        """What this implementation derives once per plan (the Triton launch tiles)."""
        if self.uses_triton:
            return self._sample.prepare_plan(plan)
        return plan

    def guided_sample_step(self, logits, plan, seeds, step, temperature, alpha, top_k, top_p, *,
                           min_p=None, any_top_k_top_p=True, noise=None, return_logprobs=False):
        if plan.own is not None:         # the own-token rule: the torch reference (capturable), any device
            impl = reference.guided_sample_step if self.uses_triton else self._step
            return impl(logits, plan.mix, seeds, step, temperature, alpha, top_k, top_p, min_p=min_p,
                        any_top_k_top_p=any_top_k_top_p, noise=noise, return_logprobs=return_logprobs,
                        own=plan.own)
        if self.uses_triton:
            return self._sample.guided_sample_step(
                logits, plan.for_rows(logits.shape[0]), seeds, step, temperature, alpha, top_k, top_p,
                min_p=min_p, any_top_k_top_p=any_top_k_top_p, noise=noise, return_logprobs=return_logprobs)
        return self._step(
            logits, plan.mix, seeds, step, temperature, alpha, top_k, top_p,
            min_p=min_p, any_top_k_top_p=any_top_k_top_p, noise=noise, return_logprobs=return_logprobs)

    def guided_sample(self, logits, mix, **kwargs):
        return self._sample.guided_sample(logits, mix, **kwargs)

    # ---- multi-LoRA ----
    def build_lora_plan(self, indices: torch.Tensor, num_adapters: int):
        return self._lora.build_lora_plan(indices, num_adapters)

    def add_lora(self, y, x, lora_a, lora_b, indices, scales, plan=None):
        return self._lora.add_lora(y, x, lora_a, lora_b, indices, scales, plan=plan)


_OPS: dict[str, KernelOps] = {}


def _default_implementation(device_type: str) -> str:
    forced = os.environ.get("DIVGEN_KERNELS", "")
    if forced:
        if forced not in IMPLEMENTATIONS:
            raise ValueError(f"DIVGEN_KERNELS={forced!r} is not an implementation: use "
                             f"{' or '.join(IMPLEMENTATIONS)}, or unset it")
        return forced
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "reference"
        return "triton"
    return "cpu" if device_type == "cpu" else "reference"


def ops_for(device: torch.device | str, implementation: str | None = None) -> KernelOps:
    """The kernel ops of a device, built once per device type (``DIVGEN_KERNELS`` read then).

    ``implementation`` ("triton" / "reference" / "cpu") builds that one instead, uncached (tests, benchmarks).
    """
    if implementation is not None:
        return KernelOps(implementation)
    kind = torch.device(device).type
    ops = _OPS.get(kind)
    if ops is None:
        ops = _OPS[kind] = KernelOps(_default_implementation(kind))
    return ops


def uses_triton(device: torch.device | str) -> bool:
    """True when ops on tensors of this device run as Triton kernels."""
    return ops_for(device).uses_triton


def guided_sample_step(logits, plan: SamplePlan, seeds, step, temperature, alpha, top_k, top_p, *,
                       min_p=None, any_top_k_top_p: bool = True, noise=None, return_logprobs: bool = False):
    """One decode step's guided sampling on device buffers (capturable: no host sync, fixed shapes).

    Args:
        logits [R, V] fp32/bf16/fp16; plan: ``build_sample_plan`` for these R rows, or
        ``build_sample_plan(None, device)`` for independent rows of any count (it carries the
        implementation; take one step before capturing a CUDA graph); seeds [R] int64; step [R] int64 (each row's noise counter: noise =
        f(seed, step, token), equal to ``uniform_noise(seeds, step, V)``); temperature [R] fp32
        (< 1e-6: greedy); alpha [R] fp32 (the papers' α on the row's own untempered distribution,
        0 = off); top_k [R] int64 (0 = off); top_p [R] fp32 (1 = off); min_p: [R] fp32 (the peers'
        min-p on the tempered guided distribution, 1 keeps only the max) or None (off, a host
        choice fixed per plan; the Triton step then skips its max pass); any_top_k_top_p: host flag fixed per plan (False skips the cutoff passes and
        ignores top_k/top_p); noise: optional injected [R, V] uniforms (tests).
    Returns: tokens [R] int64 (and log-probs [R] fp32): the tokens of ``guided_sample`` for the
    same integer steps. Nothing is checked (see ``reference``'s rules for non-finite input).
    """
    return plan.ops.guided_sample_step(logits, plan, seeds, step, temperature, alpha, top_k, top_p,
                                       min_p=min_p, any_top_k_top_p=any_top_k_top_p, noise=noise,
                                       return_logprobs=return_logprobs)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(logits, dim=-1)`` (the first index of each row's max). On a CPU, outside
    ``torch.compile``, it is found from 64-token block maxima (argmax over a CPU row is ~8x slower
    than a max); elsewhere it is torch's argmax (capturable)."""
    if logits.device.type == "cpu" and logits.dim() == 2 and not torch.compiler.is_compiling():
        from divgen.kernels.cpu_sample import _first_argmax

        return _first_argmax(logits)[0]
    return torch.argmax(logits, dim=-1)


def guided_sample(logits, mix, *, seeds, step, temperature=1.0, alpha=0.0, top_k=0, top_p=1.0, min_p=0.0,
                  noise=None, return_logprobs=False):
    """Guided sampling with argument checks (direct callers); see ``reference.guided_sample``."""
    return ops_for(logits.device).guided_sample(
        logits, mix, seeds=seeds, step=step, temperature=temperature, alpha=alpha, top_k=top_k, top_p=top_p,
        min_p=min_p, noise=noise, return_logprobs=return_logprobs)


def build_lora_plan(indices: torch.Tensor, num_adapters: int):
    """Rows grouped by adapter, once per batch composition (see ``reference.LoraPlan``)."""
    return ops_for(indices.device).build_lora_plan(indices, num_adapters)


def add_lora(y, x, lora_a, lora_b, indices, scales, plan=None):
    """Multi-LoRA ``y += scale · (x @ A[idx]ᵀ) @ B[idx]ᵀ`` per row; see ``reference.add_lora``.

    ``plan`` (from ``build_lora_plan(indices, L)``) skips the per-call grouping of rows by adapter.
    """
    return ops_for(x.device).add_lora(y, x, lora_a, lora_b, indices, scales, plan=plan)
