from .official import convert_official_checkpoint, convert_official_pipeline
from .pipeline_pixnerd import PixNerdPipeline, imagenet_id2label
from .pipeline_pixnerd_t2i import PixNerdT2IPipeline, encode_qwen3_prompts

__all__ = [
    "PixNerdPipeline",
    "PixNerdT2IPipeline",
    "convert_official_checkpoint",
    "convert_official_pipeline",
    "encode_qwen3_prompts",
    "imagenet_id2label",
]
