"""``python -m medsec_edge.runtime.cli``: the same as the ``medsec-edge`` script."""

from medsec_edge.runtime.cli.root import main

main()
