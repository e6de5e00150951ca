"""veRL 0.9.1 end to end, as far as veRL runs on a CPU, against a live MEDS service.

What runs for real: veRL's v1 trainer methods `_compute_old_log_prob` and `_compute_advantage`
(through `MedsPPOTrainer`, built by its own constructor from veRL's composed `ppo_trainer` config),
TransferQueue under a local Ray, veRL's worker bridge `tqbridge`, veRL's micro-batching and
re-nesting (`prepare_micro_batches`, `postprocess_batch_func`), `FSDPEngineWithLMHead`'s
`prepare_model_inputs`/`prepare_model_outputs` (through `MedsFSDPEngine`) around a tiny random
Qwen2, veRL's GRPO advantage, and the legacy `RayPPOTrainer._compute_old_log_prob` and
`compute_advantage`. What cannot run here: rollout (vLLM/SGLang only), and veRL's workers, which
need NCCL/CUDA; the forward pass they would run is called directly, without FSDP and without the
device move and autocast of `forward_step`.

Two steps over the same prompts: the first visit of a prompt is never penalised, the second
penalises every wrong boxed answer, and the penalty reaches GRPO's group normalisation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import ray
import torch
import transfer_queue as tq
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict
from transfer_queue import KVBatchMeta
from verl import DataProto
from verl.trainer import main_ppo
from verl.trainer.ppo import ray_trainer
from verl.trainer.ppo.ray_trainer import RayPPOTrainer, compute_advantage
from verl.trainer.ppo.v1 import trainer_base
from verl.utils import tensordict_utils as tu
from verl.utils.torch_functional import entropy_from_logits
from verl.utils.transferqueue_utils import tqbridge
from verl.workers.config import FSDPEngineConfig
from verl.workers.engine.utils import postprocess_batch_func, prepare_micro_batches

from meds_client import MedsClient, prompt_id
from meds_client.fingerprint import layer_logit_fingerprints
from meds_client.integrations import MedsShaper
from meds_client.integrations.verl import MedsVerlHook, compute_fingerprints, response_anchor_positions
from meds_client.integrations.verl._capture import output_rows
from meds_client.integrations.verl._driver import DriverShaper, MedsSettings
from meds_client.integrations.verl.engine import ANCHOR_FIELD, FINGERPRINT_FIELD, FINGERPRINT_FLAG, MedsFSDPEngine
from meds_client.integrations.verl.legacy import MedsRayPPOTrainer
from meds_client.integrations.verl.trainer import MedsPPOTrainer, apply_penalties
from meds_client.testing import tiny_model, tiny_tokenizer
from tests.client._fakes import FakeService, decode_matrix

PROMPTS = {"Compute 7 * 6. Answer:": "42", "What is 2 + 3? Answer:": "5"}
RESPONSES = {  # per step: 4 responses per prompt (a GRPO group)
    0: ["so x=\\boxed{41}.", "x=\\boxed{42}", "I think x=\\boxed{40} now", "no idea"],
    1: ["then x=\\boxed{41}", "maybe x=\\boxed{43}.", "x=\\boxed{42}.", "we get x=\\boxed{44}"],
}
N = 4
CONFIG_DIR = str(Path(main_ppo.__file__).parent / "config")
PENALTIES = np.minimum(0.1 * np.log1p(np.arange(1, 64)), 0.2)  # the only values a wrong answer can get


# -- fixtures and veRL-shaped data --------------------------------------------------------------


# The module's Ray and TransferQueue start three processes that each import torch and tensordict (about 70 s of
# CPU in all, 64 s of wall time on 2 idle cores); in CI, beside the other tests, the first test's setup took
# 257-437 s, near the default 600 s limit, which counts module fixtures in the first test's setup.
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer: Any) -> Any:
    return tiny_model("qwen2", vocab_size=len(tokenizer))


@pytest.fixture
def meds_server(start_server: Callable[..., str]) -> str:
    """A real service on the embedded store, refitting in threads (MEDS_REFIT_PROCESSES=false). Ray and the
    TransferQueue actors hold both cores while they start, and a CI run's service start waited past the test's
    timeout for its refit pool's forkserver (which imports the fitting libraries before it forks). In threads
    the start takes 1.7 s here, against 12 s with the pool."""
    return start_server(refit_processes=False)


@pytest.fixture(scope="module")
def transfer_queue() -> Iterator[None]:
    """One local Ray and TransferQueue for the module (starting them costs seconds)."""
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    yield
    tq.close()
    ray.shutdown()


def verl_config(*overrides: str) -> DictConfig:
    """veRL's own `ppo_trainer` config, composed by Hydra with command-line style overrides."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        config = compose(config_name="ppo_trainer", overrides=list(overrides))
    return config


