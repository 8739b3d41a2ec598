"""Benchmark of the data-curation engine: `curate()` end to end, and its near-duplicate stage against datasketch.

    .venv/bin/python bench/bench_data.py [--records N] [--out FILE] [--results-md FILE] [--profile] [--quick]

`--quick`: 10,000 records, and the datasketch baseline on a subsample when projected past 20 s.

What it does, all in one run:

1. Generates N deterministic (seeded) synthetic question/answer records into a temporary `.jsonl`:
   150-600 characters each, built from a large pseudo-word vocabulary so that records are not near
   duplicates of each other by accident; 10% of the records are planted near duplicates (a copy of a
   distinct original with one or two words replaced, inserted or deleted, kept only when the 5-byte
   shingle Jaccard of the two normalised keys is >= the threshold), 1% are exact duplicates (half
   byte-identical, half differing only in whitespace, which cleaning removes), and some records carry
   an e-mail address or a phone number.
2. Times `curate()` on that file end to end (reading included) in a fresh subprocess, so that nothing
   else this script holds pollutes its peak RSS (`ru_maxrss`).
3. Baseline, same run, same machine: datasketch `MinHash(num_perm=128)` + `MinHashLSH(threshold)` on the
   same normalised keys the engine's near-duplicate stage sees, against `training.data.dedup.
   near_duplicate_pairs` on those keys; each runs in its own subprocess (time and extra peak RSS).
   If datasketch is projected to take longer than `--baseline-budget-s` on all keys, both run on the
   same documented subsample (whole planted pairs kept together), so the ratio compares like with like.
4. Prints a rich table, writes every figure to `--out` (JSON), and regenerates the data section of
   `--results-md` from that JSON, so that no number in the report is typed by hand.

If the end-to-end rate misses the target (or with `--profile`) a second, cProfile'd curate run (not
the timed one) adds the hot spots to the JSON and the report.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import MB, RESULTS_MD, TARGET_CORES, cprofile_rows, fmt, limit_cores, machine_info, machine_rows
from common import make_progress, peak_rss_bytes, print_report, render_tables, result_json, rss_bytes, shown_path
from common import begin, top_functions, write_json, write_section

DEFAULT_OUT = result_json("bench_data")
PACKAGES = ("numpy", "datasketch")  # the versions the machine table names
TARGET_RECORDS_PER_S = 5_000
TARGET_PEAK_BYTES = 2 * 10**9  # "2 GB"; MB and GB below are decimal (10**6, 10**9 bytes)
NEAR_DUP_FRACTION = 0.10
EXACT_DUP_FRACTION = 0.01
EMAIL_FRACTION = 0.03
PHONE_FRACTION = 0.03
MIN_CHARS, MAX_CHARS = 150, 600
SHINGLE = 5  # bytes, as in training/data/dedup.py
DS_NUM_PERM = 128


# --------------------------------------------------------------------------------------------------
# synthetic data

COMMON = (
    "the a an of to and in is for that with on as it this by be are from or at not can your you "
    "when which how what why should would does do if then than there their into more most some any "
    "each other only also about after before between over under while because so but all its".split()
)
QUESTIONS = (
    "What is the difference between {} and {} in {}?",
    "How do I configure {} {} for {}?",
    "Why does my {} {} fail when the {} is {}?",
    "Can you explain how {} relates to {} {}?",
    "Which {} should I use for {} {}?",
    "What are the main causes of {} {} in {}?",
    "Is it safe to {} the {} before {}?",
    "How can I improve {} {} without {}?",
    "When should a {} be {} instead of {}?",
    "What happens to the {} if {} {} stops?",
    "Where does {} store its {} {}?",
    "How long does it take to {} a {} {}?",
)
ONSETS = "b c d f g h j k l m n p r s t v w z br cl dr fl gr pl pr sk sl sp st tr ch sh th".split()
VOWELS = "a e i o u ai ea ie oo ou".split()
CODAS = ["", "", "", "n", "r", "s", "l", "m", "t", "nd", "st", "rk", "x"]


def make_vocabulary(rng: random.Random, size: int = 30_000) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.randint(1, 3))) + rng.choice(CODAS)
        if len(word) >= 3:
            words.add(word)
    return sorted(words)


class Generator:
    """Deterministic question/answer records; `key()` mirrors how curate() derives dedup keys."""

    def __init__(self, seed: int, threshold: float) -> None:
        from training.data.clean import PIIScrubber, normalize_text
        from training.data.dedup import normalized_key

        self.rng = random.Random(seed)
        self.vocab = make_vocabulary(self.rng)
        self.threshold = threshold
        self._normalize, self._key, self._scrub = normalize_text, normalized_key, PIIScrubber()

    def word(self) -> str:
        return self.rng.choice(self.vocab)

    def sentence(self) -> str:
        n = self.rng.randint(6, 16)
        words = [self.rng.choice(COMMON) if self.rng.random() < 0.35 else self.word() for _ in range(n)]
        if self.rng.random() < 0.1:
            words.insert(self.rng.randrange(len(words)), f"{self.rng.randint(2, 99)}")
        return " ".join(words).capitalize() + "."

    def record(self) -> dict:
        target = self.rng.randint(MIN_CHARS, MAX_CHARS)
        template = self.rng.choice(QUESTIONS)
        question = template.format(*(self.word() for _ in range(template.count("{}"))))
        sentences: list[str] = []
        while len(question) + 1 + len(" ".join(sentences)) < target:
            sentences.append(self.sentence())
        answer = " ".join(sentences)
        room = MAX_CHARS - len(question) - 1 - 60  # keep room for a PII suffix
        if len(answer) > room:
            answer = answer[: answer.rfind(" ", 0, room)].rstrip(",.") + "."
        r = self.rng.random()
        if r < EMAIL_FRACTION:
            answer += f" Write to {self.word()}.{self.word()}@{self.word()}.com for details."
        elif r < EMAIL_FRACTION + PHONE_FRACTION:
            answer += f" Call +1 {self.rng.randint(200, 999)}-{self.rng.randint(200, 999)}-{self.rng.randint(1000, 9999)}."
        return {"question": question, "answer": answer}

    def key(self, rec: dict) -> str:
        """The normalised key curate()'s dedup compares: normalise, scrub, prompt + "\\n" + response."""
        q, a = (self._scrub(self._normalize(rec[f])) for f in ("question", "answer"))
        return self._key(q + "\n" + a)

    def near_copy(self, rec: dict) -> tuple[dict, float]:
        """A copy with one or two words replaced / inserted / deleted, Jaccard >= threshold to `rec`."""
        base = shingles(self.key(rec))
        ops = (("replace",), ("replace", "replace"), ("insert",), ("delete",), ("replace", "insert"))
        for attempt in range(50):
            steps = self.rng.choice(ops) if attempt < 10 else self.rng.choice(ops[2:4] + ops[:1])
            field = "answer" if self.rng.random() < 0.8 else "question"
            out = rec[field].split(" ")
            for step in steps:
                editable = [i for i, t in enumerate(out) if t.rstrip(".,?").isalpha()]
                if not editable or (step == "delete" and len(out) < 4):
                    continue
                i = self.rng.choice(editable)
                new = self.word()
                if step == "insert":
                    out.insert(i, new)
                elif step == "delete":
                    del out[i]
                else:  # replace the word, keeping its capital and trailing punctuation
                    word = out[i].rstrip(".,?")
                    out[i] = (new.capitalize() if word[:1].isupper() else new) + out[i][len(word):]
            copy = dict(rec, **{field: " ".join(out)})
            if copy == rec:
                continue
            sim = jaccard(base, shingles(self.key(copy)))
            if sim >= self.threshold:
                return copy, sim
        raise RuntimeError("could not plant a near duplicate above the threshold")


