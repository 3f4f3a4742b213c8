"""The plan explorer: one self-contained HTML page where a person sets each block's weight and
activation bits and sees at once what that plan costs and what it is likely to lose.

    python -m mobilenet_compression.explorer --checkpoint CKPT [--data_dir DIR] \
        [--runs SWEEP_DIR ...] --out PAGE.html

For every change of a control the page shows, computed in the browser from numbers this
module embeds:
  BitOps per image  exactly as bitops.bitops_report counts them: each quantized layer's MACs
                    x weight bits x activation bits, the stem conv and classifier at 32 x 32;
  compressed MB     the size of the safetensors file export.py would write: a real export of
                    this checkpoint at W8A8 (to a temporary folder) gives the fixed bytes
                    (scales, BatchNorm, FP32 tensors, header); the plan adds each layer's
                    packed weights, ceil(parameters x bits / 8) bytes;
  predicted drop    the plan's summed sensitivity S (sensitivity.py: the one-layer KL
                    divergences of its weights and activations, the cost planner.py
                    minimises) mapped to accuracy points by a logistic curve in log S,
                    drop = D / (1 + (S0 / S)^k), fitted by least squares to the uniform PTQ
                    runs given with --runs. D = FP32 accuracy - chance is fixed: no plan does
                    worse than guessing, and the measured drops level off there. Mixed runs
                    cannot be fitted (runs.csv does not hold their per-layer plans); they are
                    drawn on the chart beside the uniform ones.
No script, font or style is fetched: the page works from file:// with no network.
"""

import html
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from .errors import ArgumentParser, UserError, cli

MIB = 2**20
SIZE_TOLERANCE = 0.001  # the size prediction is stated (and tested) within 0.1% of the file
CLOSE = 10.0  # accuracy points: the fit's error is also reported on runs that lost less
TINY = 1e-12  # a summed KL of 0 (float rounding can give -1e-9) is clamped here for log S


# ----------------------------------------------------------------------------- the numbers

def layer_table(model, input_size, table):
    """(layers, fp32_bitops): one dict per quantized layer in network order (name, block,
    macs, params: the weight's element count, w / a: its weight / activation KL at bits
    2..8), and the BitOps of the layers that stay FP32 (stem conv, classifier)."""
    from .bitops import bitops_report, block_of
    from .quant.precision import quantized_layer_names, weight_layers
    from .sensitivity import BITS

    names = quantized_layer_names(model)
    missing = [n for n in names if n not in table["weight"] or n not in table["activation"]]
    if missing:
        raise UserError(f"the sensitivity table does not cover layer {missing[0]}; measure "
                        f"it for this checkpoint.")
    rows, _ = bitops_report(model, input_size, {})
    macs = {r["name"]: r["macs"] for r in rows}
    params = {n: m.weight.numel() for n, m in weight_layers(model)}
    layers = [{"name": n, "block": block_of(n), "macs": macs.get(n, 0), "params": params[n],
               "w": [table["weight"][n][str(b)] for b in BITS],
               "a": [table["activation"][n][str(b)] for b in BITS]} for n in names]
    fp32_bitops = sum(r["bitops"] for r in rows if r["name"] not in set(names))
    return layers, fp32_bitops


def summed_kl(layers, plan):
    """The plan's additive sensitivity: sum over layers of weight KL + activation KL.
    `plan`: layer name -> (weight_bits, activation_bits)."""
    from .sensitivity import BITS

    return sum(l["w"][BITS.index(plan[l["name"]][0])] + l["a"][BITS.index(plan[l["name"]][1])]
               for l in layers)


def plan_bytes(layers, fixed_bytes, plan):
    """Predicted file size of `plan`: the fixed bytes plus every layer's packed weights."""
    return fixed_bytes + sum(math.ceil(l["params"] * plan[l["name"]][0] / 8) for l in layers)


def predict_drop(s, fit):
    """Accuracy points the fitted curve gives a summed KL `s`."""
    return fit["dmax"] / (1 + math.exp(fit["k"] * (math.log(fit["s0"]) - math.log(max(s, TINY)))))


