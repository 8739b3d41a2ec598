"""The top layer: the crew and its tasks, the retraining Flow, goal parsing, reports and the CLI.

`crews` may import every layer below it. The CLI (`crews.cli`) imports heavy libraries (torch,
transformers, crewai, chromadb) lazily inside the commands that need them, so `--help` stays fast.
"""
