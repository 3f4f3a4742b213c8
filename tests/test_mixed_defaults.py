"""Mixed-precision plans get each per-bit-width default layer by layer, and a plan run keeps
the best uniform configuration within its budget when that scores higher on validation."""

import torch

from mobilenet_compression.quant import planner
from mobilenet_compression import pipeline
from mobilenet_compression.quant.plan import keep_plan_or_uniform
from mobilenet_compression.quant.bitops import bitops_report
from mobilenet_compression.config import RunConfig
from mobilenet_compression.data import BatchLoader
from mobilenet_compression.quant import recipe
from mobilenet_compression.quant.calibrate import calibrate
from mobilenet_compression.quant.precision import (
    QUANT_BITS,
    quantized_layer_names,
    uniform_plan,
)
from mobilenet_compression.quant.prepare import (
    act_quantizers,
    precision_plan,
    quant_layers,
    quantize_model,
)

from .conftest import torch_threads
from .test_planner import SIZE

PLAN_RUN = {"plan": "sensitivity", "bitops_budget": "w4a4", "calib_batches": 1,
            "bias_correction": False, "weight_rounding": "nearest"}


def halving_table(model, weight=1.0, activation=1.0):
    """A sensitivity table where each bit a layer keeps halves what it loses."""
    names = quantized_layer_names(model)
    return {"layers": names,
            "weight": {n: {str(b): weight * 2.0 ** -b for b in QUANT_BITS} for n in names},
            "activation": {n: {str(b): activation * 2.0 ** -b for b in QUANT_BITS}
                           for n in names}}


def _clips(qmodel):
    return {n: float(m.input_quant.scale) for n, m in quant_layers(qmodel)
            if m.input_quant.enabled}


def test_a_mixed_plan_searches_the_clips_of_its_3_bit_inputs_and_no_other(
        fashion_mnist, fashion_mnist_model):
    info, train, _, _ = fashion_mnist
    loader = BatchLoader(train.head(128), info, 128, channels_last=True)
    names = quantized_layer_names(fashion_mnist_model)
    plan = {n: (4, 3 if i % 2 else 8) for i, n in enumerate(names)}
    config = RunConfig.from_dict(PLAN_RUN)
    assert config.calibration == "auto"  # a plan run's default: each layer's by its bits
    with torch_threads(1):
        reference = _clips(calibrate(quantize_model(fashion_mnist_model, plan), loader, "mse",
                                     1, seed=config.seed))

        def prefers_moved_clips(qmodel):
            # A held-out scorer that prefers the searched clips, so they are kept.
            return float(_clips(qmodel) != reference)

        qmodel, chosen, _, layers = recipe.post_training_quantize(
            config, plan, fashion_mnist_model, loader, None, prefers_moved_clips,
            pipeline.Progress())
    clips = _clips(qmodel)
    at3 = [n for n in names if plan[n][1] == 3]
    assert chosen["clip_search_used"] and chosen["clip_search_layers"] == len(at3)
    moved = {n for n in names if clips[n] != reference[n]}
    assert moved and moved <= set(at3)  # the 8-bit inputs keep their mse clips
    assert layers == {n: "loss" if plan[n][1] == 3 else "mse" for n in names}
    # A plan with no input under 4 bits is not searched at all: mse everywhere.
    high = {n: (4, 6) for n in names}
    with torch_threads(1):
        qmodel, chosen, _, layers = recipe.post_training_quantize(
            config, high, fashion_mnist_model, loader, None, prefers_moved_clips,
            pipeline.Progress())
    assert "clip_search_used" not in chosen and set(layers.values()) == {"mse"}


