"""The data module that YAML configs build as `main.DataModuleFromConfig`.

Besides building the datasets from config, it makes the data stream reproducible and resumable: the order of
each epoch is a function of (seed, epoch) only, and every item is produced under RNGs seeded from its position
in that order, so a run resumed mid-epoch sees exactly the batches (captions, flips) an uninterrupted run sees,
whatever the number of workers or how far ahead Lightning prefetches.
"""
import random
from functools import partial

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from ldm.util import instantiate_from_config


class WrappedDataset(Dataset):
    """Wraps an arbitrary object with __len__ and __getitem__ into a pytorch dataset."""

    def __init__(self, dataset):
        self.data = dataset

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        return self.data[idx]


def worker_init_fn(_):
    """Give each worker of an iterable dataset its own shard and numpy stream."""
    info = torch.utils.data.get_worker_info()
    dataset = info.dataset
    if isinstance(dataset, IterableDataset) and hasattr(dataset, "valid_ids"):
        split = dataset.num_records // info.num_workers
        dataset.sample_ids = dataset.valid_ids[info.id * split:(info.id + 1) * split]
    np.random.seed((torch.initial_seed() + info.id) % 2 ** 32)


class SeededItems(Dataset):
    """Looks items up by (index, seed): python, numpy and torch RNGs are seeded for the lookup, then restored."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                np.random.seed(seed % 2 ** 32)
                torch.manual_seed(seed)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ResumableSampler(Sampler):
    """Yields (index, item_seed) for one rank; the order of a pass depends only on (seed, epoch).

    The sampler counts epochs itself, one per pass, rather than taking Lightning's `set_epoch`: Lightning counts
    a run stopped by max_steps as a finished epoch, so a resumed run would get the next epoch's order in the
    middle of the epoch it interrupted. `resume(epoch, skip)` makes the next pass continue `epoch` after
    `skip` items. It shards by rank itself, so Lightning must not wrap it in a DistributedSampler.
    """

    def __init__(self, length, shuffle, seed, num_replicas=1, rank=0):
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0  # of the pass under way, or of the next one when none has started
        self.start = 0  # items skipped at the start of that pass (a resumed pass)
        self._started = False

    def resume(self, epoch, skip):
        self.epoch, self.start, self._started = epoch, skip, False

    def __len__(self):
        return -(-self.length // self.num_replicas)

    def __iter__(self):
        if self._started:
            self.epoch, self.start = self.epoch + 1, 0
        self._started = True
        epoch, start = self.epoch, self.start
        order = torch.arange(self.length)
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + epoch))
        # pad so that every rank gets the same number of items, as DistributedSampler does
        order = torch.cat([order, order[:len(self) * self.num_replicas - self.length]])
        positions = list(range(self.rank, len(order), self.num_replicas))
        for pos in positions[start:]:
            item_seed = int(np.random.SeedSequence([self.seed, epoch, pos]).generate_state(1)[0])
            yield int(order[pos]), item_seed


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position Lightning saves in checkpoints and restores before iterating again.

    The position is the number of batches the training loop has consumed, not the number this loader has
    produced (Lightning fetches one batch ahead): the data module reports each batch as the loop takes it
    (`batch_consumed`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._consumed = None  # (epoch, batches consumed in it), once the loop has taken a batch

    def batch_consumed(self):
        epoch = self.sampler.epoch  # the pass the batch came from: the next pass starts only when asked for
        if self._consumed is None or self._consumed[0] != epoch:
            self._consumed = (epoch, self.sampler.start // self.batch_size)
        self._consumed = (epoch, self._consumed[1] + 1)

    def state_dict(self):
        epoch, consumed = self._consumed or (self.sampler.epoch, self.sampler.start // self.batch_size)
        if consumed >= len(self):
            epoch, consumed = epoch + 1, 0
        return {"epoch": epoch, "consumed_batches": consumed}

    def load_state_dict(self, state):
        self._consumed = None
        self.sampler.resume(state["epoch"], state["consumed_batches"] * self.batch_size)


class DataModuleFromConfig(pl.LightningDataModule):
    def __init__(self, batch_size, train=None, validation=None, test=None, predict=None, wrap=False,
                 num_workers=None, shuffle_test_loader=False, use_worker_init_fn=False, shuffle_val_dataloader=False,
                 seed=None):
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers if num_workers is not None else batch_size * 2
        self.use_worker_init_fn = use_worker_init_fn
        self.wrap = wrap
        self.seed = seed
        self.dataset_configs = {k: v for k, v in dict(train=train, validation=validation, test=test,
                                                      predict=predict).items() if v is not None}
        self.datasets = {}
        self._train_loader = None
        # Lightning decides which loops to run from which of these methods exist
        if train is not None:
            self.train_dataloader = self._train_dataloader
        if validation is not None:
            self.val_dataloader = partial(self._eval_dataloader, "validation", shuffle_val_dataloader)
        if test is not None:
            self.test_dataloader = partial(self._eval_dataloader, "test", shuffle_test_loader)
        if predict is not None:
            self.predict_dataloader = partial(self._eval_dataloader, "predict", False)

    def setup(self, stage=None):
        for k, cfg in self.dataset_configs.items():
            if k not in self.datasets:
                dataset = instantiate_from_config(cfg)
                self.datasets[k] = WrappedDataset(dataset) if self.wrap else dataset

    def _base_seed(self):
        if self.seed is not None:
            return int(self.seed)
        return torch.initial_seed() % 2 ** 31  # set by seed_everything(--seed)

    def _rank_info(self):
        if self.trainer is not None:
            return self.trainer.world_size, self.trainer.global_rank
        return 1, 0

    def _loader(self, split, shuffle, cls=DataLoader, **kwargs):
        dataset = self.datasets[split]
        init_fn = worker_init_fn if self.use_worker_init_fn or isinstance(dataset, IterableDataset) else None
        common = dict(batch_size=self.batch_size, num_workers=self.num_workers, worker_init_fn=init_fn,
                      persistent_workers=False)
        if isinstance(dataset, IterableDataset):
            return DataLoader(dataset, **common)
        seed = self._base_seed()
        world, rank = self._rank_info()
        sampler = ResumableSampler(len(dataset), shuffle, seed, num_replicas=world, rank=rank)
        # a private generator, so that creating iterators does not advance the global torch RNG
        return cls(SeededItems(dataset), sampler=sampler, generator=torch.Generator().manual_seed(seed),
                   **common, **kwargs)

    def _train_dataloader(self):
        self._train_loader = self._loader("train", True, cls=ResumableDataLoader)
        return self._train_loader

    def on_before_batch_transfer(self, batch, dataloader_idx):
        # called once per batch the training loop takes (not for the batch Lightning fetches ahead)
        if self.trainer is not None and self.trainer.training and isinstance(self._train_loader, ResumableDataLoader):
            self._train_loader.batch_consumed()
        return batch

    def _eval_dataloader(self, split, shuffle):
        return self._loader(split, shuffle)
