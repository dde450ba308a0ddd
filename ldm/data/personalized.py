"""The training set of textual inversion: a folder of 3-5 images of one concept, each paired with a
random caption that names the concept through the placeholder word."""
import os
import random
import warnings

from PIL import Image
import torch
from torch.utils.data import Dataset

from ldm.data.image_ops import (WHITE, background_colour, hflip, load_rgb, resample_filter, resize, square_crop,
                                to_model_range)
from ldm.util import InputFileError, open_input_file, read_text_file

imagenet_templates_smallest = [
    'a photo of a {}',
]

imagenet_templates_small = [
    'a photo of a {}',
    'a rendering of a {}',
    'a cropped photo of the {}',
    'the photo of a {}',
    'a photo of a clean {}',
    'a photo of a dirty {}',
    'a dark photo of the {}',
    'a photo of my {}',
    'a photo of the cool {}',
    'a close-up photo of a {}',
    'a bright photo of the {}',
    'a cropped photo of a {}',
    'a photo of the {}',
    'a good photo of the {}',
    'a photo of one {}',
    'a close-up photo of the {}',
    'a rendition of the {}',
    'a photo of the clean {}',
    'a rendition of a {}',
    'a photo of a nice {}',
    'a good photo of a {}',
    'a photo of the nice {}',
    'a photo of the small {}',
    'a photo of the weird {}',
    'a photo of the large {}',
    'a photo of a cool {}',
    'a photo of a small {}',
    'an illustration of a {}',
    'a rendering of a {}',
    'a cropped photo of the {}',
    'the photo of a {}',
    'an illustration of a clean {}',
    'an illustration of a dirty {}',
    'a dark photo of the {}',
    'an illustration of my {}',
    'an illustration of the cool {}',
    'a close-up photo of a {}',
    'a bright photo of the {}',
    'a cropped photo of a {}',
    'an illustration of the {}',
    'a good photo of the {}',
    'an illustration of one {}',
    'a close-up photo of the {}',
    'a rendition of the {}',
    'an illustration of the clean {}',
    'a rendition of a {}',
    'an illustration of a nice {}',
    'a good photo of a {}',
    'an illustration of the nice {}',
    'an illustration of the small {}',
    'an illustration of the weird {}',
    'an illustration of the large {}',
    'an illustration of a cool {}',
    'an illustration of a small {}',
    'a depiction of a {}',
    'a rendering of a {}',
    'a cropped photo of the {}',
    'the photo of a {}',
    'a depiction of a clean {}',
    'a depiction of a dirty {}',
    'a dark photo of the {}',
    'a depiction of my {}',
    'a depiction of the cool {}',
    'a close-up photo of a {}',
    'a bright photo of the {}',
    'a cropped photo of a {}',
    'a depiction of the {}',
    'a good photo of the {}',
    'a depiction of one {}',
    'a close-up photo of the {}',
    'a rendition of the {}',
    'a depiction of the clean {}',
    'a rendition of a {}',
    'a depiction of a nice {}',
    'a good photo of a {}',
    'a depiction of the nice {}',
    'a depiction of the small {}',
    'a depiction of the weird {}',
    'a depiction of the large {}',
    'a depiction of a cool {}',
    'a depiction of a small {}',
]

imagenet_dual_templates_small = [
    'a photo of a {} with {}',
    'a rendering of a {} with {}',
    'a cropped photo of the {} with {}',
    'the photo of a {} with {}',
    'a photo of a clean {} with {}',
    'a photo of a dirty {} with {}',
    'a dark photo of the {} with {}',
    'a photo of my {} with {}',
    'a photo of the cool {} with {}',
    'a close-up photo of a {} with {}',
    'a bright photo of the {} with {}',
    'a cropped photo of a {} with {}',
    'a photo of the {} with {}',
    'a good photo of the {} with {}',
    'a photo of one {} with {}',
    'a close-up photo of the {} with {}',
    'a rendition of the {} with {}',
    'a photo of the clean {} with {}',
    'a rendition of a {} with {}',
    'a photo of a nice {} with {}',
    'a good photo of a {} with {}',
    'a photo of the nice {} with {}',
    'a photo of the small {} with {}',
    'a photo of the weird {} with {}',
    'a photo of the large {} with {}',
    'a photo of a cool {} with {}',
    'a photo of a small {} with {}',
]

