"""`lowvram doctor`: registered on the app by its owner module (being built)."""
