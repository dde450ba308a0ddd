"""Every way a run stops (Ctrl-C, SIGTERM, SIGUSR1 then kill -9, kill -9 in the middle of a checkpoint write, the
step limit), then `main.py -r LOGDIR`, ends exactly where an uninterrupted run ends (bit for bit, single thread).

The runs are real `main.py` processes on the tiny LDM, checkpointing every step or two.
"""
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

import main as entry
from ldm.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/tiny/finetune-tiny.yaml")
NO_IMAGES = "lightning.callbacks.image_logger.params.disabled=true"
POSIX = pytest.mark.skipif(sys.platform == "win32" or not hasattr(signal, "SIGKILL"), reason="POSIX signals")
# exact: each image's first-stage latent no longer depends on the batch that first encoded it (issue 20)
TOLERANCE = 0.0


def run_args(logdir, ckpt, data_root, max_steps, *extra):
    return ["--base", CONFIG, "-t", "--actual_resume", str(ckpt), "--data_root", str(data_root), "--init_word",
            "triangle", "-l", str(logdir), "--max_steps", str(max_steps), NO_IMAGES, *extra]


def the_run(logdir):
    (path,) = glob.glob(os.path.join(str(logdir), "*"))
    return Path(path)


def embedding(run):
    return torch.load(run / "checkpoints" / "embeddings.pt", weights_only=True)["string_to_param"]["*"]


def start(args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=str(ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(proc, condition, timeout=300, poll=0.05):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.time() < deadline, "the run took too long"
        time.sleep(poll)
    return True


def resume(run, max_steps):
    entry.main(["-r", str(run), "--max_steps", str(max_steps)])
    return embedding(run)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_ckpt):
    """-> function(steps, seed) giving the embedding of an uninterrupted run (cached)."""
    from conftest import write_concept_images
    tmp = tmp_path_factory.mktemp("reference")
    concept = write_concept_images(tmp / "concept")
    cache = {}

    def result(steps, seed=None):
        if (steps, seed) not in cache:
            logs = tmp / f"logs-{steps}-{seed}"
            entry.main(run_args(logs, tiny_ckpt, concept, steps, *(["-s", str(seed)] if seed is not None else [])))
            cache[steps, seed] = embedding(the_run(logs))
        return cache[steps, seed]

    result.concept = concept
    return result


def assert_same(resumed, expected):
    assert (resumed - expected).abs().max().item() <= TOLERANCE, (resumed - expected).abs().max().item()


def test_step_limit_then_plain_resume_is_exact_and_keeps_the_seed(tmp_path, tiny_ckpt, reference):
    # -s 7 is stored with the run: a resume without -s continues with it
    logs = tmp_path / "logs"
    entry.main(run_args(logs, tiny_ckpt, reference.concept, 3, "-s", "7"))
    run = the_run(logs)
    assert_same(resume(run, 8), reference(8, seed=7))
    assert (embedding(run) - reference(8)).abs().max() > 1e-3, "the seed must matter"
    with pytest.raises(entry.UsageError, match="already trained 8 steps.*nothing to do"):
        entry.main(["-r", str(run), "--max_steps", "8"])


def test_a_run_ending_between_periodic_checkpoints_saves_its_last_step(tmp_path, tiny_ckpt, reference):
    logs = tmp_path / "logs"
    entry.main(run_args(logs, tiny_ckpt, reference.concept, 5,
                        "lightning.modelcheckpoint.params.every_n_train_steps=2"))
    run = the_run(logs)
    assert load_checkpoint(str(run / "checkpoints/last.ckpt"))["global_step"] == 5
    assert (run / "checkpoints/embeddings_gs-5.pt").is_file()
    assert_same(embedding(run), reference(5))


@POSIX
def test_ctrl_c_stops_at_a_step_boundary_and_resumes_exactly(tmp_path, tiny_ckpt, reference):
    logs = tmp_path / "logs"
    proc = start(run_args(logs, tiny_ckpt, reference.concept, 8,
                          "lightning.modelcheckpoint.params.every_n_train_steps=2"))
    assert wait_for(proc, lambda: glob.glob(str(logs / "*" / "checkpoints" / "embeddings_gs-2.pt")))
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "interrupted by Ctrl-C" in out and "Traceback" not in out, out
    run = the_run(logs)
    stopped = load_checkpoint(str(run / "checkpoints/last.ckpt"))["global_step"]
    assert 2 <= stopped < 8, out
    assert_same(resume(run, 8), reference(8))


@POSIX
def test_kill_9_during_a_checkpoint_write_loses_nothing_and_resumes_exactly(tmp_path, tiny_ckpt, reference):
    """Kill the run the moment a checkpoint's temporary file exists (mid-write), then resume."""
    logs = tmp_path / "logs"
    proc = start(run_args(logs, tiny_ckpt, reference.concept, 8,
                          "lightning.modelcheckpoint.params.every_n_train_steps=1"))

    def writing():  # a write under way, after a first last.ckpt exists
        folder = glob.glob(str(logs / "*" / "checkpoints"))
        names = os.listdir(folder[0]) if folder else []
        return "last.ckpt" in names and any(n.startswith(".tmp-") for n in names)

    caught = wait_for(proc, writing, poll=0.0005)
    proc.kill()
    proc.communicate(timeout=60)
    assert caught, "the run finished before a checkpoint write was seen"
    run = the_run(logs)
    assert 1 <= load_checkpoint(str(run / "checkpoints" / "last.ckpt"))["global_step"] < 8  # old or new, never torn
    assert_same(resume(run, 8), reference(8))
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith(".tmp-")], "stray temporaries removed"


