"""
Paired data for visible -> infrared generation: loading and checking (visible RGB, semantic map, infrared)
triples. Public RGB-T sets are converted to this layout by tools/importers.py, synthetic scenes come from
tools/synth.py.

Dataset layout (what PairedDataset reads, and what tools/importers.py and tools/synth.py write):

    root/rgb/<stem>.png    visible image
    root/sem/<stem>.png    semantic map: colours from the class palette, or an index image of label ids
    root/ir/<stem>.png     infrared image, 8-bit or 16-bit grey
    root/classes.json      optional; without it the synthetic classes (DEFAULT_CLASSES) are used

Files pair up by stem; .png .jpg .jpeg .bmp .tif .tiff are read (any case). Sides must be multiples of 16
(8x VAE downsampling times FLUX's 2x2 patches); otherwise pass size=S (--size S): every pair is then served at
about S*S pixels at its own aspect ratio, each side the nearest multiple of 16, and only the few pixels that
rounding cuts are cropped from the centre (served_size, resize_pair; crop_note says how many). Pairs served at
different sizes fall into buckets, one per size; a training batch comes from one bucket. Sizes that disagree
inside a pair are an error, never silently resized.

classes.json:
    {"classes": [{"id": 0, "name": "background", "color": [0, 0, 0], "hot": false}, ...]}
"hot" marks classes that are hot targets in infrared (people, running engines); evaluation uses it for the
hallucination and miss rates. ids are 0..65535, colours and names unique, "hot" defaults to false.

How image modes are read (PIL modes; every loader first applies the EXIF orientation, like a photo viewer):
    load_rgb  -> [3, H, W] float in [-1, 1]
        RGB as is; L and 1 are replicated to 3 channels; P goes through its palette; CMYK/YCbCr are converted.
        Alpha (RGBA, LA, PA) is DROPPED, not composited: RGB-T datasets such as MFNet keep thermal in the 4th
        channel, and treating it as transparency would darken the picture by temperature.
        16-bit grey (I;16*, I) is scaled by 65535.
    load_ir   -> [1, H, W] float in [0, 1]
        8-bit grey (L, 1, LA) is scaled by 255 and 16-bit grey (I;16*, I) by 65535, so 8- and 16-bit files
        of the same scene agree. Colour files (RGB, P, ...) are reduced to the mean of their channels: exact
        for grey stored as RGB (LLVIP, FLIR), meaningless for false-colour IR, which cannot be inverted.
    load_semantic -> (ids [H, W] long, colour [3, H, W] float in [-1, 1])
        Index images (L, 1, I;16*, I; LA with alpha dropped) hold label ids. Colour images (RGB, RGBA with
        alpha dropped, ...) are mapped back through the class palette, and a colour that is not in it is an
        error (JPEG artefacts and anti-aliased edges are the usual cause: keep semantic maps lossless).
        Palette images (P, PA) are colour maps when the colours of their used indices are all class colours
        (a lossless re-save of a colour map, e.g. by optipng), else index images (palette index = label id);
        one that fits both readings with different ids (a label-id image with the VOC palette) is an error.
        The returned colour is always re-rendered from the ids with the class palette.
    32-bit float images (F) are refused: their scale is unknown.
Images over MAX_PIXELS (width x height, checked from the header before any pixel is decoded) are refused;
set FLUX_IR_MAX_PIXELS=N, or pass max_pixels=N (data.py check --max-pixels N), to allow larger ones.
Every problem with a file or folder raises DataError (a ValueError) whose message names the file.

Commands (python data.py -h):
    check ROOT [--size S] [--max-pixels N]   decode every pair and print a summary
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from PIL import BmpImagePlugin, JpegImagePlugin, PngImagePlugin, TiffImagePlugin  # noqa: F401
from tqdm import tqdm

from checkpoint import pid_alive

FOLDERS = ("rgb", "sem", "ir")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Only these decoders may run (imported above so they are registered): PIL would otherwise hand some files
# (EPS) to external programs. Phone JPEGs that PIL calls MPO come through the JPEG decoder.
PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
MULTIPLE = 16  # 8x VAE downsampling * 2x2 patch packing
# Largest image read by default (e.g. 8192x4096): a few hundred KB of PNG can claim 100M pixels and many GB of
# memory. FLUX_IR_MAX_PIXELS (or a max_pixels argument) overrides it.
MAX_PIXELS = 1 << 25
PIXELS_ENV = "FLUX_IR_MAX_PIXELS"


class DataError(ValueError):
    """A file, folder or class table that cannot be used: the message names it and says what is wrong."""


# -----------------------------------------------------------------------------
# Classes

@dataclass(frozen=True)
class SemClass:
    id: int
    name: str
    color: tuple[int, int, int]
    hot: bool = False


def class_table(rows) -> tuple[SemClass, ...]:
    """(id, name, (r, g, b), hot) rows -> a class table."""
    return tuple(SemClass(i, name, tuple(color), hot) for i, name, color, hot in rows)


# Synthetic scenes (tools/synth.py). poster / car_parked look exactly like person / car_running in RGB.
DEFAULT_CLASSES = class_table([
    (0, "sky", (70, 130, 180), False),
    (1, "road", (128, 64, 128), False),
    (2, "building", (70, 70, 70), False),
    (3, "vegetation", (107, 142, 35), False),
    (4, "person", (220, 20, 60), True),
    (5, "poster", (255, 170, 0), False),
    (6, "car_running", (0, 0, 142), True),
    (7, "car_parked", (0, 170, 170), False),
])


def validate_classes(classes, where="classes") -> tuple[SemClass, ...]:
    """Check a class table: non-empty, ids 0..65535, colours 3 ints in 0..255, ids/colours/names unique."""
    classes = tuple(classes)
    if not classes:
        raise DataError(f"{where}: no classes")
    seen = {"id": {}, "color": {}, "name": {}}
    for c in classes:
        if isinstance(c.id, bool) or not isinstance(c.id, int) or not 0 <= c.id <= 65535:
            raise DataError(f"{where}: class {c.name!r} has id {c.id!r}; ids are integers 0..65535")
        if not isinstance(c.name, str) or not c.name:
            raise DataError(f"{where}: class id {c.id} has name {c.name!r}; names are non-empty strings")
        if (len(c.color) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 255
                                     for v in c.color)):
            raise DataError(f"{where}: class {c.name!r} has color {list(c.color)}; "
                            "colours are [r, g, b], ints 0..255")
        if not isinstance(c.hot, bool):
            raise DataError(f"{where}: class {c.name!r} has hot {c.hot!r}; hot is true or false")
        for key, value in (("id", c.id), ("color", tuple(c.color)), ("name", c.name)):
            if value in seen[key]:
                raise DataError(f"{where}: classes {seen[key][value]!r} and {c.name!r} share the {key} {value}")
            seen[key][value] = c.name
    return classes


def load_classes(path=None) -> tuple[SemClass, ...]:
    """Read and validate a classes.json; None gives DEFAULT_CLASSES."""
    if path is None:
        return DEFAULT_CLASSES
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; a class table is a JSON file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise DataError(f"{path}: cannot read class table ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("classes"), list):
        raise DataError(f'{path}: expected {{"classes": [{{"id", "name", "color", "hot"}}, ...]}}')
    return classes_from_rows(doc["classes"], str(path))


def classes_from_rows(rows: list, where: str) -> tuple[SemClass, ...]:
    """[{"id", "name", "color", "hot"}, ...] (a classes.json's list, or a run config's) -> validated classes."""
    classes = []
    for i, entry in enumerate(rows):
        if not isinstance(entry, dict):
            raise DataError(f"{where}: classes[{i}] is not an object")
        missing = {"id", "name", "color"} - entry.keys()
        unknown = entry.keys() - {"id", "name", "color", "hot"}  # strict, so a typo like "colour" is caught
        if missing or unknown:
            raise DataError(f"{where}: classes[{i}] missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
        color = entry["color"]
        if not isinstance(color, list):
            raise DataError(f"{where}: classes[{i}] color {color!r} is not a list [r, g, b]")
        classes.append(SemClass(entry["id"], entry["name"], tuple(color), entry.get("hot", False)))
    return validate_classes(classes, where=where)


def save_classes(classes, path):
    """Write a classes.json, one class per line."""
    rows = [json.dumps({"id": c.id, "name": c.name, "color": list(c.color), "hot": c.hot}) for c in classes]
    Path(path).write_text('{"classes": [\n  ' + ",\n  ".join(rows) + "\n]}\n", encoding="utf-8")


def hot_ids(classes) -> list[int]:
    return [c.id for c in classes if c.hot]


def palette(classes) -> np.ndarray:
    """uint8 [max_id + 1, 3]: row i is the colour of class id i (black for unused ids)."""
    lut = np.zeros((max(c.id for c in classes) + 1, 3), np.uint8)
    for c in classes:
        lut[c.id] = c.color
    return lut


def render_semantic(ids, classes) -> torch.Tensor:
    """Label ids [..., H, W] (tensor or array) -> colour [..., 3, H, W] float in [-1, 1] via the class palette."""
    lut = torch.from_numpy(palette(classes)).float() / 127.5 - 1
    ids = torch.as_tensor(ids).long()
    return lut[ids].movedim(-1, -3).contiguous()  # [..., H, W, 3] -> [..., 3, H, W]


def misalign(ids: torch.Tensor, dy: int = 0, dx: int = 0, down: int = 1) -> torch.Tensor:
    """A label map [..., H, W] as a misregistered pair or a coarse segmenter gives it: its content moved by (dy, dx)
    pixels (down/right positive; the edge rows/columns repeat into the gap), then coarsened: every down x down
    cell takes the label at its centre and is upsampled back by nearest neighbour."""
    H, W = ids.shape[-2:]
    rows = (torch.arange(H) - dy).clamp(0, H - 1)
    cols = (torch.arange(W) - dx).clamp(0, W - 1)
    out = ids[..., rows[:, None], cols[None, :]]  # [..., H, W]: out[y, x] = ids[y - dy, x - dx]
    if down > 1:
        rows = (torch.arange(H) // down * down + down // 2).clamp(max=H - 1)
        cols = (torch.arange(W) // down * down + down // 2).clamp(max=W - 1)
        out = out[..., rows[:, None], cols[None, :]]
    return out


# -----------------------------------------------------------------------------
# Reading one image

def pixel_limit(limit=None) -> int:
    """The image size limit in pixels: `limit` if given, else $FLUX_IR_MAX_PIXELS if set, else MAX_PIXELS."""
    where = "max_pixels (--max-pixels)"
    if limit is None:
        where, limit = PIXELS_ENV, os.environ.get(PIXELS_ENV, MAX_PIXELS)
        try:
            limit = int(limit)
        except ValueError:
            pass  # refused below, quoting the text
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise DataError(f"{where} is {limit!r}; it must be a positive whole number of pixels")
    return limit


def _check_pixels(path, img, limit):
    """Refuse an opened (not yet decoded) image whose header claims more than `limit` pixels."""
    limit = pixel_limit(limit)
    if img.width * img.height > limit:
        raise DataError(f"{path}: {img.width}x{img.height} is {img.width * img.height:,} pixels, over the limit "
                        f"of {limit:,}; set {PIXELS_ENV}=N (data.py check --max-pixels N) to allow larger images")


def open_image(path, max_pixels=None) -> Image.Image:
    """Decode an image fully and apply its EXIF orientation. Any failure -> DataError naming the file.
    An image over the pixel limit (see pixel_limit()) is refused from its header, before decoding."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with Image.open(path, formats=PIL_FORMATS) as img:
            _check_pixels(path, img, max_pixels)
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:
                pass  # unreadable EXIF: keep the pixels as stored, as most viewers do
    except DataError:
        raise
    except Exception as e:  # PIL's decoders raise a zoo of types on bad input (OSError, SyntaxError, struct.error...)
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e}); "
                        "expected an uncorrupted PNG/JPEG/BMP/TIFF file") from e
    if img.width == 0 or img.height == 0:
        raise DataError(f"{path}: image is empty ({img.width}x{img.height})")
    return img


