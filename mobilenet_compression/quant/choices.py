"""The quantization choices a run's configuration names, as plain values and checks: the
calibration and weight methods, the weight roundings, the per-bit-width calibration default
and the form of a --bitops_budget. No torch here, so checking a configuration (config.py, a
sweep's parameters before any run starts, `sweep.py --sweep Y --list`, a SLURM task's
`--index N`) does not load the engine; the modules that implement each choice import its
names from here."""

import math
import re

from ..errors import UserError

WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
WEIGHT_METHODS = ("minmax", "mse")
CALIBRATION_METHODS = ("minmax", "percentile", "mse", "loss")
ROUNDINGS = ("nearest", "gptq")  # rounding.py

# --calibration auto: activations of this many bits or fewer get the clip search.
LOSS_MAX_BITS = 3

# A --bitops_budget that names a uniform plan ("w4a4"): its BitOps are the budget.
UNIFORM_BUDGET = re.compile(r"[wW]([2-8])[aA]([2-8])")
# A --bitops_budget of "adaptive": the BitOps of the adaptive plan at --activation_bits, so
# that a sweep puts --plan adaptive and a sensitivity plan of the same cost side by side
# (--plan adaptive accepts this budget, its own, and no other).
ADAPTIVE_BUDGET = "adaptive"


def check_choice(value, choices, flag):
    if value not in choices:
        raise UserError(f"{flag} must be one of {', '.join(choices)}, got {value!r}.")
    return value


def default_calibration(activation_bits):
    """--calibration auto (the default), for one layer's or one uniform run's activation
    bits: `loss` (clip_search.py) for activations of LOSS_MAX_BITS or fewer, where each
    input's own least squared error chose clips that broke the network
    (W8A3 31.15% mean over three 30-epoch seeds with `mse`, 85.26% with `loss`; W8A2 38.49%
    against 75.96% on the width-1.0 checkpoint), and `mse` at 4 bits and more, where the two
    tied on those seeds (mean differences -0.22 to +0.41 point a cell, either sign), so the
    search's time would buy nothing (README)."""
    return "loss" if activation_bits <= LOSS_MAX_BITS else "mse"


def budget_text(value):
    """A --bitops_budget as given ("1.2" GBitOps or "0.5x"), checked for form and sign here;
    its range needs the model (planner.parse_budget)."""
    text = str(value).strip()
    if UNIFORM_BUDGET.fullmatch(text) or text.lower() == ADAPTIVE_BUDGET:
        return text.lower()
    try:
        number = float(text[:-1] if text.lower().endswith("x") else text)
    except ValueError:
        raise UserError(f"--bitops_budget must be a number of GBitOps, a fraction of the "
                        f"W8A8 BitOps such as 0.5x, a uniform plan's such as w4a4, or "
                        f"adaptive, got {value!r}.") from None
    if not (number > 0 and math.isfinite(number)):
        raise UserError(f"--bitops_budget must be positive, got {value!r}.")
    return text
