"""Cleaning of web image-text pairs and of grounded captions.

The paper (Sec. 3.1 and appendix A) cleans its web image-text pairs
(LAION, DataComp, Coyo, ...) before pre-training by removing pairs whose
image has a too large aspect ratio or is too small, whose CLIP score is too
low, whose text contains characters that are neither English nor Chinese,
contains emoji, or is too short or too long, and by cleaning HTML tags and
other irregular patterns out of the texts. It gives no thresholds; the
defaults below are this package's choices and are named as such.

Each step here is one of those filters or cleaners, and
`CleaningPipeline` chains them over pairs `{"image": ..., "text": ...}`
(other keys pass through untouched), counting for every step how many pairs
it dropped and how many texts it changed, so that nothing is lost silently:

```python
pipeline = CleaningPipeline(paper_filters(similarity=clip_score))
kept = list(pipeline(pairs))
print(pipeline.report())
samples = [tasks.caption_example(p["image"], p["text"]) for p in kept]
```

Images are read for their size only (the file header for a path), except
by a similarity function, which gets the image as given.

For grounded captions (GRIT-like data: a caption and the character spans
of its phrases, each with boxes), `remove_nested_groundings` drops spans
nested in (or overlapping) others, greedily, keeping as many as possible,
so that every kept phrase can be written as one `<ref>...</ref>` with
its boxes.
"""

import collections
import dataclasses
import html
import re
import unicodedata

import numpy as np

from keras_qwenvl.data import tasks


@dataclasses.dataclass
class CleaningReport:
    """What a cleaning pass kept, dropped and changed.

    Attributes:
        seen: items that entered the pass.
        kept: items that left it.
        dropped: a `collections.Counter` of dropped items per step name (or
            per reason).
        changed: a `collections.Counter` of items whose text a step
            changed, per step name.
    """

    seen: int = 0
    kept: int = 0
    dropped: collections.Counter = dataclasses.field(
        default_factory=collections.Counter
    )
    changed: collections.Counter = dataclasses.field(
        default_factory=collections.Counter
    )

    def __str__(self):
        text = f"{self.seen} seen, {self.kept} kept"
        parts = [
            f"{name}: {count}" for name, count in self.dropped.items() if count
        ]
        if parts:
            text += f"; dropped ({', '.join(parts)})"
        parts = [
            f"{name}: {count}" for name, count in self.changed.items() if count
        ]
        if parts:
            text += f"; changed ({', '.join(parts)})"
        return text


# Filters: `step(pair)` returns the pair, or None to drop it.


def _check_positive(name, value):
    if not value > 0:
        raise ValueError(f"`{name}` must be positive. Received: {value!r}")


class AspectRatioFilter:
    """Drops pairs whose image is too elongated.

    Args:
        max_ratio: the largest `longer side / shorter side` kept (default
            3.0, this package's choice).
    """

    name = "aspect_ratio"

    def __init__(self, max_ratio=3.0):
        if not max_ratio >= 1:
            raise ValueError(
                f"`max_ratio` must be >= 1. Received: {max_ratio!r}"
            )
        self.max_ratio = max_ratio

    def __call__(self, pair):
        width, height = tasks.image_size(pair["image"])
        ratio = max(width, height) / min(width, height)
        return pair if ratio <= self.max_ratio else None


class ImageSizeFilter:
    """Drops pairs whose image is too small.

    Args:
        min_side: the smallest shorter side kept, in pixels (default 224,
            the stage-1 training resolution: smaller images would be
            upsampled).
    """

    name = "image_size"

    def __init__(self, min_side=224):
        _check_positive("min_side", min_side)
        self.min_side = min_side

    def __call__(self, pair):
        shorter = min(tasks.image_size(pair["image"]))
        return pair if shorter >= self.min_side else None


# Letters of each language, for `LanguageFilter`.
def _is_english_letter(char):
    return ("a" <= char <= "z") or ("A" <= char <= "Z")


_CJK_RANGES = (
    (0x3400, 0x4DBF),  # CJK Unified Ideographs Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0x20000, 0x2FA1F),  # Extensions B-F and Compatibility Supplement
)


def is_cjk(char):
    """Whether a character is a CJK ideograph (Chinese characters)."""
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK_RANGES)


_LANGUAGE_LETTERS = {"en": _is_english_letter, "zh": is_cjk}


