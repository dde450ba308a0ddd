"""scripts/evaluate_toy_base.py on the shipped toy model: any sampler, the 12-combination subset."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "models/toy/shapes-ldm.safetensors"


@pytest.mark.skipif(not CKPT.is_file(), reason="the toy model is not in this checkout")
def test_half_subset_with_a_k_sampler(tmp_path):
    spec = importlib.util.spec_from_file_location("evaluate_toy_base", ROOT / "scripts/evaluate_toy_base.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "base.json"
    mean = script.main(["--sampler", "dpmpp_2m_karras", "--ddim_steps", "2", "--n_samples", "1", "--half",
                        "--json", str(out)])
    report = json.loads(out.read_text())
    prompts = [row["prompt"] for row in report["prompts"]]
    assert len(prompts) == 12 and "a photo of a red circle" in prompts and "a photo of a red square" not in prompts
    assert {p.split()[-1] for p in prompts} == {"circle", "square", "triangle", "cross"}
    assert report["settings"]["sampler"] == "dpmpp_2m_karras" and set(mean) == {"colour", "shape", "both"}
    assert all(0 <= v <= 1 for v in mean.values())
