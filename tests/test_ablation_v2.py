"""scripts/ablation_v2.py: the paper's ablation on world v2 (recipes, a real two-variant run, the table and plot)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import load_script
from ldm.data.shapes_v2 import CONCEPTS

ROOT = Path(__file__).resolve().parents[1]
V2_CKPT = ROOT / "models/toy/shapes-v2-ldm.safetensors"


def merged(recipe):
    ablation = load_script("ablation_v2")
    return OmegaConf.merge(*(OmegaConf.load(ROOT / p) for p in recipe + [ablation.V2_OVERLAY]))


def test_each_variant_changes_what_the_paper_changes():
    ablation = load_script("ablation_v2")
    variants = {name: merged(recipe) for name, _, recipe in ablation.VARIANTS}
    base = variants["original"]
    manager = lambda c: c.model.params.personalization_config  # noqa: E731
    assert manager(base).target == "ldm.modules.embedding_manager.EmbeddingManager"
    assert manager(base).params.num_vectors_per_token == 1 and base.model.params.min_timestep == 0
    assert base.model.params.unet_config.params.position_input  # the v2 model's UNet
    assert manager(variants["two-vectors"]).params.num_vectors_per_token == 2
    progressive = manager(variants["progressive"]).params
    assert progressive.progressive_words and progressive.num_vectors_per_token == 3
    per_image = variants["per-image-tokens"]
    words = list(manager(per_image).params.per_image_tokens)
    assert len(words) >= 5 and words == list(per_image.data.params.train.params.per_image_tokens)
    assert variants["bigger-lr"].model.base_learning_rate == 4 * base.model.base_learning_rate
    assert base.model.params.embedding_reg_weight == 0
    assert variants["regulariser"].model.params.embedding_reg_weight > 0
    assert manager(variants["xti"]).target == "ldm.modules.xti.XTIEmbeddingManager"
    v1_default = variants.pop("toy-v1-default")  # compared as it is, not as one change
    assert manager(v1_default).params.num_vectors_per_token == 48 and v1_default.model.params.min_timestep == 700
    # nothing else differs from the original's recipe
    for name, config in variants.items():
        assert config.data.params.batch_size == base.data.params.batch_size, name
        assert config.model.params.parameterization == "v", name


def test_per_image_tokens_are_single_tokens_of_the_toy_text_encoder():
    from ldm.util import instantiate_from_config
    config = merged([*load_script("ablation_v2").BASE, "configs/toy/recipes/per-image-tokens.yaml"])
    encoder = instantiate_from_config(config.model.params.cond_stage_config)
    for word in config.model.params.personalization_config.params.per_image_tokens:
        assert len(encoder.string_to_token_ids(word)) == 1, word


def test_unknown_variant_is_refused():
    result = subprocess.run([sys.executable, "scripts/ablation_v2.py", "--variants", "original,lora"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "unknown lora" in result.stderr


@pytest.mark.skipif(not V2_CKPT.is_file(), reason="the v2 toy model is not in this checkout")
def test_two_variants_end_to_end_and_the_table(tmp_path):
    """Real main.py training (2 steps) of the per-image-tokens and progressive variants on one concept, sampled
    and scored by the benchmark, then summed up: table rows for both and for the two references, and the plot."""
    concept = CONCEPTS[1]
    out = tmp_path / "ablation"
    cmd = [sys.executable, "scripts/ablation_v2.py", "--variants", "per-image-tokens,progressive",
           "--concepts", concept.name, "--max_steps", "2", "--n_samples", "2", "--ddim_steps", "2",
           "--curve_every", "1", "--jobs", "2", "--outdir", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    logs = "".join(p.read_text()[-2000:] for p in out.glob("*.log"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + logs
    table = (out / "ablation.md").read_text()
    for row in ("per-image-tokens", "progressive", "init: init word", "human: human captions"):
        assert row in table
    numbers = json.loads((out / "ablation.json").read_text())
    assert set(numbers["variants"]) == {"per-image-tokens", "progressive"}
    for row in list(numbers["variants"].values()) + list(numbers["references"].values()):
        assert row["concepts"] == [concept.name]
        assert all(0.0 <= row["mean"][axis] <= 1.0 for axis in ("reconstruction", "editability"))
        # reconstruction needs all three identity attributes, so it is at most the rarest one's rate
        assert row["mean"]["reconstruction"] <= min(row["mean"][a] for a in ("hue", "pattern", "shape")) + 1e-9
    assert "hue / pattern / shape kept" in table
    # the per-image-tokens run learned its extra words too, and the benchmark scored "*" alone
    per_image = json.loads((out / "per-image-tokens" / concept.name / "result.json").read_text())
    assert per_image["learned"]["prompts"][0]["prompt"] == "a photo of *"
    saved = torch.load(Path(per_image["run"]) / "checkpoints" / "embeddings.pt", weights_only=True)
    assert list(saved["string_to_param"]) == ["*", "@", "#", "$", "%", "&"]
    assert Image.open(out / "ablation.png").size == (820, 520)


def test_table_compares_variants_on_the_same_concepts(tmp_path):
    # The original's folder may hold a wider run (all twelve concepts); the table must average the asked ones only,
    # and leave out a variant that lacks any of them rather than average over fewer.
    ablation = load_script("ablation_v2")

    def result(name, rate):
        scores = {"reconstruction": rate, "editability": rate / 2, "identity_under_edits": rate,
                  "edits_obeyed": 1.0, "prompts": [{"rate_hue": rate, "rate_pattern": rate, "rate_shape": rate}]}
        return {"concept": name, "learned": scores, "init": scores, "human": scores}

    def write(variant, results):
        (tmp_path / variant).mkdir()
        (tmp_path / variant / "results.json").write_text(json.dumps({"concepts": results}))

    write("original", [result("a", 0.2), result("b", 0.4), result("c", 1.0)])
    write("two-vectors", [result("a", 0.6), result("b", 0.8)])
    write("xti", [result("a", 0.5)])
    opt = ablation.parse_args(["--outdir", str(tmp_path), "--concepts", "a,b"])
    rows, references = ablation.collect(opt)
    assert set(rows) == {"original", "two-vectors"}  # xti lacks concept b
    assert rows["original"]["mean"]["reconstruction"] == pytest.approx(0.3) and rows["original"]["n"] == 2
    assert rows["two-vectors"]["mean"]["editability"] == pytest.approx(0.35)
    assert rows["original"]["worst"]["reconstruction"] == ("a", 0.2)
    assert references["init"]["mean"]["reconstruction"] == pytest.approx(0.3)
