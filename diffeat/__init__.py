"""diffeat: pretrained diffusion models as feature extractors.

The pipeline has three stages that share one Zarr feature store:
``extract`` (images -> frozen U-Net -> pooled block activations -> store),
``probe`` (heads trained on cached features) and ``cka`` (representation
similarity between cached feature sets).
"""

__version__ = "0.1.0"
