"""Quantization-aware training: fine-tune a prepared, calibrated model with learned step sizes.

LSQ (Esser et al. 2020, "Learned Step Size Quantization"): every weight and activation scale
is a trainable parameter, initialised from calibration, and trained with the weights through
straight-through rounding, with LSQ's gradient scale (quantization._LearnableScale). The
forward uses torch's learnable fake-quantize ops.

What QAT users expect, and what this does:
- training images only: the train split that train.py trained on, with the validation split
  held out exactly as train.py holds it (data.load_dataset); the same augmentation;
- BatchNorm statistics update during a warm-up (the first `qat_freeze_bn` fraction of the
  steps) and are frozen after it, so the last steps train against the statistics inference
  will use;
- SGD with momentum, cosine learning rate from `qat_lr` to 0, weight decay on the weights
  (the checkpoint's own) and none on the scales;
- distillation from the FP32 model (`distill`, on by default): the loss is the KL divergence
  from the FP32 model's outputs instead of the label cross-entropy. On labels, LSQ's
  8-bit step sizes drift (their updates are large next to the steps themselves): W8A8 QAT
  lost 3.7 points on labels where distillation lost none (README);
- the biases bias correction added (to convs that had none, right before a BatchNorm) are
  held fixed. A bias before a BatchNorm with frozen statistics moves the output by gamma /
  sigma times its change, and its gradient is scaled the same way, so SGD moved them far
  more than anything else: trained, they took W8A8 QAT on the 93.65% checkpoint 3 points
  under the PTQ model it started from (README, "QAT and bias correction"). BatchNorm in
  training mode (the warm-up) subtracts them with the batch mean and its running mean
  takes them in, so held fixed they still correct what they were computed for;
- the model handed back is the best one seen on the validation images train.py held out,
  the PTQ start included (`qat_checks` scores, evenly spaced, the last one at the end; a tie
  keeps the earlier model). Early stopping on held-out data, as train.py keeps its best
  epoch: at width 1.0 the default rate ended 1.2 points under its PTQ start, and the
  mixed-precision plan 0.36 under it at a lower one (README), which a user should not be
  handed as "QAT". Never chosen on test images;
- deterministic with a seed on one machine (the loader's order and crops come from it).
"""

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .prepare import quant_layers

LOG_EVERY = 20  # steps between training-curve points in W&B


def _quantizers(qmodel):
    for _, layer in quant_layers(qmodel):
        for q in (layer.weight_quant, layer.input_quant):
            if q.enabled:
                yield q


def _set_bn_training(model, training):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(training)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_steps(steps, checks):
    """The steps after which QAT scores the model: `checks` of them, evenly spaced, the last
    at `steps` (fewer when there are fewer steps)."""
    return sorted({max(1, round(steps * k / checks)) for k in range(1, checks + 1)})


