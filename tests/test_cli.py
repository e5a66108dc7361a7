"""The command line refuses values it cannot run, as argparse does (usage, ``argument
--option: ...``, exit code 2) and before any training: bad numbers, training data too small
for a batch, an output folder it cannot write (issue 18)."""

from __future__ import annotations

import re

import pytest

from smallbn import cli
from smallbn.experiments import compare, data, demo, record
from smallbn.experiments.sampling import steps_per_epoch

COMPARE = ["compare", "--preset", "smoke", "--dataset", "digits", "--threads", "1", "--jobs", "1"]
RECORD = ["record", "--dataset", "digits", "--threads", "1", "--steps", "20", "--window", "0"]
DEMO = ["demo", "--methods", "bn", "--dataset", "digits", "--threads", "1", "--steps", "3"]


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """Every case here must stop before a step is trained."""

    def trained(*args, **kwargs):
        raise AssertionError("the job started training")

    monkeypatch.setattr(compare, "run_sweep", trained)
    monkeypatch.setattr(record, "train_steps", trained)
    monkeypatch.setattr(demo, "train_steps", trained)


def _usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: smallbn"), err
    return err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--lr", "-1"], "argument --lr: need a finite number above 0, got '-1'"),
        (["--lr", "nan"], "argument --lr: need a finite number above 0, got 'nan'"),
        (["--lr", "0"], "argument --lr: need a finite number above 0, got '0'"),
        (["--epochs", "inf"], "argument --epochs: need a finite number above 0"),
        (["--threads", "0"], "argument --threads: need an integer >= 1, got '0'"),
        (["--seeds", ""], "argument --seeds: need a comma-separated list of seeds from 0 to"),
        (["--seeds", "0,-1"], "argument --seeds: need a comma-separated list of seeds from 0 to"),
        (
            ["--train-samples", "10", "--compositions", "iid"],
            "argument --train-samples: batch size 32 exceeds the 10 training samples, of digits",
        ),
    ],
)
def test_compare_refuses_values_it_cannot_run(tmp_path, capsys, options, message):
    err = _usage_error(capsys, [*COMPARE, "--output-dir", str(tmp_path / "out"), *options])
    assert message in err
    assert not (tmp_path / "out").exists()


def test_compare_names_the_real_rule_of_correlated_batches(tmp_path, capsys):
    """33 samples are more than 32, but correlated batches take whole pairs of one class:
    the message says so, and the number of samples it asks for is the least that works."""
    err = _usage_error(
        capsys,
        [*COMPARE, "--output-dir", str(tmp_path), "--train-samples", "33", "--batch-sizes", "32"],
    )
    assert "argument --train-samples:" in err and "exceeds" not in err
    assert "runs of 2 samples of one class" in err and "pass --compositions iid, or" in err
    least = int(re.search(r"--train-samples (\d+) or more", err).group(1))
    labels = data.load_digits().train_y
    assert steps_per_epoch(labels[:least], 32, 2, "correlated") == 1
    assert steps_per_epoch(labels[: least - 1], 32, 2, "correlated") == 0


@pytest.mark.parametrize("job", ["compare", "record", "bench"])  # demo writes no files
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, job):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = {
        "compare": COMPARE,
        "record": RECORD,
        "bench": ["bench", "layers", "--methods", "bn", "--shapes", "2x4x4x4", "--repeats", "1"],
    }[job]
    err = _usage_error(capsys, [*argv, "--output-dir", str(blocker / "out")])
    assert f"argument --output-dir: {blocker / 'out'}: {blocker} is not a folder" in err
    assert "measured" not in err.lower()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--steps", "5", "--window", "11"], "argument --steps: 5 step(s) give no fluctuation"),
        (["--steps", "1"], "argument --steps: need an integer >= 2"),
        (["--window", "-1"], "argument --window: need an integer >= 0"),
        (["--lr", "-1"], "argument --lr: need a finite number above 0"),
        (["--lr", "nan"], "argument --lr: need a finite number above 0"),
        (["--threads", "0"], "argument --threads: need an integer >= 1"),
        (["--seed", "-1"], "argument --seed: need an integer from 0 to"),
        (["--channel", "-1"], "argument --channel: need an integer >= 0"),
        (
            ["--channel", "16"],
            "argument --channel: 16 is not a channel of stages.0.bn2, which has 16",
        ),
        (
            ["--train-samples", "10"],
            "argument --train-samples: batch size 32 exceeds the 10 training samples",
        ),
    ],
)
def test_record_refuses_values_it_cannot_run(tmp_path, capsys, options, message):
    err = _usage_error(capsys, [*RECORD, "--output-dir", str(tmp_path / "out"), *options])
    assert message in err
    assert not (tmp_path / "out").exists()


def test_record_asks_for_the_steps_its_window_needs(tmp_path, capsys):
    err = _usage_error(
        capsys, [*RECORD, "--output-dir", str(tmp_path), "--steps", "11", "--window", "11"]
    )
    assert "pass --steps 12 or more or a smaller --window" in err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--steps", "0"], "argument --steps: need an integer >= 1"),
        (["--eval-samples", "0"], "argument --eval-samples: need an integer >= 1"),
        (["--batch-size", "0"], "argument --batch-size: need an integer >= 1"),
        (["--threads", "0"], "argument --threads: need an integer >= 1"),
        (["--seed", "-1"], "argument --seed: need an integer from 0 to"),
        (
            ["--train-samples", "4"],
            "argument --train-samples: batch size 8 exceeds the 4 training samples",
        ),
    ],
)
def test_demo_refuses_values_it_cannot_run(capsys, options, message):
    assert message in _usage_error(capsys, [*DEMO, *options])


def test_bench_refuses_a_negative_seed(capsys):
    err = _usage_error(capsys, ["bench", "network", "--seed", "-1"])
    assert "argument --seed: need an integer from 0 to 4294967295" in err


def _subcommands(parser, prefix=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subcommands(sub, (*prefix, name))


def test_every_option_of_every_command_has_help_with_its_default(capsys):
    parser = cli.build_parser()
    commands = list(_subcommands(parser))
    assert {" ".join(c) for c, _ in commands} >= {
        "demo", "record", "compare", "rethink", "bench", "bench layers", "bench network",
        "import-checkpoint",
    }  # fmt: skip
    for command, sub in commands:
        options = [
            a for a in sub._actions if a.option_strings and a.option_strings != ["-h", "--help"]
        ]
        if not options:
            continue
        with pytest.raises(SystemExit):
            cli.main([*command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for action in options:
            assert action.help, (command, action.option_strings)
            assert action.option_strings[0] in text
        missing = [
            a.option_strings[0]
            for a in options
            if not a.required
            and "(default: " not in " ".join(sub.formatter_class("x")._get_help_string(a).split())
        ]
        assert not missing, (command, missing)
        assert text.count("(default: ") >= sum(1 for a in options if not a.required), command


def test_the_console_script_and_python_m_run_the_same_main():
    import subprocess
    import sys
    from importlib.metadata import entry_points

    scripts = [e for e in entry_points(group="console_scripts") if e.name == "smallbn"]
    if not scripts:
        pytest.skip("smallbn is not installed here (run from the source tree)")
    assert scripts[0].load() is cli.main
    result = subprocess.run(
        [sys.executable, "-m", "smallbn", "compare", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.startswith("usage: smallbn compare")