def meds_overrides(url: str, run: str) -> list[str]:
    """The documented MEDS configuration (client/README.md, veRL sections)."""
    return [
        "trainer.v1.trainer_mode=meds",
        "algorithm.adv_estimator=grpo",
        f"actor_rollout_ref.rollout.n={N}",
        f"+meds.run={run}",
        f"+meds.url={url}",
        "+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=meds_client.integrations.verl.plugin",
        "+ray_kwargs.ray_init.runtime_env.env_vars.VERL_ENGINE_VENDOR=meds",
    ]


def rollouts(step: int, tokenizer: Any) -> list[dict[str, Any]]:
    """Per sample, the fields veRL's agent loop puts into TransferQueue (`AgentLoopWorkerTQ`)."""
    samples = []
    for index, (prompt, answer) in enumerate(PROMPTS.items()):
        uid = str(uuid.uuid4())
        for response in RESPONSES[step]:
            prompt_ids = torch.tensor(tokenizer.encode(prompt, add_special_tokens=False))
            response_ids = torch.tensor(tokenizer.encode(response, add_special_tokens=False))
            acc = float(f"\\boxed{{{answer}}}" in response)
            rm_scores = torch.zeros(len(response_ids))
            rm_scores[-1] = acc
            input_ids = torch.cat([prompt_ids, response_ids])
            samples.append(
                {
                    "prompts": prompt_ids,
                    "responses": response_ids,
                    "response_mask": torch.ones_like(response_ids),
                    "rm_scores": rm_scores,
                    "extra_fields": {"reward_extra_info": {"acc": acc, "score": acc}},
                    "input_ids": input_ids,
                    "position_ids": torch.arange(len(input_ids)),
                    "uid": uid,
                    "index": index,
                    "data_source": "tiny-math",
                }
            )
    return samples


def with_rollout_log_probs(samples: list[dict[str, Any]], model: Any) -> list[dict[str, Any]]:
    """Add the rollout engine's log-probs of the response tokens (here: the policy's own)."""
    with torch.no_grad():
        for sample in samples:
            logits = model(input_ids=sample["input_ids"][None]).logits[0, :-1].log_softmax(-1)
            taken = logits.gather(-1, sample["input_ids"][1:, None])[:, 0]
            sample["rollout_log_probs"] = taken[len(sample["prompts"]) - 1 :]
    return samples


def make_engine(model: Any) -> MedsFSDPEngine:
    """`MedsFSDPEngine` around an unsharded model: what `FSDPEngine.__init__` sets that the forward reads."""
    engine: MedsFSDPEngine = object.__new__(MedsFSDPEngine)
    engine.module = model
    engine.engine_config = FSDPEngineConfig()
    engine.use_ulysses_sp = False
    engine.pad_to_length = False
    engine.compute_entropy_from_logits = entropy_from_logits
    return engine


def actor_forward(engine: MedsFSDPEngine, data: TensorDict, *, use_remove_padding: bool = True) -> TensorDict:
    """What veRL's actor does with `compute_log_prob`'s data: dynamic micro-batches, the engine's
    forward step for each, outputs re-nested in the original order (`FSDPEngine.forward_backward_batch`)."""
    tu.assign_non_tensor(data, use_remove_padding=use_remove_padding, use_dynamic_bsz=True, max_token_len_per_gpu=48)
    micro_batches, indices = prepare_micro_batches(data=data, dp_group=None, same_micro_num_in_dp=False)
    assert len(micro_batches) > 1  # the reordering path is exercised
    outputs = []
    with torch.no_grad():
        for micro_batch in micro_batches:
            model_inputs, output_args = engine.prepare_model_inputs(micro_batch)
            raw = engine.module(**model_inputs, use_cache=False)
            outputs.append({"model_output": engine.prepare_model_outputs(raw, output_args, micro_batch, None)})
    model_output = postprocess_batch_func(outputs, indices, data)["model_output"]
    return tu.get_tensordict(model_output, non_tensor_dict={"metrics": {"mfu": 0.0}})


