"""Evaluation data: GSM8K, MATH-500, Game of 24 (ranks 901-1000) and a generated arithmetic set.

GSM8K and MATH-500 load through the `datasets` library: from the hub where the machine is online, or from a local
file or folder (`--data`, jsonl / json / parquet) in the hub's schema. The Game-of-24 puzzles ship in the wheel of
`tree-of-thoughts-llm` (MIT), which is downloaded once with `pip download --no-deps`, never installed, and its CSV
kept in the project cache. Gold answers live only here and in the runner's scoring: the search never sees them.
"""

from __future__ import annotations

import csv
import io
import random
import re
import sys
import tempfile
import zipfile
from functools import cache
from pathlib import Path

from pydantic import BaseModel

from fot.errors import FotError, InvalidRequestError, ModelError
from fot.models import cache_dir, download_wheel
from fot.tasks import get_task
from fot.tasks.game24 import check_expression, parse_numbers
from fot.tasks.game24 import solve as solve24


class DataError(FotError):
    """A data set that cannot be loaded: missing, unreadable, or not in the expected schema."""


# each benchmark's task, which its problems carry and whose search version names its runs
TASK_OF = {"gsm8k": "math", "math": "math", "game24": "game24", "arithmetic": "math", "gsm_symbolic": "math"}


class Problem(BaseModel):
    id: str
    question: str
    gold: str  # math: the answer; game24: one valid expression (scoring re-checks the model's own expression)
    task: str  # "math" | "game24"
    level: str | None = None  # difficulty / subject where the data set has one


# ---- GSM8K and MATH-500 through `datasets` -------------------------------------------------------------------------
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_records(hub: str, config: str | None, split: str, data: str | Path | None) -> list[dict]:
    """Rows of a hub data set, or of the local file/folder `data` in the same schema."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if data is None:
        try:
            return list(datasets.load_dataset(hub, config, split=split))
        except Exception as e:  # offline, unknown name, ... : say what to do instead
            raise DataError(
                f"could not load {hub!r} from the Hugging Face hub ({type(e).__name__}: {str(e)[:200]}). Offline "
                f"(the evals set HF_HUB_OFFLINE=1 unless you set it to 0)? Pass a local copy with --data FILE_OR_FOLDER"
            ) from None
    path = Path(data).expanduser()
    files = sorted(p for p in path.rglob("*") if p.suffix in FORMATS) if path.is_dir() else [path]
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not files:
        raise DataError(f"{path} holds no {'/'.join(FORMATS)} files")
    if path.is_dir():  # a hub download holds every split (and config): take the split's files, of one folder
        named = [f.relative_to(path).as_posix() for f in files]  # the split as a whole name part, else inside one
        files = (
            [f for f, n in zip(files, named, strict=True) if split in re.split(r"[/._-]", n)]
            or [f for f, n in zip(files, named, strict=True) if split in re.sub(r".*/", "", n)]
            or files
        )
        folders = sorted({str(f.parent.relative_to(path)) for f in files})
        if len(folders) > 1:
            raise DataError(f"{path} holds {split} data in several folders ({', '.join(folders)}): pass one of them")
    kinds = {FORMATS.get(f.suffix) for f in files}
    if None in kinds or len(kinds) > 1:
        raise DataError(f"{path}: use one of the formats {', '.join(FORMATS)} (got {', '.join(f.name for f in files)})")
    try:
        return list(datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train"))
    except Exception as e:
        raise DataError(f"could not read {path}: {type(e).__name__}: {str(e)[:300]}") from None


def require_fields(rows: list[dict], fields: tuple[str, ...], what: str) -> None:
    if not rows:
        raise DataError(f"{what}: the data set is empty")
    for i, row in enumerate(rows):
        missing = [f for f in fields if not isinstance(row.get(f), str) or not row[f].strip()]
        if missing:
            raise DataError(f"{what}: row {i} lacks the text field(s) {missing}; expected fields {list(fields)}")


def gsm8k_gold(answer: str) -> str:
    """The number after GSM8K's '####' marker, without thousands separators."""
    if "####" not in answer:
        raise DataError(f"GSM8K answer without '####': {answer[-80:]!r}")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def load_gsm8k(data: str | Path | None = None) -> list[Problem]:
    rows = load_records("openai/gsm8k", "main", "test", data)
    require_fields(rows, ("question", "answer"), "GSM8K")
    return [
        Problem(id=f"gsm8k-{i}", question=r["question"], gold=gsm8k_gold(r["answer"]), task="math")
        for i, r in enumerate(rows)
    ]


