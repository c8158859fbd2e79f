"""CIDEr-D, as the coco-caption (pycocoevalcap) `Cider` scorer computes it.

For every image, the candidate caption and each reference are turned into
tf-idf vectors of their 1- to 4-grams: term frequency times
`log(number of images) - log(max(1, df))`, `df` the number of images whose
references contain the n-gram (document frequencies come from the
references of the evaluated corpus itself). For each n the score is the
cosine similarity with clipping (`sum min(c, r) * r / (|c| |r|)`) times a
Gaussian length penalty `exp(-(delta ** 2) / (2 * sigma ** 2))`. The image
score is the mean over n, averaged over the references, times 10; the
corpus score is the mean over images. Behaviours of the implementation kept
here: `delta` is the difference of the numbers of *bigrams* (one less than
the number of words for non-empty captions), and an n-gram that no
reference contains still gets the full idf `log(number of images)`.

Captions are tokenized first (`ptb_tokenize`), as `COCOEvalCap` does with
the Stanford PTB tokenizer.
"""

import collections
import math
import re

import numpy as np

# Tokens that pycocoevalcap drops after PTB tokenization (lower-cased).
_PTB_DROPPED = frozenset(
    ("''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";")
)
# Brackets and double quotes become -LRB-, ``, ... in PTB output and are
# dropped too.
_PTB_BRACKETS_QUOTES = frozenset('(){}[]"')
_CONTRACTION = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(
    r"n't|'(?:s|re|ve|ll|d|m)\b"  # split-off contraction
    r"|\w+(?:[-'./&]\w+)*"  # words, numbers, hyphenated words, "3.5"
    r"|\.\.\.|--|\S"  # ellipsis, dash, any other mark
)


def ptb_tokenize(text):
    """Lower-cased PTB-style tokens of a caption, punctuation dropped.

    A pure Python approximation of the Stanford PTB tokenizer that
    `COCOEvalCap` runs (with `-lowerCase`) followed by its punctuation
    filter: contractions split ("don't" -> "do n't", "dog's" -> "dog 's"),
    hyphenated words and decimals kept whole, punctuation, brackets and
    quotes dropped. It agrees on ordinary captions; it may differ on rare
    forms (abbreviations such as "mr." lose their period here; square
    brackets, which pycocoevalcap keeps as -LSB- / -RSB-, are dropped).

    Returns:
        The tokens joined by single spaces.

    Example:
    >>> ptb_tokenize("A man's dog, running (fast).")
    "a man 's dog running fast"
    """
    text = _CONTRACTION.sub(r" \1", text.lower())
    tokens = _TOKEN.findall(text)
    return " ".join(
        token
        for token in tokens
        if token not in _PTB_DROPPED and token not in _PTB_BRACKETS_QUOTES
    )


def _ngram_counts(sentence, n):
    """Counts of the 1- to n-grams of a whitespace-tokenized sentence."""
    words = sentence.split()
    counts = collections.Counter()
    for k in range(1, n + 1):
        for start in range(len(words) - k + 1):
            counts[tuple(words[start : start + k])] += 1
    return counts


def _tfidf(counts, document_frequency, log_num_documents, n):
    """Per-order tf-idf vectors, their norms and the sentence's length.

    The length is the number of bigrams, as the reference code counts it.
    """
    vectors = [{} for _ in range(n)]
    norms = np.zeros(n)
    for ngram, term_frequency in counts.items():
        df = document_frequency.get(ngram, 0.0)
        weight = term_frequency * (log_num_documents - math.log(max(1.0, df)))
        vectors[len(ngram) - 1][ngram] = weight
        norms[len(ngram) - 1] += weight**2
    length = sum(tf for ngram, tf in counts.items() if len(ngram) == 2)
    return vectors, np.sqrt(norms), length


def _similarity(candidate, reference, n, sigma):
    """Per-order clipped cosine similarity with the length penalty."""
    vectors, norms, length = candidate
    ref_vectors, ref_norms, ref_length = reference
    penalty = math.exp(-((length - ref_length) ** 2) / (2 * sigma**2))
    values = np.zeros(n)
    for k in range(n):
        for ngram, weight in vectors[k].items():
            ref_weight = ref_vectors[k].get(ngram, 0.0)
            values[k] += min(weight, ref_weight) * ref_weight
        if norms[k] != 0 and ref_norms[k] != 0:
            values[k] /= norms[k] * ref_norms[k]
    return values * penalty


def cider_d(candidates, references, n=4, sigma=6.0, tokenize=True):
    """CIDEr-D of a corpus of captions (coco-caption's `Cider`).

    Args:
        candidates: one generated caption per image.
        references: per image, a non-empty list of reference captions.
        n: the largest n-gram order (4).
        sigma: the standard deviation of the length penalty (6).
        tokenize: apply `ptb_tokenize` first, as `COCOEvalCap` does; with
            `False` the captions are split on whitespace as given.

    Returns:
        `(score, per_image)`: the corpus CIDEr-D (published tables show it
        times 100) and a float array of the image scores (its mean is the
        score). Document frequencies depend on the whole corpus, so an
        image's score changes with the other images evaluated.
    """
    candidates = list(candidates)
    references = [list(refs) for refs in references]
    if len(candidates) != len(references):
        raise ValueError(
            f"{len(candidates)} candidates but {len(references)} reference "
            "lists; pass one list of references per candidate."
        )
    if not candidates:
        raise ValueError("CIDEr-D needs at least one candidate caption.")
    for index, (candidate, refs) in enumerate(zip(candidates, references)):
        if not isinstance(candidate, str):
            raise ValueError(
                f"image {index}: the candidate must be a string. "
                f"Received: {candidate!r}"
            )
        if not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(
                f"image {index}: references must be a non-empty list of "
                f"strings. Received: {refs!r}"
            )
    if tokenize:
        candidates = [ptb_tokenize(c) for c in candidates]
        references = [[ptb_tokenize(r) for r in refs] for refs in references]

    reference_counts = [
        [_ngram_counts(r, n) for r in refs] for refs in references
    ]
    document_frequency = collections.Counter()
    for counts in reference_counts:
        document_frequency.update(set().union(*counts))
    log_num_documents = math.log(len(references))

    def vector(counts):
        return _tfidf(counts, document_frequency, log_num_documents, n)

    per_image = []
    for candidate, counts in zip(candidates, reference_counts):
        candidate_vector = vector(_ngram_counts(candidate, n))
        total = sum(
            _similarity(candidate_vector, vector(c), n, sigma) for c in counts
        )
        per_image.append(10.0 * float(np.mean(total)) / len(counts))
    per_image = np.asarray(per_image)
    return float(per_image.mean()), per_image
