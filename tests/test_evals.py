"""Evaluations: data loading and its errors, scoring, resume after a crash, the report, and `fot eval`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evals.data import (
    DataError,
    Problem,
    game24_csv,
    gsm8k_gold,
    load_arithmetic,
    load_game24,
    load_gsm8k,
    load_math500,
)
from evals.records import Record, read_records
from evals.report import (
    PLOTS,
    experts,
    experts_markdown,
    markdown,
    mixed_note,
    rules,
    rules_markdown,
    summarise,
    wilson,
    write_report,
)
from evals.runner import arun, options, run_name, score
from fot.decoding.base import Request, run_sync
from fot.decoding.scripted import ScriptedBackend
from fot.errors import FotError
from fot.speculative.kernels import cpu_has_fast_bf16, resolve_dtype
from fot.tasks import MathTask
from fot.tasks.game24 import check_expression, parse_numbers

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GSM8K_ROWS = [
    {"question": "Ann has 2 cats and buys 3 more. How many cats?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
    {"question": "A farm sells 1,200 eggs a day. How many in 2 days?", "answer": "1200*2=2400\n#### 2,400"},
]


# ---- data --------------------------------------------------------------------------------------------------------
def test_gsm8k_from_jsonl_and_parquet(tmp_path: Path) -> None:
    problems = load_gsm8k(write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS))
    assert [p.gold for p in problems] == ["5", "2400"]
    assert problems[0].question == GSM8K_ROWS[0]["question"] and problems[0].task == "math"
    import pandas as pd

    folder = tmp_path / "parquet"
    folder.mkdir()
    pd.DataFrame(GSM8K_ROWS).to_parquet(folder / "test-00000.parquet")
    assert [p.gold for p in load_gsm8k(folder)] == ["5", "2400"]


def test_a_downloaded_data_folder_gives_its_test_split_only(tmp_path: Path) -> None:
    """A hub download (main/ and socratic/, each with train and test files) was read whole: training problems
    were evaluated as test problems."""
    train = [{"question": "Train question?", "answer": "#### 9"}]
    for config in ("main", "socratic"):
        (tmp_path / "gsm8k" / config).mkdir(parents=True)
        write_jsonl(tmp_path / "gsm8k" / config / "test-00000.jsonl", GSM8K_ROWS)
        write_jsonl(tmp_path / "gsm8k" / config / "train-00000.jsonl", train)
    assert [p.gold for p in load_gsm8k(tmp_path / "gsm8k" / "main")] == ["5", "2400"]
    with pytest.raises(DataError, match="test data in several folders \\(main, socratic\\): pass one of them"):
        load_gsm8k(tmp_path / "gsm8k")
    for folder, test_file, train_file in (
        ("latest", "test.jsonl", "train.jsonl"),
        ("y", "test2024.jsonl", "train2024.jsonl"),
    ):
        (tmp_path / folder).mkdir()  # "test" in a folder's name is no split; in a file's name, a word or not, it is
        write_jsonl(tmp_path / folder / test_file, GSM8K_ROWS)
        write_jsonl(tmp_path / folder / train_file, train)
        assert [p.gold for p in load_gsm8k(tmp_path / folder)] == ["5", "2400"]


def test_math500_schema(tmp_path: Path) -> None:
    row = {"problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?", "solution": "...", "answer": "\\frac{3}{4}"}
    rows = [row | {"unique_id": "test/algebra/1.json", "level": 2, "subject": "Algebra"}]
    [p] = load_math500(write_jsonl(tmp_path / "m.jsonl", rows))
    assert (p.id, p.gold, p.level) == ("test/algebra/1.json", "\\frac{3}{4}", "2")


def test_a_slow_score_does_not_stall_the_problems_in_flight(tmp_path: Path, monkeypatch) -> None:
    """Scoring (math-verify may take seconds) ran on the event loop, where the other problems' searches wait."""
    import asyncio
    import time

    from loop import ticks_during

    import evals.runner

    def slow(problem, answer):
        time.sleep(0.3)
        return score(problem, answer)

    monkeypatch.setattr(evals.runner, "score", slow)
    args = options("arithmetic", method="cot", n=1, levels="1", out=str(tmp_path), no_report=True)
    backend = ScriptedBackend(lambda r, j: "The answer is 2.")
    (path, failed), ticks = asyncio.run(ticks_during(arun(args, backend=backend)))
    assert failed == 0 and len(read_records(path)) == 1
    assert ticks >= 30  # the loop ticked on through the two 0.3 s scores (the answer's and its tree's)


