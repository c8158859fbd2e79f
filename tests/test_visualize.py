"""Pictures: regions with phrases on images, contact sheets."""

import os

import numpy as np
import PIL.Image
import PIL.ImageFont
import pytest

from keras_qwenvl import visualize

GREY = (100, 100, 100)
DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def grey(width=160, height=120):
    return np.full((height, width, 3), GREY, np.uint8)


def colors_in(pixels):
    return {tuple(p) for p in pixels.reshape(-1, 3)}


def test_box_edges_colours_and_untouched_interior(tmp_path):
    path = tmp_path / "boxes.png"
    regions = [
        {"phrase": "dog", "box": (20, 30, 100, 90)},
        {"phrase": "cat", "box": (110, 60, 150, 110)},
        {"phrase": "dog", "box": (120, 5, 150, 20)},  # same phrase
    ]
    picture = visualize.draw_regions(
        grey(), regions, line_width=3, font_size=12, path=path
    )
    pixels = np.asarray(PIL.Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(pixels, np.asarray(picture))
    first, second = visualize.PALETTE[:2]
    # Outlines are 3 pixels wide, inside the box's corners.
    for x in (20, 21, 22, 98, 99, 100):
        assert tuple(pixels[60, x]) == first, x
    for y in (88, 89, 90):
        assert tuple(pixels[y, 60]) == first
    assert tuple(pixels[60, 23]) == tuple(pixels[60, 19]) == GREY
    assert tuple(pixels[60, 97]) == tuple(pixels[60, 101]) == GREY
    assert tuple(pixels[80, 110]) == second  # the other phrase
    assert tuple(pixels[12, 120]) == first  # "dog" again: its colour
    # The inside of the box is untouched, and so is the image away from
    # the boxes and labels.
    assert colors_in(pixels[34:87, 24:97]) == {GREY}
    assert colors_in(pixels[95:, :100]) == {GREY}
    # The label sits on a filled background above the top-left corner,
    # with light text on the dark red.
    label = pixels[14:30, 20:40]
    assert first in colors_in(label)
    assert (label.min(axis=-1) > 200).any()
    assert picture.size == (160, 120) and picture.mode == "RGB"


def test_label_goes_inside_a_box_at_the_top_edge():
    pixels = np.asarray(
        visualize.draw_regions(
            grey(),
            [{"phrase": "top", "box": (10, 0, 80, 60)}],
            line_width=2,
            font_size=12,
        )
    )
    first = visualize.PALETTE[0]
    assert first in colors_in(pixels[3:12, 14:30])  # the label, inside
    assert colors_in(pixels[30:57, 13:77]) == {GREY}  # below the label


def test_quads_and_unnamed_regions():
    quad = ((40, 20), (120, 20), (120, 100), (40, 100))
    pixels = np.asarray(
        visualize.draw_regions(
            grey(),
            [{"phrase": None, "quad": quad}],
            line_width=2,
        )
    )
    first = visualize.PALETTE[0]
    assert tuple(pixels[60, 40]) == first
    assert tuple(pixels[20, 80]) == first
    assert colors_in(pixels[25:96, 45:116]) == {GREY}
    assert colors_in(pixels[:15]) == {GREY}  # no label without a phrase
    with pytest.raises(ValueError, match="has a 'box' or a 'quad'"):
        visualize.draw_regions(grey(), [{"phrase": "x", "point": (1, 2)}])


def test_model_output_and_samples_are_drawn_in_pixels():
    image = grey(200, 100)
    text = "<ref>cat</ref><box>(100,200),(500,800)</box> and more"
    pixels = np.asarray(visualize.draw_grounding(image, text, line_width=2))
    first = visualize.PALETTE[0]
    # (100, 200)-(500, 800) thousandths of 200 x 100: (20, 20)-(100, 80).
    assert tuple(pixels[50, 20]) == tuple(pixels[50, 100]) == first
    assert tuple(pixels[50, 22]) == GREY
    sample = {
        "task": "grounding",
        "image": image,
        "phrase": "cat",
        "box": (20, 20, 100, 80),
    }
    drawn = np.asarray(visualize.draw_example(sample, line_width=2))
    np.testing.assert_array_equal(drawn, pixels)
    with pytest.raises(ValueError, match="has no image to draw on"):
        visualize.draw_example("just text")


def test_float_images_in_unit_range_are_scaled():
    image = np.full((50, 60, 3), 0.5, np.float32)
    pixels = np.asarray(visualize.draw_regions(image, []))
    assert colors_in(pixels) == {(128, 128, 128)}


def test_contact_sheet_lays_out_images_captions_and_borders(tmp_path):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [np.full((32, 64, 3), c, np.uint8) for c in colors]
    path = tmp_path / "sheet.png"
    sheet = visualize.contact_sheet(
        images,
        captions=["hit", "miss", "a long caption " * 10],
        columns=2,
        cell_size=64,
        border_colors=[(0, 200, 0), None, (200, 0, 0)],
        path=path,
    )
    assert os.path.isfile(path)
    pixels = np.asarray(sheet)
    # Cells of 64 + margin; two columns, two rows.
    margin = 4
    cell_width = 64 + margin
    assert sheet.width == 2 * cell_width + margin
    assert sheet.height % 2 == margin % 2
    cell_height = (sheet.height - margin) // 2
    for index, color in enumerate(colors):
        left = margin + (index % 2) * cell_width
        top = margin + (index // 2) * cell_height
        # The image is scaled to 64 x 32, centred in its square cell.
        assert tuple(pixels[top + 32, left + 32]) == color
        assert tuple(pixels[top + 2, left + 32]) == (255, 255, 255)
        caption = pixels[top + 66 : top + cell_height - margin, left:]
        assert caption.min() < 128  # dark caption text
    # Borders around the first (green) and third (red) images only.
    top_border = pixels[margin + 15, margin + 10 : margin + 54]
    assert colors_in(top_border) == {(0, 200, 0)}
    left = margin + cell_width
    assert colors_in(pixels[margin + 15, left + 10 : left + 54]) == {
        (255, 255, 255)
    }
    with pytest.raises(ValueError, match="a contact sheet needs images"):
        visualize.contact_sheet([])
    with pytest.raises(ValueError, match="one entry per image: 1 for 3"):
        visualize.contact_sheet(images, captions=["only one"])


@pytest.mark.skipif(not os.path.isfile(DEJAVU), reason="no DejaVu font")
def test_fonts_cover_the_label_or_fall_back(monkeypatch):
    monkeypatch.setattr(visualize, "FONT_CANDIDATES", (DEJAVU,))
    latin = visualize.find_font("dog", 20)
    assert latin.getname()[0] == "DejaVu Sans"
    # DejaVu Sans has no Chinese glyphs: Pillow's built-in font instead.
    chinese = visualize.find_font("小狗", 20)
    default = PIL.ImageFont.load_default(size=20)
    assert chinese.getname() == default.getname() != latin.getname()
    # A font given first wins when it covers the text.
    assert visualize.find_font("dog", 20, font=DEJAVU).size == 20
    monkeypatch.setattr(visualize, "FONT_CANDIDATES", ())
    assert visualize.find_font("dog", 20).getname() == default.getname()
    with pytest.raises(FileNotFoundError, match="No such font file"):
        visualize.find_font("dog", 20, font="/nonexistent/font.ttf")


def test_phrase_colours_are_distinct():
    colors = [visualize.phrase_color(i) for i in range(40)]
    assert len(set(colors)) == 40
