"""tools/app.py: through the same HTTP endpoints the page uses, the result is sample.py's image pixel for pixel, a
map off the palette gets the CLI's error line, oversized uploads are refused before they are decoded or read, the
server binds to 127.0.0.1 by default, and every file it writes lies in its temporary folder; the same flow in a real
headless chromium (skipped where selenium or chromium/chromedriver is absent).

    python tests/tools/test_app.py --screenshot assets/app.png   # the screenshot in docs/app.md
"""

import http.client
import io
import json
import shutil
import struct
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # as conftest.py does, for the --screenshot run below

import data  # noqa: E402
import sample  # noqa: E402
from pipeline import attention_maps  # noqa: E402
from tools import app  # noqa: E402

EX = ROOT / "examples"


def start(*argv) -> app.ThreadingHTTPServer:
    """tools.app on a free port of the default host, serving in a thread."""
    server = app.create(["--port", "0", *argv])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop(server) -> None:
    server.shutdown()
    server.server_close()
    server.app.close()


@pytest.fixture(scope="module")
def server():
    """The app on the repository's weights (the shipped demo unless the official files are there), as sample.py."""
    server = start()
    yield server
    stop(server)


def address(server, path: str) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}{path}"


def call(server, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET, or a POST when there is a body."""
    request = urllib.request.Request(address(server, path), data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def upload(server, path: Path, name: str | None = None) -> str:
    """POST /api/uploads, as the page sends a chosen file -> the job's reference to it."""
    status, body = call(server, "/api/uploads", Path(path).read_bytes(), {"X-Filename": name or Path(path).name})
    assert status == 201, body
    return "upload:" + json.loads(body)["id"]


def submit(server, **request) -> tuple[int, dict]:
    status, body = call(server, "/api/jobs", json.dumps(request).encode(), {"Content-Type": "application/json"})
    return status, json.loads(body)


def finish(server, job_id: str, seen: list | None = None) -> dict:
    """Poll the job as the page does until it is done or failed; `seen` collects every (phase, step) polled."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = json.loads(call(server, f"/api/jobs/{job_id}")[1])
        if seen is not None:
            seen.append((status["phase"], status["step"], status["steps"]))
        if status["state"] in ("done", "error"):
            return status
        time.sleep(0.005)
    raise AssertionError(f"job {job_id} did not finish: {status}")


def sample_py(tmp_path, *args) -> np.ndarray:
    """sample.py's output for the example pair: 8-bit grey [H, W]."""
    out = tmp_path / "sample_ir.png"
    assert sample.main([str(EX / "rgb.png"), str(EX / "sem.png"), "-o", str(out), *args]) == 0
    return np.asarray(Image.open(out))


def off_palette_map(folder: Path) -> Path:
    """The example map with a 5x5 block in a colour no class has."""
    sem = np.array(Image.open(EX / "sem.png").convert("RGB"))
    sem[10:15, 10:15] = (1, 2, 3)
    Image.fromarray(sem).save(folder / "bad_sem.png")
    return folder / "bad_sem.png"


def test_the_result_of_an_uploaded_pair_equals_sample_py_pixel_for_pixel(server, tmp_path):
    settings = dict(steps=2, seed=3, sem_strength=1.25)
    status, job = submit(server, rgb=upload(server, EX / "rgb.png"), sem=upload(server, EX / "sem.png"), **settings)
    assert status == 202, job
    done = finish(server, job["id"])
    assert done["state"] == "done", done
    status, png = call(server, f"/api/jobs/{job['id']}/ir")
    page = Image.open(io.BytesIO(png))
    assert status == 200 and page.mode == "L"
    cli = sample_py(tmp_path, "--steps", "2", "--seed", "3", "--sem-strength", "1.25")
    assert np.array_equal(np.asarray(page), cli)


def test_the_base_image_is_sample_py_base(server, tmp_path):
    status, job = submit(server, rgb="example:example", sem="example:example", steps=2)
    assert finish(server, job["id"])["state"] == "done"
    base = np.asarray(Image.open(io.BytesIO(call(server, f"/api/jobs/{job['id']}/base")[1])))
    assert np.array_equal(base, sample_py(tmp_path, "--steps", "2", "--base"))


def test_a_click_reads_its_token_row_of_the_attention_maps(server):
    status, job = submit(server, rgb="example:example", sem="example:example", steps=2)
    assert finish(server, job["id"])["state"] == "done"
    x, y = 37, 101  # token row 6, column 2 of the 8x8 grid of a 128x128 pair
    status, body = call(server, f"/api/jobs/{job['id']}/attention?x={x}&y={y}")
    got = json.loads(body)
    assert status == 200 and got["token"] == {"row": 6, "col": 2, "index": 6 * 8 + 2, "grid": [8, 8]}
    assert got["image"].startswith("data:image/png;base64,")
    # the same row of pipeline.attention_maps, its mass summed over each class's pixels
    classes = server.app.classes
    rgb, sem, ids = data.load_pair(EX / "rgb.png", EX / "sem.png", classes, None)  # [3, H, W] x 2, [H, W]
    maps = attention_maps(server.app.pipe, rgb[None], sem[None], seed=0, steps=2)  # {block: [L_img, N]}
    assert [b["name"] for b in got["blocks"]] == sorted(maps, key=lambda k: (k[0] != "d", int(k.split(".")[1])))
    names = {c.id: c.name for c in classes}
    for block in got["blocks"]:
        row = maps[block["name"]][6 * 8 + 2].reshape(8, 8)  # [N] -> [8, 8] semantic tokens
        share = {}
        for ty in range(8):
            for tx in range(8):
                cell = ids[ty * 16:(ty + 1) * 16, tx * 16:(tx + 1) * 16]  # [16, 16] class ids under the token
                for c, n in zip(*torch.unique(cell, return_counts=True)):
                    share[names[int(c)]] = share.get(names[int(c)], 0) + float(row[ty, tx]) * int(n) / 256
        for name, value in block["reads"]:
            assert abs(share[name] / sum(share.values()) - value) < 1e-3, (block, share)


def test_progress_counts_the_sampling_steps_as_they_run(server):
    status, job = submit(server, rgb="example:example", sem="example:example", steps=20)
    seen = []
    done = finish(server, job["id"], seen)
    assert done["state"] == "done" and done["step"] == done["steps"] > 0
    ir_steps = {step for phase, step, steps in seen if phase == "infrared image"}
    assert any(0 < s < 20 for s in ir_steps), seen  # polled mid-sampling: the hook counted the calls so far
    assert set(done["times"]) >= {"load", "ir", "base", "attention", "total"}


def test_a_map_off_the_palette_gets_the_cli_error_line(server, tmp_path, monkeypatch, capsys):
    bad = off_palette_map(tmp_path)
    shutil.copy(EX / "rgb.png", tmp_path / "rgb.png")
    monkeypatch.chdir(tmp_path)
    assert sample.main(["rgb.png", "bad_sem.png", "-o", "out.png", "--steps", "1"]) == 2
    cli = capsys.readouterr().err.strip().removeprefix("error: ")
    assert "not in the class palette" in cli
    status, job = submit(server, rgb=upload(server, tmp_path / "rgb.png"), sem=upload(server, bad), steps=1)
    done = finish(server, job["id"])
    assert done["state"] == "error" and done["error"] == cli


def png_header(width: int, height: int) -> bytes:
    """A PNG of 8-bit grey that is a header only: no pixel data at all, so it cannot be decoded."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(
        b"IEND", b"")


def test_an_upload_over_the_pixel_limit_is_refused_from_its_header(server):
    side = int(data.pixel_limit() ** 0.5) + 1
    status, body = call(server, "/api/uploads", png_header(side, side), {"X-Filename": "huge.png"})
    error = json.loads(body)["error"]
    assert status == 400 and error.startswith(f"huge.png: {side}x{side} is ") and "over the limit" in error
    assert not any(p.name == "huge.png" for p in server.app.tmp.rglob("*"))  # not kept either


def test_a_body_over_the_byte_limit_is_refused_before_it_is_read(server):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)  # a server reading the body would block: a timeout
    conn.putrequest("POST", "/api/uploads")
    conn.putheader("Content-Length", str(server.app.max_body + 1))
    conn.putheader("X-Filename", "big.png")
    conn.endheaders()  # no body is sent at all
    r = conn.getresponse()
    assert r.status == 413 and "over the limit" in json.loads(r.read())["error"]
    conn.close()


def test_the_page_defaults_are_sample_py_flag_defaults(server, monkeypatch):
    parsed = {}

    def stop_after_parsing(args):
        parsed.update(vars(args))
        raise ValueError("parsed")
    monkeypatch.setattr(sample, "check_args", stop_after_parsing)
    assert sample.main(["rgb.png", "sem.png"]) == 2
    assert app.DEFAULTS == {k: parsed[k] for k in app.DEFAULTS}
    assert json.loads(call(server, "/api/info")[1])["defaults"] == app.DEFAULTS  # what the page's fields start at


def test_the_server_binds_to_loopback_by_default(server):
    assert app.parse_args([]).host == "127.0.0.1"
    assert server.server_address[0] == "127.0.0.1"  # made with no --host


def test_bad_requests_are_one_line_never_a_traceback(server):
    for path, body, headers, status, message in [
            ("/api/jobs", b'{"rgb": "example:example", "sem": "example:example", "steps": 0}', "json", 400,
             "steps 0: must be in 1..1000"),
            ("/api/jobs", b'{"rgb": "upload:0000", "sem": "example:example"}', "json", 400, "no such upload"),
            ("/api/jobs", b'{"rgb": "example:example", "sem": "example:example", "seed": -1}', "json", 400, "seed -1"),
            ("/api/jobs", b'{"rgb": "example:example", "sem": "example:example", "guidance": "x"}', "json", 400,
             "guidance 'x'"),
            ("/api/jobs", b'{"rgb": "example:example", "sem": "example:example", "size": 65536}', "json", 400,
             "over the limit"),
            ("/api/jobs", b"[[[", "json", 400, "not JSON"),
            ("/api/jobs", b"{}", "text/plain", 415, "application/json"),
            ("/api/uploads", b"not an image", {"X-Filename": "junk.png"}, 400, "junk.png: cannot read image header"),
            ("/api/uploads", EX.joinpath("rgb.png").read_bytes(), None, 400, "X-Filename"),
            ("/api/jobs/nope", None, None, 404, "no job"),
            ("/api/info", None, {"Host": "attacker.example:80"}, 403, "answers only to 127.0.0.1")]:
        headers = {"Content-Type": "application/json"} if headers == "json" else (
            {"Content-Type": headers} if isinstance(headers, str) else headers)
        got, reply = call(server, path, body, headers)
        error = json.loads(reply)["error"]
        assert got == status and message in error and "\n" not in error and "Traceback" not in error, (path, error)


def test_every_file_lies_in_the_temporary_folder_removed_on_close():
    server = start("--no-base")
    try:
        tmp = server.app.tmp
        assert tmp.parent == Path(tempfile.gettempdir()) and tmp.is_dir()
        status, job = submit(server, rgb=upload(server, EX / "rgb.png"), sem="example:example", steps=1)
        assert finish(server, job["id"])["state"] == "done"
        made = {p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()}
        assert {f"j/{job['id']}/{f}.png" for f in ("rgb", "sem", "ir")} <= made
    finally:
        stop(server)
    assert not tmp.exists()


# ----------------------------------------------------------------------------------------------------------------
# The page in a real browser


def chromium():
    """A headless chromium driven through selenium, or the reason there is none here."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, "selenium is not installed (pip install selenium)"
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                   None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        return None, "chromium or chromedriver is not installed (e.g. apt-get install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1150,1400"):
        options.add_argument(flag)
    try:
        return webdriver.Chrome(service=Service(driver), options=options), None
    except Exception as e:  # a chromium that cannot start here (no display libraries, ...)
        return None, f"chromium did not start: {str(e).splitlines()[0]}"


