"""The textual-inversion side of LatentDiffusion: freezing the model, training only the embedding manager's
vectors, pruning the frozen weights from checkpoints and writing the embedding files.

A mixin (LatentDiffusion inherits it) rather than a Lightning callback, so that the official config target
`ldm.models.diffusion.ddpm.LatentDiffusion` keeps training embeddings with its `personalization_config` alone
and the hooks run in the order the original ran them (a callback's `on_save_checkpoint` runs before the
module's). ddpm.py stays about diffusion.
"""
import os

from ldm.modules import xti
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
        """embeddings.pt and embeddings_gs-<step>.pt in the official layout of the model's family; with one
        concept also embeddings.safetensors, the AUTOMATIC1111 layout that the webui, kohya and diffusers read
        ({"emb_params"}; SDXL: {"clip_l", "clip_g"}). XTI runs write their official layout only."""
        manager = self.embedding_manager
        for name in ("embeddings.pt", f"embeddings_gs-{self.global_step}.pt"):
            manager.save(os.path.join(ckpt_dir, name), step=self.global_step)
        first = next(iter(manager.managers.values())) if hasattr(manager, "managers") else manager
        if len(first.string_to_param_dict) == 1 and not getattr(manager, "per_layer", False):
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
