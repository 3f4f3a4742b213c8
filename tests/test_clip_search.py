"""Loss-aware activation clips (`--calibration loss`, quant/clip_search.py) on the small model
trained on the real Fashion-MNIST."""

import copy

import pytest
import torch

from mobilenet_compression.data import BatchLoader
from mobilenet_compression.errors import UserError
from mobilenet_compression.quant import clip_search, divergence
from mobilenet_compression.quant.calibrate import calibrate
from mobilenet_compression.quant.prepare import (
    act_quantizers,
    quant_layers,
    quantize_model,
)

from .conftest import torch_threads
from .test_qat import QUICK, small_checkpoint, sweep_py  # noqa: F401  (a fixture)


def _loader(fashion_mnist, n=256, batch=128):
    info, train, _, _ = fashion_mnist
    return BatchLoader(train.head(n), info, batch)


def _kl_on(qmodel, fp32, x):
    with torch.inference_mode():
        ref = torch.log_softmax(fp32(x), 1)
        return divergence.kl(ref, qmodel(x))


def _clips(qmodel):
    return [float(q.scale) * q.qmax for q in act_quantizers(qmodel)]


def test_the_search_never_moves_the_network_further_from_fp32(fashion_mnist,
                                                               fashion_mnist_model):
    """Each quantizer keeps its clip unless a candidate brings the outputs closer to FP32's
    on the search images, so the KL after the search is at most the `mse` one; at 3 bits it
    moves clips and the KL falls."""
    loader = _loader(fashion_mnist)
    x = next(iter(loader))[0]
    with torch_threads(1):
        q = calibrate(quantize_model(fashion_mnist_model, (8, 3)), loader, "mse", 2)
        before, clips = _kl_on(q, fashion_mnist_model, x), _clips(q)
        found = clip_search.search_clips(q, fashion_mnist_model, loader, num_batches=1)
        after = _kl_on(q, fashion_mnist_model, x)
    changes = found["changes"]
    assert found["kl_before"] == pytest.approx(before, rel=1e-4)
    assert found["kl_after"] == pytest.approx(after, rel=1e-4)
    assert [n for n, _, _ in changes] == [n for n, m in quant_layers(q)
                                          if m.input_quant.enabled]
    assert [old for _, old, _ in changes] == pytest.approx(clips)
    assert _clips(q) == pytest.approx([new for _, _, new in changes])
    assert any(new != pytest.approx(old) for _, old, new in changes)
    assert after < before
    # never beyond the range calibration saw
    assert all(c <= q_.absmax * (1 + 1e-6) for c, q_ in zip(_clips(q), act_quantizers(q)))


def test_starting_at_each_block_chooses_what_whole_network_passes_choose(
        fashion_mnist, fashion_mnist_model, monkeypatch):
    """The block-suffix shortcut (blocks before a quantizer's block run once per block) is an
    optimisation only: the same clips as running the whole network for every candidate."""
    loader = _loader(fashion_mnist, 64, 64)
    q = calibrate(quantize_model(fashion_mnist_model, (4, 3)), loader, "mse", 1)
    models = [q, copy.deepcopy(q)]
    search = dict(num_batches=1, factors=(2 ** -0.5, 1.0, 2 ** 0.5), fine=())
    with torch_threads(1):
        fast = clip_search.search_clips(models[0], fashion_mnist_model, loader,
                                        **search)["changes"]
        monkeypatch.setattr(clip_search, "_block_of", lambda name: None)
        whole = clip_search.search_clips(models[1], fashion_mnist_model, loader,
                                         **search)["changes"]
    assert any(new != pytest.approx(old) for _, old, new in fast)
    assert [new for _, _, new in fast] == pytest.approx([new for _, _, new in whole], rel=1e-6)
    assert _clips(models[0]) == pytest.approx(_clips(models[1]), rel=1e-6)


