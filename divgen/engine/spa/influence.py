"""Influence of training examples on query losses, over the LoRA parameters θ of one adapter.

For a LoRA adapter trained on the whole set (θ*), training loss R(θ) = mean_z L(z, θ) and a query q
with loss L(q, θ) (its response's mean NLL), the influence-function score used to partition is

    score(z, q) = ∇L(q)ᵀ (H + λI)⁻¹ ∇L(z),      H = ∇²R(θ*)                         (method "lissa")

i.e. minus Koh & Liang's I_up,loss(z, q): the predicted *decrease* of q's loss when z is
up-weighted, so a larger score means z helps q more. The cheaper option drops the Hessian:

    score(z, q) = cos(∇L(z), ∇L(q))                                                   (method "gradsim")

(H + λI)⁻¹ v comes from LiSSA (Agarwal et al. 2017, as used by Koh & Liang and the SPA paper):

    h₀ = v,   h_j = v + h_{j-1} − (H_j h_{j-1} + λ h_{j-1}) / s,      (H + λI)⁻¹ v ≈ h_J / s

with H_j the Hessian of the loss on a random mini-batch (Hessian-vector products by double
backprop, exact, no Gauss-Newton approximation) and s a scale larger than H's largest eigenvalue
(``scale="auto"``: 1.5 × a power-iteration estimate of |λ_max| + λ). The fixed point solves
(H + λI) h / s = v exactly; the iteration converges when every eigenvalue of (H + λI)/s is in
(0, 2). ``repeats`` independent runs are averaged. All K query vectors share each mini-batch's
gradient graph.

Per-example gradients come in batches (``per_example_gradients``): one forward and one backward of
the *summed* losses of B examples, with every LoRA layer's input x [B, T, in] and output gradient
g = ∂L/∂y [B, T, out] captured by hooks. Rows of a batch never interact (left padding, their own
positions and masks), so example b's gradient is exactly

    ∂L_b/∂B = s · Σ_t g[b, t] ⊗ (A x[b, t])        ∂L_b/∂A = s · Σ_t (Bᵀ g[b, t]) ⊗ x[b, t]

(two einsums per layer; s = the layer's LoRA scale). Cost: one batched backward per B examples
instead of B backwards of one; memory O(B · T · Σ(in + out)) for the captures plus B · P for the
gradients. The scores need only the dot products with the K query vectors, so the N examples
stream through in batches: time O(N), memory O(N · K) for the scores, independent of N otherwise.

The double backward needs attention without fused kernels: the model is switched to eager
attention for the Hessian-vector products and back afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from divgen.engine.errors import DivgenError
from divgen.engine.spa.config import LissaConfig  # noqa: F401  (re-exported)
from divgen.engine.spa.finetune import Encoded, TrainableLora, collate, per_example_loss


@contextmanager
def eager_attention(model: nn.Module):
    """Run attention as plain matmuls (twice differentiable) inside the block."""
    config = getattr(model, "config", None)
    old = getattr(config, "_attn_implementation", None)
    if config is None or old in (None, "eager"):
        yield
        return
    setter = getattr(model, "set_attn_implementation", None)
    try:
        if setter is not None:
            setter("eager")
        else:
            config._attn_implementation = "eager"
        yield
    finally:
        if setter is not None:
            setter(old)
        else:
            config._attn_implementation = old


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def example_gradient(model: nn.Module, lora: TrainableLora, item: Encoded, pad_id: int, device) -> torch.Tensor:
    """∇θ L(z) of one example, flattened [P] fp32."""
    params = lora.parameters()
    loss = per_example_loss(model, collate([item], pad_id, device))[0]
    return flat(torch.autograd.grad(loss, params)).float()


def per_example_gradients(model: nn.Module, lora: TrainableLora, items: list[Encoded], pad_id: int,
                          device) -> torch.Tensor:
    """∇θ L(z_b) of every example of ``items`` in one batched backward, [B, P] fp32, in the order of
    ``example_gradient`` (A then B of every layer, sorted layer order). See the module docstring."""
    captured: dict[str, list] = {}
    handles = []

    def hook(path):
        def fn(module, inputs, output):
            entry = captured[path] = [inputs[0].detach().float(), None]
            output.register_hook(lambda g: entry.__setitem__(1, g.detach().float()))
        return fn

    try:
        for path, layer in lora.layers.items():
            handles.append(layer.register_forward_hook(hook(path)))
        params = lora.parameters()
        losses = per_example_loss(model, collate(items, pad_id, device))
        torch.autograd.grad(losses.sum(), params)          # fills the output gradients of the hooks
    finally:
        for h in handles:
            h.remove()
    out = []
    with torch.no_grad():
        for path in lora.paths:
            layer = lora.layers[path]
            x, g = captured.pop(path)                                       # [B, T, in], [B, T, out]
            if g is None:                                                    # no path from the loss
                g = torch.zeros(*x.shape[:2], layer.lora_B.shape[0], device=x.device)
            a, b = layer.lora_A.float(), layer.lora_B.float()
            u = x @ a.T                                                      # [B, T, r]
            grad_b = layer.scale * torch.einsum("bto,btr->bor", g, u)        # [B, out, r]
            grad_a = layer.scale * torch.einsum("btr,bti->bri", g @ b, x)    # [B, r, in]
            out += [grad_a.reshape(len(items), -1), grad_b.reshape(len(items), -1)]
    return torch.cat(out, dim=1)


def hvp(model: nn.Module, lora: TrainableLora, items: list[Encoded], vectors: torch.Tensor, pad_id: int,
        device) -> torch.Tensor:
    """H v for every row v of ``vectors`` [K, P], H = Hessian of the mean loss of ``items``. Returns [K, P]."""
    params = lora.parameters()
    loss = per_example_loss(model, collate(items, pad_id, device)).mean()
    grads = flat(torch.autograd.grad(loss, params, create_graph=True))
    out = []
    for k in range(vectors.shape[0]):
        hv = torch.autograd.grad(grads @ vectors[k].to(grads.dtype), params, retain_graph=k + 1 < vectors.shape[0])
        out.append(flat(hv).float())
    return torch.stack(out)


def _minibatch(gen: torch.Generator, n: int, size: int) -> list[int]:
    return torch.randperm(n, generator=gen)[: min(size, n)].tolist()


def estimate_scale(model, lora, items, cfg: LissaConfig, pad_id, device) -> float:
    """1.5 × (|largest eigenvalue| of H on one mini-batch, by power iteration, + damping)."""
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    batch = [items[i] for i in _minibatch(gen, len(items), cfg.batch_size)]
    v = torch.randn(1, lora.num_parameters(), generator=gen)
    v = v / v.norm()
    eig = 0.0
    for _ in range(cfg.power_iterations):
        hv = hvp(model, lora, batch, v.to(device), pad_id, device).cpu()
        eig = float(hv.norm())
        if eig == 0:
            break
        v = hv / eig
    return 1.5 * (abs(eig) + cfg.damping) if eig > 0 else 1.0


def lissa(model: nn.Module, lora: TrainableLora, items: list[Encoded], vectors: torch.Tensor, cfg: LissaConfig,
          pad_id: int, device, progress: bool = True) -> torch.Tensor:
    """(H + λI)⁻¹ v for every row of ``vectors`` [K, P] by LiSSA. Returns [K, P] fp32."""
    from divgen.engine.progress import progress_bar

    cfg.check()
    with eager_attention(model):
        scale = estimate_scale(model, lora, items, cfg, pad_id, device) if cfg.scale == "auto" else float(cfg.scale)
        v = vectors.float().to(device)
        total = torch.zeros_like(v)
        bar = progress_bar(cfg.depth * cfg.repeats, "LiSSA", "hvp", enabled=progress, leave=False)
        for rep in range(cfg.repeats):
            gen = torch.Generator().manual_seed(cfg.seed * 9973 + rep)
            h = v.clone()
            for _ in range(cfg.depth):
                batch = [items[i] for i in _minibatch(gen, len(items), cfg.batch_size)]
                h = v + h - (hvp(model, lora, batch, h, pad_id, device) + cfg.damping * h) / scale
                if not torch.isfinite(h).all() or float(h.norm()) > 1e6 * float(v.norm()) * cfg.depth:
                    raise DivgenError(f"LiSSA diverged (scale {scale:.3g}, damping {cfg.damping}): raise "
                                      "--lissa-damping or --lissa-scale")
                bar.update(1)
            total += h / scale
        bar.close()
    return total / cfg.repeats
