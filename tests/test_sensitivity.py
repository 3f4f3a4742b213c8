"""Per-layer sensitivity on the small model trained on the real Fashion-MNIST (conftest)."""

import copy
import shutil
import subprocess
import sys

import pytest
import torch

from mobilenet_compression.mixed import sensitivity as sens
from mobilenet_compression.checkpoint import atomic_save, model_from_checkpoint
from mobilenet_compression.data import BatchLoader
from mobilenet_compression.errors import UserError
from mobilenet_compression.model import build_model
from tests.conftest import SMALL_MODEL_RECIPE, torch_threads
from tests.test_equalize import with_narrow_channels
from tests.test_qat import ROOT, small_checkpoint  # noqa: F401  (a fixture)


def _loader(fashion_mnist):
    """The first 128 training images in 2 batches of 64: `nearest_table`'s, and those of the
    tables the tests compare with it."""
    info, train, _, _ = fashion_mnist
    return BatchLoader(train.head(128), info, 64, channels_last=True)


@pytest.fixture(scope="module")
def nearest_table(fashion_mnist, _fashion_mnist_state):
    """`measure` of the conftest model on `_loader`'s images at 2, 3, 4 and 8 bits, with the
    defaults (calibration auto, nearest rounding): measured once for the three tests that
    priced those bits with those settings, each on its own table (bits (2, 8), (3, 4),
    (3, 8)). Each bit width is measured on its own, so its values are the same, bit for
    bit, whichever other widths are measured with it (checked for each of those tuples when
    this fixture was written); a test reads its own widths through `_at`, a copy."""
    info = fashion_mnist[0]
    model = build_model("cifar", info.num_classes, SMALL_MODEL_RECIPE["width_multiplier"],
                        info.in_channels)
    model.load_state_dict(copy.deepcopy(_fashion_mnist_state))
    with torch_threads(1):
        return sens.measure(model.eval(), _loader(fashion_mnist), 2, bits=(2, 3, 4, 8),
                            rounding="nearest")


def _at(table, bits):
    """A copy of `table` with only the bit widths `bits`: the table `measure(..., bits=bits)`
    gives."""
    keep = [str(b) for b in bits]
    return {"layers": list(table["layers"]),
            **{kind: {n: {b: table[kind][n][b] for b in keep} for n in table["layers"]}
               for kind in ("weight", "activation")}}


def test_fewer_bits_hurt_more_and_kl_is_never_negative(nearest_table):
    table = _at(nearest_table, (2, 8))
    layers = table["layers"]
    assert len(layers) > 30 and "features.0.0" not in layers and "classifier.1" not in layers
    for kind in ("weight", "activation"):
        values = [v for n in layers for v in table[kind][n].values()]
        assert min(values) >= -1e-6  # a KL divergence (float rounding aside)
        worse = sum(table[kind][n]["2"] > table[kind][n]["8"] for n in layers)
        assert worse >= 0.9 * len(layers), (kind, worse, len(layers))


def test_starting_at_the_quantized_layers_block_changes_no_value(
        fashion_mnist, fashion_mnist_model, monkeypatch):
    # The blocks before the one quantized layer's block run once, in FP32 (sens._Suffix);
    # every value must be what the whole network's forward gives, bit for bit, including
    # the layers that quantize their block's input in place (the cached input is copied).
    # On 64 images (2 batches of 32, one forward as on 128): whole-network passes cost
    # three times the shortcut's, and what is checked is equality, on any images.
    info, train, _, _ = fashion_mnist
    loader = BatchLoader(train.head(64), info, 32, channels_last=True)
    with torch_threads(1):
        suffix = sens.measure(fashion_mnist_model, loader, 2, bits=(3,))
        monkeypatch.setattr(sens._Suffix, "__call__",
                            lambda self, model, name: sens._forward(model, self.images))
        whole = sens.measure(fashion_mnist_model, loader, 2, bits=(3,))
    assert suffix == whole
    assert all(v > 0 for n in whole["layers"] for v in whole["activation"][n].values())


def test_3_bit_inputs_are_priced_at_the_clip_a_run_searches_and_4_bit_ones_at_mse(
        fashion_mnist, fashion_mnist_model, nearest_table):
    # --calibration auto (the runs' default) searches the clips of 3- and 2-bit inputs: the
    # table prices those inputs at the best of the search's candidates (the mse clip among
    # them, so never worse), and the 4-bit ones at their mse clip, as the runs get them.
    loader = _loader(fashion_mnist)
    auto = _at(nearest_table, (3, 4))
    with torch_threads(1):
        mse = sens.measure(fashion_mnist_model, loader, 2, bits=(3, 4), calibration="mse",
                           rounding="nearest")
    layers = auto["layers"]
    assert auto["weight"] == mse["weight"]  # the weights' prices do not depend on it
    assert all(auto["activation"][n]["4"] == mse["activation"][n]["4"] for n in layers)
    assert all(auto["activation"][n]["3"] <= mse["activation"][n]["3"] for n in layers)
    lower = sum(auto["activation"][n]["3"] < mse["activation"][n]["3"] for n in layers)
    assert lower >= len(layers) // 4, (lower, len(layers))  # the search moves many clips


