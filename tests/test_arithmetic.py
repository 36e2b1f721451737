"""The offline arithmetic task: exact rows for a seed, multimodal train chains, disjoint splits, exact checker
verdicts on crafted right and wrong chains, the tokenizer through AutoTokenizer, and gkd_jax.data on task rows."""

import collections
import itertools
import json
import os
import pathlib

import numpy as np
import pytest
from transformers import AutoTokenizer

from gkd_jax import data
from gkd_jax import rows as rows_lib
from gkd_jax.tasks import arithmetic as ar


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("arith"))
  paths = ar.make_task(out, seed=1, num_train=600, num_test=200, num_test_long=50)
  return out, paths


@pytest.fixture(scope="module")
def splits(task):
  return ar.load_task(task[0])


@pytest.fixture(scope="module")
def tok(task):
  return AutoTokenizer.from_pretrained(task[1]["tokenizer"])


def chain_values(completion):
  """The operands in the order a valid chain adds them."""
  steps = ar.parse_completion(completion).steps
  return (steps[0][0],) + tuple(b for _, b, _ in steps)


def multiset(row):
  return tuple(sorted(row["operands"]))


# --------------------------------------------------------------------------------------------- generation


def test_exact_rows_for_seed_zero():
  ds = ar.build_dataset(seed=0, num_train=3, num_test=2, num_test_long=1)
  texts = {name: [[m["content"] for m in r["messages"]] for r in split] for name, split in ds.items()}
  assert texts == {
      "train": [
          ["Add 17+35+46+30+64", "35+64=99 99+46=145 145+17=162 162+30=192 Answer: 192"],
          ["Add 23+49+20+14+39", "14+39=53 53+20=73 73+23=96 96+49=145 Answer: 145"],
          ["Add 20+95+43+15+53", "20+15=35 35+95=130 130+43=173 173+53=226 Answer: 226"],
      ],
      "test": [
          ["Add 67+56+34+37+13", "67+56=123 123+34=157 157+37=194 194+13=207 Answer: 207"],
          ["Add 11+25+83", "11+25=36 36+83=119 Answer: 119"],
      ],
      "test_long": [
          ["Add 90+99+60+37+82+30+96", "90+99=189 189+60=249 249+37=286 286+82=368 368+30=398 398+96=494 Answer: 494"]
      ],
  }
  assert [r["role"] for r in ds["train"][0]["messages"]] == ["user", "assistant"]
  assert ds["train"][0]["operands"] == [17, 35, 46, 30, 64] and ds["train"][0]["answer"] == 192


def test_deterministic_prefix_stable_and_seeded():
  small = ar.build_dataset(seed=3, num_train=40, num_test=20)
  big = ar.build_dataset(seed=3, num_train=120, num_test=20)
  assert small["train"].to_list() == big["train"].to_list()[:40]  # data-efficiency subsets are prefixes
  assert small["test"].to_list() == big["test"].to_list()  # the test set does not depend on num_train
  assert ar.build_dataset(seed=3, num_train=40, num_test=20)["train"].to_list() == small["train"].to_list()
  assert ar.build_dataset(seed=4, num_train=40, num_test=20)["train"].to_list() != small["train"].to_list()
  # shuffle_train changes only the chains' order, never the problems.
  fixed = ar.build_dataset(seed=3, num_train=40, num_test=20, shuffle_train=False)
  assert fixed["train"]["operands"] == small["train"]["operands"]
  assert all(r["messages"][1]["content"] == ar.format_completion(r["operands"]) for r in fixed["train"])


