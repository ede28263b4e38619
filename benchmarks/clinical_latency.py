"""Latency of the clinical pipeline (``monai-ecrm-infer``): DICOM frame in, DICOM SEG out, on CPU by default.

Prints one JSON object:

- ``sample_frame``: the NEMA WG04 endoscopy frame (486x756 RGB, JPEG 2000 lossless) at its native size, through the
  steps of one frame of a job, median over ``--repeats`` after a warm-up: ``decode_s`` (header, decodability check
  and pixel decoding: :func:`monai_ecrm.dicom_seg.read_dicom_source`, :func:`~monai_ecrm.dicom_seg.iter_dicom_frames`),
  ``preprocess_s`` (to tensor, resize to ``--spatial-size``, normalise), ``inference_s`` (the network),
  ``postprocess_s`` (sigmoid, resize back, threshold), ``seg_write_s`` (SEG built with highdicom, written and renamed
  into place).
  ``overhead_ratio`` = (decode + SEG writing) / inference; goal: at most 0.25.
- ``multiframe``: a synthetic ``--frames``-frame multi-frame secondary capture (uncompressed, the sample's size) as one
  job: ``frames_per_s`` and the job's peak resident memory (``peak_rss_mib``; the process's peak is reset before the
  job where the kernel allows) next to the resident memory before it and the size of the video's pixel data.

The network is the bundle's architecture (``ECRMUNet``, ``--backbone`` resnet34, 20 memory slots) with random weights:
the timing does not depend on them. The sample is read from ``../shared/data/dicom_samples`` (``--sample`` to change);
the sample part is left out with a message when it is absent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose

from monai_ecrm.data import probe_picture
from monai_ecrm.dicom_seg import iter_dicom_frames, read_dicom_source
from monai_ecrm.infer import ClinicalInference
from monai_ecrm.networks.nets import ECRMUNet

DEFAULT_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom_samples"
DEFAULT_SAMPLE = DEFAULT_SAMPLE / "nema_wg04_vl2_j2kr.dcm"


def _rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as stream:
        return next(int(line.split()[1]) for line in stream if line.startswith(field))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as stream:
            stream.write("5")
        return True
    except OSError:
        return False


def _sample_frame(job: ClinicalInference, sample: Path, repeats: int) -> dict:
    steps = {name: [] for name in ("decode_s", "preprocess_s", "inference_s", "postprocess_s", "seg_write_s")}
    post = Compose(job.postprocessing.transforms[:-1])
    writer = job.postprocessing.transforms[-1]
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        header = read_dicom_source(sample)
        info = probe_picture(sample)
        frame = next(iter_dicom_frames(sample, header, info))
        decoded = time.perf_counter()
        data = job.preprocessing({"image": frame})
        preprocessed = time.perf_counter()
        with torch.no_grad():
            logits = job.model(data["image"].as_tensor()[None].to(job.device))
        inferred = time.perf_counter()
        data["pred"] = logits[0]
        data = post(data)
        postprocessed = time.perf_counter()
        writer(data)
        written = time.perf_counter()
        if repeat == 0:  # warm-up: first-use imports, highdicom's standard tables, allocator
            continue
        for name, seconds in zip(
            steps,
            (
                decoded - start,
                preprocessed - decoded,
                inferred - preprocessed,
                postprocessed - inferred,
                written - postprocessed,
            ),
        ):
            steps[name].append(seconds)
    result = {"size": [info.height, info.width], "transfer_syntax": header.file_meta.TransferSyntaxUID.name}
    result.update({name: round(statistics.median(values), 4) for name, values in steps.items()})
    result["total_s"] = round(sum(result[name] for name in steps), 4)
    result["overhead_ratio"] = round((result["decode_s"] + result["seg_write_s"]) / result["inference_s"], 3)
    result["goal"] = "overhead_ratio <= 0.25"
    result["goal_met"] = result["overhead_ratio"] <= 0.25
    return result


def _video(path: Path, frames: int, height: int, width: int) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.4"  # Multi-frame True Color Secondary Capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "SYNTHETIC", "ES"
    ds.Rows, ds.Columns, ds.NumberOfFrames = height, width, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    base = np.zeros((height, width, 3), dtype=np.uint8)
    base[..., 0] = np.linspace(40, 200, width, dtype=np.uint8)[None, :]
    base[..., 1] = np.linspace(20, 120, height, dtype=np.uint8)[:, None]
    video = np.repeat(base[None], frames, axis=0)
    for index in range(frames):  # a bright blob moving across the frames
        top, left = (7 * index) % (height - 80), (11 * index) % (width - 120)
        video[index, top : top + 80, left : left + 120] = (230, 180, 170)
    ds.PixelData = video.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _multiframe(job: ClinicalInference, path: Path, frames: int) -> dict:
    header = read_dicom_source(path)
    baseline = _rss_kib()
    reset = _reset_peak()
    start = time.perf_counter()
    result = job.process(path)
    wall = time.perf_counter() - start
    if result.status != "written":
        raise RuntimeError(f"the multi-frame job did not finish: {result}")
    return {
        "frames": frames,
        "size": [int(header.Rows), int(header.Columns)],
        "transfer_syntax": header.file_meta.TransferSyntaxUID.name,
        "wall_s": round(wall, 2),
        "frames_per_s": round(frames / wall, 3),
        "peak_rss_mib": round(_rss_kib("VmHWM") / 1024, 1),
        "peak_reset_before_job": reset,
        "rss_before_job_mib": round(baseline / 1024, 1),
        "pixel_data_mib": round(frames * int(header.Rows) * int(header.Columns) * 3 / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE, help="the DICOM frame to time")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions of the sample frame")
    parser.add_argument("--frames", type=int, default=100, help="frames of the synthetic multi-frame object")
    parser.add_argument("--backbone", default="resnet34", help="ECRMUNet encoder")
    parser.add_argument("--spatial-size", type=int, default=352, help="network input size")
    parser.add_argument("--device", default="cpu", help="torch device")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = ECRMUNet(backbone=args.backbone, bank_size=20).to(args.device).eval()
    report: dict = {
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "network": f"ECRMUNet(backbone={args.backbone!r}, bank_size=20), random weights",
        "spatial_size": args.spatial_size,
    }
    with tempfile.TemporaryDirectory() as folder:
        job = ClinicalInference(
            model, Path(folder) / "out", spatial_size=args.spatial_size, device=args.device, overwrite=True,
            progress=False,
        )  # fmt: skip
        if args.sample.is_file():
            report["sample_frame"] = _sample_frame(job, args.sample, args.repeats)
            height, width = report["sample_frame"]["size"]
        else:
            print(f"sample {args.sample} not found: sample frame timing left out", file=sys.stderr)
            height, width = 486, 756
        video = _video(Path(folder) / "video.dcm", args.frames, height, width)
        report["multiframe"] = _multiframe(job, video, args.frames)
        job.writer.close()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
