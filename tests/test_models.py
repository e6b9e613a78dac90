import pytest
import torch
from torch import nn

from cifarlab.models import AirNet, ReferenceCNN, build_model, count_parameters, init_whitening, summary
from cifarlab.recipes import get_recipe
from cifarlab.train import Trainer


def test_reference_counts_equal_keras():
    counts = count_parameters(build_model(get_recipe("reference")))
    assert counts == {"total": 752_650, "trainable": 751_498, "non_trainable": 1_152}


def test_reference_layer_shapes_and_params():
    text = summary(build_model(get_recipe("reference")))
    expected = [
        ("conv2d (Conv2D)", "(None, 32, 32, 64)", "1,792"),
        ("batch_normalization (BatchNormalization)", "(None, 32, 32, 64)", "256"),
        ("max_pooling2d (MaxPooling2D)", "(None, 16, 16, 64)", "0"),
        ("conv2d_1 (Conv2D)", "(None, 16, 16, 128)", "73,856"),
        ("max_pooling2d_1 (MaxPooling2D)", "(None, 8, 8, 128)", "0"),
        ("conv2d_2 (Conv2D)", "(None, 8, 8, 128)", "147,584"),
        ("max_pooling2d_2 (MaxPooling2D)", "(None, 4, 4, 128)", "0"),
        ("flatten (Flatten)", "(None, 2048)", "0"),
        ("dense (Dense)", "(None, 256)", "524,544"),
        ("batch_normalization_3 (BatchNormalization)", "(None, 256)", "1,024"),
        ("dense_1 (Dense)", "(None, 10)", "2,570"),
    ]
    lines = text.splitlines()
    for name, shape, params in expected:
        row = next(line for line in lines if line.startswith(name + " "))
        assert shape in row and row.rstrip().endswith(params), row
    assert "Total params: 752,650" in text and "Non-trainable params: 1,152" in text


def test_reference_keras_details():
    m = ReferenceCNN()
    bns = [x for x in m.modules() if isinstance(x, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert len(bns) == 4 and all(b.momentum == 0.01 and b.eps == 1e-3 for b in bns)
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert all(c.padding == (1, 1) for c in convs)  # padding "same"
    assert all(float(c.bias.detach().abs().sum()) == 0 for c in convs)  # zero biases
    # glorot-uniform bound sqrt(6 / (fan_in + fan_out)) for the first conv: fan_in 27, fan_out 576
    bound = (6 / (27 + 576)) ** 0.5
    assert convs[0].weight.abs().max() <= bound and convs[0].weight.abs().max() > 0.9 * bound
    drops = [x.p for x in m.modules() if isinstance(x, nn.Dropout)]
    assert drops == [0.4, 0.3]
    # conv -> ReLU -> BN -> pool (Keras' activation sits inside Conv2D, before the BN layer)
    kinds = [type(x).__name__ for x in m.features[:4]]
    assert kinds == ["Conv2d", "ReLU", "BatchNorm2d", "MaxPool2d"]


def test_l2_term_on_known_weights():
    recipe = get_recipe("reference")
    model = build_model(recipe)
    with torch.no_grad():
        for i, w in enumerate(model.regularized_weights()):
            w.fill_(0.5 + i)
        for m in model.modules():  # biases and BN parameters must not count
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)):
                m.bias.fill_(100.0)
    sizes = [w.numel() for w in model.regularized_weights()]
    expected = 1e-4 * sum(n * (0.5 + i) ** 2 for i, n in enumerate(sizes))
    trainer = Trainer.__new__(Trainer)
    trainer.model, trainer.recipe, trainer.device = model, recipe, torch.device("cpu")
    assert len(sizes) == 5  # three conv kernels and two dense kernels
    assert abs(float(trainer.l2_term().detach()) - expected) < 1e-6 * expected


def test_airnet_shapes_and_frozen_parts():
    m = AirNet(10, (8, 16, 16))
    out = m(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 10)
    assert not m.whiten.weight.requires_grad
    assert all(not bn.weight.requires_grad for bn in m.modules() if isinstance(bn, nn.BatchNorm2d))


def test_whitening_init_gives_identity_covariance():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 3, 12, 12, generator=g)
    # correlated channels and neighbouring pixels, like natural images
    x = base + 0.8 * base.roll(1, dims=1) + 0.5 * base.roll(1, dims=3)
    conv = nn.Conv2d(3, 24, 2, padding=0, bias=False)
    init_whitening(conv, x, eps=0.0)
    with torch.no_grad():
        out = conv(x)[:, :12]  # first half: the whitened directions (second half is their negative)
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = flat.T @ flat / len(flat)
    assert torch.allclose(cov, torch.eye(12), atol=1e-3)


def test_whitening_drops_directions_without_variance_and_fast_trains_on_a_constant_channel(tmp_path):
    """Red-only images (G = B = 0 everywhere): 8 of the 12 patch directions have no variance. Their filters
    would give channels constant across images, which the next BatchNorm (eps 1e-12) turned into NaN weights
    in the first epoch; the 4 useful directions (and negatives) fill the 24 filters instead."""
    import cifarlab

    g = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 3, 12, 12)
    x[:, 0] = torch.randn(64, 12, 12, generator=g)
    conv = nn.Conv2d(3, 24, 2, padding=0, bias=False)
    init_whitening(conv, x)
    with torch.no_grad():
        out = conv(x)
    assert (out.std(dim=(0, 2, 3)) > 0.1).all()  # every filter sees the images' variation
    flat = out[:, :4].permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.allclose(flat.T @ flat / len(flat), torch.eye(4), atol=0.05)  # still whitened
    assert torch.equal(conv.weight[:4], conv.weight[8:12]) and torch.equal(conv.weight[:4], -conv.weight[4:8])

    gen = torch.Generator().manual_seed(1)
    y = torch.arange(48) % 2
    red = (torch.rand(48, 1, 16, 16, generator=gen) * 100 + 100 + 40 * y.view(-1, 1, 1, 1)).to(torch.uint8)
    imgs = torch.cat([red, torch.zeros(48, 2, 16, 16, dtype=torch.uint8)], dim=1)
    data = {"x_train": imgs[:32], "y_train": y[:32], "x_test": imgs[32:], "y_test": y[32:]}
    kw = dict(runs_dir=tmp_path, epochs=2, batch_size=8, widths=(8, 8, 8), precision="fp32", train_scales=())
    run = cifarlab.fit("fast", data=data, **kw)
    assert all(torch.isfinite(p).all() for p in run.get_model().parameters())
    assert run.test_accuracy > 0.5


def test_images_too_small_for_the_reference_cnn_are_a_config_error():
    from cifarlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"3 pooling blocks need images of at least 8 px; got 4x4"):
        build_model(get_recipe("reference"), input_shape=(3, 4, 4))


def test_summary_names_keep_acronyms_whole():
    """The CamelCase -> snake_case step named SiLU layers `si_l_u`; acronyms now stay whole, as Keras names them."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.SiLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1))
    names = [line.split()[0] for line in summary(model).splitlines() if "(" in line][1:]  # [0]: the header
    assert names == ["conv2d", "silu", "silu_1", "max_pooling2d", "adaptive_avg_pool2d"]
