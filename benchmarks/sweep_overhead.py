"""Where a sweep's time goes, stage by stage, from what its runs logged.

    python benchmarks/sweep_overhead.py results/<sweep id>

Reads runs.csv (each finished run's `time/*_s` columns: startup, wandb_init, load, baseline,
calibrate, round (GPTQ), qat, eval, export, onnx, log, wandb_finish, and total) and, when
the offline agent left one, agent_state.json (each run's wall time from launch to exit, and
the sweep's span). Prints the median seconds per stage, the per-run overhead (everything but
the evaluation that measures quant_acc: `eval`, plus `onnx` with --engine onnxruntime), the
onnx stage split into the engine's pass over the test images (`onnx_eval_s`) and the export
steps around it, and the sweep's wall time. For a sweep whose runs ran ONNX Runtime, also
the least wall time the same grid could take with `--engine onnxruntime` on this machine's
cores (`floor`). Figures, not assertions.
"""

import json
import os
import sys

import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mobilenet_compression.pipeline import AGREEMENT_IMAGES  # noqa: E402

STAGES = ["startup", "wandb_init", "load", "baseline", "calibrate", "round", "clip_search",
          "qat", "eval", "export", "onnx", "log", "wandb_finish"]


def main():
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) == 2 else 2)
    folder = sys.argv[1]
    runs = pd.read_csv(os.path.join(folder, "runs.csv"))
    runs = runs[runs.get("status", "finished") == "finished"]
    cols = [f"time/{s}_s" for s in STAGES if f"time/{s}_s" in runs.columns]
    if not cols:
        sys.exit(f"error: {folder}/runs.csv has no time/*_s columns (runs made before they "
                 f"were logged).")
    t = runs[cols].fillna(0.0)
    total = runs["time/total_s"] if "time/total_s" in runs.columns else t.sum(axis=1)
    engine = runs["engine"] if "engine" in runs.columns else pd.Series("torch", runs.index)
    evaluation = t.get("time/eval_s", 0.0) + t.get("time/onnx_s", 0.0).where(
        engine == "onnxruntime", 0.0)
    print(f"{len(runs)} finished runs in {folder}; median seconds per run and stage:")
    for c in cols:
        print(f"  {c.removeprefix('time/').removesuffix('_s'):14s} {t[c].median():7.2f} s"
              f"   (sum over runs {t[c].sum():7.1f} s)")
    print(f"  {'total':14s} {total.median():7.2f} s   (sum over runs {total.sum():7.1f} s)")
    overhead = total - evaluation
    print(f"per run: evaluation {evaluation.median():.1f} s, everything else "
          f"{overhead.median():.1f} s = {100 * (overhead / total).median():.0f}% (medians)")
    if "onnx_eval_s" in runs.columns and "time/onnx_s" in cols:
        # The onnx stage is two things: the engine's pass over the test images (onnx_acc,
        # and quant_acc itself with --engine onnxruntime) and the export steps around it.
        onnx_eval = runs["onnx_eval_s"].fillna(0.0)
        rest = t["time/onnx_s"] - onnx_eval
        steps = rest + t.get("time/export_s", 0.0)
        print(f"ONNX stage: the engine's pass over the test images {onnx_eval.median():.1f} s, "
              f"the rest of it {rest.median():.1f} s (graph, "
              f"sessions, speed timing); with the safetensors export, the export steps add "
              f"{steps.median():.1f} s = {100 * (steps / total).median():.0f}% of a run "
              f"(medians)")
    floor(runs, t)
    state_path = os.path.join(folder, "agent_state.json")
    if os.path.exists(state_path):
        state = json.load(open(state_path))
        spans = [(e["started_at"], e["started_at"] + e["duration_s"]) for e in state["runs"]
                 if e.get("state") == "finished" and "duration_s" in e and "started_at" in e]
        if spans:
            span = max(b for _, b in spans) - min(a for a, _ in spans)
            print(f"sweep wall time (agent: first launch to last exit): {span:.0f} s "
                  f"({span / 60:.1f} min) for {len(spans)} runs")


def floor(runs, t, cores=None):
    """What a grid evaluated by ONNX Runtime (`--engine onnxruntime`) must spend at least,
    from this sweep's own figures: the engine's pass over the test images (`onnx_eval_s`),
    PyTorch's agreement check on AGREEMENT_IMAGES of them (the issue asks for it; this many
    images at the sweep's PyTorch evaluation rate) and each run's process start, in
    core-seconds (seconds x the run's threads, as if every thread were fully used: a lower
    bound), shared perfectly over this machine's cores. No calibration, no export, no W&B,
    no timing of the engine: the real grid takes longer."""
    if "onnx_eval_s" not in runs.columns or runs["onnx_eval_s"].isna().all():
        return
    cores = cores or os.cpu_count()
    threads = runs["onnx_threads"].fillna(cores) if "onnx_threads" in runs.columns else cores
    engine = runs["engine"] if "engine" in runs.columns else pd.Series("torch", runs.index)
    images = runs["eval_images"] if "eval_images" in runs.columns else 10000
    # a torch-engine run evaluated all its test images in PyTorch; an onnxruntime one only
    # the agreement check
    zero = pd.Series(0.0, runs.index)
    per_check = t.get("time/eval_s", zero) * (AGREEMENT_IMAGES / images).where(
        engine == "torch", 1.0)
    parts = {"ONNX Runtime's evaluation of the test images": runs["onnx_eval_s"] * threads,
             f"PyTorch's agreement check on {AGREEMENT_IMAGES} images": per_check * threads,
             "process start": t.get("time/startup_s", zero)}  # one core each
    total = sum(float(v.sum()) for v in parts.values())
    print(f"floor for this grid with --engine onnxruntime on {cores} cores (core-seconds "
          f"summed over {len(runs)} runs):")
    for name, v in parts.items():
        print(f"  {name:50s} {float(v.sum()):7.1f}")
    print(f"  => at least {total / cores:.0f} s ({total / cores / 60:.1f} min) of wall time, "
          f"before calibration, export and W&B")


if __name__ == "__main__":
    main()
