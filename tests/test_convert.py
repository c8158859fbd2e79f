"""Hugging Face Qwen-VL folder -> Keras: config, weights, checks, presets.

The golden random checkpoint (`golden_hf_dir`) has the published layout at
small sizes (hidden 128, 2 decoder layers, 4 heads of 32; ViT width 64,
2 layers, 4 heads; 112-pixel images; seq_length 512).
"""

import importlib.util
import json
import os
import subprocess
import sys

import keras
import keras_hub
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

import keras_qwenvl  # noqa: F401 (registers the classes and presets)
from keras_qwenvl import convert
from keras_qwenvl import presets
from keras_qwenvl.backbone import QwenVLBackbone
from keras_qwenvl.causal_lm import QwenVLCausalLM
from keras_qwenvl.causal_lm_preprocessor import QwenVLCausalLMPreprocessor
from keras_qwenvl.image_converter import QwenVLImageConverter
from keras_qwenvl.tokenizer import QwenVLTokenizer
from keras_qwenvl.vision_encoder import QwenVLVisionEncoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMG, IMG_END, IMG_PAD = 151857, 151858, 151859  # <img>, </img>, <imgpad>
PUBLISHED_PARAMETERS = 9_656_935_168  # Qwen-VL and Qwen-VL-Chat


def numpy(variable):
    return keras.ops.convert_to_numpy(variable)


# === Fixtures (one conversion per module) ===


