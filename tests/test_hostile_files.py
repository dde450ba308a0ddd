"""Every entry point that opens a file, given every file of the hostile corpus (tests/hostile_files.py).

What must hold for each pair: no payload runs (the marker file never appears), the call returns within a few
seconds (a FIFO or a zip bomb never blocks or inflates), and the user gets one line naming the file, never
torch's advice to load with weights_only=False.
"""
import importlib.util
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import main as entry
from hostile_files import CORPUS_NAMES, build_corpus
from ldm.checkpoint import load_checkpoint, load_model_from_config, load_state_dict
from ldm.cli_checks import run_cli
from ldm.modules.embedding_io import load_embedding_file

ROOT = Path(__file__).resolve().parents[1]
TINY_FINETUNE = ROOT / "configs/tiny/finetune-tiny.yaml"
NO_IMAGES = "lightning.callbacks.image_logger.params.disabled=true"


def load_script(path, name):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_embedding = load_script("scripts/convert_embedding.py", "script_convert_embedding")
merge_embeddings = load_script("merge_embeddings.py", "script_merge_embeddings")
stable_txt2img = load_script("scripts/stable_txt2img.py", "script_stable_txt2img_hostile")
evaluate_model = load_script("scripts/evaluate_model.py", "script_evaluate_model_hostile")

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    marker = folder / "PAYLOAD_RAN"
    return build_corpus(str(folder / "files"), str(marker)), marker


def fake_run(tmp_path, last_ckpt):
    """A run folder as main.py writes it, whose last.ckpt is `last_ckpt`."""
    run = tmp_path / "logs" / "2026-01-01T00-00-00_run"
    (run / "configs").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    OmegaConf.save(OmegaConf.load(TINY_FINETUNE), run / "configs" / "2026-01-01T00-00-00-project.yaml")
    target = run / "checkpoints" / "last.ckpt"
    if os.path.isdir(last_ckpt) and not os.path.islink(last_ckpt):
        target.mkdir()
    else:
        target.symlink_to(last_ckpt)
    return run


def _loaders():
    return {"load_checkpoint": load_checkpoint, "load_state_dict": load_state_dict,
            "load_embedding_file": load_embedding_file}


def _convert(path, tmp_path):
    return convert_embedding.main(["--input", path, "--output", str(tmp_path / "out.safetensors"), "--to",
                                   "diffusers"])


def _merge(path, tmp_path):
    return merge_embeddings.main(["--manager_ckpts", path, path, "--output_path", str(tmp_path / "merged.pt")])


def _resume(path, tmp_path):
    return entry.main(["-r", str(fake_run(tmp_path, path))])


CHEAP_ENTRY_POINTS = ["load_checkpoint", "load_state_dict", "load_embedding_file", "convert_embedding.py",
                      "merge_embeddings.py", "main.py -r"]
MODEL_ENTRY_POINTS = ["load_model_from_config", "main.py --actual_resume", "main.py --embedding_manager_ckpt",
                      "stable_txt2img.py --ckpt", "stable_txt2img.py --embedding_path", "evaluate_model.py --ckpt"]
# a representative few files for the entry points that build a model, in the default suite
MODEL_SAMPLE = ["pickle_protocol_4.pt", "torch_zip_payload.ckpt", "zip_bomb.pt", "fifo.pt", "empty.ckpt",
                "embedding_payload.pt"]


def call(entry_point, path, tmp_path, tiny):
    """Run `entry_point` on `path` -> the text the user sees (exception message or stderr)."""
    if entry_point in _loaders():
        return _loaders()[entry_point](path)
    if entry_point == "convert_embedding.py":
        return _convert(path, tmp_path)
    if entry_point == "merge_embeddings.py":
        return _merge(path, tmp_path)
    if entry_point == "main.py -r":
        return _resume(path, tmp_path)
    config, ckpt, concept = tiny
    if entry_point == "load_model_from_config":
        return load_model_from_config(OmegaConf.load(config), path)
    run_args = ["--base", str(TINY_FINETUNE), "-t", "--data_root", str(concept), "-l", str(tmp_path / "logs"),
                "--max_steps", "1", NO_IMAGES]
    if entry_point == "main.py --actual_resume":
        return entry.main(run_args + ["--actual_resume", path])
    if entry_point == "main.py --embedding_manager_ckpt":
        return entry.main(run_args + ["--actual_resume", str(ckpt), "--embedding_manager_ckpt", path])
    sample_args = ["--config", str(config), "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "2", "--H", "32",
                   "--W", "32", "--f", "4", "--precision", "full", "--device", "cpu", "--outdir",
                   str(tmp_path / "out")]
    if entry_point == "stable_txt2img.py --ckpt":
        return run_cli(lambda: stable_txt2img.main(sample_args + ["--ckpt", path]))
    if entry_point == "stable_txt2img.py --embedding_path":
        return run_cli(lambda: stable_txt2img.main(sample_args + ["--ckpt", str(ckpt), "--embedding_path", path]))
    if entry_point == "evaluate_model.py --ckpt":
        return run_cli(lambda: evaluate_model.main(["--config", str(config), "--ckpt", path, "--toy_target",
                                                    "magenta triangle", "--n_samples", "1", "--batch_size", "1",
                                                    "--ddim_steps", "2", "--device", "cpu", "--outdir",
                                                    str(tmp_path / "out")]))
    raise AssertionError(entry_point)


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout("the entry point blocked")


