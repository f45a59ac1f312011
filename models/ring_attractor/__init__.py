"""The ring attractor family (seed 001): the network, its constraints, decoding and the training API.

    from models.ring_attractor import (RingAttractorNetwork, train_model_enhanced, quick_train,
                                       create_training_config, AdamCosineTrainer)
"""

from models.ring_attractor.network import RingAttractorNetwork
from models.ring_attractor.training import (
    AdamCosineTrainer,
    TrainingConfig,
    create_training_config,
    quick_train,
    show_training_plots,
    train_model_enhanced,
    training_preset,
)

__all__ = ["AdamCosineTrainer", "RingAttractorNetwork", "TrainingConfig", "create_training_config", "quick_train",
           "show_training_plots", "train_model_enhanced", "training_preset"]
