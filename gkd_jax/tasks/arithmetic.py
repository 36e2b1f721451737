"""Multi-step addition with a chain of thought: the offline task of the demo and of the paper-replication sweeps.

A problem is a tuple of operands, drawn in the order the prompt lists them. Its chat row is

    user       Add 23+58+71
    assistant  23+58=81 81+71=152 Answer: 152

The assistant adds one operand per step to a running sum and ends with the answer. In the train split each
chain adds the operands in a random order (the prompt keeps the drawn order), so a teacher trained on it
spreads its probability over up to k! equally correct chains. That multimodality is what separates forward
KL, reverse KL and JSD(β): with a one-hot teacher they all reduce to cross-entropy. Test splits keep the
prompt's order; the checkers accept any order.

Rows (`datasets.DatasetDict` with `train`, `test` and optionally `validation`, for choosing hyperparameters
without touching test, and `test_long`, longer problems than trained on)
have a `messages` column, the layout `gkd_jax.rows` reads, plus `operands` and `answer` for the checkers;
`prompt_only` drops the assistant turns for on-policy training. No problem (as a multiset of operands) occurs
twice across all splits. Everything is a pure function of the seed and the size knobs; for fixed knobs the
train split of `num_train=N` is a prefix of that of any larger `num_train` (data-efficiency runs subsample
without changing the test set).

The tokenizer is a word-level `tokenizers` model over 29 tokens: digits and operators one character each,
the few words of the template and the prompt whole, ChatML specials (`<|endoftext|>` pad, `<|im_start|>`,
`<|im_end|>` eos). It is saved with `save_pretrained`, so runs load it with `AutoTokenizer.from_pretrained`
exactly as a real model's.

    paths = make_task("/tmp/arith", seed=0, num_train=20000, num_test=500)
    tokenizer = transformers.AutoTokenizer.from_pretrained(paths["tokenizer"])
    rows = gkd_jax.rows.load_rows(paths["data"], split="train")
    evaluate(completions, load_task("/tmp/arith")["test"])   # {'accuracy': ..., 'chain_accuracy': ...}
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from typing import Any, Iterable, Sequence

import datasets
import numpy as np

from gkd_jax import file_cache

# Bump when the rows a given spec produces change, so cached task directories are rebuilt.
TASK_VERSION = 1

PAD_TOKEN, IM_START, EOS_TOKEN, UNK_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, EOS_TOKEN, UNK_TOKEN)
# A few spare operators keep the vocabulary usable for variants (subtraction, products) without a new id map.
CHARACTERS = ("\n", " ") + tuple("0123456789") + tuple("+-*=:.,?")
WORDS = ("user", "assistant", "system", "Add", "Answer")
VOCAB = SPECIAL_TOKENS + CHARACTERS + WORDS
# Pre-tokenization: whole words, then single digits, whitespace and punctuation (specials are matched first).
_PIECES = r"[A-Za-z]+|[0-9]|\s|[^A-Za-z0-9\s]"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Numbers as the task writes them: ASCII digits, no leading zeros, and few enough digits that int() is cheap
# and never hits Python's digit limit on a model's runaway output.
_NUM = r"(?:0|[1-9][0-9]{0,17})"
_NUM_RE = re.compile(_NUM)
_STEP_RE = re.compile(rf"({_NUM})\+({_NUM})=({_NUM})")
_PROMPT_RE = re.compile(rf"(?<![A-Za-z])Add ({_NUM}(?:\+{_NUM})+)(?![0-9+])")
_ANSWER_RE = re.compile(rf"(?:^| )Answer: ({_NUM})\Z")
_SPECIAL_RE = re.compile(r"<\|[a-z_]+\|>")

FEATURES = datasets.Features(
    {
        "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "operands": datasets.Sequence(datasets.Value("int64")),
        "answer": datasets.Value("int64"),
    }
)
# Independent random streams per split: the test set does not depend on num_train.
_SPLIT_STREAMS = {"test": 0, "test_long": 1, "train": 2, "validation": 3}
_SPLIT_ORDER = ("train", "validation", "test", "test_long")


# ------------------------------------------------------------------------------------------- formatting


def format_prompt(operands: Sequence[int]) -> str:
  return "Add " + "+".join(str(x) for x in operands)


def format_completion(operands: Sequence[int], order: Sequence[int] | None = None) -> str:
  """The chain adding operands[order[0]], operands[order[1]], ... (the prompt's order when order is None)."""
  seq = [int(operands[i]) for i in order] if order is not None else [int(x) for x in operands]
  steps, total = [], seq[0]
  for x in seq[1:]:
    steps.append(f"{total}+{x}={total + x}")
    total += x
  return " ".join(steps + [f"Answer: {total}"])


def make_row(operands: Sequence[int], order: Sequence[int] | None = None) -> dict:
  operands = [int(x) for x in operands]
  return {
      "messages": [
          {"role": "user", "content": format_prompt(operands)},
          {"role": "assistant", "content": format_completion(operands, order)},
      ],
      "operands": operands,
      "answer": sum(operands),
  }


# ------------------------------------------------------------------------------------------- generation


def _check_range(name: str, value: Sequence[int], low: int, high: int) -> tuple[int, int]:
  lo, hi = (int(v) for v in value)
  if not low <= lo <= hi <= high:
    raise ValueError(f"{name}={tuple(value)} must be (lo, hi) with {low} <= lo <= hi <= {high}")
  return lo, hi


def draw_problems(
    rng: np.random.Generator, count: int, num_operands: Sequence[int], digits: Sequence[int], seen: set
) -> list[tuple[int, ...]]:
  """`count` problems whose operand multisets are not in `seen` (which they are added to).

  The operand count is uniform in num_operands, each operand's digit count uniform in digits, then its value
  uniform among numbers of that many digits (1-digit numbers start at 1), so short numbers are not swamped.
  """
  k_lo, k_hi = _check_range("num_operands", num_operands, 2, 1000)
  d_lo, d_hi = _check_range("digits", digits, 1, 12)
  problems, misses = [], 0
  while len(problems) < count:
    k = int(rng.integers(k_lo, k_hi + 1))
    sizes = rng.integers(d_lo, d_hi + 1, size=k)
    ops = tuple(int(rng.integers(10 ** (d - 1), 10**d)) for d in sizes)
    key = tuple(sorted(ops))
    if key in seen:
      misses += 1
      if misses > 10_000:  # the space is (nearly) exhausted: fail instead of looping forever
        raise ValueError(
            f"found only {len(problems)} of {count} new problems with num_operands="
            f"{tuple(num_operands)}, digits={tuple(digits)}; widen the ranges or ask for fewer"
        )
      continue
    misses = 0
    seen.add(key)
    problems.append(ops)
  return problems


def build_dataset(
    *,
    seed: int,
    num_train: int,
    num_test: int,
    num_operands: Sequence[int] = (3, 5),
    digits: Sequence[int] = (2, 2),
    shuffle_train: float | bool = True,
    num_test_long: int = 0,
    long_num_operands: Sequence[int] = (6, 7),
    num_validation: int = 0,
) -> datasets.DatasetDict:
  """Splits `train`, `test` (prompt order) and, when their counts are > 0, `validation` (like test) and
  `test_long` (long_num_operands operands, prompt order). Problems are drawn test first, then test_long,
  validation and train, each new to all before it (so num_validation=0 leaves the other splits as they
  were). shuffle_train is the probability that a train chain adds the operands in a uniformly random order
  (True = 1, False = 0: every chain in the prompt's order); the others keep the prompt's order, so a fraction
  in between gives a dominant mode plus minor ones."""
  if seed < 0 or min(num_train, num_test, num_test_long, num_validation) < 0:
    raise ValueError(f"seed={seed} and the row counts must be non-negative")
  shuffle = _shuffle_probability(shuffle_train)
  seen: set = set()
  plan = [
      ("test", num_test, num_operands, 0.0),
      ("test_long", num_test_long, long_num_operands, 0.0),
      ("validation", num_validation, num_operands, 0.0),
      ("train", num_train, num_operands, shuffle),
  ]
  splits = {}
  for name, count, operand_range, p_shuffle in plan:
    if name in ("test_long", "validation") and not count:
      continue
    stream = _SPLIT_STREAMS[name]
    problems = draw_problems(np.random.default_rng([seed, stream, 0]), count, operand_range, digits, seen)
    # Separate streams, so shuffle_train keeps the problems (and 1.0 the orders it always drew).
    order_rng = np.random.default_rng([seed, stream, 1])
    coins = np.random.default_rng([seed, stream, 2]).random(count) < p_shuffle if 0 < p_shuffle < 1 else None
    rows = []
    for i, p in enumerate(problems):
      shuffled = p_shuffle == 1 or (coins is not None and coins[i])
      rows.append(make_row(p, order_rng.permutation(len(p)) if shuffled else None))
    # Columns, not from_list: an empty split still gets its columns.
    splits[name] = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in FEATURES}, features=FEATURES)
  return datasets.DatasetDict({name: splits[name] for name in _SPLIT_ORDER if name in splits})


