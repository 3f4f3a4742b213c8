"""The exported ONNX file in ONNX Runtime: sessions, predictions, and speed measured pass
against pass (`measure_onnx`: what a run logs as onnx_*). The file itself is onnx_export.py's."""

import os
import statistics
import time

import numpy as np
import torch

from ..cpu import cpu_isa
from ..errors import UserError
from ..evaluation import accuracy
from .onnx_export import INPUT, OUTPUT, build_onnx, export_onnx


def ort():
    """The onnxruntime module, or a UserError that says how to get it."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("ONNX Runtime is not installed (no module named 'onnxruntime'); "
                        "pip install -r requirements.txt, or pass --engine torch.") from None
    return onnxruntime


def available():
    """True when onnx and ONNX Runtime can be imported."""
    try:
        import onnx  # noqa: F401
        ort()
    except (ImportError, UserError):
        return False
    return True


def session(path_or_bytes, threads=None, profile_prefix=None):
    """An ONNX Runtime CPU session with every graph optimisation (QDQ -> integer kernels)."""
    rt = ort()
    opts = rt.SessionOptions()
    opts.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return rt.InferenceSession(path_or_bytes, opts, providers=["CPUExecutionProvider"])


def to_numpy(x):
    """A float32 numpy array of a tensor, as ONNX Runtime takes it."""
    return x.detach().cpu().contiguous().numpy().astype(np.float32, copy=False)


def predict_onnx(sess, loader):
    """(logits, labels) of the ONNX model over a BatchLoader's images, as torch tensors."""
    logits, labels = [], []
    for x, y in loader:
        logits.append(torch.from_numpy(sess.run([OUTPUT], {INPUT: to_numpy(x)})[0]))
        labels.append(y.cpu())
    return torch.cat(logits), torch.cat(labels)


def paired_throughput(sessions, images, batch_size=256, repeats=5):
    """Images/s of each session on one `batch_size` batch, timed side by side: each of
    `repeats` rounds runs every session once, in turn (after one untimed warm-up pass each),
    so a change in the machine's speed during the measurement (seen here: the same int8 file
    at 2,250 and at 2,780 images/s a minute apart) falls on all of them alike. images: a
    float array (N, C, H, W), N >= 1 (tiled to the batch). Returns (median images/s of each
    session, and each session's speed relative to the first: the median over rounds of the
    first's seconds / its seconds, a ratio measured pass against pass)."""
    batch = np.resize(images, (batch_size, *images.shape[1:])).astype(np.float32)
    for sess in sessions:
        sess.run([OUTPUT], {INPUT: batch})
    times = [[] for _ in sessions]
    for _ in range(repeats):
        for i, sess in enumerate(sessions):
            t = time.perf_counter()
            sess.run([OUTPUT], {INPUT: batch})
            times[i].append(time.perf_counter() - t)
    speeds = [batch_size / statistics.median(ts) for ts in times]
    ratios = [statistics.median(t0 / t for t0, t in zip(times[0], ts)) for ts in times]
    return speeds, ratios


def latency_ms(sess, images, repeats=50):
    """Median milliseconds of one single-image inference over `repeats` (after warm-up)."""
    one = np.ascontiguousarray(images[:1], dtype=np.float32)
    for _ in range(5):
        sess.run([OUTPUT], {INPUT: one})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run([OUTPUT], {INPUT: one})
        times.append(time.perf_counter() - t)
    return 1000.0 * statistics.median(times)


def measure_onnx(qmodel, fp32_model, path, loader, input_shape, threads=None, metadata=None):
    """Export `qmodel` to `path`, run it in ONNX Runtime over `loader`, and time it against the FP32 model exported and run the same way
    in this process. Returns (metrics, logits):
    onnx_acc, onnx_eval_s (its seconds over `loader`), onnx_img_s (batch 256, median of 5),
    onnx_latency_ms (batch 1, median of 50), onnx_fp32_img_s, onnx_speedup (batch 256, the
    median over 5 rounds of one pass of each, in turn, of FP32 seconds / quantized seconds),
    cpu_isa (the CPU's int8 instructions, `cpu.cpu_isa`: what the speeds depend on),
    onnx_threads (the sessions' intra-op threads: `threads`, else ONNX Runtime's default of
    one per core; ONNX Runtime does not read OMP_NUM_THREADS, so a run sharing the machine
    must pass it). `metadata` goes into the file (export_onnx)."""
    export_onnx(qmodel, path, input_shape, metadata)
    sess = session(path, threads)
    t = time.perf_counter()
    logits, labels = predict_onnx(sess, loader)
    eval_s = time.perf_counter() - t
    fp32_proto, _ = build_onnx(fp32_model, input_shape)
    fp32_sess = session(fp32_proto.SerializeToString(), threads)
    images = to_numpy(next(iter(loader))[0])
    (fp32_img_s, img_s), (_, speedup) = paired_throughput([fp32_sess, sess], images)
    return {
        "onnx_acc": accuracy(logits, labels),
        "onnx_eval_s": eval_s,
        "onnx_img_s": img_s,
        "onnx_latency_ms": latency_ms(sess, images),
        "onnx_fp32_img_s": fp32_img_s,
        "onnx_speedup": speedup,
        "onnx_threads": int(threads) if threads else os.cpu_count(),
        "cpu_isa": cpu_isa(),
    }, logits
