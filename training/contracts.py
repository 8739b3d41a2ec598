"""Typed contracts passed between layers (and, later, between agents).

Every artefact the engine writes is one of these models serialised to JSON, so any later layer — the
memory index, the tools, the reports — can re-read it without guessing at keys.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

DataFormat = Literal["text", "pairs", "chat", "classification", "preference", "feedback"]
# preference: a prompt with a chosen and a rejected answer (DPO, ORPO); feedback: a prompt, one answer and whether
# it was good (KTO). Both keep the prompt as chat turns, so a multi-turn conversation's shared prefix fits too.
PREFERENCE_FORMATS = {"dpo": "preference", "orpo": "preference", "kto": "feedback"}
Objective = Literal["sft", "dpo", "orpo", "kto"]


class LengthStats(BaseModel):
    """Distribution of record lengths in one unit (characters or tokens)."""

    unit: str = Field(description="'chars', 'bytes' or the tokenizer's name")
    min: int
    mean: float
    p50: int
    p95: int
    max: int
    total: int


class CurationSettings(BaseModel):
    """The knobs a curation ran with; stored so a summary says how it was made."""

    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    max_chars: int = Field(20_000, description="records longer than this (in characters) are dropped")
    near_dup_threshold: float = Field(0.8, description="MinHash-LSH Jaccard threshold on 5-char shingles")
    chunk_chars: int = Field(2_000, description="chunk size for .txt/.md documents")
    scrub_pii: bool = True
    tokenizer: str = Field("bytes", description="tokenizer for token counts; 'bytes' counts UTF-8 bytes")


class DatasetSummary(BaseModel):
    """What the data curator knows about one curated dataset (`datasets/<fingerprint>/summary.json`)."""

    fingerprint: str = Field(description="order- and format-independent hash of the cleaned records")
    source: str = Field(description="the path or corpus name as given")
    format: DataFormat
    schema_: list[str] = Field(alias="schema", description="input schemas seen, e.g. ['question,answer']")
    records_in: int
    records_after: int
    removed: dict[str, int] = Field(description="dropped records by reason")
    pii: dict[str, int] = Field(description="PII replacements by type (the records are kept)")
    splits: dict[str, int] = Field(description="records in train / val / test")
    lengths_chars: LengthStats
    lengths_tokens: LengthStats
    labels: dict[str, int] | None = Field(None, description="label distribution when labelled")
    samples: list[dict] = Field(description="five cleaned records")
    description: str = Field(description="plain-English account of what the data is about")
    top_terms: list[str] = Field(description="the most frequent content words")
    settings: CurationSettings
    warnings: list[str] = Field(default_factory=list)
    created_at: str

    model_config = {"populate_by_name": True}


# ---- training -------------------------------------------------------------------------------------

TaskKind = Literal["pretrain", "finetune"]
Method = Literal["full", "lora", "qlora"]  # qlora: LoRA over a 4-bit NF4 base (CUDA + bitsandbytes)


class LoraSettings(BaseModel):
    """Low-rank adapters (peft) for fine-tuning a pretrained base."""

    model_config = {"extra": "forbid"}  # a misspelt key is an error, not a silent default

    rank: int = Field(8, ge=1, le=256, description="adapter rank r")
    alpha: int = Field(16, ge=1, le=1024, description="scaling numerator (scale = alpha / rank)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "dropout on the adapter input; 0 (peft then skips the mask) reached 0.05's validation loss on every seed of "
        "bench/bench_dropout.py, so a mask drawn over every adapter input each step buys nothing there"))
    target_modules: list[str] | None = Field(None, description="module names to adapt; default: per architecture")
    merge: bool = Field(True, description="export merged weights (True) or the base plus a separate adapter")


class ModelSize(BaseModel):
    """A from-scratch decoder-only transformer (a transformers LlamaConfig)."""

    model_config = {"extra": "forbid"}  # a misspelt key is an error, not a silent default

    n_layer: int = Field(ge=1, le=96)
    n_head: int = Field(ge=1, le=128)
    n_embd: int = Field(ge=8, le=8192)
    intermediate: int = Field(ge=8, le=32768, description="MLP hidden width")
    vocab_size: int = Field(ge=260, le=262144, description="BPE vocabulary trained on the corpus")


class Budget(BaseModel):
    """Whichever limit is reached first ends the run cleanly (a final checkpoint is written)."""

    model_config = {"extra": "forbid"}  # a misspelt key is an error, not a silent default

    steps: int | None = Field(None, gt=0, le=10_000_000, description="optimizer steps")
    tokens: int | None = Field(None, gt=0, description="training tokens seen (all processes)")
    minutes: float | None = Field(None, gt=0, le=7 * 24 * 60, description="wall-clock minutes")


class TrainPlan(BaseModel):
    """Everything a training run needs, validated before any compute is spent."""

    model_config = {"extra": "forbid"}  # a misspelt key is an error, not a silent default

    task: TaskKind
    dataset: str = Field(description="fingerprint of a curated dataset in the workspace")
    base_model: str | None = Field(None, description="finetune: embedded name, local HF directory or hub id")
    init_from: str | None = Field(None, description=(
        "finetune: start from the weights of this earlier model directory (a warm start, e.g. production's); "
        "the base model stays the reference the evaluation compares with"))
    size: str | ModelSize | None = Field(None, description="pretrain: tiny | small | 124m, or explicit fields")
    method: Method = "full"
    objective: Objective = Field("sft", description=(
        "sft: next-token loss on the answers; dpo and orpo: preference pairs (chosen over rejected); kto: single "
        "answers marked good or bad. With method full, lora or qlora alike"))
    beta: float = Field(0.1, gt=0, le=10, description=(
        "dpo / kto: how far the policy may move from the reference (the starting weights); orpo: the weight of the "
        "odds-ratio term beside the chosen answers' loss"))
    lora: LoraSettings = Field(default_factory=LoraSettings)
    lr: float = Field(3e-4, gt=0, le=1.0, description="peak learning rate (AdamW)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * this")
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0, le=1)
    batch_size: int = Field(8, ge=1, le=4096, description="sequences per optimizer step, all processes together")
    grad_accum: int = Field(1, ge=1, le=1024, description="micro-batches per optimizer step")
    seq_len: int = Field(256, ge=8, le=32768, description="tokens per sequence")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm (0: off)")
    budget: Budget = Field(default_factory=lambda: Budget(steps=100))
    eval_every: int = Field(20, ge=1, description="validate every N steps")
    eval_batches: int = Field(8, ge=1, description="validation batches per evaluation")
    patience: int | None = Field(None, ge=1, description="stop after this many evaluations without improvement")
    checkpoint_every: int = Field(20, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    dropout: float = Field(0.0, ge=0, lt=1, description="pretrain: attention/residual dropout")
    launcher: Literal["local", "torchrun"] = Field("local", description=(
        "local: this process; torchrun: one process per device, launched and followed by the trainer's tool"))
    nproc: int | None = Field(None, ge=1, le=64, description="torchrun: processes (default: every visible GPU, 2 on CPU)")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description=(
        "with several processes: ddp replicates the model, fsdp shards weights, gradients and optimizer state (FSDP2)"))
    activation_checkpointing: bool = Field(False, description=(
        "keep only each decoder layer's input for backward and recompute the rest there: less memory, more compute "
        "(bench/bench_checkpointing.py)"))
    precision: Literal["auto", "float32", "bfloat16"] = Field("auto", description=(
        "matmuls under autocast, in training and evaluation: auto is bfloat16 on CUDA and on CPUs that multiply bf16 "
        "natively (AMX, AVX512-BF16; bench/bench_precision.py), float32 on other CPUs; float32 weights stay the master "
        "copy either way"))

    @model_validator(mode="before")
    @classmethod
    def _objective_as_method(cls, data):
        """`method: dpo` (as a goal or a hand-written plan may say it) is the objective dpo over full weights."""
        if isinstance(data, dict) and data.get("method") in PREFERENCE_FORMATS and data.get("objective", "sft") == "sft":
            data = {**data, "objective": data["method"], "method": "full"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "TrainPlan":
        if self.objective != "sft" and self.task != "finetune":
            raise ValueError(f"objective: {self.objective} tunes a pretrained model's preferences; use task=finetune")
        if self.task == "pretrain":
            if self.base_model:
                raise ValueError("base_model: a pretraining run starts from scratch; use task=finetune to start from a base")
            if self.size is None:
                raise ValueError("size: pretraining needs a model size (tiny, small, 124m or explicit fields)")
            if self.method != "full":
                raise ValueError(f"method: {self.method} adapts a pretrained base; pretraining trains every weight (method=full)")
        else:
            if not self.base_model:
                raise ValueError("base_model: fine-tuning needs a base model (a name, a directory or a hub id)")
            if self.size is not None:
                raise ValueError("size: a fine-tuning run keeps its base model's size")
        if self.init_from and self.task != "finetune":
            raise ValueError("init_from: only a fine-tuning run starts from an earlier model's weights")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum: {self.grad_accum} must divide batch_size {self.batch_size}")
        if self.nproc is not None and self.launcher != "torchrun":
            raise ValueError("nproc: processes are launched by torchrun; set launcher=torchrun too")
        if not any((self.budget.steps, self.budget.tokens, self.budget.minutes)):
            raise ValueError("budget: give at least one of steps, tokens or minutes")
        return self

    def step_horizon(self) -> int | None:
        """Steps the run is planned for (the cosine schedule's length): from the step or token budget."""
        if self.budget.steps:
            return self.budget.steps
        return self.budget.tokens // (self.batch_size * self.seq_len) if self.budget.tokens else None


class RunResult(BaseModel):
    """What a training run did (`runs/<run_id>/result.json`)."""

    run_id: str
    status: Literal["completed", "early_stopped", "budget_tokens", "budget_minutes", "diverged"]
    message: str
    steps: int
    tokens: int
    best_step: int | None
    best_val_loss: float | None
    final_val_loss: float | None
    wall_seconds: float
    tokens_per_second: float
    peak_memory_mb: float
    device: str
    trainable_params: int
    total_params: int
    final_dir: str
    best_dir: str | None
    records: dict[str, dict[str, int]] = Field(default_factory=dict, description=(
        "per split (train, val): records, whole, cut (input shortened to fit seq_len), dropped, cut_tokens"))
    processes: int = Field(1, description="processes that trained it together (torchrun or accelerate launch)")
    strategy: str | None = Field(None, description="ddp or fsdp when several processes trained it")
    precision: str = Field("float32", description="what the matmuls ran in: float32, or bfloat16 under autocast")
    attention: str | None = Field(None, description=(
        "the attention kernel it trained with: transformers' name (sdpa, eager), or modelcrew_lean (training/attention.py, "
        "LoRA on the CPU)"))


class Interval(BaseModel):
    """A metric's two-sided bootstrap interval at the evaluation's confidence, over `n` records."""

    n: int
    low: float
    high: float


class Comparison(BaseModel):
    """Candidate vs a reference model on the same records (paired): a difference, or for perplexity a
    relative change (candidate / reference − 1), with its interval."""

    kind: Literal["difference", "ratio"]
    change: float
    low: float
    high: float
    n: int


class Evaluation(BaseModel):
    """How a trained model did, each number beside its baseline (`runs/<run_id>/evaluation.json`).

    `per_record` keeps every model's per-record scores (`[summed loss, tokens]` per record for
    perplexities), so intervals, comparisons and the gate's verdict can be recomputed from the file."""

    run_id: str
    dataset: str
    format: DataFormat
    base_model: str | None
    model_dir: str
    metrics: dict[str, float] = Field(description="val/test/general perplexity, task metrics; base_* for the base model")
    examples: dict[str, int] = Field(description="records scored per split")
    samples: list[dict] = Field(description="validation prompts: reference, base answer, candidate answer")
    general_corpus: str = Field(description="what the forgetting check (general_perplexity) was measured on")
    seconds: float
    created_at: str | None = None
    confidence: float = Field(0.9, gt=0, lt=1, description="level of every interval and of the gate's decisions")
    intervals: dict[str, Interval] = Field(default_factory=dict, description="per metrics key (base_*, production_* too)")
    comparisons: dict[str, dict[str, Comparison]] = Field(default_factory=dict, description="'base' / 'production' -> metric")
    per_record: dict[str, dict[str, list]] = Field(default_factory=dict, description="'candidate' / 'base' / 'production' -> metric -> values")
    records: dict[str, dict[str, int]] = Field(default_factory=dict, description="per split: how records fit seq_len (whole, cut, dropped)")
    scoring: dict[str, str] = Field(default_factory=dict, description="how each task metric was computed")
    base_source: str | None = Field(None, description="where the base's weights came from when that matters (dequantized GGUF)")
    precision: str = Field("float32", description="what the scoring matmuls ran in: float32, or bfloat16 under autocast (the plan's precision)")
    objective: str | None = Field(None, description="preference data: the objective the preference metrics follow (dpo, orpo, kto)")
    beta: float | None = Field(None, description="preference data: the plan's beta, which scales reward_margin")
    warnings: list[str] = Field(default_factory=list)


class GateVerdict(BaseModel):
    """Whether a candidate may be deployed, computed by code from an Evaluation and the goal's target."""

    passed: bool
    metric: str
    value: float | None = None
    threshold: float | None = None
    reasons: list[str] = Field(default_factory=list, description="one line per check, failing ones first")
    evidence: Literal["enough", "not enough"] | None = Field(None, description=(
        "whether the target's interval decided it; 'not enough': the estimate meets it but the interval straddles it"))
    records_needed: int | None = Field(None, description="test records that would settle an undecided target")


# ---- goals (what a user asked for, parsed) --------------------------------------------------------

Metric = Literal["perplexity", "accuracy", "exact_match", "f1", "rougeL", "preference_accuracy"]


class Target(BaseModel):
    """What counts as success: e.g. perplexity 20% below the base (relative), or accuracy >= 0.85 (absolute)."""

    model_config = {"extra": "forbid"}

    metric: Metric
    direction: Literal["lower", "higher"]
    kind: Literal["absolute", "relative"]
    value: float = Field(ge=0)
    baseline: Literal["none", "base", "production"] = "none"

    @model_validator(mode="after")
    def _consistent(self) -> "Target":
        if self.kind == "relative" and self.baseline == "none":
            raise ValueError("target: a relative target needs a baseline (base or production)")
        if self.kind == "absolute" and self.baseline != "none":
            raise ValueError("target: an absolute target has no baseline")
        if self.kind == "relative" and self.direction == "lower" and self.value >= 1:
            raise ValueError(f"target: {self.value:.0%} below the baseline is impossible (it would be zero or negative)")
        if self.kind == "absolute" and self.metric != "perplexity" and self.value > 1:
            raise ValueError(f"target: {self.metric} is a fraction between 0 and 1; {self.value:g} cannot be reached")
        return self


class GoalBudget(BaseModel):
    model_config = {"extra": "forbid"}

    minutes: float | None = Field(None, gt=0, le=7 * 24 * 60)
    steps: int | None = Field(None, gt=0, le=10_000_000)


class Goal(BaseModel):
    """A training goal in plain words, made exact. Filled by the offline parser or by an LLM (structured output)."""

    model_config = {"extra": "forbid"}

    task: Literal["pretrain", "finetune", "evaluate"]
    data: str = Field(min_length=1, description="a path, a directory, or a named corpus (bbc-news), as written")
    base_model: str = Field("", description="a name, a path or a hub id; empty for pretrain")
    method: Literal["full", "lora"]
    objective: Objective = Field("sft", description="sft, or a preference objective: dpo, orpo (pairs) or kto (rated answers)")
    format: DataFormat | None = Field(None, description="None: detected from the data")
    metric: Metric
    target: Target | None = None
    budget: GoalBudget = Field(default_factory=GoalBudget)
    deploy: Literal["never", "if_passed", "always"] = "never"
    approval: Literal["none", "required"] = Field("none", description="required: the deployer stops at staging for a person")
    model_name: str | None = None
    lora: LoraSettings | None = None
    size: str | None = Field(None, description="pretrain: tiny, small or 124m")
    attempts: int = Field(1, ge=1, le=5, description="training configurations the crew may try within the budget")
    processes: int | None = Field(None, ge=1, le=64, description="train as a torchrun job of this many processes (GPUs)")
    strategy: Literal["ddp", "fsdp"] | None = Field(None, description="several processes: replicate (ddp) or shard (fsdp)")
    notes: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> "Goal":
        if self.task == "pretrain" and self.base_model:
            raise ValueError("base_model: pretraining starts from scratch; fine-tune to start from a base model")
        if self.task != "pretrain" and not self.base_model:
            raise ValueError("base_model: name the model to fine-tune or evaluate (e.g. smollm2-135m-instruct)")
        if self.task == "pretrain" and self.method != "full":
            raise ValueError("method: pretraining trains every weight (full)")
        if self.objective != "sft" and self.task != "finetune":
            raise ValueError(f"objective: {self.objective} tunes a pretrained model's preferences; it needs task finetune")
        if self.target and self.target.metric != self.metric:
            raise ValueError(f"target: measures {self.target.metric} but the goal's metric is {self.metric}")
        if self.task == "evaluate" and (self.processes or self.strategy):
            raise ValueError("processes: an evaluate goal trains nothing; name GPUs or fsdp in a training goal")
        if self.deploy != "never" and not self.model_name:
            raise ValueError("model_name: deploying needs a name for the registry (e.g. 'deploy it as support-bot')")
        return self


class Deployment(BaseModel):
    """What the deployer did (`runs/<run_id>/deployment.json`)."""

    deployed: bool
    model_name: str | None = None
    version: str | None = None
    alias: str | None = None
    reason: str = ""
