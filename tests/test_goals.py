"""The offline goal parser: plain-language phrasings -> the exact `Goal`, and one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from crews.goals import goal_sentence, parse_goal, words_to_numbers
from serving.registry import Registry
from tests.helpers import write_jsonl
from training.contracts import Goal, LoraSettings, Target
from training.errors import InputError

FAQ = "examples/data/support_faq.jsonl"
SMOL, GEMMA = "smollm2-135m-instruct", "gemma3-270m"


def goal(**fields) -> Goal:
    """A Goal with the parser's defaults for what a phrasing leaves unsaid."""
    fields.setdefault("task", "finetune")
    fields.setdefault("data", FAQ)
    fields.setdefault("metric", (fields.get("target") or {}).get("metric", "perplexity"))
    if fields["task"] == "pretrain":
        fields.setdefault("method", "full")
        fields.setdefault("size", "tiny")
    else:
        fields.setdefault("base_model", SMOL)
        fields.setdefault("method", "lora")
    return Goal(**fields)


def rel(value: float, baseline: str = "base", metric: str = "perplexity") -> dict:
    return {"metric": metric, "direction": "lower" if metric == "perplexity" else "higher", "kind": "relative",
            "value": value, "baseline": baseline}


def ab(metric: str, value: float, direction: str = "higher") -> dict:
    return {"metric": metric, "direction": direction, "kind": "absolute", "value": value}


