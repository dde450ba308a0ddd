"""The last holes a hostile probe found (issue 20): non-regular files where images and prompts are read, foreign
config targets in the sampling scripts, silent nonsense in embeddings and prompts, raw tracebacks, and images
of unusual kinds. Every hostile input is built here; the FIFO tests run in a subprocess with a timeout, so a
regression fails instead of hanging the suite."""
import errno
import os
import re
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from conftest import load_script, write_concept_images
from ldm.cli_checks import run_cli, user_error_message
from ldm.config_trust import load_trusted_config
from ldm.data.image_ops import load_rgb
from ldm.data.personalized import PersonalizedBase
from ldm.models.diffusion.textual_inversion import EmbeddingLoadError, load_embeddings
from ldm.modules.embedding_io import load_embedding_file, read_xti_file
from ldm.modules.embedding_manager import EmbeddingManager
from ldm.txt2img_common import read_prompts
from ldm.util import ConfigError, InputFileError

ROOT = Path(__file__).resolve().parents[1]
FIFOS = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
stable_txt2img = load_script("stable_txt2img")
evaluate_model = load_script("evaluate_model")
convert_embedding = load_script("convert_embedding")


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
def test_a_fifo_among_the_training_images_is_skipped_naming_it_and_main_trains(tmp_path, tiny_ckpt):
    concept = write_concept_images(tmp_path / "concept")
    os.mkfifo(concept / "z.png")
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--base", str(ROOT / "configs/tiny/finetune-tiny.yaml"), "-t",
         "--actual_resume", str(tiny_ckpt), "--data_root", str(concept), "--init_word", "triangle", "-l",
         str(tmp_path / "logs"), "--max_steps", "1", "lightning.callbacks.image_logger.params.disabled=true"],
        cwd=str(ROOT), env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "z.png is not a regular file but a pipe" in result.stderr
    assert "train, PersonalizedBase, 300" in result.stdout  # the three images, 100 repeats each


@FIFOS
def test_a_fifo_caption_file_is_refused_naming_it(tmp_path):
    concept = write_concept_images(tmp_path / "concept")
    os.mkfifo(concept / "concept_0.txt")  # where concept_0.png's caption would be
    result = run_python("from ldm.data.personalized import PersonalizedBase\n"
                        f"PersonalizedBase({str(concept)!r})", timeout=60)
    assert result.returncode != 0 and "InputFileError" in result.stderr
    assert "caption file" in result.stderr and "concept_0.txt is not a regular file" in result.stderr


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
        read_prompts(str(path))


def test_a_prompt_file_gives_its_non_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a photo of *\n\n  \nan oil painting of *\n", encoding="utf-8")
    assert read_prompts(str(path)) == ["a photo of *", "an oil painting of *"]


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


# ------------------------------------------------------------------------ 3. no silent nonsense from embeddings
@pytest.fixture
def tiny_model():
    from conftest import build_tiny_model
    return build_tiny_model(OmegaConf.load(ROOT / "configs/tiny/txt2img-tiny.yaml"))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_an_embedding_stored_as_integers_is_refused_naming_the_type(tmp_path, dtype):
    path = tmp_path / "ints.safetensors"
    save_file({"emb_params": torch.ones(2, 768, dtype=dtype)}, str(path))
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=f"ints.safetensors: embedding 'ints' is stored as {name}, not as real"):
        load_embedding_file(str(path))
    kohya_xti = tmp_path / "xti.safetensors"
    save_file({layer: torch.ones(1, 32, dtype=dtype) for layer in ("IN01", "MID", "OUT00")}, str(kohya_xti))
    with pytest.raises(ValueError, match=f"XTI entry 'IN01' is stored as {name}"):
        read_xti_file(str(kohya_xti))


def test_an_embedding_that_can_never_fit_a_prompt_is_refused_naming_the_count(tmp_path, tiny_model):
    path = tmp_path / "huge.safetensors"
    save_file({"emb_params": torch.randn(10_000, 32)}, str(path))
    with pytest.raises(EmbeddingLoadError, match="'huge' has 10000 vectors, but a prompt holds at most 75"):
        load_embeddings(tiny_model, [str(path)])
    fits = tmp_path / "fits.safetensors"
    save_file({"emb_params": torch.randn(75, 32)}, str(fits))
    assert load_embeddings(tiny_model, [str(fits)])[0][2] == 75  # the most a prompt can hold is accepted
    with pytest.raises(ValueError, match="has 76 vectors"):  # training asks the same question
        EmbeddingManager(tiny_model.cond_stage_model, ["*"], num_vectors_per_token=76)


