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
    (d / "brokenmodel" / "model.safetensors").write_bytes(b"not a safetensors file")
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
    ("gen-min-p-1", [*G, "--min-p", "1"], "--min-p must be in [0, 1)"),
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
    ("synth-min-p", [*S, "--min-p", "1.5"], "--min-p must be in [0, 1)"),
    ("synth-alpha-renamed", [*S, "--alpha", "0.1"], "--alpha was renamed: --min-p"),
    ("synth-top-k", [*S, "--top-k", "-3"], "--top-k must be"),
    ("synth-max-new-0", [*S, "--max-new-tokens", "0"], "--max-new-tokens must be in"),
    ("synth-method", [*S, "--method", "beam"], "is not a method"),
    ("synth-g-low", [*S, "--g", "0.5"], "--g (guidance scale g) must be in [1, 100]"),
    ("synth-g-nan", [*S, "--g", "nan"], "--g (guidance scale g) must be a finite number"),
    ("synth-gamma-neg", [*S, "--method", "m-corrsynth", "--gamma", "-1"], "--gamma (γ (cross-label weight)) must be"),
    ("synth-rows-per-group", [*S, "--rows-per-group", "1"], "needs at least 2 rows per group"),
    ("synth-batch-rows", [*S, "--batch-rows", "0"], "--batch-rows must be in"),
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
SLOW_ROWS = [
    # a model that fails to load after the output was opened: no empty --out, no sidecar (issue 8.7)
    ("synth-broken-model-no-empty-out", [*S, "--model", "{d}/brokenmodel"], "could not load"),
]


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


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


def test_table_size_and_issue_cases():
    assert len(ROWS) + len(SLOW_ROWS) >= 60
    assert len({r[0] for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("argv,needle", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
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
ROWS = fuzz.ROWS
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
    assert got["codes"] == [2] * len(ROWS)
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