# Captions for a style (learnable_property: style; ldm.data.personalized_style).
imagenet_style_templates_small = [
    'a painting in the style of {}',
    'a rendering in the style of {}',
    'a cropped painting in the style of {}',
    'the painting in the style of {}',
    'a clean painting in the style of {}',
    'a dirty painting in the style of {}',
    'a dark painting in the style of {}',
    'a picture in the style of {}',
    'a cool painting in the style of {}',
    'a close-up painting in the style of {}',
    'a bright painting in the style of {}',
    'a cropped painting in the style of {}',
    'a good painting in the style of {}',
    'a close-up painting in the style of {}',
    'a rendition in the style of {}',
    'a nice painting in the style of {}',
    'a small painting in the style of {}',
    'a weird painting in the style of {}',
    'a large painting in the style of {}',
]

imagenet_dual_style_templates_small = [
    'a painting in the style of {} with {}',
    'a rendering in the style of {} with {}',
    'a cropped painting in the style of {} with {}',
    'the painting in the style of {} with {}',
    'a clean painting in the style of {} with {}',
    'a dirty painting in the style of {} with {}',
    'a dark painting in the style of {} with {}',
    'a cool painting in the style of {} with {}',
    'a close-up painting in the style of {} with {}',
    'a bright painting in the style of {} with {}',
    'a cropped painting in the style of {} with {}',
    'a good painting in the style of {} with {}',
    'a painting of one {} in the style of {}',
    'a nice painting in the style of {} with {}',
    'a small painting in the style of {} with {}',
    'a weird painting in the style of {} with {}',
    'a large painting in the style of {} with {}',
]

# Extra words that give each training image its own token when per_image_tokens is on.
per_img_token_list = [
    'א', 'ב', 'ג', 'ד', 'ה', 'ו', 'ז', 'ח', 'ט', 'י', 'כ', 'ל', 'מ', 'נ', 'ס', 'ע', 'פ', 'צ', 'ק', 'ר', 'ש', 'ת',
]


def per_image_token_strings(per_image_tokens):
    """The per-image words a `per_image_tokens` setting asks for: none (false), the original's list (true; single
    tokens for BERT, not for CLIP's tokenizer), or the strings given (a list, e.g. ['@', '#', '$'] for CLIP).
    The dataset and the embedding manager must be given the same setting."""
    if per_image_tokens is True:
        return list(per_img_token_list)
    if not per_image_tokens:
        return []
    if isinstance(per_image_tokens, str) or not all(isinstance(s, str) and s for s in per_image_tokens):
        raise ValueError(f"per_image_tokens must be true, false or a list of non-empty strings, got "
                         f"{per_image_tokens!r}.")
    return list(per_image_tokens)


MIN_USEFUL_SIDE = 8  # px; smaller training images are almost certainly a mistake
MAX_CAPTION_BYTES = 2**20  # a caption is a line of text; this bounds what a wrong file can cost
# Without cropping, images whose long side exceeds the short one by more than this are reported as distorted.
MAX_UNWARNED_ASPECT = 1.25
CROP_MODES = ("center", "none", "random")
# A random crop starts at one of this many evenly spaced places along the long side, so latents stay cacheable.
RANDOM_CROP_PLACES = 8
LEARNABLE_PROPERTIES = ("object", "style")


def list_images(data_root, caption_extension=None):
    """Sorted paths of the readable images in `data_root`.

    Hidden files, and the caption files of images (<image name><caption_extension>), are ignored; anything else
    that is not a regular file PIL can open (a subfolder, a pipe or device, a damaged file) is skipped, with one
    warning naming each and why: a concept folder often holds other things, and the run goes on with its images.
    A missing folder or one without images is an error naming the folder.
    """
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"Training image folder {data_root!r} does not exist (check --data_root)")
    names = sorted(os.listdir(data_root))
    # <stem><caption_extension> is a caption when another file (the image) has that stem
    is_caption = (lambda name: name.endswith(caption_extension)) if caption_extension else (lambda name: False)
    stems = {os.path.splitext(name)[0] for name in names if not is_caption(name)}
    images, skipped, tiny = [], [], []
    for name in names:
        if name.startswith("."):
            continue
        if is_caption(name) and name[:-len(caption_extension)] in stems:
            continue
        path = os.path.join(data_root, name)
        try:
            # a FIFO would block Image.open forever: open_input_file refuses anything but a regular file
            with open_input_file(path, "image") as f, Image.open(f) as image:
                size = image.size
            images.append(path)
        except (InputFileError, Image.DecompressionBombError) as err:  # a folder, a pipe, an absurd size
            skipped.append(str(err))
            continue
        except OSError:  # not an image (UnidentifiedImageError), damaged
            skipped.append(f"{name} is not an image, or is damaged")
            continue
        if min(size) < MIN_USEFUL_SIDE:
            tiny.append(f"{name} ({size[0]}x{size[1]} px)")
    if tiny:
        warnings.warn(f"Tiny images in {data_root!r}: {', '.join(tiny)}; they are upscaled to the training size "
                      "and carry almost nothing of the concept.")
    if skipped:
        warnings.warn(f"Skipping {len(skipped)} non-image entries in {data_root!r}: {'; '.join(skipped)}")
    if not images:
        raise ValueError(f"No readable images in training image folder {data_root!r}"
                         + (f" ({len(skipped)} files are not images or are damaged)" if skipped else "")
                         + ": put 3-5 images of the concept there")
    return images


