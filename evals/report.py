"""Summarise every run under a results folder: a markdown table per benchmark and two plots.

    python -m evals.report evals/results

Accuracy carries a 95% Wilson interval (runs here are small, so the interval matters more than the point).
Speculative-decoding speedup compares a run with its twin that differs only in `--speculative none`, over the
problems both solved: mean seconds per problem, plain / speculative.
"""

from __future__ import annotations

import argparse
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, computed_field

from evals.records import Record, read_records
from fot.models import ALIASES
from fot.tasks.base import Task, majority_key


class Row(BaseModel):
    benchmark: str
    run: str
    model: str
    method: str
    trees: int
    backend: str
    speculative: str
    n: int
    total: int | None  # problems the run was asked for, the most any of its records says (None: older records)
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    tokens: float  # generated per problem
    prompt_tokens: float = 0.0  # per problem: every request's prompt, once per request whatever its n
    seconds: float  # per problem
    accept_rate: float | None  # accepted / proposed drafts
    sd_speedup: float | None  # seconds of the plain twin / seconds of this run, same problems
    checks: list[str] = []  # what the run's search added: rule checks ("code", "arithmetic"), "programN" trees
    repairs: dict[str, float] = {}  # per check, the claims it repaired per problem
    disagreements: int | None = None  # records whose cross-check (reasoning-gym's verdict) differs from `correct`
    cross_checked: int = 0  # records that have that cross-check
    tree_accuracy: float | None = None  # share of the trees' (sc: samples') own answers that are right
    tree_records: int = 0  # the records that keep their trees' answers (older records do not)
    superseded: int | None = None  # the search version of a run made before its task's search changed
    kernels: dict[str, int] = {}  # records per build of our CPU kernels that made them ("-": not recorded)
    concurrency: dict[int, int] = {}  # records per --concurrency they were made with

    @property
    def label(self) -> str:
        return method_label(self.method, self.checks, self.superseded)

    @computed_field
    @property
    def partial(self) -> bool:
        """Stopped before its end: its problems are the first to finish, not a sample, so it is no estimate."""
        return self.total is not None and self.n < self.total


def asked(rs: list[Record]) -> int | None:
    """The problems a run was asked for: the most any of its records says (a resumed run may have asked more)."""
    return max((r.total for r in rs if r.total is not None), default=None)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # exact at the ends: rounding must not put the interval past an observed 0% or 100% (negative error bars)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


SHORT = {"code": "code", "arithmetic": "arith"}


def checks_of(r: Record) -> list[str]:
    """The rule checks a run ran, "programN" where N of its trees answered with a program, and "fallbackN" where N
    chains of thought voted with its tied trees."""
    on = [name for name, on in (("code", r.code_checks_on), ("arithmetic", r.arithmetic_checks_on)) if on]
    on += [f"program{r.program_trees}"] if r.program_trees else []
    return on + ([f"fallback{r.fallback_samples}"] if r.fallback_samples > 1 else [])


def method_label(method: str, checks: list[str], superseded: int | None = None) -> str:
    """A method and what its run added: "fot", "fot +code", "cot +code+arith", "fot +code+arith+program2"; a run
    of a superseded search says so: "fot (search v1)"."""
    label = method + (" +" + "+".join(SHORT.get(c, c) for c in checks) if checks else "")
    return label + (f" (search v{superseded})" if superseded else "")


def superseded(r: Record) -> int | None:
    """The search version of a run made by an older search of its task than today's (`SEARCH_VERSIONS`), else None."""
    from evals.data import TASK_OF
    from fot.forest import SEARCH_VERSIONS

    return r.search_version if r.search_version < SEARCH_VERSIONS[TASK_OF[r.benchmark]] else None


def load_runs(out: Path) -> dict[tuple[str, str], list[Record]]:
    runs = {}
    for path in sorted(out.glob("*/*.jsonl")):
        records = read_records(path)
        if records:
            runs[(records[0].benchmark, path.stem)] = records
    return runs


def twin_key(r: Record) -> tuple:
    return (r.benchmark, r.model, r.method, r.trees, r.backend, r.seed, r.concurrency, r.run.rsplit("-", 1)[1])


