"""``python -m std_ext generate`` on tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints built offline.

The checkpoints, the tokenizer and the video files come from ``cli_checkpoints`` (no
downloads). Where transformers' Qwen-VL video processors cannot load (no torchvision,
as on the CPU CI machines) the command takes std_ext's built-in preprocessing; the
tests check it three ways:

* pixels against explicit loops over patches, and target sizes against transformers'
  own resize rule where its module imports;
* everything else a processor returns (placeholders, Qwen3-VL's timestamps,
  ``mm_token_type_ids``, Qwen2.5-VL's ``second_per_grid_ts``) against transformers' own
  processor classes, run with a stand-in video processor;
* every output against the real ``AutoProcessor`` wherever torchvision imports (skipped
  otherwise: it runs on GPU machines).

End to end, the command's answer is checked against ``transformers``' ``generate`` on the
same inputs, and ``--compare`` must find StD's tokens identical to vanilla decoding's.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import cli_checkpoints as cc
import std_ext
import tiny_models as tm
from std_ext import cli_generate
from std_ext.cli_generate import (
    BuiltinFamily,
    CliError,
    QwenVideoParams,
    builtin_family,
    builtin_prompt,
    qwen2_vl_resized_size,
    qwen3_vl_resized_size,
    qwen_video_inputs,
)
from std_ext.frames import load_frames

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What moves in the video?"
MAX_NEW = 8
# The .npy video: 12x16 frames are multiples of patch*merge = 4 and inside Qwen2-VL's
# [min, max] pixels, so no resize; 7 frames exercise the repeat-the-last-frame padding.
FRAMES, HEIGHT, WIDTH = 7, 12, 16
# The video file: 12 frames of 30x40 at 8 fps (resized by every family), 8 of them sampled.
CLIP_FRAMES, CLIP_HEIGHT, CLIP_WIDTH, CLIP_FPS, CLIP_SAMPLED = 12, 30, 40, 8, 8
BUDGET = 120  # keeps some but not all visual tokens of every family's clip prompt


def _imports(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a torchvision built for another torch fails in many ways
        return False
    return True


# transformers' Qwen-VL video processors load only where torchvision (and Pillow) import.
PROCESSOR_AVAILABLE = _imports("torchvision") and _imports("PIL")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: cc.save_checkpoint(family, root / family) for family in cc.FAMILIES}


@pytest.fixture(scope="module")
def checkpoint(checkpoints) -> Path:
    return checkpoints["qwen2_vl"]


@pytest.fixture(scope="module")
def models(checkpoints) -> dict:
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            cache[family] = transformers.AutoModelForImageTextToText.from_pretrained(
                checkpoints[family], dtype=torch.float32).eval()
        return cache[family]

    return get


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def video(tmp_path_factory, frames) -> Path:
    path = tmp_path_factory.mktemp("video") / "video.npy"
    np.save(path, frames)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    pytest.importorskip("av")
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    return cc.write_video(path, cc.smooth_frames(CLIP_FRAMES, CLIP_HEIGHT, CLIP_WIDTH), fps=CLIP_FPS)


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    cli_generate.add_arguments(parser)
    code = cli_generate.run(parser.parse_args(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _argv(checkpoint, video, *extra: str) -> list[str]:
    # The CPU in float32 everywhere, so that the answers equal the fp32 CPU references.
    return ["--model", str(checkpoint), "--video", str(video), "--question", QUESTION, "--device", "cpu",
            "--max-new-tokens", str(MAX_NEW), "--no-progress", *extra]


def _answer(stdout: str) -> str:
    """The text between the 'Answer:' line and the first blank line."""
    lines = stdout.splitlines()
    start = lines.index("Answer:") + 1
    end = lines.index("", start)
    return "\n".join(lines[start:end])


def _text_of(ids: list[int]) -> str:
    return "".join(cc.CHARS[i] for i in ids).strip()


def _config(path: Path) -> transformers.PreTrainedConfig:
    return transformers.AutoConfig.from_pretrained(path)


# --------------------------------------------------------------------------- independent references


def reference_pixel_rows(frames: np.ndarray, patch: int, temporal: int, merge: int, mean=cc.MEAN,
                         std=cc.STD) -> tuple[torch.Tensor, list[int]]:
    """Qwen-VL patch rows by explicit loops; frames uint8 [T, H, W, 3] need no resize.

    Pixels are normalized as ``(x - 255 * mean) / (255 * std)`` in float32 (rescaling by
    1/255 folded into the normalization). Rows go over (t, block row, block column, row in
    block, column in block); a row's values over (channel, frame, pixel row, pixel column).
    """
    scaled_mean = torch.tensor(mean, dtype=torch.float32) * 255.0
    scaled_std = torch.tensor(std, dtype=torch.float32) * 255.0
    x = torch.from_numpy(frames).to(torch.float32)  # [T, H, W, C]
    x = ((x - scaled_mean) / scaled_std).numpy()
    padded = list(x) + [x[-1]] * (-len(x) % temporal)
    grid = [len(padded) // temporal, x.shape[1] // patch, x.shape[2] // patch]
    rows = []
    for t in range(grid[0]):
        for block_y in range(grid[1] // merge):
            for block_x in range(grid[2] // merge):
                for in_y in range(merge):
                    for in_x in range(merge):
                        top, left = (block_y * merge + in_y) * patch, (block_x * merge + in_x) * patch
                        rows.append([float(padded[t * temporal + k][top + py, left + px, channel])
                                     for channel in range(3) for k in range(temporal)
                                     for py in range(patch) for px in range(patch)])
    return torch.tensor(rows, dtype=torch.float32), grid


def reference_prompt_ids(n_visual: int) -> list[int]:
    """Qwen2-VL's chat prompt spelled out by hand: specials by id, text one id per character."""
    return ([tm.BOS_ID] + cc.text_ids("user\n") + [tm.VISION_START_ID] + [tm.VIDEO_ID] * n_visual
            + [tm.VISION_END_ID] + cc.text_ids(QUESTION) + [tm.EOS_ID] + cc.text_ids("\n") + [tm.BOS_ID]
            + cc.text_ids("assistant\n"))


