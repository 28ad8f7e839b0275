"""The benchmark and soak tools run end to end and write well-formed output (no timing asserts)."""

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.torchserve]


def test_bench_runs_and_writes_json_and_png(checkpoint, digits, tmp_path):
    from scripts.bench import get_args_parser, main

    out = tmp_path / "bench"
    main(
        get_args_parser().parse_args(
            [
                "--targets",
                "digits",
                "--backends",
                "eager,onnx",
                "--concurrency",
                "1,4",
                "--requests",
                "40",
                "--no-peer",
                "--digits-checkpoint",
                checkpoint,
                "--out",
                str(out),
            ]
        )
    )
    report = json.load(open(out / "bench.json"))
    (res,) = report["results"]
    assert report["cores"] >= 1 and res["model"] == "digits"
    assert set(res["limit"]) == {"eager", "onnx"} and all(v["batch_1"] > 0 for v in res["limit"].values())
    for rows in res["served"].values():
        assert [r["concurrency"] for r in rows] == [1, 4]
        assert all(r["requests"] == 40 and r["errors"] == 0 and r["wrong_labels"] == 0 for r in rows)
    assert res["cold_start_s"] > 0 and res["registration_s"]["onnx"] > 0
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_soak_runs_and_writes_a_summary(checkpoint, digits, tmp_path):
    from scripts.soak import main

    rc = main(
        [
            "--checkpoint",
            checkpoint,
            "--scenarios",
            "load,restart",
            "--requests",
            "300",
            "--concurrency",
            "8",
            "--out",
            str(tmp_path),
        ]
    )
    summary = json.load(open(tmp_path / "soak.json"))
    assert rc == 0
    assert summary["results"]["load"]["requests"] == 300 and summary["results"]["load"]["passed"]
    assert summary["results"]["restart"]["after"]["default"] == "2.0"
