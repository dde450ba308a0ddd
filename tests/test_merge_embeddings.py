import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import merge_embeddings
from ldm.modules.embedding_io import load_embedding_file, save_embedding_file

ROOT = Path(__file__).resolve().parents[1]
D = 8


def _vec(n, seed):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def no_questions(monkeypatch):
    """The merge must never prompt: any input() fails the test."""
    def refuse(*args):
        raise AssertionError("merge_embeddings asked a question")
    monkeypatch.setattr("builtins.input", refuse)


@pytest.fixture
def files(tmp_path):
    """Three official files: a and b both use '*', c uses '@' (CLIP ids: '*' 265, '@' 287)."""
    paths = {}
    for label, string, token, seed in (("a", "*", 265, 1), ("b", "*", 265, 2), ("c", "@", 287, 3)):
        paths[label] = tmp_path / f"{label}.pt"
        save_embedding_file(paths[label], {string: _vec(2, seed)}, tokens={string: token})
    return paths


def _merge(files, out, *extra):
    argv = ["--manager_ckpts", *map(str, files), "--output_path", str(out), *extra]
    return merge_embeddings.main(argv)


def _merged(out):
    torch.load(out, weights_only=True)  # plain tensors only
    return load_embedding_file(out)


def test_clash_is_an_error_by_default_and_nothing_is_written(files, tmp_path, capsys):
    out = tmp_path / "merged.pt"
    assert _merge([files["a"], files["b"]], out) == 1
    err = capsys.readouterr().err
    assert "'*'" in err and "b.pt" in err and "a.pt" in err and "--on_clash" in err and "Nothing was written" in err
    assert not out.exists()


def test_without_clash_everything_is_kept(files, tmp_path):
    out = tmp_path / "merged.pt"
    assert _merge([files["a"], files["c"]], out) == 0
    merged = _merged(out)
    assert merged.format == "official"
    assert merged.tokens == {"*": 265, "@": 287}
    assert torch.equal(merged.vectors["*"], _vec(2, 1)) and torch.equal(merged.vectors["@"], _vec(2, 3))


@pytest.mark.parametrize("mode,expected_seed", [("skip", 1), ("overwrite", 2)])
def test_skip_keeps_first_and_overwrite_keeps_last(files, tmp_path, mode, expected_seed):
    out = tmp_path / "merged.pt"
    assert _merge([files["a"], files["b"], files["c"]], out, "--on_clash", mode) == 0
    merged = _merged(out)
    assert merged.tokens == {"*": 265, "@": 287}
    assert torch.equal(merged.vectors["*"], _vec(2, expected_seed))


def test_rename_picks_a_free_single_token_placeholder(files, tmp_path, capsys):
    out = tmp_path / "merged.pt"
    assert _merge([files["a"], files["b"], files["c"]], out, "--on_clash", "rename", "-sd") == 0
    merged = _merged(out)
    # '*' and '@' are taken by the inputs, so the renamed concept gets the next candidate, '&'.
    assert list(merged.vectors) == ["*", "&", "@"]
    assert merged.tokens == {"*": 265, "&": 261, "@": 287}
    assert torch.equal(merged.vectors["&"], _vec(2, 2))
    assert "renamed to '&'" in capsys.readouterr().out


def test_rename_to_explicit_placeholders(files, tmp_path):
    out = tmp_path / "merged.pt"
    assert _merge([files["a"], files["b"]], out, "--on_clash", "rename", "--rename_to", "sks", "-sd") == 0
    merged = _merged(out)
    assert merged.tokens == {"*": 265, "sks": 48136}
    assert torch.equal(merged.vectors["sks"], _vec(2, 2))


@pytest.mark.parametrize("bad", ["<my-cat>", "@"])
def test_rename_to_refuses_multi_token_or_taken_strings(files, tmp_path, bad, capsys):
    out = tmp_path / "merged.pt"
    argv = [files["a"], files["b"], files["c"]]
    assert _merge(argv, out, "--on_clash", "rename", "--rename_to", bad, "-sd") == 1
    assert repr(bad) in capsys.readouterr().err
    assert not out.exists()


