"""The model's own behaviour on tiny random configs (no shared files needed).

Golden numerics against the original code are in test_golden.py; these tests
pin the mechanisms: the position tables, image spans, the cache, batching.
"""

import os

import keras
import numpy as np
import pytest
from keras import ops

from keras_qwenvl.backbone import QwenVLBackbone
from keras_qwenvl.backbone import interleave_image_features
from keras_qwenvl.causal_lm import QwenVLCausalLM
from keras_qwenvl.causal_lm_preprocessor import QwenVLCausalLMPreprocessor
from keras_qwenvl.decoder import _MAX_NTK_DOUBLINGS
from keras_qwenvl.decoder import ntk_alpha_index
from keras_qwenvl.decoder import rotary_inverse_frequencies
from keras_qwenvl.image_converter import QwenVLImageConverter
from keras_qwenvl.position_tables import bicubic_resize_matrix
from keras_qwenvl.position_tables import resize_position_table
from keras_qwenvl.position_tables import sincos_2d_table
from keras_qwenvl.tokenizer import QwenVLTokenizer
from keras_qwenvl.tokenizer import write_byte_level_vocabulary
from keras_qwenvl.vision_encoder import QwenVLVisionEncoder
from keras_qwenvl.vision_encoder import window_attention_mask

IMG = 290  # `<img>` id of the tiny vocabulary
VOCAB = 300
QUERIES = 4  # image span length of the tiny config


def tiny_encoder(**kwargs):
    config = dict(
        image_size=28,
        patch_size=7,
        width=16,
        num_layers=2,
        num_heads=2,
        intermediate_dim=24,
        output_dim=32,
        num_queries=QUERIES,
        adapter_head_dim=16,
    )
    config.update(kwargs)
    return QwenVLVisionEncoder(**config)


def tiny_backbone(vision=True, **kwargs):
    keras.utils.set_random_seed(0)
    config = dict(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=40,
        seq_length=16,
        image_start_token_id=IMG,
        vision_encoder=tiny_encoder() if vision else None,
    )
    config.update(kwargs)
    return QwenVLBackbone(**config)


def tiny_causal_lm(folder, **backbone_kwargs):
    """A tiny multimodal QwenVLCausalLM with a byte-level preprocessor whose
    vocabulary file is written into `folder`."""
    vocabulary = write_byte_level_vocabulary(os.path.join(folder, "v.tiktoken"))
    tokenizer = QwenVLTokenizer(vocabulary, image_span_length=QUERIES)
    backbone = tiny_backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        image_start_token_id=tokenizer.image_start_token_id,
        **backbone_kwargs,
    )
    preprocessor = QwenVLCausalLMPreprocessor(
        tokenizer, QwenVLImageConverter(image_size=(28, 28))
    )
    return QwenVLCausalLM(backbone, preprocessor)


def span():
    """An `<img>` span of the tiny config: <img> + QUERIES ids + </img>."""
    return [IMG] + [IMG + 2] * QUERIES + [IMG + 1]


def batch(rows, length=None):
    length = length or max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), "int32")
    mask = np.zeros((len(rows), length), "int32")
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def to_np(x):
    return ops.convert_to_numpy(x)


# === Position tables ===


def test_bicubic_resize_matches_pytorch_interpolate():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    table = rng.standard_normal((256, 5)).astype("float32")
    for target in (8, 24, 32):
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(table.reshape(1, 16, 16, 5)).permute(0, 3, 1, 2),
            size=(target, target),
            mode="bicubic",
            align_corners=False,
        )
        expected = expected.permute(0, 2, 3, 1).reshape(-1, 5).numpy()
        got = to_np(resize_position_table(ops.convert_to_tensor(table), target))
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_bicubic_matrix_is_identity_at_same_size_and_rows_sum_to_one():
    np.testing.assert_allclose(bicubic_resize_matrix(16, 16), np.eye(16))
    for target in (5, 8, 32):
        np.testing.assert_allclose(
            bicubic_resize_matrix(16, target).sum(1), 1.0, atol=1e-6
        )


