"""Tests of unigendet.checkpoint.folders: BAGEL-format export / streaming load, key names, error reporting.

Every model here is the ``tiny`` (or ``demo``) preset with every parameter overwritten by seeded N(0, 1) values, so
"equal" means bit-for-bit equal and a tensor landing under the wrong name cannot go unnoticed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.conftest import bagel_keys_file, config_diff, fixture_params
from unigendet.checkpoint.folders import (
    AE_FILE,
    INDEX,
    CheckpointError,
    bagel_state_dict,
    save_folder,
    weight_files,
)
from unigendet.checkpoint.integrity import SUMS
from unigendet.checkpoint.keymap import AE_PREFIX, UNIGENDET_ONLY_PREFIXES, to_bagel
from unigendet.checkpoint.loading import load_model
from unigendet.model.config import UniGenDetConfig
from unigendet.model.unigendet import UniGenDet

#####################################################################################################
# Helpers
#####################################################################################################


def _random_model(name: str = "tiny", seed: int = 0, **overrides) -> UniGenDet:
    cfg = UniGenDetConfig.from_name(name, **overrides)
    model = UniGenDet(cfg)
    model.init_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _state(model: UniGenDet) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every network tensor of a folder (all shards, or ema.safetensors), under its stored name."""
    out: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        part = load_file(str(path))
        assert not set(part) & set(out), f"keys stored twice: {sorted(set(part) & set(out))[:5]}"
        out.update(part)
    return out


def _file_keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def _as_written_elsewhere(folder: Path) -> None:
    """An export edited by hand stands for a folder written elsewhere (a BAGEL release): it has no SHA256SUMS."""
    (folder / SUMS).unlink(missing_ok=True)


def _to_single_file(folder: Path) -> Path:
    """Turn a sharded export into the layout of a BAGEL release: one ema.safetensors, no index."""
    _as_written_elsewhere(folder)
    tensors = _folder_tensors(folder)
    for path in weight_files(folder):
        path.unlink()
    (folder / INDEX).unlink()
    save_file(tensors, str(folder / "ema.safetensors"), metadata={"format": "pt"})
    return folder


def _edit(folder: Path, fn) -> None:
    """Apply ``fn(dict) -> dict`` to every network weight file of ``folder`` and keep the index consistent."""
    _as_written_elsewhere(folder)
    weight_map = {}
    for path in weight_files(folder):
        tensors = fn(load_file(str(path)))
        save_file(tensors, str(path), metadata={"format": "pt"})
        weight_map.update({k: path.name for k in tensors})
    if (folder / INDEX).exists():
        index = json.loads((folder / INDEX).read_text())
        index["weight_map"] = weight_map
        (folder / INDEX).write_text(json.dumps(index))


def _edit_ae(folder: Path, fn) -> None:
    _as_written_elsewhere(folder)
    path = folder / AE_FILE
    save_file(fn(load_file(str(path))), str(path), metadata={"format": "pt"})


def _assert_params_equal(model: UniGenDet, expected: dict[str, torch.Tensor], skip=lambda n: False) -> None:
    got = dict(model.named_parameters())
    assert set(got) == set(expected)
    bad = [n for n, p in got.items() if not skip(n) and (p.dtype != expected[n].dtype
                                                          or not torch.equal(p.detach(), expected[n]))]
    assert not bad, f"{len(bad)} parameters differ after the round trip, e.g. {bad[:5]}"


def _layer_pattern(key: str) -> str:
    """Reference key with its decoder / ViT layer index replaced by ``{}``."""
    return re.sub(r"\.layers\.\d+\.", ".layers.{}.", key)


def _index_pattern(key: str) -> str:
    """Every numeric path component replaced by ``{}`` (used for the FLUX AE's down/up/block indices)."""
    return re.sub(r"(?<=\.)\d+(?=\.)", "{}", key)


