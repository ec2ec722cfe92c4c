# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""A training run: `TrainingRun`, the bookkeeping around the training step (batches, the step's random inputs,
backward, EMA, logs, replica checks, checkpoints and resume, stopping on a signal, validation and export)."""

import json
import logging
import os
import shutil
import signal
import time
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from .buckets import set_loader_epoch
from .checkpoints import (
    CHECKPOINT_PREFIX,
    EXPORT_MARKERS,
    TMP_SUFFIX,
    TRAINING_STATE_FILE,
    check_checkpoint_files,
    commit_checkpoint,
    disk_full_error,
    list_checkpoints,
    quiet_loggers,
    read_training_state,
    resume_command,
    unlock_output_dir,
)
from .ema import EMA_FILE, ema_file_in, ema_weights, load_ema_state, restart_ema, save_ema, shard_like, update_ema
from .export import exported_transformer, gathered_state, gathered_trained_parameters
from .hub import mark_export_stale
from .lora import register_adapter_checkpoint_hooks
from .objectives import (
    PixNerdTrainingModule,
    StepSampling,
    condition_drop_mask,
    flip_images,
    repa_target_features,
    sample_sigmas,
)
from .signals import StopSignals
from .validation import (
    ValidationSettings,
    log_validation,
    render_validation,
    save_validation,
    unsharded_root,
    validation_folder,
)

logger = logging.getLogger(__name__)


def parameters_fingerprint(parameters: Iterable[torch.Tensor]) -> str:
    """A hash of parameter values, to compare replicas across processes."""
    import hashlib

    digest = hashlib.sha256()
    for p in parameters:
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class TrainingRun:
    r"""
    The bookkeeping around the training step, which the scripts write out themselves: batches (resuming at the exact
    one), the step's random inputs, loss checks, the EMA update, logs, replica checks, atomic checkpoints and resume
    (model, optimizer, lr schedule, grad scaler and RNG through `accelerator.load_state`; then EMA, step and data
    position), stopping on a signal, validation images and the export. The script makes the optimizer, lr schedule
    and EMA and prepares them with Accelerate; with `lora=True` (a LoRA run) the checkpoints hold the adapters in
    diffusers' LoRA format and the REPA projector instead of the whole module (`register_adapter_checkpoint_hooks`).
    A script's loop:

    ```py
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    ema, ema_decay = training_ema(trained_transformer_parameters, max_train_steps)  # or no EMA: None
    run = TrainingRun(accelerator, model, optimizer, lr_scheduler, train_dataloader, ema=ema, ...)
    validation = [{"class_labels": [i]} for i in labels]  # the pipeline arguments of each validation prompt
    if run.global_step == 0 and run.validation_due:  # the baseline, before the first step (not when resuming)
        run.validation_images(pipeline, validation, captions)
    for batch in run.batches():  # until max_train_steps, epoch after epoch, resuming at the exact batch
        with accelerator.accumulate(model):
            inputs = run.step_inputs(batch["pixel_values"], repa_encoder)  # noise, sigmas, dropout, REPA targets
            losses = model(**inputs, class_labels=batch["label"])
            run.check_losses(losses)  # stops on a non-finite loss
            accelerator.backward(losses["loss"])
            if accelerator.sync_gradients and max_grad_norm > 0:
                accelerator.clip_grad_norm_(run.trainable, max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            run.update_ema()
        if run.end_step(batch) and run.validation_due:  # step count, logs, atomic checkpoints, signals
            run.validation_images(pipeline, validation, captions)
    ```

    Args:
        model, optimizer, lr_scheduler, dataloader: as `accelerator.prepare` returned them.
        output_dir: the run's folder (checkpoints, validation images).
        max_train_steps, steps_per_epoch: `data.training_steps`; `steps_per_epoch` is `None` for a stream.
        train_batch_size, seed: the batch size per process; the seed of every step's random inputs (`generator`).
        sampling, validation: how a step's random inputs are drawn; when and how validation images are made.
        checkpointing_steps, checkpoints_total_limit: a checkpoint every N steps (and at the last), the most kept.
        overwrite_output_dir: the earlier run's checkpoints in `output_dir` are deleted once this run committed one.
        ema, ema_update_interval: the EMA of the trained transformer weights (`ema.training_ema`), or `None`; the
            steps between its updates.
        streaming: the dataloader streams (no seeking: a resume reads past the batches done).
        pad_resolution: with `--image_preprocessing pad`, the training size (how many images were scaled down to
            it is logged).
        checkpoint: the checkpoint to resume from (`None`: a fresh run).
        lora: a LoRA run (the checkpoints hold the adapters).
    """

    def __init__(
        self,
        accelerator,
        model: nn.Module,
        optimizer,
        lr_scheduler,
        dataloader,
        *,
        output_dir: str,
        max_train_steps: int,
        steps_per_epoch: int | None,
        train_batch_size: int,
        seed: int,
        sampling: StepSampling,
        validation: ValidationSettings,
        checkpointing_steps: int,
        checkpoints_total_limit: int | None = None,
        overwrite_output_dir: bool = False,
        ema=None,
        ema_update_interval: int = 1,
        streaming: bool = False,
        pad_resolution: int | None = None,
        checkpoint: str | None = None,
        lora: bool = False,
    ):
        from accelerate.utils import DistributedType
        from tqdm.auto import tqdm

        self.accelerator, self.model, self.optimizer, self.lr_scheduler = accelerator, model, optimizer, lr_scheduler
        self.dataloader, self.output_dir, self.seed = dataloader, output_dir, seed
        self.max_train_steps, self.steps_per_epoch, self.streaming = max_train_steps, steps_per_epoch, streaming
        self.train_batch_size, self.accumulation_steps = train_batch_size, accelerator.gradient_accumulation_steps
        self.sampling, self.validation, self.pad_resolution = sampling, validation, pad_resolution
        self.checkpointing_steps, self.checkpoints_total_limit = checkpointing_steps, checkpoints_total_limit
        self.ema, self.ema_update_interval = ema, ema_update_interval
        # Where the EMA lives (`--ema_device`): a loaded EMA state arrives on the CPU and is moved back there.
        self.ema_device = ema.shadow_params[0].device if ema is not None and ema.shadow_params else None
        # The training module itself, without Accelerate's wrappers (DDP, compile): its parts are reached through it.
        self.unwrapped: PixNerdTrainingModule = accelerator.unwrap_model(model)
        fsdp = accelerator.distributed_type == DistributedType.FSDP
        if lora and not fsdp:  # checkpoints hold the adapters and the projector, not a copy of the frozen base
            register_adapter_checkpoint_hooks(accelerator, self.unwrapped)  # (FSDP's sharded files hold them already)
        self.lora_checkpoints = lora and not fsdp
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        # The EMA follows the trained transformer weights (not the projector, nor text encoder layers).
        self.ema_parameters = [p for p in self.unwrapped.transformer.parameters() if p.requires_grad]
        self.global_step, self.first_epoch, self.resume_batches = 0, 0, 0
        self.saved_step, self.stopped_by = None, None
        self.skipped_images = torch.zeros((), device=accelerator.device)
        self.downscaled_images, self.images_read, self.downscaled_reported = 0, 0, False  # `--image_preprocessing pad`
        self.logs: dict[str, float] = {}
        self._sums: dict[str, float] = {}
        # An export already in the folder comes from before this run: stale once this run saves a checkpoint.
        self.earlier_export = any(os.path.exists(os.path.join(output_dir, m)) for m in EXPORT_MARKERS)
        # With `overwrite_output_dir`, the earlier run's checkpoints: deleted once this run has committed its first.
        self.stale_checkpoints = [path for _, path in list_checkpoints(output_dir)] if overwrite_output_dir else []
        if checkpoint is not None:
            self.load(checkpoint)
            self.saved_step = self.global_step
            if self.global_step >= self.max_train_steps:
                logger.warning(
                    "%s is at step %d, already `--max_train_steps` (%d): nothing to train; exporting it again. Pass "
                    "a higher `--max_train_steps` to continue.",
                    checkpoint,
                    self.global_step,
                    self.max_train_steps,
                )
        self.signals = StopSignals(accelerator)  # SIGINT, SIGTERM: stop after the step, with a checkpoint
        # Micro-batches before this step (they seed `generator()`): an epoch's last step may have fewer than
        # `gradient_accumulation_steps` of them when its batch count is not a multiple.
        self.micro_step = self.global_step * self.accumulation_steps
        if self.steps_per_epoch is not None:
            self.micro_step = self.first_epoch * len(dataloader) + self.resume_batches
        self.images_per_step = train_batch_size * accelerator.num_processes * self.accumulation_steps
        logger.info(
            "***** Training: %s steps, batch %d (x %d processes x %d accumulation = %d), %.2fM trainable parameters, "
            "from step %d *****",
            self.max_train_steps,
            train_batch_size,
            accelerator.num_processes,
            self.accumulation_steps,
            self.images_per_step,
            sum(p.numel() for p in self.trainable) / 1e6,
            self.global_step,
        )
        self.progress = tqdm(
            total=self.max_train_steps,
            initial=self.global_step,
            desc="Steps",
            disable=not accelerator.is_local_main_process,
        )
        self._last_time = time.perf_counter()

    # ---- data
    def batches(self) -> Iterator[dict]:
        """Batches until `max_train_steps`, epoch after epoch, starting where the resumed checkpoint stopped."""
        epoch = self.first_epoch
        while self.global_step < self.max_train_steps:
            loader = self.dataloader
            if self.streaming:
                loader.dataset.set_epoch(epoch)
                if epoch == self.first_epoch and self.resume_batches:
                    import itertools

                    loader = itertools.islice(loader, self.resume_batches, None)  # streams cannot seek: read past
            else:
                if epoch == self.first_epoch and self.resume_batches:
                    loader = self.accelerator.skip_first_batches(loader, self.resume_batches)
                set_loader_epoch(loader, epoch)  # also a bucket sampler inside Accelerate's wrappers
            empty = True
            for batch in loader:
                empty = False
                if self.streaming:
                    batch = {k: v.to(self.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                yield batch
                if self.global_step >= self.max_train_steps or self.stopped_by is not None:
                    return
            if empty and not (epoch == self.first_epoch and self.resume_batches):
                raise RuntimeError(
                    f"Process {self.accelerator.process_index} got no batch in epoch {epoch}: too "
                    "little data (or too few dataset shards) for the processes and the batch size."
                )
            if not self.streaming:  # the processes end a map-style epoch at the same step; streams do not
                self.report_downscaled_images(f"by the end of epoch {epoch + 1}")
            epoch += 1

    def generator(self) -> torch.Generator:
        """The random source of this micro-batch (noise, timesteps, dropout, flips): seeded by (seed, process, batch
        number), so a resumed run draws exactly what the uninterrupted one would have drawn."""
        device = self.accelerator.device
        seed = ((self.seed * 1_000_003 + self.accelerator.process_index) * 1_000_003 + self.micro_step) % 2**63
        return torch.Generator(device).manual_seed(seed)

    # ---- the step
    def step_inputs(
        self,
        pixels: torch.Tensor,
        repa_encoder: nn.Module | None = None,
        noise: torch.Tensor | None = None,
        sigma_choices: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> dict:
        """The random part of a step, from `generator()`: flips (of `loss_mask` too), noise, sigmas, the dropout mask;
        the REPA targets of the (flipped) images on the token grid. Distillation gives each image's `noise` and draws
        the sigmas from `sigma_choices` (those its sampler visits)."""
        sampling, generator = self.sampling, self.generator()
        if sampling.random_flip:
            pixels, loss_mask = flip_images(pixels, generator, loss_mask)
        batch_size, device = pixels.shape[0], pixels.device
        if noise is None:
            noise = torch.randn(pixels.shape, generator=generator, device=generator.device)
        noise = noise.to(device, pixels.dtype)
        if sigma_choices is not None:
            picks = torch.randint(len(sigma_choices), (batch_size,), generator=generator, device=generator.device)
            sigmas = sigma_choices.to(generator.device)[picks].to(device)
        else:
            sigmas = sample_sigmas(
                batch_size,
                sampling.timestep_sampling,
                sampling.shift,
                sampling.logit_mean,
                sampling.logit_std,
                sampling.mode_scale,
                generator=generator,
                device=generator.device,
            ).to(device)
        drop_mask = condition_drop_mask(batch_size, sampling.condition_dropout, generator).to(device)
        inputs = {"pixels": pixels, "noise": noise, "sigmas": sigmas, "drop_mask": drop_mask}
        inputs["loss_mask"] = None if loss_mask is None else loss_mask.to(device)  # regularisation rows: none
        if repa_encoder is not None:
            # The C2I grid follows the image; the T2I grid is fixed (non-square images: non-square patches).
            token_grid = self.unwrapped.transformer.token_grid(*pixels.shape[-2:])[:2]
            with self.accelerator.autocast():
                inputs["repa_features"] = repa_target_features(repa_encoder, pixels, token_grid)
        return inputs

    def check_losses(self, losses: dict):
        """Stops the run on a non-finite loss on any process (before the update, nothing saved); adds the losses to
        the step's logs."""
        values = self.accelerator.gather(torch.stack([v.detach().float() for v in losses.values()])[None])
        if not torch.isfinite(values).all():
            self.signals.restore()
            latest = list_checkpoints(self.output_dir)
            raise FloatingPointError(
                f"Non-finite loss at step {self.global_step + 1} ({dict(zip(losses, values.T.tolist()))}): stopping "
                f"without saving. The last good checkpoint is {latest[-1][1] if latest else 'none (no checkpoint yet)'}"
                "; resume from it with `--resume_from_checkpoint latest`, e.g. with a lower `--learning_rate` or "
                "`--max_grad_norm 1.0`."
            )
        for name, value in zip(losses, values.mean(0).tolist()):
            self._sums[name] = self._sums.get(name, 0.0) + value / self.accumulation_steps

    def update_ema(self):
        """After an optimizer step: the EMA update, every `ema_update_interval` steps."""
        if self.ema is not None and (self.global_step + 1) % self.ema_update_interval == 0:
            update_ema(self.ema, self.ema_parameters)

    def end_step(self, batch: dict) -> bool:
        """After each micro-batch: on an optimizer step, counts it, logs, checkpoints, and stops on a signal. Returns
        whether a step ended."""
        self.micro_step += 1
        self.skipped_images += batch.get("num_skipped", 0)
        self.downscaled_images += int(batch.get("num_downscaled", 0))
        self.images_read += len(batch["pixel_values"])
        if not self.accelerator.sync_gradients:
            return False
        self.global_step += 1
        if self.global_step == 1:
            self.check_replicas()
        self.log()
        if self.global_step % self.checkpointing_steps == 0 or self.global_step == self.max_train_steps:
            self.save()  # the last step is always checkpointed: a finished run can be continued
        if self.signals.requested():
            if self.saved_step != self.global_step:
                self.save()
            self.stopped_by = self.signals.received or signal.SIGTERM
        return True

    def report_downscaled_images(self, when: str):
        """With `--image_preprocessing pad`, logs once how many of the images read so far (all processes) were larger
        than the training size, so scaled down before the padding. Every process calls it at the same step."""
        if self.pad_resolution is None or self.downscaled_reported:
            return
        self.downscaled_reported = True
        counts = torch.tensor([self.downscaled_images, self.images_read], device=self.accelerator.device)
        downscaled, read = self.accelerator.reduce(counts, reduction="sum").tolist()
        if self.accelerator.is_main_process:
            logger.info(
                "--image_preprocessing pad: %d of the %d images read %s were larger than %dx%d and were scaled down "
                "(BICUBIC, aspect ratio kept) to fit before the padding.",
                downscaled,
                read,
                when,
                self.pad_resolution,
                self.pad_resolution,
            )

    @property
    def validation_due(self) -> bool:
        """Validation at this step: every `validation.steps`, step 0 included (the scripts sample it before the first
        step of a fresh run, the baseline)."""
        steps = self.validation.steps
        return steps is not None and self.global_step % steps == 0

    def log(self):
        now = time.perf_counter()
        skipped = int(self.accelerator.reduce(self.skipped_images, reduction="sum").item())
        logs = {
            **self._sums,
            "lr": self.lr_scheduler.get_last_lr()[0],
            "images_per_second": self.images_per_step / max(now - self._last_time, 1e-9),
        }
        if skipped:
            logs["skipped_images"] = skipped
        if skipped > self.logs.get("skipped_images", 0) and self.accelerator.is_main_process:
            logger.warning("Unreadable images skipped so far: %d (see the warnings above for their paths)", skipped)
        self._last_time, self._sums, self.logs = now, {}, logs
        self.progress.update(1)
        self.progress.set_postfix(
            loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", img_s=f"{logs['images_per_second']:.1f}"
        )
        self.accelerator.log(logs, step=self.global_step)

    def check_replicas(self):
        """After the first step of a replicated run (DDP, DeepSpeed ZeRO-2) every process must hold the same weights."""
        from accelerate.utils import DistributedType, gather_object

        if self.accelerator.num_processes == 1 or self.accelerator.distributed_type == DistributedType.FSDP:
            return
        fingerprints = gather_object([parameters_fingerprint(self.trainable)])
        if len(set(fingerprints)) != 1:
            raise RuntimeError(f"The processes hold different weights after a step: {fingerprints}.")
        logger.info(
            "World size %d: all processes hold identical weights after step 1 (%s)",
            self.accelerator.num_processes,
            fingerprints[0],
        )

    # ---- checkpoints
    def _ema_file(self) -> str | None:
        from accelerate.utils import DistributedType

        if self.ema is None:
            return None
        if self.accelerator.distributed_type == DistributedType.FSDP:  # sharded weights: one EMA shard per process
            return f"ema-rank{self.accelerator.process_index}.safetensors"
        return EMA_FILE if self.accelerator.is_main_process else None

    def save(self) -> str:
        """`checkpoint-N.tmp` written by every process, then renamed by the main one: never a half-written "latest"."""
        accelerator = self.accelerator
        temporary = os.path.join(self.output_dir, f"{CHECKPOINT_PREFIX}{self.global_step}{TMP_SUFFIX}")
        if accelerator.is_main_process and os.path.exists(temporary):
            shutil.rmtree(temporary)
        accelerator.wait_for_everyone()
        final = temporary[: -len(TMP_SUFFIX)]
        try:
            with quiet_loggers("accelerate.accelerator", "accelerate.checkpointing"):
                accelerator.save_state(temporary)  # its log names the .tmp folder and files it may not write
            ema_file = self._ema_file()
            if ema_file is not None:
                save_ema(self.ema, os.path.join(temporary, ema_file))
            if accelerator.is_main_process:
                state = {
                    "global_step": self.global_step,
                    "seed": self.seed,
                    "num_processes": accelerator.num_processes,
                    "train_batch_size": self.train_batch_size,
                    "gradient_accumulation_steps": self.accumulation_steps,
                    "steps_per_epoch": self.steps_per_epoch,
                    "ema": self.ema is not None,  # a resume then knows an EMA file is missing, not absent
                }
                with open(os.path.join(temporary, TRAINING_STATE_FILE), "w", encoding="utf-8") as f:
                    json.dump(state, f, indent=2)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                commit_checkpoint(temporary, self.checkpoints_total_limit, self.stale_checkpoints)
                self.stale_checkpoints = []
                logger.info("Saved %s (%s)", final, ", ".join(sorted(os.listdir(final))))
                if self.earlier_export:
                    mark_export_stale(self.output_dir, final)
                    self.earlier_export = False
        except (OSError, RuntimeError) as error:  # torch's writer reports a full disk as a RuntimeError
            full = disk_full_error(error, temporary, self.output_dir)
            if full is None:
                raise
            shutil.rmtree(temporary, ignore_errors=True)
            self.signals.restore()
            raise full from None
        accelerator.wait_for_everyone()
        self.saved_step = self.global_step
        return final

    def load(self, checkpoint: str):
        """Model, optimizer, lr scheduler, grad scaler, RNG (Accelerate), then EMA, step and data position."""
        from accelerate.utils import DistributedType

        state = read_training_state(checkpoint)
        logger.info("Resuming from %s (step %d)", checkpoint, state["global_step"])
        check_checkpoint_files(checkpoint, self.lora_checkpoints)
        random_states = os.path.join(checkpoint, f"random_states_{self.accelerator.process_index}.pkl")
        if os.path.exists(random_states):  # Accelerate skips an unreadable one with an info log: the run would differ
            from accelerate.utils import load

            try:
                load(random_states)  # weights-only, with Accelerate's allowed numpy types
            except Exception as error:  # noqa: BLE001 - any failure means this file cannot restore the RNG
                raise ValueError(
                    f"{random_states} cannot be read weights-only ({type(error).__name__}: {error}); the checkpoint "
                    "is damaged or was not written by this training script."
                ) from None
        self.accelerator.load_state(checkpoint)
        ema_file = self._ema_file() or (EMA_FILE if self.ema is not None else None)
        if ema_file is not None and ema_file != EMA_FILE and state["num_processes"] != self.accelerator.num_processes:
            raise ValueError(
                f"{checkpoint} was written by {state['num_processes']} FSDP processes, one EMA shard each "
                f"(ema-rank<i>.safetensors): resume it with {state['num_processes']} processes, not "
                f"{self.accelerator.num_processes}."
            )
        found = ema_file_in(checkpoint, ema_file) if ema_file is not None else None
        if found is not None:
            self.ema.load_state_dict(load_ema_state(found))
            if self.accelerator.distributed_type == DistributedType.FSDP:
                shard_like(self.ema, self.ema_parameters, found)  # this process's shards become DTensors again
            else:
                self.ema.to(self.ema_device, dtype=torch.float32)
        elif ema_file is not None and state.get("ema"):
            earlier = [path for _, path in list_checkpoints(os.path.dirname(os.path.abspath(checkpoint)))]
            earlier = [path for path in earlier if os.path.abspath(path) != os.path.abspath(checkpoint)]
            raise FileNotFoundError(
                f"{os.path.join(checkpoint, ema_file)} is missing: the run that wrote {checkpoint} trained with an EMA, "
                "and resuming without it would start a different EMA. Restore the file, or resume from an earlier "
                f"checkpoint ({', '.join(earlier) if earlier else 'there is none'})."
            )
        elif ema_file is not None:
            logger.warning("%s has no EMA (trained without it): the EMA starts from its weights.", checkpoint)
            restart_ema(self.ema, self.ema_parameters)
        self.global_step = state["global_step"]
        same = (state["num_processes"], state["train_batch_size"], state["gradient_accumulation_steps"]) == (
            self.accelerator.num_processes,
            self.train_batch_size,
            self.accumulation_steps,
        )
        if not same or state["steps_per_epoch"] != self.steps_per_epoch:
            logger.warning(
                "The batch layout or the dataset changed since %s: the data order does not continue exactly.",
                checkpoint,
            )
        if self.steps_per_epoch is None:
            self.first_epoch, steps_in_epoch = 0, self.global_step
        else:
            self.first_epoch, steps_in_epoch = divmod(self.global_step, self.steps_per_epoch)
        self.resume_batches = steps_in_epoch * self.accumulation_steps

    def finish(self):
        """After the loop: closes the progress bar; after a SIGINT/SIGTERM, says how to resume and exits (no export)."""
        self.progress.close()
        self.accelerator.wait_for_everyone()
        self.report_downscaled_images("during this run")  # if no epoch ended
        self.signals.restore()
        if self.stopped_by is not None:
            name = signal.Signals(self.stopped_by).name
            if self.accelerator.is_main_process:
                checkpoint = os.path.join(self.output_dir, f"{CHECKPOINT_PREFIX}{self.saved_step}")
                logger.warning(
                    "Stopped by %s after step %d; the last checkpoint is %s. Resume with:\n  %s",
                    name,
                    self.global_step,
                    checkpoint,
                    resume_command(),
                )
            unlock_output_dir(self.output_dir)
            raise SystemExit(128 + int(self.stopped_by))
        if self.global_step >= self.max_train_steps and self.accelerator.is_main_process:
            logger.info("Training done at step %d; the last checkpoint holds it.", self.global_step)

    # ---- validation and export
    def validation_images(
        self, pipeline, inputs: list[dict], captions: list[str], final: bool = False, **call_kwargs
    ) -> list[str]:
        """Samples with `pipeline` (EMA weights swapped in) every prompt of `inputs` (the pipeline arguments of each,
        `captions` their names) at each of `validation.sizes`, the processes sharing the images (each seeded by its
        prompt; FSDP needs every process in every call), saves them under `validation/step-<step>/`
        (`validation/final/` for the exported model) and logs them on the main one; returns their paths there."""
        settings = self.validation
        transformer = pipeline.transformer
        transformer.eval()
        pipeline.set_progress_bar_config(disable=True)
        if settings.num_inference_steps is not None:
            call_kwargs["num_inference_steps"] = settings.num_inference_steps
        if settings.guidance_scale is not None:
            call_kwargs["guidance_scale"] = settings.guidance_scale
        sizes = settings.sizes
        with ema_weights(self.ema, self.ema_parameters), self.accelerator.autocast(), torch.no_grad():
            with unsharded_root(self.model):  # after the EMA swap: gathers the EMA values
                images = render_validation(self.accelerator, pipeline, inputs, sizes, self.seed, **call_kwargs)
        transformer.train()
        if not self.accelerator.is_main_process:
            return []
        folder = validation_folder(self.output_dir, self.global_step, final)
        paths = save_validation(images, captions, sizes, folder, settings.resolution)
        log_validation(self.accelerator, images, captions, sizes, self.global_step)
        return paths

    def export_state(self) -> dict[str, torch.Tensor]:
        """The full state of the training module with the EMA weights in place, copied to the CPU of the main process
        (empty on the others). Every process must call it: FSDP gathers the shards."""
        with ema_weights(self.ema, self.ema_parameters):
            return gathered_state(self.accelerator, self.model)

    def export_trained_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The trained parameters of `module`, a part of the training module (the transformer with its LoRA adapters),
        by name, with the EMA weights in place, whole on the CPU of the main process (`gathered_trained_parameters`).
        Every process must call it."""
        with ema_weights(self.ema, self.ema_parameters):
            return gathered_trained_parameters(self.accelerator, module)

    def exported_transformer(self, state: dict[str, torch.Tensor]):
        """A fresh transformer (same config) holding the exported weights: no projector, no PEFT wrappers."""
        return exported_transformer(self.unwrapped.transformer, state)
