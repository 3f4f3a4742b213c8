"""The sweep report, drawn locally where the W&B sweep page would draw it:
`python sweep.py --report results/<sweep_id>` reads runs.csv and writes

- summary.md: the usual table (W_bits, A_bits, Accuracy, Drop, Orig_MB, Comp_MB, Ratio) plus
  BitOps, best configuration first, and the runs that failed;
- parallel_coordinates.png / .html: W&B's parallel-coordinates panel (the html one, plotly,
  lets you brush ranges on every axis, offline: it loads one shared plotly-<version>.min.js
  from a folder above it, see `shared_plotly_js`);
- pareto.png: accuracy against BitOps and against compressed size, Pareto front highlighted.

With `--uniform DIR` (a sweep of uniform bits, e.g. sweeps/bits.yaml's, on the same
checkpoint) a mixed-precision sweep's report also draws those runs, each kind with its own
Pareto front, and summary.md gives, for each mixed run, the best uniform run at no more BitOps.

Failed runs are listed in summary.md and left out of the pictures.
"""

import json
import os
from pathlib import Path

import pandas as pd

from mobilenet_compression.errors import ArgumentParser, UserError, cli
from mobilenet_compression.files import atomic_write
from mobilenet_compression.sweep import results

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
GIGA = 1e9
# plotly.js is 4.6 MiB; a page that embeds it is too heavy to keep one per sweep in the repo,
# so every page loads one shared copy (shared_plotly_js) and stays a few kB.
HTML_LIMIT_BYTES = 200_000
# How many folders above a page shared_plotly_js looks for a copy of plotly.js: the sweep's
# folder's parent, the checkpoint's folder's parent (results/), and the repository.
PLOTLY_JS_LEVELS = 3
METRICS_DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def get_args_parser():
    parser = ArgumentParser(
        prog="python sweep.py",
        description="Draw a sweep's report (summary.md, parallel coordinates, Pareto plot) "
                    "from its runs.csv.")
    parser.add_argument("--report", required=True, metavar="DIR",
                        help="the directory holding runs.csv, e.g. results/<sweep_id> "
                             "(or the runs.csv file itself)")
    parser.add_argument("--out_dir", default=None,
                        help="where to write the report (default: the directory of runs.csv)")
    parser.add_argument("--uniform", default=None, metavar="DIR", nargs="+",
                        help="uniform-bits sweeps of the same checkpoint to compare mixed "
                             "precision runs with (their runs.csv folders)")
    return parser


# ---------------------------------------------------------------------------------------------
# Data


def split_runs(df):
    """(finished runs with an accuracy, every other run) of a runs.csv table."""
    ok = df["status"] == results.FINISHED
    ok &= df["quant_acc"].notna() if "quant_acc" in df.columns else False
    return df[ok].copy(), df[~ok].copy()


def sort_runs(df):
    """Seed 004's order: weight bits, then activation bits, highest first."""
    keys = [c for c in ("weight_bits", "activation_bits", *CATEGORIES) if c in df.columns]
    return df.sort_values(keys, ascending=[c in CATEGORIES for c in keys]) if keys else df


def pareto_front(cost, gain):
    """Mask of the points no other point beats: none is at most as costly and strictly more
    accurate, or strictly cheaper and at least as accurate."""
    import numpy as np

    cost, gain = np.asarray(cost, float), np.asarray(gain, float)
    order = np.lexsort((-gain, cost))  # cheapest first, most accurate first among equals
    mask = np.zeros(len(cost), bool)
    best = -np.inf
    for i in order:
        if gain[i] > best:
            mask[i] = True
            best = gain[i]
    return mask


# Run parameters that are categories rather than numbers: where one varies in a sweep it gets
# a column in summary.md, a word in the run labels and a categorical parallel-coordinates axis.
CATEGORIES = ("method", "distill", "calibration", "weight_method", "weight_rounding",
              "bias_correction", "engine", "plan")


# Yes/no categories: a run label carries the word when the flag is on.
FLAG_WORDS = {"bias_correction": "+BC", "distill": "+KD"}


def varying_categories(df):
    return [c for c in CATEGORIES if _varies(df, c)]


def run_label(row, categories=()):
    if "weight_bits" not in row or "activation_bits" not in row:
        return str(row["run_id"])  # a sweep of something else than bits
    if _is_mixed(row):  # MAC-weighted mean bits of a plan that differs from layer to layer
        label = f"mix W{float(row['weight_bits']):.1f}A{float(row['activation_bits']):.1f}"
    else:
        label = f"W{float(row['weight_bits']):g}A{float(row['activation_bits']):g}"
    for c in categories:
        if c == "plan":
            continue  # the label says it
        if c in FLAG_WORDS:  # on: the word; off: nothing; another value (auto): word:value
            value = str(row[c])
            label += ("" if value in ("False", "nan") else f" {FLAG_WORDS[c]}" if value == "True"
                      else f" {FLAG_WORDS[c]}:{value}")
        else:
            label += f" {row[c]}"
    return label


