"""The four agent roles (data curator, trainer, evaluator, deployer) and the LLM backends that drive them.

`agents` may import crewai, `tools` and the layers below; never `crews`.
"""