def reference_inputs(frames: np.ndarray) -> dict[str, torch.Tensor]:
    """The Qwen2-VL checkpoint's inputs for ``frames`` (no resize), built by hand."""
    rows, grid = reference_pixel_rows(frames, cc.PATCH, cc.TEMPORAL, cc.MERGE)
    ids = torch.tensor([reference_prompt_ids(grid[0] * grid[1] * grid[2] // cc.MERGE**2)])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == tm.VIDEO_ID).long() * 2,
        "pixel_values_videos": rows,
        "video_grid_thw": torch.tensor([grid]),
    }


def _qwen2_params(**overrides) -> QwenVideoParams:
    values = {"patch_size": cc.PATCH, "temporal_patch_size": cc.TEMPORAL, "merge_size": cc.MERGE,
              "size": {"shortest_edge": 16, "longest_edge": 4096}, "image_mean": cc.MEAN, "image_std": cc.STD}
    return QwenVideoParams.from_dict({**values, **overrides}, "Qwen2VLVideoProcessor")


# --------------------------------------------------------------------------- built-in pixels


def test_builtin_pixels_match_loop_reference(checkpoint, frames):
    params, source = QwenVideoParams.from_checkpoint(checkpoint, _config(checkpoint).vision_config,
                                                     "Qwen2VLVideoProcessor")
    assert source == "preprocessor_config.json"
    assert (params.patch_size, params.temporal_patch_size, params.merge_size) == (2, 2, 2)
    assert (params.min_pixels, params.max_pixels) == (16, 1024)  # the legacy min_pixels / max_pixels keys
    params = _qwen2_params()
    out = qwen_video_inputs(frames, params)
    rows, grid = reference_pixel_rows(frames, 2, 2, 2)
    assert grid == [4, 6, 8]
    assert out["video_grid_thw"].tolist() == [grid] and out["video_grid_thw"].dtype == torch.long
    assert out["pixel_values_videos"].shape == (4 * 6 * 8, 3 * 2 * 2 * 2) == rows.shape
    assert out["pixel_values_videos"].dtype == torch.float32
    assert torch.equal(out["pixel_values_videos"], rows)


@pytest.mark.parametrize("patch, temporal, merge, n_frames", [(3, 3, 2, 5), (2, 1, 1, 3), (1, 2, 3, 4)])
def test_builtin_patch_order_other_sizes(patch, temporal, merge, n_frames):
    """The row/column order is right for every patch, temporal and merge size (no resize)."""
    side = patch * merge
    frames = np.random.default_rng(patch + temporal).integers(0, 256, (n_frames, 2 * side, 3 * side, 3), dtype=np.uint8)
    params = QwenVideoParams(patch_size=patch, temporal_patch_size=temporal, merge_size=merge, min_pixels=1,
                             max_pixels=10**6, image_mean=tuple(cc.MEAN), image_std=tuple(cc.STD))
    out = qwen_video_inputs(frames, params)
    rows, grid = reference_pixel_rows(frames, patch, temporal, merge)
    assert out["video_grid_thw"].tolist() == [grid]
    assert torch.equal(out["pixel_values_videos"], rows)


def test_qwen3_pixels_match_loop_reference(frames):
    """Qwen3-VL's video processor: the same patch layout, its own defaults (mean = std = 0.5)."""
    params = QwenVideoParams.from_dict({"patch_size": 2, "size": {"shortest_edge": 1, "longest_edge": 10**6}},
                                       "Qwen3VLVideoProcessor")
    assert params.image_mean == params.image_std == (0.5, 0.5, 0.5)
    out = qwen_video_inputs(frames, params)
    rows, grid = reference_pixel_rows(frames, 2, 2, 2, mean=[0.5] * 3, std=[0.5] * 3)
    assert out["video_grid_thw"].tolist() == [grid] == [[4, 6, 8]]
    assert torch.equal(out["pixel_values_videos"], rows)


@pytest.mark.parametrize(
    "height, width, factor, low, high, expected",
    [
        (12, 16, 4, 16, 4096, (12, 16)),  # already multiples, inside the bounds
        (30, 50, 4, 16, 4096, (32, 48)),  # nearest multiples: 7.5 -> 8, 12.5 -> 12 (round half to even)
        (480, 640, 28, 3136, 100352, (252, 364)),  # too many pixels: scaled down, floored to multiples
        (10, 10, 28, 56 * 56, 10**6, (56, 56)),  # too few pixels: scaled up, ceiled to multiples
        (2, 2, 4, 1, 100, (4, 4)),
    ],
)
def test_qwen2_resized_size(height, width, factor, low, high, expected):
    assert qwen2_vl_resized_size(height, width, factor, low, high) == expected


@pytest.mark.parametrize(
    "frames, height, width, low, high, expected",
    [
        (8, 30, 40, 64, 4096, (16, 24)),  # 8 x 32x40 is over the volume: scaled down
        (4, 2, 3, 1, 10**6, (4, 8)),  # sides under the factor: scaled up to 4x6 first, then rounded
        (2, 8, 8, 1024, 10**6, (24, 24)),  # under the minimum volume: scaled up
        (5, 16, 16, 1, 1200, (16, 16)),  # 5 frames count as round(2.5) * 2 = 4: 4 x 256 fits
        (7, 16, 16, 1, 1200, (12, 12)),  # 7 frames count as 8: 8 x 256 does not
    ],
)
def test_qwen3_resized_size(frames, height, width, low, high, expected):
    assert qwen3_vl_resized_size(frames, height, width, 2, 4, low, high) == expected


def test_resized_sizes_match_transformers_rules():
    """Against transformers' own smart_resize of each family, wherever its module imports."""
    rng = np.random.default_rng(0)
    cases = [(int(rng.integers(2, 40)), int(rng.integers(1, 300)), int(rng.integers(1, 300)),
              int(rng.integers(1, 2000)), int(rng.integers(2000, 200000))) for _ in range(300)]
    checked = 0
    qwen3 = importlib.import_module("transformers.models.qwen3_vl.video_processing_qwen3_vl")
    for frames, height, width, low, high in cases:
        if max(height, width) / min(height, width) > 100:
            continue
        assert qwen3_vl_resized_size(frames, height, width, 2, 8, low, high) == qwen3.smart_resize(
            frames, height, width, temporal_factor=2, factor=8, min_pixels=low, max_pixels=high)
        checked += 1
    try:
        qwen2 = importlib.import_module("transformers.models.qwen2_vl.video_processing_qwen2_vl")
    except ImportError:  # it imports torchvision at the top
        qwen2 = None
    if qwen2 is not None:
        for _, height, width, low, high in cases:
            if max(height, width) / min(height, width) <= 100 and min(height, width) >= 8:
                assert qwen2_vl_resized_size(height, width, 8, low, high) == qwen2.smart_resize(
                    height, width, factor=8, min_pixels=low, max_pixels=high)
    assert checked > 200


def test_resized_size_rejects_extreme_aspect():
    with pytest.raises(ValueError, match="aspect ratio must be at most 200"):
        qwen2_vl_resized_size(1, 201, 4, 1, 10**6)


def test_qwen3_needs_a_full_temporal_patch():
    params = QwenVideoParams.from_dict({"patch_size": 2}, "Qwen3VLVideoProcessor")
    with pytest.raises(ValueError, match=r"1 frame\(s\): Qwen3-VL's video processor needs at least 2"):
        qwen_video_inputs(np.zeros((1, 8, 8, 3), np.uint8), params)


def test_builtin_resize_keeps_constant_frames_constant():
    """Frames needing a resize: bicubic resampling of a flat colour is that colour."""
    frames = np.empty((3, 30, 50, 3), np.uint8)
    frames[...] = np.array([10, 128, 250], np.uint8)
    params = _qwen2_params()
    out = qwen_video_inputs(frames, params)
    assert out["video_grid_thw"].tolist() == [[2, 16, 24]]  # resized to 32x48
    expected = (torch.tensor([10.0, 128.0, 250.0]) - torch.tensor(params.image_mean) * 255.0) / (
        torch.tensor(params.image_std) * 255.0)
    values = out["pixel_values_videos"].reshape(-1, 3, 2 * 2 * 2)  # [rows, channel, frame*py*px]
    assert values.shape[0] == 2 * 16 * 24
    torch.testing.assert_close(values, expected[None, :, None].expand_as(values), rtol=0, atol=1e-6)


@pytest.mark.parametrize("video_processor, cap, expected", [
    ("Qwen2VLVideoProcessor", False, [1, 20, 30]),  # per frame: 40x60 = 2400 <= 2500 pixels
    ("Qwen2VLVideoProcessor", True, [1, 4, 6]),  # cap: int(0.9 * 10 tokens * 16) * 2 // 2 frames = 144 -> 8x12
    ("Qwen3VLVideoProcessor", False, [1, 14, 20]),  # per video: 2 x 28x40 = 2240 <= 2500
    ("Qwen3VLVideoProcessor", True, [1, 4, 6]),  # cap: min(10 * 16, 2500 // 2) = 160 per frame -> 8x12
])
def test_pixel_caps(video_processor, cap, expected):
    params = QwenVideoParams.from_dict({"patch_size": 2, "size": {"shortest_edge": 16, "longest_edge": 2500},
                                        "cap_pixels_per_frame": cap, "max_video_tokens": 10}, video_processor)
    grid = qwen_video_inputs(np.zeros((2, 200, 300, 3), np.uint8), params)["video_grid_thw"][0].tolist()
    assert grid == expected


# --------------------------------------------------------------------------- parameters and families


def test_params_defaults_per_family():
    qwen2 = QwenVideoParams.from_dict({}, "Qwen2VLVideoProcessor")
    assert (qwen2.patch_size, qwen2.min_pixels, qwen2.max_pixels) == (14, 128 * 28 * 28, 28 * 28 * 768)
    assert qwen2.image_mean[0] == pytest.approx(0.48145466) and qwen2.max_video_tokens == 128000
    qwen3 = QwenVideoParams.from_dict({}, "Qwen3VLVideoProcessor")
    assert (qwen3.patch_size, qwen3.min_pixels, qwen3.max_pixels) == (16, 128 * 32 * 32, 32 * 32 * 768)
    assert qwen3.image_mean == (0.5, 0.5, 0.5) and qwen3.max_video_tokens == 768


def test_params_pixel_keys():
    """Qwen2-VL's video processor lets min_pixels / max_pixels override size; Qwen3-VL's does not."""
    values = {"size": {"shortest_edge": 100, "longest_edge": 2000}, "min_pixels": 7, "max_pixels": 70,
              "image_mean": 0.5, "image_std": [0.1, 0.2, 0.3]}
    qwen2 = QwenVideoParams.from_dict(values, "Qwen2VLVideoProcessor")
    assert (qwen2.min_pixels, qwen2.max_pixels) == (7, 70)
    assert qwen2.image_mean == (0.5, 0.5, 0.5) and qwen2.image_std == (0.1, 0.2, 0.3)
    qwen3 = QwenVideoParams.from_dict(values, "Qwen3VLVideoProcessor")
    assert (qwen3.min_pixels, qwen3.max_pixels) == (100, 2000)


@pytest.mark.parametrize("values, words", [
    ({"resample": 2}, "resample 2: the built-in preprocessing resamples bicubic"),
    ({"size": {"height": 28, "width": 28}}, "needs both shortest_edge and longest_edge"),
])
def test_params_refuse_what_they_do_not_reproduce(values, words):
    with pytest.raises(ValueError, match=words):
        QwenVideoParams.from_dict(values, "Qwen3VLVideoProcessor")


def test_params_from_nested_processor_config(checkpoints):
    path = checkpoints["qwen3_vl"]
    params, source = QwenVideoParams.from_checkpoint(path, _config(path).vision_config, "Qwen3VLVideoProcessor")
    assert source == "processor_config.json"
    assert (params.patch_size, params.min_pixels, params.max_pixels) == (2, 64, 4096)


def test_params_must_agree_with_vision_tower(tmp_path):
    vision = transformers.AutoConfig.for_model("qwen2_vl").vision_config  # patch_size 14
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"patch_size": 16}))
    with pytest.raises(CliError, match="--model: .*video_preprocessor_config.json has patch_size 16 "
                                       "but the vision tower's config has 14"):
        QwenVideoParams.from_checkpoint(tmp_path, vision, "Qwen2VLVideoProcessor")


