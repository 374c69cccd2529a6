"""Kangaroo (Liu et al., 2404.18911): lossless self-speculative decoding by double early exit, for a batch.

The draft model is the model itself, cut short: its first `exit_layer` layers, then a small trained **adapter**
(one attention layer with its own KV cache, norm + residual, a final norm; no MLP), then the model's own frozen
LM head, optionally restricted to the most frequent tokens (`draft_vocab`) because the head dominates the cost of
a draft step in a small model with a large vocabulary.

Double early exit: (1) drafts come from the shallow layers; (2) a sample stops drafting as soon as its draft's
top-1 probability falls below `threshold`, or after `max_steps`. In a batch every sample stops at its own step.
Verification reuses the shallow work: the layer-1..k KV entries and hidden states computed while drafting are
kept, and only layers k+1..L run on them (`verify`). The adapter's KV cache lives in the engine's cache as one
extra layer, so it grows, drops rejected entries and compacts with everything else. `KangarooDrafter` is a
`fot.speculative.proposer.Proposer`: the engine calls its `prefill`, `propose` and `verify`.

Training is fot.speculative.adapter_training (`fot train-adapter`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from fot.errors import ModelError
from fot.models import read_json
from fot.speculative.cache import KVCache, Layout
from fot.speculative.model import Attention, Linear, ModelArgs, RMSNorm, Transformer, pack_linears
from fot.speculative.proposer import Batch, Proposal
from fot.speculative.weights import Checkpoint

ADAPTER_FILE, CONFIG_FILE = "adapter.safetensors", "adapter_config.json"


class Adapter(nn.Module):
    """One attention layer with norm + residual, then a final norm: shallow hidden state -> draft hidden state."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, h: Tensor, step: Layout, rope: tuple[Tensor, Tensor], k: Tensor, v: Tensor) -> Tensor:
        """Arguments as in the model's `Block` (rope: `Transformer.rope`)."""
        return self.norm(h + self.attention(self.attention_norm(h), step, rope, k, v))


def draft_head(model: Transformer, vocab: Tensor | None) -> Tensor:
    """The model's own LM head weight, restricted to the draft vocabulary (all of it when None)."""
    return model.output.rows(vocab)


