"""Training entry point: `python main.py --base CONFIG.yaml -t --actual_resume MODEL.ckpt --data_root IMAGES ...`.

Configs (`-b`, merged left to right, then `nested.key=value` dotlist arguments) hold `model`, `data` and an
optional `lightning` block (`trainer`, `logger`, `modelcheckpoint`, `callbacks`); trainer flags given on the
command line override `lightning.trainer`. A run writes logs/<data folder><time>_<name>/ with checkpoints/
(Lightning checkpoints, embeddings.pt, embeddings_gs-<step>.pt, embeddings.safetensors), configs/ (the merged
configs), images/ and a CSV log. Options named as AUTOMATIC1111, diffusers and kohya name them: ldm/train_options.py.
`-r LOGDIR` (or a checkpoint inside it) resumes that run's training exactly where it stopped, with the seed it
was started with; a damaged last.ckpt falls back to the newest good checkpoint.

Configs are code: every `target:` in them is imported and called. On `-r`, a run's saved configs may only name
this project's modules (and a few Lightning/torch classes) unless `--trust_config` is given.
"""
import argparse
import datetime
import glob
import os
import sys
import warnings

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning import seed_everything
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.strategies import DDPStrategy

from ldm.callbacks import (ImageLogger, InterruptCheckpoint, RunInterrupted, SetupCallback,  # noqa: F401 (YAML targets)
                           ThreadShare)
from ldm.checkpoint import CheckpointError, SafeCheckpointIO, check_weights
from ldm.cli_checks import user_error_message
from ldm.config_trust import check_config_targets, load_yaml
from ldm.data.datamodule import DataModuleFromConfig, WrappedDataset  # noqa: F401 (YAML targets)
from ldm.run import DEFAULT_SEED, UsageError, choose_resume_checkpoint, choose_seed, claim_run_dir, resolve_run_dir
from ldm.train_options import OptionError, add_arguments, apply_training_options, describe_learning_rate, \
    describe_outputs
from ldm.util import ConfigError, check_parameters, instantiate_from_config

if __name__ == "__main__":
    # configs name `main.DataModuleFromConfig`: let that find this module instead of importing main.py twice
    sys.modules.setdefault("main", sys.modules[__name__])

LOGGERS = ("csv", "tensorboard", "wandb")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Trainer options exposed as flags: name -> argparse type. Unset flags leave `lightning.trainer` alone.
TRAINER_FLAGS = {
    "max_steps": (int, "stop after this many optimizer steps (raise it to train a finished run further with -r)"),
    "max_epochs": (int, "stop after this many passes over the (repeated) images"),
    "accelerator": (str, "cpu, gpu, mps or auto"),
    "devices": (str, "how many devices, or which: 2, or 0,1"),
    "strategy": (str, "e.g. ddp (chosen for you with several devices)"),
    "precision": (str, "32, bf16-mixed (frozen UNet in bf16, embedding in fp32) or 16-mixed"),
    "accumulate_grad_batches": (int, "batches per optimizer step"),
    "num_nodes": (int, "machines of a multi-node run"),
    "gpus": (str, "the original's flag: GPU indices, e.g. 0, or 0,1 (sets accelerator and devices)"),
    "log_every_n_steps": (int, "write metrics every N steps"),
    "check_val_every_n_epoch": (int, "validate every N epochs"),
    "limit_val_batches": (str, "validation batches per check: a count, or a fraction such as 0.5"),
}


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError("Boolean value expected.")


