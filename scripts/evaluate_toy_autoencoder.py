"""Does a toy autoencoder keep what world v2's evaluator reads? Reconstruct validation images and score them.

    python scripts/evaluate_toy_autoencoder.py --ckpt models/toy/autoencoder-kl-f4-v2.safetensors
    python scripts/evaluate_toy_autoencoder.py --ckpt logs/<run>/checkpoints/last.ckpt --n 512

Prints the mean L1 (images in [-1, 1]) and, per attribute, the fraction of reconstructions the v2 evaluator
reads as the original's true value (and the fraction read wholly right). A base model cannot draw better than
its autoencoder decodes, so these rates bound every later score. Also prints the latent scale factor an LDM on
this autoencoder needs (1 / the std of posterior samples of the training split's first --n images, as the
original's scale_by_std measures on one batch).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluation.shapes_v2_eval import ATTRIBUTES, analyse_image, target_of  # noqa: E402
from ldm.config_trust import load_trusted_config  # noqa: E402
from ldm.data.shapes_v2 import ShapesV2Dataset  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402


def load_autoencoder(config, ckpt, trust=False):
    """The first stage the config describes (an autoencoder config, or an LDM config's first_stage_config),
    filled from ckpt (an exported .safetensors or a Lightning last.ckpt)."""
    params = load_trusted_config(config, trust).model
    if "first_stage_config" in params.params:
        params = params.params.first_stage_config
    params.params.lossconfig = {"target": "torch.nn.Identity"}
    params.params.ckpt_path = ckpt
    params.params.ignore_keys = ["loss."]
    return instantiate_from_config(params).eval()


@torch.no_grad()
def score(model, n, batch_size=64, seed=0):
    data = ShapesV2Dataset(length=n, seed=seed, set="val")
    l1, right, total = 0.0, {key: 0 for key in ATTRIBUTES + ("all",)}, 0
    for start in range(0, n, batch_size):
        indices = range(start, min(start + batch_size, n))
        x = torch.stack([torch.from_numpy(data[i]["image"]).permute(2, 0, 1) for i in indices])
        recon = model.decode(model.encode(x).mode()).clamp(-1, 1)
        l1 += (recon - x).abs().mean(dim=(1, 2, 3)).sum().item()
        for i, image in zip(indices, recon):
            truth, read = target_of(data.spec_and_caption(i)[0]), analyse_image(image)
            verdicts = [read[key] == truth[key] for key in ATTRIBUTES]
            for key, ok in zip(ATTRIBUTES, verdicts):
                right[key] += ok
            right["all"] += all(verdicts)
        total += len(indices)
    return {"l1": l1 / total, **{key: right[key] / total for key in right}, "scale_factor": latent_scale(model, n)}


@torch.no_grad()
def latent_scale(model, n, seed=0):
    data = ShapesV2Dataset(length=n, seed=seed, set="train")
    x = torch.stack([torch.from_numpy(data[i]["image"]).permute(2, 0, 1) for i in range(n)])
    z = model.encode(x).sample(generator=torch.Generator().manual_seed(seed))
    return 1.0 / z.flatten().std().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/toy/autoencoder-kl-f4-v2.yaml",
                   help="an autoencoder config or an LDM config (its first stage is used)")
    p.add_argument("--trust_config", action="store_true",
                   help="allow --config to name targets outside this project's modules (configs are code)")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--n", type=int, default=256, help="validation images")
    opt = p.parse_args(argv)
    for path in (opt.config, opt.ckpt):
        if not os.path.isfile(path):
            raise SystemExit(f"{path} not found")
    result = score(load_autoencoder(opt.config, opt.ckpt, opt.trust_config), opt.n)
    print(f"{opt.ckpt}: {opt.n} world-v2 validation images, L1 {result['l1']:.4f}; read right: "
          + "  ".join(f"{key} {result[key]:.3f}" for key in ATTRIBUTES + ("all",))
          + f"; latent scale factor {result['scale_factor']:.5f}")
    return result


if __name__ == "__main__":
    main()
