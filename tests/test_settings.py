"""worker.settings: one frozen object from environment variables, checked, documented, printable without secrets."""
import dataclasses

import pytest

from api_client import schema
from worker.settings import Settings, redact_url


def test_defaults_from_an_empty_environment():
    settings = Settings.from_env({})
    assert settings.broker_url == "redis://localhost:6379/0" and settings.state_redis_url == settings.broker_url
    assert settings.queue == "inpaint" and settings.state_ttl_s == 7 * 24 * 3600
    assert settings.cuda_graphs == "auto" and settings.kernels == "auto"
    assert settings.limits == schema.Limits()
    assert settings.bucket_allowlist == frozenset()


def test_every_variable_is_read():
    env = {"INPAINT_BROKER_URL": "redis://broker:6379/1", "INPAINT_STATE_URL": "redis://state:6379/2",
           "INPAINT_QUEUE": "gpu-a", "INPAINT_MODEL": "/models/sd", "INPAINT_DEVICE": "cuda:1",
           "INPAINT_DTYPE": "bfloat16", "INPAINT_CUDA_GRAPHS": "off", "INPAINT_KERNELS": "triton",
           "INPAINT_S3_ENDPOINT_URL": "http://minio:9000", "INPAINT_BUCKET": "images",
           "INPAINT_ALLOWED_BUCKETS": "images, uploads ,", "INPAINT_LOCAL_FILES_ONLY": "yes",
           "INPAINT_MAX_PIXELS": "262144", "INPAINT_MAX_STEPS": "40", "INPAINT_MAX_IMAGES": "2",
           "INPAINT_MAX_PROMPT_CHARS": "300", "INPAINT_PROGRESS_INTERVAL_S": "0.25", "INPAINT_LOG_LEVEL": "debug"}
    settings = Settings.from_env(env)
    assert settings.state_redis_url == "redis://state:6379/2" and settings.queue == "gpu-a"
    assert (settings.device, settings.dtype, settings.cuda_graphs, settings.kernels) == ("cuda:1", "bfloat16",
                                                                                         "off", "triton")
    assert settings.bucket_allowlist == {"images", "uploads"} and settings.local_files_only is True
    assert settings.limits == schema.Limits(max_pixels=262144, max_steps=40, max_images=2, max_prompt_chars=300)
    assert settings.progress_interval_s == 0.25


def test_empty_value_means_the_default():
    assert Settings.from_env({"INPAINT_QUEUE": "  ", "INPAINT_MAX_STEPS": ""}) == Settings()


def test_bucket_alone_is_the_allowlist():
    assert Settings.from_env({"INPAINT_BUCKET": "images"}).bucket_allowlist == {"images"}


@pytest.mark.parametrize("env, words", [
    ({"INPAINT_MAX_STEPS": "many"}, "INPAINT_MAX_STEPS='many': expected an integer"),
    ({"INPAINT_MAX_STEPS": "0"}, "INPAINT_MAX_STEPS=0: outside [1, inf]"),
    ({"INPAINT_PROGRESS_INTERVAL_S": "nan"}, "INPAINT_PROGRESS_INTERVAL_S"),
    ({"INPAINT_PROGRESS_INTERVAL_S": "-1"}, "INPAINT_PROGRESS_INTERVAL_S"),
    ({"INPAINT_LOCAL_FILES_ONLY": "maybe"}, "INPAINT_LOCAL_FILES_ONLY='maybe': expected true/false"),
    ({"INPAINT_CUDA_GRAPHS": "sometimes"}, "INPAINT_CUDA_GRAPHS='sometimes': expected one of auto, on, off"),
    ({"INPAINT_KERNELS": "cuda"}, "INPAINT_KERNELS"),
    ({"INPAINT_DTYPE": "int8"}, "INPAINT_DTYPE"),
    ({"INPAINT_PRESIGN_EXPIRY_S": str(8 * 24 * 3600)}, "INPAINT_PRESIGN_EXPIRY_S"),
    ({"INPAINT_SOFT_TIME_LIMIT_S": "600", "INPAINT_TIME_LIMIT_S": "600"}, "INPAINT_TIME_LIMIT_S=600: must exceed"),
    ({"INPAINT_MAX_RETRIES": "5", "INPAINT_MAX_ATTEMPTS": "5"}, "INPAINT_MAX_ATTEMPTS=5: must exceed"),
])
def test_bad_value_names_the_variable(env, words):
    with pytest.raises(ValueError) as caught:
        Settings.from_env(env)
    assert words in str(caught.value)


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().queue = "other"


def test_visibility_timeout_outlasts_the_longest_run():
    settings = Settings.from_env({"INPAINT_SOFT_TIME_LIMIT_S": "1200", "INPAINT_TIME_LIMIT_S": "1300"})
    assert settings.visibility_timeout_s > settings.time_limit_s + settings.retry_backoff_max_s


def test_redacted_hides_passwords():
    settings = Settings.from_env({"INPAINT_BROKER_URL": "redis://:s3cret@redis:6379/0",
                                  "INPAINT_STATE_URL": "rediss://user:hunter2@state:6380/1"})
    printed = repr(settings) + str(settings.redacted())
    assert "s3cret" not in printed and "hunter2" not in printed
    assert settings.redacted()["broker_url"] == "redis://:***@redis:6379/0"
    assert settings.redacted()["state_url"] == "rediss://user:***@state:6380/1"
    assert settings.broker_url == "redis://:s3cret@redis:6379/0"   # the real value is still there to connect
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"


def test_describe_lists_every_variable_once():
    table = Settings.describe()
    variables = [field.metadata["variable"] for field in dataclasses.fields(Settings)]
    assert len(set(variables)) == len(variables)
    for variable in variables + ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"]:
        assert table.count(f"`{variable}`") == 1
    for required in ("INPAINT_BROKER_URL", "INPAINT_STATE_URL", "INPAINT_QUEUE", "INPAINT_MODEL", "INPAINT_DEVICE",
                     "INPAINT_DTYPE", "INPAINT_S3_ENDPOINT_URL", "INPAINT_BUCKET", "INPAINT_CUDA_GRAPHS"):
        assert required in variables
    assert all(line.count("|") == 4 for line in table.splitlines())   # a well-formed Markdown table


def test_dtype_defaults_to_auto_and_accepts_it():
    assert Settings.from_env({}).dtype == "auto"  # the loader picks: float16 on cuda, bfloat16 on AMX CPUs, ...
    assert Settings.from_env({"INPAINT_DTYPE": "Auto"}).dtype == "auto"


def test_choices_are_stored_in_the_spelling_their_consumers_compare():
    settings = Settings.from_env({"INPAINT_CUDA_GRAPHS": "AUTO", "INPAINT_KERNELS": "Torch", "INPAINT_DTYPE": "BF16",
                                  "INPAINT_LOG_LEVEL": "debug"})
    assert (settings.cuda_graphs, settings.kernels, settings.dtype, settings.log_level) == ("auto", "torch", "bf16",
                                                                                          "DEBUG")
    assert dataclasses.replace(settings, cuda_graphs="OFF").cuda_graphs == "off"