def image_size(path, max_pixels=None) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only: cheap enough for thousands of files.
    An image over the pixel limit (see pixel_limit()) is a DataError."""
    path = Path(path)
    try:
        with Image.open(path, formats=PIL_FORMATS) as img:
            _check_pixels(path, img, max_pixels)
            w, h = img.size
            # PNG.getexif() decodes the whole image when no EXIF was seen yet; only ask when the header had one.
            has_exif = img.format != "PNG" or any(k in img.info for k in ("exif", "XML:com.adobe.xmp", "xmp"))
            try:
                orientation = img.getexif().get(0x0112, 1) if has_exif else 1
            except Exception:
                orientation = 1  # same leniency as open_image
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read image header ({type(e).__name__}: {e})") from e
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # these orientations swap the sides


def _is_int_grey(img) -> bool:
    return img.mode == "I" or img.mode.startswith("I;16")


def _grey16(img, path) -> np.ndarray:
    """16-bit grey (I;16*, I) -> int64 [H, W], checked to lie in 0..65535."""
    a = np.asarray(img).astype(np.int64)
    if a.size and (a.min() < 0 or a.max() > 65535):
        raise DataError(f"{path}: mode {img.mode} values span {a.min()}..{a.max()}, outside 16-bit 0..65535")
    return a


def _refuse_float(img, path):
    if img.mode == "F":
        raise DataError(f"{path}: 32-bit float image (mode F) has no known scale; save it as 8- or 16-bit")


def _as_rgb(img) -> Image.Image:
    """8-bit modes -> RGB: alpha dropped, P through its palette, grey replicated."""
    if img.mode in ("La", "RGBa"):  # premultiplied alpha: PIL converts these only to their straight forms
        img = img.convert(img.mode.upper())
    return img.convert("RGB")


def rgb01(img, path) -> np.ndarray:
    """Any supported mode -> float32 [H, W, 3] in [0, 1]."""
    _refuse_float(img, path)
    if _is_int_grey(img):
        return np.repeat(_grey16(img, path)[..., None] / 65535.0, 3, axis=2).astype(np.float32)
    return np.asarray(_as_rgb(img), np.float32) / 255.0


def ir01(img, path) -> tuple[np.ndarray, int]:
    """Any supported mode -> (float32 [H, W] in [0, 1], bit depth of the source: 8 or 16)."""
    _refuse_float(img, path)
    if _is_int_grey(img):
        return (_grey16(img, path) / 65535.0).astype(np.float32), 16
    if img.mode in ("L", "1", "LA", "La"):
        return np.asarray(img.getchannel(0).convert("L"), np.float32) / 255.0, 8
    return rgb01(img, path).mean(axis=2), 8  # grey stored as colour: the channels are equal


def _color_code(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] ints -> [...] one int per colour (0xRRGGBB)."""
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def semantic_ids(img, path, classes, index_palette: bool = False) -> np.ndarray:
    """Index or colour semantic image -> int64 [H, W] of label ids, every one of them a class id. index_palette: a
    palette (P) image is an index image (palette index = label id), as the published RGB-T sets store their labels,
    whatever colours its palette holds (tools/importers.py)."""
    _refuse_float(img, path)
    if _is_int_grey(img):
        ids = _grey16(img, path)
    elif img.mode in ("P", "PA"):
        ids = np.asarray(img.getchannel(0)).astype(np.int64) if index_palette else _palette_ids(img, path, classes)
    elif img.mode in ("L", "1", "LA", "La"):
        ids = np.asarray(img.getchannel(0)).astype(np.int64)
    else:
        return _ids_from_colours(np.asarray(_as_rgb(img), np.int64), path, classes)
    valid = np.zeros(65536, bool)
    valid[[c.id for c in classes]] = True
    ok = (ids >= 0) & (ids <= 65535)
    ok[ok] = valid[ids[ok]]
    if not ok.all():
        bad, counts = np.unique(ids[~ok], return_counts=True)
        listed = ", ".join(f"{b} x {n} px" for b, n in list(zip(bad, counts))[:10])
        raise DataError(f"{path}: label id(s) not in the class table: {listed}{' ...' if len(bad) > 10 else ''}; "
                        f"known ids: {sorted(c.id for c in classes)}")
    return ids