def fit_drop(points, dmax):
    """{"k", "s0", "dmax"}: drop = dmax / (1 + (s0 / S)^k) fitted by least squares (in accuracy
    points) to `points`, a list of (S, measured drop). A grid over k and log s0, refined once
    around its best cell: two parameters need no optimiser."""
    log_s = np.log(np.maximum([p[0] for p in points], TINY))
    drop = np.array([p[1] for p in points], dtype=float)

    def best(ks, logs0):
        k, l0 = np.meshgrid(ks, logs0, indexing="ij")
        pred = dmax / (1 + np.exp(k[..., None] * (l0[..., None] - log_s)))
        err = ((pred - drop) ** 2).sum(-1)
        i, j = np.unravel_index(np.argmin(err), err.shape)
        return ks[i], logs0[j]

    ks = np.linspace(0.25, 8, 156)
    logs0 = np.linspace(log_s.min() - 3, log_s.max() + 3, 361)
    k, l0 = best(ks, logs0)
    dk, dl = ks[1] - ks[0], logs0[1] - logs0[0]
    k, l0 = best(np.linspace(k - dk, k + dk, 41), np.linspace(l0 - dl, l0 + dl, 41))
    return {"k": float(k), "s0": float(math.exp(l0)), "dmax": float(dmax)}


def fit_quality(points, dmax):
    """(mean absolute error of the fit on its own points, the same leaving each point out)."""
    fit = fit_drop(points, dmax)
    mae = float(np.mean([abs(predict_drop(s, fit) - d) for s, d in points]))
    if len(points) < 3:
        return mae, None
    loo = [abs(predict_drop(s, fit_drop(points[:i] + points[i + 1:], dmax)) - d)
           for i, (s, d) in enumerate(points)]
    return mae, float(np.mean(loo))


# ----------------------------------------------------------------------------- inputs

def read_runs(paths):
    """The finished runs of every runs.csv named (a sweep folder or the file), as dicts:
    label, uniform, method, weight_bits, activation_bits, quant_acc, baseline_acc, acc_drop,
    bitops, compressed_mb, bias_correction, weight_granularity (None where a column is
    missing)."""
    from .sweep import results

    out = []
    for path in paths:
        df = results.read_runs(path)
        for row in df.to_dict("records"):
            if row.get("status") != results.FINISHED:
                continue
            get = lambda k: None if k not in row or _missing(row[k]) else row[k]
            if get("quant_acc") is None or get("bitops") is None:
                continue
            plan = get("plan") or "uniform"
            method = str(get("method") or "ptq")
            wb, ab = float(get("weight_bits")), float(get("activation_bits"))
            bits = (f"W{wb:g}A{ab:g}" if plan == "uniform"
                    else f"{plan} W{wb:.2f}A{ab:.2f}")
            label = f"{bits}{' ' + method.upper() if method != 'ptq' else ''}"
            bias = get("bias_correction")
            out.append({"label": label, "uniform": plan == "uniform", "method": method,
                        "weight_bits": wb, "activation_bits": ab,
                        "quant_acc": float(row["quant_acc"]),
                        "baseline_acc": _float(get("baseline_acc")),
                        "acc_drop": _float(get("acc_drop")),
                        "bitops": int(row["bitops"]),
                        "compressed_mb": _float(get("compressed_mb")),
                        "bias_correction": None if bias is None
                        else str(bias).strip().lower() in ("true", "1", "1.0"),
                        "weight_granularity": get("weight_granularity")})
    return out


def _missing(value):
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def _float(value):
    return None if value is None else float(value)


def fit_points(runs, layers):
    """(S, drop) of the uniform PTQ runs whose bits the sensitivity table has; each of those
    runs gets its S as r["kl"]."""
    from .sensitivity import BITS

    points = []
    for r in runs:
        wb, ab = r["weight_bits"], r["activation_bits"]
        if (r["uniform"] and r["method"] == "ptq" and r["acc_drop"] is not None
                and wb in BITS and ab in BITS):
            r["kl"] = summed_kl(layers, {l["name"]: (int(wb), int(ab)) for l in layers})
            points.append((r["kl"], r["acc_drop"]))
    return points


