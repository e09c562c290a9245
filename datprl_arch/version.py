"""The package version, in one place: ``datprl_arch.__version__`` imports it and setup.py reads this file without
importing the package (which needs torch and basicsr)."""
__version__ = '0.1.0'
