"""Render the benchmark results (bench/results/*.json) into the documentation, so that no result is typed by hand.

Writes docs/benchmarks.md whole, and the marked blocks ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->``
of README.md and the docs pages: ``fewshot_real`` (the real-CT table), ``param_counts`` (the methods' trainable
parameters), ``predict_scaling`` (fsseg-predict against structures and scan size) and ``confidence_real`` (the
confidence against Dice). ``--check`` writes nothing
and exits 1 naming the files that are out of date (a test runs it).

    python bench/render_docs.py [--check]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from fewshot_real import TARGET, arm, summarise
from fewshot_real_table import dice_of, firsts, wins_against
from results_file import REPO, RESULTS, STAMP

BENCHMARKS_PAGE = REPO / "docs" / "benchmarks.md"
PAGES_WITH_BLOCKS = [
    REPO / "README.md",
    REPO / "docs" / "index.md",
    REPO / "docs" / "adaptation.md",
    REPO / "docs" / "prediction.md",
]
BLOCK = re.compile(r"(<!-- results:(?P<name>[a-z_]+) -->\n).*?(<!-- /results:(?P=name) -->)", re.S)
REFERENCE = ("unet", "ft (uncapped)")  # what the frozen-backbone methods are measured against
MODEL_NAMES = {"unet": "tiny UNet", "merlin": "Merlin encoder"}  # fewshot_real.py's foundation models


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def cell(value: object) -> str:
    """A value as a table shows it: floats to 3 decimals, large integers with separators, lists joined."""
    if isinstance(value, bool) or value is None:
        return "–" if value is None else ("yes" if value else "no")
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return " + ".join(map(str, value)) if all(isinstance(v, str) for v in value) else "×".join(map(str, value))
    return str(value).replace("|", "/")


def rows_table(document: dict) -> str:
    """Every row of a result file with its columns and where it was measured."""
    columns = {**document["columns"], **{key: key for key in STAMP}}
    return table(list(columns.values()), [[cell(row.get(key)) for key in columns] for row in document["rows"]])


def fewshot_summary(rows: list[dict]) -> str:
    """Method x K: mean ± std of Dice over the pairs, pairs won against full fine-tuning, trainable parameters."""
    shots = sorted({r["shots"] for r in rows})
    dice = dice_of(rows)
    wins, first = wins_against(dice, REFERENCE), firsts(dice)
    summary = summarise(rows)
    body = []
    for model, method in dict.fromkeys((r["model"], r["method"]) for r in summary):
        cells = {r["shots"]: r for r in summary if (r["model"], r["method"]) == (model, method)}
        line = [MODEL_NAMES.get(model, model), f"`{method}`"]
        for k in shots:
            c = cells.get(k)
            line.append(f"{c['dice_mean']:.3f} ± {c['dice_std']:.3f} ({c['pairs']})" if c else "–")
        for counts in (first, wins):
            line.append(
                " / ".join(
                    f"{counts[(model, method, k)][0]} of {counts[(model, method, k)][1]}"
                    if (model, method, k) in counts
                    else "–"
                    for k in shots
                )
            )
        line.append(f"{next(iter(cells.values()))['trainable_params']:,}")
        body.append(line)
    ks = " / ".join(f"K = {k}" for k in shots)
    header = [
        "model",
        "method",
        *(f"K = {k}: Dice (pairs)" for k in shots),
        f"first of its model's, {ks}",
        f"above {MODEL_NAMES[REFERENCE[0]]} `{REFERENCE[1]}`, {ks}",
        "trainable",
    ]
    return table(header, body)


def fewshot_pairs(rows: list[dict]) -> str:
    """Dice per (K, supports, test) pair and model/method."""
    dice = dice_of(rows)
    columns = list(dict.fromkeys((r["model"], arm(r)) for r in rows))
    pairs = sorted({pair for *_, pair in dice})
    body = [
        [
            str(k),
            f"{' + '.join(supports)} → {test}",
            *(
                f"{dice[(m, a, (k, supports, test))]:.3f}" if (m, a, (k, supports, test)) in dice else "–"
                for m, a in columns
            ),
        ]
        for k, supports, test in pairs
    ]
    return table(["K", "supports → test", *(f"{m} `{a}`" for m, a in columns)], body)


def fewshot_block(document: dict) -> str:
    """The real-CT table of README.md and docs/index.md."""
    rows = document["rows"]
    return (
        f"{TARGET.capitalize()} Dice on a held-out subject of the sample CT, mean ± std over the (supports, test) "
        "pairs; in how many pairs each method was its model's best, and beat full fine-tuning; trainable "
        "parameters. The tiny UNet (0.36M) is pretrained on the subjects left over; Merlin's encoder is a "
        "real 117M-parameter CT encoder with a decoder pretrained the same way. Methods are capped at the "
        "run's epochs unless marked uncapped. From `bench/results/fewshot_real.json` (every pair: "
        "[Benchmarks](docs/benchmarks.md)):\n\n" + fewshot_summary(rows)
    )


def param_counts_block(document: dict) -> str:
    """Trainable parameters of each method, one structure, per backbone, beside the reference code's."""
    models = list(dict.fromkeys(r["model"] for r in document["rows"]))
    counts = {(r["model"], r["method"]): r["trainable"] for r in document["rows"]}
    methods = list(dict.fromkeys(r["method"] for r in document["rows"]))
    reference = {r["method"]: r.get("reference") for r in document["rows"]}
    body = [[f"`{m}`", *(cell(counts.get((model, m))) for model in models), cell(reference[m])] for m in methods]
    return table(["method", *models, "reference code (SwinUNETR-48)"], body)


