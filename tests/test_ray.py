"""`divgen synth --ray`: shards of whole groups (engine/synth/shards.py) and their Ray actors
(engine/synth/ray_shards.py).

Without Ray (the default suite): the shard plan partitions the job, shard outputs merged equal the
single-process output byte for byte, and the errors for a missing Ray, an unreachable address and
mismatched shard folders. With Ray installed (`make test-ray`, a local cluster of 2 CPUs): the
same identity through actors, and a worker killed mid-shard is replaced by one that resumes it."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from divgen.bindings.cli import main
from divgen.engine.errors import DivgenError
from divgen.engine.synth import load_task, run_synth
from divgen.engine.synth import ray_shards
from divgen.engine.synth.plan import plan
from divgen.engine.synth.shards import ShardPlan, merge_shards, shard_dir, shard_path

@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # the actors run 1 thread: the same float sums, the same texts
    yield
    torch.set_num_threads(threads)


def tiny(method="corrsynth", per_label=4, max_new_tokens=4):
    return load_task("sentiment").with_overrides(method=method, per_label=per_label, max_new_tokens=max_new_tokens)


@pytest.mark.parametrize("method,per_label,count", [("corrsynth", 5, 2), ("cfg", 3, 3), ("m-corrsynth", 7, 4),
                                                    ("fewgen", 1, 3)])
def test_shards_partition_the_plan(method, per_label, count):
    full = plan(tiny(method, per_label))
    kept = {(s.group, s.slot) for g in full for s in g if s.keep}
    parts = [ShardPlan(full, i, count) for i in range(count)]
    seen = [{(s.group, s.slot) for g in p for s in g if s.keep} for p in parts]
    assert set().union(*seen) == kept
    assert sum(len(x) for x in seen) == len(kept)                       # disjoint
    assert [p.kept_total for p in parts] == [len(x) for x in seen]
    for i, p in enumerate(parts):
        assert all(g[0].group % count == i for g in p)
        assert all(p.is_kept(*k) == (k in seen[i]) for k in kept)


def test_shard_index_is_checked():
    with pytest.raises(DivgenError, match="shard 2 of 2"):
        ShardPlan(plan(tiny()), 2, 2)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["corrsynth", "cfg"])
def test_merged_shards_equal_the_single_process_output(tmp_path, embedded_lm, method):
    task = tiny(method, per_label=3)
    single = tmp_path / "single.jsonl"
    run_synth(task, single, lm=embedded_lm, batch_rows=64, progress=False, log=lambda m: None)
    out = tmp_path / "sharded.jsonl"
    shard_dir(out).mkdir()
    for i in range(3):                     # shards in any order, each with another batch layout
        run_synth(task, shard_path(out, 2 - i, 3), lm=embedded_lm, batch_rows=2 + i, progress=False,
                  log=lambda m: None, shard=(2 - i, 3))
    fp = run_synth(task, single, lm=embedded_lm, progress=False, log=lambda m: None).fingerprint
    assert merge_shards(out, 3, fp) == 6
    assert out.read_bytes() == single.read_bytes()


def test_missing_ray_names_the_extra_and_touches_nothing(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "ray" else real(n, *a))
    out = tmp_path / "o.jsonl"
    assert main(["synth", "sentiment", "--out", str(out), "--per-label", "1", "--ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'divgen[ray]'" in err[0]
    assert list(tmp_path.iterdir()) == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("form", ["{port}", "ray://{port}"])
def test_unreachable_address_fails_fast_with_the_fix(tmp_path, capsys, monkeypatch, form):
    monkeypatch.setattr(ray_shards, "check_ray_available", lambda: None)   # whether or not Ray is installed
    address = form.format(port=f"127.0.0.1:{_closed_port()}")
    out = tmp_path / "o.jsonl"
    t0 = time.monotonic()
    assert main(["synth", "sentiment", "--out", str(out), "--per-label", "1", "--ray", address]) == 2
    assert time.monotonic() - t0 < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot reach a Ray cluster at {address}" in err[0] and "ray start --head" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("address", ["nohost", "host:port", ":80"])
def test_malformed_address(address):
    with pytest.raises(DivgenError, match="HOST:PORT"):
        ray_shards.parse_address(address)


def test_shards_of_another_worker_count_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ray_shards, "check_ray_available", lambda: None)
    out = tmp_path / "o.jsonl"
    shard_dir(out).mkdir()
    shard_path(out, 0, 3).write_text("")
    with pytest.raises(DivgenError, match="--ray-workers 3"):
        ray_shards.run_synth_ray(tiny(), out, workers=2, log=lambda m: None)


def test_a_single_process_output_is_not_taken_over(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"text": "x", "label": "positive", "group": 0, "slot": 0}\n')
    with pytest.raises(DivgenError, match="finish it without --ray"):
        ray_shards.run_synth_ray(tiny(), out, workers=2, log=lambda m: None)
    assert out.read_text() == '{"text": "x", "label": "positive", "group": 0, "slot": 0}\n'


# ----------------------------------------------------------------------------------------------
# With Ray: a local cluster of 2 CPUs (make test-ray)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    if os.environ.get("DIVGEN_TEST_RAY") != "1":
        pytest.skip("Ray cluster tests (~3 min on 2 CPUs) run with `make test-ray`")
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_output_is_the_single_process_output(ray_cluster, tmp_path, embedded_lm):
    task = tiny("corrsynth", per_label=4)
    single = tmp_path / "single.jsonl"
    run_synth(task, single, lm=embedded_lm, progress=False, log=lambda m: None)
    out = tmp_path / "ray.jsonl"
    report = ray_shards.run_synth_ray(task, out, workers=2, batch_rows=2, progress=False, log=lambda m: None)
    assert out.read_bytes() == single.read_bytes()
    assert report.attempts == {0: 1, 1: 1} and report.written == 8
    assert not shard_dir(out).exists()
    # run again: complete, nothing to do, the file untouched
    again = ray_shards.run_synth_ray(task, out, workers=2, progress=False, log=lambda m: None)
    assert again.new_records == 0 and out.read_bytes() == single.read_bytes()


@pytest.mark.slow
def test_killed_worker_is_replaced_and_its_shard_resumed(ray_cluster, tmp_path, embedded_lm):
    ray = ray_cluster
    task = tiny("corrsynth", per_label=12, max_new_tokens=6)      # 12 groups: 6 batches per shard
    out = tmp_path / "ray.jsonl"
    killed = {}

    def killer():
        path = shard_path(out.absolute(), 0, 2)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            lines = path.read_bytes().count(b"\n") if path.exists() else 0
            if lines >= 2:                                       # one batch written, more to come
                killed["lines"] = lines
                ray.kill(ray.get_actor("test-kill-0-1"), no_restart=True)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    report = ray_shards.run_synth_ray(task, out, workers=2, batch_rows=2, progress=False, log=lambda m: None,
                                      actor_name_prefix="test-kill")
    thread.join(timeout=5)
    assert killed, "the shard finished before it could be killed"
    assert killed["lines"] < 12                                  # it was killed mid-shard
    assert report.attempts[0] == 2 and report.attempts[1] == 1    # a new actor resumed shard 0
    single = tmp_path / "single.jsonl"
    run_synth(task, single, lm=embedded_lm, progress=False, log=lambda m: None)
    assert out.read_bytes() == single.read_bytes()
