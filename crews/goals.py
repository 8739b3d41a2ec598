"""Plain-language goals -> a typed `Goal`, offline and deterministic.

A small grammar of the phrasings people use ("fine-tune smollm2 on faq.jsonl with LoRA rank 8 so that
perplexity ends at least a quarter below the base model, within ten minutes, and deploy it as
support-bot"): numbers written as words, fractions ("a quarter"), percentages, signs ("ppl <= 25"),
"halve the perplexity", "no more than", "ship it whatever the score", "don't deploy".

The parser never guesses silently: a misread goal is worse than a refused one. Each part of a goal
(data, base model, task, target, budget, deploy, LoRA ...) is read by its own helper, which marks the
words it accounted for. What is missing, impossible or contradictory is refused in one line naming the
field; and what is left over that still sounds like a success criterion ("beat last week's model"), a
setting the goal cannot carry ("learning rate 1e-4") or a stray number is named back ("I did not
understand: ...") rather than dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ValidationError

from training.contracts import Goal, GoalBudget, LoraSettings, Target
from training.errors import InputError
from training.gate import lower_is_better
from training.models import EMBEDDED, EMBEDDED_PARAMS

# ---- vocabulary ------------------------------------------------------------------------------------

EMBEDDED_ALIASES = {  # how people write the embedded bases -> their names; never followed by another size
    r"smol\s*lm\s*2?(?:[-\s]*135\s*m)?(?:[-\s]*instruct)?(?![\s-]*\d)": "smollm2-135m-instruct",
    r"gemma\s*-?\s*3?(?:[\s-]*270\s*m)?(?![\s-]*\d)": "gemma3-270m",
}
CORPORA = {r"bbc[\s-]*news": "bbc-news"}
DATA_EXT = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".md")
SIZES = {"tiny": "tiny", "small": "small", "124m": "124m", "gpt-2 small": "124m", "gpt2-small": "124m"}
NOT_HUB_IDS = {"question/answer", "prompt/response", "input/output", "and/or", "q/a", "document/summary",
               "instruction/output", "text/label"}  # written with a slash, but formats, not org/name

UNITS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
         "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
         "seventeen": 17, "eighteen": 18, "nineteen": 19}
TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
FRACTIONS = [(r"three[\s-]quarters(?: of)?", "75%"), (r"two[\s-]thirds(?: of)?", "66.67%"), (r"an? quarter(?: of)?", "25%"),
             (r"an? third(?: of)?", "33.33%"), (r"an? fifth(?: of)?", "20%"), (r"an? tenth(?: of)?", "10%"),
             (r"(?<!\w)half(?: of)?(?! an hour)(?! hour)", "50%")]

METRICS = [(r"perplexit(?:y|ies)|\bppl\b", "perplexity"), (r"\bpreference[\s-]*accuracy\b", "preference_accuracy"),
           (r"\baccura(?:cy|te)\b", "accuracy"),
           (r"exact[\s-]*match(?:es)?|\bem\b", "exact_match"), (r"\b(?:token[\s-]*)?f1(?:[\s-]*score)?\b", "f1"),
           (r"\brouge[\s-]*l?\b", "rougeL")]
METRIC = "|".join(f"(?:{p})" for p, _ in METRICS)
METRIC_WORDS = {"perplexity": "perplexity", "accuracy": "accuracy", "exact_match": "exact match", "f1": "F1",
                "rougeL": "ROUGE-L", "preference_accuracy": "preference accuracy"}
BASELINES = [(r"(?:the |its )?(?:base(?:line)?|original|starting|untrained|initial)(?:[\s-]*model)?(?:'s)?|"
              r"where it start(?:s|ed)|what it start(?:s|ed) from", "base"),
             (r"(?:the )?(?:current |existing |deployed |live )?production(?: model| version)?(?:'s)?|"
              r"what(?:'s| is) (?:in production|deployed|live)|(?:the )?(?:current|deployed|live|existing) (?:model|version)(?:'s)?",
              "production")]
BASELINE_WORDS = {"base": "the base model", "production": "the production model"}
BASELINE = "(?P<bl>" + "|".join(f"(?:{p})" for p, _ in BASELINES) + r")\b"

# which way the words of a target say the metric should move: down, up, or just "better" (either)
DOWN_WORDS = (r"below|under|lower(?: than)?|less(?: than)?|smaller(?: than)?|fewer(?: than)?|down from|down to|at most|"
              r"no more than|not more than|no higher than|not above|drop(?:s|ped|ping)?|fall(?:s|ing)?|fell|"
              r"decrease[sd]?|decreasing|reduce[sd]?|reducing|lower(?:s|ed|ing)|cut(?:s|ting)?|go(?:es)? down|down|reduction|halve[sd]?")
UP_WORDS = (r"above|over|higher(?: than)?|more(?: than)?|greater(?: than)?|up from|at least|no less than|not less than|"
            r"no lower than|not below|increase[sd]?|increasing|rise[sn]?|rose|raise[sd]?|grow(?:s|n)?|go(?:es)? up|"
            r"boost(?:s|ed)?|up|gain|double[sd]?")
WORSE_WORDS = r"worse(?: than)?"
NEUTRAL_WORDS = (r"better(?: than)?|beat(?:s|ing)?|improve[sd]?|improving|improvement(?: over| on)?|improve[sd]? (?:on|over|upon)|"
                 r"outperform(?:s|ing)?|surpass(?:es|ing)?|(?:at least )?as good as|no worse than|not worse than|on par with|"
                 r"match(?:es|ing)?")
AT_LEAST = r"at least|no less than|not less than|no lower than|not below|above|over|more than|higher than|greater than"
AT_MOST = r"at most|no more than|not more than|no higher than|not above|below|under|less than|lower than|smaller than|down to"
CHANGE = (r"drop(?:s|ped|ping)?|fall(?:s|ing)?|fell|decrease[sd]?|reduce[sd]?|reducing|lower(?:s|ed|ing)?|cut(?:s|ting)?|"
          r"go(?:es)? down|increase[sd]?|rise[sn]?|rose|raise[sd]?|grow(?:s|n)?|go(?:es)? up|boost(?:s|ed)?|"
          r"improve[sd]?|improving|down|up")
NUM = r"(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>%|points?\b|pts\b)?"
NOT_TIME = r"(?!\s*(?:seconds?|secs?|minutes?|mins?|hours?|hrs?|h\b|days?|steps?|epochs?|tokens?|k\b))"
VERSUS = r"(?:than|vs\.?|versus|compared (?:to|with)|relative to|against|from|over|on|below|under|above)"

# forms of a target, most specific first: a later form never reads words an earlier one took
RELATIVE_FORMS = [
    # "at least 20% below the base model", "drops by at least 30% below the base", "10% better than production"
    rf"(?:(?P<verb>{CHANGE}|(?:an? )?improvement of|is|are|be|ends?|ends up)\s+(?:(?:the|its)\s+)?(?:(?P<m>{METRIC})\s+)?)?(?:by\s+)?"
    rf"(?:at least\s+|no less than\s+)?{NUM}\s*"
    rf"(?P<cmp>{DOWN_WORDS}|{UP_WORDS}|{WORSE_WORDS}|{NEUTRAL_WORDS})\s+{BASELINE}",
    # "below the base by 20%"
    rf"(?P<cmp>{DOWN_WORDS}|{UP_WORDS}|{NEUTRAL_WORDS})\s+{BASELINE}\s+by\s+(?:at least\s+)?{NUM}",
    # "20% lower perplexity than the base", "a fifth lower perplexity than production"
    rf"(?:by\s+)?(?:at least\s+)?{NUM}\s*(?P<cmp>lower|higher|better|worse|less|more|smaller|greater)\s+"
    rf"(?:(?P<m>{METRIC})\s+)?(?:than|vs\.?|versus|compared (?:to|with)|relative to)\s+{BASELINE}",
    # "reduce perplexity by 20% vs the base model", "perplexity drops 10%", "cut perplexity in half"
    rf"\b(?P<cmp>{CHANGE})\s+(?:(?:the|its)\s+)?(?:(?P<m>{METRIC})\s+)?(?:(?:by|in)\s+)?(?:at least\s+)?{NUM}{NOT_TIME}"
    rf"(?:\s+{VERSUS}\s+{BASELINE})?",
    # "a 10% drop in perplexity versus production", "a 20% reduction in perplexity"
    rf"{NUM}\s*(?P<cmp>drop|fall|decrease|reduction|cut|increase|rise|gain|improvement)\b"
    rf"(?:\s+in\s+(?:(?:the|its)\s+)?(?P<m>{METRIC}))?(?:\s+{VERSUS}\s+{BASELINE})?",
    # "halve the perplexity", "double the accuracy"
    rf"\b(?P<cmp>halve[sd]?|double[sd]?)\s+(?:(?:the|its)\s+)?(?P<m>{METRIC})(?:\s+(?:of|{VERSUS})\s+{BASELINE})?",
    # no number: "beat the base model", "lower perplexity than production", "as good as the base"
    rf"(?P<cmp>{NEUTRAL_WORDS}|(?:lower|higher|less|more|smaller|greater)(?:\s+(?P<m>{METRIC}))?\s+than|below|under|above)"
    rf"\s+{BASELINE}",
]
ABSOLUTE_FORMS = [
    # "at least 85% accuracy", "under 20 perplexity"
    rf"\b(?P<cmp>{AT_LEAST}|{AT_MOST})\s*{NUM}\s*(?P<m>{METRIC})",
    # "to reach 70% exact match", "to 90% accuracy"
    rf"\b(?:reach(?:es|ing)?|hit(?:s|ting)?|get(?:s|ting)? to|achieve[sd]?|achieving|attain(?:s|ing)?|to|with|of)\s+"
    rf"(?:an?\s+)?{NUM}\s*(?P<m>{METRIC})",
    # "perplexity 20 or lower", "accuracy of 80% or better"
    rf"(?P<m>{METRIC})\s*(?:(?:of|is|at|=|:|to|should be|must be)\s*)?{NUM}\s+or\s+"
    rf"(?P<cmp>lower|less|below|under|fewer|better|higher|more|above|greater|over)\b",
    # "perplexity under 20", "f1 of at least 0.6", "ppl <= 25" (signs were read as words)
    rf"(?P<m>{METRIC})[^.;]{{0,40}}?\b(?P<cmp>{AT_LEAST}|{AT_MOST})\s*(?:of\s+|to\s+)?{NUM}{NOT_TIME}",
    # "perplexity of 20", "rouge-l: 0.35": as good as that
    rf"(?P<m>{METRIC})\s*(?:(?:score|target)\s+)?(?:(?:of|to|=|:|is|at|should be|must be|needs to be)\s*)?{NUM}{NOT_TIME}",
]

# words that state a success criterion; left unread by every target form, they are refused, not dropped
CRITERIA = (r"\b(?:beat(?:s|ing)?|better|best(?! checkpoint)|improve[sd]?|improving|improvement|outperform\w*|surpass\w*|"
            r"exceed\w*|as good as|great|good|excellent|amazing|perfect|worse|lower|higher|reduce[sd]?|reducing|"
            r"increase[sd]?|increasing|decrease[sd]?|drop(?:s|ped)?|halve[sd]?|double[sd]?|maximi[sz]e\w*|minimi[sz]e\w*|"
            r"more accurate|smarter)\b")
# settings a Goal cannot carry (the planner chooses them); a number given for one is refused, not dropped
SETTINGS = {r"learning[\s-]*rate|\blr\b": "learning rate", r"batch[\s-]*size": "batch size",
            r"seq(?:uence)?[\s_-]*len(?:gth)?|context[\s-]*length": "sequence length", r"warm[\s-]*up": "warmup",
            r"weight[\s-]*decay": "weight decay", r"\bseed\b": "seed"}

DEPLOY_WORD = (r"deploy\w*|ship(?:s|ped|ping)?\b|publish\w*|releas\w*|serve\b|serving|go(?:es)? live|"
               r"push(?: it)? (?:to|into) production|put(?: it)? (?:in|into) production|promote\w*")
NEGATION = (r"don't|dont|do not|does not|doesn't|never|no need to|without|not|shouldn't|should not|must not|mustn't|"
            r"won't|will not|cannot|can't|no|skip(?:ping)?|avoid|hold off on|nothing (?:gets|is|should be|will be)")
NOT_NAMES = {"a", "an", "the", "it", "is", "soon", "well", "usual", "long", "before", "planned", "needed", "possible",
             "plain", "pairs", "chat", "text", "question-answer", "classification", "labels", "production", "staging"}


# ---- numbers in words --------------------------------------------------------------------------------

def words_to_numbers(text: str) -> str:
    """'twenty five minutes' -> '25 minutes', 'two hundred steps' -> '200 steps', 'a quarter' -> '25%'."""
    text = re.sub(r"\ban hour and a half\b", "90 minutes", text)  # before "half" becomes 50%
    text = re.sub(r"\ba quarter of an hour\b", "15 minutes", text)  # before "a quarter" does
    for pattern, repl in FRACTIONS:
        text = re.sub(pattern, repl, text)
    text = re.sub(r"\bhalf an hour\b", "30 minutes", text)
    text = re.sub(r"\ban hour\b", "60 minutes", text)
    text = re.sub(r"\ba (?:couple|pair) of\b", "2", text)
    text = re.sub(r"\ba dozen\b", "12", text)
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

    text = pattern.sub(convert, text)
    return re.sub(r"\b(\d+) and a half (hours?|minutes?)\b", r"\1.5 \2", text)  # "two and a half hours"


def _number(token: str) -> float:
    return float(token.replace(",", ""))


# ---- the goal as read --------------------------------------------------------------------------------

@dataclass
class Reading:
    """A goal as written (`original`) and as read (`low`: lower case, numbers as digits, signs and
    "percent" as words), with the spans of `low` that a recognised part accounted for. The parts read
    `low`; what none of them took is checked last, so nothing a person asked for is dropped unsaid."""

    original: str
    low: str
    taken: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def of(cls, original: str) -> "Reading":
        low = words_to_numbers(original.lower())
        low = re.sub(r"\s*(?:<=|=<|≤)\s*", " at most ", low)  # "ppl <= 25": signs are comparisons in words
        low = re.sub(r"\s*(?:>=|=>|≥)\s*", " at least ", low)
        low = re.sub(r"\s*<\s*", " below ", low)
        low = re.sub(r"\s*>\s*", " above ", low)
        low = re.sub(r"\s*percentage points?\b", " points", low)
        low = re.sub(r"\s*(?:percent|per cent|pct)\b", "%", low)
        return cls(original, " ".join(low.split()))

    def take(self, start: int, end: int) -> None:
        self.taken.append((start, end))

    def take_text(self, literal: str | None) -> None:
        for m in re.finditer(re.escape((literal or "").lower()), self.low) if literal else ():
            self.take(m.start(), m.end())

    def free(self, start: int, end: int) -> bool:
        return not any(s < end and start < e for s, e in self.taken)

    def rest(self) -> str:
        """`low` with every taken span blanked (positions kept)."""
        chars = list(self.low)
        for s, e in self.taken:
            chars[s:e] = " " * (e - s)
        return "".join(chars)

    def clause(self, start: int, end: int | None = None) -> str:
        """The clause around a span, as the person wrote it where it can be found, for quoting back."""
        end = start if end is None else end
        cut = r"[,;!?]\s|\.(?:\s|$)|:\s|\s-\s|\s(?:and|but|so that|so|such that|until|then|to|while|with|where)\s"
        left = max([m.end() for m in re.finditer(cut, self.low[:start])], default=0)
        right = next((m.start() + end for m in re.finditer(cut, self.low[end:])), len(self.low))
        text = re.sub(r"^(?:(?:and|but|so that|so|then|to|with|while)\s+)+", "", self.low[left:right].strip(" .,;:!?"))
        at = self.original.lower().find(text)
        return self.original[at:at + len(text)] if at >= 0 and text else text

    def sentence(self, start: int, end: int) -> tuple[int, int]:
        """Where the sentence holding a span starts and ends in `low`."""
        left = max([m.end() for m in re.finditer(r"[.;!?](?:\s|$)", self.low[:start])], default=0)
        right = next((m.start() + end for m in re.finditer(r"[.;!?](?:\s|$)", self.low[end:])), len(self.low))
        return left, right


def metric_of(text: str) -> str:
    return next(name for pattern, name in METRICS if re.search(pattern, text))


def baseline_of(text: str) -> str:
    return next(name for pattern, name in BASELINES if re.fullmatch(pattern, text))


# ---- parse -------------------------------------------------------------------------------------------

def parse_goal(text: str, workspace: Path | None = None) -> Goal:
    """The `Goal` a sentence states, or an InputError saying in one line what is missing, impossible,
    contradictory or not understood."""
    original = _tidy(text)
    if not original:
        raise InputError("goal: empty; say what to train, on which data, and what counts as success")
    body, notes = _split_notes(original)
    r = Reading.of(body)

    data = _find_data(r)
    base, unknown = _find_base(r)
    task = _find_task(r, base)
    base, registered, note = _base_from_registry(r, task, base, workspace)
    if unknown and not base and task != "pretrain":
        raise InputError(f"base_model: unknown model {unknown!r}; use {', '.join(EMBEDDED)}, a local "
                         "model directory or a hub id like org/name")
    if data is None:
        raise InputError("data: the goal names no data; say what to train on (a .jsonl/.csv/.txt file, a directory, or bbc-news)")
    lora = _find_lora(r)
    task = _settle_task(r, task, base, lora)

    fmt = _find_format(r.low)
    metric, target = _find_target(r, task)
    budget = _find_budget(r)
    deploy, name = _find_deploy(r, data, registered)
    approval = _find_approval(r)
    method = "full" if task == "pretrain" else _find_method(r, base, lora)
    objective = _find_objective(r, task)
    if objective != "sft" and not re.search(METRIC, r.low):  # a preference goal is judged on preference accuracy
        metric = "preference_accuracy"
    size = _find_size(r) if task == "pretrain" else None
    attempts = _find_attempts(r)
    processes, strategy = _find_processes(r)
    _refuse_what_was_not_understood(r)
    if metric == "accuracy":
        _check_labelled(data, fmt, workspace)
    try:
        return Goal(task=task, data=data, base_model=base or "", method=method, objective=objective, format=fmt,
                    metric=metric, target=target,
                    budget=budget, deploy=deploy, approval=approval, model_name=name, lora=lora,
                    size=size or ("tiny" if task == "pretrain" else None), attempts=attempts, processes=processes,
                    strategy=strategy,
                    notes="; ".join(n for n in (note, notes) if n))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "goal"
        raise InputError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None


def _tidy(text: str | None) -> str:
    """One line, with the typographic quotes and dashes people paste turned into plain ones."""
    text = str(text or "").translate(str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"',
                                                    "\u2013": "-", "\u2014": "-", "\u2212": "-"}))
    return " ".join(text.split())


def _split_notes(original: str) -> tuple[str, str]:
    """(the goal, the notes): what follows 'note:' is free text for the report, not read as the goal."""
    m = re.search(r"\b(?:note|notes|nb)\s*[:-]\s*(.+)$", original, re.I)
    return (original[:m.start()].rstrip(" ,;"), m.group(1).strip()) if m else (original, "")


# ---- data, base model, task ----------------------------------------------------------------------------

def _find_data(r: Reading) -> str | None:
    """The one data source the goal names; two are refused (a directory holds several files)."""
    found: list[str] = []
    for pattern, name in CORPORA.items():
        for m in re.finditer(rf"(?<![\w./-]){pattern}(?![\w/-]|\.\w)", r.low):  # not inside a path (bbc-news.jsonl)
            found.append(name)
            r.take(m.start(), m.end())
    tokens = [t.rstrip(".,;:") for t in re.findall(r"[\w./~:-]+", r.original)]
    found += [t for t in tokens if t.lower().endswith(DATA_EXT)]
    if not found:  # a directory of data (a model directory is not data)
        found = [t for t in tokens if ("/" in t or t.startswith(("~", "."))) and Path(t).expanduser().is_dir()
                 and not (Path(t).expanduser() / "config.json").exists()][:1]
    found = list(dict.fromkeys(found))
    if len(found) > 1:
        raise InputError(f"data: the goal names {len(found)} data sources ({', '.join(found)}); name one "
                         "(put several files in one directory)")
    for source in found:
        r.take_text(source)
    return found[0] if found else None


def _find_base(r: Reading) -> tuple[str | None, str | None]:
    """(base model, a name the goal tried to use as one that is none we know)."""
    original, low = r.original, r.low
    for token in re.findall(r"[\w./~-]+", original):  # a local model directory
        clean = token.rstrip(".,;:")
        if ("/" in clean or clean.startswith(("~", "."))) and (Path(clean).expanduser() / "config.json").is_file():
            r.take_text(clean)
            return clean, None
    for token in re.findall(r"(?<![\w./-])[A-Za-z0-9][\w.-]*/[\w.-]+", original):  # org/name: a hub id, unless a path
        clean = token.rstrip(".,;:")
        if (not clean.lower().endswith(DATA_EXT) and not Path(clean).exists() and clean.lower() not in NOT_HUB_IDS):
            r.take_text(clean)
            return clean, None
    for pattern, name in EMBEDDED_ALIASES.items():
        m = re.search(rf"\b{pattern}\b", low)
        if m:
            r.take(m.start(), m.end())
            return name, None
    verb = (r"(?:fine[\s-]*tun(?:e|ing)|finetun(?:e|ing)|adapt|evaluate|score|start(?:ing)? from|on top of|"
            r"base(?: model)?(?: is)?|model)")
    m = re.search(rf"\b{verb}\s+(?:the\s+|a\s+|an\s+)?(?:model\s+)?([A-Za-z0-9][\w.-]*(?:/[\w.-]+)?(?:@[\w-]+)?)", original, re.I)
    if m:
        cand = m.group(1).rstrip(".,;:")
        if cand.lower().endswith(DATA_EXT) or cand.lower() in STOPWORDS or re.fullmatch(METRIC, cand.lower()):
            return None, None
        if re.fullmatch(r"[a-z0-9-]+@(?:production|staging|previous|v\d+)", cand):
            r.take_text(cand)
            return cand, None  # a registered model, for evaluation
        return None, cand
    return None, None


STOPWORDS = {"it", "on", "with", "using", "a", "the", "my", "our", "this", "that", "lora", "full", "to", "for", "from",
             "so", "and", "by", "at", "until", "in", "into", "your", "these", "those", "me", "upon", "over", "all",
             "qlora", "low-rank", "base", "model", "weights", "of", "is"}
PRETRAIN = r"pre[\s-]*train|from scratch|train (?:a|an) (?:new |fresh )?(?:tiny |small |124m )?(?:language )?model on"
IMPROVE = r"improve|retrain|re-train|update|refresh|keep training|continue training|align"


def _find_task(r: Reading, base: str | None) -> str | None:
    """pretrain, finetune or evaluate, as the goal's verbs say; None when they say none."""
    if re.search(PRETRAIN, r.low):
        if not base and re.search(r"\b(?:fine[\s-]*tun|finetun|adapt)", r.low):
            raise InputError("task: the goal says both fine-tune and from scratch; fine-tune a named base model, "
                             "or pretrain from scratch")
        return "pretrain"
    if re.search(rf"\b(?:fine[\s-]*tun|finetun|adapt|train|{IMPROVE})", r.low):
        # "improve smollm2 on new.jsonl": the task's verb; "improve perplexity" without a number is a criterion
        for m in re.finditer(rf"\b(?:{IMPROVE})\s+(?!(?:the |its )?(?:{METRIC})|it\b|on\b|upon\b|over\b|by\b|"
                             rf"(?:the )?(?:base|production|current)\b)", r.low):
            r.take(m.start(), m.end())
        return "finetune"
    if re.search(r"\b(?:evaluate|score|measure|benchmark)\b", r.low):
        return "evaluate"
    return "finetune" if base else None


