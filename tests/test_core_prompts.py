"""BackgroundPromptRegistry: the facts each preset encodes, editing, JSON, errors."""

from __future__ import annotations

import pytest

import clims_loss as cl
from clims_loss import BackgroundPromptRegistry, LossWeights


def test_voc_preset_is_the_papers_text() -> None:
    voc = BackgroundPromptRegistry.preset("voc")
    assert voc.num_classes == 20 and voc.template == "a photo of {}."
    assert voc.backgrounds_for("train") == ("railroad", "railway", "tree")
    assert voc.backgrounds_for("boat") == ("river", "sea", "lake")
    assert voc.backgrounds_for("cat") == ()
    assert voc.weights == LossWeights(10.0, 25.0, 29.5, 1.15)
    assert voc.masking == "pixel" and voc.cbs_threshold is None


def test_camera_ready_preset() -> None:
    cr = BackgroundPromptRegistry.preset("voc-camera-ready")
    assert cr.class_names == cl.VOC_CLASSES and cr.template == "a photo of {}"
    assert cr.backgrounds_for("boat") == ("river", "water", "lake", "sea", "building")
    assert cr.backgrounds_for("train") == ("railroad", "railway", "branches", "tree")
    assert cr.background_prompts()[0] == "a photo of river"
    assert cr.weights == LossWeights(10.0, 25.0, 29.5, 1.15)
    assert cr.pair_weights()[cr.class_index("chair")] == 3.0
    assert cr.pair_weights()[cr.class_index("diningtable")] == 3.0
    assert cr.pair_weights()[cr.class_index("sofa")] == 3.0
    assert sum(cr.pair_weights()) == 20 + 3 * 2
    assert (cr.cbs_prompt_reduction, cr.cbs_reduction, cr.pair_reduction) == ("mean", "sum", "mean")
    assert cr.masking == "pass_through" and cr.cbs_threshold is None


def test_official_improved_preset() -> None:
    official = BackgroundPromptRegistry.preset("voc-official")
    assert official.class_names[14] == "player" and official.class_names[10] == "dining table"
    assert official.background_prompts() == [
        f"a photo of {t}."
        for t in ("tree", "river", "sea", "lake", "water", "railway", "railroad", "track", "stone", "rocks")
    ]
    # One global list: every class suppresses every background prompt.
    assert all(all(row) for row in official.background_mask())
    assert official.weights == LossWeights(10.0, 24.0, 1.0, 0.2)
    assert official.cbs_threshold == 0.26
    assert (official.cbs_prompt_reduction, official.cbs_reduction) == ("sum", "sum")
    assert official.masking == "pass_through" and set(official.pair_weights()) == {1.0}
    assert not official.reg_positive_only


def test_coco_preset() -> None:
    coco = BackgroundPromptRegistry.preset("coco")
    assert coco.num_classes == 80 and coco.class_names[0] == "player"
    assert len(coco.background_terms()) == 88 and "runway" in coco.global_backgrounds
    assert coco.weights == LossWeights(2.0, 14.0, 1.25, 0.2) and coco.cbs_threshold == 0.285


def test_background_mask_matches_backgrounds_for() -> None:
    voc = BackgroundPromptRegistry.preset("voc")
    terms = voc.background_terms()
    for name, row in zip(voc.class_names, voc.background_mask(), strict=True):
        assert [t for t, on in zip(terms, row, strict=True) if on] == list(voc.backgrounds_for(name))


def test_global_and_class_specific_backgrounds_combine() -> None:
    mixed = BackgroundPromptRegistry(
        name="mixed",
        class_names=("boat", "cat"),
        global_backgrounds=("sky",),
        class_backgrounds={"boat": ("water", "sky")},
    )
    assert mixed.backgrounds_for("boat") == ("sky", "water")
    assert mixed.background_terms() == ["sky", "water"]
    assert mixed.background_mask() == [[True, True], [True, False]]


def test_register_and_unknown_names() -> None:
    custom = BackgroundPromptRegistry(
        name="mine", class_names=("a", "b"), class_backgrounds={"a": ("grass",)}
    )
    BackgroundPromptRegistry.register("test-mine", custom)
    assert BackgroundPromptRegistry.preset("test-mine") == custom
    assert "test-mine" in BackgroundPromptRegistry.available_presets()
    with pytest.raises(ValueError, match="already registered"):
        BackgroundPromptRegistry.register("test-mine", custom)
    BackgroundPromptRegistry.register("test-mine", lambda: custom.replace(name="again"), overwrite=True)
    assert BackgroundPromptRegistry.preset("test-mine").name == "again"
    with pytest.raises(
        KeyError, match=r"unknown preset 'pascal'; known presets: coco, test-mine, (toy, )?voc"
    ):
        BackgroundPromptRegistry.preset("pascal")
    with pytest.raises(KeyError, match=r"unknown class 'ship'; known classes: .*boat"):
        BackgroundPromptRegistry.preset("voc").backgrounds_for("ship")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(class_names=()), r"at least one class name"),
        (dict(class_names=("a", "a")), r"unique class_names, got duplicates \['a'\]"),
        (dict(template="a photo"), r"template to contain one '\{\}' placeholder"),
        (dict(class_backgrounds={"ship": ("sea",)}), r"unknown class 'ship'; known classes: a, b"),
        (dict(class_weights={"z": 3.0}), r"unknown class 'z'"),
        (dict(cbs_reduction="max"), r"cbs_reduction to be one of"),
        (dict(masking="raw"), r"masking to be one of"),
        (dict(eps=0.6), r"eps in \(0, 0.5\)"),
    ],
)
def test_invalid_registries_raise(fields: dict, message: str) -> None:  # type: ignore[type-arg]
    arguments = dict(name="x", class_names=("a", "b"))
    arguments.update(fields)
    with pytest.raises((ValueError, KeyError), match=message):
        BackgroundPromptRegistry(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize("preset", ["voc", "voc-camera-ready", "voc-official", "coco"])
def test_json_round_trip(preset: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    registry = BackgroundPromptRegistry.preset(preset)
    assert BackgroundPromptRegistry.from_json(registry.to_json()) == registry
    path = tmp_path / "registry.json"
    registry.to_json(path)
    assert BackgroundPromptRegistry.from_json(path) == registry


def test_json_with_unknown_field_names_them() -> None:
    with pytest.raises(KeyError, match=r"unknown registry fields \['colour'\]"):
        BackgroundPromptRegistry.from_json('{"name": "x", "class_names": ["a"], "colour": 1}')
