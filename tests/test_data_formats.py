"""Every input format and schema is read, detected and normalised to the same internal records."""

from __future__ import annotations

import json

import pytest

from tests.helpers import qa_rows, write_csv, write_jsonl
from training.data import curate, curate_to_workspace

SCHEMA_CASES = [
    # (rows, expected format, expected schema, expected normalised fields of row 0)
    ([{"text": f"Passage number {i} talks about rivers, hills and {i} towns."} for i in range(5)],
     "text", "text", {"text": "Passage number 0 talks about rivers, hills and 0 towns."}),
    ([{"text": f"Review {i}: the blender {'works' if i % 2 else 'broke'} on day {i}.", "label": "pos" if i % 2 else "neg"} for i in range(6)],
     "classification", "text,label", {"text": "Review 0: the blender broke on day 0.", "label": "neg"}),
    ([{"prompt": f"Translate word {i}", "completion": f"Mot {i}"} for i in range(5)],
     "pairs", "prompt,completion", {"prompt": "Translate word 0", "response": "Mot 0"}),
    ([{"question": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(5)],
     "pairs", "question,answer", {"prompt": "What is 0+0?", "response": "0"}),
    ([{"instruction": f"Summarise note {i}", "input": f"Note {i} says hello", "output": f"Greeting {i}"} for i in range(5)],
     "pairs", "instruction,input,output", {"prompt": "Summarise note 0\n\nNote 0 says hello", "response": "Greeting 0"}),
    ([{"document": f"The council met on day {i} and agreed to repair {i} bridges before winter.", "summary": f"{i} bridges to be repaired"}
      for i in range(5)],
     "pairs", "document,summary", {"prompt": "The council met on day 0 and agreed to repair 0 bridges before winter.",
                                   "response": "0 bridges to be repaired"}),
    ([{"article": f"Storm number {i} closed {i} roads across the valley overnight.", "highlights": f"Storm {i} shut roads", "id": f"a{i}"}
      for i in range(5)],
     "pairs", "article,highlights", {"prompt": "Storm number 0 closed 0 roads across the valley overnight.", "response": "Storm 0 shut roads"}),
    ([{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}"},
                    {"role": "assistant", "content": f"Hello {i}!"}]} for i in range(5)],
     "chat", "messages", {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 0"},
                                       {"role": "assistant", "content": "Hello 0!"}]}),
]


@pytest.mark.parametrize("rows,fmt,schema,first", SCHEMA_CASES, ids=[c[2] for c in SCHEMA_CASES])
def test_jsonl_schemas_are_detected_and_normalised(tmp_path, rows, fmt, schema, first):
    result = curate(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    s = result.summary
    assert (s.format, s.schema_, s.records_in, s.records_after) == (fmt, [schema], len(rows), len(rows))
    written = [{k: v for k, v in r.items() if k != "id"} for rows_ in result.splits.values() for r in rows_]
    assert first in written
    assert sum(s.splits.values()) == len(rows)


def test_json_list_and_wrapped_list(tmp_path):
    rows = qa_rows(10)
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps({"data": rows, "version": 2}), encoding="utf-8")
    a, b = curate(str(tmp_path / "a.json")).summary, curate(str(tmp_path / "b.json")).summary
    assert a.records_after == b.records_after == 10
    assert a.fingerprint == b.fingerprint


def test_csv_and_tsv_with_header(tmp_path):
    rows = qa_rows(12)
    csv_s = curate(str(write_csv(tmp_path / "d.csv", rows))).summary
    tsv_s = curate(str(write_csv(tmp_path / "d.tsv", rows, delimiter="\t"))).summary
    assert csv_s.format == tsv_s.format == "pairs"
    assert csv_s.records_after == tsv_s.records_after == 12
    assert csv_s.fingerprint == tsv_s.fingerprint


def test_a_summarisation_csv_with_document_and_summary_columns_is_read_as_pairs(tmp_path):
    rows = [{"document": f"Report {i}: sales rose in {i} regions while costs held steady.", "summary": f"Sales up in {i} regions"}
            for i in range(10)]
    s = curate(str(write_csv(tmp_path / "news.csv", rows))).summary
    assert (s.format, s.schema_, s.records_after) == ("pairs", ["document,summary"], 10)