@pytest.fixture(scope="module")
def hf_config(golden_hf_dir):
    with open(os.path.join(golden_hf_dir, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def hf_tensors(golden_hf_dir):
    """Every tensor of the golden checkpoint, read with safetensors."""
    tensors = {}
    for name in sorted(os.listdir(golden_hf_dir)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(golden_hf_dir, name)))
    return tensors


@pytest.fixture(scope="module")
def causal_lm(golden_hf_dir):
    return QwenVLCausalLM.from_preset(golden_hf_dir)


@pytest.fixture(scope="module")
def backbone(causal_lm):
    return causal_lm.backbone


@pytest.fixture
def hf_copy(golden_hf_dir, hf_tensors, tmp_path):
    """`write(tensors)`: a copy of the golden folder in tmp_path whose
    weights are `tensors`, as one model.safetensors."""

    def write(tensors):
        for name in ("config.json", "qwen.tiktoken"):
            os.symlink(
                os.path.join(golden_hf_dir, name), tmp_path / name
            )
        save_file(tensors, str(tmp_path / "model.safetensors"))
        return str(tmp_path)

    return write


def short_input(image_size):
    """One image span and a few text tokens, with a deterministic image."""
    ids = [IMG] + [IMG_PAD] * 256 + [IMG_END] + [9707, 11, 1879, 0]
    ids = np.array([ids], dtype="int32")
    rng = np.random.default_rng(0)
    images = rng.standard_normal((1, 1, image_size, image_size, 3))
    return {
        "token_ids": ids,
        "padding_mask": np.ones_like(ids),
        "images": images.astype("float32"),
    }


# === Config ===


def test_convert_backbone_config_reads_every_field(hf_config):
    config = convert.convert_backbone_config(hf_config)
    encoder = config.pop("vision_encoder")
    assert config == {
        "vocabulary_size": 151936,
        "num_layers": 2,
        "num_heads": 4,
        "hidden_dim": 128,
        "intermediate_dim": 256,  # intermediate_size 512 // 2
        "head_dim": 32,  # kv_channels
        "layer_norm_epsilon": 1e-6,
        "rope_max_wavelength": 10000,
        "rotary_pct": 1.0,
        "seq_length": 512,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "image_start_token_id": 151857,
        "dtype": None,
    }
    assert isinstance(encoder, QwenVLVisionEncoder)
    assert (
        encoder.image_size,
        encoder.patch_size,
        encoder.width,
        encoder.num_layers,
        encoder.num_heads,
        encoder.intermediate_dim,  # int(64 * 4.9231)
        encoder.output_dim,
        encoder.num_queries,
        encoder.layer_norm_epsilon,
    ) == (112, 14, 64, 2, 4, 315, 128, 256, 1e-6)


def test_published_config_gives_the_published_architecture(monkeypatch):
    # Record the vision encoder's arguments instead of allocating it.
    monkeypatch.setattr(convert, "QwenVLVisionEncoder", lambda **kw: kw)
    config = convert.convert_backbone_config(presets.PUBLISHED_CONFIG)
    assert config["vision_encoder"] == {
        "image_size": 448,
        "patch_size": 14,
        "width": 1664,
        "num_layers": 48,
        "num_heads": 16,
        "intermediate_dim": 8192,  # int(1664 * 4.9231)
        "output_dim": 4096,
        "num_queries": 256,
        "layer_norm_epsilon": 1e-6,
        "dtype": None,
    }
    assert config["vocabulary_size"] == 151936
    assert (config["num_layers"], config["num_heads"], config["head_dim"]) == (
        32,
        32,
        128,
    )
    assert (config["hidden_dim"], config["intermediate_dim"]) == (4096, 11008)
    assert config["seq_length"] == 2048
    assert config["rope_max_wavelength"] == 10000
    assert config["use_dynamic_ntk"] and config["use_logn_attn"]
    layout = convert.checkpoint_layout(presets.PUBLISHED_CONFIG)
    total = sum(int(np.prod(shape)) for shape in layout.values())
    assert total == PUBLISHED_PARAMETERS


def test_checkpoint_layout_is_the_published_layout(golden, hf_config):
    # The fixture writer documents the published names and shapes.
    path = os.path.join(
        os.path.dirname(golden["images_dir"]), "make_checkpoint.py"
    )
    spec = importlib.util.spec_from_file_location("make_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = module.parameter_shapes(hf_config)
    assert convert.checkpoint_layout(hf_config) == {
        name: tuple(shape) for name, shape in expected.items()
    }


def test_config_errors(hf_config):
    text_only = {k: v for k, v in hf_config.items() if k != "visual"}
    with pytest.raises(ValueError, match="text-only Qwen checkpoint"):
        convert.convert_backbone_config(text_only)
    with pytest.raises(ValueError, match="model_type='llama'"):
        convert.convert_backbone_config({**hf_config, "model_type": "llama"})
    with pytest.raises(ValueError, match="no_bias: false"):
        convert.checkpoint_layout({**hf_config, "no_bias": False})
    with pytest.raises(ValueError, match="tie_word_embeddings: true"):
        convert.checkpoint_layout({**hf_config, "tie_word_embeddings": True})


# === from_preset on a Hugging Face folder ===


def test_from_preset_builds_every_class(golden_hf_dir, causal_lm):
    assert isinstance(causal_lm, QwenVLCausalLM)
    backbone = causal_lm.backbone
    assert isinstance(backbone, QwenVLBackbone)
    assert (backbone.num_layers, backbone.hidden_dim) == (2, 128)
    assert backbone.vision_encoder.image_size == 112

    preprocessor = causal_lm.preprocessor
    assert isinstance(preprocessor, QwenVLCausalLMPreprocessor)
    assert preprocessor.sequence_length == 512  # config seq_length
    assert preprocessor.image_converter.image_size == (112, 112)
    assert preprocessor.tokenizer.vocabulary_size() == 151860

    tokenizer = QwenVLTokenizer.from_preset(golden_hf_dir)
    assert tokenizer.token_to_id("<img>") == IMG
    converter = QwenVLImageConverter.from_preset(golden_hf_dir)
    assert converter.image_size == (112, 112)
    preprocessor = QwenVLCausalLMPreprocessor.from_preset(
        golden_hf_dir, sequence_length=64
    )
    assert preprocessor.sequence_length == 64


def test_from_preset_backbone_with_dtype(golden_hf_dir, hf_tensors):
    backbone = QwenVLBackbone.from_preset(golden_hf_dir, dtype="bfloat16")
    assert {v.dtype for v in backbone.weights} == {"bfloat16"}
    assert backbone.vision_encoder.dtype_policy.name == "bfloat16"
    expected = hf_tensors["transformer.wte.weight"].astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(
        numpy(backbone.token_embedding.embeddings), expected
    )


def test_tensors_land_in_the_right_variables(backbone, hf_tensors):
    t = hf_tensors
    h, heads, d = 128, 4, 32
    emb = backbone.token_embedding
    np.testing.assert_array_equal(
        numpy(emb.embeddings), t["transformer.wte.weight"]
    )
    np.testing.assert_array_equal(
        numpy(emb.reverse_embeddings), t["lm_head.weight"].T
    )
    np.testing.assert_array_equal(
        numpy(backbone.final_normalization.scale), t["transformer.ln_f.weight"]
    )

    layer = backbone.transformer_layers[1]
    p = "transformer.h.1."
    attention = layer.attention
    c_attn, c_attn_bias = t[p + "attn.c_attn.weight"], t[p + "attn.c_attn.bias"]
    for block, dense in enumerate(
        (attention.query, attention.key, attention.value)
    ):
        for head in range(heads):
            rows = slice(block * h + head * d, block * h + (head + 1) * d)
            np.testing.assert_array_equal(
                numpy(dense.kernel)[:, head, :], c_attn[rows].T
            )
            np.testing.assert_array_equal(
                numpy(dense.bias)[head], c_attn_bias[rows]
            )
    c_proj = t[p + "attn.c_proj.weight"]
    for head in range(heads):
        np.testing.assert_array_equal(
            numpy(attention.attention_output.kernel)[head],
            c_proj[:, head * d : (head + 1) * d].T,
        )
    # w1 is the plain branch, w2 the silu-gated one.
    np.testing.assert_array_equal(
        numpy(layer.feedforward_intermediate_dense.kernel),
        t[p + "mlp.w1.weight"].T,
    )
    np.testing.assert_array_equal(
        numpy(layer.feedforward_gate_dense.kernel), t[p + "mlp.w2.weight"].T
    )
    np.testing.assert_array_equal(
        numpy(layer.feedforward_output_dense.kernel),
        t[p + "mlp.c_proj.weight"].T,
    )
    np.testing.assert_array_equal(
        numpy(layer.pre_mlp_norm.scale), t[p + "ln_2.weight"]
    )


def test_vision_tensors_land_in_the_right_variables(backbone, hf_tensors):
    t = hf_tensors
    encoder = backbone.vision_encoder
    v = "transformer.visual."
    conv = t[v + "conv1.weight"]  # (width, 3, 14, 14)
    kernel = numpy(encoder.patch_embedding.kernel)  # (14, 14, 3, width)
    for out_channel, in_channel in ((0, 0), (5, 2), (63, 1)):
        np.testing.assert_array_equal(
            kernel[:, :, in_channel, out_channel], conv[out_channel, in_channel]
        )
    np.testing.assert_array_equal(
        numpy(encoder.position_embedding), t[v + "positional_embedding"]
    )

    # The ViT's in_proj is interleaved per head: head j's rows are
    # [q_j | k_j | v_j], each head_dim = 16 long.
    width, heads, hd = 64, 4, 16
    block = encoder.vision_layers[1]
    b = v + "transformer.resblocks.1."
    in_proj, in_bias = t[b + "attn.in_proj.weight"], t[b + "attn.in_proj.bias"]
    attention = block.attention
    dense_layers = (attention.query, attention.key, attention.value)
    for part, dense in enumerate(dense_layers):
        for head in range(heads):
            start = head * 3 * hd + part * hd
            rows = slice(start, start + hd)
            np.testing.assert_array_equal(
                numpy(dense.kernel)[:, head, :], in_proj[rows].T
            )
            np.testing.assert_array_equal(
                numpy(dense.bias)[head], in_bias[rows]
            )
    out_proj = t[b + "attn.out_proj.weight"]
    np.testing.assert_array_equal(
        numpy(attention.attention_output.kernel).reshape(width, width),
        out_proj.T,
    )
    np.testing.assert_array_equal(
        numpy(attention.attention_output.bias), t[b + "attn.out_proj.bias"]
    )
    np.testing.assert_array_equal(
        numpy(block.mlp_fc.kernel), t[b + "mlp.c_fc.weight"].T
    )
    np.testing.assert_array_equal(
        numpy(block.mlp_proj.bias), t[b + "mlp.c_proj.bias"]
    )
    np.testing.assert_array_equal(numpy(block.ln_2.beta), t[b + "ln_2.bias"])

    # The adapter's attention is [Q | K | V] (one head of 128 here).
    adapter = encoder.adapter
    a = v + "attn_pool."
    out = 128
    in_proj = t[a + "attn.in_proj_weight"]
    pool = adapter.attention
    for part, dense in enumerate((pool.query, pool.key, pool.value)):
        rows = slice(part * out, (part + 1) * out)
        np.testing.assert_array_equal(
            numpy(dense.kernel)[:, 0, :], in_proj[rows].T
        )
    np.testing.assert_array_equal(numpy(adapter.query), t[a + "query"])
    np.testing.assert_array_equal(numpy(adapter.pos_embed), t[a + "pos_embed"])
    np.testing.assert_array_equal(
        numpy(adapter.kv_proj.kernel), t[a + "kv_proj.weight"].T
    )
    np.testing.assert_array_equal(
        numpy(adapter.ln_kv.gamma), t[a + "ln_kv.weight"]
    )
    # `proj` is applied as x @ proj: copied as is.
    np.testing.assert_array_equal(numpy(encoder.proj.kernel), t[v + "proj"])


def relative_error(actual, reference):
    return np.abs(actual - reference).max() / np.abs(reference).max()


def test_converted_model_matches_the_reference(backbone, golden):
    # Golden fixture A: outputs of the original code on this checkpoint.
    arrays = golden["arrays"]
    features = numpy(backbone.vision_encoder(arrays["0_pixels"]))
    assert relative_error(features, arrays["0_image_features"]) < 1e-4
    case = 2  # text_only_chat, 29 tokens
    ids = np.array([golden["cases"][case]["input_ids"]], dtype="int32")
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    hidden = numpy(backbone(inputs))
    assert relative_error(hidden[0], arrays[f"{case}_last_hidden"]) < 1e-4


# === Checks of names and shapes ===


def test_single_file_bfloat16_checkpoint(hf_copy, hf_tensors):
    folder = hf_copy(
        {k: v.astype(ml_dtypes.bfloat16) for k, v in hf_tensors.items()}
    )
    backbone = QwenVLBackbone.from_preset(folder)
    layer = backbone.transformer_layers[0]
    expected = hf_tensors["transformer.h.0.mlp.w2.weight"].T
    np.testing.assert_array_equal(
        numpy(layer.feedforward_gate_dense.kernel),
        expected.astype(ml_dtypes.bfloat16).astype("float32"),
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda t: t.pop("transformer.h.1.mlp.w2.weight"),
            r"missing tensors \(1\):\n    transformer\.h\.1\.mlp\.w2\.weight",
        ),
        (
            lambda t: t.update({"transformer.h.2.ln_1.weight": np.ones(128)}),
            r"unexpected tensors \(1\):\n    transformer\.h\.2\.ln_1\.weight",
        ),
        (
            lambda t: t.update(
                {"transformer.visual.proj": np.zeros((128, 64), "float32")}
            ),
            r"mis-shaped tensors \(1\):\n    transformer\.visual\.proj: "
            r"\(128, 64\) \(expected \(128, 128\)\)",
        ),
    ],
    ids=["missing", "unexpected", "mis-shaped"],
)
def test_checkpoint_errors(
    hf_copy, hf_tensors, hf_config, backbone, change, message
):
    tensors = dict(hf_tensors)
    change(tensors)
    folder = hf_copy(tensors)
    before = numpy(backbone.token_embedding.embeddings).copy()
    with convert.QwenVLSafetensorLoader(folder) as loader:
        with pytest.raises(ValueError, match=message):
            convert.convert_weights(backbone, loader, hf_config)
    # Checked before anything is assigned.
    np.testing.assert_array_equal(
        numpy(backbone.token_embedding.embeddings), before
    )


