"""The EmbeddingManager and the patched encoders: learned vectors act exactly like new vocabulary entries."""
import copy
import warnings

import pytest
import safetensors.torch
import torch
from torch import nn

from ldm.data.personalized import per_img_token_list
from ldm.modules.embedding_io import EmbeddingFamilyError, load_embedding_file, save_embedding_file
from ldm.modules.embedding_manager import PROGRESSIVE_SCALE, EmbeddingManager
from ldm.modules.encoders.modules import BERTEmbedder, FrozenCLIPEmbedder

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
STAR = 265  # CLIP id of "*"


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return FrozenCLIPEmbedder(config=TINY)


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return BERTEmbedder(n_embed=32, n_layer=2).eval()


def spliced_ids(row, replacements, first_new_id):
    """`row` with each placeholder id replaced by new vocabulary ids (one per vector), cut to the row length.

    replacements: {placeholder id: number of vectors}; new ids are allocated in that order from first_new_id.
    """
    new_ids, next_id = {}, first_new_id
    for token, count in replacements.items():
        new_ids[token] = list(range(next_id, next_id + count))
        next_id += count
    out = []
    for token in row.tolist():
        out += new_ids.get(token, [token])
    if len(out) > len(row):
        out = out[:len(row) - 1] + [row[-1].item()]
    return torch.tensor(out)


def clip_reference(clip, tokens, new_vectors):
    """The library's own, unpatched forward with the vectors appended to the vocabulary (diffusers' way)."""
    ref = copy.deepcopy(clip.transformer)
    for module in ref.modules():
        module.__dict__.pop("forward", None)
    text = getattr(ref, "text_model", ref)
    weight = text.embeddings.token_embedding.weight
    text.embeddings.token_embedding = nn.Embedding.from_pretrained(torch.cat([weight, new_vectors]))
    return ref(input_ids=tokens).last_hidden_state


def test_one_vector_equals_new_vocabulary_entry(clip):
    manager = EmbeddingManager(clip, ["*"], ["dog"])
    tokens = clip.tokenize(["a photo of *", "* on a * beach", "no placeholder here"])
    vocab = clip.token_embedding.num_embeddings
    ref_tokens = torch.stack([spliced_ids(row, {STAR: 1}, vocab) for row in tokens])
    expected = clip_reference(clip, ref_tokens, manager.string_to_param_dict["*"].detach())
    torch.testing.assert_close(clip.encode_tokens(tokens, embedding_manager=manager), expected)
    torch.testing.assert_close(clip(["a photo of *"], embedding_manager=manager), expected[:1])


def test_three_vectors_are_spliced(clip):
    torch.manual_seed(1)
    manager = EmbeddingManager(clip, ["*"], num_vectors_per_token=3)
    tokens = clip.tokenize(["a photo of * in the snow", "* and *", "plain"])
    vocab = clip.token_embedding.num_embeddings
    ref_tokens = torch.stack([spliced_ids(row, {STAR: 3}, vocab) for row in tokens])
    assert ref_tokens[0, :9].tolist() == [49406, 320, 1125, 539, vocab, vocab + 1, vocab + 2, 530, 518]
    expected = clip_reference(clip, ref_tokens, manager.string_to_param_dict["*"].detach())
    torch.testing.assert_close(clip.encode_tokens(tokens, embedding_manager=manager), expected)


def test_two_placeholders_in_one_prompt(clip):
    torch.manual_seed(2)
    manager = EmbeddingManager(clip, ["*", "sks"], ["cat", "painting"], num_vectors_per_token=2)
    sks = clip.string_to_token_ids("sks")[0]
    tokens = clip.tokenize(["a * in the style of sks", "sks *", "a *"])
    vocab = clip.token_embedding.num_embeddings
    ref_tokens = torch.stack([spliced_ids(row, {STAR: 2, sks: 2}, vocab) for row in tokens])
    new_vectors = torch.cat([manager.string_to_param_dict["*"], manager.string_to_param_dict["sks"]]).detach()
    expected = clip_reference(clip, ref_tokens, new_vectors)
    torch.testing.assert_close(clip.encode_tokens(tokens, embedding_manager=manager), expected)