REGISTERED = (rf"\b({IMPROVE}|fine[\s-]*tune|finetune|train|adapt|start(?:ing)? from|on top of|build on)\s+"
              rf"(?:the\s+|our\s+|my\s+)?(?:(?:registered\s+)?model\s+)?([a-z0-9][a-z0-9-]{{1,62}})(@[\w-]+)?(?![\w./])")


def _base_from_registry(r: Reading, task: str | None, base: str | None,
                        workspace: Path | None) -> tuple[str | None, str | None, str]:
    """(base, registered name, note). A goal that improves a registered model ("improve support-bot on
    new.jsonl") starts from that model's production version, whose directory is a local base. A name that
    is not there is refused: replacing it with some other model would train something nobody asked for."""
    if base and not (task == "finetune" and "@" in base):
        return base, None, ""  # a named base; an "@" reference stays one for evaluation
    m = re.search(REGISTERED, r.low)
    if base:  # "fine-tune support-bot@production"
        name, ref, explicit = base.split("@")[0], base, True
    elif m and m.group(2) not in STOPWORDS and not re.fullmatch(METRIC, m.group(2)) and task in (None, "finetune"):
        name, ref, explicit = m.group(2), m.group(2) + (m.group(3) or "@production"), bool(re.fullmatch(IMPROVE, m.group(1)))
    else:
        return None, None, ""
    registry = None
    if workspace is not None:
        # imported here: most goals never need the registry
        from serving.registry import Registry

        registry = Registry(workspace)
    if registry is None or name not in registry.names():
        if not explicit:
            return None, None, ""  # "fine-tune llama-70b-ultra": an unknown model, refused as such
        raise InputError(f"base_model: {ref.replace('@', ' is not in ', 1)} in this workspace; name a base model "
                         f"({', '.join(EMBEDDED)}, a directory or a hub id)")
    try:
        _, version, path = registry.resolve(ref)
    except InputError:
        raise InputError(f"base_model: {ref.replace('@', ' is not in ', 1)} in this workspace; name a base model "
                         f"({', '.join(EMBEDDED)}, a directory or a hub id)") from None
    which = ref.split("@")[1]
    if not (path / "config.json").is_file():  # a separate adapter is not a whole model to start from
        raise InputError(f"base_model: {name}'s {which} version {version.version} is a separate LoRA adapter, "
                         "not a whole model to start from; name a base model")
    if m:
        r.take(m.start(), m.end())
    return str(path), name, f"starts from {name}'s {which} version {version.version}"


