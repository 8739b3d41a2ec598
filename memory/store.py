"""`MemoryStore`: the agents' memory, a persistent Chroma index over the workspace's artefacts.

Collections (cosine space, one embedding function for all):
- `datasets`      one entry per curated dataset (id = fingerprint): its description, schema, samples;
- `evaluations`   one entry per evaluated run (id = run_id): what was trained on what, and how it did;
- `lessons`       short notes written after a run, linked to its run_id and dataset;
- `eval_records`  every validation/test record of every dataset, to notice training data that overlaps
                  an earlier evaluation set by meaning (contamination), not only by hash.

The files are the truth and Chroma is the index: every entry is made from `datasets/<fp>/`,
`runs/<id>/{evaluation,plan,gate}.json`, `runs/<id>/lessons.jsonl` and the registry's deployments,
so `rebuild()` can always recreate it. Two processes writing to one Chroma path damage its index, and
a read beside a write can fail (`Error finding id`), so every write holds the workspace's memory lock
(`memory.lock.WriterLock`) and every read a shared lock on the same file (`memory.lock.ReaderLock`),
re-opening the client when another process wrote since.

With a Chroma server (`url`, else $MODELCREW_CHROMA_URL; `memory.server`) memory is the server's
collections instead: the same four names in its default tenant and database, so every workspace that
points at one server shares one memory (a dataset curated twice has one fingerprint, one entry). The
server serialises writers from any number of machines, so no file lock is taken; the embedding that
built the collections is the one recorded in their configuration, and every workspace must use it.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Literal

from pydantic import BaseModel

from memory import documents as docs
from memory.embedding import describe, resolve
from memory.lock import ReaderLock, WriterLock
from memory.server import ServerUnreachable, parse_url, server_url, unreachable
from training.batches import read_split
from training.contracts import DatasetSummary, Evaluation, GateVerdict, TrainPlan
from training.data.store import datasets_dir, list_datasets
from training.runs import Run, all_runs, evaluated_runs
from training.errors import InputError, ModelcrewError
from training.gate import lower_is_better

Kind = Literal["datasets", "evaluations", "lessons", "eval_records"]
KINDS: tuple[str, ...] = ("datasets", "evaluations", "lessons", "eval_records")
MAX_K = 100
BATCH = 500  # entries per upsert (Chroma caps a batch; embedding in chunks also bounds memory)
CENTROID_MIN, CENTROID_MAX = 32, 512  # records behind a dataset's vector
CONTAMINATION_THRESHOLD = 0.85  # cosine similarity above which a training record restates an eval record


class Hit(BaseModel):
    id: str
    kind: str
    distance: float
    similarity: float
    summary: str
    metadata: dict


class SimilarDataset(BaseModel):
    fingerprint: str
    similarity: float
    source: str
    format: str
    records: int
    description: str


class PastRun(BaseModel):
    run_id: str
    dataset: str
    base_model: str
    method: str
    metrics: dict[str, float]
    gate: str
    deployed: bool
    created_at: str
    plan: TrainPlan | None


class BestConfig(BaseModel):
    """The plan of the best-scoring earlier run on the most similar data that has runs."""

    run_id: str
    dataset: str
    similarity: float
    metric: str
    value: float
    plan: TrainPlan
    passed: bool = True  # whether that run passed its gate
    tried_lrs: list[float] = []  # learning rates already tried on that data


class Overlap(BaseModel):
    record: int  # index into the records given
    text: str
    dataset: str  # the dataset whose evaluation set it overlaps
    split: str
    eval_record_id: str
    similarity: float
    exact: bool


class Check(BaseModel):
    name: str
    ok: bool
    detail: str


class Doctor(BaseModel):
    ok: bool
    checks: list[Check]
    advice: str


class MemoryStore:
    """Open (lazily) the memory index of `workspace`; `embedding` as in `memory.embedding.resolve`; `url`, a
    Chroma server's (default $MODELCREW_CHROMA_URL), to use its shared collections instead of the workspace's."""

    def __init__(self, workspace: Path, embedding: str | None = None, lock_timeout: float | None = None,
                 url: str | None = None) -> None:
        self.workspace = Path(workspace)
        self.root = self.workspace / "memory"
        self.path = self.root / "chroma"
        self.url = server_url(url)
        self.where = self.url or str(self.path)  # what messages name: the server, or the index on disk
        self.ef, self.ef_identity = resolve(embedding)
        timeout = lock_timeout if lock_timeout is not None else float(os.environ.get("MODELCREW_MEMORY_LOCK_TIMEOUT", 120))
        self.lock = WriterLock(self.root / "write.lock", timeout)
        self.read_lock = ReaderLock(self.lock)
        self._checked_with = None  # the client this store's embedding was checked against
        self._handles: dict = {}  # collection handles of the current client
        self._handles_of = None

    # ---- opening ----------------------------------------------------------------------------------

    @property
    def _ident_file(self) -> Path:
        return self.root / "embedding.json"

    def built_with(self) -> dict | None:
        """The embedding function that built this index (None: no index yet)."""
        if self.url:
            with self._reading():
                return _server_built_with(self._open())
        if not self._ident_file.exists():
            return None
        return json.loads(self._ident_file.read_text(encoding="utf-8"))

    def _check_embedding(self) -> None:
        self._compare_embedding(self.built_with())

    def _compare_embedding(self, built: dict | None) -> None:
        if built is not None and built != self.ef_identity:
            if self.url:
                raise InputError(f"memory: the collections on the Chroma server at {self.url} were built with the embedding "
                                 f"{describe(built)}, not {describe(self.ef_identity)}; every workspace sharing a server "
                                 "must use the same one (MODELCREW_EMBEDDING)")
            raise InputError(f"memory: the index in {self.path} was built with the embedding {describe(built)}, not "
                             f"{describe(self.ef_identity)}; open it with the same one (MODELCREW_EMBEDDING) or run "
                             "`modelcrew memory rebuild` to re-embed everything with the new one")

    def _sqlite_mtime(self) -> tuple[int, int] | None:
        """When and how the index was last written (its sqlite file changes with every write)."""
        try:
            st = (self.path / "chroma.sqlite3").stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def _open(self, fresh: bool = False):
        """The process's Chroma client of this index, checked against this store's embedding; re-opened when
        another process wrote since (Chroma caches the index in memory) or when `fresh`."""
        with _CLIENTS_LOCK:
            client, opened_at = _CLIENTS.get(self.where, (None, None))
            reuse = client is not None and (self.url or (not fresh and self._sqlite_mtime() == opened_at))
            if not reuse:  # (a server's client always sees its latest writes)
                self.close()
                if self.url:
                    client = _new_http_client(self.url)
                else:
                    self._check_embedding()
                    self.path.mkdir(parents=True, exist_ok=True)
                    try:
                        client = _new_client(self.path)
                    except Exception as err:  # a damaged sqlite file or segment raises anything
                        raise open_error(err, self.path) from None
                _CLIENTS[self.where] = (client, self._sqlite_mtime() if not self.url else None)
            if self._checked_with is not client:  # stores of one index share a client, not an embedding
                self._compare_embedding(_server_built_with(client) if self.url else self.built_with())
                self._checked_with = client
            return client

    def close(self) -> None:
        """Drop this process's client of the index (every store of the same path shares it)."""
        client, _ = _CLIENTS.pop(self.where, (None, None))
        if client is not None:
            _stop(client)

    def _collection(self, kind: str, create: bool = False):
        client = self._open()
        if client is not self._handles_of:  # handles belong to one client
            self._handles, self._handles_of = {}, client
        if kind in self._handles:
            return self._handles[kind]
        if create:
            col = client.get_or_create_collection(kind, embedding_function=self.ef, configuration={"hnsw": {"space": "cosine"}})
        else:
            try:
                col = client.get_collection(kind, embedding_function=self.ef)
            except Exception as err:  # not created yet: nothing stored of this kind
                if _is_unreachable(err):
                    raise
                return None
        self._handles[kind] = col
        return col

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the workspace's write lock, on a client opened after taking it (sees every earlier write).
        A server needs no lock: it applies its clients' writes one at a time."""
        if self.url:
            with self._reading():
                yield
            return
        with self.lock:
            self._check_embedding()
            self._open(fresh=True)
            if not self._ident_file.exists():
                self._ident_file.write_text(json.dumps(self.ef_identity, indent=2), encoding="utf-8")
            try:
                yield
            finally:  # this process's client saw its own write: no need to re-open for it
                if self.where in _CLIENTS:
                    _CLIENTS[self.where] = (_CLIENTS[self.where][0], self._sqlite_mtime())

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Hold a shared lock while reading (no writer runs meanwhile); `_open` inside it sees every finished write.
        With a server: no lock, and a lost connection becomes one line naming the server."""
        if self.url:
            try:
                yield
            except ServerUnreachable:
                raise
            except Exception as err:
                if _is_unreachable(err):
                    raise unreachable(self.url, f"{type(err).__name__}: {str(err)[:120]}") from None
                raise
            return
        if self.lock.held_here:  # this store is writing: it holds the exclusive lock already
            yield
            return
        with self.read_lock:
            yield

    def _upsert(self, kind: str, ids: list[str], documents: list[str], metadatas: list[dict],
                embeddings: list[list[float]] | None = None) -> None:
        col = self._collection(kind, create=True)
        for i in range(0, len(ids), BATCH):
            col.upsert(ids=ids[i:i + BATCH], documents=documents[i:i + BATCH], metadatas=metadatas[i:i + BATCH],
                       **({"embeddings": embeddings[i:i + BATCH]} if embeddings is not None else {}))

    # ---- writing ----------------------------------------------------------------------------------

    def add_dataset(self, summary: DatasetSummary) -> None:
        """Index a curated dataset and its validation/test records (read from `datasets/<fp>/`).

        A dataset's vector is the centroid of its records' vectors (its evaluation records, topped up
        from training records when there are few): two samples of one distribution land close
        together whatever their size or wording of the summary, which a summary's text alone does not.
        """
        doc, meta = docs.dataset_document(summary)
        ids, texts, metas = self._eval_record_entries(summary.fingerprint)
        vectors = [list(map(float, v)) for v in self.ef(texts)] if texts else []
        centroid = self._centroid(summary.fingerprint, vectors)
        with self._writing():
            self._upsert("datasets", [summary.fingerprint], [doc], [meta], [centroid] if centroid else None)
            if ids:
                self._upsert("eval_records", ids, texts, metas, vectors)

    def _centroid(self, fingerprint: str, vectors: list[list[float]]) -> list[float] | None:
        import numpy as np

        if len(vectors) < CENTROID_MIN:
            train = read_split(datasets_dir(self.workspace) / fingerprint, "train")[: CENTROID_MIN - len(vectors)]
            extra = [docs.record_text(r)[:2000] for r in train if docs.record_text(r).strip()]
            vectors = vectors + ([list(map(float, v)) for v in self.ef(extra)] if extra else [])
        if not vectors:
            return None
        mean = np.asarray(vectors[:CENTROID_MAX], dtype=np.float64).mean(axis=0)
        norm = float(np.linalg.norm(mean))
        return (mean / norm).tolist() if norm else None

    def centroid_distance(self, new: list[dict] | list[str], old: list[dict] | list[str]) -> float:
        """1 - cosine similarity of the two record sets' embedding centroids (0: same topics; ~1: unrelated).

        Drift is measured this way by the retraining loop. Each side is capped at CENTROID_MAX records
        (callers pass them in hash order, a random sample), so the cost does not grow with the data.
        """
        import numpy as np

        def centroid(records) -> np.ndarray:
            texts = [r if isinstance(r, str) else docs.record_text(r) for r in records][:CENTROID_MAX]
            texts = [t[:2000] for t in texts if t.strip()]
            if not texts:
                raise InputError("drift: a record set to compare is empty")
            mean = np.asarray(self.ef(texts), dtype=np.float64).mean(axis=0)
            return mean / (np.linalg.norm(mean) or 1.0)

        return round(float(1.0 - centroid(new) @ centroid(old)), 4)

    def _eval_record_entries(self, fingerprint: str) -> tuple[list[str], list[str], list[dict]]:
        ids, texts, metas = [], [], []
        for split in ("val", "test"):
            for record in read_split(datasets_dir(self.workspace) / fingerprint, split):
                text = docs.record_text(record)
                if not text.strip():
                    continue
                rid = str(record.get("id", len(ids)))
                ids.append(f"{fingerprint}:{rid}")
                texts.append(text[:2000])
                metas.append({"dataset": fingerprint, "split": split, "record_id": rid, "hash": docs.content_hash(text)})
        return ids, texts, metas

    def add_evaluation(self, evaluation: Evaluation, plan: TrainPlan | None = None, gate: GateVerdict | None = None,
                       deployed: bool = False) -> None:
        self.add_evaluations([(evaluation, plan, gate, deployed)])

    def add_evaluations(self, items: list[tuple[Evaluation, TrainPlan | None, GateVerdict | None, bool]]) -> None:
        """Index several evaluations in one locked write (rebuilds and imports)."""
        descriptions: dict[str, str] = {}
        ids, documents, metadatas = [], [], []
        for evaluation, plan, gate, deployed in items:
            if evaluation.dataset not in descriptions:
                try:
                    path = datasets_dir(self.workspace) / evaluation.dataset / "summary.json"
                    descriptions[evaluation.dataset] = json.loads(path.read_text(encoding="utf-8"))["description"]
                except (OSError, ValueError, KeyError):
                    descriptions[evaluation.dataset] = ""
            doc, meta = docs.evaluation_document(evaluation, plan, gate, deployed, descriptions[evaluation.dataset])
            ids.append(evaluation.run_id)
            documents.append(doc)
            metadatas.append(meta)
        with self._writing():
            self._upsert("evaluations", ids, documents, metadatas)

    def add_lesson(self, text: str, run_id: str, dataset: str, record: bool = True, author: str = "unknown") -> str:
        """Store a lesson written by `author` (the LLM that drove the agents, or a person), and with `record`
        append it to the run's lessons.jsonl, its source of truth."""
        text = " ".join(str(text).split())
        if not text:
            raise InputError("lesson: the text is empty")
        lid = docs.lesson_id(run_id, text)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._writing():
            if record:
                Run(self.workspace, run_id).add_lesson({"text": text, "dataset": dataset, "created_at": created, "author": author})
            self._upsert("lessons", [lid], [text], [{"run_id": run_id, "dataset": dataset, "created_at": created, "author": author,
                                                    "summary": text[:200]}])
        return lid

    # ---- reading ----------------------------------------------------------------------------------

    def count(self, kind: str) -> int:
        kind = check_kind(kind)
        with self._reading():
            col = self._collection(kind)
            return col.count() if col is not None else 0

    def search(self, text: str, kind: str, k: int = 5, where: dict | None = None,
               vector: list[float] | None = None) -> list[Hit]:
        """The k entries of `kind` nearest to `text` (or to `vector`, a ready embedding)."""
        kind, k = check_kind(kind), check_k(k)
        query = {"query_embeddings": [vector]} if vector is not None else {"query_texts": [check_query(text)]}
        with self._reading():
            col = self._collection(kind)
            if col is None:
                return []
            res = col.query(**query, n_results=k, where=where or None, include=["documents", "metadatas", "distances"])
        hits = []
        for id_, doc, meta, dist in zip(res["ids"][0], res["documents"][0], res["metadatas"][0], res["distances"][0]):
            summary = (meta or {}).get("summary") or docs._clip(doc or "", 160)
            hits.append(Hit(id=id_, kind=kind, distance=round(dist, 4), similarity=round(1 - dist, 4),
                            summary=str(summary), metadata=dict(meta or {})))
        return hits

    def show(self, id_: str) -> dict | None:
        """The entry with this id in any collection: {kind, id, document, metadata}."""
        with self._reading():
            for kind in KINDS:
                col = self._collection(kind)
                if col is None:
                    continue
                got = col.get(ids=[id_], include=["documents", "metadatas"])
                if got["ids"]:
                    return {"kind": kind, "id": id_, "document": got["documents"][0], "metadata": got["metadatas"][0]}
        return None

    def similar_datasets(self, query: DatasetSummary | str, k: int = 5, include_self: bool = False) -> list[SimilarDataset]:
        own = query.fingerprint if isinstance(query, DatasetSummary) else None
        vector = self._dataset_vector(own) if own else None
        if own and vector is None:
            return []
        hits = self.search(query if isinstance(query, str) else "", "datasets", k=min(MAX_K, k + 1 if own else k), vector=vector)
        out = [SimilarDataset(fingerprint=h.id, similarity=h.similarity, source=h.metadata.get("source", ""),
                              format=h.metadata.get("format", ""), records=int(h.metadata.get("records_after", 0)),
                              description=h.metadata.get("summary", "")) for h in hits if include_self or h.id != own]
        return out[:k]

    def _dataset_vector(self, fingerprint: str) -> list[float] | None:
        """The stored centroid of a dataset, else one computed from its files (a dataset not indexed yet)."""
        with self._reading():
            col = self._collection("datasets")
            got = col.get(ids=[fingerprint], include=["embeddings"]) if col is not None else None
        if got and got["ids"] and got["embeddings"] is not None and len(got["embeddings"]):
            return [float(x) for x in got["embeddings"][0]]
        _, texts, _ = self._eval_record_entries(fingerprint)
        return self._centroid(fingerprint, [list(map(float, v)) for v in self.ef(texts)] if texts else [])

    def history(self, fingerprint: str | None = None, model: str | None = None, limit: int = 1000) -> list[PastRun]:
        """Every evaluated run (optionally on one dataset and/or from one base model), oldest first."""
        clauses = [c for c in ({"dataset": fingerprint} if fingerprint else None, {"base_model": model} if model else None) if c]
        where = clauses[0] if len(clauses) == 1 else ({"$and": clauses} if clauses else None)
        with self._reading():
            col = self._collection("evaluations")
            if col is None:
                return []
            got = col.get(where=where, include=["metadatas"], limit=limit)
        runs = [past_run(id_, meta) for id_, meta in zip(got["ids"], got["metadatas"])]
        return sorted(runs, key=lambda r: (r.created_at, r.run_id))

    def best_known_config(self, summary: DatasetSummary, metric: str = "val_perplexity", min_similarity: float = 0.5,
                          k: int = 5, same_data: float = 0.9) -> BestConfig | None:
        """The plan of the best run (by `metric`) on the most similar dataset that has runs with a plan.

        Datasets at least `same_data` similar to the most similar one count as versions of the same data
        (a retraining loop's rounds): their runs are ranked together, and `tried_lrs` covers them all.
        """
        candidates = self.similar_datasets(summary, k=k, include_self=True)
        if not any(c.fingerprint == summary.fingerprint for c in candidates) and self.history(summary.fingerprint):
            candidates.insert(0, SimilarDataset(fingerprint=summary.fingerprint, similarity=1.0, source=summary.source,
                                                format=summary.format, records=summary.records_after, description=""))
        with_runs = []
        for cand in sorted(candidates, key=lambda c: -c.similarity):
            if cand.similarity < min_similarity:
                break
            runs = [r for r in self.history(cand.fingerprint) if r.plan is not None and metric in r.metrics]
            if runs:
                with_runs.append((cand, runs))
        if not with_runs:
            return None
        nearest = with_runs[0][0].fingerprint
        pooled = [(c, run) for c, runs in with_runs if c.fingerprint == nearest or c.similarity >= same_data for run in runs]
        cand, pick = (min if lower_is_better(metric) else max)(pooled, key=lambda cr: cr[1].metrics[metric])
        return BestConfig(run_id=pick.run_id, dataset=cand.fingerprint, similarity=round(cand.similarity, 4), metric=metric,
                          value=pick.metrics[metric], plan=pick.plan, passed=pick.gate != "failed",
                          tried_lrs=sorted({r.plan.lr for _, r in pooled}))

    def contamination(self, records: list[dict] | list[str], threshold: float = CONTAMINATION_THRESHOLD,
                      exclude_dataset: str | list[str] | None = None) -> list[Overlap]:
        """Records that restate an earlier evaluation record (cosine similarity >= threshold, or the same text).

        `exclude_dataset`: a dataset's own evaluation split is not contamination of its training split (nor
        are the evaluation splits of its earlier versions, e.g. a retraining loop's earlier rounds).
        """
        if not 0 < threshold <= 1:
            raise InputError(f"threshold: {threshold} must be in (0, 1]")
        if not records or self.count("eval_records") == 0:
            return []
        texts = [r if isinstance(r, str) else docs.record_text(r) for r in records]
        excluded = [exclude_dataset] if isinstance(exclude_dataset, str) else list(exclude_dataset or [])
        where = ({"dataset": {"$ne": excluded[0]}} if len(excluded) == 1 else
                 {"dataset": {"$nin": excluded}} if excluded else None)
        overlaps = []
        for start in range(0, len(texts), BATCH):
            chunk = [t[:2000] for t in texts[start:start + BATCH]]
            vectors = [list(map(float, v)) for v in self.ef(chunk)]  # embedded before taking the lock: a writer waits less
            with self._reading():
                col = self._collection("eval_records")
                if col is None:  # deleted by a rebuild meanwhile
                    return overlaps
                res = col.query(query_embeddings=vectors, n_results=1, where=where, include=["metadatas", "distances"])
            for i, (ids, metas, dists) in enumerate(zip(res["ids"], res["metadatas"], res["distances"])):
                if not ids:
                    continue
                exact = metas[0].get("hash") == docs.content_hash(texts[start + i])
                similarity = 1 - dists[0]
                if exact or similarity >= threshold:
                    overlaps.append(Overlap(record=start + i, text=docs._clip(texts[start + i], 200), dataset=metas[0]["dataset"],
                                            split=metas[0]["split"], eval_record_id=ids[0], similarity=round(similarity, 4),
                                            exact=exact))
        return overlaps

    def stats(self) -> dict:
        """Entries per collection, the embedding, and the index's size on disk (0 with a server: it is the server's)."""
        size = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file()) if self.path.exists() and not self.url else 0
        built = self.built_with()
        return {"path": self.where, "embedding": describe(built or self.ef_identity),
                "counts": {kind: self.count(kind) for kind in KINDS}, "disk_bytes": size}

    # ---- the files are the truth ------------------------------------------------------------------

    def artefact_ids(self) -> dict[str, list[str]]:
        """The ids each collection should hold for this workspace, read from its files."""
        summaries = list_datasets(self.workspace)
        return {
            "datasets": [s.fingerprint for s in summaries],
            "evaluations": [run.run_id for run in evaluated_runs(self.workspace)],
            "lessons": sorted({docs.lesson_id(run.run_id, row["text"]) for run in all_runs(self.workspace) for row in run.lessons()}),
            "eval_records": [id_ for s in summaries for id_ in self._eval_record_entries(s.fingerprint)[0]],
        }

    def artefacts(self) -> dict[str, int]:
        """How many entries each collection should hold, counted from the workspace's files."""
        return {kind: len(ids) for kind, ids in self.artefact_ids().items()}

    def _present(self, kind: str, ids: list[str]) -> int:
        """How many of `ids` the collection holds."""
        found = 0
        with self._reading():
            col = self._collection(kind)
            for i in range(0, len(ids) if col is not None else 0, BATCH):
                found += len(col.get(ids=ids[i:i + BATCH], include=[])["ids"])
        return found

    def rebuild(self, progress=None) -> dict:
        """Delete the index and re-create every entry from the workspace's artefacts.

        With a server the collections are shared with other workspaces: nothing is deleted, every entry
        of this workspace is written again (upserts: the same ids, re-embedded)."""
        if not self.url:
            with self.lock:
                self.close()
                _forget_cached_systems()
                shutil.rmtree(self.path, ignore_errors=True)
                self._ident_file.unlink(missing_ok=True)
        summaries = list_datasets(self.workspace)
        for summary in summaries:
            self.add_dataset(summary)
            progress and progress(f"dataset {summary.fingerprint}")
        evaluated = evaluated_runs(self.workspace)
        if evaluated:
            self.add_evaluations([load_run_artefacts(run) for run in evaluated])
            progress and progress(f"{len(evaluated)} evaluations")
        for run in all_runs(self.workspace):
            for row in run.lessons():
                self.add_lesson(row["text"], run.run_id, row.get("dataset", ""), record=False, author=row.get("author", "unknown"))
        return self.stats()

    def doctor(self) -> Doctor:
        if self.url:
            return self._doctor_server()
        checks: list[Check] = []
        built = self.built_with()
        if not self.path.exists():
            checks.append(Check(name="index", ok=False, detail=f"no index at {self.path}"))
        else:
            try:
                self._check_embedding()
                checks.append(Check(name="embedding", ok=True, detail=describe(built or self.ef_identity)))
                counts = {kind: self.count(kind) for kind in KINDS}
                checks.append(Check(name="index", ok=True, detail=f"opens ({self.path})"))
                expected = self.artefacts()
                for kind in KINDS:
                    ok = counts[kind] == expected[kind]
                    checks.append(Check(name=f"count {kind}", ok=ok, detail=f"{counts[kind]} indexed, {expected[kind]} in the artefacts"))
                if counts["datasets"]:
                    self.search("probe", "datasets", k=1)
                    checks.append(Check(name="query", ok=True, detail="a search runs"))
            except InputError as err:
                checks.append(Check(name="embedding", ok=False, detail=str(err)))
            except Exception as err:  # a damaged index raises anything from sqlite or the HNSW reader
                checks.append(Check(name="index", ok=False, detail=f"cannot be read: {type(err).__name__}: {str(err)[:200]}"))
        ok = all(c.ok for c in checks)
        advice = "memory is consistent with the workspace" if ok else "run `modelcrew memory rebuild` (rebuilds the index from the workspace's files)"
        return Doctor(ok=ok, checks=checks, advice=advice)

    def _doctor_server(self) -> Doctor:
        """Every entry of this workspace is on the server (others' entries are theirs: not counted against it).
        An unreachable server raises (one line naming it), as every command does."""
        built = self.built_with()
        checks = [Check(name="server", ok=True, detail=f"answers ({self.url})")]
        try:
            self._compare_embedding(built)
        except InputError as err:
            checks.append(Check(name="embedding", ok=False, detail=str(err)))
            return Doctor(ok=False, checks=checks, advice="use the embedding the server's collections were built with")
        checks.append(Check(name="embedding", ok=True, detail=describe(built or self.ef_identity)))
        expected = self.artefact_ids()
        for kind in KINDS:
            ids = sorted(set(expected[kind]))
            present = self._present(kind, ids)
            checks.append(Check(name=f"count {kind}", ok=present == len(ids),
                                detail=f"{present} of this workspace's {len(ids)} indexed; {self.count(kind)} on the server (shared)"))
        if self.count("datasets"):
            self.search("probe", "datasets", k=1)
            checks.append(Check(name="query", ok=True, detail="a search runs"))
        ok = all(c.ok for c in checks)
        advice = ("memory holds every entry of the workspace" if ok else
                  "run `modelcrew memory rebuild` (writes this workspace's entries to the server again)")
        return Doctor(ok=ok, checks=checks, advice=advice)


