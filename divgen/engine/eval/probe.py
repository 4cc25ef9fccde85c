"""The linear probe: multinomial logistic regression on fixed features, in torch.

Objective, for features x_i [D], labels y_i ∈ {0..K−1}, weights W [K, D] and bias b [K]:

    L(W, b) = (1/N) Σ_i −log softmax(W x_i + b)[y_i]  +  (λ/2) ‖W‖²        (b is not penalised)

L is strictly convex in W for λ > 0 (and convex in b), so it has one minimum: the probe is the
minimiser, found by L-BFGS (strong-Wolfe line search) in float64 until the gradient's largest
entry is under ``tol``. Any solver reaching that minimum gives the same probe — the tests check
it against plain gradient descent in numpy. A seed only sets the starting point, so probes of
different seeds agree to the solver tolerance: the probe's spread over seeds is ~0 by design,
and what varies between seeds in ``divgen eval`` is the data (the real-ceiling subsets) and the
fine-tuned student.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_L2 = 1e-2       # λ; chosen by 2-fold cross-validation on the AG News pool rows only
DEFAULT_TOL = 1e-7


@dataclass
class LinearProbe:
    weight: torch.Tensor      # [K, D] float64
    bias: torch.Tensor        # [K] float64

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [N, K]."""
        return x.double() @ self.weight.T + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [N] int64 class indices."""
        return self.logits(x).argmax(dim=1)


def probe_loss(weight, bias, x, y, l2: float) -> torch.Tensor:
    """The objective L(W, b) of the module docstring."""
    return torch.nn.functional.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * (weight * weight).sum()


def train_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, l2: float = DEFAULT_L2,
                seed: int | None = None, tol: float = DEFAULT_TOL, max_rounds: int = 50) -> LinearProbe:
    """Minimise L(W, b) on features ``x`` [N, D] and labels ``y`` [N] (int). ``seed``: a random
    start (None: zeros); the minimum does not depend on it."""
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"train_probe needs x [N, D] and y [N] with N >= 1, got {tuple(x.shape)} and {tuple(y.shape)}")
    if l2 <= 0:
        raise ValueError(f"the L2 weight λ must be > 0 (it makes the minimum unique), got {l2}")
    x = x.detach().double()
    y = y.detach().long()
    d = x.shape[1]
    if seed is None:
        weight = torch.zeros(num_classes, d, dtype=torch.float64)
    else:
        gen = torch.Generator().manual_seed(int(seed))
        weight = 0.01 * torch.randn(num_classes, d, generator=gen, dtype=torch.float64)
    weight.requires_grad_(True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=200, history_size=20, tolerance_grad=tol,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = probe_loss(weight, bias, x, y, l2)
        loss.backward()
        return loss

    with torch.enable_grad():
        for _ in range(max_rounds):
            opt.step(closure)
            closure()
            grad = max(float(weight.grad.abs().max()), float(bias.grad.abs().max()))
            if grad <= tol:
                break
    return LinearProbe(weight.detach().clone(), bias.detach().clone())
