"""Images of multimodal rows: opening them, InternVL's tiling and normalisation, and the prompt's image tokens.

A multimodal row (ms-swift's layout) holds `<image>` placeholders in its prompt and an `images` column with one
image per placeholder, in order: a path (local or gs://), bytes, a `{"bytes", "path"}` dict (the `datasets`
Image feature) or a PIL image.

InternVL cuts each image into tiles of S x S pixels (a grid whose aspect ratio is closest to the image's, plus a
thumbnail of the whole image when there are several), and the model reads `image_seq_length` tokens per tile. So
a placeholder becomes `<img>` + `<IMG_CONTEXT>` * (image_seq_length * tiles) + `</img>`, the text transformers'
`InternVLProcessor` builds, and the image becomes float32 pixels [tiles, 3, S, S]. Both come from transformers'
`GotOcr2ImageProcessorPil`, its PIL/NumPy implementation: nothing here imports torch.

The settings are the model directory's (preprocessor_config.json, else the `image_processor` entry of
processor_config.json), with one override that transformers' InternVLProcessor makes too: it always tiles
(`crop_to_patches=True` at call time, whatever the saved config says), so `image_inputs` does the same unless
told otherwise.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Sequence

import numpy as np
import PIL.Image

from gkd_jax import storage
from gkd_jax.rows import BadRow

PLACEHOLDER = "<image>"
DEFAULT_TOKENS = {"start_image_token": "<img>", "context_image_token": "<IMG_CONTEXT>", "end_image_token": "</img>"}
CONFIG_FILES = ("preprocessor_config.json", "processor_config.json")


@dataclasses.dataclass(frozen=True, eq=False)
class ImageInputs:
  """What turns a row's images into model inputs: the image processor (transformers' GotOcr2ImageProcessorPil,
  with the run's tiling settings), the tokens per tile, and the image tokens (strings and ids)."""

  processor: Any
  image_seq_length: int
  start_token: str
  context_token: str
  end_token: str
  start_token_id: int
  context_token_id: int
  end_token_id: int
  placeholder: str = PLACEHOLDER

  @property
  def tile_size(self) -> int:
    """S: tiles are S x S pixels."""
    return int(self.processor.size.height)

  @property
  def token_ids(self) -> tuple[int, int, int]:
    """(start, context, end) token ids: the ids a prompt's image spans are made of."""
    return self.start_token_id, self.context_token_id, self.end_token_id

  # rows.py tokenizes through these methods: it cannot import this module (which imports its BadRow).
  def open(self, value: Any, index: int, column: str = "images", position: int | None = None):
    """open_image: an image value -> a decoded RGB PIL image, or BadRow naming the row."""
    return open_image(value, index, column, position)

  def tiles(self, image) -> int:
    """How many tiles `image` is cut into (the thumbnail included)."""
    return int(self.processor.get_number_of_image_patches(image.height, image.width))

  def expansion(self, tiles: int) -> str:
    """The text one image of `tiles` tiles stands for in a prompt: start, its context tokens, end."""
    return self.start_token + self.context_token * (self.image_seq_length * int(tiles)) + self.end_token

  def expand(self, text: str, tiles: Sequence[int]) -> str:
    """`text` with its k-th placeholder replaced by expansion(tiles[k]); the counts must agree."""
    parts = text.split(self.placeholder)
    if len(parts) - 1 != len(tiles):
      raise ValueError(f"{len(parts) - 1} {self.placeholder!r} placeholders for {len(tiles)} images")
    out = [parts[0]]
    for n, part in zip(tiles, parts[1:]):
      out += [self.expansion(n), part]
    return "".join(out)

  def preprocess(self, images: Sequence) -> np.ndarray:
    """Opened images -> float32 [sum of their tiles, 3, S, S], each image's tiles in order; the pixels
    transformers' InternVLProcessor gives the model for them."""
    if not images:
      return np.zeros((0, 3, self.tile_size, self.tile_size), np.float32)
    return np.asarray(self.processor(images=list(images), return_tensors="np")["pixel_values"], np.float32)

  def load_pixels(self, values: Sequence, index: int, column: str = "images") -> np.ndarray:
    """A row's image values (its `images` column) opened and preprocessed: float32 [tiles, 3, S, S]."""
    return self.preprocess([open_image(v, index, column, k) for k, v in enumerate(values)])

  def stack(self, per_row: Sequence[np.ndarray | None], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows' tiles (None: no images) -> (pixel_values float32 [B, width, 3, S, S], zero-padded; num_tiles int32
    [B]). width defaults to bucket_tiles of the largest row, as the DataLoader pads its batches."""
    counts = np.array([0 if t is None else len(t) for t in per_row], np.int32)
    width = bucket_tiles(int(counts.max(initial=0))) if width is None else width
    if counts.max(initial=0) > width:
      raise ValueError(f"a row has {counts.max()} tiles, more than the width {width}")
    pixels = np.zeros((len(per_row), width, 3, self.tile_size, self.tile_size), np.float32)
    for b, tiles in enumerate(per_row):
      if tiles is not None:
        pixels[b, : len(tiles)] = tiles
    return pixels, counts


def read_processor_config(model_dir: str) -> dict:
  """The image processor's settings saved with a model: preprocessor_config.json, else processor_config.json's
  `image_processor` entry (transformers 5 saves a processor as one file)."""
  for name in CONFIG_FILES:
    path = storage.join(model_dir, name)
    if not storage.exists(path):
      continue
    try:
      config = json.loads(storage.read_text(path))
    except ValueError as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from e
    if name == "processor_config.json":
      config = config.get("image_processor")
      if not isinstance(config, dict):
        continue
    return config
  raise FileNotFoundError(
      f"{model_dir} has no image processor settings: neither preprocessor_config.json nor an 'image_processor' "
      f"entry in processor_config.json (save the checkpoint's processor beside it)"
  )


def make_processor(config: dict, crop_to_patches: bool | None = True):
  """transformers' GotOcr2ImageProcessorPil from saved settings; crop_to_patches=None keeps the saved value."""
  from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

  kwargs = {} if crop_to_patches is None else {"crop_to_patches": bool(crop_to_patches)}
  processor = GotOcr2ImageProcessorPil.from_dict(dict(config), **kwargs)
  size = processor.size
  if not size.height or size.height != size.width:
    raise ValueError(f"the image processor's size must be square {{'height': S, 'width': S}}; got {config.get('size')}")
  return processor


