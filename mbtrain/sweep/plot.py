"""The sweep's picture, SWEEP/sweep.png and SWEEP/sweep.svg, drawn from sweep.json's summary alone.

Left: each method's paired difference to the baseline in the test metric (method − baseline, seed by seed), with
its 95 % paired t interval, one row per method and one marker and colour per task, the main task emphasised; a
hollow marker is a mean without an interval (fewer than 2 seeds). Tasks reported in different metrics (a
regression task's RMSE beside binary tasks' AUC: sweep.json's `task_metrics`) get a panel each, side by side, so
that no axis mixes units. Right: the trade-off, one small panel per
auxiliary task: the main task's test metric (y) against that task's (x), one point per method with its standard
deviation over seeds as error bars, the baseline a black star with dotted guides. Beyond NAMED_POINTS methods
besides the baseline the points carry numbers instead of names, keyed by the left panel's rows ("3 · famo"), on
axes that fit the means, without the bars (the widest is noted; the intervals are on the left), so that 26
methods stay readable. Beneath, for a sweep with --trials, the budget: each method's best validation score
against the number of its trials so far.

matplotlib is an optional extra (`pip install 'mbtrain[plot]'`): callers check `have_matplotlib()` first. The
figure is drawn on its own Agg canvas, never through pyplot, so no global backend or figure registry is touched;
the SVG's element ids are salted with a fixed string and neither file carries a date, so the same summary gives
the same bytes.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

INSTALL = "pip install 'mbtrain[plot]'"
PICTURES = ("sweep.png", "sweep.svg")

_MAIN_COLOUR = "#1f4e9c"
_AUX_COLOURS = ("#d95f02", "#7570b3", "#1b9e77", "#e7298a", "#66a61e", "#a6761d")
_TASK_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_METHOD_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf")
_STYLE = {"svg.hashsalt": "mbtrain-sweep", "svg.fonttype": "path", "font.size": 9, "axes.titlesize": 10,
          "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": 8}
_DPI = 150
NAMED_POINTS = 8  # methods besides the baseline whose trade-off points carry names; beyond, numbers
_BUDGET_HEIGHT = 2.8  # inches of the --trials panel beneath the rest


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (the `plot` extra); never raises."""
    try:
        import matplotlib  # noqa: F401
    except Exception:  # missing, blocked or broken: no picture either way
        return False
    return True


