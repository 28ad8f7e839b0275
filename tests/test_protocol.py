"""The serving protocol (model_src/protocol.py) without TorchServe: every accepted body form to a typed
Request, the kinds, the explanation options, the checks before decoding, and the answer and error shapes. The
same requests through the handler in a real TorchServe Context are in test_handler.py."""

import base64
import json

import pytest
import torch

from model_src import protocol
from model_src.image_checks import InputError
from model_src.protocol import Limits, Request, read_request
from tests import images

LIMITS = Limits(images=32, explain_images=2, image_bytes=2**20)


@pytest.fixture(scope="module")
def png():
    return images.accepted()["png-L"]


def test_every_body_form_reads_to_its_items_and_answer_shape(png):
    b64 = images.b64(png)
    v2 = {"id": "r1", "inputs": [{"name": "x", "datatype": "BYTES", "shape": [2], "data": [b64, b64]}]}
    cases = {
        "raw bytes": ({"body": bytearray(png)}, [png], "one"),
        "multipart, one file": ({"data": png, "name": b"a note"}, [png], "one"),
        "multipart, two files": ({"a": png, "b": bytearray(png)}, [png, png], "list"),
        "JSON one": ({"body": {"data": b64}}, [b64], "one"),
        "JSON list": ({"body": {"data": [b64, b64]}}, [b64, b64], "list"),
        "KServe v1, JSON objects": (
            {"body": {"instances": [{"data": b64}]}},
            [b64],
            "v1",
        ),  # {"predictions": [...]}
        "bare list": ({"body": [b64]}, [b64], "list"),
        "JSON as bytes": ({"body": json.dumps({"image": b64}).encode()}, [b64], "one"),
        "base64 text": ({"body": b64}, [b64], "one"),
        "KServe v2": ({"body": v2}, [b64, b64], ("v2", "r1")),
    }
    for name, (row, items, shape) in cases.items():
        request = read_request(row, {}, LIMITS)
        assert (request.kind, request.shape) == ("predict", shape), name
        assert [bytes(i) if isinstance(i, bytearray) else i for i in request.items] == items, name
        assert protocol.decode_items(request.items) == [png] * len(items), name


def test_the_kind_comes_from_the_headers_torchserve_sets():
    assert Request.of(None).kind == Request.of({}).kind == "predict"
    assert Request.of({"explain": "True"}).kind == "explain"
    assert Request.of({"describe": "True"}).kind == "describe"
    assert Request.of({"explain": "False", "describe": "False"}).kind == "predict"


def test_explanations_have_their_own_image_limit(png):
    row = {"body": [images.b64(png)] * 3}
    assert len(read_request(row, {}, LIMITS).items) == 3
    with pytest.raises(InputError, match="3 images in one request; the limit is 2") as e:
        read_request(row, {"explain": "True"}, LIMITS)
    assert e.value.status == 413


def test_explanation_options_from_the_body_or_the_headers(png):
    b64 = images.b64(png)
    on_body = read_request({"body": {"data": b64, "target": 3, "overlay": True}}, {"explain": "True"}, LIMITS)
    assert (on_body.target, on_body.overlay) == ("3", True)
    headers = {"explain": "True", "X-Explain-Target": "7", "x-explain-overlay": "1"}
    on_headers = read_request({"body": bytearray(png)}, headers, LIMITS)
    assert (on_headers.target, on_headers.overlay) == ("7", True)
    plain = read_request({"body": bytearray(png)}, {"explain": "True"}, LIMITS)
    assert (plain.target, plain.overlay) == (None, False)
    labels = [str(i) for i in range(10)]
    assert protocol.target_index("7", labels) == 7 and protocol.target_index(None, labels) is None
    with pytest.raises(InputError, match=r"unknown target class 'cat'; the classes are 0, 1, .*, 9$"):
        protocol.target_index("cat", labels)


