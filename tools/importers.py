"""
Importers for public RGB-T sets: each converts one set into the dataset layout of data.py (rgb/ sem/ ir/ +
classes.json), which PairedDataset then reads like any other folder.

With labels (rgb/ sem/ ir/ + classes.json):
    MFNet (Ha et al. 2017)     SRC/images/*.png 4-channel RGB-T (thermal = 4th channel), SRC/labels/*.png ids 0..8;
                               --split train|val|test keeps the stems listed in SRC/<split>.txt
    FMB (Liu et al. 2023)      SRC/Visible, SRC/Infrared, SRC/Label (ids 0..14); point SRC at one split (train, test)
    MSRS (Tang et al. 2022)    SRC/<split>/vi, ir, Segmentation_labels (MFNet's 9 classes, ids 0..8)
    PST900 (Shivakumar 2020)   SRC/<split>/rgb, thermal (8-bit AGC), labels (ids 0..4); projection holes filled
Without labels (rgb/ ir/; then `python -m tools.labels OUT OUT --model DIR` writes sem/ and classes.json):
    M3FD (Liu et al. 2022)     SRC/Vis, SRC/Ir (no split)
    LLVIP (Jia et al. 2021)    SRC/visible/<split>, SRC/infrared/<split>
    FLIR aligned (Zhang 2020)  SRC/JPEGImages/FLIR_XXXXX_RGB.jpg + FLIR_XXXXX_PreviewData.jpeg, the pairs of the first
                               split file found (FLIR_SPLIT_FILES): --split train SRC/align_train.txt or
                               SRC/ImageSets/Main/train.txt; --split test SRC/align_validation.txt,
                               ImageSets/Main/test.txt or ImageSets/Main/val.txt; --split val ImageSets/Main/val.txt
Label files are label-id images: a palette PNG's index is the label id, whatever colours its palette holds.
<split> is --split train (default) or test. Infrared stored as 3-channel grey becomes one channel; 16-bit infrared
stays 16-bit; a false-colour infrared image (channels that differ) is refused, since its palette cannot be inverted.
A JPEG (RGB or infrared; LLVIP's and FLIR's) is checked the same way and then copied byte for byte: data.py reads
JPEGs, and re-encoding one as PNG costs time and 5x the space for no gain. Other images, and every semantic map,
are written as PNG (lossless).

PST900's thermal images are projected into the RGB camera's frame; pixels no thermal pixel lands on are stored as 0
(cold, to a reader). They are FILLED (fill_holes: ring by ring from the hole's edge inward, each pixel the mean of its
already-known 8 neighbours), the share of pixels filled is printed, and OUT/ir_filled.json lists the count per pair.
A scene pixel that is truly 0 is filled too.

The output folder must be new or empty, and is written all at once: a bad pair anywhere leaves nothing there.
Every problem with a file or folder raises data.DataError naming it. The pairs are converted by --workers processes
(default: one per CPU core); the output is the same for any number.

Commands (python -m tools.importers -h):
    python -m tools.importers NAME SRC OUT [--split S] [--workers N]   convert the set at SRC into a dataset folder
                                                                       OUT (NAME: one of IMPORTERS)
"""

import argparse
import json
import os
import re
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from data import (IMAGE_EXTS, DataError, building_layout, class_table, ir01, list_images, match_stems, open_image,
                  palette, rgb01, save_classes, semantic_ids, write_pair)

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


# PST900 (Shivakumar et al. 2020), ids as its labels store them; colours are OUR choice. Hot = survivor is OUR choice
# too: DARPA SubT's survivor artefact is a heated mannequin, the extinguisher, backpack and drill sit at ambient.
PST900_CLASSES = class_table([
    (0, "background", (0, 0, 0), False),
    (1, "fire_extinguisher", (200, 0, 0), False),
    (2, "backpack", (0, 100, 200), False),
    (3, "hand_drill", (230, 160, 0), False),
    (4, "survivor", (220, 20, 60), True),
])

SPLITS = ("train", "test")
JPEG = (".jpg", ".jpeg")  # copied byte for byte: data.py reads them as they are


