"""Next-token cross-entropy for the 151,936-entry vocabulary."""

import keras
from keras import ops
from keras.src.losses.loss import scale_loss_for_distribution

from keras_qwenvl.ordering import after
from keras_qwenvl.ordering import materialized

# Reductions that `QwenVLCrossEntropy.from_hidden_states` reproduces.
_FUSED_REDUCTIONS = ("sum", "sum_over_batch_size", "mean",
                     "mean_with_sample_weight")


@keras.saving.register_keras_serializable(package="keras_qwenvl")
class QwenVLCrossEntropy(keras.losses.Loss):
    """Cross-entropy of integer labels against logits: the same loss as
    `keras.losses.SparseCategoricalCrossentropy(from_logits=True)` (same
    reduction and sample weighting, equal to float32 rounding), the
    default of `QwenVLCausalLM.compile(loss="auto")`.

    On JAX it is computed as `logsumexp(logits) - logits[label]`. Keras'
    JAX op multiplies the log-softmax by a one-hot array of the labels,
    one more (positions, vocabulary_size) float32 array in the compiled
    step: 311 MB for 512 positions at Qwen's vocabulary, and 0.25 GB of a
    "small" training step's peak memory (README, "Benchmarks"). PyTorch
    and TensorFlow keep Keras' op, which calls their fused kernels.

    When `QwenVLCausalLM` trains with this loss, `from_hidden_states`
    applies the lm_head and the loss together and computes their gradients
    in the same pass, `chunk_size` positions at a time (see there).

    With `remat=True` `from_hidden_states` goes through the vocabulary
    instead, `vocabulary_block_size` entries at a time and twice: once for
    each position's log-sum-exp, label logit and argmax, once more for the
    gradients. No (positions, vocabulary) array exists, only (positions,
    block) ones, and the kernel's gradient is the one kernel-sized array;
    the price is the lm_head's forward matmul a second time (at the
    "small" benchmark's sizes, JAX, decoder and ViT blocks rematerialised:
    a 15% slower step for 0.28 GB less peak memory).
    `QwenVLCausalLM.compile(loss="auto")` picks it on JAX for a backbone
    built with `remat=True`. It runs on every backend, but at the "small"
    benchmark's sizes it made PyTorch's remat training step 35% slower for
    0.36 GB less peak memory, and TensorFlow's 12% slower and 0.78 GB
    larger, so "auto" leaves it off there.

    Args:
        chunk_size: positions per lm_head block in `from_hidden_states`.
            A block's logits and their gradient take 2 x chunk_size x
            vocabulary_size floats (1.2 GB at 1,024 positions in float32);
            each further block adds a pass over a kernel-sized float32
            gradient sum. At the "small" benchmark's sizes (1,024
            positions, JAX, a 2-core CPU) one block of 1,024 made the
            lm_head and loss's forward and backward 29% faster than the
            logits' autodiff, blocks of 512 15% and of 256 8%.
            Unused with `remat=True`.
        remat: compute the logits twice, a vocabulary block at a time
            (above), in `from_hidden_states`.
        vocabulary_block_size: vocabulary entries per block with
            `remat=True`; a few (positions, block) float arrays live at a
            time. In the "small" benchmark's remat training step (512
            positions with loss, JAX) blocks of 8,192 left XLA 0.48 GB of
            temporaries against 0.74 GB in one block of positions.
    """

    def __init__(self, name="qwen_vl_cross_entropy", chunk_size=1024,
                 remat=False, vocabulary_block_size=8192, **kwargs):
        super().__init__(name=name, **kwargs)
        for argument, value in (
            ("chunk_size", chunk_size),
            ("vocabulary_block_size", vocabulary_block_size),
        ):
            if not (isinstance(value, int) and value > 0):
                raise ValueError(
                    f"`{argument}` must be a positive int. "
                    f"Received: {value!r}"
                )
        self.chunk_size = chunk_size
        self.remat = bool(remat)
        self.vocabulary_block_size = vocabulary_block_size

    def call(self, y_true, y_pred):
        if keras.backend.backend() != "jax":
            return ops.sparse_categorical_crossentropy(
                y_true, y_pred, from_logits=True
            )
        # `Loss.__call__` has cast the logits to the loss's dtype already.
        labels = ops.expand_dims(ops.cast(y_true, "int32"), -1)
        picked = ops.take_along_axis(y_pred, labels, axis=-1)
        return ops.logsumexp(y_pred, axis=-1) - ops.squeeze(picked, -1)

    def get_config(self):
        return {
            **super().get_config(),
            "chunk_size": self.chunk_size,
            "remat": self.remat,
            "vocabulary_block_size": self.vocabulary_block_size,
        }

    @property
    def fusable(self):
        """Whether `from_hidden_states` can stand in for this loss."""
        return self.reduction in _FUSED_REDUCTIONS

    def from_hidden_states(
        self, y_true, hidden_states, kernel, sample_weight=None,
        kernel_gradient=True,
    ):
        """The loss of `hidden_states @ kernel` as logits, and its argmax
        accuracy, without the (positions, vocabulary) logits as a whole.

        The positions go through the lm_head `chunk_size` at a time; each
        block's logits give its loss, whether their argmax is the label,
        and at once the block's gradients for the hidden states and the
        kernel, so no logits are kept for the backward pass nor computed
        twice. The loss's value and gradients equal those of this loss on
        `hidden_states @ kernel` (float32 rounding; with bfloat16 inputs the
        logits are rounded as the lm_head rounds them).

        Args:
            y_true: int labels, shape (..., ).
            hidden_states: (..., hidden), the lm_head's inputs.
            kernel: (hidden, vocabulary) lm_head weights.
            sample_weight: optional weights shaped like `y_true`.
            kernel_gradient: False when the kernel is frozen: its gradient
                (a kernel-sized sum over all positions) is then skipped.

        Returns:
            `(loss, correct, weight)`: the reduced loss (as `__call__` with
            this loss's reduction reduces it), and the weighted count of
            positions whose argmax is the label and the total weight, with
            no gradient.
        """
        if not self.fusable:
            raise ValueError(
                "`from_hidden_states` gives a reduced loss; this loss has "
                f"reduction={self.reduction!r}."
            )
        dtype = self.dtype
        hidden_size = ops.shape(hidden_states)[-1]
        hidden_states = ops.reshape(hidden_states, (-1, hidden_size))
        labels = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        count = ops.shape(labels)[0]
        if sample_weight is None:
            weights = ops.ones((count,), dtype)
        else:
            weights = ops.reshape(ops.cast(sample_weight, dtype), (-1,))
        kernel = ops.cast(kernel, hidden_states.dtype)
        if self.remat:
            sums = _lm_head_cross_entropy_by_vocabulary(
                hidden_states, kernel, labels, weights,
                self.vocabulary_block_size, dtype, kernel_gradient,
            )
        else:
            sums = _lm_head_cross_entropy(
                hidden_states, kernel, labels, weights, self.chunk_size,
                dtype, kernel_gradient,
            )
        total = sums[0]
        if self.reduction == "sum":
            loss = total
        else:
            if self.reduction == "mean_with_sample_weight":
                divisor = ops.sum(weights)
            else:
                divisor = ops.cast(count, dtype)
            loss = scale_loss_for_distribution(
                ops.divide_no_nan(total, divisor)
            )
        correct = ops.stop_gradient(sums[1])
        return loss, correct, ops.stop_gradient(ops.sum(weights))


