"""Evaluate what is deployed: the exact artifact behind an OpenAI-compatible endpoint, through HTTP.

`Served` has the two methods `training.evaluate.score_model` scores with (`losses`, `answers`), so a
served model gets the same metrics, on the same records cut the same way, as `modelcrew eval` gives the
run in process: log-likelihoods from `/v1/completions` with `echo` and `logprobs` over token-id prompts
(no re-tokenisation on the server), greedy answers from the same endpoint at temperature 0. Any server
that implements those (ours, vLLM) can be scored; the tokenizer is the run's own.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from training.batches import IGNORE, Example, read_split
from training.contracts import Interval
from training.errors import InputError

BATCH = 8  # prompts per request


class Served:
    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 600.0,
                 context: int | None = None) -> None:
        self.context = context  # the served model's, as its run's config says (windows of text must fit it)
        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout)

    def _complete(self, body: dict) -> list[dict]:
        try:
            response = self.client.post(f"{self.url}/completions", json={"model": self.model, **body})
        except httpx.HTTPError as err:
            raise InputError(f"--served: cannot reach {self.url} ({type(err).__name__}: {err})") from None
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except Exception:
                message = response.text[:200]
            raise InputError(f"--served: {self.url}/completions answered {response.status_code}: {message}")
        return sorted(response.json()["choices"], key=lambda c: c["index"])

    def losses(self, examples: list[Example]) -> list[list[float]]:
        """[summed loss, tokens] over each example's supervised tokens, from the server's prompt log-probs."""
        out = []
        for start in range(0, len(examples), BATCH):
            chunk = examples[start : start + BATCH]
            choices = self._complete({"prompt": [e.input_ids.tolist() for e in chunk], "echo": True, "logprobs": 0,
                                      "max_tokens": 0, "temperature": 0})
            for e, choice in zip(chunk, choices):
                logprobs = choice["logprobs"]["token_logprobs"]  # entry j: log p(token j | tokens before it)
                targets = [j for j in range(1, len(e.input_ids)) if e.labels[j] != IGNORE]
                out.append([round(-sum(logprobs[j] for j in targets), 5), len(targets)])
        return out

    def answers(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        out = []
        for start in range(0, len(prompts), BATCH):
            choices = self._complete({"prompt": prompts[start : start + BATCH], "max_tokens": max_new_tokens,
                                      "temperature": 0})
            out += [c["text"].strip() for c in choices]
        return out


def evaluate_served(workspace: Path, run_id: str, url: str, model: str, api_key: str | None = None,
                    max_examples: int | None = None) -> dict:
    """The served model's metrics on run `run_id`'s evaluation records (its test split, its forgetting corpus,
    its seq_len, its tokenizer), each with its interval, and the paired difference from the run's own
    in-process evaluation when it has one: a deployed artifact that differs from what was gated shows here."""
    from training import stats
    from training.data.store import datasets_dir, load_summary
    from training.evaluate import forgetting_corpus, score_model
    from training.runs import Run

    started = time.perf_counter()
    run = Run(workspace, run_id).require()
    plan = run.plan()
    model_dir = run.model_dir("best") if (run.model_dir("best") / "lineage.json").exists() else run.model_dir("final")
    if plan is None or not (model_dir / "lineage.json").exists():
        raise InputError(f"{run_id}: no trained model in {run.dir}; --served scores an endpoint on a trained run's records")
    import json

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lineage = json.loads((model_dir / "lineage.json").read_text(encoding="utf-8"))
    forgetting, corpus = forgetting_corpus(workspace, lineage.get("reference_dir") or lineage.get("base_dir"))
    summary = load_summary(workspace, plan.dataset)
    splits = {name: read_split(datasets_dir(workspace) / plan.dataset, name) for name in ("train", "val", "test")}
    config = model_dir / "config.json" if (model_dir / "config.json").exists() else Path(lineage["base_dir"]) / "config.json"
    context = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")  # an adapter: its base's
    scores = score_model(Served(url, model, api_key, context=context), tokenizer, summary.format, splits, forgetting, plan.seq_len, max_examples)
    metrics, intervals, versus_run = {}, {}, {}
    gated = run.evaluation()
    for metric, values in scores.values.items():
        if not values:
            continue
        low, high = stats.interval(values)
        metrics[metric] = round(stats.value(values), 6)
        intervals[metric] = Interval(n=len(values), low=round(low, 6), high=round(high, 6)).model_dump()
        mine = gated.per_record.get("candidate", {}).get(metric) if gated else None
        if mine and len(mine) == len(values):
            change, low, high = stats.paired(values, mine, ratio="perplexity" in metric)
            versus_run[metric] = {"change": round(change, 6), "low": round(low, 6), "high": round(high, 6)}
    return {"run_id": run_id, "served": url, "model": model, "metrics": metrics, "intervals": intervals,
            "versus_run": versus_run, "general_corpus": corpus, "scoring": scores.notes,
            "seconds": round(time.perf_counter() - started, 2)}
