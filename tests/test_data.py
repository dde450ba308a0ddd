"""The concept-folder datasets: captions, image modes, folder errors, crop/flip/resize, length."""
import random
import warnings

import numpy as np
import pytest
from PIL import Image

from ldm.data import personalized, personalized_style
from ldm.data.image_ops import resample_filter, to_uint8_hwc
from ldm.data.personalized import PersonalizedBase


def _save(folder, name, image):
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name)
    return folder / name


@pytest.fixture
def folder(tmp_path):
    """Two RGB images: a 40x20 (wide) gradient and a 24x24 square with a marked left edge."""
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[..., 0] = np.arange(40, dtype=np.uint8)[None, :] * 6
    square = np.zeros((24, 24, 3), dtype=np.uint8)
    square[:, :4] = 255
    _save(tmp_path / "imgs", "a_wide.png", Image.fromarray(wide))
    _save(tmp_path / "imgs", "b_square.png", Image.fromarray(square))
    return tmp_path / "imgs"


def test_captions_use_the_given_placeholder(folder):
    random.seed(0)
    ds = PersonalizedBase(str(folder), size=8, placeholder_token="@")
    captions = [ds[i]["caption"] for i in range(40)]
    assert all("@" in c for c in captions)
    assert not any("*" in c for c in captions)
    assert all(c in [t.format("@") for t in personalized.imagenet_templates_small] for c in captions)


def test_coarse_class_and_per_image_tokens(folder):
    random.seed(1)
    ds = PersonalizedBase(str(folder), size=8, placeholder_token="sks", per_image_tokens=True,
                          mixing_prob=1.0, coarse_class_text="dog")
    for i in range(6):
        caption = ds[i]["caption"]
        assert "dog sks" in caption
        assert personalized.per_img_token_list[i % 2] in caption
    ds.mixing_prob = 0.0
    assert all(not any(t in ds[i]["caption"] for t in personalized.per_img_token_list) for i in range(10))


def test_per_image_tokens_may_be_a_list_of_words(folder):
    """A CLIP model cannot take the original's Hebrew letters as single tokens: a list of words replaces them."""
    random.seed(3)
    ds = PersonalizedBase(str(folder), size=8, placeholder_token="*", per_image_tokens=["@", "#"], mixing_prob=1.0)
    for i in range(6):
        assert ds[i]["caption"].endswith(" with " + ["@", "#"][i % 2])
    with pytest.raises(ValueError, match="one word per image"):
        PersonalizedBase(str(folder), per_image_tokens=["@"])
    for bad in ("@#", ["@", ""], [1, 2]):
        with pytest.raises(ValueError, match="list of non-empty strings"):
            PersonalizedBase(str(folder), per_image_tokens=bad)


