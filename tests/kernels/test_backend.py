import pytest

from infinillm import ValidationError
from infinillm.kernels import backend


def test_cpu_defaults_to_torch(monkeypatch):
    monkeypatch.delenv("INFINILLM_KERNELS", raising=False)
    assert backend.resolve_backend("cpu") == "torch"


def test_cuda_prefers_triton_when_installed(monkeypatch):
    monkeypatch.delenv("INFINILLM_KERNELS", raising=False)
    expected = "triton" if backend.triton_available() else "torch"
    assert backend.resolve_backend("cuda") == expected


def test_environment_forces_torch(monkeypatch):
    monkeypatch.setenv("INFINILLM_KERNELS", "torch")
    assert backend.resolve_backend("cuda") == "torch"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if not backend.triton_available():
        pytest.skip("triton is not installed here")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValidationError, match=r"backend='triton' is invalid: runs on cuda tensors, or on cpu tensors with TRITON_INTERPRET=1 \(these are cpu tensors and TRITON_INTERPRET is 0\)"):
        backend.resolve_backend("cpu", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.resolve_backend("cpu", "triton") == "triton"


def test_unknown_backend_is_refused():
    with pytest.raises(ValidationError, match=r"backend='cuda' is invalid: must be one of 'auto', 'torch', 'triton'"):
        backend.resolve_backend("cpu", "cuda")