def _palette_ids(img, path, classes) -> np.ndarray:
    """P / PA image -> int64 [H, W]: ids from the colours when the used indices' palette colours are all class
    colours (a colour map, e.g. a lossless palette re-save of an RGB map), else the palette indices (an index image,
    checked against the class ids by the caller). A map that fits both readings with different ids (a label-id
    image saved with a standard palette such as VOC's, whose colours happen to be class colours) is refused: which
    one was meant cannot be told from the file."""
    index = np.asarray(img.getchannel(0)).astype(np.int64)
    used = np.flatnonzero(np.bincount(index.ravel(), minlength=256)).tolist()
    pal, by_colour = img.getpalette("RGB") or [], {c.color: c for c in classes}
    named = [by_colour.get(tuple(pal[3 * i:3 * i + 3])) for i in used]  # the class each used colour is, or None
    if None in named:
        return index
    by_colour_ids = [c.id for c in named]
    ids = {c.id for c in classes}
    if all(i in ids for i in used) and by_colour_ids != used:
        differ = [(i, c) for i, c in zip(used, named) if i != c.id][:3]
        listed = ", ".join(f"index {i} is class {i} by id but {c.name} (id {c.id}) by colour" for i, c in differ)
        raise DataError(f"{path}: a palette image that reads as label ids and as class colours, with different "
                        f"classes ({listed}); save it as a grey label-id image (mode L) or as an RGB colour map")
    lut = np.zeros(256, np.int64)
    lut[used] = by_colour_ids
    return lut[index]