def check_templates(templates, source):
    """`templates` as a list, if each has one {} where the placeholder goes; else a ValueError naming `source`."""
    templates = [str(t) for t in templates]
    bad = [t for t in templates if t.count("{}") != 1]
    if bad or not templates:
        raise ValueError(f"{source}: each caption template needs exactly one {{}} where the placeholder goes "
                         + (f"(not {bad[0]!r})" if bad else "(there are none)"))
    return templates


def read_templates(path):
    """Caption templates from a file, one per line; AUTOMATIC1111's `[name]` stands for the placeholder too
    (its `[filewords]` is refused: put such captions in caption files)."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip().replace("[name]", "{}") for line in f.read().splitlines() if line.strip()]
    if any("[filewords]" in line for line in lines):
        raise ValueError(f"{path}: AUTOMATIC1111's [filewords] is not read; write each image's caption in a .txt "
                         "file beside it instead")
    return check_templates(lines, path)


def read_caption(path, token, placeholder=None):
    """An image's caption file with the placeholder in it: left as it is when it writes `token`; else
    `placeholder` (default: `token`; e.g. with the coarse class word) where it writes `*`, or in front of it."""
    placeholder = placeholder or token
    caption = " ".join(read_text_file(path, "caption file", MAX_CAPTION_BYTES).split())
    if not caption:
        raise ValueError(f"Caption file {path} is empty: write the image's caption in it, or delete it")
    if token in caption:
        return caption
    if "*" in caption:
        return caption.replace("*", placeholder)
    return f"{placeholder} {caption}"


def distorted(paths, limit=MAX_UNWARNED_ASPECT):
    """'name (WxH)' of the images whose sides differ by more than `limit`: squashed by a square resize."""
    found = []
    for path in paths:
        with Image.open(path) as image:
            width, height = image.size
        if max(width, height) > limit * min(width, height):
            found.append(f"{os.path.basename(path)} ({width}x{height})")
    return found


class PersonalizedBase(Dataset):
    """Images of one concept with captions such as "a photo of a {placeholder}".

    Returns {"image": HWC float32 in [-1, 1], "caption": str, "cache_key": str}. The image is a
    deterministic function of `cache_key` (path and flip), so a model may cache its latent.
    """

    templates = imagenet_templates_small
    dual_templates = imagenet_dual_templates_small

    def __init__(self,
                 data_root,
                 size=None,
                 repeats=100,
                 interpolation="bicubic",
                 flip_p=0.5,
                 set="train",
                 placeholder_token="*",
                 per_image_tokens=False,
                 center_crop=False,
                 mixing_prob=0.25,
                 coarse_class_text=None,
                 size_conditioning=False,
                 learnable_property=None,
                 templates=None,
                 caption_extension=".txt",
                 crop=None,
                 background=WHITE,
                 ):
        """Beyond the original's parameters: `learnable_property` (object|style) picks the built-in templates,
        `templates` (a list of strings with {}) replaces them; `caption_extension`: a file <image
        name><ext> beside an image is its caption (None: no caption files); `crop` center|none|random (random:
        a square at one of RANDOM_CROP_PLACES places along the long side, drawn per example; default: the
        original's `center_crop` flag); `background`: the colour transparent pixels are composited onto (a name,
        "#rrggbb" or three numbers)."""
        self.data_root = data_root
        self.caption_extension = caption_extension
        self.image_paths = list_images(data_root, caption_extension)
        self.num_images = len(self.image_paths)
        self._length = self.num_images * repeats if set == "train" else self.num_images

        self.size = size
        self.interpolation = interpolation
        resample_filter(interpolation)  # reject an unknown name now rather than at the first batch
        self.flip_p = flip_p
        self.placeholder_token = placeholder_token
        self.per_image_tokens = per_image_token_strings(per_image_tokens)
        if crop is not None and crop not in CROP_MODES:
            raise ValueError(f"crop {crop!r}: choose one of {', '.join(CROP_MODES)}")
        self.crop = crop or ("center" if center_crop else "none")
        if self.crop == "none" and size is not None:
            stretched = distorted(self.image_paths)
            if stretched:
                warnings.warn(f"{len(stretched)} images in {data_root!r} are not square and are resized to "
                              f"{size}x{size} px, one side stretched by more than {MAX_UNWARNED_ASPECT - 1:.0%} "
                              f"(e.g. {stretched[0]}): pass --crop center (data param crop: center) to crop "
                              "them instead, or crop them yourself.")
        self.templates = self._choose_templates(learnable_property, templates)
        self.mixing_prob = mixing_prob
        self.coarse_class_text = coarse_class_text
        self.captions = self.read_captions()
        # SDXL's micro-conditioning: each image's source size, crop and target size (set by SDXL configs)
        self.size_conditioning = size_conditioning
        self.background = background_colour(background)
        self._sizes = {}

        if self.per_image_tokens and self.num_images > len(self.per_image_tokens):
            raise ValueError(f"per_image_tokens gives {len(self.per_image_tokens)} words, and {data_root!r} has "
                             f"{self.num_images} images: give per_image_tokens a list of one word per image")
        # Decoded, cropped and resized images by (index, crop place): a concept folder holds a handful of images.
        self._prepared = {}

    def _choose_templates(self, learnable_property, templates):
        if templates is not None:
            return check_templates(templates, "data param templates")
        if learnable_property is None:
            return type(self).templates
        if learnable_property not in LEARNABLE_PROPERTIES:
            raise ValueError(f"learnable_property {learnable_property!r}: choose one of "
                             f"{', '.join(LEARNABLE_PROPERTIES)}")
        if learnable_property == "style":
            self.dual_templates = imagenet_dual_style_templates_small
            return imagenet_style_templates_small
        self.dual_templates = imagenet_dual_templates_small
        return imagenet_templates_small

    def __len__(self):
        return self._length

    def read_captions(self):
        """{image index: caption} of the images with a caption file (read now: a bad file stops the run early)."""
        if not self.caption_extension:
            return {}
        paths = [os.path.splitext(p)[0] + self.caption_extension for p in self.image_paths]
        return {i: read_caption(path, self.placeholder_token, self.placeholder())
                for i, path in enumerate(paths) if os.path.exists(path)}  # a pipe or folder there is refused

    def placeholder(self):
        """The placeholder as captions write it (after the coarse class word, if any)."""
        if self.coarse_class_text:
            return f"{self.coarse_class_text} {self.placeholder_token}"
        return self.placeholder_token

    def caption(self, image_index):
        placeholder = self.placeholder()
        if image_index in self.captions:
            return self.captions[image_index]
        if self.per_image_tokens and random.random() < self.mixing_prob:
            return random.choice(self.dual_templates).format(placeholder, self.per_image_tokens[image_index])
        return random.choice(self.templates).format(placeholder)

    def crop_place(self):
        """Where along the long side this example's square is cropped: None (no crop), 0.5 (centre) or random."""
        if self.crop == "none":
            return None
        if self.crop == "center":
            return 0.5
        return random.randrange(RANDOM_CROP_PLACES) / (RANDOM_CROP_PLACES - 1)

    def prepared_image(self, image_index, place=None):
        """The image before the random flip: RGB, cropped to a square at `place` (None: not cropped), resized."""
        key = (image_index, place)
        if key not in self._prepared:
            # huge images are reduced while decoding, never below the training size
            image = load_rgb(self.image_paths[image_index], self.background, min_side=self.size)
            width, height = image.info["original_size"]  # the file's own size, which SDXL is conditioned on
            crop = (0, 0)
            if place is not None:
                image, (top, left) = square_crop(image, place)
                # top-left of the crop in the image scaled to the output size, as Stability's data pipeline
                scale = (self.size or image.size[0]) / image.size[0]
                crop = (round(top * scale), round(left * scale))
            if self.size is not None:
                image = resize(image, self.size, self.interpolation)
            self._prepared[key] = image
            self._sizes[key] = {"original_size_as_tuple": torch.tensor([height, width]),
                                "crop_coords_top_left": torch.tensor(crop),
                                "target_size_as_tuple": torch.tensor([image.size[1], image.size[0]])}
        return self._prepared[key]

    def __getitem__(self, i):
        image_index = i % self.num_images
        place = self.crop_place()
        image = self.prepared_image(image_index, place)
        flipped = random.random() < self.flip_p
        if flipped:
            image = hflip(image)
        path = self.image_paths[image_index]
        example = {
            "image": to_model_range(image),
            "caption": self.caption(image_index),
            # the same key, the same pixels: a model may cache the latent
            "cache_key": f"{path}|{int(flipped)}" + (f"|{place:.3f}" if self.crop == "random" else ""),
        }
        if self.size_conditioning:
            example.update(self._sizes[(image_index, place)])
        return example
