"""Lightning callbacks of main.py: log directory setup, image grids, checkpoints on signals and crashes."""
import os
import signal
import tempfile
import time

import numpy as np
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_only

from ldm.checkpoint import atomic_write
from ldm.util import check_parameters, make_grid, named_parameters, to_pil


class RunInterrupted(Exception):
    """Training stopped on Ctrl-C after saving last.ckpt at a step boundary (main.py exits non-zero)."""


class SetupCallback(Callback):
    """Creates the run's directories and writes the merged project and lightning configs (rank zero)."""

    def __init__(self, resume, now, logdir, ckptdir, cfgdir, config, lightning_config):
        super().__init__()
        self.resume = resume
        self.now = now
        self.logdir = logdir
        self.ckptdir = ckptdir
        self.cfgdir = cfgdir
        self.config = config
        self.lightning_config = lightning_config

    def on_fit_start(self, trainer, pl_module):
        if trainer.global_rank != 0:
            return
        for d in (self.logdir, self.ckptdir, self.cfgdir):
            os.makedirs(d, exist_ok=True)
        if "metrics_over_trainsteps_checkpoint" in self.lightning_config.get("callbacks", {}):
            os.makedirs(os.path.join(self.ckptdir, "trainstep_checkpoints"), exist_ok=True)
        print("Project config")
        print(OmegaConf.to_yaml(self.config))
        save_config(self.config, os.path.join(self.cfgdir, f"{self.now}-project.yaml"))
        print("Lightning config")
        print(OmegaConf.to_yaml(self.lightning_config))
        save_config(OmegaConf.create({"lightning": self.lightning_config}),
                    os.path.join(self.cfgdir, f"{self.now}-lightning.yaml"))


def save_config(config, path):
    atomic_write(path, lambda tmp: OmegaConf.save(config, tmp))


def save_last_checkpoint(trainer, ckptdir):
    """Write ckptdir/last.ckpt now (all ranks take part: `trainer.save_checkpoint` synchronises them)."""
    path = os.path.join(ckptdir, "last.ckpt")
    if trainer.global_rank == 0:
        print(f"Summoning checkpoint: {path}")
    trainer.save_checkpoint(path)


class InterruptCheckpoint(Callback):
    """Saves last.ckpt when training stops early, so that `main.py -r LOGDIR` carries on exactly from there.

    - Ctrl-C (SIGINT): the current step finishes, last.ckpt is saved, and training stops (RunInterrupted);
      a second Ctrl-C stops at once, without saving a half-done step.
    - SIGUSR1 (where the platform has it): saved after the current step, and training goes on, like the
      original's `melk`.
    - SIGTERM: Lightning finishes the current step and raises SIGTERMException; saved from `on_exception`.
    - the step limit: saved at the end of training unless a checkpoint of that very step exists.
    - any other exception: saved from `on_exception` (single process; other ranks of a crashed DDP run would
      wait forever for the crashed one).
    Saving inside a signal handler itself could catch a half-done optimizer step, so handlers only set flags.
    """

    def __init__(self, ckptdir):
        super().__init__()
        self.ckptdir = ckptdir
        self._save_requested = False
        self._stop_requested = False
        self._saved_step = None
        self._previous_handlers = {}

    def _request_save(self, signum, frame):
        self._save_requested = True

    def _request_stop(self, signum, frame):
        if self._stop_requested:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self._stop_requested = True
        print("\nCtrl-C: stopping after this step and saving last.ckpt (press Ctrl-C again to stop at once).")

    def on_fit_start(self, trainer, pl_module):
        handlers = {signal.SIGINT: self._request_stop}
        if hasattr(signal, "SIGUSR1"):
            handlers[signal.SIGUSR1] = self._request_save
        for signum, handler in handlers.items():
            try:
                self._previous_handlers[signum] = signal.signal(signum, handler)
            except ValueError:  # not in the main thread: leave signals alone
                pass

    def on_fit_end(self, trainer, pl_module):
        self._restore_handlers()

    def _restore_handlers(self):
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self._saved_step = trainer.global_step

    def on_train_end(self, trainer, pl_module):
        # ModelCheckpoint(every_n_train_steps=N) does not save a run that ends between two multiples of N: without
        # this, last.ckpt and embeddings.pt would lag behind the finished run.
        if trainer.global_step > 0 and self._saved_step != trainer.global_step:
            save_last_checkpoint(trainer, self.ckptdir)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        save, stop = self._save_requested or self._stop_requested, self._stop_requested
        if trainer.world_size > 1:  # a signal reaches ranks at different steps: act together
            save = trainer.strategy.reduce_boolean_decision(save, all=False)
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if save:
            self._save_requested = False
            save_last_checkpoint(trainer, self.ckptdir)
        if stop:
            raise RunInterrupted(f"interrupted by Ctrl-C at step {trainer.global_step}; saved "
                                 f"{os.path.join(self.ckptdir, 'last.ckpt')}. Resume with: python main.py -r "
                                 f"{os.path.dirname(os.path.abspath(self.ckptdir))}")

    def on_exception(self, trainer, pl_module, exception):
        self._restore_handlers()
        if trainer.state.fn != TrainerFn.FITTING or trainer.global_step == 0:
            return  # nothing trained yet
        if self._saved_step == trainer.global_step or isinstance(exception, KeyboardInterrupt):
            if isinstance(exception, KeyboardInterrupt) and trainer.global_rank == 0:
                print("Stopped at once: last.ckpt is the last one saved before (resume goes on from there).")
            return
        if trainer.world_size > 1 and not isinstance(exception, SIGTERMException):
            return  # only this rank failed: the others cannot join a save
        if isinstance(exception, SIGTERMException) and trainer.global_rank == 0:
            print("Received SIGTERM: saving a checkpoint before exiting.")
        try:
            save_last_checkpoint(trainer, self.ckptdir)
        except OSError as err:  # e.g. the disk is full: keep the last good checkpoint, report the first error
            print(f"Could not save last.ckpt ({err.strerror}); the previous checkpoints are intact.")


