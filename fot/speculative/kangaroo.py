"""Kangaroo (Liu et al., 2404.18911): lossless self-speculative decoding by double early exit, for a batch.

The draft model is the model itself, cut short: its first `exit_layer` layers, then a small trained **adapter**
(one attention layer with its own KV cache, norm + residual, a final norm; no MLP), then the model's own frozen
LM head, optionally restricted to the most frequent tokens (`draft_vocab`) because the head dominates the cost of
a draft step in a small model with a large vocabulary.

Double early exit: (1) drafts come from the shallow layers; (2) a sample stops drafting as soon as its draft's
top-1 probability falls below `threshold`, or after `max_steps`. In a batch every sample stops at its own step.
Verification reuses the shallow work: the layer-1..k KV entries and hidden states computed while drafting are
kept, and only layers k+1..L run on them (the engine's `decode`). The adapter's KV cache lives in the engine's
cache as one extra layer, so it grows, drops rejected entries and compacts with everything else.

Training (`train_adapter`, `fot train-adapter`): distillation, soft cross-entropy between the adapter's draft
distribution and the full model's next-token distribution (its top 64 probabilities), on text the model itself
generates from prompts made here (no hub).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from fot.errors import InvalidRequestError, ModelError
from fot.models import read_json
from fot.speculative.cache import KVCache, Step
from fot.speculative.model import Attention, Linear, ModelArgs, RMSNorm, Transformer
from fot.speculative.weights import Checkpoint

ADAPTER_FILE, CONFIG_FILE = "adapter.safetensors", "adapter_config.json"


class Adapter(nn.Module):
    """One attention layer with norm + residual, then a final norm: shallow hidden state -> draft hidden state."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, h: Tensor, step: Step, rope: tuple[Tensor, Tensor], k: Tensor, v: Tensor) -> Tensor:
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

    def shallow(self, tokens: Tensor, step: Step, cache: KVCache) -> Tensor:
        """Layers 1..k on new tokens (their KV entries stay in the cache for verification); the hidden states."""
        return self.model.run_layers(self.model.embed(tokens), step, cache, 0, self.exit_layer)

    def adapt(self, h: Tensor, step: Step, cache: KVCache) -> Tensor:
        """The adapter on shallow hidden states, writing its own KV entries at the same positions."""
        return self.adapter(h, step, self.model.rope, cache.k[self.layer], cache.v[self.layer])

    def draft(
        self, new: list[list[int]], slots: list[int], starts: list[int], caps: list[int], cache: KVCache
    ) -> tuple[list[list[int]], list[list[Tensor]]]:
        """Double early exit for a batch. Sample i feeds its `new` tokens (at positions starts[i]..) through the
        shallow layers and the adapter, then drafts one token at a time until its draft's top-1 probability falls
        below `threshold` or it has `caps[i]` drafts; each sample stops at its own step. Returns the drafts and the
        shallow hidden state of every token fed (the new ones and every draft kept), for verification."""
        device = cache.k.device
        drafts: list[list[int]] = [[] for _ in new]
        hidden: list[list[Tensor]] = [[] for _ in new]
        feed, pos, live = [list(x) for x in new], list(starts), list(range(len(new)))
        while live:
            counts = [len(feed[j]) for j in live]
            step = Step.build([slots[j] for j in live], [pos[j] for j in live], counts).to(device)
            h = self.shallow(torch.tensor([t for j in live for t in feed[j]], device=device), step, cache)
            a = self.adapt(h, step, cache)  # the adapter's own KV entries, drafting or not
            row, last = 0, []
            for j, c in zip(live, counts, strict=True):
                hidden[j].extend(h[row : row + c])
                row += c
                last.append(row - 1)
                pos[j] += c
            want = [r for r, j in enumerate(live) if len(drafts[j]) < caps[j]]
            tokens, conf = self.propose(a[[last[r] for r in want]]) if want else ([], [])
            going = []
            for r, token, c in zip(want, tokens, conf, strict=True):
                if c >= self.threshold:  # the second early exit: stop when the draft is unsure
                    drafts[live[r]].append(token)
                    feed[live[r]] = [token]
                    going.append(live[r])
            live = going
        return drafts, hidden

    def propose(self, a: Tensor) -> tuple[list[int], list[float]]:
        """Greedy draft token and its probability under the draft head, per row of adapter output."""
        probs = torch.softmax(self.head(a).float(), -1)
        conf, idx = probs.max(-1)
        tokens = idx if self.vocab is None else self.vocab[idx]
        return tokens.tolist(), conf.tolist()


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint, read with torch's weights-only unpickler: tensors, numbers, strings and containers
    only, so a file planted in the work folder cannot run code. Anything else is a `ModelError`."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:
        raise ModelError(f"{path} is not a training checkpoint of ours (remove it to start over): {e}") from None


