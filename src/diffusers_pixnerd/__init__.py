"""PixNerd (Pixel Neural Field Diffusion) for HuggingFace Diffusers."""

import diffusers

from .models import PIXNERD_PRESETS, PixNerdTransformer2DModel
from .pipelines import PixNerdPipeline, PixNerdT2IPipeline, imagenet_id2label
from .schedulers import OFFICIAL_SCHEDULER_PRESETS, PixNerdFlowMatchScheduler, PixNerdFlowMatchSchedulerOutput

__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported lazily, so that `python -m diffusers_pixnerd.convert` does not find the module already loaded.
    if name in ("convert_official_checkpoint", "convert_official_pipeline"):
        from . import convert

        return getattr(convert, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# `DiffusionPipeline.from_pretrained` looks pipeline classes up by name in the `diffusers` namespace: registering
# ours there lets it load a saved PixNerd pipeline folder once this package is imported.
for _cls in (PixNerdPipeline, PixNerdT2IPipeline, PixNerdTransformer2DModel, PixNerdFlowMatchScheduler):
    setattr(diffusers, _cls.__name__, _cls)

__all__ = [
    "OFFICIAL_SCHEDULER_PRESETS",
    "PIXNERD_PRESETS",
    "PixNerdFlowMatchScheduler",
    "PixNerdFlowMatchSchedulerOutput",
    "PixNerdPipeline",
    "PixNerdT2IPipeline",
    "PixNerdTransformer2DModel",
    "convert_official_checkpoint",
    "convert_official_pipeline",
    "imagenet_id2label",
]
