"""Loopback only: tune's UI is never reachable from another machine (docs/architecture.md#tune).

The UI listens on loopback only: `--server-name 127.0.0.1` ends the COMMANDLINE_ARGS tune's block
sets (later flags win in A1111's argparse, and a server name beats `--listen`), `--ngrok` is
refused, and once the UI answers, what it really listens on is checked (Linux: /proc/net/tcp*).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shlex
import socket
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from lowvram.world.tune.results import LOOPBACK, LOOPBACK_NAMES, Reporter, TuneError, TuneEvent

if TYPE_CHECKING:
    from lowvram.core.facts import Facts
    from lowvram.core.plan import Plan


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    """Nothing listens on `port` (SO_REUSEADDR as the UI's server sets it: TIME_WAIT is no obstacle)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if os.name != "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _block_port(plan: Plan, facts: Facts) -> int | None:
    """The `--port` COMMANDLINE_ARGS will carry (the user's literal flags kept by the block, and the
    plan's). A1111 appends COMMANDLINE_ARGS after its command line, so that value beats tune's."""
    from lowvram.world.detect.webui import flag_value

    if plan.merge == "assign":
        args = tuple(plan.user_args_kept) + tuple(plan.args)
    else:
        user = facts.webui.user_args if facts.webui is not None else None
        args = tuple(user or ()) + tuple(plan.args)
    value = flag_value(args, "--port")
    try:
        port = int(value) if value is not None else None
    except ValueError:
        return None
    return port if port is not None and 0 < port < 65536 else None


def loopback_plan(plan: Plan) -> Plan:
    """The plan as tune writes it into the block while it measures.

    Its flags end with `--server-name 127.0.0.1`: A1111 1.8 reads COMMANDLINE_ARGS after its own
    command line, argparse keeps a flag's last value, and a server name beats `--listen`, so no
    user flag above the block widens it (without a server name A1111's API-only start binds
    0.0.0.0 and [::]). No extensions are fetched: tune measures, the UI's tabs are not needed.
    """
    return replace(plan, args=(*plan.args, "--server-name", LOOPBACK), extensions=())


def user_flags(facts: Facts) -> tuple[tuple[str, ...], bool]:
    """(the user's COMMANDLINE_ARGS as the UI will see them, whether they could all be read).

    Where webui-user assigns none, the value in lowvram's own environment passes through to it.
    """
    webui = facts.webui
    args = webui.user_args if webui is not None else None
    literal = webui.user_args_literal if webui is not None else True
    if args is None:
        try:
            args = tuple(shlex.split(os.environ.get("COMMANDLINE_ARGS", "")))
        except ValueError:
            args, literal = (), False
    return tuple(args), literal


def exposing_flags(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(refused, overridden): flags that would open A1111 1.8's API-only UI beyond loopback.

    `--ngrok TOKEN` opens a tunnel to the UI's port at start-up even with --nowebui (modules/ui.py
    connects on import, and the API imports it) and no later flag turns it off: refused.
    `--listen` and `--server-name HOST` pick the address the API binds, which tune's final
    `--server-name 127.0.0.1` overrides; `--share` reaches only Gradio's launch, which --nowebui
    never calls.
    """
    refused: list[str] = []
    overridden: list[str] = []
    items = list(args)
    for i, arg in enumerate(items):
        name, eq, inline = arg.partition("=")
        value = inline if eq else (items[i + 1] if i + 1 < len(items) else "")
        if name == "--ngrok":
            refused.append("--ngrok")
        elif name in ("--listen", "--share") and not eq:
            overridden.append(name)
        elif name == "--server-name" and value not in LOOPBACK_NAMES:
            overridden.append(f"--server-name {value}".strip())
    return refused, overridden


def check_user_flags(facts: Facts, report: Reporter) -> None:
    """Refuse what tune cannot keep on loopback; say what it overrides (before anything changes)."""
    args, literal = user_flags(facts)
    refused, overridden = exposing_flags(args)
    if refused:
        raise TuneError("your COMMANDLINE_ARGS has --ngrok: A1111 opens an ngrok tunnel to its port even when "
                        "only its API runs, which would put tune's UI on the internet",
                        "take --ngrok out of webui-user's COMMANDLINE_ARGS (or your environment's) while tuning")
    if overridden:
        report(TuneEvent("note", f"your COMMANDLINE_ARGS has {', '.join(overridden)}: tune's UI still listens on "
                                 f"{LOOPBACK} only (--server-name {LOOPBACK} comes last; --share does nothing "
                                 "without the web UI); your webui-user file is left as it is"))
    if not literal:
        report(TuneEvent("note", "your COMMANDLINE_ARGS is not literal, so tune cannot read it: tune's UI gets "
                                 f"--server-name {LOOPBACK} last, and what it listens on is checked once it answers"))


def listen_addresses(port: int, net: Path = Path("/proc/net")) -> list[str] | None:
    """The addresses something listens on at TCP `port` (Linux's /proc/net/tcp and tcp6), or
    None where that cannot be read (another OS)."""
    found: list[str] = []
    readable = False
    for name in ("tcp", "tcp6"):
        try:
            lines = (net / name).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != "0A":  # 0A: LISTEN
                continue
            address, _, hex_port = fields[1].rpartition(":")
            with contextlib.suppress(ValueError):
                if int(hex_port, 16) == port:
                    found.append(_proc_net_address(address))
    return found if readable else None


def _proc_net_address(text: str) -> str:
    """/proc/net/tcp* prints an address as 32-bit words in the host's byte order."""
    raw = bytes.fromhex(text)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw))


def beyond_loopback(addresses: Sequence[str]) -> list[str]:
    out = []
    for text in addresses:
        address = ipaddress.ip_address(text)
        mapped = getattr(address, "ipv4_mapped", None)
        if not (address.is_loopback or (mapped is not None and mapped.is_loopback)):
            out.append(text)
    return out


def check_listening(port: int) -> None:
    """After the UI answered: it must listen on loopback only (a flag tune could not see, e.g. a
    user line after the block, must not expose it)."""
    addresses = listen_addresses(port)
    wide = beyond_loopback(addresses or [])
    if wide:
        shown = ", ".join(f"[{a}]" if ":" in a else a for a in wide)
        raise TuneError(f"the UI listened on {shown} port {port}, beyond loopback: tune stopped it",
                        "something in COMMANDLINE_ARGS after lowvram's block (a --server-name?) widens it; take it "
                        "out while tuning")
