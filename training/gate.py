"""The gate: may this candidate be deployed? Computed from numbers by code; an LLM never decides it.

Checks, each giving one line of reasons (failing ones first):
1. the goal's target, on the held-out test split when it was measured (the validation split chose the
   best checkpoint, so it flatters): absolute ("accuracy >= 0.85", "preference_accuracy >= 0.8" on held-out pairs), relative to the base model
   ("perplexity 20% below the base") or to production (production's score on the same evaluation set;
   with no production yet, the base stands in and the reason says so); with no target, the candidate
   must not be worse than its base. A target is met only when the evidence holds: with per-record
   scores in the evaluation, its interval at the evaluation's confidence (paired with the baseline's
   scores for a relative target) must lie on the right side of the threshold. An estimate that meets
   the target while its interval straddles it is "not enough evidence", with the test records that
   would settle it. "No worse than" (a zero margin) is a guard, judged on the estimate. A relative
   "higher" target over a baseline of 0 asks for nothing and is refused;
2. forgetting: perplexity on what the base knew (`general_perplexity`: its own pretraining validation split, or
   general text; `Evaluation.general_corpus` says which) may not rise more than `max_forgetting` (10%) over the base's;
3. contamination: no training record may restate an earlier evaluation record (from memory);
   and a line of what the numbers rest on: records cut to fit seq_len or dropped, per split (never a failure
   by itself: training refuses to drop many, and evaluation scores every record that fits);
4. production: when production was scored on the same evaluation set (`production_<metric>` in the
   evaluation, or `production` given), the candidate may not be worse than it.
"""

from __future__ import annotations

from training import stats
from training.contracts import Evaluation, GateVerdict, Goal, Target

MAX_FORGETTING = 0.10


def lower_is_better(metric: str) -> bool:
    """Perplexities and losses improve downwards; accuracy, exact match, F1 and ROUGE-L upwards."""
    return "perplexity" in metric or "loss" in metric


def metric_key(metric: str, metrics: dict[str, float]) -> str:
    """The evaluation key a goal metric is judged on: the test split's perplexity when there is one."""
    if metric == "perplexity":
        return "test_perplexity" if "test_perplexity" in metrics else "val_perplexity"
    return metric


def gate(goal: Goal, evaluation: Evaluation, production: dict[str, float] | None = None, contaminated: int = 0,
         max_forgetting: float = MAX_FORGETTING) -> GateVerdict:
    m = evaluation.metrics
    key = metric_key(goal.metric, m)
    value = m.get(key)
    if production is None and m.get(f"production_{key}") is not None:
        production = {key: m[f"production_{key}"]}  # recorded by the evaluator: the verdict is recomputable from the file
    failed: list[str] = []
    passed: list[str] = []
    evidence, needed = None, None
    if value is None:
        failed.append(f"{key} was not measured on this data, so the goal's {goal.metric} cannot be judged")
    else:
        target = goal.target or Target(metric=goal.metric, direction="lower" if goal.metric == "perplexity" else "higher",
                                       kind="relative", value=0.0, baseline="base")
        ok, line, evidence, needed = _judge(target, key, value, evaluation, production)
        (passed if ok else failed).append(line)
    general, base_general = m.get("general_perplexity"), m.get("base_general_perplexity")
    if general is not None and base_general:
        rise = general / base_general - 1
        what = "the base's own pretraining data" if "own competence" in evaluation.general_corpus else "general text"
        line = (f"forgetting: perplexity on {what} {general:.4g} vs the base's {base_general:.4g} "
                f"({rise:+.1%}; at most +{max_forgetting:.0%})")
        (passed if rise <= max_forgetting else failed).append(line)
    against_target = goal.target is not None and goal.target.kind == "relative" and goal.target.baseline == "production"
    if production and production.get(key) is not None and value is not None and not against_target:
        old = production[key]
        worse = value > old if lower_is_better(key) else value < old
        change = value / old - 1 if old else 0.0
        (failed if worse else passed).append(f"production: {key} {value:.4g} vs production's {old:.4g} ({change:+.1%}) "
                                             f"on the same evaluation set; may not be worse: {'NOT met' if worse else 'met'}")
    if contaminated:
        failed.append(f"contamination: {contaminated} training records restate earlier evaluation records")
    else:
        passed.append("contamination: none found in memory")
    if evaluation.records:
        passed.append("records: " + "; ".join(
            f"{split} {r['whole'] + r['cut']} of {r['records']} used ({r['cut']} cut to fit, {r['dropped']} dropped)"
            for split, r in evaluation.records.items()))
    return GateVerdict(passed=not failed, metric=key, value=value, threshold=_threshold(goal, key, m, production),
                       reasons=failed + passed, evidence=evidence, records_needed=needed)


