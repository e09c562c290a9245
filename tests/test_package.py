"""The package version: one definition, read by setup.py without importing torch."""
import os
import subprocess
import sys

import datprl_arch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: setup.py --version, reporting whether reading the version imported torch.
SETUP_VERSION = ("import runpy, sys; sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py'); "
                 "sys.stderr.write('torch imported' if 'torch' in sys.modules else '')")


def test_one_version_for_the_package_and_setup_py():
    done = subprocess.run([sys.executable, '-c', SETUP_VERSION], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == datprl_arch.__version__
    assert 'torch imported' not in done.stderr