def test_all_problems_are_listed_together(hf_copy, hf_tensors, monkeypatch):
    tensors = dict(hf_tensors)
    del tensors["lm_head.weight"]
    del tensors["transformer.ln_f.weight"]
    tensors["extra.weight"] = np.ones(3, "float32")
    folder = hf_copy(tensors)

    def build(*args, **kwargs):
        raise AssertionError("the model was built before the check")

    monkeypatch.setattr(convert, "convert_backbone_config", build)
    with pytest.raises(ValueError) as info:
        QwenVLBackbone.from_preset(folder)
    text = str(info.value)
    assert "missing tensors (2):" in text
    assert "lm_head.weight" in text and "transformer.ln_f.weight" in text
    assert "unexpected tensors (1):\n    extra.weight" in text


def test_model_not_built_from_the_config_is_an_error(
    golden_hf_dir, hf_config
):
    # One decoder layer fewer than the checkpoint: layer 1's tensors are
    # never used.
    config = {**hf_config, "num_hidden_layers": 1}
    smaller = QwenVLBackbone(**convert.convert_backbone_config(config))
    with convert.QwenVLSafetensorLoader(golden_hf_dir) as loader:
        with pytest.raises(ValueError, match="never used: .*transformer.h.1"):
            convert.convert_weights(smaller, loader, hf_config)
    # Narrower MLP matrices than the checkpoint's.
    config = {**hf_config, "num_hidden_layers": 1, "intermediate_size": 256}
    narrower = QwenVLBackbone(**convert.convert_backbone_config(config))
    with convert.QwenVLSafetensorLoader(golden_hf_dir) as loader:
        with pytest.raises(
            ValueError,
            match=r"'transformer.h.0.mlp.w1.weight' \(256, 128\) does not "
            r"fit Keras variable '.*feedforward_intermediate_dense/kernel' "
            r"\(128, 128\)",
        ):
            convert.convert_weights(narrower, loader, hf_config)