def letter_fractions(text):
    """The share of the text's letters in each known script.

    Letters are the characters of Unicode category L*; digits,
    punctuation, symbols and spaces count for no language.

    Returns:
        `(letters, {"en": fraction, "zh": fraction})`: the number of
        letters and the fraction of them that are ASCII letters and CJK
        ideographs (0 for both when there are no letters).
    """
    letters = [c for c in text if unicodedata.category(c).startswith("L")]
    if not letters:
        return 0, {name: 0.0 for name in _LANGUAGE_LETTERS}
    return len(letters), {
        name: sum(map(test, letters)) / len(letters)
        for name, test in _LANGUAGE_LETTERS.items()
    }


class LanguageFilter:
    """Drops texts that are not written in the given languages.

    A simple script heuristic, not language identification: of the text's
    letters (Unicode category L*), the fraction written in the allowed
    scripts must reach `min_fraction`. English letters are the ASCII
    letters `A-Z a-z`; Chinese letters are the CJK ideographs (see
    `is_cjk`). Digits, punctuation (Chinese punctuation included),
    symbols and spaces are neutral. A text without letters is dropped.
    With the default `min_fraction=1.0` any other letter (accented Latin,
    Cyrillic, kana, hangul, ...) drops the pair, as the paper removes
    texts "containing non-English or non-Chinese characters"; it cannot
    tell English from, say, German written without accents.

    Args:
        languages: the allowed languages, from "en" and "zh".
        min_fraction: the smallest fraction of allowed letters kept.
    """

    name = "language"

    def __init__(self, languages=("en", "zh"), min_fraction=1.0):
        unknown = sorted(set(languages) - set(_LANGUAGE_LETTERS))
        if unknown or not languages:
            raise ValueError(
                f"`languages` must be a non-empty subset of "
                f"{sorted(_LANGUAGE_LETTERS)}. Received: {languages!r}"
            )
        if not 0 < min_fraction <= 1:
            raise ValueError(
                f"`min_fraction` must be in (0, 1]. Received: {min_fraction!r}"
            )
        self.languages = tuple(languages)
        self.min_fraction = min_fraction

    def __call__(self, pair):
        count, fractions = letter_fractions(pair["text"])
        allowed = sum(fractions[name] for name in self.languages)
        # A little tolerance for the floating point sum.
        return pair if count and allowed >= self.min_fraction - 1e-9 else None


_EMOJI_RANGES = (
    (0x1F000, 0x1FAFF),  # emoticons, pictographs, transport, flags, ...
    (0x2600, 0x27BF),  # miscellaneous symbols, dingbats
    (0x2B00, 0x2BFF),  # arrows and stars (e.g. U+2B50)
    (0xFE0F, 0xFE0F),  # emoji presentation selector
    (0xE0020, 0xE007F),  # tag characters of flag sequences
)


def has_emoji(text):
    """Whether a text has an emoji: a character of the emoji blocks
    U+1F000-1FAFF, U+2600-27BF, U+2B00-2BFF, the emoji presentation
    selector U+FE0F or the tag characters U+E0020-E007F."""
    return any(
        low <= ord(char) <= high
        for char in text
        for low, high in _EMOJI_RANGES
    )


class EmojiFilter:
    """Drops texts that contain emoji (see `has_emoji`)."""

    name = "emoji"

    def __call__(self, pair):
        return None if has_emoji(pair["text"]) else pair


def count_words(text):
    """Words of a text: each CJK ideograph is one word, and so is each
    whitespace-separated run of other characters."""
    spaced = "".join(f" {c} " if is_cjk(c) else c for c in text)
    return len(spaced.split())


class TextLengthFilter:
    """Drops texts that are too short or too long.

    Args:
        min_length: the shortest length kept (default 2 words).
        max_length: the longest length kept (default 128 words, well
            inside stage 1's 512-token sequences).
        length_fn: the length of a text; defaults to `count_words`. Pass a
            tokenizer's token count to measure in tokens.
    """

    name = "text_length"

    def __init__(self, min_length=2, max_length=128, length_fn=None):
        if not 0 <= min_length <= max_length:
            raise ValueError(
                "`min_length` and `max_length` must satisfy 0 <= min_length "
                f"<= max_length. Received: {min_length!r}, {max_length!r}"
            )
        self.min_length = min_length
        self.max_length = max_length
        self.length_fn = length_fn or count_words

    def __call__(self, pair):
        length = self.length_fn(pair["text"])
        return pair if self.min_length <= length <= self.max_length else None


