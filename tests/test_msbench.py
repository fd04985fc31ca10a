"""MS-Bench as a benchmark: the enumeration against the published counts, samples from the definitions,
roles, the subjects that own no token, the config hook, the fetch script's parser, the published rows,
and a tiny end-to-end run of msbench_small."""

import importlib.util
import json
import logging
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from anyms.benchmark import msbench
from anyms.benchmark import BenchmarkConfigError, load_combinations, parse_seeds
from eval.published import BENCHMARK_IDS, SECTION_TITLE, benchmark_of, published_markdown, published_rows

from .conftest import REPO


def msbench_root() -> Path | None:
    """The data root holding msbench/msbench.json: ANYMS_DATA_ROOT, else ../shared (conftest's pattern)."""
    root = os.environ.get("ANYMS_DATA_ROOT")
    if root and (Path(root) / "msbench" / "msbench.json").is_file():
        return Path(root)
    shared = REPO.parent / "shared"
    return shared if (shared / "msbench" / "msbench.json").is_file() else None


ROOT = msbench_root()
needs_msbench = pytest.mark.skipif(ROOT is None, reason="needs MS-Bench (ANYMS_DATA_ROOT or ../shared with msbench/)")

# per combination type: (combinations, samples) of the full 40-subject list and of the public copy (no cat1)
FULL = {"living_living": (45, 270), "living_object": (100, 600), "object_object": (45, 270),
        "living_upwearing": (50, 300), "living_midwearing": (60, 360), "living_wholewearing": (20, 120),
        "midwearing_downwearing": (18, 108), "living_scene": (40, 40), "object_scene": (40, 40),
        "living_living_living": (120, 720), "object_object_object": (120, 720), "living_object_scene": (400, 400),
        "upwearing_midwearing_downwearing": (90, 540)}
PUBLIC = {"living_living": (36, 216), "living_object": (90, 540), "object_object": (45, 270),
          "living_upwearing": (45, 270), "living_midwearing": (54, 324), "living_wholewearing": (18, 108),
          "midwearing_downwearing": (18, 108), "living_scene": (36, 36), "object_scene": (40, 40),
          "living_living_living": (84, 504), "object_object_object": (120, 720), "living_object_scene": (360, 360),
          "upwearing_midwearing_downwearing": (90, 540)}
ID = re.compile(r"^(?P<type>[a-z_]+)-(?P<subjects>.+)-p(?P<k>\d+)$")


@pytest.fixture(scope="module")
def definitions():
    if ROOT is None:
        pytest.skip("needs MS-Bench definitions")
    return msbench.load_definitions(ROOT)


@pytest.fixture(scope="module")
def generated():
    if ROOT is None:
        pytest.skip("needs MS-Bench")
    return msbench.combinations(ROOT)


def public_samples(definitions):
    return msbench.samples(definitions, msbench.by_type(msbench.subject_types(definitions, ROOT),
                                                        msbench.available_subjects(definitions, ROOT)))


# --- enumeration --------------------------------------------------------------------------------------

@needs_msbench
def test_the_full_list_gives_the_published_counts_and_the_public_copy_its_own(definitions):
    assert set(definitions["data_class_dict"]) == set(msbench.SUBJECT_TYPES)  # 40 subjects, each with a type
    full = msbench.counts(msbench.full_samples(definitions))
    assert (full["combinations"], full["samples"]) == (msbench.PUBLISHED_COMBINATIONS, msbench.PUBLISHED_SAMPLES) == (1148, 4488)
    assert {t: (c["combinations"], c["samples"]) for t, c in full["per_type"].items()} == FULL

    available = msbench.available_subjects(definitions, ROOT)
    assert sorted(set(definitions["data_class_dict"]) - set(available)) == ["cat1"]  # the public copy's gap
    public = msbench.counts(public_samples(definitions))
    assert (public["combinations"], public["samples"]) == (1036, 4036)
    assert {t: (c["combinations"], c["samples"]) for t, c in public["per_type"].items()} == PUBLIC


