import math
import warnings
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anyms.core.layout import Layout, LayoutError, LayoutWarning, Subject, grid_for, grid_levels


def subject(name, box, **kw):
    return Subject(name=name, phrase=kw.pop("phrase", name), image=None, box=box, **kw)


def test_box_masks_follow_floor_ceil_rule():
    lay = Layout([subject("a", (0.1, 0.2, 0.55, 0.9))])
    m = lay.box_masks(4, 4)[0]
    # rows floor(0.8)=0 .. ceil(3.6)=4, cols floor(0.4)=0 .. ceil(2.2)=3
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0:4, 0:3] = True
    assert torch.equal(m, expected)
    # at 10x20: rows 2..9, cols 2..11
    m = lay.box_masks(10, 20)[0]
    assert m.nonzero()[:, 0].unique().tolist() == list(range(2, 9))
    assert m.nonzero()[:, 1].unique().tolist() == list(range(2, 11))


def test_box_edges_on_the_grid_are_not_widened_by_float_error():
    # 0.7 * 10 = 7.000000000000001 in floating point: the box must still end at column 7
    lay = Layout([subject("a", (0.3, 0.0, 0.7, 1.0))])
    cols = lay.box_masks(1, 10)[0, 0].nonzero().flatten().tolist()
    assert cols == [3, 4, 5, 6]


def test_tiny_box_keeps_a_token_at_every_grid():
    lay = Layout([subject("a", (0.5, 0.5, 0.5001, 0.5001))])
    for h, w in [(128, 128), (16, 16), (2, 2), (1, 1), (3, 5)]:
        assert lay.box_masks(h, w)[0].sum() == 1


def test_owner_map_outside_every_box_is_minus_one():
    lay = Layout([subject("a", (0.0, 0.0, 0.5, 0.5))])
    owner = lay.owner_map(4, 4)
    assert (owner[:2, :2] == 0).all()
    assert (owner[2:, :] == -1).all() and (owner[:, 2:] == -1).all()


def test_attribute_beats_object_and_object_beats_background():
    lay = Layout([
        subject("scene", (0, 0, 1, 1), role="background"),
        subject("dog", (0.0, 0.0, 0.75, 1.0)),
        subject("glasses", (0.25, 0.25, 0.5, 0.5), role="attribute"),
    ])
    owner = lay.owner_map(4, 4)
    assert owner[1, 1] == 2  # glasses over dog over scene
    assert owner[3, 0] == 1  # dog over scene
    assert owner[0, 3] == 0  # scene alone


def test_ties_go_to_the_smaller_box_then_the_earlier_subject():
    big, small = subject("big", (0, 0, 1, 1)), subject("small", (0, 0, 0.5, 0.5))
    assert Layout([big, small]).owner_map(2, 2)[0, 0] == 1
    assert Layout([small, big]).owner_map(2, 2)[0, 0] == 0
    first, second = subject("first", (0, 0, 0.5, 1)), subject("second", (0, 0, 1, 0.5))  # equal areas
    assert Layout([first, second]).owner_map(2, 2)[0, 0] == 0
    assert Layout([second, first]).owner_map(2, 2)[0, 0] == 0


def test_explicit_priority_overrides_the_role():
    lay = Layout([
        subject("glasses", (0, 0, 0.5, 0.5), role="attribute"),
        subject("dog", (0, 0, 1, 1), priority=5),
    ])
    with pytest.warns(LayoutWarning, match="'glasses'"):
        assert (lay.owner_map(4, 4) == 1).all()


def test_subject_owning_no_token_is_warned_about_by_name_and_grid():
    lay = Layout([subject("dog", (0, 0, 1, 1)), subject("shirt", (0, 0, 1, 1), role="background")])
    with pytest.warns(LayoutWarning, match=r"'shirt'.*16x8"):
        lay.owner_map(16, 8)


def test_no_warning_when_every_subject_owns_a_token():
    lay = Layout([subject("a", (0, 0, 0.5, 1)), subject("b", (0.5, 0, 1, 1))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lay.owner_map(8, 8)


def test_overlap_share():
    lay = Layout([subject("a", (0, 0, 0.5, 1)), subject("b", (0.25, 0, 1, 1))])
    assert lay.overlap_share(4, 4) == pytest.approx(4 / 16)
    assert Layout([subject("a", (0, 0, 0.5, 1))]).overlap_share(4, 4) == 0.0


@pytest.mark.parametrize(
    "latent, query_len, expected",
    [((128, 128), 128 * 128, (128, 128)), ((128, 128), 32 * 32, (32, 32)), ((8, 8), 4, (2, 2)),
     ((96, 160), 24 * 40, (24, 40)), ((9, 13), 5 * 7, (5, 7)), ((9, 13), 3 * 4, (3, 4)), ((9, 13), 1, (1, 1))],
)
def test_grid_for(latent, query_len, expected):
    assert grid_for(query_len, latent) == expected


def test_grid_levels_halve_with_ceil():
    assert grid_levels((9, 13)) == [(9, 13), (5, 7), (3, 4), (2, 2), (1, 1)]


def test_grid_for_without_a_fitting_level_says_what_the_levels_are():
    with pytest.raises(LayoutError, match=r"no UNet level of a 128x128 latent has 1000 tokens.*64x64"):
        grid_for(1000, (128, 128))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(box=(-0.1, 0, 0.5, 0.5)), r"subject 'x': box x0=-0.1 is outside \[0, 1\]"),
        (dict(box=(0, 0, 1.5, 0.5)), r"subject 'x': box x1=1.5 is outside \[0, 1\]"),
        (dict(box=(0.5, 0, 0.5, 1)), r"subject 'x': box needs x1 > x0"),
        (dict(box=(0, 0.7, 1, 0.2)), r"subject 'x': box needs y1 > y0"),
        (dict(box=(0, 0, 1)), r"subject 'x': box must be 4 numbers"),
        (dict(box=(0, float("nan"), 1, 1)), r"subject 'x': box\[1\] must be finite"),
        (dict(box=(0, 0, float("inf"), 1)), r"subject 'x': box\[2\] must be finite"),
        (dict(box=(0, 0, "a", 1)), r"subject 'x': box\[2\] must be a number"),
        (dict(box=(0, 0, 1, 1), role="hat"), r"subject 'x': unknown role 'hat'"),
        (dict(box=(0, 0, 1, 1), scale=float("nan")), r"subject 'x': scale must be finite"),
        (dict(box=(0, 0, 1, 1), priority=1.5), r"subject 'x': priority must be an integer"),
        (dict(box=(0, 0, 1, 1), phrase=""), r"subject 'x': phrase must be a non-empty string"),
    ],
)
def test_bad_subject_fields_name_the_subject_and_field(kwargs, message):
    kwargs = {"name": "x", "phrase": "x", "image": None, **kwargs}
    with pytest.raises(LayoutError, match=message):
        Subject(**kwargs)