def test_folder_without_weights(golden_hf_dir, tmp_path):
    os.symlink(
        os.path.join(golden_hf_dir, "config.json"), tmp_path / "config.json"
    )
    with pytest.raises(ValueError, match="No safetensors weights"):
        QwenVLBackbone.from_preset(str(tmp_path))


# === Registered presets ===


@pytest.fixture
def tiny_registered(monkeypatch, hf_config):
    """`qwen_vl_7b` with the golden config in place of the published one,
    so that building it is cheap; no folder in the environment."""
    monkeypatch.setitem(
        presets.backbone_presets["qwen_vl_7b"], "config", hf_config
    )
    monkeypatch.delenv(presets.preset_env_var("qwen_vl_7b"), raising=False)


def test_registered_presets_are_listed():
    # keras_qwenvl/__init__.py registers them, as keras-hub's model packages
    # do: register_presets(backbone_presets, QwenVLBackbone).
    for cls in (QwenVLBackbone, QwenVLCausalLM, QwenVLTokenizer):
        assert {"qwen_vl_7b", "qwen_vl_chat_7b"} <= set(cls.presets)


def test_registered_preset_without_folder(tiny_registered, hf_config):
    backbone = QwenVLBackbone.from_preset("qwen_vl_7b", load_weights=False)
    layout = convert.checkpoint_layout(hf_config)
    assert backbone.count_params() == sum(
        int(np.prod(s)) for s in layout.values()
    )
    download = r"huggingface-cli download Qwen/Qwen-VL --local-dir"
    for load in (
        lambda: QwenVLBackbone.from_preset("qwen_vl_7b"),
        lambda: QwenVLCausalLM.from_preset("qwen_vl_7b"),
        lambda: QwenVLTokenizer.from_preset("qwen_vl_7b"),
        lambda: QwenVLCausalLMPreprocessor.from_preset("qwen_vl_7b"),
    ):
        with pytest.raises(ValueError, match=download) as info:
            load()
        assert "KERAS_QWENVL_QWEN_VL_7B=" in str(info.value)
    converter = QwenVLImageConverter.from_preset("qwen_vl_7b")
    assert converter.image_size == (112, 112)


