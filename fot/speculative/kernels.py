"""CPU kernels (`kernels.cpp`), compiled once into the project cache on first use.

A decoding or verification step is a chain of matmuls over a few rows and small row-wise ops. `matmul` reads each
weight once in its own blocked layout (`pack`), which is then the model's only copy of that weight, and applies
it to all rows of the step; a row's result does not depend on how many rows share the step (batch invariance).
`rms_norm` does in one pass what F.rms_norm does in ~6 ops, `silu_mul` SwiGLU's chunk, silu and product in one;
`attend` does RoPE, the cache writes and the ragged causal attention of a step in one call instead of ~15 ops.
They are built for the best instruction set of `ISAS` this CPU has: AVX-512 (F, BW, VL and BF16) or AVX2 with FMA.
Elsewhere, or when the build fails, `load()` returns None and the model runs on oneDNN and PyTorch ops.
`FOT_KERNELS=0` switches them off. Where the CPU has AMX, bf16 matmuls run
on its tiles (`amx`), which makes a forward over 16 tokens cost about what one token's does; `FOT_AMX=0` keeps
them on AVX512-BF16, whose one-row streaming is faster.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from fot.errors import InvalidRequestError, KernelBuildError
from fot.files import locked, sha256

COLUMNS = 64  # kernels.cpp's kColumns: output columns (weight rows) per block of `pack`'s layout
# The instruction sets kernels.cpp is built for, best first: the CPU flags each needs, and its compiler flags.
ISAS = {
    "avx512": (
        {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"},
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-mamx-tile", "-mamx-bf16"],
    ),
    "avx2": ({"avx2", "fma"}, ["-mavx2", "-mfma"]),
}
AMX = {"amx_tile", "amx_bf16"}  # bf16 matmuls on tiles: many rows for the price of one (`amx`)


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU (empty where /proc/cpuinfo cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def isa() -> str | None:
    """The instruction set of `ISAS` the kernels are built for on this CPU, or None where it has none of them."""
    return next((name for name, (needed, _) in ISAS.items() if needed <= cpu_flags()), None)


def step(dtype: torch.dtype) -> int:
    """How many k one step of the packed layout covers: a pair in bf16 (AVX512-BF16 multiplies pairs), one in fp32."""
    return 2 if dtype == torch.bfloat16 else 1


def packed_shape(n: int, k: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """The shape `pack` gives a weight [n, k]: [ceil(n / 64), ceil(k / step), 64, step]."""
    s = step(dtype)
    return -(-n // COLUMNS), -(-k // s), COLUMNS, s


def pack(w: torch.Tensor) -> torch.Tensor:
    """The layout `matmul` reads a weight [N, K] in (see `packed_shape`), zero-padded to whole blocks: block b,
    step s holds the 64 columns b*64.. side by side, each with its `step` consecutive k values. Packing rows
    [64 i, 64 j) of a weight gives blocks [i, j) of its packed form, so a weight can be packed piece by piece."""
    n, k = w.shape
    nb, steps, cols, s = packed_shape(n, k, w.dtype)
    padded = torch.nn.functional.pad(w.detach(), (0, steps * s - k, 0, nb * cols - n))
    return padded.view(nb, cols, steps, s).transpose(1, 2).contiguous()


def unpack_rows(packed: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """Rows `rows` of the weight [N, k] that `packed` holds, [len(rows), k]: an embedding lookup, or a sub-matrix."""
    picked = packed[rows // COLUMNS, :, rows % COLUMNS]  # [len(rows), steps, step]
    return picked.reshape(len(rows), -1)[:, :k]


BUILD_TIMEOUT_S = 900  # how long a process waits for another one's build of the kernels


@contextmanager
def build_lock(folder: Path, timeout_s: float = BUILD_TIMEOUT_S):
    """Hold the build lock of `folder` (`fot.files.locked`: a killed build never blocks later processes). Torch's
    own lock file inside the folder can only be a dead build's while this is held, and is removed. Waiting past
    `timeout_s` for a live holder is an error that names the file."""

    def held(path: Path) -> KernelBuildError:
        return KernelBuildError(
            f"another process has held {path} for over {timeout_s:.0f} s while building the CPU kernels; "
            "if none is running, remove the file"
        )

    with locked(folder / ".fot-build.lock", timeout_s, held):
        (folder / "lock").unlink(missing_ok=True)  # torch's FileBaton, left by a build that was killed
        yield


def import_built(folder: Path, source_digest: str):
    """The module built in `folder` from the source with `source_digest`, imported without any lock, or None when
    the folder holds no build that its manifest vouches for (built from this source, the .so unchanged since)."""
    so, manifest = folder / "fot_kernels.so", folder / "build.json"
    try:
        recorded = json.loads(manifest.read_text())
        if recorded != {"source_sha256": source_digest, "so_sha256": sha256(so)}:
            return None
    except (OSError, ValueError):
        return None
    spec = importlib.util.spec_from_file_location("fot_kernels", so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=1)
def load():
    """The compiled module (`matmul(x, pack(w), N, bias)`, `rms_norm(x, w, eps)`, `silu_mul(x)`, `attend(...)`),
    or None where it cannot run here. Where the CPU has AMX (and `FOT_AMX` is not 0), its bf16 matmuls are switched
    to the tiles here, before any matmul runs, so that all of a process's calls take one path."""
    module = compiled()
    if module is not None and AMX <= cpu_flags() and os.environ.get("FOT_AMX", "1") != "0":
        module.enable_amx()
    return module