def _settle_task(r: Reading, task: str | None, base: str | None, lora: LoraSettings | None) -> str:
    """The task once the base is known, refusing what contradicts itself or leaves the model unsaid."""
    lora_asked = lora is not None or re.search(r"\bq?lora\b|low[\s-]*rank|adapters?\b", r.low)
    if task == "pretrain" and base:
        raise InputError(f"base_model: pretraining starts from scratch, but the goal names {base}; "
                         "say 'fine-tune' to start from it, or drop the model")
    if task == "pretrain" and lora_asked:
        raise InputError("method: LoRA adapts a pretrained base model, but the goal pretrains from scratch; "
                         "drop LoRA, or name a base model to fine-tune")
    if not base and task != "pretrain":
        if lora_asked:
            raise InputError(f"base_model: LoRA adapts an existing model, but the goal names no base model; add one "
                             f"({', '.join(EMBEDDED)}, a directory or a hub id)")
        raise InputError(f"base_model: the goal names no model to fine-tune; add one ({', '.join(EMBEDDED)}, "
                         "a directory or a hub id), or say 'from scratch' to pretrain")
    return task or "finetune"


def _find_format(low: str) -> str | None:
    if re.search(r"\bpreference (?:pairs|data)\b|\bchosen (?:and|/) rejected\b", low):
        return "preference"
    if re.search(r"\bclassif(?:y|ication|ier)\b|\bas labels?\b|\blabelled\b|\blabeled\b", low):
        return "classification"
    if re.search(r"\b(?:as |in )?chat(?: format| turns| messages)?\b(?! bot)|\bconversations?\b", low) and not re.search(r"chatbot", low):
        return "chat"
    if re.search(r"\bpairs?\b|\bquestion[\s/-]*answer\b|\bq&a\b|\bprompt[\s/-]*response\b", low):
        return "pairs"
    if re.search(r"\bplain text\b|\bas text\b|\braw text\b", low):
        return "text"
    return None


