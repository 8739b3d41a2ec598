"""Run reports a team lead can decide from in a minute: `runs/<run_id>/report.md` and `report.html`.

Everything shown is read from the run's artefacts (evaluation.json, metrics.jsonl, plan.json,
result.json, gate.json, deployment.json, trace.jsonl, the dataset summary) and from memory (earlier
runs on similar data); numbers go through one formatter, so the Markdown, the HTML and the JSON agree.
The HTML is self-contained: inline CSS, plots as base64 PNG (matplotlib, Agg), no external URL.
Rendering is deterministic: the same artefacts give the same files.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from training.contracts import DatasetSummary, Deployment, Evaluation, GateVerdict, RunResult, TrainPlan
from training.errors import InputError

TEMPLATES = Path(__file__).parent / "templates"
METRIC_KEYS = ("val_perplexity", "test_perplexity", "general_perplexity", "accuracy", "exact_match", "f1", "rougeL")
MAX_POINTS = 1500  # plotted points per curve: a 10,000-step run renders as fast as a short one
PHASES = {"curate_dataset": "curate", "train_model": "train", "evaluate_model": "evaluate", "compare_with_history": "report",
          "write_report": "report", "register_model": "deploy", "promote_model": "deploy"}


def fmt(value) -> str:
    """The one number format of every report (4 significant digits)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def _load(path: Path, model):
    return model.model_validate_json(path.read_text(encoding="utf-8")) if path.exists() else None


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.exists() else []


def _downsample(xs: list, ys: list) -> tuple[list, list]:
    if len(xs) <= MAX_POINTS:
        return xs, ys
    step = len(xs) / MAX_POINTS
    idx = sorted({int(i * step) for i in range(MAX_POINTS)} | {len(xs) - 1})
    return [xs[i] for i in idx], [ys[i] for i in idx]