def test_registered_task_without_folder_has_no_preprocessor(tiny_registered):
    with pytest.warns(UserWarning, match="without a preprocessor"):
        model = QwenVLCausalLM.from_preset("qwen_vl_7b", load_weights=False)
    assert model.preprocessor is None
    assert isinstance(model.backbone, QwenVLBackbone)


def test_registered_preset_from_environment(
    tiny_registered, monkeypatch, golden_hf_dir, hf_tensors
):
    monkeypatch.setenv("KERAS_QWENVL_QWEN_VL_7B", golden_hf_dir)
    backbone = QwenVLBackbone.from_preset("qwen_vl_7b")
    np.testing.assert_array_equal(
        numpy(backbone.vision_encoder.proj.kernel),
        hf_tensors["transformer.visual.proj"],
    )
    tokenizer = QwenVLTokenizer.from_preset("qwen_vl_7b")
    assert tokenizer.vocabulary_size() == 151860

    monkeypatch.setenv("KERAS_QWENVL_QWEN_VL_7B", golden_hf_dir + "-absent")
    with pytest.raises(ValueError, match="does not name a folder"):
        QwenVLBackbone.from_preset("qwen_vl_7b")


@pytest.mark.large
def test_published_model_has_the_published_parameter_count():
    backbone = QwenVLBackbone.from_preset(
        "qwen_vl_7b", load_weights=False, dtype="bfloat16"
    )
    assert backbone.count_params() == PUBLISHED_PARAMETERS


