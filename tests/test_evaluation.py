"""Evaluation: metrics against worked examples, generation, the command line.

Expected scores are worked out by hand in the tests (the arithmetic is
written next to them), from the published rules of each metric: the VQA
evaluation page and its official evaluator, the DocVQA ANLS script, the
ChartQA relaxed accuracy of the original repository, and coco-caption's
CIDEr-D. The model tests use the golden random checkpoint through
`from_preset` and compare with the original code's greedy outputs.
"""

import json
import math
import os
import shutil

import numpy as np
import PIL.Image
import pytest
from keras import ops

from keras_qwenvl import QwenVLCausalLM
from keras_qwenvl.evaluation import cider
from keras_qwenvl.evaluation import generation
from keras_qwenvl.evaluation import grounding
from keras_qwenvl.evaluation import runner
from keras_qwenvl.evaluation import tasks
from keras_qwenvl.evaluation import vqa

# === VQA accuracy ===


@pytest.mark.parametrize(
    "answer, expected",
    [
        # The processing steps listed on the VQA evaluation page
        # (visualqa.org/evaluation.html): lower case,
        ("Yes", "yes"),
        # periods removed except in decimals,
        ("yes.", "yes"),
        ("3.5", "3.5"),
        # number words to digits ("none" too, in the evaluator's map),
        ("two", "2"),
        ("None", "0"),
        # articles removed,
        ("the red one", "red 1"),
        ("A dog", "dog"),
        # missing apostrophes of contractions added,
        ("dont know", "don't know"),
        ("isnt", "isn't"),
        # punctuation (but not apostrophes or colons) replaced by a space,
        ("black-and-white", "black and white"),
        ("yes!", "yes"),
        ("12:30", "12:30"),
        # or removed when it touches a space or the answer has a comma
        # between digits ("100,978" stays one number).
        ("t - shirt", "t shirt"),
        ("100,978", "100978"),
        # Newlines and tabs are spaces; words end up single-spaced.
        ("  two\tdogs\n", "2 dogs"),
    ],
)
def test_normalize_vqa_answer(answer, expected):
    assert vqa.normalize_vqa_answer(answer) == expected


def test_vqa_accuracy_averages_the_leave_one_out_subsets():
    answers = ["2"] * 2 + ["two"] * 3 + ["3"] * 5
    # "Two" normalizes to "2", which 2 of the 10 humans said. In the 2
    # subsets without one of them 1 match is left (1/3), in the other 8
    # subsets both (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6 (the single
    # formula min(2/3, 1) would say 0.667).
    assert vqa.vqa_accuracy("Two", answers) == pytest.approx(0.6)
    # The human answers are not number-mapped: "two" matches nobody's "two"
    # once normalized to "2", so it scores as "2".
    assert vqa.vqa_accuracy("two", answers) == pytest.approx(0.6)
    # "3" was said 5 times: every subset keeps >= 4 matches -> 1.
    assert vqa.vqa_accuracy("3", answers) == pytest.approx(1.0)
    # 3 matches: 3 subsets keep 2 (2/3), 7 keep 3 (1) -> (2 + 7) / 10.
    three = ["red"] * 3 + ["blue"] * 7
    assert vqa.vqa_accuracy("Red.", three) == pytest.approx(0.9)
    assert vqa.vqa_accuracy("green", three) == 0.0


def test_vqa_accuracy_human_answers_only_get_punctuation_when_they_differ():
    # Ten identical answers are left as written, so the normalized
    # prediction "t shirt" never equals "t-shirt".
    assert vqa.vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
    # With one different answer all get punctuation handling: 9 "t shirt";
    # every subset keeps >= 8 matches -> 1.
    answers = ["t-shirt"] * 9 + ["shirt"]
    assert vqa.vqa_accuracy("t-shirt", answers) == 1.0
    # They are not lower-cased either.
    assert vqa.vqa_accuracy("yes", ["Yes"] * 9 + ["no"]) == 0.0


def test_vqa_accuracy_rejects_missing_answers():
    with pytest.raises(ValueError, match="`answers` must be a non-empty"):
        vqa.vqa_accuracy("yes", [])


# === ANLS, relaxed accuracy, exact match ===


