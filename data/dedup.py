"""Exact and near-duplicate documents: which to drop, keeping the first of each cluster in corpus order.

Exact: two documents are duplicates when their texts are equal after `normalize_for_exact` (Unicode
NFC, every run of whitespace one space, no leading or trailing whitespace; case and punctuation kept,
as they carry meaning in code). The key is a 128-bit BLAKE2b digest, so nothing but 16 bytes per
document is held.

Near (MinHash with LSH banding, Broder 1997; Leskovec et al., "Mining of Massive Datasets", ch. 3):
each document becomes a set of shingles, word n-grams (lowercased `\\w+` runs; punctuation and
spacing ignored) or character n-grams (lowercased, whitespace collapsed); its signature is the
minimum of `num_perm` random hash functions over its shingles, and the share of equal signature
entries estimates the Jaccard similarity of two sets. Documents whose signatures agree on every row of
at least one band are candidates; a candidate pair is a near-duplicate when its estimated Jaccard is at
least `threshold`. Clusters are the connected components of that graph (so a chain A~B~C is one
cluster even when A and C are less alike); the lowest-indexed document of each stays.

Everything is seeded and uses no salted hashing (Python's `hash()` of a str differs per process):
shingle hashes are BLAKE2b (words) or code points (characters) folded with the splitmix64 finalizer,
and the hash functions are multiply-add-shift maps drawn from numpy's PCG64 at `seed`, so every run
and every process computes the same signatures. Signatures are computed in batches of documents, so
memory holds 4 * num_perm bytes per document beside the current batch.
"""

import dataclasses
import hashlib
import itertools
import math
import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

DEDUP_MODES = ("none", "exact", "minhash")
SHINGLE_KINDS = ("word", "char")

_WHITESPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")
_BATCH_DOCUMENTS = 1024  # Documents signed per batch.
# The (num_perm, shingles) uint64 hash matrix of one step: small enough to stay in a CPU's cache
# (measured on 2 shared cores, 128 functions: 16k shingles at a time 5x faster than 64k).
_HASH_MATRIX_BYTES = 16 * 2**20
# Candidate buckets up to this size give every pair; bigger ones (a large cluster of copies) give each
# member's pairs with the bucket's first member and with its neighbour in corpus order, which joins
# the same components whenever those pairs pass the threshold, in linear rather than quadratic work.
_ALL_PAIRS_BUCKET = 64
_FALSE_POSITIVE_WEIGHT = 0.1  # optimal_bands's weight of false positives against false negatives.
_NO_SHINGLE = np.iinfo(np.uint32).max  # The signature of a document without shingles.

_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_FOLD = np.uint64(0x9E3779B97F4A7C15)  # The golden-ratio increment of splitmix64.


def _mix64(x: np.ndarray) -> np.ndarray:
  """The splitmix64 finalizer, elementwise on uint64 (wrapping arithmetic): a bijection with avalanche."""
  x = x ^ (x >> np.uint64(30))
  x = x * _MIX_1
  x = x ^ (x >> np.uint64(27))
  x = x * _MIX_2
  return x ^ (x >> np.uint64(31))


def normalize_for_exact(text: str) -> str:
  """What exact deduplication compares: NFC, whitespace runs as one space, stripped; case kept."""
  return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def exact_key(text: str) -> bytes:
  return hashlib.blake2b(normalize_for_exact(text).encode("utf-8"), digest_size=16).digest()


def exact_duplicates(texts: Iterable[str]) -> np.ndarray:
  """[N] bool: True where the document equals (normalized) an earlier one."""
  seen: set[bytes] = set()
  duplicate = []
  for text in texts:
    key = exact_key(text)
    duplicate.append(key in seen)
    seen.add(key)
  return np.array(duplicate, dtype=bool)


