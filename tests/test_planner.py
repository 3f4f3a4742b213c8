"""Mixed-precision plans (planner.py): the budget as bitops.py counts it, sensitive layers get
more bits, bad budgets are one error line; and one real run with --plan sensitivity."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from mobilenet_compression.quant import planner
from mobilenet_compression.quant.bitops import bitops_report
from mobilenet_compression.config import RunConfig
from mobilenet_compression.errors import UserError
from mobilenet_compression.deploy.export import load_quantized
from mobilenet_compression.quant.precision import (
    QUANT_BITS,
    quantized_layer_names,
    uniform_plan,
)
from mobilenet_compression.quant.prepare import precision_plan
from tests.test_qat import QUICK, ROOT, env_for, small_checkpoint, summary_of  # noqa: F401

SIZE = 28


def flat_table(model, weight=1e-3, activation=1e-3):
    """A sensitivity table where every layer loses a little more per bit removed."""
    names = quantized_layer_names(model)
    per = {str(b): (9 - b) for b in QUANT_BITS}
    return {"layers": names,
            "weight": {n: {b: weight * v for b, v in per.items()} for n in names},
            "activation": {n: {b: activation * v for b, v in per.items()} for n in names}}


def test_plan_meets_the_budget_as_bitops_counts_it(fashion_mnist_model):
    table = flat_table(fashion_mnist_model)
    for text in ("0.3x", "0.5x", "0.8x"):
        budget = planner.parse_budget(text, fashion_mnist_model, SIZE)
        plan = planner.sensitivity_plan(fashion_mnist_model, SIZE, table, budget)
        counted = bitops_report(fashion_mnist_model, SIZE, plan)[1]["bitops"]
        assert counted <= budget
        assert set(plan) == set(quantized_layer_names(fashion_mnist_model))
    w4a4 = bitops_report(fashion_mnist_model, SIZE, uniform_plan(fashion_mnist_model, 4, 4))
    assert planner.parse_budget("W4A4", fashion_mnist_model, SIZE) == w4a4[1]["bitops"]
    plan = planner.sensitivity_plan(fashion_mnist_model, SIZE, table, w4a4[1]["bitops"])
    assert bitops_report(fashion_mnist_model, SIZE, plan)[1]["bitops"] <= w4a4[1]["bitops"]
    # The all-2-bit budget leaves exactly one plan.
    low = planner.parse_budget("w2a2", fashion_mnist_model, SIZE)
    assert set(planner.sensitivity_plan(fashion_mnist_model, SIZE, table, low).values()) == \
        {(2, 2)}


def test_an_artificially_sensitive_layer_gets_more_bits(fashion_mnist_model):
    table = flat_table(fashion_mnist_model)
    budget = planner.parse_budget("0.3x", fashion_mnist_model, SIZE)
    before = planner.sensitivity_plan(fashion_mnist_model, SIZE, table, budget)
    # The layer with the most MACs, the one a BitOps budget squeezes first.
    rows = bitops_report(fashion_mnist_model, SIZE, {})[0]
    names = set(quantized_layer_names(fashion_mnist_model))
    big = max((r for r in rows if r["name"] in names), key=lambda r: r["macs"])["name"]
    assert before[big][0] * before[big][1] < 64  # squeezed below W8A8 at 0.3x
    table["weight"][big] = {str(b): 10.0 * (9 - b) for b in QUANT_BITS}
    table["activation"][big] = {str(b): 10.0 * (9 - b) for b in QUANT_BITS}
    after = planner.sensitivity_plan(fashion_mnist_model, SIZE, table, budget)
    assert after[big][0] >= before[big][0] and after[big][1] >= before[big][1]
    assert after[big][0] * after[big][1] > before[big][0] * before[big][1]
    assert bitops_report(fashion_mnist_model, SIZE, after)[1]["bitops"] <= budget


@pytest.mark.parametrize("text, words", [("0.01", "below the all-2-bit"),
                                         ("1000x", "above the FP32"),
                                         ("-1", "positive"), ("abc", "must be a number"),
                                         ("w9a4", "must be a number")])
def test_bad_budgets_are_one_sentence(fashion_mnist_model, text, words):
    with pytest.raises(UserError, match=words):
        if words in ("positive", "must be a number"):
            RunConfig.from_dict({"plan": "sensitivity", "bitops_budget": text})
        planner.parse_budget(text, fashion_mnist_model, SIZE)


def test_budget_and_plan_flags_must_go_together():
    with pytest.raises(UserError, match="needs --bitops_budget"):
        RunConfig.from_dict({"plan": "sensitivity"})
    with pytest.raises(UserError, match="sensitivity only"):
        RunConfig.from_dict({"plan": "uniform", "bitops_budget": "0.5x"})
    with pytest.raises(UserError, match="size_budget_mb applies to --plan sensitivity only"):
        RunConfig.from_dict({"plan": "adaptive", "size_budget_mb": "0.3"})
    with pytest.raises(UserError, match="not both"):
        RunConfig.from_dict({"plan": "sensitivity", "bitops_budget": "w4a4",
                             "size_budget_mb": "0.3"})
    with pytest.raises(UserError, match="--sensitivity_images"):
        RunConfig.from_dict({"plan": "sensitivity", "bitops_budget": "w4a4",
                             "sensitivity_images": 0})
    for bad in ("-0.3", "0", "big", "nan"):
        with pytest.raises(UserError, match="--size_budget_mb must be a positive number"):
            RunConfig.from_dict({"plan": "sensitivity", "size_budget_mb": bad})


def test_size_budget_plan_fits_the_predicted_file(fashion_mnist_model):
    from mobilenet_compression.quant.precision import weight_layers

    table = flat_table(fashion_mnist_model)
    names = set(quantized_layer_names(fashion_mnist_model))
    params = {n: m.weight.numel() for n, m in weight_layers(fashion_mnist_model) if n in names}
    fixed = 50_000
    at = {b: fixed + sum(-(-p * b // 8) for p in params.values()) for b in (2, 4, 8)}
    limit = (at[4] + at[8]) / 2
    plan = planner.sensitivity_plan(fashion_mnist_model, SIZE, table, size=(fixed, limit))
    packed = sum(-(-params[n] * plan[n][0] // 8) for n in params)
    assert fixed + packed <= limit - planner.SIZE_MARGIN
    assert {w for w, _ in plan.values()} != {8}  # the budget binds: some layers below 8 bits
    assert {a for _, a in plan.values()} == {8}  # activations cost no bytes: kept at 8
    with pytest.raises(UserError, match="below the all-2-bit file"):
        planner.parse_size_budget((at[2] - 1) / planner.MIB, fixed, fashion_mnist_model)


def test_sensitivity_plan_run_logs_mean_bits_meets_its_budget_and_reloads(
        tmp_path, small_checkpoint):  # noqa: F811
    res = tmp_path / "res"
    env = env_for(tmp_path, MOBILENET_COMPRESSION_CACHE=str(tmp_path / "cache"))

    def run(*args):
        return subprocess.run([sys.executable, os.path.join(ROOT, "sweep.py"), *args,
                               "--checkpoint", str(small_checkpoint), "--plan", "sensitivity",
                               "--sensitivity_images", "32",  # 256 by default: slow here
                               "--wandb_mode", "offline", *QUICK], cwd=tmp_path, env=env,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)

    r = run("--bitops_budget", "0.4x", "--results_dir", str(res))
    assert r.returncode == 0, r.stderr
    row = pd.read_csv(res / "runs" / "runs.csv").iloc[0]
    assert row.plan == "sensitivity" and row.bitops <= row.bitops_budget
    assert row.sensitivity_images == 32
    assert row.roundtrip_max_abs_diff == 0.0
    (path,) = (res / "runs" / "models").glob("*sensitivity*.safetensors")
    kept = set(precision_plan(load_quantized(str(path))).values())
    # The plan is kept unless the best uniform configuration within the budget scored
    # higher on the validation images; either way the run says which and both scores.
    assert row.plan_kept in ("plan", "uniform")
    if row.plan_kept == "uniform":
        assert row.uniform_val_acc > row.plan_val_acc
    elif not pd.isna(row.uniform_val_acc):  # a rival was scored (one fits, and differs)
        assert row.plan_val_acc >= row.uniform_val_acc
    mixed = row.plan_kept == "plan"
    if mixed:
        assert row.weight_bits != int(row.weight_bits) or row.activation_bits != int(
            row.activation_bits)  # mean bits of a mixed plan
        assert len(kept) > 1  # packed mixed
    else:
        assert kept == {(int(row.weight_bits), int(row.activation_bits))}
        assert row.uniform_rival == f"w{int(row.weight_bits)}a{int(row.activation_bits)}"
    assert len(list((tmp_path / "cache" / "sensitivity").glob("*.json"))) == 1
    # W&B (offline): the plan in the summary, the per-layer table with each layer's BitOps
    # share, and the two per-layer bits charts.
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    summary = summary_of(run_dir)["summary"]
    assert summary["plan"] == "sensitivity" and summary["bitops_budget"] == row.bitops_budget
    layers = json.loads((run_dir / "files" / summary["bitops_per_layer"]["path"]).read_text())
    share = layers["columns"].index("bitops_share")
    assert abs(sum(r[share] for r in layers["data"]) - 1) < 1e-6
    bits = {tuple(r[layers["columns"].index(c)] for c in ("weight_bits", "activation_bits"))
            for r in layers["data"]} - {(32, 32)}
    assert (len(bits) > 1) == mixed
    assert summary["plan_kept"] == row.plan_kept
    # The two bar charts (W&B stores a chart as its table plus a panel spec).
    assert {"bits_per_layer/weight_table", "bits_per_layer/activation_table"} <= set(summary)
    # A size budget 3% under that file: the next run's real file fits it (the sensitivity
    # comes from the cache this time).
    limit = round(row.compressed_mb * 0.97, 4)
    r = run("--size_budget_mb", str(limit), "--results_dir", str(res))
    assert r.returncode == 0, r.stderr
    sized = pd.read_csv(res / "runs" / "runs.csv").iloc[1]
    assert sized.size_budget_mb == limit and sized.compressed_mb <= limit
    assert sized.roundtrip_max_abs_diff == 0.0
    bad = run("--size_budget_mb", "0.01", "--results_dir", str(tmp_path / "r3"))
    assert bad.returncode == 2 and "below the all-2-bit file" in bad.stderr
    assert not (tmp_path / "r3").exists()
    bad = run("--bitops_budget", "0.001", "--results_dir", str(tmp_path / "r2"))
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:")
    assert "below the all-2-bit" in bad.stderr and not (tmp_path / "r2").exists()
