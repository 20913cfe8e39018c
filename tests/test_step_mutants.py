"""Behaviours of the step kinds, the walk over a step tree, the shape check and the inverse CDF's solver
that a mutation audit found unguarded: each test here failed on a mutant of the code (a check dropped, a
count of halves lost, a walk rule changed, a solver rule changed) that every other test passed."""

from __future__ import annotations

from typing import Literal

import pytest
import torch

import flowspec
from flowspec.layers import mixlogistic
from flowspec.nodes import StepNode
from flowspec.steps import KINDS, walk
from flowspec.steps.flip import FlipStep
from flowspec.steps.kind import StepKind, no_cost, no_label, output_memory, register, same_state
from flowspec.steps.repeat import RepeatStep
from flowspec.steps.split import SplitStep
from flowspec.steps.squeeze import SqueezeStep


class _Misnamed(StepNode):
    """A throwaway settings model whose `kind` is not the name it is registered under."""

    kind: Literal["misnamed"] = "misnamed"


def test_register_refuses_a_kind_whose_settings_name_another_kind():
    """A kind registered as `other` whose settings say kind='misnamed' is refused (a mutant checked only
    that the settings have a kind at all, so the parser's tag and the registry's key could disagree)."""
    kind = StepKind("other", _Misnamed, same_state, lambda *a: None, no_label, no_cost, no_cost)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind='misnamed'"):
        register(kind)
    assert "other" not in KINDS


@pytest.mark.parametrize("name", ["norm", "pointwise"])
def test_output_memory_counts_both_halves_inside_a_split(name):
    """A step that keeps its output for backward keeps both halves inside a split: twice the bytes of one
    half (a mutant dropped the count of halves, halving the memory estimate of norms inside splits)."""
    assert KINDS[name].memory is output_memory
    assert output_memory(None, (3, 4, 2), 2, 4) == 2 * 3 * 4 * 2 * 4
    assert output_memory(None, (3, 4, 4), 1, 8) == 3 * 4 * 4 * 8


def test_a_split_inside_a_repeat_tells_its_body_the_repeat_copy():
    """The body of a split inside `repeat 2` runs in copy 0, then copy 1 (the builder tags each layer
    with its copy): a mutant passed the split's own copy (None) down to its body."""
    steps = [RepeatStep(count=2, body=[SplitStep(mask="channel", body=[FlipStep()])])]
    runs = [r for r in walk(steps, (2, 4, 4), unroll=True).all() if r.path == "flow.0.body.0.body.0"]
    assert [r.copy for r in runs] == [0, 1]
    assert [r.depth for r in runs] == [2, 2]


def test_a_repeat_is_labelled_by_its_count():
    """inspect labels `repeat 3 { ... }` as x3, its number of copies (a mutant printed x2)."""
    assert KINDS["repeat"].label(RepeatStep(count=3, body=[FlipStep()])) == "x3"


def test_a_shape_changing_repeat_walked_once_keeps_one_run_per_written_step():
    """Not unrolled, `repeat 2 { squeeze }` walks its body twice (the shapes change) but keeps the runs of
    the first copy only, one per written step, as inspect lists them (a mutant kept both copies' runs)."""
    steps = [RepeatStep(count=2, body=[SqueezeStep()])]
    (repeat,) = walk(steps, (3, 8, 8)).runs
    assert repeat.state_out == (48, 2, 2)
    assert [(r.path, r.state_in, r.copy) for r in repeat.body] == [("flow.0.body.0", (3, 8, 8), 0)]


_SPLIT = "model m\nflow {\n  split %s { coupling; flip }\n}\n"


