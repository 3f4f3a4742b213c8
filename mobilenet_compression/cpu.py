"""`cpu_isa`: which int8 instructions this CPU offers, the ones that decide ONNX Runtime's
integer kernels (and so `onnx_img_s`, `onnx_speedup`). Standard library only.

On x86, ONNX Runtime's u8 x s8 kernels use AMX tiles, else VNNI's dot products (AVX-512 or
AVX-VNNI), which add in 32 bits; without VNNI (AVX-512BW or AVX2 only) they add pairs of
products in 16 bits (precision.weight_range keeps those sums in range, so the integers are
the same on all of them; the speed is not). On ARM64: the i8mm or dot-product extensions.
"""

import platform

# most capable first: the first one the CPU has names it
X86 = (("amx_int8", "amx"), ("avx512_vnni", "avx512_vnni"), ("avx_vnni", "avx_vnni"),
       ("avx512bw", "avx512bw"), ("avx2", "avx2"), ("sse4_1", "sse4_1"))
ARM = (("i8mm", "arm64_i8mm"), ("asimddp", "arm64_dotprod"), ("asimd", "arm64_neon"))


def cpu_flags(cpuinfo="/proc/cpuinfo"):
    """The feature flags of the first CPU in `cpuinfo` (x86 'flags', ARM 'Features')."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_isa(cpuinfo="/proc/cpuinfo"):
    """'amx', 'avx512_vnni', 'avx_vnni', 'avx512bw', 'avx2', 'sse4_1', 'arm64_i8mm',
    'arm64_dotprod', 'arm64_neon', or the machine's architecture where none is known."""
    flags = cpu_flags(cpuinfo)
    for flag, name in X86 + ARM:
        if flag in flags:
            return name
    return platform.machine() or "unknown"


def int16_pair_kernels(isa=None):
    """Whether ONNX Runtime's u8 x s8 kernels here add products in 16-bit pairs (x86
    without VNNI or AMX)."""
    return (isa or cpu_isa()) in ("avx512bw", "avx2", "sse4_1")
