"""Qwen-VL's image preprocessing.

The original reads an image with PIL, converts it to RGB, resizes it to
`image_size` with `Image.BICUBIC` (stretching: no crop, aspect ratio not
kept), divides by 255 and normalizes with CLIP's mean and std.
"""

import os

import keras
import numpy as np
import PIL.Image
from keras import ops
from keras_hub.src.layers.preprocessing.image_converter import ImageConverter
from keras_hub.src.utils.tensor_utils import convert_to_numpy
from keras_hub.src.utils.tensor_utils import in_grain_data_pipeline
from keras_hub.src.utils.tensor_utils import tf

from keras_qwenvl.backbone import QwenVLBackbone
from keras_qwenvl.presets import QwenVLPresetMixin

# CLIP's normalization (the visual encoder's `image_transform`).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL's bicubic kernel: a = -0.5, support 2 input pixels (widened by the
# downscale factor, which is PIL's antialiasing).
_BICUBIC_A = -0.5
_BICUBIC_SUPPORT = 2.0

# Arguments of keras-hub's `ImageConverter` that Qwen-VL fixes.
_FIXED_ARGUMENTS = (
    "scale",
    "offset",
    "interpolation",
    "antialias",
    "crop_to_aspect_ratio",
    "pad_to_aspect_ratio",
    "bounding_box_format",
    "data_format",
)


