"""Run reports a team lead can decide from in a minute: `runs/<run_id>/report.md` and `report.html`.

Everything shown is read from the run's artefacts (evaluation.json, metrics.jsonl, plan.json,
result.json, gate.json, deployment.json, trace.jsonl, the dataset summary) and from memory (earlier
runs on similar data); numbers go through one formatter, so the Markdown, the HTML and the JSON agree.
The HTML is self-contained: inline CSS, plots as base64 PNG (matplotlib, Agg), no external URL.
Rendering is deterministic: the same artefacts give the same files.

Also here: `render_compare` (two runs side by side, `reports/compare-A-vs-B.md` and `.html`) and
`list_runs` (one row per evaluated run).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from reports.format import downsample, fmt, png, pyplot, write_rendered
from training.contracts import DatasetSummary, GateVerdict
from training.errors import InputError
from training.runs import Run, evaluated_runs

METRIC_KEYS = ("val_perplexity", "test_perplexity", "general_perplexity", "accuracy", "accuracy_raw", "exact_match", "f1", "rougeL")
PHASES = {"curate_dataset": "curate", "train_model": "train", "evaluate_model": "evaluate", "compare_with_history": "report",
          "write_report": "report", "register_model": "deploy", "promote_model": "deploy"}


def headline_metric(gate: GateVerdict | None, metrics: dict) -> str:
    """The metric a run is judged by: the gate's, else its test (or validation) perplexity."""
    return gate.metric if gate else ("test_perplexity" if "test_perplexity" in metrics else "val_perplexity")


def verdict_word(passed: bool | None) -> str:
    return "not gated" if passed is None else ("passed" if passed else "failed")


def gather(workspace: Path, run_id: str, goal_text: str | None = None) -> dict:
    """Everything a report shows, from the artefacts (and memory for the history)."""
    from training.batches import read_split  # torch and the curation modules load here, when a report is made
    from training.data.store import datasets_dir, load_contamination, load_summary

    workspace = Path(workspace)
    run = Run(workspace, run_id)
    ev, plan, result = run.evaluation(), run.plan(), run.result()
    if ev is None or plan is None or result is None:
        raise InputError(f"run {run_id}: reports need a trained and evaluated run (plan.json, result.json, evaluation.json in {run.dir})")
    gate, deployment = run.gate(), run.deployment()
    trace = run.trace_rows()
    goal_text = goal_text or run.goal_text()
    summary = load_summary(workspace, plan.dataset)
    contamination = load_contamination(workspace, plan.dataset)
    m = ev.metrics
    key = headline_metric(gate, m)

    if gate is None:
        verdict, passed = "Not gated: no goal was given for this run.", None
    elif gate.passed:
        verdict, passed = f"Passed: {gate.reasons[0]}.", True
    else:
        verdict, passed = f"Failed: {gate.reasons[0]}.", False
    n_test = ev.intervals[key].n if key in ev.intervals else ev.examples.get("test")
    if gate is not None and n_test:
        verdict += f" Judged on {n_test} test records at {ev.confidence:.0%} confidence."
    if deployment is not None:
        if deployment.alias:
            verdict += f" Deployed as {deployment.model_name}@{deployment.alias} ({deployment.version})."
        else:
            verdict += f" Not deployed: {deployment.reason}."

    metrics = []
    for name in METRIC_KEYS:
        if name in m:
            base = m.get(f"base_{name}")
            metrics.append({"name": name, "base": _with_interval(ev, f"base_{name}"), "candidate": _with_interval(ev, name),
                            "production": _with_interval(ev, f"production_{name}"), "n": fmt(_n(ev, name)),
                            "delta": _change(ev, name, base), "target": fmt(gate.threshold) if gate and name == key else ""})
    fits = dict(result.records)
    fits.update({k: v for k, v in ev.records.items() if k != "train"})

    phases: dict[str, float] = {}
    for e in trace:
        if e.get("kind") == "tool" and e.get("tool") in PHASES:
            phases[PHASES[e["tool"]]] = phases.get(PHASES[e["tool"]], 0.0) + e["seconds"]
    if not phases:
        phases = {"train": result.wall_seconds, "evaluate": ev.seconds}

    rows = run.metrics_rows()
    history = _history(workspace, run_id, plan.dataset, summary, key)
    if not any(h["this"] for h in history) and key in m:
        history.append({"run_id": run_id, "value": m[key], "created_at": ev.created_at or "", "this": True})
    history.sort(key=lambda h: (h["created_at"], h["run_id"]))

    lengths = [len(json.dumps(r, ensure_ascii=False)) for r in read_split(datasets_dir(workspace) / plan.dataset, "train")]

    return {"run_id": run_id, "goal_text": goal_text, "verdict": verdict, "passed": passed, "metric": key,
            "metrics": metrics, "gate_reasons": gate.reasons if gate else [], "ev": ev, "plan": plan, "result": result,
            "summary": summary, "contaminated": None if contamination is None else len(contamination),
            "deployment": deployment, "phases": phases, "rows": rows, "history": history, "lengths": lengths,
            "memory_used": run.memory_used(), "recommendations": recommendations(rows, m, summary, gate), "fmt": fmt,
            "general": (fmt(m.get("base_general_perplexity")), fmt(m.get("general_perplexity"))), "fits": fits,
            "code_version": _code_version(), "narrative": None, "attempts": run.attempts()}


