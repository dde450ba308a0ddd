"""main.py on two CPU processes (Lightning DDP over gloo on loopback), end to end on the tiny LDM.

Each rank records what it trained on through RecordRanks, a callback main.py builds from the lightning config
like any other (the subprocess imports it from this file), so the test sees both ranks of the real run.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pytorch_lightning import Callback

from ldm.checkpoint import load_checkpoint
from ldm.data.datamodule import ResumableSampler

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


class RecordRanks(Callback):
    """Writes, per rank: its sampler's sharding, the captions and image sums of its batches, its final vectors."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        images = batch["image"].float().flatten(1).sum(1)
        self.batches.append({"captions": list(batch["caption"]), "image_sums": images.tolist()})

    def on_train_end(self, trainer, pl_module):
        sampler = trainer.train_dataloader.sampler
        rank = trainer.global_rank
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"world_size": trainer.world_size, "sampler": [sampler.num_replicas, sampler.rank],
                  "batches": self.batches}
        (self.out_dir / f"rank{rank}.json").write_text(json.dumps(record))
        torch.save(pl_module.embedding_manager.string_to_param_dict["*"].detach().cpu(), self.out_dir / f"rank{rank}.pt")


def test_sampler_gives_each_rank_its_own_share():
    shares = [[index for index, _ in ResumableSampler(7, shuffle=True, seed=3, num_replicas=2, rank=r)]
              for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 4  # padded to equal length, as DistributedSampler does
    assert set(shares[0]) | set(shares[1]) == set(range(7))
    assert len(set(shares[0]) & set(shares[1])) == 1  # only the one padding item is seen twice


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_two_process_ddp_training(tmp_path, tiny_ckpt, concept_dir):
    logs, records = tmp_path / "logs", tmp_path / "records"
    cmd = [sys.executable, str(ROOT / "main.py"), "--base", "configs/tiny/finetune-tiny.yaml", "-t",
           "--actual_resume", str(tiny_ckpt), "--data_root", str(concept_dir), "--init_word", "triangle",
           "--max_steps", str(STEPS), "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
           "-l", str(logs), "lightning.callbacks.image_logger.params.disabled=true",
           "lightning.callbacks.record_ranks.target=test_ddp.RecordRanks",
           f"lightning.callbacks.record_ranks.params.out_dir={records}"]
    python_path = [str(ROOT / "tests")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(python_path))
    proc = subprocess.run(cmd, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:]
    assert "(--scale_lr: 2 batch size x 2 devices x 1 accumulated batches" in out, \
        "the scaled learning rate counts both processes"

    # one run directory, one embeddings.pt: the second rank writes no files of its own
    runs = list(logs.iterdir())
    assert len(runs) == 1, runs
    ckpts = runs[0] / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("embeddings*.pt")) == ["embeddings.pt", f"embeddings_gs-{STEPS}.pt"]
    assert load_checkpoint(str(ckpts / "last.ckpt"))["global_step"] == STEPS

    learned = torch.load(ckpts / "embeddings.pt", weights_only=True)["string_to_param"]["*"]
    initial = load_checkpoint(str(ckpts / "last.ckpt"))["state_dict"]["embedding_manager.initial_embeddings.*"]
    assert not torch.allclose(learned, initial), "training changed the embedding"

    ranks = [json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, record in enumerate(ranks):
        assert record["world_size"] == 2 and record["sampler"] == [2, r]
        assert len(record["batches"]) == STEPS
    assert ranks[0]["batches"] != ranks[1]["batches"], "the ranks trained on different data"
    # gradients were averaged across ranks: both hold the vectors rank zero saved
    for r in (0, 1):
        assert torch.equal(torch.load(records / f"rank{r}.pt", weights_only=True), learned)
