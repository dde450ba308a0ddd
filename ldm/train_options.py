"""main.py's flags in the words of AUTOMATIC1111, diffusers' and kohya's training scripts, each written into a
config key, so that the YAML configs and the command line stay one mechanism and a run's saved config records
what it was given (and `-r` continues with it).

| flag | config key |
|---|---|
| --learning_rate R (or "0.005:100, 1e-3:1000, 1e-5") | model.base_learning_rate (+ model.params.scheduler_config) |
| --lr_scheduler NAME, --lr_warmup_steps N | model.params.scheduler_config (ldm.lr_scheduler.LambdaPeerScheduler) |
| --save_every_n_steps N | lightning.modelcheckpoint.params.every_n_train_steps |
| --validation_prompt P (repeatable), --validation_prompts_file F | ...log_images_kwargs.validation_prompts |
| --validation_steps N | lightning.callbacks.image_logger.params.batch_frequency (and its log_images_kwargs) |
| --negative_prompt P | ...log_images_kwargs.negative_prompt |
| --learnable_property, --templates F, --caption_extension E, --crop C, --background B | data.params.{train,validation}.params.* |
"""
import os

from omegaconf import OmegaConf

from ldm.data.image_ops import background_colour
from ldm.data.personalized import CROP_MODES, LEARNABLE_PROPERTIES, read_templates
from ldm.lr_scheduler import PEER_SCHEDULES, LambdaPeerScheduler, parse_step_rates
from ldm.txt2img_common import read_prompts
from ldm.util import instantiate_from_config

IMAGE_LOGGER = "callbacks.image_logger.params"


class OptionError(ValueError):
    """A training flag that cannot be used as given (main.py reports it in one line)."""


def add_arguments(parser):
    group = parser.add_argument_group("training options as AUTOMATIC1111, diffusers and kohya name them")
    group.add_argument("--learning_rate", type=str, default=None,
                       help="the base learning rate (model.base_learning_rate), or AUTOMATIC1111's step schedule, "
                            "e.g. '0.005:100, 1e-3:1000, 1e-5' (each rate until that step; without --max_steps "
                            "training ends at the last step given, as in the webui)")
    group.add_argument("--lr_scheduler", choices=PEER_SCHEDULES, default=None,
                       help="learning-rate schedule, as diffusers/kohya name them (default: the config's, constant "
                            "for the finetune configs); linear and cosine decay to 0 at --max_steps")
    group.add_argument("--lr_warmup_steps", type=int, default=None,
                       help="steps of linear warm-up from 0 (with --lr_scheduler; default 0)")
    group.add_argument("--save_every_n_steps", type=int, default=None,
                       help="write last.ckpt and embeddings_gs-<step>.pt/embeddings.pt every N steps")
    group.add_argument("--validation_prompt", action="append", default=None,
                       help="a prompt sampled into the image log instead of 'a photo of *' (repeat the flag "
                            "for several); images/train/samples_validation_<i>_gs-*.jpg")
    group.add_argument("--validation_prompts_file", type=str, default=None,
                       help="a file of validation prompts, one per line")
    group.add_argument("--validation_steps", type=int, default=None,
                       help="sample the image log every N steps")
    group.add_argument("--negative_prompt", type=str, default=None,
                       help="negative prompt of the image log's guided samples")
    group.add_argument("--learnable_property", choices=LEARNABLE_PROPERTIES, default=None,
                       help="object (captions 'a photo of a *') or style ('a painting in the style of *')")
    group.add_argument("--templates", type=str, default=None,
                       help="a file of caption templates, one per line, each with {} where the placeholder goes")
    group.add_argument("--caption_extension", type=str, default=None,
                       help="captions beside the images: <image name><ext> holds that image's caption "
                            "(default .txt; 'none' to ignore such files)")
    group.add_argument("--crop", choices=CROP_MODES, default=None,
                       help="non-square images: center (crop the middle square), random (a square at one of 8 "
                            "places along the long side, drawn per example) or none (resize to a square, "
                            "distorting; a warning names images stretched by more than 25%%)")
    group.add_argument("--background", type=str, default=None,
                       help="colour that transparent pixels of the training images are composited onto: a name, "
                            "#rrggbb or 'r,g,b' (default white)")
    return parser


def _data_splits(config):
    params = config.get("data", {}).get("params", {})
    return [params[s].setdefault("params", {}) for s in ("train", "validation") if s in params]


def _set(node, dotted, value):
    OmegaConf.update(node, dotted, value, merge=True)


def validation_prompts(opt):
    prompts = list(opt.validation_prompt or [])
    if opt.validation_prompts_file:
        if not os.path.isfile(opt.validation_prompts_file):
            raise OptionError(f"--validation_prompts_file {opt.validation_prompts_file} not found: give a text file "
                              "with one prompt per line.")
        prompts += read_prompts(opt.validation_prompts_file)
    if any(not p.strip() for p in prompts):
        raise OptionError("--validation_prompt is empty: give some text, e.g. 'a photo of * on a beach'.")
    return prompts


