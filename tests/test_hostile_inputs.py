"""The last holes a hostile probe found (issue 20): non-regular files where images and prompts are read, foreign
config targets in the sampling scripts, silent nonsense in embeddings and prompts, raw tracebacks, and images
of unusual kinds. Every hostile input is built here; the FIFO tests run in a subprocess with a timeout, so a
regression fails instead of hanging the suite."""
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import load_script, write_concept_images
from ldm.cli_checks import run_cli
from ldm.config_trust import load_trusted_config
from ldm.data.image_ops import load_rgb
from ldm.data.personalized import PersonalizedBase
from ldm.txt2img_common import read_prompt_file
from ldm.util import ConfigError, InputFileError

ROOT = Path(__file__).resolve().parents[1]
FIFOS = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
stable_txt2img = load_script("stable_txt2img")
evaluate_model = load_script("evaluate_model")


def run_python(code, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), env=env, capture_output=True, text=True,
                          timeout=timeout)


def one_line_exit(main, argv, prog="script"):
    """Run a script's main as its command line does; -> the one-line message it exits with."""
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: main(argv), prog)
    message = str(info.value.code)
    assert "\n" not in message and "Traceback" not in message, message
    return message


# ------------------------------------------------------------------------- 1. only regular files, bounded reads
@FIFOS
def test_a_fifo_among_the_training_images_is_skipped_naming_it(tmp_path):
    concept = write_concept_images(tmp_path / "concept")
    os.mkfifo(concept / "z.png")
    result = run_python(
        "import warnings; from ldm.data.personalized import PersonalizedBase\n"
        f"with warnings.catch_warnings(record=True) as w:\n"
        f"    warnings.simplefilter('always'); ds = PersonalizedBase({str(concept)!r}, size=32)\n"
        "    ds[0]\n"
        "print(len(ds.image_paths)); print(*[str(x.message) for x in w], sep='\\n')", timeout=60)
    assert result.returncode == 0, result.stderr
    count, *messages = result.stdout.strip().splitlines()
    assert count == "3"
    assert any("z.png is not a regular file" in m for m in messages), messages


@FIFOS
def test_load_rgb_refuses_a_fifo_instead_of_waiting_for_a_writer(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    result = run_python("from ldm.data.image_ops import load_rgb\n"
                        f"load_rgb({str(tmp_path / 'pipe.png')!r})", timeout=60)
    assert result.returncode != 0 and "InputFileError" in result.stderr
    assert "pipe.png is not a regular file" in result.stderr


@FIFOS
def test_a_fifo_prompt_file_is_one_line_before_the_model_loads(tmp_path, tiny_ckpt):
    os.mkfifo(tmp_path / "prompts.txt")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/stable_txt2img.py"), "--from-file", str(tmp_path / "prompts.txt"),
         "--config", str(ROOT / "configs/tiny/txt2img-tiny.yaml"), "--ckpt", str(tiny_ckpt), "--device", "cpu",
         "--outdir", str(tmp_path / "out")],
        cwd=str(ROOT), env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "prompt file" in result.stderr and "prompts.txt is not a regular file" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind, expected", [
    ("device", "is not a regular file"), ("folder", "is a folder, not a file"), ("missing", "not found"),
    ("binary", "is not UTF-8 text"), ("blank", "holds no prompt"), ("huge", "MiB, more than the 16 MiB")])
def test_prompt_files_that_are_not_prompt_files_say_what_they_are(tmp_path, kind, expected):
    path = tmp_path / "prompts.txt"
    if kind == "device":
        path = Path("/dev/zero")
        if not path.exists():
            pytest.skip("no /dev/zero")
    elif kind == "folder":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"a photo of *\n\xff\xfe\x00junk")
    elif kind == "blank":
        path.write_text("\n   \n")
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(17 * 2**20)  # sparse: costs no disk
    with pytest.raises(InputFileError, match=expected):
        read_prompt_file(str(path))


def test_a_prompt_file_gives_its_non_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a photo of *\n\n  \nan oil painting of *\n", encoding="utf-8")
    assert read_prompt_file(str(path)) == ["a photo of *", "an oil painting of *"]


# ------------------------------------------------------------------- 2. sampling configs name trusted targets only
@pytest.fixture
def system_config(tmp_path):
    """A config whose model is `os.system("touch <marker>")`; -> (config path, marker path)."""
    marker = tmp_path / "it-ran"
    config = tmp_path / "evil.yaml"
    OmegaConf.save({"model": {"target": "os.system", "params": {"command": f"touch {marker}"}}}, config)
    return config, marker


def test_txt2img_refuses_a_config_that_names_os_system_and_does_not_run_it(tmp_path, system_config, tiny_ckpt):
    config, marker = system_config
    message = one_line_exit(stable_txt2img.main, ["--config", str(config), "--ckpt", str(tiny_ckpt), "--device",
                                                  "cpu", "--outdir", str(tmp_path / "out")])
    assert "os.system" in message and str(config) in message and "--trust_config" in message
    assert not marker.exists()


