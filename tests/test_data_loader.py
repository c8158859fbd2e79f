"""QwenVLDataLoader and `fit()` on raw examples, on every backend."""

import grain
import keras
import numpy as np
import pytest

from keras_qwenvl.backbone import QwenVLBackbone
from keras_qwenvl.causal_lm import QwenVLCausalLM
from keras_qwenvl.causal_lm_preprocessor import QwenVLCausalLMPreprocessor
from keras_qwenvl.data import loader as data_loader
from keras_qwenvl.data import readers
from keras_qwenvl.data import synthetic
from keras_qwenvl.image_converter import QwenVLImageConverter
from keras_qwenvl.vision_encoder import QwenVLVisionEncoder

tf = pytest.importorskip("tensorflow")

LENGTH = 352  # a caption sample: 290 prompt tokens + the caption + end
SIZE = 28


@pytest.fixture(scope="module")
def tokenizer(byte_tokenizer):
    return byte_tokenizer


@pytest.fixture(scope="module")
def preprocessor(tokenizer):
    return QwenVLCausalLMPreprocessor(
        tokenizer, QwenVLImageConverter(image_size=(SIZE, SIZE)),
        sequence_length=LENGTH,
    )


def mixed_examples(count, seed=0):
    """Captions, VQA and pure text (all fit in LENGTH tokens)."""
    return list(
        synthetic.SyntheticSource(
            count, seed=seed, tasks=("caption", "vqa", "text"), image_size=56
        )
    )


def numpy_batches(batches):
    return [keras.tree.map_structure(np.asarray, b) for b in batches]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        keras.tree.map_structure(np.testing.assert_array_equal, a, b)


def test_batches_have_static_shapes_and_match_the_preprocessor(preprocessor):
    examples = mixed_examples(10)
    loader = data_loader.QwenVLDataLoader(
        examples, preprocessor, batch_size=4, shuffle=False
    )
    batches = list(loader)
    assert len(batches) == loader.num_batches == 2  # the last 2 are dropped
    for x, y, weights in batches:
        assert x["token_ids"].shape == x["padding_mask"].shape == (4, LENGTH)
        assert x["images"].shape == (4, 1, SIZE, SIZE, 3)
        assert y.shape == weights.shape == (4, LENGTH)
        assert x["token_ids"].dtype == x["padding_mask"].dtype == np.int32
        assert y.dtype == np.int32 and weights.dtype == np.float32
        assert set(np.unique(x["padding_mask"])) <= {0, 1}
    # Row k of the first batch is example k, as the preprocessor makes it.
    x, y, weights = batches[0]
    for row, example in enumerate(examples[:4]):
        inputs = {k: example[k] for k in ("prompts", "responses", "images")}
        want_x, want_y, want_w = keras.tree.map_structure(
            keras.ops.convert_to_numpy, preprocessor(inputs)
        )
        np.testing.assert_array_equal(x["token_ids"][row], want_x["token_ids"])
        np.testing.assert_array_equal(y[row], want_y)
        np.testing.assert_array_equal(weights[row], want_w)
        if example["images"]:
            np.testing.assert_array_equal(x["images"][row], want_x["images"])
        else:
            assert not x["images"][row].any()
    assert loader.stats.rows == 8
    assert loader.stats.tokens == sum(
        np.count_nonzero(b[0]["padding_mask"]) for b in batches
    )


def test_packed_batches_are_fuller_and_keep_every_sample(preprocessor):
    examples = mixed_examples(24)
    plain = data_loader.QwenVLDataLoader(
        examples, preprocessor, batch_size=4, shuffle=False,
        sequence_length=3 * LENGTH, drop_remainder=False,
    )
    packed = data_loader.QwenVLDataLoader(
        examples, preprocessor, batch_size=4, shuffle=False, pack=True,
        sequence_length=3 * LENGTH, drop_remainder=False, packing_window=12,
    )
    plain_batches, packed_batches = list(plain), list(packed)
    assert packed.max_images == 3 * LENGTH // (256 + 2)
    for x, y, weights in packed_batches:
        assert x["token_ids"].shape[1:] == (3 * LENGTH,)
        assert x["images"].shape[1:] == (packed.max_images, SIZE, SIZE, 3)
        # Segment ids count up from 1, then padding.
        for segments in x["padding_mask"]:
            real = segments[segments > 0]
            assert real[0] == 1 and np.all(np.diff(real) >= 0)
            assert np.all(np.diff(np.unique(real)) == 1)
    assert packed.stats.samples == plain.stats.samples == 24
    assert packed.stats.tokens == plain.stats.tokens
    assert packed.stats.rows < plain.stats.rows
    assert packed.stats.efficiency > 2 * plain.stats.efficiency
    # The loss weights are the same, only moved.
    total = lambda batches: sum(float(b[2].sum()) for b in batches)
    assert total(packed_batches) == pytest.approx(total(plain_batches))


