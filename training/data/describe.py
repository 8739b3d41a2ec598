"""Plain-English description of a dataset: what it is and what it is about.

The description is what later goes into the agents' memory (Chroma) and what similarity search
matches on, so it names the format, the size, the labels and the most frequent content words.
"""

from __future__ import annotations

import re
from collections import Counter

_WORD = re.compile(r"[^\W\d_][\w'-]*[^\W_]|[^\W\d_]{2}")
_STOPWORDS = frozenset(
    """a about above after again against all also am an and any are aren't as at be because been before
    being below between both but by can can't cannot could couldn't did didn't do does doesn't doing don't
    down during each else ever every few for from further get gets got had hadn't has hasn't have haven't
    having he her here hers herself him himself his how however i if in into is isn't it it's its itself
    just let like make may me might more most much must my myself need new no nor not now of off on once
    one only or other ought our ours ourselves out over own per please same say says said she should
    shouldn't since so some still such take than that that's the their theirs them themselves then there
    these they this those though through to too two under until up upon us use used using very via want
    was wasn't way we well were weren't what when where which while who whom why will with within without
    won't would wouldn't yes yet you your yours yourself yourselves also new mr mrs ms year years time
    told last first many back even going able sure yes's i'm you're we're they're it'll you'll i've
    you've we've let's three four five six seven eight nine ten next made make makes added including
    set put know see seen come came go goes went give given look looking around among across""".split()
)
_PLACEHOLDERS = frozenset({"email", "phone", "card", "ip"})
FORMAT_PHRASES = {
    "text": "text passages",
    "pairs": "prompt/response pairs",
    "chat": "chat conversations",
    "classification": "labelled texts",
    "preference": "preference pairs (a prompt, a chosen and a rejected answer)",
    "feedback": "rated answers (a prompt, an answer, good or bad)",
}


def top_terms(texts, k: int = 12) -> list[str]:
    """The `k` content words found in the most records (document frequency, ties broken alphabetically)."""
    df: Counter[str] = Counter()
    for text in texts:
        words = {w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS and w not in _PLACEHOLDERS}
        df.update(words)
    return [w for w, _ in sorted(df.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def describe(fmt: str, records_after: int, records_in: int, terms: list[str],
             labels: dict[str, int] | None, label_terms: dict[str, list[str]] | None) -> str:
    parts = [
        f"{records_after} {FORMAT_PHRASES[fmt]} ({records_in} before cleaning)"
        + (f", mostly about: {', '.join(terms)}." if terms else ".")
    ]
    if labels:
        dist = ", ".join(f"{name} ({n})" for name, n in sorted(labels.items(), key=lambda kv: (-kv[1], kv[0])))
        parts.append(f"{len(labels)} labels: {dist}.")
    if label_terms:
        parts.append(" ".join(f"'{name}' is about {', '.join(ws)}." for name, ws in sorted(label_terms.items())))
    return " ".join(parts)
