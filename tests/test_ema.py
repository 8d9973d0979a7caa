"""The EMA of trainable weights: hand-computed averages, swap/copy_to, state round trip, frozen parts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unigendet.model.config import UniGenDetConfig
from unigendet.model.unigendet import UniGenDet
from unigendet.training.ema import EMA


class Toy(nn.Module):
    """One trainable 2-vector, one frozen 2-vector and an integer buffer (never tracked)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.0, 10.0]))
        self.frozen = nn.Parameter(torch.tensor([5.0, 5.0]), requires_grad=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


def _set(model, *values):
    with torch.no_grad():
        model.w.copy_(torch.tensor(values))


def _run(ema, model, targets):
    """Set the live weight to each target in turn and update the EMA after each."""
    for target in targets:
        _set(model, *target)
        ema.update(model)


#####################################################################################################
# Update rule
#####################################################################################################


def test_updates_with_warmup_match_hand_computed_values():
    model = Toy()
    ema = EMA(model, decay=0.9, warmup=True)
    # decays: min(0.9, 1/10) = 0.1, min(0.9, 2/11), min(0.9, 3/12) = 0.25
    _run(ema, model, [(1.0, 0.0)])
    assert ema.shadow["w"].tolist() == pytest.approx([0.9, 1.0])  # 0.1 * [0, 10] + 0.9 * [1, 0]
    _run(ema, model, [(2.0, 2.0)])
    d = 2 / 11
    assert ema.shadow["w"].tolist() == pytest.approx([d * 0.9 + (1 - d) * 2, d * 1.0 + (1 - d) * 2])
    prev = ema.shadow["w"].clone()
    _run(ema, model, [(0.0, 4.0)])
    assert ema.shadow["w"].tolist() == pytest.approx((0.25 * prev + 0.75 * torch.tensor([0.0, 4.0])).tolist())
    assert ema.n_updates == 3


def test_updates_without_warmup_use_the_constant_decay():
    model = Toy()
    ema = EMA(model, decay=0.5, warmup=False)
    _run(ema, model, [(2.0, 2.0), (4.0, 0.0), (0.0, 8.0)])
    # [0, 10] -> [1, 6] -> [2.5, 3] -> [1.25, 5.5]
    assert ema.shadow["w"].tolist() == pytest.approx([1.25, 5.5])
    assert [ema.decay_at(n) for n in (0, 1, 100)] == [0.5, 0.5, 0.5]


def test_warmup_decay_is_capped_by_decay():
    ema = EMA(Toy(), decay=0.5, warmup=True)
    assert [ema.decay_at(n) for n in (0, 1, 8, 9, 1000)] == pytest.approx([0.1, 2 / 11, 0.5, 0.5, 0.5])


@pytest.mark.parametrize("decay", [1.0, -0.1, 1.5])
def test_bad_decay_raises(decay):
    with pytest.raises(ValueError, match="decay"):
        EMA(Toy(), decay=decay)


def test_decay_zero_tracks_the_live_weights():
    model = Toy()
    ema = EMA(model, decay=0.0)
    _run(ema, model, [(3.0, -1.0)])
    assert ema.shadow["w"].tolist() == [3.0, -1.0]


#####################################################################################################
# Frozen parameters and dtypes
#####################################################################################################


def test_frozen_parameters_are_not_tracked_and_untouched():
    model = Toy()
    ema = EMA(model, decay=0.9)
    assert set(ema.shadow) == {"w"}
    _run(ema, model, [(1.0, 1.0)])
    with torch.no_grad():
        model.frozen.fill_(-3.0)  # whatever the model holds there, the EMA leaves it alone
    ema.copy_to(model)
    with ema.swap(model):
        assert model.frozen.tolist() == [-3.0, -3.0]
    assert model.frozen.tolist() == [-3.0, -3.0]


def test_tiny_model_tracks_exactly_its_trainable_parameters():
    model = UniGenDet(UniGenDetConfig.from_name("tiny"))
    model.init_weights()
    ema = EMA(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(ema.shadow) == trainable
    assert not [n for n in ema.shadow if n.startswith(("vae.", "vit_pos_embed.", "latent_pos_embed.",
                                                        "latent_to_vit_connector."))]
    vae_before = {n: p.clone() for n, p in model.vae.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    ema.update(model)
    ema.copy_to(model)
    assert all(torch.equal(p, vae_before[n]) for n, p in model.vae.named_parameters())


def test_shadow_is_fp32_for_a_bf16_model_and_copies_back_in_bf16():
    model = nn.Linear(2, 2).to(torch.bfloat16)
    ema = EMA(model, decay=0.5, warmup=False)
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    ema.copy_to(model)
    assert model.weight.dtype == torch.bfloat16


#####################################################################################################
# swap / copy_to / state_dict
#####################################################################################################


def test_swap_puts_the_average_in_and_restores_the_live_weights():
    model = Toy()
    ema = EMA(model, decay=0.5, warmup=False)
    _run(ema, model, [(2.0, 2.0)])  # shadow [1, 6], live [2, 2]
    with ema.swap(model) as swapped:
        assert swapped is model
        assert model.w.tolist() == [1.0, 6.0]
    assert model.w.tolist() == [2.0, 2.0]
    assert ema.shadow["w"].tolist() == [1.0, 6.0]


def test_swap_restores_the_live_weights_when_the_body_raises():
    model = Toy()
    ema = EMA(model, decay=0.5, warmup=False)
    _run(ema, model, [(2.0, 2.0)])
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swap(model):
            assert model.w.tolist() == [1.0, 6.0]
            raise RuntimeError("boom")
    assert model.w.tolist() == [2.0, 2.0]


def test_copy_to_writes_the_average_for_good():
    model = Toy()
    ema = EMA(model, decay=0.5, warmup=False)
    _run(ema, model, [(2.0, 2.0)])
    ema.copy_to(model)
    assert model.w.tolist() == [1.0, 6.0]
    assert model.w.requires_grad


def test_state_dict_round_trip_continues_identically():
    model = Toy()
    ema = EMA(model, decay=0.9, warmup=True)
    _run(ema, model, [(1.0, 2.0), (3.0, -1.0)])
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in ema.state_dict().items()}
    assert set(state) == {"w", "n_updates_", "_extra_state"}
    assert (int(state["n_updates_"]), state["_extra_state"]) == (2, {"decay": 0.9, "warmup": True})

    resumed = EMA(Toy(), decay=0.5, warmup=False)  # other settings: the state wins
    resumed.load_state_dict(state)
    assert (resumed.n_updates, resumed.decay, resumed.warmup) == (2, 0.9, True)
    later = [(0.5, 0.5), (-2.0, 7.0)]
    _run(ema, model, later)
    _run(resumed, model, later)
    assert torch.equal(ema.shadow["w"], resumed.shadow["w"])
    assert resumed.n_updates == 4


def test_a_parent_state_dict_carries_the_ema():
    """Lightning checkpoints the EMA as part of the LightningModule: a parent's state_dict round-trips it."""
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Toy()
            self.ema = EMA(self.net, decay=0.5, warmup=False)

    a = Parent()
    _run(a.ema, a.net, [(2.0, 2.0)])
    assert {"ema.w", "ema.n_updates_", "ema._extra_state"} <= set(a.state_dict())
    b = Parent()
    b.ema.decay = 0.25
    b.load_state_dict(a.state_dict())
    assert b.ema.shadow["w"].tolist() == [1.0, 6.0] and b.ema.n_updates == 1 and b.ema.decay == 0.5


def test_load_state_dict_refuses_other_names_and_shapes():
    ema = EMA(Toy())
    other = EMA(nn.Linear(2, 2)).state_dict()
    with pytest.raises(ValueError, match=r"missing \['w'\].*unexpected \['bias', 'weight'\]"):
        ema.load_state_dict(other)
    state = ema.state_dict()
    with pytest.raises(ValueError, match="shapes"):
        ema.load_state_dict({**state, "w": torch.zeros(3)})
    with pytest.raises(ValueError, match="decay"):
        ema.load_state_dict({**state, "_extra_state": {"decay": 1.0, "warmup": True}})


def test_update_on_a_model_without_the_tracked_parameters_raises():
    ema = EMA(Toy())
    with pytest.raises(ValueError, match="w"):
        ema.update(nn.Linear(2, 2))


#####################################################################################################
# Devices
#####################################################################################################


def test_shadow_follows_the_parameters_to_another_device():
    device = "cuda" if torch.cuda.is_available() else "meta"
    model = Toy()
    ema = EMA(model, decay=0.5, warmup=False)  # built while the model is on the CPU
    model.to(device)
    ema.update(model)
    assert ema.shadow["w"].device.type == device
    if device == "cuda":
        assert ema.shadow["w"].tolist() == [0.0, 10.0]
