"""``plot_weight_norms``: a PNG of every param group's weight norm over steps, from a CSVLogger ``metrics.csv``.

The only module that imports matplotlib, and only when called: ``pip install lightning-nodecay[plot]``.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from lightning_nodecay.norms import check_norm_type

_COLUMN = re.compile(r"^weight_(?P<norm>[^_/]+)_norm/(?P<group>.+)$")


def plot_weight_norms(
    metrics_csv: str | os.PathLike[str],
    png_path: str | os.PathLike[str],
    *,
    norm_type: float | str | None = None,
    log_scale: bool = False,
    title: str | None = None,
) -> Path:
    r"""Plot the ``weight_{p}_norm/{group}`` columns that ``WeightNormMonitor`` logged, one line per group.

    Args:
        metrics_csv: the ``metrics.csv`` of a ``CSVLogger`` (in its ``log_dir``).
        png_path: where to write the PNG.
        norm_type: which norm to plot when the file holds several (e.g. ``2`` or ``"inf"``); by default the
            only one it holds.
        log_scale: use a logarithmic y axis.
        title: the plot title; by default ``"Weight {p}-norm per param group"``.

    Returns:
        ``png_path``, as a ``Path``.

    Raises:
        ImportError: when matplotlib is not installed.
        ValueError: when the file holds no weight norms, or several norms and ``norm_type`` is not given.

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> metrics = folder / "metrics.csv"
        >>> _ = metrics.write_text("step,weight_2.0_norm/decay,weight_2.0_norm/no_decay\n0,3.0,1.0\n1,2.5,1.0\n")
        >>> plot_weight_norms(metrics, folder / "norms.png").stat().st_size > 0
        True
    """
    figure_class = _figure_class()
    series, norm = _read_norms(Path(metrics_csv), norm_type)
    figure = figure_class(figsize=(8, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for group, points in series.items():
        steps, values = zip(*points, strict=True)
        axes.plot(steps, values, label=group, marker="." if len(points) < 50 else None)
    axes.set_xlabel("step")
    axes.set_ylabel(f"weight {norm}-norm")
    axes.set_title(title if title is not None else f"Weight {norm}-norm per param group")
    if log_scale:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(png_path)
    return Path(png_path)


def _figure_class() -> type:
    try:
        import matplotlib  # noqa: F401 (a missing package shows here, even when submodules were imported before)
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "`plot_weight_norms` needs matplotlib, which is not installed: `pip install lightning-nodecay[plot]`."
        ) from error
    return Figure


def _read_norms(path: Path, norm_type: float | str | None) -> tuple[dict[str, list[tuple[int, float]]], str]:
    """``{group: [(step, norm), ...]}`` of one norm type, and that norm type as it appears in the keys."""
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
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
        match["group"]: [(int(row["step"]), float(row[column])) for row in rows if row[column]]
        for column, match in columns.items()
        if match and match["norm"] == norm
    }
    return series, norm