def run_in_page(driver, rgb: Path, sem: Path, steps: int | None) -> None:
    """Choose the two files and the steps on the page, press Generate."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "example").get_attribute("value"))
    driver.find_element(By.ID, "rgb-file").send_keys(str(rgb))
    driver.find_element(By.ID, "sem-file").send_keys(str(sem))
    if steps is not None:
        driver.find_element(By.ID, "steps").clear()
        driver.find_element(By.ID, "steps").send_keys(str(steps))
    driver.find_element(By.ID, "run").click()


def shown_image(driver, element_id: str) -> np.ndarray:
    """The red channel of an image as the page shows it, read back through a canvas: [H, W]."""
    from selenium.webdriver.support.ui import WebDriverWait
    script = f"const i = document.getElementById('{element_id}'); return i.complete && i.naturalWidth > 0;"
    WebDriverWait(driver, 300).until(lambda d: d.execute_script(script))
    w, h, pixels = driver.execute_script(f"""
        const i = document.getElementById('{element_id}'), c = document.createElement('canvas');
        c.width = i.naturalWidth; c.height = i.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(i, 0, 0);
        return [c.width, c.height, Array.from(g.getImageData(0, 0, c.width, c.height).data)];""")
    return np.array(pixels, np.uint8).reshape(h, w, 4)[..., 0]


def click_and_wait_attention(driver, element_id: str, x: int, y: int) -> str:
    """Click pixel (x, y) of the shown image (whatever its shown size); the attention text once it is there."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    image = driver.find_element(By.ID, element_id)
    W, H = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    w, h = image.size["width"], image.size["height"]  # CSS pixels; the offset is from the image's centre
    dx, dy = round((x + 0.5) * w / W - w / 2), round((y + 0.5) * h / H - h / 2)
    ActionChains(driver).move_to_element_with_offset(image, dx, dy).click().perform()
    WebDriverWait(driver, 30).until(lambda d: (d.find_element(By.ID, "attn").get_attribute("src") or "")
                                    .startswith("data:image/png"))
    return driver.find_element(By.ID, "attn-text").text