def test_overflowing_row_keeps_its_end_token(clip):
    manager = EmbeddingManager(clip, ["*"], num_vectors_per_token=4)
    tokens = clip.tokenize(["* " + " ".join(["word"] * 80)])
    assert tokens[0, -1].item() == 49407
    embedded = clip.token_embedding(tokens)
    out = manager(tokens, embedded)
    vectors = manager.string_to_param_dict["*"]
    torch.testing.assert_close(out[0, 1:5], vectors)
    torch.testing.assert_close(out[0, 5:76], embedded[0, 2:73])
    torch.testing.assert_close(out[0, 76], embedded[0, 76])


def test_gradients_reach_only_the_manager(clip):
    manager = EmbeddingManager(clip, ["*"], ["dog"], num_vectors_per_token=2)
    out = clip(["a photo of *"], embedding_manager=manager)
    out.square().mean().backward()
    grad = manager.string_to_param_dict["*"].grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.parameters())
    assert not any(p.requires_grad for p in manager.initial_embeddings.parameters())
    assert list(manager.embedding_parameters()) == [manager.string_to_param_dict["*"]]


def test_manager_weights_stay_out_of_the_encoder(clip):
    manager = EmbeddingManager(clip, ["*"], ["dog"])
    assert set(manager.state_dict()) == {"string_to_param_dict.*", "initial_embeddings.*"}


def test_initializer_word(clip):
    manager = EmbeddingManager(clip, ["*"], ["dog"], num_vectors_per_token=2)
    dog = clip.token_embedding.weight[clip.string_to_token_ids("dog")[0]]
    torch.testing.assert_close(manager.string_to_param_dict["*"].detach(), torch.stack([dog, dog]))
    torch.testing.assert_close(manager.initial_embeddings["*"], torch.stack([dog, dog]))
    assert manager.string_to_token_dict["*"].item() == STAR


def test_random_init_without_initializer(clip):
    manager = EmbeddingManager(clip, ["*"], num_vectors_per_token=2)
    vectors = manager.string_to_param_dict["*"]
    assert vectors.shape == (2, 32) and (vectors >= 0).all() and (vectors < 1).all()
    assert len(manager.initial_embeddings) == 0
    assert manager.embedding_to_coarse_loss().item() == 0


def test_multi_token_initializer_accepted_with_enough_vectors(clip):
    ids = clip.string_to_token_ids("golden retriever")
    assert len(ids) == 2
    manager = EmbeddingManager(clip, ["*"], ["golden retriever"], num_vectors_per_token=3)
    words = clip.token_embedding.weight[ids]
    expected = torch.cat([words, words.mean(0, keepdim=True)])
    torch.testing.assert_close(manager.string_to_param_dict["*"].detach(), expected)


def test_multi_token_initializer_refused_with_too_few_vectors(clip):
    with pytest.raises(ValueError, match="'golden retriever' is 2 tokens.*raise num_vectors_per_token to 2"):
        EmbeddingManager(clip, ["*"], ["golden retriever"], num_vectors_per_token=1)


def test_placeholder_must_be_one_token(clip):
    with pytest.raises(ValueError, match="'my dog' is 2 tokens.*exactly one token"):
        EmbeddingManager(clip, ["my dog"])


def test_per_image_tokens_need_single_tokens(clip, bert):
    with pytest.raises(ValueError, match="per-image token"):
        EmbeddingManager(clip, ["*"], per_image_tokens=True)
    manager = EmbeddingManager(bert, ["*"], per_image_tokens=True)
    assert list(manager.string_to_param_dict) == ["*"] + per_img_token_list


def test_per_image_tokens_as_a_list_work_with_clip(clip):
    manager = EmbeddingManager(clip, ["*"], ["dog"], per_image_tokens=["@", "#", "$"])
    assert list(manager.string_to_param_dict) == ["*", "@", "#", "$"]
    tokens = clip.tokenize(["a photo of * with #"])
    out = manager(tokens, clip.token_embedding(tokens))
    torch.testing.assert_close(out[0, 4], manager.string_to_param_dict["*"][0])  # <start> a photo of *
    torch.testing.assert_close(out[0, 6], manager.string_to_param_dict["#"][0])


