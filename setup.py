from setuptools import find_packages, setup

setup(
    name="peft-steer",
    version="0.1.0",
    description="BiPO steering vectors as a native PEFT adapter type, trained with a TRL trainer.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["peft_steer", "peft_steer.*", "trl_integration", "trl_integration.*"]),
    include_package_data=True,
    package_data={
        "peft_steer": [
            "data/*.csv",
            "data/behaviors/*/*.csv",
            "data/behaviors/LICENSE",
            "data/behaviors/README.md",
            "organism/model/*",
        ],
        "trl_integration": ["demo_vectors/*.yaml", "demo_vectors/*/*"],
    },
    # Lower bounds are the versions this was tested with. transformers: tested on 5.23 and 5.24 (5.0 fails 16
    # tests); tests/peft_steer/adapter/test_generation.py checks what `generate` feeds the model, so a release that
    # changes it fails CI before it reaches users. 6.0 drops generation arguments that 5.x only deprecates.
    install_requires=[
        "torch>=2.4",
        "transformers>=5.23,<6",
        "peft>=0.21",
        "trl>=1.16",
        "accelerate>=1.15",
        "datasets>=5.0",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "huggingface_hub>=1.0",
        "pyyaml>=6.0",  # peft-steer train --config
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.6", "openai>=3.0"],  # openai: the vLLM server tests' client
        "plotting": ["matplotlib>=3.8"],
        "bitsandbytes": ["bitsandbytes>=0.45"],
        "gguf": ["gguf>=0.10"],
        "deepspeed": ["deepspeed>=0.19"],
        # llama.cpp itself, to run exported control vectors in it (a source build: 10-25 minutes on 2 cores).
        "llama-cpp": ["llama-cpp-python>=0.3.36"],
        # repeng's own dependencies but numpy<2, which it declares and does not need: install repeng itself with
        # `pip install --no-deps repeng==0.4.0` (docs/interop.md).
        "repeng": ["scikit-learn>=1.4", "tqdm>=4.66"],
        # lm-evaluation-harness, to evaluate a steered model on its tasks (docs/harness.md)
        "lm-eval": ["lm_eval[hf]>=0.4.13"],
    },
    entry_points={"console_scripts": ["peft-steer=trl_integration.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
