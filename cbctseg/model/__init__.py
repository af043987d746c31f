"""The model folder: where it sits, its manifest and checks, and loading its networks."""