def test_merges_other_formats_and_original_files(tmp_path):
    original = tmp_path / "original.pt"
    params = nn.ParameterDict({"*": nn.Parameter(_vec(1, 4))})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, original)
    diffusers = tmp_path / "learned_embeds.safetensors"
    save_embedding_file(diffusers, {"sks": _vec(3, 5)}, fmt="diffusers")
    out = tmp_path / "merged.pt"
    assert _merge([original, diffusers], out, "-sd") == 0
    merged = _merged(out)
    assert merged.tokens == {"*": 265, "sks": 48136}
    assert torch.equal(merged.vectors["*"], _vec(1, 4)) and torch.equal(merged.vectors["sks"], _vec(3, 5))


def test_multi_token_concept_name_is_a_clear_error(tmp_path, capsys):
    a1111 = tmp_path / "magenta-tri.pt"
    save_embedding_file(a1111, {"magenta-tri": _vec(1, 6)}, fmt="a1111")
    out = tmp_path / "merged.pt"
    assert _merge([a1111], out, "-sd") == 1
    err = capsys.readouterr().err
    assert "'magenta-tri'" in err and "convert_embedding.py --name" in err
    assert not out.exists()


@pytest.mark.parametrize("on_clash,expected_rc", [("error", 1), ("rename", 0)])
def test_cli_never_prompts(files, tmp_path, on_clash, expected_rc):
    out = tmp_path / "merged.pt"
    cmd = [sys.executable, str(ROOT / "merge_embeddings.py"), "--manager_ckpts", str(files["a"]), str(files["b"]),
           "--output_path", str(out), "--on_clash", on_clash, "-sd"]
    # stdin closed: any input() would raise EOFError and fail the run.
    result = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert result.returncode == expected_rc, result.stderr
    assert "EOFError" not in result.stderr
    assert out.exists() == (expected_rc == 0)
    if out.exists():
        assert list(_merged(out).vectors) == ["*", "@"]


def test_files_of_another_family_are_refused_naming_both(tmp_path, capsys):
    sd1, sd2 = tmp_path / "sd1.pt", tmp_path / "sd2.pt"
    save_embedding_file(sd1, {"*": torch.zeros(1, 768)}, tokens={"*": 265})
    save_embedding_file(sd2, {"@": torch.zeros(1, 1024)}, tokens={"@": 287})
    out = tmp_path / "merged.pt"
    assert _merge([sd1, sd2], out, "-sd") == 1
    err = capsys.readouterr().err
    assert "sd2.pt is SD 2.x (OpenCLIP ViT-H, 1024); the first file" in err and "sd1.pt is SD v1 (CLIP ViT-L, 768)" in err
    assert not out.exists()


def test_sdxl_file_is_refused(tmp_path, capsys):
    import safetensors.torch
    sdxl = tmp_path / "xl.safetensors"
    safetensors.torch.save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(sdxl))
    sd1 = tmp_path / "sd1.pt"
    save_embedding_file(sd1, {"*": torch.zeros(1, 768)}, tokens={"*": 265})
    assert _merge([sd1, sdxl], tmp_path / "merged.pt", "-sd") == 1
    assert "xl.safetensors is SDXL (clip_l 768 + clip_g 1280); the first file" in capsys.readouterr().err


def test_tokenizer_must_match_the_family(tmp_path, capsys):
    sd1 = tmp_path / "sd1.pt"
    save_embedding_file(sd1, {"*": torch.zeros(1, 768)}, tokens={"*": 265})
    assert _merge([sd1], tmp_path / "merged.pt") == 1  # without -sd: BERT ids for a CLIP model
    err = capsys.readouterr().err
    assert "sd1.pt is SD v1 (CLIP ViT-L, 768), whose placeholders are clip tokens; the bert tokenizer" in err
    assert _merge([sd1], tmp_path / "merged.pt", "-sd") == 0
    assert f"Wrote {tmp_path / 'merged.pt'} (SD v1 (CLIP ViT-L, 768))" in capsys.readouterr().out