def _reference_keys() -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """(Bagel + DIGA parameter names -> shapes, AE names without ``vae.`` -> shapes) from bagel_keys.txt."""
    net: dict[str, list[int]] = {}
    ae: dict[str, list[int]] = {}
    section = None
    for line in bagel_keys_file().read_text().splitlines():
        if line.startswith("# DIGA variant adds diga_mlp"):
            for name, shape in json.loads(line[line.index("[["):]):
                net[name] = shape
        if line.startswith("## "):
            section = ("net" if line.startswith("## Bagel parameters") else
                       "ae" if line.startswith("## VAE") else None)
            continue
        if line.startswith("#") or not line.strip() or section is None:
            continue
        name, shape = line.split("\t")[:2]
        if section == "net":
            net[name] = json.loads(shape)
        else:
            assert name.startswith(AE_PREFIX)
            ae[name[len(AE_PREFIX):]] = json.loads(shape)
    assert net and ae and any(k.startswith("diga_mlp.") for k in net)
    return net, ae


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> tuple[dict[str, torch.Tensor], Path]:
    """(parameters of a random tiny model, its sharded export). Read-only: copy the folder before editing it."""
    model = _random_model("tiny", seed=1)
    out = save_folder(model, tmp_path_factory.mktemp("tiny_export") / "ckpt", max_shard_bytes=200_000)
    return _state(model), out


@pytest.fixture
def tiny_copy(tiny_export, tmp_path) -> tuple[dict[str, torch.Tensor], Path]:
    state, src = tiny_export
    return state, Path(shutil.copytree(src, tmp_path / "ckpt"))


#####################################################################################################
# Export -> load round trip
#####################################################################################################


# the demo preset (pixel AE, no AE parameters), shrunk to keep the test fast
_DEMO_SMALL = {"mot": {"n_layers": 1}, "vit": {"n_layers": 1}, "head": {"diga_layer": 1}}


@pytest.mark.parametrize(("preset", "max_shard_bytes"), [("tiny", 4 * 1024**3), ("tiny", 20_000), ("demo", 2_000_000)],
                         ids=["tiny-one-shard", "tiny-sharded", "demo"])
def test_round_trip_weights_exact(tmp_path, preset, max_shard_bytes):
    model = _random_model(preset, **(_DEMO_SMALL if preset == "demo" else {}))
    expected = _state(model)
    out = save_folder(model, tmp_path / "ckpt", max_shard_bytes=max_shard_bytes)

    index = json.loads((out / INDEX).read_text())
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values()))
    for name in shards:
        assert (out / name).is_file(), f"the index names {name}, which was not written"
    stored = {name: _file_keys(out / name) for name in shards}
    assert sorted(p.name for p in out.glob("*.safetensors") if p.name != AE_FILE) == shards
    # the weight map covers every stored key, each in the shard it names, and nothing else
    assert {k for keys in stored.values() for k in keys} == set(weight_map)
    for key, name in weight_map.items():
        assert key in stored[name]
    assert sum(len(keys) for keys in stored.values()) == len(weight_map)
    net_params = {n: p for n, p in expected.items() if not n.startswith(AE_PREFIX)}
    assert len(weight_map) == len(net_params)
    assert index["metadata"]["total_size"] == sum(p.numel() * p.element_size() for p in net_params.values())
    if max_shard_bytes == 20_000:
        assert len(shards) > 2
        for name in shards:  # a shard exceeds the limit only when it holds one tensor that alone exceeds it
            t = load_file(str(out / name))
            nbytes = sum(v.numel() * v.element_size() for v in t.values())
            assert nbytes <= max_shard_bytes or len(t) == 1, (name, nbytes, len(t))
        assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)

    has_ae = any(n.startswith(AE_PREFIX) for n in expected)
    assert has_ae  # tiny's FLUX AE and the demo's learned conv AE both have weights, in their own file
    assert (out / AE_FILE).exists() == has_ae

    loaded, report = load_model(out)
    assert report.missing == [] and report.unexpected == [] and report.expected_missing == []
    assert len(report.loaded) == len(expected)
    assert type(loaded.vae) is type(model.vae)
    _assert_params_equal(loaded, expected)


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_round_trip_config(tmp_path, preset):
    model = UniGenDet(UniGenDetConfig.from_name(preset, **(_DEMO_SMALL if preset == "demo" else {})))
    out = save_folder(model, tmp_path / "ckpt")
    loaded, _ = load_model(out)
    assert config_diff(loaded.cfg, model.cfg) == {}
    # the json files we write are the BAGEL names, with the raw SigLIP layer count (BAGEL drops the last one)
    vit = json.loads((out / "vit_config.json").read_text())
    assert vit["num_hidden_layers"] == model.cfg.vit.n_layers + 1
    llm = json.loads((out / "llm_config.json").read_text())
    assert (llm["hidden_size"], llm["num_hidden_layers"]) == (model.cfg.mot.dim, model.cfg.mot.n_layers)


