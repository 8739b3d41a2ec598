"""Typed contracts passed between layers (and, later, between agents).

Every artefact the engine writes is one of these models serialised to JSON, so any later layer — the
memory index, the tools, the reports — can re-read it without guessing at keys.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

DataFormat = Literal["text", "pairs", "chat", "classification"]


class LengthStats(BaseModel):
    """Distribution of record lengths in one unit (characters or tokens)."""

    unit: str = Field(description="'chars', 'bytes' or the tokenizer's name")
    min: int
    mean: float
    p50: int
    p95: int
    max: int
    total: int


class CurationSettings(BaseModel):
    """The knobs a curation ran with; stored so a summary says how it was made."""

    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    max_chars: int = Field(20_000, description="records longer than this (in characters) are dropped")
    near_dup_threshold: float = Field(0.8, description="MinHash-LSH Jaccard threshold on 5-char shingles")
    chunk_chars: int = Field(2_000, description="chunk size for .txt/.md documents")
    scrub_pii: bool = True
    tokenizer: str = Field("bytes", description="tokenizer for token counts; 'bytes' counts UTF-8 bytes")


class DatasetSummary(BaseModel):
    """What the data curator knows about one curated dataset (`datasets/<fingerprint>/summary.json`)."""

    fingerprint: str = Field(description="order- and format-independent hash of the cleaned records")
    source: str = Field(description="the path or corpus name as given")
    format: DataFormat
    schema_: list[str] = Field(alias="schema", description="input schemas seen, e.g. ['question,answer']")
    records_in: int
    records_after: int
    removed: dict[str, int] = Field(description="dropped records by reason")
    pii: dict[str, int] = Field(description="PII replacements by type (the records are kept)")
    splits: dict[str, int] = Field(description="records in train / val / test")
    lengths_chars: LengthStats
    lengths_tokens: LengthStats
    labels: dict[str, int] | None = Field(None, description="label distribution when labelled")
    samples: list[dict] = Field(description="five cleaned records")
    description: str = Field(description="plain-English account of what the data is about")
    top_terms: list[str] = Field(description="the most frequent content words")
    settings: CurationSettings
    warnings: list[str] = Field(default_factory=list)
    created_at: str

    model_config = {"populate_by_name": True}
