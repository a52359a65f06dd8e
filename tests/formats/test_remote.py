"""Remote checkpoints: inspect and verify by range reads, over HTTP and the Hub API.

Every server here runs on 127.0.0.1 in the test (tests/remote_server.py) and
counts what it answered; nothing reaches the internet.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import FIXTURES
from remote_server import serve
from typer.testing import CliRunner

from tiecli.cli import app
from tiecli.formats.remote import shown_url
from tiecli.formats.remote.sampling import coalesce

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")

runner = CliRunner()
WHERE = ("path", "config", "remote", "checked", "checkpoints")  # what names the location


def _json(args: list[str]) -> tuple[int, dict[str, Any]]:
    res = runner.invoke(app, args)
    assert res.exit_code in (0, 1), res.output
    return res.exit_code, json.loads(res.stdout)


def _same(remote: dict[str, Any], local: dict[str, Any]) -> None:
    """Equal but for the fields that name where the checkpoint lives."""
    r = {k: v for k, v in remote.items() if k not in WHERE}
    loc = {k: v for k, v in local.items() if k not in WHERE}
    for p in r.get("problems", []) + loc.get("problems", []):
        p.pop("path", None)
        p["message"] = p["message"].replace(str(FIXTURES), "").split("fix:")[0]
    assert r == loc


def _safetensors(
    path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset, blobs = 0, []
    for name, a in tensors.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


@pytest.mark.parametrize(
    "rel",
    [
        "gpt2/full/model.safetensors",
        "gpt2/full-sharded/model.safetensors.index.json",
        "t5/hf-sharded/model.safetensors.index.json",
        "llama-untied/full/model.safetensors",
        "custom/transposed.safetensors",
        "custom/value-duplicate.safetensors",
    ],
)
def test_inspect_over_http_reports_what_a_local_run_does(rel: str) -> None:
    with serve(FIXTURES) as (base, counts):
        _code, remote = _json(["inspect", "--json", f"{base}/{rel}"])
        served = (counts.requests, counts.bytes)
    _code, local = _json(["inspect", "--json", str(FIXTURES / rel)])
    _same(remote, local)
    assert remote["path"] == f"{base}/{rel}"
    assert "remote" not in local
    # what tiecli says it cost is what the server counted
    assert (remote["remote"]["requests"], remote["remote"]["bytes_read"]) == served
    if (FIXTURES / rel).with_name("config.json").is_file():
        assert remote["config"] == f"{base}/{rel.rsplit('/', 1)[0]}/config.json"


@pytest.mark.parametrize(
    ("rel", "flags"),
    [
        ("drift/model.safetensors", []),
        ("gpt2/full-sharded/model.safetensors.index.json", ["--require-deduped"]),
        ("gpt2/hf/model.safetensors", ["--strict"]),
    ],
)
def test_verify_over_http_judges_as_a_local_run_does(rel: str, flags: list[str]) -> None:
    with serve(FIXTURES) as (base, counts):
        code, remote = _json(["verify", "--json", *flags, f"{base}/{rel}"])
        served = (counts.requests, counts.bytes)
    local_code, local = _json(["verify", "--json", *flags, str(FIXTURES / rel)])
    assert code == local_code
    if "--require-deduped" in flags:  # the fix offered is one that works on a URL
        [problem] = remote["problems"]
        assert "download it, run tiecli dedupe on the local copy" in problem["message"]
    _same(remote, local)
    assert remote["checked"] == [f"{base}/{rel}"]
    assert (remote["remote"]["requests"], remote["remote"]["bytes_read"]) == served


def test_human_output_says_what_reading_cost() -> None:
    with serve(FIXTURES) as (base, counts):
        url = f"{base}/gpt2/full/model.safetensors"
        inspected = runner.invoke(app, ["inspect", url], terminal_width=200)
        verified = runner.invoke(app, ["verify", url], terminal_width=200)
        served = counts.requests
    assert inspected.exit_code == verified.exit_code == 0
    assert url in inspected.stdout and "remote: " in inspected.stdout
    assert "request(s)" in verified.stdout and "OK" in verified.stdout
    lines = [
        ln for ln in inspected.stdout.splitlines() + verified.stdout.splitlines() if "remote:" in ln
    ]
    assert sum(int(ln.split("remote: ")[1].split()[0]) for ln in lines) == served


def test_verify_checks_local_and_remote_checkpoints_in_one_call() -> None:
    with serve(FIXTURES) as (base, _counts):
        code, doc = _json(
            ["verify", "--json", str(FIXTURES / "gpt2/full"), f"{base}/drift/model.safetensors"]
        )
    assert code == 1
    assert doc["checked"] == [str(FIXTURES / "gpt2/full"), f"{base}/drift/model.safetensors"]
    assert [p["code"] for p in doc["problems"]] == ["drift"]
    assert doc["problems"][0]["path"] == f"{base}/drift/model.safetensors"


def _large_pair(folder: Path) -> Path:
    """Two equal 4 MiB tensors nobody declared, plus small others: a value duplicate."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    big = rng.standard_normal((1024, 1024)).astype(np.float32)
    _safetensors(
        folder / "model.safetensors",
        {
            "a.weight": big,
            "norm.weight": np.ones(1024, np.float32),
            "b.weight": big.copy(),
            "c.weight": rng.standard_normal((1024, 1024)).astype(np.float32),
        },
    )
    return folder / "model.safetensors"


