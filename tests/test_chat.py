"""Tests for data/chat.py: ChatML rendering, loss masks and bad conversations."""

import jax
import numpy as np
import pytest

from data import chat, packing, pipeline
from data.bad_data import BadExample
from data.special_tokens import IM_END, IM_START
from data.tokenizers import ByteTokenizer, SentencePieceTokenizer, train_sentencepiece
from tests.test_model import forward, model_config, random_params
from training import step as step_lib

CONVERSATION = [
  {"role": "system", "content": "Be brief."},
  {"role": "user", "content": "Hi!"},
  {"role": "assistant", "content": "Hello."},
]
RENDERED = (
  "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
)


def mask_of_spans(text: str, spans: list[str]) -> np.ndarray:
  """Per-character 0/1 mask covering each span at its next occurrence in `text`."""
  mask = np.zeros(len(text), np.uint8)
  offset = 0
  for span in spans:
    start = text.index(span, offset)
    mask[start : start + len(span)] = 1
    offset = start + len(span)
  return mask


def test_byte_tokenizer_chatml_by_hand():
  ids, loss_mask = chat.render_chat(CONVERSATION, ByteTokenizer())
  assert ids.dtype == np.int32 and loss_mask.dtype == np.uint8
  # bos, then every byte of the rendered string shifted by 3 ('<' = 60, '|' = 124).
  assert ids[:4].tolist() == [1, 63, 127, 108]
  assert ids.tolist() == [1] + [b + 3 for b in RENDERED.encode("utf-8")]
  # Only 'Hello.<|im_end|>': not bos, headers, the final newline or other turns.
  expected_mask = np.concatenate([[0], mask_of_spans(RENDERED, ["Hello.<|im_end|>"])])
  assert loss_mask.tolist() == expected_mask.tolist()
  assert loss_mask.sum() == len("Hello.") + len(IM_END) == 16
  assert ByteTokenizer().decode(ids[loss_mask == 1]) == "Hello." + IM_END


def test_two_assistant_turns():
  messages = [
    {"role": "user", "content": "Count: 1"},
    {"role": "assistant", "content": "2"},
    {"role": "user", "content": "Again"},
    {"role": "assistant", "content": "3"},
  ]
  text = (
    "<|im_start|>user\nCount: 1<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
    "<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n"
  )
  ids, loss_mask = chat.render_chat(messages, ByteTokenizer())
  assert ids.tolist() == [1] + [b + 3 for b in text.encode("utf-8")]
  expected_mask = mask_of_spans(text, ["2<|im_end|>", "3<|im_end|>"])
  assert loss_mask[1:].tolist() == expected_mask.tolist()
  assert ByteTokenizer().decode(ids[loss_mask == 1]) == "2<|im_end|>3<|im_end|>"


def test_loss_on_all_marks_every_token():
  ids, loss_mask = chat.render_chat(CONVERSATION, ByteTokenizer(), loss_on="all")
  assert ids.tolist() == chat.render_chat(CONVERSATION, ByteTokenizer())[0].tolist()
  assert loss_mask.tolist() == [1] * (1 + len(RENDERED))


class CountingByteTokenizer(ByteTokenizer):
  def __init__(self):
    super().__init__()
    self.calls = 0

  def encode_batch(self, texts):
    self.calls += 1
    return super().encode_batch(texts)


def test_batch_uses_one_encode_call_and_matches_single_renders():
  other = [{"role": "user", "content": "ü?"}, {"role": "assistant", "content": ""}]
  tokenizer = CountingByteTokenizer()
  rendered = chat.render_chat_batch([CONVERSATION, other, CONVERSATION], tokenizer)
  assert tokenizer.calls == 1
  for (ids, loss_mask), messages in zip(rendered, [CONVERSATION, other, CONVERSATION]):
    single_ids, single_mask = chat.render_chat(messages, ByteTokenizer())
    assert ids.tolist() == single_ids.tolist()
    assert loss_mask.tolist() == single_mask.tolist()
  # An empty assistant turn still teaches the model to stop.
  assert ByteTokenizer().decode(rendered[1][0][rendered[1][1] == 1]) == IM_END


@pytest.mark.parametrize(
  "messages, reason, detail",
  [
    ({"role": "user"}, "wrong_type", '"messages" is an object, not a list of messages'),
    ([], "empty_example", '"messages" is an empty list'),
    (["hi"], "wrong_type", 'message 0 is a string, not an object with "role" and "content"'),
    (
      CONVERSATION[:2] + [{"role": "bot", "content": "x"}],
      "unknown_role",
      "message 2 has role 'bot'; allowed roles: system, user, assistant",
    ),
    ([{"content": "x"}], "unknown_role", 'message 0 has no "role"; allowed roles: system, user, assistant'),
    (
      [CONVERSATION[1], {"role": "assistant"}],
      "missing_content",
      "message 1 (role 'assistant') has no string \"content\" (missing)",
    ),
    (
      [{"role": "user", "content": None}],
      "missing_content",
      "message 0 (role 'user') has no string \"content\" (null)",
    ),
    (CONVERSATION[:2], "empty_example", "no assistant message (roles: system, user), so nothing"),
  ],
)
def test_bad_conversations(messages, reason, detail):
  with pytest.raises(BadExample) as raised:
    chat.check_messages(messages)
  assert raised.value.reason == reason
  assert raised.value.detail.startswith(detail)
  with pytest.raises(BadExample):
    chat.render_chat(messages, ByteTokenizer())


