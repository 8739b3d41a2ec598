"""Run the engine alone: `python -m training <command>`, with no agents, memory or server involved.

    python -m training curate PATH [--workspace DIR] [--format F] [--split 0.8,0.1,0.1]
    python -m training train PLAN [--workspace DIR] [--run-id ID] [--resume] [--dataset FP]
    python -m training estimate PLAN [--workspace DIR] [--dataset FP]
    python -m training eval RUN_ID [--workspace DIR] [--max-examples N]

PLAN is a YAML/JSON file or a recipe name from training/recipes/. `train` works the same under
`torchrun --nproc_per_node N -m training train …` and `accelerate launch -m training train …`.
Results are printed as JSON. Errors print one `error:` line and exit 2 (bad input) or 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.errors import ModelcrewError


def new_run_id(task: str) -> str:
    import secrets
    from datetime import datetime, timezone

    return f"{task}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cur = commands.add_parser("curate", help="curate a dataset into the workspace and print its summary")
    cur.add_argument("path")
    cur.add_argument("--workspace", type=Path, default=Path(".modelcrew"))
    cur.add_argument("--format", default=None)
    cur.add_argument("--split", default="0.8,0.1,0.1")
    cur.add_argument("--encoding", default="utf-8")
    tr = commands.add_parser("train", help="run (or resume) a training plan and print its RunResult")
    tr.add_argument("plan", help="plan file (.yaml/.json) or recipe name")
    tr.add_argument("--workspace", type=Path, default=Path(".modelcrew"))
    tr.add_argument("--run-id", default=None)
    tr.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    tr.add_argument("--dataset", default=None, help="dataset fingerprint (overrides the plan's)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    est = commands.add_parser("estimate", help="parameters, memory and time of a plan; refuses one that cannot fit")
    est.add_argument("plan")
    est.add_argument("--workspace", type=Path, default=Path(".modelcrew"))
    est.add_argument("--dataset", default=None)
    ev = commands.add_parser("eval", help="evaluate a trained run against its base model; writes evaluation.json")
    ev.add_argument("run_id")
    ev.add_argument("--workspace", type=Path, default=Path(".modelcrew"))
    ev.add_argument("--max-examples", type=int, default=24)
    args = parser.parse_args(argv)
    try:
        if args.command == "curate":
            payload = _curate(args)
        elif args.command == "train":
            payload = _train(args)
        elif args.command == "estimate":
            from training.estimate import estimate
            from training.plans import load_plan

            payload = estimate(load_plan(args.plan, dataset=args.dataset), args.workspace).model_dump()
        else:
            from training.evaluate import evaluate_run

            payload = evaluate_run(args.workspace, args.run_id, max_examples=args.max_examples).model_dump()
    except ModelcrewError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if payload is not None:
        print(json.dumps(payload, indent=2, ensure_ascii=False))
    return 0


def _curate(args) -> dict:
    from training.contracts import CurationSettings
    from training.data import curate_to_workspace
    from training.data.split import parse_split

    result = curate_to_workspace(args.path, args.workspace, settings=CurationSettings(split=parse_split(args.split)),
                                 format=args.format, encoding=args.encoding, show_progress=True)
    return result.summary.model_dump(mode="json", by_alias=True)


def _train(args) -> dict | None:
    import os

    from training.errors import InputError
    from training.loop import train
    from training.plans import load_plan

    plan = load_plan(args.plan, dataset=args.dataset)
    if args.resume and not args.run_id:
        raise InputError("--resume: name the run to continue with --run-id")
    run_id = args.run_id or new_run_id(plan.task)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.run_id:
        raise InputError("--run-id: a multi-process run needs an explicit run id (every process must agree on it)")
    result = train(plan, args.workspace, run_id, resume=args.resume, show_progress=not args.quiet)
    return result.model_dump() if int(os.environ.get("RANK", "0")) == 0 else None


if __name__ == "__main__":
    sys.exit(main())
