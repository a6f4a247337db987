"""The flags the installed UI really takes, read from its own argument parser's source as data.

ComfyUI's flag set changes between releases (v0.3.64 has `--default-device` and lacks
`--cache-ram`), so one shipped list (`lowvram/ui/flags/comfyui.txt`) passes flags through that the
installed version exits 2 on, and refuses flags it has. The tree's own `comfy/cli_args.py` (Forge:
`backend/args.py`, `modules/cmd_args.py` and the extensions' `preload.py`; Forge Neo: the same and its
`modules/paths_internal.py`; reForge: `ldm_patched/modules/args_parser.py`, `modules/cmd_args.py` and the
preloads) is parsed with `ast` and
never imported or run: every `add_argument` option string, whether it takes a value, its literal
choices, and the mutually exclusive groups. A source that is too big, not a regular file, or not
Python lowvram can parse leaves the shipped list in charge, with a note (`UiFlagsFacts.error`).
"""

from __future__ import annotations

import ast
import stat
from collections.abc import Iterable
from pathlib import Path

from lowvram.core.facts import UiFlagsFacts

# A real cli_args.py is ~15 kB, Forge's cmd_args.py ~20 kB: anything past this is not one.
MAX_SOURCE_BYTES = 512 * 1024
# What one UI may define; a file defining more is not an argument parser lowvram understands.
MAX_FLAGS = 2000

COMFY_SOURCES = ("comfy/cli_args.py",)
FORGE_SOURCES = ("backend/args.py", "modules/cmd_args.py")
# reForge keeps Forge 1's parser: ldm_patched/modules/args_parser.py, which its modules/cmd_args.py extends.
REFORGE_SOURCES = ("ldm_patched/modules/args_parser.py", "modules/cmd_args.py")
# Forge Neo's modules/cmd_args.py takes its parser from modules/paths_internal.py, which adds --data-dir and
# --model-ref to backend/args.py's (Forge's own cmd_args defines those itself): read where the tree has it.
NEO_OPTIONAL = ("modules/paths_internal.py",)
FORGE_PRELOADS = ("extensions-builtin", "extensions")
# flavor -> (the parser files the tree must have, the files read where present); extensions' preload.py besides.
SOURCES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "forge": (FORGE_SOURCES, ()),
    "forge-neo": (FORGE_SOURCES, NEO_OPTIONAL),
    "reforge": (REFORGE_SOURCES, ()),
}

_FLAG_ACTIONS = {"store_true", "store_false", "store_const", "append_const", "count", "help", "version",
                 "BooleanOptionalAction"}


class SourceProblemError(Exception):
    """A parser source lowvram cannot read as data (the message names the file)."""


def read_ui_flags(root: Path, flavor: str) -> UiFlagsFacts | None:
    """The installed UI's own flags, or None where lowvram has no reader for it (or no source)."""
    main: tuple[str, ...]
    if flavor == "comfyui":
        main, extra = COMFY_SOURCES, []
    elif flavor in SOURCES:
        required, optional = SOURCES[flavor]
        main, extra = (*required, *(rel for rel in optional if (root / rel).is_file())), _forge_preloads(root)
    else:
        return None
    if not all((root / rel).exists() or (root / rel).is_symlink() for rel in main):
        return None  # an older or unusual tree: the shipped list, silently
    flags: dict[str, tuple[str, tuple[str, ...]]] = {}
    groups: list[tuple[str, ...]] = []
    sources = [*main, *extra]
    try:
        for rel in sources:
            _read_into(root / rel, rel, flags, groups)
    except SourceProblemError as exc:
        return UiFlagsFacts(source=", ".join(main), error=str(exc))
    if not flags:
        return None  # a stand-in or a parser built some other way: the shipped list, silently
    return UiFlagsFacts(
        source=", ".join(main),
        flags=tuple((name, kind, choices) for name, (kind, choices) in sorted(flags.items())),
        groups=tuple(groups),
    )


def _forge_preloads(root: Path) -> list[str]:
    """The Forge lineage's extensions add flags in their preload.py (`def preload(parser)`)."""
    out: list[str] = []
    for folder in FORGE_PRELOADS:
        try:
            entries = sorted((root / folder).iterdir())
        except OSError:
            continue
        for entry in entries[:500]:
            if (entry / "preload.py").is_file():
                out.append(f"{folder}/{entry.name}/preload.py")
    return out


