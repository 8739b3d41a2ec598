"""Turn curated records into token sequences and batches.

- text (pretraining): documents are tokenized, joined with EOS and cut into full `seq_len` windows
  (sequence packing: no padding, every token trains);
- pairs and chat: rendered with the tokenizer's chat template; labels are -100 everywhere except
  the assistant's tokens, so the loss is only on responses;
- classification: label generation — the text is the prompt and the label the response.

`BatchStream` yields batches in an order fixed by (seed, epoch), and its position is two integers,
so a resumed run continues exactly where the killed one stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IGNORE = -100


@dataclass
class Example:
    """One training sequence as int32 arrays (packed windows are views into one token stream: no copies,
    and a batch is assembled with a few numpy copies instead of a Python loop over tokens)."""

    input_ids: np.ndarray
    labels: np.ndarray


def read_split(dataset_dir: Path, split: str) -> list[dict]:
    path = Path(dataset_dir) / f"{split}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def to_messages(record: dict, fmt: str) -> list[dict]:
    """A pairs / chat / classification record as chat messages."""
    if fmt == "chat":
        return record["messages"]
    if fmt == "pairs":
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    if fmt == "classification":
        return [{"role": "user", "content": classification_prompt(record["text"])},
                {"role": "assistant", "content": record["label"]}]
    raise ValueError(fmt)


def classification_prompt(text: str) -> str:
    return f"{text}\n\nCategory:"


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def supervised_example(tokenizer, messages: list[dict], seq_len: int) -> Example:
    """Token ids of a conversation with labels only on assistant turns (found by rendering prefixes)."""
    ids = render_chat(tokenizer, messages)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render_chat(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(render_chat(tokenizer, messages[: i + 1]))
        labels[start:end] = ids[start:end]
    return Example(np.asarray(ids[:seq_len], dtype=np.int32), np.asarray(labels[:seq_len], dtype=np.int32))


def packed_examples(tokenizer, texts: list[str], seq_len: int) -> list[Example]:
    """Documents joined by EOS and cut into windows of seq_len tokens (the tail shorter than one is dropped)."""
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    n = len(stream) // seq_len
    windows = np.asarray(stream[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
    return [Example(w, w) for w in windows]


def build_examples(tokenizer, records: list[dict], fmt: str, seq_len: int) -> list[Example]:
    if fmt == "text":
        return packed_examples(tokenizer, [r["text"] for r in records], seq_len)
    examples = [supervised_example(tokenizer, to_messages(r, fmt), seq_len) for r in records]
    return [e for e in examples if (e.labels != IGNORE).any()]  # truncation may cut the whole answer


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded positions are masked out of attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE, dtype=np.int64)
    mask = np.zeros((len(examples), width), dtype=np.int64)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = e.input_ids, e.labels, 1
    ids, labels, mask = torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(mask)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class BatchStream:
    """Endless shuffled batches over `examples`; each process of a DDP run takes its slice of every batch."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int,
                 rank: int = 0, world: int = 1) -> None:
        if len(examples) < 1:
            raise ValueError("no training examples")
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.rank, self.world = rank, world
        self.epoch, self.index = 0, 0  # the position: next batch starts at order[index] of this epoch
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)

    def next(self) -> dict[str, torch.Tensor]:
        picked = []
        while len(picked) < self.batch_size:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            picked.append(self.examples[self._order[self.index]])
            self.index += 1
        return collate(picked[self.rank :: self.world], self.pad_id)
