"""Coloured shapes on a grid: an offline image task for vision-language runs, small enough to learn quickly.

A picture is `size` x `size` pixels (default 56: 2 x 2 tiles of 28, or 4 x 4 patches of 14 per cell) cut into a
`grid` x `grid` board (2 or 3); each cell is empty (white) or holds a red, green, blue or yellow square or
circle filling most of it. Each row asks one question with a one-word answer:

  count     How many shapes are in the picture?                          3
  colour    What colour is the shape in the top-left?                    red
  shape     What shape is in the bottom-right?                           circle
  position  Where is the blue shape?   (that colour occurs once)         top-left
  compare   Which picture has more shapes, the first or the second?      first    (two images, counts differ)

Positions are one hyphenated word: rows top / (middle) / bottom, columns left / (centre) / right, the middle
cell of a 3 x 3 board `centre`. Every question of a kind is phrased the same way, so a tiny model has only the
pictures to learn.

Rows are ms-swift's multimodal layout, the one `gkd_jax.rows` reads: `messages` (the user turn holds one
`<image>` placeholder per picture, then the question; the assistant turn is the answer) and `images` (absolute
paths of PNG files under directory/images/), plus `kind` and `answer` for the checker. Everything is a pure
function of the seed and the knobs; the test split does not depend on the train size.

    paths = write_dataset("/tmp/shapes", train=2000, test=200, seed=0)
    rows = gkd_jax.rows.load_rows(paths["test"], split="test")
    evaluate(completions, rows)   # {'accuracy', 'count', 'accuracy_count', 'accuracy_colour', ...}
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np
import PIL.Image

COLOURS = {"red": (220, 20, 20), "green": (20, 160, 20), "blue": (20, 50, 220), "yellow": (235, 200, 0)}
SHAPES = ("square", "circle")
BACKGROUND = (255, 255, 255)
KINDS = ("count", "colour", "shape", "position", "compare")
QUESTIONS = {
    "count": "How many shapes are in the picture?",
    "colour": "What colour is the shape in the {position}?",
    "shape": "What shape is in the {position}?",
    "position": "Where is the {colour} shape?",
    "compare": "Which picture has more shapes, the first or the second?",
}
_ROWS = {2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
_COLUMNS = {2: ("left", "right"), 3: ("left", "centre", "right")}
# Independent random streams per split: the test split does not depend on the train size.
_STREAMS = {"test": 0, "train": 1}
_SPECIAL_RE = re.compile(r"<[^<>\s]*>")  # <|im_end|>, </s>, <eos>, ... : generation stops there


# ------------------------------------------------------------------------------------------- pictures


Cell = tuple[str, str] | None  # (colour, shape), or None for an empty cell


def positions(grid: int) -> list[str]:
  """Cell names in row-major order, e.g. ['top-left', 'top-right', 'bottom-left', 'bottom-right']."""
  if grid not in _ROWS:
    raise ValueError(f"grid={grid} must be 2 or 3")
  names = [f"{r}-{c}" for r in _ROWS[grid] for c in _COLUMNS[grid]]
  return ["centre" if n == "middle-centre" else n for n in names]


def draw(cells: Sequence[Cell], size: int = 56, grid: int = 2) -> np.ndarray:
  """The picture of `cells` (row-major) as uint8 [size, size, 3]: squares of 70% of a cell's side, circles
  of 76% diameter, centred in their cells on white."""
  if size % grid or size // grid < 8:
    raise ValueError(f"size={size} must be a multiple of grid={grid} with cells of at least 8 pixels")
  if len(cells) != grid * grid:
    raise ValueError(f"{len(cells)} cells for a {grid}x{grid} grid")
  cell = size // grid
  pixels = np.full((size, size, 3), BACKGROUND, np.uint8)
  yy, xx = np.mgrid[0:cell, 0:cell] + 0.5 - cell / 2  # offsets of pixel centres from the cell's centre
  masks = {
      "square": (np.abs(yy) <= 0.35 * cell) & (np.abs(xx) <= 0.35 * cell),
      "circle": yy**2 + xx**2 <= (0.38 * cell) ** 2,
  }
  for k, c in enumerate(cells):
    if c is None:
      continue
    colour, shape = c
    r, q = divmod(k, grid)
    pixels[r * cell : (r + 1) * cell, q * cell : (q + 1) * cell][masks[shape]] = COLOURS[colour]
  return pixels


def _cells(rng: np.random.Generator, grid: int) -> tuple[Cell, ...]:
  """A board with at least one shape: each cell filled with probability 0.6, colour and shape uniform."""
  while True:
    filled = rng.random(grid * grid) < 0.6
    colours = rng.integers(len(COLOURS), size=grid * grid)
    shapes = rng.integers(len(SHAPES), size=grid * grid)
    if filled.any():
      names = list(COLOURS)
      return tuple((names[c], SHAPES[s]) if f else None for f, c, s in zip(filled, colours, shapes))


def num_shapes(cells: Sequence[Cell]) -> int:
  return sum(c is not None for c in cells)


# ------------------------------------------------------------------------------------------- questions


@dataclasses.dataclass(frozen=True)
class Example:
  """One question: its kind, text, answer and the boards of its pictures (one, or two for 'compare')."""

  kind: str
  question: str
  answer: str
  pictures: tuple[tuple[Cell, ...], ...]


def draw_example(rng: np.random.Generator, grid: int = 2) -> Example:
  """A question of a uniformly drawn kind about freshly drawn boards."""
  kind = KINDS[int(rng.integers(len(KINDS)))]
  names = positions(grid)
  while True:
    cells = _cells(rng, grid)
    if kind == "count":
      return Example(kind, QUESTIONS[kind], str(num_shapes(cells)), (cells,))
    if kind in ("colour", "shape"):
      filled = [k for k, c in enumerate(cells) if c is not None]
      k = filled[int(rng.integers(len(filled)))]
      answer = cells[k][0] if kind == "colour" else cells[k][1]
      return Example(kind, QUESTIONS[kind].format(position=names[k]), answer, (cells,))
    if kind == "position":
      colours = [c[0] for c in cells if c is not None]
      unique = [c for c in COLOURS if colours.count(c) == 1]
      if not unique:
        continue  # ask only about a colour that occurs once; draw another board
      colour = unique[int(rng.integers(len(unique)))]
      k = next(k for k, c in enumerate(cells) if c is not None and c[0] == colour)
      return Example(kind, QUESTIONS[kind].format(colour=colour), names[k], (cells,))
    other = _cells(rng, grid)
    if num_shapes(cells) != num_shapes(other):
      answer = "first" if num_shapes(cells) > num_shapes(other) else "second"
      return Example(kind, QUESTIONS[kind], answer, (cells, other))


def prompt_text(example: Example) -> str:
  """The user turn: one placeholder line per picture, then the question."""
  return "".join("<image>\n" for _ in example.pictures) + example.question


def draw_examples(seed: int, split: str, n: int, grid: int = 2) -> list[Example]:
  """`n` examples of a split, a pure function of (seed, split, grid)."""
  if split not in _STREAMS:
    raise ValueError(f"split={split!r} must be one of {sorted(_STREAMS)}")
  if seed < 0 or n < 0:
    raise ValueError(f"seed={seed} and the row count {n} must be non-negative")
  rng = np.random.default_rng([seed, _STREAMS[split]])
  return [draw_example(rng, grid) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- on disk


def write_dataset(
    directory: str, train: int, test: int, seed: int = 0, *, size: int = 56, grid: int = 2
) -> dict[str, str]:
  """Writes directory/train.jsonl, directory/test.jsonl and their PNGs under directory/images/ (named
  {split}-{row}-{picture}.png). Returns {'train', 'test', 'images'} paths. A local directory: the rows hold the
  images' absolute paths."""
  draw([None] * grid * grid, size, grid), positions(grid)  # bad knobs fail before any file is written
  directory = os.path.abspath(directory)
  image_dir = os.path.join(directory, "images")
  os.makedirs(image_dir, exist_ok=True)
  paths = {"images": image_dir}
  for split, n in (("train", train), ("test", test)):
    lines = []
    for i, ex in enumerate(draw_examples(seed, split, n, grid)):
      files = []
      for j, cells in enumerate(ex.pictures):
        files.append(os.path.join(image_dir, f"{split}-{i:06d}-{j}.png"))
        PIL.Image.fromarray(draw(cells, size, grid)).save(files[-1])
      row = {
          "messages": [{"role": "user", "content": prompt_text(ex)}, {"role": "assistant", "content": ex.answer}],
          "images": files,
          "kind": ex.kind,
          "answer": ex.answer,
      }
      lines.append(json.dumps(row) + "\n")
    paths[split] = os.path.join(directory, f"{split}.jsonl")
    tmp = paths[split] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(lines)
    os.replace(tmp, paths[split])
  return paths


