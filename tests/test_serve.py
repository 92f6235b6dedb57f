"""`t2f serve` and the show-attend-tell figure: the figure itself, the checks on every kind of bad
request, the queue and the time limit, and a real server on a tiny checkpoint driven the two
ways people use it: headless Chromium (Debian's, through Selenium, network blocked) and
`gradio_client`, whose faces must be exactly those of `t2f generate` with the settings JSON's command."""

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_generate import tiny_checkpoint

from t2f import generate
from t2f.attention import FACE_LABEL, PANEL, attention_figure, attention_panels, panel_origin
from t2f.data.vocab import Vocab
from t2f.serving import MAX_CAPTION_CHARS, MAX_FACES, RequestError, check_caption, check_settings

CAPTION = "the woman has blond hair and is smiling ."
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
OFFLINE_SWITCHES = ("GRADIO_ANALYTICS_ENABLED", "HF_HUB_DISABLE_TELEMETRY", "GRADIO_SSR_MODE")  # t2f serve sets them
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # gradio's own use of pandas


# ---------------------------------------------------------------------------- the attention figure


def _peaked(words: int, side: int, cell: int) -> torch.Tensor:
    attention = torch.full((words, side * side), 1e-4)
    attention[:, cell] = 1.0
    return attention / attention.sum(dim=1, keepdim=True)  # (T, L), rows sum to 1


def test_attention_figure_has_the_face_then_one_labelled_panel_per_word():
    face = torch.rand(3, 32, 32) * 2 - 1
    words = ["the", "woman", "has", "blond", "hair", "and", "a", "hat"]
    figure = attention_figure(face, words, _peaked(len(words), 4, 0), panel=64, per_row=6)
    panels = attention_panels(face, _peaked(len(words), 4, 0), panel=64)
    assert len(panels) == 1 + len(words) and all(p.shape == (64, 64, 3) for p in panels)
    pixels = np.asarray(figure)
    for index, panel in enumerate(panels):  # every panel sits where the layout says, in rows of 6
        x, y = panel_origin(index, 64, 6)
        assert np.array_equal(pixels[y:y + 64, x:x + 64], panel)
    assert figure.width == panel_origin(5, 64, 6)[0] + 64 + 4 and panel_origin(6, 64, 6)[1] > 64


def test_attention_figure_writes_each_word_under_its_panel():
    face = torch.zeros(3, 32, 32)
    attention = _peaked(2, 4, 5)
    blond = np.asarray(attention_figure(face, ["blond", "hair"], attention, panel=64))
    black = np.asarray(attention_figure(face, ["black", "hair"], attention, panel=64))

    def label(pixels, index):  # the strip under panel `index`
        x, y = panel_origin(index, 64)
        return pixels[y + 64:y + 64 + 20, x:x + 64]

    assert (label(blond, 0) < 128).any() and (label(blond, 1) < 128).any()  # "face" and "blond" are written
    assert not np.array_equal(label(blond, 1), label(black, 1))  # the word itself, not a fixed mark
    assert np.array_equal(label(blond, 2), label(black, 2))  # "hair" in both
    assert FACE_LABEL == "face"


def test_attention_lights_the_part_of_the_face_the_decoder_looked_at():
    face = torch.ones(3, 64, 64) * 0.5
    top_left, bottom_right = attention_panels(face, torch.cat([_peaked(1, 4, 0), _peaked(1, 4, 15)]), panel=PANEL)[1:]
    cell = PANEL // 4  # one cell of the 4x4 feature grid
    assert top_left[:cell, :cell].mean() > 3 * top_left[-cell:, -cell:].mean()
    assert bottom_right[-cell:, -cell:].mean() > 3 * bottom_right[:cell, :cell].mean()


