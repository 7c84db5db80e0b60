"""Device selection ($FLATNESS_DEVICE) and CPU-portable artifacts."""

from collections import OrderedDict

import pytest
import torch

from flatness._device import DEVICE_ENV, default_device, resolve_device
from flatness.results import ResultStore


def test_default_device_follows_the_environment(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert default_device() == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")
    assert resolve_device("meta") == torch.device("meta")  # an explicit device wins


def test_default_device_rejects_bad_names(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "gpu0")
    with pytest.raises(ValueError, match="FLATNESS_DEVICE='gpu0' is not a device name"):
        default_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv(DEVICE_ENV, "cuda")
        with pytest.raises(ValueError, match="no CUDA device is visible"):
            default_device()


def test_artifacts_are_saved_on_the_cpu(tmp_path):
    store = ResultStore("dev", root=tmp_path)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    sd = model.to("meta").state_dict()  # a non-CPU device every machine has (no data: .cpu() of meta raises)
    with pytest.raises(NotImplementedError):  # torch.save alone would store meta tensors; the move to CPU raises
        store.save_artifact("meta", {"state_dict": sd})
    cpu_sd = torch.nn.Linear(3, 2).state_dict()
    obj = {"state_dict": cpu_sd, "xs": [torch.ones(2), (torch.zeros(1), 3)], "status": "converged"}
    store.save_artifact("cpu", obj)
    back = store.load_artifact("cpu")
    assert isinstance(back["state_dict"], OrderedDict) and hasattr(back["state_dict"], "_metadata")
    assert torch.equal(back["state_dict"]["weight"], cpu_sd["weight"]) and back["xs"][1][1] == 3
