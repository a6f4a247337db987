"""Profiles: YAML files validated into frozen typed objects, with single inheritance and auto-selection.

A profile is what an experienced user would set for one class of machine (docs/architecture.md#from-facts-to-a-launch). Bad YAML
is refused with one line naming the file, the line, the key path, what was expected and, for a
typo, the closest real key. YAML is read with a safe loader that refuses anchors/aliases, and
lowvram/world/profile_files.py refuses files over 1 MiB: a deep merge of an alias bomb would otherwise
eat the machine's memory.

This module is pure: it parses and validates bytes it is handed (the path only names the file in
messages), merges an `extends` chain through a lookup the caller supplies, and selects among the
profiles it is given. Finding and reading the files (bundled and user dirs) is
lowvram/world/profile_files.py, the edge.

A profile is the user's own instruction, so a damaged one stops the command before anything is
written, never skipped: also under `auto`, which reads every profile (a damaged user profile that
overrides a bundled one must not be replaced silently). Damage covers broken YAML, more than one
document, nesting too deep, a number over Python's 4300-digit limit, non-finite or out-of-range
values, duplicate or merge (<<) keys, anchors and aliases, tags, escapes that produce a control
character or a lone surrogate, an `extends` chain that loops, and a file that is not UTF-8.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowvram.core.errors import ProfileError
from lowvram.core.facts import Facts, GpuFacts

MAX_PROFILE_BYTES = 1024 * 1024
MAX_EXTENDS_DEPTH = 16

OFFLOADS = ("auto", "none", "medvram-sdxl", "medvram", "lowvram", "novram", "cpu")
ATTENTIONS = ("auto", "xformers", "sdp", "sdp-no-mem", "sub-quad", "split", "none")
UNET_PRECISIONS = ("half", "full", "upcast")
VAE_PRECISIONS = ("half", "full")
TRISTATE = ("auto", "on", "off")
MODELS = ("sd15", "sd2", "sdxl", "flux1-dev", "flux1-schnell", "sd3-medium", "sd3.5-medium", "sd3.5-large")
ORDERS = ("ascending", "descending")
OSES = ("linux", "windows", "darwin")

# What a key is when no profile in the chain sets it (`profiles show` says "default").
DEFAULTS: dict[str, Any] = {
    "offload": "auto",
    "attention": "auto",
    "precision": {"unet": "half", "vae": "half"},
    "tcmalloc": "auto",
    "sysmem_fallback": "auto",
    "alloc_conf": {},
    "extensions": [],
    "layout": {"mode": "auto", "reserve": "auto", "order": "ascending", "model_first": True},
    "args": [],
    "target": {"batch": 1, "hires_scale": 1.0},
}

# Keys a child never inherits: each profile's own match decides where it applies.
NOT_INHERITED = ("name", "description", "match", "extends")


# ---------------------------------------------------------------------------------------------
# Typed profile


@dataclass(frozen=True)
class Match:
    gpu: tuple[str, ...] = ()  # substrings of the NVML name, case-insensitive
    vram_mb: tuple[int, int] | None = None  # inclusive range of total VRAM
    model: tuple[str, ...] = ()  # families this profile is for
    compute_capability: tuple[str, str] | None = None  # inclusive range, "6.0".."6.2"
    os: tuple[str, ...] = ()
    nvidia: bool | None = None  # False: only machines without a usable NVIDIA GPU

    @property
    def hardware_constraints(self) -> int:
        return sum(bool(x) for x in (self.gpu, self.vram_mb, self.compute_capability, self.os)) + (
            self.nvidia is not None
        )


@dataclass(frozen=True)
class Precision:
    unet: str = "half"
    vae: str = "half"


@dataclass(frozen=True)
class Layout:
    mode: str = "auto"  # auto | on | off
    reserve: str | int = "auto"  # auto | MiB
    order: str = "ascending"
    model_first: bool = True


@dataclass(frozen=True)
class Target:
    width: int | None = None
    height: int | None = None
    batch: int = 1
    hires_scale: float = 1.0


@dataclass(frozen=True)
class Profile:
    name: str
    description: str = ""
    extends: str | None = None
    match: Match = field(default_factory=Match)
    offload: str = "auto"
    attention: str = "auto"
    precision: Precision = field(default_factory=Precision)
    tcmalloc: str = "auto"
    alloc_conf: Mapping[str, str] = field(default_factory=dict)
    extensions: tuple[str, ...] = ()
    layout: Layout = field(default_factory=Layout)
    args: tuple[str, ...] = ()
    target: Target = field(default_factory=Target)
    sysmem_fallback: str = "auto"


@dataclass(frozen=True)
class ResolvedProfile:
    """A profile with its parents merged in; `origins[key.path]` names the profile that set it."""

    profile: Profile
    origins: Mapping[str, str]
    chain: tuple[str, ...]  # this profile, then its parents
    source: str  # bundled | user
    path: Path | None
    data: Mapping[str, Any]  # the merged plain data (what `profiles show` prints)

    @property
    def name(self) -> str:
        return self.profile.name


@dataclass(frozen=True)
class ProfileInfo:
    name: str
    description: str
    source: str  # bundled | user
    path: str
    extends: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "source": self.source,
                "path": self.path, "extends": self.extends}


@dataclass(frozen=True)
class Selection:
    name: str
    reason: str
    others_matched: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# YAML: a safe loader without anchors/aliases, and a map from key path to line


def _loader_class() -> type:
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        """SafeLoader that refuses anchors and aliases (an alias bomb expands exponentially)."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()  # type: ignore[no-untyped-call]
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise _AliasRefusedError(event.start_mark.line + 1)
            return super().compose_node(parent, index)

    return NoAliasLoader


