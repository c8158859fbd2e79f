"""Convert a Hugging Face Qwen-VL checkpoint folder to Keras.

The published checkpoints (`Qwen/Qwen-VL`, `Qwen/Qwen-VL-Chat`) hold a
`config.json` with `"model_type": "qwen"` and a `visual` section, safetensors
weights (sharded with `model.safetensors.index.json`, or one
`model.safetensors`) and the tiktoken vocabulary `qwen.tiktoken`. keras-hub's
Hugging Face loader does not know that model type, so this module provides the
converter functions in keras-hub's layout (`convert_backbone_config`,
`convert_weights`, `convert_tokenizer`, ...) and `QwenVLPresetLoader`, the
preset loader built on them that `from_preset` of every Qwen-VL class uses.

Weights are checked before anything is assigned: a missing, unexpected or
mis-shaped tensor is a `ValueError` that lists all of them. After the
conversion every tensor must have been used and every Keras variable filled.
"""

import json
import struct

import ml_dtypes
import numpy as np
from keras_hub.src.utils.preset_utils import SAFETENSOR_CONFIG_FILE
from keras_hub.src.utils.preset_utils import SAFETENSOR_FILE
from keras_hub.src.utils.preset_utils import PresetLoader
from keras_hub.src.utils.preset_utils import check_file_exists
from keras_hub.src.utils.preset_utils import get_file
from keras_hub.src.utils.preset_utils import jax_memory_cleanup
from keras_hub.src.utils.transformers.safetensor_utils import SafetensorLoader
from tqdm.auto import tqdm

from keras_qwenvl.backbone import QwenVLBackbone
from keras_qwenvl.vision_encoder import QwenVLVisionEncoder

backbone_cls = QwenVLBackbone

VOCABULARY_FILE = "qwen.tiktoken"

# Fixed in the published `visual.py` (not in config.json): the ViT and
# adapter LayerNorms use eps 1e-6, the adapter has `n_queries` 256 queries
# unless the config says otherwise, and the learned ViT position table has
# 256 rows (a 16 x 16 grid).
VISION_LAYER_NORM_EPSILON = 1e-6
DEFAULT_NUM_QUERIES = 256
VISION_POSITION_ROWS = 256

# safetensors dtype names -> numpy dtypes (bfloat16 through ml_dtypes).
_SAFETENSOR_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
}


def _check_config(transformers_config):
    """Raise for a config.json that is not a supported Qwen-VL one."""
    model_type = transformers_config.get("model_type")
    if model_type != "qwen":
        raise ValueError(
            "Expected a Qwen-VL config.json with `\"model_type\": \"qwen\"` "
            f"and a `visual` section. Received model_type={model_type!r}."
        )
    if "visual" not in transformers_config:
        raise ValueError(
            "This config.json is a text-only Qwen checkpoint (no `visual` "
            "section); keras_qwenvl converts Qwen-VL checkpoints "
            "(Qwen/Qwen-VL, Qwen/Qwen-VL-Chat)."
        )
    if transformers_config.get("tie_word_embeddings", False):
        raise ValueError(
            "Qwen-VL checkpoints with `tie_word_embeddings: true` are not "
            "supported; the published models have a separate `lm_head`."
        )
    if not transformers_config.get("no_bias", True):
        raise ValueError(
            "Qwen-VL checkpoints with `no_bias: false` (biases on "
            "`attn.c_proj` and the MLP) are not supported; the published "
            "models use `no_bias: true`."
        )


