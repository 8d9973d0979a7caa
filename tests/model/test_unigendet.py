"""The assembled network: gradients reach every trainable parameter, kernels agree, sizes match BAGEL."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import bagel_keys_file, mixed_plans
from unigendet.checkpoint.keymap import to_bagel
from unigendet.model.config import UniGenDetConfig
from unigendet.model.packing import SamplePlan, TextSplit, VAESplit, ViTSplit, pack
from unigendet.model.unigendet import UniGenDet, patchify_latent, reduce_losses, unpatchify_latent


def _random_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = UniGenDet(cfg)
    model.init_weights()
    with torch.no_grad():  # zero-init heads would hide dead parameters upstream of them
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()  # no dropout anywhere; eval only makes the VAE encode deterministically (the mean)


@pytest.fixture(scope="module")
def tiny():
    return UniGenDetConfig.from_name("tiny")


def _total_loss(model, batch, with_diga=True):
    out = model(batch, hidden_layers=(model.cfg.head.diga_layer,))
    losses = reduce_losses(out, batch)
    total = losses["loss_ce"] + losses["loss_mse"] + 0.2 * losses["loss_det"]
    if with_diga:
        h = out["hidden"][model.cfg.head.diga_layer][batch.mse_indexes]
        teacher = torch.randn_like(h)
        total = total + (1 - F.cosine_similarity(model.project_diga(h), teacher, dim=-1).mean())
    return total, out


def test_every_trainable_parameter_gets_a_gradient(tiny):
    model = _random_model(tiny)
    batch = pack(mixed_plans(tiny), tiny)
    total, out = _total_loss(model, batch)
    assert torch.isfinite(total)
    total.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) > 100
    dead = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not dead, f"parameters without a (finite, non-zero) gradient: {dead}"
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    allowed = ("vae.", "vit_pos_embed.", "latent_pos_embed.", "latent_to_vit_connector.")
    assert all(n.startswith(allowed) for n in frozen)


def test_smsa_detection_gradients_reach_the_generation_expert(tiny):
    """Putting the clean VAE split before the ViT split (SMSA) makes the detection loss train the gen expert;
    without the VAE split the gen expert gets no gradient at all."""
    model = _random_model(tiny)
    plans = mixed_plans(tiny)
    for with_vae, idx in ((True, 0), (False, 1)):
        model.zero_grad()
        batch = pack([plans[idx]], tiny)
        out = model(batch)
        (out["ce"].mean() + F.cross_entropy(out["det_logits"], batch.det_labels)).backward()
        gen = model.decoder.layers[0].gen.wq.weight.grad
        got = gen is not None and gen.abs().sum() > 0
        assert got == with_vae, f"gen expert gradient present={got}, VAE split present={with_vae}"


def _compare_backends(model, batch, noise, backends, grads):
    results = {}
    for backend in backends:
        model.attn_backend = backend
        model.zero_grad()
        with torch.set_grad_enabled(grads):
            out = model(batch, noise=noise, return_hidden=True)
            if grads:
                sum(reduce_losses(out, batch).values()).backward()
        results[backend] = (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (a, ga), (b, gb) = results.values()
    for key in ("ce", "mse", "det_logits", "last_hidden"):
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert ga.keys() == gb.keys()
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-4), n
    return ga


def test_sdpa_and_flex_paths_agree(tiny):
    """Forward only: FlexAttention has no CPU backward (see the gpu test below)."""
    model = _random_model(tiny)
    batch = pack(mixed_plans(tiny), tiny)
    noise = torch.randn(batch.n_vae_tokens, tiny.latent_token_dim)
    _compare_backends(model, batch, noise, ("sdpa", "flex_eager"), grads=False)


def test_per_sample_and_dense_sdpa_agree_with_gradients(tiny):
    model = _random_model(tiny)
    batch = pack(mixed_plans(tiny), tiny)
    noise = torch.randn(batch.n_vae_tokens, tiny.latent_token_dim)
    grads = _compare_backends(model, batch, noise, ("sdpa", "sdpa_dense"), grads=True)
    assert len(grads) > 100


@pytest.mark.gpu
def test_sdpa_and_compiled_flex_agree_on_cuda_with_gradients(tiny):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = _random_model(tiny).cuda()
    batch = pack(mixed_plans(tiny), tiny).to("cuda")
    noise = torch.randn(batch.n_vae_tokens, tiny.latent_token_dim, device="cuda")
    grads = _compare_backends(model, batch, noise, ("sdpa", "flex"), grads=True)
    assert len(grads) > 100


def test_outputs_are_finite_with_expected_shapes(tiny):
    model = _random_model(tiny)
    batch = pack(mixed_plans(tiny), tiny)
    out = model(batch, hidden_layers=(1, 2), return_hidden=True)
    assert out["ce"].shape == (batch.ce_indexes.numel(),)
    assert out["mse"].shape == (batch.mse_indexes.numel(), tiny.latent_token_dim)
    assert out["det_logits"].shape == (3, 2)
    assert out["last_hidden"].shape == (batch.seq_len, tiny.mot.dim)
    assert set(out["hidden"]) == {1, 2}
    for v in (out["ce"], out["mse"], out["det_logits"], out["last_hidden"], *out["hidden"].values()):
        assert torch.isfinite(v).all()
    # layer 2 is the last layer: its residual stream, normed per expert, is last_hidden
    h2 = out["hidden"][2]
    is_gen = torch.zeros(batch.seq_len, dtype=torch.bool)
    is_gen[batch.vae_indexes] = True
    ref = torch.where(is_gen[:, None], model.decoder.norm_gen(h2), model.decoder.norm_und(h2))
    assert torch.allclose(ref, out["last_hidden"], atol=1e-6)


def test_images_are_encoded_like_given_latents(tiny):
    """A batch that brings images is the same as one that brings the VAE's latents of those images."""
    model = _random_model(tiny)
    img_batch = pack(mixed_plans(tiny), tiny)
    noise = torch.randn(img_batch.n_vae_tokens, tiny.latent_token_dim)
    plans = mixed_plans(tiny)
    for plan in plans:
        for i, s in enumerate(plan.splits):
            if isinstance(s, VAESplit):
                with torch.no_grad():
                    plan.splits[i] = VAESplit(latent=model.vae.encode(s.image[None])[0], noisy=s.noisy,
                                              timestep=s.timestep)
    lat_batch = pack(plans, tiny)
    torch.testing.assert_close(img_batch.vae_timesteps.isinf(), lat_batch.vae_timesteps.isinf())
    lat_batch.vae_timesteps = img_batch.vae_timesteps  # drawn per batch; use the same
    with torch.no_grad():
        a = model(img_batch, noise=noise)
        b = model(lat_batch, noise=noise)
    for key in ("ce", "mse", "det_logits"):
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_noisy_split_does_not_leak_into_other_tokens(tiny):
    """Replacing the noisy target image changes its own MSE but no CE/detection output anywhere."""
    model = _random_model(tiny)
    plans = mixed_plans(tiny, with_latents=True)
    batch = pack(plans, tiny)
    noise = torch.randn(batch.n_vae_tokens, tiny.latent_token_dim)
    with torch.no_grad():
        a = model(batch, noise=noise)
        batch.padded_latent = batch.padded_latent.clone()
        batch.padded_latent[-1] += 5.0  # the last noisy image
        b = model(batch, noise=noise)
    assert torch.equal(a["ce"], b["ce"]) and torch.equal(a["det_logits"], b["det_logits"])
    assert not torch.allclose(a["mse"], b["mse"])