def shingles(key: str) -> set[bytes]:
    """The 5-byte shingle set the engine uses (keys shorter than 5 bytes padded with NULs, as dedup.py does)."""
    b = key.encode("utf-8").ljust(SHINGLE, b"\0")
    return {b[i : i + SHINGLE] for i in range(len(b) - SHINGLE + 1)}


def jaccard(a: set, b: set) -> float:
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def generate(n: int, seed: int, threshold: float, path: Path, progress) -> dict:
    """Write `n` records to `path`; return the ground truth (0-based line indices)."""
    gen = Generator(seed, threshold)
    n_near = round(n * NEAR_DUP_FRACTION)
    n_exact = round(n * EXACT_DUP_FRACTION)
    n_orig = n - n_near - n_exact
    task = progress.add_task("generating records", total=n)
    originals = []
    for i in range(n_orig):
        originals.append(gen.record())
        if i % 1000 == 999:
            progress.advance(task, 1000)
    sources = gen.rng.sample(range(n_orig), n_near + n_exact)
    near_sources, exact_sources = sources[:n_near], sources[n_near:]
    extra, kinds, sims = [], [], []
    for k, s in enumerate(near_sources):
        copy, sim = gen.near_copy(originals[s])
        extra.append((s, copy))
        kinds.append("near")
        sims.append(sim)
        if k % 1000 == 999:
            progress.advance(task, 1000)
    for k, s in enumerate(exact_sources):
        copy = dict(originals[s])
        if k % 2:  # differs only in whitespace: equal after normalize_text
            copy["answer"] = "  " + copy["answer"].replace(" ", "  ", 1) + " \n"
        extra.append((s, copy))
        kinds.append("exact")
    # shuffle everything together: final position of each original and each copy
    order = list(range(n))
    gen.rng.shuffle(order)  # order[final] = generation index (originals first, then copies)
    position = {g: f for f, g in enumerate(order)}
    rows = originals + [c for _, c in extra]
    with open(path, "w", encoding="utf-8") as fh:
        for g in order:
            fh.write(json.dumps(rows[g], ensure_ascii=False) + "\n")
    progress.update(task, completed=n)
    near_pairs = [(position[s], position[n_orig + k]) for k, ((s, _), kind) in enumerate(zip(extra, kinds)) if kind == "near"]
    exact_pairs = [(position[s], position[n_orig + k]) for k, ((s, _), kind) in enumerate(zip(extra, kinds)) if kind == "exact"]
    keys = [None] * n
    for g, row in enumerate(rows):
        keys[position[g]] = gen.key(row)
    return {"near_pairs": near_pairs, "exact_pairs": exact_pairs, "near_similarity": sims, "keys": keys,
            "vocabulary": len(gen.vocab)}


