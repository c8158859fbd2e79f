"""PyTorch on CPU: the lm_head's float32 product through oneDNN.

PyTorch multiplies float32 matrices on CPU with MKL's `sgemm`, which on
the 2-core AMD EPYC benchmark machine took 41 ms for the lm_head of a
batch-8 decoding step ((8, 512) x (512, 151,936)) where oneDNN's inner
product, which PyTorch ships too, took 15-20 ms (JAX: 23 ms); at batch 1
both take 13 ms, and over 1,024 positions oneDNN is 11% faster. PyTorch
reaches oneDNN for float32 only through an operator of its own
(`torch.ops.mkldnn._linear_pointwise`) that Inductor lowers only for
weights frozen into the graph, so it is wrapped here in a custom operator
that `torch.compile` calls as it is. It has no gradient: `applies` keeps
it to calls that need none (`generate()`, `predict()`).

Imported by `token_embedding` on the PyTorch backend only.
"""

import torch


def available():
    """Whether this PyTorch has oneDNN and its linear operator."""
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_linear_pointwise"
    )


_AVAILABLE = available()


@torch.library.custom_op("keras_qwenvl::onednn_matmul", mutates_args=())
def onednn_matmul(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """`x @ kernel` for x (m, k) and kernel (k, n), by oneDNN."""
    # oneDNN's linear takes its weights as (n, k): the kernel's transpose
    # is a view, read in place.
    return torch.ops.mkldnn._linear_pointwise(
        x, kernel.t(), None, "none", [None], ""
    )


@onednn_matmul.register_fake
def _(x, kernel):
    return x.new_empty((x.shape[0], kernel.shape[1]))


def applies(inputs, kernel):
    """Float32 CPU tensors whose product needs no gradient."""
    return (
        _AVAILABLE
        and inputs.dtype == torch.float32
        and kernel.dtype == torch.float32
        and inputs.device.type == "cpu"
        and kernel.device.type == "cpu"
        and not (
            torch.is_grad_enabled()
            and (inputs.requires_grad or kernel.requires_grad)
        )
    )


def matmul(inputs, kernel):
    """`inputs @ kernel` for inputs (..., k) and kernel (k, n)."""
    rows = inputs.reshape(-1, inputs.shape[-1])
    product = onednn_matmul(rows, kernel)
    return product.reshape(*inputs.shape[:-1], kernel.shape[-1])
