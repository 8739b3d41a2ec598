"""Plain-language goals -> a typed `Goal`, offline and deterministic.

A small grammar of the phrasings people use ("fine-tune smollm2 on faq.jsonl with LoRA rank 8 so that
perplexity ends at least a quarter below the base model, within ten minutes, and deploy it as
support-bot"): numbers written as words, fractions ("a quarter"), percentages, "no more than",
"ship it whatever the score", "don't deploy". What is missing or impossible is refused in one line
naming what to add — never guessed: no data, a zero budget, accuracy on unlabelled data, an unknown
model, a target that cannot be reached.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pydantic import BaseModel, ValidationError

from training.contracts import Goal, GoalBudget, LoraSettings, Target
from training.errors import InputError
from training.gate import lower_is_better
from training.models import EMBEDDED, EMBEDDED_PARAMS

EMBEDDED_ALIASES = {  # how people write the embedded bases -> their names
    r"smol\s*lm\s*2?(?:[-\s]*135\s*m)?(?:[-\s]*instruct)?": "smollm2-135m-instruct",
    r"gemma\s*-?\s*3?(?:[-\s]*270\s*m)?": "gemma3-270m",
}
CORPORA = {r"bbc[\s-]*news": "bbc-news"}
DATA_EXT = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".md")
SIZES = {"tiny": "tiny", "small": "small", "124m": "124m", "gpt-2 small": "124m", "gpt2-small": "124m"}

UNITS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
         "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
         "seventeen": 17, "eighteen": 18, "nineteen": 19}
TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
FRACTIONS = [(r"three[\s-]quarters(?: of)?", "75%"), (r"two[\s-]thirds(?: of)?", "66.67%"), (r"an? quarter(?: of)?", "25%"),
             (r"an? third(?: of)?", "33.33%"), (r"an? fifth(?: of)?", "20%"), (r"an? tenth(?: of)?", "10%"),
             (r"(?<!\w)half(?: of)?(?! an hour)(?! hour)", "50%")]

METRICS = [(r"perplexit(?:y|ies)|\bppl\b", "perplexity"), (r"\baccura(?:cy|te)\b", "accuracy"),
           (r"exact[\s-]*match(?:es)?|\bem\b", "exact_match"), (r"\b(?:token[\s-]*)?f1(?:[\s-]*score)?\b", "f1"),
           (r"\brouge[\s-]*l?\b", "rougeL")]
BASELINES = [(r"(?:the )?base(?:[\s-]*model)?|(?:the )?(?:original|starting|untrained) model|where it starts", "base"),
             (r"(?:the )?(?:current )?production(?: model| version)?|what(?:'s| is) (?:in production|deployed)|"
              r"the (?:current|deployed|live) model", "production")]
LOWER_WORDS = r"below|lower than|under|less than|smaller than|down from|better than|improvement over|beat(?:ing|s)?"
HIGHER_WORDS = r"above|higher than|over|more than|better than|improvement over|beat(?:ing|s)?"


def words_to_numbers(text: str) -> str:
    """'twenty five minutes' -> '25 minutes', 'two hundred steps' -> '200 steps', 'a quarter' -> '25%'."""
    for pattern, repl in FRACTIONS:
        text = re.sub(pattern, repl, text)
    text = re.sub(r"\bhalf an hour\b", "30 minutes", text)
    text = re.sub(r"\ban hour\b", "60 minutes", text)
    text = re.sub(r"\ba (?:couple|pair) of\b", "2", text)
    text = re.sub(r"\ba (hundred|thousand)\b", r"one \1", text)
    number_word = "|".join(list(UNITS) + list(TENS) + ["hundred", "thousand"])
    pattern = re.compile(rf"\b(?:{number_word})(?:(?:[\s-]+and)?[\s-]+(?:{number_word}))*\b")  # "two hundred and five"

    def convert(m: re.Match) -> str:
        words = [w for w in re.split(r"[\s-]+", m.group(0)) if w and w != "and"]
        total, current = 0, 0
        for w in words:
            if w in UNITS:
                current += UNITS[w]
            elif w in TENS:
                current += TENS[w]
            elif w == "hundred":
                current = max(current, 1) * 100
            elif w == "thousand":
                total += max(current, 1) * 1000
                current = 0
        return str(total + current)

    return pattern.sub(convert, text)


def _number(token: str) -> float:
    return float(token.replace(",", ""))


def parse_goal(text: str, workspace: Path | None = None) -> Goal:
    """The `Goal` a sentence states, or an InputError saying in one line what is missing or impossible."""
    original = " ".join(str(text or "").split())
    if not original:
        raise InputError("goal: empty; say what to train, on which data, and what counts as success")
    low = words_to_numbers(original.lower())

    data = _find_data(original, low)
    base, unknown = _find_base(original, low)
    task = _find_task(low, base)
    if unknown and task != "pretrain":
        raise InputError(f"base_model: unknown model {unknown!r}; use {', '.join(EMBEDDED)}, a local "
                         "model directory or a hub id like org/name")
    if data is None:
        raise InputError("data: the goal names no data; say what to train on (a .jsonl/.csv/.txt file, a directory, or bbc-news)")
    if task == "pretrain" and base:
        raise InputError(f"base_model: pretraining starts from scratch, but the goal names {base}; "
                         "say 'fine-tune' to start from it, or drop the model")
    if task != "pretrain" and not base:
        raise InputError(f"base_model: the goal names no model to fine-tune; add one ({', '.join(EMBEDDED)}, "
                         "a directory or a hub id), or say 'from scratch' to pretrain")

    fmt = _find_format(low)
    try:
        metric, target = _find_target(low)
    except ValidationError as err:
        raise InputError(err.errors()[0]["msg"].removeprefix("Value error, ")) from None
    budget = _find_budget(low)
    deploy, name = _find_deploy(original, low, data)
    approval = "required" if re.search(r"\b(?:human|manual|my|a person'?s?|someone'?s?)\s+approv|\bafter (?:i|we) approve|"
                                       r"\b(?:needs?|requires?|wait for|with|after|pending) approval\b", low) else "none"
    lora = _find_lora(low)
    method = "full" if task == "pretrain" else _find_method(low, base, lora)
    if method == "full" and lora is not None and task != "pretrain":
        raise InputError("method: the goal asks for a full fine-tune and gives LoRA settings; choose one")
    size = next((v for k, v in SIZES.items() if re.search(rf"\b{re.escape(k)}\b", low)), None) if task == "pretrain" else None
    if metric == "accuracy":
        _check_labelled(data, fmt, workspace)
    try:
        return Goal(task=task, data=data, base_model=base or "", method=method, format=fmt, metric=metric, target=target,
                    budget=budget, deploy=deploy, approval=approval, model_name=name, lora=lora,
                    size=size or ("tiny" if task == "pretrain" else None), notes=_notes(original))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "goal"
        raise InputError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None


def _find_data(original: str, low: str) -> str | None:
    for pattern, name in CORPORA.items():
        if re.search(rf"\b{pattern}\b", low):
            return name
    tokens = [t.rstrip(".,;:") for t in re.findall(r"[\w./~:-]+", original)]
    for clean in tokens:  # a data file first ...
        if clean.lower().endswith(DATA_EXT):
            return clean
    for clean in tokens:  # ... else a directory of data (a model directory is not data)
        path = Path(clean).expanduser()
        if ("/" in clean or clean.startswith(("~", "."))) and path.is_dir() and not (path / "config.json").exists():
            return clean
    return None


def _find_base(original: str, low: str) -> tuple[str | None, str | None]:
    """(base model, unknown name the goal tried to use)."""
    for token in re.findall(r"[\w./~-]+", original):  # a local model directory
        clean = token.rstrip(".,;:")
        if ("/" in clean or clean.startswith(("~", "."))) and (Path(clean).expanduser() / "config.json").is_file():
            return clean, None
    for token in re.findall(r"(?<![\w./-])[A-Za-z0-9][\w.-]*/[\w.-]+", original):  # org/name: a hub id, unless a path
        clean = token.rstrip(".,;:")
        if not clean.lower().endswith(DATA_EXT) and not Path(clean).exists() and not clean.startswith((".", "~")):
            return clean, None
    for pattern, name in EMBEDDED_ALIASES.items():
        if re.search(rf"\b{pattern}\b", low):
            return name, None
    verb = r"(?:fine[\s-]*tun(?:e|ing)|finetun(?:e|ing)|adapt|evaluate|score|start(?:ing)? from|on top of|base(?: model)?(?: is)?|model)"
    m = re.search(rf"\b{verb}\s+(?:the\s+|a\s+|an\s+)?(?:model\s+)?([A-Za-z0-9][\w.-]*(?:/[\w.-]+)?(?:@[\w-]+)?)", original, re.I)
    if m:
        cand = m.group(1).rstrip(".,;:")
        if cand.lower().endswith(DATA_EXT) or cand.lower() in {"it", "on", "with", "using", "a", "the", "my", "our", "this", "lora", "full"}:
            return None, None
        if Path(cand).expanduser().is_dir() and (Path(cand).expanduser() / "config.json").exists():
            return cand, None
        if re.fullmatch(r"[\w.-]+/[\w.-]+", cand) and not Path(cand).exists():
            return cand, None  # a hub id
        if re.fullmatch(r"[a-z0-9-]+@(?:production|staging|previous|v\d+)", cand):
            return cand, None  # a registered model, for evaluation
        return None, cand
    return None, None


def _find_task(low: str, base: str | None) -> str:
    if re.search(r"pre[\s-]*train|from scratch|train (?:a|an) (?:new |fresh )?(?:tiny |small |124m )?(?:language )?model on", low):
        return "pretrain"
    if re.search(r"\b(?:fine[\s-]*tun|finetun|adapt|train)", low):
        return "finetune"
    if re.search(r"\b(?:evaluate|score|measure|benchmark)\b", low):
        return "evaluate"
    return "finetune" if base else "pretrain"


def _find_format(low: str) -> str | None:
    if re.search(r"\bclassif(?:y|ication|ier)\b|\bas labels?\b|\blabelled\b|\blabeled\b", low):
        return "classification"
    if re.search(r"\b(?:as |in )?chat(?: format| turns| messages)?\b(?! bot)|\bconversations?\b", low) and not re.search(r"chatbot", low):
        return "chat"
    if re.search(r"\bpairs?\b|\bquestion[\s/-]*answer\b|\bq&a\b|\bprompt[\s/-]*response\b", low):
        return "pairs"
    if re.search(r"\bplain text\b|\bas text\b|\braw text\b", low):
        return "text"
    return None


def _find_target(low: str) -> tuple[str, Target | None]:
    """The goal metric and target; perplexity without a target when none is stated."""
    metric = next((name for pattern, name in METRICS if re.search(pattern, low)), None)
    num = r"(\d+(?:\.\d+)?)\s*(%|percent|per cent|points?)?"
    baseline_re = "|".join(f"(?:{p})" for p, _ in BASELINES)
    # relative: "at least 20% below the base model", "10% better than production"
    m = re.search(rf"(?:at least|by at least|no less than|>=)?\s*{num}\s*(?:{LOWER_WORDS}|{HIGHER_WORDS})\s+({baseline_re})", low)
    if m:
        metric = metric or "perplexity"
        value = _number(m.group(1)) / (100 if m.group(2) else 1)
        if not m.group(2) and value > 1:
            value /= 100  # "20 below the base" with no unit: read as percent
        baseline = next(name for pattern, name in BASELINES if re.fullmatch(pattern, m.group(3)))
        direction = "lower" if metric == "perplexity" else "higher"
        return metric, Target(metric=metric, direction=direction, kind="relative", value=value, baseline=baseline)
    m = re.search(rf"(?:beat|better than|improve(?: on| over)?|outperform)\s+({baseline_re})", low)
    if m:
        metric = metric or "perplexity"
        baseline = next(name for pattern, name in BASELINES if re.fullmatch(pattern, m.group(1)))
        return metric, Target(metric=metric, direction="lower" if metric == "perplexity" else "higher", kind="relative",
                              value=0.0, baseline=baseline)
    # absolute: "accuracy of at least 85%", "perplexity under 20", "f1 >= 0.6"
    if metric:
        metric_re = next(p for p, n in METRICS if n == metric)
        not_time = r"(?!\s*(?:minutes?|mins?|hours?|hrs?|h\b|steps?))"
        m = re.search(rf"\b(at least|no less than|above|over|at most|no more than|below|under|less than)\s*{num}\s*(?:{metric_re})", low) or \
            re.search(rf"(?:{metric_re})[^.;]{{0,40}}?\b(at least|no less than|>=|above|over|more than|at most|no more than|<=|below|under|less than)\s*"
                      rf"(?:of |to |=\s*)?{num}{not_time}", low) or \
            re.search(rf"(?:{metric_re})\s*(?:of|to|=)\s*{num}{not_time}", low) or \
            re.search(rf"\b(?:reach|hit|get to|achieve|to|with)\s+{num}\s*(?:{metric_re})", low)
        if m:
            groups = m.groups()
            if len(groups) == 2:  # "perplexity of 20": as good as that
                word, value_s, unit = ("at most" if metric == "perplexity" else "at least"), groups[0], groups[1]
            else:
                word, value_s, unit = groups
            value = _number(value_s)
            if unit or (metric != "perplexity" and value > 1):
                value /= 100
            direction = "higher" if word in ("at least", "no less than", ">=", "above", "over", "more than") else "lower"
            return metric, Target(metric=metric, direction=direction, kind="absolute", value=value)
    return metric or "perplexity", None


def _find_budget(low: str) -> GoalBudget:
    minutes = steps = None
    m = re.search(r"(\d+(?:\.\d+)?)\s*(minutes?|mins?|hours?|hrs?|h)\b", low)
    if m:
        minutes = _number(m.group(1)) * (60 if m.group(2).startswith("h") else 1)
    m = re.search(r"(\d[\d,]*)\s*(?:training\s+|optimi[sz]er\s+)?steps?\b", low)
    if m:
        steps = int(_number(m.group(1)))
    if minutes == 0 or steps == 0:
        raise InputError("budget: a zero budget leaves no time to train; give minutes or steps above zero")
    return GoalBudget(minutes=minutes, steps=steps)


def _find_deploy(original: str, low: str, data: str) -> tuple[str, str | None]:
    m = re.search(r"\b(?:deploy|ship|publish|serve|release|register)\b[^.;]{0,40}?\s(?:as|under(?: the name)?|named|called)\s+"
                  r"[\"'`]?([^\s\"'`,;]+)", original, re.I) or \
        re.search(r"\b(?:call|name)\s+it\s+[\"'`]?([^\s\"'`,;]+)", original, re.I)
    name = m.group(1).rstrip(".") if m else None
    if name is not None and not re.fullmatch(r"[a-z0-9][a-z0-9-]{1,62}", name):
        raise InputError(f"model_name: {name!r} is not a registry name; use lowercase letters, digits and dashes (e.g. support-bot)")
    if re.search(r"\b(?:don'?t|do not|never|no need to|without)\s+(?:deploy|ship|publish|serve|releas)|\bno deploy|\bjust train\b|"
                 r"\bnot be deployed\b", low):
        return "never", name
    if re.search(r"whatever the score|regardless|no matter what|either way|always deploy|deploy (?:it )?anyway|"
                 r"(?:ship|deploy) it (?:unconditionally|in any case)", low):
        return "always", name or default_name(data)
    if name or re.search(r"\b(?:deploy|ship|publish|serve|release)\b", low):
        return "if_passed", name or default_name(data)
    return "never", None


def default_name(data: str) -> str:
    """A registry name from the data when the goal gives none: 'data/support_faq.jsonl' -> 'support-faq'."""
    stem = re.sub(r"[^a-z0-9]+", "-", Path(data).stem.lower()).strip("-")
    return (stem or "model")[:63] if len(stem) >= 2 else f"model-{stem}"


def _find_lora(low: str) -> LoraSettings | None:
    rank = re.search(r"\b(?:rank|r)\s*(?:=|of|:)?\s*(\d+)\b", low)
    alpha = re.search(r"\balpha\s*(?:=|of|:)?\s*(\d+)\b", low)
    if not rank and not alpha:
        return None
    values = {"rank": int(rank.group(1))} if rank else {}
    if alpha:
        values["alpha"] = int(alpha.group(1))
    try:
        return LoraSettings(**values)
    except ValidationError as err:
        first = err.errors()[0]
        raise InputError(f"lora.{first['loc'][0]}: {first['msg']}") from None


def _find_method(low: str, base: str | None, lora: LoraSettings | None) -> str:
    if re.search(r"\bfull[\s-]*(?:fine[\s-]*tun\w*|finetun\w*|parameters?|weights?|training)\b|\ball (?:the )?weights\b", low):
        return "full"
    if re.search(r"\bq?lora\b|low[\s-]*rank|adapters?\b", low) or lora is not None:
        return "lora"
    return "lora" if base_parameters(base) >= 100_000_000 else "full"


def base_parameters(base: str | None) -> int:
    """Parameters of a base model, known without loading it: embedded sizes, or a local config.json.

    A hub id cannot be looked up offline: it is taken to be large (LoRA), as most hub models are.
    """
    if not base:
        return 0
    if base in EMBEDDED_PARAMS:
        return EMBEDDED_PARAMS[base]
    config = Path(base).expanduser() / "config.json"
    if config.exists():
        c = json.loads(config.read_text(encoding="utf-8"))
        h, layers, vocab = c.get("hidden_size", 0), c.get("num_hidden_layers", 0), c.get("vocab_size", 0)
        inter = c.get("intermediate_size", 4 * h)
        return layers * (4 * h * h + 3 * h * inter) + vocab * h
    return 10**9


def _check_labelled(data: str, fmt: str | None, workspace: Path | None) -> None:
    if fmt not in (None, "classification"):
        raise InputError(f"metric: accuracy needs labelled data, but the goal says the data is {fmt}; "
                         "ask for perplexity, f1 or rougeL instead")
    if data == "bbc-news" or fmt == "classification":
        return
    path = Path(data).expanduser()
    if path.is_file() and path.suffix in (".jsonl", ".json", ".csv", ".tsv"):
        head = path.read_text(encoding="utf-8", errors="replace")[:20_000]
        if path.suffix == ".jsonl":
            first = next((line for line in head.splitlines() if line.strip()), "")
            try:
                keys = set(json.loads(first)) if first else set()
            except ValueError:
                return  # curation will report the broken line
        else:
            keys = set(re.split(r"[,\t]", head.splitlines()[0].lower())) if head else set()
        if "label" not in keys:
            raise InputError(f"metric: accuracy needs labelled data, but {data} has no label field "
                             f"(it has {', '.join(sorted(keys)) or 'nothing'}); ask for perplexity, f1 or rougeL instead")
    elif path.is_file():
        raise InputError(f"metric: accuracy needs labelled data, but {data} is plain text; ask for perplexity instead")


def _notes(original: str) -> str:
    m = re.search(r"\b(?:note|notes|nb)\s*[:-]\s*(.+)$", original, re.I)
    return m.group(1).strip() if m else ""


GOAL_PROMPT = """[parse goal] Turn the user's training goal into JSON matching this schema exactly. Use only what the
user said: leave a field at its default when they did not say it; never invent data paths or model names.
Embedded base models: EMBEDDED. Percentages are fractions (20% -> 0.2).
"at least 20% below the base model" -> target {metric, direction: lower, kind: relative, value: 0.2, baseline: base}.
Schema: """


def check_goal(goal: Goal, workspace: Path | None = None) -> Goal:
    """The refusals that apply to a Goal however it was parsed (an LLM's structured output too). Which way a
    metric improves is code's to say, not the parser's: perplexity lower, every other metric higher."""
    if goal.target is not None:
        direction = "lower" if lower_is_better(goal.target.metric) else "higher"
        if goal.target.direction != direction:
            goal = goal.model_copy(update={"target": Target.model_validate({**goal.target.model_dump(), "direction": direction})})
    if goal.task != "pretrain":
        base = goal.base_model
        known = (base in EMBEDDED_PARAMS or (Path(base).expanduser() / "config.json").is_file()
                 or re.fullmatch(r"[\w.-]+/[\w.-]+", base) or re.fullmatch(r"[a-z0-9-]+@(?:production|staging|previous|v\d+)", base))
        if not known:
            raise InputError(f"base_model: unknown model {base!r}; use {', '.join(EMBEDDED)}, a local "
                             "model directory or a hub id like org/name")
    if goal.data != "bbc-news" and not Path(goal.data).expanduser().exists():
        raise InputError(f"data: {goal.data} does not exist")
    if goal.metric == "accuracy":
        _check_labelled(goal.data, goal.format, workspace)
    return goal


def parse_goal_with_llm(text: str, llm, workspace: Path | None = None) -> Goal:
    """The same `Goal`, filled by the agents' LLM with structured output, then held to the same refusals."""
    original = " ".join(str(text or "").split())
    if not original:
        raise InputError("goal: empty; say what to train, on which data, and what counts as success")
    messages = [{"role": "system", "content": GOAL_PROMPT.replace("EMBEDDED", ", ".join(EMBEDDED)) + json.dumps(Goal.model_json_schema())},
                {"role": "user", "content": original}]
    try:
        raw = llm.call(messages, response_model=Goal)
    except Exception as err:  # the model's answer did not fit the schema, or the call failed
        raise InputError(f"goal: the LLM could not turn it into a Goal ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    try:
        if isinstance(raw, Goal):
            goal = raw
        elif isinstance(raw, BaseModel):
            goal = Goal.model_validate(raw.model_dump())
        else:
            start, end = str(raw).find("{"), str(raw).rfind("}")
            goal = Goal.model_validate_json(str(raw)[start:end + 1])
    except ValidationError as err:
        first = err.errors()[0]
        raise InputError(f"{'.'.join(str(x) for x in first['loc']) or 'goal'}: {first['msg'].removeprefix('Value error, ')}") from None
    return check_goal(goal, workspace)
