"""QwenVLCausalLM: logits, a KV-cached `generate()` and `chat()`."""

import keras
from keras import ops
from keras.src.quantizers.utils import should_quantize_layer
from keras.src.utils.tracking import no_automatic_dependency_tracking
from keras_hub.models import CausalLM
from keras_hub.src.utils.tensor_utils import any_equal

from keras_qwenvl.backbone import QwenVLBackbone
from keras_qwenvl.backbone import interleave_image_features
from keras_qwenvl.causal_lm_preprocessor import QwenVLCausalLMPreprocessor
from keras_qwenvl.chat_format import DEFAULT_SYSTEM_PROMPT
from keras_qwenvl.chat_format import build_chat_prompt
from keras_qwenvl.chat_format import find_image_tags
from keras_qwenvl.data.loader import RawExamplesMixin
from keras_qwenvl.decoder import empty_cache
from keras_qwenvl.host_memory import trim_by_default
from keras_qwenvl.losses import QwenVLCrossEntropy
from keras_qwenvl.presets import QwenVLPresetMixin
from keras_qwenvl.samplers import QwenVLGreedySampler

try:
    import tensorflow as tf
except ImportError:  # pragma: no cover
    tf = None


@keras.saving.register_keras_serializable(package="keras_qwenvl")
class QwenVLCausalLM(QwenVLPresetMixin, RawExamplesMixin, CausalLM):
    """Qwen-VL for causal language modelling and generation.

    `call` returns next-token logits (b, t, vocabulary_size). `generate()`
    encodes each prompt's images once, fills a KV cache with one pass over
    the prompt and then decodes token by token with a keras-hub sampler
    (`compile(sampler=...)`, greedy by default). It stops on `<|im_end|>`,
    `<|im_start|>` and `<|endoftext|>` by default. Dynamic NTK and log-n
    scaling behave as in the reference at inference: the NTK factor is
    fixed by each prompt's length on the first pass and reused while
    decoding.

    Args:
        backbone: a `QwenVLBackbone`.
        preprocessor: a `QwenVLCausalLMPreprocessor` or None.
    """

    backbone_cls = QwenVLBackbone
    preprocessor_cls = QwenVLCausalLMPreprocessor
    # True while `train_step` traces or runs with the lm_head in the loss.
    _fusing = False

    def __init__(self, backbone, preprocessor=None, **kwargs):
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        encoder = backbone.vision_encoder
        tokenizer = getattr(preprocessor, "tokenizer", None)
        span = getattr(tokenizer, "image_span_length", None)
        if encoder is not None and span not in (None, encoder.num_queries):
            raise ValueError(
                f"The tokenizer's image spans hold {span} positions but the "
                f"vision encoder gives {encoder.num_queries} features per "
                "image; build the tokenizer with "
                f"`image_span_length={encoder.num_queries}`."
            )

        # === Functional Model ===
        inputs = backbone.input
        hidden_states = backbone(inputs=inputs)
        outputs = backbone.token_embedding(hidden_states, reverse=True)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

    def __call__(self, inputs, *args, **kwargs):
        return super().__call__(
            self.backbone.fill_images(inputs), *args, **kwargs
        )

    def call(self, inputs, training=None, mask=None):
        """Logits at every position, or with `inputs["loss_positions"]`
        (b, k) only at those positions: (b, k, vocabulary_size). Training
        needs logits only where labels carry loss, and the lm_head is most
        of the model's work at the vocabulary's size.

        Inside `fit()`'s training step with a `QwenVLCrossEntropy` loss
        (see `compile`) it returns the lm_head's inputs instead, and the
        loss applies the lm_head itself."""
        fused = self._fusing
        if not fused and not (
            isinstance(inputs, dict) and "loss_positions" in inputs
        ):
            return super().call(inputs, training=training, mask=mask)
        inputs = dict(inputs)
        positions = inputs.pop("loss_positions", None)
        hidden_states = self.backbone(inputs, training=training)
        if positions is not None:
            positions = ops.cast(positions, "int32")
            batch_size, count = ops.shape(positions)
            index = ops.broadcast_to(
                ops.expand_dims(positions, -1),
                (batch_size, count, ops.shape(hidden_states)[-1]),
            )
            hidden_states = ops.take_along_axis(hidden_states, index, axis=1)
        if fused:
            return hidden_states
        return self.backbone.token_embedding(hidden_states, reverse=True)

    @no_automatic_dependency_tracking
    def compile(
        self,
        optimizer="auto",
        loss="auto",
        *,
        weighted_metrics="auto",
        sampler="greedy",
        **kwargs,
    ):
        """As keras-hub's `CausalLM.compile`, with `loss="auto"` meaning
        `QwenVLCrossEntropy()` (Keras' sparse cross-entropy from logits,
        without its one-hot array of the vocabulary's size on JAX; on JAX
        with `remat=True` when the backbone rematerialises its blocks),
        `weighted_metrics="auto"` the token accuracy, logged as
        "sparse_categorical_accuracy" as keras-hub logs it, and
        `sampler="greedy"` a `QwenVLGreedySampler` (the same tokens as
        keras-hub's, without a softmax over the vocabulary per step).

        With a `QwenVLCrossEntropy` loss of a reducing kind, no
        `loss_weights` and no metrics besides the automatic accuracy,
        `fit()`'s training step never forms the (positions, vocabulary)
        logits: the model returns the lm_head's inputs and the loss
        applies the lm_head block by block, gradients included
        (`QwenVLCrossEntropy.from_hidden_states`). The loss, the gradients
        and the accuracy are those of the logits (float32 rounding).
        `evaluate()` and `predict()` compute the logits as usual.

        On PyTorch, `jit_compile=True` also compiles `generate()`'s
        decoding step with `torch.compile` (Keras otherwise runs PyTorch
        eagerly; the first generation of each batch size and `max_length`
        compiles, minutes at the published size; float32, bfloat16 and
        `quantize("int8")` models compile to one graph; a step that
        breaks the graph, as other quantization modes do, runs eagerly;
        see `torch_decoding`). It applies to `fit()` as Keras applies it
        there: compile again without it to train.

        On TensorFlow, `generate()` compiles with XLA unless
        `jit_compile=False` is passed, also on CPU, where Keras' "auto"
        leaves XLA off for `fit()` and keras-hub's generation would run
        as a TensorFlow graph (see `make_generate_function`).

        On JAX, the host memory that each long compilation (a training
        step, a generate function) freed goes back to the operating
        system (`host_memory.trim_after_compilations`; 0.45 GB less peak
        memory in the "small" benchmark's training step).
        """
        trim_by_default()
        if isinstance(sampler, str) and sampler == "greedy":
            sampler = QwenVLGreedySampler()
        if isinstance(loss, str) and loss == "auto":
            # Measured slower on PyTorch and larger on TensorFlow: see
            # `QwenVLCrossEntropy`.
            loss = QwenVLCrossEntropy(
                remat=self.backbone.remat
                and keras.backend.backend() == "jax"
            )
        accuracy = isinstance(weighted_metrics, str) and (
            weighted_metrics == "auto"
        )
        if accuracy:
            weighted_metrics = None
        super().compile(
            optimizer=optimizer,
            loss=loss,
            weighted_metrics=weighted_metrics,
            sampler=sampler,
            **kwargs,
        )
        self._token_accuracy = None
        self._compiled_decoding_step = None
        self._xla_generation = kwargs.get("jit_compile", "auto") is not False
        if accuracy:
            self._token_accuracy = keras.metrics.Mean(
                name="sparse_categorical_accuracy"
            )
        self._fusable_loss = (
            isinstance(loss, QwenVLCrossEntropy)
            and loss.fusable
            and not kwargs.get("loss_weights")
            and not kwargs.get("metrics")
            and not weighted_metrics
        )

    @property
    def metrics(self):
        metrics = super().metrics
        accuracy = getattr(self, "_token_accuracy", None)
        if self.compiled and accuracy is not None:
            metrics.append(accuracy)
        return metrics

    def _lm_head_kernel(self):
        """The lm_head's (hidden, vocabulary) weights and whether they
        train, or None where the fused loss cannot stand in for it."""
        head = self.backbone.token_embedding
        if (
            head.quantization_mode is not None
            or head.logit_soft_cap is not None
            or head.reverse_dtype is not None
            or head.lora_enabled
        ):
            return None
        if head.tie_weights:
            variable = head._embeddings
            kernel = ops.transpose(head.embeddings)
        else:
            variable = head.reverse_embeddings
            kernel = variable
        trainable = any(v is variable for v in self.trainable_variables)
        return kernel, trainable

    def train_step(self, *args, **kwargs):
        """Keras' training step (any backend); with a fusable loss (see
        `compile`) the model returns the lm_head's inputs within it."""
        self._fusing = bool(
            getattr(self, "_fusable_loss", False)
            and self._lm_head_kernel() is not None
        )
        try:
            return super().train_step(*args, **kwargs)
        finally:
            self._fusing = False

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        if not self._fusing:
            return super().compute_loss(
                x, y, y_pred, sample_weight, training=training
            )
        kernel, trainable = self._lm_head_kernel()
        loss, correct, weight = self.loss.from_hidden_states(
            y, y_pred, kernel, sample_weight, kernel_gradient=trainable
        )
        if self._token_accuracy is not None:
            self._token_accuracy.update_state(
                ops.divide_no_nan(correct, weight), sample_weight=weight
            )
        extra = [self._aggregate_additional_loss(v) for v in self.losses]
        return loss + ops.sum(extra) if extra else loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        accuracy = getattr(self, "_token_accuracy", None)
        if accuracy is not None and not self._fusing:
            predicted = ops.cast(ops.argmax(y_pred, axis=-1), y.dtype)
            accuracy.update_state(
                ops.cast(ops.equal(predicted, y), "float32"),
                sample_weight=sample_weight,
            )
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Quantize the model's weights, e.g. `quantize("int8")`.

        As `keras.Model.quantize`, with three differences: the
        preprocessor's layers (no weights; its image resizing layer is built
        only when an image goes through it) are left alone, so are layers
        that cannot be quantized (norms, convolutions: no warning for each),
        and the token embedding and lm_head are quantized too (keras-hub's
        `ReversibleEmbedding` subclasses Keras' quantizable one, which
        Keras' exact type check would refuse; pass `type_check=True` to keep
        that check).

        Args:
            mode: "int8", "int4", "float8", "gptq" or "awq".
            config: an optional `keras.quantizers.QuantizationConfig`.
            filters: optional regex string, list of them, or callable
                choosing the layers to quantize.
        """
        skipped = set()
        if self.preprocessor is not None:
            skipped = {id(layer) for layer in self.preprocessor._flatten_layers()}

        def chosen(layer):
            quantizable = type(layer).quantize is not keras.layers.Layer.quantize
            return (
                quantizable
                and id(layer) not in skipped
                and should_quantize_layer(layer, filters)
            )

        kwargs.setdefault("type_check", False)
        super().quantize(mode, config=config, filters=chosen, **kwargs)

    # === Cached forward pass ===

    def call_with_cache(
        self,
        token_ids,
        cache,
        cache_update_index,
        prompt_lengths,
        image_features=None,
        cache_update_mask=None,
    ):
        """Forward `token_ids` (b, t) placed at `cache_update_index`.

        For generation: the logits come from the lm_head's
        `decoding_logits`, which with a bfloat16 table on JAX's CPU have
        no gradient with respect to that table.

        Args:
            cache: tuple over layers of (key, value): keys
                (b * num_heads, head_dim, max_length), values
                (b * num_heads, max_length, head_dim).
            cache_update_index: absolute position of `token_ids[:, 0]`.
            prompt_lengths: (b,) prompt lengths; they fix the dynamic-NTK
                factor for the whole generation.
            image_features: (b, m, num_queries, hidden) or None; spans are
                filled only on the pass over the prompt.
            cache_update_mask: (b, t) bool or None; where False the cache
                keeps its entries (prompt positions of longer prompts that
                the decoding loop walks over).
        Returns:
            (logits, hidden_states, cache).
        """
        hidden_states, cache = self._hidden_states_with_cache(
            token_ids,
            cache,
            cache_update_index,
            prompt_lengths,
            image_features,
            cache_update_mask,
        )
        head = self.backbone.token_embedding
        return head.decoding_logits(hidden_states), hidden_states, cache

    def _hidden_states_with_cache(
        self,
        token_ids,
        cache,
        cache_update_index,
        prompt_lengths,
        image_features,
        cache_update_mask,
    ):
        """`call_with_cache` without the lm_head: (hidden_states, cache)."""
        backbone = self.backbone
        x = backbone.token_embedding(token_ids)
        if image_features is not None:
            x = interleave_image_features(
                x, token_ids, image_features, backbone.image_start_token_id
            )
        new_cache = []
        for layer, layer_cache in zip(backbone.transformer_layers, cache):
            x, layer_cache = layer(
                x,
                prompt_lengths=prompt_lengths,
                cache=layer_cache,
                cache_update_index=cache_update_index,
                cache_update_mask=cache_update_mask,
            )
            new_cache.append(layer_cache)
        return backbone.final_normalization(x), tuple(new_cache)

    def _prefill(self, token_ids, prompt_lengths, images):
        """The images' features and `_build_cache` over the prompts."""
        image_features = None
        if self.backbone.vision_encoder is not None and images is not None:
            if images.shape[1] != 0:
                image_features = self.backbone.vision_encoder(images)
        return self._build_cache(token_ids, prompt_lengths, image_features)

    def _build_cache(self, token_ids, prompt_lengths, image_features):
        """Allocate the cache and fill it with one pass over the prompt.

        The pass skips the lm_head: its logits at every position of the
        padded batch (b, max_length, vocabulary_size) would go unused.
        """
        backbone = self.backbone
        batch, max_length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        cache = tuple(
            empty_cache(
                batch,
                backbone.num_heads,
                backbone.head_dim,
                max_length,
                self.compute_dtype,
            )
            for _ in range(backbone.num_layers)
        )
        return self._hidden_states_with_cache(
            token_ids,
            cache,
            0,
            prompt_lengths,
            image_features,
            cache_update_mask=None,
        )

    def generate_step(self, inputs, stop_token_ids=None):
        """Generate for one batch of preprocessed inputs (static shapes).

        Args:
            inputs: dict with `token_ids` and `padding_mask` (b, max_length)
                and, for a multimodal backbone, `images` (b, m, S, S, 3).
            stop_token_ids: tuple of ids that end a sequence, or None.
        """
        token_ids = inputs["token_ids"]
        padding_mask = ops.cast(inputs["padding_mask"], "bool")
        images = inputs.get("images")
        prompt_lengths = ops.sum(ops.cast(padding_mask, "int32"), axis=1)
        # Compiled by Dynamo too, the prefill took the first token from 217
        # to 165-173 ms at the benchmark's "small" size (2-core CPU), but
        # 307 ms within a benchmark run and 65 s to compile: not yet.
        hidden_states, cache = self._prefill(token_ids, prompt_lengths, images)
        # Decoding starts after the shortest prompt; longer prompts keep
        # their tokens (the sampler leaves masked positions as they are).
        index = ops.min(prompt_lengths)

        decoding_step = self._decoding_step()

        def next(prompt, cache, index):
            batch = ops.shape(prompt)[0]
            current = ops.slice(prompt, [0, index - 1], [batch, 1])
            update_mask = ops.logical_not(
                ops.slice(padding_mask, [0, index - 1], [batch, 1])
            )
            logits, hidden_states, cache = decoding_step(
                current,
                cache,
                index - 1,
                prompt_lengths=prompt_lengths,
                cache_update_mask=update_mask,
            )
            return (
                ops.squeeze(logits, axis=1),
                ops.squeeze(hidden_states, axis=1),
                cache,
            )

        token_ids = self.sampler(
            next=next,
            prompt=token_ids,
            cache=cache,
            index=index,
            mask=padding_mask,
            stop_token_ids=stop_token_ids,
            hidden_states=hidden_states,
            model=self,
        )

        if stop_token_ids is not None:
            # Everything after the first generated stop token is padding.
            end_locations = ops.cast(
                any_equal(
                    token_ids, stop_token_ids, ops.logical_not(padding_mask)
                ),
                "int32",
            )
            after_end = ops.cumsum(end_locations, axis=-1) - end_locations
            padding_mask = ops.logical_not(ops.cast(after_end, "bool"))
        else:
            padding_mask = ops.ones_like(token_ids, dtype="bool")
        outputs = {"token_ids": token_ids, "padding_mask": padding_mask}
        if images is not None:
            outputs["images"] = images
        return outputs

    def make_generate_function(self):
        """keras-hub's, except on TensorFlow, where `generate_step` runs
        under XLA unless the model was compiled with `jit_compile=False`.
        Keras' "auto" turns XLA off on machines without an accelerator,
        so keras-hub's generation there is a TensorFlow graph; at the
        benchmark's "small" size on a 2-core CPU, XLA's was faster on
        every measurement: a float32 decoding step 25.5 against 27.2 ms,
        8 rows 34.7 against 40.6, the first token 142 against 167 ms,
        bfloat16 17.7 against 27.8 ms, int8 10.4 against 30.7 ms (the
        graph's int8 `BatchMatMulV3` kernels)."""
        if (
            self.generate_function is None
            and keras.config.backend() == "tensorflow"
            and not self.run_eagerly
            and getattr(self, "_xla_generation", True)
        ):
            self.generate_function = tf.function(
                self.generate_step, jit_compile=True
            )
            return self.generate_function
        return super().make_generate_function()

    def _decoding_step(self):
        """The decoding step for one generation: `call_with_cache`, or on
        PyTorch with `jit_compile=True` its `torch.compile`d version (one
        graph per batch size and `max_length`: the position is a tensor),
        its guards checked in full on the first steps of each generation
        (see `torch_decoding`). JAX and TensorFlow compile the whole of
        `generate_step` already."""
        if keras.config.backend() != "torch" or not getattr(
            self, "jit_compile", False
        ):
            return self.call_with_cache
        if getattr(self, "_compiled_decoding_step", None) is None:
            from keras_qwenvl import torch_decoding

            int8 = any(
                getattr(layer, "quantization_mode", None) == "int8"
                for layer in self._flatten_layers()
            )
            self._compiled_decoding_step = torch_decoding.CompiledStep(
                self.call_with_cache, int8=int8
            )
        return self._compiled_decoding_step.generation()

    # === Generation entry points ===

    def _normalize_generate_inputs(self, inputs):
        """Batch a single prompt (and its images) whatever the key order."""
        if tf is not None and isinstance(inputs, tf.data.Dataset):
            return inputs.as_numpy_iterator(), False
        if self.preprocessor is None:
            return [inputs], False

        def is_scalar(x):
            if isinstance(x, str):
                return True
            return getattr(x, "shape", None) == () or (
                tf is not None and isinstance(x, tf.Tensor) and x.shape.rank == 0
            )

        if isinstance(inputs, dict):
            # The preprocessor takes a batch of one prompt's images as given
            # (one image or a list), so only the prompt is batched here.
            inputs = dict(inputs)
            scalar = is_scalar(inputs["prompts"])
            if scalar:
                inputs["prompts"] = [inputs["prompts"]]
            return [inputs], scalar
        if is_scalar(inputs):
            return [[inputs]], True
        return [inputs], False

    def generate(
        self,
        inputs,
        max_length=None,
        stop_token_ids="auto",
        strip_prompt=False,
    ):
        """Generate text for prompts with `<img>` spans.

        Args:
            inputs: a prompt string, a list of them, or a dict with
                `prompts` and optional `images` (per prompt, a list of
                images filling its `<img>` tags in order). Without images,
                each tag's text is loaded as an image path.
            max_length: total length (prompt + new tokens) of the padded
                batch; defaults to the preprocessor's `sequence_length`.
            stop_token_ids: "auto" (`<|im_end|>`, `<|im_start|>`,
                `<|endoftext|>`), None, or a tuple of ids.
            strip_prompt: return only the new text.
        """
        if stop_token_ids == "auto":
            if self.preprocessor is None:
                raise ValueError(
                    'stop_token_ids="auto" needs a preprocessor; pass '
                    "stop_token_ids=None or a tuple of token ids."
                )
            stop_token_ids = tuple(self.preprocessor.tokenizer.stop_token_ids)
        return super().generate(
            inputs,
            max_length=max_length,
            stop_token_ids=stop_token_ids,
            strip_prompt=strip_prompt,
        )

    def chat(
        self,
        query,
        history=None,
        images=None,
        system_prompt=DEFAULT_SYSTEM_PROMPT,
        max_length=None,
    ):
        """One turn of a Qwen-VL-Chat conversation.

        Args:
            query: the user's text.
            history: earlier turns as returned by a previous `chat` call
                (a list of `(query, response, images)`), or None.
            images: this turn's images (paths, arrays or PIL images); they
                are written as `Picture N:` lines before the query, numbered
                after the pictures of the history.
            system_prompt: the system turn.
            max_length: total length of prompt and reply; defaults to the
                preprocessor's `sequence_length`.

        Returns:
            `(response, history)`: the reply text and the history with this
            turn appended.
        """
        if self.preprocessor is None:
            raise ValueError("`chat()` needs a preprocessor.")
        turn = build_chat_prompt(
            query, history=history, images=images, system_prompt=system_prompt
        )
        inputs = turn.prompt
        if turn.images:
            inputs = {"prompts": turn.prompt, "images": turn.images}
        response = self.generate(inputs, max_length=max_length, strip_prompt=True)
        response = response.strip()
        turn_images = len(images or []) + len(find_image_tags(query))
        this_turn = turn.images[len(turn.images) - turn_images :]
        history = list(history or []) + [(turn.query, response, this_turn)]
        return response, history