def summarise(runs: dict[tuple[str, str], list[Record]]) -> list[Row]:
    plain = {twin_key(rs[0]): rs for rs in runs.values() if rs[0].speculative == "none"}
    rows = []
    for (bench, name), rs in runs.items():
        first, n = rs[0], len(rs)
        k = sum(r.correct for r in rs)
        lo, hi = wilson(k, n)
        drafts = sum(r.draft_tokens for r in rs)
        speedup = None
        twin = plain.get(twin_key(first))
        if first.speculative != "none" and twin:
            mine = {r.id: r.seconds for r in rs}
            common = [(t.seconds, mine[t.id]) for t in twin if t.id in mine]
            if common and sum(s for _, s in common) > 0:
                speedup = sum(p for p, _ in common) / sum(s for _, s in common)
        rows.append(
            Row(
                benchmark=bench,
                run=name,
                model=ALIASES.get(first.model, Path(first.model).name),
                method=first.method,
                trees=first.trees,
                backend=first.backend,
                speculative=first.speculative,
                n=n,
                total=asked(rs),
                correct=k,
                accuracy=k / n,
                ci_low=lo,
                ci_high=hi,
                tokens=sum(r.tokens for r in rs) / n,
                prompt_tokens=sum(r.prompt_tokens for r in rs) / n,
                seconds=sum(r.seconds for r in rs) / n,
                accept_rate=sum(r.accepted_tokens for r in rs) / drafts if drafts else None,
                sd_speedup=speedup,
                checks=checks_of(first),
                repairs={c: sum(getattr(r, f"{c}_repairs") for r in rs) / n for c in checks_of(first) if c in SHORT},
                disagreements=sum(r.gym_correct != r.correct for r in rs if r.gym_correct is not None)
                if any(r.gym_correct is not None for r in rs)
                else None,
                cross_checked=sum(r.gym_correct is not None for r in rs),
                tree_accuracy=tree_accuracy(rs),
                tree_records=sum(bool(r.tree_correct) for r in rs),
                superseded=superseded(first),
                kernels=dict(Counter(r.kernels or "-" for r in rs)),
                concurrency=dict(Counter(r.concurrency for r in rs)),
            )
        )
    rows.sort(key=lambda r: (r.benchmark, r.model, r.method, r.trees, r.speculative))
    return rows


def tree_accuracy(rs: list[Record]) -> float | None:
    """The share of right answers among the trees of the records that keep them (None where none does): how good
    one tree is, against which the decision's accuracy shows what the forest adds."""
    marks = [c for r in rs if r.tree_correct for c in r.tree_correct]
    return sum(marks) / len(marks) if marks else None