def _lm_head_cross_entropy(
    hidden_states, kernel, labels, weights, chunk_size, dtype,
    kernel_gradient,
):
    """`[sum(w * loss), sum(w * correct)]` over positions, with the
    gradients of the first entry computed block by block in the forward
    pass (`ops.custom_gradient`; the second entry has none)."""
    count, hidden_size = ops.shape(hidden_states)
    vocabulary = ops.shape(kernel)[-1]
    # `count` is a tensor where the batch size is unknown while tracing
    # (TensorFlow); shapes are static on JAX and PyTorch.
    if isinstance(count, int):
        chunk_size = min(chunk_size, count)
    padding = (-count) % chunk_size
    chunks = (count + padding) // chunk_size
    if not isinstance(padding, int) or padding:
        # Padded positions carry zero weight: no loss, no gradient.
        hidden_states = ops.pad(hidden_states, ((0, padding), (0, 0)))
        labels = ops.pad(labels, ((0, padding),))
        weights = ops.pad(weights, ((0, padding),))
    compute_dtype = hidden_states.dtype
    vocabulary_ids = ops.arange(vocabulary, dtype="int32")

    def block(start, hidden_block, kernel):
        block_labels = ops.slice(labels, (start,), (chunk_size,))
        block_weights = ops.slice(weights, (start,), (chunk_size,))
        logits = ops.cast(ops.matmul(hidden_block, kernel), dtype)
        top = ops.max(logits, axis=-1, keepdims=True)
        exp = ops.exp(logits - top)
        total = ops.sum(exp, axis=-1, keepdims=True)
        is_label = ops.equal(
            ops.expand_dims(block_labels, -1), vocabulary_ids
        )
        # A gather: a masked sum would be one more (positions, vocabulary)
        # array in XLA's CPU reductions.
        picked = ops.squeeze(
            ops.take_along_axis(
                logits, ops.expand_dims(block_labels, -1), axis=-1
            ),
            -1,
        )
        losses = ops.squeeze(top + ops.log(total), -1) - picked
        correct = ops.cast(
            ops.equal(ops.cast(ops.argmax(logits, axis=-1), "int32"),
                      block_labels),
            dtype,
        )
        sums = ops.stack(
            [ops.sum(block_weights * losses),
             ops.sum(block_weights * correct)]
        )
        # d(sum w * loss) / d logits = w * (softmax - one_hot(label))
        grad_logits = ops.expand_dims(block_weights, -1) * (
            exp / total - ops.cast(is_label, dtype)
        )
        return sums, ops.cast(grad_logits, compute_dtype)

    def forward(hidden_states, kernel):
        def step(index, carry):
            sums, grad_hidden, grad_kernel = carry
            start = index * chunk_size
            hidden_block = ops.slice(
                hidden_states, (start, 0), (chunk_size, hidden_size)
            )
            block_sums, grad_logits = block(start, hidden_block, kernel)
            grad_hidden = ops.slice_update(
                grad_hidden,
                (start, 0),
                ops.matmul(grad_logits, ops.transpose(kernel)),
            )
            if kernel_gradient:
                grad_kernel = grad_kernel + ops.cast(
                    ops.matmul(
                        materialized(ops.transpose(hidden_block)),
                        grad_logits,
                    ),
                    "float32",
                )
            return sums + block_sums, grad_hidden, grad_kernel

        carry = (
            ops.zeros((2,), dtype),
            ops.zeros_like(hidden_states),
            ops.zeros((hidden_size, vocabulary) if kernel_gradient
                      else (), "float32"),
        )
        if isinstance(chunks, int) and chunks == 1:
            carry = step(0, carry)
        else:
            carry = ops.fori_loop(0, chunks, step, carry)
        sums, grad_hidden, grad_kernel = carry
        if kernel_gradient:
            # The input gradient reads the kernel that the optimizer then
            # updates in place: ordered first, XLA keeps no kernel copy.
            grad_kernel = after(grad_kernel, grad_hidden)
        return sums, _scaled_gradients(
            grad_hidden, grad_kernel if kernel_gradient else None,
            compute_dtype, kernel.dtype,
        )

    sums = ops.custom_gradient(forward)(hidden_states, kernel)
    return sums