def test_a_prompt_cut_by_the_tokenizer_is_one_line_with_the_count(tmp_path, tiny_model, capfd):
    from ldm.txt2img_common import warn_cut_prompts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_cut_prompts(tiny_model, {"a photo of a red cat " * 250, "a photo of *"})
    assert [str(w.message) for w in caught] == [
        "The prompt 'a photo of a red cat a photo of a red cat a photo of a re...' is 1500 tokens long; the text "
        "encoder reads 75, so the last 1425 are cut."]
    assert "Token indices sequence length" not in "".join(capfd.readouterr())  # the tokenizer's own noise
    save_file({"emb_params": torch.randn(4, 32)}, str(tmp_path / "four.safetensors"))
    load_embeddings(tiny_model, [str(tmp_path / "four.safetensors")], ["*"])  # "*" takes three more positions
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_cut_prompts(tiny_model, {"a " * 73 + "*"})
    assert len(caught) == 1 and "is 77 tokens long" in str(caught[0].message)
    assert "the last 2 are cut" in str(caught[0].message)


def test_a_kohya_xti_file_missing_a_layer_is_refused_naming_it(tmp_path, tiny_model):
    from ldm.modules.xti import XTIEmbeddingManager
    manager = XTIEmbeddingManager(tiny_model.cond_stage_model, unet=tiny_model.model.diffusion_model)
    layers = [name for name in manager.layer_names if name != "MID"]
    path = tmp_path / "no-mid.safetensors"
    save_file({layer: torch.randn(1, 32) for layer in layers}, str(path))
    assert read_xti_file(str(path)).layers == tuple(layers)  # XTI by its layer names, not six concepts
    with pytest.raises(ValueError, match="no-mid.safetensors is an extended textual inversion .* 6 cross-attention"):
        load_embedding_file(str(path))
    with pytest.raises(ValueError, match="without the layer MID of this model's 7: the file is incomplete"):
        manager.load(str(path))


# ------------------------------------------------------------------------------ 4. one line, not a traceback
def test_outdir_that_is_a_file_is_one_line(tmp_path, tiny_ckpt):
    (tmp_path / "taken").write_text("not a folder")
    message = one_line_exit(stable_txt2img.main, ["--config", str(ROOT / "configs/tiny/txt2img-tiny.yaml"), "--ckpt",
                                                  str(tiny_ckpt), "--device", "cpu", "--outdir",
                                                  str(tmp_path / "taken")])
    assert "--outdir" in message and "taken is a file, not a folder" in message
    nested = NotADirectoryError(errno.ENOTDIR, "Not a directory", str(tmp_path / "taken" / "samples"))
    assert "part of that path is a file" in user_error_message(nested)  # the same below any output folder


def test_a_trainer_key_typo_gets_did_you_mean(tmp_path, tiny_ckpt, concept_dir):
    import main as entry
    with pytest.raises(ConfigError, match="Unknown config key `max_step` for lightning.trainer: did you mean "
                                          "`max_steps`"):
        entry.main(["--base", str(ROOT / "configs/tiny/finetune-tiny.yaml"), "-t", "--actual_resume", str(tiny_ckpt),
                    "--data_root", str(concept_dir), "-l", str(tmp_path / "logs"), "lightning.trainer.max_step=3"])
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("kind, expected", [
    ("param_is_int", "string_to_param should map names to vectors, got int"),
    ("vector_is_int", "embedding '\\*' should be a \\[d\\] or \\[n, d\\] tensor, got int"),
    ("bad_step", "its step 'abc' is not a whole number"),
    ("fractional_step", "its step 2.5 is not a whole number")])
def test_convert_embedding_names_the_file_and_what_is_wrong(tmp_path, capsys, kind, expected):
    vectors = {"*": torch.randn(1, 768)}
    data = {"string_to_token": {"*": torch.tensor(265)}, "string_to_param": vectors, "name": "x", "step": 3}
    data.update({"param_is_int": {"string_to_param": 5}, "vector_is_int": {"string_to_param": {"*": 5}},
                 "bad_step": {"step": "abc"}, "fractional_step": {"step": 2.5}}[kind])
    path = tmp_path / f"{kind}.pt"
    torch.save(data, path)
    assert convert_embedding.main(["--input", str(path), "--output", str(tmp_path / "out.pt"), "--to", "a1111"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"convert_embedding: {path}: ") and re.search(expected, err), err


def test_a_full_disk_in_convert_embedding_is_one_line_and_keeps_the_old_file(tmp_path, capsys, monkeypatch):
    source = tmp_path / "embeddings.pt"
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": torch.randn(1, 768)}}, source)
    destination = tmp_path / "out" / "learned.safetensors"
    destination.parent.mkdir()
    destination.write_bytes(b"the previous conversion")

    def disk_full(tensors, filename, metadata=None):  # the disk fills while the tensors are written
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    assert convert_embedding.main(["--input", str(source), "--output", str(destination), "--to", "kohya"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"convert_embedding: cannot write {destination}: no space left on the device. Files already "
                   "written are intact; free space or fix permissions, or choose another output folder."), err
    assert destination.read_bytes() == b"the previous conversion"
    assert os.listdir(destination.parent) == ["learned.safetensors"]  # no temporary left behind
