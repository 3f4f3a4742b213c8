"""The ONNX QDQ export and ONNX Runtime as an engine, on the small model trained on the real
Fashion-MNIST (conftest), with real ONNX Runtime sessions and real sweep.py subprocesses."""

import os
import subprocess
import sys

import numpy as np
import onnx
import pandas as pd
import pytest

from mobilenet_compression.deploy import onnx_export as ox
from mobilenet_compression.deploy import onnx_runtime as rt
from mobilenet_compression.cpu import cpu_isa
from mobilenet_compression.data import BatchLoader
from mobilenet_compression.evaluation import accuracy, agreement, eval_loader, predict
from mobilenet_compression.quant.bias_correction import bias_correct
from mobilenet_compression.quant.calibrate import calibrate
from mobilenet_compression.quant.convert import convert
from mobilenet_compression.quant.output_grids import attach_output_grids
from mobilenet_compression.quant.prepare import quantize_model
from tests.conftest import torch_threads
from tests.test_qat import (  # noqa: F401  (small_checkpoint: a fixture)
    QUICK,
    ROOT,
    env_for,
    small_checkpoint,
    sweep_in_process,
    sweep_py,
)

SHAPE = (1, 28, 28)


def quantized(model, fashion_mnist, wb, ab, grids=True):
    info, train, _, _ = fashion_mnist
    calib = BatchLoader(train.head(512), info, 128, channels_last=True)
    with torch_threads(1):
        qmodel = quantize_model(model, (wb, ab))
        calibrate(qmodel, calib, "mse", 4)
        bias_correct(qmodel, model, calib, 4)  # gives the quantized convs a bias to fold
        convert(qmodel)
        if grids:
            attach_output_grids(qmodel, calib, 4)  # at 8-bit inputs, as a run does
    return qmodel, calib


