"""The crew end to end on a tiny model: offline policy, and a scripted OpenAI-protocol server as the LLM."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request

from llm.offline import next_step
from crews.goals import parse_goal
from crews.run import run_goal_text
from memory.store import MemoryStore
from serving.registry import Registry
from steps.context import RunContext
from tools.crew_tools import CurateDatasetTool, EstimatePlanTool, SearchMemoryTool, TrainModelTool
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
    assert all(e["seconds"] >= 0 and not e["result"].startswith('{"error"') for e in events if e["kind"] == "tool")
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


def test_offline_crew_runs_every_agent_through_tools_and_the_deployed_model_is_served(base):
    ws, base_dir = base
    result = run_goal_text(_goal(base_dir, "so that perplexity is at most 100000, deploy as faq-bot"), ws)
    tools = _check_run(ws, result)
    assert set(tools) >= TOOLS_OF
    assert tools[0] == "curate_dataset" and tools.index("train_model") < tools.index("evaluate_model") < tools.index("register_model")
    assert result["gate"]["passed"] is True  # an absolute target far above any perplexity: only forgetting could fail it
    assert result["deployment"] == {"model_name": "faq-bot", "version": "v1", "alias": "production"}
    assert Registry(ws).state("faq-bot").aliases == {"production": "v1"}
    past = MemoryStore(ws).history(fingerprint=result["fingerprint"])
    assert [r.run_id for r in past] == [result["run_id"]] and past[0].deployed is True and past[0].gate == "passed"
    assert list((ws / "crewai").glob("*.db"))  # CrewAI's own storage lives in the workspace
    report = (ws / "runs" / result["run_id"] / "report.md").read_text()
    assert "Deployed as faq-bot@production (v1)." in report and "| deploy |" in report  # re-rendered after deploying
    # ... and `modelcrew serve faq-bot@production` serves what the crew deployed
    from serving.server import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app("faq-bot@production", ws), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(model="faq-bot", messages=[{"role": "user", "content": "How do I descale?"}],
                                               max_tokens=8, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_second_run_reuses_memory_and_an_impossible_target_is_not_deployed(base):
    ws, base_dir = base
    result = run_goal_text(_goal(base_dir, "so that perplexity is at most 1.5, and deploy as faq-bot if it passes"), ws)
    _check_run(ws, result)
    assert result["gate"]["passed"] is False and result["deployment"] is None
    assert result["gate"]["reasons"][0].startswith(f"{result['metric']} ") and "NOT met" in result["gate"]["reasons"][0]
    used = json.loads((ws / "runs" / result["run_id"] / "memory_used.json").read_text())
    assert used["reused_from"] is not None  # the first test's run on the same data
    assert "Memory suggested: the settings of run" in (ws / "runs" / result["run_id"] / "report.md").read_text()


@contextmanager
def served(app):
    """`app` on a free loopback port for the block; yields its /v1 base URL."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scripted_server(decide=next_step, parsed=lambda goal: goal) -> tuple[FastAPI, list]:
    """An OpenAI-protocol chat server that answers with the tool calls a real model would make.

    It decides each step with `decide(messages)` (the offline policy unless a scenario plays an agent) and
    replies as a model does: native `tool_calls` when the request offers tools, else ReAct text. A goal to
    parse is answered with `parsed(goal)` as structured output.
    """
    app, seen = FastAPI(), []
    goals_parsed: list[str] = []
    app.state.goals = goals_parsed

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(body)
        system = next((m["content"] for m in body["messages"] if m["role"] == "system"), "") or ""
        if "[parse goal]" in system:  # structured output: the goal as JSON, as a model would fill the schema
            goal_json = json.dumps(parsed(parse_goal(body["messages"][-1]["content"]).model_dump(mode="json")))
            goals_parsed.append(goal_json)
            return {"id": "chatcmpl-goal", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": goal_json}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}}
        step = decide(body["messages"])
        message: dict = {"role": "assistant", "content": None}
        if isinstance(step, str):  # a raw reply, as a model that breaks the protocol writes it
            message["content"] = step
        elif step.tool and body.get("tools"):
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
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with served(app) as url:
        result = run_goal_text(_goal(base_dir, "and do not deploy"), ws, llm="scripted-model", base_url=url)
    tools = _check_run(ws, result)
    assert set(tools) >= TOOLS_OF - {"register_model", "promote_model"} and "register_model" not in tools
    assert result["deployment"] is None
    assert len(seen) >= 8 and all(b["model"] == "scripted-model" for b in seen)  # every agent step went over HTTP
    assert len(app.state.goals) == 1  # the goal itself was parsed by the LLM (structured output)
    assert any(b.get("tools") for b in seen) or any("Action:" in json.dumps(b["messages"]) for b in seen)


def test_tools_refuse_escapes_bounds_and_unknown_arguments(base, tmp_path):
    ws, base_dir = base
    text = _goal(base_dir, "")
    context = RunContext(ws, parse_goal(text), text, "r1")
    curate = CurateDatasetTool(workspace=ws, context=context)
    assert json.loads(curate.run(data="../../etc/passwd"))["error"].startswith(
        "data: '../../etc/passwd' is not the data the goal names")
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"text": "x"}\n')
    assert json.loads(curate.run(data=str(secret)))["error"].startswith("data:")
    trainer = TrainModelTool(workspace=ws, context=context)
    for bad in ({"fingerprint": "../x"}, {"fingerprint": "0" * 16, "lr": 5.0}, {"fingerprint": "0" * 16, "steps": 0},
                {"fingerprint": "0" * 16, "base_model": "gemma3-270m"}, {"fingerprint": "0" * 16, "lora_rank": 100_000}):
        with pytest.raises(ValueError, match="arguments validation failed"):
            trainer.run(**bad)
    assert json.loads(trainer.run(fingerprint="0" * 16))["error"] == "run r1: no summary yet (curate_dataset first)"


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


