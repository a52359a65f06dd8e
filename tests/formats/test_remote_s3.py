"""Remote checkpoints on S3: s3fs against a moto S3 server on 127.0.0.1 (one per module),
which counts the requests it answers. Nothing reaches the internet."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import FIXTURES, run_json, runner, same_but_location

from tiecli.cli import app

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

BUCKET = "tiecli-test"
UPLOADED = (
    "gpt2/full/model.safetensors",
    "gpt2/full/config.json",
    "gpt2/full-sharded",
    "drift",
    "custom/transposed.safetensors",
)


class Counter:
    """A WSGI wrapper around moto's app counting the requests it answers."""

    def __init__(self, wrapped: Any):
        self.wrapped = wrapped
        self.lock = threading.Lock()
        self.requests: list[str] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        with self.lock:
            self.requests.append(f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO')}")
        return self.wrapped(environ, start_response)


@pytest.fixture(scope="module")
def s3() -> Iterator[Counter]:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    counter = Counter(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, counter, True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
            mp.delenv(k, raising=False)
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        for rel in UPLOADED:
            src = FIXTURES / rel
            for f in [src] if src.is_file() else sorted(src.iterdir()):
                client.put_object(
                    Bucket=BUCKET, Key=f.relative_to(FIXTURES).as_posix(), Body=f.read_bytes()
                )
        try:
            yield counter
        finally:
            server.shutdown()
            server.server_close()


@pytest.mark.parametrize(
    "rel",
    ["gpt2/full/model.safetensors", "gpt2/full-sharded", "custom/transposed.safetensors"],
)
def test_inspect_of_s3_reports_what_a_local_run_does(rel: str, s3: Counter) -> None:
    before = len(s3.requests)
    _code, remote = run_json(["inspect", "--json", f"s3://{BUCKET}/{rel}"], (0, 1))
    served = len(s3.requests) - before
    _code, local = run_json(["inspect", "--json", str(FIXTURES / rel)], (0, 1))
    same_but_location(remote, local)
    assert remote["path"] == f"s3://{BUCKET}/{rel}"
    # tiecli counts each of its calls (a listing, a size, a range) as the server does
    assert remote["remote"]["requests"] == served > 0
    assert all(r.startswith(("GET", "HEAD")) for r in s3.requests[before:])  # reads only


@pytest.mark.parametrize(
    ("rel", "flags"),
    [("drift", []), ("gpt2/full-sharded", ["--require-deduped"]), ("gpt2/full", ["--strict"])],
)
def test_verify_of_s3_judges_as_a_local_run_does(rel: str, flags: list[str], s3: Counter) -> None:
    before = len(s3.requests)
    code, remote = run_json(["verify", "--json", *flags, f"s3://{BUCKET}/{rel}"], (0, 1))
    served = len(s3.requests) - before
    local_code, local = run_json(["verify", "--json", *flags, str(FIXTURES / rel)], (0, 1))
    assert code == local_code
    same_but_location(remote, local)
    assert remote["remote"]["requests"] == served


@pytest.mark.parametrize(
    "url",
    [
        "s3://tiecli-no-such-bucket/model.safetensors",
        f"s3://{BUCKET}/gpt2/full/none.safetensors",
        f"s3://{BUCKET}/no-such-folder",
    ],
)
def test_a_missing_bucket_or_key_is_one_line_with_the_url(url: str, s3: Counter) -> None:
    for cmd in ("inspect", "verify"):
        res = runner.invoke(app, [cmd, url])
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in res.output, res.output
        assert lines[0].startswith(f"Error: {url}: ")
        assert res.stdout == ""


def test_dedupe_of_s3_writes_the_local_result(s3: Counter, tmp_path: Path) -> None:
    before = len(s3.requests)
    _c, doc = run_json(
        ["dedupe", "--json", f"s3://{BUCKET}/gpt2/full", "-o", str(tmp_path / "remote")], (0, 1)
    )
    served = len(s3.requests) - before
    _c, local = run_json(
        ["dedupe", "--json", str(FIXTURES / "gpt2/full"), "-o", str(tmp_path / "l")], (0, 1)
    )
    assert doc["removed"] == local["removed"] and doc["removed"]
    assert doc["remote"]["requests"] == served
    assert (tmp_path / "remote/model.safetensors").read_bytes() == (
        tmp_path / "l/model.safetensors"
    ).read_bytes()
