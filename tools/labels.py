"""
Semantic maps from a segmentation model: label the RGB images of a folder with a SegFormer, Mask2Former or OneFormer
trained on Cityscapes or ADE20K (a local Hugging Face model folder), mapped onto a project class table.

    python -m tools.labels SRC OUT --model DIR [--mapping cityscapes|ade20k|FILE.json] [--hot-vehicles] [--overwrite]

SRC is a dataset folder (its rgb/ is labelled; an importer's rgb/ + ir/ output) or a plain folder of RGB images. OUT
gets sem/<stem>.png (colour maps in the class palette, at each RGB image's own size) and classes.json; when OUT is
not SRC, the images (and SRC/ir/) are copied there too, so OUT is a complete dataset folder (rgb/ sem/ ir/).
Existing files in OUT are never replaced unless --overwrite is given.

How a map is made (what the model's own post-processing does): the image processor resizes and normalises the
image, the model predicts class scores at its output resolution, post_process_semantic_segmentation upsamples them
bilinearly to the image's size and takes the arg-max class per pixel; that class's label (config.id2label) is
mapped to a project class by name.

Mappings (model label -> project class; labels compared lower-case, "_" and "-" as spaces, up to the first "," or
";" so "building, edifice" is "building"):
    cityscapes  the 19 Cityscapes train classes kept one to one, in their train-id order and colours.
    ade20k      the 150 ADE20K classes grouped into 10: other, sky, road, building, vegetation, terrain, water,
                person, vehicle, animal (indoor objects, furniture, signs and poles are "other").
    FILE.json   {"classes": [{"id", "name", "color", "hot"}, ...], "map": {"model label": "class name", ...},
                 "vehicles": ["class name", ...]}   ("vehicles" optional: the classes --hot-vehicles makes hot)
Without --mapping the model's labels choose it: all Cityscapes names -> cityscapes, all ADE20K names -> ade20k.
Hot classes: person and rider (ADE20K: person, animal). Vehicles are cold unless --hot-vehicles: an RGB image cannot
tell a running engine from a parked car, so the labeller cannot either.

transformers is imported only here (requirements-test.txt pins the tested version). Weights are read from
*.safetensors, else from a pytorch_model.bin (what many Hub models, the README's SegFormer among them, ship on their
main branch) through torch.load(weights_only=True): only tensors and plain containers are unpickled, so a pickle that
would build any other object (and could run code) is refused before anything in it runs, and the file must hold a
flat {name: tensor} state dict. Nothing is downloaded, a model that needs its own Python code (an auto_map in its
config) is refused, and so are weights that leave any of the model's parameters unset. Every problem is one line:
data.DataError naming the file or folder.
"""

import argparse
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from checkpoint import CheckpointError, command, load_torch_state, write_atomic
from data import (DataError, SemClass, classes_from_rows, list_images, load_classes, open_image, palette, rgb01,
                  save_classes)

# ----------------------------------------------------------------------------------------------------------------
# Shipped mappings. A row is (id, name, colour, hot) with hot True, False or "vehicle" (hot with --hot-vehicles).

CITYSCAPES = [  # train ids 0..18 and the Cityscapes colours
    (0, "road", (128, 64, 128), False), (1, "sidewalk", (244, 35, 232), False),
    (2, "building", (70, 70, 70), False), (3, "wall", (102, 102, 156), False),
    (4, "fence", (190, 153, 153), False), (5, "pole", (153, 153, 153), False),
    (6, "traffic_light", (250, 170, 30), False), (7, "traffic_sign", (220, 220, 0), False),
    (8, "vegetation", (107, 142, 35), False), (9, "terrain", (152, 251, 152), False),
    (10, "sky", (70, 130, 180), False), (11, "person", (220, 20, 60), True), (12, "rider", (255, 0, 0), True),
    (13, "car", (0, 0, 142), "vehicle"), (14, "truck", (0, 0, 70), "vehicle"), (15, "bus", (0, 60, 100), "vehicle"),
    (16, "train", (0, 80, 100), "vehicle"), (17, "motorcycle", (0, 0, 230), "vehicle"),
    (18, "bicycle", (119, 11, 32), False),  # no engine; its rider is labelled rider
]

