"""The offline CLIP tokenizer gives OpenAI's ids."""
import importlib.util
import json

import pytest

from ldm.modules.encoders import clip_tokenizer
from ldm.modules.encoders.clip_tokenizer import (
    BOS_TOKEN_ID, EOS_TOKEN_ID, MAX_LENGTH, VOCAB_SIZE, ensure_tokenizer_files, find_bpe_file, load_clip_tokenizer,
)

CORPUS = [
    "a photo of *",
    "sks",
    "a photo of sks dog",
    "Hello, World!!! ... ?!",
    "I ❤️ my 🐶 😀👍🏽",
    "“curly” ‘quotes’ and don’t",
    "fish &amp; chips &lt;3 &#39;x&#39; &amp;amp;",
    "MiXeD CaSe TeXt",
    "it's we'll they're I'd",
    "  lots   of\n\twhitespace  ",
    "naïve café Ñandú",
    "Ã©tÃ© mojibake",
    "12345 3.14 1e-5",
    "<|startoftext|> a <|endoftext|>",
    "日本語のテキスト",
]


@pytest.fixture(scope="module")
def reference():
    """OpenAI's own tokenizer, loaded by file path (importing the clip package would pull torchvision)."""
    path = find_bpe_file().parent / "simple_tokenizer.py"
    spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(find_bpe_file()))


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


@pytest.mark.parametrize("text", CORPUS)
def test_ids_equal_openai(tokenizer, reference, text):
    assert tokenizer(text)["input_ids"] == [BOS_TOKEN_ID] + reference.encode(text) + [EOS_TOKEN_ID]


def test_known_ids(tokenizer):
    assert tokenizer("a photo of *")["input_ids"] == [49406, 320, 1125, 539, 265, 49407]
    assert tokenizer("sks", add_special_tokens=False)["input_ids"] == [48136]
    assert len(tokenizer) == VOCAB_SIZE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)


def test_long_text_truncated_to_77(tokenizer, reference):
    text = " ".join(f"word{i} and more" for i in range(60))
    ids = tokenizer(text, truncation=True, max_length=MAX_LENGTH, padding="max_length")["input_ids"]
    assert len(ids) == MAX_LENGTH
    assert ids == [BOS_TOKEN_ID] + reference.encode(text)[:MAX_LENGTH - 2] + [EOS_TOKEN_ID]


def test_short_text_padded_with_end_token(tokenizer):
    ids = tokenizer(["a photo of *"], truncation=True, max_length=MAX_LENGTH, padding="max_length",
                    return_tensors="pt")["input_ids"]
    assert ids.shape == (1, MAX_LENGTH)
    assert ids[0, :6].tolist() == [49406, 320, 1125, 539, 265, 49407]
    assert (ids[0, 6:] == EOS_TOKEN_ID).all()


def test_cache_built_atomically_in_env_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTUAL_INVERSION_CACHE", str(tmp_path / "cache"))
    directory = ensure_tokenizer_files()
    assert directory == tmp_path / "cache"
    assert sorted(p.name for p in directory.iterdir()) == ["merges.txt", "vocab.json"]
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    merges = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == VOCAB_SIZE and len(merges) == 1 + 49152 - 256 - 2
    assert vocab["<|startoftext|>"] == BOS_TOKEN_ID and vocab["<|endoftext|>"] == EOS_TOKEN_ID
    assert vocab["*</w>"] == 265


def test_local_tokenizer_directory(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    local = load_clip_tokenizer(tmp_path)
    assert local("a “curly” &amp; photo of *")["input_ids"] == tokenizer("a “curly” &amp; photo of *")["input_ids"]


def test_missing_clip_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(clip_tokenizer.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps clip-anytorch"):
        find_bpe_file()