# ------------------------------------------------------------------------------------------------ checks


def extract_answer(text: Any) -> str:
  """The first word a model wrote, lower-cased: everything from the first special token (`<|im_end|>`,
  `</s>`, ...) on is dropped, then surrounding whitespace, then trailing punctuation. '' for non-text."""
  if not isinstance(text, str):
    return ""
  words = _SPECIAL_RE.split(text, maxsplit=1)[0].split()
  return words[0].strip(".,;:!?\"'").lower() if words else ""


def question_kind(text: str) -> str:
  """The kind of a question (or a user turn that ends with one)."""
  for kind, template in QUESTIONS.items():
    pattern = re.escape(template).replace(r"\{position\}", r"[a-z-]+").replace(r"\{colour\}", r"[a-z]+")
    if re.search(pattern + r"\Z", text.strip()):
      return kind
  raise ValueError(f"not a question of the shapes task: {text!r}")


def _truth(row: dict) -> tuple[str, str]:
  """(kind, answer) of a task row: its `kind` / `answer` columns, else read off its messages."""
  messages = row.get("messages") or []
  answer = row.get("answer")
  if answer is None:
    if not messages or messages[-1].get("role") != "assistant":
      raise ValueError(f"a shapes row needs 'answer' or a final assistant turn; got keys {sorted(row)}")
    answer = messages[-1]["content"]
  kind = row.get("kind")
  if kind is None:
    user = [m["content"] for m in messages if m.get("role") == "user"]
    kind = question_kind(user[-1] if user else "")
  return str(kind), str(answer).strip().lower()


def evaluate(completions: Iterable[Any], rows: Iterable[dict]) -> dict[str, float | int]:
  """{'accuracy', 'count', 'accuracy_<kind>' for each kind present}: a completion is right when its first
  word (extract_answer: lower-cased, end token and trailing punctuation dropped) equals the row's answer."""
  completions, rows = list(completions), list(rows)
  if len(completions) != len(rows) or not rows:
    raise ValueError(f"need one completion per row and at least one; got {len(completions)} for {len(rows)} rows")
  hits: dict[str, list[bool]] = {}
  for c, r in zip(completions, rows):
    kind, answer = _truth(r)
    hits.setdefault(kind, []).append(extract_answer(c) == answer)
  every = [h for kind in hits for h in hits[kind]]
  out: dict[str, float | int] = {"accuracy": float(np.mean(every)), "count": len(rows)}
  out.update({f"accuracy_{kind}": float(np.mean(hits[kind])) for kind in KINDS if kind in hits})
  return out
