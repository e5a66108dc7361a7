"""Tables (screen and Markdown) and files (JSON, Markdown) for the benchmark reports."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from smallbn._io import atomic_write
from smallbn.bench.layers import CONTROL, LayersReport
from smallbn.bench.network import NetworkReport

__all__ = [
    "format_bytes",
    "format_table",
    "settings_line",
    "to_markdown",
    "write_json",
    "write_report",
]

Report = LayersReport | NetworkReport

#: Largest deviation of the control block from 1 before a run is flagged as noisy.
NOISE_LIMIT = 0.10


def format_bytes(count: int | None, *, signed: bool = False) -> str:
    """``1536`` → ``"1.5 KiB"`` (binary units); ``signed`` adds ``+`` to positive values;
    ``None`` → ``"n/a"``."""
    if count is None:
        return "n/a"
    sign = "+" if signed and count > 0 else ("-" if count < 0 else "")
    size = abs(count)
    if size < 1024:
        text = f"{size} B"
    elif size < 1024**2:
        text = f"{size / 1024:.1f} KiB"
    else:
        text = f"{size / 1024**2:.2f} MiB"
    return sign + text


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def settings_line(report: Report) -> str:
    """One line with what the numbers depend on."""
    s = report.settings
    gpu = f", {s['gpu']}" if s.get("gpu") else ""
    check = "" if s.get("finite_check", True) else ", finite check off"
    load = s.get("load_average")
    busy = f", load {load[0]:.2f} on {s.get('cpu_count')} CPUs" if isinstance(load, list) else ""
    return (
        f"torch {s['torch']}, device {s['device']}{gpu}, CPU {s['cpu']}, {s['threads']} "
        f"thread(s), {s['repeats']} repeats after {s['warmup']} warm-up, seed {s['seed']}"
        f"{check}{busy}"
    )


def _layer_rows(report: LayersReport) -> tuple[list[str], list[list[str]]]:
    cuda = any(row.peak_bytes is not None for row in report.rows)
    header = ["method", "N×C×H×W", "train ms", "train ×BN", "eval ms", "eval ×BN"]
    header += ["saved +BN", *(["peak +BN"] if cuda else []), "state"]
    rows = []
    for row in report.rows:
        cells = [
            row.method,
            "×".join(map(str, row.shape)),
            f"{row.train_ms:.2f}",
            _ratio(row.train_ratio),
            f"{row.eval_ms:.2f}",
            _ratio(row.eval_ratio),
            format_bytes(row.saved_extra_bytes, signed=True),
        ]
        if cuda:
            cells.append(format_bytes(row.peak_extra_bytes, signed=True))
        cells.append(format_bytes(row.state_bytes))
        rows.append(cells)
    return header, rows


def _network_rows(report: NetworkReport) -> tuple[list[str], list[list[str]]]:
    cuda = any(row.peak_bytes is not None for row in report.rows)
    header = ["method", "train img/s", "train ×BN", "eval img/s", "eval ×BN"]
    header += ["folded img/s", "folded ×BN", "saved", *(["peak"] if cuda else []), "state"]
    rows = []
    for row in report.rows:
        folded = "n/a" if row.folded_images_per_s is None else f"{row.folded_images_per_s:.0f}"
        cells = [
            row.method,
            f"{row.train_images_per_s:.0f}",
            _ratio(row.train_ratio),
            f"{row.eval_images_per_s:.0f}",
            _ratio(row.eval_ratio),
            folded,
            _ratio(row.folded_ratio),
            format_bytes(row.saved_bytes),
        ]
        if cuda:
            cells.append(format_bytes(row.peak_bytes))
        cells.append(format_bytes(row.state_bytes))
        rows.append(cells)
    return header, rows


def _cells(report: Report) -> tuple[list[str], list[list[str]]]:
    if isinstance(report, LayersReport):
        return _layer_rows(report)
    return _network_rows(report)


def _explanation(report: Report) -> list[str]:
    if isinstance(report, LayersReport):
        lines = [
            "×BN: time / time of conv + torch.nn.BatchNorm2d in the same repeat (median over "
            "repeats; above 1 is slower). saved +BN: activation bytes kept for backward beyond "
            "BN's. state: bytes kept across steps beyond the conv weight."
        ]
        if any(row.peak_bytes is not None for row in report.rows):
            lines.append("peak +BN: CUDA peak memory of a training step beyond BN's.")
        lines += _noise_warnings(report)
    else:
        lines = [
            f"SmallResNet (the comparison job's), batch {report.batch_size}. ×BN: time / time "
            "of the BN network in the same repeat (median; above 1 is slower); folded ×BN is "
            "over unfolded BN. saved: activation bytes kept for backward by one training "
            "forward; state: parameters and buffers of the network."
        ]
        if any(row.peak_bytes is not None for row in report.rows):
            lines.append("peak: CUDA peak memory of a training step.")
        lines += [
            f"{row.method}: folding n/a ({row.fold_note})" for row in report.rows if row.fold_note
        ]
    lines += [f"{key}: skipped ({why})" for key, why in report.skipped.items()]
    return lines


def _noise_warnings(report: LayersReport) -> list[str]:
    """A line per shape where the control block (a second conv + BN) is more than
    ``NOISE_LIMIT`` away from BN: the run was disturbed and its ratios are unreliable."""
    lines = []
    for row in report.rows:
        if row.method != CONTROL:
            continue
        worst = max(abs(row.train_ratio - 1), abs(row.eval_ratio - 1))
        if worst > NOISE_LIMIT:
            lines.append(
                f"warning: at {'x'.join(map(str, row.shape))} a second conv + BN block measured "
                f"{row.train_ratio:.2f}× (train) and {row.eval_ratio:.2f}× (eval) BN's time: "
                f"noise above {NOISE_LIMIT:.0%}, rerun on an idle machine or with more repeats"
            )
    return lines


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))])

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_table(report: Report) -> str:
    """The report as a plain-text table for the screen, with its settings and notes."""
    header, rows = _cells(report)
    return "\n".join([settings_line(report), _text_table(header, rows), *_explanation(report)])


def to_markdown(report: Report) -> str:
    """The report as Markdown: settings, table, notes."""
    header, rows = _cells(report)
    table = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]
    notes = [f"- {line}" for line in _explanation(report)]
    notes += [f"- `{method}`: {note}" for method, note in report.notes.items() if note]
    notes += [
        f"- `{method}` options: "
        + ", ".join(f"`{key}={value!r}`" for key, value in options.items())
        for method, options in report.options.items()
        if options
    ]
    return "\n".join([settings_line(report), "", *table, "", *notes]) + "\n"


def write_json(path: Path, data: object) -> Path:
    """``data`` as indented JSON at ``path``, written atomically (parent folders created)."""
    text = (json.dumps(data, indent=2) + "\n").encode()
    return atomic_write(path, lambda handle: handle.write(text))


def write_report(report: Report, output_dir: Path) -> tuple[Path, Path]:
    """Write ``<kind>.json`` and ``<kind>.md`` (``kind``: ``layers`` or ``network``) into
    ``output_dir``, each atomically; returns their paths."""
    kind = "layers" if isinstance(report, LayersReport) else "network"
    markdown = to_markdown(report).encode()
    json_path = write_json(output_dir / f"{kind}.json", report.to_json())
    md_path = atomic_write(output_dir / f"{kind}.md", lambda f: f.write(markdown))
    return json_path, md_path
