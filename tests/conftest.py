"""Shared fixtures: a fresh workspace, an in-process CLI runner, and small dataset writers."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from llm.env import quiet_crewai

quiet_crewai()  # before any test imports crewai
# precision `auto` is bf16 on CPUs with AMX or AVX512-BF16: the suite runs float32 wherever CI's machine lands, and
# the tests of `auto` itself set this (subprocesses inherit it)
os.environ.setdefault("MODELCREW_CPU_BF16", "0")


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None

    def json(self):
        return json.loads(self.stdout)


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    """A workspace path that does not exist yet (commands must create it, or leave it absent)."""
    return tmp_path / "ws"


@pytest.fixture
def cli():
    """Run `modelcrew ARGS...` in-process; returns exit code, stdout and stderr separately."""

    def run(*args: str, env: dict | None = None) -> CliResult:
        result = CliRunner().invoke(app, [str(a) for a in args], env=env)
        return CliResult(result.exit_code, result.stdout, result.stderr, result.exception)

    return run


@pytest.fixture(scope="session")
def ticket_model(tmp_path_factory) -> Path:
    """A tiny model that has learned the tickets' chat format and templates (examples/tickets.py; ~50 s on 2 cores,
    so one per session: test_flywheel and test_loop share it)."""
    from examples.tickets import ticket_base

    return ticket_base(tmp_path_factory.mktemp("ticket-base"))
