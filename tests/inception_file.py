"""A random-init Inception-v3 weights file of torch-fidelity's exact architecture, built without network.

torch-fidelity's ``FeatureExtractorInceptionV3`` loads its weights in ``__init__`` (from a path, else from GitHub).
A subclass whose ``load_state_dict`` ignores its argument is built from a file holding an empty dict, and its own
random ``state_dict()`` is saved: the keys then match what torch-fidelity's strict load expects. PyTorch's default init
shrinks activations layer after layer (the 2048-d features come out near zero, every FID ~1e-12), so the batch-norm
running statistics are first calibrated on one batch of random images, smooth to noisy, upscaled to 299 px as
:func:`unigendet.evaluation.fidelity.fidelity_images` does: every layer then sees unit-scale inputs and the features,
FID and IS
respond to the images.
Import the ``inception_weights`` fixture (session scope) into a test module to use it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def build_inception_weights(path: str | Path) -> Path:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    path = Path(path)
    empty = path.with_name(path.stem + ".empty.pth")
    torch.save({}, empty)
    torch.manual_seed(0)
    module = RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    empty.unlink()
    module.fc.weight.data.mul_(20)  # confident (peaked) class posteriors, so the Inception Score moves off 1
    g = torch.Generator().manual_seed(0)
    up = torch.nn.functional.interpolate
    batch = torch.cat([up(torch.rand(3, 3, s, s, generator=g), size=299, mode=mode).clamp(0, 1)  # what tests feed:
                       for s, mode in ((4, "bilinear"), (8, "bicubic"), (32, "bicubic"), (64, "bicubic"))])
    batch = (batch * 255).round().to(torch.uint8)  # (12, 3, 299, 299): smooth to noisy, as fidelity_images gives
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: after one batch, the running statistics are the batch's
    module.train()
    with torch.no_grad():
        module(batch)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    torch.save(module.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    return build_inception_weights(tmp_path_factory.mktemp("inception") / "inception-random.pth")