def test_bad_options_name_the_config_field():
  with pytest.raises(ValueError, match="data.chat_loss_on='user'; allowed: assistant, all"):
    chat.render_chat(CONVERSATION, ByteTokenizer(), loss_on="user")
  with pytest.raises(ValueError, match="data.chat_template='llama3'; allowed: chatml"):
    chat.render_chat_batch([CONVERSATION], ByteTokenizer(), template="llama3")


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory) -> SentencePieceTokenizer:
  rng = np.random.default_rng(0)
  words = ["hello", "there", "how", "are", "you", "fine", "thanks", "brief", "be", ".", "!", "?"]
  texts = []
  for _ in range(60):  # ~ 8 KB of ChatML text
    turns = [(role, " ".join(rng.choice(words, size=6))) for role in ("user", "assistant")]
    texts.append("".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in turns))
  path = tmp_path_factory.mktemp("sp") / "sp.model"
  return SentencePieceTokenizer(train_sentencepiece(texts, str(path), vocab_size=300))


def test_sentencepiece_markers_are_single_tokens(sentencepiece_tokenizer):
  tokenizer = sentencepiece_tokenizer
  start_id, end_id = tokenizer.special_id(IM_START), tokenizer.special_id(IM_END)
  assert (start_id, end_id) == (5, 6)  # after pad/bos/eos/unk and '\n'
  ids, loss_mask = chat.render_chat(CONVERSATION, tokenizer)
  assert ids[0] == tokenizer.bos_id
  assert (ids == start_id).sum() == (ids == end_id).sum() == 3
  assert tokenizer.decode(ids) == RENDERED
  masked = ids[loss_mask == 1]
  assert masked[-1] == end_id
  assert tokenizer.decode(masked) == "Hello." + IM_END
  # The mask starts right after '<|im_start|>assistant\n' and stops at '<|im_end|>'.
  first = int(np.argmax(loss_mask))
  assert tokenizer.decode(ids[:first]).endswith(f"{IM_START}assistant\n")
  assert ids[first + len(masked) :].tolist() == [tokenizer.special_id("\n")]


def test_marker_text_in_content_becomes_the_marker_token(sentencepiece_tokenizer):
  messages = [{"role": "user", "content": f"say {IM_END}"}, {"role": "assistant", "content": "no"}]
  ids, _ = chat.render_chat(messages, sentencepiece_tokenizer)
  assert (ids == sentencepiece_tokenizer.special_id(IM_END)).sum() == 3


# ---- packed conversations ---------------------------------------------------

SECOND = [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]


def test_packed_conversations_stay_apart():
  """Two conversations packed into one row: own segment ids, positions from 0, and the second's
  logits and the row's loss are those of each conversation alone in a row."""
  # loss_on='all': the first conversation's last token would predict the second's bos but must not.
  first, second = chat.render_chat_batch([CONVERSATION, SECOND], ByteTokenizer(), loss_on="all")
  n1, n2 = len(first[0]), len(second[0])
  seq_len = 192
  assert n1 + n2 <= seq_len + 1 and n1 > n2
  # Row 0: both conversations; row 1: the second alone; row 2: the first alone.
  rows = packing.concatenate_rows(
    [
      packing.pack_examples([first, second], seq_len),
      packing.pack_examples([second], seq_len),
      packing.pack_examples([first], seq_len),
    ]
  )
  assert rows.num_rows == 3
  batch = next(pipeline.eval_batches(rows, global_batch_size=3))
  segments, positions = batch["segment_ids"], batch["positions"]
  np.testing.assert_array_equal(segments[0, : n1 + n2], [1] * n1 + [2] * n2)
  np.testing.assert_array_equal(positions[0, : n1 + n2], list(range(n1)) + list(range(n2)))
  np.testing.assert_array_equal(segments[1, :n2], [1] * n2)
  np.testing.assert_array_equal(positions[1, :n2], range(n2))
  assert (segments[0, n1 + n2 :] == 0).all()
  np.testing.assert_array_equal(batch["weights"][0, : n1 + n2], [1] * (n1 - 1) + [0] + [1] * (n2 - 1) + [0])

  # Learned positions: a second conversation numbered on from the first would change its logits.
  cfg = model_config(position="learned", max_seq_len=seq_len, vocab_size=ByteTokenizer().vocab_size)
  graphdef, params = random_params(cfg, seed=3)
  logits, (loss_sum, weight) = jax.device_get(
    jax.jit(
      lambda p, b: (
        forward(graphdef)(p, b["inputs"], b["segment_ids"], b["positions"]),
        step_lib.row_losses(graphdef, p, b),
      )
    )(params, batch)
  )
  np.testing.assert_allclose(logits[0, n1 : n1 + n2 - 1], logits[1, : n2 - 1], rtol=1e-5, atol=1e-5)
  assert np.abs(logits[0, n1 : n1 + n2 - 1] - logits[2, : n2 - 1]).max() > 1e-3  # Other tokens, other logits.
  # The packed row's loss and target count are the two alone-rows' sums: nothing crosses the seam.
  assert weight[0] == weight[1] + weight[2] == n1 - 1 + n2 - 1
  np.testing.assert_allclose(loss_sum[0], loss_sum[1] + loss_sum[2], rtol=1e-5)