def get_parser(**parser_kwargs):
    parser = argparse.ArgumentParser(**parser_kwargs)
    flag = dict(type=str2bool, nargs="?", const=True)
    parser.add_argument("-n", "--name", type=str, const=True, default="", nargs="?", help="postfix for logdir")
    parser.add_argument("-r", "--resume", type=str, const=True, default="", nargs="?",
                        help="resume from logdir or checkpoint in logdir")
    parser.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=list(),
                        help="paths to base configs, merged left to right; override keys with `nested.key=value`")
    parser.add_argument("-t", "--train", default=False, help="train", **flag)
    parser.add_argument("--no-test", default=False, help="disable test", **flag)
    parser.add_argument("-d", "--debug", default=False, help="enable post-mortem debugging", **flag)
    parser.add_argument("-s", "--seed", type=int, default=None,
                        help=f"seed for seed_everything (default {DEFAULT_SEED}; -r reuses the run's)")
    parser.add_argument("-f", "--postfix", type=str, default="", help="post-postfix for default name")
    parser.add_argument("-l", "--logdir", type=str, default="logs", help="directory for logging")
    parser.add_argument("--scale_lr", default=True, help="scale base-lr by ngpu * batch_size * n_accumulate",
                        **flag)
    parser.add_argument("--datadir_in_name", default=True,
                        help="prepend the final directory of --data_root to the output directory name", **flag)
    parser.add_argument("--actual_resume", type=str, help="path to the model weights to start from")
    parser.add_argument("--data_root", type=str, help="path to the directory with training images")
    parser.add_argument("--embedding_manager_ckpt", type=str, default="",
                        help="initialise the embedding manager from an embedding file")
    parser.add_argument("--placeholder_string", type=str,
                        help="placeholder string for the concept in prompts (overrides the configs)")
    parser.add_argument("--init_word", type=str, help="word whose embedding initialises the placeholder")
    parser.add_argument("--logger", type=str, default="csv",
                        help="where metrics and image grids go, comma-separated: csv (default), tensorboard, wandb "
                             "(the last two are optional extras)")
    parser.add_argument("--trust_config", default=False, **flag,
                        help="on -r, allow the run's configs to name targets outside this project's modules")
    trainer = parser.add_argument_group("trainer", "override lightning.trainer of the configs (Lightning's "
                                        "Trainer arguments of the same names)")
    for name, (kind, text) in TRAINER_FLAGS.items():
        trainer.add_argument(f"--{name}", type=kind, default=None, help=text)
    return add_arguments(parser)




# ----------------------------------------------------------------------------------------------------- configs
def load_config(opt, unknown):
    """Merge the base configs and the dotlist overrides; -> (config without `lightning` and `run`, lightning
    config, run config: what main.py itself records about the run, e.g. its seed)."""
    for path in opt.base:
        if not os.path.isfile(path):
            raise UsageError(f"Config file {path} not found: check the path given to -b/--base "
                             "(configs live under configs/, e.g. configs/stable-diffusion/v1-finetune.yaml).")
    bad = [arg for arg in unknown if "=" not in arg or arg.startswith("-")]
    if bad:
        raise UsageError(f"Unrecognised arguments {bad}: config overrides take the form nested.key=value.")
    try:
        overrides = OmegaConf.from_dotlist(unknown)
    except Exception as err:
        raise UsageError(f"Could not parse the overrides {unknown}: {err}") from None
    config = OmegaConf.merge(*[load_yaml(p) for p in opt.base], overrides)
    lightning_config = config.pop("lightning", OmegaConf.create())
    run_config = config.pop("run", OmegaConf.create())
    if "model" not in config:
        raise UsageError(f"No `model:` in the configs {opt.base}: give a training config with -b/--base.")
    return config, lightning_config, run_config


def _has_images(folder):
    for _, _, files in os.walk(folder):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            return True
    return False