def test_sincos_table_layout():
    table = sincos_2d_table(8, 3)  # two frequencies per half-axis
    row, col = 1, 2
    entry = table[row * 3 + col]
    omega = 1.0 / 10000 ** np.array([0.0, 0.5])
    np.testing.assert_allclose(
        entry,
        np.concatenate(
            [
                np.sin(col * omega), np.cos(col * omega),
                np.sin(row * omega), np.cos(row * omega),
            ]
        ),
        rtol=1e-6,
    )


def test_ntk_alpha_index_follows_the_reference_formula():
    import math

    lengths = [1, 16, 17, 32, 33, 64, 65, 300, 16 << 20, (16 << 20) + 1]
    got = to_np(ntk_alpha_index(ops.convert_to_tensor(lengths), 16))
    for length, k in zip(lengths, got):
        context = math.log(length / 16, 2) + 1
        alpha = max(2 ** math.ceil(context) - 1, 1)
        assert max(2**k - 1, 1) == alpha, length
    # Past the table's last factor, prompts keep it (no row past the end).
    huge = ntk_alpha_index(ops.convert_to_tensor([2**31 - 1], "int32"), 16)
    assert to_np(huge)[0] == _MAX_NTK_DOUBLINGS - 1
    assert len(rotary_inverse_frequencies(8, 10000.0)) == _MAX_NTK_DOUBLINGS


# === Vision encoder ===


def test_vision_encoder_shapes_4d_and_5d():
    encoder = tiny_encoder()
    pixels = np.random.default_rng(0).standard_normal((3, 28, 28, 3))
    out = to_np(encoder(pixels.astype("float32")))
    assert out.shape == (3, QUERIES, 32)
    slots = to_np(encoder(pixels.reshape(1, 3, 28, 28, 3).astype("float32")))
    np.testing.assert_allclose(slots[0], out, atol=1e-5)


def test_shared_query_row_equals_the_query_repeated_per_row():
    from keras_qwenvl.adapter import QwenVLMultiHeadAttention

    keras.utils.set_random_seed(2)
    attention = QwenVLMultiHeadAttention(num_heads=2, head_dim=4)
    rng = np.random.default_rng(2)
    query = rng.standard_normal((1, 5, 8)).astype("float32")
    keys = rng.standard_normal((3, 7, 8)).astype("float32")
    shared = to_np(attention(query, keys))
    repeated = to_np(attention(np.repeat(query, 3, axis=0), keys))
    assert shared.shape == (3, 5, 8)
    np.testing.assert_allclose(shared, repeated, atol=1e-6)
    # The adapter shares its learned queries: each image of a batch gets
    # what it gets alone.
    encoder = tiny_encoder()
    pixels = rng.standard_normal((3, 28, 28, 3)).astype("float32")
    batch = to_np(encoder(pixels))
    for i in range(3):
        alone = to_np(encoder(pixels[i : i + 1]))
        np.testing.assert_allclose(batch[i], alone[0], atol=1e-5)


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="inspects XLA's compiled HLO"
)
def test_adapter_projects_its_learned_queries_once_per_batch():
    import re

    import jax

    encoder = tiny_encoder()
    pixels = np.zeros((3, 28, 28, 3), "float32")
    encoder(pixels)
    trainable = [v.value for v in encoder.trainable_variables]
    other = [v.value for v in encoder.non_trainable_variables]

    def run(trainable, other, pixels):
        return encoder.stateless_call(trainable, other, pixels)[0]

    hlo = jax.jit(run).lower(trainable, other, pixels).compile().as_text()
    shapes = re.findall(
        r"= f32\[([\d,]+)\]\S* \w+\(.*op_name=\"[^\"]*"
        r"adapter/attention/query/[^\"]*dot_general",
        hlo,
    )
    assert shapes, "no query projection found in the compiled function"
    for shape in shapes:
        rows = np.prod([int(d) for d in shape.split(",")]) // 32
        assert rows == QUERIES, shape

