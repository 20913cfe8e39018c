"""Coupling networks: the Flow++ network (gated convs + self-attention or gated NIN, or gated convs alone),
the dequantizer's context network, and a RealNVP ResNet.

The Flow++ networks run channels-last (N x H x W x F): 1x1 convs are `Linear` layers, LayerNorm and
attention act on the last dimension, and 3x3 convs see a channels-last NCHW view (no copies).
Networks take and return NCHW tensors.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from flowspec.layers.attention import attention
from flowspec.layers.base import DataInit
from flowspec.layers.concat_elu import concat_elu, project_concat_elu
from flowspec.layers.dropout import Dropout
from flowspec.layers.fusion import Fusable


def _data_init(module: Dense | Conv, y: Tensor, init_scale: float) -> None:
    """Rescale the weight so y (computed without bias) has std init_scale and mean 0 per output unit.

    With weight normalization the per-unit gain is rescaled (the direction is kept)."""
    with torch.no_grad():
        var, mean = torch.var_mean(y.reshape(-1, y.shape[-1]), dim=0, correction=0)
        scale = init_scale * torch.rsqrt(var + 1e-8)
        if module.gain is not None:
            module.gain.mul_(scale)
        else:
            module.weight.mul_(scale.view(-1, *([1] * (module.weight.dim() - 1))))
        module.bias.copy_(-mean * scale)


class _Weighted(DataInit):
    """The official weight init, optional weight normalization, data-dependent init (Dense and Conv).

    N(0, 0.05) weights and zero bias. With weight normalization (Salimans & Kingma, as the official
    ImageNet 32x32 launcher) the weight is `gain * v / |v|` per output unit: `weight` holds the
    direction v, `gain` (one per unit, a parameter; 1 at first) its length. On the meta device
    (counting, `inspect`) there are no values to draw.
    """

    weight: nn.Parameter
    bias: nn.Parameter
    fused: str | None = None  # the torch.compile backend of `of_concat_elu`'s elementwise work

    def reset_parameters(self) -> None:
        """torch's default init (its draws keep the random stream of earlier versions); none on meta."""
        if not self.weight.is_meta:
            super().reset_parameters()  # type: ignore[misc]

    def _init_weights(self, n_out: int, init_scale: float, weight_norm: bool) -> None:
        self.register_init_flag()
        self.init_scale = init_scale
        self.gain = nn.Parameter(torch.ones(n_out)) if weight_norm else None
        if not self.weight.is_meta:
            nn.init.normal_(self.weight, 0.0, 0.05)
            nn.init.zeros_(self.bias)

    def of_concat_elu(self, x: Tensor, mask: Tensor | None = None, scale: float = 1.0) -> Tensor:
        """self(dropout(concat_elu(x))), keeping only x and the dropout mask for the backward pass."""
        if self.needs_init():
            u = concat_elu(x)
            return self(u if mask is None else u * mask * scale)
        weight, padding = self.effective_weight(), self._padding()
        return project_concat_elu(x, weight, self.bias, padding, mask, scale, self.fused)

    def _padding(self) -> int | None:
        """None for a dense layer, else the conv's padding."""
        raise NotImplementedError

    def effective_weight(self) -> Tensor:
        if self.gain is None:
            return self.weight
        v = self.weight
        scale = self.gain * torch.rsqrt(v.square().flatten(1).sum(1))
        return v * scale.view(-1, *([1] * (v.dim() - 1)))


class Dense(nn.Linear, _Weighted):
    """W x + b on the last dimension (the official `dense`/`nin`): N(0, 0.05), then data-dependent init."""

    def __init__(self, n_in: int, n_out: int, init_scale: float = 1.0, weight_norm: bool = False):
        super().__init__(n_in, n_out)
        self._init_weights(n_out, init_scale, weight_norm)

    def _padding(self) -> None:
        return None

    def forward(self, x: Tensor) -> Tensor:
        weight = self.effective_weight()
        if self.needs_init():
            _data_init(self, F.linear(x, weight), self.init_scale)
            self.mark_initialized()
            weight = self.effective_weight()
        return F.linear(x, weight, self.bias)


