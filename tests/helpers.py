"""Small dataset writers shared by the tests (the ticket stream lives in examples/tickets.py, shared with bench/)."""

from __future__ import annotations

import csv
from pathlib import Path

from examples.tickets import write_jsonl  # noqa: F401  (the tests' writer of .jsonl files)


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


TOPICS = [
    "reset my password", "change the billing address", "cancel the subscription", "export my notes",
    "pair the device with wifi", "update the firmware", "request a refund", "track my order",
    "enable two factor login", "delete my account", "change the display language", "share a folder",
    "restore a deleted file", "contact a human agent", "upgrade to the pro plan", "download an invoice",
    "connect the calendar", "turn off notifications", "report a security problem", "transfer ownership",
    "merge two accounts", "print a shipping label", "book a repair", "extend the warranty",
]


def qa_rows(n: int = 24) -> list[dict]:
    """n distinct, realistic question/answer pairs (no two are near duplicates)."""
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        rows.append({
            "question": f"How do I {topic}? (case {i})",
            "answer": f"To {topic}, open Settings, choose the section for it and follow step {i + 1}. "
                      f"It takes about {i + 2} minutes and you will get a confirmation when it is done.",
        })
    return rows


TINY = dict(seq_len=64, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=10, eval_batches=2, checkpoint_every=100)


def pretrain_tiny_base(ws: Path, run_id: str = "base", steps: int = 4, **settings) -> Path:
    """A tiny model pretrained for a few steps on the example FAQ (as text) in `ws`: a base with a chat
    template to fine-tune in seconds. `settings` override TINY's plan fields (and the seed). Returns its final/
    directory."""
    from training.contracts import Budget, TrainPlan
    from training.data import curate_to_workspace
    from training.loop import train

    faq = Path(__file__).resolve().parent.parent / "examples" / "data" / "support_faq.jsonl"
    fp = curate_to_workspace(str(faq), ws, format="text").summary.fingerprint
    plan = TrainPlan(task="pretrain", dataset=fp, size="tiny", budget=Budget(steps=steps), **{**TINY, **settings})
    return Path(train(plan, ws, run_id, show_progress=False).final_dir)


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


# ---- a stream of support tickets for the retraining loop (shared with bench/: examples/tickets.py) ----

from examples.tickets import (DEVICES, MENUS, PARTS, SHIFTED, TEMPLATES, poisoned, shifted_rows,  # noqa: E402,F401
                              ticket_base, ticket_rows)
