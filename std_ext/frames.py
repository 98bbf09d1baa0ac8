"""Video frames from disk, as one uint8 array ``[T, H, W, 3]`` (RGB).

Three sources, picked by what ``path`` is:

* a **folder of images** (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.webp``, ``.tif``,
  ``.tiff``): one frame per file, in name order with digit runs compared as numbers
  (``frame_2.png`` before ``frame_10.png``); every image must have the same size.
  Decoding needs Pillow, imported only here.
* an **.npy array** (read without pickles), in one of two layouts:

  - ``[T, H, W, 3]`` (channels last), or ``[T, 3, H, W]`` (channels first; used only
    when the last axis is not 3, so ``[T, 3, H, 3]`` reads as channels last);
  - dtype ``uint8`` (taken as is), or floating point: values in ``[0, 1]`` (the largest
    value is <= 1) are scaled by 255, values in ``[0, 255]`` are taken as is; either way
    they are rounded to uint8. NaN, negative or > 255 values, other dtypes (int16,
    bool, ...), and other shapes are errors.
* a **video file** (``.mp4``, ``.avi``, ``.mkv``, ``.webm``, ``.mov``), decoded with the
  first of PyAV (``av``), ``decord``, OpenCV (``cv2``) and ``torchvision.io`` that is
  installed. None of them is a dependency of std_ext.

``num_frames`` keeps at most that many frames, sampled uniformly over the whole clip
(``round(linspace(0, T - 1, n))``: the first and last frames are always kept); only the
chosen images / video frames are decoded where the source allows it.

Every problem with the input raises :class:`FrameLoadError` (a ``ValueError``) whose
message names the path and says what to do, so a command line can show it as is.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["FrameLoadError", "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "VIDEO_DECODERS", "load_frames", "sample_indices"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")
# (module imported, pip package) in the order they are tried.
VIDEO_DECODERS = (("av", "av"), ("decord", "decord"), ("cv2", "opencv-python"), ("torchvision.io", "torchvision"))


class FrameLoadError(ValueError):
    """The frames could not be loaded; the message says why and what to do."""


def load_frames(path: str | Path, num_frames: int | None = None) -> np.ndarray:
    """Load a video as RGB frames.

    Parameters
    ----------
    path : a folder of images, an ``.npy`` file or a video file (see the module docstring)
    num_frames : keep at most this many frames, sampled uniformly; ``None`` or 0 keeps all

    Returns
    -------
    np.ndarray
        uint8 ``[T, H, W, 3]``, C-contiguous, ``T >= 1``.

    Raises
    ------
    FrameLoadError
        The path is missing or of an unknown kind, holds no frames, has a bad shape or
        dtype, or needs a decoder package that is not installed.
    """
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 0):
        raise FrameLoadError(f"num_frames must be an integer >= 0 (0 = all frames), got {num_frames!r}")
    limit = num_frames or None
    path = Path(path)
    if not path.exists():
        raise FrameLoadError(f"{path}: no such file or folder")
    if path.is_dir():
        frames = _load_image_folder(path, limit)
    elif path.suffix.lower() == ".npy":
        frames = _sample(_load_npy(path), limit)
    elif path.suffix.lower() in VIDEO_EXTENSIONS:
        frames = _load_video(path, limit)
    else:
        raise FrameLoadError(
            f"{path}: unknown kind of video input {path.suffix or '(no extension)'!r}; give a folder of images "
            f"({', '.join(IMAGE_EXTENSIONS)}), an .npy array [T, H, W, 3], or a video file "
            f"({', '.join(VIDEO_EXTENSIONS)})"
        )
    return np.ascontiguousarray(frames)


def sample_indices(total: int, num_frames: int | None) -> np.ndarray:
    """Indices of ``min(num_frames, total)`` frames spread uniformly over ``0 .. total - 1``.

    Returns int64 ``[n]``, ascending and distinct: ``round(linspace(0, total - 1, n))``
    (all frames when ``num_frames`` is None or >= ``total``).
    """
    if num_frames is None or num_frames >= total:
        return np.arange(total, dtype=np.int64)
    # Spacing (total-1)/(n-1) >= 1 when n < total, so rounding keeps the indices distinct.
    return np.rint(np.linspace(0, total - 1, num_frames)).astype(np.int64)


def _sample(frames: np.ndarray, limit: int | None) -> np.ndarray:
    return frames[sample_indices(frames.shape[0], limit)]


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


def _load_image_folder(folder: Path, limit: int | None) -> np.ndarray:
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                   key=_natural_key)
    if not files:
        raise FrameLoadError(f"{folder}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    image_module = _import_pillow(folder)
    chosen = [files[i] for i in sample_indices(len(files), limit)]
    frames = [_read_image(image_module, file) for file in chosen]
    sizes = {frame.shape for frame in frames}
    if len(sizes) > 1:
        shapes = ", ".join(f"{f.name}: {h}x{w}" for f, (h, w, _) in zip(chosen, (fr.shape for fr in frames)))
        raise FrameLoadError(f"{folder}: the images differ in size (height x width: {shapes}); resize them to one size")
    return np.stack(frames)


def _import_pillow(folder: Path):
    try:
        return importlib.import_module("PIL.Image")
    except ImportError as error:
        raise FrameLoadError(
            f"{folder}: decoding images needs Pillow, which is not installed: `pip install pillow`, "
            "or save the frames as an .npy array [T, H, W, 3] uint8"
        ) from error


def _read_image(image_module, file: Path) -> np.ndarray:
    try:
        with image_module.open(file) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
    except (OSError, ValueError) as error:
        raise FrameLoadError(f"{file}: cannot decode the image ({error})") from error


# --------------------------------------------------------------------------- video file


def _load_video(path: Path, limit: int | None) -> np.ndarray:
    """Decode with the first installed decoder of :data:`VIDEO_DECODERS`."""
    for module_name, _ in VIDEO_DECODERS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        try:
            frames = _DECODERS[module_name](module, path, limit)
        except FrameLoadError:
            raise
        except Exception as error:  # noqa: BLE001 - decoders raise their own types; name the file instead
            raise FrameLoadError(
                f"{path}: {module_name} could not decode the video ({type(error).__name__}: {error})"
            ) from error
        if frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[-1] != 3:
            raise FrameLoadError(f"{path}: {module_name} decoded no RGB frames (got shape {list(frames.shape)})")
        return frames.astype(np.uint8, copy=False)
    packages = ", ".join(f"{package} ({module})" for module, package in VIDEO_DECODERS)
    raise FrameLoadError(
        f"{path}: reading a video file needs a decoder package, and none is installed; install one of "
        f"{packages}, or extract the frames first to a folder of images "
        f"(e.g. `ffmpeg -i {path.name} frames/%05d.png`) or to an .npy array [T, H, W, 3] uint8"
    )


def _decode_av(av, path: Path, limit: int | None) -> np.ndarray:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        total = int(stream.frames or 0)  # 0 when the container does not say
        wanted = set(sample_indices(total, limit).tolist()) if total and limit else None
        frames = [frame.to_ndarray(format="rgb24") for i, frame in enumerate(container.decode(stream))
                  if wanted is None or i in wanted]
    frames_array = np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)
    return frames_array if wanted is not None else _sample(frames_array, limit)


def _decode_decord(decord, path: Path, limit: int | None) -> np.ndarray:
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    indices = sample_indices(len(reader), limit)
    return reader.get_batch(indices.tolist()).asnumpy()


def _decode_cv2(cv2, path: Path, limit: int | None) -> np.ndarray:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise FrameLoadError(f"{path}: OpenCV (cv2) cannot open the video")
    try:
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        wanted = set(sample_indices(total, limit).tolist()) if total > 0 and limit else None
        frames, index = [], 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if wanted is None or index in wanted:
                frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))  # OpenCV decodes to BGR
            index += 1
    finally:
        capture.release()
    frames_array = np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)
    return frames_array if wanted is not None else _sample(frames_array, limit)


def _decode_torchvision(io, path: Path, limit: int | None) -> np.ndarray:
    video, _, _ = io.read_video(str(path), pts_unit="sec", output_format="THWC")  # uint8 [T, H, W, 3]
    return _sample(video.numpy(), limit)


_DECODERS: dict[str, Callable[..., np.ndarray]] = {
    "av": _decode_av,
    "decord": _decode_decord,
    "cv2": _decode_cv2,
    "torchvision.io": _decode_torchvision,
}