def test_csv_columns_mapping(tmp_path):
    rows = [{"Body": f"Article {i} about markets and {i} shares.", "Topic": "business" if i % 2 else "sport", "extra": "x"}
            for i in range(8)]
    s = curate(str(write_csv(tmp_path / "d.csv", rows)), columns={"text": "Body", "label": "Topic"}).summary
    assert s.format == "classification"
    assert s.labels == {"business": 4, "sport": 4}


def test_txt_and_md_documents_are_chunked_with_line_numbers(tmp_path):
    paragraphs = [f"Paragraph {i}. " + " ".join(f"word{i}x{j}" for j in range(40)) for i in range(30)]
    (tmp_path / "book.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    md = "# Guide\n\n" + "\n\n".join(f"## Part {i}\n\n{p}" for i, p in enumerate(paragraphs[:10]))
    (tmp_path / "guide.md").write_text(md, encoding="utf-8")
    txt = curate(str(tmp_path / "book.txt"), format=None)
    assert txt.summary.format == "text"
    assert txt.summary.records_in > 5  # ~10 kB of text in 2,000-character chunks
    assert txt.summary.lengths_chars.max <= 2000
    md_result = curate(str(tmp_path / "guide.md"))
    assert md_result.summary.records_in >= 2
    # the markdown splitter cuts at headers: every chunk after the first starts with one
    chunks = sorted((r["text"] for rows in md_result.splits.values() for r in rows), key=len)
    assert any(c.startswith("## Part") for c in chunks)


def test_directory_recursive_mixed_files(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("The first document talks about trains and stations in the north.", encoding="utf-8")
    (root / "sub" / "b.md").write_text("# Boats\n\nThe second document is about boats and harbours.", encoding="utf-8")
    write_jsonl(root / "sub" / "deeper" / "c.jsonl", [{"text": "A third text about planes and airports."}])
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("must not be read", encoding="utf-8")
    (root / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    s = curate(str(root)).summary
    assert s.records_in == 3
    texts = " ".join(x["text"] for x in s.samples)
    assert "must not be read" not in texts
    assert any("picture.png" in w for w in s.warnings)


def test_hugging_face_dataset_saved_to_disk(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = qa_rows(10)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    DatasetDict({"train": Dataset.from_list(rows[:6]), "test": Dataset.from_list(rows[6:])}).save_to_disk(str(tmp_path / "dict"))
    single, both = curate(str(tmp_path / "single")).summary, curate(str(tmp_path / "dict")).summary
    assert single.records_after == both.records_after == 10
    assert single.fingerprint == both.fingerprint == curate(str(write_jsonl(tmp_path / "d.jsonl", rows))).summary.fingerprint


def test_named_corpus_bbc_news(ws):
    result = curate_to_workspace("bbc-news", ws)
    s = result.summary
    assert s.records_in == 2225
    assert s.format == "classification"
    assert set(s.labels) == {"business", "entertainment", "politics", "sports", "tech"}
    assert s.removed["exact_duplicate"] + s.removed["near_duplicate"] > 0  # the corpus has known repeats
    assert s.records_after == sum(s.splits.values()) == sum(s.labels.values())
    assert "politics" in s.description and "business" in s.description
    assert (result.path / "train.jsonl").exists()


def test_forced_format_converts_pairs_to_text(tmp_path):
    s = curate(str(write_jsonl(tmp_path / "d.jsonl", qa_rows(6))), format="text")
    assert s.summary.format == "text"
    first = next(r for rows in s.splits.values() for r in rows)
    assert set(first) == {"id", "text"} and "\n\n" in first["text"]


def test_pairs_and_chat_mix_as_chat(tmp_path):
    rows = [qa_rows(1)[0], SCHEMA_CASES[-1][0][0]]
    s = curate(str(write_jsonl(tmp_path / "d.jsonl", rows))).summary
    assert s.format == "chat" and s.records_after == 2


def test_curated_records_can_be_curated_again_with_the_same_ids_and_splits(tmp_path):
    first = curate(str(write_jsonl(tmp_path / "qa.jsonl", qa_rows(30))))
    again_rows = [{k: v for k, v in r.items() if k != "id"} for rows in first.splits.values() for r in rows]
    again = curate(str(write_jsonl(tmp_path / "curated.jsonl", again_rows)))
    assert again.summary.fingerprint == first.summary.fingerprint
    assert {k: [r["id"] for r in v] for k, v in again.splits.items()} == {k: [r["id"] for r in v] for k, v in first.splits.items()}
    assert again.summary.schema_ == ["prompt,response"]
