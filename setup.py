from setuptools import find_packages, setup

setup(
    name="textual-inversion",
    version="0.2.0",
    description="Textual Inversion (Gal et al. 2022) on CompVis latent diffusion, on today's PyTorch stack",
    packages=find_packages(include=["ldm", "ldm.*", "evaluation", "evaluation.*"]),
    py_modules=["main", "merge_embeddings"],
    python_requires=">=3.9",
    # torch is deliberately unpinned and never pulled with torchvision: install the build you need first
    # (`pip install torch==2.13.0` for the CPU build the Makefile uses).
    install_requires=[
        "torch>=2.5",  # torch.serialization.safe_globals; public state_dict hooks
        "pytorch-lightning>=2.2",
        "transformers>=4.35",  # transformers.modeling_attn_mask_utils (4.x); CI tests the floor: make test-floor
        "omegaconf>=2.3",
        "safetensors>=0.4",
        "ftfy>=6.1",
        "regex",
        "einops>=0.6",
        "tqdm",
        "pillow>=9.1",
        "numpy",
        "pyyaml",
    ],
    extras_require={
        # torchsde: only so that diffusers' DPMSolverSDEScheduler imports, for the sampler comparison test
        "test": ["pytest>=7", "diffusers>=0.30", "torchsde>=0.2.5"],
        "tensorboard": ["tensorboard>=2.14"],
        "wandb": ["wandb>=0.16"],
    },
)
