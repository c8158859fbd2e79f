"""Training data: task formats, readers, synthetic data and packing.

A byte-level vocabulary (every byte its own token, special tokens from 256
up) and 28-pixel images keep everything small; the loader and `fit()` are
in test_data_loader.py.
"""

import collections
import json

import keras
import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFilter
import pytest

from keras_qwenvl import boxes
from keras_qwenvl.backbone import QwenVLBackbone
from keras_qwenvl.causal_lm_preprocessor import QwenVLCausalLMPreprocessor
from keras_qwenvl.data import packing
from keras_qwenvl.data import readers
from keras_qwenvl.data import synthetic
from keras_qwenvl.data import tasks
from keras_qwenvl.image_converter import QwenVLImageConverter
from keras_qwenvl.vision_encoder import QwenVLVisionEncoder

SPAN = 256  # positions between `<img>` and `</img>`


@pytest.fixture(scope="module")
def tokenizer(byte_tokenizer):
    return byte_tokenizer


@pytest.fixture(scope="module")
def preprocessor(tokenizer):
    converter = QwenVLImageConverter(image_size=(28, 28))
    return QwenVLCausalLMPreprocessor(
        tokenizer, converter, sequence_length=400
    )


def wide_image(seed=0):
    """A 200 x 100 (width x height) random image."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (100, 200, 3), dtype="uint8")


# Task formats (expected strings written by hand; the image is 200 x 100, so
# x / 200 * 1000 and y / 100 * 1000).


def test_caption_and_vqa_formats():
    image = wide_image()
    example = tasks.caption_example(image, "a red circle")
    assert example["task"] == "caption"
    assert example["prompts"] == "<img></img>Generate the caption in English:"
    assert example["responses"] == " a red circle"
    assert example["images"][0] is image
    example = tasks.vqa_example(image, "What color is the circle?", "red")
    assert example["prompts"] == "<img></img>What color is the circle? Answer:"
    assert example["responses"] == " red"


def test_grounded_caption_and_grounding_formats():
    image = wide_image()
    example = tasks.grounded_caption_example(
        image,
        [
            "a ",
            ("red circle", (20, 10, 100, 50)),
            " and a ",
            ("blue square", [(0, 0, 200, 100), (20, 10, 100, 50)]),
        ],
    )
    assert example["prompts"] == (
        "<img></img>Generate the caption in English with grounding:"
    )
    assert example["responses"] == (
        " a <ref>red circle</ref><box>(100,100),(500,500)</box> and a "
        "<ref>blue square</ref><box>(0,0),(999,999)</box>"
        "<box>(100,100),(500,500)</box>"
    )
    example = tasks.grounding_example(
        image, "the red circle", (20, 10, 100, 50)
    )
    assert example["task"] == "grounding"
    assert example["prompts"] == "<img></img><ref>the red circle</ref>"
    assert example["responses"] == "<box>(100,100),(500,500)</box>"


def test_ocr_and_text_formats():
    image = wide_image()
    example = tasks.ocr_example(
        image,
        [
            ("cat", ((20, 10), (100, 10), (100, 50), (20, 50))),
            ("dog", (0, 0, 200, 0, 200, 100, 0, 100)),
        ],
    )
    assert example["prompts"] == "<img></img>OCR with grounding:"
    assert example["responses"] == (
        " <ref>cat</ref><quad>(100,100),(500,100),(500,500),(100,500)</quad>"
        "<ref>dog</ref><quad>(0,0),(999,0),(999,999),(0,999)</quad>"
    )
    assert tasks.text_example("hello world") == {
        "task": "text",
        "prompts": "",
        "responses": "hello world",
        "images": [],
    }


def test_grounding_prompt_with_box_tokenizes_as_the_training_prompt(
    preprocessor, tokenizer
):
    """The original evaluation ends the grounding prompt with `<box>`: the
    same tokens as the training prompt followed by its response's start."""
    image = wide_image()
    example = tasks.grounding_example(image, "the cat", (20, 10, 100, 50))
    x, _, _ = preprocessor(example)
    prompt = preprocessor.generate_preprocess(
        {
            "prompts": tasks.grounding_prompt("the cat") + "<box>",
            "images": [image],
        }
    )
    length = int(np.sum(keras.ops.convert_to_numpy(prompt["padding_mask"])))
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(x["token_ids"])[:length],
        keras.ops.convert_to_numpy(prompt["token_ids"])[:length],
    )
    assert tokenizer.detokenize(
        keras.ops.convert_to_numpy(x["token_ids"])[length - 1 : length].tolist()
    ) == "<box>"


