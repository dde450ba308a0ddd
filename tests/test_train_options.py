"""main.py's options as AUTOMATIC1111, diffusers and kohya users know them (ldm/train_options.py), each run
through the real main.py on the tiny LDM: learning-rate schedules read back from the run's logged rate,
--save_every_n_steps and the .safetensors beside embeddings.pt, validation and negative prompts in the image
log, caption files, templates, --learnable_property and --crop, the progress and the final line."""
import csv
import glob
import re

import pytest
import torch
from diffusers.optimization import get_scheduler

import main as entry
from ldm.data import personalized, personalized_style
from ldm.lr_scheduler import LambdaPeerScheduler, LambdaStepScheduler
from ldm.modules.embedding_io import load_embedding_file
from test_main import CONFIG, NO_IMAGES, embedding, run_args, run_dir


def logged_rates(run):
    """{step: learning rate} from the run's CSV log (LearningRateMonitor, every step)."""
    (metrics,) = glob.glob(str(run / "csv" / "*" / "metrics.csv"))
    with open(metrics) as f:
        return {int(row["step"]): float(row["lr-AdamW"]) for row in csv.DictReader(f) if row.get("lr-AdamW")}


def diffusers_multipliers(name, steps, **kwargs):
    """diffusers' own schedule (get_scheduler) as multipliers of the base rate, for steps 0..steps-1."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler(name, optimizer, **kwargs)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_peer_schedules_equal_diffusers_own(name):
    ours = LambdaPeerScheduler(name, warmup_steps=0 if name == "constant" else 10, total_steps=100)
    expected = diffusers_multipliers(name, 100, num_warmup_steps=10, num_training_steps=100)
    assert [ours(n) for n in range(100)] == pytest.approx(expected, abs=1e-12)


def test_a1111_step_syntax_equals_diffusers_piecewise_constant():
    """'0.005:100, 1e-3:1000, 1e-5': the webui's rates; diffusers' piecewise_constant takes multipliers."""
    ours = LambdaStepScheduler("0.005:100, 1e-3:1000, 1e-5")
    expected = diffusers_multipliers("piecewise_constant", 1200, step_rules="1:100,0.2:1000,0.002")
    assert [ours(n) for n in range(1200)] == pytest.approx(expected, rel=1e-12)
    assert [LambdaStepScheduler("0.01:5, 0.001:-1")(n) for n in (4, 5, 10 ** 6)] == pytest.approx([1, 0.1, 0.1])
    for bad in ("fast", "0.005:100, 1e-3:50", "-1", "0.005:x", "0.01:0, 0.001"):
        with pytest.raises(ValueError, match="learning rate"):
            LambdaStepScheduler(bad)


def test_cosine_with_warmup_in_a_real_run(tmp_path, concept_dir, tiny_ckpt, capsys):
    entry.main(run_args(tmp_path / "logs", tiny_ckpt, concept_dir, NO_IMAGES, "--max_steps", "6",
                        "--log_every_n_steps", "1", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2"))
    base = 0.005 * 2  # finetune-tiny's base_learning_rate, scaled by its batch size 2 (--scale_lr is on)
    expected = diffusers_multipliers("cosine", 6, num_warmup_steps=2, num_training_steps=6)
    rates = logged_rates(run_dir(tmp_path / "logs"))
    assert [rates[n] for n in range(6)] == pytest.approx([base * m for m in expected], rel=1e-6)
    out = capsys.readouterr().out
    assert ("Learning rate 0.01 = base 0.005 x 2 (--scale_lr: 2 batch size x 1 devices x 1 accumulated batches; "
            "--scale_lr false uses the base rate as it is), schedule: cosine after 2 warm-up steps from 0, "
            "decaying to 0 at step 6.") in out


def test_a1111_learning_rate_ends_the_run_at_its_last_step(tmp_path, concept_dir, tiny_ckpt, capsys):
    args = run_args(tmp_path / "logs", tiny_ckpt, concept_dir, NO_IMAGES, "--log_every_n_steps", "1",
                    "--learning_rate", "0.02:2, 0.004:5", "--scale_lr", "false")
    trainer = entry.main(args)
    assert trainer.global_step == 5  # the config's max_steps (20) gives way to the schedule's end, as in the webui
    rates = logged_rates(run_dir(tmp_path / "logs"))
    assert [rates[n] for n in range(5)] == pytest.approx([0.02, 0.02, 0.004, 0.004, 0.004], rel=1e-6)
    assert "Learning rate 0.02 (the base rate, not scaled: --scale_lr false), schedule: steps '0.02:2, 0.004:5'" \
        in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [
    (["--lr_scheduler", "cosine", "--max_steps", "-1"], "the cosine schedule decays to 0 at the last step"),
    (["--lr_warmup_steps", "5"], "--lr_warmup_steps needs --lr_scheduler"),
    (["--lr_warmup_steps", "5", "--lr_scheduler", "constant"], "use constant_with_warmup"),
    (["--learning_rate", "0.01:5, 0.001", "--lr_scheduler", "constant"], "a schedule of its own"),
    (["--learning_rate", "quick"], "--learning_rate: learning rate 'quick'"),
    (["--save_every_n_steps", "0"], "--save_every_n_steps 0"),
    (["--validation_prompts_file", "missing.txt"], "--validation_prompts_file missing.txt not found"),
])
def test_bad_options_are_one_line_errors(tmp_path, concept_dir, tiny_ckpt, flags, message):
    with pytest.raises(entry.UsageError, match=re.escape(message)):
        entry.main(run_args(tmp_path / "logs", tiny_ckpt, concept_dir, *flags))
    assert not (tmp_path / "logs").exists()


def test_save_every_n_steps_safetensors_progress_and_last_line(tmp_path, concept_dir, tiny_ckpt, capsys):
    entry.main(run_args(tmp_path / "logs", tiny_ckpt, concept_dir, NO_IMAGES, "--max_steps", "4",
                        "--save_every_n_steps", "2"))
    ckpts = run_dir(tmp_path / "logs") / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("embeddings_gs-*.pt")) == ["embeddings_gs-2.pt", "embeddings_gs-4.pt"]
    # the AUTOMATIC1111 layout ({"emb_params"}), the vectors of embeddings.pt
    peer = load_embedding_file(ckpts / "embeddings.safetensors")
    assert peer.format == "a1111-safetensors"
    assert torch.equal(next(iter(peer.vectors.values())), embedding(ckpts / "embeddings.pt"))
    out = capsys.readouterr().out
    assert re.search(r"step 2/4 \(50%\), [\d.]+ s/step, 0m \d\ds left", out)
    assert (f"Embeddings: {ckpts / 'embeddings.pt'} and {ckpts / 'embeddings.safetensors'}; image log: none written"
            in out)


def test_validation_and_negative_prompts_in_the_image_log(tmp_path, concept_dir, tiny_ckpt):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of * on a beach\n\n")
    trainer = entry.main(run_args(tmp_path / "logs", tiny_ckpt, concept_dir, "--max_steps", "2",
                                  "--validation_prompt", "a red circle", "--validation_prompts_file", str(prompts),
                                  "--validation_steps", "2", "--negative_prompt", "a blue square"))
    images = run_dir(tmp_path / "logs") / "images" / "train"
    names = sorted(p.name.split("_gs-")[0] for p in images.glob("samples*_gs-000002_*.jpg"))
    assert names == ["samples", "samples_scaled", "samples_validation_0", "samples_validation_1"]
    logger = next(c for c in trainer.callbacks if isinstance(c, entry.ImageLogger))
    assert logger.log_images_kwargs["validation_prompts"] == ["a red circle", "a photo of * on a beach"]
    assert logger.log_images_kwargs["negative_prompt"] == "a blue square"

    # the preview's negative prompt is the unconditional side of guidance; "" is the default
    model, batch = trainer.lightning_module, next(iter(trainer.datamodule.train_dataloader()))

    def preview(**kwargs):
        torch.manual_seed(0)
        return model.log_images(batch, N=1, ddim_steps=2, return_keys=["samples_scaled"], **kwargs)["samples_scaled"]

    default, empty, negative = preview(), preview(negative_prompt=""), preview(negative_prompt="a blue square")
    assert torch.equal(default, empty) and not torch.allclose(default, negative)


def test_captions_templates_and_crop_reach_the_training_run(tmp_path, concept_dir, tiny_ckpt):
    (concept_dir / "concept_0.txt").write_text("a magenta * on black\n")
    (concept_dir / "concept_1.txt").write_text("drawn with a ruler")
    templates = tmp_path / "templates.txt"
    templates.write_text("a sketch of {}\n\na poster of {}\n")
    trainer = entry.main(run_args(tmp_path / "logs", tiny_ckpt, concept_dir, NO_IMAGES, "--max_steps", "1",
                                  "--placeholder_string", "@", "--templates", str(templates), "--crop", "random"))
    dataset = trainer.datamodule.datasets["train"]
    captions = {dataset[i]["caption"] for i in range(30)}
    assert captions == {"a magenta @ on black", "@ drawn with a ruler", "a sketch of @", "a poster of @"}
    assert dataset.crop == "random" and "|" in dataset[0]["cache_key"].rsplit(".png|", 1)[1]


def test_learnable_property_picks_the_style_templates(tmp_path, concept_dir, tiny_ckpt):
    trainer = entry.main(run_args(tmp_path / "logs", tiny_ckpt, concept_dir, NO_IMAGES, "--max_steps", "1",
                                  "--learnable_property", "style", "--caption_extension", "none"))
    dataset = trainer.datamodule.datasets["train"]
    styles = {t.format("*") for t in personalized_style.imagenet_style_templates_small}
    assert {dataset[i]["caption"] for i in range(20)} <= styles
    assert dataset.templates is personalized_style.imagenet_style_templates_small
    assert trainer.datamodule.datasets["train"].caption_extension is None
    objects = personalized.PersonalizedBase(str(concept_dir), learnable_property="object")
    assert objects.templates is personalized.imagenet_templates_small


def test_config_keys_are_what_the_flags_write(tmp_path):
    """The flags are config keys: the same run from YAML alone gets the same settings."""
    opt, _ = entry.get_parser().parse_known_args(["--lr_scheduler", "linear", "--lr_warmup_steps", "3",
                                                  "--save_every_n_steps", "7", "--crop", "none",
                                                  "--caption_extension", "caption", "--background", "#102030"])
    config = entry.OmegaConf.load(CONFIG)
    lightning = config.pop("lightning")
    options = entry.trainer_options(opt, lightning)
    entry.apply_training_options(opt, config, lightning, options)
    assert config.model.params.scheduler_config == {
        "target": "ldm.lr_scheduler.LambdaPeerScheduler",
        "params": {"name": "linear", "warmup_steps": 3, "total_steps": 20}}
    assert lightning.modelcheckpoint.params.every_n_train_steps == 7
    assert config.data.params.train.params.crop == config.data.params.validation.params.crop == "none"
    assert config.data.params.train.params.caption_extension == ".caption"
    assert list(config.data.params.train.params.background) == [16, 32, 48]
    opt, _ = entry.get_parser().parse_known_args(["--background", "0,128,255"])
    entry.apply_training_options(opt, config, lightning, options)
    assert list(config.data.params.validation.params.background) == [0, 128, 255]
    opt, _ = entry.get_parser().parse_known_args(["--background", "ultraviolet"])
    with pytest.raises(entry.OptionError, match="--background 'ultraviolet'"):
        entry.apply_training_options(opt, config, lightning, options)
