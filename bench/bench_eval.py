"""Evaluation a new user can trust, on data nobody here wrote: the BBC News topic goal, end to end.

    .venv/bin/python bench/bench_eval.py [--workspace DIR] [--per-class 30] [--minutes 1] [--quick]
    .venv/bin/python bench/bench_eval.py --per-class 0 --minutes 8      # the whole corpus (about 19 minutes on 2 cores)
    .venv/bin/python bench/bench_eval.py --run RUN_ID --workspace DIR    # report a run already made

By default on a stated sample: `--per-class` articles of each of the five topics (seeded, `--seed`), written as a
.jsonl into the workspace; `--per-class 0` takes the whole bbc-news corpus. Runs `modelcrew run "fine-tune
smollm2-135m-instruct on <data> to classify articles by topic, accuracy at least 0.8, within <minutes> minutes"`
(the crew, offline policy) and records what the issue found wrong
before: how many articles trained (records cut to fit seq_len, never dropped), how many test articles
accuracy was scored on (the whole split), accuracy and the base's with their 90% intervals and the
paired difference, and the gate's verdict. The baseline in the same run is the old rule, counted on
the same data with the same tokenizer: examples cut at the right at 256 tokens lose their label and
were dropped. The base is SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF. Writes the bench_eval
section of bench/RESULTS.md and bench/results/bench_eval.json.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from common import result_json, stamp, write_json, write_section
from common import parse

OUT = result_json("bench_eval")
GOAL = ("fine-tune smollm2-135m-instruct on {data} to classify articles by topic, accuracy at least 0.8, "
        "within {minutes:g} minutes")
OLD_SEQ_LEN = 256  # the plan's fixed seq_len before: every longer article lost its label and was dropped
OLD_TEST_SCORED, OLD_EVAL_TOKENS = 24, 4096  # accuracy was scored on a fixed sample of 24, at up to 4,096 tokens
QUICK = {"per_class": 8, "minutes": 0.5}


def bbc_sample(workspace: Path, per_class: int, seed: int) -> str:
    """`per_class` articles of each bbc-news topic (seeded), as a .jsonl in `workspace`: the goal's data."""
    from training.data.readers import ReadOptions, read_source

    by_label: dict[str, list[dict]] = {}
    for row, _ in read_source("bbc-news", ReadOptions()):
        by_label.setdefault(row["label"], []).append(row)
    rng = random.Random(seed)
    rows = [r for label in sorted(by_label) for r in rng.sample(by_label[label], min(per_class, len(by_label[label])))]
    rng.shuffle(rows)
    path = workspace / f"bbc-news-{per_class}-per-class.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def old_rule_kept(workspace: Path, dataset: str, split: str) -> tuple[int, int]:
    """(records the old right-cut at 256 tokens kept, records) — counted with the base's tokenizer."""
    from transformers import AutoTokenizer

    from training.batches import read_split, render_chat, to_messages
    from training.data.store import datasets_dir

    tok = AutoTokenizer.from_pretrained(str(Path(workspace) / "models" / "base" / "smollm2-135m-instruct"))
    records = read_split(datasets_dir(workspace) / dataset, split)
    kept = sum(len(render_chat(tok, to_messages(r, "classification"))) <= OLD_SEQ_LEN for r in records)
    return kept, len(records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", type=Path, default=None)
    ap.add_argument("--run", default=None)
    ap.add_argument("--minutes", type=float, default=1.0, help="the goal's training budget")
    ap.add_argument("--per-class", type=int, default=30, help="articles per topic (seeded sample); 0: the whole corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help=f"{QUICK['per_class']} articles per topic, {QUICK['minutes']:g} minutes")
    a = parse(ap)
    if a.quick:
        a.per_class, a.minutes = QUICK["per_class"], QUICK["minutes"]
    from training.runs import Run

    workspace = a.workspace or Path(tempfile.mkdtemp(prefix="bench-eval-"))
    data = bbc_sample(workspace, a.per_class, a.seed) if a.per_class and not a.run else "bbc-news"
    goal = GOAL.format(data=data, minutes=a.minutes)
    sample = (f"a seeded sample (seed {a.seed}) of {a.per_class} articles per topic" if a.per_class
              else "the whole bbc-news corpus")
    started = time.perf_counter()
    if a.run:
        run_id = a.run
    else:
        from crews.run import run_goal_text

        run_id = run_goal_text(goal, workspace)["run_id"]
    wall = time.perf_counter() - started
    run = Run(workspace, run_id)
    ev, result, gate, plan = run.evaluation(), run.result(), run.gate(), run.plan()
    old = {split: old_rule_kept(workspace, plan.dataset, split) for split in ("train", "val", "test")}
    change = ev.comparisons["base"]["accuracy"]
    out = {"run_id": run_id, "goal": goal, "seq_len": plan.seq_len, "steps": result.steps, "status": result.status,
           "records": {"train": result.records["train"], **{k: v for k, v in ev.records.items() if k != "train"}},
           "old_rule_kept": {k: {"kept": v[0], "records": v[1]} for k, v in old.items()},
           "test_scored": ev.examples["test"], "accuracy": ev.metrics["accuracy"], "interval": ev.intervals["accuracy"].model_dump(),
           "base_accuracy": ev.metrics["base_accuracy"], "base_interval": ev.intervals["base_accuracy"].model_dump(),
           "accuracy_raw": ev.metrics.get("accuracy_raw"), "base_accuracy_raw": ev.metrics.get("base_accuracy_raw"),
           "change": change.model_dump(), "gate": gate.model_dump() if gate else None, "base_source": ev.base_source,
           "train_seconds": result.wall_seconds, "evaluate_seconds": ev.seconds, "wall_s": wall,
           "per_class": a.per_class, "seed": a.seed, "sample": sample, "minutes": a.minutes,
           "old_rule": {"seq_len": OLD_SEQ_LEN, "test_scored": OLD_TEST_SCORED, "eval_max_tokens": OLD_EVAL_TOKENS}, **stamp()}
    dropped = sum(v["dropped"] for v in out["records"].values() if v)
    out["summary"] = [
        {"target": f"BBC topic goal on {sample}: the gate's accuracy >= 0.8 (crew, offline policy, {a.minutes:g} min budget)",
         "figure": f"accuracy {out['accuracy']:.3f} (base {out['base_accuracy']:.3f}) on {out['test_scored']} test articles",
         "met": bool(gate and gate.passed)},
        {"target": "no article dropped for its length (train, val, test); the whole test split scored",
         "figure": f"{dropped} dropped; {out['test_scored']} of {out['records']['test']['records']} scored",
         "met": dropped == 0 and out["test_scored"] == out["records"]["test"]["records"]}]
    write_json(OUT, out)
    r, i, bi = out["records"]["train"], out["interval"], out["base_interval"]
    lines = ["", "## Evaluation on BBC News (`bench/bench_eval.py`)", "",
             f"Generated by `bench/bench_eval.py` (`bench/results/bench_eval.json`) on {sample}: the crew (offline policy) on", "",
             f"> {goal}", "",
             f"The base is SmolLM2-135M-Instruct **dequantized from its 4-bit Q4_1 GGUF** to float32. seq_len {plan.seq_len} "
             f"was planned from the articles' lengths; the run took {result.steps} steps ({result.status}) in "
             f"{result.wall_seconds:.0f} s of training and {ev.seconds:.0f} s of evaluation.", "",
             f"| | before (right-cut at {OLD_SEQ_LEN} tokens: label lost, record dropped) | now (input cut, label kept) |", "|---|---|---|"]
    for split in ("train", "val", "test"):
        kept, total = old[split]
        now = out["records"].get(split)
        shown = f"{now['whole'] + now['cut']} of {now['records']} ({now['cut']} cut, {now['dropped']} dropped)" if now else "-"
        lines.append(f"| {split} records used | {kept} of {total} | {shown} |")
    lines += [f"| test articles accuracy is scored on | {OLD_TEST_SCORED} (a fixed sample, at up to {OLD_EVAL_TOKENS:,} tokens) | "
              f"{ev.examples['test']} (the whole split, cut as in training) |",
              "", "| model | accuracy (90% interval) | raw-sum accuracy |", "|---|---|---|",
              f"| base | {out['base_accuracy']:.3f} ({bi['low']:.3f}–{bi['high']:.3f}) | {out['base_accuracy_raw']:.3f} |",
              f"| fine-tuned | {out['accuracy']:.3f} ({i['low']:.3f}–{i['high']:.3f}) | {out['accuracy_raw']:.3f} |",
              f"| paired difference | {change.change:+.3f} ({change.low:+.3f} to {change.high:+.3f}) over {change.n} articles | |", "",
              f"Gate: {'PASSED' if gate and gate.passed else 'FAILED'} — {gate.reasons[0] if gate else 'not gated'}.", "",
              f"Train records: {r['records']} ({r['whole']} whole, {r['cut']} cut, {r['dropped']} dropped). Platform: {out['platform']}, "
              f"load average {out['load_avg_end']:.2f} when the section was written.", ""]
    write_section("bench_eval", lines)
    print("\n".join(lines[1:-1]))


if __name__ == "__main__":
    main()