@needs_msbench
def test_every_sample_comes_from_the_definitions_in_a_fixed_order(definitions, generated):
    classes = definitions["data_class_dict"]
    types = msbench.subject_types(definitions, ROOT)
    assert len(generated) == 4036 and list(generated) == list(msbench.combinations(ROOT))  # deterministic
    templates_seen: dict = {}
    for cid, spec in generated.items():
        m = ID.match(cid)
        assert m and "/" not in cid and not re.search(r"\s", cid), cid  # usable as a folder name
        ctype, names, k = m["type"], m["subjects"].split("+"), int(m["k"])
        assert [types[n] for n in names] == ctype.split("_"), cid
        assert [s["name"] for s in spec["subjects"]] == names
        phrases = [classes[n] for n in names]
        assert [s["phrase"] for s in spec["subjects"]] == phrases
        assert spec["prompt"] == definitions["subject_combination_prompts"][ctype][k].format(*phrases)
        assert spec["boxes"] == definitions["subject_combination_boxes"][ctype]
        for s in spec["subjects"]:
            assert s["image"].startswith(f"msbench/{types[s['name']]}/{s['name']}") and (ROOT / s["image"]).exists()
        templates_seen.setdefault((ctype, tuple(names)), set()).add(k)
    # every template of every subject combination, and repeated data types unordered without repetition
    for (ctype, names), ks in templates_seen.items():
        assert ks == set(range(len(definitions["subject_combination_prompts"][ctype])))
        assert len(set(names)) == len(names)
    pairs = [names for (ctype, names) in templates_seen if ctype == "living_living"]
    assert len({frozenset(p) for p in pairs}) == len(pairs)
    # order: combination types as defined, subjects in data_class_dict order
    order = list(dict.fromkeys(ID.match(c)["type"] for c in generated))
    assert order == msbench.combination_types(definitions)
    assert list(generated)[:2] == ["living_living-cat+cat2-p0", "living_living-cat+cat2-p1"]


@needs_msbench
def test_roles_come_from_the_data_types(generated):
    expected = {"living": "object", "object": "object", "scene": "background", "upwearing": "attribute",
                "midwearing": "attribute", "downwearing": "attribute", "wholewearing": "attribute"}
    assert msbench.ROLES == expected
    seen = set()
    for spec in generated.values():
        for s in spec["subjects"]:
            data_type = s["image"].split("/")[1]
            assert s["role"] == expected[data_type]
            seen.add((data_type, s["role"]))
    assert seen == set(expected.items())


def test_subject_tuples_cross_types_and_leave_repeated_types_unordered():
    by_type = {"living": ["a", "b", "c"], "object": ["x", "y"], "scene": ["s"]}
    assert msbench.subject_tuples("living_living", by_type) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert msbench.subject_tuples("living_object_scene", by_type) == [
        ("a", "x", "s"), ("a", "y", "s"), ("b", "x", "s"), ("b", "y", "s"), ("c", "x", "s"), ("c", "y", "s")]
    assert msbench.subject_tuples("living_living_living", by_type) == [("a", "b", "c")]


# --- subjects that own no token -----------------------------------------------------------------------

@needs_msbench
def test_the_nested_box_samples_are_reported_with_their_living_subject(definitions):
    public = public_samples(definitions)
    report = msbench.no_token_report(public, grids=((32, 32),))  # SDXL's coarsest cross-attention grid at 1024 px
    nested = {s.id: s for s in public if s.combination_type in ("living_midwearing", "living_wholewearing")}
    assert {r.sample for r in report} == set(nested) and len(nested) == 324 + 108
    for r in report:
        sample = nested[r.sample]
        assert r.subjects == (sample.subjects[0],)  # the living subject, covered by the wearable (attribute)
        assert "own no token at the 32x32 grid" in r.warning and repr(sample.subjects[0]) in r.warning
    full = msbench.no_token_report(msbench.full_samples(definitions), grids=((32, 32),))
    assert len({r.sample for r in full}) == 360 + 120
    # the finer SDXL grid loses the same subjects: identical or nested boxes stay so at every grid
    few = [s for s in public if s.template_index == 0][:400]
    assert {r.sample for r in msbench.no_token_report(few, grids=((64, 64),))} == \
        {s.id for s in few if s.id in nested}


