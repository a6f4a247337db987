"""`lowvram profiles list|show`: the bundled and user profiles, and one merged with its origins."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from lowvram.cli.options import JsonOpt

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
    from lowvram.world.profile_files import list_profiles

    infos = list_profiles()
    if json_out:
        render.emit_json({"schema": 1, "profiles": [i.to_dict() for i in infos]})
        return
    rows = [(i.name, i.source, i.extends or "", _short(i.description)) for i in infos]
    print(render.table(("name", "source", "extends", "description"), rows))
    print(render.style(f"\nuser profiles: {paths.user_profiles_dir()}", "dim"))


def _short(text: str, width: int = 90) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(data, dict) and data:
        out: list[tuple[str, Any]] = []
        for key, value in data.items():
            out += _flatten(value, f"{prefix}.{key}" if prefix else key)
        return out
    return [(prefix, data)]


@profiles_app.command("show")
def show_command(name: Annotated[str, typer.Argument(help="Profile name (see `lowvram profiles list`).")],
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
    print(render.style(f"{resolved.name}", "bold") + f"  ({resolved.source}: {resolved.path})")
    if len(resolved.chain) > 1:
        print("extends: " + " → ".join(resolved.chain[1:]))
    print(resolved.profile.description)
    print()
    order = ("name", "description", "extends")
    rows = []
    for key, value in _flatten({k: v for k, v in data.items() if k not in order}):
        shown = ", ".join(str(v) for v in value) if isinstance(value, list) else ("{}" if value == {} else value)
        origin = resolved.origins.get(key, "default")
        rows.append((key, shown, origin if origin == resolved.name else f"{origin} (inherited)"
                     if origin != "default" else "default"))
    print(render.table(("key", "value", "from"), rows))
