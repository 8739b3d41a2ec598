"""Registry and OpenAI-compatible server: real files, a real uvicorn server, the official `openai` client."""

from __future__ import annotations

import concurrent.futures
import shutil
import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from serving.registry import Registry, policy
from serving.server import create_app
from training.contracts import Budget, Evaluation, GateVerdict, TrainPlan
from training.data import curate_to_workspace
from training.errors import InputError
from training.loop import train

ROOT = Path(__file__).resolve().parent.parent
FAQ = ROOT / "examples" / "data" / "support_faq.jsonl"
TINY = dict(seq_len=64, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=3, eval_batches=2, checkpoint_every=3)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace with two tiny trained models (different seeds: different weights, different answers)."""
    ws = tmp_path_factory.mktemp("serve-ws")
    fp = curate_to_workspace(str(FAQ), ws, format="text").summary.fingerprint
    for run_id, seed in (("tiny-a", 1), ("tiny-b", 2)):
        train(TrainPlan(task="pretrain", dataset=fp, size="tiny", budget=Budget(steps=6), seed=seed, **TINY), ws, run_id,
              show_progress=False)
    return ws


def _evaluation(run_id: str, ppl: float, dataset: str = "fp") -> Evaluation:
    return Evaluation(run_id=run_id, dataset=dataset, format="text", base_model=None, model_dir="x",
                      metrics={"val_perplexity": ppl}, examples={}, samples=[], general_corpus="", seconds=0)


def _gate(passed: bool) -> GateVerdict:
    return GateVerdict(passed=passed, metric="val_perplexity", reasons=[] if passed else ["val_perplexity above target"])


# ---- registry --------------------------------------------------------------------------------------


def test_register_promote_rollback_and_history(ws, tmp_path):
    reg = Registry(tmp_path)
    v1 = reg.register("support-bot", ws / "runs" / "tiny-a" / "final", _evaluation("tiny-a", 30.0), _gate(True))
    v2 = reg.register("support-bot", ws / "runs" / "tiny-b" / "final", _evaluation("tiny-b", 25.0), _gate(True))
    assert (v1.version, v2.version) == ("v1", "v2")
    assert reg.promote("support-bot", "v1").allowed
    assert reg.promote("support-bot", "v2").allowed
    state = reg.state("support-bot")
    assert state.aliases == {"production": "v2", "previous": "v1"}
    assert reg.resolve("support-bot")[1].version == "v2" and reg.resolve("support-bot@v1")[1].run_id == "tiny-a"
    assert reg.rollback("support-bot") == "v1"
    assert reg.state("support-bot").aliases == {"production": "v1"}
    moves = [(m.alias, m.before, m.after) for m in reg.state("support-bot").history]
    assert moves == [("production", None, "v1"), ("previous", None, "v1"), ("production", "v1", "v2"),
                     ("production", "v2", "v1"), ("previous", "v1", None)]
    with pytest.raises(InputError, match="no previous version to roll back to"):
        reg.rollback("support-bot")
    with pytest.raises(InputError, match="support-bot v1 is production; move the alias first"):
        reg.delete("support-bot", "v1")
    reg.delete("support-bot", "v2")
    assert list(reg.state("support-bot").versions) == ["v1"] and not (tmp_path / "registry/support-bot/versions/v2").exists()
    with pytest.raises(InputError, match="after @ give an alias"):
        reg.resolve("support-bot@latest")
    with pytest.raises(InputError, match="model 'nobody' is not in the registry"):
        reg.resolve("nobody")


def test_policy_never_promotes_a_failed_or_worse_candidate(ws, tmp_path):
    reg = Registry(tmp_path)
    reg.register("bot", ws / "runs" / "tiny-a" / "final", _evaluation("tiny-a", 20.0), _gate(True))
    reg.promote("bot", "v1")
    reg.register("bot", ws / "runs" / "tiny-b" / "final", _evaluation("tiny-b", 24.0), _gate(True))  # worse
    reg.register("bot", ws / "runs" / "tiny-b" / "final", _evaluation("tiny-b", 15.0), _gate(False))  # failed its gate
    worse = reg.promote("bot", "v2")
    assert not worse.allowed and "val_perplexity 24 is worse than production v1's 20" in worse.reasons[-1]
    failed = reg.promote("bot", "v3")
    assert not failed.allowed and "failed its gate" in failed.reasons[0]
    assert reg.state("bot").aliases == {"production": "v1"}  # nothing moved
    forced = reg.promote("bot", "v2", force=True)  # people may; the history says so
    assert forced.allowed and reg.state("bot").history[-1].forced
    # production scored on the candidate's own evaluation set is what counts when the datasets differ
    other = _evaluation("tiny-a", 18.0, dataset="new-data")
    other.metrics["production_val_perplexity"] = 17.0
    version = reg.register("bot", ws / "runs" / "tiny-a" / "final", other, _gate(True))
    assert not policy(version, reg.state("bot").versions["v2"]).allowed
    no_common = _evaluation("tiny-a", 1.0, dataset="third")
    v5 = reg.register("bot", ws / "runs" / "tiny-a" / "final", no_common, _gate(True))
    assert "cannot compare val_perplexity" in reg.promote("bot", v5.version).reasons[-1]


def test_approval_stops_at_staging(ws, tmp_path):
    reg = Registry(tmp_path)
    reg.register("bot", ws / "runs" / "tiny-a" / "final", _evaluation("tiny-a", 20.0), _gate(True))
    reg.promote("bot", "v1", to="staging")
    assert reg.state("bot").aliases == {"staging": "v1"}
    with pytest.raises(InputError, match="is not at staging"):
        reg.approve("bot", "v2")
    assert reg.approve("bot", "v1").allowed
    assert reg.state("bot").aliases == {"production": "v1"}


def test_kill_during_promote_leaves_before_or_after(ws, tmp_path):
    reg = Registry(tmp_path)
    for run in ("tiny-a", "tiny-b"):
        reg.register("bot", ws / "runs" / run / "final", _evaluation(run, 20.0), _gate(True))
    reg.promote("bot", "v1")
    code = textwrap.dedent(f"""
        from serving.registry import Registry
        reg = Registry({str(tmp_path)!r})
        i = 0
        while True:  # promote and roll back forever; the parent kills us at a random moment
            reg.promote("bot", "v2") if i % 2 == 0 else reg.rollback("bot")
            i += 1
            print(i, flush=True)
    """)
    for delay in (0.3, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()
        time.sleep(delay)
        proc.kill()
        proc.wait()
        state = reg.state("bot")  # parses: never a half-written file
        assert state.aliases.get("production") in ("v1", "v2")
        if state.aliases["production"] == "v1":
            reg.promote("bot", "v2")
            reg.rollback("bot")


def test_export_loads_with_from_pretrained(ws, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reg = Registry(tmp_path)
    reg.register("bot", ws / "runs" / "tiny-a" / "final", _evaluation("tiny-a", 20.0), _gate(True))
    reg.promote("bot", "v1")
    out = reg.export("bot@production", tmp_path / "exported")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and len(tok) <= model.config.vocab_size
    assert json.loads((out / "registry.json").read_text())["run_id"] == "tiny-a"


# ---- server ----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, app) -> None:
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def served(ws, tmp_path_factory):
    home = tmp_path_factory.mktemp("served")
    reg = Registry(home)
    reg.register("bot", ws / "runs" / "tiny-a" / "final", _evaluation("tiny-a", 20.0), _gate(True))
    reg.register("bot", ws / "runs" / "tiny-b" / "final", _evaluation("tiny-b", 19.0), _gate(True))
    reg.promote("bot", "v1")
    with Server(create_app("bot@production", home, api_key="sekret")) as server:
        yield server, reg, openai.OpenAI(base_url=server.url + "/v1", api_key="sekret", max_retries=0)


def test_models_chat_and_completions(served):
    server, _, client = served
    assert [m.id for m in client.models.list().data] == ["bot"]
    chat = client.chat.completions.create(model="bot", messages=[{"role": "user", "content": "How do I descale?"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens <= 8
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    comp = client.completions.create(model="bot", prompt="The water tank", max_tokens=6, temperature=0)
    assert comp.choices[0].finish_reason in ("stop", "length") and comp.usage.prompt_tokens > 0
    assert httpx.get(server.url + "/health").json()["version"] == "bot@v1"


def test_streaming_joined_equals_non_streaming_and_finishes_once(served):
    _, _, client = served
    kwargs = dict(model="bot", messages=[{"role": "user", "content": "Where are replacement parts sold?"}], max_tokens=12,
                  temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    joined = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert joined == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    ctext = client.completions.create(model="bot", prompt="Brewly", max_tokens=10, temperature=0).choices[0].text
    streamed = list(client.completions.create(model="bot", prompt="Brewly", max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == ctext
    assert [c.choices[0].finish_reason for c in streamed if c.choices[0].finish_reason] != []
    with httpx.stream("POST", served[0].url + "/v1/completions", headers={"Authorization": "Bearer sekret"},
                      json={"model": "bot", "prompt": "Brewly", "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_sampling_seed_stop_and_echo_logprobs(served):
    _, _, client = served
    a = client.completions.create(model="bot", prompt="coffee", max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    b = client.completions.create(model="bot", prompt="coffee", max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text
    full = client.completions.create(model="bot", prompt="coffee", max_tokens=12, temperature=0).choices[0].text
    assert len(full.strip()) > 2, full  # the tiny model says something to cut
    stop = full.strip()[1:3]
    cut = client.completions.create(model="bot", prompt="coffee", max_tokens=12, temperature=0, stop=[stop])
    assert stop not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"
    assert full.startswith(cut.choices[0].text) and len(cut.choices[0].text) < len(full)
    scored = client.completions.create(model="bot", prompt="the water tank is empty", max_tokens=0, echo=True, logprobs=1)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == "the water tank is empty"
    assert lp.token_logprobs[0] is None and all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == scored.usage.prompt_tokens and "".join(lp.tokens) == "the water tank is empty"


def test_errors_come_in_openai_shape(served):
    server, _, client = served
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="bot", messages=[{"role": "user", "content": "hi"}], temperature=5)
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' does not exist"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    missing = httpx.get(server.url + "/v1/models")
    assert missing.status_code == 401 and missing.json()["error"]["message"].startswith("missing API key")
    with pytest.raises(openai.BadRequestError, match=r"the prompt has \d+ tokens but the model's context is 128"):
        client.completions.create(model="bot", prompt="coffee " * 400, max_tokens=4)


def test_concurrent_requests_are_batched_and_all_answered(served):
    server, _, client = served
    before = httpx.get(server.url + "/health").json()

    def ask(i: int) -> str:
        r = client.completions.create(model="bot", prompt=f"question {i}: how do I", max_tokens=8, temperature=0)
        return r.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        reasons = list(pool.map(ask, range(32)))
    assert len(reasons) == 32 and set(reasons) <= {"stop", "length"}
    after = httpx.get(server.url + "/health").json()
    answered = after["batched_requests"] - before["batched_requests"]
    batches = after["batches"] - before["batches"]
    assert answered == 32 and batches < 32  # grouped into shared forward passes, not one by one


def test_a_running_server_follows_promotion_and_rollback(served):
    server, reg, client = served
    prompt = dict(model="bot", prompt="Brewly Halo", max_tokens=12, temperature=0)
    assert httpx.get(server.url + "/health").json()["version"] == "bot@v1"
    first = client.completions.create(**prompt).choices[0].text
    assert reg.promote("bot", "v2").allowed
    assert httpx.get(server.url + "/health").json()["version"] == "bot@v2"
    second = client.completions.create(**prompt).choices[0].text
    assert second != first  # another model answers (different weights)
    reg.rollback("bot")
    assert httpx.get(server.url + "/health").json()["version"] == "bot@v1"
    assert client.completions.create(**prompt).choices[0].text == first


# ---- the deployer's tools and the CLI --------------------------------------------------------------


def test_deployer_tools_hold_the_goal_in_code_whatever_the_agent_asks(ws, tmp_path):
    from steps.context import RunContext
    from steps.deploy import deployment_from_registry
    from tools.deploy import ModelStatusTool, PromoteModelTool, RegisterModelTool
    from training.contracts import Goal
    from training.runs import Run

    home = tmp_path / "home"
    for run_id, ppl, passed in (("good", 20.0, True), ("other", 18.0, True), ("failed", 10.0, False)):
        run = Run(home, run_id)
        shutil.copytree(ws / "runs" / "tiny-a" / "final", run.model_dir("best"))
        lineage = json.loads((run.model_dir("best") / "lineage.json").read_text())
        (run.model_dir("best") / "lineage.json").write_text(json.dumps({**lineage, "run_id": run_id}))  # as a real export says
        run.write_evaluation(_evaluation(run_id, ppl))
        run.write_gate(_gate(passed))

    def tools(run_id: str, **goal_fields):
        goal = Goal(task="finetune", data="d.jsonl", base_model="tiny", method="lora", metric="perplexity",
                    **{"deploy": "if_passed", "model_name": "support-bot", **goal_fields})
        context = RunContext(home, goal, "a goal", run_id, verdict=Run(home, run_id).gate())
        return [cls(workspace=home, context=context) for cls in (RegisterModelTool, PromoteModelTool, ModelStatusTool)]

    def call(tool, **args) -> dict:  # every tool answers in JSON, refusals as {"error": reason}
        return json.loads(tool.run(**args))

    register, promote, status = tools("good")
    assert call(register, model_name="support-bot", run_id="other")["error"].startswith("run_id: this crew's run is good")
    assert call(register, model_name="rival-bot", run_id="good")["error"].startswith("model_name: this goal deploys as support-bot")
    assert call(promote, model_name="support-bot", version="v1")["error"].startswith("promote: this run registered no version")
    assert call(promote, model_name="rival-bot", version="v1")["error"].startswith("model_name: this goal deploys as support-bot")
    assert call(register, model_name="support-bot", run_id="good") == {
        "model_name": "support-bot", "version": "v1", "run_id": "good", "registered_now": True, "gate": "passed"}
    assert call(register, model_name="support-bot", run_id="good")["registered_now"] is False  # a retried step registers once
    assert call(promote, model_name="support-bot", version="v1")["allowed"] is True
    assert call(status, model_name="rival-bot")["error"].startswith("model_name:")
    assert call(status, model_name="support-bot")["aliases"] == {"production": "v1"}

    register, promote, _ = tools("other", approval="required")  # a person must approve: staging only
    assert call(register, model_name="support-bot", run_id="other")["version"] == "v2"
    assert call(promote, model_name="support-bot", version="v1", to="staging")["error"].startswith("version: this run registered v2")
    assert "requires a person's approval" in call(promote, model_name="support-bot", version="v2")["error"]
    assert call(promote, model_name="support-bot", version="v2", to="staging")["allowed"] is True
    assert Registry(home).state("support-bot").aliases == {"production": "v1", "staging": "v2"}

    register, promote, _ = tools("failed")  # deploy only if passed, and its gate failed
    assert call(register, model_name="support-bot", run_id="failed")["error"].startswith("register: the goal deploys only if the gate passes")
    register, promote, _ = tools("good", deploy="never", model_name=None)
    assert call(register, model_name="support-bot", run_id="good")["error"] == \
        "deploy: the goal says never deploy; nothing may be registered or promoted"
    assert list(Registry(home).state("support-bot").versions) == ["v1", "v2"]

    # what a run recorded as deployed is what the registry holds, with code's reasons
    goal = Goal(task="finetune", data="d.jsonl", base_model="tiny", method="lora", metric="perplexity",
                model_name="support-bot", deploy="if_passed", approval="required")
    staged = deployment_from_registry(home, goal, "other", _gate(True))
    assert (staged.deployed, staged.version, staged.alias) == (False, "v2", "staging")
    assert "modelcrew models approve support-bot v2" in staged.reason
    assert deployment_from_registry(home, goal, "failed", _gate(False)).reason == "the gate failed: val_perplexity above target"
    # untrusted arguments: bounded by the schemas, no force, no rollback tool for an agent
    with pytest.raises(ValueError, match="arguments validation failed"):
        register.run(model_name="support-bot", run_id="../../etc")
    with pytest.raises(ValueError, match="arguments validation failed"):
        promote.run(model_name="support-bot", version="v1", force=True)
    assert "force" not in PromoteModelTool.model_fields and "force" not in promote.args_schema.model_fields
    import tools.deploy

    assert not hasattr(tools.deploy, "RollbackModelTool")


def test_cli_register_and_serve_on_localhost(ws, tmp_path, cli):
    home = tmp_path / "home"
    shutil.copytree(ws / "runs" / "tiny-a", home / "runs" / "tiny-a")
    (home / "runs" / "tiny-a" / "gate.json").write_text(_gate(True).model_dump_json())
    reg = cli("models", "register", "support-bot", "tiny-a", "--which", "final", "--workspace", str(home), "--json")
    assert reg.exit_code == 0, reg.stderr
    assert cli("models", "promote", "support-bot", "v1", "--workspace", str(home)).exit_code == 0
    listed = cli("models", "list", "--workspace", str(home), "--json").json()
    assert listed == [{"name": "support-bot", "versions": ["v1"], "aliases": {"production": "v1"}}]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "support-bot@production", "--port", str(port),
                             "--workspace", str(home)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read()[-2000:]
                time.sleep(0.1)
        assert health["version"] == "support-bot@v1"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="support-bot", messages=[{"role": "user", "content": "hello"}], max_tokens=4)
        assert answer.choices[0].finish_reason in ("stop", "length")
        bound = {c.laddr.ip for c in __import__("psutil").Process(proc.pid).net_connections() if c.status == "LISTEN"}
        assert bound == {"127.0.0.1"}
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    bad = cli("models", "promote", "support-bot", "v9", "--workspace", str(home))
    assert bad.exit_code == 2 and "no version v9" in bad.stderr
