"""Multimodal rows: InternVL's image preprocessing and image tokens against transformers' InternVLProcessor, the
bad-row checks, per-batch (lazy) pixel loading, tile-count bucketing, and text-only runs unchanged. Offline: a
word-level tokenizer with InternVL's three image tokens, a tiny preprocessor_config.json, PNGs written here."""

import io
import json
import os
import subprocess
import sys

import datasets
import numpy as np
import PIL.Image
import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from gkd_jax import data
from gkd_jax import images as images_lib
from gkd_jax import rows as rows_lib

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
WORDS = ["user", "assistant", "system", "\n", " ", "?", ".", "What", "is", "this", "Look", "at", "red", "blue", "it"]
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}
START, END, CONTEXT = VOCAB["<img>"], VOCAB["</img>"], VOCAB["<IMG_CONTEXT>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TILE, SEQ = 28, 2  # tile side in pixels, tokens per tile
CONFIG = {  # the shape of InternVL3-*-hf's preprocessor_config.json, scaled down
    "crop_to_patches": False,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "GotOcr2ImageProcessorFast",
    "image_std": [0.229, 0.224, 0.225],
    "max_patches": 6,
    "min_patches": 1,
    "processor_class": "InternVLProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": TILE, "width": TILE},
}
NAMED = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}


def make_tokenizer(named=True):
  tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
  tok.add_special_tokens(SPECIALS)
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|\w+|[^\w\s]"), behavior="isolated")
  extra = {"extra_special_tokens": {**NAMED, "video_token": "<video>"}} if named else {}
  hf = PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="[UNK]", **extra
  )
  hf.chat_template = CHAT_TEMPLATE
  return hf


def picture(height, width, seed):
  return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tok():
  return make_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("model")
  (path / "preprocessor_config.json").write_text(json.dumps(CONFIG))
  return str(path)


@pytest.fixture(scope="module")
def inputs(model_dir, tok):
  return images_lib.image_inputs(model_dir, tok, SEQ)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """PNGs of 1 tile (28x28), 4 tiles (28x84: a 3x1 grid + thumbnail) and 5 tiles (56x56: 2x2 + thumbnail)."""
  path = tmp_path_factory.mktemp("images")
  out = {}
  for name, (h, w) in {"one": (28, 28), "four": (28, 84), "five": (56, 56)}.items():
    out[name] = str(path / f"{name}.png")
    picture(h, w, len(out)).save(out[name])
  broken = path / "broken.png"
  broken.write_bytes(open(out["one"], "rb").read()[:60])
  out["broken"] = str(broken)
  return out


def row(n, images, answer="red"):
  text = "What is " + " ".join(["<image>"] * n) + " ?"
  return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": answer}], "images": images}


def tokenize(r, tok, inputs, index=0, **kw):
  return rows_lib.tokenize_row(r, index, tok, "messages", image_inputs=inputs, **kw)


# ----------------------------------------------------------------------------------------- ImageInputs


def test_image_inputs_from_model_dir(inputs, model_dir, tok):
  assert inputs.tile_size == TILE and inputs.image_seq_length == SEQ
  assert (inputs.start_token, inputs.context_token, inputs.end_token) == ("<img>", "<IMG_CONTEXT>", "</img>")
  assert inputs.token_ids == (START, CONTEXT, END)
  # InternVLProcessor tiles whatever the saved config says; crop_to_patches=None keeps the saved choice.
  assert inputs.processor.crop_to_patches and inputs.processor.max_patches == 6
  assert not images_lib.image_inputs(model_dir, tok, SEQ, crop_to_patches=None).processor.crop_to_patches
  assert tuple(inputs.processor.image_mean) == tuple(CONFIG["image_mean"])


def test_tokens_default_without_tokenizer_attributes_and_fail_when_missing(model_dir):
  unnamed = make_tokenizer(named=False)
  assert images_lib.image_inputs(model_dir, unnamed, SEQ).token_ids == (START, CONTEXT, END)
  plain = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
  plain.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="isolated")
  bare = PreTrainedTokenizerFast(tokenizer_object=plain, unk_token="[UNK]")
  with pytest.raises(ValueError, match=r"no single token for the image token '<img>' \(start_image_token\)"):
    images_lib.image_inputs(model_dir, bare, SEQ)
  with pytest.raises(ValueError, match="image_seq_length=0 must be a positive int"):
    images_lib.image_inputs(model_dir, unnamed, 0)


