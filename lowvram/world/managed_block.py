"""What lowvram's managed block in a webui-user file looks like, and where one may sit.

The syntax kinds (`SH` for webui-user.sh, `BAT` for webui-user.bat), the lines lowvram writes
between its markers (lowvram/core/markers.py), and `block_spans`: every block lowvram could have
written in a file. Shared by the writer (apply/webui_user.py) and detection (detect/webui.py, which
reads the user's own lines outside the block), so neither imports the other. It reads no file;
only `bash_reads` runs `bash -n`, which parses and runs nothing
(docs/architecture.md#safety-on-the-users-tree).

Only a block lowvram could have written counts as lowvram's (issue 14, class 5): the exact
marker lines, with only lines of the kinds lowvram writes between them, at the top level of the
script, where the shell runs them in order. Marker text anywhere else (a here-document, a
multi-line string, a `: '…'` no-op, an `if` or function body, a `goto`-skipped part of a .bat,
comments between the markers) is the user's text: kept byte for byte, while apply adds its own
block as usual. Where lowvram cannot tell, it refuses with one line rather than guess: a block
that looks like lowvram's but is damaged (its end marker gone, or the user's lines inside it, which
the block's replacement would lose), two blocks at the top level that the manifest cannot tell
apart, or a webui-user.sh that bash cannot read up to the marker or the end (a block there would
not run). bash itself says where the top level is (`bash -n`: it parses, nothing runs).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from lowvram.core import markers
from lowvram.core.errors import ApplyError

SH = "sh"
BAT = "bat"

BASH_TIMEOUT_S = 10.0
_SH_BODY = rb'(?:[^"\\$`]|\\[\\"$`])*'
_SH_BLOCK_LINES = (
    re.compile(rb'export COMMANDLINE_ARGS="\$\{COMMANDLINE_ARGS:\+\$COMMANDLINE_ARGS \}' + _SH_BODY + rb'"'),
    re.compile(rb'export [A-Za-z_][A-Za-z0-9_]*="' + _SH_BODY + rb'"'),
    # a variable set only where it is unset (markers.UNSET_ONLY_ENV): `}` escaped in the default
    re.compile(rb'export ([A-Za-z_][A-Za-z0-9_]*)="\$\{\1:-(?:[^"\\$`}]|\\[\\"$`}])*\}"'),
)
_BAT_BLOCK_LINES = (
    re.compile(rb'if defined COMMANDLINE_ARGS for /f "tokens=1,\* delims==" %%([A-Za-z]) in '
               rb"\('set COMMANDLINE_ARGS'\) do if /i \"%%\1\"==\"COMMANDLINE_ARGS\" "
               rb'set "COMMANDLINE_ARGS=%%[A-Za-z] [^"]*"'),
    re.compile(rb'if not defined ([A-Za-z_][A-Za-z0-9_]*) set "\1=[^"]*"'),  # COMMANDLINE_ARGS, UNSET_ONLY_ENV
    re.compile(rb'set "[A-Za-z_][A-Za-z0-9_]*=[^"]*"'),  # also the old `%COMMANDLINE_ARGS% …` line
)
_BASH_OPEN = (b"here-document", b"unexpected end of file", b"looking for matching")
_BAT_JUMP_RE = re.compile(rb"(?:goto|exit)(?:[ \t:/]|$)", re.IGNORECASE)
_BAT_REM_RE = re.compile(rb"rem(?:[ \t]|$)", re.IGNORECASE)
_SH_STOP_RE = re.compile(rb"[ \t]*(?:return|exit)(?:[ \t;&|)]|$)")
# `exec COMMAND` replaces the shell (`exec >log 2>&1` only redirects: bash goes on).
_SH_EXEC_RE = re.compile(rb"[ \t]*exec[ \t]+(?![0-9]*[<>]|&>)[^ \t\r\n#;&|]")


def marker_bytes(kind: str) -> tuple[bytes, bytes]:
    if kind == SH:
        return markers.BLOCK_BEGIN.encode(), markers.BLOCK_END.encode()
    return markers.BAT_BLOCK_BEGIN.encode(), markers.BAT_BLOCK_END.encode()


def split_lines(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, line incl. its ending) for each line. Only LF ends a line, for bash and for cmd
    alike (cmd drops CRs): a lone CR does not start a new line."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    for line in data.split(b"\n"):
        if pos >= len(data):
            break
        end = min(pos + len(line) + 1, len(data))
        out.append((pos, data[pos:end]))
        pos = end
    return out


def line_text(line: bytes) -> bytes:
    """A line without its ending (LF, or CRLF)."""
    line = line[:-1] if line.endswith(b"\n") else line
    return line[:-1] if line.endswith(b"\r") else line


def _is_block_line(text: bytes, kind: str) -> bool:
    return any(r.fullmatch(text) for r in (_SH_BLOCK_LINES if kind == SH else _BAT_BLOCK_LINES))


def where_name(where: str) -> str:
    return Path(where).name if where not in ("the file", "") else "the file"


def bash_reads(prefix: bytes) -> tuple[str, str]:
    """How bash reads the end of `prefix`: "top" (every command in it is complete), "open" (it
    ends inside a here-document, a quoted string, `$(…)` or an unclosed if/case/loop/function),
    "broken" (a syntax error before that), or "unknown" (no bash here). Plus bash's first line.

    `bash -n` only parses: nothing in the file runs. extglob on, as scripts may switch it on.
    """
    bash = shutil.which("bash") if os.name != "nt" else None
    if bash is None:
        return "unknown", ""
    try:
        proc = subprocess.run([bash, "-O", "extglob", "-n"], input=prefix, capture_output=True,
                              timeout=BASH_TIMEOUT_S, check=False,
                              env={"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"})
    except (OSError, subprocess.SubprocessError):
        return "unknown", ""
    said = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    first = re.sub(r"^[^:]*bash: ", "", said[0]) if said else ""
    if any(k in proc.stderr for k in _BASH_OPEN):
        return "open", first
    if proc.returncode != 0:
        return "broken", first
    return "top", ""


def _sh_continues(line: bytes) -> bool:
    """Does this bash line end in a `\\` that joins the next line to it (not inside a comment or
    single quotes)?"""
    quote = b""
    i = 0
    while i < len(line):
        c = line[i:i + 1]
        if quote == b"'":
            quote = b"" if c == b"'" else quote
        elif c == b"\\":
            if i + 1 == len(line):
                return True
            i += 1
        elif c in b"'\"":
            quote = b"" if quote == c else (quote or c)
        elif c == b"#" and not quote and (i == 0 or line[i - 1:i] in b" \t;&|()"):
            return False
        i += 1
    return False


def bat_top_lines(lines: list[tuple[int, bytes]]) -> list[bool]:
    """Per line: does cmd run it as a statement of its own, at the top level (not inside a
    parenthesised if/for body, not continued by a `^` from the line before) and on its way through
    the file (not after an unconditional `goto`/`exit`, until the next label)?"""
    out: list[bool] = []
    depth, reachable, continued = 0, True, False
    for _offset, line in lines:
        stmt = line_text(line).lstrip(b" \t").lstrip(b"@").lstrip(b" \t")
        top = depth == 0 and reachable and not continued
        out.append(top)
        if stmt.startswith(b":") and not continued:
            reachable = reachable or (depth == 0 and not stmt.startswith(b"::"))
            continue
        if _BAT_REM_RE.match(stmt) and not continued:
            continued = stmt.endswith(b"^")
            continue
        quoted, word_start, continued, i = False, True, False, 0
        while i < len(stmt):
            c = stmt[i:i + 1]
            if c == b'"':
                quoted = not quoted
            elif not quoted and c == b"^":
                i += 1
                continued = i >= len(stmt)
            elif not quoted and c == b"(" and word_start:
                depth += 1
            elif not quoted and c == b")" and depth > 0:
                depth -= 1
            word_start = not quoted and c in b" \t&|("
            i += 1
        if top and depth == 0 and _BAT_JUMP_RE.match(stmt):
            reachable = False
    return out


def _top_begins(data: bytes, lines: list[tuple[int, bytes]], begins: list[int], kind: str,
                where: str) -> list[int]:
    """The begin-marker lines that sit at the top level of the script."""
    if kind == BAT:
        top = bat_top_lines(lines)
        return [i for i in begins if top[i]]
    stop = sh_first_stop(data, lines)
    found: list[int] = []
    for i in begins:
        if stop is not None and i > stop:
            continue  # after a top-level `return`/`exit`: bash never gets there
        if i and _sh_continues(line_text(lines[i - 1][1])):
            continue  # the line before ends in `\`: the marker line continues its command
        state, said = bash_reads(data[:lines[i][0]])
        if state == "broken":
            raise ApplyError(
                f"cannot tell whether line {i + 1} of {where} (lowvram's marker) is lowvram's block: bash cannot "
                f"read the lines before it ({said})",
                f"fix {where_name(where)} (`bash -n {where_name(where)}` shows where), then run again")
        if state != "open":
            found.append(i)
    return found


def block_spans(data: bytes, kind: str, where: str) -> list[tuple[int, int]]:
    """Byte spans of every block lowvram could have written (the rules in this module's docstring)."""
    begin, end = marker_bytes(kind)
    lines = split_lines(data)
    texts = [line_text(line) for _offset, line in lines]
    begins = [i for i, t in enumerate(texts) if t == begin]
    if not begins:
        return []
    spans: list[tuple[int, int]] = []
    for i in _top_begins(data, lines, begins, kind, where):
        j, mine, blank = i + 1, 0, 0  # blank: the first blank line inside (lowvram writes none)
        while j < len(texts) and texts[j] not in (begin, end) and (
                _is_block_line(texts[j], kind) or not texts[j].strip()):
            mine, blank = (mine + 1, blank) if texts[j].strip() else (mine, blank or j)
            j += 1
        if j < len(texts) and texts[j] == end and not blank:
            spans.append((lines[i][0], lines[j][0] + len(lines[j][1])))
        elif mine:
            bad = blank if j < len(texts) and texts[j] == end else j
            why = ("its end marker is missing" if j >= len(texts) or texts[j] == begin
                   else f"line {bad + 1} inside it is not one lowvram writes, and would be lost")
            raise ApplyError(
                f"{where}: lowvram's managed block at line {i + 1} is damaged ({why})",
                "move your own lines out of the block, or delete the block's lines by hand "
                "(`lowvram apply` writes a fresh one), then run again")
    return spans


def sh_first_stop(data: bytes, lines: list[tuple[int, bytes]], *, exec_too: bool = False) -> int | None:
    """The first line where a sourced webui-user.sh stops for good: a bare `return` or `exit` at the
    top level (one inside a function, an `if` or a here-document does not count); with `exec_too`
    also an `exec COMMAND` there (Forge Neo's webui-user.sh ends by exec'ing webui.sh). Only where a
    block would be appended: a block found after an exec that an older apply wrote stays lowvram's."""
    for i, (offset, line) in enumerate(lines):
        text = line_text(line)
        stops = _SH_STOP_RE.match(text) or (exec_too and _SH_EXEC_RE.match(text))
        if not stops or (i and _sh_continues(line_text(lines[i - 1][1]))):
            continue
        if bash_reads(data[:offset])[0] in ("top", "unknown"):
            return i
    return None
