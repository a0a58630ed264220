"""kdgeo.report_compare.plot: what the PNG shows, inspected on the matplotlib Figure it is drawn from.

Runs are fabricated the way kdgeo.distillation writes them (tests/test_comparison.py); the figure comes from
``_plot_figure``, the helper ``plot`` saves, so tick labels, lines and texts can be checked directly:
differences from the baseline with their paired intervals, cut to the metric's range and said so,
40 variants with long names readable, one-point learning curves drawn as points.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
from kdgeo import rundir
from kdgeo.comparison import CompareArgs, compare
from kdgeo.report_compare import _difference_range, _plot_dpi, _plot_figure, _wrap_name, plot

from test_comparison import BASE_ACC, make_sweep, write_run


def _diff_axes(fig: Any, k: int = 0) -> Any:
    """The differences panel of the k-th metric (panels alternate: differences, curves)."""
    return fig.axes[2 * k]


def _curve_axes(fig: Any, k: int = 0) -> Any:
    return fig.axes[2 * k + 1]


def _line(ax: Any, gid: str) -> Any:
    found = [line for line in ax.get_lines() if line.get_gid() == gid]
    assert len(found) == 1, (gid, [line.get_gid() for line in ax.get_lines()])
    return found[0]


def _with_interval(result: Any, metric: str, variant: str, low: float, high: float, diff: float | None = None) -> Any:
    """``result`` with one comparison's reported interval (and difference) replaced."""
    metrics = []
    for c in result.metrics:
        if c.metric == metric:
            versus = [
                replace(v, diff_ci_low=low, diff_ci_high=high, diff=v.diff if diff is None else diff)
                if v.variant == variant
                else v
                for v in c.versus
            ]
            c = replace(c, versus=versus)
        metrics.append(c)
    return replace(result, metrics=metrics)