# ---- target --------------------------------------------------------------------------------------------

def _find_target(r: Reading, task: str) -> tuple[str, Target | None]:
    """The goal's metric and its one target (None: none stated; the gate then asks for no worse than the base)."""
    found: list[tuple[re.Match, str]] = []
    for kind, forms in (("relative", RELATIVE_FORMS), ("absolute", ABSOLUTE_FORMS)):
        for form in forms:
            for m in re.finditer(form, r.low):
                if r.free(m.start(), m.end()):
                    r.take(m.start(), m.end())
                    found.append((m, kind))
    targets: list[tuple[Target, re.Match]] = []
    for m, kind in sorted(found, key=lambda f: f[0].start()):
        target = _target(r, m, kind, task)
        if all(target != t for t, _ in targets):  # the same target said twice is one target
            targets.append((target, m))
    if len(targets) > 1:
        phrases = " and ".join(f"'{r.clause(m.start(), m.end())}'" for _, m in targets)
        raise InputError(f"target: the goal states {len(targets)} targets ({phrases}); a goal has one, keep one")
    if targets:
        return targets[0][0].metric, targets[0][0]
    mentions = [(m.start(), metric_of(m.group(0))) for m in re.finditer(METRIC, r.low)]
    return min(mentions)[1] if mentions else "perplexity", None