def test_approval_stops_at_staging_until_a_person_approves(base, cli):
    ws, base_dir = base
    result = run_goal_text(_goal(base_dir, "so that perplexity is at most 100000, deploy as help-bot after human approval"), ws)
    assert result["gate"]["passed"] and result["deployment"] == {"model_name": "help-bot", "version": "v1", "alias": "staging"}
    assert Registry(ws).state("help-bot").aliases == {"staging": "v1"}
    approved = cli("models", "approve", "help-bot", "v1", "--workspace", str(ws))
    assert approved.exit_code == 0, approved.stderr
    assert Registry(ws).state("help-bot").aliases == {"production": "v1"}


def test_estimate_and_search_tools_answer_in_short_json(base):
    ws, base_dir = base
    text = _goal(base_dir, "")
    summary = curate_to_workspace(str(ROOT / FAQ), ws).summary
    MemoryStore(ws).add_dataset(summary)  # as curate_dataset does
    fp = summary.fingerprint
    estimate = EstimatePlanTool(workspace=ws, context=RunContext(ws, parse_goal(text), text, "r-est", summary=summary))
    est = json.loads(estimate.run(fingerprint=fp, lr=1e-3))
    assert est["plan"]["lr"] == 1e-3 and est["plan"]["lora"]["rank"] == 4 and est["plan"]["base_model"] == str(base_dir)
    assert json.loads(estimate.run(fingerprint=fp, lora_rank=2))["error"].startswith("lora_rank: the goal fixed rank 4")
    assert est["trainable_params"] < est["total_params"] and est["memory_gb"]["total"] > 0
    assert not (ws / "runs" / "r-est").exists()  # estimating trains nothing and leaves no run
    hits = json.loads(SearchMemoryTool(workspace=ws).run(query="support questions", kind="datasets", k=2))["hits"]
    assert hits and hits[0]["id"] == fp and len(json.dumps(hits)) < 2000


