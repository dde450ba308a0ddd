"""Command-line checks shared by the sampling scripts: bad numbers get a one-line error naming the flag before
any model is loaded, odd ones a warning, and the errors users can fix never end in a traceback."""
import errno
import math
import sys
import warnings

from ldm.checkpoint import CheckpointError
from ldm.modules.embedding_io import load_embedding_file
from ldm.util import ConfigError, InputFileError

MAX_DDIM_STEPS = 1000  # the models' number of diffusion timesteps: DDIM cannot take more steps than that

DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
               errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded"}


def sampling_problems(opt):
    """-> (errors, warnings): messages about the sampling flags of `opt` (flags a script lacks are skipped)."""
    errors, notes = [], []

    def flag(name):
        return getattr(opt, name, None)

    steps = flag("ddim_steps")
    if steps is not None and not 1 <= steps <= MAX_DDIM_STEPS:
        errors.append(f"--ddim_steps {steps}: give a number of sampling steps from 1 to {MAX_DDIM_STEPS} "
                      "(50 is typical).")
    for name in ("n_samples", "n_iter", "batch_size"):
        value = flag(name)
        if value is not None and value < 1:
            errors.append(f"--{name} {value}: must be at least 1.")
    f = flag("f")
    if f is not None and f < 1:
        errors.append(f"--f {f}: the downsampling factor of the first stage must be at least 1 (8 for SD).")
    for name in ("H", "W"):
        size = flag(name)
        if size is None:
            continue
        if f is not None and f >= 1 and size < f:
            errors.append(f"--{name} {size}: the image side must be at least --f ({f}) pixels.")
        elif f is not None and f >= 1 and size % f:
            notes.append(f"--{name} {size} is not a multiple of --f ({f}): the images will be "
                         f"{size // f * f} px.")
    for name in ("scale", "ddim_eta"):
        value = flag(name)
        if value is not None and not math.isfinite(value):
            errors.append(f"--{name} {value}: must be a finite number.")
    eta = flag("ddim_eta")
    if eta is not None and math.isfinite(eta) and eta < 0:
        errors.append(f"--ddim_eta {eta}: must be 0 (deterministic) or more.")
    if flag("negative_prompt") and flag("scale") == 1:
        errors.append("--negative_prompt works through guidance, which --scale 1 switches off: pass a --scale "
                      "above 1 (e.g. 7.5) or drop --negative_prompt.")
    for name in ("prompt", "placeholder_string"):
        value = flag(name)
        values = value if isinstance(value, list) else [value]
        if value is not None and any(not str(v).strip() for v in values):
            errors.append(f"--{name} is empty: give some text or leave the flag out.")
    return errors, notes


def placeholder_notes(opt):
    """A warning when --prompt names none of the concepts --embedding_path loads (they would not be used)."""
    paths, prompt = getattr(opt, "embedding_path", None), getattr(opt, "prompt", None)
    if not paths or not prompt or getattr(opt, "from_file", None):
        return []
    names = list(getattr(opt, "placeholder_string", None) or [])
    if not names:
        for path in paths:
            try:
                names += list(load_embedding_file(path).vectors)
            except (ValueError, OSError):
                return []  # the loader itself reports the file
    written = f"{prompt} {getattr(opt, 'negative_prompt', None) or ''}"
    if any(name in written for name in names):
        return []
    return [f"--prompt {prompt!r} names none of the learned concepts ({', '.join(names)}): the embeddings will not "
            "be used. Put the placeholder in the prompt, e.g. 'a photo of " + names[0] + "'."]


def validate_sampling_args(opt, parser=None):
    """Exit with a one-line error for impossible sampling flags; warn about odd ones."""
    errors, notes = sampling_problems(opt)
    if not errors:
        notes += placeholder_notes(opt)
    for note in notes:
        warnings.warn(note)
    if errors:
        if parser is not None:
            parser.error(errors[0])
        sys.exit(f"error: {errors[0]}")
    return opt


def checked_parser(parser):
    """`parser`, whose parse_args also runs validate_sampling_args."""
    parse = parser.parse_args

    def parse_args(args=None, namespace=None):
        return validate_sampling_args(parse(args, namespace), parser)

    parser.parse_args = parse_args
    return parser


def user_error_message(err):
    """A one-line message for an error the user can fix, or None for a bug (which keeps its traceback)."""
    if isinstance(err, (CheckpointError, ConfigError, InputFileError)):
        return str(err)
    if isinstance(err, OSError) and err.errno == errno.ENOTDIR:
        return f"cannot create the folder {err.filename}: part of that path is a file, not a folder"
    if isinstance(err, OSError) and err.errno in DISK_ERRORS:
        where = err.filename or "the output folder"
        return (f"cannot write {where}: {DISK_ERRORS[err.errno]}. Files already written are intact; free space "
                "or fix permissions, or choose another output folder.")
    if isinstance(err, FileNotFoundError) and err.filename:
        return f"{err.filename}: file not found"
    return None


def run_cli(main, prog=None):
    """Run a script's `main()`, turning the errors users can fix into one line on stderr and exit status 1."""
    try:
        return main()
    except Exception as err:
        message = user_error_message(err)
        if message is None:
            raise
        sys.exit(f"{prog or sys.argv[0]}: error: {message}")
