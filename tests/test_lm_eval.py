"""lm-evaluation-harness (the real `lm_eval` package) against our server, checked against in-process scoring.

A tiny model pretrained here is served by a real uvicorn server; lm_eval runs a multiple-choice task through
`local-completions` (prompts as token ids, then as text) and a generation task through
`local-chat-completions` with the chat template. Its numbers must equal what the transformers model
computes directly in this process: per-choice log-likelihoods, acc, acc_norm, generated strings, exact_match.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = "1"  # nothing is downloaded: the tasks read local JSONL files
os.environ["HF_HUB_OFFLINE"] = "1"

import httpx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from lm_eval.evaluator import simple_evaluate  # noqa: E402  (a dev dependency: pip install -e .[dev])
from lm_eval.tasks import TaskManager  # noqa: E402

from serving.server import create_app  # noqa: E402
from tests.helpers import pretrain_tiny_base  # noqa: E402
from tests.test_serving import FAQ, TINY, Server  # noqa: E402

FAQS = [json.loads(line) for line in FAQ.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # one step: the model still answers each prompt differently (a few more and every answer is " the the the"),
    # so equal generations mean the server decoded each prompt as transformers does
    return pretrain_tiny_base(tmp_path_factory.mktemp("lm-eval-ws"), "tiny", steps=1, seed=3, **TINY)


@pytest.fixture(scope="module")
def local(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    with Server(create_app(str(model_dir), max_batch=8)) as s:
        yield s


def _evaluate(tmp_path: Path, task: dict, rows: list[dict], model: str, model_args: dict, **kwargs) -> dict:
    """Run lm_eval on a custom task: a YAML config over a local JSONL file."""
    data = tmp_path / f"{task['task']}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test", **task}
    (tmp_path / f"{task['task']}.yaml").write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return simple_evaluate(model=model, model_args=model_args, tasks=[task["task"]],
                           task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True, bootstrap_iters=0,
                           **kwargs)


# ---- the API shapes lm-eval relies on ---------------------------------------------------------------


def test_completions_take_lists_of_prompts_as_text_or_token_ids(server, model_dir, local):
    _, tok = local
    url = server.url + "/v1/completions"
    texts = ["The water tank is empty", "Brewly", "How do I descale my brewer?"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    base = {"model": model_dir.name, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
    before = httpx.get(server.url + "/health").json()
    by_ids = httpx.post(url, json={**base, "prompt": ids}, timeout=60).json()
    after = httpx.get(server.url + "/health").json()
    assert after["batched_requests"] - before["batched_requests"] == 3 and after["batches"] - before["batches"] == 1
    by_text = httpx.post(url, json={**base, "prompt": texts}, timeout=60).json()
    single = httpx.post(url, json={**base, "prompt": ids[1]}, timeout=60).json()
    assert [c["index"] for c in by_ids["choices"]] == [0, 1, 2]
    for choice, text, n in zip(by_ids["choices"], texts, map(len, ids)):
        assert choice["text"].startswith(text)
        assert len(choice["logprobs"]["token_logprobs"]) == n + 1  # the prompt's tokens, then the generated one
    assert by_ids["usage"]["prompt_tokens"] == sum(map(len, ids)) and by_ids["usage"]["completion_tokens"] == 3
    for a, b in zip(by_ids["choices"], by_text["choices"]):  # text and ids are the same prompt
        assert a["logprobs"]["token_logprobs"][1:] == pytest.approx(b["logprobs"]["token_logprobs"][1:], abs=1e-4)
    many = httpx.post(url, json={**base, "prompt": ids * 4}, timeout=60).json()  # more than the server's max_batch of 8
    assert httpx.get(server.url + "/health").json()["batches"] - after["batches"] == 4  # by_text, single, then 8 + 4
    assert [c["text"] for c in many["choices"]] == [c["text"] for c in by_ids["choices"]] * 4
    # batched with padding, or alone: the same numbers
    assert single["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        by_ids["choices"][1]["logprobs"]["token_logprobs"][1:], abs=1e-4)

    def refused(prompt, **extra) -> str:
        r = httpx.post(url, json={**base, "prompt": prompt, **extra}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] in ("prompt", "stream", "stop"), r.text
        return r.json()["error"]["message"]

    vocab = len(tok)
    assert refused([[1, 2], [3, vocab]]) == f"prompt[1]: token id {vocab} is outside the vocabulary (size {vocab})"
    assert refused([-1]) == f"prompt: token id -1 is outside the vocabulary (size {vocab})"
    assert refused([]) == "prompt: an empty list"
    assert refused(["a", [1]]).startswith("prompt: give a string, a list of strings")
    assert refused(["a", ""]) == "prompt[1]: empty"
    assert refused(["a", "b"], stream=True).startswith("stream: streaming takes one prompt, not 2")
    assert refused("a", stop=[str(i) for i in range(17)]) == "stop: at most 16 non-empty sequences"


# ---- lm_eval end to end -----------------------------------------------------------------------------


def _encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) pair into tokens: encode the whole, cut at the context's length."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n = len(tok(context, add_special_tokens=False)["input_ids"])
    return whole[:n], whole[n:]


@torch.no_grad()
def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    ctx, cont = _encode_pair(tok, context, continuation)
    logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_an_end_token_generated_while_scoring_is_listed_for_lm_eval_to_slice_off(model_dir, local):
    from fastapi.testclient import TestClient
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    model, tok = local
    context, continuation = "Question: How do I descale my brewer?\nAnswer:", " Rinse the water tank"
    ctx, cont = _encode_pair(tok, context, continuation)
    app = create_app(str(model_dir))
    with torch.no_grad():
        following = int(model(torch.tensor([ctx + cont])).logits[0, -1].argmax())
    app.state.slot.get()[1].eos_ids.add(following)  # the model's next pick now ends its answer, as an end token would
    body = TestClient(app).post("/v1/completions", json={"model": model_dir.name, "prompt": [ctx + cont], "max_tokens": 1,
                                                         "temperature": 0, "echo": True, "logprobs": 1}).json()
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["text"] == tok.decode(ctx + cont)
    # lm-eval drops the last entry as the generated token: without it, the continuation's last token would go
    [(ll, _)] = LocalCompletionsAPI.parse_logprobs(body, ctxlens=[len(ctx)])
    assert ll == pytest.approx(_loglikelihood(model, tok, context, continuation), abs=1e-3)


def _mc_rows() -> list[dict]:
    rows = []
    for i, faq in enumerate(FAQS[:10]):
        choices = [" ".join(FAQS[(i + k) % len(FAQS)]["answer"].split()[:4]) for k in range(4)]
        gold = i % 4
        choices[0], choices[gold] = choices[gold], choices[0]  # the true answer's start at varying positions
        rows.append({"question": faq["question"], "choices": choices, "gold": gold})
    return rows


@pytest.mark.parametrize("tokenized", [True, False], ids=["token-ids", "text"])
def test_multiple_choice_through_local_completions_equals_in_process_scoring(server, model_dir, local, tmp_path,
                                                                             tokenized):
    model, tok = local
    rows = _mc_rows()
    task = {"task": "faq_mc", "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_choice": "choices", "doc_to_target": "gold", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    before = httpx.get(server.url + "/health").json()
    # max_length: the model's context (lm-eval keeps prompt + 1 generated token under it)
    out = _evaluate(tmp_path, task, rows, "local-completions", {
        "model": model_dir.name, "base_url": server.url + "/v1/completions", "tokenizer": str(model_dir),
        "tokenizer_backend": "huggingface", "tokenized_requests": tokenized, "max_length": 128, "max_retries": 1},
        batch_size=4)
    after = httpx.get(server.url + "/health").json()

    expected = []  # in process: each choice's summed continuation log-probs, then lm-eval's two argmaxes
    for row in rows:
        context, conts = f"Question: {row['question']}\nAnswer:", [f" {c}" for c in row["choices"]]
        lls = [_loglikelihood(model, tok, context, c) for c in conts]
        expected.append((lls, int(lls.index(max(lls)) == row["gold"]),
                         int(max(range(4), key=lambda k: lls[k] / len(conts[k])) == row["gold"])))
    samples = sorted(out["samples"]["faq_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(rows)
    for sample, (lls, acc, acc_norm) in zip(samples, expected):
        assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(lls, abs=1e-3)
        assert (sample["acc"], sample["acc_norm"]) == (acc, acc_norm)
    metrics = out["results"]["faq_mc"]
    assert metrics["acc,none"] == pytest.approx(sum(e[1] for e in expected) / len(rows), abs=1e-9)
    assert metrics["acc_norm,none"] == pytest.approx(sum(e[2] for e in expected) / len(rows), abs=1e-9)
    # 40 choices sent 4 to a request, one request at a time: the server decoded each request's prompts together
    assert after["batched_requests"] - before["batched_requests"] == 40 and after["batches"] - before["batches"] == 10


@torch.no_grad()
def _greedy(model, tok, question: str, stop: str, max_new: int) -> str:
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    ids = tok(ids, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, do_sample=False, max_new_tokens=max_new, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).split(stop)[0]


def test_generation_through_local_chat_completions_equals_in_process_greedy(server, model_dir, local, tmp_path):
    model, tok = local
    stop, max_new = ".", 8
    questions = [f["question"] for f in FAQS[:8]]
    greedy = [_greedy(model, tok, q, stop, max_new) for q in questions]
    assert len(set(greedy)) > 1, greedy  # the comparison below means something only if answers differ
    # half the targets are what the model says in process, half the true answers (which it does not say):
    # lm-eval's exact_match is 0.5 only if the server generates exactly what transformers does
    rows = [{"question": q, "answer": g if i % 2 == 0 else FAQS[i]["answer"].split(".")[0]}
            for i, (q, g) in enumerate(zip(questions, greedy))]
    expected_em = sum(r["answer"] == g for r, g in zip(rows, greedy)) / len(rows)
    task = {"task": "faq_gen", "output_type": "generate_until", "doc_to_text": "question", "doc_to_target": "answer",
            "generation_kwargs": {"until": [stop], "max_gen_toks": max_new, "do_sample": False, "temperature": 0},
            "metric_list": [{"metric": "exact_match"}]}
    out = _evaluate(tmp_path, task, rows, "local-chat-completions", {
        "model": model_dir.name, "base_url": server.url + "/v1/chat/completions", "max_retries": 1},
        apply_chat_template=True)
    samples = sorted(out["samples"]["faq_gen"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in samples] == greedy
    assert expected_em == 0.5 and out["results"]["faq_gen"]["exact_match,none"] == pytest.approx(expected_em)
