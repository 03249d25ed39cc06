"""A LoRA is checked against the model before it is loaded: a LoRA from another model is one
message listing the keys and shapes that differ, not an error inside peft."""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_lora import trained_like

from conftest import REPO
from klein_sweep.lora.io import save_lora
from klein_sweep.lora.compat import LoraMismatchError, check_lora_fits, load_checked_lora
from klein_sweep.lora.export import export_comfyui
from klein_sweep.models.tiny import build_tiny_pipeline


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory):
    pipe = build_tiny_pipeline(seed=0)
    trained_like(pipe, rank=4, alpha=4.0, preset="all_linear")
    return save_lora(pipe.transformer, tmp_path_factory.mktemp("lora"))


def lora_check(*args):
    return subprocess.run([sys.executable, "-m", "klein_sweep.lora.check", *args], capture_output=True, text=True,
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_a_lora_fits_its_own_model_in_both_layouts(tiny_lora):
    transformer = build_tiny_pipeline(seed=3).transformer  # other weights, same shapes: fits
    assert check_lora_fits(tiny_lora, transformer, "tiny")
    assert check_lora_fits(export_comfyui(tiny_lora), transformer, "tiny")


def test_a_lora_from_another_model_lists_its_mismatches_and_loads_nothing(tiny_lora):
    from diffusers import Flux2KleinPipeline

    from klein_sweep.models.loading import MINI_PIPELINE_DIR

    mini = Flux2KleinPipeline.from_pretrained(MINI_PIPELINE_DIR, local_files_only=True)
    with pytest.raises(LoraMismatchError) as err:
        load_checked_lora(mini, tiny_lora, "mini")
    message = str(err.value)
    assert "does not fit model mini" in message
    assert "28 problems in 14 adapted modules" in message  # every module: A's in and B's out
    assert "transformer_blocks.0.attn.add_k_proj.lora_A (4, 32): in_features 32, the model's layer takes 128" in message
    assert not getattr(mini.transformer, "_hf_peft_config_loaded", False)  # nothing was loaded


def test_the_check_command(tiny_lora, capsys):
    ok = lora_check(str(tiny_lora), "model=tiny")  # as a user runs it
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "fits tiny" in ok.stdout and "rank 4" in ok.stdout
    # the refusals through the command's own main, in this process (each command imports ~8 s of libraries)
    from klein_sweep.lora.check import main

    for model in ("mini", "flux2_klein_base_9b"):  # the 9B is checked against its architecture, no weights
        assert main([str(tiny_lora), f"model={model}"]) == 2
        err = capsys.readouterr().err
        assert f"does not fit model {model}" in err and "Traceback" not in err
    assert main(["/nope.safetensors", "model=tiny"]) == 2
    assert "/nope.safetensors does not exist" in capsys.readouterr().err


def test_a_checked_lora_keeps_its_alpha(tmp_path):
    """alpha != rank: loaded through the check it acts exactly as diffusers' own loader reads the
    file (a bare state dict would fall back to alpha = rank: half this LoRA's strength)."""
    import torch

    trained = build_tiny_pipeline(seed=0)
    trained_like(trained, rank=4, alpha=8.0, preset="attn")
    path = save_lora(trained.transformer, tmp_path)

    checked, direct = build_tiny_pipeline(seed=1), build_tiny_pipeline(seed=1)
    load_checked_lora(checked, path, "tiny", adapter_name="checkpoint")
    direct.load_lora_weights(str(path), adapter_name="checkpoint")
    scaling = {m.scaling["checkpoint"] for m in checked.transformer.modules() if hasattr(m, "scaling") and "checkpoint" in m.scaling}
    assert scaling == {2.0}  # alpha / rank

    torch.manual_seed(0)
    x = torch.randn(1, 16, checked.transformer.config.in_channels)
    text = torch.randn(1, 8, checked.transformer.config.joint_attention_dim)
    ids = torch.zeros(16, 4), torch.zeros(8, 4)
    outs = [p.transformer(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([0.5]),
                          img_ids=ids[0], txt_ids=ids[1], return_dict=False)[0] for p in (checked, direct)]
    torch.testing.assert_close(outs[0], outs[1])
