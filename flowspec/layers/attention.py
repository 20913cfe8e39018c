"""Multi-head self-attention for the Flow++ blocks, with the kernel that is fastest for device and dtype.

CUDA, and float32 or float64 on the CPU: torch's fused `scaled_dot_product_attention`. bfloat16 on the
CPU: the fused CPU kernel's bf16 backward runs far below the machine's bf16 matmul rate (it took a third
of a bf16 training step), so the backward is computed with batched bf16 matmuls, a chunk of heads at a
time so that the score matrices stay in cache, and so is the forward where that is faster (`fused_forward`).
Like flash attention, the backward recomputes the scores from q, k and v instead of keeping them, so it
holds no more memory than the fused kernel. The two kernels are torch custom ops: the blocks' selective
recomputation keeps their outputs, and torch.compile sees them as single calls.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

SCORES = 1 << 20  # score elements per chunk: 2 MB in bf16 (4 x 512 x 512), and as much again for p


def _chunk(pairs: int, length: int) -> int:
    """(image, head) pairs per matmul: as many as keep a chunk's scores at SCORES elements (measured
    fastest on a 2-core Zen 4; bigger chunks leave the cache, smaller ones make small matmuls)."""
    return max(1, min(pairs, SCORES // (length * length)))


def _score_buffers(q: Tensor) -> tuple[Tensor, Tensor, int]:
    """Two chunk-sized score buffers (scores, probabilities), allocated once per call: allocating
    them per chunk cost a third of the forward pass at 512 positions (fresh pages for each)."""
    pairs, length, _ = q.shape
    chunk = _chunk(pairs, length)
    scores = q.new_empty(chunk, length, length)
    return scores, torch.empty_like(scores), chunk


@torch.compiler.assume_constant_result  # a constant to torch.compile, which may not call the probe
def fused_forward() -> bool:
    """Whether `chunked_attention`'s forward runs torch's fused kernel rather than the chunks: on CPUs with
    AMX tiles (Intel Sapphire Rapids and later), where its bf16 tile matmuls made it 1.5-1.8x faster than
    the chunks (the backward stays chunked: the fused one was 1.9x slower there too); on a Zen 4 (AVX-512
    bf16, no AMX) the chunks were twice as fast."""
    return has_amx_tiles()


@functools.cache
def has_amx_tiles() -> bool:
    """Whether this CPU has AMX tiles, as torch's probe says (False where torch has none)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


@torch.library.custom_op("flowspec::chunked_attention", mutates_args=())
def chunked_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v for contiguous B x L x d tensors, a chunk of the B at a time (or with
    torch's fused kernel: `fused_forward`); the backward is chunked."""
    with record_function("flowspec::chunked_attention"):  # a custom op's body is not profiled as one
        if fused_forward():
            return F.scaled_dot_product_attention(q, k, v)
        return _chunked_attention(q, k, v)


def _chunked_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    out = torch.empty_like(q)
    q = q * q.shape[-1] ** -0.5
    scores, p, chunk = _score_buffers(q)
    for i in range(0, q.shape[0], chunk):
        part, n = slice(i, i + chunk), min(chunk, q.shape[0] - i)
        torch.bmm(q[part], k[part].transpose(1, 2), out=scores[:n])
        torch.softmax(scores[:n], -1, out=p[:n])
        torch.bmm(p[:n], v[part], out=out[part])
    return out


@torch.library.custom_op("flowspec::chunked_attention_backward", mutates_args=())
def chunked_attention_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `chunked_attention` with respect to q, k and v; the scores are recomputed."""
    with record_function("flowspec::chunked_attention_backward"):
        return _chunked_attention_backward(grad, q, k, v, out)


def _chunked_attention_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    scale = q.shape[-1] ** -0.5
    grad = grad.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    minus_delta = (grad.float() * out.float()).sum(-1, keepdim=True).neg_().to(q.dtype)  # -rowsum(p * dp)
    q = q * scale
    scores, p, chunk = _score_buffers(q)
    for i in range(0, q.shape[0], chunk):
        part, n = slice(i, i + chunk), min(chunk, q.shape[0] - i)
        torch.bmm(q[part], k[part].transpose(1, 2), out=scores[:n])
        torch.softmax(scores[:n], -1, out=p[:n])
        torch.bmm(p[:n].transpose(1, 2), grad[part], out=dv[part])
        ds = torch.baddbmm(minus_delta[part], grad[part], v[part].transpose(1, 2), out=scores[:n])
        ds.mul_(p[:n])  # d scores = p * (dp - delta), the subtraction done by the matmul
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
    differentiated = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if fused_forward() and not differentiated:  # no backward: the fused kernel reads q, k, v where they lie
        return F.scaled_dot_product_attention(q, k, v)  # (the same values, without three copies)
    n, heads, length, d = q.shape
    flat = [t.reshape(n * heads, length, d).contiguous() for t in (q, k, v)]
    return chunked_attention(*flat).view(n, heads, length, d)