CASES = [
    # fine-tuning with LoRA, relative to the base
    (f"Fine-tune smollm2-135m-instruct on {FAQ} with LoRA rank 8 so that validation perplexity is at least 20% below "
     "the base model, within ten minutes, and deploy it as support-bot if it passes.",
     goal(target=rel(0.2), budget={"minutes": 10}, deploy="if_passed", model_name="support-bot", lora=LoraSettings(rank=8))),
    (f"Train SmolLM2 on {FAQ} until perplexity is a quarter below the base model in an hour",
     goal(target=rel(0.25), budget={"minutes": 60})),
    (f"fine-tune smollm2 on {FAQ} so perplexity drops by at least thirty percent below the base, 60 steps",
     goal(target=rel(0.3), budget={"steps": 60})),
    (f"Adapt smol lm 2 to {FAQ}: perplexity half below the base model, don't deploy",
     goal(target=rel(0.5))),
    (f"finetune smollm2-135m on {FAQ} with lora r=16 alpha 32, beat the base model",
     goal(target=rel(0.0), lora=LoraSettings(rank=16, alpha=32))),
    (f"Fine-tune smollm2 on {FAQ} with low-rank adapters of rank four for two hundred steps",
     goal(lora=LoraSettings(rank=4), budget={"steps": 200})),
    # full fine-tunes
    (f"Full fine-tune of smollm2 on {FAQ}, perplexity under 20, no more than 45 minutes",
     goal(method="full", target=ab("perplexity", 20, "lower"), budget={"minutes": 45})),
    (f"fine-tune all the weights of gemma3-270m on {FAQ} for 1,000 steps",
     goal(base_model=GEMMA, method="full", budget={"steps": 1000})),
    ("Fine-tune gemma 3 270m on bbc-news to reach at least 85% accuracy, full fine-tune, no more than 30 minutes, "
     "ship it whatever the score as news-router.",
     goal(base_model=GEMMA, data="bbc-news", method="full", target=ab("accuracy", 0.85), budget={"minutes": 30},
          deploy="always", model_name="news-router")),
    # each metric, absolute
    (f"finetune smollm2 on {FAQ}, f1 of at least 0.6, 60 steps",
     goal(target=ab("f1", 0.6), budget={"steps": 60})),
    (f"Fine-tune smollm2 on {FAQ} with exact match above 40%",
     goal(target=ab("exact_match", 0.4))),
    (f"fine-tune smollm2 on {FAQ}; I want ROUGE-L of at least 0.35 within 15 minutes",
     goal(target=ab("rougeL", 0.35), budget={"minutes": 15})),
    (f"fine-tune smollm2 on {FAQ} and get token F1 score over 50 percent",
     goal(target=ab("f1", 0.5))),
    ("Fine-tune gemma3-270m on bbc-news as a classifier with accuracy no less than 0.9",
     goal(base_model=GEMMA, data="bbc-news", format="classification", target=ab("accuracy", 0.9))),
    ("fine-tune gemma3 on bbc-news, accuracy at least ninety percent, deploy as news-cls",
     goal(base_model=GEMMA, data="bbc-news", target=ab("accuracy", 0.9), deploy="if_passed", model_name="news-cls")),
    (f"fine-tune smollm2 on {FAQ} so that perplexity is at most 12.5",
     goal(target=ab("perplexity", 12.5, "lower"))),
    (f"fine-tune smollm2 on {FAQ} to reach 70% exact match",
     goal(target=ab("exact_match", 0.7))),
    # relative to production
    (f"fine-tune smollm2 on {FAQ} so perplexity is 10 percent better than production, half an hour",
     goal(target=rel(0.1, "production"), budget={"minutes": 30})),
    (f"Fine-tune smollm2 on {FAQ} and beat production on rouge-l, deploy as faq-bot",
     goal(target=rel(0.0, "production", "rougeL"), deploy="if_passed", model_name="faq-bot")),
    (f"fine-tune smollm2 on {FAQ}: f1 at least 5% better than the current model, then deploy it as faq-bot",
     goal(target=rel(0.05, "production", "f1"), deploy="if_passed", model_name="faq-bot")),
    (f"fine-tune smollm2 on {FAQ}; accuracy is not the point, perplexity a fifth below what's in production",
     None),  # placeholder replaced below: accuracy mentioned first but the target is perplexity
    # pretraining
    ("Pretrain a tiny model from scratch on bbc-news for two hundred steps; don't deploy.",
     goal(task="pretrain", data="bbc-news", budget={"steps": 200})),
    ("train a small language model on bbc-news from scratch within twenty five minutes",
     goal(task="pretrain", data="bbc-news", size="small", budget={"minutes": 25})),
    (f"pre-train a 124m model on {FAQ} for 5000 steps and 2 hours",
     goal(task="pretrain", size="124m", budget={"minutes": 120, "steps": 5000})),
    ("pretrain from scratch on bbc news with perplexity below 200",
     goal(task="pretrain", data="bbc-news", target=ab("perplexity", 200, "lower"))),
    # formats
    (f"fine-tune smollm2 on {FAQ} as question-answer pairs for 10 minutes",
     goal(format="pairs", budget={"minutes": 10})),
    (f"fine-tune smollm2 on {FAQ} as plain text",
     goal(format="text")),
    (f"fine-tune smollm2 on {FAQ} in chat format, rank 8",
     goal(format="chat", lora=LoraSettings(rank=8))),
    # deploy modes
    (f"fine-tune smollm2 on {FAQ} and ship it regardless as faq-bot",
     goal(deploy="always", model_name="faq-bot")),
    (f"fine-tune smollm2 on {FAQ} and deploy it",
     goal(deploy="if_passed", model_name="support-faq")),
    (f"fine-tune smollm2 on {FAQ}, never deploy",
     goal()),
    (f"fine-tune smollm2 on {FAQ} and call it helpdesk-v2; deploy if it passes",
     goal(deploy="if_passed", model_name="helpdesk-v2")),
    (f"fine-tune smollm2 on {FAQ} and deploy it as faq-bot after human approval",
     goal(deploy="if_passed", model_name="faq-bot", approval="required")),
    # hub ids and local directories
    (f"Fine-tune HuggingFaceTB/SmolLM2-360M on {FAQ} with exact match above 40%",
     goal(base_model="HuggingFaceTB/SmolLM2-360M", target=ab("exact_match", 0.4))),
    (f"fine-tune Qwen/Qwen2.5-0.5B-Instruct on {FAQ} for a couple of hours, note: keep answers short",
     goal(base_model="Qwen/Qwen2.5-0.5B-Instruct", budget={"minutes": 120}, notes="keep answers short")),
]
CASES[20] = (CASES[20][0], goal(target=rel(0.2, "production")))  # accuracy named, perplexity targeted