def optimised_nodes(proto, tmp_path):
    """The nodes of the graph ONNX Runtime runs for `proto` (every optimisation on), as it
    writes that graph out."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimised.onnx")).graph.node


def test_batchnorm_folding_keeps_the_fp32_model_outputs(fashion_mnist, fashion_mnist_model):
    info, _, _, test = fashion_mnist
    loader = eval_loader(test.head(512), info)
    proto, q_outputs = ox.build_onnx(fashion_mnist_model, SHAPE)
    assert q_outputs == [] and not any(n.op_type == "BatchNormalization"
                                       for n in proto.graph.node)
    with torch_threads(1):
        want, _ = predict(fashion_mnist_model, loader)
    got, _ = rt.predict_onnx(rt.session(proto.SerializeToString(), 1), loader)
    # Folding reorders float32 arithmetic only: the logits (magnitudes ~10) agree to 1e-4.
    assert float((got - want).abs().max()) < 1e-4


@pytest.mark.parametrize("bits", [(8, 8), (4, 4)])
def test_onnx_model_passes_the_checker_and_agrees_with_the_pytorch_model(
        fashion_mnist, fashion_mnist_model, tmp_path, bits):
    info, _, _, test = fashion_mnist
    qmodel, calib = quantized(fashion_mnist_model, fashion_mnist, *bits)
    path = tmp_path / "m.onnx"
    ox.export_onnx(qmodel, str(path), SHAPE)
    onnx.checker.check_model(str(path), full_check=True)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "BatchNormalization" not in ops
    loader = eval_loader(test.head(1000), info)
    with torch_threads(1):
        want, labels = predict(qmodel, loader)
    got, _ = rt.predict_onnx(rt.session(str(path), 1), loader)
    # The same grids, the residual adds' 8-bit grids at A8 included (the model has them
    # too); the engine divides where torch multiplies, so a value on a rounding boundary
    # lands one code apart now and then: top-1 agrees on at least 99.5% of these 1,000
    # real test images (99.8% and 100% measured).
    assert agreement(want, got) >= 99.5
    assert abs(accuracy(got, labels) - accuracy(want, labels)) <= 0.3


def test_every_integer_layer_is_proven_exact_on_any_cpu_before_a_file_is_written(
        fashion_mnist, fashion_mnist_model):
    # W8A8: the one pair the weight ranges cut. Each integer conv's bound is read from the
    # file's own constants (static: no run on this CPU) and is within int16.
    qmodel, _ = quantized(fashion_mnist_model, fashion_mnist, 8, 8)
    proto, q_outputs = ox.build_onnx(qmodel, SHAPE)
    bounds = ox.int16_pair_bounds(proto)
    assert len(bounds) == len(q_outputs) > 10
    assert max(bounds.values()) <= 32767 and max(bounds.values()) > 32767 // 2  # codes used
    codes = [t for t in proto.graph.initializer if t.name.endswith(".w_codes")]
    assert max(int(np.abs(onnx.numpy_helper.to_array(t)).max()) for t in codes) == 64
    # One weight code past the bound (an 8-bit code of 127 on 8-bit inputs): refused.
    w = onnx.numpy_helper.to_array(codes[3]).copy()
    w.flat[0] = 127
    codes[3].CopyFrom(onnx.numpy_helper.from_array(w, codes[3].name))
    with pytest.raises(ValueError, match="pair sums can pass 32767"):
        ox.check_int16_pairs(proto)


def test_w3a4_model_holds_only_3_bit_weight_and_4_bit_activation_codes(
        fashion_mnist, fashion_mnist_model):
    info, _, _, test = fashion_mnist
    qmodel, _ = quantized(fashion_mnist_model, fashion_mnist, 3, 4)
    proto, q_outputs = ox.build_onnx(qmodel, SHAPE)
    codes = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer
             if t.name.endswith(".w_codes")]
    assert len(codes) == len(q_outputs) > 10
    for c in codes:  # the narrow 3-bit codes themselves, in int8
        assert c.dtype == np.int8 and c.min() >= -3 and c.max() <= 3
    assert any(np.abs(c).max() == 3 for c in codes)
    # Read every QuantizeLinear's output on a real batch: 16 codes at most per tensor
    # (uint8 0..15: unsigned codes, or signed codes shifted by 8).
    for name, _, _ in q_outputs:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UINT8,
                                                                     None))
    sess = rt.session(proto.SerializeToString(), 1)
    x, _ = next(iter(eval_loader(test.head(256), info)))
    outs = sess.run([n for n, _, _ in q_outputs], {ox.INPUT: rt.to_numpy(x)})
    for (name, lo, hi), out in zip(q_outputs, outs):
        assert (lo, hi) == (0, 15), name
        assert out.min() >= lo and out.max() <= hi, name
    assert any(out.max() == hi for (_, _, hi), out in zip(q_outputs, outs))  # ranges used


def test_engine_onnxruntime_run_logs_engine_and_matches_the_torch_engine(
        tmp_path, small_checkpoint):  # noqa: F811
    res = tmp_path / "res"
    common = ["--checkpoint", str(small_checkpoint), "--weight_bits", "8", "--activation_bits",
              "8", "--results_dir", str(res), "--wandb_mode", "offline", *QUICK]
    r = sweep_py([*common, "--engine", "torch", "--seed", "1"], tmp_path)
    assert r.returncode == 0, r.stderr
    # The second run takes its thread count from OMP_NUM_THREADS (what the offline agent sets
    # for K runs sharing a machine), not --threads: ONNX Runtime must get it too.
    i = common.index("--threads")
    args = [*common[:i], *common[i + 2:], "--engine", "onnxruntime", "--seed", "2"]
    r = sweep_py(args, tmp_path, OMP_NUM_THREADS="1")
    assert r.returncode == 0, r.stderr
    rows = pd.read_csv(res / "runs" / "runs.csv").set_index("engine")
    assert set(rows.index) == {"torch", "onnxruntime"}
    # The same model in both engines (each run's own): 1 point on these 300 test images
    # (3 images). The two runs differ in --seed (the calibration sample), so their models
    # differ and are not compared with each other.
    assert abs(rows.onnx_acc["torch"] - rows.quant_acc["torch"]) <= 1.0
    assert (rows.onnx_agreement >= 98.0).all()
    assert rows.quant_acc["onnxruntime"] == rows.onnx_acc["onnxruntime"]
    assert rows.onnx_agreement_images["torch"] == 300
    assert (rows.onnx_threads == 1).all()
    assert (rows.cpu_isa == cpu_isa()).all()  # what the speeds were measured on
    for col in ("onnx_img_s", "onnx_latency_ms", "onnx_speedup", "onnx_agreement",
                "time/startup_s", "time/onnx_s", "time/wandb_finish_s", "time/total_s"):
        assert (rows[col] > 0).all(), col
    assert len(list((res / "runs" / "models").glob("*.onnx"))) == 2


def test_bad_engine_is_one_error_line(tmp_path, small_checkpoint):  # noqa: F811
    # sweep.py's main in this process: a bad flag's exit needs no interpreter of its own (the
    # bad-input tests of test_sweep.py and test_qat.py keep one real process each)
    r = sweep_in_process(["--checkpoint", str(small_checkpoint), "--engine", "tensorrt",
                          "--wandb_mode", "disabled"], tmp_path)
    assert r.returncode == 2 and "--engine" in r.stderr and "invalid choice" in r.stderr


def test_engine_onnxruntime_without_onnxruntime_installed_is_one_error_line(
        tmp_path, small_checkpoint):  # noqa: F811
    """ONNX Runtime is hidden from the subprocess by an import hook (sitecustomize), as if it
    were not installed."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import importlib.util, sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'onnxruntime':\n"
        "            return importlib.util.spec_from_loader(name, self)\n"
        "    def create_module(self, spec):\n"
        "        return None\n"
        "    def exec_module(self, module):\n"
        "        raise ModuleNotFoundError(f'No module named {module.__name__!r}')\n"
        "sys.meta_path.insert(0, Hide())\n")
    env = {**env_for(tmp_path), "PYTHONPATH": str(hide)}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sweep.py"), "--checkpoint",
                        str(small_checkpoint), "--engine", "onnxruntime", "--results_dir",
                        str(tmp_path / "res"), "--wandb_mode", "disabled"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error:") and "ONNX Runtime" in lines[0]
    assert not (tmp_path / "res").exists()  # nothing written


