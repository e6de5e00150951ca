"""Every code block of client/README.md, executed.

Python blocks run as written against a live service (`$MEDS_URL`), with the model name replaced by a
tiny random model saved to disk and TRL told to train on the CPU (`use_cpu=True`); OpenRLHF, which
does not install on a CPU, is provided as the parts of its 0.11.2 modules the example touches
(restated in tests/e2e/test_trainer_openrlhf.py). The veRL command lines are composed with veRL's own
Hydra config and resolved with veRL's own trainer and engine lookups (veRL cannot train on a CPU);
the install lines must name extras that exist.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import tomllib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from meds_client import MedsClient
from meds_client.testing import tiny_model, tiny_tokenizer
from tests.e2e import test_trainer_openrlhf as openrlhf_layout

ROOT = Path(__file__).parents[2]
README = ROOT / "client" / "README.md"
MODEL_NAME = "Qwen/Qwen2.5-Math-7B"
CPU_SUBSTITUTIONS = {'report_to="none",': 'report_to="none", use_cpu=True,'}  # TRL defaults to bf16 on a GPU
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(language: str) -> list[str]:
    return [code for lang, code in BLOCK.findall(README.read_text()) if lang == language]


def python_block(marker: str) -> str:
    """The one Python block that contains `marker`."""
    found = [code for code in blocks("python") if marker in code]
    assert len(found) == 1, f"{len(found)} Python blocks contain {marker!r}"
    return found[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tokenizer = tiny_tokenizer()
    tiny_model("qwen2", vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def run_example(meds_server: str, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("MEDS_URL", meds_server)
    monkeypatch.chdir(tmp_path)

    def run(code: str) -> dict[str, Any]:
        namespace: dict[str, Any] = {"__name__": "readme_example"}
        for text, on_cpu in {**CPU_SUBSTITUTIONS, MODEL_NAME: str(model_dir)}.items():
            code = code.replace(text, on_cpu)
        exec(compile(code, str(README), "exec"), namespace)
        return namespace

    return run


def test_every_block_is_covered() -> None:
    languages = [lang for lang, _ in BLOCK.findall(README.read_text())]
    assert sorted(set(languages)) == ["bash", "python"]
    assert len(blocks("python")) == 4 and len(blocks("bash")) == 3


def test_install_lines_name_existing_extras() -> None:
    extras = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = re.findall(r'"(?:meds-client|\./client)\[(\w+)\]"', blocks("bash")[0] + README.read_text())
    assert named and set(named) <= set(extras)


@pytest.mark.slow
def test_client_example(run_example: Any, meds_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    run_example(python_block("meds.score("))
    # first visit: remembered, not penalised; then a step of 16 as columns
    assert capsys.readouterr().out.split() == ["0.0", "0", "scored", "16", "float64", "scored"]
    with MedsClient(meds_server) as client:
        run = client.get_run("qwen7b-grpo")
    assert run.config["last_n_layers"] == 14 and run.stats["vectors"] == 17


@pytest.mark.slow
def test_fingerprint_example(run_example: Any) -> None:
    namespace = run_example(python_block("fingerprint_sequences("))
    vector = namespace["vectors"][0]
    assert vector is not None and vector.dtype == np.float32 and vector.shape == (3,)  # 3 layers < 14


@pytest.mark.slow
def test_trl_example(run_example: Any, meds_server: str) -> None:
    namespace = run_example(python_block("MedsGRPOTrainer("))
    logs = [entry for entry in namespace["trainer"].state.log_history if "meds/scored_frac" in entry]
    steps = [entry for entry in logs if "rewards/meds_penalty/mean" in entry]
    assert len(steps) == 2 and all(entry["meds/error_frac"] == 0.0 for entry in steps)  # one log per step


@pytest.fixture
def openrlhf_modules(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """`openrlhf.trainer.ppo_utils.{experience_maker,length_penalty}` as far as the example uses them:
    `compute_advantages_and_returns` calls the module-level `apply_length_penalties`, then normalises."""
    length_penalty = types.ModuleType("openrlhf.trainer.ppo_utils.length_penalty")
    length_penalty.apply_length_penalties = openrlhf_layout.apply_length_penalties  # type: ignore[attr-defined]
    experience_maker = types.ModuleType("openrlhf.trainer.ppo_utils.experience_maker")
    experience_maker.__dict__.update(
        torch=torch,
        group_norm=openrlhf_layout.group_norm,
        apply_length_penalties=openrlhf_layout.apply_length_penalties,
    )
    exec(  # the maker must look up apply_length_penalties as its own global, as OpenRLHF's does
        "def compute_advantages_and_returns(experiences, args):\n"
        "    for experience in experiences:\n"
        "        experience.rewards = experience.rewards.to(torch.float32)\n"
        "    apply_length_penalties(experiences, args)\n"
        "    return group_norm(experiences, args)\n",
        experience_maker.__dict__,
    )
    names = ["openrlhf", "openrlhf.trainer", "openrlhf.trainer.ppo_utils"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, length_penalty.__name__, length_penalty)
    monkeypatch.setitem(sys.modules, experience_maker.__name__, experience_maker)
    sys.modules["openrlhf.trainer.ppo_utils"].experience_maker = experience_maker  # type: ignore[attr-defined]
    sys.modules["openrlhf.trainer.ppo_utils"].length_penalty = length_penalty  # type: ignore[attr-defined]
    sys.modules["openrlhf.trainer"].ppo_utils = sys.modules["openrlhf.trainer.ppo_utils"]  # type: ignore[attr-defined]
    sys.modules["openrlhf"].trainer = sys.modules["openrlhf.trainer"]  # type: ignore[attr-defined]
    yield experience_maker


@pytest.mark.slow
def test_openrlhf_example(run_example: Any, openrlhf_modules: types.ModuleType) -> None:
    run_example(python_block("apply_meds_penalties("))
    args = openrlhf_layout.Args()
    for step in openrlhf_layout.RESPONSES:
        experiences = openrlhf_layout.make_experiences(step)
        openrlhf_modules.compute_advantages_and_returns(experiences, args)
        penalties = torch.cat([e.info["meds_penalty"] for e in experiences]).numpy()
        scores = torch.cat([e.scores for e in experiences if e.scores is not None]).numpy()
        if step == 0:
            assert not penalties.any()
        else:
            assert (penalties[scores < 0.5] > 0).all() and not penalties[scores >= 0.5].any()


def verl_command(module: str) -> list[str]:
    """The Hydra overrides of the README's `python -m <module>` command line."""
    found = [code for code in blocks("bash") if f"python -m {module} " in code]
    assert len(found) == 1
    words = shlex.split(os.path.expandvars(found[0].replace("\\\n", " ")))
    return words[words.index(module) + 1 :]