def test_style_dataset_uses_style_templates(folder):
    random.seed(2)
    ds = personalized_style.PersonalizedBase(str(folder), size=8, placeholder_token="@")
    styles = [t.format("@") for t in personalized_style.imagenet_style_templates_small]
    assert all(ds[i]["caption"] in styles for i in range(20))


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "LA", "CMYK", "I;16", "I"])
def test_image_modes_load_as_three_channels(tmp_path, mode):
    rgb = Image.fromarray(np.full((12, 12, 3), (200, 100, 50), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(np.full((12, 12), 40000, dtype=np.uint16))
    elif mode == "I":
        image = Image.fromarray(np.full((12, 12), 40000, dtype=np.int32))
    else:
        image = rgb.convert(mode)
    name = "x.tif" if mode in ("CMYK", "I") else "x.png"
    _save(tmp_path / "m", name, image)
    example = PersonalizedBase(str(tmp_path / "m"), flip_p=0.0)[0]
    img = example["image"]
    assert img.shape == (12, 12, 3) and img.dtype == np.float32
    assert -1.0 <= img.min() and img.max() <= 1.0
    if mode.startswith("I"):
        # 16-bit grey 40000/65535 is scaled to ~155, not clipped to white.
        assert np.allclose(to_uint8_hwc(img), 156, atol=1)
    if mode in ("RGBA", "P"):
        assert np.allclose(to_uint8_hwc(img)[0, 0], (200, 100, 50), atol=8)


def test_non_image_files_are_skipped_with_one_warning(folder):
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"garbage")
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    (folder / "sub").mkdir()
    with pytest.warns(UserWarning) as record:
        ds = PersonalizedBase(str(folder), size=8, crop="center")
    assert len(record) == 1
    message = str(record[0].message)
    assert "notes.txt" in message and "broken.png" in message and "sub" in message
    assert ".DS_Store" not in message
    assert ds.num_images == 2
    assert [p.rsplit("/", 1)[-1] for p in ds.image_paths] == ["a_wide.png", "b_square.png"]


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        PersonalizedBase(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").write_text("x")
    with pytest.raises(ValueError, match="No readable images.*empty"):
        PersonalizedBase(str(tmp_path / "empty"))


def test_length_and_repeats(folder):
    assert len(PersonalizedBase(str(folder), repeats=7)) == 14
    assert len(PersonalizedBase(str(folder), repeats=7, set="val")) == 2
    ds = PersonalizedBase(str(folder), size=8, repeats=3, flip_p=0.0)
    assert ds[0]["cache_key"] == ds[2]["cache_key"] and ds[0]["cache_key"] != ds[1]["cache_key"]


def test_center_crop_and_resize(folder):
    ds = PersonalizedBase(str(folder), size=10, center_crop=True, flip_p=0.0, set="val")
    img = to_uint8_hwc(ds[0]["image"])
    assert img.shape == (10, 10, 3)
    # The 40-wide gradient cropped to its central 20 columns: red runs from 10*6 to 29*6.
    assert 50 <= img[5, 0, 0] <= 80 and 160 <= img[5, -1, 0] <= 180
    uncropped = to_uint8_hwc(PersonalizedBase(str(folder), size=10, flip_p=0.0, set="val")[0]["image"])
    assert uncropped[5, 0, 0] < 20 and uncropped[5, -1, 0] > 220


def test_flip_and_cache_key(folder):
    flipped = PersonalizedBase(str(folder), size=24, flip_p=1.0, set="val")[1]
    plain = PersonalizedBase(str(folder), size=24, flip_p=0.0, set="val")[1]
    assert plain["cache_key"].endswith("b_square.png|0") and flipped["cache_key"].endswith("b_square.png|1")
    np.testing.assert_array_equal(flipped["image"], plain["image"][:, ::-1])
    assert plain["image"][0, 0, 0] == 1.0 and flipped["image"][0, -1, 0] == 1.0

    random.seed(3)
    ds = PersonalizedBase(str(folder), size=24, flip_p=0.5)
    keys = {ds[1]["cache_key"][-1] for _ in range(40)}
    assert keys == {"0", "1"}
    # Same key, same pixels: the model may cache latents by key.
    by_key = {}
    for _ in range(20):
        example = ds[1]
        if example["cache_key"] in by_key:
            np.testing.assert_array_equal(by_key[example["cache_key"]], example["image"])
        by_key[example["cache_key"]] = example["image"]


def test_interpolation_names():
    assert resample_filter("linear") == Image.Resampling.BILINEAR
    assert resample_filter("nearest") == Image.Resampling.NEAREST
    with pytest.raises(ValueError, match="bicubic"):
        resample_filter("cubic-ish")


def test_unknown_interpolation_fails_at_construction(folder):
    with pytest.raises(ValueError):
        PersonalizedBase(str(folder), interpolation="fancy")


def test_too_many_images_for_per_image_tokens(tmp_path):
    for i in range(len(personalized.per_img_token_list) + 1):
        _save(tmp_path / "many", f"{i:02d}.png", Image.new("RGB", (4, 4)))
    with pytest.raises(ValueError, match="per_image_tokens"):
        PersonalizedBase(str(tmp_path / "many"), per_image_tokens=True)


def test_crop_modes_and_the_distortion_warning(folder):
    """crop: center equals the original's center_crop; none squashes, and says so once for the 40x20 image."""
    center = PersonalizedBase(str(folder), size=10, crop="center", flip_p=0.0, set="val")[0]["image"]
    original = PersonalizedBase(str(folder), size=10, center_crop=True, flip_p=0.0, set="val")[0]["image"]
    np.testing.assert_array_equal(center, original)
    stretched = r"1 images .* stretched by more than 25% .*a_wide.png \(40x20\).*--crop center"
    with pytest.warns(UserWarning, match=stretched):
        PersonalizedBase(str(folder), size=10, crop="none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PersonalizedBase(str(folder), size=10, crop="center")
        PersonalizedBase(str(folder), crop="none")  # no resize, no distortion
    with pytest.raises(ValueError, match="crop 'top'"):
        PersonalizedBase(str(folder), crop="top")


def test_caption_files_place_the_placeholder(folder):
    (folder / "a_wide.txt").write_text("  a gradient  by @\n")
    (folder / "b_square.txt").write_text("a white stripe")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # caption files are not "non-image entries"
        ds = PersonalizedBase(str(folder), placeholder_token="@", coarse_class_text="pattern")
    assert [ds[0]["caption"], ds[1]["caption"]] == ["a gradient by @", "pattern @ a white stripe"]
    (folder / "a_wide.txt").write_text("* on paper")
    assert PersonalizedBase(str(folder), placeholder_token="sks")[0]["caption"] == "sks on paper"
    # another extension, or none: the .txt files are then entries that are not images
    with pytest.warns(UserWarning, match="Skipping 2 non-image entries"):
        ds = PersonalizedBase(str(folder), caption_extension=None)
    assert ds[0]["caption"] in [t.format("*") for t in personalized.imagenet_templates_small]
    (folder / "b_square.txt").write_text("\n")
    with pytest.raises(ValueError, match="b_square.txt is empty"):
        PersonalizedBase(str(folder))


def test_templates_are_checked(folder, tmp_path):
    random.seed(4)
    ds = PersonalizedBase(str(folder), templates=["a {} here", "a {} there"], placeholder_token="@")
    assert {ds[i]["caption"] for i in range(20)} == {"a @ here", "a @ there"}
    with pytest.raises(ValueError, match="exactly one {}.*'no placeholder'"):
        PersonalizedBase(str(folder), templates=["no placeholder"])
    bad = tmp_path / "templates.txt"
    bad.write_text("a {} and {}\n")
    with pytest.raises(ValueError, match="templates.txt: each caption template"):
        personalized.read_templates(str(bad))
    a1111 = tmp_path / "a1111.txt"
    a1111.write_text("a photo of a [name]\nart by [name]\n")
    assert personalized.read_templates(str(a1111)) == ["a photo of a {}", "art by {}"]
    a1111.write_text("a photo of a [name], [filewords]\n")
    with pytest.raises(ValueError, match=r"a1111.txt: AUTOMATIC1111's \[filewords\] is not read"):
        personalized.read_templates(str(a1111))


def test_random_crops_take_few_cacheable_places(folder):
    """crop: random cuts the 40x20 image's 20 px square at one of RANDOM_CROP_PLACES places along its width,
    drawn per example; the place is in the cache key, so equal keys still mean equal pixels."""
    random.seed(5)
    ds = PersonalizedBase(str(folder), crop="random", flip_p=0.0, set="val", size_conditioning=True)
    by_key, lefts = {}, set()
    for _ in range(60):
        example = ds[0]
        assert example["image"].shape == (20, 20, 3)
        left = int(example["crop_coords_top_left"][1])
        lefts.add(left)
        # the gradient's red channel is 6 * column: the crop's first column says where it was cut
        assert to_uint8_hwc(example["image"])[0, 0, 0] == 6 * left
        if example["cache_key"] in by_key:
            np.testing.assert_array_equal(by_key[example["cache_key"]], example["image"])
        by_key[example["cache_key"]] = example["image"]
    assert len(by_key) == len(lefts) == personalized.RANDOM_CROP_PLACES and lefts >= {0, 20}
    assert ds[1]["image"].shape == (24, 24, 3)  # a square image has one place
