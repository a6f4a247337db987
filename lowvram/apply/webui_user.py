"""The managed block in webui-user.sh / webui-user.bat: render it, put it in, take it out.

Pure byte functions plus a thin planning step that reads the file. The user's bytes outside the
block are never touched (line endings, encoding, a missing final newline); the block's bytes
depend only on the plan, so applying twice gives the same file (docs/architecture.md#safety-on-the-users-tree).

Quoting is two layers: A1111 `shlex.split`s COMMANDLINE_ARGS with POSIX rules on every OS, so
each flag is quoted for shlex with single quotes first; the result is then embedded in a bash
double-quoted string or a cmd `set "VAR=value"` line.

The user's own COMMANDLINE_ARGS stay live: the block always appends lowvram's flags to whatever
the user's lines set at run time, and never copies the user's value into the block (a copy would
freeze it: later edits of their own line would be ignored). bash expands `$COMMANDLINE_ARGS` inside
double quotes without parsing the value again. cmd is different: `%COMMANDLINE_ARGS%` is expanded
*before* the line is parsed, so `set "COMMANDLINE_ARGS=%COMMANDLINE_ARGS% …"` runs whatever
follows a `"`, `&`, `|`, `<` or `>` in the user's value, and delayed expansion (`!…!`) eats `!` and
needs a `setlocal` that would scope the result away from `webui.bat`. The .bat block therefore reads
the value as output of `set COMMANDLINE_ARGS` through `for /f`: a FOR variable is substituted after
cmd has parsed the line, and the substituted text is never parsed, expanded or scanned again (see
`render_block`).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lowvram import markers
from lowvram.errors import ApplyError
from lowvram.fsutil import read_regular_bytes
from lowvram.plan import Plan

SH = "sh"
BAT = "bat"

# The order variables appear in the block; anything else the plan sets follows, sorted.
ENV_ORDER = ("COMMANDLINE_ARGS", "LD_PRELOAD", "NO_TCMALLOC", "PYTORCH_CUDA_ALLOC_CONF", "CUDA_VISIBLE_DEVICES",
             "CUDA_DEVICE_ORDER", "LOWVRAM_CONFIG")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CALL_WEBUI_RE = re.compile(rb"^[ \t]*@?call[ \t]+[^\r\n]*?webui\.bat\b", re.IGNORECASE)
_CHCP_UTF8_RE = re.compile(rb"(?im)^[ \t]*@?chcp[ \t]+65001\b")


# ---------------------------------------------------------------------------------------------
# Quoting


def shlex_args(tokens: Iterable[str], *, for_cmd: bool = False) -> str:
    """Flags joined so `shlex.split` gives them back: single quotes, `'` as `'"'"'`.

    For cmd a `"` would end `set "VAR=..."`'s quoting, so there a `'` becomes `'\\''` instead
    (POSIX shlex reads a backslash-escaped quote outside quotes the same way).
    """
    quoted = (shlex.quote(t) for t in tokens)
    if for_cmd:
        quoted = (q.replace("'\"'\"'", "'\\''") for q in quoted)
    return " ".join(quoted)


def bash_double_quoted_body(value: str) -> str:
    """`value` for use between bash double quotes: only \\ " $ ` are special there."""
    return re.sub(r'([\\"$`])', r"\\\1", value)


def cmd_set_body(value: str, what: str) -> str:
    """`value` for use in cmd's `set "VAR=value"`: every % doubled; a " would end the quoting."""
    if '"' in value:
        raise ApplyError(
            f"{what} contains a double quote, which cannot be written safely into a .bat file",
            "remove the double quote (A1111 reads single-quoted values) or set the value by hand",
        )
    return value.replace("%", "%%")


def _check_value(name: str, value: str) -> None:
    if not _NAME_RE.match(name):
        raise ApplyError(f"cannot write the variable name {name!r} into webui-user", "this is a bug in the plan")
    if any(c in value for c in "\r\n\0"):
        raise ApplyError(f"the value of {name} contains a line break", "line breaks cannot go into webui-user files")


# ---------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class BlockVars:
    """What the block sets: the plan's flags (as tokens, appended at run time) and the other
    variables, in block order."""

    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]