def test_forward_hidden_stops_early_and_equals_the_full_pass(tiny):
    cfg = UniGenDetConfig.from_name("tiny", n_layers=3)
    model = _random_model(cfg)
    batch = pack(mixed_plans(cfg), cfg)
    noise = torch.randn(batch.n_vae_tokens, cfg.latent_token_dim)
    with torch.no_grad():
        full = model(batch, noise=noise, hidden_layers=(1, 2))
        for layer in (1, 2):
            assert torch.allclose(model.forward_hidden(batch, layer, noise=noise), full["hidden"][layer], atol=1e-6)
    calls = []
    hook = model.decoder.layers[2].register_forward_hook(lambda *a: calls.append(1))
    model.forward_hidden(batch, 2, noise=noise)
    hook.remove()
    assert calls == []  # layer 3 never ran
    with pytest.raises(ValueError):
        model.forward_hidden(batch, 4)


def test_training_samples_the_vae_posterior_and_eval_uses_the_mean(tiny):
    model = _random_model(tiny)
    batch = pack(mixed_plans(tiny), tiny)
    model.eval()
    a, b = model.clean_latent_tokens(batch), model.clean_latent_tokens(batch)
    assert torch.equal(a, b)
    model.train()
    c = model.clean_latent_tokens(batch)
    assert not torch.allclose(a, c)


def test_latent_patchify_roundtrip():
    lat = torch.randn(16, 6, 10)
    tokens = patchify_latent(lat, 3, 5, 2)
    assert tokens.shape == (15, 64)
    # token (r, c) holds latent[:, 2r:2r+2, 2c:2c+2] in (p, q, channel) order, channel fastest
    assert torch.equal(tokens[1 * 5 + 2].reshape(2, 2, 16), lat[:, 2:4, 4:6].permute(1, 2, 0))
    assert torch.equal(unpatchify_latent(tokens, 3, 5, 2), lat)


def test_packing_errors_surface_before_the_model(tiny):
    with pytest.raises(ValueError, match="multiple"):
        pack([SamplePlan([ViTSplit(torch.zeros(3, 15, 28)), TextSplit([1], loss=True)], label=0)], tiny)


def _bagel_params(path):
    rows = {}
    for line in path.read_text().splitlines():
        if line.startswith("## Bagel buffers"):
            break
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.split("\t")[:2]
        rows[name] = tuple(int(x) for x in re.findall(r"\d+", shape))
    return rows


def test_bagel_7b_mot_builds_on_meta_with_the_reference_parameters():
    keys = bagel_keys_file()
    if not keys.exists():
        pytest.skip(f"{keys} not found (the spec ships in ../shared)")
    text = keys.read_text()
    ref = _bagel_params(keys)
    diga = {"diga_mlp.0.weight": (14336, 3584), "diga_mlp.0.bias": (14336,), "diga_mlp.2.weight": (3584, 14336),
            "diga_mlp.2.bias": (3584,)}
    ref.update(diga)
    cfg = UniGenDetConfig.from_name("bagel-7b-mot")
    with torch.device("meta"):
        model = UniGenDet(cfg)
    ours = {to_bagel(n): tuple(p.shape) for n, p in model.named_parameters() if not n.startswith("vae.")}
    assert None not in ours
    assert ours == ref
    total = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vae."))
    expected_total = int(re.search(r"DIGA variant total \(no VAE\): ([\d,]+)", text).group(1).replace(",", ""))
    assert total == expected_total == 14_726_341_218
    vae_total = sum(p.numel() for n, p in model.named_parameters() if n.startswith("vae."))
    assert vae_total == int(re.search(r"count vae [^:]*: ([\d,]+)", text).group(1).replace(",", ""))
