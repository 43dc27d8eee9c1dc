"""Evaluation of loom checkpoints: held-out metrics, task metrics and the lm-evaluation-harness adapter.

metrics.py   loss / perplexity / bits per byte / accuracy from summed totals; BLEU, chrF, exact match, F1
scoring.py   per-row log-likelihood of continuations (and greedy generation) with the jitted eval step
tasks.py     JSONL task files (translation, qa, choice): reading, checking and scoring them
harness.py   lm_eval's LM interface over a loom checkpoint (optional: evaluation/requirements.txt)
"""