def test_train_chains_are_multimodal_test_chains_canonical(splits):
  train, test = splits["train"], splits["test"]
  assert all(ar.check_chain(r, r["messages"][1]["content"]) for r in train)
  reordered = [chain_values(r["messages"][1]["content"]) != tuple(r["operands"]) for r in train]
  # A uniform permutation of k in {3, 4, 5} operands keeps the prompt order with probability ~0.07.
  assert sum(reordered) / len(train) > 0.85
  # Every order occurs: the position each 3-operand chain takes its operands from covers all 3! perms.
  perms = collections.Counter(
      tuple(r["operands"].index(v) for v in chain_values(r["messages"][1]["content"]))
      for r in train
      if len(r["operands"]) == 3 and len(set(r["operands"])) == 3
  )
  assert set(perms) == set(itertools.permutations(range(3)))
  assert min(perms.values()) >= 0.4 * sum(perms.values()) / 6
  for name in ("test", "test_long"):
    assert all(r["messages"][1]["content"] == ar.format_completion(r["operands"]) for r in splits[name])
  assert len(test) == 200 and len(splits["test_long"]) == 50


def test_splits_disjoint_unique_and_sized(splits):
  keys = {name: [multiset(r) for r in split] for name, split in splits.items()}
  for name, ks in keys.items():
    assert len(set(ks)) == len(ks), name
  for a, b in itertools.combinations(keys, 2):
    assert not set(keys[a]) & set(keys[b]), (a, b)
  for name, (lo, hi) in [("train", (3, 5)), ("test", (3, 5)), ("test_long", (6, 7))]:
    sizes = {len(r["operands"]) for r in splits[name]}
    assert min(sizes) >= lo and max(sizes) <= hi
    assert all(10 <= x <= 99 for r in splits[name] for x in r["operands"])
    assert all(r["answer"] == sum(r["operands"]) for r in splits[name])
  assert {len(r["operands"]) for r in splits["train"]} == {3, 4, 5}


def test_partial_shuffle_gives_a_dominant_mode_and_keeps_problems():
  full = ar.build_dataset(seed=5, num_train=2000, num_test=10, num_operands=(3, 3))
  part = ar.build_dataset(seed=5, num_train=2000, num_test=10, num_operands=(3, 3), shuffle_train=0.3)
  assert part["train"]["operands"] == full["train"]["operands"] and part["test"].to_list() == full["test"].to_list()
  in_order = [chain_values(r["messages"][1]["content"]) == tuple(r["operands"]) for r in part["train"]]
  # 70% keep the prompt's order, and a uniform permutation of the other 30% keeps it 1 time in 6: 75%.
  assert 0.72 < np.mean(in_order) < 0.78
  assert all(ar.check_chain(r, r["messages"][1]["content"]) for r in part["train"])
  as_float = ar.build_dataset(seed=5, num_train=10, num_test=0, shuffle_train=1.0)
  assert as_float["train"].to_list() == ar.build_dataset(seed=5, num_train=10, num_test=0)["train"].to_list()
  for bad in (1.5, -0.1, "x"):
    with pytest.raises(ValueError, match="shuffle_train=.* must be a probability in \\[0, 1\\]"):
      ar.build_dataset(seed=0, num_train=1, num_test=1, shuffle_train=bad)


def test_validation_split_is_new_and_leaves_the_others_alone():
  plain = ar.build_dataset(seed=2, num_train=300, num_test=50, num_test_long=20)
  ds = ar.build_dataset(seed=2, num_train=300, num_test=50, num_test_long=20, num_validation=60)
  assert list(ds) == ["train", "validation", "test", "test_long"] and len(ds["validation"]) == 60
  assert ds["test"].to_list() == plain["test"].to_list() and ds["test_long"].to_list() == plain["test_long"].to_list()
  val = {multiset(r) for r in ds["validation"]}
  assert not val & {multiset(r) for name in ("train", "test", "test_long") for r in ds[name]}
  assert all(r["messages"][1]["content"] == ar.format_completion(r["operands"]) for r in ds["validation"])
  assert "validation" not in plain