def test_processor_config_json_and_missing_config(tmp_path, tok):
  (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": CONFIG, "image_seq_length": 2}))
  assert images_lib.image_inputs(str(tmp_path), tok, SEQ).tile_size == TILE
  with pytest.raises(FileNotFoundError, match="neither preprocessor_config.json nor"):
    images_lib.image_inputs(str(tmp_path / "nothing"), tok, SEQ)


def internvl_processor(model_dir, tok):
  """transformers' own InternVLProcessor on the same settings (no video processor: it needs torchvision)."""
  from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
  from transformers.models.internvl.processing_internvl import InternVLProcessor

  class ImageOnly(InternVLProcessor):

    def check_argument_for_proper_class(self, name, argument):
      return None if name == "video_processor" else super().check_argument_for_proper_class(name, argument)

  image_processor = GotOcr2ImageProcessorPil.from_pretrained(model_dir)
  return ImageOnly(image_processor=image_processor, tokenizer=tok, video_processor=None, image_seq_length=SEQ)


def test_pixels_and_tokens_equal_internvl_processor(inputs, model_dir, tok, files):
  opened = [images_lib.open_image(files[k], 0) for k in ("four", "one", "five")]
  expected = internvl_processor(model_dir, tok)(
      images=opened, text=["What is <IMG_CONTEXT> this <IMG_CONTEXT> <IMG_CONTEXT> ?"], return_tensors="np"
  )
  pixels = inputs.preprocess(opened)
  assert pixels.dtype == np.float32 and pixels.shape == (10, 3, TILE, TILE)
  np.testing.assert_array_equal(pixels, expected["pixel_values"])
  assert [inputs.tiles(im) for im in opened] == [4, 1, 5]
  # The same prompt with ms-swift's placeholders tokenizes to the processor's ids.
  prompt = {"prompt": "What is <image> this <image> <image> ?", "images": [files[k] for k in ("four", "one", "five")]}
  out = rows_lib.tokenize_row(prompt, 0, tok, "prompt", image_inputs=inputs)
  assert out["prompt_ids"] == expected["input_ids"][0].tolist()
  assert out["image_tiles"] == [4, 1, 5]
  assert inputs.expansion(2) == "<img>" + "<IMG_CONTEXT>" * 4 + "</img>"


NO_TORCH = """
import sys
sys.modules["torch"] = None  # any import of torch now fails
import numpy as np
from gkd_jax import images
from tests.test_images import make_tokenizer
inputs = images.image_inputs(sys.argv[1], make_tokenizer(named=False), 2)
pixels = inputs.preprocess([images.open_image(p, 0) for p in sys.argv[2:]])
np.save(sys.stdout.buffer, pixels)
try:
  import torch
except ImportError:
  print("torch blocked", file=sys.stderr)
"""


def test_preprocessing_runs_without_torch(inputs, model_dir, files):
  paths = [files["four"], files["five"]]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": root}
  proc = subprocess.run(
      [sys.executable, "-c", NO_TORCH, model_dir, *paths], capture_output=True, env=env, cwd=root, timeout=120
  )
  assert proc.returncode == 0, proc.stderr.decode()[-2000:]
  assert b"torch blocked" in proc.stderr
  pixels = np.load(io.BytesIO(proc.stdout))
  np.testing.assert_array_equal(pixels, inputs.preprocess([images_lib.open_image(p, 0) for p in paths]))


# --------------------------------------------------------------------------------------- opening images


def test_open_image_accepts_every_form(files):
  raw = open(files["four"], "rb").read()
  pil = PIL.Image.open(files["four"]).convert("RGBA")
  expected = np.asarray(PIL.Image.open(files["four"]).convert("RGB"))
  for value in (files["four"], raw, {"bytes": raw, "path": None}, {"bytes": None, "path": files["four"]}, pil):
    image = images_lib.open_image(value, 0)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), expected)
  gray = images_lib.open_image(PIL.Image.new("L", (5, 3), 7), 0)
  assert gray.mode == "RGB" and gray.size == (5, 3)


