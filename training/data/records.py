"""The one internal record type every input is normalised to, and its content hash.

A record is a `format` plus a small dict of fields in canonical form:

    text            {"text": str}
    classification  {"text": str, "label": str}
    pairs           {"prompt": str, "response": str}
    chat            {"messages": [{"role": str, "content": str}, ...]}

The content hash covers the format and the fields only — never the file name, line or input schema —
so the same data read from `.jsonl` or `.csv` hashes the same.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass


@dataclass(slots=True)
class Record:
    format: str
    fields: dict
    where: str  # "file:line" of the input it came from, for messages and removed.jsonl

    def map_strings(self, fn) -> None:
        """Apply `fn` to every string the record holds (labels and roles excepted)."""
        f = self.fields
        if self.format == "chat":
            for m in f["messages"]:
                m["content"] = fn(m["content"])
        elif self.format in ("preference", "feedback"):
            for m in f["prompt"]:
                m["content"] = fn(m["content"])
            for key in ("chosen", "rejected", "completion"):
                if key in f:
                    f[key] = fn(f[key])
        elif self.format == "pairs":
            f["prompt"] = fn(f["prompt"])
            f["response"] = fn(f["response"])
        else:
            f["text"] = fn(f["text"])

    def is_empty(self) -> bool:
        f = self.fields
        if self.format == "chat":
            return not any(m["content"] for m in f["messages"] if m["role"] != "system")
        if self.format == "pairs":
            return not f["prompt"] or not f["response"]
        if self.format == "preference":  # two equal answers state no preference
            return not f["chosen"] or not f["rejected"] or f["chosen"] == f["rejected"]
        if self.format == "feedback":
            return not f["completion"]
        if self.format == "classification":
            return not f["text"] or not f["label"]
        return not f["text"]

    def body(self) -> str:
        """All the record's text in one string: what dedup, lengths and topics look at."""
        f = self.fields
        if self.format == "chat":
            return "\n".join(m["content"] for m in f["messages"])
        if self.format == "pairs":
            return f["prompt"] + "\n" + f["response"]
        if self.format in ("preference", "feedback"):  # dedup key: the prompt and both answers (or the one)
            answers = [f["chosen"], f["rejected"]] if self.format == "preference" else [f["completion"]]
            return "\n".join([m["content"] for m in f["prompt"]] + answers)
        return f["text"]

    def content_hash(self) -> str:
        canonical = json.dumps([self.format, self.fields], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def record_id(content_hash: str) -> str:
    """Short, stable id of a record (64 bits of its content hash)."""
    return content_hash[:16]
