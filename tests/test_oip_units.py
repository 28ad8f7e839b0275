"""model_src/oip.py without a server: the binary tensor extension as tritonclient writes and reads it."""

import base64
import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from hypothesis import given, settings
from hypothesis import strategies as st

from model_src import oip, protocol
from model_src.image_checks import InputError


def client_body(*payloads: bytes, binary=True, **kw) -> tuple[bytes, int | None]:
    """The exact body tritonclient.http sends for one BYTES input (its own serialiser, not ours)."""
    tensor = httpclient.InferInput("data", [len(payloads)], "BYTES")
    tensor.set_data_from_numpy(np.array(payloads, dtype=np.object_), binary_data=binary)
    body, length = httpclient.InferenceServerClient.generate_request_body([tensor], request_id="r1", **kw)
    return body, length


def test_parse_gives_back_the_raw_bytes_tritonclient_sent():
    images = [b"\x89PNG\r\n\x1a\n" + bytes(range(256)), b"", b"\xff\xd8\xff" * 100]
    body, length = client_body(*images)
    request = oip.parse(body, str(length), 10)
    assert request["id"] == "r1" and request["inputs"][0]["data"] == images
    assert "binary_data_size" not in request["inputs"][0]["parameters"]


def test_header_length_is_found_in_any_case():
    assert oip.header_length({"Inference-Header-Content-Length": "12"}) == "12"
    assert oip.header_length({"inference-header-content-length": "7"}) == "7"
    assert oip.header_length({"content-type": "x"}) is None and oip.header_length(None) is None


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda body, n: (body, str(len(body) + 1)), "within the body"),
        (lambda body, n: (body, "-3"), "within the body"),
        (lambda body, n: (body, str(n - 1)), "does not parse"),
        (lambda body, n: (body + b"x", str(n)), "bytes after the binary tensors"),
        (lambda body, n: (body[:-1], str(n)), "runs past"),
        (lambda body, n: (json.loads(body[:n]), str(n)), "raw body"),
    ],
)
def test_malformed_binary_bodies_are_400_with_a_reason(mangle, message):
    body, n = client_body(b"\xff\xd8\xffimage")
    with pytest.raises(InputError, match=message) as e:
        oip.parse(*mangle(body, n), 10)
    assert e.value.status == 400


def test_non_bytes_binary_tensor_is_refused():
    tensor = httpclient.InferInput("x", [2], "FP32")
    tensor.set_data_from_numpy(np.zeros(2, dtype=np.float32), binary_data=True)
    body, n = httpclient.InferenceServerClient.generate_request_body([tensor])
    with pytest.raises(InputError, match="only BYTES"):
        oip.parse(body, str(n), 10)


def count_steps(monkeypatch) -> list[int]:
    """Counts the element reads parse() makes (its only loop over attacker bytes)."""
    calls = [0]
    real = oip._LENGTH

    class Counting:
        def unpack_from(self, buf, at):
            calls[0] += 1
            return real.unpack_from(buf, at)

    monkeypatch.setattr(oip, "_LENGTH", Counting())
    return calls


def test_cost_grows_linearly_and_stops_at_the_element_cap(monkeypatch):
    """Hostile input: empty elements, 4 bytes each. 10x the elements costs 10x the steps, and a cap stops
    it."""
    calls = count_steps(monkeypatch)
    work = []
    for n in (1_000, 10_000):
        body, length = client_body(*([b""] * n))
        calls[0] = 0
        assert len(oip.parse(body, str(length), 10**6)["inputs"][0]["data"]) == n
        work.append(calls[0])
    assert work == [1_000, 10_000]
    body, length = client_body(*([b""] * 10_000))
    calls[0] = 0
    with pytest.raises(InputError, match="over 32 elements") as e:
        oip.parse(body, str(length), 32)
    assert e.value.status == 413 and calls[0] == 32


def test_binary_reply_reads_back_with_tritonclient():
    reply = {"id": "r", "model_name": "m", "model_version": "1", "outputs": []}
    reply["outputs"].append(
        {"name": "predictions", "datatype": "BYTES", "shape": [2], "data": ['{"3": 0.9}', "é"]}
    )
    body, length = oip.binary_reply(reply)
    result = httpclient.InferResult.from_response_body(body, header_length=length)
    assert [x.decode() for x in result.as_numpy("predictions")] == ['{"3": 0.9}', "é"]
    assert result.get_response()["model_version"] == "1"


def test_answer_forms_for_kserve():
    assert oip.form(("v2", "r"), {"parameters": {"binary_data_output": True}}) == ("v2", "r", "binary")
    asked = {"outputs": [{"name": "predictions", "parameters": {"binary_data": True}}]}
    assert oip.form(("v2", "r"), asked) == ("v2", "r", "binary")
    assert oip.form(("v2", "r"), {"outputs": [{"name": "other", "parameters": {"binary_data": True}}]}) == (
        "v2",
        "r",
    )
    assert oip.form("list", {"instances": ["x"]}) == "v1" and oip.form("list", ["x"]) == "list"
    assert oip.form("one", b"raw") == "one"