def check(entry_point, name, corpus, tmp_path, capsys, monkeypatch, tiny=None):
    paths, marker = corpus
    if name not in paths:
        pytest.skip(f"{name} cannot be made on this platform")
    path = paths[name]
    # an environment that tells torch to unpickle anything must change nothing
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)
    try:
        try:
            result = call(entry_point, path, tmp_path, tiny)
        except (entry.UsageError, ValueError, OSError) as err:
            message = str(err)
        except SystemExit as stop:
            message = str(stop.code) if not isinstance(stop.code, int) else capsys.readouterr().err
        else:
            message = capsys.readouterr().err if result == 1 else None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not marker.exists(), f"{entry_point} ran the payload of {name}"
    assert message, f"{entry_point} accepted {name}: {result!r}"
    lines = [line for line in message.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"{entry_point} on {name}: {message}"
    assert "weights_only" not in message and "Traceback" not in message, message
    assert name in message or Path(path).name in message or "last.ckpt" in message, message


@pytest.mark.parametrize("name", CORPUS_NAMES)
@pytest.mark.parametrize("entry_point", CHEAP_ENTRY_POINTS)
def test_cheap_entry_points_refuse_every_hostile_file(entry_point, name, corpus, tmp_path, capsys, monkeypatch):
    check(entry_point, name, corpus, tmp_path, capsys, monkeypatch)


@pytest.fixture
def tiny(tmp_path, tiny_config, tiny_ckpt, concept_dir):
    config = tmp_path / "tiny.yaml"
    OmegaConf.save(tiny_config, config)
    return config, tiny_ckpt, concept_dir


@pytest.mark.parametrize("name", MODEL_SAMPLE)
@pytest.mark.parametrize("entry_point", MODEL_ENTRY_POINTS)
def test_model_entry_points_refuse_hostile_files(entry_point, name, corpus, tmp_path, capsys, monkeypatch, tiny):
    check(entry_point, name, corpus, tmp_path, capsys, monkeypatch, tiny)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pickle_protocol_0.pt", "pickle_protocol_2.pt", "pickle_protocol_5.pt",
                                  "lightning_payload.ckpt", "eval_payload.pt", "exec_payload.pt",
                                  "numpy_object_array.pt", "garbage.pt", "text.ckpt", "truncated_zip.ckpt",
                                  "png_named_pt.pt", "huge_header.safetensors", "out_of_bounds.safetensors",
                                  "json.safetensors", "directory.ckpt", "dev_zero.ckpt"])
@pytest.mark.parametrize("entry_point", MODEL_ENTRY_POINTS)
def test_model_entry_points_refuse_every_hostile_file(entry_point, name, corpus, tmp_path, capsys, monkeypatch,
                                                       tiny):
    check(entry_point, name, corpus, tmp_path, capsys, monkeypatch, tiny)


def test_lightning_resume_goes_through_the_safe_loader(tmp_path, monkeypatch):
    """Lightning's own checkpoint loading (fit(ckpt_path=...)) uses our CheckpointIO, whatever the environment."""
    from hostile_files import Payload
    from ldm.checkpoint import CheckpointSecurityError, SafeCheckpointIO
    marker = tmp_path / "ran"
    path = tmp_path / "last.ckpt"
    torch.save({"global_step": 1, "state_dict": {}, "x": Payload(f"touch {marker}")}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointSecurityError, match="posix.system|nt.system"):
        SafeCheckpointIO().load_checkpoint(str(path))
    assert not marker.exists()


def test_zip_bomb_is_refused_before_inflating(corpus):
    import resource
    import time
    paths, _ = corpus
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.time()
    with pytest.raises(ValueError, match="zip bomb"):
        load_checkpoint(paths["zip_bomb.pt"])
    assert time.time() - start < 2
    # ru_maxrss is in KiB on Linux: the 300 MB record was never inflated
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024 or sys.platform != "linux"