def markdown(rows: list[Row]) -> str:
    out = [
        "# Evaluation results",
        "",
        "Generated by `python -m evals.report`; one row per run file. Accuracy with a 95% Wilson interval; "
        "*s / problem* is each problem's latency with the run's `--concurrency` problems in flight (their steps "
        "share the backend's batches); *SD speedup* compares with the same run under `--speculative none`. "
        "A run stopped before its end shows *n of total*: its problems are the first to finish (with problems in "
        "flight at once, the cheaper ones), not a sample, so its accuracy is no estimate and the plots leave it out. "
        "*Per tree* is the accuracy of the trees' (sc: the samples') own answers, before the decision (a tree that "
        "sparse activation stopped before it answered counts as unanswered); records from before it was kept show "
        "-. *Generated* and *prompt* are tokens per problem over all of a search's "
        "requests (a prompt counts once per request, whatever its number of samples; shared prefixes are cached, "
        "so prompt tokens cost less than their count).",
        "",
    ]
    by_bench: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_bench[r.benchmark].append(r)
    for bench, rs in by_bench.items():
        out += [
            f"## {bench}",
            "",
            "| model | method | trees | checks (repairs / problem) | drafter | n | accuracy (95% CI) "
            "| per tree | generated / problem | prompt / problem | s / problem | drafts accepted | SD speedup |",
            "|---|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rs:
            accept = f"{r.accept_rate:.0%}" if r.accept_rate is not None else "-"
            speed = f"{r.sd_speedup:.2f}x" if r.sd_speedup is not None else "-"
            n = f"{r.n} of {r.total}" if r.partial else f"{r.n}"
            checks = ", ".join(f"{SHORT[c]} ({r.repairs[c]:.2f})" if c in SHORT else c for c in r.checks) or "-"
            per_tree = f"{r.tree_accuracy:.1%}" if r.tree_accuracy is not None else "-"
            if r.tree_accuracy is not None and r.tree_records < r.n:  # over fewer problems than the accuracy
                per_tree += f" (of {r.tree_records})"
            method = method_label(r.method, [], r.superseded)  # the checks have their own column
            out.append(
                f"| {r.model} | {method} | {r.trees} | {checks} | {r.speculative} | {n} | {r.accuracy:.1%} "
                f"({r.ci_low:.0%}-{r.ci_high:.0%}) | {per_tree} | {r.tokens:.0f} | {r.prompt_tokens:.0f} "
                f"| {r.seconds:.1f} | {accept} "
                f"| {speed} |"
            )
        out += mixed_note(rs, "kernels", "on more than one build of our kernels (-: from before it was kept)")
        out += mixed_note(rs, "concurrency", "at more than one --concurrency (their seconds are a mix)", " at ")
        crossed = [r for r in rs if r.disagreements is not None]
        if crossed:
            bad = sum(r.disagreements for r in crossed)
            records = sum(r.cross_checked for r in crossed)
            note = "it reads the first number of an answer and drops its sign"
            out += ["", f"Cross-check with reasoning-gym's own `score_answer`: {bad} disagreements in {records} records"
                    f" ({note})."]  # fmt: skip
        out += [
            "",
            f"![accuracy vs trees]({bench}_accuracy_vs_trees.png)",
            "",
            f"![accuracy vs tokens]({bench}_accuracy_vs_tokens.png)",
            "",
        ]
    return "\n".join(out)


def mixed_note(rows: list[Row], field: str, what: str, by: str = " ") -> list[str]:
    """Lines naming the runs whose records were made under more than one value of `field` (a Row's counter): a
    resumed run on another CPU rounds bf16 sums differently (`kernels`), or timed its problems among another
    number in flight (`concurrency`). No lines where every run kept to one."""
    mixed = [r for r in rows if len(getattr(r, field)) > 1]
    if not mixed:
        return []
    runs = "; ".join(
        f"{r.label} x{r.trees} ({r.run.rsplit('-', 1)[1]}): "
        + ", ".join(f"{n}{by}{k}" for k, n in sorted(getattr(r, field).items(), key=str))
        for r in mixed
    )
    return ["", f"Made {what}: {runs}."]


def draw_trees(ax, rs: list[Row], ps: list[Pair]) -> None:
    """Accuracy vs trees: a line per model+method (error bars = CI); single-tree methods as flat dashed lines."""
    lines: dict[str, list[Row]] = defaultdict(list)
    for r in rs:
        lines[f"{r.model} {r.label}" + (f" ({r.speculative})" if r.speculative != "prompt_lookup" else "")].append(r)
    xs = sorted({r.trees for r in rs})
    for label, pts in sorted(lines.items()):
        pts.sort(key=lambda r: r.trees)
        y = [r.accuracy for r in pts]
        err = [[r.accuracy - r.ci_low for r in pts], [r.ci_high - r.accuracy for r in pts]]
        if len(pts) == 1 and pts[0].method in ("cot", "tot", "mctsr"):
            ax.hlines(y[0], min(xs), max(xs), linestyles="dashed", label=label, colors=f"C{len(ax.lines) % 10}")
        else:
            ax.errorbar([r.trees for r in pts], y, yerr=err, marker="o", capsize=3, label=label)
    ax.set(xlabel="trees (samples for sc)", xticks=xs)


def draw_tokens(ax, rs: list[Row], ps: list[Pair]) -> None:
    """Accuracy vs generated tokens per problem: a point per run, labelled with its trees; a colour per method and
    a marker per model, so that two models' runs of one method are told apart. A dotted line joins each
    budget-matched pair (FoT at no more tokens than self-consistency)."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    methods, models = sorted({r.label for r in rs}), sorted({r.model for r in rs})
    for model in models:
        for method in methods:
            pts = [r for r in rs if r.label == method and r.model == model]
            if not pts:
                continue
            color, marker = f"C{methods.index(method)}", "osD^v"[models.index(model) % 5]
            ax.scatter(
                [r.tokens for r in pts],
                [r.accuracy for r in pts],
                color=color,
                marker=marker,
                label=f"{model} {method}",
            )
            for r in pts:
                ax.annotate(f"{r.trees}", (r.tokens, r.accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    at = {r.run: r for r in rs}
    matched = [(at[p.run_a], at[p.run_b]) for p in ps if p.budget_matched and p.run_a in at and p.run_b in at]
    for i, (a, b) in enumerate(matched):
        ax.plot(
            [a.tokens, b.tokens], [a.accuracy, b.accuracy], ":", color="0.4", label="budget-matched" if i == 0 else None
        )
    ax.set(xlabel="generated tokens per problem")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


PLOTS = {"trees": draw_trees, "tokens": draw_tokens}


def plot(rows: list[Row], out: Path, ps: list[Pair] = ()) -> list[Path]:
    """Per benchmark, BENCH_accuracy_vs_trees.png and BENCH_accuracy_vs_tokens.png, from the runs that finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for bench in sorted({r.benchmark for r in rows}):
        for name, draw in PLOTS.items():
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            draw(
                ax, [r for r in rows if r.benchmark == bench and not r.partial], [p for p in ps if p.benchmark == bench]
            )
            ax.set(ylabel="accuracy", title=f"{bench}: accuracy vs {name}", ylim=(0, 1))
            if ax.get_legend_handles_labels()[0]:  # none when every run of the benchmark was stopped early
                ax.legend(fontsize=7)
            fig.tight_layout()
            written.append(out / f"{bench}_accuracy_vs_{name}.png")
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)
    return written


