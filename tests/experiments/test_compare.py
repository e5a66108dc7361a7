"""The comparison job: a tiny sweep end to end, resume after SIGKILL, report arithmetic,
and a 2-process torchrun (gloo) run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import smallbn
from smallbn import cli
from smallbn.experiments import compare, data
from smallbn.experiments.compare.results import _append_result
from smallbn.experiments.compare.training import _host_state, _load_host_state, _norm_factory

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

    monkeypatch.setattr(compare.sweep, "run_one", no_training)
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
    row = _row("bn", 2, "iid", 0, 0.5)
    path.write_text(json.dumps(row) + "\n" + '{"key": "b", "err')
    with pytest.warns(compare.ResultsWarning, match=r"results\.jsonl:2: not JSON"):
        assert [row["key"] for row in compare.read_results(path)] == [row["key"]]


def _row(method, b, composition, seed, error):
    config = compare.RunConfig(method, b, composition, seed)
    return {**config.__dict__, "key": config.key, "error_ema": error, "error_precise": error}


def _bn_at_2_and_32():
    """BN's rows in correlated groups, two seeds: 51 ± 1.4 at b = 2, 11 ± 1.4 at b = 32."""
    return [
        _row("bn", b, "correlated", seed, error)
        for b, errors in ((32, (0.10, 0.12)), (2, (0.50, 0.52)))
        for seed, error in enumerate(errors)
    ]


def test_tables_report_mean_std_and_gap_recovered():
    rows = [
        *_bn_at_2_and_32(),
        _row("gn", 2, "correlated", 0, 0.15),
        _row("gn", 2, "correlated", 1, 0.15),
    ]
    text = compare.format_tables(rows)
    assert "| bn | 51.0 ± 1.4 | 11.0 ± 1.4 |" in text
    # GN closes (51 - 15) / (51 - 11) = 90% of BN's gap
    assert "| gn (any b) | 90% |" in text


def test_gap_recovered_leaves_out_a_gap_within_noise():
    """A share of BN's gap is reported only where the gap stands out: under 5 points (here
    b = 4: 12 against 11) or under BN's seed spread (b = 8: 20 ± 12 against 11 ± 1.4) the
    ratio divides noise by noise."""
    rows = [
        *_bn_at_2_and_32(),
        _row("bn", 4, "correlated", 0, 0.12),
        _row("bn", 4, "correlated", 1, 0.12),
        _row("bn", 8, "correlated", 0, 0.11),
        _row("bn", 8, "correlated", 1, 0.28),
        *(_row("mabn", b, "correlated", seed, 0.15) for b in (2, 4, 8) for seed in (0, 1)),
    ]
    text = compare.format_tables(rows)
    assert "b = 4, 8 left out: BN's gap there is under 5 points or its seeds' spread" in text
    assert "| mabn | 90% |" in text  # (51 - 15) / (51 - 11), the only column
    only_noise = [r for r in rows if r["norm_batch"] != 2]
    assert "gap recovered" not in compare.format_tables(only_noise)


def test_presets_and_overrides():
    default = compare.preset_configs("default")
    assert {c.seed for c in default} == {0, 1}
    assert {(c.epochs, c.train_samples) for c in default} == {(3.0, 6_000)}
    plan = {(c.composition, c.method, c.norm_batch) for c in default}
    assert {(m, b) for composition, m, b in plan if composition == "iid"} == {("bn", 2), ("bn", 32)}
    correlated = {(m, b) for composition, m, b in plan if composition == "correlated"}
    # each method a line over b = 2, 4, 8; BN also at 32 (the reference); GN once
    assert correlated == {
        *((m, b) for m in ("bn", "brn", "sn", "cbn", "mabn") for b in (2, 4, 8)),
        ("bn", 32),
        ("gn", 2),
    }
    assert len(default) == 38
    subset = compare.preset_configs("default", methods=("gn",), batch_sizes=(4,), seeds=(9,))
    assert {(c.method, c.norm_batch, c.seed) for c in subset} == {("gn", 4, 9)}
    with pytest.raises(ValueError, match="unknown method"):
        compare.preset_configs("default", methods=("nope",))


