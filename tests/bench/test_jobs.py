"""``smallbn bench layers|network``: every method measured, the files written with the settings
they were measured under, usage errors for bad arguments."""

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from smallbn.bench.harness import Settings
from smallbn.bench.layers import CONTROL, run_layers
from smallbn.bench.methods import DEFAULT_METHODS, check_methods
from smallbn.bench.network import run_network
from smallbn.bench.report import format_bytes, format_table, to_markdown, write_report
from smallbn.cli import build_parser, main
from smallbn.registry import available_norms

TINY = Settings(repeats=1, warmup=0, threads=1)


def test_default_methods_are_the_whole_registry():
    assert sorted(DEFAULT_METHODS) == available_norms()


def test_check_methods_puts_the_baseline_first_and_rejects_unknown_names():
    assert check_methods(["GN", "cbn", "gn"]) == ("bn", "gn", "cbn")
    with pytest.raises(ValueError, match="unknown method.*'nope'.*registered methods: bn"):
        check_methods(["bn", "nope"])


def test_every_default_method_gets_a_row_with_exact_bn_memory():
    n, c, h, w = 2, 4, 4, 4
    report = run_layers(DEFAULT_METHODS, [(n, c, h, w)], TINY)
    by = {row.method: row for row in report.rows}
    assert set(by) == {*DEFAULT_METHODS, CONTROL} and not report.skipped
    bn = by["bn"]
    assert bn.train_ratio == 1.0 and bn.eval_ratio == 1.0
    assert bn.state_bytes == 4 * (2 * c + 2 * c) + 8
    assert bn.saved_bytes == 4 * (n * c * h * w + 2 * c)
    assert by[CONTROL].saved_extra_bytes == 0 and by[CONTROL].state_extra_bytes == 0
    assert by["frozenbn"].saved_bytes == 4 * c  # its scale, no activation map
    # MABN's weight-centred conv keeps the centred weight for backward
    assert by["mabn"].saved_extra_bytes >= c * c * 9 * 4
    assert by["cbn"].state_bytes > bn.state_bytes + 4 * c * c * 9 * 4  # k = 4 derivatives
    for row in report.rows:
        assert row.peak_bytes is None  # CPU
        assert all(math.isfinite(v) and v > 0 for v in (row.train_ms, row.train_ratio))
        assert all(math.isfinite(v) and v > 0 for v in (row.eval_ms, row.eval_ratio))


def test_a_method_that_cannot_run_at_a_shape_is_skipped_with_its_reason():
    # one value per channel and group: batch statistics are impossible for Ghost BN's groups
    report = run_layers(["bn", "ghostbn", "in"], [(3, 4, 1, 1)], TINY, control=False)
    assert [row.method for row in report.rows] == ["bn"]
    assert set(report.skipped) == {"ghostbn @ 3x4x1x1", "in @ 3x4x1x1"}
    assert "more than one value per channel" in report.skipped["ghostbn @ 3x4x1x1"]


def test_reports_record_the_settings(tmp_path):
    report = run_layers(["bn", "gn"], [(2, 4, 4, 4)], Settings(repeats=2, warmup=1, threads=1))
    json_path, md_path = write_report(report, tmp_path)
    data = json.loads(json_path.read_text())
    settings = data["settings"]
    assert (settings["repeats"], settings["warmup"], settings["threads"]) == (2, 1, 1)
    assert settings["seed"] == 0 and settings["device"] == "cpu"
    assert settings["torch"] == torch.__version__ and settings["cpu"]
    assert [r["method"] for r in data["rows"]] == ["bn", CONTROL, "gn"]
    assert data["rows"][0]["shape"] == [2, 4, 4, 4]
    markdown = md_path.read_text()
    assert markdown == to_markdown(report)
    assert "| method | N×C×H×W | train ms | train ×BN |" in markdown
    assert "1 thread(s), 2 repeats after 1 warm-up" in markdown
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.json", "layers.md"]


