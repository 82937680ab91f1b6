"""A worker re-hashes its L2 beside the L1 build (workers/boot.py build_verified): nothing is handed out before both
end, a repair means a second build, a corrupt L2 that could not be repaired fails the boot with its own error.
The boot with real bit rot on disk, end to end, is tests/test_reliability_boot.py's."""

from __future__ import annotations

import threading

import pytest

from workers.boot import build_verified


class Calls:
    def __init__(self, repaired=(), error: Exception | None = None, build_error: Exception | None = None):
        self.builds, self.repaired = 0, list(repaired)
        self.started, self.verified = threading.Event(), threading.Event()
        self.error, self.build_error, self.overlapped = error, build_error, False

    def build(self):
        self.builds += 1
        self.started.set()
        # the check runs beside the build: it sees the build start and ends while the build is still going (run one
        # after the other, either side would wait out its timeout and `overlapped` stays false)
        self.overlapped = self.overlapped or self.verified.wait(timeout=10)
        if self.build_error is not None and self.builds == 1:
            raise self.build_error
        return f"pipeline-{self.builds}"

    def verify(self):
        if self.started.wait(timeout=10):
            self.verified.set()
        if self.error is not None:
            raise self.error
        return self.repaired


def test_clean_l2_builds_once_while_the_check_runs_beside_it():
    calls = Calls()
    assert build_verified(calls.build, calls.verify) == "pipeline-1"
    assert calls.builds == 1 and calls.overlapped


def test_a_repaired_file_means_the_build_is_done_again():
    calls = Calls(repaired=["unet/diffusion_pytorch_model.safetensors"])
    assert build_verified(calls.build, calls.verify) == "pipeline-2"
    assert calls.builds == 2


def test_l2_still_corrupt_fails_the_boot_with_the_checks_error():
    calls = Calls(error=ValueError("sdxl/base/v1 is still corrupt after a fresh fetch"))
    with pytest.raises(ValueError, match="still corrupt"):
        build_verified(calls.build, calls.verify)


def test_the_checks_error_wins_over_what_the_build_made_of_corrupt_bytes():
    calls = Calls(error=ValueError("corrupt: unet"), build_error=RuntimeError("header too large"))
    with pytest.raises(ValueError, match="corrupt: unet"):
        build_verified(calls.build, calls.verify)


def test_a_build_that_read_files_being_repaired_is_done_again():
    calls = Calls(repaired=["text_encoder/model.safetensors"], build_error=OSError("file vanished"))
    assert build_verified(calls.build, calls.verify) == "pipeline-2"


def test_a_build_error_on_a_clean_l2_is_the_boots_error():
    calls = Calls(build_error=RuntimeError("size mismatch for conv_in.weight"))
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_verified(calls.build, calls.verify)
    assert calls.builds == 1
