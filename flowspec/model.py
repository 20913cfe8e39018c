"""`FlowModel`: dequantizer -> logit preprocessing -> main flow -> standard normal prior."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, SupportsFloat, SupportsIndex, overload

import torch
from torch import Tensor, nn

from flowspec.errors import check_bool
from flowspec.layers import Coupling, LogitPreprocess, Sequence
from flowspec.layers.base import DataInit, nats_per_bpd, standard_normal_log_prob
from flowspec.layers.fusion import allow_recompiles
from flowspec.layers.networks import FlowppBlock
from flowspec.model_inputs import (
    check_autocast_dtype,
    check_batch,
    check_data,
    check_not_meta,
    sample_arguments,
)
from flowspec.spec import FlowSpec

FUSED_GRAPHS = 64  # per elementwise chain: its input shapes (resolutions, batch sizes), grad and autocast


def compile_scope(device: torch.device) -> str:
    """What `FlowModel.compile_for_device` compiles on `device`: "networks" (CUDA) or "elementwise"."""
    return "networks" if device.type == "cuda" else "elementwise"


class FlowModel(nn.Module):
    """A compiled spec (`flowspec.build(spec)`, or a trained one from `flowspec.load(path)`).

    Integer images are N x C x H x W tensors with values in [0, levels) (uint8 for 8-bit data);
    continuous data `v` lies in [0, levels); latents `z` have the image's shape. The model follows its
    parameters: `model.to("cuda")`, `model.to(torch.float64)` or `model.double()` move and cast it, and
    every method casts its input to the model's device and dtype.

    - `log_prob(x)`: per-image lower bound on log P(x) in nats, log p(x + u) - log q(u | x) with one
      dequantization sample u, including the preprocessing's log-det and the prior on every latent
      dimension (factored-out ones included); `bpd(x)` is the same in bits per dimension.
    - `encode(v) -> (z, logdet)` and `decode(z) -> v` (`decode(z, with_logdet=True) -> (v, logdet)`):
      the bijection and its log |det Jacobian| per image (`decode` with dropout off, `encode` in the
      module's mode: exact inverses in eval mode).
    - `sample(n, temperature)`: integer images from the prior at a temperature.

    Training mode matters only for dropout; `flowspec.build` returns the model in training mode and
    `flowspec.load` in eval mode.
    """

    def __init__(self, spec: FlowSpec, preprocess: LogitPreprocess, dequantizer: nn.Module, flow: Sequence):
        super().__init__()
        self.spec = spec
        self.preprocess = preprocess
        self.dequantizer = dequantizer
        self.flow = flow

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of its floating-point parameters (float32 when it has none)."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    @property
    def device(self) -> torch.device:
        """The device of its parameters (cpu when it has none)."""
        return next((p.device for p in self.parameters()), torch.device("cpu"))

    def _as_float(self, x: Tensor) -> Tensor:
        return x.to(device=self.device, dtype=self.dtype)

    def _checked(self, x: Tensor, method: str, kind: str) -> Tensor:
        """`x` as floats on the model's device, once `model_inputs.check_batch` accepts it."""
        check_not_meta(self.device, method)
        return self._as_float(check_batch(x, method, self.spec.data.shape, self.spec.data.levels, kind))

    @contextmanager
    def _dropout_off(self) -> Iterator[None]:
        """Eval mode meanwhile (dropout off), the module's mode restored after."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    # ---------------------------------------------------------------- likelihood

    def encode(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """Continuous data v in [0, levels) -> latent z (the image's shape) and log |det dz/dv| per image.
        It follows the module's mode: in training mode (as `flowspec.build` returns it) dropout makes each
        call a different random map; after `model.eval()` it is the exact inverse of `decode`. On the CPU,
        v must be finite and inside the logit preprocessing's open interval (`preprocess.domain`)."""
        v = self._checked(v, "encode", "data")
        y, logdet_pre = self.preprocess(v)
        check_data(v, y, "encode", self.preprocess.domain, self.spec.data.levels)
        z, logdet = self.flow(y)
        return z, logdet_pre + logdet

    @overload
    def decode(self, z: Tensor, with_logdet: Literal[False] = False) -> Tensor: ...

    @overload
    def decode(self, z: Tensor, with_logdet: Literal[True]) -> tuple[Tensor, Tensor]: ...

    @overload
    def decode(self, z: Tensor, with_logdet: bool) -> Tensor | tuple[Tensor, Tensor]: ...

    def decode(self, z: Tensor, with_logdet: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Latent z -> continuous data v, in eval mode (no dropout; the mode is restored): in [0, levels)
        for the latents of data, and within the logit preprocessing's range, (-alpha, 1 - alpha) * levels
        / (1 - 2 alpha), for any z (`sample` clamps to the levels); with `with_logdet`, also log |det dv/dz|
        per image: the preprocessing's, exact, minus the flow's log-det of encoding its output again. It
        stays finite where v rounds to the ends of that range (which `encode` then refuses)."""
        check_bool(with_logdet, "decode(with_logdet)", TypeError)  # "no" would be true
        z = self._checked(z, "decode", "latents")
        with self._dropout_off():
            y = self.flow.inverse(z)
            v = self.preprocess.inverse(y)
            if not with_logdet:
                return v
            return v, self.preprocess.inverse_logdet(y) - self.flow(y)[1]

    def log_prob(self, x: Tensor) -> Tensor:
        """Per-image lower bound on log P(x) in nats, for integer images N x C x H x W in [0, levels)
        (a ValueError for another shape, or, on the CPU, for values that are not such integers)."""
        return self._log_prob(x, "log_prob")

    def _log_prob(self, x: Tensor, caller: str) -> Tensor:
        v, log_q = self.dequantizer(self._checked(x, caller, "images"))
        y, logdet_pre = self.preprocess(v)
        z, logdet = self.flow(y)
        return standard_normal_log_prob(z) + logdet_pre + logdet - log_q.to(logdet.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.log_prob(x)

    def bpd(self, x: Tensor) -> Tensor:
        """Bits per dimension: -log_prob / (D ln 2)."""
        return -self._log_prob(x, "bpd") / nats_per_bpd(self.spec.dims)

    # ---------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample(
        self, n: SupportsIndex, temperature: SupportsFloat = 1.0, generator: torch.Generator | None = None
    ) -> Tensor:
        """`n` integer images (uint8; int32 when levels > 256), decoded in eval mode from N(0, T^2 I), drawn
        with `generator` on its own device (a CPU generator: the same noise for a model on any device)."""
        n, temperature = sample_arguments(n, temperature)
        check_not_meta(self.device, "sample")
        drawn_on = generator.device if generator is not None else self.device
        z = torch.randn(n, *self.spec.data.shape, generator=generator, device=drawn_on, dtype=self.dtype)
        v = self.decode(z.to(self.device) * temperature)
        if not bool(torch.isfinite(v).all()):  # e.g. a temperature whose noise overflows the networks
            raise ValueError(f"sampling at temperature {temperature} gave values that are not finite")
        levels = self.spec.data.levels
        out_dtype = torch.uint8 if levels <= 256 else torch.int32
        return v.floor().clamp(0, levels - 1).to(out_dtype)

    # ---------------------------------------------------------------- setup

    def _data_init_modules(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, DataInit)]

    @property
    def initialized(self) -> bool:
        """Whether every layer with a data-dependent init has had it (`initialize`)."""
        return all(bool(m.initialized) for m in self._data_init_modules())

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Data-dependent init over a batch of at least 2 integer images, in the model's own precision
        (autocast off meanwhile); a no-op once done (the flags are saved). A call that fails, or would
        leave weights that are not finite, changes nothing."""
        check_not_meta(self.device, "initialize")
        modules = self._data_init_modules()
        if all(bool(m.initialized) for m in modules):
            return
        check_batch(x, "initialize", self.spec.data.shape, self.spec.data.levels, "images")
        if len(x) < 2:
            raise ValueError(f"initialize needs 2 images or more (their statistics set scales), not {len(x)}")
        before = {name: value.clone() for name, value in self.state_dict().items()}
        autocast = next((m.autocast_dtype for m in self.modules() if hasattr(m, "autocast_dtype")), None)
        self.set_autocast(None)  # the statistics of the model's own precision, not of bf16 outputs
        for m in modules:
            m.init_mode = True
        try:
            self.log_prob(x)
            if not all(torch.isfinite(p).all() for p in self.parameters()):
                raise ValueError("initialize made weights that are not finite")
        except BaseException:
            self.load_state_dict(before)
            raise
        finally:
            for m in modules:
                m.init_mode = False
            self.set_autocast(autocast)

    def couplings(self) -> list[Coupling]:
        """Its coupling layers, in module order (the flow's and the dequantizer's)."""
        return [m for m in self.modules() if isinstance(m, Coupling)]

    def set_autocast(self, dtype: torch.dtype | None) -> None:
        """Run the coupling networks and the dequantizer's context network under torch.autocast with
        `dtype` (None: off); the transforms, log-dets and log q stay in the data's dtype (fp32 or fp64)."""
        check_autocast_dtype(dtype)
        for m in self.modules():
            if hasattr(m, "autocast_dtype"):
                m.autocast_dtype = dtype

    def set_recompute(self, on: bool) -> None:
        """Whether training steps recompute the coupling networks' dense and elementwise work in the
        backward pass (selective activation checkpointing, the default) or keep all of it."""
        check_bool(on, "set_recompute(on)", TypeError)  # "off" would be true
        for m in self.modules():
            if isinstance(m, FlowppBlock):
                m.recompute = on

    def compile_networks(self, **kwargs: Any) -> None:
        """torch.compile each coupling network in place (parameter names are unchanged), and the
        couplings' mixture logit-CDF between them with the same backend (`fuse_elementwise`'s chain, eager
        otherwise: about a hundred small kernels a coupling in a training step). Shapes are static unless
        `dynamic=True` is passed: the networks share one forward, and inductor fails on the dynamic-shape
        graph it would otherwise make once a second shape is seen."""
        couplings = self.couplings()
        allow_recompiles(max(4 * len(couplings), FUSED_GRAPHS))  # a graph per network, shape, context, grad
        for c in couplings:
            c.network.compile(**{"dynamic": False, **kwargs})
            c.fused = kwargs.get("backend", "inductor")

    def fuse_elementwise(self, backend: str | None = "inductor") -> None:
        """Run the networks' elementwise chains (concat_elu with its dropout mask, the gated residuals,
        the mixture's logit-CDF and its inverse's N x K work) compiled by torch.compile with `backend`,
        one graph per shape (the inverse's: one for any shape), and the convolutions, matmuls and
        attention eager; None: everything eager (`flowspec.layers.fusion`)."""
        allow_recompiles(FUSED_GRAPHS)
        for m in self.modules():
            if hasattr(m, "fused"):
                m.fused = backend

    def compile_for_device(self) -> str:
        """torch.compile what pays on the model's device: whole coupling networks on a GPU
        (`compile_networks`), only the elementwise chains elsewhere (`fuse_elementwise`: on a CPU whole
        compiled networks ran slower than eager). Returns what it compiled: "networks" or "elementwise"."""
        scope = compile_scope(self.device)
        if scope == "networks":
            self.compile_networks()
        else:
            self.fuse_elementwise()
        return scope

    def count_parameters(self) -> dict[str, int]:
        """Trainable parameters: total, main flow, dequantizer, and the dequantizer's context network."""

        def count(module: nn.Module | None) -> int:
            return 0 if module is None else sum(p.numel() for p in module.parameters() if p.requires_grad)

        return {
            "total": count(self),
            "flow": count(self.flow),
            "dequantizer": count(self.dequantizer),
            "context": count(getattr(self.dequantizer, "context_net", None)),
        }
