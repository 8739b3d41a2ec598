"""The ML engine: data curation, tokenizers, model builders, the training loop, evaluation, checkpoints.

`training` is the bottom layer. It may import the standard library, torch, transformers, peft,
tokenizers, datasets, langchain's loaders and splitters, numpy, pydantic and rich — and
never crewai or chromadb (a test guards this), so it runs under torchrun / accelerate without the
crew's libraries. `python -m training <command>` (training/__main__.py, an entry script, not part of
the engine) runs the CLI's engine commands: data, train, estimate, eval. The contracts that pass between layers live in `training.contracts`.
"""