class SimilarityFilter:
    """Drops pairs whose image-text similarity is below a threshold.

    The paper removes pairs with a low CLIP score, with a threshold chosen
    per dataset; any scorer can be plugged in.

    Args:
        score_fn: `score_fn(image, text) -> float`, e.g. a CLIP score.
        threshold: the lowest score kept.
    """

    name = "similarity"

    def __init__(self, score_fn, threshold):
        if not callable(score_fn):
            raise ValueError(
                "`score_fn` must be a callable `(image, text) -> score`. "
                f"Received: {score_fn!r}"
            )
        self.score_fn = score_fn
        self.threshold = threshold

    def __call__(self, pair):
        score = float(self.score_fn(pair["image"], pair["text"]))
        return pair if score >= self.threshold else None


# Cleaners: they rewrite the text; an empty result drops the pair.


_HTML_TAG = re.compile(
    r"<!--.*?-->|<!\[CDATA\[.*?\]\]>|</?[A-Za-z][^<>]*>", re.DOTALL
)
_SPACES = re.compile(r"\s+")


def strip_html(text):
    """A text without its HTML: comments and tags removed, entities
    (`&amp;`, `&#39;`, ...) decoded, whitespace runs made single spaces.
    Every `<name ...>` tag is removed, Qwen-VL's own tags included: this
    is for raw web text."""
    text = html.unescape(_HTML_TAG.sub(" ", text))
    return _SPACES.sub(" ", text).strip()


class HtmlCleaner:
    """Removes HTML from texts (see `strip_html`); a text left empty drops
    the pair."""

    name = "html"

    def __call__(self, pair):
        return _with_text(pair, strip_html(pair["text"]))


# Irregular patterns of web captions, removed by default.
DEFAULT_PATTERNS = (
    r"(?:https?://|www\.)\S+",  # URLs
    r"[\w.+-]+@[\w-]+\.[\w.-]+",  # e-mail addresses
)


class PatternCleaner:
    """Removes irregular patterns (regular expressions) from texts.

    Matches are replaced by a space and whitespace runs made single spaces;
    a text left empty drops the pair.

    Args:
        patterns: regular expressions; default `DEFAULT_PATTERNS` (URLs and
            e-mail addresses).
    """

    name = "patterns"

    def __init__(self, patterns=DEFAULT_PATTERNS):
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def __call__(self, pair):
        text = _SPACES.sub(" ", self.pattern.sub(" ", pair["text"])).strip()
        return _with_text(pair, text)


def _with_text(pair, text):
    """A copy of the pair with a new text, or None for an empty text."""
    if not text:
        return None
    if text == pair["text"]:
        return pair
    return {**pair, "text": text}


def paper_filters(
    max_aspect_ratio=3.0,
    min_side=224,
    similarity=None,
    similarity_threshold=0.28,
    languages=("en", "zh"),
    min_length=2,
    max_length=128,
):
    """The paper's cleaning steps for web image-text pairs, in order.

    The image checks come first (cheap), then the similarity score (if a
    scorer is given), then the text: HTML and irregular patterns are
    cleaned before the text's language, emoji and length are judged.

    Args:
        max_aspect_ratio: see `AspectRatioFilter`.
        min_side: see `ImageSizeFilter`.
        similarity: an optional `score_fn(image, text)` (e.g. CLIP); no
            similarity filter when `None`.
        similarity_threshold: the lowest score kept; 0.28, the cosine
            similarity cut LAION-5B used with CLIP ViT-B/32 on English
            pairs. The paper sets it per dataset; set it per scorer.
        languages: see `LanguageFilter`.
        min_length: see `TextLengthFilter`.
        max_length: see `TextLengthFilter`.

    Returns:
        A list of steps for `CleaningPipeline`.
    """
    steps = [AspectRatioFilter(max_aspect_ratio), ImageSizeFilter(min_side)]
    if similarity is not None:
        steps.append(SimilarityFilter(similarity, similarity_threshold))
    steps += [
        HtmlCleaner(),
        PatternCleaner(),
        LanguageFilter(languages),
        EmojiFilter(),
        TextLengthFilter(min_length, max_length),
    ]
    return steps


