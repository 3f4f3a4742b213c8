"""The sweep's pictures: W&B's parallel-coordinates panel drawn locally (a png, and an html
page whose plotly.js is one shared copy, `shared_plotly_js`), and the Pareto plots of
accuracy against BitOps and against compressed size."""

import os
from pathlib import Path

from mobilenet_compression.files import atomic_write

from .table import CATEGORIES, GIGA, pareto_front, plan_kind, run_label, varying_categories


# The parallel-coordinates axes, left to right: what was chosen, what it costs, what it gives.
AXES = ["weight_bits", "activation_bits", "compression_ratio", "compressed_mb", "bitops",
        "quant_acc"]


AXIS_LABELS = {
    "weight_bits": "weight_bits",
    "activation_bits": "activation_bits",
    "compression_ratio": "compression_ratio (x)",
    "compressed_mb": "compressed_mb (MB)",
    "bitops": "bitops (G)",
    "quant_acc": "quant_acc (%)",
}




# plotly.js is 4.6 MiB; a page that embeds it is too heavy to keep one per sweep in the repo,
# so every page loads one shared copy (shared_plotly_js) and stays a few kB.
HTML_LIMIT_BYTES = 200_000


# How many folders above a page shared_plotly_js looks for a copy of plotly.js: the sweep's
# folder's parent, the checkpoint's folder's parent (results/), and the repository.
PLOTLY_JS_LEVELS = 3


def _axis_values(df, axis):
    values = df[axis].astype(float)
    return values / GIGA if axis == "bitops" else values


def _panel_axes(df):
    """The parallel-coordinates axes this table has, as (label, values, ticks): ticks are
    [(value, text)] for discrete axes, None where the axis' scale picks them. A run parameter
    that is a category (calibration, method, bias correction) and varies gets its own axis."""
    import numpy as np

    names = [a for a in AXES if a in df.columns and df[a].notna().all()]
    at = names.index("activation_bits") + 1 if "activation_bits" in names else 0
    names[at:at] = varying_categories(df)
    axes = []
    for name in names:
        if name in CATEGORIES:
            methods = sorted(df[name].astype(str).unique())
            values = df[name].astype(str).map(methods.index).to_numpy(float)
            ticks = list(enumerate(methods))
        else:
            values = _axis_values(df, name).to_numpy()
            ticks = None
            if name in ("weight_bits", "activation_bits"):
                ticks = [(v, f"{v:g}") for v in np.unique(values)]
        axes.append((AXIS_LABELS.get(name, name), values, ticks))
    return axes


def _nice_ticks(lo, hi):
    from matplotlib.ticker import MaxNLocator

    if hi == lo:
        return [(lo, _tick_text(lo))]
    ticks = MaxNLocator(nbins=5).tick_values(lo, hi)
    span = hi - lo
    return [(t, _tick_text(t)) for t in ticks if lo - 1e-9 * span <= t <= hi + 1e-9 * span]


def _tick_text(value):
    return f"{round(float(value), 2):g}"


