"""The CPU decoding kernels (few-row GEMV, fused RMSNorm, ragged attention) against references, and the model's
routing to them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor

from fot.speculative import kernels
from fot.speculative.cache import KVCache, Layout
from fot.speculative.model import Attention, FeedForward, Linear, ModelArgs, Transformer, rope_tables

built = kernels.load()


def kernels_here() -> bool:
    """Whether this CPU runs the kernels; where it does not, that must be for lack of the instructions."""
    if built is None:
        assert kernels.isa() is None, f"the CPU has {kernels.isa()} but the kernels did not build"
    return built is not None


# K: any, or a multiple of 32, which in bf16 runs on AMX tiles where the CPU has them
any_k = st.one_of(st.integers(1, 700), st.integers(1, 40).map(lambda i: 32 * i))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40),
    n=st.integers(1, 300),
    k=any_k,
    bf16=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(rows=7, n=65, k=513, bf16=True, bias=True, seed=0)  # a partial block, K odd, past one 256-step segment
@example(rows=33, n=130, k=576, bf16=True, bias=True, seed=0)  # AMX: three 16-row groups, past one segment
def test_matmul_matches_a_float64_reference(rows, n, k, bf16, bias, seed):
    """Any rows, any shape, tails of blocks, segments, bf16 pairs and AMX tiles included: fp32 to 1e-5, bf16 (fp32
    accumulation, one final rounding to bf16) to bf16's own precision."""
    if not kernels_here():
        return
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    out = built.matmul(x, kernels.pack(w), n, b)
    assert out.dtype == dtype and out.shape == (rows, n)
    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    err = (out.double() - ref).abs().max().item()
    scale = (x.double().abs() @ w.double().abs().T).max().item() + (0 if b is None else b.double().abs().max().item())
    assert err <= (1e-5 if not bf16 else 1e-2) * scale


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(2, 48),
    n=st.integers(1, 200),
    k=any_k,
    bf16=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(rows=40, n=70, k=576, bf16=True, seed=0)  # AMX: a lone row against three row groups sharing segments
@example(rows=48, n=70, k=576, bf16=True, seed=0)  # AMX: three whole groups read in place, against fewer rows
@example(rows=16, n=70, k=64, bf16=True, seed=1)  # AMX: one whole tile of rows, against a shorter one
def test_matmul_is_batch_invariant(rows, n, k, bf16, seed):
    """A row's result is bit for bit the same alone, in any slice of the batch, or in the whole batch: what makes a
    verification forward round exactly as one-token decoding does."""
    if not kernels_here():
        return
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = kernels.pack(torch.randn(n, k, generator=g).to(dtype))
    whole = built.matmul(x, w, n)
    cut = int(torch.randint(1, rows, (1,), generator=g))
    assert torch.equal(built.matmul(x[cut - 1 : cut].contiguous(), w, n)[0], whole[cut - 1])
    assert torch.equal(built.matmul(x[cut:].contiguous(), w, n), whole[cut:])


def test_pack_round_trips_and_packs_piece_by_piece():
    """`unpack_rows` reads any rows back exactly; packing whole blocks of rows gives those blocks of the packed
    weight (what the loader relies on)."""
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(200, 77).to(dtype)
        packed = kernels.pack(w)
        assert packed.shape == kernels.packed_shape(200, 77, dtype)
        index = torch.tensor([0, 63, 64, 199, 5])
        assert torch.equal(kernels.unpack_rows(packed, index, 77), w[index])
        assert torch.equal(kernels.pack(w[64:128]), packed[1:2])
        assert torch.equal(kernels.pack(w[128:]), packed[2:])


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


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), hidden=st.integers(1, 700), bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_silu_mul_matches_pytorch(rows, hidden, bf16, seed):
    """The fused SwiGLU gate computes F.silu(gate) * up on rows [gate | up], rounding to the dtype after each op
    as PyTorch does: to a few fp32 ulps (its own exp against PyTorch's), in bf16 to one bf16 step; inputs far out
    in the tails (e^-g overflowing or vanishing) give PyTorch's limits."""
    if not kernels_here():
        return
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = torch.randn(rows, 2 * hidden, generator=g) * 6
    x[0, : min(hidden, 6)] = torch.tensor([-1e4, 1e4, -100.0, 100.0, 0.0, -87.0])[: min(hidden, 6)]
    x = x.to(dtype)
    gate, up = x.chunk(2, dim=-1)
    ref = (torch.nn.functional.silu(gate) * up).float()
    out = built.silu_mul(x)
    assert out.dtype == dtype and out.shape == (rows, hidden)
    step = ref.abs() * (2**-8 if bf16 else 4e-7) + 1e-30
    assert ((out.float() - ref).abs() <= step).all()


