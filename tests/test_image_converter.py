"""QwenVLImageConverter: the original's PIL bicubic resize and CLIP norm."""

import os

import keras
import numpy as np
import PIL.Image
import pytest
import tensorflow as tf
from skimage import data as skimage_data

from keras_qwenvl.backbone import QwenVLBackbone
from keras_qwenvl.image_converter import CLIP_MEAN
from keras_qwenvl.image_converter import CLIP_STD
from keras_qwenvl.image_converter import QwenVLImageConverter
from keras_qwenvl.image_converter import bicubic_resize_weights

# golden/README.md: PIL vs another bicubic implementation.
PIXEL_TOLERANCE = 2e-2


def _numpy(x):
    return keras.ops.convert_to_numpy(x)


def _golden_images(golden):
    """`(case index, image paths)` of the golden cases with images."""
    for index, case in enumerate(golden["cases"]):
        if case["images"]:
            paths = [
                os.path.join(golden["images_dir"], name)
                for name in case["images"]
            ]
            yield index, paths


@pytest.fixture(scope="module")
def converter(golden):
    return QwenVLImageConverter(image_size=(golden["image_size"],) * 2)


def _reference(image, size):
    """The original's preprocessing, written out with PIL."""
    image = image.convert("RGB").resize((size[1], size[0]), PIL.Image.BICUBIC)
    pixels = np.asarray(image, dtype="float32") / np.float32(255)
    return (pixels - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)


# Golden fixture.


def test_golden_pixels_from_paths(converter, golden):
    for index, paths in _golden_images(golden):
        expected = golden["arrays"][f"{index}_pixels"]
        pixels = _numpy(converter(paths))
        np.testing.assert_allclose(pixels, expected, atol=1e-6)
        single = _numpy(converter(paths[0]))
        assert single.shape == expected.shape[1:]
        assert single.dtype == np.float32
        np.testing.assert_allclose(single, expected[0], atol=1e-6)


def test_golden_pixels_from_other_inputs(converter, golden):
    for index, paths in _golden_images(golden):
        expected = golden["arrays"][f"{index}_pixels"]
        images = [PIL.Image.open(path) for path in paths]
        pixels = _numpy(converter(images))
        np.testing.assert_allclose(pixels, expected, atol=1e-6)
        uint8 = [np.asarray(image.convert("RGB")) for image in images]
        pixels = _numpy(converter(uint8))
        np.testing.assert_allclose(pixels, expected, atol=1e-6)
        # Float arrays: numpy bicubic without PIL's uint8 rounding.
        floats = [array.astype("float32") for array in uint8]
        difference = np.abs(_numpy(converter(floats)) - expected).max()
        assert 0 < difference < PIXEL_TOLERANCE


# Without ../shared.


def test_float_path_matches_pil_on_astronaut():
    astronaut = skimage_data.astronaut()  # (512, 512, 3) uint8
    converter = QwenVLImageConverter(image_size=(112, 112))
    from_pil = _numpy(converter(astronaut))
    np.testing.assert_array_equal(
        from_pil, _reference(PIL.Image.fromarray(astronaut), (112, 112))
    )
    from_float = _numpy(converter(astronaut.astype("float32")))
    assert np.abs(from_float - from_pil).max() < PIXEL_TOLERANCE


@pytest.mark.parametrize("in_size,out_size", [(37, 112), (600, 112), (5, 3)])
def test_resize_weights_match_pil_float_resize(in_size, out_size):
    # PIL resizes mode "F" images with the same filter in floating point.
    rows = np.random.default_rng(0).uniform(0, 255, (4, in_size))
    image = PIL.Image.fromarray(rows.astype("float32"), mode="F")
    expected = np.asarray(image.resize((out_size, 4), PIL.Image.BICUBIC))
    weights = bicubic_resize_weights(in_size, out_size)
    np.testing.assert_allclose(
        rows.astype("float32") @ weights.T, expected, atol=1e-4
    )
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)


def test_non_square_output_and_batches():
    image = skimage_data.coffee()  # (400, 600, 3)
    converter = QwenVLImageConverter(image_size=(24, 40))
    expected = _reference(PIL.Image.fromarray(image), (24, 40))
    np.testing.assert_array_equal(_numpy(converter(image)), expected)
    batch = _numpy(converter(np.stack([image, image[::-1]])))
    assert batch.shape == (2, 24, 40, 3)
    np.testing.assert_array_equal(batch[0], expected)
    assert _numpy(converter([])).shape == (0, 24, 40, 3)