def _is_mixed(row):
    return str(row.get("plan", "uniform")) not in ("uniform", "nan")


def plan_kind(df):
    """"mixed" or "uniform" for each run of a table (runs before --plan existed: uniform)."""
    if "plan" not in df.columns:
        return ["uniform"] * len(df)
    return ["mixed" if _is_mixed(r) else "uniform" for _, r in df.iterrows()]


def _varies(df, column):
    return column in df.columns and df[column].nunique(dropna=True) > 1


def _config_columns(df):
    return [c for c in ("weight_bits", "activation_bits", *CATEGORIES, "checkpoint")
            if c in df.columns]


# ---------------------------------------------------------------------------------------------
# summary.md


def _fmt(value, digits=2):
    try:
        if value != value:  # NaN
            return "—"
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def _markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _provenance(df):
    parts = []
    for column, name in (("checkpoint", "checkpoint"), ("dataset", "dataset"),
                         ("sweep_id", "sweep")):
        if column in df.columns:
            values = [str(v) for v in df[column].dropna().unique() if str(v)]
            if values:
                parts.append(f"{name} " + ", ".join(f"`{v}`" for v in values))
    return parts


def _made_by(csv_path):
    """summary.md lines naming the sweep yaml and the commands that made and redraw the report
    (from the agent's state file beside runs.csv), and where the columns are explained."""
    csv_path = Path(csv_path)
    lines = []
    try:
        state = json.loads((csv_path.parent / "agent_state.json").read_text())
    except (OSError, ValueError):
        state = {}
    if state.get("sweep_file"):
        lines.append(f"Made by `python sweep.py --sweep {state['sweep_file']} "
                     f"--results_dir {csv_path.parent.parent}` (the sweep yaml "
                     f"`{state['sweep_file']}`).")
    lines.append(f"Redraw it with `python sweep.py --report {csv_path.parent}`.")
    doc = os.path.relpath(METRICS_DOC, csv_path.parent.resolve())
    lines.append(f"Every column is explained in [docs/metrics.md]({doc}).")
    return [" ".join(lines), ""]


def mixed_against_uniform(mixed, uniform):
    """summary.md lines: for each finished mixed run, the best uniform run whose BitOps are
    at most the mixed run's budget (or its BitOps where no budget was logged)."""
    rows = []
    mixed = mixed[[k == "mixed" for k in plan_kind(mixed)]]
    methods = "method" in mixed.columns and mixed["method"].nunique() > 1
    order = [c for c in ("bitops", "method") if c in mixed.columns]
    for _, m in mixed.sort_values(order).iterrows():
        budget = m.get("bitops_budget", m["bitops"])
        # a stopped run logs the budget as given ("w4a4"), which makes the column text
        budget = float(m["bitops"] if budget != budget else budget)
        pool = uniform[uniform["bitops"] <= budget * (1 + 1e-9)]
        if methods and "method" in pool.columns:
            pool = pool[pool["method"] == m["method"]]
        best = pool.loc[pool["quant_acc"].idxmax()] if len(pool) else None
        rows.append([_fmt(budget / GIGA, 3), *([m["method"]] if methods else []),
                     f"W{m['weight_bits']:.2f} A{m['activation_bits']:.2f}",
                     _fmt(m["bitops"] / GIGA, 3), _fmt(m["quant_acc"]),
                     "—" if best is None else run_label(best),
                     "—" if best is None else _fmt(best["quant_acc"]),
                     "—" if best is None else f"{m['quant_acc'] - best['quant_acc']:+.2f}"])
    header = ["Budget (G)", *(["Method"] if methods else []), "Mixed: mean bits",
              "BitOps (G)", "Accuracy", "Best uniform <= budget", "Accuracy", "Mixed - uniform"]
    return ["## Mixed precision against uniform bits at the same BitOps", "",
            _markdown_table(header, rows), "",
            "Mean bits are MAC-weighted over the quantized layers; a budget `wXaY` is the "
            "BitOps of the uniform WxAy model, so it is always in the uniform pool.", ""]


