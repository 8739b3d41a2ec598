"""What memory stores per entry: the text that is embedded and the metadata that is filtered on.

Pure functions of the contracts (no Chroma here), so `rebuild` makes exactly what the first write made.
"""

from __future__ import annotations

import hashlib
import re


from training.contracts import DatasetSummary, Evaluation, GateVerdict, TrainPlan

Scalar = str | int | float | bool


def _clip(text: str, n: int) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip()
    return text if len(text) <= n else text[: n - 1] + "…"


def record_text(record: dict) -> str:
    """One curated record as plain text, whatever its format."""
    if "messages" in record:
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in record["messages"])
    for question, answer in (("prompt", "response"), ("question", "answer"), ("prompt", "completion"), ("instruction", "output")):
        if question in record:  # curated pairs, or raw rows in any accepted pairs schema
            return f"{record[question]}\n{record.get(answer, '')}"
    return str(record.get("text", ""))


def content_hash(text: str) -> str:
    return hashlib.sha1(re.sub(r"\s+", " ", text.lower()).strip().encode("utf-8")).hexdigest()[:16]


def dataset_document(summary: DatasetSummary) -> tuple[str, dict[str, Scalar]]:
    samples = "\n".join(f"- {_clip(record_text(s), 300)}" for s in summary.samples[:5])
    doc = (f"{summary.description}\nFormat: {summary.format}; schema: {', '.join(summary.schema_)}; "
           f"top terms: {', '.join(summary.top_terms[:12])}.\nSamples:\n{samples}")
    meta: dict[str, Scalar] = {
        "fingerprint": summary.fingerprint, "source": summary.source, "format": summary.format,
        "records_in": summary.records_in, "records_after": summary.records_after,
        "train": summary.splits.get("train", 0), "val": summary.splits.get("val", 0), "test": summary.splits.get("test", 0),
        "created_at": summary.created_at, "summary": _clip(summary.description, 200)}
    return doc, meta


def evaluation_document(evaluation: Evaluation, plan: TrainPlan | None, gate: GateVerdict | None,
                        deployed: bool, dataset_description: str = "") -> tuple[str, dict[str, Scalar]]:
    m = evaluation.metrics
    method = plan.method if plan else "unknown"
    start = evaluation.base_model or "a model trained from scratch"
    parts = [f"{name.replace('_', ' ')} {m[name]:.4g}" + (f" (base {m['base_' + name]:.4g})" if f"base_{name}" in m else "")
             for name in ("val_perplexity", "test_perplexity", "general_perplexity", "accuracy", "exact_match", "f1", "rougeL")
             if name in m]
    verdict = "not gated" if gate is None else ("gate passed" if gate.passed else "gate failed: " + "; ".join(gate.reasons))
    knobs = ""
    if plan:
        knobs = f" lr {plan.lr:g}, batch {plan.batch_size}, seq_len {plan.seq_len}"
        if plan.method != "full":
            knobs += f", LoRA rank {plan.lora.rank}"
    doc = (f"Run {evaluation.run_id}: {method} {plan.task if plan else ''} of {start} on dataset {evaluation.dataset} "
           f"({evaluation.format}{'; ' + _clip(dataset_description, 160) if dataset_description else ''});{knobs}. "
           f"{', '.join(parts)}. {verdict}; {'deployed' if deployed else 'not deployed'}.")
    meta: dict[str, Scalar] = {
        "run_id": evaluation.run_id, "dataset": evaluation.dataset, "format": evaluation.format,
        "base_model": evaluation.base_model or "", "method": method, "task": plan.task if plan else "",
        "gate": "none" if gate is None else ("passed" if gate.passed else "failed"), "deployed": deployed,
        "created_at": evaluation.created_at or "", "summary": _clip(doc, 200)}
    if plan:
        meta.update(lr=plan.lr, batch_size=plan.batch_size, seq_len=plan.seq_len, steps=plan.budget.steps or 0,
                    lora_rank=plan.lora.rank if plan.method != "full" else 0, plan_json=plan.model_dump_json())
    meta.update({f"m_{k}": float(v) for k, v in m.items()})  # every metric, filterable (m_ keeps names apart)
    return doc, meta


def lesson_id(run_id: str, text: str) -> str:
    return f"{run_id}:{content_hash(text)}"
