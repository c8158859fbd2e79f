"""QwenVLTokenizer: the original tokenizer's ids, text and list format."""

import base64
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_qwenvl.backbone import QwenVLBackbone
from keras_qwenvl.tokenizer import QwenVLTokenizer


@pytest.fixture(scope="module")
def tokenizer(vocabulary_file):
    return QwenVLTokenizer(vocabulary_file)


def _write_vocabulary(path, tokens):
    """A qwen.tiktoken-format file ranking `tokens` (bytes) in order."""
    with open(path, "wb") as file:
        for rank, token in enumerate(tokens):
            file.write(base64.b64encode(token) + b" %d\n" % rank)
    return str(path)


# A vocabulary without ../shared: the 256 bytes in reverse order (so a
# byte's rank differs from its value) and one merge, "ab".
_TINY_TOKENS = [bytes([b]) for b in reversed(range(256))] + [b"ab"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocabulary") / "tiny.tiktoken"
    return QwenVLTokenizer(_write_vocabulary(path, _TINY_TOKENS))


# Golden fixture (ids and text of the original tokenizer).


def test_golden_tokenizer_cases(tokenizer, golden):
    for case in golden["tokenizer_cases"]:
        ids = tokenizer.tokenize(case["text"])
        assert ids == case["input_ids"], case["text"]
        assert tokenizer.detokenize(ids) == case["decoded"]
        expected = case["list_format"]
        if isinstance(expected, str):
            message = expected.removeprefix("error: ")
            with pytest.raises(ValueError, match=re.escape(message)):
                tokenizer.to_list_format(case["text"])
        else:
            assert tokenizer.to_list_format(case["text"]) == expected


def test_golden_prompt_ids(tokenizer, golden):
    for case in golden["cases"]:
        ids = tokenizer.tokenize(case["text"])
        assert ids == case["input_ids"], case["name"]
    # The batch form gives the same rows.
    texts = [case["text"] for case in golden["cases"]]
    expected = [case["input_ids"] for case in golden["cases"]]
    assert tokenizer.tokenize(texts) == expected


def test_special_ids(tokenizer, golden):
    for token, id in golden["special_ids"].items():
        assert tokenizer.token_to_id(token) == id
        assert tokenizer.id_to_token(id) == token
    special = golden["special_ids"]
    assert tokenizer.end_token_id == special["<|endoftext|>"]
    assert tokenizer.im_start_token_id == special["<|im_start|>"]
    assert tokenizer.im_end_token_id == special["<|im_end|>"]
    for role in ("image", "ref", "box", "quad"):
        tag = "img" if role == "image" else role
        assert getattr(tokenizer, f"{role}_start_token_id") == special[
            f"<{tag}>"
        ]
        assert getattr(tokenizer, f"{role}_end_token_id") == special[
            f"</{tag}>"
        ]
    assert tokenizer.image_pad_token_id == special["<imgpad>"]
    # Padding must differ from every stop id, or generation ends at once.
    assert tokenizer.pad_token_id == special["<imgpad>"]
    assert tokenizer.start_token_id is None
    assert tokenizer.stop_token_ids == (151645, 151644, 151643)
    assert tokenizer.pad_token_id not in tokenizer.stop_token_ids
    assert sorted(tokenizer.special_token_ids) == sorted(special.values())
    assert tokenizer.token_to_id("<|extra_0|>") == 151646
    assert tokenizer.token_to_id("<|extra_204|>") == 151850
    # Ids run to <imgpad>; the embedding's spare rows have no token.
    assert tokenizer.vocabulary_size() == 151860
    assert tokenizer.backbone_cls is QwenVLBackbone


def test_token_strings(tokenizer):
    # Byte-level strings: " the" is "Ġthe"; ids 0.. are the printable bytes.
    assert tokenizer.token_to_id("Ġthe") == tokenizer.tokenize(" the")[0]
    assert tokenizer.id_to_token(0) == "!"
    assert tokenizer.id_to_token(198) == "Ċ"  # "\n", as in the prompts
    vocabulary = tokenizer.get_vocabulary()
    assert len(vocabulary) == len(set(vocabulary)) == 151860
    assert vocabulary[151859] == "<imgpad>"
    with pytest.raises(ValueError, match="not a token"):
        tokenizer.token_to_id("<no such token>")
    with pytest.raises(ValueError, match=r"151860 is outside the vocabulary"):
        tokenizer.id_to_token(151860)


def test_image_span_errors(tiny):
    with pytest.raises(ValueError, match="unclosed <img> tag"):
        tiny.tokenize("Picture 1: <img>a.png\nWhat is it?")
    with pytest.raises(ValueError, match="</img> without a preceding <img>"):
        tiny.tokenize("a.png</img> what?")
    # 256 bytes fill the span exactly; 257 do not fit.
    ids = tiny.tokenize("<img>" + "x" * 256 + "</img>")
    assert len(ids) == 258 and tiny.image_pad_token_id not in ids
    with pytest.raises(ValueError, match="257 bytes long"):
        tiny.tokenize("<img>" + "x" * 257 + "</img>")
    # The limit counts UTF-8 bytes: 86 three-byte characters are 258.
    with pytest.raises(ValueError, match="258 bytes long"):
        tiny.tokenize("<img>" + "图" * 86 + "</img>")
    with pytest.raises(ValueError, match="unclosed <ref> tag"):
        tiny.to_list_format("<ref>dog")


def test_detokenize_inputs(tiny):
    ids = tiny.tokenize(["Hello, world!", "<img>a.png</img>hi"])
    texts = ["Hello, world!", "<img>a.png</img>hi"]
    assert tiny.detokenize(ids) == texts
    assert tiny.detokenize(tf.ragged.constant(ids)) == texts
    assert tiny.detokenize(np.array(ids[0])) == texts[0]
    backend_ids = keras.ops.convert_to_tensor(ids[0])
    assert tiny.detokenize(backend_ids) == texts[0]
    assert tiny.detokenize(np.array([ids[0]] * 2)) == [texts[0]] * 2
    # An <img> never closed (e.g. cut-off generation) decodes token by token.
    hello, a = tiny.tokenize(["Hello", "a"])
    start = tiny.image_start_token_id
    assert tiny.detokenize(hello + [start] + a) == "Hello<img>a"
    with pytest.raises(ValueError, match="-1 is outside the vocabulary"):
        tiny.detokenize(hello + [-1])


def test_tokenize_inputs(tiny):
    text = "Hello, world!"
    ids = tiny.tokenize(text)
    assert tiny(text) == ids
    assert tiny(text.encode("utf-8")) == ids
    assert tiny.tokenize(np.array([text, "hi"])) == [ids, tiny("hi")]
    assert tiny.tokenize(tf.constant(text)) == ids
    assert tiny.tokenize("") == []
    with pytest.raises(ValueError, match="got an array of shape"):
        tiny.tokenize(np.array([[text]]))
    with pytest.raises(ValueError, match="takes strings"):
        tiny.tokenize(["a", 3])


def test_tf_data(tiny):
    texts = ["Picture 1: <img>a.png</img>\nHi", "中文测试", ""]
    eager = tiny.tokenize(texts)
    ds = tf.data.Dataset.from_tensor_slices(texts)
    ds = ds.map(tiny.tokenize)
    assert [x.numpy().tolist() for x in ds] == eager
    ds = tf.data.Dataset.from_tensor_slices(texts).batch(3).map(tiny)
    ragged = next(iter(ds))
    assert isinstance(ragged, tf.RaggedTensor)
    assert ragged.dtype == tf.int32
    assert ragged.to_list() == eager
    ds = ds.map(tiny.detokenize)
    assert [t.decode("utf-8") for t in next(iter(ds)).numpy()] == texts


def test_list_format(tiny):
    elements = [
        {"image": "a.png"},
        {"text": "Find"},
        {"ref": "the dog", "box": [(1, 2, 3, 4), (5.7, 6, 7, 8)]},
        {"box": [[10, 20, 30, 40]]},
    ]
    text = tiny.from_list_format(elements)
    assert text == (
        "Picture 1: <img>a.png</img>\nFind<ref>the dog</ref>"
        "<box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>"
        "<box>(10,20),(30,40)</box>"
    )
    assert tiny.to_list_format(text) == [
        {"text": "Picture 1: "},
        {"image": "a.png"},
        {"text": "\nFind"},
        {"ref": "the dog"},
        {"box": "(1,2),(3,4)"},
        {"box": "(5,6),(7,8)"},
        {"box": "(10,20),(30,40)"},
    ]
    two_images = tiny.from_list_format([{"image": "x"}, {"image": "y"}])
    assert two_images == "Picture 1: <img>x</img>\nPicture 2: <img>y</img>\n"
    with pytest.raises(ValueError, match="Unsupported element"):
        tiny.from_list_format([{"ref": "dog"}])
    with pytest.raises(ValueError, match="list of \\(x1, y1, x2, y2\\) boxes"):
        tiny.from_list_format([{"box": "(1,2),(3,4)"}])
    with pytest.raises(ValueError, match="Each box must be"):
        tiny.from_list_format([{"box": [(1, 2, 3)]}])


# Saving and configs.


def test_assets_round_trip(tokenizer, tmp_path):
    tokenizer.save_assets(str(tmp_path))
    restored = QwenVLTokenizer()
    restored.load_assets(str(tmp_path))
    assert restored.get_vocabulary() == tokenizer.get_vocabulary()
    assert restored.special_token_ids == tokenizer.special_token_ids


def test_config_round_trip(tiny, tmp_path):
    config = tiny.get_config()
    assert config["vocabulary"] is None  # the ranks travel as an asset
    restored = QwenVLTokenizer.from_config(config)
    assert restored.end_token_id is None
    with pytest.raises(ValueError, match="No vocabulary has been set"):
        restored.tokenize("hi")
    tiny.save_assets(str(tmp_path))
    restored.load_assets(str(tmp_path))
    assert restored.get_config() == config
    text = "<|im_start|>user\nPicture 1: <img>a.png</img>\nhi<|im_end|>"
    assert restored.tokenize(text) == tiny.tokenize(text)
    # Deserialization by registered name.
    serialized = keras.saving.serialize_keras_object(tiny)
    assert serialized["registered_name"] == "keras_qwenvl>QwenVLTokenizer"
    assert type(keras.saving.deserialize_keras_object(serialized)) is (
        QwenVLTokenizer
    )


def test_preset_round_trip(tiny, tmp_path):
    # `from_preset` reads the backbone class from config.json.
    backbone = QwenVLBackbone(
        vocabulary_size=32,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
    )
    backbone.save_to_preset(str(tmp_path))
    tiny.save_to_preset(str(tmp_path))
    restored = QwenVLTokenizer.from_preset(str(tmp_path))
    text = "Picture 1: <img>a.png</img>\n<ref>dog</ref>"
    assert restored.tokenize(text) == tiny.tokenize(text)
    assert restored.vocabulary_size() == tiny.vocabulary_size()


# Without ../shared.


def test_tiny_vocabulary(tiny, tmp_path):
    rank = {token: i for i, token in enumerate(_TINY_TOKENS)}
    # Special ids start after the 257 ranks.
    assert tiny.end_token_id == 257
    assert tiny.im_start_token_id == 258
    assert tiny.token_to_id("<ref>") == 257 + 208
    assert tiny.image_start_token_id == 257 + 214
    assert tiny.image_pad_token_id == tiny.pad_token_id == 257 + 216
    assert tiny.vocabulary_size() == 257 + 217
    # "ab" merges; "c" is its byte's rank.
    assert tiny.tokenize("abc") == [256, rank[b"c"]]
    assert tiny.detokenize([256, rank[b"c"]]) == "abc"
    assert tiny.tokenize("ab<|endoftext|>") == [256, 257]
    # Inside an image span the ids are the byte values, not their ranks.
    ids = tiny.tokenize("<img>ab</img>c")
    assert ids == (
        [tiny.image_start_token_id, 97, 98]
        + [tiny.image_pad_token_id] * 254
        + [tiny.image_end_token_id, rank[b"c"]]
    )
    assert tiny.detokenize(ids) == "<img>ab</img>c"
    # NFC: "e" + combining acute is stored as one character "é".
    assert tiny.tokenize("e\u0301") == [rank[b] for b in (b"\xc3", b"\xa9")]
    tiny.save_assets(str(tmp_path))
    restored = QwenVLTokenizer()
    restored.load_assets(str(tmp_path))
    assert restored.get_vocabulary() == tiny.get_vocabulary()
    # Tokenizers of different files do not share state.
    natural = [bytes([b]) for b in range(256)]
    other = _write_vocabulary(tmp_path / "natural.tiktoken", natural)
    other = QwenVLTokenizer(other)
    assert other.tokenize("abc") == [97, 98, 99]
    assert tiny.tokenize("abc") == [256, rank[b"c"]]
    assert other.end_token_id == 256 and tiny.end_token_id == 257


def test_bad_vocabulary_files(tmp_path):
    bad_line = tmp_path / "bad_line.tiktoken"
    bad_line.write_bytes(b"IQ== 0\nnot-base64!\n")
    with pytest.raises(ValueError, match="line 2: expected"):
        QwenVLTokenizer(str(bad_line))
    gap = _write_vocabulary(tmp_path / "gap.tiktoken", _TINY_TOKENS)
    with open(gap, "ab") as file:
        file.write(base64.b64encode(b"xyz") + b" 300\n")
    with pytest.raises(ValueError, match="without gaps"):
        QwenVLTokenizer(gap)
    no_bytes = _write_vocabulary(tmp_path / "few.tiktoken", [b"a", b"b"])
    with pytest.raises(ValueError, match="every single byte must be a token"):
        QwenVLTokenizer(no_bytes)
    with pytest.raises(ValueError, match="path to a qwen.tiktoken"):
        QwenVLTokenizer({"a": 0})
    with pytest.raises(ValueError, match="integer ids"):
        QwenVLTokenizer(dtype="float32")


def test_without_vocabulary():
    tok = QwenVLTokenizer()
    assert tok.file_assets == ["qwen.tiktoken"]
    assert tok.end_token_id is None and tok.pad_token_id is None
    assert tok.start_token_id is None
    with pytest.raises(ValueError, match="No vocabulary has been set"):
        tok.detokenize([1])
    with pytest.raises(ValueError, match="No vocabulary has been set"):
        tok.vocabulary_size()


def test_byte_level_vocabulary_with_words(tmp_path):
    from keras_qwenvl.data.synthetic import SyntheticConfig
    from keras_qwenvl.data.synthetic import synthetic_examples
    from keras_qwenvl.data.synthetic import vocabulary_words
    from keras_qwenvl.tokenizer import write_byte_level_vocabulary

    plain = QwenVLTokenizer(
        write_byte_level_vocabulary(str(tmp_path / "plain.tiktoken"))
    )
    words = ["red", "circle", "cross", "read", "a"]
    merged = QwenVLTokenizer(
        write_byte_level_vocabulary(str(tmp_path / "w.tiktoken"), words)
    )
    # Each word, alone or after a space, is one token; other text is bytes.
    for word in words:
        for text in (word, " " + word):
            ids = merged.tokenize(text)
            assert len(ids) == 1 and merged.detokenize(ids) == text
    text = "a red crossing, circles: (12,345)"
    ids = merged.tokenize(text)
    assert merged.detokenize(ids) == text
    pieces = [merged.detokenize([i]) for i in ids]
    assert pieces[:3] == ["a", " red", " cross"]
    assert "ing" not in pieces and " circle" in pieces and "s" in pieces
    assert plain.tokenize(text) == list(text.encode())
    # Specials follow the ranks: 256 bytes, then every prefix piece.
    assert plain.end_token_id == 256
    assert merged.end_token_id > 256 + len(words)
    assert merged.detokenize(merged.tokenize("<ref>red</ref>")) == (
        "<ref>red</ref>"
    )
    with pytest.raises(ValueError, match="words of letters"):
        write_byte_level_vocabulary(str(tmp_path / "x"), ["two words"])
    # The synthetic data's words are single tokens of its vocabulary, so a
    # caption is one token per word.
    config = SyntheticConfig()
    vocabulary = vocabulary_words(config)
    assert set(config.colors) | set(config.shapes) <= set(vocabulary)
    synthetic = QwenVLTokenizer(
        write_byte_level_vocabulary(str(tmp_path / "s.tiktoken"), vocabulary)
    )
    example = synthetic_examples("caption", 1, seed=2)[0]
    caption = example["meta"]["caption"]
    assert len(synthetic.tokenize(caption)) == len(
        caption.replace(",", " ,").split()
    )
    # Every word of every task's texts is in the list.
    from keras_qwenvl.data.synthetic import TASKS

    used = set()
    for task in TASKS:
        for example in synthetic_examples(task, 12, seed=3, image_size=64):
            turns = example.get("conversations", [])
            texts = [t["value"] for t in turns] + [
                example.get(key, "") for key in ("prompts", "responses")
            ]
            for text in texts:
                used.update(re.findall(r"[A-Za-z]+", re.sub("<[^>]*>", " ", text)))
    assert used and used <= set(vocabulary), used - set(vocabulary)
