"""The CLIP tokenizer of Stable Diffusion v1, built offline.

OpenAI's BPE file `bpe_simple_vocab_16e6.txt.gz` ships inside the PyPI package `clip-anytorch`.
We locate it without importing that package (importing it pulls torchvision), turn it into the
`vocab.json` + `merges.txt` pair that `transformers.CLIPTokenizer` reads, exactly the way OpenAI's
`simple_tokenizer.py` builds its vocabulary, and cache the pair on disk. Text is cleaned like
OpenAI does (ftfy, HTML unescape, whitespace) so the ids match OpenAI's tokenizer.
"""
import gzip
import html
import importlib.util
import json
import os
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


def find_bpe_file():
    """Path of OpenAI's BPE file inside the installed clip-anytorch package (not imported)."""
    spec = importlib.util.find_spec("clip")
    path = Path(spec.origin).parent / BPE_FILENAME if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"The CLIP BPE vocabulary ({BPE_FILENAME}) was not found. It ships in the PyPI package "
            "clip-anytorch; install it without its dependencies: pip install --no-deps clip-anytorch"
        )
    return path


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


def tokenizer_cache_dir():
    default = Path.home() / ".cache" / "textual_inversion" / "clip_tokenizer"
    return Path(os.environ.get("TEXTUAL_INVERSION_CACHE", default))


def _write_atomically(path, text):
    # Several processes (DDP ranks, parallel tests) may build the cache at once: never expose a partial file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def ensure_tokenizer_files(cache_dir=None):
    """Directory holding vocab.json and merges.txt derived from OpenAI's BPE file (built once)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else tokenizer_cache_dir()
    vocab_path, merges_path = cache_dir / "vocab.json", cache_dir / "merges.txt"
    if not (vocab_path.is_file() and merges_path.is_file()):
        cache_dir.mkdir(parents=True, exist_ok=True)
        vocab, merges = build_vocab_and_merges(find_bpe_file())
        _write_atomically(merges_path, "#version: 0.2\n" + "\n".join(merges) + "\n")
        _write_atomically(vocab_path, json.dumps(vocab, ensure_ascii=False))
    return cache_dir


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
        path = ensure_tokenizer_files()
    elif not Path(path).is_dir():
        raise FileNotFoundError(f"Tokenizer directory {path!r} does not exist.")
    tokenizer_dir = Path(path) / "tokenizer" if (Path(path) / "tokenizer").is_dir() else Path(path)
    return OpenAICLIPTokenizer.from_pretrained(
        str(tokenizer_dir), local_files_only=True, model_max_length=max_length
    )
