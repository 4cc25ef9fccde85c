"""divgen's own model forwards (DESIGN.md, "Engine shape").

* ``llama``: the Llama family (SmolLM2, Llama 2/3, Mistral, Qwen2/2.5) and Gemma 3's text model
  in a few plain modules,
  gpt-fast style, reading the slot-based static KV cache of ``divgen.engine.kv_cache``.
* Any other architecture runs through the HF forward (``divgen.engine.models.hf_loop``), the slow
  path: an eager loop over a growing HF cache.

``fast_forward_for(config)`` says which path a config takes.
"""
from divgen.engine.models.llama import ModelArgs, Transformer, fast_forward_for, unsupported_reason

__all__ = ["ModelArgs", "Transformer", "fast_forward_for", "unsupported_reason"]
