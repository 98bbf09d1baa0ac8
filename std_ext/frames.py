"""Video frames for ``std_ext generate``: a video file, a folder of images, or an ``.npy`` array.

* **Video file** (``.mp4``, ``.avi``, ``.mkv``, ``.webm``, ``.mov``): decoded by
  ``transformers``' own loader, ``transformers.video_utils.load_video(..., backend="pyav")``,
  which needs PyAV (``pip install av``; it ships wheels with FFmpeg inside). Only the
  sampled frames are converted to RGB. The frame rate is read from the file.
* **Folder of images** (``.png``, ``.jpg``, ...; needs Pillow): one frame per image, in
  natural order (``frame_2`` before ``frame_10``); all images must have one size.
* **.npy array**: uint8 ``[T, H, W, 3]`` or ``[T, 3, H, W]``, or floats in ``[0, 1]`` or
  ``[0, 255]`` (rounded to uint8).

A folder or an array carries no frame rate; pass ``fps`` when it is known, since
Qwen2.5-VL and Qwen3-VL place frames in time with it (their processors assume 24 fps when
it is unknown).

``num_frames`` keeps at most that many frames spread uniformly over the whole clip,
``round(linspace(0, T - 1, n))`` -- the rule Qwen3-VL's video processor samples by; the
first and last frames are always kept. The result also says which source frames were
kept, out of how many, at what rate: what ``transformers`` processors take as
``video_metadata`` (:meth:`VideoFrames.metadata`).

Every problem with the input raises :class:`FrameLoadError` (a ``ValueError``) whose
message names the path and says what to do, so a command line can show it as is.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "FrameLoadError",
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "VideoFrames",
    "is_video_file",
    "load_frames",
    "sample_indices",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")


class FrameLoadError(ValueError):
    """The frames could not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class VideoFrames:
    """Frames sampled from one video, and where they came from.

    Attributes
    ----------
    frames : uint8 ``[T, H, W, 3]``, C-contiguous, ``T >= 1``
    indices : int64 ``[T]``, ascending: the position of each frame in the source
    total_frames : how many frames the source holds
    fps : the source's frame rate, None when unknown (a folder or an array without ``fps``)
    kind : "video file", "image folder" or ".npy array"
    """

    frames: np.ndarray
    indices: np.ndarray
    total_frames: int
    fps: float | None
    kind: str

    def metadata(self) -> dict:
        """The frames' ``video_metadata`` as ``transformers`` processors take it (VideoMetadata fields)."""
        return {
            "total_num_frames": self.total_frames,
            "fps": self.fps,
            "duration": self.total_frames / self.fps if self.fps else None,
            "frames_indices": self.indices.tolist(),
            "height": int(self.frames.shape[1]),
            "width": int(self.frames.shape[2]),
        }


