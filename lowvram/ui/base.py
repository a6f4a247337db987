"""What every UI adapter shares: flag lists as data, argument parsing, validation, contradictions.

A wrong flag costs an A1111 user minutes (it exits 2 only after installing packages), so every
flag lowvram writes is checked against the target UI's real flag list, kept as data in
`ui/flags/*.txt` (see the header of each file for its source and format).
"""

from __future__ import annotations

import abc
import difflib
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from lowvram.core.errors import FlagError
from lowvram.core.facts import UiFlagsFacts

FLAGS_DIR = Path(__file__).resolve().parent / "flags"

KINDS = ("flag", "value", "values", "optvalue", "optvalues")
# PyTorch's index of CPU-only wheels (no CUDA libraries: ~0.2 GB instead of ~2.3 GB).
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"

# Semantic values the adapters understand.
OFFLOAD_RUNGS = ("none", "medvram-sdxl", "medvram", "lowvram", "novram", "cpu")
ATTENTIONS = ("auto", "xformers", "sdp", "sdp-no-mem", "sub-quad", "split", "none")
PRECISIONS = ("half", "full", "upcast")


@dataclass(frozen=True)
class FlagSpec:
    name: str
    kind: str = "flag"
    choices: tuple[str, ...] = ()

    @property
    def takes_value(self) -> bool:
        return self.kind != "flag"


@dataclass(frozen=True)
class FlagSet:
    """One UI version's flags: name → spec, and its argparse mutually exclusive groups."""

    label: str
    flags: Mapping[str, FlagSpec]
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return name in self.flags

    def closest(self, name: str) -> str | None:
        found = difflib.get_close_matches(name, list(self.flags), n=1, cutoff=0.6)
        return found[0] if found else None

    def intersect(self, other: FlagSet, label: str) -> FlagSet:
        """Flags both versions accept (choices narrowed to the common ones)."""
        flags: dict[str, FlagSpec] = {}
        for name, spec in self.flags.items():
            theirs = other.flags.get(name)
            if theirs is None:
                continue
            choices = tuple(c for c in spec.choices if c in theirs.choices) if spec.choices else theirs.choices
            flags[name] = FlagSpec(name, spec.kind, choices)
        groups = {k: v for k, v in self.groups.items() if other.groups.get(k) == v}
        return FlagSet(label, flags, groups)


@functools.cache
def load_flagset(filename: str, label: str) -> FlagSet:
    """Read a flag list from ui/flags/ (format in each file's header)."""
    path = FLAGS_DIR / filename
    flags: dict[str, FlagSpec] = {}
    groups: dict[str, tuple[str, ...]] = {}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("group "):
            head, _, members = line[len("group "):].partition(":")
            names = tuple(members.split())
            if not names or not head.strip():
                raise ValueError(f"{path}:{lineno}: malformed group line")
            groups[head.strip()] = names
            for name in names:
                flags.setdefault(name, FlagSpec(name))
            continue
        parts = line.split()
        name = parts[0]
        kind = "flag"
        choices: tuple[str, ...] = ()
        if len(parts) > 1:
            kind, _, choice_text = parts[1].partition(":")
            choices = tuple(c for c in choice_text.split(",") if c)
        if kind not in KINDS or not name.startswith("-"):
            raise ValueError(f"{path}:{lineno}: cannot read {line!r}")
        flags[name] = FlagSpec(name, kind, choices)
    return FlagSet(label, flags, groups)


def installed_flagset(installed: UiFlagsFacts, label: str, shipped: FlagSet) -> FlagSet:
    """The flags the installed UI's own parser defines (world/detect/ui_flags.py read them); each
    exclusive group is named after the shipped list's group it shares flags with."""
    flags = {name: FlagSpec(name, kind if kind in KINDS else "value", choices) for name, kind, choices in installed.flags}
    groups: dict[str, tuple[str, ...]] = {}
    for i, members in enumerate(installed.groups, 1):
        named = [g for g, theirs in shipped.groups.items() if set(theirs) & set(members) and g not in groups]
        groups[named[0] if named else f"group-{i}"] = members
    return FlagSet(label, flags, groups)


@dataclass(frozen=True)
class ParsedFlag:
    """One option in an argument list: its name, its value (None for on/off) and its tokens."""

    name: str
    value: str | None
    tokens: tuple[str, ...]
    known: bool = True


