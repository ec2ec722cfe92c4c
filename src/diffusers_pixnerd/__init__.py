"""PixNerd (Pixel Neural Field Diffusion) for HuggingFace Diffusers."""

from .convert import convert_official_checkpoint
from .models import PIXNERD_PRESETS, PixNerdTransformer2DModel

__version__ = "0.1.0"

__all__ = ["PIXNERD_PRESETS", "PixNerdTransformer2DModel", "convert_official_checkpoint"]