def learning_rate_options(opt, config, options):
    """--learning_rate / --lr_scheduler / --lr_warmup_steps into the model config; may set options['max_steps']
    (an AUTOMATIC1111 schedule ends training at its last step unless --max_steps says otherwise)."""
    if opt.learning_rate is not None:
        try:
            pairs = parse_step_rates(opt.learning_rate)
        except ValueError as err:
            raise OptionError(f"--learning_rate: {err}") from None
        config.model.base_learning_rate = pairs[0][0]
        if len(pairs) > 1 or pairs[0][1] is not None:
            if opt.lr_scheduler is not None:
                raise OptionError("--learning_rate with steps is a schedule of its own: drop --lr_scheduler, "
                                  "or give --learning_rate one number.")
            config.model.params.scheduler_config = {"target": "ldm.lr_scheduler.LambdaStepScheduler",
                                                    "params": {"rates": opt.learning_rate}}
            last_end = pairs[-1][1]
            if last_end is not None and opt.max_steps is None:
                options["max_steps"] = last_end
    if opt.lr_warmup_steps is not None and opt.lr_scheduler is None:
        raise OptionError("--lr_warmup_steps needs --lr_scheduler (e.g. constant_with_warmup or cosine).")
    if opt.lr_scheduler is not None:
        max_steps = options.get("max_steps")
        params = {"name": opt.lr_scheduler, "warmup_steps": opt.lr_warmup_steps or 0,
                  "total_steps": max_steps if max_steps is not None and max_steps > 0 else None}
        try:
            LambdaPeerScheduler(**params)
        except ValueError as err:
            raise OptionError(f"--lr_scheduler: {err}") from None
        config.model.params.scheduler_config = {"target": "ldm.lr_scheduler.LambdaPeerScheduler", "params": params}


def caption_extension(flag):
    """--caption_extension: 'none' -> None; 'txt' -> '.txt' (kohya writes the dot, users often do not)."""
    if flag.lower() == "none":
        return None
    return flag if flag.startswith(".") else "." + flag


def data_options(opt, config):
    templates = None
    if opt.templates is not None:
        try:
            templates = read_templates(opt.templates)
        except (OSError, ValueError) as err:
            raise OptionError(f"--templates: {err}") from None
    background = None
    if opt.background is not None:
        text = opt.background.strip()
        try:
            background = list(background_colour(text.split(",") if "," in text else text))
        except ValueError as err:
            raise OptionError(f"--{err}") from None
    for split in _data_splits(config):
        if background is not None:
            split.background = background
        if opt.learnable_property is not None:
            split.learnable_property = opt.learnable_property
        if templates is not None:
            split.templates = templates
        if opt.caption_extension is not None:
            split.caption_extension = caption_extension(opt.caption_extension)
        if opt.crop is not None:
            split.crop = opt.crop
            split.pop("center_crop", None)


def logging_options(opt, lightning_config):
    for name in ("save_every_n_steps", "validation_steps"):
        value = getattr(opt, name)
        if value is not None and value < 1:
            raise OptionError(f"--{name} {value}: give a number of steps of at least 1.")
    if opt.save_every_n_steps is not None:
        _set(lightning_config, "modelcheckpoint.params.every_n_train_steps", opt.save_every_n_steps)
    if opt.validation_steps is not None:
        _set(lightning_config, f"{IMAGE_LOGGER}.batch_frequency", opt.validation_steps)
    prompts = validation_prompts(opt)
    if prompts:
        _set(lightning_config, f"{IMAGE_LOGGER}.log_images_kwargs.validation_prompts", prompts)
    if opt.negative_prompt is not None:
        _set(lightning_config, f"{IMAGE_LOGGER}.log_images_kwargs.negative_prompt", opt.negative_prompt)


def apply_training_options(opt, config, lightning_config, options):
    """Write the flags above into `config` (model, data), `lightning_config` and the trainer `options`."""
    learning_rate_options(opt, config, options)
    lightning_config.trainer = options
    data_options(opt, config)
    logging_options(opt, lightning_config)


def describe_learning_rate(model, config, scale_lr, factors):
    """The line main.py prints: the rate the optimizer starts from, where it came from, and its schedule.
    `factors`: (accumulate_grad_batches, devices, batch size)."""
    base = config.model.base_learning_rate
    accumulate, devices, batch = factors
    if scale_lr:
        line = (f"Learning rate {model.learning_rate:.3g} = base {base:.3g} x {accumulate * devices * batch} "
                f"(--scale_lr: {batch} batch size x {devices} devices x {accumulate} accumulated batches; "
                "--scale_lr false uses the base rate as it is)")
    else:
        line = f"Learning rate {model.learning_rate:.3g} (the base rate, not scaled: --scale_lr false)"
    scheduler = config.model.params.get("scheduler_config")
    if scheduler is None:
        return line + ", constant."
    schedule = instantiate_from_config(scheduler)
    described = type(schedule).__str__ is not object.__str__  # the original's schedules only have a class name
    return line + f", schedule: {schedule if described else scheduler.target}."


def describe_outputs(logdir):
    """The last line of a run: where its embeddings and images are."""
    ckptdir = os.path.join(logdir, "checkpoints")
    files = [os.path.join(ckptdir, n) for n in ("embeddings.pt", "embeddings.safetensors")
             if os.path.isfile(os.path.join(ckptdir, n))]
    images = os.path.join(logdir, "images")
    where = " and ".join(files) if files else f"{ckptdir} (no embedding written yet)"
    return f"Embeddings: {where}; image log: {images if os.path.isdir(images) else 'none written'}"