# ----------------------------------------------------------------------------------------------------------------
# One pair's images


def rgb8(path, img=None) -> np.ndarray:
    """A visible image (`img`: the file already opened) -> uint8 [H, W, 3] (EXIF applied, alpha dropped, 16-bit
    scaled down)."""
    return np.round(rgb01(open_image(path) if img is None else img, path) * 255).astype(np.uint8)


def check_grey(img, path):
    """Refuse a false-colour infrared image (channels more than 4 levels apart on average): its palette cannot be
    turned back into intensities. Grey stored as RGB (LLVIP, FLIR previews) passes."""
    if img.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
        c = np.asarray(img.convert("RGB"))                                                  # [H, W, 3] uint8
        spread = float((c.max(axis=2) - c.min(axis=2)).mean())
        if spread > 4:
            raise DataError(f"{path}: a colour infrared image (its channels differ by {spread:.1f} levels on "
                            "average): false-colour IR cannot be turned back into intensities; use the grey images")


def ir_grey(path, img=None) -> np.ndarray:
    """An infrared image (`img`: the file already opened) -> one channel, uint8 [H, W] or uint16 [H, W] for 16-bit
    files. Grey stored as RGB becomes its channel mean; a false-colour image is refused (check_grey)."""
    img = open_image(path) if img is None else img
    check_grey(img, path)
    ir, bits = ir01(img, path)                                                            # [H, W] in [0, 1]
    return np.round(ir * 65535).astype(np.uint16) if bits == 16 else np.round(ir * 255).astype(np.uint8)


def _same_size(where, name, shapes: dict):
    """shapes {role: (H, W)}, which must agree."""
    if len(set(shapes.values())) > 1:
        raise DataError(f"{where}: pair {name!r} sizes disagree (HxW): {shapes}")


def fill_holes(ir: np.ndarray) -> tuple[np.ndarray, int]:
    """ir uint8/uint16 [H, W] -> (a copy with every 0 pixel filled, how many were filled). Ring by ring from the edge
    of each hole inward, a 0 pixel takes the mean of its 8 neighbours known so far (the image's own non-zero pixels,
    then the rings already filled), rounded at the end; a mean of values >= 1 is >= 1, so no 0 is left. The other
    pixels are unchanged. An image that is 0 everywhere has nothing to fill from and is returned as it is."""
    hole = ir == 0
    n = int(hole.sum())
    if n == 0 or n == ir.size:
        return ir, 0
    H, W = ir.shape
    value = np.zeros((H + 2, W + 2))                                    # padded by 1: the border is never known
    value[1:-1, 1:-1] = ir
    known = np.zeros((H + 2, W + 2), bool)
    known[1:-1, 1:-1] = ~hole
    value, known = value.ravel(), known.ravel()
    offsets = np.array([dy * (W + 2) + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])  # [8]
    y, x = np.nonzero(hole)
    todo = (y + 1) * (W + 2) + x + 1                                    # the holes' indices in the padded image
    while todo.size:
        around = todo[:, None] + offsets                                # [n, 8] neighbour indices
        seen = known[around]                                            # [n, 8]
        count = seen.sum(1)
        ring = count > 0                                                # the holes' pixels next to a known one
        value[todo[ring]] = (value[around[ring]] * seen[ring]).sum(1) / count[ring]
        known[todo[ring]] = True
        todo = todo[~ring]
    filled = np.round(value.reshape(H + 2, W + 2)[1:-1, 1:-1]).astype(ir.dtype)
    return filled, n


def _is_jpeg(path) -> bool:
    return Path(path).suffix.lower() in JPEG