def _target(r: Reading, m: re.Match, kind: str, task: str) -> Target:
    """One target phrase as a `Target`, refusing what it cannot mean (a wrong direction, a missing unit,
    an impossible value)."""
    said = m.groupdict()
    metric = metric_of(said["m"]) if said.get("m") else _metric_near(r, m.start(), m.end())
    lower = lower_is_better(metric)
    phrase = r.clause(m.start(), m.end())
    way = _way(said.get("cmp") or "")
    if said.get("cmp") == "over" and said.get("verb") and re.fullmatch(rf"{CHANGE}|(?:an? )?improvement of", said["verb"]):
        way = _way(said["verb"])  # "reduce perplexity by 20% over the base": there "over" means relative to
    if way is not None and way != ("down" if lower else "up"):
        raise InputError(f"target: {METRIC_WORDS[metric]} improves {'downwards' if lower else 'upwards'}, but "
                         f"'{phrase}' asks it to move the other way; say {'lower' if lower else 'higher'}")
    number, unit = (_number(said["n"]), said.get("unit")) if said.get("n") else (None, None)
    if kind == "relative":
        baseline = baseline_of(said["bl"].strip()) if said.get("bl") else "base"  # "drops 10%": from where it starts
        if task == "pretrain" and baseline == "base":
            raise InputError("target: a pretraining run has no base model to compare with; give an absolute target "
                             "(e.g. perplexity under 200) or compare with production")
        if re.fullmatch(r"halve[sd]?", said.get("cmp") or ""):
            value = 0.5
        elif re.fullmatch(r"double[sd]?", said.get("cmp") or ""):
            value = 1.0
        elif number is None:
            value = 0.0  # "beat the base": no worse than it
        elif unit == "%":
            value = round(number / 100, 6)  # 66.67% -> 0.6667, not 0.6667000000000001
        else:
            raise InputError(f"target: '{phrase}' gives no percentage; say how much {'below' if lower else 'above'} "
                             f"{BASELINE_WORDS[baseline]} as a percentage (e.g. 20%), or give an absolute value")
        return _checked_target(metric=metric, direction="lower" if lower else "higher", kind="relative", value=value,
                               baseline=baseline)
    if lower:  # perplexity: a number of at least 1, never a percentage
        if unit:
            raise InputError("target: perplexity is a number (1 or more), not a percentage; say e.g. 'perplexity under 20' "
                             "(or '20% below the base model')")
        if number < 1:
            raise InputError(f"target: perplexity is never below 1; {number:g} cannot be reached")
        value = number
    elif unit:
        value = round(number / 100, 6)  # 66.67% -> 0.6667, not 0.6667000000000001
    elif number > 1:  # "accuracy at least 1.5": neither a fraction nor clearly a percentage
        raise InputError(f"target: {metric} is a fraction between 0 and 1; {number:g} cannot be reached "
                         "(write a percentage like 85% or a fraction like 0.85)")
    else:
        value = number
    if not lower and value > 1:
        raise InputError(f"target: {metric} is a fraction between 0 and 1; {number:g}% cannot be reached")
    return _checked_target(metric=metric, direction="lower" if lower else "higher", kind="absolute", value=value)


