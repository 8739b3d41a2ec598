"""Load and validate a `TrainPlan` from YAML/JSON (a recipe file or an agent's tool call).

Validation happens before any compute: a bad field is one line naming the file and the field.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from training.contracts import TrainPlan
from training.errors import InputError

RECIPES = Path(__file__).parent / "recipes"


def plan_from_dict(data: dict, where: str = "plan", **overrides) -> TrainPlan:
    try:
        return TrainPlan.model_validate({**data, **{k: v for k, v in overrides.items() if v is not None}})
    except ValidationError as err:
        raise InputError(f"{where}: {describe_validation_error(err)}") from None


def describe_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")  # cross-field checks already name their field
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{field}: {msg}{more}" if field else f"{msg}{more}"


def load_plan(source: str, **overrides) -> TrainPlan:
    """A plan from a YAML or JSON file, or the name of a shipped recipe (`training/recipes/<name>.yaml`)."""
    path = Path(source)
    if not path.exists() and (RECIPES / f"{source}.yaml").exists():
        path = RECIPES / f"{source}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise InputError(f"{source}: no such plan file or recipe (recipes: {names})")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # json/yaml syntax errors carry line numbers in their message
        raise InputError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                         f"({' '.join(str(err).split())[:200]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of plan fields")
    return plan_from_dict(data, str(path), **overrides)