def test_model_metadata_names_the_tensors_and_classes():
    meta = oip.model_metadata(
        "m", ["1.0", "2.0"], ["cat", "dog"], {"image_size": 28, "channels": 1, "mean": [0.5]}
    )
    assert meta["versions"] == ["1.0", "2.0"] and meta["platform"] == "pytorch_torchserve"
    assert meta["inputs"][0]["datatype"] == "BYTES" and meta["inputs"][0]["parameters"]["image_size"] == 28
    assert meta["outputs"][0]["parameters"]["classes"] == ["cat", "dog"]


# --- the handler's hook, without a server (tests/test_handler.py's real Context) ---------------------------


@pytest.fixture(scope="module")
def handler(archive_factory, tmp_path_factory):
    from tests.test_handler import make_handler

    return make_handler(archive_factory("1.0"), tmp_path_factory.mktemp("oip-handler"))


JSON_OUT = [httpclient.InferRequestedOutput("predictions", binary_data=False)]


def run(handler, rows, headers):
    from ts.context import RequestProcessor
    from ts.protocol.otf_message_handler import create_predict_response

    model, ctx = handler
    ctx.request_ids = ctx.metrics.request_ids = {i: f"req-{i}" for i in range(len(rows))}
    ctx.request_processor = [RequestProcessor(h) for h in headers]
    out = model.handle(rows, ctx)
    # the worker's framing
    create_predict_response(out, ctx.request_ids, "Prediction success", 200, context=ctx)
    return out, ctx


def test_handler_reads_binary_images_and_answers_binary_and_v1(handler, png):
    body, length = client_body(png)
    b64 = base64.b64encode(png).decode()
    plain = client_body(b64, binary=False, outputs=JSON_OUT)[0]
    rows = [{"body": bytearray(body)}, {"body": {"instances": [b64]}}, {"body": plain}]
    headers = [{"Inference-Header-Content-Length": str(length)}, {}, {}]
    out, ctx = run(handler, rows, headers)
    assert ctx.get_response_status(0)[0] == 200, out[0]
    assert ctx.get_response_content_type(0) == "application/octet-stream"
    head = int(ctx.get_response_headers(0)["Inference-Header-Content-Length"])
    result = httpclient.InferResult.from_response_body(out[0], header_length=head)
    as_binary = json.loads(result.as_numpy("predictions")[0])
    assert out[1] == {"predictions": [as_binary]}  # KServe v1
    assert json.loads(out[2]["outputs"][0]["data"][0]) == as_binary  # JSON asked, JSON answered


# --- type confusion in client JSON: always a 400 InputError, never a 500 (review M3) -----------------------
LIMITS = protocol.Limits(images=32, explain_images=4, image_bytes=16 << 20)
IMAGE = base64.b64encode(b"\xff\xd8\xffimage").decode()
HEAD = "Inference-Header-Content-Length"


def v2(**fields) -> bytes:
    return json.dumps({"inputs": [{"data": [IMAGE]}], **fields}).encode()


@pytest.mark.parametrize(
    "body, headers",
    [
        (v2(parameters=[1]), {}),
        (v2(outputs=5), {}),
        (v2(outputs=[{"name": "predictions", "parameters": 3}]), {}),
        (v2(outputs=["predictions"]), {}),
        (b'{"inputs":[{"parameters":[1]}]}', {HEAD: "31"}),
        (b"{}", {HEAD: "\u00b2"}),  # byte 0xB2 as Netty reads it (Latin-1): isdigit() True, int() refuses
    ],
)
def test_malformed_v2_json_is_a_400(body, headers):
    with pytest.raises(InputError) as e:
        protocol.read_request({"body": body}, headers, LIMITS)  # was: AttributeError, TypeError, ValueError
    assert e.value.status == 400


KEYS = "inputs outputs parameters data name datatype binary_data_size binary_data_output binary_data".split()
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 40) | st.sampled_from(["", "BYTES", "predictions", IMAGE]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    max_leaves=12,
)
TENSOR = st.fixed_dictionaries(
    {"data": st.just([IMAGE]) | JSON}, optional={k: JSON for k in ("parameters", "datatype", "name")}
)
# mostly well-formed inputs, so that the later fields (outputs, parameters) are reached too
V2 = st.fixed_dictionaries(
    {"inputs": st.lists(TENSOR, min_size=1, max_size=2) | JSON},
    optional={k: JSON for k in ("outputs", "parameters", "id")},
)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(V2, st.binary(max_size=24), st.sampled_from(["", "binary", "explain"]), st.text(max_size=3))
def test_the_v2_parser_raises_only_input_error(body, tail, how, length):
    header = json.dumps(body).encode()
    headers = {"explain": "True"} if how == "explain" else {}
    if how == "binary":
        headers[HEAD] = length or str(len(header))
    try:
        protocol.read_request({"body": header + tail if how == "binary" else header}, headers, LIMITS)
    except InputError:
        pass
