"""Configs are code: every `target:` of a config is imported and called. A config someone else wrote (a run folder
to resume, a config downloaded for sampling) may only name this project's modules and a few Lightning/torch
classes, unless the user passes --trust_config."""
from omegaconf import OmegaConf

from ldm.util import ConfigError

TRUSTED_TARGET_PREFIXES = ("ldm.", "main.", "evaluation.")
TRUSTED_TARGETS = {
    "torch.nn.Identity",
    "pytorch_lightning.callbacks.ModelCheckpoint", "pytorch_lightning.callbacks.LearningRateMonitor",
    "pytorch_lightning.loggers.CSVLogger", "pytorch_lightning.loggers.TensorBoardLogger",
    "pytorch_lightning.loggers.WandbLogger",
}


def load_yaml(path):
    """The YAML config at `path`; a one-line ConfigError naming it when it cannot be read."""
    try:
        return OmegaConf.load(path)
    except Exception as err:  # yaml's ScannerError/ParserError, a config that is not a mapping, unreadable
        detail = " ".join(str(err).split())[:200]
        raise ConfigError(f"Config {path} could not be read ({type(err).__name__}: {detail}): fix the YAML.") from None


def _targets(node):
    if isinstance(node, dict):
        if isinstance(node.get("target"), str):
            yield node["target"]
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value)


def check_config_targets(config_paths, trust):
    """Refuse configs that would import anything outside this project (ConfigError naming each target and its
    file), unless `trust`; -> the loaded configs."""
    configs, foreign = [], []
    for path in config_paths:
        configs.append(load_yaml(path))
        foreign += [f"{target} ({path})" for target in _targets(OmegaConf.to_container(configs[-1]))
                    if not target.startswith(TRUSTED_TARGET_PREFIXES) and target not in TRUSTED_TARGETS]
    if foreign and not trust:
        raise ConfigError("Config would import code from outside this project: " + ", ".join(foreign)
                          + ". Configs are code: check the file, and if you trust it re-run with --trust_config.")
    for item in foreign:
        print(f"Trusting config target {item} (--trust_config)")
    return configs


def load_trusted_config(path, trust):
    """The config at `path`, after check_config_targets."""
    return check_config_targets([path], trust)[0]