def _ids_from_colours(rgb: np.ndarray, path, classes) -> np.ndarray:
    """[H, W, 3] colours -> [H, W] ids through the class palette; a colour not in it is an error."""
    code = _color_code(rgb)                                                       # [H, W, 3] -> [H, W]
    table = sorted((int(_color_code(np.array(c.color))), c.id) for c in classes)
    known, known_ids = np.array([k for k, _ in table]), np.array([i for _, i in table], np.int64)
    pos = np.clip(np.searchsorted(known, code), 0, len(known) - 1)  # a sorted lookup, no per-pixel dict
    ok = known[pos] == code
    if not ok.all():
        bad, counts = np.unique(code[~ok], return_counts=True)
        top = np.argsort(-counts)[:5]
        listed = ", ".join(f"({b >> 16}, {(b >> 8) & 255}, {b & 255}) x {n} px"
                           for b, n in zip(bad[top], counts[top]))
        lossy = Path(path).suffix.lower() in (".jpg", ".jpeg")
        hint = " (JPEG invents colours: keep semantic maps PNG)" if lossy else ""
        raise DataError(f"{path}: {len(bad)} colour(s) not in the class palette, {int(counts.sum())} px in all: "
                        f"{listed}{' ...' if len(bad) > 5 else ''}{hint}")
    return known_ids[pos]


def load_rgb(path, max_pixels=None) -> torch.Tensor:
    """Visible image -> float [3, H, W] in [-1, 1]."""
    rgb = rgb01(open_image(path, max_pixels), path)
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous() * 2 - 1  # [H, W, 3] in [0,1] -> [3, H, W] in [-1,1]


def load_ir(path, max_pixels=None) -> torch.Tensor:
    """Infrared image -> float [1, H, W] in [0, 1] (8-bit / 255, 16-bit / 65535)."""
    ir, _ = ir01(open_image(path, max_pixels), path)
    return torch.from_numpy(ir)[None]  # [H, W] -> [1, H, W]