@pytest.mark.parametrize(
    "value, message",
    [
        ("/nonexistent/x.png", "row 3, column 'images': image 1: image file not found: '/nonexistent/x.png'"),
        (b"not an image", "row 3, column 'images': image 1: cannot read image of 12 bytes"),
        ({"bytes": None, "path": None}, "image 1: an image dict needs 'bytes' or 'path'"),
        (None, "image 1: expected an image: a path, bytes"),
        (17, "image 1: expected an image"),
    ],
)
def test_open_image_bad_values(value, message):
  with pytest.raises(rows_lib.BadRow, match=message.replace("(", r"\(").replace(")", r"\)")):
    images_lib.open_image(value, 3, "images", 1)


def test_truncated_file_is_a_bad_row(files):
  with pytest.raises(rows_lib.BadRow, match=r"row 0, column 'images': image 0: cannot read image '.*broken.png'"):
    images_lib.open_image(files["broken"], 0, position=0)


def test_stack_tiles(inputs, files):
  four = inputs.load_pixels([files["four"]], 0)
  pixels, counts = inputs.stack([None, four, four[:1]])
  assert pixels.shape == (3, 4, 3, TILE, TILE) and counts.tolist() == [0, 4, 1]
  np.testing.assert_array_equal(pixels[1], four)
  assert not pixels[0].any() and not pixels[2, 1:].any()
  assert inputs.stack([None], width=2)[0].shape == (1, 2, 3, TILE, TILE)
  with pytest.raises(ValueError, match="a row has 4 tiles, more than the width 2"):
    inputs.stack([four], width=2)


def test_bucket_tiles():
  assert [images_lib.bucket_tiles(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 13)] == [1, 1, 2, 4, 4, 8, 8, 16, 16]


# ----------------------------------------------------------------------------------------------- rows


def test_chat_row_expands_each_placeholder(tok, inputs, files):
  out = tokenize(row(2, [files["one"], files["four"]]), tok, inputs)
  assert out["image_tiles"] == [1, 4]
  ids = out["prompt_ids"]
  first = ids.index(START)
  assert ids[first : first + 2 * SEQ + 2] == [START] + [CONTEXT] * SEQ + [END, VOCAB[" "]] + [START]
  assert ids.count(CONTEXT) == SEQ * 5 and ids.count(START) == ids.count(END) == 2
  assert out["completion_ids"] == [VOCAB["red"], VOCAB["<|im_end|>"]]
  # Placeholders in several user turns: images are taken in order across turns.
  multi = {
      "messages": [
          {"role": "user", "content": "Look at <image> ."},
          {"role": "assistant", "content": "red"},
          {"role": "user", "content": "What is <image> ?"},
          {"role": "assistant", "content": "blue"},
      ],
      "images": [files["four"], files["one"]],
  }
  out = tokenize(multi, tok, inputs)
  assert out["image_tiles"] == [4, 1] and out["prompt_ids"].count(CONTEXT) == SEQ * 5


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda f: row(2, [f["one"]]),
            "column 'images': the prompt holds 2 '<image>' placeholder(s) but the row has 1",
        ),
        (lambda f: row(0, [f["one"]]), "the prompt holds 0 '<image>' placeholder(s) but the row has 1 image(s)"),
        (lambda f: row(1, None), "the prompt holds 1 '<image>' placeholder(s) but the row has 0 image(s)"),
        (lambda f: row(1, f["one"]), "column 'images': expected a list of images"),
        (lambda f: row(1, [f["broken"]]), "column 'images': image 0: cannot read image"),
        (lambda f: row(2, [f["one"], "/missing.png"]), "column 'images': image 1: image file not found"),
        (lambda f: row(1, [f["one"]], answer="<image> red"), "column 'messages': the completion holds '<image>'"),
        (
            lambda f: {
                "messages": [
                    {"role": "user", "content": "What is <image> ?"},
                    {"role": "assistant", "content": "<image>"},
                    {"role": "user", "content": "What is it ?"},
                    {"role": "assistant", "content": "red"},
                ],
                "images": [f["one"], f["one"]],
            },
            "message 1 is the assistant's but holds '<image>'",
        ),
        (
            lambda f: {**row(1, [f["one"]]), "teacher_prompt": "What is it ?"},
            "column 'teacher_prompt': a teacher_prompt is not supported in rows with images",
        ),
        (
            lambda f: row(1, [f["one"]], answer="<img> red"),
            "column 'messages': the tokenized row holds image tokens of its own",
        ),
        (
            lambda f: {**row(1, [f["one"]]), "messages": [{"role": "user", "content": "<IMG_CONTEXT> <image>"}]},
            "the tokenized row holds image tokens of its own",
        ),
    ],
)
def test_bad_image_rows(tok, inputs, files, make, message):
  with pytest.raises(rows_lib.BadRow, match=r"^row 5, " + ".*" + message.replace("(", r"\(").replace(")", r"\)")):
    tokenize(make(files), tok, inputs, index=5)


