"""The benchmark's peers (bench/peer_frameworks.py): their preprocessing (a numpy port, since .venv-peers has
no torch) gives our model input bit for bit, and each installed peer serves the same model.onnx with our
answers. Serving needs .venv-peers (scripts/setup.sh --bench-peers, which scripts/test.sh runs): marked
`peers`."""

import contextlib
import io
import os
import shutil

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from bench import peer_frameworks as pf
from bench.peer_apps.common import Classifier, NotAnImage, Prep
from model_src.preprocessing import Preprocessing
from tests.conftest import cannot_run, free_port
from tests.test_tools import fake_repo, run_script
from train.pretrained import EVAL_SIZES, LITE_MEAN, LITE_STD

resize, size = EVAL_SIZES["efficientnet_lite0"]
PREPS = {
    "efficientnet_lite0": Preprocessing(size, resize, 3, LITE_MEAN, LITE_STD),
    "digits": Preprocessing(),  # grey 16x16, resized straight (no crop)
}


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bodies():
    """The bundled photos as clients send them: JPEG (as the benchmark posts), EXIF-turned, CMYK, grey PNG."""
    from train.photos import load_photos

    exif = Image.Exif()
    exif[0x0112] = 6
    found = {}
    for name, photo in load_photos().items():
        rgb = photo.convert("RGB")
        found[f"{name}.jpg"] = encode(rgb, quality=92)
        found[f"{name}-small.jpg"] = encode(rgb.resize((300, 230)), quality=85)  # no DCT scaling
    chelsea = load_photos()["chelsea"].convert("RGB")
    found["exif-rotated.jpg"] = encode(chelsea.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())
    found["cmyk.jpg"] = encode(chelsea.convert("CMYK"), quality=92)
    found["grey.png"] = encode(chelsea.convert("L"), "PNG")
    return found


@pytest.mark.parametrize("model", PREPS)
def test_the_peers_preprocessing_is_ours_bit_for_bit(model, bodies):
    ours = PREPS[model]
    port = Prep(**ours.to_dict())
    for name, body in bodies.items():
        expected = ours.batch([ours.prepare(ours.decode(body))]).numpy()
        got = port.batch([port.decode(body)])
        assert got.shape == expected.shape, name
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), (
            f"{model} {name}: max |diff| {np.abs(got - expected).max()}"
        )


def test_the_peers_refuse_a_body_that_is_not_an_image():
    with pytest.raises(NotAnImage):
        Prep(**PREPS["digits"].to_dict()).decode(b"GIF89a, then nothing an image would hold")


def test_a_refused_body_keeps_its_place_and_spares_its_batch_neighbours():
    model = object.__new__(Classifier)  # no session: answer() is replaced
    model.answer = lambda images: [{"images in the call": len(images)} for _ in images]
    img = Image.new("L", (8, 8))
    got = model.answer_all(["not an image", img, "nor this", img])
    assert got == ["not an image", {"images in the call": 2}, "nor this", {"images in the call": 2}]


@pytest.fixture(scope="module")
def digit_jpegs(digits, tmp_path_factory):
    """One validation image of each of four digits, as JPEG files (the peers' benchmark body)."""
    folder = tmp_path_factory.mktemp("digit_jpegs")
    paths = []
    for label in ("0", "3", "7", "9"):
        val = os.path.join(digits, "val", label)
        with Image.open(os.path.join(val, sorted(os.listdir(val))[0])) as img:
            path = str(folder / f"{label}.jpg")
            img.convert("L").resize((64, 64), Image.BILINEAR).save(path, quality=95)
        paths.append(path)
    return paths


@pytest.mark.peers
@pytest.mark.slow
@pytest.mark.parametrize("name", pf.PEERS)
def test_each_peer_serves_our_model_with_our_answers(name, exported, digit_jpegs):
    if why := pf.available(name):
        cannot_run(f"{name}: {why}")
    onnx = os.path.join(exported, "model.onnx")
    meta = pf.peer_meta(exported)
    expect = pf.expected_labels(onnx, meta, digit_jpegs)
    assert len(set(expect)) > 1  # the model tells the digits apart: a peer answering one label would fail
    with pf.serve(name, onnx, exported, workers=1, threads=1, batch=4, delay_ms=2, port=free_port()) as url:
        assert pf.check(url, digit_jpegs, expect) == []
        answer = requests.post(url, data=open(digit_jpegs[0], "rb").read(), timeout=60).json()
        assert len(answer) == 5 and all(0 <= p <= 1 for p in answer.values())
        junk = requests.post(url, data=b"not an image at all", timeout=60)
        assert junk.status_code == 400 and "not an image" in junk.json()["message"]
        started = peer_processes(name)
        assert started
    with pytest.raises(requests.ConnectionError):  # stopped, with every process it started
        requests.post(url, data=b"x", timeout=5)
    alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [p.cmdline() for p in alive]