def load_semantic(path, classes, max_pixels=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantic map -> (ids long [H, W], colour float [3, H, W] in [-1, 1] rendered from the ids)."""
    ids = torch.from_numpy(semantic_ids(open_image(path, max_pixels), path, classes))
    return ids, render_semantic(ids, classes)


def ir_to_rgb(ir: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] in [0, 1] -> [B, 3, H, W] in [-1, 1]: the VAE takes 3 channels."""
    if ir.dim() < 3 or ir.shape[-3] != 1:
        raise DataError(f"ir_to_rgb: expected [B, 1, H, W], got {list(ir.shape)}")
    return (ir * 2 - 1).repeat_interleave(3, dim=-3)


def rgb_to_ir(rgb: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, 1, H, W] in [0, 1], the mean of the channels (clamped)."""
    if rgb.dim() < 3 or rgb.shape[-3] != 3:
        raise DataError(f"rgb_to_ir: expected [B, 3, H, W], got {list(rgb.shape)}")
    return ((rgb.mean(dim=-3, keepdim=True) + 1) / 2).clamp(0, 1)


# -----------------------------------------------------------------------------
# Folders of pairs

def list_images(folder) -> dict[str, Path]:
    """stem -> path for the image files in a folder. Hidden files and other extensions are ignored; a link whose
    target is gone is an error naming every such link."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    files, broken = {}, []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_EXTS:
            continue
        if p.is_symlink() and not p.exists():
            broken.append(f"{p.name} -> {os.readlink(p)}")
            continue
        if not p.is_file():
            continue
        if p.stem in files:
            raise DataError(f"{folder}: two files share the stem {p.stem!r}: {files[p.stem].name} and {p.name}")
        files[p.stem] = p
    if broken:
        raise DataError(f"{folder}: {len(broken)} link(s) whose target is missing: {', '.join(broken[:5])}"
                        + (f" ... and {len(broken) - 5} more" if len(broken) > 5 else ""))
    return files


def match_stems(where, files: dict[str, dict[str, Path]]) -> list[str]:
    """Stems present in every folder; any stem missing from some folder is an error listing them."""
    every = set.union(*(set(f) for f in files.values()))
    if not every:
        raise DataError(f"{where}: no images ({', '.join(IMAGE_EXTS)}) in {', '.join(k + '/' for k in files)}")
    problems = []
    for folder, found in files.items():
        missing = sorted(every - set(found))
        if missing:
            shown = ", ".join(missing[:10]) + (f" ... and {len(missing) - 10} more" if len(missing) > 10 else "")
            problems.append(f"  {len(missing)} stem(s) missing from {folder}/: {shown}")
    if problems:
        raise DataError(f"{where}: file stems do not match across {', '.join(k + '/' for k in files)}\n"
                        + "\n".join(problems))
    return sorted(every)


def served_size(w: int, h: int, size: int | None) -> tuple[int, int]:
    """(width, height) at which a w x h image is served. size=None: as stored. size=S: about S*S pixels at the image's
    own aspect ratio, each side the nearest multiple of 16 (at least 16). 640x480 at 512 -> 592x448, 1280x720 at
    512 -> 688x384, a square at 512 -> 512x512."""
    if not size:
        return w, h
    scale = math.sqrt(size * size / (w * h))
    return (max(MULTIPLE, round(w * scale / MULTIPLE) * MULTIPLE),
            max(MULTIPLE, round(h * scale / MULTIPLE) * MULTIPLE))


def _cover(w: int, h: int, out_w: int, out_h: int) -> tuple[int, int]:
    """The size w x h is resized to, aspect kept, before its centre out_w x out_h is cropped: the smallest that
    covers the crop, so only what rounding the sides to multiples of 16 changed in the aspect ratio is cut."""
    scale = max(out_w / w, out_h / h)
    return max(out_w, round(w * scale)), max(out_h, round(h * scale))


def _resize_crop(x: torch.Tensor, out_w: int, out_h: int, mode: str) -> torch.Tensor:
    """[C, H, W] -> [C, out_h, out_w]: resized (aspect kept) to cover out_w x out_h, then the centre cropped."""
    h, w = x.shape[-2:]
    nw, nh = _cover(w, h, out_w, out_h)
    if (nh, nw) != (h, w):
        x = F.interpolate(x[None].float(), size=(nh, nw), mode=mode, antialias=mode == "bicubic")[0]
    top, left = (nh - out_h) // 2, (nw - out_w) // 2
    return x[:, top:top + out_h, left:left + out_w]


def crop_note(sizes, size: int | None) -> str:
    """One line saying how much of the images (stored sizes (w, h), one per pair) serving them at `size` crops: the
    pixels lost to rounding the sides to multiples of 16 (served_size). "" when nothing is cropped."""
    counts, lines, least = Counter(sizes), [], 1.0
    for (w, h), n in sorted(counts.items()):
        out_w, out_h = served_size(w, h, size)
        nw, nh = _cover(w, h, out_w, out_h)
        if (nw, nh) == (out_w, out_h):
            continue
        side, kept = ("width", out_w / nw) if nw != out_w else ("height", out_h / nh)
        least = min(least, kept)
        lines.append(f"{w}x{h} -> {out_w}x{out_h} keeps {math.floor(kept * 1000) / 10}% of its {side} ({n} pair"
                     f"{'s' if n > 1 else ''})")
    if not lines:
        return ""
    more = f"; {len(lines) - 3} more sizes, the least kept {math.floor(least * 1000) / 10}%" if len(lines) > 3 else ""
    return (f"--size {size} crops the centre to sides that are multiples of {MULTIPLE}: " + "; ".join(lines[:3])
            + more)


def trained_sizes(run_cfg: dict) -> list[tuple[int, int]]:
    """The (width, height) a train.py output was trained at, from its run config: "train_sizes" (one [w, h] per
    bucket), else "size" S as SxS (runs from before buckets), else [] (the stored sizes of an unknown set)."""
    rows = run_cfg.get("train_sizes")
    if isinstance(rows, list) and rows and all(isinstance(r, list) and len(r) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in r) for r in rows):
        return [(w, h) for w, h in rows]
    size = run_cfg.get("size")
    return [(size, size)] if isinstance(size, int) and not isinstance(size, bool) and size > 0 else []


FAR = 2.0  # sampling at more than twice, or less than half, the pixels of every training size gets a note


