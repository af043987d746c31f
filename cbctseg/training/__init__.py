"""The training stage: raw ToothFairy2 folder -> nnU-Net dataset -> plans -> two models -> weights/."""