def test_bf16_results_round_to_nearest_even_as_torch_does():
    """A bf16 result is its fp32 value rounded once as torch rounds (to nearest even, ties included; inf and NaN
    kept): silu(100) is exactly 100, so silu_mul's results here are 100 * up, exact in fp32 before the rounding."""
    if not kernels_here():
        return
    g = torch.Generator().manual_seed(0)
    scale = 10.0 ** torch.randint(-30, 30, (4000,), generator=g)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3e38])
    up = torch.cat([torch.randn(4000, generator=g) * scale, special]).bfloat16()
    out = built.silu_mul(torch.cat([torch.full_like(up, 100), up])[None])[0]
    ref = (100 * up.float()).bfloat16()
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out[~ref.isnan()].view(torch.int16), ref[~ref.isnan()].view(torch.int16))


def test_the_kernels_are_built_for_the_best_instruction_set_here():
    """The first of `ISAS` whose flags this CPU has (AVX-512 before AVX2) is the one the loaded module was built for."""
    if not kernels_here():
        return
    assert built.isa() == kernels.isa() == next(n for n, (f, _) in kernels.ISAS.items() if f <= kernels.cpu_flags())


def test_silu_mul_rejects_what_it_cannot_do():
    if not kernels_here():
        return
    with pytest.raises(RuntimeError, match="2H"):
        built.silu_mul(torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        built.silu_mul(torch.randn(2, 8).double())


def test_matmul_rejects_what_it_cannot_do():
    if not kernels_here():
        return
    x, w = torch.randn(3, 8), kernels.pack(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="M >= 1"):
        built.matmul(x[:0], w, 4)
    with pytest.raises(RuntimeError, match="one dtype"):
        built.matmul(x, w.bfloat16(), 4)
    with pytest.raises(RuntimeError, match="not packed"):
        built.matmul(x, w, 65)
    with pytest.raises(RuntimeError, match="not packed"):
        built.matmul(x, torch.randn(4, 8), 4)
    with pytest.raises(RuntimeError, match="bias"):
        built.matmul(x, w, 4, torch.randn(5))


def attention_case(heads: tuple[int, int, int], dtype: torch.dtype, seed: int) -> tuple[Attention, tuple, KVCache]:
    """A random attention layer (q/k/v bias on), its RoPE tables and a cache of 6 slots full of random entries."""
    n_heads, n_kv, head_dim = heads
    args = ModelArgs(
        vocab_size=8,
        dim=64,
        n_layers=1,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        hidden_dim=8,
        norm_eps=1e-6,
        max_seq_len=96,
        rope_theta=10000.0,
        attention_bias=True,
    )
    g = torch.Generator().manual_seed(seed)
    attention = Attention(args).requires_grad_(False)
    for p in attention.parameters():
        p.copy_(torch.randn(p.shape, generator=g) / 4)
    cache = KVCache(1, 6, n_kv, 96, head_dim, dtype)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    return attention.to(dtype), rope_tables(args), cache


@settings(max_examples=40, deadline=None)
@given(
    heads=st.sampled_from([(9, 3, 64), (12, 2, 128), (4, 4, 32), (8, 1, 64)]),
    samples=st.lists(st.tuples(st.integers(0, 80), st.integers(1, 6)), min_size=1, max_size=6),
    bf16=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_attend_matches_the_model_s_pytorch_attention(heads, samples, bf16, seed):
    """The fused kernel (RoPE, cache writes, ragged causal attention) computes what the PyTorch path (rotate,
    index_put, scatter, masked SDPA, gather) computes, for any ragged step over any slots: the same cache entries
    and the same outputs, to fp32 rounding, or in bf16 to a few bf16 steps (the PyTorch path rounds RoPE's
    intermediate products to bf16, the kernel does not)."""
    if not kernels_here():
        return
    dtype = torch.bfloat16 if bf16 else torch.float32
    attention, rope, ref_cache = attention_case(heads, dtype, seed)
    _, _, cache = attention_case(heads, dtype, seed)
    slots = sorted(torch.randperm(6, generator=torch.Generator().manual_seed(seed))[: len(samples)].tolist())
    step = Layout.build(slots, [s for s, _ in samples], [c for _, c in samples])
    x = torch.randn(int(step.pos.numel()), 64, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    ref = attention(x, step, rope, ref_cache.k[0], ref_cache.v[0])
    heads = (attention.n_heads, attention.n_kv_heads)
    qkv = attention.wqkv(x)
    out = attention.wo(built.attend(qkv, *rope, step.pos, step.slot, step.index, cache.k[0], cache.v[0], *heads))
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 8 * 2**-8 if bf16 else 1e-5
    assert (out.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()
    assert torch.equal(cache.v, ref_cache.v)
    assert (cache.k.float() - ref_cache.k.float()).abs().max() <= (2 * 2**-8 if bf16 else 1e-5) * cache.k.abs().max()


def test_attend_gives_a_token_the_same_bits_whatever_else_is_in_the_step():
    """Each token's attention is computed alone, in a fixed order, so a step over several samples and tokens gives
    every token exactly what a step over that token alone gives: what keeps speculative verification (many tokens)
    in agreement with plain decoding (one)."""
    if not kernels_here():
        return
    _, rope, cache = attention_case((9, 3, 64), torch.float32, 0)
    qkv = torch.randn(7, 15 * 64, generator=torch.Generator().manual_seed(1))

    def attend(rows: slice, step: Layout) -> Tensor:
        return built.attend(qkv[rows], *rope, step.pos, step.slot, step.index, cache.k[0], cache.v[0], 9, 3)

    together = attend(slice(0, 7), Layout.build([0, 3], [10, 40], [3, 4]))
    alone = attend(slice(4, 5), Layout.build([3], [41], [1]))
    assert torch.equal(together[4], alone[0])


def test_attend_rejects_what_it_cannot_do():
    if not kernels_here():
        return
    attention, (cos, sin), cache = attention_case((4, 2, 32), torch.float32, 0)
    qkv = torch.randn(1, 8 * 32)
    one = torch.zeros(1, dtype=torch.long)
    k, v = cache.k[0], cache.v[0]
    with pytest.raises(RuntimeError, match="out of range"):
        built.attend(qkv, cos, sin, one, one + 6, one, k, v, 4, 2)
    with pytest.raises(RuntimeError, match="out of range"):
        built.attend(qkv, cos, sin, one, one, one + 96, k, v, 4, 2)
    with pytest.raises(RuntimeError, match="qkv"):
        built.attend(qkv[:, :-32], cos, sin, one, one, one, k, v, 4, 2)
    with pytest.raises(RuntimeError, match="one dtype"):
        built.attend(qkv.bfloat16(), cos, sin, one, one, one, k, v, 4, 2)
    with pytest.raises(RuntimeError, match="multiple of KV"):
        built.attend(qkv, cos, sin, one, one, one, k, v, 3, 2)


def test_packed_model_routes_to_the_kernels(tiny_llama_dir):
    """After packing, a Linear holds one copy of its weight (the kernel's layout; the plain weight is gone) and sends
    any number of rows to the kernel, agreeing with F.linear; the MLP's SwiGLU kernel agrees with PyTorch's ops.
    Attention takes the fused kernel for every unpadded step, prefills included."""
    model = Transformer.from_pretrained(tiny_llama_dir)
    plain = {name: m.weight.clone() for name, m in model.named_modules() if isinstance(m, Linear)}
    ffn = model.layers[0].feed_forward
    unfused = FeedForward(model.args).requires_grad_(False)
    unfused.load_state_dict(ffn.state_dict())
    model.pack_weights()
    layer = model.layers[0].attention.wqkv
    assert isinstance(layer, Linear) and (layer.matmul is not None) == kernels_here()
    assert layer.weight.is_meta == kernels_here() and torch.equal(layer.rows(), plain["layers.0.attention.wqkv"])
    assert (model.norm.kernel is not None) == (model.layers[0].ffn_norm.kernel is not None) == kernels_here()
    assert (model.layers[0].attention.kernel is not None) == kernels_here()
    assert (ffn.kernel is not None) == kernels_here()
    for rows in (1, 5, 40):
        x = torch.randn(rows, layer.in_features)
        ref = torch.nn.functional.linear(x, plain["layers.0.attention.wqkv"], layer.bias)
        torch.testing.assert_close(layer(x), ref)
        torch.testing.assert_close(ffn(x), unfused(x))  # the MLP with its kernels and with PyTorch ops
    calls = []
    attention = model.layers[0].attention
    if attention.kernel is not None:
        attention.kernel = lambda *a, kernel=attention.kernel: calls.append(a[0].shape[0]) or kernel(*a)
    cache = KVCache(1, 4, model.args.n_kv_heads, 64, model.args.head_dim)
    for counts in ([1, 1, 1], [2, 1, 1], [20], [1]):
        step = cache.plan(list(range(len(counts))), counts)
        model.run_layers(torch.randn(sum(counts), model.args.dim), step, cache, 0, 1)
        cache.advance(list(range(len(counts))), counts)
    assert calls == ([3, 4, 20, 1] if kernels_here() else [])


def test_loading_packed_reads_weights_straight_into_the_kernel_layout(tiny_model_dir, tiny_llama_dir):
    """`from_pretrained(pack=True)` gives the same weights as loading plain then packing, in fp32 and bf16, tied
    embedding or not; a tied embedding is then looked up in the head's one copy."""
    if not kernels_here():
        return
    for folder in (tiny_model_dir, tiny_llama_dir):
        for dtype in (torch.float32, torch.bfloat16):
            direct = Transformer.from_pretrained(folder, dtype, pack=True)
            later = Transformer.from_pretrained(folder, dtype).pack_weights()
            for (name, a), b in zip(direct.named_modules(), later.modules(), strict=True):
                if isinstance(a, Linear):
                    assert torch.equal(a.blocked, b.blocked), name
            tokens = torch.tensor([0, 3, 7])
            assert torch.equal(direct.embed(tokens), later.embed(tokens))
            assert direct.tok_embeddings.weight.is_meta == direct.args.tie_embeddings


def test_amx_is_on_where_the_cpu_has_it_and_can_be_switched_off():
    """Where the CPU has AMX, `load` switches bf16 matmuls to the tiles (Linux grants their state); FOT_AMX=0 keeps
    them off, and the matmul then runs on AVX512-BF16 to the same precision (a fresh process: AMX is per process)."""
    if not kernels_here():
        return
    assert kernels.amx() == (kernels.AMX <= kernels.cpu_flags())
    code = (
        "import torch; from fot.speculative import kernels\n"
        "m = kernels.load(); assert m is not None and not kernels.amx()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, w = torch.randn(20, 512, generator=g).bfloat16(), torch.randn(100, 512, generator=g).bfloat16()\n"
        "err = (m.matmul(x, kernels.pack(w), 100).double() - x.double() @ w.double().T).abs().max().item()\n"
        "assert err <= 1e-2 * (x.double().abs() @ w.double().abs().T).max().item(), err\n"
    )
    env = {**os.environ, "FOT_AMX": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_kernels_can_be_switched_off(tiny_llama_dir):
    """FOT_KERNELS=0: no kernels, and a packed model runs on oneDNN and PyTorch ops alone (a fresh process, since
    the build is cached per process)."""
    code = (
        "import sys; from fot.speculative import kernels; from fot.speculative.model import Transformer\n"
        "assert kernels.load() is None\n"
        "m = Transformer.from_pretrained(sys.argv[1]).pack_weights()\n"
        "assert m.layers[0].attention.wqkv.matmul is None and m.norm.kernel is None\n"
        "assert m.layers[0].attention.kernel is None and m.layers[0].feed_forward.kernel is None\n"
    )
    env = {**os.environ, "FOT_KERNELS": "0"}
    done = subprocess.run([sys.executable, "-c", code, str(tiny_llama_dir)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("foreign", [".", "fot_kernels.so", "build.json"])
def test_a_kernel_cache_another_user_owns_is_refused(tmp_path, monkeypatch, foreign):
    """Only a group/world-writable folder was refused: a folder, .so or manifest another user owns (who can rewrite
    it, or chmod it back, at will) was imported, its code run as ours. No build runs here: the import is faked."""
    monkeypatch.setenv("FOT_CACHE", str(tmp_path))
    monkeypatch.delenv("FOT_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset(kernels.ISAS["avx2"][0]))
    monkeypatch.setattr(kernels, "import_built", lambda folder, digest: "imported")
    assert kernels.compiled() == "imported"  # all ours: loaded
    (folder,) = (tmp_path / "kernels").iterdir()
    (folder / "fot_kernels.so").write_bytes(b"")
    (folder / "build.json").write_text("{}")
    assert kernels.compiled() == "imported"
    if os.geteuid() == 0:
        os.chown(folder / foreign, os.geteuid() + 4242, -1)
    else:  # only root gives a file away: this process becomes another user instead
        other = os.geteuid() + 4242
        monkeypatch.setattr(os, "geteuid", lambda: other)
    with pytest.warns(UserWarning, match="owned by another user"):
        assert kernels.compiled() is None