def test_attention_figure_refuses_mismatched_words_and_non_square_grids():
    with pytest.raises(ValueError, match="2 words for 3 attention maps"):
        attention_figure(torch.zeros(3, 8, 8), ["a", "b"], _peaked(3, 2, 0))
    with pytest.raises(ValueError, match="square grid"):
        attention_panels(torch.zeros(3, 8, 8), torch.ones(2, 5) / 5)
    assert attention_figure(torch.zeros(3, 8, 8), [], torch.zeros(0, 4)).width > 0  # nothing read: the face alone


# ---------------------------------------------------------------------------- bad requests


@pytest.fixture(scope="module")
def vocab():
    return Vocab(["<pad>", "<bos>", "<eos>", "<unk>", *"the woman man has blond hair and is smiling .".split()])


@pytest.mark.parametrize("caption, message", [
    ("", "type a caption first"),
    ("  \n\t ", "type a caption first"),
    ("the woman " * 1000, f"the limit is {MAX_CAPTION_CHARS:,}"),
    ("zebra quantum", "none of the caption's words (“zebra”, “quantum”) occur in this model's training captions"),
    ("?! ... ,", "no words"),
    ("the woman \ud83d has", "lone surrogates"),  # half an emoji: what a broken copy-paste leaves
    ("the wom\ufffdn has", "not valid UTF-8"),  # bytes that were decoded with errors="replace"
    ("the woman\x00 has", "control characters (U+0000)"),
    (b"the wom\xe4n has", "must be text, got bytes"),  # Latin-1 bytes sent to the API as they are
])
def test_bad_captions_get_a_message_that_says_what_to_do(vocab, caption, message):
    with pytest.raises(RequestError) as err:
        check_caption(caption, vocab)
    assert message in str(err.value)


def test_good_captions_pass_on_one_line_with_a_note_for_unknown_words(vocab):
    assert check_caption("  the woman\nhas blond hair . ", vocab) == ("the woman has blond hair .", [])
    caption, notes = check_caption("the woman has purple hair", vocab)
    assert caption == "the woman has purple hair" and "“purple”" in notes[0]


@pytest.mark.parametrize("settings, message", [
    ((0, 0, 0.7, True), f"from 1 to {MAX_FACES}"), ((MAX_FACES + 1, 0, 0.7, True), f"from 1 to {MAX_FACES}"),
    ((2.5, 0, 0.7, True), "whole number"), ((2, 0.5, 0.7, True), "seed"), ((2, None, 0.7, True), "seed"),
    ((2, 0, 2.5, True), "from 0 to 2"), ((2, 0, float("nan"), True), "from 0 to 2"), ((2, 0, "0.7", True), "from 0 to 2"),
    ((2, 0, 0.7, "yes"), "true or false"),
])
def test_out_of_range_settings_get_a_message(settings, message):
    with pytest.raises(RequestError, match=message):
        check_settings(*settings)
    assert check_settings(4.0, 7, 1, False) == (4, 7, 1.0, False)


# ---------------------------------------------------------------------------- the pipeline behind the page


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def studio(run_dir):
    from t2f.inference import load_pipeline
    from t2f.serving import Studio

    return Studio(load_pipeline(run_dir, device="cpu"), device="cpu")


def test_read_back_with_attention_is_read_back_word_by_word(studio):
    pipeline = studio.pipeline
    images = pipeline.generate([CAPTION], n=3, seed=1)
    readings = pipeline.read_back_with_attention(images)
    assert [r.text for r in readings] == pipeline.read_back(images)
    grid = pipeline.cfg.recaptioner.feature_grid
    for reading in readings:
        assert reading.attention.shape == (len(reading.words), grid * grid)
        assert torch.allclose(reading.attention.sum(dim=1), torch.ones(len(reading.words)), atol=1e-5)
    ids, alphas = pipeline.model.recaptioner.greedy(images, max_len=6, return_attention=True)
    assert ids == pipeline.model.recaptioner.greedy(images, max_len=6) and [len(a) for a in alphas] == [len(i) for i in ids]


