"""The image term of AnyMS against oracles written here with plain einsum and softmax, following the
paper's equations token by token, and never calling anyms.core.attention's internals."""

import math
import warnings
from decimal import Decimal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anyms.core.attention import MODES, image_attention
from anyms.core.layout import Layout, LayoutWarning, Subject

ROLE_RANK = {"attribute": 2, "object": 1, "background": 0}


# --- oracles ---------------------------------------------------------------------------------------

def softmax_attention(q, k, v):
    """softmax(Q K^T / sqrt(d)) V on [B, H, L, D] x [B, H, T, D]."""
    logits = torch.einsum("bhld,bhtd->bhlt", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhlt,bhtd->bhld", logits.softmax(dim=-1), v)


def covers(box, r, c, h, w):
    x0, y0, x1, y1 = box
    rows = range(math.floor(y0 * h + 1e-9), max(math.ceil(y1 * h - 1e-9), math.floor(y0 * h + 1e-9) + 1))
    cols = range(math.floor(x0 * w + 1e-9), max(math.ceil(x1 * w - 1e-9), math.floor(x0 * w + 1e-9) + 1))
    return r in rows and c in cols


def oracle_owner(subjects, r, c, h, w):
    covering = [i for i, s in enumerate(subjects) if covers(s.box, r, c, h, w)]
    if not covering:
        return -1
    return min(covering, key=lambda i: (-ROLE_RANK[subjects[i].role], exact_area(subjects[i].box), i))


def exact_area(box):
    x0, y0, x1, y1 = (Decimal(repr(v)) for v in box)  # the decimals written in the test, compared exactly
    return (x1 - x0) * (y1 - y0)


def oracle(mode, q, ks, vs, subjects, grid, scales):
    h, w = grid
    B, H, L, D = q.shape
    out = torch.zeros(B, H, L, vs[0].shape[-1], dtype=q.dtype)
    if mode == "none":
        return out
    if mode == "sum":  # Eq. 8
        return sum(s * softmax_attention(q, k, v) for s, k, v in zip(scales, ks, vs))
    if mode == "joint":
        return softmax_attention(q, torch.cat(ks, 2), torch.cat([s * v for s, v in zip(scales, vs)], 2))
    for r in range(h):
        for c in range(w):
            l = r * w + c  # row-major
            ql = q[:, :, l : l + 1]
            if mode == "masked_sum":  # Eq. 7: every covering subject adds its term
                for j, s in enumerate(subjects):
                    if covers(s.box, r, c, h, w):
                        out[:, :, l : l + 1] += scales[j] * softmax_attention(ql, ks[j], vs[j])
            else:  # Eq. 5-6: the token's owner alone
                j = oracle_owner(subjects, r, c, h, w)
                if j >= 0:
                    out[:, :, l : l + 1] = scales[j] * softmax_attention(ql, ks[j], vs[j])
    return out


# --- cases -----------------------------------------------------------------------------------------

def subj(name, box, role="object", scale=1.0):
    return Subject(name=name, phrase=name, image=None, box=box, role=role, scale=scale)


LAYOUTS = {
    "disjoint": [subj("dog", (0.04, 0.30, 0.50, 0.95)), subj("cat", (0.52, 0.38, 0.96, 0.95), scale=0.7)],
    "attribute_inside": [subj("dog", (0.15, 0.15, 0.85, 0.98)), subj("glasses", (0.30, 0.22, 0.70, 0.42), "attribute", 1.3)],
    "background_and_overlap": [
        subj("scene", (0, 0, 1, 1), "background", 0.5), subj("a", (0.1, 0.1, 0.6, 0.9)), subj("b", (0.4, 0.2, 0.9, 0.8), scale=0.8)],
    "c11": [
        subj("dog", (0.04, 0.22, 0.56, 0.96)), subj("glasses", (0.14, 0.28, 0.44, 0.44), "attribute"),
        subj("backpack", (0.36, 0.45, 0.62, 0.82), "attribute"), subj("poop", (0.64, 0.62, 0.80, 0.92)),
        subj("red", (0.80, 0.20, 1.00, 0.92), scale=0.6)],
}
GRIDS = [(8, 8), (4, 4), (3, 5), (7, 2), (1, 1)]


def random_inputs(n, L, tokens=(4, 16), B=2, H=2, D=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=dtype)
    ks = [torch.randn(B, H, tokens[j % len(tokens)], D, generator=g, dtype=dtype) for j in range(n)]
    vs = [torch.randn(B, H, tokens[j % len(tokens)], D, generator=g, dtype=dtype) for j in range(n)]
    return q, ks, vs


@pytest.fixture(autouse=True)
def _quiet_layout_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayoutWarning)  # coarse grids hide small subjects, on purpose here
        yield


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_every_mode_matches_its_equation(mode, grid, case):
    subjects = LAYOUTS[case]
    layout = Layout(subjects)
    q, ks, vs = random_inputs(len(subjects), grid[0] * grid[1])
    got = image_attention(q, ks, vs, layout, grid, mode)
    want = oracle(mode, q, ks, vs, subjects, grid, [s.scale for s in subjects])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_explicit_scales_override_subject_scales():
    subjects = LAYOUTS["disjoint"]
    q, ks, vs = random_inputs(2, 16)
    got = image_attention(q, ks, vs, Layout(subjects), (4, 4), "fused", scales=[2.0, 0.0])
    torch.testing.assert_close(got, oracle("fused", q, ks, vs, subjects, (4, 4), [2.0, 0.0]))


