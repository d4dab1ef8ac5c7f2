"""fedmed: federated learning on brain MRI across hospitals, on Flower."""

__version__ = "0.1.0"