# === The conversion tool ===

TOOL = os.path.join(REPO, "tools", "convert_qwen_vl_checkpoint.py")


def test_conversion_tool_writes_a_keras_preset(
    golden_hf_dir, hf_config, causal_lm, tmp_path, monkeypatch
):
    out = tmp_path / "preset"
    command = [sys.executable, TOOL, "--hf-dir", golden_hf_dir]
    command += ["--preset-dir", str(out), "--dtype", "float32"]
    result = subprocess.run(
        command,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    layout = convert.checkpoint_layout(hf_config)
    total = sum(int(np.prod(shape)) for shape in layout.values())
    assert f"{total:,} parameters" in result.stdout
    assert "peak RSS" in result.stdout
    assert f"{len(layout)}/{len(layout)}" in result.stderr  # progress bar

    loaded = keras_hub.models.CausalLM.from_preset(str(out))
    assert isinstance(loaded, QwenVLCausalLM)
    assert isinstance(loaded.preprocessor, QwenVLCausalLMPreprocessor)
    assert loaded.preprocessor.tokenizer.vocabulary_size() == 151860
    inputs = short_input(112)
    np.testing.assert_array_equal(
        numpy(loaded(inputs)), numpy(causal_lm(inputs))
    )

    # A registered name may point at the Keras preset too.
    monkeypatch.setenv("KERAS_QWENVL_QWEN_VL_CHAT_7B", str(out))
    backbone = QwenVLBackbone.from_preset("qwen_vl_chat_7b")
    np.testing.assert_array_equal(
        numpy(backbone.token_embedding.embeddings),
        numpy(causal_lm.backbone.token_embedding.embeddings),
    )


def test_conversion_tool_errors(hf_copy, hf_tensors, tmp_path):
    spec = importlib.util.spec_from_file_location("convert_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tensors = dict(hf_tensors)
    del tensors["transformer.visual.ln_post.bias"]
    folder = hf_copy(tensors)
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit, match=r"missing tensors \(1\)"):
        tool.main(["--hf-dir", folder, "--preset-dir", out])
    with pytest.raises(SystemExit, match="is not a folder"):
        tool.main(["--hf-dir", folder + "-absent", "--preset-dir", out])
    with pytest.raises(SystemExit, match="is not empty"):
        tool.main(["--hf-dir", folder, "--preset-dir", folder])