def test_evaluate_model_refuses_a_config_that_names_os_system(tmp_path, system_config, tiny_ckpt):
    config, marker = system_config
    message = one_line_exit(evaluate_model.main, ["--config", str(config), "--ckpt", str(tiny_ckpt), "--toy_target",
                                                  "magenta triangle", "--device", "cpu"])
    assert "os.system" in message and "--trust_config" in message
    assert not marker.exists()


def test_trust_config_lets_a_foreign_target_through_naming_it(system_config, capsys):
    config, marker = system_config
    assert load_trusted_config(str(config), trust=True).model.target == "os.system"
    assert "Trusting config target os.system" in capsys.readouterr().out
    assert not marker.exists()  # loading a config never instantiates it
    with pytest.raises(ConfigError, match="os.system"):
        load_trusted_config(str(config), trust=False)
    for shipped in ("configs/tiny/txt2img-tiny.yaml", "configs/stable-diffusion/v1-inference.yaml",
                    "configs/latent-diffusion/txt2img-1p4B-eval_with_tokens.yaml"):
        load_trusted_config(str(ROOT / shipped), trust=False)


# --------------------------------------------------------------------------------- 6. images of unusual kinds
def _png16_rgb(path, pixels):
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), from (h, w, 3) uint16 pixels."""
    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def loaded_with_notes(path, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = load_rgb(str(path), **kwargs)
    return np.asarray(image), [str(w.message) for w in caught]


def test_cmyk_gif_and_16_bit_images_are_converted_with_one_line_each(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue", "green")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    _png16_rgb(tmp_path / "deep.png", np.full((8, 8, 3), (65535, 32768, 0), dtype=np.uint16))

    cmyk, notes = loaded_with_notes(tmp_path / "cmyk.jpg")
    assert len(notes) == 1 and "is CMYK: converted to RGB" in notes[0]
    assert np.allclose(cmyk[8, 8], (255, 0, 0), atol=12)  # no magenta/yellow ink subtracted from red

    gif, notes = loaded_with_notes(tmp_path / "anim.gif")
    assert len(notes) == 1 and "has 3 frames (animated): the first frame is used" in notes[0]
    assert np.allclose(gif[8, 8], (255, 0, 0), atol=4)

    deep, notes = loaded_with_notes(tmp_path / "deep.png")
    assert len(notes) == 1 and "16 or more bits per channel: scaled to 8 bits" in notes[0]
    assert tuple(deep[0, 0]) == (255, 128, 0)

    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    assert loaded_with_notes(tmp_path / "plain.png")[1] == []  # an ordinary image: no note


def test_transparent_pixels_are_composited_onto_the_background(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # transparent black...
    rgba[:, :4] = (0, 0, 255, 255)  # ...beside opaque blue
    rgba[:, 4:6, 3] = 128  # half-transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut-out.png")
    white, notes = loaded_with_notes(tmp_path / "cut-out.png")
    assert len(notes) == 1 and "composited onto the background colour (255, 255, 255)" in notes[0]
    assert tuple(white[0, 0]) == (0, 0, 255) and tuple(white[0, 7]) == (255, 255, 255)
    assert np.allclose(white[0, 4], 127, atol=1)  # half black over white

    grey, _ = loaded_with_notes(tmp_path / "cut-out.png", background=(128, 128, 128))
    assert tuple(grey[0, 7]) == (128, 128, 128) and tuple(grey[0, 0]) == (0, 0, 255)

    (tmp_path / "concept").mkdir()
    os.replace(tmp_path / "cut-out.png", tmp_path / "concept" / "cut-out.png")
    example = PersonalizedBase(str(tmp_path / "concept"), flip_p=0.0, background="#808080")[0]["image"]
    assert np.allclose(example[0, 7], 128 / 127.5 - 1, atol=1e-6)
    with pytest.raises(ValueError, match="background 'chartreusish'"):
        PersonalizedBase(str(tmp_path / "concept"), background="chartreusish")


@pytest.mark.parametrize("name", ["big.jpg", "big.png"])
def test_a_huge_image_is_reduced_while_decoding_never_below_the_training_size(tmp_path, name):
    gradient = np.linspace(0, 255, 3000, dtype=np.float32)
    big = np.stack([np.broadcast_to(gradient[:2000, None], (2000, 3000))] * 3, axis=-1).astype(np.uint8)
    Image.fromarray(big).save(tmp_path / name)
    image = load_rgb(str(tmp_path / name), min_side=200)
    assert 200 <= min(image.size) < 400 and image.size[0] * 2 == image.size[1] * 3, image.size
    assert image.info["original_size"] == (3000, 2000)
    assert load_rgb(str(tmp_path / name)).size == (3000, 2000)  # without min_side: the full image
    (tmp_path / "concept").mkdir()
    os.replace(tmp_path / name, tmp_path / "concept" / name)
    dataset = PersonalizedBase(str(tmp_path / "concept"), size=64, center_crop=True, size_conditioning=True)
    example = dataset[0]
    assert example["image"].shape == (64, 64, 3)
    assert example["original_size_as_tuple"].tolist() == [2000, 3000]  # SDXL conditions on the file's size