def test_output_grids_read_training_images_only(fashion_mnist, fashion_mnist_model):
    info, _, _, test = fashion_mnist
    qmodel, _ = quantized(fashion_mnist_model, fashion_mnist, 4, 8, grids=False)
    with pytest.raises(Exception, match="training images"):
        attach_output_grids(qmodel, BatchLoader(test.head(256), info, 128), 1)


def test_fp32_layers_keep_the_run_torch_only(fashion_mnist_model):
    assert not ox.onnx_exportable(quantize_model(fashion_mnist_model, (8, 32)))
    assert ox.onnx_exportable(quantize_model(fashion_mnist_model, (8, 8)))


def test_below_8_bits_every_quantized_conv_runs_as_an_integer_kernel(
        fashion_mnist, fashion_mnist_model, tmp_path):
    """W4A4: in ONNX Runtime's optimised graph (as it writes it out) every quantized conv
    whose output goes straight into one QuantizeLinear runs as a QLinearConv (below 8 bits
    too: the b-bit codes are clipped as uint8, after the QuantizeLinear), which is most of
    them; the rest read or feed the float residual sums. The int32 biases the engine adds
    are the PyTorch model's own (convert put them on that grid)."""
    from mobilenet_compression.quant.convert import (
        batchnorm_factors,
        int32_bias_step,
        layers_with_batchnorm,
    )

    qmodel, _ = quantized(fashion_mnist_model, fashion_mnist, 4, 4)
    proto, _ = ox.build_onnx(qmodel, SHAPE)
    ops = [n.op_type for n in optimised_nodes(proto, tmp_path)]
    readers = {}
    for n in proto.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    producer = {o: n.op_type for n in proto.graph.node for o in n.output}
    fusable = [n for n in proto.graph.node if n.op_type == "Conv"
               and producer.get(n.input[0]) == "DequantizeLinear"
               and readers[n.output[0]] == ["QuantizeLinear"]]
    convs = [m for _, m, _ in layers_with_batchnorm(qmodel) if m.weight.dim() == 4]
    assert ops.count("QLinearConv") == len(fusable) >= 0.6 * len(convs) > 10
    for _, layer, bn in layers_with_batchnorm(qmodel):
        factor, folded = batchnorm_factors(layer.bias, bn, layer.weight.shape[0])
        steps = folded / int32_bias_step(layer, factor)
        assert float((steps - steps.round()).abs().max()) < 1e-3