def test_a_missed_target_is_tried_again_within_the_budget_and_the_gate_judges_the_pick_once(base, tmp_path):
    """The default configuration under-trains the tiny model; the offline trainer reads each attempt's curve
    and validation perplexity and tries a higher learning rate, within the goal's 60 steps."""
    from training.runs import Run

    ws, base_dir = tmp_path / "ws", base[1]  # a fresh workspace: no memory of the module's other runs
    result = run_goal_text(f"fine-tune the model {base_dir} on {FAQ} with LoRA rank 4 for 60 steps, trying up to 3 "
                           "configurations, so that perplexity ends at least 1.5% below the base model", ws)
    attempts = result["attempts"]
    assert [a["met_on_validation"] for a in attempts] == [False, False, True]
    assert sum(a["steps"] for a in attempts) <= 60 and attempts[1]["lr"] == pytest.approx(3 * attempts[0]["lr"])
    assert result["attempts_ended"] == "the target is met on the validation split"
    assert result["run_id"] == attempts[2]["run_id"]
    # met on validation, judged on test with its interval: the gate's first line is about the target on 14 records
    assert result["gate"]["reasons"][0].startswith("test_perplexity") and "14 test records" in result["gate"]["reasons"][0]
    # the picked attempt alone was evaluated on test and gated; the others were judged on validation only ...
    runs = [Run(ws, a["run_id"]) for a in attempts]
    assert ["test_perplexity" in r.evaluation().metrics for r in runs] == [False, False, True]
    assert [r.gate() is not None for r in runs] == [False, False, True]
    # ... and every attempt is in memory as tried, with its learning rate
    tried = {p.run_id: p.plan.lr for p in MemoryStore(ws).history(fingerprint=runs[2].plan().dataset)}
    assert tried == {a["run_id"]: pytest.approx(a["lr"]) for a in attempts}
    report = Run(ws, result["run_id"]).report_paths()[0].read_text()
    assert "## Attempts" in report and "3 (picked)" in report
    assert "attempt 2 was still improving at the end at lr 0.0006: three times it" in report


def test_when_the_budget_is_spent_the_crew_stops_with_the_best_attempt_and_says_so(base, tmp_path):
    ws, base_dir = tmp_path / "ws", base[1]
    result = run_goal_text(f"fine-tune the model {base_dir} on {FAQ} with LoRA rank 4 for 40 steps, trying up to 2 "
                           "configurations, so that perplexity ends at least 50% below the base model", ws)
    attempts = result["attempts"]
    assert len(attempts) == 2 and sum(a["steps"] for a in attempts) == 40 and not any(a["met_on_validation"] for a in attempts)
    assert result["attempts_ended"] == "the step budget is spent (0 left)"
    best = min(attempts, key=lambda a: a["val_perplexity"])
    assert result["run_id"] == best["run_id"] and result["gate"]["passed"] is False


def test_the_offline_trainer_skips_rates_memory_says_were_tried_and_sizes_steps_to_the_budget():
    from llm.offline import next_configuration

    improving = {"attempt": 1, "of": 3, "lr": 2e-4, "curve": "still improving at the end", "steps_that_fit": 40,
                 "tried_lrs": [2e-4, 6e-4]}
    chosen = next_configuration("f" * 16, improving)
    assert chosen["lr"] == pytest.approx(1.8e-3) and chosen["steps"] == 20  # 6e-4 was tried: on to 1.8e-3; 40 over 2
    assert "past rates memory says were tried (0.0002, 0.0006)" in chosen["reason"]
    overfit = {**improving, "attempt": 2, "lr": 9e-4, "curve": "overfitting: validation loss was best early and then rose",
               "tried_lrs": [], "steps_that_fit": 12}
    chosen = next_configuration("f" * 16, overfit)
    assert chosen["lr"] == pytest.approx(3e-4) and chosen["steps"] == 12
    assert chosen["reason"] == "attempt 2 was overfitting at lr 0.0009: a third of it"
