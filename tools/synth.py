"""
Synthetic visible / infrared scenes whose semantic map knows what the RGB image cannot show.

A poster is a printed life-size person and a parked car looks like a running one: both are drawn by the same
code, from the same parameter distribution, at the same places, so no RGB model can tell them apart. Only the
semantic map says which figures and cars are hot. A generator that ignores it must hallucinate heat on posters
or miss it on people.

A scene is drawn in two steps: sample_scene(rng, size) makes every random choice, render_scene(scene) paints
RGB, label ids and temperature together (so the three always agree), then blurs and adds sensor noise to the IR.
Files are written in data.py's dataset layout with its synthetic class table (data.DEFAULT_CLASSES); scene i of
a data set depends only on (seed, i), so the same command always writes the same bytes, and the set's synth.json
({"seed", "count", "size"}) lets set_scenes re-create every scene.

Some of a scene's choices show in no input: the temperature offsets, the optics blur, the sensor noise (UNSEEN).
redraw(scene, rng) draws them again, so render_scene(redraw(scene, rng)) is a second IR of the same RGB and labels:
what an ideal generative model could produce. mean_ir(scene, draws) averages such draws: what an ideal regressor
trained on MSE would predict (docs/evaluation.md, "The sampler's ceiling").

Commands (python -m tools.synth -h):
    python -m tools.synth OUT [--count N] [--size S] [--seed K]   N scenes as OUT/{rgb,sem,ir}/NNNNNN.png,
                                                                  classes.json, synth.json
    python -m tools.synth OUT --example --seed K                  one scene as OUT/{rgb,sem,ir}.png (see examples/)
"""

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from checkpoint import write_atomic
from data import DEFAULT_CLASSES, MULTIPLE, DataError, building_layout, list_images, palette, save_classes, write_pair

# IR value ("temperature") per class, before blur and noise; per-scene and per-object offsets add +-0.03.
#                  day    night
TEMPERATURE = {
    "sky":         (0.08, 0.05),   # clear sky radiates little
    "road":        (0.42, 0.30),   # asphalt warms in the sun
    "building":    (0.36, 0.32),
    "vegetation":  (0.26, 0.22),   # transpiration keeps leaves cool
    "poster":      (0.34, 0.28),   # ambient paper
    "car_parked":  (0.40, 0.27),   # ambient metal, sun-warmed by day
    "person":      (0.82, 0.84),   # clothed body; head +0.08
    "car_running": (0.80, 0.80),   # body; engine +0.12, wheels +0.15, windows -0.04
}
PART_DELTA = {"head": 0.08, "engine": 0.12, "wheel": 0.15, "window": -0.04}  # hot kinds; cold ones: window only
# Hot kinds stay >= 0.73 and cold ones <= 0.45 before blur (sigma 0.4-1.0 px at 128 px) and noise (sigma
# 0.003-0.012), so one threshold separates them: on 300 scenes 99.9% of hot-class pixels lie above it and 99.98%
# of cold ones below (the rest are blurred edges), and every hot region's mean IR is above, every cold one's below.
# That threshold is metrics.HOT_THRESHOLD, the one evaluation calls a region hot with.
_ID = {c.name: c.id for c in DEFAULT_CLASSES}

# The parts of a scene that no input shows (only the IR depends on them), with their ranges: sample_scene draws them
# once and redraw draws them again, both through the helpers below.
UNSEEN = ("offset", "objects[].offset", "blur", "noise", "seeds[1]")  # seeds[1] seeds the IR's sensor noise
OFFSET = 0.03                                    # temperature offset per region and per object: uniform +-OFFSET
REGIONS = ("sky", "road", "building", "vegetation")  # the regions with their own offset
BLUR = (0.4, 1.0)                                # optics blur sigma in pixels at 128 px, scaled with the size
NOISE = (0.003, 0.012)                           # sensor noise sigma


def _offset(rng: np.random.Generator) -> float:
    """One temperature offset, uniform in +-OFFSET."""
    return rng.uniform(-OFFSET, OFFSET)


