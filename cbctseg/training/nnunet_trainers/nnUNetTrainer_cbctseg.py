"""nnU-Net trainers of this project, found by nnU-Net through `nnUNet_extTrainer` pointing at this folder."""
import os

import torch
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
    nnUNetTrainer_onlyMirror01,
)


class nnUNetTrainer_onlyMirror01_custom(nnUNetTrainer_onlyMirror01):
    """The winner's trainer (mirroring on axes 0 and 1 only) with the schedule set from the environment.

    CBCTSEG_EPOCHS, CBCTSEG_ITERS (per epoch), CBCTSEG_VAL_ITERS and CBCTSEG_SAVE_EVERY override nnU-Net's
    1500-epoch schedule for smoke runs and demo weights on a CPU.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("CBCTSEG_EPOCHS", 1500))
        self.num_iterations_per_epoch = int(os.environ.get("CBCTSEG_ITERS", 250))
        self.num_val_iterations_per_epoch = int(os.environ.get("CBCTSEG_VAL_ITERS", 50))
        self.save_every = int(os.environ.get("CBCTSEG_SAVE_EVERY", 50))
