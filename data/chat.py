"""Chat conversations -> token ids and a loss mask, with the ChatML template.

A conversation is the "messages" value of one chat-completions JSONL record,
[{"role": "system" | "user" | "assistant", "content": "..."}, ...], rendered
with one `<|im_start|>{role}\\n{content}<|im_end|>\\n` block per message after
the tokenizer's bos. The loss mask marks the tokens the model is trained to
predict: with loss_on='assistant', each assistant content and its closing
<|im_end|> (so the model learns to stop), never the headers, the newline after
<|im_end|> or the system/user turns; with loss_on='all', every token.

Each piece (header, content, end marker, newline) is tokenized on its own, so
the mask boundaries fall exactly between tokens. A content that contains the
literal text '<|im_start|>' or '<|im_end|>' gets the marker token, as in most
chat stacks; it is not escaped.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from data.bad_data import BadExample
from data.special_tokens import CHAT_ROLES, IM_END, IM_START
from data.tokenizers import Tokenizer

CHAT_TEMPLATES = ("chatml",)
LOSS_ON = ("assistant", "all")


def check_chat_options(template: str, loss_on: str) -> None:
  """Raises ValueError naming the config field for an unknown template or loss_on."""
  if template not in CHAT_TEMPLATES:
    raise ValueError(f"data.chat_template={template!r}; allowed: {', '.join(CHAT_TEMPLATES)}")
  if loss_on not in LOSS_ON:
    raise ValueError(f"data.chat_loss_on={loss_on!r}; allowed: {', '.join(LOSS_ON)}")


def check_messages(messages: Any) -> None:
  """Raises BadExample unless `messages` is a conversation there is something to learn from."""
  if not isinstance(messages, list):
    raise BadExample("wrong_type", f'"messages" is {_type_name(messages)}, not a list of messages')
  if not messages:
    raise BadExample("empty_example", '"messages" is an empty list')
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise BadExample("wrong_type", f'message {i} is {_type_name(message)}, not an object with "role" and "content"')
    role = message.get("role")
    if role not in CHAT_ROLES:
      what = f"role {role!r}" if "role" in message else 'no "role"'
      raise BadExample("unknown_role", f"message {i} has {what}; allowed roles: {', '.join(CHAT_ROLES)}")
    content = message.get("content")
    if not isinstance(content, str):
      what = _type_name(content) if "content" in message else "missing"
      raise BadExample("missing_content", f'message {i} (role {role!r}) has no string "content" ({what})')
  if not any(message["role"] == "assistant" for message in messages):
    roles = ", ".join(dict.fromkeys(message["role"] for message in messages))
    raise BadExample("empty_example", f"no assistant message (roles: {roles}), so nothing to learn")


def render_chat(
  messages: list[dict[str, str]], tokenizer: Tokenizer, *, loss_on: str = "assistant"
) -> tuple[np.ndarray, np.ndarray]:
  """(int32 ids, uint8 loss_mask) of one conversation; see render_chat_batch."""
  return render_chat_batch([messages], tokenizer, loss_on)[0]


def render_chat_batch(
  conversations: Sequence[list[dict[str, str]]],
  tokenizer: Tokenizer,
  loss_on: str = "assistant",
  template: str = "chatml",
) -> list[tuple[np.ndarray, np.ndarray]]:
  """Renders many conversations with one encode_batch call (per-text calls pay the overhead per text).

  Returns (ids, loss_mask) per conversation: int32 ids starting with bos when
  the tokenizer has one, and a uint8 mask of the same length, 1 on loss targets.
  Raises BadExample for a bad conversation; callers that skip bad records run
  check_messages on each first.
  """
  check_chat_options(template, loss_on)
  for messages in conversations:
    check_messages(messages)
  # A marker that is one token in the vocabulary is used as that token; otherwise
  # (byte and char tokenizers, or models without the markers) it is spelled out.
  start_id = tokenizer.special_id(IM_START)
  end_id = tokenizer.special_id(IM_END)
  headers = [("" if start_id is not None else IM_START) + f"{role}\n" for role in CHAT_ROLES]
  end_text = "" if end_id is not None else IM_END
  contents = [message["content"] for messages in conversations for message in messages]
  # The constant pieces go first in the same batch as every content.
  encoded = tokenizer.encode_batch(headers + [end_text, "\n"] + contents)
  start = [] if start_id is None else [np.array([start_id], np.int32)]
  header_ids = {role: np.concatenate(start + [ids]) for role, ids in zip(CHAT_ROLES, encoded)}
  end_ids = encoded[len(headers)] if end_id is None else np.array([end_id], np.int32)
  newline_ids = encoded[len(headers) + 1]
  bos = np.array([] if tokenizer.bos_id is None else [tokenizer.bos_id], np.int32)
  all_tokens = int(loss_on == "all")

  content_ids = iter(encoded[len(headers) + 2 :])
  rendered = []
  for messages in conversations:
    pieces, flags = [bos], [all_tokens]
    for message in messages:
      target = int(loss_on == "all" or message["role"] == "assistant")
      pieces += [header_ids[message["role"]], next(content_ids), end_ids, newline_ids]
      flags += [all_tokens, target, target, all_tokens]
    ids = np.concatenate(pieces).astype(np.int32)
    loss_mask = np.repeat(np.array(flags, np.uint8), [len(piece) for piece in pieces])
    rendered.append((ids, loss_mask))
  return rendered


_JSON_TYPE_NAMES = {
  dict: "an object",
  list: "a list",
  str: "a string",
  bool: "a boolean",
  int: "a number",
  float: "a number",
  type(None): "null",
}


def _type_name(value: Any) -> str:
  """The JSON name of a parsed value's type, for error messages."""
  return _JSON_TYPE_NAMES.get(type(value), f"a {type(value).__name__}")