class ImageLogger(Callback):
    """Every `batch_frequency` steps, saves grids of `pl_module.log_images(batch)` under <logdir>/images/<split>/.

    Sampling runs under a forked RNG so that logging images, or not, never changes what training draws.
    """

    def __init__(self, batch_frequency, max_images, clamp=True, increase_log_steps=True, rescale=True,
                 disabled=False, log_on_batch_idx=False, log_first_step=False, log_images_kwargs=None):
        super().__init__()
        self.batch_freq = batch_frequency
        self.max_images = max_images
        self.clamp = clamp
        self.rescale = rescale
        self.disabled = disabled
        self.log_on_batch_idx = log_on_batch_idx
        self.log_first_step = log_first_step
        self.log_images_kwargs = dict(log_images_kwargs or {})
        # early steps 1, 2, 4, ... are logged too, to see the start of a run
        self.log_steps = [2 ** n for n in range(int(np.log2(self.batch_freq)) + 1)] if increase_log_steps else []

    def check_frequency(self, check_idx):
        if check_idx > 0 or self.log_first_step:
            if check_idx % self.batch_freq == 0 or check_idx in self.log_steps:
                if check_idx in self.log_steps:
                    self.log_steps.remove(check_idx)
                return True
        return False

    @staticmethod
    def _save_dir(trainer):
        return trainer.logger.save_dir if trainer.logger is not None else trainer.default_root_dir

    @rank_zero_only
    def log_local(self, save_dir, split, images, global_step, current_epoch, batch_idx):
        root = os.path.join(save_dir, "images", split)
        os.makedirs(root, exist_ok=True)
        for k, imgs in images.items():
            grid = make_grid(imgs, nrow=4)
            if not self.rescale:  # images already in [0, 1]
                grid = grid * 2.0 - 1.0
            image = to_pil(grid)
            path = os.path.join(root, f"{k}_gs-{global_step:06}_e-{current_epoch:06}_b-{batch_idx:06}.jpg")
            atomic_write(path, lambda tmp: image.save(tmp, format="JPEG"))

    @rank_zero_only
    def log_to_loggers(self, trainer, images, split):
        """The grids to every logger that shows images: TensorBoard (add_image), wandb (log_image)."""
        for logger in trainer.loggers:
            add_image = getattr(getattr(logger, "experiment", None), "add_image", None)
            log_image = getattr(logger, "log_image", None)
            if not callable(add_image) and not callable(log_image):
                continue  # e.g. CSV
            for k, imgs in images.items():
                grid = make_grid(imgs, nrow=4)
                if not self.rescale:
                    grid = grid * 2.0 - 1.0
                if callable(log_image):
                    log_image(key=f"{split}/{k}", images=[to_pil(grid)], step=trainer.global_step)
                else:
                    add_image(f"{split}/{k}", (grid + 1.0) / 2.0, global_step=trainer.global_step)

    def on_fit_start(self, trainer, pl_module):
        # log_images swallows **kwargs: a misspelt key (say, the guidance scale) would silently do nothing
        log_images = getattr(pl_module, "log_images", None)
        if callable(log_images) and self.log_images_kwargs:
            check_parameters(log_images, self.log_images_kwargs,
                             f"lightning.callbacks.image_logger.params.log_images_kwargs "
                             f"({type(pl_module).__name__}.log_images)",
                             accepted=named_parameters(log_images) - {"batch"})

    def log_img(self, trainer, pl_module, batch, batch_idx, split="train"):
        check_idx = batch_idx if self.log_on_batch_idx else pl_module.global_step
        if self.max_images <= 0 or not callable(getattr(pl_module, "log_images", None)) \
                or not self.check_frequency(check_idx):
            return
        was_training = pl_module.training
        pl_module.eval()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            images = pl_module.log_images(batch, split=split, **self.log_images_kwargs)
        if was_training:
            pl_module.train()
        images = {k: v[:self.max_images].detach().float().cpu() for k, v in images.items()
                  if isinstance(v, torch.Tensor)}
        if self.clamp:
            images = {k: v.clamp(-1.0, 1.0) for k, v in images.items()}
        self.log_local(self._save_dir(trainer), split, images, pl_module.global_step, pl_module.current_epoch,
                       batch_idx)
        self.log_to_loggers(trainer, images, split)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.disabled and (pl_module.global_step > 0 or self.log_first_step):
            self.log_img(trainer, pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not self.disabled and pl_module.global_step > 0 and not trainer.sanity_checking:
            self.log_img(trainer, pl_module, batch, batch_idx, split="val")


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ThreadShare(Callback):
    """Gives each concurrent training on this machine an equal share of the CPU cores.

    torch uses every core by default, so two runs at once oversubscribe the machine and each slows down several
    times. Each run registers its pid in a folder of the temporary directory and, every `every_n_steps`, sets
    its thread count to cores // (live runs). Does nothing when OMP_NUM_THREADS says how many threads to use.
    """

    def __init__(self, every_n_steps=20, registry=None):
        super().__init__()
        self.every_n_steps = every_n_steps
        self.registry = registry or os.path.join(tempfile.gettempdir(), "textual-inversion-runs")
        self.active = "OMP_NUM_THREADS" not in os.environ
        self._entry = None

    def live_runs(self):
        alive = 0
        for name in os.listdir(self.registry):
            try:
                os.kill(int(name), 0)
                alive += 1
            except (ValueError, ProcessLookupError):
                try:
                    os.remove(os.path.join(self.registry, name))  # a run that died without unregistering
                except OSError:
                    pass
            except PermissionError:  # another user's live process
                alive += 1
        return max(alive, 1)

    def share(self):
        threads = max(1, available_cores() // self.live_runs())
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads

    def on_fit_start(self, trainer, pl_module):
        if not self.active or trainer.strategy.root_device.type != "cpu":
            self.active = False
            return
        try:
            os.makedirs(self.registry, exist_ok=True)
            self._entry = os.path.join(self.registry, str(os.getpid()))
            open(self._entry, "w").close()
        except OSError:
            self.active = False
            return
        self.share()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.active and trainer.global_step % self.every_n_steps == 0:
            self.share()

    def _unregister(self):
        if self._entry is not None:
            try:
                os.remove(self._entry)
            except OSError:
                pass
            self._entry = None

    def on_fit_end(self, trainer, pl_module):
        self._unregister()

    def on_exception(self, trainer, pl_module, exception):
        self._unregister()


def format_duration(seconds):
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"


class RunProgress(Callback):
    """One line every `every_n_steps` (default: a twentieth of the run) with the whole run's progress, its
    speed over the steps this process trained, and the time left to max_steps."""

    def __init__(self, every_n_steps=None):
        super().__init__()
        self.every_n_steps = every_n_steps
        self._start = None

    def on_train_start(self, trainer, pl_module):
        self._start = (time.time(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        total, step = trainer.max_steps, trainer.global_step
        every = self.every_n_steps or max(1, total // 20 if total and total > 0 else 50)
        if self._start is None or trainer.global_rank != 0 or step == self._start[1] or step % every:
            return
        per_step = (time.time() - self._start[0]) / (step - self._start[1])
        if total and total > 0:
            print(f"step {step}/{total} ({100 * step / total:.0f}%), {per_step:.2f} s/step, "
                  f"{format_duration(per_step * (total - step))} left")
        else:
            print(f"step {step} (no --max_steps: no end to count down to), {per_step:.2f} s/step")


class CUDACallback(Callback):
    """Reports each epoch's time and peak GPU memory (nothing to do on other devices)."""

    def _on_cuda(self, trainer):
        return trainer.strategy.root_device.type == "cuda"

    def on_train_epoch_start(self, trainer, pl_module):
        if self._on_cuda(trainer):
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
            torch.cuda.synchronize(trainer.strategy.root_device)
        self.start_time = time.time()

    def on_train_epoch_end(self, trainer, pl_module):
        if not self._on_cuda(trainer):
            return
        torch.cuda.synchronize(trainer.strategy.root_device)
        max_memory = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2 ** 20
        epoch_time = time.time() - self.start_time
        max_memory = trainer.strategy.reduce(torch.tensor(max_memory, device=pl_module.device)).item()
        epoch_time = trainer.strategy.reduce(torch.tensor(epoch_time, device=pl_module.device)).item()
        rank_zero_info(f"Average Epoch time: {epoch_time:.2f} seconds")
        rank_zero_info(f"Average Peak memory {max_memory:.2f}MiB")