class _AliasRefusedError(Exception):
    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


@dataclass
class _Doc:
    path: Path
    data: dict[str, Any]
    lines: dict[tuple[Any, ...], int]


def parse_yaml(raw: bytes, path: Path) -> _Doc:
    """Parse one profile's bytes (already read, size-checked) into data and a key path → line map.

    `path` only names the file in messages and in the returned `_Doc`; nothing is read here.
    """
    import yaml

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{path}: not UTF-8 text", "save the profile as UTF-8") from exc
    try:
        loader = _loader_class()(text)
    except yaml.YAMLError as exc:  # the reader refuses control characters before parsing
        raise ProfileError(f"{path}: {_yaml_problem(exc)}", "remove the control character") from exc
    try:
        try:
            node = loader.get_single_node()
        except _AliasRefusedError as exc:
            raise ProfileError(
                f"{path}:{exc.line}: YAML anchors and aliases (&, *) are not allowed in profiles",
                "write the values out, or use `extends:` to share them",
            ) from None
        except yaml.composer.ComposerError as exc:
            raise ProfileError(f"{path}: more than one YAML document", "keep one profile per file") from exc
        except yaml.YAMLError as exc:
            raise ProfileError(f"{path}{_yaml_line(exc)}: not valid YAML ({_yaml_problem(exc)})",
                               "check indentation and quoting") from exc
        if node is None:
            raise ProfileError(f"{path}: the file is empty", "a profile needs at least `description:`")
        if not isinstance(node, yaml.MappingNode):
            raise ProfileError(f"{path}:{node.start_mark.line + 1}: a profile must be a mapping of keys",
                               "start with `description: ...`")
        lines: dict[tuple[Any, ...], int] = {}
        _check_node(path, node, (), lines)
        try:
            data = loader.construct_document(node)
        except yaml.YAMLError as exc:  # e.g. an unknown tag such as !!python/object
            raise ProfileError(f"{path}{_yaml_line(exc)}: cannot read a value ({_yaml_problem(exc)})",
                               "profiles hold plain values: strings, numbers, lists and mappings") from exc
        except ValueError as exc:  # an integer over Python's int-to-str digit limit
            raise ProfileError(f"{path}: a number is far too large ({str(exc).splitlines()[0][:80]})",
                               "check the values: sizes are in pixels and MiB") from exc
    except RecursionError:
        raise ProfileError(f"{path}: nested too deeply to be a profile",
                           "a profile is a flat mapping with a few small lists and mappings") from None
    finally:
        loader.dispose()
    return _Doc(path, data, lines)


def _yaml_line(exc: Exception) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f":{mark.line + 1}" if mark is not None else ""


def _yaml_problem(exc: Exception) -> str:
    """PyYAML's own message spans several lines (with the source line marked): keep its first."""
    problem = getattr(exc, "problem", None) or str(exc)
    return " ".join(str(problem).split())[:160]


