"""Smoke run of ``bench/e2e.py`` (the end-to-end GPU benchmark) in its ``--tiny`` CPU mode.

The figures come from a GPU run (``python bench/e2e.py --out e2e.md``); this checks that
the script runs end to end, that its report holds every configuration and section, that
StD decoded the vanilla tokens (or diverged only at a near-tie), and the byte counts its
bandwidth floors and memory estimates rest on.
"""

import re

import pytest
import torch

import e2e

GiB = 2**30


def test_tiny_run_reports_every_configuration(tmp_path, capsys):
    out = tmp_path / "e2e.md"
    argv = ["--tiny", "--contexts", "1024", "--batches", "1,2", "--new-tokens", "8", "--max-margins", "2",
            "--out", str(out)]
    assert e2e.main(argv) == 0
    report = out.read_text()
    assert report.strip() == capsys.readouterr().out.strip()
    for section in ("Decode speed", "Step times over their bandwidth floors", "computed from the measured step times",
                    "Prefill, selection and memory", "CUDA graphs on and off", "Exactness", "Draft weights"):
        assert section in report, section
    rows = [line for line in report.splitlines() if re.match(r"\| 1024 \| [12] \|", line)]
    # per batch: speed, steps, three computed rows (0.9, 0.95, measured), memory, graphs, exactness,
    # and the draft step with the model's weights, int8 and int4 (--tiny's draft_weights)
    assert len(rows) == 2 * 11, report
    drafts = [row for row in rows if re.match(r"\| 1024 \| [12] \| (model|int8|int4) \|", row)]
    assert len(drafts) == 6 and all("| yes |" in row for row in drafts), drafts
    graphs = [row for row in rows if row.endswith("| yes |") or row.endswith("| NO |")]
    assert len(graphs) == 2 and all(row.endswith("| yes |") for row in graphs), graphs
    computed = [row for row in rows if re.match(r"\| 1024 \| [12] \| 0.95 \|", row)]
    assert len(computed) == 2 and all(len(row.split("|")) == 2 + 3 + 11 + 1 for row in computed)
    # exactness: identical sequences, or a divergence at a near-tie of the dense model (DESIGN.md §5)
    margins = [float(m) for m in re.findall(r"top-2 margin ([0-9.e+-]+)", report)]
    assert all(m < 1e-3 for m in margins), margins
    exact = [row for row in rows if re.search(r"\| \d+/\d+ \|", row)]
    assert len(exact) == 2, report
    for row in exact:
        fractions = re.findall(r"(\d+)/(\d+)", row)
        assert row.endswith("| none |") == all(a == b for a, b in fractions[:-1]), row  # transformers aside


def test_pairs_pick_the_configurations(tmp_path):
    out = tmp_path / "e2e.md"
    argv = ["--tiny", "--pairs", "1024x2", "--new-tokens", "4", "--max-margins", "0", "--no-hf",
            "--no-graphs-compare", "--out", str(out)]
    assert e2e.main(argv) == 0
    report = out.read_text()
    assert re.search(r"^\| 1024 \| 2 \|", report, re.M) and not re.search(r"^\| 1024 \| 1 \|", report, re.M)
    assert not re.search(r"no graphs / graphs \|\n\|[-|]+\n\|", report)  # the graphs table has no rows
    with pytest.raises(SystemExit):
        e2e.parse_args(["--tiny", "--pairs", "1024"])


def test_without_a_gpu_the_full_benchmark_refuses_clearly(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full benchmark would run")
    assert e2e.main(["--contexts", "16384"]) == 2
    assert "python bench/e2e.py --tiny" in capsys.readouterr().err


def test_byte_counts_of_the_qwen2_7b_shape():
    from transformers import Qwen2ForCausalLM

    config = e2e.make_config(e2e.QWEN2_7B, 131072 + 256)
    with torch.device("meta"):  # shapes only, nothing allocated
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 7_615_616_512  # Qwen2-7B's parameter count
    embedding = 152064 * 3584
    assert e2e.weight_bytes(model) == 2 * (7_615_616_512 - embedding)
    # K and V: 2 × 28 layers × 4 heads × 128 dims × 2 bytes = 57344 bytes per token per sequence
    assert e2e.kv_bytes(config, 1, 16384, 2) == 57344 * 16384
    assert e2e.kv_bytes(config, 8, 1024, 2) == 57344 * 8 * 1024
    settings = e2e.Settings(contexts=[], batches=[], gamma=9, budget=1024, new_tokens=128, question=64,
                            visual_share=0.9, max_margins=0, hf=False, seed=0, tiny=False,
                            device=torch.device("meta"), dtype=torch.bfloat16, shape=e2e.QWEN2_7B)
    assert e2e.estimate_peak_bytes(model, settings, 16384, 1) < 40 * GiB
    assert e2e.estimate_peak_bytes(model, settings, 131072, 1) < 78 * GiB
    assert e2e.estimate_peak_bytes(model, settings, 131072, 8) > 139 * GiB  # skipped even on an H200


def test_prompts_put_the_question_after_the_visual_span():
    settings = e2e.Settings(contexts=[], batches=[], gamma=4, budget=64, new_tokens=4, question=64,
                            visual_share=0.9, max_margins=0, hf=False, seed=0, tiny=True,
                            device=torch.device("cpu"), dtype=torch.float32, shape=e2e.TINY)
    ids, candidates = e2e.make_prompts(settings, 1000, 2, 512, seed=3)
    assert ids.shape == candidates.shape == (2, 1000) and int(ids.max()) < 512
    assert candidates.sum(1).tolist() == [900, 900]
    assert not candidates[:, -64:].any() and candidates[:, 36:936].all() and not candidates[:, :36].any()
    with pytest.raises(ValueError, match="too short"):
        e2e.make_prompts(settings, 500, 1, 512, seed=3)


def test_tensor_parallel_tiny_run_under_torchrun(tmp_path):
    """``torchrun --nproc_per_node 2 bench/e2e.py --tiny --tp 2``: two gloo ranks, one report, exact."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "e2e_tp.md"
    script = Path(e2e.__file__).resolve()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), "--tiny",
               "--tp", "2", "--pairs", "1024x2", "--new-tokens", "6", "--max-margins", "1", "--no-graphs-compare",
               "--checkpoint", str(tmp_path / "model"), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = out.read_text()
    assert "tensor-parallel over 2 ranks" in report
    exact = [row for row in report.splitlines() if re.match(r"\| 1024 \| 2 \| \d+/\d+ \|", row)]
    assert len(exact) == 1 and exact[0].endswith("| none |"), report
    with pytest.raises(SystemExit):  # --tp without its processes is a clear usage error
        e2e.main(["--tiny", "--tp", "2", "--pairs", "1024x1"])
