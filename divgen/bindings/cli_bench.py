"""`divgen bench decode|synth|kernel`: throughput and latency per method and batch size.

Options follow ``vllm bench``: --batch-sizes, --input-len, --output-len, --warmup, --repeats;
prints tok/s, requests/s, examples/s and p50/p90/p99 latencies per token and per request, the
ratio of each method to FewGen at the same batch size, writes --output-json, and with --plot a PNG
of throughput against batch size, one line per method (matplotlib: ``pip install divgen[plot]``).
The measurements are in ``divgen.bench.suite``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

from divgen.engine import limits
from divgen.engine.errors import DivgenError

MAX_KERNEL_ELEMENTS = 1 << 28       # logits of one kernel-bench call (rows x vocab)
PNG_STAMP = b"divgen bench"         # a tEXt chunk in every plot bench writes: it may replace only those
KINDS = ("decode", "synth", "kernel")
METHODS = limits.BENCH_METHODS
DEFAULT_BATCH_SIZES = {"decode": (2, 4, 16), "synth": (16, 32, 64), "kernel": (2, 4, 16)}
PLOT_METRIC = {"decode": "tok_per_s", "synth": "examples_per_s", "kernel": "tok_per_s"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark decode, synth or the sampling kernel (throughput, latency percentiles, plot)",
        description="Benchmark FewGen, CorrSynth and CFG side by side (interleaved rounds) at several batch "
                    "sizes: decode (generate on random prompts of --input-len tokens, --output-len tokens each, "
                    "EOS ignored), synth (divgen synth's job; batch size = rows per engine call) or kernel "
                    "(one guided sampling step). Prints throughput and p50/p90/p99 latencies.",
    )
    p.add_argument("kind", choices=KINDS, help="what to benchmark")
    p.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                   help=f"methods to compare (default: {' '.join(METHODS)})")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None, metavar="N",
                   help="sequences per call (default 2 4 16); synth: rows per engine call (default 16 32 64)")
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens (decode; default 64)")
    p.add_argument("--output-len", type=int, default=32, help="generated tokens per sequence (default 32)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds; medians reported (default 3)")
    p.add_argument("--group-size", type=int, default=4,
                   help="rows per CorrSynth group and K (rows per sequence) of CFG (default 4)")
    p.add_argument("--g", type=float, default=2.0, help="guidance scale (default 2)")
    p.add_argument("--per-label", type=int, default=4, help="synth: examples per label (default 4)")
    p.add_argument("--task", default="ag_news", help="synth: task file or shipped name (default ag_news)")
    p.add_argument("--vocab", type=int, default=49152, help="kernel: vocabulary size (default 49152)")
    p.add_argument("--model", default=None, help="model (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None,
                   help="model dtype: auto, float32, bfloat16, float16 (default auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--min-p", type=float, default=0.0, help="decode: min-p of the sampled rows, after temperature as in transformers and vLLM (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None, metavar="PATH", help="write the result rows as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="write throughput vs batch size per method")
    p.set_defaults(func=run_bench_command)


def check_args(args) -> None:
    """Every user error before torch is imported or a model loads."""
    if args.batch_sizes is None:
        args.batch_sizes = list(DEFAULT_BATCH_SIZES[args.kind])
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise DivgenError(f"--methods: unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    if len(set(args.methods)) != len(args.methods):
        raise DivgenError("--methods lists a method twice: give each once")
    n = limits.count
    n(args.input_len, "--input-len", high=limits.MAX_BENCH_LEN)
    n(args.output_len, "--output-len", high=limits.MAX_BENCH_LEN)
    n(args.repeats, "--repeats", high=limits.MAX_REPEATS)
    n(args.warmup, "--warmup", low=0, high=limits.MAX_REPEATS)
    n(args.per_label, "--per-label", high=limits.MAX_JOB_EXAMPLES)
    n(args.vocab, "--vocab", low=2, high=limits.MAX_VOCAB)
    n(args.group_size, "--group-size", low=2, high=limits.MAX_GROUP_ROWS, hint=" (rows contrasted per group)")
    limits.guidance_scale(args.g, "--g")
    limits.seed(args.seed, "--seed")
    if args.threads is not None:
        n(args.threads, "--threads", high=limits.MAX_THREADS)
    for b in args.batch_sizes:
        n(b, "--batch-sizes", high=limits.MAX_BENCH_ROWS)
    args.device = limits.device(args.device, "--device")
    limits.min_p(args.min_p, "--min-p")
    if args.dtype is not None:
        args.dtype = limits.dtype(args.dtype, "--dtype")
    if args.kind != "kernel":
        from divgen.engine.model_source import find_model

        find_model(args.model)
    if args.kind == "kernel":
        rows = max(args.batch_sizes) * (args.group_size if "cfg" in args.methods else 1)
        if rows * args.vocab > MAX_KERNEL_ELEMENTS:
            raise DivgenError(f"--batch-sizes {max(args.batch_sizes)} x --vocab {args.vocab} is {rows * args.vocab:,} "
                              f"logits per call, more than {MAX_KERNEL_ELEMENTS:,} (1 GiB of fp32): lower --vocab or "
                              "--batch-sizes")
    if args.kind != "synth" and "corrsynth" in args.methods and 1 in args.batch_sizes:
        raise DivgenError("corrsynth contrasts at least 2 rows: use --batch-sizes >= 2 or drop corrsynth "
                          "from --methods")
    if args.kind == "synth" and min(args.batch_sizes) < args.group_size * (
            args.group_size if "cfg" in args.methods else 1):
        need = args.group_size * (args.group_size if "cfg" in args.methods else 1)
        raise DivgenError(f"synth --batch-sizes are rows per engine call and must hold one whole group "
                          f"({need} rows{' for cfg' if 'cfg' in args.methods else ''}): use values >= {need}")
    from divgen.engine.files import check_output_file

    if args.output_json and args.plot and os.path.abspath(args.output_json) == os.path.abspath(args.plot):
        raise DivgenError("--output-json and --plot name the same file: give two paths")
    if args.output_json:
        args.output_json = str(check_output_file(Path(args.output_json).expanduser(), "--output-json",
                                                 ours=is_bench_json, what="divgen bench"))
    if args.plot:
        if not args.plot.lower().endswith(".png"):
            raise DivgenError(f"--plot writes a PNG: give a path ending in .png, got {args.plot}")
        args.plot = str(check_output_file(Path(args.plot).expanduser(), "--plot", ours=is_bench_png,
                                          what="divgen bench"))
        if importlib.util.find_spec("matplotlib") is None:
            raise DivgenError("--plot needs matplotlib: pip install 'divgen[plot]' (or matplotlib)")
    if args.kind == "synth" and args.task:
        from divgen.engine.synth import load_task

        load_task(args.task)        # a bad task file fails here, before the model loads


def is_bench_json(path: Path) -> bool:
    """An earlier --output-json of divgen bench (its record names the benchmark)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and str(data.get("benchmark", "")).startswith("divgen bench") and \
        isinstance(data.get("rows"), list)


