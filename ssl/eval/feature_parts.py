"""What a frozen encoder's image features are made of, computed in one forward pass.

A *part* is one block of features (ViTs: the CLS token after the final norm, the mean of the
patch tokens, the CLS tokens of the last 4 blocks each through the final norm, as dinov2's
linear evaluation); a *variant* is the concatenation of parts a probe is trained on
("cls+avgpool"). k-NN uses the encoder's global vector: "cls" for ViTs with a CLS token,
"global" otherwise (CNN average pool, raw pixels).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from ssl.backbones.base import Backbone

VIT_VARIANTS = ("cls", "cls+avgpool", "last4", "last4+avgpool")
LAST_BLOCKS = 4


def has_cls_token(encoder: object) -> bool:
    if not (isinstance(encoder, Backbone) and encoder.is_vit):
        return False
    return getattr(encoder.model, "cls_token", None) is not None


def primary_part(encoder: object) -> str:
    """The part k-NN and the default probe use: the encoder's global vector."""
    return "cls" if has_cls_token(encoder) else "global"


def available_variants(encoder: object) -> tuple[str, ...]:
    return VIT_VARIANTS if has_cls_token(encoder) else ("global",)


def resolve_variants(encoder: object, requested: Iterable[str] | str | None) -> list[str]:
    """`auto` / None: every variant the encoder has; else the requested ones, checked."""
    available = available_variants(encoder)
    if requested is None or requested == "auto":
        return list(available)
    names = [requested] if isinstance(requested, str) else list(requested)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(
            f"feature variant(s) {unknown} not available for this encoder; valid: {', '.join(available)}"
        )
    return names


def parts_of(variants: Iterable[str]) -> list[str]:
    """The distinct parts a set of variants is built from, in a stable order."""
    parts: list[str] = []
    for variant in variants:
        for part in variant.split("+"):
            if part not in parts:
                parts.append(part)
    return parts


def assemble(parts: Mapping[str, torch.Tensor], variant: str) -> torch.Tensor:
    """A variant's feature matrix: its parts concatenated along the feature axis."""
    return torch.cat([parts[p] for p in variant.split("+")], dim=1)


@torch.no_grad()
def vit_parts(backbone: Backbone, images: torch.Tensor, wanted: Iterable[str]) -> dict[str, torch.Tensor]:
    """cls / avgpool / last4 of a timm ViT in one pass (the same token path as forward_features)."""
    wanted = set(wanted)
    model = backbone.model
    tokens, _ = backbone.patch_embed(images)
    x = model.norm_pre(model.pos_drop(backbone.add_prefix(tokens)))
    depth = len(model.blocks)
    last = []
    for i, block in enumerate(model.blocks):
        x = block(x)
        if "last4" in wanted and i >= depth - LAST_BLOCKS:
            last.append(model.norm(x)[:, 0])
    final = model.norm(x)
    n_prefix = model.num_prefix_tokens
    out = {}
    if "cls" in wanted:
        out["cls"] = final[:, 0]
    if "avgpool" in wanted:
        out["avgpool"] = final[:, n_prefix:].mean(dim=1)
    if "last4" in wanted:
        out["last4"] = torch.cat(last, dim=1)
    return out


def part_encoder(
    encoder: Callable[[torch.Tensor], torch.Tensor], parts: Iterable[str]
) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """images -> {part: [B, D_part]} for the requested parts of `encoder`."""
    parts = list(parts)
    if parts == ["global"] or not has_cls_token(encoder):
        if parts != ["global"]:
            raise ValueError(f"parts {parts} need a ViT with a CLS token; this encoder has only 'global'")
        return lambda images: {"global": encoder(images)}
    return lambda images: vit_parts(encoder, images, parts)