def test_task_loss_weights_scale_only_their_tasks_tokens(preprocessor):
    examples = mixed_examples(12)
    tasks = [e["task"] for e in examples]
    assert {"caption", "vqa", "text"} <= set(tasks)
    common = dict(batch_size=4, shuffle=False, drop_remainder=False)
    plain = list(data_loader.QwenVLDataLoader(examples, preprocessor, **common))
    weighted = list(
        data_loader.QwenVLDataLoader(
            examples, preprocessor,
            task_loss_weights={"caption": 3.0, "text": 0}, **common,
        )
    )
    rows = lambda batches, i: np.concatenate([b[i] for b in batches])
    want = {"caption": 3.0, "vqa": 1.0, "text": 0.0}
    for row, task in enumerate(tasks):
        assert rows(plain, 2)[row].sum() > 0
        np.testing.assert_array_equal(
            rows(weighted, 2)[row], want[task] * rows(plain, 2)[row]
        )
        np.testing.assert_array_equal(
            rows(weighted, 1)[row], rows(plain, 1)[row]
        )
    # Packed rows (one task each) keep the weights.
    packed = data_loader.QwenVLDataLoader(
        examples, preprocessor, pack=True, sequence_length=3 * LENGTH,
        packing_window=12, task_loss_weights={"caption": 3.0}, **common,
    )
    total = sum(float(b[2].sum()) for b in packed)
    weights = rows(plain, 2).sum(axis=1)
    per_task = {
        t: sum(float(w) for w, task in zip(weights, tasks) if task == t)
        for t in want
    }
    assert total == pytest.approx(
        3 * per_task["caption"] + per_task["vqa"] + per_task["text"]
    )
    with pytest.raises(ValueError, match="task_loss_weights.*>= 0"):
        data_loader.QwenVLDataLoader(
            examples, preprocessor, task_loss_weights={"ocr": -1.0}
        )


def test_phrase_labels_mark_the_words_inside_ref_tags():
    ref, end = 7, 8
    labels = np.array([1, ref, 2, 3, end, 4, 5, ref, 6, end, ref, 9, end, 0])
    want = [0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0]
    np.testing.assert_array_equal(
        data_loader.phrase_labels(labels, ref, end), np.array(want, bool)
    )


def test_phrase_loss_weight_scales_the_ref_phrases_only(
    preprocessor, tokenizer
):
    examples = [
        {
            "task": "grounding",
            "prompts": "Where is <ref>the dog</ref>? ",
            "responses": "<ref>a cat</ref><box>(10,20),(300,400)</box> and "
            "<ref>big sun</ref><box>(1,2),(3,4)</box> end",
        },
        {"task": "text", "text": "no phrase at all"},
    ]
    common = dict(batch_size=2, shuffle=False)
    plain = next(iter(data_loader.QwenVLDataLoader(
        examples, preprocessor, **common
    )))
    weighted = next(iter(data_loader.QwenVLDataLoader(
        examples, preprocessor, phrase_loss_weight=4.0,
        task_loss_weights={"grounding": 0.5}, **common,
    )))
    _, y, w_plain = (np.asarray(v) for v in plain)
    w = np.asarray(weighted[2])
    np.testing.assert_array_equal(y, np.asarray(weighted[1]))
    # Row 0: the task's 0.5, times 4 on the phrases.
    scaled = w[0] != 0.5 * w_plain[0]
    np.testing.assert_array_equal(w[0][scaled], 2.0 * w_plain[0][scaled])
    # The scaled labels are the response's phrases, not the prompt's.
    words = tokenizer.detokenize(y[0][scaled].tolist())
    assert words.replace(" ", "") == "acatbigsun"
    # A row without phrases keeps its weights (the task's weight is 1).
    np.testing.assert_array_equal(w[1], w_plain[1])
    assert w_plain[1].sum() > 0
    with pytest.raises(ValueError, match="phrase_loss_weight.*>= 0"):
        data_loader.QwenVLDataLoader(
            examples, preprocessor, phrase_loss_weight=-2
        )