@pytest.mark.parametrize(
    "text, overrides, blamed",
    [
        (_SPLIT % "channel", ["data.shape=1x32x32"], "--set:1:6: the channel mask needs an even channel"),
        ("model m\nflow {\n  factor_out\n}\n", ["data.shape=1x32x32"], "--set:1:6: factor_out needs"),
    ],
    ids=["channel_split", "factor_out"],
)
def test_a_shape_error_that_a_set_data_shape_causes_is_blamed_on_that_set(text, overrides, blamed):
    """A channel split or a factor_out that a `--set` of the data shape breaks is blamed on that `--set`:
    mutants said these checks do not judge the size of the shape they receive (blaming the step)."""
    with pytest.raises(flowspec.UserError) as error:
        flowspec.parse_spec(text, overrides=overrides)
    assert str(error.value).startswith(blamed)


def test_mixed_masks_in_the_dequantizer_are_blamed_on_the_set_of_any_of_its_masks():
    """The rule that the dequantizer's splits share one mask reads every split's mask: a `--set` of the
    second split's mask that breaks it is blamed on that `--set` (a mutant recorded only the first mask)."""
    deq = "dequantize variational { split stripe { coupling; flip } split stripe { coupling } sigmoid }"
    text = f"model m\ndata npy {{ shape 1x8x8 }}\nflow {{ squeeze }}\n{deq}\n"
    with pytest.raises(flowspec.UserError) as error:
        flowspec.parse_spec(text, overrides=["dequantize.steps.1.mask=checkerboard"])
    assert str(error.value).startswith("--set:1:20: all splits of the dequantizer must use one mask")


def _dominated_mixture() -> tuple[torch.Tensor, ...]:
    """h and a float64 mixture of two unit logistics at 0 and 60 whose first component has nearly all
    the weight: the root of logit(CDF(x)) = 0.3 is x = 0.3, the bracket [0.3, 60.3]."""
    dt = torch.float64
    return (
        torch.tensor([0.3], dtype=dt),
        torch.tensor([[12.0, -12.0]], dtype=dt),
        torch.tensor([[0.0, 60.0]], dtype=dt),
        torch.zeros(1, 2, dtype=dt),
    )


def test_the_inverse_cdf_starts_at_the_weighted_mean_of_the_component_roots():
    """The first guess is the pi-weighted mean of the components' roots, here next to the root: 2
    iterations (a mutant started at the middle of the bracket, 30 units away, and took 38)."""
    h, *mixture = _dominated_mixture()
    x, iterations = mixlogistic.inverse_logit_cdf(h, *mixture)
    assert iterations <= 3
    torch.testing.assert_close(mixlogistic.logit_cdf(x, *mixture)[0], h, rtol=0, atol=1e-12)


@pytest.mark.parametrize("max_iter", [1, 2, 5])
def test_the_inverse_cdf_runs_at_most_max_iter_iterations(max_iter):
    """An unsolved row stops after max_iter iterations, and the count returned says so (a mutant ran
    max_iter + 1); the answer still lies in the bracket of the components' roots."""
    h, logits, means, logscales = _dominated_mixture()
    x, iterations = mixlogistic.inverse_logit_cdf(h, logits, means, logscales, tol=0.0, max_iter=max_iter)
    assert iterations == max_iter
    assert 0.3 <= float(x) <= 60.3


def test_a_zero_slope_in_probability_space_is_recomputed_in_log_space():
    """With scales of e^80 and a CDF near 1e-290 the density underflows to 0 in probability space: that
    slope is taken again in log space and Newton solves it in 2 iterations (a mutant kept the 0 slope,
    bisected a bracket 1e37 wide for 33 iterations and missed the root by 5e-8)."""
    dt = torch.float64
    h, mixture = torch.tensor([-667.0], dtype=dt), (torch.zeros(1, 2, dtype=dt),) * 2
    mixture += (torch.tensor([[80.0, 79.0]], dtype=dt),)
    x, iterations = mixlogistic.inverse_logit_cdf(h, *mixture)
    assert iterations <= 3
    torch.testing.assert_close(mixlogistic.logit_cdf(x, *mixture)[0], h, rtol=0, atol=1e-9)
