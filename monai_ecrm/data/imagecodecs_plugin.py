"""A pydicom decoding plugin for JPEG 2000 frames through imagecodecs.

pydicom's plugin interface: a module with ``DECODER_DEPENDENCIES``, ``is_available(uid)`` and the frame decoder,
registered by :func:`monai_ecrm.data.image_io.dicom_decoding_plugin`. Why a plugin of our own: imagecodecs decodes
with the same openjpeg as pydicom's pylibjpeg and Pillow plugins, so to the same pixels, but it releases the GIL
while it decodes (those two hold it for the whole frame), so a frame decoded in a background thread overlaps the
network (:class:`monai_ecrm.infer.ClinicalInference`). pydicom ships no imagecodecs plugin.
"""

from __future__ import annotations

__all__ = ["DECODER_DEPENDENCIES", "is_available", "decode_frame"]

DECODER_DEPENDENCIES = {
    "1.2.840.10008.1.2.4.90": ("imagecodecs>=2024.1.1",),  # JPEG 2000 Image Compression (Lossless Only)
    "1.2.840.10008.1.2.4.91": ("imagecodecs>=2024.1.1",),  # JPEG 2000 Image Compression
}


def is_available(uid: str) -> bool:
    """Whether this plugin can decode the transfer syntax ``uid`` here (imagecodecs installed, with JPEG 2000)."""
    if uid not in DECODER_DEPENDENCIES:
        return False
    try:
        import imagecodecs
    except ImportError:
        return False
    return bool(getattr(getattr(imagecodecs, "JPEG2K", None), "available", False))


def decode_frame(src: bytes, runner) -> bytes:
    """One JPEG 2000 frame, with the runner options pydicom's pylibjpeg plugin sets (openjpeg applies the inverse
    colour transform, so YBR_RCT/YBR_ICT frames come out RGB; bits allocated from the precision).

    Args:
        src: the frame's codestream.
        runner: pydicom's decode runner of the dataset (its options are updated).
    """
    import imagecodecs

    frame = imagecodecs.jpeg2k_decode(src, numthreads=1)  # one thread: it runs beside the network's threads
    if runner.photometric_interpretation in ("YBR_ICT", "YBR_RCT"):
        runner.set_option("photometric_interpretation", "RGB")
    precision = runner.get_option("j2k_precision", runner.bits_stored)
    runner.set_option("bits_allocated", 8 if precision <= 8 else 16 if precision <= 16 else 32)
    return frame.tobytes()
