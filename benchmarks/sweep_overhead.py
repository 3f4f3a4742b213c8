"""Where a sweep's time goes: per-run wall time against the evaluation forward passes.

    python benchmarks/sweep_overhead.py results/<sweep id>

Reads what a finished offline sweep left behind (agent_state.json: each run's wall time as
the agent measured it, from launch to exit; runs.csv: each run's evaluation seconds as the
run measured them) and prints, per run and in total, the overhead: everything except the
quantized model's evaluation forward passes (process start and imports, W&B, loading the
checkpoint and dataset, the FP32 baseline when it was not cached yet, calibration, export,
the round-trip check, BitOps). Figures, not assertions.
"""

import json
import os
import sys

import pandas as pd


def main():
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) == 2 else 2)
    folder = sys.argv[1]
    state = json.load(open(os.path.join(folder, "agent_state.json")))
    runs = pd.read_csv(os.path.join(folder, "runs.csv")).set_index("run_id")
    rows = []
    for entry in state["runs"]:
        if entry.get("state") != "finished" or entry["run_id"] not in runs.index:
            continue
        r = runs.loc[entry["run_id"]]
        rows.append({"run": f"W{r.weight_bits}A{r.activation_bits}",
                     "wall_s": entry["duration_s"], "eval_s": r.eval_seconds,
                     "eval_img_s": r.eval_images_per_s, "start": entry["started_at"]})
    df = pd.DataFrame(rows).sort_values("start")
    df["overhead_s"] = df.wall_s - df.eval_s
    df["overhead_%"] = 100 * df.overhead_s / df.wall_s
    print(df.drop(columns="start").to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    span = (df.start + df.wall_s).max() - df.start.min()
    print(f"\n{len(df)} runs; sweep wall time (first launch to last exit): {span:.0f} s "
          f"({span / 60:.1f} min)")
    print(f"per run: wall {df.wall_s.median():.1f} s median, evaluation {df.eval_s.median():.1f} s,"
          f" overhead {df.overhead_s.median():.1f} s = {df['overhead_%'].median():.0f}% "
          f"(median); evaluation {df.eval_img_s.median():.0f} images/s per run")


if __name__ == "__main__":
    main()
