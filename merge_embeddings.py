"""Merge several learned embedding files into one official embeddings file.

    python merge_embeddings.py --manager_ckpts a.pt b.pt c.safetensors --output_path merged.pt -sd

Runs on CPU and never prompts. All files must be of one model family (by their widths: SD v1 768, SD 2.x 1024,
LDM-1.4B 1280, SDXL clip_l 768 + clip_g 1280), matching the tokenizer (-sd: CLIP, for SD v1, SD 2.x and
SDXL; otherwise BERT). SDXL files merge into the project's official SDXL layout (one vector set per text
encoder). When two files use the same placeholder string, --on_clash decides: error (default; nothing is
written), rename (the later concept gets a new single-token placeholder, taken from
--rename_to in order or chosen automatically), skip (keep the first) or overwrite (keep the last).
"""
import argparse
import sys

from ldm.modules.embedding_io import (
    check_tokenizer, describe_widths, load_embedding_file, save_embedding_file, single_token_lookup,
)

# Single characters that are one token for both CLIP and BERT, tried in order for automatic renames.
RENAME_CANDIDATES = tuple("*@&#$%^~+=!?|<>§")


class MergeError(ValueError):
    pass


class _Tokens:
    """Token ids for placeholder strings, loading the tokenizer only if some file does not store them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._lookup = None

    def __call__(self, string):
        if self._lookup is None:
            self._lookup = single_token_lookup(self.tokenizer)
        return self._lookup(string)


def merge_embeddings(paths, on_clash="error", rename_to=(), tokenizer="clip"):
    """Returns (vectors, tokens, sources), each keyed by the merged placeholder strings, in file order.

    For SDXL files `vectors` is {encoder key: {placeholder: [n, d]}}, as save_embedding_file takes it.
    """
    first = load_embedding_file(paths[0])
    check_tokenizer(paths[0], first.widths, tokenizer)
    files = [(paths[0], first)] + [
        (path, load_embedding_file(path, target_widths=first.widths, target=f"the first file {paths[0]}"))
        for path in paths[1:]]
    token_for = _Tokens(tokenizer)
    every_placeholder = {s for _, f in files for s in f.concepts}
    renames = iter(rename_to)
    by_encoder, tokens, sources = {key: {} for key in first.by_encoder}, {}, {}

    def new_placeholder(old, path):
        explicit = next(renames, None)
        for candidate in RENAME_CANDIDATES if explicit is None else (explicit,):
            token = None if candidate in every_placeholder else token_for(candidate)
            if token is not None:
                every_placeholder.add(candidate)
                return candidate, token
        if explicit is not None:
            raise MergeError(f"--rename_to {explicit!r} (for {old!r} from {path}) is already a placeholder "
                             f"or not a single {tokenizer} token")
        raise MergeError(f"No free single-token placeholder left for {old!r} from {path}; pass --rename_to")

    for path, emb in files:
        for original in emb.concepts:
            string, token = original, emb.tokens.get(original)
            if token is None:
                token = token_for(string)
                if token is None:
                    raise MergeError(
                        f"Concept {string!r} from {path} is not a single {tokenizer} token, so it cannot be a "
                        "placeholder; rename it with scripts/convert_embedding.py --name <single token> first"
                    )
            if string in sources:
                clash = f"Placeholder {string!r} from {path} is already used by {sources[string]}"
                if on_clash == "error":
                    raise MergeError(f"{clash}; rerun with --on_clash rename, skip or overwrite")
                if on_clash == "skip":
                    print(f"{clash}: skipped (keeping the first)")
                    continue
                if on_clash == "rename":
                    string, token = new_placeholder(string, path)
                    print(f"{clash}: renamed to {string!r}")
                else:
                    print(f"{clash}: overwritten")
            for key, vectors in emb.by_encoder.items():
                by_encoder[key][string] = vectors[original]
            tokens[string], sources[string] = token, path
    return (by_encoder if first.multi_encoder else by_encoder[None]), tokens, sources


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manager_ckpts", type=str, nargs="+", required=True,
                        help="embedding files to merge (official, AUTOMATIC1111, diffusers or kohya)")
    parser.add_argument("--output_path", type=str, required=True, help="where to write the merged embeddings")
    parser.add_argument("-sd", "--stable_diffusion", action="store_true",
                        help="token ids for the CLIP tokenizer of Stable Diffusion (default: the LDM BERT tokenizer)")
    parser.add_argument("--on_clash", choices=("error", "rename", "skip", "overwrite"), default="error",
                        help="what to do when two files use the same placeholder string")
    parser.add_argument("--rename_to", type=str, nargs="*", default=[],
                        help="placeholders for renamed concepts, used in order (otherwise chosen automatically)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    tokenizer = "clip" if args.stable_diffusion else "bert"
    try:
        vectors, tokens, sources = merge_embeddings(args.manager_ckpts, args.on_clash, args.rename_to, tokenizer)
    except (MergeError, ValueError, OSError) as err:
        print(f"merge_embeddings: {err}. Nothing was written.", file=sys.stderr)
        return 1
    save_embedding_file(args.output_path, vectors, tokens=tokens, fmt="official")
    family = describe_widths(load_embedding_file(args.output_path).widths)
    print(f"Wrote {args.output_path} ({family}). Placeholders and their sources:")
    for string, source in sources.items():
        print(f"  {string!r}: {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
