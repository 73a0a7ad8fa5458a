"""pipelines.models: a processor load that meets a module another thread of the same Ray
worker is importing right then is tried again; any other failure is raised at once."""

from __future__ import annotations

from pathlib import Path

import pytest

import pipelines.models.refs as refs
from pipelines.storage import Storage


def half_imported() -> Exception:
    cause = AttributeError("partially initialized module 'torch._dynamo' has no attribute 'decorators' "
                           "(most likely due to a circular import)")
    exc = ModuleNotFoundError("Could not import module 'GenerationMixin'.")
    exc.__cause__ = cause
    return exc


def test_a_half_imported_module_is_tried_again(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trol

    calls = []
    real = trol.TroLProcessor.from_pretrained

    def flaky(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            raise half_imported()
        return real(path, *args, **kwargs)

    monkeypatch.setattr(trol.TroLProcessor, "from_pretrained", flaky)
    monkeypatch.setattr(refs.time, "sleep", lambda s: None)
    monkeypatch.setattr(refs, "_processors", {})
    ref = refs.resolve_model_ref(str(tiny_model), Storage())
    processor = refs.load_processor(ref, Storage(), None)
    assert len(calls) == 2 and processor is refs.load_processor(ref, Storage(), None)


def test_other_import_errors_are_raised_at_once(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trol

    calls = []

    def broken(path, *args, **kwargs):
        calls.append(path)
        raise ImportError("No module named 'sentencepiece'")

    monkeypatch.setattr(trol.TroLProcessor, "from_pretrained", broken)
    monkeypatch.setattr(refs, "_processors", {})
    with pytest.raises(ImportError, match="sentencepiece"):
        refs.load_processor(refs.resolve_model_ref(str(tiny_model), Storage()), Storage(), None)
    assert len(calls) == 1
