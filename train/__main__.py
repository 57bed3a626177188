"""`python -m medsec_edge.train` runs the watermark recipe (the CLI's `train watermark` calls the same)."""

from medsec_edge.train.cli_entry import main

main()
