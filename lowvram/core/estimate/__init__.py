"""The memory model and its calibration: what a generation needs in VRAM."""
