"""What happens to a record that cannot be used: skip it and count, or stop.

Every reader reports a bad record here with where it is ("path:line") and what
is wrong; `data.bad_data` picks the policy. All reading happens before the first
training step, so a bad record never crashes a run midway: with 'stop' the run
ends before it starts, with 'skip' the counts go to the metrics.
"""

import collections

from absl import logging

POLICIES = ("skip", "stop")

# The reasons a record can be rejected; each is a metrics key data/skipped/<reason>.
REASONS = (
  "empty_file",  # a file with no text in it
  "undecodable",  # bytes that are not UTF-8
  "binary",  # a text file holding NUL bytes (binary data, UTF-16 text)
  "malformed_json",  # a JSONL line that does not parse
  "missing_field",  # a record without the configured text field / "messages"
  "wrong_type",  # a field of the wrong type (text not a string, messages not a list, ...)
  "unknown_role",  # a chat message whose role is not system / user / assistant
  "missing_content",  # a chat message without a string "content"
  "too_long",  # a chat example longer than data.seq_len + 1 tokens
  "empty_example",  # a record with nothing to train on (no assistant turn, empty text)
)


class BadDataError(ValueError):
  """A bad record under data.bad_data='stop'; the message names file and line."""


class BadExample(Exception):
  """Raised by a parser for one record; the caller reports it with its location."""

  def __init__(self, reason: str, detail: str):
    if reason not in REASONS:
      raise ValueError(f"unknown bad-data reason {reason!r}; known: {', '.join(REASONS)}")
    super().__init__(detail)
    self.reason = reason
    self.detail = detail


class BadData:
  """Counts skipped records per reason, or raises on the first one."""

  def __init__(self, policy: str = "skip", max_logged: int = 20):
    if policy not in POLICIES:
      raise ValueError(f"data.bad_data={policy!r}; allowed: {', '.join(POLICIES)}")
    self.policy = policy
    self.max_logged = max_logged
    self.counts: collections.Counter[str] = collections.Counter()
    self.examples: list[str] = []  # the first max_logged messages, for reports and tests

  def report(self, reason: str, where: str, detail: str) -> None:
    if reason not in REASONS:
      raise ValueError(f"unknown bad-data reason {reason!r}; known: {', '.join(REASONS)}")
    message = f"{where}: {detail}"
    if self.policy == "stop":
      raise BadDataError(f'{message} (data.bad_data="stop"; set data.bad_data="skip" to skip and count such records)')
    self.counts[reason] += 1
    if len(self.examples) < self.max_logged:
      self.examples.append(message)
      logging.warning("skipped bad data (%s): %s", reason, message)

  def report_example(self, error: BadExample, where: str) -> None:
    self.report(error.reason, where, error.detail)

  def merge(self, counts: dict[str, int]) -> None:
    """Adds counts recorded elsewhere (a cache or a prepared dataset)."""
    self.counts.update(counts)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def summary(self) -> str:
    if not self.counts:
      return "no bad records"
    return ", ".join(f"{count} {reason}" for reason, count in sorted(self.counts.items()))