def size_note(served, trained) -> str:
    """One line when images served at `served` sizes [(w, h), ...] hold more than FAR times, or less than 1/FAR of,
    the pixels of every `trained` size (trained_sizes); "" when none does or the training sizes are unknown."""
    if not trained:
        return ""
    areas = [w * h for w, h in trained]
    far = [(w, h) for w, h in served if all(max(w * h / a, a / (w * h)) > FAR for a in areas)]
    if not far:
        return ""
    w, h = far[0]
    nearest = min(areas, key=lambda a: abs(math.log(w * h / a)))
    ratio = w * h / nearest
    how = f"{ratio:.1f}x the" if ratio > 1 else f"1/{1 / ratio:.1f} of the"
    where = f"{len(far)} of {len(served)} images are" if len(served) > 1 else "the image is"
    side = round(math.sqrt(nearest) / MULTIPLE) * MULTIPLE
    return (f"{where} sampled far from the training size: {w}x{h} is {how} pixels of the nearest training size "
            f"({', '.join(f'{tw}x{th}' for tw, th in trained[:3])}{' ...' if len(trained) > 3 else ''}); the model "
            f"has not seen that scale: --size {side} samples at about the training size")


def resize_pair(size: int | None, classes, rgb: torch.Tensor, ids: torch.Tensor, ir: torch.Tensor | None = None):
    """The one preprocessing of training, evaluation and sampling. size=S serves the pair at about S*S pixels at its
    own aspect ratio, sides multiples of 16 (served_size): resized to cover that size, then the centre cropped (only
    the few pixels the rounding of the sides cuts; crop_note says how many). rgb [3, H, W] and ir [1, H, W] bicubic
    with antialias, clamped back into their ranges (bicubic overshoots); label ids [H, W] nearest-exact, which never
    mixes labels. None keeps them. Returns (rgb, colour [3, H', W'] rendered from the ids, ids, ir)."""
    if size:
        out_w, out_h = served_size(rgb.shape[-1], rgb.shape[-2], size)
        rgb = _resize_crop(rgb, out_w, out_h, "bicubic").clamp(-1, 1)
        ids = _resize_crop(ids[None].float(), out_w, out_h, "nearest-exact")[0].long()  # exact for ids < 2^24
        ir = None if ir is None else _resize_crop(ir, out_w, out_h, "bicubic").clamp(0, 1)
    return rgb, render_semantic(ids, classes), ids, ir


def load_pair(rgb_path, sem_path, classes, size: int | None, max_pixels=None):
    """One user's (visible, semantic map) pair -> (rgb [3, H, W], sem colour [3, H, W], ids [H, W] long).

    The two must have the same size. size=None needs sides that are multiples of 16; size=S serves the pair at about
    S*S pixels, aspect kept, as training does (resize_pair). max_pixels: the image size limit (None: see
    pixel_limit()).
    """
    rgb = load_rgb(rgb_path, max_pixels)
    ids, sem = load_semantic(sem_path, classes, max_pixels)
    if rgb.shape[-2:] != sem.shape[-2:]:
        raise DataError(f"{rgb_path} is {rgb.shape[2]}x{rgb.shape[1]} but {sem_path} is "
                        f"{sem.shape[2]}x{sem.shape[1]}: the semantic map must match the image")
    if size:
        rgb, sem, ids, _ = resize_pair(size, classes, rgb, ids)
    elif rgb.shape[1] % MULTIPLE or rgb.shape[2] % MULTIPLE:
        raise DataError(f"{rgb_path}: {rgb.shape[2]}x{rgb.shape[1]} is not a multiple of {MULTIPLE} on each side; "
                        "pass --size S to serve it at about SxS pixels, aspect kept")
    return rgb, sem, ids


def draw_bucket(sizes: list[int], g: torch.Generator) -> int:
    """Which bucket a training batch comes from: drawn from `g` in proportion to the buckets' `sizes` (their pairs),
    so every pair is as likely as in a set of one size. One bucket draws nothing from `g`: a set of one size keeps
    the random stream it had before there were buckets."""
    if len(sizes) == 1:
        return 0
    return torch.multinomial(torch.tensor(sizes, dtype=torch.float), 1, generator=g).item()


