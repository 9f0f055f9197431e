import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from tests.fixtures import cli

# Table 7 of the paper and the official per-size scripts (Atten4Vis/CAE project/CAEv2/scripts).
EXPECTED = {
    "cae2_vit_tiny": dict(embed_dim=192, depth=12, num_heads=12, regressor_depth=1, regressor_dim=96,
                          num_masked=30, drop_path=0.1),
    "cae2_vit_small": dict(embed_dim=384, depth=12, num_heads=12, regressor_depth=1, regressor_dim=384,
                           num_masked=49, drop_path=0.1),
    "cae2_vit_base": dict(embed_dim=768, depth=12, num_heads=12, regressor_depth=4, regressor_dim=768,
                          num_masked=98, drop_path=0.1),
    "cae2_vit_large": dict(embed_dim=1024, depth=24, num_heads=16, regressor_depth=4, regressor_dim=1024,
                           num_masked=118, drop_path=0.2),
}
TABLE7 = dict(lr=1.5e-3, lr_batch_ref=2048, min_lr=1e-5, betas=[0.9, 0.98], weight_decay=0.05, warmup_epochs=10,
              epochs=300, clip_grad=3.0)
VIEWS = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0, flip_prob=0.5, crop_scale=[0.4, 1.0])


def test_models_json_agrees_with_table7():
    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    records = {r["name"]: r for r in json.loads(result.output)}
    assert set(EXPECTED) <= set(records)
    for name, expected in EXPECTED.items():
        model = records[name]["model"]
        assert {k: model[k] for k in expected} == expected, name
        assert model["img_size"] == 224 and model["patch_size"] == 16 and model["layer_scale_init"] == 0.1
        assert {k: records[name]["train"][k] for k in TABLE7} == TABLE7, name
        assert {k: records[name]["views"][k] for k in VIEWS} == VIEWS, name
        assert model["mask_ratio"] == round(expected["num_masked"] / 196, 4)
    ratios = [records[n]["model"]["mask_ratio"] for n in EXPECTED]
    assert [round(r, 2) for r in ratios] == [0.15, 0.25, 0.5, 0.6]
    assert records["cae2_vit_large"]["model"]["target_dim"] == 768
    # parameter counts: encoders match the standard ViT sizes
    enc = {n: records[n]["params"]["encoder"] / 1e6 for n in EXPECTED}
    assert 5.4 < enc["cae2_vit_tiny"] < 5.8 and 21 < enc["cae2_vit_small"] < 22.2
    assert 85 < enc["cae2_vit_base"] < 87 and 302 < enc["cae2_vit_large"] < 305


@pytest.mark.slow
def test_console_script_version_and_help():
    script = Path(sys.executable).with_name("cae2")  # the console script pip installed
    out = subprocess.run([str(script) if script.exists() else "cae2", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("cae2 ")
    res = cli("--help")
    assert res.returncode == 0 and "models" in res.stdout and "--quiet" in res.stdout