def test_a_tie_past_max_download_is_unconfirmed_and_not_downloaded(tmp_path: Path) -> None:
    path = _large_pair(tmp_path / "m")
    size = path.stat().st_size
    with serve(tmp_path) as (base, counts):
        url = f"{base}/m/model.safetensors"
        _code, capped = _json(["inspect", "--json", "--max-download", "1000000", url])
        capped_bytes = counts.bytes
        _code, full = _json(["inspect", "--json", url])
    [tie] = capped["ties"]
    assert (tie["alias"], tie["source"]) == ("b.weight", "a.weight")
    assert tie["evidence"] == ["sampled"] and tie["unconfirmed"] is True
    assert [p["code"] for p in capped["problems"]] == ["unconfirmed"]
    # headers and samples only: far less than one of the two tensors
    assert capped_bytes == capped["remote"]["bytes_read"] < (1 << 20) // 4
    [confirmed] = full["ties"]
    assert confirmed["evidence"] == ["value"] and "unconfirmed" not in confirmed
    assert full["problems"] == []
    assert full["remote"]["bytes_read"] >= 2 * (4 << 20)  # the pair, read whole
    assert full["remote"]["bytes_read"] < size  # c.weight never was

    # verify: an unconfirmed tie is a warning (fails --strict only)
    with serve(tmp_path) as (base, _counts):
        url = f"{base}/m/model.safetensors"
        code, _doc = _json(["verify", "--json", "--max-download", "0", url])
        strict, _doc = _json(["verify", "--json", "--strict", "--max-download", "0", url])
    assert (code, strict) == (0, 1)


