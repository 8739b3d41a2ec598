"""A plan with `launcher: torchrun`: the run as a torchrun job of `nproc` processes, followed like a local one.

`training.loop.train` hands such a plan here when it is not already inside a launched job (the crew's trainer
tool, `modelcrew train`, the loop: all call `train`). The job is

    python -m torch.distributed.run --standalone --nproc_per_node N -m training train PLAN --workspace WS --run-id ID --quiet [--resume]

whose processes run the one loop (DDP or FSDP, as the plan's `strategy` says). This process shows the progress
from the run's metrics.jsonl and returns its result.json. A job that fails (a process killed, an error) raises
with the end of its log; `--resume` (or the tool called again) continues from the last complete checkpoint.

`accelerate launch --config_file CONFIG -m training train PLAN --run-id ID` runs the same command under a
user's own FSDP or DeepSpeed configuration (with the plan's launcher left `local`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from training.contracts import RunResult, TrainPlan
from training.errors import ModelcrewError
from training.progress import Bar
from training.runs import Run

ROOT = Path(__file__).resolve().parent.parent


def default_nproc() -> int:
    """Every visible GPU; on CPU, 2 processes (gloo)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def command(plan_file: Path, workspace: Path, run_id: str, nproc: int, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "training", "train", str(plan_file), "--workspace", str(workspace), "--run-id", run_id, "--quiet"]
    return cmd + (["--resume"] if resume else [])


def launch(plan: TrainPlan, workspace: Path, run_id: str, resume: bool = False, show_progress: bool = True,
           poll_s: float = 0.5) -> RunResult:
    nproc = plan.nproc or default_nproc()
    run = Run(workspace, run_id)
    scratch = Path(tempfile.mkdtemp(prefix=f"modelcrew-launch-{run_id}-"))
    plan_file, log = scratch / "job-plan.json", scratch / "torchrun.log"
    plan_file.write_text(plan.model_dump_json(), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # the processes share the cores
    done_before = len(run.metrics_rows()) if resume else 0
    bar = Bar(f"train ({nproc} processes, {plan.strategy})", plan.step_horizon(), done_before, enabled=show_progress,
              eta=True, fields="loss {task.fields[loss]}", loss="-")
    with log.open("wb") as out:
        # its own session: a Ctrl-C here stops the whole job, not half of it
        proc = subprocess.Popen(command(plan_file, workspace, run_id, nproc, resume), cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                time.sleep(poll_s)
                rows = run.metrics_rows() if run.metrics_path.exists() else []
                if rows:
                    bar.update(completed=rows[-1]["step"], loss=f"{rows[-1]['loss']:.4f}")
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
        finally:
            bar.close()
    if proc.returncode != 0:
        tail = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()][-12:]
        raise ModelcrewError(f"the torchrun job of run {run_id} ({nproc} processes, {plan.strategy}) failed with exit code "
                             f"{proc.returncode}; resume it with --resume. Its log is {log}; it ended:\n" + "\n".join(tail))
    result = run.result()
    shutil.rmtree(scratch, ignore_errors=True)
    if result is None:
        raise ModelcrewError(f"the torchrun job of run {run_id} exited without writing result.json")
    return result