ADE20K_CLASSES = [
    (0, "other", (0, 0, 0), False), (1, "sky", (70, 130, 180), False), (2, "road", (128, 64, 128), False),
    (3, "building", (70, 70, 70), False), (4, "vegetation", (107, 142, 35), False),
    (5, "terrain", (152, 251, 152), False), (6, "water", (45, 90, 200), False), (7, "person", (220, 20, 60), True),
    (8, "vehicle", (0, 0, 142), "vehicle"), (9, "animal", (190, 100, 255), True),  # animals are warm-blooded
]
# ADE20K's 150 classes in index order, as the Hugging Face configs name them (the first name of each class)
ADE20K_LABELS = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
ADE20K_GROUPS = {  # every label not named here is "other"
    "sky": ("sky",),
    "road": ("road", "sidewalk", "path", "runway", "dirt track"),
    "building": ("wall", "building", "floor", "ceiling", "windowpane", "door", "house", "fence", "railing", "column",
                 "skyscraper", "grandstand", "stairs", "screen door", "stairway", "bridge", "hovel", "tower",
                 "awning", "booth", "bannister", "escalator", "stage", "canopy", "step", "pier"),
    "vegetation": ("tree", "grass", "plant", "flower", "palm"),
    "terrain": ("earth", "mountain", "field", "rock", "sand", "hill", "land"),
    "water": ("water", "sea", "river", "fountain", "swimming pool", "waterfall", "lake"),
    "person": ("person",),
    "vehicle": ("car", "boat", "bus", "truck", "airplane", "van", "ship", "minibike"),
    "animal": ("animal",),
}


def normalize_label(label: str) -> str:
    """'Traffic_Light' -> 'traffic light'; 'building, edifice' -> 'building'; 'bed ' -> 'bed'."""
    first = re.split(r"[,;]", str(label))[0]
    return " ".join(first.lower().replace("_", " ").replace("-", " ").split())


@dataclass(frozen=True)
class Mapping:
    """Model labels -> a project class table."""
    name: str
    classes: tuple[SemClass, ...]
    to_class: dict  # normalised model label -> project class name

    def lut(self, id2label: dict[int, str]) -> np.ndarray:
        """int64 [num model classes]: model class index -> project class id. A label the mapping does not know is
        an error listing every such label."""
        ids = {c.name: c.id for c in self.classes}
        unknown = sorted({label for label in id2label.values() if normalize_label(label) not in self.to_class})
        if unknown:
            shown = ", ".join(repr(x) for x in unknown[:10]) + (f" ... and {len(unknown) - 10} more"
                                                                 if len(unknown) > 10 else "")
            raise DataError(f"mapping {self.name}: {len(unknown)} of the model's labels are not in it: {shown}; pass "
                            "--mapping FILE.json with a \"map\" entry for each (see python -m tools.labels -h)")
        lut = np.zeros(max(id2label) + 1, np.int64)
        for index, label in id2label.items():
            lut[index] = ids[self.to_class[normalize_label(label)]]
        return lut


def _table(rows, hot_vehicles: bool) -> tuple[SemClass, ...]:
    return tuple(SemClass(i, name, tuple(color), hot is True or (hot == "vehicle" and hot_vehicles))
                 for i, name, color, hot in rows)


def shipped_mapping(name: str, hot_vehicles: bool = False) -> Mapping:
    if name == "cityscapes":
        return Mapping(name, _table(CITYSCAPES, hot_vehicles),
                       {normalize_label(n): n for _, n, _, _ in CITYSCAPES})
    if name == "ade20k":
        group = {label: g for g, labels in ADE20K_GROUPS.items() for label in labels}
        return Mapping(name, _table(ADE20K_CLASSES, hot_vehicles),
                       {label: group.get(label, "other") for label in ADE20K_LABELS})
    raise ValueError(f"unknown mapping {name!r}; choose cityscapes, ade20k or a FILE.json")