def block_vars(plan: Plan, hook_config: str | None = None) -> BlockVars:
    """The variables the plan puts into the block.

    The block only ever appends the plan's flags to the user's COMMANDLINE_ARGS as it is at run
    time, whatever `plan.merge` says: the user's own line stays live (edits after apply take
    effect). A valued flag the plan overrides (`--device-id`) wins by coming later (argparse keeps
    a flag's last value); the policy leaves out plan flags that an on/off user flag contradicts.
    LOWVRAM_CONFIG comes from the plan, or `hook_config` when the hook is installed.
    """
    tokens = tuple(plan.args)
    env = {k: v for k, v in plan.env.items() if k != "COMMANDLINE_ARGS" and v is not None}
    if hook_config and "LOWVRAM_CONFIG" not in env:
        env["LOWVRAM_CONFIG"] = hook_config
    ordered = [(k, env[k]) for k in ENV_ORDER if k in env]
    ordered += sorted((k, v) for k, v in env.items() if k not in ENV_ORDER)
    for name, value in ordered:
        _check_value(name, str(value))
    for token in tokens:
        _check_value("COMMANDLINE_ARGS", token)
    return BlockVars(args=tokens, env=tuple((k, str(v)) for k, v in ordered))


# `tokens=1,*` names two FOR variables, a letter and the next one. J/K first: no environment
# variable, strftime code or FOR-loop habit (%a, %i, %~dp0) puts them after a `%` (wine's cmd, unlike
# Windows', scans a substituted value again, so there a literal `%J`/`%K` in the user's value would be
# replaced; wine takes only letters as FOR variables).
_FOR_LETTERS = (("J", "K"), ("Q", "R"),
                *zip("abcdefghijklmnopqrstuvwxy", "bcdefghijklmnopqrstuvwxyz", strict=True),
                *zip("ABCDEFGHIJKLMNOPQRSTUVWXY", "BCDEFGHIJKLMNOPQRSTUVWXYZ", strict=True))


def _for_letters(value: str) -> tuple[str, str]:
    """Two FOR variable names (`%%J`, `%%K`) that lowvram's own text cannot be mistaken for.

    cmd substitutes FOR variables after its `%` expansion, so a `%K` (or `%~dpK`) left in the
    plan's text by `%%` would be replaced too; the user's value, substituted, is never scanned again.
    """
    used: set[str] = set()
    for i, c in enumerate(value):
        if c == "%" and i + 1 < len(value):
            used.update(value[i + 1:] if value[i + 1] == "~" else value[i + 1])
    for a, b in _FOR_LETTERS:
        if a not in used and b not in used:
            return a, b
    raise ApplyError("lowvram's flags hold too many `%` signs to be written into a .bat file safely",
                     "set the flags with % signs by hand in your own COMMANDLINE_ARGS line")


_WSL_MOUNT_RE = re.compile(r"^/mnt/([A-Za-z])(?:/(.*))?$")


def windows_value(name: str, value: str) -> str:
    """A value for a .bat file: a WSL path to a Windows drive (`/mnt/c/x`) becomes `C:\\x`; any
    other Linux path (facts from a Linux box) is refused, since Windows cannot open it."""
    if not value.startswith("/"):
        return value
    m = _WSL_MOUNT_RE.match(value)
    if m:
        return f"{m.group(1).upper()}:\\" + (m.group(2) or "").replace("/", "\\")
    raise ApplyError(
        f"cannot write {name}={value} into a .bat file: it is a Linux path, which the UI on Windows cannot open",
        "run `lowvram apply` on Windows itself; from WSL, keep LOWVRAM_HOME on a Windows drive "
        "(e.g. export LOWVRAM_HOME=/mnt/c/Users/you/lowvram)",
    )


def _bat_args_lines(args: Sequence[str]) -> list[str]:
    """The two cmd lines that append the plan's flags to the user's COMMANDLINE_ARGS at run time.

    `for /f` reads `set COMMANDLINE_ARGS`'s output (`NAME=value`, split at the first `=`; the
    name is compared because `set` lists every variable that starts with it). `%%K` is replaced
    after cmd has parsed the line, so `&|<>^"()%!` in the user's value stay text, never a command:
    the result is exactly the user's value, a space, then the plan's flags (a value that starts
    with `=`, which A1111 rejects anyway, loses that `=`). Unset, it is just the plan's flags.
    Nothing here needs `setlocal`, so the value reaches `webui.bat` and Python.
    """
    body = cmd_set_body(shlex_args(args, for_cmd=True), "a flag in COMMANDLINE_ARGS")
    a, b = _for_letters(body.replace("%%", "%"))
    return [
        f'if defined COMMANDLINE_ARGS for /f "tokens=1,* delims==" %%{a} in (\'set COMMANDLINE_ARGS\') '
        f'do if /i "%%{a}"=="COMMANDLINE_ARGS" set "COMMANDLINE_ARGS=%%{b} {body}"',
        f'if not defined COMMANDLINE_ARGS set "COMMANDLINE_ARGS={body}"',
    ]