def _checked_target(**fields) -> Target:
    try:
        return Target(**fields)
    except ValidationError as err:
        raise InputError(err.errors()[0]["msg"].removeprefix("Value error, ")) from None


def _way(words: str) -> str | None:
    """down, up, worse or None (just "better"): which way a target's comparison words move the metric."""
    if not words or re.fullmatch(NEUTRAL_WORDS, words):
        return None
    if re.fullmatch(WORSE_WORDS, words):
        return "worse"
    if re.fullmatch(rf"{DOWN_WORDS}|{AT_MOST}|lower|less|below|under|fewer|smaller", words):
        return "down"
    if re.fullmatch(rf"{UP_WORDS}|{AT_LEAST}|higher|more|above|greater|over", words):
        return "up"
    return None


def _metric_near(r: Reading, start: int, end: int) -> str:
    """The metric a target phrase without one is about: the nearest named before it in its sentence, else
    after it; else the one metric the goal names; else perplexity (the default metric)."""
    mentions = [(m.start(), m.end(), metric_of(m.group(0))) for m in re.finditer(METRIC, r.low)]
    left, right = r.sentence(start, end)
    before = [x for x in mentions if left <= x[0] and x[1] <= start]
    after = [x for x in mentions if x[0] >= end and x[1] <= right]
    if before:
        return before[-1][2]
    if after:
        return after[0][2]
    names = {x[2] for x in mentions}
    return names.pop() if len(names) == 1 else "perplexity"


# ---- budget ---------------------------------------------------------------------------------------------

def _find_budget(r: Reading) -> GoalBudget:
    """Minutes and steps, each stated once, above zero; epochs and tokens are refused (not a goal budget)."""
    sign = r"(?P<neg>(?:(?<=\s)|^)-(?=\d)|\bminus\s+)?"  # "-50 steps", not the dash in "smollm2 - 50 steps"
    lead = r"(?:(?:for|in|within|under|at most|no more than|not more than|less than|max(?:imum)?|up to|about|or)\s+)?"
    minutes: list[tuple[float, str]] = []
    for m in re.finditer(rf"{lead}{sign}(?P<n>\d+(?:\.\d+)?)\s*(?P<u>hours?|hrs?|hr|h|minutes?|mins?|min|seconds?|secs?|sec|"
                         rf"days?)\b(?:\s*(?:and\s+)?(?P<n2>\d+(?:\.\d+)?)\s*(?:minutes?|mins?|min)\b)?", r.low):
        scale = {"h": 60, "m": 1, "s": 1 / 60, "d": 24 * 60}[m.group("u")[0]]
        value = _number(m.group("n")) * scale + (_number(m.group("n2")) if m.group("n2") and scale == 60 else 0)
        minutes.append((-value if m.group("neg") else value, m.group(0).strip()))
        r.take(m.start(), m.end())
    steps: list[tuple[float, str]] = []
    for m in re.finditer(rf"{lead}{sign}(?P<n>\d[\d,]*(?:\.\d+)?)\s*(?P<k>k)?\s*(?:training\s+|optimi[sz]er\s+|gradient\s+)?"
                         rf"(?:steps?|iterations?|iters?)\b", r.low):
        value = _number(m.group("n")) * (1000 if m.group("k") else 1)
        steps.append((-value if m.group("neg") else value, m.group(0).strip()))
        r.take(m.start(), m.end())
    m = re.search(r"\b\d[\d,.]*\s*[kmb]?\s*(?:epochs?|tokens?)\b", r.low)
    if m:
        raise InputError(f"budget: a goal's budget is steps or minutes, not '{m.group(0)}'; say e.g. 'for 200 steps' "
                         "or 'within 10 minutes'")
    for found, unit in ((minutes, "time limits"), (steps, "step counts")):
        if len({v for v, _ in found}) > 1:
            raise InputError(f"budget: the goal gives two {unit} ({', '.join(repr(w) for _, w in found)}); keep one")
        if found and found[0][0] < 0:
            raise InputError(f"budget: '{found[0][1]}' is negative; give minutes or steps above zero")
        if found and found[0][0] == 0:
            raise InputError("budget: a zero budget leaves no time to train; give minutes or steps above zero")
    if steps and steps[0][0] != int(steps[0][0]):
        raise InputError(f"budget: '{steps[0][1]}' is not a whole number of steps")
    try:
        return GoalBudget(minutes=minutes[0][0] if minutes else None, steps=int(steps[0][0]) if steps else None)
    except ValidationError as err:
        first = err.errors()[0]
        raise InputError(f"budget.{first['loc'][0]}: {first['msg']}") from None


# ---- deploy ----------------------------------------------------------------------------------------------

NEVER = (rf"\b(?:{NEGATION})\s+(?:\w+\s+)?(?:be\s+)?(?:{DEPLOY_WORD})|\bdeploy(?:ment)?\s*[:=]\s*(?:no|none|never|false|off)\b|"
         r"\bdeploy nothing\b|\bkeep it (?:out of|away from) production\b|\bnot (?:for|to|into|in) production\b|"
         r"\b(?:just|only) train\b|\btrain only\b|\bdry[\s-]run\b")
FAILING = r"if (?:it )?(?:fails|doesn't pass|does not pass|is worse|misses|underperforms)|if not|otherwise|else"
CONDITION_AFTER = rf"\W*(?:\w+\W+){{0,3}}?(?:unless|until|{FAILING}|without (?:\w+\s+)?(?:approv|sign[\s-]?off|review))"
CONDITION_BEFORE = rf"(?:{FAILING})\W*$"
ALWAYS = (r"whatever the (?:score|result|outcome|gate says)|regardless(?: of (?:the )?(?:score|result|gate|outcome))?|"
          r"no matter what|either way|always (?:deploy|ship)|(?:deploy|ship|release)(?: it)? (?:anyway|unconditionally|"
          r"in any case)|even if it (?:fails|doesn't pass|does not pass)|pass or fail")


