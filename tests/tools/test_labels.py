"""tools/labels.py on a tiny random SegFormer saved by transformers: the maps are the arg-max of the model's own upsampled
class scores mapped through the class table, at each image's size; the folder passes data.check; outputs are never
replaced without --overwrite; a missing model or a missing transformers is one line. The shipped mappings cover
their datasets' label sets."""

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from data import DataError
from tools import labels

# a few Cityscapes names, in another order than Cityscapes' train ids (so the mapping has to do something)
ID2LABEL = {0: "road", 1: "sky", 2: "person", 3: "car", 4: "vegetation"}
PROJECT_ID = [0, 10, 11, 13, 8]  # their Cityscapes train ids: what labels.py must write


@pytest.fixture(scope="module")
def segformer(tmp_path_factory):
    """A randomly initialised SegFormer with its image processor, as transformers saves them."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor
    folder = tmp_path_factory.mktemp("segformer")
    config = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                             patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 1], mlp_ratios=[2, 2],
                             decoder_hidden_size=16, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()})
    torch.manual_seed(0)
    SegformerForSemanticSegmentation(config).save_pretrained(folder)  # model.safetensors + config.json
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def rgb_ir_folder(root, sizes=((48, 64), (32, 48), (64, 32))):
    """An importer's output for a set without labels: rgb/ and ir/ (no sem/ yet)."""
    rng = np.random.default_rng(0)
    for d in ("rgb", "ir"):
        (root / d).mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
        # smooth colour fields, so the random model's arg-max varies over the image
        yy, xx = np.mgrid[0:h, 0:w]
        rgb = np.stack([(xx * 255 // w), (yy * 255 // h), rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "rgb" / f"{i:03d}.png")
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(root / "ir" / f"{i:03d}.png")
    return root


def reference_ids(folder, image: np.ndarray) -> np.ndarray:
    """The model's own class scores for the image, upsampled bilinearly to its size, arg-max, mapped."""
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor
    model = SegformerForSemanticSegmentation.from_pretrained(folder).eval()
    processor = SegformerImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        logits = model(**processor(images=[image], return_tensors="pt")).logits  # [1, 5, h/4, w/4]
    up = F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
    return np.array(PROJECT_ID)[up[0].argmax(0).numpy()]


def test_maps_are_the_mapped_argmax_of_the_upsampled_logits_at_image_size(tmp_path, segformer):
    src, out = rgb_ir_folder(tmp_path / "src"), tmp_path / "out"
    assert labels.label_folder(src, out, segformer) == 3
    data.check(out)  # rgb/ sem/ ir/ + classes.json: a dataset folder
    classes = data.load_classes(out / "classes.json")
    assert classes == labels.shipped_mapping("cityscapes").classes and len(classes) == 19
    assert {c.name for c in classes if c.hot} == {"person", "rider"}  # vehicles cold without --hot-vehicles
    ds = data.PairedDataset(out)
    seen = set()
    for item in ds:
        image = np.asarray(Image.open(src / "rgb" / f"{item['name']}.png"))
        expected = reference_ids(segformer, image)
        assert item["sem_ids"].shape == image.shape[:2]
        assert np.array_equal(item["sem_ids"].numpy(), expected)
        seen |= set(np.unique(expected).tolist())
    assert len(seen) >= 2  # the comparison covers more than one class


def test_outputs_are_never_replaced_without_overwrite_and_labelling_in_place_works(tmp_path, segformer):
    src = rgb_ir_folder(tmp_path / "src", sizes=((32, 32),))
    assert labels.label_folder(src, src, segformer) == 1  # OUT = SRC: sem/ + classes.json added in place
    data.check(src)
    sem = src / "sem" / "000.png"
    before = sem.read_bytes()
    with pytest.raises(DataError, match=r"1 output file\(s\) exist already.*--overwrite"):
        labels.label_folder(src, src, segformer, hot_vehicles=True)
    assert sem.read_bytes() == before
    assert labels.label_folder(src, src, segformer, hot_vehicles=True, overwrite=True) == 1
    hot = {c.name for c in data.load_classes(src / "classes.json") if c.hot}
    assert hot == {"person", "rider", "car", "truck", "bus", "train", "motorcycle"}  # a bicycle has no engine
    assert not list(src.rglob("*.tmp"))


def one_line_error(capsys, argv):
    assert labels.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_missing_model_and_missing_transformers_are_one_line(tmp_path, segformer, capsys, monkeypatch):
    src = rgb_ir_folder(tmp_path / "src", sizes=((32, 32),))
    out = str(tmp_path / "out")
    assert "no such folder" in one_line_error(capsys, [str(src), out, "--model", str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    assert "no config.json" in one_line_error(capsys, [str(src), out, "--model", str(tmp_path / "empty")])
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((segformer / "config.json").read_text())
    assert "neither *.safetensors nor pytorch_model.bin" in one_line_error(capsys, [str(src), out, "--model",
                                                                               str(no_weights)])
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    assert "pip install transformers" in one_line_error(capsys, [str(src), out, "--model", str(segformer)])
    assert not (tmp_path / "out").exists()


def test_cli_labels_and_names_the_next_command(tmp_path, segformer, capsys):
    src = rgb_ir_folder(tmp_path / "src", sizes=((32, 32),))
    assert labels.main([str(src), str(tmp_path / "out"), "--model", str(segformer), "--mapping", "cityscapes",
                        "--device", "cpu"]) == 0
    assert f"data.py check {tmp_path / 'out'}" in capsys.readouterr().out
    data.check(tmp_path / "out")


def test_ade20k_mapping_groups_all_150_classes():
    ade = labels.shipped_mapping("ade20k")
    assert len(labels.ADE20K_LABELS) == len(set(labels.ADE20K_LABELS)) == 150
    grouped = [x for group in labels.ADE20K_GROUPS.values() for x in group]
    assert len(grouped) == len(set(grouped)) and set(grouped) <= set(labels.ADE20K_LABELS)
    # the Hugging Face configs' spellings ("bed " with a space) and ADE's long names map too
    id2label = dict(enumerate(labels.ADE20K_LABELS)) | {7: "bed ", 1: "building, edifice", 12: "Person"}
    assert labels.detect_mapping(id2label) == "ade20k"
    lut = ade.lut(id2label)
    name = {c.id: c.name for c in ade.classes}
    assert [name[lut[i]] for i in (2, 12, 20, 4, 1, 7, 126)] == ["sky", "person", "vehicle", "vegetation",
                                                                  "building", "other", "animal"]
    assert {c.name for c in ade.classes if c.hot} == {"person", "animal"}
    assert {c.name for c in labels.shipped_mapping("ade20k", hot_vehicles=True).classes if c.hot} == {
        "person", "animal", "vehicle"}


def test_cityscapes_detection_and_unknown_labels_are_named():
    assert labels.detect_mapping({0: "traffic_light", 1: "Motorcycle"}) == "cityscapes"
    with pytest.raises(DataError, match="neither Cityscapes' nor ADE20K's"):
        labels.detect_mapping({0: "road", 1: "zebra crossing"})
    with pytest.raises(DataError, match=r"1 of the model's labels are not in it: 'zebra crossing'"):
        labels.shipped_mapping("cityscapes").lut({0: "road", 1: "zebra crossing"})


def test_mapping_file(tmp_path):
    spec = {"classes": [{"id": 0, "name": "background", "color": [0, 0, 0]},
                        {"id": 5, "name": "warm", "color": [255, 0, 0], "hot": True},
                        {"id": 7, "name": "machine", "color": [0, 0, 255]}],
            "map": {"road": "background", "Person": "warm", "car": "machine"}, "vehicles": ["machine"]}
    path = tmp_path / "m.json"
    path.write_text(json.dumps(spec))
    m = labels.load_mapping(str(path))
    assert m.lut({0: "car", 1: "person", 2: "road"}).tolist() == [7, 5, 0]
    assert [c.hot for c in m.classes] == [False, True, False]
    assert [c.hot for c in labels.load_mapping(str(path), hot_vehicles=True).classes] == [False, True, True]
    path.write_text(json.dumps(spec | {"map": {"road": "tarmac"}}))
    with pytest.raises(DataError, match="tarmac: not a class"):
        labels.load_mapping(str(path))


def test_a_model_with_its_own_code_is_refused_before_transformers_reads_it(tmp_path, capsys, monkeypatch):
    """A config.json with an auto_map makes transformers ask on a terminal whether to run the folder's Python code:
    it is refused in one line instead, before transformers is asked to load anything."""
    import transformers
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda *a, **k: pytest.fail("transformers was asked to load a model with custom code"))
    src = rgb_ir_folder(tmp_path / "src", sizes=((32, 32),))
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "mysegformer",
                                                    "auto_map": {"AutoConfig": "modeling.MyConfig"}}))
    err = one_line_error(capsys, [str(src), str(tmp_path / "out"), "--model", str(custom)])
    assert f"{custom / 'config.json'}: the model needs its own Python code (auto_map); refused" in err
    assert not (tmp_path / "out").exists()


def model_folder(segformer, folder, state=None):
    """`segformer`'s config and image processor with weights saved by torch.save as pytorch_model.bin (`state`, or
    the model's own state dict), as the Hub's older models ship them."""
    from transformers import SegformerForSemanticSegmentation
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (folder / name).write_text((segformer / name).read_text())
    if state is None:
        model = SegformerForSemanticSegmentation.from_pretrained(segformer)
        model.save_pretrained(folder, safe_serialization=False)  # transformers' own pytorch_model.bin
        (folder / "config.json").write_text((segformer / "config.json").read_text())
    else:
        torch.save(state, folder / "pytorch_model.bin")
    assert not list(folder.glob("*.safetensors"))
    return folder


def test_a_pytorch_model_bin_labels_as_its_safetensors_save(tmp_path, segformer):
    """The README's example SegFormer ships pytorch_model.bin only: read with weights_only=True, it labels exactly as
    the same weights saved as safetensors."""
    pickled = model_folder(segformer, tmp_path / "pickled")
    src = rgb_ir_folder(tmp_path / "src")
    assert labels.label_folder(src, tmp_path / "from-safetensors", segformer) == 3
    assert labels.label_folder(src, tmp_path / "from-bin", pickled) == 3
    for stem in ("000", "001", "002"):
        a, b = (np.asarray(Image.open(tmp_path / d / "sem" / f"{stem}.png")) for d in ("from-safetensors", "from-bin"))
        assert np.array_equal(a, b)
    data.check(tmp_path / "from-bin")


class RunsCode:
    """Unpickled by plain pickle, this would call exec and create the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_a_pickle_that_would_run_code_or_hold_other_things_is_refused(tmp_path, segformer, capsys):
    src, out = rgb_ir_folder(tmp_path / "src", sizes=((32, 32),)), str(tmp_path / "out")
    marker = tmp_path / "ran"
    weights = dict(torch.load(model_folder(segformer, tmp_path / "good") / "pytorch_model.bin", weights_only=True))
    evil = model_folder(segformer, tmp_path / "evil", weights | {"x": RunsCode(marker)})
    err = one_line_error(capsys, [str(src), out, "--model", str(evil)])
    assert f"{evil / 'pytorch_model.bin'}: holds a pickled Python object (exec)" in err and "refused" in err
    assert not marker.exists() and not (tmp_path / "out").exists()

    nested = model_folder(segformer, tmp_path / "nested", {"state_dict": weights})
    assert "not a state dict of tensors ('state_dict' holds a dict)" in one_line_error(
        capsys, [str(src), out, "--model", str(nested)])
    name = next(k for k in weights if k.startswith("decode_head.classifier.weight"))
    partial = model_folder(segformer, tmp_path / "partial", {k: v for k, v in weights.items() if k != name})
    assert f"leave 1 of the model's parameters unset (e.g. {name})" in one_line_error(
        capsys, [str(src), out, "--model", str(partial)])
    garbage = model_folder(segformer, tmp_path / "garbage", {})
    (garbage / "pytorch_model.bin").write_bytes(b"\x80\x04")
    assert "pytorch_model.bin: " in one_line_error(capsys, [str(src), out, "--model", str(garbage)])
    assert not marker.exists() and not (tmp_path / "out").exists()
