"""std_ext.frames.load_frames: .npy layouts and dtypes, uniform sampling, image folders,
video files, and the errors for bad inputs.

Pillow and the video decoders are optional and absent in CI: "missing" is forced with
``sys.modules[name] = None`` (so those tests hold whether or not a package is
installed), and "present" uses small fake modules that implement just the calls
load_frames makes; one test uses the real Pillow when it is installed.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from std_ext.frames import FrameLoadError, load_frames, sample_indices

T, H, W = 6, 5, 7


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
    out = load_frames(_save(tmp_path, frames))
    assert out.dtype == np.uint8 and out.shape == (T, H, W, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, frames)


def test_npy_channels_first(tmp_path):
    frames = _video()
    out = load_frames(_save(tmp_path, frames.transpose(0, 3, 1, 2)))
    assert out.shape == (T, H, W, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, frames)


def test_npy_last_axis_3_wins_when_ambiguous(tmp_path):
    frames = np.random.default_rng(1).integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
    np.testing.assert_array_equal(load_frames(_save(tmp_path, frames)), frames)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_npy_float_unit_range_is_scaled(tmp_path, dtype):
    frames = _video()
    unit = (frames.astype(np.float64) / 255.0).astype(dtype)
    out = load_frames(_save(tmp_path, unit))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.rint(unit.astype(np.float64) * 255.0).astype(np.uint8))
    assert np.abs(out.astype(int) - frames.astype(int)).max() <= (1 if dtype == np.float16 else 0)


def test_npy_float_255_range_is_rounded(tmp_path):
    values = np.array([0.0, 1.4, 1.6, 254.5, 255.0, 128.0], dtype=np.float32).reshape(1, 2, 1, 3)
    out = load_frames(_save(tmp_path, values))
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
    out = load_frames(path, num_frames=3)
    assert out.shape == (3, H, W, 3)
    assert out[:, 0, 0, 0].tolist() == [0, 20, 50]  # frames 0, round(2.5)=2, 5
    np.testing.assert_array_equal(out, frames[[0, 2, 5]])
    np.testing.assert_array_equal(load_frames(path, num_frames=0), frames)  # 0 = all
    np.testing.assert_array_equal(load_frames(path, num_frames=100), frames)


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
    out = load_frames(tmp_path)
    assert out.shape == (5, 3, 4, 3) and out.dtype == np.uint8
    assert out[:, 0, 0, 0].tolist() == [1, 2, 9, 10, 100]
    opened.clear()
    out = load_frames(tmp_path, num_frames=3)
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
    np.testing.assert_array_equal(load_frames(tmp_path), frames)


# --------------------------------------------------------------------------- video files

_DECODER_MODULES = ("av", "decord", "cv2", "torchvision", "torchvision.io")


def _no_decoders(monkeypatch):
    for name in _DECODER_MODULES:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("suffix", [".mp4", ".avi", ".mkv", ".webm", ".MOV"])
def test_video_without_decoders(tmp_path, monkeypatch, suffix):
    _no_decoders(monkeypatch)
    path = tmp_path / f"clip{suffix}"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(FrameLoadError) as info:
        load_frames(path)
    message = str(info.value)
    assert "needs a decoder package" in message
    for package in ("av", "decord", "opencv-python", "torchvision"):
        assert package in message
    assert "folder of images" in message and ".npy" in message


def test_video_with_decord(tmp_path, monkeypatch):
    """A (fake) decord decodes only the sampled frames."""
    _no_decoders(monkeypatch)
    frames = np.stack([np.full((4, 6, 3), t, np.uint8) for t in range(20)])
    asked: list[list[int]] = []

    class Batch:
        def __init__(self, array):
            self.array = array

        def asnumpy(self):
            return self.array

    class VideoReader:
        def __init__(self, path, ctx=None):
            assert path.endswith("clip.mp4")

        def __len__(self):
            return len(frames)

        def get_batch(self, indices):
            asked.append(list(indices))
            return Batch(frames[indices])

    decord = types.ModuleType("decord")
    decord.VideoReader, decord.cpu = VideoReader, lambda index: ("cpu", index)
    monkeypatch.setitem(sys.modules, "decord", decord)
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00")
    out = load_frames(path, num_frames=5)
    assert asked == [[0, 5, 10, 14, 19]]
    assert out.shape == (5, 4, 6, 3) and out[:, 0, 0, 0].tolist() == [0, 5, 10, 14, 19]


def test_video_with_cv2_converts_bgr(tmp_path, monkeypatch):
    _no_decoders(monkeypatch)
    bgr = [np.stack([np.full((2, 3), t), np.zeros((2, 3)), np.full((2, 3), 200)], -1).astype(np.uint8)
           for t in range(4)]

    class Capture:
        def __init__(self, path):
            self.frames = list(bgr)

        def isOpened(self):
            return True

        def get(self, prop):
            return float(len(bgr))

        def read(self):
            return (True, self.frames.pop(0)) if self.frames else (False, None)

        def release(self):
            pass

    cv2 = types.ModuleType("cv2")
    cv2.VideoCapture, cv2.CAP_PROP_FRAME_COUNT, cv2.COLOR_BGR2RGB = Capture, 7, 4
    cv2.cvtColor = lambda frame, code: frame[..., ::-1]
    monkeypatch.setitem(sys.modules, "cv2", cv2)
    path = tmp_path / "clip.avi"
    path.write_bytes(b"\x00")
    out = load_frames(path, num_frames=2)
    assert out.shape == (2, 2, 3, 3)
    assert out[:, 0, 0].tolist() == [[200, 0, 0], [200, 0, 3]]  # RGB, frames 0 and 3


def test_decoder_failure_names_the_file(tmp_path, monkeypatch):
    _no_decoders(monkeypatch)
    decord = types.ModuleType("decord")

    def broken(path, ctx=None):
        raise RuntimeError("moov atom not found")

    decord.VideoReader, decord.cpu = broken, lambda index: None
    monkeypatch.setitem(sys.modules, "decord", decord)
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00")
    with pytest.raises(FrameLoadError, match=r"clip.mp4: decord could not decode the video \(RuntimeError: moov atom"):
        load_frames(path)
