"""A WebUI install on disk: flavor, version, venv, torch/xformers builds, checkpoint, user flags.

Everything is read from files (DESIGN.md §3): no torch import and no subprocess except
`git describe` with a 1 s limit. The user's COMMANDLINE_ARGS are read from webui-user.sh/.bat
outside lowvram's managed block; a value that the shell would expand ($VAR, `…`, %VAR%) is not
literal and is reported as such rather than guessed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

from lowvram import markers
from lowvram.detect.checkpoint import checkpoint_family
from lowvram.errors import WebuiError
from lowvram.facts import WebuiFacts

GIT_TIMEOUT_S = 1.0
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
MAX_WALK = 5000
MAX_CONFIG_BYTES = 16 * 1024 * 1024

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
            return "forge"
        if ((root / "webui.sh").is_file() or (root / "webui.bat").is_file()) and (root / "modules" / "cmd_args.py").is_file():
            return "a1111"
    except OSError:
        return None
    return None


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


def _changelog_version(root: Path) -> str | None:
    try:
        with open(root / "CHANGELOG.md", encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh):
                if n > 500:
                    break
                m = _CHANGELOG_RE.match(line)
                if m:
                    return m.group(1)
    except OSError:
        return None
    return None


_PY_STR_RE = r"""\s*(?::[^=]*)?=\s*(?:['"]([^'"]*)['"]|(None))"""


def _py_assignment(text: str, name: str) -> str | None:
    m = re.search(rf"^{re.escape(name)}{_PY_STR_RE}", text, re.MULTILINE)
    return m.group(1) if m and m.group(1) is not None else None


def _comfy_version(root: Path) -> str | None:
    try:
        text = (root / "comfyui_version.py").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return _py_assignment(text, "__version__")


def webui_version(root: Path, flavor: str) -> str | None:
    if flavor == "comfyui":
        return _comfy_version(root) or _git_describe(root)
    return _git_describe(root) or _changelog_version(root)


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
        try:
            with open(info / "METADATA", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if line.startswith("Version:"):
                        version = line.split(":", 1)[1].strip()
                        break
                    if not line.strip():
                        break
        except OSError:
            pass
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
    try:
        text = (site / "torch" / "version.py").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = None
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


def _outside_block(lines: list[str], begin: str, end: str) -> list[str]:
    out: list[str] = []
    inside = False
    for line in lines:
        stripped = line.strip()
        if stripped == begin:
            inside = True
            continue
        if stripped == end:
            inside = False
            continue
        if not inside:
            out.append(line)
    return out


_SH_RE = re.compile(r"^\s*export\s+COMMANDLINE_ARGS=(.*)$")
_BAT_RE = re.compile(r'^\s*@?set\s+(")?COMMANDLINE_ARGS=(.*)$', re.IGNORECASE)


def parse_sh_args(text: str) -> tuple[tuple[str, ...] | None, bool]:
    """(args, literal) from the last `export COMMANDLINE_ARGS=…` outside lowvram's block."""
    raw = None
    for line in _outside_block(text.splitlines(), markers.BLOCK_BEGIN, markers.BLOCK_END):
        m = _SH_RE.match(line)
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


def parse_bat_args(text: str) -> tuple[tuple[str, ...] | None, bool]:
    """(args, literal) from the last `set COMMANDLINE_ARGS=…` / `set "COMMANDLINE_ARGS=…"`."""
    raw = None
    for line in _outside_block(text.splitlines(), markers.BAT_BLOCK_BEGIN, markers.BAT_BLOCK_END):
        m = _BAT_RE.match(line)
        if m:
            value = m.group(2)
            if m.group(1):
                value = value[: value.rfind('"')] if '"' in value else value
            raw = value
    if raw is None:
        return None, True
    if "%" in raw or "!" in raw:
        return None, False
    try:
        return tuple(shlex.split(raw)), True
    except ValueError:
        return None, False


def read_user_args(root: Path, os_name: str) -> tuple[tuple[str, ...] | None, bool]:
    name = "webui-user.bat" if os_name == "windows" else "webui-user.sh"
    try:
        text = (root / name).read_bytes().decode("utf-8", "replace")
    except OSError:
        return None, True
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


def read_config(path: Path) -> dict[str, Any]:
    """A1111's settings; missing = a fresh install (defaults); unreadable or invalid = WebuiError."""
    hint = f"fix {path.name} or move it away (the UI writes a fresh one at start-up)"
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise WebuiError(f"{path} is too large to be the UI's settings", hint)
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise WebuiError(f"cannot read {path}: {exc.strerror or exc}", hint) from exc
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise WebuiError(f"{path} is not UTF-8 text", hint) from exc
    except json.JSONDecodeError as exc:
        raise WebuiError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})", hint) from exc
    except (ValueError, RecursionError) as exc:  # a number over Python's digit limit, absurd nesting
        raise WebuiError(f"{path} holds values no UI setting has ({str(exc).splitlines()[0][:80]})", hint) from exc
    if not isinstance(data, dict):
        raise WebuiError(f"{path} is not a JSON object of settings", hint)
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


