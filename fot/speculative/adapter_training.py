"""Training a Kangaroo adapter (`train_adapter`, `fot train-adapter`): distillation, soft cross-entropy between the
adapter's draft distribution and the full model's next-token distribution (its top 64 probabilities), on text the
model itself generates from prompts made without the hub: simple word-problem prompts made here, or the caller's
(`fot train-adapter` passes the search's own, fot.trees.workload). Apart from fot.speculative.kangaroo, which the
engine imports, so that training may use the engine."""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from fot.data import NAMES, THINGS
from fot.errors import InvalidRequestError, ModelError
from fot.models import cache_dir, resolve_model
from fot.speculative.cache import KVCache, Layout
from fot.speculative.engine import Engine
from fot.speculative.kangaroo import Adapter, draft_head, model_fingerprint, save_adapter
from fot.speculative.model import Transformer
from fot.speculative.prompts import Prompt


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint, read with torch's weights-only unpickler: tensors, numbers, strings and containers
    only, so a file planted in the work folder cannot run code. Anything else is a `ModelError`."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:
        raise ModelError(f"{path} is not a training checkpoint of ours (remove it to start over): {e}") from None


# ---- data ----------------------------------------------------------------------------------------------------


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
    step = Layout.build(list(range(len(seqs))), [0] * len(seqs), lengths)
    tokens = torch.tensor([t for s in seqs for t in s])
    with torch.no_grad():
        h = model.run_layers(model.embed(tokens), step, cache, 0, exit_layer)
        probs = torch.softmax(model.logits(model.run_layers(h, step, cache, exit_layer)), -1)
        p, idx = probs.topk(top, -1)
    return {"hidden": h, "p": p, "idx": idx, "lengths": torch.tensor(lengths)}


def teacher_data(
    model: Transformer, seqs: list[list[int]], exit_layer: int, top: int, folder: Path, progress: bool,
    chunk: int = 64, batch: int = 8,
) -> list[dict[str, Tensor]]:  # fmt: skip
    """`teacher_batch` over every sequence once, kept per sequence: an epoch's shuffled batches reuse it instead
    of running the teacher again. Saved `chunk` sequences to a safetensors file as they finish, so that a stopped
    run resumes without redoing them (the pass takes a large model tens of minutes)."""
    folder.mkdir(parents=True, exist_ok=True)
    out: list[dict[str, Tensor]] = []
    bar = tqdm(total=len(seqs), desc="teacher pass", unit="answer", disable=not progress)
    for start in range(0, len(seqs), chunk):
        part = seqs[start : start + chunk]
        file = folder / f"{start}-{len(part)}.safetensors"
        if file.exists():
            t = load_file(file)
        else:
            pieces = [teacher_batch(model, part[i : i + batch], exit_layer, top) for i in range(0, len(part), batch)]
            t = {k: torch.cat([q[k] for q in pieces]) for k in pieces[0]}
            t["idx"] = t["idx"].int()  # a vocabulary index fits 32 bits: half the memory
            tmp = file.with_suffix(".tmp")
            save_file(t, tmp)
            tmp.replace(file)
        lengths = t["lengths"].tolist()
        rows = zip(*(t[k].split(lengths) for k in ("hidden", "p", "idx")), strict=True)
        out += [{"hidden": h, "p": p, "idx": i} for h, p, i in rows]
        bar.update(len(part))
    bar.close()
    return out


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Sequences of `teacher_data` as one ragged batch, the layout `adapter_loss` reads."""
    batch = {k: torch.cat([it[k] for it in items]) for k in ("hidden", "p", "idx")}
    batch["idx"] = batch["idx"].long()
    batch["lengths"] = torch.tensor([len(it["idx"]) for it in items])
    return batch


def adapter_loss(model: Transformer, adapter: Adapter, batch: dict, vocab: Tensor | None) -> tuple[Tensor, float]:
    """Soft cross-entropy of the draft distribution against the teacher's top-k probabilities (renormalised
    over the draft vocabulary) at every position; and how often the draft's top-1 is the teacher's top-1 (the
    greedy acceptance rate of a single draft token). The adapter runs in fp32 whatever the teacher's dtype."""
    a = model.args
    lengths = batch["lengths"].tolist()
    step = Layout.build(list(range(len(lengths))), [0] * len(lengths), lengths)
    k = torch.zeros(len(lengths), a.n_kv_heads, max(lengths), a.head_dim)
    v = torch.zeros_like(k)
    out = adapter(batch["hidden"].float(), step, model.rope, k, v)
    logp = torch.log_softmax(F.linear(out, draft_head(model, vocab).float()), -1)
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


