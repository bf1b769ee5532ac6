from megassm.models.hth import HTHModel, build_model

__all__ = ["HTHModel", "build_model"]