def test_exported_dtype_cast(tmp_path):
    """save_folder(dtype=bf16) stores bf16 shards; loading them into fp32 gives the bf16-rounded values."""
    model = _random_model("tiny")
    out = save_folder(model, tmp_path / "ckpt", dtype=torch.bfloat16)
    assert {t.dtype for t in _folder_tensors(out).values()} == {torch.bfloat16}
    loaded, _ = load_model(out)
    for name, p in model.named_parameters():
        if name.startswith(AE_PREFIX):
            continue
        q = dict(loaded.named_parameters())[name]
        assert q.dtype == torch.float32
        assert torch.equal(q, p.detach().to(torch.bfloat16).float()), name


def test_no_tmp_files_left(tmp_path):
    model = _random_model("tiny")
    out = save_folder(model, tmp_path / "ckpt", max_shard_bytes=50_000)
    save_folder(model, out, max_shard_bytes=50_000)  # overwriting an export in place is atomic too
    assert not list(tmp_path.rglob("*.tmp"))
    assert {"llm_config.json", "vit_config.json", "bagel_config.json", "vae_config.json", INDEX, AE_FILE} <= {
        p.name for p in out.iterdir()}


def test_single_file_export_and_switching_layouts(tmp_path):
    """``single_file`` writes one ema.safetensors (BAGEL's inference loader opens that file); re-exporting the other
    layout into the same folder removes the stale weight files, so the loader never mixes two exports."""
    model = _random_model("tiny")
    out = save_folder(model, tmp_path / "ckpt", max_shard_bytes=50_000)
    n_shards = len(list(out.glob("model-*-of-*.safetensors")))
    assert n_shards > 1
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    save_folder(model, out, single_file=True)
    assert (out / "ema.safetensors").exists()
    assert not (out / INDEX).exists() and not list(out.glob("model-*-of-*.safetensors"))
    loaded, report = load_model(out)
    assert report.files[0] == "ema.safetensors" and not report.missing and not report.unexpected
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    save_folder(model, out, max_shard_bytes=10**9)  # back to a (one-shard) sharded layout
    assert not (out / "ema.safetensors").exists()
    assert [p.name for p in out.glob("model-*-of-*.safetensors")] == ["model-00001-of-00001.safetensors"]
    loaded, _ = load_model(out)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


#####################################################################################################
# Key names
#####################################################################################################


def test_exported_names_are_the_reference_names(tiny_export):
    state, out = tiny_export
    ref_net, ref_ae = _reference_keys()
    stored = set(_folder_tensors(out))
    assert stored == {to_bagel(n) for n in state if not n.startswith(AE_PREFIX)}
    ref_patterns = {_layer_pattern(k) for k in ref_net}
    ours_patterns = {_layer_pattern(k) for k in stored}
    assert ours_patterns - ref_patterns == set(), "exported names the reference does not have"
    assert ref_patterns - ours_patterns == set(), "reference names the tiny export lacks"

    ae_keys = _file_keys(out / AE_FILE)
    assert ae_keys == {n[len(AE_PREFIX):] for n in state if n.startswith(AE_PREFIX)}
    ours_ae, theirs_ae = {_index_pattern(k) for k in ae_keys}, {_index_pattern(k) for k in ref_ae}
    assert ours_ae - theirs_ae == set()
    # the tiny AE keeps one width (ch_mult 1,1,1,1), so it has no 1x1 shortcut convs; all else is there
    assert {k for k in theirs_ae - ours_ae if ".nin_shortcut." not in k} == set()


def test_bagel_7b_names_and_shapes_match_the_reference():
    """The real-size network (built on meta, no memory) has exactly bagel_keys.txt's names and shapes."""
    ref_net, ref_ae = _reference_keys()
    with torch.device("meta"):
        model = UniGenDet(UniGenDetConfig.from_name("bagel-7b-mot"))
    net, ae = bagel_state_dict(model)
    ours = {k: list(v.shape) for k, v in net.items()}
    assert set(ours) == set(ref_net), (sorted(set(ours) - set(ref_net))[:5], sorted(set(ref_net) - set(ours))[:5])
    assert {k: s for k, s in ours.items() if s != ref_net[k]} == {}
    ours_ae = {k: list(v.shape) for k, v in ae.items()}
    assert ours_ae == ref_ae


@pytest.mark.parametrize("fixture_dir", fixture_params())
def test_fixture_key_sets_round_trip(tmp_path, fixture_dir):
    model, _ = load_model(fixture_dir)
    out = save_folder(model, tmp_path / "ckpt")
    ours = _folder_tensors(out)
    theirs = load_file(str(fixture_dir / "ema.safetensors"))
    assert set(ours) == set(theirs)
    ours_ae = load_file(str(out / AE_FILE))
    theirs_ae = load_file(str(fixture_dir / AE_FILE))
    assert set(ours_ae) == set(theirs_ae)
    # and the values come back unchanged
    assert [k for k in theirs if not torch.equal(ours[k], theirs[k])] == []
    assert [k for k in theirs_ae if not torch.equal(ours_ae[k], theirs_ae[k])] == []


