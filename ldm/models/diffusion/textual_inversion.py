"""The textual-inversion side of LatentDiffusion: freezing the model, training only the embedding manager's
vectors, pruning the frozen weights from checkpoints and writing the embedding files.

A mixin (LatentDiffusion inherits it) rather than a Lightning callback, so that the official config target
`ldm.models.diffusion.ddpm.LatentDiffusion` keeps training embeddings with its `personalization_config` alone
and the hooks run in the order the original ran them (a callback's `on_save_checkpoint` runs before the
module's). ddpm.py stays about diffusion.
"""
import os

from ldm.modules.embedding_io import read_xti_file
from ldm.modules.encoders.base import EmbeddingManagerProtocol
from ldm.modules.xti import XTIEmbeddingManager
from ldm.util import freeze, get_obj_from_str, instantiate_from_config


# Where a latent diffusion model keeps its weights; the frozen ones are left out of textual-inversion checkpoints.
MODEL_PREFIXES = ("model.", "cond_stage_model.", "conditioner.", "first_stage_model.")


class TextualInversion:
    """Mixed into LatentDiffusion before DDPM; takes the textual-inversion keyword arguments of its config and
    expects `self.model`, `self.use_ema`, `self.conditioner` (SDXL's, or None) and `self.text_encoders_module()`
    (the module holding the text encoder(s)). The manager is any EmbeddingManagerProtocol.

    personalization_config: the embedding manager's config (None: no textual inversion);
    embedding_manager_ckpt: embedding file(s) to start from; embedding_reg_weight: weight of the manager's
    regulariser in the loss; unfreeze_model: train the UNet and the text encoder too, at `model_lr`.
    """

    def __init__(self, *args, personalization_config=None, embedding_manager_ckpt=None, embedding_reg_weight=0.,
                 unfreeze_model=False, model_lr=0., **kwargs):
        super().__init__(*args, **kwargs)
        self.personalization_config = personalization_config
        self.embedding_manager_ckpt = embedding_manager_ckpt
        self.embedding_reg_weight = embedding_reg_weight
        self.unfreeze_model = unfreeze_model
        self.model_lr = model_lr
        self.embedding_manager = None

    def setup_textual_inversion(self):
        """Freeze the diffusion model and the text encoder(s) (unless `unfreeze_model`) and build the manager.

        `personalization_config` gets `embedder=` the text encoder (SD v1, SD 2.x, LDM) or `embedders=` the
        conditioner's text encoders (SDXL, a MultiEmbeddingManager), and a per-layer manager `unet=` too."""
        config = self.personalization_config
        encoders = self.text_encoders_module()
        if not self.unfreeze_model:
            freeze(encoders)
            freeze(self.model)
        per_layer = getattr(get_obj_from_str(config["target"]), "per_layer", None)
        if per_layer is None:
            raise TypeError(f"personalization_config.target {config['target']} is not an embedding manager: it does "
                            "not say whether it is per_layer (see ldm.modules.encoders.base.EmbeddingManagerProtocol).")
        if self.conditioner is not None:
            if per_layer:
                raise ValueError(f"personalization_config.target {config['target']}: extended "
                                 "textual inversion (XTI) is built for one text encoder; this model has several "
                                 "(SDXL). Use ldm.modules.embedding_manager.MultiEmbeddingManager.")
            manager = instantiate_from_config(config, embedders=encoders.text_encoders)
        else:
            unet = {"unet": self.model.diffusion_model} if per_layer else {}
            manager = instantiate_from_config(config, embedder=encoders, **unet)
        if not isinstance(manager, EmbeddingManagerProtocol):
            raise TypeError(f"personalization_config.target {config['target']} is not an embedding manager: it "
                            "lacks members of ldm.modules.encoders.base.EmbeddingManagerProtocol.")
        self.embedding_manager = manager
        if self.embedding_manager_ckpt:
            self.embedding_manager.load(self.embedding_manager_ckpt)
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

    def p_losses(self, x_start, t, cond=None, noise=None):
        """DDPM's losses plus the manager's regulariser, weighted by `embedding_reg_weight`."""
        loss, loss_dict = super().p_losses(x_start, t, cond, noise)
        if self.embedding_reg_weight > 0 and self.embedding_manager is not None:
            prefix = "train" if self.training else "val"
            loss_embedding_reg = self.embedding_regularizer()
            loss = loss + self.embedding_reg_weight * loss_embedding_reg
            del loss_dict[f"{prefix}/loss"]  # the total stays the last entry
            loss_dict.update({f"{prefix}/loss_emb_reg": loss_embedding_reg, f"{prefix}/loss": loss})
        return loss, loss_dict

    def on_train_batch_start(self, batch, batch_idx):
        if self.embedding_manager is not None:
            # progressive words count optimizer steps (the original counted forward calls)
            self.embedding_manager.progressive_step = self.global_step
        return super().on_train_batch_start(batch, batch_idx)

    def _frozen_keys(self):
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        return [k for k in self.state_dict() if k.startswith(MODEL_PREFIXES) and k not in trainable]

    @property
    def prunes_checkpoints(self):
        return self.embedding_manager is not None and not self.unfreeze_model

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
        ({"emb_params"}; SDXL: {"clip_l", "clip_g"}): the manager's `interchange_format`. XTI runs write their
        official layout only."""
        manager = self.embedding_manager
        for name in ("embeddings.pt", f"embeddings_gs-{self.global_step}.pt"):
            manager.save(os.path.join(ckpt_dir, name), step=self.global_step)
        interchange = manager.interchange_format()
        if interchange is not None:
            manager.save(os.path.join(ckpt_dir, "embeddings.safetensors"), step=self.global_step, fmt=interchange)

    def load_state_dict(self, state_dict, strict=True, **kwargs):
        if self.prunes_checkpoints:
            strict = False  # a textual-inversion checkpoint holds only the manager; frozen weights come from the base
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    def placeholder_prompt(self):
        """"a photo of <first placeholder>", the prompt `log_images` samples the learned word with."""
        concepts = self.embedding_manager.concepts if self.embedding_manager is not None else []
        return f"a photo of {concepts[0]}" if concepts else None


class EmbeddingLoadError(ValueError):
    """--embedding_path could not be used with this model; the message says which file and why."""


def use_xti_manager(model):
    """Swap an ordinary embedding manager of `model` for an empty XTI one (to sample an XTI file with a config
    written for ordinary embeddings); returns the manager."""
    manager = model.embedding_manager
    if not manager.per_layer:
        manager = XTIEmbeddingManager(model.cond_stage_model, unet=model.model.diffusion_model,
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
