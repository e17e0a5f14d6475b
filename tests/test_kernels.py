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
    weight = torch.ones(4, 8, dtype=torch.float64)
    assert not kernels.accepts(weight)
    assert not kernels.accepts(torch.ones(8))  # not a matrix
    assert kernels.accepts(torch.ones(4, 12)) and kernels.accepts(torch.ones(8, 4).t())  # any inner size, any layout
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
        # after a prefix, a forward over k tokens (a verification) gives bit for bit what k
        # one-token forwards (decoding) give
        with torch.inference_mode():
            prefix, tokens = torch.tensor([ids[:4]]), torch.tensor([ids[4:10]])
            cache = runtime.new_cache(16)
            runtime.forward(prefix, cache, 0)
            together = runtime.forward(tokens, cache, 4)[0]
            cache = runtime.new_cache(16)
            runtime.forward(prefix, cache, 0)
            one_by_one = torch.cat([runtime.forward(tokens[:, i:i + 1], cache, 4 + i)[0] for i in range(6)])
        assert torch.equal(together, one_by_one)
    finally:
        runtime.set_matmul("torch")


def test_kernel_path_refuses_float64():
    runtime = tiny("tiny-llama-random", "float64").runtime
    with pytest.raises(ValueError, match="float32"):
        runtime.set_matmul("kernel")


def test_a_weight_changed_in_place_is_packed_again():
    from methods.products import Linear
    layer = Linear(16, 8, bias=False)
    layer.requires_grad_(False)
    layer.use_path("kernel")
    x = torch.randn(2, 16)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(2.0)  # same storage, new values: the packed copy is stale
        assert torch.allclose(layer(x), 2 * before, atol=1e-5)


def test_fused_norm_matches_torch_and_is_row_by_row():
    torch.manual_seed(0)
    x, scale, residual = torch.randn(7, 640), torch.randn(640), torch.randn(7, 640)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * scale
    out = kernels.rms_norm(x, scale, 1e-6)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(kernels.rms_norm(x, scale, 1e-6, residual), residual + out)
    assert torch.equal(torch.cat([kernels.rms_norm(x[i:i + 1], scale, 1e-6) for i in range(7)]), out)
    with pytest.raises(ValueError, match="rms_norm"):
        kernels.rms_norm(x.double(), scale, 1e-6)


def test_fused_heads_norm_rope_matches_the_torch_operations():
    from methods.runtime import rotate_half
    torch.manual_seed(1)
    B, T, heads, kv_heads, dim = 2, 3, 4, 2, 16
    projection = torch.randn(B, T, (heads + 2 * kv_heads) * dim)
    angles = torch.randn(T, dim // 2)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    scale = torch.randn(dim)
    k = projection[..., heads * dim:(heads + kv_heads) * dim].reshape(B, T, kv_heads, dim).transpose(1, 2)
    normed = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * scale
    expected = normed * cos + rotate_half(normed) * sin
    out = kernels.heads_norm_rope(projection, heads, kv_heads, dim, cos, sin, scale, 1e-6)
    assert out.shape == (B, kv_heads, T, dim)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    q = projection[..., :heads * dim].reshape(B, T, heads, dim).transpose(1, 2)
    plain = kernels.heads_norm_rope(projection, 0, heads, dim, cos, sin)  # no norm: exactly torch's operations
    assert torch.equal(plain, q * cos + rotate_half(q) * sin)


def test_fused_attention_matches_torch_and_each_query_is_computed_alone():
    from methods.runtime import _grouped_attention
    torch.manual_seed(2)
    B, heads, kv_heads, dim, slots, low, end, T = 1, 4, 2, 40, 32, 3, 20, 5
    keys, values = torch.randn(B, kv_heads, slots, dim), torch.randn(B, kv_heads, slots, dim)
    q = torch.randn(B, heads, T, dim)
    L = end - low
    mask = torch.zeros(T, L)
    for t in range(T):  # causal over the last T slots
        mask[t, L - T + t + 1:] = float("-inf")
    out = kernels.attention(q, keys, values, low, end, mask, 0.125)
    expected = _grouped_attention(q, keys[:, :, low:end], values[:, :, low:end], mask, 0.125)
    assert torch.allclose(out, expected.transpose(1, 2).reshape(B, T, heads * dim), rtol=1e-5, atol=1e-5)
    for t in range(T):  # query t alone, seeing only its keys, gives the same bits
        alone = kernels.attention(q[:, :, t:t + 1].contiguous(), keys, values, low, end - T + t + 1, None, 0.125)
        assert torch.equal(alone, out[:, t:t + 1])
    with pytest.raises(ValueError, match="attention"):
        kernels.attention(q, keys, values, 0, slots + 1, None, 0.125)
