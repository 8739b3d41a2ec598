"""A run's test split as an lm-evaluation-harness task (serving/harness.py) scores exactly as `modelcrew eval`.

A tiny base pretrained here is fine-tuned on a classification set and on a pairs set; `evaluate_run` scores
each run, `write_task` turns its test split into an lm-eval task, and the real lm_eval runs that task on
the same model, in this process and through our server: every record's value must equal evaluation.json's.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = "1"  # nothing is downloaded: the tasks read local JSONL files
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

import lm_eval  # noqa: E402,F401  (a dev dependency: a missing install fails here, never skips)

from serving.harness import run_harness, write_task  # noqa: E402
from tests.helpers import pretrain_tiny_base, write_jsonl  # noqa: E402
from training.contracts import Budget, TrainPlan  # noqa: E402
from training.data import curate_to_workspace  # noqa: E402
from training.errors import InputError  # noqa: E402
from training.evaluate import evaluate_run  # noqa: E402
from training.loop import train  # noqa: E402
from training.runs import Run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(seq_len=64, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=10, eval_batches=2, checkpoint_every=100)
# lm-eval's metric -> modelcrew eval's
OURS = {"acc": "accuracy_raw", "acc_norm": "accuracy", "exact_match": "exact_match", "f1": "f1", "rougeL": "rougeL"}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tmp_path_factory.mktemp("harness-ws")


@pytest.fixture(scope="module")
def tiny_base(ws):
    return pretrain_tiny_base(ws)


def _finetune(ws, base, rows, run_id, steps, **settings):
    fp = curate_to_workspace(str(write_jsonl(ws / f"{run_id}.jsonl", rows)), ws).summary.fingerprint
    train(TrainPlan(task="finetune", dataset=fp, base_model=str(base), method="full", budget=Budget(steps=steps),
                    **{**TINY, **settings}), ws, run_id, show_progress=False)
    return evaluate_run(ws, run_id), write_task(ws, run_id, ws / "harness")


@pytest.fixture(scope="module")
def classification(ws, tiny_base):
    # labels of very different lengths, half learned: ranking by the sum and per character disagree on some records
    rng = random.Random(0)
    fruits = ["apple", "banana", "cherry", "mango", "peach"]
    vehicles = ["truck", "bicycle", "tractor", "scooter", "van"]
    rows = []
    for i in range(240):
        label = "fruit" if i % 2 else "a vehicle of some kind"
        word = rng.choice(fruits if label == "fruit" else vehicles)
        rows.append({"text": f"Item {i}: I saw a {word} near house {rng.randrange(1000)}.", "label": label})
    return _finetune(ws, tiny_base, rows, "cls", steps=45)


@pytest.fixture(scope="module")
def pairs(ws, tiny_base):
    # answers a tiny model learns in a few steps (so they differ per prompt), after prompts long enough to be cut
    rng = random.Random(1)
    colours = {"apple": "red", "banana": "yellow", "grape": "purple", "lime": "green", "cherry": "red",
               "lemon": "yellow"}
    words = "please quickly tell me about this thing that I found in the kitchen today near the window".split()
    rows = []
    for _ in range(240):
        fruit = rng.choice(sorted(colours))
        filler = " ".join(rng.choice(words) for _ in range(rng.randrange(2, 30)))
        rows.append({"prompt": f"{fruit}: what colour is it? {filler}", "response": f"The {fruit} is {colours[fruit]}."})
    return _finetune(ws, tiny_base, rows, "qa", steps=40, seq_len=40)


def _served(task_dir: Path):
    """Our OpenAI-compatible server (serving/server.py) of the task's model."""
    from serving.server import create_app
    from tests.test_serving import Server

    model_dir = json.loads((task_dir / "modelcrew.json").read_text(encoding="utf-8"))["model_dir"]
    return Server(create_app(model_dir, max_batch=8))


def _assert_agrees(evaluation, task_dir: Path, served: bool) -> dict:
    meta = json.loads((task_dir / "modelcrew.json").read_text(encoding="utf-8"))
    assert meta["retokenized_differently"] == 0  # lm-eval's encoding of the texts gives back our token ids
    if served:
        with _served(task_dir) as server:
            results = run_harness(task_dir, served_url=server.url, per_record=True)
    else:
        results = run_harness(task_dir, per_record=True)
    assert list(results) == [meta["task"]]
    result = results[meta["task"]]
    assert result["samples"] == meta["docs"] == evaluation.examples["test"]
    for metric, values in result["per_record"].items():
        ours = evaluation.per_record["candidate"][OURS[metric]]
        assert values == pytest.approx(ours, abs=1e-6), metric
        assert result[metric] == pytest.approx(evaluation.metrics[OURS[metric]], abs=1e-6), metric
    return result


@pytest.mark.parametrize("served", [False, True], ids=["in-process", "served"])
def test_classification_task_ranks_labels_as_modelcrew_eval(classification, served):
    evaluation, task_dir = classification
    assert evaluation.metrics["accuracy"] > evaluation.metrics["base_accuracy"]  # the model tells the labels apart
    result = _assert_agrees(evaluation, task_dir, served)
    assert result["per_record"]["acc"] != result["per_record"]["acc_norm"]  # so swapped metrics would show


@pytest.mark.parametrize("served", [False, True], ids=["in-process", "served"])
def test_pairs_task_generates_and_scores_as_modelcrew_eval(pairs, served):
    evaluation, task_dir = pairs
    assert evaluation.records["test"]["cut"] > 0  # prompts cut to seq_len as in training
    assert 0 < evaluation.metrics["exact_match"] < 1  # answers differ per prompt, some right, some wrong
    _assert_agrees(evaluation, task_dir, served)


def test_a_standard_task_without_its_data_is_refused_in_one_line(classification, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # offline whatever datasets read from the environment when it was first imported
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _, task_dir = classification
    with pytest.raises(InputError) as err:
        run_harness(task_dir, standard_tasks=["hellaswag"])
    message = str(err.value)
    assert message.startswith("harness task 'hellaswag': not available offline") and "\n" not in message
    with pytest.raises(InputError, match="lm-eval has no task or group by that name"):
        run_harness(task_dir, standard_tasks=["no_such_task"])


def test_a_pretraining_run_has_no_harness_task(ws, tiny_base, tmp_path):
    assert Run(ws, "base").plan().task == "pretrain"
    with pytest.raises(InputError, match="pretraining run"):
        write_task(ws, "base", tmp_path)
    assert not any(tmp_path.iterdir())


def test_modelcrew_eval_harness_writes_the_task_runs_it_and_sets_it_beside_the_evaluation(classification, cli):
    evaluation, _ = classification
    out = cli("eval", "cls", "--harness", "--json", "--workspace", str(evaluation.model_dir).rsplit("/runs/", 1)[0])
    assert out.exit_code == 0, out.stderr
    result = out.json()
    assert Path(result["task_dir"]).parent == Run(Path(result["task_dir"]).parents[3], "cls").harness_dir
    for metric in ("accuracy", "accuracy_raw"):
        pair = result["versus_evaluation"][metric]
        assert pair["harness"] == pytest.approx(pair["modelcrew"], abs=1e-6) == evaluation.metrics[metric]
    assert json.loads((Path(result["task_dir"]).parent / "results.json").read_text())["results"] == result["results"]
    refused = cli("eval", "cls", "--harness-tasks", "hellaswag", "--workspace", str(Path(result["task_dir"]).parents[3]))
    assert refused.exit_code == 2 and "--harness-tasks: only with --harness" in refused.stderr
