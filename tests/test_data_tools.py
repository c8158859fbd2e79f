"""Data tools: tfds adapters, cleaning filters, PDF pages as OCR samples."""

import collections

import grain
import numpy as np
import PIL.Image
import pytest

from keras_qwenvl.causal_lm_preprocessor import QwenVLCausalLMPreprocessor
from keras_qwenvl.data import cleaning
from keras_qwenvl.data import pdf as pdf_source
from keras_qwenvl.data import tasks
from keras_qwenvl.data import tfds_sources
from keras_qwenvl.data.loader import QwenVLDataLoader
from keras_qwenvl.image_converter import QwenVLImageConverter

try:
    import tensorflow_datasets as tfds
except ImportError:  # the cleaning and PDF tests still run
    tfds = None
try:
    import pypdfium2 as pdfium
except ImportError:
    pdfium = None

needs_tfds = pytest.mark.skipif(
    tfds is None, reason="needs tensorflow-datasets"
)
needs_pdfium = pytest.mark.skipif(pdfium is None, reason="needs pypdfium2")

# tfds adapters.


@needs_tfds
def test_coco_captions_mock_gives_one_caption_sample_per_caption():
    with tfds.testing.mock_data(num_examples=3):
        source = tfds.data_source("coco_captions", split="train")
        examples = tfds_sources.coco_caption_examples(source)
        assert isinstance(examples, grain.MapDataset)
        assert len(examples) == 3
        for index in range(3):
            element = source[index]
            samples = examples[index]
            captions = [str(c).strip() for c in element["captions"]["text"]]
            assert len(samples) == len(captions) > 0
            for k, (sample, caption) in enumerate(zip(samples, captions)):
                assert sample["task"] == "caption"
                assert sample["prompts"] == tasks.caption_prompt()
                assert sample["responses"] == " " + caption
                np.testing.assert_array_equal(
                    sample["images"][0], element["image"]
                )
                image_id = int(element["image/id"])
                assert sample["id"] == f"coco_captions/{image_id}/{k}"


@needs_tfds
def test_one_sample_per_image_is_random_access_and_seeded():
    with tfds.testing.mock_data(num_examples=12):
        source = tfds.data_source("coco_captions", split="train")
        picks = {}
        for seed in (0, 1):
            examples = tfds_sources.coco_caption_examples(
                source, per_image="one", seed=seed
            )
            assert len(examples) == 12
            picks[seed] = [examples[i]["responses"] for i in range(12)]
            for index, response in enumerate(picks[seed]):
                captions = source[index]["captions"]["text"]
                assert response in [" " + str(c).strip() for c in captions]
        again = tfds_sources.coco_caption_examples(
            source, per_image="one", seed=0
        )
        assert [again[i]["responses"] for i in range(12)] == picks[0]
        assert picks[0] != picks[1]


def _ref_coco_example():
    """One ref_coco image 80 x 40 with two objects and three expressions."""
    mask = np.zeros((40, 80, 3), np.uint8)
    return {
        "image": np.full((40, 80, 3), 90, np.uint8),
        "image/id": 7,
        "objects": [
            {
                "id": 1,
                "area": 10,
                "bbox": tfds.features.BBox(0.25, 0.1, 0.75, 0.5),
                "label": 3,
                "gt_box_index": 0,
                "mask": mask,
                "refexp": [
                    {"refexp_id": 11, "raw": "left dog"},
                    {"refexp_id": 12, "raw": "dog on the left"},
                ],
            },
            {
                "id": 2,
                "area": 10,
                "bbox": tfds.features.BBox(0.0, 0.5, 1.0, 1.0),
                "label": 3,
                "gt_box_index": 1,
                "mask": mask,
                "refexp": [{"refexp_id": 13, "raw": "right half"}],
            },
        ],
        "coco_annotations": [],
    }


def _real_encoding_source(self, split, decoders=None, **kwargs):
    """A data source of `_ref_coco_example` through the dataset's own
    feature encoding and decoding (as a prepared dataset reads)."""
    features = self.info.features
    serialized = features.serialize_example(_ref_coco_example())
    return [features.deserialize_example_np(serialized, decoders=decoders)]


