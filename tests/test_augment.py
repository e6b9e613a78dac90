"""Geometry and randomness of the batched augmenters, checked on known images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cifarlab.augment import FlipTranslate, KerasAugment, flip_bits


def params(n=1, theta=0.0, tx=0.0, ty=0.0, flip=False):
    def full(v):
        return torch.full((n,), float(v), dtype=torch.float64)

    return {
        "theta_deg": full(theta),
        "tx_px": full(tx),
        "ty_px": full(ty),
        "flip": torch.full((n,), bool(flip)),
    }


def cat_params(*ps):
    return {k: torch.cat([p[k] for p in ps]) for k in ps[0]}


def dot_image(r, c, size=32):
    x = torch.zeros(1, 3, size, size)
    x[0, :, r, c] = 1.0
    return x


def asym_image(b=1, size=32, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


KA = KerasAugment()


# ----------------------------------------------------------------------------- KerasAugment geometry


def test_flip_moves_pixel_to_mirrored_column():
    y = KA.apply(dot_image(5, 3), params(flip=True))
    assert y[0, 0].nonzero().tolist() == [[5, 28]]
    # also through the warp (flip folded into the matrix), together with a shift
    y = KA.apply(dot_image(5, 3), params(flip=True, ty=-1.0))
    assert y[0, 0].nonzero().tolist() == [[6, 28]] and torch.equal(y[0, 0, 6, 28], torch.tensor(1.0))


def test_integer_shift_moves_pixel_and_fills_with_edge():
    # Keras 3: out[y, x] = in[y + ty, x + tx]: tx = +2 moves content 2 px left, ty = +2 2 px up
    y = KA.apply(dot_image(10, 12), params(tx=2.0))
    assert y[0, 0].nonzero().tolist() == [[10, 10]] and y[0, 0, 10, 10] == 1.0
    y = KA.apply(dot_image(10, 12), params(ty=2.0))
    assert y[0, 0].nonzero().tolist() == [[8, 12]]
    # fill_mode="nearest": the 2 uncovered columns repeat the edge column, not zeros
    x = asym_image() + 0.5
    y = KA.apply(x, params(tx=2.0))
    assert torch.equal(y[..., :30], x[..., 2:])
    assert torch.equal(y[..., 30], x[..., 31]) and torch.equal(y[..., 31], x[..., 31])
    y = KA.apply(x, params(tx=-2.0))
    assert torch.equal(y[..., 2:], x[..., :30]) and torch.equal(y[..., 0], x[..., 0])


def test_rotation_sign_convention_matches_rot90():
    # Keras 3 (with its x/y swap): positive theta turns the content counter-clockwise on screen
    x = asym_image(2)
    assert torch.allclose(KA.apply(x, params(2, theta=90.0)), torch.rot90(x, 1, (-2, -1)), atol=1e-6)
    assert torch.allclose(KA.apply(x, params(2, theta=-90.0)), torch.rot90(x, -1, (-2, -1)), atol=1e-6)
    # a pixel right of the centre goes up
    y = KA.apply(dot_image(15, 30), params(theta=90.0))
    assert (y[0, 0] > 0.5).nonzero().tolist() == [[1, 15]]


def test_identity_params_return_input_exactly():
    x = asym_image(3)
    assert torch.equal(KA.apply(x, params(3)), x)  # Keras' own shortcut: no warp at all
    # through the grid_sample path (another image in the batch is warped): still bit-exact at 32 px
    p = cat_params(params(2), params(1, theta=3.0, tx=0.7))
    y = KA.apply(x, p)
    assert torch.equal(y[:2], x[:2]) and not torch.equal(y[2], x[2])
    for size in (24, 33):  # other sizes: exact via the shortcut, ~1e-6 through the warp
        xs = asym_image(2, size)
        assert torch.equal(KA.apply(xs, params(2)), xs)
        y = KA.apply(xs, cat_params(params(1), params(1, theta=1.0)))
        assert torch.allclose(y[0], xs[0], atol=1e-5)


def _keras_reference(img: np.ndarray, theta: float, tx: float, ty: float, flip: bool) -> np.ndarray:
    """Per-image Keras 3 `apply_affine_transform` (+ `flip_axis`), written out with scipy."""
    import scipy.ndimage as ndi

    _, h, w = img.shape
    t = np.deg2rad(theta)
    m = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    m = m @ np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])
    o1, o2 = h / 2 - 0.5, w / 2 - 0.5
    to_centre = np.array([[1, 0, o1], [0, 1, o2], [0, 0, 1.0]])
    from_centre = np.array([[1, 0, -o1], [0, 1, -o2], [0, 0, 1.0]])
    m = to_centre @ m @ from_centre
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1.0]])
    m = swap @ m @ swap  # Keras 3: M acts on (x, y), scipy indexes (row, col)
    out = np.stack([ndi.affine_transform(ch, m[:2, :2], m[:2, 2], order=1, mode="nearest") for ch in img])
    return out[:, :, ::-1] if flip else out


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_matches_keras_reference_transform(size):
    pytest.importorskip("scipy")
    g = torch.Generator().manual_seed(3)
    x = torch.rand(16, 3, *size, generator=g, dtype=torch.float64)
    p = KA.sample_params(16, g, size=size)
    p["theta_deg"] = p["theta_deg"] * 8  # up to +-40 degrees, to make rotation errors visible
    y = KA.apply(x, p).numpy()
    for i in range(16):
        ref = _keras_reference(
            x[i].numpy(),
            p["theta_deg"][i].item(),
            p["tx_px"][i].item(),
            p["ty_px"][i].item(),
            bool(p["flip"][i]),
        )
        np.testing.assert_allclose(y[i], ref, atol=1e-10)


# ----------------------------------------------------------------------------- KerasAugment randomness


def test_random_draws_within_ranges_and_flip_rate():
    p = KA.sample_params(20000, torch.Generator().manual_seed(0), size=(32, 32))
    th, tx, ty = p["theta_deg"], p["tx_px"], p["ty_px"]
    assert th.abs().max() <= 5.0 and th.abs().max() > 4.99
    assert tx.abs().max() <= 1.6 and tx.abs().max() > 1.59 and ty.abs().max() <= 1.6
    assert abs(th.mean().item()) < 0.1 and abs(tx.mean().item()) < 0.05
    assert len(torch.unique(tx)) == 20000  # real-valued shifts, not integers
    assert abs(p["flip"].double().mean().item() - 0.5) < 0.02
    assert not KerasAugment(horizontal_flip=False).sample_params(100, torch.Generator())["flip"].any()


def test_same_seed_same_output_and_fresh_per_call():
    x = asym_image(8)
    a = KA(x, generator=torch.Generator().manual_seed(7))
    b = KA(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(7)
    assert not torch.equal(KA(x, generator=g), KA(x, generator=g))


def test_dtype_and_memory_format_preserved():
    g = torch.Generator().manual_seed(0)
    x = asym_image(4)
    p = KA.sample_params(4, g)
    ref = KA.apply(x, p)
    y = KA.apply(x.contiguous(memory_format=torch.channels_last), p)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.allclose(y, ref, atol=1e-6)
    yb = KA.apply(x.bfloat16(), p)
    assert yb.dtype == torch.bfloat16 and torch.allclose(yb.float(), ref, atol=1e-2)
    with pytest.raises(TypeError):
        KA.apply((x * 255).to(torch.uint8), p)


# ----------------------------------------------------------------------------- FlipTranslate


def _crop_reference(x, dy, dx, flip, mode):
    """Pad the whole image, slice each crop, flip: the straightforward per-image version."""
    pad = 2
    xp = F.pad(x, (pad,) * 4, mode="reflect") if mode == "reflect" else F.pad(x, (pad,) * 4)
    h, w = x.shape[-2:]
    out = []
    for i in range(len(x)):
        crop = xp[i, :, pad + dy[i] : pad + dy[i] + h, pad + dx[i] : pad + dx[i] + w]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["reflect", "zeros"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_flip_translate_matches_pad_and_crop(mode, channels_last):
    ft = FlipTranslate(pad=2, padding_mode=mode)
    g = torch.Generator().manual_seed(0)
    x = asym_image(200)
    dy, dx = ft.sample_offsets(200, g)
    flip = ft.flip_mask(200, g)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    y = ft.apply(xin, dy, dx, flip)
    assert torch.equal(y, _crop_reference(x, dy.tolist(), dx.tolist(), flip.tolist(), mode))
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_flip_translate_offsets_cover_range_and_values_come_from_image():
    ft = FlipTranslate(pad=2)
    g = torch.Generator().manual_seed(1)
    dy, dx = ft.sample_offsets(5000, g)
    seen = set(zip(dy.tolist(), dx.tolist(), strict=True))
    assert seen == {(a, b) for a in range(-2, 3) for b in range(-2, 3)}
    # unique pixel values per image: every output pixel must be one of its own image's pixels
    x = torch.arange(64 * 3 * 32 * 32, dtype=torch.float32).reshape(64, 3, 32, 32)
    y = ft(x, generator=g)
    for i in range(64):
        for c in range(3):
            assert torch.isin(y[i, c], x[i, c]).all()
    assert not torch.equal(y, x)
    # integer dtypes work too (pure gathers)
    xu = (asym_image(4) * 255).to(torch.uint8)
    assert ft(xu, generator=g).dtype == torch.uint8


def test_flip_translate_geometry_of_one_pixel():
    ft = FlipTranslate(pad=2)
    x = dot_image(10, 12)
    y = ft.apply(x, torch.tensor([1]), torch.tensor([-2]), torch.tensor([False]))
    assert y[0, 0].nonzero().tolist() == [[9, 14]]  # out[i, j] = x[i + dy, j + dx]
    y = ft.apply(x, torch.tensor([0]), torch.tensor([0]), torch.tensor([True]))
    assert y[0, 0].nonzero().tolist() == [[10, 19]]


def test_alternate_flip_is_the_complement_on_the_next_epoch():
    ft = FlipTranslate(pad=0, alternate_flip=True, seed=5)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(10000, generator=g)
    m0 = ft.flip_mask(10000, g, indices=idx, epoch=0)
    m1 = ft.flip_mask(10000, g, indices=idx, epoch=1)
    assert torch.equal(m1, ~m0)
    assert torch.equal(ft.flip_mask(10000, g, indices=idx, epoch=2), m0)
    assert abs(m0.double().mean().item() - 0.5) < 0.02
    assert torch.equal(m0, flip_bits(idx, 5))  # fixed by (seed, index), not by batch position
    assert not torch.equal(m0, flip_bits(idx, 6))
    # on images: with pad 0 the odd epoch is exactly the mirror of the even one
    x = asym_image(16)
    i16 = torch.arange(16)
    y0 = ft(x, generator=g, indices=i16, epoch=0)
    y1 = ft(x, generator=g, indices=i16, epoch=1)
    assert torch.equal(y1, y0.flip(-1))
    with pytest.raises(ValueError, match="indices"):
        ft(x, generator=g)


def test_flip_translate_without_flip():
    ft = FlipTranslate(pad=0, flip=False)
    x = asym_image(8)
    assert torch.equal(ft(x, generator=torch.Generator()), x)


def test_describe_says_off_when_flips_are_off_even_with_alternate_flip():
    # `--set horizontal_flip=false` on `fast` (alternate_flip=true): no image is flipped, and the report says so
    from cifarlab.augment import make_augment
    from cifarlab.recipes import get_recipe

    aug = make_augment(get_recipe("fast").replace(horizontal_flip=False))
    assert not aug.flip_mask(8, torch.Generator(), indices=torch.arange(8)).any()
    assert aug.describe().endswith("horizontal flip off")
    assert make_augment(get_recipe("fast")).describe().endswith("horizontal flip alternating per epoch")
    assert FlipTranslate(flip=True).describe().endswith("horizontal flip random")