class ActorWorkerGroup:
    """Stands in for veRL's actor worker group: `compute_log_prob` runs the actor's forward on the
    data `tqbridge` fetches from TransferQueue and writes the outputs back, as veRL's workers do."""

    def __init__(self, engine: MedsFSDPEngine) -> None:
        self.engine = engine
        self.calls: list[dict[str, Any]] = []

        @tqbridge()
        def compute_log_prob(data: TensorDict) -> TensorDict:
            self.calls.append({"fields": sorted(data.keys()), "flag": tu.get(data, FINGERPRINT_FLAG, False)})
            return actor_forward(self.engine, data)

        self.compute_log_prob = compute_log_prob


def keys_of(data: TensorDict) -> set[str]:
    return set(data.keys())  # TensorDict has no `in`


def naive_fingerprints(model: Any, sequences: list[torch.Tensor], anchors: np.ndarray) -> np.ndarray:
    """The client's reference computation (one HF forward with all hidden states) on right-padded rows."""
    ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in sequences], batch_first=True)
    return layer_logit_fingerprints(model, ids, mask, anchors.tolist())


def reference_grpo(scores: np.ndarray, groups: list[Any], eps: float = 1e-6) -> np.ndarray:
    """GRPO normalisation written out: (s - mean) / (std + eps) per group, unbiased std."""
    groups_array = np.array(groups, dtype=object)
    out = np.empty_like(scores)
    for g in set(groups):
        s = scores[groups_array == g]
        out[groups_array == g] = (s - s.mean()) / (s.std(ddof=1) + eps)
    return out


def assert_penalised_as_specified(acc: np.ndarray, penalty: np.ndarray, anchored: np.ndarray) -> None:
    wrong = acc < 0.5
    assert (penalty[wrong & anchored] > 0).all()  # every wrong boxed answer repeats a stored one
    assert not penalty[~wrong].any() and not penalty[~anchored].any()
    assert np.isclose(penalty[wrong & anchored, None], PENALTIES[None, :], atol=1e-6).any(axis=1).all()


# -- veRL v1 (the default trainer) ---------------------------------------------------------------


@pytest.mark.slow
def test_v1_trainer_penalises_repeated_errors_before_grpo(
    transfer_queue: None, meds_server: str, model: Any, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = MedsPPOTrainer(verl_config(*meds_overrides(meds_server, "verl-v1")))
    assert trainer.trainer_mode == "sync"  # veRL's sync code paths, though the mode is named "meds"
    trainer.tokenizer = tokenizer
    trainer.actor_rollout_wg = ActorWorkerGroup(make_engine(model))
    fetched: list[list[str]] = []
    kv_batch_get = tq.kv_batch_get

    def recording_get(*args: Any, **kwargs: Any) -> TensorDict:
        fetched.append(list(kwargs.get("select_fields") or []))
        return kv_batch_get(*args, **kwargs)

    monkeypatch.setattr(trainer_base.tq, "kv_batch_get", recording_get)

    for step in RESPONSES:
        samples = with_rollout_log_probs(rollouts(step, tokenizer), model)
        keys = [f"{s['uid']}_{i % N}_0" for i, s in enumerate(samples)]
        tags = [{"seq_len": len(s["input_ids"])} for s in samples]
        tq.kv_batch_put(keys=keys, partition_id="train", fields=tu.list_of_dict_to_tensordict(samples), tags=tags)
        batch = KVBatchMeta(partition_id="train", keys=keys, tags=tags, extra_info={"temperature": 1.0})
        trainer.global_steps = step + 1
        metrics: dict[str, Any] = {}

        batch = trainer._compute_old_log_prob(batch, metrics)
        assert trainer.actor_rollout_wg.calls[-1]["flag"] is True
        assert ANCHOR_FIELD in trainer.actor_rollout_wg.calls[-1]["fields"]
        assert FINGERPRINT_FLAG not in batch.extra_info  # the reference pass must not fingerprint
        assert batch.fields is None or not {ANCHOR_FIELD, FINGERPRINT_FIELD} & set(batch.fields)
        stored = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=[FINGERPRINT_FIELD, ANCHOR_FIELD])
        anchors = stored[ANCHOR_FIELD].numpy()
        assert ((anchors >= 0) == ["boxed" in s for s in RESPONSES[step] * 2]).all()
        expected = naive_fingerprints(model, [s["input_ids"] for s in samples], anchors)
        got = torch.stack(list(stored[FINGERPRINT_FIELD].unbind())).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)  # one forward pass, anchor rows only

        fetched.clear()
        batch = trainer._compute_advantage(batch, metrics)
        # veRL's own advantage step fetches no prompts, no acc and no fingerprints: the subclass must.
        assert not {"extra_fields", "prompts", "index", FINGERPRINT_FIELD} & set(fetched[-1])

        out = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["rm_scores", "advantages"])
        acc = np.array([s["extra_fields"]["reward_extra_info"]["acc"] for s in samples])
        shaped = np.array([float(r.sum()) for r in out["rm_scores"].unbind()])
        penalty = acc - shaped
        assert metrics["meds/penalty_mean"] == pytest.approx(penalty.mean(), abs=1e-6)
        if step == 0:
            assert not penalty.any()  # a prompt's first visit: nothing to repeat yet
        else:
            assert_penalised_as_specified(acc, penalty, anchors >= 0)
            assert metrics["meds/penalized_frac"] == pytest.approx(7 / 8)
        # GRPO normalised the shaped reward per prompt group.
        advantages = np.array([float(a[0]) for a in out["advantages"].unbind()])
        np.testing.assert_allclose(advantages, reference_grpo(shaped, [s["uid"] for s in samples]), atol=1e-4)
        tq.kv_clear(keys=keys, partition_id="train")


