"""peftlab.model.head_files: a module peftlab adds to a model goes beside the adapter as exactly two files (weights
as safetensors, config as JSON) and comes back rebuilt from its config, with its weights, on the model instance."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from torch import nn

from peftlab.model.head_files import load_module_files, save_module_files


class Scaled(nn.Module):
    def __init__(self, width: int, scale: float):
        super().__init__()
        self.proj, self.scale = nn.Linear(width, 2), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.proj(x)


def test_a_module_and_its_config_round_trip_beside_the_adapter(tmp_path):
    torch.manual_seed(0)
    module = Scaled(3, 0.5)
    save_module_files(module, tmp_path, weights_file="m.safetensors", config_file="m.json",
                      config={"width": 3, "scale": 0.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]  # no temporaries left
    assert json.loads((tmp_path / "m.json").read_text()) == {"width": 3, "scale": 0.5}
    assert set(load_file(str(tmp_path / "m.safetensors"))) == {"proj.weight", "proj.bias"}

    model = nn.Sequential(nn.Linear(3, 3))
    got = load_module_files(model, tmp_path, attr="extra", weights_file="m.safetensors", config_file="m.json",
                            build=lambda cfg: Scaled(cfg["width"], cfg["scale"]), device=torch.device("cpu"))
    x = torch.randn(4, 3)
    assert model.extra is got and not hasattr(nn.Sequential, "extra")  # registered on this instance only
    assert got.scale == 0.5 and torch.equal(got(x), module(x))
