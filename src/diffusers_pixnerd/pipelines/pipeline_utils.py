# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""`PixNerdBasePipeline`, what the class-conditional and the text-to-image pipelines share: the call's state, the
initial noise, the denoising loop with interval guidance, post-processing, and saving with a model card."""

import os
import tempfile
from typing import Any, Callable, NamedTuple

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import create_repo

from ..loaders import FromOfficialPipelineMixin, PixNerdLoraLoaderMixin
from ..models.transformer_pixnerd import PixNerdTransformer2DModel
from ..utils import normal_permissions
from .model_card import carry_model_card_extra, pipeline_model_card, write_loader_file, write_model_card


class Conditioning(NamedTuple):
    """What the transformer is conditioned on in one branch of classifier-free guidance; `None` for an input the
    model does not take."""

    class_labels: torch.Tensor | None = None  # (B,) class ids; `num_classes` is the null class
    encoder_hidden_states: torch.Tensor | None = None  # (B, text_max_length, text_embed_dim) text embeddings


class KeepRegion(NamedTuple):
    """The input pixels an inpainting call keeps, as the denoising loop blends them in after each step."""

    pixels: torch.Tensor  # (B, 3, H, W) in [-1, 1]: the input on the canvas
    mask: torch.Tensor  # (B, 1, H, W) in [0, 1]: 1 = repaint, 0 = keep, in between a blend
    noise: torch.Tensor  # (B, 3, H, W): the noise of the initial latents, which the kept region keeps using


def concat_branches(uncondition: Conditioning, condition: Conditioning) -> Conditioning:
    """Both branches in one batch, `[uncond, cond]`: the conditioning of a guided step's single transformer call."""
    return Conditioning(*(None if u is None else torch.cat([u, c]) for u, c in zip(uncondition, condition)))


def retrieve_timesteps(scheduler, num_inference_steps: int, device: torch.device, sigmas: list[float] | None = None):
    """Sets the scheduler's grid of `num_inference_steps` steps, or the custom `sigmas`, and returns its timesteps
    (diffusers' pipelines each carry a function of this name with more options)."""
    if sigmas is None:
        scheduler.set_timesteps(num_inference_steps, device=device)
    else:
        scheduler.set_timesteps(sigmas=sigmas, device=device)
    return scheduler.timesteps


def replace_embeddings(callback_outputs: dict, name: str, branch: Conditioning) -> Conditioning:
    """`branch` with the `encoder_hidden_states` a callback returned as `name` (moved to the dtype and the device of
    the ones they replace); `branch` itself when they did not change or it has none (the unconditional branch without
    guidance, the class-conditional model)."""
    old = branch.encoder_hidden_states
    new = callback_outputs.pop(name, old)
    if old is None or new is old:
        return branch
    if not isinstance(new, torch.Tensor) or new.shape != old.shape:
        got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
        raise ValueError(f"The callback returned `{name}` of shape {got}; expected {tuple(old.shape)}.")
    return branch._replace(encoder_hidden_states=new.to(device=old.device, dtype=old.dtype))