def load_math500(data: str | Path | None = None) -> list[Problem]:
    rows = load_records("HuggingFaceH4/MATH-500", None, "test", data)
    require_fields(rows, ("problem", "answer"), "MATH-500")
    return [
        Problem(
            id=r.get("unique_id") or f"math-{i}",
            question=r["problem"],
            gold=r["answer"],
            task="math",
            level=str(r["level"]) if r.get("level") is not None else None,
        )
        for i, r in enumerate(rows)
    ]


# ---- Game of 24 ----------------------------------------------------------------------------------------------------
GAME24_WHEEL = "tree-of-thoughts-llm==0.1.0"
GAME24_SHA256 = "54405a3c4d07e9a86af064ed96ea3f4ee38197d286a4b5ec14f2a14ea7ba0049"
GAME24_MEMBER = "tot/data/24/24.csv"
GAME24_PUZZLES = 1362


def game24_csv() -> Path:
    """The 1362 puzzles of the ToT paper, taken once out of the `tree-of-thoughts-llm` wheel into the cache."""
    target = cache_dir() / "data" / "24.csv"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"fot: downloading {GAME24_WHEEL} (wheel only, not installed) for its Game-of-24 puzzles ...", file=sys.stderr
    )
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            wheel = download_wheel(GAME24_WHEEL, Path(tmp), GAME24_SHA256)
        except ModelError as e:
            raise DataError(f"could not download {GAME24_WHEEL}: {e}; or pass --data 24.csv") from None
        part = Path(tmp) / "24.csv"
        part.write_bytes(zipfile.ZipFile(wheel).read(GAME24_MEMBER))
        part.rename(target)
    return target


def parse_ranks(ranks: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", ranks)
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise DataError(f"--ranks must look like 901-1000, got {ranks!r}")
    return int(m[1]), int(m[2])


def load_game24(data: str | Path | None = None, ranks: str = "901-1000") -> list[Problem]:
    """Puzzles ranked `ranks` by human solve time (901-1000: the hard set of the ToT and FoT papers)."""
    path = Path(data).expanduser() if data else game24_csv()
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"could not read {path} as CSV: {e}") from None
    if not rows or not {"Rank", "Puzzles"} <= set(rows[0]):
        raise DataError(f"{path}: expected the columns Rank and Puzzles of tree-of-thoughts' 24.csv")
    lo, hi = parse_ranks(ranks)
    problems = []
    for row in rows:
        try:
            rank, numbers = int(row["Rank"]), [int(x) for x in row["Puzzles"].split()]
        except (TypeError, ValueError):
            raise DataError(f"{path}: bad row {str(row)[:200]}") from None
        if lo <= rank <= hi:
            try:  # the task's own rules, before the exhaustive solver (8 numbers hung it) and before any model
                numbers = list(parse_numbers(" ".join(map(str, numbers))))
            except InvalidRequestError as e:
                raise DataError(f"{path}: row ranked {rank}: {e}") from None
            solutions = solve24(numbers)
            gold = solutions[0] if solutions else ""
            problems.append(Problem(id=f"24-{rank}", question=" ".join(map(str, numbers)), gold=gold, task="game24"))
    if not problems:
        raise DataError(f"{path}: no puzzle ranked {lo}-{hi}")
    return problems