def test_grounding_with_the_phrase_in_the_response(preprocessor, tokenizer):
    """The same tokens as the original format; the loss also covers the
    phrase and `</ref>`, and `grounding_prompt` is a prefix of the
    sample, so evaluation prompts a model trained on either format."""
    image = wide_image()
    box = (20, 10, 100, 50)
    example = tasks.grounding_example(
        image, "the cat", box, phrase_in_response=True
    )
    assert example["prompts"] == "<img></img><ref>"
    assert example["responses"] == (
        "the cat</ref><box>(100,100),(500,500)</box>"
    )
    x, y, weights = preprocessor(example)
    original = tasks.grounding_example(image, "the cat", box)
    x0, y0, weights0 = preprocessor(original)
    numpy = keras.ops.convert_to_numpy
    np.testing.assert_array_equal(
        numpy(x["token_ids"]), numpy(x0["token_ids"])
    )
    np.testing.assert_array_equal(numpy(y), numpy(y0))
    labels, weights = numpy(y), numpy(weights)
    assert tokenizer.detokenize(labels[weights > 0].tolist()) == (
        "the cat</ref><box>(100,100),(500,500)</box><|endoftext|>"
    )
    labels0 = labels[numpy(weights0) > 0].tolist()
    assert tokenizer.detokenize(labels0) == (
        "<box>(100,100),(500,500)</box><|endoftext|>"
    )
    prompt = preprocessor.generate_preprocess(
        {"prompts": tasks.grounding_prompt("the cat"), "images": [image]}
    )
    length = int(np.sum(numpy(prompt["padding_mask"])))
    np.testing.assert_array_equal(
        numpy(prompt["token_ids"])[:length], numpy(x["token_ids"])[:length]
    )


def test_regions_outside_the_image_are_errors():
    image = wide_image()
    with pytest.raises(tasks.BoxOutsideImageError, match="outside the image"):
        tasks.grounding_example(image, "x", (150, 10, 250, 50))
    with pytest.raises(tasks.BoxOutsideImageError, match="outside the image"):
        tasks.ocr_example(
            image, [("x", ((0, 0), (10, 0), (10, 120), (0, 120)))]
        )
    with pytest.raises(tasks.BoxOutsideImageError):
        tasks.grounded_caption_example(image, [("x", (-1, 0, 10, 10))])
    # Other bad regions are plain ValueErrors.
    with pytest.raises(ValueError, match="x1 <= x2") as info:
        tasks.grounding_example(image, "x", (50, 10, 20, 50))
    assert not isinstance(info.value, tasks.BoxOutsideImageError)


