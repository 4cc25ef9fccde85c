"""divgen: a decoding engine for diverse generation (CorrSynth, CFG, FewGen, SPA).

The top-level folders are installed as one namespace (see DESIGN.md, "Layout"):
engine/ -> divgen.engine, kernels/ -> divgen.kernels, bindings/ -> divgen.bindings.
"""
import os

from setuptools import setup

# Top-level folder -> package name (DESIGN.md, "Layout"). Every folder below them that holds an
# __init__.py is a subpackage, found here so that a new subpackage needs no edit of this file.
ROOTS = {"divgen": "divgen", "engine": "divgen.engine", "kernels": "divgen.kernels", "bindings": "divgen.bindings",
         "benchmarks": "divgen.benchmarks"}   # benchmarks/ ships for `divgen bench`, files kept in place


def package_dirs() -> dict[str, str]:
    found = {}
    for folder, name in ROOTS.items():
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, folder)
                found[name if rel == "." else name + "." + rel.replace(os.sep, ".")] = dirpath
    return found


PACKAGE_DIRS = package_dirs()

setup(
    name="divgen",
    version="0.1.0",
    description="Fast decoding for diverse generation: CorrSynth, CFG, FewGen and SPA multi-LoRA",
    python_requires=">=3.10",
    packages=sorted(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    package_data={"divgen.engine": ["tasks/*.yaml"], "divgen.engine.spa": ["data/*.jsonl"]},
    # torch is deliberately a range: the Makefile installs the CPU build first on machines
    # without CUDA, and a satisfied range installs nothing more.
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56,<6",  # 4.56: dtype= in from_pretrained; `make test-transformers-min`
        "safetensors>=0.4",
        "numpy>=1.24",
        "gguf>=0.10",
        "accelerate>=0.30",
        "tqdm>=4.60",
        "pyyaml>=6.0",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "dev": ["pytest>=8", "pytest-benchmark>=4", "peft>=0.12", "datasets>=3"],
        "plot": ["matplotlib>=3.5"],          # divgen bench --plot, divgen spa run and experiments/sweep.py PNGs
        "datasets": ["datasets>=3"],          # divgen export
        "ray": ["ray[data]>=2.60,<3"],        # divgen synth --ray
    },
    entry_points={"console_scripts": ["divgen=divgen.bindings.cli:main"]},
)
