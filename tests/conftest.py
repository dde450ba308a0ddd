"""Shared fixtures: the tiny configs, a tiny random checkpoint in the official layout, a concept folder.

Every test runs with the network cut off: a socket connection to anything but loopback fails loudly.
"""
import importlib.util
import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# tiny models on a shared 2-core machine: one thread each is fastest (measured: 17 s vs 140 s for the script tests)
os.environ.setdefault("OMP_NUM_THREADS", "1")


class NetworkBlocked(RuntimeError):
    pass


_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if self.family == socket.AF_UNIX or host in ("127.0.0.1", "localhost", "::1"):
        return _real_connect(self, address)
    raise NetworkBlocked(f"test tried to reach the network: {address!r}")


@pytest.fixture(autouse=True, scope="session")
def _no_network():
    socket.socket.connect = _guarded_connect
    yield
    socket.socket.connect = _real_connect


@pytest.fixture(scope="session")
def tiny_config():
    from omegaconf import OmegaConf
    return OmegaConf.load(ROOT / "configs/tiny/txt2img-tiny.yaml")


@pytest.fixture(scope="session")
def tiny_finetune_config_path():
    return ROOT / "configs/tiny/finetune-tiny.yaml"


def build_tiny_model(config, seed=0):
    """A randomly initialised tiny LatentDiffusion whose UNet output depends on its inputs.

    The UNet's output layers start at zero (as in the original); a small random perturbation makes the
    untrained network a non-trivial function of the text, so that gradients reach the embeddings.
    """
    import torch
    from ldm.util import instantiate_from_config
    torch.manual_seed(seed)
    model = instantiate_from_config(config.model)
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_config):
    from ldm.checkpoint import save_state_dict
    model = build_tiny_model(tiny_config)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("embedding_manager.")}
    path = tmp_path_factory.mktemp("tiny_ckpt") / "tiny-ldm.safetensors"
    save_state_dict(sd, str(path))
    return path


def write_concept_images(folder, n=3, size=32):
    """n small PNGs of a magenta triangle at slightly different places."""
    from PIL import Image, ImageDraw
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), "black")
        x, y = 4 + 2 * i, 2 + i
        ImageDraw.Draw(img).polygon([(x + 10, y), (x, y + 18), (x + 20, y + 18)], fill=(255, 0, 255))
        img.save(folder / f"concept_{i}.png")
    return folder


@pytest.fixture
def concept_dir(tmp_path):
    return write_concept_images(tmp_path / "concept")


def load_script(name):
    """scripts/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
