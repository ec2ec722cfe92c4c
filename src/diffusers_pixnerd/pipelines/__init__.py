from .loading import apply_few_step_sampler, compile_transformer, load_pipeline, pipeline_class
from .official import convert_official_checkpoint, convert_official_pipeline
from .pipeline_pixnerd import PixNerdPipeline, imagenet_id2label
from .pipeline_pixnerd_t2i import PixNerdT2IPipeline, encode_qwen3_prompts

__all__ = [
    "PixNerdPipeline",
    "PixNerdT2IPipeline",
    "apply_few_step_sampler",
    "compile_transformer",
    "convert_official_checkpoint",
    "convert_official_pipeline",
    "encode_qwen3_prompts",
    "imagenet_id2label",
    "load_pipeline",
    "pipeline_class",
]
