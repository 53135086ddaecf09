"""Models built on any registered attention: LRA-style classifier, causal LM, two-tower retrieval."""

from .backbone import Backbone
from .builder import MODEL_KINDS, ModelConfig, build_model
from .classifier import SequenceClassifier
from .lm import CausalLM
from .retrieval import TwoTowerClassifier

__all__ = [
    "Backbone",
    "SequenceClassifier",
    "CausalLM",
    "TwoTowerClassifier",
    "ModelConfig",
    "build_model",
    "MODEL_KINDS",
]