def mcnemar(only_a: int, only_b: int) -> float:
    """McNemar's exact two-sided p-value: under no difference, the problems only one method got right split as
    fair coin flips."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


class Pair(BaseModel):
    """Two runs on the same problems: who got which right."""

    benchmark: str
    model: str
    a: str
    b: str
    run_a: str
    run_b: str
    n: int
    both: int
    only_a: int
    only_b: int
    neither: int
    p_value: float
    tokens_a: float
    tokens_b: float
    partial: bool = False  # a run stopped before its end: its problems are the first to finish, no sample

    @computed_field
    @property
    def budget_matched(self) -> bool:
        """FoT against self-consistency at no more tokens per problem: the comparison the forest has to win."""
        return self.a.startswith("fot-") and self.b.startswith("sc-") and self.tokens_a <= self.tokens_b


def comparable(r: Record) -> tuple:
    """What two runs must share for a paired comparison to measure their methods and checks, not their setup
    (not dtype: the records keep the option as given, "auto" or "fast", which the run names resolve)."""
    return r.model, r.speculative, r.backend, r.device, r.seed


def same_budget(a: Record, b: Record) -> bool:
    """Same answer length and rollouts, where both records say (older ones do not; chains have no rollouts)."""
    return all(x is None or y is None or x == y for x, y in ((a.max_tokens, b.max_tokens), (a.rollouts, b.rollouts)))


def pairs(runs: dict[tuple[str, str], list[Record]]) -> list[Pair]:
    """The comparisons the report makes, on the problems both runs finished: each run with rule checks against its
    twins with fewer of them, each FoT run against each self-consistency run of the same model, and against chain
    of thought with the same checks (what the forest adds to one answer)."""
    label = {k: method_label(f"{r[0].method}-{r[0].trees}", checks_of(r[0]), superseded(r[0])) for k, r in runs.items()}
    out = []
    for (bench, a), ra in runs.items():
        for (bench_b, b), rb in runs.items():
            fa, fb = ra[0], rb[0]
            if bench_b != bench or a == b or comparable(fa) != comparable(fb) or not same_budget(fa, fb):
                continue
            checks_a, checks_b = checks_of(fa), checks_of(fb)
            ablation = set(checks_a) > set(checks_b) and (fa.method, fa.trees, fa.search_version) == (
                fb.method, fb.trees, fb.search_version
            )  # fmt: skip
            one_chain = fb.method == "cot" and checks_a == checks_b
            if not (ablation or fa.method == "fot" and (fb.method == "sc" or one_chain)):
                continue
            gold_b = {r.id: r.gold for r in rb}
            if any(gold_b.get(r.id, r.gold) != r.gold for r in ra):  # same ids, other problems (other --levels...)
                continue
            right_b = {r.id: r.correct for r in rb}
            common = [(r.correct, right_b[r.id]) for r in ra if r.id in right_b]
            if not common:
                continue
            only_a, only_b = sum(x and not y for x, y in common), sum(y and not x for x, y in common)
            ids = {r.id for r in ra} & set(right_b)
            out.append(
                Pair(
                    benchmark=bench, model=ALIASES.get(fa.model, Path(fa.model).name), a=label[(bench, a)],
                    b=label[(bench_b, b)], run_a=a, run_b=b, n=len(common),
                    both=sum(x and y for x, y in common), only_a=only_a, only_b=only_b,
                    neither=sum(not x and not y for x, y in common), p_value=mcnemar(only_a, only_b),
                    tokens_a=sum(r.tokens for r in ra if r.id in ids) / len(ids),
                    tokens_b=sum(r.tokens for r in rb if r.id in ids) / len(ids),
                    partial=any((n := asked(rs)) is not None and len(rs) < n for rs in (ra, rb)),
                )
            )  # fmt: skip
    return out


PAIR_COLUMNS = "benchmark model A B n: both: only_A: only_B: neither: p: generated_A: generated_B: budget-matched"
RULE_COLUMNS = "benchmark model method trees: n: decision_(CGED): first_answers: last_answers: every_node: reached:"
EXPERT_COLUMNS = (
    "benchmark model method trees: n: majority: plurality: expert_asked: declined: right_after_declining: "
    "right_one_among_the_candidates:"
)


def section(title: str, paragraphs: list[str], columns: str, cells: list[list]) -> str:
    """A report section: its title, its paragraphs, then a table of `cells` (nothing without cells). `columns`
    are names, a _ for a space and a trailing : for a right-aligned column."""
    if not cells:
        return ""
    names = columns.split()
    head = "| " + " | ".join(n.rstrip(":").replace("_", " ") for n in names) + " |"
    align = "|" + "|".join("---:" if n.endswith(":") else "---" for n in names) + "|"
    rows = ["| " + " | ".join(str(c) for c in row) + " |" for row in cells]
    return "\n".join([f"## {title}", "", *(x for p in paragraphs for x in (p, "")), head, align, *rows]) + "\n"


def pairs_markdown(ps: list[Pair]) -> str:
    notes = [
        "The problems both runs finished; p: McNemar's exact test. *(partial)*: a run was stopped before its end, "
        "so the pair holds the problems that finished first (the cheaper ones): no estimate of the whole set.",
        "*budget-matched*: FoT generates no more tokens per problem than self-consistency (dotted on the plots); "
        "prompt tokens are not counted in it (see the tables above).",
    ]
    cells = [
        [p.benchmark, p.model, p.a, p.b, f"{p.n} (partial)" if p.partial else p.n, p.both, p.only_a, p.only_b]
        + [p.neither, f"{p.p_value:.3g}"]
        + [f"{p.tokens_a:.0f}", f"{p.tokens_b:.0f}", "yes" if p.budget_matched else ""]
        for p in ps
    ]
    return section("Paired comparisons", notes, PAIR_COLUMNS, cells)


class Rules(BaseModel):
    """One forest run's records scored under other decision rules: where its accuracy is lost."""

    benchmark: str
    model: str
    label: str
    trees: int
    n: int  # records that keep their trees' nodes
    decided: int  # right under the run's own decision (CGED)
    first: int  # a plain vote (ties: the first seen) over each tree's first answer
    last: int  # ... over each tree's last answer
    every: int  # ... over every answered node of every tree
    reached: int  # some node had the right answer: what a perfect decision would get


