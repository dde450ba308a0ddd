"""AUTOMATIC1111's PNG embeddings: the sd-ti-embedding text chunk (read and written) and the pixel variant (read)."""
import base64
import json
import os
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, PngImagePlugin

from ldm.modules.embedding_io import load_embedding_file, save_embedding_file
from ldm.modules.embedding_png import PNGEmbeddingError, _lcg_nibbles, xor_nibbles

# The first values of the webui's lcg() generator, from the self-test in its image_embedding.py.
WEBUI_LCG_START = [253, 242, 127, 44, 157, 27, 239, 133, 38, 79, 167, 4, 177, 95, 130, 79, 78, 14, 52, 215]


def _vec(n, d=768, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def webui_dict(vectors, name="pixel-style", step=1500):
    """The dict the webui saves for an embedding (its .pt layout), tensors as its JSON encoder writes them."""
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": {"TORCHTENSOR": vectors.tolist()}},
            "name": name, "step": step, "sd_checkpoint": "7460a6fa", "sd_checkpoint_name": "sd-v1-4"}


def write_pixel_embedding(path, data, image):
    """Hide `data` in the edge pixels of `image` following the webui's layout (insert_image_data_embed)."""
    packed = np.frombuffer(zlib.compress(json.dumps(data).encode(), level=9), np.uint8)
    h, depth = image.height, 3
    size = packed.size + (h - packed.size % h)
    size += h * depth - size % (h * depth)
    blocks = []
    for nibbles, shades in ((packed & 0x0F, range(40, 255, 7)), (packed >> 4, range(250, 30, -9))):
        block = xor_nibbles(np.resize(nibbles, size).reshape(h, -1, depth))
        # decoration in the high nibbles, as the webui's dotted pattern: readers ignore it
        deco = Image.new("RGB", (block.shape[1], h))
        draw, shades = ImageDraw.Draw(deco), list(shades)
        for k, (x, y) in enumerate((x, y) for x in range(-6, block.shape[1], 8) for y in range(-6, h, 8)):
            draw.ellipse((x + 4 * (y // 8 % 2), y, x + 6 + 4 * (y // 8 % 2), y + 6), fill=(shades[k % len(shades)],) * 3)
        blocks.append(Image.fromarray(block | (np.asarray(deco) & 0xF0)))
    low, high = blocks
    canvas = Image.new("RGB", (low.width + image.width + high.width + 2, h), (0, 0, 0))
    canvas.paste(low, (0, 0))
    canvas.paste(image, (low.width + 1, 0))
    canvas.paste(high, (low.width + 1 + image.width + 1, 0))
    canvas.save(path)


def png_with_text(path, text):
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", text)
    Image.new("RGB", (16, 16), (90, 40, 200)).save(path, pnginfo=info)


def test_lcg_is_the_webuis():
    assert _lcg_nibbles(len(WEBUI_LCG_START)).tolist() == [v & 0x0F for v in WEBUI_LCG_START]


def test_text_chunk_round_trip(tmp_path):
    vec = _vec(3)
    path = save_embedding_file(tmp_path / "my-style.png", {"anything": vec}, name="my-style", step=700,
                               fmt="a1111-png")
    loaded = load_embedding_file(path)
    assert (loaded.format, loaded.name, loaded.step, loaded.family) == (
        "a1111-png", "my-style", 700, "SD v1 (CLIP ViT-L, 768)")
    assert list(loaded.vectors) == ["my-style"]  # a PNG answers to its stored name
    assert torch.equal(loaded.vectors["my-style"], vec)


def test_written_text_chunk_is_what_the_webui_reads(tmp_path):
    vec = _vec(2)
    path = save_embedding_file(tmp_path / "e.png", {"e": vec}, name="e", step=3, fmt="a1111-png")
    with Image.open(path) as image:
        data = json.loads(base64.b64decode(image.text["sd-ti-embedding"]))
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint",
                         "sd_checkpoint_name"}
    assert data["string_to_token"] == {"*": 265} and data["name"] == "e" and data["step"] == 3
    assert torch.equal(torch.tensor(data["string_to_param"]["*"]["TORCHTENSOR"]), vec)


def test_text_chunk_as_the_webui_writes_it(tmp_path):
    vec = _vec(4)
    path = tmp_path / "downloaded.png"
    png_with_text(path, base64.b64encode(json.dumps(webui_dict(vec, name="cool-style")).encode()))
    loaded = load_embedding_file(path)
    assert list(loaded.vectors) == ["cool-style"] and loaded.step == 1500
    torch.testing.assert_close(loaded.vectors["cool-style"], vec)


@pytest.mark.parametrize("height", [16, 37])
def test_pixel_variant(tmp_path, height):
    vec = _vec(2, seed=height)
    path = tmp_path / "hidden.png"
    write_pixel_embedding(path, webui_dict(vec), Image.new("RGB", (40, height), (200, 120, 60)))
    with Image.open(path) as image:
        assert "sd-ti-embedding" not in image.text
    loaded = load_embedding_file(path)
    assert (loaded.format, list(loaded.vectors), loaded.step) == ("a1111-png", ["pixel-style"], 1500)
    torch.testing.assert_close(loaded.vectors["pixel-style"], vec)


@pytest.mark.parametrize("text,why", [
    ("this is not base64 !!!", "not base64"),
    (base64.b64encode(b"\x00\x01garbage"), "not valid JSON"),
    (base64.b64encode(b'{"hello": 1}'), "no string_to_param"),
    (base64.b64encode(b'{"string_to_param": {"*": {"TORCHTENSOR": [[1, 2], [3]]}}}'), "not a rectangular"),
])
def test_garbage_in_the_chunk_is_a_clear_error(tmp_path, text, why):
    path = tmp_path / "broken.png"
    png_with_text(path, text)
    with pytest.raises(PNGEmbeddingError, match=why) as err:
        load_embedding_file(path)
    assert "broken.png" in str(err.value) and "weights_only" not in str(err.value)


def test_png_without_embedding_is_a_clear_error(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (20, 20), (10, 200, 30)).save(path)
    with pytest.raises(PNGEmbeddingError, match="photo.png is a PNG image without an embedding"):
        load_embedding_file(path)


def test_png_needs_its_format(tmp_path):
    with pytest.raises(ValueError, match="a1111-png"):
        save_embedding_file(tmp_path / "x.png", {"x": _vec(1)}, fmt="a1111")
    with pytest.raises(ValueError, match="needs a .png path"):
        save_embedding_file(tmp_path / "x.pt", {"x": _vec(1)}, fmt="a1111-png")
    assert not os.listdir(tmp_path)


def test_other_image_is_not_read_as_a_pickle(tmp_path):
    path = tmp_path / "style.webp"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path, format="JPEG")
    with pytest.raises(ValueError, match="style.webp is not a PNG image") as err:
        load_embedding_file(path)
    assert "weights_only" not in str(err.value)


def test_truncated_png_is_a_clear_error(tmp_path):
    good = save_embedding_file(tmp_path / "good.png", {"g": _vec(1)}, name="g", fmt="a1111-png")
    cut = tmp_path / "cut.png"
    cut.write_bytes(open(good, "rb").read()[:60])
    with pytest.raises(PNGEmbeddingError, match="cut.png: not a readable PNG image"):
        load_embedding_file(cut)