def test_w8a8_pools_in_the_engines_layout_with_the_same_result(
        fashion_mnist, fashion_mnist_model, tmp_path):
    """At W8A8 the last conv is an integer kernel, which ONNX Runtime runs in NHWC: the
    export pools with Transpose(NHWC) + ReduceMean, so in the engine's optimised graph the
    pooling reads the last QLinearConv's output through its DequantizeLinear, with no
    Transpose between them, and the logits are those of a GlobalAveragePool over NCHW."""
    info, _, _, test = fashion_mnist
    qmodel, calib = quantized(fashion_mnist_model, fashion_mnist, 8, 8)
    proto, _ = ox.build_onnx(qmodel, SHAPE)
    pool = [n for n in proto.graph.node if n.name.startswith("pool")]
    assert [n.op_type for n in pool] == ["Transpose", "ReduceMean"]
    producer = {o: n for n in optimised_nodes(proto, tmp_path) for o in n.output}
    chain, x = [], next(n for n in producer.values() if n.op_type == "ReduceMean")
    while x.op_type not in ("QLinearConv", "Transpose"):
        x = producer[x.input[0]]
        chain.append(x.op_type)
    assert chain == ["DequantizeLinear", "QLinearConv"]
    # The same graph pooled the NCHW way: GlobalAveragePool + Flatten in place of the two.
    nchw = onnx.ModelProto()
    nchw.CopyFrom(proto)
    first = [i for i, n in enumerate(nchw.graph.node) if n.name.startswith("pool")][0]
    source, out = pool[0].input[0], pool[1].output[0]
    for _ in pool:
        del nchw.graph.node[first]
    for k, node in enumerate([
            onnx.helper.make_node("GlobalAveragePool", [source], ["gap"], name="gap"),
            onnx.helper.make_node("Flatten", ["gap"], [out], name="flat", axis=1)]):
        nchw.graph.node.insert(first + k, node)
    onnx.checker.check_model(nchw)
    loader = eval_loader(test.head(512), info)
    got, _ = rt.predict_onnx(rt.session(proto.SerializeToString(), 1), loader)
    want, _ = rt.predict_onnx(rt.session(nchw.SerializeToString(), 1), loader)
    # Only the order of a float32 mean's additions differs: logits (~10) agree to 1e-4.
    assert float((got - want).abs().max()) < 1e-4 and agreement(got, want) == 100.0


def test_paired_throughput_times_each_session_in_turn(fashion_mnist, fashion_mnist_model):
    info, _, _, test = fashion_mnist
    proto, _ = ox.build_onnx(fashion_mnist_model, SHAPE)
    fp32 = rt.session(proto.SerializeToString(), 1)
    batch = rt.to_numpy(next(iter(eval_loader(test.head(64), info)))[0])
    speeds, ratios = rt.paired_throughput([fp32, fp32], batch, batch_size=64, repeats=5)
    assert len(speeds) == 2 and all(s > 0 for s in speeds)
    # A session against itself: the first's ratio is exactly 1, the second's near it.
    assert ratios[0] == 1.0 and 0.5 < ratios[1] < 2.0
