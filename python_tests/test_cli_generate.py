"""``python -m std_ext generate`` on a tiny Qwen2-VL checkpoint built offline in a temp dir.

The checkpoint: tiny_models' fixed-seed random Qwen2-VL (patch 2, temporal patch 2,
merge 2) saved with ``save_pretrained``; a character-level tokenizer made with the
``tokenizers`` library whose special tokens sit at the ids the tiny model uses
(``<|vision_start|>`` 248, ``<|vision_end|>`` 249, ``<|video_pad|>`` 250,
``<|image_pad|>`` 251, ``<|im_start|>`` 252, ``<|im_end|>`` 253 = eos,
``<|endoftext|>`` 255 = pad), with a Qwen2-VL-style chat template; and a
``preprocessor_config.json``. Pillow and torchvision are absent here, so the checkpoint's
AutoProcessor cannot load and the command takes its built-in Qwen2-VL preprocessing; the
tests that depend on that say so with ``--preprocess builtin``.

Everything the command prints is checked against independent computations: the prompt
ids spelled out by hand, the pixel rows from explicit loops over patches, and the
answer from ``std_ext.generate(mode="vanilla")`` and from ``model.generate``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
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
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

import std_ext
import tiny_models as tm
from std_ext import cli_generate
from std_ext.cli_generate import Qwen2VLVideoParams, qwen2_vl_resized_size, qwen2_vl_video_inputs

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What moves in the video?"
MAX_NEW = 12
# Frames of 12x16 pixels are multiples of patch*merge = 4 and inside [min, max] pixels,
# so no resize; 7 frames exercise the repeat-the-last-frame padding (grid_t = 4).
FRAMES, HEIGHT, WIDTH = 7, 12, 16
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]

# Text vocabulary: printable ASCII and newline, then CJK characters up to TEXT_VOCAB, so
# every id decodes to exactly one distinct character.
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
CHARS += [chr(0x4E00 + i) for i in range(tm.TEXT_VOCAB - len(CHARS))]
SPECIALS = {
    "<|vision_start|>": tm.VISION_START_ID,
    "<|vision_end|>": tm.VISION_END_ID,
    "<|video_pad|>": tm.VIDEO_ID,
    "<|image_pad|>": tm.IMAGE_ID,
    "<|im_start|>": tm.BOS_ID,
    "<|im_end|>": tm.EOS_ID,
    "<|unused|>": 254,
    "<|endoftext|>": tm.PAD_ID,
}
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --------------------------------------------------------------------------- fixtures


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {c: i for i, c in enumerate(CHARS)} | SPECIALS
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|unused|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()  # characters join without spaces
    core.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIALS])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|unused|>",
        chat_template=CHAT_TEMPLATE,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_qwen2_vl")
    tm.make_model("qwen2_vl", seed=0).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    config = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "min_pixels": 16, "max_pixels": 4096,
        "patch_size": tm.QWEN_PATCH, "temporal_patch_size": tm.QWEN_TEMPORAL_PATCH, "merge_size": tm.QWEN_MERGE,
        "image_mean": MEAN, "image_std": STD,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return transformers.Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def video(tmp_path_factory, frames) -> Path:
    path = tmp_path_factory.mktemp("video") / "video.npy"
    np.save(path, frames)
    return path


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    cli_generate.add_arguments(parser)
    code = cli_generate.run(parser.parse_args(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _argv(checkpoint, video, *extra: str) -> list[str]:
    return ["--model", str(checkpoint), "--video", str(video), "--question", QUESTION,
            "--max-new-tokens", str(MAX_NEW), "--no-progress", *extra]


def _processor_deps_missing() -> bool:
    """Whether transformers' Qwen2-VL video processor cannot load here (it needs Pillow and torchvision)."""
    return importlib.util.find_spec("torchvision") is None or importlib.util.find_spec("PIL") is None


def _answer(stdout: str) -> str:
    """The text between the 'Answer:' line and the first blank line."""
    lines = stdout.splitlines()
    start = lines.index("Answer:") + 1
    end = lines.index("", start)
    return "\n".join(lines[start:end])


# --------------------------------------------------------------------------- independent references


