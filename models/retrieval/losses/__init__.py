"""Training objectives of the unified retriever, one small module each (methods 4 and 5 of docs/DESIGN.md).

All of them take similarity scores or L2-normalised embeddings as plain tensors, so they can
be tested on hand-built numbers and reused by any dual encoder.
"""

from tailbridge.models.retrieval.losses.contrastive import ContrastiveLoss, masked_contrastive_loss
from tailbridge.models.retrieval.losses.multigrained import MultiGrainedLoss, multi_grained_loss
from tailbridge.models.retrieval.losses.roar import roar_loss

__all__ = ["ContrastiveLoss", "MultiGrainedLoss", "masked_contrastive_loss", "multi_grained_loss", "roar_loss"]
