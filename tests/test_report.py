"""Reports: every number from evaluation.json, self-contained HTML with real PNGs, verdicts that say why."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from crews.run import run_goal_text
from reports.format import MAX_POINTS, downsample
from reports.run import list_runs, render, render_compare
from training.contracts import Budget, Evaluation, TrainPlan
from training.data import curate_to_workspace
from training.loop import train

ROOT = Path(__file__).resolve().parent.parent
FAQ = "examples/data/support_faq.jsonl"
NUMBER = re.compile(r"^-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?$")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ws = tmp_path_factory.mktemp("report-ws")
    fp = curate_to_workspace(str(ROOT / FAQ), ws, format="text").summary.fingerprint
    base = train(TrainPlan(task="pretrain", dataset=fp, size="tiny", budget=Budget(steps=8), seq_len=64, batch_size=4, lr=3e-3,
                           warmup_steps=2, eval_every=4, eval_batches=2, checkpoint_every=4), ws, "tiny-base", show_progress=False)
    goals = {"passed": f"fine-tune the model {base.final_dir} on {FAQ} with LoRA rank 4 for 6 steps so that perplexity is at most 100000",
             "failed": f"fine-tune the model {base.final_dir} on {FAQ} with LoRA rank 4 for 6 steps so that perplexity is at most 1.5"}
    return ws, {k: run_goal_text(g, ws) for k, g in goals.items()}


def _table(text: str, header: str) -> list[list[str]]:
    rows = []
    for line in text[text.index(header):].splitlines()[2:]:
        if not line.startswith("|"):
            break  # the table ends at its first non-table line
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _html_rows(html: str) -> list[list[str]]:
    table = html[html.index("<h2>Metrics</h2>"):html.index("</table>", html.index("<h2>Metrics</h2>"))]
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table, re.S) if "<td>" in row]


def _same(shown: str, value) -> bool:
    if value is None:
        return shown == "—"
    return NUMBER.match(shown) is not None and abs(float(shown.replace(",", "")) - value) <= 5e-4 * max(1.0, abs(value))


def _same_with_interval(shown: str, value, interval) -> bool:
    """`value (low–high)`: each number the one in evaluation.json."""
    if interval is None:
        return _same(shown, value)
    match = re.fullmatch(r"(\S+) \((\S+)–(\S+)\)", shown)
    return bool(match) and all(_same(got, want) for got, want in zip(match.groups(), (value, interval.low, interval.high)))


@pytest.mark.parametrize("which", ["passed", "failed"])
def test_every_number_shown_is_the_one_in_evaluation_json(runs, which):
    ws, results = runs
    run_id = results[which]["run_id"]
    md_path, html_path = render(ws, run_id)
    ev = Evaluation.model_validate_json((ws / "runs" / run_id / "evaluation.json").read_text())
    md, html = md_path.read_text(), html_path.read_text()
    md_rows, html_rows = _table(md, "| metric | records |"), _html_rows(html)
    assert [r[0] for r in md_rows] == [r[0] for r in html_rows] and len(md_rows) >= 4
    for md_row, html_row in zip(md_rows, html_rows):
        name = md_row[0]
        assert md_row[1] == html_row[1] == str(ev.intervals[name].n)  # the sample size beside every number
        keys = (f"base_{name}", name, f"production_{name}")
        for shown_md, shown_html, key in zip(md_row[2:5], html_row[2:5], keys):
            value, interval = ev.metrics.get(key), ev.intervals.get(key)
            assert _same_with_interval(shown_md, value, interval) and _same_with_interval(shown_html, value, interval), \
                (name, shown_md, shown_html, value, interval)
    assert ev.intervals["test_perplexity"].low < ev.metrics["test_perplexity"] < ev.intervals["test_perplexity"].high
    assert f"Judged on {ev.intervals['test_perplexity'].n} test records at 90% confidence." in md
    goal = results[which]["goal"]
    assert f"> {goal}" in md and goal in html  # quoted verbatim


def test_html_is_self_contained_with_real_pngs(runs):
    ws, results = runs
    _, html_path = render(ws, results["passed"]["run_id"])
    html = html_path.read_text()
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)  # the embedded images themselves
    assert not re.search(r"https?:|//[a-z]|<link|<script|@import|url\(|<iframe|<object", text, re.I)
    sources = re.findall(r'src="([^"]+)"', html)
    assert len(sources) >= 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    for s in sources:
        png = base64.b64decode(s.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR" and png[-8:-4] == b"IEND"


def test_a_failed_run_says_failed_and_why(runs):
    ws, results = runs
    md_path, html_path = render(ws, results["failed"]["run_id"])
    reason = results["failed"]["gate"]["reasons"][0]
    assert f"**Failed: {reason}." in md_path.read_text()
    assert "Failed:" in html_path.read_text() and "NOT met" in reason
    assert "Not deployed: the goal says never deploy." in md_path.read_text()  # and why it was not deployed


def test_rerendering_gives_the_same_files(runs):
    ws, results = runs
    first = [p.read_bytes() for p in render(ws, results["passed"]["run_id"])]
    second = [p.read_bytes() for p in render(ws, results["passed"]["run_id"])]
    assert first == second


def test_runs_list_and_compare(runs, cli):
    ws, results = runs
    listed = {r["run_id"]: r for r in list_runs(ws)}
    assert listed[results["passed"]["run_id"]]["verdict"] == "passed" and listed[results["failed"]["run_id"]]["verdict"] == "failed"
    md, html = render_compare(ws, results["passed"]["run_id"], results["failed"]["run_id"])
    text = md.read_text()
    assert results["passed"]["run_id"] in text and results["failed"]["run_id"] in text and "| test_perplexity |" in text
    assert html.read_text().count("data:image/png;base64,") == 1
    out = cli("runs", "compare", results["passed"]["run_id"], results["failed"]["run_id"], "--workspace", str(ws), "--json")
    assert out.exit_code == 0 and Path(out.json()["html"]).exists()
    listed_cli = cli("runs", "list", "--workspace", str(ws), "--json")
    assert {r["run_id"] for r in listed_cli.json()} >= {results["passed"]["run_id"], results["failed"]["run_id"]}
    rerendered = cli("report", results["passed"]["run_id"], "--workspace", str(ws), "--json")
    assert rerendered.exit_code == 0 and rerendered.json()["html"].endswith("report.html")
    missing = cli("report", "no-such-run", "--workspace", str(ws))
    assert missing.exit_code == 2 and "reports need a trained and evaluated run" in missing.stderr


def test_long_runs_are_downsampled_before_plotting():
    xs, ys = downsample(list(range(10_000)), [float(i) for i in range(10_000)])
    assert len(xs) <= MAX_POINTS + 1 and xs[0] == 0 and xs[-1] == 9_999 and xs == [int(y) for y in ys]


def test_the_narrative_gets_its_numbers_from_code_and_cannot_contradict_the_verdict(runs):
    from training.errors import InputError

    ws, results = runs
    failed = results["failed"]["run_id"]
    for text, message in [("Perplexity fell to 12.3, a fine result.", "write numbers only as placeholders"),
                          ("The run passed: {metric} reached {value}.", "it says the run passed, but the gate failed it"),
                          ("Good: {vibes}.", "unknown placeholder")]:
        with pytest.raises(InputError, match=message):
            render(ws, failed, narrative=text)
    assert not (ws / "runs" / failed / "narrative.json").exists()  # a refused narrative leaves nothing behind
    md, html = render(ws, failed, narrative="The run failed its gate: {metric} ended at {value} against {threshold}.",
                      author="gpt-test")
    ev = Evaluation.model_validate_json((ws / "runs" / failed / "evaluation.json").read_text())
    key = results["failed"]["metric"]
    expected = f"The run failed its gate: {key} ended at {ev.metrics[key]:.4g} against 1.5."
    assert expected in md.read_text() and expected in html.read_text()
    assert expected in render(ws, failed)[0].read_text()  # kept across re-renders
    assert "Written by the evaluator (gpt-test)" in md.read_text()  # an LLM's words are shown as its own
    passed = results["passed"]["run_id"]
    with pytest.raises(InputError, match="it says the run failed, but the gate passed it"):
        render(ws, passed, narrative="It failed to improve on {base}.")