def test_builtin_family_of_each_layout(checkpoints):
    for family, path in checkpoints.items():
        assert builtin_family(path, _config(path)) == BuiltinFamily(cc.PROCESSORS[family], cc.VIDEO_PROCESSORS[family])


def test_builtin_family_from_the_model_type_alone(tmp_path):
    path = tmp_path / "bare"
    cc.make_model("qwen2_5_vl").config.save_pretrained(path)
    assert builtin_family(path, _config(path)) == BuiltinFamily("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor")


def test_builtin_family_refuses_other_processors(tmp_path):
    path = tmp_path / "llava"
    tm.make_model("llava_onevision").config.save_pretrained(path)
    with pytest.raises(CliError, match=r"--model: .*does not reproduce an unknown processor with an unknown video "
                                       r"processor \(model_type 'llava_onevision'\); it serves Qwen2VLProcessor"):
        builtin_family(path, _config(path))


# --------------------------------------------------------------------------- the rest of a processor's outputs


@pytest.mark.parametrize("family", cc.FAMILIES)
@pytest.mark.parametrize("source", ["video file", "npy", "npy at 4 fps"])
def test_builtin_outputs_match_transformers_processor_classes(family, source, checkpoints, clip, video):
    """input_ids (placeholders, timestamps), attention_mask, mm_token_type_ids and
    second_per_grid_ts exactly as transformers' processor class computes them."""
    path = checkpoints[family]
    frames = load_frames(clip, CLIP_SAMPLED) if source == "video file" else load_frames(
        video, 0, 4.0 if source == "npy at 4 fps" else None)
    prompt = builtin_prompt(path, _config(path), frames, QUESTION)
    text = cli_generate._chat_text(path, prompt.tokenizer, QUESTION)
    expected = cc.processor_outputs(family, prompt.tokenizer, text, frames.frames, frames.metadata(),
                                    prompt.model_inputs["pixel_values_videos"],
                                    prompt.model_inputs["video_grid_thw"][0].tolist())
    got = {"input_ids": prompt.input_ids, **prompt.model_inputs}
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    if family == "qwen2_5_vl":  # 2 frames per temporal patch, at the sampled rate
        rate = {"video file": CLIP_SAMPLED / CLIP_FRAMES * CLIP_FPS, "npy": 24.0, "npy at 4 fps": 4.0}[source]
        assert got["second_per_grid_ts"].tolist() == pytest.approx([2 / rate])
    if family == "qwen3_vl":
        stamps = prompt.tokenizer.decode(prompt.input_ids[0]).count(" seconds>")
        assert stamps == prompt.model_inputs["video_grid_thw"][0, 0]


