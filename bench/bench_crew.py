"""Orchestration overhead of a crew run: everything that is not training or evaluation, from a run's trace.

    .venv/bin/python bench/bench_crew.py [--workspace .modelcrew] [--run RUN_ID]   # default: the newest crew run
    .venv/bin/python bench/bench_crew.py --goal "..."                              # run a goal first

With no crew run in the workspace it runs `make demo`'s goal first (`--quick`: the same goal for 10 steps).

Reads the trace (every tool call with its duration) and the crew's result (its wall time: parsing the
goal, the four tasks, recording the deployment) of a `modelcrew run`, e.g. the one `make demo` just
made, and splits the wall time into training (train_model), evaluation (evaluate_model), the other
tools (curation, memory, report, registry), CrewAI with the agents' LLM, goal parsing and the steps
after the crew (deployment record, memory, report). It names the LLM that drove the agents (`offline`:
the rule-based policy, not a language model). Target: overhead (wall minus training and evaluation)
<= 3% of the run's wall time. Writes the bench_crew section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import WORKSPACE, result_json, stamp, write_json, write_section
from common import parse

OUT = result_json("bench_crew")
TARGET = 0.03
DEMO_GOAL = ("Fine-tune smollm2-135m-instruct on examples/data/support_faq.jsonl with LoRA rank 8 for {steps} steps or "
             "6 minutes, so that perplexity ends at least 15% below the base model, and deploy it as support-bot if it passes.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workspace", type=Path, default=WORKSPACE)
    ap.add_argument("--run", default=None)
    ap.add_argument("--goal", default=None)
    ap.add_argument("--quick", action="store_true", help="with no crew run to read, run the demo goal for 10 steps")
    a = parse(ap)
    from training.runs import Run, all_runs

    if not a.goal and not a.run and not any(r.crew_result() for r in all_runs(a.workspace)):
        a.goal = DEMO_GOAL.format(steps=10 if a.quick else 60)
        print(f"bench_crew: no crew run in {a.workspace}: running the demo goal first", file=sys.stderr)
    if a.goal:
        from crews.run import run_goal_text

        run_id = run_goal_text(a.goal, a.workspace)["run_id"]
    else:  # the crew run written last (a run's directory changes with each artefact written into it)
        runs = sorted((r for r in all_runs(a.workspace) if r.crew_result()), key=lambda r: r.dir.stat().st_mtime)
        if a.run:
            runs = [Run(a.workspace, a.run)]
        run_id = runs[-1].run_id
    run = Run(a.workspace, run_id)
    result, events = run.crew_result(), run.trace_rows()
    tools: dict[str, float] = {}
    for e in events:
        if e["kind"] == "tool":
            tools[e["tool"]] = tools.get(e["tool"], 0.0) + e["seconds"]
    if "crew_seconds" not in result:
        sys.exit(f"run {run_id} predates the timing of goal parsing and of the steps after the crew; run the crew again")
    wall, llm = result["wall_seconds"], result["llm"]
    parse_s, after_s = result["parse_seconds"], result["after_seconds"]
    train_s, eval_s = tools.get("train_model", 0.0), tools.get("evaluate_model", 0.0)
    other_tools = sum(v for k, v in tools.items() if k not in ("train_model", "evaluate_model"))
    crew_s = result["crew_seconds"] - sum(tools.values())
    overhead = wall - train_s - eval_s
    llm_shown = f"{llm} (the rule-based offline policy, not a language model)" if llm == "offline" else llm
    # (measure, seconds, decimals shown of the seconds and of the share): every row of the table, its share of the wall time beside it
    rows = [("wall time (goal parsing, the four tasks, recording the deployment)", wall, 1, 0), ("parsing the goal", parse_s, 2, 2),
            ("training (train_model)", train_s, 1, 1), ("evaluation (evaluate_model)", eval_s, 1, 1),
            *((f"tool {name}", secs, 2, 2) for name, secs in sorted(tools.items(), key=lambda kv: -kv[1])
              if name not in ("train_model", "evaluate_model")),
            ("CrewAI and the agents' LLM (outside every tool)", crew_s, 2, 2),
            ("after the crew: deployment record, memory, report", after_s, 2, 2),
            ("**overhead: everything but training and evaluation**", overhead, 1, 2)]
    out = {"run_id": run_id, "goal": result["goal"], "llm": llm, "llm_shown": llm_shown, "wall_s": wall, "parse_s": parse_s,
           "after_s": after_s, "train_s": train_s, "evaluate_s": eval_s,
           "tools_s": tools, "other_tools_s": other_tools, "crew_and_llm_s": crew_s, "overhead_s": overhead,
           "overhead_share": overhead / wall, "crew_share": crew_s / wall, "target_share": TARGET,
           "rows": [{"measure": m, "seconds": v, "share": v / wall} for m, v, _, _ in rows], **stamp()}
    met = out["overhead_share"] <= TARGET
    out["summary"] = [{"target": f"crew orchestration overhead (all but training and evaluation) <= {TARGET:.0%} of a crew "
                                 f"run's wall time, agents driven by {llm}", "figure": f"{out['overhead_share']:.2%} of {wall:.0f} s",
                       "met": met}]
    write_json(OUT, out)
    lines = ["", "## Crew orchestration overhead (`bench/bench_crew.py`)", "",
             f"Generated by `bench/bench_crew.py` from the trace of crew run `{run_id}` (`bench/results/bench_crew.json`). "
             f"The agents were driven by **{llm}**" + (" (the rule-based offline policy, not a language model: a real "
                                                         "LLM's time per step comes on top)." if llm == "offline" else "."), "",
             f"> {result['goal']}", "", "| measure | seconds | share of the wall time |", "|---|---|---|",
             f"| the LLM that drove the agents | {llm_shown} | |"]
    for measure, secs, digits, share_digits in rows:
        share = f"{secs / wall:.{share_digits}%}"
        lines.append(f"| {measure} | {secs:.{digits}f} | {f'**{share}**' if measure.startswith('**') else share} |")
    lines += ["",
              f"Target: overhead <= {TARGET:.0%} of the wall time -> {'MET' if met else 'MISSED'}. Platform: {out['platform']}, "
              f"load average {out['load_avg_end']:.2f} when the section was written.", ""]
    write_section("bench_crew", lines)
    print("\n".join(lines[1:-1]))


if __name__ == "__main__":
    main()