def test_image_size_reads_headers_arrays_and_pil(tmp_path):
    path = tmp_path / "a.png"
    PIL.Image.fromarray(wide_image()).save(path)
    assert tasks.image_size(str(path)) == (200, 100)
    assert tasks.image_size(PIL.Image.open(path)) == (200, 100)
    assert tasks.image_size(np.zeros((5, 7))) == (7, 5)
    with pytest.raises(FileNotFoundError, match="No such image file"):
        tasks.image_size(str(tmp_path / "missing.png"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="corrupt or not an image"):
        tasks.image_size(str(tmp_path / "bad.png"))
    with pytest.raises(ValueError, match="shape"):
        tasks.image_size(np.zeros((5, 7, 2)))


def test_make_example_dispatches_and_checks_fields():
    image = wide_image()
    assert tasks.make_example(
        "vqa", image=image, question="Q?", answer="A"
    ) == tasks.vqa_example(image, "Q?", "A")
    with pytest.raises(ValueError, match="Unknown task 'poem'"):
        tasks.make_example("poem", text="x")
    with pytest.raises(
        ValueError,
        match=r"takes the fields \['image', 'caption'\].*missing "
        r"\['caption'\], unknown \['text'\]",
    ):
        tasks.make_example("caption", image=image, text="x")
    # Optional fields may be given or left out.
    assert tasks.make_example(
        "grounding", image=image, phrase="x", box=(0, 0, 5, 5)
    ) == tasks.grounding_example(image, "x", (0, 0, 5, 5))
    assert tasks.make_example(
        "grounding",
        image=image,
        phrase="x",
        box=(0, 0, 5, 5),
        phrase_in_response=True,
    ) == tasks.grounding_example(image, "x", (0, 0, 5, 5), True)


# Readers.


def conversation(question, answer, *more):
    turns = [question, answer, *more]
    return [
        {"from": "user" if i % 2 == 0 else "assistant", "value": value}
        for i, value in enumerate(turns)
    ]


@pytest.fixture
def finetune_folder(tmp_path):
    """A fine-tuning JSON with two good samples and one of each bad kind."""
    PIL.Image.fromarray(wide_image(1)).save(tmp_path / "a.png")
    (tmp_path / "pictures").mkdir()
    second = PIL.Image.fromarray(wide_image(2)[:40])
    second.save(tmp_path / "pictures" / "b.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG but not really")
    answer = "<ref>A dog</ref><box>(1,2),(500,600)</box>"
    samples = [
        {
            "id": "ok",
            "conversations": conversation(
                "Picture 1: <img>a.png</img>\nWhat is it?", answer
            ),
        },
        {
            "id": "missing",
            "conversations": conversation(
                "Picture 1: <img>nowhere.png</img>\nWhat?", "x"
            ),
        },
        {
            "id": "corrupt",
            "conversations": conversation(
                "Picture 1: <img>bad.png</img>\n?", "x"
            ),
        },
        {
            "id": "box",
            "conversations": conversation(
                "Picture 1: <img>a.png</img>\nWhere?",
                "<ref>it</ref><box>(0,0),(1000,5)</box>",
            ),
        },
        {
            "id": "empty-tag",
            "conversations": conversation("Picture 1: <img></img>\nWhat?", "x"),
        },
        {
            "id": "order",
            "conversations": [
                {"from": "user", "value": "hi"},
                {"from": "user", "value": "hello?"},
            ],
        },
        {
            # No id: named by its index.
            "conversations": conversation(
                "Picture 1: <img>a.png</img>\nPicture 2: "
                "<img>pictures/b.png</img>\nCompare.",
                "Same.",
                "And now?",
                "Still.",
            ),
        },
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(samples))
    return tmp_path, samples


BAD_SAMPLES = [
    ("missing", "missing_image", "No such image file"),
    ("corrupt", "corrupt_image", "corrupt or not an image"),
    ("box", "box_outside_image", "box out of range"),
    ("empty-tag", "image_tag_without_image", "tag 0 is empty"),
    ("order", "conversation_order", "turn 1 of the conversation has role"),
]


def test_finetune_json_reads_good_samples(
    finetune_folder, preprocessor, tokenizer
):
    folder, samples = finetune_folder
    examples, report = readers.read_finetune_json(
        str(folder / "train.json"), on_error="skip"
    )
    assert [e["id"] for e in examples] == ["ok", 6]
    assert examples[0]["images"] == [str(folder / "a.png")]
    assert examples[1]["images"] == [
        str(folder / "a.png"),
        str(folder / "pictures" / "b.png"),
    ]
    assert examples[0]["conversations"] == samples[0]["conversations"]
    # The preprocessor takes them as they are; the loss is on the reply and
    # the turns' special tokens.
    x, y, weights = preprocessor(examples[0])
    y = keras.ops.convert_to_numpy(y)
    weights = keras.ops.convert_to_numpy(weights)
    marks = "<|im_end|>\n<|im_start|>"
    assert tokenizer.detokenize(y[weights > 0].tolist()) == (
        f"{marks}{marks}<ref>A dog</ref><box>(1,2),(500,600)</box><|im_end|>\n"
    )
    assert keras.ops.convert_to_numpy(x["images"]).shape == (1, 28, 28, 3)


@pytest.mark.parametrize("sample_id, reason, message", BAD_SAMPLES)
def test_finetune_json_bad_sample_raises_naming_it(
    finetune_folder, sample_id, reason, message
):
    folder, samples = finetune_folder
    bad = [s for s in samples if s.get("id") == sample_id]
    with pytest.raises(readers.BadSampleError, match=message) as info:
        readers.read_finetune_json(samples[:1] + bad, image_dir=str(folder))
    assert str(info.value).startswith(f"sample '{sample_id}' ({reason}): ")
    assert (info.value.sample, info.value.reason) == (sample_id, reason)


def test_finetune_json_skips_and_counts_bad_samples(finetune_folder):
    folder, _ = finetune_folder
    examples, report = readers.read_finetune_json(
        str(folder / "train.json"), on_error="skip"
    )
    assert (report.total, report.kept) == (7, 2) == (7, len(examples))
    assert report.skipped == collections.Counter(
        {reason: 1 for _, reason, _ in BAD_SAMPLES}
    )
    assert report.skipped_ids == [sample_id for sample_id, _, _ in BAD_SAMPLES]
    assert [m[1] for m in report.messages] == [r for _, r, _ in BAD_SAMPLES]
    assert str(report).startswith("read 7 samples: 2 kept, 5 skipped (")
    with pytest.raises(ValueError, match='"raise" or "skip"'):
        readers.read_finetune_json([], on_error="ignore")


def test_read_examples_converts_every_form(tmp_path):
    image = wide_image()
    PIL.Image.fromarray(image).save(tmp_path / "w.png")
    examples, report = readers.read_examples(
        [
            "just text",
            "Picture 1: <img>w.png</img>\nA picture.",
            {"text": "A picture.", "images": [image, image]},
            {"prompts": "<img></img>Q?", "responses": " A", "images": [image]},
            {"task": "grounding", "image": "w.png", "phrase": "it",
             "box": (20, 10, 100, 50)},
            {"id": "chat", "conversations": conversation(
                "Picture 1: <img></img>\nHi", "Hello"), "images": [image]},
        ],
        image_dir=str(tmp_path),
    )
    assert report.kept == 6 and not report.skipped
    assert examples[0] == {
        "id": 0, "task": "text", "prompts": "", "responses": "just text",
        "images": [],
    }
    assert examples[1]["images"] == [str(tmp_path / "w.png")]
    assert examples[2]["responses"] == "<img></img><img></img>A picture."
    assert examples[3]["prompts"] == "<img></img>Q?"
    assert examples[4]["responses"] == "<box>(100,100),(500,500)</box>"
    assert examples[4]["images"] == [str(tmp_path / "w.png")]
    assert examples[5]["id"] == "chat" and examples[5]["images"][0] is image


def test_read_examples_bad_samples(tmp_path):
    image = wide_image()
    bad = [
        ({"task": "grounding", "image": image, "phrase": "x",
          "box": (150, 10, 250, 50)}, "box_outside_image", "outside the image"),
        ({"text": "<img></img><img></img>two", "images": [image]},
         "image_tag_without_image", "tag 1 has no image"),
        ({"prompts": "<img></img>Q", "responses": "A",
          "images": [np.zeros((4, 4, 2))]}, "corrupt_image", "shape"),
        ({"task": "caption", "image": str(tmp_path / "gone.png"),
          "caption": "x"}, "missing_image", "No such image file"),
        ({"id": "turns", "conversations": conversation("a", "b", "c")},
         "conversation_order", "ends with the assistant"),
        ({"prompts": "Q", "responses": "A", "images": [image]}, "invalid",
         "only 0 `<img>` tags"),
        ({"task": "caption", "image": image, "words": "x"}, "invalid",
         "takes the fields"),
    ]
    for index, (sample, reason, message) in enumerate(bad):
        name = sample.get("id", 1)
        with pytest.raises(readers.BadSampleError, match=message) as info:
            readers.read_examples(["fine", sample])
        assert (info.value.sample, info.value.reason) == (name, reason)
    examples, report = readers.read_examples(
        ["fine"] + [sample for sample, _, _ in bad], on_error="skip"
    )
    assert len(examples) == report.kept == 1
    assert report.total == 1 + len(bad)
    assert sum(report.skipped.values()) == len(bad)
    assert report.skipped["invalid"] == 2
    assert report.skipped_ids == [1, 2, 3, 4, "turns", 6, 7]


def test_bad_sample_error_survives_pickling():
    import pickle

    error = readers.BadSampleError("s1", "missing_image", "No such file")
    restored = pickle.loads(pickle.dumps(error))
    assert str(restored) == str(error)
    assert (restored.sample, restored.reason) == ("s1", "missing_image")


# Synthetic data.


def test_synthetic_examples_are_deterministic_and_index_addressed():
    first = synthetic.synthetic_examples("caption", 5, seed=3)
    again = synthetic.synthetic_examples("caption", 5, seed=3)
    other = synthetic.synthetic_examples("caption", 5, seed=4)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["images"][0], b["images"][0])
        assert a["responses"] == b["responses"] and a["id"] == b["id"]
    assert any(
        not np.array_equal(a["images"][0], b["images"][0])
        for a, b in zip(first, other)
    )
    # Example i does not depend on how many are asked for.
    longer = synthetic.SyntheticSource(50, seed=3, tasks="caption")
    np.testing.assert_array_equal(longer[4]["images"][0], first[4]["images"][0])
    assert longer[-1]["id"] == longer[49]["id"] == "synthetic_caption_3_49"
    with pytest.raises(IndexError):
        longer[50]


