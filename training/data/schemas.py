"""Recognise the common dataset schemas and turn a raw row into a `Record`.

Accepted (extra keys are ignored):

    text                      -> text
    text, label               -> classification
    prompt, completion        -> pairs
    prompt, response          -> pairs (the curated form itself: a curated split can be curated again)
    question, answer          -> pairs
    document, summary         -> pairs (summarisation: the document is the prompt, the summary the response)
    article, highlights       -> pairs (the CNN/DailyMail layout of the same thing)
    instruction, input?, output -> pairs (input appended to the instruction)
    messages [{role, content}] -> chat
    prompt?, chosen, rejected -> preference (DPO, ORPO); also question / instruction for the prompt,
                                 accepted / preferred for chosen, dispreferred for rejected; chosen and rejected
                                 may be message lists (whole conversations sharing a prefix, or the final
                                 assistant turn after a prompt that is itself a message list)
    prompt, completion | answer | response, label -> feedback (KTO): label true / false, 1 / -1 (or 0),
                                 "good" / "bad" (also "true" / "false", "1" / "-1" / "0" as text)
"""

from __future__ import annotations

from training.errors import InputError
from training.data.records import Record

# (schema name, required keys, format); checked in order, the first whose keys are all present wins.
SCHEMAS: list[tuple[str, frozenset[str], str]] = [
    ("messages", frozenset({"messages"}), "chat"),
    ("instruction,input,output", frozenset({"instruction", "output"}), "pairs"),
    ("prompt,completion", frozenset({"prompt", "completion"}), "pairs"),
    ("prompt,response", frozenset({"prompt", "response"}), "pairs"),
    ("question,answer", frozenset({"question", "answer"}), "pairs"),
    ("document,summary", frozenset({"document", "summary"}), "pairs"),
    ("article,highlights", frozenset({"article", "highlights"}), "pairs"),
    ("text,label", frozenset({"text", "label"}), "classification"),
    ("text", frozenset({"text"}), "text"),
]
# the two-column pair schemas: which column is the prompt and which the response
PAIR_KEYS = {name: tuple(name.split(",")) for name, _, fmt in SCHEMAS if fmt == "pairs" and name.count(",") == 1}
ACCEPTED = " | ".join(name for name, _, _ in SCHEMAS)
CHAT_ROLES = ("system", "user", "assistant")


# preference and feedback columns: the first of each tuple present names it
PROMPT_KEYS = ("prompt", "question", "instruction")
CHOSEN_KEYS = ("chosen", "accepted", "preferred")
REJECTED_KEYS = ("rejected", "dispreferred")
ANSWER_KEYS = ("completion", "answer", "response")
GOOD_LABELS = {"good", "true", "1", "+1", "yes"}
BAD_LABELS = {"bad", "false", "0", "-1", "no"}
ACCEPTED_PREFERENCE = "prompt,chosen,rejected | prompt,completion,label"


def _first(keys, names: tuple[str, ...]) -> str | None:
    return next((k for k in names if k in keys), None)


def detect_schema(row: dict, where: str) -> tuple[str, str]:
    """Return (schema name, format) for a row, or raise naming the columns found."""
    keys = row.keys()
    chosen, rejected, prompt = _first(keys, CHOSEN_KEYS), _first(keys, REJECTED_KEYS), _first(keys, PROMPT_KEYS)
    if chosen and rejected:
        return ",".join(k for k in (prompt, chosen, rejected) if k), "preference"
    answer = _first(keys, ANSWER_KEYS)
    if prompt and answer and "label" in keys:  # a rated answer: KTO's single-answer feedback
        return f"{prompt},{answer},label", "feedback"
    for name, required, fmt in SCHEMAS:
        if required <= keys:
            return name, fmt
    found = ", ".join(sorted(map(str, keys))) or "none"
    raise InputError(f"{where}: columns ({found}) fit no known schema; accepted: {ACCEPTED} | {ACCEPTED_PREFERENCE}")


def _string(row: dict, key: str, where: str, optional: bool = False) -> str:
    value = row.get(key)
    if value is None:
        if optional or key in row:
            return ""
        raise InputError(f"{where}: missing field '{key}'")
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise InputError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")


def _messages(row: dict, where: str) -> list[dict]:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
    out = _turns(row, "messages", where)
    if not any(m["role"] == "assistant" for m in out):
        raise InputError(f"{where}: field 'messages' has no assistant message to learn from")
    return out


