"""Metric networks for real images, each loaded offline from a local folder named in
`eval.network_paths`, behind the same FeatureNetwork interface as the mini world's network:

  inception  InceptionV3 pool features / logits, the standard FID/KID/IS network (torch-fidelity's
             weights through torchmetrics; `pip install 'klein_sweep[inception]'`, GPU machines)
  dinov2     DINOv2 CLS embedding: identity of a character or object (transformers)
  clip       CLIP image embedding: identity and style; with the text tower, CLIP-T prompt fidelity
  arcface    ArcFace face embedding (insightface + onnxruntime, `pip install 'klein_sweep[arcface]'`).
             Its model weights are licensed for non-commercial research only.

Nothing is downloaded at run time: a missing folder is one message naming what to download and
which key to set.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from klein_sweep.errors import ConfigError
from klein_sweep.evaluation.feature_network import FeatureNetwork
from klein_sweep.evaluation.network_choice import DOWNLOADS, network_path


def _normalise(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> resized to size x size and standardised."""
    # antialias: a 512 px sample shrunk to 224 without it aliases (what the networks' own processors avoid)
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class Dinov2Features(FeatureNetwork):
    """CLS token of DINOv2: a self-supervised embedding where the same subject stays close."""

    has_class_head = False

    def __init__(self, folder: Path, batch_size: int = 32):
        super().__init__()
        from transformers import AutoImageProcessor, Dinov2Model

        self.model = Dinov2Model.from_pretrained(folder, local_files_only=True).eval().requires_grad_(False)
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        self.size = processor.crop_size["height"] if hasattr(processor, "crop_size") else 224
        self.mean, self.std = processor.image_mean, processor.image_std
        self.num_features = self.model.config.hidden_size
        self.batch_size = batch_size

    @torch.no_grad()
    def embed(self, images):
        device = next(self.model.parameters()).device
        out = [self.model(pixel_values=_normalise(chunk, self.size, self.mean, self.std).to(device)).pooler_output.float().cpu()
               for chunk in images.split(self.batch_size)]
        return torch.cat(out)

    def logits(self, images):
        raise ConfigError("eval.feature_network", "dinov2", "inception (or mini) for the Inception Score: DINOv2 has no class head")


class ClipFeatures(FeatureNetwork):
    """CLIP image embeddings; `text_similarity` gives CLIP-T (image-prompt cosine)."""

    has_class_head = False

    def __init__(self, folder: Path, batch_size: int = 32):
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.size = self.model.config.vision_config.image_size
        self.mean, self.std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
        self.num_features = self.model.config.projection_dim
        self.batch_size = batch_size

    @torch.no_grad()
    def embed(self, images):
        device = next(self.model.parameters()).device
        out = []
        for chunk in images.split(self.batch_size):
            pixels = _normalise(chunk, self.size, self.mean, self.std).to(device)
            vision = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(vision).float().cpu())
        return torch.cat(out)

    def logits(self, images):
        raise ConfigError("eval.feature_network", "clip", "inception (or mini) for the Inception Score")

    @torch.no_grad()
    def text_similarity(self, images: torch.Tensor, prompts: list[str]) -> float:
        """Mean cosine between each image and its prompt (CLIP-T); images[i] goes with prompts[i]."""
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(device)
        text = self.model.text_model(**tokens).pooler_output
        text = F.normalize(self.model.text_projection(text).float().cpu(), dim=-1)
        image = F.normalize(self.embed(images), dim=-1)
        return float((image * text).sum(dim=-1).mean())


class InceptionFeatures(FeatureNetwork):
    """InceptionV3 as FID defines it (torch-fidelity's port, through torchmetrics): 2048-d pool
    features for FID/KID, 1008-way logits for IS."""

    def __init__(self, folder: Path):
        super().__init__()
        weights = sorted(folder.glob("*inception*.pth"))
        if not weights:
            raise ConfigError("eval.network_paths.inception", str(folder), f"a folder holding {DOWNLOADS['inception']}")
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.pool = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                           feature_extractor_weights_path=str(weights[0]))
            self.head = NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"],
                                           feature_extractor_weights_path=str(weights[0]))
        except (ImportError, ModuleNotFoundError) as exc:  # torch-fidelity / torchvision missing
            raise ConfigError("eval.feature_network", "inception",
                              f"installed with pip install 'klein_sweep[inception]' (needs torchvision; GPU machines): {exc}") from exc
        self.num_features = 2048

    @torch.no_grad()
    def embed(self, images):
        return self.pool((images.clamp(0, 1) * 255).to(torch.uint8)).float()

    @torch.no_grad()
    def logits(self, images):
        return self.head((images.clamp(0, 1) * 255).to(torch.uint8)).float()


class ArcFaceFeatures(FeatureNetwork):
    """ArcFace embedding of the largest face (insightface). An image without a face embeds as
    NaN, so identity similarity counts it as a miss rather than as a match."""

    has_class_head = False

    def __init__(self, folder: Path):
        super().__init__()
        try:
            from insightface.app import FaceAnalysis
        except Exception as exc:
            raise ConfigError("eval.identity_network", "arcface",
                              f"installed with pip install 'klein_sweep[arcface]' (insightface, onnxruntime): {exc}") from exc
        packs = sorted(p.name for p in (folder / "models").glob("*") if p.is_dir())
        if not packs:
            raise ConfigError("eval.network_paths.arcface", str(folder), f"a folder holding {DOWNLOADS['arcface']}")
        self.app = FaceAnalysis(name=packs[0], root=str(folder), allowed_modules=["detection", "recognition"])
        self.app.prepare(ctx_id=0 if torch.cuda.is_available() else -1, det_size=(640, 640))
        self.num_features = 512

    @torch.no_grad()
    def embed(self, images):
        import numpy as np

        out = []
        for img in images:
            bgr = (img.clamp(0, 1).permute(1, 2, 0).cpu().numpy()[:, :, ::-1] * 255).astype(np.uint8)
            faces = self.app.get(bgr)
            if not faces:
                out.append(torch.full((self.num_features,), float("nan")))
                continue
            face = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
            out.append(torch.from_numpy(face.normed_embedding.astype("float32")))
        return torch.stack(out)

    def logits(self, images):
        raise ConfigError("eval.feature_network", "arcface", "inception (or mini) for the Inception Score")


def load_real_network(name: str, paths: dict) -> FeatureNetwork:
    folder = network_path(paths, name)
    return {"dinov2": Dinov2Features, "clip": ClipFeatures, "inception": InceptionFeatures, "arcface": ArcFaceFeatures}[name](folder)
