"""Milliseconds per training step of the toy model: ordinary textual inversion (one vector set for every layer)
against XTI (one set per cross-attention layer, the toy default), the rest of the recipe the same.

    OMP_NUM_THREADS=1 python scripts/time_xti_step.py --steps 40

Both models load the toy checkpoint and train `*` on one benchmark concept's images, batch 8 as the recipe
does: LatentDiffusion.shared_step (what training_step runs), backward, AdamW on the embedding vectors. The two
alternate in blocks of 5 steps in one process, so a busy machine slows both alike; the median step is reported.
"""
import argparse
import os
import statistics
import sys
import time

import torch
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ldm.checkpoint import load_model_from_config  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

# high-noise-only.yaml also draws t from [700, 1000) only, which does not change a step's cost
RECIPES = {"ordinary": ["configs/toy/finetune-shapes.yaml", "configs/toy/recipes/high-noise-only.yaml"],
           "xti": ["configs/toy/finetune-shapes.yaml"]}


def build(paths, ckpt, data_root):
    config = OmegaConf.merge(*(OmegaConf.load(os.path.join(ROOT, p)) for p in paths))
    model = load_model_from_config(config, ckpt, verbose=False).train()
    data = config.data.params
    dataset = instantiate_from_config({"target": data.train.target,
                                       "params": {**data.train.params, "data_root": data_root}})
    batch = torch.utils.data.default_collate([dataset[i] for i in range(data.batch_size)])
    optimizer = torch.optim.AdamW(list(model.embedding_manager.embedding_parameters()), lr=5e-3)
    return model, batch, optimizer


def step(model, batch, optimizer):
    start = time.perf_counter()
    loss, _ = model.shared_step(batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="timed steps per recipe")
    p.add_argument("--ckpt", default=os.path.join(ROOT, "models/toy/shapes-ldm.safetensors"))
    p.add_argument("--data_root", default=os.path.join(ROOT, "data/concepts/magenta-triangle-large-top"))
    opt = p.parse_args(argv)
    torch.manual_seed(0)
    runs = {name: build(paths, opt.ckpt, opt.data_root) for name, paths in RECIPES.items()}
    for run in runs.values():  # warm up: caches, allocator
        step(*run), step(*run)
    times = {name: [] for name in runs}
    while len(times["xti"]) < opt.steps:
        for name, run in runs.items():
            times[name] += [step(*run) for _ in range(5)]
    for name, values in times.items():
        print(f"{name}: {1000 * statistics.median(values):.1f} ms/step (median of {len(values)}, "
              f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})")
    print(f"xti / ordinary: {statistics.median(times['xti']) / statistics.median(times['ordinary']):.2f}")


if __name__ == "__main__":
    main()