def test_a_drift_past_max_download_is_measured_on_the_samples(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((512, 1024)).astype(np.float32)
    head = emb + 1.0
    _safetensors(
        folder / "model.safetensors",
        {"model.embed_tokens.weight": emb, "lm_head.weight": head},
        {"lm_head.weight": "model.embed_tokens.weight"},
    )
    with serve(tmp_path) as (base, counts):
        code, doc = _json(
            ["verify", "--json", "--max-download", "0", f"{base}/m/model.safetensors"]
        )
        served = counts.bytes
    assert code == 1
    [tie] = doc["checkpoints"][0]["ties"]
    assert tie["drift"]["sampled"] is True and tie["drift"]["elements"] == 8
    assert tie["drift"]["differing_elements"] == 8
    assert tie["drift"]["max_abs_diff"] == pytest.approx(1.0, abs=1e-5)
    assert "among sampled elements" in doc["problems"][0]["message"]
    assert served < 128 << 10  # the first 64 KiB (header) and the samples


def test_sampled_elements_are_fetched_in_few_coalesced_requests(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    rng = np.random.default_rng(2)
    # many small same-shaped tensors: their samples lie close and merge into one request
    small = {f"norms.{i}.w": rng.standard_normal((32, 32)).astype(np.float32) for i in range(200)}
    # a few large ones: a request each for the first element, and a few bytes
    large = {f"layers.{i}.w": rng.standard_normal((512, 512)).astype(np.float32) for i in range(10)}
    _safetensors(folder / "small.safetensors", small)
    _safetensors(folder / "large.safetensors", large)
    with serve(tmp_path) as (base, counts):
        _code, doc = _json(["inspect", "--json", f"{base}/m/small.safetensors"])
        assert doc["ties"] == [] and doc["tensors"] == 200
        # the first 64 KiB (with the size), the 200 first elements in one range (none
        # shared: no sampled element is read), and the look for config.json beside the file
        assert doc["remote"]["requests"] == counts.requests == 3
        _code, doc = _json(["inspect", "--json", f"{base}/m/large.safetensors"])
        assert counts.multi == 1
    assert doc["ties"] == []
    assert doc["remote"]["requests"] == 1 + 1 + 1  # the ten first elements in one request
    size = (folder / "large.safetensors").stat().st_size
    assert doc["remote"]["bytes_read"] < 0.01 * size


def test_any_fsspec_file_system_reads_through_cat_file(tmp_path: Path) -> None:
    """The path s3:// and gs:// take (their backends read ranges with cat_file), on
    fsspec's in-memory file system: a folder listed, its index and shards read."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/tiecli-test-{tmp_path.name}"
    try:
        for f in (FIXTURES / "gpt2/full-sharded").iterdir():
            fs.pipe(f"{root}/ckpt/{f.name}", f.read_bytes())
        _code, remote = _json(["inspect", "--json", f"memory://{root}/ckpt"])
        _code, local = _json(["inspect", "--json", str(FIXTURES / "gpt2/full-sharded")])
        missing = runner.invoke(app, ["inspect", f"memory://{root}/ckpt/none.safetensors"])
    finally:
        fs.rm(root, recursive=True)
    _same(remote, local)
    assert remote["config"] == f"memory://{root}/ckpt/config.json"
    # a listing of the folder, then per file a size and a read (index, config, 3 shards),
    # then the first elements and samples: each call one request
    assert 1 + 2 * 5 <= remote["remote"]["requests"] <= 1 + 2 * 5 + 3 * 4
    assert missing.exit_code == 2
    assert _one_error_line(missing) == f"Error: memory://{root}/ckpt/none.safetensors: not found"


def test_coalesce_merges_overlapping_and_nearby_ranges() -> None:
    ranges = [(100, 104), (0, 4), (2, 8), (20, 30)]
    assert coalesce(ranges, gap=12) == [(0, 30), (100, 104)]
    assert coalesce(ranges, gap=11) == [(0, 8), (20, 30), (100, 104)]
    assert coalesce([(0, 4), (100, 104)], gap=10) == [(0, 4), (100, 104)]
    assert coalesce([]) == []
    # a file of small tensors is not one request: merged ranges stop at the span
    heads = [(i * 4096, i * 4096 + 4) for i in range(1000)]
    merged = coalesce(heads, gap=4096, span=1 << 16)
    assert len(merged) == 63 and all(e - s <= 1 << 16 for s, e in merged)
    assert coalesce([(0, 1 << 20)], span=10) == [(0, 1 << 20)]  # one range stays whole


def _one_error_line(res: Any) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("Error: ") and "Traceback" not in res.output
    return lines[0]


def test_a_refusing_server_is_one_line_with_the_url() -> None:
    with serve(FIXTURES, refuse=True) as (base, _counts):
        url = f"{base}/gpt2/full/model.safetensors"
        res = runner.invoke(app, ["inspect", "--json", url])
        verify = runner.invoke(app, ["verify", url])
    assert res.exit_code == 2 and verify.exit_code == 2
    line = _one_error_line(res)
    assert url in line and "HTTP 503" in line
    assert "secret" not in res.output  # the server's own text is never shown
    assert res.stdout == ""


def test_a_server_that_does_not_answer_in_time_is_one_line(tmp_path: Path) -> None:
    with serve(FIXTURES, delay=3.0) as (base, _counts):
        url = f"{base}/gpt2/full/model.safetensors"
        started = time.monotonic()
        res = runner.invoke(app, ["inspect", "--timeout", "0.3", url])
        took = time.monotonic() - started
    assert res.exit_code == 2
    line = _one_error_line(res)
    assert url in line and "timed out" in line and "--timeout" in line
    assert took < 2.5


def test_a_timeout_in_the_library_names_the_parameter() -> None:
    import tiecli
    from tiecli.errors import RemoteError

    with serve(FIXTURES, delay=3.0) as (base, _counts):
        url = f"{base}/gpt2/full/model.safetensors"
        with pytest.raises(RemoteError) as caught:
            tiecli.inspect(url, timeout=0.3)
    text = str(caught.value)
    assert url in text and "timed out" in text
    assert "raise timeout)" in text and "--timeout" not in text


def test_nothing_listens_is_one_line() -> None:
    with serve(FIXTURES) as (base, _counts):
        pass  # closed: the port refuses connections now
    res = runner.invoke(app, ["inspect", f"{base}/gpt2/full/model.safetensors"])
    assert res.exit_code == 2
    assert f"{base}/gpt2/full/model.safetensors" in _one_error_line(res)


@pytest.mark.parametrize("status", [401, 403])
def test_a_server_that_wants_credentials_is_one_line(status: int) -> None:
    with serve(FIXTURES, status=status) as (base, _counts):
        url = f"{base}/gpt2/full/model.safetensors"
        res = runner.invoke(app, ["inspect", "--json", url])
        verify = runner.invoke(app, ["verify", url])
    assert res.exit_code == verify.exit_code == 2 and res.stdout == ""
    line = _one_error_line(res)
    assert (
        line
        == f"Error: {url}: the server answered HTTP {status} (access denied: credentials missing or refused)"
    )
    assert _one_error_line(verify) == line
    assert "secret" not in res.output


def test_a_host_name_that_does_not_resolve_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DNS failure, made without a network: the resolver says the name is unknown."""
    import socket

    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    url = "https://tiecli-test.invalid/m/model.safetensors"
    for cmd in ("inspect", "verify"):
        res = runner.invoke(app, [cmd, url])
        assert res.exit_code == 2 and res.stdout == ""
        assert _one_error_line(res) == f"Error: {url}: cannot resolve the host name"


def test_a_server_without_range_support_is_refused_not_downloaded(tmp_path: Path) -> None:
    path = _large_pair(tmp_path / "m")
    with serve(tmp_path, ignore_ranges=True) as (base, _counts):
        res = runner.invoke(app, ["inspect", f"{base}/m/model.safetensors"])
    assert res.exit_code == 2
    assert "range requests" in _one_error_line(res)
    assert path.is_file()


def test_missing_files_and_credentials_in_urls(tmp_path: Path) -> None:
    with serve(FIXTURES) as (base, _counts):
        host = base.split("//", 1)[1]
        url = f"http://user:hunter2@{host}/gpt2/full/nothing.safetensors?sig=s3cret"
        res = runner.invoke(app, ["inspect", url])
    assert res.exit_code == 2
    line = _one_error_line(res)
    assert f"{base}/gpt2/full/nothing.safetensors: not found" in line
    assert "hunter2" not in line and "s3cret" not in line
    assert shown_url("https://a:b@h:8/x?y=1#z") == "https://h:8/x"


def test_an_index_cannot_name_shards_outside_its_folder(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    shutil.copy(FIXTURES / "gpt2/full/model.safetensors", tmp_path / "secret.safetensors")
    for i, shard in enumerate(["../secret.safetensors", "%2e%2e%2fsecret.safetensors"]):
        index = {"metadata": {}, "weight_map": {"lm_head.weight": shard}}
        (tmp_path / "repo" / f"m{i}.safetensors.index.json").write_text(json.dumps(index))
    with serve(tmp_path) as (base, counts):
        for i in range(2):
            res = runner.invoke(app, ["inspect", f"{base}/repo/m{i}.safetensors.index.json"])
            assert res.exit_code == 2
            assert "outside its folder" in _one_error_line(res)
        assert not any("secret" in p for p in counts.paths)


def test_a_huge_header_length_is_refused_before_it_is_read(tmp_path: Path) -> None:
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}" + b"\0" * 100_000)
    with serve(tmp_path) as (base, counts):
        res = runner.invoke(app, ["inspect", f"{base}/m.safetensors"])
    assert res.exit_code == 2
    assert "header length exceeds" in _one_error_line(res)
    assert counts.bytes <= 64 << 10


def test_rewrites_of_a_url_need_an_output_and_never_run_in_place(tmp_path: Path) -> None:
    url = "https://127.0.0.1:9/m.safetensors"
    for cmd in (
        ["dedupe"],
        ["untie"],
        ["fix"],
        ["dedupe", "--dry-run", "-o", str(tmp_path / "o")],
        ["fix", "--dry-run", "-o", str(tmp_path / "o")],
    ):
        res = runner.invoke(app, [*cmd, url])
        assert res.exit_code == 2, cmd
        line = _one_error_line(res)
        assert url in line and "-o" in line and "nothing was changed" in line
    res = runner.invoke(app, ["verify", "--forward", url])
    assert res.exit_code == 2 and "--forward" in _one_error_line(res)
    assert list(tmp_path.iterdir()) == []


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".tiecli")]


