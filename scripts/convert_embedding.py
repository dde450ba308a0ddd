"""Convert a learned embedding file between the official, AUTOMATIC1111 (.pt, .safetensors, PNG), diffusers and
kohya formats.

    python scripts/convert_embedding.py --input embeddings.pt --output learned_embeds.safetensors --to diffusers
    python scripts/convert_embedding.py --input my-style.pt --output embeddings.pt --to official --name "*"
    python scripts/convert_embedding.py --input embeddings.pt --output my-style.png --to a1111-png

The input format is recognised from the file's content, its model family from its widths (SD v1 768,
SD 2.x 1024, LDM-1.4B 1280, SDXL clip_l 768 + clip_g 1280); --model_family refuses a file made for another
family. SDXL files convert between official, a1111-safetensors, kohya and a1111-png (AUTOMATIC1111's .pt and
diffusers' one-tensor file have no SDXL layout; diffusers reads the a1111-safetensors file, one key per text
encoder). --name renames the concept (one-concept files only).
An XTI (per-layer, P+) embedding converts between our official layout and kohya's (--to kohya-xti,
{layer name: [n, d]}); ordinary formats refuse it (docs/method.md).
"""
import argparse
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm.cli_checks import user_error_message  # noqa: E402
from ldm.modules.embedding_io import (  # noqa: E402
    FAMILY_NAMES, FAMILY_TOKENIZERS, FORMATS, XTI_FORMATS, check_family, check_tokenizer, describe_widths,
    describe_xti, load_embedding_file, read_xti_file, save_embedding_file, save_xti_file, single_token_lookup,
)


def convert(input_path, output_path, to, name=None, tokenizer=None, model_family=None):
    """Returns the input's EmbeddingFile (its format and family)."""
    target = FAMILY_NAMES[model_family] if model_family else None
    xti = read_xti_file(input_path)
    if xti is not None:
        return convert_xti(xti, input_path, output_path, to, name, tokenizer, target, model_family)
    if to == "kohya-xti":
        raise ValueError(f"--to kohya-xti writes an XTI (per-layer) embedding, but {input_path} holds one vector "
                         "set for all layers; train one with configs/toy/recipes/xti.yaml (docs/method.md).")
    emb = load_embedding_file(input_path, target_widths=target, target=f"--model_family {model_family}")
    if tokenizer is None:
        tokenizer = FAMILY_TOKENIZERS.get(emb.widths, "clip")
    check_tokenizer(input_path, emb.widths, tokenizer)
    by_encoder, tokens = {key: dict(vectors) for key, vectors in emb.by_encoder.items()}, dict(emb.tokens)
    if name is not None:
        if len(emb.concepts) != 1:
            raise ValueError(f"--name renames a single concept, but {input_path} holds {len(emb.concepts)}: "
                             f"{', '.join(emb.concepts)}")
        (old,) = emb.concepts
        by_encoder = {key: {name: vectors[old]} for key, vectors in by_encoder.items()}
        tokens = {name: tokens[old] if name == old else None}
    if to == "official" and any(token is None for token in tokens.values()):
        lookup = single_token_lookup(tokenizer)
        for string in tokens:
            tokens[string] = tokens[string] if tokens[string] is not None else lookup(string)
            if tokens[string] is None:
                raise ValueError(f"{string!r} is not a single {tokenizer} token, so it cannot be an official "
                                 "placeholder; pass --name with one (e.g. --name '*')")
    if to == "diffusers" and not emb.multi_encoder:  # an SDXL file is refused by save_embedding_file
        lookup = single_token_lookup(tokenizer)
        for string in tokens:
            if lookup(string) is not None:  # diffusers refuses to add a token the tokenizer already has
                print(f"note: {string!r} is already a word of the tokenizer; diffusers will load this file only "
                      f"with load_textual_inversion(path, token='<new-token>'), or convert again with --name "
                      f"'<my-concept>'", file=sys.stderr)
    vectors = by_encoder if emb.multi_encoder else by_encoder[None]
    save_embedding_file(output_path, vectors, tokens=tokens, name=name or emb.name, step=emb.step, fmt=to)
    return emb


def convert_xti(xti, input_path, output_path, to, name, tokenizer, target, model_family):
    """An XTI file to our official layout or kohya's; other formats have no per-layer layout."""
    if to not in XTI_FORMATS:
        raise ValueError(f"{describe_xti(input_path, xti.layers)}; it converts to {' or '.join(XTI_FORMATS)} "
                         f"only ({to} has one vector set per concept).")
    widths = (next(iter(xti.vectors.values())).shape[-1],)
    if target is not None:
        check_family(input_path, widths, target, f"--model_family {model_family}")
    vectors, tokens = dict(xti.vectors), dict(xti.tokens)
    if name is not None:
        if len(vectors) != 1:
            raise ValueError(f"--name renames a single concept, but {input_path} holds {len(vectors)}: "
                             f"{', '.join(vectors)}")
        (old,) = vectors
        vectors, tokens = {name: vectors[old]}, {name: tokens[old] if name == old else None}
    if to == "official":
        lookup = single_token_lookup(tokenizer or FAMILY_TOKENIZERS.get(widths, "clip"))
        for string in tokens:
            tokens[string] = tokens[string] if tokens[string] is not None else lookup(string)
            if tokens[string] is None:
                raise ValueError(f"{string!r} is not a single token, so it cannot be an official placeholder; "
                                 "pass --name with one (e.g. --name '*')")
    save_xti_file(output_path, vectors, xti.layers, tokens=tokens, name=name or xti.name, step=xti.step, fmt=to)
    return SimpleNamespace(format=xti.format, family=f"{describe_widths(widths)}, XTI {len(xti.layers)} layers")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="embedding file in any supported format")
    parser.add_argument("--output", required=True, help="file to write")
    parser.add_argument("--to", required=True, choices=FORMATS + ("kohya-xti",),
                        help="output format (an XTI file: official or kohya-xti)")
    parser.add_argument("--name", default=None, help="new name / placeholder string for the concept")
    parser.add_argument("--tokenizer", choices=("clip", "bert"), default=None,
                        help="tokenizer giving placeholder token ids for the official format (default: the one of "
                             "the file's family: clip for SD v1, SD 2.x and SDXL, bert for LDM-1.4B)")
    parser.add_argument("--model_family", choices=sorted(FAMILY_NAMES), default=None,
                        help="the model the output is for: refuse a file made for another family")
    args = parser.parse_args(argv)
    try:
        source = convert(args.input, args.output, args.to, args.name, args.tokenizer, args.model_family)
    except (ValueError, OSError) as err:
        print(f"convert_embedding: {user_error_message(err) or err}", file=sys.stderr)
        return 1
    print(f"Converted {args.input} ({source.format}, {source.family}) -> {args.output} ({args.to})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
