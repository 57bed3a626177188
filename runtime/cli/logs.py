"""Where the command line's logs go: a rich handler on stderr, and nothing from pydicom that
could quote patient data.

Layer: runtime (cli).
"""

from __future__ import annotations

import logging
import warnings

from medsec_edge.runtime.cli.output import stderr


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(console=stderr(), show_path=False, show_time=False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler], force=True)
    quiet_pydicom()


def quiet_pydicom() -> None:
    """Keep pydicom's records and warnings off stderr, even with --verbose: they quote element
    values (patient data), and its decoders log errors with tracebacks.

    A level on the ``pydicom`` logger does not stop its children (``pydicom.pixels...``) from
    passing ERROR records to the root handler, so the tree stops propagating at ``pydicom`` (its
    own NullHandler still receives them). Its warnings (one per invalid element, quoting the
    value) are ignored by module; our readers capture them during a read and act on the ones
    that mean truncation.
    """
    pydicom_logger = logging.getLogger("pydicom")
    pydicom_logger.propagate = False
    pydicom_logger.setLevel(logging.CRITICAL)
    # tifffile's warnings quote tag values of the file (an ImageDescription can hold anything).
    tifffile_logger = logging.getLogger("tifffile")
    tifffile_logger.propagate = False
    if not tifffile_logger.handlers:  # else logging.lastResort would print its records anyway
        tifffile_logger.addHandler(logging.NullHandler())
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
