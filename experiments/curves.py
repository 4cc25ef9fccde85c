"""Learning curves on AG News: student accuracy against the number of synthetic examples N
(experiments/README.md, "learning curves").

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/curves.py --data ../shared/data/ag_news_test.csv \
        --stage gen --jobs 2
    .venv/bin/python experiments/curves.py --data ../shared/data/ag_news_test.csv --stage score     # then summary

For each (variant, seed) it generates ONE set with ``divgen synth ag_news`` (the embedded
SmolLM2-135M-Instruct, few-shot prompts from the pool rows) into ``RUNS/<variant>_s<seed>.jsonl``;
the smaller points are nested prefixes of it: the point N is the set's first N rows in (group,
slot) order (whole groups of one example per label each, two for M-CorrSynth; ``prefix``), which
is what ``--per-label N/4`` generates (a row's seed is a hash of (seed, group, slot), so its text
does not depend on how many groups the job has). Each
prefix is written to ``RUNS/<variant>_s<seed>.n<N>.jsonl`` (with a copy of synth's sidecar, so
``divgen metrics`` finds the few-shot rows for the copy rate).

``--model gemma3-270m`` does the same with Gemma 3 270M (a base model, the completion-style task file
``experiments/tasks/ag_news_base.yaml``) into ``runs/curves-gemma3-270m`` and
``experiments/results/curves_gemma3-270m.*``.

Stages:

* ``gen``: runs synth (``--jobs N``: N processes of one thread at once, never two on one set), in
  a schedule that answers the question early:
  the first seed of every main variant (FewGen, CorrSynth with the fixes) up to the largest N,
  then the other seeds up to the second-largest N, then those seeds up to the largest N; plain
  CorrSynth last (``--order depth`` instead takes each (variant, seed) to the largest N in turn).
  synth resumes a killed file, and a larger ``--per-label`` extends a file; the wall time of every
  synth call is kept in ``RUNS/<variant>_s<seed>.time.json``.
* ``score``: every complete prefix gets ``divgen metrics --json --no-embeddings`` (per-label
  Self-BLEU-4, copy rate, mean words), the EOS rate (finish_reason), and ``divgen eval --json
  --seeds 1 --no-real`` (label fidelity, linear-probe accuracy); once per N, the real-data row
  (the same probe on as many real pool rows, 3 seeds). Results are cached per file as JSON.
  ``--finetune`` also fine-tunes the MiniLM student on each seed's prefix of every variant at the
  sizes ``--finetune-sizes`` names (default 400; about 7 minutes a set of 400 on one core, and
  proportionally more for larger N: 3 epochs), and once per N the same fine-tune on as many real
  pool rows (``RUNS/real.n<N>.finetune.json``).
* ``summary``: ``experiments/results/curves_smollm2.json`` (per variant, N, seed; per variant, N:
  mean ± std over the seeds that exist), ``experiments/results/curves_smollm2.png`` (matplotlib,
  if installed) and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from packaged import GEMMA_GGUF, gemma_gguf

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
DIVGEN = [sys.executable, "-m", "divgen.bindings.cli"]
LABELS = 4

VARIANTS = {   # name: synth flags (after `divgen synth ag_news --few-shot DATA`)
    "fewgen": ["--method", "fewgen", "--copy-guard", "0"],
    "corrsynth-fixed": ["--method", "corrsynth", "--g", "1.5", "--own-special", "--copy-guard", "8"],
    "corrsynth": ["--method", "corrsynth", "--g", "1.5", "--no-own-special", "--copy-guard", "0"],
    # FewGen with the copy guard (the guard acts on every method; the contrast fix does not)
    "fewgen-guard": ["--method", "fewgen", "--copy-guard", "8"],
    # weaker guidance with the same fixes (does the gap to FewGen close as g → 1?)
    "corrsynth-fixed-g1.25": ["--method", "corrsynth", "--g", "1.25", "--own-special", "--copy-guard", "8"],
    # stronger guidance with the same fixes (Gemma: does more contrast buy diversity without fidelity?)
    "corrsynth-fixed-g1.75": ["--method", "corrsynth", "--g", "1.75", "--own-special", "--copy-guard", "8"],
    # the other guided methods with the same fixes, at the smaller sizes (CFG runs K² rows: ~4x the cost)
    "m-corrsynth-fixed": ["--method", "m-corrsynth", "--gamma", "1.0", "--delta", "0.5", "--own-special",
                          "--copy-guard", "8"],
    "cfg-fixed": ["--method", "cfg", "--g", "1.5", "--own-special", "--copy-guard", "8"],
    # only the intra-label term (γ = 0): rows of one label pushed apart, no contrast with the other
    # labels (M-CorrSynth's δ is what the plain contrast lacks; is the cross-label term needed?)
    "m-corrsynth-intra": ["--method", "m-corrsynth", "--gamma", "0", "--delta", "0.5", "--own-special",
                          "--copy-guard", "8"],
    # the intra-label term with 4 rows per label in a group (16 rows) instead of 2: each row pushed
    # from the mean of three same-label peers, so the contrast reaches more of the label's texts
    "m-corrsynth-intra-r16": ["--method", "m-corrsynth", "--gamma", "0", "--delta", "0.5", "--own-special",
                              "--copy-guard", "8", "--rows-per-group", "16"],
    # the intra-label term at twice the weight (2 rows per label)
    "m-corrsynth-intra-d1": ["--method", "m-corrsynth", "--gamma", "0", "--delta", "1.0", "--own-special",
                             "--copy-guard", "8"],
}
# The packaged models: synth's extra flags, the task file, and the names of the raw-output folder and
# the summary files. Gemma 3 270M is a base model: a completion-style task file (same labels).
MODELS = {
    "smollm2": {"title": "SmolLM2-135M-Instruct", "flags": [], "task": "ag_news", "suffix": "smollm2"},
    "gemma3-270m": {"title": "Gemma 3 270M (base)", "flags": ["--model", str(GEMMA_GGUF)],
                    "task": str(ROOT / "experiments" / "tasks" / "ag_news_base.yaml"), "suffix": "gemma3-270m"},
}
MODEL = MODELS["smollm2"]          # main() sets the one --model names
MAIN = ("fewgen", "corrsynth-fixed")      # generated before every other variant's seeds
COLORS = {"fewgen": "tab:blue", "corrsynth-fixed": "tab:red", "corrsynth": "tab:orange", "m-corrsynth-fixed": "tab:purple",
          "cfg-fixed": "tab:green", "corrsynth-fixed-g1.25": "tab:pink", "corrsynth-fixed-g1.75": "darkred",
          "fewgen-guard": "tab:cyan",
          "m-corrsynth-intra": "tab:brown", "m-corrsynth-intra-r16": "tab:olive",
          "m-corrsynth-intra-d1": "tab:gray", "real": "black"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def log(msg: str) -> None:
    print(f"[curves {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], capture: bool = False) -> str:
    log("+ " + " ".join(cmd))
    done = subprocess.run(cmd, check=True, text=True, env=ENV, cwd=ROOT,
                          stdout=subprocess.PIPE if capture else None)
    return done.stdout or ""


def set_path(runs: Path, variant: str, seed: int) -> Path:
    return runs / f"{variant}_s{seed}.jsonl"


def read_complete(path: Path) -> list[dict]:
    """The complete records of a synth output (a line still being written is left out)."""
    if not path.exists():
        return []
    body = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in body.split("\n")[:-1] if line.strip()]


# ----------------------------------------------------------------------------------------------
# gen
# ----------------------------------------------------------------------------------------------
def schedule(variants: list[str], seeds: list[int], sizes: list[int], order: str) -> list[tuple[str, int, int]]:
    """(variant, seed, N) targets in run order (see the module docstring)."""
    top = max(sizes)
    mid = sorted(sizes)[-2] if len(sizes) > 1 else top
    out = []
    for group in ([v for v in variants if v in MAIN], [v for v in variants if v not in MAIN]):
        if order == "depth":
            out += [(v, s, top) for s in seeds for v in group]
            continue
        out += [(v, seeds[0], top) for v in group]
        out += [(v, s, mid) for s in seeds[1:] for v in group]
        out += [(v, s, top) for s in seeds[1:] for v in group]
    seen, ordered = set(), []
    for t in out:
        if t not in seen:
            seen.add(t)
            ordered.append(t)
    return ordered


class Stopped(Exception):
    pass


# The synth processes running now (``--jobs`` runs several): SIGTERM or Ctrl-C stops them all, and
# each partial set resumes on the next run.
RUNNING: set = set()
_STOP = threading.Event()
_LOCK = threading.Lock()


def _stop_all(signum=None, frame=None) -> None:
    with _LOCK:
        _STOP.set()
        for proc in RUNNING:
            proc.terminate()


def generate_all(data: Path, runs: Path, targets: list[tuple[str, int, int]], jobs: int) -> None:
    """Run the targets in schedule order, up to ``jobs`` synth processes at once (one thread of
    each), never two on one set: a worker takes the first pending target whose set is not being
    generated, so each set still grows in its scheduled order."""
    pending, busy, failed = list(targets), set(), []
    cond = threading.Condition()

    def worker() -> None:
        while True:
            with cond:
                while True:
                    if _STOP.is_set() or failed or not pending:
                        return
                    t = next((t for t in pending if t[:2] not in busy), None)
                    if t is not None:
                        break
                    cond.wait()
                pending.remove(t)
                busy.add(t[:2])
            try:
                generate(data, runs, *t)
            except Stopped:
                return
            except BaseException as e:            # noqa: BLE001 (re-raised by the main thread)
                with cond:
                    failed.append(e)
                _stop_all()
                return
            finally:
                with cond:
                    busy.discard(t[:2])
                    cond.notify_all()

    old = signal.signal(signal.SIGTERM, _stop_all)
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, jobs))]
    try:
        for th in threads:
            th.start()
        while any(th.is_alive() for th in threads):
            for th in threads:
                th.join(timeout=0.5)
    except KeyboardInterrupt:
        _stop_all()
        for th in threads:
            th.join()
    finally:
        signal.signal(signal.SIGTERM, old)
    if failed:
        raise failed[0]
    if _STOP.is_set():
        raise Stopped


def generate(data: Path, runs: Path, variant: str, seed: int, n: int) -> None:
    out = set_path(runs, variant, seed)
    have = {(r["group"], r["slot"]) for r in read_complete(out)}
    if sum(g < n // LABELS for g, _ in have) >= n:
        return
    cmd = [*DIVGEN, "synth", MODEL["task"], "--few-shot", str(data), "--out", str(out), "--per-label",
           str(n // LABELS), "--seed", str(seed), "--no-progress", *MODEL["flags"], *VARIANTS[variant]]
    log(f"generating {out.name} up to N = {n} ({len(have)} rows there)")
    start = time.time()
    with _LOCK:
        if _STOP.is_set():
            raise Stopped
        proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT)
        RUNNING.add(proc)
    try:
        rc = proc.wait()
    finally:
        with _LOCK:
            RUNNING.discard(proc)
    stopped = _STOP.is_set()
    took = time.time() - start
    after = len(read_complete(out))
    timing = out.with_suffix(".time.json")
    segs = json.loads(timing.read_text())["segments"] if timing.exists() else []
    segs.append({"rows_before": len(have), "rows_after": after, "target": n, "seconds": round(took, 1),
                 "complete": rc == 0})
    timing.write_text(json.dumps({"segments": segs}, indent=2) + "\n")
    log(f"{out.name}: {after - len(have)} rows in {took / 60:.1f} min (exit {rc})")
    if stopped:
        raise Stopped
    if rc != 0:
        raise SystemExit(f"curves: divgen synth failed on {out.name} (exit {rc})")


def gen_seconds(runs: Path, variant: str, seed: int) -> tuple[float, int]:
    """(seconds, rows) spent generating a set so far, over every synth call (killed ones too)."""
    timing = set_path(runs, variant, seed).with_suffix(".time.json")
    if not timing.exists():
        return 0.0, 0
    segs = json.loads(timing.read_text())["segments"]
    return sum(s["seconds"] for s in segs), sum(s["rows_after"] - s["rows_before"] for s in segs)


# ----------------------------------------------------------------------------------------------
# score
# ----------------------------------------------------------------------------------------------
def prefix(runs: Path, variant: str, seed: int, n: int) -> Path | None:
    """The set's first N rows in (group, slot) order in their own file (with synth's sidecar), or
    None when the set does not hold them all yet. A group has R slots (4: one per label; 8 for
    M-CorrSynth: two per label) and slot s carries label (g·R + s) mod 4, so any N that is a
    multiple of 4 takes N/4 rows of each label: whole groups, and the first slots of one more when
    R does not divide N (those rows were decoded beside the group's other slots)."""
    src = set_path(runs, variant, seed)
    records = sorted(read_complete(src), key=lambda r: (r["group"], r["slot"]))
    if len(records) < n:
        return None
    width = 1 + max(r["slot"] for r in records)                                 # R
    if any((r["group"], r["slot"]) != divmod(i, width) for i, r in enumerate(records[:n])):
        return None                                                             # a group still in flight
    records = records[:n]
    dest = runs / f"{variant}_s{seed}.n{n}.jsonl"
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if not dest.exists() or dest.read_text(encoding="utf-8") != body:
        dest.write_text(body, encoding="utf-8")
    side = src.with_name("." + src.name + ".task.json")
    if side.exists():
        shutil.copyfile(side, dest.with_name("." + dest.name + ".task.json"))
    return dest


def score_file(path: Path, data: Path) -> dict:
    cache = path.with_suffix(".score.json")
    if cache.exists() and json.loads(cache.read_text()).get("n") != len(read_complete(path)):
        cache.unlink()                              # scored on other rows (an earlier prefix rule)
    if cache.exists():
        result = json.loads(cache.read_text())
        if "real_coverage" not in result:            # scored before the coverage columns existed
            result.update(real_coverage(path, data))
            cache.write_text(json.dumps(result, indent=2) + "\n")
        return result
    records = read_complete(path)
    m = json.loads(run([*DIVGEN, "metrics", str(path), "--json", "--no-embeddings"], capture=True))
    m = m[0] if isinstance(m, list) else m
    ev = json.loads(run([*DIVGEN, "eval", str(path), "--real", str(data), "--task", MODEL["task"], "--seeds", "1",
                         "--no-real", "--json"], capture=True))
    row = ev["rows"][0]
    per_label = [lab["self_bleu"]["4"] for lab in m["labels"].values() if lab.get("self_bleu")]
    o = m["overall"]
    result = {
        "file": path.name, "n": o["count"],
        "probe_accuracy": row["students"]["probe"]["accuracy"]["mean"],
        "probe_macro_f1": row["students"]["probe"]["macro_f1"]["mean"],
        "fidelity": row["fidelity"], "fidelity_per_label": row["fidelity_per_label"],
        "self_bleu_4_label": sum(per_label) / len(per_label) if per_label else None,
        "self_bleu_4_per_label": {k: lab["self_bleu"]["4"] for k, lab in m["labels"].items() if lab.get("self_bleu")},
        "copy_rate": o["copy_rate"], "degenerate_rate": o["degenerate_rate"],
        "duplicate_rate": o["duplicate_rate"], "mean_words": o["mean_words"],
        "eos_rate": sum(r.get("finish_reason") == "eos" for r in records) / len(records),
        "test_rows": ev["settings"]["test_rows"],
        **real_coverage(path, data),
    }
    cache.write_text(json.dumps(result, indent=2) + "\n")
    return result


_TEST = {}


def real_coverage(path: Path, data: Path) -> dict:
    """How closely a set's texts sit to the real test rows in the student's embedding space
    (all-MiniLM-L6-v2, cosine): per label, the mean over that label's test rows of the similarity
    to the nearest synthetic text of the label ("coverage"), and the mean similarity of the
    label's synthetic texts to the label's real centroid ("centrality"); both averaged over the
    labels. A set whose texts crowd around the label's centre covers less of the real spread."""
    import torch

    from divgen.engine.eval.data import read_real, read_synthetic, split
    from divgen.engine.eval.features import embed_cached
    from divgen.engine.synth.task import load_task

    task = load_task(MODEL["task"])
    if "test" not in _TEST:
        _, test = split(read_real(data, task), task.few_shot.every)
        _TEST["test"] = (test, torch.nn.functional.normalize(embed_cached(test.texts), dim=-1))
    test, tx = _TEST["test"]
    syn, _ = read_synthetic(path, task)
    sx = torch.nn.functional.normalize(embed_cached(syn.texts), dim=-1)
    cover, central = [], []
    for k in range(len(task.labels)):
        t = tx[[i for i, l in enumerate(test.labels) if l == k]]
        x = sx[[i for i, l in enumerate(syn.labels) if l == k]]
        cover.append(float((t @ x.T).amax(dim=1).mean()))
        centre = torch.nn.functional.normalize(t.mean(dim=0), dim=0)
        central.append(float((x @ centre).mean()))
    return {"real_coverage": sum(cover) / len(cover), "real_centrality": sum(central) / len(central)}


def score_real(runs: Path, data: Path, n: int, some_prefix: Path) -> dict:
    """The real-data row at N: the probe on as many real pool rows per label as the prefix has
    (all of a label's pool rows, 171-210, when that is fewer), 3 seeds (other real rows per seed)."""
    cache = runs / f"real.n{n}.score.json"
    if cache.exists():
        return json.loads(cache.read_text())
    ev = json.loads(run([*DIVGEN, "eval", str(some_prefix), "--real", str(data), "--task", MODEL["task"], "--seeds", "3",
                         "--json"], capture=True))
    row = next(r for r in ev["rows"] if r.get("real"))
    result = {"n_asked": row["asked"], "n_used": row["n"], "short_labels": row["short_labels"],
              "probe_accuracy": row["students"]["probe"]["accuracy"],
              "probe_macro_f1": row["students"]["probe"]["macro_f1"]}
    cache.write_text(json.dumps(result, indent=2) + "\n")
    return result


def finetune_file(path: Path, data: Path, runs: Path, n: int) -> dict:
    """The fine-tuned student on one prefix (1 seed, cached beside it); the real pool rows' fine-tune
    at N comes with the first prefix of that size and is cached once (``real.n<N>.finetune.json``)."""
    cache = path.with_suffix(".finetune.json")
    if cache.exists() and json.loads(cache.read_text()).get("n", len(read_complete(path))) != len(read_complete(path)):
        cache.unlink()                              # trained on other rows (an earlier prefix rule)
    if cache.exists():
        return json.loads(cache.read_text())
    real_cache = runs / f"real.n{n}.finetune.json"
    ev = json.loads(run([*DIVGEN, "eval", str(path), "--real", str(data), "--task", MODEL["task"], "--student",
                         "finetune", "--seeds", "1", "--json", *(["--no-real"] if real_cache.exists() else [])],
                        capture=True))
    syn = ev["rows"][0]["students"]["finetune"]
    real = next((r for r in ev["rows"] if r.get("real")), None)
    result = {"file": path.name, "n": len(read_complete(path)), "accuracy": syn["accuracy"], "macro_f1": syn["macro_f1"],
              "test_rows": ev["settings"]["finetune_test_rows"], "seconds": ev["settings"]["wall_time_s"]}
    if real is not None:
        result.update(real_n=real["n"], real_accuracy=real["students"]["finetune"]["accuracy"])
        real_cache.write_text(json.dumps({"n_asked": real["asked"], "n_used": real["n"],
                                          "accuracy": real["students"]["finetune"]["accuracy"],
                                          "test_rows": result["test_rows"], "from": path.name}, indent=2) + "\n")
    cache.write_text(json.dumps(result, indent=2) + "\n")
    return result


def finetune_real(runs: Path, n: int) -> dict | None:
    """The real pool rows' fine-tune at N: its own cache, else the one an older per-file cache kept."""
    cache = runs / f"real.n{n}.finetune.json"
    if cache.exists():
        return json.loads(cache.read_text())
    for c in sorted(runs.glob(f"*.n{n}.finetune.json")):
        r = json.loads(c.read_text())
        if "real_accuracy" in r:
            return {"n_asked": n, "n_used": r["real_n"], "accuracy": r["real_accuracy"], "test_rows": r["test_rows"],
                    "from": r["file"]}
    return None


def score_all(runs: Path, data: Path, variants, seeds, sizes, finetune_sizes) -> None:
    for n in sizes:
        for v in variants:
            for s in seeds:
                p = prefix(runs, v, s, n)
                if p is None:
                    continue
                score_file(p, data)
                score_real(runs, data, n, p)
    for n in finetune_sizes:
        for s in seeds:
            for v in variants:
                p = prefix(runs, v, s, n)
                if p is not None:
                    finetune_file(p, data, runs, n)


# ----------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------
KEYS = ("probe_accuracy", "probe_macro_f1", "fidelity", "self_bleu_4_label", "copy_rate", "eos_rate", "mean_words",
        "degenerate_rate", "duplicate_rate", "real_coverage", "real_centrality")


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


RESTORED_SETS = "restored_sets.json"


def restore(runs: Path, summary_path: Path) -> int:
    """Seed ``runs`` with a committed summary's results where ``runs`` has none of its own: each
    (variant, seed, N)'s scores, the real-data rows, the fine-tunes, and each set's size and
    generation time (``RESTORED_SETS``; a set generated here reports its own). The raw sets are not
    in the summary: a restored point is reported, not rescored. A set generated again here with the
    same seed draws the same prompts with the same row seeds; its tokens can differ only where a
    kernel changed rounding since (a Gemma CorrSynth set regenerated after the CPU GEMM, prefill and
    sampler changes scored exactly the committed 1,600-row probe accuracy). Returns the files
    written."""
    summary = json.loads(summary_path.read_text())
    wrote = 0

    def put(path: Path, value) -> None:
        nonlocal wrote
        if not path.exists():
            path.write_text(json.dumps(value, indent=2) + "\n")
            wrote += 1
    for v, per_n in summary.get("per_seed", {}).items():
        for n, per_s in per_n.items():
            for s, result in per_s.items():
                put(runs / f"{v}_s{s}.n{n}.score.json", result)
    for n, result in summary.get("real", {}).items():
        put(runs / f"real.n{n}.score.json", result)
    for v, per_n in summary.get("finetune", {}).items():
        for n, r in per_n.items():
            for s, result in r.get("per_seed", {}).items():
                put(runs / f"{v}_s{s}.n{n}.finetune.json", result)
    for n, result in summary.get("finetune_real", {}).items():
        put(runs / f"real.n{n}.finetune.json", result)
    old = runs / RESTORED_SETS
    sets = {**(json.loads(old.read_text()) if old.exists() else {}), **summary.get("sets", {})}
    old.write_text(json.dumps(sets, indent=2) + "\n")
    return wrote


def summarise(runs: Path, variants, seeds, sizes, finetune_sizes=(400,)) -> dict:
    per_seed, points, sets = {}, {}, {}
    restored = json.loads((runs / RESTORED_SETS).read_text()) if (runs / RESTORED_SETS).exists() else {}
    for v in variants:
        for s in seeds:
            secs, rows = gen_seconds(runs, v, s)
            have = len(read_complete(set_path(runs, v, s))) if rows else 0
            kept = restored.get(f"{v}_s{s}")
            # a set generated here describes the points only once it holds as many rows as the
            # restored record did (regenerating a set's first 100 rows must not shrink a 4,000 set)
            if rows and (kept is None or have >= kept["rows"]):
                sets[f"{v}_s{s}"] = {"rows": have, "generate_minutes": round(secs / 60, 1),
                                     "examples_per_s": round(rows / secs, 3) if secs else None}
            elif kept is not None:
                sets[f"{v}_s{s}"] = kept
        for n in sizes:
            got = {}
            for s in seeds:
                cache = runs / f"{v}_s{s}.n{n}.score.json"
                if cache.exists():
                    got[s] = json.loads(cache.read_text())
            if not got:
                continue
            per_seed.setdefault(v, {})[str(n)] = {str(s): r for s, r in got.items()}
            pt = {"seeds": sorted(got)}
            for k in KEYS:
                vals = [r[k] for r in got.values() if r.get(k) is not None]
                if vals:
                    pt[k] = mean_std(vals)
            rates = [sets[f"{v}_s{s}"]["examples_per_s"] for s in got if sets.get(f"{v}_s{s}", {}).get("examples_per_s")]
            pt["generate_minutes_est"] = round(n / statistics.fmean(rates) / 60, 1) if rates else None
            points.setdefault(v, {})[str(n)] = pt
    real = {}
    for n in sizes:
        cache = runs / f"real.n{n}.score.json"
        if cache.exists():
            real[str(n)] = json.loads(cache.read_text())
    finetune, finetune_reals = {}, {}
    for n in sorted(set(finetune_sizes)):
        for v in variants:
            got = {s: json.loads(c.read_text()) for s in seeds if (c := runs / f"{v}_s{s}.n{n}.finetune.json").exists()}
            if got:
                first = next(iter(got.values()))
                finetune.setdefault(v, {})[str(n)] = {
                    "seeds": sorted(got), "accuracy": mean_std([r["accuracy"]["mean"] for r in got.values()]),
                    "macro_f1": mean_std([r["macro_f1"]["mean"] for r in got.values()]),
                    "test_rows": first["test_rows"], "per_seed": {str(s): r for s, r in got.items()}}
        if (r := finetune_real(runs, n)) is not None:
            finetune_reals[str(n)] = r
    return {
        "what": f"AG News learning curves (experiments/curves.py): {MODEL['title']} (embedded), few-shot "
                "prompts (2 pool rows each), at most 48 new tokens, alpha (plausibility cutoff) 0.05, temperature "
                "1. Point N of a (variant, seed) is the first N rows in (group, slot) order (N/4 examples per label) "
                "of one generated set. Student: linear probe on frozen all-MiniLM-L6-v2 embeddings (1 seed per set; mean ± std over "
                "generation seeds), tested on the 6840 held-out real rows. Fidelity: a probe trained on the 760 "
                "real pool rows agrees with the label. Self-BLEU-4: per label on up to 200 texts (divgen metrics "
                "default), averaged over the 4 labels. Real: the same probe on as many real pool rows per label as "
                "the set has (all of a label's pool rows when it has fewer: 171-210 per label, 760 in all), 3 draws.",
        "variants": {v: VARIANTS[v] for v in variants},
        "sizes": sizes,
        "sets": sets,
        "points": points,
        "per_seed": per_seed,
        "real": real,
        "finetune": finetune,              # variant -> N -> the fine-tuned MiniLM over generation seeds
        "finetune_real": finetune_reals,   # N -> the same fine-tune on as many real pool rows (1 seed)
    }


def fmt(stat: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    if not stat:
        return "–"
    m = f"{scale * stat['mean']:.{digits}f}"
    return m if stat["std"] is None else f"{m} ± {scale * stat['std']:.{digits}f}"


def table(summary: dict) -> str:
    lines = ["| variant | N | seeds | probe acc % | fidelity % | sBLEU-4 (label) | copy % | EOS % | words | coverage | "
             "centrality | gen min (est.) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v, pts in summary["points"].items():
        for n, p in sorted(pts.items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {v} | {n} | {len(p['seeds'])} | {fmt(p.get('probe_accuracy'))} | {fmt(p.get('fidelity'))} | "
                         f"{fmt(p.get('self_bleu_4_label'), 1, 3)} | {fmt(p.get('copy_rate'))} | "
                         f"{fmt(p.get('eos_rate'))} | {fmt(p.get('mean_words'), 1, 1)} | "
                         f"{fmt(p.get('real_coverage'), 1, 3)} | {fmt(p.get('real_centrality'), 1, 3)} | "
                         f"{p['generate_minutes_est'] if p.get('generate_minutes_est') is not None else '–'} |")
    for n, r in sorted(summary["real"].items(), key=lambda kv: int(kv[0])):
        used = r["n_used"] if r["n_used"] == r["n_asked"] else f"{r['n_used']} (of {r['n_asked']} asked)"
        lines.append(f"| real pool rows | {used} | 3 | {fmt(r['probe_accuracy'])} | | | | | | | | |")
    ft, ft_real = summary.get("finetune") or {}, summary.get("finetune_real") or {}
    if ft:
        lines += ["", "| fine-tuned MiniLM | N | seeds | accuracy % | real pool rows' fine-tune % |",
                  "|---|---:|---:|---:|---:|"]
        for v, per_n in ft.items():
            for n, r in sorted(per_n.items(), key=lambda kv: int(kv[0])):
                real = ft_real.get(n)
                real_s = "–" if real is None else (fmt(real["accuracy"]) + (
                    f" ({real['n_used']} rows)" if real["n_used"] != int(n) else ""))
                lines.append(f"| {v} | {n} | {len(r['seeds'])} | {fmt(r['accuracy'])} | {real_s} |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        log("matplotlib is not installed: no PNG (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 6.4))
    for v, pts in summary["points"].items():
        ns = sorted(int(n) for n in pts)
        acc = [pts[str(n)]["probe_accuracy"] for n in ns]
        a.errorbar(ns, [100 * s["mean"] for s in acc], yerr=[100 * (s["std"] or 0) for s in acc], marker="o",
                   capsize=3, color=COLORS.get(v), label=f"{v} (seeds: {', '.join(str(len(pts[str(n)]['seeds'])) for n in ns)})")
        sb = [pts[str(n)].get("self_bleu_4_label") for n in ns]
        b.errorbar([n for n, s in zip(ns, sb) if s], [s["mean"] for s in sb if s], yerr=[s["std"] or 0 for s in sb if s],
                   marker="o", capsize=3, color=COLORS.get(v), label=v)
    if summary["real"]:
        ns = sorted(int(n) for n in summary["real"])
        rs = [summary["real"][str(n)] for n in ns]
        a.errorbar([r["n_used"] for r in rs], [100 * r["probe_accuracy"]["mean"] for r in rs],
                   yerr=[100 * r["probe_accuracy"]["std"] for r in rs], marker="s", capsize=3, color="black", ls="--",
                   label="real pool rows (at most 760)")
    for v, per_n in summary.get("finetune", {}).items():            # the fine-tuned student (dotted)
        ns = sorted(int(n) for n in per_n)
        fts = [per_n[str(n)] for n in ns]
        a.errorbar(ns, [100 * f["accuracy"]["mean"] for f in fts], yerr=[100 * (f["accuracy"]["std"] or 0) for f in fts],
                   marker="D", ms=7, mfc="none", capsize=3, ls=":", color=COLORS.get(v),
                   label=f"{v}, fine-tuned MiniLM (seeds: {', '.join(str(len(f['seeds'])) for f in fts)}; "
                         f"{fts[0]['test_rows']} test rows)")
    if summary.get("finetune_real"):
        rs = [summary["finetune_real"][n] for n in sorted(summary["finetune_real"], key=int)]
        a.errorbar([r["n_used"] for r in rs], [100 * r["accuracy"]["mean"] for r in rs], marker="D", ms=7,
                   mfc="none", ls=":", color="black", label="real pool rows, fine-tuned (1 seed)")
    sizes = {int(n) for pts in summary["points"].values() for n in pts}
    for ax, ticks in ((a, sorted(sizes | {r["n_used"] for r in summary["real"].values()})), (b, sorted(sizes))):
        ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("training examples N (log scale)")
        ax.grid(alpha=0.3)
    # the accuracy panel's legend goes below it: inside, it hid the fine-tuned markers
    a.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    b.legend(fontsize=8)
    tested = {f["test_rows"] for per_n in summary.get("finetune", {}).values() for f in per_n.values()}
    a.set_ylabel("student accuracy on held-out real rows, %\nsolid: probe (6840 rows)"
                 + (f"; dotted: fine-tuned ({', '.join(map(str, sorted(tested)))})" if tested else ""), fontsize=9)
    a.set_title(f"AG News, {MODEL['title']}: accuracy vs N")
    b.set_ylabel("per-label Self-BLEU-4 (lower = more diverse)")
    b.set_title("diversity vs N (Self-BLEU on ≤ 200 texts per label)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ag_news_test.csv"),
                    help="AG News CSV (the pool rows feed the prompts and the judge; the rest is the test set)")
    ap.add_argument("--model", choices=tuple(MODELS), default="smollm2",
                    help="packaged model (gemma3-270m: the GGUF is assembled from its PyPI chunks on first use)")
    ap.add_argument("--runs", default=None, help="folder of raw outputs (git-ignored; default runs/curves, "
                    "runs/curves-<model> for other models)")
    ap.add_argument("--stage", choices=("gen", "score", "summary", "all"), default="all")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated generation seeds")
    ap.add_argument("--sizes", default="100,400,1600", help="comma-separated N (multiples of 4), e.g. 100,400,1600,4000")
    ap.add_argument("--order", choices=("breadth", "depth"), default="breadth", help="gen schedule (module docstring)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="gen: synth processes at once, one thread each (e.g. the machine's cores; never two on one set)")
    ap.add_argument("--finetune", action="store_true",
                    help="score: also fine-tune the MiniLM student on each seed's prefix at --finetune-sizes "
                    "(~7 min a set of 400 on one core)")
    ap.add_argument("--finetune-sizes", default="400",
                    help="comma-separated N whose prefixes --finetune trains on (each one of --sizes; default 400)")
    ap.add_argument("--restore", default=None, metavar="SUMMARY_JSON",
                    help="first seed the runs folder with a committed summary's scores where it has none "
                    "(e.g. experiments/results/curves_<model>.json), so a fresh checkout extends the committed "
                    "curves: restored points are reported as they were, not rescored")
    ap.add_argument("--out", default=None,
                    help="summary path without suffix (.json and .png are written; default "
                    "experiments/results/curves_<model>)")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    sizes = sorted(int(n) for n in args.sizes.split(",") if n)
    ft_sizes = sorted(int(n) for n in args.finetune_sizes.split(",") if n)
    if args.finetune and any(n not in sizes for n in ft_sizes):
        print(f"curves: --finetune-sizes {args.finetune_sizes} names an N that --sizes {args.sizes} does not",
              file=sys.stderr)
        return 2
    if unknown or not seeds or not sizes or any(n <= 0 or n % LABELS for n in sizes):
        print(f"curves: bad --variants/--seeds/--sizes (variants: {', '.join(VARIANTS)}; N a positive multiple "
              f"of {LABELS})", file=sys.stderr)
        return 2
    data = Path(args.data).resolve()
    if not data.is_file():
        print(f"curves: {data} is not a file: pass --data PATH to the AG News test CSV", file=sys.stderr)
        return 2
    global MODEL
    MODEL = MODELS[args.model]
    if args.model == "gemma3-270m":
        gemma_gguf("curves")
    runs = Path(args.runs or ROOT / "runs" / ("curves" if args.model == "smollm2" else f"curves-{args.model}"))
    runs.mkdir(parents=True, exist_ok=True)
    if args.restore:
        src = Path(args.restore)
        if not src.is_file():
            print(f"curves: --restore {src} is not a file: pass a summary JSON such as "
                  f"experiments/results/curves_{MODEL['suffix']}.json", file=sys.stderr)
            return 2
        log(f"restored {restore(runs, src)} result files from {src}")
    if args.stage in ("gen", "all"):
        try:
            generate_all(data, runs, schedule(variants, seeds, sizes, args.order), args.jobs)
        except Stopped:
            log("stopped: the partial set resumes on the next run")
            return 1
    if args.stage in ("score", "all"):
        score_all(runs, data, variants, seeds, sizes, ft_sizes if args.finetune else [])
    if args.stage in ("score", "summary", "all"):
        summary = summarise(runs, variants, seeds, sizes, sizes)     # every fine-tune cached at these N
        out = Path(args.out or RESULTS / f"curves_{MODEL['suffix']}")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
        plot(summary, out.with_suffix(".png"))
        print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
