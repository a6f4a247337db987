"""The managed block in webui-user.sh / webui-user.bat: render it, put it in, take it out.

Pure byte functions plus a thin planning step that reads the file. The user's bytes outside the
block are never touched (line endings, encoding, a missing final newline); the block's bytes
depend only on the plan, so applying twice gives the same file (DESIGN.md §6).

Quoting is two layers: A1111 `shlex.split`s COMMANDLINE_ARGS with POSIX rules on every OS, so
each flag is quoted for shlex with single quotes first; the result is then embedded in a bash
double-quoted string or a cmd `set "VAR=value"` line.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lowvram import markers
from lowvram.errors import ApplyError
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
    """What the block sets: the flags (as tokens) and the other variables, in block order."""

    args: tuple[str, ...]
    merge: str  # append | assign
    env: tuple[tuple[str, str], ...]


def block_vars(plan: Plan, hook_config: str | None = None) -> BlockVars:
    """The variables the plan puts into the block.

    In assign mode the block's COMMANDLINE_ARGS is the user's kept flags plus the plan's (the
    user's own line above stops counting); in append mode only the plan's flags are added at run
    time. LOWVRAM_CONFIG comes from the plan, or `hook_config` when the hook is installed.
    """
    merge = "assign" if plan.merge == "assign" else "append"
    tokens = tuple(plan.user_args_kept) + tuple(plan.args) if merge == "assign" else tuple(plan.args)
    env = {k: v for k, v in plan.env.items() if k != "COMMANDLINE_ARGS" and v is not None}
    if hook_config and "LOWVRAM_CONFIG" not in env:
        env["LOWVRAM_CONFIG"] = hook_config
    ordered = [(k, env[k]) for k in ENV_ORDER if k in env]
    ordered += sorted((k, v) for k, v in env.items() if k not in ENV_ORDER)
    for name, value in ordered:
        _check_value(name, str(value))
    for token in tokens:
        _check_value("COMMANDLINE_ARGS", token)
    return BlockVars(args=tokens, merge=merge, env=tuple((k, str(v)) for k, v in ordered))


def render_block(bvars: BlockVars, kind: str, newline: str | None = None) -> str:
    """The block's text, marker lines included, each line ended by `newline`."""
    if kind == SH:
        nl = newline or "\n"
        lines = [markers.BLOCK_BEGIN]
        if bvars.args or bvars.merge == "assign":
            body = bash_double_quoted_body(shlex_args(bvars.args))
            if bvars.merge == "assign":
                lines.append(f'export COMMANDLINE_ARGS="{body}"')
            else:
                lines.append(f'export COMMANDLINE_ARGS="${{COMMANDLINE_ARGS:+$COMMANDLINE_ARGS }}{body}"')
        for name, value in bvars.env:
            lines.append(f'export {name}="{bash_double_quoted_body(value)}"')
        lines.append(markers.BLOCK_END)
    elif kind == BAT:
        nl = newline or "\r\n"
        lines = [markers.BAT_BLOCK_BEGIN]
        if bvars.args or bvars.merge == "assign":
            body = cmd_set_body(shlex_args(bvars.args, for_cmd=True), "a flag in COMMANDLINE_ARGS")
            if bvars.merge == "assign":
                lines.append(f'set "COMMANDLINE_ARGS={body}"')
            else:
                lines.append(f'set "COMMANDLINE_ARGS=%COMMANDLINE_ARGS% {body}"')
        for name, value in bvars.env:
            lines.append(f'set "{name}={cmd_set_body(value, name)}"')
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


def _markers(kind: str) -> tuple[bytes, bytes]:
    if kind == SH:
        return markers.BLOCK_BEGIN.encode(), markers.BLOCK_END.encode()
    return markers.BAT_BLOCK_BEGIN.encode(), markers.BAT_BLOCK_END.encode()


def _lines(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, line incl. its ending) for each line."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    for line in data.splitlines(keepends=True):
        out.append((pos, line))
        pos += len(line)
    return out