def _scaled_gradients(grad_hidden, grad_kernel, hidden_dtype, kernel_dtype):
    """The `custom_gradient` function of the loss sums: the gradients of
    their first entry, computed in the forward pass, times the upstream
    gradient (`grad_kernel` None where the kernel is frozen)."""

    def gradient(*args, upstream=None):
        if upstream is None:
            (upstream,) = args
        scale = upstream[0]
        grad_h = ops.cast(
            grad_hidden * ops.cast(scale, grad_hidden.dtype), hidden_dtype
        )
        grad_w = None
        if grad_kernel is not None:
            grad_w = ops.cast(grad_kernel * ops.cast(scale, "float32"),
                              kernel_dtype)
        return grad_h, grad_w

    return gradient


def _lm_head_cross_entropy_by_vocabulary(
    hidden_states, kernel, labels, weights, block_size, dtype,
    kernel_gradient,
):
    """As `_lm_head_cross_entropy`, going through the vocabulary in blocks
    of `block_size` entries, twice: the first pass keeps a running
    log-sum-exp, the label's logit and the argmax of every position; the
    second recomputes each block's logits for its gradients."""
    hidden_size = ops.shape(hidden_states)[-1]
    vocabulary = ops.shape(kernel)[-1]
    block_size = min(block_size, vocabulary)
    full_blocks, rest = divmod(vocabulary, block_size)
    compute_dtype = hidden_states.dtype

    def over_vocabulary(visit, carry):
        """`visit(start, size, carry)` for every block, in order: the
        equal blocks in a loop, then the rest."""
        if full_blocks == 1:
            carry = visit(0, block_size, carry)
        else:
            carry = ops.fori_loop(
                0,
                full_blocks,
                lambda index, carry: visit(
                    index * block_size, block_size, carry
                ),
                carry,
            )
        if rest:
            carry = visit(full_blocks * block_size, rest, carry)
        return carry

    def forward(hidden_states, kernel):
        def kernel_block(kernel, start, size):
            return ops.slice(kernel, (0, start), (hidden_size, size))

        def block_logits(kernel_block):
            return ops.cast(ops.matmul(hidden_states, kernel_block), dtype)

        def statistics(start, size, carry):
            top, total, picked, best, best_index = carry
            logits = block_logits(kernel_block(kernel, start, size))
            block_top = ops.max(logits, axis=-1)
            new_top = ops.maximum(top, block_top)
            total = total * ops.exp(top - new_top) + ops.sum(
                ops.exp(logits - ops.expand_dims(new_top, -1)), axis=-1
            )
            local = labels - start
            inside = ops.logical_and(local >= 0, local < size)
            label_logit = ops.squeeze(
                ops.take_along_axis(
                    logits,
                    ops.expand_dims(ops.clip(local, 0, size - 1), -1),
                    axis=-1,
                ),
                -1,
            )
            picked = ops.where(inside, label_logit, picked)
            # Strictly greater: the first maximum wins, as in argmax.
            better = block_top > best
            block_best = ops.cast(ops.argmax(logits, axis=-1), "int32")
            best_index = ops.where(better, block_best + start, best_index)
            best = ops.where(better, block_top, best)
            return new_top, total, picked, best, best_index

        lowest = ops.full_like(weights, float("-inf"))
        top, total, picked, _, best_index = over_vocabulary(
            statistics,
            (
                lowest,
                ops.zeros_like(weights),
                ops.zeros_like(weights),
                lowest,
                ops.zeros_like(labels),
            ),
        )
        log_total = top + ops.log(total)
        correct = ops.cast(ops.equal(best_index, labels), dtype)
        sums = ops.stack(
            [ops.sum(weights * (log_total - picked)),
             ops.sum(weights * correct)]
        )
        if kernel_gradient:
            # A plain matmul for the kernel's gradient (`materialized`).
            hidden_t = materialized(ops.transpose(hidden_states))

        def gradients(start, size, carry):
            grad_hidden, grad_kernel = carry
            block = kernel_block(kernel, start, size)
            logits = block_logits(block)
            is_label = ops.equal(
                ops.expand_dims(labels - start, -1),
                ops.arange(size, dtype="int32"),
            )
            # d(sum w * loss) / d logits = w * (softmax - one_hot(label))
            grad_logits = ops.cast(
                ops.expand_dims(weights, -1)
                * (
                    ops.exp(logits - ops.expand_dims(log_total, -1))
                    - ops.cast(is_label, dtype)
                ),
                compute_dtype,
            )
            grad_hidden = grad_hidden + ops.cast(
                ops.matmul(grad_logits, ops.transpose(block)), "float32"
            )
            if kernel_gradient:
                grad_kernel = ops.slice_update(
                    grad_kernel,
                    (0, start),
                    ops.cast(ops.matmul(hidden_t, grad_logits), "float32"),
                )
            return grad_hidden, grad_kernel

        grad_hidden, grad_kernel = over_vocabulary(
            gradients,
            (
                ops.zeros_like(hidden_states, "float32"),
                ops.zeros((hidden_size, vocabulary) if kernel_gradient
                          else (), "float32"),
            ),
        )
        return sums, _scaled_gradients(
            grad_hidden, grad_kernel if kernel_gradient else None,
            compute_dtype, kernel.dtype,
        )

    return ops.custom_gradient(forward)(hidden_states, kernel)
