"""Text-to-image with Stable Diffusion (v1 by default; SD 2.x and SDXL with their --config) and learned
embeddings, e.g.

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
    parser = build_parser("Stable Diffusion text-to-image sampling: SD v1 by default (512 px); SD 2.x and SDXL "
                          "with their --config (e.g. configs/stable-diffusion/v2-inference.yaml) and --H/--W")
    return run(checked_parser(parser), argv)


if __name__ == "__main__":
    run_cli(main)
