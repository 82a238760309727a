"""AutoWISP: raw DSLR night-sky frames to calibrated light curves.

``autowisp.core`` holds the pure numerics (no database, queue or file paths);
``autowisp.simulate`` makes synthetic nights with ground truth.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("autowisp")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
