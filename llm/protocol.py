"""What a crew task tells the agents' LLM in a form code can read back: the task header.

The crew (`crews/crew.py`) ends every task description from `crews/config/tasks.yaml` with
`task_header(name)`, and the offline policy finds its way with `read_task`, so neither depends on the
other's wording. Tools answer in JSON (`{"error": ...}` when they fail), never in prose to be parsed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

TASK = "[task: {name}]"
GOAL = "Goal (JSON):"
RUN_ID = "Run id:"
EARLIER = "Earlier steps (JSON):"  # what a Flow step is told of the steps before it
CREWAI_CONTEXT = "context you're working with"  # CrewAI's own heading for the outputs of earlier tasks


def task_header(name: str) -> str:
    """Appended to the task's description; `{goal_json}` and `{run_id}` are filled in by CrewAI's inputs."""
    return f"\n{TASK.format(name=name)}\n{GOAL} {{goal_json}}\n{RUN_ID} {{run_id}}\n"


def step_header() -> str:
    """Appended to a task run alone as a Flow step; `{context}` is what the earlier steps answered."""
    return f"{EARLIER} {{context}}\n"


@dataclass
class TaskText:
    name: str
    goal: dict
    run_id: str
    context: list[dict]  # the JSON answers of the earlier tasks (crew context or Flow step context), in order


def read_task(text: str) -> TaskText | None:
    """The header of a task description (None when `text` holds no modelcrew task)."""
    marker = re.search(re.escape(TASK).replace(r"\{name\}", r"(\w+)"), text)
    if not marker or GOAL not in text:
        return None
    goal = next((o for o in json_objects(text.split(GOAL, 1)[1]) if "task" in o and "data" in o), None)
    run_id = re.search(re.escape(RUN_ID) + r"\s*(\S+)", text)
    if goal is None or run_id is None:
        return None
    context = ""
    for heading in (CREWAI_CONTEXT, EARLIER):
        if heading in text:
            context = text.split(heading, 1)[1]
    return TaskText(marker.group(1), goal, run_id.group(1), json_objects(context))


def json_objects(text: str) -> list[dict]:
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
