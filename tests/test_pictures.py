"""Pictures of relevance (graphlrp/heatmap.py, graphlrp/figure.py): the colour scale follows the data, overlays keep
the photo's colours, and maps go back onto the photo's pixels through the preprocessing, with the part outside the
crop never drawn as relevance. References: PIL's own resize of a box (the crop window), a hand computation of
torchvision's Resize/CenterCrop arithmetic, and scipy's bilinear `map_coordinates`."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import map_coordinates

from graphlrp import heatmap
from graphlrp.errors import InputError
from graphlrp.preprocessing import Preprocessing, default

TOL = 1e-4  # PIL resamples float images in float32: |error| ~1e-6 of values of order 1


def smooth(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def reference_photo_map(r: np.ndarray, window, size) -> np.ndarray:
    """Bilinear resampling (edge values held) of the [H, W] map at each photo pixel centre inside the window."""
    x0, y0, x1, y1 = window
    w, h = size
    rows, cols = r.shape
    j, i = np.mgrid[0:h, 0:w]
    cx, cy = i + 0.5, j + 0.5  # photo pixel centres
    inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
    u = (cx - x0) * cols / (x1 - x0) - 0.5  # the input pixel index at that centre
    v = (cy - y0) * rows / (y1 - y0) - 0.5
    values = map_coordinates(r.astype(np.float64), [v.ravel(), u.ravel()], order=1, mode="nearest").reshape(h, w)
    return np.where(inside, values, np.nan)


# ---------------------------------------------------------------- the crop window is the inverse of the preprocessing

@pytest.mark.parametrize("prep,size", [
    (default((32, 32)), (60, 40)),  # shorter side 40 -> 36, crop 32
    (default((32, 32)), (47, 90)),
    (Preprocessing(crop=(40, 48), resize=None, crop_pct=None), (100, 70)),  # centre crop only
    (default((64, 64)).with_overrides(crop_mode="squash"), (300, 120)),
])
def test_the_crop_window_is_where_the_preprocessed_pixels_come_from(prep, size):
    """Resizing the window of the photo straight to the input size (PIL's box) gives the preprocessed pixels."""
    image = smooth(*size)
    window = prep.crop_window(size)
    assert 0 <= window[0] < window[2] <= size[0] and 0 <= window[1] < window[3] <= size[1]
    direct = image.resize(prep.crop[::-1], Image.Resampling.BILINEAR, box=window)
    got = np.asarray(prep.apply(image), np.int16)
    assert got.shape[:2] == prep.crop
    assert np.abs(got - np.asarray(direct, np.int16)).max() <= 2  # PIL rounds after each of its two 1-D passes
    x0, y0, x1, y1 = window
    shifted = image.resize(prep.crop[::-1], Image.Resampling.BILINEAR, box=(x0 + 0.5, y0, x1 + 0.5, y1))
    assert np.abs(got - np.asarray(shifted, np.int16)).max() > 4  # half a photo pixel off is seen


def test_the_crop_window_by_hand_and_beyond_the_photo_where_the_crop_pads():
    prep = Preprocessing(crop=(32, 32), resize=36, crop_pct=32 / 36)
    # torchvision: Resize(36) of 60x40 -> 54x36; CenterCrop(32): left round(22 / 2) = 11, top round(4 / 2) = 2
    assert prep.crop_window((60, 40)) == pytest.approx((11 * 60 / 54, 2 * 40 / 36, 43 * 60 / 54, 34 * 40 / 36))
    assert prep.crop_window((32, 32)) == (0, 0, 32, 32)  # used as it is
    border = default((64, 64)).with_overrides(crop_mode="border")  # longer side to 73, pad the shorter to 64
    x0, y0, x1, y1 = border.crop_window((146, 60))  # resized to 73x30: 17 rows of padding above it
    assert (x1 - x0) == pytest.approx(64 * 146 / 73) and y0 == pytest.approx(-17 * 2) and y1 > 60


# ---------------------------------------------------------------- back onto the photo

@pytest.mark.parametrize("size", [(60, 40), (40, 52), (300, 200), (36, 36), (32, 32)])
def test_the_photo_map_is_the_input_map_resampled_inside_the_crop_and_nan_outside(size):
    prep = Preprocessing(crop=(32, 32), resize=36, crop_pct=32 / 36)
    r = np.random.default_rng(1).standard_normal((3, 32, 32)).astype(np.float32)
    got = heatmap.photo_map(r, prep, size)
    expected = reference_photo_map(r.sum(0), prep.crop_window(size), size)
    assert got.shape == (size[1], size[0])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    inside = np.isfinite(expected)
    assert inside.any() and (~inside).any() == (size != (32, 32))
    peak = np.abs(r.sum(0)).max()
    np.testing.assert_allclose(got[inside], expected[inside], rtol=0, atol=TOL * peak)
    if size in ((32, 32), (36, 36)):  # the input grid itself (36: crop offset 2, scale 1): exact
        np.testing.assert_allclose(got[inside].reshape(32, 32), r.sum(0), rtol=0, atol=1e-6 * peak)


@pytest.mark.parametrize("size", [(20, 16), (12, 30), (7, 7)])
def test_a_photo_smaller_than_the_input_gets_the_map_averaged_onto_its_pixels(size):
    """Enlarged by the preprocessing: each photo pixel covers several input pixels (PIL's bilinear filter widens
    to average them); pixels inside the crop get values within the map's range, a constant map stays constant."""
    prep = Preprocessing(crop=(32, 32), resize=36, crop_pct=32 / 36)
    r = np.random.default_rng(3).standard_normal((32, 32)).astype(np.float32)
    got = heatmap.photo_map(r, prep, size)
    expected = reference_photo_map(r, prep.crop_window(size), size)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    inside = np.isfinite(got)
    assert inside.any() and (r.min() - 1e-6 <= got[inside]).all() and (got[inside] <= r.max() + 1e-6).all()
    assert np.abs(got[inside]).max() < 0.8 * np.abs(r).max()  # averaged, not sampled: noise shrinks
    np.testing.assert_allclose(heatmap.photo_map(np.full((32, 32), 2.5), prep, size)[inside], 2.5, rtol=1e-6)


def test_padding_is_not_drawn_on_the_photo():
    prep = default((64, 64)).with_overrides(crop_mode="border")
    r = np.ones((3, 64, 64), np.float32)
    pmap = heatmap.photo_map(r, prep, (146, 60))
    # resized to 73x30, padded to 73x64, cropped at columns 4..68: photo columns 8..136, every row
    assert prep.crop_window((146, 60)) == pytest.approx((8, -34, 136, 94))
    assert np.isfinite(pmap[:, 8:136]).all() and np.isnan(pmap[:, :8]).all() and np.isnan(pmap[:, 136:]).all()
    np.testing.assert_allclose(pmap[:, 8:136], 3.0, rtol=1e-6)


def test_outside_the_crop_nothing_is_drawn_as_relevance():
    prep = Preprocessing(crop=(32, 32), resize=36, crop_pct=32 / 36)
    photo = smooth(90, 50, seed=4)
    rng = np.random.default_rng(2)
    pictures = []
    for r in (rng.standard_normal((3, 32, 32)), np.abs(rng.standard_normal((3, 32, 32))) * 50):
        pmap = heatmap.photo_map(r, prep, photo.size)
        scale = heatmap.ColourScale.of(pmap)
        pictures.append((np.isfinite(pmap), np.asarray(heatmap.photo_overlay(pmap, photo, scale)),
                         np.asarray(heatmap.photo_heatmap(pmap, scale))))
    (inside, over_a, heat_a), (_, over_b, heat_b) = pictures
    outside = ~inside
    assert outside.sum() > 0.2 * outside.size
    np.testing.assert_array_equal(over_a[outside], heatmap.unexplained(photo).round().astype(np.uint8)[outside])
    np.testing.assert_array_equal(over_a[outside], over_b[outside])  # the relevance does not reach it
    assert (over_a[inside] != over_b[inside]).any()
    assert heat_a.shape == (50, 90, 4) and (heat_a[outside] == 0).all() and (heat_a[inside][:, 3] == 255).all()
    assert (heat_b[outside] == 0).all()
    stripes = heatmap.unexplained(photo) != np.asarray(photo, np.float32)  # the hatch: visibly not the photo
    assert 0.2 < stripes.any(axis=-1).mean() < 0.6


# ---------------------------------------------------------------- colours follow the data

def test_both_signs_get_a_diverging_map_with_symmetric_limits():
    relevance = np.zeros((3, 4, 4), np.float32)
    relevance[:, 0, 0], relevance[:, 0, 1] = 1.0, -0.5  # summed over channels: +3 and -1.5
    scale = heatmap.ColourScale.of(heatmap.relevance_map(relevance))
    assert (scale.kind, scale.signs, scale.cmap, scale.vmin, scale.vmax) == ("diverging", "both", "bwr", -3, 3)
    assert "diverging" in scale.describe() and "both signs" in scale.describe()
    pixels = np.asarray(heatmap.heatmap(relevance))
    r, g, b = (int(v) for v in pixels[0, 0])
    assert r > 200 and g < 40 and b < 40  # the maximum is full red
    r, g, b = (int(v) for v in pixels[0, 1])
    assert b > 200 and r < g + 10 and r < 160  # half the magnitude, negative: half-saturated blue
    assert (pixels[3, 3] > 250).all()  # zero is white


def test_one_sign_gets_a_sequential_map_from_zero():
    r = np.zeros((4, 4), np.float32)
    r[0, 0], r[1, 1] = 2.0, 1.0
    r[2, 2] = -1e-5  # float rounding of a never-negative preset: not a second sign
    scale = heatmap.ColourScale.of(r)
    assert (scale.kind, scale.signs, scale.cmap, scale.vmin, scale.vmax) == ("sequential", "positive", "Reds", 0, 2)
    assert "sequential" in scale.describe() and "≥ 0" in scale.describe()
    pixels = np.asarray(heatmap.heatmap(r, scale)).astype(int)
    assert (pixels[3, 3] > 235).all() and pixels[0, 0, 0] > 60 and pixels[0, 0, 1] < 20  # white at 0, dark red at max
    assert pixels[1, 1, 1] < pixels[3, 3, 1] and pixels[1, 1, 1] > pixels[0, 0, 1]  # half-way: between
    negative = heatmap.ColourScale.of(-r)
    assert (negative.signs, negative.cmap, negative.vmin, negative.vmax) == ("negative", "Blues_r", -2, 0)
    zero = heatmap.ColourScale.of(np.zeros((3, 4, 4)))
    assert zero.signs == "zero" and (np.asarray(heatmap.heatmap(np.zeros((3, 4, 4)))) > 235).all()  # no NaN


def test_a_chosen_colour_map_keeps_the_data_limits():
    r = np.linspace(-1, 4, 16, dtype=np.float32).reshape(4, 4)
    scale = heatmap.ColourScale.of(r, cmap="viridis")
    assert (scale.cmap, scale.vmin, scale.vmax) == ("viridis", -4, 4)
    from matplotlib import colormaps

    np.testing.assert_allclose(scale.colours(np.array([-4.0, 0.0, 4.0])),
                               colormaps["viridis"]([0.0, 0.5, 1.0])[:, :3] * 255, atol=1e-9)
    with pytest.raises(InputError, match="unknown colour map 'not-a-map'"):
        heatmap.ColourScale.of(r, cmap="not-a-map")


def test_the_overlay_keeps_the_photos_colours():
    image = np.random.default_rng(3).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    relevance = np.zeros((3, 8, 8), np.float32)
    relevance[0, 2, 2] = 5.0
    out = np.asarray(heatmap.overlay(relevance, image))
    mask = np.ones((8, 8), bool)
    mask[2, 2] = False
    np.testing.assert_array_equal(out[mask], image[mask])  # in colour, not a grey copy
    scale = heatmap.ColourScale.of(relevance.sum(0))
    colour = scale.colours(np.array(5.0))
    expected = image[2, 2] * (1 - heatmap.OVERLAY_STRENGTH) + colour * heatmap.OVERLAY_STRENGTH  # alpha blend
    np.testing.assert_allclose(out[2, 2], expected, atol=0.5 + 1e-9)
    with pytest.raises(ValueError):
        heatmap.overlay(relevance, image[:4])


def test_the_colour_bar_runs_from_vmin_to_vmax():
    scale = heatmap.ColourScale.of(np.array([[-2.0, 1.0]]))
    bar = np.asarray(scale.colorbar(width=64, height=5)).astype(int)
    assert bar.shape == (5, 64, 3)
    assert bar[0, 0, 2] > 200 and bar[0, 0, 0] < 60  # blue at -2
    assert bar[0, -1, 0] > 200 and bar[0, -1, 2] < 60  # red at +2
    assert (bar[0, 31:33] > 240).all()  # white in the middle


# ---------------------------------------------------------------- the figure

def test_the_figure_has_the_panels_colour_bar_class_and_preset():
    from graphlrp import figure

    prep = Preprocessing(crop=(32, 32), resize=36, crop_pct=32 / 36)
    photo = smooth(80, 50, seed=5)
    pmap = heatmap.photo_map(np.random.default_rng(0).random((3, 32, 32)), prep, photo.size)
    scale = heatmap.ColourScale.of(pmap)
    fig, parts = figure.build(photo, pmap, scale, "tabby (281): p = 0.873 · preset otsuki2024", "model resnet18")
    assert [ax.get_title() for ax in parts["axes"]] == ["photo", "overlay", "heatmap"]
    assert parts["title"].get_text() == "tabby (281): p = 0.873 · preset otsuki2024"
    label = parts["colorbar"].ax.get_xlabel()
    assert "sequential" in label and "≥ 0" in label
    assert parts["colorbar"].mappable.norm.vmin == 0 and parts["colorbar"].mappable.norm.vmax == pytest.approx(
        scale.vmax)
    assert parts["notes"].get_text() == "model resnet18"
    png = figure.png_bytes(fig)
    assert png[:4] == b"\x89PNG"
    import io

    with Image.open(io.BytesIO(png)) as im:
        assert im.width > 1000 and im.height > 300