def reference_pixel_rows(frames: np.ndarray, patch: int, temporal: int, merge: int) -> tuple[torch.Tensor, list[int]]:
    """Qwen2-VL patch rows by explicit loops; frames uint8 [T, H, W, 3] need no resize.

    Pixels are normalized as ``(x - 255 * mean) / (255 * std)`` in float32 (rescaling by
    1/255 folded into the normalization). Rows go over (t, block row, block column, row in
    block, column in block); a row's values over (channel, frame, pixel row, pixel column).
    """
    scaled_mean = torch.tensor(MEAN, dtype=torch.float32) * 255.0
    scaled_std = torch.tensor(STD, dtype=torch.float32) * 255.0
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
    """The chat prompt spelled out by hand: specials by id, text one id per character."""
    def text(s: str) -> list[int]:
        return [CHARS.index(c) for c in s]

    return ([tm.BOS_ID] + text("user\n") + [tm.VISION_START_ID] + [tm.VIDEO_ID] * n_visual + [tm.VISION_END_ID]
            + text(QUESTION) + [tm.EOS_ID] + text("\n") + [tm.BOS_ID] + text("assistant\n"))


def reference_inputs(frames: np.ndarray) -> dict[str, torch.Tensor]:
    rows, grid = reference_pixel_rows(frames, tm.QWEN_PATCH, tm.QWEN_TEMPORAL_PATCH, tm.QWEN_MERGE)
    n_visual = grid[0] * grid[1] * grid[2] // tm.QWEN_MERGE**2
    return {
        "input_ids": torch.tensor([reference_prompt_ids(n_visual)]),
        "pixel_values_videos": rows,
        "video_grid_thw": torch.tensor([grid]),
    }


# --------------------------------------------------------------------------- built-in preprocessing


def test_builtin_preprocessing_matches_loop_reference(checkpoint, frames):
    vision = transformers.AutoConfig.from_pretrained(checkpoint).vision_config
    params, source = Qwen2VLVideoParams.from_checkpoint(checkpoint, vision)
    assert source == "preprocessor_config.json"
    assert (params.patch_size, params.temporal_patch_size, params.merge_size) == (2, 2, 2)
    assert (params.min_pixels, params.max_pixels) == (16, 4096)
    out = qwen2_vl_video_inputs(frames, params)
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
    params = Qwen2VLVideoParams(patch_size=patch, temporal_patch_size=temporal, merge_size=merge, min_pixels=1,
                                max_pixels=10**6, image_mean=tuple(MEAN), image_std=tuple(STD))
    out = qwen2_vl_video_inputs(frames, params)
    rows, grid = reference_pixel_rows(frames, patch, temporal, merge)
    assert out["video_grid_thw"].tolist() == [grid]
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
def test_resized_size(height, width, factor, low, high, expected):
    assert qwen2_vl_resized_size(height, width, factor, low, high) == expected
    new_h, new_w = expected
    assert new_h % factor == 0 and new_w % factor == 0


def test_resized_size_rejects_extreme_aspect():
    with pytest.raises(ValueError, match="aspect ratio must be at most 200"):
        qwen2_vl_resized_size(1, 201, 4, 1, 10**6)


def test_builtin_resize_keeps_constant_frames_constant():
    """Frames needing a resize: bicubic resampling of a flat colour is that colour."""
    frames = np.empty((3, 30, 50, 3), np.uint8)
    frames[...] = np.array([10, 128, 250], np.uint8)
    params = Qwen2VLVideoParams(patch_size=2, temporal_patch_size=2, merge_size=2, min_pixels=16, max_pixels=4096)
    out = qwen2_vl_video_inputs(frames, params)
    assert out["video_grid_thw"].tolist() == [[2, 16, 24]]  # resized to 32x48
    expected = (torch.tensor([10.0, 128.0, 250.0]) - torch.tensor(params.image_mean) * 255.0) / (
        torch.tensor(params.image_std) * 255.0)
    values = out["pixel_values_videos"].reshape(-1, 3, 2 * 2 * 2)  # [rows, channel, frame*py*px]
    assert values.shape[0] == 2 * 16 * 24
    torch.testing.assert_close(values, expected[None, :, None].expand_as(values), rtol=0, atol=1e-6)


def test_builtin_resize_caps_pixels():
    frames = np.zeros((2, 200, 300, 3), np.uint8)
    params = Qwen2VLVideoParams(patch_size=2, temporal_patch_size=2, merge_size=2, min_pixels=16, max_pixels=1600)
    grid = qwen2_vl_video_inputs(frames, params)["video_grid_thw"][0].tolist()
    assert grid[0] == 1 and grid[1] * grid[2] * 4 <= 1600 and grid[1] % 2 == 0 and grid[2] % 2 == 0