def test_size_knobs_and_their_limits():
  ds = ar.build_dataset(seed=0, num_train=300, num_test=0, num_operands=(2, 2), digits=(1, 3))
  assert len(ds["test"]) == 0 and all(len(r["operands"]) == 2 for r in ds["train"])
  assert {len(str(x)) for r in ds["train"] for x in r["operands"]} == {1, 2, 3}
  with pytest.raises(ValueError, match="num_operands"):
    ar.build_dataset(seed=0, num_train=1, num_test=1, num_operands=(1, 3))
  with pytest.raises(ValueError, match="digits"):
    ar.build_dataset(seed=0, num_train=1, num_test=1, digits=(0, 2))
  # Two 1-digit operands make only 45 distinct problems: asking for more fails instead of looping.
  with pytest.raises(ValueError, match="found only 45 of 50"):
    ar.build_dataset(seed=0, num_train=50, num_test=0, num_operands=(2, 2), digits=(1, 1))


def test_prompt_only_rows(splits, tok):
  prompts = ar.prompt_only(splits["test"])
  assert prompts[0]["messages"] == splits["test"][0]["messages"][:1]
  assert prompts["operands"] == splits["test"]["operands"]
  out = rows_lib.tokenize_row(prompts[0], 0, tok, "messages")
  assert out["has_completion"] is False
  assert out["prompt_ids"] == rows_lib.tokenize_row(splits["test"][0], 0, tok, "messages")["prompt_ids"]


# ------------------------------------------------------------------------------------------------ checker

OPS = [23, 58, 71]  # sum 152

RIGHT = [
    "23+58=81 81+71=152 Answer: 152",
    "71+23=94 94+58=152 Answer: 152",  # any order
    "58+71=129 129+23=152 Answer: 152",
    "  23+58=81 81+71=152 Answer: 152\n",  # surrounding whitespace
    "23+58=81 81+71=152 Answer: 152<|im_end|>",  # generation's own EOS
    "23+58=81 81+71=152 Answer: 152<|im_end|><|endoftext|><|endoftext|>",  # and pads after it
    "23+58=81 81+71=152 Answer: 152<|im_end|>anything after EOS is ignored",
]

# (completion, check_answer, check_chain)
WRONG = [
    ("23+58=82 82+71=153 Answer: 153", False, False),  # wrong partial sum propagated
    ("23+58=81 81+71=153 Answer: 153", False, False),  # wrong last partial sum
    ("23+58=82 82+71=153 Answer: 152", True, False),  # wrong chain, right answer
    ("23+58=81 80+71=151 Answer: 152", True, False),  # a step not continuing the running sum
    ("23+58=81 Answer: 81", False, False),  # missing operand
    ("23+58=81 81+71=152 152+23=175 Answer: 175", False, False),  # operand used twice
    ("23+58=81 81+94=175 Answer: 175", False, False),  # a foreign operand
    ("23+58=81 81+71=152 Answer: 153", False, False),  # wrong final answer
    ("23+58=81 81+71=152 Answer: 0152", False, False),  # not written exactly
    ("23+58=081 081+71=152 Answer: 152", True, False),  # leading zeros in the chain
    ("23+58=81  81+71=152 Answer: 152", True, False),  # double space
    ("23 + 58 = 81 81 + 71 = 152 Answer: 152", True, False),  # spaced operators
    ("Answer: 152", True, False),  # answer only
    ("152", False, False),
    ("23+58=81 81+71=152 Answer: 152 Answer: 152", False, False),  # two answers
    ("Answer: 152 23+58=81 81+71=152", False, False),  # answer not at the end
    ("23+58=81 81+71=152 Answer: 152.", False, False),
    ("23+58=81 81+71=152 answer: 152", False, False),
    ("23+58=81 81+71=152 Answer:152", False, False),
    ("23+58=81 81+71=152 Answer: ١٥٢", False, False),  # non-ASCII digits int() would accept
    ("23+58=81 81+71=152 Answer: " + "9" * 5000, False, False),  # runaway digits
    ("<|im_end|>23+58=81 81+71=152 Answer: 152", False, False),  # nothing before EOS
    ("23+58=81 81+71=152<|im_start|>Answer: 152", False, False),
    ("", False, False),
    ("+++===<|unk|>\n\n Answer: ", False, False),
    (None, False, False),
    (b"23+58=81 81+71=152 Answer: 152", False, False),
    (152, False, False),
]