def _n(ev, name: str) -> int | None:
    return ev.intervals[name].n if name in ev.intervals else None


def _with_interval(ev, key: str) -> str:
    """`value (low–high)` at the evaluation's confidence, or the bare value when no interval was computed."""
    value = ev.metrics.get(key)
    if value is None:
        return "—"
    interval = ev.intervals.get(key)
    return f"{fmt(value)} ({fmt(interval.low)}–{fmt(interval.high)})" if interval else fmt(value)


def _change(ev, name: str, base: float | None) -> str:
    """The candidate's change over its base, paired over the same records, with its interval."""
    c = ev.comparisons.get("base", {}).get(name)
    if c is not None:
        if c.kind == "ratio":
            return f"{c.change:+.1%} ({c.low:+.1%} to {c.high:+.1%})"
        return f"{c.change:+.3g} ({c.low:+.3g} to {c.high:+.3g})"
    return f"{ev.metrics[name] / base - 1:+.1%}" if base else "—"


def _history(workspace: Path, run_id: str, dataset: str, summary: DatasetSummary, key: str) -> list[dict]:
    """`key` of every earlier run on this dataset or a similar one, from memory ([] without a memory index)."""
    history = []
    try:
        from memory.store import MemoryStore

        if not (workspace / "memory" / "chroma").exists():
            raise FileNotFoundError("no memory index in this workspace")  # a report never creates one
        store = MemoryStore(workspace)
        fingerprints = [dataset]
        if store.show(dataset) is not None:  # indexed: its stored vector finds neighbours without loading a model
            fingerprints += [s.fingerprint for s in store.similar_datasets(summary, k=5) if s.similarity >= 0.5]
        for fp in fingerprints:
            for past in store.history(fingerprint=fp):
                if key in past.metrics:
                    history.append({"run_id": past.run_id, "value": past.metrics[key], "created_at": past.created_at,
                                    "this": past.run_id == run_id})
    except Exception:  # memory unavailable (never built in this workspace): the report still renders
        history = []
    return history


def _code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"modelcrew {version('modelcrew')}"
    except PackageNotFoundError:
        return "modelcrew (not installed)"


