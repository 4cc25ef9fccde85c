"""The flags that ``generate`` and ``synth`` share, with one name per knob (vLLM's where it has one).

    --temperature --top-p --top-k --min-p --alpha --seed --stop --ignore-eos --max-new-tokens/--max-tokens
    --model --device --dtype --compile/--no-compile

Every flag defaults to None, meaning "not set": ``generate`` then uses the model's
``generation_config.json`` and divgen's defaults, ``synth`` the task file. Values are checked by
``check_sampling_args`` with the limits of ``engine/limits.py`` before anything slow happens.
"""
from __future__ import annotations

import argparse

from divgen.engine import limits


def add_sampling_args(p, *, defaults: str) -> None:
    """Add the shared decoding flags. ``defaults`` says, in the help, where unset values come from."""
    g = p.add_argument_group("decoding (the same flags on generate and synth)")
    g.add_argument("--temperature", type=float, default=None, help=f"0 is greedy, at most 100 ({defaults})")
    g.add_argument("--top-p", type=float, default=None, help=f"nucleus cutoff in (0, 1]; 1 is off ({defaults})")
    g.add_argument("--top-k", type=int, default=None, help=f"keep the k most likely tokens; 0 is off ({defaults})")
    g.add_argument("--min-p", type=float, default=None,
                   help=f"min-p in [0, 1] as in transformers and vLLM: after temperature, keep tokens with "
                        f"p >= min_p·max p; 0 is off, 1 keeps only the most likely ({defaults})")
    g.add_argument("--alpha", type=float, default=None,
                   help=f"the papers' plausibility cutoff α in [0, 1), on each row's own distribution before "
                        f"temperature and guidance: keep p >= α·max p; 0 is off ({defaults})")
    g.add_argument("--seed", type=int, default=None, help=f"seed ({defaults})")
    g.add_argument("--stop", action="append", default=None, help="stop string, repeatable (the text is cut before it)")
    g.add_argument("--ignore-eos", action="store_true", default=None,
                   help="keep generating after the end-of-sequence token (to exactly --max-new-tokens)")
    g.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, default=None,
                   help=f"tokens to generate per sample, at most {limits.MAX_NEW_TOKENS} ({defaults}); "
                        "--max-tokens is vLLM's name")
    add_model_args(g)


def add_model_args(g) -> None:
    g.add_argument("--model", default=None,
                   help="local HF model dir, .gguf file, or hub id in the local HF cache (never downloaded); "
                        "default: the task's model (synth), else the embedded SmolLM2-135M-Instruct")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step (default: on CUDA only; on CPU the compile time "
                        "exceeds what it saves in a typical run); --no-compile for debugging")
    g.add_argument("--dtype", default=None, help=f"auto, {', '.join(limits.DTYPES)} (default auto: bf16 on "
                                                 "CUDA, fp32 on CPU)")


def check_sampling_args(args) -> None:
    """Check every decoding flag the user set (None = not set), naming the flag."""
    for attr, check in (("temperature", limits.temperature), ("top_p", limits.top_p), ("top_k", limits.top_k),
                        ("min_p", limits.min_p), ("alpha", limits.alpha), ("seed", limits.seed),
                        ("stop", limits.stop_strings), ("max_new_tokens", limits.max_new_tokens)):
        value = getattr(args, attr)
        if value is not None:
            check(value, "--" + attr.replace("_", "-"))
    check_model_args(args)


def check_model_args(args) -> None:
    from divgen.engine.model_source import find_model

    args.device = limits.device(args.device, "--device")
    args.dtype = limits.dtype(getattr(args, "dtype", None), "--dtype")
    find_model(args.model)
