"""
A local page to try the model: pick or upload an RGB image and its semantic map, see the infrared image beside the
base model's (RGB only), and click a point to see which semantic tokens it reads in every block.

    python -m tools.app [--host 127.0.0.1] [--port 8000] [--ckpt PATH] [--classes FILE] [--device D]

It runs what sample.py runs, with the same defaults: find_setup picks the official FLUX files in weights/ when they
are there, else the tiny demo; the semantic weights are --ckpt, else runs/warmup, else the demo's; the palette is
--classes, else the checkpoint's, else the synthetic one. The result is sample.py's image for the same settings.
Served by the standard library (http.server) on 127.0.0.1; uploads and results live in one temporary folder, removed
on exit. One job runs at a time, in a worker thread; the page polls its progress (docs/app.md).

Endpoints (an error is {"error": one line} with a 4xx/5xx status, never a traceback):
    GET  /                             the page
    GET  /api/info                     setup, weights, classes, defaults, limits, example pairs
    GET  /api/examples/NAME/rgb|sem    an example pair's images (examples/)
    POST /api/uploads                  body: one image file (header X-Filename: its name) -> {id, name, width, height}
    POST /api/jobs                     JSON {rgb, sem ("upload:ID" | "example:NAME"), steps, seed, sem_strength,
                                       sem_guidance, guidance, size} -> {id}
    GET  /api/jobs/ID                  state (queued | running | done | error), phase, steps done, times, error
    GET  /api/jobs/ID/rgb|sem|ir|base  the pair as used, the IR image (8-bit grey PNG), the base model's
    GET  /api/jobs/ID/attention?x=X&y=Y  the clicked pixel's image token and, per block, its attention over the
                                       semantic tokens (a PNG of heat maps) and the classes it reads
"""

import argparse
import ipaddress
import json
import math
import queue
import re
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from base64 import b64encode
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
from checkpoint import command, run_config, trained_file
from extras.fp8 import BASE_DTYPES
from flow import get_schedule
from pipeline import (ROOT, SAMPLE_STEPS, SEM_GUIDANCE, SEM_STRENGTH, attention_maps, default_ckpt, find_setup,
                      generate, load_pipeline, resolve_device, run_classes)
from viz import grid, heat, to_pil_gray, to_pil_rgb

EXAMPLES = ROOT / "examples"
TOKEN = 16  # pixels per image token side: 8x VAE downsampling times FLUX's 2x2 patches
MAX_SEED = 2 ** 63 - 1  # sample.py's
MAX_STEPS = 1000  # the page's own cap: one request cannot hold the worker for ever
MAX_JSON = 64 * 1024  # bytes of a job request
KEEP = 16  # uploads and finished jobs kept (older ones are deleted from the temporary folder)
PANEL = 128  # pixels of the longer side of one block's heat map
DEFAULTS = {"steps": SAMPLE_STEPS, "seed": 0, "sem_strength": SEM_STRENGTH, "sem_guidance": SEM_GUIDANCE,
            "guidance": None, "size": None}  # sample.py's argparse defaults


class HTTPError(Exception):
    """A request the server refuses: the status and one line for the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def example_pairs() -> dict[str, tuple[Path, Path]]:
    """The pairs examples/ holds: rgb.png + sem.png ("example"), and NAME_rgb.* + NAME_sem.* ("NAME")."""
    pairs = {}
    for rgb in sorted(EXAMPLES.iterdir()):
        if rgb.suffix.lower() in data.IMAGE_EXTS and rgb.stem.lower().endswith("rgb"):
            prefix = rgb.stem[:-3]
            sem = next((p for p in sorted(EXAMPLES.iterdir()) if p.stem == prefix + "sem"
                        and p.suffix.lower() in data.IMAGE_EXTS), None)
            if sem is not None:
                pairs[prefix.rstrip("_-") or "example"] = (rgb, sem)
    return pairs


def safe_name(name: str | None, default: str) -> str:
    """An uploaded file's name as a plain file name: its last part, letters, digits, '.', '_' and '-' only."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", (name or "").replace("\\", "/").split("/")[-1])[:100].lstrip(".")
    return name or default


def semantic_classes(classes_file, ckpt) -> tuple[tuple[data.SemClass, ...], str]:
    """(classes, where they come from), as sample.py picks them: --classes, else the checkpoint's run config, else
    the synthetic palette."""
    if classes_file:
        return data.load_classes(classes_file), str(classes_file)
    recorded = run_classes(run_config(ckpt), ckpt) if ckpt else None
    if recorded is not None:
        return recorded, f"{ckpt} (its training classes)"
    return data.DEFAULT_CLASSES, "the synthetic palette (--classes for another)"