def test_data_with_an_id_twice_is_refused_before_any_work(tmp_path: Path) -> None:
    """A record is kept per id: both problems were solved and the second one's result was dropped unseen."""
    row = {"problem": "What is 1+1?", "solution": "...", "answer": "2", "unique_id": "test/algebra/1.json"}
    data = write_jsonl(tmp_path / "m.jsonl", [row, row | {"problem": "What is 2+2?", "answer": "4"}])
    backend = ScriptedBackend(lambda r, j: "The answer is 2.")
    args = options("math", data=str(data), method="cot", out=str(tmp_path / "out"), no_report=True)
    with pytest.raises(FotError, match="1 ids more than once .*'test/algebra/1.json'"):
        run_sync(arun(args, backend=backend))
    assert backend.usage.requests == 0


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        ('{"question": "q", "answer": "#### 1"}\n{"question": "q2", "ans', "torn.jsonl", "could not read"),
        ("\x00\x01 not parquet", "bad.parquet", "could not read"),
        ('{"question": "q", "answer": "1"}\n', "nomarker.jsonl", "without '####'"),
        ('{"prompt": "q", "answer": "#### 1"}\n', "schema.jsonl", "lacks the text field"),
        ("question,answer\nq,#### 1\n", "data.csv", "use one of the formats"),
    ],
)
def test_bad_data_files_fail_clearly(tmp_path: Path, content: str, name: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_gsm8k(path)


def test_missing_data_and_offline_hub(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_gsm8k(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="--data"):  # this machine has no internet; the message says what to do
        load_gsm8k()


def test_gsm8k_gold_marker() -> None:
    assert gsm8k_gold("so 3 + 4 = 7\n#### 1,007") == "1007"
    with pytest.raises(DataError):
        gsm8k_gold("7")


def test_game24_hard_split_from_the_shipped_csv() -> None:
    """The real puzzles (the tree-of-thoughts-llm wheel, fetched once into the cache): ranks 901-1000."""
    problems = load_game24(game24_csv())
    assert len(problems) == 100 and problems[0].id == "24-901" and problems[-1].id == "24-1000"
    assert problems[0].question == "4 5 6 10"
    for p in problems:  # each comes with one exactly checked reference solution
        assert check_expression(parse_numbers(p.question), p.gold), p
    assert len(load_game24(ranks="1-1362")) == 1362


def test_game24_bad_csv(tmp_path: Path) -> None:
    (tmp_path / "24.csv").write_text("Rank,Numbers\n1,1 2 3 4\n")
    with pytest.raises(DataError, match="Rank and Puzzles"):
        load_game24(tmp_path / "24.csv")
    (tmp_path / "24.csv").write_text("Rank,Puzzles\n1,1 2 3 4\n")
    with pytest.raises(DataError, match="ranks must look like"):
        load_game24(tmp_path / "24.csv", ranks="top")
    with pytest.raises(DataError, match="no puzzle ranked"):
        load_game24(tmp_path / "24.csv", ranks="5-9")


def replay(question: str) -> int:
    """An independent reading of the generator's sentences: recompute the answer from the words alone."""
    sentences = re.split(r"(?<=\.) ", question)
    x = int(re.search(r"has (\d+)", sentences[0])[1])
    for s in sentences[1:-1]:
        if m := re.search(r"gives (\d+)", s):
            x -= int(m[1])
        elif m := re.search(r"becomes (twice|three times)", s):
            x *= 2 if m[1] == "twice" else 3
        elif m := re.search(r"among (\d+) people", s):
            assert x % int(m[1]) == 0
            x //= int(m[1])
        elif m := re.search(r"buys (\d+) bags with (\d+)", s):
            x += int(m[1]) * int(m[2])
        elif m := re.search(r"finds (\d+) more", s):
            x += int(m[1])
        else:
            raise AssertionError(f"unknown sentence {s!r}")
    return x


def test_arithmetic_generator_answers_and_levels() -> None:
    problems = load_arithmetic(40, levels=(1, 2, 3, 4), seed=3)
    assert problems == load_arithmetic(40, levels=(1, 2, 3, 4), seed=3)  # same seed, same set
    assert problems != load_arithmetic(40, levels=(1, 2, 3, 4), seed=4)
    assert [p.level for p in problems[:4]] == ["1", "2", "3", "4"]
    for p in problems:
        assert str(replay(p.question)) == p.gold and int(p.gold) > 0, p
        assert p.question.count(".") == int(p.level) + 1
    with pytest.raises(DataError):
        load_arithmetic(0)


# ---- scoring -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "gold", "correct"),
    [
        ("So she pays \\boxed{18 \\text{ dollars}}.", "18", True),
        ("The answer is $\\frac{1}{2}$.", "0.5", True),
        ("The answer is 1/2.", "\\frac{1}{2}", True),
        ("The answer is 2,400 eggs.", "2400", True),
        ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True),
        ("The angle is \\boxed{30^\\circ}", "30", True),
        ("The answer is $18.00.", "18", True),
        ("first \\boxed{3}, then corrected: \\boxed{4}", "3", False),
        ("The answer is 24.5", "24", False),
        ("I don't know.", "7", False),
    ],
)
def test_scoring_table(text: str, gold: str, correct: bool) -> None:
    problem = Problem(id="p", question="q", gold=gold, task="math")
    assert score(problem, MathTask().extract(text)) is correct