@dataclass(frozen=True)
class Forest:
    """A forest run's records, and what its tables need: its task and its name."""

    benchmark: str
    model: str
    label: str
    trees: int
    task: Task
    records: list[Record]

    def right(self, r: Record, answer: str) -> bool:
        """Whether `answer` is right for the problem of record r."""
        from evals.data import Problem, score

        # Game of 24's gold is an expression over the puzzle's numbers, each used once
        question = " ".join(re.findall(r"\d+", r.gold)) if self.benchmark == "game24" else ""
        return score(Problem(id=r.id, question=question, gold=r.gold, task=self.task.name), answer)

    def named(self) -> dict[str, str | int]:
        return {"benchmark": self.benchmark, "model": self.model, "label": self.label, "trees": self.trees}


def forests(runs: dict[tuple[str, str], list[Record]]) -> list[Forest]:
    """Each forest run (2+ trees), in the tables' order."""
    from fot.tasks import get_task

    out = []
    for (bench, _), rs in runs.items():
        first = rs[0]
        if first.method == "fot" and first.trees >= 2:
            model = ALIASES.get(first.model, Path(first.model).name)
            label = method_label(first.method, checks_of(first), superseded(first))
            task = get_task("game24" if bench == "game24" else "math")
            out.append(Forest(benchmark=bench, model=model, label=label, trees=first.trees, task=task, records=rs))
    return sorted(out, key=lambda f: (f.benchmark, f.model, f.trees, f.label))


