"""`generate()` compiles once per padded shape.

keras-hub pads every prompt to `max_length` before the compiled generate
function sees it, so new prompts of other lengths reuse the trace. JAX
(`jax.jit`) and TensorFlow (`tf.function`) run the Python body of
`generate_step` only when they trace, so counting its calls counts traces.
PyTorch runs it eagerly on every call; there the test checks what a
compiler would key on: every call sees the same input shapes.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_qwenvl import QwenVLCausalLM
from tests.test_model import tiny_backbone
from tests.test_model import tiny_causal_lm

MAX_LENGTH = 40
EAGER = keras.config.backend() == "torch"


@pytest.fixture
def causal_lm(tmp_path):
    """A tiny multimodal model with a byte-level preprocessor."""
    lm = tiny_causal_lm(str(tmp_path))
    lm.compile(sampler="greedy")
    return lm


def count_generate_steps(causal_lm, monkeypatch):
    """Wraps `generate_step`; returns the list of input shapes it saw."""
    seen = []
    step = causal_lm.generate_step

    def counting_step(inputs, stop_token_ids=None):
        seen.append({key: tuple(value.shape) for key, value in inputs.items()})
        return step(inputs, stop_token_ids)

    monkeypatch.setattr(causal_lm, "generate_step", counting_step)
    return seen


def test_new_prompt_lengths_do_not_retrace(causal_lm, monkeypatch):
    seen = count_generate_steps(causal_lm, monkeypatch)
    image = np.random.default_rng(0).uniform(0, 255, (28, 28, 3))
    prompts = [
        "<img>a</img>hello",
        "<img>a</img>a much longer prompt than before",
        "<img>a</img>hi",
    ]
    lengths = set()
    for prompt in prompts:
        x = causal_lm.preprocessor.generate_preprocess(
            {"prompts": [prompt], "images": [[image]]},
            sequence_length=MAX_LENGTH,
        )
        lengths.add(int(np.sum(ops.convert_to_numpy(x["padding_mask"]))))
        output = causal_lm.generate(
            {"prompts": prompt, "images": [image]},
            max_length=MAX_LENGTH,
            strip_prompt=True,
        )
        assert isinstance(output, str)
    assert len(lengths) == 3  # the prompts really differ in length
    assert len(seen) == (3 if EAGER else 1)
    assert all(shapes == seen[0] for shapes in seen)
    assert seen[0]["token_ids"] == (1, MAX_LENGTH)

    # Another padded length is another shape: the counter sees the trace.
    causal_lm.generate(
        {"prompts": prompts[0], "images": [image]}, max_length=MAX_LENGTH + 8
    )
    assert len(seen) == (4 if EAGER else 2)
    assert seen[-1]["token_ids"] == (1, MAX_LENGTH + 8)


def test_text_batches_of_other_lengths_do_not_retrace(causal_lm, monkeypatch):
    """Preprocessed batches (no preprocessor in the loop) of one padded
    shape share one trace whatever their prompt lengths."""
    bare = QwenVLCausalLM(causal_lm.backbone, preprocessor=None)
    bare.compile(sampler="greedy")
    seen = count_generate_steps(bare, monkeypatch)
    rng = np.random.default_rng(1)
    for lengths in ([3, 9], [12, 5], [7, 7]):
        ids = np.zeros((2, MAX_LENGTH), "int32")
        mask = np.zeros((2, MAX_LENGTH), "int32")
        for row, length in enumerate(lengths):
            ids[row, :length] = rng.integers(1, 200, length)
            mask[row, :length] = 1
        out = bare.generate(
            {"token_ids": ids, "padding_mask": mask}, stop_token_ids=None
        )
        # Prompts are kept and every position after them is generated.
        np.testing.assert_array_equal(
            np.asarray(out["token_ids"])[mask.astype(bool)], ids[mask.astype(bool)]
        )
        assert np.asarray(out["padding_mask"]).all()
    assert len(seen) == (3 if EAGER else 1)
    assert all(shapes == seen[0] for shapes in seen)


@pytest.mark.skipif(
    keras.config.backend() != "tensorflow", reason="TensorFlow's XLA switch"
)
def test_tensorflow_generates_under_xla_unless_told_not_to(causal_lm):
    """Keras' "auto" leaves XLA off on a CPU; generation compiles with it
    anyway, and `jit_compile=False` gives keras-hub's graph back: the
    same tokens either way."""
    image = np.random.default_rng(0).uniform(0, 255, (28, 28, 3))
    inputs = {"prompts": ["<img>a</img>hello"], "images": [[image]]}
    with_xla = causal_lm.generate(inputs, max_length=MAX_LENGTH)
    assert causal_lm.generate_function._jit_compile is True
    causal_lm.compile(sampler="greedy", jit_compile=False)
    graph = causal_lm.generate(inputs, max_length=MAX_LENGTH)
    assert not causal_lm.generate_function._jit_compile
    assert with_xla == graph
    assert len(with_xla[0]) > len(inputs["prompts"][0])


def hlo_computation(text, name):
    """The computation `name` of the HLO module `text`, header to end."""
    body = text[text.index(f"\n%{name} ") :]
    return body[: body.index("\n}\n")]


def tensorflow_looped_products(causal_lm, inputs):
    """The products that TensorFlow's XLA compiles into loop fusions
    (element by element) in the generate function, and its tokens."""
    import re

    import tensorflow as tf

    causal_lm.generate_function = None
    function = causal_lm.make_generate_function()
    inputs = {key: tf.constant(value) for key, value in inputs.items()}
    text = function.experimental_get_compiler_ir(inputs, None)(
        stage="optimized_hlo"
    )
    products = []
    for name in set(re.findall(r"kind=kLoop, calls=%([\w.\-]+)", text)):
        body = hlo_computation(text, name)
        products += re.findall(r"= (\w+\[[\d,]*\])\S* dot\(", body)
    tokens = function(inputs, None)["token_ids"]
    return products, ops.convert_to_numpy(tokens)


@pytest.mark.skipif(
    keras.config.backend() != "tensorflow", reason="TensorFlow's XLA"
)
def test_tensorflow_batch_one_decoding_runs_library_products(monkeypatch):
    """At batch 1 the attention's projections stay XLA library products
    (`decoder.two_row_projection`): a one-row product by an EinsumDense
    kernel was fused into a loop that reads the kernel by columns, 7x
    slower at hidden 1,024. The same tokens as the layers' own call."""
    from keras_qwenvl import decoder

    backbone = tiny_backbone(vision=False, hidden_dim=64, num_heads=4)
    causal_lm = QwenVLCausalLM(backbone)
    causal_lm.compile(sampler="greedy")
    ids = np.zeros((1, 24), "int32")
    ids[:, :5] = [3, 4, 5, 6, 7]
    inputs = {"token_ids": ids, "padding_mask": (ids != 0).astype("int32")}
    looped, tokens = tensorflow_looped_products(causal_lm, inputs)
    assert not looped
    monkeypatch.setattr(
        decoder, "two_row_projection_applies", lambda *args: False
    )
    looped, layer_tokens = tensorflow_looped_products(causal_lm, inputs)
    # The layers' own calls: at least each block's query, key, value and
    # output projections in the decoding loop.
    assert len(looped) >= 4 * len(backbone.transformer_layers), looped
    np.testing.assert_array_equal(tokens, layer_tokens)