def test_game24_scoring_rechecks_the_arithmetic() -> None:
    p = Problem(id="24-1", question="4 9 10 13", gold="(13 - 9) * (10 - 4)", task="game24")
    assert score(p, "(10 - 4) * (13 - 9)")  # any valid expression, not only the reference one
    assert not score(p, "4 * 6")  # equals 24 but does not use the puzzle's numbers
    assert not score(p, "(13 - 9) * (10 - 4) + 0")
    assert not score(p, None)


# ---- the runner: resume, honesty ---------------------------------------------------------------------------------
class PowerCut(RuntimeError):
    pass


def arithmetic_options(out: Path, **kw):
    return options("arithmetic", method="cot", n=6, levels="1", out=str(out), no_report=True, **kw)


def test_resume_after_a_crash_never_redoes_or_loses_a_problem(tmp_path: Path) -> None:
    calls = []

    def crashing(r: Request, j: int) -> str:
        calls.append(r)
        if len(calls) == 4:
            raise PowerCut("the machine went down")
        return "The answer is 7."

    with pytest.raises(PowerCut):
        run_sync(arun(arithmetic_options(tmp_path), backend=ScriptedBackend(crashing)))
    [path] = (tmp_path / "arithmetic").glob("*.jsonl")
    first = read_records(path)
    assert len(first) == 3  # the three finished problems are on disk; the fourth was in flight
    with open(path, "a") as f:
        f.write('{"id": "arith-0-3", "benchm')  # a write torn by the crash
    size = path.stat().st_size
    assert read_records(path) == first and path.stat().st_size == size  # a reader leaves the file as it is

    again = ScriptedBackend(lambda r, j: "The answer is 7.")
    path2, failed = run_sync(arun(arithmetic_options(tmp_path), backend=again))
    records = read_records(path2)
    assert path2 == path and failed == 0
    assert [r.id for r in records] == [f"arith-0-{i}" for i in range(6)]
    assert records[:3] == first  # untouched
    assert {r.total for r in records} == {6}  # each record knows how many problems its run was asked for
    assert len(again.batches) == 3  # only the three unfinished problems were solved again
    run_sync(arun(arithmetic_options(tmp_path), backend=again))
    assert len(again.batches) == 3 and len(read_records(path)) == 6  # a third run has nothing left to do
    run_sync(arun(arithmetic_options(tmp_path, concurrency=4), backend=again))  # nothing to do: no question


def test_a_run_resumes_only_at_its_concurrency(tmp_path: Path) -> None:
    """A run resumed with another --concurrency appended to the same file, and the report timed the mix as the
    first record's; now it is refused before any work."""
    backend = ScriptedBackend(lambda r, j: "The answer is 7.")
    run_sync(arun(arithmetic_options(tmp_path, limit=2), backend=backend))
    with pytest.raises(FotError, match="was run with --concurrency 1: resume it with that"):
        run_sync(arun(arithmetic_options(tmp_path, concurrency=4), backend=backend))
    assert len(backend.batches) == 2


def test_an_answer_with_a_unicode_line_separator_keeps_its_run_readable(tmp_path: Path) -> None:
    """JSON leaves U+2028 and U+0085 unescaped, and `splitlines` split a record there: the run file could never
    be read again. The model's answer can hold them."""
    backend = ScriptedBackend(lambda r, j: "The answer is \\boxed{x\u2028=\x85 7}.")
    path, failed = run_sync(arun(arithmetic_options(tmp_path, limit=2), backend=backend))
    assert failed == 0 and [r.answer for r in read_records(path)] == ["x\u2028=\x85 7"] * 2


def test_a_timeout_inside_a_run_is_not_taken_for_its_lock(tmp_path: Path) -> None:
    """The run file's lock caught every TimeoutError of the run it guarded (a socket's read timeout), and said that
    another process was running it."""

    def slow(r: Request, j: int) -> str:
        raise TimeoutError("read timed out")

    with pytest.raises(TimeoutError, match="read timed out"):
        run_sync(arun(arithmetic_options(tmp_path), backend=ScriptedBackend(slow)))


@pytest.mark.parametrize(
    ("kw", "match"),
    [({"code_checks": True}, "code_checks"), ({"method": "bogus"}, "method"), ({"trees": "4"}, "trees")],
)
def test_eval_options_from_python_are_checked_as_the_command_line_would(kw, match) -> None:
    """options(code_checks=True) ran with the code check off, named as the run without it."""
    with pytest.raises(FotError, match=match):
        options("arithmetic", **kw)
    args = options("gsm8k", out=Path("out"), data=Path("d.jsonl"), base_url=["http://h:1/v1"], limit=None)  # as typed
    assert (args.out, args.base_url) == (Path("out"), ["http://h:1/v1"])
    with pytest.raises(FotError, match="base_url"):
        options("gsm8k", base_url="http://h:1/v1")  # the command line makes a list of it


