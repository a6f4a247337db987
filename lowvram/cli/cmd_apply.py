"""`lowvram apply`: registered on the app by its owner module (being built)."""
