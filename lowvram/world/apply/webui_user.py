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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lowvram.core import markers
from lowvram.core.errors import ApplyError
from lowvram.core.plan import Plan
from lowvram.world.fsutil import read_regular_bytes
from lowvram.world.managed_block import BAT as BAT  # noqa: PLC0414 - re-exported: callers name the kind webui_user.BAT
from lowvram.world.managed_block import SH as SH  # noqa: PLC0414 - re-exported, as BAT
from lowvram.world.managed_block import (
    bash_reads,
    bat_top_lines,
    block_spans,
    line_text,
    sh_first_stop,
    split_lines,
    where_name,
)

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
            body = bash_double_quoted_body(value)
            if name in markers.UNSET_ONLY_ENV:  # the user's value (environment, their lines above) wins
                default = body.replace("}", "\\}")  # a `}` would end ${NAME:-…}
                lines.append(f'export {name}="${{{name}:-{default}}}"')
            else:
                lines.append(f'export {name}="{body}"')
        lines.append(markers.BLOCK_END)
    elif kind == BAT:
        nl = newline or "\r\n"
        lines = [markers.BAT_BLOCK_BEGIN]
        if bvars.args:
            lines += _bat_args_lines(bvars.args)
        for name, value in bvars.env:
            line = f'set "{name}={windows_value(name, cmd_set_body(value, name))}"'
            lines.append(f"if not defined {name} {line}" if name in markers.UNSET_ONLY_ENV else line)
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
# Finding, inserting and removing the block (bytes in, bytes out): what the block looks like and
# where it may sit (the rules) is lowvram/world/managed_block.py.

NL = b"\n"


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
    lines = split_lines(data)
    top = bat_top_lines(lines)
    for (offset, line), is_top in zip(lines, top, strict=True):
        if is_top and _CALL_WEBUI_RE.match(line):
            return offset
    return None


def _check_runs_at_end(data: bytes, kind: str, where: str) -> None:
    """A block appended to a webui-user.sh runs only where bash reads the end as the top level,
    and where no `return`/`exit` at the top level stops the file before it."""
    if kind != SH or not data.strip():
        return
    state, said = bash_reads(data)
    name = where_name(where)
    stop = sh_first_stop(data, split_lines(data), exec_too=True)
    if stop is not None:
        said_line = line_text(split_lines(data)[stop][1]).decode("utf-8", "replace").strip()
        hint = f"move that line to the end of {name} (or remove it), then run again"
        if said_line.startswith("exec"):
            hint = (f"{name} hands over to another program there: start the UI with that program instead of "
                    f"{name}, or put the flags into COMMANDLINE_ARGS by hand")
        raise ApplyError(
            f"lowvram's block would never run at the end of {where}: line {stop + 1} "
            f"({said_line[:40]}) ends the file before it", hint)
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


def choose_target(webui: Path, os_name: str, flavor: str | None = None) -> Target:
    """On Linux/macOS the file the tree's webui.sh sources: webui-user.sh (A1111's launcher), or
    webui.settings.sh (Forge Neo's, world/detect/launcher.py); on Windows webui-user.bat when it
    calls webui.bat (or already holds the block), else the untracked webui.settings.bat that
    webui.bat calls first."""
    from lowvram.world.detect.launcher import read_launcher

    webui = Path(webui)
    if os_name != "windows":
        return Target(webui / read_launcher(webui, flavor).block_file, SH, False)
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
        line = line_text(raw).decode("utf-8", "replace")
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
