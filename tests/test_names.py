"""Names that become paths, Redis keys and queue names pass one strict pattern."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachemgr.names import (
    ComponentRef,
    InvalidName,
    Release,
    queue_for,
    release_of_queue,
    validate_name,
    validate_relpath,
    version_sort_key,
)


@pytest.mark.parametrize("name", ["nano-banana", "v1.0.0", "sdxl_base", "a", "x" * 64])
def test_plain_names_are_accepted(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "..", "../etc", "a/b", "/abs", "A", "nano banana", "-x", "x-", "a..b", "x" * 65, "nаno",  # Cyrillic а
     "ｎano", "a\x00b", "a\\b", ".hidden"],
)
def test_dangerous_names_are_refused_with_a_message_saying_what_is_allowed(name):
    with pytest.raises(InvalidName, match="lower-case ASCII"):
        validate_name(name, "model")


@given(st.text(max_size=80))
def test_anything_accepted_is_a_single_safe_path_segment(text):
    try:
        validate_name(text)
    except InvalidName:
        return
    assert "/" not in text and "\\" not in text and ".." not in text and text.isascii() and text == text.lower()


@pytest.mark.parametrize("path", ["unet/diffusion_pytorch_model.safetensors", "model_index.json", "a/b/c.txt"])
def test_relative_file_paths_inside_a_version_are_accepted(path):
    assert validate_relpath(path) == path


@pytest.mark.parametrize("path", ["../x.json", "/etc/passwd", "a/../../b", "a//b", "./a", "a\\b", "", "a/ b"])
def test_paths_that_could_escape_are_refused(path):
    with pytest.raises(InvalidName):
        validate_relpath(path)


def test_release_round_trips_and_derives_one_queue_name():
    text = "nano-banana@base-v1.0.0+lora-v2.3.1"
    release = Release.parse(text)
    assert str(release) == text
    assert release.version_of("lora") == "v2.3.1"
    assert release.base == ComponentRef("nano-banana", "base", "v1.0.0")
    assert queue_for(text) == queue_for(release) == release.queue
    assert release_of_queue(queue_for(release)) == release
    assert release_of_queue("celery") is None


@pytest.mark.parametrize(
    "text", ["nano-banana", "nano-banana@", "nano-banana@lora-v1", "x@base-v1+base-v2", "../x@base-v1",
             "a@b@base-v1", "nano-banana@base-../../x", "nano-banana@base"],
)
def test_malformed_releases_are_refused(text):
    with pytest.raises(InvalidName):
        Release.parse(text)


def test_versions_sort_naturally():
    assert sorted(["v1.10.0", "v1.9.0", "v1.2.0", "v2.0.0"], key=version_sort_key) == [
        "v1.2.0", "v1.9.0", "v1.10.0", "v2.0.0"]