def _shuffle_probability(value) -> float:
  try:
    p = float(value)
  except (TypeError, ValueError):
    p = float("nan")
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"shuffle_train={value!r} must be a probability in [0, 1] (True = 1, False = 0)")
  return p


def prompt_only(rows: datasets.Dataset) -> datasets.Dataset:
  """The rows without their assistant turns: prompt-only rows for on-policy training (gkd_jax.rows reads a
  chat list that does not end with the assistant as a prompt)."""

  def drop_answer(row):
    msgs = row["messages"]
    return {"messages": msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs}

  return rows.map(drop_answer, keep_in_memory=True)  # in memory: no cache files next to the task's data


# ------------------------------------------------------------------------------------------------ checks


@dataclasses.dataclass(frozen=True)
class Chain:
  """A completion in the task's format: steps (a, b, a+b claimed as c) and the final answer."""

  steps: tuple[tuple[int, int, int], ...]
  answer: int


def parse_prompt(text: str) -> tuple[int, ...]:
  """Operands of the one 'Add a+b+...' in text (a bare prompt or a rendered chat prompt)."""
  found = _PROMPT_RE.findall(text) if isinstance(text, str) else []
  if len(found) != 1:
    raise ValueError(f"expected exactly one 'Add a+b+...' problem in the prompt, found {len(found)}: {text!r}")
  return tuple(int(x) for x in found[0].split("+"))