@pytest.mark.skipif(not PROCESSOR_AVAILABLE, reason="transformers' Qwen-VL video processors need torchvision")
@pytest.mark.parametrize("family", cc.FAMILIES)
def test_builtin_matches_the_real_processor(family, checkpoints, clip, video):
    """Where AutoProcessor loads: every output of the built-in path equals the processor's, pixels included."""
    path = checkpoints[family]
    for frames in (load_frames(clip, CLIP_SAMPLED), load_frames(video, 0)):
        real = cli_generate.prepare_prompt(path, _config(path), frames, QUESTION, "processor")
        ours = cli_generate.prepare_prompt(path, _config(path), frames, QUESTION, "builtin")
        assert real.source.startswith("the checkpoint's processor")
        assert torch.equal(real.input_ids, ours.input_ids)
        assert sorted(real.model_inputs) == sorted(ours.model_inputs)
        for key, value in real.model_inputs.items():
            assert ours.model_inputs[key].dtype == value.dtype, key
            assert torch.equal(ours.model_inputs[key], value), key


# --------------------------------------------------------------------------- the command, end to end


@pytest.mark.parametrize("family", cc.FAMILIES)
def test_command_compare_is_exact(family, checkpoints, clip, models, capsys):
    """A video file through each family: StD == vanilla (--compare) == transformers' generate."""
    path = checkpoints[family]
    code, out, err = _run(_argv(path, clip, "--compare", "--gamma", "2", "--budget", str(BUDGET),
                                "--num-frames", str(CLIP_SAMPLED)), capsys)
    assert code == 0, err
    assert f"outputs          identical ({MAX_NEW} new tokens)" in out
    assert f"keep size        {BUDGET:.1f} positions per KV head" in out
    assert f"frames           {CLIP_SAMPLED} x {CLIP_HEIGHT}x{CLIP_WIDTH} of {CLIP_FRAMES} (video file, 8 fps)" in out
    expected_source = ("the checkpoint's processor" if PROCESSOR_AVAILABLE
                       else f"std_ext's built-in {cc.PROCESSORS[family]} preprocessing")
    assert f"model inputs     {expected_source}" in out

    prompt = builtin_prompt(path, _config(path), load_frames(clip, CLIP_SAMPLED), QUESTION)
    visual = int((prompt.input_ids == tm.VIDEO_ID).sum())
    assert f"visual tokens    {visual}\n" in out
    assert BUDGET - (prompt.input_ids.shape[1] - visual) in range(1, visual)  # some, not all, visual tokens kept
    hf = models(family).generate(prompt.input_ids, **prompt.model_inputs, max_new_tokens=MAX_NEW, do_sample=False)
    new = hf[0, prompt.input_ids.shape[1]:].tolist()
    assert len(new) == MAX_NEW
    assert _answer(out) == _text_of(new)


