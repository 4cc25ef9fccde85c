"""`divgen bench` (bindings/cli_bench.py, benchmarks/suite.py, benchmarks/common.py): percentiles
against numpy, the measurement records against what the engine did, argument errors, JSON and PNG.
Timings themselves are never asserted (benchmarks measure speed, tests do not)."""
from __future__ import annotations

import importlib.util
import json
import random

import numpy as np
import pytest
import torch

from divgen.bench import suite
from divgen.bench.common import covered, device_profile, latency_summary, percentile, profile_or_error
from divgen.bindings.cli import main


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentile_matches_numpy_linear(n):
    rng = random.Random(n)
    xs = [rng.expovariate(1.0) for _ in range(n)]
    for q in (0, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12, abs=1e-15)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU form of the profile")
def test_device_profile_counts_each_op_once_a_call():
    a = torch.randn(64, 64)

    def fn():
        for _ in range(3):
            torch.mm(a, a)
        torch.relu(a)

    prof = device_profile(fn, repeats=4, device="cpu", top=50)
    ops = {t["name"]: t for t in prof["top"]}
    assert ops["aten::mm"]["calls"] == 3 and ops["aten::relu"]["calls"] == 1
    assert [t["us"] for t in prof["top"]] == sorted((t["us"] for t in prof["top"]), reverse=True)
    assert prof["busy_fraction"] is None and prof["wall_us"] > 0 and prof["events_per_call"] >= 4
    assert len(device_profile(fn, repeats=1, device="cpu", top=2)["top"]) == 2


@pytest.mark.parametrize("seed", range(20))
def test_covered_is_the_length_of_the_union(seed):
    """The device's busy time: the union of kernel intervals, against a unit grid marked by each."""
    rng = random.Random(seed)
    spans = [(a, a + rng.randint(0, 12)) for a in (rng.randint(0, 60) for _ in range(rng.randint(0, 12)))]
    grid = [False] * 80
    for a, b in spans:
        grid[a:b] = [True] * (b - a)
    assert covered(spans) == sum(grid)


def test_profile_or_error_records_a_failure():
    def broken():
        raise RuntimeError("no profiler here")

    assert profile_or_error(broken, repeats=1, device="cpu") == {"error": "RuntimeError: no profiler here"}


def test_latency_summary_in_milliseconds():
    s = latency_summary([0.001, 0.002, 0.003, 0.004], "token")
    assert s["token_p50_ms"] == pytest.approx(2.5)
    assert s["token_mean_ms"] == pytest.approx(2.5)
    assert s["token_p99_ms"] == pytest.approx(float(np.percentile([1, 2, 3, 4], 99)))
    assert latency_summary([], "token") == {}


def test_guidance_layouts():
    cfg = suite.BenchConfig(kind="decode", group_size=4)
    rows, g = suite.guidance_for("fewgen", 5, cfg)
    assert (rows, g) == (5, None)
    rows, g = suite.guidance_for("corrsynth", 5, cfg)       # 4 + 1: the lone row joins group 0
    assert rows == 5 and g.groups == (0, 0, 0, 0, 0)
    rows, g = suite.guidance_for("corrsynth", 6, cfg)
    assert g.groups == (0, 0, 0, 0, 1, 1)
    rows, g = suite.guidance_for("cfg", 2, cfg)              # K rows per sequence: 1 leader + 3 shadows
    assert rows == 8 and g.shadow_of == (None, 0, 0, 0, None, 4, 4, 4)


def test_ratios_against_fewgen_at_the_same_batch():
    rows = [{"method": "fewgen", "batch_size": 2, "tok_per_s": 10.0},
            {"method": "cfg", "batch_size": 2, "tok_per_s": 4.0},
            {"method": "fewgen", "batch_size": 8, "tok_per_s": 20.0},
            {"method": "corrsynth", "batch_size": 8, "tok_per_s": 19.0}]
    assert suite.ratios(rows) == [(2, "cfg / fewgen", 0.4), (8, "corrsynth / fewgen", 0.95)]