def test_the_searched_clips_are_kept_only_if_they_score_higher(fashion_mnist,
                                                                fashion_mnist_model):
    """The held-out guard: with a score that prefers the starting (`mse`) clips, the model
    goes back to exactly those scales; with one that prefers the searched clips, it keeps
    them; a tie keeps the start. The score here is real validation accuracy, recorded per
    clip state, then compared in whichever direction the case asks. The guard's choice is
    what is tested, not the search's (the first test's): the search and each case's search
    inside the guard are the coarse one of the block-suffix test, on 64 images (about a
    fifth of the full search's work), and must agree with each other."""
    info, _, val, _ = fashion_mnist
    loader = _loader(fashion_mnist)
    search_loader = _loader(fashion_mnist, 64, 64)
    search = dict(num_batches=1, factors=(2 ** -0.5, 1.0, 2 ** 0.5), fine=())
    val_loader = BatchLoader(val.head(500), info, 250)
    with torch_threads(1):
        base = calibrate(quantize_model(fashion_mnist_model, (8, 3)), loader, "mse", 2)
        start = [float(q.scale) for q in act_quantizers(base)]
        searched_model = copy.deepcopy(base)
        clip_search.search_clips(searched_model, fashion_mnist_model, search_loader, **search)
        searched = [float(q.scale) for q in act_quantizers(searched_model)]
        assert searched != start
        for prefer, keeps in (("start", start), ("searched", searched), ("tie", start)):
            q = copy.deepcopy(base)
            seen = []

            def score(model):
                from mobilenet_compression.evaluation import evaluate
                scales = [float(a.scale) for a in act_quantizers(model)]
                seen.append((scales, evaluate(model, val_loader, fold=True)))
                return {"start": float(scales == start), "searched": float(scales != start),
                        "tie": 0.5}[prefer]

            found = clip_search.search_clips_if_better(q, fashion_mnist_model, search_loader,
                                                       score, **search)
            assert [float(a.scale) for a in act_quantizers(q)] == keeps, prefer
            assert found["used"] == (prefer == "searched")
            # scored once with the searched clips, once with the start, in that order
            assert [s for s, _ in seen] == [searched, start]
            assert all(0.0 <= acc <= 100.0 for _, acc in seen)
    # real accuracies of the two states: the same model scores the same both times
    assert len({acc for s, acc in seen if s == start}) == 1


def test_loss_is_a_search_after_mse_on_training_images(fashion_mnist,
                                                        fashion_mnist_model):
    info, _, _, test = fashion_mnist
    q = quantize_model(fashion_mnist_model, (8, 4))
    with pytest.raises(ValueError, match="calibrate with 'mse', then move the clips"):
        calibrate(q, _loader(fashion_mnist), "loss", 1)
    calibrate(q, _loader(fashion_mnist), "mse", 1)
    with pytest.raises(UserError, match="training images"):
        clip_search.search_clips(q, fashion_mnist_model, BatchLoader(test.head(128), info, 128))


def test_loss_is_the_default_at_3_bit_activations_and_fewer():
    """The per-bit-width default (config.default_calibration); a given method is kept."""
    from mobilenet_compression.config import RunConfig

    assert {a: RunConfig.from_dict({"activation_bits": a}).calibration
            for a in (8, 6, 4, 3, 2, 32)} == {8: "mse", 6: "mse", 4: "mse", 3: "loss",
                                               2: "loss", 32: "mse"}
    assert RunConfig.from_dict({"activation_bits": 3, "calibration": "mse"}).calibration == "mse"
    assert RunConfig.from_dict({"activation_bits": 8, "calibration": "loss"}).calibration == \
        "loss"


def test_a_3_bit_run_searches_its_clips_by_default(tmp_path, small_checkpoint):  # noqa: F811
    """The real command line: a W8A3 run without --calibration searches (and says so), and
    runs.csv names the method it used."""
    import pandas as pd

    r = sweep_py(["--checkpoint", str(small_checkpoint), "--weight_bits", "8",
                  "--activation_bits", "3", "--results_dir", str(tmp_path / "res"),
                  "--wandb_mode", "disabled", *QUICK], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "activation clips moved; KL(FP32 || quantized) on its images" in r.stdout
    row = pd.read_csv(tmp_path / "res" / "runs" / "runs.csv").iloc[0]
    assert row["calibration"] == "loss" and row["status"] == "finished"
    # the held-out guard's choice and its two validation scores are in the row
    assert bool(row["clip_search_used"]) == (row["clip_search_val_acc_searched"] >
                                             row["clip_search_val_acc_mse"])
    kept = "searched" if row["clip_search_used"] else "mse"
    assert f"{kept} clips kept" in r.stdout
    # the bias correction's "without" is the model the guard kept, scored once
    assert row["bias_correction_val_acc_without"] == max(row["clip_search_val_acc_searched"],
                                                         row["clip_search_val_acc_mse"])