def _import_pair(job) -> tuple[int, int]:
    """One pair into the dataset being built (a worker's task): the RGB and IR decoded and checked, a JPEG then copied
    as it is, any other image written as PNG; the label as a colour map in the class palette; with `fill`, the IR's
    zeros filled (fill_holes, written as PNG). Returns (IR pixels filled, IR pixels)."""
    where, out, name, (rgb_path, ir_path, label_path), classes, fill = job
    rgb_img, ir_img = open_image(rgb_path), open_image(ir_path)         # decoded in full: a broken file fails here
    ir, filled = None, 0
    if fill or not _is_jpeg(ir_path):
        ir = ir_grey(ir_path, ir_img)                                   # [H, W], checked to be grey
    else:
        check_grey(ir_img, ir_path)                                     # copied as it is, once checked
    shapes = {"rgb": rgb_img.size[::-1], "ir": ir_img.size[::-1]}      # (H, W)
    ids = None
    if classes is not None:
        ids = label_ids(label_path, classes)                            # [H, W]
        shapes["label"] = ids.shape
    _same_size(where, name, shapes)
    if fill:
        if not ir.any():
            raise DataError(f"{ir_path}: every pixel is 0: no thermal data, not even around a projection hole")
        ir, filled = fill_holes(ir)
    if _is_jpeg(rgb_path):
        shutil.copyfile(rgb_path, out / "rgb" / f"{name}{Path(rgb_path).suffix.lower()}")
    else:
        Image.fromarray(rgb8(rgb_path, rgb_img)).save(out / "rgb" / f"{name}.png")
    if _is_jpeg(ir_path) and not filled:
        shutil.copyfile(ir_path, out / "ir" / f"{name}{Path(ir_path).suffix.lower()}")
    else:
        Image.fromarray(np.ascontiguousarray(ir)).save(out / "ir" / f"{name}.png")  # uint16 -> 16-bit grey PNG
    if ids is not None:
        Image.fromarray(palette(classes)[ids]).save(out / "sem" / f"{name}.png")
    return filled, shapes["ir"][0] * shapes["ir"][1]