@pytest.mark.parametrize(
    ("rel", "name"),
    [
        ("gpt2/full/model.safetensors", "out.safetensors"),
        ("t5/full-sharded/model.safetensors.index.json", "out"),
    ],
)
def test_dedupe_and_untie_of_a_url_write_the_local_result(
    rel: str, name: str, tmp_path: Path
) -> None:
    remote_out, local_out = tmp_path / "remote", tmp_path / "local"
    remote_out.mkdir()
    local_out.mkdir()
    with serve(FIXTURES) as (base, counts):
        _c, deduped = _json(["dedupe", "--json", f"{base}/{rel}", "-o", str(remote_out / name)])
        served = (counts.requests, counts.bytes)
        _c, untied = _json(
            ["untie", "--json", f"{base}/{rel}", "-o", str(remote_out / ("u" + name))]
        )
    _c, local = _json(["dedupe", "--json", str(FIXTURES / rel), "-o", str(local_out / name)])
    assert deduped["path"] == f"{base}/{rel}" and deduped["output"] == str(remote_out / name)
    assert deduped["removed"] == local["removed"] and deduped["removed"]
    assert (deduped["remote"]["requests"], deduped["remote"]["bytes_read"]) == served
    assert untied["restored"] == [] and untied["remote"]["requests"] > 0
    written = sorted(p.relative_to(remote_out / name) for p in (remote_out / name).rglob("*"))
    if (remote_out / name).is_file():
        written = [Path(".")]
    for rel_file in written:
        a, b = remote_out / name / rel_file, local_out / name / rel_file
        assert a.read_bytes() == b.read_bytes(), rel_file
    assert _leftovers(remote_out) == []  # the download is gone