def test_synthetic_mixture_draws_every_task_by_weight():
    source = synthetic.synthetic_mixture(300, seed=0)
    counts = collections.Counter(source[i]["task"] for i in range(300))
    assert set(counts) == set(synthetic.TASKS)
    weighted = synthetic.SyntheticSource(200, tasks={"vqa": 3, "text": 1})
    counts = collections.Counter(e["task"] for e in weighted)
    assert set(counts) == {"vqa", "text"} and counts["vqa"] > 2 * counts["text"]


def _colour_mask(image, colour):
    return np.all(image == np.asarray(colour, "uint8"), axis=-1)


def test_shape_boxes_are_tight_around_the_drawn_pixels():
    source = synthetic.SyntheticSource(60, seed=1, tasks="grounded_caption")
    seen_noisy = seen_plain = False
    for example in source:
        image = example["images"][0]
        objects = example["meta"]["objects"]
        covered = np.zeros(image.shape[:2], bool)
        for obj in objects:
            x1, y1, x2, y2 = obj["box"]
            assert 0 <= x1 < x2 <= image.shape[1]
            assert 0 <= y1 < y2 <= image.shape[0]
            mask = _colour_mask(image, synthetic.COLORS[obj["color"]])
            inside = mask[y1:y2, x1:x2]
            # Tight: every border row and column of the box holds a pixel
            # of the shape's colour.
            assert inside[0].any() and inside[-1].any()
            assert inside[:, 0].any() and inside[:, -1].any()
            covered[y1:y2, x1:x2] = True
        # Outside the boxes only the grey background remains.
        outside = image[~covered]
        assert np.all(outside[:, 0] == outside[:, 1])
        assert np.all(outside[:, 1] == outside[:, 2])
        seen_noisy |= len(np.unique(outside[:, 0])) > 1
        seen_plain |= len(np.unique(outside[:, 0])) == 1
        # The boxes of distinct shapes do not overlap.
        for a in objects:
            for b in objects:
                if a is not b:
                    ax1, ay1, ax2, ay2 = a["box"]
                    bx1, by1, bx2, by2 = b["box"]
                    assert ax2 <= bx1 or bx2 <= ax1 or ay2 <= by1 or by2 <= ay1
    assert seen_noisy and seen_plain


def test_a_cross_on_the_grid_has_cells_a_square_has_not():
    # Each grid cell of a shape of 2 or 3 cells: its coloured fraction.
    def cells(shape, count):
        mask = np.asarray(synthetic._shape_mask(shape, 14 * count)) > 0
        return mask.reshape(count, 14, count, 14).mean(axis=(1, 3))

    for count in (2, 3):
        assert np.all(cells("square", count) == 1.0)
        partly = (cells("cross", count) > 0.25) & (cells("cross", count) < 0.9)
        # A cross's cells are never empty, and some are partly coloured.
        assert np.all(cells("cross", count) > 0.25) and partly.any()


