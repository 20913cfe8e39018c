"""The validated spec: frozen pydantic models, the single source of truth for build, inspect and train.

A `FlowSpec` is what a `.flow` file means after `extends`, `defaults` and `--set` overrides have been
resolved: every step carries all of its settings. Source locations ride along on each step (`source`)
for error messages and `inspect`, but are not part of a spec's value: two specs are equal when their
settings are, wherever they were written.
"""

from __future__ import annotations

import difflib
import math
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from flowspec.nodes import Conflict, Node, SourceLoc
from flowspec.steps import Step, written
from flowspec.steps.coupling import CouplingSettings, check_heads_divide_filters
from flowspec.steps.norm import NormGranularity
from flowspec.steps.split import Mask, SplitStep

__all__ = ["CouplingSettings", "FlowSpec", "SourceLoc", "Step"]


# ---------------------------------------------------------------- sections

MAX_BATCH = 2**20  # images in a batch: a bound far above any machine's, so that typos are caught
MAX_SIDE = 2**16  # image height, width and channels: far above any flow's, so that typos are caught
MAX_VALUES = 2**28  # values per image (C x H x W): 1 GiB of float32 for one image's latent
MAX_SEED = 2**32 - 1  # seeds derived from it (per rank, epoch, evaluation) stay within torch's 64 bits

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
Dataset = Literal["cifar10", "digits", "npz", "folder", "npy", "imagenet", "torchvision"]
Conversion = Literal["size", "mode", "depth"]
CLASS_NAMES: dict[str, tuple[str, ...]] = {"cifar10": CIFAR10_CLASSES}
CLASS_COUNTS: dict[str, int | None] = {"cifar10": 10, "digits": 10, "imagenet": 1000}
NAMED_AT_LOAD = ("folder", "torchvision")  # class names are the source's own (its subfolders, `classes`)
HAS_TEST = ("cifar10", "digits", "npz")  # sources that always bring a test split
TEST_PATH_SOURCES = ("npy", "folder")  # the sources whose test split `test_path` may name