def render_block(bvars: BlockVars, kind: str, newline: str | None = None) -> str:
    """The block's text, marker lines included, each line ended by `newline`."""
    if kind == SH:
        nl = newline or "\n"
        lines = [markers.BLOCK_BEGIN]
        if bvars.args:
            body = bash_double_quoted_body(shlex_args(bvars.args))
            lines.append(f'export COMMANDLINE_ARGS="${{COMMANDLINE_ARGS:+$COMMANDLINE_ARGS }}{body}"')
        for name, value in bvars.env:
            lines.append(f'export {name}="{bash_double_quoted_body(value)}"')
        lines.append(markers.BLOCK_END)
    elif kind == BAT:
        nl = newline or "\r\n"
        lines = [markers.BAT_BLOCK_BEGIN]
        if bvars.args:
            lines += _bat_args_lines(bvars.args)
        for name, value in bvars.env:
            lines.append(f'set "{name}={windows_value(name, cmd_set_body(value, name))}"')
        lines.append(markers.BAT_BLOCK_END)
    else:
        raise ValueError(kind)
    return "".join(line + nl for line in lines)


def bat_encoding(existing: bytes, os_name: str | None = None) -> str:
    """The code page cmd reads this batch file in.

    A file that switches to UTF-8 (`chcp 65001`) is read as UTF-8 after that line; otherwise the
    console's OEM code page, which only Windows can tell (GetOEMCP). Written from another OS, only
    ASCII is safe.
    """
    if _CHCP_UTF8_RE.search(existing):
        return "utf-8"
    if (os_name or os.name) == "nt":
        try:
            import ctypes

            return f"cp{ctypes.windll.kernel32.GetOEMCP()}"  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            return "ascii"
    return "ascii"


def encode_block(text: str, kind: str, existing: bytes = b"") -> bytes:
    if kind == SH:
        return text.encode("utf-8", "surrogateescape")
    encoding = bat_encoding(existing)
    try:
        return text.encode(encoding)
    except (UnicodeEncodeError, LookupError) as exc:
        bad = text[exc.start:exc.end] if isinstance(exc, UnicodeEncodeError) else ""
        raise ApplyError(
            f"cannot write {bad!r} into a .bat file: cmd reads it in the console's code page ({encoding})",
            "use ASCII-only paths (e.g. move LOWVRAM_HOME or the WebUI to a folder with an ASCII name)",
        ) from exc


# ---------------------------------------------------------------------------------------------
# Finding, inserting and removing the block (bytes in, bytes out)
#
# Only a block lowvram could have written counts as lowvram's (issue 14, class 5): the exact
# marker lines, with only lines of the kinds lowvram writes between them, at the top level of the
# script, where the shell runs them in order. Marker text anywhere else (a here-document, a
# multi-line string, a `: '…'` no-op, an `if` or function body, a `goto`-skipped part of a .bat,
# comments between the markers) is the user's text: kept byte for byte, while apply adds its own
# block as usual. Where lowvram cannot tell, it refuses with one line rather than guess: a block
# that looks like lowvram's but is damaged (its end marker gone, or the user's lines inside it, which
# the block's replacement would lose), two blocks at the top level that the manifest cannot tell
# apart, or a webui-user.sh that bash cannot read up to the marker or the end (a block there would
# not run). bash itself says where the top level is (`bash -n`: it parses, nothing runs).

