"""The AG News sweep behind the README's evidence: which method and settings make the best data?

For every configuration (method × g or γ/δ × α × temperature, few-shot prompts from the pool rows)
the sweep

1. generates the set with ``divgen synth`` (a subprocess, one thread; synth itself resumes a killed
   file), into ``runs/sweep/<name>.jsonl`` (git-ignored);
2. scores it into ``runs/sweep/<name>.eval.json``: intrinsic diversity (``divgen.engine.metrics``),
   copy and degenerate rates, label fidelity and student accuracy (``divgen.engine.eval``), once;
3. collects every scored configuration into ``experiments/results/sweep_summary.json`` and plots
   ``experiments/results/sweep.png`` (diversity vs fidelity; student accuracy per method).

Killed and started again, it skips what is done: finished sets are not regenerated, scored sets
are not re-scored. Run it in the background, one thread, niced::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/sweep.py --data ../shared/data/ag_news_test.csv
    .venv/bin/python experiments/sweep.py --data ../shared/data/ag_news_test.csv --stage summary   # table + plot

``--only NAME,NAME`` restricts the run to some configurations; ``--list`` prints the grid in run order.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from packaged import GEMMA_GGUF, gemma_gguf

ROOT = Path(__file__).resolve().parent.parent
TASK = ROOT / "divgen" / "engine" / "tasks" / "ag_news.yaml"
RESULTS = ROOT / "experiments" / "results"
DEFAULT_RUNS = ROOT / "runs" / "sweep"

# The grid, in run order: the configurations that decide the comparison first, so that a sweep
# stopped early still answers it. M-CorrSynth's γ is the total cross-label weight, the analogue
# of CorrSynth's g − 1; δ = γ / 2 as in the shipped task.
BASE = {"per_label": 16, "max_new_tokens": 48, "alpha": 0.05, "temperature": 1.0, "seed": 0}


def _cfg(method: str, **kw) -> dict:
    c = {**BASE, "method": method, **kw}
    parts = [method]
    if "g" in kw:
        parts.append(f"g{kw['g']:g}")
    if "gamma" in kw:
        parts.append(f"gam{kw['gamma']:g}-del{kw['delta']:g}")
    parts.append(f"a{c['alpha']:g}")
    parts.append(f"t{c['temperature']:g}")
    if kw.get("model_name"):
        parts.append(kw["model_name"])
    c["name"] = "_".join(parts)
    return c


# Gemma 3 270M (a base model): assembled once from its PyPI chunks, completion-style task file.
GEMMA = {"model": str(GEMMA_GGUF), "model_name": "gemma3-270m", "per_label": 16,
         "task": str(ROOT / "experiments" / "tasks" / "ag_news_base.yaml")}


GRID = [
    _cfg("fewgen"),
    _cfg("corrsynth", g=2.0),
    _cfg("corrsynth", g=1.5),
    _cfg("corrsynth", g=1.25),
    _cfg("corrsynth", g=2.0, alpha=0.1),
    _cfg("m-corrsynth", gamma=1.0, delta=0.5),
    _cfg("fewgen", temperature=0.7),
    _cfg("corrsynth", g=1.5, alpha=0.1),
    _cfg("corrsynth", g=3.0),
    _cfg("m-corrsynth", gamma=0.5, delta=0.25),
    _cfg("corrsynth", g=1.5, temperature=0.7),
    _cfg("fewgen", alpha=0.1),
    _cfg("corrsynth", g=1.25, alpha=0.1),
    _cfg("cfg", g=1.5),
    _cfg("m-corrsynth", gamma=0.25, delta=0.125),
    _cfg("fewgen", alpha=0.0),
    _cfg("corrsynth", g=1.5, alpha=0.0),
    _cfg("cfg", g=2.0),
    _cfg("corrsynth", g=1.25, temperature=0.7),
    _cfg("m-corrsynth", gamma=2.0, delta=1.0),
    _cfg("fewgen", **GEMMA),
    _cfg("corrsynth", g=1.5, **GEMMA),
    _cfg("corrsynth", g=2.0, **GEMMA),
]


def by_name() -> dict:
    return {c["name"]: c for c in GRID}


# ----------------------------------------------------------------------------------------------
# Stage 1: generate
# ----------------------------------------------------------------------------------------------
def synth_command(cfg: dict, data: Path, out: Path) -> list[str]:
    cmd = [str(ROOT / ".venv" / "bin" / "divgen"), "synth", cfg.get("task", str(TASK)), "--out", str(out),
           "--few-shot", str(data), "--method", cfg["method"], "--per-label", str(cfg["per_label"]),
           "--max-new-tokens", str(cfg["max_new_tokens"]), "--min-p", str(cfg["alpha"]),
           "--temperature", str(cfg["temperature"]), "--seed", str(cfg["seed"]), "--no-progress"]
    for key in ("g", "gamma", "delta"):
        if key in cfg:
            cmd += [f"--{key}", str(cfg[key])]
    if cfg.get("model"):
        cmd += ["--model", cfg["model"]]
    return cmd


def is_complete(cfg: dict, out: Path) -> bool:
    if not out.exists():
        return False
    lines = [ln for ln in out.read_text(encoding="utf-8").split("\n")[:-1] if ln.strip()]
    return len(lines) >= cfg["per_label"] * 4


def generate(cfg: dict, data: Path, runs: Path) -> bool:
    out = runs / f"{cfg['name']}.jsonl"
    if is_complete(cfg, out):
        return True
    if cfg.get("model") == str(GEMMA_GGUF):
        gemma_gguf("sweep")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.time()
    print(f"[sweep] generating {cfg['name']}", flush=True)
    proc = subprocess.run(synth_command(cfg, data, out), env=env, cwd=ROOT)
    took = time.time() - start
    timing = runs / f"{cfg['name']}.time.json"
    if proc.returncode == 0:
        prior = json.loads(timing.read_text()) if timing.exists() else {"seconds": 0.0}
        timing.write_text(json.dumps({"seconds": prior["seconds"] + took}))
        print(f"[sweep] {cfg['name']}: {took:.0f}s", flush=True)
        return True
    print(f"[sweep] {cfg['name']}: synth failed (exit {proc.returncode})", flush=True)
    if proc.returncode == 2:           # a usage error: every other configuration would fail the same way
        raise SystemExit(f"sweep: divgen synth refused the arguments of {cfg['name']}: fix synth_command")
    return False


# ----------------------------------------------------------------------------------------------
# Stage 2: score
# ----------------------------------------------------------------------------------------------
def sweep_task(cfg: dict, data: Path):
    from divgen.engine.synth.task import load_task

    return load_task(cfg.get("task", str(TASK))).with_overrides(few_shot_file=str(data), seed=cfg["seed"])


def shown_examples(task, records: list[dict]) -> list[list[str]]:
    """The few-shot texts each record's prompt showed, rebuilt from the task (records written
    before synth recorded ``examples`` lack the field; the rebuild is the same draw)."""
    from divgen.engine.synth.few_shot import few_shot_pool
    from divgen.engine.synth.prompts import pick_examples

    pool = few_shot_pool(task)
    return [pick_examples(task, pool, r["group"], r["slot"], r["label"]) for r in records]


def diversity(texts, labels, examples, phrases) -> dict:
    from divgen.engine.metrics import compute_metrics

    m = compute_metrics(texts, labels, examples=examples, label_phrases=phrases)
    per_label = lambda key, order=None: sum(  # noqa: E731
        (v[key] if order is None else v[key][order]) for v in m["labels"].values()) / len(m["labels"])
    o = m["overall"]
    return {"n": o["count"], "mean_words": o["mean_words"], "duplicate_rate": o["duplicate_rate"],
            "distinct_2": o["distinct"]["2"], "distinct_3": o["distinct"]["3"],
            "self_bleu_4": o["self_bleu"]["4"], "self_bleu_4_label": per_label("self_bleu", "4"),
            "cosine": o["cosine"], "cosine_label": per_label("cosine"),
            "copy_rate": o["copy_rate"], "degenerate_rate": o["degenerate_rate"]}


EQUAL_WORDS = 20


def equal_length_self_bleu(texts, labels) -> dict:
    """Per-label Self-BLEU-4 at equal length: only texts of >= 20 words, cut to their first 20
    (the guided methods' texts are shorter, and Self-BLEU depends on length)."""
    from divgen.engine.metrics import self_bleu, tokenize

    per, kept = [], 0
    for lab in sorted(set(labels)):
        cut = [tokenize(" ".join(t.split()[:EQUAL_WORDS])) for t, l in zip(texts, labels)
               if l == lab and len(t.split()) >= EQUAL_WORDS]
        kept += len(cut)
        sb = self_bleu(cut)
        if sb:
            per.append(sb[4])
    return {"self_bleu_4_label_len20": sum(per) / len(per) if per else None, "texts_len20": kept}


def first_records(cfg: dict, runs: Path, per_label: int) -> tuple[Path, list[dict]] | None:
    """The set's first ``per_label`` examples per label — the records of groups 0 .. per_label − 1,
    exactly what ``--per-label per_label`` generates (same seeds, same prompts) — in their own file."""
    from divgen.engine.metrics import read_records

    from divgen.engine.errors import DivgenError

    full = runs / f"{cfg['name']}.jsonl"
    try:
        records = sorted(read_records(full), key=lambda r: (r["group"], r["slot"]))
    except DivgenError:                  # not generated yet (missing or empty)
        return None
    records = [r for r in records if r["group"] < per_label]
    if len(records) < 4 * per_label:
        return None
    sub = runs / f"{cfg['name']}.n{4 * per_label}.jsonl"
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if not sub.exists() or sub.read_text(encoding="utf-8") != body:
        sub.write_text(body, encoding="utf-8")
    return sub, records


def score(cfg: dict, data: Path, runs: Path, finetune: bool, per_label: int | None = None) -> dict | None:
    """Diversity, copies, fidelity and students of one generated set (and of its filtered copy),
    on its first ``per_label`` examples per label (default: the configuration's count)."""
    from divgen.engine.eval.evaluate import evaluate
    from divgen.engine.filter import filter_rows

    per_label = per_label or cfg["per_label"]
    got = first_records(cfg, runs, per_label)
    if got is None:
        return None
    src, records = got
    n = 4 * per_label
    dest = runs / f"{cfg['name']}.n{n}.eval.json"
    result = json.loads(dest.read_text()) if dest.exists() else {}
    task = sweep_task(cfg, data)
    if "students" not in result:
        print(f"[sweep] scoring {cfg['name']} (first {n})", flush=True)
        texts, labels = [r["text"] for r in records], [r["label"] for r in records]
        examples = shown_examples(task, records)
        phrases = {lab.name: [lab.name, lab.verbalization] for lab in task.labels}
        ev = evaluate([src], data, task, students=("probe",), seeds=(0, 1, 2), log=lambda m: None)
        syn, real = ev["rows"]
        rep = filter_rows(texts, labels, examples=examples, label_phrases=phrases)
        filtered = runs / f"{cfg['name']}.n{n}.filtered.jsonl"
        filtered.write_text("".join(json.dumps(records[i]) + "\n" for i in rep.kept))
        fev = evaluate([filtered], data, task, students=("probe",), seeds=(0, 1, 2), real_ceiling=False,
                       log=lambda m: None)
        timing = runs / f"{cfg['name']}.time.json"
        result = {
            "config": {**cfg, "per_label": per_label},
            "diversity": diversity(texts, labels, examples, phrases),
            "fidelity": syn["fidelity"], "fidelity_per_label": syn["fidelity_per_label"],
            "students": syn["students"],
            "real_ceiling": real["students"],
            "judge": ev["settings"]["judge"], "test_rows": ev["settings"]["test_rows"],
            "filtered": {"kept": len(rep.kept), "removed": rep.counts(), "fidelity": fev["rows"][0]["fidelity"],
                         "students": fev["rows"][0]["students"]},
            "generate_seconds": json.loads(timing.read_text())["seconds"] if timing.exists() else None,
        }
        dest.write_text(json.dumps(result, indent=2))
    if "self_bleu_4_label_len20" not in result["diversity"]:
        result["diversity"].update(equal_length_self_bleu([r["text"] for r in records], [r["label"] for r in records]))
        dest.write_text(json.dumps(result, indent=2))
    if finetune and "finetune" not in result["students"]:
        print(f"[sweep] fine-tuning on {cfg['name']} (first {n})", flush=True)
        # the real-data ceiling of the fine-tuned student is the same for every set: computed once
        ceiling_done = any("finetune" in json.loads(p.read_text()).get("real_ceiling", {})
                           for p in runs.glob(f"*.n{n}.eval.json"))
        ev = evaluate([src], data, task, students=("finetune",), seeds=(0, 1, 2), finetune_test_limit=1000,
                      real_ceiling=not ceiling_done, log=lambda m: print(f"[sweep]   {m}", flush=True))
        result["students"]["finetune"] = ev["rows"][0]["students"]["finetune"]
        if not ceiling_done:
            result["real_ceiling"]["finetune"] = ev["rows"][1]["students"]["finetune"]
        dest.write_text(json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------------------------
# Stage 3: summary + plot
# ----------------------------------------------------------------------------------------------
METHOD_COLORS = {"fewgen": "tab:blue", "corrsynth": "tab:red", "m-corrsynth": "tab:orange", "cfg": "tab:green"}


def summarise(runs: Path) -> dict:
    rows, at200 = [], []
    for cfg in GRID:
        path = runs / f"{cfg['name']}.n{4 * cfg['per_label']}.eval.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
        if (runs / f"{cfg['name']}.n200.eval.json").exists() and cfg["per_label"] != 50:
            at200.append(json.loads((runs / f"{cfg['name']}.n200.eval.json").read_text()))
    not_run = [c["name"] for c in GRID if not (runs / f"{c['name']}.n{4 * c['per_label']}.eval.json").exists()]
    ceiling = dict(rows[0]["real_ceiling"]) if rows else None
    for r in rows:
        if "finetune" in r["real_ceiling"]:
            ceiling["finetune"] = r["real_ceiling"]["finetune"]
    summary = {
        "what": "AG News sweep (experiments/sweep.py): SmolLM2-135M-Instruct (Gemma 3 270M where named), "
                "few-shot prompts (2 pool rows), 64 examples per configuration (16 per label: one decode batch), at most "
                "48 new tokens, seed 0; configs_200: the same at 200 examples; students tested on the 6840 "
                "held-out real rows; probe = linear probe on frozen all-MiniLM-L6-v2 embeddings (3 seeds)",
        "real_ceiling": ceiling,
        "configs": rows,
        "configs_200": at200,
        "not_run": not_run,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sweep_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def table(summary: dict, key: str = "configs") -> str:
    head = ("| config | words | sBLEU-4 (label) | sBLEU-4 (label, 20 words) | cosine (label) | dist-3 | copy | degen "
            "| fidelity % | probe acc % | after filter: n, acc % |")
    lines = [head, "|---|" + "---:|" * 10]
    for r in summary[key]:
        d, s, f = r["diversity"], r["students"]["probe"]["accuracy"], r["filtered"]
        fs = f["students"]["probe"]["accuracy"]
        eq = d.get("self_bleu_4_label_len20")
        lines.append(f"| {r['config']['name']} | {d['mean_words']:.1f} | {d['self_bleu_4_label']:.3f} | "
                     f"{'-' if eq is None else f'{eq:.3f}'} ({d.get('texts_len20', 0)}) | "
                     f"{d['cosine_label']:.3f} | {d['distinct_3']:.3f} | {d['copy_rate']:.3f} | "
                     f"{d['degenerate_rate']:.3f} | {100 * r['fidelity']:.1f} | {100 * s['mean']:.1f} ± {100 * s['std']:.1f} | "
                     f"{f['kept']}, {100 * fs['mean']:.1f} |")
    c = summary["real_ceiling"] if key == "configs" else (summary[key][0]["real_ceiling"] if summary[key] else None)
    if c:
        lines.append(f"| real pool rows ({64 if key == 'configs' else 200}) | | | | | | | | | {100 * c['probe']['accuracy']['mean']:.1f} ± "
                     f"{100 * c['probe']['accuracy']['std']:.1f} | |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["configs"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5.2))
    for r in rows:
        m = r["config"]["method"]
        gemma = "gemma" in r["config"]["name"]
        a.scatter(r["diversity"]["self_bleu_4_label"], 100 * r["fidelity"], color=METHOD_COLORS[m], s=40,
                  marker="^" if gemma else "o")
        a.annotate(r["config"]["name"].replace(m + "_", ""), (r["diversity"]["self_bleu_4_label"], 100 * r["fidelity"]),
                   fontsize=7, xytext=(3, 3), textcoords="offset points")
    for m, col in METHOD_COLORS.items():
        a.scatter([], [], color=col, label=m)
    a.scatter([], [], color="gray", marker="^", label="Gemma 3 270M (others: SmolLM2-135M)")
    a.set_xlabel("per-label Self-BLEU-4 (lower = more diverse)")
    a.set_ylabel("label fidelity, % (judge trained on real pool rows)")
    a.set_title("diversity vs fidelity")
    a.legend(fontsize=8)
    names = [r["config"]["name"] for r in rows]
    acc = [100 * r["students"]["probe"]["accuracy"]["mean"] for r in rows]
    filt = [100 * r["filtered"]["students"]["probe"]["accuracy"]["mean"] for r in rows]
    ys = range(len(rows))
    b.barh([y + 0.2 for y in ys], acc, height=0.4, color=[METHOD_COLORS[r["config"]["method"]] for r in rows],
           label="as generated")
    b.barh([y - 0.2 for y in ys], filt, height=0.4, color="lightgray", label="after divgen filter")
    top = max(acc + filt)
    if summary["real_ceiling"]:
        top = max(top, 100 * summary["real_ceiling"]["probe"]["accuracy"]["mean"])
        b.axvline(100 * summary["real_ceiling"]["probe"]["accuracy"]["mean"], color="black", ls="--",
                  label="64 real pool rows")
    b.set_yticks(list(ys))
    b.set_yticklabels(names, fontsize=7)
    b.set_xlim(min(acc + filt) - 5, top + 4)
    b.set_xlabel("student accuracy on 6840 real test rows, % (linear probe)")
    b.set_title("student accuracy per configuration")
    b.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ag_news_test.csv"),
                    help="AG News CSV (the pool rows feed the prompts and the judge; the rest is the test set)")
    ap.add_argument("--runs", default=str(DEFAULT_RUNS), help="folder of raw outputs (git-ignored)")
    ap.add_argument("--stage", choices=("gen", "score", "summary", "all"), default="all")
    ap.add_argument("--only", help="comma-separated configuration names")
    ap.add_argument("--list", action="store_true", help="print the grid in run order and exit")
    ap.add_argument("--also-200", action="store_true", help="also score sets that have 200 examples at 200")
    ap.add_argument("--finetune", help="comma-separated configuration names that also get the fine-tuned student")
    args = ap.parse_args(argv)
    if args.list:
        for c in GRID:
            print(c["name"])
        return 0
    data = Path(args.data).resolve()
    if not data.is_file():
        print(f"sweep: {data} is not a file: pass --data PATH to the AG News test CSV", file=sys.stderr)
        return 2
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    grid = GRID
    if args.only:
        names = by_name()
        unknown = [n for n in args.only.split(",") if n not in names]
        if unknown:
            print(f"sweep: unknown configuration(s) {', '.join(unknown)}: see --list", file=sys.stderr)
            return 2
        grid = [names[n] for n in args.only.split(",")]
    if args.stage in ("gen", "all"):
        for cfg in grid:
            generate(cfg, data, runs)
    if args.stage in ("score", "all"):
        tuned = set((args.finetune or "").split(","))
        for cfg in grid:
            score(cfg, data, runs, cfg["name"] in tuned)
            if args.also_200:
                score(cfg, data, runs, False, per_label=50)
    if args.stage in ("summary", "score", "all"):
        summary = summarise(runs)
        if summary["configs"]:
            plot(summary, RESULTS / "sweep.png")
            print(table(summary))
            if summary["configs_200"]:
                print(table(summary, "configs_200"))
            print(f"not run: {', '.join(summary['not_run']) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
