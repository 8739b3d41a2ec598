"""Plans are made by code: defaults, memory's best config, and the next learning rate after a miss."""

from __future__ import annotations

import pytest

from memory.store import BestConfig
from training.contracts import (
    CurationSettings,
    DatasetSummary,
    Goal,
    LengthStats,
    TrainPlan,
)
from training.plan_from_goal import MAX_FINETUNE_LR, next_lr, plan_for


def summary(fmt: str = "pairs") -> DatasetSummary:
    stats = LengthStats(unit="chars", min=1, mean=1.0, p50=1, p95=1, max=1, total=1)
    return DatasetSummary(fingerprint="0123456789abcdef", source="d.jsonl", format=fmt, schema=["question,answer"],
                          records_in=50, records_after=50, removed={}, pii={}, splits={"train": 40, "val": 5, "test": 5},
                          lengths_chars=stats, lengths_tokens=stats, samples=[], description="", top_terms=[],
                          settings=CurationSettings(), created_at="2026-01-01T00:00:00+00:00")


GOAL = Goal(task="finetune", data="d.jsonl", base_model="smollm2-135m-instruct", method="lora", metric="perplexity")


def best(lr: float, passed: bool, tried: list[float]) -> BestConfig:
    plan, _ = plan_for(GOAL, summary())
    return BestConfig(run_id="earlier", dataset="fedcba9876543210", similarity=0.9, metric="val_perplexity", value=9.0,
                      plan=plan.model_copy(update={"lr": lr, "batch_size": 4}), passed=passed, tried_lrs=tried)


def test_defaults_then_memory():
    plan, reused = plan_for(GOAL, summary())
    assert (plan.lr, plan.method, plan.lora.rank, reused) == (2e-4, "lora", 8, None)
    plan, reused = plan_for(GOAL, summary(), best(5e-4, True, [5e-4]))
    assert (plan.lr, plan.batch_size, reused) == (5e-4, 4, "earlier")  # what passed is reused as it was


@pytest.mark.parametrize("lr,tried,expected", [
    (2e-4, [2e-4], 6e-4),                 # a miss: three times higher
    (2e-4, [2e-4, 6e-4], 2e-4 / 3),       # higher was tried too: three times lower
    (2e-4, [2e-4 / 3, 2e-4, 6e-4], 2e-4),  # both tried: the best one again
    (2e-3, [2e-3], MAX_FINETUNE_LR["lora"]),  # never above the cap
])
def test_a_configuration_that_missed_its_gate_is_not_repeated(lr, tried, expected):
    assert next_lr(lr, tried, MAX_FINETUNE_LR["lora"]) == pytest.approx(expected)
    plan, reused = plan_for(GOAL, summary(), best(lr, False, tried))
    assert plan.lr == pytest.approx(expected) and reused == "earlier"


@pytest.mark.parametrize("earlier,memory,expected", [
    ([(2e-4, False)], None, 6e-4),                           # the loop's own miss moves it on, memory or not
    ([(2e-4, False), (6e-4, False)], None, 1.8e-3),          # and on again from the latest miss
    ([(2e-4, False), (6e-4, True), (6e-4, False)], None, 6e-4),  # once a round passed, its rate stays
    ([(5e-4, False)], best(5e-4, True, [5e-4, 1.5e-3]), 5e-4 / 3),  # memory's tried rates are not tried again
])
def test_a_loop_round_takes_its_learning_rate_from_the_loops_own_rounds(earlier, memory, expected):
    plan, reused = plan_for(GOAL, summary(), memory, earlier)
    assert plan.lr == pytest.approx(expected)
    assert reused == (None if memory is None else "earlier")  # reused names memory's run, never the loop's own


def test_a_warm_start_is_a_finetune_only_setting():
    plan, _ = plan_for(GOAL, summary())
    warm = TrainPlan.model_validate({**plan.model_dump(), "init_from": "/models/production"})
    assert warm.init_from == "/models/production"
    with pytest.raises(ValueError, match="init_from: only a fine-tuning run"):
        TrainPlan(task="pretrain", dataset="0123456789abcdef", size="tiny", init_from="/models/production")


def test_a_test_split_too_small_to_decide_the_target_is_said_with_what_would_settle_it():
    from training.contracts import Goal, Target
    from training.plan_from_goal import test_size_warning

    goal = Goal(task="finetune", data="bbc-news", base_model="smollm2-135m-instruct", method="lora", metric="accuracy",
                target=Target(metric="accuracy", direction="higher", kind="absolute", value=0.8))
    small = test_size_warning(goal, 14)
    assert small.startswith("the test split has 14 records: a 90% interval on accuracy will be about ±0.18 wide")
    assert "about 44 test records give ±0.10" in small
    assert test_size_warning(goal, 210) is None
    assert test_size_warning(goal.model_copy(update={"target": None}), 14) is None  # nothing to decide
    ppl = Goal(task="finetune", data="faq.jsonl", base_model="smollm2-135m-instruct", method="lora", metric="perplexity",
               target=Target(metric="perplexity", direction="lower", kind="relative", value=0.15, baseline="base"))
    assert "at least 30 test records" in test_size_warning(ppl, 14) and test_size_warning(ppl, 40) is None


@pytest.mark.parametrize("text,processes,strategy,batch", [
    ("Fine-tune smollm2-135m-instruct on d.jsonl with LoRA on 2 GPUs with FSDP for 60 steps", 2, "fsdp", 8),
    ("Fine-tune smollm2-135m-instruct on d.jsonl across 3 processes for 60 steps", 3, "ddp", 9),
    ("Fine-tune smollm2-135m-instruct on d.jsonl with LoRA using torchrun for 60 steps", None, "ddp", 8),
])
def test_a_goal_naming_gpus_or_a_strategy_plans_a_torchrun_job(text, processes, strategy, batch):
    from crews.goals import goal_sentence, parse_goal

    goal = parse_goal(text)
    assert (goal.processes, goal.strategy) == (processes, strategy)
    plan, _ = plan_for(goal, summary())
    # the batch grows to a multiple of the processes: each takes an equal share of every micro-batch
    assert (plan.launcher, plan.nproc, plan.strategy, plan.batch_size) == ("torchrun", processes, strategy, batch)
    assert f"with {strategy.upper()} (torchrun)" in goal_sentence(goal)
    assert plan_for(GOAL, summary())[0].launcher == "local"  # a goal that says nothing runs here
