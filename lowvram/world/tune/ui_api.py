"""Talking to the UI: A1111's API over loopback HTTP (stdlib only), and what tune sends it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from lowvram.world.tune.results import LOOPBACK, NEGATIVE, PROMPT, SAMPLER, SEED, TuneError


class ApiClient:
    """A1111's API on a loopback port; no proxy (an http_proxy must never see these requests)."""

    def __init__(self, port: int, host: str = LOOPBACK) -> None:
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise TuneError(f"tune talks to the UI only over loopback, not {host}", "this is a bug in lowvram")
        self.base = f"http://{host}:{port}"
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, path: str, timeout: float) -> tuple[int, Any]:
        return self._call(urllib.request.Request(self.base + path, method="GET"), timeout)

    def post(self, path: str, body: dict[str, Any], timeout: float) -> tuple[int, Any]:
        data = json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.base + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        return self._call(req, timeout)

    def _call(self, req: urllib.request.Request, timeout: float) -> tuple[int, Any]:
        """(status, parsed JSON or text). Raises OSError (incl. timeouts) when nothing came back."""
        try:
            with self._opener.open(req, timeout=max(0.05, timeout)) as resp:
                return int(resp.status), _parse(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                body = _parse(exc.read())
            finally:
                exc.close()
            return int(exc.code), body
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, OSError):
                raise reason from exc
            raise ConnectionError(str(reason)) from exc


def _parse(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return raw.decode("utf-8", "replace")


def failure_reason(status: int, body: Any) -> str:
    """One short line for a failed txt2img: A1111 answers 500 with {error, detail, body, errors}."""
    text = json.dumps(body) if not isinstance(body, str) else body
    if "out of memory" in text.lower() or "outofmemory" in text.lower():
        return f"out of memory (HTTP {status})"
    detail = ""
    if isinstance(body, dict):
        parts = [str(body.get(k)) for k in ("error", "errors", "detail") if body.get(k)]
        detail = ": " + " ".join(parts) if parts else ""
    elif text:
        detail = ": " + text.strip().splitlines()[0]
    return f"HTTP {status}{detail}"[:160]


def txt2img_payload(width: int, height: int, steps: int) -> dict[str, Any]:
    """Fixed prompt and seed, batch 1, nothing saved or sent back: only the time matters."""
    return {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": SEED, "subseed": -1, "width": width,
            "height": height, "steps": steps, "batch_size": 1, "n_iter": 1, "cfg_scale": 7.0,
            "sampler_name": SAMPLER, "enable_hr": False, "restore_faces": False, "tiling": False,
            "save_images": False, "send_images": False, "do_not_save_samples": True, "do_not_save_grid": True}
