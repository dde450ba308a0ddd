"""The textual-inversion side of LatentDiffusion: freezing the model, training only the embedding manager's
vectors, pruning the frozen weights from checkpoints and writing the embedding files.

A mixin (LatentDiffusion inherits it) rather than a Lightning callback, so that the official config target
`ldm.models.diffusion.ddpm.LatentDiffusion` keeps training embeddings with its `personalization_config` alone
and the hooks run in the order the original ran them (a callback's `on_save_checkpoint` runs before the
module's). ddpm.py stays about diffusion.
"""
import os

from ldm.modules import xti
from ldm.modules.embedding_io import read_xti_file
from ldm.util import instantiate_from_config


def disabled_train(self, mode=True):
    """Replaces `.train` on frozen modules so that Lightning cannot switch them back to training mode."""
    return self


def freeze(module):
    module.eval()
    module.train = disabled_train.__get__(module)
    for p in module.parameters():
        p.requires_grad = False
    return module


# Where a latent diffusion model keeps its weights; the frozen ones are left out of textual-inversion checkpoints.
MODEL_PREFIXES = ("model.", "cond_stage_model.", "conditioner.", "first_stage_model.")


class TextualInversion:
    """Mixed into LatentDiffusion; expects `self.model`, `self.unfreeze_model`, `self.model_lr`, `self.use_ema`
    and `self.text_encoders_module()` (the module holding the text encoder(s))."""

    def setup_textual_inversion(self, personalization_config, embedding_manager_ckpt=None):
        """Freeze the diffusion model and the text encoder(s) (unless `unfreeze_model`) and build the manager.

        `personalization_config` gets `embedder=` the text encoder (SD v1, SD 2.x, LDM) or `embedders=` the
        conditioner's text encoders (SDXL, a MultiEmbeddingManager)."""
        encoders = self.text_encoders_module()
        if not self.unfreeze_model:
            freeze(encoders)
            freeze(self.model)
        if hasattr(encoders, "text_encoders"):
            if xti.is_per_layer(personalization_config):
                raise ValueError(f"personalization_config.target {personalization_config['target']}: extended "
                                 "textual inversion (XTI) is built for one text encoder; this model has several "
                                 "(SDXL). Use ldm.modules.embedding_manager.MultiEmbeddingManager.")
            manager = instantiate_from_config(personalization_config, embedders=encoders.text_encoders)
        else:
            manager = instantiate_from_config(personalization_config, embedder=encoders,
                                              **xti.manager_kwargs(personalization_config, self.model.diffusion_model))
        self.embedding_manager = manager
        if embedding_manager_ckpt:
            self.embedding_manager.load(embedding_manager_ckpt)
        for param in self.embedding_manager.embedding_parameters():
            param.requires_grad = True
        if self.use_ema and not self.unfreeze_model:
            # nothing of the diffusion model trains, so an EMA of it would only cost memory
            self.use_ema = False
            del self.model_ema

    def textual_inversion_parameters(self):
        """The manager's vectors; with `unfreeze_model`, a second group of the model's weights at `model_lr`."""
        embedding_params = list(self.embedding_manager.embedding_parameters())
        if not self.unfreeze_model:
            return embedding_params
        model_params = list(self.text_encoders_module().parameters()) + list(self.model.parameters())
        return [{"params": embedding_params, "lr": self.learning_rate}, {"params": model_params, "lr": self.model_lr}]

    def embedding_regularizer(self):
        return self.embedding_manager.embedding_to_coarse_loss().mean()

    def _frozen_keys(self):
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        return [k for k in self.state_dict() if k.startswith(MODEL_PREFIXES) and k not in trainable]

    @property
    def prunes_checkpoints(self):
        return getattr(self, "embedding_manager", None) is not None and not self.unfreeze_model

    def on_save_checkpoint(self, checkpoint):
        """Keep the trainable state (manager, optimizer, RNG) and write the embedding files beside the checkpoint.

        The original cleared the whole checkpoint here, so `-r` lost the optimizer state; we only drop the
        frozen weights, which the run's config reloads from its base checkpoint.
        """
        super().on_save_checkpoint(checkpoint)
        if self.prunes_checkpoints:
            for k in self._frozen_keys():
                checkpoint["state_dict"].pop(k, None)
        if self.embedding_manager is None or self._trainer is None or not self.trainer.is_global_zero:
            return
        ckpt_dir = getattr(self.trainer.checkpoint_callback, "dirpath", None)
        if ckpt_dir:
            os.makedirs(ckpt_dir, exist_ok=True)
            self.write_embeddings(ckpt_dir)

    def write_embeddings(self, ckpt_dir):
        """embeddings.pt and embeddings_gs-<step>.pt in the official layout of the model's family; for several
        text encoders (SDXL) with one concept also embeddings.safetensors ({"clip_l", "clip_g"}), the file
        AUTOMATIC1111, kohya and diffusers read."""
        manager = self.embedding_manager
        for name in ("embeddings.pt", f"embeddings_gs-{self.global_step}.pt"):
            manager.save(os.path.join(ckpt_dir, name), step=self.global_step)
        if hasattr(manager, "managers") and len(next(iter(manager.managers.values())).string_to_param_dict) == 1:
            manager.save(os.path.join(ckpt_dir, "embeddings.safetensors"), step=self.global_step,
                         fmt="a1111-safetensors")

    def load_state_dict(self, state_dict, strict=True, **kwargs):
        if self.prunes_checkpoints:
            strict = False  # a textual-inversion checkpoint holds only the manager; frozen weights come from the base
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    def placeholder_prompt(self):
        """"a photo of <first placeholder>", the prompt `log_images` samples the learned word with."""
        manager = self.embedding_manager
        if hasattr(manager, "managers"):
            manager = next(iter(manager.managers.values()))
        strings = list(getattr(manager, "string_to_param_dict", {}).keys())
        return f"a photo of {strings[0]}" if strings else None


class EmbeddingLoadError(ValueError):
    """--embedding_path could not be used with this model; the message says which file and why."""


def use_xti_manager(model):
    """Swap an ordinary embedding manager of `model` for an empty XTI one (to sample an XTI file with a config
    written for ordinary embeddings); returns the manager."""
    manager = model.embedding_manager
    if not getattr(manager, "per_layer", False):
        manager = xti.XTIEmbeddingManager(model.cond_stage_model, unet=model.model.diffusion_model,
                                          placeholder_strings=list(manager.string_to_token_dict) or None)
        model.embedding_manager = manager.to(model.device)
    return manager


def load_embeddings(model, paths, placeholder_strings=None, config="the model's config"):
    """Load embedding files into `model`'s embedding manager (the scripts' --embedding_path), printing the word
    each concept answers to."""
    manager = getattr(model, "embedding_manager", None)
    if manager is None:
        raise EmbeddingLoadError(f"{config} has no personalization_config, so it cannot use --embedding_path.")
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    try:
        if any(read_xti_file(path) is not None for path in paths):  # per-layer vectors need a per-layer manager
            manager = use_xti_manager(model)
        loaded = manager.load(paths, placeholder_strings=placeholder_strings)
    except (ValueError, OSError) as err:  # unreadable file, other model family, name clash, count mismatch
        raise EmbeddingLoadError(f"Could not load embeddings from {', '.join(map(str, paths))}: {err}") from err
    for word, path, count in loaded:  # the words to type, which users otherwise have to guess
        print(f"Embedding {word!r} ({count} vector{'s' if count != 1 else ''}) from {path}")
    return loaded
