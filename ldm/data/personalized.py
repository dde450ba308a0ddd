"""The training set of textual inversion: a folder of 3-5 images of one concept, each paired with a
random caption that names the concept through the placeholder word."""
import os
import random
import warnings

from PIL import Image
import torch
from torch.utils.data import Dataset

from ldm.data.image_ops import (WHITE, background_colour, center_crop, hflip, load_rgb, resample_filter, resize,
                                to_model_range)
from ldm.util import InputFileError, open_input_file

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

# Extra words that give each training image its own token when per_image_tokens is on.
per_img_token_list = [
    'א', 'ב', 'ג', 'ד', 'ה', 'ו', 'ז', 'ח', 'ט', 'י', 'כ', 'ל', 'מ', 'נ', 'ס', 'ע', 'פ', 'צ', 'ק', 'ר', 'ש', 'ת',
]


MIN_USEFUL_SIDE = 8  # px; smaller training images are almost certainly a mistake


def list_images(data_root):
    """Sorted paths of the readable images in `data_root`.

    Hidden files are ignored; anything else that is not a regular file PIL can open (a subfolder, a pipe or
    device, a damaged file) is skipped, with one warning naming each and why: a concept folder often holds
    other things, and the run goes on with its images. A missing folder or one without images is an error
    naming the folder.
    """
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"Training image folder {data_root!r} does not exist (check --data_root)")
    images, skipped, tiny = [], [], []
    for name in sorted(os.listdir(data_root)):
        if name.startswith("."):
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
        warnings.warn(f"Skipping {len(skipped)} entries of {data_root!r} that are not readable images: "
                      f"{'; '.join(skipped)}")
    if not images:
        raise ValueError(f"No readable images in training image folder {data_root!r}"
                         + (f" ({len(skipped)} files are not images or are damaged)" if skipped else "")
                         + ": put 3-5 images of the concept there")
    return images


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
                 background=WHITE,
                 ):
        self.data_root = data_root
        self.image_paths = list_images(data_root)
        self.num_images = len(self.image_paths)
        self._length = self.num_images * repeats if set == "train" else self.num_images

        self.size = size
        self.interpolation = interpolation
        resample_filter(interpolation)  # reject an unknown name now rather than at the first batch
        self.flip_p = flip_p
        self.placeholder_token = placeholder_token
        self.per_image_tokens = per_image_tokens
        self.center_crop = center_crop
        self.mixing_prob = mixing_prob
        self.coarse_class_text = coarse_class_text
        # SDXL's micro-conditioning: each image's source size, crop and target size (set by SDXL configs)
        self.size_conditioning = size_conditioning
        # what transparent pixels of the training images show (`background:` in the data params)
        self.background = background_colour(background)
        self._sizes = {}

        if per_image_tokens and self.num_images > len(per_img_token_list):
            raise ValueError(f"per_image_tokens supports at most {len(per_img_token_list)} images, "
                             f"{data_root!r} has {self.num_images}; add tokens to per_img_token_list")
        # Decoded, cropped and resized images by index: a concept folder holds a handful of images.
        self._prepared = {}

    def __len__(self):
        return self._length

    def caption(self, image_index):
        placeholder = self.placeholder_token
        if self.coarse_class_text:
            placeholder = f"{self.coarse_class_text} {placeholder}"
        if self.per_image_tokens and random.random() < self.mixing_prob:
            return random.choice(self.dual_templates).format(placeholder, per_img_token_list[image_index])
        return random.choice(self.templates).format(placeholder)

    def prepared_image(self, image_index):
        """The image before the random flip: RGB, optionally centre-cropped, resized."""
        if image_index not in self._prepared:
            # huge images are reduced while decoding, never below the training size
            image = load_rgb(self.image_paths[image_index], self.background, min_side=self.size)
            width, height = image.size
            crop = (0, 0)
            if self.center_crop:
                image = center_crop(image)
                side = min(width, height)
                # top-left of the crop in the image scaled to the output size, as Stability's data pipeline
                scale = (self.size or side) / side
                crop = (round((height - side) // 2 * scale), round((width - side) // 2 * scale))
            if self.size is not None:
                image = resize(image, self.size, self.interpolation)
            self._prepared[image_index] = image
            original_width, original_height = image.info["original_size"]
            self._sizes[image_index] = {"original_size_as_tuple": torch.tensor([original_height, original_width]),
                                        "crop_coords_top_left": torch.tensor(crop),
                                        "target_size_as_tuple": torch.tensor([image.size[1], image.size[0]])}
        return self._prepared[image_index]

    def __getitem__(self, i):
        image_index = i % self.num_images
        image = self.prepared_image(image_index)
        flipped = random.random() < self.flip_p
        if flipped:
            image = hflip(image)
        path = self.image_paths[image_index]
        example = {
            "image": to_model_range(image),
            "caption": self.caption(image_index),
            "cache_key": f"{path}|{int(flipped)}",
        }
        if self.size_conditioning:
            example.update(self._sizes[image_index])
        return example
