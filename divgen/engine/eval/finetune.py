"""The fine-tuned student: all-MiniLM-L6-v2 weights + a linear classification head, trained end
to end for a few epochs on CPU.

Model: the encoder's token states, mean-pooled over the attention mask (as for the sentence
embeddings), then ``Linear(384, K)``. Training: AdamW (encoder lr ``lr``, head lr ``head_lr``,
weight decay 0.01), cross-entropy, mini-batches of ``batch_size`` in a seeded shuffle, the
encoder's own dropout on, texts truncated to ``max_length`` tokens. The seed fixes the head's
initialisation, the shuffle and the dropout masks (a forked torch RNG: the caller's random
state is untouched), so one seed gives one student.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from divgen.engine.metrics import load_embedding_model, mean_pool


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 3               # passes over the training set
    batch_size: int = 16
    lr: float = 5e-5              # encoder learning rate
    head_lr: float = 2e-3         # classification head learning rate
    max_length: int = 128         # tokens per text (AG News texts average ~50)
    max_steps: int | None = None  # stop after this many optimiser steps (tests: a couple)


class FinetunedStudent(torch.nn.Module):
    def __init__(self, encoder, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids, attention_mask, **extra) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return self.head(mean_pool(hidden, attention_mask))                 # [B, K]


def train_finetuned(texts: list[str], labels: list[int], num_classes: int, seed: int,
                    config: FinetuneConfig = FinetuneConfig()) -> tuple[FinetunedStudent, int]:
    """Train one student; returns it (eval mode) and the optimiser steps taken."""
    tok, base = load_embedding_model()
    y_all = torch.tensor(labels, dtype=torch.long)
    steps = 0
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(int(seed))
        student = FinetunedStudent(copy.deepcopy(base), num_classes).train()
        opt = torch.optim.AdamW([{"params": student.encoder.parameters(), "lr": config.lr},
                                 {"params": student.head.parameters(), "lr": config.head_lr}], weight_decay=0.01)
        gen = torch.Generator().manual_seed(int(seed))
        for _ in range(config.epochs):
            order = torch.randperm(len(texts), generator=gen).tolist()
            for start in range(0, len(order), config.batch_size):
                idx = order[start:start + config.batch_size]
                enc = tok([texts[i] for i in idx], padding=True, truncation=True,
                          max_length=config.max_length, return_tensors="pt")
                loss = torch.nn.functional.cross_entropy(student(**enc), y_all[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
                if config.max_steps is not None and steps >= config.max_steps:
                    return student.eval(), steps
    return student.eval(), steps


def predict_finetuned(student: FinetunedStudent, texts: list[str], batch_size: int = 64,
                      max_length: int = 128) -> torch.Tensor:
    """[N] predicted class indices (texts batched by length; padding is masked, order kept)."""
    tok, _ = load_embedding_model()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.zeros(len(texts), dtype=torch.long)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            out[idx] = student(**enc).argmax(dim=1)
    return out
