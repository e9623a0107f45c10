"""The sweep picture (the optional `plot` extra): sweep.png and sweep.svg from a hand-made summary, deterministic,
tolerant of missing intervals and spreads, and a clear ImportError when matplotlib is missing."""

from __future__ import annotations

import copy
import math
import struct
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import pytest

from mbtrain.sweep.plot import INSTALL, have_matplotlib, write_picture

needs_matplotlib = pytest.mark.skipif(not have_matplotlib(), reason=f"matplotlib is missing: {INSTALL}")

TASKS = ["purchase", "click", "add_to_cart"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _pair(mean: float, half: float | None, n: int = 5) -> dict[str, Any]:
    if half is None:
        return {"n": n, "mean": mean, "low": None, "high": None, "verdict": "no interval: at least 2 seeds are needed"}
    verdict = "better" if mean - half > 0 else "worse" if mean + half < 0 else \
        f"no difference this sweep can detect (it would see about ±{half:.4f})"
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half, "verdict": verdict}


def _test(mean: float, std: float | None, n: int = 5) -> dict[str, Any]:
    return {"mean": mean, "std": std, "n": n}


def make_summary() -> dict[str, Any]:
    """3 methods over 3 tasks: gradnorm has one seed on the main task (no interval); click's std is None for
    metabalance."""
    return {
        "tasks": TASKS, "main_task": "purchase", "baseline": "none", "metric": "auc",
        "methods": {
            "none": {"test": {"purchase": _test(0.712, 0.004), "click": _test(0.681, 0.006),
                              "add_to_cart": _test(0.655, 0.005)}},
            "metabalance": {"test": {"purchase": _test(0.719, 0.003), "click": _test(0.679, None),
                                     "add_to_cart": _test(0.660, 0.004)},
                            "paired": {"purchase": _pair(0.007, 0.004), "click": _pair(-0.002, 0.005),
                                       "add_to_cart": _pair(0.005, 0.006)}},
            "gradnorm": {"test": {"purchase": _test(0.715, None, 1), "click": _test(0.690, 0.003),
                                  "add_to_cart": _test(0.650, 0.007)},
                         "paired": {"purchase": _pair(0.003, None, 1), "click": _pair(0.009, 0.003),
                                    "add_to_cart": _pair(-0.005, 0.004)}},
        },
    }


@needs_matplotlib
def test_writes_png_and_svg(tmp_path: Path) -> None:
    paths = write_picture(make_summary(), tmp_path / "sweep")
    assert paths == [tmp_path / "sweep" / "sweep.png", tmp_path / "sweep" / "sweep.svg"]
    png = paths[0].read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    assert 20_000 < len(png) < 5_000_000
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert 1000 <= width <= 4000 and 500 <= height <= 4000
    text = paths[1].read_text()
    root = ElementTree.fromstring(text)
    assert root.tag.endswith("svg")
    for name in ("none", "metabalance", "gradnorm", *TASKS, "auc", "test rows", "5 seeds", "95 % paired t intervals"):
        assert name in text, name
    assert "<dc:date>" not in text  # no timestamp: the same summary gives the same file


@needs_matplotlib
def test_same_summary_same_bytes_and_no_global_state(tmp_path: Path) -> None:
    import matplotlib
    from matplotlib import _pylab_helpers

    before = copy.deepcopy(dict(matplotlib.rcParams))
    figures = len(_pylab_helpers.Gcf.figs)
    first = write_picture(make_summary(), tmp_path / "a")
    second = write_picture(make_summary(), tmp_path / "b")
    for one, other in zip(first, second, strict=True):
        assert one.read_bytes() == other.read_bytes(), one.name
    assert dict(matplotlib.rcParams) == before
    assert len(_pylab_helpers.Gcf.figs) == figures


@needs_matplotlib
@pytest.mark.parametrize("case", ["one task", "baseline only", "nothing finished", "ten methods, four tasks"])
def test_degenerate_and_large_summaries_still_draw(tmp_path: Path, case: str) -> None:
    summary = make_summary()
    if case == "one task":
        summary["tasks"] = ["purchase"]
        for block in summary["methods"].values():
            block["test"] = {"purchase": block["test"]["purchase"]}
            if "paired" in block:
                block["paired"] = {"purchase": block["paired"]["purchase"]}
    elif case == "baseline only":
        summary["methods"] = {"none": summary["methods"]["none"]}
    elif case == "nothing finished":  # what json.loads gives for a paired block with no seeds: mean NaN
        for block in summary["methods"].values():
            block["test"] = {task: _test(None, None, 0) for task in TASKS}
            if "paired" in block:
                block["paired"] = {task: {"n": 0, "mean": math.nan, "low": None, "high": None,
                                          "verdict": "no interval: at least 2 seeds are needed"} for task in TASKS}
    else:
        tasks = [*TASKS, "favourite"]
        summary["tasks"] = tasks
        summary["methods"] = {"none": {"test": {task: _test(0.7, 0.01) for task in tasks}}}
        for i in range(9):
            summary["methods"][f"method-{i}"] = {
                "test": {task: _test(0.7 + 0.002 * i, 0.005) for task in tasks},
                "paired": {task: _pair(0.001 * (i - 4), 0.003) for task in tasks}}
    png, svg = write_picture(summary, tmp_path)
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    ElementTree.fromstring(svg.read_text())


def test_have_matplotlib_is_false_when_its_import_is_blocked(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the package were missing; nothing uninstalled
    assert have_matplotlib() is False
    with pytest.raises(ImportError, match=r"mbtrain\[plot\]"):
        write_picture(make_summary(), tmp_path)
    assert not (tmp_path / "sweep.png").exists()


@needs_matplotlib
def test_have_matplotlib_is_true_when_installed() -> None:
    assert have_matplotlib() is True


@needs_matplotlib
def test_twenty_six_methods_stay_readable() -> None:
    """Beyond NAMED_POINTS methods the trade-off points carry numbers keyed to the left panel's rows, on axes
    that fit the means (std over seeds ten times their spread, as a real sweep had), and no two labels overlap."""
    import random

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mbtrain.sweep.plot import _STYLE, draw

    rng = random.Random(0)
    tasks = ["purchase", "click"]
    methods: dict[str, Any] = {"none": {"test": {task: _test(0.7, 0.01) for task in tasks}}}
    for i in range(25):
        methods[f"balancer-{i}-representation"] = {
            "test": {task: _test(0.7 + rng.gauss(0, 0.001), 0.01) for task in tasks},
            "paired": {task: _pair(rng.gauss(0, 0.002), 0.003) for task in tasks}}
    summary = {"tasks": tasks, "main_task": "purchase", "baseline": "none", "metric": "auc", "methods": methods}
    with matplotlib.rc_context(_STYLE):
        figure = draw(summary, Figure, FigureCanvasAgg)
    renderer = figure.canvas.get_renderer()
    trade_off = next(axes for axes in figure.axes if axes.get_title(loc="left").startswith("Trade-off"))
    labels = [text for text in trade_off.texts if text.get_text() != "none" and not text.get_text().startswith("means")]
    assert sorted(int(text.get_text()) for text in labels) == list(range(1, 26))
    boxes = [text.get_window_extent(renderer) for text in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    means = [block["test"]["click"]["mean"] for block in methods.values()]
    low, high = trade_off.get_xlim()
    assert min(means) > low and max(means) < high and high - low < 2 * (max(means) - min(means))
    left = figure.axes[0].get_yticklabels()
    assert left[0].get_text().startswith("1 · balancer-0-representation")