# Phrasings as people write them, each once misread (the issue "the parser never guesses silently"), and
# more of the same kind: signs, "drop by N% versus", words for fractions, negated deploys, budgets, order.
MORE_CASES = [
    # 1. targets with comparison signs, "drop by N% versus the base", "halve"
    (f"Fine-tune SmolLM2 on {FAQ} so that perplexity < 20",
     goal(target=ab("perplexity", 20, "lower"))),
    (f"finetune smollm2 on {FAQ}. Target: ppl <= 25. 100 steps.",
     goal(target=ab("perplexity", 25, "lower"), budget={"steps": 100})),
    ("Fine-tune gemma3 on bbc-news as a classifier, accuracy >= 0.8, deploy as news-cls",
     goal(base_model=GEMMA, data="bbc-news", format="classification", target=ab("accuracy", 0.8), deploy="if_passed",
          model_name="news-cls")),
    (f"fine-tune smollm2 on {FAQ}, perplexity ≤ 25, at most 90 steps",
     goal(target=ab("perplexity", 25, "lower"), budget={"steps": 90})),
    (f"fine-tune smollm2 on {FAQ}. Success = exact match ≥ 50%.",
     goal(target=ab("exact_match", 0.5))),
    (f"fine-tune smollm2 on {FAQ} - perplexity should drop by 20% versus the base",
     goal(target=rel(0.2))),
    (f"Take smollm2 and fine-tune it on {FAQ} to reduce perplexity by 20% vs the base model",
     goal(target=rel(0.2))),
    (f"fine-tune smollm2 on {FAQ} and halve the perplexity",
     goal(target=rel(0.5))),
    (f"Fine-tune smollm2 on {FAQ}, cut perplexity in half, 200 steps",
     goal(target=rel(0.5), budget={"steps": 200})),
    (f"fine-tune smollm2 on {FAQ} and cut perplexity by a third",
     goal(target=rel(0.3333))),
    (f"fine-tune smollm2 on {FAQ} so that perplexity goes down by 25%",
     goal(target=rel(0.25))),
    (f"Fine-tune smollm2 on {FAQ}. Make sure perplexity falls by at least a tenth compared to production.",
     goal(target=rel(0.1, "production"))),
    (f"fine-tune smollm2 on {FAQ}; improve f1 by 10% over production",
     goal(target=rel(0.1, "production", "f1"))),
    (f"fine-tune smollm2 on {FAQ} and improve perplexity by 20% over the base",
     goal(target=rel(0.2))),
    (f"Fine-tune smollm2 on {FAQ}, a 10% drop in perplexity versus production",
     goal(target=rel(0.1, "production"))),
    (f"fine-tune smollm2 on {FAQ} and get perplexity down 20% from the base",
     goal(target=rel(0.2))),
    (f"Fine-tune smollm2 on {FAQ}, f1: a 5% gain over production",
     goal(target=rel(0.05, "production", "f1"))),
    # 3. relative to production, as a fraction in words
    (f"Fine-tune smollm2 on {FAQ}; I want a fifth lower perplexity than production.",
     goal(target=rel(0.2, "production"))),
    (f"fine-tune smollm2 on {FAQ} with perplexity a quarter below the production model",
     goal(target=rel(0.25, "production"))),
    (f"fine-tune smollm2 on {FAQ} so perplexity ends up two-thirds below what is deployed",
     goal(target=rel(0.6667, "production"))),
    # 4. deployment ruled out, in any wording
    (f"Don't deploy anything: fine-tune smollm2 on {FAQ} with LoRA rank 8",
     goal(lora=LoraSettings(rank=8))),
    (f"Don\u2019t deploy anything \u2014 fine-tune smollm2 on {FAQ}",
     goal()),
    (f"No deployment. Fine-tune smollm2 on {FAQ} for 50 steps.",
     goal(budget={"steps": 50})),
    ("Without deploying, fine-tune gemma 3 on bbc-news for ten minutes",
     goal(base_model=GEMMA, data="bbc-news", budget={"minutes": 10})),
    (f"Fine-tune smollm2 on {FAQ}, do NOT deploy it",
     goal()),
    (f"fine-tune smollm2 on {FAQ}; it should not be deployed",
     goal()),
    (f"fine-tune smollm2 on {FAQ} \u2014 no need to ship it",
     goal()),
    (f"fine-tune smollm2 on {FAQ}. Deployment: none.",
     goal()),
    (f"Fine-tune smollm2 on {FAQ}, skip deployment",
     goal()),
    (f"fine-tune smollm2 on {FAQ}, hold off on deploying",
     goal()),
    (f"please fine-tune smollm2 on {FAQ} for twenty minutes and don't ship it",
     goal(budget={"minutes": 20})),
    # ... but a negation that is a condition deploys when the gate passes
    (f"fine-tune smollm2 on {FAQ}, don\u2019t deploy unless it beats production",
     goal(target=rel(0.0, "production"), deploy="if_passed", model_name="support-faq")),
    (f"fine-tune smollm2 on {FAQ}; never deploy without my sign-off",
     goal(deploy="if_passed", model_name="support-faq", approval="required")),
    (f"fine-tune smollm2 on {FAQ}; if it fails, don't deploy",
     goal(deploy="if_passed", model_name="support-faq")),
    (f"fine-tune smollm2 on {FAQ}; deploy as faq-bot if it passes, otherwise do not deploy",
     goal(deploy="if_passed", model_name="faq-bot")),
    (f"fine-tune smollm2 on {FAQ} and push it to production as faq-bot",
     goal(deploy="if_passed", model_name="faq-bot")),
    (f"fine-tune smollm2 on {FAQ}, ship it as faq-bot only if it passes",
     goal(deploy="if_passed", model_name="faq-bot")),
    (f"fine-tune smollm2 on {FAQ}; deploy as faq-bot even if it fails",
     goal(deploy="always", model_name="faq-bot")),
    (f"fine-tune smollm2 on {FAQ} for 1 hour 30 minutes and deploy as soon as it passes",
     goal(budget={"minutes": 90}, deploy="if_passed", model_name="support-faq")),
    # 7. "N percent" after the word target
    (f"Fine-tune smollm2 on {FAQ}, target: 20 percent lower perplexity than the base",
     goal(target=rel(0.2))),
    (f"fine-tune smollm2 on {FAQ} with a target of 15 percent below base",
     goal(target=rel(0.15))),
    (f"fine-tune smollm2 on {FAQ} with a perplexity target of 20",
     goal(target=ab("perplexity", 20, "lower"))),
    # more absolute and relative wordings
    (f"Fine-tune smollm2 on {FAQ}, ppl 20 or lower, 2 hours",
     goal(target=ab("perplexity", 20, "lower"), budget={"minutes": 120})),
    ("fine-tune gemma3 on bbc-news: accuracy 80% or better",
     goal(base_model=GEMMA, data="bbc-news", target=ab("accuracy", 0.8))),
    (f"fine-tune smollm2 on {FAQ} with an F1 of 0.7 or higher",
     goal(target=ab("f1", 0.7))),
    ("adapt gemma3 to bbc-news with exact match of 60% or more",
     goal(base_model=GEMMA, data="bbc-news", target=ab("exact_match", 0.6))),
    (f"fine-tune smollm2 on {FAQ}, goal: perplexity down to 15",
     goal(target=ab("perplexity", 15, "lower"))),
    (f"fine-tune smollm2 on {FAQ} until ppl is at most 18.5",
     goal(target=ab("perplexity", 18.5, "lower"))),
    (f"Fine-tune smollm2 on {FAQ} so perplexity is lower than the base model's",
     goal(target=rel(0.0))),
    (f"fine-tune smollm2 on {FAQ}, at least as good as production",
     goal(target=rel(0.0, "production"))),
    (f"Fine-tune smollm2 on {FAQ} as chat; beat the current model",
     goal(format="chat", target=rel(0.0, "production"))),
    (f"fine-tune smollm2 on {FAQ}, rouge-l at least 10 percent above the base",
     goal(target=rel(0.1, "base", "rougeL"))),
    (f"Fine-tune smollm2 on {FAQ}, validation perplexity 30% better than the original model",
     goal(target=rel(0.3))),
    ("gemma3-270m, bbc-news, full fine-tune, accuracy of at least 0.85, within 30 mins, deploy as news-router regardless",
     goal(base_model=GEMMA, data="bbc-news", method="full", target=ab("accuracy", 0.85), budget={"minutes": 30},
          deploy="always", model_name="news-router")),
    # budgets, LoRA settings, casing
    (f"Fine-tune smollm2 on {FAQ} for 1.5 hours",
     goal(budget={"minutes": 90})),
    (f"fine-tune smollm2 on {FAQ} in an hour and a half",
     goal(budget={"minutes": 90})),
    (f"fine-tune smollm2 on {FAQ} for 2k steps",
     goal(budget={"steps": 2000})),
    (f"FINE-TUNE SMOLLM2 ON {FAQ}, LORA RANK 16, 300 STEPS",
     goal(lora=LoraSettings(rank=16), budget={"steps": 300})),
    (f"fine-tune smollm2 on {FAQ}, lora r=8, alpha=16, dropout 0.1",
     goal(lora=LoraSettings(rank=8, alpha=16, dropout=0.1))),
    (f"Fine-tune smollm2 on {FAQ} with an 8-rank LoRA",
     goal(lora=LoraSettings(rank=8))),
    ("pretrain a tiny model from scratch on bbc-news; perplexity < 300; 500 steps",
     goal(task="pretrain", data="bbc-news", target=ab("perplexity", 300, "lower"), budget={"steps": 500})),
    ("From scratch: train a small model on bbc-news for 45 minutes",
     goal(task="pretrain", data="bbc-news", size="small", budget={"minutes": 45})),
    (f"fine-tune Qwen/Qwen2.5-0.5B-Instruct on {FAQ} as question/answer pairs",
     goal(base_model="Qwen/Qwen2.5-0.5B-Instruct", format="pairs")),
    (f"improve smollm2 on {FAQ} so that perplexity drops 10%",
     goal(target=rel(0.1))),
    (f"On {FAQ}, with LoRA rank eight, fine-tune SmolLM2 for two hundred and fifty steps; perplexity fifteen percent below "
     "the base.",
     goal(lora=LoraSettings(rank=8), budget={"steps": 250}, target=rel(0.15))),
]


