"""FakeClue-style explanations and T2I captions written from an image's measurements (:mod:`unigendet.demo.measure`).

The demo corpus's answers must carry information (so that explanation metrics such as ROUGE-L mean something):
every sentence is chosen and filled in from numbers measured on the pixels of that very image. Features:

* :func:`explain` - "This is a real image. ..." / "This is a fake image. ..." with family-specific evidence
  (checkerboard region and spectral peaks; Gaussian gradients and tiling; waxy smoothness and uniform grain; seam,
  brightness, tint and noise mismatch of a pasted region) plus colour and content sentences. Wording variants are
  drawn from the per-image random generator; the facts come from the measurements.
* :func:`caption` - T2I captions: framing from the zoom, subject of the source photo, measured colours, and where
  in the source photo the crop was taken.
"""

from __future__ import annotations

import numpy as np

from unigendet.constants import DETECTION_PROMPT, FAKE_VERDICT, REAL_VERDICT
from unigendet.demo.measure import PEAK_THRESHOLD, PERIODS, Measurements, region_name

"""Periods (pixels) of the up-sampling artifacts looked for: 2, 4, 8 -> 1/2, 1/4, 1/8 of the sampling frequency."""

"""A periodogram peak this many times above its neighbourhood counts as a periodic artifact."""

PROMPTS = (
    DETECTION_PROMPT,
    DETECTION_PROMPT,
    "Is this image real or fake?",
    "Is this picture real or generated? Explain.",
    "Is this a real photograph or a fake image?",
)
"""Human turns (after the ``<image>`` tag); the first, FakeClue's own wording, is drawn twice as often."""


########################################################################################################################
# Measurements


########################################################################################################################
# Text


def _argmax2(a: np.ndarray) -> tuple[int, int]:
    i = int(np.argmax(a))
    return i // a.shape[1], i % a.shape[1]


def _colour_sentence(m: Measurements, rng: np.random.Generator, fake: bool) -> str:
    if m.gray:
        return "It is a black-and-white image with smooth tonal gradations." if fake else str(
            rng.choice(["It is a black-and-white photograph with natural tonal gradations.",
                        "It is a grayscale photograph and its tones change naturally with the lighting."]))
    cast = "" if m.cast == "neutral" else f" with a slight {m.cast} cast"
    if fake:
        return f"The palette is dominated by {m.hue} tones{cast} (saturation {m.saturation:.2f})."
    return str(rng.choice([f"The colours are natural {m.hue} tones{cast} and the lighting is consistent.",
                           f"Colours ({m.hue}{cast}) and shading agree with a single light source."]))


def _freq(period: int) -> str:
    return f"1/{period}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _times(ratio: float) -> str:
    return f"about {ratio:.0f} times" if ratio < 100 else "more than 100 times"


def _percent(frac: float) -> str:
    return "almost none" if frac < 0.005 else f"{100 * frac:.0f}%"


def _real(m: Measurements, subject: str, rng: np.random.Generator) -> list[str]:
    out = [f"It shows {subject}."]
    if m.grad_kurtosis > 6:
        out.append(f"Edges are crisp and the gradients are heavy-tailed (kurtosis {m.grad_kurtosis:.0f}), "
                   "as in optical photographs.")
    elif m.edge_density < 0.02:
        out.append("The scene is mostly smooth, but its few edges and fine textures are irregular and never repeat.")
    else:
        out.append("Textures are irregular and non-repeating, with natural variation in detail.")
    if m.noise_cv < 0.3:
        out.append(f"The noise is consistent across the frame at about {m.noise:.1f} grey levels.")
    else:
        out.append(f"The noise follows the content: it is strongest in the {region_name(_argmax2(m.noise_regions))} "
                   "region, where the texture is densest, as camera noise does.")
    top = max(m.peaks, key=m.peaks.get)
    if m.peaks[8] > PEAK_THRESHOLD and m.peaks[2] < PEAK_THRESHOLD and m.peaks[4] < PEAK_THRESHOLD:
        out.append(f"The spectrum decays smoothly (slope {m.spectral_slope:.1f}); only a faint peak at 1/8 of the "
                   "sampling frequency hints at JPEG compression blocks, not at up-sampling.")
    else:
        out.append(f"The spectrum decays smoothly (slope {m.spectral_slope:.1f}) without periodic peaks (the "
                   f"strongest candidate, at {_freq(top)} of the sampling frequency, is only {m.peaks[top]:.1f} "
                   "times its neighbourhood).")
    out.append(_colour_sentence(m, rng, fake=False))
    return out


