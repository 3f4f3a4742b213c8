"""The runs of a runs.csv as a report shows them: which finished, in which order, labelled how,
and which are on the Pareto front (report.py's summary.md and plots.py's pictures)."""

import pandas as pd

from . import results

GIGA = 1e9  # BitOps are shown in G


def markdown_table(header, rows):
    """A markdown table of cells the report has formatted (pandas' DataFrame.to_markdown in
    GitHub's pipe format; numbers are kept as written, not parsed again)."""
    return pd.DataFrame(rows, columns=header).to_markdown(index=False, tablefmt="github",
                                                          disable_numparse=True)


def split_runs(df):
    """(finished runs with an accuracy, every other run) of a runs.csv table."""
    ok = df["status"] == results.FINISHED
    ok &= df["quant_acc"].notna() if "quant_acc" in df.columns else False
    return df[ok].copy(), df[~ok].copy()


def sort_runs(df):
    """Weight bits, then activation bits, highest first; then the categories, A to Z."""
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
    return [c for c in CATEGORIES if varies(df, c)]


def run_label(row, categories=()):
    if "weight_bits" not in row or "activation_bits" not in row:
        return str(row["run_id"])  # a sweep of something else than bits
    if is_mixed(row):  # MAC-weighted mean bits of a plan that differs from layer to layer
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


def is_mixed(row):
    return str(row.get("plan", "uniform")) not in ("uniform", "nan")


def plan_kind(df):
    """"mixed" or "uniform" for each run of a table (runs before --plan existed: uniform)."""
    if "plan" not in df.columns:
        return ["uniform"] * len(df)
    return ["mixed" if is_mixed(r) else "uniform" for _, r in df.iterrows()]


def varies(df, column):
    return column in df.columns and df[column].nunique(dropna=True) > 1
