"""ctm-jax: the Continuous Thought Machine in JAX/Flax."""

import pathlib
import re

import setuptools

_HERE = pathlib.Path(__file__).parent
_VERSION = re.search(
    r"^__version__ = '([^']+)'", (_HERE / 'ctm_jax' / '__init__.py').read_text(), re.M
).group(1)

# Bounds: the upper ones where a minor release has changed an API we use
# (everything pre-1.0 moves fast); constraints.txt pins what CI tested.
_CORE = [
    'jax>=0.10,<0.11',
    'flax>=0.12,<0.13',
    'optax>=0.2.4,<0.3',
    'orbax-checkpoint>=0.12,<0.13',
    'chex>=0.1.90,<0.2',
    'ml_collections>=1.0,<2',
    'absl-py>=2.0,<3',
    'numpy>=2.0,<3',
    'grain>=0.2.12,<0.3',
    'pillow>=10,<14',
    'tensorboardX>=2.6,<3',
    'matplotlib>=3.8,<4',
    'tqdm>=4.60,<5',
    # Run paths as one Path, local or a bucket (orbax's and tfds' abstraction).
    'etils[epath]>=1.7,<2',
    # jax.export serialisation (ctm-export).
    'flatbuffers>=24.3,<26',
    # configs/digits.py and Q&A-MNIST `small`: scikit-learn's bundled digits, no download.
    'scikit-learn>=1.3,<2',
]
_EXTRAS = {
    # RL: environments in JAX (CartPole/Acrobot, MiniGrid FourRooms) and PPO pieces.
    'rl': ['gymnax>=1.0,<1.1', 'xminigrid>=0.9,<0.10', 'rlax>=0.1.6,<0.2'],
    # CIFAR, ImageNet, MNIST prepared as array_record (TensorFlow is needed only to build them);
    # array_record reads gs:// from 0.8.3.
    'tfds': ['tensorflow-datasets>=4.9.4,<5', 'importlib_resources>=6', 'array_record>=0.8.3'],
    # Reading the reference's .pt checkpoints; ctm_jax.tools.make_goldens.
    'torch': ['torch>=2.1,<3'],
    # The Hugging Face Hub: hf:// models (safetensors read into numpy, no torch) and datasets (parquet).
    'hub': ['huggingface-hub>=0.34,<3', 'safetensors>=0.4,<1', 'pyarrow>=14,<28'],
    # gs:// workdirs and data: gcsfs for files, google-cloud-storage for the workdir lock.
    'gcs': ['gcsfs>=2024.2,<2028', 'google-cloud-storage>=2.14,<4'],
    # Running notebooks/ outside Colab (`jupyter execute`), as the slow tests do.
    'notebooks': ['ipykernel>=6,<8', 'nbclient>=0.10,<0.12', 'nbformat>=5.9,<6'],
    # python -m ctm_jax.serve: an ASGI app (Starlette) under uvicorn, which parses HTTP with httptools
    # (C) when it is installed, not its pure-Python h11; httpx for the tests' clients.
    'serve': ['starlette>=0.40,<2', 'uvicorn>=0.30,<1', 'httptools>=0.6,<1', 'httpx>=0.27,<1'],
    # The page's browser test drives Debian's chromium (.ci/run installs it) with Playwright.
    'browser': ['playwright>=1.40,<2'],
}
# The default suite covers RL, the tfds pipeline and the Hub; gymnasium's MiniGrid is
# what our FourRooms is checked against.
_EXTRAS['test'] = [
    'pytest>=8,<10', 'pytest-xdist>=3.5,<4', 'minigrid>=2.3,<4', 'gymnasium>=1.0,<2',
    *_EXTRAS['rl'], *_EXTRAS['tfds'], *_EXTRAS['hub'], *_EXTRAS['gcs'], *_EXTRAS['serve'],
    # A GCS emulator on 127.0.0.1 for the gs:// tests (no credentials, no network).
    'gcp-storage-emulator>=2024.8,<2028',
]
_EXTRAS['all'] = sorted({req for reqs in _EXTRAS.values() for req in reqs})

setuptools.setup(
    name='ctm-jax',
    version=_VERSION,
    description='The Continuous Thought Machine (Sakana AI, arXiv 2505.05522) in JAX/Flax: '
    'reference-faithful, sharded, resumable.',
    long_description=(_HERE / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    license_files=['LICENSE'],
    url='https://github.com/ctm-jax/ctm-jax',
    project_urls={
        'Documentation': 'https://github.com/ctm-jax/ctm-jax/tree/main/docs',
        'Source': 'https://github.com/ctm-jax/ctm-jax',
        'Issues': 'https://github.com/ctm-jax/ctm-jax/issues',
        'Paper': 'https://arxiv.org/abs/2505.05522',
        'Reference implementation': 'https://github.com/SakanaAI/continuous-thought-machines',
    },
    keywords=[
        'continuous thought machine', 'ctm', 'jax', 'flax', 'neural synchronisation',
        'adaptive computation', 'deep learning', 'tpu',
    ],
    classifiers=[
        'Development Status :: 4 - Beta',
        'Intended Audience :: Science/Research',
        'Operating System :: POSIX :: Linux',
        'Operating System :: MacOS',
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3 :: Only',
        'Programming Language :: Python :: 3.11',
        'Programming Language :: Python :: 3.12',
        'Programming Language :: Python :: 3.13',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
        'Typing :: Typed',
    ],
    # configs/ installs as ctm_jax.configs, so config files import their bases
    # (`from ctm_jax.configs import common`) from any working directory.
    packages=setuptools.find_packages(include=['ctm_jax', 'ctm_jax.*']) + ['ctm_jax.configs'],
    package_dir={'ctm_jax.configs': 'configs'},
    package_data={'ctm_jax': ['py.typed', 'page/*.html', 'page/*.js', 'page/*.css']},
    # jax 0.10 needs 3.11.
    python_requires='>=3.11',
    install_requires=_CORE,
    extras_require=_EXTRAS,
    entry_points={
        'console_scripts': [
            'ctm-train=ctm_jax.main:run',
            'ctm-evaluate=ctm_jax.evaluate:run',
            'ctm-predict=ctm_jax.predict:run',
            'ctm-export=ctm_jax.export:run',
            'ctm-import=ctm_jax.interop.torch:run',
            'ctm-serve=ctm_jax.serve:run',
        ],
    },
)