def test_anls_worked_examples():
    # "hello wrld" -> "hello world": 1 insertion; the longer raw string
    # has 11 characters: 1 - 1/11.
    assert vqa.anls("Hello Wrld", ["hello world"]) == pytest.approx(10 / 11)
    # Whitespace and case do not count in the distance (0 edits) -> 1.
    assert vqa.anls("  The   Answer ", ["the answer"]) == 1.0
    # "abcd" vs "abxy": 2 substitutions / 4 = 0.5; 1 - 0.5 = 0.5 is not
    # below the threshold, so it is kept.
    assert vqa.anls("abcd", ["abxy"]) == pytest.approx(0.5)
    # 3 of 5: 1 - 3/5 = 0.4 < 0.5 -> 0.
    assert vqa.anls("abcde", ["abxyz"]) == 0.0
    # The best of several answers: "nine" vs "9" is 4 edits / 4 = 1 -> 0;
    # "nine" vs "nine" -> 1.
    assert vqa.anls("nine", ["9", "Nine"]) == 1.0
    # Empty against empty has distance 0 -> 1.
    assert vqa.anls("", [""]) == 1.0


def test_levenshtein_distance():
    assert vqa.levenshtein_distance("kitten", "sitting") == 3
    assert vqa.levenshtein_distance("", "abc") == 3
    assert vqa.levenshtein_distance("flaw", "lawn") == 2


def test_relaxed_accuracy_worked_examples():
    # |10 - 10.4| / 10.4 = 0.038 <= 0.05.
    assert vqa.relaxed_accuracy("10.4", ["10"]) == 1.0
    # The model answer is the denominator: |10 - 9.5| / 9.5 = 0.0526 >
    # 0.05 is wrong (with the target as denominator it would be 0.05).
    assert vqa.relaxed_accuracy("9.5", ["10"]) == 0.0
    # |10 - 10.5| / 10.5 = 0.0476 -> right.
    assert vqa.relaxed_accuracy("10.5", ["10"]) == 1.0
    # Percentages read as fractions: 50% = 0.5.
    assert vqa.relaxed_accuracy("50%", ["0.5"]) == 1.0
    # A zero answer falls back to string equality: "0" != "0.0".
    assert vqa.relaxed_accuracy("0", ["0.0"]) == 0.0
    # Text: equal ignoring case; any target may match.
    assert vqa.relaxed_accuracy("Yes", ["no", "yes"]) == 1.0
    assert vqa.relaxed_accuracy("Yes ", ["yes"]) == 0.0  # not stripped here


def test_exact_match():
    assert vqa.exact_match(" Paris ", ["paris"]) == 1.0
    assert vqa.exact_match("Paris", ["Lyon", "PARIS"]) == 1.0
    assert vqa.exact_match("Pari", ["Paris"]) == 0.0


# === Grounding ===


def test_parse_first_box_as_the_original():
    assert grounding.parse_first_box("(12,34),(560,780)</box>") == (
        12.0,
        34.0,
        560.0,
        780.0,
    )
    # The first pair wins; spaces inside a point are fine.
    assert grounding.parse_first_box("( 1, 2),(3,4) and (5,6),(7,8)") == (
        1.0,
        2.0,
        3.0,
        4.0,
    )
    # A space between the points, three numbers in a point, or no box at
    # all make the answer unreadable.
    assert grounding.parse_first_box("(1,2), (3,4)") is None
    assert grounding.parse_first_box("(1,2,3),(4,5)") is None
    assert grounding.parse_first_box("a dog") is None


def test_predicted_box_divides_by_999():
    # 999 is the far border: 999 / 999 * 500 = 500.
    np.testing.assert_array_equal(
        grounding.predicted_box("(0,999),(999,999)", (500, 400)),
        [0.0, 400.0, 500.0, 400.0],
    )
    # (333, 111) / 999 * (600, 900) = (200, 100).
    np.testing.assert_allclose(
        grounding.predicted_box("(333,111),(666,222)", (600, 900)),
        [200.0, 100.0, 400.0, 200.0],
        rtol=1e-6,
    )
    np.testing.assert_array_equal(
        grounding.predicted_box("no box", (600, 900)), [0, 0, 0, 0]
    )