# === What the compiled decoding loop copies (JAX) ===


def decoding_loop_copies(causal_lm, inputs):
    """Shapes of the arrays that the body of the compiled generation's
    decoding loop copies or transposes (on their own or inside a fusion),
    weights passed as arguments as keras-hub's JAX generate function
    passes them."""
    import re

    import jax

    variables = (
        causal_lm.trainable_variables + causal_lm.non_trainable_variables
    )

    def generate(values, inputs):
        mapping = list(zip(variables, values))
        with keras.StatelessScope(state_mapping=mapping):
            return causal_lm.generate_step(inputs)["token_ids"]

    values = [v.value for v in variables]
    text = jax.jit(generate).lower(values, inputs).compile().as_text()

    def moves(body):
        return re.search(r"\} (copy|transpose)\(", body) is not None

    bodies = re.findall(r"body=%([\w.\-]+)", text)
    assert len(bodies) == 1, bodies
    shapes = []
    for line in hlo_computation(text, bodies[0]).splitlines():
        shape = re.search(r"= (\w+\[[\d,]*\])", line)
        called = re.search(r"calls=%([\w.\-]+)", line)
        inner = called and hlo_computation(text, called.group(1))
        if moves(line) or (inner and moves(inner)):
            shapes.append(shape.group(1))
    return shapes