@pytest.fixture
def browser():
    """A headless chromium for one test; the test is skipped, saying why, where there is none."""
    driver, why = chromium()
    if driver is None:
        pytest.skip(why)
    yield driver
    driver.quit()


def test_the_page_in_headless_chromium_shows_sample_py_result_and_the_error_line(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(address(server, "/"))
    run_in_page(browser, EX / "rgb.png", EX / "sem.png", steps=2)
    assert np.array_equal(shown_image(browser, "ir"), sample_py(tmp_path, "--steps", "2"))
    assert "Pixel (37, 101), image token row 6, column 2" in click_and_wait_attention(browser, "rgb-view", 37, 101)
    assert browser.find_element(By.ID, "error").text == ""
    browser.find_element(By.ID, "sem-file").send_keys(str(off_palette_map(tmp_path)))
    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, 120).until(lambda d: d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text.startswith("bad_sem.png: 1 colour(s) not in the class palette")


def screenshot(out: Path) -> None:
    """The page after a default request on the example pair and a click on the person: a PNG at `out`."""
    driver, why = chromium()
    if driver is None:
        raise SystemExit(why)
    server = start()
    try:
        driver.get(address(server, "/"))
        run_in_page(driver, EX / "rgb.png", EX / "sem.png", steps=None)
        shown_image(driver, "ir")
        print(click_and_wait_attention(driver, "rgb-view", 120, 80))  # the person on the right
        height = driver.execute_script("return Math.ceil(document.body.getBoundingClientRect().bottom + scrollY)")
        driver.set_window_size(1150, height + 200)  # the window's outer size: room for all of the page
        time.sleep(0.5)
        driver.save_screenshot(str(out))
        shot = Image.open(out).convert("RGB")
        shot = shot.crop((0, 0, shot.width, min(shot.height, height + 10)))  # the page, not the empty window below
        shot.save(out, optimize=True)
        print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    finally:
        driver.quit()
        stop(server)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--screenshot"] or len(sys.argv) != 3:
        raise SystemExit("usage: python tests/tools/test_app.py --screenshot assets/app.png")
    screenshot(Path(sys.argv[2]))
