"""megassm: HTH (Hydra + attention) diffusion models at scale."""

__version__ = "0.1.0"
