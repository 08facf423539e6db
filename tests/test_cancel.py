import pytest

from db import Store
from orchestrator.jobs import cancel
from orchestrator.stopper import CancelStopper
from common.errors import SlimrayError


def test_cancel_flags_the_job_and_the_driver_stopper_sees_it(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    store = Store(url)
    store.create_job("j1", "j", {}, teacher="t", dataset="d")
    store.set_job_status("j1", "running")
    stopper = CancelStopper(url, "j1", every_s=0)
    assert stopper.stop_all() is False and stopper("trial", {}) is False
    cancel("j1", store=store)
    assert store.get_job("j1")["status"] == "cancelled"
    assert stopper.stop_all() is True and stopper("trial", {}) is True
    with pytest.raises(SlimrayError, match="already cancelled"):
        cancel("j1", store=store)