def test_answer_matches_hand_built_inputs(checkpoint, video, frames, models, capsys):
    """The .npy path with the prompt ids and pixel rows built by hand: the same answer as
    std_ext.generate(mode="vanilla") and transformers' generate on them."""
    code, out, err = _run(_argv(checkpoint, video, "--preprocess", "builtin"), capsys)
    assert code == 0, err
    inputs = reference_inputs(frames)
    n_prompt, n_visual = inputs["input_ids"].shape[1], 4 * 6 * 8 // 4
    model = models("qwen2_vl")
    vanilla = std_ext.generate(model, **inputs, mode="vanilla", max_new_tokens=MAX_NEW, do_sample=False)
    expected_ids = vanilla.sequences[0, n_prompt:].tolist()
    hf = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    assert hf[0, n_prompt:].tolist() == expected_ids
    assert _answer(out) == _text_of(expected_ids)
    assert f"prompt tokens    {n_prompt}\n" in out
    assert f"visual tokens    {n_visual}\n" in out
    assert f"frames           {FRAMES} x {HEIGHT}x{WIDTH} of {FRAMES} (.npy array, frame rate unknown)\n" in out
    assert f"new tokens       {MAX_NEW}\n" in out
    assert "std_ext's built-in Qwen2VLProcessor preprocessing (preprocessor_config.json)" in out
    assert "the frame rate is unknown" in err
    for label in ("keep size", "rounds", "mean accepted", "prefill", "selection", "draft", "verify", "tokens/s"):
        assert label in out


