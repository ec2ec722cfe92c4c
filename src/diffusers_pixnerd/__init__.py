"""PixNerd (Pixel Neural Field Diffusion) for HuggingFace Diffusers."""

import diffusers

from .models import PIXNERD_PRESETS, PixNerdTransformer2DModel
from .pipelines import (
    PixNerdPipeline,
    PixNerdT2IPipeline,
    convert_official_checkpoint,
    convert_official_pipeline,
    imagenet_id2label,
    load_pipeline,
)
from .schedulers import OFFICIAL_SCHEDULER_PRESETS, PixNerdFlowMatchScheduler, PixNerdFlowMatchSchedulerOutput

__version__ = "0.2.0.dev0"


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
    "load_pipeline",
]
