from .cache import cache_config
from .transformer_pixnerd import PIXNERD_PRESETS, PixNerdTransformer2DModel

__all__ = ["PIXNERD_PRESETS", "PixNerdTransformer2DModel", "cache_config"]
