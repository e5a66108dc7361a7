"""The GPU check (``make gpu-check``): everything smallbn must show on one CUDA GPU, in one run.

1. The CUDA tests: the device-parametrised suite (every method and tool on CUDA against
   float64 on CPU, autocast, half models, no device synchronization in a training step,
   NCCL where two GPUs exist), host reads, torch.compile and export.
2. ``smallbn bench layers --device cuda`` and ``smallbn bench network --device cuda``.
3. A torchvision ResNet-50 training step at batch 2 for every method, eager and compiled:
   images per second and peak memory, each as a ratio to BN measured in the same run.
4. ``smallbn rethink --preset smoke --device cuda``: every study of the rethink job, end to
   end, on CUDA (the digits where the machine has no Fashion-MNIST, labelled so).

Run on the GPU machine from the repository root, with the machine's own torch (it reaches no
package registry, so nothing is installed)::

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out "$OUT"

Each part runs under its own deadline (the whole check is sized for under 7 minutes on one
H100); a part that runs out of time is reported as such, never silently dropped.  Results go
to ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
TESTS = [
    "tests/test_devices.py",
    "tests/test_host_reads.py",
    "tests/test_compile.py",
    "tests/test_export.py",
]


def _run(command: list[str], deadline_s: float, log: Path) -> dict[str, Any]:
    """Run ``command`` from the repository root; its output goes to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    start = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=deadline_s
        )
        log.write_text(done.stdout + done.stderr)
        status: Any = done.returncode
    except subprocess.TimeoutExpired as expired:
        out = (expired.stdout or b"").decode() if isinstance(expired.stdout, bytes) else ""
        log.write_text(out + f"\n[timed out after {deadline_s:.0f} s]\n")
        status = "timed out"
    lines = log.read_text().strip().splitlines()
    return {
        "command": " ".join(command),
        "status": status,
        "seconds": round(time.monotonic() - start, 1),
        "last_line": lines[-1] if lines else "",
        "log": log.name,
    }


def _resnet50_step(method: str, compiled: bool, steps: int) -> dict[str, Any]:
    """Images/s and peak memory of a ResNet-50 training step at batch 2 with ``method``."""
    import torchvision

    import smallbn

    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the MABN centring and GN statistics notes
        if method != "bn":
            model = smallbn.convert(model, method)
    model = model.cuda().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(2, 3, 224, 224, device="cuda")
    y = torch.randint(0, 10, (2,), device="cuda")

    def step(model_: nn.Module) -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model_(x), y).backward()
        optimizer.step()

    run = torch.compile(model) if compiled else model
    start = time.monotonic()
    for _ in range(3):  # warm-up (and, compiled, the compilation)
        step(run)
    torch.cuda.synchronize()
    warm_s = time.monotonic() - start
    torch.cuda.reset_peak_memory_stats()
    start = time.monotonic()
    for _ in range(steps):
        step(run)
    torch.cuda.synchronize()
    seconds = time.monotonic() - start
    return {
        "images_per_s": round(2 * steps / seconds, 1),
        "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        "warmup_s": round(warm_s, 1),
    }


def _network(deadline_s: float, steps: int) -> dict[str, Any]:
    import smallbn

    results: dict[str, Any] = {}
    end = time.monotonic() + deadline_s
    for compiled in (False, True):
        for method in ["bn", *[m for m in smallbn.available_norms() if m != "bn"]]:
            key = f"{method}{' compiled' if compiled else ''}"
            if time.monotonic() > end:
                results[key] = {"error": "not run: the part's deadline was reached"}
                continue
            try:
                results[key] = _resnet50_step(method, compiled, steps)
            except Exception as error:  # noqa: BLE001 - reported per method, the rest goes on
                results[key] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            torch._dynamo.reset()
    for key, row in results.items():
        base = results.get("bn compiled" if key.endswith("compiled") else "bn", {})
        if "images_per_s" in row and "images_per_s" in base:
            row["speed_vs_bn"] = round(row["images_per_s"] / base["images_per_s"], 3)
            row["memory_vs_bn"] = round(row["peak_mib"] / base["peak_mib"], 3)
    return results


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU check on {report['device']} (torch {report['torch']})", ""]
    lines += ["| part | status | seconds | last line |", "|---|---|---|---|"]
    for name, part in report["parts"].items():
        lines.append(f"| {name} | {part['status']} | {part['seconds']} | {part['last_line']} |")
    lines += ["", "ResNet-50 training step, batch 2 (ratios to BN in the same run):", ""]
    lines += ["| method | images/s | × BN | peak MiB | × BN |", "|---|---|---|---|---|"]
    for key, row in report["resnet50"].items():
        if "error" in row:
            lines.append(f"| {key} | {row['error']} | | | |")
        else:
            lines.append(
                f"| {key} | {row['images_per_s']} | {row.get('speed_vs_bn', '')} | "
                f"{row['peak_mib']} | {row.get('memory_vs_bn', '')} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check"))
    parser.add_argument("--tests-s", type=float, default=150.0, help="deadline of the tests")
    parser.add_argument("--bench-s", type=float, default=45.0, help="deadline of each bench")
    parser.add_argument("--network-s", type=float, default=120.0, help="ResNet-50 deadline")
    parser.add_argument("--steps", type=int, default=20, help="timed ResNet-50 steps")
    parser.add_argument("--rethink-s", type=float, default=45.0, help="rethink smoke deadline")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    parts = {
        "tests": _run(
            [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
            args.tests_s,
            out / "tests.log",
        ),
        "bench layers": _run(
            [
                python,
                "-m",
                "smallbn",
                "bench",
                "layers",
                "--device",
                "cuda",
                "--repeats",
                "30",
                "--output-dir",
                str(out),
            ],
            args.bench_s,
            out / "bench_layers.log",
        ),
        "bench network": _run(
            [
                python,
                "-m",
                "smallbn",
                "bench",
                "network",
                "--device",
                "cuda",
                "--repeats",
                "10",
                "--output-dir",
                str(out),
            ],
            args.bench_s,
            out / "bench_network.log",
        ),
        "rethink smoke": _run(
            [
                python,
                "-m",
                "smallbn",
                "rethink",
                "--preset",
                "smoke",
                "--device",
                "cuda",
                "--jobs",
                "1",
                "--output-dir",
                str(out / "rethink"),
            ],
            args.rethink_s,
            out / "rethink.log",
        ),
    }
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "parts": parts,
        "resnet50": _network(args.network_s, args.steps),
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(_markdown(report))
    print(_markdown(report))


if __name__ == "__main__":
    main()