def test_pipeline_generate_defaults_to_the_checkpoints_truncation_as_the_cli_does(studio, monkeypatch):
    """A Python user calling generate() without a psi gets the faces `t2f generate` draws (it used to be 1.0)."""
    from dataclasses import replace

    pipeline = studio.pipeline
    monkeypatch.setattr(pipeline, "cfg", replace(pipeline.cfg, generator=replace(pipeline.cfg.generator, truncation_psi=0.5)))
    default = pipeline.generate([CAPTION], n=2, seed=3)
    assert torch.equal(default, pipeline.generate([CAPTION], n=2, seed=3, truncation_psi=0.5))
    assert not torch.equal(default, pipeline.generate([CAPTION], n=2, seed=3, truncation_psi=1.0))


def test_generate_attention_flag_writes_the_figure_of_the_first_face(run_dir, studio, tmp_path, capsys):
    out = tmp_path / "attention.png"
    assert generate.main(["--ckpt", str(run_dir), "--device", "cpu", CAPTION, "--n", "2", "--seed", "5",
                          "--out", str(tmp_path / "grid.png"), "--attention", str(out)]) == 0
    images = studio.pipeline.generate([CAPTION], n=2, seed=5, truncation_psi=studio.default_psi)
    reading = studio.pipeline.read_back_with_attention(images[:1])[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(attention_figure(images[0], reading.words, reading.attention)))
    assert f"wrote {out} (attention for: {reading.text or 'no words'})" in capsys.readouterr().out
    assert generate.main(["--ckpt", str(run_dir), CAPTION, "--attention", str(tmp_path)]) == 2  # a folder: exit 2


def test_ca_noise_off_draws_the_caption_mean_every_time(studio, run_dir, tmp_path):
    result = studio.draw(CAPTION, n=3, seed=0, ca_noise=False)
    assert torch.equal(result.images[0], result.images[1]) and torch.equal(result.images[1], result.images[2])
    assert "--no-ca-noise" in result.settings["command"]
    assert generate.main(["--ckpt", str(run_dir), "--device", "cpu", CAPTION, "--n", "2", "--no-ca-noise",
                          "--out-dir", str(tmp_path)]) == 0
    for name in ("caption000_sample00.png", "caption000_sample01.png"):  # generate's flag: the same mean face
        assert np.array_equal(np.asarray(Image.open(tmp_path / name)), result.faces[0])
    noisy = studio.draw(CAPTION, n=2, seed=0).images
    assert not torch.equal(noisy[0], noisy[1])


def test_a_caption_past_the_text_encoders_window_is_drawn_with_a_note(studio):
    long = " ".join([CAPTION] * 30)  # 270 words: under the page's limit, past the encoder's 64 tokens
    result = studio.draw(long, n=1)
    assert "longer than the text encoder's window" in result.notes[0]
    assert result.settings["caption"] == long  # the command gives generate the whole caption, as typed
    assert torch.equal(result.images, studio.pipeline.generate([long], n=1, truncation_psi=studio.default_psi))


def test_a_request_past_the_time_limit_stops_and_the_next_one_runs(studio):
    from t2f.serving import TimeLimitExceeded

    studio.time_limit = 0.0
    try:
        with pytest.raises(TimeLimitExceeded, match="time limit"):
            studio.draw(CAPTION, n=2)
    finally:
        studio.time_limit = 120.0
    assert all(not m._forward_pre_hooks for m in studio.pipeline.generator.modules())  # the hooks are gone
    assert len(studio.draw(CAPTION, n=2).faces) == 2


