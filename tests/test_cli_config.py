"""The training command line as users run it: stacked configs keep every key with its type, typos fail in one line,
W&B is on by default (offline without credentials) with the merged config as the run config, each run's config.yaml
lands in its own folder, and a normal run prints no third-party noise."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from unigendet.cli import main

EXPERIMENTS = REPO / "experiments"


def print_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def stack(*names: str) -> list[str]:
    return [f"--config={EXPERIMENTS / n}" for n in names]


#####################################################################################################
# typed configs that stack
#####################################################################################################


@pytest.mark.parametrize("names", [("base.yaml", "gduf.yaml", "coevolve.yaml"), ("base.yaml", "gduf.yaml", "diga.yaml"),
                                   ("base.yaml", "gduf.yaml", "coevolve.yaml", "ablations/wo_diga.yaml")])
def test_later_configs_keep_the_generation_data_an_earlier_one_set(capsys, names):
    gen = print_config(capsys, *stack(*names))["data"]["init_args"]["gen"]
    assert gen["train"] == "laion/shards" and gen["image_column"] == "jpg" and gen["caption_column"] == "TEXT"
    assert gen["token_budget"] == 16384 and gen["caption_dropout"] == 0.1
    assert gen["teacher"] is ("wo_diga" not in names[-1])


def test_command_line_values_keep_their_types(capsys):
    cfg = print_config(capsys, *stack("base.yaml", "gduf.yaml"), "--data.gen.token_budget=400",
                       "--data.gen.teacher=true", "--model.model_overrides.mot.n_layers=3",
                       "--model.model_overrides.head.diga_layer=2")
    gen, over = cfg["data"]["init_args"]["gen"], cfg["model"]["model_overrides"]
    assert gen["token_budget"] == 400 and gen["teacher"] is True
    assert over["mot"]["n_layers"] == 3 and over["head"]["diga_layer"] == 2


def test_model_overrides_merge_key_by_key(capsys, tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("model:\n  model_name: demo\n  model_overrides:\n    mot: {n_layers: 3, dim: 96}\n")
    b.write_text("model:\n  model_overrides:\n    mot: {n_heads: 3}\n    head: {diga_layer: 1}\n")
    over = print_config(capsys, f"--config={a}", f"--config={b}")["model"]["model_overrides"]
    assert (over["mot"]["n_layers"], over["mot"]["dim"], over["mot"]["n_heads"]) == (3, 96, 3)
    assert over["head"]["diga_layer"] == 1


def test_typed_overrides_build_the_network_they_describe():
    from unigendet.model.config import ModelOverrides
    from unigendet.training.module import LitUniGenDet

    over = ModelOverrides.from_dict({"mot": {"n_layers": 3}, "vit": {"mean": [0.1, 0.2, 0.3]}})
    assert over.to_dict() == {"mot": {"n_layers": 3}, "vit": {"mean": [0.1, 0.2, 0.3]}}
    lit = LitUniGenDet(model_name="tiny", model_overrides=over)
    assert lit.cfg.mot.n_layers == 3 and lit.cfg.vit.mean == (0.1, 0.2, 0.3) and lit.cfg.mot.dim == 64
    assert lit.hparams.model_overrides == {"mot": {"n_layers": 3}, "vit": {"mean": [0.1, 0.2, 0.3]}}
    with pytest.raises(ValueError, match="unknown mot override keys"):
        ModelOverrides.from_dict({"mot": {"n_layer": 3}})


def test_a_model_folder_alone_gives_the_architecture_and_the_tokenizer(tmp_path):
    from tests.docs_workspace import model_folder
    from unigendet.training.module import LitUniGenDet

    tok = tmp_path / "tok"
    tok.mkdir()
    from unigendet.inputs.tokenizer import train_bpe

    train_bpe(["a photo of a cat"] * 4, tok / "tokenizer.json", vocab_size=2048)
    folder = model_folder(tmp_path / "model", tok / "tokenizer.json", seed=0)
    lit = LitUniGenDet(init_from=str(folder))
    assert lit.cfg.mot.n_layers == 8 and lit.hparams.model_name is None
    with pytest.raises(ValueError, match="model.init_from"):
        LitUniGenDet()


#####################################################################################################
# fail fast, one line
#####################################################################################################


@pytest.mark.parametrize("flag, message", [
    ("--model.model_name=dmeo", "model.model_name: unknown preset 'dmeo' (and no such model folder); presets: "
                                "bagel-7b-mot, debug, demo, tiny"),
    ('--model.model_overrides={"mot": {"n_layer": 3}}', "model.model_overrides.mot: Option 'n_layer' is not accepted"),
    ("--model.loss.cee=1", "model.loss: Option 'cee' is not accepted"),
    ("--data.gen.token_budget=abc", "data.gen.token_budget: Expected a <class 'int'>"),
])
def test_config_errors_are_one_line_naming_unigendet(capsys, flag, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *stack("demo.yaml"), flag, "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"unigendet fit: error: {message}"), err


def test_errors_raised_while_building_are_one_line_too():
    proc = subprocess.run(["unigendet", "fit", *stack("demo.yaml"), "--model.stage.teacher=bad",
                           "--trainer.logger=false"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode == 2
    err = [line for line in proc.stderr.strip().splitlines() if not line.startswith(("Seed set", "GPU", "TPU"))]
    assert err == ["unigendet fit: error: teacher must be 'frozen' or 'snapshot', got 'bad'"]


#####################################################################################################
# W&B by default
#####################################################################################################


def test_base_logs_to_wandb_offline_without_credentials(monkeypatch, tmp_path):
    from unigendet.tracking.wandb_logger import WandbLogger

    base = yaml.safe_load((EXPERIMENTS / "base.yaml").read_text())["trainer"]
    assert base["logger"]["class_path"] == "unigendet.tracking.wandb_logger.WandbLogger"
    assert [c["class_path"] for c in base["callbacks"]][:4] == ["callbacks.DetectionMetrics", "callbacks.Throughput",
                                                                "callbacks.ImageSamples",
                                                                "callbacks.ForensicExplanations"]
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert WandbLogger(save_dir=str(tmp_path))._offline is True
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password abc\n")
    (tmp_path / "netrc").chmod(0o600)
    assert WandbLogger(save_dir=str(tmp_path))._offline is False
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert WandbLogger(save_dir=str(tmp_path))._offline is False
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "online")  # W&B's own setting wins (wandb.init applies it)
    assert WandbLogger(save_dir=str(tmp_path))._offline is False
    assert WandbLogger(save_dir=str(tmp_path), offline=True)._offline is True
    assert "anonymous" not in WandbLogger(save_dir=str(tmp_path))._wandb_init


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``unigendet fit --config experiments/demo.yaml`` in a fresh folder holding the small demo corpus and its
    autoencoder (``unigendet train-ae``, as demo.yaml's comment says), two steps
    with a validation, no W&B credentials: (its folder, the completed process)."""
    from tests.docs_workspace import environment
    from unigendet.demo.corpus import SMALL, build_demo_corpus

    ws = tmp_path_factory.mktemp("demo_fit")
    (ws / "experiments").symlink_to(EXPERIMENTS)
    (ws / "home").mkdir()
    build_demo_corpus(ws / "demo-run" / "corpus", seed=0, n_real=SMALL["n_real"],
                      n_fake_per_family=SMALL["n_fake_per_family"])
    ae = subprocess.run(["unigendet", "train-ae", "--corpus", "demo-run/corpus", "--out", "demo-run/ae.safetensors",
                         "--steps", "10"], cwd=ws, env=environment(ws), capture_output=True, text=True, timeout=300)
    assert ae.returncode == 0, ae.stderr[-4000:]
    cmd = ["unigendet", "fit", "--config", "experiments/demo.yaml", "--trainer.max_steps=2",
           "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2"]
    proc = subprocess.run(cmd, cwd=ws, env=environment(ws), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ws, proc


def test_the_run_config_is_the_merged_config_in_its_own_folder_and_in_wandb(demo_run):
    from tests.wandb_log import read_run, records

    ws, proc = demo_run
    assert not (ws / "config.yaml").exists()
    [run_folder] = [p for p in (ws / "demo-run" / "unigendet-demo").iterdir() if p.is_dir()]
    saved = yaml.safe_load((run_folder / "config.yaml").read_text())
    assert saved["data"]["init_args"]["gen"]["train"] == "demo-run/corpus/t2i/train.jsonl"
    assert (run_folder / "checkpoints" / "last.ckpt").exists()
    [log] = (ws / "demo-run" / "wandb").glob("offline-run-*/run-*.wandb")
    assert log.name == f"run-{run_folder.name}.wandb"
    config, history = read_run(log)
    assert config["model"]["model_name"] == "demo" and config["trainer"]["max_steps"] == 2
    assert config["data"]["init_args"]["gen"]["val"] == "demo-run/corpus/t2i/val.jsonl"
    metrics = {r.metric.name: r.metric for r in records(log) if r.WhichOneof("record_type") == "metric"}
    assert metrics["val/acc"].summary.max and metrics["val/auroc"].summary.max
    assert any("val/acc" in row for row in history)
    assert f"W&B run {run_folder.name} (offline)" in proc.stderr and "wandb sync" in proc.stderr


NOISE = ("set_vital", "LeafSpec", "LightningCLI's args", "litlogger", "litmodels", "anonymous", "srun",
         "IterableDataset", "lr_scheduler.step()", "pre-optimization state", "Warning", "warn(", "wandb: ")


def test_a_normal_fit_prints_no_third_party_noise_and_counts_steps(demo_run):
    _, proc = demo_run
    text = (proc.stdout + proc.stderr).replace("\r", "\n")
    assert not [n for n in NOISE if n in text], [line for line in text.splitlines() if any(n in line for n in NOISE)]
    assert "Training: 100%" in text and "2/2" in text
    assert "Epoch 0" not in text


def test_without_a_logger_the_config_goes_to_a_run_folder_not_the_working_directory(tmp_path):
    from tests.docs_workspace import environment

    (tmp_path / "home").mkdir()
    (tmp_path / "experiments").symlink_to(EXPERIMENTS)
    from unigendet.demo.corpus import SMALL, build_demo_corpus

    build_demo_corpus(tmp_path / "demo-run" / "corpus", seed=0, n_real=SMALL["n_real"],
                      n_fake_per_family=SMALL["n_fake_per_family"])
    cmd = ["unigendet", "fit", "--config", "experiments/base.yaml", "--config", "experiments/debug.yaml",
           "--trainer.default_root_dir=.", "--trainer.max_steps=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=environment(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "config.yaml").exists()
    [saved] = (tmp_path / "lightning_logs").glob("*/config.yaml")
    assert yaml.safe_load(saved.read_text())["model"]["model_name"] == "demo"


def test_the_repository_tracks_no_run_config():
    tracked = subprocess.run(["git", "ls-files", "config.yaml"], cwd=REPO, capture_output=True, text=True).stdout
    assert tracked.strip() == ""
    ignored = subprocess.run(["git", "check-ignore", "config.yaml", "runs/x"], cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    assert ignored == ["config.yaml", "runs/x"]


#####################################################################################################
# the noise filters
#####################################################################################################


def test_each_noise_filter_silences_its_message_and_nothing_else():
    from unigendet.tracking import noise

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        noise.install()
        for n in noise.WARNINGS:
            sample = n.message.replace("\\", "")
            warnings.warn(sample + " (sample)", n.category, stacklevel=1)
        warnings.warn("a warning of our own", UserWarning, stacklevel=1)
        warnings.warn("torch: some new deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning of our own", "torch: some new deprecation"]


def test_evaluation_filters_apply_to_evaluation_only():
    """A resumed fit still warns that the checkpoint folder changed; `unigendet test` of a checkpoint does not."""
    from unigendet.tracking import noise

    [n] = noise.EVALUATION_WARNINGS
    sample = "The dirpath has changed from 'a' to 'b', therefore ... won't be reloaded."
    for evaluation, shown in ((False, [sample]), (True, [])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()  # an in-process `unigendet test` earlier in the session installed the filter
            warnings.simplefilter("always")
            noise.install(evaluation=evaluation)
            warnings.warn(sample, n.category, stacklevel=1)
        assert [str(w.message) for w in caught] == shown


def test_noise_filters_match_what_the_libraries_print():
    """Each filtered message is still the text its library prints (a library that rewords one would make the
    filter silently stop working): the source files named in noise.py contain it."""
    import importlib.util
    import re

    from unigendet.tracking import noise

    for n in [*noise.WARNINGS, *noise.EVALUATION_WARNINGS, *noise.LOG_LINES]:
        root = Path(importlib.util.find_spec(n.source.split(".")[0]).origin).parent
        literal = n.printed_as or re.sub(r"\\(.)", r"\1", n.message)
        hits = [p for p in root.rglob("*.py") if literal in p.read_text(errors="ignore")]
        assert hits, f"{literal!r} no longer appears anywhere in {root}"


def test_the_module_entry_point_runs_the_same_quiet_program():
    proc = subprocess.run([sys.executable, "-m", "unigendet", "fit", "--config", str(EXPERIMENTS / "demo.yaml"),
                           "--model.model_name=dmeo"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "default"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "unigendet fit: error: model.model_name: unknown preset 'dmeo' (and no such model folder); presets: "
        "bagel-7b-mot, debug, demo, tiny"], proc.stderr


def test_progress_bar_is_in_steps(tmp_path):
    """The training bar counts global steps of max_steps from the start, including after a resume."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from unigendet.lightning_cli import StepProgressBar

    bar = StepProgressBar()
    trainer = L.Trainer(max_steps=5, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        callbacks=[bar], default_root_dir=tmp_path, enable_model_summary=False)
    trainer.fit(BoringModel())
    assert bar.train_progress_bar.total == 5 and bar.train_progress_bar.n == 5
    assert bar.train_progress_bar.desc.startswith("Training")



#####################################################################################################
# what the documentation says
#####################################################################################################


def test_the_docs_name_one_inception_file_and_no_unfinished_parts():
    docs = [REPO / "README.md", *(REPO / "experiments").rglob("README.md"), *(REPO / "docs").glob("*.md")]
    text = "\n".join(p.read_text() for p in docs)
    import re

    names = set(re.findall(r"[\w-]*inception-2015-12-05-6726825d\.pth", text))
    assert names == {"weights-inception-2015-12-05-6726825d.pth"}, names  # torch-fidelity's release file name
    assert "arriving" not in (REPO / "README.md").read_text()
    assert "in progress" not in (REPO / "docs" / "design.md").read_text()


def test_slurm_templates_train_under_fsdp2():
    """Both templates start every rank with --trainer.strategy=fsdp2 (the single-node one ran plain DDP, the
    multi-node one FSDP1, which cannot run this training loop), and the docs pass no other strategy."""
    import re

    for name in ("single_node.sbatch", "multi_node.sbatch"):
        script = (EXPERIMENTS / "slurm" / name).read_text()
        [srun] = [line for line in script.splitlines() if line.startswith("srun ")]
        assert "python -m unigendet fit --trainer.strategy=fsdp2 \"$@\"" in srun, srun
    docs = (EXPERIMENTS / "slurm" / "README.md").read_text() + (REPO / "README.md").read_text()
    assert not re.search(r"--trainer\.strategy=fsdp(?!2)", docs)
    assert "edit the" not in (REPO / "README.md").read_text()


def test_a_callback_setting_the_model_cannot_honour_fails_before_training(tmp_path):
    """ImageSamples px=256 on the demo preset (at most 64 px) is a one-line error when the config is built, not a
    crash at the first validation after N training steps."""
    from tests.docs_workspace import environment

    (tmp_path / "home").mkdir()
    proc = subprocess.run(["unigendet", "fit", "--config", str(EXPERIMENTS / "demo.yaml"),
                           "--trainer.callbacks+=callbacks.ImageSamples", "--trainer.callbacks.px=256",
                           "--model.init_ae_from=null", "--data.train=nowhere.json"], cwd=tmp_path,
                          env=environment(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.strip().splitlines() if not line.startswith(("Seed set", "GPU", "TPU"))]
    assert err == ["unigendet fit: error: ImageSamples px=256: 256x256 px exceeds what the demo model generates: "
                   "at most 64 px per side"], proc.stderr


def test_image_samples_px_none_is_the_models_largest_side_up_to_512():
    from callbacks import ImageSamples
    from unigendet.training.module import LitUniGenDet

    demo = LitUniGenDet(model_name="demo")  # 8 px per latent token, 8 of them: 64 px
    cb = ImageSamples(px=None)
    cb.check(demo)
    assert cb.px == 64
    cb = ImageSamples(px=None)
    cb.check(LitUniGenDet(model_name="demo", model_overrides={"flow": {"max_latent_size": 128}}))
    assert cb.px == 512
    with pytest.raises(ValueError, match="ImageSamples px=72: 72x72 px exceeds"):
        ImageSamples(px=72).check(demo)
    with pytest.raises(ValueError, match="multiples of 8 px"):
        ImageSamples(px=100).check(demo)