def test_a_failed_v2_request_keeps_its_id_and_the_v2_form(png):
    body = {"id": "r9", "inputs": [{"data": [images.b64(png)] * 40}]}
    request = Request.of({})
    with pytest.raises(InputError) as e:
        request.read({"body": body}, LIMITS)
    answer = protocol.error_answer(e.value.status, str(e.value), request, "my_model", "1.0")
    assert answer["code"] == 413 and answer["id"] == "r9" and answer["outputs"][0]["name"] == "error"
    assert json.loads(answer["outputs"][0]["data"][0]) == protocol.error_body(413, str(e.value))
    assert protocol.error_answer(400, "no", Request.of({}), "m", "1") == {
        "code": 400,
        "type": "BadInput",
        "message": "no",
    }
    assert protocol.error_answer(500, "bug", None, "m", "1")["type"] == "InternalServerError"


def test_answer_shapes():
    results = [{"3": 0.9}, {"5": 0.8}]
    assert protocol.answer_body(results[:1], "one", "m", "1") == {"3": 0.9}
    assert protocol.answer_body(results, "list", "m", "1") == results
    v2 = protocol.answer_body(results, ("v2", "r1"), "m", "1")
    assert {k: v2[k] for k in ("id", "model_name", "model_version")} == {
        "id": "r1",
        "model_name": "m",
        "model_version": "1",
    }
    (output,) = v2["outputs"]
    assert (
        output["name"] == "predictions"
        and output["shape"] == [2]
        and list(map(json.loads, output["data"])) == results
    )


def test_bad_bodies_are_refused_with_their_status(png):
    b64 = images.b64(png)
    cases = [
        ({}, 400, "no image in the request"),
        ({"body": b"{nope"}, 400, "body looks like JSON but does not parse"),
        ({"body": {"nope": b64}}, 400, 'JSON body needs a "data" field'),
        ({"body": {"inputs": []}}, 400, '"inputs" must be a non-empty list'),
        ({"body": {"data": []}}, 400, "empty list of images"),
        ({"body": [b64] * 33}, 413, "33 images in one request; the limit is 32"),
        ({"a": png, "b": b"\xff" * 2000}, 415, "multipart field 'b' is not an image"),
        ({"body": [b64, 7]}, 400, "expected a base64 string, got int"),
    ]
    for row, status, message in cases:
        with pytest.raises(InputError, match=message) as e:
            read_request(row, {}, LIMITS)
        assert e.value.status == status, message
    big = base64.b64encode(b"x" * (2**20 + 3)).decode()
    with pytest.raises(InputError, match="over the limit of 1,048,576") as e:
        read_request({"body": [big]}, {}, LIMITS)
    assert e.value.status == 413
    with pytest.raises(InputError, match="invalid base64 image data"):
        protocol.decode_items(["not base64!"])


def test_a_multipart_field_holding_a_json_list_is_refused_not_a_crash():
    # Found by the fuzz target (issue 25): bytes([-1]) raised ValueError out of is_text, a 500 for the
    # request.
    items, _ = protocol.items_from_body(protocol.body_of({"body": b"\x00", "data": [-1]}))
    with pytest.raises(InputError, match="expected a base64 string, got int"):
        protocol.check_items(items, 32, 2**20)


def test_top_k_with_fewer_classes_than_k():
    probs = torch.tensor([0.2, 0.5, 0.3])
    assert list(protocol.top_k(probs, ["a", "b", "c"], 5).items()) == [("b", 0.5), ("c", 0.3), ("a", 0.2)]
    assert protocol.top_k(probs, ["a", "b", "c"], 1) == {"b": 0.5}


def test_reading_a_multipart_request_costs_one_look_per_field(png, monkeypatch):
    # A cost bound for the parser of attacker bytes: 10x the fields is 10x the work, counted, not timed.
    looks = []
    real = protocol.is_image
    monkeypatch.setattr(protocol, "is_image", lambda value: looks.append(1) or real(value))

    def cost(n: int) -> int:
        looks.clear()
        row = {f"f{i}": png for i in range(n)}
        assert len(read_request(row, {}, Limits(10 * n, 1, 2**30)).items) == n
        return len(looks)

    assert cost(1000) == 10 * cost(100)
