"""Bad inputs get one clear line, weights are checked, a run does something or says why not (issue: reliability).

Training here is the tiny LDM on CPU for a step or two; most checks fail before any training starts.
"""
import datetime
import errno
import glob
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import main as entry
from ldm.checkpoint import atomic_write, load_state_dict, save_state_dict
from ldm.cli_checks import sampling_problems, user_error_message
from ldm.run import RUN_DIR_ENV, claim_run_dir
from ldm.util import ConfigError, instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/tiny/finetune-tiny.yaml")
NO_IMAGES = "lightning.callbacks.image_logger.params.disabled=true"


def run_args(logdir, ckpt, data_root, *extra, train=True):
    return ["--base", CONFIG, *(["-t"] if train else []), "--actual_resume", str(ckpt), "--data_root",
            str(data_root), "--init_word", "triangle", "-l", str(logdir), NO_IMAGES, *extra]


def main_process(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=600)


# ------------------------------------------------------------------------------------ 1. a run does something
def test_a_run_that_would_do_nothing_fails_with_one_line(tmp_path, tiny_ckpt, concept_dir):
    result = main_process(*run_args(tmp_path / "logs", tiny_ckpt, concept_dir, train=False))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("main.py: error: Nothing to do"), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "logs").exists()


def test_plain_resume_trains(tmp_path, tiny_ckpt, concept_dir):
    entry.main(run_args(tmp_path / "logs", tiny_ckpt, concept_dir, "--max_steps", "1"))
    (run,) = glob.glob(str(tmp_path / "logs" / "*"))
    trainer = entry.main(["-r", run, "--max_steps", "3"])  # no -t: resuming a run resumes its training
    assert trainer.global_step == 3
    assert os.path.isfile(os.path.join(run, "checkpoints", "embeddings_gs-3.pt"))


# --------------------------------------------------------------------------------------- 2. weights are checked
def _wrong_weights(kind, tmp_path, tiny_ckpt, tiny_config):
    sd = load_state_dict(str(tiny_ckpt))
    path = tmp_path / f"{kind}.safetensors"
    if kind == "autoencoder":
        sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    elif kind == "embedding":
        path = tmp_path / "embeddings.pt"
        torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": torch.zeros(1, 32)}}, path)
        return path
    elif kind == "other_model":
        key = next(k for k in sd if k.startswith("model.diffusion_model.") and sd[k].ndim == 4)
        sd[key] = torch.zeros(sd[key].shape[0] * 2, *sd[key].shape[1:])
    elif kind == "partial":
        sd = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}
    save_state_dict(sd, path)
    return path


@pytest.mark.parametrize("kind,message", [
    ("autoencoder", "looks like an autoencoder"),
    ("embedding", "is an embedding file"),
    ("other_model", "is for another model.*in the file and .* in the config"),
    ("partial", "lacks .* weights LatentDiffusion needs \\(cond_stage_model"),
])
def test_a_wrong_weights_file_is_refused_with_what_it_looks_like(kind, message, tmp_path, tiny_ckpt, tiny_config,
                                                                  concept_dir):
    path = _wrong_weights(kind, tmp_path, tiny_ckpt, tiny_config)
    with pytest.raises(entry.UsageError, match=message):
        entry.main(run_args(tmp_path / "logs", path, concept_dir, "--max_steps", "1"))
    assert not (tmp_path / "logs").exists()


def test_resume_refuses_a_run_checkpoint_that_does_not_fit_the_config(tmp_path, tiny_ckpt, concept_dir):
    entry.main(run_args(tmp_path / "logs", tiny_ckpt, concept_dir, "--max_steps", "1"))
    (run,) = glob.glob(str(tmp_path / "logs" / "*"))
    with pytest.raises(entry.UsageError, match="for another model: .*embedding_manager"):
        entry.main(["-r", run, "--max_steps", "2",
                    "model.params.personalization_config.params.num_vectors_per_token=2"])


def test_the_frozen_weights_a_run_checkpoint_omits_are_the_named_exception(tmp_path, tiny_ckpt, concept_dir, capsys):
    entry.main(run_args(tmp_path / "logs", tiny_ckpt, concept_dir, "--max_steps", "1"))
    (run,) = glob.glob(str(tmp_path / "logs" / "*"))
    entry.main(["-r", run, "--max_steps", "2"])
    assert "frozen weights are not in it by design" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- 5. exclusive folders
