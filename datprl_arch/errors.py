"""The base of this package's own errors: bad input whose message names the file, key or value and what to change.

``DataSourceError`` (data), ``CheckpointError`` (checkpoints and training states), ``OptionFileError`` (option
files) and the tools' errors derive from :class:`DatprlError` as well as from their built-in type (``ValueError``,
``RuntimeError``), so ``except ValueError`` keeps working. The runners (``python -m datprl_arch.train`` / ``test``)
print a ``DatprlError`` as one message without a traceback; ``--debug`` shows the traceback.
"""


class DatprlError(Exception):
    """An error in what the user gave (data, checkpoint, option file); its message says what to change."""


class MissingFileError(DatprlError, FileNotFoundError):
    """A file that an option names does not exist (also a ``FileNotFoundError``)."""


class NetworkOptionError(DatprlError, ValueError):
    """A network's options do not fit it: a backbone module name, tap, pool size... (also a ``ValueError``)."""