def _check_node(path: Path, node: Any, key_path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> None:
    """Record each key path's line; refuse duplicate keys and non-string keys."""
    import yaml

    lines[key_path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == "<<":
                raise ProfileError(f"{path}:{line}: YAML merge keys (<<) are not allowed in profiles",
                                   "use `extends:` to share values")
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                raise ProfileError(f"{path}:{line}: keys must be plain words, not {key_node.value!r}",
                                   "write `key: value`")
            key = key_node.value
            if _BAD_TEXT.search(key):
                raise ProfileError(f"{path}:{line}: a key holds a control character or a lone surrogate",
                                   "profiles hold plain text: remove it")
            if key in seen:
                raise ProfileError(f"{path}:{line}: `{_dotted((*key_path, key))}` is given twice",
                                   "keep one of them")
            seen.add(key)
            _check_node(path, value_node, (*key_path, key), lines)
            lines[key_path + (key,)] = line  # noqa: RUF005 (mypy reads a starred subscript as 3.11-only)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_node(path, item, (*key_path, i), lines)
    elif isinstance(node, yaml.ScalarNode) and _BAD_TEXT.search(node.value):
        # The reader refuses these characters written out; an escape ("\0", "\e", "\ud800") gets
        # past it: a lone surrogate cannot be printed or written, a NUL cannot go into a command line.
        raise ProfileError(f"{path}:{lines[key_path]}: `{_dotted(key_path)}` holds a control character or a lone "
                           "surrogate (an escape such as \\0 or \\ud800)", "profiles hold plain text: remove it")


_BAD_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def _dotted(key_path: Iterable[Any]) -> str:
    out = ""
    for part in key_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top)"


# ---------------------------------------------------------------------------------------------
# Validation


class _V:
    """Validates one file's raw data against the schema, raising ProfileError with file:line."""

    def __init__(self, doc: _Doc) -> None:
        self.doc = doc

    def line(self, key_path: tuple[Any, ...]) -> int:
        while key_path and key_path not in self.doc.lines:
            key_path = key_path[:-1]
        return self.doc.lines.get(key_path, 1)

    def fail(self, key_path: tuple[Any, ...], expected: str, value: Any, hint: str = "") -> ProfileError:
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        return ProfileError(
            f"{self.doc.path}:{self.line(key_path)}: `{_dotted(key_path)}` should be {expected}, not {shown}",
            hint or "see `lowvram profiles show 8gb-sdxl` for a complete example",
        )

    def keys(self, data: Mapping[str, Any], allowed: Sequence[str], key_path: tuple[Any, ...]) -> None:
        for key in data:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.5)
                where = f"`{_dotted((*key_path, key))}`"
                message = f"{self.doc.path}:{self.line((*key_path, key))}: unknown key {where}"
                if close:
                    message += f" (did you mean `{close[0]}`?)"
                raise ProfileError(message, "valid keys here: " + ", ".join(allowed))

    def mapping(self, value: Any, key_path: tuple[Any, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key_path, "a mapping (key: value lines)", value)
        return value

    def string(self, value: Any, key_path: tuple[Any, ...]) -> str:
        if not isinstance(value, str):
            raise self.fail(key_path, "a string", value)
        return value

    def choice(self, value: Any, key_path: tuple[Any, ...], choices: Sequence[str]) -> str:
        if isinstance(value, bool) and "on" in choices:
            return "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if not isinstance(value, str) or value not in choices:
            close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
            hint = f"did you mean `{close[0]}`?" if close else ""
            raise self.fail(key_path, "one of " + " | ".join(choices), value, hint)
        return value

    def boolean(self, value: Any, key_path: tuple[Any, ...]) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key_path, "true or false", value)
        return value

    def integer(self, value: Any, key_path: tuple[Any, ...], lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key_path, f"a whole number from {lo} to {hi}", value)
        if not lo <= value <= hi:
            raise self.fail(key_path, f"a whole number from {lo} to {hi}", value)
        return value

    def number(self, value: Any, key_path: tuple[Any, ...], lo: float, hi: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key_path, f"a number from {lo} to {hi}", value)
        if isinstance(value, float) and not math.isfinite(value):  # (an int too large for a float is out of range below)
            raise self.fail(key_path, f"a number from {lo} to {hi}", value)
        if not lo <= value <= hi:
            raise self.fail(key_path, f"a number from {lo} to {hi}", value)
        return float(value)

    def strings(self, value: Any, key_path: tuple[Any, ...], choices: Sequence[str] | None = None) -> list[str]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise self.fail(key_path, "a string or a list of strings", value)
        out = []
        for i, item in enumerate(items):
            if choices is not None:
                out.append(self.choice(item, (*key_path, i), choices))
            else:
                out.append(self.string(item, (*key_path, i)))
        return out