def explorer_data(checkpoint, data_dir=None, runs_dirs=(), batches=2, batch_size=128,
                  bias_correction=True, verbose=True):
    """Everything the page needs, as a JSON-ready dict (the page computes the rest)."""
    from .checkpoint import load_model
    from .data import load_dataset
    from .export import orig_mb
    from .sensitivity import BITS, sensitivity

    ckpt, fp32 = load_model(checkpoint)
    runs = read_runs(runs_dirs)  # bad --runs fail here, before minutes of measuring
    if runs_dirs and not runs:
        raise UserError(f"no finished run in {', '.join(map(str, runs_dirs))}; pass the "
                        f"folders of sweeps whose runs finished.")
    data_dir = data_dir or ckpt.get("args", {}).get("data_dir") or "./data"
    info, train, _, _ = load_dataset(ckpt["dataset"], data_dir,
                                     ckpt.get("args", {}).get("val_size"))
    table, _ = sensitivity(checkpoint, data_dir, batches, batch_size, verbose=verbose)
    layers, fp32_bitops = layer_table(fp32, info.input_size, table)

    w8 = {l["name"]: (8, 8) for l in layers}
    from .planner import reference_size

    reference = reference_size(ckpt, fp32, checkpoint, train, info, bias_correction)
    fixed = reference - plan_bytes(layers, 0, w8)
    checked = [r for r in runs if r["uniform"] and r["compressed_mb"] is not None
               and r["weight_bits"] in BITS and r["bias_correction"] in (None, bias_correction)
               and r["weight_granularity"] in (None, "per_channel")]  # as the reference
    errors = [abs(plan_bytes(layers, fixed, {l["name"]: (int(r["weight_bits"]), 8)
                                             for l in layers}) / (r["compressed_mb"] * MIB) - 1)
              for r in checked]

    baselines = [r["baseline_acc"] for r in runs if r["baseline_acc"] is not None]
    baseline = float(np.median(baselines)) if baselines else ckpt.get("test_acc")
    chance = 100.0 / ckpt["num_classes"]
    fit, points = None, fit_points(runs, layers)
    if baseline is not None and len({round(s, 12) for s, _ in points}) >= 2:
        dmax = max(baseline - chance, 1e-3)
        fit = fit_drop(points, dmax)
        fit["mae"], fit["loo_mae"] = fit_quality(points, dmax)
        fit["runs"] = len(points)
        close = [(s, d) for s, d in points if d < CLOSE]  # where a person looks for a plan
        fit["close_runs"] = len(close)
        fit["close_mae"] = (float(np.mean([abs(predict_drop(s, fit) - d) for s, d in close]))
                            if close else None)
    return {
        "checkpoint": str(checkpoint), "dataset": ckpt["dataset"],
        "width_multiplier": ckpt["width_multiplier"], "input_size": info.input_size,
        "bits": list(BITS), "layers": layers, "fp32_bitops": fp32_bitops,
        "bitops_fp32": sum(l["macs"] for l in layers) * 32 * 32 + fp32_bitops,
        "size": {"fixed_bytes": fixed, "reference_bytes": reference,
                 "orig_mb": orig_mb(ckpt["model"]), "bias_correction": bias_correction,
                 "runs_checked": len(errors),
                 "runs_max_error": max(errors) if errors else None},
        "sensitivity": {"images": table.get("images")},
        "baseline_acc": baseline, "chance": chance, "fit": fit, "runs_given": len(runs_dirs),
        "runs": [{**{k: r[k] for k in ("label", "uniform", "method", "bitops", "quant_acc")},
                  # where the fitted curve puts a run it was fitted to: the chart draws the gap
                  "predicted_acc": baseline - predict_drop(r["kl"], fit)
                  if fit and "kl" in r else None} for r in runs],
    }


# ----------------------------------------------------------------------------- the page

