"""The agents' LLM backends: the offline policy, CrewAI's models, and the protocol the crew's tasks speak.

    backends.py   `make_llm(--llm, --llm-base-url)`: the offline policy or a CrewAI model
    offline.py    the offline policy: a deterministic, rule-based stand-in for a language model
    protocol.py   the machine-readable header of every task description, written and read by code
    env.py        CrewAI's switches for running offline (telemetry, tracing, version check, storage)

The agents themselves (roles in YAML, tasks, the crew) live in `crews/`. `llm` may import crewai,
`tools` and the layers below; never `crews` or `cli`.
"""