def test_window_attention_mask_and_encoder():
    mask = window_attention_mask(4, 2)
    assert mask.shape == (16, 16)
    assert mask[0, 1] and mask[0, 4] and mask[0, 5]  # same 2x2 window
    assert not mask[0, 2] and not mask[0, 8]
    pixels = np.random.default_rng(1).standard_normal((2, 28, 28, 3))
    pixels = pixels.astype("float32")
    keras.utils.set_random_seed(3)
    global_encoder = tiny_encoder()
    global_out = to_np(global_encoder(pixels))
    for window, expect_equal in ((4, True), (2, False)):
        windowed = tiny_encoder(window_size=window, global_attention_layers=[])
        windowed.set_weights(global_encoder.get_weights())
        out = to_np(windowed(pixels))
        assert np.allclose(out, global_out, atol=1e-5) == expect_equal


def test_spatial_start_for_training_from_scratch():
    from keras_qwenvl.vision_encoder import POSITION_TABLE_GRID

    keras.utils.set_random_seed(4)
    encoder = tiny_encoder(spatial_start=True)
    # The ViT's position table starts as the 2D sin-cos table at its 16 x 16
    # grid; the adapter's key projection as twice its query projection.
    np.testing.assert_allclose(
        to_np(encoder.position_embedding),
        sincos_2d_table(16, POSITION_TABLE_GRID),
        atol=1e-6,
    )
    attention = encoder.adapter.attention
    np.testing.assert_allclose(
        to_np(attention.key.kernel), 2.0 * to_np(attention.query.kernel)
    )
    # So each query starts with a bias towards the patches near its own
    # place (at the demo's adapter sizes: 36 queries of 256 over 8 x 8
    # patches): its mean score over them beats that over the others.
    def near_preference(spatial_start):
        rates = []
        for seed in (0, 1):
            keras.utils.set_random_seed(seed)
            encoder = tiny_encoder(
                image_size=56, width=32, num_layers=1, output_dim=256,
                num_queries=36, adapter_head_dim=64,
                spatial_start=spatial_start,
            )
            adapter, grid = encoder.adapter, encoder.grid_size
            pixels = np.random.default_rng(seed).standard_normal((1, 56, 56, 3))
            patches = encoder.patch_features(pixels.astype("float32"))
            kv = adapter.ln_kv(adapter.kv_proj(patches))
            keys = kv + resize_position_table(adapter.pos_embed, grid)[None]
            queries = adapter.ln_q(adapter.query) + adapter.pos_embed
            scores = to_np(
                ops.einsum(
                    "tnh,snh->ts",
                    adapter.attention.query(queries[None])[0],
                    adapter.attention.key(keys)[0],
                )
            )
            rows, columns = np.divmod(np.arange(grid * grid), grid)
            scale = grid / adapter.query_grid
            preferred = 0
            for index, row_scores in enumerate(scores):
                row, column = divmod(index, adapter.query_grid)
                distance = np.hypot(
                    rows - ((row + 0.5) * scale - 0.5),
                    columns - ((column + 0.5) * scale - 0.5),
                )
                near = distance <= 1.5
                preferred += row_scores[near].mean() > row_scores[~near].mean()
            rates.append(preferred / len(scores))
        return np.mean(rates)

    assert near_preference(True) >= 0.72
    assert near_preference(False) <= 0.65
    # The default is the published model's start: small random values,
    # separate projections.
    default = tiny_encoder()
    assert float(np.abs(to_np(default.position_embedding)).max()) < 0.2
    assert not np.allclose(
        to_np(default.adapter.attention.key.kernel),
        2.0 * to_np(default.adapter.attention.query.kernel),
    )
    # The option survives a config round trip; a width that no sin-cos
    # table fits is refused.
    config = encoder.get_config()
    assert config["spatial_start"] is True
    assert QwenVLVisionEncoder.from_config(config).adapter.local_start == 2.0
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny_encoder(width=18, num_heads=2, spatial_start=True)