BASH_TIMEOUT_S = 10.0
NL = b"\n"
_SH_BODY = rb'(?:[^"\\$`]|\\[\\"$`])*'
_SH_BLOCK_LINES = (
    re.compile(rb'export COMMANDLINE_ARGS="\$\{COMMANDLINE_ARGS:\+\$COMMANDLINE_ARGS \}' + _SH_BODY + rb'"'),
    re.compile(rb'export [A-Za-z_][A-Za-z0-9_]*="' + _SH_BODY + rb'"'),
)
_BAT_BLOCK_LINES = (
    re.compile(rb'if defined COMMANDLINE_ARGS for /f "tokens=1,\* delims==" %%([A-Za-z]) in '
               rb"\('set COMMANDLINE_ARGS'\) do if /i \"%%\1\"==\"COMMANDLINE_ARGS\" "
               rb'set "COMMANDLINE_ARGS=%%[A-Za-z] [^"]*"'),
    re.compile(rb'if not defined COMMANDLINE_ARGS set "COMMANDLINE_ARGS=[^"]*"'),
    re.compile(rb'set "[A-Za-z_][A-Za-z0-9_]*=[^"]*"'),  # also the old `%COMMANDLINE_ARGS% …` line
)
_BASH_OPEN = (b"here-document", b"unexpected end of file", b"looking for matching")
_BAT_JUMP_RE = re.compile(rb"(?:goto|exit)(?:[ \t:/]|$)", re.IGNORECASE)
_BAT_REM_RE = re.compile(rb"rem(?:[ \t]|$)", re.IGNORECASE)


def _markers(kind: str) -> tuple[bytes, bytes]:
    if kind == SH:
        return markers.BLOCK_BEGIN.encode(), markers.BLOCK_END.encode()
    return markers.BAT_BLOCK_BEGIN.encode(), markers.BAT_BLOCK_END.encode()


def _lines(data: bytes) -> list[tuple[int, bytes]]:
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


def _text(line: bytes) -> bytes:
    """A line without its ending (LF, or CRLF)."""
    line = line[:-1] if line.endswith(b"\n") else line
    return line[:-1] if line.endswith(b"\r") else line


def _is_block_line(text: bytes, kind: str) -> bool:
    return any(r.fullmatch(text) for r in (_SH_BLOCK_LINES if kind == SH else _BAT_BLOCK_LINES))


def _where_name(where: str) -> str:
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


def _bat_top_lines(lines: list[tuple[int, bytes]]) -> list[bool]:
    """Per line: does cmd run it as a statement of its own, at the top level (not inside a
    parenthesised if/for body, not continued by a `^` from the line before) and on its way through
    the file (not after an unconditional `goto`/`exit`, until the next label)?"""
    out: list[bool] = []
    depth, reachable, continued = 0, True, False
    for _offset, line in lines:
        stmt = _text(line).lstrip(b" \t").lstrip(b"@").lstrip(b" \t")
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
        top = _bat_top_lines(lines)
        return [i for i in begins if top[i]]
    stop = _sh_first_stop(data, lines)
    found: list[int] = []
    for i in begins:
        if stop is not None and i > stop:
            continue  # after a top-level `return`/`exit`: bash never gets there
        if i and _sh_continues(_text(lines[i - 1][1])):
            continue  # the line before ends in `\`: the marker line continues its command
        state, said = bash_reads(data[:lines[i][0]])
        if state == "broken":
            raise ApplyError(
                f"cannot tell whether line {i + 1} of {where} (lowvram's marker) is lowvram's block: bash cannot "
                f"read the lines before it ({said})",
                f"fix {_where_name(where)} (`bash -n {_where_name(where)}` shows where), then run again")
        if state != "open":
            found.append(i)
    return found


def block_spans(data: bytes, kind: str, where: str) -> list[tuple[int, int]]:
    """Byte spans of every block lowvram could have written (see the rules above)."""
    begin, end = _markers(kind)
    lines = _lines(data)
    texts = [_text(line) for _offset, line in lines]
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


def find_block(data: bytes, kind: str, where: str = "the file", recorded: str | None = None) -> tuple[int, int] | None:
    """Byte span [start, end) of lowvram's block, its last line's ending included; None if none.

    Two candidate blocks: the one whose bytes match `recorded` (the block_sha256 the manifest
    keeps) is lowvram's; if that does not single one out, ApplyError.
    """
    spans = block_spans(data, kind, where)
    if len(spans) <= 1:
        return spans[0] if spans else None
    if recorded:
        hits = [s for s in spans if hashlib.sha256(data[s[0]:s[1]]).hexdigest() == recorded]
        if len(hits) == 1:
            return hits[0]
    at = ", ".join(f"line {data.count(NL, 0, s[0]) + 1}" for s in spans)
    raise ApplyError(
        f"{where} holds {len(spans)} copies of lowvram's managed block ({at}): lowvram cannot tell which one it wrote",
        "delete the copies you made (keep at most one block), then run again")