@pytest.mark.parametrize("completion", RIGHT)
def test_checker_accepts_correct_chains(completion):
  assert ar.check_answer(OPS, completion) and ar.check_chain(OPS, completion)


@pytest.mark.parametrize("completion,answer_ok,chain_ok", WRONG)
def test_checker_verdicts_on_wrong_and_garbage(completion, answer_ok, chain_ok):
  assert ar.check_answer(OPS, completion) is answer_ok
  assert ar.check_chain(OPS, completion) is chain_ok


def test_every_one_character_edit_of_a_chain_is_rejected():
  chain = RIGHT[0]
  alphabet = [t for t in ar.CHARACTERS] + ["A", "x"]
  for i, new in itertools.product(range(len(chain)), alphabet):
    edited = chain[:i] + new + chain[i + 1 :]
    if edited != chain:
      assert not ar.check_chain(OPS, edited), edited
  for i in range(len(chain)):  # deletions
    assert not ar.check_chain(OPS, chain[:i] + chain[i + 1 :])


def test_checker_never_raises_on_random_token_soup(tok):
  rng = np.random.default_rng(0)
  for _ in range(300):
    text = tok.decode(rng.integers(0, len(tok), size=rng.integers(0, 40)).tolist())
    assert isinstance(ar.check_answer(OPS, text), bool) and isinstance(ar.check_chain(OPS, text), bool)


def test_checker_takes_operands_prompts_and_rows(splits, tok):
  row = splits["test"][0]
  completion = row["messages"][1]["content"]
  rendered = tok.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True)
  problems = [
      row,
      row["operands"],
      tuple(row["operands"]),
      row["messages"][0]["content"],
      row["messages"][:1],
      rendered,
      {"messages": row["messages"]},
      {"prompt": row["messages"][0]["content"]},
  ]
  for problem in problems:
    assert ar.operands_of(problem) == tuple(row["operands"])
    assert ar.check_chain(problem, completion)
  for bad in [[5], "no problem here", "Add 1+2 and Add 3+4", {"text": "Add 1+2"}, [1, -2], [True, 1], None]:
    with pytest.raises(ValueError):
      ar.operands_of(bad)


def test_evaluate_and_diversity():
  problems = [OPS, [10, 20, 30], "Add 1+2+3+4"]
  completions = ["71+23=94 94+58=152 Answer: 152", "10+20=31 31+30=61 Answer: 60", "garbage"]
  # The second has the right answer after a wrong chain.
  assert ar.evaluate(completions, problems) == {"accuracy": 2 / 3, "chain_accuracy": 1 / 3, "count": 3}
  completions[1] = "10+20=30 30+30=60 Answer: 60"
  assert ar.evaluate(completions, problems) == {"accuracy": 2 / 3, "chain_accuracy": 2 / 3, "count": 3}
  with pytest.raises(ValueError, match="one completion per problem"):
    ar.evaluate(completions[:2], problems)
  samples = RIGHT[:3] + [RIGHT[0], RIGHT[4]] + [w for w, _, _ in WRONG[:4]]
  assert ar.distinct_valid_chains(samples, OPS) == 3