def notes(data):
    """What each number on the page is and how far to trust it, one sentence or two each."""
    size, fit = data["size"], data["fit"]
    quantized = len(data["layers"])
    blocks = len({l["block"] for l in data["layers"]})
    kl = (f"the plan's summed KL S (each layer's weight and activation KL divergence measured "
          f"alone on {data['sensitivity']['images']} training images, the cost the "
          f"sensitivity planner minimises)")
    out = [
        f"BitOps: per image, each quantized layer's MACs x weight bits x activation bits, the "
        f"stem conv and the classifier at 32 x 32, as bitops.py counts them ({quantized} "
        f"quantized layers in {blocks} blocks; the FP32 model: "
        f"{data['bitops_fp32'] / 1e9:.2f} G).",
        f"Compressed MB: the safetensors file export.py writes "
        f"({'with' if size['bias_correction'] else 'without'} bias correction): a real export "
        f"of this checkpoint at W8A8 ({size['reference_bytes']:,} bytes) gives the fixed part "
        f"(scales, BatchNorm, FP32 tensors, header: {size['fixed_bytes']:,} bytes) and each "
        f"layer adds ceil(parameters x weight bits / 8) bytes of packed weights; only the "
        f"digits of offsets in the header are not followed, so the prediction is within "
        f"{SIZE_TOLERANCE:.1%} of the real file"
        + (f" (against the {size['runs_checked']} uniform runs given: largest error "
           f"{size['runs_max_error']:.3%})." if size["runs_checked"] else "."),
    ]
    if fit:
        error = f"on those runs it is off by {fit['mae']:.2f} points on average"
        if fit["loo_mae"] is not None:
            error += f" ({fit['loo_mae']:.2f} when each run is left out of the fit"
            if fit["close_mae"] is not None:
                error += (f"; {fit['close_mae']:.2f} on the {fit['close_runs']} runs that "
                          f"lost under {CLOSE:g} points")
            error += ")"
        out.append(
            f"Predicted drop, an estimate: {kl} through the curve drop = {fit['dmax']:.2f} / "
            f"(1 + ({fit['s0']:.3g} / S)^{fit['k']:.2f}), fitted by least squares to the "
            f"{fit['runs']} uniform PTQ runs given ({fit['dmax']:.2f} = FP32 "
            f"{data['baseline_acc']:.2f}% minus chance {data['chance']:.2f}%); {error}; layers "
            f"that interact can make a mixed plan's real drop differ.")
    else:
        why = ("the runs given hold fewer than two uniform PTQ runs, too few"
               if data["runs_given"] else "no runs were given (--runs)")
        out.append(f"Predicted drop: {why} to calibrate a drop, so the page shows {kl} alone; "
                   f"a larger S means a larger drop.")
    return out