class PairedDataset(torch.utils.data.Dataset):
    """(rgb, sem, ir) triples from root/{rgb,sem,ir}/<stem>.* (see the module docstring).

    size=None keeps each image's size (sides must be multiples of 16); size=S serves each pair at about S*S
    pixels at its own aspect ratio, sides multiples of 16 (served_size, resize_pair: bicubic with antialias for
    rgb/ir, nearest for the semantic ids so they stay valid labels; crop_note() says what the rounding crops).
    classes: None -> root/classes.json if present, else DEFAULT_CLASSES; or a path, or a sequence of SemClass.
    max_pixels: the image size limit (None: see pixel_limit()).

    sizes[i] / served[i]: pair i's (width, height) on disk / as served. buckets(): the pairs grouped by served size
    (a training batch is drawn from one bucket).
    item = {"name": stem, "rgb": [3,H,W] in [-1,1], "sem": colour [3,H,W] in [-1,1], "sem_ids": [H,W] long,
            "ir": [1,H,W] in [0,1]}   (H, W: served[i])
    """

    def __init__(self, root, size=None, classes=None, max_pixels=None):
        self.root = root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: no such dataset folder")
        missing = [d + "/" for d in FOLDERS if not (root / d).is_dir()]
        if missing:
            labels = (f"; make sem/ from rgb/ with a segmentation model: python -m tools.labels {root} {root} "
                      "--model DIR" if "sem/" in missing else "")
            raise DataError(f"{root}: missing folder(s) {', '.join(missing)}; expected {root}/rgb, sem, ir "
                            f"with matching file stems{labels}")
        valid_size = isinstance(size, int) and not isinstance(size, bool) and size > 0 and size % MULTIPLE == 0
        if size is not None and not valid_size:
            raise DataError(f"{root}: size={size!r}; it must be a positive multiple of {MULTIPLE}")
        self.size, self.max_pixels = size, pixel_limit(max_pixels)
        if classes is None:
            found = root / "classes.json"  # a folder or a broken link there is an error, not "no table"
            classes = found if found.exists() or found.is_symlink() else None
        if classes is None or isinstance(classes, (str, Path)):
            self.classes = load_classes(classes)
        else:
            self.classes = validate_classes(classes)
        self.files = {d: list_images(root / d) for d in FOLDERS}
        self.names = match_stems(root, self.files)

        # Check every pair from the headers alone; decoding all files here would make startup slow.
        self.sizes, mismatched, unaligned = [], [], []
        for name in self.names:
            sizes = {d: image_size(self.files[d][name], self.max_pixels) for d in FOLDERS}
            if len(set(sizes.values())) > 1:
                mismatched.append(f"  {name}: " + ", ".join(f"{d} {w}x{h}" for d, (w, h) in sizes.items()))
            w, h = sizes["rgb"]
            if w % MULTIPLE or h % MULTIPLE:
                unaligned.append(f"{name} {w}x{h}")
            self.sizes.append((w, h))
        if mismatched:
            raise DataError(f"{root}: {len(mismatched)} pair(s) whose rgb/sem/ir sizes disagree (align them; "
                            "they are not resized silently):\n" + "\n".join(mismatched[:10])
                            + (f"\n  ... and {len(mismatched) - 10} more" if len(mismatched) > 10 else ""))
        if unaligned and size is None:
            raise DataError(f"{root}: {len(unaligned)} pair(s) have sides that are not multiples of {MULTIPLE} "
                            f"(e.g. {', '.join(unaligned[:3])}); pass size=S (--size S) to serve them at about SxS "
                            "pixels, aspect kept")
        self.served = [served_size(w, h, size) for w, h in self.sizes]

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        name = self.names[i]
        paths = {d: self.files[d][name] for d in FOLDERS}
        rgb = load_rgb(paths["rgb"], self.max_pixels)                          # [3, H, W]
        ids, sem = load_semantic(paths["sem"], self.classes, self.max_pixels)  # [H, W], [3, H, W]
        ir = load_ir(paths["ir"], self.max_pixels)                             # [1, H, W]
        shapes = {"rgb": tuple(rgb.shape[-2:]), "sem": tuple(ids.shape), "ir": tuple(ir.shape[-2:])}
        if len(set(shapes.values())) > 1:  # the header check can miss an orientation stored after the pixels
            raise DataError(f"{self.root}: pair {name!r} decodes to different sizes (HxW): {shapes}")
        if self.size is not None:
            rgb, sem, ids, ir = resize_pair(self.size, self.classes, rgb, ids, ir)
        return {"name": name, "rgb": rgb, "sem": sem, "sem_ids": ids, "ir": ir}

    def buckets(self) -> dict[tuple[int, int], list[int]]:
        """The pairs grouped by served (width, height), in order of size: {(w, h): [pair index, ...]}. Every training
        batch comes from one bucket (its cached tokens are one [N_b, L_b, 64] tensor)."""
        groups = {}
        for i, shape in enumerate(self.served):
            groups.setdefault(shape, []).append(i)
        return dict(sorted(groups.items()))

    def crop_note(self) -> str:
        """One line saying how much of the images the served size crops ("" when nothing is): crop_note."""
        return crop_note(self.sizes, self.size)

    def describe_buckets(self) -> str:
        """"592x448 (12 pairs), 688x384 (3 pairs)": the buckets in one line."""
        return ", ".join(f"{w}x{h} ({len(idx)} pair{'s' if len(idx) > 1 else ''})"
                         for (w, h), idx in self.buckets().items())

    def validate(self, progress: bool = False) -> None:
        """Decode every semantic map through the class palette (the headers and sizes were checked on construction):
        one DataError naming every problem, before any work is done with the set."""
        failures = []
        for name in tqdm(self.names, desc="checking semantic maps", disable=not progress):
            try:
                semantic_ids(open_image(self.files["sem"][name], self.max_pixels), self.files["sem"][name],
                             self.classes)
            except DataError as e:
                failures.append(str(e))
        if failures:
            raise DataError(f"{self.root}: {len(failures)} problem(s) with its {len(self)} pairs:\n"
                            + "\n".join(failures[:20]) + (f"\n... and {len(failures) - 20} more" if len(failures) > 20
                                                          else ""))

    def fingerprint(self, progress: bool = False) -> str:
        """A hash of what the set serves: every file's bytes (not its name, size or time: two swapped files of one size
        and time differ), the class table, the size and (with a size) the sizes it is served at, which the sizing
        rule decides. The files are read once per dataset object."""
        if getattr(self, "_content", None) is None:
            h = hashlib.sha256()
            for name in tqdm(self.names, desc="hashing the dataset", disable=not progress):
                for d in FOLDERS:
                    h.update(f"{d}/{name}\0".encode())
                    with open(self.files[d][name], "rb") as f:
                        while chunk := f.read(1 << 20):
                            h.update(chunk)
            self._content = h.hexdigest()
        sizing = [[list(shape) for shape in self.served]] if self.size else []  # no size: served as stored, as before
        served = json.dumps([self._content, self.size, [c.__dict__ for c in self.classes]] + sizing)
        return hashlib.sha256(served.encode()).hexdigest()[:20]


