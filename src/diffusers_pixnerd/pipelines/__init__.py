from .loading import (
    apply_few_step_sampler,
    compile_transformer,
    convert_official_pipeline,
    load_pipeline,
    official_pipeline_class,
    pipeline_class,
)
from .pipeline_pixnerd import PixNerdPipeline, imagenet_id2label
from .pipeline_pixnerd_img2img import PixNerdImg2ImgPipeline
from .pipeline_pixnerd_inpaint import PixNerdInpaintPipeline
from .pipeline_pixnerd_t2i import PixNerdT2IPipeline, encode_qwen3_prompts
from .pipeline_pixnerd_t2i_img2img import PixNerdT2IImg2ImgPipeline
from .pipeline_pixnerd_t2i_inpaint import PixNerdT2IInpaintPipeline

__all__ = [
    "PixNerdImg2ImgPipeline",
    "PixNerdInpaintPipeline",
    "PixNerdPipeline",
    "PixNerdT2IImg2ImgPipeline",
    "PixNerdT2IInpaintPipeline",
    "PixNerdT2IPipeline",
    "apply_few_step_sampler",
    "compile_transformer",
    "convert_official_pipeline",
    "encode_qwen3_prompts",
    "imagenet_id2label",
    "load_pipeline",
    "official_pipeline_class",
    "pipeline_class",
]
