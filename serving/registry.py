"""The model registry: named models, numbered versions, and aliases that move (as MLflow's do).

    <workspace>/registry/<name>/versions/v1/   a model directory: merged safetensors (or an adapter
                                               over a base), tokenizer, README.md card, lineage.json
    <workspace>/registry/<name>/state.json     versions, aliases (production, staging, previous) and
                                               the history of every alias move

`state.json` is the truth and is only ever replaced whole (write a temp file, rename), and a version
directory is copied under a temporary name and renamed into place before the state names it: a kill -9
at any point leaves the registry as it was before or as it is after the change, never between (an
unnamed leftover directory is ignored and reclaimed). Every change holds the workspace's registry lock.

References: `name` (= production), `name@production`, `name@staging`, `name@previous`, `name@v3`.
Deploy policy lives in code (`policy`): a version becomes production only if its gate passed and it is
not worse than the current production on the goal metric measured on the same evaluation set.
`force=True` exists for people at the CLI; the agents' tools never pass it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field

from memory.lock import WriterLock
from training.atomic import write_text_atomic
from training.contracts import Evaluation, GateVerdict
from training.runs import Run
from training.errors import InputError
from training.gate import lower_is_better

ALIASES = ("production", "staging", "previous")
NAME = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")


class Version(BaseModel):
    version: str
    created_at: str
    run_id: str
    dataset: str
    base_model: str | None
    metrics: dict[str, float]
    gate: GateVerdict | None
    weights: str  # "full" or "adapter"
    base_dir: str | None = None  # for adapters: the base they apply to


class AliasMove(BaseModel):
    at: str
    alias: str
    before: str | None
    after: str | None
    reason: str
    forced: bool = False


class ModelState(BaseModel):
    name: str
    versions: dict[str, Version] = Field(default_factory=dict)
    aliases: dict[str, str] = Field(default_factory=dict)
    history: list[AliasMove] = Field(default_factory=list)
    next_version: int = 1


class Decision(BaseModel):
    allowed: bool
    reasons: list[str]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise InputError(f"model name {name!r}: use 2-63 lowercase letters, digits and dashes (e.g. support-bot)")
    return name


def parse_ref(ref: str) -> tuple[str, str]:
    """'name', 'name@production', 'name@v3' -> (name, alias or version)."""
    name, _, which = ref.partition("@")
    which = which or "production"
    if which not in ALIASES and not re.fullmatch(r"v[1-9][0-9]*", which):
        raise InputError(f"{ref}: after @ give an alias ({', '.join(ALIASES)}) or a version like v3")
    return check_name(name), which


def policy(candidate: Version, production: Version | None, metric: str | None = None) -> Decision:
    """May `candidate` become production? Computed from numbers, never from anyone's judgement."""
    reasons: list[str] = []
    if candidate.gate is None:
        return Decision(allowed=False, reasons=[f"{candidate.version} has no gate verdict; evaluate and gate it first"])
    if not candidate.gate.passed:
        return Decision(allowed=False, reasons=[f"{candidate.version} failed its gate: " + "; ".join(candidate.gate.reasons or ["no reason given"])])
    reasons.append(f"{candidate.version} passed its gate on {candidate.gate.metric}")
    if production is None or production.version == candidate.version:
        return Decision(allowed=True, reasons=reasons + ["no production version to compare with"])
    metric = metric or candidate.gate.metric
    new = candidate.metrics.get(metric)
    old = candidate.metrics.get(f"production_{metric}")  # production scored on the candidate's own evaluation set
    where = "the candidate's evaluation set"
    if old is None and production.dataset == candidate.dataset:
        old, where = production.metrics.get(metric), f"dataset {candidate.dataset}"
    if new is None or old is None:
        return Decision(allowed=False, reasons=reasons + [
            f"cannot compare {metric} with production {production.version} on the same evaluation set "
            f"(candidate on {candidate.dataset}, production on {production.dataset}); score production on it first"])
    worse = new > old if lower_is_better(metric) else new < old
    if worse:
        return Decision(allowed=False, reasons=reasons + [f"{metric} {new:.4g} is worse than production "
                                                          f"{production.version}'s {old:.4g} on {where}"])
    return Decision(allowed=True, reasons=reasons + [f"{metric} {new:.4g} is not worse than production "
                                                     f"{production.version}'s {old:.4g} on {where}"])