@dataclass
class KangarooDrafter:
    """A trained adapter bound to its base model. `layer` is the adapter's layer index in the engine's cache."""

    model: Transformer
    adapter: Adapter
    exit_layer: int
    vocab: Tensor | None  # draft vocabulary (token ids), None = the full vocabulary
    threshold: float = 0.4
    max_steps: int = 6

    def __post_init__(self):
        if self.vocab is None:  # the model's own head, not a copy of it
            self.head = self.model.output
        else:  # a `Linear`, so that the engine packs it with the adapter
            weight = draft_head(self.model, self.vocab)
            self.head = Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
            self.head.weight = nn.Parameter(weight, requires_grad=False)
        self.layer = self.model.args.n_layers  # the adapter's KV: one more layer after the model's own

    extra_layers = 1

    def pack(self) -> None:
        """The adapter and the draft head on the CPU kernels' packed weights, as the model's."""
        pack_linears(self.adapter)
        pack_linears(self.head)

    # ---- the engine's hooks -----------------------------------------------------------------------------------
    def prefill(self, tokens: Tensor, step: Layout, cache: KVCache, last: Tensor) -> Tensor:
        """The prompt forward; its shallow hidden states also fill the adapter's KV cache."""
        h = self.shallow(tokens, step, cache)
        self.adapt(h, step, cache)
        h = self.model.run_layers(h, step, cache, self.exit_layer)
        return self.model.logits(h.index_select(0, last))

    def propose(self, batch: Batch, cache: KVCache) -> Proposal:
        """Each sample drafts until its own early exit, no further than pays on this machine (`batch.afford`)."""
        caps = [min(self.max_steps, c) for c in batch.caps]
        caps = batch.afford(caps, batch.rates("kangaroo"), [True] * len(caps))
        return self.run(batch, cache, [[] for _ in batch.slots], caps)

    def run(self, batch: Batch, cache: KVCache, given: list[list[int]], caps: list[int]) -> Proposal:
        """Feed each sample's last token, and any draft `given` for it (made elsewhere: the hybrid's), through the
        shallow layers and the adapter; then the samples with caps[i] > 0 draft on."""
        new = [[ctx[-1], *g] for ctx, g in zip(batch.contexts, given, strict=True)]
        starts = [cache.lengths[slot] for slot in batch.slots]
        drafts, hidden, passes = self.draft(new, batch.slots, starts, caps, cache)
        drafts = [g + d for g, d in zip(given, drafts, strict=True)]
        flat = torch.stack([row for rows in hidden for row in rows])
        return Proposal(drafts, ["kangaroo"] * len(drafts), flat, passes)

    def verify(self, tokens: Tensor, step: Layout, cache: KVCache, proposal: Proposal) -> Tensor:
        """Layers k+1..L over the shallow states the drafting kept."""
        return self.model.logits(self.model.run_layers(proposal.hidden, step, cache, self.exit_layer))

    # ---- the algorithm ----------------------------------------------------------------------------------------
    def shallow(self, tokens: Tensor, step: Layout, cache: KVCache) -> Tensor:
        """Layers 1..k on new tokens (their KV entries stay in the cache for verification); the hidden states."""
        return self.model.run_layers(self.model.embed(tokens), step, cache, 0, self.exit_layer)

    def adapt(self, h: Tensor, step: Layout, cache: KVCache) -> Tensor:
        """The adapter on shallow hidden states, writing its own KV entries at the same positions."""
        return self.adapter(h, step, self.model.rope, cache.k[self.layer], cache.v[self.layer])

    def draft(
        self, new: list[list[int]], slots: list[int], starts: list[int], caps: list[int], cache: KVCache
    ) -> tuple[list[list[int]], list[list[Tensor]], list[int]]:
        """Double early exit for a batch. Sample i feeds its `new` tokens (at positions starts[i]..) through the
        shallow layers and the adapter, then drafts one token at a time until its draft's top-1 probability falls
        below `threshold` or it has `caps[i]` drafts; each sample stops at its own step. Returns the drafts, the
        shallow hidden state of every token fed (the new ones and every draft kept), for verification, and the rows
        of each pass."""
        device = cache.k.device
        drafts: list[list[int]] = [[] for _ in new]
        hidden: list[list[Tensor]] = [[] for _ in new]
        feed, pos, live = [list(x) for x in new], list(starts), list(range(len(new)))
        passes = []
        while live:
            passes.append(len(live))
            counts = [len(feed[j]) for j in live]
            step = Layout.build([slots[j] for j in live], [pos[j] for j in live], counts).to(device)
            h = self.shallow(torch.tensor([t for j in live for t in feed[j]], device=device), step, cache)
            a = self.adapt(h, step, cache)  # the adapter's own KV entries, drafting or not
            row, last = 0, []
            for j, c in zip(live, counts, strict=True):
                hidden[j].extend(h[row : row + c])
                row += c
                last.append(row - 1)
                pos[j] += c
            want = [r for r, j in enumerate(live) if len(drafts[j]) < caps[j]]
            tokens, conf = self.greedy(a[[last[r] for r in want]]) if want else ([], [])
            going = []
            for r, token, c in zip(want, tokens, conf, strict=True):
                if c >= self.threshold:  # the second early exit: stop when the draft is unsure
                    drafts[live[r]].append(token)
                    feed[live[r]] = [token]
                    going.append(live[r])
            live = going
        return drafts, hidden, passes

    def greedy(self, a: Tensor) -> tuple[list[int], list[float]]:
        """Greedy draft token and its probability under the draft head, per row of adapter output."""
        probs = torch.softmax(self.head(a).float(), -1)
        conf, idx = probs.max(-1)
        tokens = idx if self.vocab is None else self.vocab[idx]
        return tokens.tolist(), conf.tolist()


# ---- saving and loading ------------------------------------------------------------------------------------------
def model_fingerprint(model: Transformer) -> dict:
    """What an adapter must match: the base model's shapes and a checksum of its embedding, taken at bf16 precision
    so that the same model gives the same checksum whether it runs in fp32 or bf16."""
    a = model.args
    emb = model.embed(torch.arange(64, device=model.device))
    return {
        "vocab_size": a.vocab_size,
        "dim": a.dim,
        "n_layers": a.n_layers,
        "n_heads": a.n_heads,
        "n_kv_heads": a.n_kv_heads,
        "embedding_checksum": round(float(emb[:64].to(torch.bfloat16).double().sum()), 6),
    }


