"""scripts/benchmark_ti.py on the tiny LDM: the report's shape and the work each variant does (FLOPs, not timings)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny/finetune-tiny.yaml")


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark_ti = load_script("benchmark_ti")


def run_tiny(tmp_path, *extra):
    torch.set_num_threads(1)
    out = tmp_path / "bench.json"
    benchmark_ti.main(["--config", TINY, "--size", "32", "--steps", "1", "--device", "cpu", "--threads", "1",
                       "--matmul_size", "64", "--json", str(out), *extra])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_tiny(tmp_path_factory.mktemp("bench"))


def test_json_has_every_variant_with_positive_times_and_flops(report):
    assert set(report["variants"]) == set(benchmark_ti.VARIANTS)
    for r in report["variants"].values():
        assert r["seconds_per_step"] > 0 and len(r["step_times"]) == 1
        assert r["flops_per_step"] > 0 and r["achieved_gflops"] > 0
        assert r["peak_memory_mib"] is None  # not measurable on CPU
    assert report["matmul_gflops"]["fp32"] > 0 and report["matmul_gflops"]["bf16"] > 0
    assert report["matmul_sizes"] == {"fp32": 64, "bf16": 64}  # capped by --matmul_size
    s = report["speedup"]
    assert s["ours_vs_no_cache"] == pytest.approx(
        report["variants"]["ours_no_cache"]["seconds_per_step"] / report["variants"]["ours"]["seconds_per_step"])
    assert report["size"] == 32 and report["precision"] == "fp32"


def test_latent_cache_skips_the_first_stage_encoder(report):
    v = report["variants"]
    assert v["ours_no_cache"]["flops_per_step"] > v["ours"]["flops_per_step"]
    # the diffusers-style loop runs the same networks as ours without the cache: the same FLOPs exactly
    assert v["diffusers_style"]["flops_per_step"] == v["ours_no_cache"]["flops_per_step"]


def test_cpu_attention_is_counted():
    benchmark_ti._register_cpu_attention_flops()
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    with benchmark_ti.FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    assert counter.get_total_flops() > 0


def test_bf16_with_gradient_checkpointing_recomputes_the_forward(tmp_path, report):
    checkpointed = run_tiny(tmp_path, "--precision", "bf16", "--gradient_checkpointing", "on")
    assert checkpointed["precision"] == "bf16" and "bf16" in checkpointed["matmul_gflops"]
    for name in benchmark_ti.VARIANTS:
        assert checkpointed["variants"][name]["flops_per_step"] > report["variants"][name]["flops_per_step"]


def test_gradient_checkpointing_switch_reaches_every_block():
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    unet = instantiate_from_config(OmegaConf.load(TINY).model.params.unet_config)
    benchmark_ti.set_gradient_checkpointing(unet, True)
    blocks = [m for m in unet.modules() if isinstance(m, benchmark_ti.BasicTransformerBlock)]
    assert blocks and all(b.checkpoint for b in blocks)
    benchmark_ti.set_gradient_checkpointing(unet, False)
    assert not any(getattr(m, "use_checkpoint", False) for m in unet.modules())
    assert not any(b.checkpoint for b in blocks)


def test_rejects_zero_warmup():
    with pytest.raises(SystemExit):
        benchmark_ti.parse_args(["--warmup", "0"])


def test_diffusers_style_step_trains_only_the_placeholder_row_and_restores_the_encoder():
    torch.set_num_threads(1)
    model = benchmark_ti.build_model(TINY, torch.device("cpu"), seed=0)
    with torch.no_grad():  # the UNet's output layers start at zero; perturb so that gradients reach the text
        for p in model.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = benchmark_ti.make_batch(model, 32, 2, torch.device("cpu"), seed=0)
    placeholder_id = next(iter(model.embedding_manager.string_to_token_dict.values())).item()
    with benchmark_ti.trainable_token_embedding(model.cond_stage_model) as (weight, original):
        benchmark_ti.diffusers_style_step(model, weight, original)(batch, benchmark_ti.nullcontext)
        changed = (weight != original).any(dim=1).nonzero().flatten().tolist()
    assert changed == [placeholder_id]
    weight = model.cond_stage_model.token_embedding.weight
    assert torch.equal(weight, original) and not weight.requires_grad