def is_video_file(path: str | Path) -> bool:
    """Whether ``path`` names a video file (by its extension) rather than a folder or an array."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS and not Path(path).is_dir()


def load_frames(path: str | Path, num_frames: int | None = None, fps: float | None = None) -> VideoFrames:
    """Load a video as RGB frames.

    Parameters
    ----------
    path : a folder of images, an ``.npy`` file or a video file (see the module docstring)
    num_frames : keep at most this many frames, sampled uniformly; ``None`` or 0 keeps all
    fps : the frame rate of a folder or an array (a video file's own is read from it)

    Raises
    ------
    FrameLoadError
        The path is missing or of an unknown kind, holds no frames, has a bad shape or
        dtype, needs a package that is not installed, or cannot be decoded.
    """
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 0):
        raise FrameLoadError(f"num_frames must be an integer >= 0 (0 = all frames), got {num_frames!r}")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < float("inf")):
        raise FrameLoadError(f"fps must be a positive number, got {fps!r}")
    limit = num_frames or None
    path = Path(path)
    if not path.exists():
        raise FrameLoadError(f"{path}: no such file or folder")
    if is_video_file(path) and fps is not None:
        raise FrameLoadError(f"{path}: a video file carries its own frame rate; fps is for image folders and "
                             ".npy arrays")
    if path.is_dir():
        files = _image_files(path)
        indices = sample_indices(len(files), limit)
        frames = _read_images(path, [files[i] for i in indices])
        return _result(frames, indices, len(files), fps, "image folder")
    if path.suffix.lower() == ".npy":
        array = _load_npy(path)
        indices = sample_indices(array.shape[0], limit)
        return _result(array[indices], indices, array.shape[0], fps, ".npy array")
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return _load_video_file(path, limit)
    raise FrameLoadError(
        f"{path}: unknown kind of video input {path.suffix or '(no extension)'!r}; give a folder of images "
        f"({', '.join(IMAGE_EXTENSIONS)}), an .npy array [T, H, W, 3], or a video file "
        f"({', '.join(VIDEO_EXTENSIONS)})"
    )


def sample_indices(total: int, num_frames: int | None) -> np.ndarray:
    """Indices of ``min(num_frames, total)`` frames spread uniformly over ``0 .. total - 1``.

    Returns int64 ``[n]``, ascending and distinct: ``round(linspace(0, total - 1, n))``
    (all frames when ``num_frames`` is None or >= ``total``).
    """
    if num_frames is None or num_frames >= total:
        return np.arange(total, dtype=np.int64)
    # Spacing (total-1)/(n-1) >= 1 when n < total, so rounding keeps the indices distinct.
    return np.rint(np.linspace(0, total - 1, num_frames)).astype(np.int64)


def _result(frames: np.ndarray, indices: np.ndarray, total: int, fps: float | None, kind: str) -> VideoFrames:
    return VideoFrames(frames=np.ascontiguousarray(frames), indices=np.asarray(indices, dtype=np.int64),
                       total_frames=int(total), fps=None if fps is None else float(fps), kind=kind)


# --------------------------------------------------------------------------- .npy


def _load_npy(path: Path) -> np.ndarray:
    """``[T, H, W, 3]`` uint8 from an .npy array in either accepted layout and dtype."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise FrameLoadError(f"{path}: not a readable .npy array ({error})") from error
    return _as_uint8(_channels_last(array, path), path)


def _channels_last(array: np.ndarray, path: Path) -> np.ndarray:
    """``[T, H, W, 3]`` view of a ``[T, H, W, 3]`` or ``[T, 3, H, W]`` array."""
    if array.ndim == 4 and array.shape[-1] == 3:
        frames = array
    elif array.ndim == 4 and array.shape[1] == 3:
        frames = array.transpose(0, 2, 3, 1)
    else:
        raise FrameLoadError(
            f"{path}: array of shape {list(array.shape)}; expected RGB frames [T, H, W, 3] or [T, 3, H, W] "
            "(a single frame needs a leading axis of 1; grayscale needs 3 channels)"
        )
    if 0 in frames.shape:
        raise FrameLoadError(f"{path}: array of shape {list(array.shape)} holds no pixels (an axis of size 0)")
    return frames


def _as_uint8(frames: np.ndarray, path: Path) -> np.ndarray:
    """uint8 pixels from uint8, or from floats in [0, 1] or [0, 255] (rounded)."""
    if frames.dtype == np.uint8:
        return frames
    if not np.issubdtype(frames.dtype, np.floating):
        raise FrameLoadError(
            f"{path}: dtype {frames.dtype} is not supported; save uint8 pixels (array.astype(np.uint8)) "
            "or floats in [0, 1] or [0, 255]"
        )
    if not np.isfinite(frames).all():
        raise FrameLoadError(f"{path}: float array holds NaN or infinite values")
    low, high = float(frames.min()), float(frames.max())
    if low < 0.0 or high > 255.0:
        raise FrameLoadError(f"{path}: float values span [{low:g}, {high:g}]; expected [0, 1] or [0, 255]")
    scale = 255.0 if high <= 1.0 else 1.0  # a float video whose brightest pixel is <= 1 is in [0, 1]
    return np.rint(frames.astype(np.float64) * scale).astype(np.uint8)


# --------------------------------------------------------------------------- image folder


def _natural_key(path: Path) -> list:
    """Sort key comparing digit runs as numbers: frame_2 < frame_10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path.name) if part]


def _image_files(folder: Path) -> list[Path]:
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                   key=_natural_key)
    if not files:
        raise FrameLoadError(f"{folder}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _read_images(folder: Path, files: list[Path]) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` from the chosen image files (only those are decoded)."""
    try:
        image_module = importlib.import_module("PIL.Image")
    except ImportError as error:
        raise FrameLoadError(
            f"{folder}: decoding images needs Pillow, which is not installed: `pip install pillow`, "
            "or save the frames as an .npy array [T, H, W, 3] uint8"
        ) from error
    frames = [_read_image(image_module, file) for file in files]
    if len({frame.shape for frame in frames}) > 1:
        shapes = ", ".join(f"{f.name}: {fr.shape[0]}x{fr.shape[1]}" for f, fr in zip(files, frames))
        raise FrameLoadError(f"{folder}: the images differ in size (height x width: {shapes}); resize them to one size")
    return np.stack(frames)


def _read_image(image_module, file: Path) -> np.ndarray:
    try:
        with image_module.open(file) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
    except (OSError, ValueError) as error:
        raise FrameLoadError(f"{file}: cannot decode the image ({error})") from error


# --------------------------------------------------------------------------- video file


def _load_video_file(path: Path, limit: int | None) -> VideoFrames:
    """The sampled frames of a video file, decoded by ``transformers.video_utils.load_video`` (PyAV)."""
    try:
        av = importlib.import_module("av")
    except ImportError as error:
        raise FrameLoadError(
            f"{path}: reading a video file needs PyAV, which is not installed: `pip install av`; or extract "
            f"the frames first to a folder of images (e.g. `ffmpeg -i {path.name} frames/%05d.png`) or to an "
            ".npy array [T, H, W, 3] uint8"
        ) from error
    from transformers.video_utils import load_video

    total = _frame_count(av, path)
    indices = sample_indices(total, limit)
    try:
        frames, metadata = load_video(str(path), backend="pyav",
                                      sample_indices_fn=lambda metadata, **_: indices)
    except Exception as error:  # noqa: BLE001 - FFmpeg and transformers raise many types; name the file instead
        raise FrameLoadError(f"{path}: cannot decode the video ({type(error).__name__}: {error})") from error
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] != len(indices):
        # load_video skips indices past the last decodable frame: fewer frames would be a different video
        raise FrameLoadError(
            f"{path}: the container announces {total} frames but only {frames.shape[0]} of the {len(indices)} "
            f"sampled ones could be decoded; re-encode the file (e.g. `ffmpeg -i {path.name} fixed.mp4`) or "
            "extract its frames to a folder of images"
        )
    fps = float(metadata.fps) if metadata.fps else None
    return _result(frames.astype(np.uint8, copy=False), indices, total, fps, "video file")


def _frame_count(av, path: Path) -> int:
    """Frames in the file's first video stream.

    MP4, MOV and AVI record the count; Matroska and WebM do not (PyAV reports 0), and
    ``load_video`` cannot sample such a file by itself, so its packets are counted
    instead: one per frame, read without decoding.
    """
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise FrameLoadError(f"{path}: the file holds no video stream")
            stream = container.streams.video[0]
            count = int(stream.frames or 0) or sum(1 for packet in container.demux(stream) if packet.size)
    except FrameLoadError:
        raise
    except Exception as error:  # noqa: BLE001 - av.error.* types vary between PyAV releases
        raise FrameLoadError(f"{path}: cannot open the video ({type(error).__name__}: {error})") from error
    if count == 0:
        raise FrameLoadError(f"{path}: the video stream holds no frames")
    return count