def is_bench_png(path: Path) -> bool:
    """An earlier --plot of divgen bench (a PNG with bench's tEXt stamp)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return False
    return data.startswith(b"\x89PNG") and b"tEXtComment\x00" + PNG_STAMP in data


def stamp_png(data: bytes) -> bytes:
    """``data`` with a tEXt chunk "Comment: divgen bench" before its IEND chunk."""
    import struct
    import zlib

    body = b"tEXt" + b"Comment\x00" + PNG_STAMP
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    end = data.rfind(b"IEND") - 4
    return data[:end] + chunk + data[end:] if end > 8 else data


def format_rows(rows: list[dict]) -> str:
    head = ("method", "batch", "tok/s", "req/s", "ex/s", "token p50/p90/p99 ms", "request p50/p90/p99 ms")
    lines = [head]

    def pct(r, key):
        if f"{key}_p50_ms" not in r:
            return "-"
        return "/".join(f"{r[f'{key}_p{q}_ms']:.1f}" for q in (50, 90, 99))

    for r in rows:
        lines.append((r["method"], str(r["batch_size"]), f"{r['tok_per_s']:.1f}", f"{r['requests_per_s']:.2f}",
                      f"{r['examples_per_s']:.2f}", pct(r, "token"), pct(r, "request")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


def format_floor(rows: list[dict]) -> str:
    """Where a decode step's time goes, and the forward's GEMM rate against the GEMM peak measured
    in the same run (the step's own weight products alone, at the same row count)."""
    head = ("method", "batch", "step ms", "forward", "sampler", "host", "sampler %", "forward GF/s",
            "step GF/s", "GEMM peak GF/s", "forward/peak", "step/peak")
    lines = [head]
    for r in rows:
        if "forward_ms" not in r:
            continue
        lines.append((r["method"], str(r["batch_size"]), f"{r['step_ms']:.1f}", f"{r['forward_ms']:.1f}",
                      f"{r['sampler_ms']:.2f}", f"{r['host_ms']:.2f}", f"{100 * r['sampler_share']:.1f}",
                      f"{r['forward_gflops']:.1f}", f"{r['step_gflops']:.1f}",
                      f"{r['gemm_peak_gflops']:.1f} ({r['gemm_peak_path']})",
                      f"{100 * r['forward_peak_share']:.0f} %", f"{100 * r['step_peak_share']:.0f} %"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


def run_bench_command(args) -> int:
    check_args(args)
    import torch

    from divgen.bench import suite
    from divgen.bench.common import device_name, plot_throughput, result_record
    from divgen.engine.files import write_file_atomic
    from divgen.kernels import cpu_sample

    # A benchmark times the steady state: the CPU sampler's native (or else compiled) candidate pass
    # from the first step (kernels/cpu_sample.py), unless the caller chose.
    cpu_sample.prefer_steady_state()
    sampler_mode = cpu_sample.active_path()

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = suite.BenchConfig(
        kind=args.kind, methods=tuple(args.methods), batch_sizes=tuple(args.batch_sizes), input_len=args.input_len,
        output_len=args.output_len, warmup=args.warmup, repeats=args.repeats, group_size=args.group_size,
        scale=args.g, per_label=args.per_label, task=args.task, vocab=args.vocab, seed=args.seed,
        min_p=args.min_p,
    )

    def log(msg: str) -> None:
        print(f"bench {args.kind}: {msg}", file=sys.stderr, flush=True)

    limits.device_present(args.device, "--device")
    if args.kind == "kernel":
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        rows = suite.run_kernel(cfg, device, log=log)
    else:
        from divgen.engine.model import load_model

        lm = load_model(args.model, device=args.device, dtype=args.dtype)
        device = lm.device
        log(f"{lm.name} ({str(lm.dtype).removeprefix('torch.')}) on {device_name()}, "
            f"torch threads {torch.get_num_threads()}")
        rows = suite.run_decode(lm, cfg, log=log) if args.kind == "decode" else suite.run_synth_bench(lm, cfg, log=log)

    print(f"divgen bench {args.kind}: {device_name()}, torch threads {torch.get_num_threads()}, "
          f"{cfg.repeats} interleaved rounds (median throughput; latencies pooled), CPU sampler {sampler_mode}")
    print(format_rows(rows))
    if args.kind == "decode" and any("forward_ms" in r for r in rows):
        print()
        print(format_floor(rows))
    for b, name, ratio in suite.ratios(rows, PLOT_METRIC[args.kind]):
        print(f"batch {b}: {name} = {ratio:.2f}x ({PLOT_METRIC[args.kind]})")
    if args.output_json:
        record = result_record(f"divgen bench {args.kind}", rows, config={**vars(cfg), "cpu_sampler": sampler_mode},
                               threads=torch.get_num_threads())
        record["command"] = "divgen " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name == "divgen" \
            else record["command"]
        write_file_atomic(args.output_json, json.dumps(record, indent=2) + "\n", "--output-json")
        print(f"wrote {args.output_json}", file=sys.stderr)
    if args.plot:
        metric = PLOT_METRIC[args.kind]
        title = (f"divgen bench {args.kind} ({device_name()}, {torch.get_num_threads()} thread"
                 f"{'s' if torch.get_num_threads() > 1 else ''}"
                 + (f", {cfg.input_len} in / {cfg.output_len} out" if args.kind == "decode" else "") + ")")
        from divgen.engine.files import temp_path

        tmp = temp_path(Path(args.plot)).with_suffix(".png")
        try:
            plot_throughput(rows, tmp, y=metric, title=title)
            write_file_atomic(args.plot, stamp_png(tmp.read_bytes()), "--plot")
        finally:
            tmp.unlink(missing_ok=True)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