def test_text_only_run_rejects_rows_with_images(tok, files):
  with pytest.raises(rows_lib.BadRow, match="row 2, column 'images': the row has images but this run's model takes"):
    rows_lib.tokenize_row(row(1, [files["one"]]), 2, tok, "messages")
  # Without images the column is harmless.
  plain = rows_lib.tokenize_row(row(0, []), 2, tok, "messages")
  assert plain == rows_lib.tokenize_row({"messages": row(0, [])["messages"]}, 2, tok, "messages")


def test_truncation_never_cuts_image_tokens(tok, inputs, files):
  r = row(1, [files["five"]])
  full = len(tokenize(r, tok, inputs)["prompt_ids"])
  with pytest.raises(
      rows_lib.BadRow, match=rf"row 0, column 'prompt': the prompt is {full} tokens.*max_prompt_length=12"
  ):
    tokenize(r, tok, inputs, limits=rows_lib.Limits(max_prompt_length=12))
  with pytest.raises(rows_lib.BadRow, match=rf"max_length - max_completion_length = 22 - 10.*at least {full}"):
    tokenize(r, tok, inputs, limits=rows_lib.Limits(max_length=22, max_completion_length=10))
  # Cutting text before the first image is allowed; the image stays whole.
  start = tokenize(r, tok, inputs)["prompt_ids"].index(START)
  out = tokenize(r, tok, inputs, limits=rows_lib.Limits(max_prompt_length=full - start))
  assert out["prompt_truncated"] == start and out["prompt_ids"][0] == START


# --------------------------------------------------------------------------------------------- loader


def loader(rows, tok, inputs, **kw):
  kw = {"batch_size": 2, "process_index": 0, "process_count": 1, "shuffle": False, **kw}
  return data.DataLoader(rows, tok, image_inputs=inputs, **kw)


def test_batches_hold_each_rows_tiles_padded_to_a_power_of_two(tok, inputs, files):
  rows = [
      row(1, [files["one"]]),
      row(2, [files["four"], files["one"]]),  # 5 tiles
      row(0, []),  # text-only row in an image dataset
      row(1, [files["four"]]),
      row(1, [files["one"]]),
      row(0, None),
  ]
  dl = loader(rows, tok, inputs)
  b0 = dl.batch(0)
  assert b0["pixel_values"].shape == (2, 8, 3, TILE, TILE) and b0["pixel_values"].dtype == np.float32
  assert b0["num_tiles"].tolist() == [1, 5] and b0["num_tiles"].dtype == np.int32
  one, four = (inputs.preprocess([images_lib.open_image(files[k], 0)]) for k in ("one", "four"))
  np.testing.assert_array_equal(b0["pixel_values"][0, :1], one)
  np.testing.assert_array_equal(b0["pixel_values"][1, :5], np.concatenate([four, one]))
  assert not b0["pixel_values"][0, 1:].any() and not b0["pixel_values"][1, 5:].any()
  b1 = dl.batch(1)  # 0 and 4 tiles -> 4
  assert b1["pixel_values"].shape[1] == 4 and b1["num_tiles"].tolist() == [0, 4]
  assert not b1["pixel_values"][0].any()
  b2 = dl.batch(2)  # 1 and 0 tiles -> 1
  assert b2["pixel_values"].shape[1] == 1 and b2["num_tiles"].tolist() == [1, 0]
  assert (b1["prompt_ids"] == CONTEXT).sum(1).tolist() == [0, 4 * SEQ]


