"""Spread of a bits grid over checkpoints: the same sweep run on checkpoints that differ only
in their training seed, cell by cell.

    python -m mobilenet_compression.sweep.spread SWEEP_DIR [SWEEP_DIR ...] --out DIR

Each SWEEP_DIR is a finished sweep's folder (its runs.csv). For every (weight_bits,
activation_bits) cell this writes, into DIR: spread.md (per cell: mean, sample standard
deviation and min..max of quant_acc and of acc_drop over the checkpoints, the FP32
accuracies, and the source folders), spread.csv (the same numbers), and spread.png (a heat
map of mean quant_acc annotated with its spread, beside the drop's error bars per weight
width). With --metric onnx_acc (or any runs.csv column) the same for that column; with
--where weight_rounding=gptq (any runs.csv column and value) only those runs, for sweeps that
vary a setting beside the bits.
"""

import os
import sys

from ..errors import ArgumentParser, UserError, cli
from ..files import atomic_write
from .table import markdown_table

# Run parameters that must be the same in every sweep of a spread.
SAME = ("method", "calibration", "bias_correction", "weight_method", "weight_granularity",
        "weight_rounding", "calib_batches", "engine", "qat_epochs", "qat_lr", "qat_batch_size",
        "qat_freeze_bn", "qat_checks", "distill", "equalize")
# What a run did before its runs.csv had the column.
BEFORE_COLUMN = {"engine": "torch", "weight_rounding": "nearest", "equalize": False}


def parse_where(items):
    """--where COL=VALUE items -> {COL: VALUE}."""
    where = {}
    for item in items or []:
        col, sep, value = item.partition("=")
        if not sep or not col or not value:
            raise UserError(f"--where takes COLUMN=VALUE, e.g. weight_rounding=gptq, got "
                            f"{item!r}.")
        where[col] = value
    return where


def load_grids(folders, metric, where=None):
    import pandas as pd

    frames = []
    for i, folder in enumerate(folders):
        path = os.path.join(folder, "runs.csv")
        if not os.path.isfile(path):
            raise UserError(f"{path} does not exist; pass the folders of finished sweeps.")
        df = pd.read_csv(path)
        if "status" in df.columns:
            df = df[df["status"] == "finished"]
        missing = {"weight_bits", "activation_bits", metric, "baseline_acc"} - set(df.columns)
        if missing:
            raise UserError(f"{path} has no column {sorted(missing)[0]!r}.")
        # rows from before a column existed ran what it now calls its old default
        for col, before in BEFORE_COLUMN.items():
            df[col] = df[col].fillna(before) if col in df.columns else before
        df = df.assign(source=folder, checkpoint_index=i)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    for col, value in (where or {}).items():
        if col not in df.columns:
            raise UserError(f"--where {col}={value}: the sweeps' runs.csv have no column "
                            f"{col!r}.")
        df = df[df[col].astype(str) == value]
    if df.empty:
        raise UserError("no finished run matches --where "
                        + " ".join(f"{c}={v}" for c, v in where.items()) + ".")
    cells = ["weight_bits", "activation_bits"]
    for col in SAME:  # a spread over seeds compares like with like, cell by cell
        if col in df.columns:
            values = df[col].astype(str)
            mixed = values.groupby([df["source"], *(df[c] for c in cells)]).nunique()
            if (mixed > 1).any():
                raise UserError(f"{mixed.idxmax()[0]} holds runs with several {col} values "
                                f"in one cell; pick one with --where {col}=VALUE.")
            # A value may depend on the cell (calibration auto: loss at 3 bits and fewer),
            # but each cell must have the same in every sweep.
            across = values.groupby([df[c] for c in cells]).nunique()
            if (across > 1).any():
                seen = df.groupby("source")[col].apply(
                    lambda v: tuple(sorted(map(str, set(v)))))
                raise UserError(f"the sweeps differ in {col} ("
                                + "; ".join(f"{s}: {', '.join(v)}" for s, v in seen.items())
                                + "); a spread compares the same configuration.")
    return df


def cell_table(df, metric):
    """One row per (weight_bits, activation_bits): n, mean, std, min, max of `metric` and
    of its drop from each checkpoint's FP32 accuracy."""
    df = df.assign(drop=df["baseline_acc"] - df[metric])
    g = df.groupby(["weight_bits", "activation_bits"])
    out = g[metric].agg(["count", "mean", "std", "min", "max"])
    drop = g["drop"].agg(["mean", "std", "min", "max"]).add_prefix("drop_")
    return out.join(drop).reset_index().sort_values(["weight_bits", "activation_bits"],
                                                    ascending=False)