def predict_scaling_block(document: dict) -> str:
    """docs/prediction.md: fsseg-predict's time and memory against structures and scan size, and how the direct
    label map agrees with resampling each structure."""
    rows = document["rows"]
    runs = [r for r in rows if r["kind"] == "predict"]
    body = [
        [
            r["model"],
            r.get("weights", "initial"),
            r["shape"],
            cell(r["structures"]),
            f"{r['seconds']:.1f}",
            cell(r.get("per_structure_s")),
            cell(r.get("ratio_to_one")),
            f"{r['peak_rss_gb']:.2f}",
        ]
        for r in sorted(runs, key=lambda r: (r["model"], r.get("weights", "initial"), r["shape"], r["structures"]))
    ]
    parts = [
        table(
            [
                "model",
                "weights",
                "scan",
                "structures",
                "seconds",
                "s per extra structure",
                "× one structure",
                "peak GB",
            ],
            body,
        )
    ]
    compared = [
        [
            r["model"],
            r.get("weights", "initial"),
            cell(r["structures"]),
            f"{r['old_seconds']:.1f}",
            f"{r['seconds']:.1f}",
            f"{r['agree_percent']:.5f}",
            f"{r['min_dice']:.6f}",
        ]
        for r in rows
        if r["kind"] == "agreement"
    ]
    if compared:
        parts.append(
            "\nThe same probabilities returned to the 512×512×400 grid both ways (Dice over structures of "
            "more than 1,000 voxels):\n\n"
            + table(
                [
                    "model",
                    "weights",
                    "structures",
                    "resampling each (s)",
                    "direct (s)",
                    "voxels agreeing %",
                    "min Dice",
                ],
                compared,
            )
        )
    precision = [
        [
            r["model"],
            r["weights"],
            f"{r['seconds']:.1f}",
            f"{r['bf16_seconds']:.1f}",
            f"{r['speedup']:.2f}",
            f"{r['agree_percent']:.5f}",
        ]
        for r in rows
        if r["kind"] == "precision"
    ]
    if precision:
        parts.append(
            "\nOne structure in float32 and under bfloat16 autocast (`--cpu-bf16`):\n\n"
            + table(["model", "weights", "float32 (s)", "bfloat16 (s)", "speed-up", "voxels agreeing %"], precision)
        )
    host = {r["host"] for r in rows}
    return (
        f"Synthetic CT, random weights, overlap {rows[0]['overlap']}, each run in its own process. organs: the "
        "network runs as in fsseg-predict and its probabilities are replaced by organ-like ones (ellipsoids with "
        "smooth borders) before the return to the scan's grid, as a trained network's look; initial and "
        "decisive: fsseg-predict itself, with the head as initialised or ×20. Measured on "
        f"{', '.join(sorted(host))}:\n\n"
        + "".join(parts)
        + "\n![time and memory against structures and scan size](predict_scaling.png)\n"
    )


