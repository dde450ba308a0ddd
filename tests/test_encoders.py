"""Text encoders: offline construction, patched forwards, official checkpoint layout, LDM's BERT encoder."""
import copy
import socket

import pytest
import torch
import transformers
from torch import nn

from ldm.modules.encoders.modules import BERTEmbedder, BERTTokenizer, ClassEmbedder, FrozenCLIPEmbedder
from ldm.modules.x_transformer import Encoder, TransformerWrapper

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def tiny_clip(**overrides):
    return FrozenCLIPEmbedder(config={**TINY, **overrides})


def unpatched_copy(clip_text_model):
    """A copy running the library's own forwards."""
    ref = copy.deepcopy(clip_text_model)
    for module in ref.modules():
        module.__dict__.pop("forward", None)
    return ref


def library_hidden_states(clip_text_model, tokens):
    return unpatched_copy(clip_text_model)(input_ids=tokens).last_hidden_state


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return tiny_clip()


def check_vit_l14(embedder):
    assert sum(p.numel() for p in embedder.parameters()) == 123_060_480
    keys = list(embedder.state_dict())
    assert keys and all(k.startswith("transformer.text_model.") for k in keys)
    assert "transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "transformer.text_model.encoder.layers.11.mlp.fc2.bias" in keys
    assert "transformer.text_model.final_layer_norm.weight" in keys


def test_vit_l14_text_encoder_on_meta_device():
    with torch.device("meta"):
        embedder = FrozenCLIPEmbedder()
    check_vit_l14(embedder)
    config = embedder.transformer.config
    assert (config.hidden_act, config.max_position_embeddings, config.vocab_size) == ("quick_gelu", 77, 49408)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (49406, 49407, 49407)


