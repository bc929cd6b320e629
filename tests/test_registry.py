"""The registry: decorator registration, lazy entries, entry points, errors that help."""

from __future__ import annotations

import abc

import pytest

from harness.registry import Registry, RegistryError


class Base(abc.ABC):
    @abc.abstractmethod
    def run(self): ...


def make() -> Registry:
    return Registry("widget", base_cls=Base, entry_point_group="harness.test_widgets")


def test_register_and_get():
    reg = make()

    @reg.register("alpha")
    class Alpha(Base):
        def run(self):
            return 1

    assert reg.get("alpha") is Alpha
    assert "alpha" in reg.names()
    assert reg.origin("alpha").endswith(f":{Alpha.run.__code__.co_firstlineno - 2}") or "test_registry.py" in reg.origin("alpha")


def test_unknown_name_suggests_and_lists():
    reg = make()
    for n in ("pointcontrast", "csc"):
        reg.register(n, type(n, (Base,), {"run": lambda self: 0}))
    with pytest.raises(RegistryError) as e:
        reg.get("pointcontrst")
    msg = str(e.value)
    assert "Unknown widget 'pointcontrst'" in msg
    assert "Did you mean: pointcontrast?" in msg
    assert "Known: csc, pointcontrast." in msg


def test_duplicate_names_both_sources():
    reg = make()

    class A(Base):
        def run(self):
            return 0

    class B(Base):
        def run(self):
            return 1

    reg.register("x", A)
    reg.register("x", A)  # the same object again is fine
    with pytest.raises(RegistryError) as e:
        reg.register("x", B)
    msg = str(e.value)
    assert "duplicate widget name 'x'" in msg and msg.count("test_registry.py") == 2


def test_refuses_class_without_interface():
    reg = make()

    class NotABase:
        pass

    class Abstract(Base):
        pass

    with pytest.raises(RegistryError, match="must be a subclass of"):
        reg.register("a", NotABase)
    with pytest.raises(RegistryError, match="does not implement run"):
        reg.register("b", Abstract)


def test_lazy_entry_is_imported_on_get_only(tmp_path, monkeypatch):
    pkg = tmp_path / "lazy_pkg_for_test"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(
        "from tests.test_registry import Base\nclass W(Base):\n    def run(self):\n        return 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import sys

    reg = make()
    reg.register("lazy", "lazy_pkg_for_test.mod:W")
    assert "lazy_pkg_for_test.mod" not in sys.modules
    assert "lazy" in reg.names()
    assert reg.get("lazy")().run() == 7


def test_entry_point_plugins(monkeypatch):
    from importlib import metadata

    ep = metadata.EntryPoint(name="plug", value="tests.test_registry:PluginWidget", group="harness.test_widgets")
    monkeypatch.setattr(metadata, "entry_points", lambda group=None: [ep] if group == "harness.test_widgets" else [])
    reg = make()
    assert reg.names() == ["plug"]
    assert reg.get("plug") is PluginWidget
    assert "entry point harness.test_widgets:plug" in reg.origin("plug")


class PluginWidget(Base):
    def run(self):
        return "plugin"


def test_builtin_registries_import_no_torch():
    import subprocess
    import sys

    code = ("import sys, harness.registry as r; r.METHODS.names(); r.TASKS.names(); "
            "import harness.config, harness.sweep; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_harness_methods_lists_a_broken_plugin_with_its_error_and_the_rest():
    from harness.registry import METHODS
    from tests._sweeps import cli

    METHODS.register("broken_for_test", "no_such_module_for_test:Method")
    try:
        rc, out, _ = cli("methods")
    finally:
        METHODS._entries.pop("broken_for_test")
    assert rc == 1
    assert "broken_for_test" in out and "could not be imported" in out and "no_such_module_for_test" in out, out
    assert "image_guided" in out and "Single-scan" in out, out