def apply_cli_to_config(opt, config):
    """Write --data_root, --placeholder_string, --init_word, --embedding_manager_ckpt, --actual_resume into config."""
    data_splits = [config.data.params[s] for s in ("train", "validation") if s in config.get("data", {}).get(
        "params", {})]
    if opt.data_root:
        if not os.path.isdir(opt.data_root):
            raise UsageError(f"--data_root {opt.data_root} is not a directory: point it at the folder that holds "
                             "your 3-5 training images.")
        if not _has_images(opt.data_root):
            raise UsageError(f"--data_root {opt.data_root} contains no images ({', '.join(IMAGE_EXTENSIONS)}): "
                             "put your training images there.")
        for split in data_splits:
            split.params.data_root = opt.data_root

    for flag in ("placeholder_string", "init_word"):
        value = getattr(opt, flag)
        if value is not None and not value.strip():
            raise UsageError(f"--{flag} is empty: give a word (e.g. --{flag} "
                             f"{'*' if flag == 'placeholder_string' else 'dog'}) or leave the flag out.")
    if opt.placeholder_string and opt.placeholder_string.isalpha():
        warnings.warn(f"--placeholder_string {opt.placeholder_string!r} is an ordinary word: every prompt that uses "
                      "the word will get the learned concept instead. A rare string such as '*' avoids that.")
    personalization = config.model.params.get("personalization_config")
    wants_personalization = opt.placeholder_string or opt.init_word or opt.embedding_manager_ckpt
    if wants_personalization and personalization is None:
        raise UsageError("--placeholder_string / --init_word / --embedding_manager_ckpt need a config with "
                         "model.params.personalization_config (e.g. configs/stable-diffusion/v1-finetune.yaml).")
    if personalization is not None:
        if opt.embedding_manager_ckpt:
            if not os.path.isfile(opt.embedding_manager_ckpt):
                raise UsageError(f"--embedding_manager_ckpt {opt.embedding_manager_ckpt} not found.")
            config.model.params.embedding_manager_ckpt = opt.embedding_manager_ckpt
        if opt.placeholder_string:
            personalization.params.placeholder_strings = [opt.placeholder_string]
            # the original never passed this on, and its captions kept "*"
            for split in data_splits:
                split.params.placeholder_token = opt.placeholder_string
        if opt.init_word:
            words = list(personalization.params.get("initializer_words") or [])
            personalization.params.initializer_words = [opt.init_word] + words[1:]

    if opt.actual_resume:
        if not os.path.isfile(opt.actual_resume):
            raise UsageError(f"--actual_resume {opt.actual_resume} not found: give the path of the model weights "
                             "(.ckpt or .safetensors) to start from.")
        # The model loads it in its constructor, before the embedding manager reads the initializer words from
        # the text encoder; recorded in the saved config, so that -r reloads the frozen weights.
        config.model.params.ckpt_path = os.path.abspath(opt.actual_resume)


def build_model(config):
    print(f"Loading model {config.model.target}"
          + (f" from {config.model.params.ckpt_path}" if config.model.params.get("ckpt_path") else ""))
    try:
        return instantiate_from_config(config.model)
    except ConfigError as e:  # an unknown key, named with the closest valid one
        raise UsageError(str(e)) from None
    except CheckpointError as e:  # a weights file that does not fit the config
        raise UsageError(f"--actual_resume / model.params.ckpt_path: {e}") from None
    except ValueError as e:  # e.g. an init word of more tokens than num_vectors_per_token
        raise UsageError(f"Could not build the model: {e}") from None