def test_a_problem_whose_scoring_fails_is_not_recorded_and_the_run_goes_on(tmp_path: Path, monkeypatch) -> None:
    """An answer math-verify could not judge (its worker died twice) ended the whole run, and every re-run hit the
    same problem again. Now that problem fails alone, unrecorded, and a re-run retries it."""
    import evals.runner

    real = evals.runner.score

    def flaky(problem, answer):
        if problem.id == "arith-0-2":
            raise FotError("the math-verify worker died twice")
        return real(problem, answer)

    monkeypatch.setattr(evals.runner, "score", flaky)
    backend = ScriptedBackend(lambda r, j: "The answer is 7.")
    path, failed = run_sync(arun(arithmetic_options(tmp_path), backend=backend))
    assert failed == 1 and sorted(r.id for r in read_records(path)) == [f"arith-0-{i}" for i in (0, 1, 3, 4, 5)]


def test_a_backend_other_than_the_options_name_is_refused(tmp_path: Path) -> None:
    """A notebook that built a vLLM backend and kept the options' default (native) wrote records named native."""

    class Vllm(ScriptedBackend):
        name = "vllm"

    backend = Vllm(lambda r, j: "The answer is 7.")
    with pytest.raises(FotError, match="the backend given is vllm but the options say native"):
        run_sync(arun(arithmetic_options(tmp_path), backend=backend))
    assert backend.batches == [] and not (tmp_path / "arithmetic").exists()


def test_runs_are_named_by_device_and_the_dtype_they_run_in() -> None:
    """A native CPU run is named by the dtype it resolves to: fp32 keeps the name runs had before --dtype existed,
    bf16 ("auto" where the kernels run, "fast", "bfloat16") the name of the committed bf16 runs; another device is
    named apart."""
    old = run_name(options("arithmetic", method="sc", dtype="float32", code_checks="off", arithmetic_checks="off"))
    assert old == "sc-t4-default-native-prompt_lookup-s0-a690c226"  # the search as it was before the rule checks
    unchecked = run_name(options("arithmetic", dtype="float32", code_checks="off", arithmetic_checks="off"))
    assert unchecked != old.replace("sc-", "fot-")  # fot's fallback runs the corrector now: another search
    code_only = run_name(options("arithmetic", dtype="float32", arithmetic_checks="off"))
    fp32 = run_name(options("arithmetic", dtype="float32"))
    assert len({unchecked, code_only, fp32}) == 3  # fot runs both checks now: another search, another run
    fot24, sc24 = (run_name(options("game24", method=m, dtype="float32")) for m in ("fot", "sc"))
    assert fot24.rsplit("-", 1)[1] == sc24.rsplit("-", 1)[1]  # Game of 24's fallback is as it was: same runs
    assert run_name(options("arithmetic", method="sc", code_checks="on")) != run_name(
        options("arithmetic", method="sc")
    )
    bf16 = run_name(options("arithmetic", dtype="bfloat16"))
    assert bf16 != fp32
    assert run_name(options("arithmetic", dtype="fast")) == (bf16 if cpu_has_fast_bf16() else fp32)
    assert run_name(options("arithmetic")) == (bf16 if resolve_dtype("auto", "cpu") == torch.bfloat16 else fp32)
    assert run_name(options("arithmetic", device="cuda")) not in (bf16, fp32)
    assert run_name(options("arithmetic", dtype="float32", fallback_samples=1)) == fp32  # the option's default
    assert run_name(options("arithmetic", dtype="float32", fallback_samples=4)) != fp32


def test_a_run_whose_ties_are_broken_by_sampled_chains_is_labelled_so(tmp_path: Path) -> None:
    """--fallback-samples N: the records keep N, the report labels the run "+fallbackN" (the fallback itself:
    `test_a_fallback_of_several_chains_votes_with_the_trees`), and the option is refused off fot."""
    backend = ScriptedBackend(lambda r, j: "The answer is 7.")
    args = options("arithmetic", method="fot", trees=2, rollouts=0, fallback_samples=3, n=2, levels="1")
    args.out, args.no_report = str(tmp_path), True
    path, failed = run_sync(arun(args, backend=backend))
    assert failed == 0 and {r.fallback_samples for r in read_records(path)} == {3}
    [row] = summarise({("arithmetic", path.stem): read_records(path)})
    assert row.label == "fot +code+arith+fallback3"
    with pytest.raises(FotError, match="fallback_samples is for method 'fot'"):
        run_sync(arun(options("arithmetic", method="sc", fallback_samples=3, out=str(tmp_path)), backend=backend))


