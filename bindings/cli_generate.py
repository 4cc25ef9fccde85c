"""`divgen generate "PROMPT"`: sample N continuations of one prompt from a model."""
from __future__ import annotations

import json
import sys

from divgen.engine.errors import DivgenError


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="sample continuations of a prompt",
                              description="Sample N continuations of PROMPT in one batch.")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("-n", "--num-samples", type=int, default=1, dest="n", help="samples to draw (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per sample (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus cutoff in (0, 1] (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0: off)")
    p.add_argument("--min-p", type=float, default=0.0, dest="alpha",
                   help="plausibility cutoff α in [0, 1): keep tokens with p >= α·max p (default 0: off)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed S + i (default 0)")
    p.add_argument("--diverse", type=float, default=None, metavar="G",
                   help="the N samples contrast each other (intra-prompt CorrSynth, scale G > 1, e.g. 2; default off)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--model", default=None, help="local HF model dir or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--chat", dest="chat", action="store_true", default=None, help="apply the chat template (default when the model has one)")
    p.add_argument("--no-chat", dest="chat", action="store_false", help="feed the prompt as raw text")
    p.add_argument("--json", action="store_true", help="one JSON object per sample: text, tokens, finish_reason, seed")
    p.set_defaults(func=run)


def _check_args(args) -> None:
    if not args.prompt.strip():
        raise DivgenError("the prompt is empty: give some text to continue")
    if args.n < 1:
        raise DivgenError(f"-n must be >= 1, got {args.n}")
    if args.max_new_tokens < 1:
        raise DivgenError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise DivgenError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise DivgenError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise DivgenError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 <= args.alpha < 1:
        raise DivgenError(f"--min-p must be in [0, 1), got {args.alpha}")


def run(args) -> int:
    _check_args(args)  # before the (slow) model load
    from divgen.engine.diverse import check_diverse, diverse_guidance

    check_diverse(args.n, args.diverse)
    from tqdm import tqdm

    from divgen.engine.decode import generate
    from divgen.engine.model import load_model

    lm = load_model(args.model, device=args.device)
    prompt = lm.format_prompt(args.prompt, chat=args.chat)
    bar = tqdm(total=args.max_new_tokens, desc="decoding", unit="tok", file=sys.stderr,
               disable=not sys.stderr.isatty(), leave=False)

    def progress(done: int, total: int) -> None:
        bar.update(1)
        bar.set_postfix(done=f"{done}/{total}")

    results, stats = generate(
        lm, [prompt] * args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, alpha=args.alpha, seeds=args.seed, stop=args.stop,
        guidance=diverse_guidance(args.n, args.diverse), progress=progress,
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