def confidence_block(document: dict) -> str:
    """docs/prediction.md: the rank correlation of confidence and Dice, over all runs and per method."""
    body = [[row["methods"], cell(row["runs"]), f"{row['spearman']:+.3f}", f"{row['p_value']:.2g}",
             row["confidence_range"], row["dice_range"]] for row in document["rows"]]  # fmt: skip
    first, methods = document["rows"][0], document["rows"][1:]
    low, high = min(methods, key=lambda r: r["spearman"]), max(methods, key=lambda r: r["spearman"])
    weak = sum(r["p_value"] >= 0.05 for r in methods)
    return (
        f"Spearman's rank correlation of confidence and Dice on the demo's real-CT task (checkpoint: "
        f"{first['checkpoint']}; measured on {first['host']}, from `bench/results/confidence_real.json`):\n\n"
        + table(["runs of", "runs", "Spearman ρ", "p", "confidence", "Dice"], body)
        + f"\nOver all {first['runs']} runs ρ = {first['spearman']:+.3f}; within one method it ranges from "
        f"{low['spearman']:+.3f} ({low['methods']}) to {high['spearman']:+.3f} ({high['methods']}), and {weak} of the "
        f"{len(methods)} methods' correlations have p ≥ 0.05 on their {low['runs']} runs"
        + (
            ": the confidence tells one method's poor masks from another's good ones better than it ranks the runs "
            "of one method. Its scale is not a probability of being right; compare confidences, don't read them "
            "alone.\n"
            if weak
            else ".\n"
        )
    )


def benchmarks_page(documents: dict[str, dict]) -> str:
    """docs/benchmarks.md: each benchmark's question, command and rows; the real-CT one summarised first."""
    parts = [
        "# Benchmarks\n\n<!-- Generated by bench/render_docs.py from bench/results/*.json: do not edit. -->\n\n"
        "Each benchmark answers one question; its script writes one current JSON file in `bench/results/` "
        "(git keeps the earlier ones), every row stamped with the commit, date, host and torch it was "
        "measured with. `python bench/render_docs.py` renders this page from them.\n"
    ]
    for name, document in documents.items():
        parts.append(f"\n## {name}\n\n{document['question']}\n\nRun: `{document['command']}`\n\n")
        if name == "fewshot_real":
            parts.append(
                "Summary (methods trained for at most the run's epoch cap unless marked uncapped):\n\n"
                + fewshot_summary(document["rows"])
                + "\nDice per pair:\n\n"
                + fewshot_pairs(document["rows"])
                + "\nEvery row:\n\n"
            )
        parts.append(rows_table(document))
    return "".join(parts)


def rendered(documents: dict[str, dict]) -> dict[Path, str]:
    """The new text of every file the results appear in."""
    blocks = {
        "fewshot_real": fewshot_block,
        "param_counts": param_counts_block,
        "predict_scaling": predict_scaling_block,
        "confidence_real": confidence_block,
    }
    out = {BENCHMARKS_PAGE: benchmarks_page(documents)}
    for page in PAGES_WITH_BLOCKS:
        text = page.read_text()
        link = "benchmarks.md" if page.parent.name == "docs" else "docs/benchmarks.md"
        out[page] = BLOCK.sub(
            lambda m: (  # noqa: B023 (called by sub at once, in this iteration)
                m.group(1)
                + blocks[m.group("name")](documents[m.group("name")]).replace("docs/benchmarks.md", link)
                + m.group(3)
            ),
            text,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is out of date")
    args = parser.parse_args()
    documents = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    documents = {"fewshot_real": documents.pop("fewshot_real"), **documents}
    stale = [path for path, text in rendered(documents).items() if not path.is_file() or path.read_text() != text]
    if args.check:
        if stale:
            sys.exit(
                "out of date (run python bench/render_docs.py): " + ", ".join(str(p.relative_to(REPO)) for p in stale)
            )
        return
    for path, text in rendered(documents).items():
        if path in stale:
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