def test_softmax_scale_is_used():
    subjects = LAYOUTS["disjoint"]
    q, ks, vs = random_inputs(2, 16)
    # scaling q by 2 is the same as doubling the logits' factor
    got = image_attention(q, ks, vs, Layout(subjects), (4, 4), "crop_merge", softmax_scale=2 / math.sqrt(8))
    want = image_attention(2 * q, ks, vs, Layout(subjects), (4, 4), "crop_merge")
    torch.testing.assert_close(got, want)


def test_queries_outside_every_box_get_exactly_zero():
    layout = Layout([subj("a", (0, 0, 0.5, 0.5))])
    q, ks, vs = random_inputs(1, 16, dtype=torch.float32)
    for mode in ("fused", "crop_merge", "masked_sum"):
        out = image_attention(q, ks, vs, layout, (4, 4), mode).view(2, 2, 4, 4, 8)
        assert torch.count_nonzero(out[:, :, 2:]) == 0 and torch.count_nonzero(out[:, :, :, 2:]) == 0
        assert torch.count_nonzero(out[:, :, :2, :2]) > 0


# --- fused == crop_merge, and where crop_merge and masked_sum agree ------------------------------------

coord = st.integers(0, 16).map(lambda i: i / 16)


@st.composite
def layouts(draw, max_subjects=6):
    n = draw(st.integers(1, max_subjects))
    subjects = []
    for i in range(n):
        x0, x1 = sorted(draw(st.lists(coord, min_size=2, max_size=2, unique=True)))
        y0, y1 = sorted(draw(st.lists(coord, min_size=2, max_size=2, unique=True)))
        role = draw(st.sampled_from(sorted(ROLE_RANK)))
        scale = draw(st.floats(0.0, 2.0))
        subjects.append(subj(f"s{i}", (x0, y0, x1, y1), role, scale))
    return subjects


@settings(max_examples=80, deadline=None)
@given(subjects=layouts(), h=st.integers(1, 12), w=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_fused_equals_crop_merge(subjects, h, w, seed):
    layout = Layout(subjects)
    q, ks, vs = random_inputs(len(subjects), h * w, tokens=(4, 16, 1), dtype=torch.float32, seed=seed)
    fused = image_attention(q, ks, vs, layout, (h, w), "fused")
    literal = image_attention(q, ks, vs, layout, (h, w), "crop_merge")
    torch.testing.assert_close(fused, literal, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(subjects=layouts(), h=st.integers(1, 12), w=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_crop_merge_equals_masked_sum_exactly_where_boxes_do_not_overlap(subjects, h, w, seed):
    """The ablation w/o crop-and-merge differs from the full method only on tokens two boxes share."""
    layout = Layout(subjects)
    q, ks, vs = random_inputs(len(subjects), h * w, dtype=torch.float64, seed=seed)
    full = image_attention(q, ks, vs, layout, (h, w), "crop_merge")
    ablation = image_attention(q, ks, vs, layout, (h, w), "masked_sum")
    single = (layout.box_masks(h, w).sum(0) <= 1).flatten()
    torch.testing.assert_close(full[:, :, single], ablation[:, :, single], rtol=1e-10, atol=1e-10)
    if layout.overlap_share(h, w) == 0:
        torch.testing.assert_close(full, ablation, rtol=1e-10, atol=1e-10)


def test_crop_merge_and_masked_sum_differ_on_overlaps():
    subjects = LAYOUTS["attribute_inside"]
    q, ks, vs = random_inputs(2, 64)
    full = image_attention(q, ks, vs, Layout(subjects), (8, 8), "crop_merge")
    ablation = image_attention(q, ks, vs, Layout(subjects), (8, 8), "masked_sum")
    assert not torch.allclose(full, ablation)


# --- errors ----------------------------------------------------------------------------------------

def test_input_errors_are_clear():
    layout = Layout(LAYOUTS["disjoint"])
    q, ks, vs = random_inputs(2, 16)
    with pytest.raises(ValueError, match="unknown attention mode 'crop'"):
        image_attention(q, ks, vs, layout, (4, 4), "crop")
    with pytest.raises(ValueError, match="grid 3x3 has 9 tokens but q has 16 queries"):
        image_attention(q, ks, vs, layout, (3, 3))
    with pytest.raises(ValueError, match="keys for 1 subjects but the layout has 2"):
        image_attention(q, ks[:1], vs[:1], layout, (4, 4))
    with pytest.raises(ValueError, match="got 3 scales for 2 subjects"):
        image_attention(q, ks, vs, layout, (4, 4), scales=[1, 1, 1])