def save_adapter(folder: Path, adapter: Adapter, config: dict, dtype: torch.dtype = torch.float32) -> None:
    """Writes the adapter's tensors in `dtype` (a bf16 model's adapter runs in bf16: half the file, nothing lost)
    and its config."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in adapter.state_dict().items()}
    save_file(tensors, str(folder / ADAPTER_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def adapter_folder(folder: str | Path) -> Path:
    """`folder` if it holds an adapter's two files, else a `ModelError`: checkable before any model loads."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists() or not (folder / ADAPTER_FILE).exists():
        raise ModelError(f"no Kangaroo adapter in {folder} (needs {CONFIG_FILE} and {ADAPTER_FILE})")
    return folder


def load_adapter(folder: str | Path, model: Transformer, **options) -> KangarooDrafter:
    """Load an adapter for `model`; an adapter trained for another base model, or a broken one (its config, its
    tensors, an exit layer outside the model, a draft token outside the vocabulary), is a clear `ModelError`."""
    folder = adapter_folder(folder)
    config = read_json(folder / CONFIG_FILE)
    if "base" not in config:
        raise ModelError(f"{folder / CONFIG_FILE} has no 'base' entry: not an adapter config of ours")
    mine = model_fingerprint(model)
    if config["base"] != mine:
        raise ModelError(
            f"the adapter in {folder} was trained for base model {config.get('base_model')!r} ({config['base']}), "
            f"not for this one ({mine})"
        )
    n_layers, vocab_size = model.args.n_layers, model.args.vocab_size
    exit_layer, draft_vocab = config.get("exit_layer"), config.get("draft_vocab")
    if not isinstance(exit_layer, int) or isinstance(exit_layer, bool) or not 1 <= exit_layer < n_layers:
        raise ModelError(f"{folder}: exit_layer {exit_layer!r} is not a layer in 1..{n_layers - 1} of this model")
    if draft_vocab is not None and not (
        isinstance(draft_vocab, list)
        and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in draft_vocab)
    ):
        raise ModelError(f"{folder}: draft_vocab must be a list of token ids in 0..{vocab_size - 1}")
    # checked here: a threshold of "0.4" or null loaded, and the first decode then failed the whole batch
    threshold, max_steps = config.get("threshold", 0.4), config.get("max_steps", 6)
    if not isinstance(threshold, int | float) or isinstance(threshold, bool) or not 0 <= threshold <= 1:
        raise ModelError(f"{folder}: threshold {threshold!r} is not a number in [0, 1]")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise ModelError(f"{folder}: max_steps {max_steps!r} is not a whole number >= 1")
    adapter = Adapter(model.args)
    with Checkpoint([folder / ADAPTER_FILE]) as ckpt:
        state = {name: ckpt.read(name, torch.float32) for name in ckpt.entries}
    try:
        adapter.load_state_dict(state)
    except RuntimeError as e:
        raise ModelError(f"{folder / ADAPTER_FILE} does not fit this model: {str(e)[:300]}") from None
    adapter = adapter.to(device=model.device, dtype=model.dtype).eval().requires_grad_(False)
    vocab = torch.tensor(draft_vocab, device=model.device) if draft_vocab else None
    options = {"threshold": threshold, "max_steps": max_steps, **options}
    return KangarooDrafter(model, adapter, exit_layer, vocab, **options)


SHIPPED = Path(__file__).parent / "adapters"


def default_adapter_dir(model: Transformer) -> Path:
    """The adapter shipped in the repository for this base model (found by its fingerprint), or a `ModelError`
    that says which models have one and how to train another."""
    mine, shipped = model_fingerprint(model), {}
    for config in sorted(SHIPPED.glob(f"*/{CONFIG_FILE}")):
        base = read_json(config).get("base")
        if base == mine:
            return config.parent
        shipped[config.parent.name] = base
    raise ModelError(
        f"no Kangaroo adapter is shipped for this model (shipped: {', '.join(shipped) or 'none'}); train one with "
        "`fot train-adapter --model MODEL --out DIR` and pass it as the speculative config's `adapter`"
    )
