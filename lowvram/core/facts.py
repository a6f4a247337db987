"""Facts about one machine and its WebUI: frozen data, built by detect/ or read from a facts file.

The JSON form is the `doctor --json` contract (docs/architecture.md#the-cli-contract). Reading it back is lenient on
purpose: a missing key reads as null, an unknown key is ignored (facts from a newer lowvram), and
`sysmem_fallback` missing is derived from OS and driver. A value of the wrong type is an error that
names the key.

A facts file is something the user hands lowvram to act on, so damage stops the command before
anything is written: one FactsError line naming the file with a hint. Damage covers what the
JSON parser refuses (truncation, trailing garbage, nesting too deep, a number over Python's
4300-digit limit), a key given twice, a value of the wrong type, a number that is not finite, below
0 or over 2^40, a string over 4096 characters or holding a lone surrogate ("\\ud800": it cannot be
printed or written). A UTF-8 or UTF-16 byte-order mark is read (Windows PowerShell's `>` writes
UTF-16): the JSON is lowvram's own either way.

This module only parses (`facts_from_json`, `facts_from_dict`); the file itself is read by the
edge `detect/facts_file.py`.
"""

from __future__ import annotations

import codecs
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from packaging.version import InvalidVersion, Version

from lowvram.core.errors import FactsError

OS_NAMES = ("linux", "windows", "darwin")
SYSMEM_FALLBACK_VALUES = ("on", "off", "unknown", "unsupported")
FLAVORS = ("a1111", "forge", "sdnext", "comfyui", "forge-neo", "reforge")
UI_FLAG_KINDS = ("flag", "value", "values", "optvalue", "optvalues")  # ui/base.py KINDS
FAMILIES = ("sd15", "sd2", "sdxl", "sdxl-refiner", "flux1-dev", "flux1-schnell", "sd3-medium", "sd3.5-medium",
            "sd3.5-large", "unknown")

# NVIDIA KB 5490: 536.40 added the fallback to shared memory, 546.01 made it a per-program choice.
FALLBACK_FIRST_DRIVER = Version("536.40")
FALLBACK_CHOOSABLE_DRIVER = Version("546.01")


def parse_driver(driver: str | None) -> Version | None:
    if not driver:
        return None
    try:
        return Version(driver.strip())
    except (InvalidVersion, ValueError):  # ValueError: a part over Python's 4300-digit limit
        return None


def derive_sysmem_fallback(os_name: str | None, driver: str | None, wsl: bool) -> str:
    """What the driver does when VRAM runs out: spill into shared memory (on) or OOM.

    Native Linux and macOS never spill. WSL2 spills and ignores the Control Panel policy
    (microsoft/WSL #11050). On Windows 536.40–546.00 always spill; from 546.01 the user can choose
    per program and the choice cannot be read reliably, so it is `unknown` (treated as on).
    """
    if wsl:
        return "on"
    if os_name != "windows":
        return "unsupported"
    version = parse_driver(driver)
    if version is None:
        return "unknown"
    if version < FALLBACK_FIRST_DRIVER:
        return "unsupported"
    if version < FALLBACK_CHOOSABLE_DRIVER:
        return "on"
    return "unknown"


@dataclass(frozen=True)
class SystemFacts:
    os: str
    os_version: str | None = None
    arch: str | None = None
    ram_mb: int | None = None
    swap_mb: int | None = None
    glibc: str | None = None
    wsl: bool = False
    sysmem_fallback: str = "unsupported"
    cpu_count: int | None = None


@dataclass(frozen=True)
class GpuFacts:
    index: int
    uuid: str | None = None
    name: str | None = None
    vram_total_mb: int | None = None
    vram_free_mb: int | None = None
    vram_used_mb: int | None = None
    driver: str | None = None
    cuda_driver: str | None = None
    compute_capability: str | None = None
    pcie_gen: int | None = None  # the link now: an idle card drops to Gen 1
    pcie_width: int | None = None
    # The speed facts (issue 18's partial-offload cost): CUDA cores, the SM clock's maximum, and the
    # link's maximum generation and width (the host<->device bandwidth a streaming model gets).
    cuda_cores: int | None = None
    sm_clock_max_mhz: int | None = None
    pcie_gen_max: int | None = None
    pcie_width_max: int | None = None
    lost: bool = False
    # NVML fields that could not be read, e.g. ("memory: NotSupported",); shown with --debug.
    errors: tuple[str, ...] = ()

    @property
    def cc_tuple(self) -> tuple[int, int] | None:
        if not self.compute_capability:
            return None
        try:
            major, minor = self.compute_capability.split(".", 1)
            return int(major), int(minor)
        except ValueError:
            return None