def test_a_new_search_version_is_a_new_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed run mixed records of two versions of the search (the first 100 GSM-Symbolic FoT-4 records predate
    two changes to it). A bumped `SEARCH_VERSIONS[task]` names new runs of that task; version 1 keeps the names runs
    had."""
    import fot.forest

    args = options("arithmetic", method="sc", dtype="float32", code_checks="off", arithmetic_checks="off")
    assert run_name(args) == "sc-t4-default-native-prompt_lookup-s0-a690c226"
    monkeypatch.setattr(fot.forest, "SEARCH_VERSIONS", {"math": 1, "game24": 3})
    assert run_name(args) == "sc-t4-default-native-prompt_lookup-s0-a690c226"  # another task's version
    monkeypatch.setattr(fot.forest, "SEARCH_VERSIONS", {"math": 2, "game24": 3})
    assert run_name(args) != "sc-t4-default-native-prompt_lookup-s0-a690c226"


def test_a_foreign_line_in_a_results_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"not": "a record"}\n')
    with pytest.raises(DataError, match="not a result record"):
        read_records(path)


def test_the_search_never_sees_the_gold_answer(tmp_path: Path) -> None:
    rows = [{"question": "How many legs do 3 spiders have?", "answer": "8 * 3 = 24\n#### 987654"}]
    data = write_jsonl(tmp_path / "g.jsonl", rows)
    seen = []

    def respond(r: Request, j: int) -> str:
        seen.append(json.dumps(r.prompt))
        return "Score: 50" if "Grade" in seen[-1] else "8 legs each, 3 spiders: 24. The answer is 24."

    args = options("gsm8k", data=str(data), method="fot", trees=3, rollouts=1, out=str(tmp_path), no_report=True)
    path, _ = run_sync(arun(args, backend=ScriptedBackend(respond)))
    assert seen and not any("987654" in prompt for prompt in seen)
    [record] = read_records(path)
    assert (record.answer, record.gold, record.correct, record.trees) == ("24", "987654", False, 3)
    assert (record.tree_answers, record.tree_correct) == (["24"] * 3, [False] * 3)
    assert record.node_answers == [["24"]] * 3  # each tree's first answer: they agree, so no tree refined it
    assert (record.max_tokens, record.rollouts) == (384, 1)  # its budget, so the report pairs like with like


# ---- the report --------------------------------------------------------------------------------------------------
BASE = {  # one problem's record; the report tests vary correctness, time and the drafter
    **{"benchmark": "arithmetic", "method": "sc", "trees": 4, "model": "default", "backend": "native", "seed": 0},
    **{"level": "1", "answer": "7", "votes": {"7": 4}, "decision": "single", "concurrency": 1},
    **{"tokens": 100, "prompt_tokens": 50, "requests": 1, "forward_passes": 60, "draft_tokens": 80},
    **{"accepted_tokens": 40, "tokens_saved": 0, "corrections": 0},
}


def record(id: str, run: str, correct: bool, seconds: float, speculative: str = "prompt_lookup", **kw) -> Record:
    fields = BASE | {"run": run, "speculative": speculative, "gold": "7", "correct": correct}
    fields |= {"answer": "7" if correct else "8", "votes": {"7" if correct else "8": 4}}
    return Record(id=id, seconds=seconds, **(fields | kw))


def test_wilson_interval() -> None:
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    assert wilson(0, 20)[0] == 0.0 and wilson(20, 20)[1] == 1.0
    assert all(wilson(n, n)[1] == 1.0 and wilson(0, n)[0] == 0.0 for n in range(1, 200))  # no rounding below 1


def test_report_table_speedup_and_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "arithmetic"
    folder.mkdir()
    runs = {
        "fot-t8-default-native-prompt_lookup-s0-abcd1234": [  # stopped after 2 of its 4 problems
            record(f"a{i}", "", True, 9.0, method="fot", trees=8, total=4) for i in range(2)
        ],
        "sc-t4-default-native-prompt_lookup-s0-abcd1234": [  # 10 of its 16 samples right
            record(f"a{i}", "", i < 3, 2.0, tree_correct=[True, i < 3, i < 2, i < 1]) for i in range(4)
        ],
        "sc-t4-default-native-none-s0-abcd1234": [record(f"a{i}", "", i < 3, 3.0, "none") for i in range(4)],
        "cot-t1-default-native-prompt_lookup-s0-abcd1234": [
            record(f"a{i}", "", i < 1, 1.0, method="cot", trees=1) for i in range(4)
        ],
    }
    for name, rs in runs.items():
        (folder / f"{name}.jsonl").write_text(
            "".join(r.model_copy(update={"run": name}).model_dump_json() + "\n" for r in rs)
        )
    rows = {r.run: r for r in summarise({("arithmetic", n): read_records(folder / f"{n}.jsonl") for n in runs})}
    assert {r.label for r in rows.values()} == {"fot", "sc", "cot"}  # math's search is still at version 1
    monkeypatch.setattr("fot.forest.SEARCH_VERSIONS", {"math": 2, "game24": 2})
    old = summarise({("arithmetic", "x"): read_records(folder / f"{[*runs][3]}.jsonl")})
    assert old[0].label == "cot (search v1)"  # a run of an older search than its task's says so
    monkeypatch.undo()
    sd = rows["sc-t4-default-native-prompt_lookup-s0-abcd1234"]
    assert (sd.n, sd.correct, sd.accuracy) == (4, 3, 0.75)
    assert sd.sd_speedup == pytest.approx(1.5) and sd.accept_rate == pytest.approx(0.5)
    assert rows["sc-t4-default-native-none-s0-abcd1234"].sd_speedup is None
    assert [n for n, r in rows.items() if r.partial] == [*runs][:1]  # records without a total count as finished
    plotted = []
    monkeypatch.setitem(PLOTS, "trees", lambda ax, rs, ps: plotted.extend(r.method for r in rs))
    report = write_report(tmp_path).read_text()
    assert sd.tree_accuracy == pytest.approx(10 / 16) and sd.tree_records == 4  # the samples' own answers
    assert "| 62.5% (of 2) |" in markdown([sd.model_copy(update={"tree_records": 2})])  # older records keep none
    assert rows["sc-t4-default-native-none-s0-abcd1234"].tree_accuracy is None  # records that keep none
    row = "| smollm2-135m | sc | 4 | - | prompt_lookup | 4 | 75.0% (30%-95%) | 62.5% | 100 | 50 | 2.0 | 50% | 1.50x |"
    assert row in report
    assert "| smollm2-135m | fot | 8 | - | prompt_lookup | 2 of 4 | 100.0% (34%-100%) |" in report
    assert sorted(plotted) == ["cot", "sc", "sc"]  # the stopped run is in the table, not in the plots
    for png in ("arithmetic_accuracy_vs_trees.png", "arithmetic_accuracy_vs_tokens.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["partial"] for r in summary] == [False, True, False, False]  # sorted by method


def test_other_decision_rules_are_scored_on_a_forests_records() -> None:
    """Where a forest's accuracy is lost: its decision against plain votes over its nodes, and whether any node
    reached the right answer (gold 7)."""
    name = "fot-t3-default-native-prompt_lookup-s0-abcd1234"
    nodes = [
        [["7", "8"], ["8"], ["9", "7"]],  # first answers 7, 8, 9; last 8, 8, 7; every node: 8 twice, 7 twice
        [["5"], ["6", "5"], []],  # nothing right
        [["7.0"], ["7"], ["3"]],  # equivalent answers vote together
    ]
    rs = [record(f"a{i}", name, i == 0, 1.0, method="fot", trees=3, node_answers=n) for i, n in enumerate(nodes)] + [
        record("a3", name, True, 1.0, method="fot", trees=3)
    ]  # an older record keeps no nodes
    [r] = rules({("arithmetic", name): rs})
    assert (r.n, r.decided, r.first, r.last, r.every, r.reached) == (3, 1, 2, 1, 2, 2)
    assert "| arithmetic | smollm2-135m | fot | 3 | 3 | 1 | 2 | 1 | 2 | 2 |" in rules_markdown([r])
    assert rules({("arithmetic", "sc"): [record("a0", "sc", True, 1.0, node_answers=[["7"]] * 4)]}) == []


def test_a_forest_s_decisions_are_counted_by_kind() -> None:
    """How often the expert was asked, declined, and what the fallback's answer got then (gold 7)."""
    name = "fot-t4-default-native-prompt_lookup-s0-abcd1234"
    kinds = [
        ("majority", {"7": 3, "8": 1}, True),
        ("plurality", {"7": 2, "8": 1, "9": 1}, True),
        ("expert", {"7": 2, "8": 2}, False),
        ("fallback", {"7": 1, "8": 1, "9": 1, "5": 1}, False),  # declined, though a tree had it right
        ("fallback", {"1": 1, "2": 1, "3": 1, "4": 1}, True),  # declined; the fallback found 7
        ("fallback", {}, False),  # no tree answered: no expert was asked
    ]
    rs = [
        record(f"a{i}", name, ok, 1.0, method="fot", trees=4, decision=d, votes=v, answer="7" if ok else "6")
        for i, (d, v, ok) in enumerate(kinds)
    ]
    [e] = experts({("arithmetic", name): rs})
    assert (e.n, e.majority, e.plurality, e.asked, e.declined, e.fallback_right, e.among) == (6, 1, 1, 3, 2, 1, 1)
    assert "| arithmetic | smollm2-135m | fot | 4 | 6 | 1 | 1 | 3 | 2 | 1 | 1 |" in experts_markdown([e])
    assert experts({("arithmetic", "sc"): [record("a0", "sc", True, 1.0)]}) == []