@needs_msbench
def test_the_summary_states_both_counts_and_the_no_token_samples(capsys):
    msbench.main(["--data-root", str(ROOT)])
    text = capsys.readouterr().out
    assert "1148 combinations, 4488 samples" in text and "1036 combinations, 4036 samples" in text
    assert "missing ['cat1']" in text and "432 of 4036 samples" in text
    assert "living_midwearing: 324 samples" in text and "living_wholewearing: 108 samples" in text


# --- the config hook ----------------------------------------------------------------------------------

def compose(*overrides, data=None):
    from .test_generate import make_cfg

    return make_cfg("/tmp/unused-run-dir", *overrides, data=data or ROOT)


@needs_msbench
def test_msbench_small_composes_and_loads_one_sample_per_type():
    cfg = compose("benchmark=msbench_small")
    # MS-Diffusion's protocol: five images per sample (its appendix C)
    assert cfg.benchmark.name == "msbench_small" and parse_seeds(cfg.benchmark.seeds) == [0, 1, 2, 3, 4]
    assert parse_seeds(compose("benchmark=msbench").benchmark.seeds) == [0, 1, 2, 3, 4]
    combos = load_combinations(cfg.benchmark, ROOT)
    types = [ID.match(c.id)["type"] for c in combos]
    assert types == msbench.combination_types(msbench.load_definitions(ROOT))  # 13, one each, in order
    assert all(c.id.endswith("-p0") for c in combos)
    by_id = {c.id: c for c in combos}
    lws = by_id["living_wholewearing-cat+dress-p0"]
    assert [s.role for s in lws.layout] == ["object", "attribute"] and lws.prompt == "a cat wearing a dress in a room"
    assert lws.references[1][0] == ROOT / "msbench" / "wholewearing" / "dress.jpg"
    assert [s.role for s in by_id["living_object_scene-cat+backpack+forest-p0"].layout] == ["object", "object", "background"]


@needs_msbench
def test_msbench_loads_every_sample_and_missing_subjects_are_skipped_or_named():
    cfg = compose("benchmark=msbench")
    combos = load_combinations(cfg.benchmark, ROOT)
    assert len(combos) == 4036 and not any("cat1" in c.id for c in combos)
    cfg = compose("benchmark=msbench", "benchmark.generator.missing=error",
                  "benchmark.generator.types=[living_living]")
    with pytest.raises(BenchmarkConfigError, match=r"living_living-.*cat1.*subjects\[\d\]\.image: .*cat1 does not exist"):
        load_combinations(cfg.benchmark, ROOT)
    cfg = compose("benchmark=msbench", "benchmark.only=[object_scene-teapot+barn-p0,living_object-dog5+lantern-p3]")
    assert [c.id for c in load_combinations(cfg.benchmark, ROOT)] == ["object_scene-teapot+barn-p0", "living_object-dog5+lantern-p3"]


def test_the_hook_names_bad_generators(tmp_path):
    from omegaconf import OmegaConf

    both = OmegaConf.create({"name": "x", "combinations": {"c": {}}, "generator": {"_target_": "anyms.benchmark.msbench.combinations"}})
    with pytest.raises(BenchmarkConfigError, match="either combinations or generator"):
        load_combinations(both, tmp_path)
    with pytest.raises(BenchmarkConfigError, match="cannot import anyms.nowhere.f"):
        load_combinations({"name": "x", "generator": {"_target_": "anyms.nowhere.f"}}, tmp_path)
    with pytest.raises(BenchmarkConfigError, match=r"msbench.json does not exist.*fetch_data.py --dataset msbench"):
        load_combinations({"name": "x", "generator": {"_target_": "anyms.benchmark.msbench.combinations"}}, tmp_path)


