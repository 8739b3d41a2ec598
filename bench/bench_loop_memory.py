"""Does memory make the retraining loop reach its goal sooner? The same rounds with memory on and off.

    .venv/bin/python bench/bench_loop_memory.py [--rounds 6] [--target 0.4] [--steps 20,60]

A tiny model is pretrained on support tickets (as in tests/test_loop.py); then, in two fresh workspaces,
`--rounds` batches of 40 new tickets arrive one at a time and the loop runs one round per batch (offline
crew, one check each) under the goal "full fine-tune for `--steps` steps so that perplexity ends at least
`--target` (40%) below the base model, deploy if it passes" (relative to the base on the same test set, so
the goal does not move as the evaluation set grows), once per step budget in `--steps` (a tight and an ample one). With
memory on, the trainer plans from the earlier runs it finds in Chroma (reusing what passed, trying the
next learning rate after a miss); with memory off (`--no-memory`) it plans every round from the defaults.
Prints, per arm, each round's learning rate and test perplexity, and the rounds and compute (training
steps and seconds) spent until the goal was first met.
Writes the bench_loop_memory section of bench/RESULTS.md and bench/results/bench_loop_memory.json.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from common import git_commit, result_json, ticket_base, ticket_rows, write_json, write_jsonl, write_section


def run_arm(root: Path, base: Path, memory: bool, rounds: int, target: float, steps: int) -> list[dict]:
    from crews.loop import run_loop
    from crews.loop_state import LoopSettings
    from training.runs import Run

    ws, watch = root / ("memory-on" if memory else "memory-off"), root / f"inbox-{'on' if memory else 'off'}"
    watch.mkdir(parents=True)
    goal = (f"fine-tune the model {base} with a full fine-tune for {steps} steps so that perplexity ends at least "
            f"{target:.0%} below the base model, deploy as desk-bot if it passes")
    settings = LoopSettings(goal_text=goal, watch=str(watch), every_s=1, replay=0.2, use_memory=memory)
    rows = []
    for i in range(1, rounds + 1):
        write_jsonl(watch / f"batch{i}.jsonl", ticket_rows(40, seed=i))
        started = time.perf_counter()
        state = run_loop(ws, settings, once=True, echo=lambda line: None)
        r = state.rounds[-1]
        run = Run(ws, r.run_id)
        result, plan = run.result(), run.plan()
        lr, steps_done = (plan.lr if plan else None), (result.steps if result else 0)
        rows.append({"round": r.number, "lr": lr, "steps": steps_done,
                     "train_seconds": result.wall_seconds if result else 0.0, "round_seconds": round(time.perf_counter() - started, 1),
                     "test_perplexity": r.candidate, "passed": bool(r.passed), "deployed": r.deployed, "error": r.error})
        print(f"memory {'on ' if memory else 'off'} round {i}: lr {lr}, {steps_done} steps, "
              f"test perplexity {r.candidate}, {'passed' if r.passed else 'missed'} {r.error or ''}", flush=True)
    return rows


def num(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def verdict(row: dict) -> str:
    return "failed: " + row["error"] if row.get("error") and row["test_perplexity"] is None else (
        "passed" if row["passed"] else "missed")


def to_goal(rows: list[dict]) -> dict:
    for i, row in enumerate(rows):
        if row["passed"]:
            done = rows[: i + 1]
            return {"reached": True, "rounds": row["round"], "steps": sum(r["steps"] for r in done),
                    "train_seconds": round(sum(r["train_seconds"] for r in done), 1)}
    return {"reached": False, "rounds": len(rows), "steps": sum(r["steps"] for r in rows),
            "train_seconds": round(sum(r["train_seconds"] for r in rows), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--target", type=float, default=0.4, help="how far below the base's test perplexity the goal asks for")
    ap.add_argument("--steps", default="20,60", help="training steps per round, one scenario each")
    a = ap.parse_args()
    from llm.env import quiet_crewai

    budgets = [int(x) for x in a.steps.split(",")]
    root = Path(tempfile.mkdtemp(prefix="bench-loop-memory-"))
    scenarios = {}
    try:
        quiet_crewai(root)
        base = ticket_base(root / "base")
        for steps in budgets:
            arms = {name: run_arm(root / f"steps-{steps}", base, name == "on", a.rounds, a.target, steps) for name in ("on", "off")}
            scenarios[steps] = {"arms": arms, "goal": {name: to_goal(rows) for name, rows in arms.items()}}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write_json(result_json("bench_loop_memory"), {"args": vars(a), "scenarios": scenarios})
    report(a, scenarios)


def report(a, scenarios: dict) -> None:

    def cell(g: dict) -> str:
        return (f"{g['rounds']} rounds, {g['steps']} steps, {g['train_seconds']} s" if g["reached"]
                else f"not reached in {g['rounds']} rounds ({g['steps']} steps, {g['train_seconds']} s spent)")

    def fewer(g: dict) -> bool:
        on, off = g["on"], g["off"]
        return on["reached"] and (not off["reached"] or on["rounds"] < off["rounds"])

    def judged(g: dict) -> str:
        if g["off"]["reached"] and g["off"]["rounds"] == 1:
            return "nothing to gain: the defaults reach the goal in the first round"
        return "MET" if fewer(g) else "MISSED"

    lines = ["", "## Retraining loop: memory on vs off (`bench/bench_loop_memory.py`)", "",
             (f"A tiny model pretrained on support tickets; {a.rounds} batches of 40 new tickets arrive one per round; goal: "
              f"full fine-tune, N steps a round, test perplexity at least {a.target:.0%} below the base model's, deploy if it passes (replay 0.2, "
              "offline crew). Memory on: the trainer plans from earlier runs in Chroma (reuse what passed, next learning "
              "rate after a miss). Memory off: defaults every round (lr 5e-05 for a full fine-tune). Nothing is "
              "deployed before the goal is met, so until then every round starts from the base model."), ""]
    for steps, sc in scenarios.items():
        arms, goal = sc["arms"], sc["goal"]
        lines += [f"**{steps} steps a round**", "",
                  "| round | memory on: lr | test ppl | verdict | memory off: lr | test ppl | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for x, y in zip(arms["on"], arms["off"]):
            lines.append(f"| {x['round']} | {num(x['lr'], '.3g')} | {num(x['test_perplexity'], '.4g')} | {verdict(x)} | "
                         f"{num(y['lr'], '.3g')} | {num(y['test_perplexity'], '.4g')} | {verdict(y)} |")
        lines += ["", "| to reach the goal | rounds and compute |", "|---|---|",
                  f"| memory on | {cell(goal['on'])} |", f"| memory off | {cell(goal['off'])} |",
                  f"| memory on needs fewer rounds | {judged(goal)} |", ""]
    verdicts = "; ".join(f"{steps} steps a round: {judged(sc['goal'])}" for steps, sc in scenarios.items())
    lines += [f"Target (memory on needs fewer rounds): {verdicts}.", "",
              f"Commit {git_commit()}, {datetime.now(timezone.utc).isoformat(timespec='seconds')}.", ""]
    write_section("bench_loop_memory", lines)
    print("\n".join(lines[1:-1]))


if __name__ == "__main__":
    main()