def shared_settings(df):
    """'method qat, qat_epochs 0.3, ...': the SAME columns the runs set (one value each, or
    one per activation width, as load_grids checked)."""
    items = []
    for col in SAME:
        if col in df.columns and df[col].notna().any():
            known = df.dropna(subset=[col])
            values = known.groupby(known[col].astype(str))["activation_bits"]
            if len(values) == 1:
                items.append(f"{col} {df[col].dropna().iloc[0]}")
            else:  # by activation width (e.g. calibration auto)
                items.append(f"{col} " + ", ".join(
                    f"{v} at A{'/'.join(f'{a:g}' for a in sorted(set(bits), reverse=True))}"
                    for v, bits in values))
    return ", ".join(items)


def markdown(table, df, metric, where=None):
    base = df.groupby("source")["baseline_acc"].first()
    lines = ["# Spread over checkpoints", "",
             f"{df['source'].nunique()} sweeps of the same grid on checkpoints that differ "
             f"only in their training seed"
             + "".join(f"; runs with {c} = {v}" for c, v in (where or {}).items())
             + "; FP32 test accuracy "
             + ", ".join(f"{v:.2f}" for v in base) + f" (mean {base.mean():.2f}, std "
             f"{base.std():.2f}). Sources: " + ", ".join(f"`{s}`" for s in base.index) + ".",
             "", "Settings every run shares: " + shared_settings(df) + ".",
             "", f"Per cell: mean ± sample standard deviation [min..max] of `{metric}` and of "
             "its drop from the same checkpoint's FP32 accuracy, in points.", ""]
    rows = [[f"{r.weight_bits:g}", f"{r.activation_bits:g}", f"{r['count']:.0f}",
             f"{r['mean']:.2f} ± {r['std']:.2f} [{r['min']:.2f}..{r['max']:.2f}]",
             f"{r.drop_mean:.2f} ± {r.drop_std:.2f} [{r.drop_min:.2f}..{r.drop_max:.2f}]"]
            for _, r in table.iterrows()]
    lines.append(markdown_table(["W", "A", "n", metric, "drop"], rows))
    return "\n".join(lines) + "\n"


def plot(table, metric, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    wbits = sorted(table.weight_bits.unique(), reverse=True)
    abits = sorted(table.activation_bits.unique(), reverse=True)
    mean = np.full((len(wbits), len(abits)), np.nan)
    std = np.full_like(mean, np.nan)
    for _, r in table.iterrows():
        i, j = wbits.index(r.weight_bits), abits.index(r.activation_bits)
        mean[i, j], std[i, j] = r["mean"], r["std"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    im = ax.imshow(mean, cmap="viridis", vmin=0, vmax=100)
    for i in range(len(wbits)):
        for j in range(len(abits)):
            if mean[i, j] == mean[i, j]:
                ax.text(j, i, f"{mean[i, j]:.1f}\n±{std[i, j]:.2f}", ha="center", va="center",
                        color="white" if mean[i, j] < 60 else "black", fontsize=8)
    ax.set_xticks(range(len(abits)), [f"A{b:g}" for b in abits])
    ax.set_yticks(range(len(wbits)), [f"W{b:g}" for b in wbits])
    ax.set_title(f"mean {metric} (%) ± std over checkpoints")
    fig.colorbar(im, ax=ax)
    for wb in wbits:
        rows = table[table.weight_bits == wb].sort_values("activation_bits")
        ax2.errorbar(rows.activation_bits, rows.drop_mean, yerr=rows.drop_std, capsize=3,
                     marker="o", label=f"W{wb:g}")
    ax2.set_xlabel("activation bits")
    ax2.set_ylabel("accuracy drop (points), mean ± std")
    ax2.set_yscale("symlog", linthresh=1)
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


@cli
def main(argv=None):
    p = ArgumentParser(prog="python -m mobilenet_compression.sweep.spread",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", nargs="+", help="folders of finished sweeps (runs.csv)")
    p.add_argument("--out", required=True, help="folder for spread.md, spread.csv, spread.png")
    p.add_argument("--metric", default="quant_acc", help="runs.csv column (default: "
                   "%(default)s)")
    p.add_argument("--where", action="append", metavar="COLUMN=VALUE",
                   help="only the runs whose runs.csv COLUMN is VALUE, e.g. "
                        "weight_rounding=gptq, for sweeps that vary it (repeatable)")
    args = p.parse_args(argv)
    if len(args.sweeps) < 2:
        raise UserError("a spread needs at least two sweeps (checkpoints).")
    where = parse_where(args.where)
    df = load_grids(args.sweeps, args.metric, where)
    table = cell_table(df, args.metric)
    os.makedirs(args.out, exist_ok=True)
    atomic_write(os.path.join(args.out, "spread.md"),
                 lambda f: f.write(markdown(table, df, args.metric, where).encode()))
    atomic_write(os.path.join(args.out, "spread.csv"),
                 lambda f: f.write(table.to_csv(index=False, float_format="%.4f").encode()))
    plot(table, args.metric, os.path.join(args.out, "spread.png"))
    print(f"{len(table)} cells over {df['source'].nunique()} sweeps -> {args.out}/spread.md, "
          f"spread.csv, spread.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
