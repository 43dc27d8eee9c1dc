"""Generate text from a loom checkpoint with the key/value cache (model/decode.py).

  python tools/generate.py --checkpoint=workdirs/quickstart --prompt="def " --max_new_tokens=100
  python tools/generate.py --checkpoint=/models/llama-loom --chat --system="Be brief." --prompt="Hi!" \\
    --temperature=0.7 --top_p=0.9
  python tools/generate.py --checkpoint=/runs/sft/checkpoints/2000 --prompts=questions.jsonl --output=answers.jsonl

CHECKPOINT is a workdir (its latest step), its checkpoints/ directory or one checkpoints/STEP, as for
init.checkpoint; a model imported by tools/hf_import.py is one too. The model config and the
tokenizer are the checkpoint's own (its record's config; the tokenizer it names, or the one the run
cached in the workdir). --prompts lines are {"prompt": "..."} or {"messages": [{"role": ..., "content":
...}, ...]}; messages, and --chat prompts (a user message after the --system one), are rendered with
the ChatML template of data/chat.py that chat fine-tuning uses, followed by the header of the
assistant's reply. Generation stops at the tokenizer's eos and, for chat, at <|im_end|>. Flags and
input files are checked before the model is loaded; a bad one is one line naming it.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

from data.files import read_json_lines  # noqa: E402
from training.cli import check_output_path, parse_flags  # noqa: E402

_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "A loom workdir (its latest step), its checkpoints/ directory or one checkpoints/STEP."
)
_STEP = flags.DEFINE_integer("step", -1, "Which step of --checkpoint (-1: the latest).")
_PROMPT = flags.DEFINE_string("prompt", None, "One prompt (text).")
_PROMPTS = flags.DEFINE_string(
  "prompts", None, 'A JSONL file: one {"prompt": "..."} or {"messages": [...]} per line, generated as one batch.'
)
_CHAT = flags.DEFINE_boolean("chat", False, "Prompt as a chat: --prompt (or a line's prompt) is a user message.")
_SYSTEM = flags.DEFINE_string("system", "", "With --chat: the system message before every conversation.")
_QUANTIZE = flags.DEFINE_enum(
  "quantize", "none", ["none", "int8", "int4", "nf4"], "Post-training weight quantization (model/quantization.py)."
)
_QUANTIZATION_BLOCK = flags.DEFINE_integer("quantization_block", 64, "int4 / nf4: input rows sharing one scale.")
_ADD_BOS = flags.DEFINE_boolean(
  "add_bos", False, "Start plain prompts with the tokenizer's bos token (chat prompts always do)."
)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "The most tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the K most likely tokens only (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set of tokens holding this probability (1: all).")
_SEED = flags.DEFINE_integer("seed", 0, "The sampling seed.")
_TENSOR = flags.DEFINE_integer("tensor", 1, "Tensor-parallel ways of the mesh; the other devices split the batch.")
_OUTPUT = flags.DEFINE_string(
  "output", None, "Also write a JSON line per prompt here: its request with completion, prompt_tokens, tokens."
)


def _fail(message: str) -> SystemExit:
  return SystemExit(f"generate: {message}")


def check_flags() -> str | None:
  """The checks of the flags alone; returns --output's absolute path, if given."""
  if (_PROMPT.value is None) == (_PROMPTS.value is None):
    raise _fail("pass exactly one of --prompt and --prompts")
  if _PROMPT.value is not None and not _PROMPT.value and not _ADD_BOS.value and not _CHAT.value:
    raise _fail("--prompt is empty (pass --add_bos to start from the bos token alone)")
  if _SYSTEM.value and not _CHAT.value and _PROMPT.value is not None:
    raise _fail("--system needs --chat")
  if _MAX_NEW_TOKENS.value < 1:
    raise _fail(f"--max_new_tokens={_MAX_NEW_TOKENS.value} must be >= 1")
  if _TEMPERATURE.value < 0:
    raise _fail(f"--temperature={_TEMPERATURE.value} must be >= 0 (0 is greedy)")
  if _TOP_K.value < 0:
    raise _fail(f"--top_k={_TOP_K.value} must be >= 0 (0: all tokens)")
  if not 0 < _TOP_P.value <= 1:
    raise _fail(f"--top_p={_TOP_P.value} must be in (0, 1]")
  if _TENSOR.value < 1:
    raise _fail(f"--tensor={_TENSOR.value} must be >= 1")
  return check_output_path(_OUTPUT.value, "--output", "file") if _OUTPUT.value else None


