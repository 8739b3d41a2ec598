"""Exact and near-duplicate detection: normalised-text keys, then MinHash-LSH on 5-byte shingles.

Near duplicates are pairs whose shingle sets have a Jaccard similarity at or above a threshold. Finding
them is done in three vectorised steps (numpy, no per-shingle Python):

1. shingle: every 5-byte window of each record's normalised text, packed into an integer;
2. MinHash: `num_perm` hash functions h(x) = a*x + b (mod 2**32, a odd, so each is a permutation of
   the 32-bit values) and the minimum per record, computed for a whole batch with `np.minimum.reduceat`;
3. LSH: signatures cut into `bands` of `rows`; records sharing one band are candidates, and every
   candidate pair is then checked with the exact Jaccard of its shingle sets, so the threshold is exact.

Clusters are the connected components of verified pairs. Nothing depends on input order: candidate
pairs are symmetric, the checks are exact, and the caller keeps the member with the smallest content
hash. `bench/bench_data.py` compares the clusters and speed with datasketch's MinHash + MinHashLSH.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

SHINGLE_BYTES = 5
NUM_PERM = 64
_SEED = 20260125
_NOT_WORD = re.compile(r"[\W_]+")
# In an LSH bucket larger than this, each member is checked against the first _MAX_BUCKET members only,
# which bounds the work on pathological data (thousands of records sharing a band) at some cost in recall.
_MAX_BUCKET = 200
_BAND_MIX = np.random.default_rng(_SEED + 1).integers(1, 2**63, size=NUM_PERM, dtype=np.uint64) | np.uint64(1)


# every ASCII character that is not a letter or digit, mapped to a space (what _NOT_WORD matches in ASCII)
_ASCII_NOT_WORD = str.maketrans({chr(c): " " for c in range(128) if not chr(c).isalnum()})


def normalized_key(text: str) -> str:
    """Case-folded text with punctuation and runs of whitespace collapsed to single spaces."""
    folded = text.casefold()
    if folded.isascii():  # str.translate is ~2x faster than the regex, and gives the same key
        return " ".join(folded.translate(_ASCII_NOT_WORD).split())
    return _NOT_WORD.sub(" ", folded).strip()


def lsh_params(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows): the most rows per band that still finds a pair at `threshold` with p >= 0.99."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= 0.99:
            return bands, rows
    return num_perm, 1


def _shingles(keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All 5-byte shingles of all keys as one uint64 array, plus each key's start offset in it."""
    encoded = [k.encode("utf-8").ljust(SHINGLE_BYTES, b"\0") for k in keys]
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    buf = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.uint64)
    counts = lengths - SHINGLE_BYTES + 1
    byte_starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    offsets = np.concatenate(([0], np.cumsum(counts)[:-1]))
    # position of every window: its key's first byte plus its rank inside the key
    pos = np.repeat(byte_starts - offsets, counts) + np.arange(counts.sum(), dtype=np.int64)
    codes = np.zeros(len(pos), dtype=np.uint64)
    for k in range(SHINGLE_BYTES):
        codes |= buf[pos + k] << np.uint64(8 * k)
    return codes, offsets


def _mix32(codes: np.ndarray) -> np.ndarray:
    """Spread 40-bit shingle codes over 32 bits (murmur3's 64-bit finaliser, truncated)."""
    x = codes.copy()
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return x.astype(np.uint32)


def _hash_params(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(_SEED)
    a = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32)
    return a, b


def minhash_signatures(keys: list[str], num_perm: int = NUM_PERM, batch: int = 256) -> np.ndarray:
    """MinHash signatures, len(keys) x num_perm uint32.

    Small batches and one permutation at a time keep the working arrays in the CPU cache, which is
    ~20x faster than broadcasting all permutations over a large batch at once.
    """
    a, b = _hash_params(num_perm)
    sigs = np.empty((len(keys), num_perm), dtype=np.uint32)
    for lo in range(0, len(keys), batch):
        codes, offsets = _shingles(keys[lo : lo + batch])
        hashed = _mix32(codes)
        scratch = np.empty_like(hashed)
        for j in range(num_perm):
            np.multiply(hashed, a[j], out=scratch)
            scratch += b[j]
            sigs[lo : lo + len(offsets), j] = np.minimum.reduceat(scratch, offsets)
    return sigs


