"""main.py end to end on the tiny LDM (CPU, a few steps), plus its data module and command-line handling."""
import glob
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

import main as entry
from ldm.checkpoint import load_checkpoint, load_state_dict
from ldm.data.datamodule import ResumableDataLoader, ResumableSampler, SeededItems

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/tiny/finetune-tiny.yaml")
NO_IMAGES = "lightning.callbacks.image_logger.params.disabled=true"


def run_args(logdir, ckpt, data_root, *extra):
    return ["--base", CONFIG, "-t", "--actual_resume", str(ckpt), "--data_root", str(data_root),
            "--init_word", "triangle", "-l", str(logdir), *extra]


def run_dir(logdir):
    (path,) = glob.glob(os.path.join(str(logdir), "*"))
    return Path(path)


def embedding(path, key="*"):
    return torch.load(path, weights_only=True)["string_to_param"][key]


# ------------------------------------------------------------------------------------------------ data module
class RandomCaptions(Dataset):
    """Items drawn from the global python/torch RNGs, as the personalized datasets draw captions and flips."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"i": i, "caption": random.random(), "flip": torch.rand(())}


def loader(batch_size=3):
    sampler = ResumableSampler(10, shuffle=True, seed=5)
    return ResumableDataLoader(SeededItems(RandomCaptions()), sampler=sampler, batch_size=batch_size,
                               generator=torch.Generator().manual_seed(5))


def consume(dl, epoch, n):
    """Take `n` batches of pass `epoch` as the training loop does, with one more fetched ahead."""
    for _ in range(epoch):
        list(dl.sampler)
    it = iter(dl)
    for _ in range(n):
        next(it)
        dl.batch_consumed()
    next(it, None)


def batches(dl, epoch):
    """The batches of pass `epoch` (the sampler counts passes: one per epoch)."""
    for _ in range(epoch):
        list(dl.sampler)
    return [torch.cat([b["i"].float(), b["caption"].float(), b["flip"]]) for b in dl]


def test_data_stream_depends_only_on_seed_epoch_and_position():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = batches(loader(), 1)
    assert torch.equal(torch.get_rng_state(), before), "iterating must not advance the global torch RNG"
    random.seed(123)
    torch.manual_seed(99)
    again = batches(loader(), 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], batches(loader(), 2)[0]), "each epoch has its own order"


def test_loader_resumes_mid_epoch_from_its_state():
    full = batches(loader(), 3)
    interrupted = loader()
    consume(interrupted, 3, 2)
    state = interrupted.state_dict()
    assert state == {"epoch": 3, "consumed_batches": 2}
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [torch.cat([b["i"].float(), b["caption"].float(), b["flip"]]) for b in resumed]
    assert len(rest) == len(full) - 2
    assert all(torch.equal(a, b) for a, b in zip(full[2:], rest))
    finished = loader()
    consume(finished, 3, 4)
    assert finished.state_dict() == {"epoch": 4, "consumed_batches": 0}
    # a checkpoint of a resumed run taken before it consumed anything keeps the position it resumed at
    fresh = loader()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state


# ------------------------------------------------------------------------------------------- command line
def test_trainer_flags_override_config_and_gpus_compat():
    opt, _ = entry.get_parser().parse_known_args(["--gpus", "0,", "--max_steps", "7", "--limit_val_batches", "0.5",
                                                  "--precision", "32"])
    lightning = entry.OmegaConf.create({"trainer": {"max_steps": 100, "benchmark": True, "accelerator": "ddp"}})
    options = entry.trainer_options(opt, lightning)
    assert options == {"max_steps": 7, "benchmark": True, "strategy": "ddp", "accelerator": "gpu", "devices": [0],
                       "limit_val_batches": 0.5, "precision": 32}
    assert lightning.trainer.max_steps == 7  # recorded in the run's lightning config


@pytest.mark.parametrize("problem", ["missing_data", "empty_data", "missing_weights", "missing_config"])
def test_clear_errors(problem, tmp_path, concept_dir, tiny_ckpt):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {
        "missing_data": run_args(tmp_path / "logs", tiny_ckpt, tmp_path / "nowhere"),
        "empty_data": run_args(tmp_path / "logs", tiny_ckpt, empty),
        "missing_weights": run_args(tmp_path / "logs", tmp_path / "model.ckpt", concept_dir),
        "missing_config": ["--base", str(tmp_path / "nope.yaml"), "-t", "--data_root", str(concept_dir)],
    }[problem]
    named = {"missing_data": "nowhere", "empty_data": "no images", "missing_weights": "model.ckpt",
             "missing_config": "nope.yaml"}[problem]
    with pytest.raises(entry.UsageError, match=named):
        entry.main(args)
    assert not (tmp_path / "logs").exists()


def test_multi_token_init_word_needs_enough_vectors(tmp_path, concept_dir, tiny_ckpt):
    args = run_args(tmp_path / "logs", tiny_ckpt, concept_dir, "--max_steps", "1", NO_IMAGES)
    args[args.index("triangle")] = "magenta triangle"
    with pytest.raises(entry.UsageError, match="num_vectors_per_token"):
        entry.main(args)
    entry.main(args + ["model.params.personalization_config.params.num_vectors_per_token=2"])
    assert embedding(run_dir(tmp_path / "logs") / "checkpoints/embeddings.pt").shape[0] == 2


# ------------------------------------------------------------------------------------------------- training

def test_training_run_writes_its_outputs_and_changes_only_the_embedding(tmp_path, concept_dir, tiny_ckpt):
    logs = tmp_path / "logs"
    trainer = entry.main(run_args(logs, tiny_ckpt, concept_dir, "--placeholder_string", "@", "--max_steps", "10",
                                  "--log_every_n_steps", "5", "-n", "test"))
    run = run_dir(logs)
    assert run.name.endswith("_test") and run.name.startswith("concept")
    ckpts = run / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    assert sorted(p.name for p in ckpts.glob("embeddings_gs-*.pt")) == ["embeddings_gs-10.pt"]
    assert len(list((run / "configs").glob("*-project.yaml"))) == 1
    assert len(list((run / "configs").glob("*-lightning.yaml"))) == 1
    assert list((run / "images" / "train").glob("*_gs-000010_*.jpg"))
    (metrics,) = glob.glob(str(run / "csv" / "*" / "metrics.csv"))
    assert "train/loss_simple" in open(metrics).readline()

    # the placeholder reached the captions of the dataset the trainer used, and the manager
    dataset = trainer.datamodule.datasets["train"]
    captions = [dataset[i]["caption"] for i in range(6)]
    assert all("@" in c and "*" not in c for c in captions), captions
    learned = embedding(ckpts / "embeddings.pt", "@")
    model = trainer.lightning_module
    assert not torch.allclose(learned, model.embedding_manager.initial_embeddings["@"].cpu())

    # nothing but the manager's vectors changed
    base = load_state_dict(str(tiny_ckpt))
    now = {k: v for k, v in model.state_dict().items() if not k.startswith("embedding_manager.")}
    frozen = [k for k in base if k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))]
    assert frozen and all(torch.equal(now[k].cpu(), base[k]) for k in frozen)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_ckpt):
    """The embedding after 8 uninterrupted steps."""
    from conftest import write_concept_images
    tmp = tmp_path_factory.mktemp("uninterrupted")
    concept = write_concept_images(tmp / "concept")
    entry.main(run_args(tmp / "logs", tiny_ckpt, concept, "--max_steps", "8", NO_IMAGES))
    return concept, embedding(run_dir(tmp / "logs") / "checkpoints/embeddings.pt")


def test_resume_is_exact(tmp_path, tiny_ckpt, uninterrupted):
    concept, expected = uninterrupted
    logs = tmp_path / "logs"
    entry.main(run_args(logs, tiny_ckpt, concept, "--max_steps", "3", NO_IMAGES))
    run = run_dir(logs)
    entry.main(["-r", str(run), "-t", "--max_steps", "8"])
    assert (run / "checkpoints/embeddings_gs-3.pt").is_file()  # the first part's files are kept
    assert torch.equal(embedding(run / "checkpoints/embeddings.pt"), expected)



@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX signals")
def test_sigterm_saves_and_resumes_exactly(tmp_path, tiny_ckpt, uninterrupted):
    concept, expected = uninterrupted
    logs = tmp_path / "logs"
    cmd = [sys.executable, str(ROOT / "main.py"), *run_args(logs, tiny_ckpt, concept, "--max_steps", "8", NO_IMAGES,
                                                            "lightning.modelcheckpoint.params.every_n_train_steps=2")]
    proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not glob.glob(str(logs / "*" / "checkpoints" / "embeddings_gs-2.pt")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    run = run_dir(logs)
    stopped = load_checkpoint(str(run / "checkpoints/last.ckpt"))["global_step"]
    assert 2 <= stopped < 8, out
    entry.main(["-r", str(run), "-t", "--max_steps", "8"])
    assert torch.equal(embedding(run / "checkpoints/embeddings.pt"), expected)


# ------------------------------------------------------------------------------------------------- loggers
def test_loggers_get_metrics_and_the_image_grids(tmp_path, concept_dir, tiny_ckpt, monkeypatch):
    """--logger csv,tensorboard,wandb: metrics in each; the grids in the two that show images (wandb offline)."""
    loggers = ["csv"]
    for name in ("tensorboard", "wandb"):
        try:
            __import__(name)
            loggers.append(name)
        except ImportError:
            pass
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logs = tmp_path / "logs"
    entry.main(run_args(logs, tiny_ckpt, concept_dir, "--max_steps", "2", "--logger", ",".join(loggers),
                        "lightning.callbacks.image_logger.params.batch_frequency=2", "--log_every_n_steps", "1"))
    run = run_dir(logs)
    (metrics,) = glob.glob(str(run / "csv" / "*" / "metrics.csv"))
    assert "train/loss_simple" in open(metrics).readline()
    if "tensorboard" in loggers:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        (events,) = glob.glob(str(run / "tensorboard" / "*" / "events.out.tfevents.*"))
        tags = EventAccumulator(events, size_guidance={"images": 0}).Reload().Tags()
        assert "train/samples_placeholder" in tags["images"] and "train/loss_simple" in tags["scalars"]
    if "wandb" in loggers:
        (offline,) = glob.glob(str(run / "wandb" / "offline-run-*"))
        images = glob.glob(os.path.join(offline, "files", "media", "images", "train", "samples_placeholder_*.png"))
        assert images, os.listdir(offline)


def test_a_resumed_run_keeps_writing_last_ckpt(tmp_path, tiny_ckpt, concept_dir):
    """A run stopped before ModelCheckpoint's first save (its last.ckpt written by our end-of-run save) and resumed:
    Lightning's version counter used to write the resumed run's newer checkpoints to last-v1.ckpt, so the next
    `-r`, which reads last.ckpt, went back to the older step."""
    logs = tmp_path / "logs"
    every = "lightning.modelcheckpoint.params.every_n_train_steps=2"
    entry.main(run_args(logs, tiny_ckpt, concept_dir, "--max_steps", "1", NO_IMAGES, every))
    run = run_dir(logs)
    entry.main(["-r", str(run), "-t", "--max_steps", "4"])
    names = sorted(p.name for p in (run / "checkpoints").glob("last*.ckpt"))
    assert names == ["last.ckpt"], names
    assert load_checkpoint(str(run / "checkpoints/last.ckpt"))["global_step"] == 4
