import os

import pytest
import safetensors.torch
import torch
from torch import nn

from ldm.checkpoint import CheckpointSecurityError
from ldm.modules.embedding_io import (
    FORMATS, EmbeddingFamilyError, EmbeddingFile, load_embedding_file, save_embedding_file,
)

D = 8


def _vec(n, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def _raw(path):
    """What a third-party reader gets from the file: safetensors or a weights_only torch.load, nothing else."""
    path = str(path)
    if path.endswith(".safetensors"):
        return safetensors.torch.load_file(path)
    return torch.load(path, weights_only=True)


def a1111_reads(data):
    """The rules of AUTOMATIC1111's create_embedding_from_data (modules/textual_inversion/textual_inversion.py)."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        assert len(params) == 1, "embedding file has multiple terms in it"
        vec = next(iter(params.values())).detach().to(torch.float32)
    elif "clip_g" in data and "clip_l" in data:
        raise AssertionError("SDXL embedding")
    else:
        assert type(data) is dict and type(next(iter(data.values()))) is torch.Tensor
        assert len(data) == 1, "embedding file has multiple terms in it"
        vec = next(iter(data.values()))
        vec = vec.unsqueeze(0) if vec.ndim == 1 else vec
    return vec, data.get("step")


def diffusers_reads(state_dict):
    """The rules of diffusers' TextualInversionLoaderMixin._retrieve_tokens_and_embeddings and
    _extend_tokens_and_embeddings (src/diffusers/loaders/textual_inversion.py)."""
    if isinstance(state_dict, torch.Tensor):
        raise ValueError("a bare tensor needs token=")
    if len(state_dict) == 1:
        token, embedding = next(iter(state_dict.items()))
    elif "string_to_param" in state_dict:
        token, embedding = state_dict["name"], state_dict["string_to_param"]["*"]
    else:
        raise ValueError("state dict must have a single key or string_to_param")
    rows = list(embedding) if embedding.ndim > 1 else [embedding]
    return token, torch.stack(rows)


ROUND_TRIPS = [
    ("official", "emb.pt", {"*": _vec(1), "@": _vec(3, 1)}, {"*": 265, "@": 287}, "shapes", 1500),
    ("a1111", "magenta.pt", {"magenta-tri": _vec(2)}, None, "magenta-tri", 300),
    ("a1111-safetensors", "magenta.safetensors", {"magenta-tri": _vec(2)}, None, "magenta-tri", 300),
    ("diffusers", "learned_embeds.safetensors", {"<tri>": _vec(1)}, None, None, None),
    ("diffusers", "learned_embeds.bin", {"<tri>": _vec(4)}, None, None, None),
    ("kohya", "tri.safetensors", {"tri": _vec(3)}, None, "tri", 120),
    ("kohya", "tri.pt", {"tri": _vec(3)}, None, "tri", None),  # kohya .pt: named by its file stem
]


# AUTOMATIC1111 names these by their file name, whatever name they store; the others by their stored strings.
NAMED_BY_FILE = ("a1111", "a1111-safetensors", "kohya")


@pytest.mark.parametrize("fmt,filename,vectors,tokens,name,step", ROUND_TRIPS)
def test_round_trip_every_format(tmp_path, fmt, filename, vectors, tokens, name, step):
    path = tmp_path / "nested" / filename
    save_embedding_file(path, vectors, tokens=tokens, name=name, step=step, fmt=fmt)
    loaded = load_embedding_file(path)
    assert isinstance(loaded, EmbeddingFile)
    assert loaded.format == fmt
    keys = [path.stem] if fmt in NAMED_BY_FILE else list(vectors)
    assert list(loaded.vectors) == keys
    for key, vec in zip(keys, vectors.values()):
        assert loaded.vectors[key].dtype == torch.float32
        assert torch.equal(loaded.vectors[key], vec)
    assert loaded.tokens == (tokens or {k: None for k in keys})
    assert loaded.name == name and loaded.step == step
    assert [p.name for p in path.parent.iterdir()] == [filename]  # no temp file left behind
    _raw(path)  # plain tensors: weights_only / safetensors readers accept it


def test_official_file_layout_is_plain(tmp_path):
    path = tmp_path / "embeddings_gs-99.pt"
    save_embedding_file(path, {"*": _vec(2)}, tokens={"*": torch.tensor(265)}, name="tri", step=99)
    data = torch.load(path, weights_only=True)
    assert set(data) == {"string_to_token", "string_to_param", "name", "step"}
    assert type(data["string_to_param"]) is dict and data["string_to_token"]["*"].item() == 265
    assert data["string_to_token"]["*"].ndim == 0  # the original compared ids as 0-d tensors


def test_saved_vectors_do_not_drag_their_storage(tmp_path):
    table = torch.randn(1000, D)
    path = tmp_path / "one.pt"
    save_embedding_file(path, {"*": table[5]}, tokens={"*": 265})
    assert os.path.getsize(path) < 4 * table.numel() / 4
    assert torch.equal(load_embedding_file(path).vectors["*"], table[5:6])


@pytest.mark.parametrize("with_parameter_tokens", [False, True])
def test_file_written_by_the_original_code_loads(tmp_path, with_parameter_tokens):
    # The original EmbeddingManager.save: torch.save of its token dict and its nn.ParameterDict.
    params = nn.ParameterDict()
    params["*"] = nn.Parameter(_vec(2), requires_grad=True)
    params["&"] = nn.Parameter(_vec(1, 3), requires_grad=True)
    token = nn.Parameter(torch.tensor(265.0), requires_grad=False) if with_parameter_tokens else torch.tensor(265)
    path = tmp_path / "embeddings.pt"
    torch.save({"string_to_token": {"*": token, "&": torch.tensor(261)}, "string_to_param": params}, path)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)  # why the allow-listed stand-in is needed

    loaded = load_embedding_file(path)
    assert loaded.format == "official"
    assert list(loaded.vectors) == ["*", "&"]
    assert torch.equal(loaded.vectors["*"], params["*"].detach())
    assert torch.equal(loaded.vectors["&"], params["&"].detach())
    assert not loaded.vectors["*"].requires_grad
    assert loaded.tokens == {"*": 265, "&": 261}
    assert loaded.name is None and loaded.step is None


def test_file_with_bare_parameters_loads(tmp_path):
    path = tmp_path / "params.pt"
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": nn.Parameter(_vec(1))}}, path)
    loaded = load_embedding_file(path)
    assert torch.equal(loaded.vectors["*"], _vec(1)) and loaded.tokens == {"*": 265}


def test_automatic1111_file_as_the_webui_writes_it(tmp_path):
    path = tmp_path / "my-style.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": _vec(5).half()}, "name": "my-style",
                "step": 2500, "sd_checkpoint": "7460a6fa", "sd_checkpoint_name": "sd-v1-4"}, path)
    loaded = load_embedding_file(path)
    assert (loaded.format, loaded.name, loaded.step) == ("a1111", "my-style", 2500)
    assert torch.equal(loaded.vectors["my-style"], _vec(5).half().float())

    nameless = tmp_path / "fallback-stem.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": _vec(1)}, "name": None, "step": None,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, nameless)
    assert list(load_embedding_file(nameless).vectors) == ["fallback-stem"]


def test_diffusers_one_dimensional_vector_becomes_a_row(tmp_path):
    path = tmp_path / "learned_embeds.bin"
    torch.save({"<cat-toy>": _vec(1)[0]}, path)
    loaded = load_embedding_file(path)
    assert loaded.format == "diffusers" and loaded.vectors["<cat-toy>"].shape == (1, D)


def test_kohya_emb_params_named_by_file_stem(tmp_path):
    path = tmp_path / "kohya_concept.safetensors"
    safetensors.torch.save_file({"emb_params": _vec(4)}, str(path))
    loaded = load_embedding_file(path)
    assert (loaded.format, loaded.name, list(loaded.vectors)) == ("kohya", "kohya_concept", ["kohya_concept"])


@pytest.mark.parametrize("fmt,filename", [("a1111", "x.pt"), ("a1111-safetensors", "x.safetensors"),
                                          ("kohya", "x.safetensors"), ("kohya", "x.pt")])
def test_a1111_accepts_what_we_export(tmp_path, fmt, filename):
    vec = _vec(3)
    path = tmp_path / filename
    save_embedding_file(path, {"concept": vec}, name="concept", step=7, fmt=fmt)
    got, step = a1111_reads(_raw(path))
    assert torch.equal(got, vec)
    assert step == (7 if fmt == "a1111" else None)


@pytest.mark.parametrize("filename", ["learned_embeds.safetensors", "learned_embeds.bin"])
def test_diffusers_accepts_what_we_export(tmp_path, filename):
    vec = _vec(2)
    path = tmp_path / filename
    save_embedding_file(path, {"<tri>": vec}, fmt="diffusers")
    token, rows = diffusers_reads(_raw(path))
    assert token == "<tri>" and torch.equal(rows, vec)
    # diffusers also reads our A1111 export, via its string_to_param rule.
    a1111 = tmp_path / "tri.pt"
    save_embedding_file(a1111, {"<tri>": vec}, name="<tri>", fmt="a1111")
    token, rows = diffusers_reads(_raw(a1111))
    assert token == "<tri>" and torch.equal(rows, vec)


@pytest.mark.parametrize("fmt", ["a1111", "a1111-safetensors", "kohya", "diffusers"])
def test_one_term_formats_refuse_several_concepts(tmp_path, fmt):
    suffix = ".safetensors" if fmt == "a1111-safetensors" else ".pt"
    path = tmp_path / f"two{suffix}"
    with pytest.raises(ValueError, match="one concept per file"):
        save_embedding_file(path, {"a": _vec(1), "b": _vec(1)}, fmt=fmt)
    assert not path.exists()


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="token id"):
        save_embedding_file(tmp_path / "e.pt", {"*": _vec(1)})
    with pytest.raises(ValueError, match="Unknown embedding format"):
        save_embedding_file(tmp_path / "e.pt", {"*": _vec(1)}, fmt="webui")
    with pytest.raises(ValueError, match="safetensors"):
        save_embedding_file(tmp_path / "e.pt", {"*": _vec(1)}, fmt="a1111-safetensors")
    with pytest.raises(ValueError, match=r"\[d\] or \[n, d\]"):
        save_embedding_file(tmp_path / "e.pt", {"*": torch.zeros(1, 2, 3)}, tokens={"*": 1})
    assert set(FORMATS) == {"official", "a1111", "a1111-png", "a1111-safetensors", "diffusers", "kohya"}


def test_half_sdxl_and_unknown_layouts_are_clear_errors(tmp_path):
    half = tmp_path / "xl.safetensors"
    safetensors.torch.save_file({"clip_l": torch.zeros(1, 768)}, str(half))
    with pytest.raises(ValueError, match=r"xl.safetensors: an SDXL embedding holds exactly clip_l and clip_g; "
                                         r"clip_g missing"):
        load_embedding_file(half)
    uneven = tmp_path / "uneven.safetensors"
    safetensors.torch.save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(2, 1280)}, str(uneven))
    with pytest.raises(ValueError, match=r"uneven.safetensors: the text encoders' vector sets differ"):
        load_embedding_file(uneven)
    model = tmp_path / "model.pt"
    torch.save({"conv.weight": torch.zeros(2, 2, 3, 3), "epoch": 3}, model)
    with pytest.raises(ValueError, match=r"model.pt.*keys found: \['conv.weight', 'epoch'\]"):
        load_embedding_file(model)


def test_malicious_embedding_file_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": _vec(1)}, "string_to_token": {"*": Evil()}}, path)
    with pytest.raises(CheckpointSecurityError, match="system"):
        load_embedding_file(path)
    assert not marker.exists()


def _convert(*argv):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "convert_embedding", os.path.join(os.path.dirname(__file__), "..", "scripts", "convert_embedding.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in argv])


@pytest.mark.parametrize("fmt,filename", [("a1111", "c.pt"), ("a1111-safetensors", "c.safetensors"),
                                          ("diffusers", "learned_embeds.bin"), ("kohya", "c.safetensors")])
def test_convert_to_each_format_and_back(tmp_path, fmt, filename):
    vec = _vec(2)
    source = tmp_path / "embeddings.pt"
    save_embedding_file(source, {"*": vec}, tokens={"*": 265}, name="tri", step=40)
    out = tmp_path / fmt / filename
    assert _convert("--input", source, "--output", out, "--to", fmt) == 0
    converted = load_embedding_file(out)
    assert converted.format == fmt and torch.equal(next(iter(converted.vectors.values())), vec)
    # Back to official: the name is not a CLIP token everywhere, so give the placeholder explicitly.
    back = tmp_path / "back.pt"
    assert _convert("--input", out, "--output", back, "--to", "official", "--name", "@") == 0
    official = load_embedding_file(back)
    assert official.tokens == {"@": 287} and torch.equal(official.vectors["@"], vec)


def test_convert_errors_are_clear(tmp_path, capsys):
    two = tmp_path / "two.pt"
    save_embedding_file(two, {"*": _vec(1), "@": _vec(1, 1)}, tokens={"*": 265, "@": 287})
    assert _convert("--input", two, "--output", tmp_path / "x.pt", "--to", "a1111") == 1
    assert "one concept per file" in capsys.readouterr().err
    assert _convert("--input", two, "--output", tmp_path / "x.pt", "--to", "official", "--name", "z") == 1
    assert "renames a single concept" in capsys.readouterr().err
    diffusers = tmp_path / "learned_embeds.bin"
    save_embedding_file(diffusers, {"<cat-toy>": _vec(1)}, fmt="diffusers")
    assert _convert("--input", diffusers, "--output", tmp_path / "x.pt", "--to", "official") == 1
    assert "'<cat-toy>' is not a single clip token" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_file_name_is_the_word_users_type(tmp_path):
    """AUTOMATIC1111 names .pt/.safetensors embeddings by file name; merge tools store one name for all."""
    renamed = tmp_path / "badhandv4.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": _vec(2)}, "name": "badhandv3", "step": 9,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, renamed)
    merged = tmp_path / "my-merge.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": _vec(1)}, "name": "_EmbeddingMerge_temp",
                "step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}, merged)
    kohya = tmp_path / "EasyNegative.safetensors"
    safetensors.torch.save_file({"emb_params": _vec(3)}, str(kohya), metadata={"name": "easy_negative"})
    assert list(load_embedding_file(renamed).vectors) == ["badhandv4"]
    assert load_embedding_file(renamed).name == "badhandv3"  # kept, for the record
    assert list(load_embedding_file(merged).vectors) == ["my-merge"]
    assert list(load_embedding_file(kohya).vectors) == ["EasyNegative"]


@pytest.mark.parametrize("widths,family", [
    ((768,), "SD v1 (CLIP ViT-L, 768)"), ((1024,), "SD 2.x (OpenCLIP ViT-H, 1024)"),
    ((1280,), "LDM-1.4B (BERT, 1280)"), ((768, 1280), "SDXL (clip_l 768 + clip_g 1280)"),
    ((4096,), "an unknown family (4096 wide)"),
])
def test_family_from_widths(tmp_path, widths, family):
    from ldm.modules.embedding_io import describe_widths
    assert describe_widths(widths) == family
    if len(widths) == 1:
        path = save_embedding_file(tmp_path / "e.pt", {"*": torch.zeros(2, widths[0])}, tokens={"*": 265})
        assert load_embedding_file(path).family == family


def test_private_two_width_layout_is_not_two_diffusers_concepts(tmp_path):
    path = tmp_path / "private.safetensors"
    safetensors.torch.save_file({"emb": torch.zeros(1, 768), "emb2": torch.zeros(1, 1280)}, str(path))
    with pytest.raises(EmbeddingFamilyError, match=r"private.safetensors holds vectors of different widths "
                                                   r"\(emb: 768, emb2: 1280\).*an SDXL embedding keeps its two "
                                                   r"encoders. vectors under clip_l and clip_g"):
        load_embedding_file(path)


@pytest.mark.parametrize("width,argv,message", [
    (1024, ["--model_family", "sd-v1"],
     r"sd2.pt is SD 2.x \(OpenCLIP ViT-H, 1024\); --model_family sd-v1 is SD v1 \(CLIP ViT-L, 768\)"),
    (4096, ["--model_family", "sd-v1"], r"an unknown family \(4096 wide\); --model_family sd-v1 is SD v1"),
    (1280, ["--tokenizer", "clip"], r"is LDM-1.4B \(BERT, 1280\), whose placeholders are bert tokens; the clip"),
])
def test_convert_refuses_another_family(tmp_path, capsys, width, argv, message):
    import re
    source = tmp_path / "sd2.pt"
    save_embedding_file(source, {"*": torch.zeros(1, width)}, tokens={"*": 265})
    assert _convert("--input", source, "--output", tmp_path / "x.pt", "--to", "official", *argv) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.pt").exists()


def test_convert_reports_the_family_and_writes_a1111_png(tmp_path, capsys):
    source = tmp_path / "embeddings.pt"
    save_embedding_file(source, {"*": _vec(2).repeat(1, 96)}, tokens={"*": 265}, name="tri", step=40)
    out = tmp_path / "tri.png"
    assert _convert("--input", source, "--output", out, "--to", "a1111-png", "--model_family", "sd-v1") == 0
    assert "(official, SD v1 (CLIP ViT-L, 768)) ->" in capsys.readouterr().out
    png = load_embedding_file(out)
    assert png.format == "a1111-png" and torch.equal(png.vectors["tri"], _vec(2).repeat(1, 96))
    sdxl = tmp_path / "xl.safetensors"
    safetensors.torch.save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(sdxl))
    assert _convert("--input", sdxl, "--output", tmp_path / "y.pt", "--to", "a1111") == 1
    assert "The a1111 format has no SDXL layout; save " in capsys.readouterr().err
    assert _convert("--input", sdxl, "--output", tmp_path / "y.pt", "--to", "official", "--model_family",
                    "sd-v1") == 1
    assert ("xl.safetensors is SDXL (clip_l 768 + clip_g 1280); --model_family sd-v1 is SD v1 (CLIP ViT-L, 768)"
            in capsys.readouterr().err)
    assert not (tmp_path / "y.pt").exists()


def test_load_embeddings_gives_one_clear_error(tmp_path):
    import types
    from PIL import Image, PngImagePlugin
    from ldm.models.diffusion.textual_inversion import EmbeddingLoadError, load_embeddings
    with pytest.raises(EmbeddingLoadError, match="cfg.yaml has no personalization_config"):
        load_embeddings(types.SimpleNamespace(), [tmp_path / "e.pt"], config="cfg.yaml")
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", "garbage!")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "broken.png", pnginfo=info)

    from ldm.modules.embedding_manager import EmbeddingManager
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder
    clip = FrozenCLIPEmbedder(config=dict(hidden_size=D, intermediate_size=16, num_hidden_layers=1,
                                          num_attention_heads=2))
    model = types.SimpleNamespace(embedding_manager=EmbeddingManager(clip, ["*"]))  # what the scripts' models carry
    with pytest.raises(EmbeddingLoadError, match="Could not load embeddings from .*broken.png: .*not base64"):
        load_embeddings(model, [tmp_path / "broken.png"])
    sd2 = save_embedding_file(tmp_path / "sd2.pt", {"*": torch.zeros(1, 1024)}, tokens={"*": 265})
    with pytest.raises(EmbeddingLoadError, match=r"sd2.pt is SD 2.x .*; this model is an unknown family \(8 wide\)"):
        load_embeddings(model, sd2)
    load_embeddings(model, save_embedding_file(tmp_path / "ok.pt", {"*": _vec(3)}, tokens={"*": 265}))
    assert torch.equal(model.embedding_manager.string_to_param_dict["*"].detach(), _vec(3))


def test_file_without_vectors_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.pt"
    torch.save({"string_to_token": {}, "string_to_param": {}}, path)
    with pytest.raises(ValueError, match="empty.pt: the embedding file holds no vectors"):
        load_embedding_file(path)