def test_damaged_last_ckpt_falls_back_to_the_newest_good_checkpoint(tmp_path, tiny_ckpt, reference, capsys):
    logs = tmp_path / "logs"
    entry.main(run_args(logs, tiny_ckpt, reference.concept, 4,
                        "lightning.modelcheckpoint.params.every_n_train_steps=2"))
    run = the_run(logs)
    ckpts = run / "checkpoints"
    (ckpts / "last.ckpt").write_bytes(b"")  # what a kill during a cross-filesystem copy left
    (ckpts / ".tmp-abc123.ckpt").write_bytes(b"half a checkpoint")
    (run / "configs" / ".tmp-def456.yaml").write_text("model: {")
    assert_same(resume(run, 8), reference(8))
    out = capsys.readouterr().out
    assert "last.ckpt is empty" in out and "instead" in out
    assert not (ckpts / ".tmp-abc123.ckpt").exists() and not (run / "configs" / ".tmp-def456.yaml").exists()


@pytest.mark.slow
@POSIX
def test_sigusr1_saves_and_training_goes_on_then_kill_9_resumes_exactly(tmp_path, tiny_ckpt, reference):
    logs = tmp_path / "logs"
    proc = start(run_args(logs, tiny_ckpt, reference.concept, 200))
    assert wait_for(proc, lambda: glob.glob(str(logs / "*" / "configs" / "*-project.yaml")))
    time.sleep(3)
    proc.send_signal(signal.SIGUSR1)
    last = lambda: glob.glob(str(logs / "*" / "checkpoints" / "last.ckpt"))  # noqa: E731
    assert wait_for(proc, last)
    time.sleep(1)
    proc.kill()
    proc.communicate(timeout=60)
    run = the_run(logs)
    saved = load_checkpoint(str(run / "checkpoints/last.ckpt"))["global_step"]
    assert 0 < saved < 200
    assert_same(resume(run, saved + 2), reference(saved + 2))


@pytest.mark.slow
@POSIX
@pytest.mark.parametrize("trial", range(3))
def test_kill_9_at_random_moments_then_resume_is_exact(trial, tmp_path, tiny_ckpt, reference):
    """Five kill -9s at random moments of one 12-step run (checkpoint every step), resumed each time."""
    rng = random.Random(trial)
    logs = tmp_path / "logs"
    args = run_args(logs, tiny_ckpt, reference.concept, 12, "lightning.modelcheckpoint.params.every_n_train_steps=1")
    proc = start(args)
    steps = lambda: len(glob.glob(str(logs / "*" / "checkpoints" / "embeddings_gs-*.pt")))  # noqa: E731
    for _ in range(5):
        done = steps()
        if not wait_for(proc, lambda: steps() > done):  # this process made progress: now kill it somewhere
            break
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.communicate(timeout=60)
        proc = start(["-r", str(the_run(logs)), "--max_steps", "12"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode in (0, 1), out  # 1: "nothing to do" when an earlier part already reached step 12
    assert_same(embedding(the_run(logs)), reference(12))


@pytest.fixture
def small_filesystem(tmp_path):
    """A 4 MB tmpfs (needs root and permission to mount, else skipped)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True).returncode:
        pytest.skip("cannot mount a small file system here")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def _fill(folder):
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(bytes(64 * 1024))
                f.flush()
        except OSError:
            pass


@POSIX
@pytest.mark.parametrize("trouble", ["full", pytest.param("read-only", marks=pytest.mark.slow)])
def test_a_full_or_read_only_log_disk_is_one_line_and_loses_nothing(trouble, small_filesystem, tiny_ckpt, reference):
    logs = small_filesystem / "logs"
    proc = start(run_args(logs, tiny_ckpt, reference.concept, 400,
                          "lightning.modelcheckpoint.params.every_n_train_steps=1"))
    assert wait_for(proc, lambda: glob.glob(str(logs / "*" / "checkpoints" / "embeddings_gs-3.pt")))
    if trouble == "full":
        _fill(small_filesystem)
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(small_filesystem)], check=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    last = out.strip().splitlines()[-1]
    expected = "no space left on the device" if trouble == "full" else "the file system is read-only"
    assert last.startswith("main.py: error: cannot write") and expected in last, out[-2000:]
    run = the_run(logs)
    assert load_checkpoint(str(run / "checkpoints" / "last.ckpt"))["global_step"] >= 2  # still a good checkpoint
    torch.load(run / "checkpoints" / "embeddings.pt", weights_only=True)
    if trouble == "full":
        os.remove(small_filesystem / "filler")
    else:
        subprocess.run(["mount", "-o", "remount,rw", str(small_filesystem)], check=True)
    step = load_checkpoint(str(run / "checkpoints" / "last.ckpt"))["global_step"]
    assert_same(resume(run, step + 2), reference(step + 2))