# --------------------------------------------------------------------------------------------------
# child processes: each measures one thing in a fresh interpreter


def child_curate(args) -> dict:
    from training.contracts import CurationSettings
    from training.data import curate

    settings = CurationSettings(near_dup_threshold=args.threshold)
    rss_before = rss_bytes()
    profiler = cProfile.Profile() if args.child == "curate-profile" else None
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    result = curate(args.input, settings)
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "peak_rss": peak_rss_bytes(), "rss_before": rss_before,
           "summary": result.summary.model_dump(mode="json", by_alias=True, exclude={"samples", "description", "top_terms"}),
           "removed": [[int(r["where"].rsplit(":", 1)[1]) - 1, r["reason"]] for r in result.removed]}
    if profiler:
        out["profile"] = top_functions(cprofile_rows(profiler), fields=("function", "calls", "tottime", "cumtime", "engine"))
    return out


def child_ours(args) -> dict:
    from training.data.dedup import NUM_PERM, lsh_params, near_duplicate_pairs

    keys = json.loads(Path(args.input).read_text(encoding="utf-8"))
    rss_before = rss_bytes()
    t0 = time.perf_counter()
    pairs = near_duplicate_pairs(keys, args.threshold)
    seconds = time.perf_counter() - t0
    bands, rows = lsh_params(args.threshold)
    return {"seconds": seconds, "peak_rss": peak_rss_bytes(), "rss_before": rss_before, "n_keys": len(keys),
            "pairs": [[i, j, s] for i, j, s in pairs], "num_perm": NUM_PERM, "bands": bands, "rows": rows}