@dataclass(frozen=True)
class OtherGpu:
    vendor: str  # amd | intel | apple
    name: str | None = None


@dataclass(frozen=True)
class TcmallocFacts:
    library: str | None = None
    usable: bool = False
    reason: str = ""
    package: str | None = None  # what to install when it is missing


@dataclass(frozen=True)
class CudaEnv:
    """The CUDA environment variables that decide which GPU a UI would use (docs/architecture.md#detection)."""

    visible_devices: str | None = None
    device_order: str | None = None


@dataclass(frozen=True)
class UiFlagsFacts:
    """The flags the installed UI's own argument parser defines, read from its source as data
    (world/detect/ui_flags.py): (option, kind, choices) with the kinds of ui/flags/*.txt, and the
    mutually exclusive groups. `error` says why the source could not be read (then `flags` is empty
    and the shipped list is used)."""

    source: str
    flags: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    groups: tuple[tuple[str, ...], ...] = ()
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "error": self.error,
            "flags": {name: kind + (":" + ",".join(choices) if choices else "") for name, kind, choices in self.flags},
            "groups": [list(g) for g in self.groups],
        }


@dataclass(frozen=True)
class WebuiFacts:
    path: str
    flavor: str
    version: str | None = None
    python: str | None = None
    torch: str | None = None
    torch_cuda: str | None = None
    xformers: str | None = None
    checkpoint: str | None = None
    checkpoint_path: str | None = None
    checkpoint_key: str | None = None  # markers.checkpoint_key(): name|size|mtime
    model_family: str | None = None
    model_variant: str | None = None  # "v-prediction" where the checkpoint says so (core/model_files.py)
    model_format: str | None = None  # fp16, bf16, fp8_e4m3, nf4, q4_k_s, ... (core/model_files.py)
    batch_cond_uncond: bool | None = None
    # The user's literal COMMANDLINE_ARGS from webui-user (outside lowvram's block); None when absent
    # or not literal ($VAR, $(...)), see `user_args_literal`.
    user_args: tuple[str, ...] | None = None
    user_args_literal: bool = True
    extensions: tuple[str, ...] = ()
    disabled_extensions: tuple[str, ...] = ()
    # Damaged optional inputs read past (one line each, naming the file; docs/architecture.md#damaged-and-hostile-inputs): the selected
    # checkpoint's safetensors header (its family is then "unknown") and the UI's config.json (the
    # UI's defaults are then planned for, as the UI itself resets a settings file it cannot read).
    checkpoint_error: str | None = None
    config_error: str | None = None
    # ComfyUI picks a model per workflow: every model file found in its model folders (names relative
    # to their folder, newest first); `checkpoint` is then the newest of them (detect/webui.py).
    model_files: tuple[str, ...] = ()
    # The installed UI's own flags (ComfyUI's comfy/cli_args.py, Forge's args.py); None: not read.
    ui_flags: UiFlagsFacts | None = None


