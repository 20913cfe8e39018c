"""Misuse of the Python API fails with a message that says what was expected: wrong batches for a
`FlowModel`'s methods, bad `sample` and `set_autocast` arguments, a failed `initialize` that changes
nothing, and bad arguments to `flowspec.build`, `load_spec` and `flowspec.train`."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from train_helpers import tiny_spec

import flowspec
from flowspec.errors import UserError


@pytest.fixture(scope="module")
def model():
    """The tiny 1 x 8 x 8, 17-level flow, initialised, in eval mode."""
    torch.manual_seed(0)
    built = flowspec.build(tiny_spec())
    built.initialize(torch.randint(0, 17, (16, 1, 8, 8)))
    return built.eval()


def _images(n: int = 2) -> torch.Tensor:
    return torch.randint(0, 17, (n, 1, 8, 8), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("batch", "error", "message"),
    [
        (
            torch.full((2, 1, 8, 8), 255, dtype=torch.uint8),
            ValueError,
            "values 0 .. 16 (the spec's data.levels is 17), got values from 255 to 255",
        ),
        (torch.full((2, 1, 8, 8), -1), ValueError, "got values from -1 to -1"),
        (torch.full((2, 1, 8, 8), 300, dtype=torch.uint16), ValueError, "got values from 300 to 300"),
        (
            _images().float() / 16,
            ValueError,
            "not whole numbers; images scaled to [0, 1] must be scaled back: (x * 16).round()",
        ),
        (torch.full((2, 1, 8, 8), float("nan")), ValueError, "not whole numbers"),
        (
            _images()[0],
            ValueError,
            "N x 1 x 8 x 8 (N >= 1, then the spec's data.shape, channels first), got 1 x 8 x 8",
        ),
        (_images().permute(0, 2, 3, 1), ValueError, "got 2 x 8 x 8 x 1"),
        (torch.zeros(2, 1, 16, 16), ValueError, "got 2 x 1 x 16 x 16"),
        (torch.zeros(0, 1, 8, 8), ValueError, "got 0 x 1 x 8 x 8"),
        (_images() > 8, TypeError, "log_prob takes real-valued images, got a torch.bool tensor"),
        (
            _images().numpy(),
            TypeError,
            "log_prob takes a torch.Tensor, got ndarray (convert it with torch.from_numpy)",
        ),
        ([[0]], TypeError, "log_prob takes a torch.Tensor, got list"),
    ],
    ids=[
        "255",
        "negative",
        "uint16",
        "scaled",
        "nan",
        "no-batch",
        "channels-last",
        "size",
        "empty",
        "bool",
        "numpy",
        "list",
    ],
)
def test_log_prob_refuses_what_is_not_a_batch_of_integer_images(model, batch, error, message):
    with pytest.raises(error) as caught:
        model.log_prob(batch)
    assert message in str(caught.value)


def test_bpd_names_itself_in_its_errors(model):
    with pytest.raises(TypeError, match="^bpd takes a torch.Tensor, got list"):
        model.bpd([[0]])


def test_valid_batches_in_any_integer_or_float_dtype_give_the_same_log_prob(model):
    x = _images()
    results = []
    wide = (x.to(torch.uint16), x.to(torch.uint32), x.to(torch.uint64))  # torch has no aminmax for these
    for batch in (x, x.to(torch.uint8), x.to(torch.int32), x.float(), x.double(), *wide):
        torch.manual_seed(0)
        results.append(model.log_prob(batch))
    assert all(torch.equal(r, results[0]) for r in results)


def test_decode_and_encode_refuse_another_layout(model):
    z, _ = model.encode(_images().float() + 0.5)
    assert torch.allclose(model.decode(z), _images().float() + 0.5, atol=1e-4)
    for wrong in (z.permute(0, 2, 3, 1), z.flatten(1), z[0]):
        with pytest.raises(ValueError, match=r"decode takes a batch of latents N x 1 x 8 x 8"):
            model.decode(wrong)
    with pytest.raises(ValueError, match=r"encode takes a batch of data N x 1 x 8 x 8 .* got 2 x 64"):
        model.encode(_images().float().flatten(1))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            torch.randint(
                0, 256, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
            ),
            "encode takes continuous data v in the logit preprocessing's open interval (-0.944444, 17.9444), "
            "where dequantized images x + u in [0, 17) lie (the spec's data.levels is 17); got values from",
        ),
        (torch.full((2, 1, 8, 8), -1.0), "got values from -1 to -1"),
        (
            torch.full((2, 1, 8, 8), -0.05 * 17 / 0.9),
            "open interval",
        ),  # its lower end, where the logit is -inf
        (torch.full((2, 1, 8, 8), 0.95 * 17 / 0.9), "open interval"),
        (torch.full((2, 1, 8, 8), float("nan")), "encode takes finite data, got NaN or infinite values"),
        (torch.full((2, 1, 8, 8), float("inf")), "finite data"),
    ],
    ids=["uint8-0-to-127", "negative", "lower-end", "upper-end", "nan", "inf"],
)
def test_encode_refuses_data_where_the_logit_preprocessing_is_not_finite(model, data, message):
    with pytest.raises(ValueError) as caught:
        model.encode(data)
    assert message in str(caught.value)
    inside = torch.tensor([-0.9, 0.0, 16.5, 17.0, 17.9]).repeat(2, 1, 13)[..., :64].view(2, 1, 8, 8)
    assert torch.isfinite(model.encode(inside)[1]).all()


def test_decode_with_logdet_is_finite_where_the_data_saturates(model):
    """Where sigmoid rounds to 1 or 0 in float32 (z = 20, -120) the log-det is the exact map's, as float64
    computes it; elsewhere it is minus the log-det of encoding the data again."""
    exact = copy.deepcopy(model).double()
    for value in (20.0, -120.0, 0.5):
        z = torch.full((2, 1, 8, 8), value)
        v, logdet = model.decode(z, with_logdet=True)
        assert torch.isfinite(logdet).all()
        assert torch.allclose(logdet.double(), exact.decode(z.double(), with_logdet=True)[1], rtol=1e-4)
    assert torch.allclose(logdet, -model.encode(v)[1], rtol=1e-5)
    with pytest.raises(ValueError, match="open interval"):  # v rounded to the end of the range
        model.encode(model.decode(torch.full((2, 1, 8, 8), 20.0)))


def test_decode_turns_dropout_off_and_eval_mode_makes_encode_its_inverse():
    torch.manual_seed(0)
    built = flowspec.build(tiny_spec())  # training mode, dropout 0.1
    built.initialize(_images(16))
    z = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        first, logdet = built.decode(z, with_logdet=True)
        assert built.training
        again, logdet_again = built.decode(z, with_logdet=True)
        assert torch.equal(first, again) and torch.equal(logdet, logdet_again)
        v = _images().float() + 0.5
        built.eval()
        assert torch.equal(built.decode(z), first)
        assert torch.allclose(built.decode(built.encode(v)[0]), v, atol=1e-4)


def test_parse_spec_refuses_what_is_not_text():
    from pathlib import Path

    for wrong, name in ((Path("specs/quickstart.flow"), "PosixPath"), (b"model m", "bytes")):
        with pytest.raises(TypeError) as caught:
            flowspec.parse_spec(wrong)
        assert str(caught.value) == (
            f"parse_spec takes spec text (str), got {name}; read a file with flowspec.load_spec(path)"
        )


def test_build_validates_a_copy_that_skipped_validation():
    spec = tiny_spec()
    broken = spec.model_copy(update={"data": spec.data.model_copy(update={"levels": 0})})
    with pytest.raises(UserError) as caught:
        flowspec.build(broken)
    assert str(caught.value) == (
        "the spec 'tiny' is not valid: data.levels: Input should be greater than or equal to 2 (got 0)"
    )


@pytest.mark.parametrize(
    ("n", "temperature", "error", "message"),
    [
        (0, 1.0, ValueError, "sample takes n >= 1 images, got 0"),
        (-1, 1.0, ValueError, "n >= 1"),
        (2.5, 1.0, TypeError, "sample takes a whole number of images n, got 2.5"),
        (True, 1.0, TypeError, "whole number"),
        (2, float("nan"), ValueError, "sample takes a finite temperature >= 0, got nan"),
        (2, float("inf"), ValueError, "finite temperature"),
        (2, -1.0, ValueError, "got -1.0"),
        (2, "hot", TypeError, "sample takes a number as temperature, got 'hot'"),
    ],
)
def test_sample_refuses_bad_arguments(model, n, temperature, error, message):
    with pytest.raises(error) as caught:
        model.sample(n, temperature)
    assert message in str(caught.value)
    assert model.sample(2, 0).shape == (2, 1, 8, 8)  # temperature 0 is the mode of the prior, allowed


def test_sample_takes_numpy_and_tensor_scalars(model):
    import numpy as np

    assert model.sample(np.int64(2), np.float32(0.5)).shape == (2, 1, 8, 8)
    assert model.sample(torch.tensor(3), torch.tensor(0.8)).shape == (3, 1, 8, 8)
    with pytest.raises(TypeError, match="whole number"):
        model.sample(torch.tensor(2.0))


def test_set_recompute_decode_and_parse_spec_take_bools(model):
    with pytest.raises(TypeError, match=r"set_recompute\(on\) must be True or False, got 'off'"):
        model.set_recompute("off")  # a truthy string: it turned recomputation on
    with pytest.raises(TypeError, match=r"decode\(with_logdet\) must be True or False, got 'no'"):
        model.decode(torch.zeros(2, 1, 8, 8), with_logdet="no")  # it returned (v, logdet)
    with pytest.raises(TypeError, match=r"parse_spec\(stored\) must be True or False, got 'no'"):
        flowspec.parse_spec("model m\nflow { squeeze }", stored="no")  # it skipped the rules for files


def test_set_autocast_refuses_what_autocast_cannot_run(model):
    for dtype in ("bfloat16", torch.float64, torch.int8):
        with pytest.raises(ValueError, match="set_autocast takes torch.bfloat16, torch.float16 or None"):
            model.set_autocast(dtype)
    model.set_autocast(torch.bfloat16)
    model.set_autocast(None)


def test_a_meta_model_says_it_cannot_compute():
    meta = flowspec.build(tiny_spec(), "meta")
    for call in (
        lambda: meta.log_prob(_images()),
        lambda: meta.sample(2),
        lambda: meta.initialize(_images(4)),
    ):
        with pytest.raises(ValueError, match="on the meta device, which holds shapes but no weights"):
            call()


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (_images(1), "initialize needs 2 images or more (their statistics set scales), not 1"),
        (torch.full((8, 1, 8, 8), 200), "got values from 200 to 200"),
        (_images(8)[0], "got 1 x 8 x 8"),
        (None, "initialize made weights that are not finite"),
    ],
    ids=["one-image", "out-of-range", "no-batch", "not-finite"],
)
def test_a_failed_initialize_changes_nothing(batch, message):
    torch.manual_seed(0)
    fresh = flowspec.build(tiny_spec())
    if batch is None:  # an init that goes wrong half way: the last coupling's network makes a NaN weight
        weight = max(fresh.couplings()[-1].network.parameters(), key=torch.numel)

        def spoil(*_) -> None:
            weight.data.fill_(torch.nan)

        poison = fresh.couplings()[-1].network.register_forward_hook(spoil)
        batch = _images(8)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError) as caught:
        fresh.initialize(batch)
    assert message in str(caught.value)
    after = fresh.state_dict()
    assert not fresh.initialized and all(torch.equal(after[k], v) for k, v in before.items())
    if "not finite" in message:
        poison.remove()
    fresh.initialize(_images(16))  # and a good batch then initialises it
    assert fresh.initialized and all(torch.isfinite(p).all() for p in fresh.parameters())


def test_build_and_load_spec_refuse_arguments_of_the_wrong_kind():
    with pytest.raises(
        TypeError, match=r"build takes a FlowSpec, got str: read a .flow file with flowspec.load_spec"
    ):
        flowspec.build("specs/quickstart.flow")
    with pytest.raises(UserError, match="device 'gpu' is not one torch knows: use cpu, cuda or cuda:N"):
        flowspec.build(tiny_spec(), "gpu")
    for overrides in ("train.lr=1e-3", {"train.lr": "1e-3"}, [np.float64(1.0)]):
        with pytest.raises(
            TypeError, match=r"overrides are a list of KEY=VALUE strings, e.g. \[\"train.lr=1e-3\"\]"
        ):
            flowspec.parse_spec("model m\nflow { squeeze }", overrides=overrides)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"eval": {"bogus": 1}}, "eval={'bogus': 1}: bogus: Extra inputs are not permitted"),
        ({"eval": {"images": -1}}, "images: Input should be greater than or equal to 1"),
        ({"threads": 0}, "--threads 0: give a number of threads >= 1"),
        ({"device": "gpu"}, "device 'gpu' is not one torch knows"),
        ({"max_steps": 0}, "max_steps must be a whole number >= 1, got 0"),
        ({"max_steps": 1.5}, "got 1.5"),
        ({"threads": True}, "threads must be a whole number >= 1, got True"),  # torch: a RuntimeError
        ({"threads": 1.5}, "threads must be a whole number >= 1, got 1.5"),
        ({"threads": "2"}, "threads must be a whole number >= 1, got '2'"),  # torch: a TypeError
        ({"tensorboard": "no"}, "tensorboard must be True or False, got 'no'"),  # it turned TensorBoard on
        ({"allow_large": "no"}, "allow_large must be True or False, got 'no'"),  # it skipped the check
        ({"compile": 1}, "compile must be True or False, got 1"),
        ({"quiet": None}, "quiet must be True or False, got None"),
    ],
    ids=[
        "eval-key",
        "eval-value",
        "threads",
        "device",
        "max-steps",
        "fractional-steps",
        "threads-bool",
        "threads-float",
        "threads-str",
        "tensorboard-str",
        "allow-large-str",
        "compile-int",
        "quiet-none",
    ],
)
def test_train_refuses_bad_options_before_writing(tmp_path, options, message):
    with pytest.raises(UserError) as caught:
        flowspec.train(tiny_spec(), out=tmp_path / "run", **{"quiet": True, **options})
    assert message in str(caught.value)
    assert not (tmp_path / "run").exists()
    with pytest.raises(TypeError, match="overrides are a list"):
        flowspec.train("specs/quickstart.flow", sets="train.lr=1e-3")


def test_flowspec_train_shows_its_signature_and_documentation():
    import inspect

    assert list(inspect.signature(flowspec.train).parameters)[:3] == ["spec", "data", "out"]
    assert "Train a spec (a `FlowSpec` or a `.flow` file)" in flowspec.train.__doc__