def test_progressive_words_follow_the_step(clip):
    manager = EmbeddingManager(clip, ["*"], ["dog"], num_vectors_per_token=3, progressive_words=True)
    tokens = clip.tokenize(["a *"])
    embedded = clip.token_embedding(tokens)
    vectors = manager.string_to_param_dict["*"]
    expectations = [(None, 3), (0, 1), (PROGRESSIVE_SCALE - 1, 1), (PROGRESSIVE_SCALE, 2), (10 * PROGRESSIVE_SCALE, 3)]
    for step, active in expectations:
        manager.progressive_step = step
        assert manager.num_active_vectors() == active
        out = manager(tokens, embedded)
        torch.testing.assert_close(out[0, 2:2 + active], vectors[:active])
        torch.testing.assert_close(out[0, 2 + active], embedded[0, 3])  # the end token follows the active vectors
    for _ in range(3):  # forward calls do not advance it (the original's defect)
        manager(tokens, embedded)
    assert manager.num_active_vectors() == 3


def test_progressive_steps_sets_the_interval(clip):
    """A short run can grow its word too: progressive_steps replaces the original's 2000-step interval."""
    manager = EmbeddingManager(clip, ["*"], ["dog"], num_vectors_per_token=3, progressive_words=True,
                               progressive_steps=250)
    for step, active in [(0, 1), (249, 1), (250, 2), (499, 2), (500, 3), (5000, 3)]:
        manager.progressive_step = step
        assert manager.num_active_vectors() == active
    with pytest.raises(ValueError, match="progressive_steps"):
        EmbeddingManager(clip, ["*"], ["dog"], progressive_words=True, progressive_steps=0)


def test_same_mechanism_with_bert(bert):
    torch.manual_seed(3)
    manager = EmbeddingManager(bert, ["*"], ["dog"], num_vectors_per_token=2)
    star = bert.string_to_token_ids("*")[0]
    tokens = bert.tokenize(["a photo of *", "* and *"])
    vocab = bert.token_embedding.num_embeddings
    ref_tokens = torch.stack([spliced_ids(row, {star: 2}, vocab) for row in tokens])
    ref = copy.deepcopy(bert.transformer)
    ref.token_emb = nn.Embedding.from_pretrained(torch.cat([ref.token_emb.weight, manager.string_to_param_dict["*"]]))
    expected = ref(ref_tokens, return_embeddings=True)
    torch.testing.assert_close(bert(["a photo of *", "* and *"], embedding_manager=manager), expected)


def test_regulariser(clip):
    manager = EmbeddingManager(clip, ["*", "sks"], ["dog", "cat"], num_vectors_per_token=2)
    assert manager.embedding_to_coarse_loss().item() == 0
    with torch.no_grad():
        manager.string_to_param_dict["*"].add_(0.5)
    loss = manager.embedding_to_coarse_loss()
    assert loss.ndim == 0
    torch.testing.assert_close(loss, torch.tensor(2 * 32 * 0.25 / 2))


def test_save_then_load(clip, tmp_path):
    manager = EmbeddingManager(clip, ["*"], ["dog"], num_vectors_per_token=2)
    with torch.no_grad():
        manager.string_to_param_dict["*"].mul_(3)
    path = manager.save(tmp_path / "embeddings.pt", step=42)
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 42 and raw["name"] == "*" and raw["string_to_token"]["*"].item() == STAR
    fresh = EmbeddingManager(clip, ["*"])  # one vector: the count comes from the file
    fresh.load(path)
    torch.testing.assert_close(fresh.string_to_param_dict["*"], manager.string_to_param_dict["*"])
    assert fresh.max_vectors_per_token == 2
    tokens = clip.tokenize(["a photo of *"])
    torch.testing.assert_close(clip.encode_tokens(tokens, embedding_manager=fresh),
                               clip.encode_tokens(tokens, embedding_manager=manager))


def test_load_adds_concepts_from_several_files(clip, tmp_path):
    save_embedding_file(tmp_path / "a.pt", {"sks": torch.ones(4, 32)}, tokens={"sks": 48136})
    save_embedding_file(tmp_path / "b.safetensors", {"<cat-toy>": torch.zeros(1, 32)}, fmt="diffusers")
    manager = EmbeddingManager(clip, ["*"])
    manager.load([tmp_path / "a.pt", tmp_path / "b.safetensors"], placeholder_strings=["sks", "@"])
    assert list(manager.string_to_param_dict) == ["*", "sks", "@"]
    assert manager.string_to_param_dict["sks"].shape == (4, 32)
    assert manager.string_to_token_dict["@"].item() == clip.string_to_token_ids("@")[0]
    out = manager(clip.tokenize(["sks"]), clip.token_embedding(clip.tokenize(["sks"])))
    torch.testing.assert_close(out[0, 1:5], torch.ones(4, 32))


