"""``python -m std_ext generate`` on tiny saved checkpoints of every video family whose
processor loads offline, each with its own ``transformers`` processor.

The checkpoints (model, processor, tokenizer) and the video files come from
``cli_checkpoints`` (no downloads). End to end, the command's answer is checked against
``transformers``' ``generate`` on the same processor's output for the same frames, and
``--compare`` must find StD's tokens identical to vanilla decoding's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
from std_ext.frames import load_frames

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What moves in the video?"
MAX_NEW = 8
# The .npy video: 7 frames of 12x16.
FRAMES, HEIGHT, WIDTH = 7, 12, 16
# The video file: 12 frames of 30x40 at 8 fps (resized by every family), 8 of them sampled.
CLIP_FRAMES, CLIP_HEIGHT, CLIP_WIDTH, CLIP_FPS, CLIP_SAMPLED = 12, 30, 40, 8, 8


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


def processor_inputs(path: Path, video: Path, num_frames: int, fps: float | None = None) -> dict:
    """What the checkpoint's own processor, called directly, makes of the chat prompt and the
    frames the command samples: the inputs ``transformers``' ``generate`` is given."""
    processor = transformers.AutoProcessor.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    sampled = load_frames(video, num_frames, fps)
    batch = processor(text=[text], videos=[sampled.frames], video_metadata=[sampled.metadata()],
                      do_sample_frames=False, return_tensors="pt")
    return {key: value for key, value in batch.items() if key != "video_metadata"}


def transformers_answer(model, inputs: dict, max_new_tokens: int = MAX_NEW) -> list[int]:
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def _visual_count(model, input_ids: torch.Tensor) -> int:
    ids = {getattr(model.config, name, None) for name in ("video_token_id", "image_token_id")}
    return int(sum(int((input_ids == i).sum()) for i in ids if isinstance(i, int)))


# --------------------------------------------------------------------------- the command, end to end


@pytest.mark.parametrize("family", cc.FAMILIES)
def test_command_compare_is_exact(family, checkpoints, clip, models, capsys):
    """A video file through each family's own processor: StD == vanilla (--compare) ==
    transformers' generate on that processor's output, with a keep set holding some but
    not all of the visual tokens."""
    path, model = checkpoints[family], models(family)
    inputs = processor_inputs(path, clip, CLIP_SAMPLED)
    width, visual = inputs["input_ids"].shape[1], _visual_count(model, inputs["input_ids"])
    budget = width - visual + visual // 2
    code, out, err = _run(_argv(path, clip, "--compare", "--gamma", "2", "--budget", str(budget),
                                "--num-frames", str(CLIP_SAMPLED)), capsys)
    assert code == 0, err
    assert f"outputs          identical ({MAX_NEW} new tokens)" in out
    assert f"keep size        {budget:.1f} positions per KV head" in out
    assert f"frames           {CLIP_SAMPLED} x {CLIP_HEIGHT}x{CLIP_WIDTH} of {CLIP_FRAMES} (video file, 8 fps)" in out
    assert f"model inputs     the checkpoint's processor ({type(transformers.AutoProcessor.from_pretrained(path)).__name__})" in out
    assert f"prompt tokens    {width}\n" in out and f"visual tokens    {visual}\n" in out
    assert 0 < visual // 2 < visual
    assert re.search(r"decode speed     StD (decoded [\d.]+\u00d7 faster than|was [\d.]+\u00d7 slower than|and "
                     r"vanilla decoded equally fast)", out), out
    new = transformers_answer(model, inputs)
    assert len(new) == MAX_NEW
    assert _answer(out) == _text_of(new)


@pytest.mark.parametrize("family, fps", [("qwen2_5_vl", None), ("qwen2_5_vl", 4.0), ("qwen3_vl", 4.0)])
def test_npy_frames_and_fps_reach_the_processor(family, fps, checkpoints, video, models, capsys):
    """An .npy array, with and without --fps: the processor places the frames in time by the
    same metadata the command passes (Qwen2.5-VL's second_per_grid_ts, Qwen3-VL's timestamps)."""
    path = checkpoints[family]
    extra = ["--num-frames", "0"] + (["--fps", f"{fps:g}"] if fps else [])
    code, out, err = _run(_argv(path, video, *extra), capsys)
    assert code == 0, err
    assert ("frame rate is unknown" in err) == (fps is None)
    rate = f"{fps:g} fps" if fps else "frame rate unknown"
    assert f"frames           {FRAMES} x {HEIGHT}x{WIDTH} of {FRAMES} (.npy array, {rate})" in out
    assert _answer(out) == _text_of(transformers_answer(models(family), processor_inputs(path, video, 0, fps)))


def test_auto_budget_auto_gamma_and_selection(checkpoint, video, models, capsys):
    """--budget auto, --gamma auto and --selection reach std_ext.generate; the answer is still the dense one."""
    code, out, err = _run(_argv(checkpoint, video, "--budget", "auto", "--gamma", "auto", "--selection", "recent"),
                          capsys)
    assert code == 0, err
    assert "gamma=auto, budget=auto, selection=recent" in out
    gammas = out.split("gamma per round  ")[1].splitlines()[0].split()
    assert gammas and all(0 <= int(g) <= 12 for g in gammas)
    assert _answer(out) == _text_of(transformers_answer(models("qwen2_vl"), processor_inputs(checkpoint, video, 32)))