def test_log_folders_are_claimed_exclusively(tmp_path, monkeypatch):
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    claimed, barrier = [], threading.Barrier(8)

    def claim():
        barrier.wait()
        claimed.append(claim_run_dir(str(tmp_path / "logs" / "same_name")))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(claimed)) == 8 and all(os.path.isdir(p) for p in claimed)


def test_two_runs_started_in_the_same_second_get_two_folders(tmp_path, tiny_ckpt, concept_dir, monkeypatch):
    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 1, 12, 0, 0)

    monkeypatch.setattr(entry.datetime, "datetime", Frozen)
    for _ in range(2):
        entry.main(run_args(tmp_path / "logs", tiny_ckpt, concept_dir, "--max_steps", "1", "-n", "same"))
    runs = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "logs" / "*")))
    assert runs == ["concept2026-01-01T12-00-00_same", "concept2026-01-01T12-00-00_same_1"]
    for run in runs:
        assert len(glob.glob(str(tmp_path / "logs" / run / "configs" / "*-project.yaml"))) == 1


# --------------------------------------------------------------------------------------- 6. unknown config keys
@pytest.mark.parametrize("override,named", [
    ("model.params.personalization_config.params.num_vector_per_token=8", "num_vectors_per_token"),
    ("model.params.linear_strat=0.001", "linear_start"),
    ("data.params.batch_sise=4", "batch_size"),
    ("lightning.callbacks.image_logger.params.log_images_kwargs.unconditional_guidance_scal=3",
     "unconditional_guidance_scale"),
])
def test_unknown_config_keys_are_errors_naming_the_closest_key(override, named, tmp_path, tiny_ckpt, concept_dir):
    args = run_args(tmp_path / "logs", tiny_ckpt, concept_dir, "--max_steps", "1", override)
    if "image_logger" in override:
        args.remove(NO_IMAGES)
    key = override.split("=")[0].split(".")[-1]
    with pytest.raises((entry.UsageError, ConfigError), match=f"Unknown config key `{key}`.*`{named}`"):
        entry.main(args)


def test_instantiate_checks_keys_through_constructors_that_pass_kwargs_on():
    config = OmegaConf.create({"target": "ldm.data.datamodule.DataModuleFromConfig",
                               "params": {"batch_size": 1, "num_wrokers": 0}})
    with pytest.raises(ConfigError, match="`num_wrokers`.*`num_workers`"):
        instantiate_from_config(config)
    with pytest.raises(ConfigError, match="cannot be imported"):
        instantiate_from_config({"target": "ldm.nowhere.Thing"})