def mapping_file(path, hot_vehicles: bool = False) -> Mapping:
    """A FILE.json mapping (see the module docstring), checked strictly."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: cannot read the mapping ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or not {"classes", "map"} <= doc.keys() or doc.keys() - {"classes", "map",
                                                                                          "vehicles"}:
        raise DataError(f'{path}: expected {{"classes": [...], "map": {{"model label": "class name"}}, '
                        f'"vehicles": [...]}} ("vehicles" optional)')
    if not isinstance(doc["classes"], list) or not isinstance(doc["map"], dict):
        raise DataError(f"{path}: \"classes\" must be a list and \"map\" an object")
    classes = classes_from_rows(doc["classes"], str(path))
    names = {c.name for c in classes}
    vehicles = doc.get("vehicles", [])
    bad = sorted({str(v) for v in [*doc["map"].values(), *vehicles] if v not in names})
    if bad:
        raise DataError(f"{path}: {', '.join(bad)}: not a class of its \"classes\" ({', '.join(sorted(names))})")
    if hot_vehicles:
        classes = tuple(SemClass(c.id, c.name, c.color, c.hot or c.name in vehicles) for c in classes)
    return Mapping(str(path), classes, {normalize_label(k): v for k, v in doc["map"].items()})


def detect_mapping(id2label: dict[int, str]) -> str:
    """'cityscapes' or 'ade20k' when every label of the model is one of theirs."""
    labels = {normalize_label(x) for x in id2label.values()}
    for name in ("cityscapes", "ade20k"):
        if labels <= set(shipped_mapping(name).to_class):
            return name
    raise DataError(f"the model's labels ({', '.join(sorted(labels)[:8])}{' ...' if len(labels) > 8 else ''}) are "
                    "neither Cityscapes' nor ADE20K's: pass --mapping FILE.json (see python -m tools.labels -h)")


def load_mapping(spec: str, hot_vehicles: bool = False) -> Mapping:
    """'cityscapes' | 'ade20k' | a path to a FILE.json."""
    if spec in ("cityscapes", "ade20k"):
        return shipped_mapping(spec, hot_vehicles)
    return mapping_file(spec, hot_vehicles)


# ----------------------------------------------------------------------------------------------------------------
# The model

UNIVERSAL = ("mask2former", "maskformer", "oneformer")  # mask + class queries (AutoModelForUniversalSegmentation)
MODEL_FILES = "config.json, model.safetensors or pytorch_model.bin, preprocessor_config.json"
PICKLED_WEIGHTS = "pytorch_model.bin"  # transformers' name for torch.save'd weights


def _transformers():
    try:
        import transformers
    except ImportError:
        raise DataError("tools.labels runs the segmentation model with transformers, which is not installed: "
                        "pip install transformers (requirements-test.txt pins the tested version)") from None
    return transformers


def _refuse_custom_code(folder: Path):
    """A model whose config.json (or preprocessor_config.json) has an auto_map runs Python code shipped in its folder:
    refused, as pickles are, before transformers sees it (which would ask on a terminal whether to run it)."""
    for name in ("config.json", "preprocessor_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise DataError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
        if isinstance(doc, dict) and "auto_map" in doc:
            raise DataError(f"{path}: the model needs its own Python code (auto_map); refused, as pickles are; use a "
                            "model that transformers implements (SegFormer, Mask2Former, OneFormer)")


def _check_model_dir(folder: Path):
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; --model is a local Hugging Face model folder ({MODEL_FILES})")
    if not (folder / "config.json").is_file():
        raise DataError(f"{folder}: no config.json: not a Hugging Face model folder ({MODEL_FILES})")
    _refuse_custom_code(folder)
    if not any(folder.glob("*.safetensors")) and not (folder / PICKLED_WEIGHTS).is_file():
        sharded = " (a sharded pytorch_model.bin is not read)" if any(folder.glob("pytorch_model-*.bin")) else ""
        raise DataError(f"{folder}: no weights: neither *.safetensors nor {PICKLED_WEIGHTS}{sharded}")
    if not (folder / "preprocessor_config.json").is_file():
        raise DataError(f"{folder}: no preprocessor_config.json: the model's image processor (resize, normalisation) "
                        "is needed")


def read_pickled_weights(path: Path) -> dict:
    """A pytorch_model.bin -> {name: tensor}, read with torch.load(weights_only=True) (checkpoint.load_torch_state):
    a pickle that needs any global beyond tensors and plain containers fails before anything in it runs. Anything but
    a flat state dict of tensors is refused."""
    try:
        state = load_torch_state(path)
    except CheckpointError as e:
        raise DataError(str(e)) from None
    bad = next(((k, v) for k, v in state.items() if not (isinstance(k, str) and torch.is_tensor(v))), None)
    if bad is not None:
        raise DataError(f"{path}: not a state dict of tensors ({bad[0]!r} holds a {type(bad[1]).__name__}); "
                        "expected the weights transformers saves as pytorch_model.bin")
    return state


class Segmenter:
    """A local SegFormer / Mask2Former / OneFormer (any transformers semantic-segmentation model): an RGB image
    uint8 [H, W, 3] -> model class indices int64 [H, W] at the image's size."""

    def __init__(self, model_dir, device: torch.device | str = "cpu"):
        tf = _transformers()
        folder = Path(model_dir)
        _check_model_dir(folder)
        self.device = torch.device(device)
        try:
            local = {"local_files_only": True, "trust_remote_code": False}  # never the folder's own code
            config = tf.AutoConfig.from_pretrained(folder, **local)
            self.kind = config.model_type
            if self.kind == "oneformer":  # its processor also tokenizes the task prompt ("the task is semantic")
                self.processor = tf.AutoProcessor.from_pretrained(folder, **local)
            else:
                self.processor = tf.AutoImageProcessor.from_pretrained(folder, use_fast=False, **local)
            if any(folder.glob("*.safetensors")):
                auto = (tf.AutoModelForUniversalSegmentation if self.kind in UNIVERSAL
                        else tf.AutoModelForSemanticSegmentation)
                self.model, info = auto.from_pretrained(folder, use_safetensors=True, output_loading_info=True,
                                                        **local)
            else:  # pytorch_model.bin: read here, safely, and handed over as a state dict
                state = read_pickled_weights(folder / PICKLED_WEIGHTS)
                classes = (tf.MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING if self.kind in UNIVERSAL
                           else tf.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING)
                self.model, info = classes[type(config)].from_pretrained(None, config=config, state_dict=state,
                                                                         output_loading_info=True)
        except DataError:
            raise
        except (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError) as e:  # a missing backbone too
            first = str(e).strip().split("\n")[0]
            raise DataError(f"{folder}: transformers cannot load it as a segmentation model ({first})") from None
        params = dict(self.model.named_parameters())
        missing = sorted(k for k in info["missing_keys"] if k in params)  # a loss's buffer may be absent
        if missing:  # transformers fills them with random numbers, and the maps would be made with those
            raise DataError(f"{folder}: the weights leave {len(missing)} of the model's parameters unset (e.g. "
                            f"{missing[0]}): not weights of this config.json's model")
        self.model.eval().requires_grad_(False).to(self.device)
        self.id2label = {int(k): str(v) for k, v in config.id2label.items()}

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        extra = {"task_inputs": ["semantic"]} if self.kind == "oneformer" else {}
        inputs = self.processor(images=[rgb], return_tensors="pt", **extra).to(self.device)
        outputs = self.model(**inputs)
        # the processor's own post-processing: class scores upsampled (bilinear) to H x W, then the arg-max
        seg = self.processor.post_process_semantic_segmentation(outputs, target_sizes=[rgb.shape[:2]])[0]
        return seg.cpu().numpy().astype(np.int64)  # [H, W]