def test_seeds_shuffle_and_repeat(preprocessor):
    examples = mixed_examples(8)

    def first_tokens(**kwargs):
        """The order of the examples: tokens 300-309 of each row."""
        loader = data_loader.QwenVLDataLoader(
            examples, preprocessor, batch_size=2, **kwargs
        )
        rows = [row for x, _, _ in loader for row in x["token_ids"]]
        return [tuple(row[300:310]) for row in rows]

    one = first_tokens(seed=1)
    assert one == first_tokens(seed=1)
    assert one != first_tokens(seed=2)
    in_order = first_tokens(shuffle=False)
    assert sorted(one) == sorted(in_order) and one != in_order
    alone = [
        preprocessor({k: e[k] for k in ("prompts", "responses", "images")})
        for e in examples
    ]
    assert in_order == [
        tuple(keras.ops.convert_to_numpy(x["token_ids"])[300:310])
        for x, _, _ in alone
    ]
    # Repeated passes are each a permutation, shuffled differently.
    two_passes = first_tokens(seed=1, repeat=2)
    assert len(two_passes) == 16
    assert two_passes[:8] == one
    assert sorted(two_passes[8:]) == sorted(one) and two_passes[8:] != one
    # Resuming at a pass reads what the uninterrupted run read from there.
    assert first_tokens(seed=1, repeat=2, start_pass=1) == two_passes[8:]


def test_worker_processes_give_the_same_batches_and_errors(preprocessor):
    examples = mixed_examples(12) + [
        {"id": "lost", "prompts": "<img></img>?", "responses": "x",
         "images": ["/no/such/image.png"]}
    ]
    kwargs = dict(batch_size=4, shuffle=False, drop_remainder=False)
    expected = numpy_batches(
        data_loader.QwenVLDataLoader(examples[:12], preprocessor, **kwargs)
    )
    loader = data_loader.QwenVLDataLoader(
        examples, preprocessor, num_workers=2, **kwargs
    )
    received = []
    with pytest.raises(
        readers.BadSampleError, match=r"sample 'lost' \(missing_image\)"
    ):
        for batch in loader:
            received.append(batch)
    assert_same_batches(numpy_batches(received), expected)


def test_errors_name_the_example(preprocessor):
    examples = mixed_examples(3) + [
        {"prompts": "long " * 30 + "<img></img>?", "responses": "x",
         "images": [np.zeros((8, 8, 3), "uint8")]}
    ]
    loader = data_loader.QwenVLDataLoader(
        examples, preprocessor, batch_size=2, shuffle=False,
        sequence_length=270,
    )
    with pytest.raises(
        readers.BadSampleError, match=r"sample 3 \(invalid\): image 0 spans"
    ):
        list(loader)
    packed = data_loader.QwenVLDataLoader(
        ["short text", "a text " * 40], preprocessor, batch_size=2,
        shuffle=False, pack=True, sequence_length=200,
    )
    with pytest.raises(
        ValueError,
        match="sample 1: it has at least 201 tokens, more than the packed "
        "row length 200",
    ):
        list(packed)
    user_twice = [{"from": "user", "value": "a"}] * 2
    loader = data_loader.QwenVLDataLoader(
        [{"id": "bad", "conversations": user_twice}], preprocessor, batch_size=1
    )
    with pytest.raises(readers.BadSampleError, match="sample 'bad' .*turn 1"):
        list(loader)


def raw_tf_dataset(examples):
    return tf.data.Dataset.from_tensor_slices(
        {
            "prompts": [e["prompts"] for e in examples],
            "responses": [e["responses"] for e in examples],
            "images": np.stack([e["images"] for e in examples]),
        }
    )


def test_every_source_kind_gives_the_same_batches(preprocessor):
    examples = synthetic.synthetic_examples("caption", 6, seed=1, image_size=56)
    kwargs = dict(batch_size=2, drop_remainder=False)
    expected = numpy_batches(
        data_loader.QwenVLDataLoader(
            examples, preprocessor, shuffle=False, **kwargs
        )
    )
    columns = {
        "prompts": [e["prompts"] for e in examples],
        "responses": [e["responses"] for e in examples],
        "images": [e["images"] for e in examples],
    }
    sources = {
        "columns": columns,
        "map dataset": grain.MapDataset.source(examples),
        "iter dataset": grain.MapDataset.source(examples).to_iter_dataset(),
        "tf.data": raw_tf_dataset(examples),
        "batched tf.data": raw_tf_dataset(examples).batch(4),
    }
    for name, source in sources.items():
        shuffle = False if name in ("columns", "map dataset") else None
        got = numpy_batches(
            data_loader.QwenVLDataLoader(
                source, preprocessor, shuffle=shuffle, **kwargs
            )
        )
        assert_same_batches(got, expected)
    stream = raw_tf_dataset(examples)
    with pytest.raises(ValueError, match="random-access source"):
        data_loader.QwenVLDataLoader(stream, preprocessor, shuffle=True)
    with pytest.raises(ValueError, match="Worker processes need a random"):
        data_loader.QwenVLDataLoader(stream, preprocessor, num_workers=1)


