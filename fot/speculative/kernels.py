"""CPU decoding kernels (`kernels.cpp`), compiled once into the project cache on first use.

A decoding step at small batch is a chain of matrix-vector products and small row-wise ops. oneDNN's packed
matmul streams a layer's weights well below this machine's read rate when it has one row to multiply; `gemv`
reads a blocked copy of the weight (`pack_gemv`) strictly in order, once for all (up to `MAX_ROWS`) input rows.
`rms_norm` does in one pass what F.rms_norm does in ~6 ops, `silu_mul` SwiGLU's chunk, silu and product in one;
`attend` does RoPE, the cache writes and the ragged causal attention of a step in one call instead of ~15 ops.
They need AVX-512 (F, BW, VL and BF16); elsewhere, or when the build fails, `load()` returns None and the
model runs on oneDNN and PyTorch ops. `FOT_KERNELS=0` switches them off.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import torch

MAX_ROWS = 4  # kernels.cpp's kMaxRows
BLOCK = 4  # kernels.cpp's kBlock: weight rows per block of `pack_gemv`'s layout
NEEDED = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU (empty where /proc/cpuinfo cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def pack_gemv(w: torch.Tensor) -> torch.Tensor:
    """The layout `gemv` reads a weight [N, K] in: [N/4, K/width, 4, width] (width: one 512-bit vector, 16 fp32 or
    32 bf16 values), zero-padded to whole blocks, so that the kernel's reads run straight through memory."""
    n, k = w.shape
    width = 64 // w.element_size()
    nb, kc = -(-n // BLOCK), -(-k // width)
    padded = torch.nn.functional.pad(w.detach(), (0, kc * width - k, 0, nb * BLOCK - n))
    return padded.view(nb, BLOCK, kc, width).transpose(1, 2).contiguous()


@lru_cache(maxsize=1)
def load():
    """The compiled module (`gemv(x, pack_gemv(w), N)`, `rms_norm(x, w, eps)`, `silu_mul(x)`, `attend(...)`), or
    None where it cannot run here."""
    if os.environ.get("FOT_KERNELS", "1") == "0" or not NEEDED <= cpu_flags():
        return None
    from torch.utils.cpp_extension import load as build

    from fot.models import cache_dir

    source = Path(__file__).with_name("kernels.cpp")
    # one folder per torch and per source: a changed kernel, or another checkout's, never reuses or replaces a build
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    folder = cache_dir() / "kernels" / f"torch-{torch.__version__}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    if not any(folder.glob("*.so")):
        print(f"fot: compiling the CPU decoding kernels once into {folder} (~1 min)", file=sys.stderr)
    try:
        return build(
            name="fot_kernels",
            sources=[str(source)],
            extra_cflags=["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
        )
    except Exception as e:  # no compiler, no ninja, ...: the engine still runs, on oneDNN only
        warnings.warn(f"fot: the CPU decoding kernels could not be built, using oneDNN only: {e}", stacklevel=2)
        return None
