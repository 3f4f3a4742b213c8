"""The exported safetensors file: bit-packed weights, exact round trip, readable with
safetensors alone, sizes counted independently, bad files one clear error."""

import json
import math
import os
import struct

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch

from mobilenet_compression.data import BatchLoader
from mobilenet_compression.errors import UserError
from mobilenet_compression.evaluation import eval_loader, evaluate, predict
from mobilenet_compression.deploy.export import (
    export_quantized,
    load_quantized,
    pack_bits,
    read_quantized,
    unpack_bits,
)
from mobilenet_compression.deploy.size import (
    activation_compression_ratio,
    activation_elements,
    compressed_mb,
    compression_metrics,
    compression_ratio,
    container_bytes,
    orig_mb,
    weight_compression_ratio,
)
from mobilenet_compression.quant.bias_correction import bias_correct
from mobilenet_compression.quant.bitops import bitops_report
from mobilenet_compression.quant.calibrate import calibrate
from mobilenet_compression.quant.precision import quantized_layer_names
from mobilenet_compression.quant.output_grids import attach_output_grids, output_grid_table
from mobilenet_compression.quant.prepare import (
    activations_fp32,
    precision_plan,
    quant_layers,
    quantize_model,
)

N_EVAL = 1000
METADATA = {"arch": "cifar", "dataset": "fashion-mnist", "num_classes": 10,
            "in_channels": 1, "input_size": 28, "width_multiplier": 0.25, "method": "ptq",
            "checkpoint_sha256": "ab" * 32}
# safetensors metadata is string -> string: numbers come back as their JSON text
METADATA_TEXT = {"arch": "cifar", "dataset": "fashion-mnist", "num_classes": "10",
                 "in_channels": "1", "input_size": "28", "width_multiplier": "0.25",
                 "method": "ptq", "checkpoint_sha256": "ab" * 32}


def quantized(model, fashion_mnist, plan, **kw):
    info, train, _, _ = fashion_mnist
    qmodel = quantize_model(model, plan, **kw)
    return calibrate(qmodel, BatchLoader(train, info, 256), num_batches=2)


def mixed_plan(model):
    """Every bit width once, some layers left FP32 (weights, activations or both)."""
    plan = {}
    for i, name in enumerate(quantized_layer_names(model)):
        plan[name] = [(2, 8), (3, 4), (4, 8), (5, 6), (6, 32), (7, 3), (8, 8), (32, 8),
                      (16, 2), (32, 32)][i % 10]
    return plan


# ---------------------------------------------------------------------------- bit packing