def test_a_data_root_of_only_definitions_skips_everything_or_names_the_images(tmp_path):
    definitions = {
        "data_class_dict": {"dog": "dog", "cap": "cap", "hat": "hat"},
        "two_subject_combinations": ["living_upwearing"], "three_subject_combinations": [],
        "subject_combination_boxes": {"living_upwearing": [[0.25, 0.25, 0.75, 0.75], [0.25, 0.0, 0.75, 0.25]]},
        "subject_combination_prompts": {"living_upwearing": ["a {0} wearing a {1}"]},
    }
    (tmp_path / "msbench" / "living").mkdir(parents=True)
    (tmp_path / "msbench" / "msbench.json").write_text(json.dumps(definitions))
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "msbench" / "living" / "dog.png")
    (tmp_path / "msbench" / "upwearing" / "hat").mkdir(parents=True)  # a folder of references works too
    Image.new("RGB", (8, 8)).save(tmp_path / "msbench" / "upwearing" / "hat" / "0.jpg")
    combos = msbench.combinations(tmp_path)
    assert list(combos) == ["living_upwearing-dog+hat-p0"]  # cap has no image: skipped
    assert combos["living_upwearing-dog+hat-p0"]["subjects"][1]["image"] == "msbench/upwearing/hat"
    assert list(msbench.combinations(tmp_path, missing="error")) == ["living_upwearing-dog+cap-p0", "living_upwearing-dog+hat-p0"]


# --- the fetch script ---------------------------------------------------------------------------------

def test_the_fetch_script_reads_the_definitions_module_without_running_it():
    spec = importlib.util.spec_from_file_location("fetch_data", REPO / "scripts" / "fetch_data.py")
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    assert fetch.DATASETS["msbench"]["repo"] == "https://github.com/MS-Diffusion/MS-Diffusion.git"
    assert fetch.MSBENCH_IMAGES == "msbench" and fetch.MSBENCH_DEFINITIONS.endswith("prompts/msbench.py")
    source = (
        "import os\n"
        "classes = {'dog': 'dog', 'cap': 'cap'}\n"
        "pair_prompts = ['a {0} wearing a {1}', 'a {0} wearing a {1} on the beach']\n"
        "prompts = {'living_upwearing': pair_prompts}\n"
        "boxes = {'living_upwearing': [[0.25, 0.25, 0.75, 0.75], [0.25, 0., 0.75, 0.25]]}\n"
        "computed = os.getcwd()\n"  # not a literal: left out, never run
    )
    found = fetch.literal_assignments(source)
    assert found["prompts"] == {"living_upwearing": ["a {0} wearing a {1}", "a {0} wearing a {1} on the beach"]}
    assert found["boxes"]["living_upwearing"][1] == [0.25, 0.0, 0.75, 0.25] and "computed" not in found


# --- published rows -----------------------------------------------------------------------------------

def test_published_rows_are_data_with_their_source_and_marked_published():
    rows = published_rows("msbench")
    assert [r["method"] for r in rows] == ["MS-Diffusion", "SSR-Encoder", "lambda-ECLIPSE"]
    values = {r["method"]: (r["clip_i"], r["dino"], r["m_dino"], r["clip_t"]) for r in rows}
    assert values == {"MS-Diffusion": (0.698, 0.425, 0.108, 0.341), "SSR-Encoder": (0.725, 0.425, 0.107, 0.303),
                      "lambda-ECLIPSE": (0.724, 0.419, 0.094, 0.316)}
    assert all(r["published"] and "2406.07209" in r["source"] and r["scale"] == 1.0 and r["base_model"] for r in rows)
    md = published_markdown("msbench")
    assert md.startswith(f"## {SECTION_TITLE}") and "| MS-Diffusion (published) | 69.8 [0.698] | 42.5 [0.425] | 10.8 [0.108] | 34.1 [0.341] |" in md
    assert "0-1 scale" in md and "M-DINO" in md
    assert published_markdown(None) == "" and published_rows("msbench", table="table2") == []


@needs_msbench
def test_the_report_recognises_msbench_runs_by_their_ids(generated):
    assert all(BENCHMARK_IDS["msbench"].match(c) for c in generated)
    assert benchmark_of(generated) == "msbench" and benchmark_of(["c01", "c02"]) == "anyms11"
    assert benchmark_of(["c01", next(iter(generated))]) is None and benchmark_of([]) is None


# --- end to end on the tiny models --------------------------------------------------------------------

