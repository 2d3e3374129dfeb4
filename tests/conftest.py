import os

import pytest
import torch

from slimfit import _extension


def pytest_report_header(config):
    status = _extension.STATUS
    return f"slimfit compiled extension: {'loaded' if status.loaded else 'NOT loaded: ' + str(status.reason)}"


def pytest_configure(config):
    # CI sets this so a broken build fails loudly instead of skipping every kernel test.
    if os.environ.get("SLIMFIT_REQUIRE_EXTENSION") == "1" and not _extension.STATUS.loaded:
        raise RuntimeError(f"SLIMFIT_REQUIRE_EXTENSION=1 but the extension is not loaded: {_extension.STATUS.reason}")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy machine their spinning costs several times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
