"""Cleaning, PII redaction and duplicate removal do what they say, and no more."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from tests.helpers import qa_rows, write_jsonl
from training.contracts import CurationSettings
from training.data import curate
from training.data.clean import PIIScrubber, normalize_text
from training.data.dedup import jaccard, lsh_params, near_duplicate_pairs, normalized_key, shingle_sets


def test_normalize_text_nfkc_controls_and_whitespace():
    raw = "  Ｆｕｌｌ\u200bwidth\x07 text\t\there\r\n\r\n\r\n\r\nnext   line \u00a0 "
    assert normalize_text(raw) == "Fullwidth text here\n\nnext line"
    assert normalize_text("ﬁne ①") == "fine 1"  # NFKC folds ligatures and circled digits


@pytest.mark.parametrize("text,expected,kind", [
    ("write to jana.kowalski@example.com today", "write to <EMAIL> today", "email"),
    ("call +1 415 555 0132 now", "call <PHONE> now", "phone"),
    ("call (415) 555-0199 now", "call <PHONE> now", "phone"),
    ("ring 020 7946 0018 please", "ring <PHONE> please", "phone"),
    ("or 415.555.0199 after six", "or <PHONE> after six", "phone"),
    ("card 4111 1111 1111 1111 expired", "card <CARD> expired", "card"),
    ("card 4242-4242-4242-4242 expired", "card <CARD> expired", "card"),
    ("router at 192.168.1.20 drops", "router at <IP> drops", "ip"),
    ("dns 1.1.1.1 is set", "dns <IP> is set", "ip"),
    ("host 2001:0db8:85a3:0000:0000:8a2e:0370:7334 is up", "host <IP> is up", "ip"),
])
def test_pii_is_replaced_with_typed_placeholders(text, expected, kind):
    scrub = PIIScrubber()
    assert scrub(text) == expected
    assert scrub.counts == {kind: 1}


@pytest.mark.parametrize("text", [
    "released on 2024-01-15 at 10:30",
    "version 2.14.1 of the app",
    "it takes 30 days and costs 19.99",
    "order 1234 5678 9012 3456 fails the Luhn check",  # 16 digits, but not a card number
    "the tank holds 2 litres, about 10 cups",
])
def test_pii_scrub_leaves_ordinary_numbers_alone(text):
    scrub = PIIScrubber()
    assert scrub(text) == text
    assert sum(scrub.counts.values()) == 0


def test_pii_records_are_kept_and_counted(tmp_path):
    rows = qa_rows(10)
    rows[3]["question"] = "My email is m.okafor@example.com and my phone +44 20 7946 0018, why no reply?"
    s = curate(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert s.summary.records_after == 10
    assert s.summary.pii == {"email": 1, "phone": 1, "card": 0, "ip": 0}
    assert not s.removed
    all_text = json.dumps(s.splits)
    assert "m.okafor@example.com" not in all_text and "<EMAIL>" in all_text and "<PHONE>" in all_text


def test_keep_pii_when_asked(tmp_path):
    rows = qa_rows(5)
    rows[0]["answer"] += " Mail help@example.com."
    s = curate(str(write_jsonl(tmp_path / "d.jsonl", rows)), CurationSettings(scrub_pii=False))
    assert "help@example.com" in json.dumps(s.splits)
    assert sum(s.summary.pii.values()) == 0


def test_empty_and_overlong_records_are_removed_with_reasons(tmp_path):
    rows = qa_rows(10) + [{"question": "   ", "answer": "nothing asked"}, {"question": "Long?", "answer": "word " * 400}]
    s = curate(str(write_jsonl(tmp_path / "d.jsonl", rows)), CurationSettings(max_chars=1000))
    assert s.summary.removed == {"empty": 1, "too_long": 1, "exact_duplicate": 0, "near_duplicate": 0}
    reasons = {r["reason"]: r for r in s.removed}
    assert reasons["empty"]["where"].endswith("d.jsonl:11")
    assert reasons["too_long"]["where"].endswith("d.jsonl:12")


def _edit(text: str) -> str:
    """A real edit, not a re-casing: replace one word, insert another."""
    words = text.split()
    words[3] = "kindly"
    words.insert(len(words) // 2, "quickly")
    return " ".join(words)


def test_near_duplicates_with_edited_text_are_removed(tmp_path):
    rows = qa_rows(20)
    edited = {"question": rows[4]["question"], "answer": _edit(rows[4]["answer"])}
    recased = {"question": rows[7]["question"].upper(), "answer": "  " + rows[7]["answer"].lower()}
    exact = dict(rows[9])
    s = curate(str(write_jsonl(tmp_path / "d.jsonl", rows + [edited, recased, exact])))
    assert s.summary.records_in == 23
    assert s.summary.records_after == 20
    assert s.summary.removed["exact_duplicate"] == 1
    assert s.summary.removed["near_duplicate"] == 2
    near = [r for r in s.removed if r["reason"] == "near_duplicate"]
    kept_ids = {r["id"] for rows_ in s.splits.values() for r in rows_}
    assert all(r["duplicate_of"] in kept_ids for r in near)
    assert all(r["similarity"] >= 0.8 for r in near)


def test_distinct_records_that_share_a_template_survive(tmp_path):
    s = curate(str(write_jsonl(tmp_path / "d.jsonl", qa_rows(24))))
    assert s.summary.records_after == 24 and not s.removed


def test_near_dup_threshold_is_configurable(tmp_path):
    base = "The quick brown fox jumps over the lazy dog near the river bank every single morning"
    variant = base.replace("quick brown", "slow grey").replace("every single", "each")
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": base}, {"text": variant}])
    sim = jaccard(*shingle_sets([normalized_key(base), normalized_key(variant)]))
    assert 0.4 < sim < 0.8
    assert curate(str(path)).summary.records_after == 2
    assert curate(str(path), CurationSettings(near_dup_threshold=0.4)).summary.records_after == 1


def test_kept_member_of_a_cluster_does_not_depend_on_order(tmp_path):
    rows = qa_rows(12)
    rows += [{"question": rows[2]["question"], "answer": _edit(rows[2]["answer"])}]
    results = []
    for seed in range(3):
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        s = curate(str(write_jsonl(tmp_path / f"d{seed}.jsonl", shuffled)))
        results.append((s.splits, sorted(r["id"] for r in s.removed)))
    assert results[0] == results[1] == results[2]


def test_lsh_finds_every_pair_above_the_threshold():
    """Against brute force: every pair with Jaccard >= threshold is found, and nothing below it."""
    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(300)]
    docs = [" ".join(rng.choice(vocab) for _ in range(30)) for _ in range(60)]
    for i in range(20):  # plant edits of varying size
        words = docs[i].split()
        for _ in range(i % 5):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        docs.append(" ".join(words))
    keys = [normalized_key(d) for d in docs]
    sets = shingle_sets(keys)
    truth = {(i, j) for i in range(len(keys)) for j in range(i + 1, len(keys)) if jaccard(sets[i], sets[j]) >= 0.8}
    found = {(i, j) for i, j, _ in near_duplicate_pairs(keys, 0.8)}
    assert truth, "the planted edits should give some pairs above the threshold"
    assert found == truth


def test_lsh_params_reach_the_threshold():
    for t in (0.5, 0.7, 0.8, 0.9):
        bands, rows = lsh_params(t)
        assert bands * rows <= 64
        assert 1 - (1 - t**rows) ** bands >= 0.99


def test_normalized_key_fast_path_matches_the_regex():
    from training.data.dedup import _NOT_WORD

    rng = random.Random(3)
    texts = ["".join(chr(rng.randrange(128)) for _ in range(60)) for _ in range(500)] + ["Ünïcode — dashes… “quotes”"]
    assert all(normalized_key(t) == _NOT_WORD.sub(" ", t.casefold()).strip() for t in texts)


def test_shingle_sets_batched_sort_matches_per_key_sets():
    from training.data.dedup import _shingles

    rng = random.Random(4)
    keys = ["".join(rng.choice("abcde ") for _ in range(rng.randrange(0, 80))) for _ in range(300)]
    codes, offsets = _shingles(keys)
    expected = [np.unique(part) for part in np.split(codes, offsets[1:])]
    got = shingle_sets(keys, batch=64)
    assert len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_a_large_cluster_of_near_copies_collapses_to_one(tmp_path):
    base = "Our support team answers every message within one business day, including weekends and holidays."
    rows = [{"text": f"{base} Ticket {i:04d}."} for i in range(260)]  # one big LSH bucket, > _MAX_BUCKET
    s = curate(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert s.summary.records_after == 1 and s.summary.removed["near_duplicate"] == 259
