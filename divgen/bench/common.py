"""Shared benchmark helpers: one ``bench()`` (sync, warm-up, repeats, median) and result files.

Every benchmark prints ratios measured side by side in one run and can write JSON with the
command, git SHA, device name and timestamp .
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

# benchmarks/results/ of the checkout this package was installed from (editable install); from a
# plain install, benchmarks/results/ under the working folder.
_CHECKOUT_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
RESULTS_DIR = _CHECKOUT_RESULTS if _CHECKOUT_RESULTS.is_dir() else Path("benchmarks") / "results"

# The decode benchmarks' prompts (chat-formatted by each script), one per row, cycled.
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


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def bench(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 10, device=None) -> dict:
    """Time fn(): warm-up calls, then `repeats` timed calls with a device sync around each.

    Returns {"median_s", "min_s", "mean_s", "repeats"}.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "mean_s": statistics.fmean(times),
        "repeats": repeats,
    }


def device_profile(fn: Callable[[], object], *, repeats: int = 3, device=None, top: int = 12) -> dict:
    """Where fn's time goes, from torch.profiler over ``repeats`` calls (after one untimed call).

    On CUDA: the device's work (kernels, copies, memsets) by name, in µs a call, and the share of
    the wall time the device was busy (the union of their intervals): a step whose busy share is
    low is bound by the host (launches, syncs, a CUDA graph that is not replayed), not by its
    kernels. On a CPU: the ops' self time by name, and no busy share. Returns {"wall_us",
    "busy_us", "busy_fraction", "events_per_call", "top": [{"name", "calls", "us"}] (per call,
    largest first)}."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            fn()
        sync(device)
    wall_us = (time.perf_counter() - t0) * 1e6
    totals: dict[str, list] = {}
    busy_us = None
    if cuda:
        spans = []
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                spans.append((e.time_range.start, e.time_range.end))
                t = totals.setdefault(e.name, [0, 0.0])
                t[0] += 1
                t[1] += e.time_range.end - e.time_range.start
        busy_us = covered(spans)
    else:
        for e in prof.key_averages():
            totals[e.key] = [e.count, e.self_cpu_time_total]
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])
    return {"wall_us": wall_us / repeats,
            "busy_us": None if busy_us is None else busy_us / repeats,
            "busy_fraction": None if busy_us is None else busy_us / wall_us,
            "events_per_call": sum(c for c, _ in totals.values()) / repeats,
            "top": [{"name": name[:120], "calls": c / repeats, "us": us / repeats} for name, (c, us) in ranked[:top]]}


def covered(spans) -> float:
    """Length of the union of [start, end) intervals (kernels on several streams may overlap)."""
    total, reach = 0.0, float("-inf")
    for start, stop in sorted(spans):
        total += max(0.0, stop - max(start, reach))
        reach = max(reach, stop)
    return total


def profile_or_error(fn: Callable[[], object], **kwargs) -> dict:
    """``device_profile(fn, **kwargs)``, or {"error": ...} where the profiler fails: a benchmark
    records the failure beside its figures instead of losing them."""
    try:
        return device_profile(fn, **kwargs)
    except Exception as exc:                     # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"[-300:]}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def git_sha() -> str:
    """The checkout's short SHA; DIVGEN_GIT_SHA where the tree travelled without its .git."""
    if os.environ.get("DIVGEN_GIT_SHA"):
        return os.environ["DIVGEN_GIT_SHA"]
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, stderr=subprocess.DEVNULL
        ).decode().strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def copy_bandwidth_gbs(nbytes: int = 256 << 20) -> float | None:
    """Measured device-to-device copy bandwidth (read + write bytes / s), the roofline for
    memory-bound kernels. None without CUDA."""
    if not torch.cuda.is_available():
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), warmup=5, repeats=20)
    return 2 * nbytes / t["median_s"] / 1e9


def result_record(name: str, rows: list[dict], **extra) -> dict:
    return {
        "benchmark": name,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "git_sha": git_sha(),
        "device": device_name(),
        "torch": torch.__version__,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
        **extra,
    }


def write_json(path: str | os.PathLike, record: dict) -> None:
    """Write (or merge by benchmark name into) a JSON results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {}
    data[record["benchmark"]] = record
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def default_results_path() -> Path:
    # "NVIDIA H200" -> nvidia-h200, "cpu-x86_64-2cores" as it is (the committed results' names)
    slug = "".join(c if c.isalnum() or c == "_" else "-" for c in device_name().lower()).strip("-")
    return RESULTS_DIR / f"{slug}.json"


def add_common_args(ap) -> None:
    """The options every kernel benchmark shares (--quick must already be defined)."""
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 with --quick, as shared CPUs make spinning "
                         "thread pools noisy; torch's default otherwise)")
    ap.add_argument("--output-json", nargs="?", const="auto", default=None,
                    help="write results (default path: benchmarks/results/<device>.json)")


def apply_common_args(args) -> torch.device:
    """Set the CPU thread count from the shared options and return the device to run on."""
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


# ----------------------------------------------------------------------------------------------
# Latency percentiles and plots (used by `divgen bench`)
# ----------------------------------------------------------------------------------------------
def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default method)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_summary(seconds, prefix: str) -> dict:
    """{prefix_p50_ms, prefix_p90_ms, prefix_p99_ms, prefix_mean_ms} of a list of durations in s;
    empty dict for no values."""
    if not seconds:
        return {}
    ms = [1000.0 * s for s in seconds]
    return {f"{prefix}_p50_ms": percentile(ms, 50), f"{prefix}_p90_ms": percentile(ms, 90),
            f"{prefix}_p99_ms": percentile(ms, 99), f"{prefix}_mean_ms": statistics.fmean(ms)}


def plot_throughput(rows: list[dict], path: str | os.PathLike, *, y: str, title: str,
                    x: str = "batch_size", series: str = "method") -> Path:
    """PNG of ``y`` against ``x`` with one line per ``series`` value (matplotlib, optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name in dict.fromkeys(r[series] for r in rows):
        pts = sorted((r[x], r[y]) for r in rows if r[series] == name and r.get(y) is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(name))
    xs = sorted({r[x] for r in rows})
    if xs and xs[-1] / max(xs[0], 1) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(v) for v in xs])
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y.replace("_per_s", "/s").replace("_", " "))
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