def find_block(data: bytes, kind: str, where: str = "the file") -> tuple[int, int] | None:
    """Byte span [start, end) of the managed block, its last line's ending included."""
    begin, end = _markers(kind)
    start: int | None = None
    for offset, line in _lines(data):
        text = line.rstrip(b"\r\n").strip()
        if start is None and text == begin:
            start = offset
        elif start is not None and text == end:
            return start, offset + len(line)
    if start is not None:
        raise ApplyError(
            f"{where} has lowvram's begin marker but no end marker",
            "delete the lowvram lines from it by hand (or restore it) and run again",
        )
    return None


def block_bytes(data: bytes, kind: str) -> bytes | None:
    span = find_block(data, kind)
    return None if span is None else data[span[0]:span[1]]


def newline_of(data: bytes, kind: str) -> str:
    """The file's own line ending for a .bat; bash needs LF whatever the file uses."""
    if kind == SH:
        return "\n"
    if not data or b"\r\n" in data:
        return "\r\n"
    return "\n"


def call_line_offset(data: bytes) -> int | None:
    """Where the `call webui.bat` line starts (the block goes right before it)."""
    for offset, line in _lines(data):
        if _CALL_WEBUI_RE.match(line):
            return offset
    return None


def insert_block(data: bytes, block: bytes, kind: str, *, before_call: bool = False,
                 where: str = "the file") -> tuple[bytes, bool]:
    """The file with `block` in it: replacing an existing block, else before the `call …webui.bat`
    line (`before_call`), else at the end. Returns (new bytes, whether a final newline was added
    to the user's last line so the block starts on its own line)."""
    span = find_block(data, kind, where)
    if span is not None:
        return data[:span[0]] + block + data[span[1]:], False
    if before_call:
        at = call_line_offset(data)
        if at is not None:
            return data[:at] + block + data[at:], False
    if data and not data.endswith((b"\n", b"\r")):
        nl = newline_of(data, kind).encode()
        return data + nl + block, True
    return data + block, False


def remove_block(data: bytes, kind: str, *, added_newline: bool = False, where: str = "the file") -> bytes:
    """The file without the block; `added_newline` takes back the line ending insert_block added."""
    span = find_block(data, kind, where)
    if span is None:
        return data
    before, after = data[:span[0]], data[span[1]:]
    if added_newline and not after:
        if before.endswith(b"\r\n"):
            before = before[:-2]
        elif before.endswith(b"\n"):
            before = before[:-1]
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
    try:
        data = bat.read_bytes()
    except FileNotFoundError:
        data = None
    except OSError as exc:
        raise ApplyError(f"cannot read {bat}: {exc.strerror}", "check its permissions") from exc
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


def read_bytes(path: Path) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError as exc:
        raise ApplyError(f"{path} is a folder, not a file", "move it away and run again") from exc
    except OSError as exc:
        raise ApplyError(f"cannot read {path}: {exc.strerror}", "check its permissions") from exc


def plan_change(target: Target, bvars: BlockVars, *, previously_added_newline: bool = False) -> FileChange:
    """What the target file would become (nothing is written here)."""
    old = read_bytes(target.path)
    data = old or b""
    text = render_block(bvars, target.kind, newline_of(data, target.kind))
    block = encode_block(text, target.kind, data)
    new, added = insert_block(data, block, target.kind, before_call=target.before_call, where=str(target.path))
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


def parse_block_vars(block: bytes, kind: str) -> Mapping[str, str]:
    """The variables a block sets, as written (for doctor/tests; not a shell)."""
    out: dict[str, str] = {}
    pat = rb'^export ([A-Za-z_][A-Za-z0-9_]*)="(.*)"\r?$' if kind == SH else rb'^set "([A-Za-z_][A-Za-z0-9_]*)=(.*)"\r?$'
    for line in block.splitlines():
        m = re.match(pat, line)
        if m:
            out[m.group(1).decode()] = m.group(2).decode("utf-8", "replace")
    return out


def tokens_of(value: str) -> Sequence[str]:
    return shlex.split(value)
