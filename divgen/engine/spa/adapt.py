"""`spa adapt`: one LoRA adapter per partition, trained with a plain torch loop, saved in PEFT format.

    train_adapter(lm, examples, TrainConfig(...), out_dir, "part-0")  -> out_dir/part-0 (PEFT dir)
    adapt_partitions(lm, partitions_json, out_dir, cfg)                -> one adapter per partition

Loop: AdamW at a constant learning rate on the mean response loss (``finetune.response_loss``).
Step s trains on examples [s·batch, (s+1)·batch) of an endless stream of epochs, each a fresh
permutation drawn from (seed, epoch), so the batches of a run are a pure function of the seed.

Resuming: a finished adapter (its PEFT directory exists) is skipped. While an adapter trains, a
checkpoint (LoRA weights, optimizer state, step) is written atomically every ``checkpoint_every``
steps to ``out_dir/.<name>.ckpt.pt``; a killed run picks up from it and ends with the same weights
as a run that was never killed. A checkpoint from different data or settings is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from divgen.engine.errors import DivgenError
from divgen.engine.model import LoadedModel
from divgen.engine.spa.adapter_files import MANIFEST, adapter_dirs, is_complete  # noqa: F401
from divgen.engine.spa.config import TrainConfig  # noqa: F401  (re-exported)
from divgen.engine.spa.data import Example
from divgen.engine.spa.finetune import TrainableLora, collate, encode_example, response_loss
from divgen.engine.spa.lora import CONFIG_NAME, WEIGHTS_NAME, LoraAdapter, LoraConfig, base_probe, load_adapter, save_adapter

TRAIN_LOG = "divgen_train.json"


def base_model_name(lm: LoadedModel) -> str:
    """What goes into base_model_name_or_path: the local weights directory when there is one."""
    return str(lm.source_dir) if lm.source_dir is not None else lm.name


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of optimizer step ``step`` (a pure function of its arguments)."""
    out, start = [], step * batch_size
    for pos in range(start, start + batch_size):
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[offset]))
    return out


def _fingerprint(examples: list[Example], cfg: TrainConfig) -> str:
    h = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode())
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.response]).encode())
    return h.hexdigest()[:16]


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_adapter(lm: LoadedModel, examples: list[Example], cfg: TrainConfig, out_dir: str | os.PathLike,
                  name: str, progress: bool = True, stop_after: int | None = None) -> LoraAdapter | None:
    """Train (or resume, or skip if finished) one adapter; returns it, saved at ``out_dir/name``.

    ``stop_after`` ends the run after that many steps *of this call* without saving the adapter
    (a checkpoint is written): tests use it to simulate a killed run; returns None then.
    """
    from divgen.engine.progress import progress_bar

    cfg.check()
    if not examples:
        raise DivgenError(f"adapter {name} has no training examples: its partition is empty")
    out_dir = Path(out_dir)
    final = out_dir / name
    if is_complete(final):
        return load_adapter(final, name=name, model=lm.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / f".{name}.ckpt.pt"
    fingerprint = _fingerprint(examples, cfg)
    encoded = [encode_example(lm, ex, cfg.max_length) for ex in examples]

    lora = TrainableLora(lm.model, cfg.lora_config(base_model_name(lm)), seed=cfg.seed)
    try:
        opt = torch.optim.AdamW(lora.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        start, losses = 0, []
        if ckpt_path.exists():
            state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            if state.get("fingerprint") != fingerprint:
                raise DivgenError(f"checkpoint {ckpt_path} was made with other data or settings: delete it to "
                                  "start this adapter again, or rerun with the original settings")
            lora.load_state(state["lora"])
            opt.load_state_dict(state["optimizer"])
            start, losses = int(state["step"]), list(state["losses"])
        lora.train(True)
        bar = progress_bar(cfg.steps, f"adapt {name}", "step", initial=start, enabled=progress, leave=False)
        t0 = time.perf_counter()
        for step in range(start, cfg.steps):
            rows = batch_indices(len(encoded), cfg.batch_size, cfg.seed, step)
            batch = collate([encoded[i] for i in rows], lm.pad_token_id, lm.device)
            lora.set_dropout_generator(torch.Generator(device=lm.device).manual_seed(cfg.seed * 7919 + step)
                                       if cfg.dropout > 0 else None)
            loss = response_loss(lm.model, batch)
            if not torch.isfinite(loss):
                raise DivgenError(f"adapter {name}: the loss became {loss.item()} at step {step}: lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            done = step + 1
            stopping = stop_after is not None and done - start >= stop_after and done < cfg.steps
            if done < cfg.steps and (done % cfg.checkpoint_every == 0 or stopping):
                _save_checkpoint(ckpt_path, {"fingerprint": fingerprint, "step": done, "losses": losses,
                                             "lora": lora.state(), "optimizer": opt.state_dict()})
            if stopping:
                bar.close()
                return None
        bar.close()
        lora.train(False)
        adapter = lora.to_adapter(name, base_probe(lm.model))
    finally:
        lora.remove()
    save_adapter(adapter, final)
    log = {"examples": len(examples), "train_config": asdict(cfg), "losses": losses,
           "seconds_this_run": round(time.perf_counter() - t0, 2), "fingerprint": fingerprint}
    (final / TRAIN_LOG).write_text(json.dumps(log, indent=2) + "\n")
    if ckpt_path.exists():
        ckpt_path.unlink()
    adapter.path = final
    return adapter


def adapt_partitions(lm: LoadedModel, examples: list[Example], assignment: list[int], k: int, cfg: TrainConfig,
                     out_dir: str | os.PathLike, progress: bool = True, names: list[str] | None = None) -> list[Path]:
    """Train one adapter per partition (``assignment[i]`` is example i's partition); write a manifest."""
    if len(assignment) != len(examples):
        raise DivgenError(f"the partition file assigns {len(assignment)} examples but the data has {len(examples)}: "
                          "pass the data file the partitions were made from")
    out_dir = Path(out_dir)
    names = names or [f"part-{j}" for j in range(k)]
    paths = []
    for j in range(k):
        subset = [ex for ex, part in zip(examples, assignment) if part == j]
        if progress:
            print(f"adapter {names[j]}: {len(subset)} examples", file=sys.stderr)
        train_adapter(lm, subset, cfg, out_dir, names[j], progress=progress)
        paths.append(out_dir / names[j])
    write_manifest(out_dir, names, {"train_config": asdict(cfg),
                                    "sizes": [sum(1 for p in assignment if p == j) for j in range(k)]})
    return paths


def write_manifest(out_dir: Path, names: list[str], extra: dict) -> None:
    from divgen.engine.files import write_file_atomic

    write_file_atomic(out_dir / MANIFEST, json.dumps({"adapters": names, **extra}, indent=2) + "\n")
