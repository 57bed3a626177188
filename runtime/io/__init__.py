"""Images in and out: the in-memory image, readers and writers per format, the DICOM writer
(derived object, private block), atomic writes.

Layer: runtime. Imports only ``errors`` from the rest of the runtime; every other capability
reads and writes through here.
"""
