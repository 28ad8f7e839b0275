"""Fuzzing the serving input path with Hypothesis: decode -> preprocess, and the handler's body parsing.

A crash is any exception other than InputError (which becomes a 4xx). Every input also has a memory
budget: its own peak RSS may not exceed the RSS before it by more than MEMORY_BUDGET_MB. The peak is reset
before each input (Linux's /proc/self/clear_refs), so an earlier test's peak cannot hide it; a positive
control checks that the judge catches an input over budget after such a peak. The decode target mutates
real seed images of the six accepted formats and the hostile bodies of issue 25 (byte flips, big numbers
written over size fields, inserted, deleted and repeated spans, truncation, splices between seeds); the
pre-scan target feeds the same inputs to the pre-scans alone (check_cheaply), which must return or refuse.
Each target prints what it tried: inputs, crashes, the slowest input and the peak memory.

CI runs a short, derandomised pass (FUZZ_EXAMPLES, default 300 inputs per target) and records times
without asserting on them (the project's rule: no timing asserts). The long run also holds each input
to a time budget and prints the figures:

    FUZZ_EXAMPLES=20000 FUZZ_SECONDS_PER_INPUT=2 .venv/bin/python -m pytest tests/test_fuzz.py -p
    no:cacheprovider -s
"""

import json
import os
import re
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from model_src.image_checks import InputError, check_cheaply, sniff_format
from model_src.preprocessing import DEFAULT_MAX_PIXELS, Preprocessing
from model_src.protocol import Limits, decode_items, read_request
from tests import images

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns at each corrupt tag it skips

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
SECONDS_PER_INPUT = float(os.environ.get("FUZZ_SECONDS_PER_INPUT", "0"))  # 0: record only (CI)
MEMORY_BUDGET_MB = 600  # a worker idles at ~550 MB: the acceptance bar is staying under twice that
PREP = Preprocessing(image_size=16, channels=3, mean=[0.5] * 3, std=[0.5] * 3)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="FUZZ_EXAMPLES" not in os.environ,  # CI: the same inputs every run
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def seeds() -> list[bytes]:
    """Small real images of every accepted format, in the variants whose decoders differ."""
    grey = images.digit_like(24)
    rgba = grey.convert("RGBA")
    exif = Image.Exif()
    exif[0x0112] = 6
    return [
        *images.accepted().values(),
        images.encode(grey.convert("RGB"), "JPEG", progressive=True),
        images.encode(grey.convert("RGB"), "JPEG", exif=exif, subsampling=2),
        images.encode(rgba, "WEBP", quality=50),
        images.encode(rgba, "GIF", transparency=0),
        images.encode(Image.new("F", (8, 8), 0.5), "TIFF"),
        images.encode(grey, "TIFF", compression="tiff_lzw"),
        images.encode(grey.convert("1"), "TIFF", compression="group4"),
        images.encode(rgba, "TIFF", compression="tiff_adobe_deflate"),
        images.encode(grey.convert("1"), "BMP"),
        images.scan_bomb_jpeg(64, 120),
        images.png_with_chunks(20),
        images.jpeg_with_comments(20),
        images.jpeg_with_ff_run(300),
        images.gif_with_comment_blocks(20),
        images.tiff_with_strips(20),
        images.thin_png(300),
    ]