# ---- saving and loading ------------------------------------------------------------------------------------------
def model_fingerprint(model: Transformer) -> dict:
    """What an adapter must match: the base model's shapes and a checksum of its embedding, taken at bf16 precision
    so that the same model gives the same checksum whether it runs in fp32 or bf16."""
    a = model.args
    emb = model.embed(torch.arange(64))
    return {
        "vocab_size": a.vocab_size,
        "dim": a.dim,
        "n_layers": a.n_layers,
        "n_heads": a.n_heads,
        "n_kv_heads": a.n_kv_heads,
        "embedding_checksum": round(float(emb[:64].to(torch.bfloat16).double().sum()), 6),
    }


def save_adapter(folder: Path, adapter: Adapter, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in adapter.state_dict().items()}, str(folder / ADAPTER_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_adapter(folder: str | Path, model: Transformer, **options) -> KangarooDrafter:
    """Load an adapter for `model`; an adapter trained for another base model, or a broken one (its config, its
    tensors, an exit layer outside the model, a draft token outside the vocabulary), is a clear `ModelError`."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists() or not (folder / ADAPTER_FILE).exists():
        raise ModelError(f"no Kangaroo adapter in {folder} (needs {CONFIG_FILE} and {ADAPTER_FILE})")
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
    adapter = Adapter(model.args)
    with Checkpoint([folder / ADAPTER_FILE]) as ckpt:
        state = {name: ckpt.read(name, torch.float32) for name in ckpt.entries}
    try:
        adapter.load_state_dict(state)
    except RuntimeError as e:
        raise ModelError(f"{folder / ADAPTER_FILE} does not fit this model: {str(e)[:300]}") from None
    adapter = adapter.to(device=model.device, dtype=model.dtype).eval().requires_grad_(False)
    vocab = torch.tensor(draft_vocab, device=model.device) if draft_vocab else None
    options = {"threshold": config.get("threshold", 0.4), "max_steps": config.get("max_steps", 6), **options}
    return KangarooDrafter(model, adapter, exit_layer, vocab, **options)


def default_adapter_dir() -> Path:
    """The adapter shipped in the repository for the embedded default model."""
    return Path(__file__).parent / "adapters" / "smollm2-135m"


# ---- training ----------------------------------------------------------------------------------------------------
NAMES = ["Tom", "Ana", "Ravi", "Mia", "Omar", "Lena", "Kofi", "Yuki", "Sara", "Ben"]
THINGS = ["apples", "books", "marbles", "pencils", "cookies", "stamps", "shells", "cards", "coins", "eggs"]


def training_prompts(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Prompts like the search's: word problems to solve, answers to critique, refine and grade (made here)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        a, b, c = rng.randint(2, 12), rng.randint(3, 20), rng.randint(1, 9)
        problem = f"{name} has {a} bags with {b} {thing} in each bag and gives away {c}. How many {thing} are left?"
        answer = f"{name} has {a} * {b} = {a * b} {thing}. After giving away {c}: {a * b} - {c} = {a * b - c}."
        kind = i % 4
        if kind == 0:
            text = f"Solve the problem step by step, then finish with 'The answer is X.'\n\nProblem: {problem}"
        elif kind == 1:
            text = f"Problem: {problem}\nAnswer: {answer}\n\nCritique this answer strictly."
        elif kind == 2:
            text = f"Problem: {problem}\nPrevious answer: {answer}\n\nWrite a better answer step by step."
        else:
            text = f"Problem: {problem}\nAnswer: {answer}\n\nGrade the answer from 0 to 100. Reply with 'Score: N'."
        out.append([{"role": "user", "content": text}])
    return out


def teacher_batch(model: Transformer, seqs: list[list[int]], exit_layer: int, top: int) -> dict[str, Tensor]:
    """One no-grad pass of the full model over whole sequences: the shallow hidden states (the adapter's input)
    and the full model's top-`top` next-token probabilities (its distillation target) at every position."""
    a = model.args
    lengths = [len(s) for s in seqs]
    cache = KVCache(a.n_layers, len(seqs), a.n_kv_heads, max(lengths), a.head_dim, model.dtype)
    step = Step.build(list(range(len(seqs))), [0] * len(seqs), lengths)
    tokens = torch.tensor([t for s in seqs for t in s])
    with torch.no_grad():
        h = model.run_layers(model.embed(tokens), step, cache, 0, exit_layer)
        probs = torch.softmax(model.logits(model.run_layers(h, step, cache, exit_layer)), -1)
        p, idx = probs.topk(top, -1)
    return {"hidden": h, "p": p, "idx": idx, "lengths": torch.tensor(lengths)}


def adapter_loss(model: Transformer, adapter: Adapter, batch: dict, vocab: Tensor | None) -> tuple[Tensor, float]:
    """Soft cross-entropy of the draft distribution against the teacher's top-k probabilities (renormalised
    over the draft vocabulary) at every position; and how often the draft's top-1 is the teacher's top-1 (the
    greedy acceptance rate of a single draft token)."""
    a = model.args
    lengths = batch["lengths"].tolist()
    step = Step.build(list(range(len(lengths))), [0] * len(lengths), lengths)
    k = torch.zeros(len(lengths), a.n_kv_heads, max(lengths), a.head_dim, dtype=model.dtype)
    v = torch.zeros_like(k)
    out = adapter(batch["hidden"], step, model.rope, k, v)
    logp = torch.log_softmax(F.linear(out, draft_head(model, vocab)).float(), -1)
    idx, p = batch["idx"], batch["p"]
    top1 = logp.argmax(-1) if vocab is None else vocab[logp.argmax(-1)]
    agree = (top1 == idx[:, 0]).float().mean().item()
    if vocab is not None:  # teacher tokens outside the draft vocabulary cannot be drafted: drop them
        where = torch.full((a.vocab_size,), -1, dtype=torch.long)
        where[vocab] = torch.arange(len(vocab))
        idx = where[idx]
        p = p * (idx >= 0)
        idx = idx.clamp(min=0)
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-9)
    return -(p * logp.gather(-1, idx)).sum(-1).mean(), agree


def train_adapter(
    model_name: str = "default",
    out: str | Path | None = None,
    *,
    exit_layer: int = 4,
    prompts: int = 160,
    new_tokens: int = 128,
    epochs: int = 8,
    batch_size: int = 8,
    lr: float = 1e-3,
    draft_vocab: int | None = 8192,
    top: int = 64,
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
) -> Path:
    """Generate data with the model itself, then distil the adapter; checkpoints every epoch and resumes from the
    last one. Writes `adapter.safetensors` and `adapter_config.json` (naming the base model and exit layer)."""
    from fot.models import cache_dir, resolve_model
    from fot.speculative.engine import Engine

    torch.manual_seed(seed)
    # the teacher in fp32 (the adapter trains in fp32 and is cast to the model's dtype when loaded)
    engine = Engine.from_pretrained(model_name, dtype="float32", max_batch=32, speculative="prompt_lookup", seed=seed)
    model = engine.model
    if not 1 <= exit_layer < model.args.n_layers:
        raise InvalidRequestError(f"exit_layer must be in 1..{model.args.n_layers - 1}")
    out = Path(out) if out else cache_dir() / "adapters" / Path(str(resolve_model(model_name))).name
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    data_file = work / f"data-{seed}-{prompts}-{new_tokens}.json"
    if data_file.exists():
        seqs = json.loads(data_file.read_text())
    else:
        chats = training_prompts(prompts, seed)
        params = {"max_tokens": new_tokens, "temperature": 0.7, "seed": seed}
        gens = engine.generate(chats, [dict(params, seed=seed + i) for i in range(len(chats))], progress=progress)
        seqs = [engine.tokenize(c) + g.token_ids for c, g in zip(chats, gens, strict=True)]
        data_file.write_text(json.dumps(seqs))
    counts = torch.bincount(torch.tensor([t for s in seqs for t in s]), minlength=model.args.vocab_size)
    vocab = None
    if draft_vocab and draft_vocab < model.args.vocab_size:
        vocab = torch.sort(counts.argsort(descending=True)[:draft_vocab]).values

    adapter = Adapter(model.args)
    with torch.no_grad():  # start from the exit layer's own attention and the final norm
        layer = model.layers[exit_layer]
        adapter.attention_norm.weight.copy_(layer.attention_norm.weight)
        attention = layer.attention
        adapter.attention.load_state_dict(
            {
                "wqkv.weight": attention.wqkv.rows(),
                "wo.weight": attention.wo.rows(),
                **{
                    f"{n}.bias": getattr(attention, n).bias
                    for n in ("wqkv", "wo")
                    if getattr(attention, n).bias is not None
                },
            }
        )
        adapter.norm.weight.copy_(model.norm.weight)
    adapter = adapter.float().train()
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    held = max(1, len(seqs) // 10)  # the last 10% of the sequences measure the adapter, never train it
    order = list(range(len(seqs) - held))
    batches_per_epoch = math.ceil(len(order) / batch_size)
    total = epochs * batches_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, total // 20)) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    start_epoch, ckpt = 0, work / "checkpoint.pt"
    if resume and ckpt.exists():
        state = load_checkpoint(ckpt)
        if state["exit_layer"] == exit_layer and state["seed"] == seed:
            adapter.load_state_dict(state["adapter"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            start_epoch = state["epoch"] + 1
    teacher = {}
    bar = tqdm(total=total, initial=start_epoch * batches_per_epoch, desc="train adapter", disable=not progress)
    losses = []
    for epoch in range(start_epoch, epochs):
        random.Random(seed + epoch).shuffle(order)
        losses = []
        for b in range(batches_per_epoch):
            ids = tuple(sorted(order[b * batch_size : (b + 1) * batch_size]))
            if ids not in teacher:
                teacher[ids] = teacher_batch(model, [seqs[i] for i in ids], exit_layer, top)
            loss, _ = adapter_loss(model, adapter, teacher[ids], vocab)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(adapter.parameters(), 0.5)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{sum(losses) / len(losses):.3f}")
        state = {"adapter": adapter.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
        torch.save({**state, "epoch": epoch, "exit_layer": exit_layer, "seed": seed}, ckpt)
    bar.close()
    with torch.no_grad():
        holdout = teacher_batch(model, seqs[-held:], exit_layer, top)
        held_loss, held_top1 = adapter_loss(model, adapter, holdout, vocab)
    config = {
        "base_model": model_name,
        "base": model_fingerprint(model),
        "exit_layer": exit_layer,
        "draft_vocab": vocab.tolist() if vocab is not None else None,
        "threshold": 0.4,
        "max_steps": 6,
        "training": {
            "prompts": prompts,
            "new_tokens": new_tokens,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "top": top,
            "seed": seed,
            "final_loss": round(sum(losses) / max(len(losses), 1), 4),
            "holdout_loss": round(held_loss.item(), 4),
            "holdout_top1_agreement": round(held_top1, 4),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    }
    save_adapter(out, adapter.eval(), config)
    return out
