"""Text-to-image with Stable Diffusion v1 and learned embeddings, e.g.

    python scripts/stable_txt2img.py --ddim_eta 0.0 --n_samples 8 --n_iter 2 --scale 10.0 --ddim_steps 50 \
        --embedding_path logs/<run>/checkpoints/embeddings.pt --ckpt models/ldm/stable-diffusion-v1/model.ckpt \
        --prompt "a photo of *"
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from ldm.cli_checks import checked_parser, run_cli  # noqa: E402
from ldm.txt2img_common import build_parser, main as run  # noqa: E402


def main(argv=None):
    parser = build_parser("Stable Diffusion v1 text-to-image sampling (512 px, config + checkpoint)")
    return run(checked_parser(parser), argv)


if __name__ == "__main__":
    run_cli(main)
