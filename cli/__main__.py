"""`python -m cli …` is `modelcrew …`."""

from cli import main

main()
