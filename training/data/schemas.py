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


def detect_schema(row: dict, where: str) -> tuple[str, str]:
    """Return (schema name, format) for a row, or raise naming the columns found."""
    keys = row.keys()
    for name, required, fmt in SCHEMAS:
        if required <= keys:
            return name, fmt
    found = ", ".join(sorted(map(str, keys))) or "none"
    raise InputError(f"{where}: columns ({found}) fit no known schema; accepted: {ACCEPTED}")


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
    out = []
    for i, m in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InputError(f"{where}: field '{field}' must be an object with role and content")
        role = _string(m, "role", f"{where}: {field}")
        if role not in CHAT_ROLES:
            raise InputError(f"{where}: field '{field}.role' must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        out.append({"role": role, "content": _string(m, "content", f"{where}: {field}")})
    if not any(m["role"] == "assistant" for m in out):
        raise InputError(f"{where}: field 'messages' has no assistant message to learn from")
    return out


def to_record(row: dict, where: str) -> tuple[Record, str]:
    """Normalise one raw row; returns the record and the name of the schema it matched."""
    schema, fmt = detect_schema(row, where)
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
    if target == "text":
        if record.format == "chat":
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
