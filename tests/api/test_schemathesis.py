"""A bounded property-based run of schemathesis against /openapi.json: generated requests to every operation,
with a valid key (on a queue no worker consumes), and not one answer may be a server error (5xx)."""
import re
import subprocess
import sys
from pathlib import Path

from tests.api.conftest import IDLE_QUEUE

MAX_EXAMPLES = 12   # per operation: the run stays well under a minute on two busy cores


def test_no_generated_request_gets_a_server_error(stack, key_name, tmp_path):
    key = stack.new_key(key_name, queues=(IDLE_QUEUE,))
    command = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{stack.url}/openapi.json",
               "--checks", "not_a_server_error", "--max-examples", str(MAX_EXAMPLES), "--seed", "14",
               "--header", f"Authorization: Bearer {key}", "--request-timeout", "20", "--workers", "2",
               "--phases", "examples,coverage,fuzzing"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    generated, passed = map(int, re.search(r"(\d+) generated, (\d+) passed", run.stdout).groups())
    assert generated == passed > 100, run.stdout[-3000:]
