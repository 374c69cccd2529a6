"""The CPU decoding kernels (few-row GEMV, fused RMSNorm) against references, and the model's routing to them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fot.speculative import kernels
from fot.speculative.model import Linear, Transformer

built = kernels.load()


def kernels_here() -> bool:
    """Whether this CPU runs the kernels; where it does not, that must be for lack of the instructions."""
    if built is None:
        assert not kernels.NEEDED <= kernels.cpu_flags(), "the CPU has AVX512-BF16 but the kernels did not build"
    return built is not None


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, kernels.MAX_ROWS),
    n=st.integers(1, 300),
    k=st.integers(1, 200),
    bf16=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gemv_matches_a_float64_reference(rows, n, k, bf16, seed):
    """Any shape, tails of the 16/32-wide vectors included: fp32 to 1e-5, bf16 (fp32 accumulation, one final
    rounding to bf16) to bf16's own precision."""
    if not kernels_here():
        return
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    out = built.gemv(x, w)
    assert out.dtype == dtype and out.shape == (rows, n)
    ref = x.double() @ w.double().T
    err = (out.double() - ref).abs().max().item()
    scale = (x.double().abs() @ w.double().abs().T).max().item()  # the size of the sums' terms
    assert err <= (1e-5 if not bf16 else 1e-2) * scale


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), dim=st.integers(1, 700), bf16=st.booleans(), seed=st.integers(0, 2**16))
@example(rows=17, dim=635, bf16=True, seed=1)
def test_rms_norm_matches_the_model_s_own(rows, dim, bf16, seed):
    """The fused norm computes what RMSNorm's PyTorch ops compute (fp32 statistics, cast, then the weight): to
    fp32 rounding, and in bf16 to two bf16 steps of the output (bf16 rounds twice, the normalised value and then
    the weighted one, so a one-step flip of the first can come out as up to two; found by hypothesis: 1.16 steps
    on 12 of 10795 values at rows=17, dim=635, seed=1)."""
    if not kernels_here():
        return
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = (torch.randn(rows, dim, generator=g) * 3).to(dtype)
    w = (1 + torch.randn(dim, generator=g) / 4).to(dtype)
    ref = w * torch.nn.functional.rms_norm(x.float(), (dim,), eps=1e-5).to(dtype)
    out = built.rms_norm(x, w, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    step = ref.float().abs() * (2 * 2**-7 if bf16 else 1e-6) + 1e-6
    assert ((out.float() - ref.float()).abs() <= step).all()


def test_gemv_rejects_what_it_cannot_do():
    if not kernels_here():
        return
    x, w = torch.randn(kernels.MAX_ROWS + 1, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="M <="):
        built.gemv(x, w)
    with pytest.raises(RuntimeError, match="one dtype"):
        built.gemv(x[:2], w.bfloat16())


def test_packed_model_routes_few_rows_to_the_kernel(tiny_llama_dir):
    """After packing, a Linear sends <= MAX_ROWS rows to the kernel (where this CPU runs it) and more to oneDNN;
    both agree with F.linear."""
    model = Transformer.from_pretrained(tiny_llama_dir).pack_weights()
    layer = model.layers[0].attention.wqkv
    assert isinstance(layer, Linear) and (layer.gemv is not None) == kernels_here()
    assert (model.norm.kernel is not None) == (model.layers[0].ffn_norm.kernel is not None) == kernels_here()
    for rows in (1, kernels.MAX_ROWS, kernels.MAX_ROWS + 1):
        x = torch.randn(rows, layer.in_features)
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_kernels_can_be_switched_off(tiny_llama_dir):
    """FOT_KERNELS=0: no kernels, and a packed model runs on oneDNN and PyTorch ops alone (a fresh process, since
    the build is cached per process)."""
    code = (
        "import sys; from fot.speculative import kernels; from fot.speculative.model import Transformer\n"
        "assert kernels.load() is None\n"
        "m = Transformer.from_pretrained(sys.argv[1]).pack_weights()\n"
        "assert m.layers[0].attention.wqkv.gemv is None and m.norm.kernel is None\n"
    )
    env = {**os.environ, "FOT_KERNELS": "0"}
    done = subprocess.run([sys.executable, "-c", code, str(tiny_llama_dir)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
