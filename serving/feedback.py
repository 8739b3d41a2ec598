"""Recorded answers and the feedback people give on them: what the retraining loop learns from.

`modelcrew serve REF --record` appends every answer it delivered, and every rating it takes, to

    <workspace>/feedback/<model>/completions.jsonl   one row per answer (per choice: a completions request with
                                                     several prompts gives one row per prompt)
    <workspace>/feedback/<model>/feedback.jsonl      one row per accepted POST /v1/feedback

where <model> is the served model's name (the registry name, or a model directory's name). A completion row:

    id             the response id the client got (`chatcmpl-…` / `cmpl-…`)
    index          the choice's index in that response (0 but for a completions request with several prompts)
    created        when the answer finished, UTC ISO 8601 (milliseconds)
    model          the model name the request asked for
    version        the exact version that answered: `name@v3` for a registry reference (the one the request
                   started on, also across a hot swap), the resolved path for a model directory
    kind           "chat" or "completion"
    messages       (chat) the conversation: role, content as text, and tool_calls / tool_call_id / name when given
    tools          (chat, when given) the tools offered, as sent
    prompt         (completion) the prompt as text (token-id prompts decoded)
    answer         the generated text as the client received it (without an `echo`ed prompt)
    finish_reason  "stop" or "length"
    usage          prompt_tokens, completion_tokens, total_tokens of this choice

A feedback row: id, index, created, rating (1 good, -1 bad), correction (the answer it should have been, or
null) and version (copied from the completion it rates). A completion may be rated again: the latest row wins
(`read_feedback`), the earlier ones stay in the file.

Every text (message contents, tool-call arguments, prompt, answer, correction) goes through the curator's PII
scrubber (`training.data.clean.PIIScrubber`: e-mail, IP, card and phone numbers become <EMAIL>, <IP>, <CARD>,
<PHONE>) before it is written: nothing unscrubbed reaches the disk.

Appends are atomic: the rows of one call are encoded first, then written with one `os.write` on a fresh O_APPEND
descriptor while holding an exclusive `flock` on the file. flock locks belong to the open file, so two threads of
one server exclude each other as two processes do. A short write (a full disk) is cut back before the error is
raised, and a torn tail left by a writer killed mid-write is cut before the next append: the file is whole lines
only. Readers take a shared flock, so they never see a line being written. Completion rows are not fsynced (a
power cut may lose the last answers, never tear one); feedback rows are (a 200 means it is on disk).

Readers: `read_feedback(workspace, model)` joins each completion with its latest feedback, `training_records(rows,
objective)` turns the rated ones into what the retraining loop trains on (supervised pairs, preference pairs or KTO
labels), `stats(rows)` counts them by version, `models(workspace)` lists the models with records.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
from datetime import datetime, timezone
from pathlib import Path

from training.errors import InputError

MAX_CORRECTION_CHARS = 8000  # a corrected answer: a few pages at most, well inside the server's 1 MiB body limit
MAX_ID_CHARS = 64  # our ids are 33 characters (`chatcmpl-` + 24 hex)
COMPLETIONS, FEEDBACK = "completions.jsonl", "feedback.jsonl"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class UnknownCompletion(KeyError):
    """No recorded completion with this id and choice index."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def dir_name(model: str) -> str:
    """The directory a served model's records go to: its name, with anything but letters, digits, '.', '_' and '-'
    replaced (a registry name is kept as it is)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", model).lstrip(".-") or "model"
    return name[:128]


def feedback_dir(workspace: Path, model: str) -> Path:
    return Path(workspace) / "feedback" / dir_name(model)


# ---- whole-line appends and reads ---------------------------------------------------------------------------------


def _cut_torn_tail(fd: int, size: int) -> int:
    """The file's size once a last line without its newline (a writer that died mid-write) is cut off."""
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    end, step = size, 1 << 16
    while end > 0:
        start = max(0, end - step)
        chunk = os.pread(fd, end - start, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            keep = start + cut + 1
            break
        end = start
    else:
        keep = 0
    os.ftruncate(fd, keep)
    return keep


def append_rows(path: Path, rows: list[dict], sync: bool = False) -> None:
    """Append `rows` as JSON lines, all or none, in one write under an exclusive flock (see the module's notes)."""
    data = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows).encode("utf-8")
    if not data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes
        size = _cut_torn_tail(fd, os.fstat(fd).st_size)
        written = os.write(fd, data)
        if written != len(data):  # a full disk or a file-size limit: leave no half line behind
            os.ftruncate(fd, size)
            raise OSError(f"{path}: wrote {written} of {len(data)} bytes; the rows were not recorded")
        if sync:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def read_rows(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """The whole rows from byte `offset` on, and the offset after the last one (under a shared flock: no line
    being written is seen; a torn tail a dead writer left is skipped, as the next append cuts it)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return [], offset
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    rows = []
    for number, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as err:
            raise InputError(f"{path}: a row that is not JSON after byte {offset} (line {number} from there): {err}") from None
    return rows, offset + end


# ---- the server's store -----------------------------------------------------------------------------------------


def _scrub_text(scrub, value):
    return scrub(value) if isinstance(value, str) else value


def _scrubbed(row: dict, scrub) -> dict:
    """The row with every free text through the PII scrubber (messages, tool-call arguments, prompt, answer,
    correction)."""
    out = dict(row)
    for key in ("prompt", "answer", "correction"):
        if key in out:
            out[key] = _scrub_text(scrub, out[key])
    if "messages" in out:
        messages = []
        for m in out["messages"]:
            m = {**m, "content": _scrub_text(scrub, m.get("content"))}
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"],
                                                      "arguments": _scrub_text(scrub, c["function"].get("arguments"))}}
                                   for c in m["tool_calls"]]
            messages.append(m)
        out["messages"] = messages
    return out


def _scrubber():
    from training.data.clean import PIIScrubber  # the curator's: what is scrubbed from data is scrubbed here too

    return PIIScrubber()


class FeedbackStore:
    """One served model's records: appends completions and feedback, knows every recorded (id, index).

    The index of recorded ids is read from disk at start, then kept up as this server records; an id it does not
    know makes it read only what was appended since (another server process on the same workspace), never the
    whole file again."""

    def __init__(self, workspace: Path, model: str) -> None:
        self.dir = feedback_dir(workspace, model)
        self.completions, self.feedback = self.dir / COMPLETIONS, self.dir / FEEDBACK
        self._lock = threading.Lock()  # guards the index and the offset read so far
        self._versions: dict[tuple[str, int], str] = {}
        self._offset = 0
        self._scrub = _scrubber()
        self._catch_up()

    def _catch_up(self) -> None:
        with self._lock:
            rows, self._offset = read_rows(self.completions, self._offset)
            for r in rows:
                self._versions[(r["id"], r.get("index", 0))] = r["version"]

    def __len__(self) -> int:
        return len(self._versions)

    def record(self, rows: list[dict]) -> None:
        """Append completion rows (scrubbed) and index them. Blocks on disk: call it off the event loop."""
        rows = [_scrubbed(r, self._scrub) for r in rows]
        append_rows(self.completions, rows)
        with self._lock:
            for r in rows:
                self._versions[(r["id"], r["index"])] = r["version"]

    def version_of(self, id: str, index: int = 0) -> str | None:
        key = (id, index)
        if key not in self._versions:
            self._catch_up()
        return self._versions.get(key)

    def add_feedback(self, id: str, rating: int, correction: str | None = None, index: int = 0) -> dict:
        """Append one feedback row (the correction scrubbed) and return it; UnknownCompletion when no completion with
        this id and index was recorded (nothing is written then)."""
        if rating not in (1, -1):
            raise ValueError(f"rating: 1 or -1, not {rating!r}")
        version = self.version_of(id, index)
        if version is None:
            raise UnknownCompletion(id)
        row = _scrubbed({"id": id, "index": index, "created": now(), "rating": rating, "correction": correction,
                         "version": version}, self._scrub)
        append_rows(self.feedback, [row], sync=True)
        return row


# ---- readers ------------------------------------------------------------------------------------------------------


def models(workspace: Path) -> list[str]:
    """The models with recorded completions in this workspace (their directory names), sorted."""
    root = Path(workspace) / "feedback"
    return sorted(p.name for p in root.iterdir() if (p / COMPLETIONS).is_file()) if root.is_dir() else []


def read_feedback(workspace: Path, model: str) -> list[dict]:
    """Every recorded completion of `model`, oldest first, joined by (id, index) with its latest feedback: the
    completion row plus `rating` (1, -1 or None when unrated), `correction` (text or None) and `rated_at`
    (the feedback's time or None). `version` is the version that answered. InputError when the model has no
    records here."""
    if not _NAME.match(model or ""):
        raise InputError(f"model {model!r}: give a model name as served (letters, digits, '.', '_', '-')")
    folder = feedback_dir(workspace, model)
    if not (folder / COMPLETIONS).is_file():
        known = models(workspace)
        raise InputError(f"no completions recorded for {model!r} in {Path(workspace) / 'feedback'}"
                         + (f" (recorded: {', '.join(known)})" if known else " (serve it with --record)"))
    completions, _ = read_rows(folder / COMPLETIONS)
    latest: dict[tuple[str, int], dict] = {}
    for f in read_rows(folder / FEEDBACK)[0]:
        latest[(f["id"], f.get("index", 0))] = f
    joined = []
    for c in completions:
        f = latest.get((c["id"], c.get("index", 0)))
        joined.append({**c, "rating": f["rating"] if f else None, "correction": f.get("correction") if f else None,
                       "rated_at": f["created"] if f else None})
    return joined


def stats(rows: list[dict]) -> dict[str, dict]:
    """Per version (in the order versions first answered): completions, rated, good (+1), bad (-1), corrected,
    and good_rate = good / rated (None before any rating)."""
    out: dict[str, dict] = {}
    for r in rows:
        s = out.setdefault(r["version"], {"completions": 0, "rated": 0, "good": 0, "bad": 0, "corrected": 0})
        s["completions"] += 1
        if r["rating"] is not None:
            s["rated"] += 1
            s["good" if r["rating"] == 1 else "bad"] += 1
        if r["correction"]:
            s["corrected"] += 1
    for s in out.values():
        s["good_rate"] = s["good"] / s["rated"] if s["rated"] else None
    return out


def _prompt_turns(row: dict) -> list[dict] | None:
    """The conversation before the answer as chat turns (a completion's prompt as one user turn); None for a
    conversation with tools (tool calls and results have no place in the chat template the trainer applies)."""
    if row.get("kind") == "completion":
        return [{"role": "user", "content": row.get("prompt") or ""}]
    if row.get("tools") or any(m.get("role") not in ("system", "user", "assistant") or m.get("tool_calls")
                               or not isinstance(m.get("content"), str) for m in row.get("messages") or []):
        return None
    return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]


def training_records(rows: list[dict], objective: str) -> list[dict]:
    """The rated completions of `read_feedback` as training records for `objective`, oldest first:

    sft          a correction becomes the answer to train on, and so does an answer rated good as it was
                 (chat -> {messages}, completion -> {prompt, completion}); an answer rated bad without a
                 correction teaches nothing here
    dpo, orpo    a rated answer with a correction: {prompt, chosen: the correction, rejected: the answer}
    kto          every rated answer: {prompt, completion: the answer, label: rated good}, and each correction
                 as a good answer of its own

    Unrated completions, conversations with tools and corrections equal to the answer are left out."""
    if objective not in ("sft", "dpo", "orpo", "kto"):
        raise ValueError(f"objective: sft, dpo, orpo or kto, not {objective!r}")
    out = []
    for r in rows:
        if r.get("rating") not in (1, -1):
            continue
        turns = _prompt_turns(r)
        if turns is None:
            continue
        answer = r.get("answer") or ""
        correction = r.get("correction") if (r.get("correction") or "").strip() and r.get("correction") != answer else None
        if objective == "sft":
            target = correction or (answer if r["rating"] == 1 else None)
            if target is None:
                continue
            if r.get("kind") == "completion":
                out.append({"prompt": r.get("prompt") or "", "completion": target})
            else:
                out.append({"messages": turns + [{"role": "assistant", "content": target}]})
        elif objective in ("dpo", "orpo"):
            if correction is not None:
                out.append({"prompt": turns, "chosen": correction, "rejected": answer})
        else:
            out.append({"prompt": turns, "completion": answer, "label": r["rating"] == 1})
            if correction is not None:
                out.append({"prompt": turns, "completion": correction, "label": True})
    return out
