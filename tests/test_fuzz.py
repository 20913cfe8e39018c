"""Fuzzing the user-facing inputs: spec text, `--set` values and checkpoint payloads.

Whatever the input, flowspec either accepts it or refuses it with a `UserError` (exit 2 on the command
line), never another exception. Each fuzz test is bounded (a modest number of examples, no deadline per
example); a last test runs the command line on a memory bomb under an address-space limit.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from train_helpers import tiny_spec

from flowspec import parse_spec
from flowspec.cli.app import run
from flowspec.errors import UserError
from flowspec.spec import FlowSpec
from flowspec.steps import KINDS
from flowspec.train.checkpoint import LAST, load_checkpoint, save_atomic

ROOT = Path(__file__).parent.parent
QUICKSTART = (ROOT / "specs" / "quickstart.flow").read_text()
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# pieces of the language (every step kind's keyword), and values that broke it before
WORDS = [
    "model", "extends", "data", "flow", *sorted(KINDS), "dequantize", "variational", "uniform", "train",
    "defaults",
    "stripe", "channel", "checkerboard", "mixlogistic", "affine", "seed", "batch", "steps", "epochs",
    "filters=", "blocks=", "components=", "heads=", "{", "}", "(", ")", ";", ",", "=", '"', "#",
    "0", "1", "-1", "3x32x32", "1e400", "1_000", ".5", "nan", "inf", '"/dev/zero"', '"\\0"', "\n", "\t",
    "\x00", "é",
]  # fmt: skip
pieces = st.lists(st.sampled_from(WORDS) | st.text(max_size=4), max_size=30).map(" ".join)
# values as the grammar reads them, nested, with the extremes that broke later stages
atoms = (
    st.sampled_from(["0", "-1", "1e400", "1_000", ".5", "on", "off", "stripe", '"x"', "3x32x32", "9" * 5000])
    | st.integers().map(str)
    | st.floats(allow_nan=False, allow_infinity=False).map(repr)
    | st.integers(1, 700).map(lambda n: "(" * n + "1" + ")" * n)
    | st.tuples(st.integers(0, 5000), st.sampled_from(["steps", "epochs"])).map(lambda t: f"{t[0]} {t[1]}")
)
value_text = st.recursive(
    atoms,
    lambda inner: st.lists(inner, min_size=1, max_size=3).map(lambda xs: f"({', '.join(xs)})"),
    max_leaves=4,
)
SLOTS = [
    "train {{ seed {} }}", "train {{ batch {} }}", "train {{ optimizer adam(lr={}, betas={}) }}",
    "train {{ length {} }}", "data digits {{ shape {} levels {} }}", "data cifar10 {{ classes {} }}",
    "defaults {{ coupling(filters={}, blocks={}) }}", "target_params {}", "preprocess logit(alpha={})",
    "flow {{ split stripe {{ repeat {} {{ coupling(filters=8, blocks=1); flip }} }} }}",
]  # fmt: skip
BASE = "model fuzz\nflow { split stripe { coupling(filters=8, blocks=1, heads=2, components=2); flip } }\n"


def accepts_or_refuses(call) -> FlowSpec | None:
    """Run `call`; a `UserError` is a refusal, any other exception fails the test."""
    try:
        return call()
    except UserError:
        return None


@FUZZ
@given(position=st.integers(0, len(QUICKSTART)), cut=st.integers(0, 40), insert=pieces)
def test_spec_text_is_accepted_or_refused(position, cut, insert):
    text = QUICKSTART[:position] + insert + QUICKSTART[position + cut :]
    accepts_or_refuses(lambda: parse_spec(text, source="fuzz.flow"))


@FUZZ
@given(slot=st.sampled_from(SLOTS), values=st.lists(value_text, min_size=2, max_size=2))
def test_spec_values_are_accepted_or_refused(slot, values):
    text = BASE + slot.format(*values)
    accepts_or_refuses(lambda: parse_spec(text, source="fuzz.flow"))


KEYS = [
    "train.lr", "train.seed", "train.batch", "train.length", "train.ema", "data.shape", "data.classes",
    "data.levels", "defaults.coupling.filters", "defaults.coupling.components", "model", "dequantize",
    "flow.0.body.0.count", "flow.0.mask", "flow.99", "train", "nothing", "flow." + "9" * 50,
]  # fmt: skip


@FUZZ
@given(key=st.sampled_from(KEYS) | st.text(max_size=12), value=value_text | pieces)
def test_set_values_are_accepted_or_refused(key, value):
    accepts_or_refuses(lambda: parse_spec(QUICKSTART, source="fuzz.flow", overrides=[f"{key}={value}"]))


@FUZZ
@given(text=pieces)
def test_the_command_line_exits_0_or_2_without_traceback(tmp_path, capsys, text):
    path = tmp_path / "fuzz.flow"
    path.write_text(text)
    assert run(["validate", str(path), "--set", f"train.seed={text}"]) in (0, 2)
    assert "Traceback" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict:
    """The payload of a finished tiny run."""
    from flowspec.train.trainer import RunOptions, train

    out = tmp_path_factory.mktemp("fuzz") / "run"
    train(tiny_spec(steps=2), RunOptions(out=out, device="cpu", quiet=True))
    return torch.load(out / LAST, weights_only=True)


values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
) | st.builds(lambda shape: torch.zeros(shape), st.lists(st.integers(0, 3), max_size=3))


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_checkpoint_payloads_are_loaded_or_refused(checkpoint, tmp_path, data):
    payload = dict(checkpoint)
    key = data.draw(st.sampled_from(sorted(payload)))
    action = data.draw(st.sampled_from(["replace", "delete", "tensor"]))
    if action == "delete":
        del payload[key]
    elif action == "replace":
        payload[key] = data.draw(values)
    else:  # a tensor of the model, reshaped or retyped
        model = dict(payload["model"])
        name = data.draw(st.sampled_from(sorted(model)))
        model[name] = data.draw(values)
        payload["model"] = model
    save_atomic(payload, tmp_path / LAST)
    loaded = accepts_or_refuses(lambda: load_checkpoint(tmp_path))
    if loaded is not None:  # then eval and sample can use it
        import flowspec
        from flowspec.train.checkpoint import checkpoint_spec, ema_weights

        flowspec.build(checkpoint_spec(loaded, tmp_path)).load_state_dict(ema_weights(loaded))


@pytest.mark.slow
@FUZZ
@given(offset=st.floats(0, 1), length=st.integers(1, 64))
def test_flipped_checkpoint_bytes_are_loaded_or_refused(checkpoint, tmp_path, offset, length):
    save_atomic(checkpoint, tmp_path / LAST)
    data = bytearray((tmp_path / LAST).read_bytes())
    start = int(offset * (len(data) - length))
    data[start : start + length] = bytes(b ^ 0xA5 for b in data[start : start + length])
    (tmp_path / LAST).write_bytes(bytes(data))
    loaded = accepts_or_refuses(lambda: load_checkpoint(tmp_path))
    if loaded is not None:  # only bytes outside the content changed (zip metadata): the content is intact
        assert all(torch.equal(loaded["model"][k], v) for k, v in checkpoint["model"].items())


def _address_space(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.mark.slow
@pytest.mark.parametrize("allow_large", [False, True], ids=["refused", "allowed-then-out-of-memory"])
def test_a_memory_bomb_exits_2_under_an_address_space_limit(tmp_path, allow_large):
    """1x16384x16384 images: refused from the estimate; with --allow-large, the allocation fails and
    the out-of-memory message follows. Either way exit 2, no traceback, within the limits."""
    bomb = tmp_path / "bomb.flow"
    bomb.write_text(
        "model bomb\ndata digits { shape 1x16384x16384 levels 17 }\n"
        "flow { split stripe { coupling(filters=8, blocks=1, heads=2, components=2); flip } }\n"
    )
    command = [sys.executable, "-m", "flowspec", "inspect", str(bomb), "--probe"]
    command += ["--allow-large"] * allow_large
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=180, preexec_fn=_address_space(4 * 2**30), env=env
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    if allow_large:
        assert done.stderr.startswith("error: out of memory: ")
    else:
        assert "is too large for this machine" in done.stderr
        left = re.search(r"this process can still take ([\d.]+) (MiB|GiB) of cpu memory", done.stderr)
        assert left and float(left[1]) * {"MiB": 2**20, "GiB": 2**30}[left[2]] < 4 * 2**30  # less its maps


@pytest.mark.slow
def test_inspect_and_diff_of_a_memory_bomb_allocate_nothing(tmp_path):
    """Without --probe, inspect and diff build on the meta device: the 1,073,744,312 parameters (4 GiB) of
    1x16384x16384 images are counted under a 4 GiB address-space limit, exit 0 (one process: one import)."""
    bomb = tmp_path / "bomb.flow"
    bomb.write_text(
        "model bomb\ndata digits { shape 1x16384x16384 levels 17 }\n"
        "flow { split stripe { coupling(filters=8, blocks=1, heads=2, components=2); flip } }\n"
    )
    script = (
        "import sys\nfrom flowspec.cli.app import run\n"
        "sys.exit(10 * run(['inspect', sys.argv[1]]) + run(['diff', sys.argv[1]]))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", script, str(bomb)],
        capture_output=True,
        text=True,
        timeout=180,
        preexec_fn=_address_space(4 * 2**30),
        env=env,
    )
    assert done.returncode == 0, done.stderr  # 20: inspect failed, 2: diff failed
    assert done.stdout.count("1,073,744,312") >= 6 and "Traceback" not in done.stderr