TOP_KEYS = ("name", "description", "extends", "match", "offload", "attention", "precision", "tcmalloc",
            "alloc_conf", "extensions", "layout", "args", "target", "sysmem_fallback")
MATCH_KEYS = ("gpu", "vram_mb", "model", "compute_capability", "os", "nvidia")
PRECISION_KEYS = ("unet", "vae")
LAYOUT_KEYS = ("mode", "reserve", "order", "model_first")
TARGET_KEYS = ("width", "height", "batch", "hires_scale")
ALLOC_KEYS = ("max_split_size_mb", "backend", "expandable_segments", "garbage_collection_threshold",
              "roundup_power2_divisions", "pinned_use_cuda_host_register", "pinned_num_register_threads",
              "release_lock_on_cudamalloc", "max_non_split_rounding_mb")


def _cc_value(v: _V, value: Any, key_path: tuple[Any, ...]) -> str:
    text = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(text, str):
        raise v.fail(key_path, 'a compute capability like "6.1"', value)
    major, dot, minor = text.partition(".")
    if not (major.isdigit() and (not dot or minor.isdigit())) or len(major) > 3 or len(minor) > 3:
        raise v.fail(key_path, 'a compute capability like "6.1"', value)
    return f"{int(major)}.{int(minor or 0)}"


def _cc_key(cc: str) -> tuple[int, int]:
    major, _, minor = cc.partition(".")
    return int(major), int(minor or 0)


def _validate_match(v: _V, value: Any) -> dict[str, Any]:
    """The `match:` mapping, checked and normalised."""
    m = v.mapping(value, ("match",))
    v.keys(m, MATCH_KEYS, ("match",))
    mo: dict[str, Any] = {}
    if "gpu" in m:
        mo["gpu"] = v.strings(m["gpu"], ("match", "gpu"))
    if "model" in m:
        mo["model"] = v.strings(m["model"], ("match", "model"), MODELS)
    if "os" in m:
        mo["os"] = v.strings(m["os"], ("match", "os"), OSES)
    if "nvidia" in m:
        mo["nvidia"] = v.boolean(m["nvidia"], ("match", "nvidia"))
    if "vram_mb" in m:
        rng = m["vram_mb"]
        if not isinstance(rng, list) or len(rng) != 2:
            raise v.fail(("match", "vram_mb"), "a range [low, high] in MiB", rng)
        lo = v.integer(rng[0], ("match", "vram_mb", 0), 0, 1 << 22)
        hi = v.integer(rng[1], ("match", "vram_mb", 1), 0, 1 << 22)
        if lo > hi:
            raise v.fail(("match", "vram_mb"), "a range whose low end is not above its high end", rng)
        mo["vram_mb"] = [lo, hi]
    if "compute_capability" in m:
        rng = m["compute_capability"]
        if isinstance(rng, (str, int, float)) and not isinstance(rng, bool):
            rng = [rng, rng]
        if not isinstance(rng, list) or len(rng) != 2:
            raise v.fail(("match", "compute_capability"), 'a range ["6.0", "6.2"]', rng)
        lo_cc = _cc_value(v, rng[0], ("match", "compute_capability", 0))
        hi_cc = _cc_value(v, rng[1], ("match", "compute_capability", 1))
        if _cc_key(lo_cc) > _cc_key(hi_cc):
            raise v.fail(("match", "compute_capability"), "a range whose low end is not above its high end", rng)
        mo["compute_capability"] = [lo_cc, hi_cc]
    return mo


