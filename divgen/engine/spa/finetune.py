"""The differentiable LoRA path: one trainable adapter on a frozen model, and the response loss.

Training (``adapt``) and influence scores (``influence``) both need gradients over the LoRA
parameters of a single adapter, so they use this plain torch path; the multi-LoRA wrapper
(``multilora``) is for inference only.

    lora = TrainableLora(lm.model, config, seed=0)      # wraps the target nn.Linear layers
    batch = collate([encode_example(lm, ex) for ex in examples], lm.pad_token_id)
    loss = response_loss(lm.model, batch)               # mean over examples of each one's mean NLL
    adapter = lora.to_adapter("name", base_probe(lm.model)); lora.remove()

Initialisation follows LoRA/PEFT: A ~ kaiming-uniform(a=√5) (nn.Linear's default), B = 0, so a new
adapter starts as the base model. Dropout (if any) acts on the adapter's input only.

The loss of an example is the mean next-token NLL over its response tokens (the response ends
with the EOS token; prompt tokens are not scored); a batch's loss is the mean of its examples'
losses, so every example weighs the same whatever its length (the empirical risk of influence
theory). Batches are left-padded with positions counted from the first real token, the way the
decode engine prefills, so a row's loss does not depend on the batch it is in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from divgen.engine.errors import DivgenError
from divgen.engine.model import LoadedModel
from divgen.engine.spa.data import Example
from divgen.engine.spa.lora import LoraAdapter, LoraConfig, replace_module, target_module_paths


class LoraTrainLinear(nn.Module):
    """y = base(x) + scale · B (A dropout(x)), with A and B trainable."""

    def __init__(self, base_layer: nn.Linear, rank: int, scale: float, dropout: float, generator: torch.Generator):
        super().__init__()
        self.base_layer = base_layer
        dev = base_layer.weight.device
        a = torch.empty(rank, base_layer.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(dev))                                               # [r, H_in]
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, rank, device=dev))  # [H_out, r]
        self.scale = scale
        self.dropout = dropout
        self.dropout_generator: torch.Generator | None = None   # set per step by the trainer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        h = x.to(self.lora_A.dtype)
        if self.training and self.dropout > 0:
            keep = torch.rand(h.shape, generator=self.dropout_generator, device=h.device, dtype=h.dtype) >= self.dropout
            h = h * keep / (1.0 - self.dropout)
        return y + (self.scale * ((h @ self.lora_A.T) @ self.lora_B.T)).to(y.dtype)


class TrainableLora:
    """A single trainable LoRA adapter installed on a frozen model (fp32 adapter weights)."""

    def __init__(self, model: nn.Module, config: LoraConfig, seed: int = 0):
        self.model = model
        self.config = config
        self.paths = sorted(target_module_paths(model, config))
        gen = torch.Generator().manual_seed(int(seed))
        self._frozen = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        modules = dict(model.named_modules())
        self.layers: dict[str, LoraTrainLinear] = {}
        for path in self.paths:
            base = modules[path]
            if not isinstance(base, nn.Linear):
                raise DivgenError(f"layer {path} is a {type(base).__name__}; LoRA needs nn.Linear layers")
            layer = LoraTrainLinear(base, config.rank_for(path), config.scale_for(path), config.lora_dropout, gen)
            replace_module(model, path, layer)
            self.layers[path] = layer

    def parameters(self) -> list[nn.Parameter]:
        """A then B of every layer, in sorted layer order (the flattening order of gradients)."""
        return [p for path in self.paths for p in (self.layers[path].lora_A, self.layers[path].lora_B)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def train(self, mode: bool = True) -> None:
        for layer in self.layers.values():
            layer.train(mode)

    def set_dropout_generator(self, gen: torch.Generator | None) -> None:
        for layer in self.layers.values():
            layer.dropout_generator = gen

    def load(self, adapter: LoraAdapter) -> None:
        """Copy an adapter's weights in (its layers and ranks must be this one's)."""
        if sorted(adapter.weights) != self.paths:
            raise DivgenError(f"adapter {adapter.name} changes other layers than target_modules "
                              f"{self.config.target_modules!r}: use the adapter's own config")
        with torch.no_grad():
            for path, (a, b) in adapter.weights.items():
                layer = self.layers[path]
                if a.shape != layer.lora_A.shape or b.shape != layer.lora_B.shape:
                    raise DivgenError(f"adapter {adapter.name}: layer {path} has rank {a.shape[0]}, expected "
                                      f"{layer.lora_A.shape[0]}")
                layer.lora_A.copy_(a)
                layer.lora_B.copy_(b)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{path}.{w}": getattr(self.layers[path], f"lora_{w}").detach().cpu().clone()
                for path in self.paths for w in ("A", "B")}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for path in self.paths:
                for w in ("A", "B"):
                    getattr(self.layers[path], f"lora_{w}").copy_(state[f"{path}.{w}"])

    def to_adapter(self, name: str, base_probe: list[float] | None = None) -> LoraAdapter:
        weights = {path: (self.layers[path].lora_A.detach().cpu().clone(), self.layers[path].lora_B.detach().cpu().clone())
                   for path in self.paths}
        return LoraAdapter(name=name, config=self.config, weights=weights, base_probe=base_probe)

    def remove(self) -> None:
        """Put the original linear layers back and restore requires_grad."""
        for path, layer in self.layers.items():
            replace_module(self.model, path, layer.base_layer)
        self.layers.clear()
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._frozen.get(n, False))


# ---------------------------------------------------------------------------------------------
# Tokenisation and the response loss
# ---------------------------------------------------------------------------------------------

@dataclass
class Encoded:
    ids: list[int]          # prompt + response + EOS
    n_prompt: int           # how many leading ids are the (formatted) prompt


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, T] left-padded
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor    # [B, T] counted from each row's first real token
    labels: torch.Tensor          # [B, S] targets of the last S positions, -100 = not scored
    response_lengths: torch.Tensor  # [B]


def response_eos_id(lm: LoadedModel) -> int:
    eos = getattr(lm.tokenizer, "eos_token_id", None)
    if eos is not None and (not lm.eos_token_ids or eos in lm.eos_token_ids):
        return int(eos)
    if not lm.eos_token_ids:
        raise DivgenError(f"model {lm.name} has no EOS token: it cannot learn where a response ends")
    return min(lm.eos_token_ids)


def encode_example(lm: LoadedModel, example: Example, max_length: int = 256) -> Encoded:
    """Chat-formatted prompt ids + response ids + EOS; the response is cut to fit ``max_length``."""
    prompt_ids = lm.encode(lm.format_prompt(example.prompt))
    response_ids = list(lm.tokenizer(example.response, add_special_tokens=False)["input_ids"]) + [response_eos_id(lm)]
    if len(prompt_ids) + 1 > max_length:
        raise DivgenError(f"a prompt has {len(prompt_ids)} tokens, more than --max-length {max_length} allows: "
                          "raise --max-length or shorten the prompt")
    response_ids = response_ids[: max_length - len(prompt_ids)]
    return Encoded(prompt_ids + response_ids, len(prompt_ids))


def collate(items: list[Encoded], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    width = max(len(e.ids) for e in items)
    score = max(len(e.ids) - e.n_prompt for e in items)          # response positions to score
    n = len(items)
    input_ids = torch.full((n, width), pad_id, dtype=torch.int64)
    mask = torch.zeros((n, width), dtype=torch.int64)
    labels = torch.full((n, score), -100, dtype=torch.int64)
    lengths = torch.zeros(n, dtype=torch.int64)
    for i, e in enumerate(items):
        input_ids[i, width - len(e.ids):] = torch.tensor(e.ids)
        mask[i, width - len(e.ids):] = 1
        resp = e.ids[e.n_prompt:]
        labels[i, score - len(resp):] = torch.tensor(resp)
        lengths[i] = len(resp)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(input_ids.to(device), mask.to(device), positions.to(device), labels.to(device), lengths.to(device))


def response_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits that predict the last S tokens of every row, [B, S, V]."""
    score = batch.labels.shape[1]
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=False, logits_to_keep=score + 1)
    return out.logits[:, -(score + 1):-1, :]


def per_example_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean NLL of each row's response tokens, [B] fp32."""
    logits = response_logits(model, batch).float()                 # [B, S, V]
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), batch.labels, ignore_index=-100, reduction="none")
    return nll.sum(1) / batch.response_lengths.clamp(min=1)


def response_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean over the batch of each example's mean response NLL (a scalar)."""
    return per_example_loss(model, batch).mean()
