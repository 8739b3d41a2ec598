"""Turn curated records into token sequences and batches.

- text (pretraining): documents are tokenized, joined with EOS and cut into full `seq_len` windows
  (sequence packing: no padding, every token trains);
- pairs and chat: rendered with the tokenizer's chat template; labels are -100 everywhere except
  the assistant's tokens, so the loss is only on responses;
- classification: label generation — the text is the prompt and the label the response;
- preference (DPO, ORPO): each pair is two such sequences, prompt + chosen and prompt + rejected, labelled on the
  answer alone (`PreferenceExample`); feedback (KTO): one sequence per rated answer, with its rating.

A record longer than `seq_len` is cut in its input, never in its answer: the text, prompt or earliest
turns lose their tail until the whole fits (`fit_record`); a record whose answer alone does not fit is
dropped. `Fit` counts both per split, so nothing is lost in silence.

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


@dataclass
class PreferenceExample:
    """A preference pair (rows: chosen, rejected) or a rated answer (rows: the answer; `desirable` says how it
    was rated), each row an `Example` supervised on the answer alone. `ref_logps`: each row's summed answer
    log-probability under the reference model (the run's starting weights), filled once before training by
    `training.objective.reference_logps` for the objectives that need them (DPO, KTO)."""

    rows: tuple[Example, ...]
    desirable: bool | None = None
    ref_logps: tuple[float, ...] | None = None


@dataclass
class Fit:
    """How one split's records fit `seq_len`: whole, cut (their input shortened) or dropped (the answer
    alone is longer), and how many input tokens the cuts removed."""

    records: int = 0
    whole: int = 0
    cut: int = 0
    dropped: int = 0
    cut_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    def sentence(self, split: str, seq_len: int) -> str:
        if not self.cut and not self.dropped:
            return f"all {self.records} {split} records fit {seq_len} tokens whole"
        parts = [f"{self.whole} of {self.records} {split} records fit {seq_len} tokens whole"]
        if self.cut:
            parts.append(f"{self.cut} had their input cut ({self.cut_tokens} tokens in all; answers kept)")
        if self.dropped:
            parts.append(f"{self.dropped} were dropped (the answer alone is longer)")
        return ", ".join(parts)


def read_split(dataset_dir: Path, split: str) -> list[dict]:
    path = Path(dataset_dir) / f"{split}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


PREFERENCE = ("preference", "feedback")


def answers_of(record: dict, fmt: str) -> list[str]:
    """The answers a preference (chosen, rejected) or feedback (the one) record is scored on."""
    return [record["chosen"], record["rejected"]] if fmt == "preference" else [record["completion"]]


def to_messages(record: dict, fmt: str) -> list[dict]:
    """A pairs / chat / classification record as chat messages (a preference record: its prompt and chosen
    answer; a feedback record: its prompt and answer)."""
    if fmt in PREFERENCE:
        return record["prompt"] + [{"role": "assistant", "content": answers_of(record, fmt)[0]}]
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


def rendered_length(tokenizer, record: dict, fmt: str) -> int:
    """Tokens of a record's conversation as trained: a preference pair's longer one (prompt and chosen, or prompt
    and rejected)."""
    if fmt == "preference":
        return max(len(render_chat(tokenizer, record["prompt"] + [{"role": "assistant", "content": a}]))
                   for a in answers_of(record, fmt))
    return len(render_chat(tokenizer, to_messages(record, fmt)))


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def supervised_example(tokenizer, messages: list[dict]) -> Example:
    """Token ids of a conversation with labels only on assistant turns (found by rendering prefixes)."""
    ids = render_chat(tokenizer, messages)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render_chat(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(render_chat(tokenizer, messages[: i + 1]))
        labels[start:end] = ids[start:end]
    return Example(np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32))


INPUT_FIELD = {"classification": "text", "pairs": "prompt"}


def fit_record(tokenizer, record: dict, fmt: str, seq_len: int) -> tuple[dict | None, int]:
    """`record` with its input cut so that its rendered conversation fits `seq_len` tokens, and the number
    of input tokens cut; (None, 0) when even an empty input leaves no room for the answer.

    classification and pairs lose the tail of their text or prompt; chat loses its earliest turns
    (a system message stays) and then the tail of its last user turn; a preference or feedback prompt is cut
    like a chat's so that its longer answer fits. Answers are never cut."""
    if fmt in PREFERENCE:
        answers = answers_of(record, fmt)
        lengths = [len(render_chat(tokenizer, record["prompt"] + [{"role": "assistant", "content": a}])) for a in answers]
        longest = answers[max(range(len(answers)), key=lengths.__getitem__)]
        chat = {"messages": record["prompt"] + [{"role": "assistant", "content": longest}]}
        fitted, cut = fit_record(tokenizer, chat, "chat", seq_len)
        if fitted is None:
            return None, 0
        return (record, 0) if fitted is chat else ({**record, "prompt": fitted["messages"][:-1]}, cut)
    overflow = len(render_chat(tokenizer, to_messages(record, fmt))) - seq_len
    if overflow <= 0:
        return record, 0
    cut = 0
    if fmt == "chat":
        messages = list(record["messages"])
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        first = 1 if messages and messages[0]["role"] == "system" else 0
        while overflow > 0 and first < last_user:  # whole earlier turns go first: the last exchange is what is learned
            dropped = messages.pop(first)
            last_user -= 1
            cut += len(tokenizer(dropped["content"], add_special_tokens=False)["input_ids"])
            overflow = len(render_chat(tokenizer, messages)) - seq_len
        record = {**record, "messages": messages}
        if overflow <= 0:
            return record, cut
        if last_user < 0:
            return None, 0
    for _ in range(4):  # re-tokenising a cut text can shift a token or two: converge in a few tries
        if fmt == "chat":
            content = record["messages"][last_user]["content"]
        else:
            content = record[INPUT_FIELD[fmt]]
        ids = tokenizer(content, add_special_tokens=False)["input_ids"]
        keep = len(ids) - overflow
        if keep < 1:
            return None, 0
        shorter = tokenizer.decode(ids[:keep])
        cut += len(ids) - keep
        if fmt == "chat":
            messages = list(record["messages"])
            messages[last_user] = {**messages[last_user], "content": shorter}
            record = {**record, "messages": messages}
        else:
            record = {**record, INPUT_FIELD[fmt]: shorter}
        overflow = len(render_chat(tokenizer, to_messages(record, fmt))) - seq_len
        if overflow <= 0:
            return record, cut
    return None, 0


