"""Thin CrewAI tools over `steps` (and `memory` and `serving` for look-ups).

Each tool validates its (untrusted, LLM-chosen) arguments, confines paths to the workspace, calls one
step and answers with a short JSON object. `tools` may import crewai and the layers below it; never
`llm`, `crews` or `cli`.
"""
