"""datprl: DATPRL-IR all-in-one image restoration as a BasicSR plugin.

Install with the Makefile recipe (``make install``): basicsr 1.4.2 must be built without build isolation, and its
metadata would pull tb-nightly, so both basicsr and this package are installed with ``--no-deps`` after the files in
``requirements/``.
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def version():
    """``__version__`` of ``datprl_arch/version.py``, read without importing the package (it needs torch)."""
    namespace = {}
    with open(os.path.join(HERE, 'datprl_arch', 'version.py'), encoding='utf-8') as f:
        exec(f.read(), namespace)
    return namespace['__version__']


def requirements(name):
    """Requirement lines of ``requirements/<name>.txt`` (comments dropped, ``-r other.txt`` followed)."""
    lines = []
    with open(os.path.join(HERE, 'requirements', f'{name}.txt'), encoding='utf-8') as f:
        for line in f:
            line = line.split('#', 1)[0].strip()
            if line.startswith('-r '):
                lines += requirements(line[3:].strip()[:-len('.txt')])
            elif line:
                lines.append(line)
    return lines


setup(
    name='datprl',
    version=version(),
    description='Prompt-based multi-domain all-in-one image restoration (DATPRL-IR) for BasicSR',
    long_description=open(os.path.join(HERE, 'README.md'), encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    packages=find_packages(include=['datprl_arch', 'datprl_arch.*']),
    # the shipped release model (datprl_arch/weights/), so a wheel install restores images with no training
    package_data={'datprl_arch.weights': ['*.safetensors']},
    python_requires='>=3.9,<3.13',
    install_requires=['basicsr==1.4.2'] + requirements('runtime'),
    extras_require={
        'demo': requirements('demo'),
        'test': requirements('test'),
        'tb': requirements('tb'),
    },
    entry_points={'console_scripts': [
        'datprl-train=datprl_arch.train:main',
        'datprl-test=datprl_arch.test:main',
        'datprl-restore=datprl_arch.restore:main',
        'datprl-benchmark=datprl_arch.benchmark:main',
    ]},
)