@needs_tfds
def test_ref_coco_boxes_become_grounding_samples():
    with tfds.testing.mock_data(as_data_source_fn=_real_encoding_source):
        source = tfds.data_source("ref_coco/refcoco_unc", split="train")
        samples = tfds_sources.ref_coco_examples(source)[0]
    # bbox (ymin .25, xmin .1, ymax .75, xmax .5) of an 80 x 40 image is
    # pixels (8, 10, 40, 30): (100, 250), (500, 750) in thousandths; the
    # second box spans x 40..80 and the whole height (1000 -> 999).
    assert [(s["prompts"], s["responses"]) for s in samples] == [
        (
            tasks.grounding_prompt("left dog"),
            "<box>(100,250),(500,750)</box>",
        ),
        (
            tasks.grounding_prompt("dog on the left"),
            "<box>(100,250),(500,750)</box>",
        ),
        (tasks.grounding_prompt("right half"), "<box>(500,0),(999,999)</box>"),
    ]
    assert [s["id"] for s in samples] == [
        "ref_coco/7/0",
        "ref_coco/7/1",
        "ref_coco/7/2",
    ]
    assert all(s["task"] == "grounding" for s in samples)


@needs_tfds
def test_ref_coco_random_mock_has_unaligned_features_and_says_so():
    # The random mock draws every feature's length independently, so its
    # objects have more boxes than expressions (or fewer): a clear error.
    with tfds.testing.mock_data(num_examples=2):
        source = tfds.data_source("ref_coco", split="train")
        element = source[0]
        boxes = len(element["objects"]["bbox"])
        texts = len(element["objects"]["refexp"]["raw"])
        assert boxes != texts
        examples = tfds_sources.ref_coco_examples(source)
        with pytest.raises(ValueError, match=f"{boxes} boxes in 'objects/bb"):
            examples[0]


def test_generic_mapping_with_pixel_boxes_and_nested_features():
    image = np.zeros((50, 100, 3), np.uint8)
    elements = [
        {
            "photo": image,
            "ann": {
                "boxes": np.array([[10, 5, 40, 20], [0, 0, 100, 50]]),
                "names": np.array([b"the cat", b"everything"]),
            },
        }
    ]
    mapping = tfds_sources.TfdsMapping(
        image="photo",
        texts="ann/names",
        boxes="ann/boxes",
        box_format="xywh",
        id=None,
        name="pets",
    )
    samples = tfds_sources.tfds_examples(elements, mapping)[0]
    # xywh (10, 5, 40, 20) is the box (10, 5)-(50, 25) of 100 x 50.
    assert samples[0]["responses"] == "<box>(100,100),(500,500)</box>"
    assert samples[1]["responses"] == "<box>(0,0),(999,999)</box>"
    assert [s["id"] for s in samples] == ["pets/0/0", "pets/0/1"]
    captions = tfds_sources.TfdsMapping(image="photo", texts="ann/names")
    with pytest.raises(KeyError, match="No feature 'image/id'.*ann/names"):
        tfds_sources.tfds_examples(elements, captions)[0]


def test_box_formats_agree_and_bad_arguments_are_named():
    size = (200, 100)
    pixels = (20.0, 10.0, 100.0, 60.0)
    for box_format, box in [
        ("yxyx_normalized", (0.1, 0.1, 0.6, 0.5)),
        ("xyxy_normalized", (0.1, 0.1, 0.5, 0.6)),
        ("xyxy", (20, 10, 100, 60)),
        ("xywh", (20, 10, 80, 50)),
    ]:
        result = tfds_sources.box_to_pixels(box, box_format, size)
        np.testing.assert_allclose(result, pixels)
    with pytest.raises(ValueError, match="Unknown box format 'cxcywh'"):
        tfds_sources.TfdsMapping(boxes="b", box_format="cxcywh")
    with pytest.raises(ValueError, match='`per_image` must be "all" or'):
        tfds_sources.tfds_examples([], tfds_sources.COCO_CAPTIONS, "some")
    with pytest.raises(ValueError, match="For a tf.data dataset"):
        tfds_sources.tfds_examples(
            iter([]), tfds_sources.COCO_CAPTIONS
        )