def test_the_best_uniform_rival_fits_the_budget_as_bitops_and_the_file_count_it(
        fashion_mnist_model):
    model = fashion_mnist_model
    table = halving_table(model)  # every bit halves the loss: the balanced bits that fit win
    for budget_text, expected in (("w4a4", (4, 4)), ("w3a3", (3, 3)), ("w8a8", (8, 8))):
        budget = planner.parse_budget(budget_text, model, SIZE)
        w, a = planner.best_uniform(model, SIZE, table, budget)
        assert (w, a) == expected
        assert bitops_report(model, SIZE, uniform_plan(model, w, a))[1]["bitops"] <= budget
    # Weights that cost more than activations: at the W4A4 budget the rival moves bits from
    # activations to weights (W5A3 or W6A2 BitOps <= W4A4's), and still fits.
    heavy = halving_table(model, weight=10.0)
    budget = planner.parse_budget("w4a4", model, SIZE)
    w, a = planner.best_uniform(model, SIZE, heavy, budget)
    assert w > 4 and a < 4
    assert bitops_report(model, SIZE, uniform_plan(model, w, a))[1]["bitops"] <= budget
    # A size budget: the predicted file of the rival's weights fits, one more bit would not.
    from mobilenet_compression.quant.precision import weight_layers

    params = [m.weight.numel() for n, m in weight_layers(model)
              if n in set(quantized_layer_names(model))]
    fixed = 50_000
    at = {b: fixed + sum(-(-p * b // 8) for p in params) for b in QUANT_BITS}
    limit = at[5] + planner.SIZE_MARGIN + 1
    w, a = planner.best_uniform(model, SIZE, table, size=(fixed, limit))
    assert (w, a) == (5, 8) and at[w] <= limit - planner.SIZE_MARGIN < at[w + 1]


def test_a_plan_run_keeps_the_uniform_rival_when_it_scores_higher_and_says_so(
        fashion_mnist, fashion_mnist_model):
    info, train, _, _ = fashion_mnist
    model = fashion_mnist_model
    # Each case quantizes the plan as a run does, its 3-bit inputs' clip search included
    # (whose guard's score is the plan's), only to set up the choice tested here: on 64
    # calibration images rather than 128, for half the search's work.
    loader = BatchLoader(train.head(64), info, 64, channels_last=True)
    names = quantized_layer_names(model)
    budget = planner.parse_budget("w4a4", model, SIZE)
    table = halving_table(model)
    # A plan within the budget that is not uniform: half the layers W3A4, half W4A3.
    plan = {n: (3, 4) if i % 2 else (4, 3) for i, n in enumerate(names)}
    assert bitops_report(model, SIZE, plan)[1]["bitops"] <= budget
    config = RunConfig.from_dict(PLAN_RUN)
    planning = {"budget": budget, "size": None, "table": table}

    def prefers_uniform(qmodel):  # a held-out scorer under which uniform plans score higher
        return 90.0 if len(set(precision_plan(qmodel).values())) == 1 else 80.0

    def prefers_mixed(qmodel):
        return 100.0 - prefers_uniform(qmodel)

    results = {}
    with torch_threads(1):
        for name, score in (("uniform", prefers_uniform), ("mixed", prefers_mixed)):
            planned = recipe.post_training_quantize(config, plan, model, loader, None, score,
                                                 pipeline.Progress())
            results[name] = keep_plan_or_uniform(config, planned, planning, model, info,
                                                 model, loader, None, score,
                                                 pipeline.Progress())
    qmodel, chosen, score, _ = results["uniform"]
    assert chosen["plan_kept"] == "uniform" and chosen["uniform_rival"] == "w4a4"
    assert (chosen["plan_val_acc"], chosen["uniform_val_acc"], score) == (80.0, 90.0, 90.0)
    assert set(precision_plan(qmodel).values()) == {(4, 4)}
    assert "uniform W4A4 kept over the plan" in pipeline.choice_words(config, chosen)
    qmodel, chosen, score, _ = results["mixed"]
    assert chosen["plan_kept"] == "plan" and score == 20.0
    assert precision_plan(qmodel) == plan
    # Both keep their budget as bitops.py counts it.
    for qmodel, *_ in results.values():
        assert bitops_report(model, SIZE, precision_plan(qmodel))[1]["bitops"] <= budget
    assert all(q.enabled for q in act_quantizers(results["uniform"][0]))
    assert torch.isfinite(results["uniform"][0](next(iter(loader))[0])).all()
