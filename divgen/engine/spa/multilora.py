"""Multi-LoRA serving: every row of a batch may use a different adapter, or none, in one forward.

    with MultiLora(lm.model, adapters) as ml:          # wraps the adapted nn.Linear layers in place
        ml.set_prompt_adapters(["a", "b", "__base__"])   # one slot per prompt given to generate()
        generate(lm, prompts, batch_listeners=[ml])     # set_batch(rows) picks the rows' slots

The layers of divgen's own forward (``LoadedModel.fast``, same layer paths) are wrapped alongside
the HF ones with the same stacked weights, so the adapter of a row follows its KV slot in the
engine: ``set_batch`` gets the prompt row of every slot (-1 = empty slot, base model).

Each wrapped linear computes ``y = W x`` with the base layer, then adds every row's own low-rank
delta with one ``divgen.kernels.add_lora`` call (Triton on CUDA, the torch reference elsewhere):

    x [B, T, H_in] -> [B·T, H_in]      row indices [B] repeated T times (prefill: T = prompt width,
    y [B, T, H_out] -> [B·T, H_out]    decode: T = 1), slot -1 = "__base__" adds nothing

Per layer, the adapters are stacked once at construction: ``lora_a [L, R, H_in]`` and
``lora_b [L, H_out, R]`` with every adapter's rank zero-padded to the largest R (padding adds exact
zeros), and ``scales [L]`` fp32. An adapter that does not change a layer has zeros there.
The slots are global state of the wrapper, so one wrapper serves one generate() at a time.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from divgen import kernels
from divgen.engine.errors import DivgenError
from divgen.engine.spa.lora import BASE, LoraAdapter, replace_module, validate_adapter


class MultiLoraLinear(nn.Module):
    """An nn.Linear plus a stack of LoRA deltas, one chosen per row by the owning ``MultiLora``."""

    def __init__(self, base_layer: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 scales: torch.Tensor, owner: "MultiLora"):
        super().__init__()
        self.base_layer = base_layer
        self.register_buffer("lora_a", lora_a, persistent=False)   # [L, R, H_in]
        self.register_buffer("lora_b", lora_b, persistent=False)   # [L, H_out, R]
        self.register_buffer("scales", scales, persistent=False)   # [L] fp32
        self._owner = [owner]   # a list so nn.Module does not register the owner as a child

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        indices = self._owner[0].token_indices(x)
        if indices is None:                       # every row on the base model
            return y
        y2 = y.view(-1, y.shape[-1])               # [N, H_out]; a view, so add_lora's in-place add lands in y
        kernels.add_lora(y2, x.reshape(-1, x.shape[-1]), self.lora_a, self.lora_b, indices, self.scales,
                         plan=self._owner[0].lora_plan(indices))
        return y


class MultiLora:
    """Serve several LoRA adapters at once on one model; see the module docstring.

    Slots: adapter i (in the order given) is slot i; ``"__base__"`` (or -1) is the base model.
    """

    def __init__(self, model: nn.Module, adapters: Sequence[LoraAdapter]):
        if not adapters:
            raise DivgenError("no adapters given: pass at least one LoRA adapter directory")
        names = [a.name for a in adapters]
        if len(set(names)) != len(names):
            raise DivgenError(f"adapter names must be unique, got {names}: rename the adapter directories")
        if BASE in names:
            raise DivgenError(f"{BASE!r} is reserved for the base model: rename that adapter")
        for adapter in adapters:
            validate_adapter(adapter, model)
        self.model = model
        self.adapters = list(adapters)
        self.names = names
        self._slots: torch.Tensor | None = None          # [P] per prompt
        self._rows: torch.Tensor | None = None           # [B] per batch row (None: all base)
        self._all_base = True                            # short-circuit: no row uses an adapter
        self._expanded: dict[int, torch.Tensor] = {}     # T -> [B·T] indices
        self._plans: dict[int, object] = {}              # B·T -> kernels.build_lora_plan (once per batch)
        self._originals: dict[str, nn.Linear] = {}
        self._install()

    # ---- construction ----
    def _install(self) -> None:
        modules = dict(self.model.named_modules())
        paths = sorted({m for a in self.adapters for m in a.weights})
        # divgen's own forward (engine.models) keeps the HF layer paths: wrap its layers too, so the
        # adapters follow the decode engine's KV slots (built before the HF layers are wrapped).
        from divgen.engine.model import fast_forward

        fast = fast_forward(self.model) if hasattr(self.model, "config") else None
        fast_modules = dict(fast.named_modules()) if fast is not None else {}
        self._fast = fast
        self._fast_originals: dict[str, nn.Linear] = {}
        for path in paths:
            base = modules[path]
            if isinstance(base, MultiLoraLinear):
                raise DivgenError(f"layer {path} already carries multi-LoRA adapters: remove() the other MultiLora first")
            dev, dtype = base.weight.device, base.weight.dtype
            rank = max(a.weights[path][0].shape[0] for a in self.adapters if path in a.weights)
            count = len(self.adapters)
            lora_a = torch.zeros(count, rank, base.in_features, dtype=dtype, device=dev)
            lora_b = torch.zeros(count, base.out_features, rank, dtype=dtype, device=dev)
            scales = torch.zeros(count, dtype=torch.float32, device=dev)
            for j, adapter in enumerate(self.adapters):
                if path in adapter.weights:
                    a, b = adapter.weights[path]
                    lora_a[j, : a.shape[0]] = a.to(dev, dtype)
                    lora_b[j, :, : b.shape[1]] = b.to(dev, dtype)
                    scales[j] = adapter.scale_for(path)
            self._originals[path] = base
            replace_module(self.model, path, MultiLoraLinear(base, lora_a, lora_b, scales, self))
            if path in fast_modules:
                self._fast_originals[path] = fast_modules[path]
                replace_module(fast, path, MultiLoraLinear(fast_modules[path], lora_a, lora_b, scales, self))

    def remove(self) -> None:
        """Put the original linear layers back."""
        for path, base in self._originals.items():
            replace_module(self.model, path, base)
        for path, base in self._fast_originals.items():
            replace_module(self._fast, path, base)
        self._originals.clear()
        self._fast_originals.clear()

    def __enter__(self) -> "MultiLora":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---- slots ----
    def slot_of(self, adapter: int | str) -> int:
        """Slot index of an adapter name (or index); -1 for ``"__base__"``."""
        if isinstance(adapter, str):
            if adapter == BASE:
                return -1
            if adapter not in self.names:
                raise DivgenError(f"unknown adapter {adapter!r}: loaded adapters are {', '.join(self.names)} (or {BASE})")
            return self.names.index(adapter)
        slot = int(adapter)
        if not -1 <= slot < len(self.adapters):
            raise DivgenError(f"adapter slot {slot} is out of range: use -1 (base) to {len(self.adapters) - 1}")
        return slot

    def set_prompt_adapters(self, adapters: Sequence[int | str]) -> None:
        """The adapter of every prompt that the next generate() call gets (names, slots or "__base__")."""
        device = self._device()
        self._slots = torch.tensor([self.slot_of(a) for a in adapters], dtype=torch.int64, device=device)
        self._set_rows(None)

    def set_batch(self, rows: torch.Tensor) -> None:
        """Batch listener: ``rows`` [B] are indices into the prompts, in batch (KV slot) order;
        -1 marks an empty slot, which runs on the base model."""
        if self._slots is None:
            raise DivgenError("multi-LoRA: call set_prompt_adapters() before generate()")
        rows = rows.to(self._slots.device, torch.int64)
        if rows.numel() and int(rows.max()) >= self._slots.shape[0]:
            raise DivgenError(f"multi-LoRA: {self._slots.shape[0]} prompt slots were set but the batch has prompt "
                              f"row {int(rows.max())}: give one adapter per prompt")
        self._set_rows(torch.where(rows >= 0, self._slots[rows.clamp(min=0)], -1))

    def set_row_adapters(self, adapters: Sequence[int | str] | torch.Tensor) -> None:
        """Slots of the rows of the next forwards directly (teacher-forced scoring, benchmarks)."""
        if isinstance(adapters, torch.Tensor):
            self._set_rows(adapters.to(self._device(), torch.int64))
        else:
            self._set_rows(torch.tensor([self.slot_of(a) for a in adapters], dtype=torch.int64, device=self._device()))

    def _set_rows(self, indices: torch.Tensor | None) -> None:
        if indices is not None and bool((indices < 0).all()):
            indices = torch.full_like(indices, -1)
            self._rows, self._all_base = indices, True
        else:
            self._rows, self._all_base = indices, indices is None
        self._expanded = {}
        self._plans = {}

    def _device(self) -> torch.device:
        return next(iter(self._originals.values())).weight.device

    def token_indices(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-token adapter slots [B·T] for an input [B, T, H] (or [B, H]); None when all rows are base."""
        if self._all_base:
            return None
        rows = self._rows.shape[0]
        if x.shape[0] != rows:
            raise RuntimeError(f"multi-LoRA: the forward has {x.shape[0]} rows but the adapter slots describe {rows}; "
                               "call set_batch / set_row_adapters for this batch")
        per_row = x.numel() // (rows * x.shape[-1]) if rows else 1
        idx = self._expanded.get(per_row)
        if idx is None:
            idx = self._rows.repeat_interleave(per_row) if per_row != 1 else self._rows
            self._expanded[per_row] = idx
            self._plans[idx.numel()] = kernels.build_lora_plan(idx, len(self.adapters))
        return idx

    def lora_plan(self, indices: torch.Tensor):
        """The row grouping of ``token_indices``' result, built once per batch composition."""
        return self._plans[indices.numel()]
