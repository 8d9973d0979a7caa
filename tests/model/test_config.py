"""Tests of unigendet.model.config / presets / bagel_config: presets, overrides, validation, BAGEL folder json."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, bagel_keys_file, config_diff, fixture_params, parity_fixture_dirs
from unigendet.model.bagel_config import config_from_bagel_dir, config_to_bagel_files, tokenizer_special_ids
from unigendet.model.config import (
    DetHeadConfig,
    FlowConfig,
    MoTConfig,
    TokenConfig,
    UniGenDetConfig,
    VAEConfig,
    ViTConfig,
)
from unigendet.model.presets import PRESETS

#####################################################################################################
# Helpers
#####################################################################################################


def _spec_comment(prefix: str) -> dict:
    """The JSON object on bagel_keys.txt's comment line starting with ``prefix``."""
    for line in bagel_keys_file().read_text().splitlines():
        if line.startswith(prefix):
            return json.loads(line[line.index("{"):])
    raise AssertionError(f"no {prefix!r} line in {bagel_keys_file()}")


def _write_folder(folder: Path, files: dict[str, dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content))
    return folder


_SPECIAL = {"bos": "<|im_start|>", "eos": "<|im_end|>", "vision_start": "<|vision_start|>",
            "vision_end": "<|vision_end|>"}

#####################################################################################################
# Presets
#####################################################################################################


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_validates(name):
    cfg = UniGenDetConfig.from_name(name)
    assert cfg.name == name
    for key, cls in (("mot", MoTConfig), ("vit", ViTConfig), ("vae", VAEConfig), ("flow", FlowConfig),
                     ("head", DetHeadConfig), ("tokens", TokenConfig)):
        assert type(getattr(cfg, key)) is cls
    again = UniGenDetConfig.from_dict(cfg.to_dict())  # validation runs again on the serialised form
    assert again == cfg
    json.dumps(cfg.to_dict())  # plain data only
    ids = dataclasses.asdict(cfg.tokens).values()
    assert len(set(ids)) == 4 and all(0 <= i < cfg.mot.vocab_size for i in ids)


def test_bagel_preset_matches_the_spec():
    cfg = UniGenDetConfig.from_name("bagel-7b-mot")
    llm = _spec_comment("# llm_config:")
    vit = _spec_comment("# vit_config")
    vae = _spec_comment("# vae_params")
    bagel = _spec_comment("# bagel:")
    m, v = cfg.mot, cfg.vit
    assert (m.vocab_size, m.dim, m.mlp_dim, m.n_layers) == (llm["vocab_size"], llm["hidden_size"],
                                                             llm["intermediate_size"], llm["num_hidden_layers"])
    assert (m.n_heads, m.n_kv_heads) == (llm["num_attention_heads"], llm["num_key_value_heads"])
    assert (m.rope_theta, m.norm_eps, m.qk_norm) == (llm["rope_theta"], llm["rms_norm_eps"], llm["qk_norm"])
    assert m.head_dim == 128
    assert (v.dim, v.mlp_dim, v.n_layers, v.n_heads) == (vit["hidden_size"], vit["intermediate_size"],
                                                         vit["num_hidden_layers"], vit["num_attention_heads"])
    assert (v.patch_size, v.image_size, v.norm_eps) == (vit["patch_size"], vit["image_size"], vit["layer_norm_eps"])
    assert vit["hidden_act"] == "gelu_pytorch_tanh" and v.act == "gelu_tanh"
    assert bagel["connector_act"] == "gelu_pytorch_tanh" and v.connector_act == "gelu_tanh"
    assert v.max_patches_per_side == bagel["vit_max_num_patch_per_side"]
    assert (cfg.flow.latent_patch_size, cfg.flow.max_latent_size) == (bagel["latent_patch_size"],
                                                                       bagel["max_latent_size"])
    assert cfg.vae.kind == "flux"
    assert {k: getattr(cfg.vae, k) for k in vae} == {k: tuple(x) if isinstance(x, list) else x for k, x in vae.items()}
    assert cfg.head.diga_layer == 8


#####################################################################################################
# Overrides
#####################################################################################################


def test_flat_override_n_layers_goes_to_mot():
    cfg = UniGenDetConfig.from_name("tiny", n_layers=3)
    assert cfg.mot.n_layers == 3
    assert cfg.vit.n_layers == PRESETS["tiny"]["vit"]["n_layers"]


@pytest.mark.parametrize(("key", "value", "component"), [("vocab_size", 400, "mot"), ("n_kv_heads", 1, "mot"),
                                                         ("timestep_shift", 2.0, "flow"), ("diga_layer", 2, "head"),
                                                         ("z_channels", 8, "vae"), ("bos", 1, "tokens")])
