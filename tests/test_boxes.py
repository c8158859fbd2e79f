"""Regions as text: pixel boxes <-> `<box>`/`<quad>`, parsing, validation."""

import re

import numpy as np
import pytest

from keras_qwenvl import boxes


# Pixels -> text.


def test_normalize_box_rounds_to_the_nearest_thousandth():
    # 10/640*1000 = 15.625 -> 16; 20/480*1000 = 41.67 -> 42; the far
    # corner is the image centre: 500.
    assert boxes.normalize_box((10, 20, 320, 240), (640, 480)) == (
        16,
        42,
        500,
        500,
    )
    # 0.4 of a unit rounds down, 0.5 rounds up.
    assert boxes.normalize_box((0.4, 0.5, 1, 1), (1000, 1000)) == (0, 1, 1, 1)


def test_normalize_box_clamps_the_far_border_to_999():
    assert boxes.normalize_box((0, 0, 640, 480), (640, 480)) == (0, 0, 999, 999)
    assert boxes.normalize_box((639.9, 0, 640, 1), (640, 480)) == (
        999,
        0,
        999,
        2,
    )


@pytest.mark.parametrize("image_size", [(640, 480), (37, 1999), (1000, 1000)])
def test_pixel_text_pixel_round_trip_within_one_unit(image_size):
    width, height = image_size
    rng = np.random.default_rng(0)
    for _ in range(200):
        x1, x2 = np.sort(rng.uniform(0, width, 2))
        y1, y2 = np.sort(rng.uniform(0, height, 2))
        text = boxes.normalize_box((x1, y1, x2, y2), image_size)
        assert all(isinstance(v, int) and 0 <= v < 1000 for v in text)
        back = boxes.denormalize_box(text, image_size)
        units = (width / 1000, height / 1000) * 2
        for original, restored, unit in zip((x1, y1, x2, y2), back, units):
            assert abs(original - restored) <= unit


def test_denormalize_box_follows_the_scale():
    assert boxes.denormalize_box((100, 200, 500, 999), (2000, 1000)) == (
        200.0,
        200.0,
        1000.0,
        999.0,
    )
    # The grounding evaluation divides by 999.
    assert boxes.denormalize_box((0, 0, 999, 999), (640, 480), scale=999) == (
        0.0,
        0.0,
        640.0,
        480.0,
    )


def test_format_box_quad_and_ref():
    assert (
        boxes.format_box((10, 20, 320, 240), (640, 480))
        == "<box>(16,42),(500,500)</box>"
    )
    quad = [(0, 0), (50, 10), (50, 40), (0, 30)]
    expected_quad = "<quad>(0,0),(500,250),(500,999),(0,750)</quad>"
    assert boxes.format_quad(quad, (100, 40)) == expected_quad
    assert boxes.format_quad(np.ravel(quad), (100, 40)) == expected_quad
    assert (
        boxes.format_ref("a cat", (0, 0, 50, 20), (100, 40))
        == "<ref>a cat</ref><box>(0,0),(500,500)</box>"
    )
    assert boxes.format_ref(
        "two dogs", [(0, 0, 50, 20), (60, 0, 100, 40)], (100, 40)
    ) == (
        "<ref>two dogs</ref><box>(0,0),(500,500)</box>"
        "<box>(600,0),(999,999)</box>"
    )
    # Two boxes as a (2, 4) array, and a quad among the regions.
    assert boxes.format_ref(
        "signs", [np.array([0, 0, 50, 20]), quad], (100, 40)
    ) == ("<ref>signs</ref><box>(0,0),(500,500)</box>" + expected_quad)


# Pixels -> text errors.


@pytest.mark.parametrize(
    "box, match",
    [
        (
            (-1, 0, 5, 5),
            r"Region \(-1, 0, 5, 5\) lies outside the image of size "
            r"\(width, height\) = \(640, 480\): point \(-1, 0\)",
        ),
        (
            (0, 0, 641, 5),
            r"Region \(0, 0, 641, 5\) lies outside .* = \(640, 480\)",
        ),
        ((0, 0, 5, 480.5), r"point \(5, 480.5\)"),
        (
            (50, 0, 40, 5),
            r"Box \(50, 0, 40, 5\) must have x1 <= x2.*\(640, 480\)",
        ),
        (
            (0, 50, 5, 40),
            r"Box \(0, 50, 5, 40\) must have x1 <= x2 and y1 <= y2",
        ),
        ((1, 2, 3), r"box `\(x1, y1, x2, y2\)` or a quad"),
        ((0, 0, float("nan"), 5), r"finite numbers"),
        (("a", 0, 1, 1), r"box `\(x1, y1, x2, y2\)` or a quad"),
    ],
)
def test_normalize_box_errors_name_the_box_and_image(box, match):
    with pytest.raises(ValueError, match=match):
        boxes.normalize_box(box, (640, 480))


def test_bad_image_size_and_quad_errors():
    with pytest.raises(ValueError, match=r"must be `\(width, height\)`"):
        boxes.normalize_box((0, 0, 1, 1), 640)
    with pytest.raises(ValueError, match="positive values"):
        boxes.format_box((0, 0, 1, 1), (0, 480))
    with pytest.raises(ValueError, match=r"Region \(0, 0, 10, 0, 10, 50, 0"):
        boxes.format_quad([(0, 0), (10, 0), (10, 50), (0, 50)], (100, 40))
    with pytest.raises(ValueError, match="A quad has four"):
        boxes.format_quad((0, 0, 1, 1), (100, 40))
    with pytest.raises(ValueError, match="A box has 4 coordinates"):
        boxes.normalize_box([(0, 0), (1, 0), (1, 1), (0, 1)], (100, 40))


