"""The ML engine: data curation, tokenizers, model builders, the training loop, evaluation, checkpoints.

`training` is the bottom layer. It may import the standard library, torch, transformers, peft,
tokenizers, datasets, langchain's loaders and splitters, numpy, pydantic and rich — and
never crewai or chromadb (a test guards this), so it runs alone (`python -m training <command>`) and
under torchrun / accelerate. The contracts that pass between layers live in `training.contracts`.
"""