def parse_args(args: Sequence[str], flagset: FlagSet, *, strict: bool = True, ui_title: str = "") -> list[ParsedFlag]:
    """Split `args` into options the way argparse would (for the flags this UI has).

    strict: an unknown option or a stray value is a FlagError naming the flag, the UI and the
    closest real flag. Lenient (the user's own flags): unknown options are kept as on/off flags.
    """
    out: list[ParsedFlag] = []
    i = 0
    title = ui_title or flagset.label
    while i < len(args):
        token = args[i]
        if not token.startswith("-") or token in {"-", "--"}:
            if strict:
                raise FlagError(
                    f"{title} would not accept {token!r}: it is not a flag and no flag before it takes a value",
                    "check the profile's `args`: every item must be a flag like --xformers or its value",
                )
            out.append(ParsedFlag(token, None, (token,), known=False))
            i += 1
            continue
        name, eq, inline = token.partition("=")
        spec = flagset.flags.get(name)
        if spec is None:
            if strict:
                raise unknown_flag(name, flagset, title)
            out.append(ParsedFlag(name, inline if eq else None, (token,), known=False))
            i += 1
            continue
        if eq:
            if not spec.takes_value and strict:
                raise FlagError(f"{title} flag {name} takes no value (got {token!r})", f"write {name} alone")
            _check_choice(spec, inline, title, strict)
            out.append(ParsedFlag(name, inline, (token,)))
            i += 1
            continue
        if spec.kind == "flag":
            out.append(ParsedFlag(name, None, (token,)))
            i += 1
            continue
        values: list[str] = []
        j = i + 1
        while j < len(args) and not (args[j].startswith("-") and len(args[j]) > 1 and not _is_number(args[j])):
            values.append(args[j])
            j += 1
            if spec.kind in ("value", "optvalue"):
                break
        if not values and spec.kind in ("value", "values") and strict:
            raise FlagError(f"{title} flag {name} needs a value", f"write {name} VALUE")
        for v in values:
            _check_choice(spec, v, title, strict)
        out.append(ParsedFlag(name, " ".join(values) if values else None, tuple(args[i:j])))
        i = j
    return out


def _is_number(token: str) -> bool:
    try:
        return math.isfinite(float(token))
    except ValueError:
        return False


def _check_choice(spec: FlagSpec, value: str, title: str, strict: bool) -> None:
    if strict and spec.choices and value not in spec.choices:
        raise FlagError(
            f"{title} flag {spec.name} does not take {value!r}",
            f"use one of: {', '.join(spec.choices)}",
        )


def unknown_flag(name: str, flagset: FlagSet, title: str) -> FlagError:
    close = flagset.closest(name)
    hint = f"did you mean {close}?" if close else f"see `{title}`'s own --help for its flags"
    return FlagError(f"{title} has no flag {name}", hint)


@dataclass(frozen=True)
class Contradiction:
    """Two flags that cannot both hold: same category, different values (or one exclusive group)."""

    category: str
    first: tuple[str, ...]  # tokens on one side (the user's, or the earlier flag)
    second: tuple[str, ...]  # tokens on the other side (the plan's, or the later flag)

    def describe(self) -> str:
        return f"{' '.join(self.first)} vs {' '.join(self.second)} ({self.category})"


@dataclass(frozen=True)
class UiSettings:
    """The plan's semantic settings, before any UI spells them."""

    offload: str = "none"  # one of OFFLOAD_RUNGS
    attention: str = "auto"  # one of ATTENTIONS
    unet_precision: str = "half"  # half | full | upcast
    vae_precision: str = "half"  # half | full
    device_index: int | None = None  # the UI's device flag; None = leave it out
    headroom_mb: int | None = None  # what other programs hold (ComfyUI --reserve-vram)
    family: str | None = None
    fast_fp8: bool = False  # fp8 matmul on fp8 weights (Forge Neo --fast-fp8; policy/dit.py decide_fast_fp8)


@dataclass(frozen=True)
class Rendered:
    args: tuple[str, ...]
    notes: tuple[str, ...] = ()


