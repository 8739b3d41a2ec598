"""The loop report: `<workspace>/loop/report.md` and a self-contained `report.html` (plots inlined as PNG).

A timeline of rounds — why each started, the data it added, the candidate's metric against production's
on the same evaluation set, the verdict, deployments and rollbacks — and production's metric across rounds.
Every number comes from the loop's state (`loop/state.json`), which the rounds wrote from their artefacts;
the caller passes the state (a `crews.loop_state.LoopState`), so this module needs nothing of the crew.
"""

from __future__ import annotations

from pathlib import Path

from reports.format import fmt, png, pyplot, write_rendered

NEWEST = {"production": "production on all new records", "previous": "previous on all new records",
          "candidate_heldout": "candidate on the new held-out records", "production_heldout": "production on the new held-out records"}


def production_series(state) -> list[tuple[int, float | None]]:
    """Production's metric after each round, on that round's evaluation set: the deployed candidate's value,
    else production's own score (or the candidate's base when nothing was in production yet)."""
    points = []
    for r in state.rounds:
        if r.route != "retrain" or r.status != "done":
            continue
        points.append((r.number, r.candidate if r.deployed else r.production_value))
    return points


def timeline(state) -> list[dict]:
    """One row per round (the running one last): why it started, its data, numbers, verdict and action."""
    rows = []
    for r in state.rounds + ([state.current] if state.current else []):
        if r.rolled_back:
            action = f"rolled back {r.rolled_back}"
        elif r.deployed:
            action = f"deployed {r.deployed}"
        elif r.status == "running":
            action = f"running (after {r.steps[-1] if r.steps else 'start'})"
        elif r.status == "failed":
            action = f"failed: {r.error}"
        else:
            action = "kept production" + (f" {r.production_after}" if r.production_after else "")
        rows.append({
            "number": r.number, "started": r.started_at.replace("T", " ").removesuffix("+00:00"),
            "triggers": "; ".join(f"{t.kind}: {t.detail}" for t in r.triggers), "route": r.route,
            "data": (f"{fmt(r.new_records)} new, {fmt(r.replayed)} replayed, {fmt(r.eval_records)} earlier eval"
                     if r.route == "retrain" else f"{fmt(r.new_records)} new, left for the next round"),
            "warm_start": (r.warm_start or "base") if r.route == "retrain" else "—", "metric": r.metric or "—",
            "candidate": fmt(r.candidate),
            "production": fmt(r.production_value),
            "verdict": "—" if r.passed is None else ("passed" if r.passed else "rejected"),
            "why": r.reasons[0] if r.reasons else "", "action": action, "run_id": r.run_id if r.route == "retrain" else None,
            "newest": "; ".join(f"{NEWEST.get(k, k)} {fmt(v)}" for k, v in r.newest.items()) or "—"})
    return rows


def feedback_rows(state) -> list[dict]:
    """A feedback loop: one row per version that answered, with its rate of good answers (rated good / rated)."""
    return [{"version": v, "completions": fmt(s["completions"]), "rated": fmt(s["rated"]), "good": fmt(s["good"]),
             "bad": fmt(s["bad"]), "corrected": fmt(s["corrected"]),
             "good_rate": "—" if s["good_rate"] is None else f"{s['good_rate']:.1%}"}
            for v, s in state.feedback_rates.items()]


def plot(state) -> str | None:
    """Production's metric across rounds with every candidate and rollback, as base64 PNG (None before a finished round)."""
    done = [r for r in state.rounds if r.route == "retrain" and r.status == "done" and r.candidate is not None]
    if not done:
        return None
    metric = done[-1].metric
    fig, ax = pyplot().subplots(figsize=(6.8, 3.4))
    series = production_series(state)
    xs = [x for x, y in series if y is not None]
    ax.step(xs, [y for _, y in series if y is not None], where="post", color="#55a868", linewidth=2,
            label="production (after the round)")
    for label, picked, style in (("deployed candidate", [r for r in done if r.deployed], {"marker": "o", "color": "#4c72b0"}),
                                 ("rejected candidate", [r for r in done if not r.deployed], {"marker": "x", "color": "#c44e52"})):
        if picked:
            ax.plot([r.number for r in picked], [r.candidate for r in picked], linestyle="none", markersize=8,
                    label=label, **style)
    for r in state.rounds:
        if r.rolled_back:
            ax.axvline(r.number, color="#8172b2", linestyle="--", linewidth=1)
            ax.text(r.number, ax.get_ylim()[1], f"rollback {r.rolled_back} ", color="#8172b2", fontsize=7, va="top", ha="right")
    ax.set_xlabel("round")
    ax.set_ylabel(f"{metric} (each round's evaluation set)")
    ax.set_xticks([r.number for r in state.rounds])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


def render_loop_report(workspace: Path, state) -> tuple[Path, Path]:
    """Write `loop/report.md` and `loop/report.html` from the loop's state; returns their paths."""
    out = Path(workspace) / "loop"
    done = [r for r in state.rounds if r.status == "done"]
    data = {
        "metric": next((r.metric for r in state.rounds if r.metric), "metric"),
        "goal_text": state.settings.goal_text, "watch": state.settings.watch, "rows": timeline(state),
        "model_name": state.goal.model_name, "production": next((r.production_after for r in reversed(state.rounds)
                                                                 if r.production_after), None),
        "counts": {"rounds": len(state.rounds), "deployed": sum(bool(r.deployed) for r in done),
                   "rejected": sum(r.passed is False for r in done), "rolled_back": sum(bool(r.rolled_back) for r in done),
                   "failed": sum(r.status == "failed" for r in state.rounds)},
        "settings": state.settings, "checks": state.checks, "fmt": fmt, "feedback": feedback_rows(state),
    }
    md = write_rendered(out / "report.md", "loop_report.md.j2", **data)
    html = write_rendered(out / "report.html", "loop_report.html.j2", **data, plot=plot(state))
    return md, html
