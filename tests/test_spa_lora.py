"""PEFT-format adapters and the multi-LoRA wrapper, against PEFT itself as the reference.

* what we save loads in ``PeftModel.from_pretrained`` with PEFT's own tensor names and config;
* what PEFT saves loads in ``load_adapter`` with the same weights;
* a batch whose rows use different adapters (or none) through ``MultiLora`` gives, row by row,
  the logits of PEFT with that row's adapter (unmerged, and merged into the weights);
* adapters that do not fit the model raise DivgenError naming the problem.
"""
import json

import pytest

from conftest import single_thread
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from divgen.engine.errors import DivgenError
from divgen.engine.spa.lora import (BASE, LoraAdapter, LoraConfig, base_probe, load_adapter, merge_into,
                                    save_adapter)
from divgen.engine.spa.multilora import MultiLora

peft = pytest.importorskip("peft")

VOCAB = 97
ATOL = 2e-5
BATCH_SIZES = (1, 3, 7)
# adapter-popularity scenarios (Punica's habit): which adapter slot each row uses, as a function of (row, L)
SCENARIOS = {
    "distinct": lambda i, n: i % n,
    "identical": lambda i, n: 0,
    "skewed": lambda i, n: 0 if i % 3 else (i // 3) % n,
    "with_base": lambda i, n: -1 if i % 2 else (i // 2) % n,
    "all_base": lambda i, n: -1,
}


one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def tiny_config(hidden=32, layers=2, **kw):
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **kw)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("base")
    LlamaForCausalLM(tiny_config()).save_pretrained(d)
    return d


def load_base(base_dir):
    return LlamaForCausalLM.from_pretrained(base_dir).eval()


def random_adapter(model, name, r, targets, seed, alpha=None, **cfg_kw):
    """An adapter with random A and B (B non-zero, unlike a fresh init) for every targeted layer."""
    config = LoraConfig(r=r, lora_alpha=float(alpha or 2 * r + 1), target_modules=targets, **cfg_kw)
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for path, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and path != "lm_head" and config.targets(path):
            rank = config.rank_for(path)
            weights[path] = (torch.randn(rank, m.in_features, generator=gen) * 0.2,
                             torch.randn(m.out_features, rank, generator=gen) * 0.2)
    return LoraAdapter(name, config, weights, base_probe(model))


@pytest.fixture(scope="module")
def adapter_dirs(base_dir, tmp_path_factory):
    """Three adapters saved by divgen: different ranks, targets, rslora and a rank_pattern."""
    model = load_base(base_dir)
    root = tmp_path_factory.mktemp("adapters")
    specs = [
        ("alpha", 4, ["q_proj", "v_proj"], {}),
        ("beta", 2, ["q_proj", "o_proj", "down_proj", "gate_proj"], {"use_rslora": True}),
        ("gamma", 3, ["k_proj", "up_proj"], {"rank_pattern": {"up_proj": 5}, "alpha_pattern": {"k_proj": 1.5}}),
    ]
    paths = []
    for i, (name, r, targets, kw) in enumerate(specs):
        paths.append(save_adapter(random_adapter(model, name, r, targets, seed=10 + i, **kw), root / name))
    return paths


def peft_logits(base_dir, adapter_dir, ids, merged: bool):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base_dir), str(adapter_dir)).eval()
    if merged:
        model = model.merge_and_unload()
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------
# File format
# ---------------------------------------------------------------------------------------------