@needs_tfds
def test_loader_reads_a_tfds_source(byte_tokenizer):
    preprocessor = QwenVLCausalLMPreprocessor(
        byte_tokenizer,
        QwenVLImageConverter(image_size=(28, 28)),
        sequence_length=352,
    )
    with tfds.testing.mock_data(num_examples=2):
        source = tfds.data_source("coco_captions", split="train")
        captions = sum(len(e["captions"]["text"]) for e in source)
        # All captions, read as a stream.
        loader = QwenVLDataLoader(
            tfds_sources.coco_caption_examples(source),
            preprocessor,
            batch_size=1,
        )
        assert len(list(loader)) == captions
        # One caption per image, shuffled by the loader (random access).
        loader = QwenVLDataLoader(
            tfds_sources.coco_caption_examples(source, per_image="one"),
            preprocessor,
            batch_size=2,
            shuffle=True,
        )
        (x, y, weights), = list(loader)
    assert x["images"].shape == (2, 1, 28, 28, 3)
    assert x["token_ids"].shape == y.shape == (2, 352)
    assert weights.sum() > 0


# Cleaning filters.


def pair(text="a dog on a red sofa", size=(320, 240)):
    return {"image": np.zeros((size[1], size[0], 3), np.uint8), "text": text}


def test_aspect_ratio_and_image_size_filters():
    ratio = cleaning.AspectRatioFilter(max_ratio=2.0)
    assert ratio(pair(size=(400, 200))) is not None  # exactly 2
    assert ratio(pair(size=(200, 401))) is None
    small = cleaning.ImageSizeFilter(min_side=224)
    assert small(pair(size=(224, 500))) is not None
    assert small(pair(size=(500, 223))) is None
    picture = PIL.Image.new("RGB", (100, 40))  # PIL images and paths too
    assert ratio({"image": picture, "text": "x"}) is None  # 2.5
    with pytest.raises(ValueError, match="must be >= 1"):
        cleaning.AspectRatioFilter(max_ratio=0.5)
    with pytest.raises(ValueError, match="`min_side` must be positive"):
        cleaning.ImageSizeFilter(min_side=0)


def test_language_filter_heuristic():
    keep = cleaning.LanguageFilter()
    assert keep(pair("A cat, 2 dogs!")) is not None
    assert keep(pair("一只猫在沙发上。")) is not None
    assert keep(pair("a cat 一只猫")) is not None
    assert keep(pair("un café")) is None  # an accented letter
    assert keep(pair("кошка")) is None
    assert keep(pair("ねこ")) is None  # kana is not Chinese
    assert keep(pair("2023 !!")) is None  # no letters at all
    english = cleaning.LanguageFilter(languages=("en",), min_fraction=0.8)
    assert english(pair("un café noir")) is not None  # 9 of 10 letters
    assert english(pair("一只猫")) is None
    count, fractions = cleaning.letter_fractions("ab猫й")
    assert count == 4
    assert fractions == {"en": 0.5, "zh": 0.25}
    with pytest.raises(ValueError, match=r"subset of \['en', 'zh'\]"):
        cleaning.LanguageFilter(languages=("fr",))


def test_emoji_length_and_similarity_filters():
    emoji = cleaning.EmojiFilter()
    assert emoji(pair("a sunny day")) is not None
    assert emoji(pair("a sunny day \U0001f600")) is None
    assert emoji(pair("love \u2764\ufe0f")) is None
    length = cleaning.TextLengthFilter(min_length=2, max_length=4)
    assert length(pair("one")) is None
    assert length(pair("two words")) is not None
    assert length(pair("一只猫")) is not None  # three CJK words
    assert length(pair("one two three four five")) is None
    assert cleaning.count_words("a 猫猫 dog") == 4
    tokens = cleaning.TextLengthFilter(0, 5, length_fn=len)
    assert tokens(pair("abcdef")) is None
    seen = []

    def score(image, text):
        seen.append((np.shape(image), text))
        return 0.9 if "dog" in text else 0.1

    similar = cleaning.SimilarityFilter(score, threshold=0.5)
    assert similar(pair("a dog")) is not None
    assert similar(pair("a cat")) is None
    assert seen == [((240, 320, 3), "a dog"), ((240, 320, 3), "a cat")]
    with pytest.raises(ValueError, match="must be a callable"):
        cleaning.SimilarityFilter(0.5, 0.5)


