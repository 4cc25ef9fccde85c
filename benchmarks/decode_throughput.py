"""Decode throughput: the divgen engine vs ``transformers.generate``, same prompts, model, batch
size and length (EOS ignored so every row makes exactly --new-tokens tokens), in one run.

    python benchmarks/decode_throughput.py                      # embedded SmolLM2-135M, CPU or GPU
    python benchmarks/decode_throughput.py --random-config llama-3-1b --batch 1 64   # GPU, random weights
    python benchmarks/decode_throughput.py --output-json benchmarks/results/<device>.json

Prints tokens/s for both and the ratio engine / transformers for greedy and sampled decoding.
``--random-config`` builds a model of a real architecture's shape with random weights (for GPU
machines that cannot carry the GGUF file); its tokens are meaningless but its cost is real.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import bench, default_results_path, result_record, sync, write_json  # noqa: E402

# Real architectures' shapes (public configs), for random-weight GPU runs.
RANDOM_CONFIGS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True),
    "llama-3-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
}

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List three facts about the moon.",
    "What should I cook tonight?",
    "Describe the colour blue to someone who cannot see.",
    "Summarise the plot of a heist film in two sentences.",
    "Why do cats purr?",
    "Give me advice for my first marathon, including training, nutrition and rest days.",
]


def load(args):
    from divgen.engine.model import LoadedModel, load_model, pick_device, pick_dtype

    if not args.random_config:
        return load_model(args.model, device=args.device)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    device = pick_device(args.device)
    dtype = pick_dtype(device)
    cfg = LlamaConfig(max_position_embeddings=4096, **RANDOM_CONFIGS[args.random_config])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    # Any tokenizer will do for random weights; the embedded model's is local. Token ids beyond
    # its vocabulary never occur in prompts, and generated ids are not decoded for timing.
    from divgen.engine.model import resolve_model_dir
    tok = AutoTokenizer.from_pretrained(str(resolve_model_dir(None)[0]), local_files_only=True)
    return LoadedModel(model=model, tokenizer=tok, name=args.random_config, device=device, dtype=dtype,
                       context_length=4096, eos_token_ids=frozenset({2}), pad_token_id=2)


def run(args) -> list[dict]:
    from divgen.engine.decode import generate

    lm = load(args)
    rows = []
    for batch in args.batch:
        prompts = [lm.format_prompt(PROMPTS[i % len(PROMPTS)], chat=lm.has_chat_template) for i in range(batch)]
        tok = lm.tokenizer
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
        for mode in args.modes:
            sample = mode == "sampled"

            def engine():
                _, stats = generate(lm, prompts, max_new_tokens=args.new_tokens, ignore_eos=True,
                                    temperature=1.0 if sample else 0.0, seeds=0)
                assert stats.steps == args.new_tokens - 1

            def hf():
                torch.manual_seed(0)
                out = lm.model.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                        do_sample=sample, temperature=1.0 if sample else None, top_k=None,
                                        top_p=None, pad_token_id=lm.pad_token_id)
                assert out.shape[1] == enc["input_ids"].shape[1] + args.new_tokens

            n_tokens = batch * args.new_tokens
            # Interleave the two so that load drift on a shared machine hits both alike.
            t_engine, t_hf = [], []
            for _ in range(args.repeats):
                t_engine.append(bench(engine, warmup=0 if t_engine else 1, repeats=1, device=lm.device)["median_s"])
                t_hf.append(bench(hf, warmup=0 if t_hf else 1, repeats=1, device=lm.device)["median_s"])
            t_engine, t_hf = statistics.median(t_engine), statistics.median(t_hf)
            row = {
                "model": lm.name, "batch": batch, "new_tokens": args.new_tokens, "mode": mode,
                "engine_tok_s": n_tokens / t_engine, "hf_generate_tok_s": n_tokens / t_hf,
                "ratio_engine_over_hf": t_hf / t_engine,
            }
            rows.append(row)
            print(f"{lm.name:>34} batch {batch:>3} {mode:>7}: engine {row['engine_tok_s']:8.1f} tok/s | "
                  f"transformers.generate {row['hf_generate_tok_s']:8.1f} tok/s | ratio {row['ratio_engine_over_hf']:.2f}x",
                  flush=True)
    sync(lm.device)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir / .gguf (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--random-config", choices=sorted(RANDOM_CONFIGS), help="random weights of this shape")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=["greedy", "sampled"], choices=["greedy", "sampled"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--output-json", nargs="?", const="auto", default=None,
                    help="write results (no value: benchmarks/results/<device>.json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    if args.output_json:
        path = default_results_path() if args.output_json == "auto" else Path(args.output_json)
        write_json(path, result_record("decode_throughput", rows))


if __name__ == "__main__":
    main()