def datasketch_candidates(keys, threshold, progress=None, task=None):
    """Shingle -> MinHash(num_perm=128).update_batch -> MinHashLSH query-then-insert; candidate pairs."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=DS_NUM_PERM)
    pairs = []
    for i, key in enumerate(keys):
        m = MinHash(num_perm=DS_NUM_PERM)
        m.update_batch(list(shingles(key)))
        pairs.extend((j, i) for j in lsh.query(m))
        lsh.insert(i, m)
        if progress is not None and i % 1000 == 999:
            progress.advance(task, 1000)
    return pairs, lsh


def child_datasketch(args) -> dict:
    import datasketch  # noqa: F401  (imported before the clock and the RSS reading start)

    keys = json.loads(Path(args.input).read_text(encoding="utf-8"))
    rss_before = rss_bytes()
    with make_progress() as progress:
        task = progress.add_task("datasketch baseline", total=len(keys))
        t0 = time.perf_counter()
        candidates, lsh = datasketch_candidates(keys, args.threshold, progress, task)
        seconds = time.perf_counter() - t0
        peak = peak_rss_bytes()
        # exact check of the candidates (as the engine does), timed separately
        t1 = time.perf_counter()
        involved = {i for pair in candidates for i in pair}
        sets = {i: shingles(keys[i]) for i in involved}
        verified = [[i, j, s] for i, j in candidates if (s := jaccard(sets[i], sets[j])) >= args.threshold]
        verify_seconds = time.perf_counter() - t1
    return {"seconds": seconds, "verify_seconds": verify_seconds, "peak_rss": peak, "rss_before": rss_before,
            "n_keys": len(keys), "candidates": [[i, j] for i, j in candidates], "pairs": verified,
            "num_perm": DS_NUM_PERM, "bands": lsh.b, "rows": lsh.r}


def run_child(kind: str, input_path: Path, threshold: float, spinner: str | None = None) -> dict:
    """Run this script as `--child kind` in a fresh interpreter; a spinner while it works if asked."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        result_path = Path(tmp.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--input", str(input_path),
           "--result", str(result_path), "--threshold", str(threshold)]
    try:
        proc = subprocess.Popen(cmd)
        if spinner:
            with make_progress() as progress:
                progress.add_task(spinner, total=None)
                while proc.poll() is None:
                    time.sleep(0.2)
        if proc.wait() != 0:
            raise SystemExit(f"child {kind} failed with exit status {proc.returncode}")
        return json.loads(result_path.read_text())
    finally:
        result_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# analysis


def components(pairs) -> list[frozenset]:
    parent: dict[int, int] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j, *_ in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, set] = {}
    for x in list(parent):
        groups.setdefault(find(x), set()).add(x)
    return [frozenset(g) for g in groups.values() if len(g) > 1]


def recall(planted: list[tuple[int, int]], pairs) -> dict:
    """Planted key pairs that end up in one cluster; unplanted pairs found."""
    cluster_of = {m: c for c in components(pairs) for m in c}
    caught = sum(1 for a, b in planted if a in cluster_of and b in cluster_of.get(a, ()))
    planted_set = {tuple(sorted(p)) for p in planted}
    extra = sum(1 for i, j, *_ in pairs if (min(i, j), max(i, j)) not in planted_set)
    return {"planted": len(planted), "caught": caught, "recall": caught / len(planted) if planted else None,
            "pairs": len(pairs), "unplanted_pairs": extra}


def agreement(ours, theirs) -> dict:
    a = {(min(i, j), max(i, j)) for i, j, *_ in ours}
    b = {(min(i, j), max(i, j)) for i, j, *_ in theirs}
    ca, cb = set(components(ours)), set(components(theirs))
    return {"pairs_both": len(a & b), "pairs_only_ours": len(a - b), "pairs_only_datasketch": len(b - a),
            "clusters_ours": len(ca), "clusters_datasketch": len(cb), "clusters_identical": len(ca & cb)}