def validate_raw(doc: _Doc) -> dict[str, Any]:
    """Check one file's data against the schema and return it normalised (still plain data)."""
    v = _V(doc)
    data = doc.data
    v.keys(data, TOP_KEYS, ())
    out: dict[str, Any] = {}
    for key in ("name", "description", "extends"):
        if key in data:
            out[key] = v.string(data[key], (key,))
    if "name" in out and out["name"] != doc.path.stem:
        raise ProfileError(
            f"{doc.path}:{v.line(('name',))}: `name` is {out['name']!r} but the file is {doc.path.name}",
            f"rename the file to {out['name']}.yaml or drop the `name:` line",
        )
    if "match" in data:
        out["match"] = _validate_match(v, data["match"])
    if "offload" in data:
        out["offload"] = v.choice(data["offload"], ("offload",), OFFLOADS)
    if "attention" in data:
        out["attention"] = v.choice(data["attention"], ("attention",), ATTENTIONS)
    if "tcmalloc" in data:
        out["tcmalloc"] = v.choice(data["tcmalloc"], ("tcmalloc",), TRISTATE)
    if "sysmem_fallback" in data:
        out["sysmem_fallback"] = v.choice(data["sysmem_fallback"], ("sysmem_fallback",), TRISTATE)
    if "precision" in data:
        p = v.mapping(data["precision"], ("precision",))
        v.keys(p, PRECISION_KEYS, ("precision",))
        po: dict[str, Any] = {}
        if "unet" in p:
            po["unet"] = v.choice(p["unet"], ("precision", "unet"), UNET_PRECISIONS)
        if "vae" in p:
            po["vae"] = v.choice(p["vae"], ("precision", "vae"), VAE_PRECISIONS)
        out["precision"] = po
    if "alloc_conf" in data:
        a = v.mapping(data["alloc_conf"], ("alloc_conf",))
        v.keys(a, ALLOC_KEYS, ("alloc_conf",))
        ao: dict[str, Any] = {}
        for key, value in a.items():
            if isinstance(value, bool):
                ao[key] = "True" if value else "False"
            elif isinstance(value, (int, float)) and not (abs(value) < 2**31 and math.isfinite(value)):
                # torch reads these with stoi/stod: inf, nan or a huge number stop the UI at start-up
                raise v.fail(("alloc_conf", key), "a finite number below 2^31", value)
            elif isinstance(value, (int, float, str)) and str(value).strip() and "," not in str(value):
                ao[key] = str(value)
            else:
                raise v.fail(("alloc_conf", key), "a single value (number, word or true/false)", value)
        out["alloc_conf"] = ao
    if "extensions" in data:
        out["extensions"] = v.strings(data["extensions"], ("extensions",))
    if "args" in data:
        args = data["args"]
        if not isinstance(args, list):
            raise v.fail(("args",), "a list of flags", args)
        out["args"] = [v.string(a, ("args", i)) for i, a in enumerate(args)]
    if "layout" in data:
        lay = v.mapping(data["layout"], ("layout",))
        v.keys(lay, LAYOUT_KEYS, ("layout",))
        lo_: dict[str, Any] = {}
        if "mode" in lay:
            lo_["mode"] = v.choice(lay["mode"], ("layout", "mode"), TRISTATE)
        if "reserve" in lay:
            r = lay["reserve"]
            lo_["reserve"] = "auto" if r == "auto" else v.integer(r, ("layout", "reserve"), 0, 1 << 20)
        if "order" in lay:
            lo_["order"] = v.choice(lay["order"], ("layout", "order"), ORDERS)
        if "model_first" in lay:
            lo_["model_first"] = v.boolean(lay["model_first"], ("layout", "model_first"))
        out["layout"] = lo_
    if "target" in data:
        t = v.mapping(data["target"], ("target",))
        v.keys(t, TARGET_KEYS, ("target",))
        to: dict[str, Any] = {}
        for key in ("width", "height"):
            if key in t:
                value = v.integer(t[key], ("target", key), 64, 8192)
                if value % 8:
                    raise v.fail(("target", key), "a multiple of 8 (the latent is 1/8 of the image)", value)
                to[key] = value
        if "batch" in t:
            to["batch"] = v.integer(t["batch"], ("target", "batch"), 1, 64)
        if "hires_scale" in t:
            to["hires_scale"] = v.number(t["hires_scale"], ("target", "hires_scale"), 1.0, 4.0)
        out["target"] = to
    return out


# ---------------------------------------------------------------------------------------------
# Merging, resolving


def parse_profile(raw: bytes, path: Path) -> dict[str, Any]:
    """One profile file's bytes, parsed and validated into normalised plain data."""
    return validate_raw(parse_yaml(raw, path))


