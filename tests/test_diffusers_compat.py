"""Files we export are accepted by diffusers' own textual-inversion loader, offline.

These call diffusers' code (diffusers.loaders.textual_inversion), not a restatement of its rules: the file is
read by load_textual_inversion_state_dicts, turned into tokens and vectors by TextualInversionLoaderMixin, and
finally loaded into a CLIP text encoder and tokenizer by load_textual_inversion itself.
"""
import copy

import pytest
import torch

from ldm.modules.embedding_io import save_embedding_file
from ldm.modules.embedding_manager import EmbeddingManager
from ldm.modules.encoders.clip_tokenizer import load_clip_tokenizer
from ldm.modules.encoders.modules import FrozenCLIPEmbedder

textual_inversion = pytest.importorskip("diffusers.loaders.textual_inversion")
TextualInversionLoaderMixin = textual_inversion.TextualInversionLoaderMixin

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
D = TINY["hidden_size"]


def _vectors(n, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def diffusers_reads(path, token=None):
    """(tokens, one vector per token) exactly as diffusers' loader derives them from the file at `path`."""
    tokenizer = load_clip_tokenizer()
    state_dicts = textual_inversion.load_textual_inversion_state_dicts([str(path)])
    tokens, embeddings = TextualInversionLoaderMixin._retrieve_tokens_and_embeddings([token], state_dicts, tokenizer)
    return TextualInversionLoaderMixin._extend_tokens_and_embeddings(tokens, embeddings, tokenizer)


# (format, file name, concept name we save, token= passed to diffusers or None)
EXPORTS = [
    ("diffusers", "learned_embeds.safetensors", "<magenta-tri>", None),
    ("diffusers", "learned_embeds.bin", "<magenta-tri>", None),
    ("a1111", "magenta-tri.pt", "magenta-tri", None),
    # kohya files carry no name: diffusers reads their single key "emb_params" as the token unless told
    ("kohya", "magenta-tri.safetensors", "magenta-tri", "<magenta-tri>"),
    ("kohya", "magenta-tri.pt", "magenta-tri", "<magenta-tri>"),
    # what main.py writes beside embeddings.pt (embeddings.safetensors)
    ("a1111-safetensors", "magenta-tri.safetensors", "magenta-tri", "<magenta-tri>"),
]


@pytest.mark.parametrize("n_vectors", [1, 3])
@pytest.mark.parametrize("fmt,filename,name,token", EXPORTS)
def test_diffusers_reads_the_tokens_and_vectors_we_saved(tmp_path, fmt, filename, name, token, n_vectors):
    vectors = _vectors(n_vectors)
    path = save_embedding_file(tmp_path / filename, {name: vectors}, name=name, step=50, fmt=fmt)
    tokens, embeddings = diffusers_reads(path, token)
    expected = token or name
    assert tokens == [expected] + [f"{expected}_{i}" for i in range(1, n_vectors)]
    assert len(embeddings) == n_vectors
    for got, want in zip(embeddings, vectors):
        assert torch.equal(got, want)


def test_diffusers_finds_our_file_in_a_directory_by_its_standard_name(tmp_path):
    vectors = _vectors(2, seed=1)
    save_embedding_file(tmp_path / "learned_embeds.safetensors", {"<tri>": vectors}, fmt="diffusers")
    tokens, embeddings = diffusers_reads(tmp_path)
    assert tokens == ["<tri>", "<tri>_1"]
    assert torch.equal(torch.stack(embeddings), vectors)


def test_placeholder_already_in_the_vocabulary_needs_a_token_for_diffusers(tmp_path):
    # "*", the original's placeholder, is a CLIP word: diffusers refuses it as a new token, as users meet it.
    path = save_embedding_file(tmp_path / "learned_embeds.safetensors", {"*": _vectors(1)}, fmt="diffusers")
    with pytest.raises(ValueError, match="already in tokenizer vocabulary"):
        diffusers_reads(path)
    tokens, embeddings = diffusers_reads(path, token="<star>")
    assert tokens == ["<star>"] and torch.equal(embeddings[0], _vectors(1)[0])


class TextEncoderHost(TextualInversionLoaderMixin):
    """The two components TextualInversionLoaderMixin.load_textual_inversion works on (a pipeline has more)."""

    hf_device_map = None

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    @property
    def components(self):
        return {"tokenizer": self.tokenizer, "text_encoder": self.text_encoder}


def unpatched_copy(clip):
    """A copy of the CLIP text model with the library's own forwards, as diffusers runs it."""
    model = copy.deepcopy(clip.transformer)
    for module in model.modules():
        module.__dict__.pop("forward", None)
    return model


def test_concept_loaded_by_diffusers_conditions_like_ours(tmp_path):
    """Train-side: our manager puts the vectors under "*". Export, load with diffusers' load_textual_inversion
    into the same text encoder, and the prompt encodes to the same hidden states."""
    torch.manual_seed(0)
    clip = FrozenCLIPEmbedder(config=TINY)
    manager = EmbeddingManager(clip, ["*"], ["triangle"], num_vectors_per_token=2)
    with torch.no_grad():
        manager.string_to_param_dict["*"].add_(_vectors(2, seed=3))
    learned = manager.string_to_param_dict["*"].detach()
    path = save_embedding_file(tmp_path / "learned_embeds.safetensors", {"<magenta-tri>": learned}, fmt="diffusers")

    host = TextEncoderHost(load_clip_tokenizer(), unpatched_copy(clip))
    host.load_textual_inversion(str(path))

    vocab = clip.token_embedding.num_embeddings
    ids = host.tokenizer.convert_tokens_to_ids(["<magenta-tri>", "<magenta-tri>_1"])
    assert ids == [vocab, vocab + 1]
    weight = host.text_encoder.get_input_embeddings().weight
    assert torch.equal(weight[ids], learned)

    # diffusers expands "<magenta-tri>" in a prompt to its per-vector tokens before tokenizing
    prompt = host.maybe_convert_prompt("a photo of <magenta-tri> on a beach", host.tokenizer)
    theirs_ids = host.tokenizer(prompt, padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids
    ours_ids = clip.tokenize(["a photo of * on a beach"])
    with torch.no_grad():
        theirs = host.text_encoder(input_ids=theirs_ids).last_hidden_state
        ours = clip.encode_tokens(ours_ids, embedding_manager=manager)
    # ours splices 2 vectors where "*" was, so every row lines up with diffusers' two new tokens
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
