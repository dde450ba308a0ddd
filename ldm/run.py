"""A training run's folder and what it resumes: the folder's name (logs/<time>_<name>), claiming it, which
checkpoint `-r` resumes, and the seed a resumed run keeps. main.py's command line drives these."""
import glob
import os
import warnings

from ldm.checkpoint import CheckpointError, load_checkpoint, remove_stray_temporaries

DEFAULT_SEED = 23
# A new run claims its folder (os.mkdir, exclusive); DDP workers that Lightning starts inherit the claimed name.
RUN_DIR_ENV = "TEXTUAL_INVERSION_RUN_DIR"


class UsageError(Exception):
    """A problem with the command line or its files, reported without a traceback."""


def resolve_run_dir(opt, now):
    """-> (logdir, nowname, ckpt to resume or None); on resume, prepends the run's saved configs to opt.base.

    A new run's folder is only named here; `claim_run_dir` creates it once the inputs have been checked.
    """
    if opt.name and opt.resume:
        raise UsageError("-n/--name and -r/--resume cannot be specified both. To start a new log folder from "
                         "the weights of a checkpoint, use -n/--name with --actual_resume.")
    if opt.resume:
        if not os.path.exists(opt.resume):
            raise UsageError(f"Cannot find {opt.resume} to resume: give a log directory or a checkpoint in it.")
        if os.path.isfile(opt.resume):
            ckpt = opt.resume
            logdir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
        else:
            logdir = opt.resume.rstrip("/\\")
            ckpt = os.path.join(logdir, "checkpoints", "last.ckpt")
        configs = sorted(glob.glob(os.path.join(logdir, "configs", "*.yaml")))
        if not configs:
            raise UsageError(f"{logdir} has no configs/*.yaml: -r takes a log directory written by main.py "
                             "(a run folder under logs/) or a checkpoint inside its checkpoints/ folder.")
        opt.base = configs + list(opt.base)
        return logdir, os.path.basename(logdir), ckpt
    if opt.name:
        name = "_" + opt.name
    elif opt.base:
        name = "_" + os.path.splitext(os.path.basename(opt.base[0]))[0]
    else:
        name = ""
    if opt.datadir_in_name and opt.data_root:
        now = os.path.basename(os.path.normpath(opt.data_root)) + now
    nowname = now + name + opt.postfix
    return os.path.join(opt.logdir, nowname), nowname, None


def claim_run_dir(logdir):
    """Create a new run's folder exclusively; when another run took the name, take `<name>_1`, `<name>_2`, ..."""
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and os.environ.get("LOCAL_RANK", "0") != "0":
        return inherited  # a DDP worker: the launching process claimed the folder
    os.makedirs(os.path.dirname(logdir) or ".", exist_ok=True)
    candidate, n = logdir, 0
    while True:
        try:
            os.mkdir(candidate)
            break
        except FileExistsError:
            n += 1
            candidate = f"{logdir}_{n}"
    if candidate != logdir:
        print(f"{logdir} is taken by another run: logging to {candidate}")
    os.environ[RUN_DIR_ENV] = candidate
    return candidate


def choose_resume_checkpoint(logdir, requested, explicit):
    """-> (path, loaded checkpoint). A damaged last.ckpt falls back to the newest checkpoint that loads."""
    ckptdir = os.path.join(logdir, "checkpoints")
    folders = [ckptdir, os.path.join(logdir, "configs")] + glob.glob(os.path.join(logdir, "images", "*"))
    removed = [name for folder in folders for name in remove_stray_temporaries(folder)]
    if removed:
        print(f"Removed {len(removed)} unfinished temporary files a stopped run left in {logdir}.")
    candidates = [requested]
    if not explicit:
        others = [p for p in glob.glob(os.path.join(ckptdir, "**", "*.ckpt"), recursive=True)
                  if os.path.abspath(p) != os.path.abspath(requested)]
        candidates += sorted(others, key=os.path.getmtime, reverse=True)
    problems = []
    for path in candidates:
        if not os.path.exists(path):
            problems.append(f"{path}: missing")
            continue
        try:
            ckpt = load_checkpoint(path)
        except (CheckpointError, OSError) as err:
            problems.append(str(err))
            continue
        if not isinstance(ckpt, dict) or "global_step" not in ckpt or "state_dict" not in ckpt:
            problems.append(f"{path}: not a Lightning training checkpoint")
            continue
        if problems:
            print(f"WARNING: {problems[0]}\nResuming from {path} (step {ckpt['global_step']}) instead.")
        return path, ckpt
    if explicit:
        raise UsageError(problems[0])
    raise UsageError(f"No checkpoint to resume in {ckptdir}: " + "; ".join(problems)
                     + ". Start a new run (without -r), or pass a checkpoint with -r FILE.")


def choose_seed(opt, run_config):
    """A resumed run keeps the seed it was started with (a different -s is allowed, with a warning)."""
    stored = run_config.get("seed")
    if stored is None:
        return DEFAULT_SEED if opt.seed is None else opt.seed
    if opt.seed is not None and opt.seed != stored:
        warnings.warn(f"-s {opt.seed} differs from the seed the run was started with ({stored}): the resumed run "
                      "will not match an uninterrupted one.")
        return opt.seed
    return stored
