"""PDF pages as OCR-with-grounding samples.

The paper's OCR data includes PDF documents: every page is rendered as an
image and its words, with their boxes, become the `OCR with grounding:`
target (`keras_qwenvl.data.tasks.ocr_example`). Here pages are rendered
with PDFium (`pypdfium2`), and the words come from PDFium's text page:
its characters, split into words at whitespace, control characters and
line changes; a word's box is the union of its characters' ink boxes, and
its quad the box's corners (top-left, top-right, bottom-right, bottom-left
in reading orientation) in pixels of the rendered page, page rotation and
crop box included.

Pages are filtered in the spirit of the paper's data cleaning, with this
package's thresholds (the paper gives none): pages with too little text
(`min_words`), with text too small to read (`min_text_height`: any word
whose line height, font ascent to descent, is smaller, in pixels of the
rendered page, drops the page, since a transcription without that word
would teach the model to skip text) and, optionally, with too many words
for the sequence (`max_words`).
Each drop is counted per reason in `PdfOcrSource.report()`.

```python
source = PdfOcrSource(["paper.pdf"], scale=1.0, min_words=10)
examples = list(source)
print(source.report())
```

`pypdfium2` (BSD-3-Clause / Apache-2.0) is needed only by this module.
"""

import os
import unicodedata

import numpy as np

from keras_qwenvl.data import tasks
from keras_qwenvl.data.cleaning import CleaningReport

try:
    import pypdfium2 as pdfium
except ImportError:  # pragma: no cover
    pdfium = None

# Drop reasons of `PdfOcrSource.report()`.
REASONS = ("too_few_words", "too_many_words", "tiny_text")


def _require_pdfium():
    if pdfium is None:  # pragma: no cover
        raise ImportError(
            "Reading PDFs needs pypdfium2: `pip install pypdfium2`."
        )


def render_page(page, scale=1.0):
    """A page rendered as an RGB `uint8` array `(H, W, 3)`.

    Args:
        page: a `pypdfium2.PdfPage`.
        scale: pixels per PDF point (1.0 is 72 dpi).
    """
    image = page.render(scale=scale).to_pil().convert("RGB")
    return np.asarray(image)


class _PageTransform:
    """PDF page space (points, y up) -> pixels of the rendered page."""

    def __init__(self, page, scale):
        self.left, self.bottom, self.right, self.top = page.get_bbox()
        self.rotation = page.get_rotation() % 360
        self.scale = scale

    def __call__(self, x, y):
        u, v = x - self.left, self.top - y  # unrotated, y down
        width, height = self.right - self.left, self.top - self.bottom
        if self.rotation == 90:
            u, v = height - v, u
        elif self.rotation == 180:
            u, v = width - u, height - v
        elif self.rotation == 270:
            u, v = v, width - u
        return u * self.scale, v * self.scale


def _is_separator(char):
    return char.isspace() or unicodedata.category(char).startswith("C")


def _page_chars(text_page):
    """`(char, ink_box, line_box)` of a text page, boxes in points as
    `(left, bottom, right, top)`."""
    handle = text_page.raw
    for index in range(text_page.count_chars()):
        code = pdfium.raw.FPDFText_GetUnicode(handle, index)
        char = chr(code) if 0 < code < 0x110000 else "\x00"
        if _is_separator(char):
            yield char, None, None
            continue
        yield (
            char,
            text_page.get_charbox(index),
            text_page.get_charbox(index, loose=True),
        )


def _same_line(line_box, previous_line_box):
    """Whether a character's middle lies within the previous one's line."""
    middle = (line_box[1] + line_box[3]) / 2
    return previous_line_box[1] <= middle <= previous_line_box[3]


def _group_words(chars):
    """Characters -> words `(text, ink_box, line_height)` in points."""
    words = []
    current = None
    for char, ink, line in chars:
        if ink is None:
            current = None
            continue
        if current is not None and not _same_line(line, current["line"]):
            current = None
        if current is None:
            current = {"text": "", "ink": None, "line": line, "height": 0.0}
            words.append(current)
        current["text"] += char
        current["line"] = line
        current["height"] = max(current["height"], line[3] - line[1])
        if ink[2] > ink[0] and ink[3] > ink[1]:  # skip empty ink boxes
            box = current["ink"]
            current["ink"] = ink if box is None else (
                min(box[0], ink[0]),
                min(box[1], ink[1]),
                max(box[2], ink[2]),
                max(box[3], ink[3]),
            )
    return [
        (word["text"], word["ink"], word["height"])
        for word in words
        if word["ink"] is not None
    ]