@pytest.mark.skipif(TRANSFORMERS_MAJOR != 4, reason="checks the transformers 4.x layout (text_model nesting)")
def test_vit_l14_text_encoder_on_meta_device_transformers_4():
    with torch.device("meta"):
        embedder = FrozenCLIPEmbedder()
    assert hasattr(embedder.transformer, "text_model")
    check_vit_l14(embedder)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_patched_forward_equals_library_forward(attn):
    torch.manual_seed(0)
    embedder = tiny_clip(attn_implementation=attn)
    tokens = embedder.tokenize(["a photo of *", "a much longer caption of a red square on black"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    ours = embedder.encode_tokens(tokens)
    assert ours.shape == (2, 77, 32)
    torch.testing.assert_close(ours, library_hidden_states(embedder.transformer, tokens))
    torch.testing.assert_close(embedder(["a photo of *", "a much longer caption of a red square on black"]), ours)
    torch.testing.assert_close(embedder.encode("a photo of *"), ours[:1])


def test_encoder_is_causal(clip):
    a, b = clip.tokenize(["a photo of a dog", "a photo of a cat"])
    out = clip.encode_tokens(torch.stack([a, b]))
    # positions before the first differing token cannot see it
    torch.testing.assert_close(out[0, :4], out[1, :4])
    assert not torch.allclose(out[0, 5], out[1, 5])


def test_state_dict_round_trip(clip):
    torch.manual_seed(1)
    fresh = tiny_clip()
    tokens = clip.tokenize(["a photo of *"])
    assert not torch.allclose(fresh.encode_tokens(tokens), clip.encode_tokens(tokens))
    fresh.load_state_dict(clip.state_dict(), strict=True)
    torch.testing.assert_close(fresh.encode_tokens(tokens), clip.encode_tokens(tokens), rtol=0, atol=0)


def test_sd_style_state_dict_with_position_ids_loads(clip):
    """An SD checkpoint nests the encoder under cond_stage_model and may persist embeddings.position_ids."""
    holder = nn.Module()
    holder.cond_stage_model = tiny_clip()
    sd = {f"cond_stage_model.{k}": v for k, v in clip.state_dict().items()}
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    result = holder.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in holder.state_dict())
    tokens = clip.tokenize(["a photo of *"])
    torch.testing.assert_close(holder.cond_stage_model.encode_tokens(tokens), clip.encode_tokens(tokens))


def test_local_directory_version(clip, tmp_path):
    unpatched_copy(clip.transformer).save_pretrained(tmp_path / "text_encoder")
    clip.tokenizer.save_pretrained(tmp_path / "tokenizer")
    local = FrozenCLIPEmbedder(version=str(tmp_path))
    tokens = clip.tokenize(["a photo of *"])
    torch.testing.assert_close(local.encode_tokens(tokens), clip.encode_tokens(tokens))


def test_hub_names_are_refused():
    with pytest.raises(ValueError, match="not supported.*local directory"):
        FrozenCLIPEmbedder(version="openai/clip-vit-base-patch32")


def test_frozen_by_default(clip):
    assert not clip.transformer.training
    assert not any(p.requires_grad for p in clip.parameters())
    assert any(p.requires_grad for p in FrozenCLIPEmbedder(config=TINY, freeze=False).parameters())


def test_no_network_needed(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")
    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    embedder = tiny_clip()
    assert embedder.tokenize("a photo of *")[0, :6].tolist() == [49406, 320, 1125, 539, 265, 49407]


def test_class_embedder():
    embedder = ClassEmbedder(embed_dim=8, n_classes=10)
    out = embedder({"class": torch.tensor([1, 7])})
    assert out.shape == (2, 1, 8)
    torch.testing.assert_close(out[:, 0], embedder.embedding.weight[[1, 7]])


def test_bert_tokenizer_ids():
    tokens = BERTTokenizer(vq_interface=False)(["A photo of *"])
    assert tokens.shape == (1, 77)
    assert tokens[0, :7].tolist() == [101, 1037, 6302, 1997, 1008, 102, 0]


def test_x_transformer_uses_ldm_key_names():
    wrapper = TransformerWrapper(num_tokens=100, max_seq_len=77, attn_layers=Encoder(dim=16, depth=2))
    keys = set(wrapper.state_dict())
    expected = {
        "token_emb.weight", "pos_emb.emb.weight", "norm.weight", "norm.bias", "to_logits.weight",
        "attn_layers.layers.0.0.weight", "attn_layers.layers.0.1.to_q.weight", "attn_layers.layers.0.1.to_k.weight",
        "attn_layers.layers.0.1.to_v.weight", "attn_layers.layers.0.1.to_out.weight",
        "attn_layers.layers.0.1.to_out.bias", "attn_layers.layers.1.0.bias", "attn_layers.layers.1.1.net.0.0.weight",
        "attn_layers.layers.1.1.net.2.weight", "attn_layers.layers.3.1.net.2.bias",
    }
    assert expected <= keys
    assert not any(k.startswith("attn_layers.layers.4.") for k in keys)
    assert wrapper.state_dict()["attn_layers.layers.0.1.to_q.weight"].shape == (512, 16)  # 8 heads x 64


def test_x_transformer_attention_is_bidirectional():
    torch.manual_seed(0)
    wrapper = TransformerWrapper(num_tokens=100, max_seq_len=8, attn_layers=Encoder(dim=16, depth=1, heads=2))
    a = wrapper(torch.tensor([[1, 2, 3, 4]]), return_embeddings=True)
    b = wrapper(torch.tensor([[1, 2, 3, 5]]), return_embeddings=True)
    assert a.shape == (1, 4, 16)
    assert not torch.allclose(a[0, 0], b[0, 0])  # the first token sees the last
    assert wrapper(torch.tensor([[1, 2]])).shape == (1, 2, 100)


def test_bert_embedder():
    torch.manual_seed(0)
    embedder = BERTEmbedder(n_embed=32, n_layer=2)
    out = embedder(["a photo of *", "a red square"])
    assert out.shape == (2, 77, 32)
    torch.testing.assert_close(embedder.encode_tokens(embedder.tokenize(["a red square"])), out[1:])
    assert embedder.string_to_token_ids("*") == [1008]
    assert embedder.embedding_dim == 32


def test_train_blends_embed_a_marker_as_its_words_mean_in_training_only():
    """The toy v2 base model's stage 3: a marker points between words while training; afterwards it names nothing."""
    torch.manual_seed(0)
    clip = FrozenCLIPEmbedder(config=TINY, freeze=False, train_blends={"&": ["red", "cyan"]})
    weight = clip.token_embedding.weight
    red, cyan = clip.string_to_token_ids("red"), clip.string_to_token_ids("cyan")
    assert len(cyan) == 2  # a word of several tokens counts as their mean
    blend = (weight[red].mean(0) + weight[cyan].mean(0)) / 2
    tokens = clip.tokenize(["a & circle", "a red circle"])
    seen = {}
    clip.text_model.embeddings.register_forward_hook(lambda m, i, o: seen.update(out=o))
    clip.train()
    clip.encode_tokens(tokens).sum().backward()
    position = clip.text_model.embeddings.position_embedding.weight[2]
    torch.testing.assert_close(seen["out"][0, 2], blend + position)
    assert weight.grad[red].abs().sum() > 0 and weight.grad[cyan].abs().sum() > 0
    assert weight.grad[clip.string_to_token_ids("&")].abs().sum() == 0
    clip.eval()
    with torch.no_grad():
        clip.encode_tokens(tokens)
    torch.testing.assert_close(seen["out"][0, 2], weight[clip.string_to_token_ids("&")[0]] + position)


def test_train_blends_refuse_a_marker_of_several_tokens_or_no_words():
    with pytest.raises(ValueError, match="marker 'orange-ish'.*exactly one"):
        FrozenCLIPEmbedder(config=TINY, train_blends={"orange-ish": ["red", "yellow"]})
    with pytest.raises(ValueError, match=r"train_blends\['&'\].*list of words"):
        FrozenCLIPEmbedder(config=TINY, train_blends={"&": "red"})