@pytest.mark.skipif(
    keras.config.backend() != "jax", reason="inspects XLA's compiled loop"
)
def test_decoding_loop_copies_neither_cache_nor_kernels():
    """A decoding step reads each layer's cache and kernels where they lie.

    Kept as (b, s, heads, head_dim), the keys and values were copied into
    the attention's layouts at every step; kept 4-D with heads first, each
    was updated twice in copies of its own; an output projection spelt
    "btnh,nhd->btd" copied its kernel transposed. Only scalars may be
    copied (the loop's counters)."""
    backbone = tiny_backbone(vision=False, hidden_dim=64, num_heads=4)
    causal_lm = QwenVLCausalLM(backbone)
    causal_lm.compile(sampler="greedy")
    ids = np.zeros((2, 24), "int32")
    ids[:, :5] = [[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]]
    mask = (np.arange(24)[None] < np.array([[5], [3]])).astype("int32")
    inputs = {"token_ids": ids, "padding_mask": mask}
    copies = decoding_loop_copies(causal_lm, inputs)
    assert all(shape.endswith("[]") for shape in copies), copies


# === PyTorch: the decoding step under torch.compile ===


@pytest.mark.skipif(
    keras.config.backend() != "torch", reason="torch.compile is PyTorch's"
)
def test_torch_compiled_decoding_step_is_one_graph(causal_lm, monkeypatch):
    """With `jit_compile=True` the decoding step compiles to one graph,
    without graph breaks, reused by prompts of other lengths and by every
    position; the tokens are the eager ones. Each generation checks
    Dynamo's guards in full on its first `GUARDED_STEPS` steps and only
    the differences between compiled graphs after them."""
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    from keras_qwenvl import torch_decoding

    image = np.random.default_rng(0).uniform(0, 255, (28, 28, 3))
    prompts = ["<img>a</img>hello", "<img>a</img>a longer prompt than that"]
    steps, stances = [], []

    def generate_all():
        generated = []
        for prompt in prompts:
            del steps[:], stances[:]
            generated.append(
                causal_lm.generate(
                    {"prompts": prompt, "images": [image]},
                    max_length=MAX_LENGTH,
                    stop_token_ids=None,
                )
            )
            if causal_lm.jit_compile and torch_decoding._SUPPORTED:
                decoding = steps.count(causal_lm._compiled_decoding_step)
                assert decoding > torch_decoding.GUARDED_STEPS + 1
                assert stances == [{"skip_guard_eval_unsafe": True}] * (
                    decoding - torch_decoding.GUARDED_STEPS
                )
        return generated

    eager = generate_all()
    torch._dynamo.reset()
    counters.clear()
    causal_lm.compile(sampler="greedy", jit_compile=True)

    # Spies: the compiled steps called through each generation's
    # callable, and the stances they set.
    real_stance = torch.compiler.set_stance

    def set_stance(*args, **kwargs):
        stances.append(kwargs)
        return real_stance(*args, **kwargs)

    generation = torch_decoding.CompiledStep.generation

    def counting_generation(self):
        step = generation(self)

        def counted(*args, **kwargs):
            steps.append(self)
            return step(*args, **kwargs)

        return counted

    if torch_decoding._SUPPORTED:
        monkeypatch.setattr(torch.compiler, "set_stance", set_stance)
        monkeypatch.setattr(
            torch_decoding.CompiledStep, "generation", counting_generation
        )
    compiled = generate_all()
    assert compiled == eager
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    mode = "whole graph" if torch_decoding._SUPPORTED else "guarded"
    assert causal_lm._compiled_decoding_step.mode == mode
    # Compiling again without it goes back to eager steps.
    causal_lm.compile(sampler="greedy")
    assert causal_lm._decoding_step() == causal_lm.call_with_cache