def test_serve_refuses_a_missing_run_and_a_taken_port_in_one_line(run_dir, tmp_path, monkeypatch, capsys):
    from t2f import serve

    for name in OFFLINE_SWITCHES:
        monkeypatch.delenv(name, raising=False)  # restored afterwards: the switches stay out of other tests
    monkeypatch.chdir(tmp_path)
    assert serve.main([]) == 2
    assert "run ./launch demo first" in capsys.readouterr().err
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    assert serve._checkpoint_arg(None) == Path("runs/demo")  # after ./launch demo, plain `t2f serve` finds it
    with socket.create_server(("127.0.0.1", 0)) as taken:
        assert serve.main(["--ckpt", str(run_dir), "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "choose another --port" in err and len(err.strip().splitlines()) == 1


def test_requests_queue_one_at_a_time_a_timeout_leaves_the_server_up_and_nothing_phones_home(studio, tmp_path, monkeypatch):
    from t2f.serve import offline_gradio

    looked_up, getaddrinfo = [], socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: looked_up.append(host) or getaddrinfo(host, *a, **k))
    for name in OFFLINE_SWITCHES:
        monkeypatch.delenv(name, raising=False)  # as a user's shell has them; restored afterwards
    offline_gradio()
    from t2f.serve_page import build_page

    active, most, draw = [0], [0], studio.draw

    def slow_draw(*args, **kwargs):  # counts requests running at once
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.5)
        try:
            return draw(*args, **kwargs)
        finally:
            active[0] -= 1

    studio.draw = slow_draw
    page = build_page(studio, [], tmp_path)
    page.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = _client(page.local_url, tmp_path, monkeypatch)
        jobs = [client.submit(CAPTION, 1, seed, 1.0, True, api_name="/generate") for seed in range(3)]
        results = [job.result(timeout=120) for job in jobs]
        assert most[0] == 1 and all(len(r[0]) == 1 for r in results)  # all served, never two at once
        studio.time_limit = 0.0
        assert client.predict(CAPTION, 1, 0, 1.0, True, api_name="/generate")[5].startswith("**Cancelled:** stopped after")
        studio.time_limit = 120.0
        assert len(client.predict(CAPTION, 2, 0, 1.0, True, api_name="/generate")[0]) == 2
    finally:
        studio.draw, studio.time_limit = draw, 120.0
        page.close()
    assert looked_up and set(looked_up) <= LOOPBACK  # no analytics, version check or telemetry (api.gradio.app, huggingface.co)


# ---------------------------------------------------------------------------- a real `t2f serve`