# ------------------------------------------------------------------------------------- 7d. configs are code
def test_resume_refuses_config_targets_outside_the_project(tmp_path):
    run = tmp_path / "logs" / "run"
    (run / "configs").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    marker = tmp_path / "ran"
    config = OmegaConf.load(CONFIG)
    config.data = {"target": "os.system", "params": {"command": f"touch {marker}"}}
    OmegaConf.save(config, run / "configs" / "x-project.yaml")
    with pytest.raises(ConfigError, match="os.system .*--trust_config"):
        entry.main(["-r", str(run)])
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ 8. one-line errors
def test_yaml_syntax_error_and_unreadable_images_are_one_line(tmp_path, tiny_ckpt, concept_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  params: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml could not be read"):
        entry.main(["--base", str(bad), "-t"])
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(entry.UsageError, match="No readable images.*3 files are not images"):
        entry.main(run_args(tmp_path / "logs", tiny_ckpt, broken, "--max_steps", "1"))


def test_a_full_disk_is_named_and_loses_nothing(tmp_path):
    path = tmp_path / "embeddings.pt"
    save_state_dict({"w": torch.ones(2)}, path)

    def disk_full(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", tmp)

    with pytest.raises(OSError) as info:
        atomic_write(path, disk_full)
    assert torch.equal(load_state_dict(path)["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["embeddings.pt"]
    message = user_error_message(info.value)
    assert "no space left on the device" in message and "intact" in message
    read_only = OSError(errno.EROFS, "Read-only file system", "logs/run")
    assert "read-only" in user_error_message(read_only) and "\n" not in user_error_message(read_only)


@pytest.fixture
def sampling(tmp_path, tiny_config, tiny_ckpt):
    import importlib.util
    spec = importlib.util.spec_from_file_location("script_stable_txt2img_rel", ROOT / "scripts/stable_txt2img.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = tmp_path / "tiny.yaml"
    OmegaConf.save(tiny_config, config)
    args = ["--config", str(config), "--ckpt", str(tiny_ckpt), "--n_samples", "1", "--n_iter", "1", "--ddim_steps",
            "2", "--H", "32", "--W", "32", "--f", "4", "--precision", "full", "--device", "cpu", "--outdir",
            str(tmp_path / "out")]
    return module, args


@pytest.mark.parametrize("flag,value", [("--ddim_steps", "0"), ("--ddim_steps", "1001"), ("--n_samples", "0"),
                                        ("--n_iter", "0"), ("--H", "-32"), ("--f", "0"), ("--scale", "nan")])
def test_impossible_sampling_flags_are_one_line_errors(flag, value, sampling, capsys):
    module, args = sampling
    with pytest.raises(SystemExit) as info:
        module.main(args + [flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert flag in err[-1] and "error" in err[-1] and not any("Traceback" in line for line in err)


def test_odd_sampling_flags_warn():
    class Opt:
        H, W, f, ddim_steps, n_samples, n_iter = 33, 32, 8, 50, 1, 1

    errors, notes = sampling_problems(Opt())
    assert not errors and notes == ["--H 33 is not a multiple of --f (8): the images will be 32 px."]


def test_nan_embedding_is_refused(tmp_path, sampling, capsys):
    module, args = sampling
    nan = tmp_path / "nan.pt"
    vectors = torch.full((1, 32), float("nan"))
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": vectors}}, nan)
    with pytest.raises(SystemExit, match="NaN"):
        module.main(args + ["--embedding_path", str(nan)])


def test_bad_checkpoint_for_sampling_is_one_line_in_a_real_process(tmp_path, sampling):
    _, args = sampling
    junk = tmp_path / "junk.ckpt"
    junk.write_text("hello")
    args[args.index("--ckpt") + 1] = str(junk)
    result = subprocess.run([sys.executable, str(ROOT / "scripts/stable_txt2img.py"), *args], cwd=str(ROOT),
                            capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "junk.ckpt" in last and "a text file" in last and "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------- 9. silent oddities
def _opt(*args):
    opt, _ = entry.get_parser().parse_known_args(list(args))
    return opt


@pytest.mark.parametrize("flag", ["--init_word", "--placeholder_string"])
def test_empty_init_word_or_placeholder_is_an_error(flag):
    with pytest.raises(entry.UsageError, match=f"{flag} is empty"):
        entry.apply_cli_to_config(_opt(flag, " "), OmegaConf.load(CONFIG))


def test_ordinary_word_placeholder_warns():
    with pytest.warns(UserWarning, match="'dog' is an ordinary word"):
        entry.apply_cli_to_config(_opt("--placeholder_string", "dog"), OmegaConf.load(CONFIG))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entry.apply_cli_to_config(_opt("--placeholder_string", "*"), OmegaConf.load(CONFIG))


def test_tiny_training_images_warn(tmp_path):
    from PIL import Image
    from ldm.data.personalized import list_images
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    with pytest.warns(UserWarning, match="dot.png \\(1x1 px\\)"):
        list_images(str(tmp_path))


def test_prompt_without_the_placeholder_warns(tmp_path):
    from types import SimpleNamespace
    from ldm.cli_checks import placeholder_notes
    path = tmp_path / "embeddings.pt"
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": torch.zeros(1, 32)}}, path)
    opt = SimpleNamespace(embedding_path=[str(path)], prompt="a photo of a cat", placeholder_string=None)
    (note,) = placeholder_notes(opt)
    assert "names none of the learned concepts (*)" in note
    opt.prompt = "a photo of *"
    assert placeholder_notes(opt) == []


def test_concurrent_runs_share_the_cores(tmp_path, monkeypatch):
    from ldm.callbacks import ThreadShare, available_cores
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    share = ThreadShare(registry=str(tmp_path / "runs"))
    assert share.active
    (tmp_path / "runs").mkdir()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    for pid in (os.getpid(), os.getppid(), finished.pid):  # two live runs, one that died without unregistering
        (tmp_path / "runs" / str(pid)).touch()
    try:
        assert share.live_runs() == 2
        assert share.share() == max(1, available_cores() // 2) == torch.get_num_threads()
        assert sorted(os.listdir(tmp_path / "runs")) == sorted([str(os.getpid()), str(os.getppid())])
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert not ThreadShare(registry=str(tmp_path / "runs")).active
