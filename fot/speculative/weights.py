"""Read a safetensors checkpoint a few rows at a time, so that loading never holds a second copy of the model.

`safe_open(...).get_tensor` materialises every tensor in the checkpoint's dtype (fp32 for the embedded models)
and keeps the file's pages mapped while it is open: a 1.5B model loaded into bf16 that way peaks at three times its
weights. Here each read is `pread` into a small buffer, cast to the model's dtype at once, and the file is never
mapped. The header is JSON, checked before use: known dtypes, shapes that match their byte ranges, ranges inside
the file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor

from fot.errors import ModelError

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
MAX_HEADER = 100 << 20  # the format's own limit on the JSON header


class Checkpoint:
    """The tensors of one or more safetensors files, by name: shapes, and rows read on demand."""

    def __init__(self, files: list[Path]):
        self.entries: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}  # name -> (fd, offset, ...)
        self.fds: list[int] = []
        try:
            for file in files:
                self._index(file)
        except BaseException:
            self.close()
            raise

    def _index(self, file: Path) -> None:
        fd = os.open(file, os.O_RDONLY)
        self.fds.append(fd)
        size = os.fstat(fd).st_size
        raw = os.pread(fd, 8, 0)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 0 < n <= min(MAX_HEADER, size - 8):
            raise ModelError(f"{file}: not a safetensors file (header length {n})")
        try:
            header = json.loads(os.pread(fd, n, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{file}: unreadable safetensors header: {e}") from None
        if not isinstance(header, dict):  # valid JSON, but not the name -> entry object the format is
            raise ModelError(f"{file}: the safetensors header is a JSON {type(header).__name__}, not an object")
        base = 8 + n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = DTYPES[meta["dtype"]]
                shape = tuple(int(d) for d in meta["shape"])
                start, end = (int(o) for o in meta["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ModelError(f"{file}: tensor {name!r} has an unsupported or malformed entry") from None
            nbytes = math.prod(shape) * dtype.itemsize
            if min(shape, default=0) < 0 or end - start != nbytes or start < 0 or base + end > size:
                raise ModelError(f"{file}: tensor {name!r}: its byte range does not match its shape or the file")
            self.entries[name] = (fd, base + start, dtype, shape)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _entry(self, name: str) -> tuple[int, int, torch.dtype, tuple[int, ...]]:
        if name not in self.entries:
            raise ModelError(f"checkpoint is missing weight {name}")
        return self.entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[3]

    def read(self, name: str, dtype: torch.dtype, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows [start, stop) of tensor `name` (along its first axis; all of a 0-d or 1-d one), cast to `dtype`."""
        fd, offset, source, shape = self._entry(name)
        rows = shape[0] if shape else 1
        stop = rows if stop is None else stop
        row_bytes = math.prod(shape[1:]) * source.itemsize
        buf = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < len(view):  # pread may return less than asked
            got = os.preadv(fd, [view[done:]], offset + start * row_bytes + done)
            if got <= 0:
                raise ModelError(f"checkpoint tensor {name}: the file ended early")
            done += got
        out = buf.view(source).view((stop - start, *shape[1:]) if shape else ())
        return out.to(dtype)