# ----------------------------------------------------------------------------------------------------------------
# A folder


def write_semantic(path: Path, ids: np.ndarray, classes):
    """ids [H, W] -> a colour PNG in the class palette, written atomically (a kill never leaves half a map)."""
    image = Image.fromarray(palette(classes)[ids])
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def _plan_copies(src: Path, images_dir: Path, out: Path) -> list[tuple[Path, Path]]:
    """(source, destination) of the files that make OUT a complete dataset folder when it is not SRC."""
    if out.resolve() == src.resolve():
        return []
    pairs = [(p, out / "rgb" / p.name) for p in list_images(images_dir).values()]
    if images_dir != src and (src / "ir").is_dir():
        pairs += [(p, out / "ir" / p.name) for p in list_images(src / "ir").values()]
    return pairs


def label_folder(src, out, model_dir, mapping: str | None = None, hot_vehicles: bool = False,
                 overwrite: bool = False, device="cpu", progress: bool = False) -> int:
    """Label every RGB image of SRC (SRC/rgb/ when there is one) into OUT/sem/ + OUT/classes.json; returns the number
    of maps written. Refuses, before any work, to replace existing files unless overwrite."""
    src, out = Path(src), Path(out)
    images_dir = src / "rgb" if (src / "rgb").is_dir() else src
    images = list_images(images_dir)
    if not images:
        raise DataError(f"{images_dir}: no images to label")
    seg = Segmenter(model_dir, device)
    table = load_mapping(mapping or detect_mapping(seg.id2label), hot_vehicles)
    lut = table.lut(seg.id2label)
    copies = _plan_copies(src, images_dir, out)
    maps = {stem: out / "sem" / f"{stem}.png" for stem in images}
    existing = [p for p in (*maps.values(), *(d for _, d in copies)) if p.exists()]
    classes_path = out / "classes.json"
    if classes_path.exists() and not existing:
        try:
            same = load_classes(classes_path) == table.classes
        except DataError:
            same = False
        if not same:
            existing.append(classes_path)
    if existing and not overwrite:
        raise DataError(f"{out}: {len(existing)} output file(s) exist already (e.g. {existing[0]}); pass "
                        "--overwrite to replace them")
    for stem, path in tqdm(images.items(), desc="labels", disable=not progress):
        rgb = np.round(rgb01(open_image(path), path) * 255).astype(np.uint8)  # [H, W, 3], EXIF applied
        write_semantic(maps[stem], lut[seg(rgb)], table.classes)
    for source, dest in copies:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)
    write_atomic(classes_path, lambda tmp: save_classes(table.classes, tmp))
    return len(images)


