"""`offline`: the agents' default LLM — a deterministic, rule-based policy, not a language model.

It reads what CrewAI sends an LLM (the task's description with the goal as JSON, the context of the
earlier tasks, the tool results so far) and answers in CrewAI's ReAct format with real tool calls whose
arguments come from the goal, then a final answer in JSON. The same crew, tools and engine run as with a
real model, with no network. It does not understand language: a goal is parsed by `crews.goals`
before the crew starts, and this policy only follows each task's fixed sequence of tools.

`next_step(messages)` is the whole policy; `OfflineLLM` renders it as ReAct text, and the test's
scripted OpenAI-protocol server renders the same steps as OpenAI tool calls.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from crewai.llms.base_llm import BaseLLM


class PolicyError(RuntimeError):
    """A tool failed in a way the policy cannot work around: the crew stops with this message."""


@dataclass
class Step:
    thought: str
    tool: str | None = None  # None: a final answer
    args: dict | None = None
    final: dict | None = None


def _text(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else str(message)
    if isinstance(content, list):  # content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def _json_objects(text: str) -> list[dict]:
    """Every top-level JSON object in `text`, in order."""
    found, decoder, i = [], json.JSONDecoder(), 0
    while (i := text.find("{", i)) != -1:
        try:
            obj, end = decoder.raw_decode(text[i:])
            if isinstance(obj, dict):
                found.append(obj)
            i += max(end, 1)
        except ValueError:
            i += 1
    return found


def _observations(messages: list) -> list[tuple[str, str]]:
    """(tool name, result text) of every tool call so far, in order, from ReAct text or tool messages."""
    seen, names = [], {}
    for m in messages:
        if not isinstance(m, dict):
            continue
        text = _text(m)
        for call in m.get("tool_calls") or []:  # native function calling: remember which id called what
            fn = call.get("function", {}) if isinstance(call, dict) else {}
            names[call.get("id") if isinstance(call, dict) else None] = fn.get("name", "")
        if m.get("role") == "tool":
            seen.append((m.get("name") or names.get(m.get("tool_call_id"), ""), text))
        elif m.get("role") == "assistant" and not m.get("tool_calls"):
            action = re.search(r"Action:\s*([\w-]+)", text)
            obs = text.split("Observation:", 1)
            if action and len(obs) == 2:
                seen.append((action.group(1), obs[1].strip()))
    return seen


def _tool_json(result: str) -> dict:
    if result.startswith("error:"):
        raise PolicyError(result.removeprefix("error:").strip())
    objects = _json_objects(result)
    return objects[0] if objects else {"text": result}


def next_step(messages: list) -> Step:
    task_text = "\n".join(_text(m) for m in messages if isinstance(m, dict) and m.get("role") == "user")
    marker = re.search(r"\[task: (\w+)\]", task_text)
    if not marker:
        raise PolicyError("the offline policy drives modelcrew's own tasks only (no [task: ...] marker found)")
    goal = next(o for o in _json_objects(task_text.split("Goal (JSON):", 1)[1]) if "task" in o and "data" in o)
    run_id = re.search(r"Run id:\s*(\S+)", task_text).group(1)
    context = ""
    for heading in ("context you're working with", "Earlier steps (JSON):"):  # a crew's context, or a Flow step's
        if heading in task_text:
            context = task_text.split(heading, 1)[1]
    done = _observations(messages)
    calls = [name for name, _ in done]
    results = {name: _tool_json(text) for name, text in done}
    return {"curate": _curate, "train": _train, "evaluate": _evaluate, "deploy": _deploy}[marker.group(1)](
        goal, run_id, _json_objects(context), calls, results, done)


def _curate(goal, run_id, context, calls, results, done) -> Step:
    if "curate_dataset" not in calls:
        args = {"data": goal["data"]}
        if goal.get("format"):
            args["format"] = goal["format"]
        return Step("I curate the data the goal names.", "curate_dataset", args)
    r = results["curate_dataset"]
    return Step("The dataset is curated and fingerprinted.", final={
        "fingerprint": r["fingerprint"], "records_after": r["records_after"], "contaminated": r["contaminated"],
        "similar": [s["fingerprint"] for s in r.get("similar", [])]})


def _from_context(context: list[dict], key: str):
    return next((c[key] for c in reversed(context) if key in c), None)


def _train(goal, run_id, context, calls, results, done) -> Step:
    fingerprint = _from_context(context, "fingerprint")
    if fingerprint is None:
        raise PolicyError("the training task got no dataset fingerprint from the curation task")
    if "search_memory" not in calls:
        return Step("I look for earlier runs on similar data.", "search_memory",
                    {"query": f"{goal['method']} {goal['task']} of {goal.get('base_model') or 'a new model'} on data like "
                              f"{goal['data']}", "kind": "evaluations", "k": 3})
    if "train_model" not in calls:
        return Step("I train within the goal's budget; the plan starts from memory's best config when there is one.",
                    "train_model", {"fingerprint": fingerprint})
    r = results["train_model"]
    return Step("Training finished.", final={"run_id": r["run_id"], "status": r["status"], "steps": r["steps"],
                                            "best_val_loss": r["best_val_loss"], "reused_from": r.get("reused_from")})


def _evaluate(goal, run_id, context, calls, results, done) -> Step:
    if "evaluate_model" not in calls:
        return Step("I evaluate the run beside its base and apply the gate.", "evaluate_model", {"run_id": run_id})
    if "compare_with_history" not in calls:
        return Step("I compare the run with earlier runs on this data.", "compare_with_history", {"run_id": run_id})
    ev = results["evaluate_model"]
    gate = ev["gate"]
    if "write_report" not in calls:
        metrics = ev["metrics"]
        key = gate["metric"]
        base = metrics.get(f"base_{key}")
        lesson = (f"{goal['method']} on {goal.get('base_model') or 'a model from scratch'} with data {goal['data']}: "
                  f"{key} {metrics.get(key)} vs base {base}; gate {'passed' if gate['passed'] else 'failed'}")
        return Step("I write the report and keep one lesson.", "write_report", {"run_id": run_id, "lesson": lesson})
    return Step("The run is evaluated and reported.", final={
        "run_id": run_id, "metric": gate["metric"], "value": gate.get("value"), "passed": gate["passed"],
        "reasons": gate["reasons"], "report": results["write_report"]["report"]})


def _deploy(goal, run_id, context, calls, results, done) -> Step:
    passed = _from_context(context, "passed")
    name = goal.get("model_name")
    if goal["deploy"] == "never":
        return Step("The goal says not to deploy.", final={"deployed": False, "reason": "the goal says never deploy"})
    if goal["deploy"] == "if_passed" and not passed:
        return Step("The gate failed, so nothing is deployed.", final={"deployed": False, "model_name": name,
                                                                     "reason": "the gate failed"})
    if "register_model" not in calls:
        return Step("I register the run's best model.", "register_model", {"model_name": name, "run_id": run_id})
    registered = dict(done)["register_model"]
    if registered.startswith("error:"):
        raise PolicyError(registered.removeprefix("error:").strip())
    version = re.search(r"\b(v\d+)\b", registered).group(1)
    promotions = [text for tool, text in done if tool == "promote_model"]
    if goal.get("approval") == "required":
        if not promotions:
            return Step("The goal wants a person's approval: I stage it.", "promote_model",
                        {"model_name": name, "version": version, "to": "staging"})
        return Step("Staged for approval.", final={
            "deployed": False, "model_name": name, "version": version, "alias": "staging",
            "reason": f"waiting for approval: modelcrew models approve {name} {version}"})
    if not promotions:
        return Step("I promote it to production; the registry checks its policy.", "promote_model",
                    {"model_name": name, "version": version, "to": "production"})
    if promotions[-1].startswith(f"{name}@"):
        alias = "production" if len(promotions) == 1 else "staging"
        return Step("Promoted.", final={"deployed": alias == "production", "model_name": name, "version": version,
                                        "alias": alias, "reason": promotions[-1]})
    if goal["deploy"] == "always" and len(promotions) == 1:
        return Step("The registry refused production; the goal says ship regardless, so I stage it for a person.",
                    "promote_model", {"model_name": name, "version": version, "to": "staging"})
    return Step("The registry refused the promotion.", final={"deployed": False, "model_name": name, "version": version,
                                                             "alias": None, "reason": promotions[-1]})


def render_react(step: Step) -> str:
    if step.tool is None:
        return f"Thought: {step.thought} I now know the final answer\nFinal Answer: {json.dumps(step.final)}"
    return f"Thought: {step.thought}\nAction: {step.tool}\nAction Input: {json.dumps(step.args)}"


class OfflineLLM(BaseLLM):
    """The deterministic policy behind CrewAI's LLM interface (ReAct text, no function calling)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(model="offline", **kwargs)

    def supports_function_calling(self) -> bool:
        return False

    def get_input_tokens_count(self, messages, tools=None, response_model=None) -> int:
        return 0

    def call(self, messages, tools=None, callbacks=None, available_functions=None, from_task=None, from_agent=None,
             response_model=None) -> str:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return render_react(next_step(list(messages)))
