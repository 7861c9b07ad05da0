"""The per-pair Dice and pair counts of bench/fewshot_real.py's results (bench/results/fewshot_real.json).

A row is one (model, method, K, supports, test subject); a method run without an epoch cap is its own arm,
``ft (uncapped)``. ``--same-pairs`` keeps only the (K, supports, test) pairs that every model has, to compare the
models on equal ground. Prints the Dice of every pair, the table of fewshot_real.py, in how many pairs each model
leads the other models with the same method, and in how many pairs each method is first of its model's methods.
``--against MODEL:METHOD`` also counts the pairs in which each other row beats that one (e.g. ``unet:ft
(uncapped)``, the full fine-tuning the frozen-backbone methods are measured against).

    python bench/fewshot_real_table.py --same-pairs --against "unet:ft (uncapped)"
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from fewshot_real import arm, print_table, summarise
from results_file import RESULTS

Pair = tuple[int, tuple[str, ...], str]
Dice = dict[tuple[str, str, Pair], float]
Counts = dict[tuple[str, str, int], tuple[int, int]]


def pair_of(row: dict) -> Pair:
    """(K, supports, test subject) of a result row."""
    return row["shots"], tuple(row["supports"]), row["test_subject"]


def collect(path: Path) -> list[dict]:
    """The rows of a result file of fewshot_real.py."""
    try:
        return json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError) as error:
        sys.exit(f"{path}: not a fewshot_real.py result ({error})")


def same_pairs(rows: list[dict]) -> list[dict]:
    """The rows of the pairs that every model has."""
    models = {r["model"] for r in rows}
    pairs = set.intersection(*({pair_of(r) for r in rows if r["model"] == m} for m in models))
    return [r for r in rows if pair_of(r) in pairs]


def dice_of(rows: list[dict]) -> Dice:
    """Dice by (model, method, pair)."""
    return {(r["model"], arm(r), pair_of(r)): r["dice"] for r in rows}


def tally(hits: Iterable[tuple[tuple[str, str, Pair], bool]]) -> Counts:
    """For each (model, method, K): in how many of its pairs the test held, and how many pairs were tested, from one
    ((model, method, pair), held) per pair tested."""
    out: Counts = {}
    for (model, method, pair), held in hits:
        count, tested = out.get((model, method, pair[0]), (0, 0))
        out[(model, method, pair[0])] = count + held, tested + 1
    return out


def leads(dice: Dice) -> Counts:
    """For each (model, method, K): in how many pairs its Dice is above every other model's with that method, and
    in how many pairs another model has that method at all."""

    def hits():
        for (model, method, pair), value in dice.items():
            others = [v for (m, meth, p), v in dice.items() if meth == method and p == pair and m != model]
            if others:
                yield (model, method, pair), value > max(others)

    return tally(hits())


def firsts(dice: Dice) -> Counts:
    """For each (model, method, K): in how many pairs its Dice is the highest of that model's methods (a tie counts
    for each), and how many pairs the model has."""
    best: dict[tuple[str, Pair], float] = {}
    for (model, _, pair), value in dice.items():
        best[(model, pair)] = max(value, best.get((model, pair), value))
    return tally((key, value == best[(key[0], key[2])]) for key, value in dice.items())


def wins_against(dice: Dice, reference: tuple[str, str]) -> Counts:
    """For each (model, method, K) but the reference: in how many pairs its Dice is above the reference's, and in how
    many pairs both were run."""
    return tally(
        ((model, method, pair), value > dice[(*reference, pair)])
        for (model, method, pair), value in dice.items()
        if (model, method) != reference and (*reference, pair) in dice
    )


def print_counts(title: str, counts: Counts) -> None:
    """One line per (model, method, K): count of pairs out of pairs compared."""
    print(f"\n{title}:")
    for (model, method, shots), (count, compared) in sorted(counts.items()):
        print(f"  {model:8s} {method:10s} K={shots}: {count} of {compared}")


def reference_of(text: str) -> tuple[str, str]:
    """MODEL:METHOD of --against."""
    model, sep, method = text.partition(":")
    if not sep or not model or not method:
        raise argparse.ArgumentTypeError(f"expected MODEL:METHOD, e.g. unet:ft, got {text!r}")
    return model, method


def print_pairs(dice: Dice) -> None:
    """Dice per pair (rows) and model/method (columns)."""
    columns = sorted({(model, method) for model, method, _ in dice})
    print(f"{'K':>2s} {'supports -> test':28s}" + "".join(f"{m + ' ' + meth:>18s}" for m, meth in columns))
    for pair in sorted({pair for *_, pair in dice}):
        name = f"{'+'.join(pair[1])} -> {pair[2]}"
        cells = "".join(
            f"{dice[(m, meth, pair)]:18.3f}" if (m, meth, pair) in dice else f"{'-':>18s}" for m, meth in columns
        )
        print(f"{pair[0]:2d} {name:28s}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "results",
        nargs="?",
        type=Path,
        default=RESULTS / "fewshot_real.json",
        help="result file of bench/fewshot_real.py (default: bench/results/fewshot_real.json)",
    )
    parser.add_argument("--same-pairs", action="store_true", help="only the pairs that every model has")
    parser.add_argument(
        "--against",
        type=reference_of,
        metavar="MODEL:METHOD",
        help="also count the pairs in which each other model and method beats this one",
    )
    args = parser.parse_args()
    rows = collect(args.results)
    if args.same_pairs:
        rows = same_pairs(rows)
    if not rows:
        sys.exit("no row is left: the models share no (K, supports, test) pair")
    dice = dice_of(rows)
    print()
    print_pairs(dice)
    print()
    table = summarise(rows)
    print_table(table, sorted({r["shots"] for r in table}))
    ahead = leads(dice)
    if ahead:
        print_counts("ahead of the other models with the same method, in pairs", ahead)
    print_counts("first of its model's methods, in pairs", firsts(dice))
    if args.against:
        reference = ":".join(args.against)
        against = wins_against(dice, args.against)
        if not against:
            sys.exit(f"--against {reference}: no pair has that model and method")
        print_counts(f"above {reference}, in pairs", against)


if __name__ == "__main__":
    main()
