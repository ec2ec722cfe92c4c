"""PixNerd (Pixel Neural Field Diffusion) for HuggingFace Diffusers."""

import diffusers
from transformers.utils import logging as transformers_logging

from .models import PIXNERD_PRESETS, PixNerdTransformer2DModel
from .pipelines import (
    PixNerdImg2ImgPipeline,
    PixNerdInpaintPipeline,
    PixNerdPipeline,
    PixNerdT2IImg2ImgPipeline,
    PixNerdT2IInpaintPipeline,
    PixNerdT2IPipeline,
    convert_official_pipeline,
    imagenet_id2label,
    load_pipeline,
)
from .schedulers import OFFICIAL_SCHEDULER_PRESETS, PixNerdFlowMatchScheduler, PixNerdFlowMatchSchedulerOutput

__version__ = "0.2.0.dev0"


# `DiffusionPipeline.from_pretrained` looks pipeline classes up by name in the `diffusers` namespace: registering
# ours there lets it load a saved PixNerd pipeline folder once this package is imported.
PIPELINES = {  # by task, as diffusers' AutoPipeline tables hold them: generation, image-to-image, inpainting
    "pixnerd": (PixNerdPipeline, PixNerdImg2ImgPipeline, PixNerdInpaintPipeline),
    "pixnerd-t2i": (PixNerdT2IPipeline, PixNerdT2IImg2ImgPipeline, PixNerdT2IInpaintPipeline),
}
for _cls in (PixNerdTransformer2DModel, PixNerdFlowMatchScheduler, *(c for row in PIPELINES.values() for c in row)):
    setattr(diffusers, _cls.__name__, _cls)

# `AutoPipelineForText2Image`, `...ForImage2Image` and `...ForInpainting` find the pipeline of a task through these
# module-level tables (by the `_class_name` of a folder, or the class of a pipeline given to `from_pipe`); adding our
# rows to them is all a registration is. The class-conditional pipeline sits in the text-to-image table, the
# generation task's (`AutoPipelineForText2Image` gives `PixNerdPipeline` for a class-conditional folder).
# Importing that module imports every diffusers pipeline, and with them transformers' image processors, which warn
# when torchvision is missing: nothing PixNerd uses, so transformers' warnings are held back during that import.
_verbosity = transformers_logging.get_verbosity()
transformers_logging.set_verbosity_error()
try:
    from diffusers.pipelines import auto_pipeline
finally:
    transformers_logging.set_verbosity(_verbosity)
for _name, _row in PIPELINES.items():
    for _table, _cls in zip(
        (
            auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
            auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
            auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING,
        ),
        _row,
    ):
        _table[_name] = _cls

__all__ = [
    "OFFICIAL_SCHEDULER_PRESETS",
    "PIXNERD_PRESETS",
    "PixNerdFlowMatchScheduler",
    "PixNerdFlowMatchSchedulerOutput",
    "PixNerdImg2ImgPipeline",
    "PixNerdInpaintPipeline",
    "PixNerdPipeline",
    "PixNerdT2IImg2ImgPipeline",
    "PixNerdT2IInpaintPipeline",
    "PixNerdT2IPipeline",
    "PixNerdTransformer2DModel",
    "convert_official_pipeline",
    "imagenet_id2label",
    "load_pipeline",
]