@pytest.mark.parametrize("module", ["verl.trainer.main_ppo", "meds_client.integrations.verl.legacy"])
def test_verl_commands_resolve_to_the_meds_trainer_and_engine(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.workers.engine.base import EngineRegistry

    from meds_client.integrations.verl._driver import MedsSettings
    from meds_client.integrations.verl.engine import MedsFSDPEngine
    from meds_client.integrations.verl.legacy import main
    from meds_client.integrations.verl.trainer import MedsPPOTrainer
    from tests.e2e.test_trainer_verl import verl_config

    config = verl_config(*verl_command(module))
    settings = MedsSettings.from_config(config)
    assert settings.run.startswith("qwen7b") and settings.last_n_layers == 14
    env_vars = config.ray_kwargs.ray_init.runtime_env.env_vars
    for plugin in env_vars.VERL_USE_EXTERNAL_MODULES.split(","):
        importlib.import_module(plugin)
    monkeypatch.setenv("VERL_ENGINE_VENDOR", env_vars.VERL_ENGINE_VENDOR)
    strategy = config.actor_rollout_ref.actor.strategy
    assert EngineRegistry.get_engine_cls("language_model", strategy) is MedsFSDPEngine
    if module == "verl.trainer.main_ppo":
        assert config.trainer.use_v1 and get_trainer_cls(config.trainer.v1.trainer_mode) is MedsPPOTrainer
    else:
        assert not config.trainer.use_v1 and callable(main)
