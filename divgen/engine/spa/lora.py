"""LoRA adapters in the PEFT on-disk format: ``adapter_config.json`` + ``adapter_model.safetensors``.

An adapter changes some linear layers ``y = W x`` of a base model into

    y = W x + scale · B (A x),      A = lora_A.weight [r, H_in],  B = lora_B.weight [H_out, r]
    scale = lora_alpha / r           (lora_alpha / sqrt(r) with use_rslora)

The file layout is the one PEFT writes for a causal LM, so PEFT's readers load what we save and we
load what PEFT saves:

* tensor names ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` where the module
  path is the layer's name in the HF model (``model.layers.0.self_attn.q_proj`` for Llama);
* ``adapter_config.json`` with ``peft_type: "LORA"``, ``task_type: "CAUSAL_LM"``, ``r``,
  ``lora_alpha``, ``target_modules``, ``rank_pattern``/``alpha_pattern`` (per-module overrides) and
  ``base_model_name_or_path`` (a local directory for the embedded model, so
  ``AutoPeftModelForCausalLM`` finds it without a hub).

divgen also writes a *base-model probe* into the safetensors metadata (``divgen.base_probe``: a few
embedding values of the model the adapter was trained on). PEFT ignores it; on load it lets
``validate_adapter`` tell "this adapter belongs to another base model" apart from a shape error.
It survives dtype changes and quantisation (it is compared by cosine similarity), not a different
checkpoint.

What an adapter may not use (each raises a DivgenError naming it): DoRA, ``fan_in_fan_out``
(GPT-2 Conv1D layers), bias training, ``modules_to_save``, embedding LoRA, LoRA on non-Linear layers.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from divgen.engine.errors import DivgenError
from divgen.engine.files import replaced_dir, umask
from divgen.engine.spa.adapter_files import CONFIG_NAME, WEIGHTS_NAME, check_weights_finite, read_adapter_config
KEY_PREFIX = "base_model.model."
BASE = "__base__"                      # the name of "no adapter" in slot lists
PROBE_KEY = "divgen.base_probe"        # safetensors metadata: embedding probe of the base model
PROBE_SIZE = 64
PROBE_MIN_COSINE = 0.9                 # same checkpoint in any dtype / quantisation: > 0.99

_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")

# PEFT config features divgen does not implement: (key, value that is fine, why / the fix).
_UNSUPPORTED = (
    ("use_dora", False, "DoRA adapters are not supported: merge the adapter or retrain without use_dora"),
    ("fan_in_fan_out", False, "fan_in_fan_out (Conv1D layers, GPT-2 style) is not supported: use a model with nn.Linear layers"),
    ("bias", "none", "adapters that train biases are not supported: retrain with bias='none'"),
    ("lora_bias", False, "adapters with a lora_B bias are not supported: retrain with lora_bias=False"),
    ("modules_to_save", None, "modules_to_save (fully trained extra layers) is not supported: retrain without it"),
    ("layer_replication", None, "layer_replication is not supported"),
    ("target_parameters", None, "target_parameters (LoRA on raw parameters) is not supported"),
    ("trainable_token_indices", None, "trainable_token_indices is not supported"),
    ("exclude_modules", None, "exclude_modules is not supported: list the target modules explicitly"),
)


@dataclass
class LoraConfig:
    """The PEFT LoRA config fields divgen reads and writes."""

    r: int = 8                                         # rank
    lora_alpha: float = 16.0                           # scale = lora_alpha / r
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])  # names or one regex
    lora_dropout: float = 0.0                          # training only
    use_rslora: bool = False                           # scale = lora_alpha / sqrt(r)
    rank_pattern: dict = field(default_factory=dict)   # module-name pattern -> rank
    alpha_pattern: dict = field(default_factory=dict)  # module-name pattern -> alpha
    layers_to_transform: list[int] | int | None = None  # restrict to these layer indices
    base_model_name_or_path: str | None = None

    # ---- per-module values (PEFT's pattern rule: the pattern matches the end of the module path) ----
    @staticmethod
    def _pattern_value(patterns: dict, module: str, default):
        for key, value in patterns.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    def rank_for(self, module: str) -> int:
        return int(self._pattern_value(self.rank_pattern, module, self.r))

    def alpha_for(self, module: str) -> float:
        return float(self._pattern_value(self.alpha_pattern, module, self.lora_alpha))

    def scale_for(self, module: str) -> float:
        r = self.rank_for(module)
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """True when ``module`` (a dotted path in the model) is one of the target modules."""
        t = self.target_modules
        if isinstance(t, str):
            found = t == "all-linear" or re.fullmatch(t, module) is not None
        else:
            found = any(module == name or module.endswith("." + name) for name in t)
        if found and self.layers_to_transform is not None:
            wanted = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
            m = re.match(r".*?\.[^.]*\.(\d+)\.", module)   # the first numbered segment is the layer
            found = m is not None and int(m.group(1)) in wanted
        return found

    # ---- JSON ----
    def to_json(self) -> dict:
        targets = self.target_modules if isinstance(self.target_modules, str) else sorted(self.target_modules)
        return {
            "alpha_pattern": dict(self.alpha_pattern),
            "auto_mapping": None,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "layers_pattern": None,
            "layers_to_transform": self.layers_to_transform,
            "loftq_config": {},
            "lora_alpha": int(self.lora_alpha) if float(self.lora_alpha).is_integer() else self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "megatron_config": None,
            "megatron_core": "megatron.core",
            "modules_to_save": None,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": dict(self.rank_pattern),
            "revision": None,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
            "use_dora": False,
            "use_rslora": self.use_rslora,
        }

    @classmethod
    def from_json(cls, data: dict, where: str = "adapter config") -> "LoraConfig":
        if not isinstance(data, dict):
            raise DivgenError(f"{where} is not a JSON object: write a PEFT adapter_config.json")
        if data.get("peft_type", "LORA") != "LORA":
            raise DivgenError(f"{where} is a {data.get('peft_type')} adapter, not LoRA: only LoRA adapters can be used")
        task = data.get("task_type")
        if task not in (None, "CAUSAL_LM"):
            raise DivgenError(f"{where} has task_type {task!r}: divgen serves causal LMs (task_type CAUSAL_LM)")
        for key, fine, why in _UNSUPPORTED:
            value = data.get(key, fine)
            if value not in (fine, None, [], {}) and value != fine:
                raise DivgenError(f"{where}: {why} (found {key} = {value!r})")
        if data.get("layers_pattern"):
            raise DivgenError(f"{where}: layers_pattern is not supported: drop it (layers_to_transform alone is)")
        try:
            r = int(data["r"])
            alpha = float(data.get("lora_alpha", r))
        except (KeyError, TypeError, ValueError) as exc:
            raise DivgenError(f"{where} has no valid rank r / lora_alpha ({exc}): is it a LoRA adapter_config.json?") from exc
        if r < 1:
            raise DivgenError(f"{where} has rank r = {r}: the rank must be >= 1")
        targets = data.get("target_modules")
        if not targets:
            raise DivgenError(f"{where} names no target_modules: add the layer names the adapter changes")
        return cls(
            r=r, lora_alpha=alpha,
            target_modules=targets if isinstance(targets, str) else list(targets),
            lora_dropout=float(data.get("lora_dropout", 0.0) or 0.0),
            use_rslora=bool(data.get("use_rslora", False)),
            rank_pattern=dict(data.get("rank_pattern") or {}),
            alpha_pattern=dict(data.get("alpha_pattern") or {}),
            layers_to_transform=data.get("layers_to_transform"),
            base_model_name_or_path=data.get("base_model_name_or_path"),
        )


@dataclass
class LoraAdapter:
    """One adapter in memory: config + the (A, B) pair of every adapted layer."""

    name: str
    config: LoraConfig
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]   # module path -> (A [r, H_in], B [H_out, r])
    base_probe: list[float] | None = None                   # see module docstring
    path: Path | None = None

    def scale_for(self, module: str) -> float:
        return self.config.scale_for(module)

    def delta(self, module: str) -> torch.Tensor:
        """The dense weight change scale · B @ A of one layer, [H_out, H_in] fp32."""
        a, b = self.weights[module]
        return self.scale_for(module) * (b.float() @ a.float())


# ---------------------------------------------------------------------------------------------
# Base-model probe
# ---------------------------------------------------------------------------------------------

def base_probe(model: nn.Module) -> list[float]:
    """A few input-embedding values that identify a base checkpoint (in any dtype)."""
    emb = model.get_input_embeddings().weight
    rows = min(8, emb.shape[0])
    flat = emb[:rows].detach().float().flatten()
    step = max(1, flat.numel() // PROBE_SIZE)
    return [round(float(v), 6) for v in flat[::step][:PROBE_SIZE].cpu()]


def _probe_cosine(a: list[float], b: list[float]) -> float:
    n = min(len(a), len(b))
    if n == 0:
        return 1.0
    ta, tb = torch.tensor(a[:n]), torch.tensor(b[:n])
    denom = float(ta.norm() * tb.norm())
    return float(ta @ tb) / denom if denom > 0 else (1.0 if float((ta - tb).abs().max()) == 0 else 0.0)


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------

def save_adapter(adapter: LoraAdapter, directory: str | os.PathLike) -> Path:
    """Write ``adapter`` as a PEFT LoRA directory (atomically: a killed save leaves nothing half-written)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {}
    for module, (a, b) in sorted(adapter.weights.items()):
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = a.detach().to("cpu").contiguous()
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = b.detach().to("cpu").contiguous()
    metadata = {"format": "pt"}
    if adapter.base_probe is not None:
        metadata[PROBE_KEY] = json.dumps(adapter.base_probe)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with replaced_dir(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=metadata)
        os.chmod(tmp / WEIGHTS_NAME, 0o666 & ~umask())   # safetensors writes 0600: an adapter is an ordinary output
        (tmp / CONFIG_NAME).write_text(json.dumps(adapter.config.to_json(), indent=2, sort_keys=True) + "\n")
    return directory