def test_query_count_must_be_square():
    with pytest.raises(ValueError, match="square"):
        tiny_encoder(num_queries=10)


# === Image spans ===


def test_interleave_puts_kth_image_in_kth_span():
    features = np.arange(2 * 2 * QUERIES * 3, dtype="float32").reshape(
        2, 2, QUERIES, 3
    ) + 100
    rows = [
        [5] + span() + [6] + span() + [7],  # two spans, two images
        span() + [8, 9] + span(),  # second span has no image slot used below
    ]
    ids, _ = batch(rows)
    embeddings = np.zeros(ids.shape + (3,), "float32")
    # Sample 1 gets only one image slot worth of features.
    out = to_np(
        interleave_image_features(
            ops.convert_to_tensor(embeddings),
            ops.convert_to_tensor(ids),
            ops.convert_to_tensor(features),
            IMG,
        )
    )
    # Sample 0: positions 2..5 take image 0, positions 9..12 image 1.
    np.testing.assert_array_equal(out[0, 2 : 2 + QUERIES], features[0, 0])
    second = 1 + len(span()) + 1 + 1
    np.testing.assert_array_equal(
        out[0, second : second + QUERIES], features[0, 1]
    )
    # `<img>`, `</img>` and text positions keep their embeddings.
    kept = np.ones(ids.shape[1], bool)
    kept[2 : 2 + QUERIES] = False
    kept[second : second + QUERIES] = False
    assert not out[0, kept].any()
    # Sample 1: both spans filled from its own two slots.
    np.testing.assert_array_equal(out[1, 1 : 1 + QUERIES], features[1, 0])
    start = len(span()) + 2 + 1
    np.testing.assert_array_equal(out[1, start : start + QUERIES], features[1, 1])


def test_interleave_ignores_spans_without_slots():
    ids, _ = batch([span()])
    embeddings = np.ones(ids.shape + (3,), "float32")
    out = to_np(
        interleave_image_features(
            ops.convert_to_tensor(embeddings),
            ops.convert_to_tensor(ids),
            ops.zeros((1, 0, QUERIES, 3)),
            IMG,
        )
    )
    np.testing.assert_array_equal(out, embeddings)


def test_backbone_images_slots_text_only_and_omitted():
    backbone = tiny_backbone()
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 2, 28, 28, 3)).astype("float32")
    ids, mask = batch([[3, 4] + span() + [5], [3, 4, 5, 6]], length=10)
    out = to_np(backbone({"token_ids": ids, "padding_mask": mask, "images": images}))
    assert out.shape == (2, 10, 32)
    # Unused image slots are ignored: only sample 0's first slot is used.
    changed = images.copy()
    changed[0, 1] = 0
    changed[1] = rng.standard_normal((2, 28, 28, 3))
    again = to_np(
        backbone({"token_ids": ids, "padding_mask": mask, "images": changed})
    )
    np.testing.assert_allclose(again, out, atol=1e-5)
    # The used slot matters.
    changed[0, 0] += 1.0
    moved = to_np(
        backbone({"token_ids": ids, "padding_mask": mask, "images": changed})
    )
    assert not np.allclose(moved[0, 2:], out[0, 2:], atol=1e-4)
    # Text-only: `images` may be omitted, or have zero slots.
    text_ids, text_mask = batch([[3, 4, 5], [6, 7]])
    omitted = to_np(backbone({"token_ids": text_ids, "padding_mask": text_mask}))
    empty = to_np(
        backbone(
            {
                "token_ids": text_ids,
                "padding_mask": text_mask,
                "images": np.zeros((2, 0, 28, 28, 3), "float32"),
            }
        )
    )
    np.testing.assert_allclose(omitted, empty, atol=1e-6)