def test_v1_penalties_read_acc_from_a_colocated_reward_models_column(transfer_queue: None, tokenizer: Any) -> None:
    """With a colocated reward model veRL writes `acc` as its own TransferQueue column, not in
    `reward_extra_info`; padding samples (added to divide the batch) are neither scored nor changed."""
    samples = rollouts(1, tokenizer)
    for sample in samples:
        sample["acc"] = sample["extra_fields"].pop("reward_extra_info")["acc"]
        sample["rm_scores"] = sample["rm_scores"] * 0 + 0.25  # not the correctness
        sample[FINGERPRINT_FIELD] = torch.ones(3)
        sample[ANCHOR_FIELD] = torch.tensor(len(sample["prompts"]) + 1)
    keys = [f"colocated-{i}" for i in range(len(samples))]
    tags = [{"is_padding": i == len(samples) - 1} for i in range(len(samples))]
    tq.kv_batch_put(keys=keys, partition_id="train", fields=tu.list_of_dict_to_tensordict(samples), tags=tags)
    service = FakeService()
    meds = DriverShaper(MedsSettings(run="colocated"))
    client = MedsClient("http://meds.test", http_client=httpx.Client(transport=httpx.MockTransport(service)))
    meds._shaper = MedsShaper(client, "colocated")
    metrics = apply_penalties(KVBatchMeta(partition_id="train", keys=keys, tags=tags), meds, tokenizer, step=2)
    sent = service.bodies()[0]["rollouts"]
    assert [r["rollout_id"] for r in sent] == keys[:-1]
    assert [r["correct"] for r in sent] == [s["acc"] >= 0.5 for s in samples[:-1]]
    scores = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["rm_scores"])["rm_scores"]
    outcome = np.array([float(r.sum()) for r in scores.unbind()])
    wrong = np.array([s["acc"] < 0.5 for s in samples]) & (np.arange(len(samples)) < len(samples) - 1)
    raw = np.array([float(s["rm_scores"].sum()) for s in samples])
    np.testing.assert_allclose(outcome, np.where(wrong, raw - 0.1, raw), atol=1e-6)  # the fake penalises by 0.1
    assert metrics["meds/penalized_frac"] == pytest.approx(wrong.sum() / (len(samples) - 1))
    tq.kv_clear(keys=keys, partition_id="train")


