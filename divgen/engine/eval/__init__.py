"""Student evaluation of synthetic data (``divgen eval``) and the label-fidelity judge.

* ``data``      — real labelled files (CSV/JSONL, column choice, ``source_label`` mapping), the fixed
                  pool/test split, synthetic JSONL sets.
* ``features``  — all-MiniLM-L6-v2 embeddings with an on-disk cache.
* ``probe``     — the linear probe (L2 logistic regression, L-BFGS to the unique minimum).
* ``finetune``  — the fine-tuned student (MiniLM + classification head).
* ``judge``     — ``Judge``: trained on real pool rows only; ``fidelity(texts, labels)``.
* ``evaluate``  — the whole evaluation and its table.
"""