def _find_deploy(r: Reading, data: str, registered: str | None) -> tuple[str, str | None]:
    """never, if_passed or always, and the registry name. A negation of deploying in any common wording
    means never, unless it is a condition ("don't deploy unless it passes", "if it fails, don't ship it");
    a goal that says both never and deploy is refused."""
    name = _find_model_name(r)
    never, conditional = [], False
    for m in re.finditer(NEVER, r.low):
        before, after = r.low[max(0, m.start() - 40):m.start()], r.low[m.end():m.end() + 80]
        if re.match(CONDITION_AFTER, after) or re.search(CONDITION_BEFORE, before):
            conditional = True  # a refusal to deploy a failing model: deploy the one that passes
        else:
            never.append(m)
        r.take(m.start(), m.end())
    always = re.search(ALWAYS, r.low)
    if always:
        r.take(always.start(), always.end())
    wanted = list(re.finditer(rf"\b(?:{DEPLOY_WORD})", r.rest()))
    if never and (wanted or always):
        said = r.clause(never[0].start(), never[0].end())
        other = r.clause(*(always.span() if always else wanted[0].span()))
        raise InputError(f"deploy: the goal says both '{said}' and '{other}'; say whether to deploy")
    if never:
        return "never", name
    fallback = registered or default_name(data)  # improving support-bot deploys as support-bot
    if always:
        return "always", name or fallback
    if name or wanted or conditional:
        return "if_passed", name or fallback
    return "never", None


def _find_approval(r: Reading) -> str:
    """required when a person must approve before production ("after human approval", "with my sign-off")."""
    said = re.search(r"\b(?:human|manual|my|our|a person'?s?|someone'?s?)\s+(?:approv|sign[\s-]?off)|\bafter (?:i|we) approve|"
                     r"\b(?:needs?|requires?|wait for|with|after|pending|once i give) approval\b", r.low)
    return "required" if said else "none"


def _find_model_name(r: Reading) -> str | None:
    """The registry name: 'deploy it as support-bot', 'call it helpdesk-v2' (not 'deploy as soon as')."""
    for m in re.finditer(r"\b(?:deploy|ship|publish|serve|release|register|push|put|promote)\b[^.;]{0,40}?\s(?:as|under(?: the name)?|named|"
                         r"called)\s+[\"'`]?([^\s\"'`,;]+)|\b(?:call|name)\s+it\s+[\"'`]?([^\s\"'`,;]+)", r.original, re.I):
        name = (m.group(1) or m.group(2)).rstrip(".!?:")
        if name.lower() in NOT_NAMES:
            continue
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{1,62}", name):
            raise InputError(f"model_name: {name!r} is not a registry name; use lowercase letters, digits and dashes "
                             "(e.g. support-bot)")
        r.take_text(name)
        return name
    return None


def default_name(data: str) -> str:
    """A registry name from the data when the goal gives none: 'data/support_faq.jsonl' -> 'support-faq'."""
    stem = re.sub(r"[^a-z0-9]+", "-", Path(data).stem.lower()).strip("-")
    return (stem or "model")[:63] if len(stem) >= 2 else f"model-{stem}"


# ---- method, LoRA, size ------------------------------------------------------------------------------------

LORA_FIELDS = [  # (setting, how people write it): the number is group 1, a percent sign group 2
    ("rank", r"\b(?:rank|r)\s*(?:=|of|:|-)?\s*(-?\d+)\b()"),  # "rank 8", "r=16", "rank-4"
    ("rank", r"\b(\d+)[\s-]+rank\b()"),  # "an 8-rank adapter"
    ("alpha", r"\balpha\s*(?:=|of|:)?\s*(-?\d+)\b()"),
    ("dropout", r"\bdropout\s*(?:=|of|:)?\s*(-?\d*\.?\d+)\s*(%)?"),
]


def _find_processes(r: Reading) -> tuple[int | None, str | None]:
    """"on 4 GPUs", "across 2 processes", "with FSDP", "using DDP", "with torchrun": a torchrun job of that many
    processes (None: every visible GPU) sharding (fsdp) or replicating (ddp, the default) the model."""
    processes = strategy = None
    m = re.search(r"\b(?:on|over|across|using|with)\s+(\d+)\s+(?:gpus?|processes|devices|ranks)\b", r.low)
    if m and r.free(m.start(), m.end()):
        r.take(m.start(), m.end())
        processes = int(_number(m.group(1)))
        if not 1 <= processes <= 64:
            raise InputError(f"processes: {processes}; say between 1 and 64 GPUs")
    m = re.search(r"\b(?:(?:with|using|via)\s+)?(fsdp|ddp)\b", r.low)
    if m and r.free(m.start(), m.end()):
        r.take(m.start(), m.end())
        strategy = m.group(1)
    m = re.search(r"\b(?:with|using|via|under)\s+torchrun\b", r.low)
    if m and r.free(m.start(), m.end()):
        r.take(m.start(), m.end())
        strategy = strategy or "ddp"
    if processes is not None and strategy is None:
        strategy = "ddp"
    return processes, strategy


def _find_attempts(r: Reading) -> int:
    """"trying up to 3 configurations", "try at most 2 configs", "3 attempts": how many training configurations
    the crew may try within the budget (1 when the goal does not say)."""
    m = re.search(r"(?:\btry(?:ing)?\s+)?(?:up to|at most|no more than)?\s*(\d+)\s+(?:configurations?|configs?|attempts?|tries)\b",
                  r.low)
    if not m or not r.free(m.start(), m.end()):
        return 1
    r.take(m.start(), m.end())
    n = int(_number(m.group(1)))
    if not 1 <= n <= 5:
        raise InputError(f"attempts: {n} configurations; say between 1 and 5")
    return n


def _find_lora(r: Reading) -> LoraSettings | None:
    """LoRA rank, alpha and dropout, each stated once."""
    seen: dict[str, list[float]] = {}
    for key, pattern in LORA_FIELDS:
        for m in re.finditer(pattern, r.low):
            if r.free(m.start(), m.end()):
                seen.setdefault(key, []).append(_number(m.group(1)) / (100 if m.group(2) else 1))
                r.take(m.start(), m.end())
    for key, values in seen.items():
        if len(set(values)) > 1:
            raise InputError(f"lora.{key}: the goal gives two values ({', '.join(f'{v:g}' for v in values)}); keep one")
    if not seen:
        return None
    try:
        return LoraSettings(**{k: v[0] if k == "dropout" else int(v[0]) for k, v in seen.items()})
    except ValidationError as err:
        first = err.errors()[0]
        raise InputError(f"lora.{first['loc'][0]}: {first['msg']}") from None


def _find_method(r: Reading, base: str | None, lora: LoraSettings | None) -> str:
    full = re.search(r"\bfull[\s-]*(?:fine[\s-]*tun\w*|finetun\w*|parameters?|weights?|training)\b|\ball (?:the )?weights\b", r.low)
    lora_words = re.search(r"\bq?lora\b|low[\s-]*rank|adapters?\b", r.low)
    if full and lora is not None:
        raise InputError("method: the goal asks for a full fine-tune and gives LoRA settings; choose one")
    if full and lora_words:
        raise InputError("method: the goal asks for both a full fine-tune and LoRA; choose one")
    if full:
        return "full"
    if lora_words or lora is not None:
        return "lora"
    return "lora" if base_parameters(base) >= 100_000_000 else "full"