def _client(url: str, downloads: Path, monkeypatch):
    """A gradio_client as an offline script makes one: no telemetry, no Hugging Face Hub lookups."""
    import huggingface_hub.constants
    from gradio_client import Client

    with monkeypatch.context() as patch:  # = HF_HUB_OFFLINE=1 (read at import): no agent-registry fetch from the Hub
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        return Client(url, verbose=False, download_files=str(downloads), analytics_enabled=False)


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    """`t2f serve` in a subprocess on a free port; (url, the line it printed when it started)."""
    port, cache = _free_port(), tmp_path_factory.mktemp("gradio-cache")
    env = dict(os.environ, GRADIO_TEMP_DIR=str(cache), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "t2f.cli", "serve", "--ckpt", str(run_dir), "--port", str(port),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 180
    while not any(line.startswith("t2f serve:") for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "t2f serve did not start:\n" + "".join(lines)
        time.sleep(0.2)
    yield f"http://127.0.0.1:{port}", next(line for line in lines if line.startswith("t2f serve:"))
    proc.terminate()
    assert proc.wait(timeout=30) == 0, "".join(lines)


def test_serve_says_where_it_listens_and_binds_to_this_machine_only(server):
    url, started = server
    assert f"at {url}, bound to 127.0.0.1: only this machine can open it" in started


def test_gradio_client_gets_the_faces_that_t2f_generate_draws_from_the_settings(server, run_dir, tmp_path, monkeypatch):
    client = _client(server[0], tmp_path, monkeypatch)
    faces, read_back, figure, _, files, message, *_ = client.predict(CAPTION, 3, 11, 0.75, True, api_name="/generate")
    assert len(faces) == 3 and message.startswith("3 faces")
    assert [f["caption"] for f in faces] == [line.split(". ", 1)[1] for line in read_back.splitlines()]
    assert Image.open(figure).width > 3 * 64
    grid, settings = sorted(files, key=lambda p: p.endswith(".json"))
    settings = json.loads(Path(settings).read_text(encoding="utf-8"))
    assert (settings["caption"], settings["n"], settings["seed"], settings["truncation_psi"]) == (CAPTION, 3, 11, 0.75)

    args = shlex.split(settings["command"])  # t2f generate ... --out grid.png ... -- CAPTION
    assert args[:2] == ["t2f", "generate"]
    args[args.index("--out") + 1] = str(tmp_path / "again.png")
    args[args.index("--attention") + 1] = str(tmp_path / "attention.png")
    assert generate.main(args[2:-2] + ["--out-dir", str(tmp_path / "again"), "--", args[-1]]) == 0
    assert (tmp_path / "again.png").read_bytes() == Path(grid).read_bytes()  # the same grid, byte for byte
    for index, face in enumerate(faces):
        drawn = np.asarray(Image.open(tmp_path / "again" / f"caption000_sample{index:02d}.png"))
        assert np.array_equal(np.asarray(Image.open(face["image"]).convert("RGB")), drawn)

    empty = client.predict("", 2, 0, 0.7, True, api_name="/generate")
    assert empty[0] == [] and "type a caption first" in empty[5]
    with pytest.raises(Exception, match=f"greater than maximum value {MAX_FACES}"):
        client.predict(CAPTION, 1000, 0, 0.7, True, api_name="/generate")
    assert len(client.predict(CAPTION, 1, 0, 0.7, True, api_name="/generate")[0]) == 1  # still up


@pytest.fixture
def browser(tmp_path):
    from headless_chromium import ChromiumUnavailable, chromium_driver

    try:
        driver = chromium_driver()
    except ChromiumUnavailable as err:
        pytest.skip(str(err))
    yield driver
    driver.save_screenshot(str(tmp_path / "page.png"))  # what the page looked like at the end, pass or fail
    driver.quit()


def test_in_a_browser_with_no_network_the_page_draws_faces_reads_them_back_and_explains_bad_input(server, browser):
    from headless_chromium import outside_requests
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def find(css, driver=browser):
        return driver.find_elements(By.CSS_SELECTOR, css)

    def rendered(css):  # images the browser decoded (naturalWidth 0 = broken or not loaded)
        return [img for img in find(css) if int(img.get_attribute("naturalWidth") or 0) > 0]

    wait = WebDriverWait(browser, 60)
    browser.get(server[0])
    caption = wait.until(lambda d: find("#caption textarea"))[0]
    caption.send_keys(CAPTION)
    find("#generate")[0].click()
    wait.until(lambda d: len(rendered("#faces img")) == 4 and rendered("#attention img"))
    wait.until(lambda d: find("#read-back textarea")[0].get_attribute("value"))
    read_back = find("#read-back textarea")[0].get_attribute("value").splitlines()
    assert [line.split(". ", 1)[0] for line in read_back] == ["1", "2", "3", "4"]
    downloads = find("#downloads")[0].text
    assert "4 faces" in find("#message")[0].text and "t2f-seed0-n4-grid" in downloads and "t2f-seed0-n4-settings" in downloads
    figure = rendered("#attention img")[0].get_attribute("src")

    find("#faces button.thumbnail-item")[1].click()  # another face: its own attention figure
    wait.until(lambda d: rendered("#attention img") and rendered("#attention img")[0].get_attribute("src") != figure)

    caption.send_keys(Keys.CONTROL, "a")
    caption.send_keys(Keys.DELETE)
    find("#generate")[0].click()
    wait.until(lambda d: "type a caption first" in find("#message")[0].text)
    assert not rendered("#faces img")  # nothing stale left from the request before
    assert outside_requests(browser) == []  # fonts, scripts and styles all come from the server itself
