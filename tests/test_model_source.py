"""engine/model_source.py: model arguments checked without torch; hub ids from the local HF cache
(never downloaded); generation_config.json defaults; generate's resolution order."""
from __future__ import annotations

import json
from argparse import Namespace

import pytest

from divgen.bindings.cli_generate import DEFAULTS, resolve_sampling
from divgen.engine.errors import DivgenError
from divgen.engine.model_source import find_model, generation_defaults


def _model_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")   # an empty but whole file
    return path


def test_hub_id_resolves_to_the_cached_snapshot(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--acme--tiny-lm"
    _model_dir(repo / "snapshots" / "abc123")
    _model_dir(repo / "snapshots" / "old999")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    src = find_model("acme/tiny-lm")
    assert (src.kind, src.path, src.name) == ("hub", repo / "snapshots" / "abc123", "acme/tiny-lm")
    with pytest.raises(DivgenError, match="not in the local Hugging Face cache"):
        find_model("acme/other-lm")


def test_hub_home_layout_and_local_paths_win(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    _model_dir(tmp_path / "home" / "hub" / "models--acme--lm" / "snapshots" / "only")
    assert find_model("acme/lm").path.name == "only"          # one snapshot, no refs/main
    local = _model_dir(tmp_path / "acme" / "lm")
    monkeypatch.chdir(tmp_path)
    assert find_model("acme/lm").kind == "dir" and find_model("acme/lm").path.resolve() == local.resolve()


def test_generation_config_defaults_and_generate_resolution_order(tmp_path):
    d = _model_dir(tmp_path / "m")
    (d / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 50, "do_sample": True, "eos_token_id": 2}))
    assert generation_defaults(d) == {"temperature": 0.6, "top_p": 0.9, "top_k": 50}
    assert generation_defaults(tmp_path / "none") == {}
    args = Namespace(temperature=None, top_p=0.5, top_k=None, min_p=None, alpha=None, max_new_tokens=None, seed=None)
    got = resolve_sampling(args, d)                           # flag > generation_config > DEFAULTS
    assert got == {**DEFAULTS, "temperature": 0.6, "top_p": 0.5, "top_k": 50}
    (d / "generation_config.json").write_text(json.dumps({"temperature": -3}))
    with pytest.raises(DivgenError, match="generation_config.json"):
        resolve_sampling(args, d)
