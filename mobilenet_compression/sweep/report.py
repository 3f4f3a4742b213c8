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
from mobilenet_compression.sweep import results
from mobilenet_compression.sweep.plots import (
    plot_parallel_coordinates,
    plot_pareto,
    write_parallel_coordinates_html,
)
from mobilenet_compression.sweep.table import (
    CATEGORIES,
    GIGA,
    markdown_table,
    plan_kind,
    run_label,
    sort_runs,
    split_runs,
    varying_categories,
)

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


def _config_columns(df):
    return [c for c in ("weight_bits", "activation_bits", *CATEGORIES, "checkpoint")
            if c in df.columns]


def _fmt(value, digits=2):
    try:
        if value != value:  # NaN
            return "—"
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


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
            markdown_table(header, rows), "",
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
        lines += [markdown_table([c[0] for c in columns], rows), ""]
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
        lines += [markdown_table(["run", *keys, "status", "exit code", "finished on a retry"],
                                  rows), ""]
        lines += ["A failed run's log is in `wandb/sweep-<sweep_id>/<run>.log`; running the "
                  "same sweep again retries it.", ""]
    return "\n".join(lines)


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