def test_flat_override_unique_key(key, value, component):
    cfg = UniGenDetConfig.from_name("tiny", **{key: value})
    assert getattr(getattr(cfg, component), key) == value
    base = UniGenDetConfig.from_name("tiny")
    assert set(config_diff(cfg, base)) == {f"{component}.{key}"}


def test_flat_overrides_to_several_components():
    cfg = UniGenDetConfig.from_name("tiny", patch_size=16, image_size=256, max_latent_size=8, diga=False)
    assert (cfg.vit.patch_size, cfg.vit.image_size, cfg.vit.max_patches_per_side) == (16, 256, 16)
    assert (cfg.flow.max_latent_size, cfg.head.diga) == (8, False)


def test_nested_override_keeps_the_other_fields():
    cfg = UniGenDetConfig.from_name("tiny", vit={"n_layers": 1})
    base = UniGenDetConfig.from_name("tiny")
    assert cfg.vit.n_layers == 1
    assert config_diff(cfg, base) == {"vit.n_layers": (1, base.vit.n_layers)}
    assert PRESETS["tiny"]["vit"]["n_layers"] == 2  # the preset table is not mutated


def test_overrides_do_not_leak_between_calls():
    before = copy.deepcopy(PRESETS)
    UniGenDetConfig.from_name("tiny", mot={"n_layers": 5}, vae={"ch_mult": [1, 2, 2, 2]}, tokens={"bos": 1})
    assert PRESETS == before
    assert UniGenDetConfig.from_name("tiny").mot.n_layers == 2


@pytest.mark.parametrize("key", ["dim", "n_heads", "mlp_dim"])
def test_ambiguous_flat_override(key):
    with pytest.raises(ValueError, match=key) as err:
        UniGenDetConfig.from_name("tiny", **{key: 32})
    assert "mot" in str(err.value) and "vit" in str(err.value)


def test_unknown_override_and_preset():
    with pytest.raises(ValueError, match="not_a_field"):
        UniGenDetConfig.from_name("tiny", not_a_field=1)
    with pytest.raises(ValueError, match="no-such-preset"):
        UniGenDetConfig.from_name("no-such-preset")
    with pytest.raises(ValueError, match="bogus"):
        UniGenDetConfig.from_dict({**UniGenDetConfig.from_name("tiny").to_dict(), "bogus": 1})


#####################################################################################################
# Validation at construction
#####################################################################################################

_INVALID = {
    "heads-not-dividing-dim": {"mot": {"n_heads": 5}},
    "gqa": {"mot": {"n_kv_heads": 3}},
    "odd-head-dim": {"mot": {"dim": 12, "n_heads": 4, "n_kv_heads": 2}},
    "vit-heads": {"vit": {"n_heads": 3}},
    "pixel-z": {"vae": {"kind": "pixel", "downsample": 4, "z_channels": 16}},
    "flux-ch-mult": {"vae": {"ch_mult": [1, 1, 1]}},
    "vae-kind": {"vae": {"kind": "sd"}},
    "token-at-vocab": {"tokens": {"bos": 300}},
    "token-negative": {"tokens": {"vision_end": -1}},
    "vit-image-not-patch-multiple": {"vit": {"image_size": 230}},
    "diga-layer-too-deep": {"head": {"diga_layer": 3}},
    "diga-layer-zero": {"head": {"diga_layer": 0}},
    "timestep-shift": {"flow": {"timestep_shift": 0.0}},
    "freq-dim": {"flow": {"freq_dim": 255}},
}


@pytest.mark.parametrize("overrides", list(_INVALID.values()), ids=list(_INVALID))
def test_invalid_configs_fail_at_construction(overrides):
    with pytest.raises(ValueError):
        UniGenDetConfig.from_name("tiny", **overrides)
    # the same through the plain constructor, with component dicts (the preset's, so head_dim is still derived)
    d = copy.deepcopy(PRESETS["tiny"])
    for key, sub in overrides.items():
        d[key] = {**d[key], **sub}
    with pytest.raises(ValueError):
        UniGenDetConfig(**d)


def test_validation_messages_name_the_problem():
    with pytest.raises(ValueError, match="n_kv_heads"):
        MoTConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim"):
        MoTConfig(dim=12, n_heads=4, n_kv_heads=2)
    with pytest.raises(ValueError, match="48"):
        VAEConfig(kind="pixel", downsample=4, z_channels=16)
    with pytest.raises(ValueError, match="diga_layer"):
        UniGenDetConfig.from_name("tiny", head={"diga_layer": 3})
    with pytest.raises(ValueError, match="bos"):
        UniGenDetConfig.from_name("tiny", tokens={"bos": 300})


def test_diga_layer_unchecked_without_diga():
    cfg = UniGenDetConfig.from_name("tiny", head={"diga": False, "diga_layer": 3})
    assert cfg.head.diga is False


