"""The crew end to end on a tiny model: offline policy, and a scripted OpenAI-protocol server as the LLM."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request

from agents.offline import next_step
from crews.goals import parse_goal
from crews.run import run_goal
from memory.store import MemoryStore
from serving.registry import Registry
from tools.crew_tools import CurateDatasetTool, TrainModelTool
from training.contracts import Budget, Evaluation, GateVerdict, TrainPlan
from training.data import curate_to_workspace
from training.gate import gate
from training.loop import train

ROOT = Path(__file__).resolve().parent.parent
FAQ = "examples/data/support_faq.jsonl"
AGENTS = {"Data curator", "Trainer", "Evaluator", "Deployer"}
TOOLS_OF = {"curate_dataset", "search_memory", "train_model", "evaluate_model", "compare_with_history", "write_report",
            "register_model", "promote_model"}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    ws = tmp_path_factory.mktemp("crew-ws")
    fp = curate_to_workspace(str(ROOT / FAQ), ws, format="text").summary.fingerprint
    result = train(TrainPlan(task="pretrain", dataset=fp, size="tiny", budget=Budget(steps=8), seq_len=64, batch_size=4,
                             lr=3e-3, warmup_steps=2, eval_every=4, eval_batches=2, checkpoint_every=4), ws, "tiny-base",
                   show_progress=False)
    return ws, Path(result.final_dir)


def _goal(base_dir: Path, extra: str) -> str:
    return f"fine-tune the model {base_dir} on {FAQ} with LoRA rank 4 for 6 steps {extra}"


def _check_run(ws: Path, result: dict) -> list[dict]:
    run_dir = ws / "runs" / result["run_id"]
    for name in ("plan.json", "result.json", "evaluation.json", "gate.json", "report.md", "deployment.json", "trace.jsonl",
                 "best/model.safetensors", "final/lineage.json"):
        assert (run_dir / name).exists(), name
    events = [json.loads(line) for line in (run_dir / "trace.jsonl").read_text().splitlines()]
    tools = [e["tool"] for e in events if e["kind"] == "tool"]
    tasks = [e["agent"].strip() for e in events if e["kind"] == "task"]
    assert tasks == ["Data curator", "Trainer", "Evaluator", "Deployer"]
    assert all(e["seconds"] >= 0 and not e["result"].startswith("error") for e in events if e["kind"] == "tool")
    # the verdict agrees with the numbers: recomputed here from the artefacts, by the same code path
    ev = Evaluation.model_validate_json((run_dir / "evaluation.json").read_text())
    verdict = GateVerdict.model_validate_json((run_dir / "gate.json").read_text())
    goal = parse_goal(result["goal"])
    assert gate(goal, ev) == verdict
    assert result["gate"] == {"passed": verdict.passed, "reasons": verdict.reasons}
    assert result["value"] == ev.metrics[result["metric"]] and result["base_value"] == ev.metrics["base_" + result["metric"]]
    assert result["val_perplexity"] == ev.metrics["val_perplexity"]
    assert f"> {result['goal']}" in (run_dir / "report.md").read_text()
    return tools


def test_offline_crew_runs_every_agent_through_tools(base):
    ws, base_dir = base
    result = run_goal(_goal(base_dir, "so perplexity beats the base model, deploy as faq-bot"), ws)
    tools = _check_run(ws, result)
    assert set(tools) >= TOOLS_OF
    assert tools[0] == "curate_dataset" and tools.index("train_model") < tools.index("evaluate_model") < tools.index("register_model")
    verdict = result["gate"]["passed"]
    state = Registry(ws).state("faq-bot")
    if verdict:
        assert result["deployment"] == {"model_name": "faq-bot", "version": "v1", "alias": "production"}
        assert state.aliases == {"production": "v1"}
    else:
        assert state.aliases.get("production") is None
    past = MemoryStore(ws).history(fingerprint=result["fingerprint"])
    assert [r.run_id for r in past] == [result["run_id"]] and past[0].deployed is verdict


def test_a_second_run_reuses_memory_and_an_impossible_target_is_not_deployed(base):
    ws, base_dir = base
    result = run_goal(_goal(base_dir, "so that perplexity is at most 1.5, and deploy as faq-bot if it passes"), ws)
    _check_run(ws, result)
    assert result["gate"]["passed"] is False and result["deployment"] is None
    assert result["gate"]["reasons"][0].startswith(f"{result['metric']} ") and "NOT met" in result["gate"]["reasons"][0]
    used = json.loads((ws / "runs" / result["run_id"] / "memory_used.json").read_text())
    assert used["reused_from"] is not None  # the first test's run on the same data
    assert "memory suggested: the settings of run" in (ws / "runs" / result["run_id"] / "report.md").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scripted_server() -> tuple[FastAPI, list]:
    """An OpenAI-protocol chat server that answers with the tool calls a real model would make.

    It decides each step with the offline policy and replies as a model does: native `tool_calls`
    when the request offers tools, else ReAct text.
    """
    app, seen = FastAPI(), []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(body)
        step = next_step(body["messages"])
        message: dict = {"role": "assistant", "content": None}
        if step.tool and body.get("tools"):
            message["tool_calls"] = [{"id": f"call_{len(seen)}", "type": "function",
                                      "function": {"name": step.tool, "arguments": json.dumps(step.args)}}]
        elif step.tool:
            message["content"] = f"Thought: {step.thought}\nAction: {step.tool}\nAction Input: {json.dumps(step.args)}"
        else:
            message["content"] = json.dumps(step.final) if body.get("tools") else \
                f"Thought: done\nFinal Answer: {json.dumps(step.final)}"
        return {"id": f"chatcmpl-{len(seen)}", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}}

    return app, seen


def test_the_real_llm_path_against_a_scripted_openai_server(base, monkeypatch):
    ws, base_dir = base
    app, seen = scripted_server()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        result = run_goal(_goal(base_dir, "and do not deploy"), ws, llm="scripted-model", base_url=f"http://127.0.0.1:{port}/v1")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    tools = _check_run(ws, result)
    assert set(tools) >= TOOLS_OF - {"register_model", "promote_model"} and "register_model" not in tools
    assert result["deployment"] is None
    assert len(seen) >= 8 and all(b["model"] == "scripted-model" for b in seen)  # every agent step went over HTTP


def test_tools_refuse_escapes_bounds_and_unknown_arguments(base, tmp_path):
    ws, base_dir = base
    goal = parse_goal(_goal(base_dir, ""))
    curate = CurateDatasetTool(workspace=ws, goal=goal, run_id="r1")
    assert curate.run(data="../../etc/passwd").startswith("error: data: '../../etc/passwd' is not the data the goal names")
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"text": "x"}\n')
    assert curate.run(data=str(secret)).startswith("error: data:")
    trainer = TrainModelTool(workspace=ws, goal=goal, run_id="r1")
    for bad in ({"fingerprint": "../x"}, {"fingerprint": "0" * 16, "lr": 5.0}, {"fingerprint": "0" * 16, "steps": 0},
                {"fingerprint": "0" * 16, "base_model": "gemma3-270m"}, {"fingerprint": "0" * 16, "lora_rank": 100_000}):
        with pytest.raises(ValueError, match="arguments validation failed"):
            trainer.run(**bad)
    assert trainer.run(fingerprint="0" * 16).startswith("error: 0000000000000000: no such dataset")


def test_cli_run_prints_one_json_object(base, cli):
    ws, base_dir = base
    out = cli("run", _goal(base_dir, "and never deploy"), "--json", "--workspace", str(ws))
    assert out.exit_code == 0, out.stderr
    body = out.json()
    assert {"run_id", "goal", "fingerprint", "base_val_perplexity", "val_perplexity", "metric", "base_value", "value",
            "gate", "deployment", "report"} <= set(body)
    assert body["deployment"] is None and set(body["gate"]) == {"passed", "reasons"}
    assert Path(body["report"]).exists() and "curate_dataset" in out.stderr  # live steps go to stderr with --json
    refused = cli("run", "fine-tune smollm2 to be better", "--json", "--workspace", str(ws))
    assert refused.exit_code == 2 and refused.stderr.strip().startswith("error: data: the goal names no data")