@pytest.mark.skipif(
    keras.config.backend() != "torch", reason="torch.compile is PyTorch's"
)
@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_torch_compiled_narrow_step_is_one_graph_with_eager_logits(
    tmp_path, precision
):
    """In bfloat16 and int8 too the compiled decoding step is one graph
    without breaks (int8: the blocks' projections and the lm_head through
    `narrow_products`, not Keras' int8 layers), and its logits are the
    eager step's to bfloat16 rounding, or int8's requantization (Inductor
    fuses and rounds differently, so near-tied tokens of a random model
    may differ, and an activation at a rounding boundary may take the
    next int8 value: logits, not tokens, are compared)."""
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    if precision == "int8":
        causal_lm = tiny_causal_lm(str(tmp_path))
        causal_lm.quantize("int8")
    else:
        causal_lm = tiny_causal_lm(str(tmp_path), dtype=precision)
    image = np.random.default_rng(0).uniform(0, 255, (28, 28, 3))
    x = causal_lm.preprocessor.generate_preprocess(
        {"prompts": ["<img>a</img>hello there"], "images": [[image]]},
        sequence_length=MAX_LENGTH,
    )
    length = int(np.sum(ops.convert_to_numpy(x["padding_mask"])))
    ids = ops.convert_to_tensor(x["token_ids"])
    lengths = ops.convert_to_tensor(np.array([length], "int32"))
    torch._dynamo.reset()
    counters.clear()
    causal_lm.compile(sampler="greedy", jit_compile=True)
    with torch.no_grad():
        features = causal_lm.backbone.vision_encoder(
            ops.convert_to_tensor(x["images"])
        )
        _, cache = causal_lm._build_cache(ids, lengths, features)
        padding = ops.convert_to_tensor(x["padding_mask"])
        steps = []
        for step in (causal_lm.call_with_cache, causal_lm._decoding_step()):
            # As `generate_step` calls it: the position as a tensor, the
            # prompt's positions left as the prompt's pass wrote them.
            logits = [
                step(
                    ids[:, index - 1 : index],
                    cache,
                    ops.convert_to_tensor(index - 1),
                    prompt_lengths=lengths,
                    cache_update_mask=ops.logical_not(
                        ops.cast(padding[:, index - 1 : index], "bool")
                    ),
                )[0]
                for index in (length, length + 3)
            ]
            steps.append(np.stack([ops.convert_to_numpy(
                ops.cast(value, "float32")) for value in logits]))
    eager, compiled = steps
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    scale = np.abs(eager).max()
    assert scale > 0
    np.testing.assert_allclose(compiled, eager, atol=0.03 * scale, rtol=0)


