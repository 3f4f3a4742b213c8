"""The post-training recipe: the quantization steps of one run, in the order they run, with
the choices a run's config makes between them. What each step does is in its own file:

  prepare.quantize_model    swap the layers for quantized ones under the precision plan
  calibrate.calibrate       activation ranges from training images (mse, minmax, percentile)
  rounding.gptq             each weight's grid point chosen to cut its layer's output error
  clip_search               at low activation bits, clips moved to where the network's output
                            is closest to FP32's; kept only if it scores higher on validation
  bias_correction           each layer's output mean put back on FP32's (auto: kept only if
                            it scores higher on validation)

QAT (qat.train_qat) and convert.convert follow in run.py."""

from .bias_correction import bias_correct, bias_correct_if_better
from .calibrate import calibrate
from .choices import default_calibration
from .clip_search import search_clips_if_better
from .precision import is_fp32
from .prepare import precision_plan, quantize_model
from .rounding import gptq


def post_training_quantize(config, plan, source, calib_loader, means, val_score, progress,
                           val_images=None):
    """prepare -> calibrate [-> gptq] [-> clip search] [-> bias correction] for one precision
    plan. Returns (qmodel, the held-out choices made, the final validation score or None,
    {layer: the calibration it got})."""
    qmodel = quantize_model(source, plan,
                            weight_granularity=config.weight_granularity,
                            weight_method=config.weight_method)
    # --calibration loss (and auto, for the layers it gives loss): the `mse` clips, then
    # moved by the network's output (clip_search) once the weights are final, i.e. after
    # GPTQ: searched before it, with nearest-rounded weights, the clips fitted errors GPTQ
    # then removed (W3A4 1.8 points under mse, seed 42).
    base = "mse" if config.calibration in ("loss", "auto") else config.calibration
    on_val = f"on {val_images} validation images" if val_images else "on the validation images"
    calibrate(qmodel, calib_loader, num_batches=config.calib_batches, seed=config.seed,
              method=base)
    if config.weight_rounding == "gptq":
        progress.start("round")
        gptq(qmodel, calib_loader)
        progress.start("calibrate")  # bias correction is timed with calibration
    layers = precision_plan(qmodel)
    searched = {n for n, (_, ab) in layers.items() if not is_fp32(ab) and (
        config.calibration == "loss" or (config.calibration == "auto" and
                                         default_calibration(ab) == "loss"))}
    chosen, score_now = {}, None
    if searched:
        progress.start("clip_search")
        found = search_clips_if_better(qmodel, source, calib_loader, val_score, only=searched)
        progress.start("calibrate")
        moved = sum(new != old for _, old, new in found["changes"])
        chosen = {"clip_search_used": found["used"],
                  "clip_search_val_acc_mse": found["score_start"],
                  "clip_search_val_acc_searched": found["score_searched"],
                  "clip_search_layers": len(searched)}
        score_now = found["score_searched"] if found["used"] else found["score_start"]
        print(f"clip search: {moved} of {len(found['changes'])} activation clips moved; "
              f"KL(FP32 || quantized) on its images {found['kl_before']:.4f} -> "
              f"{found['kl_after']:.4f}; {'searched' if found['used'] else 'mse'} clips kept "
              f"({found['score_searched']:.2f}% searched, {found['score_start']:.2f}% mse, "
              f"{on_val})", flush=True)
    layer_calibration = {n: "loss" if n in searched and chosen["clip_search_used"] else base
                         for n, (_, ab) in layers.items() if not is_fp32(ab)}
    if config.bias_correction == "auto":
        qmodel, used, without, with_ = bias_correct_if_better(
            qmodel, source, calib_loader, val_score, num_batches=config.calib_batches,
            fp32_means=means, score_without=score_now)
        chosen.update({"bias_correction_used": used, "bias_correction_val_acc_without": without,
                       "bias_correction_val_acc_with": with_})
        score_now = with_ if used else without
        print(f"bias correction auto: {'on' if used else 'off'} ({with_:.2f}% with, "
              f"{without:.2f}% without, {on_val})", flush=True)
    elif config.bias_correction:
        bias_correct(qmodel, source, calib_loader, num_batches=config.calib_batches,
                     fp32_means=means)
        score_now = None  # the corrected model has not been scored
    return qmodel, chosen, score_now, layer_calibration