def test_saved_files_have_peft_names_and_config(base_dir, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = get_peft_model(load_base(base_dir), PeftLoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                    task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "by_peft")
    ours = save_adapter(random_adapter(load_base(base_dir), "x", 4, targets, seed=1, alpha=8), tmp_path / "ours")

    def keys(d):
        with safe_open(str(d / "adapter_model.safetensors"), framework="pt") as f:
            return sorted(f.keys())

    assert keys(ours) == keys(tmp_path / "by_peft")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys(ours)
    ours_cfg = json.loads((ours / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "by_peft" / "adapter_config.json").read_text())
    for field in ("peft_type", "task_type", "r", "lora_alpha", "bias", "use_rslora", "use_dora", "fan_in_fan_out"):
        assert ours_cfg[field] == peft_cfg[field], field
    assert sorted(ours_cfg["target_modules"]) == sorted(peft_cfg["target_modules"])


def test_peft_saved_adapter_loads_with_same_weights(base_dir, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(3)
    peft_model = get_peft_model(load_base(base_dir), PeftLoraConfig(
        r=3, lora_alpha=5, target_modules=["q_proj", "up_proj"], task_type="CAUSAL_LM", init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "p")
    adapter = load_adapter(tmp_path / "p", model=load_base(base_dir))
    layer = peft_model.base_model.model.model.layers[1].mlp.up_proj
    a, b = adapter.weights["model.layers.1.mlp.up_proj"]
    torch.testing.assert_close(a, layer.lora_A["default"].weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(b, layer.lora_B["default"].weight.detach(), rtol=0, atol=0)
    assert adapter.scale_for("model.layers.1.mlp.up_proj") == pytest.approx(5 / 3)


# ---------------------------------------------------------------------------------------------
# Multi-LoRA forward == PEFT, row by row
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_multilora_rows_match_peft_each_alone(base_dir, adapter_dirs, scenario, batch):
    model = load_base(base_dir)
    adapters = [load_adapter(p, model=model) for p in adapter_dirs]
    slots = [SCENARIOS[scenario](i, len(adapters)) for i in range(batch)]
    ids = torch.randint(0, VOCAB, (batch, 6), generator=torch.Generator().manual_seed(batch))
    with MultiLora(model, adapters) as ml, torch.no_grad():
        ml.set_row_adapters(slots)
        got = model(input_ids=ids).logits
    reference = {}
    for i, slot in enumerate(slots):
        if slot not in reference:
            if slot < 0:
                with torch.no_grad():
                    reference[slot] = load_base(base_dir)(input_ids=ids).logits
            else:
                reference[slot] = peft_logits(base_dir, adapter_dirs[slot], ids, merged=(i % 2 == 0))
        torch.testing.assert_close(got[i], reference[slot][i], rtol=0, atol=ATOL)


def test_multilora_changes_outputs_and_removes_cleanly(base_dir, adapter_dirs):
    model = load_base(base_dir)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with MultiLora(model, [load_adapter(adapter_dirs[0])]) as ml:
            ml.set_row_adapters(["alpha", BASE])
            during = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert (during[0] - before[0]).abs().max() > 1e-3          # the adapter does something
    torch.testing.assert_close(during[1], before[1], rtol=0, atol=0)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert all(type(m).__name__ != "MultiLoraLinear" for m in model.modules())


def test_merge_into_matches_peft_merge(base_dir, adapter_dirs):
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))
    model = load_base(base_dir)
    merge_into(model, load_adapter(adapter_dirs[1]))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours, peft_logits(base_dir, adapter_dirs[1], ids, merged=True), rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# Adapters that do not fit
# ---------------------------------------------------------------------------------------------

def _rewrite_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_adapter_of_other_base_model_is_refused(adapter_dirs):
    torch.manual_seed(123)
    other = LlamaForCausalLM(tiny_config()).eval()        # same shapes, other weights
    with pytest.raises(DivgenError, match="different base model"):
        load_adapter(adapter_dirs[0], model=other)


def test_adapter_with_other_shapes_is_refused(adapter_dirs):
    wider = LlamaForCausalLM(tiny_config(hidden=48)).eval()
    adapter = load_adapter(adapter_dirs[0])
    adapter.base_probe = None                              # shapes alone must catch it
    with pytest.raises(DivgenError, match="trained on another base model"):
        MultiLora(wider, [adapter])


def test_adapter_deeper_than_model_is_refused(base_dir, adapter_dirs):
    shallow = LlamaForCausalLM(tiny_config(layers=1)).eval()
    adapter = load_adapter(adapter_dirs[0])
    adapter.base_probe = None
    with pytest.raises(DivgenError, match="does not have"):
        MultiLora(shallow, [adapter])


def test_rank_mismatch_between_config_and_weights(adapter_dirs, tmp_path):
    bad = _rewrite_config(adapter_dirs[0], tmp_path / "bad", r=6)
    with pytest.raises(DivgenError, match="rank 4 but the config says r = 6"):
        load_adapter(bad)


def test_target_module_not_in_model(base_dir, adapter_dirs, tmp_path):
    bad = _rewrite_config(adapter_dirs[0], tmp_path / "bad", target_modules=["q_proj", "v_proj", "c_attn"])
    with pytest.raises(DivgenError, match="'c_attn' is not a linear layer"):
        load_adapter(bad, model=load_base(base_dir))


def test_weights_outside_target_modules(adapter_dirs, tmp_path):
    bad = _rewrite_config(adapter_dirs[0], tmp_path / "bad", target_modules=["q_proj"])
    with pytest.raises(DivgenError, match="not in target_modules"):
        load_adapter(bad)


@pytest.mark.parametrize("change,message", [
    ({"use_dora": True}, "DoRA"),
    ({"peft_type": "PREFIX_TUNING"}, "not LoRA"),
    ({"bias": "all"}, "biases"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_unsupported_features(adapter_dirs, tmp_path, change, message):
    bad = _rewrite_config(adapter_dirs[0], tmp_path / "bad", **change)
    with pytest.raises(DivgenError, match=message):
        load_adapter(bad)


def test_missing_files(tmp_path, adapter_dirs):
    with pytest.raises(DivgenError, match="not a directory"):
        load_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DivgenError, match="no adapter_config.json"):
        load_adapter(tmp_path / "empty")


def test_slot_errors(base_dir, adapter_dirs):
    model = load_base(base_dir)
    with MultiLora(model, [load_adapter(adapter_dirs[0])]) as ml:
        with pytest.raises(DivgenError, match="unknown adapter"):
            ml.set_row_adapters(["nope"])
        ml.set_row_adapters(["alpha", "alpha"])
        with pytest.raises(RuntimeError, match="3 rows"):
            model(input_ids=torch.zeros(3, 2, dtype=torch.int64))
