"""`--help` of every command: every option described, the same names across commands, and examples that
the command accepts."""

from __future__ import annotations

import glob
import shlex

import pytest
import typer
from conftest import ROOT

import flowspec
from flowspec.cli.app import app, run
from flowspec.cli.examples import EXAMPLES
from flowspec.cli.inference import _with_overrides

GROUP = typer.main.get_command(app)
COMMANDS = sorted(GROUP.commands)  # type: ignore[attr-defined]


def test_every_command_has_examples():
    assert set(EXAMPLES) == set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_describes_every_option_and_shows_the_examples(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert run([name, "--help"]) == 0
    out = capsys.readouterr().out
    command = GROUP.commands[name]  # type: ignore[attr-defined]
    assert command.help and command.help.strip()
    for param in command.params:
        assert (getattr(param, "help", None) or "").strip(), f"{name} {param.name} has no description"
    for example in EXAMPLES[name]:
        assert example in out


def test_the_same_option_names_across_commands():
    options: dict[str, list] = {}
    for name in COMMANDS:
        for param in GROUP.commands[name].params:  # type: ignore[attr-defined]
            if param.param_type_name == "option":
                for opt in param.opts:
                    options.setdefault(opt, []).append((name, param))
    assert "--output" not in options and "--dir" not in options
    for opt in ("--out", "--device", "--data", "--threads", "--set", "--seed", "--batch"):
        assert opt in options
    for name, param in options["--out"]:  # every output has the same names
        assert param.opts == ["--out", "-o"], name
    for opt in ("--device", "--threads"):  # one meaning, one description
        assert len({param.help for _, param in options[opt]}) == 1
    assert {param.metavar for _, param in options["--data"]} == {"PATH"}  # a folder or a file
    assert {name for name, _ in options["--threads"]} == {"train", "eval", "sample", "ablate", "inspect"}
    assert {name for name, _ in options["--precision"]} == {"train", "eval", "sample", "ablate"}


def _example_args(name: str, example: str) -> list[str]:
    words = shlex.split(example)
    assert words[:2] == ["flowspec", name]
    return words[2:]


@pytest.mark.parametrize(("name", "example"), [(n, e) for n in COMMANDS for e in EXAMPLES[n]])
def test_every_example_parses(name, example):
    command = GROUP.commands[name]  # type: ignore[attr-defined]
    command.make_context(name, _example_args(name, example))  # options, types and ranges checked


@pytest.mark.parametrize(
    ("name", "example"),
    [(n, e) for n in ("validate", "show", "inspect", "diff") for e in EXAMPLES[n] if "quickstart" in e],
)
def test_cheap_examples_run(name, example, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    args = [match for word in _example_args(name, example) for match in (sorted(glob.glob(word)) or [word])]
    assert run([name, *args]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("name", ["eval", "sample"])
def test_eval_and_sample_examples_use_a_set_they_allow(name, tmp_path):
    spec = flowspec.load_spec(ROOT / "specs" / "quickstart.flow")
    sets = [
        value
        for example in EXAMPLES[name]
        for flag, value in zip(_example_args(name, example), _example_args(name, example)[1:], strict=False)
        if flag == "--set"
    ]
    assert sets
    changed = _with_overrides(spec, sets, tmp_path / "last.pt", name)  # raises for one it does not read
    assert changed != spec


def test_version_and_the_count_of_differences(capsys):
    assert run(["--version"]) == 0
    assert capsys.readouterr().out == f"flowspec {flowspec.__version__}\n"
    quickstart = str(ROOT / "specs" / "quickstart.flow")
    assert run(["diff", quickstart, quickstart, "--set", "train.seed=1"]) == 0
    assert "1 setting differs" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "usage"),
    [
        ("validate", "SPEC..."),
        ("show", "SPEC"),
        ("diff", "A [B]"),
        ("train", "[SPEC]"),
        ("ablate", "[SPEC]..."),  # none with --resume
    ],
)
def test_the_usage_line_names_the_arguments_as_the_readme_does(name, usage, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert run([name, "--help"]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert f"Usage: flowspec {name} [OPTIONS] {usage}" in lines


@pytest.mark.parametrize("args", [[], *([name] for name in COMMANDS)])
def test_a_flag_shows_no_type(args, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert run([*args, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--help" in out and "<bool>" not in out and "{" not in out.split("Usage:")[1].splitlines()[0]


def test_help_texts_say_what_the_options_do(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    assert run(["train", "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "default: the spec's eval.batch, else the batch" in next(x for x in lines if "--eval-batch" in x)
    assert "resumed run" in next(x for x in lines if "--precision" in x)
    assert "--seed" not in "\n".join(lines)  # hidden: it is refused
    assert "(pip install tensorboard)" in next(x for x in lines if "--tensorboard" in x)  # no markup eaten
    assert "notes, errors" in next(x for x in lines if "--quiet" in x)
    assert "the spec's eval.samples" in next(x for x in lines if "--eval-samples" in x)
    assert run(["ablate", "--help"]) == 0
    precision = next(x for x in capsys.readouterr().out.splitlines() if "--precision" in x)
    assert "Default: fp32." in precision and "resume" not in precision  # ablate does not resume
    assert run(["eval", "--help"]) == 0
    batch = next(x for x in capsys.readouterr().out.splitlines() if "--batch" in x)
    assert batch.count("256") == 1  # the default said once
    assert run(["--help"]) == 0
    described = capsys.readouterr().out.split("Options")[0]  # the app's own description names them all
    assert all(name in described for name in COMMANDS)


def test_train_seed_says_where_the_seed_is_set(capsys):
    assert run(["train", str(ROOT / "specs" / "quickstart.flow"), "--seed", "3"]) == 2
    assert "train takes its seed from the spec: --set train.seed=N" in capsys.readouterr().err


def test_train_of_a_run_folder_suggests_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.flow").write_text((ROOT / "specs" / "quickstart.flow").read_text())
    (run_dir / "spec.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text("")  # a run's, beside a spec.json that does not parse
    assert run(["train", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run_dir} is a run folder") and "Traceback" not in err
    assert f"flowspec train --resume {run_dir} " in err and err.count("\n") == 1


@pytest.mark.parametrize("width", ["80", "120"])
@pytest.mark.parametrize("args", [[], *([name] for name in COMMANDS)])
def test_help_fits_a_common_terminal_without_cutting_a_word(args, width, capsys, monkeypatch):
    """At 80 columns typer gave the help text ~17 of them: words were cut with an ellipsis."""
    monkeypatch.setenv("COLUMNS", width)
    assert run([*args, "--help"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out and "<int" not in out and "<float>" not in out  # no python types either


@pytest.mark.parametrize(
    ("name", "argument"), [("validate", "SPEC..."), ("ablate", "SPEC..."), ("eval", "RUN_DIR")]
)
def test_the_arguments_panel_names_arguments_without_python_types(name, argument, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    assert run([name, "--help"]) == 0
    panel = capsys.readouterr().out.split("Arguments")[1].split("Options")[0]
    assert argument in panel and "<" not in panel and "list[" not in panel


def test_a_seed_out_of_range_is_a_usage_error_naming_the_range(capsys):
    assert run(["sample", "run", "--seed", "-1"]) == 2
    assert "a seed is a whole number from 0 to 4294967295, got -1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["inspect", "x.flow", "--format", "yaml"],
            "'--format' / '-f': 'yaml' is not one of 'rich', 'json',",
        ),
        (
            ["train", "x.flow", "--precision", "fp64"],
            "'--precision': 'fp64' is not one of 'fp32', 'bf16', 'auto'",
        ),
        (["sample", "run", "--device", "tpu"], "'--device': 'tpu' is not one of"),
    ],
)
def test_a_choice_refused_names_the_choices_without_pydantic_words(args, said, capsys):
    assert run(args) == 2
    assert f"Error: Invalid value for {said}" in capsys.readouterr().err


def test_eval_inversion_and_its_negation_are_one_setting(capsys):
    from flowspec.cli.training import _eval_settings

    assert _eval_settings(None, None, None, False, False) == {}
    assert _eval_settings(None, None, None, True, False) == {"inversion": True}
    assert _eval_settings(3, None, None, False, True) == {"images": 3, "inversion": False}
    quickstart = str(ROOT / "specs" / "quickstart.flow")
    parsed = GROUP.commands["ablate"].make_context("ablate", [quickstart, "--no-eval-inversion"]).params  # type: ignore[attr-defined]
    assert (parsed["eval_inversion"], parsed["no_eval_inversion"]) == (False, True)
    assert run(["train", quickstart, "--eval-inversion", "--no-eval-inversion"]) == 2
    assert "--eval-inversion and --no-eval-inversion contradict each other" in capsys.readouterr().err
