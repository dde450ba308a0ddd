"""AUTOMATIC1111's PNG embeddings, read and written with Pillow and numpy (nothing is unpickled).

The webui stores the same dict as its .pt files ({"string_to_token", "string_to_param", "name", "step", ...})
as JSON, each tensor written as {"TORCHTENSOR": nested lists}, in one of two places:
  text chunk  a PNG text chunk `sd-ti-embedding` holding base64 of that JSON;
  pixels      zlib-compressed JSON hidden in two blocks of pixels left and right of the preview image, each
              block separated from the image by a black column. Each byte is split into nibbles: the low
              nibbles go to the left block, the high nibbles to the right one, both filled row-major as
              (height, columns, RGB) and repeated to fill whole columns, and each nibble is XORed with the low
              four bits of a fixed pseudo-random sequence (an LCG). The pixels' own high nibbles are
              decoration, ignored by readers.
"""
import base64
import binascii
import functools
import json
import zlib

import numpy as np
import torch
from PIL import Image, PngImagePlugin

TEXT_CHUNK = "sd-ti-embedding"
TENSOR_KEY = "TORCHTENSOR"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_JSON_BYTES = 256 * 2 ** 20  # an embedding is kilobytes; refuse to inflate anything near this


class PNGEmbeddingError(ValueError):
    pass


def is_png(path):
    with open(path, "rb") as f:
        return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE


@functools.lru_cache(maxsize=4)
def _lcg_nibbles(count):
    """The low four bits of the webui's LCG (a=1664525, c=1013904223, m=2**32, seed 0, values mod 255)."""
    out = np.empty(count, dtype=np.uint8)
    seed = 0
    for i in range(count):
        seed = (1664525 * seed + 1013904223) % 2 ** 32
        out[i] = (seed % 255) & 0x0F
    out.flags.writeable = False  # cached and shared by both blocks
    return out


def xor_nibbles(block):
    """XOR a (h, w, 3) block of nibbles with the LCG sequence; its own inverse."""
    return block ^ _lcg_nibbles(block.size).reshape(block.shape)


def _decode_tensors(obj):
    if TENSOR_KEY in obj:
        try:
            array = np.asarray(obj[TENSOR_KEY], dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise PNGEmbeddingError(f"a tensor in the embedding is not a rectangular array of numbers ({err})")
        return torch.from_numpy(array)
    return obj


def _parse_json(raw, path, where):
    try:
        data = json.loads(raw, object_hook=_decode_tensors)
    except PNGEmbeddingError as err:
        raise PNGEmbeddingError(f"{path}: the embedding in its {where}: {err}") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise PNGEmbeddingError(f"{path}: the {where} is not an embedding (not valid JSON: {err}); the file is "
                                "damaged or was not written by AUTOMATIC1111's webui") from None
    # A one-encoder embedding (string_to_param) or an SDXL one (clip_l and clip_g), as the webui reads them.
    if not isinstance(data, dict) or not ("string_to_param" in data or {"clip_l", "clip_g"} <= set(data)):
        raise PNGEmbeddingError(f"{path}: the {where} holds JSON but no string_to_param (or SDXL clip_l and "
                                "clip_g) embedding")
    return data


def _from_text_chunk(text, path):
    where = f"{TEXT_CHUNK!r} text chunk"
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise PNGEmbeddingError(f"{path}: the {where} is not base64 ({err}); the file is damaged or was not "
                                "written by AUTOMATIC1111's webui") from None
    return _parse_json(raw, path, where)


def _crop_to_content(rgb):
    """Crop to the bounding box of pixels whose three channels are all non-zero (the webui's crop_black)."""
    mask = (rgb > 0).all(axis=2)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return rgb[:0, :0]
    return rgb[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _from_pixels(rgb, path):
    nibbles = _crop_to_content(rgb) & 0x0F
    black = np.flatnonzero(nibbles.sum(axis=(0, 2)) == 0)
    if black.size < 2:
        return None
    low, high = nibbles[:, :black.min()], nibbles[:, black.max() + 1:]
    if low.size == 0 or low.shape != high.shape:
        return None
    stream = ((xor_nibbles(high) << 4) | xor_nibbles(low)).tobytes()
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(stream, MAX_JSON_BYTES)
    except zlib.error:
        return None
    if not inflate.eof:
        raise PNGEmbeddingError(f"{path}: the data in its edge pixels is truncated or inflates beyond "
                                f"{MAX_JSON_BYTES} bytes")
    return _parse_json(raw, path, "edge pixels")


def read_png_embedding(path):
    """The webui's embedding dict (tensors as float32) from a PNG, from its text chunk or else its pixels."""
    try:
        with Image.open(path) as image:
            image.load()
            text = getattr(image, "text", {}).get(TEXT_CHUNK)
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8) if text is None else None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise PNGEmbeddingError(f"{path}: not a readable PNG image ({err})") from None
    data = _from_text_chunk(text, path) if text is not None else _from_pixels(rgb, path)
    if data is None:
        raise PNGEmbeddingError(f"{path} is a PNG image without an embedding: no {TEXT_CHUNK!r} text chunk and "
                                "no embedding data in its edge pixels")
    return data


def _encode_tensors(value):
    if isinstance(value, torch.Tensor):
        return {TENSOR_KEY: value.detach().cpu().float().tolist()}
    raise TypeError(f"cannot store a {type(value).__name__} in a PNG embedding")


def preview_image(vectors):
    """A small grey picture of the first vector's magnitudes, the image that carries the text chunk."""
    first = vectors[0].abs()
    side = int(np.ceil(np.sqrt(first.numel())))
    levels = np.zeros(side * side, dtype=np.uint8)
    levels[:first.numel()] = (first / first.max().clamp(min=1e-12) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(levels.reshape(side, side), mode="L").resize((side * 4, side * 4), Image.NEAREST)


def write_png_embedding(path, data, image):
    """Save `image` as a PNG carrying `data` (the webui's .pt dict) in the sd-ti-embedding text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_CHUNK, base64.b64encode(json.dumps(data, default=_encode_tensors).encode()))
    image.save(path, format="PNG", pnginfo=info)
