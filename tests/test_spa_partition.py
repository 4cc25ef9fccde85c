"""Partition scores and assignment: BM25 against hand-worked values, the balancing rule's
guarantees, and LiSSA against an exact inverse-Hessian solve on a model small enough to form H."""
import math

import pytest

from conftest import single_thread
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from divgen.engine.errors import DivgenError
from divgen.engine.spa.finetune import Encoded, TrainableLora, collate, per_example_loss
from divgen.engine.spa.influence import LissaConfig, lissa
from divgen.engine.spa.lora import LoraConfig
from divgen.engine.spa.partition import assign, bm25_scores, normalise, random_scores



one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


# ---------------------------------------------------------------------------------------------
# BM25
# ---------------------------------------------------------------------------------------------


def test_bm25_hand_worked():
    # N = 3 documents of lengths 2, 3, 1 (avg 2); "sat" is in 2 of them: idf = ln(1 + 1.5/2.5) = ln 1.6.
    # d1: tf 1, K = 1.5·(0.25 + 0.75·2/2) = 1.5    -> 1·2.5/(1 + 1.5)      = 1
    # d2: tf 2, K = 1.5·(0.25 + 0.75·3/2) = 2.0625 -> 2·2.5/(2 + 2.0625)   = 1.2307692
    # d3: no "sat" -> 0.  "dog" (df 1, idf ln(1 + 2.5/1.5) = ln(8/3)) only in d2: 1·2.5/(1 + 2.0625)
    scores = bm25_scores(["sat", "Dog, SAT!"], ["cat sat", "dog sat sat", "bird"])
    ln16, ln83 = math.log(1.6), math.log(8 / 3)
    expected = torch.tensor([[ln16, ln16],
                             [ln16 * 1.2307692, ln16 * 1.2307692 + ln83 * 2.5 / 3.0625],
                             [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-9)


def test_bm25_unknown_terms_score_zero():
    assert bm25_scores(["zebra"], ["cat sat", "dog"]).abs().max() == 0


# ---------------------------------------------------------------------------------------------
# Normalisation and balanced assignment
# ---------------------------------------------------------------------------------------------


def test_normalise_standardises_each_query_column():
    raw = torch.tensor([[1.0, 100.0, 5.0], [2.0, 300.0, 5.0], [6.0, 200.0, 5.0]])
    z = normalise(raw)
    torch.testing.assert_close(z[:, :2].mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(z[:, :2].std(0, unbiased=False), torch.ones(2, dtype=torch.float64), atol=1e-12, rtol=0)
    assert z[:, 2].abs().max() == 0                    # a constant column carries no preference


def test_assign_without_balance_is_argmax():
    z = normalise(random_scores(40, 5, seed=1))
    assert assign(z, balance=0.0) == z.argmax(1).tolist()


def test_assign_moves_the_cheapest_examples_to_a_starved_partition():
    # Everyone prefers partition 0. With balance 1, partitions 1 and 2 each need floor(6/3) = 2.
    z = torch.tensor([
        [3.0, 2.9, 0.0],   # costs 0.1 to move to 1
        [3.0, 0.0, 0.0],
        [3.0, 1.0, 2.5],   # costs 0.5 to move to 2
        [3.0, 2.0, 0.0],   # costs 1.0 to move to 1
        [3.0, 0.0, 2.0],   # costs 1.0 to move to 2
        [3.0, 0.5, 0.5],
    ], dtype=torch.float64)
    assert assign(z, balance=1.0) == [1, 0, 2, 1, 2, 0]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("balance", [0.25, 0.5, 1.0])
def test_assign_guarantees(seed, balance):
    gen = torch.Generator().manual_seed(seed)
    n, k = 37, 5
    # skewed preferences: partition 0 is everyone's favourite most of the time
    z = torch.randn(n, k, generator=gen, dtype=torch.float64) + torch.tensor([2.0, 0, 0, 0, -1], dtype=torch.float64)
    parts = assign(z, balance)
    min_size = math.floor(balance * n / k)
    sizes = [parts.count(j) for j in range(k)]
    assert min(sizes) >= min_size
    argmax = z.argmax(1).tolist()
    deficit = sum(max(0, min_size - argmax.count(j)) for j in range(k))
    assert sum(p != a for p, a in zip(parts, argmax)) == deficit     # no more moves than needed


def test_assign_refuses_too_few_examples():
    with pytest.raises(DivgenError, match="cannot fill"):
        assign(torch.zeros(2, 3), 0.5)
    with pytest.raises(DivgenError, match="balance"):
        assign(torch.zeros(4, 2), 1.5)


def test_random_scores_depend_only_on_seed():
    torch.testing.assert_close(random_scores(9, 3, 4), random_scores(9, 3, 4), rtol=0, atol=0)
    assert not torch.equal(random_scores(9, 3, 4), random_scores(9, 3, 5))


# ---------------------------------------------------------------------------------------------
# LiSSA == exact (H + λI)⁻¹ v where H can be formed
# ---------------------------------------------------------------------------------------------

def _tiny_lora_problem():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=31, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=32, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()   # eager: the reference Hessian needs double backward
    lora = TrainableLora(model, LoraConfig(r=1, lora_alpha=2.0, target_modules=["q_proj", "v_proj"]), seed=0)
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.5)                           # away from the B = 0 start
    gen = torch.Generator().manual_seed(1)
    items = [Encoded(torch.randint(0, 31, (n,), generator=gen).tolist(), n_prompt=2) for n in (5, 6, 4, 7)]
    return model, lora, items


def _exact_hessian(model, lora, items):
    """Hessian of the mean response loss w.r.t. the flattened LoRA parameters, by torch.func."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = lora.parameters()
    keys = [names[id(p)] for p in params]
    shapes = [p.shape for p in params]
    batch = collate(items, pad_id=0)

    def loss_of(theta):
        chunks, i = {}, 0
        for key, shape in zip(keys, shapes):
            size = math.prod(shape)
            chunks[key] = theta[i:i + size].view(shape)
            i += size
        logits = torch.func.functional_call(model, chunks, kwargs=dict(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)).logits
        # independent loss: full logits, explicit shift, per example mean over its response tokens
        total = 0.0
        for row, item in enumerate(items):
            width = batch.input_ids.shape[1]
            start = width - len(item.ids) + item.n_prompt            # first response position
            lp = torch.log_softmax(logits[row, start - 1:width - 1], -1)
            tgt = batch.input_ids[row, start:width]
            total = total - lp.gather(1, tgt[:, None]).mean()
        return total / len(items)

    theta0 = torch.cat([p.detach().reshape(-1) for p in params])
    return torch.autograd.functional.hessian(loss_of, theta0), theta0


def test_lissa_matches_exact_inverse_hessian_vector_product():
    model, lora, items = _tiny_lora_problem()
    H, theta0 = _exact_hessian(model, lora, items)
    eig = torch.linalg.eigvalsh(H)
    damping = float(max(0.0, -eig.min()) + 0.5 * eig.abs().max())
    scale = 1.1 * float(eig.max() + damping)
    v = torch.randn(2, theta0.numel(), generator=torch.Generator().manual_seed(2))
    cfg = LissaConfig(depth=80, repeats=1, batch_size=len(items), damping=damping, scale=scale)
    got = lissa(model, lora, items, v, cfg, pad_id=0, device="cpu", progress=False)
    want = torch.linalg.solve(H + damping * torch.eye(H.shape[0]), v.T).T
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_lissa_auto_scale_converges_too():
    model, lora, items = _tiny_lora_problem()
    H, theta0 = _exact_hessian(model, lora, items)
    eig = torch.linalg.eigvalsh(H)
    damping = float(max(0.0, -eig.min()) + 0.5 * eig.abs().max())
    v = torch.randn(1, theta0.numel(), generator=torch.Generator().manual_seed(3))
    cfg = LissaConfig(depth=120, batch_size=len(items), damping=damping, scale="auto", power_iterations=30)
    got = lissa(model, lora, items, v, cfg, pad_id=0, device="cpu", progress=False)
    want = torch.linalg.solve(H + damping * torch.eye(H.shape[0]), v.T).T
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)


def test_lissa_divergence_is_reported():
    model, lora, items = _tiny_lora_problem()
    v = torch.ones(1, lora.num_parameters())
    cfg = LissaConfig(depth=50, batch_size=len(items), damping=0.0, scale=1e-4)   # scale far below λ_max
    with pytest.raises(DivgenError, match="diverged"):
        lissa(model, lora, items, v, cfg, pad_id=0, device="cpu", progress=False)


def test_per_example_loss_matches_unpadded_reference():
    model, lora, items = _tiny_lora_problem()
    with torch.no_grad():
        batched = per_example_loss(model, collate(items, pad_id=0))
        for i, item in enumerate(items):
            ids = torch.tensor([item.ids])
            logits = model(input_ids=ids).logits[0]
            lp = torch.log_softmax(logits[item.n_prompt - 1:-1], -1)
            want = -lp.gather(1, ids[0, item.n_prompt:, None]).mean()
            torch.testing.assert_close(batched[i], want, rtol=1e-5, atol=1e-6)