def peer_processes(name: str) -> list:
    """The processes a peer runs now: this test's descendants, and any process whose command line or working
    folder is the peer's own temporary folder (Ray's daemons leave the process tree)."""
    found = {p.pid: p for p in psutil.Process().children(recursive=True)}
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if f"peer-{name}-" in " ".join(p.cmdline()) + p.cwd():
                found[p.pid] = p
    return list(found.values())


def response(status: int, body: bytes) -> requests.Response:
    resp = requests.Response()
    resp.status_code, resp._content = status, body
    return resp


def test_a_peer_is_ready_only_when_its_app_refuses_the_probe_not_when_a_proxy_answers():
    assert pf.refused_by_app(response(400, b'{"code": 400, "type": "InputError", "message": "not an image"}'))
    assert not pf.refused_by_app(response(404, b"Path '/predict' not found."))  # Ray's proxy, app not up yet
    assert not pf.refused_by_app(response(503, b'{"type": "InputError"}'))
    assert not pf.refused_by_app(response(400, b'["a list"]'))


def test_setup_bench_peers_fills_its_own_venv_once_and_only_when_asked(tmp_path):
    repo = fake_repo(tmp_path, "setup.sh")
    (repo / "requirements-peers.txt").write_text("litserve==0.2.19\n")
    peers_python = repo / ".venv-peers" / "bin" / "python"  # the fake: no real venv, no real pip
    peers_python.parent.mkdir(parents=True)
    shutil.copy2(repo / ".venv" / "bin" / "python", peers_python)
    stamp = repo / ".venv-peers" / ".requirements.sha256"

    def installed(*flags, **env):
        out, calls = run_script(tmp_path, repo, ["scripts/setup.sh", *flags], **env)
        return out, [c[c.index("-r") + 1] for c in calls if c[1:4] == ["-m", "pip", "install"]]

    assert installed()[1] == ["requirements.txt"]  # not asked: no peers
    out, files = installed("--bench-peers")
    assert out.returncode == 0 and files == ["requirements-peers.txt"] and stamp.exists(), out.stderr
    out, files = installed("--bench-peers")
    assert (
        files == []
        and ".venv-peers (LitServe, BentoML, Ray Serve" in out.stdout
        and "up to date" in out.stdout
    )
    (repo / "requirements-peers.txt").write_text("litserve==0.2.20\n")
    before = stamp.read_text()
    out, files = installed("--bench-peers", FAKE_PIP_FAILS="1")
    assert out.returncode != 0 and "pip install failed (-r requirements-peers.txt" in out.stderr
    assert stamp.read_text() == before  # a failed install leaves the old stamp: the next run tries again
    assert installed("--bench-peers")[1] == ["requirements-peers.txt"]


def test_peer_lines_compare_answers_per_second_with_onnx_and_with_what_auto_ships():
    """The ratios count 200 answers only (wrk's req/s counts refusals), and put a peer beside our ONNX archive
    (same model.onnx) and beside the backend `auto` ships, not beside the best of our rows."""
    from bench.peer_rows import peer_lines

    def row(c, ok, bad=0):
        return {"concurrency": c, "seconds": 10.0, "statuses": {"200": ok * 10, "500": bad * 10},
                "throughput_rps": ok + bad, "p50_ms": 1.0, "p99_ms": 2.0, "errors": bad * 10}  # fmt: skip

    res = {
        "workers": 2, "batch_size": 4, "max_batch_delay_ms": 2, "levels": [16],
        "backend_choice": {"backend": "openvino"},
        "served": {"onnx": [row(16, 100)], "openvino": [row(16, 80)], "openvino-bf16": [row(16, 0, bad=500)]},
        "peers": {"litserve": {"served": [row(16, 50, bad=50)], "wrong": []}},
    }  # fmt: skip
    (line,) = [x for x in peer_lines(res) if "c= 16" in x]
    assert "50.0 answers/s" in line and "errors 500" in line
    assert "onnx/peer 2.00" in line and "openvino/peer 1.60" in line and "bf16" not in line