def test_distinct_colours_make_a_colour_name_one_shape():
    def images(**config):
        source = synthetic.SyntheticSource(
            300, seed=4, tasks="caption", num_objects=(3, 3), **config
        )
        return [
            [(o["color"], o["shape"]) for o in e["meta"]["objects"]]
            for e in source
        ]

    distinct = images(distinct_colors=True)
    def count(objects, part):
        return len({pair[part] for pair in objects})

    assert all(count(objects, 0) == len(objects) for objects in distinct)
    # Kinds still repeat within an image, and every colour and kind occurs.
    assert any(count(objects, 1) < len(objects) for objects in distinct)
    assert {c for objects in distinct for c, _ in objects} == set(
        synthetic.DEFAULT_COLORS
    )
    assert {k for objects in distinct for _, k in objects} == set(
        synthetic.DEFAULT_SHAPES
    )
    # Without it, a colour can name several shapes of one image.
    assert any(count(objects, 0) < len(objects) for objects in images())
    # A caption still lists them by colour, then kind.
    order = {c: i for i, c in enumerate(synthetic.DEFAULT_COLORS)}
    assert all(
        [order[c] for c, _ in objects] == sorted(order[c] for c, _ in objects)
        for objects in distinct
    )
    with pytest.raises(ValueError, match="distinct_colors"):
        synthetic.SyntheticConfig(
            colors=("red", "blue"), num_objects=(1, 3), distinct_colors=True
        )


def test_shapes_on_a_grid_fill_whole_cells():
    grid = 14
    source = synthetic.SyntheticSource(
        40, seed=2, tasks="grounded_caption", grid=grid, noisy_background=0.0
    )
    sizes = set()
    for example in source:
        image = example["images"][0]
        for obj in example["meta"]["objects"]:
            x1, y1, x2, y2 = obj["box"]
            # Every shape's tight box spans whole cells (all four kinds touch
            # the four sides of their square).
            assert all(v % grid == 0 for v in (x1, y1, x2, y2)), obj
            assert x2 - x1 == y2 - y1
            sizes.add(x2 - x1)
            mask = _colour_mask(image, synthetic.COLORS[obj["color"]])
            assert mask[y1:y2, x1:x2].any()
    # The default object sizes (22-40% of 112 px) allow 2 or 3 cells.
    assert sizes == {28, 42}
    # Free placement (the default) is not on the grid.
    free = synthetic.SyntheticSource(40, seed=2, tasks="grounded_caption")
    boxes = [o["box"] for e in free for o in e["meta"]["objects"]]
    assert any(v % grid for box in boxes for v in box)
    with pytest.raises(ValueError, match="grid"):
        synthetic.SyntheticConfig(grid=50)  # no multiple within 24-44 px
    with pytest.raises(ValueError, match="grid"):
        synthetic.SyntheticConfig(grid=0)


def test_words_on_a_grid_start_on_grid_points():
    grid = 14
    source = synthetic.SyntheticSource(
        40, seed=4, tasks="ocr", grid=grid, max_angle=0.0
    )
    counts = set()
    for example in source:
        quads = example["meta"]["quads"]
        counts.add(len(quads))
        band = 112 / len(quads)
        for number, quad in enumerate(quads):
            # Upright words: the ink starts 2 px (the layer's margin) after
            # a grid point, and stays inside its reading-order band.
            (left, top), _, (right, bottom), _ = quad
            assert (left - 2) % grid == 0 and (top - 2) % grid == 0, quad
            assert number * band <= top - 2 and bottom <= (number + 1) * band
            assert right <= 112
    assert counts == {1, 2, 3}
    # Free placement (the default) is not on the grid.
    free = synthetic.SyntheticSource(40, seed=4, tasks="ocr", max_angle=0.0)
    lefts = [q[0][0] - 2 for e in free for q in e["meta"]["quads"]]
    assert any(v % grid for v in lefts)


