"""Fingerprints of sharded and wrapped models against the unsharded naive computation.

FSDP2 (`fully_shard`, DTensor weights), FSDP1 and DDP run in a real two-process gloo group on CPU;
`torch.compile` runs in this process. Both ranks fingerprint different batches with different
numbers of anchored rows, so the ranks must agree on how many forward passes to run.
Measured before the fix: FSDP2 raised `aten.bmm.default got mixed torch.Tensor and DTensor`, and
FSDP1 read the flat-parameter views of the wrapped module outside its forward pass.
"""

from __future__ import annotations

import os
import pickle
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from meds_client.fingerprint import fingerprint_sequences, output_embedding, response_anchor
from meds_client.testing import tiny_model, tiny_tokenizer

WRAPPERS = ["fsdp2", "fsdp1", "ddp"]
KINDS = ["llama", "qwen2"]  # separate and tied output embedding
PROMPT = "Question: what is 2 + 3? Answer:"
RANK_RESPONSES = [
    ["so \\boxed{42} done", "x=\\boxed{3}, then \\boxed{7} ok", "no box", "a \\boxed{5}.", "b \\boxed{6}."],
    ["none here", "y = \\boxed{12} yes"],  # one anchored row: fewer forward passes than rank 0
]
BATCH_SIZE = 2
TOLERANCE = 1e-5


def rows_of(rank: int) -> tuple[list[list[int]], list[int]]:
    tokenizer = tiny_tokenizer()
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False)
    rows = [prompt + tokenizer.encode(r, add_special_tokens=False) for r in RANK_RESPONSES[rank]]
    return rows, [len(prompt)] * len(rows)


def naive_fingerprints(kind: str, rank: int) -> list[np.ndarray | None]:
    """Full hidden states of every layer times the full output embedding, one row at a time."""
    model, tokenizer = tiny_model(kind), tiny_tokenizer()
    head = output_embedding(model)
    rows, starts = rows_of(rank)
    expected: list[np.ndarray | None] = []
    for row, start in zip(rows, starts, strict=True):
        anchor = response_anchor(tokenizer, row, start)
        if anchor is None:
            expected.append(None)
            continue
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([row]), output_hidden_states=True).hidden_states[1:]
            expected.append(np.array([head(h[0, anchor])[row[anchor + 1]].item() for h in hidden], np.float32))
    return expected


def wrap(model: torch.nn.Module, wrapper: str) -> torch.nn.Module:
    if wrapper == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:  # type: ignore[union-attr]
            fully_shard(layer)
        fully_shard(model)
        assert type(model.lm_head.weight).__name__ == "DTensor"  # type: ignore[union-attr]
        return model
    if wrapper == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, device_id=torch.device("cpu"))
    return torch.nn.parallel.DistributedDataParallel(model)


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))  # a hang fails
    full_tensor = DTensor.full_tensor
    gathered_whole: list[tuple[int, ...]] = []

    def count_full_tensor(self: DTensor, **kwargs: Any) -> torch.Tensor:
        gathered_whole.append(tuple(self.shape))
        return full_tensor(self, **kwargs)

    DTensor.full_tensor = count_full_tensor  # type: ignore[method-assign]
    try:
        tokenizer = tiny_tokenizer()
        rows, starts = rows_of(rank)
        results: dict[str, Any] = {}
        for kind in KINDS:
            for wrapper in WRAPPERS:
                model = wrap(tiny_model(kind), wrapper)
                results[f"{kind}-{wrapper}"] = fingerprint_sequences(
                    model, tokenizer, rows, starts, batch_size=BATCH_SIZE
                )
        results["gathered_whole"] = gathered_whole
        Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(results))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("sharded")
    mp.start_processes(worker, args=(free_port(), str(out)), nprocs=2, start_method="spawn", join=True)
    return [pickle.loads(Path(out, f"rank{rank}.pkl").read_bytes()) for rank in range(2)]


def assert_close(actual: list[np.ndarray | None], expected: list[np.ndarray | None]) -> None:
    assert [a is None for a in actual] == [e is None for e in expected]
    assert any(e is not None for e in expected)
    for a, e in zip(actual, expected, strict=True):
        if e is not None:
            assert a is not None and np.abs(a - e).max() <= TOLERANCE


@pytest.mark.slow
def test_the_output_embedding_is_never_gathered_whole(sharded_results: list[dict[str, Any]]) -> None:
    assert [r["gathered_whole"] for r in sharded_results] == [[], []]


@pytest.mark.slow  # two processes that import transformers: ~10 s of start-up
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_sharded_and_wrapped_models_match_the_naive_computation(
    sharded_results: list[dict[str, Any]], wrapper: str, kind: str
) -> None:
    for rank in range(2):
        assert_close(sharded_results[rank][f"{kind}-{wrapper}"], naive_fingerprints(kind, rank))


@pytest.mark.parametrize("in_place", [False, True])
def test_compiled_models_match_the_naive_computation(in_place: bool) -> None:
    model = tiny_model("llama")
    if in_place:
        model.compile(backend="eager")
        compiled: torch.nn.Module = model
    else:
        compiled = torch.compile(model, backend="eager")  # type: ignore[assignment]
    rows, starts = rows_of(0)
    assert_close(fingerprint_sequences(compiled, tiny_tokenizer(), rows, starts), naive_fingerprints("llama", 0))