def image_token(tokenizer, attribute: str) -> tuple[str, int]:
  """(string, id) of one of the tokenizer's image tokens; it must be a single token of the vocabulary."""
  text = getattr(tokenizer, attribute, None) or DEFAULT_TOKENS[attribute]
  ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
  token_id = tokenizer.convert_tokens_to_ids(text)
  if len(ids) != 1 or ids[0] != token_id or token_id is None or token_id == tokenizer.unk_token_id:
    raise ValueError(
        f"the tokenizer has no single token for the image token {text!r} ({attribute}): it encodes to {ids}. "
        f"An InternVL tokenizer defines {sorted(DEFAULT_TOKENS.values())} as special tokens "
        f"(tokenizer_config.json's extra_special_tokens)"
    )
  return text, int(token_id)


def image_inputs(
    model_dir: str,
    tokenizer,
    image_seq_length: int,
    *,
    crop_to_patches: bool | None = True,
    max_tiles: int | None = None,
) -> ImageInputs:
  """The ImageInputs of a model directory (local or gs://) and its tokenizer.

  image_seq_length: tokens per tile (the model's config: (image_size / patch_size)^2 * downsample_ratio^2).
  crop_to_patches: True tiles every image as InternVLProcessor does; None keeps the saved config's choice.
  max_tiles: the most tiles an image is cut into (the processor's max_patches; a thumbnail is added when there
  are several); None keeps the saved setting."""
  if isinstance(image_seq_length, bool) or not isinstance(image_seq_length, int) or image_seq_length <= 0:
    raise ValueError(f"image_seq_length={image_seq_length!r} must be a positive int")
  config = read_processor_config(model_dir)
  if max_tiles is not None:
    config = {**config, "max_patches": int(max_tiles), "min_patches": min(int(config.get("min_patches", 1)), max_tiles)}
  processor = make_processor(config, crop_to_patches)
  (start, start_id), (context, context_id), (end, end_id) = (
      image_token(tokenizer, a) for a in ("start_image_token", "context_image_token", "end_image_token")
  )
  return ImageInputs(processor, image_seq_length, start, context, end, start_id, context_id, end_id)


# ------------------------------------------------------------------------------------------------ images


def open_image(value: Any, index: int, column: str = "images", position: int | None = None):
  """An image value -> an RGB PIL image, decoded (a broken file fails here, not later).

  value: a path (local or gs://), bytes, a {"bytes", "path"} dict (bytes win when both are set) or a PIL
  image. Anything missing, unreadable or not an image raises BadRow naming the row, the column and the
  image's position in the row's list."""
  which = "" if position is None else f"image {position}: "
  if isinstance(value, PIL.Image.Image):
    image, what = value, "(a PIL image)"
  else:
    source, what = _source(value, index, column, which)
  try:
    if not isinstance(value, PIL.Image.Image):
      if isinstance(source, bytes):
        image = PIL.Image.open(io.BytesIO(source))
      else:
        image = PIL.Image.open(storage.local_copy(source) if storage.is_url(source) else source)
    image.load()
    rgb = image if image.mode == "RGB" else image.convert("RGB")
  except FileNotFoundError:
    raise BadRow(index, column, f"{which}image file not found: {what}") from None
  except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
    raise BadRow(index, column, f"{which}cannot read image {what}: {storage.short(e, 200)}") from None
  if rgb.width <= 0 or rgb.height <= 0:
    raise BadRow(index, column, f"{which}empty image ({rgb.width}x{rgb.height} pixels)")
  return rgb


def _source(value: Any, index: int, column: str, which: str) -> tuple[str | bytes, str]:
  """(path or bytes, a short description for messages) of an image value that is not a PIL image."""
  if isinstance(value, dict):
    data, path = value.get("bytes"), value.get("path")
    if data:
      value = data
    elif path:
      value = path
    else:
      raise BadRow(index, column, f"{which}an image dict needs 'bytes' or 'path'", value)
  if isinstance(value, (bytes, bytearray, memoryview)):
    return bytes(value), f"of {len(value)} bytes"
  if isinstance(value, str) and value:
    return value if storage.is_url(value) else os.path.expanduser(value), repr(value)
  raise BadRow(
      index, column, f"{which}expected an image: a path, bytes, a {{'bytes', 'path'}} dict or a PIL image", value
  )


def bucket_tiles(tiles: int) -> int:
  """The padded tile count of a batch: the smallest power of two >= tiles (at least 1), so few shapes occur."""
  return 1 << max(0, int(tiles) - 1).bit_length()