def read_requests(path: str) -> list[dict]:
  """The --prompts file's records, each {"prompt": str} or {"messages": [...]}; a bad line is a
  one-line error naming the file and the line."""
  where = f"--prompts={path}"
  try:
    records = read_json_lines(path)
  except ValueError as e:
    raise _fail(f"--prompts={e}") from None
  requests = []
  for number, record in records:
    if ("prompt" in record) == ("messages" in record):
      raise _fail(f'{where}:{number}: expected an object with "prompt" (a string) or "messages" (a list)')
    if "prompt" in record and not isinstance(record["prompt"], str):
      raise _fail(f'{where}:{number}: "prompt" is not a string')
    if "messages" in record:
      problem = _conversation_problem(record["messages"])
      if problem:
        raise _fail(f"{where}:{number}: {problem}")
    requests.append(dict(record, line=number))
  if not requests:
    raise _fail(f"{where} holds no prompts (one JSON object per line is expected)")
  return requests


def _conversation_problem(messages) -> str | None:
  from data.bad_data import BadExample
  from data.chat import check_messages

  try:  # An assistant message is what check_messages wants of training data; here the reply is to come.
    check_messages(messages + [{"role": "assistant", "content": ""}] if isinstance(messages, list) else messages)
  except BadExample as e:
    return str(e)
  return None


def _conversation(request: dict, chat: bool, system: str) -> list[dict] | None:
  """The messages a request is rendered from; None for a plain prompt."""
  if "messages" in request:
    messages = list(request["messages"])
  elif chat:
    messages = [{"role": "user", "content": request["prompt"]}]
  else:
    return None
  if system and not any(message["role"] == "system" for message in messages):
    messages.insert(0, {"role": "system", "content": system})
  return messages


def chat_prompt_ids(messages: list[dict], tokenizer) -> list[int]:
  """The ChatML rendering of `messages` (data/chat.py's, as fine-tuning sees it) followed by the
  header of the assistant's reply: transformers' apply_chat_template with add_generation_prompt."""
  from data.chat import render_chat_batch

  # Rendered with an empty assistant reply, whose <|im_end|> (the last run of loss targets) and the
  # newline after it are cut off again: what remains ends with the reply's header.
  ids, loss_mask = render_chat_batch([messages + [{"role": "assistant", "content": ""}]], tokenizer)[0]
  end = len(loss_mask) - 1 - int(loss_mask[::-1].argmax())  # The last target: the reply's end marker.
  start = end
  while start > 0 and loss_mask[start - 1]:
    start -= 1
  return ids[:start].tolist()


