"""The tamper check: the blind detector's input, the watermark-aware map, verdicts and reports.

Layer: runtime. Imports ``io``, ``watermark`` and the bundle.
"""
