"""Convert a learned embedding file between the official, AUTOMATIC1111, diffusers and kohya formats.

    python scripts/convert_embedding.py --input embeddings.pt --output learned_embeds.safetensors --to diffusers
    python scripts/convert_embedding.py --input my-style.pt --output embeddings.pt --to official --name "*"

The input format is recognised from the file's content. --name renames the concept (one-concept files only).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm.modules.embedding_io import FORMATS, load_embedding_file, save_embedding_file, single_token_lookup  # noqa: E402


def convert(input_path, output_path, to, name=None, tokenizer="clip"):
    emb = load_embedding_file(input_path)
    vectors, tokens = dict(emb.vectors), dict(emb.tokens)
    if name is not None:
        if len(vectors) != 1:
            raise ValueError(f"--name renames a single concept, but {input_path} holds {len(vectors)}: "
                             f"{', '.join(vectors)}")
        (old,) = vectors
        vectors, tokens = {name: vectors[old]}, {name: tokens[old] if name == old else None}
    if to == "official" and any(token is None for token in tokens.values()):
        lookup = single_token_lookup(tokenizer)
        for string in vectors:
            tokens[string] = tokens[string] if tokens[string] is not None else lookup(string)
            if tokens[string] is None:
                raise ValueError(f"{string!r} is not a single {tokenizer} token, so it cannot be an official "
                                 "placeholder; pass --name with one (e.g. --name '*')")
    if to == "diffusers":
        lookup = single_token_lookup(tokenizer)
        for string in vectors:
            if lookup(string) is not None:  # diffusers refuses to add a token the tokenizer already has
                print(f"note: {string!r} is already a word of the tokenizer; diffusers will load this file only "
                      f"with load_textual_inversion(path, token='<new-token>'), or convert again with --name "
                      f"'<my-concept>'", file=sys.stderr)
    save_embedding_file(output_path, vectors, tokens=tokens, name=name or emb.name, step=emb.step, fmt=to)
    return emb.format


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="embedding file in any supported format")
    parser.add_argument("--output", required=True, help="file to write")
    parser.add_argument("--to", required=True, choices=FORMATS, help="output format")
    parser.add_argument("--name", default=None, help="new name / placeholder string for the concept")
    parser.add_argument("--tokenizer", choices=("clip", "bert"), default="clip",
                        help="tokenizer giving placeholder token ids when converting to the official format")
    args = parser.parse_args(argv)
    try:
        source = convert(args.input, args.output, args.to, args.name, args.tokenizer)
    except (ValueError, OSError) as err:
        print(f"convert_embedding: {err}", file=sys.stderr)
        return 1
    print(f"Converted {args.input} ({source}) -> {args.output} ({args.to})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