def test_pack_bits_is_a_little_endian_bit_stream():
    # codes 1, 2, 3, 0 at 2 bits, LSB first: 01 10 11 00 -> 0b00111001
    assert pack_bits(np.array([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    # 3-bit codes cross byte boundaries: 5 (101), 6 (011 LSB first), 7 -> bits 101 011 11|1
    assert pack_bits(np.array([5, 6, 7]), 3).tolist() == [0b11110101, 0b1]
    rng = np.random.default_rng(0)
    for bits in range(2, 9):
        for n in (1, 7, 8, 1001):
            codes = rng.integers(0, 2**bits, n)
            packed = pack_bits(codes, bits)
            assert packed.dtype == np.uint8 and len(packed) == math.ceil(n * bits / 8)
            assert np.array_equal(unpack_bits(packed, bits, n), codes)
    with pytest.raises(ValueError):
        pack_bits(np.array([4]), 2)


# ---------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("case", ["W4A8", "W2A4-per-tensor", "mixed", "W4A8-bias-corrected"])
def test_round_trip_gives_the_same_logits_and_accuracy(fashion_mnist_model, fashion_mnist,
                                                       tmp_path, case):
    info, _, _, test = fashion_mnist
    if case == "W4A8":
        qmodel = quantized(fashion_mnist_model, fashion_mnist, (4, 8), weight_method="mse")
    elif case == "W2A4-per-tensor":
        qmodel = quantized(fashion_mnist_model, fashion_mnist, (2, 4),
                           weight_granularity="per_tensor")
    elif case == "mixed":
        qmodel = quantized(fashion_mnist_model, fashion_mnist, mixed_plan(fashion_mnist_model))
    else:  # bias correction gives bias-free quantized layers a bias the file must carry
        qmodel = quantized(fashion_mnist_model, fashion_mnist, (4, 8))
        bias_correct(qmodel, fashion_mnist_model, BatchLoader(fashion_mnist[1], info, 256),
                     num_batches=2)
        assert any(layer.bias is not None for _, layer in quant_layers(qmodel))
    if case in ("W4A8", "mixed"):  # the 8-bit grids a run puts between integer kernels
        attach_output_grids(qmodel, BatchLoader(fashion_mnist[1], info, 256), 2)
    grids = output_grid_table(qmodel)
    assert bool(grids) == (case in ("W4A8", "mixed"))  # the mixed plan has A8 blocks
    path = tmp_path / "model.safetensors"
    size = export_quantized(qmodel, path, METADATA)
    assert size == os.path.getsize(path)
    loaded = load_quantized(path)
    assert output_grid_table(loaded) == grids
    metadata = read_quantized(path)[0]
    assert {k: metadata[k] for k in METADATA} == METADATA_TEXT

    loader = eval_loader(test.head(N_EVAL), info)
    logits, labels = predict(qmodel, loader)
    logits2, _ = predict(loaded, loader)
    assert torch.equal(logits, logits2)  # bit-exact: the file holds q and the exact scales
    assert evaluate(loaded, loader) == evaluate(qmodel, loader)
    for (name, a), (name2, b) in zip(quant_layers(qmodel), quant_layers(loaded)):
        assert name == name2
        assert (a.weight_bits, a.activation_bits) == (b.weight_bits, b.activation_bits)
        assert a.input_quant.signed == b.input_quant.signed
        assert torch.equal(a.input_quant.scale, b.input_quant.scale)
        with torch.no_grad():
            assert torch.equal(a.quantized_weight(), b.quantized_weight())


# ---------------------------------------------------------------------------- size

def independent_payload_bytes(fp32_model, plan):
    """What the file must hold, counted from the FP32 model and the plan alone: b bits per
    quantized weight (packed per layer), 4 bytes per per-channel weight scale and per
    activation scale, 4 bytes per value of every other tensor inference needs (BN gamma
    included), nothing for BN's num_batches_tracked."""
    total = 0
    quantized_weights = set()
    for name in quantized_layer_names(fp32_model):
        wb, ab = plan[name]
        layer = fp32_model.get_submodule(name)
        if wb <= 8:
            total += math.ceil(layer.weight.numel() * wb / 8) + 4 * layer.weight.shape[0]
            quantized_weights.add(f"{name}.weight")
        if ab <= 8:
            total += 4
    for key, t in fp32_model.state_dict().items():
        if key not in quantized_weights and not key.endswith("num_batches_tracked"):
            total += 4 * t.numel()
    return total


def read_header(path):
    """The safetensors header, read by hand: 8-byte little-endian length, then JSON."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        return header_len, json.loads(f.read(header_len))


def test_file_size_equals_an_independent_count(fashion_mnist_model, fashion_mnist, tmp_path):
    plan = mixed_plan(fashion_mnist_model)
    qmodel = quantized(fashion_mnist_model, fashion_mnist, plan)
    path = tmp_path / "model.safetensors"
    size = export_quantized(qmodel, path, METADATA)
    header_len, header = read_header(path)
    assert container_bytes(path) == (8 + header_len, size)
    assert size == 8 + header_len + independent_payload_bytes(fashion_mnist_model, plan)
    # five grouped tensors, not one per layer: the header stays small
    meta = header.pop("__metadata__")
    assert sorted(header) == ["activation_scales", "batchnorm", "fp32", "weight_scales",
                              "weights_packed"]
    assert header_len < 0.05 * size
    # BatchNorm's gamma (and beta, mean, var) is stored as FP32: 4 rows of 4 bytes per channel
    channels = sum(m.num_features for m in fashion_mnist_model.modules()
                   if isinstance(m, torch.nn.BatchNorm2d))
    bn = header["batchnorm"]
    assert bn["dtype"] == "F32" and bn["shape"] == [4, channels]
    assert bn["data_offsets"][1] - bn["data_offsets"][0] == 16 * channels
    # a 3-bit layer: 3 bits per weight, packed, up to where the next packed layer starts
    layers = [dict(zip(meta["layer_columns"].split(","), row))
              for row in json.loads(meta["layers"])]
    packed = [e for e in layers if e["packed_offset"] is not None]
    i = next(i for i, e in enumerate(packed) if e["weight_bits"] == 3)
    numel = fashion_mnist_model.get_submodule(packed[i]["name"]).weight.numel()
    assert packed[i + 1]["packed_offset"] - packed[i]["packed_offset"] == math.ceil(numel * 3 / 8)
    assert header["weights_packed"]["dtype"] == "U8"
    # layers left at 16/32 bits keep their FP32 weight and have no activation scale
    name = next(n for n, (wb, ab) in plan.items() if wb == ab == 32)
    entry = next(e for e in layers if e["name"] == name)
    assert entry["packed_offset"] is None and entry["activation_scale_index"] is None
    assert f"{name}.weight" in [row[0] for row in json.loads(meta["fp32"])]
    assert header["activation_scales"]["shape"] == [sum(ab <= 8 for _, ab in plan.values())]


def test_the_file_reads_with_safetensors_alone(fashion_mnist_model, fashion_mnist, tmp_path):
    """What export.py's docstring tells a user to do by hand, with numpy and safetensors."""
    qmodel = quantized(fashion_mnist_model, fashion_mnist, mixed_plan(fashion_mnist_model))
    path = tmp_path / "model.safetensors"
    export_quantized(qmodel, path, METADATA)
    with safetensors.safe_open(path, "np") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    columns = meta["layer_columns"].split(",")
    for row in json.loads(meta["layers"]):
        e = dict(zip(columns, row))
        layer = qmodel.get_submodule(e["name"])
        assert (e["weight_bits"], e["activation_bits"]) == (layer.weight_bits,
                                                          layer.activation_bits)
        if e["packed_offset"] is not None:
            b, shape, o = e["weight_bits"], e["weight_shape"], e["packed_offset"]
            n, c = math.prod(shape), shape[0]
            bits = np.unpackbits(t["weights_packed"][o:o + math.ceil(n * b / 8)],
                                 bitorder="little")
            codes = bits[:n * b].reshape(n, b) @ (1 << np.arange(b))
            q = (codes - 2 ** (b - 1)).reshape(shape)
            s = e["weight_scale_offset"]
            w = q * t["weight_scales"][s:s + c].reshape(c, *[1] * (len(shape) - 1))
            with torch.no_grad():
                assert np.array_equal(w.astype(np.float32), layer.quantized_weight().numpy())
        if e["activation_scale_index"] is not None:
            assert t["activation_scales"][e["activation_scale_index"]] == \
                float(layer.input_quant.scale)
            assert e["activation_signed"] == layer.input_quant.signed
    for name, start, channels in json.loads(meta["batchnorm"]):
        bn = qmodel.get_submodule(name)
        assert np.array_equal(t["batchnorm"][:, start:start + channels],
                              torch.stack([bn.weight, bn.bias, bn.running_mean,
                                           bn.running_var]).detach().numpy())
    fp32 = {name: t["fp32"][o:o + math.prod(shape)].reshape(shape)
            for name, o, shape in json.loads(meta["fp32"])}
    assert np.array_equal(fp32["classifier.1.weight"],
                          qmodel.classifier[1].weight.detach().numpy())
    assert meta["weight_granularity"] == "per_channel" and meta["method"] == "ptq"


def test_size_metrics(fashion_mnist_model, fashion_mnist, tmp_path):
    fp32_state = fashion_mnist_model.state_dict()
    qmodel = quantized(fashion_mnist_model, fashion_mnist, (4, 8))
    path = tmp_path / "model.safetensors"
    size = export_quantized(qmodel, path, METADATA)

    state_bytes = sum(t.numel() * t.element_size() for t in fp32_state.values())
    assert orig_mb(fp32_state) == state_bytes / 2**20 == orig_mb(fashion_mnist_model)
    assert compressed_mb(path) == size / 2**20
    assert compression_ratio(orig_mb(fp32_state), compressed_mb(path)) == state_bytes / size
    assert 2.0 < state_bytes / size < 8.0  # 4-bit weights, but BN and classifier stay FP32

    numel = sum(fashion_mnist_model.get_submodule(n).weight.numel()
                for n in quantized_layer_names(fashion_mnist_model))
    channels = sum(fashion_mnist_model.get_submodule(n).weight.shape[0]
                   for n in quantized_layer_names(fashion_mnist_model))
    packed = sum(math.ceil(fashion_mnist_model.get_submodule(n).weight.numel() * 4 / 8)
                 for n in quantized_layer_names(fashion_mnist_model))
    assert weight_compression_ratio(qmodel) == 4 * numel / (packed + 4 * channels)
    assert weight_compression_ratio(quantize_model(fashion_mnist_model, (32, 8))) == 1.0

    def ratio(model):
        plan = precision_plan(model)
        return activation_compression_ratio(bitops_report(fashion_mnist_model, 28, plan)[0],
                                            plan)

    assert ratio(qmodel) == 4.0
    assert ratio(quantize_model(fashion_mnist_model, (8, 2))) == 16.0
    assert ratio(quantize_model(fashion_mnist_model, (8, 32))) == 1.0
    plan = precision_plan(qmodel)
    rows = bitops_report(fashion_mnist_model, 28, plan)[0]
    counts = activation_elements(rows, plan)
    assert counts["features.1.conv.0.0"] == 8 * 28 * 28  # the stem's 8 channels at 28x28
    assert counts["features.18.0"] == 80 * 4 * 4  # the last block's output: 28 -> 14 -> 7 -> 4
    assert "features.0.0" not in counts and "classifier.1" not in counts  # FP32 in both
    # The counts are the inputs the quantized layers really see: a forward pre-hook on each.
    seen = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, name=n: seen.__setitem__(name, args[0][0].numel()))
        for n, m in quant_layers(qmodel)]
    with torch.inference_mode(), activations_fp32(qmodel):
        qmodel(torch.zeros(1, 1, 28, 28))
    for h in hooks:
        h.remove()
    assert seen == counts
    half = {n: (8, 4 if i % 2 else 32) for i, n in enumerate(quantized_layer_names(qmodel))}
    mixed = quantize_model(fashion_mnist_model, half)
    elements = activation_elements(bitops_report(fashion_mnist_model, 28, half)[0], half)
    bits = sum(c * half[n][1] for n, c in elements.items())
    assert ratio(mixed) == 32 * sum(elements.values()) / bits

    metrics = compression_metrics(qmodel, fp32_state, path, rows, plan)
    assert set(metrics) == {"orig_mb", "compressed_mb", "container_overhead",
                            "compression_ratio", "weight_compression_ratio",
                            "activation_compression_ratio"}
    assert metrics["compressed_mb"] == size / 2**20  # the whole file, header included
    header_len, _ = read_header(path)
    assert metrics["container_overhead"] == (8 + header_len) / size
    # issue 10: under 3% at width 0.35; this model is smaller (0.25), so its share is larger
    assert metrics["container_overhead"] < 0.03


# ---------------------------------------------------------------------------- robustness

def test_export_is_atomic(fashion_mnist_model, fashion_mnist, tmp_path):
    qmodel = quantized(fashion_mnist_model, fashion_mnist, (8, 8))
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")
    export_quantized(qmodel, path, METADATA)
    assert os.listdir(tmp_path) == ["model.safetensors"]
    good = path.read_bytes()
    with pytest.raises(TypeError, match="must be a string or a number"):  # nothing is written
        export_quantized(qmodel, path, {**METADATA, "bad": object()})
    with pytest.raises(ValueError, match="lacks arch"):
        export_quantized(qmodel, path, {"num_classes": 10})
    with pytest.raises(ValueError, match="may not name layers"):
        export_quantized(qmodel, path, {**METADATA, "layers": "mine"})
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["model.safetensors"]
    with pytest.raises(ValueError, match="not calibrated"):
        export_quantized(quantize_model(fashion_mnist_model, (8, 8)),
                         tmp_path / "x.safetensors", METADATA)


def test_the_same_model_gives_the_same_bytes(fashion_mnist_model, fashion_mnist, tmp_path):
    """safetensors 0.8 writes its metadata in a new random order on each save (its issue
    #584); the file of a run must not depend on that."""
    qmodel = quantized(fashion_mnist_model, fashion_mnist, (4, 8))
    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for path in files:
        export_quantized(qmodel, path, METADATA)
    assert files[0].read_bytes() == files[1].read_bytes() == files[2].read_bytes()
    keys = list(read_header(files[0])[1]["__metadata__"])
    assert keys == sorted(keys) and len(keys) > 10


def rewrite(path, new_path, metadata=None, drop=()):
    """A copy of an exported file with its metadata changed or tensors dropped, written with
    safetensors itself (a valid container whose content does not fit)."""
    with safetensors.safe_open(path, "np") as f:
        meta = {**f.metadata(), **(metadata or {})}
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    safetensors.numpy.save_file(tensors, new_path, metadata=meta)
    return new_path


def test_bad_files_are_user_errors(fashion_mnist_model, fashion_mnist, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_quantized(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(UserError, match="not a safetensors file"):
        load_quantized(tmp_path / "junk.safetensors")
    qmodel = quantized(fashion_mnist_model, fashion_mnist, (4, 8))
    path = tmp_path / "model.safetensors"
    export_quantized(qmodel, path, METADATA)
    data = path.read_bytes()

    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(UserError, match="truncated"):
        load_quantized(tmp_path / "cut.safetensors")
    corrupt = bytearray(data)
    corrupt[8] = ord("[")  # the header's JSON object is no longer one
    (tmp_path / "corrupt.safetensors").write_bytes(bytes(corrupt))
    with pytest.raises(UserError, match="not a safetensors file") as e:
        load_quantized(tmp_path / "corrupt.safetensors")
    assert "\n" not in str(e.value)

    foreign = tmp_path / "foreign.safetensors"  # someone else's safetensors file
    safetensors.numpy.save_file({"w": np.zeros(3, np.float32)}, foreign)
    with pytest.raises(UserError, match="not a mobilenet-compression quantized model"):
        load_quantized(foreign)
    other_arch = rewrite(path, tmp_path / "arch.safetensors", {"arch": "resnet"})
    with pytest.raises(UserError, match="names no network this version can build"):
        load_quantized(other_arch)
    wider = rewrite(path, tmp_path / "wider.safetensors", {"width_multiplier": "0.5"})
    with pytest.raises(UserError, match="does not hold the network its metadata names"):
        load_quantized(wider)
    no_bn = rewrite(path, tmp_path / "no_bn.safetensors", drop=("batchnorm",))
    with pytest.raises(UserError, match=r"does not hold .* \(missing 'batchnorm'\)"):
        load_quantized(no_bn)
