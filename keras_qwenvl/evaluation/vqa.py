"""Answer metrics of the VQA benchmarks, as the original scoring code computes them.

- `vqa_accuracy`: the official VQA v2 accuracy (VQAv2, OK-VQA, TextVQA,
  VizWiz), with its answer normalization `normalize_vqa_answer`.
- `anls`: average normalized Levenshtein similarity (DocVQA, InfographicVQA).
- `relaxed_accuracy`: ChartQA's 5% numeric tolerance.
- `exact_match`: case-insensitive string equality (OCR-VQA, AI2D, GQA).

Each function scores one sample; a benchmark's score is the mean over its
samples. Behaviours of the original code that change scores are kept on
purpose (they make numbers comparable with published ones) and are named in
each docstring.
"""

import re

import numpy as np

# Number words the VQA evaluator maps to digits (note "none" -> "0").
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset(("a", "an", "the"))
# Contractions written without their apostrophe, and the form the VQA
# evaluator restores (one "missing -> restored" pair per line). The keys
# with capitals never match: the text is lower-cased first, as in the
# original.
_CONTRACTIONS = dict(
    line.split()
    for line in """
    aint ain't
    arent aren't
    cant can't
    couldve could've
    couldnt couldn't
    couldn'tve couldn't've
    couldnt've couldn't've
    didnt didn't
    doesnt doesn't
    dont don't
    hadnt hadn't
    hadnt've hadn't've
    hadn'tve hadn't've
    hasnt hasn't
    havent haven't
    hed he'd
    hed've he'd've
    he'dve he'd've
    hes he's
    howd how'd
    howll how'll
    hows how's
    Id've I'd've
    I'dve I'd've
    Im I'm
    Ive I've
    isnt isn't
    itd it'd
    itd've it'd've
    it'dve it'd've
    itll it'll
    let's let's
    maam ma'am
    mightnt mightn't
    mightnt've mightn't've
    mightn'tve mightn't've
    mightve might've
    mustnt mustn't
    mustve must've
    neednt needn't
    notve not've
    oclock o'clock
    oughtnt oughtn't
    ow's'at 'ow's'at
    'ows'at 'ow's'at
    'ow'sat 'ow's'at
    shant shan't
    shed've she'd've
    she'dve she'd've
    she's she's
    shouldve should've
    shouldnt shouldn't
    shouldnt've shouldn't've
    shouldn'tve shouldn't've
    somebody'd somebodyd
    somebodyd've somebody'd've
    somebody'dve somebody'd've
    somebodyll somebody'll
    somebodys somebody's
    someoned someone'd
    someoned've someone'd've
    someone'dve someone'd've
    someonell someone'll
    someones someone's
    somethingd something'd
    somethingd've something'd've
    something'dve something'd've
    somethingll something'll
    thats that's
    thered there'd
    thered've there'd've
    there'dve there'd've
    therere there're
    theres there's
    theyd they'd
    theyd've they'd've
    they'dve they'd've
    theyll they'll
    theyre they're
    theyve they've
    twas 'twas
    wasnt wasn't
    wed've we'd've
    we'dve we'd've
    weve we've
    werent weren't
    whatll what'll
    whatre what're
    whats what's
    whatve what've
    whens when's
    whered where'd
    wheres where's
    whereve where've
    whod who'd
    whod've who'd've
    who'dve who'd've
    wholl who'll
    whos who's
    whove who've
    whyll why'll
    whyre why're
    whys why's
    wont won't
    wouldve would've
    wouldnt wouldn't
    wouldnt've wouldn't've
    wouldn'tve wouldn't've
    yall y'all
    yall'll y'all'll
    y'allll y'all'll
    yall'd've y'all'd've
    y'alld've y'all'd've
    y'all'dve y'all'd've
    youd you'd
    youd've you'd've
    you'dve you'd've
    youll you'll
    youre you're
    youve you've
    """.strip().splitlines()
)
# Punctuation the VQA evaluator removes or turns into a space. Apostrophes,
# colons and periods are not in the list (periods are handled apart).
_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
# A period not followed by a digit. (The original pattern also tries to
# exclude periods after a digit, but writes the look-behind as a
# look-ahead that always succeeds, so only this part has an effect.)
_PERIOD = re.compile(r"\.(?!\d)")
# The original passes `re.UNICODE` (= 32) as `count`, so at most 32
# periods of an answer are removed.
_MAX_PERIODS_REMOVED = 32
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")


def process_punctuation(text):
    """The VQA evaluator's punctuation step.

    Each mark of the punctuation list is deleted when it touches a space
    somewhere in the text (or when the text has a comma between digits,
    such as "100,978"), and is replaced by a space otherwise. Then periods
    not followed by a digit are deleted (decimals such as "3.5" survive).
    """
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    output = text
    for mark in _PUNCTUATION:
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            output = output.replace(mark, "")
        else:
            output = output.replace(mark, " ")
    return _PERIOD.sub("", output, count=_MAX_PERIODS_REMOVED)