@pytest.mark.parametrize("fixture_dir", fixture_params())
def test_load_parity_fixture(fixture_dir):
    model, report = load_model(fixture_dir)
    assert report.missing == [] and report.unexpected == [] and report.expected_missing == []
    theirs = load_file(str(fixture_dir / "ema.safetensors"))
    theirs_ae = load_file(str(fixture_dir / AE_FILE))
    assert len(report.loaded) == len(theirs) + len(theirs_ae)
    params = dict(model.named_parameters())
    assert len(params) == len(theirs) + len(theirs_ae)
    bad = []
    for name, p in params.items():
        ref = theirs_ae[name[len(AE_PREFIX):]] if name.startswith(AE_PREFIX) else theirs[to_bagel(name)]
        if p.is_meta or p.dtype != torch.float32 or not torch.equal(p.detach(), ref):
            bad.append(name)
    assert bad == []


#####################################################################################################
# A BAGEL release: no UniGenDet heads
#####################################################################################################


@pytest.mark.parametrize("layout", ["ema", "sharded"])
def test_bagel_release_without_heads(tiny_copy, layout):
    state, folder = tiny_copy
    if layout == "ema":
        _to_single_file(folder)
    dropped = []

    def drop_heads(tensors):
        dropped.extend(k for k in tensors if k.startswith(UNIGENDET_ONLY_PREFIXES))
        return {k: v for k, v in tensors.items() if not k.startswith(UNIGENDET_ONLY_PREFIXES)}

    _edit(folder, drop_heads)
    assert {k.split(".")[0] for k in dropped} == {"fake_cls_head", "diga_mlp", "latent_to_vit_connector"}

    model, report = load_model(folder)
    assert sorted(report.expected_missing) == sorted(dropped)
    assert report.missing == [] and report.unexpected == []
    fresh_parts = ("det_head.", "diga_proj.", "latent_to_vit_connector.")
    for name, p in model.named_parameters():
        assert not p.is_meta, name
        assert p.dtype == torch.float32, name
        if name.startswith(fresh_parts):
            assert torch.isfinite(p).all(), name
    assert torch.count_nonzero(model.det_head.fc2.weight) == 0
    assert torch.count_nonzero(model.det_head.fc2.bias) == 0
    assert torch.count_nonzero(model.diga_proj.mlp.fc1.weight) > 0  # freshly drawn, not left empty/zero
    _assert_params_equal(model, state, skip=lambda n: n.startswith(fresh_parts))
    assert str(report)  # the summary renders


#####################################################################################################
# Errors: missing, unexpected, shape mismatch
#####################################################################################################

_MISSING = ["language_model.model.layers.1.self_attn.q_norm_moe_gen.weight",
            "vit_model.vision_model.encoder.layers.0.mlp.fc1.bias",
            "language_model.lm_head.weight"]


