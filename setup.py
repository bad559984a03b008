"""Install: see README.md. Torch is deliberately unpinned here: the CPU install path pins
it on the command line (a range would pull the CUDA build), GPU images bring their own."""

from setuptools import find_packages, setup

setup(
    name="nemo-aligner-mcore",
    version="0.1.0",
    description="LLM alignment (SFT, reward models, DPO family, PPO, ...) on Megatron-Core",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["nemo_aligner", "nemo_aligner.*"]),
    # The CPU decoding kernels' source, compiled at first use (nemo_aligner/generation/cpu_kernels.py).
    package_data={"nemo_aligner.generation": ["csrc/*.c"]},
    install_requires=[
        "torch>=2.4",
        # The CPU support and checkpoint code touch Megatron-Core internals: pinned minor.
        "megatron-core>=0.16.1,<0.17",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "sentencepiece",
        "jinja2>=3.1.6",  # chat templates (sandboxed); older releases have sandbox escapes
        "tokenizers>=0.19",
        "safetensors",
        "tensorboard",
        "psutil",
        "tqdm",
        "numpy",
        "matplotlib",  # the quickstart pipeline's report plot
    ],
    extras_require={
        "hf": ["transformers>=4.45"],
        "serve": ["nvidia-pytriton"],
        "bench": ["trl", "transformers>=4.45"],
        # The tests check parity with transformers (HF interop, generation, DPO data) and run
        # real PyTriton servers (reward model); PyTriton pins numpy<2.
        "test": ["pytest>=7", "pytest-xdist>=3.5", "transformers>=4.45", "nvidia-pytriton"],
    },
)