def test_a_batch_independent_method_gives_the_same_run_at_every_b(tmp_path):
    """GN in groups mode sees SGD batches of 32 whatever b is: the default runs it once."""
    rows = [
        compare.run_one(
            compare.RunConfig("gn", b, "correlated", 0, **TINY),
            data.load_digits(),
            tmp_path / f"b{b}.pt",
            device=torch.device("cpu"),
            progress=False,
        )
        for b in (2, 8)
    ]
    for field in ("steps", "error_ema", "error_precise", "final_loss"):
        assert rows[0][field] == rows[1][field], field
    assert compare.batch_independent("gn", "groups")
    assert not compare.batch_independent("gn", "sgd") and not compare.batch_independent(
        "bn", "groups"
    )


def test_a_batch_independent_method_is_shown_at_every_b(tmp_path):
    rows = [
        _row("bn", 2, "correlated", 0, 0.50),
        _row("bn", 8, "correlated", 0, 0.20),
        _row("bn", 32, "correlated", 0, 0.10),
        _row("gn", 2, "correlated", 0, 0.15),
        _row("mabn", 2, "correlated", 0, 0.12),
        _row("mabn", 8, "correlated", 0, 0.11),
    ]
    text = compare.format_tables(rows)
    assert "| gn (any b) | 15.0 | 15.0 | 15.0 |" in text
    assert "| gn (any b) | 88% | 50% |" in text  # (50 - 15) / (50 - 10), (20 - 15) / (20 - 10)
    assert "| mabn | 12.0 | 11.0 | – |" in text
    # in sgd mode b is the SGD batch: GN's runs at different b differ, nothing is spread
    sgd = [{**row, "mode": "sgd"} for row in rows]
    assert "| gn | 15.0 | – | – |" in compare.format_tables(sgd)
    assert compare.plot_results(rows, tmp_path / "plot.png").stat().st_size > 1000


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


# -- run identity: which data a run used -------------------------------------------------------


def test_default_data_keys_are_those_of_the_committed_results(tmp_path, monkeypatch):
    # The committed sweep read Debian's Fashion-MNIST: stand a folder in for it, so that the
    # test does not depend on whether this machine has the package (without it, the job
    # falls back to the digits, a different run: test_fallback_to_digits_is_labelled_digits).
    monkeypatch.setattr(data, "DEFAULT_FASHION_MNIST", tmp_path)
    docs = Path(__file__).resolve().parents[2] / "docs" / "compare_results.jsonl"
    committed = {json.loads(line)["key"] for line in docs.read_text().splitlines()}
    configs = compare.bind_data(compare.preset_configs("default"), None)
    assert {c.key for c in configs} == committed, (
        "docs/compare_results.jsonl is not the default plan's results: make them with "
        "`make compare` (smallbn compare) and copy runs/compare/results.jsonl there"
    )
    assert all("data_root" not in json.loads(c.key) for c in configs)


def test_fallback_to_digits_is_labelled_digits(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "DEFAULT_FASHION_MNIST", tmp_path / "absent")
    seen = []

    def fake_run(config, dataset, checkpoint, **kwargs):
        seen.append((config.dataset, dataset.name))
        return {**config.identity(), "key": config.key, "error_ema": 0.5, "error_precise": 0.5}

    monkeypatch.setattr(compare.sweep, "run_one", fake_run)
    monkeypatch.setattr(compare.sweep, "plot_results", lambda rows, path: path)
    configs = compare.preset_configs("smoke")
    assert {c.dataset for c in configs} == {"fashion-mnist"}
    rows = compare.run_sweep(configs, tmp_path / "out", progress=False)
    assert seen and all(label == loaded == "digits" for label, loaded in seen)
    assert {row["dataset"] for row in rows} == {"digits"} and len(rows) == len(configs)
    assert "falling back" in capsys.readouterr().err
    # a later run with the real data is a different run: nothing is skipped
    real = {c.key for c in configs}
    assert not real & {row["key"] for row in rows}