def summary_markdown(df, source, uniform=None):
    done, other = split_runs(df)
    done = sort_runs(done)
    lines = ["# Quantization sweep", ""]
    facts = _provenance(df)
    if "baseline_acc" in done.columns and done["baseline_acc"].notna().any():
        facts.append(f"FP32 accuracy {done['baseline_acc'].dropna().iloc[0]:.2f}%")
    facts.append(f"{len(done)} finished runs" + (f", {len(other)} failed" if len(other) else ""))
    lines += ["From " + " · ".join(facts) + f" (`{source}`).", ""]
    lines += _made_by(source)

    categories = varying_categories(done)
    columns = [("W_bits", "weight_bits", 0), ("A_bits", "activation_bits", 0)]
    columns += [({"calibration": "Calib", "method": "Method", "bias_correction": "Bias corr.",
                  "distill": "Distill", "weight_method": "Weights", "weight_rounding": "Rounding",
                  "engine": "Engine", "plan": "Plan"}[c], c, None) for c in categories]
    columns += [("Accuracy", "quant_acc", 2), ("Drop", "acc_drop", 2),
                ("ONNX acc", "onnx_acc", 2), ("Agree", "onnx_agreement", 2),
                ("ONNX x", "onnx_speedup", 2), ("Orig_MB", "orig_mb", 2),
                ("Comp_MB", "compressed_mb", 3), ("Ratio", "compression_ratio", 2),
                ("BitOps (G)", "bitops", 2)]
    columns = [c for c in columns if c[1] in done.columns]
    rows = []
    for _, row in done.iterrows():
        cells = []
        for _, key, digits in columns:
            value = row[key]
            if key in ("weight_bits", "activation_bits") and float(value) != int(value):
                digits = 2  # a mixed plan's MAC-weighted mean
            if key == "bitops":
                value = value / GIGA
            cells.append(str(value) if digits is None else _fmt(value, digits))
        rows.append(cells)
    if rows:
        lines += [_markdown_table([c[0] for c in columns], rows), ""]
        lines += ["Accuracy and Drop in %, sizes in MiB of the exported files, BitOps = "
                  "MACs x weight bits x activation bits per image (FP32 layers at 32 x 32).", ""]
        if "onnx_acc" in done.columns:
            lines += ["ONNX acc: the exported ONNX QDQ model's accuracy in ONNX Runtime; Agree: "
                      "% of test images whose top-1 class it shares with the PyTorch model; "
                      "ONNX x: its images/s over the FP32 model's in ONNX Runtime (batch 256).",
                      ""]
        if "quant_acc" in done.columns:
            best = done.loc[done["quant_acc"].idxmax()]
            lines += [f"Best accuracy: {run_label(best, categories)} at "
                      f"{best['quant_acc']:.2f}%.", ""]
    else:
        lines += ["No run finished, so there is no table and no plot.", ""]
    if uniform is not None and len(done):
        lines += mixed_against_uniform(done, uniform)

    if len(other):
        lines += ["## Runs that did not finish", ""]
        keys = _config_columns(other)
        finished_configs = {tuple(str(r[k]) for k in keys) for _, r in done.iterrows()}
        rows = []
        for _, row in other.iterrows():
            config = tuple(str(row[k]) for k in keys)
            code = row.get("exit_code", "")
            rows.append([f"`{row['run_id']}`", *[str(row[k]) for k in keys], row["status"],
                         _fmt(code, 0) if code == code else "—",
                         "yes" if config in finished_configs else "no"])
        lines += [_markdown_table(["run", *keys, "status", "exit code", "finished on a retry"],
                                  rows), ""]
        lines += ["A failed run's log is in `wandb/sweep-<sweep_id>/<run>.log`; running the "
                  "same sweep again retries it.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Pictures


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


def write_report(directory, out_dir=None, uniform=None):
    """Write summary.md and the pictures for the runs.csv in `directory` (and, if given, the
    uniform-bits sweep in `uniform` to compare with); returns the paths."""
    csv_path = results.find_runs_csv(directory)
    df = results.read_runs(csv_path)
    other = None
    if uniform:
        uniform = [uniform] if isinstance(uniform, (str, Path)) else list(uniform)
        other = pd.concat([split_runs(results.read_runs(results.find_runs_csv(u)))[0]
                           for u in uniform], ignore_index=True)
        other = other[[k == "uniform" for k in plan_kind(other)]]
        if not len(other) or not {"bitops", "quant_acc"} <= set(other.columns):
            raise UserError(f"--uniform {' '.join(map(str, uniform))} has no finished "
                            f"uniform-bits run to compare with.")
        for key in ("checkpoint_sha256", "checkpoint"):
            if key in df.columns and key in other.columns:
                if set(df[key].dropna().astype(str)) != set(other[key].dropna().astype(str)):
                    raise UserError(f"--uniform {' '.join(map(str, uniform))} comes from "
                                    f"another checkpoint ({key} differs): its runs cannot be "
                                    f"compared.")
                break
    out = Path(out_dir) if out_dir else csv_path.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
        summary = out / "summary.md"
        summary.write_text(summary_markdown(df, csv_path, other))
    except OSError as e:
        raise UserError(f"cannot write the report to {out} ({e.strerror or e}); "
                        f"pass --out_dir a writable directory") from None
    written = [summary]
    done, _ = split_runs(df)
    needed = {"weight_bits", "activation_bits", "quant_acc"}
    if len(done) and needed <= set(done.columns):
        done = sort_runs(done)
        written.append(plot_parallel_coordinates(done, out / "parallel_coordinates.png"))
        written.append(write_parallel_coordinates_html(done, out / "parallel_coordinates.html"))
        both = done if other is None else pd.concat([done, other.assign(plan="uniform")],
                                                    ignore_index=True)
        pareto = plot_pareto(both, out / "pareto.png")
        if pareto:
            written.append(pareto)
    return written


@cli
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    for path in write_report(args.report, args.out_dir, args.uniform):
        print(path)
    return 0