def test_valid_edge_values():
    cfg = UniGenDetConfig.from_name("tiny", head={"diga_layer": 2}, tokens={"bos": 0, "eos": 299})
    assert (cfg.head.diga_layer, cfg.tokens.bos, cfg.tokens.eos) == (2, 0, 299)
    assert VAEConfig(kind="flux", ch_mult=(1, 2), downsample=2).downsample == 2
    assert VAEConfig(kind="pixel", downsample=2, z_channels=12).z_channels == 12


#####################################################################################################
# Derived fields
#####################################################################################################


def test_derived_fields():
    bagel = UniGenDetConfig.from_name("bagel-7b-mot")
    assert bagel.mot.head_dim == 3584 // 28 == 128
    assert bagel.latent_token_dim == 64
    assert bagel.vae_pixels_per_token == 16
    assert bagel.latent_channels == 16
    assert (bagel.vit.head_dim, bagel.vit.patch_dim, bagel.vit.n_positions) == (72, 588, 4900)
    tiny = UniGenDetConfig.from_name("tiny")
    assert tiny.mot.head_dim == 16 and tiny.vit.head_dim == 16
    assert (tiny.latent_token_dim, tiny.vae_pixels_per_token, tiny.vit.n_positions) == (64, 16, 256)
    demo = UniGenDetConfig.from_name("demo")
    assert (demo.latent_token_dim, demo.vae_pixels_per_token) == (2 * 2 * 16, 2 * 4)
    assert MoTConfig(dim=64, n_heads=4, n_kv_heads=2, head_dim=32).head_dim == 32  # explicit head_dim is kept
    assert isinstance(VAEConfig(ch_mult=[1, 2, 4, 4]).ch_mult, tuple)


#####################################################################################################
# BAGEL folder json
#####################################################################################################


@pytest.mark.parametrize("fixture_dir", fixture_params())
def test_from_bagel_dir_fixture(fixture_dir):
    llm = json.loads((fixture_dir / "llm_config.json").read_text())
    vit = json.loads((fixture_dir / "vit_config.json").read_text())
    bagel = json.loads((fixture_dir / "bagel_config.json").read_text())
    vae = json.loads((fixture_dir / "vae_config.json").read_text())
    cfg = config_from_bagel_dir(fixture_dir)
    assert cfg.name == fixture_dir.name
    m, v = cfg.mot, cfg.vit
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.mlp_dim, m.vocab_size) == (
        llm["hidden_size"], llm["num_hidden_layers"], llm["num_attention_heads"], llm["num_key_value_heads"],
        llm["intermediate_size"], llm["vocab_size"])
    assert (m.rope_theta, m.norm_eps, m.qk_norm) == (llm["rope_theta"], llm["rms_norm_eps"],
                                                     bagel["llm_build_overrides"]["qk_norm"])
    select = bagel["vit_build_overrides"]["vit_select_layer"]
    assert v.n_layers == vit["num_hidden_layers"] + 1 + select
    assert (v.dim, v.n_heads, v.mlp_dim, v.patch_size, v.image_size, v.norm_eps, v.in_channels) == (
        vit["hidden_size"], vit["num_attention_heads"], vit["intermediate_size"], vit["patch_size"],
        vit["image_size"], vit["layer_norm_eps"], vit["num_channels"])
    assert v.max_patches_per_side == bagel["vit_max_num_patch_per_side"]
    assert (v.act, v.connector_act) == ("gelu_tanh", "gelu_tanh")
    f = cfg.flow
    assert (f.latent_patch_size, f.max_latent_size, f.timestep_shift) == (
        bagel["latent_patch_size"], bagel["max_latent_size"], bagel["timestep_shift"])
    s = bagel["special_token_ids"]
    assert dataclasses.asdict(cfg.tokens) == {"bos": s["bos_token_id"], "eos": s["eos_token_id"],
                                              "vision_start": s["start_of_image"], "vision_end": s["end_of_image"]}
    assert cfg.head.diga_layer == bagel["diga_layer"]
    assert cfg.vae.kind == "flux"
    for key, value in vae.items():
        assert getattr(cfg.vae, key) == (tuple(value) if isinstance(value, list) else value), key
    if fixture_dir.name == "parity_tiny":  # the sizes its README documents
        assert (m.dim, m.n_layers, v.n_layers, vit["num_hidden_layers"]) == (64, 9, 2, 3)
        assert dataclasses.asdict(cfg.tokens) == {"bos": 296, "eos": 297, "vision_start": 298, "vision_end": 299}
        assert (f.max_latent_size, v.max_patches_per_side, f.timestep_shift) == (16, 16, 1.0)


