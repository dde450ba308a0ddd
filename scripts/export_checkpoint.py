"""Turn a Lightning training checkpoint into a small weights file in the official key layout.

    python scripts/export_checkpoint.py --ckpt logs/<run>/checkpoints/last.ckpt --out models/toy/shapes-ldm.safetensors \
        --ema --half --drop loss. model_ema. embedding_manager.

--ema copies the EMA weights (`model_ema.*`) into `model.diffusion_model.*` first, which is what sampling wants.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm.checkpoint import load_state_dict, save_state_dict  # noqa: E402


def apply_ema(sd):
    """Replace each `model.X` weight by its EMA shadow `model_ema.<X without dots>`."""
    shadows = {k[len("model_ema."):]: v for k, v in sd.items() if k.startswith("model_ema.")}
    replaced = 0
    for k in list(sd):
        if k.startswith("model.") and k[len("model."):].replace(".", "") in shadows:
            sd[k] = shadows[k[len("model."):].replace(".", "")]
            replaced += 1
    if not replaced:
        raise SystemExit("--ema: the checkpoint has no model_ema.* weights (was use_ema on?)")
    return replaced


def export(ckpt, out, ema=False, half=False, drop=()):
    sd = load_state_dict(ckpt)
    if ema:
        print(f"copied {apply_ema(sd)} EMA weights into the model")
    sd = {k: v for k, v in sd.items() if not any(k.startswith(p) for p in drop)}
    if half:  # network weights only: the noise schedule and scale factor keep full precision
        nets = ("model.", "first_stage_model.", "cond_stage_model.", "conditioner.", "encoder.", "decoder.",
                "quant_conv.", "post_quant_conv.")
        sd = {k: v.half() if v.is_floating_point() and k.startswith(nets) else v for k, v in sd.items()}
    save_state_dict(sd, out)
    size = os.path.getsize(out) / 2 ** 20
    print(f"wrote {out}: {len(sd)} tensors, {size:.1f} MiB")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint (or any weights file)")
    p.add_argument("--out", required=True, help="output .safetensors or .ckpt")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of the diffusion model")
    p.add_argument("--half", action="store_true", help="store floating-point weights as float16 (halves the size)")
    p.add_argument("--drop", nargs="*", default=["loss.", "model_ema.", "embedding_manager."],
                   help="key prefixes to leave out (default: loss. model_ema. embedding_manager.)")
    opt = p.parse_args(argv)
    export(opt.ckpt, opt.out, opt.ema, opt.half, opt.drop)


if __name__ == "__main__":
    main()