# --------------------------------------------------------------------------------------------------
# output


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def report_rows(res: dict) -> list[tuple[str, list[tuple[str, str]]]]:
    """(section, [(label, value)]) shared by the terminal table and the markdown report."""
    m, g, c, nd = res["machine"], res["workload"], res["curate"], res["near_dup_stage"]
    t = res["targets"]
    ours, ds, ag = nd["ours"], nd["datasketch"], nd["agreement"]
    rows = [
        ("Machine", machine_rows(m, PACKAGES)),
        ("Workload", [
            ("records", fmt(g["records"])), ("seed", str(g["seed"])),
            ("input size", f"{fmt(g['input_bytes'] / MB, 1)} MB"),
            ("record length (chars, body)", f"{fmt(g['chars_min'])}-{fmt(g['chars_max'])}, mean {fmt(g['chars_mean'], 1)}"),
            ("planted near duplicates", f"{fmt(g['planted_near'])} ({pct(g['planted_near'] / g['records'])})"),
            ("planted near-dup Jaccard (min / median / max)",
             f"{g['near_jaccard_min']:.3f} / {g['near_jaccard_median']:.3f} / {g['near_jaccard_max']:.3f}"),
            ("planted exact duplicates", fmt(g["planted_exact"])),
            ("threshold (5-byte shingle Jaccard)", f"{g['threshold']:g}"),
            ("generation time", f"{fmt(g['seconds'], 1)} s"),
        ]),
        ("curate() end to end (fresh subprocess, reading included)", [
            ("wall time", f"{fmt(c['seconds'], 2)} s"),
            ("records/s", fmt(c["records_per_s"], 0)),
            ("peak RSS", f"{fmt(c['peak_rss'] / MB, 0)} MB"),
            ("RSS before curate() (interpreter + imports)", f"{fmt(c['rss_before'] / MB, 0)} MB"),
            ("peak RSS / input size", f"{fmt(c['peak_rss_over_input'], 1)}x"),
            ("records in -> after", f"{fmt(c['summary']['records_in'])} -> {fmt(c['summary']['records_after'])}"),
            ("removed (empty / too long / exact / near)",
             " / ".join(fmt(c["summary"]["removed"][k]) for k in ("empty", "too_long", "exact_duplicate", "near_duplicate"))),
            ("PII replaced (email / phone / card / ip)", " / ".join(fmt(c["summary"]["pii"][k]) for k in ("email", "phone", "card", "ip"))),
            ("planted near dups removed (recall)", f"{fmt(c['near_caught'])} / {fmt(g['planted_near'])} ({pct(c['near_recall'])})"),
            ("planted exact dups removed", f"{fmt(c['exact_caught'])} / {fmt(g['planted_exact'])}"),
            ("near-dup removals not planted", fmt(c["near_unplanted"])),
        ]),
        (f"Near-duplicate stage vs datasketch ({nd['scope']})", [
            ("distinct keys compared", fmt(nd["n_keys"])),
            ("engine: near_duplicate_pairs", (f"{fmt(ours['seconds'], 2)} s, +{fmt(ours['extra_rss'] / MB, 0)} MB peak, "
             f"{ours['num_perm']} perms ({ours['bands']} bands x {ours['rows']} rows), exact check included")),
            ("datasketch: MinHash + MinHashLSH", (f"{fmt(ds['seconds'], 2)} s, +{fmt(ds['extra_rss'] / MB, 0)} MB peak, "
             f"{ds['num_perm']} perms ({ds['bands']} bands x {ds['rows']} rows), no exact check")),
            ("datasketch exact check of its candidates (not in its time)", f"{fmt(ds['verify_seconds'], 2)} s"),
            ("speed ratio (datasketch time / engine time)", f"{nd['speed_ratio']:.1f}x"),
            ("memory ratio (datasketch extra peak / engine extra peak)", f"{nd['memory_ratio']:.2f}x"),
            ("recall of planted near dups: engine", f"{fmt(ours['recall']['caught'])} / {fmt(ours['recall']['planted'])} ({pct(ours['recall']['recall'])})"),
            ("recall: datasketch candidates", f"{fmt(ds['recall_candidates']['caught'])} / {fmt(ds['recall_candidates']['planted'])} ({pct(ds['recall_candidates']['recall'])})"),
            ("recall: datasketch, exact-checked", f"{fmt(ds['recall']['caught'])} / {fmt(ds['recall']['planted'])} ({pct(ds['recall']['recall'])})"),
            ("pairs: engine / datasketch candidates / exact-checked",
             f"{fmt(ours['recall']['pairs'])} / {fmt(ds['recall_candidates']['pairs'])} / {fmt(ds['recall']['pairs'])}"),
            ("unplanted pairs: engine / datasketch candidates / exact-checked",
             f"{fmt(ours['recall']['unplanted_pairs'])} / {fmt(ds['recall_candidates']['unplanted_pairs'])} / {fmt(ds['recall']['unplanted_pairs'])}"),
            ("pairs in both / only engine / only datasketch (exact-checked)",
             f"{fmt(ag['pairs_both'])} / {fmt(ag['pairs_only_ours'])} / {fmt(ag['pairs_only_datasketch'])}"),
            ("clusters: engine / datasketch / identical",
             f"{fmt(ag['clusters_ours'])} / {fmt(ag['clusters_datasketch'])} / {fmt(ag['clusters_identical'])}"),
        ]),
    ]
    if nd.get("full"):
        f = nd["full"]
        rows[-1][1].append(("engine on all distinct keys (info)",
                            f"{fmt(f['n_keys'])} keys, {fmt(f['seconds'], 2)} s, recall {pct(f['recall']['recall'])}"))
    rows.append(("Targets", [
        (f"records/s >= {fmt(t['records_per_s']['target'])} on {TARGET_CORES} cores",
         f"{fmt(t['records_per_s']['measured'], 0)} ({t['records_per_s']['ratio']:.2f}x target) -> "
         + ("MET" if t["records_per_s"]["met"] else "MISSED")),
        (f"peak RSS < {fmt(t['peak_rss']['target'] / MB)} MB",
         f"{fmt(t['peak_rss']['measured'] / MB, 0)} MB ({t['peak_rss']['ratio']:.2f}x limit) -> "
         + ("MET" if t["peak_rss"]["met"] else "MISSED")),
    ]))
    return rows


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    print_report("bench_data: curate() and near-duplicate stage", report_rows(res))
    console = Console()
    for title, rows in profile_tables(res):
        prof = Table(title=title)
        for col in ("function", "calls", "own s", "cum s"):
            prof.add_column(col)
        for r in rows:
            prof.add_row(r["function"], fmt(r["calls"]), f"{r['tottime']:.2f}", f"{r['cumtime']:.2f}")
        console.print(prof)