def check(root, size=None, progress=False, max_pixels=None) -> str:
    """Decode every pair of a dataset folder; return a printable summary, or raise DataError listing failures."""
    ds = PairedDataset(root, size=size, max_pixels=max_pixels)
    n_ids = max(c.id for c in ds.classes) + 1
    pixels, images = torch.zeros(n_ids, dtype=torch.long), torch.zeros(n_ids, dtype=torch.long)
    ir_min, ir_max, ir_sum, ir_n, failures = 1.0, 0.0, 0.0, 0, []
    for i in tqdm(range(len(ds)), desc="check", disable=not progress):
        try:
            item = ds[i]
        except DataError as e:
            failures.append(str(e))
            continue
        counts = torch.bincount(item["sem_ids"].flatten(), minlength=n_ids)
        pixels += counts
        images += counts > 0
        ir = item["ir"]
        ir_min, ir_max = min(ir_min, ir.min().item()), max(ir_max, ir.max().item())
        ir_sum, ir_n = ir_sum + ir.sum().item(), ir_n + ir.numel()
    if failures:
        raise DataError(f"{root}: {len(failures)} of {len(ds)} pair(s) failed to load:\n"
                        + "\n".join(failures[:10]) + ("\n..." if len(failures) > 10 else ""))
    sizes = Counter(ds.sizes)
    lines = [f"{root}: {len(ds)} pairs",
             "sizes on disk: " + ", ".join(f"{w}x{h} ({n})" for (w, h), n in sorted(sizes.items())),
             f"served at: {f'about {size}x{size} pixels, aspect kept' if size else 'the stored sizes'}; "
             f"{len(ds.buckets())} bucket(s), each training batch from one: {ds.describe_buckets()}",
             *([ds.crop_note()] if ds.crop_note() else []),
             f"ir: min {ir_min:.3f} mean {ir_sum / max(ir_n, 1):.3f} max {ir_max:.3f}",
             f"{'id':>5} {'name':<16} {'hot':<4} {'pixels':>8} {'images':>7}"]
    total = max(pixels.sum().item(), 1)
    for c in ds.classes:
        lines.append(f"{c.id:>5} {c.name:<16} {'yes' if c.hot else 'no':<4} "
                     f"{100 * pixels[c.id].item() / total:7.2f}% {images[c.id].item():>7}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Writing pairs (tools/importers.py, tools/synth.py)

@contextmanager
def building_layout(out):
    """Write a dataset folder all at once: yields a temporary folder beside `out` holding rgb/ sem/ ir/, renamed
    to `out` when the block completes. An error or a kill leaves `out` as it was (the next run clears a killed
    run's leftovers), so a half-written set is never taken for a complete one. `out` must be new or empty; a link
    to an empty folder is written through (the set lands in the linked folder). The temporary folder is named
    after this process (.<name>.partial-<pid>): a second process writing the same `out` is refused, naming it."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: not empty; write into a new folder so old pairs are not mixed in")
    full = Path(os.path.realpath(out))  # a link to an empty folder: its target
    partial = full.with_name(f".{full.name}.partial-{os.getpid()}")
    try:
        for d in FOLDERS:
            (partial / d).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out}: cannot create the dataset folder ({e.strerror or e})") from e
    try:
        for other in full.parent.glob(f".{full.name}.partial-*"):  # after making ours: two at once see each other
            pid = other.name.rsplit("-", 1)[-1]
            if other == partial or not pid.isdigit():
                continue
            if pid_alive(int(pid)):
                raise DataError(f"{out}: another process (pid {pid}) is writing this dataset now; wait for it to end")
            shutil.rmtree(other, ignore_errors=True)  # a killed run's leftovers
        yield partial
        if full.is_dir():
            full.rmdir()  # the empty folder the user made: replaced by the finished one
        partial.rename(full)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def write_pair(out, name, rgb, ids, ir, classes):
    """rgb uint8 [H, W, 3], ids [H, W], ir uint8 or uint16 [H, W] -> out/{rgb,sem,ir}/name.png."""
    Image.fromarray(np.ascontiguousarray(rgb, np.uint8)).save(out / "rgb" / f"{name}.png")
    Image.fromarray(palette(classes)[ids]).save(out / "sem" / f"{name}.png")  # colour, viewable as is
    Image.fromarray(np.ascontiguousarray(ir)).save(out / "ir" / f"{name}.png")  # uint16 -> 16-bit grey PNG


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("check", help="decode every pair of a dataset folder and summarise it")
    p.add_argument("root")
    p.add_argument("--size", type=int, default=None,
                   help="serve every pair at about SxS pixels at its own aspect ratio, sides multiples of 16, as "
                        "train.py --size S does (default: the stored sizes)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help=f"largest image, width x height (default: ${PIXELS_ENV}, else {MAX_PIXELS})")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "check":
            print(check(args.root, args.size, progress=True, max_pixels=args.max_pixels))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
