"""The one training loop, for pretraining and fine-tuning (full or LoRA), on one process or many (DDP or FSDP).

Read it top to bottom: set up -> build model and data -> (resume) -> for each step: accumulate
gradients, clip, step, log; every `eval_every` steps validate, keep the best, maybe stop early;
every `checkpoint_every` steps checkpoint; stop at the first budget reached -> export `final/`, `best/`.
What differs between pretraining and fine-tuning lives in `training.setup`, not here; what differs between one
process, DDP and FSDP lives in `training.parallel`. A preference objective (DPO, ORPO, KTO:
`training.objective.PreferenceLoss`) changes only the loss module, the unit a step averages over (pairs, not
tokens) and, for DPO and KTO, adds the reference log-probabilities, scored once before the first step. A plan
with `launcher: torchrun` started outside a launched job goes to `training.launch`, which runs this loop in `nproc`
processes and follows them.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from training.batches import BatchStream
from training import parallel
from training.checkpoint import (latest_checkpoint, load_checkpoint, load_sharded_checkpoint, load_trainable_state,
                                 save_checkpoint, save_sharded_checkpoint, trainable_state)
from training.contracts import RunResult, TrainPlan
from training.errors import ModelcrewError
from training.estimate import check_memory
from training.evaluate import mean_loss
from training.export import export_model
from training.objective import NextTokenLoss, PreferenceLoss, autocast, precision_name, reference_logps, units
from training.runs import Run
from training.setup import Distributed, build_model, prepare_run


def lr_at(step: int, plan: TrainPlan, horizon: int | None) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio over `horizon` steps (constant if unknown)."""
    if step < plan.warmup_steps:
        return plan.lr * (step + 1) / plan.warmup_steps
    if not horizon or horizon <= plan.warmup_steps:
        return plan.lr
    progress = min(1.0, (step - plan.warmup_steps) / (horizon - plan.warmup_steps))
    floor = plan.lr * plan.min_lr_ratio
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (plan.lr - floor)


def timed_horizon(plan: TrainPlan, horizon: int | None, step: int, seconds: float) -> int:
    """The steps a minutes budget leaves room for, at the pace of the first `step` steps (`seconds`, validation
    included; the same on every process): the cosine then reaches its floor when the time runs out, instead of
    holding the peak rate to the end. A step or token budget that ends sooner keeps its own horizon."""
    fits = max(step, int(step * plan.budget.minutes * 60 / max(seconds, 1e-9)))
    return min(horizon, fits) if horizon else fits