def generate_data(
    engine: Engine, chats: list[Prompt], path: Path, new_tokens: int, seed: int, progress: bool, chunk: int = 64
) -> list[list[int]]:
    """The model's own answers to `chats` (prompt + answer token ids each), generated `chunk` prompts at a time
    and appended to `path` (one JSON list per line) as each chunk finishes, so that a stopped run resumes where it
    was: hours of generation for a large model are not lost to an interruption."""
    seqs: list[list[int]] = []
    if path.exists():
        text = path.read_text()
        lines = text.splitlines()[: None if text.endswith("\n") else -1]  # a torn last line is dropped
        seqs = [json.loads(line) for line in lines][: len(chats)]
        if len(seqs) < len(chats):  # only whole chunks are kept: the last one is generated again
            seqs = seqs[: len(seqs) // chunk * chunk]
        if len(seqs) != len(lines):
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(s) + "\n" for s in seqs))
            tmp.replace(path)
    bar = tqdm(total=len(chats), initial=len(seqs), desc="generate data", unit="answer", disable=not progress)
    with path.open("a") as f:
        for start in range(len(seqs), len(chats), chunk):
            part = chats[start : start + chunk]
            params = [
                {"max_tokens": new_tokens, "temperature": 0.7, "seed": seed + start + i} for i in range(len(part))
            ]
            gens = engine.generate(part, params)
            new = [engine.tokenize(c) + g.token_ids for c, g in zip(part, gens, strict=True)]
            f.writelines(json.dumps(s) + "\n" for s in new)
            f.flush()
            seqs += new
            bar.update(len(part))
    bar.close()
    return seqs


def check_options(**options: float | None) -> None:
    """Bad training options are refused before any model loads or any data is generated."""
    least = {"prompts": 10, "new_tokens": 1, "epochs": 1, "batch_size": 1, "top": 1, "exit_layer": 1}
    for name, low in least.items():
        value = options.get(name)
        if value is not None and (not isinstance(value, int) or value < low):
            raise InvalidRequestError(f"{name} must be an integer >= {low}, got {value!r}")
    lr = options.get("lr")
    if lr is not None and not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise InvalidRequestError(f"lr must be a positive number, got {lr!r}")
    vocab = options.get("draft_vocab")
    if vocab is not None and (not isinstance(vocab, int) or vocab < 1):
        raise InvalidRequestError(
            f"draft_vocab must be a positive integer or None (the full vocabulary), got {vocab!r}"
        )


