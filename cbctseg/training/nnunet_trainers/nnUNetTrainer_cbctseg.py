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

    A model trained on fold 'all' (the recipe's two models) skips nnU-Net's final validation: its validation
    cases are its training cases, so the sliding-window prediction of every one of them (hours on the full
    dataset) would only score the model on what it was trained on. CBCTSEG_VALIDATE_ALL=1 runs it anyway.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("CBCTSEG_EPOCHS", 1500))
        self.num_iterations_per_epoch = int(os.environ.get("CBCTSEG_ITERS", 250))
        self.num_val_iterations_per_epoch = int(os.environ.get("CBCTSEG_VAL_ITERS", 50))
        self.save_every = int(os.environ.get("CBCTSEG_SAVE_EVERY", 50))

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.fold == "all" and os.environ.get("CBCTSEG_VALIDATE_ALL") != "1":
            self.print_to_log_file("final validation skipped: fold 'all' validates on its own training cases "
                                   "(CBCTSEG_VALIDATE_ALL=1 runs it)")
            return
        super().perform_actual_validation(save_probabilities)