def test_place_labels_name_the_shape_at_each_place():
    config = synthetic.SyntheticConfig(grid=14)
    red_circle = {"color": "red", "shape": "circle", "box": (14, 28, 56, 70)}
    blue_cross = {"color": "blue", "shape": "cross", "box": (70, 70, 98, 98)}
    sizes = synthetic.place_label_sizes(config, 14)
    assert sizes == {
        "color": 6, "shape": 5, "word": 41, "x1": 9, "y1": 9, "x2": 9, "y2": 9
    }
    labels = synthetic.place_labels(
        {"objects": [red_circle, blue_cross]}, config, 4, 14
    )
    # A 4 x 4 lattice over 112 pixels: centres at 14, 42, 70 and 98.
    expected = {name: np.full(16, sizes[name] - 1) for name in sizes}
    # The red circle covers x, y in [14, 56) x [28, 70): centres (14, 42)
    # and (42, 42), i.e. row 1, columns 0 and 1.
    for index in (4, 5):
        expected["color"][index] = config.colors.index("red")
        expected["shape"][index] = config.shapes.index("circle")
        for name, cell in zip(("x1", "y1", "x2", "y2"), (1, 2, 3, 4)):
            expected[name][index] = cell
    # The blue cross covers [70, 98) x [70, 98): the centre (70, 70).
    expected["color"][10] = config.colors.index("blue")
    expected["shape"][10] = config.shapes.index("cross")
    for name, cell in zip(("x1", "y1", "x2", "y2"), (5, 5, 6, 6)):
        expected[name][10] = cell
    assert set(labels) == set(synthetic.PLACE_LABELS)
    for name in labels:
        np.testing.assert_array_equal(labels[name], expected[name], name)
    # Drawn images: every place inside a shape's box names that shape.
    for example in synthetic.synthetic_examples("caption", 10, seed=3, grid=14):
        objects = example["meta"]["objects"]
        labels = synthetic.place_labels(example["meta"], config, 6, 14)
        assert (labels["word"] == sizes["word"] - 1).all()
        named = labels["shape"] != sizes["shape"] - 1
        assert named.any()
        for index in np.flatnonzero(named):
            obj = next(
                o for o in objects
                if config.shapes.index(o["shape"]) == labels["shape"][index]
                and config.colors.index(o["color"]) == labels["color"][index]
            )
            assert labels["x1"][index] == obj["box"][0] // 14


def test_place_labels_name_the_word_at_each_place():
    config = synthetic.SyntheticConfig(grid=14)
    sizes = synthetic.place_label_sizes(config, 14)
    # "lake" leaning a little: its quad's bounding box is [20, 60) x
    # [30, 52.5), cells x 1-4, y 2-3; "cat" [70, 112.5) x [60, 72),
    # clipped to x 5-7, y 4-5.
    lake = ((20, 30), (60, 34), (59, 52.5), (21, 48))
    cat = ((70, 60), (112.5, 60), (112.5, 72), (70, 72))
    labels = synthetic.place_labels(
        {"words": ["lake", "cat"], "quads": [lake, cat]}, config, 4, 14
    )
    # A 4 x 4 lattice of 28-pixel cells, centres at 14, 42, 70 and 98.
    # "lake": its middle line (y 41.25) crosses row 1, its box the
    # column centre 42. "cat": middle line y 66 in row 2, column centres
    # 70 and 98 - though no lattice centre lies inside its box.
    expected = {name: np.full(16, sizes[name] - 1) for name in sizes}
    for index, word, cells in (
        (5, "lake", (1, 2, 4, 3)),
        (10, "cat", (5, 4, 7, 5)),
        (11, "cat", (5, 4, 7, 5)),
    ):
        expected["word"][index] = config.words.index(word)
        for name, cell in zip(("x1", "y1", "x2", "y2"), cells):
            expected[name][index] = cell
    for name in labels:
        np.testing.assert_array_equal(labels[name], expected[name], name)
    # Drawn OCR images: places name a word of the image, never a shape.
    for example in synthetic.synthetic_examples("ocr", 10, seed=3, grid=14):
        labels = synthetic.place_labels(example["meta"], config, 6, 14)
        assert (labels["color"] == sizes["color"] - 1).all()
        assert (labels["shape"] == sizes["shape"] - 1).all()
        named = labels["word"][labels["word"] != sizes["word"] - 1]
        assert named.size
        assert {config.words[i] for i in named} <= set(
            example["meta"]["words"]
        )


def test_captions_list_shapes_by_colour_then_kind():
    config = synthetic.SyntheticConfig()
    for example in synthetic.synthetic_examples("caption", 40, seed=2):
        objects = example["meta"]["objects"]
        keys = [
            (config.colors.index(o["color"]), config.shapes.index(o["shape"]))
            for o in objects
        ]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        phrases = [f"a {o['color']} {o['shape']}" for o in objects]
        expected = (
            phrases[0]
            if len(phrases) == 1
            else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        )
        assert example["responses"] == " " + expected


def test_grounding_and_vqa_answers_match_the_image():
    for example in synthetic.synthetic_examples("grounding", 20, seed=5):
        meta = example["meta"]
        image = example["images"][0]
        size = (image.shape[1], image.shape[0])
        assert example["prompts"] == tasks.grounding_prompt(meta["phrase"])
        (region,) = boxes.parse_grounding(example["responses"], size)
        (target,) = [
            o
            for o in meta["objects"]
            if f"the {o['color']} {o['shape']}" == meta["phrase"]
        ]
        np.testing.assert_allclose(
            region["box"], target["box"], atol=size[0] / 1000
        )
    # The phrase may go in the response instead: same images, boxes and
    # meta, prompt + response the same text.
    original = synthetic.synthetic_examples("grounding", 5, seed=5)
    moved = synthetic.synthetic_examples(
        "grounding", 5, seed=5, grounding_phrase_in_response=True
    )
    for a, b in zip(original, moved):
        np.testing.assert_array_equal(a["images"][0], b["images"][0])
        assert a["meta"] == b["meta"]
        assert b["prompts"] == "<img></img><ref>"
        assert b["responses"].startswith(a["meta"]["phrase"] + "</ref><box>")
        assert (
            a["prompts"] + a["responses"] == b["prompts"] + b["responses"]
        )
    for example in synthetic.synthetic_examples("vqa", 60, seed=6):
        meta = example["meta"]
        objects, question = meta["objects"], meta["question"]
        answer = meta["answer"]
        assert example["responses"] == " " + answer
        if question.startswith("How many"):
            assert answer == str(len(objects))
        elif question.startswith("Is there"):
            colour, shape = question[len("Is there a ") : -1].split()
            present = any(
                o["color"] == colour and o["shape"] == shape for o in objects
            )
            assert answer == ("yes" if present else "no")
        elif question.startswith("What color"):
            shape = question.split()[-1][:-1]
            colours = [o["color"] for o in objects if o["shape"] == shape]
            assert colours == [answer]
        else:
            colour = question.split()[4]
            shapes = [o["shape"] for o in objects if o["color"] == colour]
            assert shapes == [answer]