@pytest.mark.skipif(
    keras.config.backend() != "torch", reason="torch.compile is PyTorch's"
)
def test_torch_compiled_generation_follows_lora():
    """Adapters added after a compiled generation, without compiling
    again, give the adapted model's eager tokens: the next generation's
    first steps check every guard and compile the new graph."""
    from keras_qwenvl.training import enable_lora

    causal_lm = QwenVLCausalLM(tiny_backbone(vision=False))
    ids = np.zeros((1, MAX_LENGTH), "int32")
    ids[0, :6] = [3, 14, 15, 92, 65, 35]
    inputs = {"token_ids": ids, "padding_mask": (ids > 0).astype("int32")}

    def tokens():
        output = causal_lm.generate(inputs, stop_token_ids=None)
        return np.asarray(output["token_ids"])

    causal_lm.compile(sampler="greedy", jit_compile=True)
    before = tokens()
    enable_lora(causal_lm, rank=2)
    rng = np.random.default_rng(3)
    for variable in causal_lm.backbone.weights:
        if "lora_kernel" in variable.path:
            variable.assign(rng.normal(0, 0.5, variable.shape))
    lora = tokens()
    assert causal_lm._compiled_decoding_step.mode != "eager"
    assert (lora != before).any()  # the adapters change the tokens
    causal_lm.compile(sampler="greedy")  # eager
    np.testing.assert_array_equal(lora, tokens())


@pytest.mark.skipif(
    keras.config.backend() != "torch", reason="torch.compile is PyTorch's"
)
def test_torch_compiled_step_falls_back():
    """A step that breaks the graph runs eagerly; one past the
    recompilation limit under a plain `torch.compile` (every guard on
    every call); both still give their values. A PyTorch without
    `isolate_recompiles` runs every step under a plain `torch.compile`."""
    import torch
    import torch._dynamo

    from keras_qwenvl import torch_decoding

    whole = torch_decoding._SUPPORTED
    compiling = []

    def broken(x):
        compiling.append(torch.compiler.is_compiling())
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1

    step = torch_decoding.CompiledStep(broken)
    run = step.generation()
    x = torch.arange(3.0)
    calls = torch_decoding.GUARDED_STEPS + 2
    for _ in range(calls):
        torch.testing.assert_close(run(x), x * 2 + 1)
    assert step.mode == ("eager" if whole else "guarded")
    if whole:
        assert compiling == [False] * calls

    def size_plus_sum(x):
        return x.sum() + x.shape[0]

    step = torch_decoding.CompiledStep(size_plus_sum)
    modes = []
    with torch._dynamo.config.patch(recompile_limit=2):
        for n in range(1, 6):
            run = step.generation()
            for _ in range(torch_decoding.GUARDED_STEPS + 1):
                assert float(run(torch.ones(n))) == 2 * n
            modes.append(step.mode)
    assert modes[0] == ("whole graph" if whole else "guarded")
    assert modes[-1] == "guarded"


def compiled_generation(causal_lm, inputs, smallest_kernel):
    """`causal_lm`'s generation compiled by XLA (JAX): its text, the
    kernel-sized 32-bit arrays (float or integer, as "f32[64,40]") that
    its loops carry, and the tokens it generates."""
    import re

    import jax

    variables = (
        causal_lm.trainable_variables + causal_lm.non_trainable_variables
    )
    values = [v.value for v in variables]

    # A new function each time: JAX reuses the trace of one it has seen.
    def generate(values, inputs):
        mapping = list(zip(variables, values))
        with keras.StatelessScope(state_mapping=mapping):
            return causal_lm.generate_step(inputs)["token_ids"]

    causal_lm.compile(sampler="greedy")
    function = jax.jit(generate)
    text = function.lower(values, inputs).compile().as_text()
    carried = set()
    for line in text.splitlines():
        if " while(" in line:
            carried_types = line.split(" while(")[0]
            for kind, dims in re.findall(r"([fs]32)\[([\d,]+)\]",
                                          carried_types):
                size = np.prod([int(d) for d in dims.split(",")])
                if size >= smallest_kernel:
                    carried.add(f"{kind}[{dims}]")
    return text, carried, np.asarray(function(values, inputs))