@pytest.mark.parametrize(
    "completion, kind",
    [
        ("23+58=81 81+71=152 Answer: 152", "valid"),
        ("71+23=94 94+58=152 Answer: 152", "valid"),  # another order is as valid
        ("23+58=81 81+71=152", "format"),  # cut before the answer
        ("23+58=81 81+71=152 Answer:", "format"),
        ("23+58=81  81+71=152 Answer: 152", "format"),
        ("23+85=108 108+71=179 Answer: 179", "operand"),  # digits of an operand swapped, added correctly
        ("23+58=81 81+58=139 Answer: 139", "operand"),  # an operand repeated, another left out
        ("23+58=81 Answer: 81", "operand"),  # an operand left out
        ("23+58=81 18+71=89 Answer: 89", "running_sum"),
        ("23+58=71 71+71=142 Answer: 142", "carry"),  # 81 written 71: the carry dropped
        ("23+58=81 81+71=252 Answer: 252", "carry"),  # an invented hundred
        ("23+58=82 82+71=153 Answer: 153", "sum"),
        ("23+58=81 81+71=152 Answer: 151", "answer"),
    ],
)
def test_classify_error_names_the_first_fault(completion, kind):
  assert ar.classify_error(OPS, completion) == kind
  assert (kind == "valid") == ar.check_chain(OPS, completion)


def test_error_breakdown_shares_and_minor_modes():
  completions = ["23+58=81 81+71=152 Answer: 152", "garbage", "23+58=71 71+71=142 Answer: 142", None]
  shares = ar.error_breakdown(completions, [OPS] * 4)
  assert list(shares) == list(ar.ERROR_KINDS) and sum(shares.values()) == pytest.approx(1.0)
  assert shares["valid"] == 0.25 and shares["format"] == 0.5 and shares["carry"] == 0.25
  with pytest.raises(ValueError, match="at least one"):
    ar.error_breakdown([], [])
  # Minor modes: any valid order but the prompt's; None for chains that are not valid.
  assert ar.minor_mode(OPS, "23+58=81 81+71=152 Answer: 152") is False
  assert ar.minor_mode(OPS, "58+23=81 81+71=152 Answer: 152") is True
  assert ar.minor_mode(OPS, "58+23=81 81+71=153 Answer: 153") is None
  assert ar.operand_order(OPS, "71+23=94 94+58=152 Answer: 152") == (71, 23, 58)


def test_dataset_rows_pass_their_own_checker(splits):
  for name, split in splits.items():
    scores = ar.evaluate([r["messages"][1]["content"] for r in split], split)
    assert scores == {"accuracy": 1.0, "chain_accuracy": 1.0, "count": len(split)}, name


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_loads_offline_with_specials(task, tok):
  assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: a hub lookup would fail here
  assert len(tok) == len(ar.VOCAB) <= 64
  assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0
  assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
  assert tok.convert_tokens_to_ids("<|im_start|>") == 1 and tok.bos_token_id is None
  assert tok.convert_ids_to_tokens(list(range(len(tok)))) == list(ar.VOCAB)


def test_tokenizer_round_trips_task_text_exactly(splits, tok):
  unk = tok.unk_token_id
  texts = [m["content"] for split in splits.values() for r in split.select(range(50)) for m in r["messages"]]
  texts += ["Add 0+9\n", "system: 1-2*3=4, 5.6?", "<|im_start|>user\nAdd 1+2<|im_end|>\n<|endoftext|>"]
  for text in texts:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert unk not in ids and tok.decode(ids) == text
  # Digits and operators are one token each, template words one token: short sequences for tiny models.
  assert tok.tokenize("Add 23+58 Answer: 152") == [
      "Add",
      " ",
      "2",
      "3",
      "+",
      "5",
      "8",
      " ",
      "Answer",
      ":",
      " ",
      "1",
      "5",
      "2",
  ]
  assert tok.tokenize("x") == ["<|unk|>"]


def test_chat_template_renders_prompts(tok):
  msgs = [{"role": "user", "content": "Add 23+58+71"}]
  want = "<|im_start|>user\nAdd 23+58+71<|im_end|>\n<|im_start|>assistant\n"
  assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == want
  assert tok.apply_chat_template(msgs, tokenize=False) == want[: -len("<|im_start|>assistant\n")]
  ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
  assert ids == tok(want, add_special_tokens=False)["input_ids"] and tok.decode(ids) == want
  system = [{"role": "system", "content": "Add."}] + msgs
  assert tok.apply_chat_template(system, tokenize=False).startswith("<|im_start|>system\nAdd.<|im_end|>\n")


