"""Reports: what the engine did, rendered for people.

- `reports.run`: a run's report (`runs/<run_id>/report.md` and a self-contained `report.html`), the
  side-by-side comparison of two runs (`reports/compare-A-vs-B.md`, `.html`) and the list of evaluated runs;
- `reports.loop`: the retraining loop's timeline of rounds (`loop/report.md`, `report.html`);
- `reports.terminal`: rich tables of datasets, runs, evaluations and memory hits for the CLI;
- `reports.format`: the one number format (`fmt`), plots as base64 PNG, and the templates (`reports/templates/`).

Every number shown comes from the artefacts (read through `training.runs.Run` and `training.data.store`)
or from memory, and goes through `fmt`, so the Markdown, the HTML and the JSON agree. Rendering is
deterministic: the same artefacts give the same bytes. This package may import `training` and `memory`,
never the crew (crewai, tools, agents, crews).
"""