def convert_backbone_config(transformers_config, dtype=None):
    """`QwenVLBackbone` keyword arguments for a Qwen-VL `config.json`.

    Args:
        transformers_config: dict, the checkpoint's `config.json`.
        dtype: optional dtype policy for the backbone and vision encoder.

    Returns:
        A dict of `QwenVLBackbone` arguments; `vision_encoder` is a new
        `QwenVLVisionEncoder` built from the `visual` section.
    """
    _check_config(transformers_config)
    visual = transformers_config["visual"]
    vision_encoder = QwenVLVisionEncoder(
        image_size=visual["image_size"],
        patch_size=visual["patch_size"],
        width=visual["width"],
        num_layers=visual["layers"],
        num_heads=visual["heads"],
        intermediate_dim=int(visual["width"] * visual["mlp_ratio"]),
        output_dim=visual["output_dim"],
        num_queries=visual.get("n_queries", DEFAULT_NUM_QUERIES),
        layer_norm_epsilon=VISION_LAYER_NORM_EPSILON,
        dtype=dtype,
    )
    return {
        "vocabulary_size": transformers_config["vocab_size"],
        "num_layers": transformers_config["num_hidden_layers"],
        "num_heads": transformers_config["num_attention_heads"],
        "hidden_dim": transformers_config["hidden_size"],
        # `intermediate_size` counts both MLP input matrices (w1 and w2).
        "intermediate_dim": transformers_config["intermediate_size"] // 2,
        "head_dim": transformers_config["kv_channels"],
        "layer_norm_epsilon": transformers_config["layer_norm_epsilon"],
        "rope_max_wavelength": transformers_config["rotary_emb_base"],
        "rotary_pct": transformers_config["rotary_pct"],
        "seq_length": transformers_config["seq_length"],
        "use_dynamic_ntk": transformers_config["use_dynamic_ntk"],
        "use_logn_attn": transformers_config["use_logn_attn"],
        "image_start_token_id": visual["image_start_id"],
        "vision_encoder": vision_encoder,
        "dtype": dtype,
    }


