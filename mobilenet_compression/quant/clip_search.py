"""Activation clips chosen by the network's output (`--calibration loss`).

`mse` calibration picks each input quantizer's clip from that input alone: the clip with
the least squared error on a sample of its values. At 3 bits that objective misleads: on the
93.65% width-0.35 checkpoint, W8A3 lost 74 points where W4A3 lost 19, and copying W4A3's
activation scales into the W8A3 model gave it back 46 of them (README); the two models'
`mse` clips differed by up to 75% in the last blocks. A layer's squared input error is not
what the network loses.

Here every clip starts from `mse` and is then moved, one quantizer at a time in network
order, to the candidate whose quantized network is closest to the FP32 one: the mean
KL(p_fp32 || p_quant) of the softmax outputs, the sensitivity table's measure, on the first
`num_batches` calibration batches (training images only; one batch of 128 in a run). The
candidates: the current clip times 2^(k/2), k = -2..2, then the best of those times
2^(+-1/4), never above the observed absmax. All other quantizers stay as they are, weights
quantized (run.py searches after GPTQ, once the weights are final), so each choice sees the
error of every earlier choice (coordinate descent, one pass). A quantizer in block k changes
nothing before block k, so the network's state at block k's input is computed once per
block and only blocks k.. run per candidate (torchvision's MobileNetV2 layout; any other
model runs whole).

The search reads 128 training images and can fit them at the test set's expense: on
`make demo`'s 90% checkpoint, where `mse`'s A3 clips were already sound, it cost up to 1.6
points. So a run keeps the searched clips only if they score higher than the `mse` clips on
held-out images (`search_clips_if_better`; run.py: train.py's validation split, as
`--bias_correction auto` does), and otherwise goes back to `mse`'s.
"""

import torch

from .calibrate import calibration_batch
from .divergence import FACTORS, FINE, best_clip, feature_block, head, kl
from .prepare import act_quantizers, quant_layers

SEARCH_BATCHES = 1  # calibration batches (of --calib_batch_size images) the KL is taken on


def _set_scales(quantizers, scales):
    for q, scale in zip(quantizers, scales):
        q.set_qparams(scale=scale, signed=q.signed)


_block_of = feature_block  # (a module attribute: a test runs the search without the shortcut)


@torch.no_grad()
def search_clips(qmodel, fp32_model, loader, num_batches=SEARCH_BATCHES, factors=FACTORS,
                 fine=FINE, progress=None, only=None):
    """Move every calibrated activation clip of `qmodel` (or those of the layers named in
    `only`) to the candidate with the smallest KL(fp32 || quantized) on the first
    `num_batches` batches of `loader` (a BatchLoader over the TRAIN split; anything else is a
    UserError). Call after `calibrate`. Returns
    {"changes": [(layer name, old clip, new clip)], "kl_before": ..., "kl_after": ...}."""
    x = calibration_batch(loader, num_batches, "the clip search")
    was_training = qmodel.training
    qmodel.eval()
    fp32_model.eval()
    try:
        with torch.inference_mode():
            ref = torch.log_softmax(fp32_model(x).float(), 1)
        enabled = set(map(id, act_quantizers(qmodel)))
        layers = [(n, m) for n, m in quant_layers(qmodel) if id(m.input_quant) in enabled
                  and (only is None or n in only)]
        blocked = hasattr(qmodel, "features") and hasattr(qmodel, "classifier") and \
            all(_block_of(n) is not None for n, _ in layers)
        changes, kl_before, kl_now = [], None, None
        h, at = x, 0  # the quantized network's input to block `at`
        for name, layer in layers:
            q = layer.input_quant
            k = _block_of(name) if blocked else None
            if k is not None:
                with torch.inference_mode():
                    for block in qmodel.features[at:k]:
                        h = block(h)
                at = max(at, k)

            def score():
                with torch.inference_mode():
                    if k is None:
                        return kl(ref, qmodel(x))
                    out = h.clone()  # a layer may quantize its exclusive input in place
                    for block in qmodel.features[k:]:
                        out = block(out)
                    return kl(ref, head(qmodel, out))

            old, best, kl_old, kl_best = best_clip(q, score, factors, fine)
            changes.append((name, old, best))
            kl_before = kl_old if kl_before is None else kl_before
            kl_now = kl_best
            if progress:
                progress()
        return {"changes": changes, "kl_before": kl_before, "kl_after": kl_now}
    finally:
        qmodel.train(was_training)


def search_clips_if_better(qmodel, fp32_model, loader, score, **search):
    """`search_clips`, then keep its clips only if `score(qmodel)` (accuracy on held-out
    images: never the calibration or test images) is higher with them than with the clips
    the search started from; a tie keeps the start. Returns search_clips' dict plus "used"
    (whether the searched clips were kept), "score_start" and "score_searched" (equal, and
    scored once, when the search moved nothing)."""
    quantizers = act_quantizers(qmodel)
    start = [float(q.scale) for q in quantizers]
    found = search_clips(qmodel, fp32_model, loader, **search)
    searched = [float(q.scale) for q in quantizers]
    score_searched = score(qmodel)
    score_start = score_searched
    if searched != start:
        _set_scales(quantizers, start)
        score_start = score(qmodel)
    used = score_searched > score_start
    if used:
        _set_scales(quantizers, searched)
    return {**found, "used": used, "score_start": score_start,
            "score_searched": score_searched}
