"""A Llama/Qwen2-family transformer in plain PyTorch, run over a flat ragged batch of tokens.

The new tokens of all samples in a step are one flat sequence `[T]` (no padding), so every weight matmul runs over
exactly the tokens that exist; only attention regroups them by sample (see `cache.Layout`). Layers can be run in
any range and the hidden state returned at any layer: Kangaroo drafts from layer k and verifies with layers k..L.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fot.errors import ModelError
from fot.models import read_json
from fot.speculative import kernels
from fot.speculative.cache import KVCache, Layout
from fot.speculative.weights import Checkpoint


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float
    max_seq_len: int
    rope_theta: float
    rope_scaling: tuple[tuple[str, float | str], ...] = ()
    attention_bias: bool = False  # bias on q, k, v (Qwen2, or Llama with attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama with attention_bias)
    mlp_bias: bool = False
    tie_embeddings: bool = False

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelArgs:
        """Read a transformers config.json (Llama or Qwen2) in either the v4 or the v5 spelling of RoPE."""
        model_type = cfg.get("model_type")
        if model_type not in ("llama", "qwen2"):
            raise ModelError(f"model_type {model_type!r} is not supported; supported: llama, qwen2")
        if cfg.get("use_sliding_window"):
            raise ModelError("sliding-window attention is not supported")
        try:
            rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
            theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
            # older configs spell it "type": kept as "rope_type", which `rope_frequencies` reads, or no scaling runs
            rope_type = rope.pop("rope_type", rope.pop("type", "default"))
            if rope_type not in ("default", "linear", "llama3"):
                raise ModelError(f"RoPE type {rope_type!r} is not supported; supported: default, linear, llama3")
            if rope_type != "default":
                rope["rope_type"] = rope_type
            n_heads = cfg["num_attention_heads"]
            is_qwen = model_type == "qwen2"
            args = cls(
                vocab_size=cfg["vocab_size"],
                dim=cfg["hidden_size"],
                n_layers=cfg["num_hidden_layers"],
                n_heads=n_heads,
                n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
                hidden_dim=cfg["intermediate_size"],
                norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_seq_len=cfg.get("max_position_embeddings", 2048),
                rope_theta=theta,
                rope_scaling=tuple(sorted(rope.items())),
                attention_bias=is_qwen or bool(cfg.get("attention_bias")),
                o_bias=not is_qwen and bool(cfg.get("attention_bias")),
                mlp_bias=bool(cfg.get("mlp_bias")),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
        except ModelError:
            raise
        except KeyError as e:
            raise ModelError(f"config.json has no {e.args[0]!r}") from None
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise ModelError(f"config.json has a bad value: {e}") from None
        sizes = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "max_seq_len")
        for name in sizes:
            value = getattr(args, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelError(f"config.json: {name} must be a positive whole number, got {value!r}")
        if args.n_heads % args.n_kv_heads:
            raise ModelError(f"config.json: {args.n_heads} heads do not share {args.n_kv_heads} KV heads evenly")
        return args


def rope_frequencies(args: ModelArgs) -> Tensor:
    """Inverse frequencies of RoPE, with the config's scaling (linear or Llama-3's smooth one)."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = dict(args.rope_scaling)
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(args: ModelArgs) -> tuple[Tensor, Tensor]:
    """cos and sin for every position, [max_seq_len, head_dim], computed in fp32 as transformers does."""
    freqs = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float32), rope_frequencies(args))
    freqs = torch.cat((freqs, freqs), dim=-1)
    return freqs.cos(), freqs.sin()