@dataclass(frozen=True)
class Facts:
    system: SystemFacts
    gpus: tuple[GpuFacts, ...] = ()
    other_gpus: tuple[OtherGpu, ...] = ()
    tcmalloc: TcmallocFacts = field(default_factory=TcmallocFacts)
    webui: WebuiFacts | None = None
    cuda: CudaEnv = field(default_factory=CudaEnv)
    nvml_error: str | None = None  # why NVML gave no GPUs (no driver, ...), or None

    @property
    def usable_gpus(self) -> tuple[GpuFacts, ...]:
        return tuple(g for g in self.gpus if not g.lost)

    def with_webui(self, webui: WebuiFacts | None) -> Facts:
        from dataclasses import replace

        return replace(self, webui=webui)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for gpu in data["gpus"]:
            gpu["errors"] = list(gpu["errors"])
        if data["webui"] is not None:
            for key in ("user_args", "extensions", "disabled_extensions", "model_files"):
                value = data["webui"][key]
                data["webui"][key] = list(value) if value is not None else None
            if self.webui is not None and self.webui.ui_flags is not None:  # add-only: absent when not read
                data["webui"]["ui_flags"] = self.webui.ui_flags.to_dict()
            else:
                data["webui"].pop("ui_flags", None)
        return data


# ---------------------------------------------------------------------------------------------
# Reading facts back (lenient, but a wrong type is a clear error naming the key)


MAX_FACT_NUMBER = 1 << 40  # MiB, counts, indices: anything larger is not a machine's fact
MAX_FACT_STRING = 4096  # names, versions, paths (PATH_MAX)


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, expected: str, value: Any) -> FactsError:
        try:
            shown = json.dumps(value)
        except (ValueError, RecursionError):
            shown = type(value).__name__
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return FactsError(
            f"{self.source}: `{key}` should be {expected}, not {shown}",
            "use the JSON that `lowvram doctor --json` printed, unchanged",
        )

    def obj(self, data: Any, key: str) -> dict[str, Any]:
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise self.fail(key, "an object", data)
        return data

    def text(self, value: str, key: str) -> str:
        if len(value) > MAX_FACT_STRING:
            raise self.fail(key, f"at most {MAX_FACT_STRING} characters", value)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise self.fail(key, "text (it holds a lone surrogate escape such as \\ud800)", value) from None
        return value

    def str_(self, d: dict[str, Any], key: str, path: str) -> str | None:
        value = d.get(key)
        if value is None:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (isinstance(value, int) and value.bit_length() > 64) or not math.isfinite(value):
                raise self.fail(f"{path}.{key}", "a string", value)
            return str(value)
        if not isinstance(value, str):
            raise self.fail(f"{path}.{key}", "a string", value)
        return self.text(value, f"{path}.{key}")

    def int_(self, d: dict[str, Any], key: str, path: str) -> int | None:
        value = d.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(f"{path}.{key}", "a number", value)
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(f"{path}.{key}", "a finite number", value)
        if value < 0:
            raise self.fail(f"{path}.{key}", "a number ≥ 0", value)
        if value > MAX_FACT_NUMBER:
            raise self.fail(f"{path}.{key}", f"a number up to 2^40 ({MAX_FACT_NUMBER})", value)
        return int(value)

    def bool_(self, d: dict[str, Any], key: str, path: str) -> bool | None:
        value = d.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self.fail(f"{path}.{key}", "true or false", value)
        return value

    def strs(self, d: dict[str, Any], key: str, path: str) -> tuple[str, ...] | None:
        value = d.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(f"{path}.{key}", "a list of strings", value)
        return tuple(self.text(v, f"{path}.{key}[{i}]") for i, v in enumerate(value))

    def choice(self, d: dict[str, Any], key: str, path: str, choices: tuple[str, ...]) -> str | None:
        value = self.str_(d, key, path)
        if value is not None and value not in choices:
            raise self.fail(f"{path}.{key}", "one of " + ", ".join(choices), value)
        return value


def _gpu_from_dict(r: _Reader, g_any: Any, i: int) -> GpuFacts:
    g = r.obj(g_any, f"gpus[{i}]")
    p = f"gpus[{i}]"
    return GpuFacts(
        index=r.int_(g, "index", p) if g.get("index") is not None else i,  # type: ignore[arg-type]
        uuid=r.str_(g, "uuid", p),
        name=r.str_(g, "name", p),
        vram_total_mb=r.int_(g, "vram_total_mb", p),
        vram_free_mb=r.int_(g, "vram_free_mb", p),
        vram_used_mb=r.int_(g, "vram_used_mb", p),
        driver=r.str_(g, "driver", p),
        cuda_driver=r.str_(g, "cuda_driver", p),
        compute_capability=r.str_(g, "compute_capability", p),
        pcie_gen=r.int_(g, "pcie_gen", p),
        pcie_width=r.int_(g, "pcie_width", p),
        cuda_cores=r.int_(g, "cuda_cores", p),
        sm_clock_max_mhz=r.int_(g, "sm_clock_max_mhz", p),
        pcie_gen_max=r.int_(g, "pcie_gen_max", p),
        pcie_width_max=r.int_(g, "pcie_width_max", p),
        lost=bool(r.bool_(g, "lost", p)),
        errors=r.strs(g, "errors", p) or (),
    )