def png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})  # no version stamp: same bytes
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def gather(workspace: Path, run_id: str, goal_text: str | None = None) -> dict:
    """Everything a report shows, from the artefacts (and memory for the history)."""
    from training.data.store import datasets_dir

    workspace = Path(workspace)
    run_dir = workspace / "runs" / run_id
    ev = _load(run_dir / "evaluation.json", Evaluation)
    plan = _load(run_dir / "plan.json", TrainPlan)
    result = _load(run_dir / "result.json", RunResult)
    if ev is None or plan is None or result is None:
        raise InputError(f"run {run_id}: reports need a trained and evaluated run (plan.json, result.json, evaluation.json in {run_dir})")
    gate = _load(run_dir / "gate.json", GateVerdict)
    deployment = _load(run_dir / "deployment.json", Deployment)
    trace = _rows(run_dir / "trace.jsonl")
    crew = json.loads((run_dir / "crew_result.json").read_text()) if (run_dir / "crew_result.json").exists() else {}
    goal_text = goal_text or crew.get("goal") or next((e["text"] for e in trace if e.get("kind") == "goal"), None)
    summary = DatasetSummary.model_validate_json((datasets_dir(workspace) / plan.dataset / "summary.json").read_text(encoding="utf-8"))
    contamination_file = datasets_dir(workspace) / plan.dataset / "contamination.json"
    contaminated = len(json.loads(contamination_file.read_text())) if contamination_file.exists() else None
    memory_used = json.loads((run_dir / "memory_used.json").read_text()) if (run_dir / "memory_used.json").exists() else {}
    m = ev.metrics
    key = gate.metric if gate else ("test_perplexity" if "test_perplexity" in m else "val_perplexity")

    if gate is None:
        verdict, passed = "Not gated: no goal was given for this run.", None
    elif gate.passed:
        verdict, passed = f"Passed: {gate.reasons[0]}.", True
    else:
        verdict, passed = f"Failed: {gate.reasons[0]}.", False
    if deployment is not None:
        if deployment.alias:
            verdict += f" Deployed as {deployment.model_name}@{deployment.alias} ({deployment.version})."
        else:
            verdict += f" Not deployed: {deployment.reason}."

    metrics = []
    for name in METRIC_KEYS:
        if name in m:
            base, prod = m.get(f"base_{name}"), m.get(f"production_{name}")
            metrics.append({"name": name, "base": fmt(base), "candidate": fmt(m[name]), "production": fmt(prod),
                            "delta": f"{m[name] / base - 1:+.1%}" if base else "—",
                            "target": fmt(gate.threshold) if gate and name == key else ""})

    phases: dict[str, float] = {}
    for e in trace:
        if e.get("kind") == "tool" and e.get("tool") in PHASES:
            phases[PHASES[e["tool"]]] = phases.get(PHASES[e["tool"]], 0.0) + e["seconds"]
    if not phases:
        phases = {"train": result.wall_seconds, "evaluate": ev.seconds}

    rows = _rows(run_dir / "metrics.jsonl")
    history = []
    try:
        from memory.store import MemoryStore

        if not (workspace / "memory" / "chroma").exists():
            raise FileNotFoundError("no memory index in this workspace")  # a report never creates one
        store = MemoryStore(workspace)
        fingerprints = [plan.dataset]
        if store.show(plan.dataset) is not None:  # indexed: its stored vector finds neighbours without loading a model
            fingerprints += [s.fingerprint for s in store.similar_datasets(summary, k=5) if s.similarity >= 0.5]
        for fp in fingerprints:
            for past in store.history(fingerprint=fp):
                if key in past.metrics:
                    history.append({"run_id": past.run_id, "value": past.metrics[key], "created_at": past.created_at,
                                    "this": past.run_id == run_id})
    except Exception:  # memory unavailable (never built in this workspace): the report still renders
        history = []
    if not any(h["this"] for h in history) and key in m:
        history.append({"run_id": run_id, "value": m[key], "created_at": ev.created_at or "", "this": True})
    history.sort(key=lambda h: (h["created_at"], h["run_id"]))

    train_records = [json.loads(line) for line in (datasets_dir(workspace) / plan.dataset / "train.jsonl").read_text().splitlines()
                     if line.strip()] if (datasets_dir(workspace) / plan.dataset / "train.jsonl").exists() else []
    lengths = [len(json.dumps(r, ensure_ascii=False)) for r in train_records]

    return {"run_id": run_id, "goal_text": goal_text, "verdict": verdict, "passed": passed, "metric": key,
            "metrics": metrics, "gate_reasons": gate.reasons if gate else [], "ev": ev, "plan": plan, "result": result,
            "summary": summary, "contaminated": contaminated, "deployment": deployment, "phases": phases,
            "rows": rows, "history": history, "lengths": lengths, "memory_used": memory_used.get("reused_from"),
            "recommendations": recommendations(rows, m, summary, gate), "fmt": fmt,
            "general": (fmt(m.get("base_general_perplexity")), fmt(m.get("general_perplexity"))),
            "code_version": _code_version(), "narrative": None}


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
        out.append(f"Forgetting: general-text perplexity rose {g / bg - 1:+.1%} ({fmt(bg)} -> {fmt(g)}); consider LoRA, "
                   "a lower lr or mixing general text back in.")
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
              "verdict": "passed" if data["passed"] else ("failed" if data["passed"] is False else "not gated"),
              "steps": fmt(data["result"].steps), "run_id": data["run_id"]}
    return template.format_map(values)


def plots(data: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    steps = [r["step"] for r in rows if r.get("loss") is not None]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    xs, ys = _downsample(steps, losses)
    ax.plot(xs, ys, label="training loss", color="#4c72b0", linewidth=1)
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:
        vx, vy = _downsample([v[0] for v in val], [v[1] for v in val])
        ax.plot(vx, vy, "o-", label="validation loss", color="#dd8452", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    figures.append(("Training and validation loss", png(fig)))

    key = data["metric"]
    m = data["ev"].metrics
    bars = [("base", m.get(f"base_{key}")), ("candidate", m.get(key)), ("production", m.get(f"production_{key}"))]
    bars = [(n, v) for n, v in bars if v is not None]
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.bar([n for n, _ in bars], [v for _, v in bars], color=["#8c8c8c", "#4c72b0", "#55a868"][: len(bars)])
    for i, (_, v) in enumerate(bars):
        ax.text(i, v, fmt(v), ha="center", va="bottom")
    gate_threshold = next((r["target"] for r in data["metrics"] if r["name"] == key and r["target"]), "")
    if gate_threshold and gate_threshold != "—":
        ax.axhline(float(gate_threshold), color="#c44e52", linestyle="--", label=f"target {gate_threshold}")
        ax.legend()
    ax.set_ylabel(key)
    figures.append((f"{key}: base, candidate, production", png(fig)))

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


def render(workspace: Path, run_id: str, goal_text: str | None = None, narrative: str | None = None) -> tuple[Path, Path]:
    """Write report.md and report.html for `run_id`; returns their paths."""
    data = gather(workspace, run_id, goal_text)
    saved = Path(workspace) / "runs" / run_id / "narrative.json"
    if narrative is not None:
        narrative_text(narrative, data)  # refuse before anything is written
        saved.write_text(json.dumps({"template": narrative}), encoding="utf-8")
    if saved.exists():
        data["narrative"] = narrative_text(json.loads(saved.read_text(encoding="utf-8"))["template"], data)
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]), keep_trailing_newline=True)
    run_dir = Path(workspace) / "runs" / run_id
    md = run_dir / "report.md"
    html = run_dir / "report.html"
    md.write_text(env.get_template("report.md.j2").render(**data), encoding="utf-8")
    html.write_text(env.get_template("report.html.j2").render(**data, plots=plots(data)), encoding="utf-8")
    return md, html