def test_v1_config_selects_the_meds_trainer_and_engine_in_a_fresh_process() -> None:
    """The documented environment loads the plugin on `import verl` (as in every Ray worker), and
    veRL's own lookups then return the MEDS trainer and engine. The process may import only what
    `meds-client[verl]` declares (plus the service that answers): veRL's trainer modules used to fail
    on uvicorn and fastapi, which nothing declared."""
    script = textwrap.dedent(
        """
        import importlib.metadata as md, re, sys
        from packaging.requirements import Requirement

        def closure(name, extras=()):
            seen, todo = set(), [(name, tuple(extras))]
            while todo:
                dist_name, wanted = todo.pop()
                key = re.sub(r"[-_.]+", "-", dist_name).lower()
                if (key, wanted) in seen:
                    continue
                seen.add((key, wanted))
                try:
                    dist = md.distribution(dist_name)
                except md.PackageNotFoundError:
                    continue
                for text in dist.requires or []:
                    req = Requirement(text)
                    if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *wanted)):
                        todo.append((req.name, tuple(req.extras)))
            return {k for k, _ in seen}

        allowed = closure("meds-client", ["verl"])
        owners = md.packages_distributions()
        blocked = {m for m, dists in owners.items()
                   if not any(re.sub(r"[-_.]+", "-", d).lower() in allowed for d in dists)}
        blocked -= set(sys.stdlib_module_names) | {"meds_client", "_distutils_hack", "tests"}

        for name in blocked:  # as if not installed: imports fail, find_spec() answers None
            sys.modules[name] = None
        import verl  # loads the plugin named in VERL_USE_EXTERNAL_MODULES
        import verl.trainer.ppo.ray_trainer, verl.trainer.main_ppo
        from verl.trainer.ppo.v1 import get_trainer_cls
        from verl.workers.engine.base import EngineRegistry
        from meds_client.integrations.verl.engine import MedsFSDPEngine
        from meds_client.integrations.verl.legacy import MedsRayPPOTrainer
        from meds_client.integrations.verl.trainer import MedsPPOTrainer
        assert get_trainer_cls("meds") is MedsPPOTrainer
        for backend in ("fsdp", "fsdp2"):
            assert EngineRegistry.get_engine_cls("language_model", backend) is MedsFSDPEngine
        assert EngineRegistry.get_engine_cls("value_model", "fsdp2") is not MedsFSDPEngine
        print("ok")
        """
    )
    env = {
        **os.environ,
        "VERL_USE_EXTERNAL_MODULES": "meds_client.integrations.verl.plugin",
        "VERL_ENGINE_VENDOR": "meds",
    }
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_documented_config_is_valid_for_verl() -> None:
    config = verl_config(*meds_overrides("http://meds:8000", "qwen7b-grpo"), "+meds.last_n_layers=14")
    settings = MedsSettings.from_config(config)
    assert (settings.run, settings.url, settings.last_n_layers) == ("qwen7b-grpo", "http://meds:8000", 14)
    env_vars = config.ray_kwargs.ray_init.runtime_env.env_vars
    assert env_vars.VERL_ENGINE_VENDOR == "meds"
    with pytest.raises(ValueError, match="unknown meds keys"):
        MedsSettings.from_config(OmegaConf.create({"meds": {"run": "r", "lastn": 3}}))
    with pytest.raises(ValueError, match=r"\+meds.run"):
        MedsSettings.from_config(OmegaConf.create({}))


def test_prompt_keys_come_from_the_dataset_index_or_the_prompt_text(tokenizer: Any) -> None:
    by_index = DriverShaper(MedsSettings(run="r"))
    assert by_index.prompt_keys(index=[3, 4], data_source=["gsm8k", None], prompts=None, tokenizer=None) == [
        "gsm8k:3",
        "4",
    ]
    with pytest.raises(ValueError, match="prompt_key=text"):
        by_index.prompt_keys(index=None, data_source=None, prompts=None, tokenizer=None)
    by_text = DriverShaper(MedsSettings(run="r", prompt_key="text"))
    prompts = [torch.tensor(tokenizer.encode(p, add_special_tokens=False)) for p in PROMPTS]
    keys = by_text.prompt_keys(index=None, data_source=None, prompts=prompts, tokenizer=tokenizer)
    assert keys == [prompt_id(p) for p in PROMPTS]


