"""The bits/dim accounting: D = C x H x W (the channels count: the other bound tests use grey images),
every image counted once, the last partial batch included, each rank's share of the test images disjoint,
and the evaluation on the first N test images (found by mutation testing)."""

from __future__ import annotations

import math

import pytest
import torch

from flowspec.train.evaluate import bounds, single_sample_bpd


class _Sum(torch.nn.Module):
    """log_prob of an image: minus its pixel sum (deterministic, differs per image)."""

    def eval(self):
        return self

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return -x.flatten(1).double().sum(1)


def _images(n=7, c=3, h=2, w=5):
    return (torch.arange(n * c * h * w) % 11).to(torch.uint8).view(n, c, h, w)


def _expected(images):
    return images.flatten(1).double().sum(1).mean().item() / (images[0].numel() * math.log(2))


@pytest.mark.parametrize("batch", [1, 3, 7, 16])
def test_single_sample_bpd_divides_by_channels_times_pixels_and_counts_every_image(batch):
    images = _images()
    got = single_sample_bpd(_Sum(), images, batch, torch.device("cpu"))
    assert got == pytest.approx(_expected(images))


@pytest.mark.parametrize("batch, k", [(3, 1), (7, 1), (16, 1), (8, 4), (3, 2)])
def test_bounds_divide_by_channels_times_pixels_and_count_every_image(batch, k):
    images = _images()
    got = bounds(_Sum(), images, k, batch, torch.device("cpu"))
    assert got["images"] == 7
    assert got["bpd"] == pytest.approx(_expected(images))
    if k > 1:  # samples that are all equal: the weighted bound is the single-sample one
        assert got[f"iw{k}_bpd"] == pytest.approx(_expected(images))


def test_the_evaluation_measures_the_first_images_of_the_test_split(tmp_path):
    from flowspec.spec import EvalSpec
    from flowspec.train.distributed import Dist
    from flowspec.train.evaluation import Evaluator

    images = _images(n=10)
    settings = EvalSpec(images=4, samples=0, temperatures=(1.0,), inversion=False).model_copy(
        update={"batch": 3}
    )
    evaluator = Evaluator(images, settings, torch.device("cpu"), Dist(), tmp_path, 256, 0)
    result = evaluator(_Sum(), 0)
    assert result.images == 4 and result.test_bpd == pytest.approx(_expected(images[:4]))


@pytest.mark.parametrize("world, batch", [(2, 3), (3, 2), (4, 16)])
def test_the_ranks_shards_of_the_test_images_cover_each_image_once(world, batch):
    from flowspec.train.distributed import Dist

    sums = []

    class Recorded(Dist):  # no process group: each rank's (nats, count) before the all-reduce
        def all_sum(self, tensor):
            sums.append(tensor.clone())

    images = _images(n=7)
    for rank in range(world):
        single_sample_bpd(_Sum(), images, batch, torch.device("cpu"), Recorded(rank=rank, world=world))
    nats, count = torch.stack(sums).sum(0).tolist()
    assert count == 7
    assert nats == -images.flatten(1).double().sum().item()
