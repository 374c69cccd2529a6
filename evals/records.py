"""A run's results file: one `Record` per problem, one JSON line each, appended and fsynced as each problem finishes;
read back by the runner (to resume) and by the report."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

from evals.data import DataError, Problem
from fot.errors import FotError
from fot.files import locked


class Record(BaseModel):
    """One problem's result. Counters are the solve's own, except forward passes and drafts, which are the
    backend's while the problem was in flight (shared with the other problems in flight when concurrency > 1)."""

    id: str
    benchmark: str
    run: str
    method: str
    trees: int
    model: str
    backend: str
    device: str = "cpu"  # of the native backend (records written before this field was added ran on the CPU)
    dtype: str = "auto"
    speculative: str
    seed: int
    level: str | None
    answer: str | None
    gold: str
    correct: bool
    votes: dict[str, int]
    decision: str
    tokens: int
    prompt_tokens: int
    requests: int
    forward_passes: int
    draft_tokens: int
    accepted_tokens: int
    tokens_saved: int
    corrections: int
    seconds: float
    concurrency: int
    # the build of our CPU kernels that ran the native engine (`kernels.running()`; None: not our kernels, or a
    # record from before this field): machines round bf16 sums differently, so the report names a run made on two
    kernels: str | None = None
    total: int | None = None  # problems the run was asked for (absent from records written before this field)
    code_checks_on: bool = False  # the search ran the answers' code (records from before the checks: it did not)
    code_checks: int = 0  # code blocks run by the program-aided checks
    code_repairs: int = 0
    arithmetic_checks_on: bool = False  # the search recomputed the prose's arithmetic statements
    arithmetic_checks: int = 0  # statements recomputed
    arithmetic_repairs: int = 0
    program_trees: int = 0  # trees asked to answer with a program
    fallback_samples: int = 1  # chains of thought that voted with the trees where they tied (fot)
    # the budget the run was given (None: records from before these fields; rollouts: methods without rollouts)
    max_tokens: int | None = None  # per answer
    rollouts: int | None = None  # MCTSr rollouts per tree (fot and mctsr on math)
    search_version: int = 1  # fot.forest.SEARCH_VERSIONS[task] of the code that made it (records before the field: 1)
    gym_correct: bool | None = None  # GSM-Symbolic: reasoning-gym's own verdict, the cross-check of `correct`
    # each tree's (sc: each sample's) answer in tree order, and whether it is right: what the decision chose from
    # (None in records from before these fields)
    tree_answers: list[str | None] | None = None
    tree_correct: list[bool] | None = None
    # each tree's answered nodes' answers, in the order the search made them: what other decision rules (a vote over
    # every node, or over the first answers only) would choose from, so they can be compared on a run's records
    node_answers: list[list[str]] | None = None


def read_records(path: Path, repair: bool = False) -> list[Record]:
    """The finished records of a run file, one per problem (a duplicate, from a line written twice, is dropped
    and said so). An unfinished last line is left out: it is being written, or was torn by a crash. Only the
    run's writer, holding its lock, passes `repair` to cut a torn line off the file; a reader (the report) could
    otherwise cut a line that another process is finishing. Any other bad line is an error, since it means the
    file is not ours."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        cut = raw.rfind(b"\n") + 1
        if repair:
            print(f"evals: {path.name}: dropping a torn last line (an interrupted write)", file=sys.stderr)
            with open(path, "r+b") as f:
                f.truncate(cut)
        raw = raw[:cut]
    records: dict[str, Record] = {}
    try:
        text = raw.decode()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not a results file of ours (not UTF-8: {e})") from None
    duplicates = 0
    for number, line in enumerate(text.split("\n")[:-1], 1):  # not splitlines: U+2028 is in JSON strings
        try:
            record = Record.model_validate_json(line)
        except ValueError as e:
            raise DataError(f"{path}:{number} is not a result record: {str(e)[:200]}") from None
        duplicates += record.id in records
        records.setdefault(record.id, record)
    if duplicates:
        print(f"evals: {path.name}: {duplicates} duplicate records ignored (the first of each kept)", file=sys.stderr)
    return list(records.values())


@contextmanager
def writer_lock(path: Path):
    """The right to append to run file `path`: one process at a time (`fot.files.locked`, refused at once)."""

    def held(lock: Path) -> FotError:
        return FotError(f"another process is running {path.name} (it holds {lock}); wait for it")

    with locked(path.with_name(path.name + ".lock"), held=held):
        yield


def check_records(path: Path, records: list[Record], problems: list[Problem]) -> None:
    """Records whose problem is in the data must have that problem's gold answer: else the data changed under
    the run, and its records are not results of this data."""
    gold = {p.id: p.gold for p in problems}
    for r in records:
        if r.id in gold and r.gold != gold[r.id]:
            raise DataError(
                f"{path}: the record of {r.id} has gold {r.gold!r} where the data says {gold[r.id]!r}: "
                "the data changed under this run; use another --out or remove the file"
            )


def append(path: Path, record: Record) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(record.model_dump_json() + "\n")
        f.flush()
        os.fsync(f.fileno())