def test_data_root_is_part_of_the_key_only_when_given(tmp_path):
    config = compare.RunConfig("bn", 2, "iid", 0, dataset="idx")
    (bound,) = compare.bind_data([config], tmp_path)
    assert bound.data_root == str(tmp_path.resolve())
    assert json.loads(bound.key)["data_root"] == str(tmp_path.resolve())
    assert bound.key != config.key and bound.tag != config.tag
    (again,) = compare.bind_data([bound], None)  # binding twice changes nothing
    assert again.key == bound.key
    (digits,) = compare.bind_data([compare.RunConfig("bn", 2, "iid", 0, "digits")], tmp_path)
    assert digits.key == compare.RunConfig("bn", 2, "iid", 0, "digits").key  # reads no folder
    with pytest.raises(data.DatasetError, match="does not exist"):
        compare.run_sweep([config], tmp_path / "out", dataset_root=tmp_path / "absent")


# -- configs that cannot run as labelled ------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_sizes": (3,)}, "b=3 does not divide the SGD batch of 32.*short group"),
        ({"batch_sizes": (64,)}, "b=64 does not divide.*normalize over 32 samples, not 64"),
        (
            {"batch_sizes": (3,), "mode": "sgd", "compositions": ("correlated",)},
            "class_group=2 samples of one class, so class_group must divide the SGD batch",
        ),
        ({"batch_sizes": (2,), "world_size": 3}, "number of processes must divide"),
        ({"batch_sizes": (32,), "world_size": 2}, "normalize over 16, not b=32: pass --sync"),
        ({"compositions": ("corelated",)}, "unknown composition 'corelated'"),
    ],
)
def test_configs_that_would_be_mislabelled_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        compare.preset_configs("smoke", methods=("bn",), **overrides)


def test_valid_configs_still_pass():
    assert compare.preset_configs("smoke", batch_sizes=(32,), world_size=2, sync=True)
    assert compare.preset_configs("smoke", mode="sgd", batch_sizes=(3,), compositions=("iid",))
    assert compare.preset_configs("smoke", methods=("gn",), batch_sizes=(32,), world_size=2)


def test_repeated_seeds_methods_compositions_make_each_run_once():
    configs = compare.preset_configs(
        "smoke", seeds=(0, 0), methods=("bn", "bn"), compositions=("iid", "iid")
    )
    assert [(c.method, c.norm_batch, c.composition, c.seed) for c in configs] == [
        ("bn", 2, "iid", 0),
        ("bn", 32, "iid", 0),
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--compositions", "corelated"], "unknown composition 'corelated'; choose from iid"),
        (["--methods", "bn,nope"], "unknown method 'nope'; choose from bn,brn"),
        (["--checkpoint-every", "0"], "--checkpoint-every: need an integer >= 1"),
        (["--train-samples", "-5"], "--train-samples: need an integer >= 1"),
        (["--batch-sizes", "3"], "b=3 does not divide the SGD batch"),
    ],
)
def test_cli_usage_errors(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", *SMOKE, "--output-dir", str(tmp_path), *options])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.jsonl").exists()


