"""The fingerprint and the splits depend on the data only: not on order, file name, format or later appends."""

from __future__ import annotations

import hashlib
import json
import random

from tests.helpers import files_under, qa_rows, write_csv, write_jsonl
from training.contracts import CurationSettings
from training.data import curate, curate_to_workspace
from training.data.split import assign_split


def _rows_with_dups() -> list[dict]:
    rows = qa_rows(24)
    rows.append(dict(rows[5]))
    rows.append({"question": rows[8]["question"].lower(), "answer": rows[8]["answer"]})
    return rows


def test_shuffling_the_input_changes_nothing(tmp_path):
    rows = _rows_with_dups()
    outs = []
    for seed in range(4):
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        r = curate(str(write_jsonl(tmp_path / f"s{seed}.jsonl", shuffled)))
        outs.append((r.summary.fingerprint, r.splits, r.summary.removed, r.summary.splits))
    assert all(o == outs[0] for o in outs)


def test_fingerprint_ignores_file_name_and_format(tmp_path):
    rows = qa_rows(15)
    jsonl = curate(str(write_jsonl(tmp_path / "faq.jsonl", rows))).summary.fingerprint
    csv_fp = curate(str(write_csv(tmp_path / "other-name.csv", rows))).summary.fingerprint
    (tmp_path / "faq.json").write_text(json.dumps(rows), encoding="utf-8")
    json_fp = curate(str(tmp_path / "faq.json")).summary.fingerprint
    renamed = [{"prompt": r["question"], "completion": r["answer"]} for r in rows]
    pc_fp = curate(str(write_jsonl(tmp_path / "pc.jsonl", renamed))).summary.fingerprint
    assert jsonl == csv_fp == json_fp == pc_fp


def test_fingerprint_changes_with_content(tmp_path):
    rows = qa_rows(15)
    a = curate(str(write_jsonl(tmp_path / "a.jsonl", rows))).summary.fingerprint
    rows[3]["answer"] += " Also restart the app."
    b = curate(str(write_jsonl(tmp_path / "b.jsonl", rows))).summary.fingerprint
    assert a != b


def test_appending_records_never_moves_an_old_record(tmp_path):
    rows = qa_rows(24)
    before = curate(str(write_jsonl(tmp_path / "v1.jsonl", rows[:12]))).splits
    after = curate(str(write_jsonl(tmp_path / "v2.jsonl", rows))).splits
    where_before = {r["id"]: name for name, rs in before.items() for r in rs}
    where_after = {r["id"]: name for name, rs in after.items() for r in rs}
    assert len(where_before) == 12 and len(where_after) == 24
    assert {i: where_after[i] for i in where_before} == where_before


def test_split_is_by_hash_and_roughly_proportional():
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(10_000)]
    counts = {"train": 0, "val": 0, "test": 0}
    for h in hashes:
        counts[assign_split(h, (0.8, 0.1, 0.1))] += 1
    assert 7800 < counts["train"] < 8200 and 900 < counts["val"] < 1100 and 900 < counts["test"] < 1100
    assert all(assign_split(h, (0.8, 0.1, 0.1)) == assign_split(h, (0.8, 0.1, 0.1)) for h in hashes[:100])


def test_near_duplicate_clusters_never_straddle_splits(tmp_path):
    rows = qa_rows(24)
    variants = []
    for i in range(0, 24, 3):  # three copies of every third record, each edited a little
        for n in range(2):
            variants.append({"question": rows[i]["question"] + " " + ["Thanks!", "Please help."][n], "answer": rows[i]["answer"]})
    r = curate(str(write_jsonl(tmp_path / "d.jsonl", rows + variants)))
    assert r.summary.removed["near_duplicate"] == len(variants)
    # one member per cluster survives, so no two surviving records are near copies of each other
    prompts = [row["prompt"].split(" (case")[0] + row["response"] for rs in r.splits.values() for row in rs]
    assert len(prompts) == len(set(prompts)) == 24


def test_workspace_layout_and_atomic_rewrite(tmp_path, ws):
    path = write_jsonl(tmp_path / "d.jsonl", _rows_with_dups())
    first = curate_to_workspace(str(path), ws)
    names = sorted(p.name for p in first.path.iterdir())
    assert names == ["removed.jsonl", "summary.json", "test.jsonl", "train.jsonl", "val.jsonl"]
    removed = [json.loads(line) for line in (first.path / "removed.jsonl").read_text().splitlines()]
    assert {r["reason"] for r in removed} == {"exact_duplicate", "near_duplicate"}
    assert all("duplicate_of" in r and "where" in r for r in removed)
    second = curate_to_workspace(str(path), ws, settings=CurationSettings(split=(0.5, 0.25, 0.25)))
    assert second.path == first.path
    assert json.loads((second.path / "summary.json").read_text())["settings"]["split"] == [0.5, 0.25, 0.25]
    # no temporary or old copies are left behind
    assert sorted(p.name for p in (ws / "datasets").iterdir()) == [first.summary.fingerprint]
    assert len(files_under(ws)) == 5