def main(argv=None) -> int:
    from pipeline import resolve_device  # a --device that exists

    @command
    def run(argv):
        parser = argparse.ArgumentParser(prog="python -m tools.labels", description=__doc__.split("\n\n")[0],
                                         formatter_class=argparse.RawDescriptionHelpFormatter,
                                         epilog=__doc__.split("\n\n", 2)[2])
        parser.add_argument("src", help="a dataset folder (its rgb/ is labelled) or a folder of RGB images")
        parser.add_argument("out", help="the dataset folder to write sem/ and classes.json into (may be SRC)")
        parser.add_argument("--model", required=True, help=f"local Hugging Face model folder ({MODEL_FILES})")
        parser.add_argument("--mapping", default=None,
                            help="cityscapes | ade20k | FILE.json (default: chosen from the model's labels)")
        parser.add_argument("--hot-vehicles", action="store_true",
                            help="mark vehicle classes hot. Off by default: an RGB image cannot tell a running "
                                 "engine from a parked car, so every car would be labelled hot")
        parser.add_argument("--overwrite", action="store_true", help="replace existing files in OUT")
        parser.add_argument("--device", default="", help="default: a GPU if there is one, else the CPU")
        args = parser.parse_args(argv)
        device = resolve_device(args.device)
        n = label_folder(args.src, args.out, args.model, args.mapping, args.hot_vehicles, args.overwrite, device,
                         progress=True)
        print(f"labelled {n} images into {Path(args.out) / 'sem'}; check with `python data.py check {args.out}`")

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