def operands_of(problem: Any) -> tuple[int, ...]:
  """Operands from a sequence of ints, a prompt (text or chat list) or a task row (its `operands`, else its
  `messages` or `prompt`). A problem that is none of these raises ValueError: it is the caller's data."""
  if isinstance(problem, dict):
    key = next((k for k in ("operands", "messages", "prompt") if k in problem), None)
    if key is None:
      raise ValueError(f"a problem row needs 'operands', 'messages' or 'prompt'; got keys {sorted(problem)}")
    problem = problem[key]
  if isinstance(problem, str):
    return parse_prompt(problem)
  if isinstance(problem, (list, tuple)) and problem and all(isinstance(m, dict) for m in problem):
    return parse_prompt("\n".join(m.get("content", "") for m in problem if m.get("role") == "user"))
  ops = tuple(problem) if isinstance(problem, (list, tuple, np.ndarray)) else ()
  if len(ops) < 2 or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 0 for x in ops):
    raise ValueError(f"a problem is at least two non-negative ints, a prompt or a task row; got {problem!r}")
  return tuple(int(x) for x in ops)


def _visible(text: str) -> str:
  """What the model wrote before its first special token (generation ends at EOS; pads may follow)."""
  return _SPECIAL_RE.split(text, maxsplit=1)[0].strip()


def parse_completion(text: Any) -> Chain | None:
  """The chain in a completion, or None when it is not exactly 'a+b=c c+d=e ... Answer: n' (single spaces,
  no leading zeros; surrounding whitespace and anything from the first special token on are ignored)."""
  if not isinstance(text, str):
    return None
  words = _visible(text).split(" ")
  if len(words) < 3 or words[-2] != "Answer:" or not _NUM_RE.fullmatch(words[-1]):
    return None
  steps = []
  for word in words[:-2]:
    match = _STEP_RE.fullmatch(word)
    if match is None:
      return None
    steps.append(tuple(int(g) for g in match.groups()))
  return Chain(tuple(steps), int(words[-1]))


def check_answer(problem: Any, completion: Any) -> bool:
  """True iff the completion ends with its only 'Answer: n' and n is the sum, written exactly; the chain
  before it is not checked. Never raises on the completion (garbage, non-text: False). Text cannot tell a
  finished completion from one cut at the length limit; callers that require EOS check it on the ids."""
  ops = operands_of(problem)
  if not isinstance(completion, str):
    return False
  text = _visible(completion)
  match = _ANSWER_RE.search(text)
  return match is not None and text.count("Answer:") == 1 and int(match.group(1)) == sum(ops)