def test_auto_preprocess_says_which_path(checkpoint, video, capsys):
    code, out, err = _run(_argv(checkpoint, video, "--max-new-tokens", "2"), capsys)
    assert code == 0, err
    if PROCESSOR_AVAILABLE:
        assert "model inputs     the checkpoint's processor (Qwen2VLProcessor)" in out
    else:
        assert "model inputs     std_ext's built-in Qwen2VLProcessor preprocessing (preprocessor_config.json); " \
               "the checkpoint's processor is unavailable: it needs " in out


def test_fps_reaches_qwen2_5_vl(checkpoints, video, capsys):
    """--fps for an .npy video sets the rate Qwen2.5-VL's temporal positions use."""
    path = checkpoints["qwen2_5_vl"]
    code, out, err = _run(_argv(path, video, "--preprocess", "builtin", "--fps", "4", "--max-new-tokens", "2"),
                          capsys)
    assert code == 0, err
    assert "(.npy array, 4 fps)" in out and "frame rate is unknown" not in err


def test_small_budget_and_options(checkpoint, video, frames, models, capsys):
    """Sparse drafting over a 60-position keep set (45 text + 15 of 36 visual) still gives the dense answer."""
    argv = _argv(checkpoint, video, "--preprocess", "builtin", "--budget", "60", "--gamma", "3",
                 "--selection", "recent", "--num-frames", "5")
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    inputs = reference_inputs(frames[[0, 2, 3, 4, 6]])  # round(linspace(0, 6, 5))
    vanilla = std_ext.generate(models("qwen2_vl"), **inputs, mode="vanilla", max_new_tokens=MAX_NEW,
                               do_sample=False)
    assert _answer(out) == _text_of(vanilla.sequences[0, inputs["input_ids"].shape[1]:].tolist())
    assert "gamma=3, budget=60, selection=recent" in out
    assert "keep size        60.0 positions per KV head" in out
    assert "/ 3\n" in out


