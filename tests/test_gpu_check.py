"""`make gpu-check` on a machine without a GPU: the parts a CPU can check — arguments, the stages'
plumbing on tiny shapes (--smoke), and the results file's schema. The figures themselves come
only from a CUDA machine (benchmarks/results/<device>.json)."""
import copy
import json

import pytest
import torch

from divgen.bench import gpu_check
from divgen.bench.random_model import byte_tokenizer, random_lm, weight_bytes


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--budget", "5"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--stages", "bogus"])
    assert gpu_check.parse_args(["--stages", "env", "decode"]).stages == ["env", "decode"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_cuda_it_says_so_in_one_line():
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_check.main(["--stages", "env"])


@pytest.mark.slow
def test_smoke_run_writes_a_record_of_the_schema(tmp_path):
    out = tmp_path / "gpu.json"
    code = gpu_check.main(["--smoke", "--stages", "env", "graph", "decode", "--out", str(out), "--budget", "300"])
    record = json.loads(out.read_text())
    gpu_check.check_record(record)
    st = record["stages"]
    assert st["env"]["status"] == "ok" and st["env"]["result"]["torch"] == torch.__version__
    assert st["decode"]["status"] == "ok"
    rows = st["decode"]["result"]["rows"]
    assert [r["batch"] for r in rows] == [1, 4] and all(r["engine_eager_tok_s"] > 0 for r in rows)
    for r in rows:      # one profiled call each: the CPU form (ops by self time, no busy share)
        assert set(r["profiles"]) == {"engine_eager", "hf_generate"}
        assert all(p["top_ms"] and p["busy_fraction"] is None for p in r["profiles"].values())
    assert st["graph"]["status"] == ("skipped" if not torch.cuda.is_available() else "ok")
    assert code == (1 if not torch.cuda.is_available() else 0)      # a skipped stage is not a pass
    assert any(line.startswith("decode ") for line in gpu_check.summary_lines(record))


def test_schema_rejects_broken_records():
    good = {"benchmark": "gpu_check", "device": "x", "git_sha": "abc", "torch": "2", "timestamp": "t",
            "budget_s": 10, "stages": {"env": {"status": "ok", "seconds": 1.0, "result": {}}}}
    gpu_check.check_record(good)
    for breaking in (lambda r: r.pop("device"), lambda r: r["stages"].update(bogus={"status": "ok", "seconds": 1}),
                     lambda r: r["stages"]["env"].update(status="fine"), lambda r: r["stages"]["env"].pop("result")):
        bad = copy.deepcopy(good)
        breaking(bad)
        with pytest.raises(ValueError):
            gpu_check.check_record(bad)


def test_byte_tokenizer_round_trips_text_and_decodes_every_id():
    tok = byte_tokenizer(600)
    text = "Grüße, naïve café — 1+1=2"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < 3 + 256
    assert tok.decode([599, 2], skip_special_tokens=True) == "<t599>"
    assert len(tok) == 600 and tok.eos_token_id == 2 and tok.pad_token_id == 0


def test_random_lm_has_the_configs_shape_and_weight_bytes():
    lm = random_lm("tiny", device="cpu", dtype=torch.float32)
    n = sum(p.numel() for p in lm.model.parameters())     # tied: the embedding is counted once
    assert lm.vocab_size == 512 and weight_bytes(lm) == 4 * n
    with pytest.raises(ValueError, match="unknown random config"):
        random_lm("nope", device="cpu", dtype=torch.float32)