class PixNerdBasePipeline(FromOfficialPipelineMixin, DiffusionPipeline, PixNerdLoraLoaderMixin):
    """Sampling in pixel space: noise -> flow ODE with interval classifier-free guidance -> images. Official
    checkpoints load through `FromOfficialPipelineMixin`, LoRA weights through `PixNerdLoraLoaderMixin` (`loaders`)."""

    model_cpu_offload_seq = "transformer"
    _callback_tensor_inputs = ["latents"]

    @staticmethod
    def check_transformer(transformer) -> None:
        """`transformer` is a `PixNerdTransformer2DModel` (or `None`): another diffusers model, e.g. a UNet named in a
        folder's `model_index.json`, is a clear error rather than an AttributeError later."""
        model = getattr(transformer, "_orig_mod", transformer)  # under torch.compile's wrapper
        if model is not None and not isinstance(model, PixNerdTransformer2DModel):
            raise ValueError(
                f"`transformer` must be a PixNerdTransformer2DModel, got a {type(model).__name__} (in a saved folder: "
                "the class named for `transformer` in model_index.json and transformer/config.json)."
            )

    def __init__(self):
        super().__init__()
        # Pixels in [-1, 1] to images in [0, 1]; no VAE (scale factor 1).
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=True)
        # The state of the running (or last) call, for callbacks; see the properties below.
        self._guidance_scale, self._num_timesteps, self._interrupt = None, None, False
        self._attention_kwargs, self._current_timestep = None, None
        self._trained_grid = None  # the token grid of the running call (`None`: the transformer's own rule)

    @property
    def guidance_scale(self) -> float | None:
        """The classifier-free guidance scale of the running (or last) call."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the running call guides at all (`guidance_scale > 1`); the guidance interval picks the steps."""
        return self._guidance_scale is not None and self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int | None:
        """The number of denoising steps of the running (or last) call."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (e.g. in a callback) to skip the remaining steps of the running call."""
        return self._interrupt

    @property
    def attention_kwargs(self) -> dict[str, Any] | None:
        """The `attention_kwargs` of the running (or last) call."""
        return self._attention_kwargs

    @property
    def current_timestep(self) -> torch.Tensor | None:
        """The timestep of the denoising step being run (an entry of `scheduler.timesteps`); `None` outside the loop."""
        return self._current_timestep

    def prepare_latents(self, batch_size, height, width, generator, latents, device) -> torch.Tensor:
        """Initial noise in float32, drawn on the CPU so that a seed gives the same image on any device."""
        if latents is None:
            shape = (batch_size, self.transformer.config.in_channels, height, width)
            latents = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
        return latents.to(device=device, dtype=torch.float32)

    def guidance_steps(self, timesteps: torch.Tensor, guidance_interval: tuple[float, float]) -> list[bool]:
        """For each of `timesteps` (the loop's), whether CFG applies there: the scheduler's rule
        (`PixNerdFlowMatchScheduler.guidance_steps`), or `min < 1 - sigma < max` for other schedulers. Decided once,
        before the loop."""
        if self.guidance_scale <= 1.0:
            return [False] * len(timesteps)
        if hasattr(self.scheduler, "guidance_steps"):
            flags = self.scheduler.guidance_steps(guidance_interval)
            return [flags[self.scheduler.index_for_timestep(t)] for t in timesteps]
        times = 1.0 - timesteps.float().cpu() / self.scheduler.config.num_train_timesteps
        return [guidance_interval[0] < float(t) < guidance_interval[1] for t in times]

    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        condition: Conditioning,
        uncondition: Conditioning,
        *,
        guidance_interval: tuple[float, float],
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        keep: KeepRegion | None = None,
    ) -> torch.Tensor:
        """The denoising loop over `timesteps` (see `retrieve_timesteps`): where guidance is active (`guidance_steps`)
        the batch is `[uncond, cond]`, elsewhere cond alone. While the transformer has a cache enabled
        (`enable_cache`), each branch is a separate call in its own cache context. At any image size the transformer
        runs on the token grid of `self._trained_grid` (`None`: the model's own rule, the trained grid for the text model
        and the native grid of `patch_size` patches for the class-conditional one, as the official samplers do).

        `callback_on_step_end(self, step, timestep, callback_kwargs)` may read and replace `latents`, and in the
        text-to-image pipeline `prompt_embeds` and `negative_prompt_embeds`: the branches' `encoder_hidden_states`.

        With `keep` (inpainting), after each step the latents are `(1 - mask) * known + mask * latents`, `known` the
        input noised with `keep.noise` to the next step's sigma (`scheduler.scale_noise`), and after the last step the
        input itself: where the mask is 0 the result is the input's pixels exactly.
        """
        self._num_timesteps = len(timesteps)
        guidance = self.guidance_steps(timesteps, guidance_interval)
        guided = concat_branches(uncondition, condition)  # reused by every guided step, until a callback replaces it
        cached = getattr(self.transformer, "is_cache_enabled", False)
        if cached:
            self.transformer._reset_stateful_cache()  # a sampling interrupted by an error left its states
        self._current_timestep = None
        try:
            with self.progress_bar(total=len(timesteps)) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    self._current_timestep = t
                    active = guidance[i]
                    if cached:
                        # One call per branch, each in its own cache context: a cache then sees a constant batch.
                        noise_pred = self._predict_in_context("cond", i, t, latents, condition, attention_kwargs)
                        if active:
                            noise_uncond = self._predict_in_context(
                                "uncond", i, t, latents, uncondition, attention_kwargs
                            )
                            noise_pred = noise_uncond + self.guidance_scale * (noise_pred - noise_uncond)
                    elif active:
                        noise_pred = self._predict(torch.cat([latents, latents]), t, guided, attention_kwargs)
                        noise_uncond, noise_cond = noise_pred.chunk(2)
                        noise_pred = noise_uncond + self.guidance_scale * (noise_cond - noise_uncond)
                    else:
                        noise_pred = self._predict(latents, t, condition, attention_kwargs)
                    latents = self.scheduler.step(noise_pred, t, latents).prev_sample
                    if keep is not None:
                        known = keep.pixels
                        if i + 1 < len(timesteps):
                            known = self.scheduler.scale_noise(keep.pixels, timesteps[i + 1 : i + 2], keep.noise)
                        latents = (1 - keep.mask) * known + keep.mask * latents

                    if callback_on_step_end is not None:
                        callback_kwargs = {
                            "latents": latents,
                            "prompt_embeds": condition.encoder_hidden_states,
                            "negative_prompt_embeds": uncondition.encoder_hidden_states,
                        }
                        callback_kwargs = {k: callback_kwargs[k] for k in callback_on_step_end_tensor_inputs}
                        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                        if not isinstance(callback_outputs, dict):
                            raise ValueError(
                                "`callback_on_step_end` must return a dict (e.g. the `callback_kwargs` it was given), "
                                f"got {type(callback_outputs).__name__}."
                            )
                        batch_size = latents.shape[0]
                        latents = callback_outputs.pop("latents", latents)
                        if latents.shape[0] != batch_size:
                            raise ValueError("The callback returned `latents` with another batch size.")
                        new_condition = replace_embeddings(callback_outputs, "prompt_embeds", condition)
                        new_uncondition = replace_embeddings(callback_outputs, "negative_prompt_embeds", uncondition)
                        if new_condition is not condition or new_uncondition is not uncondition:
                            condition, uncondition = new_condition, new_uncondition
                            guided = concat_branches(uncondition, condition)
                    progress_bar.update()
        finally:
            self._current_timestep = None
        return latents

    def _predict(self, latents, t, condition: Conditioning, attention_kwargs) -> torch.Tensor:
        """The transformer's velocity for `latents` at `t` in float32."""
        return self.transformer(
            latents.to(self.transformer.dtype),
            t.expand(latents.shape[0]),
            class_labels=condition.class_labels,
            encoder_hidden_states=condition.encoder_hidden_states,
            attention_kwargs=attention_kwargs,
            trained_grid=self._trained_grid,
        ).sample.float()

    def _predict_in_context(self, name, step_index, t, latents, condition, attention_kwargs) -> torch.Tensor:
        """One branch's velocity, computed inside the transformer's cache context `name`."""
        sigma = float(t) / self.scheduler.config.num_train_timesteps
        with self.transformer.cache_context(
            name, step_index=step_index, num_inference_steps=self._num_timesteps, timestep=t, sigma=sigma
        ):
            return self._predict(latents, t, condition, attention_kwargs)

    def postprocess(self, latents: torch.Tensor, output_type: str, return_dict: bool):
        """Raw [-1, 1] pixels for "latent", else images in [0, 1] as PIL, numpy or torch."""
        images = latents if output_type == "latent" else self.image_processor.postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def model_card(
        self, repo_id: str | None = None, extra: str = "", base_model: str | None = None, folder: str | None = None
    ) -> str:
        """The README.md written beside the pipeline (see `model_card.pipeline_model_card`)."""
        return pipeline_model_card(self, repo_id, extra, base_model, folder)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        model_card_extra: str = "",
        base_model: str | None = None,
        **kwargs,
    ):
        """`DiffusionPipeline.save_pretrained` plus a model card (README.md); `push_to_hub=True` uploads the folder.

        `model_card_extra` is markdown added to the card (training settings, sample images, ...).
        """
        hub_kwargs = {k: kwargs.pop(k) for k in ("token", "private", "commit_message", "create_pr") if k in kwargs}
        super().save_pretrained(save_directory, push_to_hub=False, **kwargs)
        if push_to_hub and repo_id is None:
            repo_id = os.path.basename(os.path.normpath(save_directory))
        if not model_card_extra and getattr(self, "_model_card_source", None):
            # A loaded pipeline saved again: its card's training section and the sample images it shows come along.
            model_card_extra, source_base_model = carry_model_card_extra(self._model_card_source[0], save_directory)
            base_model = base_model or source_base_model
        write_model_card(save_directory, self.model_card(repo_id, model_card_extra, base_model, save_directory))
        if type(self).__module__.split(".")[0] == "diffusers_pixnerd":  # a subclass elsewhere has its own code
            write_loader_file(save_directory, type(self).__name__)
        normal_permissions(save_directory)
        if push_to_hub:
            return self._push_folder(save_directory, repo_id, **hub_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        **save_kwargs,
    ):
        """Saves the whole pipeline (with its model card) to a temporary folder and uploads it to `repo_id`."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, repo_id=repo_id, **save_kwargs)
            return self._push_folder(folder, repo_id, commit_message, private, token, create_pr)

    def _push_folder(self, folder, repo_id, commit_message=None, private=None, token=None, create_pr=False):
        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        return self._upload_folder(folder, repo_id, token=token, commit_message=commit_message, create_pr=create_pr)
