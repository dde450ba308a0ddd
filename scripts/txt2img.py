"""Text-to-image with the LDM-1.4B (LAION-400M) model and learned embeddings, e.g.

    python scripts/txt2img.py --ddim_eta 0.0 --n_samples 8 --n_iter 2 --scale 10.0 --ddim_steps 50 \
        --embedding_path logs/<run>/checkpoints/embeddings.pt --ckpt models/ldm/text2img-large/model.ckpt \
        --prompt "a photo of *"
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from ldm.cli_checks import checked_parser, run_cli  # noqa: E402
from ldm.txt2img_common import build_parser, main as run  # noqa: E402


def main(argv=None):
    parser = build_parser(
        "LDM-1.4B text-to-image sampling (256 px)",
        config="configs/latent-diffusion/txt2img-1p4B-eval_with_tokens.yaml",
        ckpt="models/ldm/text2img-large/model.ckpt",
        H=256, W=256, ddim_steps=200, n_iter=1, n_samples=4, scale=5.0, precision="full")
    # The original script named the checkpoint flag --ckpt_path.
    parser.add_argument("--ckpt_path", dest="ckpt", help=argparse.SUPPRESS)
    return run(checked_parser(parser), argv)


if __name__ == "__main__":
    run_cli(main)