def test_cli_repeats_are_dropped_at_parse_time():
    args = cli.build_parser().parse_args(
        ["compare", "--seeds", "0,0,1", "--methods", "bn,bn", "--compositions", "iid,iid"]
    )
    assert (args.seeds, args.methods, args.compositions) == ((0, 1), ("bn",), ("iid",))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["compare", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "CUDA is not available here" in capsys.readouterr().err


# -- failures ----------------------------------------------------------------------------------


def test_corrupt_checkpoint_names_the_file_and_the_fix(tmp_path):
    (config,) = compare.preset_configs(
        "smoke", dataset="digits", methods=("bn",), batch_sizes=(2,), compositions=("iid",)
    )
    checkpoint = tmp_path / f"{config.tag}.pt"
    checkpoint.write_bytes(b"half a checkpoint")
    with pytest.raises(compare.CheckpointError, match=f"{checkpoint}: .*delete the file"):
        compare.run_one(config, data.load_digits(), checkpoint, device=torch.device("cpu"))


def test_a_failing_run_in_a_parallel_sweep_keeps_the_others_results(tmp_path):
    tiny = {"dataset": "digits", "epochs": 1.0, "precise_samples": 32, "train_samples": 64}
    bad = compare.RunConfig("bn", 2, "iid", 0, **{**tiny, "train_samples": 8})  # batch 32 > 8
    # The pool hands up to jobs + 1 runs to its call queue ahead of time (they can no longer be
    # cancelled), and workers keep taking queued runs until the failure is seen: on a fast CPU
    # all of 6 tiny runs finished first. With 16, most are still queued when it is.
    good = [compare.RunConfig("bn", 2, "iid", seed, **tiny) for seed in range(1, 17)]
    with pytest.raises(ValueError, match="exceeds the 8 training samples") as error:
        compare.run_sweep([bad, *good], tmp_path, jobs=2, progress=False)
    rows = compare.read_results(tmp_path / "results.jsonl")
    # the run started beside the failing one finished and was recorded; queued ones were
    # cancelled rather than trained and thrown away
    assert 1 <= len(rows) < len(good)
    assert {row["key"] for row in rows} <= {c.key for c in good}
    assert any(bad.tag in note for note in getattr(error.value, "__notes__", []))


def _append_many(path: Path, name: str, count: int) -> None:
    for i in range(count):
        _append_result(path, {**_row("bn", 2, "iid", i, 0.5), "key": f"{name}-{i}"})


def test_append_result_holds_a_lock_around_the_read_modify_write(tmp_path, monkeypatch):
    fcntl = pytest.importorskip("fcntl")
    path = tmp_path / "results.jsonl"
    write = compare.results.atomic_write
    held = []

    def checking_write(target, writer):
        with open(tmp_path / "results.jsonl.lock", "a+b") as other:
            try:
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(True)
            else:
                fcntl.flock(other.fileno(), fcntl.LOCK_UN)
                held.append(False)
        return write(target, writer)

    monkeypatch.setattr(compare.results, "atomic_write", checking_write)
    _append_many(path, "a", 2)
    assert held == [True, True]


def test_concurrent_appends_lose_no_rows(tmp_path):
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork to start writers cheaply")
    path = tmp_path / "results.jsonl"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_append_many, args=(path, n, 60)) for n in "ab"]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    assert [w.exitcode for w in writers] == [0, 0]
    assert len(compare.read_results(path)) == 120


@pytest.mark.parametrize("mode", ["groups", "sgd"])
@pytest.mark.parametrize(("b", "window"), [(2, 16), (4, 8), (8, 4), (16, 2), (32, 1)])
def test_mabn_averages_over_32_samples_at_every_normalization_batch(mode, b, window):
    """The release's B = 32/b: the moving averages cover the samples of one SGD batch of 32,
    not 16 steps whatever b is (at b = 32 that spanned 16 weight updates and diverged)."""
    config = compare.RunConfig("mabn", b, "iid", 0, mode=mode)
    norm = _norm_factory(config, sgd_steps=100)(8)
    assert norm.window == window
    assert norm.norm_batch_size == (b if mode == "groups" and b < 32 else None)


@pytest.mark.parametrize(("b", "window"), [(2, 8), (4, 4), (8, 2), (16, 1), (32, 1)])
def test_naive_pooling_is_cbn_without_compensation_at_every_batch(b, window):
    """The ablation differs from CBN in the compensation only: the same window k and burn-in."""
    built = {
        method: _norm_factory(compare.RunConfig(method, b, "iid", 0), sgd_steps=100)(8)
        for method in ("cbn", "naive")
    }
    assert built["cbn"].window == built["naive"].window == window
    assert built["cbn"].burnin == built["naive"].burnin
    assert built["cbn"].compensate and not built["naive"].compensate


