"""The agents' memory: a persistent Chroma store of dataset summaries, evaluations and lessons.

`memory` may import `training` (for the contracts) and chromadb; never crewai, `serving`, `tools`,
`agents` or `crews`. The workspace's JSON artefacts are the truth; Chroma is an index rebuilt from them.
"""
