"""W&B sweeps (``experiments/sweeps/*.yaml``): one point of each sweep's search space, turned into a command line by
wandb's own agent code (``wandb.wandb_agent.Agent._command_run``, with its process launch recorded instead of run),
is accepted by the CLI and trains a step on a test-sized model, and the offline W&B run it writes records the swept
values in its config. No W&B server: ``WANDB_MODE=offline``, every W&B folder under ``tmp_path``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.test_resume import SMALL, corpus  # noqa: F401  (``corpus`` is a fixture)
from tests.wandb_log import read_run

SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))
# the top-level keys of a sweep configuration (https://docs.wandb.ai/guides/sweeps/sweep-config-keys/)
SWEEP_KEYS = {"program", "entity", "project", "description", "name", "method", "metric", "parameters",
              "early_terminate", "command", "run_cap"}
# ${envvar:NAME} in a sweep command, as the test sets it: a random init instead of a GDUF export
ENVVARS = {"GDUF_EXPORT": "null"}


def logged_val_metrics() -> set[str]:
    """The ``val/...`` names ``LitUniGenDet.on_validation_epoch_end`` logs, from the function that computes them."""
    import torch

    from unigendet.evaluation.scores import loop_metrics

    collected = {"p_fake": [torch.tensor([0.2, 0.7])], "label": [torch.tensor([0, 1])],
                 "ce": [torch.tensor([1.0, 2.0])], "mse": [torch.tensor([0.5])]}
    return {f"val/{k}" for k in loop_metrics(collected)}


def concrete(name: str, spec: dict):
    """One value of a parameter's search space: its ``value``, the first of its ``values``, or its ``min``."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return spec["values"][0]
    if "min" in spec:
        return spec["min"]
    raise ValueError(f"parameter {name}: no value, values or min in {spec}")


def agent_command(sweep: dict, params: dict, run_id: str, monkeypatch) -> tuple[list[str], dict[str, str]]:
    """The argv and environment a ``wandb agent`` would start for a server command to run ``params``: wandb's own
    ``Agent._command_run`` (macro expansion, sweep parameter file, WANDB_RUN_ID), with ``AgentProcess`` recorded."""
    from wandb import wandb_agent

    launched: list[tuple[list[str], dict[str, str]]] = []

    class RecordedProcess:
        def __init__(self, env=None, command=None, **kwargs):
            launched.append((command, env))

    monkeypatch.setattr(wandb_agent, "AgentProcess", RecordedProcess)
    for name in ("WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):  # set by the agent: restored after the test
        monkeypatch.delenv(name, raising=False)
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id=os.environ["WANDB_SWEEP_ID"])
    agent._sweep_command = list(sweep["command"])  # what Agent.run() takes from the sweep's config
    agent._command_run({"type": "run", "run_id": run_id, "program": sweep["program"],
                        "args": {name: {"value": value} for name, value in params.items()}})
    assert len(launched) == 1, launched
    return launched[0]


def test_there_are_sweeps():
    assert {p.name for p in SWEEPS} >= {"gduf_demo.yaml", "diga.yaml"}


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_is_well_formed(path):
    check_sweep(path)


