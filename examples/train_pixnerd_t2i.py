#!/usr/bin/env python
# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Fine-tune a text-to-image PixNerd pipeline with Accelerate: full fine-tuning (the paper's SFT recipe) or LoRA; or
train one from scratch (`--model_config`, a Qwen3 text encoder and tokenizer by name or path).

    accelerate launch examples/train_pixnerd_t2i.py --pretrained_model_name_or_path MCG-NJU/PixNerd-XXL-P16-T2I \\
        --train_data_dir /data/captioned --resolution 512 --mixed_precision bf16 --output_dir pixnerd-t2i-sft

    accelerate launch examples/train_pixnerd_t2i.py --pretrained_model_name_or_path MCG-NJU/PixNerd-XXL-P16-T2I \\
        --train_data_dir /data/captioned --use_lora --lora_rank 32 --precompute_text_embeddings --output_dir my-lora

    accelerate launch examples/train_pixnerd_t2i.py --model_config PixNerd-XXL/16-T2I \\
        --text_encoder_name_or_path Qwen/Qwen3-1.7B --train_data_dir /data/captioned --output_dir pixnerd-t2i-new

Few-step distillation (`--distill`, a LoRA that samples in 1-8 steps without guidance; docs/training.md#few-step):

    accelerate launch examples/train_pixnerd_t2i.py --pretrained_model_name_or_path MCG-NJU/PixNerd-XXL-P16-T2I \
        --distill --distill_prompts_file prompts.txt --use_lora --output_dir pixnerd-t2i-turbo-lora

The official SFT (`configs_t2i/sft_res512.yaml`): logit-normal timesteps with shift 4 at 512 (2 at 256), 10% empty
prompts, REPA at block 6, AdamW lr 1e-5 betas (0.9, 0.999), clipping 1.0, EMA 0.9999; Qwen3 frozen. See
docs/training.md.
"""

import argparse
import logging
import os

import torch
from accelerate.utils import set_seed

from diffusers_pixnerd import (
    OFFICIAL_SCHEDULER_PRESETS,
    PIXNERD_PRESETS,
    PixNerdFlowMatchScheduler,
    PixNerdT2IPipeline,
    PixNerdTransformer2DModel,
)
from diffusers_pixnerd.pipelines.model_card import write_model_card
from diffusers_pixnerd.training import (
    HubAccessError,
    PixNerdTrainingModule,
    PromptEmbeddingCache,
    StepSampling,
    TrainingHelpFormatter,
    TrainingRun,
    ValidationSettings,
    add_lora_adapters,
    add_training_arguments,
    check_hub_access,
    check_resolution,
    check_training_arguments,
    check_validation_sizes,
    create_accelerator,
    create_dataloader,
    create_optimizer_and_schedule,
    create_repa_encoder,
    create_repa_projector,
    encode_prompts,
    exported_module,
    hub_model_id,
    load_training_dataset,
    lora_model_card,
    model_card_training_section,
    model_config_from_args,
    parameter_groups,
    prepare_output_dir,
    prompt_cache_folder,
    push_folder,
    quantize_text_encoder,
    resolve_seed,
    save_lora_adapters,
    stream_captions,
    sub_state_dict,
    tracker_config,
    trained_weights_dtype,
    training_ema,
    training_steps,
    validation_prompts,
    weight_dtype,
)
from diffusers_pixnerd.training.buckets import create_bucket_dataloader
from diffusers_pixnerd.training.dataset_config import load_folders, read_dataset_config
from diffusers_pixnerd.training.distill import (
    add_distill_arguments,
    check_distill_arguments,
    check_distill_model,
    few_step_sampler,
    few_step_scheduler,
    load_teacher_samples,
    prepare_teacher_samples,
    save_few_step_sampler,
    sigma_choices,
    teacher_noise,
    teacher_settings,
)
from diffusers_pixnerd.training.lora import restrict_embedding_adapters, word_token_ids
from diffusers_pixnerd.training.prior import (
    add_prior_arguments,
    captions_in_context,
    check_output_preservation_arguments,
    check_prior_arguments,
    context_vocabulary,
    output_preservation_captions,
    prepare_regularisation_images,
    random_context_prompts,
)

logger = logging.getLogger(__name__)

T2I_PRESETS = {name: config for name, config in PIXNERD_PRESETS.items() if config.get("text_embed_dim")}

VALIDATION_PROMPTS = ["a red fox in the snow, golden hour", "a bowl of ramen on a wooden table"]

LORA_TARGET_MODULES = "to_q,to_k,to_v,to_out.0,add_k_proj,add_v_proj,proj_in,proj_out,param_generator"
TEXT_ENCODER_LORA_TARGET_MODULES = "q_proj,k_proj,v_proj,o_proj"


def lora_target_modules(names: str) -> list[str]:
    """`--lora_target_modules` as a list."""
    return [name.strip() for name in names.split(",") if name.strip()]


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="Fine-tune a text-to-image PixNerd pipeline with Accelerate.",
        formatter_class=TrainingHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="A PixNerdT2IPipeline folder or Hub repo to fine-tune (ours, or an official one, converted on load).",
    )
    model.add_argument("--revision", type=str, default=None, help="Hub revision of the pipeline: branch, tag, commit.")
    model.add_argument(
        "--model_config",
        type=str,
        default=None,
        help=f"Train from scratch instead: a preset ({', '.join(T2I_PRESETS)}) or a JSON file of "
        "`PixNerdTransformer2DModel` arguments (`text_embed_dim` is taken from the text encoder).",
    )
    model.add_argument(
        "--model_config_json", type=str, default=None, help="Inline JSON on top of the config: '{\"num_layers\": 2}'."
    )
    model.add_argument(
        "--text_encoder_name_or_path",
        type=str,
        default="Qwen/Qwen3-1.7B",
        help="From scratch: the Qwen3 text encoder (Hub id or folder; the official model uses Qwen/Qwen3-1.7B).",
    )
    model.add_argument(
        "--tokenizer_name_or_path", type=str, default=None, help="From scratch: default, the text encoder's."
    )
    model.add_argument(
        "--scheduler_preset",
        type=str,
        default="t2i",
        help="From scratch: the sampler saved with the pipeline (a `PixNerdFlowMatchScheduler` official preset).",
    )
    model.add_argument(
        "--train_text_encoder_layers", type=int, default=0, help="Also train the last N Qwen3 layers (and its norm)."
    )
    model.add_argument(
        "--quantize_text_encoder",
        action="store_true",
        help="Encode with an int8 weight-only copy of the frozen Qwen3 (torchao; half the memory of bfloat16), when "
        "the captions are not precomputed. The exported pipeline keeps the encoder as loaded.",
    )
    model.add_argument(
        "--precompute_text_embeddings",
        action="store_true",
        help="Encode every caption once before training (frozen encoder; saves its memory and time during training).",
    )
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--use_lora", action="store_true", help="Train LoRA adapters instead of the full transformer.")
    lora.add_argument("--lora_rank", type=int, default=32, help="Rank of the LoRA matrices.")
    lora.add_argument("--lora_alpha", type=int, default=None, help="Default: the rank.")
    lora.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA input.")
    lora.add_argument(
        "--lora_target_modules",
        type=str,
        default=LORA_TARGET_MODULES,
        help="Comma-separated module names: attention (to_q, to_k, to_v, to_out.0; add_k_proj, add_v_proj for the "
        "text), MLP (proj_in, proj_out), neural-field weight generator (param_generator); the text refiner's blocks "
        "have the same names and are included; add text_proj for the text projection.",
    )
    lora.add_argument("--use_dora", action="store_true", help="DoRA (weight-decomposed LoRA, peft) instead of LoRA.")
    lora.add_argument(
        "--train_text_encoder",
        action="store_true",
        help="Also train LoRA adapters on the Qwen3 text encoder (saved with the transformer's, `text_encoder.` keys; "
        "`load_lora_weights` loads both).",
    )
    lora.add_argument(
        "--text_encoder_lora_rank",
        type=int,
        default=None,
        help="Rank of the text encoder's adapters. Default: --lora_rank.",
    )
    lora.add_argument(
        "--text_encoder_lr",
        type=float,
        default=None,
        help="Learning rate of the text encoder's adapters. Default: --learning_rate.",
    )
    lora.add_argument(
        "--text_encoder_lora_target_modules",
        type=str,
        default=TEXT_ENCODER_LORA_TARGET_MODULES,
        help="Comma-separated Qwen3 module names of the text encoder's adapters (attention projections by default; "
        "embed_tokens: the token embeddings).",
    )
    lora.add_argument(
        "--text_encoder_token_words",
        type=str,
        default=None,
        help="With embed_tokens in --text_encoder_lora_target_modules: comma-separated words whose token embeddings "
        "alone may change (textual inversion's pivot; e.g. the concept's word): prompts without them are encoded "
        "exactly as the base does. Default: every token the captions hold.",
    )
    parser.add_argument("--caption_column", type=str, default="text", help="Captions column (metadata.jsonl/dataset).")
    parser.add_argument(
        "--dataset_config",
        type=str,
        default=None,
        help="A TOML file of several captioned folders (repeats, caption column, loss masks) and regularisation "
        "folders, instead of --train_data_dir (docs/training.md#a-dataset-config-file).",
    )
    parser.add_argument(
        "--validation_prompts",
        type=str,
        nargs="+",
        default=None,
        help=f"Prompts sampled for the validation images and the model card (default: {VALIDATION_PROMPTS}).",
    )
    parser.add_argument(
        "--validation_prompts_file",
        type=str,
        default=None,
        help="Instead: a text file of validation prompts, one a line (blank lines skipped).",
    )
    add_training_arguments(
        parser,
        image_preprocessing="resize_center_crop",
        shift=None,
        use_repa=None,
        use_ema=None,
        repa_align_layer=6,
        train_batch_size=8,
        max_grad_norm=1.0,
        output_dir="pixnerd-t2i",
        tracker_project_name="pixnerd-t2i",
        condition_dropout=None,
    )
    add_prior_arguments(parser)
    add_distill_arguments(parser)
    args = parser.parse_args(input_args)
    if (args.pretrained_model_name_or_path is None) == (args.model_config is None):
        raise ValueError(
            "Pass exactly one of `--pretrained_model_name_or_path` (fine-tune a pipeline) and `--model_config` (train "
            "from scratch)."
        )
    if args.model_config is not None and args.use_lora:
        raise ValueError("`--use_lora` trains adapters on a pretrained model: pass `--pretrained_model_name_or_path`.")
    if args.model_config is not None and args.model_config not in T2I_PRESETS:
        if not os.path.isfile(args.model_config):
            raise ValueError(f"`--model_config` {args.model_config!r} is neither a preset nor a JSON file.")
    if args.scheduler_preset not in OFFICIAL_SCHEDULER_PRESETS:
        raise ValueError(
            f"`--scheduler_preset` must be one of {sorted(OFFICIAL_SCHEDULER_PRESETS)}, got {args.scheduler_preset!r}."
        )
    # Defaults that depend on the mode: the official SFT for full fine-tuning, the usual LoRA settings otherwise.
    if args.learning_rate is None:
        args.learning_rate = 1e-4 if args.use_lora or args.model_config else 1e-5
    if args.use_repa is None:
        args.use_repa = not (args.use_lora or args.distill)
    if args.use_ema is None:
        args.use_ema = not args.use_lora
    args.lora_alpha = args.lora_alpha or args.lora_rank
    if args.condition_dropout is None:
        args.condition_dropout = 0.0 if args.distill else 0.1  # a distilled model samples without guidance
    if args.distill and args.model_config is not None:
        raise ValueError("`--distill` distills a trained model: pass `--pretrained_model_name_or_path`.")
    if args.dataset_config is not None:
        given = [
            f"--{f}" for f in ("train_data_dir", "dataset_name", "mask_data_dir", "reg_data_dir") if getattr(args, f)
        ]
        given += ["--alpha_mask"] if args.alpha_mask else []
        given += ["--streaming"] if args.streaming else []
        if given or args.distill:
            raise ValueError(
                f"`--dataset_config` holds the data: not with `{(given or ['--distill'])[0]}` (set it in the file)."
            )
        config = read_dataset_config(args.dataset_config)
        args.dataset_folders, args.reg_folders = config.datasets, config.regularisation or None
    check_training_arguments(args, needs_data=not (args.distill or args.dataset_config))
    check_prior_arguments(args)
    check_output_preservation_arguments(args)
    check_distill_arguments(args)
    prompts, prompts_file = args.validation_prompts, args.validation_prompts_file
    args.validation_prompts = validation_prompts(prompts, prompts_file, VALIDATION_PROMPTS)
    if args.train_text_encoder_layers < 0:
        raise ValueError(f"`--train_text_encoder_layers` must be >= 0, got {args.train_text_encoder_layers}.")
    if args.train_text_encoder_layers and args.quantize_text_encoder:
        raise ValueError("`--train_text_encoder_layers` trains the encoder: not with `--quantize_text_encoder`.")
    if args.train_text_encoder:
        if not args.use_lora:
            raise ValueError(
                "`--train_text_encoder` trains LoRA adapters on the text encoder: pass `--use_lora` too (to train its "
                "layers in a full fine-tune: `--train_text_encoder_layers N`)."
            )
        for flag in ("precompute_text_embeddings", "quantize_text_encoder", "distill"):
            if getattr(args, flag):
                raise ValueError(f"`--train_text_encoder` needs the text encoder in the loop: not with `--{flag}`.")
    else:
        for flag in ("text_encoder_lora_rank", "text_encoder_lr", "text_encoder_token_words"):
            if getattr(args, flag) is not None:
                raise ValueError(f"`--{flag}` is a setting of `--train_text_encoder`: pass it too, or leave it out.")
    args.text_encoder_lora_rank = args.text_encoder_lora_rank or args.lora_rank
    if args.text_encoder_token_words is not None:
        if "embed_tokens" not in lora_target_modules(args.text_encoder_lora_target_modules):
            raise ValueError(
                "`--text_encoder_token_words` chooses the token embeddings the `embed_tokens` adapter learns: add "
                "embed_tokens to `--text_encoder_lora_target_modules`."
            )
        if not [w for w in args.text_encoder_token_words.split(",") if w.strip()]:
            raise ValueError("`--text_encoder_token_words` must name at least one word, got an empty list.")
    if args.use_dora and not args.use_lora:
        raise ValueError("`--use_dora` trains DoRA adapters: pass `--use_lora` too.")
    if args.train_text_encoder_layers and (args.precompute_text_embeddings or args.use_lora):
        raise ValueError(
            "`--train_text_encoder_layers` needs the text encoder in the loop: not with `--precompute_text_embeddings` "
            "or `--use_lora`."
        )
    return args


def load_pipeline(args) -> PixNerdT2IPipeline:
    return PixNerdT2IPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir
    )


def new_pipeline(args) -> PixNerdT2IPipeline:
    """A pipeline to train from scratch: a new transformer (`--model_config`, the text width of the encoder, the
    training resolution), the text encoder and tokenizer by name or path, and the `--scheduler_preset` sampler."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer_path = args.tokenizer_name_or_path or args.text_encoder_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, cache_dir=args.cache_dir)
        text_encoder = AutoModel.from_pretrained(args.text_encoder_name_or_path, cache_dir=args.cache_dir)
    except OSError as error:
        raise ValueError(
            f"Could not load the text encoder `--text_encoder_name_or_path` {args.text_encoder_name_or_path!r} or the "
            f"tokenizer `--tokenizer_name_or_path` {tokenizer_path!r}: {error}"
        ) from None
    overrides = {"text_embed_dim": text_encoder.config.hidden_size, "num_classes": None}
    if args.resolution is not None:
        overrides["sample_size"] = args.resolution
    transformer = PixNerdTransformer2DModel(**model_config_from_args(args, PIXNERD_PRESETS, **overrides))
    logger.info(
        "New transformer: %.1fM parameters, text width %d",
        transformer.num_parameters() / 1e6,
        overrides["text_embed_dim"],
    )
    scheduler = PixNerdFlowMatchScheduler.from_official_preset(args.scheduler_preset)
    return PixNerdT2IPipeline(transformer, scheduler, text_encoder=text_encoder, tokenizer=tokenizer)


def main(args):
    accelerator = create_accelerator(args)
    repo_id = check_hub_access(args) if args.push_to_hub else None  # before training: a token that can write there
    checkpoint = prepare_output_dir(accelerator, args)
    # One seed for the run (`--seed`, else the resumed checkpoint's, else drawn): sampling, data order, checkpoints.
    args.seed = resolve_seed(accelerator, args.seed, checkpoint)
    accelerator.dataloader_config.data_seed = args.seed
    set_seed(args.seed)
    repa_encoder = create_repa_encoder(accelerator, args)  # first: a missing encoder stops before anything loads
    device, dtype = accelerator.device, weight_dtype(accelerator)

    # 1. The data (captioned images, checked before anything loads; with --distill the teacher's samples, made in 2.),
    # and the pipeline to fine-tune.
    if args.distill:
        dataset = None  # the teacher's samples, made in 2.
        check_distill_model(args)  # a text-to-image model
    elif args.dataset_config is not None:  # several folders, with repeats and masks
        dataset = load_folders(args.dataset_folders, args.caption_column)
    else:
        dataset, _ = load_training_dataset(
            args.train_data_dir,
            args.dataset_name,
            args.dataset_config_name,
            args.dataset_split,
            args.image_column,
            caption_column=args.caption_column,
            streaming=args.streaming,
            cache_dir=args.cache_dir,
        )
    preservation_word = args.output_preservation_word
    if preservation_word is not None and hasattr(dataset, "__len__"):  # the captions it acts on (not streamed)
        if not output_preservation_captions(list(stream_captions(dataset)), preservation_word)[1].any():
            raise ValueError(
                f"`--output_preservation_word` {preservation_word!r} is in none of the training captions."
            )
    pipeline = new_pipeline(args) if args.model_config else load_pipeline(args)
    transformer, scheduler = pipeline.transformer, pipeline.scheduler
    text_encoder, tokenizer = pipeline.text_encoder, pipeline.tokenizer
    if text_encoder is None or tokenizer is None:
        raise ValueError(f"{args.pretrained_model_name_or_path!r} has no text encoder or tokenizer.")
    text_encoder_dtype = text_encoder.dtype  # a frozen encoder is exported as it was loaded
    context_words = None  # --text_preservation_weight, --caption_context_words: the words of the random contexts
    if args.text_preservation_weight is not None or args.caption_context_words:
        context_words = context_vocabulary(tokenizer, preservation_word or "")
    args.resolution = args.resolution or transformer.config.sample_size
    check_resolution(args.resolution, transformer.config.patch_size)
    check_validation_sizes(args, transformer.resolution_multiple)
    if args.shift is None:
        args.shift = 4.0 if args.resolution >= 512 else 2.0  # official: 2 at 256, 4 at 512 and in the SFT

    # 2. Qwen3: frozen in the mixed-precision dtype, partly trained (float32 master weights), or used once.
    text_encoder.requires_grad_(False).eval()
    train_text_encoder = args.train_text_encoder_layers > 0 or args.train_text_encoder  # layers, or LoRA (step 3)
    if args.train_text_encoder_layers:
        if args.train_text_encoder_layers > len(text_encoder.layers):
            raise ValueError(
                f"`--train_text_encoder_layers` {args.train_text_encoder_layers} > {len(text_encoder.layers)} layers."
            )
        text_encoder.layers[-args.train_text_encoder_layers :].requires_grad_(True)
        text_encoder.norm.requires_grad_(True)
        text_encoder.train()
    exported_text_encoder = text_encoder  # frozen: exported as loaded (a quantized copy encodes during training)
    if args.quantize_text_encoder:
        text_encoder = quantize_text_encoder(text_encoder, dtype).to(device)
    else:
        text_encoder.to(device, dtype=torch.float32 if train_text_encoder else dtype)

    def encode(prompts):
        with torch.no_grad(), accelerator.autocast():
            return encode_prompts(text_encoder, tokenizer, prompts, transformer.config, device)

    validation = [{"prompt": prompt} for prompt in args.validation_prompts]  # the pipeline arguments of each image
    null_embeds = None if train_text_encoder else encode([""])
    # Regularisation images (`--reg_data_dir`, or the base model's for `--reg_prompts_file`), before any adapter.
    reg_images = prepare_regularisation_images(accelerator, args, transformer, scheduler, encode)
    # Distillation: the base model's guided samples are the data; the student's sampler visits `distill_sigmas`.
    distill_sigmas, sampler, teacher = None, None, None
    if args.distill:
        if args.use_lora:  # the frozen base is cast to the mixed-precision dtype below anyway: already for the teacher
            transformer.to(dtype)
        teacher_folder = prepare_teacher_samples(accelerator, args, transformer, scheduler, encode)
        dataset = load_teacher_samples(teacher_folder)
        sampler, teacher = few_step_sampler(args, scheduler), teacher_settings(args, scheduler)
        if accelerator.is_main_process:  # beside the checkpoints too: `evaluate.py --checkpoint` samples with it
            save_few_step_sampler(args.output_dir, sampler, teacher)
        scheduler = few_step_scheduler(scheduler, sampler)  # validation and the export sample as the student will
        distill_sigmas = sigma_choices(scheduler, args.distill_steps)
    prompt_cache = None
    if args.precompute_text_embeddings:  # each process encodes its share of the captions, then Qwen3 leaves
        captions = set(stream_captions(dataset)).union(reg_images.captions if reg_images else ())
        if preservation_word is not None:  # and the captions without the word
            captions = captions.union(output_preservation_captions(list(captions), preservation_word)[0])
        captions = sorted(captions)
        key = [args.pretrained_model_name_or_path, text_encoder.config.to_dict(), transformer.config.text_max_length]
        folder = prompt_cache_folder(args.cache_dir or os.path.join(args.output_dir, "cache"), key, captions)
        prompt_cache = PromptEmbeddingCache.build(accelerator, captions, encode, folder, args.train_batch_size)
        embeds = encode(args.validation_prompts)
        validation = [{"prompt_embeds": e[None], "negative_prompt_embeds": null_embeds} for e in embeds]
        text_encoder.to("cpu")  # only needed again to be saved with a fully fine-tuned pipeline
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.aspect_ratio_buckets:  # batches of one aspect-ratio bucket each, sides multiples of the model's
        train_dataloader = create_bucket_dataloader(accelerator, args, dataset, transformer.resolution_multiple)
    else:
        train_dataloader = create_dataloader(accelerator, args, dataset)

    # 3. Full fine-tuning, or LoRA on attention, MLP and the neural-field weight generator (base frozen).
    transformer.train()
    if args.use_lora:
        targets = lora_target_modules(args.lora_target_modules)
        add_lora_adapters(
            transformer, args.lora_rank, args.lora_alpha, args.lora_dropout, targets, dtype, use_dora=args.use_dora
        )
    if args.train_text_encoder:  # the encoder's own adapters, frozen base in the mixed-precision dtype
        targets = lora_target_modules(args.text_encoder_lora_target_modules)
        rank = args.text_encoder_lora_rank
        add_lora_adapters(text_encoder, rank, rank, args.lora_dropout, targets, dtype, use_dora=args.use_dora)
        if args.text_encoder_token_words is not None:  # only these words' tokens learn an embedding
            words = [w for w in args.text_encoder_token_words.split(",") if w.strip()]
            token_ids = word_token_ids(tokenizer, words)
            restrict_embedding_adapters(text_encoder, token_ids)
            # A word the tokenizer splits ("inverted" -> "in" + "verted") trains its pieces, which other words share.
            logger.info("Token embeddings that learn: %s", [tokenizer.decode([i]) for i in token_ids])
        text_encoder.train()
    else:
        transformer.to(trained_weights_dtype(args.optimizer))  # bfloat16 only with a stochastic-rounding optimizer
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()

    # 4. The objective: flow matching, plus REPA (frozen DINOv2 + a projector that trains and is not exported).
    projector = create_repa_projector(args, transformer, repa_encoder)
    if projector is not None:
        projector.to(trained_weights_dtype(args.optimizer))
    model = PixNerdTrainingModule(
        transformer,
        projector,
        args.repa_align_layer,
        args.repa_loss_weight,
        args.weighting_scheme,
        text_encoder=text_encoder if train_text_encoder else None,
        tokenizer=tokenizer,
        null_encoder_hidden_states=null_embeds,
        output_preservation_weight=args.output_preservation_weight or 0.0,
        text_preservation_weight=args.text_preservation_weight or 0.0,
    )

    # 5. The optimizer (`--optimizer`; the text encoder's adapters at `--text_encoder_lr`) and lr schedule, prepared by
    # Accelerate; the float32 EMA of the trained transformer weights; the run (resume, logs, checkpoints, signals,
    # validation); then train.
    max_train_steps, steps_per_epoch = training_steps(args, train_dataloader)
    parameters = parameter_groups(model, args.text_encoder_lr)
    optimizer, lr_scheduler = create_optimizer_and_schedule(accelerator, args, parameters, max_train_steps)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    ema, ema_decay = None, None
    if args.use_ema:
        ema, ema_decay = training_ema(
            [p for p in unwrapped.transformer.parameters() if p.requires_grad],
            max_train_steps,
            args.ema_decay,
            args.ema_warmup,
            args.ema_update_interval,
            "cpu" if args.ema_device == "cpu" else accelerator.device,
            resuming=checkpoint is not None,
        )
    run = TrainingRun(
        accelerator,
        model,
        optimizer,
        lr_scheduler,
        train_dataloader,
        output_dir=args.output_dir,
        max_train_steps=max_train_steps,
        steps_per_epoch=steps_per_epoch,
        train_batch_size=args.train_batch_size,
        seed=args.seed,
        sampling=StepSampling.from_args(args),
        validation=ValidationSettings.from_args(args),
        checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit,
        overwrite_output_dir=args.overwrite_output_dir,
        ema=ema,
        ema_update_interval=args.ema_update_interval,
        streaming=args.streaming,
        pad_resolution=args.resolution if args.image_preprocessing == "pad" else None,
        checkpoint=checkpoint,
        lora=args.use_lora,
    )
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args))

    def validate(final=False):
        encoder = unwrapped.text_encoder if train_text_encoder else text_encoder
        encoder = None if args.precompute_text_embeddings else encoder  # the prompts come encoded
        pipeline = PixNerdT2IPipeline(unwrapped.transformer, scheduler, text_encoder=encoder, tokenizer=tokenizer)
        return run.validation_images(pipeline, validation, args.validation_prompts, final)  # at --validation_sizes

    def text_condition(captions: list[str]) -> dict:
        """`{"prompts": ...}` for an encoder that trains (encoded inside the module, so that DDP sees its forward),
        else `{"encoder_hidden_states": ...}`."""
        if train_text_encoder:
            return {"prompts": list(captions)}
        if prompt_cache is not None:
            return {"encoder_hidden_states": prompt_cache.lookup(captions).to(device, dtype)}
        return {"encoder_hidden_states": encode(captions)}

    if run.global_step == 0 and run.validation_due:  # the baseline, before the first step (not when resuming)
        validate()
    for batch in run.batches():
        with accelerator.accumulate(model):
            own_captions = batch["caption"]  # the training images' (the regularisation ones are added below)
            if args.caption_context_words:
                seed = run.generator().initial_seed()
                own_captions = captions_in_context(own_captions, context_words, seed, args.caption_context_words)
            pixels, captions, reg_kwargs = batch["pixel_values"], own_captions, {}
            if reg_images is not None:  # the regularisation images after the batch's own, with their loss weight
                pixels, captions = reg_images.extend(pixels, captions, run.micro_step)
                reg_kwargs = reg_images.loss_kwargs
            noise = None
            if args.distill:  # each teacher sample's own noise: the pair the student learns to join
                noise = teacher_noise(batch["noise_seed"], pixels.shape[1:])
            inputs = run.step_inputs(
                pixels, repa_encoder, noise=noise, sigma_choices=distill_sigmas, loss_mask=batch.get("loss_mask")
            )
            condition = text_condition(captions)
            if preservation_word is not None:  # the batch's own captions without the word, against the base
                reg_captions = captions[len(own_captions) :] if args.output_preservation_reg else ()
                preserved, rows = output_preservation_captions(own_captions, preservation_word, reg_captions)
                kept = text_condition(preserved)
                condition.update(
                    preservation_rows=rows,
                    preservation_prompts=kept.get("prompts"),
                    preservation_encoder_hidden_states=kept.get("encoder_hidden_states"),
                )
            if args.text_preservation_weight is not None:  # the captions behind random words, encoder held to base
                seed = run.generator().initial_seed()
                prompts = random_context_prompts(own_captions, preservation_word, context_words, seed)
                condition["text_preservation_prompts"] = prompts
            losses = model(**inputs, **condition, **reg_kwargs)
            run.check_losses(losses)  # stops the run on a non-finite loss (any process)
            accelerator.backward(losses["loss"])
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(run.trainable, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            run.update_ema()  # every --ema_update_interval steps
        if run.end_step(batch) and run.validation_due:
            validate()
    run.finish()

    # 6. Export: LoRA weights in diffusers' format, or the whole pipeline (EMA weights, no projector).
    samples = validate(final=True)
    card = model_card_training_section(
        args, "train_pixnerd_t2i.py", run.global_step, samples, {"ema_decay": ema_decay}
    )
    # Every process gathers (FSDP holds shards); the main one writes.
    state = run.export_trained_parameters(unwrapped.transformer) if args.use_lora else run.export_state()
    text_state = run.export_trained_parameters(unwrapped.text_encoder) if args.train_text_encoder else None
    if accelerator.is_main_process and args.use_lora:
        save_lora_adapters(
            unwrapped.transformer,
            args.output_dir,
            state_dict=state,
            text_encoder=unwrapped.text_encoder if args.train_text_encoder else None,
            text_encoder_state_dict=text_state,
        )
        write_model_card(args.output_dir, lora_model_card(args, card, repo_id, sampler, teacher))
        if args.distill:
            save_few_step_sampler(args.output_dir, sampler, teacher)
    elif accelerator.is_main_process:
        if train_text_encoder:
            text_encoder = exported_module(text_encoder, sub_state_dict(state, "text_encoder"))  # FSDP: shards
        else:
            text_encoder = exported_text_encoder.to("cpu", dtype=text_encoder_dtype)
        pipeline = PixNerdT2IPipeline(run.exported_transformer(state), scheduler, text_encoder, tokenizer)
        pipeline.save_pretrained(
            args.output_dir,
            repo_id=repo_id,
            base_model=hub_model_id(args.pretrained_model_name_or_path),
            model_card_extra=card,
        )
        if args.distill:
            save_few_step_sampler(args.output_dir, sampler, teacher)
    if accelerator.is_main_process:
        logger.info("Saved the %s to %s", "LoRA weights" if args.use_lora else "pipeline", args.output_dir)
        if args.push_to_hub:
            push_folder(args, repo_id)
    accelerator.end_training()


if __name__ == "__main__":
    try:
        arguments = parse_args()
    except ValueError as error:  # a flag the checks refuse: the message names it, a traceback would only hide it
        raise SystemExit(f"error: {error}") from None
    try:
        main(arguments)
    except HubAccessError as error:  # a set-up problem that the message explains: no traceback
        raise SystemExit(f"error: {error}") from None