def write_markdown_report(workspace: Path, run_id: str, goal, goal_text: str, narrative: str | None = None) -> Path:
    """The evaluator's tool entry point: both files; returns the Markdown path."""
    md, _ = render(Path(workspace), run_id, goal_text or None, narrative)
    return md


def render_compare(workspace: Path, run_a: str, run_b: str) -> tuple[Path, Path]:
    """A side-by-side report of two runs (`reports/compare-A-vs-B.md` and `.html`), in the same format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = gather(Path(workspace), run_a), gather(Path(workspace), run_b)
    names = [n for n in METRIC_KEYS if n in a["ev"].metrics or n in b["ev"].metrics]
    rows = []
    for n in names:
        va, vb = a["ev"].metrics.get(n), b["ev"].metrics.get(n)
        rows.append({"name": n, "a": fmt(va), "b": fmt(vb), "delta": f"{vb / va - 1:+.1%}" if va and vb is not None else "—"})
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    for data, color in ((a, "#4c72b0"), (b, "#dd8452")):
        val = [(r["step"], r["val_loss"]) for r in data["rows"] if r.get("val_loss") is not None]
        xs, ys = _downsample([r["step"] for r in data["rows"]], [r["loss"] for r in data["rows"]])
        ax.plot(xs, ys, color=color, linewidth=1, alpha=0.6, label=f"{data['run_id']} training")
        if val:
            ax.plot([v[0] for v in val], [v[1] for v in val], "o-", color=color, markersize=3, label=f"{data['run_id']} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    curves = png(fig)
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]), keep_trailing_newline=True)
    out = Path(workspace) / "reports"
    out.mkdir(parents=True, exist_ok=True)
    md, html = out / f"compare-{run_a}-vs-{run_b}.md", out / f"compare-{run_a}-vs-{run_b}.html"
    context = {"a": a, "b": b, "rows": rows, "fmt": fmt, "curves": curves}
    md.write_text(env.get_template("compare.md.j2").render(**context), encoding="utf-8")
    html.write_text(env.get_template("compare.html.j2").render(**context), encoding="utf-8")
    return md, html


def list_runs(workspace: Path) -> list[dict]:
    """One row per evaluated run: run, goal, metric, verdict, deployed, time."""
    out = []
    for ev_path in sorted((Path(workspace) / "runs").glob("*/evaluation.json")):
        run_dir = ev_path.parent
        ev = _load(ev_path, Evaluation)
        gate = _load(run_dir / "gate.json", GateVerdict)
        dep = _load(run_dir / "deployment.json", Deployment)
        crew = json.loads((run_dir / "crew_result.json").read_text()) if (run_dir / "crew_result.json").exists() else {}
        key = gate.metric if gate else ("test_perplexity" if "test_perplexity" in ev.metrics else "val_perplexity")
        out.append({"run_id": run_dir.name, "goal": crew.get("goal", ""), "metric": key, "value": ev.metrics.get(key),
                    "verdict": "not gated" if gate is None else ("passed" if gate.passed else "failed"),
                    "deployed": f"{dep.model_name}@{dep.alias}" if dep and dep.alias else "no",
                    "time": ev.created_at or ""})
    return sorted(out, key=lambda r: r["time"])
