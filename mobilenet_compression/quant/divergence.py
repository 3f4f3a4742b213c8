"""How far a quantized network's outputs are from the FP32 network's, the measure shared by
the sensitivity table (sensitivity.py) and the activation clip search (quant/clip_search.py), and
the best clip of one activation quantizer by that measure."""

import torch

# Candidate clips: the current one times these factors (half-octave steps, 0.5x to 2x), then
# the best of them times FINE (quarter-octave neighbours).
FACTORS = tuple(2.0 ** (k / 2) for k in range(-2, 3))
FINE = (2.0 ** -0.25, 2.0 ** 0.25)


def kl(ref_logp, logits):
    """Mean KL(p_ref || p) over a batch, from the reference's log-probabilities and logits."""
    logp = torch.log_softmax(logits.float(), 1)
    return float((ref_logp.exp() * (ref_logp - logp)).sum(1).mean())


def head(model, h):
    """The rest of torchvision's MobileNetV2.forward after `features`."""
    h = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, (1, 1)), 1)
    return model.classifier(h)


def feature_block(name):
    """The index k of `features.k` a layer lies in, or None outside `features`."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "features" and len(parts) > 1 else None


def best_clip(quantizer, score, factors=FACTORS, fine=FINE):
    """Move an activation quantizer's clip to the candidate with the lowest `score()`: the
    current clip times each of `factors`, then the best of those times each of `fine`, never
    above the observed absmax. Returns (old clip, new clip, score at old, score at new)."""
    q = quantizer
    old = float(q.scale) * q.qmax
    tried = {old: score()}

    def trial(clip):
        clip = min(clip, q.absmax)
        if clip not in tried:
            q.set_qparams(clip=clip, signed=q.signed)
            tried[clip] = score()
    for f in factors:  # coarse, then the two neighbours of the best halfway between
        trial(old * f)
    best = min(tried, key=tried.get)
    for f in fine:
        trial(best * f)
    best = min(tried, key=tried.get)
    q.set_qparams(clip=best, signed=q.signed)
    return old, best, tried[old], tried[best]