def test_builtin_matches_transformers_video_processor():
    """Where Pillow and torchvision are installed: the same numbers as transformers' own
    Qwen2-VL video processor, resize included (skipped here and in CI, where they are not)."""
    pytest.importorskip("PIL")
    pytest.importorskip("torchvision")
    kwargs = dict(patch_size=2, temporal_patch_size=2, merge_size=2, min_pixels=16, max_pixels=4096,
                  image_mean=MEAN, image_std=STD)
    processor = transformers.Qwen2VLVideoProcessor(**kwargs)
    params = Qwen2VLVideoParams(**{**kwargs, "image_mean": tuple(MEAN), "image_std": tuple(STD)})
    frames = np.random.default_rng(3).integers(0, 256, (5, 30, 50, 3), dtype=np.uint8)  # resized to 32x48
    expected = processor(videos=[frames], return_tensors="pt", do_sample_frames=False, cap_pixels_per_frame=False)
    out = qwen2_vl_video_inputs(frames, params)
    assert out["video_grid_thw"].tolist() == expected["video_grid_thw"].tolist() == [[3, 16, 24]]
    torch.testing.assert_close(out["pixel_values_videos"], expected["pixel_values_videos"], rtol=0, atol=1e-5)


def test_params_from_nested_and_size_keys(tmp_path):
    vision = transformers.AutoConfig.for_model("qwen2_vl").vision_config
    (tmp_path / "processor_config.json").write_text(json.dumps({"video_processor": {
        "size": {"shortest_edge": 100, "longest_edge": 2000}, "image_mean": 0.5, "image_std": [0.1, 0.2, 0.3]}}))
    params, source = Qwen2VLVideoParams.from_checkpoint(tmp_path, vision)
    assert source == "processor_config.json"
    assert (params.min_pixels, params.max_pixels, params.patch_size) == (100, 2000, 14)
    assert params.image_mean == (0.5, 0.5, 0.5) and params.image_std == (0.1, 0.2, 0.3)


def test_params_must_agree_with_vision_tower(tmp_path):
    vision = transformers.AutoConfig.for_model("qwen2_vl").vision_config  # patch_size 14
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"patch_size": 16}))
    with pytest.raises(cli_generate.CliError, match="--model: .*video_preprocessor_config.json has patch_size 16 "
                                                    "but the vision tower's config has 14"):
        Qwen2VLVideoParams.from_checkpoint(tmp_path, vision)


# --------------------------------------------------------------------------- the command


def test_answer_matches_vanilla_and_hf_generate(checkpoint, video, frames, model, capsys):
    code, out, err = _run(_argv(checkpoint, video, "--preprocess", "builtin"), capsys)
    assert code == 0, err
    inputs = reference_inputs(frames)
    n_prompt, n_visual = inputs["input_ids"].shape[1], 4 * 6 * 8 // 4

    vanilla = std_ext.generate(model, inputs["input_ids"], mode="vanilla", max_new_tokens=MAX_NEW,
                               pixel_values_videos=inputs["pixel_values_videos"],
                               video_grid_thw=inputs["video_grid_thw"])
    expected_ids = vanilla.sequences[0, n_prompt:].tolist()
    assert len(expected_ids) == MAX_NEW  # the tiny model never emits eos
    token_types = (inputs["input_ids"] == tm.VIDEO_ID).long() * 2
    hf = model.generate(**inputs, mm_token_type_ids=token_types, attention_mask=torch.ones_like(inputs["input_ids"]),
                        max_new_tokens=MAX_NEW, do_sample=False)
    assert hf[0, n_prompt:].tolist() == expected_ids

    expected_text = "".join(CHARS[i] for i in expected_ids).strip()
    assert _answer(out) == expected_text
    assert f"prompt tokens    {n_prompt}\n" in out
    assert f"visual tokens    {n_visual}\n" in out
    assert f"frames           {FRAMES} x {HEIGHT}x{WIDTH}\n" in out
    assert f"new tokens       {MAX_NEW}\n" in out
    assert "std_ext's built-in Qwen2-VL preprocessing (preprocessor_config.json)" in out
    for label in ("keep size", "rounds", "mean accepted", "prefill", "selection", "draft", "verify", "tokens/s"):
        assert label in out


def test_auto_preprocess_says_which_path(checkpoint, video, capsys):
    code, out, err = _run(_argv(checkpoint, video, "--max-new-tokens", "2"), capsys)
    assert code == 0, err
    if _processor_deps_missing():
        assert "video inputs     std_ext's built-in Qwen2-VL preprocessing (preprocessor_config.json); " \
               "the checkpoint's processor is unavailable: " in out
    else:
        assert "video inputs     " in out


