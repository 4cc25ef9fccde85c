"""Sentence features for the probe and the judge: all-MiniLM-L6-v2 embeddings, cached on disk.

The test split of a real file is embedded again by every ``divgen eval`` run; on a CPU that is
minutes. ``embed_cached`` keeps each list of texts' embeddings in
``<DIVGEN_CACHE>/embeddings/<sha256 of the texts>.pt`` (written atomically, read back only when
its text count matches; what a killed run left is removed by the next write). The model itself is ``divgen.engine.metrics.load_embedding_model``.
"""
from __future__ import annotations

import hashlib
import os

import torch

from divgen.engine.metrics import embed
from divgen.engine.model import cache_root

CACHE_VERSION = "minilm-l6-v2/mean/l2/256"


def texts_key(texts: list[str]) -> str:
    h = hashlib.sha256(CACHE_VERSION.encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:24]


def embed_cached(texts: list[str], cache: bool = True) -> torch.Tensor:
    """``metrics.embed(texts)`` [N, 384], read from / written to the on-disk cache."""
    if not cache or not texts:
        return embed(texts)
    folder = cache_root() / "embeddings"
    path = folder / f"{texts_key(texts)}.pt"
    if path.is_file():
        try:
            emb = torch.load(path, weights_only=True)
            if emb.shape == (len(texts), 384):
                return emb
        except (OSError, RuntimeError, EOFError):
            pass                                # a damaged cache file is recomputed
    emb = embed(texts)
    from divgen.engine.files import clean_stale, temp_path

    tmp = temp_path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        clean_stale(path, ["tmp-*.pt"], any_name=True)      # what killed runs left (older names: tmp-*.pt)
        with open(tmp, "wb") as f:
            torch.save(emb, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError):
        pass                                    # a read-only cache only costs time
    finally:
        if tmp.exists():
            tmp.unlink()
    return emb
