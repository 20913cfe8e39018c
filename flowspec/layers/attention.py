"""Multi-head self-attention for the Flow++ blocks, with the kernel that is fastest for device and dtype.

CUDA, and float32 or float64 on the CPU: torch's fused `scaled_dot_product_attention`. bfloat16 on the
CPU: the fused CPU kernel's bf16 backward runs far below the machine's bf16 matmul rate (it took a third
of a bf16 training step), so attention is computed with batched bf16 matmuls, a few heads at a time so
that the score matrices stay in cache. Like flash attention, the backward recomputes the scores from
q, k and v instead of keeping them, so it holds no more memory than the fused kernel. The two kernels
are torch custom ops: the blocks' selective recomputation keeps their outputs, and torch.compile sees
them as single calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 4  # (image, head) pairs per matmul: 4 x 512 x 512 bf16 scores are 2 MB, within the L2 cache


@torch.library.custom_op("flowspec::chunked_attention", mutates_args=())
def chunked_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v for contiguous B x L x d tensors, CHUNK of the B at a time."""
    out = torch.empty_like(q)
    q = q * q.shape[-1] ** -0.5
    for i in range(0, q.shape[0], CHUNK):
        part = slice(i, i + CHUNK)
        p = torch.softmax(torch.bmm(q[part], k[part].transpose(1, 2)), -1)
        torch.bmm(p, v[part], out=out[part])
    return out


@torch.library.custom_op("flowspec::chunked_attention_backward", mutates_args=())
def chunked_attention_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `chunked_attention` with respect to q, k and v; the scores are recomputed."""
    scale = q.shape[-1] ** -0.5
    grad = grad.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = (grad.float() * out.float()).sum(-1, keepdim=True).to(q.dtype)  # rowsum(p * dp)
    q = q * scale
    for i in range(0, q.shape[0], CHUNK):
        part = slice(i, i + CHUNK)
        p = torch.softmax(torch.bmm(q[part], k[part].transpose(1, 2)), -1)
        torch.bmm(p.transpose(1, 2), grad[part], out=dv[part])
        ds = torch.bmm(grad[part], v[part].transpose(1, 2)).sub_(delta[part]).mul_(p)  # d scores
        torch.bmm(ds, k[part], out=dq[part])
        torch.bmm(ds.transpose(1, 2), q[part], out=dk[part])
    return dq.mul_(scale), dk, dv


@chunked_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch.empty_like(q)


@chunked_attention_backward.register_fake
def _(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, output)


def _backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return chunked_attention_backward(grad, *ctx.saved_tensors)


chunked_attention.register_autograd(_backward, setup_context=_setup_context)


def use_chunked(x: Tensor) -> bool:
    """Whether attention on tensors like x runs as chunked matmuls (bfloat16 on the CPU)."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v on N x heads x L x d tensors (any strides)."""
    if not use_chunked(q):
        return F.scaled_dot_product_attention(q, k, v)
    n, heads, length, d = q.shape
    flat = [t.reshape(n * heads, length, d).contiguous() for t in (q, k, v)]
    return chunked_attention(*flat).view(n, heads, length, d)
