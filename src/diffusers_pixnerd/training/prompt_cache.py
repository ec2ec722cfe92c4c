# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Text embeddings computed once (`--precompute_text_embeddings`): every distinct caption is encoded by the frozen
Qwen3 before training, each process encoding its share, into Arrow files that every process then memory-maps. The
training step looks its captions up, so the encoder can leave the accelerator, and the data pipeline is unchanged
(map-style, streamed or bucketed data alike)."""

import hashlib
import json
import os
from typing import Callable, Iterable

import numpy as np
import torch

FLOAT16_MAX = float(torch.finfo(torch.float16).max)


def prompt_cache_folder(root: str, key, captions: list[str]) -> str:
    """`root/prompt_embeds_<digest>`: the digest covers `key` (encoder, its config, the text length) and the captions,
    so another encoder or another caption set never reads a stale cache."""
    digest = hashlib.sha256(json.dumps([key, captions], default=str).encode()).hexdigest()[:16]
    return os.path.join(root, f"prompt_embeds_{digest}")


class PromptEmbeddingCache:
    r"""
    Prompt embeddings (float16, exact for a bfloat16 encoder's finite outputs) of a fixed set of captions, read from
    memory-mapped Arrow files. Build it with `PromptEmbeddingCache.build`; `lookup(captions)` gives `(B, L, D)`.
    """

    def __init__(self, table, captions: list[str]):
        self.table = table
        self.index = {caption: row for row, caption in enumerate(captions)}

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, captions: list[str]) -> torch.Tensor:
        """The embeddings of `captions` (float16, on the CPU)."""
        try:
            rows = [self.index[caption] for caption in captions]
        except KeyError as error:
            raise KeyError(
                f"Caption {error.args[0]!r} was not precomputed: the data changed after the cache was built."
            ) from None
        # Stored as float16; `datasets` hands nested lists back as float32, so the cast is exact.
        return torch.from_numpy(np.asarray(self.table[rows]["prompt_embeds"], dtype=np.float16))

    @classmethod
    def build(
        cls,
        accelerator,
        captions: Iterable[str],
        encode: Callable[[list[str]], torch.Tensor],
        folder: str,
        batch_size: int = 32,
    ) -> "PromptEmbeddingCache":
        """Encodes the distinct `captions` into `folder`, each process its share (`encode_share`), then every
        process opens all the shards (`open`)."""
        unique = sorted(set(captions))
        encode_share(unique, encode, folder, accelerator.process_index, accelerator.num_processes, batch_size)
        accelerator.wait_for_everyone()
        return cls.open(unique, folder, accelerator.num_processes)

    @classmethod
    def open(cls, unique: list[str], folder: str, world: int) -> "PromptEmbeddingCache":
        """The cache of the sorted distinct captions `unique`, from the `world` shards in `folder`."""
        import datasets

        paths = [shard_path(folder, i, world) for i in range(world)]
        shards = [datasets.Dataset.from_file(p) for p in paths if os.path.exists(p)]
        order = [caption for i in range(world) for caption in unique[i::world]]  # the rows' captions, shard by shard
        rows = sum(len(shard) for shard in shards)
        if rows != len(order):
            raise ValueError(f"The prompt cache {folder} holds {rows} rows for {len(order)} captions: delete it.")
        table = datasets.concatenate_datasets(shards).with_format("numpy", columns=["prompt_embeds"])
        return cls(table, order)


def shard_path(folder: str, rank: int, world: int) -> str:
    return os.path.join(folder, f"shard-{rank}-of-{world}.arrow")


def encode_share(
    unique: list[str],
    encode: Callable[[list[str]], torch.Tensor],
    folder: str,
    rank: int,
    world: int,
    batch_size: int = 32,
):
    """Process `rank` of `world` encodes every `world`-th of the sorted distinct captions `unique` into its shard,
    written to a temporary file and renamed by `datasets` (a killed run leaves no half file); a shard already there
    is reused."""
    import datasets

    share = unique[rank::world]
    path = shard_path(folder, rank, world)
    if not share or os.path.exists(path):
        return
    os.makedirs(folder, exist_ok=True)
    datasets.Dataset.from_dict({"caption": share}).map(
        lambda rows: {"prompt_embeds": _to_float16(encode(rows["caption"]))},
        batched=True,
        batch_size=batch_size,
        remove_columns=["caption"],
        cache_file_name=path,
        desc=f"Encoding prompts (process {rank} of {world})",
    )


def _to_float16(embeds: torch.Tensor) -> np.ndarray:
    embeds = embeds.float()
    if not torch.isfinite(embeds).all() or embeds.abs().max() > FLOAT16_MAX:
        raise ValueError("Prompt embeddings beyond the float16 range: train without `--precompute_text_embeddings`.")
    return embeds.half().cpu().numpy()


def stream_captions(dataset) -> Iterable[str]:
    """The captions of a dataset: a column of a map-style one, one pass over a streamed one (captions only)."""
    if hasattr(dataset, "__len__"):
        return dataset["caption"]
    return (row["caption"] for row in dataset.select_columns(["caption"]))
