"""`coupling [mixlogistic|affine|additive](key=value, ...)`: the first half conditions a network whose
outputs transform the second half. Its settings come from `defaults { coupling ... }` unless it sets them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ModelWrapValidatorHandler, model_validator

from flowspec.nodes import Conflict, Node, StepNode
from flowspec.steps.kind import StepKind, needs_pair, register

CouplingKind = Literal["mixlogistic", "affine", "additive"]
NetworkKind = Literal["flowpp", "gated", "resnet"]

#: per transformed element, how many of the network's outputs the transform's kept tensors take
_KEPT = {"additive": 1, "affine": 3, "mixlogistic": 4}


class CouplingSettings(Node):
    """Settings of a coupling layer; the `defaults` block holds one of these, every coupling step too."""

    coupling: CouplingKind = "mixlogistic"
    components: int = Field(default=32, ge=1, le=1024, description="mixture components (mixlogistic)")
    filters: int = Field(default=96, ge=1, le=4096)
    blocks: int = Field(default=10, ge=1, le=256)
    heads: int = Field(default=4, ge=1, le=256)
    attention: bool = Field(default=True, description="self-attention; off: the gated-NIN ablation")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    network: NetworkKind = "flowpp"
    resnet_norm: Literal["batch", "weight"] = "batch"
    layernorm: bool = Field(default=True, description="LayerNorm after each sub-block (official use_ln)")
    nin: bool = Field(default=True, description="1x1 second conv in the gated convs; off: 3x3 (use_nin)")
    final_elu: bool = Field(default=False, description="concat_elu before the output conv (ImageNet, CelebA)")
    weight_norm: bool = Field(default=False, description="weight normalization of every conv and dense")

    @model_validator(mode="wrap")
    @classmethod
    def _unused_at_builtin(
        cls, data: object, handler: ModelWrapValidatorHandler[CouplingSettings]
    ) -> CouplingSettings:
        """The settings `held_at_builtin` names are held at their built-in values (an ablation's `coupling
        affine` over its base's `components=4`): they change nothing, and `show` leaves them out (a file
        may not write them beside their cause)."""
        settings = handler(data)
        fields = type(settings).model_fields
        for name in held_at_builtin(settings):
            if getattr(settings, name) != fields[name].default:
                object.__setattr__(settings, name, fields[name].default)  # frozen: in place, as validation
                settings.__pydantic_fields_set__.discard(name)
        return settings  # the instance itself (`__init__` keeps no other)

    @model_validator(mode="after")
    def _heads_divide_filters(self) -> CouplingSettings:
        if self.network == "flowpp" and self.attention:
            check_heads_divide_filters(self.heads, self.filters, "network")
        return self


def check_heads_divide_filters(heads: int, filters: int, *also: str) -> None:
    """A `Conflict` unless attention's `heads` divide the `filters` of its network (blaming heads, filters,
    attention and the settings `also` names)."""
    if filters % heads:
        message = f"heads ({heads}) must divide filters ({filters})"
        raise Conflict(message, "heads", "filters", "attention", *also)


def unused_settings(
    coupling: str | None, network: str | None, attention: bool | None
) -> dict[str, tuple[str, str]]:
    """The settings that a coupling of this kind, network and attention does not use: name -> (the
    setting that makes it unused, why). None: not known, so nothing follows from it."""
    unused = {}
    if coupling is not None and coupling != "mixlogistic":
        unused["components"] = ("coupling", f"an {coupling} coupling has no mixture")
    if network == "resnet":
        for name in ("heads", "attention", "dropout", "layernorm", "nin", "final_elu"):
            unused[name] = ("network", "network=resnet does not use it")
        unused["weight_norm"] = (
            "network",
            "network=resnet does not use it (resnet_norm=weight is its weight norm)",
        )
    elif network is not None:
        unused["resnet_norm"] = ("network", "only network=resnet uses it")
        if network == "gated":
            unused["heads"] = unused["attention"] = ("network", "network=gated has no attention sub-block")
    if attention is False and network != "resnet":
        unused["heads"] = ("attention", "attention=off has no heads")
    return unused


def held_at_builtin(settings: CouplingSettings) -> set[str]:
    """The settings a coupling's own kind, network and attention leave unused, but its dropout (a
    dequantizer coupling's dropout is its context network's too)."""
    return set(unused_settings(settings.coupling, settings.network, settings.attention)) - {"dropout"}


class CouplingStep(StepNode, CouplingSettings):
    """A `coupling` step's settings (those it does not write come from `defaults.coupling`)."""

    kind: Literal["coupling"] = "coupling"


def label(c: CouplingSettings) -> str:
    """Compact key settings of a coupling: `mixlogistic k32 f96 b10 h4 p0.2`."""
    parts = [c.coupling]
    if c.coupling == "mixlogistic":
        parts.append(f"k{c.components}")
    if c.network == "resnet":
        parts += ["resnet", f"f{c.filters}", f"b{c.blocks}", "bn" if c.resnet_norm == "batch" else "wn"]
    else:
        mixer = "gated" if c.network == "gated" else f"h{c.heads}" if c.attention else "nin"
        parts += [f"f{c.filters}", f"b{c.blocks}", mixer]
        if c.dropout:
            parts.append(f"p{c.dropout:g}")
        if c.weight_norm:
            parts.append("wn")
        parts += [
            word for word, on in (("noln", not c.layernorm), ("3x3", not c.nin), ("elu", c.final_elu)) if on
        ]
    return " ".join(parts)


def _build(run, ctx, body):
    from flowspec.layers import Coupling
    from flowspec.layers.couplings import outputs_per_element
    from flowspec.layers.networks import FlowppNetwork, ResNet

    step, shape = run.step, run.state_in[0]
    out = shape[0] * outputs_per_element(step.coupling, step.components)
    if step.network in ("flowpp", "gated"):
        network = FlowppNetwork(
            shape,
            out,
            step.filters,
            step.blocks,
            step.heads,
            step.attention,
            step.dropout,
            ctx.context_filters,
            mixer=step.network == "flowpp",
            layernorm=step.layernorm,
            nin=step.nin,
            final_elu=step.final_elu,
            weight_norm=step.weight_norm,
        )
    else:
        network = ResNet(shape[0], out, step.filters, step.blocks, step.resnet_norm, ctx.context_filters)
    return Coupling(step.coupling, network, step.components)


def _flops(layer, shape, halves):
    from flowspec.inspection.flops import module_flops

    return module_flops(layer.network, shape[1], shape[2])


def _memory(layer, shape, halves, itemsize):
    """Its output and, but for the additive, tanh(s) and exp(s) (the mixture's logit-CDF too); then what its
    network keeps, whose output counts only for the mixture (the recomputed logit-CDF keeps its inputs: the
    other transforms keep only what they compute from it)."""
    from flowspec.inspection.memory import kept_per_position

    transformed = shape[0] * _KEPT[layer.transform] * itemsize
    network = kept_per_position(layer.network, itemsize)
    if layer.transform != "mixlogistic":
        network -= shape[0] * layer.per_element * itemsize
    return (transformed + network) * shape[1] * shape[2]


register(
    StepKind(
        name="coupling",
        settings=CouplingStep,
        shape=needs_pair,
        build=_build,
        label=label,
        flops=_flops,
        memory=_memory,
        positional=("coupling",),
        couples=True,
    )
)
