"""GuideGen as MONAI bundles: text prompt -> paired full-torso anatomy mask and CT volume.

The package is organised by concern:

- :mod:`custom_components.data` -- NIfTI I/O, class maps, clinical records and prompts, dataset preparation
  (``guidegen prepare``) and the procedural demo data set (``guidegen demo-data``).
- :mod:`custom_components.cli` -- the ``guidegen`` command line.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("guidegen")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0.0.0+unknown"