def test_small_budget_and_options(checkpoint, video, frames, model, capsys):
    """Sparse drafting over a 60-position keep set (45 text + 15 of 36 visual) still gives the dense answer."""
    argv = _argv(checkpoint, video, "--preprocess", "builtin", "--budget", "60", "--gamma", "3",
                 "--selection", "recent", "--num-frames", "5")
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    sampled = frames[[0, 2, 3, 4, 6]]  # round(linspace(0, 6, 5))
    inputs = reference_inputs(sampled)
    vanilla = std_ext.generate(model, inputs["input_ids"], mode="vanilla", max_new_tokens=MAX_NEW,
                               pixel_values_videos=inputs["pixel_values_videos"],
                               video_grid_thw=inputs["video_grid_thw"])
    expected = "".join(CHARS[i] for i in vanilla.sequences[0, inputs["input_ids"].shape[1]:].tolist()).strip()
    assert _answer(out) == expected
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

    code, quiet, err = _run(_argv(checkpoint, video, "--preprocess", "builtin"), capsys)
    assert code == 0, err
    monkeypatch.setattr(tqdm_auto, "tqdm", EagerTqdm)
    argv = [arg for arg in _argv(checkpoint, video, "--preprocess", "builtin") if arg != "--no-progress"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert "std_ext prefill" in err and "std_ext decode" in err
    assert _answer(out) == _answer(quiet)


def test_compare_reports_identical(checkpoint, video, capsys):
    code, out, err = _run(_argv(checkpoint, video, "--preprocess", "builtin", "--compare", "--budget", "60"), capsys)
    assert code == 0, err
    assert "Vanilla decoding:" in out
    assert "decode speedup" in out
    assert f"outputs          identical ({MAX_NEW} new tokens)" in out


def test_compare_mismatch_exits_1(checkpoint, video, capsys, monkeypatch):
    """If vanilla decoding disagreed, --compare says so and exits 1."""
    real = std_ext.generate

    def tampered(*args, **kwargs):
        output = real(*args, **kwargs)
        if kwargs["mode"] == "vanilla":
            output.sequences[0, -3] = (output.sequences[0, -3] + 1) % tm.TEXT_VOCAB
        return output

    monkeypatch.setattr(std_ext, "generate", tampered)
    code, out, err = _run(_argv(checkpoint, video, "--preprocess", "builtin", "--compare"), capsys)
    assert code == 1
    assert f"DIFFERENT (first difference at new token {MAX_NEW - 3})" in out
    assert "Vanilla answer:" in out


# --------------------------------------------------------------------------- bad inputs


def _write_config(path: Path, config: transformers.PreTrainedConfig) -> Path:
    path.mkdir()
    config.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "case, argument, words",
    [
        ("missing_model", "--model", "no such directory"),
        ("model_is_file", "--model", "not a directory"),
        ("no_config", "--model", "not a transformers checkpoint (no config.json)"),
        ("bad_config", "--model", "not a transformers checkpoint this transformers"),
        ("unsupported", "--model", "GPT2LMHeadModel is not supported; std_ext supports Qwen2ForCausalLM"),
        ("text_only", "--model", "Qwen2ForCausalLM is a text-only model; generate needs a video LLM"),
        ("missing_video", "--video", "no such file or folder"),
        ("empty_folder", "--video", "the folder holds no images"),
        ("bad_npy", "--video", "array of shape [7, 12, 16]; expected RGB frames"),
        ("empty_question", "--question", "the question is empty"),
        ("no_weights", "--model", "cannot load the Qwen2VLForConditionalGeneration weights"),
        ("no_tokenizer", "--model", "cannot load the tokenizer (none of tokenizer.json"),
        ("wrong_tokenizer", "--model",
         "the tokenizer maps <|video_pad|> to 251, but the model's video_token_id is 250"),
        ("no_params", "--model", "no video preprocessing parameters"),
        ("big_video", "", "does not fit the model's 4096 positions"),
    ],
)
def test_bad_input_exit_2(case, argument, words, checkpoint, video, tmp_path, capsys):
    model_dir, video_path, question = str(checkpoint), str(video), QUESTION
    if case == "missing_model":
        model_dir = str(tmp_path / "nowhere")
    elif case == "model_is_file":
        model_dir = str(video)
    elif case == "no_config":
        model_dir = str(tmp_path)
    elif case == "bad_config":
        (tmp_path / "config.json").write_text("{not json")
        model_dir = str(tmp_path)
    elif case == "unsupported":
        model_dir = str(_write_config(tmp_path / "gpt2", transformers.GPT2Config(architectures=["GPT2LMHeadModel"])))
    elif case == "text_only":
        model_dir = str(_write_config(tmp_path / "qwen2", transformers.Qwen2Config(architectures=["Qwen2ForCausalLM"])))
    elif case == "missing_video":
        video_path = str(tmp_path / "missing.npy")
    elif case == "empty_folder":
        video_path = str(tmp_path)
    elif case == "bad_npy":
        np.save(tmp_path / "gray.npy", np.zeros((7, 12, 16), np.uint8))
        video_path = str(tmp_path / "gray.npy")
    elif case == "empty_question":
        question = "   "
    elif case in ("no_weights", "no_tokenizer", "no_params"):
        skip = {"no_weights": "model.safetensors", "no_tokenizer": "tokenizer",
                "no_params": "preprocessor_config"}[case]
        model_dir = tmp_path / "partial"
        shutil.copytree(checkpoint, model_dir, ignore=lambda _, names: [n for n in names if n.startswith(skip)])
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
    elif case == "big_video":
        # 32 frames of 64x64: 16 x 32 x 32 patches = 4096 visual tokens, past the model's 4096 positions
        np.save(tmp_path / "big.npy", np.zeros((32, 64, 64, 3), np.uint8))
        video_path = str(tmp_path / "big.npy")
    argv = ["--model", str(model_dir), "--video", video_path, "--question", question, "--no-progress",
            "--preprocess", "builtin", "--num-frames", "0"]
    code, out, err = _run(argv, capsys)
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    prefix = f"python -m std_ext generate: error: {argument}: " if argument else "python -m std_ext generate: error: "
    error_lines = [line for line in err.splitlines() if line.startswith("python -m std_ext generate: error:")]
    assert len(error_lines) == 1 and error_lines[0].startswith(prefix), err
    assert words in error_lines[0], err


