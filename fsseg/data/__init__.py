"""Data: NIfTI reading, data lists and label maps, preprocessing transforms, phantoms, validation."""
