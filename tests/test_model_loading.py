"""Model loading from a local HF directory and the errors for paths that are not models."""
import pytest
import torch

from divgen.engine.decode import generate
from divgen.engine.errors import DivgenError
from divgen.engine.model import default_model_file, load_model, resolve_model_dir


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, embedded_lm):
    """A tiny random Llama saved as config + safetensors + the embedded model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=embedded_lm.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, eos_token_id=2, bos_token_id=1, pad_token_id=2)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    embedded_lm.tokenizer.save_pretrained(path)
    return path


def test_local_hf_directory_loads_and_decodes_like_transformers(tiny_model_dir):
    lm = load_model(tiny_model_dir, device="cpu")
    assert lm.context_length == 128 and 2 in lm.eos_token_ids
    ids = lm.encode("Hello there")
    results, _ = generate(lm, [ids], max_new_tokens=6, temperature=0.0, ignore_eos=True)
    out = lm.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, min_new_tokens=6,
                            pad_token_id=2)
    assert results[0].token_ids == out[0, len(ids):].tolist()


def test_prompt_plus_new_tokens_beyond_context_names_the_limit(tiny_model_dir):
    lm = load_model(tiny_model_dir, device="cpu")
    with pytest.raises(DivgenError, match="lower max_new_tokens to at most"):
        generate(lm, ["Hello there"], max_new_tokens=200)


def test_embedded_gguf_is_cached_as_safetensors():
    model_dir, _ = resolve_model_dir(default_model_file())  # a .gguf path: same cache as the default
    assert (model_dir / "config.json").exists() and any(model_dir.glob("*.safetensors"))
    assert resolve_model_dir(None)[0] == model_dir


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "missing", "does not exist"),
    (lambda tmp: (tmp / "weights.bin").write_bytes(b"x") and tmp / "weights.bin", "not a .gguf"),
    (lambda tmp: tmp, "no config.json"),
    (lambda tmp: (tmp / "config.json").write_text("{}") and tmp, "no weights"),
])
def test_paths_that_are_not_models_get_one_clear_error(tmp_path, make, message):
    with pytest.raises(DivgenError, match=message):
        load_model(make(tmp_path), device="cpu")
