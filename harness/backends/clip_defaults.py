"""Defaults of the contrastive (CLIP/SigLIP) backends: the study's model specs and text templates.

A module of its own, without torch, so the command line can show them as argument defaults without
loading torch (:mod:`harness.backends.contrastive` re-exports them next to the models)."""

from __future__ import annotations

#: The hierarchy study's CLIP (open_clip) and the SigLIP that mines "similar" distractors.
DEFAULT_OPEN_CLIP = "open_clip:ViT-L-14/laion2b_s32b_b82k"
DEFAULT_SIGLIP = "hf:google/siglip-so400m-patch14-384"

#: Text templates: the hierarchy reference (open_clip and SigLIP) and the classification paper's CLIP.
TEMPLATE_HIERARCHY = "a photo of a {}."
TEMPLATE_CLASSIFICATION = "A photo of a {cls}"