class Linear(nn.Linear):
    """nn.Linear that runs on one packed copy of its weight once packed. Where this CPU runs our kernels, that copy
    is `kernels.pack`'s layout, read by `kernels.matmul` for any number of rows: the plain weight is then dropped
    (a meta tensor keeps its shape and dtype; `rows` reads it back). Elsewhere it is oneDNN's prepacked copy (on
    CPU faster than eager for more than one row, with no compilation), beside the plain weight."""

    blocked: Tensor | None = None  # `kernels.pack(weight)`, the only copy, read by `matmul`
    matmul = None
    packed: Tensor | None = None  # oneDNN's copy, where the kernels do not run

    def pack(self, matmul=None) -> None:
        """Switch to packed weights: `matmul` (the kernel) where given, else oneDNN. Packing twice is a no-op."""
        if self.blocked is not None or self.packed is not None:
            return
        if matmul is not None:
            self.use_blocked(kernels.pack(self.weight), matmul)
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 16)  # 16: a row-count hint only

    def use_blocked(self, blocked: Tensor, matmul) -> None:
        """Make `blocked` (`kernels.pack`'s layout of this weight) the weight's only copy."""
        self.blocked, self.matmul = blocked, matmul
        self.weight = nn.Parameter(torch.empty(self.weight.shape, dtype=blocked.dtype, device="meta"), False)

    def rows(self, index: Tensor | None = None) -> Tensor:
        """The plain weight's rows `index` (all of them when None), from whichever copy this layer holds."""
        if self.blocked is None:
            return self.weight if index is None else self.weight.index_select(0, index)
        index = torch.arange(self.out_features) if index is None else index
        return kernels.unpack_rows(self.blocked, index, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        if self.matmul is not None and x.dim() == 2 and not x.requires_grad:
            return self.matmul(x.contiguous(), self.blocked, self.out_features, self.bias)
        if self.blocked is not None:
            return F.linear(x, self.rows(), self.bias)
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def kernels_for(dtype: torch.dtype, device: torch.device, use_kernels: bool = True):
    """The compiled kernels where they run on `device` in `dtype` (and `use_kernels`), else None."""
    if not use_kernels or device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return None
    return kernels.load()


def pack_linears(module: nn.Module, use_kernels: bool = True) -> None:
    """Run every `Linear` of `module` on one packed copy of its weight (CPU only; elsewhere a no-op): our
    `kernels.matmul` where this CPU runs our kernels (and `use_kernels`), with every `RMSNorm` on
    `kernels.rms_norm`, SwiGLU's gate on `kernels.silu_mul` and attention on `kernels.attend`; oneDNN's packed
    matmul otherwise (fp32, or bf16 where oneDNN supports it)."""
    weight = next((p for p in module.parameters() if not p.is_meta), None)
    if weight is None:  # every weight already lives in a packed copy
        return
    built = kernels_for(weight.dtype, weight.device, use_kernels)
    supported = weight.dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()  # bf16: AVX512/AMX
    if weight.device.type == "cpu" and (built or torch.backends.mkldnn.is_available() and supported):
        for m in module.modules():
            if isinstance(m, Linear):
                m.pack(built.matmul if built else None)
            elif isinstance(m, RMSNorm) and built:
                m.kernel = built.rms_norm
            elif isinstance(m, FeedForward) and built:
                m.kernel = built.silu_mul
            elif isinstance(m, Attention) and built and m.head_dim % 16 == 0:
                m.kernel = built.attend


class RMSNorm(nn.Module):
    kernel = None  # `kernels.rms_norm` once packed: the same arithmetic in one pass instead of ~6 ops

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # normalised in fp32, as transformers does
        if self.kernel is not None and x.dim() == 2:
            return self.kernel(x.contiguous(), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE in the rotate-half layout of transformers' checkpoints; x: [T, heads, head_dim], cos/sin: [T, 1, d]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    # `kernels.attend` once packed: RoPE, the cache writes and attention in one call for every unpadded step. It
    # rounds each token alike whatever else the step holds, prefills included, so that greedy output does not
    # depend on which requests were admitted together; SDPA (the padded baseline, training, other devices) does not
    kernel = None

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.wqkv = Linear(args.dim, q + 2 * kv, bias=args.attention_bias)
        self.wo = Linear(q, args.dim, bias=args.o_bias)

    def forward(self, x: Tensor, step: Layout, rope: tuple[Tensor, Tensor], k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """rope: the model's fp32 cos and sin tables over all positions; k_cache/v_cache: this layer's cache."""
        T = x.shape[0]
        qkv = self.wqkv(x)
        if self.kernel is not None and not step.padded and not qkv.requires_grad:
            heads = (self.n_heads, self.n_kv_heads)
            return self.wo(self.kernel(qkv, *rope, step.pos, step.slot, step.index, k_cache, v_cache, *heads))
        qkv = qkv.view(T, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        cos, sin = step.rope(*rope, x.dtype)
        qk = rotate(qkv[:, : self.n_heads + self.n_kv_heads], cos, sin)  # queries and keys in one go
        q, k, v = qk[:, : self.n_heads], qk[:, self.n_heads :], qkv[:, self.n_heads + self.n_kv_heads :]
        # Each token's key/value goes to its own sample's slot at its own position: no padding in the cache.
        k_cache[step.slot, :, step.index] = k
        v_cache[step.slot, :, step.index] = v
        rows, n = step.qindex.shape
        if step.dest is None:  # the flat tokens already are the [rows, n] layout
            qb = q.view(rows, n, self.n_heads, self.head_dim)
        else:
            qb = q.new_zeros(rows * n, self.n_heads, self.head_dim).index_copy_(0, step.dest, q)
            qb = qb.view(rows, n, self.n_heads, self.head_dim)
        # GQA: the query heads sharing a KV head are folded into that head's query axis, one attention per KV head
        qb = qb.transpose(1, 2).reshape(rows, self.n_kv_heads, -1, self.head_dim)
        mask = step.attention_mask(self.n_heads // self.n_kv_heads, x.dtype)
        kv_len = step.kv_len
        o = F.scaled_dot_product_attention(qb, k_cache[:rows, :, :kv_len], v_cache[:rows, :, :kv_len], attn_mask=mask)
        o = o.reshape(rows, self.n_heads, n, self.head_dim).transpose(1, 2).reshape(rows * n, -1)
        if step.dest is not None:
            o = o.index_select(0, step.dest)
        return self.wo(o)


class FeedForward(nn.Module):
    kernel = None  # `kernels.silu_mul` once packed: silu(gate) * up in one pass instead of chunk, silu and mul

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = Linear(args.dim, 2 * args.hidden_dim, bias=args.mlp_bias)  # gate and up, fused
        self.w2 = Linear(args.hidden_dim, args.dim, bias=args.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.w13(x)
        if self.kernel is not None and h.dim() == 2 and not h.requires_grad:
            return self.w2(self.kernel(h))
        gate, up = h.chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x: Tensor, step: Layout, rope: tuple[Tensor, Tensor], k_cache: Tensor, v_cache: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), step, rope, k_cache, v_cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(args)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def pack_weights(self, use_kernels: bool = True) -> Transformer:
        """Switch every matmul to one packed copy of its weight (see `pack_linears`). A tied embedding then reads
        the head's packed copy, so that the two stay one tensor."""
        pack_linears(self, use_kernels)
        if self.args.tie_embeddings and self.output.blocked is not None:
            meta = torch.empty(self.tok_embeddings.weight.shape, dtype=self.dtype, device="meta")
            self.tok_embeddings.weight = nn.Parameter(meta, requires_grad=False)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def weight_bytes(self) -> int:
        """Bytes of the model's own copy of its weights: the plain tensors and our kernel's packed ones (a tied
        embedding and head once). oneDNN's opaque copies, where the kernels do not run, are not counted."""
        tensors = {id(p): p for p in self.parameters() if not p.is_meta}
        tensors |= {id(m.blocked): m.blocked for m in self.modules() if isinstance(m, Linear) and m.blocked is not None}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def embed(self, tokens: Tensor) -> Tensor:
        if self.tok_embeddings.weight.is_meta:  # tied, and held by the head's packed copy
            return self.output.rows(tokens)
        return self.tok_embeddings(tokens)

    @property
    def rope(self) -> tuple[Tensor, Tensor]:
        """RoPE's fp32 cos and sin tables, [max_seq_len, head_dim], which every attention layer takes (rebuilt in
        fp32 if a cast of the whole model, `model.to(torch.bfloat16)`, rounded them)."""
        if self.cos.dtype != torch.float32:
            cos, sin = rope_tables(self.args)
            self.cos, self.sin = cos.to(self.cos.device), sin.to(self.sin.device)
        return self.cos, self.sin

    def run_layers(self, h: Tensor, step: Layout, cache: KVCache, start: int = 0, end: int | None = None) -> Tensor:
        """Run layers [start, end) on hidden states h: [T, dim]; cache entries go to the cache's own layer slots."""
        for i in range(start, self.args.n_layers if end is None else end):
            layer_cache = i - cache.first_layer
            h = self.layers[i](h, step, self.rope, cache.k[layer_cache], cache.v[layer_cache])
        return h

    def logits(self, h: Tensor) -> Tensor:
        return self.output(self.norm(h)).float()

    def forward(self, tokens: Tensor, step: Layout, cache: KVCache, logits_rows: Tensor | None = None) -> Tensor:
        """All layers over the flat tokens; logits (fp32) only for `logits_rows` (all rows when None)."""
        h = self.run_layers(self.embed(tokens), step, cache)
        if logits_rows is not None:
            h = h.index_select(0, logits_rows)
        return self.logits(h)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, dtype: torch.dtype = torch.float32, *, pack: bool = False
    ) -> Transformer:
        """Load a transformers Llama/Qwen2 checkpoint (safetensors) in `dtype`, fusing q/k/v and gate/up into one
        matmul each. Weights are read a few MB at a time and cast at once, so loading holds no second copy. With
        `pack` (CPU), each matmul weight is written straight into its packed layout (see `pack_weights`)."""
        folder = Path(folder)
        args = ModelArgs.from_hf(read_json(folder / "config.json"))
        with torch.device("meta"):
            model = cls(args)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{folder}: no *.safetensors weight files")
        built = kernels_for(dtype, torch.device("cpu"), pack)
        linears = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, Linear)}
        state: dict[str, Tensor] = {}
        names = checkpoint_names(args)
        with Checkpoint(files) as ckpt:
            check_shapes(ckpt, names, {name: tuple(p.shape) for name, p in model.state_dict().items()}, args)
            for name, sources in names.items():
                if built is not None and name in linears:
                    layer = linears[name]
                    layer.use_blocked(read_packed(ckpt, sources, dtype), built.matmul)
                    state[name] = layer.weight
                elif name == "tok_embeddings.weight" and built is not None and args.tie_embeddings:
                    state[name] = torch.empty(ckpt.shape(sources[0]), dtype=dtype, device="meta")  # the head's
                elif name == "output.weight" and built is None and args.tie_embeddings:
                    state[name] = state["tok_embeddings.weight"]  # the embedding's own tensor (listed before)
                else:
                    state[name] = torch.cat([ckpt.read(src, dtype) for src in sources])
        model.load_state_dict(state, assign=True, strict=True)
        if args.tie_embeddings and built is None:
            model.output.weight = model.tok_embeddings.weight
        model = model.eval().requires_grad_(False)
        model.cos, model.sin = rope_tables(args)  # fp32; buffers built on the meta device hold no values
        return model.pack_weights() if built is not None else model


def checkpoint_names(args: ModelArgs) -> dict[str, list[str]]:
    """Each of our weights and the transformers weights it is made of, stacked along the first axis in order (q/k/v
    and gate/up are fused)."""
    out = {
        "tok_embeddings.weight": ["model.embed_tokens.weight"],
        "norm.weight": ["model.norm.weight"],
        "output.weight": ["model.embed_tokens.weight" if args.tie_embeddings else "lm_head.weight"],
    }
    for i in range(args.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        att, mlp = p + "self_attn.", p + "mlp."
        out[o + "attention.wqkv.weight"] = [att + f"{x}_proj.weight" for x in "qkv"]
        if args.attention_bias:
            out[o + "attention.wqkv.bias"] = [att + f"{x}_proj.bias" for x in "qkv"]
        out[o + "attention.wo.weight"] = [att + "o_proj.weight"]
        if args.o_bias:
            out[o + "attention.wo.bias"] = [att + "o_proj.bias"]
        out[o + "feed_forward.w13.weight"] = [mlp + "gate_proj.weight", mlp + "up_proj.weight"]
        out[o + "feed_forward.w2.weight"] = [mlp + "down_proj.weight"]
        if args.mlp_bias:
            out[o + "feed_forward.w13.bias"] = [mlp + "gate_proj.bias", mlp + "up_proj.bias"]
            out[o + "feed_forward.w2.bias"] = [mlp + "down_proj.bias"]
        out[o + "attention_norm.weight"] = [p + "input_layernorm.weight"]
        out[o + "ffn_norm.weight"] = [p + "post_attention_layernorm.weight"]
    return out


def check_shapes(
    ckpt: Checkpoint, names: dict[str, list[str]], shapes: dict[str, tuple[int, ...]], args: ModelArgs
) -> None:
    """Every checkpoint weight has the exact shape config.json implies, before any is read: the packed load would
    otherwise zero-fill missing rows (a head short of the vocabulary generates), the plain one fail in torch."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    for name, sources in names.items():
        shape = shapes[name]  # ours: the sources stacked along the first axis
        rows = {3: (q, kv, kv), 2: (args.hidden_dim,) * 2}.get(len(sources), shape[:1])  # q/k/v, gate/up
        for src, n in zip(sources, rows, strict=True):
            want, got = (n, *shape[1:]), ckpt.shape(src)
            if got != want:
                raise ModelError(f"checkpoint weight {src} has shape {list(got)}; config.json implies {list(want)}")


def read_packed(ckpt: Checkpoint, sources: list[str], dtype: torch.dtype, chunk_bytes: int = 32 << 20) -> Tensor:
    """The weight stacked from `sources` (each [rows, K]), in `kernels.pack`'s layout, packed a few blocks of rows
    at a time straight from the file: the plain weight never exists whole."""
    shapes = [ckpt.shape(src) for src in sources]
    if len({s[1:] for s in shapes}) != 1 or len(shapes[0]) != 2:
        raise ModelError(f"checkpoint weights {sources} cannot be stacked: shapes {shapes}")
    n, k = sum(s[0] for s in shapes), shapes[0][1]
    out = torch.empty(kernels.packed_shape(n, k, dtype), dtype=dtype)
    step = max(1, chunk_bytes // (4 * k * kernels.COLUMNS)) * kernels.COLUMNS  # rows per piece, whole blocks
    starts = [0]
    for s in shapes:
        starts.append(starts[-1] + s[0])
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        pieces = [
            ckpt.read(src, dtype, max(r0, lo) - lo, min(r1, hi) - lo)
            for src, lo, hi in zip(sources, starts, starts[1:], strict=False)
            if lo < r1 and hi > r0
        ]
        block = r0 // kernels.COLUMNS
        packed = kernels.pack(torch.cat(pieces))
        out[block : block + packed.shape[0]] = packed
    return out