def test_processor_only_without_pillow_is_a_clear_error(checkpoint, video, capsys):
    if importlib.util.find_spec("torchvision") is not None or importlib.util.find_spec("PIL") is not None:
        pytest.skip("Pillow or torchvision is installed: transformers' message differs")
    code, out, err = _run(_argv(checkpoint, video, "--preprocess", "processor"), capsys)
    assert code == 2 and out == ""
    assert "--model: " in err and "the checkpoint's processor cannot prepare the video" in err
    assert "pip install pillow torchvision" in err


@pytest.mark.parametrize("preprocess, argument, words", [
    ("auto", "--model", "the checkpoint's processor cannot prepare the video"),
    ("builtin", "--preprocess", "the built-in preprocessing supports Qwen2VLForConditionalGeneration only"),
])
def test_llava_onevision_needs_its_processor(preprocess, argument, words, video, tmp_path, capsys):
    model_dir = tmp_path / "llava"
    tm.make_model("llava_onevision").config.save_pretrained(model_dir)  # the config is all it gets to
    argv = ["--model", str(model_dir), "--video", str(video), "--question", QUESTION, "--preprocess", preprocess]
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == ""
    assert f"error: {argument}: " in err and words in err and "Traceback" not in err
    if preprocess == "auto":
        assert "LlavaOnevisionForConditionalGeneration has no built-in fallback" in err


def test_gamma_auto(checkpoint, video, model, capsys):
    """--gamma auto picks each round's γ; the answer is still the dense one."""
    code, out, err = _run(_argv(checkpoint, video, "--preprocess", "builtin", "--gamma", "auto"), capsys)
    assert code == 0, err
    assert "gamma=auto, " in out
    gammas = out.split("gamma per round  ")[1].splitlines()[0].split()
    assert gammas and all(0 <= int(g) <= 12 for g in gammas)
    code, dense_out, err = _run(_argv(checkpoint, video, "--preprocess", "builtin", "--gamma", "1"), capsys)
    assert code == 0, err
    assert _answer(out) == _answer(dense_out)


@pytest.mark.parametrize("option, value", [("--gamma", "0"), ("--gamma", "fast"), ("--max-new-tokens", "-1"), ("--budget", "x"),
                                           ("--selection", "best"), ("--num-frames", "-2"), ("--device", "tpu")])
def test_bad_option_values_are_argparse_errors(option, value, capsys):
    parser = argparse.ArgumentParser()
    cli_generate.add_arguments(parser)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--model", "m", "--video", "v", "--question", "q", option, value])
    assert info.value.code == 2
    assert option in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    """``python -m std_ext generate`` end to end: the clear message and exit 2, no traceback."""
    try:
        importlib.import_module("std_ext.demo")  # std_ext/__main__.py imports it
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"std_ext.demo is not importable yet ({error})")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "std_ext", "generate", "--model", str(tmp_path / "none"), "--video", "v.npy",
         "--question", "q"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    assert result.returncode == 2
    assert "error: --model: " in result.stderr and "no such directory" in result.stderr
    assert "Traceback" not in result.stderr
