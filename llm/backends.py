"""The agents' LLM, chosen by `--llm` / `MODELCREW_LLM` and `--llm-base-url` / `MODELCREW_LLM_BASE_URL`.

- `offline` (default): the deterministic policy in `llm.offline` — no network, not a language model;
- any CrewAI model string (`openai/gpt-4o-mini`, `anthropic/claude-…`, `ollama/llama3.1`), the key from
  the provider's usual environment variable;
- with a base URL: any OpenAI-compatible server (vLLM, llama.cpp, LM Studio, modelcrew's own server);
  the key from `MODELCREW_LLM_API_KEY` or `OPENAI_API_KEY` (a placeholder when the server needs none).
"""

from __future__ import annotations

import os

OFFLINE = "offline"


def make_llm(spec: str | None = None, base_url: str | None = None):
    spec = spec or os.environ.get("MODELCREW_LLM") or OFFLINE
    base_url = base_url or os.environ.get("MODELCREW_LLM_BASE_URL")
    if spec == OFFLINE and not base_url:
        from llm.offline import OfflineLLM

        return OfflineLLM()
    from crewai import LLM

    if base_url:
        model = spec if spec != OFFLINE else "openai/default"
        if "/" not in model:
            model = f"openai/{model}"
        key = os.environ.get("MODELCREW_LLM_API_KEY") or os.environ.get("OPENAI_API_KEY") or "not-needed"
        return LLM(model=model, base_url=base_url, api_key=key, temperature=0)
    return LLM(model=spec, temperature=0)