def write_picture(summary: dict[str, Any], folder: Path) -> list[Path]:
    """Draw the summary into folder/sweep.png and folder/sweep.svg; returns their paths.

    Raises ImportError (naming the extra to install) when matplotlib is missing."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(f"the sweep picture needs matplotlib: {INSTALL}") from error
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in PICTURES]
    with matplotlib.rc_context(_STYLE):  # restored on exit: nothing global changes
        figure = draw(summary, Figure, FigureCanvasAgg)
        try:
            for path in paths:
                figure.savefig(path, format=path.suffix[1:], dpi=_DPI, metadata={"Date": None})
        finally:
            figure.clear()  # the figure was never registered with pyplot: dropping it is closing it
    return paths


def draw(summary: dict[str, Any], figure_class: Any, canvas_class: Any) -> Any:
    """The picture as a matplotlib figure of `figure_class` on a `canvas_class` (write_picture's Agg)."""
    tasks: list[str] = list(summary["tasks"])
    main = summary["main_task"]
    tasks = [main] + [task for task in tasks if task != main]
    auxiliary = tasks[1:]
    baseline, metric = summary["baseline"], summary["metric"]
    methods: dict[str, dict[str, Any]] = summary["methods"]
    others = [method for method in methods if method != baseline]
    higher = summary.get("higher_is_better")  # optional: only words the axis labels when known
    metrics = {task: (summary.get("task_metrics") or {}).get(task, metric) for task in tasks}
    highers = {task: (summary.get("task_higher_is_better") or {}).get(task, higher) for task in tasks}
    kinds = list(dict.fromkeys(metrics.values()))  # the left panels, the main task's metric first
    numbers = {method: str(row + 1) for row, method in enumerate(others)} \
        if auxiliary and len(others) > NAMED_POINTS else {}

    row_height = 0.2 * len(tasks) + 0.35
    height = max(4.2, row_height * max(len(others), 1) + 2.0, (2.9 * len(auxiliary) + 1.3) if auxiliary else 0)
    width = (12.0 if auxiliary else 7.5) + 4.0 * (len(kinds) - 1)
    budget = summary.get("budget")  # --trials: a panel of each method's best validation score against its trials
    rows = max(len(auxiliary), 1)
    figure = figure_class(figsize=(width, height + (_BUDGET_HEIGHT if budget else 0)), dpi=_DPI,
                          layout="constrained")
    canvas_class(figure)  # attaches itself: the non-interactive Agg canvas
    grid = figure.add_gridspec(rows + bool(budget), 2 if auxiliary else 1,
                               width_ratios=[1.45 * len(kinds), 1] if auxiliary else [1],
                               height_ratios=[height / rows] * rows + ([_BUDGET_HEIGHT] if budget else []))
    left = grid[:rows, 0].subgridspec(1, len(kinds)) if len(kinds) > 1 else None
    for at, kind in enumerate(kinds):
        shown = [task for task in tasks if metrics[task] == kind]
        _differences(figure.add_subplot(left[0, at] if left is not None else grid[:rows, 0]), tasks, shown,
                     baseline, kind, methods, others, highers[shown[0]], first=at == 0, numbers=numbers)
    if budget:
        _budget(figure.add_subplot(grid[rows, :]), budget, metric, summary["seeds"][0])
    panels = [figure.add_subplot(grid[row, 1]) for row in range(len(auxiliary))]
    points = [_trade_off(axes, main, task, baseline, metrics, methods, highers[task], numbers)
              for axes, task in zip(panels, auxiliary, strict=True)]
    seeds = _seeds(methods, tasks)
    named = " / ".join(kinds)
    right = "trade-off of the means (right)" if numbers else "trade-off with std over seeds (right)"
    figure.suptitle(f"Test {named} on the test rows, {seeds} seed{'s' if seeds != 1 else ''}, against {baseline}: "
                    f"95 % paired t intervals (left), {right}"
                    if auxiliary else
                    f"Test {named} on the test rows, {seeds} seed{'s' if seeds != 1 else ''}, against {baseline}: "
                    f"95 % paired t intervals", fontsize=11)
    if auxiliary:  # labels last, on a frozen layout, so that their measured places hold
        figure.draw_without_rendering()
        figure.set_layout_engine("none")
        renderer = figure.canvas.get_renderer()
        for axes, placed in zip(panels, points, strict=True):
            _label(axes, placed, renderer)
    return figure


def _budget(axes: Any, budget: dict[str, Any], metric: str, seed: int) -> None:
    """Each method's best validation metric after each of its trials (in the order asked), as steps: a curve still
    climbing at the right edge says the budget was short."""
    trials = budget["trials"]
    for at, (method, account) in enumerate(budget["methods"].items()):
        values = [math.nan if value is None else value for value in account["curve"]]
        axes.step(range(1, len(values) + 2), values + values[-1:], where="post",
                  color=_METHOD_COLOURS[at % len(_METHOD_COLOURS)],
                  linestyle=("-", "--", ":")[at // len(_METHOD_COLOURS) % 3], label=method)
    axes.set_xlim(0.5, trials + 0.5)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_xlabel(f"trials (budget: {trials} per method)")
    axes.set_ylabel(f"best valid {metric} so far")
    axes.set_title(f"Tuning on seed {seed}'s validation rows: each method's best {metric} against its trials",
                   loc="left")
    axes.grid(alpha=0.3)
    count = len(budget["methods"])
    axes.legend(loc="lower right", ncol=max(1, math.ceil(count / 6)), fontsize=7 if count > 6 else 8)


def _differences(axes: Any, tasks: list[str], shown: list[str], baseline: str, metric: str,
                 methods: dict[str, dict[str, Any]], others: list[str], higher: bool | None,
                 first: bool = True, numbers: dict[str, str] | None = None) -> None:
    """One row per method (report order, top down), one dodged marker per task of `shown` (those of `tasks`
    reported in `metric`; a task keeps its style by its place in `tasks`): mean difference and interval. The
    first panel names the methods (after their `numbers`, where the trade-off panels use them) and their verdicts
    on the main task."""
    from matplotlib.lines import Line2D
    from matplotlib.transforms import ScaledTranslation

    axes.set_title(f"Paired difference to {baseline}, seed by seed (method − {baseline})" if first
                   else f"… in {metric}", loc="left")
    if not others:
        axes.text(0.5, 0.5, f"only {baseline} ran: nothing to compare", ha="center", va="center",
                  transform=axes.transAxes)
        axes.set_xticks([])
        axes.set_yticks([])
        return
    offsets = [0.0] if len(shown) == 1 else [0.32 - 0.64 * i / (len(shown) - 1) for i in range(len(shown))]
    hollow = False
    labels = []
    for row, method in enumerate(others):
        y = -row
        if row % 2 == 0:
            axes.axhspan(y - 0.5, y + 0.5, color="#f2f2f2", zorder=0, linewidth=0)
        pairs = methods[method].get("paired") or {}
        for place, task in enumerate(shown):
            index = tasks.index(task)
            pair = pairs.get(task) or {}
            mean, low, high = _number(pair.get("mean")), _number(pair.get("low")), _number(pair.get("high"))
            if mean is None:
                continue
            colour, marker, size, width = _task_style(index)
            at = y + offsets[place]
            if low is not None and high is not None:
                axes.plot([low, high], [at, at], color=colour, linewidth=width, solid_capstyle="butt", zorder=2)
                axes.plot([low, low, math.nan, high, high], [at - 0.05, at + 0.05, math.nan, at - 0.05, at + 0.05],
                          color=colour, linewidth=width * 0.7, zorder=2)
                face = colour
            else:
                face, hollow = "white", True
            axes.plot([mean], [at], marker=marker, markersize=size, color=colour, markerfacecolor=face,
                      markeredgewidth=1.4, linestyle="none", zorder=3)
        main = pairs.get(tasks[0]) or {}
        name = f"{numbers[method]} · {method}" if numbers else method
        labels.append(f"{name}\n{_short(main.get('verdict'))}, n={main.get('n', 0)}")
    axes.axvline(0.0, color="#444444", linestyle="--", linewidth=1.0, zorder=1)
    axes.set_yticks([-row for row in range(len(others))], labels if first else [])
    axes.set_ylim(-len(others) + 0.5, 0.5)
    axes.tick_params(axis="y", length=0)
    axes.margins(x=0.08)
    direction = {True: " (right: method better)", False: " (left: method better)"}.get(higher, "")
    axes.set_xlabel(f"Δ test {metric}, method − {baseline}{direction}")
    axes.grid(axis="x", color="#dddddd", linewidth=0.6, zorder=0)
    handles = []
    for task in shown:
        index = tasks.index(task)
        colour, marker, size, width = _task_style(index)
        handles.append(Line2D([], [], color=colour, marker=marker, markersize=size, linewidth=width,
                              label=f"{task} (main)" if index == 0 else task))
    if hollow:
        handles.append(Line2D([], [], color="#555555", marker="o", markerfacecolor="white", linestyle="none",
                              label="mean only (no interval: < 2 seeds)"))
    below = axes.transAxes + ScaledTranslation(0, -0.48, axes.figure.dpi_scale_trans)  # under the x label
    axes.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=below,
                ncol=len(handles) if len(handles) <= 4 else 3, frameon=False)


def _trade_off(axes: Any, main: str, task: str, baseline: str, metrics: dict[str, str],
               methods: dict[str, dict[str, Any]], higher: bool | None, numbers: dict[str, str]
               ) -> list[tuple[float, float, str, str]]:
    """The main task's test metric against one auxiliary task's (each in its own, `metrics`; `higher`: the
    auxiliary task's direction), one point per method; the points to label, by name or by `numbers`."""
    points = []
    crowded = bool(numbers)  # many methods: the means alone, on axes that fit them, which the bars would swamp
    spreads = []
    colours = itertools.cycle(_METHOD_COLOURS)  # drawn for every method, so a method keeps its colour
    for method, block in methods.items():
        test = block.get("test") or {}
        mine, theirs = test.get(main) or {}, test.get(task) or {}
        y, x = _number(mine.get("mean")), _number(theirs.get("mean"))
        is_baseline = method == baseline
        colour = "black" if is_baseline else next(colours)
        if x is None or y is None:
            continue
        bars = (None, None) if crowded else (_bar(theirs.get("std")), _bar(mine.get("std")))
        spreads += [value for value in (_bar(theirs.get("std")), _bar(mine.get("std"))) if value is not None]
        axes.errorbar([x], [y], xerr=bars[0], yerr=bars[1], marker="*" if is_baseline else "o",
                      markersize=11 if is_baseline else 6, color=colour, ecolor=colour, elinewidth=1.0, capsize=2.5,
                      linestyle="none", zorder=3)
        if is_baseline:
            axes.axhline(y, color="#888888", linestyle=":", linewidth=0.9, zorder=1)
            axes.axvline(x, color="#888888", linestyle=":", linewidth=0.9, zorder=1)
        points.append((x, y, numbers.get(method, method), colour))
    if not points:
        axes.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=axes.transAxes)
    elif crowded:
        for values, limits in (([p[0] for p in points], axes.set_xlim), ([p[1] for p in points], axes.set_ylim)):
            low, high = min(values), max(values)
            pad = 0.15 * (high - low) or 0.01 * abs(high) or 0.01
            limits(low - pad, high + pad)
        widest = f", std up to {max(spreads):.4f}" if spreads else ""
        axes.text(0.01, 0.005, f"means over seeds{widest}; numbers: rows at left", fontsize=7,
                  color="#555555", transform=axes.transAxes, ha="left", va="bottom")
    better = {True: " (higher is better)", False: " (lower is better)"}.get(higher, "")
    axes.set_xlabel(f"{task} test {metrics[task]}{better}")
    axes.set_ylabel(f"{main} test {metrics[main]}")
    axes.set_title(f"Trade-off: {main} against {task}", loc="left")
    axes.margins(0.18)
    axes.grid(color="#e5e5e5", linewidth=0.6, zorder=0)
    axes.ticklabel_format(useOffset=False)
    return points


def _label(axes: Any, points: list[tuple[float, float, str, str]], renderer: Any) -> None:
    """Each point's method name, at the nearby place that covers the fewest other labels and points."""
    places = ((5, 5, "left", "bottom"), (5, -5, "left", "top"), (-5, 5, "right", "bottom"),
              (-5, -5, "right", "top"), (0, 8, "center", "bottom"), (0, -8, "center", "top"),
              (9, 0, "left", "center"), (-9, 0, "right", "center"))
    inside = axes.get_window_extent(renderer)
    dots = []
    for x, y, _, _ in points:
        px, py = axes.transData.transform((x, y))
        dots.append((px - 6, py - 6, px + 6, py + 6))
    taken: list[tuple[float, float, float, float]] = []
    for index, (x, y, name, colour) in enumerate(points):
        best = None
        for dx, dy, ha, va in places:
            text = axes.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                                 fontsize=8, color=colour, zorder=4, annotation_clip=False)
            text.set_in_layout(False)
            box = text.get_window_extent(renderer)
            box = (box.x0, box.y0, box.x1, box.y1)
            cost = sum(_overlap(box, other) for other in taken)
            cost += sum(_overlap(box, dot) for i, dot in enumerate(dots) if i != index)
            cost += 4 * ((box[2] - box[0]) * (box[3] - box[1]) - _overlap(box, (inside.x0, inside.y0, inside.x1,
                                                                                    inside.y1)))
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, text, box)
            else:
                text.remove()
            if cost == 0:
                break
        taken.append(best[2])


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _task_style(index: int) -> tuple[str, str, float, float]:
    """(colour, marker, marker size, line width): the main task (index 0) darker, larger and thicker."""
    if index == 0:
        return _MAIN_COLOUR, _TASK_MARKERS[0], 8.0, 2.6
    return (_AUX_COLOURS[(index - 1) % len(_AUX_COLOURS)], _TASK_MARKERS[index % len(_TASK_MARKERS)], 5.5, 1.3)


def _short(verdict: Any) -> str:
    if not isinstance(verdict, str):
        return "no comparison"
    if verdict in ("better", "worse"):
        return verdict
    if verdict.startswith("no difference once adjusted"):
        return "none after Holm"
    if verdict.startswith("no difference"):
        return "no detectable difference"
    if verdict.startswith("no interval"):
        return "no interval"
    return verdict if len(verdict) <= 28 else verdict[:27] + "…"


def _seeds(methods: dict[str, dict[str, Any]], tasks: list[str]) -> int:
    """The most seeds any figure rests on (max n)."""
    counts = [0]
    for block in methods.values():
        for part in ("test", "paired"):
            for task in tasks:
                counts.append(int(((block.get(part) or {}).get(task) or {}).get("n") or 0))
    return max(counts)


def _number(value: Any) -> float | None:
    """A finite float, or None (missing, None or NaN as json.loads gives it)."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _bar(std: Any) -> float | None:
    value = _number(std)
    return None if value is None else abs(value)