def check_chain(problem: Any, completion: Any) -> bool:
  """True iff the completion is a well-formed chain where every step adds a new operand to the running sum
  correctly (the first step adds two), every operand is used exactly once, in any order, and the answer is
  the final sum. Implies check_answer. Never raises on the completion."""
  ops = operands_of(problem)
  chain = parse_completion(completion)
  if chain is None:
    return False
  running = chain.steps[0][0]
  used = [running]
  for a, b, c in chain.steps:
    if a != running or a + b != c:
      return False
    used.append(b)
    running = c
  return sorted(used) == sorted(ops) and chain.answer == running


def evaluate(completions: Iterable[Any], problems: Iterable[Any]) -> dict[str, float | int]:
  """{'accuracy', 'chain_accuracy', 'count'} of completions[i] against problems[i] (rows, prompts, operands)."""
  completions, problems = list(completions), list(problems)
  if len(completions) != len(problems) or not problems:
    raise ValueError(
        f"need one completion per problem and at least one; got {len(completions)} completions "
        f"for {len(problems)} problems"
    )
  answers = [check_answer(p, c) for p, c in zip(problems, completions)]
  chains = [check_chain(p, c) for p, c in zip(problems, completions)]
  return {"accuracy": float(np.mean(answers)), "chain_accuracy": float(np.mean(chains)), "count": len(problems)}


def distinct_valid_chains(completions: Iterable[Any], problem: Any) -> int:
  """How many different valid chains (operand orders) a set of samples for one problem contains."""
  return len({parse_completion(c).steps for c in completions if check_chain(problem, c)})


def operand_order(problem: Any, completion: Any) -> tuple[int, ...] | None:
  """The order in which a valid chain adds the operands (None when the chain is not valid)."""
  if not check_chain(problem, completion):
    return None
  steps = parse_completion(completion).steps
  return (steps[0][0],) + tuple(b for _, b, _ in steps)


def minor_mode(problem: Any, completion: Any) -> bool | None:
  """For a valid chain, whether it adds the operands in an order other than the prompt's (the train data's
  dominant mode); None when the chain is not valid. The share of minor modes among valid chains measures how
  much of a multimodal teacher a student covers, independent of how often the student is right."""
  order = operand_order(problem, completion)
  return None if order is None else order != operands_of(problem)


# The first fault of a completion, in the order a reader checks a chain (ERROR_KINDS[0] = no fault).
ERROR_KINDS = ("valid", "format", "operand", "running_sum", "carry", "sum", "answer")


def classify_error(problem: Any, completion: Any) -> str:
  """The first fault of a completion, one of ERROR_KINDS:
    valid        the chain is valid (check_chain), so the answer is right
    format       not a chain in the task's format (cut off, garbled, no 'Answer: n')
    operand      an operand copied wrong, repeated or left out (the chain's added numbers are not the prompt's)
    running_sum  a step does not start from the previous step's sum (the sum copied wrong)
    carry        a step's sum has the right units digit and a wrong higher digit: a dropped or invented carry
    sum          a step's sum is wrong in its units digit
    answer       a valid-looking chain whose 'Answer' is not its final sum
  Copy faults are checked before arithmetic ones: a chain that adds the wrong operands correctly is a copy
  fault. Never raises on the completion."""
  chain = parse_completion(completion)
  if chain is None:
    return "format"
  ops = operands_of(problem)
  steps = chain.steps
  if sorted((steps[0][0],) + tuple(b for _, b, _ in steps)) != sorted(ops):
    return "operand"
  running = steps[0][0]
  for a, b, c in steps:
    if a != running:
      return "running_sum"
    if a + b != c:
      return "carry" if (a + b - c) % 10 == 0 else "sum"
    running = c
  return "valid" if chain.answer == running else "answer"


def error_breakdown(completions: Iterable[Any], problems: Iterable[Any]) -> dict[str, float]:
  """{kind: share of the completions whose first fault is that kind} over ERROR_KINDS (shares sum to 1)."""
  kinds = [classify_error(p, c) for p, c in zip(problems, completions, strict=True)]
  if not kinds:
    raise ValueError("error_breakdown needs at least one completion")
  return {k: kinds.count(k) / len(kinds) for k in ERROR_KINDS}


# --------------------------------------------------------------------------------------------- tokenizer