def profile_tables(res: dict) -> list[tuple[str, list[dict]]]:
    prof = res["curate"].get("profile")
    if not prof:
        return []
    run = f"cProfile, separate run of {res['curate']['profile_seconds']:.1f} s under the profiler"
    return [(f"curate() hot spots by own time ({run})", prof["by_own_time"]),
            (f"curate() engine functions by cumulative time ({run})", prof["engine_by_cumulative_time"])]


def render_markdown(res: dict, json_path: Path) -> list[str]:
    lines = ["", f"Generated by `bench/bench_data.py --records {res['workload']['records']}` from `{shown_path(json_path)}`.", ""]
    lines += render_tables(report_rows(res))
    nd = res["near_dup_stage"]
    if nd.get("subsample_reason"):
        lines += [f"Subsample: {nd['subsample_reason']}", ""]
    for title, rows in profile_tables(res):
        lines += [f"### {title}", "", "| function | calls | own s | cum s |", "|---|---|---|---|"]
        lines += [f"| `{r['function']}` | {fmt(r['calls'])} | {r['tottime']:.2f} | {r['cumtime']:.2f} |" for r in rows]
        lines.append("")
    return lines


# --------------------------------------------------------------------------------------------------
# main


def calibrate_datasketch(keys: list[str], threshold: float, sample: int = 2000) -> float:
    """Seconds per key of the datasketch baseline, measured on the first `sample` keys."""
    sample_keys = keys[:sample]
    t0 = time.perf_counter()
    datasketch_candidates(sample_keys, threshold)
    return (time.perf_counter() - t0) / max(1, len(sample_keys))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON figures (default bench/results/bench_data.json)")
    p.add_argument("--results-md", type=Path, default=RESULTS_MD, help="report whose data section is regenerated")
    p.add_argument("--seed", type=int, default=20260125)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--baseline-budget-s", type=float, default=180.0,
                   help="subsample when datasketch is projected to take longer than this on all keys")
    p.add_argument("--profile", action="store_true", help="add a cProfile'd curate run even if the target is met")
    p.add_argument("--keep-data", type=Path, help="also keep the generated .jsonl here")
    p.add_argument("--allow-dirty", action="store_true",
                   help="measure on a tree with uncommitted changes (the JSON and the section then say so)")
    p.add_argument("--quick", action="store_true", help="10,000 records; datasketch subsampled past 20 s (bench/quick/)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        fn = {"curate": child_curate, "curate-profile": child_curate, "ours": child_ours, "datasketch": child_datasketch}[args.child]
        Path(args.result).write_text(json.dumps(fn(args)))
        return

    if args.quick:
        args.records, args.baseline_budget_s = min(args.records, 10_000), min(args.baseline_budget_s, 20.0)
    limit_cores()
    begin(args.allow_dirty)

    from rich.console import Console

    console = Console()
    res: dict = {"machine": machine_info(PACKAGES)}
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        tmp = Path(tmp)
        data_path = tmp / "records.jsonl"
        t0 = time.perf_counter()
        with make_progress() as progress:
            truth = generate(args.records, args.seed, args.threshold, data_path, progress)
        gen_seconds = time.perf_counter() - t0
        if args.keep_data:
            args.keep_data.write_bytes(data_path.read_bytes())
        keys = truth["keys"]
        rows = [json.loads(line) for line in data_path.read_text(encoding="utf-8").splitlines()]
        bodies = [len(r["question"]) + 1 + len(r["answer"]) for r in rows]
        del rows
        sims = truth["near_similarity"]
        res["workload"] = {
            "records": args.records, "seed": args.seed, "threshold": args.threshold, "input_bytes": data_path.stat().st_size,
            "vocabulary": truth["vocabulary"], "chars_min": min(bodies), "chars_max": max(bodies),
            "chars_mean": statistics.fmean(bodies), "planted_near": len(truth["near_pairs"]),
            "planted_exact": len(truth["exact_pairs"]), "near_jaccard_min": min(sims),
            "near_jaccard_median": statistics.median(sims), "near_jaccard_max": max(sims), "seconds": gen_seconds,
        }
        console.print(f"generated {args.records:,} records ({res['workload']['input_bytes'] / MB:.1f} MB) in {gen_seconds:.1f} s")

        # 1. curate() end to end, alone in a fresh interpreter
        c = run_child("curate", data_path, args.threshold, spinner=f"curate() on {args.records:,} records (subprocess)")
        removed = {i: reason for i, reason in c.pop("removed")}
        near_members = {i for pair in truth["near_pairs"] for i in pair}
        c["records_per_s"] = args.records / c["seconds"]
        c["peak_rss_over_input"] = c["peak_rss"] / res["workload"]["input_bytes"]
        c["near_caught"] = sum(1 for a, b in truth["near_pairs"]
                               if (removed.get(a) == "near_duplicate") != (removed.get(b) == "near_duplicate"))
        c["near_recall"] = c["near_caught"] / len(truth["near_pairs"]) if truth["near_pairs"] else None
        c["exact_caught"] = sum(1 for a, b in truth["exact_pairs"] if "exact_duplicate" in (removed.get(a), removed.get(b)))
        c["near_unplanted"] = sum(1 for i, r in removed.items() if r == "near_duplicate" and i not in near_members)
        res["curate"] = c
        console.print(f"curate(): {c['records_per_s']:,.0f} records/s, peak RSS {c['peak_rss'] / MB:,.0f} MB")

        # 2. near-duplicate stage on the keys curate() compares: one per distinct key (exact and
        #    equal-key duplicates are settled before MinHash), in first-seen order
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, len(first))
        distinct = list(first)
        group = list(range(len(keys)))  # a planted copy belongs to its source's group
        for s, d in truth["near_pairs"] + truth["exact_pairs"]:
            group[d] = s
        planted_keys = [(first[keys[a]], first[keys[b]]) for a, b in truth["near_pairs"]]

        with make_progress() as progress:
            progress.add_task("calibrating datasketch", total=None)
            per_key = calibrate_datasketch(distinct, args.threshold)
        projected = per_key * len(distinct)
        nd: dict = {"datasketch_projected_s": projected}
        if projected > args.baseline_budget_s:
            # keep whole groups (a source with its copies) until the budget is used up
            target = max(1000, int(args.baseline_budget_s / per_key) // 1000 * 1000)
            rng = random.Random(args.seed + 7)
            groups: dict[int, list[int]] = {}
            for i, g in enumerate(group):
                groups.setdefault(g, []).append(i)
            chosen_keys: set[int] = set()
            for g in rng.sample(sorted(groups), len(groups)):
                chosen_keys.update(first[keys[i]] for i in groups[g])
                if len(chosen_keys) >= target:
                    break
            sub = sorted(chosen_keys)
            nd["scope"] = f"subsample of {len(sub):,} of {len(distinct):,} distinct keys"
            nd["subsample_reason"] = (
                f"datasketch was projected to take {projected:,.0f} s on all {len(distinct):,} distinct keys "
                f"(> budget {args.baseline_budget_s:g} s, calibrated on the first 2,000), so both methods ran on "
                f"{len(sub):,} keys drawn as whole groups (a source with its planted copies), seed {args.seed + 7}.")
        else:
            sub = list(range(len(distinct)))
            nd["scope"] = "all distinct keys"
        index = {k: n for n, k in enumerate(sub)}
        sub_keys = [distinct[k] for k in sub]
        sub_planted = [(index[a], index[b]) for a, b in planted_keys if a in index and b in index]
        keys_path = tmp / "keys.json"
        keys_path.write_text(json.dumps(sub_keys), encoding="utf-8")

        ours = run_child("ours", keys_path, args.threshold, spinner=f"engine near-dup stage on {len(sub_keys):,} keys")
        ours["extra_rss"] = ours["peak_rss"] - ours["rss_before"]
        ours["recall"] = recall(sub_planted, ours["pairs"])
        ds = run_child("datasketch", keys_path, args.threshold)
        ds["extra_rss"] = ds["peak_rss"] - ds["rss_before"]
        ds["recall"] = recall(sub_planted, ds["pairs"])
        ds["recall_candidates"] = recall(sub_planted, ds["candidates"])
        nd.update(n_keys=len(sub_keys), speed_ratio=ds["seconds"] / ours["seconds"],
                  memory_ratio=ds["extra_rss"] / max(1, ours["extra_rss"]), agreement=agreement(ours["pairs"], ds["pairs"]))
        if len(sub) < len(distinct):
            full_path = tmp / "keys_full.json"
            full_path.write_text(json.dumps(distinct), encoding="utf-8")
            full = run_child("ours", full_path, args.threshold, spinner=f"engine near-dup stage on all {len(distinct):,} keys")
            nd["full"] = {"n_keys": len(distinct), "seconds": full["seconds"], "recall": recall(planted_keys, full["pairs"])}
        for d in (ours, ds):
            d.pop("pairs"), d.pop("candidates", None)
        nd.update(ours=ours, datasketch=ds)
        res["near_dup_stage"] = nd

        res["targets"] = {
            "records_per_s": {"target": TARGET_RECORDS_PER_S, "measured": c["records_per_s"],
                              "ratio": c["records_per_s"] / TARGET_RECORDS_PER_S, "met": c["records_per_s"] >= TARGET_RECORDS_PER_S},
            "peak_rss": {"target": TARGET_PEAK_BYTES, "measured": c["peak_rss"],
                         "ratio": c["peak_rss"] / TARGET_PEAK_BYTES, "met": c["peak_rss"] < TARGET_PEAK_BYTES},
        }
        if args.profile or not res["targets"]["records_per_s"]["met"]:
            prof = run_child("curate-profile", data_path, args.threshold, spinner="cProfile'd curate() (for hot spots only)")
            c["profile"] = prof["profile"]
            c["profile_seconds"] = prof["seconds"]

    res["machine"]["loadavg_end"] = os.getloadavg()[0]
    t, nd = res["targets"], res["near_dup_stage"]
    res["summary"] = [
        {"target": f"curate() of {args.records:,} records: >= {TARGET_RECORDS_PER_S:,} records/s on {TARGET_CORES} cores",
         "figure": f"{t['records_per_s']['measured']:,.0f} records/s", "met": t["records_per_s"]["met"]},
        {"target": f"curate() of {args.records:,} records: peak RSS < {TARGET_PEAK_BYTES / 1e9:g} GB",
         "figure": f"{t['peak_rss']['measured'] / MB:,.0f} MB", "met": t["peak_rss"]["met"]},
        {"target": "near-duplicate stage against datasketch MinHash LSH (no target)",
         "figure": f"{nd['speed_ratio']:.1f}x its speed, recall {nd['ours']['recall']['recall']:.3f} vs {nd['datasketch']['recall']['recall']:.3f}",
         "met": None}]
    write_json(args.out, res)
    write_section("bench_data", render_markdown(res, args.out), args.results_md)
    print_table(res)
    console.print(f"figures: {args.out}   report: {args.results_md}")


if __name__ == "__main__":
    main()
