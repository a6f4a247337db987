"""`lowvram profiles list|show`: the bundled and user profiles, and one merged with its origins."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from lowvram.cli.options import JsonOpt, complete_profile_name

profiles_app = typer.Typer(name="profiles", help="List profiles, or show one merged with where each value came from.",
                           no_args_is_help=True, rich_markup_mode=None)


@profiles_app.command("list")
def list_command(json_out: JsonOpt = False) -> None:
    """Bundled and user profiles (a user profile overrides a bundled one of the same name).

    \b
    Examples:
      lowvram profiles list
      lowvram profiles list --json
    """
    from lowvram.cli import render
    from lowvram.world import paths
    from lowvram.world.profile_files import list_checked

    infos, problems = list_checked()
    if json_out:
        render.emit_json({"schema": 1, "profiles": [i.to_dict() for i in infos], "warnings": problems})
        return
    for problem in problems:
        render.warn(problem)
    rows = [(i.name, i.source, i.extends or "", _first_sentence(i.description)) for i in infos]
    print(render.table(("name", "source", "extends", "description"), rows, no_wrap=(0, 1, 2)))
    print(render.style(f"\nuser profiles: {paths.user_profiles_dir()}", "dim"))


def _first_sentence(text: str) -> str:
    """A description's first sentence, whole (`profiles show` prints all of it); the table wraps it."""
    import re

    found = re.match(r"(.+?\.)(\s|$)", text.strip(), re.DOTALL)
    return " ".join((found.group(1) if found else text).split())


def yaml_value(value: Any) -> str:
    """A value as it is written in a profile's YAML (`true`, `null`, `[a, b]`, `{}`), not Python's repr."""
    import yaml

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    text = yaml.safe_dump(plain(value), default_flow_style=True, allow_unicode=True, width=1 << 20).strip()
    return text.removesuffix("...").rstrip()


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(data, dict) and data:
        out: list[tuple[str, Any]] = []
        for key, value in data.items():
            out += _flatten(value, f"{prefix}.{key}" if prefix else key)
        return out
    return [(prefix, data)]


class _PlainUsage(TyperCommand):
    """Usage `profiles show [OPTIONS] NAME`: typer writes a required argument as `{NAME}`, which reads as a
    placeholder nobody filled in."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]


@profiles_app.command("show", cls=_PlainUsage)
def show_command(name: Annotated[str, typer.Argument(metavar="NAME", autocompletion=complete_profile_name,
                                                    help="Profile name (see `lowvram profiles list`).")],
                 json_out: JsonOpt = False) -> None:
    """One profile with its `extends` chain merged in, and the profile each value came from.

    \b
    Examples:
      lowvram profiles show gtx1070-sdxl
      lowvram profiles show 8gb-sdxl --json
    """
    from lowvram.cli import render
    from lowvram.world.profile_files import load_profile

    resolved = load_profile(name)
    data = dict(resolved.data)
    if json_out:
        render.emit_json({
            "schema": 1,
            "name": resolved.name,
            "source": resolved.source,
            "path": str(resolved.path) if resolved.path else None,
            "extends": resolved.profile.extends,
            "chain": list(resolved.chain),
            "profile": data,
            "origins": dict(sorted(resolved.origins.items())),
        })
        return
    print(render.lead(resolved.name, f"({resolved.source}: {resolved.path})", "bold", sep="  "))
    if len(resolved.chain) > 1:
        print(render.wrap("extends: " + " → ".join(resolved.chain[1:])))
    print(render.wrap(" ".join(resolved.profile.description.split()), hang=0))
    print()
    order = ("name", "description", "extends")
    rows = []
    for key, value in _flatten({k: v for k, v in data.items() if k not in order}):
        shown = yaml_value(value)
        origin = resolved.origins.get(key, "default")
        rows.append((key, shown, origin if origin == resolved.name else f"{origin} (inherited)"
                     if origin != "default" else "default"))
    print(render.table(("key", "value", "from"), rows))