def test_load_refuses_another_width_bert(bert, tmp_path):
    path = save_embedding_file(tmp_path / "clip.pt", {"*": torch.zeros(1, 768)}, tokens={"*": STAR})
    with pytest.raises(EmbeddingFamilyError, match=r"clip.pt is SD v1 \(CLIP ViT-L, 768\); this model is"):
        EmbeddingManager(bert, ["*"]).load(path)


def test_file_written_by_manager_is_official(clip, tmp_path):
    manager = EmbeddingManager(clip, ["*", "sks"], ["dog", "cat"])
    loaded = load_embedding_file(manager.save(tmp_path / "embeddings_gs-7.pt", step=7))
    assert loaded.format == "official" and loaded.step == 7
    assert loaded.tokens == {"*": STAR, "sks": 48136}
    assert set(loaded.vectors) == {"*", "sks"}


# ---------------------------------------------------------------- concepts named by any string (file names)

def sequence_spliced_ids(row, replacements, first_new_id):
    """`row` with each token sequence in `replacements` ({ids tuple: vector count}, longest first) replaced by
    new vocabulary ids, kept at the row's length: cut keeping the last token, or padded with the last token."""
    row, n, out, i = row.tolist(), len(row), [], 0
    new_ids, next_id = {}, first_new_id
    for ids, count in replacements.items():
        new_ids[ids], next_id = list(range(next_id, next_id + count)), next_id + count
    order = sorted(replacements, key=len, reverse=True)
    while i < n:
        ids = next((s for s in order if tuple(row[i:i + len(s)]) == s), None)
        out += new_ids[ids] if ids else [row[i]]
        i += len(ids) if ids else 1
    out = out[:n - 1] + [row[-1]] if len(out) > n else out + [row[-1]] * (n - len(out))
    return torch.tensor(out)


def test_one_token_output_is_bit_identical_to_the_original(clip):
    """One vector per placeholder: the original's embedded_text[placeholder_idx] = vector, bit for bit, on both
    the one-token path and the any-string path that runs once a concept of several tokens is loaded."""
    torch.manual_seed(4)
    manager = EmbeddingManager(clip, ["*", "sks"], ["dog", "cat"])
    tokens = clip.tokenize(["a photo of * and sks", "sks *", "nothing"])
    embedded = clip.token_embedding(tokens)
    expected = embedded.clone()
    for string in ("*", "sks"):
        expected[tokens == manager.string_to_token_dict[string]] = manager.string_to_param_dict[string][0]
    assert torch.equal(manager(tokens, embedded), expected)
    assert torch.equal(manager._replace_sequences(tokens, embedded, 1), expected)


def test_concepts_named_by_file_name_of_several_tokens(clip, tmp_path):
    """--embedding_path EasyNegative.safetensors bad-hands-5.pt, then prompts that name the files."""
    easy, hands = torch.randn(3, 32), torch.randn(2, 32)
    save_embedding_file(tmp_path / "EasyNegative.safetensors", {"x": easy}, fmt="a1111-safetensors")
    save_embedding_file(tmp_path / "bad-hands-5.pt", {"x": hands}, name="bad-hands-4", fmt="a1111")
    manager = EmbeddingManager(clip, ["*"], ["dog"])
    manager.load([tmp_path / "EasyNegative.safetensors", tmp_path / "bad-hands-5.pt"])
    assert list(manager.string_to_param_dict) == ["*", "EasyNegative", "bad-hands-5"]
    easy_ids, hands_ids = (tuple(clip.string_to_token_ids(s)) for s in ("EasyNegative", "bad-hands-5"))
    assert len(easy_ids) > 1 and len(hands_ids) > 1

    prompts = ["a photo of *, EasyNegative, bad-hands-5", "bad-hands-5 bad-hands-5 *", "no concept at all"]
    tokens = clip.tokenize(prompts)
    vocab = clip.token_embedding.num_embeddings
    ref_tokens = torch.stack([sequence_spliced_ids(row, {(STAR,): 1, easy_ids: 3, hands_ids: 2}, vocab)
                              for row in tokens])
    new_vectors = torch.cat([manager.string_to_param_dict[s] for s in ("*", "EasyNegative", "bad-hands-5")])
    expected = clip_reference(clip, ref_tokens, new_vectors.detach())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the vectors only push out padding: no warning
        torch.testing.assert_close(clip.encode_tokens(tokens, embedding_manager=manager), expected)