def test_backbone_config_round_trip_and_unknown_arguments():
    backbone = tiny_backbone()
    config = backbone.get_config()
    restored = QwenVLBackbone.from_config(config)
    assert restored.get_config() == config
    assert restored.count_params() == backbone.count_params()
    text_only = tiny_backbone(vision=False)
    assert "images" not in text_only.input
    with pytest.raises(TypeError, match="unexpected arguments.*bogus"):
        tiny_backbone(bogus=1)
    with pytest.raises(ValueError, match="output_dim"):
        tiny_backbone(hidden_dim=48, num_heads=2)


def test_padding_does_not_change_real_positions():
    backbone = tiny_backbone()
    ids, mask = batch([[3, 4] + span() + [5, 6]])
    images = np.random.default_rng(0).standard_normal((1, 1, 28, 28, 3))
    images = images.astype("float32")
    short = to_np(backbone({"token_ids": ids, "padding_mask": mask, "images": images}))
    ids_long, mask_long = batch([[3, 4] + span() + [5, 6]], length=ids.shape[1] + 5)
    long = to_np(
        backbone({"token_ids": ids_long, "padding_mask": mask_long, "images": images})
    )
    np.testing.assert_allclose(long[:, : ids.shape[1]], short, atol=1e-5)


def test_ntk_and_logn_only_at_inference_and_beyond_seq_length():
    backbone = tiny_backbone(seq_length=8)
    rng = np.random.default_rng(0)

    def run(model, length, **kwargs):
        ids = rng.integers(0, 200, (1, length)).astype("int32")
        x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
        return to_np(model(x, **kwargs)), x

    # Within seq_length inference equals training.
    short, x = run(backbone, 8)
    np.testing.assert_allclose(
        short, to_np(backbone(x, training=True)), atol=1e-5
    )
    # Beyond it, dynamic NTK rescales every position's rotary base.
    long, x = run(backbone, 20)
    training = to_np(backbone(x, training=True))
    assert not np.allclose(long[:, 1:8], training[:, 1:8], atol=1e-4)
    # Log-n alone changes only the queries past seq_length.
    logn_only = tiny_backbone(seq_length=8, use_dynamic_ntk=False)
    logn_only.set_weights(backbone.get_weights())
    got = to_np(logn_only(x))
    np.testing.assert_allclose(got[:, :8], training[:, :8], atol=1e-5)
    assert not np.allclose(got[:, 8:], training[:, 8:], atol=1e-4)
    np.testing.assert_allclose(
        to_np(logn_only(x, training=True)), training, atol=1e-5
    )


# === Causal LM: cache and generation ===


def test_cached_steps_equal_full_forward():
    backbone = tiny_backbone(seq_length=8)
    lm = QwenVLCausalLM(backbone)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((1, 1, 28, 28, 3)).astype("float32")
    ids = np.array([[3] + span() + list(rng.integers(0, 200, 8))], "int32")
    full = to_np(
        lm({"token_ids": ids, "padding_mask": np.ones_like(ids), "images": images})
    )
    prompt = 9
    lengths = ops.convert_to_tensor([ids.shape[1]], "int32")
    _, cache = lm._build_cache(
        ops.convert_to_tensor(ids[:, :prompt]), lengths, lm.backbone.vision_encoder(images)
    )
    # Grow the cache to the full length and decode the rest one by one.
    pad = ids.shape[1] - prompt
    # Keys are (b * heads, head_dim, s), values (b * heads, s, head_dim).
    cache = tuple(
        (
            ops.pad(key, [[0, 0], [0, 0], [0, pad]]),
            ops.pad(value, [[0, 0], [0, pad], [0, 0]]),
        )
        for key, value in cache
    )
    for i in range(prompt, ids.shape[1]):
        logits, _, cache = lm.call_with_cache(
            ops.convert_to_tensor(ids[:, i : i + 1]), cache, i, lengths
        )
        np.testing.assert_allclose(to_np(logits)[0, 0], full[0, i], atol=1e-4)