class Registry:
    def __init__(self, workspace: Path, lock_timeout: float = 120.0) -> None:
        self.workspace = Path(workspace)
        self.root = self.workspace / "registry"
        self.lock = WriterLock(self.root / "write.lock", lock_timeout)

    # ---- reading ----------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(p.parent.name for p in self.root.glob("*/state.json")) if self.root.exists() else []

    def state(self, name: str) -> ModelState:
        path = self.root / check_name(name) / "state.json"
        if not path.exists():
            known = ", ".join(self.names()) or "none"
            raise InputError(f"model {name!r} is not in the registry (registered: {known})")
        return ModelState.model_validate_json(path.read_text(encoding="utf-8"))

    def resolve(self, ref: str) -> tuple[str, Version, Path]:
        """(name, version, directory) that `ref` points to now."""
        name, which = parse_ref(ref)
        state = self.state(name)
        version = state.aliases.get(which, which if which in state.versions else None)
        if version is None:
            raise InputError(f"{ref}: no version is {which} (aliases: "
                             f"{', '.join(f'{a}={v}' for a, v in state.aliases.items()) or 'none'})")
        if version not in state.versions:
            raise InputError(f"{ref}: {name} has no version {version} (versions: {', '.join(state.versions) or 'none'})")
        return name, state.versions[version], self.root / name / "versions" / version

    # ---- changing ---------------------------------------------------------------------------------

    def _save(self, state: ModelState) -> None:
        write_text_atomic(self.root / state.name / "state.json", state.model_dump_json(indent=2))

    def _load_or_new(self, name: str) -> ModelState:
        path = self.root / name / "state.json"
        return ModelState.model_validate_json(path.read_text(encoding="utf-8")) if path.exists() else ModelState(name=name)

    def register(self, name: str, model_dir: Path, evaluation: Evaluation | None = None,
                 gate: GateVerdict | None = None) -> Version:
        """Copy an exported model directory (runs/<id>/best or final) in as the next version."""
        check_name(name)
        model_dir = Path(model_dir)
        lineage_path = model_dir / "lineage.json"
        if not lineage_path.exists():
            raise InputError(f"{model_dir}: not an exported model (no lineage.json); register runs/<id>/best or final")
        lineage = json.loads(lineage_path.read_text(encoding="utf-8"))
        with self.lock:
            state = self._load_or_new(name)
            vname = f"v{state.next_version}"
            target = self.root / name / "versions" / vname
            if target.exists():  # left by a registration killed before its state was saved
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{vname}-", dir=target.parent))
            shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
            adapter = (model_dir / "adapter_config.json").exists()
            version = Version(
                version=vname, created_at=now(), run_id=lineage.get("run_id", ""),
                dataset=evaluation.dataset if evaluation else lineage.get("dataset", ""),  # where the metrics were measured
                base_model=lineage.get("base_model"), metrics=dict(evaluation.metrics) if evaluation else {},
                gate=gate, weights="adapter" if adapter else "full", base_dir=lineage.get("base_dir") if adapter else None)
            (tmp / "registry.json").write_text(version.model_dump_json(indent=2), encoding="utf-8")
            os.replace(tmp, target)
            state.versions[vname] = version
            state.next_version += 1
            self._save(state)
        return version

    def _move(self, state: ModelState, alias: str, version: str | None, reason: str, forced: bool = False) -> None:
        before = state.aliases.get(alias)
        if version is None:
            state.aliases.pop(alias, None)
        else:
            state.aliases[alias] = version
        state.history.append(AliasMove(at=now(), alias=alias, before=before, after=version, reason=reason, forced=forced))

    def promote(self, name: str, version: str, to: str = "production", force: bool = False, reason: str = "") -> Decision:
        """Move alias `to` onto `version`; to production only if the policy allows (or `force`, people only).

        The old production becomes `previous`. Returns the decision; a refused promotion changes nothing.
        """
        if to not in ALIASES or to == "previous":
            raise InputError(f"--to: promote to production or staging, not {to!r}")
        with self.lock:
            state = self.state(name)
            if version not in state.versions:
                raise InputError(f"{name}: no version {version} (versions: {', '.join(state.versions) or 'none'})")
            decision = Decision(allowed=True, reasons=[f"{version} -> staging"])
            if to == "production":
                current = state.aliases.get("production")
                decision = policy(state.versions[version], state.versions.get(current) if current else None)
                if not decision.allowed and not force:
                    return decision
                if current == version:
                    return Decision(allowed=True, reasons=decision.reasons + [f"{version} is already production"])
                if current:
                    self._move(state, "previous", current, f"was production before {version}")
                if state.aliases.get("staging") == version:
                    self._move(state, "staging", None, f"{version} went to production")
                decision.reasons.append("forced by a person" if force and not decision.allowed else "promoted")
            self._move(state, to, version, reason or "; ".join(decision.reasons), forced=force)
            self._save(state)
        return Decision(allowed=True, reasons=decision.reasons)

    def approve(self, name: str, version: str) -> Decision:
        """A person approves the version waiting at staging: it goes to production under the same policy."""
        state = self.state(name)
        if state.aliases.get("staging") != version:
            raise InputError(f"{name} {version} is not at staging (staging: {state.aliases.get('staging') or 'none'})")
        return self.promote(name, version, "production", reason=f"approved {version}")

    def rollback(self, name: str, reason: str = "rollback") -> str:
        """production <- previous (previous is then unset). Returns the version now in production."""
        with self.lock:
            state = self.state(name)
            previous, current = state.aliases.get("previous"), state.aliases.get("production")
            if not previous:
                raise InputError(f"{name}: no previous version to roll back to (production: {current or 'none'})")
            self._move(state, "production", previous, f"{reason}: {current} -> {previous}")
            self._move(state, "previous", None, f"{previous} restored to production")
            self._save(state)
        return previous

    def delete(self, name: str, version: str) -> None:
        with self.lock:
            state = self.state(name)
            if version not in state.versions:
                raise InputError(f"{name}: no version {version}")
            pointing = [a for a, v in state.aliases.items() if v == version]
            if pointing:
                raise InputError(f"{name} {version} is {', '.join(pointing)}; move the alias first (promote or rollback)")
            del state.versions[version]
            self._save(state)  # the state forgets it first: a kill now leaves an ignored directory
            shutil.rmtree(self.root / name / "versions" / version, ignore_errors=True)

    def export(self, ref: str, target: Path, format: str = "hf", dtype: str = "bfloat16", quant: str = "q8_0") -> Path:
        """Write `ref` (adapters merged into their base) into the new directory `target` for other engines.

        format "hf": a Hugging Face model directory in `dtype` (bfloat16, float16 or float32) with tokenizer,
        chat template, card and lineage, that `from_pretrained` and `vllm serve DIR` load. bfloat16 is the
        default because training computes in bf16 on GPUs: activations the model learned fit bf16's range,
        which float16 (max 65504) does not promise; float16 is for GPUs without bf16 (T4, V100).
        format "gguf": `<name>-<version>-<quant>.gguf` (quant f16, q8_0 or f32) and an Ollama `Modelfile`,
        for llama.cpp and Ollama; Llama-architecture models only (see serving/gguf_export.py).
        The directory appears whole or not at all; a non-empty `target` is refused.
        """
        from training.atomic import atomic_dir

        if format not in ("hf", "gguf"):
            raise InputError(f"--format: choose hf or gguf, not {format!r}")
        dtypes = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                  "float32": "float32", "fp32": "float32"}
        if format == "hf" and dtype not in dtypes:
            raise InputError(f"--dtype: choose bfloat16, float16 or float32, not {dtype!r}")
        from serving.gguf_export import QUANTS, check_architecture, modelfile, write_gguf

        if format == "gguf" and quant not in QUANTS:
            raise InputError(f"--quant: choose {', '.join(QUANTS)}, not {quant!r}")
        name, version, path = self.resolve(ref)
        target = Path(target)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise InputError(f"{target}: exists and is not an empty directory")
        if format == "gguf":  # refuse before loading any weights
            config_dir = Path(version.base_dir) if version.weights == "adapter" else path
            check_architecture(json.loads((config_dir / "config.json").read_text(encoding="utf-8")), ref)
        model, tokenizer = _merged(version, path)
        with atomic_dir(target) as tmp:
            if format == "hf":
                import torch

                model.to(getattr(torch, dtypes[dtype])).save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            else:
                gguf_name = f"{name}-{version.version}-{quant}.gguf"
                write_gguf(model, tokenizer, tmp / gguf_name, quant, f"{name} {version.version}")
                (tmp / "Modelfile").write_text(modelfile(tokenizer, gguf_name, model.config.max_position_embeddings,
                                                         f"{name} {version.version} ({quant})"), encoding="utf-8")
            for extra in ("README.md", "lineage.json", "registry.json"):
                if (path / extra).exists() and not (tmp / extra).exists():
                    shutil.copy(path / extra, tmp / extra)
        return target


def _merged(version: Version, path: Path):
    """The version as one float32 model and its tokenizer (an adapter merged into its base)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from training.models import load_base

    hf_logging.disable_progress_bar()
    if version.weights == "adapter":
        from peft import PeftModel

        base, tokenizer = load_base(Path(version.base_dir))
        return PeftModel.from_pretrained(base, str(path)).merge_and_unload(), tokenizer
    # loaded directly, not through load_base: that sets a missing pad token, which an export must not add
    return (AutoModelForCausalLM.from_pretrained(str(path), dtype="float32", use_safetensors=True, trust_remote_code=False),
            AutoTokenizer.from_pretrained(str(path), trust_remote_code=False))


def register_run(workspace: Path, name: str, run_id: str, which: str = "best") -> Version:
    """Register a run's export with the evaluation and gate verdict the run holds."""
    run = Run(workspace, run_id).require()
    model_dir = run.model_dir(which)
    if not model_dir.is_dir():
        raise InputError(f"run {run_id}: no {which}/ export (the run has {', '.join(p.name for p in run.dir.iterdir() if p.is_dir())})")
    return Registry(workspace).register(name, model_dir, run.evaluation(), run.gate())
