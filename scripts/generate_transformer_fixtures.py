"""Writes the transformer parity fixtures in tests/fixtures/ from the official PixNerd code.

    python scripts/generate_transformer_fixtures.py --official_repo /path/to/MCG-NJU/PixNerd

It builds tiny official models (class-conditional `pixnerd_c2i.py`, text-to-image `pixnerd_t2i_heavydecoder.py`),
fills every weight with random values (also those the official init zeroes), saves them as official-format
Lightning checkpoints (`denoiser.*`, `ema_denoiser.*`, a REPA projector under `diffusion_trainer.proj.*`) and
records the official outputs of the EMA (and once the online) weights for fixed inputs. The official code is only
imported from the given checkout; nothing of it is committed.
"""

import argparse
import math
import os
import sys

import torch
from safetensors.torch import save_file

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")

# Tiny official configurations (constructor arguments of the official classes).
C2I_KWARGS = dict(
    in_channels=3,
    num_groups=2,
    hidden_size=32,
    hidden_size_x=8,
    nerf_mlpratio=2,
    num_blocks=4,
    num_cond_blocks=2,
    patch_size=4,
    num_classes=10,
)
T2I_KWARGS = dict(
    in_channels=3,
    num_groups=2,
    hidden_size=32,
    decoder_hidden_size=8,
    num_encoder_blocks=2,
    num_decoder_blocks=2,
    num_text_blocks=1,
    patch_size=4,
    txt_embed_dim=24,
    txt_max_length=6,
)
T2I_SAMPLE_SIZE = 16  # the trained resolution the any-resolution path scales from (512 for the real model)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int):
    """Every parameter random: weights ~ U(+-1/sqrt(fan_in)), biases and tables ~ N(0, 0.1^2), norms ~ 1 + N."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "norm" in name:
            p.copy_(1 + 0.1 * noise)
        elif p.ndim == 2 and "embedding_table" not in name:
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) / math.sqrt(p.shape[1]))
        else:
            p.copy_(0.1 * noise if "pos_embedding" not in name else 0.5 * noise)


def projector(hidden: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "0.weight": (hidden, hidden),
        "0.bias": (hidden,),
        "2.weight": (hidden, hidden),
        "2.bias": (hidden,),
        "4.weight": (16, hidden),
        "4.bias": (16,),
    }
    return {f"diffusion_trainer.proj.{k}": torch.randn(s, generator=gen) * 0.1 for k, s in shapes.items()}


def lightning_checkpoint(online, ema, hidden: int) -> dict:
    state_dict = {f"denoiser.{k}": v.clone() for k, v in online.state_dict().items()}
    state_dict.update({f"ema_denoiser.{k}": v.clone() for k, v in ema.state_dict().items()})
    state_dict.update(projector(hidden, seed=7))
    return {
        "epoch": 0,
        "global_step": 1000,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state_dict,
        "loops": {},
        "optimizer_states": [],
        "lr_schedulers": [],
    }


@torch.no_grad()
def main(args):
    sys.path.insert(0, os.path.abspath(args.official_repo))
    from src.models.transformer.pixnerd_c2i import PixNerDiT as OfficialC2I
    from src.models.transformer.pixnerd_t2i_heavydecoder import PixNerDiT as OfficialT2I

    os.makedirs(FIXTURES, exist_ok=True)
    gen = torch.Generator().manual_seed(0)

    # Class-conditional.
    online, ema = OfficialC2I(**C2I_KWARGS), OfficialC2I(**C2I_KWARGS)
    randomize(online, seed=1)
    randomize(ema, seed=2)
    torch.save(lightning_checkpoint(online, ema, 32), os.path.join(FIXTURES, "official_c2i_tiny.ckpt"))
    tensors = {}
    t = torch.tensor([0.125, 0.875])
    y = torch.tensor([3, 10])  # 10 = the null class
    for name, (h, w) in {"square": (16, 16), "nonsquare": (8, 20)}.items():
        x = torch.randn(2, 3, h, w, generator=gen)
        tensors[f"{name}.x"], tensors[f"{name}.t"], tensors[f"{name}.y"] = x, t.clone(), y.clone()
        tensors[f"{name}.out"] = ema(x, t, y)
    tensors["online.out"] = online(tensors["square.x"], t, y)
    save_file(tensors, os.path.join(FIXTURES, "official_c2i_tiny_outputs.safetensors"))

    # Text-to-image (heavy decoder, any resolution as in the official app.py).
    online, ema = OfficialT2I(**T2I_KWARGS), OfficialT2I(**T2I_KWARGS)
    randomize(online, seed=3)
    randomize(ema, seed=4)
    torch.save(lightning_checkpoint(online, ema, 32), os.path.join(FIXTURES, "official_t2i_tiny.ckpt"))
    tensors = {}
    t = torch.tensor([0.25, 0.5])
    sizes = {"native": (16, 16), "larger": (32, 32), "nonsquare": (24, 40), "smaller": (8, 12)}
    for name, (h, w) in sizes.items():
        x = torch.randn(2, 3, h, w, generator=gen)
        text = torch.randn(2, T2I_KWARGS["txt_max_length"], T2I_KWARGS["txt_embed_dim"], generator=gen)
        ema.decoder_patch_scaling_h = h / T2I_SAMPLE_SIZE
        ema.decoder_patch_scaling_w = w / T2I_SAMPLE_SIZE
        tensors[f"{name}.x"], tensors[f"{name}.t"], tensors[f"{name}.text"] = x, t.clone(), text
        tensors[f"{name}.out"] = ema(x, t, text)
    online.decoder_patch_scaling_h = online.decoder_patch_scaling_w = 1.0
    tensors["online.out"] = online(tensors["native.x"], t, tensors["native.text"])
    save_file(tensors, os.path.join(FIXTURES, "official_t2i_tiny_outputs.safetensors"))
    print(f"Wrote fixtures to {os.path.abspath(FIXTURES)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official_repo", required=True, help="A checkout of github MCG-NJU/PixNerd (not committed).")
    main(parser.parse_args())
