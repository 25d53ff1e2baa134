"""Segmenter (Strudel et al., ICCV 2021) as MBS builds it (RoadoneP/ECCV2024_MBS `core/Segmenter/`),
written for incremental learning, in the suite's network interface (lightning_modules/network.py).

    tokens = ViT(image) without its class token                          (B, N, d_encoder)
    x      = [proj_dec(tokens), E]   E: the class embeddings, one group per step
    x      = decoder_norm(blocks(x))                                      2 pre-norm transformer blocks
    P      = x_patches @ proj_patch,  Q = x_classes @ proj_classes         (B, N, d), (B, K, d)
    masks  = MaskLayerNorm(normalise(P) normalise(Q)^T)                   (B, K, h, w)
MaskLayerNorm normalises each patch's K scores (mean and unbiased std over the classes, eps
1e-5) and applies a per-class affine stored per step. The class embeddings and the affine are
stored per step ([background + step-0 classes], [step 1], ...): a new step adds a group, and the
state dict of an earlier step loads into the grown network (the groups it has).

forward(images) returns "logits" (bilinear to the image), "logits_lowres" (the patch-level masks,
what MBS's AFD weights come from), "patches" (P, after the projection and before normalisation),
"class_features" (Q) and "class_embeddings" (E, batch-expanded): what MBS distils.

In the configuration: `network.kind: segmenter` (experiments/config.py NetworkConfig).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.network import SegmentationNetwork


class MaskLayerNorm(nn.Module):
    """LayerNorm over the class scores of a patch, with a per-class affine kept per step
    (decoder.py MaskLayerNorm): (x - mean) / (std + eps) * w + b, std unbiased."""

    def __init__(self, classes_per_step: list[int], eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.ParameterList(nn.Parameter(torch.ones(c)) for c in classes_per_step)
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(c)) for c in classes_per_step)

    def add_group(self, num_classes: int) -> None:
        device = self.weight[0].device
        self.weight.append(nn.Parameter(torch.ones(num_classes, device=device)))
        self.bias.append(nn.Parameter(torch.zeros(num_classes, device=device)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = (x - x.mean(dim=-1, keepdim=True)) / (x.std(dim=-1, keepdim=True) + self.eps)
        return normed * torch.cat(list(self.weight)) + torch.cat(list(self.bias))


def _init_weights(module: nn.Module) -> None:
    """Segmenter's init_weights: truncated normal (std 0.02) Linear weights, zero biases; LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MaskTransformer(nn.Module):
    """The mask-transformer decoder with one class-embedding group per step."""

    def __init__(self, classes_per_step: list[int], d_encoder: int, d_model: int, n_layers: int = 2,
                 n_heads: int | None = None, mlp_ratio: float = 4.0, drop_path: float = 0.1):
        super().__init__()
        from timm.models.vision_transformer import Block

        n_heads = n_heads or max(1, d_model // 64)
        rates = [x.item() for x in torch.linspace(0, drop_path, n_layers)]
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=r)
                                    for r in rates)
        self.proj_dec = nn.Linear(d_encoder, d_model)
        self.decoder_norm = nn.LayerNorm(d_model)
        self.apply(_init_weights)
        scale = d_model ** -0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.class_embeddings = nn.ParameterList(nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, c, d_model), std=0.02))
                                                 for c in classes_per_step)
        self.mask_norm = MaskLayerNorm(classes_per_step)
        self.d_model = d_model

    def add_group(self, num_classes: int) -> None:
        device = self.proj_patch.device
        self.class_embeddings.append(nn.Parameter(nn.init.trunc_normal_(
            torch.zeros(1, num_classes, self.d_model, device=device), std=0.02)))
        self.mask_norm.add_group(num_classes)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
        embeddings = torch.cat(list(self.class_embeddings), dim=1).expand(tokens.shape[0], -1, -1)
        k = embeddings.shape[1]
        x = torch.cat([self.proj_dec(tokens), embeddings], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patches, classes = x[:, :-k] @ self.proj_patch, x[:, -k:] @ self.proj_classes
        masks = (patches / patches.norm(dim=-1, keepdim=True)) @ (classes / classes.norm(dim=-1, keepdim=True)).transpose(1, 2)
        masks = self.mask_norm(masks).transpose(1, 2).reshape(tokens.shape[0], k, *grid)
        return {"logits_lowres": masks, "patches": patches, "class_features": classes, "class_embeddings": embeddings}


class SegmenterNetwork(nn.Module):
    """ViT encoder (timm) + incremental mask transformer, with the interface of SegmentationNetwork.

    encoder: a timm ViT name; encoder_weights: a timm pretrained tag of it (MBS: vit_base_patch16_384
    with augreg_in21k_ft_in1k, the ImageNet-21k -> 1k weights that timm 0.6.12, the code's version,
    loads by default), None from scratch. image_size: the input size its position embeddings are
    made for (the pretrained 24 x 24 grid is resized to image_size / patch_size at load); inputs of
    other sizes interpolate them, as Segmenter does. vit_width / vit_depth / vit_heads: the timm
    model's own when None."""

    def __init__(self, classes_per_step: list[int], encoder: str = "vit_base_patch16_384", image_size: int = 512,
                 patch_size: int = 16, vit_width: int | None = None, vit_depth: int | None = None,
                 vit_heads: int | None = None, decoder_layers: int = 2, decoder_drop_path: float = 0.1,
                 encoder_weights: str | None = None):
        super().__init__()
        import timm

        from lightning_modules.network import PretrainedWeightsUnavailable

        if not timm.is_model(encoder):
            raise ValueError(f"unknown ViT encoder {encoder!r} (a timm model name, e.g. vit_base_patch16_384)")
        shape = {k: v for k, v in dict(embed_dim=vit_width, depth=vit_depth, num_heads=vit_heads).items() if v}
        name = f"{encoder}.{encoder_weights}" if encoder_weights else encoder
        try:
            self.encoder = timm.create_model(name, pretrained=encoder_weights is not None, img_size=image_size,
                                             patch_size=patch_size, num_classes=0, dynamic_img_size=True, **shape)
        except (OSError, ConnectionError, RuntimeError) as error:  # huggingface_hub errors are OSErrors
            if encoder_weights is None:
                raise
            raise PretrainedWeightsUnavailable(
                f"the {encoder_weights!r} weights of ViT {encoder!r} are neither cached nor downloadable here "
                f"({type(error).__name__}). Run once with network access to cache them (timm stores them in the "
                "Hugging Face cache), or set network.encoder_weights=null to train from scratch on purpose") from None
        self.patch_size = patch_size
        self.output_stride = patch_size
        width = self.encoder.embed_dim
        self.decoder = MaskTransformer(list(classes_per_step), width, width, decoder_layers,
                                       mlp_ratio=self.encoder.blocks[0].mlp.fc1.out_features / width,
                                       drop_path=decoder_drop_path)
        self._classes_per_step = list(classes_per_step)

    @property
    def classes_per_step(self) -> list[int]:
        return list(self._classes_per_step)

    @property
    def num_classes(self) -> int:
        return sum(self._classes_per_step)

    @property
    def feature_channels(self) -> int:
        return self.encoder.embed_dim

    def forward(self, images: torch.Tensor, taps=()) -> dict[str, torch.Tensor]:
        height, width = images.shape[-2:]
        p = self.patch_size
        padded = F.pad(images, (0, (-width) % p, 0, (-height) % p))   # Segmenter's padding (zeros, bottom/right)
        tokens = self.encoder.forward_features(padded)[:, self.encoder.num_prefix_tokens:]
        grid = (padded.shape[-2] // p, padded.shape[-1] // p)
        out = self.decoder(tokens, grid)
        logits = F.interpolate(out["logits_lowres"], size=padded.shape[-2:], mode="bilinear", align_corners=False)
        out["logits"] = logits[..., :height, :width]
        out["encoder"] = tokens
        return out

    # --- growth -------------------------------------------------------------------------------
    def add_classes(self, num_classes: int) -> None:
        self.decoder.add_group(num_classes)
        self._classes_per_step.append(num_classes)

    def init_new_classes_from_background(self) -> None:
        """MBS's background-token transfer: the newest group's embeddings become the background
        embedding, their mask-norm affine (1, 0)."""
        with torch.no_grad():
            background = self.decoder.class_embeddings[0][:, :1]
            self.decoder.class_embeddings[-1].copy_(background.expand_as(self.decoder.class_embeddings[-1]))
            self.decoder.mask_norm.weight[-1].fill_(1.0)
            self.decoder.mask_norm.bias[-1].fill_(0.0)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        embeddings = {id(p) for p in self.decoder.class_embeddings.parameters()}
        norms = {id(p) for p in self.decoder.mask_norm.parameters()}
        return {"encoder": list(self.encoder.parameters()),
                "decoder": [p for p in self.decoder.parameters() if id(p) not in embeddings | norms],
                "classifier": list(self.decoder.class_embeddings.parameters()) + list(self.decoder.mask_norm.parameters())}

    # --- the old model and the saved form: as the DeepLab network's ----------------------------
    frozen_copy = SegmentationNetwork.frozen_copy
    state = SegmentationNetwork.state
