"""Suite-wide test policy: tests marked `bwrap` need bubblewrap (the code sandbox, avsd_megatron/verify/sandbox.py).

On a machine without `bwrap` on PATH they are skipped with the reason and the install command, so that a fresh
checkout's suite passes; with CI=true or AVSD_REQUIRE_SANDBOX=1 in the environment a missing bwrap fails each of
them instead, so that CI cannot go green by skipping the sandbox. Tested in tests/test_conftest.py.
"""

import os
import shutil

import pytest

INSTALL = ("install it: `apt-get update && apt-get install -y bubblewrap` as root on Debian/Ubuntu "
           "(`make bwrap` does that), `dnf install bubblewrap` on Fedora")

REQUIRE_SANDBOX_VARIABLES = ("CI", "AVSD_REQUIRE_SANDBOX")
"""Either one set to true/1/yes (any case) turns a missing bwrap from a skip into an error."""


def sandbox_required() -> str | None:
    """The name of the environment variable that requires the sandbox, or None."""
    for name in REQUIRE_SANDBOX_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes"):
            return name
    return None


_RUNNING = {"bwrap_marked": True}
"""Whether the test being set up or run carries the `bwrap` marker (read by the guard below)."""


def pytest_configure(config: pytest.Config) -> None:
    """Guard: a test that finds bubblewrap (the sandbox's `_find_bwrap` succeeds) without the `bwrap` marker fails,
    so that on a machine with bwrap (CI) every test that needs it is known to be marked, and on one without it is
    skipped instead of failing. Tests of the missing-bwrap error are unaffected (the lookup fails before the guard).
    Sandboxes started in a subprocess are not seen."""
    del config
    from avsd_megatron.verify import sandbox

    find = sandbox._find_bwrap

    def guarded(path: str | None) -> str:
        found = find(path)
        if not _RUNNING["bwrap_marked"]:
            raise RuntimeError("this test starts bubblewrap but is not marked @pytest.mark.bwrap: without bwrap it "
                               "would fail instead of being skipped (tests/conftest.py)")
        return found

    sandbox._find_bwrap = guarded


@pytest.hookimpl(tryfirst=True)  # before fixture set-up: a module-scoped Sandbox fixture would raise first
def pytest_runtest_setup(item: pytest.Item) -> None:
    _RUNNING["bwrap_marked"] = item.get_closest_marker("bwrap") is not None
    if item.get_closest_marker("bwrap") is None or shutil.which("bwrap") is not None:
        return
    required_by = sandbox_required()
    if required_by is not None:
        pytest.fail(f"bubblewrap (`bwrap`) is not on PATH and {required_by}={os.environ[required_by]} requires the "
                    f"sandbox tests; {INSTALL}", pytrace=False)
    pytest.skip(f"needs bubblewrap (`bwrap` is not on PATH); {INSTALL}; AVSD_REQUIRE_SANDBOX=1 fails instead")