def test_a_failed_download_leaves_nothing(tmp_path: Path) -> None:
    with serve(FIXTURES, refuse=True) as (base, _counts):
        res = runner.invoke(
            app, ["dedupe", f"{base}/gpt2/full/model.safetensors", "-o", str(tmp_path / "o")]
        )
    assert res.exit_code == 2 and "HTTP 503" in _one_error_line(res)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "o").write_bytes(b"mine")
    with serve(FIXTURES) as (base, counts):
        res = runner.invoke(
            app, ["untie", f"{base}/gpt2/full/model.safetensors", "-o", str(tmp_path / "o")]
        )
        assert counts.requests == 0  # refused before anything is downloaded
    assert res.exit_code == 2 and "already exists" in _one_error_line(res)
    assert (tmp_path / "o").read_bytes() == b"mine"


def test_local_runs_import_no_remote_library() -> None:
    code = (
        "import sys, tiecli.cli, tiecli.api\n"
        "from typer.testing import CliRunner\n"
        "r = CliRunner().invoke(tiecli.cli.app, ['inspect', sys.argv[1]])\n"
        "assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(tiecli.cli.app, ['--help'])\n"
        "bad = [m for m in ('fsspec', 'aiohttp', 'huggingface_hub', 'tiecli.formats.remote') "
        "if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(FIXTURES / "custom/no-ties.safetensors")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"


# -- the Hub, through HF_ENDPOINT and huggingface_hub's own HfFileSystem -------


def _hub_run(args: list[str], base: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environ |= {"HF_ENDPOINT": base, "HF_HOME": str(tmp_path / "hf-home"), **env}
    return subprocess.run(
        [sys.executable, "-m", "tiecli", *args], capture_output=True, text=True, env=environ
    )


def test_hub_paths_read_through_huggingface_hub(tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")
    hub = tmp_path / "hub"
    shutil.copytree(FIXTURES / "gpt2/full-sharded", hub / "acme/gpt2")
    shutil.copytree(FIXTURES / "drift", hub / "acme/mixed/sub")
    with serve(hub, hub=True) as (base, counts):
        res = _hub_run(["inspect", "--json", "hf://acme/gpt2@main"], base, tmp_path)
        served = counts.requests
        verify = _hub_run(["verify", "--json", "hf://acme/mixed/sub"], base, tmp_path)
        missing = _hub_run(["inspect", "hf://acme/none"], base, tmp_path)
        bad_rev = _hub_run(["inspect", "hf://acme/gpt2@v9"], base, tmp_path)
        untied = _hub_run(
            ["untie", "--json", "hf://acme/mixed/sub", "-o", str(tmp_path / "untied")],
            base,
            tmp_path,
        )
        before = counts.requests
        offline = _hub_run(["inspect", "hf://acme/gpt2"], base, tmp_path, HF_HUB_OFFLINE="1")
        assert counts.requests == before  # offline mode: not one request
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    _same(
        doc,
        json.loads(
            runner.invoke(app, ["inspect", "--json", str(FIXTURES / "gpt2/full-sharded")]).stdout
        ),
    )
    assert doc["path"] == "hf://acme/gpt2@main"
    assert doc["config"] == "hf://acme/gpt2@main/config.json"
    assert doc["remote"]["requests"] == served
    assert any(p.startswith("/api/models/acme/gpt2") for p in counts.paths)  # the Hub API
    assert counts.ranges  # and ranged reads of its resolve endpoint

    assert verify.returncode == 1, verify.stderr
    assert [p["code"] for p in json.loads(verify.stdout)["problems"]] == ["drift"]
    for failed in (missing, bad_rev, offline):
        assert failed.returncode == 2
        assert len(failed.stderr.strip().splitlines()) == 1 and "Traceback" not in failed.stderr
    assert missing.stderr.startswith("Error: hf://acme/none: ")
    assert bad_rev.stderr.startswith("Error: hf://acme/gpt2@v9: ")
    assert "offline" in offline.stderr
    assert untied.returncode == 0, untied.stderr
    assert json.loads(untied.stdout)["path"] == "hf://acme/mixed/sub"
    assert sorted(p.name for p in (tmp_path / "untied").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


def test_the_pre_commit_hook_checks_a_hub_repository(tmp_path: Path) -> None:
    """The shipped hook, pointed at ``hf://`` paths as a .pre-commit-config.yaml does it
    (``args`` with the URL, ``pass_filenames: false``, ``always_run: true``): pre-commit
    runs its entry with the args, and the URL reaches tiecli as it was written."""
    import shlex

    import yaml

    pytest.importorskip("huggingface_hub")
    (hook,) = yaml.safe_load((FIXTURES.parent / ".pre-commit-hooks.yaml").read_text())
    hub = tmp_path / "hub"
    shutil.copytree(FIXTURES / "gpt2/hf", hub / "acme/deduped")
    shutil.copytree(FIXTURES / "gpt2/full-sharded", hub / "acme/copy")
    for repo in ("deduped", "copy"):  # no config: transformers is not imported (faster)
        (hub / "acme" / repo / "config.json").unlink()
    runs = {}
    with serve(hub, hub=True) as (base, _counts):
        for repo in ("deduped", "copy"):
            config = {
                **hook,
                "args": ["--json", f"hf://acme/{repo}@main"],
                "pass_filenames": False,
                "always_run": True,
            }
            argv = shlex.split(config["entry"]) + config["args"]
            assert argv[0] == "tiecli"
            runs[repo] = _hub_run(argv[1:], base, tmp_path)
    ok, copy = runs["deduped"], runs["copy"]
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["checked"] == ["hf://acme/deduped@main"]
    assert copy.returncode == 1, copy.stderr
    [problem] = json.loads(copy.stdout)["problems"]
    assert problem["code"] == "duplicate-stored" and problem["path"] == "hf://acme/copy@main"


def test_a_hub_range_answer_longer_than_asked_is_not_read(tmp_path: Path) -> None:
    """The Hub's resolve endpoint answers a range with 1 GB more than asked: refused from
    its headers (huggingface_hub's client calls a hook before it reads a body)."""
    pytest.importorskip("huggingface_hub")
    hub = tmp_path / "hub"
    shutil.copytree(FIXTURES / "gpt2/full", hub / "acme/gpt2")
    with serve(hub, hub=True, flood=1 << 30) as (base, counts):
        res = _hub_run(["inspect", "--json", "hf://acme/gpt2"], base, tmp_path)
        time.sleep(0.5)  # the server writes until the client's hang-up reaches it
        flooded = counts.flooded
    assert res.returncode == 2 and res.stdout == "", res.stderr
    [line] = res.stderr.strip().splitlines()
    assert line.startswith("Error: hf://acme/gpt2/model.safetensors: asked for 29776 bytes")
    assert "not read" in line
    assert flooded < 64 << 20, flooded  # the client hung up after the headers


def test_an_http_folder_url_is_refused_before_any_request() -> None:
    with serve(FIXTURES) as (base, counts):
        res = runner.invoke(app, ["inspect", f"{base}/gpt2/full/"])
    assert res.exit_code == 2
    assert "must name a .safetensors file" in _one_error_line(res)
    assert counts.requests == 0


@pytest.mark.parametrize(
    ("module", "url"),
    [
        ("fsspec", "https://127.0.0.1:9/model.safetensors"),
        ("aiohttp", "https://127.0.0.1:9/model.safetensors"),
        ("huggingface_hub", "hf://acme/model"),
    ],
)
def test_a_missing_remote_library_says_which_extra_to_install(
    module: str, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    res = runner.invoke(app, ["inspect", url])
    assert res.exit_code == 2
    line = _one_error_line(res)
    assert "pip install 'tiecli[remote]'" in line and module in line


@pytest.mark.parametrize(
    ("url", "said"),
    [
        # a backend that connects while it is made: one line with the URL, no password
        ("ftp://user:secret@127.0.0.1:1/a.safetensors", "cannot connect"),
        # local files and archives under a URL's name: not remote, refused before any read
        ("file:///etc/hostname", "not a remote location"),
        ("zip://a.safetensors", "not a remote location"),
        ("simplecache::https://127.0.0.1:1/a.safetensors", "no such file"),  # a local name
    ],
)
def test_odd_schemes_are_one_line_errors(url: str, said: str) -> None:
    r = runner.invoke(app, ["inspect", url])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("Error: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert said in r.stderr and "secret" not in r.stderr and "Traceback" not in r.output


def test_many_small_tensors_cost_few_requests(tmp_path: Path) -> None:
    """Ranges fetched ahead stay findable: a small range kept inside a larger one must not
    hide it (every later read was fetched again, thousands of requests)."""
    from safetensors.numpy import save_file

    (tmp_path / "s").mkdir()
    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.standard_normal(1024).astype(np.float32) for i in range(2000)}
    save_file(tensors, str(tmp_path / "s" / "model.safetensors"))
    with serve(tmp_path) as (base, counts):
        r = runner.invoke(
            app, ["inspect", "--json", "--max-download", "0", f"{base}/s/model.safetensors"]
        )
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["ties"] == []
        assert counts.requests <= 40, counts.requests
        assert max(len_of(rng_) for rng_ in counts.ranges) <= (1 << 20) + 8


def len_of(header: str) -> int:
    """The longest range a ``Range`` header asks for."""
    spans = [r.split("-") for r in header.removeprefix("bytes=").split(",")]
    return max(int(end) - int(start) + 1 for start, end in spans)


def test_a_range_answer_longer_than_asked_is_not_read(tmp_path: Path) -> None:
    """A hostile server answers a 64 KiB range with 200 MB: refused from its headers, before
    the body is read into memory."""
    import threading
    import tracemalloc
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = 200 << 20

    class Flood(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(10 << 30))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

        def do_GET(self) -> None:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 0-65535/{10 << 30}")
            self.send_header("Content-Length", str(body))
            self.end_headers()
            try:
                for _ in range(body >> 20):
                    self.wfile.write(b"\0" * (1 << 20))
            except OSError:
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Flood)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/m/model.safetensors"
        tracemalloc.start()
        r = runner.invoke(app, ["inspect", url])
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        server.shutdown()
        server.server_close()
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1, r.output
    assert "not read" in r.stderr and url in r.stderr
    assert peak < 50 << 20, peak


def test_a_padded_tie_past_max_download_is_judged_from_rows(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    (tmp_path / "p").mkdir()
    emb = np.random.default_rng(0).standard_normal((1024, 256)).astype(np.float32)
    save_file(
        {"model.embed_tokens.weight": emb, "lm_head.weight": emb[:1000].copy()},
        str(tmp_path / "p" / "model.safetensors"),
    )
    config = {"model_type": "llama", "tie_word_embeddings": True, "vocab_size": 1000}
    (tmp_path / "p" / "config.json").write_text(json.dumps(config))
    with serve(tmp_path) as (base, counts):
        url = f"{base}/p/model.safetensors"
        r = runner.invoke(app, ["inspect", "--json", "--max-download", "0", url])
        assert r.exit_code == 0, r.output
        (tie,) = json.loads(r.stdout)["ties"]
        assert tie["pad"] == {"source_rows": 1024, "alias_rows": 1000, "sampled": True}
        assert counts.bytes < emb.nbytes // 4  # not both tensors (2 MB) read whole
        r = runner.invoke(app, ["inspect", "--json", url])  # within the budget: compared whole
        (tie,) = json.loads(r.stdout)["ties"]
        assert tie["pad"] == {"source_rows": 1024, "alias_rows": 1000}


# -- multi-range requests -------------------------------------------------------


def _layers(folder: Path, n: int = 40, tie: bool = False) -> Path:
    """``n`` same-shaped 256 KiB tensors nobody declared (a pair of them equal when
    ``tie``): every one is a tie candidate until its first element is read."""
    folder.mkdir()
    rng = np.random.default_rng(3)
    tensors = {
        f"layers.{i}.w": rng.standard_normal((256, 256)).astype(np.float32) for i in range(n)
    }
    if tie:
        tensors[f"layers.{n - 1}.w"] = tensors["layers.0.w"].copy()
    _safetensors(folder / "model.safetensors", tensors)
    return folder / "model.safetensors"


def test_no_candidate_costs_three_requests_per_file(tmp_path: Path) -> None:
    path = _layers(tmp_path / "m")
    with serve(tmp_path) as (base, counts):
        _code, doc = _json(["inspect", "--json", f"{base}/m/model.safetensors"])
        served = (counts.requests, counts.bytes)
    _code, local = _json(["inspect", "--json", str(path)])
    _same(doc, local)
    assert doc["ties"] == []
    # the header (with the size), the 40 first elements in one multi-range request, and
    # the look for config.json: one request per tensor before
    assert doc["remote"]["requests"] == served[0] == 3 and counts.multi == 1
    assert doc["remote"]["bytes_read"] == served[1] < 0.01 * path.stat().st_size
    # 39 ranges: the first tensor's first element came with the header
    assert max(r.count(",") for r in counts.ranges) == 38


@pytest.mark.parametrize("multi", ["multipart", "first", "whole"])
def test_servers_that_refuse_multi_range_are_read_one_range_at_a_time(
    multi: str, tmp_path: Path
) -> None:
    """A server may answer a multi-range request with the first range only, or with the
    whole file (nginx with max_ranges 1): the whole file is refused from its headers,
    and every range is then asked alone; the results are those of a local run."""
    path = _layers(tmp_path / "m", tie=True)
    size = path.stat().st_size
    with serve(tmp_path, multi=multi) as (base, counts):
        _code, doc = _json(
            ["inspect", "--json", "--max-download", "0", f"{base}/m/model.safetensors"]
        )
        requests = counts.requests
        singles = [r for r in counts.ranges if "," not in r]
    _code, local = _json(["inspect", "--json", str(path)])
    [tie] = doc["ties"]
    assert (tie["alias"], tie["source"], tie["evidence"]) == (
        "layers.39.w",
        "layers.0.w",
        ["sampled"],
    )
    assert [t["alias"] for t in local["ties"]] == ["layers.39.w"]
    assert doc["remote"]["requests"] == requests
    assert doc["remote"]["bytes_read"] < 0.01 * size  # never the whole file
    if multi == "multipart":
        # header, first elements, the pair's samples, config.json
        assert requests == 4 and counts.multi == 2
    else:
        # one refused multi-range request, then one request per range (the samples too)
        assert counts.multi == 0
        assert requests >= 2 + 40 + 8
        assert sum("," in r for r in counts.ranges) == 1 and len(singles) >= 40


def test_multipart_parts_are_cut_by_their_content_range() -> None:
    from tiecli.errors import TiecliError
    from tiecli.formats.remote.http_client import multipart_ranges

    data = b"--b\r\n--b--\r\n"  # the boundary inside a part's bytes
    body = (
        b"\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 10-21/100"
        b"\r\n\r\n" + data + b"\r\n--b\r\ncontent-range: bytes 50-50/100\r\n\r\nx\r\n--b--\r\n"
    )
    assert multipart_ranges(body, b"b", "http://h/m") == [(10, data), (50, b"x")]
    for bad in (body.replace(b"21/", b"99/"), body[:40], b"no parts"):
        with pytest.raises(TiecliError, match="malformed"):
            multipart_ranges(bad, b"b", "http://h/m")


def test_remote_reads_show_a_progress_bar_but_not_with_json_or_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tiecli import progress as progress_module

    monkeypatch.setattr(progress_module._RichProgress, "DELAY", 0.0)  # show every bar
    _layers(tmp_path / "m", tie=True)
    env = {"TTY_COMPATIBLE": "1", "COLUMNS": "200", "NO_COLOR": "1"}
    with serve(tmp_path) as (base, _counts):
        url = f"{base}/m/model.safetensors"
        shown = runner.invoke(app, ["inspect", url], env=env)
        as_json = runner.invoke(app, ["inspect", "--json", url], env=env)
        quiet = runner.invoke(app, ["verify", "-q", url], env=env)
        verify_json = runner.invoke(app, ["verify", "--json", url], env=env)
    assert shown.exit_code == as_json.exit_code == 0
    assert "reading sampled elements" in shown.stderr  # on stderr, never stdout
    assert "reading sampled elements" not in shown.stdout
    for silent in (as_json, quiet, verify_json):
        assert silent.stderr == "", silent.stderr
    assert json.loads(as_json.stdout)["ties"]


def test_fix_of_a_url_writes_the_fixed_local_folder(tmp_path: Path) -> None:
    # a head trained untied under a config that says tied, served over HTTP
    served = tmp_path / "served"
    shutil.copytree(FIXTURES / "llama-untied" / "hf", served)
    cfg = served / "config.json"
    cfg.write_text(
        cfg.read_text().replace('"tie_word_embeddings": false', '"tie_word_embeddings": true')
    )
    before = {p.name: p.read_bytes() for p in served.iterdir()}
    out = tmp_path / "fixed"
    with serve(served) as (base, counts):
        code, doc = _json(["fix", "--json", f"{base}/model.safetensors", "-o", str(out)])
        requests = counts.requests
    assert code == 0, doc
    assert doc["remote"]["requests"] == requests > 0
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    assert {p.name: p.read_bytes() for p in served.iterdir()} == before
    assert _leftovers(tmp_path) == []