def page_words(page, scale=1.0):
    """The words of a page with their quads in pixels of the page rendered
    at `scale`.

    Words wholly outside the visible page are left out; the corners of a
    word partly outside it are moved to its edge.

    Args:
        page: a `pypdfium2.PdfPage`.
        scale: pixels per PDF point, as for `render_page`.

    Returns:
        A list of `(word, quad, text_height)`: `quad` four `(x, y)` pixel
        points (top-left, top-right, bottom-right, bottom-left of the word
        as it reads), `text_height` its line height (font ascent to
        descent) in pixels.
    """
    _require_pdfium()
    transform = _PageTransform(page, scale)
    width, height = page.get_size()
    width, height = width * scale, height * scale
    text_page = page.get_textpage()
    try:
        words = _group_words(_page_chars(text_page))
    finally:
        text_page.close()
    results = []
    for text, (left, bottom, right, top), line_height in words:
        corners = [
            transform(left, top),
            transform(right, top),
            transform(right, bottom),
            transform(left, bottom),
        ]
        xs, ys = zip(*corners)
        if max(xs) <= 0 or max(ys) <= 0:
            continue  # left of or above the page
        if min(xs) >= width or min(ys) >= height:
            continue  # right of or below the page
        quad = tuple(
            (min(max(x, 0.0), width), min(max(y, 0.0), height))
            for x, y in corners
        )
        results.append((text, quad, line_height * scale))
    return results


def _open(pdf, index):
    """`(document, name)` for a path, bytes or an open document."""
    if isinstance(pdf, (str, os.PathLike)):
        path = os.fspath(pdf)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No such PDF file: {path!r}")
        return pdfium.PdfDocument(path), os.path.basename(path)
    if isinstance(pdf, (bytes, bytearray)):
        return pdfium.PdfDocument(bytes(pdf)), f"pdf{index}"
    if isinstance(pdf, pdfium.PdfDocument):
        return pdf, f"pdf{index}"
    raise ValueError(
        "A PDF is a path, bytes or a pypdfium2.PdfDocument. Received: "
        f"{type(pdf).__name__}"
    )


class PdfOcrSource:
    """The pages of PDF documents as OCR-with-grounding samples.

    Iterating renders each page (in order) and yields the samples of the
    pages the filters keep: `tasks.ocr_example(image, words)` with an `id`
    `"{file name}#{page number}"` (1-based; `pdf{i}` names the i-th
    document given as bytes). Each pass re-reads the documents and adds to
    the counts of `report()`.

    Args:
        pdfs: a PDF or a list of them: paths, bytes, or open
            `pypdfium2.PdfDocument`s.
        scale: pixels per PDF point for rendering (1.0 is 72 dpi; an A4
            page is then 595 x 842 pixels).
        min_words: pages with fewer words are dropped (default 5).
        min_text_height: pages with a word whose line height is smaller
            than this, in pixels of the rendered page, are dropped (default
            8).
        max_words: pages with more words are dropped; `None` keeps all.
            Each word costs about 40 tokens of the response.
    """

    def __init__(
        self, pdfs, scale=1.0, min_words=5, min_text_height=8.0, max_words=None
    ):
        _require_pdfium()
        if isinstance(pdfs, (str, os.PathLike, bytes, bytearray)) or (
            isinstance(pdfs, pdfium.PdfDocument)
        ):
            pdfs = [pdfs]
        self.pdfs = list(pdfs)
        if not scale > 0:
            raise ValueError(f"`scale` must be positive. Received: {scale!r}")
        if max_words is not None and max_words < min_words:
            raise ValueError(
                f"`max_words` ({max_words}) must be >= `min_words` "
                f"({min_words})."
            )
        self.scale = scale
        self.min_words = min_words
        self.min_text_height = min_text_height
        self.max_words = max_words
        self._report = CleaningReport()
        for reason in REASONS:
            self._report.dropped[reason] += 0

    def _drop_reason(self, words):
        if len(words) < self.min_words:
            return "too_few_words"
        if self.max_words is not None and len(words) > self.max_words:
            return "too_many_words"
        if any(height < self.min_text_height for _, _, height in words):
            return "tiny_text"
        return None

    def __iter__(self):
        for index, pdf in enumerate(self.pdfs):
            document, name = _open(pdf, index)
            try:
                for number in range(len(document)):
                    sample = self._page_sample(document[number])
                    if sample is not None:
                        sample["id"] = f"{name}#{number + 1}"
                        yield sample
            finally:
                if document is not pdf:
                    document.close()

    def _page_sample(self, page):
        try:
            self._report.seen += 1
            words = page_words(page, self.scale)
            reason = self._drop_reason(words)
            if reason is not None:
                self._report.dropped[reason] += 1
                return None
            image = render_page(page, self.scale)
        finally:
            page.close()
        self._report.kept += 1
        return tasks.ocr_example(image, [(w, quad) for w, quad, _ in words])

    def report(self):
        """Pages seen, kept and dropped per reason (a `CleaningReport`)."""
        return CleaningReport(
            seen=self._report.seen,
            kept=self._report.kept,
            dropped=self._report.dropped.copy(),
        )