@pytest.mark.parametrize("text,expected", CASES + MORE_CASES, ids=[f"goal{i}" for i in range(len(CASES + MORE_CASES))])
def test_phrasings_parse_to_the_exact_goal(text, expected):
    assert parse_goal(text) == expected


def test_there_are_at_least_a_hundred_distinct_phrasings_and_twenty_five_refusals():
    phrasings = {t for t, _ in CASES + MORE_CASES} | {t for t, _ in REFUSALS}
    assert len(phrasings) >= 100 and len({t for t, _ in REFUSALS}) >= 25


def test_a_local_base_model_directory_small_enough_for_a_full_fine_tune(tmp_path):
    model = tmp_path / "tiny-model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 512, "vocab_size": 2048}')
    parsed = parse_goal(f"fine-tune the model {model} on {FAQ}")
    assert parsed.base_model == str(model) and parsed.method == "full"  # < 100M parameters: full by default


REFUSALS = [
    ("", "goal: empty"),
    ("fine-tune smollm2 to lower perplexity by 20%", "data: the goal names no data"),
    (f"fine-tune smollm2 on {FAQ} in 0 minutes", "budget: a zero budget"),
    (f"fine-tune smollm2 on {FAQ} for zero steps", "budget: a zero budget"),
    (f"fine-tune smollm2 on {FAQ} to 90% accuracy", "metric: accuracy needs labelled data, but examples/data/support_faq.jsonl has no label field"),
    (f"fine-tune smollm2 on {FAQ} as pairs with accuracy above 80%", "metric: accuracy needs labelled data, but the goal says the data is pairs"),
    (f"fine-tune llama-70b-ultra on {FAQ}", "base_model: unknown model 'llama-70b-ultra'"),
    (f"fine-tune on {FAQ}", "base_model: the goal names no model to fine-tune"),
    ("pretrain smollm2 on bbc-news", "base_model: pretraining starts from scratch, but the goal names smollm2-135m-instruct"),
    (f"fine-tune smollm2 on {FAQ} so perplexity is 150% below the base model", "target: 150% below the baseline is impossible"),
    ("fine-tune gemma3 on bbc-news to reach 120% accuracy", "target: accuracy is a fraction between 0 and 1"),
    (f"fine-tune smollm2 on {FAQ} and deploy as Support Bot!", "model_name: 'Support' is not a registry name"),
    (f"full fine-tune of smollm2 on {FAQ} with rank 8", "method: the goal asks for a full fine-tune and gives LoRA settings"),
    (f"fine-tune smollm2 on {FAQ} with lora rank 0", "lora.rank: Input should be greater than or equal to 1"),
    # 2. LoRA needs a base: never a silent pretraining from scratch
    (f"Train a LoRA of rank 8 on {FAQ}", "base_model: LoRA adapts an existing model, but the goal names no base model"),
    (f"LoRA rank 16 on {FAQ}, perplexity 20% below the base", "base_model: LoRA adapts an existing model"),
    (f"{FAQ}, 100 steps, perplexity under 30", "base_model: the goal names no model to fine-tune"),
    # 5. negative budgets
    (f"fine-tune smollm2 on {FAQ} for -50 steps", "budget: 'for -50 steps' is negative"),
    (f"fine-tune smollm2 on {FAQ} in -10 minutes", "budget: 'in -10 minutes' is negative"),
    (f"fine-tune smollm2 on {FAQ} within 0 hours", "budget: a zero budget"),
    # 6. accuracy above 100% or above 1
    ("fine-tune gemma3 on bbc-news with accuracy of 120%", "target: accuracy is a fraction between 0 and 1; 120% cannot"),
    ("Fine-tune gemma3 on bbc-news, accuracy at least 1.5", "target: accuracy is a fraction between 0 and 1; 1.5 cannot"),
    # 9. a registered model with no workspace registry to find it in
    (f"improve support-bot on {FAQ} so that perplexity drops 10%", "base_model: support-bot is not in production in this workspace"),
    # 10. contradictions
    ("pretrain from scratch on bbc-news with LoRA", "method: LoRA adapts a pretrained base model, but the goal pretrains"),
    (f"fine-tune smollm2 from scratch on {FAQ}", "base_model: pretraining starts from scratch, but the goal names smollm2"),
    ("fine-tune from scratch on bbc-news", "task: the goal says both fine-tune and from scratch"),
    (f"full fine-tune of smollm2 on {FAQ} using LoRA", "method: the goal asks for both a full fine-tune and LoRA"),
    (f"Don't deploy anything: fine-tune smollm2 on {FAQ} and deploy it as faq-bot",
     "deploy: the goal says both 'Don't deploy anything' and 'deploy it as faq-bot'"),
    (f"fine-tune smollm2 on {FAQ}: perplexity under 20, and f1 at least 0.9",
     "target: the goal states 2 targets ('perplexity under 20' and 'f1 at least 0.9')"),
    (f"fine-tune smollm2 on {FAQ} with LoRA rank 8 and rank 16", "lora.rank: the goal gives two values (8, 16)"),
    (f"fine-tune smollm2 on {FAQ} for 100 steps, no wait, 200 steps", "budget: the goal gives two step counts"),
    (f"fine-tune smollm2 on {FAQ} for 2 hours, no, 30 minutes", "budget: the goal gives two time limits"),
    (f"fine-tune smollm2 on {FAQ} and examples/data/other.jsonl", "data: the goal names 2 data sources"),
    ("pretrain from scratch on bbc-news, perplexity 30% below the base", "target: a pretraining run has no base model"),
    # 11. what the parser could not account for is named back
    (f"fine-tune smollm2 on {FAQ} and beat last week's model", "target: I did not understand: 'beat last week's model'"),
    (f"fine-tune smollm2 on {FAQ} so it's better than before", "target: I did not understand: 'it's better than before'"),
    (f"fine-tune smollm2 on {FAQ}. Make it great!", "target: I did not understand: 'Make it great'"),
    (f"Fine-tune SmolLM2 on {FAQ} and outperform GPT-4", "target: I did not understand: 'outperform GPT-4'"),
    (f"fine-tune smollm2 on {FAQ} until it's as good as before", "target: I did not understand: 'it's as good as before'"),
    (f"smollm2, {FAQ}, lower perplexity", "target: I did not understand: 'lower perplexity'"),
    (f"fine-tune smollm2 on {FAQ} to improve it", "target: I did not understand: 'improve it'"),
    (f"fine-tune smollm2 on {FAQ} and deploy it if it's good enough", "target: I did not understand: 'deploy it if it's good enough'"),
    (f"fine-tune smollm2 on {FAQ}, perplexity around 20", "target: I did not understand: 'perplexity around 20'"),
    (f"fine-tune smollm2 on {FAQ} with learning rate 1e-4", "goal: I did not understand: 'learning rate 1e-4'"),
    (f"fine-tune smollm2 on {FAQ} with a batch size of 16", "goal: I did not understand: 'a batch size of 16'"),
    (f"fine-tune smollm2 on {FAQ} for 3 epochs", "budget: a goal's budget is steps or minutes, not '3 epochs'"),
    # targets that cannot mean what they say
    (f"fine-tune smollm2 on {FAQ}, perplexity 10% higher than the base", "target: perplexity improves downwards"),
    (f"fine-tune smollm2 on {FAQ}, perplexity increases by 10% over the base", "target: perplexity improves downwards"),
    (f"Fine-tune SmolLM2 on {FAQ}: accuracy of 0.9, please", "metric: accuracy needs labelled data, but examples/data/support_faq.jsonl"),
    ("fine-tune gemma3 on bbc-news, accuracy at most 0.9", "target: accuracy improves upwards"),
    (f"fine-tune smollm2 on {FAQ}, perplexity 20 below the base", "target: 'perplexity 20 below the base' gives no percentage"),
    (f"fine-tune smollm2 on {FAQ}, exact match 5 points above production", "target: 'exact match 5 points above production' gives no percentage"),
    (f"fine-tune smollm2 on {FAQ} with perplexity under 20%", "target: perplexity is a number (1 or more), not a percentage"),
    (f"fine-tune smollm2 on {FAQ}, ppl: 0.5", "target: perplexity is never below 1"),
    ("fine-tune gemma 2 on bbc-news", "base_model: unknown model 'gemma'"),
    ("Pretrain a large model from scratch on bbc-news", "size: 'large' is not a size"),
    (f"Fine-tune smollm2 on {FAQ} and deploy it as Support_Bot", "model_name: 'Support_Bot' is not a registry name"),
]