def test_tf_dataset_output_is_static_and_equal(preprocessor):
    examples = mixed_examples(6)
    loader = data_loader.QwenVLDataLoader(
        examples, preprocessor, batch_size=3, shuffle=False
    )
    dataset = loader.tf_dataset()
    x_spec, y_spec, w_spec = dataset.element_spec
    assert x_spec["images"].shape == (3, 1, SIZE, SIZE, 3)
    assert x_spec["token_ids"].shape == y_spec.shape == (3, LENGTH)
    assert w_spec.shape == x_spec["padding_mask"].shape == (3, LENGTH)
    assert_same_batches(
        numpy_batches(dataset.as_numpy_iterator()), numpy_batches(loader)
    )


def test_text_only_preprocessor_has_no_images(tokenizer):
    text_only = QwenVLCausalLMPreprocessor(tokenizer, None, sequence_length=32)
    loader = data_loader.QwenVLDataLoader(
        ["a few words", "more words here"], text_only, batch_size=2
    )
    (x, y, _), = list(loader)
    assert sorted(x) == ["padding_mask", "token_ids"] and y.shape == (2, 32)
    assert loader.max_images == 0


def test_fit_loader_routes_raw_examples_only(preprocessor):
    examples = mixed_examples(4)
    captions = synthetic.synthetic_examples("caption", 2, image_size=56)
    for raw in (
        examples,
        ["text one", "text two"],
        {"prompts": ["a"], "responses": ["b"]},
        grain.MapDataset.source(examples),
        raw_tf_dataset(captions),
        synthetic.SyntheticSource(3, image_size=56),
    ):
        loader = data_loader.fit_loader(preprocessor, raw)
        assert isinstance(loader, data_loader.QwenVLDataLoader)
    batches = data_loader.QwenVLDataLoader(examples, preprocessor, batch_size=2)
    x, y, w = next(iter(batches))
    for ready in (
        batches.dataset(),
        x,
        tf.data.Dataset.from_tensors((x, y, w)),
        grain.MapDataset.source([(x, y, w)]),
        [x],
        np.zeros((2, 3)),
        None,
    ):
        assert data_loader.fit_loader(preprocessor, ready) is None
    assert data_loader.fit_loader(None, examples) is None
    assert data_loader.fit_loader(preprocessor, examples, passes=3).repeat == 3


def causal_lm(tokenizer, preprocessor):
    """A tiny model that fits raw examples."""
    keras.utils.set_random_seed(0)
    encoder = QwenVLVisionEncoder(
        image_size=SIZE,
        patch_size=14,
        width=16,
        num_layers=1,
        num_heads=2,
        intermediate_dim=24,
        output_dim=32,
        num_queries=256,  # the tokenizer's image span
        adapter_head_dim=16,
    )
    backbone = QwenVLBackbone(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=1, num_heads=2,
        hidden_dim=32, intermediate_dim=40,
        image_start_token_id=tokenizer.image_start_token_id,
        vision_encoder=encoder,
    )
    lm = QwenVLCausalLM(backbone, preprocessor)
    lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    return lm


def test_fit_takes_lists_grain_and_tf_data_of_raw_examples(
    tokenizer, preprocessor
):
    lm = causal_lm(tokenizer, preprocessor)
    examples = synthetic.synthetic_examples("caption", 4, seed=2, image_size=56)
    loader = data_loader.QwenVLDataLoader(examples, preprocessor, batch_size=2)

    def embeddings():
        return keras.ops.convert_to_numpy(
            lm.backbone.token_embedding.embeddings
        )

    before = embeddings()
    for data, batch_size in (
        (examples, 2),
        (grain.MapDataset.source(examples), 2),
        (raw_tf_dataset(examples), 2),
        (synthetic.SyntheticSource(4, 2, "caption", image_size=56), 2),
        (loader.dataset(), None),  # already batches
    ):
        history = lm.fit(data, batch_size=batch_size, epochs=1, verbose=0)
        (loss,) = history.history["loss"]
        assert np.isfinite(loss)
        after = embeddings()
        assert not np.allclose(before, after)
        before = after
    # Several epochs over a list: each pass reshuffled, steps declared.
    history = lm.fit(examples, batch_size=2, epochs=2, verbose=0,
                     validation_data=examples[:2])
    assert len(history.history["val_loss"]) == 2
    assert history.history["loss"][1] < history.history["loss"][0]
    loss = lm.evaluate(examples, batch_size=2, verbose=0)
    assert np.isfinite(loss[0])