def block_bytes(data: bytes, kind: str, recorded: str | None = None) -> bytes | None:
    span = find_block(data, kind, recorded=recorded)
    return None if span is None else data[span[0]:span[1]]


def newline_of(data: bytes, kind: str) -> str:
    """The file's own line ending for a .bat; bash needs LF whatever the file uses."""
    if kind == SH:
        return "\n"
    if not data or b"\r\n" in data:
        return "\r\n"
    return "\n"


def call_line_offset(data: bytes) -> int | None:
    """Where the first `call webui.bat` line that cmd runs at the top level starts (the block goes
    right before it); a call inside an if/for body or a skipped part of the file does not count."""
    lines = _lines(data)
    top = _bat_top_lines(lines)
    for (offset, line), is_top in zip(lines, top, strict=True):
        if is_top and _CALL_WEBUI_RE.match(line):
            return offset
    return None


_SH_STOP_RE = re.compile(rb"[ \t]*(?:return|exit)(?:[ \t;&|)]|$)")


def _sh_first_stop(data: bytes, lines: list[tuple[int, bytes]]) -> int | None:
    """The first line where a sourced webui-user.sh stops for good: a bare `return` or `exit` at the
    top level (one inside a function, an `if` or a here-document does not count)."""
    for i, (offset, line) in enumerate(lines):
        if not _SH_STOP_RE.match(_text(line)) or (i and _sh_continues(_text(lines[i - 1][1]))):
            continue
        if bash_reads(data[:offset])[0] in ("top", "unknown"):
            return i
    return None


def _check_runs_at_end(data: bytes, kind: str, where: str) -> None:
    """A block appended to a webui-user.sh runs only where bash reads the end as the top level,
    and where no `return`/`exit` at the top level stops the file before it."""
    if kind != SH or not data.strip():
        return
    state, said = bash_reads(data)
    name = _where_name(where)
    stop = _sh_first_stop(data, _lines(data))
    if stop is not None:
        raise ApplyError(
            f"lowvram's block would never run at the end of {where}: line {stop + 1} "
            f"({_text(_lines(data)[stop][1]).decode('utf-8', 'replace').strip()[:40]}) ends the file before it",
            f"move that line to the end of {name} (or remove it), then run again")
    if state == "open":
        raise ApplyError(
            f"lowvram's block would never run at the end of {where}: bash reads the end of the file as inside a "
            f"here-document, a quoted string or an unclosed if/function ({said})",
            f"close it in {name} (`bash -n {name}` shows the line), then run again")
    if state == "broken":
        raise ApplyError(f"bash cannot read {where} ({said}), so a block at its end would never run",
                         f"fix {name} (`bash -n {name}` shows the line), then run again")


def insert_block(data: bytes, block: bytes, kind: str, *, before_call: bool = False,
                 where: str = "the file", recorded: str | None = None) -> tuple[bytes, bool]:
    """The file with `block` in it: replacing lowvram's block, else before the `call …webui.bat`
    line (`before_call`), else at the end. Returns (new bytes, whether a final newline was added
    to the user's last line so the block starts on its own line)."""
    span = find_block(data, kind, where, recorded)
    if span is not None:
        return data[:span[0]] + block + data[span[1]:], False
    if before_call:
        at = call_line_offset(data)
        if at is not None:
            return data[:at] + block + data[at:], False
    _check_runs_at_end(data, kind, where)
    if data and not data.endswith(b"\n"):
        nl = newline_of(data, kind).encode()
        return data + nl + block, True
    return data + block, False


def _without_added_newline(before: bytes, kind: str) -> bytes:
    """Take back the line ending insert_block added after the user's last line (newline_of)."""
    if kind == BAT and before.endswith(b"\r\n") and newline_of(before[:-2], kind) == "\r\n":
        return before[:-2]
    return before[:-1] if before.endswith(b"\n") else before


def remove_block(data: bytes, kind: str, *, added_newline: bool = False, where: str = "the file",
                 recorded: str | None = None) -> bytes:
    """The file without lowvram's block; `added_newline` takes back the line ending insert_block added."""
    span = find_block(data, kind, where, recorded)
    if span is None:
        return data
    before, after = data[:span[0]], data[span[1]:]
    if added_newline and not after:
        before = _without_added_newline(before, kind)
    return before + after


# ---------------------------------------------------------------------------------------------
# Which file, and the change to it


@dataclass(frozen=True)
class Target:
    path: Path
    kind: str  # sh | bat
    before_call: bool  # put the block before `call webui.bat`