def recommendations(rows: list[dict], m: dict, summary: DatasetSummary, gate: GateVerdict | None) -> list[str]:
    """Rules over the numbers; each says what it saw."""
    out = []
    vals = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    train = [r["loss"] for r in rows if r.get("loss") is not None]
    if len(vals) >= 2 and len(train) >= 4:
        best_step, best = min(vals, key=lambda v: v[1])
        last_step, last = vals[-1]
        head, tail = sum(train[: len(train) // 4]) / max(1, len(train) // 4), sum(train[-(len(train) // 4):]) / max(1, len(train) // 4)
        if last > best * 1.02 and tail < head:
            out.append(f"Overfitting: validation loss rose from {fmt(best)} (step {best_step}) to {fmt(last)} (step "
                       f"{last_step}) while training loss fell; the best checkpoint is kept — lower the lr or the steps.")
        elif vals[-1][1] < vals[-2][1] and tail < head:
            out.append(f"Under-training: validation loss was still falling at the end ({fmt(vals[-2][1])} -> "
                       f"{fmt(vals[-1][1])}); more steps or a larger budget should help.")
    g, bg = m.get("general_perplexity"), m.get("base_general_perplexity")
    if g and bg and g > bg * 1.05:
        out.append(f"Forgetting: perplexity on what the base knew rose {g / bg - 1:+.1%} ({fmt(bg)} -> {fmt(g)}); "
                   "consider LoRA, a lower lr or mixing that data back in.")
    if summary.splits.get("train", 0) < 200:
        out.append(f"Small data: {summary.splits.get('train', 0)} training records; validation numbers on "
                   f"{summary.splits.get('val', 0)} records are noisy.")
    if gate is not None and not gate.passed:
        out.append("The gate failed: " + gate.reasons[0] + ".")
    return out or ["No warning signs in the numbers."]


PLACEHOLDERS = ("metric", "value", "base", "threshold", "verdict", "steps", "run_id")


def narrative_text(template: str, data: dict) -> str:
    """The evaluator's narrative with every number inserted by code; refused if it carries its own numbers
    or contradicts the verdict (the gate decides, the words only explain)."""
    bare = re.sub(r"\{(?:%s)\}" % "|".join(PLACEHOLDERS), "", template)
    if re.search(r"\d", bare):
        raise InputError("narrative: write numbers only as placeholders ({value}, {base}, {threshold}, {steps}), never digits")
    if re.search(r"[{}]", bare):
        raise InputError(f"narrative: unknown placeholder; use {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
    low = bare.lower()
    says_failed = re.search(r"\bfail(?:ed|s|ure)?\b|did not (?:pass|meet|reach)|missed|not good enough", low)
    says_passed = re.search(r"(?<!not )\b(?:passed|passes|succeeded|met the target|reached the target|meets the target)\b", low)
    if data["passed"] and says_failed:
        raise InputError("narrative: it says the run failed, but the gate passed it")
    if data["passed"] is False and says_passed:
        raise InputError("narrative: it says the run passed, but the gate failed it")
    m = data["ev"].metrics
    values = {"metric": data["metric"], "value": fmt(m.get(data["metric"])), "base": fmt(m.get(f"base_{data['metric']}")),
              "threshold": next((r["target"] for r in data["metrics"] if r["name"] == data["metric"]), "—") or "—",
              "verdict": verdict_word(data["passed"]), "steps": fmt(data["result"].steps), "run_id": data["run_id"]}
    return template.format_map(values)


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    """Steps and values of the metrics rows that have `key` (every row has a training loss, some a validation loss)."""
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [step for step, _ in points], [value for _, value in points]


def _loss_axes(ax, legend_fontsize=None) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=legend_fontsize)
    ax.grid(alpha=0.3)


def plots(data: dict) -> list[tuple[str, str]]:
    """The report's figures as (caption, base64 PNG): loss curves, the headline metric, its history, record lengths."""
    plt = pyplot()
    figures = []
    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    xs, ys = downsample(*_series(rows, "loss"))
    ax.plot(xs, ys, label="training loss", color="#4c72b0", linewidth=1)
    vx, vy = _series(rows, "val_loss")
    if vx:
        vx, vy = downsample(vx, vy)
        ax.plot(vx, vy, "o-", label="validation loss", color="#dd8452", markersize=3)
    _loss_axes(ax)
    figures.append(("Training and validation loss", png(fig)))

    key = data["metric"]
    m = data["ev"].metrics
    bars = [("base", m.get(f"base_{key}")), ("candidate", m.get(key)), ("production", m.get(f"production_{key}"))]
    bars = [(n, v) for n, v in bars if v is not None]
    ev = data["ev"]
    names = {"base": f"base_{key}", "candidate": key, "production": f"production_{key}"}
    errors = [[0.0] * len(bars), [0.0] * len(bars)]  # the intervals, as error bars below and above each value
    for i, (n, v) in enumerate(bars):
        interval = ev.intervals.get(names[n])
        if interval is not None:
            errors[0][i], errors[1][i] = max(v - interval.low, 0.0), max(interval.high - v, 0.0)
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.bar([n for n, _ in bars], [v for _, v in bars], yerr=errors, capsize=6,
           color=["#8c8c8c", "#4c72b0", "#55a868"][: len(bars)])
    for i, (_, v) in enumerate(bars):
        ax.text(i, v, fmt(v), ha="center", va="bottom")
    gate_threshold = next((r["target"] for r in data["metrics"] if r["name"] == key and r["target"]), "")
    if gate_threshold and gate_threshold != "—":
        ax.axhline(float(gate_threshold), color="#c44e52", linestyle="--", label=f"target {gate_threshold}")
        ax.legend()
    ax.set_ylabel(key)
    figures.append((f"{key}: base, candidate, production, with {ev.confidence:.0%} intervals", png(fig)))

    history = data["history"]
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.plot(range(len(history)), [h["value"] for h in history], "o-", color="#8c8c8c", markersize=4)
    for i, h in enumerate(history):
        if h["this"]:
            ax.plot([i], [h["value"]], "o", color="#c44e52", markersize=9, label="this run")
    ax.set_xticks(range(len(history)), [h["run_id"][-9:] for h in history], rotation=30, fontsize=7)
    ax.set_ylabel(key)
    ax.legend()
    ax.grid(alpha=0.3)
    figures.append((f"{key} across runs on similar data (from memory)", png(fig)))

    if data["lengths"]:
        fig, ax = plt.subplots(figsize=(6.4, 3.2))
        ax.hist(data["lengths"], bins=30, color="#4c72b0")
        ax.set_xlabel("record length (characters)")
        ax.set_ylabel("training records")
        figures.append(("Length distribution of the training records", png(fig)))
    return figures


def render(workspace: Path, run_id: str, goal_text: str | None = None, narrative: str | None = None,
           author: str = "unknown") -> tuple[Path, Path]:
    """Write report.md and report.html for `run_id`; returns their paths. A `narrative` (the evaluator's
    template, written by `author`) is checked, kept in the run and used by every later render."""
    data = gather(workspace, run_id, goal_text)
    run = Run(workspace, run_id)
    if narrative is not None:
        narrative_text(narrative, data)  # refuse before anything is written
        run.write_narrative(narrative, author)
    saved = run.narrative()
    if saved is not None:
        data["narrative"] = narrative_text(saved, data)
        data["narrative_author"] = run.narrative_author() or "unknown"
    md, html = run.report_paths()
    write_rendered(md, "report.md.j2", **data)
    write_rendered(html, "report.html.j2", **data, plots=plots(data))
    return md, html


def render_compare(workspace: Path, run_a: str, run_b: str) -> tuple[Path, Path]:
    """A side-by-side report of two runs (`reports/compare-A-vs-B.md` and `.html`), in the same format."""
    a, b = gather(Path(workspace), run_a), gather(Path(workspace), run_b)
    names = [n for n in METRIC_KEYS if n in a["ev"].metrics or n in b["ev"].metrics]
    rows = []
    for n in names:
        va, vb = a["ev"].metrics.get(n), b["ev"].metrics.get(n)
        rows.append({"name": n, "a": fmt(va), "b": fmt(vb), "delta": f"{vb / va - 1:+.1%}" if va and vb is not None else "—"})
    fig, ax = pyplot().subplots(figsize=(6.4, 3.2))
    for data, color in ((a, "#4c72b0"), (b, "#dd8452")):
        xs, ys = downsample(*_series(data["rows"], "loss"))
        ax.plot(xs, ys, color=color, linewidth=1, alpha=0.6, label=f"{data['run_id']} training")
        vx, vy = _series(data["rows"], "val_loss")
        if vx:
            ax.plot(vx, vy, "o-", color=color, markersize=3, label=f"{data['run_id']} validation")
    _loss_axes(ax, legend_fontsize=7)
    context = {"a": a, "b": b, "rows": rows, "fmt": fmt, "curves": png(fig)}
    out = Path(workspace) / "reports"
    md = write_rendered(out / f"compare-{run_a}-vs-{run_b}.md", "compare.md.j2", **context)
    html = write_rendered(out / f"compare-{run_a}-vs-{run_b}.html", "compare.html.j2", **context)
    return md, html


def list_runs(workspace: Path) -> list[dict]:
    """One row per evaluated run: run, goal, metric, verdict, deployed, time."""
    out = []
    for run in evaluated_runs(workspace):
        ev, gate, dep = run.evaluation(), run.gate(), run.deployment()
        key = headline_metric(gate, ev.metrics)
        out.append({"run_id": run.run_id, "goal": run.crew_result().get("goal", ""), "metric": key, "value": ev.metrics.get(key),
                    "verdict": verdict_word(None if gate is None else gate.passed),
                    "deployed": f"{dep.model_name}@{dep.alias}" if dep and dep.alias else "no",
                    "time": ev.created_at or ""})
    return sorted(out, key=lambda r: r["time"])