@dataclasses.dataclass(frozen=True)
class MinHashSettings:
  """num_perm hash functions; bands x rows of them for LSH (bands=0: chosen for the threshold, see
  `optimal_bands`); a pair is a near-duplicate at estimated Jaccard >= threshold; shingles are `ngram`
  consecutive words or characters; `seed` draws the hash functions."""

  num_perm: int = 128
  bands: int = 0
  threshold: float = 0.8
  ngram: int = 5
  shingle: str = "word"
  seed: int = 0

  def check(self, prefix: str = "") -> None:
    """ValueError naming the first bad setting, what it was and what is allowed."""

    def bad(field: str, value, allowed: str) -> ValueError:
      return ValueError(f"{prefix}{field}={value!r}: {allowed}")

    if isinstance(self.num_perm, bool) or not isinstance(self.num_perm, int) or self.num_perm < 2:
      raise bad("num_perm", self.num_perm, "must be an integer >= 2 (128 is usual)")
    if isinstance(self.bands, bool) or not isinstance(self.bands, int) or not 0 <= self.bands <= self.num_perm:
      raise bad(
        "bands", self.bands, f"must be 0 (chosen for the threshold) or an integer in 1..num_perm={self.num_perm}"
      )
    if self.bands and self.num_perm % self.bands:
      raise bad("bands", self.bands, f"must divide num_perm={self.num_perm} (each band is num_perm / bands rows)")
    if not isinstance(self.threshold, (int, float)) or not 0.0 < self.threshold <= 1.0:
      raise bad("threshold", self.threshold, "must be a Jaccard similarity in (0, 1]")
    if isinstance(self.ngram, bool) or not isinstance(self.ngram, int) or self.ngram < 1:
      raise bad("ngram", self.ngram, "must be an integer >= 1 (words or characters per shingle)")
    if self.shingle not in SHINGLE_KINDS:
      raise bad("shingle", self.shingle, f"must be one of {', '.join(SHINGLE_KINDS)}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
      raise bad("seed", self.seed, "must be an integer >= 0")

  @property
  def bands_and_rows(self) -> tuple[int, int]:
    if self.bands:
      return self.bands, self.num_perm // self.bands
    return optimal_bands(self.threshold, self.num_perm)


def optimal_bands(threshold: float, num_perm: int) -> tuple[int, int]:
  """(bands, rows), bands * rows <= num_perm, minimising the weighted areas of false positives
  (candidate probability 1 - (1 - s^r)^b below the threshold) and false negatives (1 minus it above),
  as datasketch's MinHashLSH chooses, but with false negatives weighted 9 to 1 (_FALSE_POSITIVE_WEIGHT):
  candidates are verified against the threshold, so a false positive costs one signature comparison
  while a false negative is a duplicate kept. At 0.8 and 128 functions that is 14 bands of 9 rows
  (a pair at Jaccard 0.8 is a candidate with probability 0.87, at 0.85 0.975, at 0.6 0.13), where equal
  weights give 9 of 14 (0.33 at 0.8, 0.62 at 0.85: a near-duplicate at 0.85 kept one time in three)."""
  grid = np.linspace(0.0, 1.0, 1001)
  best, best_error = (1, num_perm), math.inf
  for bands in range(1, num_perm + 1):
    rows = num_perm // bands
    candidate = 1.0 - (1.0 - grid**rows) ** bands
    below = grid < threshold
    false_positive = np.trapezoid(np.where(below, candidate, 0.0), grid)
    false_negative = np.trapezoid(np.where(below, 0.0, 1.0 - candidate), grid)
    error = _FALSE_POSITIVE_WEIGHT * false_positive + (1 - _FALSE_POSITIVE_WEIGHT) * false_negative
    if error < best_error - 1e-12:
      best, best_error = (bands, rows), error
  return best


class MinHasher:
  """Signatures of documents under fixed settings; deterministic for a seed on any machine."""

  def __init__(self, settings: MinHashSettings):
    settings.check()
    self.settings = settings
    rng = np.random.Generator(np.random.PCG64(settings.seed))
    high = np.iinfo(np.uint64).max
    # Multiply-add-shift: h(x) = (a * x + b) mod 2^64, top 32 bits; a odd, so x -> a * x is a bijection.
    self._multipliers = rng.integers(0, high, settings.num_perm, dtype=np.uint64, endpoint=True) | np.uint64(1)
    self._increments = rng.integers(0, high, settings.num_perm, dtype=np.uint64, endpoint=True)
    self._fold_start = rng.integers(0, high, dtype=np.uint64, endpoint=True)

  def units(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(flat uint64 hashes of every document's words or characters, in order; [len(texts)] counts)."""
    if self.settings.shingle == "char":
      collapsed = [_WHITESPACE.sub(" ", text.lower()).strip() for text in texts]
      lengths = np.array([len(text) for text in collapsed], dtype=np.int64)
      return np.frombuffer("".join(collapsed).encode("utf-32-le"), dtype="<u4").astype(np.uint64), lengths
    per_text = [_WORD.findall(text.lower()) for text in texts]
    lengths = np.array([len(words) for words in per_text], dtype=np.int64)
    words = list(itertools.chain.from_iterable(per_text))
    # Each distinct word is hashed once per batch: map() with dict.setdefault gives every word the
    # slot of its first occurrence without a Python-level loop over the words (3x faster than one).
    first_slot: dict[str, int] = {}
    slots = np.fromiter(map(first_slot.setdefault, words, itertools.count()), dtype=np.int64, count=len(words))
    by_slot = np.zeros(len(words), dtype=np.uint64)
    by_slot[np.fromiter(first_slot.values(), dtype=np.int64, count=len(first_slot))] = np.fromiter(
      (int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little") for w in first_slot),
      dtype=np.uint64,
      count=len(first_slot),
    )
    return by_slot[slots], lengths

  def shingles(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(flat uint64 hashes of every document's n-grams, [len(texts)] counts): a document shorter than
    n units has one shingle, all of it; one without units has none."""
    n = self.settings.ngram
    units, lengths = self.units(texts)
    flat = np.concatenate([units, np.zeros(n, np.uint64)])  # Zeros: the folds near the end stay in range.
    total = int(lengths.sum())
    # Fold n consecutive units from every position at once; order matters ("a b" is not "b a").
    hashes = np.full(total, self._fold_start, dtype=np.uint64)
    for offset in range(n):
      hashes = _mix64(hashes * _FOLD + flat[offset : offset + total])
    ends = np.cumsum(lengths)
    starts = ends - lengths
    position = np.arange(total)
    owner = np.repeat(np.arange(len(texts)), lengths)
    full = position + n <= ends[owner]  # The n-gram starting here ends inside its own document.
    counts = np.maximum(lengths - n + 1, 0)
    short = np.flatnonzero((lengths > 0) & (lengths < n))
    # A short document's one shingle is the fold of all its units, kept at its first position.
    for i in short.tolist():
      fold = np.full(1, self._fold_start, dtype=np.uint64)
      for offset in range(lengths[i]):
        fold = _mix64(fold * _FOLD + units[starts[i] + offset : starts[i] + offset + 1])
      hashes[starts[i]], full[starts[i]], counts[i] = fold[0], True, 1
    return hashes[full], counts

  def signatures(self, texts: Sequence[str]) -> np.ndarray:
    """[len(texts), num_perm] uint32; a document without shingles gets all _NO_SHINGLE."""
    num_perm = self.settings.num_perm
    out = np.full((len(texts), num_perm), _NO_SHINGLE, dtype=np.uint64)
    flat, counts = self.shingles(texts)
    signed = np.flatnonzero(counts)
    ends = np.cumsum(counts[signed])
    starts = ends - counts[signed]
    # Shingles a slice at a time against every hash function, in place: a (num_perm, slice) matrix
    # that stays in cache is several times faster than one over the whole batch.
    width = max(256, _HASH_MATRIX_BYTES // (8 * num_perm))
    buffer = np.empty((num_perm, width), dtype=np.uint64)
    shift = np.uint64(32)
    for first in range(0, len(flat), width):
      last = min(first + width, len(flat))
      hashed = buffer[:, : last - first]
      np.multiply(self._multipliers[:, None], flat[None, first:last], out=hashed)
      hashed += self._increments[:, None]
      hashed >>= shift
      # The documents with shingles in this slice, and where each one's part of it begins.
      low, high = np.searchsorted(ends, first, side="right"), np.searchsorted(starts, last, side="left")
      where = signed[low:high]
      minima = np.minimum.reduceat(hashed, np.maximum(starts[low:high], first) - first, axis=1)
      out[where] = np.minimum(out[where], minima.T)
    return out.astype(np.uint32)


def near_duplicates(signatures: np.ndarray, settings: MinHashSettings, among: np.ndarray | None = None) -> np.ndarray:
  """[N] bool: True for every document of a near-duplicate cluster but its first.

  `among` ([N] bool, default all): the documents considered; the others (e.g. exact duplicates already
  dropped) are neither clustered nor dropped here. Documents without shingles never match.
  """
  num_documents = len(signatures)
  considered = np.ones(num_documents, bool) if among is None else np.asarray(among, bool).copy()
  considered &= ~np.all(signatures == _NO_SHINGLE, axis=1)
  indices = np.flatnonzero(considered)
  bands, rows = settings.bands_and_rows
  pairs = []
  for band in range(bands):
    columns = signatures[indices, band * rows : (band + 1) * rows].astype(np.uint64)
    keys = np.full(len(indices), np.uint64(band), dtype=np.uint64)
    for column in columns.T:
      keys = _mix64(keys * _FOLD + column)
    order = np.argsort(keys, kind="stable")  # Stable: within a bucket, members stay in corpus order.
    sorted_keys = keys[order]
    bounds = np.flatnonzero(np.diff(sorted_keys)) + 1
    for bucket in np.split(indices[order], bounds):
      if len(bucket) < 2:
        continue
      if len(bucket) <= _ALL_PAIRS_BUCKET:
        pairs.extend(itertools.combinations(bucket.tolist(), 2))
      else:
        members = bucket.tolist()
        pairs.extend((members[0], m) for m in members[1:])
        pairs.extend(zip(members[1:-1], members[2:]))
  dropped = np.zeros(num_documents, bool)
  if not pairs:
    return dropped
  pairs = np.unique(np.array(pairs, dtype=np.int64), axis=0)
  # Verified in slices: the (pairs, num_perm) comparison of a big duplicate cluster stays small.
  similar = np.concatenate(
    [
      np.mean(signatures[chunk[:, 0]] == signatures[chunk[:, 1]], axis=1) >= settings.threshold
      for chunk in np.array_split(pairs, max(1, len(pairs) // 65536 + 1))
    ]
  )
  root = np.arange(num_documents)

  def find(i: int) -> int:
    while root[i] != i:
      root[i] = root[root[i]]  # Path halving.
      i = root[i]
    return i

  for i, j in pairs[similar].tolist():
    ri, rj = find(i), find(j)
    if ri != rj:  # The lower index is the root, so each cluster's root is its first document.
      root[max(ri, rj)] = min(ri, rj)
  for i in np.flatnonzero(considered).tolist():
    dropped[i] = find(i) != i
  return dropped


@dataclasses.dataclass(frozen=True)
class DedupResult:
  keep: np.ndarray  # [N] bool, in corpus order.
  exact_duplicates: int
  near_duplicates: int

  @property
  def num_documents(self) -> int:
    return len(self.keep)


def deduplicate(texts: Iterable[str], mode: str, settings: MinHashSettings | None = None) -> DedupResult:
  """Which documents to keep under `mode` (DEDUP_MODES): 'exact', or 'minhash' (exact duplicates first,
  then near-duplicates among the rest). Streams `texts` once, in batches."""
  if mode not in DEDUP_MODES:
    raise ValueError(f"dedup mode {mode!r}: must be one of {', '.join(DEDUP_MODES)}")
  hasher = MinHasher(settings or MinHashSettings()) if mode == "minhash" else None
  seen: set[bytes] = set()
  exact: list[bool] = []
  signature_batches = []
  iterator = iter(texts)
  while batch := list(itertools.islice(iterator, _BATCH_DOCUMENTS)):
    for text in batch:
      key = exact_key(text)
      exact.append(key in seen)
      seen.add(key)
    if hasher is not None:
      signature_batches.append(hasher.signatures(batch))
  exact_mask = np.array(exact, dtype=bool)
  if mode == "none":
    return DedupResult(keep=np.ones(len(exact_mask), bool), exact_duplicates=0, near_duplicates=0)
  near = np.zeros_like(exact_mask)
  if hasher is not None and len(exact_mask):
    near = near_duplicates(np.concatenate(signature_batches), hasher.settings, among=~exact_mask)
  return DedupResult(keep=~(exact_mask | near), exact_duplicates=int(exact_mask.sum()), near_duplicates=int(near.sum()))