def test_progress_bars_do_not_change_the_answer(checkpoint, video, monkeypatch, capsys):
    """With progress bars on (the default) the answer is the one without them.

    tqdm redraws only when 0.1 s have passed since the last redraw, which a real model's
    decoder layer always takes; the eager bar redraws on every update so the tiny model
    hits the same code path.
    """
    tqdm_auto = pytest.importorskip("tqdm.auto")

    class EagerTqdm(tqdm_auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "mininterval": 0})

    code, quiet, err = _run(_argv(checkpoint, video, "--preprocess", "builtin", "--gamma", "3"), capsys)
    assert code == 0, err
    monkeypatch.setattr(tqdm_auto, "tqdm", EagerTqdm)
    argv = [arg for arg in _argv(checkpoint, video, "--preprocess", "builtin", "--gamma", "3")
            if arg != "--no-progress"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert "std_ext prefill" in err and "std_ext decode" in err
    assert _answer(out) == _answer(quiet)


def test_compare_mismatch_exits_1(checkpoint, video, capsys, monkeypatch):
    """If vanilla decoding disagreed, --compare says so and exits 1."""
    real = std_ext.generate

    def tampered(*args, **kwargs):
        output = real(*args, **kwargs)
        if kwargs["mode"] == "vanilla":
            output.sequences[0, -3] = (output.sequences[0, -3] + 1) % tm.TEXT_VOCAB
        return output

    monkeypatch.setattr(std_ext, "generate", tampered)
    code, out, err = _run(_argv(checkpoint, video, "--preprocess", "builtin", "--compare", "--gamma", "3"), capsys)
    assert code == 1
    assert f"DIFFERENT (first difference at new token {MAX_NEW - 3})" in out
    assert "Vanilla answer:" in out


def test_gamma_auto(checkpoint, video, capsys):
    """--gamma auto picks each round's γ; the answer is still the dense one."""
    code, out, err = _run(_argv(checkpoint, video, "--preprocess", "builtin", "--gamma", "auto"), capsys)
    assert code == 0, err
    assert "gamma=auto, " in out
    gammas = out.split("gamma per round  ")[1].splitlines()[0].split()
    assert gammas and all(0 <= int(g) <= 12 for g in gammas)
    code, dense_out, err = _run(_argv(checkpoint, video, "--preprocess", "builtin", "--gamma", "1"), capsys)
    assert code == 0, err
    assert _answer(out) == _answer(dense_out)


# --------------------------------------------------------------------------- bad inputs


def _write_config(path: Path, config: transformers.PreTrainedConfig) -> Path:
    path.mkdir()
    config.save_pretrained(path)
    return path


def _copy_without(checkpoint: Path, target: Path, prefix: str) -> Path:
    shutil.copytree(checkpoint, target, ignore=lambda _, names: [n for n in names if n.startswith(prefix)])
    return target


@pytest.mark.parametrize(
    "case, argument, words",
    [
        ("missing_model", "--model", "no such directory"),
        ("model_is_file", "--model", "not a directory"),
        ("no_config", "--model", "not a transformers checkpoint (no config.json)"),
        ("bad_config", "--model", "not a transformers checkpoint this transformers"),
        ("text_only", "--model", "Qwen2ForCausalLM is a text-only model (its config names no video or image "
                                 "placeholder token)"),
        ("refused_model", "--model", "Qwen3_5ForConditionalGeneration uses layers that keep a recurrent state"),
        ("missing_video", "--video", "no such file or folder"),
        ("empty_folder", "--video", "the folder holds no images"),
        ("bad_npy", "--video", "array of shape [7, 12, 16]; expected RGB frames"),
        ("corrupt_video", "--video", "clip.mp4: cannot open the video"),
        ("fps_for_video_file", "--fps", "is a video file, which carries its own frame rate"),
        ("empty_question", "--question", "the question is empty"),
        ("no_weights", "--model", "cannot load the Qwen2VLForConditionalGeneration weights"),
        ("no_tokenizer", "--model", "cannot load the tokenizer (none of tokenizer.json"),
        ("no_chat_template", "--model", "the checkpoint has no chat template"),
        ("wrong_tokenizer", "--model",
         "the tokenizer maps <|video_pad|> to 251, but the model's video_token_id is 250"),
        ("no_params", "--model", "no video preprocessing parameters"),
        ("one_frame_qwen3", "--video", "1 frame(s): Qwen3-VL's video processor needs at least 2"),
        ("big_video", "", "does not fit the model's 4096 positions"),
    ],
)
def test_bad_input_exit_2(case, argument, words, checkpoints, video, tmp_path, capsys):
    checkpoint = checkpoints["qwen2_vl"]
    model_dir, video_path, question, extra = str(checkpoint), str(video), QUESTION, []
    if case == "missing_model":
        model_dir = str(tmp_path / "nowhere")
    elif case == "model_is_file":
        model_dir = str(video)
    elif case == "no_config":
        model_dir = str(tmp_path)
    elif case == "bad_config":
        (tmp_path / "config.json").write_text("{not json")
        model_dir = str(tmp_path)
    elif case == "text_only":
        model_dir = str(_write_config(tmp_path / "qwen2", transformers.Qwen2Config(architectures=["Qwen2ForCausalLM"])))
    elif case == "refused_model":
        config = transformers.AutoConfig.for_model("qwen3_5", architectures=["Qwen3_5ForConditionalGeneration"])
        model_dir = str(_write_config(tmp_path / "qwen3_5", config))
    elif case == "missing_video":
        video_path = str(tmp_path / "missing.npy")
    elif case == "empty_folder":
        video_path = str(tmp_path)
    elif case == "bad_npy":
        np.save(tmp_path / "gray.npy", np.zeros((7, 12, 16), np.uint8))
        video_path = str(tmp_path / "gray.npy")
    elif case == "corrupt_video":
        pytest.importorskip("av")
        (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
        video_path = str(tmp_path / "clip.mp4")
    elif case == "fps_for_video_file":
        (tmp_path / "clip.mp4").write_bytes(b"\x00")
        video_path, extra = str(tmp_path / "clip.mp4"), ["--fps", "30"]
    elif case == "empty_question":
        question = "   "
    elif case in ("no_weights", "no_tokenizer", "no_params", "no_chat_template"):
        prefix = {"no_weights": "model.safetensors", "no_tokenizer": "tokenizer", "no_params": "preprocessor_config",
                  "no_chat_template": "chat_template"}[case]
        model_dir = _copy_without(checkpoint, tmp_path / "partial", prefix)
    elif case == "wrong_tokenizer":
        model_dir = tmp_path / "swapped"
        shutil.copytree(checkpoint, model_dir)
        tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
        swap = {"<|video_pad|>": "<|image_pad|>", "<|image_pad|>": "<|video_pad|>"}  # swap the placeholders' ids
        vocab = tokenizer_json["model"]["vocab"]
        ids = {token: vocab[token] for token in swap}
        vocab.update({token: ids[other] for token, other in swap.items()})
        for entry in tokenizer_json["added_tokens"]:
            if entry["content"] in swap:
                entry["id"] = ids[swap[entry["content"]]]
        (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    elif case == "one_frame_qwen3":
        model_dir = str(checkpoints["qwen3_vl"])
        np.save(tmp_path / "one.npy", np.zeros((1, 8, 8, 3), np.uint8))
        video_path = str(tmp_path / "one.npy")
    elif case == "big_video":
        # 32 frames of 64x64 with min = max = 4096 pixels: 16 x 32 x 32 patches = 4096
        # visual tokens, past the model's 4096 positions
        model_dir = _copy_without(checkpoint, tmp_path / "big", "preprocessor_config")
        params = json.loads((checkpoint / "preprocessor_config.json").read_text()) | {"min_pixels": 4096,
                                                                                      "max_pixels": 4096}
        (model_dir / "preprocessor_config.json").write_text(json.dumps(params))
        np.save(tmp_path / "big.npy", np.zeros((32, 64, 64, 3), np.uint8))
        video_path = str(tmp_path / "big.npy")
    argv = ["--model", str(model_dir), "--video", video_path, "--question", question, "--no-progress",
            "--preprocess", "builtin", "--num-frames", "0", "--device", "cpu", *extra]
    code, out, err = _run(argv, capsys)
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    prefix = f"python -m std_ext generate: error: {argument}: " if argument else "python -m std_ext generate: error: "
    error_lines = [line for line in err.splitlines() if line.startswith("python -m std_ext generate: error:")]
    assert len(error_lines) == 1 and error_lines[0].startswith(prefix), err
    assert words in error_lines[0], err


@pytest.mark.skipif(PROCESSOR_AVAILABLE, reason="the processor loads here")
def test_processor_only_without_torchvision_is_a_clear_error(checkpoint, video, capsys):
    code, out, err = _run(_argv(checkpoint, video, "--preprocess", "processor"), capsys)
    assert code == 2 and out == ""
    assert "--model: " in err and "the checkpoint's processor cannot load (it needs " in err
    assert "pip install pillow torchvision" in err


@pytest.mark.parametrize("preprocess, argument, words", [
    ("auto", "--model", "and std_ext's built-in preprocessing does not reproduce"),
    ("builtin", "--preprocess", "std_ext's built-in preprocessing does not reproduce"),
])
def test_llava_onevision_needs_its_processor(preprocess, argument, words, video, tmp_path, capsys):
    """A supported model whose processor cannot load and that the built-in path does not serve."""
    model_dir = tmp_path / "llava"
    tm.make_model("llava_onevision").config.save_pretrained(model_dir)  # the config is all it gets to
    argv = ["--model", str(model_dir), "--video", str(video), "--question", QUESTION, "--preprocess", preprocess]
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == ""
    assert f"error: {argument}: " in err and words in err and "Traceback" not in err
    assert "model_type 'llava_onevision'" in err
    if preprocess == "auto":
        assert "the checkpoint's processor cannot load" in err


@pytest.mark.parametrize("option, value", [("--gamma", "0"), ("--gamma", "fast"), ("--max-new-tokens", "-1"),
                                           ("--budget", "x"), ("--selection", "best"), ("--num-frames", "-2"),
                                           ("--device", "tpu"), ("--fps", "0"), ("--fps", "fast")])
def test_bad_option_values_are_argparse_errors(option, value, capsys):
    parser = argparse.ArgumentParser()
    cli_generate.add_arguments(parser)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--model", "m", "--video", "v", "--question", "q", option, value])
    assert info.value.code == 2
    assert option in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    """``python -m std_ext generate`` end to end: the clear message and exit 2, no traceback."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "std_ext", "generate", "--model", str(tmp_path / "none"), "--video", "v.npy",
         "--question", "q"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    assert result.returncode == 2
    assert "error: --model: " in result.stderr and "no such directory" in result.stderr
    assert "Traceback" not in result.stderr
