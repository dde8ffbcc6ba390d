"""Each codec through reconstruct(): exact where it must be, within its measured error otherwise."""

from __future__ import annotations

import pytest
import torch

from wfactor.codecs import dense, lowrank, quant, residual, sparse
from wfactor.format.parts import PartSpec, read_part_array
from wfactor.plan import Planned, assemble, measure, rebuild_planned
from wfactor.reconstruct import base_view, canonical_nan
from wfactor.tensors import bits_view, bitwise_equal, from_storage


def g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_dense_is_exact_for_every_float_dtype_and_keeps_special_values() -> None:
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        t = torch.randn(7, 5, generator=g()).to(dt)
        t[0, 0] = -0.0
        t[0, 1] = float("nan")
        t[0, 2] = float("inf")
        p = assemble("w", t, None, [dense.encode(t)], None)
        assert bitwise_equal(rebuild_planned(p, None), t)


def test_dense_integer_and_bool() -> None:
    for t in (torch.arange(10, dtype=torch.int64), torch.tensor([True, False, True])):
        p = assemble("w", t, None, [dense.encode(t)], None)
        assert torch.equal(rebuild_planned(p, None), t)


def test_lowrank_recovers_an_exact_low_rank_delta() -> None:
    base = torch.randn(48, 40, generator=g(1))
    delta = torch.randn(48, 4, generator=g(2)) @ torch.randn(4, 40, generator=g(3)) * 0.01
    target = base + delta
    u, s, vh = lowrank.spectrum(delta, 10)
    assert float(s[4]) < 1e-5 * float(s[0])  # rank 4 exactly
    p = assemble("w", target, "w", [lowrank.encode(u, s, vh, 4)], None)
    y = rebuild_planned(p, base)
    assert measure(y, target)["rel_l2"] < 1e-5
    assert p.record.terms[0].params == {"rank": 4}


def test_lowrank_randomised_path_matches_full_svd() -> None:
    delta = torch.randn(3000, 6, generator=g(4)) @ torch.randn(6, 2100, generator=g(5))
    u, s, vh = lowrank.spectrum(delta, 8)  # min dim 2100 > FULL_SVD_MAX: randomised
    full = torch.linalg.svdvals(delta)[:6]
    torch.testing.assert_close(s[:6], full, rtol=1e-4, atol=1e-3)


def test_conv_kernels_are_flattened() -> None:
    base = torch.randn(8, 4, 3, 3, generator=g(6))
    delta = (torch.randn(8, 2, generator=g(7)) @ torch.randn(2, 36, generator=g(8))).reshape(8, 4, 3, 3)
    u, s, vh = lowrank.spectrum(delta, 4)
    p = assemble("c", base + delta, "c", [lowrank.encode(u, s, vh, 2)], None)
    assert measure(rebuild_planned(p, base), base + delta)["rel_l2"] < 1e-3  # float16 factors


def test_sparse_places_values_at_indices() -> None:
    base = torch.zeros(10, 10)
    target = base.clone()
    target[3, 4], target[9, 9], target[0, 0] = 1.5, -2.0, 0.25
    p = assemble("w", target, "w", [sparse.encode(target - base, 3)], None)
    assert bitwise_equal(rebuild_planned(p, base), target)
    idx = read_part_array(p.record.terms[0].parts["indices"], p.stored["w#0.indices"], "t")
    assert idx.tolist() == [0, 34, 99]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quant_error_falls_with_bits_and_codes_are_in_range(bits: int) -> None:
    base = torch.randn(32, 64, generator=g(9))
    target = base + 0.01 * torch.randn(32, 64, generator=g(10))
    codes, scales = quant.best(target - base, bits)
    assert int(codes.abs().max()) <= quant.qmax(bits)
    p = assemble("w", target, "w", [quant.encode(codes, scales, bits)], None)
    err = measure(rebuild_planned(p, base), target)["rel_l2"]
    drift = float((target - base).norm() / target.norm())
    assert err < drift * {2: 0.6, 3: 0.3, 4: 0.15, 8: 0.01}[bits]