def rules(runs: dict[tuple[str, str], list[Record]]) -> list[Rules]:
    """Each forest run (2+ trees) scored under other decision rules, on its records that keep their nodes."""
    out = []
    for f in forests(runs):
        kept = [r for r in f.records if r.node_answers is not None]
        if not kept:
            continue
        counts = Counter()
        for r in kept:
            nodes = [a for tree in r.node_answers for a in tree]
            votes = {
                "first": [tree[0] for tree in r.node_answers if tree],
                "last": [tree[-1] for tree in r.node_answers if tree],
                "every": nodes,
            }
            for rule, answers in votes.items():
                ranked = majority_key(f.task, answers)
                counts[rule] += bool(ranked) and f.right(r, ranked[0][0])
            counts["decided"] += r.correct
            counts["reached"] += any(f.right(r, a) for a in set(nodes))
        out.append(Rules(**f.named(), n=len(kept), **counts))
    return out


def rules_markdown(rs: list[Rules]) -> str:
    note = (
        "Each forest run's records (those that keep their trees' nodes) scored under other decision rules: a plain "
        "vote (ties: the first seen) over each tree's first answer, over its last, and over every answered node; "
        "*reached*: some node had the right answer, what a perfect decision would get."
    )
    cells = [[r.benchmark, r.model, r.label, r.trees, r.n, r.decided, r.first, r.last, r.every, r.reached] for r in rs]
    return section("Where the forests' accuracy is lost", [note], RULE_COLUMNS, cells)


class Experts(BaseModel):
    """One forest run's decisions by kind: how often it asked its expert, how often the expert declined, and what
    the fallback's chain of thought got then."""

    benchmark: str
    model: str
    label: str
    trees: int
    n: int
    majority: int
    plurality: int
    asked: int  # no majority or plurality among the trees' answers: the expert picks among them
    declined: int  # ... and said it did not know: the fallback's answer was taken
    fallback_right: int  # ... and that answer was right
    among: int  # declined where one of the trees' answers was right


def experts(runs: dict[tuple[str, str], list[Record]]) -> list[Experts]:
    """Each forest run's decisions by kind, over all its records (older ones keep their decision and votes too)."""
    out = []
    for f in forests(runs):
        kinds = Counter(r.decision for r in f.records)
        # a fallback where the trees had answers: the expert declined (without answers, none was asked)
        declined = [r for r in f.records if r.decision == "fallback" and r.votes]
        out.append(
            Experts(
                **f.named(),
                n=len(f.records),
                majority=kinds["majority"],
                plurality=kinds["plurality"],
                asked=kinds["expert"] + len(declined),
                declined=len(declined),
                fallback_right=sum(r.correct for r in declined),
                among=sum(any(f.right(r, a) for a in r.votes) for r in declined),
            )
        )
    return out


def experts_markdown(es: list[Experts]) -> str:
    note = (
        "How each forest run decided (CGED): by a majority of its trees, by a plurality, or by asking the model as an "
        "expert to pick among the trees' answers. Where the expert says it does not know, a chain of thought "
        "answers instead (*declined*); *right one among the candidates*: declined although one of the trees' "
        "answers was right."
    )
    cells = [
        [e.benchmark, e.model, e.label, e.trees, e.n, e.majority, e.plurality, e.asked, e.declined]
        + [e.fallback_right, e.among]
        for e in es
    ]
    return section("The expert's decisions", [note], EXPERT_COLUMNS, cells)


def write_report(out: Path) -> Path:
    """Write OUT/REPORT.md, OUT/summary.json and the plots from every run file under OUT."""
    runs = load_runs(out)
    rows = summarise(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text("[\n" + ",\n".join(r.model_dump_json() for r in rows) + "\n]\n")
    ps = pairs(runs)
    plot(rows, out, ps)
    path = out / "REPORT.md"
    tables = [markdown(rows), pairs_markdown(ps), rules_markdown(rules(runs)), experts_markdown(experts(runs))]
    path.write_text("\n".join(tables))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m evals.report", description="Write REPORT.md, summary.json and plots.")
    p.add_argument("folder", nargs="?", default="evals/results", help="the results folder (default: evals/results)")
    folder = Path(p.parse_args(argv).folder)
    if not folder.is_dir():  # a typo wrote a report of nothing into a new folder of that name
        p.error(f"{folder} is not a folder of results")
    print(write_report(folder))


if __name__ == "__main__":
    main()
