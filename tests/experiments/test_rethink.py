"""``smallbn rethink``: every study on tiny settings (the smoke preset on the digits), rows,
reports and plots; resuming (a finished run is skipped, an interrupted one ends with the row
an uninterrupted run gives); two invocations sharing a folder train each run once; the
verdicts follow the numbers; the command line documents every option's default."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from smallbn import cli
from smallbn.experiments import compare, rethink
from smallbn.experiments.data import OptionError, load_digits
from smallbn.experiments.models import SmallResNet
from smallbn.experiments.rethink import running
from smallbn.experiments.rethink.checkpoint import _Checkpoint
from smallbn.experiments.rethink.domain import _domain_variant
from smallbn.experiments.rethink.ema import _EmaShadows
from smallbn.experiments.rethink.evaluation import _error_batch_stats
from smallbn.experiments.rethink.images import _pixel_range
from smallbn.experiments.rethink.leakage import _leakage_run_config

#: The smoke preset on the digits, smaller still where it costs.
TINY = {"dataset": "digits", "eval_samples": 96}
#: Fields of a row that measure the machine, not the run.
TIMING = {"train_seconds", "train_cpu_seconds", "cpu_seconds"}


def _tiny(studies=rethink.STUDIES, **overrides):
    return rethink.plan(studies, "smoke", **{**TINY, **overrides})


def _same(row, recorded):
    """Whether ``row`` (as run_one returns it) is the ``recorded`` row (read back from JSON),
    timings aside."""
    row = json.loads(json.dumps(row))
    return {k: v for k, v in row.items() if k not in TIMING} == {
        k: v for k, v in recorded.items() if k not in TIMING
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Every study of the tiny plan, run once in one folder."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("rethink")
    results = rethink.run_studies(_tiny(), out, progress=False, jobs=1)
    return out, results


# -- rows, reports, plots ------------------------------------------------------------------------


def test_every_study_records_rows_with_its_fields(finished):
    out, results = finished
    assert set(results) == set(rethink.STUDIES)
    configs = _tiny()
    assert sum(len(rows) for rows in results.values()) == len(configs)
    for study, rows in results.items():
        for row in rows:
            assert set(rethink.ROW_FIELDS[study]) <= set(row)
            assert row["dataset"] == "digits" and row["steps"] > 0 and row["train_seconds"] > 0
    (ema,) = results["ema"]
    assert len(ema["error_ema"]) == len(ema["error_precise"]) == ema["epochs"] == 2
    assert set(ema["error_momentum"]) == {"0.1", "0.3"}
    assert ema["error_momentum"]["0.1"] == ema["error_ema"]  # BN's own EMA is the 0.1 shadow
    assert {k: len(v) for k, v in ema["precise_sample_sweep"].items()} == {"16": 2, "64": 2}
    inconsistency = {row["norm_batch"]: row for row in results["inconsistency"]}
    assert set(inconsistency) == {2, 32}
    for row in inconsistency.values():
        for name in ("error_ema", "error_precise", "error_batch_stats", "error_frozen"):
            assert 0 <= row[name] <= 1
    domain = {_domain_variant(row): row for row in results["domain"]}
    assert set(domain) == {"shift", "shared", "specific", "shared+affine", "specific+affine"}
    assert set(domain["shift"]["errors"]) == {"original/source"} | {
        f"{s}/{m}" for s in ("invert", "contrast") for m in ("source", "target", "batch_stats")
    }
    for variant in ("shared", "specific", "shared+affine", "specific+affine"):
        assert set(domain[variant]["errors"]) == {
            f"{p}/{d}" for p in ("shared", "specific") for d in ("original", "shifted")
        }
    leakage = {row["variant"]: row for row in results["leakage"]}
    assert set(leakage) == set(rethink.LEAKAGE_VARIANTS)
    assert {v: row["norm_batch"] for v, row in leakage.items()} == {
        "per-device": 2,
        "ghost": 2 * rethink.GHOST_DEVICES,
        "shuffle": 2,
        "sync": 32,
    }
    assert leakage["shuffle"]["method"] == "shufflebn" and leakage["sync"]["method"] == "bn"
    for row in leakage.values():
        assert row["world_size"] == 1 and row["device_batch"] == 2 and not row["sync"]
        assert 0 <= row["error_ema"] <= 1 and 0 <= row["error_precise"] <= 1


def test_reports_and_plots_are_written(finished):
    out, results = finished
    for study in rethink.STUDIES:
        folder = out / study
        text = (folder / "results.md").read_text()
        assert "| the paper found | this run | reproduced |" in text
        assert (folder / f"{study}.png").stat().st_size > 5000
        assert len(
            compare.read_results(folder / "results.jsonl", rethink.ROW_FIELDS[study])
        ) == len(results[study])
        assert not list((folder / "checkpoints").iterdir())  # no checkpoint or claim left


def test_a_rerun_skips_finished_runs(finished, monkeypatch):
    out, results = finished

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(running, "run_one", no_training)
    again = rethink.run_studies(_tiny(), out, progress=False, jobs=1)
    assert again == results


# -- resuming ------------------------------------------------------------------------------------


class _Killed(BaseException):
    """Stands for a kill right after a checkpoint was written."""


@pytest.mark.parametrize(
    ("study", "variant", "after"),
    [
        ("ema", "bn", 2),  # mid-epoch: the momenta's EMAs must resume as they were
        ("ema", "bn", 8),  # after the last step, before the sample sweep
        ("inconsistency", "b2", 3),  # before the weights for FrozenBN are kept
        ("inconsistency", "b2", 6),  # after: the kept weights come from the checkpoint
        ("inconsistency", "b2", 9),  # between the stages
        ("inconsistency", "b2", 11),  # in the FrozenBN stage
        ("domain", "specific", 2),
    ],
)
def test_an_interrupted_run_resumes_to_the_row_of_an_uninterrupted_one(
    finished, tmp_path, monkeypatch, capsys, study, variant, after
):
    out, results = finished
    (config,) = [c for c in _tiny((study,)) if c.variant == variant and not c.domain_affine]
    (expected,) = [row for row in results[study] if row["key"] == config.key]
    checkpoint = tmp_path / "run.pt"
    saves = []
    save = _Checkpoint.save

    def save_then_die(self, state):
        save(self, state)
        saves.append(state["step"])
        if len(saves) == after:
            raise _Killed

    monkeypatch.setattr(_Checkpoint, "save", save_then_die)
    with pytest.raises(_Killed):
        rethink.run_one(config, load_digits(), checkpoint, checkpoint_every=1, progress=False)
    monkeypatch.setattr(_Checkpoint, "save", save)
    row = rethink.run_one(config, load_digits(), checkpoint, checkpoint_every=1, progress=False)
    assert (
        f"resuming {config.tag} from its checkpoint at step {saves[-1]}" in capsys.readouterr().err
    )
    assert _same(row, expected)


@pytest.mark.parametrize("variant", ["shuffle", "per-device"])
def test_an_interrupted_leakage_run_resumes_to_the_row_of_an_uninterrupted_one(
    finished, tmp_path, monkeypatch, capsys, variant
):
    # Shuffle BN's permutations resume where they were (its step counter is checkpointed)
    out, results = finished
    (config,) = [c for c in _tiny(("leakage",)) if c.variant == variant]
    (expected,) = [row for row in results["leakage"] if row["key"] == config.key]
    checkpoint = tmp_path / "run.pt"
    saves = []
    save = compare._save_checkpoint

    def save_then_die(state, path):
        save(state, path)
        saves.append(state["step"])
        if len(saves) == 3:
            raise _Killed

    monkeypatch.setattr(compare.training, "_save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        rethink.run_one(config, load_digits(), checkpoint, checkpoint_every=2, progress=False)
    monkeypatch.setattr(compare.training, "_save_checkpoint", save)
    row = rethink.run_one(config, load_digits(), checkpoint, checkpoint_every=2, progress=False)
    assert f"from its checkpoint at step {saves[-1]} of" in capsys.readouterr().err
    assert _same(row, expected)


def test_leakage_rules():
    (config,) = [c for c in _tiny(("leakage",)) if c.variant == "ghost"]
    with pytest.raises(ValueError, match="normalizes 8 samples, not norm_batch=4"):
        dataclasses.replace(config, norm_batch=4).check()
    with pytest.raises(ValueError, match="must divide the SGD batch"):
        dataclasses.replace(config, device_batch=3).check()
    with pytest.raises(ValueError, match="only the leakage study runs"):
        rethink.plan(["domain"], "smoke", world_size=2)
    two = {c.variant: c for c in rethink.plan(["leakage"], "smoke", world_size=2)}
    run = _leakage_run_config
    assert run(two["sync"]).sync and not run(two["shuffle"]).sync
    assert {c.world_size for c in two.values()} == {2} and "-w2-" in two["sync"].tag
    # a single process's keys leave out the settings added after results were recorded
    (domain, *_) = rethink.plan(["domain"], "smoke")
    assert not {"world_size", "device_batch", "domain_affine"} & set(json.loads(domain.key))
    with pytest.raises(ValueError, match="planned for 2 process"):
        rethink.run_studies(list(two.values()), Path("unused"), progress=False)


@pytest.mark.distributed
def test_leakage_under_torchrun_with_two_gloo_processes(finished, tmp_path):
    """The 2-process variant: Shuffle BN exchanges samples and SyncBN statistics across the
    processes; every process trains half of each batch (whole devices)."""
    out = tmp_path / "two"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "smallbn",
        "rethink", "--study", "leakage", "--preset", "smoke", "--dataset", "digits",
        "--eval-samples", str(TINY["eval_samples"]), "--jobs", "1", "--threads", "1",
        "--output-dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["variant"]: row for row in rethink.read_study(out, "leakage")}
    assert set(rows) == set(rethink.LEAKAGE_VARIANTS)
    assert all(row["world_size"] == 2 for row in rows.values())
    assert rows["sync"]["sync"] and rows["sync"]["norm_batch"] == 32
    assert "2 processes under torchrun" in (out / "leakage" / "results.md").read_text()
    assert done.stdout.count("**Information leakage**") == 1  # rank 0 reports, once
    # the same training as one process, up to the order of floating-point sums
    single = {row["variant"]: row for row in finished[1]["leakage"]}
    for variant in ("per-device", "ghost"):
        assert abs(rows[variant]["error_precise"] - single[variant]["error_precise"]) < 0.15


def test_a_checkpoint_of_another_run_is_an_error(tmp_path):
    first, second = _tiny(("domain",))[:2]
    checkpoint = tmp_path / "run.pt"
    total = 4
    _Checkpoint(checkpoint, first, total).save({"step": 1, "stage": "train"})
    with pytest.raises(compare.CheckpointError, match="written for another run.*delete the file"):
        _Checkpoint(checkpoint, second, total).load(("train",))


def test_damaged_lines_are_set_aside_and_the_rows_kept(finished, tmp_path):
    out, results = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    path = copy / "domain" / "results.jsonl"
    with open(path, "a") as handle:
        handle.write('{"key": "half a line\n')
    with pytest.warns(compare.ResultsWarning, match="moved verbatim"):
        again = rethink.run_studies(_tiny(("domain",)), copy, progress=False, jobs=1)
    assert again["domain"] == results["domain"]
    assert '{"key": "half a line' in (copy / "domain" / "results.jsonl.damaged").read_text()


# -- concurrent invocations ----------------------------------------------------------------------


def test_two_invocations_started_together_train_each_run_once(tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "smallbn", "rethink", "--study", "domain", "--preset", "smoke",
        "--dataset", "digits", "--shifts", "invert", "--eval-samples", "64",
        "--precise-samples", "32", "--jobs", "1", "--threads", "1", "--output-dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    errors = [process.communicate(timeout=600)[1].decode() for process in processes]
    assert [process.returncode for process in processes] == [0, 0], errors
    lines = (out / "domain" / "results.jsonl").read_text().splitlines()
    keys = [json.loads(line)["key"] for line in lines if line.strip()]
    assert len(keys) == len(set(keys)) == 5  # shift, shared/specific × two affines: once each
    assert not list((out / "domain" / "checkpoints").iterdir())


def _domain_command(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "smallbn", "rethink", "--study", "domain", "--preset", "smoke",
        "--dataset", "digits", "--shifts", "invert", "--eval-samples", "64",
        "--precise-samples", "32", "--jobs", "1", "--threads", "1", "--output-dir", str(out),
        *extra,
    ]  # fmt: skip


def test_sigkill_mid_run_then_rerun_gives_exactly_one_row_per_run_and_loses_nothing(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out, extra = tmp_path / "killed", ("--checkpoint-every", "2")
    process = subprocess.Popen(
        _domain_command(out, *extra), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = out / "domain" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(checkpoints.glob("*.pt")):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list(checkpoints.glob("*.pt")), "no checkpoint was written before the kill"
    subprocess.run(_domain_command(out, *extra), env=env, check=True, capture_output=True)
    lines = (out / "domain" / "results.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)) == 5  # shift, shared/specific × two affines: once each
    fresh = tmp_path / "fresh"
    subprocess.run(_domain_command(fresh, *extra), env=env, check=True, capture_output=True)
    uninterrupted = {
        row["key"]: row
        for row in map(json.loads, (fresh / "domain" / "results.jsonl").read_text().splitlines())
    }
    for row in rows:  # the resumed run measured what an uninterrupted one measures
        assert row["errors"] == uninterrupted[row["key"]]["errors"]


# -- verdicts ------------------------------------------------------------------------------------


def _ema_row(ema, precise, sweep, seed=0, momenta=None):
    return {
        "seed": seed,
        "error_ema": ema,
        "error_precise": precise,
        "error_momentum": {"0.1": ema, **(momenta or {})},
        "precise_sample_sweep": sweep,
    }


def _verdicts(study, rows):
    return [finding.reproduced for finding in rethink.findings(study, rows)]


def test_ema_verdicts_follow_the_numbers():
    sweep = {"32": [0.2, 0.22], "1024": [0.102, 0.101], "8192": [0.1, 0.1]}
    slow = {"0.01": [0.5, 0.4, 0.3, 0.3]}
    unstable = _ema_row([0.3, 0.1, 0.3, 0.12], [0.11, 0.1, 0.11, 0.1], sweep, momenta=slow)
    assert _verdicts("ema", [unstable]) == [True, True, True, True, True]
    # the EMA steady and better, PreciseBN needing more samples, the slow EMA best
    sweep = {"32": [0.1, 0.1], "1024": [0.2, 0.2], "8192": [0.1, 0.1]}
    slow = {"0.01": [0.05, 0.05, 0.05, 0.05]}
    steady = _ema_row([0.1, 0.1, 0.1, 0.1], [0.2, 0.1, 0.2, 0.1], sweep, momenta=slow)
    assert _verdicts("ema", [steady]) == [False, False, False, False, False]
    # means over seeds decide: one unstable seed and one steady one
    mixed = [
        _ema_row([0.3, 0.1, 0.3, 0.1], [0.1, 0.1, 0.1, 0.1], {}, seed=0),
        _ema_row([0.1, 0.1, 0.1, 0.1], [0.3, 0.1, 0.3, 0.1], {}, seed=1),
    ]
    first, second = rethink.findings("ema", mixed)[:2]
    assert first.reproduced is False and first.tie  # equal spread is not "more unstable"
    assert second.reproduced is False and second.tie  # equal means are not "lower"


def _inconsistency_rows(cells):
    return [
        {"norm_batch": b, "seed": 0, **{f"error_{k}": v for k, v in values.items()}}
        for b, values in cells.items()
    ]


def test_inconsistency_verdicts_follow_the_numbers():
    paper = {
        2: {"ema": 0.4, "precise": 0.3, "batch_stats": 0.2, "frozen": 0.25},
        32: {"ema": 0.1, "precise": 0.1, "batch_stats": 0.12, "frozen": 0.1},
    }
    assert _verdicts("inconsistency", _inconsistency_rows(paper)) == [True, True, True, True]
    other = {
        2: {"ema": 0.4, "precise": 0.2, "batch_stats": 0.3, "frozen": 0.25},
        32: {"ema": 0.1, "precise": 0.12, "batch_stats": 0.1, "frozen": 0.1},
    }
    assert _verdicts("inconsistency", _inconsistency_rows(other)) == [False, False, False, False]
    # only one remedy helps: the "both narrow the gap" finding is not reproduced
    one = {**paper, 2: {**paper[2], "frozen": 0.35}}
    assert _verdicts("inconsistency", _inconsistency_rows(one)) == [True, False, False, True]
    # population within the tolerance of batch statistics at the large batch counts as "as good"
    close = {**paper, 32: {**paper[32], "precise": 0.123, "batch_stats": 0.12}}
    assert _verdicts("inconsistency", _inconsistency_rows(close))[3] is True
    # a remedy better by less than the tolerance is a tie: no effect, not reproduced
    tie = {**paper, 2: {**paper[2], "batch_stats": 0.298, "frozen": 0.31}}
    first, second = rethink.findings("inconsistency", _inconsistency_rows(tie))[:2]
    assert (first.reproduced, first.tie, second.reproduced, second.tie) == (
        False,
        True,
        False,
        False,
    )


def test_domain_verdicts_follow_the_numbers():
    shift = {
        "variant": "shift",
        "seed": 0,
        "errors": {
            "original/source": 0.1,
            "invert/source": 0.8,
            "invert/target": 0.5,
            "invert/batch_stats": 0.5,
            "noise/source": 0.3,
            "noise/target": 0.4,
            "noise/batch_stats": 0.4,
        },
    }

    def trained(variant, same, cross):
        errors = {}
        for population in ("shared", "specific"):
            value = same if population == variant else cross
            errors.update({f"{population}/original": value, f"{population}/shifted": value})
        return {"variant": variant, "seed": 0, "errors": errors}

    rows = [shift, trained("shared", 0.2, 0.3), trained("specific", 0.15, 0.4)]
    findings = {
        f.paper.split("(")[-1].rstrip(")"): f.reproduced for f in rethink.findings("domain", rows)
    }
    assert findings["invert"] is True and findings["noise"] is False
    assert _verdicts("domain", rows)[2:] == [True, True, True]
    rows = [trained("shared", 0.3, 0.2), trained("specific", 0.25, 0.4)]
    assert _verdicts("domain", rows) == [False, True, False]  # best: train shared, test specific

    def own_affine(variant, same, cross):
        return {**trained(variant, same, cross), "domain_affine": True}

    shared_affine = [trained("shared", 0.2, 0.3), trained("specific", 0.15, 0.4)]
    close = [own_affine("shared", 0.203, 0.6), own_affine("specific", 0.153, 0.2)]
    found = rethink.findings("domain", shared_affine + close)
    (claim,) = [f for f in found if "affine" in f.paper]
    assert claim.reproduced and "per-domain affine 15.30%, shared 15.00%" in claim.measured
    # the affine rows are not mixed into the shared-affine grid
    assert [f.reproduced for f in found if "affine" not in f.paper] == [True, True, True]
    apart = [own_affine("shared", 0.203, 0.6), own_affine("specific", 0.16, 0.2)]
    (claim,) = [f for f in rethink.findings("domain", shared_affine + apart) if "affine" in f.paper]
    assert claim.reproduced is False  # 1 point apart


def _leakage_rows(errors, world=1):
    return [
        {"variant": v, "seed": seed, "world_size": world, "error_precise": e, "error_ema": e}
        for v, values in errors.items()
        for seed, e in enumerate(values)
    ]


def test_leakage_verdicts_follow_the_numbers():
    rows = _leakage_rows(
        {"per-device": [0.6, 0.7], "ghost": [0.3], "shuffle": [0.16, 0.17], "sync": [0.16]}
    )
    assert _verdicts("leakage", rows) == [True, True, True]  # shuffle within 0.5 of sync
    (_, _, gap) = rethink.findings("leakage", rows)
    assert "99% of the gap" in gap.measured
    rows = _leakage_rows({"per-device": [0.6], "shuffle": [0.597], "sync": [0.2]}, world=2)
    assert _verdicts("leakage", rows) == [True, False, False]  # shuffling did nothing
    assert "2 processes" in rethink.findings("leakage", rows)[0].paper


def test_the_report_states_the_verdicts_it_computes():
    rows = _inconsistency_rows(
        {
            2: {"ema": 0.4, "precise": 0.3, "batch_stats": 0.2, "frozen": 0.35},
            32: {"ema": 0.1, "precise": 0.1, "batch_stats": 0.12, "frozen": 0.1},
        }
    )
    for row in rows:
        row.update(
            dataset="digits", train_samples_used=128, epochs=2, sgd_batch=32, lr=0.2,
            schedule="cosine", warmup=0.02, widths=[16, 32, 64], precise_samples=64,
            eval_samples=96, frozen_epochs=1,
        )  # fmt: skip
    text = rethink.format_report("inconsistency", rows)
    table = text.split("| the paper found | this run | reproduced |")[1].strip().splitlines()[1:]
    assert [line.rsplit("|", 2)[1].strip() for line in table] == ["yes", "**no**", "**no**", "yes"]
    rows[0]["error_frozen"] = 0.298  # better than population by less than the tolerance
    text = rethink.format_report("inconsistency", rows)
    assert "| **no** (a tie, within 0.5 points) |" in text


# -- pieces --------------------------------------------------------------------------------------


def test_shifts_on_the_pixel_scale():
    data = load_digits()
    bounds = _pixel_range(data)
    x = data.test_x[:16]
    back = rethink.shift_images(rethink.shift_images(x, "invert", bounds), "invert", bounds)
    assert torch.allclose(back, x, atol=1e-5)
    low = rethink.shift_images(x, "contrast", bounds)
    assert low.min() >= bounds[0] + 0.3 * (bounds[1] - bounds[0]) - 1e-5
    assert low.max() <= bounds[0] + 0.7 * (bounds[1] - bounds[0]) + 1e-5
    noisy = rethink.shift_images(x, "noise", bounds, seed=1)
    assert torch.equal(noisy, rethink.shift_images(x, "noise", bounds, seed=1))
    assert bounds[0] - 1e-5 <= float(noisy.min()) and float(noisy.max()) <= bounds[1] + 1e-5
    with pytest.raises(ValueError, match="unknown shift"):
        rethink.shift_images(x, "blur", bounds)


def test_ema_shadows_match_bn_running_statistics():
    torch.manual_seed(0)
    model = SmallResNet(10, 1, (8, 16), 1)
    shadows = _EmaShadows(model, (0.1, 0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = model(torch.randn(8, 1, 8, 8)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():  # evaluation passes move nothing
        model(torch.randn(8, 1, 8, 8))
    model.train()
    layers = dict(model.named_modules())
    for name, (mean, var) in shadows.stats[0.1].items():
        assert torch.allclose(mean, layers[name].running_mean, atol=1e-6)
        assert torch.allclose(var, layers[name].running_var, atol=1e-5)
    before = shadows.state()
    with torch.no_grad():  # a PreciseBN pass (training mode, no gradients) moves no shadow
        model(torch.randn(8, 1, 8, 8))
    assert all(
        torch.equal(a, b)
        for m in before
        for name in before[m]
        for a, b in zip(before[m][name], shadows.state()[m][name], strict=True)
    )
    clone = shadows.model_with(model, 0.5)
    assert torch.equal(clone.stem_norm.running_mean, shadows.stats[0.5]["stem_norm"][0])
    assert not torch.equal(clone.stem_norm.running_mean, model.stem_norm.running_mean)


def test_plan_settings_and_rules():
    configs = rethink.plan(rethink.STUDIES, "default")
    # seeds 0, 1: ema, 4 batch sizes, 5 domain runs, 4 leakage variants
    assert len(configs) == 2 * (1 + 4 + 5 + 4)
    ema = [c for c in configs if c.study == "ema"][0]
    assert ema.sgd_batch == ema.norm_batch == 256 and ema.schedule == "constant"
    (ema,) = rethink.plan(["ema"], seeds=[3, 3], momenta=(0.5,), epochs=2)
    assert ema.seed == 3 and ema.momenta == (0.1, 0.5) and ema.epochs == 2
    with pytest.raises(ValueError, match="frozen_epochs < epochs"):
        rethink.plan(["inconsistency"], epochs=2, frozen_epochs=2)
    with pytest.raises(ValueError, match="does not divide the SGD batch"):
        rethink.plan(["inconsistency"], batch_sizes=(3,))
    with pytest.raises(ValueError, match="unknown study"):
        rethink.plan(["bogus"])


def test_a_setting_of_a_study_that_does_not_run_is_refused(tmp_path, capsys):
    """``--lr`` with ``--study ema`` (whose learning rate is ``--ema-lr``) changed nothing and
    said nothing: the runs were not those asked for."""
    with pytest.raises(ValueError, match="--lr sets the inconsistency, domain, leakage studies"):
        rethink.plan(["ema"], "smoke", lr=0.3)
    with pytest.raises(ValueError, match="--momenta sets the ema study only.*--study domain"):
        rethink.plan(["domain"], "smoke", momenta=(0.2,))
    # every setting of the studies that run is taken; those of every study always are
    both = rethink.plan(["ema", "domain"], "smoke", lr=0.3)
    assert {c.lr for c in both if c.study == "domain"} == {0.3}
    assert rethink.plan(["leakage"], "smoke", epochs=2, dataset="digits")
    with pytest.raises(SystemExit) as exit_code:
        cli.main(["rethink", "--study", "ema", "--lr", "0.3", "--output-dir", str(tmp_path)])
    assert exit_code.value.code == 2
    assert "--lr sets the inconsistency, domain, leakage studies only" in capsys.readouterr().err


def test_the_committed_results_are_those_of_the_default_run(tmp_path, monkeypatch):
    """docs/rethink_<study>.jsonl hold exactly the rows of ``smallbn rethink`` with no options
    (a single process; the leakage study also has the 2-process torchrun variant's rows)."""
    from smallbn.experiments import data

    monkeypatch.setattr(compare, "DEFAULT_FASHION_MNIST", tmp_path)  # stands in for Debian's
    monkeypatch.setattr(data, "DEFAULT_FASHION_MNIST", tmp_path)
    docs = Path(__file__).resolve().parents[2] / "docs"
    for study in rethink.STUDIES:
        planned = {c.key for c in compare.bind_data(rethink.plan([study]), None)}
        rows = compare.read_results(docs / f"rethink_{study}.jsonl", rethink.ROW_FIELDS[study])
        single = {row["key"] for row in rows if row.get("world_size", 1) == 1}
        assert single == planned, study
        assert len(rows) == len({row["key"] for row in rows})
        report = (docs / f"rethink_{study}.md").read_text().strip()
        assert report == rethink.format_report(study, rows).strip(), study


# -- command line --------------------------------------------------------------------------------


def _rethink_parser():
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return commands.choices["rethink"]


def test_help_lists_every_option_with_its_default(capsys):
    options = [a for a in _rethink_parser()._actions if a.option_strings != ["-h", "--help"]]
    assert len(options) >= 20
    for action in options:
        assert action.help and "(default: " in action.help, action.option_strings
    with pytest.raises(SystemExit) as exit_code:
        cli.main(["rethink", "--help"])
    assert exit_code.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for action in options:
        assert action.option_strings[0] in text
    assert text.count("(default: ") == len(options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--epochs", "2", "--frozen-epochs", "2", "--study", "inconsistency"], "frozen_epochs"),
        (["--batch-sizes", "3", "--study", "inconsistency"], "does not divide"),
        (["--shifts", "blur"], "unknown shift"),
        (["--momenta", "0,0.1"], "above 0"),
    ],
)
def test_cli_usage_errors(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as exit_code:
        cli.main(["rethink", "--output-dir", str(tmp_path), *options])
    assert exit_code.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_under_torchrun_runs_the_leakage_study_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before any setup
    with pytest.raises(SystemExit) as exit_code:
        cli.main(["rethink", "--study", "ema", "--output-dir", str(tmp_path)])
    assert exit_code.value.code == 2
    assert "only --study leakage runs" in capsys.readouterr().err


def test_cli_runs_a_study_and_prints_its_report(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main(
            [
                "rethink", "--study", "domain", "--preset", "smoke", "--dataset", "digits",
                "--shifts", "contrast", "--eval-samples", "64", "--precise-samples", "32",
                "--jobs", "1", "--threads", "1", "--output-dir", str(tmp_path),
            ]
        )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "Domain shift" in out and "| the paper found | this run | reproduced |" in out
    assert (tmp_path / "domain" / "domain.png").exists()
    assert Path(tmp_path / "domain" / "results.md").read_text().strip() in out


def test_cli_refuses_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_code:
        cli.main(["rethink", "--preset", "smoke", "--output-dir", str(blocker / "out")])
    assert exit_code.value.code == 2
    assert f"{blocker} is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_code:  # no SGD batch of 64 in 32 images
        cli.main(
            [
                "rethink", "--study", "ema", "--preset", "smoke", "--dataset", "digits",
                "--train-samples", "32", "--output-dir", str(tmp_path / "out"),
            ]
        )  # fmt: skip
    assert exit_code.value.code == 2
    assert "argument --train-samples: the 32 training samples" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_full_is_the_long_preset(tmp_path, monkeypatch):
    asked: list[str] = []

    def plan(studies, preset, **options):  # type: ignore[no-untyped-def]
        asked.append(preset)
        raise OptionError("--preset", "stop here")  # a usage error: no work is done

    monkeypatch.setattr(rethink, "plan", plan)
    with pytest.raises(SystemExit):
        cli.main(["rethink", "--full", "--output-dir", str(tmp_path / "out")])
    assert asked == ["long"]


def _group_by_group_error(model, x, y, group, seed):
    """The batch-statistics error by its definition: each random group of ``group`` test
    images through the model alone, every norm in training mode updating nothing."""
    n = len(x)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(10_007 + seed))
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
    with torch.no_grad():
        wrong = 0
        for i in range(0, n, group):
            idx = order[i : i + group]
            wrong += int((model(x[idx]).argmax(1) != y[idx]).sum())
    return wrong / n


def test_batch_stats_error_normalizes_every_layer_over_one_group():
    """Ghost BN in groups of 2 next to a BN over its whole batch: each forward must hold one
    group, where sending 64 groups at once (as for Ghost BN alone) normalized the BN over
    128 images; a Ghost BN splitting into another group size is refused, naming it."""
    from smallbn.layers import BatchRenorm2d, GhostBatchNorm2d

    assert BatchRenorm2d(4, norm_batch_size=2).normalization_batch() == 2
    assert BatchRenorm2d(4).normalization_batch() is None
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        GhostBatchNorm2d(4, group_size=2),
        torch.nn.Conv2d(4, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.LazyLinear(3),
    )
    x, y = torch.randn(40, 1, 7, 7), torch.randint(0, 3, (40,))
    model(x[:2])
    expected = _group_by_group_error(copy.deepcopy(model), x, y, group=2, seed=0)
    got = _error_batch_stats(model, x, y, 2, 0, torch.device("cpu"))
    assert got == expected
    with pytest.raises(ValueError, match=r"'1': 4"):
        _error_batch_stats(
            torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), GhostBatchNorm2d(4, group_size=4)),
            x, y, 2, 0, torch.device("cpu"),
        )