def _candidate_pairs(sigs: np.ndarray, bands: int, rows: int) -> set[tuple[int, int]]:
    """Index pairs (i < j) that agree on all rows of at least one band."""
    pairs: set[tuple[int, int]] = set()
    for band in range(bands):
        # one 64-bit key per band; a collision only adds a candidate, which the exact check rejects
        block = sigs[:, band * rows : (band + 1) * rows].astype(np.uint64)
        keys = (block * _BAND_MIX[:rows]).sum(axis=1, dtype=np.uint64)
        order = np.argsort(keys, kind="stable")
        same = keys[order[1:]] == keys[order[:-1]]  # same[k]: sorted k and k+1 share a bucket
        if not same.any():
            continue
        # buckets are runs of True in `same`; runs of length 1 (two members) are the common case
        run_starts = np.flatnonzero(same & ~np.concatenate(([False], same[:-1])))
        for start in run_starts:
            stop = start
            while stop < len(same) and same[stop]:
                stop += 1
            members = np.sort(order[start : stop + 1])
            for i, x in enumerate(members[:_MAX_BUCKET]):
                pairs.update((int(x), int(y)) for y in members[i + 1 :])
    return pairs


def shingle_sets(keys: list[str], batch: int = 4096) -> list[np.ndarray]:
    """Each key's set of 5-byte shingles, as a sorted unique array (for exact Jaccard).

    One sort per batch instead of one per key: shingles (40 bits) are tagged with their key's position
    in the batch (the top 24 bits), so sorting the tagged values sorts every key's shingles at once.
    """
    sets: list[np.ndarray] = []
    mask = np.uint64((1 << 40) - 1)
    for lo in range(0, len(keys), batch):
        codes, offsets = _shingles(keys[lo : lo + batch])
        owner = np.repeat(np.arange(len(offsets), dtype=np.uint64), np.diff(np.append(offsets, len(codes))))
        tagged = np.sort((owner << np.uint64(40)) | codes)  # np.sort + mask: np.unique hashes, ~10x slower here
        tagged = tagged[np.concatenate(([True], tagged[1:] != tagged[:-1]))]
        bounds = np.searchsorted(tagged, np.arange(1, len(offsets), dtype=np.uint64) << np.uint64(40))
        sets.extend(part & mask for part in np.split(tagged, bounds))
    return sets


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sets given as sorted unique arrays."""
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


def near_duplicate_pairs(keys: list[str], threshold: float) -> list[tuple[int, int, float]]:
    """Pairs (i, j, jaccard) of keys whose 5-byte-shingle Jaccard similarity is >= threshold."""
    if len(keys) < 2:
        return []
    bands, rows = lsh_params(threshold)
    candidates = sorted(_candidate_pairs(minhash_signatures(keys), bands, rows))
    involved = sorted({i for pair in candidates for i in pair})
    if not involved:
        return []
    sets = dict(zip(involved, shingle_sets([keys[i] for i in involved])))
    out = []
    for i, j in candidates:
        sim = jaccard(sets[i], sets[j])
        if sim >= threshold:
            out.append((i, j, sim))
    return out


def clusters(n: int, pairs) -> dict[int, list[int]]:
    """Connected components of `pairs` over 0..n-1, as {root: members} for components of size > 1."""
    uf = UnionFind(n)
    for i, j, *_ in pairs:
        uf.union(i, j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        groups[uf.find(i)].append(i)
    return {r: m for r, m in groups.items() if len(m) > 1}


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent[max(rx, ry)] = min(rx, ry)
