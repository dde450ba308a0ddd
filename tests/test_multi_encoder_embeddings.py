"""Embeddings keyed per text encoder (SDXL) and the files of SD 2.x and SDXL, in and out, in every format."""
import os
import warnings

import pytest
import safetensors.torch
import torch

from ldm.models.diffusion.textual_inversion import load_embeddings
from ldm.modules.embedding_io import EmbeddingFamilyError, load_embedding_file, save_embedding_file
from ldm.modules.embedding_manager import EmbeddingManager, MultiEmbeddingManager
from ldm.modules.encoders.clip_hidden import FrozenCLIPEmbedderHidden
from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, FrozenOpenCLIPEmbedder2

STAR, SKS = 265, 48136
TINY_CLIP = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)
TINY_G = dict(width=40, layers=2, heads=4, embed_dim=16)  # widths 24 / 40 differ, so a swapped key shows


def _vec(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sdxl_encoders():
    torch.manual_seed(0)
    return [FrozenCLIPEmbedderHidden(config=TINY_CLIP, layer_idx=1),
            FrozenOpenCLIPEmbedder2(layer="penultimate", always_return_pooled=True, legacy=False, config=TINY_G)]


@pytest.fixture(scope="module")
def sd2_encoder():
    torch.manual_seed(0)
    return FrozenOpenCLIPEmbedder(layer="penultimate", config=dict(width=1024, layers=1, heads=8))


# ---------------------------------------------------------------- the manager, per encoder

def test_each_encoder_gets_its_own_vectors_from_its_own_table(sdxl_encoders):
    manager = MultiEmbeddingManager(sdxl_encoders, ["*", "sks"], ["dog", "cat"], num_vectors_per_token=2)
    assert manager.widths == (24, 40)
    for encoder, key in zip(sdxl_encoders, ("clip_l", "clip_g")):
        sub = manager.manager_for(encoder)
        assert sub is manager.managers[key] and sub.string_to_token_dict["*"] == STAR
        dog = encoder.token_embedding.weight[encoder.string_to_token_ids("dog")[0]]
        assert torch.equal(sub.string_to_param_dict["*"][0], dog) and torch.equal(sub.initial_embeddings["*"][1], dog)
    assert sorted(name for name, p in manager.named_parameters() if p.requires_grad) == [
        f"managers.{key}.string_to_param_dict.{s}" for key in ("clip_g", "clip_l") for s in ("*", "sks")]
    assert len(list(manager.embedding_parameters())) == 4
    assert manager.embedding_to_coarse_loss() == 0
    with torch.no_grad():
        manager.managers["clip_g"].string_to_param_dict["*"].add_(1.0)
    # The sum of the encoders' regularisers: clip_g's "*" moved by 1 in 2 x 40 entries, averaged over 2 concepts.
    assert manager.embedding_to_coarse_loss().item() == pytest.approx(2 * 40 / 2)
    manager.progressive_step = 4000
    assert all(m.progressive_step == 4000 for m in manager.managers.values())


def test_the_multi_manager_follows_the_protocol_and_hands_each_encoder_its_own_manager(sdxl_encoders):
    from ldm.modules.encoders.base import EmbeddingManagerProtocol
    manager = MultiEmbeddingManager(sdxl_encoders, ["*"], ["dog"])
    assert isinstance(manager, EmbeddingManagerProtocol) and not manager.per_layer
    assert [manager.manager_for(e) for e in sdxl_encoders] == list(manager.managers.values())
    assert manager.concepts == ["*"] and manager.interchange_format() == "a1111-safetensors"
    tokens = sdxl_encoders[0].tokenize(["a photo of *"])
    assert torch.equal(manager.encode_tokens(sdxl_encoders[0], tokens),
                       sdxl_encoders[0].encode_tokens(tokens, embedding_manager=manager.managers["clip_l"]))
    assert MultiEmbeddingManager(sdxl_encoders, ["*", "sks"], ["dog", "cat"]).interchange_format() is None


def test_a_placeholder_merged_with_punctuation_is_reported_once_for_both_encoders(sdxl_encoders):
    manager = MultiEmbeddingManager(sdxl_encoders, ["*"], ["dog"])
    assert manager.names_lost_in("a photo of *, at night") == ["*"]
    assert manager.names_lost_in("a photo of * , at night") == []


def test_multi_manager_refuses_encoders_without_keys(sdxl_encoders, sd2_encoder):
    with pytest.raises(ValueError, match=r"embedding keys are clip_g, clip_l; .* clip_l, clip_g, in that order"):
        MultiEmbeddingManager(sdxl_encoders[::-1])
    with pytest.raises(ValueError, match=r"embedding keys are None, clip_g; .* uses EmbeddingManager"):
        MultiEmbeddingManager([sd2_encoder, sdxl_encoders[1]])


def test_openclip_zero_padding_is_never_taken_for_a_placeholder(sdxl_encoders):
    """OpenCLIP pads with id 0, the BPE's "!" without end of word: no one-token string is 0 ("!" alone is 256),
    and a concept whose tokens start with 0 ("!%") matches only where the prompt writes it."""
    g = sdxl_encoders[1]
    assert g.string_to_token_ids("!") == [256] and g.string_to_token_ids("!%") == [0, 260]
    manager = EmbeddingManager(g, ["*"], ["dog"])
    manager.add_concepts([("file", "!%", _vec(2, 40))])
    tokens = g.tokenize(["a photo of *", "a photo", "a !% photo"])
    assert tokens[:, -1].eq(0).all()
    embedded = g.token_embedding(tokens)
    changed = (manager(tokens, embedded) != embedded).any(-1)
    assert changed[0].nonzero().flatten().tolist() == [4] and not changed[1].any()
    assert changed[2].nonzero().flatten().tolist() == [2, 3]  # the two tokens of "!%" become its two vectors


def test_spliced_token_ids_follow_the_vectors(sdxl_encoders):
    g = sdxl_encoders[1]
    manager = EmbeddingManager(g, ["*"], num_vectors_per_token=3)
    tokens = g.tokenize(["a * b", "a b"])
    ids = manager.spliced_token_ids(tokens)
    a, b = g.string_to_token_ids("a b")
    assert ids[0, :8].tolist() == [49406, a, STAR, STAR, STAR, b, 49407, 0]
    assert torch.equal(ids[1], tokens[1]) and ids.argmax(-1).tolist() == [6, 3]
    manager.progressive_words, manager.progressive_step = True, 0  # one active vector: nothing moves
    assert torch.equal(manager.spliced_token_ids(tokens), tokens)


# ---------------------------------------------------------------- SDXL files: every format, in and out

SDXL_FORMATS = [("official", "embeddings.pt"), ("a1111-safetensors", "tri.safetensors"),
                ("kohya", "tri.safetensors"), ("kohya", "tri.pt"), ("a1111-png", "tri.png")]


@pytest.mark.parametrize("fmt,filename", SDXL_FORMATS)
def test_sdxl_round_trip_every_format(tmp_path, fmt, filename):
    vectors = {"clip_l": {"tri": _vec(2, 768)}, "clip_g": {"tri": _vec(2, 1280, 1)}}
    path = save_embedding_file(tmp_path / filename, vectors, tokens={"tri": 12345}, name="tri", step=30, fmt=fmt)
    emb = load_embedding_file(path, target_widths=(768, 1280))
    assert emb.format == fmt and emb.multi_encoder and emb.widths == (768, 1280)
    assert emb.family == "SDXL (clip_l 768 + clip_g 1280)" and emb.concepts == ["tri"]
    for key in ("clip_l", "clip_g"):
        assert torch.equal(emb.by_encoder[key]["tri"], vectors[key]["tri"])
    if fmt == "official":
        assert emb.tokens == {"tri": 12345} and emb.step == 30
    elif filename.endswith(".safetensors"):  # what AUTOMATIC1111, kohya and diffusers read: exactly two tensors
        assert set(safetensors.torch.load_file(path)) == {"clip_l", "clip_g"} and emb.step == 30
    with pytest.raises(ValueError, match="holds one vector set per text encoder"):
        emb.vectors


def test_sdxl_official_holds_several_concepts_and_refuses_formats_without_an_sdxl_layout(tmp_path):
    vectors = {"clip_l": {"*": _vec(1, 768), "@": _vec(3, 768, 1)}, "clip_g": {"*": _vec(1, 1280), "@": _vec(3, 1280)}}
    path = save_embedding_file(tmp_path / "e.pt", vectors, tokens={"*": STAR, "@": 287}, fmt="official")
    raw = torch.load(path, weights_only=True)  # plain tensors only
    assert set(raw["string_to_param"]) == {"clip_l", "clip_g"} and raw["string_to_token"]["@"] == 287
    assert load_embedding_file(path).concepts == ["*", "@"]
    for fmt, name in (("a1111", "x.pt"), ("diffusers", "x.safetensors")):
        with pytest.raises(ValueError, match=f"The {fmt} format has no SDXL layout; save .*x"):
            save_embedding_file(tmp_path / name, {k: {"*": v["*"]} for k, v in vectors.items()}, fmt=fmt)
        assert not (tmp_path / name).exists()
    with pytest.raises(ValueError, match="the text encoders' vector sets differ"):
        save_embedding_file(tmp_path / "bad.pt", {"clip_l": {"*": _vec(1, 768)}, "clip_g": {"*": _vec(2, 1280)}},
                            tokens={"*": STAR})


def test_sdxl_manager_save_load_and_family_refusals(tmp_path, sdxl_encoders):
    manager = MultiEmbeddingManager(sdxl_encoders, ["*"], ["dog"], num_vectors_per_token=2)
    official = manager.save(tmp_path / "embeddings_gs-5.pt", step=5)
    a1111 = manager.save(tmp_path / "tri.safetensors", fmt="a1111-safetensors")
    for path, string in ((official, "*"), (a1111, "tri")):
        fresh = MultiEmbeddingManager(sdxl_encoders, ["sks"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert fresh.load(path) == [(string, path, 2)]
        # "tri" (the file name) is an ordinary word: said once, not once per encoder.
        assert len([w for w in caught if "ordinary word" in str(w.message)]) == (string == "tri")
        for key in ("clip_l", "clip_g"):
            assert torch.equal(fresh.managers[key].string_to_param_dict[string],
                               manager.managers[key].string_to_param_dict["*"])
    # A one-encoder file is another family; so is an SDXL file for a one-encoder model. Both named.
    sd1 = save_embedding_file(tmp_path / "sd1.pt", {"*": _vec(1, 768)}, tokens={"*": STAR})
    with pytest.raises(EmbeddingFamilyError, match=r"sd1.pt is SD v1 \(CLIP ViT-L, 768\); this model is an "
                                                   r"unknown family \(24 \+ 40 wide\)"):
        manager.load(sd1)
    with pytest.raises(EmbeddingFamilyError, match=r"embeddings_gs-5.pt is an unknown family \(24 \+ 40 wide\); "
                                                   r"this model is an unknown family \(24 wide\)"):
        EmbeddingManager(sdxl_encoders[0]).load(official)


def test_embedding_path_refuses_an_sdxl_file_for_sd_v1_naming_both(tmp_path):
    torch.manual_seed(0)
    clip = FrozenCLIPEmbedder(config=dict(TINY_CLIP, hidden_size=768, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=1))
    model = torch.nn.Module()
    model.embedding_manager = EmbeddingManager(clip)
    xl = save_embedding_file(tmp_path / "xl.safetensors",
                             {"clip_l": {"x": _vec(1, 768)}, "clip_g": {"x": _vec(1, 1280)}}, fmt="kohya")
    with pytest.raises(ValueError, match=r"xl.safetensors is SDXL \(clip_l 768 \+ clip_g 1280\); this model is SD v1 "
                                         r"\(CLIP ViT-L, 768\)"):
        load_embeddings(model, [xl])


# ---------------------------------------------------------------- SD 2.x files: width 1024, every format

SD2_FORMATS = [("official", "embeddings.pt"), ("a1111", "tri.pt"), ("a1111-safetensors", "tri.safetensors"),
               ("a1111-png", "tri.png"), ("diffusers", "learned_embeds.safetensors"), ("kohya", "tri.safetensors")]


@pytest.mark.parametrize("fmt,filename", SD2_FORMATS)
def test_sd2_round_trip_every_format_and_use_in_an_sd2_model(tmp_path, fmt, filename, sd2_encoder):
    vec = _vec(2, 1024)
    word = "<tri>" if fmt == "diffusers" else "*"
    path = save_embedding_file(tmp_path / filename, {word: vec}, tokens={"*": STAR}, name="tri", step=3, fmt=fmt)
    emb = load_embedding_file(path, target_widths=(1024,))
    assert emb.format == fmt and emb.family == "SD 2.x (OpenCLIP ViT-H, 1024)"
    assert torch.equal(next(iter(emb.vectors.values())), vec)
    manager = EmbeddingManager(sd2_encoder)
    (string, _, count), = manager.load(path, placeholder_strings=["sks"])
    assert (string, count) == ("sks", 2) and torch.equal(manager.string_to_param_dict["sks"], vec)
    with pytest.raises(EmbeddingFamilyError, match=r"is SD 2.x \(OpenCLIP ViT-H, 1024\); this model is SD v1 "):
        load_embedding_file(path, target_widths=(768,))


@pytest.mark.parametrize("fmt,filename", [("diffusers", "learned_embeds.safetensors"), ("a1111", "tri.pt")])
def test_sd2_file_read_by_diffusers_own_loader(tmp_path, fmt, filename):
    """diffusers' textual-inversion loader derives the same 1024-wide vectors from our SD 2.x file."""
    textual_inversion = pytest.importorskip("diffusers.loaders.textual_inversion")
    from ldm.modules.encoders.clip_tokenizer import load_clip_tokenizer
    vec = _vec(2, 1024, 7)
    path = save_embedding_file(tmp_path / filename, {"<tri>": vec}, name="<tri>", fmt=fmt)
    tokenizer = load_clip_tokenizer()
    mixin = textual_inversion.TextualInversionLoaderMixin
    state_dicts = textual_inversion.load_textual_inversion_state_dicts([str(path)])
    tokens, embeddings = mixin._retrieve_tokens_and_embeddings([None], state_dicts, tokenizer)
    tokens, embeddings = mixin._extend_tokens_and_embeddings(tokens, embeddings, tokenizer)
    assert tokens == ["<tri>", "<tri>_1"] and torch.equal(torch.stack(list(embeddings)), vec)


# ---------------------------------------------------------------- the command-line tools

def _script(name, *argv):
    import importlib.util
    root = os.path.join(os.path.dirname(__file__), "..")
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, *name.split("/")) + ".py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in argv])


def test_convert_sdxl_between_formats_and_refuse_another_family(tmp_path, capsys):
    source = save_embedding_file(tmp_path / "tri.safetensors",
                                 {"clip_l": {"tri": _vec(2, 768)}, "clip_g": {"tri": _vec(2, 1280)}},
                                 fmt="a1111-safetensors")
    official = tmp_path / "embeddings.pt"
    assert _script("scripts/convert_embedding", "--input", source, "--output", official, "--to", "official",
                   "--name", "*", "--model_family", "sdxl") == 0
    assert "(a1111-safetensors, SDXL (clip_l 768 + clip_g 1280)) ->" in capsys.readouterr().out
    emb = load_embedding_file(official)
    assert emb.tokens == {"*": STAR} and torch.equal(emb.by_encoder["clip_g"]["*"], _vec(2, 1280))
    png = tmp_path / "tri.png"
    assert _script("scripts/convert_embedding", "--input", official, "--output", png, "--to", "a1111-png") == 0
    assert torch.equal(load_embedding_file(png).by_encoder["clip_l"]["tri"], _vec(2, 768))
    assert _script("scripts/convert_embedding", "--input", source, "--output", tmp_path / "x.pt", "--to", "official",
                   "--name", "*", "--model_family", "sd-2") == 1
    assert ("tri.safetensors is SDXL (clip_l 768 + clip_g 1280); --model_family sd-2 is SD 2.x (OpenCLIP ViT-H, "
            "1024)") in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_merge_sdxl_files_and_refuse_another_family(tmp_path, capsys):
    a = save_embedding_file(tmp_path / "a.pt", {"clip_l": {"*": _vec(1, 768)}, "clip_g": {"*": _vec(1, 1280)}},
                            tokens={"*": STAR})
    b = save_embedding_file(tmp_path / "sks.safetensors", {"clip_l": {"x": _vec(2, 768, 1)},
                                                           "clip_g": {"x": _vec(2, 1280, 1)}}, fmt="kohya")
    out = tmp_path / "merged.pt"
    assert _script("merge_embeddings", "--manager_ckpts", a, b, "--output_path", out, "-sd") == 0
    assert "(SDXL (clip_l 768 + clip_g 1280))" in capsys.readouterr().out
    merged = load_embedding_file(out)
    assert merged.tokens == {"*": STAR, "sks": SKS}
    assert torch.equal(merged.by_encoder["clip_g"]["sks"], _vec(2, 1280, 1))
    sd2 = save_embedding_file(tmp_path / "sd2.pt", {"@": _vec(1, 1024)}, tokens={"@": 287})
    assert _script("merge_embeddings", "--manager_ckpts", a, sd2, "--output_path", tmp_path / "m2.pt", "-sd") == 1
    assert ("sd2.pt is SD 2.x (OpenCLIP ViT-H, 1024); the first file" in capsys.readouterr().err
            and not (tmp_path / "m2.pt").exists())
    sd2b = save_embedding_file(tmp_path / "sd2b.pt", {"#": _vec(1, 1024)}, tokens={"#": 258})
    assert _script("merge_embeddings", "--manager_ckpts", sd2, sd2b, "--output_path", tmp_path / "m3.pt", "-sd") == 0
    assert load_embedding_file(tmp_path / "m3.pt").family == "SD 2.x (OpenCLIP ViT-H, 1024)"


def test_embedding_path_accepts_the_files_of_the_model_family(tmp_path, sdxl_encoders, sd2_encoder, capsys):
    """--embedding_path (load_embeddings) with an SDXL-style and an SD 2.x model."""
    xl_model, sd2_model = torch.nn.Module(), torch.nn.Module()
    xl_model.embedding_manager = MultiEmbeddingManager(sdxl_encoders)
    sd2_model.embedding_manager = EmbeddingManager(sd2_encoder)
    xl = save_embedding_file(tmp_path / "my-style.safetensors",
                             {"clip_l": {"x": _vec(3, 24)}, "clip_g": {"x": _vec(3, 40)}}, fmt="a1111-safetensors")
    sd2 = save_embedding_file(tmp_path / "sd2.pt", {"sks": _vec(1, 1024)}, tokens={"sks": SKS})
    assert load_embeddings(xl_model, [xl]) == [("my-style", xl, 3)]
    assert load_embeddings(sd2_model, [sd2], placeholder_strings=["*"]) == [("*", sd2, 1)]
    assert "Embedding 'my-style' (3 vectors) from" in capsys.readouterr().out
    assert torch.equal(xl_model.embedding_manager.managers["clip_g"].string_to_param_dict["my-style"], _vec(3, 40))
    with pytest.raises(ValueError, match=r"sd2.pt is SD 2.x \(OpenCLIP ViT-H, 1024\); this model is an unknown "
                                         r"family \(24 \+ 40 wide\)"):
        load_embeddings(xl_model, [sd2])
