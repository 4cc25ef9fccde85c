"""Stop strings are checked on the new text only (the last tokens' window, ``_StopChecker``): the
step at which a row stops equals the step a check of the whole decoded text gives, on the embedded
model's real tokenizer, with multi-byte characters, byte-fallback tokens and random ids."""
import random

from divgen.engine.decode import _StopChecker


def _first_stop_full(lm, ids, stops):
    """The reference: the first step whose whole decoded text contains a stop string."""
    for t in range(1, len(ids) + 1):
        text = lm.decode(ids[:t])
        if any(s in text for s in stops):
            return t
    return None


def _first_stop_window(checker, ids):
    for t in range(1, len(ids) + 1):
        if checker.check(ids[:t]) == "stop":
            return t
    return None


def test_window_check_stops_where_the_whole_text_check_does(embedded_lm):
    lm = embedded_lm
    rng = random.Random(0)
    texts = ["The café served crème brûlée — naïve but 日本語 friendly. END of story, really.",
             "Sports: the 2026 final ended 3–2 after 120 minutes; fans sang «olé» all night.\n\nNext",
             "emoji 🎉🎉 and accents àéîõü, then ### Label: World\nmore text follows here"]
    cases = 0
    for text in texts:
        ids = lm.encode(text)
        decoded = lm.decode(ids)
        for _ in range(12):
            a = rng.randrange(0, len(decoded) - 1)
            stop = decoded[a:a + rng.randint(1, 12)]
            if not stop.strip():
                continue
            want = _first_stop_full(lm, ids, [stop])
            got = _first_stop_window(_StopChecker(lm, [stop], ignore_eos=True, max_new_tokens=10_000), ids)
            assert got == want, (text, stop)
            cases += 1
    vocab = lm.tokenizer.vocab_size if hasattr(lm.tokenizer, "vocab_size") else 49152
    for seed in range(6):                      # random ids: byte pieces, partial characters
        r = random.Random(seed)
        ids = [r.randrange(0, vocab) for _ in range(60)]
        decoded = lm.decode(ids)
        stop = decoded[len(decoded) // 2: len(decoded) // 2 + 5]
        if stop:
            want = _first_stop_full(lm, ids, [stop])
            got = _first_stop_window(_StopChecker(lm, [stop], ignore_eos=True, max_new_tokens=10_000), ids)
            assert got == want, (seed, stop)
            cases += 1
    assert cases >= 30