def test_a_run_made_on_two_builds_of_the_kernels_says_so() -> None:
    """Machines round bf16 sums differently: a run resumed on another CPU is named with its records per build."""
    name = "sc-t4-default-native-prompt_lookup-s0-abcd1234"
    rs = [record("a0", name, True, 1.0)] + [record(f"a{i}", name, i == 1, 1.0, kernels="avx2") for i in (1, 2)]
    [row] = summarise({("arithmetic", name): rs})
    assert row.kernels == {"-": 1, "avx2": 2}
    assert "sc x4 (abcd1234): 1 -, 2 avx2." in markdown([row])
    [one] = summarise({("arithmetic", name): rs[1:]})
    assert mixed_note([one], "kernels", "x") == [] and "builds of our kernels" not in markdown([one])
    rs[2] = record("a2", name, False, 1.0, kernels="avx2", concurrency=16)  # BASE's is 1
    note = "at more than one --concurrency (their seconds are a mix): sc x4 (abcd1234): 2 at 1, 1 at 16."
    assert note in markdown(summarise({("arithmetic", name): rs}))


# ---- command line ------------------------------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fot.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_fot_eval_rejects_bad_input_before_loading_a_model(tmp_path: Path) -> None:
    done = run_cli("eval", "game24", "--method", "mctsr", "--out", str(tmp_path))
    assert done.returncode == 2 and "does not fit the game24 task" in done.stderr
    done = run_cli("eval", "gsm8k", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path))
    assert done.returncode == 2 and "does not exist" in done.stderr
    done = run_cli("eval", "nonsense")
    assert done.returncode == 2 and "invalid choice" in done.stderr
    done = run_cli("eval", "-h")
    assert done.returncode == 0 and "--method {cot,sc,tot,mctsr,fot}" in done.stdout


