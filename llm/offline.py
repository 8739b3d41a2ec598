"""`offline`: the agents' default LLM — a deterministic, rule-based policy, not a language model.

It reads what CrewAI sends an LLM (the task's description with the goal as JSON, the context of the
earlier tasks, the tool results so far) and answers in CrewAI's ReAct format with real tool calls whose
arguments come from the goal, then a final answer in JSON. The same crew, tools and engine run as with a
real model, with no network. It does not understand language: a goal is parsed by `crews.goals`
before the crew starts, and this policy only follows each task's fixed sequence of tools. It finds the
task, the goal and the run id through the task header of `llm.protocol`, and reads the tools' JSON answers.

Its one decision from observation: when `train_model` answers that the target is missed on validation and
the budget has room (`may_try_again`), it trains again with `next_configuration` (documented rules).

`next_step(messages)` is the whole policy; `OfflineLLM` renders it as ReAct text, and the test's
scripted OpenAI-protocol server renders the same steps as OpenAI tool calls.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from crewai.llms.base_llm import BaseLLM

from llm.protocol import json_objects, read_task


class PolicyError(RuntimeError):
    """A tool failed in a way the policy cannot work around: the crew stops with this message."""


@dataclass
class Step:
    thought: str
    tool: str | None = None  # None: a final answer
    args: dict | None = None
    final: dict | None = None


def message_text(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else str(message)
    if isinstance(content, list):  # content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def observations(messages: list) -> list[tuple[str, str]]:
    """(tool name, result text) of every tool call so far, in order, from ReAct text or tool messages."""
    seen, names = [], {}
    for m in messages:
        if not isinstance(m, dict):
            continue
        text = message_text(m)
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
    objects = json_objects(result)
    answer = objects[0] if objects else {"text": result}
    if "error" in answer:
        raise PolicyError(str(answer["error"]))
    return answer


def next_step(messages: list) -> Step:
    task = read_task("\n".join(message_text(m) for m in messages if isinstance(m, dict) and m.get("role") == "user"))
    if task is None:
        raise PolicyError("the offline policy drives modelcrew's own tasks only (no task header found)")
    done = [(name, _tool_json(text)) for name, text in observations(messages)]
    calls = [name for name, _ in done]
    results = dict(done)  # the latest answer of each tool
    return {"curate": _curate, "train": _train, "evaluate": _evaluate, "deploy": _deploy}[task.name](
        task.goal, task.run_id, task.context, calls, results, done)


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
        args = {"fingerprint": fingerprint}
        attempts, budget = goal.get("attempts", 1), (goal.get("budget") or {}).get("steps")
        if attempts > 1 and budget:  # leave room for the configurations after this one
            args.update(steps=max(budget // attempts, 5), reason=f"the default plan on 1/{attempts} of the step budget")
        return Step("I train within the goal's budget; the plan starts from memory's best config when there is one.",
                    "train_model", args)
    r = results["train_model"]
    if r.get("may_try_again"):
        return Step("The target is missed on validation and the budget has room: I try another configuration.",
                    "train_model", next_configuration(fingerprint, r))
    return Step("Training finished.", final={"run_id": r["run_id"], "status": r["status"], "steps": r["steps"],
                                            "best_val_loss": r["best_val_loss"], "reused_from": r.get("reused_from")})


def next_configuration(fingerprint: str, last: dict) -> dict:
    """The rules the offline trainer tries again by, from what the last attempt's answer showed:
    - overfitting (best validation early, then rising) -> a third of its learning rate; still improving at
      the end or levelled off -> three times it (at most 1e-2);
    - a rate memory says was already tried on this data is skipped for the next one the same way;
    - steps: an even share, over the configurations left, of the steps that fit the budget left at the
      measured speed (code bounds both again). Lessons in the answer are quoted data; these rules ignore them."""
    overfit = last["curve"].startswith("overfitting")
    factor = 1 / 3 if overfit else 3.0
    tried = last.get("tried_lrs") or []
    lr = last["lr"] * factor
    while any(abs(lr - t) <= 1e-6 * t for t in tried) and 1e-6 < lr < 1e-2:
        lr *= factor
    lr = min(max(lr, 1e-6), 1e-2)
    change = "a third of it" if overfit else "three times it"
    why = f"attempt {last['attempt']} was {last['curve'].split(':')[0]} at lr {last['lr']:.3g}: {change}"
    if abs(lr - last["lr"] * factor) > 1e-12:
        why += f", past rates memory says were tried ({', '.join(f'{t:.3g}' for t in tried)})"
    args = {"fingerprint": fingerprint, "lr": lr, "reason": why}
    fits = last.get("steps_that_fit") or (last.get("budget_left") or {}).get("steps")
    if fits:
        args["steps"] = max(fits // max(last["of"] - last["attempt"], 1), 1)
    return args


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
    version = results["register_model"]["version"]
    promotions = [answer for tool, answer in done if tool == "promote_model"]
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
    last = promotions[-1]
    said = f"{name}@{last['alias']} is now {version}" if last["allowed"] else f"refused to promote {name} {version}"
    if last["allowed"]:
        return Step("Promoted.", final={"deployed": last["alias"] == "production", "model_name": name, "version": version,
                                        "alias": last["alias"], "reason": f"{said}: {'; '.join(last['reasons'])}"})
    if goal["deploy"] == "always" and len(promotions) == 1:
        return Step("The registry refused production; the goal says ship regardless, so I stage it for a person.",
                    "promote_model", {"model_name": name, "version": version, "to": "staging"})
    return Step("The registry refused the promotion.", final={"deployed": False, "model_name": name, "version": version,
                                                             "alias": None, "reason": f"{said}: {'; '.join(last['reasons'])}"})


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