def choose_target(webui: Path, os_name: str) -> Target:
    """webui-user.sh on Linux/macOS; on Windows webui-user.bat when it calls webui.bat (or already
    holds the block), else the untracked webui.settings.bat that webui.bat calls first."""
    webui = Path(webui)
    if os_name != "windows":
        return Target(webui / "webui-user.sh", SH, False)
    bat = webui / "webui-user.bat"
    data = read_bytes(bat)
    if data is not None and (call_line_offset(data) is not None or find_block(data, BAT, str(bat)) is not None):
        return Target(bat, BAT, True)
    return Target(webui / "webui.settings.bat", BAT, False)


@dataclass(frozen=True)
class FileChange:
    path: Path
    kind: str
    old: bytes | None  # None: the file does not exist
    new: bytes
    block: bytes
    added_newline: bool

    @property
    def action(self) -> str:
        if self.old is None:
            return "created"
        return "unchanged" if self.old == self.new else "modified"


MAX_FILE_BYTES = 4 * 1024 * 1024  # a webui-user file is a few KiB; lowvram reads no more than this


def read_bytes(path: Path) -> bytes | None:
    """The webui-user file's bytes (through a link), None when missing; a FIFO, device, folder,
    link loop or huge file is one clear error, checked before opening (nothing blocks)."""
    return read_regular_bytes(Path(path), MAX_FILE_BYTES, "webui-user file")


def plan_change(target: Target, bvars: BlockVars, *, previously_added_newline: bool = False,
                recorded: str | None = None) -> FileChange:
    """What the target file would become (nothing is written here). `recorded`: the block_sha256
    the manifest keeps, which tells lowvram's block from a copy of it."""
    old = read_bytes(target.path)
    data = old or b""
    text = render_block(bvars, target.kind, newline_of(data, target.kind))
    block = encode_block(text, target.kind, data)
    new, added = insert_block(data, block, target.kind, before_call=target.before_call, where=str(target.path),
                              recorded=recorded)
    return FileChange(target.path, target.kind, old, new, block, added or previously_added_newline)


def unified_diff(path_label: str, old: bytes | None, new: bytes | None) -> str:
    def lines(data: bytes | None) -> list[str]:
        if not data:
            return []
        return [ln.rstrip("\r\n") + "\n" for ln in data.decode("utf-8", "replace").splitlines(keepends=True)]

    diff = difflib.unified_diff(
        lines(old), lines(new),
        fromfile="/dev/null" if old is None else f"a/{path_label}",
        tofile="/dev/null" if new is None else f"b/{path_label}",
    )
    return "".join(diff)


_SH_EXPORT_RE = re.compile(r'export ([A-Za-z_][A-Za-z0-9_]*)="(.*)"')
_SH_APPEND = "${COMMANDLINE_ARGS:+$COMMANDLINE_ARGS }"
_BAT_SET_RE = re.compile(r'(?:if not defined COMMANDLINE_ARGS )?set "([A-Za-z_][A-Za-z0-9_]*)=([^"]*)"')
_BAT_OLD_APPEND = "%COMMANDLINE_ARGS% "


def parse_block_vars(block: bytes, kind: str) -> Mapping[str, str]:
    """The variables a block sets, as the shell reads them (for doctor and tests; not a shell).

    COMMANDLINE_ARGS is the part lowvram appends (the user's value comes first at run time).
    """
    out: dict[str, str] = {}
    for raw in block.split(b"\n"):
        line = _text(raw).decode("utf-8", "replace")
        if kind == SH:
            m = _SH_EXPORT_RE.fullmatch(line)
            if m:
                value = re.sub(r"\\(.)", r"\1", m.group(2).removeprefix(_SH_APPEND))
                out[m.group(1)] = value
        else:
            m = _BAT_SET_RE.fullmatch(line)
            if m:
                out[m.group(1)] = m.group(2).removeprefix(_BAT_OLD_APPEND).replace("%%", "%")
    return out


def block_args(block: bytes, kind: str) -> tuple[str, ...]:
    """The flags lowvram's block appends to COMMANDLINE_ARGS (doctor compares them with the user's)."""
    value = parse_block_vars(block, kind).get("COMMANDLINE_ARGS", "")
    try:
        return tuple(shlex.split(value))
    except ValueError:
        return ()


def tokens_of(value: str) -> Sequence[str]:
    return shlex.split(value)