class DataSpec(Node):
    """The images a model is trained on: the dataset, where it is, its shape, levels and classes."""

    dataset: Dataset = "cifar10"
    path: str | None = Field(default=None, description="the data's folder or file")
    test_path: str | None = Field(default=None, description="the test split's folder or file")
    name: str | None = Field(default=None, description="a torchvision dataset class (dataset torchvision)")
    shape: tuple[int, int, int] = Field(default=(3, 32, 32), description="C x H x W")
    levels: int = Field(default=256, ge=2, le=65536, description="values per pixel: 256 for 8-bit")
    classes: tuple[str | int, ...] | None = Field(default=None, description="class subset, by name or index")
    convert: tuple[Conversion, ...] = Field(default=(), description="conversions of images that differ")
    test_split: int | float | None = Field(
        default=None, description="test images held out: count or fraction"
    )

    @field_validator("test_split")
    @classmethod
    def _split_size(cls, split: int | float | None) -> int | float | None:
        if (
            split is None
            or (isinstance(split, int) and split >= 1)
            or (isinstance(split, float) and 0 < split < 1)
        ):
            return split
        raise ValueError(f"test_split is a count of images (1 or more) or a fraction in (0, 1), got {split}")

    @property
    def class_indices(self) -> tuple[int, ...] | None:
        """The class subset as label indices (CIFAR-10 names mapped to their labels), or None for all.

        Names of `folder` and `torchvision` classes are mapped when the data is read."""
        if self.classes is None:
            return None
        return tuple(c if isinstance(c, int) else CLASS_NAMES[self.dataset].index(c) for c in self.classes)

    @property
    def class_keys(self) -> tuple[str | int, ...] | None:
        """The class subset, CIFAR-10 names as their indices (so that a name and its index compare equal)."""
        if self.classes is None or self.dataset not in CLASS_NAMES:
            return self.classes
        return self.class_indices

    def mistakes(self) -> list[tuple[str, str]]:
        """(setting, message) for what a spec file may not say but older checkpoints' specs may: a class
        or conversion named twice, an empty path or name."""
        found = []
        for what, values in (("classes", self.class_keys), ("convert", self.convert)):
            repeated = [v for i, v in enumerate(values or ()) if v in values[:i]]
            if repeated:
                value = repeated[0]
                if what == "convert":
                    named = f"'{value}'"
                elif isinstance(value, int) and self.dataset in CLASS_NAMES:
                    named = f"class {value} ({CLASS_NAMES[self.dataset][value]})"
                else:
                    named = f"class {value}"
                found.append((what, f"{what} names {named} twice"))
        for what in ("path", "test_path", "name"):
            if getattr(self, what) == "":
                found.append((what, f"{what} is empty: give a {'class name' if what == 'name' else 'path'}"))
        return found

    def _unknown_class(self) -> str | None:
        """What is wrong with a class of `classes` for the dataset: an unknown name, an index out of range."""
        names, count = CLASS_NAMES.get(self.dataset, ()), CLASS_COUNTS.get(self.dataset)
        for c in self.classes or ():
            if isinstance(c, str) and self.dataset not in NAMED_AT_LOAD and c not in names:
                if not names:
                    return f"{self.dataset} classes are numbered: give indices, not '{c}'"
                close = difflib.get_close_matches(c, names, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"expected one of {', '.join(names)}"
                return f"unknown {self.dataset} class '{c}'; {hint}"
            if isinstance(c, int) and (c < 0 or (count is not None and c >= count)):
                valid = f"0 to {count - 1}" if count is not None else "0 or more"
                return f"class index {c} is out of range for {self.dataset} ({valid})"
        return None

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        shape = "x".join(map(str, self.shape))
        if any(d < 1 for d in self.shape):
            raise Conflict(f"shape dimensions must be positive, got {shape}", "shape")
        if max(self.shape) > MAX_SIDE or math.prod(self.shape) > MAX_VALUES:
            raise Conflict(
                f"shape {shape} is too large: at most {MAX_SIDE:,} a dimension "
                f"and {MAX_VALUES:,} values an image",
                "shape",
            )
        if self.classes is not None and len(self.classes) == 0:
            raise Conflict("classes must name at least one class", "classes")
        unknown = self._unknown_class()
        if unknown:
            raise Conflict(unknown, "classes", "dataset")
        if (self.name is None) == (self.dataset == "torchvision"):
            raise Conflict(
                'dataset torchvision needs the dataset\'s class: name "CIFAR100"'
                if self.name is None
                else f"name is for dataset torchvision, not {self.dataset}",
                "name",
                "dataset",
            )
        if self.dataset in HAS_TEST and (self.test_split is not None or self.test_path is not None):
            raise Conflict(
                f"{self.dataset} has its own test split: remove test_split and test_path",
                "test_split",
                "test_path",
                "dataset",
            )
        if self.test_split is not None and self.test_path is not None:
            raise Conflict("give test_path or test_split, not both", "test_path", "test_split")
        if self.test_path is not None and self.dataset not in TEST_PATH_SOURCES:
            raise Conflict(
                f"test_path is for datasets npy and folder: {self.dataset} finds its own test split",
                "test_path",
                "dataset",
            )
        if self.dataset == "digits" and self.path is not None:
            raise Conflict(
                "digits are scikit-learn's bundled images: remove path (`path none` drops an inherited one)",
                "path",
                "dataset",
            )
        return self


class LogitPreprocess(Node):
    """Before the flow: the logit of alpha + (1 - 2 alpha) v / levels of the dequantized image v."""

    kind: Literal["logit"] = "logit"
    alpha: float = Field(default=0.05, gt=0.0, lt=0.5)


class ContextSpec(Node):
    """The network that reads the image to condition a variational dequantizer's flow."""

    filters: int = Field(default=32, ge=1, le=4096)
    blocks: int = Field(default=3, ge=0, le=256)
    layernorm: bool = Field(default=False, description="LayerNorm after each gated conv (ImageNet, CelebA)")
    attention: bool = Field(default=False, description="gated self-attention after each gated conv")
    heads: int = Field(default=4, ge=1, le=256, description="attention heads")
    weight_norm: bool = Field(default=False, description="weight normalization of every conv and dense")

    @model_validator(mode="after")
    def _heads_divide_filters(self) -> ContextSpec:
        if self.attention:
            check_heads_divide_filters(self.heads, self.filters)
        return self


class UniformDequant(Node):
    """Dequantize with uniform noise."""

    kind: Literal["uniform"] = "uniform"


class VariationalDequant(Node):
    """Dequantize with noise drawn by a flow of its own, conditioned on the image (Flow++)."""

    kind: Literal["variational"] = "variational"
    context: ContextSpec = ContextSpec()
    steps: list[Step]


def context_mask(deq: VariationalDequant) -> Mask:
    """The mask that splits the image for the dequantizer's context network: that of its splits (the shape
    check allows one), else `stripe`. The builder and `inspect` both read it here."""
    return next((step.mask for _, step in written(deq.steps) if isinstance(step, SplitStep)), "stripe")


Dequantizer = Annotated[Union[UniformDequant, VariationalDequant], Field(discriminator="kind")]


class Defaults(Node):
    """What steps take for the settings they do not write: the coupling settings, the norm granularity."""

    coupling: CouplingSettings = CouplingSettings()
    norm: NormGranularity = "element"


class Interval(Node):
    """A count of training steps or epochs (train.length, eval_every, save_every)."""

    count: int = Field(ge=1)
    unit: Literal["steps", "epochs"]


class TrainSpec(Node):
    """How the model is trained: optimizer, learning-rate schedule, batch, EMA, length and intervals."""

    optimizer: Literal["adam"] = "adam"
    lr: float = Field(default=3e-4, gt=0.0, le=10.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0.0, le=1.0)
    tf_eps: bool = Field(
        default=False, description="eps added as TF1's Adam adds it: to the uncorrected sqrt(v)"
    )
    weight_decay: float = Field(default=0.0, ge=0.0)
    warmup: int = Field(default=0, ge=0, description="linear warmup steps")
    schedule: Literal["constant", "cosine", "step", "exponential"] = "constant"
    step_every: int = Field(default=10000, ge=1, description="schedule step: decay every N steps")
    step_gamma: float = Field(default=0.5, gt=0.0, le=1.0, description="schedule step: decay factor")
    exp_hold: int = Field(default=0, ge=0, description="schedule exponential: steps at lr after warmup")
    exp_decay: float = Field(default=0.9999, gt=0.0, le=1.0, description="schedule exponential: per step")
    exp_floor: float = Field(default=0.0, ge=0.0, description="schedule exponential: the lowest lr")
    rewarm_at: int | None = Field(default=None, ge=1, description="second warmup: the step it starts at")
    rewarm_steps: int | None = Field(default=None, ge=0, description="second warmup: its length in steps")
    rewarm_lr: float | None = Field(default=None, gt=0.0, le=10.0, description="second warmup: the lr after")
    batch: int = Field(default=64, ge=1, le=MAX_BATCH, description="images per step, over all processes")
    accumulate: int = Field(default=1, ge=1, description="micro-batches of batch/N whose gradients add up")
    clip_grad_norm: float | None = Field(default=None, gt=0.0)
    ema: float | None = Field(default=None, gt=0.0, lt=1.0)
    init_batch: int = Field(default=128, ge=1, le=MAX_BATCH)
    length: Interval | None = Field(default=None, description="training length; none: unbounded")
    eval_every: Interval = Interval(count=1, unit="epochs")
    save_every: Interval | None = Field(default=None, description="checkpoints between evaluations")
    hflip: bool = Field(default=False, description="random horizontal flip augmentation")
    seed: int = Field(default=0, ge=0, le=MAX_SEED)

    @property
    def micro_batch(self) -> int:
        """Images a training step computes at once in one process: the batch over `accumulate`."""
        return self.batch // self.accumulate

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        if self.exp_floor > self.lr:
            raise Conflict(
                f"the schedule's floor ({self.exp_floor:g}) must not exceed lr ({self.lr:g})",
                "exp_floor",
                "lr",
            )
        if self.schedule == "cosine" and self.length is None:
            raise Conflict(
                "a cosine schedule needs a training length: add `length N steps` (or epochs)",
                "schedule",
                "length",
            )
        rewarm = (self.rewarm_at, self.rewarm_steps, self.rewarm_lr)
        if any(v is None for v in rewarm) and any(v is not None for v in rewarm):
            raise Conflict(
                "the second warmup needs all of at, steps and lr: `then warmup(at=, steps=, lr=)` "
                "(with --set: train.rewarm_at, train.rewarm_steps and train.rewarm_lr)",
                "rewarm_at",
                "rewarm_steps",
                "rewarm_lr",
            )
        if self.rewarm_at is not None and self.rewarm_at <= self.warmup:
            raise Conflict(
                f"the second warmup must start after the first ends (step {self.warmup})",
                "rewarm_at",
                "warmup",
            )
        if self.rewarm_at is not None and self.length and self.length.unit == "steps":
            if self.rewarm_at >= self.length.count:
                raise Conflict(
                    f"the second warmup starts at step {self.rewarm_at}, after the training ends (length "
                    f"{self.length.count} steps); --set train.rewarm=off removes it",
                    "rewarm_at",
                    "length",
                )
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise Conflict(f"betas must lie in [0, 1), got {self.betas}", "betas")
        if self.batch % self.accumulate:
            raise Conflict(
                f"batch ({self.batch}) must be divisible by accumulate ({self.accumulate}): "
                f"each step adds the gradients of {self.accumulate} micro-batches of batch/{self.accumulate}",
                "batch",
                "accumulate",
            )
        return self


class EvalSpec(Node):
    """What each evaluation measures and draws; its cost grows with every setting. Not part of what is
    trained: a run may be resumed with other evaluation settings."""

    images: int | None = Field(default=None, ge=1, description="test images per evaluation; none: all")
    batch: int | None = Field(default=None, ge=1, description="images per forward pass; none: train.batch")
    samples: int = Field(default=64, ge=0, le=4096, description="images per sample grid; 0: no grids")
    temperatures: tuple[float, ...] = Field(default=(1.0, 0.8), description="one sample grid each")
    inversion: bool = Field(default=True, description="the inversion check on a test batch")

    @field_validator("temperatures")
    @classmethod
    def _positive(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("temperatures needs at least one value, e.g. (1.0, 0.8) (samples 0: no grids)")
        if not all(0.0 < t <= 10.0 for t in value):
            raise ValueError(f"temperatures must lie in (0, 10], got {value}")
        return value


class FlowSpec(Node):
    """A whole model and its training recipe, resolved and validated."""

    name: str
    data: DataSpec = DataSpec()
    preprocess: LogitPreprocess = LogitPreprocess()
    dequantize: Dequantizer = UniformDequant()
    defaults: Defaults = Defaults()
    flow: list[Step] = Field(min_length=1)
    prior: Literal["normal"] = "normal"
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()
    target_params: int | None = Field(default=None, ge=0)
    source: str | None = Field(default=None, exclude=True, repr=False, description="path it was loaded from")

    @property
    def dims(self) -> int:
        """Values per image: channels x height x width."""
        c, h, w = self.data.shape
        return c * h * w
