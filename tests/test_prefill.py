"""Admission's prefill plan: the prompts' common prefix once, the rest in batches of similar length
(``divgen.engine.decode``), against independent references, and the tokens it leads to."""
import os
import random

import pytest

from divgen.engine.decode import PAD_SHARE, common_prefix_len, prefill_batches


@pytest.mark.parametrize("seed", range(20))
def test_common_prefix_len_equals_os_path_commonprefix(seed):
    rng = random.Random(seed)
    head = [rng.randrange(5) for _ in range(rng.randrange(6))]
    seqs = [head + [rng.randrange(3) for _ in range(rng.randrange(5))] for _ in range(rng.randrange(1, 6))]
    assert common_prefix_len(seqs) == len(os.path.commonprefix(seqs))


@pytest.mark.parametrize("seed", range(20))
def test_prefill_batches_cover_each_row_once_with_bounded_padding(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([0, rng.randrange(1, 300)]) for _ in range(rng.randrange(1, 70))]
    batches = prefill_batches(lengths)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == [i for i, n in enumerate(lengths) if n > 0]       # every non-empty row once
    for b in batches:
        real = sum(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= (1 + PAD_SHARE) * real
    # sorted by length: a batch's rows are no longer than the next batch's
    assert all(max(lengths[i] for i in a) <= min(lengths[i] for i in b) for a, b in zip(batches, batches[1:]))


def test_equal_lengths_make_one_batch():
    assert prefill_batches([7] * 9) == [list(range(9))]
