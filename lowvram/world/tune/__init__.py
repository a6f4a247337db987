"""`lowvram tune` (docs/architecture.md#tune): the package's face, what the CLI imports.

results.py holds the settings and result types, loopback.py keeps the UI on loopback,
snapshot.py puts the tree back byte for byte, ui_api.py talks to the UI's API, ui_process.py
starts and stops the UI, probing.py judges probes and roads, and session.py runs a tune.
"""

from __future__ import annotations

from lowvram.world.tune.results import Probe, TuneError, TuneEvent, TuneResult, TuneSettings
from lowvram.world.tune.session import run_tune

__all__ = ["Probe", "TuneError", "TuneEvent", "TuneResult", "TuneSettings", "run_tune"]
