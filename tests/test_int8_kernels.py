"""The integer arithmetic every ONNX Runtime int8 kernel computes alike: the weight ranges of
precision.weight_range, one real QLinearConv session per case, and cpu_isa's parsing."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from mobilenet_compression import cpu
from mobilenet_compression.quant.precision import (
    INT16_MAX,
    QUANT_BITS,
    pair_sum_bound,
    signed_range,
    weight_range,
)


def test_weight_ranges_keep_every_pair_sum_within_int16():
    assert weight_range(8, 8) == (-64, 64)  # 2 x 255 x 127 would overflow: cut
    assert weight_range(8, 7) == (-127, 127)  # inputs <= 127: 2 x 127 x 127 = 32,258
    assert weight_range(8, 32) == (-127, 127)  # float inputs: no integer kernel
    for wb in QUANT_BITS:
        for ab in QUANT_BITS:
            qmin, qmax = weight_range(wb, ab)
            assert qmin == -qmax and pair_sum_bound(ab, qmax) <= INT16_MAX, (wb, ab)
            if (wb, ab) != (8, 8):  # nothing else is cut
                assert (qmin, qmax) == signed_range(wb, narrow=True), (wb, ab)


def qlinearconv(weights, out_scale):
    """A 1x1 QLinearConv session: uint8 inputs at scale 1, int8 `weights` (N, K) at scale 1,
    uint8 output at `out_scale`, zero point 128."""
    import onnxruntime as ort

    n, k = weights.shape
    c = numpy_helper.from_array
    inits = [c(np.float32(1), "sx"), c(np.uint8(0), "zx"), c(weights.reshape(n, k, 1, 1), "w"),
             c(np.float32(1), "sw"), c(np.int8(0), "zw"), c(np.float32(out_scale), "so"),
             c(np.uint8(128), "zo")]
    node = helper.make_node("QLinearConv", ["x", "sx", "zx", "w", "sw", "zw", "so", "zo"], ["y"])
    graph = helper.make_graph(
        [node], "one_conv", [helper.make_tensor_value_info("x", TensorProto.UINT8, None)],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def requantized(acc, out_scale):
    return np.clip(np.round(acc / out_scale) + 128, 0, 255).astype(np.uint8)


def int16_pairs(x, weights):
    """What a u8 x s8 kernel without VNNI computes: neighbouring products summed in int16
    with saturation (vpmaddubsw), then the pair sums in int32."""
    p = x.astype(np.int64)[:, None] * weights.astype(np.int64)[None, :, :, None, None]
    return np.clip(p[:, :, 0::2] + p[:, :, 1::2], -INT16_MAX - 1, INT16_MAX).sum(2)


def case(wmax, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (2, 64, 4, 4)).astype(np.uint8)  # 8-bit inputs: 0..255
    w = rng.integers(-wmax, wmax + 1, (16, 64)).astype(np.int8)
    exact = np.einsum("bkhw,nk->bnhw", x.astype(np.int64), w.astype(np.int64))
    return x, w, exact


def test_within_the_bound_onnx_runtime_computes_the_exact_sums_on_any_cpu():
    x, w, exact = case(64)  # weight_range(8, 8)
    assert pair_sum_bound(8, 64) <= INT16_MAX
    out_scale = 256.0  # the accumulators (|acc| < 2^19) read to within 256
    got = qlinearconv(w, out_scale).run(None, {"x": x})[0]
    assert np.array_equal(got, requantized(exact, out_scale)), cpu.cpu_isa()


@pytest.mark.skipif(not cpu.int16_pair_kernels(),
                    reason=f"this CPU ({cpu.cpu_isa()}) adds int8 products in 32 bits")
def test_past_the_bound_a_cpu_without_vnni_saturates_its_pair_sums():
    # What the weight ranges exist for, shown on this CPU: full 8-bit weights on 8-bit inputs
    # give int16-saturated sums, exactly as the emulation computes them, not the exact ones.
    x, w, exact = case(127)
    out_scale = 256.0
    got = qlinearconv(w, out_scale).run(None, {"x": x})[0]
    assert not np.array_equal(got, requantized(exact, out_scale))
    assert np.array_equal(got, requantized(int16_pairs(x, w), out_scale))


@pytest.mark.parametrize("flags,isa", [
    ("fpu sse4_1 avx2 fma", "avx2"),  # AMD EPYC without AVX-512
    ("avx2 avx512f avx512bw", "avx512bw"),
    ("avx2 avx512f avx512bw avx512_vnni avx512_bf16", "avx512_vnni"),
    ("avx2 avx512bw avx512_vnni amx_bf16 amx_tile amx_int8", "amx"),
])
def test_cpu_isa_names_the_best_int8_instructions(tmp_path, flags, isa):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu.cpu_isa(str(info)) == isa
    assert cpu.int16_pair_kernels(isa) == (isa in ("avx2", "avx512bw"))


def test_cpu_isa_on_arm_and_where_cpuinfo_is_missing(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nFeatures\t: fp asimd aes asimddp sve\n")
    assert cpu.cpu_isa(str(info)) == "arm64_dotprod"
    assert cpu.cpu_isa(str(tmp_path / "none")) not in ("", None)
