"""Preference tuning in the one training loop: DPO (LoRA and full), ORPO and KTO on a tiny real model.

The data has a rule to learn: a prompt carries a ticket code ("T-4821"); the chosen answer repeats it, the rejected
one does not. Each objective trains real steps; its loss must fall, and on held-out pairs its preference accuracy
(from `evaluate_run`, paired with the base on the same pairs) must rise above the base's.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from tests.helpers import pretrain_tiny_base, write_jsonl
from training import loop
from training.contracts import Budget, CurationSettings, Goal, Target, TrainPlan
from training.data import curate, curate_to_workspace
from training.errors import InputError
from training.evaluate import add_reference, evaluate_run, score_directory
from training.gate import gate
from training.loop import train

THINGS = ["printer", "router", "laptop", "phone", "screen", "keyboard", "camera", "speaker", "scanner", "tablet"]
SPLIT = CurationSettings(split=(0.6, 0.1, 0.3))  # a test split of ~50 pairs: intervals narrow enough to decide
PLAN = dict(seq_len=64, batch_size=8, warmup_steps=2, eval_every=5, eval_batches=4, checkpoint_every=100)


def ticket_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        code, thing = f"T-{rng.randrange(1000, 9999)}", rng.choice(THINGS)
        rows.append({"prompt": f"Ticket {code}: my {thing} stopped working on day {rng.randrange(1, 29)}.",
                     "chosen": f"Logged as {code}, the {thing} team will call.",
                     "rejected": f"Logged, the {thing} team will call."})
    return rows


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tmp_path_factory.mktemp("pref-ws")


@pytest.fixture(scope="module")
def tiny_base(ws):
    return pretrain_tiny_base(ws)


@pytest.fixture(scope="module")
def pairs(ws):
    return curate_to_workspace(str(write_jsonl(ws / "tickets.jsonl", ticket_rows(200))), ws, settings=SPLIT).summary


@pytest.fixture(scope="module")
def rated(ws):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 else r["rejected"], "label": bool(i % 2)}
            for i, r in enumerate(ticket_rows(260, seed=1))]
    return curate_to_workspace(str(write_jsonl(ws / "rated.jsonl", rows)), ws, settings=SPLIT).summary


def test_curation_recognises_preference_and_feedback_columns(tmp_path):
    rows = ticket_rows(30)
    variants = [{"question": r["prompt"], "preferred": r["chosen"], "dispreferred": r["rejected"]} for r in rows[:10]]
    variants += [{"instruction": r["prompt"], "accepted": r["chosen"], "rejected": r["rejected"]} for r in rows[10:20]]
    # the chat form: two conversations sharing their prefix, differing in the final assistant turn
    chat = [{"chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": r["prompt"]},
                        {"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["rejected"]}]} for r in rows[20:]]
    data = variants + chat + [dict(variants[0])]  # and one exact duplicate
    result = curate(str(write_jsonl(tmp_path / "mixed.jsonl", data)))
    s = result.summary
    assert s.format == "preference"
    assert s.schema_ == ["chosen,rejected", "instruction,accepted,rejected", "question,preferred,dispreferred"]
    assert s.removed["exact_duplicate"] == 1 and s.records_after == 30
    records = [r for split in result.splits.values() for r in split]
    from_chat = next(r for r in records if len(r["prompt"]) == 2)
    assert [m["role"] for m in from_chat["prompt"]] == ["system", "user"]  # the shared prefix is the prompt
    assert from_chat["chosen"].startswith("Logged as T-") and from_chat["rejected"].startswith("Logged, the")

    labels = [True, False, 1, -1, "good", "bad"]
    feedback = [{"prompt": r["prompt"], "answer": r["chosen"], "label": labels[i % 6]} for i, r in enumerate(rows)]
    s = curate(str(write_jsonl(tmp_path / "rated.jsonl", feedback))).summary
    assert s.format == "feedback" and s.labels == {"bad": 15, "good": 15}
    with pytest.raises(InputError, match="field 'label' must be true / false"):
        curate(str(write_jsonl(tmp_path / "odd.jsonl", [{**feedback[0], "label": "meh"}])))


def metric_rows(ws: Path, run_id: str) -> list[dict]:
    return [json.loads(line) for line in (ws / "runs" / run_id / "metrics.jsonl").read_text().splitlines()]


def trained_and_evaluated(ws: Path, base: Path, fp: str, run_id: str, objective: str, method: str, steps: int,
                          lr: float, beta: float = 0.1):
    plan = TrainPlan(task="finetune", dataset=fp, base_model=str(base), method=method, objective=objective, beta=beta,
                     lr=lr, budget=Budget(steps=steps), **PLAN)
    result = train(plan, ws, run_id, show_progress=False)
    assert result.status == "completed"
    return metric_rows(ws, run_id), evaluate_run(ws, run_id, which="final")


def assert_learned_preferences(ev, rows, fall: float, first_loss: float | None = None):
    """The loss fell by at least `fall`, and on held-out pairs the candidate prefers the chosen answers more than the
    base does."""
    if first_loss is not None:  # at step 1 the policy is the reference: a correct reference gives exactly this loss
        assert rows[0]["loss"] == pytest.approx(first_loss, abs=2e-3)
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert vals[-1] < rows[0]["loss"] - fall, (rows[0]["loss"], vals)
    change = ev.comparisons["base"]["preference_accuracy"]
    assert ev.metrics["preference_accuracy"] > ev.metrics["base_preference_accuracy"]
    assert change.low > 0, change  # paired over the same test pairs, and sure of it
    assert ev.intervals["preference_accuracy"].n == ev.examples["test"] >= 40


def test_dpo_with_lora_learns_the_preference_and_scores_the_reference_once(ws, tiny_base, pairs, monkeypatch):
    calls = []
    real = loop.reference_logps

    def counted(model, examples, *args, **kwargs):
        calls.append(len(examples))
        return real(model, examples, *args, **kwargs)

    monkeypatch.setattr(loop, "reference_logps", counted)
    rows, ev = trained_and_evaluated(ws, tiny_base, pairs.fingerprint, "dpo-lora", "dpo", "lora", 20, 3e-3)
    fits = json.loads((ws / "runs" / "dpo-lora" / "result.json").read_text())["records"]
    # once, before the first step, for every train and validation pair (not per step: 20 steps ran)
    assert calls == [fits["train"]["whole"] + fits["train"]["cut"] + fits["val"]["whole"] + fits["val"]["cut"]]
    assert_learned_preferences(ev, rows, 0.15, first_loss=math.log(2))  # measured: 0.693 -> 0.475
    assert ev.metrics["base_preference_accuracy"] == 0.5  # the base is its own reference: every pair a tie
    assert ev.metrics["reward_margin"] > 0 and ev.intervals["reward_margin"].low > 0
    assert "preference_accuracy_raw" in ev.metrics and "general_perplexity" in ev.metrics  # forgetting stays
    saved = json.loads((ws / "runs" / "dpo-lora" / "evaluation.json").read_text())
    assert len(saved["per_record"]["candidate"]["answer_logps"]) == ev.examples["test"]

    # the gate: a target on preference accuracy is judged on its interval; production on the same pairs
    goal = Goal(task="finetune", data="x.jsonl", base_model="b", method="lora", objective="dpo",
                metric="preference_accuracy",
                target=Target(metric="preference_accuracy", direction="higher", kind="absolute", value=0.8))
    verdict = gate(goal, ev)
    line = next(r for r in verdict.reasons if r.startswith("preference_accuracy"))
    assert (" met (" in line and "NOT met" not in line) == (ev.intervals["preference_accuracy"].low >= 0.8), line
    assert verdict.metric == "preference_accuracy" and verdict.value == ev.metrics["preference_accuracy"]
    # production scored on the same pairs, against the same reference (the base stands in as production here)
    production = score_directory(ws, tiny_base, pairs.fingerprint, 64, forgetting=("a short text to score",))
    add_reference(ev, "production", ev.per_record["candidate"], production.values)
    assert ev.metrics["production_preference_accuracy"] == 0.5
    assert ev.comparisons["production"]["preference_accuracy"].low > 0
    assert any(r.startswith("production: preference_accuracy") and r.endswith(": met") for r in gate(goal, ev).reasons)
    better_production = gate(goal, ev, production={"preference_accuracy": ev.metrics["preference_accuracy"] + 0.01})
    assert not better_production.passed and any(r.startswith("production:") and "NOT met" in r
                                                for r in better_production.reasons)


def test_dpo_full_weights(ws, tiny_base, pairs):
    rows, ev = trained_and_evaluated(ws, tiny_base, pairs.fingerprint, "dpo-full", "dpo", "full", 15, 1e-3)
    assert_learned_preferences(ev, rows, 0.5, first_loss=math.log(2))  # measured: 0.693 -> 0.015


def test_orpo_needs_no_reference(ws, tiny_base, pairs):
    rows, ev = trained_and_evaluated(ws, tiny_base, pairs.fingerprint, "orpo", "orpo", "full", 15, 3e-3, beta=0.5)
    # ORPO's accuracy compares mean per-token log-probabilities of the model itself, so the base has a real score
    assert_learned_preferences(ev, rows, 2.0)  # measured: 7.43 -> 3.25
    assert ev.metrics["base_preference_accuracy"] < 0.5


def test_kto_learns_from_rated_answers(ws, tiny_base, rated):
    assert rated.format == "feedback"
    rows, ev = trained_and_evaluated(ws, tiny_base, rated.fingerprint, "kto", "kto", "lora", 20, 3e-3)
    assert_learned_preferences(ev, rows, 0.02, first_loss=0.5)  # measured: 0.5 -> 0.456  # 1 - sigmoid(0) for every answer at the start


def test_a_preference_objective_needs_preference_data_and_back(ws, tiny_base, pairs, rated, tmp_path):
    qa = curate_to_workspace(str(write_jsonl(tmp_path / "qa.jsonl", [
        {"question": r["prompt"], "answer": r["chosen"]} for r in ticket_rows(30)])), ws).summary
    cases = [("dpo", qa.fingerprint, "objective: dpo needs pairs (prompt, chosen, rejected), but dataset"),
             ("orpo", rated.fingerprint, "objective: orpo needs pairs (prompt, chosen, rejected), but dataset"),
             ("kto", pairs.fingerprint, "objective: kto needs rated answers"),
             ("sft", pairs.fingerprint, "which trains with objective dpo or orpo, not sft")]
    for i, (objective, fp, message) in enumerate(cases):
        plan = TrainPlan(task="finetune", dataset=fp, base_model=str(tiny_base), objective=objective,
                         budget=Budget(steps=1), **PLAN)
        with pytest.raises(InputError) as err:
            train(plan, ws, f"refused-{i}", show_progress=False)
        assert message in str(err.value) and "\n" not in str(err.value)
        assert not (ws / "runs" / f"refused-{i}").exists()  # refused before anything was written
    # 'method: dpo' is read as the objective over full weights
    plan = TrainPlan(task="finetune", dataset="d", base_model="b", method="dpo")
    assert (plan.objective, plan.method) == ("dpo", "full")


def test_a_goal_using_dpo_plans_the_dpo_objective(ws, pairs, rated, tmp_path):
    from crews.goals import goal_sentence, parse_goal
    from training.plan_from_goal import plan_for

    goal = parse_goal(f"align smollm2 with the ratings in {tmp_path / 'feedback.jsonl'} using DPO")
    assert (goal.task, goal.objective, goal.metric) == ("finetune", "dpo", "preference_accuracy")
    assert "by DPO" in goal_sentence(goal)
    plan, _ = plan_for(goal, pairs)
    assert (plan.objective, plan.method, plan.beta) == ("dpo", "lora", 0.1)
    with pytest.raises(InputError, match="objective: DPO trains on preference pairs .* use KTO"):
        plan_for(goal, rated)
    orpo = parse_goal(f"fine-tune smollm2 on {tmp_path / 'prefs.jsonl'} with ORPO, preference accuracy at least 80%")
    assert orpo.objective == "orpo" and orpo.target.metric == "preference_accuracy" and orpo.target.value == 0.8
    plain = parse_goal(f"fine-tune smollm2 on {tmp_path / 'prefs.jsonl'}")
    assert plain.objective == "sft" and plan_for(plain, rated)[0].objective == "kto"  # rated answers hold nothing else
    with pytest.raises(ValueError, match="objective: kto tunes a pretrained model's preferences; it needs task finetune"):
        Goal(task="evaluate", data="x.jsonl", base_model="b", method="full", objective="kto", metric="perplexity")
    with pytest.raises(InputError, match="objective: the goal names DPO and KTO"):
        parse_goal(f"fine-tune smollm2 on {tmp_path / 'prefs.jsonl'} using DPO and KTO")


def test_a_resumed_dpo_run_scores_the_reference_from_the_starting_weights_again(ws, tiny_base, pairs, monkeypatch):
    from training.setup import MetricsLog

    fields = dict(task="finetune", dataset=pairs.fingerprint, base_model=str(tiny_base), method="lora",
                  objective="dpo", lr=3e-3, budget=Budget(steps=8), **{**PLAN, "checkpoint_every": 4})
    train(TrainPlan(**fields), ws, "dpo-whole", show_progress=False)
    write = MetricsLog.write

    def killed_after_six(self, row):
        if row["step"] == 7:
            raise KeyboardInterrupt  # stands in for a kill: the checkpoint of step 4 is the last one
        write(self, row)

    monkeypatch.setattr(MetricsLog, "write", killed_after_six)
    with pytest.raises(KeyboardInterrupt):
        train(TrainPlan(**fields), ws, "dpo-resumed", show_progress=False)
    monkeypatch.setattr(MetricsLog, "write", write)
    train(TrainPlan(**fields), ws, "dpo-resumed", resume=True, show_progress=False)
    whole, resumed = metric_rows(ws, "dpo-whole"), metric_rows(ws, "dpo-resumed")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    # the reference is the base again after the resume, not the step-4 weights: every loss as in the whole run
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(whole, resumed)) < 1e-4
    assert resumed[4]["loss"] != pytest.approx(math.log(2), abs=1e-3)  # the policy had moved from the reference


def test_a_chat_pair_supervises_only_its_final_answers_and_cuts_only_the_prompt(tiny_base):
    from training.batches import IGNORE, fitted_examples
    from training.models import load_base

    _, tok = load_base(tiny_base)
    prompt = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "an earlier answer"},
              {"role": "user", "content": "Ticket T-1234: the printer " + "is very broken " * 30}]
    record = {"prompt": prompt, "chosen": "Logged as T-1234.", "rejected": "Logged."}
    too_long = {"prompt": prompt[:1], "chosen": "word " * 200, "rejected": "no"}
    (pair,), fit = fitted_examples(tok, [record, too_long], "preference", 64)
    assert (fit.records, fit.cut, fit.dropped) == (2, 1, 1)  # the long prompt cut, the long answer's pair dropped
    for row, answer in zip(pair.rows, ("Logged as T-1234.", "Logged.")):
        assert len(row.input_ids) <= 64
        supervised = [int(t) for t in row.labels if t != IGNORE]
        # the answer and its end of turn, nothing of the earlier assistant turn
        assert tok.decode(supervised).startswith(answer) and "earlier" not in tok.decode(supervised)


def test_dpo_over_two_ddp_processes_matches_one_process(ws, tiny_base, pairs):
    """Each process scores the reference once for every pair, takes half of each batch's pairs, and the loss is
    averaged per pair over both: the same steps as one process taking the whole batch."""
    losses = {}
    for name, extra in (("dpo-one", {}), ("dpo-ddp", dict(launcher="torchrun", nproc=2))):
        plan = TrainPlan(task="finetune", dataset=pairs.fingerprint, base_model=str(tiny_base), method="lora",
                         objective="dpo", lr=3e-3, budget=Budget(steps=4), **{**PLAN, "eval_every": 4}, **extra)
        assert train(plan, ws, name, show_progress=False).processes == (2 if extra else 1)
        losses[name] = [(r["loss"], r.get("val_loss")) for r in metric_rows(ws, name)]
    assert losses["dpo-one"][0][0] == pytest.approx(math.log(2), abs=1e-4)
    assert losses["dpo-one"][-1][0] < losses["dpo-one"][0][0]  # it trained (measured 0.693 -> 0.635 in 4 steps)
    for (one, val_one), (ddp, val_ddp) in zip(losses["dpo-one"], losses["dpo-ddp"]):
        assert ddp == pytest.approx(one, abs=1e-5) and val_ddp == pytest.approx(val_one, abs=1e-5)


def test_planning_sizes_seq_len_for_the_longer_answer_of_each_pair(ws, tiny_base, tmp_path):
    from steps.plan import plan_goal

    rows = [{**r, "rejected": r["rejected"] + " Meanwhile please restart it, unplug it and wait a while." * 3}
            for r in ticket_rows(40, seed=2)]
    summary = curate_to_workspace(str(write_jsonl(tmp_path / "long-rejected.jsonl", rows)), ws).summary
    goal = Goal(task="finetune", data="x.jsonl", base_model=str(tiny_base), method="lora", objective="dpo",
                metric="preference_accuracy")
    plan, _, fit = plan_goal(ws, goal, summary, use_memory=False)
    assert plan.objective == "dpo" and plan.seq_len > 64  # the chosen conversations alone fit 64 tokens
    assert fit.records == summary.splits["train"] and fit.cut == fit.dropped == 0


def test_a_relative_orpo_target_over_a_base_that_never_prefers_the_chosen_answer_is_refused(ws, tiny_base, pairs):
    from steps.plan import plan_goal

    def goal(objective: str) -> Goal:
        return Goal(task="finetune", data="x.jsonl", base_model=str(tiny_base), method="full", objective=objective,
                    metric="preference_accuracy", target=Target(metric="preference_accuracy", direction="higher",
                                                                kind="relative", value=0.2, baseline="base"))

    # ORPO compares the model's own per-token log-probabilities: the base prefers no chosen answer (the code's
    # digits are unlikely), so '20% above it' would ask for nothing
    with pytest.raises(InputError, match=r"the base scores 0 on preference_accuracy .* asks for nothing"):
        plan_goal(ws, goal("orpo"), pairs, use_memory=False)
    assert plan_goal(ws, goal("dpo"), pairs, use_memory=False)[0].objective == "dpo"  # DPO's base scores 0.5
