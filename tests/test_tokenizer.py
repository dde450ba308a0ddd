"""The offline CLIP tokenizer gives OpenAI's ids."""
import hashlib
import json
from pathlib import Path

import pytest

from ldm.modules.encoders import clip_tokenizer
from ldm.modules.encoders.clip_tokenizer import (
    BOS_TOKEN_ID, EOS_TOKEN_ID, MAX_LENGTH, VOCAB_SIZE, find_bpe_file, load_clip_tokenizer, write_tokenizer_files,
)

# ids of OpenAI's own SimpleTokenizer for a varied corpus (see "source" in the file)
REFERENCE = json.loads((Path(__file__).parent / "data" / "openai_clip_ids.json").read_text(encoding="utf-8"))["ids"]
CORPUS = list(REFERENCE)
LONG_TEXT = " ".join(f"word{i} and more" for i in range(60))
# sha256 of OpenAI's bpe_simple_vocab_16e6.txt.gz (github.com/openai/CLIP, clip/bpe_simple_vocab_16e6.txt.gz)
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


def test_shipped_bpe_file_is_openais():
    assert hashlib.sha256(find_bpe_file().read_bytes()).hexdigest() == BPE_SHA256
    licence = (find_bpe_file().parent / "LICENSE").read_text()
    assert "MIT License" in licence and "Copyright (c) 2021 OpenAI" in licence


@pytest.mark.parametrize("text", CORPUS)
def test_ids_equal_openai(tokenizer, text):
    assert tokenizer(text)["input_ids"] == [BOS_TOKEN_ID] + REFERENCE[text] + [EOS_TOKEN_ID]


def test_known_ids(tokenizer):
    assert tokenizer("a photo of *")["input_ids"] == [49406, 320, 1125, 539, 265, 49407]
    assert tokenizer("sks", add_special_tokens=False)["input_ids"] == [48136]
    assert len(tokenizer) == VOCAB_SIZE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)


def test_long_text_truncated_to_77(tokenizer):
    ids = tokenizer(LONG_TEXT, truncation=True, max_length=MAX_LENGTH, padding="max_length")["input_ids"]
    assert len(ids) == MAX_LENGTH
    assert ids == [BOS_TOKEN_ID] + REFERENCE[LONG_TEXT][:MAX_LENGTH - 2] + [EOS_TOKEN_ID]


def test_short_text_padded_with_end_token(tokenizer):
    ids = tokenizer(["a photo of *"], truncation=True, max_length=MAX_LENGTH, padding="max_length",
                    return_tensors="pt")["input_ids"]
    assert ids.shape == (1, MAX_LENGTH)
    assert ids[0, :6].tolist() == [49406, 320, 1125, 539, 265, 49407]
    assert (ids[0, 6:] == EOS_TOKEN_ID).all()


def test_tokenizer_files_for_transformers(tmp_path):
    directory = write_tokenizer_files(tmp_path / "tok")
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


def test_missing_bpe_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(clip_tokenizer, "BPE_PATH", tmp_path / "gone.txt.gz")
    with pytest.raises(FileNotFoundError, match="git checkout -- models/clip/"):
        find_bpe_file()

