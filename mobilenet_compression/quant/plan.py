"""The run's precision plan (`--plan`): uniform bits, the adaptive rule, or a sensitivity plan
under a BitOps or size budget, which is then quantized beside the best uniform configuration
within the same budget and kept only if it scores at least as high on validation images."""

from . import planner
from .bitops import adaptive_plan
from .precision import mean_bits
from .prepare import precision_plan
from .recipe import post_training_quantize

def plan_budgets(config, fp32, info, fixed_bytes=None):
    """The budget a sensitivity plan must meet, as {"budget": BitOps or None, "size": (fixed
    bytes, byte budget) or None}; every bad budget is one UserError here, before the
    sensitivities are measured. A size budget needs `fixed_bytes`, the bytes of the run's
    file that do not depend on the plan (deploy.size.size_model)."""
    if config.plan != "sensitivity":
        return {"budget": None, "size": None}
    if config.bitops_budget:
        return {"budget": planner.parse_budget(config.bitops_budget, fp32, info.input_size,
                                               config.activation_bits), "size": None}
    return {"budget": None, "size": (fixed_bytes, planner.parse_size_budget(
        config.size_budget_mb, fixed_bytes, fp32))}


def run_plan(config, fp32, info, budgets, table):
    """(the precision plan quantize_model takes, {"budget", "size": as plan_budgets gives
    them, "table": the sensitivity table or None}): uniform bits, the adaptive rule, or the
    plan of least summed sensitivity (mixed.sensitivity's `table`) within the budget."""
    if config.plan == "uniform":
        plan = (config.weight_bits, config.activation_bits)
    elif config.plan == "adaptive":
        plan = adaptive_plan(fp32, info.input_size, config.activation_bits)
    else:
        plan = planner.sensitivity_plan(fp32, info.input_size, table, budgets["budget"],
                                        size=budgets["size"])
    return plan, {**budgets, "table": table}


def keep_plan_or_uniform(config, planned, planning, fp32, info, source, calib_loader, means,
                         val_score, progress, val_images=None):
    """A sensitivity plan against the best uniform configuration within the same budget
    (planner.best_uniform: the least summed sensitivity among the uniform plans whose BitOps,
    or predicted file size, fit), each quantized as the run quantizes, scored on the
    validation images; the better one is kept (a tie keeps the plan). Returns the kept
    model's (qmodel, chosen, score, layer calibration), its choices with `plan_kept`,
    `plan_val_acc`, `uniform_val_acc` and `uniform_rival` added."""
    qmodel, chosen, score, layer_calibration = planned
    rival = planner.best_uniform(fp32, info.input_size, planning["table"],
                                 planning["budget"], size=planning["size"])
    plan = precision_plan(qmodel)
    if rival is None or set(plan.values()) == {rival}:
        return qmodel, {**chosen, "plan_kept": "plan"}, score, layer_calibration
    print(f"the plan against uniform W{rival[0]}A{rival[1]}, the best uniform configuration "
          f"within the same budget:", flush=True)
    uniform = post_training_quantize(config, rival, source, calib_loader, means, val_score,
                                     progress, val_images)
    scores = [score if score is not None else val_score(qmodel),
              uniform[2] if uniform[2] is not None else val_score(uniform[0])]
    keep_plan = scores[0] >= scores[1]
    kept = planned if keep_plan else uniform
    print(f"kept the {'plan' if keep_plan else 'uniform configuration'} ({scores[0]:.2f}% "
          f"plan, {scores[1]:.2f}% uniform W{rival[0]}A{rival[1]}, on "
          f"{val_images or 'the'} validation images)", flush=True)
    return kept[0], {**kept[1], "plan_kept": "plan" if keep_plan else "uniform",
                     "plan_val_acc": scores[0], "uniform_val_acc": scores[1],
                     "uniform_rival": f"w{rival[0]}a{rival[1]}"}, \
        scores[0] if keep_plan else scores[1], kept[3]


def plan_bits(rows):
    """weight_bits / activation_bits of the run, from the quantized model's own plan: the
    bits themselves when every quantized layer has the same, else the MAC-weighted means."""
    plan = {r["name"]: (r["weight_bits"], r["activation_bits"]) for r in rows
            if (r["weight_bits"], r["activation_bits"]) != (32, 32)}
    if len(set(plan.values())) == 1:
        wb, ab = next(iter(plan.values()))
    else:
        wb, ab = mean_bits(plan, {r["name"]: r["macs"] for r in rows})
    return {"weight_bits": wb, "activation_bits": ab}
