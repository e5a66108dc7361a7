"""The GPU check script's own logic, on CPU (the CUDA parts run where a GPU is)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_its_tests_exist(gpu_check) -> None:  # type: ignore[no-untyped-def]
    root = _PATH.parents[1]
    assert all((root / test).is_file() for test in gpu_check.TESTS)


def test_a_part_reports_status_time_and_deadline(gpu_check, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ok = gpu_check._run([sys.executable, "-c", "print('fine')"], 30, tmp_path / "ok.log")
    assert ok["status"] == 0 and ok["last_line"] == "fine"
    slow = gpu_check._run(
        [sys.executable, "-c", "import time; time.sleep(5)"], 0.5, tmp_path / "slow.log"
    )
    assert slow["status"] == "timed out"
    assert "timed out" in (tmp_path / "slow.log").read_text()


def test_the_report_names_errors_and_ratios(gpu_check) -> None:  # type: ignore[no-untyped-def]
    report = {
        "device": "GPU",
        "torch": torch.__version__,
        "parts": {"tests": {"status": 0, "seconds": 1.0, "last_line": "3 passed"}},
        "resnet50": {
            "bn": {"images_per_s": 100.0, "peak_mib": 50.0, "speed_vs_bn": 1.0},
            "sn compiled": {"error": "RuntimeError: x"},
        },
    }
    text = gpu_check._markdown(report)
    assert "| sn compiled | RuntimeError: x |" in text and "| bn | 100.0 | 1.0 |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_without_a_gpu_it_refuses(tmp_path: Path) -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, str(_PATH), "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode != 0 and "no CUDA device" in done.stderr
