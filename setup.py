import re

from setuptools import find_packages, setup

# The one version string lives in the package.
with open("src/diffusers_pixnerd/__init__.py", encoding="utf-8") as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)

setup(
    name="diffusers-pixnerd",
    version=VERSION,
    description="PixNerd (Pixel Neural Field Diffusion) for HuggingFace Diffusers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"diffusers_pixnerd": ["pipelines/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.40",  # `dtype=` in from_pretrained (0.40), apply_lora_scale (0.37)
        "transformers>=4.56",  # `dtype=` in from_pretrained
        "accelerate>=1.1",  # 1.1 reads checkpoints with weights_only=True
        "safetensors>=0.4",
        "huggingface-hub>=0.34",
        "numpy",
        "Pillow",
    ],
    extras_require={
        "training": ["datasets>=3.0", "peft>=0.17", "tensorboard"],
        # `--optimizer adamw8bit | adamw4bit | adamw_bf16 | prodigy` and `--quantize_text_encoder` (docs/training.md)
        "optimizers": ["bitsandbytes>=0.48", "prodigyopt>=1.1", "torchao>=0.12"],
        "test": ["pytest>=8", "peft>=0.17", "datasets>=3.0", "tensorboard", "bitsandbytes>=0.48", "prodigyopt>=1.1"],
        "quantization": ["torchao>=0.12"],  # quantization_config loading (tests: `make test` installs it)
        "demo": ["gradio>=5", "peft>=0.17"],  # the web demo; LoRA loading (the demo's LoRA grids)
    },
    entry_points={"console_scripts": ["pixnerd-convert=diffusers_pixnerd.convert:main"]},
)
