"""Run the engine alone: `python -m training <command>`, with no agents, memory or server involved.

    python -m training curate PATH [--workspace DIR] [--format F] [--split 0.8,0.1,0.1]

prints the dataset summary as JSON. Errors print one `error:` line and exit 2 (bad input) or 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.errors import ModelcrewError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cur = commands.add_parser("curate", help="curate a dataset into the workspace and print its summary")
    cur.add_argument("path")
    cur.add_argument("--workspace", type=Path, default=Path(".modelcrew"))
    cur.add_argument("--format", default=None)
    cur.add_argument("--split", default="0.8,0.1,0.1")
    cur.add_argument("--encoding", default="utf-8")
    args = parser.parse_args(argv)
    try:
        from training.contracts import CurationSettings
        from training.data import curate_to_workspace
        from training.data.split import parse_split

        result = curate_to_workspace(args.path, args.workspace, settings=CurationSettings(split=parse_split(args.split)),
                                     format=args.format, encoding=args.encoding, show_progress=True)
    except ModelcrewError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(json.dumps(result.summary.model_dump(mode="json", by_alias=True), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
