"""smallbn._optional: the library imports and works with torch and numpy only; a feature
whose package is missing names the package and the extra that installs it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from smallbn import _optional, cli

#: Packages shadowed, for the subprocess, by stubs whose import fails as a missing one does
#: (a stub, not a blocking import hook: torch probes some of them with importlib's find_spec).
OPTIONAL = ("tqdm", "matplotlib", "PIL", "sklearn")


def _without_optional_packages(tmp_path):  # type: ignore[no-untyped-def]
    for name in OPTIONAL:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(
            f'raise ModuleNotFoundError("No module named {name}", name={name!r})\n'
        )
    return {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def test_the_library_needs_torch_and_numpy_only(tmp_path):
    code = textwrap.dedent(
        """
        import sys, torch, smallbn
        from smallbn.experiments.models import SmallResNet
        model = smallbn.convert(SmallResNet(num_classes=10), "brn")
        smallbn.precise_bn(model, [torch.randn(4, 1, 28, 28)] * 4, 16, progress=True)
        print(model.eval()(torch.randn(2, 1, 28, 28)).shape)
        for name in ("tqdm", "matplotlib"):
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise AssertionError(name + " is importable: the test would prove nothing")
        try:
            smallbn.plot_stats({}, "layer", "x.png")
        except ImportError as error:
            print(error)
        """
    )
    env = _without_optional_packages(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "torch.Size([2, 10])" in done.stdout
    assert "plot_stats needs matplotlib, which is not installed: pip install 'smallbn[plot]'" in (
        done.stdout
    )


def test_require_names_the_package_and_the_extra():
    assert _optional.require("math", "x").sqrt(4) == 2
    with pytest.raises(ImportError, match=r"reading images needs pillow.*smallbn\[data\]"):
        _optional.require("PIL.NotAModule", "reading images")


def test_a_plotting_job_without_matplotlib_stops_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    code = cli.main(["compare", "--preset", "smoke", "--output-dir", str(tmp_path / "out")])
    assert code == 1
    assert "smallbn compare (its plots) needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_without_tqdm_progress_is_counted_but_not_shown():
    bar = _optional._NoBar(range(3), desc="x", initial=1)
    assert list(bar) == [0, 1, 2] and bar.n == 4
    with _optional._NoBar(total=5) as other:
        other.update(2)
        other.set_postfix(loss=1.0)
    assert other.n == 2
    assert torch.is_tensor(torch.zeros(1))
