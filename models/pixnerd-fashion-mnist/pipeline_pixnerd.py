# diffusers custom-pipeline file of a diffusers-pixnerd folder; it needs `pip install diffusers-pixnerd`:
#     from diffusers import DiffusionPipeline
#     pipe = DiffusionPipeline.from_pretrained(<this folder or repo>, custom_pipeline="pipeline_pixnerd", trust_remote_code=True)
from diffusers_pixnerd import PixNerdPipeline  # noqa: F401
