"""Fill the README's result tables from merged study results (``polyp_accuracy.py --merge-only`` JSON), so that the
README shows exactly what the committed results say.

Each table sits between ``<!-- NAME -->`` and ``<!-- /NAME -->`` in the README and is replaced whole:

- ``screening-table``: one row per model of a screening merge (val / Kvasir / ClinicDB mean Dice, the learned gate,
  the validation Dice change when the memory is emptied), best validation first;
- ``bundle-table``: the confirmation through the bundle: per test set, every metric of the suite (mean ± SD over
  seeds), the validation mDice, its change over the last quarter of the run (plateau), the memory-use diagnostic;
  then every pairwise comparison of mean Dice with its within-one-SD verdict.

Usage::

    python benchmarks/readme_tables.py --screening benchmarks/results/ecrm_study_screen_128px.json \\
        --bundle benchmarks/results/ecrm_study_bundle_256px.json [--readme README.md] [--print]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from polyp_accuracy import SUITE, TABLE_HEADERS, comparison_cells  # noqa: E402

VAL = "val"


def _cell(stats: dict[str, Any] | None, digits: int = 3) -> str:
    if not stats or stats.get("mean") is None:
        return ""
    text = f"{stats['mean']:.{digits}f}"
    return text + (f" ± {stats['sd']:.{digits}f}" if stats.get("sd") is not None else "")


def _seeds(entry: dict[str, Any]) -> str:
    return ",".join(str(seed) for seed in entry["seeds"])


def screening_table(merged: dict[str, Any]) -> str:
    entries = sorted(
        merged["aggregate"], key=lambda e: -((e["summary"].get(VAL) or {}).get("dice") or {}).get("mean", 0.0)
    )
    lines = [
        "| Model | Seeds | Val mDice | Kvasir mDice | ClinicDB mDice | Gate | ΔDice, memory emptied (val) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for entry in entries:
        summary, use = entry["summary"], entry.get("memory_use") or {}
        gate = _cell(use.get("context_gate"), 4)
        emptied = _cell((use.get("dice_change_memory_emptied") or {}).get(VAL))
        cells = [_cell((summary.get(name) or {}).get("dice")) for name in (VAL, "kvasir", "clinicdb")]
        lines.append("| " + " | ".join([entry["model"], _seeds(entry), *cells, gate, emptied]) + " |")
    return "\n".join(lines)


def bundle_table(merged: dict[str, Any]) -> str:
    entries = merged["aggregate"]
    tests = [name for name in dict.fromkeys(n for e in entries for n in e["summary"]) if name != VAL]
    headers = [TABLE_HEADERS[key] for key in SUITE if key not in ("precision", "recall")]
    keys = [key for key in SUITE if key not in ("precision", "recall")]
    lines = []
    for name in tests:
        images = sorted({e["summary"][name]["images"] for e in entries if name in e["summary"]})
        lines += [
            f"**{name}** ({'/'.join(str(n) for n in images)} images, original size, mean ± SD over seeds)",
            "",
            "| Model | Seeds | Steps | " + " | ".join(headers) + " |",
            "|---|---|---:|" + "---:|" * len(headers),
        ]
        for entry in entries:
            if name in entry["summary"]:
                cells = [_cell(entry["summary"][name].get(key)) for key in keys]
                lines.append("| " + " | ".join([entry["model"], _seeds(entry), str(entry["steps"]), *cells]) + " |")
        lines.append("")
    lines += [
        "**Validation and memory use** (val mDice at the training size; plateau: relative change of val mDice over "
        "the last quarter of the steps; ΔDice: validation mean Dice with the memory emptied minus with it)",
        "",
        "| Model | Seeds | Val mDice | Plateau | ΔDice, memory emptied |",
        "|---|---|---:|---:|---:|",
    ]
    for entry in entries:
        change = entry.get("val_dice_relative_change") or {}
        plateau = "" if change.get("mean") is None else f"{100 * change['mean']:+.1f} %"
        if change.get("sd") is not None:
            plateau += f" ± {100 * change['sd']:.1f}"
        use = entry.get("memory_use") or {}
        emptied = _cell((use.get("dice_change_memory_emptied") or {}).get(VAL))
        val = _cell((entry["summary"].get(VAL) or {}).get("dice"))
        lines.append("| " + " | ".join([entry["model"], _seeds(entry), val, plateau, emptied]) + " |")
    lines += [
        "",
        "**Comparisons** (Delta = first minus second, mean Dice; within one SD: the difference is at most the larger "
        "of the two SDs over seeds)",
        "",
        "| Test set | First vs second | Delta mDice | Within 1 SD? | Suite metrics within 1 SD |",
        "|---|---|---:|---|---|",
    ]
    for comparison in merged["comparisons"]:
        pair, delta, within, count = comparison_cells(comparison)
        lines.append("| " + " | ".join([comparison["dataset"], pair, delta, within, count]) + " |")
    return "\n".join(lines)


def fill(text: str, name: str, table: str) -> str:
    pattern = re.compile(rf"(<!-- {re.escape(name)} -->\n).*?(<!-- /{re.escape(name)} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README: no <!-- {name} --> ... <!-- /{name} --> block")
    return pattern.sub(lambda m: m.group(1) + table.rstrip("\n") + "\n" + m.group(2), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--screening", type=Path, help="merged screening JSON")
    parser.add_argument("--bundle", type=Path, help="merged bundle-study JSON")
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[1] / "README.md")
    parser.add_argument("--print", action="store_true", help="print the tables instead of writing the README")
    args = parser.parse_args(argv)
    tables = {}
    if args.screening:
        tables["screening-table"] = screening_table(json.loads(args.screening.read_text()))
    if args.bundle:
        tables["bundle-table"] = bundle_table(json.loads(args.bundle.read_text()))
    if args.print:
        for name, table in tables.items():
            print(f"<!-- {name} -->\n{table}\n")
        return 0
    text = args.readme.read_text()
    for name, table in tables.items():
        text = fill(text, name, table)
    args.readme.write_text(text)
    print(f"{args.readme}: {', '.join(tables)} filled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