def test_gptq_rounding_prices_the_weights_as_gptq_runs_round_them(
        fashion_mnist, fashion_mnist_model, nearest_table):
    # Runs round their weights by GPTQ by default, which makes low weight bits far cheaper
    # than nearest rounding; the table the plan is chosen from must see that. Each layer's
    # weights are GPTQ-rounded on its own FP32 inputs: lower KL than nearest rounding for
    # nearly every layer at 3 bits; 8-bit weights (which GPTQ leaves alone) and the
    # activation cases unchanged.
    loader = _loader(fashion_mnist)
    nearest = _at(nearest_table, (3, 8))
    with torch_threads(1):
        gptq = sens.measure(fashion_mnist_model, loader, 2, bits=(3, 8), rounding="gptq")
    layers = gptq["layers"]
    assert gptq["activation"] == nearest["activation"]
    assert all(gptq["weight"][n]["8"] == nearest["weight"][n]["8"] for n in layers)
    lower = sum(gptq["weight"][n]["3"] < nearest["weight"][n]["3"] for n in layers)
    assert lower >= 0.8 * len(layers), (lower, len(layers))
    total = {k: sum(t["weight"][n]["3"] for n in layers) for k, t in
             (("gptq", gptq), ("nearest", nearest))}
    assert total["gptq"] < 0.6 * total["nearest"], total
    with pytest.raises(UserError, match="rounding"):
        sens.measure(fashion_mnist_model, loader, 1, bits=(8,), rounding="stochastic")


def test_sensitivity_refuses_validation_and_test_images(fashion_mnist, fashion_mnist_model):
    info, _, val, test = fashion_mnist
    for split in (val, test):
        with pytest.raises(UserError, match="training images"):
            sens.measure(fashion_mnist_model, BatchLoader(split.head(64), info, 64), 1,
                         bits=(8,))


def test_cache_is_reused_and_a_different_checkpoint_is_measured_again(
        tmp_path, small_checkpoint):  # noqa: F811
    kw = dict(batches=1, batch_size=32, bits=(2, 8), cache_dir=str(tmp_path / "cache"),
              verbose=False)
    with torch_threads(1):
        first, cached1 = sens.sensitivity(str(small_checkpoint), **kw)
        second, cached2 = sens.sensitivity(str(small_checkpoint), **kw)
    assert (cached1, cached2) == (False, True) and first == second
    # Another checkpoint (one weight changed) has another digest: measured, not read.
    other = tmp_path / "other.pt"
    ckpt = torch.load(small_checkpoint, weights_only=True)
    ckpt["model"]["features.1.conv.0.0.weight"] = ckpt["model"][
        "features.1.conv.0.0.weight"] * 2
    atomic_save(ckpt, other)
    with torch_threads(1):
        third, cached3 = sens.sensitivity(str(other), **kw)
    assert cached3 is False and third["checkpoint_sha256"] != first["checkpoint_sha256"]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2
    shutil.rmtree(tmp_path / "cache")


def test_cli_bad_input_is_one_error_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mobilenet_compression.mixed.sensitivity",
                        "--checkpoint", str(tmp_path / "missing.pt")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "does not exist" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_an_equalized_table_prices_the_equalized_network_in_its_own_cache_entry(
        tmp_path, small_checkpoint):  # noqa: F811
    # Runs with --equalize true quantize the equalized network (quant/equalize.py): its depthwise
    # convs' inputs lose far less at low bits. (Its weight cases differ a little too: with a
    # layer's weights quantized, a later channel may pass its calibration max, where the
    # equalized network's clamp cuts it, as the runs' quantizers do.)
    # The checkpoint's depthwise inputs get channels of very different ranges by construction
    # (test_equalize.with_narrow_channels), the case equalization is for.
    ckpt = torch.load(small_checkpoint, weights_only=True)
    ckpt["model"] = with_narrow_channels(model_from_checkpoint(ckpt)).state_dict()
    path = tmp_path / "narrow.pt"
    atomic_save(ckpt, path)
    kw = dict(batches=1, batch_size=64, bits=(3,), cache_dir=str(tmp_path / "cache"),
              verbose=False, rounding="nearest")
    with torch_threads(1):
        plain, _ = sens.sensitivity(str(path), equalize=False, **kw)
        equalized, cached = sens.sensitivity(str(path), equalize=True, **kw)
    assert cached is False and equalized["equalize"] and not plain["equalize"]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2
    model = ckpt["model"]
    depthwise = [n[:-len(".weight")] for n, t in model.items()
                 if n.endswith(".weight") and t.dim() == 4 and t.shape[1] == 1
                 and n != "features.0.0.weight"]  # the stem: one input channel, FP32
    assert len(depthwise) == 17
    kl = {k: sum(t["activation"][n]["3"] for n in depthwise[1:])  # the first: residual, kept
          for k, t in (("plain", plain), ("equalized", equalized))}
    assert kl["equalized"] < 0.8 * kl["plain"], kl
