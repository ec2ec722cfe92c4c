"""training/prompt_cache.py: prompt embeddings precomputed once, in shards, and looked up; the captions of a streamed
dataset; a run with a streamed dataset and precomputed embeddings."""

import json
import os

import pytest
import torch

from diffusers_pixnerd.training import PromptEmbeddingCache, stream_captions
from diffusers_pixnerd.training.prompt_cache import encode_share

from ..helpers import T2I_SCRIPT, t2i_args


def fake_encoder(calls):
    def encode(prompts):
        calls.extend(prompts)
        return torch.stack([torch.full((3, 2), float(len(p))) + torch.arange(2.0) for p in prompts])

    return encode


def test_prompt_embeddings_are_encoded_once_in_shards_and_looked_up(tmp_path):
    captions = ["a cat", "a dog", "a cat", "two red birds", "a fish", "a dog"]
    unique = sorted(set(captions))
    calls = {0: [], 1: []}
    for rank in (0, 1):  # two processes, each its share
        encode_share(unique, fake_encoder(calls[rank]), str(tmp_path), rank, 2, batch_size=2)
    assert calls == {0: unique[0::2], 1: unique[1::2]}
    cache = PromptEmbeddingCache.open(unique, str(tmp_path), 2)
    embeds = cache.lookup(["two red birds", "a cat"])
    assert embeds.dtype == torch.float16 and embeds.shape == (2, 3, 2)
    assert torch.equal(embeds[0, :, 1], torch.full((3,), 14.0)) and torch.equal(embeds[1, 0], torch.tensor([5.0, 6.0]))
    again = []
    encode_share(unique, fake_encoder(again), str(tmp_path), 0, 2)
    assert again == []  # a shard already there is reused
    with pytest.raises(KeyError, match="'a horse' was not precomputed"):
        cache.lookup(["a horse"])
    with pytest.raises(ValueError, match="holds 2 rows for 4 captions: delete it"):
        os.remove(tmp_path / "shard-1-of-2.arrow")
        PromptEmbeddingCache.open(unique, str(tmp_path), 2)


def test_captions_of_a_streamed_dataset_are_read_in_one_pass():
    import datasets

    rows = {"caption": ["a", "b", "a"], "image": [1, 2, 3]}
    assert list(stream_captions(datasets.Dataset.from_dict(rows))) == ["a", "b", "a"]
    assert list(stream_captions(datasets.Dataset.from_dict(rows).to_iterable_dataset())) == ["a", "b", "a"]


def test_precomputed_embeddings_work_with_a_streamed_dataset(assets, tmp_path, run_main):
    out = tmp_path / "stream"
    args = t2i_args(assets, "captions_jsonl", out, "--max_train_steps", 2, "--no_use_repa", "--use_lora")
    run_main(T2I_SCRIPT, [*args, "--lora_rank", 2, "--streaming", "--precompute_text_embeddings"])
    folders = [f for f in os.listdir(out / "cache") if f.startswith("prompt_embeds_")]
    assert len(folders) == 1 and os.listdir(out / "cache" / folders[0]) == ["shard-0-of-1.arrow"]
    assert json.loads((out / "checkpoint-2" / "training_state.json").read_text())["global_step"] == 2
