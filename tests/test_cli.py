"""The CLI contract: --version, --json on stdout with human text on stderr, --workspace/env, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import qa_rows, write_jsonl
from training.contracts import DatasetSummary

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "data" / "support_faq.jsonl"


def test_version(cli):
    from importlib.metadata import version

    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"modelcrew {version('modelcrew')}"


def test_inspect_json_is_pure_json_on_stdout_and_stored(cli, ws):
    result = cli("data", "inspect", EXAMPLE, "--json", "--workspace", ws)
    assert result.exit_code == 0, result.stderr
    payload = result.json()
    summary = DatasetSummary.model_validate(payload)
    assert Path(payload["path"]) == ws / "datasets" / summary.fingerprint
    stored = json.loads((Path(payload["path"]) / "summary.json").read_text())
    assert stored["fingerprint"] == summary.fingerprint and stored["records_after"] == summary.records_after
    assert "dataset " + summary.fingerprint in result.stderr  # the human table went to stderr


def test_example_dataset_shows_curation_at_work(cli, ws):
    s = DatasetSummary.model_validate(cli("data", "inspect", EXAMPLE, "--json", "--workspace", ws).json())
    assert s.records_in >= 150 and s.format == "pairs"
    assert s.removed["exact_duplicate"] >= 2 and s.removed["near_duplicate"] >= 3
    assert s.pii["email"] >= 1 and s.pii["phone"] >= 1 and s.pii["card"] >= 1 and s.pii["ip"] >= 1
    assert "coffee" in s.description


def test_human_output_goes_to_stdout_without_json(cli, ws, tmp_path):
    result = cli("data", "inspect", write_jsonl(tmp_path / "d.jsonl", qa_rows(6)), "--workspace", ws)
    assert result.exit_code == 0
    assert "records" in result.stdout and "6 kept" in result.stdout


def test_data_list(cli, ws, tmp_path):
    assert cli("data", "list", "--json", "--workspace", ws).json() == []
    cli("data", "inspect", write_jsonl(tmp_path / "a.jsonl", qa_rows(6)), "--workspace", ws)
    cli("data", "inspect", write_jsonl(tmp_path / "b.jsonl", qa_rows(9)), "--workspace", ws)
    listed = cli("data", "list", "--json", "--workspace", ws).json()
    assert sorted(d["records_after"] for d in listed) == [6, 9]
    human = cli("data", "list", "--workspace", ws)
    assert all(d["fingerprint"][:8] in human.stdout for d in listed)


def test_workspace_from_environment(cli, tmp_path):
    ws = tmp_path / "from-env"
    result = cli("data", "inspect", write_jsonl(tmp_path / "d.jsonl", qa_rows(6)), "--json",
                 env={"MODELCREW_WORKSPACE": str(ws)})
    assert result.exit_code == 0
    assert Path(result.json()["path"]).parent.parent == ws


def test_workspace_that_is_a_file(cli, tmp_path):
    ws = tmp_path / "file"
    ws.write_text("x")
    result = cli("data", "list", "--workspace", ws)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: --workspace {ws}: exists and is not a directory"


def test_runtime_failure_is_one_line_with_exit_1_and_debug_shows_traceback(cli, ws, tmp_path, monkeypatch):
    import training.data.store as store

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store, "write_jsonl", broken)
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(6))
    result = cli("data", "inspect", path, "--workspace", ws)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == ["error: OSError: disk full (run again with --debug for the traceback)"]
    # nothing half-written is left: no dataset directory, no temporary directory
    assert list((ws / "datasets").iterdir()) == []
    debug = cli("data", "inspect", path, "--workspace", ws, "--debug")
    assert isinstance(debug.exception, OSError)


def test_tokenizer_option_counts_tokens_with_a_local_tokenizer(cli, ws, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rows = qa_rows(12)
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([r["question"] + " " + r["answer"] for r in rows],
                            trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    result = cli("data", "inspect", write_jsonl(tmp_path / "d.jsonl", rows), "--tokenizer", tmp_path / "tok",
                 "--json", "--workspace", ws)
    assert result.exit_code == 0, result.stderr
    lengths = result.json()["lengths_tokens"]
    assert lengths["unit"] == str(tmp_path / "tok")
    assert 0 < lengths["total"] < result.json()["lengths_chars"]["total"] / 2  # BPE tokens span several chars
    bad = cli("data", "inspect", tmp_path / "d.jsonl", "--tokenizer", tmp_path / "missing-tok", "--workspace", tmp_path / "ws2")
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --tokenizer: cannot load tokenizer")


def test_console_script_help_and_error_exit_codes(tmp_path):
    exe = Path(sys.executable).parent / "modelcrew"
    env = {**os.environ, "COLUMNS": "200"}
    helped = subprocess.run([exe, "data", "inspect", "--help"], capture_output=True, text=True, env=env)
    assert helped.returncode == 0
    for flag in ("--workspace", "--json", "--debug", "--split", "--format", "--columns", "--encoding"):
        assert flag in helped.stdout
    failed = subprocess.run([exe, "data", "inspect", tmp_path / "missing.jsonl", "--workspace", tmp_path / "ws"],
                            capture_output=True, text=True, env=env)
    assert failed.returncode == 2
    assert failed.stderr == f"error: {tmp_path / 'missing.jsonl'}: no such file or directory\n"
    assert not (tmp_path / "ws").exists()


def test_training_runs_alone_as_a_module(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(8))
    done = subprocess.run([sys.executable, "-m", "training", "data", "inspect", path, "--no-memory", "--json",
                           "--workspace", tmp_path / "ws"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    summary = DatasetSummary.model_validate({k: v for k, v in body.items() if k != "path"})
    assert (tmp_path / "ws" / "datasets" / summary.fingerprint / "train.jsonl").exists()
    assert not (tmp_path / "ws" / "memory").exists()  # --no-memory: the engine alone
    bad = subprocess.run([sys.executable, "-m", "training", "data", "inspect", tmp_path / "none.jsonl"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr == f"error: {tmp_path / 'none.jsonl'}: no such file or directory\n"


def _options(command) -> dict[str, list]:
    """name -> its parameters' flags, for every (sub)command of a click command."""
    out = {}
    for name, sub in getattr(command, "commands", {}).items():
        if hasattr(sub, "commands"):
            out.update({f"{name} {k}": v for k, v in _options(sub).items()})
        else:
            out[name] = sorted(tuple(p.opts) for p in sub.params)
    return out


def test_python_m_training_and_modelcrew_share_the_engine_commands_and_their_options():
    import typer

    from cli import app, engine_app

    engine, everything = _options(typer.main.get_command(engine_app)), _options(typer.main.get_command(app))
    assert set(engine) == {"data inspect", "data list", "train", "estimate", "eval"}
    assert {name: everything[name] for name in engine} == engine
    listed = subprocess.run([sys.executable, "-m", "training", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert listed.returncode == 0 and all(name in listed.stdout for name in ("data", "train", "estimate", "eval"))
    assert "run" not in listed.stdout.split() and "loop" not in listed.stdout.split()  # the crew is not the engine
