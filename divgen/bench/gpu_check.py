"""``make gpu-check``: everything a CUDA machine should prove, in one command and one results file.

    python -m divgen.bench.gpu_check                      # on a CUDA host, from the repository root
    python -m divgen.bench.gpu_check --budget 420         # seconds for all stages together
    python -m divgen.bench.gpu_check --smoke              # CPU: tiny shapes, checks the plumbing

Needs only torch, triton, transformers (and pytest for the test stage) and this repository: models
are real architectures' shapes with random weights (``divgen.bench.random_model``), so nothing is
downloaded or carried. Stages, each in its own interpreter with its own time limit (a stage that
fails or runs out of time is recorded as such and the next one runs):

* ``env``     device, versions, and the two ceilings measured on the spot: device-to-device copy
              bandwidth (bytes read + written / s) and a bf16 8192³ matrix product (TFLOP/s);
* ``graph``   the compiled decode step replayed as a CUDA graph (``torch.compile`` mode
              ``reduce-overhead``) against the eager step: the same tokens, token for token, for
              FewGen and CorrSynth rows refilled through fewer slots, and no CUDA-graph skips;
* ``decode``  the engine (CUDA graphs, and eager) against ``transformers.generate`` on a random
              Llama-3-1B in bf16 at batch 1 and 64, sampled, EOS ignored, interleaved repeats,
              medians; at batch 1 the weight bytes a step reads over the step time, as a share
              of the measured copy bandwidth; one profiled call of the engine and of HF each:
              the device's busy share of the wall time (low: bound by launches, syncs or a graph
              that does not replay) and the largest kernels;
* ``sampler`` ``benchmarks/bench_guided_sample.py`` at V = 128,256 (µs, GB/s vs copy bandwidth;
              graph replays back to back, the device's busy time a replay, each kernel's µs);
* ``lora``    ``benchmarks/bench_lora.py`` (multi-LoRA shrink/expand vs the per-adapter loop);
* ``tests``   the kernel and engine test files on the GPU (the ``gpu``-marked tests included).

Writes ``benchmarks/results/<device>.json`` (and ``--out`` too, if given) after every stage and
prints a summary table at the end. Targets printed beside the figures: engine ≥ 3×
``transformers.generate`` at batch 64; sampler ≤ 20 µs at R = 64, V = 128k (graph time).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("env", "graph", "decode", "sampler", "tests", "lora")
# Each stage's own limit in seconds (the run's --budget caps them all together).
STAGE_LIMITS = {"env": 40, "graph": 100, "decode": 180, "sampler": 90, "tests": 180, "lora": 40}
REPO = Path(__file__).resolve().parents[2]
# The test files whose kernels run on the GPU when there is one (the ``kernel_device`` fixture);
# the engine on CUDA is the graph stage's.
TEST_FILES = ("tests/test_guided_sample.py", "tests/test_static_plan.py", "tests/test_lora_kernels.py")
SCHEMA = {"benchmark": str, "device": str, "git_sha": str, "torch": str, "timestamp": str, "budget_s": (int, float),
          "stages": dict}
STAGE_SCHEMA = {"status": str, "seconds": (int, float)}
STATUSES = ("ok", "failed", "timeout", "skipped")


# ----------------------------------------------------------------------------------------------
# The record
# ----------------------------------------------------------------------------------------------
def check_record(record: dict) -> None:
    """Raise ValueError unless ``record`` has the results file's shape (the schema CI checks)."""
    for key, kind in SCHEMA.items():
        if not isinstance(record.get(key), kind):
            raise ValueError(f"gpu-check record: {key!r} missing or not {kind}")
    for name, stage in record["stages"].items():
        if name not in STAGES:
            raise ValueError(f"gpu-check record: unknown stage {name!r}")
        for key, kind in STAGE_SCHEMA.items():
            if not isinstance(stage.get(key), kind):
                raise ValueError(f"gpu-check record: stage {name!r}: {key!r} missing or not {kind}")
        if stage["status"] not in STATUSES:
            raise ValueError(f"gpu-check record: stage {name!r}: status {stage['status']!r}")
        if stage["status"] == "ok" and not isinstance(stage.get("result"), dict):
            raise ValueError(f"gpu-check record: stage {name!r} is ok but has no result")


