"""examples/app.py, the web demo: an image generated in Chromium, the pipeline's messages and caps, the edit tab."""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_pixnerd import load_pipeline

from ..helpers import BUNDLED_T2I, ROOT

sys.path.insert(0, os.path.join(ROOT, "examples"))
import generate  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_web_demo_generates_an_image_in_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "examples", "app.py"), "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if server.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the app did not start:\n{server.stdout.read()}")
            time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu", "--no-first-run"]
            )
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/", timeout=60_000)
            page.click("#generate-c2i")
            image = page.wait_for_selector("#image-c2i img", timeout=60_000)
            src = image.get_attribute("src")
            page.wait_for_selector("#trajectory-c2i img", timeout=30_000)
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
            # The text-to-image tab serves the bundled text-to-image model: type a prompt, get an image.
            page.get_by_role("tab", name="Text-to-image").click()
            page.fill("#prompt-t2i textarea", "a photo of a handbag")
            page.click("#generate-t2i")
            t2i_src = page.wait_for_selector("#image-t2i img", timeout=60_000).get_attribute("src")
            # The edit tab: pick a sample image and a preset mask, repaint it from a prompt.
            page.get_by_role("tab", name="Edit").click()
            page.click("#edit-sample input")
            page.get_by_role("option", name="coat").click()
            page.wait_for_selector("#edit-image canvas", timeout=30_000)
            page.locator("#edit-mask").get_by_text("right half").click()
            page.fill("#prompt-edit textarea", "a photo of a sneaker")
            page.click("#generate-edit")
            edit_src = page.wait_for_selector("#image-edit img", timeout=60_000).get_attribute("src")
            page.wait_for_selector("#mask-edit img", timeout=30_000)
            page.screenshot(path=str(tmp_path / "edit.png"), full_page=True)
            browser.close()
        for source in (src, t2i_src, edit_src):
            assert source and ("/file=" in source or "gradio_api/file" in source or source.startswith("data:image"))
        shot = Image.open(tmp_path / "app.png")
        assert shot.width > 300 and shot.height > 300
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_web_demo_shows_the_pipelines_message_enforces_its_caps_and_cleans_up(tmp_path, monkeypatch):
    import app
    import gradio as gr

    pipe = load_pipeline(generate.BUNDLED_MODEL, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    values = dict(
        num_inference_steps=2, guidance_scale=2.0, guidance_interval=(0.0, 1.0), seed=0, shift=1.0, solver_order=2,
        height=32, width=32,
    )  # fmt: skip
    monkeypatch.setattr(app, "FILES_DIR", str(tmp_path))
    image, gif = app.run_request(pipe, {"class_labels": "Sneaker"}, dict(values), max_size=128)
    assert image.size == (256, 256) and os.path.dirname(gif) == str(tmp_path) and gif.endswith(".gif")
    # An argument only the pipeline rejects (an API call can send any height): its message reaches the page.
    with pytest.raises(gr.Error, match=r"`height` .*multiple"):
        app.run_request(pipe, {"class_labels": "Sneaker"}, {**values, "height": 33}, max_size=128)
    with pytest.raises(gr.Error, match=r"sneakr.*Sneaker"):
        app.run_request(pipe, {"class_labels": "sneakr"}, dict(values), max_size=128)
    # The sliders' caps hold for requests that do not come from the sliders.
    for bad, message in (({"num_inference_steps": 1000}, r"steps must be in \[1, 100\]"), ({"width": 4096}, "width")):
        with pytest.raises(gr.Error, match=message):
            app.run_request(pipe, {"class_labels": "Sneaker"}, {**values, **bad}, max_size=128)
    with pytest.raises(gr.Error, match="min <= max"):
        app.run_request(pipe, {"class_labels": "Sneaker"}, {**values, "guidance_interval": (0.9, 0.1)}, max_size=128)
    for seed in (10**30, -1):  # torch's manual_seed would say "Overflow when unpacking long long"
        with pytest.raises(gr.Error, match=rf"seed must be a whole number from 0 to 2\*\*63 - 1 .*got {seed}"):
            app.run_request(pipe, {"class_labels": "Sneaker"}, {**values, "seed": seed}, max_size=128)
    # Old trajectories go; a recent one stays until the browser had time to fetch it.
    os.utime(gif, (time.time() - app.KEEP_FILES_SECONDS - 1,) * 2)
    _, recent = app.run_request(pipe, {"class_labels": "Bag"}, dict(values), max_size=128)
    assert os.listdir(tmp_path) == [os.path.basename(recent)]
    with gr.Blocks() as demo:
        gr.Markdown("x")
    queue = app.bounded_queue(demo)._queue
    assert (queue.max_size, queue.default_concurrency_limit) == (app.MAX_QUEUE, 1)


def test_web_demo_edit_tab_keeps_the_unpainted_pixels_and_names_what_is_missing():
    import app
    import gradio as gr

    from diffusers_pixnerd import PixNerdT2IInpaintPipeline

    pipe = PixNerdT2IInpaintPipeline.from_pipe(load_pipeline(BUNDLED_T2I))
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(app.edit_samples()["coat"]).convert("RGB")
    painted = Image.new("RGBA", image.size, (0, 0, 0, 0))
    painted.paste((255, 255, 255, 255), (16, 0, 32, 32))  # the right half painted over
    values = dict(num_inference_steps=4, guidance_scale=5.0, strength=1.0, seed=0)
    prompt = {"prompt": "a photo of a sneaker"}
    out, mask = app.run_edit(pipe, prompt, {"background": image, "layers": [painted]}, "painted", values, 128)
    assert out.size == mask.size == (256, 256)  # shown 8x larger
    small = np.asarray(out.resize(image.size, Image.NEAREST))
    np.testing.assert_array_equal(small[:, :16], np.asarray(image)[:, :16])
    assert np.abs(small[:, 16:].astype(int) - np.asarray(image)[:, 16:]).mean() > 5
    np.testing.assert_array_equal(np.asarray(mask.resize(image.size, Image.NEAREST))[:, 16:], 255)
    wide, _ = app.run_edit(pipe, prompt, {"background": image, "layers": []}, "outpaint: twice as wide", values, 128)
    assert wide.size == (256, 128)
    np.testing.assert_array_equal(np.asarray(wide.resize((64, 32), Image.NEAREST))[:, :32], np.asarray(image))
    for editor, choice, message in (
        (None, "right half", "Upload an image or pick a sample"),
        ({"background": image, "layers": []}, "painted", "Paint over the part of the image to repaint"),
    ):
        with pytest.raises(gr.Error, match=message):
            app.run_edit(pipe, prompt, editor, choice, values, 128)
    with pytest.raises(gr.Error, match="at most 48 pixels"):
        app.run_edit(pipe, prompt, {"background": image, "layers": []}, "outpaint: twice as wide", values, 48)
    with pytest.raises(gr.Error, match=r"seed must be a whole number"):
        app.run_edit(pipe, prompt, {"background": image, "layers": []}, "right half", {**values, "seed": -1}, 128)