def smallest_kernel_size(backbone):
    return min(
        int(np.prod(v.shape)) for v in backbone.weights
        if v.path.endswith("/kernel")
    )


@pytest.mark.skipif(
    keras.config.backend() != "jax", reason="inspects XLA's compiled loop"
)
def test_bfloat16_generation_keeps_no_float32_table(monkeypatch):
    """A bfloat16 model's compiled generation holds no float32 copy of the
    (vocabulary, hidden) tables, and its decoding loop carries none of the
    blocks' kernels: the lm_head reads its 16-bit table a block at a
    time, the lookup gathers 16-bit rows and the blocks' projections widen
    their kernels' bits inside each step (as floats, XLA widened tables
    and kernels out of the loop, so that every step read float32). It
    generates the same tokens as without those paths."""
    import re

    from keras_qwenvl import narrow_products

    # 1,000 x 64 tables in blocks of 50 vocabulary rows.
    monkeypatch.setattr(narrow_products, "BLOCK_BYTES", 4 * 64 * 50)
    backbone = tiny_backbone(
        vision=False, dtype="bfloat16", vocabulary_size=1000,
        hidden_dim=64, num_heads=4,
    )
    causal_lm = QwenVLCausalLM(backbone)
    smallest = smallest_kernel_size(backbone)
    ids = np.zeros((1, 24), "int32")
    ids[:, :5] = [3, 4, 5, 6, 7]
    inputs = {"token_ids": ids, "padding_mask": ids != 0}

    def tables(text):
        return set(re.findall(r"f32\[(?:1000,64|64,1000)\]", text))

    text, carried, tokens = compiled_generation(causal_lm, inputs, smallest)
    assert not tables(text)
    assert not carried
    monkeypatch.setattr(narrow_products, "BFLOAT16_MAX_ROWS", 0)
    text, carried, plain_tokens = compiled_generation(
        causal_lm, inputs, smallest
    )
    assert tables(text)  # XLA's product widens the lm_head's table
    assert {"f32[64,40]", "f32[40,64]"} <= carried  # and the MLP's kernels
    np.testing.assert_array_equal(tokens, plain_tokens)


@pytest.mark.skipif(
    keras.config.backend() != "jax", reason="inspects XLA's compiled loop"
)
def test_int8_generation_reads_int8_kernels(monkeypatch):
    """An int8 model's compiled decoding loop carries no wider copy of the
    blocks' kernels: each step widens the int8 kernels it reads
    (`narrow_products.int8_projection`), where Keras' int8 layers had XLA
    convert every kernel to int32 once, out of the loop, so that every
    step read 32 bits. It generates the same tokens as Keras' layers."""
    from keras_qwenvl import narrow_products

    # The lm_head's 1,000 x 64 table in blocks of 50 rows (one block would
    # be widened out of the loop, as a table of Qwen's size is not).
    monkeypatch.setattr(narrow_products, "BLOCK_BYTES", 4 * 64 * 50)
    backbone = tiny_backbone(
        vision=False, vocabulary_size=1000, hidden_dim=64, num_heads=4,
    )
    causal_lm = QwenVLCausalLM(backbone)
    causal_lm.quantize("int8")
    smallest = smallest_kernel_size(backbone)
    ids = np.zeros((1, 24), "int32")
    ids[:, :5] = [3, 4, 5, 6, 7]
    inputs = {"token_ids": ids, "padding_mask": ids != 0}

    _, carried, tokens = compiled_generation(causal_lm, inputs, smallest)
    assert not carried
    monkeypatch.setattr(
        narrow_products, "int8_projection_applies", lambda *args: False
    )
    _, carried, keras_tokens = compiled_generation(
        causal_lm, inputs, smallest
    )
    # Keras' layers: the MLP's kernels carried as int32.
    assert {"s32[64,40]", "s32[40,64]"} <= carried
    np.testing.assert_array_equal(tokens, keras_tokens)