def test_longest_name_first(clip, tmp_path):
    short, long = torch.zeros(1, 32), torch.ones(2, 32)
    save_embedding_file(tmp_path / "hands.safetensors", {"x": short}, fmt="kohya")
    save_embedding_file(tmp_path / "bad-hands-5.safetensors", {"x": long}, fmt="kohya")
    manager = EmbeddingManager(clip, ["*"])
    with pytest.warns(UserWarning, match="'hands' .* ordinary word"):
        manager.load([tmp_path / "hands.safetensors", tmp_path / "bad-hands-5.safetensors"])
    tokens = clip.tokenize(["bad-hands-5 hands"])
    out = manager(tokens, clip.token_embedding(tokens))
    torch.testing.assert_close(out[0, 1:3], long)  # the longer name wins where both match ("...hands-5")
    torch.testing.assert_close(out[0, 3], short[0])  # the lone "hands" is the shorter concept


def test_vectors_beyond_77_are_cut_with_a_warning(clip, tmp_path):
    vectors = torch.randn(74, 32)  # fits alone (at most 75), not beside "a" and "cat"
    save_embedding_file(tmp_path / "huge-style.safetensors", {"x": vectors}, fmt="kohya")
    manager = EmbeddingManager(clip, ["*"])
    manager.load(tmp_path / "huge-style.safetensors")
    tokens = clip.tokenize(["a huge-style cat"])
    embedded = clip.token_embedding(tokens)
    with pytest.warns(UserWarning, match="is 78 positions long.*cut to 77"):
        out = manager(tokens, embedded)
    assert out.shape == embedded.shape
    torch.testing.assert_close(out[0, 2:76], vectors[:74])
    torch.testing.assert_close(out[0, 76], embedded[0, -1])  # the end token is kept


def test_fewer_vectors_than_name_tokens_pad_with_the_end_token(clip, tmp_path):
    save_embedding_file(tmp_path / "bad-hands-5.pt", {"x": torch.ones(1, 32)}, fmt="a1111")
    manager = EmbeddingManager(clip, ["*"])
    manager.load(tmp_path / "bad-hands-5.pt")
    tokens = clip.tokenize(["bad-hands-5 photo"])
    vocab = clip.token_embedding.num_embeddings
    ref = sequence_spliced_ids(tokens[0], {tuple(clip.string_to_token_ids("bad-hands-5")): 1}, vocab)
    assert ref[:4].tolist() == [49406, vocab, clip.string_to_token_ids("photo")[0], 49407]
    expected = clip_reference(clip, ref[None], manager.string_to_param_dict["bad-hands-5"].detach())
    torch.testing.assert_close(clip.encode_tokens(tokens, embedding_manager=manager), expected)


