"""`StepKind`: everything flowspec knows about one kind of step, and the registry of kinds by name.

Each module of this package defines one kind (its settings model and rules) and registers it. The parser,
validation, shape check, builder, formatter, inspect, diff and the count of unrolled steps look kinds up
here; rules about particular kinds name them where they are made (the `defaults` of `coupling` and `norm`,
the variational dequantizer's rules on its splits, couplings and sigmoid, inspect's legend of the split
masks). Nothing here imports torch: build, FLOP and memory rules import it when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Union

from flowspec.nodes import StepNode

if TYPE_CHECKING:
    from flowspec.steps.walk import StepRun

Shape = tuple[int, int, int]
#: What a step receives: a C x H x W shape, or inside a split the pair of half shapes.
State = Union[Shape, tuple[Shape, Shape]]


def is_pair(state: State) -> bool:
    """True inside a split (the state is a pair of half shapes)."""
    return isinstance(state[0], tuple)


def unit(state: State) -> tuple[Shape, int]:
    """The shape one parameter set covers, and how many sets (2 for a pair of halves)."""
    if is_pair(state):
        return state[0], 2  # type: ignore[return-value]
    return state, 1  # type: ignore[return-value]


def fmt(state: State) -> str:
    """`3x32x32`, or `(3x32x16, 3x32x16)` for a pair."""
    if is_pair(state):
        return "(" + ", ".join("x".join(map(str, s)) for s in state) + ")"  # type: ignore[arg-type]
    return "x".join(map(str, state))  # type: ignore[arg-type]


class ShapeProblem(Exception):
    """Raised by a shape rule: the step cannot run on the state it receives (the message says why).

    `changes_shape`: the step would have changed the shape, so the steps after it get a shape nobody
    knows and the walk reports nothing more of that spec part (their problems would be echoes).
    `reads`: the step's settings the check read; `sized`: it judged the size of the shape received."""

    def __init__(
        self, message: str, changes_shape: bool = False, reads: tuple[str, ...] = (), sized: bool = False
    ):
        super().__init__(message)
        self.changes_shape, self.reads, self.sized = changes_shape, reads, sized


class ShapeContext(Protocol):
    """What a shape rule may ask of the walk (see `flowspec.steps.walk`)."""

    where: str  # "flow" or "dequantize"

    def body(self, state: State, copy: int | None = None) -> State:
        """Walk the step's body from `state` (`copy`: which copy of a repeat this is); its final state."""

    def settled(self, before: State, after: State) -> bool:
        """True when further copies of a body cannot change anything the walk reports."""

    def latent(self, shape: Shape) -> None:
        """Note a latent the step sets aside (factor-out)."""


@dataclass
class BuildContext:
    """What build rules need beyond the step: the width of the dequantizer's context (0: none)."""

    context_filters: int = 0


ShapeRule = Callable[[Any, State, ShapeContext], State]
#: (run, context, layers built from the body) -> the layer, or a list of layers already tagged
BuildRule = Callable[["StepRun", BuildContext, list[Any]], Any]
LabelRule = Callable[[Any], str]
#: (one built layer, the shape one parameter set covers, how many such sets: 2 inside a split, else 1)
#: -> forward FLOPs per image
FlopRule = Callable[[Any, Shape, int], int]
#: (one built layer, the shape one parameter set covers, how many sets, bytes per element) -> bytes kept
#: for backward per image
MemoryRule = Callable[[Any, Shape, int, int], int]


@dataclass(frozen=True)
class StepKind:
    """One step kind: its settings (a pydantic model with `kind: Literal[name]`) and its rules.

    `positional` names the settings the grammar rule writes as bare values after the keyword, in order
    (`split MASK`, `norm [GRANULARITY]`); other settings are written as `(key=value, ...)`. `body`: the
    step holds a list of steps (`split`, `repeat`). `copies`: for a step with a body, how many copies of
    the body it runs one after the other, the copies' layers standing in for a layer of its own (`repeat`:
    its count); None: the body runs once inside the step's own layer (`split`). `swaps_halves`: the step
    swaps the halves (flip). `couples`: one half conditions the transform of the other (inspect says which,
    and counts them). `shaped`: the settings whose value decides the shapes the step hands on or its body
    sees (`split`: its mask, `repeat`: its count); after a repair of one of them flowspec does not check
    the shapes of the repaired spec (their problems would be echoes of the repair).
    """

    name: str
    settings: type[StepNode]
    shape: ShapeRule
    build: BuildRule
    label: LabelRule
    flops: FlopRule
    memory: MemoryRule
    positional: tuple[str, ...] = ()
    body: bool = False
    copies: Callable[[Any], int] | None = None
    swaps_halves: bool = False
    couples: bool = False
    shaped: tuple[str, ...] = ()


KINDS: dict[str, StepKind] = {}


def register(kind: StepKind) -> StepKind:
    """Add `kind` to the registry (its settings' `kind` field must default to its name)."""
    tag = kind.settings.model_fields["kind"].default
    if tag != kind.name:
        raise ValueError(f"step kind {kind.name!r}: its settings model says kind={tag!r}")
    KINDS[kind.name] = kind
    return kind


def kind_of(step: Any) -> StepKind:
    """The definition of a step's kind."""
    return KINDS[step.kind]


def no_label(step: Any) -> str:
    """The label of a step without settings."""
    return ""


def no_cost(layer: Any, shape: Shape, *rest: int) -> int:
    """FLOP or memory rule of a step that does no counted work (or whose body counts it)."""
    return 0


def output_memory(layer: Any, shape: Shape, halves: int, itemsize: int) -> int:
    """Memory rule of a step that keeps only its output for the backward pass."""
    return halves * shape[0] * shape[1] * shape[2] * itemsize


def same_state(step: Any, state: State, ctx: ShapeContext) -> State:
    """Shape rule of a step that runs on anything and keeps its shape."""
    return state


def needs_pair(step: Any, state: State, ctx: ShapeContext) -> State:
    """Shape rule of a step that acts on two halves: only inside a split; keeps the shape."""
    if not is_pair(state):
        raise ShapeProblem(f"{step.kind} needs two halves: put it inside a split")
    return state


def whole(step: Any, state: State) -> Shape:
    """The shape of a step that cannot run inside a split."""
    if is_pair(state):
        raise ShapeProblem(f"{step.kind} cannot run inside a split")
    return state  # type: ignore[return-value]