def check_sweep(path: Path) -> None:
    """The sweep file's keys, method, metric (one that validation logs) and flat LightningCLI parameter names."""
    sweep = yaml.safe_load(path.read_text())
    assert set(sweep) <= SWEEP_KEYS, f"unknown keys {set(sweep) - SWEEP_KEYS}"
    assert sweep["method"] in ("grid", "random", "bayes")
    if sweep["method"] == "bayes" or "metric" in sweep:
        assert sweep["metric"]["goal"] in ("minimize", "maximize")
        assert sweep["metric"]["name"] in logged_val_metrics()
    for name, spec in sweep["parameters"].items():
        # flat dotted LightningCLI paths (a nested `parameters:` block would arrive as one dict-valued flag)
        assert "parameters" not in spec and re.fullmatch(r"(model|data|trainer)(\.\w+)+", name), name
        if sweep["method"] == "grid":
            assert "value" in spec or "values" in spec, f"grid sweeps need discrete values: {name}"
    assert "${args}" in sweep["command"] and "${args_no_hyphens}" not in sweep["command"]


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_agent_command_trains_a_step_and_records_the_swept_values(path, corpus, tmp_path, monkeypatch):  # noqa: F811
    sweep = yaml.safe_load(path.read_text())
    params = {name: concrete(name, spec) for name, spec in sweep["parameters"].items()}
    run_id = "test" + re.sub(r"\W", "", path.stem)
    venv_bin = Path(sys.executable).parent
    assert (venv_bin / "python").exists(), "the agent runs `/usr/bin/env python`: it must be this interpreter"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_SWEEP_ID": "offlinesweep",
           "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           **{f"WANDB_{d}_DIR": str(tmp_path / "wandb_home" / d.lower()) for d in ("CACHE", "DATA", "CONFIG")},
           "WANDB_DIR": str(tmp_path / "agent"), "XDG_CACHE_HOME": str(tmp_path / "wandb_home" / "xdg"), **ENVVARS}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv, run_env = agent_command(sweep, params, run_id, monkeypatch)
    assert not [a for a in argv if "${" in a], f"unexpanded macros (add the variable to ENVVARS): {argv}"
    assert argv[:2] == ["/usr/bin/env", "python"]
    swept = [a for a in argv if a.split("=", 1)[0].lstrip("-") in params]
    assert swept == [f"--{name}={value}" for name, value in params.items()]

    # test-sized model and data, after the sweep's flags; none of them touches a swept value
    overrides = model_overrides(params)
    det, logs = corpus / "detection", tmp_path / "logs"
    extra = ["--model.model_name=demo", f"--model.model_overrides={overrides}", "--model.init_ae_from=null",
             "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
             f"--trainer.logger.init_args.save_dir={logs}", "--trainer.logger.init_args.offline=true",
             "--trainer.max_steps=1", "--trainer.accelerator=cpu", "--trainer.devices=1",
             "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
             f"--trainer.default_root_dir={tmp_path / 'root'}",
             f"--data.train={det / 'train.json'}", f"--data.val={det / 'val.json'}",
             f"--data.tokenizer={corpus / 'tokenizer.json'}", "--data.image_root=null", "--data.num_workers=0",
             "--data.token_budget=900", "--data.packs_per_epoch=5",
             f"--data.gen.train={corpus / 't2i/train.jsonl'}", f"--data.gen.val={corpus / 't2i/val.jsonl'}",
             "--data.gen.token_budget=400", "--data.gen.image_column=image", "--data.gen.caption_column=caption"]
    assert not {a.split("=", 1)[0].lstrip("-") for a in extra} & set(params)
    proc = subprocess.run([*argv, *extra], cwd=REPO, env=run_env, capture_output=True, text=True, timeout=600)
    (tmp_path / "fit.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stderr[-4000:]}"

    run_dirs = list((logs / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(run_dirs) == 1, f"expected one offline run {run_id} under {logs / 'wandb'}: {run_dirs}"
    config, history = read_run(run_dirs[0] / f"run-{run_id}.wandb")
    for name, value in params.items():
        # the agent's sweep parameter file (WANDB_SWEEP_PARAM_PATH), recorded by wandb.init under the flat name
        assert config.get(name) == value, (name, config.get(name))
        # the merged configuration (the run's W&B config, nested model / data / trainer), as LightningCLI parsed it:
        # proves the flag reached the parsed config the run was built from
        *parents, leaf = name.split(".")
        node = config
        for key in parents:
            node = node[key]
        assert node[leaf] == value, (name, node)
    assert config["model"]["model_name"] == "demo"
    assert config["model"]["model_overrides"]["mot"]["n_layers"] == overrides["mot"]["n_layers"]
    steps = [row for row in history if any(k.startswith("train/loss_") for k in row)]
    assert [row["trainer/global_step"] for row in steps] == [0], steps
    if "model.stage.diga_layer" in params:  # the DIGA loss ran at the swept layer
        assert "train/loss_diga" in steps[0], steps


def model_overrides(params: dict) -> dict:
    """tests.test_resume.SMALL, with enough decoder layers for a swept DIGA layer."""
    layers = max(SMALL["mot"]["n_layers"], params.get("model.stage.diga_layer") or 0)
    return {**SMALL, "mot": {**SMALL["mot"], "n_layers": layers}}
