"""Flow layers: each maps data toward the latent with `forward(x, context) -> (y, logdet)` and back with
`inverse(y, context) -> x`. Inside a split, `x` is a pair of halves `(a, b)`."""

from flowspec.layers.base import DataInit, Layer, Sequence
from flowspec.layers.couplings import Coupling
from flowspec.layers.dequantizers import UniformDequantizer, VariationalDequantizer
from flowspec.layers.elementwise import FactorOut, Flip, Sigmoid
from flowspec.layers.norm import Norm
from flowspec.layers.pointwise import Pointwise
from flowspec.layers.preprocess import LogitPreprocess
from flowspec.layers.splits import Split
from flowspec.layers.squeeze import Squeeze

__all__ = [
    "Coupling",
    "DataInit",
    "FactorOut",
    "Flip",
    "Layer",
    "LogitPreprocess",
    "Norm",
    "Pointwise",
    "Sequence",
    "Sigmoid",
    "Split",
    "Squeeze",
    "UniformDequantizer",
    "VariationalDequantizer",
]