SEEDS = seeds()
NUMBERS = [0, 1, 2, 8, 100, 255, 256, 6320, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF]


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "number", "insert", "delete", "repeat", "truncate", "splice"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip":
            data[at : at + 1] = bytes([draw(st.integers(0, 255))])
        elif kind == "number":  # size, length and offset fields are 2- or 4-byte integers
            fmt = draw(st.sampled_from([">H", "<H", ">I", "<I"]))
            value = draw(st.sampled_from(NUMBERS)) % (1 << (8 * struct.calcsize(fmt)))
            data[at : at + struct.calcsize(fmt)] = struct.pack(fmt, value)
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "repeat":  # duplicated chunks, scans, strips
            piece = bytes(data[at : at + draw(st.integers(1, 256))])
            data[at:at] = piece * draw(st.integers(1, 50))
        elif kind == "truncate":
            del data[at:]
        else:
            other = draw(st.sampled_from(SEEDS))
            data[at:] = other[draw(st.integers(0, len(other) - 1)) :]
    return bytes(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
b64_texts = st.one_of(st.text(max_size=80), mutated_images().map(images.b64))
bodies = st.one_of(
    st.binary(max_size=200),
    mutated_images(),
    json_values,
    b64_texts,
    st.fixed_dictionaries({"data": st.one_of(b64_texts, st.lists(b64_texts, max_size=4), json_values)}),
    st.fixed_dictionaries(
        {
            "id": json_values,
            "inputs": st.lists(st.fixed_dictionaries({"data": st.lists(b64_texts, max_size=3)})),
        }
    ),
    json_values.map(lambda v: bytearray(json.dumps(v).encode())),
)
rows = st.dictionaries(st.sampled_from(["body", "data", "file", "upload", "name"]), bodies, max_size=3)


def memory_mb(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak since the last reset_peak) of this process, in MB."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)[1]) >> 10


def reset_peak():
    """Set this process's peak RSS (VmHWM, ru_maxrss) to its RSS now: the peak of the next input is its own,
    not the whole session's (a run after the training tests started with a peak far above any input)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Budget:
    """Counts inputs and crashes, keeps the slowest, and holds each input to the memory (and, long runs, time)
    budget: the input's own peak RSS over the RSS before it."""

    def __init__(self, memory_mb: int = MEMORY_BUDGET_MB):
        self.tried, self.crashes, self.slowest, self.peak_mb, self.memory_mb = 0, 0, (0.0, b""), 0, memory_mb

    def run(self, fn, value):
        reset_peak()
        before = memory_mb("VmRSS")
        start = time.perf_counter()
        try:
            fn(value)
        except InputError:
            pass
        except Exception:
            self.crashes += 1
            raise
        finally:
            self.tried += 1
        seconds = time.perf_counter() - start
        self.slowest = max(self.slowest, (seconds, value), key=lambda s: s[0])
        grown = memory_mb("VmHWM") - before
        self.peak_mb = max(self.peak_mb, grown)
        assert grown <= self.memory_mb, f"peak RSS grew by {grown} MB on {repr(value)[:80]}"
        if SECONDS_PER_INPUT:
            assert seconds <= SECONDS_PER_INPUT, f"{seconds:.2f} s on {repr(value)[:80]}"

    def report(self, name):
        seconds, value = self.slowest
        print(
            f"\nfuzz {name}: {self.tried} inputs, {self.crashes} crashes, slowest {seconds * 1000:.0f} ms "
            f"({len(repr(value))} chars: {repr(value)[:80]}), peak RSS +{self.peak_mb} MB per input"
        )


@pytest.fixture(scope="module")
def budgets():
    made = {}
    yield lambda name: made.setdefault(name, Budget())
    for name, budget in made.items():
        budget.report(name)


def decode_and_prepare(data: bytes):
    PREP(PREP.decode(data, DEFAULT_MAX_PIXELS))


def pre_scan(data: bytes):
    check_cheaply(data, sniff_format(data))


def parse_row(row: dict):
    decode_items(read_request(row, {}, Limits(32, 32, 16 * 2**20)).items)


def test_fuzz_decode_and_preprocess(budgets):
    budget = budgets("decode")

    @FUZZ
    @given(mutated_images())
    def run(data):
        budget.run(decode_and_prepare, data)

    run()
    assert budget.tried >= min(EXAMPLES, 100)


def test_fuzz_body_parsing(budgets):
    budget = budgets("body parsing")

    @FUZZ
    @given(rows)
    def run(row):
        budget.run(parse_row, row)

    run()
    assert budget.tried >= min(EXAMPLES, 100)


def test_fuzz_pre_scans(budgets):
    budget = budgets("pre-scans")

    @FUZZ
    @given(mutated_images())
    def run(data):
        budget.run(pre_scan, data)

    run()
    assert budget.tried >= min(EXAMPLES, 100)


def test_the_memory_judge_catches_an_input_over_budget_after_a_higher_peak():
    # Issue 30: the judge read ru_maxrss, the process's all-time peak; once an earlier test had peaked higher,
    # no input could fail it. A positive control: the same judge, after a 300 MB peak, catches a 150 MB input.
    peak = bytearray(300 * 2**20)  # touched (zeroed), so it is resident
    del peak
    budget = Budget(memory_mb=100)
    budget.run(lambda n: bytearray(n), 10 * 2**20)
    with pytest.raises(AssertionError, match="peak RSS grew by 1[45][0-9] MB"):
        budget.run(lambda n: bytearray(n), 150 * 2**20)
    assert budget.tried == 2 and budget.crashes == 0
