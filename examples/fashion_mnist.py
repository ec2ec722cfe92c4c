"""Fashion-MNIST for the bundled model: an image folder for the training script, and a reference classifier.

    python examples/fashion_mnist.py prepare --output_dir data/fashion-mnist     # 32x32 RGB PNGs in class folders
    python examples/fashion_mnist.py classifier --output models/fashion-mnist-classifier.safetensors

The images come from the Debian package `dataset-fashion-mnist` (MIT; /usr/share/datasets/fashion-mnist/), 28x28
grayscale, padded with black to 32x32 and repeated to three channels. The classifier (a small CNN trained on the 60,000
training images) measures the class accuracy of generated samples in `examples/evaluate.py`.
"""

import argparse
import gzip
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DATA_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def folder_name(label: int) -> str:
    """The class folder: sorted like the class ids, file-system safe (0 -> "00_T-shirt_top")."""
    return f"{label:02d}_{CLASS_NAMES[label].replace('/', '_')}"


def load_split(split: str, data_dir: str = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 32, 32), labels int64 (N,)) of "train" (60,000) or "test" (10,000), padded to 32x32."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz")
    if not os.path.isfile(images_path):
        raise FileNotFoundError(
            f"{images_path} not found: install the Debian package with `apt-get install dataset-fashion-mnist`."
        )
    with gzip.open(images_path) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return np.pad(images, ((0, 0), (2, 2), (2, 2))), labels


def prepare(args):
    from PIL import Image

    for split in ("train", "test"):
        images, labels = load_split(split, args.data_dir)
        for label in range(len(CLASS_NAMES)):
            os.makedirs(os.path.join(args.output_dir, split, folder_name(label)), exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            path = os.path.join(args.output_dir, split, folder_name(label), f"{i:05d}.png")
            Image.fromarray(image).convert("RGB").save(path)
        print(f"{split}: {len(images)} images in {os.path.join(args.output_dir, split)}")


class FashionClassifier(nn.Module):
    """A small CNN on 32x32 images in [-1, 1] (any channel count is averaged to gray)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.head = nn.Linear(128 * 4 * 4, num_classes)
        self.dropout = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(dim=1, keepdim=True)  # (B, 1, 32, 32)
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return self.head(self.dropout(x.flatten(1)))


def load_classifier(path: str) -> FashionClassifier:
    from safetensors.torch import load_file

    model = FashionClassifier()
    model.load_state_dict(load_file(path))
    return model.eval()


def to_model_input(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (N, 32, 32) -> float (N, 1, 32, 32) in [-1, 1], the pixel range of the generator."""
    return torch.from_numpy(images_uint8).float().div(127.5).sub(1).unsqueeze(1)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([model(images[i : i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    return (predict(model, images, batch_size) == labels).float().mean().item()


def train_classifier(args):
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    train_x, train_y = load_split("train", args.data_dir)
    test_x, test_y = load_split("test", args.data_dir)
    train_x, train_y = to_model_input(train_x), torch.from_numpy(train_y)
    test_x, test_y = to_model_input(test_x), torch.from_numpy(test_y)
    model = FashionClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = args.epochs * (len(train_x) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x))
        for i in range(len(train_x) // args.batch_size):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x = train_x[idx]
            x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x, x.flip(-1))  # horizontal flips
            loss = F.cross_entropy(model(x), train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {accuracy(model, test_x, test_y):.4f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.output)
    print(f"Wrote {args.output}")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="Write train/ and test/ image folders (class subfolders, 32x32 RGB PNG).")
    p.add_argument("--output_dir", default="data/fashion-mnist")
    p.add_argument("--data_dir", default=DATA_DIR)
    c = sub.add_parser("classifier", help="Train the reference classifier on the training set.")
    c.add_argument("--output", default="models/fashion-mnist-classifier.safetensors")
    c.add_argument("--data_dir", default=DATA_DIR)
    c.add_argument("--epochs", type=int, default=6)
    c.add_argument("--batch_size", type=int, default=128)
    c.add_argument("--seed", type=int, default=0)
    return parser.parse_args(input_args)


def main(args):
    prepare(args) if args.command == "prepare" else train_classifier(args)


if __name__ == "__main__":
    main(parse_args())