# ---- GSM-Symbolic ---------------------------------------------------------------------------------------------------
def test_gsm_symbolic_is_generated_offline_and_each_id_regenerates_its_problem():
    from evals.data import gsm_symbolic_dataset, load_gsm_symbolic

    problems = load_gsm_symbolic(20, seed=3)
    assert [p.id for p in problems] == [f"gsm_symbolic-3-{i}" for i in range(20)]
    assert load_gsm_symbolic(20, seed=3) == problems and load_gsm_symbolic(20, seed=4) != problems
    again = gsm_symbolic_dataset(8, 3)[7]  # a smaller set with the same seed holds the same problem 7
    assert (again["question"], str(again["answer"])) == (problems[7].question, problems[7].gold)
    with pytest.raises(DataError):
        load_gsm_symbolic(0)


def test_the_projects_scoring_agrees_with_reasoning_gyms():
    from evals.data import gym_score, load_gsm_symbolic

    for p in load_gsm_symbolic(10, seed=0):
        g = int(p.gold)
        for answer in (str(g), f"{g}.0", f"{g}.00", f"{g}/1", str(g + 1), "0", str(g * 10), f"{g}.5", "1e3"):
            assert score(p, answer) == gym_score(p, answer), (p.gold, answer)
        assert gym_score(p, None) is False and score(p, None) is False
        assert score(p, f"-{g}") is False and gym_score(p, f"-{g}") is True  # gym drops the sign: a disagreement
    other = Problem(id="arithmetic-0", question="2 + 2", gold="4", task="math")
    assert gym_score(other, "4") is None and gym_score(other, None) is None  # no cross-check for other data


def test_a_gsm_symbolic_run_records_the_cross_check_and_the_report_counts_disagreements(tmp_path: Path) -> None:
    from evals.data import load_gsm_symbolic

    golds = [p.gold for p in load_gsm_symbolic(4, seed=0)]
    replies = iter([f"The answer is {golds[0]}.", f"The answer is -{golds[1]}.", "The answer is 1.", "No idea."])
    backend = ScriptedBackend(lambda r, j: next(replies))
    args = options("gsm_symbolic", method="cot", n=4, out=str(tmp_path), no_report=True)
    path, failed = run_sync(arun(args, backend=backend))
    records = read_records(path)
    assert failed == 0 and path.parent.name == "gsm_symbolic"
    assert [(r.correct, r.gym_correct) for r in records] == [
        (True, True),
        (False, True),
        (False, False),
        (False, False),
    ]
    [row] = summarise({("gsm_symbolic", path.stem): records})
    assert row.disagreements == 1 and not row.checks
    assert "1 disagreements in 4 records" in markdown([row])


