"""ChatML helpers and QwenVLCausalLMPreprocessor.

Most tests use a byte-level vocabulary of 256 ranks written to a temporary
file (every byte its own token, so a text's ids are its UTF-8 bytes and the
special tokens start at id 256); the golden tests use the real vocabulary.
"""

import base64
import copy
import os

import keras
import numpy as np
import PIL.Image
import pytest

from keras_qwenvl import chat_format
from keras_qwenvl.causal_lm_preprocessor import QwenVLCausalLMPreprocessor
from keras_qwenvl.image_converter import QwenVLImageConverter
from keras_qwenvl.tokenizer import QwenVLTokenizer

IMAGE_SIZE = 28
SPAN = 256  # positions between `<img>` and `</img>`


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocabulary") / "bytes.tiktoken"
    path.write_text(
        "".join(
            f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)
        )
    )
    return QwenVLTokenizer(vocabulary=str(path))


@pytest.fixture(scope="module")
def converter():
    return QwenVLImageConverter(image_size=(IMAGE_SIZE, IMAGE_SIZE))


@pytest.fixture(scope="module")
def preprocessor(tokenizer, converter):
    return QwenVLCausalLMPreprocessor(
        tokenizer, converter, sequence_length=600
    )


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Two PNG files of random pixels, and a file that is not an image."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, shape in (("a.png", (40, 30, 3)), ("b.png", (20, 50, 3))):
        pixels = rng.integers(0, 256, shape, dtype="uint8")
        PIL.Image.fromarray(pixels).save(folder / name)
    (folder / "bad.png").write_bytes(b"this is not a png")
    return str(folder)


def numpy(tree):
    return keras.tree.map_structure(keras.ops.convert_to_numpy, tree)


def ids_of(tokenizer, *pieces):
    """Ids written by hand: a str is its UTF-8 bytes (byte vocabulary), a
    special token name in angle brackets its id."""
    ids = []
    for piece in pieces:
        if piece.startswith("<") and piece.endswith(">"):
            ids.append(tokenizer.token_to_id(piece))
        else:
            ids.extend(piece.encode("utf-8"))
    return ids


