"""Where a model comes from, decided without importing torch: the embedded default, a local HF
directory, a .gguf file, or a hub id found in the local Hugging Face cache (never downloaded).

``find_model(spec)`` checks the user's ``--model`` (or a task's ``model``) before anything slow
happens; ``engine/model.py`` loads what it names. ``generation_defaults(model_dir)`` reads the
sampling defaults of the model's ``generation_config.json`` (used unless the user overrides them,
as vLLM does).

Hub ids (``org/name``) are looked up in ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub`` — the layout ``huggingface_hub`` writes
(``models--org--name/snapshots/<revision>/``, the revision named by ``refs/main``).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from divgen.engine.errors import DivgenError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# generation_config.json fields that are sampling defaults, and the divgen name of each.
GENERATION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                     "max_new_tokens": "max_new_tokens"}


@dataclass(frozen=True)
class ModelSource:
    kind: str                 # "default" | "dir" | "gguf" | "hub"
    path: Path | None         # the directory or file (None for the default: found at load)
    name: str                 # as shown to the user


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def find_in_hub_cache(repo_id: str) -> Path | None:
    """The snapshot directory of ``repo_id`` in the local HF cache, or None."""
    repo = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = snapshots / ref.read_text().strip()
        if snap.is_dir():
            return snap
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    return found[-1] if len(found) == 1 else None


def check_model_dir(p: Path) -> None:
    """A model directory's files, read as far as they can be without torch: config.json is a JSON
    object, every safetensors header is whole (engine/inputs.py's checked readers)."""
    from divgen.engine.inputs import read_json_object, read_safetensors_header

    if not (p / "config.json").exists():
        raise DivgenError(f"{p} is not a model directory (no config.json): pass a HF model directory or a .gguf file")
    weights = sorted(p.glob("*.safetensors"))
    if not (weights or any(p.glob("pytorch_model*.bin"))):
        raise DivgenError(f"{p} has a config.json but no weights (*.safetensors): not a complete model directory")
    read_json_object(p / "config.json", "model config", "the model directory is damaged: copy or download it again")
    for w in weights:
        read_safetensors_header(w, "model weights")


def check_gguf(p: Path) -> None:
    try:
        with p.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise DivgenError(f"cannot read model file {p}: {exc.strerror}") from exc
    if magic != b"GGUF":
        raise DivgenError(f"{p} does not start with the GGUF magic bytes: it is not a GGUF model (damaged or "
                          "another format); pass a GGUF file or a model directory")


def find_model(spec: str | os.PathLike | None) -> ModelSource:
    """Check a model argument (fast, no torch): None/"default", a path, or a cached hub id."""
    if spec is None or str(spec) == "default":
        return ModelSource("default", None, "default (SmolLM2-135M-Instruct)")
    text = str(spec)
    p = Path(text).expanduser()
    if p.exists():
        if p.is_file():
            if p.suffix.lower() != ".gguf":
                raise DivgenError(f"{p} is a file but not a .gguf model: pass a GGUF file or a model directory")
            check_gguf(p)
            return ModelSource("gguf", p, str(p))
        check_model_dir(p)
        return ModelSource("dir", p, str(p))
    if HUB_ID.fullmatch(text) and not text.startswith((".", "/", "~")):
        snap = find_in_hub_cache(text)
        if snap is None:
            raise DivgenError(
                f"model {text} is not a local path and not in the local Hugging Face cache ({hub_cache_dir()}); "
                "nothing is downloaded: fetch it elsewhere with `huggingface-cli download " + text + "` and copy "
                "the cache, or pass a local model directory / .gguf file"
            )
        check_model_dir(snap)
        return ModelSource("hub", snap, text)
    raise DivgenError(
        f"model path {p} does not exist: pass a local HF model directory, a .gguf file, a hub id in the "
        "local HF cache (org/name), or omit --model for the embedded default"
    )


def generation_defaults(model_dir: Path | None) -> dict:
    """Sampling defaults from ``model_dir/generation_config.json`` (divgen names; only the fields
    present). As in vLLM, ``do_sample`` is not consulted. A missing or unreadable file gives {}."""
    if model_dir is None:
        return {}
    path = Path(model_dir) / "generation_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    out = {}
    for key, ours in GENERATION_FIELDS.items():
        value = data.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[ours] = value
    return out
