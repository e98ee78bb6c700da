"""The Caffe models: sizes, parameter counts, pooling, initialisation, preprocessing."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bang_jax
from bang_jax.models import CifarQuick, LeNet, caffe_avg_pool, caffe_max_pool, set_mean_image


def capture_inputs(model, variables, x, **kw):
    seen = {}

    def interceptor(next_fun, args, kwargs, ctx):
        if ctx.method_name == "__call__" and isinstance(ctx.module, nn.Dense | nn.Conv):
            seen[ctx.module.name] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        out = model.apply(variables, x, **kw)
    return out, seen


def test_public_names_exist_and_are_documented():
    for name in bang_jax.__all__:
        obj = getattr(bang_jax, name)
        if callable(obj):
            assert (obj.__doc__ or "").strip(), f"bang_jax.{name} has no docstring"


@pytest.mark.parametrize(
    "model,shape,count,ip1_in",
    [(LeNet(), (3, 28, 28, 1), 431_080, 800), (CifarQuick(), (3, 32, 32, 3), 145_578, 1024)],
)
def test_sizes_and_parameter_counts(model, shape, count, ip1_in):
    x = jnp.zeros(shape)
    variables = model.init(jax.random.PRNGKey(0), x)
    assert sum(p.size for p in jax.tree.leaves(variables["params"])) == count
    assert variables["params"]["ip1"]["kernel"].shape[0] == ip1_in
    out, seen = capture_inputs(model, variables, x)
    assert out.shape == (3, 10)
    assert seen["ip1"].shape == (3, ip1_in)


def test_cifar_spatial_sizes_are_ceil_mode():
    model = CifarQuick()
    x = jnp.zeros((1, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    _, seen = capture_inputs(model, variables, x)
    assert seen["conv2"].shape == (1, 16, 16, 32)  # 32 -> 16 (VALID pooling would give 15)
    assert seen["conv3"].shape == (1, 8, 8, 32)


def reference_pool(x, k, s, op):
    """Caffe pooling on one [H, W] map, loops over windows (pad 0)."""
    h, w = x.shape
    oh, ow = int(np.ceil((h - k) / s)) + 1, int(np.ceil((w - k) / s)) + 1
    out = np.zeros((oh, ow))
    for i in range(oh):
        for j in range(ow):
            win = x[i * s : min(i * s + k, h), j * s : min(j * s + k, w)]
            out[i, j] = win.max() if op == "max" else win.sum() / win.size
    return out


@pytest.mark.parametrize("size", [4, 5, 8, 32])
def test_pooling_matches_caffe_loops(size):
    x = np.random.default_rng(size).normal(size=(size, size)).astype(np.float32)
    for op, fn in (("max", caffe_max_pool), ("ave", caffe_avg_pool)):
        got = np.asarray(fn(jnp.asarray(x)[None, :, :, None], 3, 2))[0, :, :, 0]
        np.testing.assert_allclose(got, reference_pool(x, 3, 2, op), rtol=1e-6, atol=1e-6)


def reference_max_pool_grad(x, k, s, g):
    """Caffe's MAX pooling backward on one [H, W] map: each window's gradient goes to its first maximal element
    (strict > while scanning row by row), summed where windows overlap."""
    h, w = x.shape
    out = np.zeros((h, w), np.float64)
    for i in range(g.shape[0]):
        for j in range(g.shape[1]):
            best, at = -np.inf, None
            for a in range(i * s, min(i * s + k, h)):
                for b in range(j * s, min(j * s + k, w)):
                    if x[a, b] > best:
                        best, at = x[a, b], (a, b)
            out[at] += g[i, j]
    return out


@pytest.mark.parametrize("size,k,s", [(24, 2, 2), (5, 2, 2), (32, 3, 2), (9, 3, 2), (6, 3, 3)])
def test_max_pool_gradient_is_caffes_including_ties(size, k, s):
    rng = np.random.default_rng(size)
    for x in (rng.normal(size=(size, size)), rng.integers(0, 3, (size, size))):  # the second is full of ties
        x = x.astype(np.float32)
        out = caffe_max_pool(jnp.asarray(x)[None, :, :, None], k, s)
        g = rng.normal(size=out.shape[1:3]).astype(np.float32)
        grad = jax.jit(jax.grad(lambda v: jnp.sum(caffe_max_pool(v, k, s)[0, :, :, 0] * g)))(
            jnp.asarray(x)[None, :, :, None])
        np.testing.assert_allclose(np.asarray(grad)[0, :, :, 0], reference_max_pool_grad(x, k, s, g), rtol=1e-6,
                                   atol=1e-6)


def test_initialisation():
    lenet = LeNet().init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    for name, fan_in in (("conv1", 25), ("conv2", 500), ("ip1", 800), ("ip2", 500)):
        k = np.asarray(lenet[name]["kernel"])
        limit = np.sqrt(3.0 / fan_in)
        assert np.abs(k).max() <= limit and np.abs(k).max() > 0.9 * limit
        np.testing.assert_allclose(k.std(), limit / np.sqrt(3.0), rtol=0.15)
        assert not np.any(lenet[name]["bias"])
    cifar = CifarQuick().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    for name, std in (("conv1", 1e-4), ("conv2", 0.01), ("conv3", 0.01), ("ip1", 0.1), ("ip2", 0.1)):
        np.testing.assert_allclose(np.asarray(cifar[name]["kernel"]).std(), std, rtol=0.2)
        assert not np.any(cifar[name]["bias"])


def test_preprocessing_in_pixel_units():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, (2, 28, 28, 1)), jnp.float32)
    v = LeNet().init(jax.random.PRNGKey(0), x)
    _, seen = capture_inputs(LeNet(), v, x)
    np.testing.assert_array_equal(np.asarray(seen["conv1"]), np.asarray(x) * 0.00390625)
    xc = jnp.asarray(rng.integers(0, 256, (2, 32, 32, 3)), jnp.float32)
    vc = CifarQuick().init(jax.random.PRNGKey(0), xc)
    mean = rng.uniform(0, 255, (32, 32, 3)).astype(np.float32)
    vc = set_mean_image(vc, mean)
    _, seen = capture_inputs(CifarQuick(), vc, xc)
    np.testing.assert_allclose(np.asarray(seen["conv1"]), np.asarray(xc) - mean[None], rtol=1e-6)
    with pytest.raises(ValueError, match="mean_image"):
        set_mean_image(vc, mean[:16])


def test_dropout_only_in_training():
    x = jnp.ones((4, 28, 28, 1)) * 100
    model = LeNet()
    v = model.init(jax.random.PRNGKey(0), x)
    a = model.apply(v, x, train=False)
    np.testing.assert_array_equal(a, model.apply(v, x))
    b = model.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.allclose(a, b)


def test_wrong_image_shape_raises():
    with pytest.raises(ValueError, match=r"\[N, 28, 28, 1\]"):
        LeNet().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"\[N, 32, 32, 3\]"):
        CifarQuick().init(jax.random.PRNGKey(0), jnp.zeros((32, 32, 3)))


def test_pixel_unit_models_warn_on_0_to_1_images():
    import warnings

    from bang_jax.evaluate import predict

    model = LeNet()
    x = np.random.default_rng(0).uniform(0, 1, (4, 28, 28, 1)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), x * 255)
    with pytest.warns(UserWarning, match="multiply them by 255"):
        model.apply(variables, x)
    with pytest.warns(UserWarning, match="pixel units"):
        predict(model, variables, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.apply(variables, x * 255)
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
        jax.jit(model.apply)(variables, x)  # traced: cannot be inspected, no warning