def default_workers() -> int:
    """One process per CPU core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2


def _run(jobs: list, workers: int, desc: str, progress: bool) -> list:
    """_import_pair over `jobs`, in order, in `workers` processes (1: in this one). The first failing pair (in job
    order, whatever the number of workers) raises, and the pairs not started yet are cancelled."""
    bar = dict(total=len(jobs), desc=desc, disable=not progress)
    if workers <= 1 or len(jobs) <= 1:
        return [_import_pair(job) for job in tqdm(jobs, **bar)]
    with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
        try:
            return list(tqdm(pool.map(_import_pair, jobs, chunksize=4), **bar))
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the running ones finish before the folder is removed
            raise


def label_ids(path, classes) -> np.ndarray:
    """A published set's label file -> int64 [H, W] label ids. These are label-id images; a palette (P) PNG's index
    is the id whatever colours its palette holds (a VOC palette's colours can equal class colours: VOC index 3 is
    MFNet's car_stop colour, so reading by colour would turn bikes into stopped cars)."""
    return semantic_ids(open_image(path), path, classes, index_palette=True)


def import_pairs(where, pairs: dict, out, classes=None, desc="import", progress=False, workers: int = 1,
                 fill: bool = False) -> int:
    """pairs {stem: (rgb path, ir path, label path or None)} -> OUT, all at once, by `workers` processes. With
    `classes`, every pair has a label (ids of those classes) and OUT gets sem/ + classes.json; without, rgb/ and ir/
    only (label them with tools.labels). fill: the IR's 0 pixels are projection holes, filled (fill_holes); the
    share filled is printed and OUT/ir_filled.json lists the count per pair."""
    if workers < 1:
        raise DataError(f"--workers {workers}: at least 1")
    names = sorted(pairs)
    with building_layout(out) as tmp:  # a bad pair anywhere leaves nothing at out
        jobs = [(where, tmp, name, pairs[name], classes, fill) for name in names]
        counts = _run(jobs, workers, desc, progress)                     # [(filled, pixels)] in name order
        if classes is not None:
            save_classes(classes, tmp / "classes.json")
        if fill:
            holes = {name: n for name, (n, _) in zip(names, counts) if n}
            (tmp / "ir_filled.json").write_text(json.dumps({
                "filled": "thermal pixels that were 0 (projection holes), filled from their neighbours by "
                          "tools/importers.py fill_holes", "pairs": holes}, indent=1))
            total, pixels = sum(n for n, _ in counts), sum(size for _, size in counts)
            print(f"{where}: filled {total:,} thermal pixel(s) of 0 (projection holes), {100 * total / pixels:.2f}% "
                  f"of the set's thermal pixels, in {len(holes)} of {len(names)} image(s); per pair: "
                  f"{Path(out) / 'ir_filled.json'}")
    return len(pairs)


def _rel(src: Path, folder: Path) -> str:
    try:
        return str(folder.relative_to(src))
    except ValueError:
        return folder.name


def _folders(src: Path, folders: dict[str, Path], layout: str) -> dict[str, dict[str, Path]]:
    """{role: {stem: path}} for folders whose stems must match; a missing folder is a DataError giving the layout."""
    for folder in folders.values():
        if not folder.is_dir():
            raise DataError(f"{folder}: no such folder; {layout}")
    files = {role: list_images(folder) for role, folder in folders.items()}
    match_stems(src, {_rel(src, folders[role]): found for role, found in files.items()})
    return files


def _split(name: str, split: str | None, allowed=SPLITS) -> str:
    split = split or "train"
    if split not in allowed:
        raise DataError(f"{name}: --split {split!r}; this set has {', '.join(allowed)}")
    return split


def _no_split(name: str, split: str | None, hint: str):
    if split:
        raise DataError(f"{name} has no split files: {hint}")


def import_mfnet(src, out, progress=False, split=None) -> int:
    """MFNet: src/images/*.png are 4-channel RGB-T (0-2 RGB, 3 thermal), src/labels/*.png label ids 0..8; with a
    split, only the stems listed in src/<split>.txt."""
    src = Path(src)
    files = {"images": list_images(src / "images"), "labels": list_images(src / "labels")}
    names = match_stems(src, files)
    if split:
        names = _listed(src / f"{_split('MFNet', split, ('train', 'val', 'test'))}.txt", names)
    with building_layout(out) as tmp:  # a bad pair anywhere leaves nothing at out
        for name in tqdm(names, desc="import-mfnet", disable=not progress):
            img_path, label_path = files["images"][name], files["labels"][name]
            img = open_image(img_path)
            if img.mode != "RGBA":
                raise DataError(f"{img_path}: mode {img.mode}; MFNet images are 4-channel RGB-T PNGs "
                                "(thermal = 4th channel)")
            rgbt = np.asarray(img)                                                   # [H, W, 4] uint8
            ids = label_ids(label_path, MFNET_CLASSES)                               # [H, W]
            if ids.shape != rgbt.shape[:2]:
                raise DataError(f"{src}: pair {name!r}: image {rgbt.shape[1]}x{rgbt.shape[0]} "
                                f"but label {ids.shape[1]}x{ids.shape[0]}")
            write_pair(tmp, name, rgbt[..., :3], ids, rgbt[..., 3], MFNET_CLASSES)
        save_classes(MFNET_CLASSES, tmp / "classes.json")
    return len(names)


def _listed(split_file: Path, names: list[str]) -> list[str]:
    """The stems a split file lists (one per line), each of which must be one of `names`."""
    keys = _split_keys(split_file)
    if missing := sorted(set(keys) - set(names)):
        raise DataError(f"{split_file}: {len(missing)} listed stem(s) have no pair: {', '.join(missing[:10])}")
    return sorted(set(keys))


def _split_keys(split_file: Path) -> list[str]:
    """The keys a split file lists, one per line (a byte-order mark, as Windows editors write, is not a key's)."""
    try:
        keys = [line.strip() for line in split_file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{split_file}: cannot read the split file ({type(e).__name__}: {e})") from None
    if not keys:
        raise DataError(f"{split_file}: the split file lists no pairs")
    return [Path(k).stem if Path(k).suffix.lower() in IMAGE_EXTS else k for k in keys]


def import_fmb(src, out, progress=False, split=None, workers: int = 1) -> int:
    """FMB: src/Visible, src/Infrared, src/Label (ids 0..14) with matching stems; point src at one split."""
    src = Path(src)
    _no_split("FMB", split, f"point SRC at FMB/train or FMB/test (here {src})")
    if not (src / "Visible").is_dir() and any((src / s / "Visible").is_dir() for s in ("train", "test")):
        raise DataError(f"{src}: no Visible/ here, but a split folder has one; "
                        "import FMB/train and FMB/test separately")
    files = {d: list_images(src / d) for d in ("Visible", "Infrared", "Label")}
    names = match_stems(src, files)
    pairs = {n: (files["Visible"][n], files["Infrared"][n], files["Label"][n]) for n in names}
    return import_pairs(src, pairs, out, FMB_CLASSES, "import-fmb", progress, workers)


def import_msrs(src, out, progress=False, split=None, workers: int = 1) -> int:
    """MSRS: src/<split>/vi (RGB), ir, Segmentation_labels (MFNet's ids 0..8)."""
    src, split = Path(src), _split("MSRS", split)
    root = src / split
    files = _folders(src, {"rgb": root / "vi", "ir": root / "ir", "label": root / "Segmentation_labels"},
                     "MSRS is SRC/train|test/vi, ir, Segmentation_labels")
    pairs = {n: (files["rgb"][n], files["ir"][n], files["label"][n]) for n in files["rgb"]}
    return import_pairs(src, pairs, out, MFNET_CLASSES, f"import-msrs-{split}", progress, workers)


def import_pst900(src, out, progress=False, split=None, workers: int = 1) -> int:
    """PST900: src/<split>/rgb, thermal (FLIR's 8-bit AGC images projected into the RGB frame: 0 where no thermal
    pixel lands, filled by fill_holes), labels (ids 0..4)."""
    src, split = Path(src), _split("PST900", split)
    root = src / split
    files = _folders(src, {"rgb": root / "rgb", "ir": root / "thermal", "label": root / "labels"},
                     "PST900 is SRC/train|test/rgb, thermal, labels")
    pairs = {n: (files["rgb"][n], files["ir"][n], files["label"][n]) for n in files["rgb"]}
    return import_pairs(src, pairs, out, PST900_CLASSES, f"import-pst900-{split}", progress, workers, fill=True)


def import_m3fd(src, out, progress=False, split=None, workers: int = 1) -> int:
    """M3FD: src/Vis, src/Ir (point src at M3FD_Fusion or M3FD_Detection); no labels, no split."""
    src = Path(src)
    _no_split("M3FD", split, "import the whole folder")
    files = _folders(src, {"rgb": src / "Vis", "ir": src / "Ir"}, "M3FD is SRC/Vis and SRC/Ir")
    pairs = {n: (files["rgb"][n], files["ir"][n], None) for n in files["rgb"]}
    return import_pairs(src, pairs, out, None, "import-m3fd", progress, workers)


def import_llvip(src, out, progress=False, split=None, workers: int = 1) -> int:
    """LLVIP: src/visible/<split>, src/infrared/<split> (JPEGs, copied as they are); no labels."""
    src, split = Path(src), _split("LLVIP", split)
    files = _folders(src, {"rgb": src / "visible" / split, "ir": src / "infrared" / split},
                     "LLVIP is SRC/visible/train|test and SRC/infrared/train|test")
    pairs = {n: (files["rgb"][n], files["ir"][n], None) for n in files["rgb"]}
    return import_pairs(src, pairs, out, None, f"import-llvip-{split}", progress, workers)


# FLIR aligned's split files, looked for in this order (the first found is read): the release's own align_*.txt,
# then the VOC-style ImageSets/Main/ of its repackagings, several of which hold train.txt and val.txt only: there
# val.txt is the held-out set, so --split test reads it when no test list exists
FLIR_SPLIT_FILES = {"train": ("align_train.txt", "ImageSets/Main/train.txt"),
                    "test": ("align_validation.txt", "ImageSets/Main/test.txt", "ImageSets/Main/val.txt"),
                    "val": ("ImageSets/Main/val.txt",)}


def import_flir(src, out, progress=False, split=None, workers: int = 1) -> int:
    """FLIR aligned: src/JPEGImages/FLIR_XXXXX_RGB.jpg + FLIR_XXXXX_PreviewData.jpeg, the pairs of the split's first
    split file found (FLIR_SPLIT_FILES: the release's align_train.txt / align_validation.txt, else a VOC-style
    ImageSets/Main/<split>.txt). Split lines may name the thermal file (FLIR_00002_PreviewData, as the release does),
    the RGB one, or the pair (FLIR_00002); the output stem is FLIR_XXXXX. No labels."""
    src, split = Path(src), _split("FLIR", split, tuple(FLIR_SPLIT_FILES))
    images = src / "JPEGImages"
    if not images.is_dir():
        raise DataError(f"{images}: no such folder; FLIR aligned is SRC/JPEGImages + its split files "
                        "(align_train.txt, align_validation.txt or ImageSets/Main/*.txt)")
    split_file = next((src / f for f in FLIR_SPLIT_FILES[split] if (src / f).is_file()), None)
    if split_file is None:
        raise DataError(f"{src}: no split file for --split {split}: none of {', '.join(FLIR_SPLIT_FILES[split])}")
    found = {p.name: p for p in images.iterdir()}
    pairs, missing = {}, []
    for key in _split_keys(split_file):
        stem = re.sub(r"_(PreviewData|RGB)$", "", key)  # FLIR_00002_PreviewData -> FLIR_00002
        rgb, ir = found.get(f"{stem}_RGB.jpg"), found.get(f"{stem}_PreviewData.jpeg")
        if rgb is None or ir is None:
            missing.append(f"{stem}_RGB.jpg" if rgb is None else f"{stem}_PreviewData.jpeg")
        pairs[stem] = (rgb, ir, None)
    if missing:
        raise DataError(f"{split_file}: {len(missing)} listed file(s) are not in {images}: "
                        f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    return import_pairs(src, pairs, out, None, f"import-flir-{split} ({_rel(src, split_file)})", progress, workers)


IMPORTERS = {"mfnet": import_mfnet, "fmb": import_fmb, "msrs": import_msrs, "pst900": import_pst900,
             "m3fd": import_m3fd, "llvip": import_llvip, "flir": import_flir}
UNLABELLED = ("m3fd", "llvip", "flir")  # RGB-IR pairs only: tools.labels writes their semantic maps
SPLIT_HELP = {"mfnet": "train | val | test: only the stems SRC/<split>.txt lists (default: every pair)",
              "msrs": "train | test (default train)", "pst900": "train | test (default train)",
              "llvip": "train | test (default train)",
              "flir": "train (align_train.txt or ImageSets/Main/train.txt) | test (align_validation.txt, "
                      "ImageSets/Main/test.txt or val.txt) | val (ImageSets/Main/val.txt); default train"}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.importers", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in IMPORTERS:
        what = ("rgb/ ir/ (no labels: label with python -m tools.labels)" if name in UNLABELLED
                else "rgb/ sem/ ir/ + classes.json")
        p = sub.add_parser(name, help=f"convert {name.upper()} to {what}")
        p.add_argument("src")
        p.add_argument("out")
        if name in SPLIT_HELP:
            p.add_argument("--split", default=None, choices=("train", "val", "test"), help=SPLIT_HELP[name])
        if name != "mfnet":  # MFNet's 4-channel PNGs go through one loop of their own
            p.add_argument("--workers", type=int, default=default_workers(),
                           help=f"processes converting pairs (default: one per CPU core, here {default_workers()})")
    args = parser.parse_args(argv)
    extra = {"workers": args.workers} if args.cmd != "mfnet" else {}
    try:
        n = IMPORTERS[args.cmd](args.src, args.out, progress=True, split=getattr(args, "split", None), **extra)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.cmd in UNLABELLED:
        print(f"imported {n} pairs into {args.out} (rgb/, ir/; no semantic maps yet). Label them next: "
              f"python -m tools.labels {args.out} {args.out} --model DIR")
    else:
        print(f"imported {n} pairs into {args.out}")


if __name__ == "__main__":
    main()
