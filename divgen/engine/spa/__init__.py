"""SPA — Synthesize, Partition, then Adapt (Wen & Chaudhuri, NeurIPS 2024).

    data.py       (prompt, response) pairs and prompt files; the shipped synthetic dataset
    partition.py  scores (random, BM25, influence) -> standardised -> balanced assignment
    influence.py  per-example LoRA gradients, Hessian-vector products, LiSSA
    finetune.py   the differentiable single-adapter path and the response loss
    adapt.py      one LoRA adapter per partition, resumable, saved in PEFT format
    lora.py       PEFT LoRA files: config, save, load, validation against a model
    multilora.py  serving: every batch row with its own adapter (divgen.kernels.add_lora)
    sample.py     all adapters answer every prompt in one batch
    metrics.py    Diversity Score and pairwise KL between adapters
"""