def fit_records(tokenizer, records: list[dict], fmt: str, seq_len: int) -> tuple[list[tuple[int, dict]], Fit]:
    """(index, fitted record) for every record that fits `seq_len` whole or cut, and the count of each."""
    fit, kept = Fit(records=len(records)), []
    for i, r in enumerate(records):
        fitted, cut = fit_record(tokenizer, r, fmt, seq_len)
        if fitted is None:
            fit.dropped += 1
            continue
        fit.cut += fitted is not r
        fit.whole += fitted is r
        fit.cut_tokens += cut
        kept.append((i, fitted))
    return kept, fit


def packed_examples(tokenizer, texts: list[str], seq_len: int) -> list[Example]:
    """Documents joined by EOS and cut into windows of seq_len tokens (the tail shorter than one is dropped)."""
    stream: list[int] = []
    for ids in (tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []):
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    n = len(stream) // seq_len
    windows = np.asarray(stream[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
    return [Example(w, w) for w in windows]


def build_examples(tokenizer, records: list[dict], fmt: str, seq_len: int) -> list[Example]:
    return fitted_examples(tokenizer, records, fmt, seq_len)[0]


def fitted_examples(tokenizer, records: list[dict], fmt: str, seq_len: int) -> tuple[list[Example], Fit]:
    """The training sequences of `records` and how they fit (text is packed: its records are never cut
    one by one; only the tail shorter than one window is left out)."""
    if fmt == "text":
        examples = packed_examples(tokenizer, [r["text"] for r in records], seq_len)
        return examples, Fit(records=len(records), whole=len(records))
    kept, fit = fit_records(tokenizer, records, fmt, seq_len)
    if fmt in PREFERENCE:
        return [preference_example(tokenizer, r, fmt) for _, r in kept], fit
    return [supervised_example(tokenizer, to_messages(r, fmt)) for _, r in kept], fit


def preference_example(tokenizer, record: dict, fmt: str) -> PreferenceExample:
    """Each answer after the prompt, supervised on the answer alone (earlier assistant turns of a chat prompt are
    context: the preference is about the final turn)."""
    start = len(render_chat(tokenizer, record["prompt"], add_generation_prompt=True))
    rows = []
    for answer in answers_of(record, fmt):
        example = supervised_example(tokenizer, record["prompt"] + [{"role": "assistant", "content": answer}])
        example.labels[:start] = IGNORE
        rows.append(example)
    return PreferenceExample(tuple(rows), record["label"] if fmt == "feedback" else None)


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


def collate_preference(items: list[PreferenceExample], pad_id: int) -> dict[str, torch.Tensor]:
    """k pairs as 2k rows (the k chosen, then the k rejected), or k rated answers as k rows (with `desirable`),
    plus `ref_logps` in the rows' order (zeros where none were computed: ORPO needs none)."""
    width = len(items[0].rows)
    rows = [item.rows[j] for j in range(width) for item in items]
    batch = collate(rows, pad_id)
    refs = [item.ref_logps[j] if item.ref_logps else 0.0 for j in range(width) for item in items]
    batch["ref_logps"] = torch.tensor(refs, dtype=torch.float32)
    if width == 1:
        batch["desirable"] = torch.tensor([bool(item.desirable) for item in items])
    return batch


def collate_any(examples: list, pad_id: int) -> dict[str, torch.Tensor]:
    """`collate_preference` for preference examples, `collate` for the others."""
    if examples and isinstance(examples[0], PreferenceExample):
        return collate_preference(examples, pad_id)
    return collate(examples, pad_id)


class BatchStream:
    """Endless shuffled batches over `examples`; each process of a DDP run takes its slice of every batch.
    A batch of preference examples counts pairs (or rated answers), each collated by `collate_fn`."""

    def __init__(self, examples: list, batch_size: int, seed: int, pad_id: int,
                 rank: int = 0, world: int = 1, collate_fn=collate_any) -> None:
        if len(examples) < 1:
            raise ValueError("no training examples")
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.collate_fn = collate_fn
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
        return self.collate_fn(picked[self.rank :: self.world], self.pad_id)