def plot_parallel_coordinates(df, path):
    """W&B's parallel-coordinates panel in matplotlib: one vertical axis per column, each
    scaled to its own range with its own tick labels, one line per run coloured by accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    axes = _panel_axes(df)

    def scaled(values, lo, hi):
        return np.full_like(values, 0.5) if hi == lo else (values - lo) / (hi - lo)

    fig, ax = plt.subplots(figsize=(1.75 * len(axes) + 1.5, 6))
    color = df["quant_acc"].astype(float).to_numpy()
    norm = matplotlib.colors.Normalize(color.min(), color.max() if color.max() > color.min()
                                       else color.min() + 1)
    cmap = matplotlib.colormaps["viridis"]
    xs = np.arange(len(axes))
    ys = np.stack([scaled(v, v.min(), v.max()) for _, v, _ in axes], axis=1)
    # Best runs drawn last, so they sit on top.
    for i in np.argsort(color):
        ax.plot(xs, ys[i], color=cmap(norm(color[i])), linewidth=1.8, alpha=0.85)
    for x, (_, values, ticks) in zip(xs, axes):
        ax.axvline(x, color="black", linewidth=1)
        lo, hi = values.min(), values.max()
        for tick, text in ticks or _nice_ticks(lo, hi):
            y = 0.5 if hi == lo else (tick - lo) / (hi - lo)
            ax.plot([x - 0.03, x], [y, y], color="black", linewidth=1)
            ax.text(x - 0.05, y, text, ha="right", va="center", fontsize=9,
                    zorder=3, bbox=dict(facecolor="white", edgecolor="none", alpha=0.85,
                                        pad=0.5))
    ax.set_xticks(xs, [label.replace(" (", "\n(") for label, _, _ in axes], fontsize=10)
    ax.set_xlim(-0.4, len(axes) - 0.8)
    ax.set_ylim(-0.05, 1.05)
    ax.set_yticks([])
    for side in ("left", "right", "top", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"Quantization sweep: {len(df)} runs, coloured by quant_acc")
    bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02)
    bar.set_label("quant_acc (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def shared_plotly_js(html_dir):
    """The one plotly.js file that the pages in `html_dir` load: the nearest
    plotly-<version>.min.js in the PLOTLY_JS_LEVELS folders above it, else a copy written into
    its parent (so the sweeps of one results folder share it and open offline from file://)."""
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    name = f"plotly-{get_plotlyjs_version()}.min.js"
    html_dir = Path(html_dir).resolve()
    for folder in list(html_dir.parents)[:PLOTLY_JS_LEVELS]:
        if (folder / name).is_file():
            return folder / name
    target = html_dir.parent / name
    atomic_write(target, lambda f: f.write(get_plotlyjs().encode()))
    return target


def write_parallel_coordinates_html(df, path):
    """The same panel as an interactive plotly page: drag on any axis to keep a range."""
    import plotly.graph_objects as go

    dimensions = []
    for label, values, ticks in _panel_axes(df):
        dim = dict(label=label, values=values)
        if ticks:
            dim.update(tickvals=[t for t, _ in ticks], ticktext=[text for _, text in ticks])
        dimensions.append(dim)
    fig = go.Figure(go.Parcoords(
        line=dict(color=df["quant_acc"].astype(float), colorscale="Viridis", showscale=True,
                  colorbar=dict(title="quant_acc (%)")),
        dimensions=dimensions,
        unselected=dict(line=dict(opacity=0.05)),
    ))
    fig.update_layout(title=f"Quantization sweep: {len(df)} runs, coloured by quant_acc "
                            f"(drag along an axis to filter)", margin=dict(l=80, r=80, t=100))
    # plotly.js by a relative path, not from a CDN: the page works on an air-gapped machine.
    path = Path(path)
    js = os.path.relpath(shared_plotly_js(path.parent), path.parent.resolve())
    html = fig.to_html(include_plotlyjs=Path(js).as_posix(), full_html=True)
    atomic_write(path, lambda f: f.write(html.encode()))
    return path


def _place_labels(fig, ax, xs, ys, texts, front, colors=None):
    """Label points without letting labels overprint: front points first, each label tried at
    a few offsets around its point, and dropped (the table has it) where all of them collide."""
    import numpy as np
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    placed = [ax.get_legend().get_window_extent(renderer)] if ax.get_legend() else []
    # The markers are obstacles too, so that no label hides another point.
    for px, py in ax.transData.transform(np.column_stack([xs, ys])):
        placed.append(Bbox([[px - 4, py - 4], [px + 4, py + 4]]))
    offsets = [(5, 3), (5, -11), (-5, 3), (-5, -11), (5, 10), (-5, 10), (5, -18), (-5, -18)]
    for i in sorted(range(len(xs)), key=lambda i: (not front[i], -ys[i])):
        color = colors[i] if colors is not None else "tab:red"
        style = dict(fontsize=8, color=color, fontweight="bold") if front[i] else \
            dict(fontsize=7, color="dimgray")
        for dx, dy in offsets:
            label = ax.annotate(texts[i], (xs[i], ys[i]), textcoords="offset points",
                                xytext=(dx, dy), ha="left" if dx > 0 else "right", zorder=5,
                                **style)
            box = label.get_window_extent(renderer)
            inside = ax.get_window_extent(renderer)
            fits = (box.x0 >= inside.x0 and box.x1 <= inside.x1 and box.y0 >= inside.y0
                    and box.y1 <= inside.y1)
            if fits and not any(box.overlaps(other) for other in placed):
                placed.append(box)
                break
            label.remove()
    return np.array(placed)


def plot_pareto(df, path):
    """Accuracy against BitOps and against compressed size, one panel each; the Pareto front
    (no run is both cheaper and more accurate) in red, every point labelled WxAy. A table with
    both uniform and mixed-precision runs gets one front per kind (uniform blue, mixed red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [(c, t) for c, t in (("bitops", "BitOps per image (G)"),
                                   ("compressed_mb", "compressed size (MB)"))
              if c in df.columns and df[c].notna().all()]
    if not panels:
        return None
    categories = varying_categories(df)
    fig, axs = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.5), squeeze=False)
    acc = df["quant_acc"].astype(float).to_numpy()
    labels = [run_label(r, categories) for _, r in df.iterrows()]
    kinds = np.array(plan_kind(df))
    groups = [("", np.ones(len(df), bool), "tab:red")] if len(set(kinds)) == 1 else [
        ("uniform ", kinds == "uniform", "tab:blue"), ("mixed ", kinds == "mixed", "tab:red")]
    for ax, (column, title) in zip(axs[0], panels):
        cost = _axis_values(df, column).to_numpy()
        for name, member, color in groups:
            c, a = cost[member], acc[member]
            front = pareto_front(c, a)
            ax.scatter(c[~front], a[~front], s=30, color=color if name else "tab:blue",
                       alpha=0.45, label=f"{name}dominated")
            order = np.argsort(c[front])
            ax.plot(c[front][order], a[front][order], "-o", color=color, markersize=7,
                    linewidth=1.5, label=f"{name}Pareto front")
        if cost.min() > 0 and cost.max() / cost.min() > 20:
            ax.set_xscale("log")  # 2-bit and 32-bit runs differ by orders of magnitude
        ax.set_xlabel(title)
        ax.set_ylabel("quant_acc (%)")
        ax.set_title(f"accuracy vs {title.split(' (')[0]}")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    colors = np.empty(len(df), object)
    for _, member, color in groups:
        colors[member] = color
    for ax, (column, _) in zip(axs[0], panels):
        cost = _axis_values(df, column).to_numpy()
        front = np.zeros(len(df), bool)  # each kind's own front
        for _, member, _ in groups:
            front[np.flatnonzero(member)[pareto_front(cost[member], acc[member])]] = True
        _place_labels(fig, ax, cost, acc, labels, front, colors)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
