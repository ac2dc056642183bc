"""``plot_weight_norms``: a PNG of every param group's weight norm over steps, from a CSVLogger ``metrics.csv``.

Optionally with a second panel below it: each group's effective weight decay over the same steps, as
``WeightDecayScheduler`` (or ``WeightNormMonitor(log_weight_decay=True)``) logged it.

The only module that imports matplotlib, and only when called: ``pip install lightning-nodecay[plot]``.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any

from lightning_nodecay.norms import check_norm_type

_COLUMN = re.compile(r"^weight_(?P<norm>[^_/]+)_norm/(?P<group>.+)$")
_DECAY_COLUMN = re.compile(r"^weight_decay/(?P<group>.+)$")

#: ``{group: [(step, value), ...]}``
Series = dict[str, list[tuple[int, float]]]


def plot_weight_norms(
    metrics_csv: str | os.PathLike[str],
    png_path: str | os.PathLike[str],
    *,
    norm_type: float | str | None = None,
    log_scale: bool = False,
    title: str | None = None,
    weight_decay: bool = False,
) -> Path:
    r"""Plot the ``weight_{p}_norm/{group}`` columns that ``WeightNormMonitor`` logged, one line per group.

    With ``weight_decay=True``, a second panel below shares the step axis and draws the ``weight_decay/{group}``
    columns of the same file (each group's effective weight decay, as ``WeightDecayScheduler`` logs it), in the
    same colour per group as its norm: a schedule is seen next to what it does to the norms.

    Args:
        metrics_csv: the ``metrics.csv`` of a ``CSVLogger`` (in its ``log_dir``).
        png_path: where to write the PNG.
        norm_type: which norm to plot when the file holds several (e.g. ``2`` or ``"inf"``); by default the
            only one it holds.
        log_scale: use a logarithmic y axis for the norms.
        title: the plot title; by default ``"Weight {p}-norm per param group"``.
        weight_decay: also draw each group's weight decay over the steps, in a second panel.

    Returns:
        ``png_path``, as a ``Path``.

    Raises:
        ImportError: when matplotlib is not installed.
        ValueError: when the file holds no weight norms, several norms and ``norm_type`` is not given, or no
            ``weight_decay/{group}`` columns with ``weight_decay=True``.

    Examples:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> metrics = folder / "metrics.csv"
        >>> _ = metrics.write_text("step,weight_2.0_norm/decay,weight_2.0_norm/no_decay\n0,3.0,1.0\n1,2.5,1.0\n")
        >>> plot_weight_norms(metrics, folder / "norms.png").stat().st_size > 0
        True
        >>> _ = metrics.write_text(
        ...     "step,weight_2.0_norm/decay,weight_decay/decay,weight_decay/no_decay\n0,3.0,0.04,0.0\n1,2.5,0.4,0.0\n"
        ... )
        >>> plot_weight_norms(metrics, folder / "norms.png", weight_decay=True).stat().st_size > 0
        True
    """
    figure_class = _figure_class()
    rows = _read_rows(Path(metrics_csv))
    series, norm = _read_norms(Path(metrics_csv), rows, norm_type)
    decays = _read_weight_decays(Path(metrics_csv), rows) if weight_decay else {}
    if weight_decay:
        figure = figure_class(figsize=(8, 7), layout="constrained")
        axes, decay_axes = figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    else:
        figure = figure_class(figsize=(8, 4.5), layout="constrained")
        axes, decay_axes = figure.add_subplot(), None
    colors = _colors([*series, *(group for group in decays if group not in series)])
    for group, points in series.items():
        _draw(axes, group, points, colors[group])
    axes.set_ylabel(f"weight {norm}-norm")
    axes.set_title(title if title is not None else f"Weight {norm}-norm per param group")
    if log_scale:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend(title="param group")
    if decay_axes is None:
        axes.set_xlabel("step")
    else:
        for group, points in decays.items():
            _draw(decay_axes, group, points, colors[group])
        decay_axes.set_xlabel("step")
        decay_axes.set_ylabel("weight decay")
        decay_axes.set_title("Effective weight decay per param group (base x multiplier)")
        decay_axes.grid(alpha=0.3)
        decay_axes.legend(title="param group")
    figure.savefig(png_path)
    return Path(png_path)


def _draw(axes: Any, group: str, points: list[tuple[int, float]], color: Any) -> None:
    if not points:  # a column that other loggers' rows left empty
        return
    steps, values = zip(*points, strict=True)
    axes.plot(steps, values, label=group, color=color, marker="." if len(points) < 50 else None)


def _colors(groups: list[str]) -> dict[str, Any]:
    """One colour per group, the same in both panels: matplotlib's colour cycle, then ``tab20`` past its end."""
    from matplotlib import colormaps, rcParams

    palette = list(rcParams["axes.prop_cycle"].by_key().get("color", []))
    if len(groups) > len(palette):
        palette = [colormaps["tab20"](i % 20) for i in range(len(groups))]
    return {group: palette[i] for i, group in enumerate(groups)}


def _figure_class() -> type:
    try:
        import matplotlib  # noqa: F401 (a missing package shows here, even when submodules were imported before)
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "`plot_weight_norms` needs matplotlib, which is not installed: `pip install lightning-nodecay[plot]`."
        ) from error
    return Figure


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _read_norms(path: Path, rows: list[dict[str, str]], norm_type: float | str | None) -> tuple[Series, str]:
    """``{group: [(step, norm), ...]}`` of one norm type, and that norm type as it appears in the keys."""
    columns = {column: _COLUMN.match(column) for column in (rows[0] if rows else {})}
    found = sorted({match["norm"] for match in columns.values() if match})
    if not found:
        raise ValueError(
            f"`{path}` holds no `weight_{{p}}_norm/{{group}}` columns. Log them with `WeightNormMonitor` and a"
            " `CSVLogger`, then pass that logger's `metrics.csv`."
        )
    if norm_type is not None:
        norm = str(check_norm_type(norm_type))
        if norm not in found:
            raise ValueError(
                f"`{path}` holds no {norm}-norm (`norm_type={norm_type!r}`); it holds {found}: choose one of them."
            )
    elif len(found) > 1:
        raise ValueError(f"`{path}` holds several norms {found}: choose one with `norm_type`, e.g. `norm_type=2`.")
    else:
        norm = found[0]
    series = {
        match["group"]: _points(rows, column) for column, match in columns.items() if match and match["norm"] == norm
    }
    return series, norm


def _read_weight_decays(path: Path, rows: list[dict[str, str]]) -> Series:
    """``{group: [(step, weight decay), ...]}`` of the ``weight_decay/{group}`` columns."""
    columns = {column: _DECAY_COLUMN.match(column) for column in (rows[0] if rows else {})}
    series = {match["group"]: _points(rows, column) for column, match in columns.items() if match}
    if not any(series.values()):
        raise ValueError(
            f"`{path}` holds no `weight_decay/{{group}}` columns, which `weight_decay=True` plots. Log them with"
            " `lightning_nodecay.WeightDecayScheduler` (or `WeightNormMonitor(log_weight_decay=True)`) and a"
            " `CSVLogger`, or leave `weight_decay` off."
        )
    return {group: points for group, points in series.items() if points}


def _points(rows: list[dict[str, str]], column: str) -> list[tuple[int, float]]:
    return [(int(row["step"]), float(row[column])) for row in rows if row[column]]