def process_digit_article(text):
    """The VQA evaluator's word step: lower case, number words -> digits,
    articles dropped, missing apostrophes of contractions restored, words
    joined by single spaces."""
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(answer):
    """Normalizes a model answer as the official VQA evaluator does.

    Newlines and tabs become spaces, the answer is stripped, then
    `process_punctuation` and `process_digit_article` apply.

    Example:
    >>> normalize_vqa_answer("Two dogs.")
    '2 dogs'
    """
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def _check_answers(answers, name):
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(
            f"`{name}` must be a non-empty list of strings. "
            f"Received: {answers!r}"
        )
    return answers


def vqa_accuracy(prediction, answers):
    """Official VQA accuracy of one answer against the human answers.

    For each of the n leave-one-out subsets of the n human answers (n = 10
    in VQA v2), the accuracy is `min(matches / 3, 1)`, matches counted in
    the subset; the result is the mean over the subsets.

    As the official evaluator: only the prediction is fully normalized
    (`normalize_vqa_answer`); the human answers only get
    `process_punctuation`, and only when they are not all identical (they
    are neither lower-cased nor number-mapped). With a single human answer
    the only subset is empty, so the accuracy is 0.

    Args:
        prediction: the model's answer.
        answers: the human answers (strings).

    Returns:
        A float in [0, 1].
    """
    answers = _check_answers(answers, "answers")
    prediction = normalize_vqa_answer(prediction)
    if len(set(answers)) > 1:
        answers = [process_punctuation(answer) for answer in answers]
    matches = np.array([answer == prediction for answer in answers])
    others = matches.sum() - matches  # matches in each leave-one-out subset
    return float(np.mean(np.minimum(others / 3.0, 1.0)))


def levenshtein_distance(a, b):
    """Number of single-character insertions, deletions and substitutions
    that turn string `a` into string `b`."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(
                min(
                    previous[j] + 1,  # delete char_a
                    current[j - 1] + 1,  # insert char_b
                    previous[j - 1] + (char_a != char_b),  # substitute
                )
            )
        previous = current
    return previous[-1]


def anls(prediction, answers, threshold=0.5):
    """Average normalized Levenshtein similarity of one answer (DocVQA).

    Against each ground-truth answer: the edit distance between the two
    strings stripped, lower-cased and with runs of whitespace collapsed,
    divided by the length of the longer of the two *raw* strings (as the
    official DocVQA / InfographicVQA script does; two empty strings have
    distance 0). The score is one minus the smallest such value, and 0
    when it is below `threshold` (a score of exactly `threshold` is kept).

    Args:
        prediction: the model's answer.
        answers: the ground-truth answers (strings).
        threshold: scores below it count 0.

    Returns:
        A float in [0, 1].
    """
    answers = _check_answers(answers, "answers")

    def clean(text):
        return " ".join(text.strip().lower().split())

    values = []
    for answer in answers:
        length = max(len(answer.upper()), len(prediction.upper()))
        distance = levenshtein_distance(clean(answer), clean(prediction))
        values.append(distance / length if length else 0.0)
    score = 1.0 - min(values)
    return 0.0 if score < threshold else score


def _to_float(text):
    """ChartQA's number reading: "12.5" -> 12.5, "40%" -> 0.4, else None."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction, target, max_relative_change=0.05):
    """ChartQA's relaxed match of one answer against one target.

    When both read as numbers ("40%" reads as 0.4) and the prediction is not
    zero, the answer is right if `|target - prediction| / |prediction| <=
    max_relative_change`: the original evaluation passes the model answer
    as the function's "target" argument, so the model answer is the
    denominator. Otherwise the strings must be equal ignoring case.

    Args:
        prediction: the model's answer (stripped by the caller, as the
            original does).
        target: one ground-truth answer.
        max_relative_change: the tolerance, 5%.

    Returns:
        A bool.
    """
    predicted = _to_float(prediction)
    expected = _to_float(target)
    if expected is not None and predicted:
        return abs(expected - predicted) / abs(predicted) <= max_relative_change
    return target.lower() == prediction.lower()


def relaxed_accuracy(prediction, targets, max_relative_change=0.05):
    """1.0 if `relaxed_correctness` holds for any target, else 0.0."""
    targets = _check_answers(targets, "targets")
    return float(
        any(
            relaxed_correctness(prediction, target, max_relative_change)
            for target in targets
        )
    )


def exact_match(prediction, targets):
    """1.0 if the stripped, lower-cased answer equals a stripped,
    lower-cased target, else 0.0."""
    targets = _check_answers(targets, "targets")
    prediction = prediction.strip().lower()
    return float(any(prediction == t.strip().lower() for t in targets))
