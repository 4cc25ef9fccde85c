"""divgen: a decoding engine for diverse generation (CorrSynth, CFG, FewGen, SPA).

The top-level folders are installed as one namespace (see DESIGN.md, "Layout"):
engine/ -> divgen.engine, kernels/ -> divgen.kernels, bindings/ -> divgen.bindings.
"""
from setuptools import setup

setup(
    name="divgen",
    version="0.1.0",
    description="Fast decoding for diverse generation: CorrSynth, CFG, FewGen and SPA multi-LoRA",
    python_requires=">=3.10",
    packages=["divgen", "divgen.engine", "divgen.engine.spa", "divgen.kernels", "divgen.bindings"],
    package_dir={
        "divgen": "divgen",
        "divgen.engine": "engine",
        "divgen.engine.spa": "engine/spa",
        "divgen.kernels": "kernels",
        "divgen.bindings": "bindings",
    },
    package_data={"divgen.engine": ["tasks/*.yaml"], "divgen.engine.spa": ["data/*.jsonl"]},
    # torch is deliberately a range: the Makefile installs the CPU build first on machines
    # without CUDA, and a satisfied range installs nothing more.
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56",
        "safetensors>=0.4",
        "numpy>=1.24",
        "gguf>=0.10",
        "accelerate>=0.30",
        "tqdm>=4.60",
        "pyyaml>=6.0",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "dev": ["pytest>=8", "pytest-benchmark>=4", "peft>=0.12"],
    },
    entry_points={"console_scripts": ["divgen=divgen.bindings.cli:main"]},
)
