"""Where the command line's logs go: a rich handler on stderr, and nothing from pydicom that
could quote patient data.

Layer: runtime (cli).
"""

from __future__ import annotations

import logging

from medsec_edge.runtime.cli.output import stderr


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(console=stderr(), show_path=False, show_time=False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler], force=True)
    # pydicom's own messages can quote element values (patient data): keep them out of logs.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