def _round_trip_cases() -> list:
    cases = [pytest.param(name, id=name) for name in sorted(PRESETS)]
    return fixture_params() + cases if parity_fixture_dirs() else cases


@pytest.mark.parametrize("source", _round_trip_cases())
def test_config_to_bagel_files_round_trip(tmp_path, source):
    cfg = UniGenDetConfig.from_name(source) if isinstance(source, str) else config_from_bagel_dir(source)
    folder = _write_folder(tmp_path / "exported", config_to_bagel_files(cfg))
    back = config_from_bagel_dir(folder)
    assert back.name == "exported"
    assert config_diff(back, cfg) == {}


def test_tokenizer_takes_precedence(tmp_path):
    files = config_to_bagel_files(UniGenDetConfig.from_name("tiny"))
    assert files["bagel_config.json"]["special_token_ids"]["bos_token_id"] == 296
    folder = _write_folder(tmp_path / "bagel", files)
    tok = {"added_tokens": [{"id": 5, "content": "<|im_start|>"}, {"id": 6, "content": "<|im_end|>"},
                            {"id": 7, "content": "<|vision_start|>"}, {"id": 9, "content": "<|endoftext|>"}],
           "model": {"vocab": {"hello": 0, "<|vision_end|>": 8}}}  # one only in the BPE vocab
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    assert tokenizer_special_ids(folder) == {"bos": 5, "eos": 6, "vision_start": 7, "vision_end": 8}
    cfg = config_from_bagel_dir(folder)
    assert dataclasses.asdict(cfg.tokens) == {"bos": 5, "eos": 6, "vision_start": 7, "vision_end": 8}


def test_tokenizer_lacking_a_special_token(tmp_path):
    folder = _write_folder(tmp_path / "bagel", config_to_bagel_files(UniGenDetConfig.from_name("tiny")))
    tok = {"added_tokens": [{"id": 5, "content": "<|im_start|>"}, {"id": 6, "content": "<|im_end|>"},
                            {"id": 7, "content": "<|vision_start|>"}], "model": {"vocab": {}}}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match=r"<\|vision_end\|>"):
        config_from_bagel_dir(folder)


def test_no_token_source_and_small_vocab(tmp_path):
    files = config_to_bagel_files(UniGenDetConfig.from_name("tiny"))
    del files["bagel_config.json"]["special_token_ids"]
    folder = _write_folder(tmp_path / "bagel", files)
    with pytest.raises(ValueError, match="special"):
        config_from_bagel_dir(folder)


def test_no_token_source_qwen2_vocab_uses_qwen2_ids(tmp_path):
    """A plain BAGEL-style folder (llm + vit json only) with Qwen2's vocabulary falls back to Qwen2's ids."""
    # 8 layers: without bagel_config.json the DIGA layer is the preset's (8)
    cfg = UniGenDetConfig.from_name("tiny", mot={"vocab_size": 152064, "n_layers": 8},
                                    tokens=dataclasses.asdict(UniGenDetConfig.from_name("bagel-7b-mot").tokens))
    files = config_to_bagel_files(cfg)
    folder = _write_folder(tmp_path / "bagel", {k: files[k] for k in ("llm_config.json", "vit_config.json")})
    back = config_from_bagel_dir(folder)
    assert back.tokens == UniGenDetConfig.from_name("bagel-7b-mot").tokens
    assert (back.mot.dim, back.mot.n_layers, back.vit.n_layers) == (cfg.mot.dim, 8, cfg.vit.n_layers)
    assert back.head.diga_layer == 8


@pytest.mark.parametrize("missing", ["llm_config.json", "vit_config.json"])
def test_missing_required_json(tmp_path, missing):
    files = config_to_bagel_files(UniGenDetConfig.from_name("tiny"))
    del files[missing]
    folder = _write_folder(tmp_path / "bagel", files)
    with pytest.raises(FileNotFoundError, match=missing):
        config_from_bagel_dir(folder)


def test_invalid_json_is_a_value_error(tmp_path):
    folder = _write_folder(tmp_path / "bagel", config_to_bagel_files(UniGenDetConfig.from_name("tiny")))
    (folder / "bagel_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="bagel_config.json"):
        config_from_bagel_dir(folder)


#####################################################################################################
# No torch
#####################################################################################################


@pytest.mark.parametrize("code", [
    "import unigendet",
    "import unigendet.model",
    "import unigendet.model.config",
    "import unigendet.model.presets",
    "import unigendet.model.bagel_config",
    "from unigendet.model.config import UniGenDetConfig as C; C.from_name('tiny', vit={'n_layers': 1}).to_dict()",
], ids=["unigendet", "unigendet.model", "config", "presets", "bagel_config", "from_name"])
def test_config_does_not_import_torch(code):
    script = f"import sys; {code}; assert 'torch' not in sys.modules, 'torch was imported'"
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