class CleaningPipeline:
    """Runs cleaning steps over image-text pairs and counts what each does.

    A step is a callable `step(pair) -> pair | None` (None drops the pair)
    with a `name` (a function's `__name__` otherwise); the filters and
    cleaners of this module are steps. Pairs are dicts with "image" and
    "text"; steps that change the text return a copy, never touching the
    input pair. The counts add up over every pass.

    Args:
        steps: the steps, in order; names must be distinct.

    Example:
    ```python
    pipeline = CleaningPipeline([HtmlCleaner(), EmojiFilter()])
    kept = list(pipeline([{"image": image, "text": "<b>a dog</b>"}]))
    pipeline.report().changed["html"]  # 1
    ```
    """

    def __init__(self, steps):
        self.steps = list(steps)
        names = [self._name(step) for step in self.steps]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"Cleaning steps need distinct names; repeated: {repeated}."
            )
        self.names = names
        self._report = CleaningReport()
        for name in names:  # every step shows in the counts, even at 0
            self._report.dropped[name] += 0
            self._report.changed[name] += 0

    @staticmethod
    def _name(step):
        if not callable(step):
            raise ValueError(
                f"A cleaning step must be callable. Received: {step!r}"
            )
        return getattr(step, "name", None) or getattr(
            step, "__name__", type(step).__name__
        )

    def clean(self, pair):
        """One pair through every step: the cleaned pair, or None."""
        if not isinstance(pair, dict) or not {"image", "text"} <= set(pair):
            raise ValueError(
                "A pair is a dict with 'image' and 'text'. Received: "
                f"{pair!r}"[:200]
            )
        self._report.seen += 1
        for name, step in zip(self.names, self.steps):
            result = step(pair)
            if result is None:
                self._report.dropped[name] += 1
                return None
            if result["text"] != pair["text"]:
                self._report.changed[name] += 1
            pair = result
        self._report.kept += 1
        return pair

    def __call__(self, pairs):
        """Yields the cleaned pairs that every step kept (lazily)."""
        for pair in pairs:
            pair = self.clean(pair)
            if pair is not None:
                yield pair

    def report(self):
        """The counts so far, a `CleaningReport` (a copy)."""
        return dataclasses.replace(
            self._report,
            dropped=collections.Counter(self._report.dropped),
            changed=collections.Counter(self._report.changed),
        )


# Grounded captions.


def remove_nested_groundings(caption, spans):
    """Removes nested grounding phrases of a caption, keeping the most.

    In GRIT-like data a caption's phrases are character spans, each with
    boxes, and one phrase may lie inside another ("a man in a red shirt",
    "a red shirt"). `<ref>` tags cannot nest, so, as the paper does,
    nested (and overlapping) spans are removed greedily so that the caption
    keeps as many grounded phrases as possible: spans are taken in order of
    their end (then of their start, so the longer of two spans that end
    together comes first), and a span is kept when it does not overlap one
    already kept. This is the classic interval-scheduling greedy, which
    keeps the largest possible number of disjoint spans.

    Spans with the same `(start, end)` are one phrase with all their boxes
    (GRIT lists one entry per box).

    Args:
        caption: the caption text.
        spans: `(start, end, regions)` triples: the phrase is
            `caption[start:end]`, `regions` one box or a list of them (any
            form `tasks.grounded_caption_example` takes, usually pixel
            boxes).

    Returns:
        `(parts, removed)`: the caption as parts for
        `tasks.grounded_caption_example` (strings and `(phrase, regions)`
        pairs, in order) and the number of phrases removed.

    Raises:
        ValueError: a span outside the caption or empty.
    """
    merged = {}
    for span in spans:
        try:
            start, end, regions = span
        except (TypeError, ValueError):
            raise ValueError(
                "A grounding span is `(start, end, regions)`. Received: "
                f"{span!r}"
            ) from None
        start, end = int(start), int(end)
        if not 0 <= start < end <= len(caption):
            raise ValueError(
                f"The span ({start}, {end}) is empty or outside the caption "
                f"of {len(caption)} characters: {caption!r}"
            )
        if _is_single_region(regions):
            regions = [regions]
        merged.setdefault((start, end), []).extend(regions)
    kept = []
    for start, end in sorted(merged, key=lambda s: (s[1], s[0])):
        if not kept or start >= kept[-1][1]:
            kept.append((start, end))
    parts = []
    position = 0
    for start, end in kept:
        if start > position:
            parts.append(caption[position:start])
        parts.append((caption[start:end], merged[(start, end)]))
        position = end
    if position < len(caption):
        parts.append(caption[position:])
    return parts, len(merged) - len(kept)


def _is_single_region(regions):
    """A box `(x1, y1, x2, y2)` or a quad, rather than a list of them."""
    try:
        shape = np.shape(np.asarray(regions, dtype="float64"))
    except (TypeError, ValueError):  # ragged: a list of regions
        return False
    return shape in ((4,), (8,), (4, 2))