@pytest.mark.parametrize("use_remove_padding", [True, False])
def test_engine_fingerprints_match_the_naive_computation(model: Any, tokenizer: Any, use_remove_padding: bool) -> None:
    samples = rollouts(1, tokenizer) + rollouts(0, tokenizer)
    data = tu.list_of_dict_to_tensordict(samples)
    anchors = np.array([len(s["prompts"]) + 3 for s in samples])  # any real token with a successor
    anchors[5] = -1
    data[ANCHOR_FIELD] = torch.from_numpy(anchors)
    tu.assign_non_tensor(data, **{FINGERPRINT_FLAG: True, "temperature": 1.0})
    output = actor_forward(make_engine(model), data, use_remove_padding=use_remove_padding)
    got = torch.stack(list(output[FINGERPRINT_FIELD].unbind())).numpy()
    expected = naive_fingerprints(model, [s["input_ids"] for s in samples], anchors)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not got[5].any()
    assert "log_probs" in keys_of(output)  # veRL's own outputs are still there


def test_engine_adds_nothing_unless_asked(model: Any, tokenizer: Any) -> None:
    data = tu.list_of_dict_to_tensordict(rollouts(0, tokenizer))
    tu.assign_non_tensor(data, temperature=1.0)
    output = actor_forward(make_engine(model), data)
    assert FINGERPRINT_FIELD not in keys_of(output)


def test_output_rows_reads_only_requested_rows_of_a_sharded_weight(tmp_path: Path) -> None:
    """Two gloo processes hold halves of an FSDP2-style `Shard(0)` DTensor and ask for different rows."""
    script = textwrap.dedent(
        """
        import os, sys, torch, torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        from meds_client.integrations.verl._capture import output_rows
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", rank=rank, world_size=2, init_method="file://" + sys.argv[2])
        torch.manual_seed(0)
        full = torch.randn(11, 4)  # 11 rows: uneven shards (6 + 5)
        weight = distribute_tensor(full, init_device_mesh("cpu", (2,)), [Shard(0)])
        targets = torch.tensor([0, 10, 5, 6] if rank == 0 else [7, 7, 1])
        for _ in range(2):  # repeated calls stay in step
            assert torch.equal(output_rows(weight, targets), full[targets])
        assert output_rows(weight, torch.tensor([], dtype=torch.long)).shape == (0, 4)
        dist.destroy_process_group()
        print("ok", rank)
        """
    )
    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(rank), str(store)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for rank, (proc, (out, err)) in enumerate(zip(procs, results, strict=True)):
        assert proc.returncode == 0 and f"ok {rank}" in out, err[-2000:]
    plain = torch.arange(12.0).reshape(6, 2)
    assert torch.equal(output_rows(plain, torch.tensor([5, 0])), plain[[5, 0]])


# -- veRL legacy RayPPOTrainer -------------------------------------------------------------------


def legacy_batch(step: int, tokenizer: Any) -> DataProto:
    """A batch as the legacy `fit()` holds it before `_compute_old_log_prob`: prompts left-padded,
    responses right-padded, the reward in `rm_scores`, `acc` from `reward_extra_info`."""
    samples = rollouts(step, tokenizer)
    prompts = [s["prompts"] for s in samples]
    responses = [s["responses"] for s in samples]
    p_lens, r_lens = torch.tensor([len(p) for p in prompts]), torch.tensor([len(r) for r in responses])
    p_width, r_width = int(p_lens.max()), int(r_lens.max()) + 2
    prompt_ids = torch.stack([torch.cat([torch.zeros(p_width - len(p), dtype=torch.long), p]) for p in prompts])
    response_ids = torch.stack([torch.cat([r, torch.zeros(r_width - len(r), dtype=torch.long)]) for r in responses])
    prompt_mask = torch.arange(p_width) >= p_width - p_lens[:, None]
    response_mask = torch.arange(r_width) < r_lens[:, None]
    attention_mask = torch.cat([prompt_mask, response_mask], 1).long()
    acc = np.array([s["extra_fields"]["reward_extra_info"]["acc"] for s in samples])
    rm_scores = torch.zeros(len(samples), r_width)
    rm_scores[torch.arange(len(samples)), r_lens - 1] = torch.tensor(acc, dtype=torch.float32)
    return DataProto.from_dict(
        tensors={
            "prompts": prompt_ids,
            "responses": response_ids,
            "input_ids": torch.cat([prompt_ids, response_ids], 1),
            "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
            "response_mask": attention_mask[:, p_width:],
            "rm_scores": rm_scores,
        },
        non_tensors={
            "uid": np.array([s["uid"] for s in samples], dtype=object),
            "acc": acc,
            "index": np.array([s["index"] for s in samples]),
            "data_source": np.array([s["data_source"] for s in samples], dtype=object),
        },
        meta_info={"temperature": 1.0},  # set by the legacy fit() at generation
    )


