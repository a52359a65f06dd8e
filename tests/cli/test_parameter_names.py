"""An error that names an option says it as the caller wrote it: a Python caller reads
the keyword parameter (``to``), the command line its flag (``--to``), the rest of the
message the same."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import fixture_path
from typer.testing import CliRunner

import tiecli
from tiecli.cli import app
from tiecli.errors import as_flag

runner = CliRunner()
SIZES = " (bytes, or a number with KB, MB, GB, TB, KiB, MiB, GiB or TiB)"

# (the Python call, the same on the command line, what each reads)
CASES: list[tuple[Callable[[Path], Any], list[str], str, str]] = [
    (
        lambda p: tiecli.dedupe(p, to="onnx"),
        ["dedupe", "--to", "onnx"],
        "to 'onnx': the only conversion is to safetensors",
        "--to 'onnx': the only conversion is --to safetensors",
    ),
    (
        lambda p: tiecli.dedupe(p, max_shard_size="lots"),
        ["dedupe", "--max-shard-size", "lots"],
        "max_shard_size: 'lots' is not a size" + SIZES,
        "--max-shard-size: 'lots' is not a size" + SIZES,
    ),
    (
        lambda p: tiecli.dedupe(p, max_shard_size="0"),
        ["dedupe", "--max-shard-size", "0"],
        "max_shard_size must be more than 0 bytes",
        "--max-shard-size must be more than 0 bytes",
    ),
    (
        lambda p: tiecli.fix(p, tie=True, untie_head=True),
        ["fix", "--tie", "--untie-head"],
        "tie and untie_head choose opposite models; pass one of them",
        "--tie and --untie-head choose opposite models; pass one of them",
    ),
    (
        lambda p: tiecli.verify(p, atol=0.1),
        ["verify", "--atol", "0.1"],
        "against, atol, dtype, model, device_map and max_memory go with forward",
        "--against, --atol, --dtype, --model, --device-map and --max-memory go with --forward",
    ),
]


@pytest.mark.parametrize(
    "call, argv, python, flags", CASES, ids=["to", "size", "zero-size", "tie", "forward"]
)
def test_python_reads_parameters_the_cli_reads_flags(
    tmp_path: Path, call: Callable[[Path], Any], argv: list[str], python: str, flags: str
) -> None:
    ckpt = shutil.copytree(fixture_path("gpt2", "full"), tmp_path / "in")
    with pytest.raises(tiecli.TiecliError) as e:
        call(ckpt)
    assert str(e.value) == python
    r = runner.invoke(app, [argv[0], str(ckpt), *argv[1:]])
    assert r.exit_code == 2
    assert r.stderr == f"Error: {flags}\n"


def test_output_exists_names_force(tmp_path: Path) -> None:
    """``dedupe URL -o OUT`` over an existing OUT: ``force`` / ``--force``."""
    out = tmp_path / "out"
    out.write_bytes(b"mine")
    url = "hf://acme/gpt2"
    with pytest.raises(tiecli.OutputError) as e:
        tiecli.dedupe(url, out)
    assert str(e.value) == f"{out}: already exists; pass force to replace it"
    r = runner.invoke(app, ["dedupe", url, "-o", str(out)])
    assert r.exit_code == 2
    assert r.stderr == f"Error: {out}: already exists; pass --force to replace it\n"
    assert out.read_bytes() == b"mine"


def test_flags_of_parameters() -> None:
    assert as_flag("max_shard_size") == "--max-shard-size"
    assert as_flag("to") == "--to"
    assert as_flag("output") == "-o"
    assert as_flag("for_consumers") == "--for"


def _two_equal_tensors(tmp_path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    w = torch.arange(512 * 512, dtype=torch.float32).reshape(512, 512)
    p = tmp_path / "dup.safetensors"
    save_file({"first.weight": w, "second.weight": w.clone()}, str(p))
    return p


@pytest.mark.parametrize(
    ("options", "flags", "python_reads", "cli_reads"),
    [
        (
            {},
            [],
            "duplicate by value only (use by_value)",
            "duplicate by value only (use --by-value)",
        ),
        (
            {"by_value": True, "min_bytes": 1 << 30},
            ["--by-value", "--min-bytes", str(1 << 30)],
            f"duplicate smaller than min_bytes ({1 << 30})",
            f"duplicate smaller than --min-bytes ({1 << 30})",
        ),
    ],
)
def test_a_kept_reason_names_the_parameter_as_the_caller_wrote_it(
    tmp_path: Path, options: dict[str, Any], flags: list[str], python_reads: str, cli_reads: str
) -> None:
    import json

    p = _two_equal_tensors(tmp_path)
    result = tiecli.dedupe(p, dry_run=True, **options)
    assert [reason for _t, reason in result.kept] == [python_reads]
    res = runner.invoke(app, ["dedupe", str(p), "--dry-run", "--json", *flags])
    assert res.exit_code == 0, res.output
    assert [k["reason"] for k in json.loads(res.stdout)["kept"]] == [cli_reads]
    table = runner.invoke(app, ["dedupe", str(p), "--dry-run", *flags])
    flag = (
        cli_reads.split("(use ")[-1].rstrip(")").split(" (")[0].split()[-1]
    )  # --by-value / --min-bytes
    assert flag in table.stdout and flag.lstrip("-").replace("-", "_") not in table.stdout
