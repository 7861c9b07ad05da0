"""Words the library and its commands share: the closed sets of names the library accepts (devices, output types)
and the scoring policy for empty masks that the scores, the summary and ``fsseg-evaluate --help`` state.

This module imports nothing, so that the commands can offer these as choices and help without loading torch."""

DEVICES = ("auto", "cpu", "cuda")

# What fsseg-predict writes each mask as.
OUTPUT_TYPES = ("nifti", "dicom-seg")

EMPTY_POLICY = (
    "Both masks empty: Dice 1, NSD 1, HD95 0 (the structure is correctly absent). "
    "Ground truth empty but prediction not: Dice 0, NSD 0, HD95 undefined (NaN). "
    "Prediction empty but ground truth not: Dice 0, NSD 0, HD95 undefined (NaN). "
    "A missing or unreadable prediction scores like an empty one and is counted as a failure. "
    "Means, stds and medians skip NaN values; the summary counts each case kind."
)

# What an exported MONAI bundle suffixes its masks with: <scan>_seg.nii.gz.
BUNDLE_MASK_POSTFIX = "seg"