def _merge(base: dict[str, Any], child: dict[str, Any], child_name: str, origins: dict[str, str],
           prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "alloc_conf":
            out[key] = _merge(base[key], value, child_name, origins, (*prefix, key))
        else:
            out[key] = value
            _set_origins(value, (*prefix, key), child_name, origins)
    return out


def _set_origins(value: Any, key_path: tuple[str, ...], name: str, origins: dict[str, str]) -> None:
    dotted = ".".join(key_path)
    for k in [k for k in origins if k == dotted or k.startswith(dotted + ".")]:
        del origins[k]
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _set_origins(v, (*key_path, k), name, origins)
    else:
        origins[dotted] = name


def suggest(name: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.4)
    return ("did you mean " + ", ".join(close) + "? " if close else "") + "see `lowvram profiles list`"


def resolve_profile(name: str, files: Mapping[str, tuple[Path, str]],
                    read: Callable[[str], Mapping[str, Any]]) -> ResolvedProfile:
    """The named profile with its `extends` chain merged in (unknown name → suggestions).

    `files` maps every known profile name to (path, source); `read(name)` returns that profile's
    validated plain data (see `parse_profile`). Only the profiles in the chain are read, in order.
    """
    if name not in files:
        raise ProfileError(f"no profile named {name!r}", suggest(name, files))
    chain: list[str] = []
    raws: list[Mapping[str, Any]] = []
    current: str | None = name
    while current is not None:
        if current in chain:
            cycle = " → ".join([*chain, current])
            raise ProfileError(f"{files[chain[-1]][0]}: profile {name!r} extends itself in a cycle: {cycle}",
                               "remove one `extends:` line from the cycle")
        if len(chain) >= MAX_EXTENDS_DEPTH:
            raise ProfileError(f"{files[chain[-1]][0]}: profile {name!r} extends more than {MAX_EXTENDS_DEPTH} "
                               "levels deep", "flatten the chain of `extends:`")
        if current not in files:
            child = chain[-1]
            raise ProfileError(f"{files[child][0]}: `extends: {current}` names no profile",
                               suggest(current, files))
        raw = read(current)
        chain.append(current)
        raws.append(raw)
        current = raw.get("extends")
    origins: dict[str, str] = {}
    merged: dict[str, Any] = _merge({}, DEFAULTS, "default", origins)
    for profile_name, raw in zip(reversed(chain), reversed(raws), strict=True):
        inheritable = {k: v for k, v in raw.items() if k not in NOT_INHERITED}
        merged = _merge(merged, inheritable, profile_name, origins)
    own = raws[0]
    for key in NOT_INHERITED:
        if key in own:
            merged[key] = own[key]
            _set_origins(own[key], (key,), name, origins)
    merged["name"] = name
    origins["name"] = name
    path, source = files[name]
    return ResolvedProfile(_build(merged), origins, tuple(chain), source, path, merged)


def _build(d: Mapping[str, Any]) -> Profile:
    m = d.get("match", {})
    p = d.get("precision", {})
    lay = d.get("layout", {})
    t = d.get("target", {})
    match = Match(
        gpu=tuple(m.get("gpu", ())),
        vram_mb=tuple(m["vram_mb"]) if "vram_mb" in m else None,  # type: ignore[arg-type]
        model=tuple(m.get("model", ())),
        compute_capability=tuple(m["compute_capability"]) if "compute_capability" in m else None,  # type: ignore[arg-type]
        os=tuple(m.get("os", ())),
        nvidia=m.get("nvidia"),
    )
    return Profile(
        name=d["name"],
        description=d.get("description", ""),
        extends=d.get("extends"),
        match=match,
        offload=d.get("offload", "auto"),
        attention=d.get("attention", "auto"),
        precision=Precision(unet=p.get("unet", "half"), vae=p.get("vae", "half")),
        tcmalloc=d.get("tcmalloc", "auto"),
        alloc_conf=dict(d.get("alloc_conf", {})),
        extensions=tuple(d.get("extensions", ())),
        layout=Layout(mode=lay.get("mode", "auto"), reserve=lay.get("reserve", "auto"),
                      order=lay.get("order", "ascending"), model_first=lay.get("model_first", True)),
        args=tuple(d.get("args", ())),
        target=Target(width=t.get("width"), height=t.get("height"), batch=t.get("batch", 1),
                      hires_scale=t.get("hires_scale", 1.0)),
        sysmem_fallback=d.get("sysmem_fallback", "auto"),
    )


# ---------------------------------------------------------------------------------------------
# Matching and auto-selection


def _family_for_match(family: str | None) -> str | None:
    if family == "sdxl-refiner":
        return "sdxl"
    return family


def match_failure(profile: Profile, facts: Facts, family: str | None, gpu: GpuFacts | None) -> str | None:
    """Why `profile` does not fit this machine and family, or None when it fits."""
    m = profile.match
    fam = _family_for_match(family)
    if m.model and fam is not None and fam not in m.model:
        return f"it is for {'/'.join(m.model)}, the model is {family}"
    if m.os and facts.system.os not in m.os:
        return f"it is for {'/'.join(m.os)}"
    if m.nvidia is False and gpu is not None:
        return "it is for machines without a usable NVIDIA GPU"
    if m.nvidia is True and gpu is None:
        return "it needs an NVIDIA GPU"
    needs_gpu = bool(m.gpu or m.vram_mb or m.compute_capability)
    if needs_gpu and gpu is None:
        return "it needs an NVIDIA GPU"
    if gpu is not None:
        name = (gpu.name or "").lower()
        if m.gpu and not any(g.lower() in name for g in m.gpu):
            return f"the GPU is not a {' / '.join(m.gpu)}"
        if m.vram_mb is not None:
            if gpu.vram_total_mb is None:
                return "the GPU's VRAM size is unknown"
            lo, hi = m.vram_mb
            if not lo <= gpu.vram_total_mb <= hi:
                return f"{gpu.vram_total_mb} MiB is outside {lo}–{hi} MiB"
        if m.compute_capability is not None:
            cc = gpu.cc_tuple
            if cc is None:
                return "the GPU's compute capability is unknown"
            lo_cc, hi_cc = (_cc_key(c) for c in m.compute_capability)
            if not lo_cc <= cc <= hi_cc:
                return f"compute capability {gpu.compute_capability} is outside {'–'.join(m.compute_capability)}"
    return None


def _specificity(profile: Profile) -> tuple[int, int, int, int, int, int]:
    """GPU name > compute capability > VRAM range > fallback; then more constraints, a narrower range."""
    m = profile.match
    width = (m.vram_mb[1] - m.vram_mb[0]) if m.vram_mb else 1 << 30
    return (bool(m.gpu), m.compute_capability is not None, m.vram_mb is not None,
            m.hardware_constraints, bool(m.model), -width)


def _matched_on(profile: Profile) -> str:
    m = profile.match
    if m.gpu:
        return "GPU name " + " / ".join(repr(g) for g in m.gpu)
    if m.compute_capability:
        return f"compute capability {'–'.join(m.compute_capability)}"
    if m.vram_mb:
        return f"VRAM {m.vram_mb[0]}–{m.vram_mb[1]} MiB"
    if m.nvidia is False:
        return "no usable NVIDIA GPU"
    return "fallback"


def select_profile(facts: Facts, family: str | None, candidates: Sequence[ResolvedProfile],
                   *, gpu: GpuFacts | None = None, use_largest_gpu: bool = True) -> Selection:
    """The most specific of `candidates` whose `match` fits the machine and family, and why."""
    if gpu is None and use_largest_gpu:
        gpus = list(facts.usable_gpus)
        gpu = max(gpus, key=lambda g: (g.vram_total_mb or 0), default=None)
    fitting = [c for c in candidates if match_failure(c.profile, facts, family, gpu) is None]
    if not fitting:
        what = f"{gpu.name} ({gpu.vram_total_mb} MiB)" if gpu else "this machine"
        raise ProfileError(f"no profile matches {what} with model {family or 'unknown'}",
                           "pick one with --profile NAME (see `lowvram profiles list`)")
    fitting.sort(key=lambda c: (_specificity(c.profile), c.name), reverse=True)
    best = fitting[0]
    gpu_text = f"{gpu.name} ({gpu.vram_total_mb} MiB, sm {gpu.compute_capability})" if gpu else "no NVIDIA GPU"
    reason = f"most specific match for {gpu_text}, model {family or 'unknown'}: {_matched_on(best.profile)}"
    others = tuple(c.name for c in fitting[1:])
    if others:
        reason += f"; also matched: {', '.join(others)}"
    return Selection(best.name, reason, others)