@pytest.mark.parametrize("argv,needle", [
    (["bench", "decode", "--methods", "beam"], "unknown method 'beam'"),
    (["bench", "decode", "--batch-sizes", "0"], "--batch-sizes must be in [1, 65536]"),
    (["bench", "decode", "--batch-sizes", "1", "4"], "corrsynth contrasts at least 2 rows"),
    (["bench", "decode", "--output-len", "0"], "--output-len must be in [1, 32768]"),
    (["bench", "kernel", "--plot", "out.svg"], "--plot writes a PNG"),
    (["bench", "kernel", "--output-json", "/nonexistent/dir/r.json"], "does not exist"),
    (["bench", "synth", "--batch-sizes", "8"], "must hold one whole group (16 rows for cfg)"),
    (["bench", "synth", "--task", "no_such_task"], "no_such_task"),
])
def test_bad_arguments_exit_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_plot_without_matplotlib_names_the_extra(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["bench", "kernel", "--plot", str(tmp_path / "k.png")]) == 2
    assert "divgen[plot]" in capsys.readouterr().err


def test_kernel_bench_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "k.json", tmp_path / "k.png"
    argv = ["bench", "kernel", "--batch-sizes", "2", "4", "--vocab", "257", "--repeats", "1", "--warmup", "0",
            "--threads", "1", "--output-json", str(out)]
    if importlib.util.find_spec("matplotlib") is not None:
        argv += ["--plot", str(png)]
    else:
        png = None
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "corrsynth / fewgen" in printed and "cfg / fewgen" in printed
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert [(r["method"], r["batch_size"]) for r in rows] == [(m, b) for b in (2, 4) for m in suite.METHODS]
    for r in rows:
        assert r["rounds"] == 1
        # 20 calls a round, each sampling batch_size tokens: the throughput is those over the wall.
        assert r["tok_per_s"] == pytest.approx(20 * r["batch_size"] / r["wall_s"], rel=1e-9)
        assert r["requests_per_s"] == pytest.approx(r["tok_per_s"], rel=1e-9)
        assert r["token_p50_ms"] <= r["token_p90_ms"] <= r["token_p99_ms"]
    assert record["device"] and record["git_sha"]
    if png is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_decode_measurements_match_what_generate_did(embedded_lm):
    """Per-request latencies, token counts and step latencies come from the real call."""
    cfg = suite.BenchConfig(kind="decode", input_len=5, output_len=3, group_size=2)
    prompts, guidance = suite.decode_batch(embedded_lm, "cfg", 2, cfg, seed=0)
    assert len(prompts) == 4 and all(len(p) == 5 for p in prompts)
    special = set(embedded_lm.tokenizer.all_special_ids)
    assert not any(t in special for p in prompts for t in p)
    rec = suite.time_decode(embedded_lm, prompts, guidance, cfg.output_len, seed=0)
    assert rec["requests"] == 2 and rec["tokens"] == 2 * 3          # shadows are not requests
    assert len(rec["token"]) == 2 and len(rec["ttft"]) == 1         # 3 steps: 1 first + 2 inter-token
    assert len(rec["request"]) == 2 and max(rec["request"]) <= rec["wall_s"]


@pytest.mark.slow
def test_timed_generate_wraps_and_restores(embedded_lm):
    import divgen.engine.decode as decode

    original = decode.generate
    seen = []
    with suite.timed_generate() as calls:
        decode.generate(embedded_lm, [[300, 301, 302]], max_new_tokens=2, ignore_eos=True,
                        progress=lambda d, t: seen.append((d, t)))
    assert decode.generate is original
    assert seen == [(0, 1), (1, 1)]                                 # the caller's callback still runs
    assert len(calls) == 1 and len(calls[0]["request"]) == 1 and len(calls[0]["token"]) == 1
