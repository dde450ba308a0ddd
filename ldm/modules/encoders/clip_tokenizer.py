"""The CLIP tokenizer of Stable Diffusion v1, built offline.

OpenAI's BPE file `bpe_simple_vocab_16e6.txt.gz` ships in this repository (models/clip/, MIT licence, see the
README there). We turn it into the `vocab.json` + `merges.txt` pair that `transformers.CLIPTokenizer` reads,
exactly the way OpenAI's `simple_tokenizer.py` builds its vocabulary, in a temporary directory that is removed
right after loading (0.2 s): nothing is written to the user's home. Text is cleaned like OpenAI does (ftfy,
HTML unescape, whitespace) so the ids match OpenAI's tokenizer.
"""
import functools
import gzip
import html
import json
import tempfile
from pathlib import Path

import ftfy
import regex
from transformers import CLIPTokenizer

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
VOCAB_SIZE = 49408
MAX_LENGTH = 77
# OpenAI keeps the first 49152 - 256 - 2 merges (line 0 of the file is a version header).
NUM_MERGES = 49152 - 256 - 2


BPE_PATH = Path(__file__).resolve().parents[3] / "models" / "clip" / BPE_FILENAME


def find_bpe_file():
    """Path of OpenAI's BPE file shipped in models/clip/."""
    if not BPE_PATH.is_file():
        raise FileNotFoundError(
            f"The CLIP BPE vocabulary {BPE_PATH} is missing; it is part of this repository: restore it with "
            f"`git checkout -- models/clip/{BPE_FILENAME}` (or copy it from OpenAI's CLIP repository).")
    return BPE_PATH


def bytes_to_unicode():
    """OpenAI/GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, map(chr, chars)))


def build_vocab_and_merges(bpe_path):
    """(vocab: token -> id, merges: list of "a b" strings), in OpenAI's order."""
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:NUM_MERGES + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


@functools.lru_cache(maxsize=1)
def _vocab_and_merges():
    return build_vocab_and_merges(find_bpe_file())


def write_tokenizer_files(directory):
    """Write vocab.json and merges.txt for transformers.CLIPTokenizer into `directory`; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    return directory


def clean_text(text):
    """OpenAI's basic_clean + whitespace_clean."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


def _clean(text):
    if isinstance(text, str):
        return clean_text(text)
    if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        return [clean_text(t) for t in text]
    return text


class OpenAICLIPTokenizer(CLIPTokenizer):
    """CLIPTokenizer that cleans text like OpenAI's tokenizer first.

    transformers 5 no longer runs ftfy; cleaning twice (transformers 4 with ftfy) is harmless.
    """

    def __call__(self, text=None, *args, **kwargs):
        return super().__call__(_clean(text), *args, **kwargs)

    def tokenize(self, text, *args, **kwargs):
        return super().tokenize(clean_text(text), *args, **kwargs)

    def encode(self, text, *args, **kwargs):
        return super().encode(_clean(text), *args, **kwargs)


def load_clip_tokenizer(path=None, max_length=MAX_LENGTH):
    """The CLIP tokenizer from `path` (a local directory with tokenizer files) or from OpenAI's BPE file."""
    if path is None:
        # transformers 4.x reads vocab/merges only from files: a temporary directory, gone once they are read.
        with tempfile.TemporaryDirectory(prefix="clip_tokenizer_") as tmp:
            return _from_directory(write_tokenizer_files(tmp), max_length)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"Tokenizer directory {path!r} does not exist.")
    return _from_directory(Path(path) / "tokenizer" if (Path(path) / "tokenizer").is_dir() else Path(path), max_length)


def _from_directory(tokenizer_dir, max_length):
    return OpenAICLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, model_max_length=max_length)