def test_pixels_are_read_per_batch(tok, inputs, files, monkeypatch):
  rows = [row(1, [files[k]]) for k in ("one", "four", "five", "one")]
  opened = []
  real_open = images_lib.open_image
  monkeypatch.setattr(images_lib, "open_image", lambda v, *a: opened.append(v) or real_open(v, *a))
  dl = loader(rows, tok, inputs, num_proc=None)
  assert sorted(opened) == sorted(r["images"][0] for r in rows)  # tokenization opened each once, for its tiles
  assert not hasattr(dl, "_pixels")
  opened.clear()
  b = dl.batch(1)
  assert sorted(opened) == sorted([files["five"], files["one"]]) and b["num_tiles"].tolist() == [5, 1]
  serial = loader(rows, tok, inputs, image_workers=1).batch(1)
  np.testing.assert_array_equal(serial["pixel_values"], b["pixel_values"])


def test_global_tile_width_is_shared_by_hosts_and_filler_rows_are_zero(tok, inputs, files):
  rows = [row(1, [files["one"]]), row(1, [files["five"]]), row(1, [files["four"]])]
  hosts = [loader(rows, tok, inputs, batch_size=2, process_index=i, process_count=2) for i in range(2)]
  assert [h.batch(0)["pixel_values"].shape[1] for h in hosts] == [8, 8]
  assert [h.batch(0)["num_tiles"].tolist() for h in hosts] == [[1], [5]]
  dl = loader(rows, tok, inputs, drop_remainder=False)
  last = dl.batch(1)
  assert last["row_mask"].tolist() == [True, False] and last["num_tiles"].tolist() == [4, 0]
  assert not last["pixel_values"][1].any()


def test_bad_image_rows_fail_at_construction_or_are_skipped(tok, inputs, files):
  rows = [row(1, [files["one"]]), row(1, [files["broken"]]), row(2, [files["one"]]), row(1, [files["four"]])]
  with pytest.raises(rows_lib.BadRow, match="row 1, column 'images': image 0: cannot read image"):
    loader(rows, tok, inputs)
  dl = loader(rows, tok, inputs, skip_bad_rows=True)
  assert dl.num_rows == 2 and len(dl.skipped) == 2
  assert "row 2, column 'images': the prompt holds 2" in dl.skipped[1]
  b = dl.batch(0)
  assert b["num_tiles"].tolist() == [1, 4]  # images read by each kept row's own index
  np.testing.assert_array_equal(b["pixel_values"][1, :4], inputs.preprocess([images_lib.open_image(files["four"], 0)]))


def test_text_only_datasets_are_unchanged(tok, inputs):
  rows = [row(0, None)["messages"] for _ in range(4)]
  rows = [{"messages": m} for m in rows]
  plain = data.DataLoader(rows, tok, batch_size=2, process_index=0, process_count=1)
  with_inputs = data.DataLoader(rows, tok, batch_size=2, process_index=0, process_count=1, image_inputs=inputs)
  for step in range(3):
    a, b = plain.batch(step), with_inputs.batch(step)
    assert sorted(a) == sorted(b) and "pixel_values" not in a
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_images_as_datasets_image_feature(tok, inputs, files):
  """Rows from `datasets` with a Sequence(Image()) column: the loader reads the decoded images."""
  feature = datasets.Features(
      {
          "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
          "images": datasets.Sequence(datasets.Image()),
      }
  )
  rows = datasets.Dataset.from_list([row(1, [files["four"]]), row(1, [files["one"]])], features=feature)
  b = loader(rows, tok, inputs).batch(0)
  assert b["num_tiles"].tolist() == [4, 1] and b["pixel_values"].shape[1] == 4


def test_loader_from_config_passes_image_inputs(tok, inputs, files):
  import ml_collections

  config = ml_collections.ConfigDict(
      {"seed": 0, "max_length": None, "max_prompt_length": None, "max_completion_length": None, "length_buckets": None}
  )
  rows = [row(1, [files["one"]])] * 2
  dl = data.loader_from_config(config, tok, rows, 2, image_inputs=inputs, process_index=0, process_count=1)
  assert dl.batch(0)["num_tiles"].tolist() == [1, 1]
