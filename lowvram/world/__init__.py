"""The edges that touch the world: files, processes, NVML, git, the UI (docs/architecture.md#layers-and-import-rules)."""