def test_html_and_pattern_cleaners_rewrite_copies():
    original = pair("<p>A <b>dog</b> &amp; a cat</p><!-- ad -->")
    cleaned = cleaning.HtmlCleaner()(original)
    assert cleaned["text"] == "A dog & a cat"
    assert original["text"].startswith("<p>")  # the input is untouched
    assert cleaning.HtmlCleaner()(pair("<br/>")) is None  # nothing left
    patterns = cleaning.PatternCleaner()
    assert (
        patterns(pair("a dog https://x.org/a.jpg by me@mail.com"))["text"]
        == "a dog by"
    )
    unchanged = pair("a dog")
    assert patterns(unchanged) is unchanged


def test_pipeline_counts_what_each_step_drops_and_changes():
    pipeline = cleaning.CleaningPipeline(cleaning.paper_filters())
    pairs = [
        pair("a dog on a sofa"),  # kept
        pair("a dog", size=(1000, 200)),  # aspect ratio 5
        pair("a dog", size=(100, 100)),  # too small
        pair("<i>a cat</i> on a mat"),  # HTML cleaned, kept
        pair("ein Hund über"),  # language
        pair("a dog \U0001f436"),  # emoji
        pair("dog"),  # too short
        pair("<i>a cat</i>"),  # HTML cleaned, kept
    ]
    kept = list(pipeline(pairs))
    assert [p["text"] for p in kept] == [
        "a dog on a sofa",
        "a cat on a mat",
        "a cat",
    ]
    report = pipeline.report()
    assert (report.seen, report.kept) == (8, 3)
    assert report.dropped == collections.Counter(
        aspect_ratio=1, image_size=1, language=1, emoji=1, text_length=1
    )
    assert report.changed["html"] == 2
    assert "8 seen, 3 kept" in str(report)
    assert "aspect_ratio: 1" in str(report) and "html: 2" in str(report)
    # Counts add up over passes; the report is a copy.
    list(pipeline([pair("a dog on a sofa")]))
    assert pipeline.report().seen == 9 and report.seen == 8
    with pytest.raises(ValueError, match="distinct names; repeated"):
        cleaning.CleaningPipeline([cleaning.EmojiFilter()] * 2)
    with pytest.raises(ValueError, match="dict with 'image' and 'text'"):
        pipeline.clean("a dog")


def test_pipeline_takes_plain_functions_as_steps():
    def no_digits(pair):
        return None if any(c.isdigit() for c in pair["text"]) else pair

    pipeline = cleaning.CleaningPipeline([no_digits])
    assert len(list(pipeline([pair("a 2"), pair("a b")]))) == 1
    assert pipeline.report().dropped["no_digits"] == 1