# ---- arithmetic word problems with known answers ------------------------------------------------------------------
NAMES = ["Tom", "Ana", "Lee", "Mia", "Sam", "Ivy", "Raj", "Zoe", "Ben", "Eva"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells"]


def arithmetic_problem(rng: random.Random, level: int) -> tuple[str, int]:
    """A word problem of `level` operations on one quantity (add, take away, multiply, share) and its answer."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    x = rng.randint(5, 40)
    sentences = [f"{name} has {x} {item}."]
    for _ in range(level):
        op = rng.choice(["add", "sub", "mul", "div", "bags"])
        if op == "sub" and x > 2:
            b = rng.randint(1, x - 1)
            x -= b
            sentences.append(f"{name} gives {b} {item} to a friend.")
        elif op == "mul" and x <= 60:
            k = rng.choice([2, 3])
            x *= k
            sentences.append(
                f"Then the number of {item} {name} has becomes {['', '', 'twice', 'three times'][k]} as large."
            )
        elif op == "div" and any(x % k == 0 for k in (2, 3, 4)) and x >= 4:
            k = rng.choice([k for k in (2, 3, 4) if x % k == 0])
            x //= k
            sentences.append(
                f"{name} shares the {item} equally among {k} people, {name} included, and keeps one share."
            )
        elif op == "bags":
            b, c = rng.randint(2, 5), rng.randint(2, 9)
            x += b * c
            sentences.append(f"{name} buys {b} bags with {c} {item} in each bag.")
        else:
            b = rng.randint(2, 30)
            x += b
            sentences.append(f"{name} finds {b} more {item}.")
    return " ".join(sentences) + f" How many {item} does {name} have now?", x


def load_arithmetic(n: int = 100, levels: tuple[int, ...] = (1, 2, 3, 4), seed: int = 0) -> list[Problem]:
    """`n` generated problems spread evenly over `levels` (the number of operations), the same for a given seed."""
    if n < 1 or not levels or min(levels) < 1:
        raise DataError("the arithmetic set needs n >= 1 and levels >= 1")
    rng = random.Random(seed)
    problems = []
    for i in range(n):
        level = levels[i % len(levels)]
        question, answer = arithmetic_problem(rng, level)
        problems.append(
            Problem(id=f"arith-{seed}-{i}", question=question, gold=str(answer), task="math", level=str(level))
        )
    return problems


# ---- GSM-Symbolic, generated offline by reasoning-gym ---------------------------------------------------------------
@cache
def gsm_symbolic_dataset(n: int, seed: int):
    """reasoning-gym's generator of GSM-Symbolic (100 templates of GSM8K test problems, exact answers); offline."""
    try:
        import reasoning_gym
    except ImportError as e:
        raise DataError(f"GSM-Symbolic needs reasoning-gym (the eval extra: pip install 'fot[eval]'): {e}") from None
    return reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)


def load_gsm_symbolic(n: int = 200, seed: int = 0) -> list[Problem]:
    """`n` problems of GSM-Symbolic for a seed; id `gsm_symbolic-SEED-I` regenerates problem I."""
    if n < 1:
        raise DataError("GSM-Symbolic needs n >= 1")
    problems = []
    for i, row in enumerate(gsm_symbolic_dataset(n, seed)):
        problems.append(
            Problem(id=f"gsm_symbolic-{seed}-{i}", question=row["question"], gold=str(row["answer"]), task="math")
        )
    return problems


def score(problem: Problem, answer: str | None) -> bool:
    """Math: equivalent to the gold answer. Game of 24: the model's expression uses each number once and is 24."""
    if answer is None:
        return False
    if problem.task == "game24":
        return check_expression(parse_numbers(problem.question), answer)
    return get_task("math").equivalent(answer, problem.gold, strict=True)  # no verdict: the problem fails, unrecorded


def gym_score(problem: Problem, answer: str | None) -> bool | None:
    """reasoning-gym's own verdict on an answer to a GSM-Symbolic problem (None for other data): the cross-check of
    the project's equivalence."""
    if not problem.id.startswith("gsm_symbolic-"):
        return None
    if answer is None:
        return False
    seed, i = (int(x) for x in problem.id.removeprefix("gsm_symbolic-").split("-"))
    ds = gsm_symbolic_dataset(i + 1, seed)  # an item depends on its seed and index only, not on the size
    return ds.score_answer(answer, ds[i]) == 1.0
