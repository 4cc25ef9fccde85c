"""PEFT LoRA adapter directories on disk, read without torch: finding them, and checking that
their config and weights are finite numbers before any model loads.

    adapter_dirs(["runs/infl/adapters"])   -> the adapter directories (manifest order)
    check_adapter_files(path)              -> DivgenError naming the file on NaN/inf or a bad config

The weights check reads the safetensors layout directly (8-byte header length, JSON header,
raw little-endian data) with numpy, so it covers bf16 too (exponent bits all ones = inf/NaN).
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from divgen.engine.errors import DivgenError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MANIFEST = "adapters.json"

# safetensors dtype -> (numpy dtype, mask of the exponent bits for a raw finiteness test or None)
_FLOAT_DTYPES = {"F64": ("<f8", None), "F32": ("<f4", None), "F16": ("<f2", None), "BF16": ("<u2", 0x7F80)}


def is_complete(directory: Path) -> bool:
    return (directory / CONFIG_NAME).exists() and (directory / WEIGHTS_NAME).exists()


def read_manifest(folder: Path) -> list[str]:
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DivgenError(f"{path} is not valid JSON ({exc.__class__.__name__}: {exc}): rerun `divgen spa adapt` "
                          "to rewrite it, or pass the adapter directories themselves") from exc
    names = data.get("adapters") if isinstance(data, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise DivgenError(f"{path} has no 'adapters' list of names: rerun `divgen spa adapt` to rewrite it, or "
                          "pass the adapter directories themselves")
    return names


def adapter_dirs(spec: list[str]) -> list[Path]:
    """Adapter directories from CLI arguments: each is an adapter dir, or a dir with an adapters.json
    manifest (its adapters in manifest order), or a dir whose subdirectories are adapters."""
    out: list[Path] = []
    for item in spec:
        p = Path(item).expanduser()
        if is_complete(p):
            out.append(p)
        elif (p / MANIFEST).exists():
            names = read_manifest(p)
            missing = [n for n in names if not is_complete(p / n)]
            if missing:
                raise DivgenError(f"{p}: adapters {missing} listed in {MANIFEST} are not finished: rerun `divgen spa adapt`")
            out.extend(p / n for n in names)
        elif p.is_dir() and any(is_complete(c) for c in p.iterdir() if c.is_dir()):
            out.extend(sorted(c for c in p.iterdir() if c.is_dir() and is_complete(c)))
        else:
            raise DivgenError(f"{p} is not a LoRA adapter directory (no {CONFIG_NAME} + {WEIGHTS_NAME}) nor a folder "
                              "of adapters: pass the output of `divgen spa adapt`")
    return out


def _bad_number(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)


def read_adapter_config(path: Path) -> dict:
    """``adapter_config.json`` as a dict, its numbers checked (finite, r >= 1)."""
    cfg_file = path / CONFIG_NAME
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DivgenError(f"cannot read {cfg_file}: {exc}") from exc
    except ValueError as exc:           # NaN/Infinity parse as floats; a syntax error lands here
        raise DivgenError(f"{cfg_file} is not valid JSON ({exc}): rewrite it") from exc
    if not isinstance(data, dict):
        raise DivgenError(f"{cfg_file} is not a JSON object: write a PEFT adapter_config.json")
    for key in ("r", "lora_alpha", "lora_dropout"):
        if key in data and data[key] is not None and _bad_number(data[key]):
            raise DivgenError(f"{cfg_file}: {key} = {data[key]!r} is not a finite number: fix or retrain the adapter")
    for key in ("rank_pattern", "alpha_pattern"):
        for module, value in (data.get(key) or {}).items():
            if _bad_number(value):
                raise DivgenError(f"{cfg_file}: {key}[{module!r}] = {value!r} is not a finite number: fix or retrain "
                                  "the adapter")
    return data


def check_weights_finite(weights_file: Path) -> None:
    """Refuse a safetensors file with a NaN or infinite value in any floating-point tensor."""
    import numpy as np

    from divgen.engine.inputs import read_safetensors_header

    header, base = read_safetensors_header(weights_file, "adapter weights")   # offsets checked: no giant read
    try:
        with weights_file.open("rb") as f:
            for name, info in header.items():
                if name == "__metadata__" or info.get("dtype") not in _FLOAT_DTYPES:
                    continue
                np_dtype, exp_mask = _FLOAT_DTYPES[info["dtype"]]
                start, end = info["data_offsets"]
                f.seek(base + start)      # base: the data's offset after the header
                values = np.frombuffer(f.read(end - start), dtype=np_dtype)
                bad = ((values & exp_mask) == exp_mask).any() if exp_mask else not np.isfinite(values).all()
                if bad:
                    raise DivgenError(f"{weights_file}: tensor {name} holds NaN or infinite values: the adapter is "
                                      "broken (retrain it, e.g. with a lower --lr)")
    except DivgenError:
        raise
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise DivgenError(f"could not read {weights_file}: {exc}. Is it a safetensors file?") from exc


def check_adapter_files(path: Path) -> dict:
    """Check an adapter directory's config and weights (finite numbers); return the config dict."""
    path = Path(path)
    data = read_adapter_config(path)
    check_weights_finite(path / WEIGHTS_NAME)
    return data