def test_network_folds_affine_methods_only(tmp_path):
    report = run_network(["bn", "gn", "mabn"], 2, TINY)
    by = {row.method: row for row in report.rows}
    assert by["bn"].folded_ratio is not None and by["mabn"].folded_images_per_s is not None
    assert by["gn"].folded_ratio is None
    assert by["gn"].fold_note is not None and "GroupNorm" in by["gn"].fold_note
    assert by["bn"].train_ratio == 1.0 and by["bn"].train_images_per_s > 0
    table = format_table(report)
    assert "gn: folding n/a" in table and "batch 2" in table
    json_path, _ = write_report(report, tmp_path)
    data = json.loads(json_path.read_text())
    assert data["network"]["batch_size"] == 2 and data["settings"]["repeats"] == 1


def test_format_bytes():
    assert format_bytes(1032) == "1.0 KiB"
    assert format_bytes(-512, signed=True) == "-512 B"
    assert format_bytes(3 * 2**20, signed=True) == "+3.00 MiB"
    assert format_bytes(None) == "n/a"


def test_cli_parses_shapes_and_methods():
    args = build_parser().parse_args(
        ["bench", "layers", "--shapes", "2x64x56x56,8×64×32×32", "--methods", "gn,cbn"]
    )
    assert args.shapes == ((2, 64, 56, 56), (8, 64, 32, 32))
    assert args.methods == ("bn", "gn", "cbn")
    args = build_parser().parse_args(["bench", "network", "--batch-size", "8"])
    assert args.batch_size == 8 and args.methods == DEFAULT_METHODS and args.repeats == 20


@pytest.mark.parametrize(
    "argv, message",
    [
        (["layers", "--shapes", "2x64x56"], "not an input shape NxCxHxW"),
        (["layers", "--shapes", "2x0x4x4"], "not an input shape NxCxHxW"),
        (["layers", "--methods", "bn,batchnorm9"], "unknown method(s) 'batchnorm9'"),
        (["network", "--batch-size", "0"], "need an integer >= 1"),
        (["layers", "--repeats", "0"], "need an integer >= 1"),
    ],
)
def test_cli_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_without_cuda_says_so(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code = main(["bench", "layers", "--device", "cuda", "--output-dir", str(tmp_path)])
    assert code == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_layers_end_to_end(capsys, tmp_path):
    argv = ["bench", "layers", "--methods", "bn,sn", "--shapes", "2x4x4x4", "--repeats", "1"]
    argv += ["--warmup", "0", "--threads", "1", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "train ×BN" in out and "\nsn " in out and str(tmp_path / "layers.md") in out
    assert json.loads((tmp_path / "layers.json").read_text())["methods"] == ["bn", "sn"]


def test_the_default_run_does_not_collect_the_benchmark_suite():
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[2]
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert config["testpaths"] == ["tests"]
    assert list((root / "benchmarks").glob("test_bench_*.py"))


def test_a_disturbed_run_is_flagged_by_its_control_block():
    report = run_layers(["bn"], [(2, 4, 4, 4)], TINY)
    assert "warning" not in format_table(dataclasses.replace(report, rows=report.rows[:1]))
    control = dataclasses.replace(report.rows[1], train_ratio=1.5, eval_ratio=1.0)
    noisy = dataclasses.replace(report, rows=(report.rows[0], control))
    assert "warning: at 2x4x4x4 a second conv + BN block measured 1.50× (train)" in format_table(
        noisy
    )


def test_the_cross_iteration_benchmark_script_runs_and_reports_its_floors(tmp_path):
    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location(
        "bench_cross_iteration", root / "benchmarks" / "bench_cross_iteration.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = tmp_path / "cbn.json"
    argv = ["--shapes", "2x4x4x4", "--runs", "1", "--repeats", "2", "--warmup", "1"]
    threads = torch.get_num_threads()
    try:
        report = module.main([*argv, "--threads", "1", "--output", str(output)])
    finally:
        torch.set_num_threads(threads)
    (row,) = report["results"]
    assert set(row["ms"]) == {"bn", "cbn", "cbn_naive", "floor", "floor_fwd"}
    assert all(value > 0 for value in row["ms"].values())
    assert row["state_bytes"] > 0
    assert json.loads(output.read_text())["results"][0]["config"] == "2,4,4x4"
