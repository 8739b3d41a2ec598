"""The run report in Markdown (runs/<run_id>/report.md): every number read from the run's artefacts.

The goal verbatim and the verdict first, then the metrics beside their baselines, the gate's reasons,
the data, forgetting, side-by-side samples, cost and lineage.
"""

from __future__ import annotations

import json
from pathlib import Path

from training.contracts import DatasetSummary, Evaluation, GateVerdict, Goal, RunResult, TrainPlan


def _load(path: Path, model):
    return model.model_validate_json(path.read_text(encoding="utf-8")) if path.exists() else None


def _fmt(value) -> str:
    return "—" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))


def write_markdown_report(workspace: Path, run_id: str, goal: Goal, goal_text: str) -> Path:
    from training.data.store import datasets_dir

    run_dir = workspace / "runs" / run_id
    ev = _load(run_dir / "evaluation.json", Evaluation)
    result = _load(run_dir / "result.json", RunResult)
    plan = _load(run_dir / "plan.json", TrainPlan)
    gate = _load(run_dir / "gate.json", GateVerdict)
    if ev is None or result is None or plan is None:
        from training.errors import InputError

        raise InputError(f"run {run_id}: trained and evaluated runs only (missing evaluation.json, result.json or plan.json)")
    summary = DatasetSummary.model_validate_json((datasets_dir(workspace) / plan.dataset / "summary.json").read_text(encoding="utf-8"))
    reused = json.loads((run_dir / "memory_used.json").read_text()).get("reused_from") if (run_dir / "memory_used.json").exists() else None
    if gate is None:
        verdict = "Not gated."
    elif gate.passed:
        verdict = f"**Passed** the gate on {gate.metric} ({_fmt(gate.value)}, threshold {_fmt(gate.threshold)})."
    else:
        verdict = f"**Failed** the gate: {gate.reasons[0]}."
    m = ev.metrics
    rows = []
    for key in ("val_perplexity", "test_perplexity", "general_perplexity", "accuracy", "exact_match", "f1", "rougeL"):
        if key in m:
            base, prod = m.get(f"base_{key}"), m.get(f"production_{key}")
            delta = f"{m[key] / base - 1:+.1%}" if base else "—"
            rows.append(f"| {key} | {_fmt(base)} | {_fmt(m[key])} | {delta} | {_fmt(prod)} |")
    samples = "\n\n".join(f"**Prompt:** {s['prompt']}\n\n- reference: {s['reference']}\n- base: {s.get('base')}\n- candidate: {s['candidate']}"
                          for s in ev.samples[:5]) or "(no generated answers for this format)"
    text = f"""# Run {run_id}

> {goal_text or goal.model_dump_json()}

{verdict}

## Metrics

| metric | base | candidate | change vs base | production |
|---|---|---|---|---|
{chr(10).join(rows)}

## Gate

{chr(10).join(f"- {r}" for r in (gate.reasons if gate else ["not gated"]))}

## Data

Dataset `{summary.fingerprint}` from `{summary.source}` ({summary.format}): {summary.records_in} records in, {summary.records_after} kept;
removed {json.dumps(summary.removed)}; PII replaced {json.dumps(summary.pii)}; splits {json.dumps(summary.splits)}.

## Samples

{samples}

## Cost

{result.steps} steps, {result.tokens:,} tokens in {result.wall_seconds:.1f} s ({result.tokens_per_second:,.0f} tokens/s) on {result.device};
peak memory {result.peak_memory_mb:,.0f} MB; evaluation {ev.seconds:.1f} s. Stopped: {result.message}.

## Lineage

run `{run_id}`, base `{plan.base_model or 'none (from scratch)'}`, method {plan.method}, lr {plan.lr:g}, batch {plan.batch_size},
seq_len {plan.seq_len}; dataset `{plan.dataset}`; memory suggested: {f'the settings of run `{reused}`' if reused else 'nothing (no similar earlier run)'}.
"""
    path = run_dir / "report.md"
    path.write_text(text, encoding="utf-8")
    return path