def read_source(path: Path, rel: str) -> str:
    """The file's text: a regular file under MAX_SOURCE_BYTES, UTF-8; else SourceProblemError."""
    try:
        st = path.stat()
    except OSError as exc:
        raise SourceProblemError(f"{rel} cannot be read ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(st.st_mode):
        raise SourceProblemError(f"{rel} is not a regular file")
    if st.st_size > MAX_SOURCE_BYTES:
        raise SourceProblemError(f"{rel} is {st.st_size} bytes, over the {MAX_SOURCE_BYTES} a flag parser has")
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_SOURCE_BYTES + 1)
    except OSError as exc:
        raise SourceProblemError(f"{rel} cannot be read ({exc.strerror or exc})") from exc
    if len(raw) > MAX_SOURCE_BYTES:
        raise SourceProblemError(f"{rel} grew past {MAX_SOURCE_BYTES} bytes while read")
    if b"\x00" in raw:
        raise SourceProblemError(f"{rel} is binary, not Python source")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceProblemError(f"{rel} is not UTF-8 text") from exc


def _read_into(path: Path, rel: str, flags: dict[str, tuple[str, tuple[str, ...]]],
               groups: list[tuple[str, ...]]) -> None:
    text = read_source(path, rel)
    try:
        tree = ast.parse(text, filename=rel)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise SourceProblemError(f"{rel} does not parse as Python ({type(exc).__name__})") from exc
    found, found_groups = parse_parser_source(tree)
    for name, spec in found.items():
        flags[name] = spec
    groups.extend(found_groups)
    if len(flags) > MAX_FLAGS:
        raise SourceProblemError(f"{rel} defines over {MAX_FLAGS} flags")


def parse_parser_source(tree: ast.AST) -> tuple[dict[str, tuple[str, tuple[str, ...]]], list[tuple[str, ...]]]:
    """Every `X.add_argument("--a", "--b", ...)` in `tree`: {option: (kind, choices)}, and the members
    of each `X = P.add_mutually_exclusive_group()` (in the order they were created)."""
    enums = _enum_values(tree)
    exclusive: dict[str, list[str]] = {}
    order: list[str] = []
    flags: dict[str, tuple[str, tuple[str, ...]]] = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and _method_name(node.value) == "add_mutually_exclusive_group"):
            exclusive[node.targets[0].id] = []
            order.append(node.targets[0].id)
    for node in _calls_in_order(tree):
        if _method_name(node) != "add_argument":
            continue
        names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                 and a.value.startswith("-")]
        if not names:
            continue
        spec = _kind(node, enums)
        for name in names:
            flags[name] = spec
        receiver = node.func.value if isinstance(node.func, ast.Attribute) else None
        if isinstance(receiver, ast.Name) and receiver.id in exclusive:
            exclusive[receiver.id].extend(names)
    groups = [tuple(exclusive[g]) for g in order if len(exclusive[g]) > 1]
    return flags, groups


def _calls_in_order(tree: ast.AST) -> Iterable[ast.Call]:
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    return sorted(calls, key=lambda n: (n.lineno, n.col_offset))


def _method_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def _keywords(node: ast.Call) -> dict[str, ast.expr]:
    return {k.arg: k.value for k in node.keywords if k.arg is not None}


def _kind(node: ast.Call, enums: dict[str, tuple[str, ...]]) -> tuple[str, tuple[str, ...]]:
    """argparse's reading of one add_argument: on/off, one value, an optional value, or several."""
    kw = _keywords(node)
    action = kw.get("action")
    action_name = None
    if isinstance(action, ast.Constant) and isinstance(action.value, str):
        action_name = action.value
    elif isinstance(action, ast.Attribute):
        action_name = action.attr
    if action_name in _FLAG_ACTIONS and "nargs" not in kw:
        return "flag", ()
    choices = _choices(kw.get("choices"), kw.get("type"), enums)
    nargs = kw.get("nargs")
    value = nargs.value if isinstance(nargs, ast.Constant) else None
    if value == "?":
        return "optvalue", choices
    if value == "*":
        return "optvalues", choices
    if value == "+" or (isinstance(value, int) and value > 1) or (nargs is not None and value is None):
        return "values", choices
    if value == 0:
        return "flag", ()
    return "value", choices


def _choices(choices: ast.expr | None, type_: ast.expr | None, enums: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    if isinstance(choices, (ast.List, ast.Tuple, ast.Set)):
        items = [e.value for e in choices.elts if isinstance(e, ast.Constant)]
        if len(items) == len(choices.elts) and all(isinstance(i, str) for i in items):
            return tuple(str(i) for i in items)
        return ()
    if choices is None and isinstance(type_, ast.Name) and type_.id in enums:
        return enums[type_.id]
    return ()


def _enum_values(tree: ast.AST) -> dict[str, tuple[str, ...]]:
    """`class X(enum.Enum)` with string members: an add_argument with `type=X` takes those values."""
    out: dict[str, tuple[str, ...]] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        if not any((isinstance(b, ast.Attribute) and b.attr == "Enum") or (isinstance(b, ast.Name) and b.id == "Enum")
                   for b in node.bases):
            continue
        values = [s.value.value for s in node.body if isinstance(s, ast.Assign)
                  and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str)]
        if values:
            out[node.name] = tuple(values)
    return out
