"""Evaluate what is deployed: a served model scored through HTTP gets the numbers the run got in process."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from serving.remote import evaluate_served
from serving.server import create_app
from tests.helpers import pretrain_tiny_base, write_jsonl
from tests.test_serving import Server
from training.contracts import Budget, TrainPlan
from training.data import curate_to_workspace
from training.evaluate import evaluate_run
from training.loop import train

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(seq_len=64, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=10, eval_batches=2, checkpoint_every=100)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("served-eval")
    pretrain_tiny_base(ws)
    return ws


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-3 * max(1.0, abs(b))


@pytest.mark.parametrize("fmt", ["classification", "pairs"])
def test_a_served_model_scores_what_the_run_scored_in_process(ws, tmp_path, cli, fmt):
    rng = random.Random(0)
    if fmt == "classification":
        rows = [{"text": f"Item {i}: I saw a {rng.choice(['apple', 'pear', 'plum'] if i % 2 else ['truck', 'van', 'bus'])} "
                         f"near house {rng.randrange(1000)}.", "label": "fruit" if i % 2 else "vehicle"} for i in range(120)]
    else:
        colours = [("sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black")]
        rows = [{"prompt": f"Question {i}: what colour is the {colours[i % 4][0]}?", "response": colours[i % 4][1]}
                for i in range(120)]
    fp = curate_to_workspace(str(write_jsonl(tmp_path / f"{fmt}.jsonl", rows)), ws).summary.fingerprint
    base = ws / "runs" / "base" / "final"
    run_id = f"served-{fmt}"
    train(TrainPlan(task="finetune", dataset=fp, base_model=str(base), method="full", budget=Budget(steps=80), **TINY),
          ws, run_id, show_progress=False)
    ev = evaluate_run(ws, run_id)
    with Server(create_app(str(ws / "runs" / run_id / "best"))) as server:
        served = evaluate_served(ws, run_id, server.url, "best")
        out = cli("eval", run_id, "--served", server.url, "--model", "best", "--workspace", str(ws), "--json")
    assert set(served["metrics"]) == {k for k in ev.metrics if not k.startswith("base_")}
    for metric, value in served["metrics"].items():
        assert _close(value, ev.metrics[metric]), (metric, value, ev.metrics[metric])
        assert served["intervals"][metric]["n"] == ev.intervals[metric].n
        assert abs(served["versus_run"][metric]["change"]) <= 1e-3  # the deployed artifact is the one that was gated
    task = "accuracy" if fmt == "classification" else "exact_match"
    assert ev.metrics[task] > 0.5  # a model that learned something, so agreement is not agreement on nothing
    assert out.exit_code == 0 and out.json()["metrics"] == served["metrics"]
    wrong = cli("eval", run_id, "--served", "http://127.0.0.1:9", "--model", "best", "--workspace", str(ws))
    assert wrong.exit_code == 2 and "--served: cannot reach" in wrong.stderr
