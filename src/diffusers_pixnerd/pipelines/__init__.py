from .pipeline_pixnerd import PixNerdPipeline, imagenet_id2label
from .pipeline_pixnerd_t2i import PixNerdT2IPipeline
from .pipeline_utils import PixNerdLoraLoaderMixin

__all__ = ["PixNerdLoraLoaderMixin", "PixNerdPipeline", "PixNerdT2IPipeline", "imagenet_id2label"]