def load_tokenizer(data_cfg, workdir: str):
  """The checkpoint's tokenizer: the one its config names, else the one its run cached in `workdir`."""
  from data.tokenizers import build_tokenizer

  def no_corpus():
    raise ValueError(
      f"the run's {data_cfg.tokenizer} tokenizer is not in {os.path.join(workdir, 'tokenizer')} and its "
      "config names no data.tokenizer_path"
    )

  return build_tokenizer(data_cfg, no_corpus, workdir)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax reports every step of a restore at INFO.
  output_path = check_flags()
  requests = [{"prompt": _PROMPT.value}] if _PROMPT.value is not None else read_requests(_PROMPTS.value)

  from training.checkpointing import locate

  try:
    directory, step = locate(_CHECKPOINT.value, _STEP.value, field="--checkpoint")
  except ValueError as e:
    raise _fail(str(e)) from None
  from tools.huggingface_io import checkpoint_config

  try:
    config, _ = checkpoint_config(os.path.join(directory, str(step)))
    tokenizer = load_tokenizer(config.data, os.path.dirname(directory))
  except ValueError as e:
    raise _fail(f"--checkpoint={_CHECKPOINT.value}: {e}") from None

  prompts, chats = [], []
  for request in requests:
    messages = _conversation(request, _CHAT.value, _SYSTEM.value)
    chats.append(messages is not None)
    if messages is not None:
      ids = chat_prompt_ids(messages, tokenizer)
    else:
      ids = tokenizer.encode_batch([request["prompt"]])[0].tolist()
      if _ADD_BOS.value and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id] + ids
    prompts.append(ids)
  model_cfg = config.model
  room = model_cfg.max_seq_len - _MAX_NEW_TOKENS.value
  for request, ids in zip(requests, prompts):
    where = f"--prompts={_PROMPTS.value} line {request['line']}" if "line" in request else "--prompt"
    if not ids:
      raise _fail(f"{where}: the prompt has no tokens (pass --add_bos to start from the bos token alone)")
    if len(ids) > room:
      raise _fail(
        f"{where}: the prompt has {len(ids)} tokens; with --max_new_tokens={_MAX_NEW_TOKENS.value} it needs "
        f"{len(ids) + _MAX_NEW_TOKENS.value} positions, more than the model's max_seq_len={model_cfg.max_seq_len}"
      )

  outputs = _generate(config, directory, step, prompts, tokenizer, chat=any(chats))
  records = []
  for request, ids, tokens, chat in zip(requests, prompts, outputs, chats):
    text = tokenizer.decode(tokens)
    if chat:
      from data.special_tokens import IM_END

      text = text.split(IM_END)[0]  # A marker spelled out in text (byte and char tokenizers).
      print(text)
    else:
      print(tokenizer.decode(ids) + text)
    if len(requests) > 1:
      print("---")
    request = {key: value for key, value in request.items() if key != "line"}
    records.append(dict(request, completion=text, prompt_tokens=ids, tokens=tokens))
  if output_path:
    from data.files import atomic_write

    with atomic_write(output_path) as f:
      f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def _generate(config, directory: str, step: int, prompts: list[list[int]], tokenizer, chat: bool):
  """Restores the parameters onto a (data, tensor) mesh of all devices and generates."""
  import jax

  import model as model_lib
  import sharding
  from data.special_tokens import IM_END
  from evaluation.loading import quantize_params, restore_params
  from training.setup import build_setup
  from training.validation import validate

  try:
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=_TENSOR.value))
  except ValueError as e:
    raise _fail(f"--tensor={_TENSOR.value}: {e}") from None
  # The run's model (with its LoRA adapters and their base, if it had them) on this mesh.
  config = config.copy_and_resolve_references()
  config.mesh.update(data=mesh.shape["data"], fsdp=1, tensor=mesh.shape["tensor"])
  config.train.update(global_batch_size=mesh.shape["data"], microbatches=1)
  config.distillation.teacher = ""  # Training's alone: a distilled model generates without its teacher.
  setup = build_setup(validate(config, jax.device_count()), mesh)
  graphdef, params = setup.graphdef, restore_params(setup, directory, step)
  if _QUANTIZE.value != "none":
    graphdef, params = quantize_params(graphdef, params, _QUANTIZE.value, _QUANTIZATION_BLOCK.value, mesh)
  stops = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
  if chat and tokenizer.special_id(IM_END) is not None:
    stops.append(tokenizer.special_id(IM_END))
  return model_lib.generate(
    graphdef,
    params,
    prompts,
    _MAX_NEW_TOKENS.value,
    temperature=_TEMPERATURE.value,
    top_k=_TOP_K.value,
    top_p=_TOP_P.value,
    stop_tokens=stops,
    seed=_SEED.value,
    mesh=mesh,
  )


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint"])
  app.run(main, flags_parser=parse_flags)
