"""`divgen generate "PROMPT"`: sample N continuations of one prompt from a model.

Unset decoding flags take the model's ``generation_config.json`` values (temperature, top_p,
top_k, min_p, max_new_tokens), then divgen's defaults (``DEFAULTS``), as vLLM does. ``min_p`` is
the peers' min-p (after temperature); ``--alpha`` is the papers' α (no generation_config key).
"""
from __future__ import annotations

import json
import sys

from divgen.bindings.cli_args import add_sampling_args, check_sampling_args
from divgen.engine import limits
from divgen.engine.errors import DivgenError

# divgen's defaults where neither the flag nor the model's generation_config.json sets a value.
DEFAULTS = {"temperature": 0.8, "top_p": 1.0, "top_k": 0, "alpha": 0.0, "min_p": 0.0, "max_new_tokens": 64,
            "seed": 0}


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="sample continuations of a prompt",
                              description="Sample N continuations of PROMPT in one batch.")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("-n", "--num-samples", type=int, default=1, dest="n",
                   help=f"samples to draw, at most {limits.MAX_SAMPLES} (default 1)")
    add_sampling_args(p, defaults="default: the model's generation_config.json, else "
                                  + ", ".join(f"{k} {v}" for k, v in DEFAULTS.items()).replace("_", "-"))
    p.add_argument("--diverse", type=float, default=None, metavar="G",
                   help="the N samples contrast each other (intra-prompt CorrSynth, scale G > 1, e.g. 2; default off)")
    p.add_argument("--chat", dest="chat", action="store_true", default=None, help="apply the chat template (default when the model has one)")
    p.add_argument("--no-chat", dest="chat", action="store_false", help="feed the prompt as raw text")
    p.add_argument("--json", action="store_true", help="one JSON object per sample: text, tokens, finish_reason, seed")
    p.set_defaults(func=run)


def _check_args(args) -> None:
    """Every argument, before torch is imported or the model loads."""
    if not args.prompt.strip():
        raise DivgenError("the prompt is empty: give some text to continue")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as exc:        # bytes the shell passed that are not UTF-8 (surrogate-escaped)
        raise DivgenError(f"the prompt holds bytes that are not UTF-8 text (at character {exc.start}): "
                          "pass the prompt as UTF-8") from exc
    limits.samples(args.n, "-n")
    check_sampling_args(args)


def resolve_sampling(args, model_dir) -> dict:
    """The decoding values: the flag if set, else the model's generation_config.json, else DEFAULTS."""
    from divgen.engine.model_source import generation_defaults

    from_model = generation_defaults(model_dir)
    out = {}
    for key, default in DEFAULTS.items():
        value = getattr(args, key)
        if value is None:
            value = from_model.get(key, default)
            checker = getattr(limits, key)
            value = checker(value, f"{key} in {model_dir}/generation_config.json")
        out[key] = value
    return out


def run(args) -> int:
    _check_args(args)  # before the (slow) model load
    from divgen.engine.diverse import check_diverse, diverse_guidance

    check_diverse(args.n, args.diverse)
    from tqdm import tqdm

    from divgen.engine.decode import generate
    from divgen.engine.model import load_model

    limits.device_present(args.device, "--device")
    lm = load_model(args.model, device=args.device, dtype=args.dtype, compile=args.compile)
    s = resolve_sampling(args, lm.source_dir)
    prompt = lm.format_prompt(args.prompt, chat=args.chat)
    bar = tqdm(total=s["max_new_tokens"], desc="decoding", unit="tok", file=sys.stderr,
               disable=not sys.stderr.isatty(), leave=False)

    def progress(done: int, total: int) -> None:
        bar.update(1)
        bar.set_postfix(done=f"{done}/{total}")

    results, stats = generate(
        lm, [prompt] * args.n, max_new_tokens=s["max_new_tokens"], temperature=s["temperature"],
        top_k=s["top_k"], top_p=s["top_p"], alpha=s["alpha"], min_p=s["min_p"], seeds=s["seed"], stop=args.stop or [],
        ignore_eos=bool(args.ignore_eos), guidance=diverse_guidance(args.n, args.diverse), progress=progress,
    )
    bar.close()
    for r in results:
        if args.json:
            print(json.dumps({"text": r.text, "tokens": r.token_ids, "finish_reason": r.finish_reason,
                              "seed": r.seed}, ensure_ascii=False))
        else:
            if args.n > 1:
                print(f"--- sample {r.row} (seed {r.seed}, {r.finish_reason}) ---")
            print(r.text)
    print(f"{stats.generated_tokens} tokens in {stats.wall_time_s:.2f}s "
          f"({stats.tokens_per_s:.1f} tok/s, {stats.rows_forwarded} rows forwarded)", file=sys.stderr)
    return 0
