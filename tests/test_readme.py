"""The README and docs/contracts.md: every setting, the two commands, install lines that work, a complete quick start,
the CLI's options with their defaults, and every contract a user needs, inside the repository."""
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import MISSING, fields
from pathlib import Path

from api_client import cli, schema, state
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CONTRACTS = (ROOT / "docs" / "contracts.md").read_text()


def table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows by their first cell (without backticks): the other cells."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_every_setting_is_in_the_readme():
    missing = [f.metadata["variable"] for f in fields(Settings) if f"`{f.metadata['variable']}`" not in README]
    assert not missing, f"README.md lacks {missing}: paste Settings.describe() into its Settings section"


def test_the_readme_shows_make_demo_and_make_test():
    assert "make demo" in README and "make test" in README


def test_every_api_setting_is_in_the_readme():
    from api.settings import ApiSettings

    variables = [f.metadata["variable"] for f in fields(ApiSettings)] + ["INPAINT_API_URL", "INPAINT_API_KEY"]
    missing = [variable for variable in variables if f"`{variable}`" not in README]
    assert not missing, f"README.md lacks {missing}: paste ApiSettings.describe() into its Settings section"


def test_the_readme_shows_other_services_how_to_call_the_api():
    section = README.split("## Calling from other services", 1)[1].split("\n## ", 1)[0]
    assert "curl " in section and "fetch(" in section and "InpaintClient.from_env()" in section


def test_the_docs_stay_inside_the_repository():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "../shared" not in path.read_text() and "DESIGN.md" not in path.read_text(), path
    assert "[docs/contracts.md](docs/contracts.md)" in README


def test_install_lines_name_a_source_that_exists():
    # The package is not on PyPI: a bare `pip install inpaint-fleet` fails.
    for found in re.finditer(r"pip install ([^#`\n]*)", README):
        assert not {"inpaint-fleet", "inpaint-fleet[worker]"} & set(shlex.split(found.group(1))), found.group(0)
    for line in ('pip install ".[worker]"', 'pip install "inpaint-fleet @ git+$REPO_URL"',
                 "pip wheel --no-deps -w dist . && pip install dist/inpaint_fleet-0.1.0-py3-none-any.whl"):
        assert line in README, line


def test_the_wheel_of_the_readme_builds_with_the_client_the_worker_and_both_commands(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "tests", "build", "*.egg-info",
                                                                "__pycache__", "out", ".pytest_cache"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    [wheel] = (tmp_path / "dist").glob("*.whl")
    assert wheel.name == "inpaint_fleet-0.1.0-py3-none-any.whl"   # the name the README installs
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read("inpaint_fleet-0.1.0.dist-info/entry_points.txt").decode()
    assert {"api_client/cli.py", "api_client/inputs.py", "worker/__main__.py", "worker/inference/model/tiny.py",
            "kernels/__init__.py"} <= names
    assert "inpaint = api_client.cli:main" in entry_points and "inpaint-worker = worker.__main__:main" in entry_points


def test_the_quick_start_covers_every_step_on_one_machine():
    quick_start = README[README.index("## Quick start on one machine"):README.index("## Real weights on a GPU")]
    for step in ("redis-server", "python -m moto.server", "create_bucket(Bucket=", "aws s3 mb s3://inpaint",
                 "python -m worker.inference.model.tiny models/tiny", "INPAINT_MODEL=models/tiny inpaint-worker",
                 "inpaint submit --image examples/image.png --mask examples/mask.png", "export AWS_ACCESS_KEY_ID="):
        assert step in quick_start, step


def test_the_readme_gives_every_job_option_with_its_default():
    rows = table_rows(README[README.index("The job options and their defaults"):])
    flags = " ".join(rows)
    for flag, field, _, _ in cli.JOB_OPTIONS:
        [cells] = [cells for first, cells in rows.items() if re.search(rf"`?{flag}`?(,|$)", first)]
        assert field in cells[0], (flag, cells)
    for flag in ("--prompt-file PATH", "--negative-prompt TEXT", "--scheduler", "--no-keep-unmasked", "--format",
                 "--priority", "--job-id"):
        assert flag in flags, flag
    assert rows["--steps"][1].startswith("50") and rows["--guidance"][1] == "7.5"


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_contracts_list_every_job_field_with_its_default():
    rows = table_rows(section(CONTRACTS, "Job schema"))
    for item in fields(schema.Job):
        assert item.name in rows, item.name
        default = rows[item.name][1]
        if item.default is MISSING:
            assert default.startswith("(required"), item.name
        else:
            assert default == f"`{json.dumps(item.default)}`", (item.name, default)
    assert "`true` for jobs" in CONTRACTS and "`false` in the library" in CONTRACTS


def test_contracts_list_every_event_field_phase_state_error_code_and_redis_key():
    events = table_rows(section(CONTRACTS, "States, phases and events"))
    assert [f.name for f in state.EVENT_FIELDS if f.name not in events] == []
    assert [phase for phase in state.PHASES if phase not in events] == []
    assert [code for code in schema.ERROR_CODES if code not in table_rows(section(CONTRACTS, "Error codes"))] == []
    keys = table_rows(section(CONTRACTS, "Redis keys"))
    for key in (state.job_key("<job_id>"), state.job_events_key("<job_id>"), state.EVENTS_STREAM,
                state.cancel_key("<job_id>"), state.LEASES_KEY):
        assert key in keys, key
    for field in ("state", "phase", "step", "total_steps", "attempt", "error", "result"):
        assert f"`{field}`" in keys[state.job_key("<job_id>")][1], field
    for name in schema.STATES + (schema.EXPIRED,):
        assert f"`{name}`" in CONTRACTS
    for code in (cli.QUEUE_UNAVAILABLE, cli.JOB_NOT_FOUND, cli.ALREADY_FINAL):
        assert f"`{code}`" in CONTRACTS