def train(plan: TrainPlan, workspace: Path, run_id: str, resume: bool = False, show_progress: bool = True) -> RunResult:
    """Run (or resume) `run_id` in the workspace's runs/; returns what happened (also in result.json)."""
    if plan.launcher == "torchrun" and "LOCAL_RANK" not in os.environ:  # not yet inside the launched job
        from training.launch import launch

        return launch(plan, Path(workspace), run_id, resume, show_progress)
    plan = parallel.under_accelerate(plan)
    dist = Distributed.from_env()
    run = prepare_run(plan, Path(workspace), Run(workspace, run_id), resume, dist, show_progress)  # model, tokenizer, data
    check_memory(plan, run)  # refuse what cannot fit before the first step, not with an OOM kill
    model, device, run_dir = run.model, run.device, run.run_dir
    model.train()  # from_pretrained returns a model in eval mode: its dropout and checkpointing would stay off
    if plan.activation_checkpointing:  # transformers' own: each decoder layer recomputed in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    micro_batch = plan.batch_size // plan.grad_accum
    train_stream = BatchStream(run.train_examples, micro_batch, plan.seed, run.tokenizer.pad_token_id,
                               dist.rank, dist.world)
    mixed_precision = autocast(device, plan.precision)
    if plan.objective == "sft":
        objective = NextTokenLoss(model, packed=plan.task == "pretrain")  # pretraining windows are packed
    else:
        objective = PreferenceLoss(model, plan.objective, plan.beta)
    if plan.objective in ("dpo", "kto"):  # the reference: the starting weights, scored once (also on resume) before any step
        reference_logps(model, run.train_examples + run.val_examples, micro_batch, device, run.tokenizer.pad_token_id,
                        plan.precision)
    wrapped = parallel.wrap(objective, plan, dist, device)  # DDP, FSDP shards, or the objective itself
    sharded = parallel.sharded(plan, dist)
    params = [p for p in model.parameters() if p.requires_grad]  # after wrap: FSDP's are its shards
    # fused: one kernel for all parameters (CUDA and, since torch 2.4, CPU) instead of one per tensor
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=plan.weight_decay, betas=(0.9, 0.95), fused=True)
    step_fn = torch.compile(wrapped) if plan.compile else wrapped
    # validation under FSDP goes through the loss module, whose forward gathers the shards; a preference
    # objective validates on its own loss
    scored = objective if sharded or plan.objective != "sft" else model
    horizon = plan.step_horizon()  # a minutes budget sets (or shortens) it at the first validation: see timed_horizon
    timed = plan.budget.minutes is None  # whether the horizon already accounts for the minutes budget

    step, tokens, best_loss, best_step, bad_evals, trained_seconds = 0, 0, None, None, 0, 0.0
    last_val = None
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        meta = (load_sharded_checkpoint(checkpoint, model, params, optimizer, dist) if sharded
                else load_checkpoint(checkpoint, model, optimizer))
        train_stream.load_state(meta["data"])
        step, tokens, trained_seconds = meta["step"], meta["tokens"], meta["trained_seconds"]
        best_loss, best_step, bad_evals, last_val = meta["best_loss"], meta["best_step"], meta["bad_evals"], meta["last_val"]
        horizon, timed = meta.get("horizon", horizon), meta.get("timed", timed)
    metrics = run.open_metrics(after_step=step)  # on resume, rows after the checkpoint are dropped: no step twice

    def save(step_now: int) -> None:
        meta = {"data": train_stream.state(), "tokens": tokens, "trained_seconds": trained_seconds,
                "best_loss": best_loss, "best_step": best_step, "bad_evals": bad_evals, "last_val": last_val,
                "horizon": horizon, "timed": timed}
        if sharded:  # every process writes its shards
            save_sharded_checkpoint(run_dir, step_now, model, params, optimizer, meta, dist)
            return
        if dist.is_main:
            save_checkpoint(run_dir, step_now, model, optimizer, meta)
        dist.barrier()

    status, message = "completed", "reached the step budget"
    started = time.perf_counter() - trained_seconds
    progress = run.progress(total=horizon, done=step)
    try:
        while True:
            if plan.budget.steps and step >= plan.budget.steps:
                break
            if plan.budget.tokens and tokens >= plan.budget.tokens:
                status, message = "budget_tokens", f"reached the token budget ({plan.budget.tokens:,})"
                break
            if plan.budget.minutes and time.perf_counter() - started >= plan.budget.minutes * 60:
                status, message = "budget_minutes", f"reached the time budget ({plan.budget.minutes:g} min)"
                break
            t0 = time.perf_counter()
            lr = lr_at(step, plan, horizon)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # The loss is the mean over every supervised token of the step (a preference objective: every pair or
            # rated answer), on all processes: each micro-batch contributes its summed loss over the step's count
            # (DDP then averages gradients over processes, hence the factor world).
            # Counts come from the host copies, and the loss is read once per step: no device sync per micro-batch.
            micro_batches = [train_stream.next() for _ in range(plan.grad_accum)]
            targets = dist.sum(sum(units(b) for b in micro_batches))
            step_tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
            step_loss = torch.zeros((), device=device)
            for micro, batch in enumerate(micro_batches):
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                sync = micro == plan.grad_accum - 1 or dist.world == 1
                with parallel.gradient_sync(wrapped, sync), mixed_precision:
                    loss = step_fn(**batch) * dist.world / targets
                loss.backward()
                step_loss += loss.detach().float() / dist.world
            step_loss = dist.sum(step_loss.item())
            if not math.isfinite(step_loss):
                status = "diverged"
                message = (f"loss became {step_loss} at step {step + 1} (lr {lr:.3g}); stopped and kept the last good "
                           f"checkpoint — lower lr or raise warmup_steps")
                optimizer.zero_grad(set_to_none=True)
                good = latest_checkpoint(run_dir)
                if good is not None:
                    if sharded:
                        load_sharded_checkpoint(good, model, params, optimizer, dist)
                    else:
                        load_checkpoint(good, model, optimizer)
                break
            grad_norm = torch.nn.utils.clip_grad_norm_(params, plan.grad_clip) if plan.grad_clip else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += int(dist.sum(step_tokens))
            elapsed = time.perf_counter() - t0
            trained_seconds = time.perf_counter() - started
            row = {"step": step, "loss": round(step_loss, 6), "lr": lr, "tokens": tokens,
                   "tokens_per_s": round(dist.sum(step_tokens) / elapsed, 1),
                   "grad_norm": None if grad_norm is None else round(parallel.norm_value(grad_norm), 4)}
            if step % plan.eval_every == 0 or (plan.budget.steps and step == plan.budget.steps):
                last_val = mean_loss(scored, run.val_examples, micro_batch, device, run.tokenizer.pad_token_id,
                                     max_batches=plan.eval_batches, precision=plan.precision)
                row["val_loss"] = round(last_val, 6)
                if best_loss is None or last_val < best_loss:
                    best_loss, best_step, bad_evals = last_val, step, 0
                    state = trainable_state(model) if sharded or dist.is_main else None  # FSDP: all gather
                    if dist.is_main:
                        run.save_best(state, step, last_val)
                else:
                    bad_evals += 1
                if not timed:  # the time per step, validation included, is known now: fit the schedule to the minutes
                    horizon, timed = timed_horizon(plan, horizon, step, dist.mean(trained_seconds)), True
                    row["horizon"] = horizon
            metrics.write(row)
            progress.update(completed=step, loss=f"{row['loss']:.4f}", tps=f"{row['tokens_per_s']:.0f}")
            if step % plan.checkpoint_every == 0:
                save(step)
            if plan.patience and bad_evals >= plan.patience:
                status = "early_stopped"
                message = f"validation loss did not improve for {plan.patience} evaluations (best {best_loss:.4f} at step {best_step})"
                break
    except torch.cuda.OutOfMemoryError:
        raise ModelcrewError(
            f"out of memory on {device} with batch_size {plan.batch_size} (micro-batch {micro_batch}) x seq_len "
            f"{plan.seq_len}; try grad_accum {plan.grad_accum * 2} (same batch, half the memory) or seq_len "
            f"{plan.seq_len // 2}") from None
    finally:
        progress.close()
        metrics.close()

    if status != "diverged" and step % plan.checkpoint_every:
        save(step)
    wall = time.perf_counter() - started
    final_dir = run.artefacts.model_dir("final")
    best_dir = run.artefacts.model_dir("best") if best_step is not None else None
    final_state = trainable_state(model) if sharded else None  # FSDP: every process takes part
    if dist.is_main:
        if sharded:  # the gathered weights go into a plain copy of the model, which exports as any other
            model = build_model(plan, Path(workspace), run.artefacts, Distributed(), device)[0]
            load_trainable_state(model, final_state)
        export_model(model, run.tokenizer, final_dir, plan, run.lineage, step, {"val_loss": last_val})
        if best_dir is not None:
            load_trainable_state(model, run.load_best())
            export_model(model, run.tokenizer, best_dir, plan, run.lineage, best_step, {"val_loss": best_loss})
    result = RunResult(
        run_id=run_id, status=status, message=message, steps=step, tokens=tokens, best_step=best_step,
        best_val_loss=best_loss, final_val_loss=last_val, wall_seconds=round(wall, 2),
        tokens_per_second=round(tokens / max(trained_seconds, 1e-9), 1), peak_memory_mb=round(run.peak_memory_mb(), 1),
        device=str(device), trainable_params=run.trainable_params, total_params=run.total_params,
        final_dir=str(final_dir), best_dir=str(best_dir) if best_dir else None,
        records={split: fit.as_dict() for split, fit in run.fits.items()}, processes=dist.world,
        strategy=plan.strategy if dist.world > 1 else None,
        precision=precision_name(device, plan.precision), attention=getattr(run.model.config, "_attn_implementation", None))
    if dist.is_main:
        run.artefacts.write_result(result)
    dist.close()
    return result