# Text -> pixels.


def test_parse_grounding_refs_boxes_and_quads():
    text = (
        "Here <ref>two dogs</ref><box>(0,0),(500,500)</box> "
        "<box>(500,500),(999,999)</box> play near "
        "<box>(100,200),(300,400)</box>, and "
        "<ref>EXIT</ref><quad>(0,0),(10,0),(10,20),(0,20)</quad>."
    )
    parsed = boxes.parse_grounding(text, (2000, 1000))
    assert parsed == [
        {"phrase": "two dogs", "box": (0.0, 0.0, 1000.0, 500.0)},
        {"phrase": "two dogs", "box": (1000.0, 500.0, 1998.0, 999.0)},
        {"phrase": None, "box": (200.0, 200.0, 600.0, 400.0)},
        {
            "phrase": "EXIT",
            "quad": ((0.0, 0.0), (20.0, 0.0), (20.0, 20.0), (0.0, 20.0)),
        },
    ]


def test_parse_grounding_without_boxes_and_with_bad_boxes():
    assert boxes.parse_grounding("A plain caption.", (10, 10)) == []
    assert boxes.parse_grounding("<ref>only a phrase</ref>", (10, 10)) == []
    text = (
        "<ref>a</ref><box>(1,2)</box><box>(1,2),(3,4),(5,6)</box>"
        "<box>(x,2),(3,4)</box><box>(1,2),(3,4)"
    )
    assert boxes.parse_grounding(text, (1000, 1000)) == []
    # Spaces inside the points are read.
    parsed = boxes.parse_grounding("<box>( 1, 2 ), (3,4)</box>", (1000, 1000))
    assert parsed == [{"phrase": None, "box": (1.0, 2.0, 3.0, 4.0)}]


def test_parse_grounding_scale_999_and_round_trip():
    image_size = (333, 517)
    regions = [(10.5, 20, 300, 400), (0, 0, 333, 517)]
    text = boxes.format_ref("things", regions, image_size)
    unit = np.array([333, 517, 333, 517]) / 1000 + 1e-9
    # Within one text unit at scale 1000; dividing by 999 adds up to 0.1%.
    for scale, tolerance in ((1000, unit), (999, 2 * unit)):
        parsed = boxes.parse_grounding(text, image_size, scale=scale)
        assert [p["phrase"] for p in parsed] == ["things", "things"]
        for region, entry in zip(regions, parsed):
            error = np.abs(np.subtract(entry["box"], region))
            assert np.all(error <= tolerance)
    parsed = boxes.parse_grounding(
        "<box>(999,999),(999,999)</box>", (640, 480), scale=999
    )
    assert parsed[0]["box"] == (640.0, 480.0, 640.0, 480.0)


# Validation of text.


def test_validate_text_boxes_accepts_well_formed_text():
    boxes.validate_text_boxes("no regions at all")
    boxes.validate_text_boxes(
        "<ref>the left dog</ref><box>(12,34),(567,999)</box> and "
        "<quad>(1,2),(3,4),(5,6),(7,8)</quad><box>(0,0),(0,0)</box>"
    )
    # A grounding prompt asks the model to complete an open box.
    boxes.validate_text_boxes("<ref>dog</ref><box>", allow_open_end=True)
    boxes.validate_text_boxes("<ref>dog</ref><box>(12,3", allow_open_end=True)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "a <box>(12,34),(567,1000)</box>",
            "box out of range: '<box>(12,34),(567,1000)</box>' has "
            "coordinate 1000",
        ),
        (
            "<box>(-1,34),(567,10)</box>",
            "box out of range: '<box>(-1,34),(567,10)</box>' has coordinate -1",
        ),
        (
            "<quad>(1,2),(3,4),(5,6),(7,1234)</quad>",
            "box out of range: '<quad>(1,2),(3,4),(5,6),(7,1234)</quad>' has "
            "coordinate 1234",
        ),
        (
            "<box>(12, 34),(567,999)</box>",
            "malformed box: '<box>(12, 34),(567,999)</box>' must hold 2 points",
        ),
        (
            "<box>(12,34)</box>",
            "malformed box: '<box>(12,34)</box>' must hold 2 points",
        ),
        (
            "<box>12,34,56,78</box>",
            "malformed box: '<box>12,34,56,78</box>' must hold 2 points",
        ),
        (
            "<quad>(1,2),(3,4)</quad>",
            "malformed box: '<quad>(1,2),(3,4)</quad>' must hold 4 points",
        ),
        (
            "<box>(50,34),(40,99)</box>",
            "malformed box: '<box>(50,34),(40,99)</box>' must be the top-left",
        ),
        (
            "<box>(1,2),(3,4) and more",
            "malformed box: `<box>` at character 0 is not closed",
        ),
    ],
)
def test_validate_text_boxes_errors_name_the_tag(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        boxes.validate_text_boxes(text)


def test_open_box_only_allowed_at_the_end_of_a_prompt():
    with pytest.raises(ValueError, match="not closed"):
        boxes.validate_text_boxes("<ref>dog</ref><box>")
    with pytest.raises(ValueError, match="not closed"):
        boxes.validate_text_boxes(
            "<box>(1,2) <ref>cat</ref>", allow_open_end=True
        )