@needs_msbench
def test_msbench_small_generates_evaluates_and_reports_with_m_dino_and_published_rows(tmp_path, tiny_root, tiny_eval_root,
                                                                                      caplog):
    from anyms.generation.generate import run_generation
    from eval.evaluate import EvaluationError, run_evaluation
    from eval.report import run_report

    from .test_evaluate import eval_cfg
    from .test_generate import make_cfg

    run = tmp_path / "run"
    only = "benchmark.only=[living_wholewearing-cat+dress-p0,living_object_scene-cat+backpack+forest-p0]"
    with caplog.at_level(logging.WARNING, logger="anyms.generation.generate"):
        summary = run_generation(make_cfg(run, "benchmark=msbench_small", only, "benchmark.seeds=[0]",
                                          tiny_root=tiny_root, data=ROOT))
    # the nested boxes, at the tiny model's grids: the stage logs the core's LayoutWarning, naming the combination
    assert any(re.match(r"living_\S+-cat\+\S+: subject\(s\) \['cat'\] own no token", r.getMessage()) for r in caplog.records)
    assert sorted(summary.generated) == ["images/anyms/living_object_scene-cat+backpack+forest-p0/0.png",
                                         "images/anyms/living_wholewearing-cat+dress-p0/0.png"]
    with pytest.raises(EvaluationError, match=r"records of benchmark msbench_small .*use eval=msbench"):
        run_evaluation(eval_cfg(run, tiny_root=tiny_eval_root))  # the AnyMS protocol (DINOv2) on MS-Bench
    run_evaluation(eval_cfg(run, tiny_root=tiny_eval_root, protocol="tiny_msbench"))
    assert "DINO v1" in (run / "eval_config.json").read_text() or "dino-vits16" in (run / "eval_config.json").read_text()
    m = pd.read_parquet(run / "metrics.parquet")
    assert len(m) == 2 + 3 and not m[["clip_i", "dino", "m_dino", "clip_t"]].isna().any().any()
    # the forest scene spans the whole image: left out of the layout metrics, counted
    scene = m[m["phrase"] == "forest"]
    assert len(scene) == 1 and not scene["in_layout"].iloc[0] and scene["iou"].isna().all()
    run_report([run], run / "report", {"samples": 10, "ap_samples": 2, "seed": 0})
    table1 = (run / "report" / "table1.md").read_text()
    measured, published = table1.split(f"## {SECTION_TITLE}")
    assert "1 full-frame scene subject(s) (of 5) are left out of mIoU and AP50" in measured
    header = next(line for line in measured.splitlines() if line.startswith("| Method"))
    cells = [c.strip() for c in header.split("|")]  # pandas' to_markdown pads the cells
    assert "M-DINO" in cells and "CLIP-I" in cells and "mIoU" in cells
    assert re.search(r"\| anyms +\|", measured) and "(published)" not in measured
    assert "| MS-Diffusion (published) |" in published and "| anyms |" not in published
    csv = pd.read_csv(run / "report" / "table1.csv")
    assert list(csv["method"]) == ["anyms"] and "m_dino" in csv  # published rows never in our numbers


def test_the_anyms_papers_published_rows_as_printed():
    """AnyMS, arXiv 2512.23537, Tables 1-3 (issue 15, item 9): kept as data, shown as printed, marked published."""
    from eval.published import published_markdown, published_rows

    rows = {r["method"]: r for r in published_rows("anyms11")}
    assert list(rows) == ["LatexBlend", "Cones 2", "MuDI", "MS-Diffusion", "AnyMS"]
    assert (rows["AnyMS"]["ap50"], rows["AnyMS"]["iou"], rows["AnyMS"]["clip_i"], rows["AnyMS"]["dreamsim"],
            rows["AnyMS"]["dino"], rows["AnyMS"]["clip_t"]) == (35.65, 49.75, 74.46, 59.62, 54.64, 35.82)
    assert rows["LatexBlend"]["ap50"] is None and rows["Cones 2"]["seconds"] == 108
    md = published_markdown("anyms11")
    assert "| AnyMS (published) | 35.65 | 49.75 | 74.46 | 59.62 | 54.64 | 35.82 | 19 | 11 |" in md
    assert "not ours" in md and "arXiv:2512.23537" in md
    table2 = {r["method"]: r for r in published_rows("anyms11", table="table2")}
    assert table2["w/o crop and merge"]["iou"] == 38.78 and table2["w/o local decoupling"]["iou"] is None
    table3 = {r["method"]: r for r in published_rows("anyms11", table="table3")}
    assert table3["AnyMS"]["overall_quality"] == 0.72
    assert sum(r["concept_alignment"] for r in table3.values()) == pytest.approx(1.0)
