"""Write a UI's flag list (lowvram/ui/flags/*.txt) from its own argument parser sources, read as data.

Each source is parsed with `ast` by lowvram's own reader (`lowvram/world/detect/ui_flags.py`,
`parse_parser_source`): every `add_argument` option string, whether it takes a value, its literal
choices, and each `add_mutually_exclusive_group` (named after the variable that holds it). Nothing is
imported or run. The output keeps lowvram's flag-list format (see the header of any
lowvram/ui/flags/*.txt), one section per source, and names the sources and the commit in its header.

    python scripts/extract_flags.py --title "Forge Neo" --origin "Haoming02/sd-webui-forge-classic (neo)" \\
        --commit 089030f1 backend/args.py=/tmp/neo/backend/args.py modules/cmd_args.py=/tmp/neo/cmd_args.py \\
        > lowvram/ui/flags/forge-neo.txt

A source is `LABEL=PATH` (LABEL is what the header calls it) or a PATH; a flag two sources define is
written once, where it first appears.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

from lowvram.world.detect.ui_flags import parse_parser_source

FORMAT = ("# One flag per line: `--name` (on/off), `--name value`, `--name value:a,b` (choices),\n"
          "# `--name values` (nargs '+'), `--name optvalue` (nargs '?'), `--name optvalues` (nargs '*');\n"
          "# `group NAME: --a --b` = argparse mutually exclusive group (two of them exit 2).\n")


def group_names(tree: ast.AST) -> dict[tuple[str, ...], str]:
    """The variable each mutually exclusive group is assigned to, keyed by the group's members (as
    parse_parser_source lists them)."""
    _flags, groups = parse_parser_source(tree)
    receivers: dict[str, str] = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
                and isinstance(node.func.value, ast.Name)):
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("-"):
                    receivers[arg.value] = node.func.value.id
    out: dict[tuple[str, ...], str] = {}
    for members in groups:
        var = receivers.get(members[0], f"group{len(out) + 1}")
        out[members] = var.removesuffix("_group").replace("_", "-") or var
    return out


def section(label: str, text: str, seen: set[str]) -> list[str]:
    tree = ast.parse(text, filename=label)
    flags, _groups = parse_parser_source(tree)
    named = group_names(tree)
    lines = [f"# {label}"]
    grouped: set[str] = set()
    for members, name in named.items():
        fresh = [m for m in members if m not in seen]
        if len(fresh) > 1:
            lines.append(f"group {name}: {' '.join(fresh)}")
        grouped.update(fresh)
        seen.update(fresh)
    for name, (kind, choices) in sorted(flags.items(), key=lambda item: _line_of(tree, item[0])):
        if name in seen and name not in grouped:
            continue
        if name in grouped and kind == "flag":
            continue  # written on its group line
        seen.add(name)
        spec = "" if kind == "flag" else f" {kind}" + (f":{','.join(choices)}" if choices else "")
        lines.append(f"{name}{spec}")
    return lines


def _line_of(tree: ast.AST, option: str) -> int:
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value == option:
            return node.lineno
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--title", required=True, help="the UI's name, for the header")
    parser.add_argument("--origin", required=True, help="the repository (and branch) the sources come from")
    parser.add_argument("--commit", required=True, help="the commit the sources were read at")
    parser.add_argument("--note", action="append", default=[], help="a line for the header")
    parser.add_argument("sources", nargs="+", help="LABEL=PATH or PATH, in the order the UI builds its parser")
    opts = parser.parse_args(argv)
    out = [f"# {opts.title} ({', '.join(s.partition('=')[0] for s in opts.sources)}, {opts.commit})",
           FORMAT.rstrip("\n"),
           f"# Source: {opts.origin} at {opts.commit}, read by scripts/extract_flags.py (ast, never imported).",
           *(f"# {note}" for note in opts.note)]
    seen: set[str] = set()
    for source in opts.sources:
        label, eq, path = source.partition("=")
        if not eq:
            label, path = source, source
        out += section(label, Path(path).read_text(encoding="utf-8"), seen)
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
