"""datprl: DATPRL-IR all-in-one image restoration as a BasicSR plugin."""
from setuptools import find_packages, setup

setup(
    name='datprl',
    version='0.1.0',
    description='Prompt-based multi-domain all-in-one image restoration (DATPRL-IR) for BasicSR',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['datprl_arch', 'datprl_arch.*']),
    python_requires='>=3.9,<3.13',
    install_requires=[
        # basicsr is installed with --no-build-isolation --no-deps (see Makefile); its real runtime needs follow
        'torch', 'torchvision', 'basicsr==1.4.2',
        'numpy', 'scipy', 'opencv-python', 'lmdb', 'pyyaml', 'tqdm', 'requests', 'einops',
        'setuptools',  # basicsr imports distutils, which Python 3.12 only has through setuptools
    ],
    extras_require={
        'demo': ['scikit-image', 'matplotlib', 'pydicom', 'basemap-data'],
        'test': ['pytest', 'safetensors', 'scikit-image', 'matplotlib', 'pydicom', 'basemap-data'],
        'tb': ['tensorboard>=2.21'],
        'safetensors': ['safetensors'],
    },
    entry_points={'console_scripts': [
        'datprl-train=datprl_arch.train:main',
        'datprl-test=datprl_arch.test:main',
    ]},
)