# -- concurrent invocations (issue 18) ---------------------------------------------------------

#: Two runs (correlated and iid), of 8 steps per epoch on 256 digits.
PAIR = ["--methods", "bn", "--batch-sizes", "2"]


def _keys(path: Path) -> list[str]:
    """The keys of the rows in ``path``, read directly, duplicates included."""
    if not path.exists():
        return []
    return [json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_two_invocations_started_together_train_each_run_once(tmp_path, jobs):
    out = tmp_path / "out"
    command = _cli(out, *PAIR, "--jobs", jobs)
    processes = [
        subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    errors = [process.communicate(timeout=300)[1].decode() for process in processes]
    assert [process.returncode for process in processes] == [0, 0], errors
    keys = _keys(out / "results.jsonl")  # the file itself, not read_results' view of it
    assert len(keys) == len(set(keys)) == 2
    cells = [line for line in (out / "results.md").read_text().splitlines() if "| bn |" in line]
    assert cells and not [line for line in cells if "±" in line]  # one value per cell
    assert not list((out / "checkpoints").iterdir())  # no checkpoint or claim left behind


def test_an_invocation_killed_holding_a_run_leaves_it_to_the_other(tmp_path):
    """A trains the first run; B, started beside it, trains the second and waits for the
    first; A is killed (SIGKILL) while B waits; B takes the first run over from A's
    checkpoint.  SIGSTOP holds A mid-run whatever the machine's speed."""
    out = tmp_path / "out"
    command = _cli(out, *PAIR, "--epochs", "30", "--checkpoint-every", "5", "--jobs", "1")
    first = subprocess.Popen(
        command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    second = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((out / "checkpoints").glob("*.pt")):
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)
        (held,) = list((out / "checkpoints").glob("*.pt"))
        step = torch.load(held, weights_only=False)["step"]
        log = tmp_path / "second.err"
        with open(log, "wb") as err:
            second = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 60  # (sooner if A was stopped holding the results' lock)
        while time.time() < deadline and "waiting for run" not in log.read_text():
            # B must not finish while A holds a run: it would have trained that run too
            assert second.poll() is None, f"B ended while A held {held.stem}: {log.read_text()}"
            time.sleep(0.05)
        digests = [hashlib.sha1(k.encode()).hexdigest()[:12] for k in _keys(out / "results.jsonl")]
        assert not [digest for digest in digests if held.stem.endswith(digest)]  # left to A
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert second.wait(timeout=300) == 0, log.read_text()
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    text = log.read_text()
    assert f"waiting for run {held.stem}" in text
    resumed = re.search(rf"resuming {re.escape(held.stem)} from its checkpoint at step (\d+)", text)
    assert resumed and int(resumed.group(1)) >= step > 0, text
    keys = _keys(out / "results.jsonl")
    assert len(keys) == len(set(keys)) == 2


def test_a_claim_is_exclusive_and_leaves_no_file(tmp_path):
    from smallbn._io import claim

    pytest.importorskip("fcntl")
    lock = tmp_path / "run.lock"
    with claim(lock, wait=False) as mine:
        # a second open file description conflicts as another process's would
        with claim(lock, wait=False) as theirs:
            assert mine and not theirs
    assert not lock.exists()
    with claim(lock, wait=False) as again:
        assert again


# -- damaged results (issue 18) ----------------------------------------------------------------


def test_damaged_lines_are_moved_aside_with_their_line_numbers_and_the_job_carries_on(
    tmp_path, monkeypatch
):
    configs = compare.preset_configs(
        "smoke",
        dataset="digits",
        methods=("bn",),
        batch_sizes=(2,),
        compositions=("iid",),
        seeds=(0, 1),
    )
    finished = {
        **configs[0].identity(),
        "key": configs[0].key,
        "error_ema": 0.3,
        "error_precise": 0.2,
    }
    damaged = [
        '{"method": "bn", "error_ema": 0.1}',  # valid JSON, no key
        "\x00\x01 garbage {",
        "[1, 2, 3]",
        json.dumps({**finished, "error_ema": 0.9}),  # a second row of the same run
    ]
    lines = [damaged[0], json.dumps(finished), damaged[1], damaged[2], damaged[3]]
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(lines) + "\n")
    trained = []

    def fake_run(config, dataset, checkpoint, **kwargs):
        trained.append(config.key)
        return {**config.identity(), "key": config.key, "error_ema": 0.5, "error_precise": 0.4}

    monkeypatch.setattr(compare.sweep, "run_one", fake_run)
    monkeypatch.setattr(compare.sweep, "plot_results", lambda rows, path: path)
    with pytest.warns(compare.ResultsWarning) as caught:
        rows = compare.run_sweep(configs, tmp_path, progress=False)
    messages = "\n".join(str(w.message) for w in caught)
    for number in (1, 3, 4, 5):
        assert f"{path}:{number}: " in messages
    assert f"{path}:2: " not in messages
    assert "1: no key, composition, norm_batch, seed, error_precise fields" in messages
    assert "5: a second row for the run recorded at line 2" in messages
    assert trained == [configs[1].key]  # the finished run was skipped, the other trained
    assert sorted(row["key"] for row in rows) == sorted(c.key for c in configs)
    assert _keys(path) == [configs[0].key, configs[1].key]
    # nothing lost: every damaged line is kept verbatim
    assert (tmp_path / "results.jsonl.damaged").read_text().splitlines() == damaged
    assert "mean ± std over 2 seed(s)" in (tmp_path / "results.md").read_text()


def test_reading_warns_about_a_damaged_line_in_the_middle(tmp_path):
    path = tmp_path / "results.jsonl"
    good = [_row("bn", 2, "iid", seed, 0.5) for seed in (0, 1)]
    path.write_text(json.dumps(good[0]) + "\n{not json\n" + json.dumps(good[1]) + "\n")
    with pytest.warns(compare.ResultsWarning, match=rf"{path}:2: not JSON"):
        assert [row["seed"] for row in compare.read_results(path)] == [0, 1]
    with pytest.warns(compare.ResultsWarning, match=rf"{path}:2: .*moved verbatim"):
        _append_result(path, _row("bn", 2, "iid", 2, 0.5))  # moved, not deleted
    assert (tmp_path / "results.jsonl.damaged").read_text() == "{not json\n"
    assert [row["seed"] for row in compare.read_results(path)] == [0, 1, 2]


# -- checkpoints that do not fit their run (issue 18) ------------------------------------------

TINY = {"dataset": "digits", "epochs": 1.0, "precise_samples": 32, "train_samples": 128}


class _Stopped(Exception):
    pass


def _interrupted_after_training(config, checkpoint, monkeypatch):
    """Train ``config`` with a checkpoint every step and stop it as evaluation begins, as a
    kill would: the checkpoint of its last saved step is left."""

    def stop(*args, **kwargs):
        raise _Stopped

    with monkeypatch.context() as patch:
        patch.setattr(compare.training, "evaluate", stop)
        with pytest.raises(_Stopped):
            compare.run_one(
                config,
                data.load_digits(),
                checkpoint,
                device=torch.device("cpu"),
                checkpoint_every=1,
                progress=False,
            )
    assert checkpoint.exists()


def test_a_checkpoint_past_the_end_of_its_run_is_an_error(tmp_path, monkeypatch):
    config = compare.RunConfig("bn", 2, "iid", 0, **TINY)
    checkpoint = tmp_path / f"{config.tag}.pt"
    _interrupted_after_training(config, checkpoint, monkeypatch)
    state = torch.load(checkpoint, weights_only=False)
    state["step"] = 1000
    torch.save(state, checkpoint)
    with pytest.raises(
        compare.CheckpointError, match=f"{checkpoint}: .*step 1000.*delete the file"
    ):
        compare.run_one(config, data.load_digits(), checkpoint, device=torch.device("cpu"))


def test_a_checkpoint_of_another_run_is_an_error(tmp_path, monkeypatch):
    config = compare.RunConfig("bn", 2, "iid", 0, **TINY)
    other = compare.RunConfig("bn", 2, "iid", 1, **TINY)  # the same model, another seed
    checkpoint = tmp_path / f"{other.tag}.pt"
    _interrupted_after_training(config, checkpoint, monkeypatch)
    with pytest.raises(
        compare.CheckpointError, match=f"{checkpoint}: .*another run: seed=0 .*delete the file"
    ):
        compare.run_one(other, data.load_digits(), checkpoint, device=torch.device("cpu"))


def test_a_run_stopped_after_training_resumes_without_training_and_gives_the_same_row(
    tmp_path, monkeypatch
):
    config = compare.RunConfig("bn", 2, "iid", 0, **TINY)
    fresh = compare.run_one(
        config,
        data.load_digits(),
        tmp_path / "fresh.pt",
        device=torch.device("cpu"),
        progress=False,
    )
    checkpoint = tmp_path / f"{config.tag}.pt"
    _interrupted_after_training(config, checkpoint, monkeypatch)
    steps = []
    loss = compare.training.F.cross_entropy
    monkeypatch.setattr(
        compare.training.F, "cross_entropy", lambda *a, **k: steps.append(1) or loss(*a, **k)
    )
    resumed = compare.run_one(
        config, data.load_digits(), checkpoint, device=torch.device("cpu"), progress=False
    )
    assert not steps  # every step was done: nothing trained again
    for field in ("steps", "error_ema", "error_precise", "final_loss"):
        assert resumed[field] == fresh[field], field


@pytest.mark.parametrize(("field", "value"), [("lr", 0.0), ("lr", float("nan")), ("epochs", -1.0)])
def test_a_run_that_would_train_nothing_is_rejected(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite number above 0"):
        compare.RunConfig("bn", 2, "iid", 0, **{field: value}).check()


def test_shuffle_bn_normalizes_groups_of_b_drawn_from_the_shuffled_batch():
    config = compare.RunConfig("shufflebn", 2, "correlated", 0)
    layer = _norm_factory(config, sgd_steps=10)(8)
    assert isinstance(layer, smallbn.ShuffleBatchNorm) and layer.norm_batch_size == 2
    whole = _norm_factory(compare.RunConfig("shufflebn", 32, "correlated", 0), 10)(8)
    assert whole.norm_batch_size is None  # one group of the whole batch: BN


def test_shuffle_bn_steps_travel_with_the_checkpoint_and_their_absence_is_said():
    import smallbn

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), smallbn.ShuffleBatchNorm2d(4))
    model[1].shuffle_step = 7
    state = _host_state(model)
    assert state == {"1": 7}
    fresh = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), smallbn.ShuffleBatchNorm2d(4))
    _load_host_state(fresh, state)
    assert fresh[1].shuffle_step == 7
    with pytest.warns(RuntimeWarning, match="from step 0 again.*'1'|'1'.*from step 0 again"):
        _load_host_state(fresh, None)  # a checkpoint written before steps were kept
    two = torch.nn.Sequential(smallbn.ShuffleBatchNorm2d(4), smallbn.ShuffleBatchNorm2d(4))
    with pytest.warns(RuntimeWarning, match="1 layer.*'1'.*from step 0 again"):
        _load_host_state(two, {"0": 3})  # a layer the checkpoint lacks is named, not skipped
    assert (two[0].shuffle_step, two[1].shuffle_step) == (3, 0)