def _quad_mask(quads, size, grow=1):
    mask = PIL.Image.new("L", size, 0)
    draw = PIL.ImageDraw.Draw(mask)
    for quad in quads:
        draw.polygon([tuple(p) for p in quad], fill=255)
    for _ in range(grow):
        mask = mask.filter(PIL.ImageFilter.MaxFilter(3))
    return np.asarray(mask) > 0


def test_ocr_quads_cover_the_rendered_words():
    for example in synthetic.synthetic_examples("ocr", 30, seed=7):
        image = example["images"][0]
        size = (image.shape[1], image.shape[0])
        words, quads = example["meta"]["words"], example["meta"]["quads"]
        assert 1 <= len(words) <= 3 and len(set(words)) == len(words)
        assert set(words) <= set(synthetic.WORDS)
        for quad in quads:
            for x, y in quad:
                assert 0 <= x <= size[0] and 0 <= y <= size[1]
        # Clearly dark (ink) pixels lie inside the quads, and each quad
        # holds ink.
        ink = image.max(axis=-1) < 110
        assert ink.any()
        assert not (ink & ~_quad_mask(quads, size)).any()
        for quad in quads:
            assert (ink & _quad_mask([quad], size, grow=0)).any()
        # Reading order: top to bottom.
        tops = [min(y for _, y in quad) for quad in quads]
        assert tops == sorted(tops)
        # The response reads back as the words and their quads.
        parsed = boxes.parse_grounding(example["responses"], size)
        assert [r["phrase"] for r in parsed] == words
        for region, quad in zip(parsed, quads):
            np.testing.assert_allclose(
                region["quad"], quad, atol=size[0] / 1000
            )


def test_synthetic_chat_is_a_valid_fine_tuning_conversation(preprocessor):
    examples = synthetic.synthetic_examples("chat", 12, seed=8)
    checked, report = readers.read_examples(examples)
    assert report.kept == 12
    for example in examples:
        turns = example["conversations"]
        assert 4 <= len(turns) <= 6
        assert turns[0]["value"].startswith("Picture 1: <img></img>\n")
        assert all("<img>" not in t["value"] for t in turns[1:])
    x, _, weights = preprocessor(examples[0])
    assert keras.ops.convert_to_numpy(weights).sum() > 0


def test_synthetic_config_is_configurable_and_validated():
    small = synthetic.synthetic_examples(
        "caption", 30, seed=0, image_size=(64, 48), colors=("red", "blue"),
        shapes=("circle",), num_objects=(2, 2),
    )
    for example in small:
        assert example["images"][0].shape == (48, 64, 3)
        assert example["responses"] == " a red circle and a blue circle"
    words = synthetic.synthetic_examples(
        "ocr", 10, seed=0, words=("one", "two"), num_words=(2, 2)
    )
    assert all(sorted(e["meta"]["words"]) == ["one", "two"] for e in words)
    with pytest.raises(ValueError, match="Unknown colours or shapes"):
        synthetic.SyntheticConfig(colors=("red", "mauve"))
    with pytest.raises(ValueError, match="num_objects"):
        synthetic.SyntheticConfig(
            shapes=("circle",), colors=("red",), num_objects=(1, 2)
        )
    with pytest.raises(ValueError, match="Unknown synthetic tasks"):
        synthetic.SyntheticSource(3, tasks=["poetry"])


# Packing.


def preprocess_one(preprocessor, example, length):
    """One sample's preprocessor outputs as a packing record (numpy)."""
    x, y, weights = keras.tree.map_structure(
        keras.ops.convert_to_numpy,
        preprocessor(
            {k: example[k] for k in ("prompts", "responses", "images")},
            sequence_length=length,
        ),
    )
    return {**x, "y": y, "sample_weight": weights}


def packing_samples():
    """Two image samples of different lengths and a text sample."""
    return [
        tasks.caption_example(wide_image(1), "a red circle"),
        tasks.vqa_example(wide_image(2), "How many?", "2"),
        tasks.text_example("plain words"),
    ]