def render(data):
    """The page: the data as JSON in a script element, read by the inline script."""
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    title = (f"Plan explorer: MobileNetV2 w{data['width_multiplier']:g} on {data['dataset']} "
             f"({data['checkpoint']})")
    return (PAGE.replace("{{TITLE}}", html.escape(title))
            .replace("{{NOTES}}", "".join(f"<p>{html.escape(n)}</p>" for n in notes(data)))
            .replace("{{DATA}}", payload))


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{TITLE}}</title>
<style>
body { font: 13px/1.35 system-ui, sans-serif; margin: 12px 16px; color: #1a202c; }
h1 { font-size: 16px; margin: 0 0 8px; font-weight: 600; }
.cards { display: flex; gap: 10px; margin-bottom: 10px; }
.card { border: 1px solid #cbd5e0; border-radius: 6px; padding: 6px 12px; min-width: 150px; }
.card .v { font-size: 22px; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .k, .card .s { color: #4a5568; font-size: 12px; }
.main { display: flex; gap: 14px; align-items: flex-start; }
.plot { flex: 1 1 auto; min-width: 360px; max-width: 760px; }
#chart { width: 100%; height: auto; display: block; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 1px 6px; text-align: right; white-space: nowrap; }
th { font-weight: 600; color: #4a5568; border-bottom: 1px solid #cbd5e0; }
td:first-child, th:first-child { text-align: left; }
tr.all td { border-bottom: 1px solid #cbd5e0; padding-bottom: 3px; font-weight: 600; }
select { font: inherit; padding: 0 2px; }
.bar { display: inline-block; height: 8px; background: #90cdf4; vertical-align: middle; }
#chart { border: 1px solid #e2e8f0; border-radius: 6px; }
.notes { color: #4a5568; max-width: 1160px; margin-top: 8px; font-size: 12px; }
.notes p { margin: 3px 0; }
svg text { font: 11px system-ui, sans-serif; fill: #4a5568; }
</style>
</head>
<body>
<h1>{{TITLE}}</h1>
<div class="cards">
  <div class="card"><div class="k">BitOps per image</div>
    <div class="v"><span id="bitops">-</span> G</div><div class="s" id="bitops-note"></div></div>
  <div class="card"><div class="k">compressed file</div>
    <div class="v"><span id="mb">-</span> MB</div><div class="s" id="mb-note"></div></div>
  <div class="card"><div class="k">predicted accuracy drop</div>
    <div class="v"><span id="drop">-</span></div><div class="s" id="drop-note"></div></div>
  <div class="card"><div class="k">summed KL (sensitivity)</div>
    <div class="v"><span id="kl">-</span></div><div class="s" id="bits-note"></div></div>
</div>
<div class="main">
  <table id="controls">
    <thead><tr><th>block</th><th title="quantized layers in the block">layers</th>
      <th>MACs</th><th>W bits</th><th>A bits</th><th>BitOps share</th><th>KL</th></tr></thead>
    <tbody></tbody>
  </table>
  <div class="plot">
    <svg id="chart" viewBox="0 0 640 440"></svg>
    <label><input type="checkbox" id="zoom" checked> zoom in on the top 12 points of
      accuracy (clear it to see every run)</label>
  </div>
</div>
<div class="notes" id="notes">{{NOTES}}</div>
<script type="application/json" id="explorer-data">{{DATA}}</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("explorer-data").textContent);
const BITS = D.bits, SVGNS = "http://www.w3.org/2000/svg", MIB = 1048576;
const blocks = [...new Set(D.layers.map(l => l.block))];
const $ = id => document.getElementById(id);
const pct = x => x.toFixed(2) + "%";

function el(tag, attrs, parent, text) {  // an SVG element (a div for the bars)
  const ns = tag === "div" ? "http://www.w3.org/1999/xhtml" : SVGNS;
  const e = document.createElementNS(ns, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  if (parent) parent.appendChild(e);
  return e;
}
function bitsSelect(id, withMixed) {
  const s = document.createElement("select");
  s.id = id;
  if (withMixed) s.add(new Option("mixed", ""));
  for (const b of BITS) s.add(new Option(String(b), String(b)));
  s.value = "8";
  return s;
}
function cell(tr, content) {
  const td = tr.insertCell();
  if (content instanceof Node) td.appendChild(content); else td.textContent = content;
  return td;
}
function si(x) {
  for (const [unit, scale] of [["G", 1e9], ["M", 1e6], ["k", 1e3]])
    if (x >= scale) return (x / scale).toPrecision(3) + " " + unit;
  return String(x);
}

// ---- controls: one row per block, under an "all blocks" row
const body = document.querySelector("#controls tbody");
const macsOf = {}, layersOf = {};
for (const l of D.layers) {
  macsOf[l.block] = (macsOf[l.block] || 0) + l.macs;
  (layersOf[l.block] = layersOf[l.block] || []).push(l.name);
}
const all = body.insertRow();
all.className = "all";
for (const c of ["all blocks", D.layers.length, si(D.layers.reduce((t, l) => t + l.macs, 0)),
                 bitsSelect("w-all", true), bitsSelect("a-all", true), "", ""]) cell(all, c);
const shareCell = {}, klCell = {};
for (const b of blocks) {
  const tr = body.insertRow();
  cell(tr, b).title = layersOf[b].join("\\n");
  for (const c of [layersOf[b].length, si(macsOf[b]), bitsSelect("w-" + b),
                   bitsSelect("a-" + b)]) cell(tr, c);
  shareCell[b] = cell(tr, "");
  klCell[b] = cell(tr, "");
}

function currentPlan() {
  return Object.fromEntries(blocks.map(b => [b, [+$("w-" + b).value, +$("a-" + b).value]]));
}

// ---- the numbers, as bitops.py counts BitOps, export.py lays out the file, the curve fits
function evaluate(plan) {
  let bitops = D.fp32_bitops, bytes = D.size.fixed_bytes, kl = 0, macs = 0, wsum = 0, asum = 0;
  const blockOps = {}, blockKl = {};
  for (const l of D.layers) {
    const [w, a] = plan[l.block];
    const ops = l.macs * w * a, k = l.w[BITS.indexOf(w)] + l.a[BITS.indexOf(a)];
    bitops += ops;
    bytes += Math.ceil(l.params * w / 8);
    kl += k;
    macs += l.macs; wsum += l.macs * w; asum += l.macs * a;
    blockOps[l.block] = (blockOps[l.block] || 0) + ops;
    blockKl[l.block] = (blockKl[l.block] || 0) + k;
  }
  const f = D.fit;
  const drop = f ? f.dmax / (1 + Math.pow(f.s0 / Math.max(kl, 1e-12), f.k)) : null;
  return {bitops, bytes, kl, drop, blockOps, blockKl, meanW: wsum / macs, meanA: asum / macs};
}

// ---- the chart: the measured runs and the current plan
const C = {w: 640, h: 440, l: 56, r: 14, t: 14, b: 44};
const plotW = C.w - C.l - C.r, plotH = C.h - C.t - C.b;
const svg = $("chart");
const runOps = D.runs.map(r => r.bitops), runAcc = D.runs.map(r => r.quant_acc);
const uniformOps = bits => evaluate(Object.fromEntries(blocks.map(b => [b, [bits, bits]]))).bitops;
const xMin = Math.min(uniformOps(2), ...runOps) * 0.95;
const xMax = Math.max(uniformOps(8), ...runOps) * 1.03;
let yMin = 0, yMax = 100;
const X = v => C.l + (v - xMin) / (xMax - xMin) * plotW;
const Y = v => C.t + (yMax - v) / (yMax - yMin) * plotH;
function ticks(a, b, n) {
  const rough = (b - a) / n, mag = Math.pow(10, Math.floor(Math.log10(rough)));
  const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= rough);
  const out = [];
  for (let v = Math.ceil(a / step) * step; v <= b + 1e-9; v += step) out.push(+v.toPrecision(10));
  return out;
}
let marker = null, markerTitle = null, guide = null;
function drawChart() {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  if (!D.runs.length) {
    el("text", {x: C.w / 2, y: C.h / 2, "text-anchor": "middle"}, svg,
       "no runs given (--runs): nothing measured to draw");
    return;
  }
  const top = Math.max(D.baseline_acc || 0, ...runAcc);
  yMax = Math.min(100, Math.ceil(top + 1.5));
  yMin = $("zoom").checked ? Math.floor(top - 12)
                           : Math.max(0, Math.floor(Math.min(...runAcc) / 10) * 10 - 5);
  const frame = {x: C.l, y: C.t, width: plotW, height: plotH};
  el("clipPath", {id: "plot"}, svg).appendChild(el("rect", frame));
  for (const v of ticks(yMin, yMax, 6)) {
    el("line", {x1: C.l, x2: C.w - C.r, y1: Y(v), y2: Y(v), stroke: "#edf2f7"}, svg);
    el("text", {x: C.l - 6, y: Y(v) + 4, "text-anchor": "end"}, svg, v + "%");
  }
  for (const v of ticks(xMin / 1e9, xMax / 1e9, 7)) {
    el("line", {x1: X(v * 1e9), x2: X(v * 1e9), y1: C.t, y2: C.h - C.b, stroke: "#edf2f7"}, svg);
    el("text", {x: X(v * 1e9), y: C.h - C.b + 15, "text-anchor": "middle"}, svg, v);
  }
  el("rect", {...frame, fill: "none", stroke: "#a0aec0"}, svg);
  el("text", {x: C.l + plotW / 2, y: C.h - 8, "text-anchor": "middle"}, svg,
     "BitOps per image (G)");
  const mid = C.t + plotH / 2;
  el("text", {x: 14, y: mid, "text-anchor": "middle", transform: `rotate(-90 14 ${mid})`}, svg,
     "test accuracy (%)");
  const g = el("g", {"clip-path": "url(#plot)"}, svg);
  if (D.baseline_acc != null) {
    const y = Y(D.baseline_acc);
    el("line", {x1: C.l, x2: C.w - C.r, y1: y, y2: y, stroke: "#718096",
                "stroke-dasharray": "4 3"}, g);
    el("text", {x: C.l + 6, y: y - 5}, g, "FP32 " + pct(D.baseline_acc));
  }
  for (const r of D.runs) {  // the fit's miss on each run it was fitted to, in grey
    if (r.predicted_acc === null) continue;
    const x = X(r.bitops), y = Y(r.predicted_acc);
    el("line", {x1: x, x2: x, y1: Y(r.quant_acc), y2: y, stroke: "#a0aec0"}, g);
    el("circle", {cx: x, cy: y, r: 3, fill: "white", stroke: "#718096", class: "fitted"}, g);
  }
  for (const r of D.runs) {
    const colour = r.uniform ? "#2b6cb0" : "#dd6b20";
    const c = el("circle", {cx: X(r.bitops), cy: Y(r.quant_acc), r: 4.5, stroke: colour,
                            fill: r.method === "ptq" ? colour : "white", "fill-opacity": 0.8,
                            "stroke-width": 1.5, class: "run " + (r.uniform ? "uniform" : "mixed")},
                    g);
    el("title", {}, c, r.label + " " + pct(r.quant_acc));
  }
  guide = el("line", {stroke: "#e53e3e", "stroke-dasharray": "2 3", y1: C.t, y2: C.h - C.b}, g);
  marker = el("path", {id: "marker", fill: "#e53e3e", stroke: "#742a2a"}, g);
  markerTitle = el("title", {}, marker);
  const legend = [["#2b6cb0", "uniform runs"], ["#dd6b20", "mixed-precision runs"],
                  ["#a0aec0", "the fit at a uniform run"], ["#e53e3e", "this plan (predicted)"]];
  const lx = C.w - C.r - 150, ly = C.h - C.b - 14 - 16 * legend.length;
  el("text", {x: lx, y: ly}, svg, "hollow: QAT");
  legend.forEach(([colour, text], i) => {
    el("rect", {x: lx, y: ly + 16 * (i + 1) - 8, width: 9, height: 9, fill: colour}, svg);
    el("text", {x: lx + 14, y: ly + 16 * (i + 1)}, svg, text);
  });
}

function update() {
  const v = evaluate(currentPlan());
  const show = (id, text, value) => {
    $(id).textContent = text;
    if (value === undefined) delete $(id).dataset.value; else $(id).dataset.value = String(value);
  };
  show("bitops", (v.bitops / 1e9).toFixed(4), v.bitops);
  $("bitops-note").textContent = (D.bitops_fp32 / v.bitops).toFixed(1) + "x fewer than FP32";
  show("mb", (v.bytes / MIB).toFixed(4), v.bytes);
  $("mb-note").textContent = (D.size.orig_mb * MIB / v.bytes).toFixed(2) +
                             "x smaller than FP32 (" + D.size.orig_mb.toFixed(3) + " MB)";
  show("kl", v.kl.toPrecision(3), v.kl);
  $("bits-note").textContent = "mean bits W" + v.meanW.toFixed(2) + " A" + v.meanA.toFixed(2) +
                               " (MAC-weighted)";
  if (v.drop !== null) {
    show("drop", v.drop.toFixed(2) + " pts", v.drop);
    $("drop-note").textContent = "estimate: " + pct(D.baseline_acc - v.drop) +
                                 " (FP32 " + pct(D.baseline_acc) + ")";
  } else {
    show("drop", "n/a");
    $("drop-note").textContent = D.runs_given ? "too few uniform PTQ runs to calibrate"
                                              : "no runs given to calibrate a drop";
  }
  const most = Math.max(...blocks.map(b => v.blockOps[b]));
  for (const b of blocks) {
    shareCell[b].textContent = "";
    const width = Math.round(40 * v.blockOps[b] / most);
    el("div", {class: "bar", style: "width:" + width + "px"}, shareCell[b]);
    shareCell[b].append(" " + (100 * v.blockOps[b] / v.bitops).toFixed(1) + "%");
    klCell[b].textContent = v.blockKl[b].toExponential(1);
  }
  for (const kind of ["w", "a"]) {  // "all blocks" shows the common bits, else "mixed"
    const values = new Set(blocks.map(b => $(kind + "-" + b).value));
    $(kind + "-all").value = values.size === 1 ? [...values][0] : "";
  }
  if (guide) {
    const x = X(v.bitops);
    guide.setAttribute("x1", x);
    guide.setAttribute("x2", x);
  }
  if (marker && v.drop !== null) {
    const x = X(v.bitops), y = Y(D.baseline_acc - v.drop);
    marker.setAttribute("d", `M${x},${y - 8}L${x + 7},${y}L${x},${y + 8}L${x - 7},${y}Z`);
    markerTitle.textContent = "this plan: " + (v.bitops / 1e9).toFixed(4) +
                              " GBitOps, predicted " + pct(D.baseline_acc - v.drop);
  }
}

for (const kind of ["w", "a"]) {
  for (const ev of ["input", "change"]) {
    for (const b of blocks) $(kind + "-" + b).addEventListener(ev, update);
    $(kind + "-all").addEventListener(ev, () => {
      const value = $(kind + "-all").value;
      if (value) for (const b of blocks) $(kind + "-" + b).value = value;
      update();
    });
  }
}
$("zoom").addEventListener("change", () => { drawChart(); update(); });

drawChart();
update();
</script>
</body>
</html>
"""


# ----------------------------------------------------------------------------- command line

def get_args_parser():
    p = ArgumentParser(
        prog="python -m mobilenet_compression.explorer",
        description="Write one self-contained HTML page to try per-block weight/activation "
                    "bits of a checkpoint and see its BitOps, compressed size and predicted "
                    "accuracy drop at once.")
    p.add_argument("--checkpoint", required=True, help="FP32 checkpoint written by train.py")
    p.add_argument("--data_dir", default=None,
                   help="dataset folder (default: the one the checkpoint was trained from)")
    p.add_argument("--runs", nargs="+", default=[], metavar="DIR",
                   help="sweep folders (each holding a runs.csv) of this checkpoint: drawn on "
                        "the chart, and their uniform PTQ runs calibrate the predicted drop "
                        "(default: none, the page shows the summed KL alone)")
    p.add_argument("--out", required=True, help="the page to write (.html)")
    p.add_argument("--batches", type=int, default=2,
                   help="training batches the sensitivities are measured on (default: 2, "
                        "as in python -m mobilenet_compression.sensitivity, whose cache it "
                        "shares)")
    p.add_argument("--batch_size", type=int, default=128, help="images per batch (default: 128)")
    p.add_argument("--bias_correction", default="true",
                   help="whether the sized files have bias correction, as runs do by default "
                        "(default: true)")
    from . import threads
    threads.add_argument(p)
    return p


def check_out(path):
    """--out must be a new or existing .html file in a folder that exists and is writable."""
    out = Path(path)
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--out must name an .html file, got {path}.")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"the folder of --out {path} does not exist; create it first.")
    if out.is_dir():
        raise UserError(f"--out {path} is a folder; name the .html file to write.")
    if not os.access(folder, os.W_OK):
        raise UserError(f"cannot write to {folder}; pass --out in a folder you can write to.")
    return out


@cli
def main(argv=None):
    from . import threads
    from .config import parse_bool
    from .files import atomic_write

    args = get_args_parser().parse_args(argv)
    out = check_out(args.out)
    if args.batches < 1 or args.batch_size < 1:
        raise UserError("--batches and --batch_size must be positive integers.")
    bias_correction = parse_bool(args.bias_correction, "--bias_correction")
    threads.set_threads(args.threads)
    data = explorer_data(args.checkpoint, args.data_dir, args.runs, args.batches,
                         args.batch_size, bias_correction)
    page = render(data).encode()
    try:
        atomic_write(str(out), lambda f: f.write(page))
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e}); pass --out in a folder you "
                        f"can write to.") from None
    print(f"{out}: {len(page) / 1024:.0f} KiB, {len(data['layers'])} quantized layers, "
          f"{len(data['runs'])} runs")
    print(notes(data)[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