def check_resume_weights(model, ckpt, path):
    """The run's checkpoint must hold every trainable weight of the model the configs build, in its shapes;
    the frozen weights a textual-inversion checkpoint deliberately leaves out come from the base model."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    frozen = tuple(k for k in model.state_dict() if k not in trainable) \
        if getattr(model, "prunes_checkpoints", False) else ()
    try:
        absent, _ = check_weights(model, ckpt["state_dict"], path, optional=frozen)
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    if absent:
        print(f"{path}: the learned weights and the optimizer state; its {len(absent)} frozen weights are not in "
              "it by design and come from the base model (model.params.ckpt_path).")


# ----------------------------------------------------------------------------------------------------- trainer
def _parse_devices(value):
    """'2' -> 2, '0,1' or '1,' -> [0, 1] / [1], 'auto' and -1 stay."""
    if value is None or isinstance(value, (int, list)) or OmegaConf.is_list(value):
        return list(value) if OmegaConf.is_list(value) else value
    value = str(value).strip()
    if "," in value:
        return [int(v) for v in value.split(",") if v.strip()]
    return int(value) if value.lstrip("-").isdigit() else value


def _count_devices(accelerator, devices):
    if isinstance(devices, list):
        return len(devices)
    if isinstance(devices, int) and devices >= 0:
        return devices
    if accelerator in ("gpu", "cuda", "auto", None):
        return torch.cuda.device_count() or 1
    return 1


def trainer_options(opt, lightning_config):
    """lightning.trainer, overridden by the trainer flags, in Lightning 2.x terms (recorded back in the config)."""
    options = OmegaConf.to_container(lightning_config.get("trainer", OmegaConf.create()), resolve=True)
    for name in TRAINER_FLAGS:
        value = getattr(opt, name)
        if value is not None:
            options[name] = value
    if "resume_from_checkpoint" in options:
        raise UsageError("lightning.trainer.resume_from_checkpoint is gone in Lightning 2.x: use -r CHECKPOINT.")
    if options.get("accelerator") in ("ddp", "ddp_spawn", "dp"):  # Lightning 1.x spelling
        options["strategy"] = options.pop("accelerator")
    gpus = options.pop("gpus", None)
    if gpus is not None:  # "0," style, as the original took it
        options["accelerator"] = "gpu"
        options["devices"] = _parse_devices(gpus)
        print(f"Running on GPUs {gpus}")
    if "devices" in options:
        options["devices"] = _parse_devices(options["devices"])
    if "limit_val_batches" in options and isinstance(options["limit_val_batches"], str):
        v = options["limit_val_batches"]
        options["limit_val_batches"] = float(v) if "." in v else int(v)
    if options.get("precision") is not None and str(options["precision"]).isdigit():
        options["precision"] = int(options["precision"])
    check_parameters(pl.Trainer, options, "lightning.trainer")
    lightning_config.trainer = options
    return dict(options)


def _find_unused_parameters(config):
    """DDP must look for unused parameters when some embedding vectors sit out a step."""
    personalization = config.model.params.get("personalization_config")
    if personalization is None:
        return False
    p = personalization.params
    return bool(p.get("per_image_tokens") or p.get("progressive_words") or len(p.get("placeholder_strings", [])) > 1)


def build_loggers(lightning_config, logdir, nowname, opt):
    """`lightning.logger` from the configs, else --logger: csv (default), tensorboard, wandb (offline unless
    WANDB_MODE=online). TensorBoard and wandb are optional extras: `pip install -e .[tensorboard]` / `.[wandb]`."""
    if "logger" in lightning_config:
        return [instantiate_from_config(lightning_config.logger)]
    kinds = [k.strip() for k in opt.logger.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in LOGGERS]
    if unknown or not kinds:
        raise UsageError(f"--logger {opt.logger}: choose one or more of {', '.join(LOGGERS)}, comma-separated.")
    loggers = []
    for kind in dict.fromkeys(kinds):
        try:
            if kind == "csv":
                loggers.append(CSVLogger(save_dir=logdir, name="csv"))
            elif kind == "tensorboard":
                from pytorch_lightning.loggers import TensorBoardLogger
                loggers.append(TensorBoardLogger(save_dir=logdir, name="tensorboard"))
            else:
                from pytorch_lightning.loggers import WandbLogger
                offline = os.environ.get("WANDB_MODE", "offline") != "online"
                loggers.append(WandbLogger(save_dir=logdir, name=nowname, offline=offline))
        except ModuleNotFoundError as err:
            raise UsageError(f"--logger {kind} needs {err.name or kind}, which is not installed: "
                             f"pip install -e .[{kind}]") from None
    return loggers


def build_callbacks(opt, model, config, lightning_config, now, logdir, ckptdir, cfgdir):
    modelckpt_cfg = OmegaConf.create({
        "target": "pytorch_lightning.callbacks.ModelCheckpoint",
        # A run folder is this run's alone, so a name that exists is this run's own older file: overwrite it.
        # Lightning's version counter wrote a resumed run's checkpoints to last-v1.ckpt, and `-r` read last.ckpt.
        "params": {"dirpath": ckptdir, "filename": "{epoch:06}", "verbose": True, "save_last": True,
                   "enable_version_counter": False},
    })
    monitor = getattr(model, "monitor", None)
    # an "_ema" metric only exists when the model keeps an EMA; monitoring a metric never logged is an error
    if monitor and (not monitor.endswith("_ema") or getattr(model, "use_ema", False)):
        print(f"Monitoring {monitor} as checkpoint metric.")
        modelckpt_cfg.params.monitor = monitor
        modelckpt_cfg.params.save_top_k = 1
    modelckpt_cfg = OmegaConf.merge(modelckpt_cfg, lightning_config.get("modelcheckpoint", OmegaConf.create()))
    print(f"Merged modelckpt-cfg: \n{modelckpt_cfg}")

    defaults = {
        "image_logger": {"target": "ldm.callbacks.ImageLogger",
                         "params": {"batch_frequency": 750, "max_images": 4, "clamp": True}},
        "learning_rate_logger": {"target": "pytorch_lightning.callbacks.LearningRateMonitor",
                                 "params": {"logging_interval": "step"}},
        "cuda_callback": {"target": "ldm.callbacks.CUDACallback"},
        "progress": {"target": "ldm.callbacks.RunProgress"},
        "checkpoint_callback": modelckpt_cfg,
    }
    user_cfg = lightning_config.get("callbacks", OmegaConf.create())
    if "metrics_over_trainsteps_checkpoint" in user_cfg:
        print("Caution: Saving checkpoints every n train steps without deleting. This might require some free space.")
        defaults["metrics_over_trainsteps_checkpoint"] = {
            "target": "pytorch_lightning.callbacks.ModelCheckpoint",
            "params": {"dirpath": os.path.join(ckptdir, "trainstep_checkpoints"), "filename": "{epoch:06}-{step:09}",
                       "verbose": True, "save_top_k": -1, "every_n_train_steps": 10000, "save_weights_only": True}}
    callbacks_cfg = OmegaConf.merge(defaults, user_cfg)
    callbacks_cfg.pop("ignore_keys_callback", None)  # Lightning 1.x only
    callbacks = [SetupCallback(resume=opt.resume, now=now, logdir=logdir, ckptdir=ckptdir, cfgdir=cfgdir,
                               config=config, lightning_config=lightning_config),
                 InterruptCheckpoint(ckptdir), ThreadShare()]
    return callbacks + [instantiate_from_config(callbacks_cfg[k]) for k in callbacks_cfg]


def build_trainer(opt, options, model, data, config, lightning_config, now, logdir, ckptdir, cfgdir, nowname):
    kwargs = dict(options)
    n_devices = _count_devices(kwargs.get("accelerator"), kwargs.get("devices", "auto"))
    if "strategy" not in kwargs and n_devices * kwargs.get("num_nodes", 1) > 1:
        kwargs["strategy"] = DDPStrategy(find_unused_parameters=_find_unused_parameters(config))
    if isinstance(data, DataModuleFromConfig):
        kwargs.setdefault("use_distributed_sampler", False)  # its sampler shards by rank (and resumes) itself
    kwargs.update(
        plugins=[SafeCheckpointIO()],
        default_root_dir=logdir,
        logger=build_loggers(lightning_config, logdir, nowname, opt),
        callbacks=build_callbacks(opt, model, config, lightning_config, now, logdir, ckptdir, cfgdir),
    )
    trainer = pl.Trainer(**kwargs)
    trainer.logdir = logdir  # scripts of the original read it
    return trainer


def set_learning_rate(opt, model, config, trainer):
    bs, base_lr = config.data.params.batch_size, config.model.base_learning_rate
    factors = (trainer.accumulate_grad_batches, trainer.num_devices, bs)
    model.learning_rate = factors[0] * factors[1] * factors[2] * base_lr if opt.scale_lr else base_lr
    print(describe_learning_rate(model, config, opt.scale_lr, factors))


# ------------------------------------------------------------------------------------------------------------ run
def _data_setup(data):
    try:
        data.setup()
    except ConfigError as err:
        raise UsageError(str(err)) from None
    except (FileNotFoundError, ValueError) as err:  # a missing folder, no readable images
        raise UsageError(f"Could not build the datasets: {err}") from None


def _steps_left(ckpt, options, path):
    max_steps = options.get("max_steps", -1)
    if max_steps is not None and 0 <= max_steps <= ckpt["global_step"]:
        raise UsageError(f"The run already trained {ckpt['global_step']} steps ({path}) and max_steps is "
                         f"{max_steps}: nothing to do. Pass --max_steps N (N > {ckpt['global_step']}) to train on.")


def main(argv=None):
    """Parse `argv` (default: sys.argv[1:]), train and/or test; returns the trainer."""
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    opt, unknown = get_parser().parse_known_args(argv)
    logdir, nowname, resume_ckpt = resolve_run_dir(opt, now)
    if opt.resume:
        check_config_targets(sorted(glob.glob(os.path.join(logdir, "configs", "*.yaml"))), opt.trust_config)
        resume_ckpt, resume_state = choose_resume_checkpoint(logdir, resume_ckpt, os.path.isfile(opt.resume))
    config, lightning_config, run_config = load_config(opt, unknown)
    seed = choose_seed(opt, run_config)
    seed_everything(seed)
    apply_cli_to_config(opt, config)

    train = opt.train or bool(opt.resume)  # resuming a run resumes its training
    has_test = not opt.no_test and "test" in config.get("data", {}).get("params", {})
    if not train and not has_test:
        raise UsageError("Nothing to do: add -t to train (a new run), or -r LOGDIR to resume one.")
    options = trainer_options(opt, lightning_config)
    try:
        apply_training_options(opt, config, lightning_config, options)
    except OptionError as err:
        raise UsageError(str(err)) from None
    if opt.resume:
        _steps_left(resume_state, options, resume_ckpt)

    model = build_model(config)
    if opt.resume:
        check_resume_weights(model, resume_state, resume_ckpt)
        del resume_state
    try:
        data = instantiate_from_config(config.data)
    except ConfigError as err:
        raise UsageError(str(err)) from None
    # building the datasets here reports a bad data folder before any training starts
    _data_setup(data)
    if not opt.resume:
        logdir = claim_run_dir(logdir)
    ckptdir, cfgdir = os.path.join(logdir, "checkpoints"), os.path.join(logdir, "configs")
    config.run = {"seed": seed}  # saved with the run's config, so that -r continues with it
    trainer = build_trainer(opt, options, model, data, config, lightning_config, now, logdir, ckptdir, cfgdir, nowname)
    print("#### Data #####")
    for k, dataset in getattr(data, "datasets", {}).items():
        print(f"{k}, {dataset.__class__.__name__}, {len(dataset)}")
    set_learning_rate(opt, model, config, trainer)

    try:
        if train:
            trainer.fit(model, data, ckpt_path=resume_ckpt)
        if has_test and not trainer.interrupted:
            trainer.test(model, data)
        if trainer.global_rank == 0:
            print(describe_outputs(logdir))
    except Exception:
        if opt.debug and trainer.global_rank == 0:
            import pdb
            pdb.post_mortem()
        raise
    finally:
        # keep debug runs apart from real ones
        if opt.debug and not opt.resume and trainer.global_rank == 0 and os.path.isdir(logdir):
            dst = os.path.join(os.path.dirname(logdir), "debug_runs", os.path.basename(logdir))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.rename(logdir, dst)
    return trainer


def one_line_error(err):
    """The message main.py prints for an error users can fix, or None for a bug (which keeps its traceback)."""
    if err is None:
        return None
    return str(err) if isinstance(err, UsageError) else user_error_message(err)


def cli():
    try:
        main()
    except RunInterrupted as stop:
        sys.exit(f"main.py: {stop}")
    except Exception as err:
        message = one_line_error(err) or one_line_error(err.__cause__ or err.__context__)
        if message is None:
            raise
        sys.exit(f"main.py: error: {message}")


if __name__ == "__main__":
    cli()