def _region_offsets(rng: np.random.Generator) -> dict:
    """One offset per region of REGIONS, drawn in that order."""
    return {k: _offset(rng) for k in REGIONS}


def _blur_sigma(rng: np.random.Generator, size: int) -> float:
    """The optics blur sigma in pixels for a size x size scene."""
    return rng.uniform(*BLUR) * size / 128


def _noise_sigma(rng: np.random.Generator) -> float:
    """The sensor noise sigma (IR in [0, 1])."""
    return rng.uniform(*NOISE)


def sample_scene(rng: np.random.Generator, size: int) -> dict:
    """Draw every random choice of a scene. render_scene(scene) is then a pure function of it."""
    S = size
    u = rng.uniform
    scene = {"size": S, "night": bool(rng.random() < 0.4), "horizon": u(0.35, 0.5) * S,
             "sky": u(0.85, 1.1), "road": [u(80, 110)] * 3, "buildings": [], "trees": [], "objects": [],
             "offset": _region_offsets(rng), "blur": _blur_sigma(rng, S), "noise": _noise_sigma(rng),
             "seeds": rng.integers(2**32, size=2)}  # seeds: [RGB noise, IR noise]
    x = u(-0.1, 0.05) * S
    while x < S:
        w = u(0.15, 0.35) * S
        scene["buildings"].append({"x0": x, "x1": x + w, "h": u(0.12, 0.4) * S,
                                   "color": [u(90, 200)] * 3 + np.array([u(0, 40), u(0, 20), 0]),
                                   "window": u(0.03, 0.06) * S})
        x += w + u(0, 0.12) * S
    for _ in range(rng.integers(0, 4)):
        scene["trees"].append({"x": u(0, 1) * S, "h": u(0.15, 0.3) * S, "r": u(0.06, 0.12) * S,
                               "color": [u(30, 70), u(100, 150), u(25, 50)]})
    ground = S - scene["horizon"]
    for _ in range(rng.integers(1, 5)):
        by = scene["horizon"] + u(0.15, 1.0) * ground  # base on the ground; nearer objects are lower and larger
        d = (by - scene["horizon"]) / ground
        is_car, hot = rng.random() < 0.5, rng.random() < 0.5  # the kind is a coin flip independent of the looks
        obj = {"by": by, "cx": u(0.05, 0.95) * S, "offset": _offset(rng)}
        if is_car:
            obj.update(kind="car_running" if hot else "car_parked", w=S * (0.25 + 0.45 * d),
                       facing=int(rng.choice([-1, 1])),
                       color=np.array([[235, 235, 235], [30, 30, 35], [170, 170, 175], [180, 30, 30],
                                       [30, 60, 160]][rng.integers(5)]) + u(-15, 15, 3))
        else:
            obj.update(kind="person" if hot else "poster", h=S * (0.2 + 0.35 * d),
                       skin=np.array([[240, 200, 170], [200, 150, 110], [140, 95, 60]][rng.integers(3)])
                       + u(-10, 10, 3),
                       shirt=u(30, 230, 3), trousers=u(20, 120, 3))
        scene["objects"].append(obj)
    scene["objects"].sort(key=lambda o: o["by"])  # painter's order: far first
    return scene


class _Canvas:
    """RGB, label ids and temperature painted together, so the three always agree."""

    def __init__(self, size):
        self.S = size
        self.rgb = np.zeros((size, size, 3), np.float32)   # 0..255
        self.ids = np.zeros((size, size), np.uint8)
        self.temp = np.zeros((size, size), np.float32)

    def _window(self, x0, y0, x1, y1):
        c = lambda v: int(np.clip(round(v), 0, self.S))
        return c(y0), c(y1), c(x0), c(x1)

    def rect(self, x0, y0, x1, y1, color, cls, temp, pattern=None):
        r0, r1, c0, c1 = self._window(x0, y0, x1, y1)
        if r1 > r0 and c1 > c0:
            m = np.ones((r1 - r0, c1 - c0), bool) if pattern is None else pattern(r0, r1, c0, c1)
            self._paint(r0, r1, c0, c1, m, color, cls, temp)

    def ellipse(self, cx, cy, rx, ry, color, cls, temp):
        r0, r1, c0, c1 = self._window(cx - rx, cy - ry, cx + rx + 1, cy + ry + 1)
        yy, xx = np.mgrid[r0:r1, c0:c1] + 0.5  # pixel centres
        self._paint(r0, r1, c0, c1, ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1, color, cls, temp)

    def _paint(self, r0, r1, c0, c1, m, color, cls, temp):
        self.rgb[r0:r1, c0:c1][m] = color
        self.ids[r0:r1, c0:c1][m] = cls
        self.temp[r0:r1, c0:c1][m] = temp


