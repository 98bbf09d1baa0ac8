"""std_ext.frames.load_frames: .npy layouts and dtypes, uniform sampling, image folders,
video files, the metadata of what was kept, and the errors for bad inputs.

Video files are written in the test with PyAV (lossless PNG-in-MOV and FFV1-in-Matroska,
whose frames must come back exactly, and lossy MPEG-4) and decoded by transformers'
``load_video``. "Missing" packages are forced with ``sys.modules[name] = None`` (so
those tests hold whether or not a package is installed); image folders are also tested
with a small fake Pillow that counts which files are decoded.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

import cli_checkpoints
from std_ext.frames import FrameLoadError, VideoFrames, load_frames, sample_indices

T, H, W = 6, 5, 7


def _frames(*args, **kwargs) -> np.ndarray:
    return load_frames(*args, **kwargs).frames


def _video(seed: int = 0) -> np.ndarray:
    """uint8 [T, H, W, 3] whose frame t has every pixel of channel 0 equal to 10 * t."""
    frames = np.random.default_rng(seed).integers(0, 256, (T, H, W, 3), dtype=np.uint8)
    frames[..., 0] = (10 * np.arange(T, dtype=np.uint8))[:, None, None]
    return frames


def _save(tmp_path, array: np.ndarray, name: str = "video.npy"):
    path = tmp_path / name
    np.save(path, array)
    return path


# --------------------------------------------------------------------------- .npy layouts and dtypes


def test_npy_channels_last_uint8(tmp_path):
    frames = _video()
    out = _frames(_save(tmp_path, frames))
    assert out.dtype == np.uint8 and out.shape == (T, H, W, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, frames)


def test_npy_channels_first(tmp_path):
    frames = _video()
    out = _frames(_save(tmp_path, frames.transpose(0, 3, 1, 2)))
    assert out.shape == (T, H, W, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, frames)


def test_npy_last_axis_3_wins_when_ambiguous(tmp_path):
    frames = np.random.default_rng(1).integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_frames(_save(tmp_path, frames)), frames)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_npy_float_unit_range_is_scaled(tmp_path, dtype):
    frames = _video()
    unit = (frames.astype(np.float64) / 255.0).astype(dtype)
    out = _frames(_save(tmp_path, unit))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.rint(unit.astype(np.float64) * 255.0).astype(np.uint8))
    assert np.abs(out.astype(int) - frames.astype(int)).max() <= (1 if dtype == np.float16 else 0)


def test_npy_float_255_range_is_rounded(tmp_path):
    values = np.array([0.0, 1.4, 1.6, 254.5, 255.0, 128.0], dtype=np.float32).reshape(1, 2, 1, 3)
    out = _frames(_save(tmp_path, values))
    assert out.reshape(-1).tolist() == [0, 1, 2, 254, 255, 128]  # round half to even: 254.5 -> 254


@pytest.mark.parametrize(
    "shape, words",
    [
        ((T, H, W), "[T, H, W, 3] or [T, 3, H, W]"),
        ((H, W, 3), "leading axis of 1"),
        ((T, H, W, 4), "expected RGB frames"),
        ((T, 1, H, W), "grayscale"),
        ((1, T, H, W, 3), "expected RGB frames"),
        ((0, H, W, 3), "no pixels"),
        ((T, 0, W, 3), "no pixels"),
    ],
)
def test_npy_bad_shape(tmp_path, shape, words):
    path = _save(tmp_path, np.zeros(shape, np.uint8))
    with pytest.raises(FrameLoadError) as info:
        load_frames(path)
    message = str(info.value)
    assert str(path) in message and str(list(shape)) in message and words in message


@pytest.mark.parametrize("dtype", [np.int16, np.int64, np.bool_, np.uint16])
def test_npy_bad_dtype(tmp_path, dtype):
    path = _save(tmp_path, np.zeros((T, H, W, 3), dtype))
    with pytest.raises(FrameLoadError, match=rf"dtype {np.dtype(dtype)} is not supported.*astype\(np.uint8\)"):
        load_frames(path)


@pytest.mark.parametrize("bad, words", [
    (-0.5, r"span \[-0.5, "),
    (256.0, r"span \[0.5, 256\]; expected \[0, 1\] or \[0, 255\]"),
    (np.nan, "NaN"),
    (np.inf, "NaN or infinite"),
])
def test_npy_bad_float_values(tmp_path, bad, words):
    frames = np.full((T, H, W, 3), 0.5, np.float32)
    frames[1, 2, 3, 0] = bad
    with pytest.raises(FrameLoadError, match=words):
        load_frames(_save(tmp_path, frames))


def test_npy_not_an_array(tmp_path):
    path = tmp_path / "junk.npy"
    path.write_bytes(b"not numpy at all")
    with pytest.raises(FrameLoadError, match="not a readable .npy array"):
        load_frames(path)


def test_npy_pickled_objects_are_refused(tmp_path):
    path = _save(tmp_path, np.array([{"a": 1}], dtype=object))
    with pytest.raises(FrameLoadError, match="not a readable .npy array"):
        load_frames(path)


# --------------------------------------------------------------------------- sampling


def test_sample_indices_uniform():
    assert sample_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert sample_indices(10, 1).tolist() == [0]
    assert sample_indices(10, 2).tolist() == [0, 9]
    assert sample_indices(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert sample_indices(5, 50).tolist() == [0, 1, 2, 3, 4]
    assert sample_indices(5, None).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("total", [1, 2, 7, 33, 100, 1001])
def test_sample_indices_distinct_ascending_in_range(total):
    for n in range(1, min(total, 64) + 1):
        idx = sample_indices(total, n)
        assert len(idx) == n and idx[0] == 0 and idx[-1] == (total - 1 if n > 1 else 0)
        assert (np.diff(idx) > 0).all() and idx.max() < total
        gaps = np.diff(idx)
        if n > 1:  # uniform: gaps differ by at most 1
            assert gaps.max() - gaps.min() <= 1


def test_num_frames_samples_the_npy(tmp_path):
    frames = _video()
    path = _save(tmp_path, frames)
    out = _frames(path, num_frames=3)
    assert out.shape == (3, H, W, 3)
    assert out[:, 0, 0, 0].tolist() == [0, 20, 50]  # frames 0, round(2.5)=2, 5
    np.testing.assert_array_equal(out, frames[[0, 2, 5]])
    np.testing.assert_array_equal(_frames(path, num_frames=0), frames)  # 0 = all
    np.testing.assert_array_equal(_frames(path, num_frames=100), frames)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "3"])
def test_bad_num_frames(tmp_path, bad):
    with pytest.raises(FrameLoadError, match="num_frames must be an integer >= 0"):
        load_frames(_save(tmp_path, _video()), num_frames=bad)


# --------------------------------------------------------------------------- paths


def test_missing_path(tmp_path):
    with pytest.raises(FrameLoadError, match="no such file or folder"):
        load_frames(tmp_path / "nope.npy")


def test_unknown_extension(tmp_path):
    path = tmp_path / "video.txt"
    path.write_text("x")
    with pytest.raises(FrameLoadError, match=r"unknown kind of video input '.txt'.*folder of images.*\.npy.*\.mp4"):
        load_frames(path)


def test_empty_folder(tmp_path):
    with pytest.raises(FrameLoadError, match=r"holds no images \(.png, .jpg"):
        load_frames(tmp_path)


def test_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub.png").mkdir()  # a folder named like an image is not an image
    with pytest.raises(FrameLoadError, match="holds no images"):
        load_frames(tmp_path)


# --------------------------------------------------------------------------- image folders


def test_image_folder_without_pillow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL.Image now fails as if not installed
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    (tmp_path / "0001.png").write_bytes(b"\x89PNG")
    with pytest.raises(FrameLoadError) as info:
        load_frames(tmp_path)
    message = str(info.value)
    assert "needs Pillow" in message and "pip install pillow" in message and ".npy" in message


class _FakeImage:
    """What load_frames uses of a PIL image: a context manager, convert("RGB"), __array__."""

    def __init__(self, value: int, size: tuple[int, int]) -> None:
        self.value, self.size, self.mode = value, size, "P"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def convert(self, mode: str):
        assert mode == "RGB"
        self.mode = mode
        return self

    def __array__(self, dtype=None, copy=None):
        assert self.mode == "RGB"
        return np.full((*self.size, 3), self.value, dtype=dtype or np.uint8)


def _fake_pillow(monkeypatch, opened: list):
    """Fake PIL whose image file holds 'value height width' as text."""

    def open_image(path):
        opened.append(path.name)
        value, height, width = (int(v) for v in path.read_text().split())
        return _FakeImage(value, (height, width))

    image = types.ModuleType("PIL.Image")
    image.open = open_image
    package = types.ModuleType("PIL")
    package.Image = image
    monkeypatch.setitem(sys.modules, "PIL", package)
    monkeypatch.setitem(sys.modules, "PIL.Image", image)


def test_image_folder_sorted_naturally_and_sampled(tmp_path, monkeypatch):
    opened: list[str] = []
    _fake_pillow(monkeypatch, opened)
    names = ["frame_10.png", "frame_2.JPG", "frame_1.jpeg", "frame_9.bmp", "frame_100.webp"]
    for value, name in zip([10, 2, 1, 9, 100], names):
        (tmp_path / name).write_text(f"{value} 3 4")
    (tmp_path / "readme.txt").write_text("ignored")
    out = _frames(tmp_path)
    assert out.shape == (5, 3, 4, 3) and out.dtype == np.uint8
    assert out[:, 0, 0, 0].tolist() == [1, 2, 9, 10, 100]
    opened.clear()
    out = _frames(tmp_path, num_frames=3)
    assert out[:, 0, 0, 0].tolist() == [1, 9, 100]
    assert opened == ["frame_1.jpeg", "frame_9.bmp", "frame_100.webp"]  # only the sampled files are decoded


def test_image_folder_sizes_differ(tmp_path, monkeypatch):
    _fake_pillow(monkeypatch, [])
    (tmp_path / "a.png").write_text("1 3 4")
    (tmp_path / "b.png").write_text("1 3 5")
    with pytest.raises(FrameLoadError, match=r"differ in size.*a.png: 3x4, b.png: 3x5"):
        load_frames(tmp_path)


def test_image_folder_with_real_pillow(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    frames = _video()
    for t, frame in enumerate(frames):
        image_module.fromarray(frame).save(tmp_path / f"{t}.png")
    np.testing.assert_array_equal(_frames(tmp_path), frames)


# --------------------------------------------------------------------------- what was kept


def test_npy_metadata(tmp_path):
    out = load_frames(_save(tmp_path, _video()), num_frames=3, fps=12.5)
    assert isinstance(out, VideoFrames)
    assert out.indices.tolist() == [0, 2, 5] and out.indices.dtype == np.int64
    assert (out.total_frames, out.fps, out.kind) == (T, 12.5, ".npy array")
    assert out.metadata() == {"total_num_frames": T, "fps": 12.5, "duration": T / 12.5,
                              "frames_indices": [0, 2, 5], "height": H, "width": W}


def test_folder_metadata_without_fps(tmp_path, monkeypatch):
    _fake_pillow(monkeypatch, [])
    for t in range(4):
        (tmp_path / f"{t}.png").write_text(f"{t} 2 3")
    out = load_frames(tmp_path, num_frames=2)
    assert (out.kind, out.total_frames, out.fps, out.indices.tolist()) == ("image folder", 4, None, [0, 3])
    assert out.metadata()["fps"] is None and out.metadata()["duration"] is None


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "24", True])
def test_bad_fps(tmp_path, bad):
    with pytest.raises(FrameLoadError, match="fps must be a positive number"):
        load_frames(_save(tmp_path, _video()), fps=bad)


# --------------------------------------------------------------------------- video files


def _write_video(path, frames: np.ndarray, codec: str, fps: int = 8):
    pytest.importorskip("av")
    return cli_checkpoints.write_video(path, frames, fps=fps, codec=codec)


def _clip(count: int = 10) -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, (count, 16, 24, 3), dtype=np.uint8)


@pytest.mark.parametrize("name, codec", [("clip.mov", "png"), ("clip.mkv", "ffv1")])
def test_lossless_video_file_frames_exact(tmp_path, name, codec):
    """PNG in MOV records its frame count; FFV1 in Matroska does not (the packets are counted)."""
    frames = _clip()
    path = _write_video(tmp_path / name, frames, codec)
    out = load_frames(path, num_frames=4)
    assert out.indices.tolist() == [0, 3, 6, 9]
    np.testing.assert_array_equal(out.frames, frames[[0, 3, 6, 9]])
    assert (out.total_frames, out.fps, out.kind) == (10, 8.0, "video file")
    everything = load_frames(path)  # no num_frames: every frame
    np.testing.assert_array_equal(everything.frames, frames)
    np.testing.assert_array_equal(load_frames(path, num_frames=50).frames, frames)


def test_mp4_uses_transformers_load_video_with_pyav(tmp_path, monkeypatch):
    import transformers.video_utils as video_utils

    frames = _clip(12)
    path = _write_video(tmp_path / "clip.mp4", frames, "mpeg4", fps=6)
    calls = []
    real = video_utils.load_video

    def spy(video, *args, **kwargs):
        calls.append((video, kwargs.get("backend")))
        return real(video, *args, **kwargs)

    monkeypatch.setattr(video_utils, "load_video", spy)
    out = load_frames(path, num_frames=5)
    assert calls == [(str(path), "pyav")]
    assert out.frames.shape == (5, 16, 24, 3) and out.frames.dtype == np.uint8 and out.frames.flags.c_contiguous
    assert out.indices.tolist() == [0, 3, 6, 8, 11] and (out.total_frames, out.fps) == (12, 6.0)
    # lossy, but each kept frame is closest to its own source frame
    for kept, index in zip(out.frames.astype(int), out.indices):
        errors = np.abs(frames.astype(int) - kept).mean(axis=(1, 2, 3))
        assert errors.argmin() == index


def test_video_without_pyav(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av now fails as if not installed
    path = tmp_path / "clip.webm"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(FrameLoadError) as info:
        load_frames(path)
    message = str(info.value)
    assert "needs PyAV" in message and "pip install av" in message
    assert "folder of images" in message and ".npy" in message


def test_corrupt_video_names_the_file(tmp_path):
    pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(FrameLoadError, match=r"clip.mp4: cannot open the video \("):
        load_frames(path)


def test_fps_is_refused_for_a_video_file(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00")
    with pytest.raises(FrameLoadError, match="a video file carries its own frame rate"):
        load_frames(path, fps=30)