def check_settings(body: dict) -> dict:
    """A job request's settings, defaulted and checked as sample.py checks its flags: one line naming the field."""
    s = {k: body.get(k, v) for k, v in DEFAULTS.items()}
    for key in ("steps", "seed", "size"):
        v = s[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{key} {v!r}: must be a whole number")
    for key in ("sem_strength", "sem_guidance", "guidance"):
        v = s[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"{key} {v!r}: must be a finite number")
    if s["steps"] is None or not 1 <= s["steps"] <= MAX_STEPS:
        raise ValueError(f"steps {s['steps']}: must be in 1..{MAX_STEPS}")
    if s["seed"] is None or not 0 <= s["seed"] <= MAX_SEED:
        raise ValueError(f"seed {s['seed']}: must be in 0..{MAX_SEED}")
    if s["size"] is not None and (s["size"] <= 0 or s["size"] % data.MULTIPLE):
        raise ValueError(f"size {s['size']}: must be a positive multiple of {data.MULTIPLE}")
    for key in ("sem_strength", "sem_guidance"):
        if s[key] is None or s[key] < 0:
            raise ValueError(f"{key} {s[key]}: must be a finite number >= 0")
    return s


# ----------------------------------------------------------------------------------------------------------------
# Attention at a clicked pixel


def block_order(name: str) -> tuple[bool, int]:
    """Double blocks first, then single ones, each by index ("double.3", "single.0")."""
    kind, index = name.split(".")
    return kind != "double", int(index)


def class_shares(a: np.ndarray, ids: np.ndarray, names: dict[int, str]) -> list[tuple[str, float]]:
    """One query's attention over the semantic tokens a [h, w] (sums to 1) as the share each class's area gets, by
    the class ids [H, W] of the pixels under every token, largest first."""
    pixels = np.kron(a, np.ones((TOKEN, TOKEN))) / TOKEN ** 2  # [h, w] -> [H, W], still summing to 1
    shares = {}
    for c in np.unique(ids):
        shares[names.get(int(c), str(c))] = float(pixels[ids == c].sum())
    return sorted(shares.items(), key=lambda kv: -kv[1])


def attention_at(maps: dict[str, torch.Tensor], ids: torch.Tensor, sem: Image.Image, names: dict[int, str], x: int,
                 y: int) -> dict:
    """The image token under pixel (x, y) and, per block, its attention over the semantic tokens: maps name ->
    [h*w, N] (N = h*w semantic tokens on the same 16-px grid), ids [H, W] -> {token, blocks, mean, image (PNG data
    URI: one heat map per block over the semantic map, the clicked point circled)}."""
    H, W = ids.shape
    h, w = H // TOKEN, W // TOKEN
    if not (0 <= x < W and 0 <= y < H):
        raise ValueError(f"point ({x}, {y}) is outside the {W}x{H} image")
    q = (y // TOKEN) * w + x // TOKEN
    cell = max(1, PANEL // max(h, w))
    back = np.asarray(sem.resize((w * cell, h * cell), Image.NEAREST), np.float32)  # [h*cell, w*cell, 3]
    ids_np = ids.numpy()
    panels, blocks, total = [], [], {}
    for name in sorted(maps, key=block_order):
        a = maps[name][q].float().reshape(h, w).numpy()  # [N] -> [h, w]
        a = a / max(a.sum(), 1e-12)
        reads = class_shares(a, ids_np, names)
        for c, share in reads:
            total[c] = total.get(c, 0.0) + share / len(maps)
        blocks.append({"name": name, "reads": [[c, round(s, 4)] for c, s in reads[:3]]})
        hot = heat(np.kron(a / max(a.max(), 1e-12), np.ones((cell, cell))))  # [h*cell, w*cell, 3]
        im = Image.fromarray((0.35 * back + 0.65 * hot).astype(np.uint8))
        d = ImageDraw.Draw(im)
        px, py = (x + 0.5) * im.width / W, (y + 0.5) * im.height / H
        d.ellipse([px - 4, py - 4, px + 4, py + 4], outline=(0, 255, 0), width=2)
        d.text((3, 2), name, fill=(0, 255, 0))
        d.text((3, im.height - 12), f"{reads[0][0]} {100 * reads[0][1]:.0f}%", fill=(0, 255, 0))
        panels.append(im)
    cols = min(len(panels), 6)
    png = BytesIO()
    grid([panels[i:i + cols] for i in range(0, len(panels), cols)]).save(png, format="PNG")
    return {"token": {"row": y // TOKEN, "col": x // TOKEN, "index": q, "grid": [h, w]}, "blocks": blocks,
            "mean": [[c, round(s, 4)] for c, s in sorted(total.items(), key=lambda kv: -kv[1])[:3]],
            "image": "data:image/png;base64," + b64encode(png.getvalue()).decode()}


# ----------------------------------------------------------------------------------------------------------------
# Jobs


@dataclass
class Job:
    id: str
    rgb: Path
    sem: Path
    settings: dict
    folder: Path
    state: str = "queued"  # queued | running | done | error
    phase: str = "waiting for the worker"
    phases: list = field(default_factory=list)  # (name, sampling steps) of the work ahead
    phase_index: int = 0
    calls: int = 0  # transformer calls in this phase, counted by a forward hook
    passes: int = 1  # transformer calls per sampling step in this phase
    steps: int = 0  # sampling steps of this phase
    error: str | None = None
    note: str | None = None  # e.g. no attention maps for this scheme
    times: dict = field(default_factory=dict)  # seconds: queued, load, ir, base, attention, total
    created: float = field(default_factory=time.perf_counter)
    size: tuple[int, int] | None = None  # (width, height) of the pair as used
    maps: dict | None = None  # block -> [h*w, N] float16 attention of the x_t queries
    ids: torch.Tensor | None = None  # [H, W] class ids
    sem_image: Image.Image | None = None

    def status(self) -> dict:
        """What the page polls."""
        return {"id": self.id, "state": self.state, "phase": self.phase, "phase_index": self.phase_index,
                "phases": [p for p, _ in self.phases], "step": min(self.steps, self.calls // self.passes),
                "steps": self.steps, "error": self.error, "note": self.note, "settings": self.settings,
                "times": {k: round(v, 3) for k, v in self.times.items()}, "size": self.size,
                "attention": self.maps is not None}


class App:
    """The loaded pipelines, the temporary folder, uploads and jobs, and the one worker thread that runs jobs."""

    def __init__(self, args: argparse.Namespace):
        device = resolve_device(args.device)
        self.setup = find_setup()
        self.ckpt = trained_file(args.ckpt) if args.ckpt else default_ckpt(self.setup)
        self.classes, self.classes_source = semantic_classes(args.classes, self.ckpt)
        self.names = {c.id: c.name for c in self.classes}
        self.max_pixels = data.pixel_limit(args.max_pixels)
        self.max_body = int(args.max_upload_mb * 2 ** 20)
        self.pipe = load_pipeline(self.ckpt, device, setup=self.setup, base_dtype=args.base_dtype)
        print(f"semantic weights: {self.ckpt or 'none (base model)'} (scheme {self.pipe.scheme}); classes: "
              f"{self.classes_source}")
        self.base = None
        if not args.no_base:  # the RGB-only base: its own model (load_pipeline(None)), as sample.py --base samples
            self.base = self.pipe if self.ckpt is None else load_pipeline(None, device, setup=self.setup, quiet=True,
                                                                          base_dtype=args.base_dtype)
        self.current: Job | None = None
        for pipe in {id(p): p for p in (self.pipe, self.base) if p is not None}.values():
            pipe.model.register_forward_hook(self.count_call)
        self.tmp = Path(tempfile.mkdtemp(prefix="flux-ir-app-"))
        self.uploads: dict[str, Path] = {}
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        self.queue: queue.Queue = queue.Queue(maxsize=KEEP)
        self.worker = threading.Thread(target=self.work, name="app-worker", daemon=True)
        self.worker.start()

    def count_call(self, module, args, output):
        """Forward hook on the transformer: one call more in the running job's phase."""
        job = self.current
        if job is not None:
            job.calls += 1

    def info(self) -> dict:
        """What the page shows before any job: setup, weights, classes, defaults, limits, examples."""
        return {"setup": self.public(self.setup.describe()), "ckpt": self.public(str(self.ckpt or "")) or None,
                "scheme": self.pipe.scheme, "classes_source": self.public(self.classes_source),
                "classes": [{"id": c.id, "name": c.name, "color": list(c.color), "hot": c.hot} for c in self.classes],
                "defaults": DEFAULTS, "base_guidance": self.pipe.guidance, "max_steps": MAX_STEPS,
                "max_seed": MAX_SEED, "max_pixels": self.max_pixels, "max_upload_bytes": self.max_body,
                "base": self.base is not None, "examples": sorted(example_pairs())}

    def public(self, message: str) -> str:
        """An error line as the page shows it: uploads by their own names, repository files relative to the root."""
        message = re.sub(re.escape(str(self.tmp)) + r"/u/[0-9a-f]+/", "", message)
        return message.replace(str(ROOT) + "/", "")

    def keep_last(self, table: dict) -> None:
        """Forget the oldest entries past KEEP (deleting their files); a job still queued or running stays."""
        with self.lock:
            for key in list(table)[:-KEEP]:
                item = table[key]
                if isinstance(item, Job) and item.state in ("queued", "running"):
                    continue
                folder = item.folder if isinstance(item, Job) else item.parent
                shutil.rmtree(folder, ignore_errors=True)
                del table[key]

    def add_upload(self, name: str, body) -> dict:
        """Store an uploaded image under the temporary folder and check its header (the pixel limit) before any
        pixel is decoded."""
        uid = secrets.token_hex(8)
        folder = self.tmp / "u" / uid
        folder.mkdir(parents=True)
        path = folder / name
        path.write_bytes(body)
        try:
            width, height = data.image_size(path, self.max_pixels)
        except data.DataError as e:
            shutil.rmtree(folder, ignore_errors=True)
            raise ValueError(self.public(str(e))) from None
        with self.lock:
            self.uploads[uid] = path
        self.keep_last(self.uploads)
        return {"id": uid, "name": name, "width": width, "height": height}

    def source(self, ref, what: str) -> Path:
        """'upload:ID' or 'example:NAME' -> the file."""
        kind, _, key = str(ref).partition(":")
        if kind == "upload" and key in self.uploads:
            return self.uploads[key]
        pairs = example_pairs()
        if kind == "example" and key in pairs:
            return pairs[key][0 if what == "rgb" else 1]
        raise ValueError(f"{what} {ref!r}: no such upload or example (upload the image again, or pick an example)")

    def submit(self, body: dict) -> Job:
        """Queue a job from a request: its inputs found and its settings checked first."""
        rgb, sem = self.source(body.get("rgb"), "rgb"), self.source(body.get("sem"), "sem")
        settings = check_settings(body)
        if settings["size"] is not None and settings["size"] ** 2 > self.max_pixels:
            raise ValueError(f"size {settings['size']}: {settings['size'] ** 2:,} pixels, over the limit of "
                             f"{self.max_pixels:,}")
        jid = secrets.token_hex(8)
        job = Job(jid, rgb, sem, settings, self.tmp / "j" / jid)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, f"{KEEP} jobs are waiting already; try again later")
        with self.lock:  # the worker may already run it: it is looked up only after the reply
            self.jobs[jid] = job
        self.keep_last(self.jobs)
        return job

    def work(self):
        """The worker thread: one job at a time."""
        while True:
            job = self.queue.get()
            if job is None:
                return
            self.current = job
            try:
                self.run(job)
                job.state, job.phase = "done", "done"
            except (ValueError, OSError) as e:  # DataError, CheckpointError: the line the CLI prints
                job.state, job.error = "error", self.public(str(e))
            except Exception as e:
                traceback.print_exc()
                job.state, job.error = "error", f"internal error ({type(e).__name__}); the server's log has the details"
            finally:
                self.current = None
                job.times["total"] = time.perf_counter() - job.created

    def phase(self, job: Job, index: int, passes: int = 1) -> None:
        """Start counting the transformer calls of the job's phase `index`."""
        job.phase_index, (job.phase, job.steps) = index, job.phases[index]
        job.calls, job.passes = 0, passes

    def run(self, job: Job) -> None:
        """sample.py's steps for one pair: load_pair, generate (semantic weights and the base), attention maps."""
        s, pipe = job.settings, self.pipe
        job.state, job.times["queued"] = "running", time.perf_counter() - job.created
        job.phases = [("loading the pair", 0)]
        self.phase(job, 0)
        t = time.perf_counter()
        rgb, sem, ids = data.load_pair(job.rgb, job.sem, self.classes, s["size"], self.max_pixels)  # [3,H,W] x2, [H,W]
        H, W = rgb.shape[-2:]
        job.folder.mkdir(parents=True)
        job.size, job.ids, job.sem_image = (W, H), ids, to_pil_rgb(sem)
        to_pil_rgb(rgb).save(job.folder / "rgb.png")
        job.sem_image.save(job.folder / "sem.png")
        job.times["load"] = time.perf_counter() - t
        own_base = self.base is not None and self.base is not pipe
        attend = pipe.model.semantic is not None and bool(pipe.model.semantic.recorded_attentions())
        job.phases += [("infrared image", s["steps"])] + [("base model (RGB only)", s["steps"])] * own_base
        job.phases += [("attention maps", self.attention_calls(s["steps"], H, W))] * attend

        self.phase(job, 1, passes=2 if s["sem_guidance"] != 1 and pipe.model.semantic is not None else 1)
        t = time.perf_counter()
        ir = generate(pipe, rgb[None], sem[None], steps=s["steps"], seed=s["seed"], guidance=s["guidance"],
                      sem_strength=s["sem_strength"], sem_guidance=s["sem_guidance"])  # [1, 1, H, W]
        to_pil_gray(ir[0]).save(job.folder / "ir.png", format="PNG")
        job.times["ir"] = time.perf_counter() - t

        if own_base:
            self.phase(job, 2)
            t = time.perf_counter()
            base = generate(self.base, rgb[None], sem[None], steps=s["steps"], seed=s["seed"],
                            guidance=s["guidance"])  # [1, 1, H, W]
            to_pil_gray(base[0]).save(job.folder / "base.png", format="PNG")
            job.times["base"] = time.perf_counter() - t
        elif self.base is pipe:  # no semantic weights: the result is the base's
            shutil.copyfile(job.folder / "ir.png", job.folder / "base.png")

        if not attend:
            job.note = f"attention maps exist only for the xattn and adapter schemes (this model: {pipe.scheme})"
            return
        self.phase(job, len(job.phases) - 1)
        t = time.perf_counter()
        maps = attention_maps(pipe, rgb[None], sem[None], seed=s["seed"], steps=s["steps"])  # {block: [L_img, N]}
        L = (H // TOKEN) * (W // TOKEN)
        if any(m.shape[-1] != L for m in maps.values()):
            raise ValueError(f"the semantic tokens are not on the image's {L}-token grid: no heat maps")
        job.maps = {k: m[:L].to("cpu", torch.float16) for k, m in maps.items()}  # the x_t queries: [L, N]
        job.times["attention"] = time.perf_counter() - t

    def attention_calls(self, steps: int, H: int, W: int) -> int:
        """How many transformer calls pipeline.attention_maps makes: to t ~ 0.5, then one recorded step."""
        ts = get_schedule(steps, (H // TOKEN) * (W // TOKEN), shift=self.setup.preset != "schnell")
        return min(range(len(ts) - 1), key=lambda i: abs(ts[i] - 0.5)) + 1

    def close(self):
        """Stop the worker and delete the temporary folder."""
        self.queue.put(None)
        self.worker.join(timeout=60)
        shutil.rmtree(self.tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    """Routes a request to the App; every refusal is one JSON line."""
    server_version = "flux-ir-app"
    app: App  # set by make_server

    def log_message(self, fmt, *args):
        """Only refusals and failures go to the log (the page polls several times a second)."""

    def log_request(self, code="-", size="-"):
        if isinstance(code, int) and code >= 400:
            sys.stderr.write(f"{self.command} {self.path.split('?')[0]} -> {code}\n")

    def reply(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if ctype.startswith("text/html"):
            self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data: blob:; "
                                                       "style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                                                       "frame-ancestors 'none'")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def json(self, obj, status: int = 200) -> None:
        self.reply(status, json.dumps(obj).encode(), "application/json")

    def handle_safely(self, route) -> None:
        """Run a route; a refusal or a bad input is one line, anything else one line here and the traceback in the
        server's log."""
        try:
            self.check_host()
            route()
        except (BrokenPipeError, ConnectionResetError):  # the page went away: nobody to tell
            self.close_connection = True
        except HTTPError as e:
            self.json({"error": str(e)}, e.status)
        except (ValueError, OSError) as e:
            self.json({"error": self.app.public(str(e))}, HTTPStatus.BAD_REQUEST)
        except Exception as e:
            traceback.print_exc()
            self.json({"error": f"internal error ({type(e).__name__}); the server's log has the details"},
                      HTTPStatus.INTERNAL_SERVER_ERROR)

    def check_host(self) -> None:
        """On a loopback address, only requests naming it (another Host header is a page of another site reaching
        this server through DNS rebinding)."""
        host, port = self.server.server_address[:2]
        if not ipaddress.ip_address(host).is_loopback:
            return
        named = f"[{host}]" if ":" in host else host
        allowed = {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]", named)}
        if self.headers.get("Host", "") not in allowed:
            raise HTTPError(HTTPStatus.FORBIDDEN, f"Host {self.headers.get('Host')!r}: this server answers only "
                                                  f"to {named}:{port}")

    def body(self, limit: int) -> bytes:
        """The request body, refused from its Content-Length before a byte of it is read when over `limit`."""
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None or not length.isdigit():
            self.close_connection = True
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "a request body needs a Content-Length")
        if int(length) > limit:
            self.close_connection = True  # the body is never read: the connection cannot be reused
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"the request body is {int(length):,} bytes, over the limit of {limit:,}")
        return self.rfile.read(int(length))

    def do_GET(self):
        self.handle_safely(self.get)

    def do_HEAD(self):
        self.handle_safely(self.get)

    def do_POST(self):
        self.handle_safely(self.post)

    def get(self):
        url = urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p]
        if not parts:
            return self.reply(200, PAGE.encode(), "text/html; charset=utf-8")
        if parts == ["favicon.ico"]:
            return self.reply(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        if parts == ["api", "info"]:
            return self.json(self.app.info())
        if len(parts) == 4 and parts[:2] == ["api", "examples"] and parts[3] in ("rgb", "sem"):
            pair = example_pairs().get(parts[2])
            if pair is None:
                raise HTTPError(HTTPStatus.NOT_FOUND, f"no example pair {parts[2]!r}")
            return self.image(pair[0 if parts[3] == "rgb" else 1])
        if len(parts) >= 3 and parts[:2] == ["api", "jobs"]:
            job = self.app.jobs.get(parts[2])
            if job is None:
                raise HTTPError(HTTPStatus.NOT_FOUND, f"no job {parts[2]!r} (finished jobs are kept {KEEP} at most)")
            if len(parts) == 3:
                return self.json(job.status())
            png = job.folder / f"{parts[3]}.png" if len(parts) == 4 else None
            if png is not None and parts[3] in ("rgb", "sem", "ir", "base") and png.is_file():
                return self.reply(200, png.read_bytes(), "image/png")
            if len(parts) == 4 and parts[3] == "attention":
                return self.attention(job, parse_qs(url.query))
        raise HTTPError(HTTPStatus.NOT_FOUND, f"nothing at {url.path}")

    def image(self, path: Path) -> None:
        """An example image, as stored (PNG or another of data.py's formats)."""
        fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
        self.reply(200, path.read_bytes(), Image.MIME.get(fmt, "application/octet-stream"))

    def attention(self, job: Job, query: dict) -> None:
        if job.maps is None:
            raise HTTPError(HTTPStatus.CONFLICT, job.note or f"job {job.id} has no attention maps yet ({job.state})")
        try:
            x, y = int(query["x"][0]), int(query["y"][0])
        except (KeyError, ValueError):
            raise ValueError("attention needs the clicked pixel as ?x=X&y=Y (whole numbers)") from None
        self.json(attention_at(job.maps, job.ids, job.sem_image, self.app.names, x, y))

    def post(self):
        path = urlsplit(self.path).path
        if path == "/api/uploads":
            if not self.headers.get("X-Filename"):  # also what keeps other sites' plain form posts out
                raise HTTPError(HTTPStatus.BAD_REQUEST, "an upload names its file in the X-Filename header")
            body = self.body(self.app.max_body)
            name = safe_name(self.headers.get("X-Filename"), "upload.png")
            return self.json(self.app.add_upload(name, body), HTTPStatus.CREATED)
        if path == "/api/jobs":
            if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
                raise HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "a job is a JSON request (application/json)")
            try:
                body = json.loads(self.body(MAX_JSON))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"the job request is not JSON ({type(e).__name__})") from None
            if not isinstance(body, dict):
                raise ValueError("the job request must be a JSON object")
            return self.json({"id": self.app.submit(body).id}, HTTPStatus.ACCEPTED)
        raise HTTPError(HTTPStatus.NOT_FOUND, f"nothing to POST at {path}")


def make_server(app: App, host: str, port: int) -> ThreadingHTTPServer:
    """The HTTP server bound to (host, port), routing to `app`."""
    handler = type("AppHandler", (Handler,), {"app": app})
    cls = ThreadingHTTPServer
    if ipaddress.ip_address(host).version == 6:
        cls = type("ThreadingHTTPServer6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
    server = cls((host, port), handler)
    server.daemon_threads = True
    return server


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    ap.add_argument("--ckpt", default=None, help="train.py output, or its run folder (default: runs/warmup, else the "
                                                 "demo weights), as sample.py")
    ap.add_argument("--classes", default=None, help="classes.json of the palette (default: the checkpoint's)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--base-dtype", default=None, choices=list(BASE_DTYPES))
    ap.add_argument("--no-base", action="store_true", help="do not load the RGB-only base beside the semantic "
                                                           "weights (half the memory with the official files)")
    ap.add_argument("--max-upload-mb", type=float, default=32.0, help="largest request body, in MiB")
    ap.add_argument("--max-pixels", type=int, default=None, help=f"largest image (default: ${data.PIXELS_ENV}, "
                                                                 f"else {data.MAX_PIXELS:,})")
    args = ap.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: must be in 0..65535")
    if not (math.isfinite(args.max_upload_mb) and args.max_upload_mb > 0):
        raise ValueError(f"--max-upload-mb {args.max_upload_mb}: must be a positive number")
    try:
        ipaddress.ip_address(args.host)
    except ValueError:
        raise ValueError(f"--host {args.host!r}: not an IP address (127.0.0.1 for this machine only)") from None
    return args


def create(argv=None) -> ThreadingHTTPServer:
    """Flags checked, pipelines loaded, the server bound (not yet serving); server.app is the App."""
    args = parse_args(argv)
    app = App(args)
    try:
        server = make_server(app, args.host, args.port)
    except OSError:
        app.close()
        raise
    server.app = app
    return server


@command
def main(argv=None) -> int:
    server = create(argv)
    host, port = server.server_address[:2]
    if not ipaddress.ip_address(host).is_loopback:
        print(f"note: bound to {host}: anyone who can reach this address can run jobs on this machine")
    print(f"serving on http://{host}:{port}/ (Ctrl-C stops it; temporary folder {server.app.tmp})")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.app.close()


# ----------------------------------------------------------------------------------------------------------------
# The page (one file: no scripts or styles from elsewhere)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Semantic-guided infrared generation</title>
<style>
body { font: 14px sans-serif; margin: 1em 2em; max-width: 1080px; color: #222; }
fieldset { display: inline-block; vertical-align: top; margin: 0 1em 1em 0; border: 1px solid #bbb; }
label { display: block; margin: 3px 0; } input[type=number] { width: 7em; }
figure { display: inline-block; margin: 0 0.8em 0.8em 0; text-align: center; }
figure img { width: 240px; image-rendering: pixelated; border: 1px solid #888; }
#rgb-view, #sem-view { cursor: crosshair; }
#error { color: #a00; font-weight: bold; white-space: pre-wrap; }
#attn { image-rendering: pixelated; max-width: 100%; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #555; margin: 0 3px 0 10px; }
small { color: #555; }
</style></head><body>
<h1>Semantic-guided infrared generation</h1>
<p id="setup">loading...</p>
<form id="form">
<fieldset><legend>Input pair</legend>
<label>example <select id="example"></select></label>
<label>or upload an RGB image <input type="file" id="rgb-file" accept="image/*"></label>
<label>and its semantic map <input type="file" id="sem-file" accept="image/*"></label>
<small>a file chosen here replaces that image of the example</small>
</fieldset>
<fieldset><legend>Settings (sample.py's flags)</legend>
<label>steps (--steps) <input type="number" id="steps" min="1"></label>
<label>seed (--seed) <input type="number" id="seed" min="0"></label>
<label>semantic strength (--sem-strength) <input type="number" id="sem_strength" min="0" step="any"></label>
<label>semantic guidance (--sem-guidance) <input type="number" id="sem_guidance" min="0" step="any"></label>
<label>guidance (--guidance) <input type="number" id="guidance" step="any" placeholder="the base's"></label>
<label>size (--size) <input type="number" id="size" min="16" step="16" placeholder="as is"></label>
</fieldset>
<div><button type="submit" id="run">Generate</button> <progress id="bar" value="0" max="1"></progress>
<span id="status"></span></div>
</form>
<p id="palette"></p>
<p id="error" role="alert"></p>
<div id="result" hidden>
<figure><img id="rgb-view" alt="RGB"><figcaption>RGB (click a point)</figcaption></figure>
<figure><img id="sem-view" alt="semantic map"><figcaption>semantic map (click a point)</figcaption></figure>
<figure><img id="ir" alt="infrared"><figcaption>infrared, semantic-guided</figcaption></figure>
<figure id="base-fig"><img id="base" alt="base"><figcaption>base model (RGB only)</figcaption></figure>
<p id="times"></p>
<h2>Where the semantic attention looks</h2>
<p id="attn-text">Click a point of the RGB image or the semantic map.</p>
<img id="attn" alt="">
</div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const FIELDS = ["steps", "seed", "sem_strength", "sem_guidance", "guidance", "size"];
let job = null;

function showError(msg) { $("error").textContent = msg || ""; }

async function api(url, options) {
  const r = await fetch(url, options);
  const body = await r.json().catch(() => ({error: "the server sent no JSON (status " + r.status + ")"}));
  if (!r.ok) throw new Error(body.error || ("status " + r.status));
  return body;
}

async function init() {
  const info = await api("/api/info");
  $("setup").textContent = info.setup + " Semantic weights: " + (info.ckpt || "none") + " (scheme " + info.scheme +
    "); classes: " + info.classes_source + ".";
  for (const f of FIELDS) if (info.defaults[f] !== null) $(f).value = info.defaults[f];
  $("steps").max = info.max_steps;
  for (const name of info.examples) $("example").add(new Option("examples: " + name, name));
  $("palette").textContent = "Palette: ";
  for (const c of info.classes) {
    const s = document.createElement("span");
    s.className = "swatch"; s.style.background = "rgb(" + c.color.join(",") + ")";
    $("palette").append(s, c.name + (c.hot ? " (hot)" : ""));
  }
  $("base-fig").hidden = !info.base;
}

async function source(kind) {
  const file = $(kind + "-file").files[0];
  if (!file) {
    if (!$("example").value) throw new Error("choose an " + kind + " file or an example");
    return "example:" + $("example").value;
  }
  const up = await api("/api/uploads", {method: "POST", body: file, headers: {"X-Filename": file.name}});
  return "upload:" + up.id;
}

function settings() {
  const s = {};
  for (const f of FIELDS) {
    const v = $(f).value.trim();
    if (v === "") { s[f] = null; continue; }
    const n = Number(v);
    if (!Number.isFinite(n)) throw new Error(f + " " + v + ": not a number");
    s[f] = n;
  }
  if (s.steps === null) delete s.steps;
  if (s.seed === null) delete s.seed;
  return s;
}

async function generate(ev) {
  ev.preventDefault();
  showError(""); $("run").disabled = true; $("result").hidden = true;
  $("attn").removeAttribute("src"); $("attn-text").textContent = "Click a point of the RGB image or the semantic map.";
  for (const id of ["ir", "base", "rgb-view", "sem-view"]) $(id).removeAttribute("src");
  try {
    const body = settings();
    $("status").textContent = "uploading...";
    body.rgb = await source("rgb");
    body.sem = await source("sem");
    const id = (await api("/api/jobs", {method: "POST", headers: {"Content-Type": "application/json"},
                                        body: JSON.stringify(body)})).id;
    let st;
    for (;;) {
      st = await api("/api/jobs/" + id);
      const n = Math.max(1, st.phases.length);
      $("bar").max = n; $("bar").value = st.phase_index + (st.steps ? st.step / st.steps : 0);
      $("status").textContent = st.phase + (st.steps ? ": step " + st.step + " of " + st.steps : "");
      if (st.state === "done" || st.state === "error") break;
      await new Promise((r) => setTimeout(r, 250));
    }
    if (st.state === "error") throw new Error(st.error);
    job = st;
    const t = st.times, s = (k) => (t[k] === undefined ? "" : k + " " + t[k].toFixed(2) + " s, ");
    $("times").textContent = st.size[0] + "x" + st.size[1] + ", " + st.settings.steps + " steps, seed " +
      st.settings.seed + ": " + s("load") + s("ir") + s("base") + s("attention") + "total " + t.total.toFixed(2) +
      " s" + (st.note ? ". " + st.note : "");
    $("status").textContent = "done in " + t.total.toFixed(2) + " s";
    for (const [img, file] of [["rgb-view", "rgb"], ["sem-view", "sem"], ["ir", "ir"], ["base", "base"]])
      $(img).src = "/api/jobs/" + id + "/" + file;
    $("result").hidden = false;
  } catch (e) {
    showError(e.message); $("status").textContent = "";
  } finally {
    $("run").disabled = false;
  }
}

async function look(ev) {
  if (!job) return;
  if (!job.attention) { $("attn-text").textContent = job.note || "no attention maps"; return; }
  const img = ev.target, r = img.getBoundingClientRect();
  const x = Math.min(img.naturalWidth - 1, Math.floor((ev.clientX - r.left) * img.naturalWidth / r.width));
  const y = Math.min(img.naturalHeight - 1, Math.floor((ev.clientY - r.top) * img.naturalHeight / r.height));
  try {
    const a = await api("/api/jobs/" + job.id + "/attention?x=" + x + "&y=" + y);
    const pct = (rows) => rows.map(([c, v]) => c + " " + (100 * v).toFixed(0) + "%").join(", ");
    $("attn-text").textContent = "Pixel (" + x + ", " + y + "), image token row " + a.token.row + ", column " +
      a.token.col + " of the " + a.token.grid[0] + "x" + a.token.grid[1] + " grid, reads (mean over " +
      a.blocks.length + " blocks): " + pct(a.mean) + ". One heat map per block over the semantic map:";
    $("attn").src = a.image;
  } catch (e) { showError(e.message); }
}

$("form").addEventListener("submit", generate);
$("rgb-view").addEventListener("click", look);
$("sem-view").addEventListener("click", look);
init().catch((e) => showError(e.message));
</script></body></html>
"""


if __name__ == "__main__":
    sys.exit(main())
