"""The crew: agents and tasks (YAML in `config/`), `ModelCrew`, goal parsing, `modelcrew run`, and the
retraining loop (the Flow in `loop.py`, its rules in `loop_policy.py`, its durable state in `loop_state.py`).

`crews` may import every layer below it except `cli`, which sits on top of it.
"""
