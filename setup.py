from setuptools import find_packages, setup

setup(
    name="pfgm_diffusers",
    version="0.1.0",
    description="Poisson flow generative models (PFGM and PFGM++) for diffusers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["pfgm_diffusers", "pfgm_diffusers.*"]),
    package_data={"pfgm_diffusers": ["data/*.npz", "data/*.safetensors", "training/configs/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "diffusers>=0.32",
        "accelerate>=1.0",
        "datasets>=3.0",
        "huggingface_hub>=0.26",
        "numpy",
        # scipy: exact Beta/chi-square quantiles for the PFGM++ kernel and the RK45 sampler of the original PFGM
        "scipy",
        "pillow",
        # safetensors: the shipped digit classifier loads without unpickling (diffusers depends on it too)
        "safetensors",
    ],
    extras_require={
        # matplotlib: the tests draw the evidence plots too
        "test": ["pytest", "ruff", "matplotlib"],
        "train": ["tensorboard"],
        "xformers": ["xformers"],
        # FID/KID in pfgm_diffusers.evaluation and scripts/evaluate.py (the digits metrics need nothing extra).
        # torch-fidelity requires torchvision unpinned: install the one built for your torch beside it (torch 2.m pairs
        # with torchvision 0.(m+15): pip install -e ".[eval]" "torchvision==0.28.*" for torch 2.13), or pip replaces
        # the installed torch with the newest build.
        "eval": ["torch-fidelity"],
        "plots": ["matplotlib"],
    },
)