def checkpoint_layout(transformers_config):
    """Names and shapes of every tensor of a Qwen-VL checkpoint.

    The published layout (PyTorch Linear weights are [out, in]) for the sizes
    in `transformers_config`; see QWEN_VL_REFERENCE.md.

    Returns:
        A dict mapping tensor names to shape tuples.
    """
    _check_config(transformers_config)
    c = transformers_config
    h = c["hidden_size"]
    inner = c["num_attention_heads"] * c["kv_channels"]
    ff = c["intermediate_size"] // 2
    vocab = c["vocab_size"]
    v = c["visual"]
    w, out, patch = v["width"], v["output_dim"], v["patch_size"]
    mlp = int(w * v["mlp_ratio"])
    queries = v.get("n_queries", DEFAULT_NUM_QUERIES)

    layout = {"transformer.wte.weight": (vocab, h)}
    for i in range(c["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        layout.update(
            {
                p + "ln_1.weight": (h,),
                p + "attn.c_attn.weight": (3 * inner, h),
                p + "attn.c_attn.bias": (3 * inner,),
                p + "attn.c_proj.weight": (h, inner),
                p + "ln_2.weight": (h,),
                p + "mlp.w1.weight": (ff, h),
                p + "mlp.w2.weight": (ff, h),
                p + "mlp.c_proj.weight": (h, ff),
            }
        )
    layout["transformer.ln_f.weight"] = (h,)
    layout["lm_head.weight"] = (vocab, h)

    p = "transformer.visual."
    layout.update(
        {
            p + "conv1.weight": (w, 3, patch, patch),
            p + "positional_embedding": (VISION_POSITION_ROWS, w),
            p + "ln_pre.weight": (w,),
            p + "ln_pre.bias": (w,),
        }
    )
    for i in range(v["layers"]):
        b = f"{p}transformer.resblocks.{i}."
        for norm in ("ln_1", "ln_2"):
            layout[f"{b}{norm}.weight"] = (w,)
            layout[f"{b}{norm}.bias"] = (w,)
        layout.update(
            {
                b + "attn.in_proj.weight": (3 * w, w),
                b + "attn.in_proj.bias": (3 * w,),
                b + "attn.out_proj.weight": (w, w),
                b + "attn.out_proj.bias": (w,),
                b + "mlp.c_fc.weight": (mlp, w),
                b + "mlp.c_fc.bias": (mlp,),
                b + "mlp.c_proj.weight": (w, mlp),
                b + "mlp.c_proj.bias": (w,),
            }
        )
    a = p + "attn_pool."
    layout.update(
        {
            a + "query": (queries, out),
            a + "pos_embed": (queries, out),
            a + "kv_proj.weight": (out, w),
            a + "attn.in_proj_weight": (3 * out, out),
            a + "attn.in_proj_bias": (3 * out,),
            a + "attn.out_proj.weight": (out, out),
            a + "attn.out_proj.bias": (out,),
        }
    )
    for norm in ("ln_q", "ln_kv"):
        layout[f"{a}{norm}.weight"] = (out,)
        layout[f"{a}{norm}.bias"] = (out,)
    layout[p + "ln_post.weight"] = (out,)
    layout[p + "ln_post.bias"] = (out,)
    layout[p + "proj"] = (out, out)
    return layout


# === Hooks: checkpoint tensor -> Keras variable value ===


def _transposed(tensor, shape):
    """A PyTorch Linear weight [out, in] (or bias) as a Keras kernel [in, ...]
    of `shape`."""
    return np.reshape(np.transpose(tensor), shape)


def _block(index):
    """Hook taking the `index`-th of three contiguous blocks [Q | K | V] of a
    fused projection's output rows, as a Keras kernel or bias."""

    def hook(tensor, shape):
        return _transposed(np.split(tensor, 3, axis=0)[index], shape)

    return hook


def _interleaved_block(index, num_heads):
    """Hook for the ViT's fused `in_proj`, whose outputs are interleaved per
    head: (heads, [q | k | v] of head_dim) -> the `index`-th of q, k, v as a
    Keras (width, heads, head_dim) kernel or (heads, head_dim) bias."""

    def hook(tensor, shape):
        per_head = np.reshape(tensor, (num_heads, 3, -1) + tensor.shape[1:])
        block = per_head[:, index]  # (heads, head_dim[, width])
        if tensor.ndim == 2:
            block = np.transpose(block, (2, 0, 1))
        return np.reshape(block, shape)

    return hook


def _conv_kernel(tensor, shape):
    """PyTorch Conv2d weight (out, in, kh, kw) -> Keras (kh, kw, in, out)."""
    return np.transpose(tensor, (2, 3, 1, 0))


def _port_layer_norm(loader, layer, name):
    loader.port_weight(layer.gamma, name + ".weight")
    loader.port_weight(layer.beta, name + ".bias")


def _port_attention(loader, attention, prefix, qkv_name, qkv_hook, out_name):
    """Port a fused-QKV attention into `query`/`key`/`value` and
    `attention_output` (biases where the Keras layer has them)."""
    for index, dense in enumerate(
        (attention.query, attention.key, attention.value)
    ):
        loader.port_weight(
            dense.kernel, prefix + qkv_name + "weight", qkv_hook(index)
        )
        loader.port_weight(
            dense.bias, prefix + qkv_name + "bias", qkv_hook(index)
        )
    output = attention.attention_output
    loader.port_weight(
        output.kernel, prefix + out_name + ".weight", _transposed
    )
    if output.bias is not None:
        loader.port_weight(output.bias, prefix + out_name + ".bias")


def _port_decoder_layer(loader, layer, prefix):
    loader.port_weight(layer.pre_attention_norm.scale, prefix + "ln_1.weight")
    _port_attention(
        loader, layer.attention, prefix, "attn.c_attn.", _block, "attn.c_proj"
    )
    loader.port_weight(layer.pre_mlp_norm.scale, prefix + "ln_2.weight")
    # The MLP is c_proj(w1(x) * silu(w2(x))): w2 is the gated branch.
    for dense, name in (
        (layer.feedforward_intermediate_dense, "w1"),
        (layer.feedforward_gate_dense, "w2"),
        (layer.feedforward_output_dense, "c_proj"),
    ):
        loader.port_weight(
            dense.kernel, f"{prefix}mlp.{name}.weight", _transposed
        )


def _port_vision_encoder(loader, encoder, prefix):
    loader.port_weight(
        encoder.patch_embedding.kernel, prefix + "conv1.weight", _conv_kernel
    )
    loader.port_weight(
        encoder.position_embedding, prefix + "positional_embedding"
    )
    _port_layer_norm(loader, encoder.ln_pre, prefix + "ln_pre")
    for i, block in enumerate(encoder.vision_layers):
        b = f"{prefix}transformer.resblocks.{i}."
        _port_layer_norm(loader, block.ln_1, b + "ln_1")
        _port_layer_norm(loader, block.ln_2, b + "ln_2")
        heads = block.attention.num_heads
        _port_attention(
            loader,
            block.attention,
            b,
            "attn.in_proj.",
            lambda index: _interleaved_block(index, heads),
            "attn.out_proj",
        )
        for dense, name in ((block.mlp_fc, "c_fc"), (block.mlp_proj, "c_proj")):
            loader.port_weight(
                dense.kernel, f"{b}mlp.{name}.weight", _transposed
            )
            loader.port_weight(dense.bias, f"{b}mlp.{name}.bias")

    adapter = encoder.adapter
    a = prefix + "attn_pool."
    loader.port_weight(adapter.query, a + "query")
    loader.port_weight(adapter.pos_embed, a + "pos_embed")
    loader.port_weight(
        adapter.kv_proj.kernel, a + "kv_proj.weight", _transposed
    )
    _port_layer_norm(loader, adapter.ln_q, a + "ln_q")
    _port_layer_norm(loader, adapter.ln_kv, a + "ln_kv")
    _port_attention(
        loader, adapter.attention, a, "attn.in_proj_", _block, "attn.out_proj"
    )
    _port_layer_norm(loader, encoder.ln_post, prefix + "ln_post")
    # `proj` is applied as x @ proj: already [in, out].
    loader.port_weight(encoder.proj.kernel, prefix + "proj")


def convert_weights(backbone, loader, transformers_config):
    """Fill `backbone` from a Qwen-VL checkpoint, tensor by tensor.

    Args:
        backbone: a `QwenVLBackbone` built from `convert_backbone_config`.
        loader: an open `QwenVLSafetensorLoader` on the checkpoint folder.
        transformers_config: dict, the checkpoint's `config.json`.

    Raises:
        ValueError: before any assignment, listing every missing, unexpected
            and mis-shaped tensor; after it, listing tensors left unused or
            Keras variables left unfilled.
    """
    loader.check_layout(checkpoint_layout(transformers_config))
    embedding = backbone.token_embedding
    loader.port_weight(embedding.embeddings, "transformer.wte.weight")
    loader.port_weight(
        embedding.reverse_embeddings, "lm_head.weight", _transposed
    )
    for i, layer in enumerate(backbone.transformer_layers):
        _port_decoder_layer(loader, layer, f"transformer.h.{i}.")
    loader.port_weight(
        backbone.final_normalization.scale, "transformer.ln_f.weight"
    )
    _port_vision_encoder(loader, backbone.vision_encoder, "transformer.visual.")
    loader.check_complete(backbone)
    return backbone


def convert_tokenizer(cls, preset, transformers_config=None, **kwargs):
    """A `QwenVLTokenizer` (`cls`) on the folder's `qwen.tiktoken`, with
    image spans as long as the adapter's queries (`visual.n_queries`)."""
    if transformers_config is not None:
        kwargs.setdefault(
            "image_span_length",
            transformers_config["visual"].get("n_queries", 256),
        )
    return cls(vocabulary=get_file(preset, VOCABULARY_FILE), **kwargs)


def load_image_converter_config(preset, transformers_config):
    """`QwenVLImageConverter` arguments: square `visual.image_size`."""
    size = transformers_config["visual"]["image_size"]
    return {"image_size": (size, size)}


def load_preprocessor_config(preset, transformers_config):
    """`QwenVLCausalLMPreprocessor` arguments.

    `sequence_length` defaults to the config's `seq_length`, the context the
    model was trained with (2048 for the published models, paper stages 2-3);
    longer inputs work (dynamic NTK, log-n) when it is set higher.
    """
    return {"sequence_length": transformers_config["seq_length"]}


class QwenVLSafetensorLoader(SafetensorLoader):
    """keras-hub's `SafetensorLoader` with checks, for Qwen-VL checkpoints.

    Tensors are read straight from the files (no memory map), so a
    conversion holds about one checkpoint tensor besides the model. The last
    tensor read is kept, since the fused QKV projections are read once for
    three Keras variables. The loader records which tensors and Keras
    variables `port_weight` used, for `check_complete`.

    Args:
        preset: the checkpoint folder (or a handle `get_file` resolves).
        progress: if True, show a tqdm progress bar over the tensors.
    """

    def __init__(self, preset, progress=False):
        super().__init__(preset)
        if self.safetensor_config is not None:
            files = sorted(set(self.safetensor_config["weight_map"].values()))
        elif check_file_exists(preset, SAFETENSOR_FILE):
            files = [SAFETENSOR_FILE]
        else:
            raise ValueError(
                f"No safetensors weights in '{preset}': expected "
                f"{SAFETENSOR_CONFIG_FILE} with its shards, or "
                f"{SAFETENSOR_FILE}."
            )
        self._entries = {}  # tensor name -> (file path, header entry)
        for fname in files:
            path = get_file(preset, fname)
            for name, entry in _read_header(path).items():
                if name in self._entries:
                    raise ValueError(
                        f"Tensor '{name}' is stored twice in '{preset}'."
                    )
                self._entries[name] = (path, entry)
        self._last = (None, None)
        self._progress = progress
        self._bar = None
        self.expected = {}
        self.used_tensors = set()
        self.assigned_variables = set()

    def tensor_shapes(self):
        """Names and shapes of all tensors in the checkpoint (headers only)."""
        return {
            name: tuple(entry["shape"])
            for name, (_, entry) in self._entries.items()
        }

    def check_layout(self, expected):
        """Compare the checkpoint with `expected` names and shapes.

        Raises:
            ValueError: listing all missing, unexpected and mis-shaped
                tensors.
        """
        found = self.tensor_shapes()
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        misshaped = sorted(
            f"{name}: {found[name]} (expected {tuple(shape)})"
            for name, shape in expected.items()
            if name in found and found[name] != tuple(shape)
        )
        problems = [
            (f"missing tensors ({len(missing)})", missing),
            (f"unexpected tensors ({len(unexpected)})", unexpected),
            (f"mis-shaped tensors ({len(misshaped)})", misshaped),
        ]
        problems = [(title, names) for title, names in problems if names]
        if problems:
            lines = [
                f"The checkpoint in '{self.preset}' does not match the Qwen-VL "
                "layout of its config.json:"
            ]
            for title, names in problems:
                lines.append(f"  {title}:")
                lines.extend(f"    {name}" for name in names)
            raise ValueError("\n".join(lines))
        self.expected = dict(expected)
        if self._progress:
            self._bar = self.enter_context(
                tqdm(total=len(expected), unit="tensor", desc="converting")
            )

    def get_tensor(self, hf_weight_key):
        if self._last[0] == hf_weight_key:
            return self._last[1]
        if hf_weight_key not in self._entries:
            raise ValueError(
                f"Tensor '{hf_weight_key}' is not in the checkpoint "
                f"'{self.preset}'."
            )
        path, entry = self._entries[hf_weight_key]
        tensor = _read_tensor(path, entry)
        self._last = (hf_weight_key, tensor)
        return tensor

    def port_weight(self, keras_variable, hf_weight_key, hook_fn=None):
        tensor = self.get_tensor(hf_weight_key)
        shape = tuple(keras_variable.shape)
        try:
            value = hook_fn(tensor, list(shape)) if hook_fn else tensor
        except ValueError:  # a reshape to a shape of another size
            value = None
        if value is None or tuple(value.shape) != shape:
            raise ValueError(
                f"Tensor '{hf_weight_key}' {tuple(tensor.shape)} does not fit "
                f"Keras variable '{keras_variable.path}' {shape}: the model "
                "was not built from this checkpoint's config.json."
            )
        keras_variable.assign(value)
        if hf_weight_key not in self.used_tensors and self._bar is not None:
            self._bar.update(1)
        self.used_tensors.add(hf_weight_key)
        self.assigned_variables.add(id(keras_variable))

    def check_complete(self, model):
        """Raise if a checked tensor was never used or a variable of `model`
        was never assigned."""
        unused = sorted(set(self.expected) - self.used_tensors)
        unfilled = sorted(
            v.path
            for v in model.weights
            if id(v) not in self.assigned_variables
        )
        if unused or unfilled:
            raise ValueError(
                "Incomplete Qwen-VL conversion.\n"
                f"  checkpoint tensors never used: {unused}\n"
                f"  Keras variables never assigned: {unfilled}"
            )


def _read_header(path):
    """{name: {"dtype", "shape", "data_offsets"} with absolute offsets}."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    start = 8 + length
    for entry in header.values():
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = (start + begin, start + end)
    return header


def _read_tensor(path, entry):
    """Read one tensor from a safetensors file into a new numpy array."""
    if entry["dtype"] not in _SAFETENSOR_DTYPES:
        raise ValueError(
            f"Unsupported tensor dtype {entry['dtype']} in '{path}'; expected "
            f"one of {sorted(_SAFETENSOR_DTYPES)}."
        )
    tensor = np.empty(entry["shape"], dtype=_SAFETENSOR_DTYPES[entry["dtype"]])
    begin, end = entry["data_offsets"]
    if end - begin != tensor.nbytes:
        raise ValueError(f"Corrupt tensor entry {entry} in '{path}'.")
    with open(path, "rb") as f:
        f.seek(begin)
        if f.readinto(tensor.reshape(-1).view(np.uint8)) != tensor.nbytes:
            raise ValueError(f"'{path}' is truncated.")
    return tensor


class QwenVLPresetLoader(PresetLoader):
    """keras-hub preset loader for a Hugging Face Qwen-VL folder.

    keras-hub picks its Hugging Face converters by `model_type` and has none
    for "qwen"; `from_preset` of the Qwen-VL classes uses this loader instead.

    Args:
        preset: the checkpoint folder (or a handle such as `hf://Qwen/Qwen-VL`
            that keras-hub's `get_file` resolves), or None when only the
            config is known: then the model can be built with random weights,
            and loading weights or the tokenizer raises `ValueError` with
            `missing_files_message`.
        config: dict, the folder's `config.json`.
        missing_files_message: the error text when `preset` is None.
    """

    def __init__(self, preset, config, missing_files_message=None):
        _check_config(config)
        super().__init__(preset, config)
        self.missing_files_message = missing_files_message

    def _require_files(self):
        if self.preset is None:
            raise ValueError(self.missing_files_message)

    def check_backbone_class(self):
        return backbone_cls

    def check_checkpoint(self):
        """Check the folder's tensor names and shapes against config.json
        (file headers only), so that a bad checkpoint fails before a model
        is allocated."""
        self._require_files()
        with QwenVLSafetensorLoader(self.preset) as loader:
            loader.check_layout(checkpoint_layout(self.config))

    def load_backbone(self, cls, load_weights, **kwargs):
        if load_weights:
            self.check_checkpoint()
        backbone_kwargs, kwargs = self.get_backbone_kwargs(**kwargs)
        config = convert_backbone_config(self.config, **backbone_kwargs)
        backbone = cls(**{**config, **kwargs})
        if load_weights:
            jax_memory_cleanup(backbone)
            self.load_weights(backbone)
        return backbone

    def load_weights(self, backbone, progress=False):
        """Fill `backbone` from the folder's safetensors (see
        `convert_weights`); `progress` shows a progress bar."""
        self._require_files()
        with QwenVLSafetensorLoader(self.preset, progress=progress) as loader:
            convert_weights(backbone, loader, self.config)

    def load_tokenizer(self, cls, config_file=None, **kwargs):
        self._require_files()
        return convert_tokenizer(cls, self.preset, self.config, **kwargs)

    def load_image_converter(self, cls, **kwargs):
        config = load_image_converter_config(self.preset, self.config)
        return cls(**{**config, **kwargs})

    def load_preprocessor(self, cls, config_file=None, **kwargs):
        config = load_preprocessor_config(self.preset, self.config)
        return super().load_preprocessor(cls, **{**config, **kwargs})
