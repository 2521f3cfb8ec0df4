"""The README lists every setting and shows the two commands a newcomer runs."""
from dataclasses import fields
from pathlib import Path

from worker.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


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