class Conv(nn.Conv2d, _Weighted):
    """A 'same'-padded conv on channels-last input (N x H x W x C), with the official conv2d init."""

    def __init__(
        self, n_in: int, n_out: int, kernel: int = 3, init_scale: float = 1.0, weight_norm: bool = False
    ):
        super().__init__(n_in, n_out, kernel, padding=kernel // 2)
        self._init_weights(n_out, init_scale, weight_norm)

    def _padding(self) -> int:
        return self.padding[0]

    def forward(self, x: Tensor) -> Tensor:
        nchw = x.permute(0, 3, 1, 2)
        weight = self.effective_weight()
        if self.needs_init():
            y = F.conv2d(nchw, weight, None, padding=self.padding).permute(0, 2, 3, 1)
            _data_init(self, y, self.init_scale)
            self.mark_initialized()
            weight = self.effective_weight()
        return F.conv2d(nchw, weight, self.bias, padding=self.padding).permute(0, 2, 3, 1)


def position_embedding(height: int, width: int, filters: int) -> nn.Parameter:
    """A learned H x W x F position embedding, N(0, 0.01) (not drawn on the meta device)."""
    emb = torch.empty(height, width, filters)
    if not emb.is_meta:
        emb.normal_(0.0, 0.01)
    return nn.Parameter(emb)


@Fusable
def gated_residual(x: Tensor, y: Tensor) -> Tensor:
    """x + a * sigmoid(b) with [a, b] = y on the last dimension (one addcmul: a pass fewer than x + a * s)."""
    a, b = y.chunk(2, dim=-1)
    return torch.addcmul(x, a, torch.sigmoid(b))


class GatedConv(nn.Module):
    """x + gate(conv2(dropout(concat_elu(conv1(concat_elu(x)) [+ a_proj(concat_elu(context))]))))."""

    fused: str | None = None  # the torch.compile backend of the gated residual (`fusion.Fusable`)

    def __init__(
        self,
        filters: int,
        dropout: float,
        second_kernel: int = 1,
        context_filters: int = 0,
        weight_norm: bool = False,
    ):
        super().__init__()
        self.c1 = Conv(2 * filters, filters, 3, weight_norm=weight_norm)
        self.a_proj = (
            Dense(2 * context_filters, filters, weight_norm=weight_norm) if context_filters else None
        )
        self.dropout = Dropout(dropout)
        if second_kernel == 1:
            self.c2: Dense | Conv = Dense(2 * filters, 2 * filters, init_scale=0.1, weight_norm=weight_norm)
        else:
            self.c2 = Conv(2 * filters, 2 * filters, second_kernel, init_scale=0.1, weight_norm=weight_norm)

    def branch(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """The 2F outputs before the gate (`mask`: a dropout mask drawn beforehand)."""
        c1 = self.c1.of_concat_elu(x)
        if self.a_proj is not None:
            c1 = c1 + self.a_proj.of_concat_elu(context)
        if mask is None:
            mask = self.dropout.draw((*c1.shape[:-1], 2 * c1.shape[-1]), c1.device)
        return self.c2.of_concat_elu(c1, mask, self.dropout.scale)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return gated_residual(x, self.branch(x, context), fused=self.fused)


class GatedAttention(nn.Module):
    """Multi-head self-attention over all positions, gated residual; q, k, v from x + pos_emb."""

    fused: str | None = None  # the torch.compile backend of the gated residual (`fusion.Fusable`)

    def __init__(self, filters: int, heads: int, dropout: float, weight_norm: bool = False):
        super().__init__()
        self.heads = heads
        self.proj1 = Dense(filters, 3 * filters, weight_norm=weight_norm)
        self.dropout = Dropout(dropout)
        self.proj2 = Dense(filters, 2 * filters, init_scale=0.1, weight_norm=weight_norm)

    def forward(self, x: Tensor, pos_emb: Tensor, mask: Tensor | None = None) -> Tensor:
        n, h, w, f = x.shape
        qkv = self.proj1(x + pos_emb).view(n, h * w, 3, self.heads, f // self.heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # unbind: its backward is one stack
        a = attention(q, k, v)
        a = a.transpose(1, 2).reshape(n, h, w, f)
        return gated_residual(x, self.proj2(self.dropout(a, mask)), fused=self.fused)


class GatedNIN(nn.Module):
    """The no-attention ablation: 1x1 conv F -> 3F, max over each channel's 3 outputs, 1x1 conv, gate."""

    fused: str | None = None  # the torch.compile backend of the gated residual (`fusion.Fusable`)

    def __init__(self, filters: int, dropout: float, weight_norm: bool = False):
        super().__init__()
        self.proj1 = Dense(filters, 3 * filters, weight_norm=weight_norm)
        self.dropout = Dropout(dropout)
        self.proj2 = Dense(filters, 2 * filters, init_scale=0.1, weight_norm=weight_norm)

    def forward(self, x: Tensor, pos_emb: Tensor, mask: Tensor | None = None) -> Tensor:
        c = self.proj1(x + pos_emb).unflatten(-1, (x.shape[-1], 3)).amax(-1)
        return gated_residual(x, self.proj2(self.dropout(c, mask)), fused=self.fused)


_EXPENSIVE_OPS = {  # convolutions and the attention kernels (the fused ones this torch has, and ours)
    getattr(torch.ops.aten, name).default
    for name in (
        "convolution",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(torch.ops.aten, name)
} | {torch.ops.flowspec.chunked_attention.default}


def _keep_expensive_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep the outputs of convolutions and attention; recompute the rest (dense layers, elementwise)."""
    return CheckpointPolicy.MUST_SAVE if op in _EXPENSIVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_selective_recompute = functools.partial(create_selective_checkpoint_contexts, _keep_expensive_outputs)


class FlowppBlock(nn.Module):
    """Gated conv, LayerNorm, gated attention (or gated NIN), LayerNorm.

    The official launchers' switches: `mixer=False` drops the attention sub-block (gated conv and
    LayerNorm only: the official `MixLogisticCoupling`), `layernorm=False` the LayerNorms (`use_ln`),
    `second_kernel=3` makes the gated conv's second conv 3x3 instead of 1x1 (`use_nin`), and
    `weight_norm` normalizes every conv and dense layer.

    In a training step the block keeps for backward only its input, its dropout masks (bytes, drawn
    before the block) and the outputs of its convolutions and attention; the dense layers and
    elementwise work are recomputed in the backward pass (selective activation checkpointing). This
    keeps about a fifth of what a plain backward would, at a cost in step time that depends on the machine
    and the model: from a few percent (flowpp_cifar on a 2-core CPU) to over 4x (on an H200, where the
    host's bookkeeping of the recomputation holds the device up); `flowspec.train.recompute` has the
    measurements. `recompute = False` keeps everything instead (faster where memory is plentiful: no
    dispatch mode, no recompute).
    """

    recompute = True
    fused: str | None = None  # the torch.compile backend of the gated residual (`fusion.Fusable`)

    def __init__(
        self,
        filters: int,
        heads: int,
        attention: bool,
        dropout: float,
        context_filters: int,
        *,
        mixer: bool = True,
        layernorm: bool = True,
        second_kernel: int = 1,
        weight_norm: bool = False,
    ):
        super().__init__()
        self.conv = GatedConv(filters, dropout, second_kernel, context_filters, weight_norm)
        self.ln1 = nn.LayerNorm(filters, eps=1e-5) if layernorm else nn.Identity()
        self.attn: nn.Module | None = None
        if mixer:
            self.attn = (
                GatedAttention(filters, heads, dropout, weight_norm)
                if attention
                else GatedNIN(filters, dropout, weight_norm)
            )
            self.ln2 = nn.LayerNorm(filters, eps=1e-5) if layernorm else nn.Identity()

    def _block(
        self, x: Tensor, pos_emb: Tensor, context: Tensor | None, masks: tuple[Tensor | None, Tensor | None]
    ) -> Tensor:
        x = self.ln1(gated_residual(x, self.conv.branch(x, context, masks[0]), fused=self.fused))
        if self.attn is None:
            return x
        return self.ln2(self.attn(x, pos_emb, masks[1]))

    def forward(self, x: Tensor, pos_emb: Tensor, context: Tensor | None) -> Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return self._block(x, pos_emb, context, (None, None))
        n, h, w, f = x.shape
        masks = (
            self.conv.dropout.draw((n, h, w, 2 * f), x.device),
            self.attn.dropout.draw((n, h, w, f), x.device) if self.attn is not None else None,
        )
        if not self.recompute:
            return self._block(x, pos_emb, context, masks)
        return checkpoint(
            self._block, x, pos_emb, context, masks,
            use_reentrant=False, preserve_rng_state=False, context_fn=_selective_recompute,
        )  # fmt: skip


class FlowppNetwork(nn.Module):
    """The Flow++ coupling network: proj_in 3x3, blocks, proj_out 3x3 (init_scale 0.1).

    Block options as in `FlowppBlock` (`nin=False`: a 3x3 second conv). `final_elu` applies concat_elu
    before proj_out (the ImageNet and CelebA launchers; its input is then 2F wide). The position
    embedding is made even without attention (`mixer=False`), where it is never used: the official
    `MixLogisticCoupling` makes it too, and the official parameter counts include it.
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        out_channels: int,
        filters: int,
        blocks: int,
        heads: int,
        attention: bool,
        dropout: float,
        context_filters: int = 0,
        *,
        mixer: bool = True,
        layernorm: bool = True,
        nin: bool = True,
        final_elu: bool = False,
        weight_norm: bool = False,
    ):
        super().__init__()
        c, h, w = in_shape
        self.final_elu = final_elu
        self.pos_emb = position_embedding(h, w, filters)
        self.has_unused_parameters = not mixer  # the embedding gets no gradient: DDP must be told
        self.proj_in = Conv(c, filters, 3, weight_norm=weight_norm)
        options = dict(
            mixer=mixer, layernorm=layernorm, second_kernel=1 if nin else 3, weight_norm=weight_norm
        )
        self.blocks = nn.ModuleList(
            FlowppBlock(filters, heads, attention, dropout, context_filters, **options) for _ in range(blocks)
        )
        width = 2 * filters if final_elu else filters
        self.proj_out = Conv(width, out_channels, 3, init_scale=0.1, weight_norm=weight_norm)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = self.proj_in(x.permute(0, 2, 3, 1)).contiguous()
        pos_emb = self.pos_emb.to(x.dtype)
        for block in self.blocks:
            x = block(x, pos_emb, context)
        x = self.proj_out.of_concat_elu(x) if self.final_elu else self.proj_out(x)
        return x.permute(0, 3, 1, 2)


class ContextNetwork(nn.Module):
    """The variational dequantizer's context: x / levels - 0.5, split by the mask, halves concatenated on
    channels, a 3x3 conv, then gated convs whose second conv is 3x3. Returns channels-last features.

    The official ImageNet and CelebA launchers follow each gated conv with a LayerNorm (`layernorm`) and
    the ImageNet 32x32 one also with gated self-attention (its own position embedding, `heads` heads)
    and a second LayerNorm; `image_size` (H x W of the image) sizes that embedding."""

    def __init__(
        self,
        channels: int,
        filters: int,
        blocks: int,
        mask: str,
        levels: int,
        dropout: float,
        *,
        layernorm: bool = False,
        attention: bool = False,
        heads: int = 4,
        weight_norm: bool = False,
        image_size: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.mask = mask
        self.levels = levels
        in_channels = 2 * channels if mask != "channel" else channels
        self.proj = Conv(in_channels, filters, 3, weight_norm=weight_norm)
        self.pos_emb: nn.Parameter | None = None
        if attention:
            if image_size is None:
                raise ValueError("a context network with attention needs the image size")
            h, w = image_size
            self.pos_emb = position_embedding(h, w if mask == "channel" else w // 2, filters)
        if layernorm or attention:
            options = dict(mixer=attention, layernorm=layernorm, second_kernel=3, weight_norm=weight_norm)
            self.blocks = nn.ModuleList(
                FlowppBlock(filters, heads, True, dropout, 0, **options) for _ in range(blocks)
            )
        else:
            self.blocks = nn.ModuleList(
                GatedConv(filters, dropout, 3, weight_norm=weight_norm) for _ in range(blocks)
            )

    def forward(self, x: Tensor) -> Tensor:
        from flowspec.layers.splits import split

        a, b = split(self.mask, x / self.levels - 0.5)
        x = self.proj(torch.cat([a, b], dim=1).permute(0, 2, 3, 1)).contiguous()
        pos_emb = None if self.pos_emb is None else self.pos_emb.to(x.dtype)
        for block in self.blocks:
            x = block(x) if isinstance(block, GatedConv) else block(x, pos_emb, None)
        return x


class ResBlock(nn.Module):
    """A residual block: two norm-ReLU-conv layers added to the input."""

    def __init__(self, filters: int, norm: str):
        super().__init__()
        self.net = nn.Sequential(
            _norm(filters, norm), nn.ReLU(), _conv(filters, filters, norm),
            _norm(filters, norm), nn.ReLU(), _conv(filters, filters, norm),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


def _norm(filters: int, norm: str) -> nn.Module:
    return nn.BatchNorm2d(filters) if norm == "batch" else nn.Identity()


def _conv(n_in: int, n_out: int, norm: str) -> nn.Module:
    conv = nn.Conv2d(n_in, n_out, 3, padding=1)
    return weight_norm(conv) if norm == "weight" else conv


class ResNet(nn.Module):
    """RealNVP's coupling network: a 3x3 conv, residual blocks, norm + ReLU, a zero-initialised 3x3 conv.

    In the dequantizer the context features are concatenated to the input on channels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        filters: int,
        blocks: int,
        norm: str,
        context_filters: int = 0,
    ):
        super().__init__()
        out = _conv(filters, out_channels, norm)
        with torch.no_grad():  # the coupling starts as the identity
            if norm == "weight":
                out.parametrizations.weight.original0.zero_()
            else:
                out.weight.zero_()
            out.bias.zero_()
        self.net = nn.Sequential(
            _conv(in_channels + context_filters, filters, norm),
            *(ResBlock(filters, norm) for _ in range(blocks)),
            _norm(filters, norm),
            nn.ReLU(),
            out,
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if context is not None:
            x = torch.cat([x, context.permute(0, 3, 1, 2).to(x.dtype)], dim=1)
        return self.net(x)
