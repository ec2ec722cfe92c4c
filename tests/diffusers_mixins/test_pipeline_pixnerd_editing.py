"""diffusers' `PipelineTesterMixin` and the pipeline-level cache mixins on the four editing pipelines, wired as the
generation pipelines' tests wire them (this folder's test_pipeline_pixnerd.py and test_pipeline_pixnerd_t2i.py, whose
components and skips they reuse) with the image inputs of diffusers' img2img and inpainting tests
(tests/pipelines/flux/test_pipeline_flux_img2img.py, test_pipeline_flux_inpaint.py): a random image in [0, 1] and a
mask, the image-input parameter sets, and the pt / np / PIL input equivalence of `image_params`."""

import random

import test_pipeline_pixnerd
import test_pipeline_pixnerd_t2i
import torch
from pixnerd_mixin_utils import SIZE
from tests.pipelines.pipeline_params import (
    IMAGE_INPAINTING_BATCH_PARAMS,
    IMAGE_TO_IMAGE_IMAGE_PARAMS,
    IMAGE_VARIATION_BATCH_PARAMS,
    TEXT_GUIDED_IMAGE_INPAINTING_BATCH_PARAMS,
    TEXT_GUIDED_IMAGE_INPAINTING_PARAMS,
    TEXT_GUIDED_IMAGE_VARIATION_BATCH_PARAMS,
    TEXT_GUIDED_IMAGE_VARIATION_PARAMS,
)
from tests.testing_utils import floats_tensor

from diffusers_pixnerd import (
    PixNerdImg2ImgPipeline,
    PixNerdInpaintPipeline,
    PixNerdT2IImg2ImgPipeline,
    PixNerdT2IInpaintPipeline,
)

# The generation tests, by module: a test class left in this module's namespace would run here again (hence the `del`).
C2I, T2I = test_pipeline_pixnerd.PixNerdPipelineFastTests, test_pipeline_pixnerd_t2i.PixNerdT2IPipelineFastTests


def image_inputs(device, seed: int, inpaint: bool) -> dict:
    """A random (1, 3, SIZE, SIZE) image in [0, 1], with the right half masked for inpainting."""
    inputs = {"image": floats_tensor((1, 3, SIZE, SIZE), rng=random.Random(seed)).to(device), "strength": 0.8}
    if inpaint:
        mask = torch.zeros(1, 1, SIZE, SIZE)
        mask[..., SIZE // 2 :] = 1
        inputs["mask_image"] = mask.to(device)
    return inputs


class PixNerdImg2ImgPipelineFastTests(C2I):
    pipeline_class = PixNerdImg2ImgPipeline
    params = C2I.params | {"image", "strength"}
    batch_params = C2I.batch_params | IMAGE_VARIATION_BATCH_PARAMS
    image_params = IMAGE_TO_IMAGE_IMAGE_PARAMS
    image_latents_params = frozenset()  # no VAE: no latents to pass instead of the image
    inpaint = False

    def get_dummy_inputs(self, device, seed=0):
        return {**super().get_dummy_inputs(device, seed), **image_inputs(device, seed, self.inpaint)}


class PixNerdInpaintPipelineFastTests(PixNerdImg2ImgPipelineFastTests):
    pipeline_class = PixNerdInpaintPipeline
    params = PixNerdImg2ImgPipelineFastTests.params | {"mask_image"}
    batch_params = C2I.batch_params | IMAGE_INPAINTING_BATCH_PARAMS
    inpaint = True


class PixNerdT2IImg2ImgPipelineFastTests(T2I):
    pipeline_class = PixNerdT2IImg2ImgPipeline
    params = TEXT_GUIDED_IMAGE_VARIATION_PARAMS | {"strength"}
    batch_params = TEXT_GUIDED_IMAGE_VARIATION_BATCH_PARAMS
    image_params = IMAGE_TO_IMAGE_IMAGE_PARAMS
    image_latents_params = frozenset()
    inpaint = False

    def get_dummy_inputs(self, device, seed=0):
        inputs = {**super().get_dummy_inputs(device, seed), **image_inputs(device, seed, self.inpaint)}
        if not self.inpaint:  # image-to-image keeps the image's size: `height`/`width` only as the image's
            del inputs["height"], inputs["width"]
        return inputs

    def test_inference(self):
        pipe = self.pipeline_class(**self.get_dummy_components())
        pipe.set_progress_bar_config(disable=None)
        image = pipe(**self.get_dummy_inputs("cpu")).images
        self.assertEqual(image.shape, (1, SIZE, SIZE, 3))
        self.assertGreater(float(image.std()), 0.01)


class PixNerdT2IInpaintPipelineFastTests(PixNerdT2IImg2ImgPipelineFastTests):
    pipeline_class = PixNerdT2IInpaintPipeline
    params = TEXT_GUIDED_IMAGE_INPAINTING_PARAMS | {"strength"}
    batch_params = TEXT_GUIDED_IMAGE_INPAINTING_BATCH_PARAMS
    inpaint = True


del C2I, T2I
