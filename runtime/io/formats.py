"""Which image format a file name means: one table for the readers, the writers and the job's
folder walk.

Layer: runtime (io).
"""

FORMAT_BY_SUFFIX = {
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".dic": "dicom",
    ".ima": "dicom",
    ".png": "png",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".npy": "npy",
}