def facts_from_dict(data: Any, source: str = "facts") -> Facts:
    r = _Reader(source)
    if not isinstance(data, dict):
        raise FactsError(f"{source}: not a facts object", "use the JSON that `lowvram doctor --json` printed")
    if "error" in data and "system" not in data:
        raise FactsError(f"{source}: holds an error report, not facts", "run `lowvram doctor --json` again")
    s = r.obj(data.get("system"), "system")
    os_name = r.choice(s, "os", "system", OS_NAMES) or "linux"
    wsl = bool(r.bool_(s, "wsl", "system"))
    gpus_raw = data.get("gpus") or []
    if not isinstance(gpus_raw, list):
        raise r.fail("gpus", "a list", gpus_raw)
    gpus = [_gpu_from_dict(r, g_any, i) for i, g_any in enumerate(gpus_raw)]
    driver = next((g.driver for g in gpus if g.driver), None)
    fallback = r.choice(s, "sysmem_fallback", "system", SYSMEM_FALLBACK_VALUES)
    system = SystemFacts(
        os=os_name,
        os_version=r.str_(s, "os_version", "system"),
        arch=r.str_(s, "arch", "system"),
        ram_mb=r.int_(s, "ram_mb", "system"),
        swap_mb=r.int_(s, "swap_mb", "system"),
        glibc=r.str_(s, "glibc", "system"),
        wsl=wsl,
        sysmem_fallback=fallback or derive_sysmem_fallback(os_name, driver, wsl),
        cpu_count=r.int_(s, "cpu_count", "system"),
    )
    others_raw = data.get("other_gpus") or []
    if not isinstance(others_raw, list):
        raise r.fail("other_gpus", "a list", others_raw)
    others = []
    for i, o_any in enumerate(others_raw):
        o = r.obj(o_any, f"other_gpus[{i}]")
        others.append(OtherGpu(vendor=r.str_(o, "vendor", f"other_gpus[{i}]") or "unknown",
                               name=r.str_(o, "name", f"other_gpus[{i}]")))
    t = r.obj(data.get("tcmalloc"), "tcmalloc")
    tcmalloc = TcmallocFacts(
        library=r.str_(t, "library", "tcmalloc"),
        usable=bool(r.bool_(t, "usable", "tcmalloc")),
        reason=r.str_(t, "reason", "tcmalloc") or "",
        package=r.str_(t, "package", "tcmalloc"),
    )
    c = r.obj(data.get("cuda"), "cuda")
    cuda = CudaEnv(visible_devices=r.str_(c, "visible_devices", "cuda"), device_order=r.str_(c, "device_order", "cuda"))
    webui = None
    if data.get("webui") is not None:
        w = r.obj(data["webui"], "webui")
        webui = WebuiFacts(
            path=r.str_(w, "path", "webui") or "",
            flavor=r.choice(w, "flavor", "webui", FLAVORS) or "a1111",
            version=r.str_(w, "version", "webui"),
            python=r.str_(w, "python", "webui"),
            torch=r.str_(w, "torch", "webui"),
            torch_cuda=r.str_(w, "torch_cuda", "webui"),
            xformers=r.str_(w, "xformers", "webui"),
            checkpoint=r.str_(w, "checkpoint", "webui"),
            checkpoint_path=r.str_(w, "checkpoint_path", "webui"),
            checkpoint_key=r.str_(w, "checkpoint_key", "webui"),
            model_family=r.choice(w, "model_family", "webui", FAMILIES),
            model_variant=r.str_(w, "model_variant", "webui"),
            model_format=r.str_(w, "model_format", "webui"),
            batch_cond_uncond=r.bool_(w, "batch_cond_uncond", "webui"),
            user_args=r.strs(w, "user_args", "webui"),
            user_args_literal=r.bool_(w, "user_args_literal", "webui") is not False,
            extensions=r.strs(w, "extensions", "webui") or (),
            disabled_extensions=r.strs(w, "disabled_extensions", "webui") or (),
            checkpoint_error=r.str_(w, "checkpoint_error", "webui"),
            config_error=r.str_(w, "config_error", "webui"),
            model_files=r.strs(w, "model_files", "webui") or (),
            ui_flags=_ui_flags_from_dict(r, w.get("ui_flags")),
        )
    return Facts(
        system=system,
        gpus=tuple(gpus),
        other_gpus=tuple(others),
        tcmalloc=tcmalloc,
        webui=webui,
        cuda=cuda,
        nvml_error=r.str_(data, "nvml_error", "facts") if "nvml_error" in data else None,
    )