def test_forty_variants_with_long_names_render_without_overlap(tmp_path):
    names = [f"v{i:02d}-procrustes-weight0.5-lr3e-4-warmup100-" + "layers-2-4-x" * 2 for i in range(40)]
    names = [n[:60].ljust(60, "z") for n in names]
    assert all(len(n) == 60 for n in names) and len(set(names)) == 40
    make_sweep(tmp_path / "runs", {"baseline": 0.0, **{n: (i - 20) * 0.004 for i, n in enumerate(names)}}, seeds=2)
    result = compare(CompareArgs([str(tmp_path / "runs")]))
    fig = _plot_figure(result)
    fig.draw_without_rendering()  # runs the layout, as saving does, without rasterising
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    ax = _diff_axes(fig)

    labels = [t for t in ax.get_yticklabels() if t.get_text()]
    assert [t.get_text() for t in labels] == names  # every name, whole, in the sweep's order, one row each
    boxes = [t.get_window_extent(renderer) for t in labels]
    for box in boxes:  # not cut by the figure's edge, and left of the data area
        assert box.x0 >= page.x0 - 0.5 and box.x1 <= ax.bbox.x0 + 0.5 and page.y0 <= box.y0 and box.y1 <= page.y1
    for a, b in combinations(boxes, 2):
        assert not a.overlaps(b)
    right = [t.get_window_extent(renderer) for t in ax.child_axes[0].get_yticklabels() if t.get_text()]
    assert len(right) == 40 and all(b.x0 >= ax.bbox.x1 - 0.5 and b.x1 <= page.x1 + 0.5 for b in right)
    for a, b in combinations(right, 2):
        assert not a.overlaps(b)
    legend = _curve_axes(fig).get_legend().get_window_extent(renderer)
    assert page.x0 <= legend.x0 and legend.x1 <= page.x1 + 0.5 and page.y0 <= legend.y0 and legend.y1 <= page.y1 + 0.5

    # the figure grows with the variants (a fixed height would squeeze 40 rows into the space of 3)
    small = compare(CompareArgs([str(make_sweep(tmp_path / "small", {"baseline": 0.0, "a": -0.01}, seeds=2))]))
    assert fig.get_size_inches()[1] > 3 * _plot_figure(small).get_size_inches()[1]
    plot(small, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_name_longer_than_a_line_is_wrapped_not_cut(tmp_path):
    long = "kd-" + "procrustes-weight0.5-" * 8  # 171 characters, no spaces: split at hyphens
    make_sweep(tmp_path, {"baseline": 0.0, long: -0.01}, seeds=2)
    fig = _plot_figure(compare(CompareArgs([str(tmp_path)])))
    (label,) = [t.get_text() for t in _diff_axes(fig).get_yticklabels() if t.get_text()]
    assert "\n" in label and label.replace("\n", "") == long and max(map(len, label.split("\n"))) <= 64
    assert _wrap_name("short") == "short"


def test_intervals_are_the_paired_differences_and_significance_is_marked(tmp_path):
    make_sweep(tmp_path, {"baseline": 0.0, "worse": -0.05, "same": 0.0})
    result = compare(CompareArgs([str(tmp_path)]))
    c = result.metrics[0]
    versus = {v.variant: v for v in c.versus}
    own = {v.variant: v.summary for v in c.variants}
    ax = _diff_axes(plot_fig := _plot_figure(result))
    for name in ("worse", "same"):
        vb = versus[name]
        assert tuple(_line(ax, f"interval:{name}").get_xdata()) == pytest.approx((vb.diff_ci_low, vb.diff_ci_high))
        assert tuple(_line(ax, f"diff:{name}").get_xdata()) == pytest.approx((vb.diff,))
    # the seeds' spread (0.68 .. 0.75) cancels in the paired differences: the variant's own interval is
    # many times wider than the interval drawn
    worse = versus["worse"]
    assert (own["worse"].ci_high - own["worse"].ci_low) > 5 * (worse.diff_ci_high - worse.diff_ci_low)
    assert worse.verdict == "worse" and versus["same"].verdict == "n.s."
    right = {t.get_text(): t.get_color() for t in ax.child_axes[0].get_yticklabels()}
    assert any(text.startswith("significant (worse)") and colour == "tab:red" for text, colour in right.items())
    assert any(text.startswith("n.s.") for text in right)
    assert _line(ax, "diff:worse").get_color() == "tab:red"
    assert "cut" not in ax.get_xlabel()  # nothing was cut
    assert plot_fig.axes[0].get_title().startswith("accuracy: difference from the baseline baseline")


def test_unpaired_comparisons_are_marked(tmp_path):
    make_sweep(tmp_path, {"baseline": 0.0}, seeds=3)
    for seed in (10, 11, 12):  # no seed shared with the baseline: nothing to pair
        write_run(tmp_path, "kd", seed, BASE_ACC[seed - 10] - 0.05)
    result = compare(CompareArgs([str(tmp_path)]))
    (vb,) = result.metrics[0].versus
    assert not vb.paired
    ax = _diff_axes(_plot_figure(result))
    assert _line(ax, "diff:kd").get_markerfacecolor() == "white"  # hollow
    assert any(t.get_text().endswith(", unpaired") for t in ax.child_axes[0].get_yticklabels())


def test_difference_range():
    assert _difference_range("accuracy") == (-1.0, 1.0)
    assert _difference_range("mcc") == (-2.0, 2.0)
    assert _difference_range("rougeL") == (-100.0, 100.0)  # ROUGE-L x 100
    assert _difference_range("procrustes") == (-2.0, 2.0)  # D^2 = 2 - 2 rho in [0, 2]
    assert _difference_range("procrustes_angular") == pytest.approx((-math.pi / 2, math.pi / 2))
    assert _difference_range("perplexity") == (-math.inf, math.inf)  # >= 1, unbounded above: nothing to cut
    assert _difference_range("some_new_score") == (-math.inf, math.inf)


def test_intervals_are_cut_to_the_metric_range_and_the_plot_says_so(tmp_path):
    make_sweep(tmp_path, {"baseline": 0.0, "wide": -0.05, "fine": 0.01})
    result = compare(CompareArgs([str(tmp_path)], metric="accuracy,procrustes"))
    result = _with_interval(result, "accuracy", "wide", -3.5, 2.25)
    result = _with_interval(result, "procrustes", "wide", -0.5, 7.0)
    fig = _plot_figure(result)
    acc, proc = _diff_axes(fig, 0), _diff_axes(fig, 1)

    assert tuple(_line(acc, "interval:wide").get_xdata()) == (-1.0, 1.0)
    assert [line.get_marker() for line in acc.get_lines() if line.get_gid() == "cut:wide"] == ["<", ">"]
    assert "2 interval ends cut at [-1, 1], the range of a difference of two accuracy values" in acc.get_xlabel()
    fine = next(v for v in result.metrics[0].versus if v.variant == "fine")
    assert tuple(_line(acc, "interval:fine").get_xdata()) == pytest.approx((fine.diff_ci_low, fine.diff_ci_high))
    assert not [line for line in acc.get_lines() if line.get_gid() == "cut:fine"]

    assert tuple(_line(proc, "interval:wide").get_xdata()) == (-0.5, 2.0)  # only the upper end is cut
    assert [line.get_marker() for line in proc.get_lines() if line.get_gid() == "cut:wide"] == [">"]
    assert "1 interval end cut at [-2, 2]" in proc.get_xlabel()
    left, right = acc.get_xlim()
    assert -1.2 < left <= -1.0 and 1.0 <= right < 1.2  # the axis follows the cut interval, not -3.5 .. 2.25

    # a difference outside the range (only corrupt scores give one) is drawn at the edge, and said so
    bad = _plot_figure(_with_interval(result, "accuracy", "fine", -0.1, 0.1, diff=1.5))
    assert tuple(_line(_diff_axes(bad), "diff:fine").get_xdata()) == (1.0,)
    assert "1 difference outside [-1, 1] drawn at its edge" in _diff_axes(bad).get_xlabel()


def _keep_last_eval(run: Path) -> None:
    """Rewrite metrics.jsonl with only the final "eval" event (a run evaluated once, at its end)."""
    path = run / rundir.METRICS
    events = [json.loads(line) for line in path.read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    path.write_text("".join(json.dumps(e) + "\n" for e in events if e["event"] != "eval" or e is evals[-1]))


def test_one_point_learning_curves_are_drawn_as_points(tmp_path):
    make_sweep(tmp_path, {"baseline": 0.0, "once": -0.02}, seeds=2)
    for run in tmp_path.glob("once-seed*"):
        _keep_last_eval(run)
    result = compare(CompareArgs([str(tmp_path)]))
    ax = _curve_axes(_plot_figure(result))
    once, base = _line(ax, "curve:once"), _line(ax, "curve:baseline")
    assert len(once.get_xdata()) == 1 and once.get_xdata()[0] == 20
    assert once.get_marker() not in (None, "", " ", "None", "none") and once.get_markersize() >= 5
    assert once.get_linestyle() == "None"  # a point, not a line of length zero
    assert len(base.get_xdata()) == 2 and base.get_linestyle() != "None"  # a curve stays a line


def test_only_the_baseline_and_huge_figures(tmp_path):
    make_sweep(tmp_path, {"baseline": 0.0}, seeds=2)
    fig = _plot_figure(compare(CompareArgs([str(tmp_path)])))
    assert any("no variant to compare" in t.get_text() for t in _diff_axes(fig).texts)
    # Agg refuses images over 2^16 pixels a side: a very tall figure is saved at a lower dpi
    fig.set_size_inches(12, 900)
    assert _plot_dpi(fig) * 900 <= 30_000 + 1e-6
    fig.set_size_inches(12, 20)
    assert _plot_dpi(fig) == 110


# ---- grid sweeps: the panel along the swept value (issue 16 F) -------------------------------------------------------


def test_a_grid_adds_score_and_geometry_against_the_swept_value(tmp_path):
    from test_report_compare import WEIGHTS, make_grid

    root = make_sweep(tmp_path / "runs", {"kd": 0.0}, seeds=3)
    make_grid(root, WEIGHTS)
    make_grid(root, [({"losses[2].weight": w}, 0.0, 0.35) for w in (0.1, 10.0)], base="kd-gram")
    result = compare(CompareArgs([str(root)], baseline="kd"))
    fig = _plot_figure(result)
    assert len(fig.axes) == 4  # differences, curves, and the sweep row's two panels
    score, geometry = fig.axes[2], fig.axes[3]
    assert score.get_xscale() == "log" and geometry.get_xscale() == "log"  # 0.1 .. 10 spans >= 10x
    line = _line(score, "sweep:kd-procrustes")
    assert list(line.get_xdata()) == [0.1, 3.0, 10.0]  # sorted by value
    assert [round(y, 4) for y in line.get_ydata()] == [0.7133, 0.7033, 0.6733]  # the means of the tables
    assert list(_line(score, "sweep:kd-gram").get_xdata()) == [0.1, 10.0]  # one line per base variant
    assert [round(y, 4) for y in _line(geometry, "sweep-geometry:kd-procrustes").get_ydata()] == [0.448, 0.39, 0.25]
    # the 95% interval of each mean is drawn: a vertical segment from ci_low to ci_high
    low, high = result.metrics[0].variants[1].summary.ci_low, result.metrics[0].variants[1].summary.ci_high
    assert any(list(seg.get_ydata()) == [low, high] for seg in score.get_lines())
    assert "baseline kd" in [t.get_text() for t in score.get_legend().get_texts()]
    plot(result, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_swept_axis_scale():
    from kdgeo.report_compare import sweep_axis

    assert sweep_axis([0.3, 0.1, 0.9]) == ("linear", [0.1, 0.3, 0.9])  # < 10x: linear
    assert sweep_axis([1.0, 0.1]) == ("log", [0.1, 1.0])  # 10x: log
    assert sweep_axis([3.0, 0.1, 1.0]) == ("log", [0.1, 1.0, 3.0])
    assert sweep_axis([0, 10, 100]) == ("linear", [0, 10, 100])  # not all positive
    assert sweep_axis(["tokens", "mean", "tokens"]) == ("category", ["tokens", "mean"])  # strings: in order given
    assert sweep_axis([True, False]) == ("category", [True, False])


def test_a_string_grid_is_drawn_on_categories(tmp_path):
    from test_report_compare import make_grid

    root = make_grid(tmp_path / "runs", [({"features.rows": r}, 0.0, 0.3) for r in ("tokens", "mean")], seeds=2)
    fig = _plot_figure(compare(CompareArgs([str(root)])))
    score = fig.axes[2]
    assert [t.get_text() for t in score.get_xticklabels()] == ["mean", "tokens"]  # compare's order: sorted text
    assert list(_line(score, "sweep:kd-procrustes").get_xdata()) == [0.0, 1.0]
