"""The shapes task: determinism, answers recomputed from the drawn pixels, the checker, and its rows through the
multimodal data pipeline."""

import json
import os
import re

import numpy as np
import PIL.Image
import pytest

from gkd_jax import data
from gkd_jax import images as images_lib
from gkd_jax import rows as rows_lib
from gkd_jax.tasks import shapes
from tests.test_images import CONFIG, make_tokenizer


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  paths = shapes.write_dataset(str(tmp_path_factory.mktemp("shapes")), train=60, test=20, seed=3)
  return paths, {s: [json.loads(x) for x in open(paths[s])] for s in ("train", "test")}


def read_board(path, grid=2):
  """The board from the PNG's pixels alone: a cell's colour is its centre pixel's nearest named colour (white:
  empty); a square covers the point 0.3 of a cell from the centre along both axes, a circle does not."""
  pixels = np.asarray(PIL.Image.open(path).convert("RGB")).astype(int)
  cell = pixels.shape[0] // grid
  names = ["white", *shapes.COLOURS]
  palette = np.array([shapes.BACKGROUND, *shapes.COLOURS.values()])
  board = []
  for k in range(grid * grid):
    r, q = divmod(k, grid)
    centre = pixels[r * cell + cell // 2, q * cell + cell // 2]
    colour = names[int(np.argmin(((palette - centre) ** 2).sum(1)))]
    if colour == "white":
      board.append(None)
      continue
    corner = pixels[r * cell + cell // 2 + int(0.3 * cell), q * cell + cell // 2 + int(0.3 * cell)]
    board.append((colour, "circle" if tuple(corner) == shapes.BACKGROUND else "square"))
  return board


def answer_from_pixels(row, grid=2):
  boards = [read_board(p, grid) for p in row["images"]]
  names = shapes.positions(grid)
  question = row["messages"][0]["content"].split("\n")[-1]
  counts = [sum(c is not None for c in b) for b in boards]
  if question == shapes.QUESTIONS["count"]:
    return str(counts[0])
  if question == shapes.QUESTIONS["compare"]:
    assert counts[0] != counts[1]
    return "first" if counts[0] > counts[1] else "second"
  match = re.fullmatch(r"What (colour is the shape|shape is) in the ([a-z-]+)\?", question)
  if match:
    cell = boards[0][names.index(match.group(2))]
    return cell[0] if match.group(1).startswith("colour") else cell[1]
  colour = re.fullmatch(r"Where is the ([a-z]+) shape\?", question).group(1)
  (where,) = [names[k] for k, c in enumerate(boards[0]) if c is not None and c[0] == colour]  # exactly one
  return where


def test_answers_match_the_drawn_pixels(task):
  paths, rows = task
  for row in rows["train"] + rows["test"]:
    assert answer_from_pixels(row) == row["answer"] == row["messages"][1]["content"]
    assert shapes.question_kind(row["messages"][0]["content"]) == row["kind"]
    assert (
        row["messages"][0]["content"].count("<image>") == len(row["images"]) == (2 if row["kind"] == "compare" else 1)
    )
    assert all(p.startswith(paths["images"] + os.sep) for p in row["images"])
  assert {r["kind"] for r in rows["train"]} == set(shapes.KINDS)
  assert PIL.Image.open(rows["test"][0]["images"][0]).size == (56, 56)


def test_deterministic_and_test_split_independent_of_train_size(task, tmp_path):
  paths, rows = task
  again = shapes.write_dataset(str(tmp_path / "a"), train=60, test=20, seed=3)
  bigger = shapes.write_dataset(str(tmp_path / "b"), train=90, test=20, seed=3)
  for other in (again, bigger):
    test = [json.loads(x) for x in open(other["test"])]
    assert [{**r, "images": None} for r in test] == [{**r, "images": None} for r in rows["test"]]
    for mine, theirs in zip(rows["test"], test):
      assert [open(p, "rb").read() for p in mine["images"]] == [open(p, "rb").read() for p in theirs["images"]]
  assert open(again["train"]).read() == open(paths["train"]).read().replace(
      os.path.dirname(paths["images"]), str(tmp_path / "a")
  )
  other_seed = shapes.write_dataset(str(tmp_path / "c"), train=0, test=20, seed=4)
  assert [json.loads(x)["messages"] for x in open(other_seed["test"])] != [r["messages"] for r in rows["test"]]


def test_bigger_grid_and_pictures(tmp_path):
  paths = shapes.write_dataset(str(tmp_path), train=0, test=30, seed=1, size=84, grid=3)
  for row in map(json.loads, open(paths["test"])):
    assert answer_from_pixels(row, grid=3) == row["answer"]
  with pytest.raises(ValueError, match="grid=4 must be 2 or 3"):
    shapes.write_dataset(str(tmp_path / "x"), train=1, test=1, grid=4, size=56)
  with pytest.raises(ValueError, match="size=50 must be a multiple of grid=3"):
    shapes.write_dataset(str(tmp_path / "x"), train=1, test=1, grid=3, size=50)


def test_extract_answer():
  cases = {
      "red": "red",
      " Red.<|im_end|>": "red",
      "3<|im_end|><|endoftext|>": "3",
      "top-left</s>": "top-left",
      "first\n": "first",
      "first or second": "first",
      "<|im_end|>red": "",
      "": "",
      None: "",
  }
  assert {k: shapes.extract_answer(k) for k in cases} == cases


def test_evaluate(task):
  _, rows = task
  test = rows["test"]
  right = [r["answer"] + "<|im_end|>" for r in test]
  out = shapes.evaluate(right, test)
  assert out["accuracy"] == 1.0 and out["count"] == len(test)
  assert {k for k in out if k.startswith("accuracy_")} == {f"accuracy_{r['kind']}" for r in test}
  wrong = ["purple"] * len(test)
  assert shapes.evaluate(wrong, test)["accuracy"] == 0.0
  half = [a if i % 2 else "no" for i, a in enumerate(right)]
  assert shapes.evaluate(half, test)["accuracy"] == pytest.approx(sum(i % 2 for i in range(len(test))) / len(test))
  # Rows without the helper columns: kind and answer are read off the messages.
  bare = [{"messages": r["messages"]} for r in test]
  assert shapes.evaluate(right, bare) == out
  with pytest.raises(ValueError, match="one completion per row"):
    shapes.evaluate(right[:-1], test)


def test_rows_feed_the_multimodal_loader(task, tmp_path):
  paths, _ = task
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(CONFIG))
  tok = make_tokenizer()
  inputs = images_lib.image_inputs(str(tmp_path), tok, 2)
  rows = rows_lib.load_rows(paths["test"], split="test")
  dl = data.DataLoader(rows, tok, batch_size=4, process_index=0, process_count=1, image_inputs=inputs)
  b = dl.batch(0)
  # 56x56 pictures at 28-pixel tiles: a 2x2 grid plus the thumbnail per picture.
  assert b["pixel_values"].shape[2:] == (3, 28, 28) and set(b["num_tiles"].tolist()) <= {5, 10}
  assert ((b["prompt_ids"] == inputs.context_token_id).sum(1) == 2 * b["num_tiles"]).all()