def test_batched_generation_equals_one_by_one():
    backbone = tiny_backbone(seq_length=8)
    lm = QwenVLCausalLM(backbone)
    lm.compile(sampler="greedy")
    rng = np.random.default_rng(2)
    prompts = [
        [3] + span() + [7, 8],
        [9, 10, 11],
        span() + [12] + span() + [13, 14, 15],
    ]
    images = rng.standard_normal((3, 2, 28, 28, 3)).astype("float32")
    length = 24
    ids, mask = batch(prompts, length)
    batched = lm.generate(
        {"token_ids": ids, "padding_mask": mask, "images": images},
        stop_token_ids=None,
    )
    for i, prompt in enumerate(prompts):
        one_ids, one_mask = batch([prompt], length)
        count = prompt.count(IMG)
        alone = lm.generate(
            {
                "token_ids": one_ids,
                "padding_mask": one_mask,
                "images": images[i : i + 1, :count],
            },
            stop_token_ids=None,
        )
        np.testing.assert_array_equal(
            np.asarray(batched["token_ids"])[i], np.asarray(alone["token_ids"])[0]
        )


def test_generation_stops_and_masks_after_stop_token():
    backbone = tiny_backbone(vision=False)
    lm = QwenVLCausalLM(backbone)
    lm.compile(sampler="greedy")
    ids, mask = batch([[3, 4, 5]], 12)
    free = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
    first_new = int(np.asarray(free["token_ids"])[0, 3])
    stopped = lm.generate(
        {"token_ids": ids, "padding_mask": mask}, stop_token_ids=(first_new,)
    )
    out_mask = np.asarray(stopped["padding_mask"])[0]
    # The stop token itself is kept, everything after it is masked.
    np.testing.assert_array_equal(out_mask, [1, 1, 1, 1] + [0] * 8)


def test_packed_segments_equal_samples_alone():
    """padding_mask holding segment ids packs samples into one row with no
    attention across them and positions restarting per sample."""
    backbone = tiny_backbone()
    rng = np.random.default_rng(4)
    first = [3, 4] + span() + [5, 6]
    second = [7] + span() + [8] + span() + [9]
    third = [10, 11, 12]
    images = rng.standard_normal((3, 28, 28, 3)).astype("float32")
    pad = 3
    ids = np.array([first + second + third + [0] * pad], "int32")
    segments = np.array(
        [[1] * len(first) + [2] * len(second) + [3] * len(third) + [0] * pad],
        "int32",
    )
    packed = to_np(
        backbone(
            {"token_ids": ids, "padding_mask": segments, "images": images[None]},
            training=True,
        )
    )[0]
    start = 0
    for sample, sample_images in (
        (first, images[:1]),
        (second, images[1:3]),
        (third, images[:0]),
    ):
        alone_ids, alone_mask = batch([sample])
        alone = to_np(
            backbone(
                {
                    "token_ids": alone_ids,
                    "padding_mask": alone_mask,
                    "images": sample_images[None],
                },
                training=True,
            )
        )[0]
        np.testing.assert_allclose(
            packed[start : start + len(sample)], alone, atol=1e-5
        )
        start += len(sample)