def train_adapter(
    model_name: str = "default",
    out: str | Path | None = None,
    *,
    exit_layer: int = 4,
    prompts: int = 160,
    prompt_set: Callable[[int, int], list[Prompt]] | None = None,
    new_tokens: int = 128,
    epochs: int = 8,
    batch_size: int = 8,
    lr: float = 1e-3,
    draft_vocab: int | None = 8192,
    top: int = 64,
    seed: int = 0,
    dtype: str = "float32",
    resume: bool = True,
    progress: bool = True,
) -> Path:
    """Generate data with the model itself, then distil the adapter; checkpoints every epoch and resumes from the
    last one. Writes `adapter.safetensors` and `adapter_config.json` (naming the base model and exit layer).
    `prompt_set(n, seed)` makes the prompts (default: `training_prompts`); `dtype` is the teacher's, which also
    generates the data (bf16 is much faster on CPUs with native bf16; the adapter always trains in fp32, and is
    stored in the teacher's precision)."""
    check_options(
        prompts=prompts, new_tokens=new_tokens, epochs=epochs, batch_size=batch_size, top=top, lr=lr,
        draft_vocab=draft_vocab, exit_layer=exit_layer,
    )  # fmt: skip
    torch.manual_seed(seed)
    engine = Engine.from_pretrained(model_name, dtype=dtype, max_batch=32, speculative="prompt_lookup", seed=seed)
    model = engine.model
    if not 1 <= exit_layer < model.args.n_layers:
        raise InvalidRequestError(f"exit_layer must be in 1..{model.args.n_layers - 1}")
    out = Path(out) if out else cache_dir() / "adapters" / Path(str(resolve_model(model_name))).name
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    kind = "" if prompt_set is None else f"{prompt_set.__name__}-"
    precision = "" if model.dtype == torch.float32 else f"{str(model.dtype).removeprefix('torch.')}-"
    base = model_fingerprint(model)
    # named by the model too: another model's answers and hidden states in the same folder are not this one's
    tag = hashlib.sha1(json.dumps(base, sort_keys=True).encode()).hexdigest()[:8]
    data_file = work / f"data-{tag}-{kind}{precision}{seed}-{prompts}-{new_tokens}.jsonl"
    # what a checkpoint must share with this call to be resumed: the data, the model and every training option
    run = {
        "data": data_file.name, "base": base, "exit_layer": exit_layer, "seed": seed, "lr": lr,
        "batch_size": batch_size, "top": top, "draft_vocab": draft_vocab,
    }  # fmt: skip
    state, ckpt = None, work / "checkpoint.pt"
    if resume and ckpt.exists():
        state = load_checkpoint(ckpt)
        if state.get("run") != run:
            warnings.warn(f"{ckpt} is from a training run with other options; starting over", stacklevel=2)
            state = None
        elif state["epoch"] + 1 > epochs:
            raise InvalidRequestError(
                f"{ckpt} has already trained {state['epoch'] + 1} epochs, more than epochs={epochs}: "
                "ask for at least as many, or pass resume=False to start over"
            )
    chats = (prompt_set or training_prompts)(prompts, seed)
    seqs = generate_data(engine, chats, data_file, new_tokens, seed, progress)
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
    start_epoch, final_loss = 0, None
    if state is not None:
        adapter.load_state_dict(state["adapter"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start_epoch, final_loss = state["epoch"] + 1, state["final_loss"]
    teacher = teacher_data(
        model, seqs, exit_layer, top, work / f"teacher-{data_file.stem}-{exit_layer}-{top}", progress
    )
    bar = tqdm(total=total, initial=start_epoch * batches_per_epoch, desc="train adapter", disable=not progress)
    for epoch in range(start_epoch, epochs):
        random.Random(seed + epoch).shuffle(order)
        losses = []
        for b in range(batches_per_epoch):
            ids = order[b * batch_size : (b + 1) * batch_size]
            loss, _ = adapter_loss(model, adapter, collate([teacher[i] for i in ids]), vocab)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(adapter.parameters(), 0.5)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{sum(losses) / len(losses):.3f}")
        final_loss = round(sum(losses) / len(losses), 4)
        state = {"adapter": adapter.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
        torch.save({**state, "epoch": epoch, "final_loss": final_loss, "run": run}, ckpt)
    bar.close()
    held_loss = held_top1 = positions = 0.0
    with torch.no_grad():  # batch by batch, weighted by positions: all of the held-out logits at once are GBs
        for b in range(len(seqs) - held, len(seqs), batch_size):
            part = collate(teacher[b : b + batch_size])
            n = len(part["idx"])
            loss, agree = adapter_loss(model, adapter, part, vocab)
            held_loss, held_top1, positions = held_loss + loss.item() * n, held_top1 + agree * n, positions + n
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
            "final_loss": final_loss,
            "holdout_loss": round(held_loss / positions, 4),
            "holdout_top1_agreement": round(held_top1 / positions, 4),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    }
    save_adapter(out, adapter.eval(), config, model.dtype)
    return out
