"""Mixed-precision plans under a BitOps budget, from per-layer sensitivities.

HAWQ-V3's integer program (Yao et al. 2021, section 3.4), with this package's measured
sensitivities (sensitivity.py) as the per-layer cost: one binary x[l, w, a] per quantized
layer l and (weight bits w, input activation bits a) in 2..8 x 2..8,

    minimise    sum  x[l,w,a] * (S_weight[l][w] + S_activation[l][a])
    subject to  sum_{w,a} x[l,w,a] = 1                  for every layer l
                sum  x[l,w,a] * MACs[l] * w * a  <=  budget - BitOps of the FP32 layers

solved exactly by HiGHS (through PuLP; CBC where highspy is missing). The sum of one-layer
KL divergences is the additive approximation every such method makes; the chosen plan's
BitOps are then counted again by bitops.py, the same code every run's `bitops` comes from,
and a plan over the budget is an error, never a result.

A budget is "X" (GBitOps per image), "Fx" (F times the all-8-bit model's BitOps, e.g.
"0.5x") or "WxAy" (the BitOps of the uniform plan at x weight and y activation bits, e.g.
"w4a4": the mixed plan that costs what uniform W4A4 costs); it must lie between the
all-2-bit and the FP32 BitOps of the model.
"""

import math

from ..errors import UserError
from .bitops import adaptive_plan, bitops_report, layer_stats, plan_bitops
from .choices import ADAPTIVE_BUDGET, UNIFORM_BUDGET, budget_text
from .precision import QUANT_BITS, quantized_layer_names, uniform_plan, weight_layers

GIGA = 1e9
MIB = 2**20
# Bytes kept free under a size budget for what the size prediction does not follow: the
# digits of the offsets in the file's JSON header (0.01% of the file at most on the grid).
SIZE_MARGIN = 1024


def parse_budget(text, model, input_size, activation_bits=8):
    """BitOps per image from a --bitops_budget value (`adaptive`: the adaptive plan's at
    `activation_bits`); every bad value is one UserError."""
    raw = budget_text(text)  # its form and sign, as the run's config checks them
    if raw == ADAPTIVE_BUDGET:
        return bitops_report(model, input_size, adaptive_plan(model, input_size,
                                                              activation_bits))[1]["bitops"]
    stats = layer_stats(model, input_size)
    match = UNIFORM_BUDGET.fullmatch(raw)
    if match:  # the BitOps of the uniform plan WxAy: its mixed-precision rival
        w, a = int(match[1]), int(match[2])
        return plan_bitops(stats, uniform_plan(model, w, a))[1]["bitops"]
    value = float(raw[:-1]) if raw.lower().endswith("x") else float(raw)
    w8a8 = plan_bitops(stats, uniform_plan(model, 8, 8))[1]["bitops"]
    budget = value * w8a8 if raw.lower().endswith("x") else value * GIGA
    low = plan_bitops(stats, uniform_plan(model, 2, 2))[1]["bitops"]
    high = plan_bitops(stats, {})[1]["bitops"]  # all FP32
    if budget < low:
        raise UserError(f"--bitops_budget {text} ({budget / GIGA:.4f} GBitOps) is below the "
                        f"all-2-bit model's {low / GIGA:.4f} GBitOps: no plan fits.")
    if budget > high:
        raise UserError(f"--bitops_budget {text} ({budget / GIGA:.4f} GBitOps) is above the "
                        f"FP32 model's {high / GIGA:.4f} GBitOps.")
    return budget


def parse_size_budget(value, fixed, model):
    """Bytes from --size_budget_mb (MiB, as compressed_mb counts them); one UserError when no
    plan can fit (below the all-2-bit file) ."""
    names = set(quantized_layer_names(model))
    low = fixed + sum(math.ceil(m.weight.numel() * 2 / 8) for n, m in weight_layers(model)
                      if n in names) + SIZE_MARGIN
    limit = value * MIB
    if limit < low:
        raise UserError(f"--size_budget_mb {value:g} is below the all-2-bit file of this "
                        f"checkpoint ({low / MIB:.4f} MB): no plan fits.")
    return limit


