"""lm-evaluation-harness on a loom checkpoint: local YAML tasks over local JSONL, nothing downloaded."""

import json
import os

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from evaluation import harness, loading, tasks  # noqa: E402
from tests.test_tasks import SOUNDS, trained_workdir  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHOICE_TASK = """
task: animals_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""

GENERATE_TASK = """
task: animals_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{reference}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    ignore_case: true
    regexes_to_ignore: ["^\\\\s+"]
"""


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
  model = loading.load_model(loading.checkpoint_config(trained_workdir(tmp_path_factory.getbasetemp())))
  return harness.LoomLM(model=model, batch_size=8)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def write_task(directory, template, records):
  data = directory / "animals.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in records))
  (directory / "task.yaml").write_text(template.format(data=data))
  return str(directory)


def test_lm_eval_runs_a_local_multiple_choice_task(lm, tmp_path):
  animals = list(SOUNDS)
  records = [
    {"prompt": f"the {a} says", "choices": [f" {SOUNDS[animals[i - 1]]}.", f" {SOUNDS[a]}."], "answer": 1}
    for i, a in enumerate(animals)
  ]
  results = harness.run_harness(lm, ["animals_choice"], include_path=write_task(tmp_path, CHOICE_TASK, records))
  assert results["animals_choice"]["acc,none"] == 1.0
  assert results["animals_choice"]["acc_norm,none"] == 1.0


def test_lm_eval_runs_a_local_generation_task(lm, tmp_path):
  records = [{"prompt": f"the {a} says", "reference": sound} for a, sound in SOUNDS.items()]
  results = harness.run_harness(lm, ["animals_generate"], include_path=write_task(tmp_path, GENERATE_TASK, records))
  assert results["animals_generate"]["exact_match,none"] == 1.0


def test_loglikelihoods_agree_with_each_other(lm):
  def instance(kind, args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)

  text = "the cow says moo."
  (rolling,) = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])
  ((whole, _),) = lm.loglikelihood([instance("loglikelihood", ("", text))])
  assert rolling == pytest.approx(whole, abs=1e-4)
  (answer, greedy), (wrong, not_greedy) = lm.loglikelihood(
    [instance("loglikelihood", ("the cow says", " moo.")), instance("loglikelihood", ("the cow says", " woof."))]
  )
  assert greedy and not not_greedy and answer > wrong
  # Longer than the model's 32 positions: windows, every token scored once.
  long_text = " ".join(f"the {a} says {s}." for a, s in SOUNDS.items())
  (long_rolling,) = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (long_text,))])
  (score,) = lm.scorer.rolling([lm.model.tokenizer.encode_batch([long_text])[0].tolist()])
  assert score.tokens == len(long_text) and long_rolling == pytest.approx(score.logprob) and score.logprob < 0


def test_the_shipped_example_tasks_run(lm, monkeypatch):
  monkeypatch.chdir(REPO_ROOT)  # Their data_files are relative to the repository root.
  include = os.path.join("evaluation", "examples", "lm_eval")
  results = harness.run_harness(lm, ["loom_example_choice", "loom_example_qa"], include_path=include)
  assert 0.0 <= results["loom_example_choice"]["acc,none"] <= 1.0
  assert "exact_match,none" in results["loom_example_qa"]
  assert len(tasks.read_task(os.path.join("evaluation", "examples", "choice.jsonl"), "choice")) == 3


def test_an_unknown_task_is_one_line(lm, tmp_path):
  with pytest.raises(ValueError, match=r"--lm_eval: no task named no_such_task"):
    harness.run_harness(lm, ["no_such_task"], include_path=str(tmp_path))