def make_tokenizer():
  """The task's tokenizer, in memory: a transformers.PreTrainedTokenizerFast with the ChatML template."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token=UNK_TOKEN))
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECES), behavior="isolated")
  tok.decoder = decoders.Fuse()  # tokens carry their own spaces: decode is plain concatenation
  hf = PreTrainedTokenizerFast(
      tokenizer_object=tok,
      pad_token=PAD_TOKEN,
      eos_token=EOS_TOKEN,
      unk_token=UNK_TOKEN,
      clean_up_tokenization_spaces=False,
  )
  hf.chat_template = CHAT_TEMPLATE
  return hf


_TOKENIZER_ID = file_cache.fingerprint([VOCAB, _PIECES, CHAT_TEMPLATE])
_TOKENIZER_STAMP = "task_tokenizer.id"


def build_tokenizer(out_dir: str) -> str:
  """Saves the tokenizer under out_dir (skipped when the same one is already there); returns out_dir, the
  path for AutoTokenizer.from_pretrained. Files are swapped in one by one atomically, stamp last."""
  stamp = os.path.join(out_dir, _TOKENIZER_STAMP)
  if file_cache.read_text(stamp) == _TOKENIZER_ID:
    return out_dir
  os.makedirs(out_dir, exist_ok=True)
  tmp = file_cache.scratch_path(stamp)
  os.makedirs(tmp)
  try:
    make_tokenizer().save_pretrained(tmp)
    for name in os.listdir(tmp):
      os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  file_cache.write_atomic(stamp, _TOKENIZER_ID)
  return out_dir


# ------------------------------------------------------------------------------------------ task on disk


@contextlib.contextmanager
def _locked(path: str):
  """An exclusive file lock: parallel sweep runs sharing one task directory build it once."""
  import fcntl

  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _stored_inputs(spec_path: str) -> dict | None:
  try:
    return json.loads(file_cache.read_text(spec_path) or "null")["inputs"]
  except (ValueError, TypeError, KeyError):
    return None


def make_task(
    out_dir: str,
    *,
    seed: int,
    num_train: int,
    num_test: int,
    num_operands: Sequence[int] = (3, 5),
    digits: Sequence[int] = (2, 2),
    shuffle_train: float | bool = True,
    num_test_long: int = 0,
    long_num_operands: Sequence[int] = (6, 7),
    num_validation: int = 0,
) -> dict[str, str]:
  """Writes out_dir/tokenizer (see build_tokenizer), out_dir/data (build_dataset's DatasetDict, save_to_disk)
  and out_dir/task.json (the inputs and split sizes). Returns {'tokenizer', 'data', 'spec'} paths.

  Cached: a rerun with the same inputs returns at once; other inputs rebuild the directory in place."""
  knobs = {
      "seed": int(seed),
      "num_train": int(num_train),
      "num_test": int(num_test),
      "num_operands": [int(x) for x in num_operands],
      "digits": [int(x) for x in digits],
      "shuffle_train": _shuffle_probability(shuffle_train),
      "num_test_long": int(num_test_long),
      "long_num_operands": [int(x) for x in long_num_operands],
  }
  if num_validation:  # only when asked, so the caches of tasks without one stay valid
    knobs["num_validation"] = int(num_validation)
  inputs = {"version": TASK_VERSION, "tokenizer": _TOKENIZER_ID, **knobs}
  paths = {name: os.path.join(out_dir, name) for name in ("tokenizer", "data")}
  paths["spec"] = os.path.join(out_dir, "task.json")
  os.makedirs(out_dir, exist_ok=True)
  with _locked(os.path.join(out_dir, ".lock")):
    if _stored_inputs(paths["spec"]) == inputs and os.path.isdir(paths["data"]):
      return paths
    with contextlib.suppress(FileNotFoundError):
      os.remove(paths["spec"])  # first, so a crash below never leaves a spec vouching for other data
    build_tokenizer(paths["tokenizer"])
    dataset = build_dataset(**knobs)
    staging = file_cache.scratch_path(paths["data"])
    try:
      dataset.save_to_disk(staging)
      shutil.rmtree(paths["data"], ignore_errors=True)
      os.replace(staging, paths["data"])
    finally:
      shutil.rmtree(staging, ignore_errors=True)
    splits = {name: len(split) for name, split in dataset.items()}
    file_cache.write_atomic(paths["spec"], json.dumps({"inputs": inputs, "splits": splits}, indent=1) + "\n")
  return paths


def load_task(out_dir: str) -> datasets.DatasetDict:
  """The DatasetDict that make_task(out_dir, ...) wrote."""
  return datasets.load_from_disk(os.path.join(out_dir, "data"))
