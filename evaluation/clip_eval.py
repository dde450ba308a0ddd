"""The paper's metrics (Gal et al. 2022, section 5): CLIP image-image and text-image similarity.

- image similarity: mean cosine similarity, in CLIP image space, between every generated image
  and every training image of the concept (how well the concept is reconstructed);
- text similarity: mean cosine similarity between the generated images and the prompt with the
  placeholder removed (how well the rest of the prompt is followed).

The CLIP model is read from a local directory (a `save_pretrained` / hub snapshot folder of a
`transformers` CLIP model, e.g. openai/clip-vit-base-patch32 as in the paper); nothing is
downloaded. Tokenizer files in that folder are used when present, otherwise OpenAI's own BPE
vocabulary (identical for all OpenAI CLIP models).
"""
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPModel

from evaluation import sample_images
from ldm.data.image_ops import to_uint8_hwc
from ldm.modules.encoders.clip_tokenizer import load_clip_tokenizer

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _features(output):
    """transformers 4 returns the projected features, 5 an output whose pooler_output holds them."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


def _has_tokenizer_files(folder):
    return any((folder / sub / "vocab.json").is_file() for sub in (".", "tokenizer"))


class CLIPEvaluator:
    def __init__(self, clip_dir, device="cpu"):
        clip_dir = Path(clip_dir)
        if not clip_dir.is_dir():
            raise FileNotFoundError(f"CLIP model directory {str(clip_dir)!r} does not exist; pass a local folder "
                                    "holding a transformers CLIP model (config.json and weights)")
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).to(self.device).eval()
        max_length = self.model.config.text_config.max_position_embeddings
        self.tokenizer = load_clip_tokenizer(str(clip_dir) if _has_tokenizer_files(clip_dir) else None,
                                             max_length=max_length)
        self.image_size = self.model.config.vision_config.image_size
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        preprocessor = clip_dir / "preprocessor_config.json"
        if preprocessor.is_file():
            settings = json.loads(preprocessor.read_text())
            mean, std = settings.get("image_mean", mean), settings.get("image_std", std)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images):
        """Images -> CLIP pixel values: shorter side resized (bicubic) to the model's size, centre crop,
        normalised. `images`: a (b, 3, h, w) tensor in [-1, 1], or a list of PIL images / arrays of any sizes."""
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            batch = [images.float().to(self.device)]
        else:
            batch = [torch.from_numpy(to_uint8_hwc(im)).permute(2, 0, 1)[None].float().to(self.device) / 127.5 - 1
                     for im in images]
        out = []
        for x in batch:
            x = (x.clamp(-1, 1) + 1) / 2
            h, w = x.shape[-2:]
            scale = self.image_size / min(h, w)
            size = (max(self.image_size, round(h * scale)), max(self.image_size, round(w * scale)))
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
            top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
            x = x[..., top:top + self.image_size, left:left + self.image_size]
            out.append((x - self.mean) / self.std)
        return torch.cat(out)

    @torch.no_grad()
    def get_image_features(self, images, norm=True):
        features = _features(self.model.get_image_features(pixel_values=self.preprocess(images)))
        return F.normalize(features, dim=-1) if norm else features

    @torch.no_grad()
    def get_text_features(self, text, norm=True):
        texts = [text] if isinstance(text, str) else list(text)
        tokens = self.tokenizer(texts, padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt").to(self.device)
        features = _features(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                          attention_mask=tokens["attention_mask"]))
        return F.normalize(features, dim=-1) if norm else features

    def img_to_img_similarity(self, src_images, generated_images):
        """Mean cosine similarity over all (source, generated) pairs, in [-1, 1]."""
        src = self.get_image_features(src_images)
        gen = self.get_image_features(generated_images)
        return float((src @ gen.T).mean())

    def txt_to_img_similarity(self, text, generated_images):
        """Mean cosine similarity between the text and each generated image, in [-1, 1]."""
        txt = self.get_text_features(text)
        gen = self.get_image_features(generated_images)
        return float((txt @ gen.T).mean())


def strip_placeholders(prompt, placeholders=("*",)):
    """The prompt without its placeholder words, as the paper scores text similarity."""
    for placeholder in placeholders:
        prompt = prompt.replace(placeholder, "")
    return " ".join(prompt.split())


class LDMCLIPEvaluator(CLIPEvaluator):
    """The original's evaluator: sample from a (personalised) LDM, then score the samples."""

    def evaluate(self, ldm_model, src_images, target_text, n_samples=64, n_steps=50, scale=5.0, eta=0.0,
                 batch_size=8, seed=0, placeholders=("*",)):
        """Returns (image similarity, text similarity) of n_samples images generated for target_text."""
        generated = sample_images(ldm_model, target_text, n_samples, ddim_steps=n_steps, scale=scale, eta=eta,
                                  batch_size=batch_size, seed=seed)
        return (self.img_to_img_similarity(src_images, generated),
                self.txt_to_img_similarity(strip_placeholders(target_text, placeholders), generated))

