"""The batch-statistics recorder (smallbn.recorder) and the ``smallbn record`` job.

Forward statistics are checked against numpy float64 moments of the layer input captured by
an independent hook; backward statistics against ``∂L/∂y`` captured with ``retain_grad`` and
``E[ĝ]``, ``E[ĝ·x̂]`` computed in numpy (Yan et al., ICLR 2020, Eq. 4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smallbn.cli import main
from smallbn.experiments.models import SmallResNet
from smallbn.recorder import (
    STATISTICS,
    LayerStats,
    Recording,
    StatsRecorder,
    fluctuation,
    format_fluctuation_table,
    plot_stats,
    summarize_fluctuation,
)

_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class Net(nn.Module):
    """conv → BN (non-trivial γ, β) → ReLU → conv → pooled linear head, any rank."""

    def __init__(self, dim: int = 2, channels: int = 4, inplace: bool = False) -> None:
        super().__init__()
        self.conv = _CONV[dim](2, channels, 3, padding=1)
        self.norm = _BN[dim](channels)
        self.act = nn.ReLU(inplace=inplace)
        self.conv2 = _CONV[dim](channels, 3, 1)
        self.head = nn.Linear(3, 5)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(self.act(self.norm(self.conv(x))))
        return self.head(h.flatten(2).mean(dim=2))


class Capture:
    """The test's own record of a layer's inputs and outputs (outputs keep their grad)."""

    def __init__(self, module: nn.Module) -> None:
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        self.inputs.append(args[0].detach().clone())
        if output.requires_grad:
            output.retain_grad()
        self.outputs.append(output)


def np_moments(x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float64 per-channel mean and biased var over (N, *spatial)."""
    a = np.moveaxis(x.detach().double().numpy(), 1, 0).reshape(x.shape[1], -1)
    return a.mean(axis=1), a.var(axis=1)


