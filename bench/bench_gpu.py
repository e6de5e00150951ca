"""GPU checks and timings, prepared for a CUDA machine; on a CPU-only machine it times the CPU paths only.

What it measures (prints a table and writes bench/results/gpu.json):

1. The kNN index of the service: one score request's searches (512 keys x 16 queries over a key's stored
   vectors, 14 and 4,096 dims) with `faiss.knn` on the CPU and `faiss.knn_gpu` on the GPU, and whether the
   engine's exactness tiers give identical votes on both devices.
2. The client's fingerprint extraction: `layer_logit_fingerprints` on a randomly initialised Llama-style
   model (28 layers like Qwen2.5-Math-7B, narrower), batch of 64 responses of 512 tokens, on the CPU and on
   CUDA (bf16 autocast there), against the naive per-layer full-vocabulary computation; max abs error.
   Without CUDA the batch shrinks to 8 x 256 tokens.

    python -m bench.bench_gpu            # full
    python -m bench.bench_gpu --quick    # small sizes (CI runs this on the CPU)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from meds_service.core import knn
from meds_service.storage.index import ShardIndex, gpu_count

RESULTS = Path(__file__).resolve().parent / "results"


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def knn_timings(dim: int, keys: int, stored: int, queries: int, repeats: int) -> dict[str, Any]:
    """Time the per-key searches of one score request on each available device; check identical votes."""
    rng = np.random.default_rng(dim)
    base = rng.standard_normal((keys, stored, dim)).astype(np.float32)
    base /= np.linalg.norm(base, axis=2, keepdims=True)
    query = rng.standard_normal((keys, queries, dim)).astype(np.float32)
    query /= np.linalg.norm(query, axis=2, keepdims=True)
    labels = rng.integers(-1, 6, size=(keys, stored))
    out: dict[str, Any] = {"dim": dim, "keys": keys, "stored_per_key": stored, "queries_per_key": queries}
    votes = {}
    for device in ["cpu"] + (["cuda"] if gpu_count() > 0 else []):
        index = ShardIndex(dim, device)
        for k in range(keys):
            index.append(k, base[k])

        def search(index: ShardIndex = index) -> list[tuple[np.ndarray, np.ndarray]]:
            return [index.search(k, 0, stored, query[k], 4) for k in range(keys)]

        search()  # warm-up (GPU context, allocations)
        out[f"{device}_ms"] = 1e3 * best_of(search, repeats)
        results = search()
        bound = knn.float32_bound(dim, index.rounding_safety)
        want, searchable = np.full(queries, 3), np.full(queries, stored)
        sure = [knn.certain_top_k(scores, want, searchable, bound) for scores, _ in results]
        votes[device] = [knn.vote(labels[k][ids[:, :3]]) for k, (_, ids) in enumerate(results)]
        out[f"{device}_certain_fraction"] = float(np.mean(np.concatenate(sure)))
    if "cuda" in votes:
        # Uncertain queries are decided in float64 by the engine; the certain ones must agree exactly.
        agree = [np.array_equal(a, b) for a, b in zip(votes["cpu"], votes["cuda"], strict=True)]
        out["cpu_cuda_identical_votes_fraction"] = float(np.mean(agree))
        out["ratio_cpu_over_cuda"] = out["cpu_ms"] / out["cuda_ms"]
    return out


def fingerprint_timings(layers: int, hidden: int, batch: int, length: int, repeats: int) -> list[dict[str, Any]]:
    try:
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        from meds_client.fingerprint import layer_logit_fingerprints, output_embedding
    except ImportError as exc:  # the client's `fingerprint` extra is not installed
        return [{"skipped": f"needs the client's fingerprint extra: {exc}"}]
    config = LlamaConfig(vocab_size=32_000, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                         max_position_embeddings=length + 8)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, config.vocab_size, (batch, length))
    mask = torch.ones_like(ids)
    anchors = [int(a) for a in torch.randint(length // 2, length - 2, (batch,))]
    rows = []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        model.to(device)
        ids_d, mask_d = ids.to(device), mask.to(device)

        def run(model: Any = model, ids_d: Any = ids_d, mask_d: Any = mask_d, device: str = device) -> np.ndarray:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                return layer_logit_fingerprints(model, ids_d, mask_d, anchors)

        fast = run()
        seconds = best_of(run, repeats)
        with torch.no_grad():  # the naive reference: full-vocabulary logits for every layer
            started = time.perf_counter()
            hidden_states = model(input_ids=ids_d, attention_mask=mask_d, output_hidden_states=True).hidden_states[1:]
            head = output_embedding(model)
            positions = torch.tensor(anchors, device=device)
            rows_idx = torch.arange(batch, device=device)
            targets = ids_d[rows_idx, positions + 1]
            naive = (
                torch.stack([head(h[rows_idx, positions]).float()[rows_idx, targets] for h in hidden_states], dim=1)
                .cpu()
                .numpy()
            )
            naive_seconds = time.perf_counter() - started
        rows.append({
            "device": device, "layers": layers, "hidden": hidden, "batch": batch, "tokens": length,
            "fingerprint_ms": 1e3 * seconds, "naive_full_vocab_ms": 1e3 * naive_seconds,
            "max_abs_error_vs_naive": float(np.max(np.abs(fast - naive))),
        })  # fmt: skip
    return rows


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    quick = args.quick
    faiss.omp_set_num_threads(1)
    summary: dict[str, Any] = {
        "faiss": faiss.__version__,
        "faiss_gpus": gpu_count(),
        "knn": [
            knn_timings(dim, keys=64 if quick else 512, stored=64 if quick else 320, queries=16, repeats=3)
            for dim in ((14, 512) if quick else (14, 512, 4096))
        ],
        # Full size (batch 64 x 512 tokens) only where CUDA can run it; on a CPU a smaller batch keeps the
        # naive reference (a full-vocabulary projection per layer) within minutes.
        "fingerprints": fingerprint_timings(
            layers=4 if quick else 28,
            hidden=64 if quick else 512,
            batch=8 if quick else (64 if _cuda() else 8),
            length=64 if quick else (512 if _cuda() else 256),
            repeats=1 if quick else 3,
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(summary, indent=2))
    print(f"FAISS {summary['faiss']}, GPUs visible to FAISS: {summary['faiss_gpus']}")
    for row in summary["knn"]:
        line = f"kNN one request, dim {row['dim']}: CPU {row['cpu_ms']:.1f} ms"
        if "cuda_ms" in row:
            line += (f", GPU {row['cuda_ms']:.1f} ms ({row['ratio_cpu_over_cuda']:.2f}x), identical votes "
                     f"{100 * row['cpu_cuda_identical_votes_fraction']:.1f} %")  # fmt: skip
        print(line)
    for row in summary["fingerprints"]:
        if "skipped" in row:
            print(f"fingerprints: {row['skipped']}")
            continue
        shape = f"{row['layers']} layers, batch {row['batch']} x {row['tokens']} tokens"
        print(f"fingerprints on {row['device']} ({shape}): "
              f"{row['fingerprint_ms']:.0f} ms vs naive {row['naive_full_vocab_ms']:.0f} ms, "
              f"max |error| {row['max_abs_error_vs_naive']:.2e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
