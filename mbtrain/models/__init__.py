"""The networks: importing this package registers every model (models/base.py), in the order --help lists them."""

from mbtrain.models.base import MODELS, Inputs, ModelConfig, MultiTaskModel, MultiTaskNetwork, build_model, register
from mbtrain.models.embedding import FusedEmbedding
from mbtrain.models.towers import Towers

# isort: split
from mbtrain.models.shared_bottom import SharedBottom  # noqa: I001 (registration order)
from mbtrain.models.mmoe import MMoE
from mbtrain.models.ple import PLE
from mbtrain.models.esmm import ESMM
from mbtrain.models.aitm import AITM

__all__ = ["AITM", "ESMM", "MODELS", "PLE", "FusedEmbedding", "Inputs", "MMoE", "ModelConfig", "MultiTaskModel",
           "MultiTaskNetwork", "SharedBottom", "Towers", "build_model", "register"]