def _optimizer(qmodel, quantizers, config, weight_decay, steps):
    """SGD (Nesterov) over the weights (weight decay) and the learned scales (none), cosine
    to 0 over `steps`; the biases bias correction added stay fixed. Returns (optimizer,
    schedule, the fixed biases)."""
    for q in quantizers:
        q.learn_scale(True)
    scales = [q.scale for q in quantizers]
    fixed = [layer.bias for _, layer in quant_layers(qmodel)
             if getattr(layer, "bias_added", False)]
    for b in fixed:
        b.requires_grad_(False)
    weights = [p for n, p in qmodel.named_parameters()
               if not n.endswith(".scale") and p.requires_grad]
    optimizer = torch.optim.SGD([
        {"params": weights, "weight_decay": weight_decay},
        {"params": scales, "weight_decay": 0.0},
    ], lr=config.qat_lr, momentum=0.9, nesterov=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    return optimizer, schedule, fixed


def _loss(logits, x, y, teacher, distill):
    """KL to the teacher's outputs with distillation, else cross-entropy to the labels."""
    if teacher is not None and distill:
        with torch.no_grad():
            target = F.softmax(teacher(x), dim=1)
        return F.kl_div(F.log_softmax(logits, 1), target, reduction="batchmean")
    return F.cross_entropy(logits, y)


class _Checks:
    """The validation checks of a QAT run: the scores at `steps`, the best model seen (the
    start included; a tie keeps the earlier) and the seconds they took."""

    def __init__(self, qmodel, score, steps, score_start):
        self.score, self.steps, self.seconds = score, set(steps), 0.0
        if not self.steps:
            return
        t = time.perf_counter()
        self.start = score_start if score_start is not None else score(qmodel.eval())
        self.best = {"acc": self.start, "step": 0, "state": _snapshot(qmodel)}
        self.seconds = time.perf_counter() - t

    def at(self, step, qmodel, frozen, log):
        """Score the model after `step` if it is a check step (back in training mode after)."""
        if step not in self.steps:
            return
        t = time.perf_counter()
        acc = self.score(qmodel.eval())
        qmodel.train()
        if frozen:
            _set_bn_training(qmodel, False)
        if acc > self.best["acc"]:
            self.best = {"acc": acc, "step": step, "state": _snapshot(qmodel)}
        self.last = acc
        self.seconds += time.perf_counter() - t
        if log is not None:
            log({"qat/val_acc": acc}, step)

    def keep_best(self, qmodel, steps):
        """Load the best model seen into `qmodel`; returns the checks' metrics."""
        best = self.best
        if best["step"] != steps:
            qmodel.load_state_dict(best["state"])
        print(f"QAT: kept the model after step {best['step']} of {steps} "
              f"({'the PTQ start' if best['step'] == 0 else 'trained'}): "
              f"{best['acc']:.2f}% on the validation images, against {self.start:.2f}% at "
              f"the start and {self.last:.2f}% at the end", flush=True)
        return {"qat_val_acc_start": self.start, "qat_val_acc_last": self.last,
                "qat_val_acc_kept": best["acc"], "qat_kept_step": best["step"],
                "qat_check_seconds": self.seconds}


class _Curve:
    """The training curve: loss and accuracy averaged over every LOG_EVERY steps."""

    def __init__(self, bar, log, batches_per_epoch):
        self.bar, self.log, self.batches = bar, log, batches_per_epoch
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0

    def add(self, step, steps, loss, logits, y, lr):
        self.loss_sum += float(loss.detach()) * len(y)
        self.correct += int((logits.argmax(1) == y).sum())
        self.seen += len(y)
        if not math.isfinite(self.loss_sum):
            raise FloatingPointError(f"the QAT loss became NaN at step {step}; lower --qat_lr")
        self.bar.update(1)
        if step % LOG_EVERY == 0 or step == steps:
            row = {"qat/loss": self.loss_sum / self.seen,
                   "qat/train_acc": 100.0 * self.correct / self.seen,
                   "qat/lr": lr, "qat/epoch": step / self.batches}
            self.bar.set_postfix(loss=f"{row['qat/loss']:.3f}")
            if self.log is not None:
                self.log(row, step)
            self.loss_sum, self.correct, self.seen = 0.0, 0, 0


def train_qat(qmodel, train_split, info, config, weight_decay=4e-5, teacher=None, log=None,
              score=None, score_start=None):
    """Fine-tune `qmodel` in place for `config.qat_epochs` epochs (fractions allowed) of
    `train_split`. `teacher`: the FP32 model, used when config.distill. `log(dict, step)`
    receives the training curve. A stop signal (signals.StopFlag) interrupts it like any
    other stage.

    `score(model)`: accuracy on held-out validation images. With it and `config.qat_checks`
    > 0, the model is scored `qat_checks` times (`check_steps`) and at the end `qmodel` holds
    the best one seen, the start (scored `score_start`, or here when None) included; a tie
    keeps the earlier. Returns {"qat_seconds", "qat_steps", "qat_images"}, and with checks
    "qat_val_acc_start", "qat_val_acc_last", "qat_val_acc_kept", "qat_kept_step" (0: the
    start) and "qat_check_seconds" (part of "qat_seconds").
    """
    if train_split.name != "train":
        raise ValueError(f"QAT must train on the train split, got {train_split.name!r}")
    loader = train_split.loader(info, config.qat_batch_size, augment=True, seed=config.seed,
                                drop_last=len(train_split) > config.qat_batch_size,
                                channels_last=True)
    steps = max(1, math.ceil(config.qat_epochs * len(loader)))
    freeze_at = int(config.qat_freeze_bn * steps)
    quantizers = list(_quantizers(qmodel))
    optimizer, schedule, fixed = _optimizer(qmodel, quantizers, config, weight_decay, steps)
    if teacher is not None:
        teacher.eval()
    t_start = time.perf_counter()  # the start's score is part of QAT's time
    checks = _Checks(qmodel, score, check_steps(steps, config.qat_checks)
                     if score is not None else [], score_start)
    print(f"QAT: {steps} steps of {config.qat_batch_size} training images "
          f"({config.qat_epochs:g} epochs), lr {config.qat_lr:g}, BatchNorm statistics frozen "
          f"after step {freeze_at}", flush=True)
    torch.manual_seed(config.seed)
    qmodel.train()
    step, epoch, images = 0, 0, 0
    bar = tqdm(total=steps, desc="QAT", leave=False, disable=None, dynamic_ncols=True)
    curve = _Curve(bar, log, len(loader))
    try:
        while step < steps:
            loader.set_epoch(epoch)
            for x, y in loader:
                if step == freeze_at:
                    _set_bn_training(qmodel, False)
                logits = qmodel(x)
                loss = _loss(logits, x, y, teacher, config.distill)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                for q in quantizers:
                    q.clamp_scale()
                step += 1
                images += len(y)
                curve.add(step, steps, loss, logits, y, optimizer.param_groups[0]["lr"])
                checks.at(step, qmodel, step >= freeze_at, log)
                if step == steps:
                    break
            epoch += 1
    finally:
        bar.close()
        for b in fixed:
            b.requires_grad_(True)
    qmodel.eval()
    out = {"qat_steps": steps, "qat_images": images}
    if checks.steps:
        out.update(checks.keep_best(qmodel, steps))
    return {"qat_seconds": time.perf_counter() - t_start, **out}