def random_image(seed, shape=(33, 21, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype="uint8")


# ChatML and pictures.

TWO_TURN_CHAT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nPicture 1: <img>coffee.png</img>\n"
    "Picture 2: <img></img>\nWhat are these?<|im_end|>\n"
    "<|im_start|>assistant\nA coffee and a rocket.<|im_end|>\n"
    "<|im_start|>user\nPicture 3: <img>dog.jpg</img>\n"
    "And this one?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_chat_prompt_two_images_two_turns():
    pixels = random_image(0)
    first = chat_format.build_chat_prompt(
        "What are these?", images=["coffee.png", pixels]
    )
    assert first.query == (
        "Picture 1: <img>coffee.png</img>\nPicture 2: <img></img>\n"
        "What are these?"
    )
    reply = "A coffee and a rocket."
    history = [(first.query, reply, ["coffee.png", pixels])]
    second = chat_format.build_chat_prompt(
        "And this one?", history=history, images=["dog.jpg"]
    )
    assert second.prompt == TWO_TURN_CHAT
    assert second.images[0] == "coffee.png"
    assert second.images[1] is pixels
    assert second.images[2] == "dog.jpg"
    # A history without images reads the paths from the tags.
    path_history = [("Picture 1: <img>x.png</img>\nHi", "Hello.")]
    chat = chat_format.build_chat_prompt("More?", history=path_history)
    assert chat.images == ["x.png"]
    assert chat.prompt.endswith(
        "<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_prompt_matches_the_golden_chat_case(golden):
    case = golden["cases"][1]  # chat_two_images
    question = (
        "第二张图里的<ref>火箭</ref><box>(412,80),(590,912)</box>是什么颜色？"
    )
    chat = chat_format.build_chat_prompt(question, images=case["images"])
    assert chat.prompt == case["text"]
    assert chat.images == case["images"]


def test_chat_prompt_errors():
    two_tags = "<img>a</img><img>b</img>"
    with pytest.raises(
        ValueError, match=r"history entry 0: `<img>` tag 1 has no image \(1 "
    ):
        chat_format.build_chat_prompt("q", history=[(two_tags, "r", ["a"])])
    with pytest.raises(ValueError, match="entry 0: `<img>` tag 0 is empty"):
        chat_format.build_chat_prompt("q", history=[("<img></img>", "r")])
    with pytest.raises(ValueError, match="entry 0 must be `\\(query, resp"):
        chat_format.build_chat_prompt("q", history=[("only a query",)])
    with pytest.raises(ValueError, match="`<img>` at character 2 is not"):
        chat_format.build_chat_prompt("a <img>x.png")


def test_find_image_tags():
    assert chat_format.find_image_tags("no tags") == []
    tags = chat_format.find_image_tags("<img>a b</img> x <img></img>")
    assert tags == ["a b", ""]
    with pytest.raises(ValueError, match="`<img>` at character 15 is not"):
        chat_format.find_image_tags("<img>a</img> x <img>b")
    with pytest.raises(ValueError, match="`</img>` at character 3 has no"):
        chat_format.find_image_tags("x y</img>")


def test_conversation_segments_text_and_loss():
    conversation = [
        {"from": "user", "value": "Picture 1: <img>a.png</img>\nWhat?"},
        {"from": "assistant", "value": "A cat."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes."},
    ]
    segments = chat_format.conversation_segments(conversation)
    assert "".join(text for text, _ in segments) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <img>a.png</img>\nWhat?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nSure?<|im_end|>\n"
        "<|im_start|>assistant\nYes.<|im_end|>\n"
    )
    # The original's labels: every turn's special tokens, and the replies.
    turn_marks = ["<|im_start|>", "<|im_end|>", "\n"]
    assert [text for text, loss in segments if loss] == (
        turn_marks * 2
        + ["<|im_start|>", "A cat.", "<|im_end|>", "\n"]
        + turn_marks
        + ["<|im_start|>", "Yes.", "<|im_end|>", "\n"]
    )
    custom = chat_format.conversation_segments(
        conversation, system_prompt="Be brief."
    )
    assert custom[2] == ("Be brief.", False)


USER_A = {"from": "user", "value": "a"}
ASSISTANT_B = {"from": "assistant", "value": "b"}


@pytest.mark.parametrize(
    "conversation, match",
    [
        ([], "non-empty list of turns"),
        (
            [ASSISTANT_B],
            "turn 0 of the conversation has role 'assistant' where 'user'",
        ),
        (
            [USER_A, USER_A],
            "turn 1 of the conversation has role 'user' where 'assistant'",
        ),
        (
            [USER_A, {"from": "gpt", "value": "b"}],
            "turn 1 of the conversation has role 'gpt'",
        ),
        (
            [USER_A, ASSISTANT_B, USER_A],
            "turn 2 of the conversation is a user turn with no assistant",
        ),
        (
            [{"from": "user", "text": "a"}],
            "turn 0 of the conversation has none of the keys 'value' / ",
        ),
        (
            [{"from": "user", "value": 3}],
            "turn 0 of the conversation: the content must be a string",
        ),
        (["hi"], "turn 0 of the conversation must be a dict"),
    ],
)
def test_conversation_errors_name_the_turn(conversation, match):
    with pytest.raises(ValueError, match=match):
        chat_format.conversation_segments(conversation)


# Texts, prompts and responses.


def test_plain_text_single_and_batch(tokenizer, preprocessor):
    x, y, weight = numpy(preprocessor("Hi!", sequence_length=6))
    end, pad = tokenizer.end_token_id, tokenizer.pad_token_id
    assert sorted(x) == ["images", "padding_mask", "token_ids"]
    np.testing.assert_array_equal(x["token_ids"], [72, 105, 33, end, pad, pad])
    np.testing.assert_array_equal(x["padding_mask"], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(y, [105, 33, end, pad, pad, pad])
    np.testing.assert_array_equal(weight, [1, 1, 1, 0, 0, 0])
    assert x["images"].shape == (0, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert x["token_ids"].dtype == "int32"
    assert x["padding_mask"].dtype == "bool"
    assert weight.dtype == "float32"

    x, y, weight = numpy(preprocessor(["Hi!", "Hello"], sequence_length=6))
    assert x["token_ids"].shape == (2, 6)
    assert x["images"].shape == (2, 0, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_array_equal(x["token_ids"][1], list(b"Hello") + [end])
    np.testing.assert_array_equal(weight[1], [1, 1, 1, 1, 1, 0])


def test_plain_text_is_truncated_keeping_the_end_token(
    tokenizer, preprocessor
):
    x, y, weight = numpy(preprocessor("abcdefghij", sequence_length=5))
    end = tokenizer.end_token_id
    np.testing.assert_array_equal(x["token_ids"], list(b"abcde"))
    np.testing.assert_array_equal(y, list(b"bcde") + [end])
    np.testing.assert_array_equal(weight, [1, 1, 1, 1, 1])


def test_without_end_token(tokenizer, converter):
    preprocessor = QwenVLCausalLMPreprocessor(
        tokenizer, converter, sequence_length=5, add_end_token=False
    )
    x, y, weight = numpy(preprocessor("abc"))
    pad = tokenizer.pad_token_id
    np.testing.assert_array_equal(x["token_ids"], list(b"abc") + [pad, pad])
    np.testing.assert_array_equal(y, list(b"bc") + [pad] * 3)
    np.testing.assert_array_equal(weight, [1, 1, 0, 0, 0])


def test_prompts_and_responses_weight_the_response_and_end(
    tokenizer, preprocessor
):
    x, y, weight = numpy(
        preprocessor(
            {"prompts": ["Q: 1+1?", "Hi"], "responses": [" 2", " Yo!"]},
            sequence_length=10,
        )
    )
    end = tokenizer.end_token_id
    np.testing.assert_array_equal(
        x["token_ids"][0], list(b"Q: 1+1? 2") + [end]
    )
    # Labels of positions 6..8 are " ", "2", end.
    np.testing.assert_array_equal(weight[0], [0] * 6 + [1, 1, 1, 0])
    np.testing.assert_array_equal(weight[1], [0, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    single = numpy(
        preprocessor({"prompts": "Hi", "responses": " Yo!"}, sequence_length=10)
    )
    np.testing.assert_array_equal(single[2], weight[1])


# Conversations.


def test_conversation_loss_token_by_token(tokenizer, preprocessor):
    sample = {
        "id": "identity_0",
        "conversations": [
            {"from": "user", "value": "hi"},
            {"from": "assistant", "value": "yo"},
        ],
    }
    x, y, weight = numpy(preprocessor(sample, sequence_length=80))
    # Hand-written ChatML with the original's labels: the loss is on "yo"
    # and on every `<|im_start|>`, `<|im_end|>` and the newline after it.
    pieces = [
        ("<|im_start|>", 1),
        ("system\nYou are a helpful assistant.", 0),
        ("<|im_end|>", 1),
        ("\n", 1),
        ("<|im_start|>", 1),
        ("user\nhi", 0),
        ("<|im_end|>", 1),
        ("\n", 1),
        ("<|im_start|>", 1),
        ("assistant\n", 0),
        ("yo", 1),
        ("<|im_end|>", 1),
        ("\n", 1),
    ]
    ids, labelled = [], []
    for text, loss in pieces:
        piece = ids_of(tokenizer, text)
        ids += piece
        labelled += [loss] * len(piece)
    pad = tokenizer.pad_token_id
    expected_ids = ids + [pad] * (81 - len(ids))  # no end token
    np.testing.assert_array_equal(x["token_ids"], expected_ids[:-1])
    np.testing.assert_array_equal(y, expected_ids[1:])
    # Position t predicts token t + 1 (the first token has no prediction).
    expected_weight = np.zeros(80)
    expected_weight[: len(ids) - 1] = labelled[1:]
    np.testing.assert_array_equal(weight, expected_weight)
    np.testing.assert_array_equal(x["padding_mask"], np.arange(80) < len(ids))


def test_conversation_input_forms_agree(preprocessor):
    first = [
        {"from": "user", "value": "<img></img>What?"},
        {"from": "assistant", "value": "A cat."},
    ]
    second = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye."},
    ]
    image = random_image(1)
    as_list = numpy(
        preprocessor(
            [
                {"id": "0", "conversations": first, "images": [image]},
                {"id": "1", "conversations": second},
            ]
        )
    )
    as_columns = numpy(
        preprocessor(
            {"conversations": [first, second], "images": [[image], []]}
        )
    )
    single = numpy(preprocessor({"conversations": second}))
    keras.tree.map_structure(np.testing.assert_array_equal, as_list, as_columns)
    for batched, unbatched in zip(
        keras.tree.flatten(as_list), keras.tree.flatten(single)
    ):
        if batched.ndim == 5:  # images: one slot in the batch, none here
            np.testing.assert_array_equal(batched[1], 0)
            assert unbatched.shape == (0, IMAGE_SIZE, IMAGE_SIZE, 3)
        else:
            np.testing.assert_array_equal(batched[1], unbatched)


def test_conversation_weights_decode_to_the_replies(tokenizer, preprocessor):
    conversation = [
        {"from": "user", "value": "Picture 1: <img></img>\nWhat?"},
        {
            "from": "assistant",
            "value": "<ref>A cat</ref><box>(1,2),(500,600)</box>",
        },
        {"from": "user", "value": " And?"},
        {"from": "assistant", "value": "\n\nNothing."},
    ]
    x, y, weight = numpy(
        preprocessor(
            {"conversations": conversation, "images": [random_image(2)]}
        )
    )
    # Every turn's special tokens (after the first, which nothing predicts)
    # and the replies.
    marks = "<|im_end|>\n<|im_start|>"
    assert tokenizer.detokenize(y[weight > 0].tolist()) == (
        f"{marks}{marks}<ref>A cat</ref><box>(1,2),(500,600)</box>"
        f"{marks}{marks}\n\nNothing.<|im_end|>\n"
    )


# Images.


def test_images_fill_tags_in_order_and_spans_carry_no_loss(
    tokenizer, converter, preprocessor
):
    images = [random_image(3), random_image(4, (10, 60, 3))]
    x, y, weight = numpy(
        preprocessor(
            {
                "prompts": ["a<img></img>b", "<img>kept text</img><img></img>"],
                "responses": ["c", "d"],
                "images": [[images[0]], images],
            },
        )
    )
    start, stop = tokenizer.image_start_token_id, tokenizer.image_end_token_id
    pad = tokenizer.image_pad_token_id
    span = [start] + [pad] * SPAN + [stop]
    np.testing.assert_array_equal(
        x["token_ids"][0, : SPAN + 6],
        [97] + span + [98, 99, tokenizer.end_token_id],
    )
    kept = list(b"kept text")
    np.testing.assert_array_equal(
        x["token_ids"][1, : 2 * SPAN + 4],
        [start] + kept + [pad] * (SPAN - len(kept)) + [stop] + span,
    )
    # Slots in tag order; sample 0's second slot is unused (zeros).
    assert x["images"].shape == (2, 2, IMAGE_SIZE, IMAGE_SIZE, 3)
    slots = ((0, 0, images[0]), (1, 0, images[0]), (1, 1, images[1]))
    for row, slot, image in slots:
        expected = keras.ops.convert_to_numpy(converter(image))
        np.testing.assert_allclose(x["images"][row, slot], expected, atol=1e-6)
    np.testing.assert_array_equal(x["images"][0, 1], 0)
    # Only "c" (position 259 -> 260) and the end token carry loss.
    assert np.flatnonzero(weight[0]).tolist() == [SPAN + 3, SPAN + 4]


def test_weights_around_an_image_span(preprocessor, image_dir):
    text = "a<img>a.png</img>b"
    from_path = numpy(preprocessor(text, image_dir=image_dir))
    with PIL.Image.open(os.path.join(image_dir, "a.png")) as image:
        pixels = np.asarray(image)
    # The same text as a response (an empty prompt), its image passed.
    from_array = numpy(
        preprocessor(
            {"prompts": [""], "responses": [text], "images": [[pixels]]}
        )
    )
    for loaded, passed in zip(
        keras.tree.flatten(from_path), keras.tree.flatten(from_array)
    ):
        np.testing.assert_allclose(loaded, passed[0], atol=1e-6)
    # 0: "a" -> <img> has loss; positions 1..257 predict a span position or
    # `</img>` from inside the span: none; </img> -> "b" and "b" -> end do.
    weight = from_path[2].tolist()
    assert weight[: SPAN + 4] == [1] + [0] * (SPAN + 1) + [1, 1]
    assert sum(weight) == 3


def test_image_paths_and_image_dir(preprocessor, image_dir):
    text = "Picture 1: <img>a.png</img>\nPicture 2: <img>b.png</img>\nHi"
    by_tags = numpy(preprocessor(text, image_dir=image_dir))[0]["images"]
    assert by_tags.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert not np.allclose(by_tags[0], by_tags[1])
    # Strings passed as images resolve against image_dir too; absolute
    # paths are kept.
    images = ["a.png", os.path.join(image_dir, "b.png")]
    by_list = numpy(
        preprocessor(
            {"prompts": text, "responses": "", "images": images},
            image_dir=image_dir,
        )
    )[0]["images"]
    np.testing.assert_array_equal(by_tags, by_list)
    # The constructor's image_dir is the default.
    with_dir = QwenVLCausalLMPreprocessor(
        preprocessor.tokenizer,
        preprocessor.image_converter,
        image_dir=image_dir,
    )
    np.testing.assert_array_equal(numpy(with_dir(text))[0]["images"], by_tags)


# Errors: each names the sample.

ONE_IMAGE = [np.zeros((4, 4, 3))]
GOOD_CONVERSATION = {"conversations": [USER_A, ASSISTANT_B]}


@pytest.mark.parametrize(
    "inputs, error, match",
    [
        (
            ["fine", "bad <img>x.png"],
            ValueError,
            "sample 1: unclosed image tag: `<img>` at character 4 is not",
        ),
        (
            ["fine", "bad x.png</img>"],
            ValueError,
            "sample 1: unclosed image tag: `</img>` at character 9 has no",
        ),
        (
            ["ok", "<img>missing.png</img>"],
            FileNotFoundError,
            r"(?s)sample 1, image 0: .*No such image file: '.*missing.png'",
        ),
        (
            ["<img>bad.png</img>"],
            ValueError,
            r"(?s)sample 0, image 0: .*'.*bad.png' is corrupt",
        ),
        (
            ["x", "<img>a.png</img><img></img>"],
            ValueError,
            "sample 1: `<img>` tag 1 is empty and no image was passed",
        ),
        (
            {
                "prompts": ["<img></img>"],
                "responses": ["x"],
                "images": [ONE_IMAGE * 2],
            },
            ValueError,
            "sample 0: 2 images were passed but the text has only 1 `<img>`",
        ),
        (
            {
                "prompts": ["<img></img><img></img>"],
                "responses": ["x"],
                "images": [ONE_IMAGE],
            },
            ValueError,
            r"sample 0: `<img>` tag 1 has no image \(1 images passed for 2",
        ),
        (
            ["ok", "<ref>a</ref><box>(1,2),(3,1000)</box>"],
            ValueError,
            r"sample 1: box out of range: '<box>\(1,2\),\(3,1000\)</box>'",
        ),
        (
            {"prompts": ["a"], "responses": ["<box>(1,2),(3, 4)</box>"]},
            ValueError,
            "sample 0: malformed box",
        ),
        (
            ["<img>" + "x" * 300 + "</img>"],
            ValueError,
            "sample 0: The image reference .* is 300 bytes long",
        ),
        (
            {
                "prompts": ["a", "b"],
                "responses": ["c", "d"],
                "images": [[], [], []],
            },
            ValueError,
            "'images' must have one entry per sample: 2 samples but 3",
        ),
        (
            {"prompts": ["a", "b"], "responses": ["c"]},
            ValueError,
            "2 prompts but 1 responses",
        ),
        ({"prompts": ["a"]}, ValueError, "needs 'responses'"),
        (
            {"text": ["a"]},
            ValueError,
            "needs 'prompts' and 'responses', or 'conversations'",
        ),
        (
            [GOOD_CONVERSATION, {"id": 1}],
            ValueError,
            "sample 1: a list of dicts must hold conversations",
        ),
        (
            [GOOD_CONVERSATION, {"conversations": [USER_A, USER_A]}],
            ValueError,
            "sample 1: turn 1 of the conversation has role 'user' where "
            "'assistant' was expected",
        ),
        (["ok", 3], ValueError, "sample 1: `x` must hold strings"),
        (3, ValueError, "`x` must be a string or a list of strings"),
    ],
)
def test_call_errors(preprocessor, image_dir, inputs, error, match):
    with pytest.raises(error, match=match):
        preprocessor(inputs, image_dir=image_dir)


def test_image_span_is_never_truncated(preprocessor):
    with pytest.raises(
        ValueError,
        match=r"sample 1: image 0 spans tokens 3-260, which does not fit in "
        r"sequence_length=100 \(the sample has 261 tokens\)",
    ):
        preprocessor(
            {
                "prompts": ["ok", "abc<img></img>"],
                "responses": ["", ""],
                "images": [[], ONE_IMAGE],
            },
            sequence_length=100,
        )
    # A span after the cut would be dropped: also an error.
    with pytest.raises(ValueError, match="sample 0: image 0 spans tokens 120"):
        preprocessor(
            {
                "prompts": ["x" * 120 + "<img></img>"],
                "responses": ["y"],
                "images": [ONE_IMAGE],
            },
            sequence_length=100,
        )
    # `</img>` as the last input position fits.
    x, _, _ = numpy(
        preprocessor(
            {
                "prompts": ["a<img></img>"],
                "responses": [""],
                "images": [ONE_IMAGE],
            },
            sequence_length=SPAN + 3,
        )
    )
    end = preprocessor.tokenizer.image_end_token_id
    assert x["token_ids"][0, -1] == end


def test_labels_cannot_be_passed(preprocessor):
    with pytest.raises(ValueError, match="`y` and `sample_weight` must be"):
        preprocessor(["a"], y=np.array([1]))


def test_text_only_preprocessor(tokenizer):
    preprocessor = QwenVLCausalLMPreprocessor(tokenizer, sequence_length=8)
    x, y, weight = numpy(preprocessor(["abc"]))
    assert sorted(x) == ["padding_mask", "token_ids"]
    with pytest.raises(
        ValueError,
        match="sample 0: the text has 1 `<img>` tags but this preprocessor "
        "has no image converter",
    ):
        preprocessor(["<img>a.png</img>"])


def test_cannot_be_traced_by_tensorflow(preprocessor):
    tf = pytest.importorskip("tensorflow")

    @tf.function
    def traced():
        return preprocessor("abc")

    with pytest.raises(RuntimeError, match="cannot be traced inside `tf.data`"):
        traced()


# Generation.


def test_generate_preprocess_and_postprocess_round_trip(
    tokenizer, preprocessor, image_dir
):
    prompts = [
        "Picture 1: <img>a.png</img>\n<ref>the dog</ref>"
        "<box>(1,2),(300,400)</box> and <quad>(1,2),(3,4),(5,6),(7,8)</quad>",
        "<img>b.png</img><ref>a cat</ref><box>",
    ]
    inputs = numpy(
        preprocessor.generate_preprocess(
            prompts, sequence_length=600, image_dir=image_dir
        )
    )
    assert inputs["token_ids"].shape == (2, 600)
    assert inputs["images"].shape == (2, 1, IMAGE_SIZE, IMAGE_SIZE, 3)
    lengths = inputs["padding_mask"].sum(axis=1)
    padding = np.arange(600) >= lengths[:, None]
    assert (inputs["token_ids"][padding] == tokenizer.pad_token_id).all()
    assert preprocessor.generate_postprocess(inputs) == prompts

    # Generated ids after the prompt: stop tokens and masked positions go.
    token_ids = inputs["token_ids"].copy()
    mask = inputs["padding_mask"].copy()
    new = ids_of(tokenizer, "(5,6),(7,8)", "</box>", "<|im_end|>")
    row, start = 1, lengths[1]
    token_ids[row, start : start + len(new)] = new
    mask[row, start : start + len(new)] = True
    token_ids[row, start + len(new)] = 120  # "x" after the stop, masked
    texts = preprocessor.generate_postprocess(
        {"token_ids": token_ids, "padding_mask": mask}
    )
    assert texts[1] == prompts[1] + "(5,6),(7,8)</box>"


def test_generate_chat_prompt_single(tokenizer, preprocessor):
    chat = chat_format.build_chat_prompt("What?", images=[random_image(6)])
    inputs = numpy(
        preprocessor.generate_preprocess(
            {"prompts": chat.prompt, "images": chat.images}, sequence_length=400
        )
    )
    assert inputs["token_ids"].shape == (400,)
    assert inputs["images"].shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    prompt_length = len(tokenizer.tokenize(chat.prompt))
    assert int(inputs["padding_mask"].sum()) == prompt_length
    # Stop tokens are dropped, everything else is kept.
    text = preprocessor.generate_postprocess(inputs)
    for stop in ("<|im_start|>", "<|im_end|>"):
        chat = chat._replace(prompt=chat.prompt.replace(stop, ""))
    assert text == chat.prompt
    # As `generate()` batches a single prompt: a list of one.
    batched = numpy(
        preprocessor.generate_preprocess(
            {"prompts": [chat.prompt], "images": chat.images[0]},
            sequence_length=400,
        )
    )
    np.testing.assert_array_equal(batched["images"][0], inputs["images"])


def test_generate_preprocess_errors(preprocessor):
    with pytest.raises(
        ValueError,
        match="sample 1: the prompt has 12 tokens, more than "
        "sequence_length=8",
    ):
        preprocessor.generate_preprocess(["short", "a" * 12], sequence_length=8)
    with pytest.raises(ValueError, match="sample 0: `<img>` tag 0 is empty"):
        preprocessor.generate_preprocess(["<img></img>"])
    with pytest.raises(ValueError, match="sample 0: box out of range"):
        preprocessor.generate_preprocess("<box>(1,2),(3,1000)</box>")
    with pytest.raises(ValueError, match="a dict with 'prompts' and option"):
        preprocessor.generate_preprocess({"prompts": ["a"], "responses": ["b"]})


# Configuration.


def test_sequence_length_is_settable(tokenizer, converter):
    preprocessor = QwenVLCausalLMPreprocessor(
        tokenizer, converter, sequence_length=12
    )
    preprocessor.sequence_length = 7
    x, y, weight = numpy(preprocessor(["abc"]))
    assert x["token_ids"].shape == y.shape == weight.shape == (1, 7)
    inputs = numpy(preprocessor.generate_preprocess(["abc"]))
    assert inputs["token_ids"].shape == (1, 7)
    assert preprocessor.get_config()["sequence_length"] == 7


def test_get_config_round_trip(tokenizer, converter, tmp_path):
    preprocessor = QwenVLCausalLMPreprocessor(
        tokenizer,
        converter,
        sequence_length=20,
        add_end_token=False,
        image_dir=str(tmp_path),
        system_prompt="Be brief.",
    )
    config = preprocessor.get_config()
    assert "add_start_token" not in config
    restored = QwenVLCausalLMPreprocessor.from_config(copy.deepcopy(config))
    assert restored.get_config() == config
    # By its registered name, as a saved model resolves it.
    serialized = keras.saving.serialize_keras_object(preprocessor)
    assert serialized["registered_name"] == (
        "keras_qwenvl>QwenVLCausalLMPreprocessor"
    )
    restored = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(restored, QwenVLCausalLMPreprocessor)
    assert restored.image_size == (IMAGE_SIZE, IMAGE_SIZE)
    # The vocabulary is an asset; once loaded the outputs agree.
    tokenizer.save_assets(str(tmp_path))
    restored.tokenizer.load_assets(str(tmp_path))
    keras.tree.map_structure(
        np.testing.assert_array_equal,
        numpy(preprocessor(GOOD_CONVERSATION)),
        numpy(restored(GOOD_CONVERSATION)),
    )


# The real vocabulary and the golden fixture.


@pytest.fixture(scope="module")
def real_tokenizer(vocabulary_file):
    return QwenVLTokenizer(vocabulary=vocabulary_file)


def golden_preprocessor(tokenizer, golden, **kwargs):
    size = golden["image_size"]
    return QwenVLCausalLMPreprocessor(
        tokenizer,
        QwenVLImageConverter(image_size=(size, size)),
        image_dir=golden["images_dir"],
        **kwargs,
    )


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_golden_cases_tokens_and_pixels(real_tokenizer, golden, index):
    case = golden["cases"][index]
    preprocessor = golden_preprocessor(real_tokenizer, golden)
    inputs = numpy(
        preprocessor.generate_preprocess(
            case["text"], sequence_length=len(case["input_ids"])
        )
    )
    np.testing.assert_array_equal(inputs["token_ids"], case["input_ids"])
    assert inputs["padding_mask"].all()
    size = golden["image_size"]
    expected = golden["arrays"].get(
        f"{index}_pixels", np.zeros((0, size, size, 3), "float32")
    )
    assert inputs["images"].shape == expected.shape
    np.testing.assert_allclose(inputs["images"], expected, atol=1e-6, rtol=0)
    text = case["text"].replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert preprocessor.generate_postprocess(inputs) == text


def test_golden_case_0_for_training(real_tokenizer, golden):
    case = golden["cases"][0]
    preprocessor = golden_preprocessor(
        real_tokenizer, golden, sequence_length=len(case["input_ids"]) + 1
    )
    x, y, weight = numpy(preprocessor(case["text"]))
    ids = case["input_ids"] + [real_tokenizer.end_token_id]
    np.testing.assert_array_equal(x["token_ids"], ids)
    expected_pixels = golden["arrays"]["0_pixels"]
    np.testing.assert_allclose(x["images"], expected_pixels, atol=1e-6, rtol=0)
    # Loss on every text label outside the image span.
    start = ids.index(real_tokenizer.image_start_token_id)
    expected = np.ones(len(ids))
    expected[start : start + SPAN + 1] = 0
    expected[-1] = 0  # padding
    np.testing.assert_array_equal(weight, expected)


def test_real_vocabulary_conversation_loss(real_tokenizer, golden):
    preprocessor = golden_preprocessor(
        real_tokenizer, golden, sequence_length=400
    )
    box = "<ref>杯子</ref><box>(412,80),(590,912)</box>"
    sample = {
        "id": "identity_0",
        "conversations": [
            {"from": "user", "value": "Picture 1: <img>coffee.png</img>\n框"},
            {"from": "assistant", "value": box},
            {"from": "user", "value": "What colour is it?"},
            {"from": "assistant", "value": "\n\nWhite."},
        ],
    }
    x, y, weight = numpy(preprocessor([sample]))
    labels = y[0][weight[0] > 0].tolist()
    marks = "<|im_end|>\n<|im_start|>"
    assert real_tokenizer.detokenize(labels) == (
        f"{marks}{marks}{box}{marks}{marks}\n\nWhite.<|im_end|>\n"
    )
    # Each segment is tokenized on its own, as the original fine-tuning
    # code does: the reply's ids are those of the reply alone, which here
    # differ from tokenizing the reply after its header's newline.
    reply_ids = real_tokenizer.tokenize("\n\nWhite.")
    header_ids = real_tokenizer.tokenize("assistant\n")
    assert header_ids + reply_ids != real_tokenizer.tokenize(
        "assistant\n\n\nWhite."
    )
    end = len(labels)
    assert labels[end - len(reply_ids) - 2 : end - 2] == reply_ids
    np.testing.assert_allclose(
        x["images"][0], golden["arrays"]["0_pixels"], atol=1e-6, rtol=0
    )
