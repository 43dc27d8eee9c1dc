"""Offline data selection: exact and MinHash deduplication (data/dedup.py), a reference model's
perplexity (evaluation/document_selection.py) and the prepared dataset tools/prepare_data.py makes
of what is kept, which a training run reads."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import base
from data import dedup
from data.datasets import DocumentSelection, prepare_datasets
from data.prepared import PreparedRows
from evaluation import document_selection, loading
from tests import synthetic
from training.run import train

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = [f"w{i}" for i in range(2000)]


def random_document(rng, length: int = 200) -> str:
  return " ".join(rng.choice(WORDS, length))


# --- Exact and near-duplicate detection.


def test_exact_duplicates_after_whitespace_normalisation():
  texts = ["a b  c", "a b c", " a\tb\nc ", "A b c", "x", "a b c.", "x", "a\u0301", "\u00e1"]
  # Whitespace runs collapse and ends strip (1, 2 equal 0); case and punctuation count (3, 5 differ);
  # NFC joins a + combining acute into one character (8 equals 7).
  assert dedup.exact_duplicates(texts).tolist() == [False, True, True, False, False, False, True, False, True]
  result = dedup.deduplicate(texts, "exact")
  assert np.flatnonzero(result.keep).tolist() == [0, 3, 4, 5, 7]
  assert (result.exact_duplicates, result.near_duplicates) == (4, 0)


@pytest.fixture(scope="module")
def planted():
  """60 distinct 200-word documents, and copies of some of them planted after: one word changed,
  three words changed, reworded spacing and case, and one sharing only its first half."""
  rng = np.random.default_rng(0)
  texts = [random_document(rng) for _ in range(60)]

  def changed(text, positions):
    words = text.split()
    for p in positions:
      words[p] = "changed"
    return " ".join(words)

  near = {
    60: changed(texts[3], [100]),
    61: changed(texts[10], [0, 50, 199]),
    62: texts[20].upper().replace(" ", "\n  "),  # Equal as shingles (lowercased words), not exactly.
    63: changed(texts[60 - 1], [7]),
  }
  half = " ".join(texts[30].split()[:100] + random_document(rng, 100).split())  # Jaccard ~0.33: kept.
  texts = texts + [near[i] for i in sorted(near)] + [half, texts[5]]
  return texts, set(near), 65  # 65: the exact copy of document 5.


def test_minhash_removes_the_planted_near_duplicates_and_keeps_the_rest(planted):
  texts, near, exact = planted
  result = dedup.deduplicate(texts, "minhash", dedup.MinHashSettings())
  assert (result.exact_duplicates, result.near_duplicates) == (1, len(near))
  assert set(np.flatnonzero(~result.keep).tolist()) == near | {exact}
  # Exact deduplication alone finds only the exact copy.
  assert set(np.flatnonzero(~dedup.deduplicate(texts, "exact").keep).tolist()) == {exact}


def test_minhash_on_character_shingles(planted):
  texts, near, exact = planted
  result = dedup.deduplicate(texts, "minhash", dedup.MinHashSettings(shingle="char", ngram=8))
  assert set(np.flatnonzero(~result.keep).tolist()) == near | {exact}


def test_a_cluster_keeps_its_first_document_in_corpus_order():
  rng = np.random.default_rng(1)
  original = random_document(rng)
  words = original.split()
  copies = [" ".join(words[:k] + ["new"] + words[k + 1 :]) for k in (10, 60, 120)]
  texts = [random_document(rng), copies[0], random_document(rng), original, copies[1], copies[2]]
  result = dedup.deduplicate(texts, "minhash")
  assert np.flatnonzero(result.keep).tolist() == [0, 1, 2]


def test_minhash_is_deterministic_across_runs_and_processes(planted):
  texts, _, _ = planted
  settings = dedup.MinHashSettings(seed=7)
  signatures = dedup.MinHasher(settings).signatures(texts)
  assert np.array_equal(signatures, dedup.MinHasher(settings).signatures(texts))
  assert not np.array_equal(signatures, dedup.MinHasher(dedup.MinHashSettings(seed=8)).signatures(texts))
  digest = hashlib.sha256(signatures.tobytes()).hexdigest()
  # Python salts str hashes per process (PYTHONHASHSEED): two processes with different salts agree.
  script = (
    "import hashlib, json, sys; from data import dedup; texts = json.load(sys.stdin); "
    "print(hashlib.sha256(dedup.MinHasher(dedup.MinHashSettings(seed=7)).signatures(texts).tobytes()).hexdigest())"
  )
  for salt in ("1", "2"):
    env = dict(os.environ, PYTHONHASHSEED=salt, PYTHONPATH=REPO_ROOT)
    out = subprocess.run(
      [sys.executable, "-c", script], input=json.dumps(texts), env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == digest
  # Pinned: the same signature on any machine and numpy version (PCG64's stream is fixed).
  assert dedup.MinHasher(dedup.MinHashSettings()).signatures(["the quick brown fox jumps"])[0, :4].tolist() == [
    2349395915,
    3573682852,
    698350312,
    1983152861,
  ]


BAD_OPTIONS = [  # (SelectionOptions fields, the one line)
  (dict(dedup="fuzzy"), "--dedup='fuzzy': must be one of none, exact, minhash"),
  (
    dict(dedup="exact", minhash_threshold=0.9),
    "--minhash_threshold=0.9: applies to --dedup=minhash only, and --dedup=exact; pass --dedup=minhash or leave it out",
  ),
  (dict(dedup="minhash", minhash_threshold=1.5), "--minhash_threshold=1.5: must be a Jaccard similarity in (0, 1]"),
  (
    dict(dedup="minhash", minhash_bands=5),
    "--minhash_bands=5: must divide num_perm=128 (each band is num_perm / bands rows)",
  ),
  (
    dict(dedup="minhash", minhash_ngram=0),
    "--minhash_ngram=0: must be an integer >= 1 (words or characters per shingle)",
  ),
  (
    dict(filter_keep_fraction=0.5),
    "--filter_keep_fraction=0.5: needs --filter_checkpoint, the reference model to score with",
  ),
  (
    dict(filter_checkpoint="/r"),
    "--filter_checkpoint=/r: give exactly one of --filter_keep_fraction (the lowest-perplexity share to keep) "
    "and --filter_max_perplexity (got neither)",
  ),
  (
    dict(filter_checkpoint="/r", filter_keep_fraction=0.0),
    "--filter_keep_fraction=0.0: must be in (0, 1], the share of documents to keep",
  ),
  (
    dict(filter_checkpoint="/r", filter_max_perplexity=0.5),
    "--filter_max_perplexity=0.5: must be a finite number >= 1 (a perplexity is at least 1)",
  ),
]


@pytest.mark.parametrize("fields,message", BAD_OPTIONS)
def test_bad_options_are_refused_in_one_line_naming_the_flag(fields, message):
  with pytest.raises(ValueError) as error:
    document_selection.SelectionOptions(**fields).check()
  assert str(error.value) == message


def test_keep_fraction_ranks_by_loss_and_breaks_ties_by_corpus_order():
  loss = np.array([2.0, 1.0, np.nan, 3.0, 1.0, 2.0, 0.5])
  scores = document_selection.DocumentScores(loss=loss, tokens=np.array([5, 5, 0, 5, 5, 5, 5]))
  keep = document_selection.keep_by_perplexity
  # 6 scored; ceil(0.5 * 6) = 3 lowest: 0.5 (6), then the two 1.0s (1, 4); the unscored 2 stays.
  assert np.flatnonzero(keep(scores, keep_fraction=0.5)).tolist() == [1, 2, 4, 6]
  # ceil(0.6 * 6) = 4: of the tied 2.0s (0, 5), the earlier one.
  assert np.flatnonzero(keep(scores, keep_fraction=0.6)).tolist() == [0, 1, 2, 4, 6]
  assert np.flatnonzero(keep(scores, max_perplexity=float(np.exp(2.0)))).tolist() == [0, 1, 2, 4, 5, 6]


def test_scoring_requests_score_every_token_but_the_first_once():
  ids = list(range(10))
  requests = document_selection.scoring_requests(ids, max_len=4)
  # Rows of max_len + 1 tokens, as training's: a full window has one token of context, the last
  # window as many as fill its row.
  assert requests == [([0], [1, 2, 3, 4]), ([4], [5, 6, 7, 8]), ([5, 6, 7, 8], [9])]
  assert document_selection.scoring_requests([3], max_len=4) == []


def test_a_selection_made_for_other_documents_is_refused(tmp_path):
  data = tiny_run_config(write_jsonl(tmp_path / "corpus.jsonl", ["one text", "another text", "a third"])).data
  keep = np.array([True, False])  # Chosen when the source held two documents.
  with pytest.raises(ValueError) as error:
    prepare_datasets(data, str(tmp_path / "out"), selections={"main": DocumentSelection(keep=keep, record={})})
  assert str(error.value) == (
    "data.sources.main: 3 documents now, 2 when the documents to keep were chosen; "
    "the source changed meanwhile: prepare it again"
  )
  data.sources.main.kind = "chat"
  with pytest.raises(ValueError, match="a chat source: selections apply to text sources"):
    prepare_datasets(data, str(tmp_path / "out"), selections={"main": DocumentSelection(keep=keep, record={})})


# --- A reference model's perplexity, and the prepared dataset of what is kept.

ENGLISH = (
  "the of and to in is was for on that with as by at from his her they this which were had are not but "
  "be or have one all their there been has when who will more no if out so said what up its about into "
  "than them can only other new some could time these two may then do first any my now such like our"
).split()
NUM_NORMAL, NUM_GIBBERISH = 120, 17


def english_document(rng) -> str:
  return " ".join(rng.choice(ENGLISH, 100))


def gibberish_document(rng) -> str:
  return "".join(map(chr, rng.integers(33, 127, 500)))  # Random printable bytes, as long as the text.


def write_jsonl(path, texts) -> str:
  with open(path, "w") as f:
    f.writelines(json.dumps({"text": text}) + "\n" for text in texts)
  return str(path)


def tiny_run_config(paths: str, kind: str = "jsonl"):
  """The reference model's run, and the one trained on the selection: one config but the source, so
  the second compiles nothing (the steps come from the session's compilation cache, tests/conftest.py)."""
  config = synthetic.tiny_config(vocab_size=0)
  config.data.sources = {"main": base.source(kind=kind, paths=paths)}
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  config.train.update(num_steps=60, eval_every=0, eval_batches=1, checkpoint_every=60, num_samples=0, log_every=60)
  return config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A corpus of English-like documents with gibberish among them, an exact copy and a near copy
  planted at its end; and a reference model trained 60 steps on English-like text alone."""
  root = tmp_path_factory.mktemp("filtering")
  rng = np.random.default_rng(0)
  english = [english_document(rng) for _ in range(NUM_NORMAL)]
  gibberish_at = set(range(3, NUM_NORMAL + NUM_GIBBERISH, 8))
  assert len(gibberish_at) == NUM_GIBBERISH
  texts, english_left = [], iter(english)
  for i in range(NUM_NORMAL + NUM_GIBBERISH):
    texts.append(gibberish_document(rng) if i in gibberish_at else next(english_left))
  near_copy = texts[1].split()
  near_copy[50] = "planted"
  texts += [texts[0], " ".join(near_copy)]
  reference = root / "reference"
  train(
    tiny_run_config(write_jsonl(root / "reference.jsonl", [english_document(rng) for _ in range(200)])), str(reference)
  )
  return root, texts, gibberish_at, str(reference)


@pytest.fixture(scope="module")
def reference_model(corpus):
  _, _, _, reference = corpus
  return loading.load_model(loading.checkpoint_config(reference))


# Measured per byte after 60 steps: English-like documents 14.8 to 16.9, gibberish 596 to 763.
MAX_PERPLEXITY = 100.0


def test_perplexity_keeps_exactly_the_text_the_reference_model_knows(corpus, reference_model):
  _, texts, gibberish_at, _ = corpus
  texts = texts[: NUM_NORMAL + NUM_GIBBERISH]
  scores = document_selection.score_documents(reference_model, texts)  # As the tool: compiled once.
  english_at = sorted(set(range(len(texts))) - gibberish_at)
  # Bytes and EOS, first byte of each document not scored.
  assert scores.tokens.tolist() == [len(text.encode()) for text in texts]
  keep = document_selection.keep_by_perplexity
  assert np.flatnonzero(keep(scores, max_perplexity=MAX_PERPLEXITY)).tolist() == english_at
  # ceil(0.875 * 137) = 120 = NUM_NORMAL.
  assert np.flatnonzero(keep(scores, keep_fraction=0.875)).tolist() == english_at


def read_all(directory, split):
  rows = PreparedRows(str(directory), split)
  return rows.read(np.arange(rows.num_rows))


def test_prepare_data_writes_the_kept_documents_as_a_prepared_dataset_a_run_trains_on(corpus):
  root, texts, gibberish_at, reference = corpus
  config_file = root / "corpus_config.py"
  paths = write_jsonl(root / "corpus.jsonl", texts)
  config_file.write_text(  # tiny_run_config's data section.
    "from configs import base, tiny\n\n\ndef get_config():\n  config = tiny.get_config()\n"
    f"  config.data.sources = {{'main': base.source(kind='jsonl', paths={paths!r})}}\n"
    "  return config\n"
  )
  output = root / "selected"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
  result = subprocess.run(
    [
      sys.executable,
      "tools/prepare_data.py",
      f"--config={config_file}",
      f"--output={output}",
      "--dedup=minhash",
      f"--filter_checkpoint={reference}",
      f"--filter_max_perplexity={MAX_PERPLEXITY}",
    ],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  total = NUM_NORMAL + NUM_GIBBERISH + 2
  assert result.stdout.splitlines()[-1] == (
    f"main: kept {NUM_NORMAL} of {total} documents "
    f"(removed: 1 exact_duplicate, 1 near_duplicate, {NUM_GIBBERISH} perplexity)"
  )
  record = json.loads((output / "main" / "meta.json").read_text())["metadata"]["document_selection"]
  assert record["removed"] == {"exact_duplicate": 1, "near_duplicate": 1, "perplexity": NUM_GIBBERISH}
  assert (record["documents"], record["kept"]) == (total, NUM_NORMAL)
  assert record["dedup"]["minhash"] == dict(
    num_perm=128, bands=14, rows=9, threshold=0.8, ngram=5, shingle="word", seed=0
  )
  assert record["perplexity"]["scored_documents"] == NUM_NORMAL + NUM_GIBBERISH

  # The rows are those of preparing the kept documents alone, bit for bit.
  kept = [text for i, text in enumerate(texts[: NUM_NORMAL + NUM_GIBBERISH]) if i not in gibberish_at]
  alone = tiny_run_config(write_jsonl(root / "kept.jsonl", kept)).data
  prepare_datasets(alone, str(root / "alone"))
  for split in ("train", "validation"):
    for selected, expected in zip(read_all(output / "main", split), read_all(root / "alone" / "main", split)):
      np.testing.assert_array_equal(selected, expected)

  # And a run reads it as kind=prepared: its batches come from the selected rows alone.
  run = train(tiny_run_config(str(output / "main"), kind="prepared"), str(root / "trained"))
  assert run.eval_history[-1][0] == 60