def test_bad_layouts():
    with pytest.raises(LayoutError, match="layout is empty"):
        Layout([])
    with pytest.raises(LayoutError, match="'dog' appears twice"):
        Layout([subject("dog", (0, 0, 1, 1)), subject("dog", (0, 0, 0.5, 0.5))])
    with pytest.raises(LayoutError, match="entry 0 must be a Subject"):
        Layout([{"name": "dog"}])


def test_from_dicts_names_unknown_and_missing_fields():
    lay = Layout.from_dicts([{"name": "dog", "phrase": "dog", "box": [0, 0, 1, 1], "role": "object"}])
    assert lay[0].box == (0.0, 0.0, 1.0, 1.0)
    with pytest.raises(LayoutError, match=r"'dog': unknown field\(s\) \['colour'\]"):
        Layout.from_dicts([{"name": "dog", "phrase": "dog", "box": [0, 0, 1, 1], "colour": "red"}])
    with pytest.raises(LayoutError, match=r"'dog': missing field\(s\) \['box'\]"):
        Layout.from_dicts([{"name": "dog", "phrase": "dog"}])


def test_equal_areas_tie_exactly_and_go_to_the_earlier_subject():
    """Issue 24: (0.4 - 0.1) * 0.3 = 0.09000000000000001 but 0.3 * 0.3 = 0.09 in floating point, so the float areas
    ordered two equal boxes by one ulp and gave the overlap to the later subject; the rule gives the earlier."""
    a, b = subject("A", (0.1, 0.7, 0.4, 1.0)), subject("B", (0.0, 0.7, 0.3, 1.0))
    owner = Layout([a, b]).owner_map(10, 10)
    assert owner[7:, 1:3].unique().tolist() == [0]  # the overlap: columns 1-2 of rows 7-9 (a382e8e: [1])
    assert a.area == b.area == Fraction(9, 100)
    assert owner[7:, 0].unique().tolist() == [1] and owner[7:, 3].unique().tolist() == [0]
    # in the other order the (now earlier) B wins: the tie is broken by position alone
    assert Layout([b, a]).owner_map(10, 10)[7:, 1:3].unique().tolist() == [0]
    # a strictly smaller box still wins whatever its position
    smaller = subject("C", (0.1, 0.7, 0.4, 0.99))
    assert Layout([b, smaller]).owner_map(10, 10)[7:, 1:3].unique().tolist() == [1]


# --- property: the owner map is the priority rule applied token by token, written here independently

def _covers(box, r, c, h, w):
    x0, y0, x1, y1 = box
    return math.floor(y0 * h + 1e-9) <= r < math.ceil(y1 * h - 1e-9) and math.floor(x0 * w + 1e-9) <= c < math.ceil(x1 * w - 1e-9)


coord = st.integers(0, 20).map(lambda i: i / 20)


def _area_400ths(box):
    x0, y0, x1, y1 = (round(v * 20) for v in box)
    return (x1 - x0) * (y1 - y0)


@st.composite
def boxes(draw):
    x0, x1 = sorted(draw(st.lists(coord, min_size=2, max_size=2, unique=True)))
    y0, y1 = sorted(draw(st.lists(coord, min_size=2, max_size=2, unique=True)))
    return (x0, y0, x1, y1)


@settings(max_examples=60, deadline=None)
@given(
    bxs=st.lists(boxes(), min_size=1, max_size=5),
    roles=st.lists(st.sampled_from(["attribute", "object", "background"]), min_size=5, max_size=5),
    h=st.integers(1, 9), w=st.integers(1, 9),
)
def test_owner_map_is_the_priority_rule_token_by_token(bxs, roles, h, w):
    subs = [subject(f"s{i}", b, role=roles[i]) for i, b in enumerate(bxs)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LayoutWarning)
        owner = Layout(subs).owner_map(h, w)
    rank = {"attribute": 2, "object": 1, "background": 0}
    for r in range(h):
        for c in range(w):
            covering = [i for i, s in enumerate(subs) if _covers(s.box, r, c, h, w)]
            if not covering:
                assert owner[r, c] == -1
                continue
            # highest rank, then smallest area (exact: in 1/400ths, the coordinates being twentieths), then earliest
            best = min(covering, key=lambda i: (-rank[subs[i].role], _area_400ths(subs[i].box), i))
            assert owner[r, c] == best