def np_backward(
    x: Tensor, grad_y: Tensor, gamma: Tensor, eps: float, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``g_B = E_R[ĝ]`` and ``Ψ_B = E_R[ĝ·x̂]``, ``ĝ = scale·(∂L/∂y)·γ``."""
    c = x.shape[1]
    a = np.moveaxis(x.detach().double().numpy(), 1, 0).reshape(c, -1)
    g = np.moveaxis(grad_y.detach().double().numpy(), 1, 0).reshape(c, -1)
    ghat = scale * g * gamma.detach().double().numpy()[:, None]
    xhat = (a - a.mean(axis=1, keepdims=True)) / np.sqrt(a.var(axis=1, keepdims=True) + eps)
    return ghat.mean(axis=1), (ghat * xhat).mean(axis=1)


def _inputs(dim: int, n: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    spatial = {1: (7,), 2: (5, 6), 3: (3, 4, 5)}[dim]
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, *spatial, generator=generator, dtype=dtype) * 1.5 + 0.3


def _train_iterations(model: nn.Module, inputs: list[Tensor]) -> None:
    for i, x in enumerate(inputs):
        labels = torch.arange(x.shape[0]) % 5
        loss = F.cross_entropy(model(x), labels) * (1 + i)  # a different scale per step
        loss.backward()


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("scale", [False, True])
def test_statistics_match_float64_references(dim: int, scale: bool) -> None:
    model = Net(dim).double().train()
    capture = Capture(model.norm)
    inputs = [_inputs(dim, n, seed) for seed, n in enumerate([2, 3, 5])]
    with StatsRecorder(model, ["norm"], scale_grad_by_batch=scale) as recorder:
        _train_iterations(model, inputs)
    stats = recorder.recording()["norm"]
    assert stats.num_iterations == 3
    assert stats.batch_size.tolist() == [2, 3, 5]
    for name in STATISTICS:
        value = stats.statistic(name)
        assert value.dtype == torch.float32 and value.device.type == "cpu"
    for t, (x, y) in enumerate(zip(capture.inputs, capture.outputs, strict=True)):
        mean, var = np_moments(x)
        assert y.grad is not None
        grad_mean, grad_proj = np_backward(
            x, y.grad, model.norm.weight, model.norm.eps, x.shape[0] if scale else 1.0
        )
        # float32 storage: relative accuracy ~6e-8; tolerance for values near zero too.
        for name, expected in [
            ("mean", mean),
            ("var", var),
            ("grad_mean", grad_mean),
            ("grad_proj", grad_proj),
        ]:
            np.testing.assert_allclose(
                stats.statistic(name)[t].numpy(),
                expected,
                rtol=1e-6,
                atol=1e-7 * np.abs(expected).max(),
                err_msg=f"{name} at iteration {t}",
            )


def test_float32_model_matches_float64_reference() -> None:
    model = Net(2).train()
    capture = Capture(model.norm)
    with StatsRecorder(model, ["norm"]) as recorder:
        _train_iterations(model, [_inputs(2, 4, 0, torch.float32)])
    stats = recorder.recording()["norm"]
    x, y = capture.inputs[0], capture.outputs[0]
    assert y.grad is not None
    mean, var = np_moments(x)
    grad_mean, grad_proj = np_backward(x, y.grad, model.norm.weight, model.norm.eps)
    np.testing.assert_allclose(stats.mean[0].numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.var[0].numpy(), var, rtol=1e-5)
    scale = np.abs(grad_proj).max()
    np.testing.assert_allclose(stats.grad_mean[0].numpy(), grad_mean, atol=1e-5 * scale)
    np.testing.assert_allclose(stats.grad_proj[0].numpy(), grad_proj, atol=1e-5 * scale)


def test_output_normalization_equals_batch_for_bn_even_with_zero_gamma_and_inplace_relu() -> None:
    """For BN ``(y − β)/γ`` is the batch ``x̂``; a zero γ falls back per channel, and an
    in-place ReLU after the layer must not leak into the recorded ``x̂``."""
    records = {}
    for mode in ("batch", "output"):
        torch.manual_seed(3)
        model = Net(2, inplace=True).double().train()
        with torch.no_grad():
            model.norm.weight[1] = 0.0
        with StatsRecorder(model, ["norm"], normalized=mode) as recorder:
            _train_iterations(model, [_inputs(2, n, n) for n in (2, 4)])
        records[mode] = recorder.recording()["norm"]
    for name in STATISTICS:
        torch.testing.assert_close(
            records["output"].statistic(name), records["batch"].statistic(name)
        )
    assert torch.all(records["batch"].grad_mean[:, 1] == 0)  # ĝ = ∂L/∂y · 0


def test_two_backward_passes_through_one_forward_add_up() -> None:
    model = Net(2).double().train()
    x = _inputs(2, 3, 0)
    with StatsRecorder(model, ["norm"]) as once:
        F.cross_entropy(model(x), torch.tensor([0, 1, 2])).backward()
    with StatsRecorder(model, ["norm"]) as twice:
        loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2]))
        loss.backward(retain_graph=True)
        loss.backward()
    for name in ("grad_mean", "grad_proj"):
        torch.testing.assert_close(
            twice.recording()["norm"].statistic(name),
            2 * once.recording()["norm"].statistic(name),
        )


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def test_hooks_exist_only_inside_the_context() -> None:
    model = SmallResNet(widths=(4, 8), blocks=1)
    recorder = StatsRecorder(model)
    assert _hook_count(model) == 0 and not recorder.active
    with recorder:
        assert recorder.active
        assert _hook_count(model) == len(recorder.layers) == 6  # every BN of the ResNet
    assert _hook_count(model) == 0 and not recorder.active
    with pytest.raises(RuntimeError, match="boom"), recorder:
        raise RuntimeError("boom")
    assert _hook_count(model) == 0
    # Off: an output carries no tensor hook either.
    y = model.stages[0].bn2(torch.randn(2, 4, 5, 5, requires_grad=True))
    assert not y._backward_hooks


def test_only_training_mode_forwards_are_recorded() -> None:
    model = Net(2).train()
    x = _inputs(2, 3, 0, torch.float32)
    with StatsRecorder(model, ["norm"]) as recorder:
        model.eval()
        model(x).sum().backward()
        assert recorder.recording()["norm"].num_iterations == 0
        model.train()
        with torch.no_grad():  # training mode, no backward: forward stats only
            model(x)
        model(x).sum().backward()
    model(x).sum().backward()  # after the block: nothing
    stats = recorder.recording()["norm"]
    assert stats.num_iterations == 2
    assert torch.isnan(stats.grad_mean[0]).all() and torch.isnan(stats.grad_proj[0]).all()
    assert torch.isfinite(stats.grad_mean[1]).all() and torch.isfinite(stats.grad_proj[1]).all()
    torch.testing.assert_close(stats.mean[0], stats.mean[1])


def test_default_layers_channel_selection_and_errors() -> None:
    model = SmallResNet(widths=(4, 8), blocks=1).train()
    recorder = StatsRecorder(model, channels={"stages.0.bn2": [3, 1]})
    assert "stem_norm" in recorder.layers and "stages.1.shortcut.1" in recorder.layers
    full = StatsRecorder(model, ["stages.0.bn2"])
    with recorder, full:
        model(torch.randn(2, 1, 8, 8)).sum().backward()
    picked, every = recorder.recording()["stages.0.bn2"], full.recording()["stages.0.bn2"]
    assert picked.channels == (3, 1) and every.channels == (0, 1, 2, 3)
    for name in STATISTICS:
        torch.testing.assert_close(picked.statistic(name), every.statistic(name)[:, [3, 1]])
    torch.testing.assert_close(picked.channel_series("var", 1), every.var[:, 1])
    with pytest.raises(KeyError, match="stages.0.bn2"):
        StatsRecorder(model, ["stages.0.bn9"])
    with pytest.raises(ValueError, match="channels"):
        StatsRecorder(model, ["stages.0.bn2"], channels=[-1])
    with pytest.raises(ValueError, match="no norm layer"):
        StatsRecorder(nn.Linear(2, 2))


def test_channel_errors_raised_in_the_hook_name_the_layer() -> None:
    """Errors raised during the forward hook say which layer; with two layers of different
    widths a bare "channel 5 requested" would not tell which one is too narrow."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8)
    )
    with pytest.raises(IndexError, match=r"channel 5 requested for layer '1' \(BatchNorm2d\)"):
        with StatsRecorder(model, channels=[0, 5]):
            model(torch.randn(2, 3, 4, 4))
    # Any module with channels in dim 1 can be recorded, so its input width can change.
    flexible = nn.Sequential(nn.Identity()).train()
    with StatsRecorder(flexible, ["0"]):
        flexible(torch.randn(2, 4, 3, 3))
        with pytest.raises(
            RuntimeError, match=r"input of layer '0' \(Identity\) changed from 4 to 6"
        ):
            flexible(torch.randn(2, 6, 3, 3))


