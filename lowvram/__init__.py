"""lowvram: make Stable Diffusion WebUIs run well on low-VRAM NVIDIA GPUs."""

__version__ = "0.1.0"
