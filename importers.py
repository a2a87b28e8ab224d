"""
Importers for public RGB-T segmentation sets: each converts one set into the dataset layout of data.py
(rgb/ sem/ ir/ + classes.json), which PairedDataset then reads like any other folder.

    MFNet (Ha et al. 2017)   SRC/images/*.png 4-channel RGB-T (thermal = 4th channel), SRC/labels/*.png ids 0..8
    FMB (Liu et al. 2023)    SRC/Visible, SRC/Infrared, SRC/Label (ids 0..14); point SRC at one split (train, test)

The output folder must be new or empty, and is written all at once: a bad pair anywhere leaves nothing there.
Every problem with a file or folder raises data.DataError naming it.

Commands (python importers.py -h):
    mfnet SRC OUT / fmb SRC OUT   convert the set at SRC into a dataset folder OUT
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data import (DataError, building_layout, class_table, ir01, list_images, match_stems, open_image, rgb01,
                  save_classes, semantic_ids, write_pair)

# MFNet (Ha et al. 2017), colours as in the RTFNet visualisation. Hot = car, person, bike is OUR choice:
# MFNet does not say which cars are running, so parked cars count as hot and miss rates on them are pessimistic.
MFNET_CLASSES = class_table([
    (0, "unlabeled", (0, 0, 0), False),
    (1, "car", (64, 0, 128), True),
    (2, "person", (64, 64, 0), True),
    (3, "bike", (0, 128, 192), True),
    (4, "curve", (0, 0, 192), False),
    (5, "car_stop", (128, 128, 0), False),
    (6, "guardrail", (64, 64, 128), False),
    (7, "color_cone", (192, 128, 128), False),
    (8, "bump", (192, 64, 0), False),
])

# FMB (SegMiF, Liu et al. 2023), Cityscapes-like colours. Hot = people and motor vehicles is OUR choice:
# a bicycle has no engine (its rider is a person), traffic lights are too small and too dim to count.
FMB_CLASSES = class_table([
    (0, "unlabeled", (0, 0, 0), False),
    (1, "road", (128, 64, 128), False),
    (2, "sidewalk", (244, 35, 232), False),
    (3, "building", (70, 70, 70), False),
    (4, "traffic_light", (250, 170, 30), False),
    (5, "traffic_sign", (220, 220, 0), False),
    (6, "vegetation", (107, 142, 35), False),
    (7, "sky", (70, 130, 180), False),
    (8, "person", (220, 20, 60), True),
    (9, "car", (0, 0, 142), True),
    (10, "truck", (0, 0, 70), True),
    (11, "bus", (0, 60, 100), True),
    (12, "motorcycle", (0, 0, 230), True),
    (13, "bicycle", (119, 11, 32), False),
    (14, "pole", (153, 153, 153), False),
])


def import_mfnet(src, out, progress=False) -> int:
    """MFNet: src/images/*.png are 4-channel RGB-T (0-2 RGB, 3 thermal), src/labels/*.png label ids 0..8."""
    src = Path(src)
    files = {"images": list_images(src / "images"), "labels": list_images(src / "labels")}
    names = match_stems(src, files)
    with building_layout(out) as tmp:  # a bad pair anywhere leaves nothing at out
        for name in tqdm(names, desc="import-mfnet", disable=not progress):
            img_path, label_path = files["images"][name], files["labels"][name]
            img = open_image(img_path)
            if img.mode != "RGBA":
                raise DataError(f"{img_path}: mode {img.mode}; MFNet images are 4-channel RGB-T PNGs "
                                "(thermal = 4th channel)")
            rgbt = np.asarray(img)                                                   # [H, W, 4] uint8
            ids = semantic_ids(open_image(label_path), label_path, MFNET_CLASSES)    # [H, W]
            if ids.shape != rgbt.shape[:2]:
                raise DataError(f"{src}: pair {name!r}: image {rgbt.shape[1]}x{rgbt.shape[0]} "
                                f"but label {ids.shape[1]}x{ids.shape[0]}")
            write_pair(tmp, name, rgbt[..., :3], ids, rgbt[..., 3], MFNET_CLASSES)
        save_classes(MFNET_CLASSES, tmp / "classes.json")
    return len(names)


def import_fmb(src, out, progress=False) -> int:
    """FMB: src/Visible, src/Infrared, src/Label (ids 0..14) with matching stems; point src at one split."""
    src = Path(src)
    if not (src / "Visible").is_dir() and any((src / s / "Visible").is_dir() for s in ("train", "test")):
        raise DataError(f"{src}: no Visible/ here, but a split folder has one; "
                        "import FMB/train and FMB/test separately")
    files = {d: list_images(src / d) for d in ("Visible", "Infrared", "Label")}
    names = match_stems(src, files)
    with building_layout(out) as tmp:  # a bad pair anywhere leaves nothing at out
        for name in tqdm(names, desc="import-fmb", disable=not progress):
            p = {d: files[d][name] for d in files}
            rgb = np.round(rgb01(open_image(p["Visible"]), p["Visible"]) * 255).astype(np.uint8)  # [H, W, 3]
            ir, bits = ir01(open_image(p["Infrared"]), p["Infrared"])                             # [H, W] in [0,1]
            ir = np.round(ir * 65535).astype(np.uint16) if bits == 16 else np.round(ir * 255).astype(np.uint8)
            ids = semantic_ids(open_image(p["Label"]), p["Label"], FMB_CLASSES)
            shapes = {"Visible": rgb.shape[:2], "Infrared": ir.shape, "Label": ids.shape}
            if len(set(shapes.values())) > 1:
                raise DataError(f"{src}: pair {name!r} sizes disagree (HxW): {shapes}")
            write_pair(tmp, name, rgb, ids, ir, FMB_CLASSES)
        save_classes(FMB_CLASSES, tmp / "classes.json")
    return len(names)


IMPORTERS = {"mfnet": import_mfnet, "fmb": import_fmb}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in IMPORTERS:
        p = sub.add_parser(name, help=f"convert {name.upper()} to rgb/ sem/ ir/ + classes.json")
        p.add_argument("src")
        p.add_argument("out")
    args = parser.parse_args(argv)
    try:
        n = IMPORTERS[args.cmd](args.src, args.out, progress=True)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"imported {n} pairs into {args.out}")


if __name__ == "__main__":
    main()