def test_nested_groundings_keep_the_most_phrases():
    caption = "a man in a red shirt next to a dog"

    def span(phrase):
        start = caption.index(phrase)
        return start, start + len(phrase)

    man, shirt = span("a man in a red shirt"), span("a red shirt")
    red, dog = span("red shirt"), span("a dog")
    box = (1, 2, 3, 4)
    spans = [
        (*man, box),  # holds "a red shirt": nested
        (*shirt, box),
        (*red, (5, 6, 7, 8)),  # inside "a red shirt"
        (*dog, [box, (5, 6, 7, 8)]),  # two boxes
        (*dog, (9, 9, 10, 10)),  # the same phrase again: a third box
        (0, 5, box),  # "a man"
    ]
    parts, removed = cleaning.remove_nested_groundings(caption, spans)
    # "a man" ends first, then the phrases ending at 20 ("a red shirt"
    # before "red shirt"), then "a dog".
    assert parts == [
        ("a man", [box]),
        " in ",
        ("a red shirt", [box]),
        " next to ",
        ("a dog", [box, (5, 6, 7, 8), (9, 9, 10, 10)]),
    ]
    assert removed == 2  # the whole "a man in a red shirt", "red shirt"
    image = np.zeros((20, 20, 3), np.uint8)
    sample = tasks.grounded_caption_example(image, parts)
    assert sample["responses"].count("<ref>") == 3
    assert sample["responses"].count("<box>") == 5
    with pytest.raises(ValueError, match=r"span \(30, 40\) is empty or"):
        cleaning.remove_nested_groundings(caption, [(30, 40, box)])


def test_partly_overlapping_spans_are_not_both_kept():
    parts, removed = cleaning.remove_nested_groundings(
        "abcdef", [(0, 4, (0, 0, 1, 1)), (2, 6, (0, 0, 1, 1))]
    )
    assert parts == [("abcd", [(0, 0, 1, 1)]), "ef"] and removed == 1


# PDF pages.


def make_pdf(pages):
    """A minimal PDF: each page `(width, height, words, rotate)` with words
    `(x, y, font_size, text)` written in Helvetica at baseline `(x, y)`."""
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    }
    kids = []
    for number, (width, height, words, rotate) in enumerate(pages):
        page_id, content_id = 4 + 2 * number, 5 + 2 * number
        kids.append(f"{page_id} 0 R")
        stream = "".join(
            f"BT /F1 {size} Tf {x} {y} Td ({text}) Tj ET\n"
            for x, y, size, text in words
        ).encode()
        objects[content_id] = (
            b"<< /Length %d >>\nstream\n%sendstream" % (len(stream), stream)
        )
        objects[page_id] = (
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {width} {height}] "
            f"/Rotate {rotate} /Resources << /Font << /F1 3 0 R >> >> "
            f"/Contents {content_id} 0 R >>"
        ).encode()
    objects[2] = (
        f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>"
    ).encode()
    data = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number in range(1, len(objects) + 1):
        offsets.append(len(data))
        data += b"%d 0 obj\n%s\nendobj\n" % (number, objects[number])
    xref = len(data)
    data += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    data += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    data += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(data)


SCALE = 2.0
PAGE = (300, 200)  # points
WORDS = [(20, 150, 24, "Hello world"), (40, 60, 16, "small text")]


def _box(quad):
    xs, ys = zip(*quad)
    return min(xs), min(ys), max(xs), max(ys)


@needs_pdfium
def test_pdf_words_land_where_the_text_was_placed():
    document = pdfium.PdfDocument(make_pdf([(*PAGE, WORDS, 0)]))
    page = document[0]
    words = pdf_source.page_words(page, SCALE)
    image = pdf_source.render_page(page, SCALE)
    document.close()
    assert image.shape == (PAGE[1] * SCALE, PAGE[0] * SCALE, 3)
    assert [w for w, _, _ in words] == ["Hello", "world", "small", "text"]
    height = PAGE[1] * SCALE
    for (word, quad, text_height), baseline in zip(
        words, [150, 150, 60, 60]
    ):
        x1, y1, x2, y2 = _box(quad)
        size = 24 if baseline == 150 else 16
        # Ink sits on the baseline (no descenders here) and rises about a
        # cap height (0.72 of the size) above it; y grows downwards.
        baseline_y = height - baseline * SCALE
        assert abs(y2 - baseline_y) < 0.1 * size * SCALE, word
        assert 0.6 * size * SCALE < y2 - y1 < 0.8 * size * SCALE, word
        # The line height is the font's ascent to descent, ~1.17 x size.
        assert 1.0 * size * SCALE < text_height < 1.3 * size * SCALE
        # The word's ink is dark in the rendered page, and the box holds it.
        inside = image[int(y1) : int(y2) + 1, int(x1) : int(x2) + 1]
        assert inside.min() < 64, word
    first_x = _box(words[0][1])[0]
    assert abs(first_x - 20 * SCALE) < 0.1 * 24 * SCALE  # Td's x
    # "world" follows "Hello" on the same line, after the space.
    assert _box(words[1][1])[0] > _box(words[0][1])[2]
    # Outside every word box the page is blank.
    mask = np.ones(image.shape[:2], bool)
    for _, quad, _ in words:
        x1, y1, x2, y2 = _box(quad)
        mask[int(y1) - 1 : int(y2) + 2, int(x1) - 1 : int(x2) + 2] = False
    assert image[mask].min() > 200


