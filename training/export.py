"""Export a trained model as a normal Hugging Face directory with a model card holding its lineage."""

from __future__ import annotations

import json
from pathlib import Path

from training.atomic import atomic_dir
from training.contracts import TrainPlan
from training.models import merged_copy


def export_model(model, tokenizer, target: Path, plan: TrainPlan, lineage: dict, step: int, metrics: dict) -> Path:
    """Write `target/` atomically: merged weights (or base + adapter when lora.merge is off), tokenizer, card."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would interleave with ours
    with atomic_dir(Path(target)) as tmp:
        is_lora = hasattr(model, "peft_config")
        if is_lora and plan.lora.merge:
            merged_copy(model, lineage["base_dir"]).save_pretrained(tmp, safe_serialization=True)
        else:
            model.save_pretrained(tmp, safe_serialization=True)  # a peft model writes its adapter only
        tokenizer.save_pretrained(tmp)
        card = {**lineage, "step": step, "metrics": metrics, "plan": plan.model_dump(mode="json"),
                "weights": "adapter (load the base, then the adapter)" if is_lora and not plan.lora.merge else "full"}
        (tmp / "lineage.json").write_text(json.dumps(card, indent=2), encoding="utf-8")
        (tmp / "README.md").write_text(model_card(card), encoding="utf-8")
    return Path(target)


def model_card(card: dict) -> str:
    plan = card["plan"]
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in card["metrics"].items() if isinstance(v, float)) or "not measured"
    return f"""# {card['run_id']} (step {card['step']})

Trained by modelcrew: {card['task']} ({card['method']}) from {card['base_model'] or 'scratch'}.

| lineage | |
|---|---|
| run | `{card['run_id']}` |
| base model | {card['base_model'] or 'none (pretrained from scratch)'} |
| base weights | {card.get('base_source') or 'as published'} |
| dataset fingerprint | `{card['dataset']}` |
| dataset | {card['dataset_description']} |
| weights | {card['weights']} |
| metrics at this step | {metrics} |
| lr / batch / seq_len | {plan['lr']} / {plan['batch_size']} / {plan['seq_len']} |
| budget | {json.dumps(plan['budget'])} |

The full plan is in `lineage.json`.
"""