def test_build_tokenizer_is_idempotent(tmp_path):
  path = ar.build_tokenizer(str(tmp_path / "tok"))
  files = {f: os.stat(os.path.join(path, f)).st_mtime_ns for f in os.listdir(path)}
  assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)
  assert ar.build_tokenizer(path) == path
  assert {f: os.stat(os.path.join(path, f)).st_mtime_ns for f in os.listdir(path)} == files
  other = ar.build_tokenizer(str(tmp_path / "again"))
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert pathlib.Path(path, name).read_text() == pathlib.Path(other, name).read_text()


# ------------------------------------------------------------------------------------- with gkd_jax.data


def test_data_pipeline_tokenizes_task_rows(splits, tok):
  row = splits["test"][1]
  prompt, completion = (m["content"] for m in row["messages"])
  out = rows_lib.tokenize_row(row, 0, tok, "messages")
  assert tok.decode(out["prompt_ids"]) == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
  assert tok.decode(out["completion_ids"]) == completion + "<|im_end|>"
  assert out["completion_ids"][-1] == tok.eos_token_id and tok.eos_token_id not in out["completion_ids"][:-1]
  assert len(out["prompt_ids"]) + len(out["completion_ids"]) < 80  # "a few dozen tokens"

  rows = splits["train"].select(range(8))
  loader = data.DataLoader(rows, tok, batch_size=8, shuffle=False, process_index=0, process_count=1)
  batch = loader.batch(0)
  for i, r in enumerate(rows):
    p = batch["prompt_ids"][i][batch["prompt_mask"][i]].tolist()
    c = batch["completion_ids"][i][batch["completion_mask"][i]].tolist()
    assert tok.decode(p + c) == tok.apply_chat_template(r["messages"], tokenize=False).rstrip("\n")
    assert ar.check_chain(r, tok.decode(c))
  assert (batch["prompt_ids"][~batch["prompt_mask"]] == tok.pad_token_id).all()


# ------------------------------------------------------------------------------------------- make_task


def test_make_task_writes_loadable_cached_files(task, splits):
  out, paths = task
  assert paths == {"tokenizer": f"{out}/tokenizer", "data": f"{out}/data", "spec": f"{out}/task.json"}
  spec = json.loads(pathlib.Path(paths["spec"]).read_text())
  assert spec["splits"] == {"train": 600, "test": 200, "test_long": 50}
  assert spec["inputs"]["seed"] == 1 and spec["inputs"]["num_operands"] == [3, 5]
  want = ar.build_dataset(seed=1, num_train=600, num_test=200, num_test_long=50)
  assert rows_lib.load_rows(paths["data"], split="test").to_list() == want["test"].to_list()
  assert splits["train"].to_list() == want["train"].to_list()
  before = {p: os.stat(p).st_mtime_ns for p in paths.values()}
  assert ar.make_task(out, seed=1, num_train=600, num_test=200, num_test_long=50) == paths
  assert {p: os.stat(p).st_mtime_ns for p in paths.values()} == before  # cached: nothing rewritten
  assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_make_task_rebuilds_on_new_inputs(tmp_path):
  out = str(tmp_path)
  ar.make_task(out, seed=0, num_train=5, num_test=3)
  first = ar.load_task(out)["train"].to_list()
  ar.make_task(out, seed=0, num_train=7, num_test=3)
  task = ar.load_task(out)
  assert len(task["train"]) == 7 and task["train"].to_list()[:5] == first and "test_long" not in task
  assert json.loads(pathlib.Path(out, "task.json").read_text())["inputs"]["num_train"] == 7
