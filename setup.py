"""ctm-jax: the Continuous Thought Machine in JAX/Flax."""

import setuptools

setuptools.setup(
    name="ctm-jax",
    version="0.1.0",
    description="Continuous Thought Machine (arXiv 2505.05522) in JAX/Flax.",
    # configs/ installs as ctm_jax.configs, so config files import their bases
    # (`from ctm_jax.configs import common`) from any working directory.
    packages=setuptools.find_packages(include=["ctm_jax", "ctm_jax.*"]) + ["ctm_jax.configs"],
    package_dir={"ctm_jax.configs": "configs"},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax",
        "orbax-checkpoint",
        "chex",
        "ml_collections",
        "absl-py",
        "numpy",
        "grain",
        # Reads prepared CIFAR / ImageNet (array_record); TensorFlow is not needed.
        "tensorflow-datasets",
        "importlib_resources",
        "pillow",
        "tensorboardX",
        "matplotlib",
        "tqdm",
        # jax.export serialisation (python -m ctm_jax.export).
        "flatbuffers",
        # RL: environments in JAX (CartPole/Acrobot, MiniGrid FourRooms) and PPO pieces.
        "gymnax",
        "xminigrid",
        "rlax",
    ],
    extras_require={
        # nbclient/ipykernel/nbformat: the tests execute notebooks/.
        # gymnasium (with gymnax) and minigrid: the RL environments are checked against them.
        "test": ["pytest", "pytest-xdist", "scikit-learn", "nbclient", "nbformat", "ipykernel", "minigrid"],
        # configs/digits.py: scikit-learn's bundled 8x8 digits, no download.
        "digits": ["scikit-learn"],
        # Reading the reference's .pt checkpoints.
        "torch": ["torch>=2.1"],
    },
)
