"""Checkpoint evaluation: sample the fixed prompts x seeds with the LoRA, compare with the
reference (training) images and with the base model's samples, return the metric row.

The base model's samples are computed once (before any LoRA exists) and shared by every trial
of a sweep that uses the same model, data and eval settings; later runs read them from disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from klein_sweep.config import Settings
from klein_sweep.evaluation import metrics as M
from klein_sweep.evaluation.base_samples import BaseSampleCache
from klein_sweep.evaluation.network_choice import resolve_networks
from klein_sweep.evaluation.networks import build_feature_network
from klein_sweep.evaluation.sampling import SampleRecipe, generate, labelled_grid
from klein_sweep.record import BaseStats


def eval_prompts(settings: Settings) -> tuple[list[str], list[str]]:
    """(trigger prompts with the trigger filled in, prior prompts)."""
    trigger = settings.data.trigger
    return [p.replace("[trigger]", trigger) for p in settings.eval.trigger_prompts], list(settings.eval.prior_prompts)


def sample_recipe(settings: Settings) -> SampleRecipe:
    e, m = settings.eval, settings.model
    return SampleRecipe(
        steps=e.sample_steps or m.sample_steps,
        guidance_scale=m.guidance_scale if e.guidance_scale is None else e.guidance_scale,
        resolution=e.resolution or settings.data.resolution,
        batch_size=e.batch_size,
    )


def rows_in(seeds: list[int], pairs: list[tuple[int, int]]) -> list[int]:
    """Rows of (prompt index, seed) pairs in samples laid out prompt-major over `seeds`."""
    column = {seed: j for j, seed in enumerate(seeds)}
    return [p * len(seeds) + column[seed] for p, seed in pairs]


@dataclass
class PromptSet:
    embeds: torch.Tensor  # (N, L, D): each prompt repeated once per seed
    seeds: list[int]


@dataclass
class DrawnSamples:
    """One evaluation's samples: images (P x len(seeds), 3, R, R) by prompt set, prompt-major,
    with the recipe that drew them. A full evaluation of the same LoRA reuses the ones its own
    seeds and recipe share (the screening's first seed is the full recipe's first seed)."""

    recipe: SampleRecipe
    seeds: list[int]
    images: dict[str, torch.Tensor]  # "trigger", "prior"


@dataclass
class BaseReference:
    """What the base model (no LoRA) does on the eval prompts: the yardstick for underfit,
    prior preservation and leak."""

    trigger_images: torch.Tensor
    prior_images: torch.Tensor
    noise_images: torch.Tensor  # the prior prompts at seeds + 1000: the KID noise floor's other draw
    id_sim: float
    leak: float
    degenerate: float  # fraction of base samples that are flat, noise or non-finite
    prior_kid_noise: float  # KID of the base against itself with other seeds: the noise floor
    reference_id_sim: float  # the training images vs each other: the identity scale's far end
    reference_sample_sim: float  # the training images' own variety (mean pairwise similarity)
    kid: float  # the base's trigger samples vs the training images
    prior_reference_kid: float  # the base's prior samples vs the training images

    def stats(self) -> BaseStats:
        """The numbers the collapse rules and the stored record need (no images)."""
        return BaseStats(id_sim=self.id_sim, leak=self.leak, degenerate=self.degenerate, prior_kid_noise=self.prior_kid_noise,
                         reference_id_sim=self.reference_id_sim, reference_sample_sim=self.reference_sample_sim,
                         kid=self.kid, prior_reference_kid=self.prior_reference_kid)


class CheckpointEvaluator:
    def __init__(self, settings: Settings, pipe, encoded, examples, placement=None, stage_prefix: str = ""):
        from klein_sweep.data.folder import load_image
        from klein_sweep.models.placement import Placement

        self.settings = settings
        self.pipe = pipe
        # The metric networks visit the accelerator while they measure, one at a time.
        self.placement = placement or Placement(pipe.transformer.device.type)
        self.sample_stage, self.metrics_stage = f"{stage_prefix}sample", f"{stage_prefix}metrics"
        self.recipe = sample_recipe(settings)
        e = settings.eval
        feature, identity = resolve_networks(e, settings.model.kind)
        self.net = build_feature_network(feature, e.network_paths)
        self.id_net = self.net if identity is None else build_feature_network(identity, e.network_paths)
        self.clip = None
        if e.prompt_fidelity:
            from klein_sweep.evaluation.real_networks import ClipFeatures

            self.clip = self.id_net if isinstance(self.id_net, ClipFeatures) else build_feature_network("clip", e.network_paths)
        trigger, prior = eval_prompts(settings)
        seeds = [int(s) for s in settings.eval.seeds]
        self.prior_prompts = [p for p in prior for _ in seeds]  # in the order the samples come
        self.grid_rows = {"trigger": trigger, "prior": prior}  # the sample grids' row labels
        self.trigger = self._prompt_set(encoded, trigger, seeds)
        self.prior = self._prompt_set(encoded, prior, seeds)
        self.negative = encoded.empty_prompt_embeds
        self.reference = torch.stack([(load_image(ex.image_path, self.recipe.resolution, settings.data.background) + 1) / 2 for ex in examples])
        self.n_seeds = len(seeds)
        self.seeds = seeds
        self.base: BaseReference | None = None
        self.drawn: DrawnSamples | None = None  # the last evaluation's samples
        # Features of the sets every checkpoint is measured against, computed once (compute_base)
        self._reference_embedded: torch.Tensor | None = None
        self._reference_identities: torch.Tensor | None = None
        self._base_prior_features: torch.Tensor | None = None

    @staticmethod
    def _prompt_set(encoded, prompts: list[str], seeds: list[int]) -> PromptSet:
        embeds = torch.stack([encoded.extra_prompt_embeds[p] for p in prompts for _ in seeds])
        return PromptSet(embeds=embeds, seeds=[s for _ in prompts for s in seeds])

    def _sample(self, prompt_set: PromptSet, cache: BaseSampleCache | None = None) -> torch.Tensor:
        return generate(self.pipe, prompt_set.embeds, self.negative, prompt_set.seeds, self.recipe, cache=cache)

    def _sample_base(self, prompt_sets: list[PromptSet], cache: BaseSampleCache | None) -> list[torch.Tensor]:
        """The base model's samples of each set, read from the cache or drawn into it. Workers
        that start together on an empty cache share the drawing: a set another worker is drawing
        is skipped, and read once it is stored (on the mini world two workers starting together
        take 9.9 s each instead of 14.7 and 17.2 s, one core each, 2 cores AVX-512)."""
        if cache is None:
            return [self._sample(s) for s in prompt_sets]
        keys = [cache.key(self.pipe, s.embeds, self.negative, s.seeds, self.recipe) for s in prompt_sets]
        out: list[torch.Tensor | None] = [None] * len(prompt_sets)
        for wait in (False, True):  # first what nobody else is drawing, then the rest
            for i, prompt_set in enumerate(prompt_sets):
                if out[i] is None:
                    with cache.drawing(keys[i], wait=wait) as held:
                        if held:
                            out[i] = self._sample(prompt_set, cache)  # stored by another: read
        return out

    def _sample_reusing(self, name: str, prompt_set: PromptSet, known: DrawnSamples | None) -> torch.Tensor:
        """The prompt set's images, the (prompt, seed) pairs `known` drew with this recipe taken
        from it, only the others sampled. (P x S, 3, R, R), prompt-major over self.seeds."""
        if known is None or known.recipe != self.recipe or not set(known.seeds) < set(self.seeds):
            return self._sample(prompt_set)
        missing = [k for k, seed in enumerate(prompt_set.seeds) if seed not in known.seeds]
        drawn = self._sample(PromptSet(prompt_set.embeds[missing], [prompt_set.seeds[k] for k in missing]))
        images = torch.empty((len(prompt_set.seeds), *drawn.shape[1:]), dtype=drawn.dtype)
        images[missing] = drawn
        held = [k for k, seed in enumerate(prompt_set.seeds) if seed in known.seeds]
        images[held] = known.images[name][rows_in(known.seeds, [(k // self.n_seeds, prompt_set.seeds[k]) for k in held])]
        return images

    def compute_base(self, drawn_by: "CheckpointEvaluator | None" = None) -> BaseReference:
        """Sample the base model (or read its samples from the disk cache of earlier runs). Call
        before a LoRA is injected. `drawn_by`: an evaluator whose base samples hold all of this
        one's (same prompts and recipe, a superset of the seeds: the full recipe's, for the
        screening's base): they are taken from it, not drawn again."""
        cache = BaseSampleCache.for_settings(self.settings)
        # The same prompts with other seeds: how far KID moves when nothing but the noise changes.
        other_seeds = PromptSet(self.prior.embeds, [s + 1000 for s in self.prior.seeds])
        samples = self._base_samples_of(drawn_by) if drawn_by is not None else None
        if samples is None:
            with self.placement.stage(self.sample_stage):
                samples = self._sample_base([self.trigger, self.prior, other_seeds], cache)
        trig, prior, other = samples
        e = self.settings.eval
        sanity = M.image_sanity(torch.cat([trig, prior]), e.flat_std, e.noise_level)
        clean_trig, clean_prior = torch.nan_to_num(trig), torch.nan_to_num(prior)
        with self.placement.stage(self.metrics_stage), self.placement.visiting("feature_network", self.net):
            reference, base_prior = self._reference_features(), M.embed(self.net, prior)
            noise_mean, noise_std = M.kid_of(base_prior, M.embed(self.net, other), e.kid_subset_size)
            kid = M.kid_of(reference, M.embed(self.net, clean_trig), e.kid_subset_size)[0]
            prior_reference_kid = M.kid_of(reference, M.embed(self.net, clean_prior), e.kid_subset_size)[0]
        with self.placement.stage(self.metrics_stage), self.placement.visiting("identity_network", self.id_net):
            reference_id = self._reference_identity()
            identity = dict(
                id_sim=M.mean_similarity(M.identity_embeddings(self.id_net, clean_trig), reference_id),
                leak=M.mean_similarity(M.identity_embeddings(self.id_net, clean_prior), reference_id),
                reference_id_sim=M.mean_similarity(reference_id, reference_id),
                reference_sample_sim=M.mean_pairwise_similarity(self.id_net, self.reference),
            )
        self._base_prior_features = base_prior
        self.base = BaseReference(trigger_images=trig, prior_images=prior, noise_images=other, degenerate=sum(sanity.values()),
                                  prior_kid_noise=abs(noise_mean) + 3 * noise_std, kid=kid,
                                  prior_reference_kid=prior_reference_kid, **identity)
        return self.base

    def _base_samples_of(self, other: "CheckpointEvaluator") -> list[torch.Tensor] | None:
        """This evaluator's base samples (trigger, prior, noise floor) picked out of `other`'s
        base, or None where `other` has not drawn them all (another recipe, prompts or seeds)."""
        if (other.base is None or other.recipe != self.recipe or other.grid_rows != self.grid_rows
                or not set(self.seeds) <= set(other.seeds)):
            return None
        trigger, prior = ([(p, seed) for p in range(len(self.grid_rows[name])) for seed in self.seeds] for name in ("trigger", "prior"))
        base = other.base
        return [base.trigger_images[rows_in(other.seeds, trigger)], base.prior_images[rows_in(other.seeds, prior)],
                base.noise_images[rows_in(other.seeds, prior)]]

    def _reference_features(self) -> torch.Tensor:
        """The training images' features, embedded once: every checkpoint compares against them.
        Call while the feature network visits its device."""
        if self._reference_embedded is None:
            self._reference_embedded = M.embed(self.net, self.reference)
        return self._reference_embedded

    def _reference_identity(self) -> torch.Tensor:
        """The training images' identity embeddings, once (while the identity network visits)."""
        if self._reference_identities is None:
            self._reference_identities = M.identity_embeddings(self.id_net, self.reference)
        return self._reference_identities

    def base_grids(self) -> dict[str, "PIL.Image.Image"]:  # noqa: F821
        """The base model's samples as labelled grids by prompt set: step 0 of every trial."""
        assert self.base is not None, "compute_base() first"
        return {"trigger": labelled_grid(self.base.trigger_images, self.grid_rows["trigger"], self.seeds),
                "prior": labelled_grid(self.base.prior_images, self.grid_rows["prior"], self.seeds)}

    def evaluate(self, known: DrawnSamples | None = None) -> tuple[dict[str, float], dict[str, "PIL.Image.Image"]]:  # noqa: F821
        """Metric row (keys without the `eval/` prefix) and the labelled sample grids by prompt
        set ("trigger", "prior"), for the pipeline's current transformer (with its LoRA).
        `known`: samples of this same LoRA drawn before (the screening's), reused where they are
        this recipe's. The samples drawn are kept in self.drawn."""
        assert self.base is not None, "compute_base() first"
        from klein_sweep.lora.adapters import merged_lora

        e = self.settings.eval
        with self.placement.stage(self.sample_stage), merged_lora(self.pipe.transformer):
            trig, prior = self._sample_reusing("trigger", self.trigger, known), self._sample_reusing("prior", self.prior, known)
        self.drawn = DrawnSamples(self.recipe, self.seeds, {"trigger": trig, "prior": prior})
        clean_trig = torch.nan_to_num(trig)
        clean_prior = torch.nan_to_num(prior)
        sanity = M.image_sanity(torch.cat([trig, prior]), e.flat_std, e.noise_level)
        with self.placement.stage(self.metrics_stage):
            with self.placement.visiting("feature_network", self.net):
                reference, trig_features = self._reference_features(), M.embed(self.net, clean_trig)
                kid_mean, kid_std = M.kid_of(reference, trig_features, e.kid_subset_size)
                prior_kid, _ = M.kid_of(self._base_prior_features, M.embed(self.net, clean_prior), e.kid_subset_size)
                row = {"kid": kid_mean, "kid_std": kid_std, "fid": M.fid_of(reference, trig_features), "prior_kid": prior_kid}
                if self.net.has_class_head:  # IS needs class logits: absent with DINOv2 / CLIP features
                    row["is"] = M.inception_score(self.net, clean_trig)
            with self.placement.visiting("identity_network", self.id_net):
                reference_id = self._reference_identity()
                row.update(id_sim=M.mean_similarity(M.identity_embeddings(self.id_net, clean_trig), reference_id),
                           leak=M.mean_similarity(M.identity_embeddings(self.id_net, clean_prior), reference_id),
                           sample_sim=M.mean_pairwise_similarity(self.id_net, clean_trig))
            if self.clip is not None:
                with self.placement.visiting("clip", self.clip):
                    row["clip_t"] = self.clip.text_similarity(clean_prior, self.prior_prompts)
        row.update(sanity)
        grids = {name: labelled_grid(images, self.grid_rows[name], self.seeds)
                 for name, images in (("trigger", clean_trig), ("prior", clean_prior))}
        return row, grids
