"""Calibration: real-image calibration sets, INT8 (QDQ) and FP16 variants, the accuracy gate.

Layer: calibration (runtime, onnx, onnxruntime; the gate reuses ``evaluation``'s attacks). The
command is ``medsec-edge calibrate`` (``commands.py``); ``calibrate.py`` runs the steps.
"""