def test_draft_weights(checkpoint, video, models, capsys):
    """--draft-weights int8 reaches std_ext.generate; the answer is still the dense one."""
    code, out, err = _run(_argv(checkpoint, video, "--draft-weights", "int8"), capsys)
    assert code == 0, err
    assert "selection=question, draft weights=int8" in out
    assert _answer(out) == _text_of(transformers_answer(models("qwen2_vl"), processor_inputs(checkpoint, video, 32)))


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

    code, quiet, err = _run(_argv(checkpoint, video, "--gamma", "3"), capsys)
    assert code == 0, err
    monkeypatch.setattr(tqdm_auto, "tqdm", EagerTqdm)
    argv = [arg for arg in _argv(checkpoint, video, "--gamma", "3") if arg != "--no-progress"]
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
            output.sequences[0, -3] = (output.sequences[0, -3] + 1) % cc.TEXT_VOCAB
        return output

    monkeypatch.setattr(std_ext, "generate", tampered)
    code, out, err = _run(_argv(checkpoint, video, "--compare", "--gamma", "3"), capsys)
    assert code == 1
    assert f"DIFFERENT (first difference at new token {MAX_NEW - 3})" in out
    assert "Vanilla answer:" in out


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
        ("no_processor", "--model", "no processor files (processor_config.json, preprocessor_config.json, "
                                    "video_preprocessor_config.json)"),
        ("config_only", "--model", "no processor files"),
        ("no_tokenizer", "--model", "no tokenizer files"),
        ("bad_processor_json", "--model", "processor_config.json: not readable JSON"),
        ("broken_processor", "--model", "cannot load the processor from processor_config.json"),
        ("no_chat_template", "--model", "the checkpoint has no chat template"),
        ("no_torchvision", "", "transformers' video processors need torchvision, which does not import"),
        ("too_long", "", "does not fit the model's 4096 positions"),
    ],
)
def test_bad_input_exit_2(case, argument, words, checkpoints, video, tmp_path, capsys, monkeypatch):
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
    elif case == "config_only":  # a supported model (LLaVA-OneVision) without any processor file
        model_dir = str(_write_config(tmp_path / "llava", tm.make_model("llava_onevision").config))
    elif case == "missing_video":
        video_path = str(tmp_path / "missing.npy")
    elif case == "empty_folder":
        video_path = str(tmp_path)
    elif case == "bad_npy":
        np.save(tmp_path / "gray.npy", np.zeros((7, 12, 16), np.uint8))
        video_path = str(tmp_path / "gray.npy")
    elif case == "corrupt_video":
        (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
        video_path = str(tmp_path / "clip.mp4")
    elif case == "fps_for_video_file":
        (tmp_path / "clip.mp4").write_bytes(b"\x00")
        video_path, extra = str(tmp_path / "clip.mp4"), ["--fps", "30"]
    elif case == "empty_question":
        question = "   "
    elif case in ("no_weights", "no_processor", "no_tokenizer", "no_chat_template"):
        prefix = {"no_weights": "model.safetensors", "no_processor": "processor_config", "no_tokenizer": "tokenizer",
                  "no_chat_template": "chat_template"}[case]
        model_dir = _copy_without(checkpoint, tmp_path / "partial", prefix)
    elif case in ("bad_processor_json", "broken_processor"):
        model_dir = _copy_without(checkpoint, tmp_path / "broken", "processor_config")
        text = "{not json" if case == "bad_processor_json" else json.dumps(
            json.loads((checkpoint / "processor_config.json").read_text())
            | {"video_processor": {"video_processor_type": "NoSuchVideoProcessor"}})
        (model_dir / "processor_config.json").write_text(text)
    elif case == "no_torchvision":
        monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` raises ImportError
    elif case == "too_long":
        extra = ["--max-new-tokens", "5000"]
    argv = ["--model", str(model_dir), "--video", video_path, "--question", question, "--no-progress",
            "--num-frames", "0", "--device", "cpu", *extra]
    code, out, err = _run(argv, capsys)
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    prefix = f"python -m std_ext generate: error: {argument}: " if argument else "python -m std_ext generate: error: "
    error_lines = [line for line in err.splitlines() if line.startswith("python -m std_ext generate: error:")]
    assert len(error_lines) == 1 and error_lines[0].startswith(prefix), err
    assert words in error_lines[0], err
    if case == "no_torchvision":
        assert "pip install torchvision" in error_lines[0]


@pytest.mark.parametrize("option, value", [("--gamma", "0"), ("--gamma", "fast"), ("--max-new-tokens", "-1"),
                                           ("--budget", "x"), ("--budget", "-1"), ("--selection", "best"),
                                           ("--num-frames", "-2"), ("--device", "tpu"), ("--fps", "0"),
                                           ("--fps", "fast"), ("--draft-weights", "int3")])
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


@pytest.mark.parametrize("command", [[], ["demo"], ["generate"]])
@pytest.mark.parametrize("columns", [60, 80])
def test_help_is_plain_and_fits_the_terminal(command, columns):
    """--help shows no RST markup, no line runs past the terminal's width, and every option
    (but --help) says its default or that it is required."""
    env = dict(os.environ, COLUMNS=str(columns),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "std_ext", *command, "--help"], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "`" not in text and ":mod:" not in text
    too_long = [line for line in text.splitlines() if len(line) > columns]
    assert not too_long, too_long
    if command:
        options = re.split(r"\n(?=  -)", text.split("options:\n", 1)[1])
        undocumented = [entry.split()[0] for entry in options[1:]
                        if not re.search(r"\(default: |\(required\)", " ".join(entry.split()))]
        assert not undocumented, undocumented