def test_box_iou_worked_examples():
    # Two 100x100 squares shifted by 50: intersection 50 * 100 = 5000,
    # union 10000 + 10000 - 5000 = 15000.
    assert grounding.box_iou((0, 0, 100, 100), (50, 0, 150, 100)) == (
        pytest.approx(1 / 3)
    )
    # Inside: 100x60 in 100x100: 6000 / 10000.
    assert grounding.box_iou((0, 0, 100, 60), (0, 0, 100, 100)) == (
        pytest.approx(0.6)
    )
    assert grounding.box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert math.isnan(grounding.box_iou((0, 0, 0, 0), (5, 5, 5, 5)))


def test_grounding_accuracy_hits_at_iou_one_half():
    # On a 999x999 image text units are pixels: the target is the square
    # (0, 0)-(100, 100).
    size, target = (999, 999), (0, 0, 100, 100)
    assert grounding.grounding_accuracy("(0,0),(100,60)", target, size) == 1.0
    assert grounding.grounding_accuracy("(0,0),(100,40)", target, size) == 0.0
    # Unreadable answers count as (0, 0, 0, 0): a miss.
    assert grounding.grounding_accuracy("(0,0), (100,100)", target, size) == 0.0
    with pytest.raises(ValueError, match="`image_size` must be"):
        grounding.grounding_accuracy("(0,0),(1,1)", target, (0, 10))
    with pytest.raises(ValueError, match="`box_b` must be four"):
        grounding.grounding_accuracy("(0,0),(1,1)", (1, 2, 3), size)


# === CIDEr-D ===


def test_cider_d_two_images_by_hand():
    candidates = ["a dog runs", "a cat"]
    references = [["a dog runs fast", "the dog runs"], ["a cat sleeps"]]
    # Two images: idf = log(2) - log(df). "a" is in the references of both
    # images (idf 0); every other n-gram is in one (idf log 2 = L), so all
    # weights are 0 or L and L cancels in the cosines. Lengths are bigram
    # counts: 2 ("a dog runs"), 3, 2 / 1 ("a cat"), 2.
    # Image 1 vs "a dog runs fast" (length delta -1):
    #   1-grams: dog, runs shared: 2 / (sqrt(2) * sqrt(3)) ("a" weighs 0)
    #   2-grams: a dog, dog runs: 2 / (sqrt(2) * sqrt(3))
    #   3-grams: a dog runs: 1 / (1 * sqrt(2)); 4-grams: none -> 0
    # Image 1 vs "the dog runs" (delta 0):
    #   1-grams: 2 / (sqrt(2) * sqrt(3)); 2-grams: dog runs: 1 / 2;
    #   3-grams: 0; 4-grams: 0.
    penalty = math.exp(-(1**2) / (2 * 6.0**2))
    ref_1 = penalty * (2 / math.sqrt(6) + 2 / math.sqrt(6) + 1 / math.sqrt(2))
    ref_2 = 2 / math.sqrt(6) + 1 / 2
    image_1 = 10 * ((ref_1 + ref_2) / 4) / 2  # mean over n, over 2 refs
    # Image 2 vs "a cat sleeps" (delta -1): 1-grams: cat: 1 / sqrt(2);
    # 2-grams: a cat: 1 / sqrt(2); 3- and 4-grams: 0.
    image_2 = 10 * penalty * (2 / math.sqrt(2)) / 4
    score, per_image = cider.cider_d(candidates, references)
    np.testing.assert_allclose(per_image, [image_1, image_2], rtol=1e-12)
    assert score == pytest.approx((image_1 + image_2) / 2, rel=1e-12)
    assert score == pytest.approx(4.0085842, rel=1e-6)


def test_cider_d_clips_repeated_ngrams():
    # Two images so that idf is log 2 for every n-gram (none is shared).
    # "dog dog" vs "dog park": 1-grams: candidate vector (2L) on "dog",
    # reference (L, L); clipped dot min(2L, L) * L = L^2; norms 2L and
    # sqrt(2) L: 1 / (2 sqrt(2)). No shared 2-gram; lengths equal (1).
    _, per_image = cider.cider_d(
        ["dog dog", "cat"], [["dog park"], ["a cat"]], tokenize=False
    )
    assert per_image[0] == pytest.approx(10 * (1 / (2 * math.sqrt(2))) / 4)
    # A perfect caption of each image scores 10 (all four orders 1) when
    # no n-gram is shared between images.
    _, perfect = cider.cider_d(
        ["one two three four", "five six seven eight"],
        [["one two three four"], ["five six seven eight"]],
    )
    np.testing.assert_allclose(perfect, [10.0, 10.0])