def _turns(row: dict, key: str, where: str) -> list[dict]:
    """A field holding a message list, checked like `messages` (without asking for an assistant turn)."""
    value = row[key]
    if not isinstance(value, list):
        raise InputError(f"{where}: field '{key}' must be a string or a list of {{role, content}}")
    out = []
    for i, m in enumerate(value):
        field = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise InputError(f"{where}: field '{field}' must be an object with role and content")
        role = _string(m, "role", f"{where}: {field}")
        if role not in CHAT_ROLES:
            raise InputError(f"{where}: field '{field}.role' must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        out.append({"role": role, "content": _string(m, "content", f"{where}: {field}")})
    return out


def _prompt_turns(row: dict, key: str | None, where: str) -> list[dict]:
    if key is None:
        return []
    if isinstance(row.get(key), list):
        return _turns(row, key, where)
    return [{"role": "user", "content": _string(row, key, where)}]


def _preference(row: dict, schema: str, where: str) -> dict:
    """{prompt: turns, chosen, rejected}: message-list answers lose their shared prefix to the prompt."""
    keys = schema.split(",")
    prompt_key = keys[0] if len(keys) == 3 else None
    chosen_key, rejected_key = keys[-2], keys[-1]
    prompt = _prompt_turns(row, prompt_key, where)
    if isinstance(row[chosen_key], list) or isinstance(row[rejected_key], list):
        chosen, rejected = _turns(row, chosen_key, where), _turns(row, rejected_key, where)
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt += chosen[:shared]
        ends = chosen[shared:], rejected[shared:]
        if any(len(end) != 1 or end[0]["role"] != "assistant" for end in ends):
            raise InputError(f"{where}: fields '{chosen_key}' and '{rejected_key}' must differ only in their final "
                             f"assistant turn")
        answers = ends[0][0]["content"], ends[1][0]["content"]
    else:
        answers = _string(row, chosen_key, where), _string(row, rejected_key, where)
    if not any(m["role"] == "user" for m in prompt):
        raise InputError(f"{where}: a preference record needs a prompt (a '{PROMPT_KEYS[0]}' field, or conversations "
                         f"in '{chosen_key}' and '{rejected_key}' that start with a user turn)")
    return {"prompt": prompt, "chosen": answers[0], "rejected": answers[1]}


def feedback_label(value, where: str) -> bool:
    """A rating as desirable (True) or not: true / false, 1 / -1 or 0, "good" / "bad" (also as text)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().casefold() if isinstance(value, (str, int, float)) else None
    if text in GOOD_LABELS:
        return True
    if text in BAD_LABELS:
        return False
    raise InputError(f"{where}: field 'label' must be true / false, 1 / -1 or \"good\" / \"bad\", got {value!r}")


def to_record(row: dict, where: str) -> tuple[Record, str]:
    """Normalise one raw row; returns the record and the name of the schema it matched."""
    schema, fmt = detect_schema(row, where)
    if fmt == "preference":
        return Record(fmt, _preference(row, schema, where), where), schema
    if fmt == "feedback":
        prompt_key, answer_key, _ = schema.split(",")
        fields = {"prompt": _prompt_turns(row, prompt_key, where), "completion": _string(row, answer_key, where),
                  "label": feedback_label(row["label"], where)}
        return Record(fmt, fields, where), schema
    if schema == "messages":
        fields = {"messages": _messages(row, where)}
    elif schema == "instruction,input,output":
        instruction = _string(row, "instruction", where)
        extra = _string(row, "input", where, optional=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        fields = {"prompt": prompt, "response": _string(row, "output", where)}
    elif schema in PAIR_KEYS:
        prompt_key, response_key = PAIR_KEYS[schema]
        fields = {"prompt": _string(row, prompt_key, where), "response": _string(row, response_key, where)}
    elif schema == "text,label":
        fields = {"text": _string(row, "text", where), "label": _string(row, "label", where).strip()}
    else:
        fields = {"text": _string(row, "text", where)}
    return Record(fmt, fields, where), schema


def convert(record: Record, target: str) -> Record:
    """Re-express a record in another dataset format, or raise if that loses the point of the data.

    Anything can become plain text (for pretraining); only labelled text can be classification.
    """
    if record.format == target:
        return record
    f = record.fields
    if record.format in ("preference", "feedback") and target != "text":
        raise InputError(f"{record.where}: a {record.format} record cannot be used as {target} data (curate it as "
                         f"{record.format}, or as text)")
    if target == "text":
        if record.format in ("preference", "feedback"):
            text = "\n\n".join(m["content"] for m in f["prompt"]) + "\n\n" + f.get("chosen", f.get("completion", ""))
        elif record.format == "chat":
            text = "\n\n".join(f"{m['role']}: {m['content']}" for m in f["messages"])
        elif record.format == "pairs":
            text = f"{f['prompt']}\n\n{f['response']}"
        else:
            text = f["text"]
        return Record("text", {"text": text}, record.where)
    if target == "chat" and record.format == "pairs":
        messages = [{"role": "user", "content": f["prompt"]}, {"role": "assistant", "content": f["response"]}]
        return Record("chat", {"messages": messages}, record.where)
    if target == "pairs" and record.format == "classification":
        return Record("pairs", {"prompt": f["text"], "response": f["label"]}, record.where)
    raise InputError(
        f"{record.where}: a {record.format} record cannot be used as {target} data"
        + (" (it has no 'label' field)" if target == "classification" else "")
    )
