"""Thin CrewAI tools over `training`, `memory` and `serving`.

Each tool validates its (untrusted, LLM-chosen) arguments, confines paths to the workspace, calls the
engine and returns a short summary. `tools` may import crewai and the three layers below it; never
`agents` or `crews`.
"""