# One client per index path and process, shared by every MemoryStore: Chroma shares one system (and its
# in-memory index) per path in a process, so a store that re-opens after another process wrote must
# replace that system for all of them, not only drop its own reference to it.
_CLIENTS: dict[str, tuple[object, tuple[int, int] | None]] = {}
_CLIENTS_LOCK = threading.RLock()


def _new_client(path: Path):
    import chromadb
    from chromadb.config import Settings

    return chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))


def _stop(client) -> None:
    """Stop the client's system for good (not only drop a reference), so the next client loads the index anew."""
    from chromadb.api.shared_system_client import SharedSystemClient

    try:
        system = SharedSystemClient._identifier_to_system.pop(client._identifier, None)
        SharedSystemClient._identifier_to_refcount.pop(client._identifier, None)
        if system is not None:
            system.stop()
    except Exception:  # a system already stopped
        pass


def _new_http_client(url: str):
    """A client of the Chroma server at `url` (its default tenant and database: shared by every workspace)."""
    import chromadb
    from chromadb.config import Settings

    host, port, ssl = parse_url(url)
    try:
        return chromadb.HttpClient(host=host, port=port, ssl=ssl, settings=Settings(anonymized_telemetry=False))
    except Exception as err:  # refused, timed out, not a Chroma server
        raise unreachable(url, f"{type(err).__name__}: {str(err)[:120]}") from None


