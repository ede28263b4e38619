"""Latency of the clinical pipeline (``monai-ecrm-infer``): DICOM frame in, DICOM SEG out, on CPU by default.

Prints one JSON object:

- ``sample_frame``: the NEMA WG04 endoscopy frame (486x756 RGB, JPEG 2000 lossless) at its native size, through the
  steps of one frame of a job, median over ``--repeats`` after a warm-up: ``decode_s`` (header read once,
  decodability check and pixel decoding: :meth:`monai_ecrm.clinical.DicomSource.read` and ``.frames``),
  ``preprocess_s`` (to tensor, resize to ``--spatial-size``, normalise), ``inference_s`` (the network),
  ``postprocess_s`` (sigmoid, resize back, threshold), ``seg_write_s`` (SEG built with highdicom from the header read
  for decoding, written and renamed into place); ``decoding_plugin`` names the JPEG 2000 decoder (imagecodecs where
  installed, else pydicom's first available plugin, pylibjpeg).
  ``overhead_ratio`` = (decode + SEG writing) / inference; goal: at most 0.25. A single frame has nothing to overlap
  its decoding with: this is the cost of one frame processed on its own.
- ``multiframe``: a ``--frames``-frame multi-frame secondary capture of the sample's size, as one job each way:
  ``sequential`` (``prefetch=0``: decode, network, writing one after the other) and ``pipelined`` (the default
  ``prefetch=2``: the next frames decoded and pre-processed in a background thread while the network runs). Each gives
  ``s_per_frame``, ``frames_per_s`` and the job's peak resident memory (``peak_rss_mib``; the process's peak is reset
  before each job where the kernel allows). ``inference_alone_s_per_frame`` is the network alone on one frame's input
  (median of ``--repeats``, nothing else running), and ``*_overhead_ratio`` = (s per frame - inference alone) /
  inference alone: what is left on the critical path besides the network (decoding, pre- and post-processing, SEG
  writing, and the slow-down of the network by the decoding thread). With the sample, every frame is the sample's JPEG
  2000 codestream (what a compressed endoscopy video costs to decode); without it, uncompressed synthetic frames.
- ``machine``: CPUs this process may use and the load average when the benchmark starts: the figures are wall times,
  so a loaded machine inflates them (on 2 CPUs with other jobs running, the network's threads wait for each other).

The network is ``ECRMUNet`` with its default ECRM (the study's variant on the 1/16 map; the bundle's encoder is
efficientnet-lite0, ``--backbone`` here defaults to resnet34 as in the figures reported), 20 memory slots, random
weights:
the timing does not depend on them. It runs with torch's default threads (``torch_threads``; one per CPU, or
``OMP_NUM_THREADS``): fewer threads make the network slower and so the ratios smaller, which is no gain.
The sample is read from ``../shared/data/dicom_samples`` (``--sample`` to change); the sample part is left out with
a message when it is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose

from monai_ecrm.clinical import ClinicalInference, DicomSource
from monai_ecrm.data.image_io import dicom_decoding_plugin
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
        source = DicomSource.read(sample)
        frame = next(source.frames())
        decoded = time.perf_counter()
        data = job.preprocessing({"image": frame})
        preprocessed = time.perf_counter()
        data["pred"] = job.runner(data["image"].as_tensor()).logits
        inferred = time.perf_counter()
        data = post(data)
        postprocessed = time.perf_counter()
        writer.use_source(source)  # as the job does: the SEG is built from the header read for decoding
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
    syntax = source.dataset.file_meta.TransferSyntaxUID
    result = {
        "size": [source.info.height, source.info.width],
        "transfer_syntax": syntax.name,
        "decoding_plugin": dicom_decoding_plugin(syntax) or "pydicom's first available",
    }
    result.update({name: round(statistics.median(values), 4) for name, values in steps.items()})
    result["total_s"] = round(sum(result[name] for name in steps), 4)
    result["overhead_ratio"] = round((result["decode_s"] + result["seg_write_s"]) / result["inference_s"], 3)
    result["goal"] = "overhead_ratio <= 0.25"
    result["goal_met"] = result["overhead_ratio"] <= 0.25
    return result


def _video(path: Path, frames: int, height: int, width: int, sample: Path | None) -> Path:
    """A multi-frame secondary capture: every frame the sample's JPEG 2000 codestream when given, else uncompressed
    synthetic frames with a moving blob."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate, generate_frames
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
    if sample is not None:
        source = pydicom.dcmread(sample)
        codestream = next(generate_frames(source.PixelData, number_of_frames=1))
        meta.TransferSyntaxUID = source.file_meta.TransferSyntaxUID
        ds.PhotometricInterpretation = source.PhotometricInterpretation
        ds.PixelData = encapsulate([codestream] * frames)
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
        return path
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


def _job(job: ClinicalInference, path: Path, frames: int) -> dict:
    reset = _reset_peak()
    start = time.perf_counter()
    result = job.process(path)
    wall = time.perf_counter() - start
    if result.status != "written":
        raise RuntimeError(f"the multi-frame job did not finish: {result}")
    return {
        "wall_s": round(wall, 2),
        "s_per_frame": round(wall / frames, 4),
        "frames_per_s": round(frames / wall, 3),
        "peak_rss_mib": round(_rss_kib("VmHWM") / 1024, 1),
        "peak_reset_before_job": reset,
    }


def _inference_alone(job: ClinicalInference, path: Path, repeats: int) -> float:
    """Median seconds of the network on one frame's input, nothing else running."""
    frame = next(DicomSource.read(path).frames())
    image = job.preprocessing({"image": frame})["image"].as_tensor()
    times = []
    with torch.no_grad():
        for repeat in range(repeats + 1):
            start = time.perf_counter()
            job.runner(image)
            if repeat:  # the first is a warm-up
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def _multiframe(job: ClinicalInference, path: Path, frames: int, repeats: int) -> dict:
    header = DicomSource.read(path).dataset
    syntax = header.file_meta.TransferSyntaxUID
    report = {
        "frames": frames,
        "size": [int(header.Rows), int(header.Columns)],
        "transfer_syntax": syntax.name,
        "decoding_plugin": dicom_decoding_plugin(syntax) or "pydicom's first available",
        "pixel_data_mib": round(frames * int(header.Rows) * int(header.Columns) * 3 / 2**20, 1),
        "rss_before_jobs_mib": round(_rss_kib() / 1024, 1),
    }
    inference = _inference_alone(job, path, repeats)
    report["inference_alone_s_per_frame"] = round(inference, 4)
    for name, prefetch in (("sequential", 0), ("pipelined", 2)):
        job.prefetch = prefetch
        report[name] = _job(job, path, frames)
        report[f"{name}_overhead_ratio"] = round((report[name]["wall_s"] / frames - inference) / inference, 3)
    return report


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
        "machine": {"cpus": len(os.sched_getaffinity(0)), "load_average_1min": round(os.getloadavg()[0], 2)},
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
        sample = args.sample if args.sample.is_file() else None
        if sample is not None:
            report["sample_frame"] = _sample_frame(job, sample, args.repeats)
            height, width = report["sample_frame"]["size"]
        else:
            print(f"sample {args.sample} not found: sample frame timing left out", file=sys.stderr)
            height, width = 486, 756
        video = _video(Path(folder) / "video.dcm", args.frames, height, width, sample)
        report["multiframe"] = _multiframe(job, video, args.frames, args.repeats)
        job.writer.close()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