class LegacyActorWorkerGroup:
    """The legacy trainer's actor worker group: `compute_log_prob` gets a no-padding TensorDict."""

    def __init__(self, engine: MedsFSDPEngine) -> None:
        self.engine = engine
        self._dispatch_info = {"actor": [0, 1]}  # two data-parallel ranks: _balance_batch reorders

    def compute_log_prob(self, data: TensorDict) -> TensorDict:
        return actor_forward(self.engine, data)


def legacy_trainer(url: str, model: Any, tokenizer: Any) -> MedsRayPPOTrainer:
    trainer: MedsRayPPOTrainer = object.__new__(MedsRayPPOTrainer)  # no workers can start on a CPU
    trainer.config = verl_config(*meds_overrides(url, "verl-legacy"), "trainer.use_v1=false")
    trainer.meds = DriverShaper(MedsSettings.from_config(trainer.config))
    trainer.tokenizer = tokenizer
    trainer.actor_rollout_wg = LegacyActorWorkerGroup(make_engine(model))
    return trainer


@pytest.mark.slow
def test_legacy_trainer_shapes_the_reward_fit_holds(meds_server: str, model: Any, tokenizer: Any) -> None:
    trainer = legacy_trainer(meds_server, model, tokenizer)
    for step in RESPONSES:
        batch = legacy_batch(step, tokenizer)
        trainer.global_steps = step + 1
        metrics: dict[str, Any] = {}
        trainer._balance_batch(batch, metrics)
        reward_tensor = batch.batch["rm_scores"]  # what fit() takes from extract_reward(batch)
        old_log_prob, _ = trainer._compute_old_log_prob(batch)
        assert ANCHOR_FIELD not in keys_of(batch.batch) and FINGERPRINT_FLAG not in batch.meta_info
        batch = batch.union(old_log_prob)
        # fit()'s advantage block, unchanged
        batch.batch["token_level_scores"] = reward_tensor
        batch.batch["token_level_rewards"] = batch.batch["token_level_scores"]
        batch = compute_advantage(batch, adv_estimator="grpo", num_repeat=N, config=trainer.config.algorithm)

        acc = batch.non_tensor_batch["acc"]
        penalty = acc - reward_tensor.sum(-1).numpy()
        anchored = response_anchor_positions(batch, tokenizer) >= 0
        assert metrics["meds/penalty_mean"] == pytest.approx(penalty.mean(), abs=1e-6)
        if step == 0:
            assert not penalty.any()
        else:
            assert_penalised_as_specified(acc, penalty, anchored)
        advantages = batch.batch["advantages"][:, 0].numpy()
        expected = reference_grpo(acc - penalty, list(batch.non_tensor_batch["uid"]))
        np.testing.assert_allclose(advantages, expected, atol=1e-4)


def test_stock_legacy_method_drops_the_fingerprints_the_actor_returns(model: Any, tokenizer: Any) -> None:
    trainer = legacy_trainer("http://127.0.0.1:1", model, tokenizer)
    batch = legacy_batch(0, tokenizer)
    batch.batch[ANCHOR_FIELD] = torch.full((len(batch),), 5)
    batch.meta_info[FINGERPRINT_FLAG] = True
    returned: list[TensorDict] = []
    compute = trainer.actor_rollout_wg.compute_log_prob
    trainer.actor_rollout_wg.compute_log_prob = lambda data: returned.append(compute(data)) or returned[-1]  # type: ignore[method-assign]
    old_log_prob, _ = RayPPOTrainer._compute_old_log_prob(trainer, batch)
    assert FINGERPRINT_FIELD in keys_of(returned[0])
    assert FINGERPRINT_FIELD not in keys_of(old_log_prob.batch)
    assert ray_trainer.RayPPOTrainer is RayPPOTrainer  # the legacy entry point swaps it in its own process only