def _server_built_with(client) -> dict | None:
    """The embedding recorded in the configuration of the server's memory collections (None: none yet)."""
    for col in client.list_collections():
        if col.name in KINDS:
            ef = (col.configuration_json or {}).get("embedding_function") or {}
            if ef.get("name"):
                return {"name": ef["name"], "config": ef.get("config") or {}}
    return None


def _is_unreachable(err: Exception) -> bool:
    """Whether a client call failed for want of the server (not for what it asked)."""
    import httpx

    return isinstance(err, (httpx.TransportError, ConnectionError)) or "Could not connect to a Chroma server" in str(err)


def _forget_cached_systems() -> None:
    """Chroma shares one system per path within a process; drop it so a deleted index is not reused."""
    from chromadb.api.shared_system_client import SharedSystemClient

    SharedSystemClient.clear_system_cache()


def load_run_artefacts(run: Run) -> tuple[Evaluation, TrainPlan | None, GateVerdict | None, bool]:
    """What memory indexes about an evaluated run (`rebuild` re-reads it from the files, their source of truth)."""
    deployment = run.deployment()
    return run.evaluation(), run.plan(), run.gate(), bool(deployment and deployment.deployed)


def past_run(run_id: str, meta: dict) -> PastRun:
    plan = TrainPlan.model_validate_json(meta["plan_json"]) if meta.get("plan_json") else None
    return PastRun(run_id=run_id, dataset=meta.get("dataset", ""), base_model=meta.get("base_model", ""),
                   method=meta.get("method", ""), metrics={k[2:]: v for k, v in meta.items() if k.startswith("m_")},
                   gate=meta.get("gate", "none"), deployed=bool(meta.get("deployed")), created_at=meta.get("created_at", ""),
                   plan=plan)


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise InputError(f"kind: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    return kind


def check_query(text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InputError("query: the search text is empty")
    return text.strip()


def check_k(k: int) -> int:
    if not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InputError(f"k: {k} is out of range; use 1 to {MAX_K}")
    return k


def open_error(err: Exception, path: Path) -> ModelcrewError:
    return ModelcrewError(f"memory: cannot open the index at {path} ({type(err).__name__}: {str(err)[:200]}); "
                          "run `modelcrew memory doctor`")