def packed_weight_bytes(model, names, bits=QUANT_BITS):
    """{(layer, weight bits): bytes of its packed weights, ceil(parameters x bits / 8)}: the
    part of the predicted file size each quantized layer adds."""
    params = {n: m.weight.numel() for n, m in weight_layers(model)}
    return {(n, w): math.ceil(params[n] * w / 8) for n in names for w in bits}


def sensitivity_plan(model, input_size, table, budget=None, bits=QUANT_BITS, size=None):
    """The plan {layer: (weight_bits, activation_bits)} minimising the summed sensitivities
    with BitOps (as bitops.py counts them) <= budget and/or, with `size` = (fixed bytes,
    byte budget), the predicted file size (fixed bytes + each layer's packed weights,
    ceil(parameters x bits / 8)) <= the byte budget."""
    import pulp

    rows, totals = bitops_report(model, input_size, {})
    names = quantized_layer_names(model)
    macs = {r["name"]: r["macs"] for r in rows}
    fp32_part = sum(r["bitops"] for r in rows if r["name"] not in names)
    missing = [n for n in names if n not in table["weight"] or n not in table["activation"]]
    if missing:
        raise UserError(f"the sensitivity table does not cover layer {missing[0]}; measure it "
                        f"for this checkpoint.")
    prob = pulp.LpProblem("bit_allocation", pulp.LpMinimize)
    choice = {(n, w, a): pulp.LpVariable(f"x_{i}_{w}_{a}", cat="Binary")
              for i, n in enumerate(names) for w in bits for a in bits}
    prob += pulp.lpSum(v * (table["weight"][n][str(w)] + table["activation"][n][str(a)])
                       for (n, w, a), v in choice.items())
    for n in names:
        prob += pulp.lpSum(choice[n, w, a] for w in bits for a in bits) == 1
    if budget is not None:
        prob += pulp.lpSum(v * macs[n] * w * a for (n, w, a), v in choice.items()) <= \
            budget - fp32_part
    if size is not None:
        fixed, limit = size
        packed = packed_weight_bytes(model, names, bits)
        prob += pulp.lpSum(v * packed[n, w] for (n, w, a), v in
                           choice.items()) <= limit - fixed - SIZE_MARGIN
    solver = (pulp.HiGHS(msg=False) if "HiGHS" in pulp.listSolvers(onlyAvailable=True)
              else pulp.PULP_CBC_CMD(msg=False))
    status = prob.solve(solver)
    if pulp.LpStatus[status] != "Optimal":
        raise UserError(f"no plan meets the {'size' if size is not None else 'BitOps'} "
                        f"budget ({pulp.LpStatus[status]}).")
    plan = {}
    for (n, w, a), v in choice.items():
        if v.value() is not None and v.value() > 0.5:
            plan[n] = (w, a)
    counted = bitops_report(model, input_size, plan)[1]["bitops"]
    if len(plan) != len(names) or (budget is not None and counted > budget):
        raise RuntimeError(f"the solver's plan breaks the budget: {counted} > {budget} BitOps")
    return plan


def best_uniform(model, input_size, table, budget=None, size=None, bits=QUANT_BITS):
    """(weight bits, activation bits) of the uniform plan with the least summed sensitivity
    (the objective sensitivity_plan minimises) among those within the BitOps budget (counted
    by bitops.py) and/or the size budget (`size` = (fixed bytes, byte budget), predicted as
    sensitivity_plan predicts it); None when no uniform plan fits."""
    names = quantized_layer_names(model)
    packed = packed_weight_bytes(model, names, bits) if size is not None else None
    stats = layer_stats(model, input_size) if budget is not None else None
    best, best_cost = None, math.inf
    for w in bits:
        for a in bits:
            cost = sum(table["weight"][n][str(w)] + table["activation"][n][str(a)]
                       for n in names)
            if cost >= best_cost:
                continue
            if budget is not None and plan_bitops(
                    stats, uniform_plan(model, w, a))[1]["bitops"] > budget:
                continue
            if size is not None:
                fixed, limit = size
                if fixed + sum(packed[n, w] for n in names) > limit - SIZE_MARGIN:
                    continue
            best, best_cost = (w, a), cost
    return best
