"""Settings of SPA's training (``TrainConfig``) and LiSSA (``LissaConfig``), checked without torch.

Both check their values in the constructor with the limits of ``engine/limits.py``; a message names
the command-line flag and the field (``--lora-alpha (lora_alpha) must be ...``), so the CLI builds
them before importing torch or loading a model, and Python callers get the same limits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from divgen.engine import limits
from divgen.engine.errors import DivgenError

MAX_RANK = 4096
MAX_STEPS = 10_000_000
MAX_LENGTH = 1 << 20


@dataclass
class TrainConfig:
    """Settings of one adapter's training run."""

    rank: int = 8                                   # LoRA rank r
    lora_alpha: float = 16.0                        # PEFT's lora_alpha (scale = lora_alpha / r)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lr: float = 1e-3                                # AdamW learning rate (constant)
    steps: int = 30                                 # optimizer steps
    batch_size: int = 4                             # examples per step
    seed: int = 0                                   # init of A, batch order, dropout
    dropout: float = 0.0                            # LoRA dropout on the adapter input
    weight_decay: float = 0.0
    max_length: int = 256                           # prompt + response tokens (response is cut)
    checkpoint_every: int = 10                      # steps between resumable checkpoints
    layers: list[int] | None = None                 # layers_to_transform (None = every layer)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        n = limits.number
        self.rank = n(self.rank, "--rank (rank)", low=1, high=MAX_RANK, integer=True)
        self.lora_alpha = n(self.lora_alpha, "--lora-alpha (lora_alpha)", low=0.0, high=1e6, low_open=True)
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise DivgenError("--target-modules is empty: name the layers to adapt, e.g. q_proj,v_proj")
        self.lr = n(self.lr, "--lr (lr)", low=0.0, high=10.0, low_open=True)
        self.steps = n(self.steps, "--steps (steps)", low=1, high=MAX_STEPS, integer=True)
        self.batch_size = n(self.batch_size, "--batch-size (batch_size)", low=1, high=limits.MAX_SAMPLES, integer=True)
        self.seed = limits.seed(self.seed, "--train-seed (seed)")
        self.dropout = n(self.dropout, "--dropout (dropout)", low=0.0, high=1.0, high_open=True)
        self.weight_decay = n(self.weight_decay, "weight_decay", low=0.0, high=10.0)
        self.max_length = n(self.max_length, "--max-length (max_length)", low=2, high=MAX_LENGTH, integer=True)
        self.checkpoint_every = n(self.checkpoint_every, "--checkpoint-every (checkpoint_every)", low=1,
                                  high=MAX_STEPS, integer=True)
        if self.layers is not None:
            self.layers = [n(i, "layers (layers_to_transform)", low=0, high=100_000, integer=True) for i in self.layers]

    def lora_config(self, base_name: str | None):
        from divgen.engine.spa.lora import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.lora_alpha, target_modules=list(self.target_modules),
                          lora_dropout=self.dropout, base_model_name_or_path=base_name,
                          layers_to_transform=self.layers)


@dataclass
class LissaConfig:
    """LiSSA settings (see ``influence.py``'s docstring)."""

    depth: int = 20                 # recursion steps J per repeat
    repeats: int = 1                # independent runs averaged
    batch_size: int = 4             # examples per Hessian-vector product
    damping: float = 0.01           # λ, added to H
    scale: float | str = "auto"     # s; "auto" = 1.5 × (power-iteration |λ_max| + λ)
    power_iterations: int = 8       # for scale="auto"
    seed: int = 0

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        n = limits.number
        self.depth = n(self.depth, "--lissa-depth (depth)", low=1, high=MAX_STEPS, integer=True)
        self.repeats = n(self.repeats, "--lissa-repeats (repeats)", low=1, high=10_000, integer=True)
        self.batch_size = n(self.batch_size, "--lissa-batch (batch_size)", low=1, high=limits.MAX_SAMPLES, integer=True)
        self.damping = n(self.damping, "--lissa-damping (damping)", low=0.0, high=1e6)
        if self.scale != "auto":
            self.scale = n(self.scale, "--lissa-scale (scale)", low=0.0, high=1e12, low_open=True, hint=" or 'auto'")
        self.power_iterations = n(self.power_iterations, "power_iterations", low=1, high=10_000, integer=True)
        self.seed = limits.seed(self.seed, "--seed (seed)")