def test_ptb_tokenize():
    assert cider.ptb_tokenize("A man's dog, running (fast).") == (
        "a man 's dog running fast"
    )
    assert cider.ptb_tokenize("Don't stop: 3.5 t-shirts!") == (
        "do n't stop 3.5 t-shirts"
    )


def test_cider_d_errors():
    with pytest.raises(ValueError, match="2 candidates but 1 reference"):
        cider.cider_d(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="image 0: references must be"):
        cider.cider_d(["a"], [[]])


# === Records ===


def _write_lines(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def test_grounding_records(tmp_path):
    image = tmp_path / "red.png"
    PIL.Image.new("RGB", (64, 48), "red").save(image)
    data = _write_lines(
        tmp_path / "ref.jsonl",
        [
            {"image": "red.png", "sent": "the square", "bbox": [1, 2, 30, 40]},
            {
                "image": "red.png",
                "sent": "the top",
                "bbox": [1, 2, 30, 40],
                "width": 640,
                "height": 480,
            },
        ],
    )
    task = tasks.get_task("grounding")
    samples = tasks.make_samples(
        tasks.read_records(data), task, image_root=str(tmp_path)
    )
    assert samples[0].prompt == "<img></img><ref>the square</ref><box>"
    assert samples[0].image == str(image)
    # The size comes from the file when the record has none.
    assert samples[0].reference == {
        "bbox": [1.0, 2.0, 30.0, 40.0],
        "image_size": [64, 48],
    }
    assert samples[1].reference["image_size"] == [640, 480]
    # COCO boxes: x, y, w, h.
    xywh = tasks.make_samples(
        tasks.read_records(data),
        task,
        image_root=str(tmp_path),
        bbox_format="xywh",
    )
    assert xywh[1].reference["bbox"] == [1.0, 2.0, 31.0, 42.0]


def test_record_errors_name_the_line(tmp_path):
    task = tasks.get_task("grounding")
    data = _write_lines(
        tmp_path / "a.jsonl", [{"image": "x.png", "bbox": [0] * 4}]
    )
    with pytest.raises(
        ValueError, match="line 1 of .*a.jsonl: the record has no 'sent'"
    ):
        tasks.make_samples(tasks.read_records(data), task)
    data = _write_lines(
        tmp_path / "b.jsonl",
        [{"image": "x.png", "sent": "s", "bbox": [0, 0, 1]}],
    )
    with pytest.raises(
        ValueError, match="line 1 .*'bbox' must be four numbers"
    ):
        tasks.make_samples(tasks.read_records(data), task)
    (tmp_path / "c.jsonl").write_text('{"image": "x.png"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 of .*c.jsonl: not valid JSON"):
        tasks.read_records(str(tmp_path / "c.jsonl"))
    vqa_task = tasks.get_task("vqa")
    one_answer = [("record 0", {"image": "x", "question": "q", "answer": "a"})]
    with pytest.raises(ValueError, match="record 0: VQA accuracy compares"):
        tasks.make_samples(one_answer, vqa_task)
    # Exact match scores a single answer; anls cannot replace grounding.
    assert tasks.make_samples(one_answer, vqa_task, metric="exact_match")
    with pytest.raises(ValueError, match="scored with 'grounding_accuracy'"):
        tasks.check_metric(task, "anls")
    with pytest.raises(ValueError, match="Unknown evaluation task 'ocr'"):
        tasks.get_task("ocr")
    choice = {"image": "x", "question": "q", "choices": ["a", "b"]}
    with pytest.raises(ValueError, match=r"'answer' is the index .* \[0, 2\)"):
        tasks.make_samples(
            [("record 0", dict(choice, answer=2))],
            tasks.get_task("multiple_choice"),
        )


def test_vqa_annotations_are_merged_by_question_id(tmp_path):
    data = _write_lines(
        tmp_path / "vqa.jsonl",
        [
            {
                "image": "a.jpg",
                "question": "What?",
                "question_id": 7,
                "answer": "x",
            }
        ],
    )
    annotations = tmp_path / "annotations.json"
    annotations.write_text(
        json.dumps(
            {
                "annotations": [
                    {
                        "question_id": 7,
                        "answers": [{"answer": "cat"}, {"answer": 2}],
                    }
                ]
            }
        )
    )
    records = tasks.read_records(data, annotations=str(annotations))
    samples = tasks.make_samples(records, tasks.get_task("vqa"))
    assert samples[0].prompt == "<img></img>What? Answer:"
    assert samples[0].reference == ["cat", "2"]
    annotations.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="question_id 7 is not in"):
        tasks.read_records(data, annotations=str(annotations))


def test_coco_caption_file_and_multiple_choice_prompt(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(
        json.dumps(
            {
                "images": [{"id": 3, "image": "a.jpg"}],
                "annotations": [
                    {"image_id": 3, "caption": "A cat."},
                    {"image_id": 3, "caption": "A kitten."},
                ],
            }
        )
    )
    records = tasks.read_records(str(path))
    (sample,) = tasks.make_samples(records, tasks.get_task("caption"))
    assert sample.prompt == "<img></img>Describe the image in English:"
    assert sample.reference == ["A cat.", "A kitten."]
    record = {
        "image": "a.jpg",
        "hint": "",
        "question": "Which is a fruit?",
        "choices": ["apple", "chair"],
        "answer": 0,
    }
    (sample,) = tasks.make_samples(
        [("record 0", record)], tasks.get_task("multiple_choice")
    )
    assert sample.prompt == (
        "<img></img>Context: N/A\nQuestion: Which is a fruit?\n"
        "Options: A. apple\nB. chair\nAnswer:"
    )
    assert sample.options == (" A", " B")
    assert sample.reference == "A"


# === Generation bounds ===


def _run_sampler(sampler, favour_stop):
    """Decodes 2 rows (prompt lengths 2 and 4, 12 positions) with fixed
    logits over 8 tokens: token 5 always beats the others except the stop
    token 7, which is the best when `favour_stop`, the worst otherwise."""
    scores = np.array(
        [0, 1, 1, 1, 1, 5, 1, 9 if favour_stop else -9], "float32"
    )

    def next(prompt, cache, index):
        logits = ops.tile(ops.convert_to_tensor(scores)[None], (2, 1))
        return logits, None, cache

    prompt = np.zeros((2, 12), "int32")
    mask = np.zeros((2, 12), "bool")
    prompt[0, :2], mask[0, :2] = 1, True
    prompt[1, :4], mask[1, :4] = 1, True
    output = sampler(
        next,
        ops.convert_to_tensor(prompt),
        index=2,
        mask=ops.convert_to_tensor(mask),
        stop_token_ids=(7,),
    )
    return ops.convert_to_numpy(output)


def test_bounded_sampler_keeps_min_and_max_new_tokens_per_row():
    sampler = generation.BoundedGreedySampler(
        max_new_tokens=5, min_new_tokens=3
    )
    # The stop token is excluded for 3 new tokens, then taken.
    output = _run_sampler(sampler, favour_stop=True)
    np.testing.assert_array_equal(output[0, :6], [1, 1, 5, 5, 5, 7])
    np.testing.assert_array_equal(output[1, :8], [1, 1, 1, 1, 5, 5, 5, 7])
    # Never chosen, the stop token is forced after 5 new tokens; decoding
    # ends once both rows stopped (positions 10 and 11 are untouched).
    output = _run_sampler(sampler, favour_stop=False)
    np.testing.assert_array_equal(output[0, :8], [1, 1, 5, 5, 5, 5, 5, 7])
    np.testing.assert_array_equal(
        output[1], [1, 1, 1, 1, 5, 5, 5, 5, 5, 7, 0, 0]
    )


def test_bounded_sampler_errors():
    with pytest.raises(ValueError, match=r"`min_new_tokens` an int in \[0"):
        generation.BoundedGreedySampler(max_new_tokens=2, min_new_tokens=3)
    sampler = generation.BoundedGreedySampler(max_new_tokens=2)
    with pytest.raises(ValueError, match="pass `stop_token_ids`"):
        sampler(None, ops.zeros((1, 4), "int32"), stop_token_ids=None)


def test_last_batch_is_filled_to_the_batch_size():
    prompts, images = ["a", "b", "c"], [["1"], ["2"], ["3"]]
    batches = list(generation._batches(prompts, images, 2, fill=True))
    assert batches == [
        {"prompts": ["a", "b"], "images": [["1"], ["2"]]},
        {"prompts": ["c", "c"], "images": [["3"], ["3"]]},
    ]
    # Fewer prompts than the batch size: one batch of them, not filled.
    (batch,) = generation._batches(prompts, None, 8, fill=True)
    assert batch == {"prompts": ["a", "b", "c"]}


def test_strip_special_tokens():
    assert (
        generation.strip_special_tokens(
            "<ref>a dog</ref><box>(1,2),(3,4)</box><|endoftext|>"
        )
        == "a dog(1,2),(3,4)"
    )


# === With the golden checkpoint ===


@pytest.fixture(scope="module")
def causal_lm(golden_hf_dir):
    return QwenVLCausalLM.from_preset(golden_hf_dir)


@pytest.fixture(scope="module")
def golden_cases(golden):
    return {case["name"]: case for case in golden["cases"]}


def test_batched_generation_matches_the_original(
    causal_lm, golden, golden_cases
):
    # The golden case (272 tokens) between a shorter and a longer prompt:
    # it generates while the longer prompt is still read, and its own
    # prompt is read while the shorter one generates. It must get the
    # original's greedy tokens (whose top-2 margins are all above the
    # golden tolerance of 1e-3).
    case = golden_cases["grounded_caption"]
    image = os.path.join(golden["images_dir"], "coffee.png")
    prompts = [
        "<img></img>What is in the picture?",
        case["text"],
        case["text"] + " a cup of coffee on a saucer",
    ]
    tokenizer = causal_lm.preprocessor.tokenizer
    lengths = [len(ids) for ids in tokenizer.tokenize(prompts)]
    assert lengths[0] < lengths[1] == len(case["input_ids"]) < lengths[2]
    answers = generation.generate_answers(
        causal_lm,
        prompts,
        images=[[image]] * 3,
        batch_size=3,
        max_new_tokens=8,
    )
    expected = tokenizer.detokenize(case["greedy_new_ids"][:8]).strip()
    assert answers[1] == expected


def test_score_options_match_separate_forward_passes(causal_lm, golden):
    images_dir = golden["images_dir"]
    prompts = [
        (
            "<img></img>Context: N/A\nQuestion: What is shown?\nOptions: "
            "A. a cup\nB. a rocket\nC. a dog\nAnswer:"
        ),
        "<img></img>Is it a rocket? Answer:",
    ]
    images = [
        [os.path.join(images_dir, "coffee.png")],
        [os.path.join(images_dir, "rocket.jpg")],
    ]
    options = [[" A", " B", " C"], [" yes", " no, it is not"]]
    scores = generation.score_options(
        causal_lm, prompts, options, images=images, batch_size=2
    )
    # Reference: each option alone (right-padded to one common length,
    # which a causal model ignores), full logits, log-softmax in numpy,
    # the mean over the option's tokens.
    preprocessor = causal_lm.preprocessor
    tokenizer = preprocessor.tokenizer
    length = 300
    assert len(tokenizer.tokenize(options[1][1])) > 1  # several tokens
    for prompt, sample_images, choices, got in zip(
        prompts, images, options, scores
    ):
        prompt_ids = tokenizer.tokenize(prompt)
        pixels = preprocessor.generate_preprocess(
            {"prompts": [prompt], "images": [sample_images]},
            sequence_length=len(prompt_ids),
        )["images"]
        expected = []
        for choice in choices:
            option_ids = tokenizer.tokenize(choice)
            row = prompt_ids + option_ids
            ids = np.full((1, length), tokenizer.pad_token_id, "int32")
            ids[0, : len(row)] = row
            logits = ops.convert_to_numpy(
                causal_lm(
                    {
                        "token_ids": ids,
                        "padding_mask": np.arange(length)[None] < len(row),
                        "images": ops.convert_to_numpy(pixels),
                    }
                )
            )[0].astype("float64")
            log_probs = []
            for j, token in enumerate(option_ids):
                # Position len(prompt) + j - 1 predicts option token j;
                # log softmax = logit - log(sum(exp(logits))).
                step = logits[len(prompt_ids) + j - 1]
                top = step.max()
                log_norm = top + np.log(np.sum(np.exp(step - top)))
                log_probs.append(step[token] - log_norm)
            expected.append(np.mean(log_probs))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_evaluate_multiple_choice_picks_the_likeliest(monkeypatch):
    records = [
        {
            "image": "a.jpg",
            "question": "Which?",
            "choices": ["x", "y", "z"],
            "answer": 1,
        },
        {
            "image": "b.jpg",
            "question": "Really?",
            "choices": ["yes", "no"],
            "answer": 1,
        },
    ]
    calls = []

    def fake_score_options(causal_lm, prompts, options, images, batch_size):
        calls.append((prompts, options, images, batch_size))
        return [np.array([-3.0, -1.0, -2.0]), np.array([-0.5, -4.0])]

    monkeypatch.setattr(generation, "score_options", fake_score_options)
    results, summary = runner.evaluate(
        None, records, "multiple_choice", batch_size=4, image_root="imgs"
    )
    prompts, options, images, batch_size = calls[0]
    assert prompts[1] == (
        "<img></img>Context: N/A\nQuestion: Really?\nOptions: A. yes\nB. no"
        "\nAnswer:"
    )
    assert options == [(" A", " B", " C"), (" A", " B")]
    assert images == [
        [os.path.join("imgs", "a.jpg")],
        [os.path.join("imgs", "b.jpg")],
    ]
    assert batch_size == 4
    # The likeliest options are B (right) and A (wrong): accuracy 1/2.
    assert [r["prediction"] for r in results] == ["B", "A"]
    assert [r["reference"] for r in results] == ["B", "B"]
    assert [r["score"] for r in results] == [1.0, 0.0]
    assert results[0]["option_log_likelihoods"] == [-3.0, -1.0, -2.0]
    assert summary["score"] == 0.5 and summary["metric"] == "accuracy"


def test_command_line_grounding_end_to_end(golden, golden_hf_dir, tmp_path):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    PIL.Image.new("RGB", (80, 60), (200, 30, 30)).save(images_dir / "red.png")
    for name in ("coffee.png", "rocket.jpg"):
        shutil.copy(os.path.join(golden["images_dir"], name), images_dir)
    records = [
        {
            "image": "coffee.png",
            "sent": "the cup",
            "bbox": [150, 60, 450, 380],
            "width": 600,
            "height": 400,
        },
        {
            "image": "rocket.jpg",
            "sent": "the rocket",
            "bbox": [250, 20, 380, 400],
        },
        {"image": "red.png", "sent": "the red square", "bbox": [0, 0, 80, 60]},
    ]
    data = _write_lines(tmp_path / "refcoco_val.jsonl", records)
    out = tmp_path / "out"
    status = runner.main(
        [
            "--preset",
            golden_hf_dir,
            "--data",
            data,
            "--task",
            "grounding",
            "--out",
            str(out),
            "--image-root",
            str(images_dir),
            "--batch-size",
            "2",
            "--max-new-tokens",
            "5",
        ]
    )
    assert status == 0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    results = [json.loads(line) for line in lines]
    summary = json.loads((out / "score.json").read_text())
    assert [r["index"] for r in results] == [0, 1, 2]
    assert [r["image"] for r in results] == [
        "coffee.png",
        "rocket.jpg",
        "red.png",
    ]
    assert results[0]["prompt"] == "<img></img><ref>the cup</ref><box>"
    # The rocket's size was read from its file.
    assert results[1]["reference"]["image_size"] == [640, 427]
    for result, record in zip(results, records):
        size = result["reference"]["image_size"]
        assert result["score"] == grounding.grounding_accuracy(
            result["prediction"], record["bbox"], size
        )
    assert summary["task"] == "grounding"
    assert summary["metric"] == "grounding_accuracy"
    assert summary["num_samples"] == 3
    assert summary["max_new_tokens"] == 5 and summary["min_new_tokens"] == 5
    assert summary["score"] == pytest.approx(
        np.mean([r["score"] for r in results])
    )


def test_command_line_checks_records_before_loading(tmp_path):
    data = _write_lines(
        tmp_path / "bad.jsonl", [{"image": "a.jpg", "question": "q"}]
    )
    with pytest.raises(
        ValueError,
        match="line 1 of .*bad.jsonl: the record has no ground truth",
    ):
        runner.main(
            [
                "--preset",
                str(tmp_path / "missing"),
                "--data",
                data,
                "--task",
                "docvqa",
                "--out",
                str(tmp_path / "out"),
            ]
        )
    with pytest.raises(SystemExit):
        runner.main(
            ["--preset", "p", "--data", data, "--task", "ocr", "--out", "o"]
        )
