"""The skinny CPU product (methods/kernels.py) and the runtime's `kernel` matmul path."""
import contextlib

import numpy as np
import pytest
import torch

from methods import get, kernels
from tests.conftest import PROMPTS, tiny

pytestmark = pytest.mark.skipif(kernels.load() is None,
                                reason=f"skinny kernel unavailable: {kernels.unavailable_reason()}")


def _nothing():
    return contextlib.nullcontext()


@pytest.mark.parametrize("shape", [(64, 640), (200, 64), (1000, 2048), (37, 8)])
def test_matches_numpy_and_rows_are_bit_identical(shape):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(shape, dtype=np.float32)
    x = rng.standard_normal((40, shape[1]), dtype=np.float32)
    reference = x.astype(np.float64) @ weight.astype(np.float64).T
    for rows in list(range(1, 18)) + [33, 40]:  # beyond 16 rows: one pass per 16
        out = kernels.skinny_matmul(x[:rows], weight)
        assert out.shape == (rows, shape[0])
        np.testing.assert_allclose(out, reference[:rows], rtol=1e-4, atol=1e-4 * np.sqrt(shape[1]))
        # every row exactly as a 1-row product computes it
        singles = np.concatenate([kernels.skinny_matmul(x[i:i + 1], weight) for i in range(rows)])
        assert np.array_equal(out, singles)


def test_several_weights_in_one_product_equal_separate_products():
    rng = np.random.default_rng(1)
    weights = [rng.standard_normal((rows, 64), dtype=np.float32) for rows in (300, 70, 70)]
    x = rng.standard_normal((5, 64), dtype=np.float32)
    together = kernels.skinny_matmul(x, *weights)
    assert together.shape == (5, 440)
    # bit-identical: each output element is computed the same way in either call
    assert np.array_equal(together, np.concatenate([kernels.skinny_matmul(x, w) for w in weights], axis=1))


def test_refuses_unsupported_shapes():
    weight = torch.ones(4, 12)
    assert not kernels.accepts(weight)  # inner size not a multiple of 8
    assert not kernels.accepts(torch.ones(4, 8, dtype=torch.float64))
    assert not kernels.accepts(torch.ones(8, 4).t())  # not contiguous
    with pytest.raises(ValueError, match="unsupported weight"):
        kernels.Product(weight)
    with pytest.raises(ValueError, match="unsupported weight"):
        kernels.Product(torch.ones(4, 8), torch.ones(4, 16))  # inner sizes differ
    product = kernels.Product(torch.ones(4, 8))
    with pytest.raises(ValueError, match="unsupported input"):
        product(torch.ones(1, 16))  # inner size differs
    with pytest.raises(ValueError, match="unsupported input"):
        product(torch.ones(2, 8, dtype=torch.float64))


def test_a_replaced_weight_is_picked_up():
    from methods.products import Linear
    layer = Linear(16, 8, bias=False)
    layer.requires_grad_(False)
    layer.use_path("kernel")
    x = torch.randn(2, 16)
    with torch.inference_mode():
        assert torch.allclose(layer(x), x @ layer.weight.T, atol=1e-5)
        layer.weight.data = torch.randn(8, 16)  # new storage: the kernel must not use the old one
        assert torch.allclose(layer(x), x @ layer.weight.T, atol=1e-5)


def test_runtime_kernel_path_is_lossless_and_verify_equals_decode():
    model = tiny("tiny-llama-random", "float32")
    runtime = model.runtime
    ids = model.prompt_ids([PROMPTS[1]], [])
    expected = get("vanilla")(runtime).generate(ids, 24, model.stop_ids).new_ids
    try:
        runtime.set_matmul("kernel")
        assert get("vanilla")(runtime).generate(ids, 24, model.stop_ids).new_ids == expected
        for name in ("pld", "kangaroo", "medusa"):
            with pytest.warns(UserWarning) if name != "pld" else _nothing():
                method = get(name)(runtime)
            assert method.generate(ids, 24, model.stop_ids).new_ids == expected, name
        # a forward over k tokens gives, row by row, what k one-token forwards give
        with torch.inference_mode():
            tokens = torch.tensor([ids[:6]])
            cache = runtime.new_cache(16)
            together = runtime.forward(tokens, cache, 0)[0]
            cache = runtime.new_cache(16)
            one_by_one = torch.cat([runtime.forward(tokens[:, i:i + 1], cache, i)[0] for i in range(6)])
        assert torch.allclose(together, one_by_one, atol=1e-5)
    finally:
        runtime.set_matmul("torch")


def test_kernel_path_refuses_float64():
    runtime = tiny("tiny-llama-random", "float64").runtime
    with pytest.raises(ValueError, match="float32"):
        runtime.set_matmul("kernel")