def amx() -> bool:
    """Whether this process's bf16 matmuls run on AMX tiles: the CPU has them and Linux granted their state."""
    module = load()
    return module is not None and module.amx()


def running() -> str | None:
    """Which build of our kernels runs in this process: its instruction set, "+amx" where its bf16 matmuls take the
    tiles; None where none loads. Machines round bf16 sums differently, so results name it."""
    return None if load() is None else isa() + ("+amx" if amx() else "")


def owned(path: Path) -> bool:
    """Whether `path` is ours (owned by this process's effective user) or absent: another user's file, or folder,
    in the kernel cache could have been written by them whatever its mode says now."""
    try:
        return path.stat().st_uid == os.geteuid()
    except FileNotFoundError:
        return True


def compiled():
    """The compiled module, or None where it cannot run here. A finished build is imported directly; a build
    happens under `build_lock`, and records the hashes of its source and its .so, which every later import checks.
    A cache folder that others may write to, or that (or whose .so or manifest) another user owns, is refused: its
    .so would run as our code."""
    target = isa()
    if os.environ.get("FOT_KERNELS", "1") == "0" or target is None:
        return None
    from fot.models import cache_dir

    source = Path(__file__).with_name("kernels.cpp")
    digest = sha256(source)
    # one folder per torch, source and instruction set: another kernel, or checkout, never reuses or replaces a build
    folder = cache_dir() / "kernels" / f"torch-{torch.__version__}-{digest[:12]}-{target}"
    folder.mkdir(parents=True, exist_ok=True, mode=0o755)
    if folder.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        warnings.warn(f"fot: {folder} is writable by other users; not loading kernels from it", stacklevel=2)
        return None
    if foreign := [p for p in (folder, folder / "fot_kernels.so", folder / "build.json") if not owned(p)]:
        warnings.warn(f"fot: {foreign[0]} is owned by another user; not loading kernels from {folder}", stacklevel=2)
        return None
    if (module := import_built(folder, digest)) is not None:
        return module
    from torch.utils.cpp_extension import load as build

    try:
        with build_lock(folder):
            if (module := import_built(folder, digest)) is not None:  # another process built it meanwhile
                return module
            if not (folder / "fot_kernels.so").exists():
                print(f"fot: compiling the CPU decoding kernels once into {folder} (~1 min)", file=sys.stderr)
            module = build(
                name="fot_kernels",
                sources=[str(source)],
                extra_cflags=["-O3", "-fopenmp", *ISAS[target][1]],
                extra_ldflags=["-fopenmp"],
                build_directory=str(folder),
            )
            record = {"source_sha256": digest, "so_sha256": sha256(folder / "fot_kernels.so")}
            (folder / "build.json").write_text(json.dumps(record))
            return module
    except KernelBuildError:
        raise
    except Exception as e:  # no compiler, no ninja, ...: the engine still runs, on oneDNN only
        warnings.warn(f"fot: the CPU decoding kernels could not be built, using oneDNN only: {e}", stacklevel=2)
        return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere oneDNN emulates it slowly."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_has_fast_bf16() -> bool:
    """bf16 pays off on a CPU with native instructions, or with our kernels, which widen bf16 to fp32 as they load
    it and so read half of fp32's bytes."""
    return cpu_has_native_bf16() or load() is not None


def resolve_dtype(dtype: str | torch.dtype, device: str, ours: bool = True) -> torch.dtype:
    """dtype "auto": bf16 on an accelerator, and on a CPU where our kernels run (AVX-512 or AVX2): there every
    decoding and verification op is batch-invariant, so greedy speculative output is plain output token for token in
    bf16 too, at half the weight bytes of fp32. Elsewhere on CPU fp32, the only dtype in which oneDNN's and SDPA's
    rounding cannot part a verification forward from a one-token forward. "fast": bf16 wherever bf16 is fast
    (`cpu_has_fast_bf16`), kernels or not. The embedded checkpoints are fp32 de-quantizations of their GGUF:
    "float32" runs them exactly as they are. `ours=False` resolves for an engine that runs its own CPU kernels
    (vLLM): there "auto" and "fast" are bf16 on a CPU only with native bf16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in ("auto", "fast") and (device != "cpu" or not ours):
        return torch.bfloat16 if device != "cpu" or cpu_has_native_bf16() else torch.float32
    if dtype == "auto":
        return torch.bfloat16 if load() is not None else torch.float32
    if dtype == "fast":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    named = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in named:
        raise InvalidRequestError(f"unknown dtype {dtype!r}; use auto, fast, float32 or bfloat16")
    return named[dtype]
