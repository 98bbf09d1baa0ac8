"""What the commands and the engine tell a person watching: the decode bar's end, the speed sentence."""

import pytest
import torch

import std_ext
import tiny_models as tm
from std_ext._cli import speed_sentence


def _decode_bar(stderr: str) -> str:
    """The decode bar's last redraw (tqdm redraws in place with carriage returns)."""
    return [part for part in stderr.replace("\n", "\r").split("\r") if "std_ext decode" in part][-1]


@pytest.mark.parametrize("stop_early", [True, False])
def test_a_decode_bar_that_eos_ends_early_says_so(stop_early, capsys):
    pytest.importorskip("tqdm")
    model = tm.make_model("qwen2")
    input_ids = torch.randint(0, tm.TEXT_VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    plain = std_ext.generate(model, input_ids, mode="vanilla", max_new_tokens=8, do_sample=False)
    new = plain.sequences[0, 12:].tolist()
    eos = new[2] if stop_early else tm.EOS_ID  # the third new token, or one the model never emits
    capsys.readouterr()
    out = std_ext.generate(model, input_ids, max_new_tokens=8, gamma=2, budget=4, do_sample=False,
                           eos_token_id=eos, progress=True)
    bar = _decode_bar(capsys.readouterr().err)
    emitted = out.stats.new_tokens[0]
    if stop_early:
        assert emitted == new.index(eos) + 1 < 8
        assert f"{emitted}/{emitted}" in bar and f"ended at EOS after {emitted} of at most 8 tokens" in bar, bar
    else:
        assert emitted == 8
        assert "8/8" in bar and "EOS" not in bar, bar


@pytest.mark.parametrize("std, vanilla, words", [
    (13.0, 10.0, "StD decoded 1.30\u00d7 faster than vanilla (13.0 vs 10.0 tokens/s)"),
    (10.0, 14.0, "StD was 1.40\u00d7 slower than vanilla (10.0 vs 14.0 tokens/s)"),
    (10.0, 10.001, "StD and vanilla decoded equally fast"),
])
def test_speed_sentence_says_which_was_faster(std, vanilla, words):
    assert speed_sentence(std, vanilla).startswith(words)
    assert "Speedup" not in speed_sentence(std, vanilla)
