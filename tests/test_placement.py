"""The memory a real sweep needs on its accelerator, stage by stage, checked on the CPU: the real
staging code runs a tiny sweep against a placement spy (an accelerator in bookkeeping only), and
what it would hold at each stage is priced at the real 9B and 4B sizes, built from their configs
on the meta device. Each stage must fit in transformer + VAE + LoRA and optimizer state (+ one
metric network while measuring): the budget the README's 24 GB and 16 GB recipes rest on."""

from __future__ import annotations

import pytest

from sweep_helpers import compose_plan, sweep_args

GIB = 2**30
BF16, FP32 = 2, 4


def real_sizes(size: str) -> dict[str, int]:
    """Bytes of each part at the real size: weights in bf16, metric networks in fp32 (DINOv2-base,
    the larger of the real defaults), LoRA rank 16 on the attention with its gradient and AdamW's
    two moments in fp32."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Dinov2Config, Dinov2Model, Qwen3Config, Qwen3ForCausalLM

    from klein_sweep.lora.adapters import inject_lora
    from klein_sweep.models.registry import KLEIN_TEXT_ENCODER_CONFIGS, klein_transformer_config

    def n(module):
        return sum(p.numel() for p in module.parameters())

    with init_empty_weights():
        transformer = Flux2Transformer2DModel(**klein_transformer_config(size))
        text = Qwen3ForCausalLM(Qwen3Config(**KLEIN_TEXT_ENCODER_CONFIGS[size]))
        vae = AutoencoderKLFlux2()
        dinov2 = Dinov2Model(Dinov2Config())
    text_params = n(text.model)  # the output head is dropped before encoding (data/encoding.py)
    base = n(transformer)
    inject_lora(transformer, rank=16, alpha=16, preset="attn")
    lora = n(transformer) - base
    return {"transformer": base * BF16, "distilled_transformer": base * BF16, "text_encoder": text_params * BF16,
            "vae": n(vae) * BF16, "feature_network": n(dinov2) * FP32, "identity_network": n(dinov2) * FP32,
            "lora_and_optimizer": lora * 4 * FP32}


@pytest.fixture(scope="module")
def stages(tmp_path_factory, request):
    """{stage: [parts on the accelerator at each moment]} of a tiny sweep with screening, the
    distilled evaluation and metric networks, run through the real staging code."""
    from klein_sweep.models import placement
    from klein_sweep.models.placement import PlacementSpy
    from klein_sweep.sweep.worker import run_sweep

    tmp = tmp_path_factory.mktemp("placement")
    spy = PlacementSpy("cuda")
    patch = pytest.MonkeyPatch()
    patch.setattr(placement, "placement_for", lambda device: spy)
    try:
        plan = compose_plan(sweep_args("lr_vs_steps_distilled", tmp, "tracking=none", "sweep.workers=1",
                                       f"sweep.output_dir={tmp / 'sweep'}", "eval.screening_seeds=[0,1]", "eval.seeds=[0,1,2]"))
        run_sweep(plan, progress=False)
    finally:
        patch.undo()
    out: dict[str, list[tuple[str, ...]]] = {}
    for record in spy.stages:
        out.setdefault(record.stage, []).extend(p for p in record.part_sets if p not in out.get(record.stage, []))
    return out


def test_every_stage_of_a_sweep_is_staged(stages):
    assert {"encode", "train", "sample", "metrics", "distilled sample", "distilled metrics"} <= set(stages)
    # Encoding: the text encoder and the VAE only; the transformer comes after the text encoder left.
    assert all(set(parts) <= {"text_encoder", "vae"} for parts in stages["encode"])
    assert any("text_encoder" in parts for parts in stages["encode"])
    assert not any("text_encoder" in parts for name, sets in stages.items() if name != "encode" for parts in sets)
    # Metric networks one at a time, and only while measuring.
    for name, sets in stages.items():
        for parts in sets:
            assert not {"feature_network", "identity_network"} <= set(parts), (name, parts)
            if "metrics" not in name:
                assert not {"feature_network", "identity_network"} & set(parts), (name, parts)
    # The distilled transformer samples alone: the base waits on the host.
    assert all("transformer" not in parts for parts in stages["distilled sample"] if "distilled_transformer" in parts)


@pytest.mark.parametrize("size", ["9b", "4b"])
def test_each_stage_fits_transformer_vae_lora_and_one_metric_network(stages, size, capsys):
    price = real_sizes(size)
    budget = price["transformer"] + price["vae"] + price["lora_and_optimizer"] + price["feature_network"]
    peaks = {}
    for name, sets in stages.items():
        # The LoRA and its optimizer state stay on the accelerator from the first training step.
        extra = 0 if name == "encode" else price["lora_and_optimizer"]
        peaks[name] = max(sum(price[p] for p in parts) for parts in sets) + extra
        assert peaks[name] <= budget, (size, name, sets)
    with capsys.disabled():
        print(f"\n{size} weights on the accelerator by stage (GiB): "
              + ", ".join(f"{k} {v / GIB:.1f}" for k, v in peaks.items()) + f"; budget {budget / GIB:.1f}")
    # The text encoder alone is the encode stage's peak, and it is below the training stage's.
    assert peaks["encode"] < peaks["train"]
