"""Sparse-to-Dense under ``transformers``' tensor parallelism: exact on every rank.

Two ranks (gloo on the CPU; NCCL on two GPUs where there are two) load tiny saved
Qwen2, Qwen2-VL and LLaVA-OneVision checkpoints with ``tp_plan="auto"``, so each rank's
attention holds one of the two KV heads, and decode with ``std_ext.generate``. Every
rank's tokens must equal the single-process ones: greedy against ``transformers``
``generate``, seeded sampling against single-process ``std_ext``; under ``gamma="auto"``
the ranks must also choose the same γ in every round (else their collectives would
not match). One spawn runs every case, to stay within a CI budget.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import std_ext
from test_generate import new_tokens
from tiny_models import make_inputs, make_model

KINDS = ("qwen2", "qwen2_vl", "llava_onevision")
MAX_NEW = 10
# (name, settings): every mode, γ choice and policy, greedy and sampled
CASES = [
    ("std", dict(gamma=3)),
    ("auto", dict(gamma="auto", gamma_max=4)),
    ("vanilla", dict(mode="vanilla")),
    ("refresh", dict(gamma=3, selection="refresh")),
    ("recent", dict(gamma=3, selection="recent")),
    ("sampled", dict(gamma=3, do_sample=True, top_k=20)),
]


def _inputs(kind: str) -> dict:
    """A ragged batch of three prompts (the same on every rank: fixed seeds)."""
    model = make_model(kind)  # only for the visual feature counts; weights come from the checkpoint
    return make_inputs(model, kind, [70, 85, 96], n_visual=32, seed=11)


def _settings(kind: str, inputs: dict, settings: dict) -> dict:
    settings = dict(settings, max_new_tokens=MAX_NEW, budget=48)
    if kind == "qwen2":  # a text model: a middle span is the selection pool
        mask = inputs["attention_mask"].bool().clone()
        mask[:, -12:] = False
        mask[:, :-70] = False
        mask[:, -70:-64] = False
        settings["candidate_mask"] = mask
    return settings


def _run_all(models: dict, device: str) -> dict:
    """Tokens (and γ per round) of every (kind, case), on one process or one rank."""
    results = {}
    for kind, model in models.items():
        inputs = {k: v.to(device) for k, v in _inputs(kind).items()}
        width = inputs["input_ids"].shape[1]
        for name, settings in CASES:
            kwargs = _settings(kind, inputs, settings)
            if kwargs.get("do_sample"):
                kwargs["generator"] = torch.Generator(device).manual_seed(5)
            out = std_ext.generate(model, **inputs, **kwargs)
            results[(kind, name)] = (new_tokens(out.sequences.cpu(), width), out.stats.gammas)
    return results


def _rank_entry(rank: int, world: int, port: int, paths: dict, backend: str, queue, body) -> None:
    """One rank: joins the group, loads every checkpoint with ``tp_plan="auto"`` and reports
    ``body(rank, models, device)``'s ``(heads, results)``, or its traceback."""
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        torch.set_num_threads(1)
        device = "cpu"
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device = f"cuda:{rank}"
        torch.distributed.init_process_group(backend, rank=rank, world_size=world)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import transformers
        from transformers.distributed import DistributedConfig

        models = {}
        dtype = torch.float32 if backend == "gloo" else torch.bfloat16
        for kind, path in paths.items():
            config = transformers.AutoConfig.from_pretrained(path)
            cls = getattr(transformers, config.architectures[0])
            models[kind] = cls.from_pretrained(path, distributed_config=DistributedConfig(tp_plan="auto"),
                                               dtype=dtype).eval()
        queue.put((rank, *body(rank, models, device), None))
    except Exception:  # report, so the parent fails with the rank's traceback instead of a timeout
        queue.put((rank, None, None, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _rank_main(rank: int, models: dict, device: str) -> tuple[dict, dict]:
    from std_ext.models import ModelAdapter

    heads = {kind: ModelAdapter.for_model(model).num_kv_heads for kind, model in models.items()}
    results = _run_all(models, device)
    # different prompts on different ranks: an error on every rank before the prefill, not a hang
    inputs = {k: v.to(device) for k, v in _inputs("qwen2").items()}
    inputs["input_ids"] = (inputs["input_ids"] + rank) % 200
    try:
        std_ext.generate(models["qwen2"], **inputs, max_new_tokens=2)
        results["mismatch"] = "accepted"
    except ValueError as error:
        results["mismatch"] = str(error)
    return heads, results


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(paths: dict, backend: str, world: int = 2, body=_rank_main) -> list:
    """Runs ``body`` (a module-level function, see :func:`_rank_entry`) on ``world`` ranks; their reports, by rank."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_rank_entry, args=(rank, world, port, paths, backend, queue, body))
                 for rank in range(world)]
    for process in processes:
        process.start()
    try:
        reports = [queue.get(timeout=240) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    errors = [error for *_, error in reports if error]
    assert not errors, "\n".join(errors)
    return sorted(reports, key=lambda report: report[0])


def saved_checkpoints(kinds):
    """Yields ``{kind: folder}`` of the tiny models saved for ``from_pretrained`` (removed after)."""
    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for kind in kinds:
            paths[kind] = os.path.join(folder, kind)
            make_model(kind).save_pretrained(paths[kind])
        yield paths


@pytest.fixture(scope="module")
def checkpoints():
    yield from saved_checkpoints(KINDS)


def _single_process_references() -> tuple[dict, dict]:
    """generate's greedy tokens and single-process std_ext's seeded samples, per (kind, case)."""
    greedy, sampled = {}, {}
    for kind in KINDS:
        model = make_model(kind)
        inputs = _inputs(kind)
        width = inputs["input_ids"].shape[1]
        greedy[kind] = new_tokens(model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW), width)
        kwargs = _settings(kind, inputs, dict(CASES)["sampled"])
        kwargs["generator"] = torch.Generator().manual_seed(5)
        sampled[kind] = new_tokens(std_ext.generate(model, **inputs, **kwargs).sequences, width)
    return greedy, sampled


def _check(reports: list, greedy: dict, sampled: dict) -> None:
    for rank, heads, results, _ in reports:
        assert heads == {kind: 1 for kind in KINDS}, f"rank {rank} holds {heads} KV heads, expected 1 of 2"
        assert "ranks were given different inputs" in results.pop("mismatch"), rank
        for (kind, name), (tokens, _gammas) in results.items():
            expected = sampled[kind] if name == "sampled" else greedy[kind]
            assert tokens == expected, f"rank {rank}, {kind}, {name}: {tokens} != {expected}"
    gammas = [{key: g for key, (_, g) in results.items()} for _, _, results, _ in reports]
    assert gammas[0] == gammas[1], "the ranks chose different γ"
    assert any(g != [3] * len(g) for (kind, name), g in gammas[0].items() if name == "auto")


def test_two_cpu_ranks_give_the_single_process_tokens(checkpoints):
    reports = _spawn(checkpoints, "gloo")
    _check(reports, *_single_process_references())


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and std_ext.cuda_kernels_built()),
                    reason="needs 2 CUDA GPUs and std_ext built with CUDA")
def test_two_gpu_ranks_agree_with_one_gpu(checkpoints):
    """NCCL, bf16: every rank's tokens equal one GPU's std_ext tokens (the same kernels, one rank)."""
    reports = _spawn(checkpoints, "nccl")
    models = {kind: make_model(kind).to("cuda:0", torch.bfloat16) for kind in KINDS}
    reference = _run_all(models, "cuda:0")
    for rank, _, results, _ in reports:
        results.pop("mismatch")
        for key, (tokens, _) in results.items():
            assert tokens == reference[key][0], f"rank {rank}, {key}"


def test_uneven_kv_heads_are_refused():
    from std_ext.models import UnsupportedModelError, _kv_heads

    class Mesh:
        def size(self):
            return 2

    # 3 KV heads over 2 ranks: this rank's shard holds 2, as a DTensor would report it
    weight = torch.zeros(3 * 16, 64)
    local = torch.zeros(2 * 16, 64)
    weight.to_local = lambda: local  # the DTensor interface the adapter reads
    weight.device_mesh = Mesh()
    attention = torch.nn.Module()
    attention.k_proj = torch.nn.Module()
    attention.k_proj.weight = weight
    with pytest.raises(UnsupportedModelError, match="3 KV heads do not divide evenly"):
        _kv_heads(attention, None, 16)