class UiAdapter(abc.ABC):
    """One UI: its flag lists, how it spells the semantic settings, what contradicts what."""

    key = ""
    title = ""
    # The UI whose code this one forks, for behaviour they share ("forge": Forge, Forge Neo, reForge); "" = none.
    lineage = ""
    device_flag: str | None = None
    # The device flag replaces CUDA_VISIBLE_DEVICES at start-up (Forge, ComfyUI) rather than indexing
    # the visible list (A1111 `cuda:<id>`): it overrides lowvram's UUID pin, so it is never rewritten.
    device_flag_sets_visible = False
    has_webui_user = True
    supports_tcmalloc = False  # webui.sh honours LD_PRELOAD / NO_TCMALLOC
    supports_hook = False  # the layout hook (A1111 extensions + script callbacks)
    # xformers build the UI's installer pins, and the torch it was built for (docs/architecture.md#the-policy, "Attention").
    pinned_xformers: tuple[str, str] | None = None
    torch_command_env: str | None = None  # what the first start's torch install reads; None: no installer
    # category → {flag: semantic value}; two flags of one category with different values contradict.
    categories: ClassVar[Mapping[str, Mapping[str, str]]] = {}

    @abc.abstractmethod
    def flagset(self, version: str | None) -> FlagSet:
        """The UI's real flags for this version (data in ui/flags/*.txt)."""

    @abc.abstractmethod
    def render(self, settings: UiSettings, version: str | None) -> Rendered:
        """The plan's semantic settings as this UI's flags."""

    def rungs(self, family: str | None, version: str | None) -> tuple[str, ...]:
        """The offload ladder on this UI for this family, fastest first (docs/architecture.md#the-policy)."""
        return ("none", "medvram", "lowvram")

    def cpu_torch_command(self, version: str | None) -> str:
        """The CPU build of the torch this UI installs: `torch_command_env`'s value, or the user's pip command."""
        return f"pip install torch torchvision --index-url {CPU_TORCH_INDEX}"

    # ---- validation and contradictions ------------------------------------------------------

    def validate(self, args: Sequence[str], version: str | None, flagset: FlagSet | None = None) -> list[ParsedFlag]:
        """`args` against `flagset` (default: the shipped list for `version`); FlagError on the first problem."""
        title = flagset.label if flagset is not None else self.describe(version)  # the installed version's words
        flagset = flagset or self.flagset(version)
        parsed = parse_args(args, flagset, strict=True, ui_title=title)
        problems = self.contradictions(parsed, flagset)
        if problems:
            raise FlagError(f"{title} flags contradict each other: {problems[0].describe()}", "keep one of them")
        return parsed

    def describe(self, version: str | None) -> str:
        return self.flagset(version).label

    def _category_map(self, flagset: FlagSet) -> dict[str, dict[str, str]]:
        cats: dict[str, dict[str, str]] = {k: dict(v) for k, v in self.categories.items()}
        for group, members in flagset.groups.items():
            cats.setdefault(f"group {group}", {}).update({m: m for m in members})
        return cats

    def contradictions(self, parsed: Iterable[ParsedFlag], flagset: FlagSet) -> list[Contradiction]:
        """Contradictions inside one argument list (two backends, two rungs, one exclusive group)."""
        items = list(parsed)
        found: list[Contradiction] = []
        cats = self._category_map(flagset)
        for category, members in cats.items():
            seen: list[ParsedFlag] = [p for p in items if p.name in members]
            for a_index, a in enumerate(seen):
                for b in seen[a_index + 1:]:
                    if members[a.name] != members[b.name]:
                        found.append(Contradiction(category, a.tokens, b.tokens))
        valued: dict[str, ParsedFlag] = {}
        for p in items:
            spec = flagset.flags.get(p.name)
            if spec is None or not spec.takes_value or spec.kind == "values":
                continue
            earlier = valued.get(p.name)
            if earlier is not None and earlier.value != p.value:
                found.append(Contradiction(f"{p.name} value", earlier.tokens, p.tokens))
            valued[p.name] = p
        return found

    def cross_contradictions(
        self, user: Sequence[ParsedFlag], plan: Sequence[ParsedFlag], flagset: FlagSet
    ) -> list[Contradiction]:
        """Where the user's flags and the plan's disagree (first = user's, second = plan's)."""
        found: list[Contradiction] = []
        cats = self._category_map(flagset)
        for category, members in cats.items():
            mine = [p for p in user if p.name in members]
            theirs = [p for p in plan if p.name in members]
            for u in mine:
                for q in theirs:
                    if members[u.name] != members[q.name]:
                        found.append(Contradiction(category, u.tokens, q.tokens))
        for u in user:
            spec = flagset.flags.get(u.name)
            if spec is None or not spec.takes_value or spec.kind == "values":
                continue
            for q in plan:
                if q.name == u.name and q.value != u.value:
                    found.append(Contradiction(f"{u.name} value", u.tokens, q.tokens))
        return found


def flags_for(ui: UiAdapter, version: str | None, installed: UiFlagsFacts | None) -> tuple[FlagSet, str | None]:
    """The flags to check against: the installed version's own (read from its parser's source) where
    lowvram could read them, else the shipped list; and a note when the read failed."""
    if installed is None:
        return ui.flagset(version), None
    if installed.error or not installed.flags:
        shipped = ui.flagset(version)
        return shipped, (f"the installed {ui.title}'s flags could not be read ({installed.error or 'none found'}): "
                         f"flags are checked against lowvram's list for {shipped.label}")
    label = f"{ui.title} {version}" if version else f"the installed {ui.title}"
    return installed_flagset(installed, label, ui.flagset(version)), None


def reserve_gb(headroom_mb: int) -> str:
    """ComfyUI's --reserve-vram takes GiB as a float: round up to 0.1 so nothing is under-reserved."""
    tenths = math.ceil(max(0, headroom_mb) / 1024 * 10)
    return f"{tenths / 10:.1f}"
