"""The comparison job: a tiny sweep end to end, resume after SIGKILL, report arithmetic,
and a 2-process torchrun (gloo) run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smallbn.experiments import compare

SMOKE = ["--preset", "smoke", "--dataset", "digits", "--threads", "1"]


def _cli(output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "smallbn", "compare", *SMOKE, "--output-dir", str(output), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_tiny_sweep_end_to_end_and_rerun_skips(tmp_path, monkeypatch):
    configs = compare.preset_configs("smoke", dataset="digits")
    rows = compare.run_sweep(configs, tmp_path, progress=False)
    assert len(rows) == len(configs) == 3
    for row in rows:
        assert 0.0 <= row["error_ema"] <= 1.0 and 0.0 <= row["error_precise"] <= 1.0
        assert row["train_seconds"] > 0 and row["steps"] > 0
    assert (tmp_path / "results.md").read_text().count("| bn |") >= 2
    assert (tmp_path / "error_vs_batch.png").stat().st_size > 1000
    assert not list((tmp_path / "checkpoints").glob("*.pt"))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(compare, "run_one", no_training)
    again = compare.run_sweep(configs, tmp_path, progress=False)
    assert again == rows
    assert len(compare.read_results(tmp_path / "results.jsonl")) == 3


def test_sigkill_mid_run_then_rerun_gives_exactly_one_result_per_config(tmp_path):
    out = tmp_path / "killed"
    extra = ["--epochs", "6", "--checkpoint-every", "5", "--methods", "bn", "--batch-sizes", "2"]
    process = subprocess.Popen(
        _cli(out, *extra), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "checkpoints").glob("*.pt")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list((out / "checkpoints").glob("*.pt")), "no checkpoint was written before the kill"
    subprocess.run(_cli(out, *extra), env=_env(), check=True, capture_output=True)
    rows = compare.read_results(out / "results.jsonl")
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)) == 2  # correlated and iid, once each
    # nothing lost: the resumed run equals an uninterrupted one
    fresh = tmp_path / "fresh"
    subprocess.run(_cli(fresh, *extra), env=_env(), check=True, capture_output=True)
    by_key = {row["key"]: row for row in compare.read_results(fresh / "results.jsonl")}
    for row in rows:
        assert row["error_ema"] == by_key[row["key"]]["error_ema"]
        assert row["final_loss"] == pytest.approx(by_key[row["key"]]["final_loss"], rel=1e-6)


def test_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"key": "a"}) + "\n" + '{"key": "b", "err')
    assert [row["key"] for row in compare.read_results(path)] == ["a"]


def _row(method, b, composition, seed, error):
    config = compare.RunConfig(method, b, composition, seed)
    return {**config.__dict__, "key": config.key, "error_ema": error, "error_precise": error}


def test_tables_report_mean_std_and_gap_recovered():
    rows = [
        _row("bn", 32, "correlated", 0, 0.10),
        _row("bn", 32, "correlated", 1, 0.12),
        _row("bn", 2, "correlated", 0, 0.50),
        _row("bn", 2, "correlated", 1, 0.52),
        _row("gn", 2, "correlated", 0, 0.15),
        _row("gn", 2, "correlated", 1, 0.15),
    ]
    text = compare.format_tables(rows)
    assert "| bn | 51.0 ± 1.4 | 11.0 ± 1.4 |" in text
    # GN closes (51 - 15) / (51 - 11) = 90% of BN's gap
    assert "| gn | 90% |" in text


def test_presets_and_overrides():
    default = compare.preset_configs("default")
    assert {c.seed for c in default} == {0, 1, 2}
    assert {(c.method, c.norm_batch) for c in default if c.composition == "iid"} == {
        ("bn", 2),
        ("bn", 32),
        ("sn", 2),
    }
    subset = compare.preset_configs("default", methods=("gn",), batch_sizes=(4,), seeds=(9,))
    assert {(c.method, c.norm_batch, c.seed) for c in subset} == {("gn", 4, 9)}
    with pytest.raises(ValueError, match="unknown method"):
        compare.preset_configs("default", methods=("nope",))


@pytest.mark.distributed
def test_two_process_gloo_run_matches_single_process(tmp_path):
    extra = ["--methods", "bn", "--batch-sizes", "2", "--compositions", "iid", "--sync"]
    single = tmp_path / "single"
    subprocess.run(_cli(single, *extra), env=_env(), check=True, capture_output=True)
    double = tmp_path / "double"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    command = launcher + _cli(double, *extra)[1:]
    subprocess.run(command, env=_env(), check=True, capture_output=True, timeout=300)
    one = compare.read_results(single / "results.jsonl")
    two = compare.read_results(double / "results.jsonl")
    assert len(one) == len(two) == 1 and two[0]["world_size"] == 2
    assert abs(one[0]["error_precise"] - two[0]["error_precise"]) < 0.15