@pytest.mark.parametrize("text,message", REFUSALS, ids=[f"refusal{i}" for i in range(len(REFUSALS))])
def test_missing_or_impossible_goals_are_refused_in_one_line(text, message):
    with pytest.raises(InputError) as err:
        parse_goal(text)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_accuracy_on_a_labelled_file_is_accepted(tmp_path):
    data = write_jsonl(tmp_path / "tickets.jsonl", [{"text": "my card was charged twice", "label": "billing"}])
    parsed = parse_goal(f"fine-tune smollm2 on {data} to 85% accuracy")
    assert parsed.target == Target(**ab("accuracy", 0.85)) and parsed.data == str(data)


def test_numbers_in_words():
    assert words_to_numbers("twenty five minutes and two hundred steps") == "25 minutes and 200 steps"
    assert words_to_numbers("a quarter below, half an hour, three quarters of") == "25% below, 30 minutes, 75%"
    assert words_to_numbers("one thousand five hundred steps") == "1500 steps"
    assert words_to_numbers("an hour and a half, two and a half hours, a quarter of an hour") == \
        "90 minutes, 2.5 hours, 15 minutes"


def registered(ws, name: str, production: bool, tmp_path) -> Path:
    """A model registered in the workspace (and promoted to production when asked): its version directory."""
    export = tmp_path / f"export-{name}"
    export.mkdir()
    (export / "config.json").write_text('{"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 300}')
    (export / "lineage.json").write_text('{"run_id": "r1", "dataset": "0123456789abcdef", "base_model": "smollm2-135m-instruct"}')
    registry = Registry(ws)
    version = registry.register(name, export)
    if production:
        registry.promote(name, version.version, force=True, reason="test")
    return registry.resolve(f"{name}@{version.version}")[2]


