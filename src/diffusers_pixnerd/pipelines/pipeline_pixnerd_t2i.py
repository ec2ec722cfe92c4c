# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Text-to-image PixNerd pipeline with a Qwen3 text encoder."""

from typing import Any, Callable

import torch
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import replace_example_docstring
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..models.transformer_pixnerd import PixNerdTransformer2DModel
from ..schedulers.scheduling_pixnerd import PixNerdFlowMatchScheduler
from ..utils import is_integer
from .input_checks import SamplingSettings, check_sampling_inputs, sampling_settings
from .pipeline_utils import Conditioning, PixNerdBasePipeline, retrieve_timesteps

DEFAULT_TEXT_ENCODER = "Qwen/Qwen3-1.7B"  # the official model's
# Tokens per prompt of `encode_prompt` in a pipeline without a transformer (whose `text_max_length` decides otherwise):
# the official model's, as in its qwen3_text_encoder.py.
DEFAULT_MAX_SEQUENCE_LENGTH = 128

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_pixnerd import PixNerdT2IPipeline

        >>> pipe = PixNerdT2IPipeline.from_pretrained("MCG-NJU/PixNerd-XXL-P16-T2I", dtype=torch.bfloat16)
        >>> pipe.to("cuda")
        >>> image = pipe("a red fox in the snow, golden hour", height=512, width=768).images[0]
        >>> image.save("fox.png")
        ```
"""


def encode_qwen3_prompts(
    text_encoder, tokenizer, prompts: list[str], max_length: int, embed_dim: int | None, device: torch.device
) -> torch.Tensor:
    """The official conditioner (qwen3_text_encoder.py): right padding to `max_length` with truncation, the encoder's
    last hidden state (the attention mask goes to the encoder only), cut or zero-padded to `embed_dim` features (all of
    them, unchanged, for `embed_dim=None`)."""
    tokens = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        padding_side="right",
        return_tensors="pt",
    )
    hidden = text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))[0]
    if embed_dim is None:
        return hidden
    hidden = hidden[..., :embed_dim]
    if hidden.shape[-1] < embed_dim:
        hidden = torch.nn.functional.pad(hidden, (0, embed_dim - hidden.shape[-1]))
    return hidden


def load_text_encoder(name: str, dtype: torch.dtype, tokenizer=None):
    """`(text_encoder, tokenizer)` of a Qwen3 name or path (the tokenizer only when none is given); an encoder that
    cannot be had (offline and not cached, no access) is an `OSError` that says how to do without it."""
    try:
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(name)
        return AutoModel.from_pretrained(name, dtype=dtype), tokenizer
    except OSError as e:
        raise OSError(
            f"The text encoder {name!r} of the PixNerd text-to-image model could not be loaded "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). The official model needs "
            f"{DEFAULT_TEXT_ENCODER}: download it once while online, or pass `text_encoder=` and `tokenizer=` "
            "(a Qwen3 model, e.g. `transformers.AutoModel.from_pretrained(folder)`, and its tokenizer), or pass "
            "`text_encoder=None, tokenizer=None` and call the pipeline with `prompt_embeds` (and "
            "`negative_prompt_embeds`)."
        ) from e


class PixNerdT2IPipeline(PixNerdBasePipeline):
    r"""
    Text-to-image generation with PixNerd ([paper](https://arxiv.org/abs/2507.23268)): pixel-space diffusion with a
    Qwen3 text encoder, any resolution (multiples of 32 for the official model) and any aspect ratio.

    This model inherits from [`DiffusionPipeline`]. Check the superclass documentation for the generic methods
    implemented for all pipelines (downloading, saving, running on a particular device, etc.).

    Parameters:
        transformer ([`PixNerdTransformer2DModel`]):
            A text-conditional PixNerd transformer. May be `None` for a pipeline that only runs `encode_prompt`.
        scheduler ([`PixNerdFlowMatchScheduler`] or [`FlowMatchEulerDiscreteScheduler`]):
            The sampler; a [`PixNerdFlowMatchScheduler`] config also carries the checkpoint's default settings.
        text_encoder ([`~transformers.Qwen3Model`], *optional*):
            The text encoder (Qwen/Qwen3-1.7B for the official model); its last hidden state conditions the image.
            May be `None` when `prompt_embeds` are passed.
        tokenizer ([`~transformers.Qwen2Tokenizer`], *optional*):
            The tokenizer of the text encoder.
    """

    model_cpu_offload_seq = "text_encoder->transformer"
    _optional_components = ["text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    @classmethod
    def from_official_transformer(
        cls, transformer, scheduler_preset=None, dtype=None, text_encoder=DEFAULT_TEXT_ENCODER, tokenizer=None
    ):
        """The paper's text-to-image sampler ("t2i" unless `scheduler_preset` says otherwise) and `text_encoder`: a
        Qwen3 name or path (loaded with its tokenizer, in `dtype`, default bfloat16), a model, or `None`."""
        scheduler = PixNerdFlowMatchScheduler.from_official_preset(scheduler_preset or "t2i")
        if isinstance(text_encoder, str):
            text_encoder, tokenizer = load_text_encoder(text_encoder, dtype or torch.bfloat16, tokenizer)
        return cls(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)

    @classmethod
    def _official_default_components(cls, kwargs: dict) -> dict:
        if "text_encoder" not in kwargs:  # the official model's encoder
            dtype = kwargs.get("dtype") or kwargs.get("torch_dtype") or torch.bfloat16
            kwargs["text_encoder"], kwargs["tokenizer"] = load_text_encoder(
                DEFAULT_TEXT_ENCODER, dtype, kwargs.get("tokenizer")
            )
        return kwargs

    def __init__(
        self,
        transformer: PixNerdTransformer2DModel,
        scheduler: PixNerdFlowMatchScheduler,
        text_encoder: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        super().__init__()
        self.check_transformer(transformer)
        if transformer is not None and not transformer.is_text_conditional:
            raise ValueError(
                "`transformer` is a class-conditional PixNerd model; use `PixNerdPipeline` (e.g. "
                "`PixNerdPipeline.from_pretrained(...)`) for it."
            )
        self.register_modules(
            transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
        )

    def _encode(self, texts: list[str], device: torch.device, max_sequence_length: int) -> torch.Tensor:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(
                "This pipeline has no `text_encoder`/`tokenizer`: pass `prompt_embeds` (and `negative_prompt_embeds` "
                "when guidance is on)."
            )
        # The transformer's width (the official conditioner cuts or pads to it); without one, the encoder's own.
        embed_dim = self.transformer.config.text_embed_dim if self.transformer is not None else None
        return encode_qwen3_prompts(self.text_encoder, self.tokenizer, texts, max_sequence_length, embed_dim, device)

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_images_per_prompt: int = 1,
        device: torch.device | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""
        Encodes prompts (and the unconditional prompts) into text encoder hidden states.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompts; not needed when `prompt_embeds` are given.
            negative_prompt (`str` or `list[str]`, *optional*):
                The unconditional prompts for guidance, one for all or one per prompt; defaults to `""` as in the
                official code.
            do_classifier_free_guidance (`bool`, defaults to `True`):
                Whether to return the unconditional embeddings too.
            num_images_per_prompt (`int`, defaults to 1):
                Copies of each embedding.
            device (`torch.device`, *optional*):
                Where to run the text encoder; defaults to the pipeline's execution device.
            prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed `(batch, text_max_length, text_embed_dim)` embeddings.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed unconditional embeddings.
            max_sequence_length (`int`, *optional*):
                Tokens per prompt (padded or truncated to it). Defaults to the transformer's `text_max_length` (its
                learned positions; generating needs exactly that), or to `DEFAULT_MAX_SEQUENCE_LENGTH` (128, the
                official model's) in a pipeline without a transformer.

        Returns:
            `(prompt_embeds, negative_prompt_embeds)`, the second `None` without guidance, in the transformer's dtype
            (the text encoder's in a pipeline without a transformer). Their width is the transformer's
            `text_embed_dim` (the encoder's hidden state cut or zero-padded to it, as officially), or the encoder's
            hidden size without a transformer (the same for the official model).
        """
        device = device or self._execution_device
        if max_sequence_length is None and self.transformer is not None:
            max_sequence_length = self.transformer.config.text_max_length
        elif max_sequence_length is None:
            max_sequence_length = DEFAULT_MAX_SEQUENCE_LENGTH
        if not is_integer(max_sequence_length) or max_sequence_length < 1:
            raise ValueError(f"`max_sequence_length` must be a positive integer, got {max_sequence_length!r}.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass `prompt` or `prompt_embeds`.")
        if prompt_embeds is None:
            prompt = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self._encode(prompt, device, max_sequence_length)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            batch = prompt_embeds.shape[0]
            negative_prompt = negative_prompt if negative_prompt is not None else ""
            negative_prompt = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(set(negative_prompt)) == 1:  # encode once, like the official cached "" embedding
                negative_prompt_embeds = self._encode(negative_prompt[:1], device, max_sequence_length).expand(
                    batch, -1, -1
                )
            else:
                negative_prompt_embeds = self._encode(negative_prompt, device, max_sequence_length)

        if self.transformer is not None:
            dtype = self.transformer.dtype
        else:
            dtype = self.text_encoder.dtype if self.text_encoder is not None else prompt_embeds.dtype
        prompt_embeds = prompt_embeds.to(device, dtype).repeat_interleave(num_images_per_prompt, dim=0)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device, dtype).repeat_interleave(
                num_images_per_prompt, dim=0
            )
        return prompt_embeds, negative_prompt_embeds

    def check_inputs(
        self,
        *,
        prompt,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        max_sequence_length,
        height,
        width,
        num_inference_steps,
        sigmas,
        guidance_scale,
        guidance_interval,
        num_images_per_prompt,
        generator,
        latents,
        output_type,
        callback_on_step_end_tensor_inputs,
    ) -> tuple[SamplingSettings, int]:
        """The arguments of `__call__`: a `ValueError` naming the first wrong one. Returns the sampling settings, those
        left out filled in (`sampling_settings`), and the batch size."""
        sampling = sampling_settings(
            self,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            guidance_interval=guidance_interval,
            latents=latents,
        )
        guided = sampling.guidance_scale > 1.0
        num_prompts = self._check_prompts(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, max_sequence_length, guided
        )
        batch_size = num_prompts * num_images_per_prompt
        check_sampling_inputs(
            self,
            sampling,
            batch_size=batch_size,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            latents=latents,
            output_type=output_type,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        return sampling, batch_size

    def _check_prompts(
        self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, max_sequence_length, guided
    ) -> int:
        """The prompt arguments of `__call__` (`guided`: whether the call needs unconditional embeddings); returns the
        number of prompts."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` and `prompt_embeds`.")
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if text is not None and not (
                isinstance(text, str) or (isinstance(text, list) and all(isinstance(t, str) for t in text))
            ):
                raise ValueError(f"`{name}` must be a string or a list of strings, got {type(text).__name__}.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass at most one of `negative_prompt` and `negative_prompt_embeds`.")
        config = self.transformer.config
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None and (not isinstance(embeds, torch.Tensor) or embeds.ndim != 3):
                if isinstance(embeds, torch.Tensor):
                    hint = " (one prompt: `[None]` adds the batch axis)" if embeds.ndim == 2 else ""
                    got = f"shape {tuple(embeds.shape)}{hint}"
                else:
                    got = f"a {type(embeds).__name__} (`torch.tensor(...)` makes a tensor of nested lists)"
                raise ValueError(
                    f"`{name}` must be a torch.Tensor of shape (batch, text_max_length, text_embed_dim) = (batch, "
                    f"{config.text_max_length}, {config.text_embed_dim}), got {got}."
                )
        if max_sequence_length is not None and max_sequence_length != config.text_max_length:
            raise ValueError(
                f"`max_sequence_length` must be {config.text_max_length}, the transformer's learned text length; "
                f"got {max_sequence_length}."
            )
        needs_encoder = prompt is not None or (guided and negative_prompt_embeds is None)
        if needs_encoder and (self.text_encoder is None or self.tokenizer is None):
            raise ValueError(
                "This pipeline has no `text_encoder`/`tokenizer`: pass `prompt_embeds` (and `negative_prompt_embeds` "
                "when guidance is on)."
            )
        batch = len(prompt) if isinstance(prompt, list) else 1 if prompt is not None else prompt_embeds.shape[0]
        if batch == 0:
            raise ValueError("`prompt` (or `prompt_embeds`) is empty.")
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch:
            raise ValueError(f"`negative_prompt` has {len(negative_prompt)} entries for {batch} prompts.")
        expected = (batch, config.text_max_length, config.text_embed_dim)
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None and tuple(embeds.shape) != expected:
                raise ValueError(f"`{name}` must have shape {expected}, got {tuple(embeds.shape)}.")
            if embeds is not None and not torch.isfinite(embeds).all():
                raise ValueError(f"`{name}` contain NaN or infinite values.")
        return batch

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generates images from text.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompts; or pass `prompt_embeds`.
            negative_prompt (`str` or `list[str]`, *optional*):
                The unconditional prompts of guidance (one for all or one per prompt); default `""`.
            height (`int`, *optional*):
                Image height in pixels, a multiple of `transformer.resolution_multiple` (32 for the official model);
                defaults to the height of `latents` if given, else to the model's `sample_size`. Other sizes than the
                trained one are decoded by the neural field from the trained token grid.
            width (`int`, *optional*):
                Image width in pixels; defaults to the width of `latents` if given, else to the model's `sample_size`.
            num_inference_steps (`int`, *optional*):
                Sampling steps; defaults to `len(sigmas)` if given, else to the scheduler config's (25 for the official
                model).
            sigmas (`list[float]`, *optional*):
                A custom schedule: the unshifted sigmas of the steps, strictly decreasing in (0, 1], without the final
                0, passed to the scheduler's `set_timesteps(sigmas=...)`, which shifts them and appends 0
                (`np.linspace(1, 1 / N, N)` is the default grid of [`PixNerdFlowMatchScheduler`] up to float32
                rounding). It sets the number of steps; `num_inference_steps`, if given too, must equal `len(sigmas)`.
            guidance_scale (`float`, *optional*):
                Classifier-free guidance scale; `<= 1` disables guidance. Defaults to the scheduler config's (4).
            guidance_interval (`tuple[float, float]`, *optional*):
                `(min, max)` in the paper's time t (0 = noise, 1 = data): guidance only where `min < t < max`.
            num_images_per_prompt (`int`, defaults to 1):
                Images per prompt.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Seeds the initial noise (drawn on the CPU, so a seed gives the same image on any device).
            latents (`torch.Tensor`, *optional*):
                Initial noise of shape `(batch, 3, height, width)`; it sets the image size when `height` and `width`
                are not given.
            prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed text embeddings `(batch, text_max_length, text_embed_dim)`.
            negative_prompt_embeds (`torch.Tensor`, *optional*):
                Precomputed unconditional embeddings.
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"` or `"pt"` (images in [0, 1]), or `"latent"` (the raw pixels in [-1, 1]).
            return_dict (`bool`, defaults to `True`):
                Whether to return an [`ImagePipelineOutput`] or a tuple.
            attention_kwargs (`dict`, *optional*):
                Passed to the transformer, e.g. `{"scale": 0.5}` for loaded LoRA weights.
            callback_on_step_end (`Callable`, *optional*):
                Called as `callback_on_step_end(pipe, step, timestep, callback_kwargs)` after each step; it may
                return `{"latents": ...}` to replace the latents, and `"prompt_embeds"` or `"negative_prompt_embeds"`
                (same shape) to condition the following steps on other embeddings.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`):
                The tensors passed in `callback_kwargs`, from `_callback_tensor_inputs`: `"latents"`,
                `"prompt_embeds"` and `"negative_prompt_embeds"` (`None` without guidance).
            max_sequence_length (`int`, *optional*):
                Tokens per prompt; must equal the transformer's `text_max_length` (128 for the official model), the
                default.

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the generated images.
        """
        # 1. Check inputs; the settings left out come from `latents` (the size) and the scheduler config.
        sampling, batch_size = self.check_inputs(
            prompt=prompt,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            guidance_interval=guidance_interval,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            latents=latents,
            output_type=output_type,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = sampling.guidance_scale
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        device = self._execution_device

        # 2. Encode the prompts, and the negative prompts for guidance (no attention mask inside the transformer: the
        # padded slots count, as officially).
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            negative_prompt,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            num_images_per_prompt=num_images_per_prompt,
            device=device,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length,
        )
        condition = Conditioning(encoder_hidden_states=prompt_embeds)
        uncondition = Conditioning(encoder_hidden_states=negative_prompt_embeds)  # `None` without guidance

        # 3. Prepare latents (the initial noise).
        latents = self.prepare_latents(batch_size, sampling.height, sampling.width, generator, latents, device)

        # 4. Prepare timesteps.
        timesteps = retrieve_timesteps(self.scheduler, sampling.num_inference_steps, device, sampling.sigmas)

        # 5. Denoising loop.
        latents = self.denoise(
            latents,
            timesteps,
            condition,
            uncondition,
            guidance_interval=sampling.guidance_interval,
            attention_kwargs=attention_kwargs,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )

        # 6. Post-process: pixels to images.
        return self.postprocess(latents, output_type, return_dict)