def _ui_flags_from_dict(r: _Reader, raw: Any) -> UiFlagsFacts | None:
    if raw is None:
        return None
    p = "webui.ui_flags"
    d = r.obj(raw, p)
    flags_raw = r.obj(d.get("flags"), f"{p}.flags")
    flags: list[tuple[str, str, tuple[str, ...]]] = []
    for name, spec in flags_raw.items():
        kind, _, choices = spec.partition(":") if isinstance(spec, str) else ("", "", "")
        if not name.startswith("-") or kind not in UI_FLAG_KINDS:
            raise r.fail(f"{p}.flags.{name}", "a flag kind (" + ", ".join(UI_FLAG_KINDS) + ")", spec)
        flags.append((r.text(name, f"{p}.flags"), kind, tuple(c for c in choices.split(",") if c)))
    groups_raw = d.get("groups") or []
    if not isinstance(groups_raw, list):
        raise r.fail(f"{p}.groups", "a list of lists of flags", groups_raw)
    groups = tuple(r.strs({"g": g}, "g", f"{p}.groups") or () for g in groups_raw)
    return UiFlagsFacts(source=r.str_(d, "source", p) or "", flags=tuple(flags), groups=groups,
                        error=r.str_(d, "error", p))


_FACTS_HINT = "use the JSON that `lowvram doctor --json` printed, unchanged"


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _decode_facts(raw: bytes, name: str) -> str:
    """UTF-8, or UTF-8/UTF-16 with a byte-order mark (Windows PowerShell's `>` writes UTF-16)."""
    boms = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
    codec = next((bom_codec for bom, bom_codec in boms if raw.startswith(bom)), "utf-8")
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as exc:
        raise FactsError(f"facts file {name} is not {codec.upper().replace('-SIG', '')} text (byte {exc.start})",
                         "save it as UTF-8, e.g. `lowvram doctor --json | Out-File -Encoding utf8 facts.json` in "
                         "PowerShell, `lowvram doctor --json > facts.json` elsewhere") from exc


def facts_from_json(raw: bytes, name: str) -> Facts:
    """Facts from the bytes of the JSON `doctor --json` printed; `name` (the file) is what errors call it.

    Damage is one FactsError: not UTF-8/UTF-16 text, not JSON, a key given twice, nesting too deep,
    a number with thousands of digits, or what `facts_from_dict` refuses.
    """
    text = _decode_facts(raw, name)
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise FactsError(f"facts file {name} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
                         _FACTS_HINT) from exc
    except _DuplicateKeyError as exc:
        raise FactsError(f"facts file {name} gives the key {json.dumps(exc.key)[:60]} twice in one object",
                         _FACTS_HINT) from exc
    except RecursionError as exc:
        raise FactsError(f"facts file {name} is nested too deeply to be facts", _FACTS_HINT) from exc
    except ValueError as exc:  # an integer over Python's 4300-digit limit
        raise FactsError(f"facts file {name} holds a number with thousands of digits; not facts", _FACTS_HINT) from exc
    return facts_from_dict(data, source=name)