def test_improving_a_model_in_production_starts_from_its_production_version(ws, tmp_path):
    prod = registered(ws, "support-bot", True, tmp_path)
    parsed = parse_goal(f"Improve support-bot on {FAQ} so that perplexity drops 10%, then deploy it", ws)
    assert parsed == goal(base_model=str(prod), method="full", target=rel(0.1), deploy="if_passed", model_name="support-bot",
                          notes="starts from support-bot's production version v1")
    retrain = parse_goal(f"retrain support-bot on {FAQ} with LoRA rank 4 for 30 steps", ws)
    assert (retrain.base_model, retrain.method, retrain.lora, retrain.deploy) == (str(prod), "lora", LoraSettings(rank=4), "never")
    assert "support-bot's production version v1" in goal_sentence(retrain)


@pytest.mark.parametrize("text,message", [
    (f"improve help-bot on {FAQ} so that perplexity drops 10%", "base_model: help-bot is not in production in this workspace"),
    (f"improve other-bot on {FAQ}", "base_model: other-bot is not in production in this workspace; name a base model"),
    (f"fine-tune help-bot@staging on {FAQ}", "base_model: help-bot is not in staging in this workspace"),
])
def test_a_model_not_in_production_here_is_refused_by_name(ws, tmp_path, text, message):
    registered(ws, "help-bot", False, tmp_path)
    with pytest.raises(InputError) as err:
        parse_goal(text, ws)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("text,sentence", [
    ("Fine-tune smollm2-135m-instruct on examples/data/support_faq.jsonl with LoRA rank 8 for 60 steps or 6 minutes, so that "
     "perplexity ends at least 15% below the base model, and deploy it as support-bot if it passes.",
     "Fine-tune smollm2-135m-instruct with LoRA rank 8 on examples/data/support_faq.jsonl for at most 60 steps or 6 minutes; "
     "success: test perplexity at least 15% below the base model; deploy as support-bot if the gate passes."),
    ("Fine-tune gemma 3 270m on bbc-news to reach at least 85% accuracy, full fine-tune, no more than 30 minutes, "
     "ship it whatever the score as news-router.",
     "Fine-tune all the weights of gemma3-270m on bbc-news for at most 30 minutes; success: accuracy at least 85%; "
     "deploy as news-router whatever the gate says."),
    ("pretrain a small model from scratch on bbc-news for two hours; perplexity < 300",
     "Pretrain a small model from scratch on bbc-news for at most 2 hours; success: test perplexity at most 300; do not deploy."),
    (f"fine-tune smollm2 on {FAQ} as pairs with lora r=16 alpha 32, beat production, deploy as faq-bot after human approval, "
     "note: keep answers short",
     f"Fine-tune smollm2-135m-instruct with LoRA rank 16, alpha 32 on {FAQ} as prompt-response pairs; success: test perplexity "
     "no worse than the production model; deploy as faq-bot if the gate passes, after a person approves; note: keep answers short."),
    (f"fine-tune smollm2 on {FAQ}, f1 at least 5% better than the current model, 1 step",
     f"Fine-tune smollm2-135m-instruct with LoRA on {FAQ} for at most 1 step; success: F1 at least 5% above the production "
     "model; do not deploy."),
    (f"fine-tune smollm2 on {FAQ}, don't deploy",
     f"Fine-tune smollm2-135m-instruct with LoRA on {FAQ}; success: no target was given, so test perplexity no worse than "
     "the base model; do not deploy."),
])
def test_goal_sentence_says_the_parsed_goal_in_one_plain_sentence(text, sentence):
    assert goal_sentence(parse_goal(text)) == sentence


def test_cli_plan_prints_the_goal_and_refuses_in_one_line(cli):
    ok = cli("plan", f"fine-tune smollm2 on {FAQ} with LoRA rank 8, perplexity 20% below the base, 60 steps", "--json")
    assert ok.exit_code == 0, ok.stderr
    body = ok.json()
    assert body["goal"] == goal(target=rel(0.2), budget={"steps": 60}, lora=LoraSettings(rank=8)).model_dump(mode="json")
    assert body["plan"]["base_model"] == SMOL and body["plan"]["method"] == "lora" and body["plan"]["budget"]["steps"] == 60
    bad = cli("plan", "fine-tune smollm2 to lower perplexity", "--json")
    assert bad.exit_code == 2 and bad.stdout == "" and bad.stderr.startswith("error: data: the goal names no data")