def test_packed_rows_concatenate_samples_with_segment_ids(
    preprocessor, tokenizer
):
    examples = packing_samples()
    length = 700
    records = [preprocess_one(preprocessor, e, length + 1) for e in examples]
    sizes = [int(r["padding_mask"].sum()) for r in records]
    rows, stats = packing.pack_samples(
        records, length, 3, tokenizer.pad_token_id, image_shape=(28, 28, 3)
    )
    assert len(rows) == 1
    x, y, weights = rows[0]
    total = sum(sizes)
    expected_segments = np.concatenate(
        [np.full(n, k + 1) for k, n in enumerate(sizes)]
        + [np.zeros(length - total)]
    )
    np.testing.assert_array_equal(x["padding_mask"], expected_segments)
    assert x["padding_mask"].dtype == x["token_ids"].dtype == np.int32
    start = 0
    for record, size in zip(records, sizes):
        end = start + size
        for packed, key in (
            (x["token_ids"], "token_ids"),
            (y, "y"),
            (weights, "sample_weight"),
        ):
            np.testing.assert_array_equal(
                packed[start:end], record[key][:size]
            )
        # No label crosses a boundary: a sample's last position has none.
        assert weights[end - 1] == 0
        start = end
    assert not weights[total:].any()
    assert np.all(x["token_ids"][total:] == tokenizer.pad_token_id)
    # Images in order, then zero slots.
    np.testing.assert_array_equal(x["images"][0], records[0]["images"][0])
    np.testing.assert_array_equal(x["images"][1], records[1]["images"][0])
    assert not x["images"][2].any()
    assert (stats.samples, stats.rows, stats.tokens) == (3, 1, total)
    assert stats.efficiency == pytest.approx(total / length)
    assert (stats.images, stats.image_slots) == (2, 3)


def test_packing_respects_rows_images_and_tasks(preprocessor, tokenizer):
    examples = packing_samples()
    records = [preprocess_one(preprocessor, e, 701) for e in examples]
    sizes = [int(r["padding_mask"].sum()) for r in records]
    # One image slot per row: the two image samples take a row each; the
    # text sample fits first-fit into the first row.
    rows, stats = packing.pack_samples(
        records, 700, 1, tokenizer.pad_token_id, image_shape=(28, 28, 3)
    )
    assert [int(r[0]["padding_mask"].max()) for r in rows] == [2, 1]
    first_row = rows[0][0]["padding_mask"]
    assert np.count_nonzero(first_row) == sizes[0] + sizes[2]
    # Tasks never share a row.
    rows, _ = packing.pack_samples(
        records, 700, 3, tokenizer.pad_token_id, image_shape=(28, 28, 3),
        tasks=["caption", "vqa", "caption"],
    )
    assert [int(r[0]["padding_mask"].max()) for r in rows] == [2, 1]
    assert stats.rows == 2


def test_packing_errors_name_the_sample(preprocessor, tokenizer):
    records = [preprocess_one(preprocessor, e, 701) for e in packing_samples()]
    pad, shape = tokenizer.pad_token_id, (28, 28, 3)
    with pytest.raises(
        ValueError,
        match=r"sample 'long': it has \d+ tokens, more than the packed row "
        "length 300",
    ):
        packing.pack_samples(records[:1], 300, 2, pad, shape, names=["long"])
    # A sample that fills its whole preprocessed length may be truncated.
    full = preprocess_one(preprocessor, packing_samples()[0], 280)
    with pytest.raises(ValueError, match="sample 0: it has at least 280"):
        packing.pack_samples([full], 300, 2, pad, shape)
    with pytest.raises(
        ValueError, match="sample 1: it has 1 images, more than the 0"
    ):
        packing.pack_samples(records[2:] + records[:1], 700, 0, pad, shape)


def tiny_backbone(tokenizer):
    keras.utils.set_random_seed(0)
    encoder = QwenVLVisionEncoder(
        image_size=28, patch_size=14, width=16, num_layers=1, num_heads=2,
        intermediate_dim=24, output_dim=32, num_queries=SPAN,
        adapter_head_dim=16,
    )
    return QwenVLBackbone(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=2, num_heads=2,
        hidden_dim=32, intermediate_dim=40,
        image_start_token_id=tokenizer.image_start_token_id,
        vision_encoder=encoder,
    )


def test_packed_row_computes_what_its_samples_compute_alone(
    preprocessor, tokenizer
):
    backbone = tiny_backbone(tokenizer)
    records = [preprocess_one(preprocessor, e, 701) for e in packing_samples()]
    rows, _ = packing.pack_samples(
        records, 700, 2, tokenizer.pad_token_id, image_shape=(28, 28, 3)
    )
    (x, _, _), = rows
    packed = keras.ops.convert_to_numpy(
        backbone({k: v[None] for k, v in x.items()}, training=True)
    )[0]
    start = 0
    for record in records:
        # Alone, right-padded to the row's shapes (padding and unused
        # image slots change nothing, and one shape compiles once).
        size = int(record["padding_mask"].sum())
        alone = keras.ops.convert_to_numpy(
            backbone(
                {
                    "token_ids": record["token_ids"][None, :700],
                    "padding_mask": record["padding_mask"][None, :700],
                    "images": packing.pad_images(
                        record["images"], 2, (28, 28, 3)
                    )[None],
                },
                training=True,
            )
        )[0]
        np.testing.assert_allclose(
            packed[start : start + size], alone[:size], atol=1e-5
        )
        start += size
