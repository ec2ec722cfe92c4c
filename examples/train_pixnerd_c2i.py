#!/usr/bin/env python
# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Train a class-conditional PixNerd model with Accelerate: from scratch (the paper's ImageNet recipe, REPA on) or
further from a saved `PixNerdPipeline`.

    accelerate launch examples/train_pixnerd_c2i.py --model_config PixNerd-XL/16 \\
        --train_data_dir /data/imagenet/train --class_names imagenet --mixed_precision bf16 --output_dir pixnerd-xl-16

The recipe (official `configs_c2i/*.yaml`): logit-normal timesteps, shift 1, 10% null class, REPA on DINOv2-B/14 at
block 8 with weight 0.5, AdamW lr 1e-4 without warm-up or clipping, EMA 0.9999. See docs/training.md.
"""

import argparse
import logging
import os

from accelerate.utils import set_seed

from diffusers_pixnerd import PIXNERD_PRESETS, PixNerdFlowMatchScheduler, PixNerdPipeline, PixNerdTransformer2DModel
from diffusers_pixnerd.training import (
    HubAccessError,
    PixNerdTrainingModule,
    StepSampling,
    TrainingHelpFormatter,
    TrainingRun,
    ValidationSettings,
    add_training_arguments,
    check_hub_access,
    check_resolution,
    check_training_arguments,
    check_validation_sizes,
    count_classes,
    create_accelerator,
    create_dataloader,
    create_optimizer_and_schedule,
    create_repa_encoder,
    create_repa_projector,
    hub_model_id,
    load_training_dataset,
    model_card_training_section,
    model_config_from_args,
    parameter_groups,
    prepare_output_dir,
    push_folder,
    read_class_names,
    resolve_seed,
    tracker_config,
    trained_weights_dtype,
    training_ema,
    training_steps,
)
from diffusers_pixnerd.training.buckets import create_bucket_dataloader

logger = logging.getLogger(__name__)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="Train a class-conditional PixNerd model with Accelerate.", formatter_class=TrainingHelpFormatter
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_config",
        type=str,
        default="PixNerd-XL/16",
        help=f"A preset ({', '.join(PIXNERD_PRESETS)}) or a JSON file of `PixNerdTransformer2DModel` arguments.",
    )
    model.add_argument(
        "--model_config_json", type=str, default=None, help="Inline JSON on top of the config: '{\"num_layers\": 2}'."
    )
    model.add_argument(
        "--pretrained_model_name_or_path", type=str, default=None, help="Train on from a PixNerdPipeline (folder/Hub)."
    )
    model.add_argument("--revision", type=str, default=None, help="Hub revision of the pipeline: branch, tag, commit.")
    model.add_argument("--num_classes", type=int, default=None, help="Default: the number of classes of the data.")
    model.add_argument(
        "--scheduler_preset", type=str, default="c2i-euler100", help="Sampler saved with a new pipeline (scheduler)."
    )
    parser.add_argument("--label_column", type=str, default="label", help="Class ids column of `--dataset_name`.")
    parser.add_argument(
        "--class_names",
        type=str,
        default=None,
        help='"imagenet", a JSON/text file or "a,b,c"; default: the class folder names (saved as `id2label`).',
    )
    parser.add_argument(
        "--validation_class_labels",
        type=str,
        nargs="+",
        default=None,
        help="Classes sampled, by id or name as the pipeline takes them (default: the first 4).",
    )
    add_training_arguments(
        parser,
        image_preprocessing="adm_center_crop",
        resolution=256,
        shift=1.0,
        use_repa=True,
        repa_align_layer=8,
        learning_rate=1e-4,
        train_batch_size=32,
        max_grad_norm=0.0,
        output_dir="pixnerd-c2i",
        tracker_project_name="pixnerd-c2i",
    )
    args = parser.parse_args(input_args)
    check_training_arguments(args)
    if args.pretrained_model_name_or_path is None and args.model_config not in PIXNERD_PRESETS:
        if not os.path.isfile(args.model_config):
            raise ValueError(f"`--model_config` {args.model_config!r} is neither a preset nor a JSON file.")
    return args


def main(args):
    accelerator = create_accelerator(args)
    repo_id = check_hub_access(args) if args.push_to_hub else None  # before training: a token that can write there
    checkpoint = prepare_output_dir(accelerator, args)
    # One seed for the run (`--seed`, else the resumed checkpoint's, else drawn): sampling, data order, checkpoints.
    args.seed = resolve_seed(accelerator, args.seed, checkpoint)
    accelerator.dataloader_config.data_seed = args.seed
    set_seed(args.seed)
    repa_encoder = create_repa_encoder(accelerator, args)  # first: a missing encoder stops before anything loads

    # 1. Data: class subfolders or a dataset with image and label columns, checked before anything trains.
    dataset, class_names = load_training_dataset(
        args.train_data_dir,
        args.dataset_name,
        args.dataset_config_name,
        args.dataset_split,
        args.image_column,
        label_column=args.label_column,
        streaming=args.streaming,
        cache_dir=args.cache_dir,
    )
    folder_names, class_names = class_names, read_class_names(args.class_names, class_names)
    if args.class_names is not None and folder_names is not None and len(class_names) != len(folder_names):
        raise ValueError(
            f"`--class_names` gives {len(class_names)} names but the data has {len(folder_names)} classes "
            f"({', '.join(folder_names[:5])}{', ...' if len(folder_names) > 5 else ''})."
        )
    data_classes = count_classes(dataset, class_names)

    # 2. The model: a preset/config from scratch, or a saved pipeline trained on.
    if args.pretrained_model_name_or_path is not None:
        pipeline = PixNerdPipeline.from_pretrained(
            args.pretrained_model_name_or_path, revision=args.revision, cache_dir=args.cache_dir
        )
        transformer, scheduler, id2label = pipeline.transformer, pipeline.scheduler, pipeline.config.id2label
        check_resolution(args.resolution, transformer.config.patch_size)
    else:
        num_classes = args.num_classes or data_classes
        if num_classes is None:
            raise ValueError("A streamed dataset without class names has no known class count: pass `--num_classes`.")
        config = model_config_from_args(args, PIXNERD_PRESETS, sample_size=args.resolution, num_classes=num_classes)
        transformer = PixNerdTransformer2DModel(**config)
        scheduler = PixNerdFlowMatchScheduler.from_official_preset(args.scheduler_preset)
        id2label = None
    if class_names is not None:
        id2label = {str(i): name for i, name in enumerate(class_names)}
    if data_classes is not None and data_classes > transformer.config.num_classes:
        raise ValueError(
            f"The data has {data_classes} classes but the model {transformer.config.num_classes} (`--num_classes`)."
        )
    if args.validation_class_labels is None:
        args.validation_class_labels = list(range(min(4, transformer.config.num_classes)))
    labels = [int(label) if str(label).isdigit() else label for label in args.validation_class_labels]
    try:  # ids and names as the pipeline reads them (names through `id2label`)
        args.validation_class_labels = PixNerdPipeline(transformer, scheduler, id2label=id2label)._class_ids(labels)
    except ValueError as error:
        raise ValueError(f"`--validation_class_labels`: {error}") from None
    check_validation_sizes(args, transformer.resolution_multiple)
    if args.aspect_ratio_buckets:  # batches of one aspect-ratio bucket each, sides multiples of the model's
        train_dataloader = create_bucket_dataloader(accelerator, args, dataset, transformer.resolution_multiple)
    else:
        train_dataloader = create_dataloader(accelerator, args, dataset)
    transformer.train()
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    logger.info(
        "Transformer: %.1fM parameters, %d classes", transformer.num_parameters() / 1e6, transformer.config.num_classes
    )

    # 3. The objective: flow matching, plus REPA (frozen DINOv2 + a projector that trains and is not exported).
    projector = create_repa_projector(args, transformer, repa_encoder)
    model = PixNerdTrainingModule(
        transformer, projector, args.repa_align_layer, args.repa_loss_weight, args.weighting_scheme
    )
    model.to(trained_weights_dtype(args.optimizer))  # bfloat16 only with a stochastic-rounding optimizer

    # 4. The optimizer (`--optimizer`) and lr schedule, prepared by Accelerate; the float32 EMA of the trained
    # transformer weights; the run (resume, logs, checkpoints, signals, validation); then train.
    max_train_steps, steps_per_epoch = training_steps(args, train_dataloader)
    optimizer, lr_scheduler = create_optimizer_and_schedule(
        accelerator, args, parameter_groups(model), max_train_steps
    )
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
    )
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args))

    def validate(final=False):  # each class at each of --validation_sizes
        pipeline = PixNerdPipeline(transformer=unwrapped.transformer, scheduler=scheduler, id2label=id2label)
        labels = args.validation_class_labels
        captions = [id2label[str(i)] if id2label else f"class {i}" for i in labels]
        return run.validation_images(pipeline, [{"class_labels": [i]} for i in labels], captions, final)

    if run.global_step == 0 and run.validation_due:  # the baseline, before the first step (not when resuming)
        validate()
    for batch in run.batches():
        with accelerator.accumulate(model):
            inputs = run.step_inputs(batch["pixel_values"], repa_encoder, loss_mask=batch.get("loss_mask"))
            losses = model(**inputs, class_labels=batch["label"])
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

    # 5. Export: the EMA weights in a PixNerdPipeline (no projector), with a model card and sample images.
    samples = validate(final=True)
    state = run.export_state()
    if accelerator.is_main_process:
        pipeline = PixNerdPipeline(transformer=run.exported_transformer(state), scheduler=scheduler, id2label=id2label)
        pipeline.save_pretrained(
            args.output_dir,
            repo_id=repo_id,
            base_model=hub_model_id(args.pretrained_model_name_or_path),
            model_card_extra=model_card_training_section(
                args, "train_pixnerd_c2i.py", run.global_step, samples, {"ema_decay": ema_decay}
            ),
        )
        logger.info("Saved the pipeline to %s", args.output_dir)
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