# -- a trainer of your own: compute_fingerprints and MedsVerlHook -------------------------------


def test_compute_fingerprints_takes_the_nested_tensordict_a_v1_worker_receives(model: Any, tokenizer: Any) -> None:
    """veRL v1's `compute_log_prob` gets jagged tensors; this used to fail with
    `AttributeError: 'TensorDict' object has no attribute 'batch'`."""
    samples = rollouts(0, tokenizer)
    data = tu.list_of_dict_to_tensordict(samples)
    compute_fingerprints(model, data, tokenizer, batch_size=3)
    anchors = data[ANCHOR_FIELD].numpy()
    assert ((anchors >= 0) == [True, True, True, False] * 2).all()
    expected = naive_fingerprints(model, [s["input_ids"] for s in samples], anchors)
    np.testing.assert_allclose(data[FINGERPRINT_FIELD].numpy(), expected, atol=1e-5)


def test_hook_works_where_legacy_fit_has_no_token_level_rewards_yet() -> None:
    """Called after old_log_prob/ref/values, the hook used to raise `KeyError: 'token_level_rewards'`:
    the legacy `fit()` builds it later, from `rm_scores`, which it already holds as its reward."""
    tokenizer = tiny_tokenizer()
    batch = legacy_batch(0, tokenizer)
    batch.non_tensor_batch["meds_fingerprint"] = np.array([np.ones(3, np.float32)] * len(batch), dtype=object)
    reward_tensor = batch.batch["rm_scores"]
    service = FakeService()
    client = MedsClient("http://meds.test", http_client=httpx.Client(transport=httpx.MockTransport(service)))
    MedsVerlHook(client, "legacy", tokenizer=tokenizer)(batch, step=3)
    # the fake service penalises wrong rollouts by 0.1
    acc = batch.non_tensor_batch["acc"]
    np.testing.assert_allclose(reward_tensor.sum(-1).numpy(), np.where(acc < 0.5, acc - 0.1, acc), atol=1e-6)


def test_anchor_positions_index_the_padded_input_ids(tokenizer: Any) -> None:
    batch = legacy_batch(0, tokenizer)
    anchors = response_anchor_positions(batch, tokenizer)
    assert (anchors >= 0).tolist() == [True, True, True, False] * 2
    assert tokenizer.convert_ids_to_tokens(batch.batch["input_ids"][0, anchors[0]].item()) == "{"


def test_hook_reads_prompt_ids_and_reference_fingerprints_from_columns(tokenizer: Any) -> None:
    service = FakeService()
    batch = legacy_batch(0, tokenizer)
    batch.batch["token_level_rewards"] = batch.batch["rm_scores"].clone()
    batch.non_tensor_batch["prompt_id"] = np.array(["a"] * 4 + ["b"] * 4, dtype=object)
    batch.non_tensor_batch["layer_logits"] = np.array([[1.0, 2.0, 3.0]] * 7 + [[4.0, 5.0, 6.0]], dtype=np.float32)
    client = MedsClient("http://meds.test", http_client=httpx.Client(transport=httpx.MockTransport(service)))
    metrics = MedsVerlHook(client, "cols", fingerprint_key="layer_logits")(batch, step=9)
    sent = service.bodies()[0]
    uids = batch.non_tensor_batch["uid"]
    assert sent["step"] == 9
    assert [r["rollout_id"] for r in sent["rollouts"]] == [f"{uids[i]}/{i % 4}" for i in range(8)]
    assert [r["prompt_id"] for r in sent["rollouts"]] == ["a"] * 4 + ["b"] * 4
    assert [r["correct"] for r in sent["rollouts"]] == [False, True, False, False] + [False] * 4
    assert decode_matrix(sent["fingerprint_matrix"])[-1].tolist() == [4.0, 5.0, 6.0]
    outcome = batch.batch["token_level_rewards"].sum(-1).numpy()
    np.testing.assert_allclose(outcome, [-0.1, 1, -0.1, -0.1] + [-0.1] * 4, atol=1e-6)
    torch.testing.assert_close(batch.batch["rm_scores"].sum(-1), torch.tensor([0.0, 1, 0, 0, 0, 0, 0, 0]))
    assert metrics["meds/penalized_frac"] == 7 / 8