# ----------------------------------------------------------------------------------------------
# Stages (each runs in a child interpreter: ``--stage NAME --result FILE``)
# ----------------------------------------------------------------------------------------------
def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def stage_env(args) -> dict:
    import torch
    import transformers

    from divgen.bench.common import bench, copy_bandwidth_gbs, device_name

    out = {"device": device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
           "python": sys.version.split()[0], "cuda": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if not torch.cuda.is_available():
        return out
    p = torch.cuda.get_device_properties(0)
    out.update(capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
               memory_gib=round(p.total_memory / 2**30, 1), l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    out["copy_gbs"] = copy_bandwidth_gbs(1 << 30)
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = bench(lambda: a @ b, warmup=3, repeats=10)
    out["bf16_gemm_tflops"] = 2 * n**3 / t["median_s"] / 1e12
    return out


def _texts(results):
    return [(r.row, r.token_ids, r.finish_reason) for r in results]


def stage_graph(args) -> dict:
    """Compiled + CUDA-graph step vs eager step, token for token."""
    import torch
    from torch._dynamo.utils import counters

    from divgen.bench.random_model import random_lm
    from divgen.engine.decode import generate
    from divgen.engine.guidance import Guidance

    import logging

    class _Skips(logging.Handler):                  # inductor says why it skips a CUDA graph here
        def __init__(self):
            super().__init__()
            self.reasons = []

        def emit(self, record):
            msg = record.getMessage()
            if "cudagraph" in msg.lower():
                self.reasons.append(msg[:500])

    skips_log = _Skips()
    torch._logging.set_logs(perf_hints=True)
    logging.getLogger("torch").addHandler(skips_log)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = random_lm("tiny" if args.smoke else "smollm2-135m", device=device, dtype=torch.float32, layers=4)
    # Several EOS ids so rows end at scattered steps and slots are refilled mid-run.
    lm.eos_token_ids = frozenset(range(3, 3 + max(1, lm.vocab_size // 64)))
    g = torch.Generator().manual_seed(1)
    rows = 12
    prompts = [torch.randint(300, lm.vocab_size, (int(k),), generator=g).tolist()
               for k in torch.randint(2, 24, (rows,), generator=g)]
    cases = {"fewgen": None, "corrsynth": Guidance.corrsynth([i // 3 for i in range(rows)], g=2.0)}
    out = {"model": lm.name, "rows": rows, "slots": 6, "cases": {}}
    for name, guidance in cases.items():
        kw = dict(max_new_tokens=24, temperature=1.0, alpha=0.02, seeds=11, guidance=guidance, max_batch_rows=6)
        eager, _ = generate(lm, prompts, compile=False, **kw)
        skips = counters["inductor"]["cudagraph_skips"]
        t0 = time.perf_counter()
        try:
            compiled, stats = generate(lm, prompts, compile=True, **kw)      # compiles, captures
            first_s = time.perf_counter() - t0
            again, _ = generate(lm, prompts, compile=True, **kw)             # replays
        except Exception as exc:                                            # noqa: BLE001
            out["cases"][name] = {"same_tokens": False, "rows_matching": 0, "cudagraph_skips": -1,
                                  "error": f"{type(exc).__name__}: {exc}"[-2000:]}
            continue
        same = _texts(compiled) == _texts(eager) and _texts(again) == _texts(eager)
        matching = sum(a == b for a, b in zip(_texts(again), _texts(eager)))
        out["cases"][name] = {"same_tokens": same, "rows_matching": matching, "steps": stats.steps,
                              "finish_reasons": sorted({r.finish_reason for r in eager}),
                              "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips,
                              "first_call_s": round(first_s, 2)}
    out["cuda_graphs"] = device == "cuda"
    out["cudagraph_skip_reasons"] = sorted(set(skips_log.reasons))[:20]
    out["passed"] = all(c["same_tokens"] and c["cudagraph_skips"] == 0 for c in out["cases"].values())
    return out


def stage_decode(args) -> dict:
    import torch

    from divgen.bench.random_model import random_lm, weight_bytes
    from divgen.engine.decode import generate

    cuda = torch.cuda.is_available()
    config = "tiny" if args.smoke else "llama-3-1b"
    lm = random_lm(config, device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else torch.float32)
    batches = [1, 4] if args.smoke else [64, 1]
    new = 8 if args.smoke else 128
    prompt_len = 32
    repeats = 1 if args.smoke else 3
    wbytes = weight_bytes(lm)
    out = {"model": lm.name, "dtype": str(lm.dtype).replace("torch.", ""), "new_tokens": new,
           "prompt_len": prompt_len, "mode": "sampled (T 1, alpha 0.05)", "weight_bytes": wbytes, "rows": []}
    g = torch.Generator().manual_seed(0)
    for batch in batches:
        ids = torch.randint(300, lm.vocab_size, (batch, prompt_len), generator=g)
        prompts = ids.tolist()

        def engine(compile):
            _, stats = generate(lm, prompts, max_new_tokens=new, ignore_eos=True, temperature=1.0, alpha=0.05,
                                seeds=0, compile=compile)
            assert stats.generated_tokens == batch * new

        def hf():
            torch.manual_seed(0)
            x = ids.to(lm.device)
            res = lm.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                                    min_new_tokens=new, do_sample=True, temperature=1.0, top_k=None, top_p=None,
                                    min_p=0.05, pad_token_id=lm.pad_token_id)
            assert res.shape[1] == prompt_len + new

        variants = {"engine_graphs": lambda: engine(True), "engine_eager": lambda: engine(False), "hf_generate": hf}
        if not cuda:
            variants.pop("engine_graphs")
        first, errors = {}, {}
        for name, fn in list(variants.items()):        # warm-up: compiles; a failing variant is dropped
            t0 = time.perf_counter()
            try:
                fn()
                _sync()
            except Exception as exc:                    # noqa: BLE001 — recorded beside the others' figures
                errors[name] = f"{type(exc).__name__}: {exc}"[-1500:]
                variants.pop(name)
                continue
            first[name] = time.perf_counter() - t0
        if "hf_generate" not in variants:
            raise RuntimeError(f"transformers.generate failed: {errors['hf_generate']}")
        times = {name: [] for name in variants}
        for _ in range(repeats):                       # interleaved rounds
            for name, fn in variants.items():
                _sync()
                t0 = time.perf_counter()
                fn()
                _sync()
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) for name, t in times.items()}
        row = {"batch": batch, "errors": errors}
        for name, t in med.items():
            row[f"{name}_tok_s"] = batch * new / t
            row[f"{name}_first_call_s"] = first[name]
            row[f"{name}_over_hf"] = med["hf_generate"] / t
        best = "engine_graphs" if "engine_graphs" in med else "engine_eager"
        if best not in med:
            out["rows"].append(row)
            continue
        row["profiles"] = _decode_profiles({best: variants[best], "hf_generate": variants["hf_generate"]}, cuda)
        step_s = med[best] / new                       # includes the prefill, so a lower bound
        row["engine_ms_per_token_step"] = 1e3 * step_s
        if args.copy_gbs:
            row["weight_read_share_of_copy_bw"] = wbytes / step_s / (args.copy_gbs * 1e9)
        out["rows"].append(row)
        if args.result:                                 # partial results survive a timeout
            Path(args.result).write_text(json.dumps(out))
    return out


def _decode_profiles(fns: dict, cuda: bool) -> dict:
    """One profiled call of each: the device's busy share of the wall time (low = bound by the host:
    launches, syncs, a graph not replayed) and the largest kernels (ms a call); a profiler failure
    is recorded beside the figures."""
    from divgen.bench.common import profile_or_error

    out = {}
    for name, fn in fns.items():
        p = profile_or_error(fn, repeats=1, device="cuda" if cuda else "cpu", top=10)
        out[name] = p if "error" in p else {
            "busy_fraction": p["busy_fraction"], "wall_ms": p["wall_us"] / 1e3, "events": p["events_per_call"],
            "top_ms": [[t["name"][:80], round(t["us"] / 1e3, 3), t["calls"]] for t in p["top"]]}
    return out


def _script_stage(script: str, argv: list[str], args, limit: float) -> dict:
    """Run a benchmark script with --output-json into a temp file; its record is the result."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.json"
        cmd = [sys.executable, str(REPO / "benchmarks" / script), *argv, "--output-json", str(path)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=_child_env(), cwd=REPO)
        tail = (done.stdout + done.stderr)[-3000:]
        if done.returncode != 0 or not path.exists():
            raise RuntimeError(f"{script} exited {done.returncode}: {tail}")
        data = json.loads(path.read_text())
        record = next(iter(data.values()))
        return {"rows": record.get("rows", []), "log_tail": done.stdout[-2500:],
                **{k: v for k, v in record.items() if k in ("copy_gbs", "targets", "target_misses")}}


def stage_sampler(args, limit) -> dict:
    argv = (["--quick"] if args.smoke else
            ["--rows", "16", "64", "256", "--vocabs", "128256", "--groups", "1", "4", "--modes", "basic", "top",
             "--warmup", "5", "--repeats", "30"])
    return _script_stage("bench_guided_sample.py", argv, args, limit)


def stage_lora(args, limit) -> dict:
    argv = ["--quick"] if args.smoke else ["--rows", "1", "64", "256"]
    return _script_stage("bench_lora.py", argv, args, limit)


def stage_tests(args, limit) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *TEST_FILES]
    try:
        import xdist  # noqa: F401  (compiles Triton variants on several cores at once)

        cmd[4:4] = ["-n", str(min(8, os.cpu_count() or 1))]
    except ImportError:
        pass
    if args.smoke:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_dispatch.py"]
    with tempfile.TemporaryFile("w+") as log:           # read back even when the run times out
        try:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, timeout=limit,
                                  env=_child_env(), cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            code = None
        log.seek(0)
        text = log.read()
    lines = text.strip().splitlines()
    summary = lines[-1] if lines and code is not None else f"timed out after {limit:.0f} s"
    counts = {}
    for part in summary.replace("=", "").split(","):
        bits = part.strip().split()
        if len(bits) >= 2 and bits[0].isdigit():
            counts[bits[1]] = int(bits[0])
    if code is None:                       # progress characters so far: . pass, F fail, E error, s skip
        progress = "".join(line for line in lines if line and set(line.split(" [")[0]) <= set(".FEsx"))
        counts = {k: progress.count(c) for k, c in (("passed", "."), ("failed", "F"), ("error", "E"),
                                                     ("skipped", "s")) if progress.count(c)}
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return {"exit_code": code, "summary": summary, "counts": counts, "failed": failed[:40], "files": list(TEST_FILES),
            "log_tail": text[-3000:], "passed": code == 0}


IN_PROCESS = {"env": stage_env, "graph": stage_graph, "decode": stage_decode}
SCRIPTED = {"sampler": stage_sampler, "lora": stage_lora, "tests": stage_tests}


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------
def _child_env() -> dict:
    env = dict(os.environ)
    # Children import this checkout's divgen whether or not it is installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _run_stage(name: str, args, limit: float, copy_gbs) -> dict:
    t0 = time.perf_counter()
    try:
        if name in SCRIPTED:
            result = SCRIPTED[name](args, limit)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "result.json"
                cmd = [sys.executable, "-m", "divgen.bench.gpu_check", "--stage", name, "--result", str(path)]
                if args.smoke:
                    cmd.append("--smoke")
                if copy_gbs:
                    cmd += ["--copy-gbs", str(copy_gbs)]
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=_child_env(),
                                          cwd=REPO)
                except subprocess.TimeoutExpired as exc:
                    partial = json.loads(path.read_text()) if path.exists() else None
                    return {"status": "timeout", "seconds": round(time.perf_counter() - t0, 1),
                            "limit_s": round(limit, 1), "partial": partial,
                            "log_tail": (_text(exc.stdout) + _text(exc.stderr))[-2000:]}
                if done.returncode != 0 or not path.exists():
                    raise RuntimeError(f"exit {done.returncode}: {(done.stdout + done.stderr)[-3000:]}")
                result = json.loads(path.read_text())
        status = "ok"
        if isinstance(result, dict) and result.get("passed") is False:
            status = "failed"
        return {"status": status, "seconds": round(time.perf_counter() - t0, 1), "result": result}
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": round(time.perf_counter() - t0, 1), "limit_s": round(limit, 1)}
    except Exception as exc:                      # noqa: BLE001 — recorded, and the next stage runs
        return {"status": "failed", "seconds": round(time.perf_counter() - t0, 1), "error": str(exc)[-3000:]}


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def _fmt(value, spec=".1f") -> str:
    return "-" if value is None else format(value, spec)


def summary_lines(record: dict) -> list[str]:
    st = record["stages"]
    lines = [f"gpu-check on {record['device']} (git {record['git_sha']}, torch {record['torch']})",
             f"{'stage':<8} {'status':<8} {'s':>6}  figures"]

    def res(name):
        return st.get(name, {}).get("result") or {}

    for name in STAGES:
        if name not in st:
            continue
        s, r = st[name], res(name)
        fig = ""
        if name == "env" and r:
            fig = f"copy {_fmt(r.get('copy_gbs'), '.0f')} GB/s, bf16 GEMM {_fmt(r.get('bf16_gemm_tflops'), '.0f')} TFLOP/s"
        elif name == "graph" and r:
            fig = ", ".join(f"{k}: {'same' if c['same_tokens'] else 'DIFFERENT'} tokens ({c['rows_matching']}/"
                            f"{r['rows']} rows), {c['cudagraph_skips']} skips" for k, c in r["cases"].items())
        elif name == "decode" and r:
            fig = "; ".join(
                f"b{row['batch']}: engine {_fmt(row.get('engine_graphs_tok_s', row.get('engine_eager_tok_s')), '.0f')}"
                f" tok/s = {_fmt(row.get('engine_graphs_over_hf', row.get('engine_eager_over_hf')), '.2f')}x HF"
                + (f", {100 * row['weight_read_share_of_copy_bw']:.0f}% of copy BW"
                   if "weight_read_share_of_copy_bw" in row else "")
                + "".join(f", {k.split('_')[0]} busy {100 * p['busy_fraction']:.0f}%"
                          for k, p in row.get("profiles", {}).items() if p.get("busy_fraction") is not None)
                for row in r["rows"])
        elif name == "sampler" and r:
            pick = [x for x in r.get("rows", []) if x.get("rows") == 64 and x.get("vocab") == 128256]
            fig = "; ".join(f"R64 {x.get('mode')}: graph {_fmt(x.get('graph_us'))} us, "
                            f"{_fmt(x.get('kernel_gbs'), '.0f')} GB/s" for x in pick if x.get("group") == 1) or f"{len(r.get('rows', []))} rows"
        elif name == "lora" and r:
            fig = f"{len(r.get('rows', []))} cases"
        elif name == "tests" and r:
            fig = r.get("summary", "")
        elif s.get("error"):
            fig = s["error"].strip().splitlines()[-1][:120]
        lines.append(f"{name:<8} {s['status']:<8} {s['seconds']:>6.1f}  {fig}")
    return lines


def run(args) -> dict:
    from divgen.bench.common import default_results_path, git_sha

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("gpu-check: no CUDA device here; on a CPU use --smoke to check the plumbing")
    stages = args.stages or list(STAGES)
    record = {"benchmark": "gpu_check", "device": "", "git_sha": git_sha(), "torch": torch.__version__,
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": args.budget,
              "command": " ".join(["python -m divgen.bench.gpu_check", *sys.argv[1:]]), "smoke": bool(args.smoke),
              "stages": {}}
    paths = [Path(args.out)] if args.out else []
    if not args.smoke:
        paths.append(default_results_path())
    start = time.perf_counter()
    copy_gbs = None
    for name in stages:
        left = args.budget - (time.perf_counter() - start)
        if left < 10:
            record["stages"][name] = {"status": "skipped", "seconds": 0.0, "error": "budget spent"}
            continue
        limit = min(STAGE_LIMITS[name], left)
        if name == "graph" and not torch.cuda.is_available():
            record["stages"][name] = {"status": "skipped", "seconds": 0.0, "error": "needs CUDA (CUDA graphs)"}
            continue
        print(f"gpu-check: {name} (limit {limit:.0f} s)", flush=True)
        record["stages"][name] = _run_stage(name, args, limit, copy_gbs)
        result = record["stages"][name].get("result") or {}
        if name == "env":
            record["device"] = result.get("device", "")
            copy_gbs = result.get("copy_gbs")
        print(f"gpu-check: {name}: {record['stages'][name]['status']} "
              f"({record['stages'][name]['seconds']} s)", flush=True)
        record["seconds_total"] = round(time.perf_counter() - start, 1)
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=2) + "\n")
    if not record["device"]:
        from divgen.bench.common import device_name

        record["device"] = device_name()
    check_record(record)
    for path in paths:
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}", flush=True)
    print("\n".join(summary_lines(record)), flush=True)
    return record


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m divgen.bench.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=None, help="run only these (default: all)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for all stages together (default 480)")
    ap.add_argument("--out", default=None, help="also write the record here")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on a CPU (checks the plumbing only)")
    ap.add_argument("--stage", choices=sorted(IN_PROCESS), help=argparse.SUPPRESS)     # child mode
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--copy-gbs", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not 10 <= args.budget <= 3600:
        ap.error("--budget must be between 10 and 3600 seconds")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stage:
        result = IN_PROCESS[args.stage](args)
        Path(args.result).write_text(json.dumps(result))
        return 0
    record = run(args)
    bad = [n for n, s in record["stages"].items() if s["status"] != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