def test_grey_and_rgba(tmp_path):
    converter = QwenVLImageConverter(image_size=(16, 16))
    rgb = skimage_data.astronaut()[::8, ::8]
    grey = rgb[..., 0]
    # Grey becomes RGB by repeating the channel, as PIL's convert("RGB").
    path = tmp_path / "grey.png"
    PIL.Image.fromarray(grey).save(path)
    from_path = _numpy(converter(str(path)))
    np.testing.assert_array_equal(_numpy(converter(grey)), from_path)
    np.testing.assert_array_equal(_numpy(converter(grey[..., None])), from_path)
    np.testing.assert_array_equal(
        from_path, _reference(PIL.Image.fromarray(grey), (16, 16))
    )
    # RGBA: alpha is dropped, in arrays, PIL images and files alike.
    alpha = np.full(rgb.shape[:2] + (1,), 7, dtype="uint8")
    rgba = np.concatenate([rgb, alpha], axis=-1)
    path = tmp_path / "rgba.png"
    PIL.Image.fromarray(rgba).save(path)
    expected = _numpy(converter(rgb))
    np.testing.assert_array_equal(_numpy(converter(rgba)), expected)
    np.testing.assert_array_equal(_numpy(converter(str(path))), expected)
    np.testing.assert_array_equal(
        _numpy(converter(PIL.Image.fromarray(rgba))), expected
    )
    # Integer arrays of another dtype take the uint8 path.
    np.testing.assert_array_equal(
        _numpy(converter(rgb.astype("int64"))), expected
    )


def test_errors(tmp_path):
    converter = QwenVLImageConverter(image_size=(16, 16))
    missing = str(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        converter(missing)
    corrupt = tmp_path / "x.png"
    corrupt.write_bytes(b"\x89PNG garbage, not an image")
    with pytest.raises(ValueError, match="x.png.*corrupt or not an image"):
        converter(str(corrupt))
    with pytest.raises(ValueError, match=r"got shape \(8, 8, 2\)"):
        converter(np.zeros((8, 8, 2), "uint8"))
    with pytest.raises(ValueError, match=r"got shape \(0, 8, 3\)"):
        converter(np.zeros((0, 8, 3), "uint8"))
    with pytest.raises(ValueError, match=r"got shape \(1, 2, 8, 8, 3\)"):
        converter(np.zeros((1, 2, 8, 8, 3), "uint8"))
    with pytest.raises(ValueError, match=r"lie in \[0, 255\]"):
        converter(np.full((8, 8, 3), 300.0, "float32"))
    with pytest.raises(ValueError, match=r"lie in \[0, 255\]"):
        converter(np.full((8, 8, 3), -1, "int32"))
    with pytest.raises(ValueError, match=r"takes no \['crop_to_aspect_ratio'"):
        QwenVLImageConverter(crop_to_aspect_ratio=True)
    with pytest.raises(ValueError, match="two positive ints"):
        QwenVLImageConverter(image_size=448)


def test_tf_data(tmp_path):
    converter = QwenVLImageConverter(image_size=(16, 16))
    images = [skimage_data.astronaut(), skimage_data.coffee()]
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        PIL.Image.fromarray(image).save(paths[-1])
    eager = _numpy(converter(paths))
    ds = tf.data.Dataset.from_tensor_slices(paths).map(converter)
    assert [tuple(x.shape) for x in ds] == [(16, 16, 3)] * 2
    np.testing.assert_array_equal(np.stack([x.numpy() for x in ds]), eager)
    ds = tf.data.Dataset.from_tensors(images[1]).map(converter)
    np.testing.assert_array_equal(next(iter(ds)).numpy(), eager[1])


def test_config_and_preset_round_trip(tmp_path):
    converter = QwenVLImageConverter(image_size=(24, 40))
    config = converter.get_config()
    assert config["image_size"] == (24, 40)
    assert "crop_to_aspect_ratio" not in config  # fixed, never configurable
    restored = QwenVLImageConverter.from_config(config)
    assert restored.get_config() == config
    # keras-hub's own attributes describe the same preprocessing.
    assert restored.crop_to_aspect_ratio is False
    assert restored.interpolation == "bicubic"
    np.testing.assert_allclose(
        np.array(restored.scale) * 128 + restored.offset,
        (128 / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD),
    )
    backbone = QwenVLBackbone(
        vocabulary_size=32,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
    )
    backbone.save_to_preset(str(tmp_path))
    converter.save_to_preset(str(tmp_path))
    loaded = QwenVLImageConverter.from_preset(str(tmp_path))
    assert loaded.image_size == (24, 40)
    image = skimage_data.coffee()
    expected = _numpy(converter(image))
    np.testing.assert_array_equal(_numpy(loaded(image)), expected)
