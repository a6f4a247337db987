"""The pure core: decides from values, never touches the world (docs/architecture.md#layers-and-import-rules)."""
