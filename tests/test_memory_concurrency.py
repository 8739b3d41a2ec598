"""Memory's embedded store under concurrency: two processes curating and searching one workspace at once.

Before readers took a shared lock, a `data inspect` whose contamination check read the index while the
other process wrote it failed with chromadb's `InternalError: Error finding id` (7 of 8 paired runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.helpers import TOPICS, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
PAIRS = 10  # inspects (and searches) per process: 20 inspects and 20 searches in all

# One process: `modelcrew data inspect` of its own files, each followed by `modelcrew memory search`,
# through the CLI (in-process runner, so the embedding model loads once per process). One embedding
# thread each: two processes on a shared machine then don't wait on each other's thread pools.
WORKER = textwrap.dedent("""
    import json, sys
    from typer.testing import CliRunner
    from cli import app
    ws, files = sys.argv[1], sys.argv[2:]
    runner = CliRunner()
    for i, path in enumerate(files):
        for args in (["data", "inspect", path], ["memory", "search", f"how do I {i}", "--kind", "eval_records", "--k", "3"]):
            result = runner.invoke(app, [*args, "--workspace", ws, "--json"])
            if result.exit_code != 0:
                print(json.dumps({"step": i, "args": args, "exit": result.exit_code, "stderr": result.stderr[-1500:]}), flush=True)
                sys.exit(1)
        print(json.dumps({"step": i, "hits": len(json.loads(result.stdout))}), flush=True)
""")


def _dataset(path: Path, tag: str, i: int) -> Path:
    """A small FAQ of its own (distinct fingerprint), with validation and test records to check against."""
    rows = [{"question": f"[{tag}{i}] How do I {topic}? (case {j})",
             "answer": f"For request {tag}{i}-{j}: to {topic}, open Settings and follow step {j + 1}; it takes {i + j + 2} minutes."}
            for j, topic in enumerate(TOPICS[:20])]
    return write_jsonl(path / f"{tag}{i}.jsonl", rows)


def test_paired_inspects_and_searches_on_one_workspace_all_succeed_and_memory_stays_consistent(tmp_path, cli):
    ws = tmp_path / "ws"
    workers = []
    for tag in ("a", "b"):
        files = [str(_dataset(tmp_path, tag, i)) for i in range(PAIRS)]
        workers.append(subprocess.Popen([sys.executable, "-c", WORKER, str(ws), *files], cwd=ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env={**os.environ, "MODELCREW_EMBED_THREADS": "1"}))
    for worker in workers:
        out, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, (out[-3000:], err[-2000:])
        steps = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert [s["step"] for s in steps] == list(range(PAIRS))
        assert steps[-1]["hits"] == 3  # the last search found records (its own dataset's at least)

    doctor = cli("memory", "doctor", "--workspace", str(ws), "--json")
    assert doctor.exit_code == 0, doctor.stdout
    checks = {c["name"]: c for c in doctor.json()["checks"]}
    assert checks["count datasets"]["detail"].startswith(f"{2 * PAIRS} indexed, {2 * PAIRS} in the artefacts")
    assert all(c["ok"] for c in checks.values())
