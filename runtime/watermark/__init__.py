"""The invisible watermark: payload code word, tile synchronisation, the bundle's networks, and
the embed/extract core (``watermarker``).

Layer: runtime. Imports ``io`` and the bundle; never ``tamper``, ``crypto`` or the CLI.
"""
