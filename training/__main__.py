"""`python -m training …`: the engine's commands (data, train, estimate, eval) without the crew.

This entry script is the one file of `training/` that is not the engine: it runs the very command
functions of `modelcrew` (`cli.engine_app`), so both list the same commands with the same options.
`python -m training train …` also runs under `torchrun --nproc_per_node N -m training train …` and
`accelerate launch -m training train …`.
"""

from cli import engine_app

engine_app(prog_name="python -m training")