def test_paired_comparison_and_mcnemar() -> None:
    from evals.report import mcnemar, pairs, pairs_markdown

    assert mcnemar(0, 0) == 1.0 and mcnemar(3, 3) == 1.0
    assert mcnemar(10, 0) == pytest.approx(2 / 1024) and mcnemar(8, 2) == pytest.approx(2 * 56 / 1024)
    a = [record(f"a{i}", "x", i < 8, 1.0, method="fot", trees=4, code_checks_on=True, tokens=100) for i in range(10)]
    b = [record(f"a{i}", "y", i in (0, 8, 9), 1.0, method="sc", trees=8, tokens=150) for i in range(9)]
    c = [record(f"a{i}", "z", i < 2, 1.0, method="fot", trees=4, tokens=90) for i in range(10)]
    runs = {("arithmetic", "x"): a, ("arithmetic", "y"): b, ("arithmetic", "z"): c}
    found = {(p.a, p.b): p for p in pairs(runs)}
    assert set(found) == {("fot-4 +code", "sc-8"), ("fot-4 +code", "fot-4"), ("fot-4", "sc-8")}
    p = found[("fot-4 +code", "sc-8")]  # the 9 problems both finished
    assert (p.n, p.both, p.only_a, p.only_b, p.neither) == (9, 1, 7, 1, 0)
    assert p.p_value == pytest.approx(mcnemar(7, 1)) and (p.tokens_a, p.tokens_b) == (100, 150)
    assert found[("fot-4 +code", "fot-4")].only_a == 6
    assert p.budget_matched and not found[("fot-4 +code", "fot-4")].budget_matched
    both = [
        record(f"a{i}", "w", i < 9, 1.0, method="fot", trees=4, code_checks_on=True, arithmetic_checks_on=True,
               tokens=200)
        for i in range(10)
    ]  # fmt: skip
    found = {(p.a, p.b): p for p in pairs(runs | {("arithmetic", "w"): both})}
    assert {("fot-4 +code+arith", "fot-4 +code"), ("fot-4 +code+arith", "fot-4")} <= set(found)
    assert ("fot-4 +code", "fot-4 +code+arith") not in found  # fewer checks is no ablation of more
    assert not found[("fot-4 +code+arith", "sc-8")].budget_matched  # 200 tokens a problem against 150
    chains = {
        checks: [record(f"a{i}", f"c{checks}", i < 5, 1.0, method="cot", trees=1, tokens=30, code_checks_on=checks)
                 for i in range(10)]
        for checks in (False, True)
    }  # fmt: skip
    found = {(p.a, p.b): p for p in pairs(runs | {("arithmetic", f"c{k}"): rs for k, rs in chains.items()})}
    assert ("fot-4 +code", "cot-1 +code") in found and ("fot-4", "cot-1") in found  # the forest against one chain
    assert ("fot-4 +code", "cot-1") not in found and ("fot-4", "cot-1 +code") not in found  # not with other checks
    assert found[("fot-4 +code", "cot-1 +code")].only_a == 3
    # the same ids for other problems (arithmetic with other --levels, another --data file): no pair
    other = [r.model_copy(update={"run": "o", "method": "sc", "trees": 8, "gold": "9"}) for r in b]
    assert not [p for p in pairs(runs | {("arithmetic", "o"): other}) if "o" in (p.run_a, p.run_b)]
    # a run stopped before its end (9 of 10): its pairs say so, as its row does (they were shown as finished)
    assert not any(p.partial for p in pairs(runs))  # no total recorded: nothing says it stopped early
    stopped = {("arithmetic", "y"): [r.model_copy(update={"total": 10}) for r in b]}
    found = {(p.a, p.b): p for p in pairs(runs | stopped)}
    assert found[("fot-4 +code", "sc-8")].partial and not found[("fot-4 +code", "fot-4")].partial
    assert "| 9 (partial) |" in pairs_markdown([found[("fot-4 +code", "sc-8")]])
    # another budget is another experiment: no pair where both records say theirs and they differ
    longer = [r.model_copy(update={"max_tokens": 768, "rollouts": 1}) for r in a]
    assert [p.b for p in pairs({("arithmetic", "x"): longer, ("arithmetic", "y"): b})] == ["sc-8"]  # b: unknown
    shorter = {("arithmetic", "y"): [r.model_copy(update={"max_tokens": 384}) for r in b]}
    assert not pairs({("arithmetic", "x"): longer} | shorter)


def test_the_tokens_plot_joins_budget_matched_pairs() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evals.report import Pair, Row, draw_tokens

    def row(run, method, trees, acc, tokens):
        return Row(benchmark="b", run=run, model="m", method=method, trees=trees, backend="native",
                   speculative="prompt_lookup", n=10, total=10, correct=int(acc * 10), accuracy=acc, ci_low=0,
                   ci_high=1, tokens=tokens, seconds=1, accept_rate=None, sd_speedup=None)  # fmt: skip

    rows = [row("f", "fot", 4, 0.6, 100), row("s", "sc", 8, 0.5, 150)]
    pair = Pair(benchmark="b", model="m", a="fot-4", b="sc-8", run_a="f", run_b="s", n=10, both=5, only_a=1,
                only_b=0, neither=4, p_value=1.0, tokens_a=100, tokens_b=150)  # fmt: skip
    fig, ax = plt.subplots()
    draw_tokens(ax, rows, [pair])
    [line] = [x for x in ax.lines if x.get_label() == "budget-matched"]
    assert list(line.get_xdata()) == [100, 150] and list(line.get_ydata()) == [0.6, 0.5]
    plt.close(fig)


def test_fot_eval_runs_the_checkouts_evals_with_no_package_named_evals_installed(tmp_path):
    """evals/ is not installed (another project's `evals` could be): `fot eval` finds the checkout's, from any
    folder, and `python -m evals.X` runs from the checkout."""
    code = (
        "import importlib.util, sys; assert importlib.util.find_spec('evals') is None, 'evals is installed'; "
        "from fot.cli import main; main(['eval', '--help'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--method" in out.stdout and "gsm_symbolic" in out.stdout
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "evals.arithmetic", "--help"], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0 and "--levels" in out.stdout, out.stderr[-2000:]


def test_the_drafter_left_unsaid_is_the_backends_default() -> None:
    """`--speculative` unsaid: prompt lookup on the native engine, none on vLLM and the OpenAI backend (which have
    no prompt lookup), so `fot eval math --backend vllm` runs as documented; the run is named by what it used."""
    from evals.runner import drafter

    for backend, want in (("native", "prompt_lookup"), ("vllm", "none"), ("openai", "none")):
        args = options("gsm8k", backend=backend)
        assert drafter(args) == want and f"-{backend}-{want}-" in run_name(args)
    assert drafter(options("gsm8k", backend="vllm", speculative="ngram")) == "ngram"