OBJECTIVES = [(r"\bdpo\b|direct[\s-]+preference[\s-]+optimi[sz]ation", "dpo"),
              (r"\borpo\b|odds[\s-]+ratio[\s-]+preference[\s-]+optimi[sz]ation", "orpo"),
              (r"\bkto\b|kahneman[\s-]+tversky(?:[\s-]+optimi[sz]ation)?", "kto")]


def _find_objective(r: Reading, task: str) -> str:
    """"using DPO", "with ORPO", "by KTO": a preference objective (sft when the goal names none)."""
    found = []
    for pattern, objective in OBJECTIVES:
        for m in re.finditer(rf"(?:\b(?:using|with|via|by)\s+)?(?:{pattern})", r.low):
            if r.free(m.start(), m.end()):
                r.take(m.start(), m.end())
                found.append(objective)
    if len(set(found)) > 1:
        raise InputError(f"objective: the goal names {' and '.join(o.upper() for o in sorted(set(found)))}; choose one")
    if found and task != "finetune":
        raise InputError(f"objective: {found[0].upper()} tunes a pretrained model's preferences; name a base model "
                         "to fine-tune")
    return found[0] if found else "sft"


def _find_size(r: Reading) -> str | None:
    m = re.search(r"\b(large|big|huge|medium|giant|\d+(?:\.\d+)?\s*b)\s+(?:language\s+)?model\b", r.low)
    if m:
        raise InputError(f"size: '{m.group(1)}' is not a size this engine pretrains; use tiny, small or 124m")
    return next((v for k, v in SIZES.items() if re.search(rf"\b{re.escape(k)}\b", r.low)), None)


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


# ---- what was not understood ---------------------------------------------------------------------------------

def _refuse_what_was_not_understood(r: Reading) -> None:
    """Refuse, quoting it, what no part of the parser accounted for but that a person meant: a success
    criterion in words ("beat last week's model", "make it great"), a setting a Goal cannot carry, or a
    stray percentage or metric value. Dropping any of them would train something other than was asked."""
    rest = r.rest()
    for pattern, setting in SETTINGS.items():
        m = re.search(rf"(?:{pattern})[^,;.]{{0,12}}?\d|\d\S*\s+(?:{pattern})", rest)  # "lr 1e-4", "10 warmup steps"
        if m:
            raise InputError(f"goal: I did not understand: '{r.clause(m.start(), m.end())}'; a goal cannot set the "
                             f"{setting} (the planner chooses it), so drop it")
    m = re.search(CRITERIA, rest) or re.search(r"\d\s*%", rest) or re.search(rf"(?:{METRIC})\W+(?:[a-z]+\W+){{0,2}}?\d", rest)
    if m:
        raise InputError(f"target: I did not understand: '{r.clause(m.start(), m.end())}'; state success as a number, "
                         "e.g. 'perplexity at least 10% below the base model' or 'accuracy at least 85%'")


# ---- the goal in one sentence ------------------------------------------------------------------------------------

def goal_sentence(goal: Goal) -> str:
    """The parsed goal as one plain English sentence a person can confirm before anything runs."""
    if goal.task == "pretrain":
        what = f"Pretrain a {goal.size or 'tiny'} model from scratch"
    elif goal.task == "evaluate":
        what = f"Evaluate {goal.base_model}"
    elif goal.method == "lora":
        what = f"Fine-tune {goal.base_model} with LoRA" + (_lora_words(goal.lora) if goal.lora else "")
    else:
        what = f"Fine-tune all the weights of {goal.base_model}"
    if goal.objective != "sft":
        what += f" by {goal.objective.upper()} (preference tuning)"
    what += f" on {goal.data}" + (f" as {FORMAT_WORDS[goal.format]}" if goal.format else "")
    limits = [f"{goal.budget.steps:,} step{'s' * (goal.budget.steps != 1)}"] if goal.budget.steps else []
    if goal.budget.minutes:
        limits.append(_minutes_words(goal.budget.minutes))
    if limits and goal.task != "evaluate":
        what += f" for at most {' or '.join(limits)}"
    if goal.processes or goal.strategy:
        where = f"{goal.processes} processes" if goal.processes else "every visible GPU"
        what += f", on {where} with {(goal.strategy or 'ddp').upper()} (torchrun)"
    parts = [what, f"success: {_success_words(goal)}"]
    if goal.deploy == "never":
        parts.append("do not deploy")
    else:
        when = "if the gate passes" if goal.deploy == "if_passed" else "whatever the gate says"
        parts.append(f"deploy as {goal.model_name} {when}" + (", after a person approves" if goal.approval == "required" else ""))
    if goal.notes:
        parts.append(f"note: {goal.notes}")
    return "; ".join(parts) + "."


FORMAT_WORDS = {"text": "plain text", "pairs": "prompt-response pairs", "chat": "chat conversations",
                "classification": "labelled text", "preference": "preference pairs", "feedback": "rated answers"}


def _lora_words(lora: LoraSettings) -> str:
    said = lora.model_fields_set
    words = [f"rank {lora.rank}"] + [f"alpha {lora.alpha}"] * ("alpha" in said) + [f"dropout {lora.dropout:g}"] * ("dropout" in said)
    return " " + ", ".join(words)


def _minutes_words(minutes: float) -> str:
    if minutes >= 120 and minutes % 60 == 0:
        return f"{minutes / 60:g} hours"
    return f"{minutes:g} minute{'s' * (minutes != 1)}"


def _success_words(goal: Goal) -> str:
    target = goal.target
    metric = METRIC_WORDS[goal.metric]
    measured = f"test {metric}" if goal.metric == "perplexity" else metric
    if target is None:
        if goal.task == "pretrain":
            return f"no target was given ({metric} is reported)"
        return f"no target was given, so {measured} no worse than the base model"
    if target.kind == "absolute":
        value = f"{target.value:g}" if goal.metric == "perplexity" else _percent(target.value)
        return f"{measured} at {'most' if target.direction == 'lower' else 'least'} {value}"
    baseline = BASELINE_WORDS[target.baseline]
    if target.value == 0:
        return f"{measured} no worse than {baseline}"
    return f"{measured} at least {_percent(target.value)} {'below' if target.direction == 'lower' else 'above'} {baseline}"


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.2f}".rstrip("0").rstrip(".") + "%"


# ---- checks shared with the LLM parser ------------------------------------------------------------------------

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