def _draw_figure(cv, o, t):
    """Person silhouette: legs, torso, arms, head. Posters call this with the same o, only cls/t differ."""
    h, cx, by, cls = o["h"], o["cx"], o["by"], _ID[o["kind"]]
    head = PART_DELTA["head"] if o["kind"] == "person" else 0.0
    cv.rect(cx - 0.15 * h, by - 0.46 * h, cx - 0.02 * h, by, o["trousers"], cls, t)
    cv.rect(cx + 0.02 * h, by - 0.46 * h, cx + 0.15 * h, by, o["trousers"], cls, t)
    cv.rect(cx - 0.17 * h, by - 0.78 * h, cx + 0.17 * h, by - 0.44 * h, o["shirt"], cls, t)
    cv.rect(cx - 0.25 * h, by - 0.76 * h, cx - 0.18 * h, by - 0.48 * h, o["shirt"], cls, t)
    cv.rect(cx + 0.18 * h, by - 0.76 * h, cx + 0.25 * h, by - 0.48 * h, o["shirt"], cls, t)
    cv.ellipse(cx, by - 0.89 * h, 0.1 * h, 0.11 * h, o["skin"], cls, t + head)


def _draw_car(cv, o, t):
    """Side view: body, engine hood (same paint, hotter when running), cabin, windows, wheels."""
    w, cx, by, f, cls = o["w"], o["cx"], o["by"], o["facing"], _ID[o["kind"]]
    hot = o["kind"] == "car_running"
    wr = 0.11 * w
    bottom, top = by - 0.6 * wr, by - 0.6 * wr - 0.26 * w
    cv.rect(cx - 0.5 * w, top, cx + 0.5 * w, bottom, o["color"], cls, t)
    x_hood = (cx + 0.2 * w, cx + 0.5 * w) if f > 0 else (cx - 0.5 * w, cx - 0.2 * w)
    cv.rect(x_hood[0], top, x_hood[1], bottom, o["color"], cls, t + (PART_DELTA["engine"] if hot else 0))
    c0, c1 = cx - 0.3 * w - 0.05 * w * f, cx + 0.25 * w - 0.05 * w * f  # cabin sits towards the rear
    cv.rect(c0, top - 0.2 * w, c1, top, o["color"], cls, t)
    glass, tw = (45, 55, 70), t + PART_DELTA["window"]
    cv.rect(c0 + 0.04 * w, top - 0.17 * w, (c0 + c1) / 2 - 0.02 * w, top - 0.02 * w, glass, cls, tw)
    cv.rect((c0 + c1) / 2 + 0.02 * w, top - 0.17 * w, c1 - 0.04 * w, top - 0.02 * w, glass, cls, tw)
    for x in (cx - 0.3 * w, cx + 0.3 * w):
        cv.ellipse(x, by - wr, wr, wr, (25, 25, 25), cls, t + (PART_DELTA["wheel"] if hot else 0))


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge padding (numpy only)."""
    r = max(1, math.ceil(3 * sigma))
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma**2))
    k /= k.sum()
    H, W = img.shape
    p = np.pad(img, r, mode="edge")
    p = sum(k[i] * p[i:i + H, :] for i in range(2 * r + 1))   # [H+2r, W+2r] -> [H, W+2r]
    return sum(k[i] * p[:, i:i + W] for i in range(2 * r + 1))  # [H, W+2r] -> [H, W]


def render_scene(scene: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scene description -> (rgb uint8 [S, S, 3], sem ids uint8 [S, S], ir uint16 [S, S])."""
    S, night, hz = scene["size"], scene["night"], scene["horizon"]
    T = lambda name: TEMPERATURE[name][int(night)] + scene["offset"].get(name, 0.0)
    cv = _Canvas(S)
    rows = np.linspace(0, 1, max(1, round(hz)))[:, None]
    sky = (np.array([90, 150, 220]) * (1 - rows) + np.array([180, 210, 240]) * rows) * scene["sky"]
    cv.rect(0, 0, S, hz, 0, _ID["sky"], T("sky"))
    cv.rgb[:len(rows)] = np.clip(sky, 0, 255)[:, None, :]  # vertical gradient, brighter at the horizon
    cv.rect(0, hz, S, S, scene["road"], _ID["road"], T("road"))
    dash = lambda r0, r1, c0, c1: np.broadcast_to(((np.arange(r0, r1) // max(2, S // 24)) % 2 == 0)[:, None],
                                                  (r1 - r0, c1 - c0))
    cv.rect(0.49 * S, hz + 0.1 * (S - hz), 0.51 * S + 1, S, (220, 220, 220), _ID["road"], T("road") - 0.03, dash)
    for b in scene["buildings"]:
        cv.rect(b["x0"], hz - b["h"], b["x1"], hz, b["color"], _ID["building"], T("building"))
        p = b["window"]
        grid = lambda r0, r1, c0, c1, p=p: ((np.arange(r0, r1)[:, None] % p < p / 2)
                                            & (np.arange(c0, c1)[None, :] % p < p / 2))
        cv.rect(b["x0"] + p / 2, hz - b["h"] + p / 2, b["x1"] - p / 2, hz - p, b["color"] * 0.55,
                _ID["building"], T("building"), grid)
    for tr in scene["trees"]:
        cv.rect(tr["x"] - 0.015 * S, hz - tr["h"], tr["x"] + 0.015 * S, hz + 0.02 * S, (90, 60, 30),
                _ID["vegetation"], T("vegetation"))
        cv.ellipse(tr["x"], hz - tr["h"], tr["r"], tr["r"] * 1.2, tr["color"], _ID["vegetation"], T("vegetation"))
    for o in scene["objects"]:
        t = T(o["kind"]) + o["offset"]
        (_draw_car if o["kind"].startswith("car") else _draw_figure)(cv, o, t)

    rgb_rng, ir_rng = (np.random.default_rng(int(s)) for s in scene["seeds"])
    rgb = cv.rgb
    if night:  # dark, low contrast, bluish, noisy; no headlights: lights would give away a running car
        rgb = rgb * 0.22 + np.array([4, 5, 12]) + rgb_rng.normal(0, 4, rgb.shape)
    ir = _blur(cv.temp, scene["blur"]) + ir_rng.normal(0, scene["noise"], cv.temp.shape)  # optics, then sensor
    return (np.clip(np.round(rgb), 0, 255).astype(np.uint8), cv.ids.copy(),
            np.round(np.clip(ir, 0, 1) * 65535).astype(np.uint16))


def make_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random scene: (rgb uint8 [S, S, 3], sem ids uint8 [S, S], ir uint16 [S, S]). Uses DEFAULT_CLASSES."""
    return render_scene(sample_scene(rng, size))


def redraw(scene: dict, rng: np.random.Generator) -> dict:
    """A copy of `scene` with the parts no input shows (UNSEEN: region and object temperature offsets, blur, noise
    level, the IR noise seed) drawn again from sample_scene's own ranges; geometry, classes, colours, night and the
    RGB noise seed are kept, so its render has the same RGB and labels and another IR."""
    new = copy.deepcopy(scene)
    new["offset"] = _region_offsets(rng)
    new["blur"] = _blur_sigma(rng, scene["size"])
    new["noise"] = _noise_sigma(rng)
    for o in new["objects"]:
        o["offset"] = _offset(rng)
    new["seeds"] = np.array([scene["seeds"][0], rng.integers(2**32)])  # [RGB noise kept, IR noise new]
    return new


def ir_read_back(ir: np.ndarray) -> np.ndarray:
    """A rendered IR, uint16 [S, S], as data.load_ir reads it back from its file: float32 [S, S] in [0, 1]."""
    return (ir / 65535.0).astype(np.float32)


def mean_ir(scene: dict, draws: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """The renderer's expected IR for the scene, float32 [S, S] in [0, 1], estimated by Monte Carlo: the mean of the
    IRs of `draws` redraws (each as its file stores it), so its error shrinks as 1/sqrt(draws). rng None:
    np.random.default_rng(0), so the estimate is reproducible."""
    if draws < 1:
        raise ValueError(f"mean_ir: draws must be at least 1, got {draws}")
    rng = np.random.default_rng(0) if rng is None else rng
    total = np.zeros((scene["size"], scene["size"]), np.float64)  # [S, S]
    for _ in range(draws):
        total += ir_read_back(render_scene(redraw(scene, rng))[2])
    return (total / draws).astype(np.float32)


# -----------------------------------------------------------------------------
# Writing scenes to disk

# The demo's sets (tools/make_demo.sh, and train.py / tools.train_ae / tools.eval when no --data is given):
# (scenes, seed)
TRAIN_SET, TEST_SET = (512, 0), (64, 1)
SET_SIZE = 128


SET_FILE = "synth.json"  # in a set written by write_synth: {"seed": K, "count": N, "size": S}


class NotSynthSet(DataError):
    """A dataset folder without synth.json: its scenes cannot be re-created."""


def ensure_set(out, scenes_seed: tuple[int, int], progress: bool = False) -> Path:
    """The synthetic set `out`, generated the first time it is asked for: (scenes, seed) at SET_SIZE pixels. A set
    already there is never regenerated; one without synth.json (written before sets recorded their scenes) is given
    one when it holds exactly those scenes' pair names and its scene 0 re-renders to its files byte for byte;
    otherwise it is left as it is."""
    out = Path(out)
    count, seed = scenes_seed
    if not out.is_dir():
        print(f"generating the synthetic set {out} ({count} scenes, seed {seed}; python -m tools.synth)")
        write_synth(out, count=count, size=SET_SIZE, seed=seed, progress=progress)
    elif not (out / SET_FILE).exists() and _recognised(out, count, seed, SET_SIZE):
        try:
            _write_json(out / SET_FILE, {"seed": seed, "count": count, "size": SET_SIZE})
            print(f"{out}: recorded its scenes in {SET_FILE} (seed {seed}, {count} scenes; scene 0 re-renders exactly)")
        except (OSError, ValueError):  # write_atomic's CheckpointError is a ValueError
            pass  # a read-only set stays without one: only the sampler's ceiling needs it
    return out


def _recognised(root: Path, count: int, seed: int, size: int) -> bool:
    """root holds exactly the pairs 000000 .. count-1 and scene 0 of (seed, size) re-renders to its files."""
    try:
        names = sorted(_pair_names(root))
    except DataError:
        return False
    return names == [f"{i:06d}" for i in range(count)] and not _differences(
        root, names[0], sample_scene(np.random.default_rng([seed, 0]), size))


def _pair_names(root: Path) -> list[str]:
    """The pair names (file stems) of the dataset folder root, from its ir/ folder."""
    return list(list_images(Path(root) / "ir"))


def _differences(root: Path, name: str, scene: dict) -> list[str]:
    """Which of the stored rgb / sem / ir files of pair `name` differ from render_scene(scene) (empty: none)."""
    rgb, ids, ir = render_scene(scene)
    want = {"rgb": rgb, "sem": palette(DEFAULT_CLASSES)[ids], "ir": ir}  # sem/ stores the class colours
    differ = []
    for folder, arr in want.items():
        try:
            stored = np.asarray(Image.open(list_images(Path(root) / folder)[name]))
        except (OSError, KeyError, DataError):
            stored = None
        if stored is None or not np.array_equal(stored, arr):
            differ.append(folder)
    return differ


def set_scenes(root) -> dict[str, dict]:
    """The scene of every pair of a tools.synth set: pair name -> scene dict, scene i = sample_scene(
    np.random.default_rng([seed, i]), size) with seed and size from root/synth.json. A folder without synth.json is a
    NotSynthSet; one whose first pair does not re-render from its scene (a set written by another version of
    tools.synth) a DataError."""
    root = Path(root)
    path = root / SET_FILE
    if not path.is_file():
        raise NotSynthSet(f"{root}: not a tools.synth set: the sampler's ceiling needs the scenes that drew its "
                          f"pairs, recorded in {SET_FILE} by python -m tools.synth")
    try:
        meta = json.loads(path.read_text())
        seed, count, size = (meta[k] for k in ("seed", "count", "size"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f'{path}: unreadable ({e}); expected {{"seed": K, "count": N, "size": S}}') from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (seed, count, size)):
        raise DataError(f'{path}: expected whole numbers {{"seed": K, "count": N, "size": S}}, got {meta}')
    names = sorted(_pair_names(root))
    known = {f"{i:06d}" for i in range(count)}
    if unknown := [n for n in names if n not in known]:
        raise DataError(f"{root}: pair {unknown[0]} is not one of the {count} scenes {SET_FILE} records")
    scenes = {n: sample_scene(np.random.default_rng([seed, int(n)]), size) for n in names}
    if names and (differ := _differences(root, names[0], scenes[names[0]])):
        raise DataError(f"{root}: pair {names[0]} does not re-render from its scene ({', '.join(differ)} differ): "
                        f"the set was written by another version of tools.synth; write it again")
    return scenes


def _write_json(path: Path, obj: dict) -> None:
    """obj as JSON at path, written whole (checkpoint.write_atomic: a temporary file of its own, renamed)."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj) + "\n"))


def write_synth(out, count, size, seed=0, progress=False) -> int:
    """count scenes as out/{rgb,sem,ir}/NNNNNN.png + classes.json + synth.json (seed, count, size: how set_scenes
    re-creates them). Scene i depends only on (seed, i). out appears only when every scene is written, so an
    interrupted run is never reused as a complete set."""
    if size < MULTIPLE or size % MULTIPLE:
        raise DataError(f"synth: size {size} must be a positive multiple of {MULTIPLE}")
    with building_layout(out) as tmp:
        for i in tqdm(range(count), desc="synth", disable=not progress):
            rgb, ids, ir = make_scene(np.random.default_rng([seed, i]), size)
            write_pair(tmp, f"{i:06d}", rgb, ids, ir, DEFAULT_CLASSES)
        save_classes(DEFAULT_CLASSES, tmp / "classes.json")
        _write_json(tmp / SET_FILE, {"seed": int(seed), "count": int(count), "size": int(size)})
    return count


def write_example(out, seed, size=128):
    """One scene as out/rgb.png, out/sem.png, out/ir.png (IR stored 8-bit to keep the example tiny)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rgb, ids, ir = make_scene(np.random.default_rng(seed), size)
    Image.fromarray(rgb).save(out / "rgb.png")
    Image.fromarray(palette(DEFAULT_CLASSES)[ids]).save(out / "sem.png")
    Image.fromarray(np.round(ir / 257).astype(np.uint8)).save(out / "ir.png")


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.synth", description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("out", help="output folder")
    parser.add_argument("--count", type=int, default=200, help="number of scenes (ignored with --example)")
    parser.add_argument("--size", type=int, default=128, help="side in pixels, a multiple of 16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--example", action="store_true",
                        help="write one scene as OUT/{rgb,sem,ir}.png, IR 8-bit (how examples/ is made)")
    args = parser.parse_args(argv)
    try:
        if args.example:
            write_example(args.out, args.seed, args.size)
        else:
            n = write_synth(args.out, args.count, args.size, args.seed, progress=True)
            print(f"wrote {n} scenes to {args.out}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