@pytest.mark.parametrize("key", _MISSING)
def test_missing_key_is_an_error(tiny_copy, key):
    _, folder = tiny_copy
    _edit(folder, lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(CheckpointError, match=re.escape(key)):
        load_model(folder)


def test_missing_ae_key_is_an_error(tiny_copy):
    _, folder = tiny_copy
    key = "decoder.conv_out.weight"
    _edit_ae(folder, lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(CheckpointError, match=re.escape(key)):
        load_model(folder)


def test_missing_ae_file_is_an_error(tiny_copy):
    _, folder = tiny_copy
    (folder / AE_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"ae\.safetensors: missing \(listed in .*SHA256SUMS\)"):
        load_model(folder)  # our export lists it
    _as_written_elsewhere(folder)
    with pytest.raises(CheckpointError, match="encoder"):
        load_model(folder)  # a folder from elsewhere: the missing keys


@pytest.mark.parametrize("key", ["language_model.model.layers.7.mlp.gate_proj.weight", "something_else.weight"])
def test_unexpected_key_is_an_error(tiny_copy, key):
    _, folder = tiny_copy
    _edit(folder, lambda t: {**t, key: torch.zeros(3)} if "vae2llm.weight" in t else t)
    with pytest.raises(CheckpointError, match=re.escape(key)):
        load_model(folder)


def test_unexpected_ae_key_is_an_error(tiny_copy):
    _, folder = tiny_copy
    _edit_ae(folder, lambda t: {**t, "encoder.extra.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=re.escape("encoder.extra.weight")):
        load_model(folder)


def test_non_strict_reports_and_keeps_the_rest(tiny_copy):
    """strict=False: the bad keys are listed, and every tensor that WAS in the file is loaded as stored."""
    state, folder = tiny_copy
    missing = "language_model.model.layers.1.self_attn.q_norm_moe_gen.weight"
    extra = "something_else.weight"

    def edit(t):
        t = {k: v for k, v in t.items() if k != missing}
        return {**t, extra: torch.zeros(3)} if "vae2llm.weight" in t else t

    _edit(folder, edit)
    model, report = load_model(folder, strict=False)
    assert report.missing == [missing]
    assert report.unexpected == [extra]
    assert report.expected_missing == []
    assert not any(p.is_meta for p in model.parameters())
    ours_missing = "decoder.layers.1.gen.q_norm.weight"
    assert to_bagel(ours_missing) == missing
    assert torch.isfinite(dict(model.named_parameters())[ours_missing]).all()
    _assert_params_equal(model, state, skip=lambda n: n == ours_missing)


@pytest.mark.parametrize(("key", "ae"), [("vae2llm.weight", False),
                                         ("language_model.model.layers.0.mlp_moe_gen.up_proj.weight", False),
                                         ("encoder.conv_in.weight", True)])
def test_shape_mismatch_names_key_and_shapes(tiny_copy, key, ae):
    _, folder = tiny_copy
    bad_shape: list[int] = []
    good_shape: list[int] = []

    def edit(t):
        if key in t:
            good_shape.extend(t[key].shape)
            bad_shape.extend([*t[key].shape[:-1], t[key].shape[-1] + 1])
            t[key] = torch.zeros(bad_shape)
        return t

    (_edit_ae if ae else _edit)(folder, edit)
    assert good_shape, f"{key} not found in the export"
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    msg = str(err.value)
    assert key in msg and str(bad_shape) in msg and str(good_shape) in msg, msg


#####################################################################################################
# Streaming load: meta build, dtype
#####################################################################################################


def test_load_materialises_everything(tiny_export):
    state, folder = tiny_export
    model, _ = load_model(folder)
    assert not any(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())
    assert all(p.device.type == "cpu" for p in model.parameters())
    reference = UniGenDet(model.cfg)  # requires_grad flags survive the meta build + assignment
    flags = {n: p.requires_grad for n, p in reference.named_parameters()}
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(flags[n] for n in flags if n.startswith(AE_PREFIX))  # the AE stays frozen


def test_load_in_bfloat16(tiny_export):
    state, folder = tiny_export
    model, _ = load_model(folder, dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert set(params) == set(state)
    wrong = [n for n, p in params.items() if p.is_meta or p.dtype != torch.bfloat16]
    assert wrong == []
    differ = [n for n, p in params.items() if not torch.equal(p.detach(), state[n].to(torch.bfloat16))]
    assert differ == []


def test_load_bfloat16_with_fresh_heads(tiny_copy):
    """Expected-missing heads materialise in the requested dtype too."""
    _, folder = tiny_copy
    _edit(folder, lambda t: {k: v for k, v in t.items() if not k.startswith(UNIGENDET_ONLY_PREFIXES)})
    model, report = load_model(folder, dtype=torch.bfloat16)
    assert report.expected_missing
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


#####################################################################################################
# weight_files
#####################################################################################################


@pytest.mark.parametrize("shard", ["../x.safetensors", "/tmp/x.safetensors", "sub/x.safetensors", ".."])
def test_index_pointing_outside_is_rejected(tmp_path, shard):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {"embed.weight": shard}}))
    with pytest.raises(CheckpointError, match=re.escape(shard)):
        weight_files(folder)


def test_weight_files_layouts(tmp_path):
    with pytest.raises(FileNotFoundError):
        weight_files(tmp_path)
    save_file({"a": torch.zeros(1)}, str(tmp_path / "ema.safetensors"))
    assert weight_files(tmp_path) == [tmp_path / "ema.safetensors"]
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors",
                                                              "b": "model-00001-of-00002.safetensors",
                                                              "c": "model-00001-of-00002.safetensors"}}))
    assert weight_files(tmp_path) == [tmp_path / "model-00001-of-00002.safetensors",
                                      tmp_path / "model-00002-of-00002.safetensors"]