def load_adapter(path: str | os.PathLike, name: str | None = None, model: nn.Module | None = None) -> LoraAdapter:
    """Read a PEFT LoRA directory. With ``model``, also check that it fits (``validate_adapter``)."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    name = name or path.name
    if not path.is_dir():
        raise DivgenError(f"adapter {path} is not a directory: pass a PEFT adapter directory "
                          f"(with {CONFIG_NAME} and {WEIGHTS_NAME})")
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.exists():
        raise DivgenError(f"adapter {path} has no {CONFIG_NAME}: is it a PEFT adapter directory?")
    if not weights_file.exists():
        hint = " (only adapter_model.bin: re-save it with safe_serialization=True)" if (path / "adapter_model.bin").exists() else ""
        raise DivgenError(f"adapter {path} has no {WEIGHTS_NAME}{hint}")
    data = read_adapter_config(path)            # finite numbers, named by file
    config = LoraConfig.from_json(data, where=str(cfg_file))
    check_weights_finite(weights_file)          # NaN/inf anywhere is refused, naming the file

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            metadata = f.metadata() or {}
            for key in f.keys():
                m = _KEY_RE.match(key)
                if m is None:
                    what = "embedding LoRA" if "lora_embedding" in key else "a tensor that is not a LoRA A/B weight"
                    raise DivgenError(f"adapter {path}: {key} is {what}; only LoRA on linear layers is supported")
                pairs.setdefault(m["module"], {})[m["which"]] = f.get_tensor(key)
    except DivgenError:
        raise
    except Exception as exc:  # safetensors raises several types for bad files
        raise DivgenError(f"could not read {weights_file}: {exc}. Is it a safetensors file?") from exc
    if not pairs:
        raise DivgenError(f"adapter {path} has no LoRA weights in {WEIGHTS_NAME}")

    weights = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise DivgenError(f"adapter {path}: layer {module} has no {missing}.weight; the file is incomplete")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise DivgenError(f"adapter {path}: layer {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; "
                              "expected A [r, H_in] and B [H_out, r] with the same r")
        rank = config.rank_for(module)
        if a.shape[0] != rank:
            raise DivgenError(f"adapter {path}: layer {module} has rank {a.shape[0]} but the config says r = {rank}: "
                              "the config and the weights do not belong together")
        if not config.targets(module):
            raise DivgenError(f"adapter {path}: layer {module} has weights but is not in target_modules "
                              f"{config.target_modules!r}: the config and the weights do not belong together")
        weights[module] = (a, b)
    probe = None
    if PROBE_KEY in metadata:
        try:
            probe = [float(v) for v in json.loads(metadata[PROBE_KEY])]
        except (ValueError, TypeError):
            probe = None
    adapter = LoraAdapter(name=name, config=config, weights=weights, base_probe=probe, path=path)
    if model is not None:
        validate_adapter(adapter, model)
    return adapter


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of the model by dotted path (what LoRA may target), the output head excluded."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def target_module_paths(model: nn.Module, config: LoraConfig) -> list[str]:
    """The linear layers of ``model`` that ``config.target_modules`` selects; DivgenError if a target matches none."""
    linears = linear_modules(model)
    paths = [n for n in linears if config.targets(n)]
    if not paths:
        names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise DivgenError(f"target_modules {config.target_modules!r} match no linear layer of the model; "
                          f"its linear layers are named {', '.join(names)}")
    if not isinstance(config.target_modules, str):
        for t in config.target_modules:
            if not any(p == t or p.endswith("." + t) for p in paths):
                names = sorted({n.rsplit(".", 1)[-1] for n in linears})
                raise DivgenError(f"target module {t!r} is not a linear layer of this model (its linear layers are "
                                  f"named {', '.join(names)}): the adapter was made for another architecture")
    return paths


def validate_adapter(adapter: LoraAdapter, model: nn.Module) -> None:
    """Raise a DivgenError unless every layer of ``adapter`` exists in ``model`` with matching shapes."""
    where = f"adapter {adapter.name}" + (f" ({adapter.path})" if adapter.path else "")
    if adapter.base_probe is not None:
        cos = _probe_cosine(adapter.base_probe, base_probe(model))
        if cos < PROBE_MIN_COSINE:
            base = adapter.config.base_model_name_or_path or "another model"
            raise DivgenError(f"{where} was trained on a different base model ({base}); its embedding probe does not "
                              f"match this model (cosine {cos:.2f}): load the base model it was trained on")
    modules = dict(model.named_modules())
    target_module_paths(model, adapter.config)
    for module, (a, b) in adapter.weights.items():
        layer = modules.get(module)
        base_layer = getattr(layer, "base_layer", layer)   # a layer already wrapped for LoRA
        if base_layer is None:
            raise DivgenError(f"{where} changes layer {module}, which this model does not have: the adapter was "
                              "trained on another base model (different architecture or depth)")
        if not isinstance(base_layer, nn.Linear):
            raise DivgenError(f"{where} changes {module}, a {type(base_layer).__name__}; only nn.Linear layers are supported")
        if a.shape[1] != base_layer.in_features or b.shape[0] != base_layer.out_features:
            raise DivgenError(
                f"{where}: layer {module} is [{base_layer.out_features} x {base_layer.in_features}] in this model but "
                f"the adapter expects [{b.shape[0]} x {a.shape[1]}]: it was trained on another base model"
            )


def replace_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``path`` inside ``root`` (wrapping or unwrapping a layer)."""
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


def merge_into(model: nn.Module, adapter: LoraAdapter, sign: float = 1.0) -> None:
    """W += sign · scale · B @ A for every adapted layer, in place (sign=-1 undoes it up to rounding)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for module in adapter.weights:
            w = getattr(modules[module], "base_layer", modules[module]).weight
            w += (sign * adapter.delta(module)).to(w.device, w.dtype)


def adapter_names(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Unique display names for adapter directories (their folder names, de-duplicated)."""
    names, seen = [], {}
    for p in paths:
        base = Path(p).name or str(p)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return names