def test_shape_changing_module_gets_forward_statistics_only() -> None:
    model = Net(2).double().train()
    capture = Capture(model.conv2)
    with StatsRecorder(model, ["conv2"]) as recorder:
        _train_iterations(model, [_inputs(2, 3, 0)])
    stats = recorder.recording()["conv2"]
    mean, var = np_moments(capture.inputs[0])
    np.testing.assert_allclose(stats.mean[0].numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(stats.var[0].numpy(), var, rtol=1e-6)
    assert torch.isnan(stats.grad_mean).all() and torch.isnan(stats.grad_proj).all()


def _recorded(label: str | None = None) -> Recording:
    model = Net(2).train()
    with StatsRecorder(model, ["norm", "act"], label=label, metadata={"note": "x"}) as rec:
        _train_iterations(model, [_inputs(2, 2, seed, torch.float32) for seed in range(4)])
        with torch.no_grad():
            model(_inputs(2, 2, 9, torch.float32))  # NaN backward statistics survive saving
    return rec.recording()


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_save_load_round_trip(tmp_path: Path, suffix: str) -> None:
    recording = _recorded()
    assert recording.label == "batch 2"  # inferred from the batch size
    path = recording.save(tmp_path / "sub" / f"run{suffix}")
    loaded = StatsRecorder.load(path)
    assert loaded.label == recording.label
    assert loaded.metadata == recording.metadata
    assert loaded.metadata["note"] == "x" and loaded.metadata["batch_size"] == 2
    assert list(loaded.layers) == ["norm", "act"]
    for layer, stats in recording.layers.items():
        assert loaded[layer].channels == stats.channels
        torch.testing.assert_close(loaded[layer].batch_size, stats.batch_size)
        for name in STATISTICS:
            torch.testing.assert_close(
                loaded[layer].statistic(name), stats.statistic(name), equal_nan=True
            )
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left
    # Overwriting goes through os.replace too.
    recording.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_save_rejects_unknown_suffix_and_non_json_metadata(tmp_path: Path) -> None:
    recording = _recorded()
    with pytest.raises(ValueError, match="format"):
        recording.save(tmp_path / "run.txt")
    with pytest.raises(TypeError):
        StatsRecorder(Net(), ["norm"], metadata={"tensor": torch.zeros(1)})
    assert list(tmp_path.iterdir()) == []


def test_plot_writes_a_png(tmp_path: Path) -> None:
    records = {"batch 2": _recorded(), "batch 4": _recorded("other")}
    path = plot_stats(records, "norm", tmp_path / "stats.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    one = plot_stats(records, "norm", tmp_path / "one.png", channel=2)
    assert one.stat().st_size > 10_000
    with pytest.raises(KeyError, match="not recorded"):
        plot_stats({"a": _recorded()}, "act", tmp_path / "x.png", channel=99)


def test_plot_legend_lists_every_run_even_underscore_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """matplotlib hides artists labelled "_..." from automatic legends; a run named
    "_baseline" must still get its legend entry, in the order of the mapping."""
    from matplotlib.figure import Figure

    figures: list[Any] = []
    savefig = Figure.savefig

    def capture(self: Any, *args: Any, **kwargs: Any) -> Any:
        figures.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    records = {"_baseline": _recorded(), "batch 4": _recorded("other")}
    path = plot_stats(records, "norm", tmp_path / "stats.png")
    assert path.stat().st_size > 10_000
    legend = figures[0].axes[0].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["_baseline", "batch 4"]
    colors = [handle.get_color() for handle in legend.legend_handles]
    assert colors == ["C0", "C1"]  # each entry is its own run's line


def _synthetic(noise: float, trend: float, t: int = 400, k: int = 3) -> Recording:
    generator = torch.Generator().manual_seed(int(noise * 1000))
    steps = torch.arange(t, dtype=torch.float32)[:, None]

    def series() -> Tensor:
        return trend * steps / t + noise * torch.randn(t, k, generator=generator)

    stats = LayerStats(series(), series(), series(), series(), torch.full((t,), 2), (0, 1, 2))
    return Recording("synthetic", {"layer": stats})


def test_fluctuation_on_synthetic_series() -> None:
    noisy, calm = _synthetic(1.0, trend=0.0), _synthetic(0.1, trend=0.0)
    summary = summarize_fluctuation({"noisy": noisy, "calm": calm}, "layer")
    for name in STATISTICS:
        assert summary["noisy"][name] == pytest.approx(1.0, rel=0.1)
        assert summary["calm"][name] == pytest.approx(0.1, rel=0.1)
    table = format_fluctuation_table(summary, "title")
    assert "ratio noisy / calm" in table and "| μ_B |" in table and "10." in table
    # A slow drift inflates the plain std; the moving-average residual sees the noise only.
    drifting = _synthetic(0.1, trend=5.0)
    assert fluctuation(drifting)["mean"] > 1.0
    assert fluctuation(drifting, window=9)["mean"] == pytest.approx(0.1 * (8 / 9) ** 0.5, rel=0.1)
    assert fluctuation(drifting, "layer", 1, window=9, skip=100)["var"] < 0.12


def test_smaller_batch_fluctuates_more() -> None:
    """Fixed weights, i.i.d. data: every statistic's std over iterations shrinks with N.

    No BN after the recorded one, so per-sample gradients are independent and, scaled by N,
    estimate one per-sample quantity: the std ratio should be near sqrt(32/2) = 4.
    """
    model = Net(2, channels=3).train()
    records = {}
    for n in (2, 32):
        generator = torch.Generator().manual_seed(n)
        with StatsRecorder(model, ["norm"], scale_grad_by_batch=True) as recorder:
            for _ in range(40):
                x = torch.randn(n, 2, 4, 4, generator=generator) + 0.5
                labels = torch.randint(0, 5, (n,), generator=generator)
                F.cross_entropy(model(x), labels).backward()
        records[f"batch {n}"] = recorder.recording()
    model.zero_grad()
    summary = summarize_fluctuation(records, "norm")
    for name in STATISTICS:
        assert summary["batch 2"][name] > 2.0 * summary["batch 32"][name], name


def test_record_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "record",
        "--dataset=digits",
        "--steps=5",
        "--window=2",  # a centred moving average of 2 needs 3 of the 5 steps
        "--batch-sizes=2,4",
        "--train-samples=64",
        f"--output-dir={tmp_path}",
        "--threads=1",
        "--format=npz",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ratio batch 2 / batch 4" in out and "| Ψ_B |" in out
    assert (tmp_path / "stats_stages.0.bn2.png").stat().st_size > 10_000
    for n in (2, 4):
        recording = Recording.load(tmp_path / f"batch{n}.npz")
        stats = recording["stages.0.bn2"]
        assert recording.label == f"batch {n}" and recording.metadata["dataset"] == "digits"
        assert stats.num_iterations == 5 and stats.batch_size.tolist() == [n] * 5
        assert all(torch.isfinite(stats.statistic(name)).all() for name in STATISTICS)
    assert main([*argv, "--layer=nope"]) == 2
    assert "stages.0.bn2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["record", "--batch-sizes=2,x"])
