"""The model registry (versions, aliases, promote, rollback) and the OpenAI-compatible HTTP server.

`serving` may import `training` and `memory`; never crewai, `tools`, `agents` or `crews`.
"""
