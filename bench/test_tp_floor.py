"""bench/tp_floor.py: the per-rank byte counts it rests on, checked against transformers' own model."""

import torch

import tp_floor


def test_weight_bytes_are_the_72b_models():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    s = tp_floor.SHAPE_72B
    config = Qwen2Config(hidden_size=s["hidden"], intermediate_size=s["mlp"], num_hidden_layers=s["layers"],
                         num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
                         tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    embedding = model.get_input_embeddings().weight
    expected = sum(p.numel() for p in model.parameters() if p is not embedding) * 2
    assert tp_floor.weight_bytes_per_rank(s, 1) == expected
    # split over 8 ranks: everything but the replicated norms divides by 8
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n) * 2
    assert abs(tp_floor.weight_bytes_per_rank(s, 8) - ((expected - norms) / 8 + norms)) < 1


def test_kv_and_collective_bytes_by_hand():
    s = tp_floor.SHAPE_72B
    # K and V: 2 x 80 layers x 8 heads x 128 dims x 2 bytes = 327680 bytes per token per sequence
    assert tp_floor.kv_bytes_per_rank(s, 1, 1, 1) == 327680
    assert tp_floor.kv_bytes_per_rank(s, 4, 8, 1000) == 327680 * 8 * 1000 / 4
    verify = tp_floor.step_bytes(s, 2, 8, 32768, "verify", gamma=9)
    # two all-reduces of [8, 10, 8192] bf16 per layer, plus the [8, 10, vocab] logits gathered
    assert verify.collective == 2 * 80 * 8 * 10 * 8192 * 2 + 8 * 10 * 152064 * 2
    assert verify.collectives == 161
    assert tp_floor.step_bytes(s, 1, 8, 32768, "verify").collective == 0


def test_bytes_only_speedup_barely_depends_on_tp_and_latency_lowers_it():
    s = tp_floor.SHAPE_72B
    steps = {tp: [tp_floor.step_bytes(s, tp, 8, 131072, kind) for kind in ("draft", "verify", "vanilla")]
             for tp in (1, 8)}
    one, eight = tp_floor.speedup(0.9, *steps[1]), tp_floor.speedup(0.9, *steps[8])
    assert one[0] == eight[0] and abs(one[1] - eight[1]) < 1e-3  # per-rank bytes scale as 1/tp
    assert tp_floor.speedup(0.9, *steps[8], latency=1e-5)[1] < eight[1]
    assert "| 8 | 8 × 128K |" in tp_floor.table()
