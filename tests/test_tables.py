"""rope_frequencies and cos_sin_table against Python's own double-precision math."""

import math

import pytest
import torch

import reference as ref
import rope_ext


@pytest.mark.parametrize("base", [10000.0, 500000.0, 1e6, 2.5])
@pytest.mark.parametrize("rotary_dim", [2, 6, 64, 96, 128, 256])
def test_default_frequencies(rotary_dim, base):
    inv_freq, attention_factor = rope_ext.rope_frequencies(rotary_dim, base)
    assert inv_freq.dtype == torch.float64 and inv_freq.shape == (rotary_dim // 2,)
    assert attention_factor == 1.0
    expected = [base ** (-(2 * i) / rotary_dim) for i in range(rotary_dim // 2)]
    # theta_0 = base^0 = 1 exactly; the others within an ulp or two of Python's pow.
    assert inv_freq[0].item() == 1.0
    for got, want in zip(inv_freq.tolist(), expected):
        assert abs(got - want) <= 2 * math.ulp(want), (got, want)


def test_default_is_the_default():
    inv_freq, attention_factor = rope_ext.rope_frequencies(16)
    assert torch.equal(inv_freq, rope_ext.rope_frequencies(16, 10000.0)[0])
    assert torch.equal(inv_freq, rope_ext.rope_frequencies(16, 10000.0,
                                                           {"rope_type": "default"})[0])
    assert attention_factor == 1.0


def test_linear_scaling_divides_frequencies():
    inv_freq, attention_factor = rope_ext.rope_frequencies(32, 10000.0,
                                                           {"rope_type": "linear", "factor": 4.0})
    expected = ref.inv_freq(32) / 4.0
    torch.testing.assert_close(inv_freq, expected, rtol=4 * 2.0 ** -53, atol=0)
    assert attention_factor == 1.0


# --- cos_sin_table ---


def _check_rows(cos, sin, theta, positions, attention_factor=1.0):
    """Row m of the table against A cos(m theta_i), A sin(m theta_i) computed by Python's math
    in double precision: float64 tables within 2 ulps, float32 tables within 1 float32 ulp of the
    double value (one correct-ish rounding), bf16/fp16 within half an ulp plus that."""
    for m in positions:
        for i, t in enumerate(theta):
            angle = m * t  # one float64 product, as the table must form it
            for table, fn in ((cos, math.cos), (sin, math.sin)):
                want = attention_factor * fn(angle)
                got = table[m, i].item()
                if table.dtype == torch.float64:
                    tol = 2 * math.ulp(want) + 2.0 ** -60
                elif table.dtype == torch.float32:
                    tol = ref.ulp32(torch.tensor(want, dtype=torch.float64)).item()
                else:
                    tol = abs(want) * torch.finfo(table.dtype).eps + torch.finfo(table.dtype).tiny
                assert abs(got - want) <= tol, (table.dtype, fn.__name__, m, i, got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
def test_table_matches_math(dtype):
    theta = ref.inv_freq(16).tolist()
    cos, sin = rope_ext.cos_sin_table(torch.tensor(theta, dtype=torch.float64), 300, dtype=dtype)
    assert cos.dtype == sin.dtype == dtype
    assert cos.shape == sin.shape == (300, 8)
    assert cos.is_contiguous() and sin.is_contiguous()
    _check_rows(cos, sin, theta, [0, 1, 2, 3, 17, 100, 299])


def test_large_positions_float32_exact():
    """float32 tables are exact at large positions (docs/math.md section 7), unlike a float32 angle.

    Rows up to 2**20 are read from a real table (r = 4, so 2**20 + 1 rows are cheap). Rows
    2**24 + 1 and 2**31 - 1 would need a table of 2**31 rows; instead row 1 of a table whose
    inv_freq is the float64 angle fl(m * theta_i) is used: 1 * fl(m theta_i) is exactly the
    angle row m would hold, so this checks cos/sin at those angle magnitudes."""
    theta = ref.inv_freq(4).tolist()
    inv = torch.tensor(theta, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        cos, sin = rope_ext.cos_sin_table(inv, 2**20 + 1, dtype=dtype)
        _check_rows(cos, sin, theta, [0, 1, 2, 2**20 - 1, 2**20])
    for m in (2**24 + 1, 2**31 - 1):
        angles = [m * t for t in theta]
        for dtype in (torch.float32, torch.float64):
            cos, sin = rope_ext.cos_sin_table(torch.tensor(angles, dtype=torch.float64), 2,
                                              dtype=dtype)
            _check_rows(cos, sin, angles, [1])
    # A float32 angle would be off at 2**24 + 1 (it rounds the position itself to 2**24):
    # make sure the check above can tell the difference.
    f32_angle = float(torch.tensor(2**24 + 1, dtype=torch.float32)) * theta[0]
    assert abs(math.cos(f32_angle) - math.cos((2**24 + 1) * theta[0])) > 1e-3


@pytest.mark.parametrize("attention_factor", [0.5, 1.1386294, 1.3688879])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_attention_factor_multiplies_table(attention_factor, dtype):
    theta = ref.inv_freq(8, 500000.0).tolist()
    cos, sin = rope_ext.cos_sin_table(torch.tensor(theta, dtype=torch.float64), 50,
                                      attention_factor, dtype=dtype)
    _check_rows(cos, sin, theta, [0, 1, 7, 49], attention_factor)


def test_empty_table():
    cos, sin = rope_ext.cos_sin_table(ref.inv_freq(8), 0)
    assert cos.shape == sin.shape == (0, 4)


def test_device_argument():
    inv = ref.inv_freq(8)
    # Default: inv_freq's device.
    cos, sin = rope_ext.cos_sin_table(inv, 10)
    assert cos.device.type == sin.device.type == "cpu"
    for device in ("cpu", torch.device("cpu")):
        cos2, sin2 = rope_ext.cos_sin_table(inv, 10, device=device)
        assert cos2.device.type == "cpu" and torch.equal(cos2, cos) and torch.equal(sin2, sin)
    # The meta device: shapes and dtypes without data, following inv_freq or the argument.
    for args in ({"device": "meta"}, {}):
        src = inv if args else inv.to("meta")
        cos_m, sin_m = rope_ext.cos_sin_table(src, 10, dtype=torch.bfloat16, **args)
        assert cos_m.device.type == sin_m.device.type == "meta"
        assert cos_m.shape == (10, 4) and cos_m.dtype == torch.bfloat16


def test_float32_inv_freq_input():
    """inv_freq given in float32 (as transformers keeps it) is used at its float32 values."""
    theta32 = ref.inv_freq(8).float()
    cos, sin = rope_ext.cos_sin_table(theta32, 1000, dtype=torch.float64)
    _check_rows(cos, sin, theta32.double().tolist(), [1, 999])


def test_table_drives_the_op():
    """A table from cos_sin_table rotates by m theta_i: compare the op with a reference table."""
    inv_freq, attention_factor = rope_ext.rope_frequencies(8, 10000.0)
    cos, sin = rope_ext.cos_sin_table(inv_freq, 64, attention_factor)
    x = torch.randn(1, 6, 2, 8, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 5, 17, 40, 63]])
    out = rope_ext.apply_rope(x, cos.double(), sin.double(), pos)
    ref_cos, ref_sin = ref.default_table(8, 64)
    # The float32 table's rounding (2^-24 relative) dominates.
    ref.assert_pairs_close(out, ref.rope(x, ref_cos, ref_sin, pos), x, 8, False,
                           tol=2 * 2.0 ** -24)
