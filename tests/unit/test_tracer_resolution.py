"""One tracer resolution for every entry point, and trace errors that point at the user's code."""
from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest
import torch
from torch import nn

import branchify as bf
from branchify.registry import _PLUGINS, Plugin, register_plugin
from branchify.surgery.default_split import default_splits
from branchify.surgery.tracing import resolve_tracer

USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn


    class Gatey(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
                return x * 2
            return x


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
            self.gate = Gatey()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.gate(self.body(x)))
''')


def _import_user_module(folder, name):
    """Import USER_MODULE from ``folder`` as a user's project file would be."""
    folder.mkdir(parents=True)
    path = folder / f"{name}.py"
    path.write_text(USER_MODULE)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module, path


@pytest.mark.parametrize("folder", ["branchify", "torch", "site/branchify/src"])
def test_trace_error_points_at_user_code_in_a_folder_named_like_a_library(tmp_path, folder):
    # A checkout of this repository is a folder named ``branchify``; users' code lives in such
    # folders too. The failing line must still be the user's, not a frame inside torch.fx.
    module, path = _import_user_module(tmp_path / folder, f"user_model_{folder.replace('/', '_')}")
    with pytest.raises(bf.TraceError) as err:
        bf.branchify(module.Net(), bf.Spec(splits=["fc"], fanout=[2]))
    msg = str(err.value)
    assert f"at {path.resolve()}:" in msg or f"at {path}:" in msg
    assert "if x.sum() > 0" in msg


class _Opaque(nn.Module):
    """Traceable only as a leaf: its forward branches on a tensor value."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else self.lin(-x)


class _PluginNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(4)])
        self.opaque = _Opaque()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.opaque(self.blocks(x)))


@pytest.fixture
def opaque_plugin():
    plugin = register_plugin(Plugin("test-opaque", matches=lambda m: isinstance(m, _PluginNet),
                                    tracer=lambda m: bf.Tracer(leaf_modules=[_Opaque])))
    yield plugin
    _PLUGINS[:] = [p for p in _PLUGINS if p.name != plugin.name]


def test_every_entry_point_uses_the_plugins_tracer(opaque_plugin):
    net = _PluginNet()
    assert isinstance(resolve_tracer(net), bf.Tracer) and resolve_tracer(net).leaf_types == (_Opaque,)
    gm = bf.trace(net)  # failed before: bf.trace used plain torch.fx, unlike branchify()
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"][-2:] == ["opaque", "fc"]
    x = torch.randn(2, 4)
    torch.testing.assert_close(gm(x), net(x))
    points = bf.split_points(net)
    assert "opaque" in points and "opaque.lin" not in points  # a leaf cannot be cut inside
    assert default_splits(net).body == "blocks"
    bm = bf.branchify(net, bf.Spec(splits=["blocks.2"], fanout=[2]))
    torch.testing.assert_close(bm(x).logits[0], net(x))


def test_an_explicit_tracer_wins_over_the_plugin(opaque_plugin):
    explicit = bf.Tracer()
    assert resolve_tracer(_PluginNet(), explicit) is explicit
    with pytest.raises(bf.TraceError, match="module 'opaque'"):
        bf.trace(_PluginNet(), explicit)