def _baseline(target: Target, key: str, metrics: dict[str, float], production: dict[str, float] | None) -> tuple[float | None, str]:
    if target.baseline == "production" and production and production.get(key) is not None:
        return production[key], "production"
    label = "the base (no production version yet)" if target.baseline == "production" else "the base"
    return metrics.get(f"base_{key}"), label


def _threshold(goal: Goal, key: str, metrics: dict[str, float], production: dict[str, float] | None) -> float | None:
    target = goal.target
    if target is None:
        return metrics.get(f"base_{key}")
    if target.kind == "absolute":
        return target.value
    base, _ = _baseline(target, key, metrics, production)
    if base is None:
        return None
    return base * (1 - target.value) if target.direction == "lower" else base * (1 + target.value)


def _judge(target: Target, key: str, value: float, evaluation: Evaluation, production) -> tuple[bool, str, str | None, int | None]:
    """(met, the reason, 'enough' / 'not enough' evidence or None for a guard, test records that would settle it)."""
    metrics, level = evaluation.metrics, evaluation.confidence
    lower = target.direction == "lower"
    op = "<=" if lower else ">="
    mine = evaluation.per_record.get("candidate", {}).get(key)
    if target.kind == "absolute":
        ok = value <= target.value if lower else value >= target.value
        line = f"{key} {value:.4g} {op} {target.value:.4g}"
        if not mine or len(mine) < 2:
            return ok, f"{line} {'met' if ok else 'NOT met'}", None, None
        low, high = stats.interval(mine, level)
        sure = high <= target.value if lower else low >= target.value
        return _decided(ok, sure, line, f"{key} {low:.4g} to {high:.4g}", len(mine), level, low, high,
                        abs(value - target.value))
    base, label = _baseline(target, key, metrics, production)
    if base is None:
        return False, f"{key}: no {label} score to compare with", None, None
    if not lower and target.value and base <= 0:
        return False, (f"{key}: {label} scores {base:.4g}, so '{target.value:.0%} above it' asks for nothing; "
                       f"give an absolute target instead (e.g. '{key} at least 0.5')"), "enough", None
    needed = base * (1 - target.value) if lower else base * (1 + target.value)
    change = value / base - 1 if base else 0.0
    ok = value <= needed if lower else value >= needed
    need = (f"{target.value:.0%} {'below' if lower else 'above'} {label}" if target.value else f"no worse than {label}")
    line = f"{key} {value:.4g} vs {label} {base:.4g} ({change:+.1%}); needed {need}, {op} {needed:.4g}"
    theirs = evaluation.per_record.get("production" if label == "production" else "base", {}).get(key)
    if not target.value or not mine or not theirs or len(mine) != len(theirs) or len(mine) < 2:
        return ok, f"{line}: {'met' if ok else 'NOT met'}", None, None  # a guard, or no paired records to weigh
    scale = (1 - target.value) if lower else (1 + target.value)
    point, low, high = stats.paired(mine, theirs, ratio=lower, scale=scale, level=level)
    sure = high <= 0 if lower else low >= 0
    what = "candidate / threshold - 1" if lower else "candidate - threshold"
    return _decided(ok, sure, line, f"{what} {low:+.4g} to {high:+.4g}, paired", len(mine), level, low, high, abs(point))


def _decided(ok: bool, sure: bool, line: str, interval: str, n: int, level: float, low: float, high: float,
             margin: float) -> tuple[bool, str, str, int | None]:
    where = f"{level:.0%} interval {interval}; {n} test records"
    if ok and sure:
        return True, f"{line} met ({where})", "enough", None
    if not ok:
        return False, f"{line} NOT met ({where})", "enough", None
    needed = stats.records_to_settle(n, low, high, margin)
    settle = f"about {needed} test records would settle it" if needed else "an estimate on the threshold cannot be settled"
    return False, (f"{line}: not enough evidence — the estimate meets it but the {where} reaches past the "
                   f"threshold; {settle}"), "not enough", needed
