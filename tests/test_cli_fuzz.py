"""Bad invocations of the `divgen` CLI, run in-process (issue 8): each must exit 2 with one stderr
line that names the fix, no traceback, and leave every file it was given byte-for-byte as it was
(and create none). Every case of issue 8's "Why" is a row here (tagged ``# issue 8.N``).

A second test runs every row in one fresh interpreter and checks that none of them imported torch:
bad input is answered before anything slow."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from divgen.bindings.cli import main as cli_main

TASK = {
    "labels": [{"name": "world", "verbalization": "world news"}, {"name": "sports"}],
    "prompt": "Write one sentence of news about {verbalization}.",
    "per_label": 1, "max_new_tokens": 4,
}
RECORD = {"text": "x", "label": "world", "group": 0, "slot": 0}
H, R = 8, 2    # hidden size and rank of the fake adapters (their files are checked before any model)


def _adapter(folder: Path, *, weight=0.5, config_extra: str = "") -> None:
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    a = np.full((R, H), weight, dtype=np.float32)
    b = np.zeros((H, R), dtype=np.float32)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "target_modules": ["q_proj"], '
        + (config_extra or '"lora_alpha": 4') + "}")


def build_inputs(d: Path) -> None:
    """Every file the rows refer to, under ``d``."""
    import yaml

    (d / "task.yaml").write_text(yaml.safe_dump(TASK))
    (d / "bad_gamma.yaml").write_text(yaml.safe_dump({**TASK, "methods": {"m-corrsynth": {"gamma": -1}}}))
    (d / "unknown_field.yaml").write_text(yaml.safe_dump({**TASK, "temprature": 1.0}))
    (d / "broken.yaml").write_text("labels: [a, b\nprompt: x")
    (d / "unknown_label.yaml").write_text(yaml.safe_dump({**TASK, "per_label": {"world": 1, "weather": 2}}))
    (d / "bom.csv").write_bytes(b"\xef\xbb\xbflabel,text\n1,one\n2,two\n")
    (d / "bom_task.yaml").write_text(yaml.safe_dump({**TASK, "few_shot": {"file": "bom.csv", "every": 1}}))
    (d / "quote.csv").write_text('label,text\nworld,"an unterminated quote\nsports,fine\n')
    (d / "quote_task.yaml").write_text(yaml.safe_dump({**TASK, "few_shot": {"file": "quote.csv", "every": 1}}))
    (d / "nolabel.csv").write_text("category,text\nworld,x\n")
    (d / "nolabel_task.yaml").write_text(yaml.safe_dump({**TASK, "few_shot": {"file": "nolabel.csv"}}))
    (d / "config.json").write_text('{"config": {"lr": 0.001}}')
    (d / "config_nl.json").write_text('{"config": {"lr": 0.001}}\n')
    (d / "notes.txt").write_text("my notes")
    (d / "notes_nl.txt").write_text("my notes\n")
    (d / "torn.jsonl").write_text('{"text": "half a rec')
    (d / "synth_out.jsonl").write_text(json.dumps(RECORD) + "\n")
    (d / "outdir").mkdir()
    (d / "nomodel").mkdir()
    (d / "brokenmodel").mkdir()
    (d / "brokenmodel" / "config.json").write_text('{"model_type": "nonsense"}')
    _adapter(d / "brokenmodel_weights")           # whole safetensors, a model_type nobody knows: fails at load
    (d / "brokenmodel" / "model.safetensors").write_bytes(
        (d / "brokenmodel_weights" / "adapter_model.safetensors").read_bytes())
    (d / "gen.jsonl").write_text('{"text": "a"}\nnot json\n{"text": "b"}\n')
    (d / "pairs.jsonl").write_text('{"prompt": "p1", "response": "r1"}\n{"prompt": "p2", "response": "r2"}\n')
    (d / "queries.jsonl").write_text('{"prompt": "q"}\n')
    (d / "prompts.jsonl").write_text('{"prompt": "Say hi."}\n')
    (d / "existing_file").write_text("keep me\n")
    _adapter(d / "good" / "a0")
    _adapter(d / "nan_weights", weight=float("nan"))
    _adapter(d / "inf_weights", weight=float("inf"))
    _adapter(d / "nan_alpha", config_extra='"lora_alpha": NaN')
    _adapter(d / "bad_manifest" / "a0")
    (d / "bad_manifest" / "adapters.json").write_text('{"adapters": ["a0"')
    (d / "hub_cache").mkdir()
    build_inputs_22(d)


AG = ["world", "sports", "business", "sci_tech"]


def _synth_records(n: int, tag: str = "") -> str:
    return "".join(json.dumps({"text": f"{tag}text number {i} about some things here", "label": AG[i % 4],
                               "group": i, "slot": 0, "method": "fewgen"}) + "\n" for i in range(n))


def _corrupt_adapter(folder: Path, mutate) -> None:
    _adapter(folder)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(mutate(weights.read_bytes()))


def build_inputs_22(d: Path) -> None:
    """The inputs of the rows for filter, export, eval, show, metrics, bench and spa (issue 22)."""
    (d / "syn.jsonl").write_text(_synth_records(8))
    (d / "syn2.jsonl").write_text(_synth_records(8, "other "))
    (d / "syn_copy.jsonl").write_text(_synth_records(8))
    (d / "empty.jsonl").write_text("")
    (d / "blank.jsonl").write_text("\n\n  \n")
    (d / "bad_utf8.jsonl").write_bytes(b'{"text": "caf\xe9", "label": "world"}\n')
    (d / "list_line.jsonl").write_text('[1, 2]\n')
    (d / "text_int.jsonl").write_text('{"text": 5, "label": "world", "group": 0, "slot": 0}\n')
    (d / "no_label.jsonl").write_text('{"text": "a b c d e f", "group": 0, "slot": 0}\n')
    (d / "odd_label.jsonl").write_text('{"text": "a b c d e f", "label": "weather", "group": 0, "slot": 0}\n')
    (d / "no_group.jsonl").write_text('{"text": "a b c", "label": "world"}\n')
    (d / "ex_int.jsonl").write_text(json.dumps({**RECORD, "examples": 5}) + "\n")                # issue 22
    (d / "ex_dict.jsonl").write_text(json.dumps({**RECORD, "examples": {"a": 1}}) + "\n")
    (d / "ex_rows.jsonl").write_text(json.dumps({**RECORD, "examples": [3]}) + "\n")
    (d / "side_list.jsonl").write_text(_synth_records(4))
    (d / ".side_list.jsonl.task.json").write_text("[1, 2]")                                        # issue 22
    (d / "side_bad.jsonl").write_text(_synth_records(4))
    (d / ".side_bad.jsonl.task.json").write_text("{not json")
    (d / "side_num.jsonl").write_text(_synth_records(4))
    (d / ".side_num.jsonl.task.json").write_text("42")
    # real labelled files (ag_news maps source labels 1..4; pool rows are index % 10 == 0)
    rows = "".join(f"{1 + (i // 10) % 4},real text {i} about things\n" for i in range(80))
    (d / "real.csv").write_text("label,text\n" + rows)
    (d / "real_bom.csv").write_bytes(b"\xef\xbb\xbf" + ("label,text\n" + rows).encode())
    (d / "two_rows.csv").write_text("label,text\n1,world news about politics\n2,sports news about games\n")  # 22
    (d / "real_one_label.csv").write_text("label,text\n" + "".join(f"1,t {i}\n" for i in range(40)))
    (d / "real_bad_utf8.csv").write_bytes(b"label,text\n1,caf\xe9\n")
    (d / "real_quote.csv").write_text('label,text\n1,"never closed\n2,x\n')
    (d / "real_no_label.csv").write_text("category,text\n1,x\n")
    (d / "real_no_text.csv").write_text("label,body\n1,x\n")
    (d / "real_unknown.csv").write_text("label,text\n9,x\n8,y\n")
    (d / "real_empty.csv").write_text("")
    (d / "real_header_only.csv").write_text("label,text\n")
    (d / "real_huge_field.csv").write_text("label,text\n1,\"" + "a" * 300_000)    # quote never closes
    (d / "real_dict.jsonl").write_text('{"label": {"a": 1}, "text": "x"}\n')
    (d / "real_text_list.jsonl").write_text('{"label": 1, "text": ["x"]}\n')
    (d / "fs_huge.csv").write_text("label,text\n1,\"" + "a" * 300_000)
    (d / "fs_huge_task.yaml").write_text(json.dumps({**TASK, "few_shot": {"file": "fs_huge.csv", "every": 1}}))
    (d / "fs_bad_utf8_task.yaml").write_text(json.dumps({**TASK, "few_shot": {"file": "real_bad_utf8.csv"}}))
    (d / "fs_empty_task.yaml").write_text(json.dumps({**TASK, "few_shot": {"file": "real_empty.csv"}}))
    # task files: an alias bomb, deep nesting (issue 22)
    bomb = "prompt: [&a [x,x,x,x,x,x,x,x,x,x], " + ", ".join(
        f"&{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 10) + "]" for i in range(8)) + "]\n"
    (d / "many_labels.yaml").write_text("labels: [" + ", ".join(f"l{i}" for i in range(257)) + "]\n"
                                        "prompt: 'Write a {label} text.'\nmethod: cfg\n")
    (d / "bomb.yaml").write_text("labels: [{name: a}, {name: b}]\n" + bomb)
    (d / "deep.yaml").write_text("prompt: " + "[" * 100_000 + "]" * 100_000 + "\n")
    (d / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (d / "list_task.yaml").write_text("- a\n- b\n")
    # corrupt safetensors adapters (issue 22: one was reported as "out of memory")
    _corrupt_adapter(d / "st_header_huge", lambda b: (1 << 60).to_bytes(8, "little") + b[8:])
    _corrupt_adapter(d / "st_header_json", lambda b: len(b"{nope").to_bytes(8, "little") + b"{nope")
    _corrupt_adapter(d / "st_short", lambda b: b[:5])
    _corrupt_adapter(d / "st_truncated", lambda b: b[:-8])
    _corrupt_adapter(d / "st_header_list", lambda b: (2).to_bytes(8, "little") + b"[]")
    # outputs that are not the command's own
    (d / "notes2.txt").write_text("more notes\n")
    (d / "foreign_dir").mkdir()
    (d / "foreign_dir" / "keep.txt").write_text("mine")
    (d / "real_folder").mkdir()
    (d / "real_folder" / "x").write_text("x")
    (d / "link_to_folder").symlink_to(d / "real_folder")
    (d / "link_to_file").symlink_to(d / "notes.txt")
    (d / "pd").mkdir()
    (d / "pd" / "scores.jsonl").write_text('{"prompt": "p1", "response": "r1"}\n{"prompt": "p2", "response": "r2"}\n')
    (d / "pd_foreign").mkdir()
    (d / "pd_foreign" / "scores.jsonl").write_text("my own scores\n")
    (d / "pd_badpart").mkdir()
    (d / "pd_badpart" / "partitions.json").write_text("[1, 2]")
    (d / "parts_list.json").write_text("[1, 2]")
    (d / "parts_range.json").write_text('{"k": 2, "assignment": [0, 5]}')
    (d / "parts_bad.json").write_text("{oops")
    (d / "bench_foreign.json").write_text('{"mine": true}\n')
    (d / "prompts3.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"}\n')
    for name, config, weights in (("model_bad_weights", '{"model_type": "llama"}', b"not a safetensors file"),
                                  ("model_config_list", "[1, 2]", None), ("model_config_bad", "{oops", None)):
        (d / name).mkdir()
        (d / name / "config.json").write_text(config)
        (d / name / "model.safetensors").write_bytes(weights or (d / "brokenmodel" / "model.safetensors").read_bytes())
    (d / "bad_prompts.txt").write_bytes(b"caf\xe9\n")
    (d / "fake.gguf").write_bytes(b"NOTGGUF at all")
    (d / "bench_png.png").write_bytes(b"\x89PNG\r\n\x1a\n not a bench plot")


S = ["synth", "{d}/task.yaml", "--out", "{d}/new.jsonl"]     # a valid synth call to add one bad thing to
G = ["generate", "hello"]
SAMPLE = ["spa", "sample", "--adapters", "{d}/good", "--prompts", "{d}/prompts.jsonl"]
PART = ["spa", "partition", "--data", "{d}/pairs.jsonl", "--queries", "{d}/queries.jsonl"]
ADAPT = ["spa", "adapt", "--data", "{d}/pairs.jsonl", "--out", "{d}/adapters_new"]

# (id, argv, a phrase the one error line must contain)
ROWS = [
    # ---- generate ------------------------------------------------------------------------------
    ("gen-empty-prompt", ["generate", "  "], "prompt is empty"),
    ("gen-n-0", [*G, "-n", "0"], "-n must be in [1, 4096]"),
    ("gen-n-huge", [*G, "-n", "200000"], "-n must be in [1, 4096]"),                     # issue 8.3
    ("gen-max-new-0", [*G, "--max-new-tokens", "0"], "--max-new-tokens must be in [1, 32768]"),
    ("gen-max-new-huge", [*G, "--max-new-tokens", "10000000"], "--max-new-tokens must be in [1, 32768]"),
    ("gen-max-tokens-alias", [*G, "--max-tokens", "-3"], "--max-new-tokens must be"),
    ("gen-temperature-inf", [*G, "--temperature", "inf"], "--temperature must be a finite number"),  # issue 8.6
    ("gen-temperature-nan", [*G, "--temperature", "nan"], "--temperature must be a finite number"),
    ("gen-temperature-neg", [*G, "--temperature", "-1"], "--temperature must be in [0, 100]"),
    ("gen-temperature-big", [*G, "--temperature", "101"], "--temperature must be in [0, 100]"),
    ("gen-temperature-text", [*G, "--temperature", "warm"], "invalid float value"),
    ("gen-top-p-0", [*G, "--top-p", "0"], "--top-p must be in (0, 1]"),
    ("gen-top-p-big", [*G, "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    ("gen-top-k-neg", [*G, "--top-k", "-1"], "--top-k must be in [0,"),
    ("gen-min-p-over-1", [*G, "--min-p", "1.01"], "--min-p must be in [0, 1]"),
    ("gen-alpha-1", [*G, "--alpha", "1"], "--alpha must be in [0, 1)"),
    ("gen-min-p-nan", [*G, "--min-p", "nan"], "--min-p must be a finite number"),
    ("gen-seed-huge", [*G, "--seed", str(2 ** 63)], "--seed must be in"),
    ("gen-stop-empty", [*G, "--stop", ""], "--stop must be a list of non-empty strings"),
    ("gen-device-bogus", [*G, "--device", "bogus"], "--device 'bogus' is not a device"),        # issue 8.5
    ("gen-device-cuda-x", [*G, "--device", "cuda:x"], "is not a device"),
    ("gen-dtype", [*G, "--dtype", "int8"], "--dtype 'int8' is not a dtype"),
    ("gen-model-missing", [*G, "--model", "{d}/no/such/model"], "does not exist"),
    ("gen-model-hub-not-cached", [*G, "--model", "someorg/some-model"], "not in the local Hugging Face cache"),
    ("gen-model-text-file", [*G, "--model", "{d}/notes.txt"], "not a .gguf model"),
    ("gen-model-empty-dir", [*G, "--model", "{d}/nomodel"], "no config.json"),
    ("gen-unknown-flag", [*G, "--beam-width", "4"], "unrecognized arguments"),
    # ---- synth: an existing --out that is not a synth output (issue 8.1) -----------------------
    ("synth-out-config-json", ["synth", "{d}/task.yaml", "--out", "{d}/config.json"], "new --out"),
    ("synth-out-config-json-nl", ["synth", "{d}/task.yaml", "--out", "{d}/config_nl.json"], "new --out"),
    ("synth-out-text", ["synth", "{d}/task.yaml", "--out", "{d}/notes.txt"], "new --out"),
    ("synth-out-text-nl", ["synth", "{d}/task.yaml", "--out", "{d}/notes_nl.txt"], "new --out"),
    ("synth-out-torn-no-sidecar", ["synth", "{d}/task.yaml", "--out", "{d}/torn.jsonl"], "new --out"),
    ("synth-out-dir", ["synth", "{d}/task.yaml", "--out", "{d}/outdir"], "is a directory"),
    ("synth-out-no-folder", ["synth", "{d}/task.yaml", "--out", "{d}/nofolder/o.jsonl"], "does not exist"),
    # ---- synth: sizes and values ----------------------------------------------------------------
    ("synth-per-label-huge", [*S, "--per-label", "1000000000"], "the maximum is 10,000,000"),   # issue 8.3
    ("synth-per-label-0", [*S, "--per-label", "0"], "--per-label must be >= 1"),
    ("synth-temperature-inf", [*S, "--temperature", "inf"], "--temperature must be a finite number"),
    ("synth-min-p", [*S, "--min-p", "1.5"], "--min-p must be in [0, 1]"),
    ("synth-alpha-1", [*S, "--alpha", "1"], "--alpha must be in [0, 1)"),
    ("synth-alpha-nan", [*S, "--alpha", "nan"], "--alpha must be a finite number"),
    ("synth-top-k", [*S, "--top-k", "-3"], "--top-k must be"),
    ("synth-max-new-0", [*S, "--max-new-tokens", "0"], "--max-new-tokens must be in"),
    ("synth-method", [*S, "--method", "beam"], "is not a method"),
    ("synth-g-low", [*S, "--g", "0.5"], "--g (guidance scale g) must be in [1, 100]"),
    ("synth-g-nan", [*S, "--g", "nan"], "--g (guidance scale g) must be a finite number"),
    ("synth-gamma-neg", [*S, "--method", "m-corrsynth", "--gamma", "-1"], "--gamma (γ (cross-label weight)) must be"),
    ("synth-rows-per-group", [*S, "--rows-per-group", "1"], "needs at least 2 rows per group"),
    ("synth-batch-rows", [*S, "--batch-rows", "0"], "--batch-rows must be in"),
    ("synth-copy-guard-1", [*S, "--copy-guard", "1"], "--copy-guard must be 0 (off) or at least 2 tokens"),
    ("synth-copy-guard-huge", [*S, "--copy-guard", "65"], "--copy-guard must be in [0, 64]"),
    ("synth-copy-guard-neg", [*S, "--copy-guard", "-8"], "--copy-guard must be in [0, 64]"),
    ("synth-copy-guard-text", [*S, "--copy-guard", "eight"], "invalid int value"),
    ("synth-own-special-bad-method", [*S, "--own-special", "--method", "beam"], "is not a method"),
    ("synth-no-own-special-bad-g", [*S, "--no-own-special", "--g", "0.5"], "--g (guidance scale g) must be in [1, 100]"),
    ("synth-device", [*S, "--device", "bogus"], "--device 'bogus' is not a device"),
    ("synth-model-missing", [*S, "--model", "{d}/no/such/model"], "does not exist"),
    ("synth-stop-empty", [*S, "--stop", ""], "--stop must be a list"),
    # ---- synth: task files and few-shot files (issue 8.6) --------------------------------------
    ("task-yaml-gamma", ["synth", "{d}/bad_gamma.yaml", "--out", "{d}/new.jsonl", "--method", "m-corrsynth"],
     "field 'methods.m-corrsynth.gamma'"),
    ("task-missing", ["synth", "{d}/nope.yaml", "--out", "{d}/new.jsonl"], "does not exist"),
    ("task-broken-yaml", ["synth", "{d}/broken.yaml", "--out", "{d}/new.jsonl"], "is not valid YAML"),
    ("task-unknown-field", ["synth", "{d}/unknown_field.yaml", "--out", "{d}/new.jsonl"], "did you mean 'sampling.temperature'"),
    ("task-unknown-label", ["synth", "{d}/unknown_label.yaml", "--out", "{d}/new.jsonl"], "unknown label"),
    ("csv-bom-read-as-label", ["synth", "{d}/bom_task.yaml", "--out", "{d}/new.jsonl"],
     "labels in the file's pool: 1, 2"),
    ("csv-unterminated-quote", ["synth", "{d}/quote_task.yaml", "--out", "{d}/new.jsonl"], "unterminated quote"),
    ("csv-no-label-column", ["synth", "{d}/nolabel_task.yaml", "--out", "{d}/new.jsonl"], "'label' column"),
    ("few-shot-missing", [*S, "--few-shot", "{d}/none.csv"], "--few-shot names"),
    # ---- metrics --------------------------------------------------------------------------------
    ("metrics-missing", ["metrics", "{d}/none.jsonl"], "is not a file"),
    ("metrics-bad-line", ["metrics", "{d}/gen.jsonl", "--no-embeddings"], "line 2 is not JSON"),
    ("metrics-sample-neg", ["metrics", "{d}/synth_out.jsonl", "--self-bleu-sample", "-1"], "--self-bleu-sample"),
    # ---- spa ------------------------------------------------------------------------------------
    ("spa-nan-weights", [*SAMPLE[:3], "{d}/nan_weights", *SAMPLE[4:]], "NaN or infinite"),           # issue 8.2
    ("spa-inf-weights", [*SAMPLE[:3], "{d}/inf_weights", *SAMPLE[4:]], "NaN or infinite"),
    ("spa-nan-lora-alpha", [*SAMPLE[:3], "{d}/nan_alpha", *SAMPLE[4:]], "lora_alpha = nan is not a finite"),
    ("spa-bad-manifest", [*SAMPLE[:3], "{d}/bad_manifest", *SAMPLE[4:]], "adapters.json is not valid JSON"),  # 8.5
    ("spa-sample-out-dir", [*SAMPLE, "--out", "{d}/outdir"], "is a directory"),                     # issue 8.4
    ("spa-sample-out-no-folder", [*SAMPLE, "--out", "{d}/nofolder/s.jsonl"], "does not exist"),
    ("spa-sample-out-foreign", [*SAMPLE, "--out", "{d}/notes_nl.txt"], "new --out"),
    ("spa-sample-temperature", [*SAMPLE, "--temperature", "inf"], "--temperature must be a finite number"),
    ("spa-sample-copies-greedy", [*SAMPLE, "--copies", "2"], "set --temperature > 0"),
    ("spa-sample-device", [*SAMPLE, "--device", "bogus"], "is not a device"),
    ("spa-partition-out-file", [*PART, "--method", "lexical", "--out", "{d}/existing_file"],
     "is an existing file"),                                                                         # issue 8.5
    ("spa-lissa-damping-nan", [*PART, "--method", "influence", "--lissa-damping", "nan", "--out", "{d}/p"],
     "--lissa-damping (damping) must be a finite number"),                                           # issue 8.6
    ("spa-partition-balance", [*PART, "--method", "lexical", "--balance", "2", "--out", "{d}/p"], "--balance"),
    ("spa-partition-data-missing", ["spa", "partition", "--data", "{d}/none.jsonl", "--queries",
                                    "{d}/queries.jsonl", "--method", "lexical", "--out", "{d}/p"], "does not exist"),
    ("spa-adapt-lora-alpha-nan", [*ADAPT, "--lora-alpha", "nan"], "--lora-alpha (lora_alpha) must be a finite"),
    ("spa-adapt-alpha-renamed", [*ADAPT, "--alpha", "8"], "--lora-alpha (LoRA's alpha, spa)"),
    ("spa-adapt-rank-0", [*ADAPT, "--rank", "0"], "--rank (rank) must be in"),
    ("spa-adapt-device", [*ADAPT, "--device", "bogus"], "is not a device"),
    ("spa-run-model-missing", ["spa", "run", "ag_news", "--model", "{d}/nomodel", "--out", "{d}/run"],
     "is not a model directory"),
    ("spa-run-out-file", ["spa", "run", "ag_news", "--out", "{d}/existing_file"], "is an existing file"),
    ("spa-run-k", ["spa", "run", "ag_news", "--k", "1", "--out", "{d}/run"], "--k must be in [2, 4096]"),
]

# ---- issue 22: every command and flag, the newer commands included -------------------------------
F = ["filter", "{d}/syn.jsonl", "--out", "{d}/f_new.jsonl"]
EX = ["export", "{d}/syn.jsonl", "--to", "parquet", "{d}/ds_new"]
EV = ["eval", "{d}/syn.jsonl", "--real", "{d}/real.csv", "--task", "ag_news"]
SH = ["show", "{d}/syn.jsonl", "{d}/syn2.jsonl"]
ME = ["metrics", "{d}/syn.jsonl", "--no-embeddings"]
BK = ["bench", "kernel", "--vocab", "64", "--methods", "fewgen", "--batch-sizes", "2"]
PL = [*PART, "--method", "lexical", "--out", "{d}/p_new"]
RUN = ["spa", "run", "ag_news", "--out", "{d}/run_new"]
MUST_BE_INT = "must be an integer"

ROWS_22 = [
    # ---- generate: bytes, devices and the flags the first table did not cover -------------------
    ("gen-prompt-bad-bytes", ["generate", b"caf\xe9 ok".decode("utf-8", "surrogateescape")],
     "not UTF-8 text"),                                                                          # issue 22
    ("gen-device-mps", [*G, "--device", "mps"], "--device mps is not supported"),                # issue 22
    ("gen-device-text", [*G, "--device", "gpu"], "is not a device"),
    ("gen-num-samples-alias", [*G, "--num-samples", "0"], "-n must be in [1, 4096]"),
    ("gen-n-text", [*G, "-n", "two"], "invalid int value"),
    ("gen-top-k-huge", [*G, "--top-k", str(2 ** 40)], "--top-k must be in [0,"),
    ("gen-top-k-text", [*G, "--top-k", "1.5"], "invalid int value"),
    ("gen-top-p-nan", [*G, "--top-p", "nan"], "--top-p must be a finite number"),
    ("gen-min-p-neg", [*G, "--min-p", "-0.1"], "--min-p must be in [0, 1]"),
    ("gen-seed-neg-huge", [*G, "--seed", str(-2 ** 63)], "--seed must be in"),
    ("gen-seed-text", [*G, "--seed", "x"], "invalid int value"),
    ("gen-diverse-low", [*G, "-n", "2", "--diverse", "0.5"], "--diverse G must be in"),
    ("gen-diverse-nan", [*G, "-n", "2", "--diverse", "nan"], "--diverse G must be in"),
    ("gen-diverse-one-sample", [*G, "--diverse", "2"], "give -n 2 or more"),
    ("gen-compile-bad-dtype", [*G, "--compile", "--dtype", "int4"], "is not a dtype"),
    ("gen-no-compile-bad-temp", [*G, "--no-compile", "--temperature", "-2"], "--temperature must be in"),
    ("gen-chat-empty", ["generate", "", "--chat"], "prompt is empty"),
    ("gen-no-chat-n0", [*G, "--no-chat", "-n", "0"], "-n must be in"),
    ("gen-json-bad-top-p", [*G, "--json", "--top-p", "2"], "--top-p must be in (0, 1]"),
    ("gen-ignore-eos-value", [*G, "--ignore-eos", "yes"], "unrecognized arguments"),
    ("gen-stop-twice-empty", [*G, "--stop", "a", "--stop", ""], "--stop must be a list"),
    ("gen-model-link-missing", [*G, "--model", "{d}/link_missing_model"], "does not exist"),
    ("gen-dtype-auto-typo", [*G, "--dtype", "autos"], "is not a dtype"),
    ("gen-model-corrupt-weights", [*G, "--model", "{d}/model_bad_weights"], "model weights"),
    ("gen-model-config-list", [*G, "--model", "{d}/model_config_list"], "is a JSON list, not an object"),
    ("gen-model-config-bad-json", [*G, "--model", "{d}/model_config_bad"], "is not valid JSON"),
    ("gen-model-fake-gguf", [*G, "--model", "{d}/fake.gguf"], "GGUF magic bytes"),
    ("synth-model-corrupt-weights", [*S, "--model", "{d}/model_bad_weights"], "model weights"),
    ("spa-sample-model-config-list", [*SAMPLE, "--model", "{d}/model_config_list"], "is a JSON list"),
    ("spa-sample-prompts-bad-utf8", [*SAMPLE[:5], "{d}/bad_prompts.txt"], "is not UTF-8"),
    ("spa-partition-queries-bad-utf8", ["spa", "partition", "--data", "{d}/pairs.jsonl", "--queries",
                                        "{d}/bad_prompts.txt", "--method", "lexical", "--out", "{d}/p_new"],
     "is not UTF-8"),
    # ---- synth: flags, few-shot files and task files ----------------------------------------------
    ("synth-delta-neg", [*S, "--method", "m-corrsynth", "--delta", "-1"], "--delta"),
    ("synth-delta-inf", [*S, "--method", "m-corrsynth", "--delta", "inf"], "--delta"),
    ("synth-gamma-nan", [*S, "--method", "m-corrsynth", "--gamma", "nan"], "--gamma"),
    ("synth-g-huge", [*S, "--g", "1e9"], "--g (guidance scale g) must be in [1, 100]"),
    ("synth-top-p-0", [*S, "--top-p", "0"], "--top-p must be in (0, 1]"),
    ("synth-seed-huge", [*S, "--seed", str(2 ** 70)], "--seed must be in"),
    ("synth-max-tokens-alias", [*S, "--max-tokens", "0"], "--max-new-tokens must be in"),
    ("synth-dtype", [*S, "--dtype", "int8"], "is not a dtype"),
    ("synth-device-mps", [*S, "--device", "mps"], "--device mps is not supported"),
    ("synth-rows-per-group-huge", [*S, "--rows-per-group", "100000"], "--rows-per-group must be in [1, 256]"),
    # a group the kernels cannot take is refused at the edge (it used to pass the task check and fail in
    # the kernel plan with a traceback)
    ("synth-rows-per-group-257", [*S, "--rows-per-group", "257"], "--rows-per-group must be in [1, 256]"),
    ("synth-cfg-labels-over-kernels", ["synth", "{d}/many_labels.yaml", "--out", "{d}/new.jsonl", "--method", "cfg"],
     "257 labels make groups of 257 rows"),
    ("synth-batch-rows-huge", [*S, "--batch-rows", "10000000"], "--batch-rows must be in"),
    ("synth-per-label-text", [*S, "--per-label", "many"], "invalid int value"),
    ("synth-ignore-eos-bad-temp", [*S, "--ignore-eos", "--temperature", "nan"], "--temperature must be a finite"),
    ("synth-no-progress-bad-top-k", [*S, "--no-progress", "--top-k", "-1"], "--top-k must be"),
    ("synth-compile-bad-min-p", [*S, "--compile", "--min-p", "2"], "--min-p must be in"),
    ("synth-no-compile-method", [*S, "--no-compile", "--method", "nucleus"], "is not a method"),
    ("synth-stop-twice-empty", [*S, "--stop", "x", "--stop", ""], "--stop must be a list"),
    ("synth-ray-workers-0", [*S, "--ray", "--ray-workers", "0"], "--ray-workers must be"),
    ("synth-ray-cpus-0", [*S, "--ray", "--ray-cpus-per-worker", "0"], "--ray-cpus-per-worker must be"),
    ("synth-ray-gpus-neg", [*S, "--ray", "--ray-gpus-per-worker", "-1"], "--ray-gpus-per-worker must be"),
    ("synth-ray-workers-without-ray", [*S, "--ray-workers", "0"], "--ray-workers needs --ray"),
    ("synth-ray-cpus-without-ray", [*S, "--ray-cpus-per-worker", "2"], "--ray-cpus-per-worker needs --ray"),
    ("synth-ray-gpus-without-ray", [*S, "--ray-gpus-per-worker", "1"], "--ray-gpus-per-worker needs --ray"),
    ("synth-ray-gpus-nan", [*S, "--ray", "--ray-gpus-per-worker", "nan"], "--ray-gpus-per-worker must be"),
    ("synth-few-shot-long-open-quote", ["synth", "{d}/fs_huge_task.yaml", "--out", "{d}/new.jsonl"],
     "unterminated quote"),                                                                      # issue 22
    ("synth-few-shot-bad-utf8", ["synth", "{d}/fs_bad_utf8_task.yaml", "--out", "{d}/new.jsonl"], "not UTF-8"),
    ("synth-few-shot-empty", ["synth", "{d}/fs_empty_task.yaml", "--out", "{d}/new.jsonl"], "is empty"),
    ("synth-few-shot-flag-bad-utf8", [*S, "--few-shot", "{d}/real_bad_utf8.csv"], "not UTF-8"),
    ("task-yaml-alias-bomb", ["synth", "{d}/bomb.yaml", "--out", "{d}/new.jsonl"],
     "expands to more than 1,000,000 values"),                                                   # issue 22
    ("task-yaml-deep", ["synth", "{d}/deep.yaml", "--out", "{d}/new.jsonl"], "task file"),
    ("task-json-deep", ["synth", "{d}/deep.json", "--out", "{d}/new.jsonl"], "nested too deeply"),
    ("task-yaml-list", ["synth", "{d}/list_task.yaml", "--out", "{d}/new.jsonl"], "must be a mapping of fields"),
    ("synth-out-link", ["synth", "{d}/task.yaml", "--out", "{d}/link_to_file"], "--out"),
    # ---- metrics ----------------------------------------------------------------------------------
    ("metrics-sidecar-list", ["metrics", "{d}/side_list.jsonl", "--no-embeddings"], "is a JSON list, not an object"),
    ("metrics-sidecar-bad-json", ["metrics", "{d}/side_bad.jsonl", "--no-embeddings"], "is not valid JSON"),
    ("metrics-sidecar-number", ["metrics", "{d}/side_num.jsonl", "--no-embeddings"], "is a JSON int"),
    ("metrics-examples-int", ["metrics", "{d}/ex_int.jsonl", "--no-embeddings"],
     "'examples' must be a list"),                                                               # issue 22
    ("metrics-examples-dict", ["metrics", "{d}/ex_dict.jsonl", "--no-embeddings"], "'examples' must be a list"),
    ("metrics-examples-rows-no-file", ["metrics", "{d}/ex_rows.jsonl", "--no-embeddings"], "pass --few-shot FILE"),
    ("metrics-empty", ["metrics", "{d}/empty.jsonl", "--no-embeddings"], "holds no examples"),
    ("metrics-blank", ["metrics", "{d}/blank.jsonl", "--no-embeddings"], "holds no examples"),
    ("metrics-bad-utf8", ["metrics", "{d}/bad_utf8.jsonl", "--no-embeddings"], "is not UTF-8"),
    ("metrics-list-line", ["metrics", "{d}/list_line.jsonl", "--no-embeddings"], "is not a JSON object"),
    ("metrics-text-int", ["metrics", "{d}/text_int.jsonl", "--no-embeddings"], "has no 'text' string"),
    ("metrics-dir", ["metrics", "{d}/outdir", "--no-embeddings"], "is not a file"),
    ("metrics-second-file-missing", ["metrics", "{d}/syn.jsonl", "{d}/none.jsonl", "--no-embeddings"], "is not a file"),
    ("metrics-json-missing", ["metrics", "{d}/none.jsonl", "--json"], "is not a file"),
    ("metrics-markdown-missing", ["metrics", "{d}/syn.jsonl", "{d}/none.jsonl", "--markdown"], "is not a file"),
    ("metrics-sample-seed-text", [*ME, "--sample-seed", "x"], "invalid int value"),
    ("metrics-sample-seed-bad-file", ["metrics", "{d}/none.jsonl", "--sample-seed", "3"], "is not a file"),
    ("metrics-self-bleu-text", [*ME, "--self-bleu-sample", "all"], "invalid int value"),
    # ---- filter (issue 22: it replaced unrelated files) ------------------------------------------
    ("filter-out-foreign-text", ["filter", "{d}/syn.jsonl", "--out", "{d}/notes.txt"],
     "is not an output of divgen filter"),                                                       # issue 22
    ("filter-removed-foreign-text", [*F, "--removed", "{d}/notes2.txt"],
     "is not an output of divgen filter"),                                                       # issue 22
    ("filter-out-synth-output", ["filter", "{d}/syn.jsonl", "--out", "{d}/syn2.jsonl"], "is not an output of divgen filter"),
    ("filter-out-config", ["filter", "{d}/syn.jsonl", "--out", "{d}/config.json"], "is not an output of divgen filter"),
    ("filter-out-is-input", ["filter", "{d}/syn.jsonl", "--out", "{d}/syn.jsonl"], "is the input file"),
    ("filter-removed-is-input", [*F, "--removed", "{d}/syn.jsonl"], "is the input file"),
    ("filter-out-is-real", [*F[:3], "{d}/real.csv", "--real", "{d}/real.csv"], "is the input file"),
    ("filter-out-is-few-shot", [*F[:3], "{d}/bom.csv", "--few-shot", "{d}/bom.csv"], "is the input file"),
    ("filter-removed-equals-out", [*F, "--removed", "{d}/f_new.jsonl"], "name the same file"),
    ("filter-out-dir", ["filter", "{d}/syn.jsonl", "--out", "{d}/outdir"], "is a directory"),
    ("filter-out-no-folder", ["filter", "{d}/syn.jsonl", "--out", "{d}/nofolder/o.jsonl"], "does not exist"),
    ("filter-out-link", ["filter", "{d}/syn.jsonl", "--out", "{d}/link_to_file"], "is a symbolic link"),
    ("filter-out-long-name", ["filter", "{d}/syn.jsonl", "--out", "{d}/" + "o" * 250 + ".jsonl"],
     "longer than 255 bytes"),                                                                   # issue 22
    ("filter-out-marker-too-long", ["filter", "{d}/syn.jsonl", "--out", "{d}/" + "o" * 240 + ".jsonl"],
     "longer than 255 bytes"),
    ("filter-out-dot", ["filter", "{d}/syn.jsonl", "--out", "."], "is not a file name"),
    ("filter-input-missing", ["filter", "{d}/none.jsonl", "--out", "{d}/f_new.jsonl"], "is not a file"),
    ("filter-input-dir", ["filter", "{d}/outdir", "--out", "{d}/f_new.jsonl"], "is not a file"),
    ("filter-input-empty", ["filter", "{d}/empty.jsonl", "--out", "{d}/f_new.jsonl"], "holds no examples"),
    ("filter-input-bad-utf8", ["filter", "{d}/bad_utf8.jsonl", "--out", "{d}/f_new.jsonl"], "is not UTF-8"),
    ("filter-input-list-line", ["filter", "{d}/list_line.jsonl", "--out", "{d}/f_new.jsonl"], "is not a JSON object"),
    ("filter-input-text-int", ["filter", "{d}/text_int.jsonl", "--out", "{d}/f_new.jsonl"], "has no 'text' string"),
    ("filter-sidecar-list", ["filter", "{d}/side_list.jsonl", "--out", "{d}/f_new.jsonl"],
     "is a JSON list, not an object"),                                                           # issue 22
    ("filter-sidecar-bad-json", ["filter", "{d}/side_bad.jsonl", "--out", "{d}/f_new.jsonl"], "is not valid JSON"),
    ("filter-examples-int", ["filter", "{d}/ex_int.jsonl", "--out", "{d}/f_new.jsonl"],
     "'examples' must be a list"),                                                               # issue 22
    ("filter-examples-dict", ["filter", "{d}/ex_dict.jsonl", "--out", "{d}/f_new.jsonl"], "'examples' must be a list"),
    ("filter-examples-rows-no-file", ["filter", "{d}/ex_rows.jsonl", "--out", "{d}/f_new.jsonl"], "pass --few-shot"),
    ("filter-few-shot-missing", ["filter", "{d}/ex_rows.jsonl", "--out", "{d}/f_new.jsonl", "--few-shot",
                                 "{d}/none.csv"], "pass --few-shot FILE"),
    ("filter-few-shot-bad-utf8", ["filter", "{d}/ex_rows.jsonl", "--out", "{d}/f_new.jsonl", "--few-shot",
                                  "{d}/real_bad_utf8.csv"], "not UTF-8"),
    ("filter-min-words-neg", [*F, "--min-words", "-1"], "--min-words must be in [0,"),
    ("filter-min-words-huge", [*F, "--min-words", "1000000000"], "--min-words must be in [0,"),
    ("filter-min-words-text", [*F, "--min-words", "five"], "invalid int value"),
    ("filter-copy-n-0", [*F, "--copy-n", "0"], "--copy-n must be in [1,"),
    ("filter-copy-n-huge", [*F, "--copy-n", "1000000000"], "--copy-n must be in [1,"),
    ("filter-near-0", [*F, "--near-threshold", "0"], "--near-threshold must be in (0, 1]"),
    ("filter-near-nan", [*F, "--near-threshold", "nan"], "--near-threshold must be a finite number"),
    ("filter-near-inf", [*F, "--near-threshold", "inf"], "--near-threshold must be a finite number"),
    ("filter-near-big", [*F, "--near-threshold", "1.5"], "--near-threshold must be in (0, 1]"),
    ("filter-real-missing", [*F, "--real", "{d}/none.csv"], "--real"),
    ("filter-real-bom-one-label", [*F, "--real", "{d}/real_one_label.csv", "--task", "ag_news"],
     "the real pool has no rows of label(s)"),
    ("filter-real-two-rows", [*F, "--real", "{d}/two_rows.csv", "--task", "ag_news"], "the real pool has no rows"),
    ("filter-real-bad-utf8", [*F, "--real", "{d}/real_bad_utf8.csv", "--task", "ag_news"], "not UTF-8"),
    ("filter-real-quote", [*F, "--real", "{d}/real_quote.csv", "--task", "ag_news"], "unterminated quote"),
    ("filter-real-no-label", [*F, "--real", "{d}/real_no_label.csv", "--task", "ag_news"], "no label column"),
    ("filter-real-label-column", [*F, "--real", "{d}/real.csv", "--task", "ag_news", "--label-column", "cat"],
     "no label column 'cat'"),
    ("filter-real-text-column", [*F, "--real", "{d}/real.csv", "--task", "ag_news", "--text-column", "body"],
     "no text column 'body'"),
    ("filter-real-no-task", [*F, "--real", "{d}/real.csv"], "pass --task TASK"),
    ("filter-task-missing", [*F, "--real", "{d}/real.csv", "--task", "{d}/none.yaml"], "does not exist"),
    ("filter-task-bomb", [*F, "--real", "{d}/real.csv", "--task", "{d}/bomb.yaml"], "expands to more than"),
    ("filter-real-odd-labels", ["filter", "{d}/odd_label.jsonl", "--out", "{d}/f_new.jsonl", "--real",
                                "{d}/real.csv", "--task", "ag_news"], "are not the task's"),
    ("filter-keep-degenerate-bad", [*F, "--keep-degenerate", "--copy-n", "0"], "--copy-n"),
    ("filter-keep-copies-bad", [*F, "--keep-copies", "--min-words", "-2"], "--min-words"),
    ("filter-keep-duplicates-bad", [*F, "--keep-duplicates", "--near-threshold", "-1"], "--near-threshold"),
    ("filter-keep-near-duplicates-bad", [*F, "--keep-near-duplicates", "--near-threshold", "2"], "--near-threshold"),
    ("filter-json-bad", [*F, "--json", "--min-words", "-1"], "--min-words"),
    ("filter-no-out", ["filter", "{d}/syn.jsonl"], "the following arguments are required: --out"),
    # ---- export (issue 22: it deleted the working folder, replaced through links, exported twice) --
    ("export-twice-same-file", ["export", "{d}/syn.jsonl", "{d}/syn.jsonl", "--to", "parquet", "{d}/ds_new"],
     "is given twice"),                                                                          # issue 22
    ("export-twice-same-path-spelling", ["export", "{d}/syn.jsonl", "{d}/./syn.jsonl", "--to", "hf", "{d}/ds_new"],
     "is given twice"),
    ("export-link-overwrite", ["export", "{d}/syn.jsonl", "--to", "parquet", "{d}/link_to_folder", "--overwrite"],
     "is a symbolic link"),                                                                      # issue 22
    ("export-link", ["export", "{d}/syn.jsonl", "--to", "parquet", "{d}/link_to_folder"], "is a symbolic link"),
    ("export-foreign-overwrite", ["export", "{d}/syn.jsonl", "--to", "parquet", "{d}/foreign_dir", "--overwrite"],
     "holds files that divgen export did not write"),
    ("export-foreign", ["export", "{d}/syn.jsonl", "--to", "hf", "{d}/foreign_dir"], "did not write"),
    ("export-onto-file", ["export", "{d}/syn.jsonl", "--to", "parquet", "{d}/notes.txt"], "is not a folder"),
    ("export-holds-input", ["export", "{d}/pd/scores.jsonl", "--to", "parquet", "{d}/pd", "--overwrite"],
     "would hold its own input"),
    ("export-into-input", ["export", "{d}/syn.jsonl", "--to", "parquet", "{d}/syn.jsonl"], "is not a folder"),
    ("export-root", ["export", "{d}/syn.jsonl", "--to", "parquet", "/", "--overwrite"], "working folder or holds it"),
    ("export-no-parent", ["export", "{d}/syn.jsonl", "--to", "parquet", "{d}/nofolder/ds"], "does not exist"),
    ("export-long-name", ["export", "{d}/syn.jsonl", "--to", "parquet", "{d}/" + "d" * 300], "longer than 255 bytes"),
    ("export-format", ["export", "{d}/syn.jsonl", "--to", "csv", "{d}/ds_new"], "--to 'csv'"),
    ("export-to-one-value", ["export", "{d}/syn.jsonl", "--to", "parquet"], "expected 2 arguments"),
    ("export-validation-1", [*EX, "--validation", "1"], "--validation must be in [0, 1)"),
    ("export-validation-neg", [*EX, "--validation", "-0.1"], "--validation must be in [0, 1)"),
    ("export-validation-nan", [*EX, "--validation", "nan"], "--validation must be a finite number"),
    ("export-validation-text", [*EX, "--validation", "half"], "invalid float value"),
    ("export-seed-huge", [*EX, "--seed", str(2 ** 70)], "--seed must be in"),
    ("export-seed-text", [*EX, "--seed", "s"], "invalid int value"),
    ("export-missing-input", ["export", "{d}/none.jsonl", "--to", "parquet", "{d}/ds_new"], "is not a file"),
    ("export-input-dir", ["export", "{d}/outdir", "--to", "parquet", "{d}/ds_new"], "is not a file"),
    ("export-empty-input", ["export", "{d}/empty.jsonl", "--to", "parquet", "{d}/ds_new"], "holds no complete record"),
    ("export-bad-utf8", ["export", "{d}/bad_utf8.jsonl", "--to", "parquet", "{d}/ds_new"], "is not UTF-8"),
    ("export-no-label", ["export", "{d}/no_label.jsonl", "--to", "parquet", "{d}/ds_new"], "has no text and label"),
    ("export-text-int", ["export", "{d}/text_int.jsonl", "--to", "parquet", "{d}/ds_new"], "has no text and label"),
    ("export-same-records", ["export", "{d}/syn.jsonl", "{d}/syn_copy.jsonl", "--to", "parquet", "{d}/ds_new"],
     "holds the same records as"),
    ("export-sidecar-list", ["export", "{d}/side_list.jsonl", "--to", "parquet", "{d}/ds_new"],
     "is not a divgen task sidecar"),
    ("export-no-metrics-bad", [*EX, "--no-metrics", "--validation", "2"], "--validation"),
    ("export-no-embeddings-bad", [*EX, "--no-embeddings", "--seed", "x"], "invalid int value"),
    ("export-overwrite-bad", [*EX, "--overwrite", "--validation", "-1"], "--validation"),
    # ---- eval (issue 22: a ceiling trained on one row, a judge on one class) -----------------------
    ("eval-real-two-rows", ["eval", "{d}/syn.jsonl", "--real", "{d}/two_rows.csv", "--task", "ag_news"],
     "the real pool has no rows of label(s)"),                                                   # issue 22
    ("eval-real-one-label", [*EV[:3], "{d}/real_one_label.csv", *EV[4:]], "the real pool has no rows of label(s)"),
    ("eval-real-bom-column", [*EV[:3], "{d}/real_bom.csv", *EV[4:], "--label-column", "labels"],
     "columns: label, text"),                                                                    # issue 22
    ("eval-real-bad-utf8", [*EV[:3], "{d}/real_bad_utf8.csv", *EV[4:]], "line 2 is not UTF-8"),
    ("eval-real-quote", [*EV[:3], "{d}/real_quote.csv", *EV[4:]], "unterminated quote"),
    ("eval-real-long-open-quote", [*EV[:3], "{d}/real_huge_field.csv", *EV[4:]], "unterminated quote"),
    ("eval-real-no-label", [*EV[:3], "{d}/real_no_label.csv", *EV[4:]], "no label column 'label'"),
    ("eval-real-no-text", [*EV[:3], "{d}/real_no_text.csv", *EV[4:]], "no 'text' column"),
    ("eval-real-unknown-labels", [*EV[:3], "{d}/real_unknown.csv", *EV[4:]], "that the task does not map"),
    ("eval-real-empty", [*EV[:3], "{d}/real_empty.csv", *EV[4:]], "is empty"),
    ("eval-real-header-only", [*EV[:3], "{d}/real_header_only.csv", *EV[4:]], "holds no rows"),
    ("eval-real-label-dict", [*EV[:3], "{d}/real_dict.jsonl", *EV[4:]], "must be a string or an integer"),
    ("eval-real-text-list", [*EV[:3], "{d}/real_text_list.jsonl", *EV[4:]], "holds a JSON list, not text"),
    ("eval-real-missing", [*EV[:3], "{d}/none.csv", *EV[4:]], "is not a file"),
    ("eval-real-dir", [*EV[:3], "{d}/outdir", *EV[4:]], "is not a file"),
    ("eval-no-real", ["eval", "{d}/syn.jsonl", "--task", "ag_news"], "required: --real"),
    ("eval-label-column", [*EV, "--label-column", "category"], "no label column 'category'"),
    ("eval-text-column", [*EV, "--text-column", "body"], "no text column 'body'"),
    ("eval-synthetic-missing", ["eval", "{d}/none.jsonl", "--real", "{d}/real.csv", "--task", "ag_news"], "is not a file"),
    ("eval-synthetic-twice", ["eval", "{d}/syn.jsonl", "{d}/syn.jsonl", "--real", "{d}/real.csv", "--task",
                              "ag_news"], "is given twice"),
    ("eval-synthetic-empty", ["eval", "{d}/empty.jsonl", "--real", "{d}/real.csv", "--task", "ag_news"], "holds no examples"),
    ("eval-synthetic-odd-label", ["eval", "{d}/odd_label.jsonl", "--real", "{d}/real.csv", "--task", "ag_news"],
     "are not the task's"),
    ("eval-synthetic-no-label", ["eval", "{d}/no_label.jsonl", "--real", "{d}/real.csv", "--task", "ag_news"],
     "has no 'label'"),
    ("eval-synthetic-sidecar-list", ["eval", "{d}/side_list.jsonl", "--real", "{d}/real.csv"],
     "is a JSON list, not an object"),
    ("eval-no-task", ["eval", "{d}/syn.jsonl", "--real", "{d}/real.csv"], "pass --task TASK"),
    ("eval-task-missing", [*EV[:5], "{d}/none.yaml"], "does not exist"),
    ("eval-task-bomb", [*EV[:5], "{d}/bomb.yaml"], "expands to more than"),
    ("eval-task-deep", [*EV[:5], "{d}/deep.json"], "nested too deeply"),
    ("eval-student", [*EV, "--student", "teacher"], "invalid choice"),
    ("eval-seeds-0", [*EV, "--seeds", "0"], "--seeds must be in [1,"),
    ("eval-seeds-huge", [*EV, "--seeds", "1000000"], "--seeds must be in [1,"),
    ("eval-test-limit-0", [*EV, "--test-limit", "0"], "--test-limit must be in [1,"),
    ("eval-test-limit-huge", [*EV, "--test-limit", str(10 ** 12)], "--test-limit must be in [1,"),
    ("eval-finetune-test-limit-neg", [*EV, "--finetune-test-limit", "-1"], "--finetune-test-limit must be in [0,"),
    ("eval-epochs-0", [*EV, "--epochs", "0"], "--epochs must be in [1,"),
    ("eval-epochs-huge", [*EV, "--epochs", "100000"], "--epochs must be in [1,"),
    ("eval-no-real-row-nothing", ["eval", "--real", "{d}/real.csv", "--task", "ag_news", "--no-real"],
     "nothing to evaluate"),
    ("eval-json-bad", [*EV, "--json", "--seeds", "0"], "--seeds"),
    ("eval-markdown-bad", [*EV, "--markdown", "--epochs", "-1"], "--epochs"),
    # ---- show -------------------------------------------------------------------------------------
    ("show-empty-file", ["show", "{d}/empty.jsonl", "{d}/syn.jsonl"], "holds no complete record"),  # issue 22
    ("show-blank-file", ["show", "{d}/syn.jsonl", "{d}/blank.jsonl"], "holds no complete record"),
    ("show-missing", ["show", "{d}/none.jsonl"], "does not exist"),
    ("show-dir", ["show", "{d}/outdir"], "is a directory"),
    ("show-bad-utf8", ["show", "{d}/bad_utf8.jsonl"], "is not UTF-8"),
    ("show-list-line", ["show", "{d}/list_line.jsonl"], "is not a JSON object"),
    ("show-not-synth", ["show", "{d}/no_group.jsonl"], "is not a synth record"),
    ("show-per-label-0", [*SH, "--per-label", "0"], "--per-label must be in [1,"),
    ("show-per-label-huge", [*SH, "--per-label", str(10 ** 12)], "--per-label must be in [1,"),
    ("show-width-small", [*SH, "--width", "3"], "--width must be in [20,"),
    ("show-width-huge", [*SH, "--width", str(10 ** 9)], "--width must be in [20,"),
    ("show-width-text", [*SH, "--width", "wide"], "invalid int value"),
    ("show-no-files", ["show"], "the following arguments are required"),
    # ---- bench (issue 22: tracebacks after the benchmark ran) ------------------------------------
    ("bench-output-json-dir", [*BK, "--output-json", "{d}/outdir"], "is a directory"),            # issue 22
    ("bench-output-json-foreign", [*BK, "--output-json", "{d}/bench_foreign.json"], "is not an output of divgen bench"),
    ("bench-output-json-text", [*BK, "--output-json", "{d}/notes.txt"], "is not an output of divgen bench"),
    ("bench-output-json-link", [*BK, "--output-json", "{d}/link_to_file"], "is a symbolic link"),
    ("bench-output-json-no-folder", [*BK, "--output-json", "{d}/nofolder/r.json"], "does not exist"),
    ("bench-output-json-long", [*BK, "--output-json", "{d}/" + "r" * 300 + ".json"], "longer than 255 bytes"),
    ("bench-plot-not-png", [*BK, "--plot", "{d}/p.svg"], "--plot writes a PNG"),
    ("bench-plot-foreign-png", [*BK, "--plot", "{d}/bench_png.png"], "is not an output of divgen bench"),
    ("bench-plot-no-folder", [*BK, "--plot", "{d}/nofolder/p.png"], "does not exist"),
    ("bench-plot-same-as-json", [*BK, "--plot", "{d}/x.png", "--output-json", "{d}/x.png"], "name the same file"),
    ("bench-device-bogus", [*BK, "--device", "bogus"], "--device 'bogus' is not a device"),       # issue 22
    ("bench-device-mps", [*BK, "--device", "mps"], "--device mps is not supported"),
    ("bench-seed-huge", [*BK, "--seed", str(2 ** 70)], "--seed must be in"),                      # issue 22
    ("bench-vocab-huge", ["bench", "kernel", "--vocab", "2000000000"], "--vocab must be in [2,"),  # issue 22
    ("bench-vocab-1", [*BK, "--vocab", "1"], "--vocab must be in [2,"),
    ("bench-vocab-times-batch", ["bench", "kernel", "--vocab", "1048576", "--batch-sizes", "4096"], "1 GiB of fp32"),
    ("bench-batch-sizes-0", [*BK, "--batch-sizes", "0"], "--batch-sizes must be in [1,"),
    ("bench-batch-sizes-huge", [*BK, "--batch-sizes", "10000000"], "--batch-sizes must be in [1,"),
    ("bench-batch-sizes-text", [*BK, "--batch-sizes", "x"], "invalid int value"),
    ("bench-methods-unknown", [*BK, "--methods", "beam"], "unknown method 'beam'"),
    ("bench-methods-twice", [*BK, "--methods", "cfg", "cfg"], "lists a method twice"),
    ("bench-input-len-0", [*BK, "--input-len", "0"], "--input-len must be in [1,"),
    ("bench-input-len-huge", [*BK, "--input-len", "10000000"], "--input-len must be in [1,"),
    ("bench-output-len-0", [*BK, "--output-len", "0"], "--output-len must be in [1,"),
    ("bench-warmup-neg", [*BK, "--warmup", "-1"], "--warmup must be in [0,"),
    ("bench-warmup-huge", [*BK, "--warmup", "10000000"], "--warmup must be in [0,"),
    ("bench-repeats-0", [*BK, "--repeats", "0"], "--repeats must be in [1,"),
    ("bench-repeats-huge", [*BK, "--repeats", "10000000"], "--repeats must be in [1,"),
    ("bench-group-size-1", [*BK, "--group-size", "1"], "--group-size must be in [2,"),
    ("bench-group-size-huge", [*BK, "--group-size", "100000"], "--group-size must be in [2,"),
    ("bench-g-low", [*BK, "--g", "0.5"], "--g must be in [1, 100]"),
    ("bench-g-nan", [*BK, "--g", "nan"], "--g must be a finite number"),
    ("bench-per-label-0", ["bench", "synth", "--per-label", "0"], "--per-label must be in [1,"),
    ("bench-threads-0", [*BK, "--threads", "0"], "--threads must be in [1,"),
    ("bench-threads-huge", [*BK, "--threads", "100000"], "--threads must be in [1,"),
    ("bench-task-missing", ["bench", "synth", "--task", "{d}/none.yaml"], "does not exist"),
    ("bench-task-bomb", ["bench", "synth", "--task", "{d}/bomb.yaml"], "expands to more than"),
    ("bench-model-missing", ["bench", "decode", "--model", "{d}/no/such/model"], "does not exist"),
    ("bench-model-empty-dir", ["bench", "decode", "--model", "{d}/nomodel"], "no config.json"),
    ("bench-kind", ["bench", "kernels"], "invalid choice"),
    ("bench-corrsynth-batch-1", ["bench", "decode", "--batch-sizes", "1"], "corrsynth contrasts at least 2 rows"),
    ("bench-min-p-high", ["bench", "decode", "--min-p", "1.5"], "--min-p must be in [0, 1]"),
    ("bench-min-p-nan", ["bench", "decode", "--min-p", "nan"], "--min-p must be a finite number"),
    ("bench-dtype-bogus", ["bench", "decode", "--dtype", "int8"], "--dtype 'int8' is not a dtype"),
    # ---- spa partition (issue 22: --out DIR overwrote DIR/scores.jsonl, its own input) ---------------
    ("spa-partition-data-in-out", ["spa", "partition", "--data", "{d}/pd/scores.jsonl", "--queries",
                                   "{d}/queries.jsonl", "--method", "lexical", "--out", "{d}/pd"],
     "would overwrite its own input"),                                                           # issue 22
    ("spa-partition-queries-in-out", ["spa", "partition", "--data", "{d}/pairs.jsonl", "--queries",
                                      "{d}/pd/scores.jsonl", "--method", "lexical", "--out", "{d}/pd"],
     "would overwrite its own input"),
    ("spa-partition-foreign-scores", [*PART, "--method", "lexical", "--out", "{d}/pd_foreign"],
     "that spa partition did not write"),
    ("spa-partition-foreign-partitions", [*PART, "--method", "random", "--out", "{d}/pd_badpart"],
     "is a JSON list, not an object"),
    ("spa-partition-method", [*PART, "--method", "magic", "--out", "{d}/p_new"], "invalid choice"),
    ("spa-partition-influence-kind", [*PL, "--influence", "exact"], "invalid choice"),
    ("spa-partition-balance-nan", [*PL, "--balance", "nan"], "--balance must be a finite number"),
    ("spa-partition-seed-huge", [*PL, "--seed", str(2 ** 70)], "--seed must be in"),
    ("spa-partition-adapter-missing", [*PART, "--method", "influence", "--adapter", "{d}/none", "--out", "{d}/p_new"],
     "is not a directory"),
    ("spa-partition-lissa-depth-0", [*PL, "--lissa-depth", "0"], "--lissa-depth (depth) must be in"),
    ("spa-partition-lissa-repeats-0", [*PL, "--lissa-repeats", "0"], "--lissa-repeats (repeats) must be in"),
    ("spa-partition-lissa-batch-0", [*PL, "--lissa-batch", "0"], "--lissa-batch (batch_size) must be in"),
    ("spa-partition-lissa-damping-neg", [*PL, "--lissa-damping", "-1"], "--lissa-damping (damping) must be in"),
    ("spa-partition-lissa-scale-text", [*PL, "--lissa-scale", "big"], "--lissa-scale must be a number or 'auto'"),
    ("spa-partition-lissa-scale-neg", [*PL, "--lissa-scale", "-1"], "--lissa-scale (scale) must be"),
    ("spa-partition-query-tokens-0", [*PL, "--query-max-new-tokens", "0"], "--query-max-new-tokens must be in"),
    ("spa-partition-rank-0", [*PL, "--rank", "0"], "--rank (rank) must be in"),
    ("spa-partition-lora-alpha-0", [*PL, "--lora-alpha", "0"], "--lora-alpha (lora_alpha) must be in"),
    ("spa-partition-targets-empty", [*PL, "--target-modules", ","], "--target-modules is empty"),
    ("spa-partition-lr-inf", [*PL, "--lr", "inf"], "--lr (lr) must be a finite number"),
    ("spa-partition-steps-0", [*PL, "--steps", "0"], "--steps (steps) must be in"),
    ("spa-partition-batch-size-0", [*PL, "--batch-size", "0"], "--batch-size (batch_size) must be in"),
    ("spa-partition-train-seed-huge", [*PL, "--train-seed", str(2 ** 70)], "--train-seed (seed) must be in"),
    ("spa-partition-dropout-1", [*PL, "--dropout", "1"], "--dropout (dropout) must be in [0, 1)"),
    ("spa-partition-max-length-1", [*PL, "--max-length", "1"], "--max-length (max_length) must be in"),
    ("spa-partition-model-missing", [*PL, "--model", "{d}/no/such/model"], "does not exist"),
    ("spa-partition-device", [*PL, "--device", "mps"], "--device mps is not supported"),
    ("spa-partition-quiet-bad", [*PL, "--quiet", "--balance", "-1"], "--balance"),
    ("spa-partition-data-bad-line", ["spa", "partition", "--data", "{d}/gen.jsonl", "--queries", "{d}/queries.jsonl",
                                     "--method", "lexical", "--out", "{d}/p_new"], "line 2"),
    ("spa-partition-queries-missing", ["spa", "partition", "--data", "{d}/pairs.jsonl", "--queries", "{d}/none.jsonl",
                                       "--method", "lexical", "--out", "{d}/p_new"], "does not exist"),
    ("spa-partition-too-few", ["spa", "partition", "--data", "{d}/pairs.jsonl", "--queries", "{d}/prompts3.jsonl",
                               "--method", "lexical", "--out", "{d}/p_new"], "cannot fill"),
    # ---- spa adapt --------------------------------------------------------------------------------
    ("spa-adapt-partitions-list", ["spa", "adapt", "--partitions", "{d}/parts_list.json", "--out", "{d}/a_new"],
     "is a JSON list, not an object"),
    ("spa-adapt-partitions-range", ["spa", "adapt", "--partitions", "{d}/parts_range.json", "--out", "{d}/a_new"],
     "out of range"),
    ("spa-adapt-partitions-bad-json", ["spa", "adapt", "--partitions", "{d}/parts_bad.json", "--out", "{d}/a_new"],
     "is not valid JSON"),
    ("spa-adapt-partitions-missing", ["spa", "adapt", "--partitions", "{d}/none.json", "--out", "{d}/a_new"],
     "does not exist"),
    ("spa-adapt-nothing", ["spa", "adapt", "--out", "{d}/a_new"], "give --partitions"),
    ("spa-adapt-data-in-out", ["spa", "adapt", "--data", "{d}/good/a0/adapter_config.json", "--out", "{d}/good"],
     "would overwrite its own input"),
    ("spa-adapt-partitions-in-out", ["spa", "adapt", "--partitions", "{d}/bad_manifest/adapters.json", "--out",
                                     "{d}/bad_manifest"], "would overwrite its own input"),
    ("spa-adapt-out-file", [*ADAPT[:-1], "{d}/existing_file"], "is an existing file"),
    ("spa-adapt-checkpoint-0", [*ADAPT, "--checkpoint-every", "0"], "--checkpoint-every (checkpoint_every) must be"),
    ("spa-adapt-lr-0", [*ADAPT, "--lr", "0"], "--lr (lr) must be in"),
    ("spa-adapt-steps-huge", [*ADAPT, "--steps", str(10 ** 12)], "--steps (steps) must be in"),
    ("spa-adapt-batch-size-0", [*ADAPT, "--batch-size", "0"], "--batch-size (batch_size) must be in"),
    ("spa-adapt-train-seed-huge", [*ADAPT, "--train-seed", str(2 ** 70)], "--train-seed (seed) must be in"),
    ("spa-adapt-dropout-neg", [*ADAPT, "--dropout", "-0.5"], "--dropout (dropout) must be in"),
    ("spa-adapt-max-length-0", [*ADAPT, "--max-length", "0"], "--max-length (max_length) must be in"),
    ("spa-adapt-targets-empty", [*ADAPT, "--target-modules", ""], "--target-modules is empty"),
    ("spa-adapt-model-missing", [*ADAPT, "--model", "{d}/no/such/model"], "does not exist"),
    ("spa-adapt-quiet-bad", [*ADAPT, "--quiet", "--rank", "-1"], "--rank (rank) must be in"),
    # ---- spa sample (issue 22: a corrupt safetensors header was "out of memory") -------------------
    ("spa-sample-safetensors-header-huge", [*SAMPLE[:3], "{d}/st_header_huge", *SAMPLE[4:]],
     "declares a"),                                                                              # issue 22
    ("spa-sample-safetensors-header-json", [*SAMPLE[:3], "{d}/st_header_json", *SAMPLE[4:]], "is not valid JSON"),
    ("spa-sample-safetensors-short", [*SAMPLE[:3], "{d}/st_short", *SAMPLE[4:]], "too short for a safetensors header"),
    ("spa-sample-safetensors-truncated", [*SAMPLE[:3], "{d}/st_truncated", *SAMPLE[4:]], "has a bad entry"),
    ("spa-sample-safetensors-header-list", [*SAMPLE[:3], "{d}/st_header_list", *SAMPLE[4:]], "not an object"),
    ("spa-sample-prompts-per-batch-0", [*SAMPLE, "--prompts-per-batch", "0"], "--prompts-per-batch must be in"),
    ("spa-sample-max-new-0", [*SAMPLE, "--max-new-tokens", "0"], "--max-new-tokens must be in"),
    ("spa-sample-max-tokens-alias", [*SAMPLE, "--max-tokens", "100000"], "--max-new-tokens must be in"),
    ("spa-sample-top-p-0", [*SAMPLE, "--top-p", "0"], "--top-p must be in (0, 1]"),
    ("spa-sample-copies-0", [*SAMPLE, "--copies", "0"], "--copies must be in"),
    ("spa-sample-seed-huge", [*SAMPLE, "--seed", str(2 ** 70)], "--seed must be in"),
    ("spa-sample-no-kl-bad", [*SAMPLE, "--no-kl", "--temperature", "-1"], "--temperature must be in"),
    ("spa-sample-quiet-bad", [*SAMPLE, "--quiet", "--top-p", "2"], "--top-p must be in"),
    ("spa-sample-model-missing", [*SAMPLE, "--model", "{d}/no/such/model"], "does not exist"),
    ("spa-sample-prompts-missing", [*SAMPLE[:5], "{d}/none.jsonl"], "does not exist"),
    ("spa-sample-adapters-missing", [*SAMPLE[:3], "{d}/none", *SAMPLE[4:]], "is not a LoRA adapter directory"),
    # ---- spa run (issue 22: --lr inf was refused only after the synth stage) ----------------------
    ("spa-run-lr-inf", [*RUN, "--lr", "inf"], "--lr must be a finite number"),                  # issue 22
    ("spa-run-lr-0", [*RUN, "--lr", "0"], "--lr must be in (0, 10]"),
    ("spa-run-lora-alpha-nan", [*RUN, "--lora-alpha", "nan"], "--lora-alpha must be a finite number"),
    ("spa-run-per-label-0", [*RUN, "--per-label", "0"], "--per-label must be in [1,"),
    ("spa-run-synth-max-new-0", [*RUN, "--synth-max-new-tokens", "0"], "--synth-max-new-tokens must be in"),
    ("spa-run-k-huge", [*RUN, "--k", "100000"], "--k must be in [2, 4096]"),
    ("spa-run-heldout-0", [*RUN, "--heldout-per-label", "0"], "--heldout-per-label must be in"),
    ("spa-run-temperatures-text", [*RUN, "--temperatures", "0,warm"], "--temperatures must be comma-separated"),
    ("spa-run-temperatures-inf", [*RUN, "--temperatures", "0,inf"], "--temperatures must be a finite number"),
    ("spa-run-temperatures-no-0", [*RUN, "--temperatures", "0.7"], "--temperatures must include 0"),
    ("spa-run-max-new-0", [*RUN, "--max-new-tokens", "0"], "--max-new-tokens must be in"),
    ("spa-run-rank-0", [*RUN, "--rank", "0"], "--rank must be in"),
    ("spa-run-lora-top-layers-neg", [*RUN, "--lora-top-layers", "-1"], "--lora-top-layers must be in [0,"),
    ("spa-run-steps-0", [*RUN, "--steps", "0"], "--steps must be in"),
    ("spa-run-whole-steps-0", [*RUN, "--whole-steps", "0"], "--whole-steps must be in"),
    ("spa-run-batch-size-0", [*RUN, "--batch-size", "0"], "--batch-size must be in"),
    ("spa-run-max-length-1", [*RUN, "--max-length", "1"], "--max-length must be in"),
    ("spa-run-lissa-depth-0", [*RUN, "--lissa-depth", "0"], "--lissa-depth must be in"),
    ("spa-run-grad-batch-0", [*RUN, "--grad-batch", "0"], "--grad-batch must be in"),
    ("spa-run-seed-huge", [*RUN, "--seed", str(2 ** 70)], "--seed must be in"),
    ("spa-run-synth-method", [*RUN, "--synth-method", "beam"], "is not a method"),
    ("spa-run-methods", [*RUN, "--methods", "magic"], "--methods must be a comma-separated subset"),
    ("spa-run-few-shot-missing", [*RUN, "--few-shot", "{d}/none.csv"], "--few-shot"),
    ("spa-run-real-missing", [*RUN, "--real", "{d}/none.csv"], "--real"),
    ("spa-run-synth-missing", [*RUN, "--synth", "{d}/none.jsonl"], "--synth"),
    ("spa-run-quiet-bad", [*RUN, "--quiet", "--steps", "-1"], "--steps must be in"),
    ("spa-run-task-bomb", ["spa", "run", "{d}/bomb.yaml", "--out", "{d}/run_new"], "expands to more than"),
    # ---- serve: every check runs before vLLM starts (and without it installed) --------------------
    ("serve-port-0", ["serve", "--port", "0"], "--port must be in [1, 65535], got 0"),
    ("serve-port-huge", ["serve", "--dry-run", "--port", "70000"], "--port must be in [1, 65535]"),
    ("serve-host-empty", ["serve", "--host", ""], "--host '' is not an address"),
    ("serve-host-space", ["serve", "--host", "0.0.0.0 8000"], "is not an address"),
    ("serve-vllm-args-unquoted", ["serve", "--vllm-args", "--dtype 'float32"], "is not a valid flag string"),
    ("serve-vllm-args-port", ["serve", "--vllm-args", "--port 9"], "--port is set by divgen serve"),
    ("serve-vllm-args-processors", ["serve", "--vllm-args=--logits-processors=x.y:Z"],
     "--logits-processors is set by divgen serve"),
    ("serve-vllm-args-scheduler", ["serve", "--vllm-args", "--scheduler-cls x.Y"], "--scheduler-cls is set by"),
    ("serve-model-missing", ["serve", "{d}/no_model_here"], "does not exist"),
    ("serve-python-missing", ["serve", "--python", "{d}/no_venv/bin/python"], "is not an executable file"),
    ("serve-python-not-executable", ["serve", "--python", "{d}/notes.txt"], "is not an executable file"),
    ("serve-model-not-a-model", ["serve", "{d}/nomodel", "--dry-run", "--python", sys.executable],
     "is not a model directory"),
]
# Rows answered after torch is imported (whether a CUDA device exists needs torch), still before
# any model or slow work.
TORCH_ROWS = [
    ("bench-device-cuda-absent", [*BK, "--device", "cuda:7"], "CUDA GPU"),                         # issue 22
    ("gen-device-cuda-absent", [*G, "--device", "cuda:7"], "CUDA GPU"),
]

SLOW_ROWS = [
    # a model that fails to load after the output was opened: no empty --out, no sidecar (issue 8.7)
    ("synth-broken-model-no-empty-out", [*S, "--model", "{d}/brokenmodel"], "could not load"),
]


def _files(d: Path) -> dict[str, bytes | None]:
    """Every path under ``d``: a file's bytes, None for a folder or link (a new empty folder counts)."""
    return {str(p.relative_to(d)): p.read_bytes() if p.is_file() and not p.is_symlink() else None
            for p in sorted(d.rglob("*"))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    build_inputs(d)
    return d


def _run_row(d: Path, argv, needle, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(d / "hub_cache"))
    before = _files(d)
    code = cli_main([a.replace("{d}", str(d)) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("divgen: error: "), err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]
    assert _files(d) == before                  # nothing changed, nothing created


ALL_ROWS = ROWS + ROWS_22


def test_table_size_and_issue_cases():
    assert len(ALL_ROWS) + len(TORCH_ROWS) + len(SLOW_ROWS) >= 300
    ids = [r[0] for r in ALL_ROWS + TORCH_ROWS + SLOW_ROWS]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("argv,needle", [r[1:] for r in ALL_ROWS + TORCH_ROWS], ids=[r[0] for r in ALL_ROWS + TORCH_ROWS])
def test_bad_invocation(inputs, argv, needle, capsys, monkeypatch):
    _run_row(inputs, argv, needle, capsys, monkeypatch)


@pytest.mark.parametrize("argv,needle", [r[1:] for r in SLOW_ROWS], ids=[r[0] for r in SLOW_ROWS])
def test_bad_invocation_after_the_output_is_opened(inputs, argv, needle, capsys, monkeypatch):
    _run_row(inputs, argv, needle, capsys, monkeypatch)


def test_no_row_imports_torch(tmp_path):
    """All rows in one fresh interpreter: every one is refused before torch is imported."""
    build_inputs(tmp_path)
    script = f"""
import contextlib, importlib.util, io, json, sys
spec = importlib.util.spec_from_file_location("test_cli_fuzz", {str(Path(__file__))!r})
fuzz = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fuzz)
ROWS = fuzz.ALL_ROWS
from divgen.bindings.cli import main
codes = []
for _, argv, _ in ROWS:
    with contextlib.redirect_stderr(io.StringIO()):
        codes.append(main([a.replace("{{d}}", {str(tmp_path)!r}) for a in argv]))
print(json.dumps({{"codes": codes, "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}}))
"""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub_cache")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["codes"] == [2] * len(ALL_ROWS)
    assert not got["torch"] and not got["transformers"]


def test_adapter_files_follow_the_umask(tmp_path):
    """Adapter directories and files are ordinary outputs: mode 0777/0666 minus the umask (not 0600)."""
    import torch

    from divgen.engine.spa.lora import LoraAdapter, LoraConfig, save_adapter

    adapter = LoraAdapter("a", LoraConfig(r=1, lora_alpha=2.0, target_modules=["q_proj"]),
                          {"model.layers.0.self_attn.q_proj": (torch.zeros(1, 4), torch.zeros(4, 1))})
    old = os.umask(0o022)
    try:
        out = save_adapter(adapter, tmp_path / "ad")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        "adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}


@pytest.mark.parametrize("value", [101.0, float("inf"), -1.0])
def test_python_api_task_file_and_cli_share_the_temperature_limits(value, capsys):
    """One validation layer: the same range and wording wherever a temperature enters."""
    from divgen.engine.errors import DivgenError
    from divgen.engine.sampling import SamplingParams
    from divgen.engine.synth import task_from_dict

    messages = []
    for enter in (lambda: SamplingParams.make(2, temperature=value),
                  lambda: task_from_dict({**TASK, "sampling": {"temperature": value}})):
        with pytest.raises(DivgenError) as err:
            enter()
        messages.append(str(err.value))
    assert cli_main(["generate", "hi", "--temperature", str(value)]) == 2
    messages.append(capsys.readouterr().err)
    tail = "in [0, 100] (0 is greedy), got"
    assert all(tail in m for m in messages), messages


def _commands():
    """(command words, option strings) of every divgen command, from the parser itself."""
    import argparse

    from divgen.bindings.cli import build_parser

    out = []

    def walk(parser, words):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for a in subs:
            for name, sub in a.choices.items():
                walk(sub, words + [name])
        if not subs:
            out.append((words, [o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")]))

    walk(build_parser(), [])
    return out


def test_every_command_and_flag_has_a_row():
    """The table grows with the CLI: a new command or flag without a bad-invocation row fails here."""
    rows = [argv for _, argv, _ in ALL_ROWS + TORCH_ROWS + SLOW_ROWS]
    missing = []
    for words, options in _commands():
        mine = [argv for argv in rows if argv[:len(words)] == words]
        if not mine:
            missing.append(" ".join(words))
        missing += [f"{' '.join(words)} {o}" for o in options if not any(o in argv for argv in mine)]
    assert not missing, missing