def test_image_span_length_follows_the_queries(tmp_path):
    from keras_qwenvl import QwenVLCausalLMPreprocessor
    from keras_qwenvl import QwenVLImageConverter
    from keras_qwenvl import QwenVLTokenizer
    from keras_qwenvl.tokenizer import write_byte_level_vocabulary

    vocabulary = write_byte_level_vocabulary(str(tmp_path / "v.tiktoken"))
    tokenizer = QwenVLTokenizer(vocabulary, image_span_length=QUERIES)
    ids = tokenizer.tokenize("a<img>b</img>c")
    start = tokenizer.image_start_token_id
    assert ids == [97, start, 98] + [tokenizer.pad_token_id] * (QUERIES - 1) + [
        tokenizer.image_end_token_id, 99
    ]
    assert tokenizer.detokenize(ids) == "a<img>b</img>c"
    restored = QwenVLTokenizer.from_config(tokenizer.get_config())
    assert restored.image_span_length == QUERIES

    backbone = tiny_backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        image_start_token_id=start,
    )
    converter = QwenVLImageConverter(image_size=(28, 28))
    QwenVLCausalLM(  # consistent: builds
        backbone, QwenVLCausalLMPreprocessor(tokenizer, converter)
    )
    wrong = QwenVLTokenizer(vocabulary)  # 256-position spans
    with pytest.raises(ValueError, match="image spans hold 256 positions"):
        QwenVLCausalLM(backbone, QwenVLCausalLMPreprocessor(wrong, converter))


def test_remat_gives_the_same_loss_and_gradients():
    """Rematerialised decoder blocks recompute activations in the backward
    pass; the training step's numbers do not change."""
    reference = QwenVLCausalLM(tiny_backbone())
    remat = QwenVLCausalLM(tiny_backbone(remat=True))
    assert remat.backbone.get_config()["remat"] is True
    remat.set_weights(reference.get_weights())
    rng = np.random.default_rng(0)
    ids, mask = batch([[3] + span() + list(rng.integers(0, 200, 6))])
    x = {
        "token_ids": ids,
        "padding_mask": mask,
        "images": rng.standard_normal((1, 1, 28, 28, 3)).astype("float32"),
    }
    y = np.roll(ids, -1, axis=1)
    losses = []
    for model in (reference, remat):
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        losses.append(model.train_on_batch(x, y))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    for a, b in zip(reference.get_weights(), remat.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_fresh_weights_are_distinct_and_projections_scaled_as_matrices():
    # Trained from scratch, a model must not start with equal query, key
    # and value kernels (an unseeded initializer repeats its values), and a
    # multi-head kernel (hidden, heads, head_dim) must be drawn with the
    # fans of the (hidden, heads * head_dim) matrix it is.
    # The encoder is made before `tiny_backbone` seeds Keras with 0: seeded
    # here with another value, its initializers draw their seeds from
    # another stream whatever tests ran before in this process (left to
    # the earlier tests' seed 0, they could repeat the decoder's draws).
    keras.utils.set_random_seed(1)
    encoder = tiny_encoder(width=64, output_dim=64)
    backbone = tiny_backbone(hidden_dim=64, num_heads=4, vision_encoder=encoder)
    kernels = {
        v.path: to_np(v)
        for v in backbone.weights
        if len(v.shape) >= 2 and np.std(to_np(v)) > 0
    }
    paths = sorted(kernels)
    for i, a in enumerate(paths):
        for b in paths[i + 1 :]:
            if kernels[a].size == kernels[b].size:
                same = np.allclose(kernels[a].ravel(), kernels[b].ravel())
                assert not same, (a, b)
    checked = 0
    for path, kernel in kernels.items():
        if path.endswith(("query/kernel", "key/kernel", "value/kernel")):
            fan_in, heads, head_dim = kernel.shape
            fan_out = heads * head_dim
        elif path.endswith("attention_output/kernel"):
            heads, head_dim, fan_out = kernel.shape
            fan_in = heads * head_dim
        elif path.endswith("patch_embedding/kernel"):
            # A patch is one (patch * patch * 3)-vector, not a sliding
            # convolution window.
            *patch, fan_out = kernel.shape
            fan_in = int(np.prod(patch))
        else:
            continue
        glorot_std = np.sqrt(2.0 / (fan_in + fan_out))
        np.testing.assert_allclose(np.std(kernel), glorot_std, rtol=0.15)
        checked += 1
    # Four projections in each of 2 ViT, 1 adapter and 2 decoder layers, and
    # the patch embedding.
    assert checked == 21