@needs_pdfium
def test_rotated_page_quads_follow_the_rotation():
    document = pdfium.PdfDocument(make_pdf([(*PAGE, WORDS[:1], 90)]))
    page = document[0]
    words = pdf_source.page_words(page, SCALE)
    image = pdf_source.render_page(page, SCALE)
    document.close()
    assert image.shape == (PAGE[0] * SCALE, PAGE[1] * SCALE, 3)
    (word, quad, _), _ = words
    assert word == "Hello"
    top_left, top_right, bottom_right, bottom_left = quad
    # Turned a quarter clockwise: the text reads downwards, its top faces
    # right, so the top edge is the right one.
    assert top_left[0] > bottom_left[0] and top_right[0] > bottom_right[0]
    assert top_right[1] > top_left[1]
    # A quarter turn clockwise takes the page's bottom edge to the left:
    # the baseline, 150 pt above the bottom, is 150 pt from the left.
    assert abs(bottom_left[0] - 150 * SCALE) < 0.1 * 24 * SCALE
    x1, y1, x2, y2 = _box(quad)
    assert image[int(y1) : int(y2) + 1, int(x1) : int(x2) + 1].min() < 64


@needs_pdfium
def test_pdf_source_makes_ocr_samples_and_counts_dropped_pages(tmp_path):
    path = tmp_path / "doc.pdf"
    path.write_bytes(
        make_pdf(
            [
                (*PAGE, WORDS, 0),  # kept
                (*PAGE, [(20, 150, 24, "alone")], 0),  # too few words
                (*PAGE, WORDS[:1] + [(40, 60, 3, "tiny print")], 0),
            ]
        )
    )
    source = pdf_source.PdfOcrSource(
        [path], scale=SCALE, min_words=2, min_text_height=8
    )
    samples = list(source)
    assert [s["id"] for s in samples] == ["doc.pdf#1"]
    (sample,) = samples
    assert sample["task"] == "ocr"
    assert sample["prompts"] == tasks.ocr_prompt()
    image = sample["images"][0]
    assert image.shape == (400, 600, 3) and image.dtype == np.uint8
    document = pdfium.PdfDocument(str(path))
    words = pdf_source.page_words(document[0], SCALE)
    document.close()
    expected = tasks.ocr_example(image, [(w, q) for w, q, _ in words])
    assert sample["responses"] == expected["responses"]
    assert sample["responses"].startswith(" <ref>Hello</ref><quad>(")
    report = source.report()
    assert (report.seen, report.kept) == (3, 1)
    assert report.dropped == collections.Counter(
        too_few_words=1, tiny_text=1, too_many_words=0
    )
    few = pdf_source.PdfOcrSource(path.read_bytes(), SCALE, 1, 8, max_words=3)
    assert [s["id"] for s in few] == ["pdf0#2"]
    assert few.report().dropped["too_many_words"] == 2


@needs_pdfium
def test_pdf_source_names_bad_input():
    with pytest.raises(FileNotFoundError, match="No such PDF file"):
        list(pdf_source.PdfOcrSource(["/nonexistent/a.pdf"]))
    with pytest.raises(ValueError, match="A PDF is a path, bytes or"):
        list(pdf_source.PdfOcrSource([3]))
    with pytest.raises(ValueError, match=r"`max_words` \(1\) must be >="):
        pdf_source.PdfOcrSource([], min_words=2, max_words=1)
