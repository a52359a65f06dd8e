"""The real consumers against tiecli's predictions (opt-in, never in CI).

Runs only with TIECLI_ORACLE=1 and the consumer venvs made by `bash oracle/setup.sh`
(in $TIECLI_ORACLE_ENVS, default /work/consumer-envs). It builds the oracle's cases, loads each
one in transformers 4 and 5, vLLM (CPU), MLX-LM (CPU) and llama.cpp, and asserts that what each
consumer really loads for the embedding and the head is what `tiecli inspect --json` predicts.
A consumer whose venv is missing is skipped, not failed. Takes 20 minutes or more on 2 cores;
TIECLI_ORACLE_WORK=DIR resumes in DIR (its cases and consumer results are kept).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENVS = Path(os.environ.get("TIECLI_ORACLE_ENVS", "/work/consumer-envs"))

pytestmark = pytest.mark.skipif(
    os.environ.get("TIECLI_ORACLE") != "1" or not (ENVS / "tf4" / ".done").exists(),
    reason="opt-in: set TIECLI_ORACLE=1 after `bash oracle/setup.sh` (real consumers)",
)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("oracle")
    # TIECLI_ORACLE_WORK: resume in that folder (keeps its cases and consumer results)
    work = os.environ.get("TIECLI_ORACLE_WORK")
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "oracle" / "run.py"),
            "--envs",
            str(ENVS),
            "--work",
            work or str(tmp / "work"),
            "--doc",
            str(tmp / "oracle.md"),
            "--json",
            str(tmp / "oracle.json"),
            *(["--reuse"] if work else []),
        ],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((tmp / "oracle.json").read_text())


CONSUMERS = ["transformers-4", "transformers-5", "vllm", "mlx-lm", "llama.cpp"]


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_every_prediction_matches_the_real_consumer(oracle: dict, consumer: str) -> None:
    if not oracle["envs"][consumer]["available"]:
        pytest.skip(f"{consumer}: {oracle['envs'][consumer]['why']}")
    wrong = []
    for row in oracle["results"]:
        case = row["case"]
        info = row["consumers"][consumer]
        obs, pred = info["observed"], info["predicted"]
        if obs["outcome"] == "n/a":
            continue
        assert pred is not None, f"{case['name']}: tiecli makes no prediction for {consumer}"
        for t in (case["embed"], case["head"]):
            p = pred.get(t) or "stored"
            if p != obs.get(t):
                wrong.append(f"{case['name']} {t}: predicted {p}, observed {obs.get(t)}")
    assert not wrong, "\n".join(wrong)


def test_after_fix_every_consumer_computes_the_same_log_probs(oracle: dict) -> None:
    fix = oracle["fix"]
    if not fix["ran"]:
        pytest.skip(fix["why"])
    bad = {name: res for name, res in fix["cases"].items() if res.get("agree") is False}
    assert not bad, bad