def _gan(m: Measurements, subject: str, rng: np.random.Generator) -> list[str]:
    ij = _argmax2(m.peak_regions)
    order = np.argsort(m.peak_regions.ravel())[::-1]
    second = (int(order[1]) // 3, int(order[1]) % 3)
    where = f"the {region_name(ij)} region"
    if m.peak_regions[second] > 0.7 * m.peak_regions[ij]:
        where = f"the {region_name(ij)} and {region_name(second)} regions"
    strength = "a faint" if m.peak_regions[ij] < 150 else "a clear" if m.peak_regions[ij] < 400 else "a strong"
    pattern = str(rng.choice(["checkerboard pattern", "grid of checkerboard artifacts"]))
    out = [f"{where[0].upper()}{where[1:]} {'show' if ' and ' in where else 'shows'} {strength} regular {pattern}, "
           "the trace of transposed-convolution up-sampling."]
    hits = [p for p in PERIODS if m.peaks[p] > PEAK_THRESHOLD] or [max(m.peaks, key=m.peaks.get)]
    freqs = _join([_freq(p) for p in hits])
    out.append(f"The spectrum has {'peaks' if len(hits) > 1 else 'a peak'} at {freqs} of the sampling frequency, "
               f"{_times(max(m.peaks[p] for p in hits))} above the surrounding energy.")
    if m.chroma_peak > PEAK_THRESHOLD:
        out.append("The colour channels carry slightly different grids, which leaves coloured fringes.")
    out.append(f"It looks like {subject} decoded from a low resolution: fine details are soft and "
               f"{_percent(m.edge_density)} of the pixels lie on clear edges.")
    out.append(_colour_sentence(m, rng, fake=True))
    return out


def _spectral(m: Measurements, rng: np.random.Generator) -> list[str]:
    shape = str(rng.choice(["cloud-like blobs", "soft, marbled blobs"]))
    tone = "grey" if m.gray else m.hue
    edges = f"few sharp edges ({100 * m.edge_density:.0f}% of the pixels)"
    edges = "no sharp edges" if m.edge_density < 0.005 else edges
    out = [f"It contains no objects and {edges}, only {shape} of {tone} that blend into each other."]
    gauss = "almost Gaussian" if m.grad_kurtosis < 4.5 else "far lighter-tailed than a photograph's"
    out.append(f"Its gradient statistics are {gauss} (kurtosis {m.grad_kurtosis:.1f}, where photographs usually "
               "exceed 6).")
    stretch = ""
    if m.anisotropy > 1.3:
        stretch = ", and the blobs are stretched vertically"
    elif m.anisotropy < 1 / 1.3:
        stretch = ", and the blobs are stretched horizontally"
    out.append(f"The spectrum is a clean power law (slope {m.spectral_slope:.1f}) with random phases{stretch}.")
    if m.peaks[4] > PEAK_THRESHOLD:
        out.append(f"A faint regular grid lies over it: the spectrum peaks at 1/4 of the sampling frequency on the "
                   f"{m.peak_dirs[4]}, {_times(m.peaks[4])} above its surroundings, a fingerprint of the synthesis.")
    if m.wrap_ratio < 1.6:
        out.append("The left and right borders continue into each other, as if the image were one tile of a periodic "
                   "texture.")
    out.append(_colour_sentence(m, rng, fake=True))
    return out


def _diffusion(m: Measurements, subject: str, rng: np.random.Generator) -> list[str]:
    word = str(rng.choice(["waxy and over-smoothed", "plastic and over-smoothed"]))
    if m.smooth_regions.max() - m.smooth_regions.min() < 0.1:
        where = "evenly across the frame"
    else:
        where = f"most of all in the {region_name(_argmax2(m.smooth_regions))} region"
    out = [f"Surfaces look {word}: {_percent(m.smooth_fraction)} of the pixels have almost no gradient once the "
           f"grain is removed, {where}."]
    out.append(f"A fine, uniform grain of about {m.noise:.1f} grey levels covers the whole frame and varies only "
               f"{100 * m.noise_cv:.0f}% between regions instead of following the content.")
    if m.peaks[4] > PEAK_THRESHOLD:
        out.append(f"A faint grid repeats every 4 pixels (a spectral peak at 1/4 of the sampling frequency on the "
                   f"{m.peak_dirs[4]}, {_times(m.peaks[4])} above its surroundings): the trace of the decoder that "
                   "turned the latent into pixels.")
    out.append(f"Shapes are vague, blotchy outlines of {subject}, with soft plateaus and no fine texture.")
    out.append(_colour_sentence(m, rng, fake=True))
    return out


def _splice(m: Measurements, info: dict, rng: np.random.Generator) -> list[str]:
    y0, x0, y1, x1 = info["bbox"]
    cy, cx = (y0 + y1) / 2 / m.height, (x0 + x1) / 2 / m.width
    where = region_name((min(2, int(cy * 3)), min(2, int(cx * 3))))
    origin = "another part of the same photograph" if info["copy_move"] else "another photograph"
    s = m.mask_stats
    article = "An" if info["shape"][0] in "aeiou" else "A"
    out = [f"{article} {info['shape']} region in the {where} part of the frame (about {x1 - x0}x{y1 - y0} pixels) "
           f"was pasted from {origin}."]
    if s["seam_ratio"] >= 1.2:
        seam = "a visible" if s["seam_ratio"] > 1.5 else "a faint"
        out.append(f"Along its border there is {seam} seam: the gradient on the boundary is {s['seam_ratio']:.1f} "
                   "times the image average.")
    else:
        out.append(f"Its border blends in (boundary gradient {s['seam_ratio']:.1f} times the image average), but "
                   "the content inside does not continue the surroundings.")
    dl = (s["luma_in"] - s["luma_out"]) / (s["luma_out"] + 1e-3)
    tint = ""
    if not m.gray and abs(s["warm_shift"]) > 0.02:
        tint = f" and {'warmer' if s['warm_shift'] > 0 else 'cooler'}"
    out.append(f"Inside the patch the image is {abs(100 * dl):.0f}% {'brighter' if dl > 0 else 'darker'}{tint} than "
               "its surroundings, so the lighting does not match.")
    if s["grid_in"] > PEAK_THRESHOLD and s["grid_in"] > 3 * s["grid_out"]:
        out.append(f"Inside it, neighbouring pixels alternate in a fine two-pixel pattern that stops at its border "
                   f"(energy at half the sampling frequency {s['grid_in']:.0f} times the noise inside, "
                   f"{s['grid_out']:.0f} outside): the interpolation residue of the resampled donor.")
    ratio = s["detail_in"] / (s["detail_out"] + 1e-6)
    if ratio > 1.25 or ratio < 0.8:
        kind = "sharper or noisier" if ratio > 1 else "blurrier"
        out.append(f"The pasted area is {kind} than the rest (fine-detail energy {ratio:.2g} times that outside).")
    else:
        out.append(str(rng.choice(["Its fine texture is similar to the rest, so the seam and lighting give it away.",
                                   "Its sharpness matches the rest; the seam and lighting give it away."])))
    return out


def explain(family: str, m: Measurements, rng: np.random.Generator, subject: str = "a scene",
            info: dict | None = None) -> str:
    """FakeClue-style answer for an image of ``family`` ("real" or one of :data:`fakes.FAMILIES`).

    Args:
        family: "real", "gan_upsample", "spectral", "diffusion_like" or "splice".
        m: the image's :class:`Measurements` (with ``mask_stats`` for splices).
        rng: per-image generator, used only to pick among equivalent wordings.
        subject: what the source photograph shows (e.g. "a tabby cat's face").
        info: the generator's ``info`` (splices: ``bbox``, ``shape``, ``copy_move``).

    Returns:
        "This is a real image. ..." or "This is a fake image. ...".
    """
    if family == "real":
        return " ".join([REAL_VERDICT, *_real(m, subject, rng)])
    if family == "gan_upsample":
        body = _gan(m, subject, rng)
    elif family == "spectral":
        body = _spectral(m, rng)
    elif family == "diffusion_like":
        body = _diffusion(m, subject, rng)
    elif family == "splice":
        body = _splice(m, info or {}, rng)
    else:
        raise ValueError(f"unknown family {family!r}")
    return " ".join([FAKE_VERDICT, *body])


def caption(subject: str, kind: str, zoom: float, m: Measurements, position: str, rng: np.random.Generator) -> str:
    """A T2I caption such as "a close-up photo of a tabby cat's face in warm brown tones, from the upper left".

    Args:
        subject: what the source photograph shows.
        kind: "photo", "micrograph", "telescope image", ...
        zoom: source pixels per output pixel of the crop (1 = full resolution detail, larger = wider view).
        m: the crop's measurements (colours, brightness).
        position: where the crop lies in the source photo ("upper left", "centre", ...).
        rng: per-image generator for wording variants.
    """
    framing = "a close-up" if zoom < 1.4 else "a detail" if zoom < 2.2 else "a wide view"
    shape = "portrait-format " if m.height > 1.2 * m.width else "landscape-format " if m.width > 1.2 * m.height else ""
    if m.gray:
        tones = "in black and white"
    else:
        tones = f"in {m.hue} tones"
    light = "dark " if m.brightness < 0.3 else "bright " if m.brightness > 0.65 else ""
    if framing == "a close-up":
        head = f"a {shape}close-up {light}{kind}"
    elif framing == "a detail":
        head = f"a {shape}{light}{kind} detail"
    else:
        head = f"a {shape}wide-angle {light}{kind}"
    if head.startswith("a ") and head[2] in "aeiou":
        head = "an " + head[2:]
    where = str(rng.choice([f"from the {position} of the scene", f"taken from the {position} of the frame"]))
    return f"{head} of {subject} {tones}, {where}"
