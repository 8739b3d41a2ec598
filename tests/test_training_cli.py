"""`modelcrew train / estimate / eval` and `python -m training estimate`: thin wrappers, same contracts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from training.contracts import Evaluation, RunResult
from training.data import curate_to_workspace
from training.plan_files import RECIPES, load_plan

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def text_ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("cli-train")
    fp = curate_to_workspace(str(ROOT / "examples/data/support_faq.jsonl"), ws, format="text").summary.fingerprint
    return ws, fp


def _plan(tmp_path: Path, fp: str, **extra) -> Path:
    fields = dict(task="pretrain", dataset=fp, size="tiny", seq_len=64, batch_size=4, lr=3e-3, warmup_steps=1,
                  budget={"steps": 3}, eval_every=3, eval_batches=1, checkpoint_every=3)
    fields.update(extra)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(fields))
    return path


def test_train_then_eval_from_the_cli(cli, text_ws, tmp_path):
    ws, fp = text_ws
    done = cli("train", _plan(tmp_path, fp), "--run-id", "cli-run", "--json", "--workspace", ws)
    assert done.exit_code == 0, done.stderr
    result = RunResult.model_validate(done.json())
    assert result.steps == 3 and Path(result.final_dir).is_dir()
    assert "run cli-run: completed" in done.stderr
    ev = cli("eval", "cli-run", "--max-examples", "2", "--json", "--workspace", ws)
    assert ev.exit_code == 0, ev.stderr
    assert Evaluation.model_validate(ev.json()).metrics["val_perplexity"] > 1
    again = cli("train", _plan(tmp_path, fp), "--run-id", "cli-run", "--workspace", ws)
    assert again.exit_code == 2 and "already exists" in again.stderr and "--resume" in again.stderr


def test_bad_plan_file_is_one_line(cli, text_ws, tmp_path):
    ws, fp = text_ws
    bad = _plan(tmp_path, fp, lr=-1)
    done = cli("train", bad, "--workspace", ws)
    assert done.exit_code == 2
    assert done.stderr.strip() == f"error: {bad}: lr: Input should be greater than 0"
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: pretrain\n  size: [tiny\n")
    done = cli("train", broken, "--workspace", ws)
    assert done.exit_code == 2 and done.stderr.startswith(f"error: {broken}: not valid YAML")
    missing = cli("train", "no-such-recipe", "--workspace", ws)
    assert missing.exit_code == 2 and "smollm2-lora" in missing.stderr  # it lists the recipes


def test_estimate_reports_and_refuses_what_cannot_fit(cli, text_ws, tmp_path):
    ws, fp = text_ws
    ok = cli("estimate", _plan(tmp_path, fp), "--json", "--workspace", ws)
    assert ok.exit_code == 0, ok.stderr
    est = ok.json()
    assert est["total_params"] == est["trainable_params"] > 500_000
    assert set(est["memory_gb"]) == {"weights", "gradients", "optimizer", "activations", "total"}
    assert est["seconds_per_step"] > 0 and est["steps"] == 3
    huge = _plan(tmp_path, fp, seq_len=512, batch_size=4096)
    refused = cli("estimate", huge, "--workspace", ws)
    assert refused.exit_code == 2
    assert "plan needs about" in refused.stderr and "set grad_accum to" in refused.stderr


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_recipes_are_valid_and_headed_by_their_command(recipe):
    path = RECIPES / f"{recipe}.yaml"
    assert path.read_text().splitlines()[0].startswith("# ") and recipe in path.read_text().splitlines()[0]
    plan = load_plan(recipe, dataset="0123456789abcdef")
    assert plan.dataset == "0123456789abcdef"
    assert json.loads(plan.model_dump_json())["task"] in {"pretrain", "finetune"}