def _walk_checkpoints(dirs: list[Path]) -> list[tuple[Path, Path]]:
    """(dir, file) for every checkpoint under `dirs` in the order A1111 lists them, bounded.

    As A1111's `walk_files`: each dir's folders sorted naturally by path, files naturally within a
    folder; only `.ckpt`/`.safetensors` (any case), never `*.vae.*`, nothing inside a hidden folder,
    no broken symlink.
    """
    found: list[tuple[Path, Path]] = []
    seen = 0
    for d in dirs:
        if not d.is_dir():
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
                if os.path.splitext(name)[1].lower() not in CHECKPOINT_SUFFIXES or name.endswith(CHECKPOINT_BLACKLIST):
                    continue
                file = Path(dirpath) / name
                if file.is_symlink() and not file.exists():
                    continue
                found.append((d, file))
        if seen > MAX_WALK:
            break
    return found


def find_checkpoint(root: Path, config: dict[str, Any], args: tuple[str, ...] | None) -> tuple[str | None, Path | None]:
    """(name as the UI shows it, file) of the checkpoint A1111 would load at start-up.

    A1111 lists `--ckpt-dir` first, then `<models dir>/Stable-diffusion`, where the models dir is
    `--models-dir`, else `<--data-dir>/models`, else the tree's own `models/`.
    """
    data_dir = _abs(root, flag_value(args, "--data-dir") or ".")
    models_flag = flag_value(args, "--models-dir")
    models_dir = _abs(root, models_flag) if models_flag else data_dir / "models"
    dirs = []
    ckpt_dir = flag_value(args, "--ckpt-dir")
    if ckpt_dir:
        dirs.append(_abs(root, ckpt_dir))
    dirs.append(models_dir / "Stable-diffusion")
    dirs = list(dict.fromkeys(dirs))
    # --ckpt (default <root>/model.ckpt) wins when the file exists.
    ckpt = _abs(root, flag_value(args, "--ckpt") or "model.ckpt")
    if ckpt.is_file():
        return ckpt.name, ckpt
    selected = config.get("sd_model_checkpoint")
    if isinstance(selected, str) and strip_hash(selected):
        name = strip_hash(selected).replace("\\", "/")
        for d in dirs:
            candidate = d / name
            if candidate.is_file() and not name.endswith(CHECKPOINT_BLACKLIST):
                return name, candidate
        base = name.rsplit("/", 1)[-1]
        for _d, f in _walk_checkpoints(dirs):
            if f.name == base:
                return name, f
    # Nothing selected, or the selection is gone: A1111 loads the first checkpoint it lists.
    found = _walk_checkpoints(dirs)
    if found:
        d, f = found[0]
        return f.relative_to(d).as_posix(), f
    if isinstance(selected, str) and strip_hash(selected):
        return strip_hash(selected), None
    return None, None


def _extension_dirs(ext_root: Path) -> tuple[str, ...]:
    try:
        return tuple(sorted(p.name for p in ext_root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    except OSError:
        return ()


# ---------------------------------------------------------------------------------------------


def probe_webui(path: Path, os_name: str | None = None) -> WebuiFacts:
    """Read a WebUI tree. Raises WebuiError when `path` is not one, or a file in it is unreadable."""
    from lowvram.detect.system import host_os

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
    }
    if flavor == "comfyui":
        return WebuiFacts(**common, user_args=None, user_args_literal=True,
                          extensions=_extension_dirs(root / "custom_nodes"))
    user_args, literal = read_user_args(root, os_name)
    data_dir = _abs(root, flag_value(user_args, "--data-dir") or ".")
    settings_file = flag_value(user_args, "--ui-settings-file")
    config = read_config(_abs(root, settings_file) if settings_file else data_dir / "config.json")
    name, file = find_checkpoint(root, config, user_args)
    family = key = None
    if file is not None:
        family = checkpoint_family(file)
        try:
            st = file.stat()
            key = markers.checkpoint_key(file.name, st.st_size, st.st_mtime)
        except OSError:
            key = None
    bcu = config.get("batch_cond_uncond", True)
    disabled = config.get("disabled_extensions", [])
    return WebuiFacts(
        **common,
        checkpoint=name,
        checkpoint_path=str(file) if file else None,
        checkpoint_key=key,
        model_family=family,
        batch_cond_uncond=bcu if isinstance(bcu, bool) else True,
        user_args=user_args,
        user_args_literal=literal,
        extensions=_extension_dirs(data_dir / "extensions"),
        disabled_extensions=tuple(x for x in disabled if isinstance(x, str)) if isinstance(disabled, list) else (),
    )
