"""What the FP32 network does on the calibration images, measured once per checkpoint and
shared by every run of a sweep: each depthwise conv input's per-channel maxima (for
`--equalize`) and each layer's per-channel output means (bias correction's targets).

Neither depends on the bit widths, so the 25 runs of a grid used to measure the same tensors
25 times (about 5 of a width-0.35 run's 50 seconds). They are kept as float32 tensors in a
safetensors file under $MOBILENET_COMPRESSION_CACHE/fp32-stats/ (default
~/.cache/mobilenet-compression/), named by a hash of everything they depend on: the
checkpoint's SHA-256, the calibration images (batches x batch size of the training split),
the device type and whether the network was equalized first. Read back they are the same
bits, so a run gives the same numbers with or without the cache. Two agents starting at
once measure them once: the second waits on a file lock and reads what the first wrote.
"""

import hashlib
import json
import os

from ..environment import cache_folder
from ..errors import UserError
from ..files import atomic_write
from .bias_correction import fp32_channel_means
from .equalize import depthwise_input_maxes

VERSION = 1  # part of the key: bump when what is measured changes


def cache_dir():
    return cache_folder("fp32-stats")


def cache_path(kind, checkpoint_sha256, batches, batch_size, device_type, equalized):
    text = json.dumps([VERSION, kind, checkpoint_sha256, batches, batch_size, device_type,
                       bool(equalized)])
    return os.path.join(cache_dir(), f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"
                                     ".safetensors")


def cached(path, measure, device):
    """{name: tensor} from the safetensors file at `path`, or `measure()` written there
    first. An unreadable file is measured again and replaced (it is a cache, not a result)."""
    from filelock import FileLock
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save

    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock = FileLock(path + ".lock", timeout=600)
        lock.acquire()
    except OSError as e:
        raise UserError(f"cannot write the FP32 statistics cache {os.path.dirname(path)} "
                        f"({e.strerror}); set MOBILENET_COMPRESSION_CACHE to a folder you can "
                        f"write to.") from None
    try:
        if os.path.exists(path):
            try:
                return {k: v.to(device) for k, v in load_file(path).items()}
            except (SafetensorError, OSError, ValueError):
                pass
        tensors = measure()
        data = save({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()})
        atomic_write(path, lambda f: f.write(data))
        return tensors
    finally:
        lock.release()


def depthwise_maxes(fp32, loader, batches, key):
    """equalize.depthwise_input_maxes, through the cache. key: (checkpoint SHA-256,
    batches, batch size, device type)."""
    path = cache_path("equalize", *key, equalized=False)
    device = next(fp32.parameters()).device
    table = cached(path, lambda: {str(i): m for i, m in enumerate(
        depthwise_input_maxes(fp32, loader, batches))}, device)
    return [table[str(i)] for i in range(len(table))]


def channel_means(source, loader, batches, key, equalized):
    """quantization.fp32_channel_means of `source` (the network the runs quantize: equalized
    or not), through the cache."""
    path = cache_path("means", *key, equalized=equalized)
    device = next(source.parameters()).device
    return cached(path, lambda: fp32_channel_means(source, loader, batches), device)