def test_names_a_prompt_cannot_tell_apart_are_refused(clip, tmp_path):
    for folder in ("a", "b"):
        save_embedding_file(tmp_path / folder / "style.pt", {"x": torch.zeros(1, 32)}, fmt="a1111")
    save_embedding_file(tmp_path / "STYLE.pt", {"x": torch.zeros(1, 32)}, fmt="a1111")
    manager = EmbeddingManager(clip, ["*"])
    with pytest.raises(ValueError, match=r"b/style.pt and .*a/style.pt both answer to 'style'.*placeholder_string"):
        with pytest.warns(UserWarning, match="'style' .* ordinary word"):
            manager.load([tmp_path / "a" / "style.pt", tmp_path / "b" / "style.pt"])
    with pytest.raises(ValueError, match=r"both answer to 'STYLE' / 'style' \(the same tokens\)"):
        with pytest.warns(UserWarning, match="ordinary word"):
            manager.load([tmp_path / "a" / "style.pt", tmp_path / "STYLE.pt"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # names the user gives are chosen knowingly: no ordinary-word warning
        manager.load([tmp_path / "a" / "style.pt", tmp_path / "b" / "style.pt"], placeholder_strings=["style", "@"])
    assert list(manager.string_to_param_dict) == ["*", "style", "@"]


def test_trained_placeholder_is_replaced_by_a_loaded_one(clip, tmp_path):
    """The common case (txt2img: the config's '*' then --embedding_path embeddings.pt) is not a clash."""
    path = save_embedding_file(tmp_path / "embeddings.pt", {"*": torch.ones(2, 32)}, tokens={"*": STAR})
    manager = EmbeddingManager(clip, ["*"])
    manager.load(path)
    torch.testing.assert_close(manager.string_to_param_dict["*"], torch.ones(2, 32))


def test_concept_of_several_tokens_cannot_be_saved_officially(clip, tmp_path):
    save_embedding_file(tmp_path / "EasyNegative.safetensors", {"x": torch.zeros(1, 32)}, fmt="kohya")
    manager = EmbeddingManager(clip, ["*"])
    manager.load(tmp_path / "EasyNegative.safetensors")
    with pytest.raises(ValueError, match="'EasyNegative': several tokens"):
        manager.save(tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


# ---------------------------------------------------------------- model families by width

@pytest.fixture(scope="module")
def sd1_width_clip():
    torch.manual_seed(0)
    return FrozenCLIPEmbedder(config=dict(hidden_size=768, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2))


@pytest.mark.parametrize("data,message", [
    ({"*": torch.zeros(1, 1024)}, r"sd2.pt is SD 2.x \(OpenCLIP ViT-H, 1024\); this model is SD v1 \(CLIP ViT-L, 768\)"),
    ({"*": torch.zeros(1, 1280)}, r"is LDM-1.4B \(BERT, 1280\); this model is SD v1"),
    ({"*": torch.zeros(1, 4096)}, r"is an unknown family \(4096 wide\); this model is SD v1"),
])
def test_load_refuses_another_family(sd1_width_clip, tmp_path, data, message):
    path = tmp_path / "sd2.pt"
    torch.save(data, path)
    with pytest.raises(EmbeddingFamilyError, match=message):
        EmbeddingManager(sd1_width_clip, ["*"]).load(path)


def test_load_refuses_sdxl_and_a_private_two_encoder_layout(sd1_width_clip, tmp_path):
    sdxl, private = tmp_path / "xl.safetensors", tmp_path / "private.safetensors"
    safetensors.torch.save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, str(sdxl))
    safetensors.torch.save_file({"emb": torch.zeros(2, 768), "emb2": torch.zeros(2, 1280)}, str(private))
    manager = EmbeddingManager(sd1_width_clip, ["*"])
    with pytest.raises(EmbeddingFamilyError,
                       match=r"xl.safetensors is SDXL \(clip_l 768 \+ clip_g 1280\); this model is SD v1 "):
        manager.load(sdxl)
    with pytest.raises(EmbeddingFamilyError, match=r"different widths \(emb: 768, emb2: 1280\).*this model is SD v1"):
        manager.load(private)
    assert list(manager.string_to_param_dict) == ["*"]


def test_load_refuses_another_width(clip, tmp_path):
    path = save_embedding_file(tmp_path / "sd1.pt", {"*": torch.zeros(1, 768)}, tokens={"*": STAR})
    with pytest.raises(EmbeddingFamilyError, match=r"sd1.pt is SD v1 \(CLIP ViT-L, 768\); this model is an unknown "
                                                   r"family \(32 wide\)"):
        EmbeddingManager(clip, ["*"]).load(path)


def test_placeholder_merged_with_punctuation_is_reported(clip):
    """CLIP's BPE reads '*,' as one token (41895): the prompt shows '*' but the model never sees the placeholder."""
    manager = EmbeddingManager(clip, ["*"], ["dog"])
    assert clip.string_to_token_ids("*,") != clip.string_to_token_ids("* ,")
    assert manager.names_lost_in("a photo of *, at night") == ["*"]
    assert manager.names_lost_in("a photo of * , at night") == []
    assert manager.names_lost_in("a photo of *") == []
    assert manager.names_lost_in("a photo of a dog") == []
