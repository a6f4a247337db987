"""A WebUI install on disk: flavor, version, venv, torch/xformers builds, checkpoint, user flags.

Everything is read from files (docs/architecture.md#detection): no torch import and no subprocess except
`git describe` with a 1 s limit. The user's COMMANDLINE_ARGS are read from webui-user.sh/.bat
outside lowvram's managed block; a value that the shell would expand ($VAR, `…`, %VAR%) is not
literal and is reported as such rather than guessed.

Damaged inputs (docs/architecture.md#damaged-and-hostile-inputs): config.json and the checkpoint's safetensors header are optional
inputs, so damage there is a warning (`WebuiFacts.config_error`, `.checkpoint_error`) and the command
goes on as the UI itself would (default settings; a family that `--model` gives); a settings file
that cannot be opened at all (a FIFO, a folder, too large) stays one WebuiError line.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path
from typing import Any

from lowvram.core import markers
from lowvram.core.errors import WebuiError
from lowvram.core.facts import WebuiFacts
from lowvram.world.detect.checkpoint import checkpoint_info
from lowvram.world.detect.ui_flags import read_ui_flags
from lowvram.world.fsutil import UnsafeFileError, read_regular_bytes, special_kind
from lowvram.world.managed_block import BAT, SH, block_spans

GIT_TIMEOUT_S = 1.0
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")  # what A1111 lists (modules/sd_models.py list_models)
FORGE_CHECKPOINT_SUFFIXES = (*CHECKPOINT_SUFFIXES, ".gguf")  # Forge also loads GGUF diffusion models
MAX_WALK = 5000
MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_SCRIPT_BYTES = 4 * 1024 * 1024  # webui-user.sh / .bat: a few KiB in every release
MAX_SMALL_READ = 256 * 1024  # version files, METADATA, the head of CHANGELOG.md

NOT_A_WEBUI_HINT = (
    "give the folder that holds webui.sh / webui-user.bat (A1111, Forge, SD.Next) or main.py (ComfyUI), "
    "or install one with `lowvram setup`"
)


def detect_flavor(path: Path) -> str | None:
    """comfyui | sdnext | forge | a1111 | None, in that order (Forge and SD.Next carry A1111's files)."""
    root = Path(path)
    try:
        if not root.is_dir():
            return None
        if (root / "comfy").is_dir() and (root / "main.py").is_file():
            return "comfyui"
        launcher = any((root / n).is_file() for n in ("launch.py", "webui.sh", "webui.bat"))
        if (root / "installer.py").is_file() and launcher:
            return "sdnext"
        if ((root / "modules_forge").is_dir() or (root / "backend" / "args.py").is_file()) and launcher:
            return forge_lineage(root)
        if ((root / "webui.sh").is_file() or (root / "webui.bat").is_file()) and (root / "modules" / "cmd_args.py").is_file():
            return "a1111"
    except OSError:
        return None
    return None


# Forge's successors keep modules_forge/ and say who they are in modules_forge/forge_version.py (`version`):
# lllyasviel Forge '2.0.1v1.10.1' (Forge 1: '0.0.17v1.8.0rc'), Forge Neo "neo" (with `release`), Forge Classic
# "classic", reForge '1.0.0v2-v1.10.1RC' (its branches: '…v2dev…', '1.3.5-v1.10.1RC'; reForge2 reuses Forge's
# '2.0.1v1.10.1'). The README's first heading names Neo and reForge too; the git remote is a weaker hint.
_HEADING = re.compile(r"^#|^<h1", re.MULTILINE)


def _readme_title(root: Path) -> str:
    text = _read_text(root / "README.md") or ""
    for line in text.splitlines()[:20]:
        if _HEADING.match(line.strip()):
            return re.sub(r"<[^>]+>", "", line).strip("# ").strip()
    return ""


def _git_remote(root: Path) -> str:
    """origin's URL from .git/config (read, never run): a hint where the files say nothing."""
    text = _read_text(root / ".git" / "config") or ""
    m = re.search(r'\[remote "origin"\][^\[]*?url\s*=\s*(\S+)', text)
    return m.group(1).lower() if m else ""


def forge_lineage(root: Path) -> str:
    """forge | forge-neo | reforge for a tree with Forge's files, from the files each really has: its version
    file first, then the README's title, then (weakest) the git remote. Forge Classic is "forge": it keeps
    Forge's flags (ldm_patched's args_parser, the parser Forge 2's backend/args.py kept) and its installer."""
    text = _read_text(root / "modules_forge" / "forge_version.py") or ""
    version = (_py_assignment(text, "version") or "").lower()
    if version == "neo":
        return "forge-neo"
    if "reforge" in version or re.match(r"^1\.\d+\.\d+(v2\w*)?-v1\.10", version):
        return "reforge"
    if version:
        title = _readme_title(root).lower()
        if "reforge" in title and not (root / "backend" / "args.py").is_file():
            return "reforge"  # reForge (1.x): ldm_patched/ (reForge2 has backend/ and Forge's version: Forge)
        return "forge"
    title = _readme_title(root).lower()
    if "forge - neo" in title or "forge neo" in title:
        return "forge-neo"
    if "reforge" in title and (root / "ldm_patched").is_dir():
        return "reforge"
    remote = _git_remote(root)
    if "sd-webui-forge-classic" in remote and (root / "backend" / "args.py").is_file():
        return "forge-neo"  # Neo is that repository's only branch with backend/
    if "stable-diffusion-webui-reforge" in remote and (root / "ldm_patched").is_dir():
        return "reforge"
    return "forge"


def not_a_webui(path: Path) -> WebuiError:
    if not Path(path).exists():
        return WebuiError(f"{path} does not exist", NOT_A_WEBUI_HINT)
    return WebuiError(f"{path} is not a Stable Diffusion WebUI", NOT_A_WEBUI_HINT)


# ---------------------------------------------------------------------------------------------
# Version


def _git_describe(root: Path) -> str | None:
    if not (root / ".git").exists():
        return None
    try:
        proc = subprocess.run(
            ["git", "-c", f"safe.directory={root}", "-C", str(root), "describe", "--tags"],
            capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    tag = proc.stdout.strip() if proc.returncode == 0 else ""
    if not tag:
        return None
    return tag[1:] if re.match(r"^v\d", tag) else tag


_CHANGELOG_RE = re.compile(r"^##\s+\[?v?(\d+\.\d+(?:\.\d+)?(?:[-+.]?[0-9A-Za-z]+)*)")


def _read_text(path: Path) -> str | None:
    """A small file lowvram only peeks into (a version): None when missing, a FIFO, a device or a
    folder (checked before opening, so nothing blocks); only its head when it is huge."""
    try:
        data = read_regular_bytes(path, MAX_SMALL_READ, head=True)
    except UnsafeFileError:
        return None
    return None if data is None else data.decode("utf-8", "replace")


def _changelog_version(root: Path) -> str | None:
    text = _read_text(root / "CHANGELOG.md")
    for n, line in enumerate((text or "").splitlines()):
        if n > 500:
            break
        m = _CHANGELOG_RE.match(line)
        if m:
            return m.group(1)
    return None


_PY_STR_RE = r"""\s*(?::[^=]*)?=\s*(?:['"]([^'"]*)['"]|(None))"""


def _py_assignment(text: str, name: str) -> str | None:
    m = re.search(rf"^{re.escape(name)}{_PY_STR_RE}", text, re.MULTILINE)
    return m.group(1) if m and m.group(1) is not None else None


def _comfy_version(root: Path) -> str | None:
    text = _read_text(root / "comfyui_version.py")
    return None if text is None else _py_assignment(text, "__version__")


def forge_own_version(root: Path) -> str | None:
    """What a Forge-lineage UI calls its version (modules/launch_utils.py prints it at start as
    `Version: …`): Forge and reForge 'f' + modules_forge/forge_version.py's `version` (before git
    describe's suffix: f2.0.1v1.10.1, f1.0.0v2-v1.10.1RC); Forge Neo and Classic name the branch there
    (version = "neo") and Neo its release (release = "2.22"): the release, else the name."""
    text = _read_text(root / "modules_forge" / "forge_version.py")
    version = _py_assignment(text, "version") if text else None
    if not version or not text:
        return None
    if version.lower() in ("neo", "classic"):
        return _py_assignment(text, "release") or version
    return f"f{version}"


def webui_version(root: Path, flavor: str) -> str | None:
    """The UI's own version file first (ComfyUI's comfyui_version.py, Forge's forge_version.py), then
    `git describe`, then CHANGELOG.md's first heading."""
    from lowvram.ui import UIS, adapter

    if flavor == "comfyui":
        return _comfy_version(root) or _git_describe(root)
    own = forge_own_version(root) if flavor in UIS and adapter(flavor).lineage == "forge" else None
    return own or _git_describe(root) or _changelog_version(root)


# ---------------------------------------------------------------------------------------------
# venv, torch, xformers (read from files: never import torch, never run the venv's python)


def _venv_dirs(root: Path, flavor: str) -> list[Path]:
    dirs = [root / "venv", root / ".venv"]
    if flavor == "comfyui":
        dirs.append(root.parent / "python_embeded")
    return dirs


def venv_python(root: Path, flavor: str) -> Path | None:
    for venv in _venv_dirs(root, flavor):
        for rel in ("bin/python", "bin/python3", "Scripts/python.exe", "python.exe"):
            candidate = venv / rel
            if candidate.is_file():
                return candidate
    return None


def _py_minor(path: Path) -> tuple[int, ...]:
    digits = re.findall(r"\d+", path.parent.name)
    return tuple(int(d) for d in digits)


def site_packages(root: Path, flavor: str) -> Path | None:
    for venv in _venv_dirs(root, flavor):
        found = sorted((venv / "lib").glob("python3*/site-packages"), key=_py_minor, reverse=True)
        found = [p for p in found if p.is_dir()]
        if found:
            return found[0]
        for rel in ("Lib/site-packages",):
            if (venv / rel).is_dir():
                return venv / rel
    return None


def _dist_version(site: Path, name: str) -> str | None:
    """A distribution's version from its dist-info (METADATA's Version, else the folder name)."""
    prefix = name.lower().replace("-", "_")
    best: str | None = None
    for info in sorted(site.glob("*.dist-info")):
        dist, _, rest = info.name[: -len(".dist-info")].partition("-")
        if dist.lower().replace("-", "_") != prefix:
            continue
        version = rest or None
        for line in (_read_text(info / "METADATA") or "").splitlines():
            if line.startswith("Version:"):
                version = line.split(":", 1)[1].strip()
                break
            if not line.strip():
                break
        best = version or best
    return best


def _cuda_from_local(version: str | None) -> str | None:
    m = re.search(r"\+cu(\d+)$", version or "")
    if not m or len(m.group(1)) < 2:
        return None
    digits = m.group(1)
    return f"{int(digits[:-1])}.{digits[-1]}"


def torch_build(site: Path | None) -> tuple[str | None, str | None]:
    """(torch version, CUDA it was built for) from torch/version.py, else the dist-info."""
    if site is None:
        return None, None
    text = _read_text(site / "torch" / "version.py")
    if text is not None:
        version = _py_assignment(text, "__version__")
        if version:
            return version, _py_assignment(text, "cuda")
    version = _dist_version(site, "torch")
    return version, _cuda_from_local(version)


# ---------------------------------------------------------------------------------------------
# The user's COMMANDLINE_ARGS (webui-user.sh / .bat, outside lowvram's block)


def _shell_literal(value: str) -> bool:
    """False when bash would expand something in `value` ($VAR, $(…), `…`) outside single quotes."""
    quote = None
    i = 0
    while i < len(value):
        c = value[i]
        if quote == "'":
            if c == "'":
                quote = None
        elif c == "\\":
            i += 1
        elif c in "$`":
            return False
        elif c == '"':
            quote = None if quote == '"' else '"'
        elif c == "'" and quote is None:
            quote = "'"
        i += 1
    return True


def _outside_block(text: str, kind: str) -> list[str]:
    """The lines of a webui-user file outside lowvram's managed block(s).

    Only a block lowvram could have written counts (managed_block.py `block_spans`: exact
    markers, lowvram's own lines, at the top level); marker text anywhere else is the user's. A
    damaged block (no end marker) is skipped from its begin marker on, as lowvram wrote it.
    """
    begin, end = ((markers.BLOCK_BEGIN, markers.BLOCK_END) if kind == "sh"
                  else (markers.BAT_BLOCK_BEGIN, markers.BAT_BLOCK_END))
    if begin not in text:
        return text.split("\n")
    data = text.encode("utf-8", "surrogateescape")
    try:
        spans = block_spans(data, SH if kind == "sh" else BAT, "webui-user")
    except Exception:  # damaged or unreadable: the old reading, begin marker to end marker
        out: list[str] = []
        inside = False
        for line in text.split("\n"):
            stripped = line.strip()
            inside = (inside or stripped == begin) and stripped != end
            if not inside and stripped != end:
                out.append(line)
        return out
    kept = b"".join(data[a:b] for a, b in zip([0] + [s[1] for s in spans], [s[0] for s in spans] + [len(data)],
                                               strict=True))
    return kept.decode("utf-8", "surrogateescape").split("\n")


_SH_RE = re.compile(r"^\s*export\s+COMMANDLINE_ARGS=(.*)$")
_BAT_RE = re.compile(r'^\s*@?set\s+(")?COMMANDLINE_ARGS=(.*)$', re.IGNORECASE)


def parse_sh_args(text: str) -> tuple[tuple[str, ...] | None, bool]:
    """(args, literal) from the last `export COMMANDLINE_ARGS=…` outside lowvram's block."""
    raw = None
    for line in _outside_block(text, "sh"):
        m = _SH_RE.match(line.rstrip("\r"))
        if m:
            raw = m.group(1)
    if raw is None:
        return None, True
    if not _shell_literal(raw):
        return None, False
    try:
        words = shlex.split(raw, comments=True, posix=True)
        return tuple(shlex.split(words[0])) if words else (), True
    except ValueError:
        return None, False


def _bat_set_value(rest: str, quoted: bool) -> str | None:
    """The value cmd gives COMMANDLINE_ARGS from the text after `COMMANDLINE_ARGS=` on a `set` line
    (`quoted`: the `set "…"` form), or None where it is not literal.

    As cmd reads a batch line: `%%` is one `%` and any other `%` expands something; then outside
    double quotes `^` escapes the next character, `&`/`|` end the command and `<`/`>` redirect;
    `set "X=…"` keeps the text up to the line's last double quote.
    """
    if re.sub("%%", "", rest).count("%"):
        return None
    rest = rest.replace("%%", "%")
    out: list[str] = []
    i = 0
    while i < len(rest):
        c = rest[i]
        if c == '"':
            quoted = not quoted
        elif not quoted and c == "^":
            if i + 1 >= len(rest):
                return None  # a caret at the end continues the line
            i += 1
            c = rest[i]
        elif not quoted and c in "&|":
            break
        elif not quoted and c in "<>":
            return None
        out.append(c)
        i += 1
    return "".join(out)


def parse_bat_args(text: str) -> tuple[tuple[str, ...] | None, bool]:
    """(args, literal) from the last `set COMMANDLINE_ARGS=…` / `set "COMMANDLINE_ARGS=…"` outside
    lowvram's block, read as cmd reads it (`%%`, `^`, quotes); `!` is literal unless the file turns
    on delayed expansion."""
    raw: str | None = None
    found = False
    for line in _outside_block(text, "bat"):
        m = _BAT_RE.match(line.rstrip("\r"))
        if m:
            found = True
            value = _bat_set_value(m.group(2), bool(m.group(1)))
            if value is not None and m.group(1):
                value = value[: value.rfind('"')] if '"' in value else value
            raw = value
    if not found:
        return None, True
    if raw is None or ("!" in raw and "enabledelayedexpansion" in text.lower()):
        return None, False
    try:
        return tuple(shlex.split(raw)), True
    except ValueError:
        return None, False


def read_user_args(root: Path, os_name: str, flavor: str | None = None) -> tuple[tuple[str, ...] | None, bool]:
    """The user's flags from webui-user.sh/.bat; a missing file (or a dangling link) has none.

    Where webui.sh is Forge Neo's (world/detect/launcher.py), it reads webui.settings.sh after
    whatever webui-user.sh exported: a COMMANDLINE_ARGS the user set there (outside lowvram's block) wins.
    A FIFO, device, folder, link loop or huge file there is one UnsafeFileError naming it
    (checked before opening: nothing blocks); a link is read through.
    """
    from lowvram.world.detect.launcher import SETTINGS, SETTINGS_SH, read_launcher, runs_webui_sh

    settings_style = os_name != "windows" and read_launcher(root, flavor).style == SETTINGS
    if settings_style:
        data = read_regular_bytes(root / SETTINGS_SH, MAX_SCRIPT_BYTES, "webui settings file")
        if data is not None:
            args, literal = parse_sh_args(data.decode("utf-8", "replace"))
            if args is not None or not literal:
                return args, literal
    name = "webui-user.bat" if os_name == "windows" else "webui-user.sh"
    data = read_regular_bytes(root / name, MAX_SCRIPT_BYTES, "webui-user file")
    if data is None:
        return None, True
    text = data.decode("utf-8", "replace")
    if settings_style and not runs_webui_sh(text)[0]:
        return None, True  # Neo's webui.sh never reads it, and this one does not start webui.sh: nothing reads it
    return parse_bat_args(text) if name.endswith(".bat") else parse_sh_args(text)


def flag_value(args: tuple[str, ...] | None, flag: str) -> str | None:
    """The last value given to `flag` (`--flag V` or `--flag=V`), as argparse would keep it."""
    value = None
    items = list(args or ())
    for i, arg in enumerate(items):
        if arg == flag and i + 1 < len(items):
            value = items[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value


# ---------------------------------------------------------------------------------------------
# config.json and the selected checkpoint


class ConfigDamagedError(WebuiError):
    """The settings file is there but the UI cannot load it: `probe_webui` reads past it with a warning."""


CONFIG_HINT = "fix it, or move it away (the UI writes a fresh one at start-up)"
_CONFIG_RESET = ("the UI cannot load it either: at start-up it moves it to tmp/config.json and starts with "
                 "default settings, which lowvram plans for")
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false",
               type(None): "null"}


def read_config(path: Path) -> dict[str, Any]:
    """A1111's settings; missing = a fresh install (defaults); unreadable (a FIFO, a folder, too large) =
    WebuiError; there but damaged = ConfigDamagedError (see `parse_config`)."""
    hint = f"fix {path.name} or move it away (the UI writes a fresh one at start-up)"
    try:
        raw = read_regular_bytes(path, MAX_CONFIG_BYTES, "UI settings file")
    except UnsafeFileError as exc:
        raise WebuiError(exc.message, hint) from exc
    if raw is None:
        return {}
    return parse_config(raw, path)


def parse_config(raw: bytes, path: Path) -> dict[str, Any]:
    """The settings as A1111's `Options.load` reads them: `json.load` of UTF-8 text.

    What that load refuses (not UTF-8, a byte-order mark, broken JSON, nesting too deep, a number
    over Python's 4300-digit limit) the UI moves to tmp/config.json and replaces with its defaults;
    JSON that is not an object makes it fail at start-up. Either is one ConfigDamagedError line naming
    the file. NaN, duplicate keys or a setting of the wrong type load there, so they load here (the
    readers of single settings check their types).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigDamagedError(f"{path} is not UTF-8 text (byte {exc.start}): {_CONFIG_RESET}", CONFIG_HINT) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigDamagedError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}): "
                                 f"{_CONFIG_RESET}", CONFIG_HINT) from exc
    except RecursionError as exc:
        raise ConfigDamagedError(f"{path} is nested too deeply: {_CONFIG_RESET}", CONFIG_HINT) from exc
    except ValueError as exc:  # an integer over Python's 4300-digit limit
        raise ConfigDamagedError(f"{path} holds a number with thousands of digits: {_CONFIG_RESET}",
                                 CONFIG_HINT) from exc
    if not isinstance(data, dict):
        kind = _JSON_KINDS.get(type(data), "a value")
        raise ConfigDamagedError(f"{path} holds {kind}, not an object of settings: the UI does not start with it "
                                 "(lowvram plans for the default settings)", CONFIG_HINT)
    return data


def strip_hash(title: str) -> str:
    """'sd_xl_base_1.0.safetensors [31e35c80fc]' -> 'sd_xl_base_1.0.safetensors' (as A1111 does)."""
    return re.sub(r"\s*\[[0-9a-fA-F]+\]\s*$", "", title).strip()


def _abs(root: Path, value: str) -> Path:
    try:
        p = Path(value).expanduser()
    except RuntimeError:  # `~user` of a user that does not exist: bash leaves it as it is, so do we
        p = Path(value)
    return p if p.is_absolute() else root / p


_NATURAL_RE = re.compile(r"([0-9]+)")
CHECKPOINT_BLACKLIST = (".vae.ckpt", ".vae.safetensors")  # VAEs beside the checkpoints: never listed


def natural_key(text: str) -> list[Any]:
    """A1111's sort key for model files: digits as numbers ("model2" before "model10"), letters lowercased."""
    return [int(part) if part.isdigit() else part.lower() for part in _NATURAL_RE.split(text)]


def _walk_checkpoints(dirs: list[Path], suffixes: tuple[str, ...] = CHECKPOINT_SUFFIXES) -> list[tuple[Path, Path]]:
    """(dir, file) for every checkpoint under `dirs` in the order A1111 lists them, bounded.

    As A1111's `walk_files`: each dir's folders sorted naturally by path, files naturally within a
    folder; only `suffixes` (`.ckpt`/`.safetensors`, Forge also `.gguf`; any case), never `*.vae.*`, nothing inside a hidden folder,
    no broken symlink. A FIFO or device with a checkpoint's name is listed, as A1111 lists it: reading
    its header then fails with one line naming it (its type is checked before it is opened).
    """
    found: list[tuple[Path, Path]] = []
    seen = 0
    for d in dirs:
        if not d.is_dir():  # a FIFO, a file, a dangling link or a link loop there: no checkpoints
            continue
        listing: list[tuple[str, list[str]]] = []
        for dirpath, _dirnames, filenames in os.walk(d, followlinks=True):
            seen += 1 + len(filenames)  # directories count too: a symlink loop must end the walk
            if seen > MAX_WALK:
                break
            listing.append((dirpath, filenames))
        for dirpath, filenames in sorted(listing, key=lambda item: natural_key(item[0])):
            rel = Path(dirpath).relative_to(d)
            if any(part.startswith(".") for part in rel.parts):
                continue
            for name in sorted(filenames, key=natural_key):
                if os.path.splitext(name)[1].lower() not in suffixes or name.endswith(CHECKPOINT_BLACKLIST):
                    continue
                file = Path(dirpath) / name
                if file.is_symlink() and not file.exists():
                    continue
                found.append((d, file))
        if seen > MAX_WALK:
            break
    return found


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_file(path: Path) -> bool:
    """is_file() that is False, not an exception, for a name the OS refuses (too long, NUL, unencodable):
    a damaged `sd_model_checkpoint` names no file, as in A1111."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _is_entry(path: Path) -> bool:
    """Something is there: a file, but also a dangling link, a FIFO, a device or a folder the user
    selected: reading its header then fails with one line naming it (never blocking)."""
    try:
        return os.path.lexists(path)
    except (OSError, ValueError):
        return False


def checkpoint_dirs(root: Path, args: tuple[str, ...] | None) -> list[Path]:
    """Where A1111 lists checkpoints: `--ckpt-dir` first, then `<models dir>/Stable-diffusion`, where
    the models dir is `--models-dir`, else `<--data-dir>/models`, else the tree's own `models/`."""
    data_dir = _abs(root, flag_value(args, "--data-dir") or ".")
    models_flag = flag_value(args, "--models-dir")
    models_dir = _abs(root, models_flag) if models_flag else data_dir / "models"
    dirs = []
    ckpt_dir = flag_value(args, "--ckpt-dir")
    if ckpt_dir:
        dirs.append(_abs(root, ckpt_dir))
    dirs.append(models_dir / "Stable-diffusion")
    return list(dict.fromkeys(dirs))


def checkpoint_dir_problem(dirs: list[Path]) -> str | None:
    """A checkpoint folder that is not one (a FIFO, a file, a dangling or looping link): the UI
    cannot list (or even create) it, so no checkpoint is found; said in one line naming it."""
    for d in dirs:
        try:
            if not os.path.lexists(d) or d.is_dir():
                continue
            st = os.lstat(d)
        except (OSError, ValueError):
            continue
        if stat.S_ISLNK(st.st_mode):
            try:
                os.stat(d)
                what = "a file"
            except OSError as exc:
                what = "a link that loops" if exc.errno == errno.ELOOP else "a link to a folder that does not exist"
            return f"the checkpoint folder {d} is {what} ({os.readlink(d)})"
        return f"the checkpoint folder {d} is {special_kind(st.st_mode) or 'a file'}, not a folder"
    return None


def find_checkpoint(root: Path, config: dict[str, Any], args: tuple[str, ...] | None,
                    suffixes: tuple[str, ...] = CHECKPOINT_SUFFIXES) -> tuple[str | None, Path | None]:
    """(name as the UI shows it, file) of the checkpoint A1111 would load at start-up.

    A1111 lists `--ckpt-dir` first, then `<models dir>/Stable-diffusion`, where the models dir is
    `--models-dir`, else `<--data-dir>/models`, else the tree's own `models/`.
    """
    dirs = checkpoint_dirs(root, args)
    # --ckpt (default <root>/model.ckpt) wins when the file exists.
    ckpt = _abs(root, flag_value(args, "--ckpt") or "model.ckpt")
    if _is_file(ckpt):
        return ckpt.name, ckpt
    selected = config.get("sd_model_checkpoint")
    if isinstance(selected, str) and not _is_text(selected):
        selected = None  # a lone surrogate (an "\\ud800" escape): A1111 never writes one, no file has that name
    if isinstance(selected, str) and strip_hash(selected):
        name = strip_hash(selected).replace("\\", "/")
        for d in dirs:
            candidate = d / name
            if _is_entry(candidate) and not name.endswith(CHECKPOINT_BLACKLIST):
                return name, candidate
        base = name.rsplit("/", 1)[-1]
        for _d, f in _walk_checkpoints(dirs, suffixes):
            if f.name == base:
                return name, f
    # Nothing selected, or the selection is gone: A1111 loads the first checkpoint it lists.
    found = _walk_checkpoints(dirs, suffixes)
    if found:
        d, f = found[0]
        return f.relative_to(d).as_posix(), f
    if isinstance(selected, str) and strip_hash(selected):
        return strip_hash(selected), None
    return None, None


# ComfyUI's model folders (its folder_paths.py): "checkpoints" is models/checkpoints, "diffusion_models" is
# models/unet and models/diffusion_models; extra_model_paths.yaml adds folders under those keys ("unet" is
# the legacy name of diffusion_models). `.gguf` files there are what ComfyUI-GGUF's loader lists.
COMFY_MODEL_FOLDERS = ("checkpoints", "unet", "diffusion_models")
COMFY_EXTRA_KEYS = ("checkpoints", "unet", "diffusion_models")
COMFY_MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".gguf")
MAX_EXTRA_PATHS_BYTES = 1024 * 1024


def _extra_base(root: Path, conf: dict[str, Any]) -> Path | None:
    base = conf.get("base_path")
    if not isinstance(base, str) or not base.strip():
        return None
    p = Path(os.path.expandvars(os.path.expanduser(base.strip())))
    return p if p.is_absolute() else root / p


def comfy_extra_dirs(root: Path) -> tuple[list[Path], str | None]:
    """The model folders `extra_model_paths.yaml` adds under checkpoints/unet/diffusion_models, as
    ComfyUI's utils/extra_config.py reads them (a relative path is the YAML's folder's, or base_path's);
    (folders, why the file could not be read)."""
    path = root / "extra_model_paths.yaml"
    try:
        raw = read_regular_bytes(path, MAX_EXTRA_PATHS_BYTES, "ComfyUI's extra model paths file")
    except UnsafeFileError as exc:
        return [], exc.message
    if raw is None:
        return [], None
    import yaml

    try:
        config = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return [], f"{path} is not valid YAML: its model folders are not read (ComfyUI fails on it too)"
    dirs: list[Path] = []
    for conf in config.values() if isinstance(config, dict) else ():
        if not isinstance(conf, dict):
            continue
        base = _extra_base(root, conf)
        for key in COMFY_EXTRA_KEYS:
            value = conf.get(key)
            for line in value.split("\n") if isinstance(value, str) else ():
                if line.strip():
                    entry = Path(os.path.expanduser(line.strip()))
                    dirs.append(base / entry if base is not None else entry if entry.is_absolute() else root / entry)
    return dirs, None


def comfy_model_dirs(root: Path) -> tuple[list[Path], str | None]:
    """ComfyUI's checkpoint and diffusion-model folders, its own then extra_model_paths.yaml's."""
    extra, problem = comfy_extra_dirs(root)
    return list(dict.fromkeys([root / "models" / name for name in COMFY_MODEL_FOLDERS] + extra)), problem


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except (OSError, ValueError):
        return 0.0


def comfy_models(root: Path) -> tuple[list[str], tuple[str, Path] | None, str | None]:
    """(every model file's name in ComfyUI's model folders, in listing order; the newest file's name and
    path, the one the user most likely runs now; why extra_model_paths.yaml was not read). Bounded as
    A1111's walk."""
    dirs, problem = comfy_model_dirs(root)
    found = [(f.relative_to(d).as_posix(), f) for d, f in _walk_checkpoints(dirs, COMFY_MODEL_SUFFIXES)]
    names = sorted(dict.fromkeys(name for name, _f in found), key=natural_key)
    newest = max(found, key=lambda item: _mtime(item[1]), default=None)
    return names, newest, problem


def read_model(file: Path) -> tuple[dict[str, Any], str | None]:
    """The WebuiFacts fields of one model file (family, variant, format, checkpoint_key), and the
    damage that left its family unknown (None when it read)."""
    fields: dict[str, Any] = {"checkpoint_path": str(file)}
    error = None
    try:
        info = checkpoint_info(file)
        fields.update(model_family=info.family, model_variant=info.variant, model_format=info.format)
    except WebuiError as exc:  # a damaged header: the family is unknown, --model answers it
        fields["model_family"], error = "unknown", exc.message
    try:
        st = file.stat()
        fields["checkpoint_key"] = markers.checkpoint_key(file.name, st.st_size, st.st_mtime)
    except OSError:
        fields["checkpoint_key"] = None
    return fields, error


def _comfy_facts(root: Path, common: dict[str, Any]) -> WebuiFacts:
    names, newest, problem = comfy_models(root)
    fields: dict[str, Any] = {}
    error = None
    if newest is not None:
        fields, error = read_model(newest[1])
        fields["checkpoint"] = newest[0]
    return WebuiFacts(**common, **fields, user_args=None, user_args_literal=True,
                      extensions=_extension_dirs(root / "custom_nodes"), model_files=tuple(names),
                      checkpoint_error=error, config_error=problem)


def _extension_dirs(ext_root: Path) -> tuple[str, ...]:
    try:
        return tuple(sorted(p.name for p in ext_root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    except OSError:
        return ()


# ---------------------------------------------------------------------------------------------


def probe_webui(path: Path, os_name: str | None = None) -> WebuiFacts:
    """Read a WebUI tree. Raises WebuiError when `path` is not one, or a file in it is unreadable.

    Damaged optional inputs are read past, never fatal: a config.json the UI cannot load is planned
    for as the UI's defaults (`config_error`), a damaged checkpoint header leaves the family unknown
    (`checkpoint_error`); doctor warns about each, plan says it and `--model` answers the family.
    """
    from lowvram.world.detect.system import host_os

    root = Path(path).expanduser()
    flavor = detect_flavor(root)
    if flavor is None:
        raise not_a_webui(root)
    root = root.resolve()
    os_name = os_name or host_os()
    site = site_packages(root, flavor)
    torch, torch_cuda = torch_build(site)
    xformers = _dist_version(site, "xformers") if site is not None else None
    python = venv_python(root, flavor)
    common: dict[str, Any] = {
        "path": str(root),
        "flavor": flavor,
        "version": webui_version(root, flavor),
        "python": str(python) if python else None,
        "torch": torch,
        "torch_cuda": torch_cuda,
        "xformers": xformers,
        "ui_flags": read_ui_flags(root, flavor),  # the installed UI's own flags, read as data
    }
    if flavor == "comfyui":
        return _comfy_facts(root, common)
    user_args, literal = read_user_args(root, os_name, flavor)
    data_dir = _abs(root, flag_value(user_args, "--data-dir") or ".")
    settings_file = flag_value(user_args, "--ui-settings-file")
    config_error = checkpoint_error = None
    try:
        config = read_config(_abs(root, settings_file) if settings_file else data_dir / "config.json")
    except ConfigDamagedError as exc:  # the UI resets it to its defaults: plan for those, and say so
        config, config_error = {}, exc.message
    suffixes = FORGE_CHECKPOINT_SUFFIXES if flavor in ("forge", "forge-neo") else CHECKPOINT_SUFFIXES
    name, file = find_checkpoint(root, config, user_args, suffixes)
    model: dict[str, Any] = {}
    if file is None:  # a FIFO, a file or a broken link where the checkpoint folder belongs: say which
        checkpoint_error = checkpoint_dir_problem(checkpoint_dirs(root, user_args))
    else:
        model, checkpoint_error = read_model(file)
    bcu = config.get("batch_cond_uncond", True)
    disabled = config.get("disabled_extensions", [])
    return WebuiFacts(
        **common,
        checkpoint=name,
        **model,
        batch_cond_uncond=bcu if isinstance(bcu, bool) else True,
        user_args=user_args,
        user_args_literal=literal,
        extensions=_extension_dirs(data_dir / "extensions"),
        disabled_extensions=tuple(x for x in disabled if isinstance(x, str)) if isinstance(disabled, list) else (),
        checkpoint_error=checkpoint_error,
        config_error=config_error,
    )