def test_quant_zero_rows_have_zero_scale() -> None:
    d = torch.zeros(3, 4)
    d[1] = torch.tensor([1.0, -1.0, 0.5, 0.0])
    codes, scales = quant.best(d, 4)
    assert scales[0] == 0 and scales[2] == 0 and int(codes[0].abs().sum()) == 0


def test_residual_makes_any_prediction_exact() -> None:
    for dt in (torch.float32, torch.bfloat16, torch.int32):
        t = (torch.randn(6, 6, generator=g(11)) * 100).to(dt)
        pred = torch.zeros_like(t)
        enc = residual.encode(t, pred)
        arr, _dtype, _enc = enc.arrays["xor"]
        assert bitwise_equal(residual.apply(pred, from_storage(arr, _dtype)), t)


def test_bf16_member_rebuilds_from_fp32_backbone() -> None:
    base = torch.randn(16, 16, generator=g(12))
    member = (base + 0.01 * torch.randn(16, 16, generator=g(13))).to(torch.bfloat16)
    codes, scales = quant.best(member.float() - base, 8)
    p = assemble("w", member, "w", [quant.encode(codes, scales, 8)], None)
    y = rebuild_planned(p, base)
    assert y.dtype == torch.bfloat16
    assert measure(y, member)["rel_l2"] < 0.005


def test_base_view_pads_grown_rows_with_zeros() -> None:
    base = torch.arange(6.0).reshape(3, 2)
    v = base_view(base, (5, 2), torch.float32)
    assert v[:3].equal(base) and v[3:].abs().sum() == 0
    shrunk = base_view(base, (2, 2), torch.float32)
    assert shrunk.equal(base[:2])


def test_canonical_nan() -> None:
    x = torch.tensor([1.0, float("nan"), -float("nan")])
    y = canonical_nan(x.to(torch.bfloat16))
    assert bits_view(y)[1:].tolist() == [0x7FC0, 0x7FC0]
    assert bits_view(canonical_nan(x))[1:].tolist() == [0x7FC00000, 0x7FC00000]


def test_no_codec_or_reader_writes_into_its_inputs() -> None:
    base = torch.randn(20, 12, generator=g(14))
    target = base + 0.02 * torch.randn(20, 12, generator=g(15))
    b0, t0 = base.clone(), target.clone()
    delta = target - base
    d0 = delta.clone()
    u, s, vh = lowrank.spectrum(delta, 4)
    encs = [
        quant.encode(*quant.best(delta, 3), 3),
        lowrank.encode(u, s, vh, 2),
        sparse.encode(delta, 10),
        dense.encode(target),
    ]
    for enc in encs:
        p = assemble("w", target, None if enc.codec == "dense" else "w", [enc], None)
        rebuild_planned(p, None if enc.codec == "dense" else base)
    residual.encode(target, base)
    assert bitwise_equal(base, b0) and bitwise_equal(target, t0) and bitwise_equal(delta, d0)


def test_part_spec_json_roundtrip() -> None:
    spec = PartSpec("w#0.u", "F16", (4, 2), "zstd_planes")
    assert PartSpec.from_json(spec.to_json(), "t") == spec
    p = Planned(assemble("w", torch.ones(2), None, [dense.encode(torch.ones(2))], None).record, {})
    assert p.nbytes == 0


def test_randomised_spectrum_of_a_large_low_rank_delta() -> None:
    """Above FULL_SVD_MAX the low-rank codec's SVD is randomised (wfactor.linalg): a rank-5 delta of a
    2100 x 2060 matrix comes back exactly (to float32 rounding), the same on every call."""
    from wfactor.codecs import lowrank

    g = torch.Generator().manual_seed(3)
    delta = torch.randn(2100, 5, generator=g) @ torch.randn(5, 2060, generator=g)
    u, s, vh = lowrank.spectrum(delta, 8)
    assert u.shape == (2100, 8) and vh.shape == (8, 2060)
    approx = (u[:, :5] * s[:5]) @ vh[:5]
    assert float(torch.linalg.norm(approx - delta) / torch.linalg.norm(delta)) < 1e-5
    assert float(s[5]) < 1e-3 * float(s[0])
    u2, s2, vh2 = lowrank.spectrum(delta, 8)
    assert torch.equal(u, u2) and torch.equal(s, s2) and torch.equal(vh, vh2)
