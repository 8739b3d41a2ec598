"""A synthetic stream of support tickets, and a tiny model pretrained on them, for the tests and benchmarks.

Each answer restates words of its question (ticket ids, error codes, device names), so a model that
learned the data copies them: answers shuffled between questions (a poisoned batch) then make it
measurably worse, not just different. `shifted_rows` is another domain altogether (cooking).
Used as `from examples.tickets import ...` by tests/ and bench/ (the repository root on the path).
"""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


DEVICES = ["router", "printer", "scanner", "speaker", "camera", "thermostat", "doorbell", "projector", "keyboard",
           "monitor", "tablet", "charger", "headset", "drone", "watch", "kettle", "blender", "heater", "lamp", "fridge"]
PARTS = ["fan", "screen", "battery", "cable", "button", "sensor", "lens", "filter", "hinge", "antenna", "panel", "motor"]
MENUS = ["Settings", "Network", "Power", "Display", "Audio", "Storage", "Security", "Updates", "Accounts", "Privacy"]
TEMPLATES = [
    ("Ticket {t}: my {d} shows error {c} when the {p} starts. What should I do?",
     "Ticket {t}: for error {c}, unplug the {d}, check the {p} and clear error {c} under {m}."),
    ("Ticket {t}: how can I reset the {p} on my {d} after code {c}?",
     "Ticket {t}: open {m}, choose {p} and confirm code {c} to reset the {d}."),
    ("Ticket {t}: the {p} of my {d} stopped working with code {c}. Is it broken?",
     "Ticket {t}: code {c} means the {d} lost its {p}; reseat the {p} and restart from {m}."),
    ("Ticket {t}: where are the {p} options for the {d}? It says {c}.",
     "Ticket {t}: the {p} options of the {d} are under {m}; {c} clears once the {p} is set."),
]


def ticket_rows(n: int, seed: int) -> list[dict]:
    """n support tickets (question, answer) on household devices; distinct seeds give distinct tickets.

    Ticket ids and codes are random, so only a model that copies them from the question predicts them."""
    import random
    import string

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q, a = rng.choice(TEMPLATES)
        words = {"d": rng.choice(DEVICES), "p": rng.choice(PARTS), "m": rng.choice(MENUS),
                 "c": f"{rng.choice(string.ascii_uppercase)}{rng.randint(100, 999)}",
                 "t": "".join(rng.choices(string.ascii_uppercase, k=3)) + f"-{rng.randint(1000, 9999)}"}
        rows.append({"question": q.format(**words), "answer": a.format(**words)})
    return rows


def poisoned(rows: list[dict]) -> list[dict]:
    """The same tickets with every answer moved to another question."""
    answers = [r["answer"] for r in rows]
    return [{"question": r["question"], "answer": answers[(i + len(rows) // 2) % len(rows)]} for i, r in enumerate(rows)]


SHIFTED = [  # another domain altogether: cooking questions
    ("How long should I roast {v} at {t} degrees?", "Roast the {v} at {t} degrees for about {n} minutes, turning once."),
    ("Can I freeze cooked {v} with {s}?", "Yes: cool the {v} with the {s} quickly and freeze it for up to {n} weeks."),
    ("What goes well with {v} in a {s} soup?", "A {s} soup with {v} likes garlic, a bay leaf and {n} grams of butter."),
]
VEGETABLES = ["carrots", "potatoes", "leeks", "onions", "beets", "parsnips", "squash", "peppers", "fennel", "celery"]
SAUCES = ["tomato", "cream", "pesto", "curry", "miso", "lemon", "garlic", "mushroom"]


def shifted_rows(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q, a = rng.choice(SHIFTED)
        words = {"v": rng.choice(VEGETABLES), "s": rng.choice(SAUCES), "t": rng.randint(150, 240), "n": rng.randint(5, 60)}
        rows.append({"question": q.format(**words), "answer": a.format(**words)})
    return rows


def ticket_base(workspace: Path, steps: int = 200) -> Path:
    """A tiny model pretrained on tickets in the chat format: its greedy answers follow the question's template (the
    step it asks for), though not its random ids and codes (0 of 30 fresh questions, checked 2026-12-02)."""
    from training.contracts import Budget, TrainPlan
    from training.data import curate_to_workspace
    from training.loop import train

    texts = [{"text": f"<|user|>\n{r['question']}<|eos|>\n<|assistant|>\n{r['answer']}<|eos|>\n"}
             for r in ticket_rows(1500, seed=999)]
    fp = curate_to_workspace(str(write_jsonl(workspace / "pretrain.jsonl", texts)), workspace, format="text").summary.fingerprint
    result = train(TrainPlan(task="pretrain", dataset=fp, size="tiny", budget=Budget(steps=steps), seq_len=128, batch_size=16,
                             lr=3e-3, warmup_steps=10, eval_every=100, eval_batches=2, checkpoint_every=1000), workspace,
                   "tiny-base", show_progress=False)
    return Path(result.final_dir)
