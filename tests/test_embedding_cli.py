"""--embedding_path in the sampling and evaluation scripts, end to end on the tiny LDM: names users type, and
one clear line for a file that cannot be used."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from ldm.modules.embedding_io import save_embedding_file
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/tiny/txt2img-tiny.yaml"


@pytest.fixture
def sample_args(tmp_path, tiny_ckpt):
    return ["--config", str(CONFIG), "--ckpt", str(tiny_ckpt), "--n_samples", "1", "--n_iter", "1",
            "--ddim_steps", "3", "--H", "32", "--W", "32", "--f", "4", "--C", "4", "--precision", "full",
            "--device", "cpu", "--skip_grid", "--seed", "3"]


def test_prompt_names_the_files(tmp_path, sample_args, capsys):
    """--embedding_path EasyNegative.safetensors bad-hands-5.pt, with the file names in the prompt."""
    stable_txt2img = load_script("stable_txt2img")
    generator = torch.Generator().manual_seed(0)
    easy = save_embedding_file(tmp_path / "EasyNegative.safetensors", {"x": 3 * torch.randn(4, 32, generator=generator)},
                               fmt="a1111-safetensors")
    hands = save_embedding_file(tmp_path / "bad-hands-5.pt", {"x": 3 * torch.randn(2, 32, generator=generator)},
                                name="something-else", fmt="a1111")
    prompt = ["--prompt", "a photo of a cat, EasyNegative, bad-hands-5"]
    plain = stable_txt2img.main(sample_args + prompt + ["--outdir", str(tmp_path / "plain")])
    named = stable_txt2img.main(sample_args + prompt + ["--outdir", str(tmp_path / "named"),
                                                        "--embedding_path", str(easy), str(hands)])
    out = capsys.readouterr().out
    assert f"Embedding 'EasyNegative' (4 vectors) from {easy}" in out
    assert f"Embedding 'bad-hands-5' (2 vectors) from {hands}" in out
    assert not np.array_equal(np.asarray(Image.open(plain[0])), np.asarray(Image.open(named[0])))


def test_unusable_embedding_is_one_line_in_every_script(tmp_path, sample_args, tiny_ckpt):
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", "this is not base64 !!!")
    broken = tmp_path / "broken.png"
    Image.new("RGB", (8, 8), (50, 60, 70)).save(broken, pnginfo=info)
    message = r"Could not load embeddings from .*broken.png: .*broken.png: the 'sd-ti-embedding' text chunk is not base64"

    with pytest.raises(SystemExit, match=message):
        load_script("stable_txt2img").main(sample_args + ["--embedding_path", str(broken),
                                                          "--outdir", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=message):
        load_script("evaluate_model").main(["--config", str(CONFIG), "--ckpt", str(tiny_ckpt), "--embedding_path",
                                            str(broken), "--n_samples", "1", "--ddim_steps", "2", "--toy_target",
                                            "red square", "--outdir", str(tmp_path / "eval"), "--device", "cpu"])