def _bicubic_kernel(x):
    x = np.abs(x)
    a = _BICUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def bicubic_resize_weights(in_size, out_size):
    """PIL's bicubic resampling along one axis as an `(out, in)` matrix.

    Follows Pillow's `precompute_coeffs`: output pixel `i` is centred at
    input coordinate `(i + 0.5) * scale`; when downscaling, the kernel is
    stretched by `scale` (antialiasing); each row is normalized to sum 1.
    """
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = _BICUBIC_SUPPORT * filter_scale
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = (i + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        last = min(int(center + support + 0.5), in_size)
        taps = np.arange(first, last)
        row = _bicubic_kernel((taps - center + 0.5) / filter_scale)
        total = row.sum()
        weights[i, first:last] = row / total if total != 0.0 else row
    return weights


def _to_rgb(array):
    """`(H, W, 3)` from grey `(H, W)` or `(H, W, 1)`, RGB, or RGBA.

    Grey is repeated over the channels and alpha dropped, as PIL's
    `convert("RGB")` does.
    """
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
        raise ValueError(
            "An image array must have shape (H, W), (H, W, 1), (H, W, 3) or "
            f"(H, W, 4), or (N, H, W, C) for a batch; got shape {array.shape}."
        )
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    return array[..., :3]


def _open_image(path):
    """Reads an image file as an RGB PIL image."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such image file: {path!r}")
    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(
            f"{path!r} is corrupt or not an image ({error})."
        ) from None


@keras.saving.register_keras_serializable(package="keras_qwenvl")
class QwenVLImageConverter(QwenVLPresetMixin, ImageConverter):
    """Resizes and normalizes images as Qwen-VL's visual encoder expects.

    Each image is converted to RGB, resized to `image_size` with bicubic
    interpolation (stretched: no crop, aspect ratio not kept), divided by
    255 and normalized with CLIP's mean and std. The output is float32,
    channels last.

    Files, PIL images and integer arrays are resized by PIL itself
    (`Image.resize(..., Image.BICUBIC)`), so they match the original
    exactly. Float arrays (values in [0, 255], keras-hub's convention for
    raw images) are resized by the same antialiased bicubic filter in
    numpy, in float64 without PIL's rounding to uint8 after each pass (the
    clipping to [0, 255] after each pass is kept); they differ from the PIL
    result by at most about 0.01 after normalization.

    Args:
        image_size: `(height, width)` of the output; 448 x 448 for the
            published model (`visual.image_size`).

    Call arguments:
        inputs: one image or a batch. An image is a file path (str or
            `os.PathLike`), a PIL image (any mode), or an array of shape
            `(H, W)` (grey), `(H, W, 1)`, `(H, W, 3)` (RGB) or `(H, W, 4)`
            (RGBA, alpha dropped) holding uint8/integer values or floats in
            [0, 255]. A batch is a list or tuple of images or an
            `(N, H, W, C)` array. One image gives `(height, width, 3)`, a batch
            `(N, height, width, 3)`.

    Examples:
    ```python
    converter = QwenVLImageConverter(image_size=(448, 448))
    converter("cat.png").shape  # (448, 448, 3)
    converter(["cat.png", np.zeros((300, 200, 3), "uint8")]).shape
    # (2, 448, 448, 3)
    ```
    """

    backbone_cls = QwenVLBackbone

    def __init__(self, image_size=(448, 448), **kwargs):
        fixed = sorted(set(kwargs) & set(_FIXED_ARGUMENTS))
        if fixed:
            raise ValueError(
                "QwenVLImageConverter's preprocessing is fixed (bicubic "
                "resize without crop, CLIP mean/std); it takes no "
                f"{fixed}."
            )
        if (
            not isinstance(image_size, (tuple, list))
            or len(image_size) != 2
            or not all(
                isinstance(s, (int, np.integer)) and s > 0 for s in image_size
            )
        ):
            raise ValueError(
                "`image_size` must be (height, width), two positive ints; "
                f"got {image_size!r}."
            )
        # Images are always preprocessed in float32.
        kwargs.pop("dtype", None)
        mean, std = np.array(CLIP_MEAN), np.array(CLIP_STD)
        super().__init__(
            image_size=tuple(int(s) for s in image_size),
            # The same affine map as (x / 255 - mean) / std.
            scale=(1.0 / (255.0 * std)).tolist(),
            offset=(-mean / std).tolist(),
            crop_to_aspect_ratio=False,
            interpolation="bicubic",
            antialias=True,
            dtype="float32",
            **kwargs,
        )
        # Images are resized in numpy (`_resize`); keras-hub's Resizing
        # sublayer is never called. Built, so that it does not leave the
        # task unbuilt (see QwenVLCausalLMPreprocessor).
        self.resizing.built = True

    def _resize(self, image):
        """Resizes a PIL image or an `(H, W, 3)` array to `image_size`.

        Returns `(height, width, 3)` float32 values in [0, 255].
        """
        height, width = self.image_size
        if isinstance(image, PIL.Image.Image):
            image = image.convert("RGB").resize(
                (width, height), PIL.Image.Resampling.BICUBIC
            )
            return np.asarray(image, dtype="float32")
        if np.issubdtype(image.dtype, np.integer):
            if image.min() < 0 or image.max() > 255:
                raise ValueError(
                    "Integer image values must lie in [0, 255]; got "
                    f"[{image.min()}, {image.max()}]."
                )
            return self._resize(PIL.Image.fromarray(image.astype("uint8")))
        if not np.issubdtype(image.dtype, np.floating):
            raise ValueError(
                "An image array must hold integers or floats in [0, 255]; "
                f"got dtype {image.dtype}."
            )
        if not np.isfinite(image).all() or image.min() < 0 or image.max() > 255:
            raise ValueError(
                "Float image values must be finite and lie in [0, 255] (raw "
                f"pixel values); got [{image.min()}, {image.max()}]."
            )
        # PIL's order: the horizontal pass, then the vertical one.
        rows = bicubic_resize_weights(image.shape[0], height)
        columns = bicubic_resize_weights(image.shape[1], width)
        image = np.matmul(columns, image.astype("float64"))
        image = np.tensordot(rows, np.clip(image, 0.0, 255.0), axes=1)
        return np.clip(image, 0.0, 255.0).astype("float32")

    def _convert_one(self, image):
        """`(height, width, 3)` float32 pixels of one image."""
        if isinstance(image, (str, os.PathLike)):
            image = _open_image(image)
        elif not isinstance(image, PIL.Image.Image):
            image = _to_rgb(convert_to_numpy(image))
        pixels = self._resize(image) / np.float32(255.0)
        # Subtract then divide, in float32, as the original's `Normalize`.
        pixels = pixels - np.array(CLIP_MEAN, dtype="float32")
        return pixels / np.array(CLIP_STD, dtype="float32")

    def _convert(self, inputs):
        """Numpy pixels of one image or of a batch (see the class doc)."""
        if isinstance(inputs, (str, os.PathLike, PIL.Image.Image)):
            return self._convert_one(inputs)
        if not isinstance(inputs, (list, tuple)):
            array = convert_to_numpy(inputs)
            if array.dtype.kind in "SUO":
                # Paths (a tf string tensor arrives as bytes).
                paths = [
                    p.decode("utf-8") if isinstance(p, bytes) else p
                    for p in array.reshape(-1).tolist()
                ]
                if array.ndim == 0:
                    return self._convert_one(paths[0])
                inputs = paths
            elif array.ndim == 4:
                inputs = list(array)
            else:
                return self._convert_one(array)
        if not inputs:
            return np.zeros((0,) + self.image_size + (3,), dtype="float32")
        return np.stack([self._convert_one(image) for image in inputs])

    def _call_python(self, inputs):
        pixels = self._convert(inputs)
        if in_grain_data_pipeline():
            return pixels
        return ops.convert_to_tensor(pixels)

    def _call_tf(self, inputs):
        # The numpy/PIL code through `tf.py_function` (tf.data, tf.function).
        inputs = tf.convert_to_tensor(inputs)
        (pixels,) = tf.py_function(
            lambda x: [self._convert(x.numpy())], [inputs], [tf.float32]
        )
        if inputs.dtype == tf.string:
            single = inputs.shape.rank == 0
        else:
            single = inputs.shape.rank in (2, 3)
        batch_shape = () if single else (None,)
        pixels.set_shape(batch_shape + self.image_size + (3,))
        return pixels

    def get_config(self):
        config = super().get_config()
        for name in _FIXED_ARGUMENTS:
            config.pop(name, None)
        return config
