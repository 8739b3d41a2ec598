"""The steps of a run, one function each, over the engine, memory and the registry.

    curate.py     curate a dataset, record it in memory, find near-duplicates and contamination
    plan.py       the training plan for a goal (memory's best config first, bounded overrides)
    train.py      train (or continue) a planned run
    evaluate.py   evaluate, score production on the same set, gate, record in memory; compare with history
    deploy.py     register a run once; record what the deployer did (run, memory, report)
    report.py     the run's report and the lesson kept about it
    context.py    `RunContext`: what code knows about one crew run, filled in as the steps finish

The CLI (`cli/`), the crew's tools (`tools/`) and the retraining loop (`crews/loop.py`) call these and
nothing below them for the same work, so a step behaves the same whoever asks for it. `steps` may
import `training`, `memory`, `serving` and `reports`; never crewai, `tools`, `llm`, `crews` or `cli`.
"""
